"""Deltas between states of different sizes (issue 11 §2: WebAssembly ``memory.grow``).

``DeltaSnapshot.create(..., resize=True)`` diffs the pages past the old end against zeros
(and cuts a shrinking state); ``base_size`` records the old length; ``apply`` grows or cuts
a ``bytearray`` base after the usual checks. Without ``resize`` different lengths are still
refused (SPEC §3).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import (
    PAGE_SIZE,
    DeltaSnapshot,
    DirtyPageTracker,
    IncrementalMigrator,
    InvalidStateError,
    StateVerifier,
    digest,
    simple_checksum,
)

AGENT = bytes(range(16))
KEY = bytes(range(32))


def _random(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@st.composite
def resized_pairs(draw: Any) -> tuple[bytes, bytes]:
    """(old, new) of independent lengths: new shares a prefix with old, then changes,
    zeros or new bytes (so pages past the old end are sometimes all zeros)."""
    old_len = draw(st.integers(0, 5 * PAGE_SIZE + 7))
    new_len = draw(st.integers(0, 5 * PAGE_SIZE + 7))
    seed = draw(st.integers(0, 2**32 - 1))
    old = _random(old_len, seed)
    new = bytearray(old[:new_len]) + bytearray(max(0, new_len - old_len))
    rng = np.random.default_rng(seed + 1)
    for _ in range(draw(st.integers(0, 6))):
        if new_len:
            i = int(rng.integers(0, new_len))
            new[i] = int(rng.integers(0, 256))
    return old, bytes(new)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(resized_pairs(), st.sampled_from(["xxh3_128_tree", "xxh3_128", "blake3", "keyed", None]))
def test_resized_delta_round_trips(pair: tuple[bytes, bytes], mode: Optional[str]) -> None:
    old, new = pair
    key = KEY if mode == "keyed" else None
    algorithm = "blake3" if mode == "keyed" else mode
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, digest=algorithm, key=key, resize=True)
    assert (delta.base_size, delta.total_size) == (len(old) if len(old) != len(new) else None, len(new))
    assert delta.checksum == simple_checksum(new)
    if mode == "keyed":
        assert delta.keyed and delta.digest == digest(new, "blake3", key=KEY)
    elif algorithm is not None:
        assert delta.digest == digest(new, algorithm)
    # Exactly the pages where new differs from old padded with zeros (and cut).
    padded = old[: len(new)] + bytes(max(0, len(new) - len(old)))
    expected = [
        i for i in range(-(-len(new) // PAGE_SIZE))
        if new[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] != padded[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    ]
    assert [p.index for p in delta.dirty_pages] == expected
    base = bytearray(old)
    delta.apply(base, key=key)
    assert base == new


def test_grow_past_the_old_end_costs_only_the_written_pages() -> None:
    old = _random(3 * PAGE_SIZE + 100, 1)
    new = bytearray(old) + bytearray(20 * PAGE_SIZE)  # memory.grow: new pages are zeros
    new[10 * PAGE_SIZE + 5] = 9
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, resize=True)
    assert [p.index for p in delta.dirty_pages] == [10]
    base = bytearray(old)
    delta.apply(base)
    assert base == new and "base_size=" in repr(delta)


def test_large_resize_splits_over_threads() -> None:
    """States past the parallel threshold: the chunk straddling the old end is padded."""
    old = _random((17 << 20) + 100, 2)
    new = bytearray(old) + bytearray(16 << 20)
    new[(20 << 20) + 3] = 1
    new[5] ^= 1
    for algorithm in ("xxh3_128_tree", "xxh3_128", None):
        delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=algorithm, resize=True)
        assert [p.index for p in delta.dirty_pages] == [0, (20 << 20) // PAGE_SIZE]
        base = bytearray(old)
        delta.apply(base)
        assert base == new
        shrink = DeltaSnapshot.create(AGENT, new, old, 1, 2, digest=algorithm, resize=True)
        assert [p.index for p in shrink.dirty_pages] == [0]
        shrink.apply(base)
        assert base == old


def test_different_lengths_need_resize() -> None:
    with pytest.raises(InvalidStateError, match="resize=True"):
        DeltaSnapshot.create(AGENT, bytes(10), bytes(11), 0, 1)
    tracker = DirtyPageTracker(AGENT, 10)
    tracker.initialize(bytes(10))
    with pytest.raises(InvalidStateError, match="size mismatch"):
        tracker.create_delta(bytes(11))
    assert tracker.sequence == 1


def test_apply_refusals_leave_the_base_unchanged() -> None:
    old, new = _random(2 * PAGE_SIZE, 3), _random(3 * PAGE_SIZE, 4)
    grow = DeltaSnapshot.create(AGENT, old, new, 0, 1, resize=True)
    shrink = DeltaSnapshot.create(AGENT, new, old, 1, 2, resize=True)
    fixed = np.frombuffer(bytearray(old), dtype=np.uint8)
    with pytest.raises(InvalidStateError, match="cannot be resized"):
        grow.apply(fixed)
    assert fixed.tobytes() == old
    fixed3 = np.frombuffer(bytearray(new), dtype=np.uint8)
    with pytest.raises(InvalidStateError, match="shrinks the state"):
        shrink.apply(fixed3)
    assert fixed3.tobytes() == new
    too_long = bytearray(new) + b"x"
    with pytest.raises(InvalidStateError, match="larger than the delta's base"):
        shrink.apply(too_long)
    assert too_long == new + b"x"
    base = bytearray(old)
    with pytest.raises(InvalidStateError, match="max_size"):
        grow.apply(base, max_size=2 * PAGE_SIZE)
    assert base == old
    held = bytearray(new)
    view = memoryview(held)  # an export pins the size: the cut must fail before any write
    with pytest.raises(InvalidStateError, match="cannot be resized"):
        shrink.apply(held)
    assert held == new
    view.release()
    cut = bytearray(new[: 2 * PAGE_SIZE - 5])
    cut[0] ^= 1  # page 1 is clean: the result depends on the base
    partial = DeltaSnapshot.create(AGENT, new, cut, 1, 2, resize=True)
    assert [p.index for p in partial.dirty_pages] == [0]
    wrong = bytearray(_random(3 * PAGE_SIZE, 5))
    with pytest.raises(InvalidStateError, match="checksum mismatch"):
        partial.apply(wrong)
    assert len(wrong) == 3 * PAGE_SIZE
    right = bytearray(new)
    partial.apply(right)
    assert right == cut


def test_resizing_delta_fields_and_wire() -> None:
    old, new = _random(PAGE_SIZE, 6), _random(2 * PAGE_SIZE, 7)
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, resize=True)
    same = DeltaSnapshot.create(AGENT, old, old, 0, 1)
    assert same.base_size is None and same.total_size == PAGE_SIZE
    assert DeltaSnapshot(AGENT, 0, 1, [], 10, 0, 0, base_size=10).base_size is None  # "same size"
    with pytest.raises(ValueError, match="base_size"):
        DeltaSnapshot(AGENT, 0, 1, [], 10, 0, 0, base_size=-1)
    # Wire format v2 carries base_size: a resizing delta round-trips and applies.
    back = DeltaSnapshot.deserialize(delta.serialize())
    assert back == delta and back.base_size == PAGE_SIZE and back.total_size == 2 * PAGE_SIZE
    grown = bytearray(old)
    back.apply(grown)
    assert grown == new
    assert DeltaSnapshot.deserialize(same.serialize()) == same
    # The validator's size check uses the base size the delta names.
    assert StateVerifier.verify_delta(old, delta, delta.checksum).passed
    assert not StateVerifier.verify_delta(new, delta, delta.checksum).passed


def test_tracker_follows_memory_grow_and_shrink() -> None:
    tracker = DirtyPageTracker(AGENT, 2 * PAGE_SIZE)
    state = bytearray(_random(2 * PAGE_SIZE, 8))
    receiver = bytearray()
    first = tracker.create_delta(state, commit=False)  # against zeros of the same size
    assert first.base_size is None  # against zeros of the same size
    receiver.extend(bytes(2 * PAGE_SIZE))
    first.apply(receiver)
    tracker.acknowledge(first.sequence)
    for size in (5 * PAGE_SIZE + 3, 9 * PAGE_SIZE, 4 * PAGE_SIZE - 1):
        state = bytearray(state[:size]) + bytearray(max(0, size - len(state)))
        state[size // 2] ^= 0xFF
        delta = tracker.create_delta(state, resize=True, commit=False)
        assert delta.base_size == len(receiver) != delta.total_size
        delta.apply(receiver)
        tracker.commit(delta)
        assert receiver == state == tracker.committed_state()
        assert tracker.state_size == size and tracker.page_count == -(-size // PAGE_SIZE)
    tracker.mark_dirty(3)
    assert tracker.is_dirty(3) and not tracker.is_dirty(4)
    migrator = IncrementalMigrator()
    migrator.start_tracking(AGENT, bytes(PAGE_SIZE))
    grown = migrator.create_incremental(AGENT, bytes(3 * PAGE_SIZE), resize=True)
    assert (grown.base_size, grown.total_size, grown.dirty_page_count()) == (PAGE_SIZE, 3 * PAGE_SIZE, 0)
    same = migrator.create_incremental(AGENT, bytes(3 * PAGE_SIZE), resize=True)
    assert same.base_size is None and migrator.get_sequence(AGENT) == 3
