"""DirtyPageTracker, IncrementalMigrator and MigrationStats: the SPEC's pinned readings."""

from __future__ import annotations

import copy
import pickle
import random
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import cellmigrate
from cellmigrate import (
    PAGE_SIZE,
    DeltaSnapshot,
    DirtyPageTracker,
    IncrementalMigrator,
    InvalidStateError,
    MigrationStats,
    simple_checksum,
)

AGENT = bytes(range(16))
OTHER = bytes(range(16, 32))


# --- DirtyPageTracker --------------------------------------------------------------------


def test_new_tracker_state() -> None:
    t = DirtyPageTracker(AGENT, 10 * PAGE_SIZE + 1)
    assert t.sequence == 0
    assert t.page_count == 11 and t.state_size == 10 * PAGE_SIZE + 1 and t.agent_id == AGENT
    assert t.dirty_count() == 0
    assert DirtyPageTracker(uuid.UUID(bytes=AGENT), 0).agent_id == AGENT
    assert DirtyPageTracker(AGENT, 0).page_count == 0
    with pytest.raises(ValueError, match="state_size"):
        DirtyPageTracker(AGENT, -1)
    with pytest.raises(ValueError, match="16 bytes"):
        DirtyPageTracker(b"x", 10)


def test_initialize_sets_sequence_one_and_clears() -> None:
    t = DirtyPageTracker(AGENT, 4 * PAGE_SIZE)
    t.mark_dirty(2)
    t.initialize(bytes(4 * PAGE_SIZE))
    assert t.sequence == 1 and t.dirty_count() == 0
    t.create_delta(bytes(4 * PAGE_SIZE))
    t.initialize(bytes(4 * PAGE_SIZE))  # re-initializing restarts the sequence
    assert t.sequence == 1


def test_mark_dirty_is_dirty_and_out_of_range() -> None:
    t = DirtyPageTracker(AGENT, 5 * PAGE_SIZE)
    t.mark_dirty(0)
    t.mark_dirty(4)
    t.mark_dirty(4)
    t.mark_dirty(5)  # out of range: ignored
    t.mark_dirty(10**9)
    t.mark_dirty(-1)
    assert [t.is_dirty(i) for i in range(5)] == [True, False, False, False, True]
    assert t.dirty_count() == 2
    assert not t.is_dirty(5) and not t.is_dirty(-1) and not t.is_dirty(10**9)
    assert t.dirty_page_indices().tolist() == [0, 4]
    t.clear_all()
    assert t.dirty_count() == 0 and not t.is_dirty(0)


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, 1, [0]),
        (0, PAGE_SIZE, [0]),
        (0, PAGE_SIZE + 1, [0, 1]),
        (PAGE_SIZE - 1, 2, [0, 1]),
        (PAGE_SIZE, 0, []),  # aligned, empty: ceil(4096/4096) = 1 = first page -> nothing
        (PAGE_SIZE + 5, 0, [1]),  # unaligned, empty: pages 1 .. ceil(4101/4096) = 2 -> page 1
        (3 * PAGE_SIZE, 10 * PAGE_SIZE, [3, 4]),  # clipped at the end
        (9 * PAGE_SIZE, 5, []),  # starts past the end
    ],
)
def test_mark_range_dirty_pinned(offset: int, length: int, expected: list[int]) -> None:
    t = DirtyPageTracker(AGENT, 5 * PAGE_SIZE)
    t.mark_range_dirty(offset, length)
    assert [i for i in range(5) if t.is_dirty(i)] == expected
    assert t.dirty_count() == len(expected)


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 40 * PAGE_SIZE), st.integers(0, 40 * PAGE_SIZE), st.integers(0, 20 * PAGE_SIZE))
def test_mark_range_dirty_formula(offset: int, length: int, size: int) -> None:
    t = DirtyPageTracker(AGENT, size)
    t.mark_range_dirty(offset, length)
    pages = -(-size // PAGE_SIZE)
    first, stop = offset // PAGE_SIZE, min(-(-(offset + length) // PAGE_SIZE), pages)
    assert [i for i in range(pages) if t.is_dirty(i)] == list(range(first, stop))


def test_mark_range_dirty_rejects_negative() -> None:
    t = DirtyPageTracker(AGENT, PAGE_SIZE)
    with pytest.raises(ValueError):
        t.mark_range_dirty(-1, 5)
    with pytest.raises(ValueError):
        t.mark_range_dirty(0, -5)


def test_create_delta_sequences_and_base() -> None:
    size = 6 * PAGE_SIZE
    rng = random.Random(1)
    s0 = rng.randbytes(size)
    t = DirtyPageTracker(AGENT, size)
    t.initialize(s0)
    t.mark_dirty(3)
    s1 = bytearray(s0)
    s1[PAGE_SIZE + 3] ^= 1  # page 1 changed although page 3 was marked: the bitmap is advisory
    d1 = t.create_delta(s1)
    assert (d1.base_sequence, d1.sequence, t.sequence) == (1, 2, 2)
    assert [p.index for p in d1.dirty_pages] == [1]
    assert t.dirty_count() == 0
    assert d1.agent_id == AGENT and d1.checksum == simple_checksum(s1)
    s2 = bytearray(s1)
    s2[5 * PAGE_SIZE] ^= 0xFF
    s1[0] ^= 1  # the caller mutating its old buffer must not affect the tracker's copy
    d2 = t.create_delta(s2)
    assert (d2.base_sequence, d2.sequence, t.sequence) == (2, 3, 3)
    assert [p.index for p in d2.dirty_pages] == [5]
    target = bytearray(s0)
    d1.apply(target)
    s1[0] ^= 1
    assert target == s1
    d2.apply(target)
    assert target == s2


def test_create_delta_before_initialize_diffs_against_zeros() -> None:
    t = DirtyPageTracker(AGENT, 3 * PAGE_SIZE)
    state = bytes(PAGE_SIZE) + b"\x01" + bytes(2 * PAGE_SIZE - 1)
    d = t.create_delta(state)
    assert (d.base_sequence, d.sequence, t.sequence) == (0, 1, 1)
    assert [p.index for p in d.dirty_pages] == [1]
    target = bytearray(3 * PAGE_SIZE)
    d.apply(target)
    assert target == state
    d2 = t.create_delta(state)  # unchanged state: empty delta, sequence still advances
    assert (d2.base_sequence, d2.sequence, d2.dirty_page_count(), t.sequence) == (1, 2, 0, 2)


def test_create_delta_size_change_is_invalid_state() -> None:
    t = DirtyPageTracker(AGENT, PAGE_SIZE)
    t.initialize(bytes(PAGE_SIZE))
    with pytest.raises(InvalidStateError):
        t.create_delta(bytes(PAGE_SIZE + 1))
    assert t.sequence == 1  # a failed delta does not advance


def test_create_delta_digest_options() -> None:
    key = bytes(32)
    t = DirtyPageTracker(AGENT, PAGE_SIZE)
    t.initialize(bytes(PAGE_SIZE))
    d = t.create_delta(b"\x02" + bytes(PAGE_SIZE - 1), key=key)
    assert d.keyed and d.digest_algorithm == "blake3"
    d = t.create_delta(b"\x03" + bytes(PAGE_SIZE - 1), digest=None)
    assert d.digest is None


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 8))
def test_tracker_chain_reproduces_every_state(seed: int, steps: int) -> None:
    rng = random.Random(seed)
    size = rng.randint(0, 8 * PAGE_SIZE)
    state = bytearray(rng.randbytes(size))
    t = DirtyPageTracker(AGENT, size)
    t.initialize(state)
    replica = bytearray(state)
    for _ in range(steps):
        for _ in range(rng.randint(0, 5)):
            if size:
                i = rng.randrange(size)
                state[i] = rng.randrange(256)
                t.mark_range_dirty(i, 1)
        delta = t.create_delta(state)
        delta.apply(replica)
        assert replica == state


def test_tracker_repr() -> None:
    t = DirtyPageTracker(AGENT, 2 * PAGE_SIZE)
    t.mark_dirty(1)
    assert repr(t) == f"DirtyPageTracker(agent_id={AGENT.hex()}, state_size=8192, sequence=0, dirty=1/2)"


# --- MigrationStats ----------------------------------------------------------------------


def test_stats_defaults_and_eq() -> None:
    s = MigrationStats()
    assert (
        s.bytes_transferred,
        s.bytes_saved_compression,
        s.bytes_saved_delta,
        s.full_migrations,
        s.incremental_migrations,
        s.avg_delta_ratio,
        s.total_time_us,
    ) == (0, 0, 0, 0, 0, 0.0, 0)
    assert s == MigrationStats()
    assert s.overall_compression_ratio() == 1.0
    assert s.throughput_mbps() == 0.0
    assert "bytes_transferred=0" in repr(s)


def test_record_full() -> None:
    s = MigrationStats()
    s.record_full(1000, 500)
    s.record_full(3000, 1500)
    assert (s.bytes_transferred, s.full_migrations, s.total_time_us) == (4000, 2, 2000)
    assert s.avg_delta_ratio == 0.0  # full migrations do not move the ratio sum
    assert s.throughput_mbps() == pytest.approx((4000 / 1e6) / (2000 / 1e6))


def test_record_incremental_running_mean() -> None:
    s = MigrationStats()
    s.record_incremental(100, 1000, 10)
    assert s.avg_delta_ratio == pytest.approx(0.1)
    s.record_incremental(300, 1000, 10)
    assert s.avg_delta_ratio == pytest.approx(0.2)
    s.record_full(1000, 10)
    s.record_incremental(0, 1000, 10)
    # mean over 4 migrations: (0.1 + 0.3 + 0 + 0) / 4 ... as a running update:
    # after the full one the count is 3 but the mean is untouched until the next update.
    assert s.avg_delta_ratio == pytest.approx((0.2 * 3 + 0.0) / 4)
    assert (s.incremental_migrations, s.full_migrations) == (3, 1)
    assert s.bytes_saved_delta == 900 + 700 + 1000
    assert s.bytes_transferred == 100 + 300 + 1000 + 0
    s2 = MigrationStats()
    s2.record_incremental(5, 0, 1)  # full_size 0: divides by max(full_size, 1)
    assert s2.avg_delta_ratio == 5.0 and s2.bytes_saved_delta == 0


def test_record_compression_and_overall_ratio() -> None:
    s = MigrationStats()
    s.record_compression(4096, 1024)
    assert s.bytes_saved_compression == 3072
    assert s.overall_compression_ratio() == 0.0  # nothing transferred yet
    s.record_full(1024, 1)
    assert s.overall_compression_ratio() == pytest.approx(1024 / (1024 + 3072))
    s.record_compression(10, 20)  # an expansion saves nothing
    assert s.bytes_saved_compression == 3072


def test_stats_copy_and_pickle() -> None:
    s = MigrationStats()
    s.record_incremental(10, 100, 5)
    for other in (copy.copy(s), copy.deepcopy(s), pickle.loads(pickle.dumps(s)), s.snapshot()):
        assert other == s and other is not s
        other.record_full(1, 1)  # each copy has its own lock and counters
        assert other != s


# --- IncrementalMigrator -----------------------------------------------------------------


def test_migrator_tracking_lifecycle() -> None:
    m = IncrementalMigrator()
    assert not m.is_tracking(AGENT) and m.get_sequence(AGENT) is None
    m.start_tracking(AGENT, bytes(2 * PAGE_SIZE))
    assert m.is_tracking(AGENT) and m.get_sequence(AGENT) == 1
    assert m.is_tracking(uuid.UUID(bytes=AGENT))
    assert not m.is_tracking(OTHER) and m.get_sequence(OTHER) is None
    m.stop_tracking(AGENT)
    m.stop_tracking(AGENT)  # idempotent
    assert not m.is_tracking(AGENT) and m.get_sequence(AGENT) is None


def test_create_incremental_untracked_message() -> None:
    m = IncrementalMigrator()
    with pytest.raises(InvalidStateError) as info:
        m.create_incremental(AGENT, bytes(10))
    assert info.value.message == "Agent not being tracked for incremental migration"
    assert str(info.value) == "Invalid state: Agent not being tracked for incremental migration"
    assert m.stats == MigrationStats()


def test_create_incremental_records_stats() -> None:
    m = IncrementalMigrator()
    size = 8 * PAGE_SIZE
    m.start_tracking(AGENT, bytes(size))
    state = bytearray(size)
    state[10] = 1
    state[3 * PAGE_SIZE : 3 * PAGE_SIZE + 50] = b"\x07" * 50
    m.mark_dirty(AGENT, 10, 1)
    m.mark_dirty(OTHER, 0, 100)  # untracked agent: ignored
    delta = m.create_incremental(AGENT, state)
    assert isinstance(delta, DeltaSnapshot)
    assert (delta.base_sequence, delta.sequence, m.get_sequence(AGENT)) == (1, 2, 2)
    stats = m.stats
    assert stats.incremental_migrations == 1 and stats.full_migrations == 0
    assert stats.bytes_transferred == delta.compressed_size()
    assert stats.bytes_saved_delta == size - delta.compressed_size()
    assert stats.bytes_saved_compression == delta.uncompressed_size() - delta.compressed_size()
    assert stats.avg_delta_ratio == pytest.approx(delta.compressed_size() / size)
    assert stats.total_time_us >= 0
    delta2 = m.create_incremental(AGENT, state)
    assert delta2.dirty_page_count() == 0 and m.get_sequence(AGENT) == 3
    assert m.stats.incremental_migrations == 2
    m.reset_stats()
    assert m.stats == MigrationStats()
    assert m.get_sequence(AGENT) == 3  # resetting stats keeps the trackers


def test_stats_property_is_a_snapshot() -> None:
    m = IncrementalMigrator()
    snap = m.stats
    snap.record_full(10, 10)
    assert m.stats == MigrationStats()


def test_start_tracking_restarts() -> None:
    m = IncrementalMigrator()
    m.start_tracking(AGENT, bytes(PAGE_SIZE))
    m.create_incremental(AGENT, b"\x01" + bytes(PAGE_SIZE - 1))
    assert m.get_sequence(AGENT) == 2
    m.start_tracking(AGENT, bytes(2 * PAGE_SIZE))
    assert m.get_sequence(AGENT) == 1
    assert "IncrementalMigrator(tracking=1" in repr(m)


def test_exported_from_package() -> None:
    for name in ("DirtyPageTracker", "IncrementalMigrator", "MigrationStats"):
        assert name in cellmigrate.__all__ and hasattr(cellmigrate, name)


_RACE = textwrap.dedent(
    """
    import random, threading
    import numpy as np
    from cellmigrate import PAGE_SIZE, DirtyPageTracker, IncrementalMigrator, MigrationStats

    pages = 256
    t = DirtyPageTracker(bytes(16), pages * PAGE_SIZE)
    def marker(seed):
        rng = random.Random(seed)
        for _ in range(3000):
            t.mark_dirty(rng.randrange(pages))
            t.mark_range_dirty(rng.randrange(pages * PAGE_SIZE), rng.randrange(3 * PAGE_SIZE))
            t.is_dirty(rng.randrange(pages)); t.dirty_count()
    threads = [threading.Thread(target=marker, args=(s,)) for s in range(8)]
    [th.start() for th in threads]; [th.join() for th in threads]
    assert 0 < t.dirty_count() <= pages

    m = IncrementalMigrator()
    agents = [bytes([i]) * 16 for i in range(8)]
    states = {a: bytearray(64 * PAGE_SIZE) for a in agents}
    for a in agents:
        m.start_tracking(a, states[a])
    replicas = {a: bytearray(64 * PAGE_SIZE) for a in agents}
    def worker(a):
        rng = random.Random(a)
        for _ in range(20):
            s = states[a]
            for _ in range(5):
                s[rng.randrange(len(s))] = rng.randrange(256)
            m.mark_dirty(a, 0, 10)
            d = m.create_incremental(a, s)
            d.apply(replicas[a])
            assert replicas[a] == s
    threads = [threading.Thread(target=worker, args=(a,)) for a in agents]
    [th.start() for th in threads]; [th.join() for th in threads]
    assert all(m.get_sequence(a) == 21 for a in agents)
    assert m.stats.incremental_migrations == 160

    s = MigrationStats()
    def rec():
        for _ in range(2000):
            s.record_incremental(10, 100, 1); s.record_full(5, 1); s.record_compression(20, 10)
    threads = [threading.Thread(target=rec) for _ in range(8)]
    [th.start() for th in threads]; [th.join() for th in threads]
    assert (s.incremental_migrations, s.full_migrations, s.bytes_saved_compression) == (16000, 16000, 160000)
    assert s.bytes_transferred == 16000 * 15 and s.total_time_us == 32000
    print("ok")
    """
)


def test_concurrent_use_is_safe() -> None:
    done = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_bitmap_is_compact() -> None:
    # A 1 GiB state needs a 262144-entry bitmap, not a Python list of bools.
    t = DirtyPageTracker(AGENT, 1 << 30)
    t.mark_range_dirty(0, 1 << 30)
    assert t.dirty_count() == (1 << 30) // PAGE_SIZE
    assert isinstance(t.dirty_page_indices(), np.ndarray)


def test_progress_passes_through() -> None:
    from cellmigrate import CollectingCallback

    m = IncrementalMigrator()
    m.start_tracking(AGENT, bytes(8 * PAGE_SIZE))
    events = CollectingCallback()
    m.create_incremental(AGENT, b"\x01" + bytes(8 * PAGE_SIZE - 1), progress=events)
    last = events.latest_event()
    assert events.event_count() >= 1 and last is not None and last.progress_percent() == 100
    seen: list[tuple[int, int]] = []
    t = DirtyPageTracker(AGENT, PAGE_SIZE)
    t.create_delta(bytes(PAGE_SIZE), progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (PAGE_SIZE, PAGE_SIZE)
