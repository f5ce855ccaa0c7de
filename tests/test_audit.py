"""Audit trail: entries, the capacity ring, every helper's text, queries, JSON round trip,
and thread safety (in a subprocess with a timeout)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
import uuid
from typing import Any, Dict, List

import pytest

import cellmigrate
from cellmigrate import (
    AuditEntry,
    AuditEventType,
    CompatibilityStatus,
    CorruptDataError,
    MigrationAuditLog,
    VerificationResult,
)

M1, M2 = uuid.UUID(int=1).bytes, uuid.UUID(int=2).bytes
A1, A2 = uuid.UUID(int=11).bytes, uuid.UUID(int=12).bytes
S, T = b"S" * 16, b"T" * 16


def entry(i: int, *, mid: bytes = M1, aid: bytes = A1, success: bool = True, ts: int = 1000,
          event: AuditEventType = AuditEventType.TRANSFER_STARTED) -> AuditEntry:
    return AuditEntry(mid, aid, event, ts, details=f"entry {i}", success=success)


# -- AuditEventType -----------------------------------------------------------------------


def test_event_types_in_crate_order() -> None:
    assert [t.name for t in AuditEventType] == [
        "MIGRATION_STARTED", "VALIDATION_COMPLETED", "SNAPSHOT_CAPTURED", "TRANSFER_STARTED",
        "TRANSFER_COMPLETED", "VERIFICATION_COMPLETED", "MIGRATION_COMPLETED", "MIGRATION_FAILED",
        "ROLLBACK_STARTED", "ROLLBACK_COMPLETED",
    ]


# -- AuditEntry ---------------------------------------------------------------------------


def test_entry_new_stamps_now() -> None:
    before = int(time.time())
    e = AuditEntry.new(M1, A1, AuditEventType.MIGRATION_STARTED, "hello", True)
    after = int(time.time())
    assert before <= e.timestamp <= after
    assert (e.migration_id, e.agent_id, e.event_type, e.details, e.success) == (
        M1, A1, AuditEventType.MIGRATION_STARTED, "hello", True)
    assert e.source_node is None and e.target_node is None


def test_entry_accepts_uuid_and_stores_bytes() -> None:
    e = AuditEntry.new(uuid.UUID(int=1), bytearray(A1), AuditEventType.MIGRATION_FAILED, "x", False)
    assert e.migration_id == M1 and type(e.migration_id) is bytes
    assert e.agent_id == A1 and type(e.agent_id) is bytes


def test_with_nodes_returns_new_entry_and_none_clears() -> None:
    e = AuditEntry.new(M1, A1, AuditEventType.TRANSFER_STARTED, "t", True)
    n = e.with_nodes(S, uuid.UUID(bytes=T))
    assert (n.source_node, n.target_node) == (S, T)
    assert e.source_node is None  # the original is unchanged
    cleared = n.with_nodes(None, T)
    assert (cleared.source_node, cleared.target_node) == (None, T)
    assert n == e.with_nodes(S, T) and n != e


def test_entry_equality_and_repr() -> None:
    a = entry(1)
    assert a == entry(1) and a != entry(2) and hash(a) == hash(entry(1))
    assert "AuditEntry(" in repr(a) and "TRANSFER_STARTED" in repr(a)
    with pytest.raises(AttributeError):
        a.details = "changed"  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs, exc",
    [
        ({"migration_id": b"short"}, ValueError),
        ({"agent_id": "0" * 32}, TypeError),
        ({"event_type": "MIGRATION_STARTED"}, TypeError),
        ({"timestamp": 1.5}, TypeError),
        ({"timestamp": True}, TypeError),
        ({"timestamp": 2**63}, ValueError),
        ({"details": None}, TypeError),
        ({"success": 1}, TypeError),
        ({"source_node": b"x" * 15}, ValueError),
    ],
)
def test_entry_bad_fields(kwargs: Dict[str, Any], exc: type) -> None:
    base = dict(migration_id=M1, agent_id=A1, event_type=AuditEventType.MIGRATION_STARTED,
                timestamp=1, details="d", success=True)
    base.update(kwargs)
    with pytest.raises(exc):
        AuditEntry(**base)  # type: ignore[arg-type]


def test_to_dict_is_json_safe_and_round_trips() -> None:
    e = AuditEntry.new(M1, A1, AuditEventType.ROLLBACK_COMPLETED, 'ünïcode "quoted"', False).with_nodes(S, None)
    d = e.to_dict()
    assert d == {
        "migration_id": M1.hex(), "agent_id": A1.hex(), "event_type": "ROLLBACK_COMPLETED",
        "timestamp": e.timestamp, "source_node": S.hex(), "target_node": None,
        "details": 'ünïcode "quoted"', "success": False,
    }
    assert AuditEntry.from_dict(json.loads(json.dumps(d))) == e
    for t in AuditEventType:
        x = AuditEntry(M2, A2, t, 5, T, S, "", True)
        assert AuditEntry.from_dict(x.to_dict()) == x


def test_from_dict_accepts_missing_nodes() -> None:
    d = entry(1).to_dict()
    del d["source_node"], d["target_node"]
    assert AuditEntry.from_dict(d) == entry(1)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.pop("details"), "'details' is missing"),
        (lambda d: d.update(event_type="EXPLODED"), "unknown audit event type"),
        (lambda d: d.update(event_type=3), "event_type"),
        (lambda d: d.update(migration_id="zz" * 16), "not hex"),
        (lambda d: d.update(agent_id="ab" * 8), "16 bytes"),
        (lambda d: d.update(agent_id=None), "missing or null"),
        (lambda d: d.update(timestamp="now"), "malformed"),
        (lambda d: d.update(success="yes"), "malformed"),
    ],
)
def test_from_dict_rejects_bad_input(mutate, message: str) -> None:  # type: ignore[no-untyped-def]
    d = entry(1).to_dict()
    mutate(d)
    with pytest.raises(CorruptDataError, match=message):
        AuditEntry.from_dict(d)


def test_from_dict_rejects_non_mapping() -> None:
    with pytest.raises(CorruptDataError):
        AuditEntry.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# -- capacity ring ------------------------------------------------------------------------


def test_default_capacity() -> None:
    log = MigrationAuditLog()
    assert log.capacity == 10000 and len(log) == 0 and log.is_empty()


def test_with_capacity_evicts_oldest_in_insertion_order() -> None:
    log = MigrationAuditLog.with_capacity(3)
    for i in range(5):
        log.log(entry(i))
    assert len(log) == 3
    assert [e.details for e in log] == ["entry 2", "entry 3", "entry 4"]


def test_default_capacity_eviction() -> None:
    log = MigrationAuditLog()
    for i in range(10_005):
        log.log(entry(i))
    assert len(log) == 10000
    assert log.entries()[0].details == "entry 5" and log.entries()[-1].details == "entry 10004"


def test_capacity_one() -> None:
    log = MigrationAuditLog.with_capacity(1)
    log.log(entry(0))
    log.log(entry(1))
    assert [e.details for e in log] == ["entry 1"]


@pytest.mark.parametrize("bad", [0, -1])
def test_capacity_below_one_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        MigrationAuditLog.with_capacity(bad)
    with pytest.raises(ValueError):
        MigrationAuditLog(bad)


def test_capacity_type_checked() -> None:
    with pytest.raises(TypeError):
        MigrationAuditLog.with_capacity(2.5)  # type: ignore[arg-type]


def test_clear_keeps_capacity() -> None:
    log = MigrationAuditLog.with_capacity(2)
    log.log(entry(0))
    log.clear()
    assert log.is_empty() and len(log) == 0 and log.capacity == 2
    for i in range(3):
        log.log(entry(i))
    assert [e.details for e in log] == ["entry 1", "entry 2"]


def test_log_rejects_non_entries() -> None:
    log = MigrationAuditLog()
    with pytest.raises(TypeError):
        log.log({"details": "x"})  # type: ignore[arg-type]
    assert log.is_empty()


def test_iteration_is_a_snapshot() -> None:
    log = MigrationAuditLog.with_capacity(10)
    log.log(entry(0))
    it = iter(log)
    log.log(entry(1))
    assert [e.details for e in it] == ["entry 0"]
    assert repr(log) == "MigrationAuditLog(len=2, capacity=10)"


# -- helpers ------------------------------------------------------------------------------


def only(log: MigrationAuditLog) -> AuditEntry:
    (e,) = list(log)
    return e


def test_log_start() -> None:
    log = MigrationAuditLog()
    log.log_start(M1, A1, S, T)
    e = only(log)
    assert (e.event_type, e.details, e.success, e.source_node, e.target_node) == (
        AuditEventType.MIGRATION_STARTED, "Migration initiated", True, S, T)
    log.clear()
    log.log_start(M1, A1)
    assert only(log).source_node is None and only(log).target_node is None


@pytest.mark.parametrize(
    "success, event", [(True, AuditEventType.MIGRATION_COMPLETED), (False, AuditEventType.MIGRATION_FAILED)]
)
def test_log_completion(success: bool, event: AuditEventType) -> None:
    log = MigrationAuditLog()
    log.log_completion(M1, A1, success, "the details")
    e = only(log)
    assert (e.event_type, e.details, e.success) == (event, "the details", success)


@pytest.mark.parametrize(
    "status, details, success",
    [
        (CompatibilityStatus.compatible(), "Compatibility check passed", True),
        (CompatibilityStatus.compatible_with_warnings(["a", "b"]),
         'Compatibility check passed with warnings: ["a", "b"]', True),
        (CompatibilityStatus.compatible_with_warnings(["Low memory headroom: only 5 bytes available after migration"]),
         'Compatibility check passed with warnings: ["Low memory headroom: only 5 bytes available after migration"]',
         True),
        (CompatibilityStatus.compatible_with_warnings([]), "Compatibility check passed with warnings: []", True),
        # Rust's Debug formatting escapes quotes, backslashes and control characters
        (CompatibilityStatus.compatible_with_warnings(['say "hi"', "a\\b", "l1\nl2\t\x01"]),
         'Compatibility check passed with warnings: ["say \\"hi\\"", "a\\\\b", "l1\\nl2\\t\\u{1}"]', True),
        # ... and every other non-printable (DEL, C1 controls, no-break space, soft hyphen)
        # and combining marks; printable non-ASCII stays as it is
        (CompatibilityStatus.compatible_with_warnings(["\x7f\x85\x9f\xa0\xad", "e\u0301 é ü"]),
         'Compatibility check passed with warnings: ["\\u{7f}\\u{85}\\u{9f}\\u{a0}\\u{ad}", "e\\u{301} é ü"]',
         True),
        (CompatibilityStatus.incompatible("Target does not support WASM feature: gc"),
         "Incompatible: Target does not support WASM feature: gc", False),
    ],
)
def test_log_validation(status: CompatibilityStatus, details: str, success: bool) -> None:
    log = MigrationAuditLog()
    log.log_validation(M1, A1, status)
    e = only(log)
    assert (e.event_type, e.details, e.success) == (AuditEventType.VALIDATION_COMPLETED, details, success)


def test_log_verification() -> None:
    log = MigrationAuditLog()
    log.log_verification(M1, A1, VerificationResult(True, True, True, True, ["Size verified: 3 bytes", "Checksum verified"]))
    log.log_verification(M1, A1, VerificationResult.failure("broken"))
    log.log_verification(M1, A1, VerificationResult(False, True, True, True, []))
    assert [(e.event_type, e.details, e.success) for e in log] == [
        (AuditEventType.VERIFICATION_COMPLETED, "Size verified: 3 bytes; Checksum verified", True),
        (AuditEventType.VERIFICATION_COMPLETED, "broken", False),
        (AuditEventType.VERIFICATION_COMPLETED, "", False),
    ]


def test_log_rollback() -> None:
    log = MigrationAuditLog()
    log.log_rollback(M1, A1, True, True, "Rollback initiated")
    log.log_rollback(M1, A1, False, True, "done")
    log.log_rollback(M1, A1, False, False, "failed")
    log.log_rollback(M1, A1, True, False, "could not start")
    assert [(e.event_type, e.details, e.success) for e in log] == [
        (AuditEventType.ROLLBACK_STARTED, "Rollback initiated", True),
        (AuditEventType.ROLLBACK_COMPLETED, "done", True),
        (AuditEventType.ROLLBACK_COMPLETED, "failed", False),
        (AuditEventType.ROLLBACK_STARTED, "could not start", False),
    ]


# -- queries ------------------------------------------------------------------------------


@pytest.fixture
def populated() -> MigrationAuditLog:
    log = MigrationAuditLog()
    log.log(entry(0, mid=M1, aid=A1, ts=100, event=AuditEventType.MIGRATION_STARTED))
    log.log(entry(1, mid=M2, aid=A2, ts=150, event=AuditEventType.MIGRATION_STARTED))
    log.log(entry(2, mid=M1, aid=A1, ts=200, success=False, event=AuditEventType.MIGRATION_FAILED))
    log.log(entry(3, mid=M2, aid=A1, ts=250, event=AuditEventType.TRANSFER_STARTED))
    log.log(entry(4, mid=M2, aid=A2, ts=300, success=False, event=AuditEventType.ROLLBACK_COMPLETED))
    return log


def names(entries: List[AuditEntry]) -> List[str]:
    return [e.details for e in entries]


def test_get_migration_entries(populated: MigrationAuditLog) -> None:
    assert names(populated.get_migration_entries(M1)) == ["entry 0", "entry 2"]
    assert names(populated.get_migration_entries(uuid.UUID(bytes=M2))) == ["entry 1", "entry 3", "entry 4"]
    assert populated.get_migration_entries(b"\xff" * 16) == []


def test_get_agent_entries(populated: MigrationAuditLog) -> None:
    assert names(populated.get_agent_entries(A1)) == ["entry 0", "entry 2", "entry 3"]
    assert names(populated.get_agent_entries(A2)) == ["entry 1", "entry 4"]


def test_get_entries_by_type(populated: MigrationAuditLog) -> None:
    assert names(populated.get_entries_by_type(AuditEventType.MIGRATION_STARTED)) == ["entry 0", "entry 1"]
    assert populated.get_entries_by_type(AuditEventType.SNAPSHOT_CAPTURED) == []
    with pytest.raises(TypeError):
        populated.get_entries_by_type("MIGRATION_STARTED")  # type: ignore[arg-type]


def test_get_failures_any_type(populated: MigrationAuditLog) -> None:
    assert names(populated.get_failures()) == ["entry 2", "entry 4"]


def test_get_entries_in_range_inclusive(populated: MigrationAuditLog) -> None:
    assert names(populated.get_entries_in_range(150, 250)) == ["entry 1", "entry 2", "entry 3"]
    assert names(populated.get_entries_in_range(200, 200)) == ["entry 2"]
    assert names(populated.get_entries_in_range(0, 10**12)) == [f"entry {i}" for i in range(5)]
    assert populated.get_entries_in_range(301, 400) == []
    assert populated.get_entries_in_range(250, 150) == []  # start > end


def test_queries_only_see_the_ring_without_a_sink() -> None:
    log = MigrationAuditLog.with_capacity(2)
    for i in range(4):
        log.log(entry(i, success=False))
    assert names(log.get_failures()) == ["entry 2", "entry 3"]
    assert names(log.all_entries()) == ["entry 2", "entry 3"]


def test_bad_query_ids() -> None:
    log = MigrationAuditLog()
    with pytest.raises(ValueError):
        log.get_migration_entries(b"123")
    with pytest.raises(TypeError):
        log.get_agent_entries(42)  # type: ignore[arg-type]


# -- JSON Lines on a memory-only log ------------------------------------------------------


def test_jsonl_round_trip_memory_log(populated: MigrationAuditLog, tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "audit.jsonl"
    assert populated.export_jsonl(path) == 5
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 and json.loads(lines[0])["event_type"] == "MIGRATION_STARTED"
    other = MigrationAuditLog()
    assert other.import_jsonl(path) == 5
    assert list(other) == list(populated)


def test_exported_everywhere() -> None:
    for name in ("AuditEventType", "AuditEntry", "MigrationAuditLog"):
        assert name in cellmigrate.__all__


# -- thread safety ------------------------------------------------------------------------

_THREADS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, uuid
    from cellmigrate import MigrationAuditLog, AuditEntry, AuditEventType

    THREADS, PER_THREAD, CAPACITY = 8, 2000, 5000
    log = MigrationAuditLog.with_capacity(CAPACITY)
    barrier = threading.Barrier(THREADS + 1)
    errors = []
    observed_lengths = []

    def writer(t):
        mid = uuid.UUID(int=t).bytes
        barrier.wait()
        try:
            for i in range(PER_THREAD):
                if i % 2:
                    log.log_completion(mid, mid, i % 3 != 0, f"{t}:{i}")
                else:
                    log.log(AuditEntry(mid, mid, AuditEventType.TRANSFER_STARTED, i, details=f"{t}:{i}"))
        except Exception as exc:
            errors.append(repr(exc))

    def reader():
        barrier.wait()
        try:
            for _ in range(300):
                observed_lengths.append(len(log))
                n = sum(1 for _ in log)
                assert n <= CAPACITY
                log.get_failures(); log.get_migration_entries(uuid.UUID(int=3).bytes)
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(THREADS)]
    threads.append(threading.Thread(target=reader))
    sys.setswitchinterval(1e-5)   # switch threads as often as possible to provoke races
    for th in threads: th.start()
    for th in threads: th.join()
    assert not errors, errors
    assert len(log) == CAPACITY, len(log)
    assert all(n <= CAPACITY for n in observed_lengths)
    # Per thread, the surviving entries are in that thread's own order (no reordering/loss
    # inside the ring): the ring holds the last CAPACITY appends.
    for t in range(THREADS):
        seq = [int(e.details.split(":")[1]) for e in log if e.details.startswith(f"{t}:")]
        assert seq == sorted(seq) and len(set(seq)) == len(seq), t
        if seq:
            assert seq == list(range(seq[0], PER_THREAD)), (t, seq[:5])
    print("OK", len(log))
    """
)


def test_concurrent_logging_in_subprocess() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _THREADS_SCRIPT],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK 5000"


def test_details_must_be_encodable_text() -> None:
    with pytest.raises(ValueError, match="surrogate"):
        AuditEntry.new(M1, A1, AuditEventType.MIGRATION_STARTED, "bad \ud800 text", True)
    # NUL and non-ASCII characters are fine
    assert AuditEntry.new(M1, A1, AuditEventType.MIGRATION_STARTED, "a\x00b ✓", True).details == "a\x00b ✓"


def test_documented_examples_hold() -> None:
    import doctest

    import cellmigrate.audit
    import cellmigrate.audit_store
    import cellmigrate.validation

    for module in (cellmigrate.audit, cellmigrate.audit_store, cellmigrate.validation):
        failed, attempted = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert attempted > 0 and failed == 0, module.__name__
