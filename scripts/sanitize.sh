#!/usr/bin/env bash
# Build cellmigrate's kernels with AddressSanitizer + UndefinedBehaviorSanitizer and run
# the test suite against that build. Zero sanitizer reports is the pass condition: any
# report aborts the process, which fails the test run.
#
# Usage:  scripts/sanitize.sh [pytest args...]        e.g. scripts/sanitize.sh -x -q
#         scripts/sanitize.sh -q tests/test_kernels.py  (a subset)
#         PYTHON=/path/to/python scripts/sanitize.sh   (default: python3 on PATH)
#
# The Python used must already have the runtime and test dependencies (the dev venv, or
# `pip install ".[test]"`). The build happens in a throwaway copy of the tree under
# /tmp, so the working tree and its installed extension are left alone; PYTHONPATH puts
# the sanitized copy first. Needs gcc (for libasan/libubsan) on Linux.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/cellmigrate-sanitize.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# Tracked and new (not ignored) files: exactly the sources a build would see.
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$WORK")
cd "$WORK"

echo "== building the kernels with -fsanitize=address,undefined (Cython checks on, -O0 -g)"
CC=${CC:-gcc} CELLMIGRATE_SANITIZE=address,undefined CELLMIGRATE_CYTHON_DEBUG=1 \
    "$PY" setup.py -q build_ext --inplace >build.log 2>&1 || { cat build.log; exit 1; }

# The interpreter is not instrumented, so the sanitizer runtimes must be loaded first.
LIBASAN=$(${CC:-gcc} -print-file-name=libasan.so)
LIBUBSAN=$(${CC:-gcc} -print-file-name=libubsan.so)
export LD_PRELOAD="$LIBASAN $LIBUBSAN"
# CPython keeps objects alive until exit on purpose: leak reports would be noise.
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1:detect_stack_use_after_return=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# Route Python allocations (the bytes objects the kernels write into) through malloc,
# so ASan's redzones surround them.
export PYTHONMALLOC=malloc
export PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<PYEOF
import cellmigrate._kernels as k
assert k.__file__.startswith("$WORK"), k.__file__
maps = open("/proc/self/maps").read()
assert "libasan" in maps and "libubsan" in maps, "sanitizer runtimes are not loaded"
print("== sanitized kernels:", k.__file__, "paths:", k._dispatch_paths())
PYEOF

echo "== running the test suite under the sanitizers"
# No path given: pytest's configured testpaths (tests/) run, as in the README command.
"$PY" -m pytest -p no:cacheprovider "$@"
echo "== sanitizers: no reports"
