#!/usr/bin/env bash
# Installs what building dsm needs beyond a Rust toolchain: libclang (bindgen generates the userfaultfd
# bindings at build time); with DSM_WITH_MPI=1 also MPICH, and with DSM_FOR_TESTS=1 everything the tests
# use (MPICH, and iproute2's `ip` for the test that takes a network namespace's loopback down). Installs
# with apt-get when run as root; otherwise prints the exact command.
set -euo pipefail
. "$(dirname "$0")/mpich.sh"

need=()
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is not installed: install Rust from https://rustup.rs (stable, 1.87 or newer)" >&2
    exit 1
fi
# libclang itself (libclang.so.N, libclang-N.so.N), not libclang-cpp, which other packages bring and
# bindgen cannot use.
have_libclang() {
    local f
    for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
        /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
        [ -e "$f" ] && return 0
    done
    return 1
}
if ! have_libclang; then
    need+=(libclang-dev)
fi
if [ "${DSM_WITH_MPI:-0}" = 1 ] || [ "${DSM_FOR_TESTS:-0}" = 1 ]; then
    # MPICH itself: the MPI tests use its launcher (Hydra), and another MPI's `mpicc` does not stand in
    # (another MPI beside it is fine: scripts/mpi-test.sh picks MPICH's by name).
    { mpich_launcher && mpich_compiler; } >/dev/null || need+=(mpich libmpich-dev)
fi
if [ "${DSM_FOR_TESTS:-0}" = 1 ]; then
    command -v ip >/dev/null 2>&1 || need+=(iproute2)
fi
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi
if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! { apt-get update -qq && apt-get install -y -qq "${need[@]}" >/dev/null; }; then
        echo "setup: apt-get could not install ${need[*]} (see above); install them and run again" >&2
        exit 1
    fi
else
    echo "setup: missing system packages; run: sudo apt-get install -y ${need[*]}" >&2
    exit 1
fi
