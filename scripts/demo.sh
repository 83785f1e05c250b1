#!/usr/bin/env bash
# Builds the project and runs the main job: word count over MapReduce, as 2 local processes, on the sample
# text that ships with the project (or on the files and directories given as arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --bin dsmrun --bin wordcount
exec target/release/wordcount --procs "${DSM_DEMO_PROCS:-2}" --top 10 "$@"
