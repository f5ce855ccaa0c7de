"""Delta size and speed of issue 12's two workloads, with xdelta3 and zstd --patch-from.

Workloads (deterministic, numpy PCG64 seeded):

1. "random 1%": a 1 GiB random state; 1% of its 4 KiB pages each get 64 random bytes at
   a random offset.
2. "heap 3%": a 512 MiB low-entropy heap: 40% zero pages, 30% int64 counter pages, 30%
   float32 array pages; 3% of the pages updated by small increments (counters +1..3,
   floats + 0.001 x N(0, 1), a zero page's counters 0 -> 1..3).

Plus the cost check: 10% and 100% of the pages of a 1 GiB random state replaced with
random bytes ("auto" encodings vs the crate's raw/RLE pages, compress="rle").

For each, in one run: ``DeltaSnapshot.create(..., compress="auto")`` + ``serialize()``
(in process, states in memory), its delta size, and the peers on the same states written
to files: ``xdelta3 -e -B <size> -s OLD NEW OUT`` and ``zstd --patch-from=OLD NEW
--long=31 -o OUT`` (sizes of OUT and wall time of the encode). Peers need
``apt-get install xdelta3 zstd``; a missing peer is reported, not faked.

Run (needs ~8 GiB RAM and a few minutes; it is not part of the default bench run):

    CELLMIGRATE_BENCH_ENCODINGS=1 pytest benches/test_bench_encodings.py -s -p no:cacheprovider
    python benches/test_bench_encodings.py            # same, prints the JSON report

Goals (issue 12): size <= 1.1 x the smaller peer on workload 1 and <= 1.0 x on the heap
workload; create + serialize >= 10 x faster than each peer's encode; 10% and 100% dirty
cost no more than the crate's raw/RLE pages. The report gives min and median of the rounds.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

import cellmigrate
from cellmigrate import DeltaSnapshot

PAGE = 4096
AGENT = bytes(range(16))
ROUNDS = int(os.environ.get("CELLMIGRATE_BENCH_ROUNDS", "3"))
SCALE = float(os.environ.get("CELLMIGRATE_BENCH_SCALE", "1"))  # <1 for a quick look

pytestmark = pytest.mark.skipif(
    os.environ.get("CELLMIGRATE_BENCH_ENCODINGS", "") in ("", "0"),
    reason="set CELLMIGRATE_BENCH_ENCODINGS=1 (GiB states, peers run as processes, minutes)",
)


def random_1pct(size: int, seed: int = 12) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    new = old.copy()
    npages = size // PAGE
    pages = rng.choice(npages, size=npages // 100, replace=False)
    offsets = rng.integers(0, PAGE - 64 + 1, size=len(pages))
    edits = np.frombuffer(rng.bytes(64 * len(pages)), dtype=np.uint8).reshape(-1, 64)
    starts = pages * PAGE + offsets
    new[(starts[:, None] + np.arange(64)).ravel()] = edits.ravel()
    return old, new


def heap_3pct(size: int, seed: int = 13) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    npages = size // PAGE
    kind = rng.choice(3, size=npages, p=[0.4, 0.3, 0.3])  # 0 zero, 1 int64 counters, 2 float32
    old = np.zeros(size, dtype=np.uint8)
    pages = old.reshape(npages, PAGE)
    counters = pages[kind == 1].view("<i8")
    counters[:] = rng.integers(0, 1 << 20, size=counters.shape)
    pages[kind == 1] = counters.view(np.uint8)
    floats = pages[kind == 2].view("<f4")
    floats[:] = rng.standard_normal(size=floats.shape).astype("<f4")
    pages[kind == 2] = floats.view(np.uint8)
    new = old.copy()
    npg = new.reshape(npages, PAGE)
    touched = rng.choice(npages, size=npages * 3 // 100, replace=False)
    for k in (0, 1):
        sel = touched[kind[touched] == k]
        c = npg[sel].view("<i8")
        c += rng.integers(1, 4, size=c.shape)
        npg[sel] = c.view(np.uint8)
    sel = touched[kind[touched] == 2]
    f = npg[sel].view("<f4")
    f += (0.001 * rng.standard_normal(size=f.shape)).astype("<f4")
    npg[sel] = f.view(np.uint8)
    return old, new


def random_replaced(size: int, fraction: float, seed: int = 14) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    new = old.copy()
    npages = size // PAGE
    pages = rng.choice(npages, size=int(npages * fraction), replace=False)
    new.reshape(npages, PAGE)[pages] = np.frombuffer(rng.bytes(len(pages) * PAGE), dtype=np.uint8).reshape(-1, PAGE)
    return old, new


def _times(fn: Callable[[], Any], rounds: int) -> Tuple[List[float], Any]:
    out: List[float] = []
    result = None
    for _ in range(rounds):
        t = time.perf_counter()
        result = fn()
        out.append(time.perf_counter() - t)
    return out, result


def ours(old: np.ndarray, new: np.ndarray, compress: str = "auto") -> Dict[str, Any]:
    def run() -> Tuple[DeltaSnapshot, bytes]:
        d = DeltaSnapshot.create(AGENT, old, new, 0, 1, compress=compress)
        return d, d.serialize()

    times, (delta, wire) = _times(run, ROUNDS)
    back = DeltaSnapshot.deserialize(wire)
    target = bytearray(old.tobytes())
    back.apply(target)
    assert target == new.tobytes(), "the delta does not reproduce the new state"
    return {
        "size": len(wire),
        "min_s": min(times),
        "median_s": statistics.median(times),
        "encodings": delta.encoding_counts(),
        "compression": delta.compression,
    }


def _peer(cmd: List[str], out: Path, rounds: int) -> Optional[Dict[str, Any]]:
    if shutil.which(cmd[0]) is None:
        return None
    times = []
    for _ in range(rounds):
        if out.exists():
            out.unlink()
        t = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - t)
    return {"size": out.stat().st_size, "min_s": min(times), "median_s": statistics.median(times)}


def peers(old: np.ndarray, new: np.ndarray, rounds: int = 1) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(dir=os.environ.get("CELLMIGRATE_BENCH_TMP")) as d:
        o, n, x, z = (Path(d) / name for name in ("old.bin", "new.bin", "out.xd3", "out.zst"))
        o.write_bytes(memoryview(old))
        n.write_bytes(memoryview(new))
        size = old.nbytes
        return {
            "xdelta3": _peer(["xdelta3", "-e", "-f", "-B", str(size), "-s", str(o), str(n), str(x)], x, rounds),
            "zstd": _peer(["zstd", "-q", "-f", f"--patch-from={o}", "--long=31", str(n), "-o", str(z)], z, rounds),
        }


def workload(name: str, make: Callable[[], Tuple[np.ndarray, np.ndarray]]) -> Dict[str, Any]:
    old, new = make()
    row: Dict[str, Any] = {"workload": name, "state_bytes": old.nbytes, "ours": ours(old, new)}
    row["peers"] = peers(old, new)
    sizes = [p["size"] for p in row["peers"].values() if p]
    if sizes:
        row["size_vs_smaller_peer"] = row["ours"]["size"] / min(sizes)
        row["speedup_min_vs_each_peer"] = {
            k: p["min_s"] / row["ours"]["min_s"] for k, p in row["peers"].items() if p
        }
    return row


def cost(fraction: float) -> Dict[str, Any]:
    """create + serialize with ``auto`` against the crate's raw/RLE pages (``rle``), on
    pages rewritten with random bytes (nothing for the new encodings to win). The two
    take turns round by round (a neighbour's load hits both), 2 * ROUNDS + 1 rounds each."""
    old, new = random_replaced(int(SCALE * (1 << 30)), fraction)
    times: Dict[str, List[float]] = {"auto": [], "rle": []}
    for k in range(2 * ROUNDS + 1):
        for mode in ("auto", "rle") if k % 2 == 0 else ("rle", "auto"):
            t = time.perf_counter()
            DeltaSnapshot.create(AGENT, old, new, 0, 1, compress=mode).serialize()
            times[mode].append(time.perf_counter() - t)
    auto, crate = ours(old, new, "auto"), ours(old, new, "rle")  # sizes, encodings, round trip
    for row, mode in ((auto, "auto"), (crate, "rle")):
        row["min_s"], row["median_s"] = min(times[mode]), statistics.median(times[mode])
    return {
        "workload": f"random {fraction:.0%} replaced",
        "auto": auto,
        "crate_rle_raw": crate,
        "time_auto_vs_crate_min": auto["min_s"] / crate["min_s"],
        "time_auto_vs_crate_median": auto["median_s"] / crate["median_s"],
    }


def wire_speed() -> Dict[str, Any]:
    """serialize + deserialize of a ~100 MB delta (25,600 raw pages), in GB/s of delta."""
    old, new = random_replaced(int(SCALE * (256 << 20)), 0.39, seed=15)
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, compress="auto")
    ser, wire = _times(delta.serialize, ROUNDS + 2)
    des, _ = _times(lambda: DeltaSnapshot.deserialize(wire), ROUNDS + 2)
    both = [a + b for a, b in zip(ser, des)]
    return {
        "workload": "serialize + deserialize",
        "delta_bytes": len(wire),
        "serialize_min_s": min(ser),
        "deserialize_min_s": min(des),
        "gbps_min": len(wire) / min(both) / 1e9,
        "gbps_median": len(wire) / statistics.median(both) / 1e9,
    }


def report() -> Dict[str, Any]:
    gib = int(SCALE * (1 << 30))
    rows = [
        workload("random 1% (64 bytes a page)", lambda: random_1pct(gib)),
        workload("heap 3% (small increments)", lambda: heap_3pct(gib // 2)),
        cost(0.10),
        cost(1.00),
        wire_speed(),
    ]
    return {
        "cellmigrate": cellmigrate.__version__,
        "rounds": ROUNDS,
        "xdelta3": subprocess.run(["xdelta3", "-V"], capture_output=True, text=True).stderr.strip()
        if shutil.which("xdelta3") else None,
        "zstd": subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout.strip()
        if shutil.which("zstd") else None,
        "rows": rows,
    }


def test_delta_size_and_speed_against_peers() -> None:
    result = report()
    print(json.dumps(result, indent=2, default=str))
    for row in result["rows"]:
        assert row.get("ours", row.get("auto", {})).get("size", 1) > 0 or "gbps_min" in row


if __name__ == "__main__":
    print(json.dumps(report(), indent=2, default=str))
    sys.exit(0)
