#!/usr/bin/env bash
# Issue 12's goal run, as its closing notes report it: a wheel built from a clean clone,
# installed in a fresh venv, then every bench the goals need, in one session.
#
#   bash benches/issue12_goals.sh [REPO] [WORKDIR]
#
# REPO: what to clone (default: this checkout's repository; commits only, not the work
# tree). WORKDIR (default /tmp/cellmigrate-goals) is emptied first; its *.json and *.log
# files hold the results. Needs about 8 GiB of free RAM and 10-15 minutes on 2 cores;
# run it on a quiet machine, since the rows are ratios of peers measured in the same run.
# The peers xdelta3 and zstd come from Debian (installed here when running as root).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
repo=${1:-$here}
work=${2:-/tmp/cellmigrate-goals}

rm -rf "$work"
mkdir -p "$work"
git clone -q "$repo" "$work/clone"
cd "$work/clone"
git log -1 --format='commit %H %cd' | tee "$work/commit.log"

python3 -m venv "$work/venv"
. "$work/venv/bin/activate"
python -m pip install -q --upgrade pip
pip wheel -q --no-deps -w "$work/dist" .
pip install -q "$(ls "$work"/dist/cellmigrate-*.whl)[test]"

if ! command -v xdelta3 >/dev/null || ! command -v zstd >/dev/null; then
    if [ "$(id -u)" = 0 ]; then
        apt-get install -y -q xdelta3 zstd >/dev/null
    else
        echo "xdelta3/zstd missing: the size rows will report the peers as not measured" >&2
    fi
fi

# The suite must import the wheel, not the clone's sources (src/ layout: it cannot).
python -c "import cellmigrate; from cellmigrate import _kernels; print(cellmigrate.__file__, _kernels._dispatch())" | tee -a "$work/commit.log"
uptime | tee -a "$work/commit.log"

for run in 1 2; do
    pytest benches/test_bench_delta.py --benchmark-only --bench-large -k "1GiB and not peak" \
        -p no:cacheprovider -q --benchmark-json="$work/delta$run.json" >"$work/delta$run.log" 2>&1
    python benches/goals.py "$work/delta$run.json" | tee "$work/goals$run.md"
done

CELLMIGRATE_BENCH_ENCODINGS=1 CELLMIGRATE_BENCH_ROUNDS=5 \
    pytest benches/test_bench_encodings.py -s -p no:cacheprovider -q 2>&1 | tee "$work/encodings.log"

for run in 1 2; do
    CELLMIGRATE_BENCH_LARGE=1 pytest benches/test_bench_live.py -k "(full_state or sendfile) and 1GiB" \
        --benchmark-only -p no:cacheprovider -q 2>&1 | tee "$work/live$run.log"
    CELLMIGRATE_BENCH_LARGE=1 pytest benches/test_bench_live.py -k "precopy and 1GiB" -s \
        -p no:cacheprovider -q 2>&1 | tee "$work/precopy$run.log"
done

CELLMIGRATE_BENCH_LARGE=1 pytest benches/test_bench_contention.py --benchmark-only -s \
    -p no:cacheprovider -q 2>&1 | tee "$work/contention.log"
uptime | tee -a "$work/commit.log"
