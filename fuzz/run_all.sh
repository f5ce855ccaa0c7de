#!/usr/bin/env bash
# Run every atheris harness in turn (one process at a time, lowest CPU priority), each
# bounded by a run count and a wall-clock limit, and print the executions each one did.
#
#   fuzz/run_all.sh [RUNS_PER_HARNESS] [SECONDS_PER_HARNESS]     (defaults: 300000, 1200)
#
# Environment: PYTHON (default: python), FUZZ_WORKDIR (default: fuzz/corpus, git-ignored)
# holding <harness>/ corpora, logs/ and artifacts/ (crash-*, timeout-*, oom-* inputs).
# Exit status: non-zero if any harness found a failure (its input is in artifacts/).
set -u
cd "$(dirname "$0")/.."
RUNS="${1:-300000}"
SECONDS_EACH="${2:-1200}"
PY="${PYTHON:-python}"
WORK="${FUZZ_WORKDIR:-fuzz/corpus}"
mkdir -p "$WORK/logs" "$WORK/artifacts"
status=0
total=0
for harness in deserialize apply simple_decompress adaptive_decompress page_decode live_frames; do
    case "$harness" in
        deserialize|live_frames) max_len=20000 ;;
        *) max_len=16384 ;;
    esac
    log="$WORK/logs/$harness.log"
    nice -n 19 "$PY" "fuzz/fuzz_$harness.py" "$WORK/$harness" \
        -runs="$RUNS" -max_total_time="$SECONDS_EACH" -max_len="$max_len" \
        -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$WORK/artifacts/$harness-" >"$log" 2>&1
    rc=$?
    # libFuzzer prints "Done N runs in S second(s)" when it stops without a finding;
    # with a finding, the last "#N" status line gives the runs so far.
    runs=$(grep -oE 'Done [0-9]+ runs' "$log" | grep -oE '[0-9]+' | tail -1)
    if [ -z "$runs" ]; then
        runs=$(grep -oE '^#[0-9]+' "$log" | tr -d '#' | tail -1)
        runs="${runs:-0}"
    fi
    total=$((total + runs))
    echo "$harness: rc=$rc runs=$runs log=$log"
    if [ "$rc" -ne 0 ]; then
        status=1
        grep -E -A30 'Uncaught Python exception|ERROR: libFuzzer|AddressSanitizer' "$log" | head -60
    fi
done
echo "total executions: $total"
exit $status
