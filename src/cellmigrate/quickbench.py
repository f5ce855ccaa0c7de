"""``cellmigrate bench``: a quick GB/s table of cellmigrate's kernels next to their peers.

It is a smoke-level measurement meant to take a few seconds: every row runs one warm-up
call, then repeats the call until about a quarter of a second has passed and keeps the
best time (the least disturbed by other processes). GB/s is 10**9 bytes of *state* per
second. For careful numbers use the pytest-benchmark suite in ``benches/``.

Peers, each doing the closest equivalent job on the same bytes:

* one pass over the state (checksums): ``zlib.crc32``, ``zlib.adler32``, ``xxhash``
  (XXH3-128, which ``cellmigrate.digest`` uses), ``blake3`` (one thread and all threads)
  and the numpy reference of the weighted sum;
* whole-state comparison: ``bytes ==`` (memcmp) and ``numpy.array_equal``;
* dirty-page scan: numpy, comparing the states reshaped into 4 KiB rows;
* page compression, on a 4 MiB slice of mixed content: RLE vs ``lz4.block`` vs zstd;
* the delta itself (create and apply), when the delta module is available.
"""

from __future__ import annotations

import os
import platform
import time
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from ._jsontext import json_text
from ._stdout import print_out
from .statefile import format_size

__all__ = ["BenchRow", "measure", "make_states", "run_bench", "collect_rows"]

#: Minimum total time spent on one row (seconds) and the cap on repetitions.
MIN_TIME = 0.25
MAX_REPS = 200


@dataclass
class BenchRow:
    """One line of the table: what was measured, by whom, and how fast."""

    operation: str
    implementation: str
    ours: bool
    nbytes: int
    seconds: float

    @property
    def gbps(self) -> float:
        """Throughput in GB/s (10**9 bytes per second) of state processed."""
        return self.nbytes / self.seconds / 1e9 if self.seconds > 0 else float("inf")


def measure(fn: Callable[[], Any], *, min_time: float = MIN_TIME, max_reps: int = MAX_REPS) -> float:
    """Best wall time of ``fn()`` over repetitions filling about ``min_time`` seconds."""
    fn()  # warm-up: page faults, lazy imports, thread pools
    best = float("inf")
    spent = 0.0
    reps = 0
    while reps < max_reps and (spent < min_time or reps < 3):
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        best = min(best, dt)
        spent += dt
        reps += 1
    return best


def make_states(size: int, *, dirty_fraction: float = 0.03, seed: int = 7) -> "tuple[bytearray, bytearray]":
    """A pair (old, new) of ``size`` bytes: mixed content, ``dirty_fraction`` of pages changed.

    The content is half zero pages, a quarter random and a quarter low-entropy text-like
    bytes, which is roughly what a WebAssembly linear memory looks like to a compressor.
    """
    rng = np.random.default_rng(seed)
    old = np.zeros(size, dtype=np.uint8)
    npages = (size + 4095) // 4096
    kinds = rng.integers(0, 4, size=npages)
    for kind, value in ((2, None), (3, 16)):
        for i in np.flatnonzero(kinds == kind):
            start, end = int(i) * 4096, min(int(i) * 4096 + 4096, size)
            if value is None:
                old[start:end] = rng.integers(0, 256, size=end - start, dtype=np.uint8)
            else:
                old[start:end] = rng.integers(97, 97 + value, size=end - start, dtype=np.uint8)
    new = old.copy()
    ndirty = int(npages * dirty_fraction)
    if ndirty:
        for i in rng.choice(npages, size=ndirty, replace=False):
            start = int(i) * 4096
            end = min(start + 512, size)
            new[start:end] ^= np.uint8(0x5A)
    return bytearray(old.tobytes()), bytearray(new.tobytes())


def collect_rows(size: int, *, min_time: float = MIN_TIME, progress: Optional[Callable[[str], None]] = None) -> List[BenchRow]:
    """Measure every row on states of ``size`` bytes and return them in table order."""
    import blake3
    import lz4.block  # type: ignore[import-untyped,unused-ignore]  # lz4 ships no type information
    import xxhash
    import zstandard

    from . import _reference
    from .checksum import simple_checksum
    from .compare import dirty_pages, first_difference
    from .compression import simple_compress

    old, new = make_states(size)
    same = bytearray(old)  # equal to old: comparisons must scan everything
    old_b, same_b = bytes(old), bytes(same)
    old_np, new_np, same_np = (np.frombuffer(x, dtype=np.uint8) for x in (old, new, same))
    rows: List[BenchRow] = []

    def run(operation: str, implementation: str, ours: bool, fn: Callable[[], Any], nbytes: int = size) -> None:
        if progress is not None:
            progress(f"{operation}: {implementation}")
        rows.append(BenchRow(operation, implementation, ours, nbytes, measure(fn, min_time=min_time)))

    run("checksum (1 pass)", "cellmigrate.simple_checksum", True, lambda: simple_checksum(old))
    run("checksum (1 pass)", "numpy reference (weighted sum)", False, lambda: _reference.checksum(memoryview(old)))
    run("checksum (1 pass)", "zlib.crc32", False, lambda: zlib.crc32(old))
    run("checksum (1 pass)", "zlib.adler32", False, lambda: zlib.adler32(old))
    run("checksum (1 pass)", "xxhash.xxh3_128 (cellmigrate.digest xxh3_128)", False, lambda: xxhash.xxh3_128_digest(old))
    run("checksum (1 pass)", "blake3, 1 thread", False, lambda: blake3.blake3(old).digest())
    run("checksum (1 pass)", f"blake3, {os.cpu_count()} threads", False,
        lambda: blake3.blake3(old, max_threads=blake3.blake3.AUTO).digest())

    run("compare (equal states)", "cellmigrate.first_difference", True, lambda: first_difference(old, same))
    run("compare (equal states)", "bytes == (memcmp)", False, lambda: old_b == same_b)
    run("compare (equal states)", "numpy.array_equal", False, lambda: np.array_equal(old_np, same_np))

    full = size - size % 4096

    def numpy_dirty() -> Any:
        # The same work as dirty_pages: whole pages reshaped, and the short last page.
        a = old_np[:full].reshape(-1, 4096)
        b = new_np[:full].reshape(-1, 4096)
        found = np.flatnonzero((a != b).any(axis=1))
        if full < size and not np.array_equal(old_np[full:], new_np[full:]):
            found = np.append(found, full // 4096)
        return found

    run("dirty pages (3% dirty)", "cellmigrate.dirty_pages", True, lambda: dirty_pages(old, new))
    run("dirty pages (3% dirty)", "numpy reshape + any", False, numpy_dirty)

    sample = bytes(old[: min(size, 4 << 20)])
    zc = zstandard.ZstdCompressor(level=3)
    compress = f"compress ({format_size(len(sample))} mixed)"
    run(compress, "cellmigrate.simple_compress (RLE)", True, lambda: simple_compress(sample), len(sample))
    run(compress, "lz4.block", False, lambda: lz4.block.compress(sample, store_size=True), len(sample))
    run(compress, "zstandard level 3", False, lambda: zc.compress(sample), len(sample))

    try:
        from .delta import DeltaSnapshot
    except ImportError:  # the delta layer is not installed in this build
        return rows
    agent = bytes(16)
    run("delta (3% dirty)", "DeltaSnapshot.create + serialize", True,
        lambda: DeltaSnapshot.create(agent, old, new, 1, 2).serialize())
    delta = DeltaSnapshot.create(agent, old, new, 1, 2)
    target = bytearray(old)

    def apply_once() -> None:
        # Each run must start from the true base (after one apply the target holds `new`,
        # whose checksum no longer fits the delta), so reset it first and subtract the
        # reset's own time below.
        target[:] = old
        delta.apply(target)

    restore_time = measure(lambda: target.__setitem__(slice(None), old), min_time=min_time)
    apply_time = max(measure(apply_once, min_time=min_time) - restore_time, 1e-9)
    if progress is not None:
        progress("delta (3% dirty): DeltaSnapshot.apply")
    rows.append(BenchRow("delta (3% dirty)", "DeltaSnapshot.apply (verified)", True, size, apply_time))
    return rows


def format_table(rows: List[BenchRow], size: int) -> str:
    """The table as text, grouped by operation, ours marked with '*'."""
    from . import IMPLEMENTATION
    from .statefile import format_size

    lines = [
        f"cellmigrate bench: {format_size(size)} state in memory, {os.cpu_count()} CPUs, "
        f"{platform.machine()}, Python {platform.python_version()}, kernels: {IMPLEMENTATION}",
        "best of repeated runs; GB/s = 10^9 bytes of state per second (higher is better); * = cellmigrate",
        "",
        f"{'operation':<24} {'implementation':<40} {'GB/s':>8}",
        f"{'-' * 24} {'-' * 40} {'-' * 8}",
    ]
    last = None
    for row in rows:
        op = row.operation if row.operation != last else ""
        last = row.operation
        name = ("* " if row.ours else "  ") + row.implementation
        lines.append(f"{op:<24} {name:<40} {row.gbps:>8.2f}")
    return "\n".join(lines)


def run_bench(size: int = 64 << 20, *, as_json: bool = False, quiet: bool = False, min_time: float = MIN_TIME) -> int:
    """Entry point of ``cellmigrate bench``: measure, print, return the exit code."""
    import sys

    if size < 4096:
        print(f"cellmigrate bench: error: --size must be at least 4096 bytes, got {size}", file=sys.stderr)
        return 2

    def note(text: str) -> None:
        if not quiet and not as_json and sys.stderr.isatty():
            print(f"\r\033[K  measuring {text} ...", end="", file=sys.stderr, flush=True)

    rows = collect_rows(size, min_time=min_time, progress=note)
    if not quiet and not as_json and sys.stderr.isatty():
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if as_json:
        print_out(json_text([{**asdict(r), "gbps": r.gbps} for r in rows]))
    elif not quiet:
        print_out(format_table(rows, size))
    return 0
