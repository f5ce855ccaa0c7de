"""Freed page arenas are kept for the next create (fresh memory costs a VM a host fault a
4 KiB page); what they held never shows through, and the pool stays within its limit."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Iterator

import numpy as np
import pytest

from cellmigrate import DeltaSnapshot, _kernels

PAGE = 4096
AGENT = bytes(16)


@pytest.fixture
def pool() -> Iterator[None]:
    _, limit = _kernels.arena_pool()
    yield
    _kernels.arena_pool(limit)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="arenas are mmap'd (and kept) on Linux only")
def test_kept_arenas_are_reused_and_bounded(pool: None) -> None:
    rng = np.random.default_rng(4)
    old = rng.integers(0, 256, 8 << 20, dtype=np.uint8)
    new = rng.integers(0, 256, 8 << 20, dtype=np.uint8)  # every page dirty: 8 MiB of copies
    _kernels.arena_pool(0)
    _kernels.arena_pool(64 << 20)
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="none")
    assert _kernels.arena_pool()[0] == 0  # in use, not kept
    del delta
    kept, limit = _kernels.arena_pool()
    assert limit == 64 << 20 and 8 << 20 <= kept <= limit
    DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="none")  # takes the kept arena, gives it back
    assert _kernels.arena_pool()[0] == kept
    assert _kernels.arena_pool(1 << 20) == (0, 1 << 20)  # a lower limit frees what no longer fits
    assert _kernels.arena_pool(0) == (0, 0)
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError):
            _kernels.arena_pool(bad)
    assert _kernels.arena_pool() == (0, 0)  # a refused limit changes nothing


def test_reused_arenas_never_show_earlier_bytes(pool: None) -> None:
    """A state with a short last page, diffed after arenas full of other bytes were kept:
    the same delta as with nothing kept, and the copy's slot past the page is zeros."""
    rng = np.random.default_rng(8)
    size = 3 * PAGE + 100
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    new[-1] ^= 1
    new[PAGE] ^= 1
    _kernels.arena_pool(0)
    want = DeltaSnapshot.create(AGENT, old, new, 1, 2)
    _kernels.arena_pool(64 << 20)
    for _ in range(3):  # fill the pool with arenas of 0xFF pages
        full = np.full(size, 0xFF, dtype=np.uint8)
        DeltaSnapshot.create(AGENT, np.zeros(size, dtype=np.uint8), full, 1, 2, compress="none")
    for fingerprinted in (False, True):
        arena = _kernels.PageArena(PAGE, 4)
        table, read = (np.array([0] * 4, dtype=np.uint64), np.empty(4, dtype=np.uint64)) if fingerprinted else (None, None)
        _kernels.scan_leaves(old, new, 0, size, PAGE, arena, None, False, table, read)
        held = bytes(memoryview(arena))
        last = arena.indices.tolist().index(3)
        assert held[last * PAGE + 100 : (last + 1) * PAGE] == bytes(PAGE - 100)
    got = DeltaSnapshot.create(AGENT, old, new, 1, 2)
    got.timestamp = want.timestamp
    got._seal(None)
    assert got.serialize() == want.serialize()


THREADED = """
import threading, numpy as np
from cellmigrate import DeltaSnapshot, _kernels
_kernels.arena_pool(32 << 20)
errors = []
def work(seed):
    rng = np.random.default_rng(seed)
    for _ in range(12):
        old = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
        new = old.copy()
        pages = rng.choice(len(old) // 4096, int(rng.integers(1, 700)), replace=False)
        new.reshape(-1, 4096)[pages, :64] ^= 0x33
        d = DeltaSnapshot.create(bytes(16), old, new, 1, 2)
        b = bytearray(old.tobytes())
        d.apply(b)
        if b != new.tobytes():
            errors.append(seed)
threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
assert not errors, errors
assert _kernels.arena_pool()[0] <= 32 << 20
print("ok")
"""


def test_threads_share_the_pool_safely() -> None:
    """Four threads creating and dropping deltas at once (arenas taken and kept under the
    pool's lock): every delta applies; run in a child with a timeout, so a deadlock fails."""
    proc = subprocess.run([sys.executable, "-c", THREADED], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_pool_limit_from_the_environment() -> None:
    code = "from cellmigrate import _kernels; print(_kernels.arena_pool()[1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CELLMIGRATE_ARENA_POOL_MIB="3"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(3 << 20)
    bad = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, CELLMIGRATE_ARENA_POOL_MIB="lots"))
    assert bad.returncode != 0 and "CELLMIGRATE_ARENA_POOL_MIB" in bad.stderr

