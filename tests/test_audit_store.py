"""Durable audit sink (SQLite) and JSON Lines export/import."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import List, Literal, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import (
    AuditEntry,
    AuditEventType,
    AuditSink,
    CorruptDataError,
    MigrationAuditLog,
    MigrationValidator,
    SqliteAuditSink,
    export_jsonl,
    import_jsonl,
)
from cellmigrate.audit_store import SCHEMA_VERSION

M1, M2 = uuid.UUID(int=1).bytes, uuid.UUID(int=2).bytes
A1, A2 = uuid.UUID(int=11).bytes, uuid.UUID(int=12).bytes


def names(entries: List[AuditEntry]) -> List[str]:
    return [e.details for e in entries]


def entry(i: int, *, mid: bytes = M1, aid: bytes = A1, success: bool = True, ts: int = 1000,
          event: AuditEventType = AuditEventType.TRANSFER_COMPLETED) -> AuditEntry:
    return AuditEntry(mid, aid, event, ts, source_node=b"s" * 16 if i % 2 else None,
                      details=f"entry {i}", success=success)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "audit.db"


def test_sink_satisfies_protocol(db: Path) -> None:
    with SqliteAuditSink(db) as sink:
        assert isinstance(sink, AuditSink)
        assert "SqliteAuditSink(" in repr(sink) and "open" in repr(sink)
    assert "closed" in repr(sink)


def test_schema_wal_and_indexes(db: Path) -> None:
    SqliteAuditSink(db).close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = {r[1]: r[2] for r in conn.execute("SELECT type, name, tbl_name FROM sqlite_master WHERE type='index'")}
        assert {"audit_by_migration", "audit_by_agent"} <= set(indexes)
        # index_info rows are (seqno, cid, column name); the id is the leading column
        assert [r[2] for r in conn.execute("PRAGMA index_info(audit_by_migration)")][0] == "migration_id"
        assert [r[2] for r in conn.execute("PRAGMA index_info(audit_by_agent)")][0] == "agent_id"
        # the query planner uses them
        plan = " ".join(str(r) for r in conn.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM audit_entries WHERE agent_id = ? ORDER BY seq", (A1,)))
        assert "audit_by_agent" in plan
    finally:
        conn.close()


def test_one_row_per_entry_committed_before_return(db: Path) -> None:
    sink = SqliteAuditSink(db)
    log = MigrationAuditLog(sink=sink)
    for i in range(3):
        log.log(entry(i))
        # a second, independent connection sees the row as soon as log() returned
        other = sqlite3.connect(db)
        try:
            assert other.execute("SELECT count(*) FROM audit_entries").fetchone()[0] == i + 1
        finally:
            other.close()
    sink.close()


def test_round_trip_of_every_field(db: Path) -> None:
    entries = [
        AuditEntry(M1, A1, t, 10 + n, source_node=b"s" * 16 if n % 2 else None,
                   target_node=b"t" * 16 if n % 3 else None, details=f"déjà {n} \"q\"", success=n % 2 == 0)
        for n, t in enumerate(AuditEventType)
    ]
    with SqliteAuditSink(db) as sink:
        for e in entries:
            sink.append(e)
    with SqliteAuditSink(db) as sink:
        assert sink.query() == entries
        assert sink.count() == len(entries)


def test_append_returns_increasing_sequence_numbers() -> None:
    with SqliteAuditSink(":memory:") as sink:
        seqs = [sink.append(entry(i)) for i in range(5)]
        assert seqs == sorted(seqs) and len(set(seqs)) == 5


def test_queries_find_entries_evicted_from_the_ring(db: Path) -> None:
    log = MigrationAuditLog.with_capacity(2, sink=SqliteAuditSink(db))
    log.log(entry(0, mid=M1, aid=A1, ts=100, success=False, event=AuditEventType.MIGRATION_FAILED))
    log.log(entry(1, mid=M2, aid=A2, ts=200))
    log.log(entry(2, mid=M1, aid=A2, ts=300))
    log.log(entry(3, mid=M2, aid=A1, ts=400, success=False, event=AuditEventType.ROLLBACK_COMPLETED))
    assert len(log) == 2 and [e.details for e in log] == ["entry 2", "entry 3"]
    assert names(log.get_migration_entries(M1)) == ["entry 0", "entry 2"]
    assert names(log.get_agent_entries(A1)) == ["entry 0", "entry 3"]
    assert names(log.get_entries_by_type(AuditEventType.MIGRATION_FAILED)) == ["entry 0"]
    assert names(log.get_failures()) == ["entry 0", "entry 3"]
    assert names(log.get_entries_in_range(100, 300)) == ["entry 0", "entry 1", "entry 2"]
    assert names(log.get_entries_in_range(200, 200)) == ["entry 1"]
    assert log.get_entries_in_range(300, 200) == []
    assert names(log.all_entries()) == [f"entry {i}" for i in range(4)]
    # clear() frees memory only: the durable record is append-only
    log.clear()
    assert log.is_empty() and len(log.get_failures()) == 2
    log.sink.close()  # type: ignore[union-attr]


def test_reopen_reads_back_and_fills_the_ring(db: Path) -> None:
    with SqliteAuditSink(db) as sink:
        log = MigrationAuditLog(sink=sink)
        for i in range(7):
            log.log_completion(M1, A1, i % 2 == 0, f"run {i}")
    with SqliteAuditSink(db) as sink:
        reopened = MigrationAuditLog.with_capacity(3, sink=sink)
        assert [e.details for e in reopened] == ["run 4", "run 5", "run 6"]
        assert len(reopened.get_migration_entries(M1)) == 7
        reopened.log_start(M2, A2)  # continues appending after the old entries
        assert [e.event_type for e in sink.query()][-1] is AuditEventType.MIGRATION_STARTED
        assert sink.count() == 8
        assert sink.integrity_check() == "ok"


def test_recent() -> None:
    with SqliteAuditSink(":memory:") as sink:
        for i in range(5):
            sink.append(entry(i))
        assert [e.details for e in sink.recent(2)] == ["entry 3", "entry 4"]
        assert len(sink.recent(100)) == 5 and sink.recent(0) == []


def test_append_many_is_all_or_nothing(db: Path) -> None:
    with SqliteAuditSink(db) as sink:
        sink.append_many([entry(0), entry(1)])
        assert sink.count() == 2
        # A row the schema refuses (bad id length smuggled past AuditEntry) aborts the batch.
        bad = entry(9)
        object.__setattr__(bad, "migration_id", b"short")
        with pytest.raises(sqlite3.IntegrityError):
            sink.append_many([entry(2), bad])
        assert sink.count() == 2


def test_failed_persist_does_not_reach_memory(db: Path) -> None:
    sink = SqliteAuditSink(db)
    log = MigrationAuditLog(sink=sink)
    log.log(entry(0))
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        log.log(entry(1))
    assert [e.details for e in log] == ["entry 0"]


def test_closed_sink_and_bad_options(db: Path) -> None:
    sink = SqliteAuditSink(db)
    sink.close()
    sink.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        sink.count()
    for bad in ("SOMETIMES", None, 2):
        with pytest.raises(ValueError, match="synchronous"):
            SqliteAuditSink(db, synchronous=bad)  # type: ignore[arg-type]
    with SqliteAuditSink(db, synchronous="normal") as fast:
        fast.append(entry(0))
        assert fast.count() == 1


def test_not_a_database_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(CorruptDataError, match="not a usable audit database"):
        SqliteAuditSink(junk)


def test_future_schema_version_is_refused(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(CorruptDataError, match="schema version"):
        SqliteAuditSink(db)


def test_unknown_event_type_in_database(db: Path) -> None:
    with SqliteAuditSink(db) as sink:
        sink.append(entry(0))
    conn = sqlite3.connect(db)
    conn.execute("UPDATE audit_entries SET event_type = 'BOGUS'")
    conn.commit()
    conn.close()
    with SqliteAuditSink(db) as sink:
        with pytest.raises(CorruptDataError, match="unknown event type"):
            sink.query()


def test_two_processes_share_one_database(db: Path) -> None:
    with SqliteAuditSink(db) as sink:
        sink.append(entry(0))
        script = textwrap.dedent(
            f"""
            import uuid
            from cellmigrate import MigrationAuditLog, SqliteAuditSink
            with SqliteAuditSink({str(db)!r}) as sink:
                log = MigrationAuditLog(sink=sink)
                for i in range(20):
                    log.log_start(uuid.UUID(int=5), uuid.UUID(int=6))
            """
        )
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert sink.count() == 21
        assert len(sink.query(migration_id=uuid.UUID(int=5).bytes)) == 20


def test_validator_writes_through_to_the_database(db: Path) -> None:
    from cellmigrate import Agent

    agent = Agent(agent_id=uuid.UUID(int=77))
    with SqliteAuditSink(db) as sink:
        v = MigrationValidator(sink=sink)
        v.capture_rollback_info(M1, agent, b"0123456789")
        v.complete_migration(M1, False, "link down")
    with SqliteAuditSink(db) as sink:
        assert [(e.event_type, e.details, e.success) for e in sink.query(agent_id=agent.id.bytes)] == [
            (AuditEventType.SNAPSHOT_CAPTURED, "Rollback info captured: 10 bytes", True),
            (AuditEventType.MIGRATION_FAILED, "link down", False),
        ]


# -- JSON Lines ---------------------------------------------------------------------------


def test_jsonl_path_round_trip(tmp_path: Path) -> None:
    entries = [entry(i, success=i % 3 != 0) for i in range(10)]
    path = tmp_path / "out.jsonl"
    assert export_jsonl(entries, path) == 10
    assert import_jsonl(path) == entries
    assert import_jsonl(str(path)) == entries
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert first["migration_id"] == M1.hex() and first["event_type"] == "TRANSFER_COMPLETED"
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file was renamed away


def test_jsonl_file_objects_and_blank_lines() -> None:
    buf = io.StringIO()
    export_jsonl([entry(1), entry(2)], buf)
    text = "\n" + buf.getvalue() + "\n   \n"
    assert import_jsonl(io.StringIO(text)) == [entry(1), entry(2)]
    assert import_jsonl(text.encode("utf-8")) == [entry(1), entry(2)]
    assert import_jsonl(io.BytesIO(text.encode("utf-8"))) == [entry(1), entry(2)]


def test_jsonl_bad_lines_name_the_line() -> None:
    good = json.dumps(entry(0).to_dict())
    with pytest.raises(CorruptDataError, match="line 2: not JSON"):
        import_jsonl(io.StringIO(good + "\n{oops\n"))
    with pytest.raises(CorruptDataError, match="line 3: .*'success' is missing"):
        bad = entry(0).to_dict()
        del bad["success"]
        import_jsonl(io.StringIO(good + "\n\n" + json.dumps(bad) + "\n"))


@pytest.mark.parametrize("bad", [b"[" * 5000 + b"]" * 5000, b'{"a": ' * 5000 + b"1" + b"}" * 5000,
                                 b'{"details": "\xff\xfe"}', b"\xc3"])
def test_jsonl_lines_nested_too_deeply_or_not_utf8_are_corrupt_data(bad: bytes, tmp_path: Path) -> None:
    good = json.dumps(entry(0).to_dict()).encode()
    data = good + b"\n" + bad + b"\n" + good + b"\n"
    path = tmp_path / "bad.jsonl"
    path.write_bytes(data)
    for source in (data, path, io.BytesIO(data)):
        with pytest.raises(CorruptDataError, match="line 2: not JSON"):
            import_jsonl(source)
    # A text stream decodes ahead of its lines: the error names where it noticed.
    with pytest.raises(CorruptDataError, match="not (JSON|UTF-8)"):
        import_jsonl(io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def test_log_export_and_import_through_sinks(tmp_path: Path) -> None:
    src = MigrationAuditLog.with_capacity(2, sink=SqliteAuditSink(tmp_path / "a.db"))
    for i in range(5):
        src.log(entry(i))
    path = tmp_path / "trail.jsonl"
    assert src.export_jsonl(path) == 5  # the whole durable record, not only the ring
    dst_sink = SqliteAuditSink(tmp_path / "b.db")
    dst = MigrationAuditLog.with_capacity(3, sink=dst_sink)
    assert dst.import_jsonl(path) == 5
    assert dst_sink.query() == src.all_entries()
    assert [e.details for e in dst] == ["entry 2", "entry 3", "entry 4"]
    # a malformed file imports nothing
    path.write_text(path.read_text() + "garbage\n")
    with pytest.raises(CorruptDataError, match="line 6"):
        dst.import_jsonl(path)
    assert dst_sink.count() == 5
    src.sink.close()  # type: ignore[union-attr]
    dst_sink.close()


_THREADED_SINK_SCRIPT = textwrap.dedent(
    """
    import sys, threading, uuid
    from cellmigrate import MigrationAuditLog, SqliteAuditSink

    path = sys.argv[1]
    THREADS, PER_THREAD = 8, 150
    sink = SqliteAuditSink(path, synchronous="NORMAL")
    log = MigrationAuditLog.with_capacity(100, sink=sink)
    barrier = threading.Barrier(THREADS)
    errors = []

    def worker(t):
        mid = uuid.UUID(int=t).bytes
        barrier.wait()
        try:
            for i in range(PER_THREAD):
                log.log_completion(mid, mid, i % 5 != 0, f"{t}:{i}")
                if i % 10 == 0:
                    log.get_migration_entries(mid); len(log); list(log)
        except Exception as exc:
            errors.append(repr(exc))

    sys.setswitchinterval(1e-5)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads: th.start()
    for th in threads: th.join()
    assert not errors, errors
    assert sink.count() == THREADS * PER_THREAD
    for t in range(THREADS):
        got = [e.details for e in log.get_migration_entries(uuid.UUID(int=t))]
        assert got == [f"{t}:{i}" for i in range(PER_THREAD)], t
    assert len(log.get_failures()) == THREADS * PER_THREAD // 5
    assert len(log) == 100 and sink.integrity_check() == "ok"
    print("OK")
    """
)


def test_concurrent_logging_through_a_sink(db: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _THREADED_SINK_SCRIPT, str(db)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


def test_missing_directory_is_an_os_level_error(tmp_path: Path) -> None:
    with pytest.raises(sqlite3.OperationalError):
        SqliteAuditSink(tmp_path / "no" / "such" / "dir" / "audit.db")


# -- properties ---------------------------------------------------------------------------


_ids = st.binary(min_size=16, max_size=16)
_NO_SURROGATES: Tuple[Literal["Cs"]] = ("Cs",)  # lone surrogates are not text (refused by AuditEntry)
_entries = st.builds(
    AuditEntry,
    migration_id=_ids,
    agent_id=_ids,
    event_type=st.sampled_from(list(AuditEventType)),
    timestamp=st.integers(-(2**63), 2**63 - 1),
    source_node=st.none() | _ids,
    target_node=st.none() | _ids,
    details=st.text(st.characters(blacklist_categories=_NO_SURROGATES)),
    success=st.booleans(),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_entries, max_size=8))
def test_every_entry_survives_sqlite_and_jsonl(entries: List[AuditEntry]) -> None:
    with SqliteAuditSink(":memory:") as sink:
        sink.append_many(entries[: len(entries) // 2])
        for e in entries[len(entries) // 2:]:
            sink.append(e)
        assert sink.query() == entries
        buf = io.StringIO()
        export_jsonl(sink.query(), buf)
        assert import_jsonl(io.StringIO(buf.getvalue())) == entries
        for e in entries:
            assert e in sink.query(migration_id=e.migration_id, agent_id=e.agent_id, event_type=e.event_type)


def test_log_accepts_a_database_path_and_closes_its_sink(tmp_path: Path) -> None:
    path = tmp_path / "by-path.db"
    with MigrationAuditLog(sink=path) as log:
        assert isinstance(log.sink, SqliteAuditSink)
        log.log_start(M1, A1)
    with pytest.raises(ValueError, match="closed"):
        log.log_start(M1, A1)  # the context manager closed the sink
    assert [e.details for e in log] == ["Migration initiated"]  # memory stays readable
    with MigrationAuditLog.with_capacity(5, sink=str(path)) as again:
        assert len(again) == 1 and again.sink.count() == 1  # type: ignore[union-attr]
    v = MigrationValidator(sink=path)
    v.audit_log.log_completion(M1, A1, True, "done")
    v.audit_log.close()
    with SqliteAuditSink(path) as sink:
        assert sink.count() == 2


def test_log_refuses_a_non_sink() -> None:
    with pytest.raises(TypeError, match="AuditSink"):
        MigrationAuditLog(sink=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="AuditSink"):
        MigrationAuditLog(sink=[])  # type: ignore[arg-type]


# -- what an independent review found: fork, malformed rows and lines, range bounds ------------


def test_a_forked_child_keeps_its_entries(tmp_path: Path) -> None:
    """A log opened before ``fork()`` and written in the child: SQLite forbids using the
    inherited connection, and the child's entries were lost when the parent closed its
    own. The child now opens its own connection: every entry is in the file."""
    import os

    path = tmp_path / "audit.db"
    log = MigrationAuditLog(sink=path)
    log.log_start(M1, A1)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: wait for the parent to close, then write
        code = 1
        try:
            os.close(write_end)
            os.read(read_end, 1)
            for i in range(5):
                log.log_completion(M1, A1, True, f"child entry {i}")
            code = 0 if log.sink is not None and log.sink.count() == 6 else 3
        finally:
            os._exit(code)
    os.close(read_end)
    log.close()
    os.write(write_end, b"x")
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    with SqliteAuditSink(path) as sink:
        assert sink.count() == 6 and sink.integrity_check() == "ok"
        assert [e.details for e in sink.recent(5)] == [f"child entry {i}" for i in range(5)]


def test_a_forked_child_closing_an_unused_sink_leaves_the_inherited_connection_alone(tmp_path: Path) -> None:
    """SQLite forbids even closing, in a child, a connection opened before fork(): the
    child's close() sets it aside; the parent's connection goes on working."""
    import os

    from cellmigrate import audit_store

    sink = SqliteAuditSink(tmp_path / "audit.db")
    sink.append(entry(1))
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            before = len(audit_store._INHERITED)
            sink.close()
            code = 0 if len(audit_store._INHERITED) == before + 1 else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    sink.append(entry(2))
    assert sink.count() == 2 and sink.integrity_check() == "ok"
    sink.close()


def test_a_forked_child_that_changes_directory_keeps_the_same_database(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative path, reopened in a child after ``chdir`` (as daemons do), named a new
    database there: the trail was split without an error."""
    import os

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    log = MigrationAuditLog(sink="audit.db")
    log.log_start(M1, A1)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.chdir(tmp_path / "b")
            log.log_completion(M1, A1, True, "from the child")
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert log.sink is not None and log.sink.path == str(tmp_path / "a" / "audit.db")
    log.close()
    assert not (tmp_path / "b" / "audit.db").exists()
    with SqliteAuditSink(tmp_path / "a" / "audit.db") as sink:
        assert [e.details for e in sink.recent(5)][-1] == "from the child" and sink.count() == 2


@pytest.mark.parametrize("column,value", [("timestamp", "abc"), ("timestamp", 1.5), ("details", b"\x00\x01"),
                                          ("event_type", 7), ("migration_id", "sixteen chars!!!")])
def test_a_row_of_the_wrong_type_is_corrupt_data(tmp_path: Path, column: str, value: object) -> None:
    """SQLite's column affinity stores any type in any column: a row a foreign writer
    stored with a wrong type is a ``CorruptDataError`` on reading, and a log opened on such
    a file closes the sink it opened."""
    path = tmp_path / "audit.db"
    SqliteAuditSink(path).close()
    row = {"migration_id": M1, "agent_id": A1, "event_type": "MIGRATION_STARTED", "timestamp": 1,
           "source_node": None, "target_node": None, "details": "ok", "success": 1}
    row[column] = value
    with sqlite3.connect(path) as conn:
        conn.execute(f"INSERT INTO audit_entries ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                     list(row.values()))
    conn.close()
    with SqliteAuditSink(path) as sink:
        with pytest.raises(CorruptDataError):
            sink.recent(5)
    closed: List[SqliteAuditSink] = []
    real_close = SqliteAuditSink.close

    def noting_close(self: SqliteAuditSink) -> None:
        closed.append(self)
        real_close(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SqliteAuditSink, "close", noting_close)
        with pytest.raises(CorruptDataError):
            MigrationAuditLog(sink=path)
    assert len(closed) == 1


@pytest.mark.parametrize("field,value", [("timestamp", 2**64), ("timestamp", -(2**63) - 1),
                                         ("details", "\ud800 lone surrogate")])
def test_an_entry_out_of_range_is_corrupt_data_naming_its_line(field: str, value: object) -> None:
    good = entry(1).to_dict()
    bad = dict(good, **{field: value})
    text = json.dumps(good) + "\n" + json.dumps(bad) + "\n"
    with pytest.raises(CorruptDataError, match="line 2"):
        import_jsonl(io.StringIO(text))
    with pytest.raises(CorruptDataError):
        AuditEntry.from_dict(bad)


@pytest.mark.parametrize("durable", [False, True])
def test_a_range_past_64_bits_selects_to_the_edge(tmp_path: Path, durable: bool) -> None:
    """With or without a sink the same answer: bounds past the 64-bit timestamps clamp."""
    log = MigrationAuditLog(sink=tmp_path / "a.db" if durable else None)
    log.log(entry(1, ts=5))
    log.log(entry(2, ts=2**63 - 1))
    assert names(log.get_entries_in_range(0, 2**64)) == names([entry(1), entry(2)])
    assert names(log.get_entries_in_range(-(2**70), 5)) == names([entry(1)])
    assert log.get_entries_in_range(2**63, 2**64) == []
    log.close()
