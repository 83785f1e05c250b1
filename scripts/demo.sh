#!/usr/bin/env bash
# Builds the project and runs the hello example as a job of 4 local processes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin dsmrun --bin hello
exec target/release/dsmrun -n "${1:-4}" target/release/hello
