"""The whole-state passes while another Python thread is busy (an agent running in Python
during a pre-copy round), against the same passes idle and against peers.

A kernel call that drops the GIL must take it back when it returns; with another thread
running Python that waits for the interpreter's switch interval (5 ms). cellmigrate's
passes run their chunks on threads of their own inside one GIL-free call, so a pass waits
once. The peers show the two ends: one call of the xxhash package over the whole state
(one wait: the best a Python API can do), and one xxhash call per 1 MiB leaf (one wait a
leaf: what a pass made of a call per chunk pays).

Each group's ratio is against its idle row (*): the busy rows show what the busy thread
costs. The busy thread also takes one of the cores, so even a pass that never waits
runs at about its one-thread speed.

Run:  pytest benches/test_bench_contention.py --benchmark-only -s [--bench-large]
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Iterator

import numpy as np
import pytest
import xxhash

from cellmigrate import DeltaSnapshot, PageFingerprints, digest

from conftest import GiB, MiB, _large

AGENT = bytes(16)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "csize" in metafunc.fixturenames:
        sizes = [256 * MiB] + ([1 * GiB] if _large(metafunc.config) else [])
        metafunc.parametrize("csize", sizes, ids=[f"{s // MiB}MiB" for s in sizes], scope="module")


class Pair:
    """A random state and a copy with 1% of its pages given 64 new bytes."""

    def __init__(self, size: int) -> None:
        rng = np.random.default_rng(size)
        self.old = rng.integers(0, 256, size, dtype=np.uint8)
        self.new = self.old.copy()
        pages = rng.choice(size // 4096, size // 4096 // 100, replace=False)
        rows = self.new.reshape(-1, 4096)
        rows[pages, :64] = rng.integers(0, 256, (len(pages), 64), dtype=np.uint8)
        self.table = PageFingerprints.of(self.old)
        self.turn = 0
        # apply alternates these on one working copy, so every call has its delta's base.
        self.deltas = [DeltaSnapshot.create(AGENT, self.old, self.new, 0, 1),
                       DeltaSnapshot.create(AGENT, self.new, self.old, 1, 2)]
        self.work = self.old.copy()
        self.applied = 0

    def apply(self) -> None:
        self.deltas[self.applied % 2].apply(self.work)
        self.applied += 1

    def fingerprinted(self) -> Any:
        # Alternate old -> new and new -> old on one advancing table, as pre-copy rounds use it.
        self.turn ^= 1
        base, state = (self.old, self.new) if self.turn else (self.new, self.old)
        return DeltaSnapshot.create(AGENT, base, state, 0, 1, fingerprints=self.table)


@pytest.fixture(scope="module")
def pair(csize: int) -> Pair:
    return Pair(csize)


class Busy:
    """A thread running Python (a counting loop) until stopped."""

    def __init__(self) -> None:
        self.stop = False
        self.count = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            self.count += 1

    def close(self) -> None:
        self.stop = True
        self.thread.join(10)


@pytest.fixture(params=["idle", "busy Python thread"])
def mode(request: pytest.FixtureRequest) -> Iterator[str]:
    busy = Busy() if request.param != "idle" else None
    try:
        yield request.param
    finally:
        if busy is not None:
            busy.close()
            assert busy.count > 0  # it really ran


def _leaf_by_leaf(state: "np.ndarray[Any, Any]") -> bytes:
    view = memoryview(state)
    return b"".join(xxhash.xxh3_128_digest(view[a : a + MiB]) for a in range(0, len(view), MiB))


OPS: Dict[str, Callable[[Pair], Callable[[], Any]]] = {
    "DeltaSnapshot.create (default digest)": lambda p: lambda: DeltaSnapshot.create(AGENT, p.old, p.new, 0, 1),
    "DeltaSnapshot.create given PageFingerprints": lambda p: p.fingerprinted,
    "DeltaSnapshot.apply (verified)": lambda p: p.apply,
    "digest (xxh3_128_tree)": lambda p: lambda: digest(p.new),
    "PageFingerprints.of": lambda p: lambda: PageFingerprints.of(p.new),
    "peer: xxhash.xxh3_128 of the state, one call": lambda p: lambda: xxhash.xxh3_128_digest(p.new),
    "peer: xxhash.xxh3_128 a call per 1 MiB leaf": lambda p: lambda: _leaf_by_leaf(p.new),
}


@pytest.mark.parametrize("op", list(OPS))
def test_contention(pair: Pair, measure: Any, op: str, mode: str, csize: int) -> None:
    fn = OPS[op](pair)
    measure(f"busy Python thread: {op}", mode, fn, csize, ours=mode == "idle")
