#!/usr/bin/env bash
# Runs hello, the multi-process correctness checks (lock totals, litmus tests) and wordcount under mpirun
# (MPICH's Hydra), with -n 2 and -n 3, over the TCP and the MPI transports, built with the `mpi` feature, and checks what they print; then that
# a rank killed or stopped under mpirun ends the job with an error naming it, that ranks of different builds are
# stopped at join, and that a program built without the feature says how to rebuild. Called by scripts/test.sh. Installs MPICH when missing (as root; otherwise
# prints the apt-get command).
set -euo pipefail
cd "$(dirname "$0")/.."
DSM_WITH_MPI=1 bash scripts/setup.sh
# MPICH's `mpirun` and `mpicc` first on PATH, whatever MPI those names point at: the checks below rely on
# MPICH's launcher (PMI_RANK in the ranks' environment, running as root).
. scripts/mpich.sh
use_mpich target/mpi/mpich-bin
# A target directory of its own, so that this build and `cargo test`'s do not undo each other.
export CARGO_TARGET_DIR=target/mpi
cargo clippy -q -p dsm-runtime -p dsm-benches --features mpi -- -D warnings
cargo build -q -p dsm-examples --features mpi --bin hello --bin dsm-check --bin linda-check --bin wordcount
cargo build -q -p dsm-benches --features mpi --bin mpi-handoff
unset CARGO_TARGET_DIR
bin=target/mpi/debug
passed=0

fail() {
    echo "mpi-test: FAILED: $*" >&2
    exit 1
}

# mpirun N PROGRAM ARGS...: the job's output; fails the test if the job fails or runs past 120 s.
job() {
    local n=$1
    shift
    timeout 120 mpirun -n "$n" "$@" 2>&1 || fail "mpirun -n $n $* exited with $?"
}

# expect_job PATTERN COUNT N PROGRAM ARGS...: runs the job, failing the test if it fails (its status is lost
# when the job runs inside an argument's command substitution), and expects PATTERN COUNT times in its output.
expect_job() {
    local pattern=$1 count=$2 out
    shift 2
    out=$(job "$@") || exit 1
    expect "$pattern" "$count" "$out"
}

# same_as_pipeline DIR INPUT WHAT: the part files in DIR/counts hold the counts of the tr | sort | uniq -c
# pipeline on INPUT.
same_as_pipeline() {
    local dir=$1 input=$2
    LC_ALL=C tr -cs "A-Za-z'" '\n' <"$input" | tr A-Z a-z | LC_ALL=C sort | uniq -c |
        awk '$2 != "" { print $2 "\t" $1 }' | LC_ALL=C sort >"$dir/pipeline"
    cat "$dir"/counts/part-* | LC_ALL=C sort >"$dir/ours"
    cmp -s "$dir/pipeline" "$dir/ours" || fail "$3 differs from the pipeline"
}

# expect PATTERN COUNT OUTPUT: PATTERN occurs exactly COUNT times in OUTPUT (counted as occurrences, not
# lines: the ranks' outputs can run together on one line).
expect() {
    local got
    # (grep finds nothing: under pipefail that is the pipeline's status, which must not end the script
    # before it says what was missing.)
    got=$(grep -o -- "$1" <<<"$3" | wc -l || true)
    [ "$got" = "$2" ] || fail "expected $2 occurrence(s) of '$1', got $got in:
$3"
    passed=$((passed + 1))
}

# mentions PATTERN OUTPUT WHAT: PATTERN occurs at least once in OUTPUT (WHAT names it if not).
mentions() {
    grep -q -- "$1" <<<"$2" || fail "no word of $3 in:
$2"
    passed=$((passed + 1))
}

# fails_clearly MESSAGE COMMAND...: runs COMMAND (a job expected to fail) with a 60 s limit, leaving its
# output in `out`; the test fails with MESSAGE if the job succeeds, and says so if it is still running at the
# limit (the checks that follow look for words the ranks print before they would hang, so a job that printed
# them and then hung would otherwise pass).
fails_clearly() {
    local message=$1 status=0
    shift
    out=$(timeout 60 "$@" 2>&1) || status=$?
    [ "$status" != 0 ] || fail "$message: $out"
    [ "$status" != 124 ] || fail "still running after 60 s, ended by timeout: $*: $out"
}

# Every check over the TCP transport (the default) and over the MPI transport.
for transport in tcp mpi; do
export DSM_TRANSPORT=$transport
for n in 2 3; do
    expect_job "of $n sees \[1000, 1001" "$n" "$n" $bin/hello
    expect_job "counter ok: $((n * 300))" "$n" "$n" $bin/dsm-check counter --rounds 300
    expect_job "mp ok: 200 rounds" "$n" "$n" $bin/dsm-check mp --rounds 200
    expect_job "sb ok: 100 rounds" "$n" "$n" $bin/dsm-check sb --rounds 100
    expect_job "mplock ok: 30 rounds" "$n" "$n" $bin/dsm-check mplock --rounds 30
    expect_job "ownmpi ok: 200 rounds" "$n" "$n" $bin/dsm-check ownmpi --rounds 200
    expect_job "latehome ok: 300 rounds" "$n" "$n" $bin/dsm-check latehome --rounds 300 --consistency release
    # First-touch homes, learned from directories through Homes requests over either transport.
    expect_job "touchhomes ok" "$n" "$n" $bin/dsm-check touchhomes
    expect_job "touchrace ok: 50 rounds" "$n" "$n" $bin/dsm-check touchrace --rounds 50 --threads 2
    expect_job "touchrace ok: 50 rounds" "$n" "$n" $bin/dsm-check touchrace --rounds 50 --threads 2 --consistency release
    if [ "$n" = 2 ]; then
        # A task farm's only worker stops at a failed task and leaves the job: its master hears that it
        # is leaving (the service loop's Finishing, over either transport) instead of waiting for ever.
        expect_job "farm-deserted: the master was told" 1 2 $bin/linda-check farm-deserted
    fi

    out=$(mktemp -d)
    sample=examples/data/devils-dictionary.txt
    job "$n" $bin/wordcount "$sample" --output "$out/counts" --quiet --top 0 >/dev/null
    same_as_pipeline "$out" "$sample" "wordcount at $n ranks under mpirun ($transport transport)"
    passed=$((passed + 1))
    rm -rf "$out"
done
done
unset DSM_TRANSPORT

# The MPI transport with a send buffer far smaller than what moves at once (read-ahead replies of 4 MiB,
# a shuffle): flow control keeps every connection within its share instead of overflowing MPI_Bsend.
export DSM_TRANSPORT=mpi DSM_MPI_SEND_BUFFER=256K
expect_job "readahead ok" 3 3 $bin/dsm-check readahead
expect_job "counter ok: 600" 2 2 $bin/dsm-check counter --rounds 300
out=$(mktemp -d)
job 2 $bin/wordcount examples/data/devils-dictionary.txt --output "$out/counts" --quiet --top 0 >/dev/null
same_as_pipeline "$out" examples/data/devils-dictionary.txt "wordcount with a small MPI send buffer"
passed=$((passed + 1))
rm -rf "$out"
# A buffer too small for the job's connections: a clear error naming the variable.
fails_clearly "a send buffer too small for the job was accepted" env DSM_MPI_SEND_BUFFER=64K mpirun -n 3 $bin/hello
mentions "set DSM_MPI_SEND_BUFFER to at least" "$out" "the send buffer"
unset DSM_TRANSPORT DSM_MPI_SEND_BUFFER

# Over MPI a dead rank closes no connection: the policy that would wait for word of it is refused.
fails_clearly "DSM_ON_PEER_FAILURE=report was accepted with DSM_TRANSPORT=mpi" env DSM_TRANSPORT=mpi DSM_ON_PEER_FAILURE=report mpirun -n 1 $bin/hello
expect "DSM_ON_PEER_FAILURE=report needs DSM_TRANSPORT=tcp" 1 "$out"

# A transport that does not exist: the variable named, with what it takes. One rank, so that the message
# is not interleaved with another rank's copy of it (mpirun merges the ranks' standard error unbuffered).
fails_clearly "DSM_TRANSPORT=udp was accepted" env DSM_TRANSPORT=udp mpirun -n 1 $bin/hello
expect "DSM_TRANSPORT=\"udp\" is not valid: expected tcp or mpi" 1 "$out"

# The floor of a message-level MPI transport (a benchmark, run here only to see that it runs and reports
# every row; its numbers are in docs/BENCHMARKS.md).
out=$(job 2 $bin/mpi-handoff --iters 200)
expect "handed-off round trip, requester" 12 "$out"

# A rank killed under mpirun: the others end at once, naming it; nothing hangs.
fails_clearly "a job with a killed rank succeeded" mpirun -n 3 $bin/dsm-check die
# At least one survivor says so: mpirun may end the other before it does.
mentions "rank 2 failed" "$out" "a survivor naming the killed rank"

# A rank stopped under mpirun (SIGSTOP: its connections stay open and silent): the others give up on it
# after the peer timeout, naming it, over either transport; mpirun then ends the job.
for t in tcp mpi; do
    fails_clearly "a job with a stopped rank succeeded ($t)" env DSM_TRANSPORT=$t DSM_PEER_TIMEOUT=2 mpirun -n 3 $bin/dsm-check stop
    # The first to give up tells the other, which may then report that instead of its own silence, or be
    # ended by mpirun before it says anything.
    mentions "rank 2 failed (nothing heard from it for 2 s" "$out" "the silence ($t)"
    # Only rank 0 has a peer timeout: rank 1 learns of the stopped rank from rank 0's report, which must
    # leave rank 0 while it waits to end (under the MPI transport, its bridge thread carries it).
    fails_clearly "a job with a stopped rank succeeded ($t, one timeout)" env DSM_TRANSPORT=$t mpirun -n 1 env DSM_PEER_TIMEOUT=2 $bin/dsm-check stop : -n 2 $bin/dsm-check stop
    mentions "rank 1: rank 2 failed (rank 0 gave up on it" "$out" "the report of the silence ($t)"
done

# A rank that returns an error from main while another waits for it outside any collective: it leaves as
# a failed rank, without waiting (before, both waited for each other for ever).
for t in tcp mpi; do
    fails_clearly "a job whose rank returned an error succeeded ($t)" env DSM_TRANSPORT=$t mpirun -n 2 $bin/dsm-check errorwaited
    expect "rank 1 gives up on an error" 1 "$out"
    grep -q "neither wrote" <<<"$out" && fail "rank 0 waited out its time limit ($t): $out"
done

# The same under a launcher that lets the other ranks run on when one fails (Hydra's -disable-auto-cleanup,
# as Slurm's srun with KillOnBadExit=0), with no peer timeout: the others learn of the failed rank only from
# its connections' ends, which must reach them before it exits (over the MPI transport its bridge sends
# them; without waiting for them, about half of these jobs ran into rank 0's 30 s limit). Several runs, as
# that loss depends on timing.
for t in tcp mpi mpi mpi; do
    for check in errorwaited panicwaited; do
        fails_clearly "a job whose rank gave up succeeded ($t, $check, no cleanup)" env DSM_TRANSPORT=$t DSM_PEER_TIMEOUT=0 RUST_BACKTRACE=0 mpirun -disable-auto-cleanup -n 3 $bin/dsm-check $check
        mentions "rank 1 failed" "$out" "the others learning of rank 1's end ($t, $check)"
        grep -q "neither wrote" <<<"$out" && fail "a rank waited out its time limit ($t, $check, no cleanup): $out"
    done
done

# A service that touches shared memory on the bridge thread (which would wait for ever for its own fault):
# the rank ends saying why.
for t in tcp mpi; do
    fails_clearly "a service touching shared memory was answered ($t)" env DSM_TRANSPORT=$t mpirun -n 2 $bin/dsm-check servicefault
    mentions "a Service must not read or write shared regions" "$out" "the service's fault ($t)"
done

# Ranks running different executables (MPMD launch): stopped at join, each naming the other.
fails_clearly "ranks of different builds joined one job" mpirun -n 1 $bin/hello : -n 1 $bin/dsm-check counter
# The first rank to see it aborts the MPI job, so the other may not get to say it too.
mentions "runs a different build of this program" "$out" "the different builds"

# Ranks given different DSM_CHANNELS (through a wrapper): stopped at join, saying so.
line='if [ "$PMI_RANK" = 1 ]; then export DSM_CHANNELS=3; fi; exec '"$bin"'/hello'
fails_clearly "ranks with different DSM_CHANNELS joined one job" mpirun -n 2 sh -c "$line"
mentions "give every rank the same DSM_CHANNELS" "$out" "the channels"

# Ranks given different transports, or different MPI send buffers: stopped at join, saying so.
line='if [ "$PMI_RANK" = 1 ]; then export DSM_TRANSPORT=tcp; fi; exec '"$bin"'/hello'
fails_clearly "ranks with different DSM_TRANSPORT joined one job" env DSM_TRANSPORT=mpi mpirun -n 2 sh -c "$line"
mentions "give every rank the same DSM_TRANSPORT" "$out" "the transports"
line='if [ "$PMI_RANK" = 1 ]; then export DSM_MPI_SEND_BUFFER=8M; fi; exec '"$bin"'/hello'
fails_clearly "ranks with different DSM_MPI_SEND_BUFFER joined one job" env DSM_TRANSPORT=mpi mpirun -n 2 sh -c "$line"
mentions "give every rank the same DSM_MPI_SEND_BUFFER" "$out" "the send buffers"

# Started as if by the launcher of another MPI library (its variables say 2 ranks; this MPI sees a job of
# one): a clear error instead of ranks that each compute alone.
fails_clearly "a rank whose launcher and MPI disagree on the job's size ran" env PMI_SIZE=2 PMI_RANK=0 $bin/hello
expect "built against another MPI library" 1 "$out"

# Built without the feature: a clear error that says how to rebuild. (One rank: the error is the
# program's own `hello:` line, which two ranks' merged error streams could run together.)
fails_clearly "hello built without the mpi feature ran under mpirun" mpirun -n 1 target/debug/hello
expect "built without MPI support: rebuild it with dsm-runtime's \`mpi\` feature" 1 "$out"

echo "mpi tests: $passed passed, 0 failed"
