"""pytest-benchmark suite: cellmigrate's kernels side by side with their peers.

Run:  pytest benches/ --benchmark-only                      (4 KiB .. 64 MiB)
      pytest benches/ --benchmark-only --bench-large        (adds 1 GiB; needs ~5 GiB RAM)
      CELLMIGRATE_BENCH_LARGE=1 pytest benches/ --benchmark-only

Every benchmark records GB/s (10**9 bytes of state per second, from the best round) in
``extra_info`` and a row for the summary table printed at the end of the session, where
each row's ratio is against the cellmigrate kernel of its group and size (ratios from
one run are what to compare: the machine may be shared).
"""

from __future__ import annotations

import os
import time
import zlib  # noqa: F401  (peers import it; keeps it warm)
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BASE_SIZES = [4 * KiB, 64 * KiB, 1 * MiB, 64 * MiB]
LARGE_SIZE = 1 * GiB
DIRTY_FRACTION = 0.01


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--bench-large", action="store_true", default=False, help="include the 1 GiB size")


def _large(config: pytest.Config) -> bool:
    return bool(config.getoption("--bench-large")) or os.environ.get("CELLMIGRATE_BENCH_LARGE", "") not in ("", "0")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" in metafunc.fixturenames:
        sizes = BASE_SIZES + ([LARGE_SIZE] if _large(metafunc.config) else [])
        metafunc.parametrize("size", sizes, ids=[_label(s) for s in sizes])


def _label(n: int) -> str:
    for unit, name in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return f"{n}B"


# --- data -----------------------------------------------------------------------------------


class States:
    """Buffers of one size, built once per session and shared by every benchmark.

    ``old`` is random; ``new`` is ``old`` with 1% of its pages changed (at least one);
    ``same`` is an equal copy of ``old`` (for full-length memcmp); ``zeros`` is a
    materialized zero state (written, so it is real memory, not the shared zero page).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        rng = np.random.default_rng(size)
        old = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        self.old = bytes(old)
        npages = -(-size // 4096)
        dirty = rng.choice(npages, max(1, int(npages * DIRTY_FRACTION)), replace=False)
        arr = np.frombuffer(old, dtype=np.uint8)
        for page in dirty:
            arr[page * 4096 : page * 4096 + 64] ^= 0x5A
        self.new = bytes(old)
        del arr, old
        self.dirty = np.sort(dirty)
        self._same: Optional[bytes] = None
        self._zeros: Optional[bytearray] = None
        self._checksum_old: Optional[int] = None

    @property
    def same(self) -> bytes:
        if self._same is None:
            self._same = bytes(bytearray(self.old))
        return self._same

    @property
    def checksum_old(self) -> int:
        """The sender's checksum of ``old`` (computed once, outside any timing)."""
        if self._checksum_old is None:
            from cellmigrate import simple_checksum

            self._checksum_old = simple_checksum(self.old)
        return self._checksum_old

    @property
    def zeros(self) -> bytearray:
        if self._zeros is None:
            self._zeros = bytearray(self.size)
            np.frombuffer(self._zeros, dtype=np.uint8).fill(0)
        return self._zeros

    def np(self, name: str) -> "np.ndarray[Any, np.dtype[np.uint8]]":
        return np.frombuffer(getattr(self, name), dtype=np.uint8)


_states: Dict[int, States] = {}


@pytest.fixture
def states(size: int) -> States:
    if size not in _states:
        _states.clear()  # keep one size in memory at a time
        _states[size] = States(size)
    return _states[size]


# --- measuring --------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    size: int
    name: str
    ours: bool
    gbps: float


ROWS: List[Row] = []


#: Seconds of measured rounds a benchmark may take (after one warm-up call).
BUDGET_SECONDS = 2.0


def rounds_for(size: int) -> int:
    """Enough rounds for a stable best time: about 0.3 GB of work, and never fewer than
    10, because on a shared VM one round in three can be slowed by a neighbour."""
    return int(max(10, min(2000, (300 * MiB) // size)))


@pytest.fixture
def measure(benchmark: Any, request: pytest.FixtureRequest) -> Callable[..., float]:
    """``measure(group, name, fn, nbytes, ours=False)``: benchmark ``fn`` and record GB/s."""

    def run(group: str, name: str, fn: Callable[[], Any], nbytes: int, *, ours: bool = False) -> float:
        benchmark.group = f"{group} {_label(nbytes)}"
        benchmark.name = name
        started = time.perf_counter()
        fn()  # the warm-up call, timed to fit the rounds into the budget
        once = max(time.perf_counter() - started, 1e-9)
        rounds = max(3, min(rounds_for(nbytes), int(BUDGET_SECONDS / once)))
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)
        best = benchmark.stats.stats.min
        gbps = nbytes / best / 1e9 if best > 0 else float("inf")
        benchmark.extra_info["GB/s"] = round(gbps, 3)
        benchmark.extra_info["bytes"] = nbytes
        ROWS.append(Row(group, nbytes, name, ours, gbps))
        return gbps

    return run


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not ROWS:
        return
    tr = terminalreporter
    tr.section("cellmigrate throughput (GB/s, best round; ratio vs the cellmigrate row marked *)")
    by_group: Dict[Tuple[str, int], List[Row]] = defaultdict(list)
    for row in ROWS:
        by_group[(row.group, row.size)].append(row)
    for (group, size), rows in sorted(by_group.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        anchor = next((r for r in rows if r.ours), rows[0])
        tr.write_line(f"{group} @ {_label(size)}")
        for r in sorted(rows, key=lambda r: -r.gbps):
            mark = "*" if r is anchor else " "
            ratio = r.gbps / anchor.gbps if anchor.gbps else float("nan")
            tr.write_line(f"  {mark} {r.name:<44} {r.gbps:9.2f} GB/s  {ratio:6.2f}x")
