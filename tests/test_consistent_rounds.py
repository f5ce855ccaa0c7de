"""Rounds made while a writer thread changes the state (issue 11 §1).

A delta describes exactly the state the sender read: each dirty page is copied once when
the scan finds it and the checksum/digest cover "base + the pages as copied". So a delta
made during writes applies cleanly on its own base, the tracker advances to what it sent
(and, with ``commit=False``, only once that is acknowledged), and after the writer pauses
the next round makes the receiver equal to the source byte for byte.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Iterator, List, Optional

import numpy as np
import pytest

from cellmigrate import (
    PAGE_SIZE,
    DeltaSnapshot,
    DirtyPageTracker,
    IncrementalMigrator,
    InvalidStateError,
    PageFingerprints,
    digest,
    simple_checksum,
)

AGENT = bytes(range(16))
SIZE = 64 << 20  # big enough that the passes split over threads and release the GIL
ROUNDS_RACED = 4  # rounds made while a write landed that each delta must survive
ROUNDS_TRIED = 40  # at most this many creates to get them


class Writer:
    """A thread rewriting 64 random bytes of random pages of ``state`` until stopped.

    ``pause()`` returns once the thread has stopped writing (no write is in flight), and
    ``writes`` counts the writes so far.
    """

    def __init__(self, state: "np.ndarray[Any, np.dtype[np.uint8]]", seed: int) -> None:
        self.state = state
        self.writes = 0
        self._rng = np.random.default_rng(seed)
        self._run = threading.Event()
        self._idle = threading.Event()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        npages = self.state.size // PAGE_SIZE
        while not self._stop:
            if not self._run.is_set():
                self._idle.set()
                self._run.wait(0.05)
                continue
            self._idle.clear()
            # Batches keep the loop cheap; each write is a separate store into the live state.
            pages = self._rng.integers(0, npages, 64)
            offsets = self._rng.integers(0, PAGE_SIZE - 64, 64)
            data = self._rng.integers(0, 256, (64, 64), dtype=np.uint8)
            for page, off, row in zip(pages, offsets, data):
                start = int(page) * PAGE_SIZE + int(off)
                self.state[start : start + 64] = row
            self.writes += 64

    def start(self) -> None:
        """Start the thread and return once it has written: a round begun right after
        ``start()`` races a writer that is really running, not one still being scheduled."""
        self._run.set()
        self._thread.start()
        self.wait_for_writes(self.writes)

    def wait_for_writes(self, seen: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.writes <= seen:
            assert time.monotonic() < deadline, "the writer made no write"
            time.sleep(0.001)

    def pause(self) -> None:
        self._idle.clear()
        self._run.clear()
        assert self._idle.wait(10), "writer did not pause"

    def resume(self) -> None:
        self._run.set()

    def stop(self) -> None:
        self._stop = True
        self._run.set()
        self._thread.join(10)


@pytest.fixture
def live_state() -> Iterator["np.ndarray[Any, np.dtype[np.uint8]]"]:
    yield np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8)


@pytest.fixture
def writer(live_state: "np.ndarray[Any, np.dtype[np.uint8]]") -> Iterator[Writer]:
    w = Writer(live_state, seed=11)
    yield w
    w.stop()


@pytest.mark.parametrize("algorithm", ["xxh3_128_tree", "xxh3_128", "blake3", None])
def test_create_during_writes_applies_on_its_base(
    live_state: "np.ndarray[Any, np.dtype[np.uint8]]", writer: Writer, algorithm: Optional[str]
) -> None:
    """Every delta made while the state is written passes apply's checks on its base, and
    its clean pages are the base's: it describes one state, as read."""
    base = live_state.tobytes()
    writer.start()
    raced = 0
    for round_ in range(ROUNDS_TRIED):
        before = writer.writes
        delta = DeltaSnapshot.create(AGENT, base, live_state, round_, round_ + 1, digest=algorithm)
        # A create can finish between two of the writer's batches (a fast digest on a busy
        # machine): such a round still has to apply, but only rounds with a write inside count.
        raced += writer.writes > before
        target = bytearray(base)
        delta.apply(target)  # raises InvalidStateError on a checksum/digest mismatch
        if algorithm is not None:
            assert delta.digest == digest(target, algorithm)
        assert delta.checksum == simple_checksum(target)
        got = np.frombuffer(target, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        old = np.frombuffer(base, dtype=np.uint8).reshape(-1, PAGE_SIZE)
        clean = np.ones(len(old), dtype=bool)
        clean[[p.index for p in delta.dirty_pages]] = False
        assert np.array_equal(got[clean], old[clean])
        assert delta.dirty_page_count() > 0
        if raced == ROUNDS_RACED:
            break
    assert raced == ROUNDS_RACED, f"only {raced} of {ROUNDS_TRIED} rounds had a write inside: the test proves too little"


def test_fingerprinted_rounds_during_writes_apply_and_keep_the_table_exact(
    live_state: "np.ndarray[Any, np.dtype[np.uint8]]", writer: Writer
) -> None:
    """Rounds that read the live state alone (the base's page fingerprints): each delta
    made during writes applies on the receiver's state, and the advanced table is exactly
    that state's, whatever the writer changed while the round read."""
    receiver = bytearray(live_state.tobytes())
    table = PageFingerprints.of(receiver)
    writer.start()
    raced = 0
    for round_ in range(ROUNDS_TRIED):
        before = writer.writes
        delta = DeltaSnapshot.create(AGENT, bytes(receiver), live_state, round_, round_ + 1, fingerprints=table)
        raced += writer.writes > before
        delta.apply(receiver)  # raises InvalidStateError on a checksum/digest mismatch
        assert table == PageFingerprints.of(receiver)
        if raced == ROUNDS_RACED:
            break
    assert raced == ROUNDS_RACED, f"only {raced} of {ROUNDS_TRIED} rounds had a write inside: the test proves too little"
    writer.pause()
    delta = DeltaSnapshot.create(AGENT, bytes(receiver), live_state, 99, 100, fingerprints=table)
    delta.apply(receiver)
    assert receiver == live_state.tobytes()


def test_tracker_rounds_during_writes_converge_after_pause(
    live_state: "np.ndarray[Any, np.dtype[np.uint8]]", writer: Writer
) -> None:
    """The pre-copy loop: rounds while the agent writes, each acknowledged by a receiver
    that applies it to what it has; after the pause one round makes them equal."""
    tracker = DirtyPageTracker(AGENT, SIZE)
    receiver = bytearray(SIZE)
    writer.start()
    sizes: List[int] = []
    for _ in range(6):
        delta = tracker.create_delta(live_state, commit=False)
        assert tracker.pending_sequence == delta.sequence and tracker.sequence == delta.base_sequence
        wire = DeltaSnapshot.deserialize(delta.serialize())
        wire.apply(receiver)  # its own base: the committed state the receiver holds
        tracker.acknowledge(wire.sequence)
        assert tracker.sequence == delta.sequence and tracker.pending_sequence is None
        assert tracker.committed_state() == receiver  # the tracker stores what was sent
        sizes.append(delta.dirty_page_count())
    assert sizes[0] == SIZE // PAGE_SIZE  # round 0 (against zeros) carries every page
    writer.pause()
    final = tracker.create_delta(live_state, commit=False)
    final.apply(receiver)
    tracker.commit(final)
    assert receiver == live_state.tobytes()
    # Nothing left: the next round is empty.
    assert tracker.create_delta(live_state).dirty_page_count() == 0


def test_lost_round_is_rediffed(live_state: "np.ndarray[Any, np.dtype[np.uint8]]", writer: Writer) -> None:
    """A round that never reached the receiver is not committed: the next round is made
    against what the receiver really has, so it still converges."""
    migrator = IncrementalMigrator()
    receiver = bytearray(live_state.tobytes())
    migrator.start_tracking(AGENT, receiver)
    writer.start()
    lost = migrator.create_incremental(AGENT, live_state, commit=False)
    tracker = migrator.tracker(AGENT)
    assert tracker is not None and tracker.pending_sequence == lost.sequence == 2
    migrator.tracker(AGENT).discard()  # type: ignore[union-attr]  # the transfer failed
    assert migrator.get_sequence(AGENT) == 1
    for _ in range(3):
        delta = migrator.create_incremental(AGENT, live_state, commit=False)
        assert delta.base_sequence == migrator.get_sequence(AGENT)
        delta.apply(receiver)
        migrator.acknowledge(AGENT, delta.sequence)
    writer.pause()
    delta = migrator.create_incremental(AGENT, live_state, commit=False)
    delta.apply(receiver)
    migrator.commit(AGENT, delta)
    assert receiver == live_state.tobytes()
    assert migrator.get_sequence(AGENT) == delta.sequence == 5
    assert migrator.stats.incremental_migrations == 5


def test_commit_and_acknowledge_refuse_what_is_not_pending() -> None:
    tracker = DirtyPageTracker(AGENT, 2 * PAGE_SIZE)
    tracker.initialize(bytes(2 * PAGE_SIZE))
    new = b"\x01" + bytes(2 * PAGE_SIZE - 1)
    with pytest.raises(InvalidStateError, match="not pending"):
        tracker.acknowledge(2)
    first = tracker.create_delta(new, commit=False)
    second = tracker.create_delta(new, commit=False)  # replaces the first (same base)
    assert (first.sequence, second.sequence) == (2, 2)
    with pytest.raises(InvalidStateError, match="not this tracker's pending delta"):
        tracker.commit(first)
    with pytest.raises(InvalidStateError, match="not pending"):
        tracker.acknowledge(3)
    for bad in ("2", 2.0, True, None):  # not a sequence number: refused, nothing committed
        with pytest.raises(TypeError, match="sequence must be an int"):
            tracker.acknowledge(bad)  # type: ignore[arg-type]
    assert tracker.sequence == 1 and tracker.committed_state() == bytes(2 * PAGE_SIZE)
    tracker.commit(second)
    assert tracker.sequence == 2 and tracker.committed_state() == new
    with pytest.raises(InvalidStateError, match="not this tracker's pending delta"):
        tracker.commit(second)  # already committed
    # commit=True (the default, SPEC §4) commits at once and drops nothing pending.
    third = tracker.create_delta(bytes(2 * PAGE_SIZE))
    assert third.sequence == 3 and tracker.pending_sequence is None and tracker.committed_state() == bytes(2 * PAGE_SIZE)
    with pytest.raises(InvalidStateError, match="not being tracked"):
        IncrementalMigrator().acknowledge(AGENT, 1)


def test_marks_are_cleared_only_when_the_round_is_committed() -> None:
    tracker = DirtyPageTracker(AGENT, 3 * PAGE_SIZE)
    tracker.initialize(bytes(3 * PAGE_SIZE))
    tracker.mark_dirty(1)
    delta = tracker.create_delta(bytes(3 * PAGE_SIZE), commit=False)
    assert tracker.is_dirty(1)
    tracker.acknowledge(delta.sequence)
    assert tracker.dirty_count() == 0
