"""User code calling the public API, as a user would write it: checked with ``mypy --strict``
by ``tests/test_typing.py`` (and executed by it too, so the snippet is real code).

The annotations on the left-hand sides pin the return types users rely on; if the
library's hints drift (a return type becomes ``Any`` or changes), mypy --strict fails.
"""

from __future__ import annotations

import mmap
import tempfile
import uuid
from typing import List, Optional, Tuple

import numpy as np

import cellmigrate
from cellmigrate import (
    PAGE_SIZE,
    Agent,
    AgentRequirements,
    AuditEntry,
    AuditEventType,
    BufferLike,
    CollectingCallback,
    CompatibilityStatus,
    CompressionMethod,
    CorruptDataError,
    DeltaSnapshot,
    DirtyPage,
    DirtyPageTracker,
    IncrementalMigrator,
    IndexLike,
    InvalidStateError,
    MigrationAuditLog,
    MigrationError,
    MigrationErrorType,
    MigrationPhase,
    MigrationProgressEvent,
    MigrationProgressTracker,
    MigrationRecoveryManager,
    MigrationStats,
    MigrationValidator,
    MultiCallback,
    NodeCapabilities,
    RecoveryConfig,
    RecoveryStrategy,
    RollbackInfo,
    StateVerifier,
    VerificationResult,
    adaptive_compress,
    adaptive_decompress,
    digest,
    dirty_pages,
    first_difference,
    simple_checksum,
    simple_compress,
    simple_decompress,
)


def migrate(source: bytearray, target: bytearray) -> Tuple[bool, List[str]]:
    """A whole migration with the validator: check, snapshot, delta, apply, verify."""
    agent = Agent(b"\x00asm", agent_id=uuid.UUID(int=1))
    agent_uuid: uuid.UUID = agent.id
    migration_id: bytes = uuid.uuid4().bytes
    validator = MigrationValidator()
    requirements = AgentRequirements(architecture="x86_64", required_memory=len(source),
                                     state_size=len(source), version="0.1.0")
    status: CompatibilityStatus = validator.validate_pre_migration(
        migration_id, agent, requirements, NodeCapabilities.new())
    if not status.can_proceed():
        reason: Optional[str] = status.reason
        return False, [reason or ""]
    warnings: List[str] = status.warnings()
    validator.capture_rollback_info(migration_id, agent, source)

    old = bytes(target)
    source[10] ^= 0xFF
    delta = DeltaSnapshot.create(agent_uuid.bytes, old, source, base_sequence=1, sequence=2)
    count: int = delta.dirty_page_count()
    ratio: float = delta.compression_ratio()
    wire: bytes = delta.serialize()
    received = DeltaSnapshot.deserialize(wire)
    try:
        received.apply(target)
    except InvalidStateError as exc:
        info: RollbackInfo = validator.execute_rollback(migration_id)
        restored: int = info.restore_into(source)
        return False, [str(exc), str(restored)]
    result: VerificationResult = validator.verify_post_migration(migration_id, agent_uuid.bytes, source, target)
    validator.complete_migration(migration_id, result.passed, "; ".join(result.details))
    log: MigrationAuditLog = validator.audit_log
    entries: List[AuditEntry] = log.get_migration_entries(migration_id)
    kinds: List[AuditEventType] = [e.event_type for e in entries]
    assert kinds[0] is AuditEventType.VALIDATION_COMPLETED and count == 1 and 0 < ratio <= 1
    return result.passed, warnings + result.details


def kernels_and_compression() -> None:
    state = bytes(range(256)) * 64
    other = bytearray(state)
    other[5000] = 0
    weak: int = simple_checksum(state)
    strong: bytes = digest(state, "blake3", key=b"k" * 32)
    where: Optional[int] = first_difference(state, other)
    pages = dirty_pages(state, other)
    first_page: int = int(pages[0])
    packed: bytes = simple_compress(state)
    assert simple_decompress(packed, max_output=len(state)) == state
    payload, method = adaptive_compress(state)
    chosen: CompressionMethod = method
    assert adaptive_decompress(payload, chosen) == state
    arr = np.frombuffer(state, dtype=np.uint8)
    assert simple_checksum(arr) == weak and where == 5000 and first_page == 1 and len(strong) == 32
    with tempfile.TemporaryFile() as fh:
        fh.write(state)
        fh.flush()
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            assert digest(mapped) == digest(state)
    try:
        simple_decompress(b"\xff")
    except CorruptDataError:
        pass
    page = DirtyPage(0, bytes(PAGE_SIZE))
    page.compress()
    data: bytes = page.get_data()
    assert data == bytes(PAGE_SIZE)


def checksum_of(state: BufferLike) -> int:
    """User code that accepts what cellmigrate accepts, typed with the public alias."""
    return simple_checksum(state)


def every_buffer_kind() -> None:
    """bytes, bytearray, memoryview, mmap and numpy arrays are all BufferLike to mypy."""
    n = 2 * PAGE_SIZE
    old = bytes(n)
    new = bytearray(old)
    new[PAGE_SIZE + 7] = 1
    view = memoryview(new)
    words = np.frombuffer(bytes(new), dtype=np.uint32)   # any dtype: read as its bytes
    with tempfile.TemporaryFile() as fh:
        fh.write(new)
        fh.flush()
        with mmap.mmap(fh.fileno(), 0) as mapped:       # writable mapping
            sums: List[int] = [checksum_of(b) for b in (bytes(new), new, view, mapped, words)]
            assert len(set(sums)) == 1
            assert digest(mapped) == digest(words) == digest(view)
            assert first_difference(old, mapped) == PAGE_SIZE + 7
            changed: IndexLike = dirty_pages(np.zeros(n, dtype=np.uint8), view)
            assert list(changed) == [1]
            assert StateVerifier.verify_state(new, mapped, sums[0]).passed
            for base_kind in (old, np.zeros(n // 8, dtype=np.float64)):   # bytes or numpy
                delta = DeltaSnapshot.create(bytes(16), base_kind, mapped, 1, 2)
                assert delta.dirty_page_count() == 1
            assert simple_decompress(memoryview(simple_compress(mapped)), max_output=n) == bytes(new)

            # Targets: any writable buffer.
            array_target = np.zeros(n, dtype=np.uint8)
            delta.apply(array_target)
            delta.apply(bytearray(old))
            mapped[:] = old
            delta.apply(mapped)
            assert mapped[:] == array_target.tobytes() == bytes(new)
            point = RollbackInfo.capture(Agent(), words)
            restored: int = point.restore_into(memoryview(bytearray(n)))
            assert restored == n and RollbackInfo.deserialize(memoryview(point.serialize())) == point


def tracking_recovery_progress() -> None:
    aid = uuid.UUID(int=2).bytes
    tracker = DirtyPageTracker(aid, 4 * PAGE_SIZE)
    tracker.initialize(bytes(4 * PAGE_SIZE))
    tracker.mark_range_dirty(100, 5000)
    dirty: int = tracker.dirty_count()
    seq: int = tracker.sequence
    migrator = IncrementalMigrator()
    migrator.start_tracking(aid, bytes(4 * PAGE_SIZE))
    delta: DeltaSnapshot = migrator.create_incremental(aid, b"\x01" + bytes(4 * PAGE_SIZE - 1))
    stats: MigrationStats = migrator.stats
    sequence: Optional[int] = migrator.get_sequence(aid)
    assert dirty == 2 and seq == 1 and delta.dirty_page_count() == 1 and sequence is not None
    assert stats.incremental_migrations == 1

    manager = MigrationRecoveryManager(RecoveryConfig())
    manager.record_failure(MigrationError.new(MigrationErrorType.TIMEOUT, "slow", aid))
    strategy: RecoveryStrategy = manager.execute_recovery(aid)
    when: Optional[int] = manager.next_retry_time(aid)
    assert strategy is RecoveryStrategy.RETRY_ON_SAME_TARGET and when is not None

    collected = CollectingCallback()
    seen: List[MigrationProgressEvent] = []
    progress = MigrationProgressTracker(aid, 100, MultiCallback(collected, seen.append))
    progress.update_transfer_progress(50)
    percent: int = progress.progress_percent()
    phase: MigrationPhase = progress.phase
    latest: Optional[MigrationProgressEvent] = collected.latest_event()
    assert percent == 50 and phase is MigrationPhase.TRANSFERRING and latest is not None and seen


if __name__ == "__main__":
    ok, details = migrate(bytearray(3 * PAGE_SIZE), bytearray(3 * PAGE_SIZE))
    assert ok, details
    kernels_and_compression()
    every_buffer_kind()
    tracking_recovery_progress()
    print(f"typing snippet ran against cellmigrate {cellmigrate.__version__}")
