# Sourced by scripts/setup.sh and scripts/mpi-test.sh: finds MPICH's launcher (Hydra) and compiler wrapper,
# which may sit beside another MPI's (Debian gives Open MPI's the `mpirun` and `mpicc` names when both are
# installed, and keeps MPICH's as `mpiexec.hydra`, `mpirun.mpich` and `mpicc.mpich`).

# mpich_launcher: prints the path of MPICH's launcher, or nothing (status 1) when there is none.
mpich_launcher() {
    local c path out
    for c in mpirun mpiexec mpiexec.hydra mpirun.mpich mpiexec.mpich; do
        path=$(command -v "$c" 2>/dev/null) || continue
        # (Read whole, not piped to `grep -q`: under pipefail a launcher cut off by SIGPIPE fails the match.)
        out=$("$path" --version 2>&1) || continue
        if [[ $out == *HYDRA* ]]; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

# mpich_compiler: prints the path of MPICH's C compiler wrapper, or nothing (status 1) when there is none.
# MPICH's links its programs with libmpich; Open MPI's with libmpi.
mpich_compiler() {
    local c path out
    for c in mpicc mpicc.mpich; do
        path=$(command -v "$c" 2>/dev/null) || continue
        out=$("$path" -show 2>/dev/null) || continue
        if [[ $out == *-lmpich* ]]; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

# use_mpich DIR: puts `mpirun`, `mpiexec` and `mpicc` in DIR as scripts that start MPICH's, and DIR first on
# PATH, so that every `mpirun` and the build of the `mpi` feature (rsmpi finds `mpicc` on PATH, or in MPICC)
# use MPICH whichever MPI the names point at. Fails, saying what to install, when MPICH is missing.
use_mpich() {
    local dir=$1 run cc
    run=$(mpich_launcher) || {
        echo "MPICH's launcher (Hydra) was not found: install MPICH (apt-get install mpich libmpich-dev)" >&2
        return 1
    }
    cc=$(mpich_compiler) || {
        echo "MPICH's mpicc was not found: install MPICH (apt-get install mpich libmpich-dev)" >&2
        return 1
    }
    mkdir -p "$dir"
    # Scripts, not links: Hydra finds its proxy (hydra_pmi_proxy) beside the path it was started as.
    local name target
    for name in mpirun mpiexec mpicc; do
        target=$run
        [ "$name" = mpicc ] && target=$cc
        printf '#!/bin/sh\nexec %q "$@"\n' "$target" >"$dir/$name.new"
        chmod +x "$dir/$name.new"
        mv -f "$dir/$name.new" "$dir/$name"
    done
    PATH="$(cd "$dir" && pwd):$PATH"
    export PATH
    export MPICC="$cc"
}
