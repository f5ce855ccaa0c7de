"""The final round's hashing of the paused state (``cellmigrate.live.paused``): the page
digests are the same inline (a pre-copy's final round) and on the helper thread ahead of
the sending one (a stop-and-copy, with the tree digest), and the helper stops when asked
and hands its failures to the caller."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import digest
from cellmigrate._tree import LEAF_SIZE
from cellmigrate.live import paused as paused_module
from cellmigrate.live.leaves import page_digests
from cellmigrate.live.paused import PausedScan

REGION = 3 * LEAF_SIZE  # regions as the round asks for them (the round's are 32 MiB)


def _scan_all(scan: PausedScan, n: int) -> None:
    for lo in range(0, n, REGION):
        got = scan.region(lo, min(lo + REGION, n))
        assert got.shape[0] == -(-(min(lo + REGION, n) - lo) // 4096)


@settings(max_examples=25, deadline=None)
@given(size=st.integers(0, 8 * LEAF_SIZE + 5000), tree=st.booleans(), seed=st.integers(0, 99))
def test_digests_and_tree_match_the_whole_state_hashes(size: int, tree: bool, seed: int) -> None:
    state = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    scan = PausedScan(state, 2, tree=tree)
    try:
        _scan_all(scan, size)
    finally:
        scan.close()
    assert np.array_equal(scan.digests, page_digests(state))
    if scan.tree:
        assert scan.tree_digest() == digest(state)


def test_close_stops_the_helper_before_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed round closes the scan: the helper stops after its current leaf (it must
    not go on reading a state the resumed source may change or move)."""
    started = threading.Event()

    def slow_kernel(view: Any, out: Any) -> None:
        started.set()
        time.sleep(0.02)
        out[:] = page_digests(view)

    monkeypatch.setattr(paused_module, "page_kernel", lambda: slow_kernel)
    state = np.zeros(64 * LEAF_SIZE, dtype=np.uint8)
    scan = PausedScan(state, 1, tree=True)
    helper = scan._helper
    assert helper is not None and started.wait(10)
    scan.close()
    assert not helper.is_alive()
    done = scan._done
    assert done < state.nbytes  # 64 leaves at 20 ms each: it stopped long before the end
    time.sleep(0.05)
    assert scan._done == done
    scan.close()  # idempotent


def test_a_helper_failure_is_raised_by_region(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing_kernel(view: Any, out: Any) -> None:
        calls.append(view.nbytes)
        if len(calls) == 2:
            raise MemoryError("no memory for the digests")
        out[:] = page_digests(view)

    monkeypatch.setattr(paused_module, "page_kernel", lambda: failing_kernel)
    state = np.ones(4 * LEAF_SIZE, dtype=np.uint8)
    scan = PausedScan(state, 1, tree=True)
    try:
        assert scan.region(0, LEAF_SIZE).shape == (LEAF_SIZE // 4096, 16)
        with pytest.raises(MemoryError, match="no memory"):
            scan.region(LEAF_SIZE, 4 * LEAF_SIZE)
    finally:
        scan.close()
    assert scan._helper is None
