# Sourced by scripts/setup.sh and scripts/mpi-test.sh: finds MPICH's launcher (Hydra) and compiler wrapper,
# which may sit beside another MPI's (Debian gives Open MPI's the `mpirun` and `mpicc` names when both are
# installed, and keeps MPICH's as `mpiexec.hydra`, `mpirun.mpich` and `mpicc.mpich`).

# first_saying TEXT FLAG NAME...: prints the path of the first NAME on PATH whose output for FLAG holds
# TEXT, or nothing (status 1) when none does.
first_saying() {
    local text=$1 flag=$2 c path out
    shift 2
    for c in "$@"; do
        path=$(command -v "$c" 2>/dev/null) || continue
        # (Read whole, not piped to `grep -q`: under pipefail a command cut off by SIGPIPE fails the match.)
        out=$("$path" "$flag" 2>&1) || continue
        if [[ $out == *"$text"* ]]; then
            echo "$path"
            return 0
        fi
    done
    return 1
}

# mpich_launcher: prints the path of MPICH's launcher (its version names Hydra), or fails.
mpich_launcher() {
    first_saying HYDRA --version mpirun mpiexec mpiexec.hydra mpirun.mpich mpiexec.mpich
}

# mpich_compiler: prints the path of MPICH's C compiler wrapper, or fails. MPICH's links its programs
# with libmpich; Open MPI's with libmpi.
mpich_compiler() {
    first_saying -lmpich -show mpicc mpicc.mpich
}

# exec_script PATH TARGET: writes PATH as a script that runs TARGET with its arguments.
exec_script() {
    printf '#!/bin/sh\nexec %q "$@"\n' "$2" >"$1.new"
    chmod +x "$1.new"
    mv -f "$1.new" "$1"
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
    exec_script "$dir/mpirun" "$run"
    exec_script "$dir/mpiexec" "$run"
    exec_script "$dir/mpicc" "$cc"
    PATH="$(cd "$dir" && pwd):$PATH"
    export PATH
    export MPICC="$cc"
}
