#!/usr/bin/env bash
# Runs every check and test of the project: formatting, clippy with warnings as errors, the whole test
# suite (unit, protocol interleavings, multi-process jobs through the launcher), and the examples and
# correctness checks under mpirun (scripts/mpi-test.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every system package at once, MPICH for the mpirun checks and iproute2 included.
DSM_FOR_TESTS=1 bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace 2>&1 | tee "$log"
# One closing line for the whole run, summed from every test binary's own result line.
# The same programs under mpirun, built with the mpi feature (installs MPICH when missing).
bash scripts/mpi-test.sh
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f; exit (p == 0 || f > 0) }' "$log"
