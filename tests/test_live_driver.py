"""The pre-copy driver in one process: convergence under writes, growth, failures, audit."""

from __future__ import annotations

import sqlite3
import threading
import time
from typing import Callable, List, Optional

import numpy as np
import pytest

from cellmigrate import (
    AgentRequirements,
    AuditEventType,
    AuditStoreError,
    CollectingCallback,
    CorruptDataError,
    MigrationFailedError,
    MigrationRecoveryManager,
    MigrationValidator,
    NodeCapabilities,
    ProgressEventKind,
    digest,
)
from cellmigrate.audit_store import SqliteAuditSink
from cellmigrate.live import (
    BufferSource,
    BufferTarget,
    Chunk,
    InProcessChannel,
    LiveMigration,
    MemoryStore,
    ReceiverSession,
    RefusedError,
)

MIB = 1 << 20


class Writer:
    """An agent: a thread rewriting 64 bytes of random pages until paused."""

    def __init__(self, state: np.ndarray, seed: int = 1, sleep: float = 0.0005, first_page: int = 0) -> None:
        self.state = state
        self.first_page = first_page
        self.rng = np.random.default_rng(seed)
        self.sleep = sleep
        self.paused = threading.Event()
        self.stopped = threading.Event()
        self.resumed = 0
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        pages = self.state.nbytes // 4096
        while True:
            if self.paused.is_set():
                self.stopped.set()
                while self.paused.is_set():
                    time.sleep(0.001)
                self.stopped.clear()
            page = int(self.rng.integers(self.first_page, pages))
            self.state[page * 4096 : page * 4096 + 64] = self.rng.integers(0, 256, 64, dtype=np.uint8)
            self.writes += 1
            time.sleep(self.sleep)

    def pause(self) -> None:
        self.paused.set()
        assert self.stopped.wait(5)

    def resume(self) -> None:
        self.resumed += 1
        self.paused.clear()


def _channel(target: Optional[BufferTarget] = None, **session_kw) -> InProcessChannel:  # type: ignore[no-untyped-def]
    return InProcessChannel(ReceiverSession(MemoryStore(), target or BufferTarget(), **session_kw))


def test_converges_while_the_agent_writes_and_arrives_byte_equal() -> None:
    state = np.random.default_rng(0).integers(0, 256, 16 * MIB, dtype=np.uint8)
    state[: 4 * MIB] = 0  # some zero pages: never sent in round 0 (the writer stays out of them)
    writer = Writer(state, first_page=4 * MIB // 4096)
    target = BufferTarget()
    events = CollectingCallback()
    rounds: List = []
    summary = LiveMigration(
        BufferSource(state, pause=writer.pause, resume=writer.resume, extra=lambda: b"globals"),
        _channel(target),
        chunk_bytes=1 * MIB,
        progress=events,
        on_round=rounds.append,
    ).run()
    assert writer.writes > 0 and writer.resumed == 0  # success never resumes the source
    assert target.resumed and target.extra == b"globals"
    assert target.state is not None and bytes(target.state) == state.tobytes()
    assert summary.digest == digest(state)
    # Stats: round 0 carried the non-zero pages once, the rest are small deltas.
    r0 = summary.rounds[0]
    assert r0.round == 0 and r0.dirty_bytes == 12 * MIB and r0.chunks == 12
    assert len(summary.rounds) >= 2 and summary.rounds[-1].final and not any(r.final for r in summary.rounds[:-1])
    assert summary.rounds[-1].actual_downtime_s is not None and summary.downtime_s == summary.rounds[-1].actual_downtime_s
    assert sum(r.wire_bytes for r in summary.rounds) == summary.wire_bytes
    assert sum(r.dirty_bytes for r in summary.rounds) == summary.page_bytes
    # A round that found nothing dirty (the agent paused in between) moved no bytes.
    assert all(r.dirty_rate >= 0 and r.bandwidth >= 0 for r in summary.rounds)
    assert all(r.bandwidth > 0 for r in summary.rounds if r.dirty_bytes > 0)
    assert summary.stop_reason in ("downtime", "max_rounds", "not_shrinking")
    assert rounds == list(summary.rounds)
    kinds = [e.kind for e in events.events]
    assert kinds[0] is ProgressEventKind.STARTED and kinds[-1] is ProgressEventKind.COMPLETED
    assert kinds.count(ProgressEventKind.VALIDATING) == len(summary.rounds)
    assert ProgressEventKind.TRANSFER_PROGRESS in kinds


def test_delta_rounds_send_only_what_changed() -> None:
    state = np.zeros(8 * MIB, dtype=np.uint8)
    state[::4096] = 1  # every page non-zero
    changes = iter([[3, 700], [5], []])

    def touch(stats) -> None:  # type: ignore[no-untyped-def]
        for page in next(changes, []):
            state[page * 4096 + 9] += 1

    summary = LiveMigration(BufferSource(state), _channel(), on_round=touch, max_rounds=3, downtime_limit=1e-9).run()
    assert [r.dirty_pages for r in summary.rounds] == [2048, 2, 1, 0]
    assert summary.stop_reason == "max_rounds"


@pytest.mark.parametrize("sizes", [[5 * MIB, 9 * MIB + 123, 9 * MIB + 123], [9 * MIB, 3 * MIB + 5, 1]])
def test_state_whose_size_changes_between_rounds(sizes: List[int]) -> None:
    rng = np.random.default_rng(2)
    holder = [rng.integers(0, 256, sizes[0], dtype=np.uint8)]
    steps = iter(sizes[1:])

    def grow(stats) -> None:  # type: ignore[no-untyped-def]
        n = next(steps, None)
        if n is not None:  # like memory.grow: a new, bigger (or smaller) buffer
            new = np.zeros(n, dtype=np.uint8)
            keep = min(n, holder[0].nbytes)
            new[:keep] = holder[0][:keep]
            new[keep : keep + 5000] = 7
            holder[0] = new

    target = BufferTarget()
    summary = LiveMigration(BufferSource(lambda: holder[0]), _channel(target), on_round=grow, max_rounds=3).run()
    assert target.state is not None and bytes(target.state) == holder[0].tobytes()
    assert summary.state_size == sizes[-1]


def test_refused_by_the_compatibility_check_with_its_reason() -> None:
    state = bytearray(b"x" * 10000)
    source_log, target_log = MigrationValidator(), MigrationValidator()
    paused: List[str] = []
    recovery = MigrationRecoveryManager.with_defaults()
    with pytest.raises(RefusedError, match="Target does not support architecture: riscv64"):
        LiveMigration(
            BufferSource(state, pause=lambda: paused.append("p")),
            _channel(capabilities=NodeCapabilities.new(), validator=target_log),
            requirements=AgentRequirements(architecture="riscv64"),
            validator=source_log,
            recovery=recovery,
        ).run()
    assert paused == []
    assert [e.event_type for e in target_log.audit_log] == [AuditEventType.VALIDATION_COMPLETED]
    assert not list(target_log.audit_log)[0].success
    assert [e.event_type for e in source_log.audit_log][-1] is AuditEventType.MIGRATION_FAILED
    pending = recovery.get_pending()
    assert len(pending) == 1 and pending[0].error_type.name == "INCOMPATIBLE_TARGET"


class _Corrupting(InProcessChannel):
    """Flips one payload byte of the chunk numbered ``bad``."""

    def __init__(self, session: ReceiverSession, bad: Callable[[Chunk], bool]) -> None:
        super().__init__(session)
        self.bad = bad

    def send_chunk(self, chunk: Chunk) -> None:
        if self.bad(chunk) and len(chunk.payload):
            payload = bytearray(chunk.payload)
            payload[len(payload) // 2] ^= 0x40
            chunk = Chunk(chunk.seq, chunk.round, chunk.size, chunk.indices, chunk.encoding, bytes(payload),
                          chunk.raw_len, chunk.digest, chunk.pages)
        super().send_chunk(chunk)


def test_damaged_final_round_resumes_the_source_and_leaves_the_target_unchanged() -> None:
    state = np.random.default_rng(3).integers(0, 256, 4 * MIB, dtype=np.uint8)
    writer = Writer(state)
    target = BufferTarget()
    source_v, target_v = MigrationValidator(), MigrationValidator()
    session = ReceiverSession(MemoryStore(), target, validator=target_v)

    def pause() -> None:
        writer.pause()
        state[5] ^= 1  # the final round surely carries a page

    with pytest.raises(CorruptDataError, match="digest mismatch"):
        LiveMigration(
            BufferSource(state, pause=pause, resume=writer.resume),
            _Corrupting(session, lambda c: writer.paused.is_set() and len(c.indices) > 0),
            max_rounds=2,
            downtime_limit=1e-9,
            validator=source_v,
        ).run()
    assert writer.resumed == 1  # paused for the final round, resumed on failure
    assert target.state is None and not target.resumed
    src = [(e.event_type, e.success) for e in source_v.audit_log]
    assert (AuditEventType.ROLLBACK_COMPLETED, True) in src and src[-1] == (AuditEventType.MIGRATION_FAILED, False)
    tgt = [e.event_type for e in target_v.audit_log]
    assert tgt[-3:] == [AuditEventType.ROLLBACK_STARTED, AuditEventType.ROLLBACK_COMPLETED, AuditEventType.MIGRATION_FAILED]
    writer.pause()


def test_a_target_that_cannot_adopt_fails_the_migration_and_the_source_resumes() -> None:
    state = bytearray(range(256)) * 64
    resumed: List[int] = []

    def refuse(view: memoryview, extra: bytes) -> None:
        raise RuntimeError("no room")

    with pytest.raises(MigrationFailedError, match="could not adopt the state: no room"):
        LiveMigration(BufferSource(state, resume=lambda: resumed.append(1)), _channel(BufferTarget(on_adopt=refuse))).run()
    assert resumed == [1]


def test_empty_state() -> None:
    target = BufferTarget()
    summary = LiveMigration(BufferSource(bytearray()), _channel(target)).run()
    assert target.state == bytearray() and summary.state_size == 0 and summary.transfer_ratio == 0.0


class _GoneSink(SqliteAuditSink):
    """A sink whose far end went away (a remote audit service): append raises."""

    gone = False

    def append(self, entry):  # type: ignore[no-untyped-def]
        if self.gone:
            raise ConnectionResetError("audit service gone")
        return super().append(entry)


@pytest.mark.parametrize("failure", ["sqlite_locked", "sink_gone"])
def test_a_failing_audit_sink_cannot_leave_the_source_paused(tmp_path, failure: str) -> None:  # type: ignore[no-untyped-def]
    """The target refuses the commit while the source is paused, and from the pause on
    every audit write fails (the SQLite file locked by another process's writer, or a
    remote sink gone): the source still resumes, and the target's refusal is the error."""
    path = tmp_path / "audit.db"
    sink = (_GoneSink if failure == "sink_gone" else SqliteAuditSink)(path, timeout=0.05)
    blocker = sqlite3.connect(path, isolation_level=None)
    events: List[str] = []

    def pause() -> None:
        events.append("pause")
        if failure == "sink_gone":
            sink.gone = True  # type: ignore[attr-defined]
        else:
            blocker.execute("BEGIN EXCLUSIVE")  # another writer holds the database

    def refuse(view: memoryview, extra: bytes) -> None:
        raise RuntimeError("no room")

    state = bytearray(range(256)) * 64
    source = BufferSource(state, pause=pause, resume=lambda: events.append("resume"))
    validator = MigrationValidator(sink=sink)
    try:
        with pytest.raises(MigrationFailedError, match="could not adopt the state: no room") as info:
            LiveMigration(source, _channel(BufferTarget(on_adopt=refuse)), validator=validator).run()
    finally:
        if failure == "sqlite_locked":
            blocker.execute("ROLLBACK")
        blocker.close()
    assert events == ["pause", "resume"]
    notes = getattr(info.value, "__notes__", [])
    assert notes and all("the audit log failed too" in n for n in notes)
    assert (AuditStoreError if failure == "sqlite_locked" else ConnectionResetError).__name__ in notes[0]
    # nothing after the pause reached the log, and nothing half-written either
    assert [e.event_type for e in validator.audit_log][-1] == AuditEventType.TRANSFER_STARTED
    sink.close()


def test_an_interrupt_during_the_commit_leaves_the_source_paused() -> None:
    """Ctrl-C (not an Exception) while waiting for the commit's answer: the target may run
    the agent already, so the source is not resumed and the audit log says why."""

    class Interrupted(InProcessChannel):
        def commit(self, digest: bytes, extra: bytes) -> None:
            super().commit(digest, extra)  # the target adopted and resumed...
            raise KeyboardInterrupt  # ...and the answer never came back

    target = BufferTarget()
    resumed: List[int] = []
    validator = MigrationValidator()
    state = bytearray(range(256)) * 64
    channel = Interrupted(ReceiverSession(MemoryStore(), target))
    with pytest.raises(KeyboardInterrupt):
        LiveMigration(BufferSource(state, resume=lambda: resumed.append(1)), channel, validator=validator).run()
    assert target.resumed and target.state == state
    assert resumed == []
    last = validator.audit_log.entries()[-2]
    assert last.event_type == AuditEventType.ROLLBACK_COMPLETED and "outcome of the commit is unknown" in last.details
