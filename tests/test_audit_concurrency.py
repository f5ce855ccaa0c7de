"""The SQLite audit store opened and written by many connections and processes at once
(issue 10 §4).

SQLite answers a lock held elsewhere with SQLITE_BUSY ("database is locked"), sometimes
without waiting at all (switching a new file to WAL while another connection holds its
write lock). The store retries that until its ``timeout`` and surfaces whatever remains
as :class:`cellmigrate.AuditStoreError` (a ``CellError``) with the sqlite3 error chained.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

from cellmigrate import AuditStoreError, CellError, MigrationAuditLog, SqliteAuditSink
from cellmigrate.audit import AuditEntry, AuditEventType

# fork: the workers start in milliseconds (no re-import), so the opens really overlap
_CTX = mp.get_context("fork")


def _entry(k: int, i: int) -> AuditEntry:
    mid = uuid.UUID(int=k).bytes
    return AuditEntry(mid, mid, AuditEventType.MIGRATION_STARTED, 1_700_000_000 + i, None, None, f"{k}:{i}", True)


class _Holder:
    """Another connection holding the database's write lock (BEGIN IMMEDIATE) for ``hold`` seconds."""

    def __init__(self, path: Path, hold: float) -> None:
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.conn.execute("BEGIN IMMEDIATE")
        self.timer = threading.Timer(hold, self.release)
        self.timer.start()

    def release(self) -> None:
        if self.conn.in_transaction:
            self.conn.execute("COMMIT")

    def close(self) -> None:
        self.timer.cancel()
        self.release()
        self.conn.close()


@pytest.fixture
def new_db(tmp_path: Path) -> Iterator[Path]:
    """A database file that exists (rollback journal, no audit schema yet): what a second
    process sees when the first has created the file but not yet switched it to WAL."""
    path = tmp_path / "audit.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE IF NOT EXISTS other (x)")
    conn.commit()
    conn.close()
    yield path


def test_wal_switch_refused_at_once_is_retried(new_db: Path) -> None:
    """SQLite returns SQLITE_BUSY from ``PRAGMA journal_mode=WAL`` immediately, without its
    busy handler, while another connection holds the write lock: the open must wait it out."""
    holder = _Holder(new_db, hold=0.3)
    try:
        started = time.monotonic()
        with SqliteAuditSink(new_db, timeout=10) as sink:
            waited = time.monotonic() - started
            sink.append(_entry(1, 1))
            assert sink.count() == 1
    finally:
        holder.close()
    assert 0.2 < waited < 5, waited


def test_a_lock_held_past_the_timeout_is_an_audit_store_error(new_db: Path) -> None:
    holder = _Holder(new_db, hold=30)
    try:
        started = time.monotonic()
        with pytest.raises(AuditStoreError, match=r"cannot open audit database .*still locked .* after 0.3 s") as info:
            SqliteAuditSink(new_db, timeout=0.3)
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert 0.3 <= elapsed < 3, elapsed
    err = info.value
    assert isinstance(err, CellError) and isinstance(err, sqlite3.OperationalError)
    assert isinstance(err.__cause__, sqlite3.OperationalError) and "database is locked" in str(err.__cause__)
    if hasattr(err.__cause__, "sqlite_errorcode"):  # Python 3.11+
        assert err.sqlite_errorcode & 0xFF == 5  # SQLITE_BUSY
        assert err.sqlite_errorname.startswith("SQLITE_BUSY")
    # the lock gone, the same file opens
    with SqliteAuditSink(new_db) as sink:
        assert sink.count() == 0


def test_writes_wait_for_the_lock_then_surface_an_audit_store_error(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    with SqliteAuditSink(db, timeout=0.3) as sink:
        holder = _Holder(db, hold=30)
        try:
            with pytest.raises(AuditStoreError, match="cannot write to audit database .*still locked"):
                sink.append(_entry(1, 1))
            with pytest.raises(AuditStoreError, match="cannot write to audit database .*still locked"):
                sink.append_many([_entry(1, 2), _entry(1, 3)])
            log = MigrationAuditLog(sink=sink)
            with pytest.raises(AuditStoreError):
                log.log_start(uuid.UUID(int=1), uuid.UUID(int=2))
            assert len(log) == 0  # not kept in memory either when the sink refused it
        finally:
            holder.close()
        assert sink.count() == 0  # nothing half-written
        # a lock released within the timeout is waited for
        holder = _Holder(db, hold=0.1)
        try:
            sink.append_many([_entry(1, 2), _entry(1, 3)])
        finally:
            holder.close()
        assert [e.details for e in sink.query()] == ["1:2", "1:3"]


def test_other_failures_are_audit_store_errors_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AuditStoreError, match="cannot open audit database") as info:
        SqliteAuditSink(tmp_path / "missing" / "audit.db", timeout=30)
    assert time.monotonic() - started < 5  # not retried: waiting cannot fix it
    assert isinstance(info.value.__cause__, sqlite3.OperationalError)


@pytest.mark.parametrize("bad", [-1, float("nan")])
def test_timeout_must_be_non_negative(tmp_path: Path, bad: float) -> None:
    with pytest.raises(ValueError, match="timeout"):
        SqliteAuditSink(tmp_path / "a.db", timeout=bad)


# -- many processes ------------------------------------------------------------------------


def _open_worker(k: int, barrier: Any, directory: str, rounds: int, out: Any) -> None:
    errors: List[str] = []
    for r in range(rounds):
        barrier.wait()
        try:
            log = MigrationAuditLog(sink=os.path.join(directory, f"round{r}.db"))
            log.log_start(uuid.UUID(int=r), uuid.UUID(int=k))
            log.close()
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            errors.append(f"round {r}: {type(exc).__name__}: {exc}")
    out.put(errors)


def _run_workers(target: Any, n: int, args: Tuple[Any, ...]) -> List[Any]:
    barrier = _CTX.Barrier(n)
    out = _CTX.Queue()
    procs = [_CTX.Process(target=target, args=(k, barrier, *args, out)) for k in range(n)]
    for p in procs:
        p.start()
    try:
        results = [out.get(timeout=240) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _open_many(tmp_path: Path, rounds: int) -> None:
    n = 8
    results = _run_workers(_open_worker, n, (str(tmp_path), rounds))
    errors = [e for r in results for e in r]
    assert errors == []
    for r in range(rounds):
        with SqliteAuditSink(tmp_path / f"round{r}.db") as sink:
            got = sorted(e.agent_id for e in sink.query())
            assert got == sorted(uuid.UUID(int=k).bytes for k in range(n)), r
            assert sink.integrity_check() == "ok"


def test_one_new_database_opened_by_8_processes_at_once_50_times(tmp_path: Path) -> None:
    _open_many(tmp_path, rounds=50)


def _write_worker(k: int, barrier: Any, path: str, per: int, out: Any) -> None:
    errors: List[str] = []
    log = MigrationAuditLog(sink=path)
    barrier.wait()
    for i in range(per):
        try:
            log.log(_entry(k, i))
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails the test
            errors.append(f"entry {i}: {type(exc).__name__}: {exc}")
    log.close()
    out.put(errors)


def test_four_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    db = tmp_path / "audit.db"
    SqliteAuditSink(db).close()
    writers, per = 4, 60
    results = _run_workers(_write_worker, writers, (str(db), per))
    assert [e for r in results for e in r] == []
    with SqliteAuditSink(db) as sink:
        assert sink.count() == writers * per
        for k in range(writers):
            # every entry, each writer's in its own order
            assert [e.details for e in sink.query(migration_id=uuid.UUID(int=k).bytes)] == [
                f"{k}:{i}" for i in range(per)
            ]
        assert sink.integrity_check() == "ok"
