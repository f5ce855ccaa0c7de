"""Incremental migration: dirty-page tracking per agent and migration statistics.

:class:`DirtyPageTracker` remembers the last state it shipped and hands out deltas with
consecutive sequence numbers; :class:`IncrementalMigrator` keeps one tracker per agent
and accumulates :class:`MigrationStats`. Readings follow the Rust crate (SPEC §4 pinned
readings). All three are safe to share between threads (each object has a lock).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view
from ._forksafe import guard
from ._ids import IdLike, to_id
from ._passes import Scan, byte_reporter
from ._tree import LeafTable
from ._types import BufferLike
from .checksum import DEFAULT_DIGEST, PAGE_SIZE
from .delta import DeltaSnapshot
from .errors import InvalidStateError
from .fingerprints import PageFingerprints, reads_new_alone
from .progress import ProgressEventKind

__all__ = ["DirtyPageTracker", "IncrementalMigrator", "MigrationStats"]


# --------------------------------------------------------------------------------------
# MigrationStats
# --------------------------------------------------------------------------------------


@dataclass
class MigrationStats:
    """Counters over the migrations of one migrator (the crate's ``MigrationStats``).

    >>> stats = MigrationStats()
    >>> stats.record_full(1_000_000, 1_000)
    >>> stats.record_incremental(250_000, 1_000_000, 1_000)
    >>> stats.bytes_transferred, stats.bytes_saved_delta, stats.avg_delta_ratio
    (1250000, 750000, 0.125)
    >>> stats.throughput_mbps()
    625.0
    >>> stats.record_compression(400_000, 250_000)
    >>> round(stats.overall_compression_ratio(), 4)
    0.8929

    Attributes:
        bytes_transferred: bytes sent (full states and deltas' stored sizes).
        bytes_saved_compression: bytes compression saved (uncompressed - compressed).
        bytes_saved_delta: bytes deltas saved over sending the full state.
        full_migrations: number of full-state migrations recorded.
        incremental_migrations: number of delta migrations recorded.
        avg_delta_ratio: running mean of ``delta_size / full_size`` over all migrations
            (full migrations count in the denominator but do not move the sum).
        total_time_us: time spent, in microseconds.
    """

    bytes_transferred: int = 0
    bytes_saved_compression: int = 0
    bytes_saved_delta: int = 0
    full_migrations: int = 0
    incremental_migrations: int = 0
    avg_delta_ratio: float = 0.0
    total_time_us: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        guard(self, "_lock")  # taken around fork(): see _forksafe

    def record_full(self, size: int, time_us: int) -> None:
        """A full-state migration of ``size`` bytes that took ``time_us``."""
        with self._lock:
            self.bytes_transferred += size
            self.full_migrations += 1
            self.total_time_us += time_us

    def record_incremental(self, delta_size: int, full_size: int, time_us: int) -> None:
        """A delta of ``delta_size`` bytes that stood in for ``full_size`` bytes."""
        with self._lock:
            self.bytes_transferred += delta_size
            # Saturating like the crate's unsigned counters: a delta never "saves" < 0.
            self.bytes_saved_delta += max(full_size - delta_size, 0)
            self.incremental_migrations += 1
            self.total_time_us += time_us
            ratio = delta_size / max(full_size, 1)
            count = self.full_migrations + self.incremental_migrations
            self.avg_delta_ratio = (self.avg_delta_ratio * (count - 1) + ratio) / count

    def record_compression(self, uncompressed: int, compressed: int) -> None:
        """Compression turned ``uncompressed`` bytes into ``compressed`` bytes."""
        with self._lock:
            self.bytes_saved_compression += max(uncompressed - compressed, 0)

    def overall_compression_ratio(self) -> float:
        """transferred / (transferred + saved by compression); 1.0 when both are 0."""
        with self._lock:
            whole = self.bytes_transferred + self.bytes_saved_compression
            return 1.0 if whole == 0 else self.bytes_transferred / whole

    def throughput_mbps(self) -> float:
        """Megabytes (10**6) transferred per second of recorded time; 0.0 with no time."""
        with self._lock:
            if self.total_time_us == 0:
                return 0.0
            return (self.bytes_transferred / 1e6) / (self.total_time_us / 1e6)

    def snapshot(self) -> "MigrationStats":
        """A consistent copy (taken under the lock)."""
        with self._lock:
            return MigrationStats(**{f.name: getattr(self, f.name) for f in fields(self) if f.init})

    def __deepcopy__(self, memo: Dict[int, Any]) -> "MigrationStats":
        return self.snapshot()

    def __copy__(self) -> "MigrationStats":
        return self.snapshot()

    def __getstate__(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        guard(self, "_lock")  # taken around fork(): see _forksafe


# --------------------------------------------------------------------------------------
# DirtyPageTracker
# --------------------------------------------------------------------------------------


class DirtyPageTracker:
    """Tracks one agent's state between deltas (the crate's ``DirtyPageTracker``).

    The bitmap of marked pages is advisory: :meth:`create_delta` always checks every
    page of the state against the committed one, so a missed mark can never produce a
    wrong delta. With the default digest it checks by the committed state's page
    fingerprints (:class:`~cellmigrate.PageFingerprints`, taken at the first delta and
    kept up to date), reading the live state alone. The committed state is what the
    deltas carried (the pages as copied when they were read), not the live state, so
    rounds made while the agent writes stay consistent; with ``create_delta(...,
    commit=False)`` it advances only when :meth:`commit` or :meth:`acknowledge` says the
    receiver has the delta.

    >>> tracker = DirtyPageTracker(bytes(16), 3 * 4096)
    >>> tracker.initialize(bytes(3 * 4096))
    >>> tracker.sequence
    1
    >>> tracker.mark_range_dirty(4000, 200)
    >>> [tracker.is_dirty(i) for i in range(3)], tracker.dirty_count()
    ([True, True, False], 2)
    >>> delta = tracker.create_delta(b"x" + bytes(3 * 4096 - 1))
    >>> delta.base_sequence, delta.sequence, tracker.sequence, tracker.dirty_count()
    (1, 2, 2, 0)
    """

    def __init__(self, agent_id: IdLike, state_size: int) -> None:
        if isinstance(state_size, bool) or not isinstance(state_size, (int, np.integer)):
            raise TypeError(f"state_size must be an int, not {type(state_size).__name__}")
        if state_size < 0:
            raise ValueError(f"state_size must be >= 0, got {state_size}")
        self._agent_id = to_id(agent_id, "agent_id")
        self._state_size = int(state_size)
        self._bitmap: npt.NDArray[np.bool_] = np.zeros(-(-self._state_size // PAGE_SIZE), dtype=np.bool_)
        self._last: Optional[bytearray] = None
        self._sequence = 0
        self._pending: Optional[Tuple[DeltaSnapshot, Scan]] = None
        # Page fingerprints of the committed state (None: not taken yet), and the pending
        # delta's advanced copy of them (None: the pending delta was made without).
        self._fingerprints: Optional[PageFingerprints] = None
        self._pending_fingerprints: Optional[PageFingerprints] = None
        # xxh3_128_tree leaf table of the committed state (None: not computed yet).
        self._leaves: Optional[LeafTable] = None
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    @property
    def agent_id(self) -> bytes:
        """The tracked agent's 16-byte id."""
        return self._agent_id

    @property
    def state_size(self) -> int:
        """The state size the bitmap is sized for (the committed size once a resizing delta is committed)."""
        return self._state_size

    @property
    def page_count(self) -> int:
        """Number of pages in the bitmap: ``ceil(state_size / PAGE_SIZE)``."""
        return int(self._bitmap.size)

    @property
    def sequence(self) -> int:
        """Sequence of the committed state: 0 before :meth:`initialize`, then 1, 2, ..."""
        with self._lock:
            return self._sequence

    def initialize(self, state: BufferLike) -> None:
        """Remember ``state`` (copied) as the committed base, clear the bitmap, set ``sequence`` to 1.

        If another thread writes ``state`` meanwhile, the copy is one moment's reading:
        ship :meth:`committed_state` (not a second read of ``state``) as the full state,
        or start without ``initialize`` so the first delta, made against zeros, carries it.
        A pending delta is dropped."""
        view = as_bytes_view(state, "state")
        with self._lock:
            self._last = bytearray(view)
            self._bitmap[:] = False
            self._sequence = 1
            self._pending = None
            self._leaves = None
            self._fingerprints = None

    def mark_dirty(self, page_index: int) -> None:
        """Mark one page; an index outside the state is ignored."""
        with self._lock:
            if 0 <= page_index < self._bitmap.size:
                self._bitmap[page_index] = True

    def mark_range_dirty(self, offset: int, length: int) -> None:
        """Mark pages ``offset // 4096`` up to ``ceil((offset + length) / 4096)``, clipped."""
        if offset < 0 or length < 0:
            raise ValueError(f"offset and length must be >= 0, got offset={offset}, length={length}")
        first = offset // PAGE_SIZE
        stop = -(-(offset + length) // PAGE_SIZE)
        with self._lock:
            stop = min(stop, self._bitmap.size)
            if first < stop:
                self._bitmap[first:stop] = True

    def is_dirty(self, page_index: int) -> bool:
        """Whether a page is marked; False for an index outside the state."""
        with self._lock:
            return bool(0 <= page_index < self._bitmap.size and self._bitmap[page_index])

    def dirty_count(self) -> int:
        """Number of marked pages."""
        with self._lock:
            return int(np.count_nonzero(self._bitmap))

    def dirty_page_indices(self) -> npt.NDArray[np.int64]:
        """Indices of the marked pages (int64 array, ascending)."""
        with self._lock:
            return np.flatnonzero(self._bitmap).astype(np.int64)

    def clear_all(self) -> None:
        """Unmark every page."""
        with self._lock:
            self._bitmap[:] = False

    def create_delta(
        self,
        current: BufferLike,
        *,
        digest: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        commit: bool = True,
        resize: bool = False,
    ) -> DeltaSnapshot:
        """Diff ``current`` against the committed state; by default commit the delta at once.

        The delta has ``base_sequence`` = the committed sequence and ``sequence`` = that
        plus one. Before :meth:`initialize` the diff is against zeros (``base_sequence``
        0). ``digest``, ``key`` and ``progress`` as in :meth:`DeltaSnapshot.create`. A
        size change raises ``InvalidStateError`` unless ``resize=True`` (a WebAssembly
        ``memory.grow``): then the delta's ``base_size`` is the committed size, and
        committing it resizes the committed state, the bitmap and :attr:`state_size`.

        The delta describes exactly the state it was made from as the scan read it: each
        dirty page is copied once when found, and the checksum and digest cover the
        committed state with those copies over it. So ``current`` may be written by
        another thread meanwhile (a running agent): the delta still applies to its base,
        and a page written after it was read is dirty again in the next delta.

        ``commit=True`` (SPEC §4): the committed state becomes what the delta carries
        (the committed state with the copied pages, never a second read of ``current``),
        ``sequence`` advances and the bitmap is cleared. ``commit=False``: nothing moves
        until :meth:`commit` (or :meth:`acknowledge`) says the receiver has the delta, so
        a delta lost in transit is simply re-diffed next time; a later ``create_delta``
        replaces a pending delta that was never committed (both have the same base).
        """
        view = as_bytes_view(current, "current")
        report = byte_reporter(progress, self._agent_id, ProgressEventKind.CAPTURING_STATE)
        with self._lock:
            table = None
            if self._last is not None and len(self._last) == view.nbytes and reads_new_alone(digest, key):
                if self._fingerprints is None:  # one read of the committed state, once
                    self._fingerprints = PageFingerprints.of(self._last)
                table = self._fingerprints.copy()  # advanced by create; adopted on commit
            # Before initialize: None = zeros of the new length, never allocated.
            delta, found = DeltaSnapshot._create_checked(
                self._agent_id, self._last, view, self._sequence, self._sequence + 1, digest, key, report,
                resize=resize, fingerprints=table,
            )
            self._pending = (delta, found)
            self._pending_fingerprints = table
            if commit:
                self._advance()
            return delta

    def commit(self, delta: DeltaSnapshot) -> None:
        """The receiver has ``delta`` (made with ``commit=False``): make it the committed state.

        Raises ``InvalidStateError`` when ``delta`` is not the pending delta of this
        tracker (none is pending, or it was replaced or already committed)."""
        with self._lock:
            if self._pending is None or self._pending[0] is not delta:
                raise InvalidStateError(
                    f"Delta {getattr(delta, 'sequence', '?')} is not this tracker's pending delta "
                    f"(pending: {self.pending_sequence}); nothing was committed"
                )
            self._advance()

    def acknowledge(self, sequence: int) -> None:
        """The receiver acknowledged ``sequence``: commit the pending delta of that sequence.

        Raises ``TypeError`` when ``sequence`` is not an int, ``InvalidStateError`` when
        no pending delta has that sequence (an acknowledgement of an older, already
        committed sequence is refused too: it would mean the two sides disagree)."""
        if isinstance(sequence, bool) or not isinstance(sequence, (int, np.integer)):
            raise TypeError(f"sequence must be an int, not {type(sequence).__name__}")
        with self._lock:
            if self._pending is None or self._pending[0].sequence != sequence:
                raise InvalidStateError(
                    f"Acknowledged sequence {sequence} is not pending (pending: {self.pending_sequence}, "
                    f"committed: {self._sequence})"
                )
            self._advance()

    def discard(self) -> None:
        """Forget a pending delta (e.g. its transfer failed); a no-op when none is pending."""
        with self._lock:
            self._pending = None

    @property
    def pending_sequence(self) -> Optional[int]:
        """Sequence of the delta made with ``commit=False`` and not yet committed, or ``None``."""
        with self._lock:
            return None if self._pending is None else self._pending[0].sequence

    def committed_state(self) -> bytes:
        """A copy of the committed state: what a receiver that applied every committed
        delta holds (empty before the first commit or :meth:`initialize`)."""
        with self._lock:
            return bytes(self._last) if self._last is not None else b""

    def committed_digest(self) -> bytes:
        """``xxh3_128_tree`` digest of the committed state (what the receiver must hold).

        The tracker keeps the committed state's leaf table: a delta made with the tree
        digest (the default) hands it over for free, otherwise only the leaves the
        committed pages touched are hashed again, so after the first call this costs the
        touched MiB, not the state. Empty-state digest before :meth:`initialize`.
        """
        with self._lock:
            if self._last is None:
                return LeafTable(0).root()
            view = memoryview(self._last)
            try:
                if self._leaves is None:
                    self._leaves = LeafTable.of(view)
                return self._leaves.refresh(view)
            finally:
                view.release()

    def _advance(self) -> None:
        """Commit the pending delta: patch its copied pages into the committed state."""
        assert self._pending is not None
        delta, found = self._pending
        total = delta.total_size
        if self._last is None:
            self._last = bytearray(total)  # the first delta was made against zeros
        elif len(self._last) > total:
            del self._last[total:]
        elif len(self._last) < total:
            self._last.extend(bytes(total - len(self._last)))
        kernels.scatter_pages(self._last, found.indices, found.pages, PAGE_SIZE)
        if found.leaves is not None:  # the delta's tree digest hashed exactly this state
            self._leaves = LeafTable.from_leaves(found.leaves, total)
        elif self._leaves is not None:
            self._leaves.resize(total)
            self._leaves.touch_pages(found.indices, PAGE_SIZE)
        # The table advanced with the delta, or none (taken again when next needed).
        self._fingerprints = self._pending_fingerprints
        if total != self._state_size:
            self._state_size = total
            self._bitmap = np.zeros(-(-total // PAGE_SIZE), dtype=np.bool_)
        self._bitmap[:] = False
        self._sequence = delta.sequence
        self._pending = None

    def __repr__(self) -> str:
        return (
            f"DirtyPageTracker(agent_id={self._agent_id.hex()}, state_size={self._state_size}, "
            f"sequence={self.sequence}, dirty={self.dirty_count()}/{self.page_count})"
        )


# --------------------------------------------------------------------------------------
# IncrementalMigrator
# --------------------------------------------------------------------------------------


class IncrementalMigrator:
    """One :class:`DirtyPageTracker` per agent, plus :class:`MigrationStats`.

    >>> m = IncrementalMigrator()
    >>> agent = bytes(range(16))
    >>> m.start_tracking(agent, bytes(8192))
    >>> m.is_tracking(agent), m.get_sequence(agent), m.get_sequence(bytes(16))
    (True, 1, None)
    >>> delta = m.create_incremental(agent, b"\\1" + bytes(8191))
    >>> delta.sequence, m.stats.incremental_migrations, m.stats.bytes_saved_delta
    (2, 1, 8092)
    """

    def __init__(self) -> None:
        self._trackers: Dict[bytes, DirtyPageTracker] = {}
        self._stats = MigrationStats()
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    def start_tracking(self, agent_id: IdLike, initial_state: BufferLike) -> None:
        """Track an agent from ``initial_state`` (sequence 1); restarts an existing tracker."""
        view = as_bytes_view(initial_state, "initial_state")
        agent = to_id(agent_id, "agent_id")
        tracker = DirtyPageTracker(agent, view.nbytes)
        tracker.initialize(view)
        with self._lock:
            self._trackers[agent] = tracker

    def stop_tracking(self, agent_id: IdLike) -> None:
        """Forget an agent (no-op when it is not tracked)."""
        with self._lock:
            self._trackers.pop(to_id(agent_id, "agent_id"), None)

    def is_tracking(self, agent_id: IdLike) -> bool:
        """Whether the agent has a tracker."""
        with self._lock:
            return to_id(agent_id, "agent_id") in self._trackers

    def get_sequence(self, agent_id: IdLike) -> Optional[int]:
        """The agent's tracker sequence, or ``None`` when it is not tracked."""
        with self._lock:
            tracker = self._trackers.get(to_id(agent_id, "agent_id"))
        return None if tracker is None else tracker.sequence

    def mark_dirty(self, agent_id: IdLike, offset: int, length: int) -> None:
        """Mark a byte range of a tracked agent's state (ignored when not tracked)."""
        with self._lock:
            tracker = self._trackers.get(to_id(agent_id, "agent_id"))
        if tracker is not None:
            tracker.mark_range_dirty(offset, length)

    def create_incremental(
        self,
        agent_id: IdLike,
        state: BufferLike,
        *,
        digest: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        commit: bool = True,
        resize: bool = False,
    ) -> DeltaSnapshot:
        """Delta of ``state`` against the agent's committed state; records it in :attr:`stats`.

        ``resize`` and ``commit`` as in :meth:`DirtyPageTracker.create_delta`: with ``commit=False`` the
        agent's tracker advances only at :meth:`commit` / :meth:`acknowledge`. Raises
        ``InvalidStateError("Agent not being tracked for incremental migration")`` for an
        untracked agent.
        """
        view = as_bytes_view(state, "state")
        with self._lock:
            tracker = self._trackers.get(to_id(agent_id, "agent_id"))
        if tracker is None:
            raise InvalidStateError("Agent not being tracked for incremental migration")
        start = time.perf_counter_ns()
        delta = tracker.create_delta(view, digest=digest, key=key, progress=progress, commit=commit, resize=resize)
        elapsed_us = (time.perf_counter_ns() - start) // 1000
        with self._lock:
            self._stats.record_incremental(delta.compressed_size(), view.nbytes, elapsed_us)
            self._stats.record_compression(delta.uncompressed_size(), delta.compressed_size())
        return delta

    def commit(self, agent_id: IdLike, delta: DeltaSnapshot) -> None:
        """The receiver has ``delta`` (made with ``commit=False``): see :meth:`DirtyPageTracker.commit`."""
        self._tracker(agent_id).commit(delta)

    def acknowledge(self, agent_id: IdLike, sequence: int) -> None:
        """The receiver acknowledged ``sequence``: see :meth:`DirtyPageTracker.acknowledge`."""
        self._tracker(agent_id).acknowledge(sequence)

    def tracker(self, agent_id: IdLike) -> Optional[DirtyPageTracker]:
        """The agent's tracker (its committed state, pending delta, bitmap), or ``None``."""
        with self._lock:
            return self._trackers.get(to_id(agent_id, "agent_id"))

    def _tracker(self, agent_id: IdLike) -> DirtyPageTracker:
        tracker = self.tracker(agent_id)
        if tracker is None:
            raise InvalidStateError("Agent not being tracked for incremental migration")
        return tracker

    @property
    def stats(self) -> MigrationStats:
        """A consistent copy of the statistics so far."""
        with self._lock:
            return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the statistics."""
        with self._lock:
            self._stats = MigrationStats()

    def __repr__(self) -> str:
        with self._lock:
            return f"IncrementalMigrator(tracking={len(self._trackers)}, stats={self._stats!r})"

