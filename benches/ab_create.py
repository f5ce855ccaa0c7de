"""Time DeltaSnapshot.create (+ serialize) on a 1 GiB random state with a fraction of its
4 KiB pages rewritten (whole pages of fresh random bytes) or touched (64 random bytes at a
random offset). Prints min and median ms of REPS runs for each row.

    PYTHONPATH=<tree>/src python benches/ab_create.py [REPS]

An A/B of two builds (say a worktree at an older commit, built in place, and this one),
run alternately on a quiet machine: not a pytest-benchmark bench, since the two builds
cannot be imported in one process. Needs about 4 GiB of free memory.
"""
import statistics
import sys
import time
import uuid

import numpy as np

import cellmigrate
from cellmigrate import DeltaSnapshot

REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
N = 1 << 30
PAGE = 4096
rng = np.random.default_rng(7)
old = rng.integers(0, 256, N, dtype=np.uint8)
pages = N // PAGE
rows = {}
for name, frac, whole in (("10% rewritten", 0.10, True), ("1% touched, 64 B", 0.01, False)):
    new = old.copy()
    idx = rng.choice(pages, int(pages * frac), replace=False)
    if whole:
        new.reshape(pages, PAGE)[idx] = rng.integers(0, 256, (len(idx), PAGE), dtype=np.uint8)
    else:
        off = rng.integers(0, PAGE - 64, len(idx))
        for i, o in zip(idx, off):
            new[i * PAGE + o : i * PAGE + o + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
    rows[name] = new
aid = uuid.UUID(int=1)
print(cellmigrate.__file__)
for name, new in rows.items():
    for digest in ("xxh3_128_tree", None):
        times, size = [], 0
        for _ in range(REPS):
            t = time.perf_counter()
            d = DeltaSnapshot.create(aid, old, new, 0, 1, digest=digest)
            size = len(d.serialize())
            times.append((time.perf_counter() - t) * 1e3)
        print(f"{name:18} digest={str(digest):14} min {min(times):7.1f} ms  median {statistics.median(times):7.1f} ms  "
              f"{size} bytes")
