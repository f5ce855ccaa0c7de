"""Durable audit storage: an embedded SQLite sink and JSON Lines export/import.

Attach a sink to a log and every entry is committed to disk before ``log()`` returns::

    log = MigrationAuditLog(sink=SqliteAuditSink("audit.db"))

The database uses WAL journaling and one row per entry, with indexes on migration id and
agent id (and timestamp, for range queries). It survives the writing process being
killed at any moment: a committed entry is in the WAL and is recovered on the next open.
With the default ``synchronous="FULL"`` it also survives a power loss after commit.

Many processes may open and write one database at once. SQLite reports a lock held by
another connection as ``SQLITE_BUSY`` ("database is locked"), which its documentation
calls retryable, and it returns it *without* waiting in some places (switching a new
file to WAL, a lock upgrade that could deadlock). So every operation here runs in short
attempts, each waiting up to ``_ATTEMPT_WAIT`` in SQLite's busy handler, with jittered,
doubling pauses (1 to 25 ms) between them until the sink's ``timeout``; short attempts
also keep a waiting writer from starving behind writers that commit every few
milliseconds (SQLite's own handler backs off to polling every 100 ms). A lock still held
after ``timeout`` seconds, and every other failure of the database file (missing
directory, read-only file, disk full, I/O error), raises
:class:`~cellmigrate.errors.AuditStoreError` with the ``sqlite3`` error as its cause.

>>> from cellmigrate.audit import AuditEntry, AuditEventType, MigrationAuditLog
>>> sink = SqliteAuditSink(":memory:")
>>> log = MigrationAuditLog.with_capacity(1, sink=sink)
>>> log.log_start(bytes(16), b"A" * 16)
>>> log.log_completion(bytes(16), b"A" * 16, True, "done")
>>> len(log), len(log.get_migration_entries(bytes(16)))   # ring holds 1, the DB both
(1, 2)
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import sqlite3
import threading
import time
from typing import (
    Any,
    Callable,
    Iterable,
    Iterator,
    List,
    Optional,
    Protocol,
    Sequence,
    Tuple,
    TypeVar,
    Union,
    runtime_checkable,
)

from ._forksafe import guard
from ._jsontext import parse_json
from .audit import AuditEntry, AuditEventType
from .errors import AuditStoreError, CorruptDataError
from .statefile import write_bytes_atomic

__all__ = ["AuditSink", "SqliteAuditSink", "export_jsonl", "import_jsonl", "SCHEMA_VERSION"]

#: Stored in ``PRAGMA user_version``; a database with another version is refused.
SCHEMA_VERSION = 1

PathLike = Union[str, "os.PathLike[str]"]


@runtime_checkable
class AuditSink(Protocol):
    """What :class:`~cellmigrate.audit.MigrationAuditLog` needs from durable storage.

    ``append`` must not return before the entry is durable. ``query`` returns entries in
    insertion order matching every given criterion (``None`` = any).
    """

    def append(self, entry: AuditEntry) -> int:
        """Store ``entry`` durably before returning; returns its sequence number."""
        ...

    def append_many(self, entries: Sequence[AuditEntry]) -> None:
        """Store ``entries`` in order, all durably (one transaction where the sink has them)."""
        ...

    def query(
        self,
        *,
        migration_id: Optional[bytes] = None,
        agent_id: Optional[bytes] = None,
        event_type: Optional[AuditEventType] = None,
        failures_only: bool = False,
        start: Optional[int] = None,
        end: Optional[int] = None,
    ) -> List[AuditEntry]:
        """The entries matching every criterion given (``None``: any; ``start``/``end``:
        Unix seconds, inclusive), in insertion order."""
        ...

    def recent(self, n: int) -> List[AuditEntry]:
        """The last ``n`` entries, oldest first."""
        ...

    def count(self) -> int:
        """How many entries are stored."""
        ...

    def close(self) -> None:
        """Release the storage (further calls may raise ``AuditStoreError``)."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_entries (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    migration_id BLOB    NOT NULL CHECK (length(migration_id) = 16),
    agent_id     BLOB    NOT NULL CHECK (length(agent_id) = 16),
    event_type   TEXT    NOT NULL,
    timestamp    INTEGER NOT NULL,
    source_node  BLOB    CHECK (source_node IS NULL OR length(source_node) = 16),
    target_node  BLOB    CHECK (target_node IS NULL OR length(target_node) = 16),
    details      TEXT    NOT NULL,
    success      INTEGER NOT NULL CHECK (success IN (0, 1))
);
CREATE INDEX IF NOT EXISTS audit_by_migration ON audit_entries (migration_id, seq);
CREATE INDEX IF NOT EXISTS audit_by_agent     ON audit_entries (agent_id, seq);
CREATE INDEX IF NOT EXISTS audit_by_timestamp ON audit_entries (timestamp, seq);
"""

_COLUMNS = "migration_id, agent_id, event_type, timestamp, source_node, target_node, details, success"
_INSERT = f"INSERT INTO audit_entries ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_SYNC_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")

#: Seconds one attempt may wait in SQLite's busy handler before this module retries.
_ATTEMPT_WAIT = 0.02
#: Pauses between attempts (seconds): the first, doubled up to the last, each jittered
#: down to half so processes that collided do not retry in lockstep.
_PAUSE_FIRST = 0.001
_PAUSE_MAX = 0.025
#: SQLITE_BUSY; its extended codes (BUSY_RECOVERY, BUSY_SNAPSHOT, BUSY_TIMEOUT) share the low byte.
_SQLITE_BUSY = 5

_T = TypeVar("_T")
#: Connections a forked child inherited: never used nor closed there (nor collected,
#: which would close them), as SQLite requires.
_INHERITED: List[sqlite3.Connection] = []


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether ``exc`` is SQLITE_BUSY, which SQLite documents as safe to retry."""
    code = getattr(exc, "sqlite_errorcode", None)  # Python 3.11+
    if code is not None:
        return (int(code) & 0xFF) == _SQLITE_BUSY
    return "database is locked" in str(exc)


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """An explicit write transaction on an autocommit connection: all or nothing."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # A COMMIT refused with SQLITE_BUSY leaves the transaction open; some errors
        # (disk full, I/O) roll it back already, and a second ROLLBACK would mask them.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _row(entry: AuditEntry) -> Tuple[Any, ...]:
    return (
        entry.migration_id,
        entry.agent_id,
        entry.event_type.name,
        entry.timestamp,
        entry.source_node,
        entry.target_node,
        entry.details,
        int(entry.success),
    )


def _entry(row: Sequence[Any]) -> AuditEntry:
    try:
        event = AuditEventType[row[2]]
    except (KeyError, TypeError):
        raise CorruptDataError(f"audit database holds an unknown event type {row[2]!r}") from None
    try:
        return AuditEntry(
            migration_id=row[0],
            agent_id=row[1],
            event_type=event,
            timestamp=row[3],
            source_node=row[4],
            target_node=row[5],
            details=row[6],
            success=bool(row[7]),
        )
    except (TypeError, ValueError) as exc:  # SQLite's column affinity stores any type
        raise CorruptDataError(f"audit database holds a malformed entry: {exc}") from None


class SqliteAuditSink:
    """Audit entries in an SQLite database file (WAL, one row per entry).

    ``path`` may be ``":memory:"`` (tests) or a file path; the file is created if missing and
    read back when it exists. ``synchronous`` is SQLite's setting: "FULL" (default) makes
    each commit survive power loss, "NORMAL" only process crashes (faster). One connection
    is shared by all threads behind a lock; other processes may open and write the same
    file at the same time (see the module docstring).

    ``timeout`` (seconds, default 10) bounds how long opening, and each later operation,
    waits for locks other connections hold (SQLITE_BUSY), retried in short attempts.

    Raises :class:`~cellmigrate.errors.AuditStoreError` (a ``CellError``, and a
    ``sqlite3.OperationalError``; the ``sqlite3`` error chained as its cause) when the
    database is still locked after ``timeout`` or cannot be opened, read or written at
    all; :class:`~cellmigrate.errors.CorruptDataError` when the file is not an audit
    database of this schema version. Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: PathLike, *, synchronous: str = "FULL", timeout: float = 10.0) -> None:
        mode = synchronous.upper() if isinstance(synchronous, str) else synchronous
        if mode not in _SYNC_MODES:
            raise ValueError(f"synchronous must be one of {_SYNC_MODES}, got {synchronous!r}")
        if not timeout >= 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
        given = os.fspath(path)
        # Absolute: a forked child that reconnects (after a chdir, as daemons do) must
        # open this database, not a new one relative to its own directory.
        self._path = given if given == ":memory:" else os.path.abspath(given)
        self._timeout = float(timeout)
        self._lock = threading.Lock()
        guard(self, "_lock")  # taken around fork(): see _forksafe
        self._mode = mode
        self._conn: Optional[sqlite3.Connection] = None
        self._connect()

    def _connect(self) -> None:
        """Open the connection and set the database up, for this process."""
        self._pid = os.getpid()
        try:
            # isolation_level=None: autocommit, so a single INSERT is committed when
            # execute() returns; multi-row writes use explicit BEGIN/COMMIT.
            self._conn = self._retry(
                "cannot open audit database",
                lambda: sqlite3.connect(
                    self._path,
                    timeout=min(self._timeout, _ATTEMPT_WAIT),
                    isolation_level=None,
                    check_same_thread=False,
                ),
            )
            # Every step of the setup is idempotent, so a step refused as busy reruns it all.
            self._retry("cannot open audit database", lambda: self._setup(self._mode))
        except sqlite3.OperationalError:
            self._discard()
            raise  # an AuditStoreError from _retry
        except sqlite3.DatabaseError as exc:
            self._discard()
            raise CorruptDataError(f"{self._path!r} is not a usable audit database: {exc}") from None
        except BaseException:
            self._discard()
            raise

    def _discard(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _retry(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run ``operation`` (safe to repeat), retrying SQLITE_BUSY until ``timeout``.

        Any ``sqlite3.OperationalError`` left over becomes an :class:`AuditStoreError`
        naming ``what`` and the path, with the original as its cause."""
        deadline = time.monotonic() + self._timeout
        pause = _PAUSE_FIRST
        attempts = 0
        while True:
            attempts += 1
            try:
                return operation()
            except sqlite3.OperationalError as exc:
                if isinstance(exc, AuditStoreError):
                    raise
                left = deadline - time.monotonic()
                if not _is_busy(exc):
                    raise AuditStoreError(f"{what} {self._path!r}: {exc}", exc) from exc
                if left <= 0:
                    raise AuditStoreError(
                        f"{what} {self._path!r}: still locked by another connection after "
                        f"{self._timeout:g} s ({attempts} attempts): {exc}",
                        exc,
                    ) from exc
                time.sleep(min(left, random.uniform(pause / 2, pause)))
                pause = min(2 * pause, _PAUSE_MAX)

    def _setup(self, mode: str) -> None:
        conn = self._require()
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise CorruptDataError(
                f"{self._path!r} has audit schema version {version}; this cellmigrate reads {SCHEMA_VERSION}"
            )
        if self._path != ":memory:":
            journal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(journal).lower() != "wal":
                # e.g. a file system without shared memory: the store, not the data, is the problem
                raise AuditStoreError(f"could not enable WAL journaling on {self._path!r} (got {journal})")
        conn.execute(f"PRAGMA synchronous={mode}")
        with _transaction(conn):
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            if version == 0:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _require(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ValueError("the audit database is closed")
        if self._pid != os.getpid() and self._path != ":memory:":
            # A forked child: SQLite forbids using (even closing) a connection opened
            # before fork() (https://www.sqlite.org/howtocorrupt.html, 2.6): its entries
            # were silently lost. The inherited one is left alone, for good, and the
            # child opens its own.
            _INHERITED.append(self._conn)
            self._conn = None
            self._connect()
            assert self._conn is not None
        return self._conn

    @property
    def path(self) -> str:
        """The database path given at construction, made absolute (``":memory:"`` as is)."""
        return self._path

    # -- writing -------------------------------------------------------------------

    def append(self, entry: AuditEntry) -> int:
        """Store one entry; returns its sequence number once it is committed."""
        row = _row(entry)
        with self._lock:
            conn = self._require()
            # An autocommit INSERT refused as busy wrote nothing: SQLite documents it as safe to rerun.
            cursor = self._retry("cannot write to audit database", lambda: conn.execute(_INSERT, row))
            seq = cursor.lastrowid
        assert seq is not None
        return seq

    def append_many(self, entries: Sequence[AuditEntry]) -> None:
        """Store several entries in one transaction (all or none)."""
        rows = [_row(e) for e in entries]

        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):  # rolled back when refused: the rerun starts clean
                conn.executemany(_INSERT, rows)

        with self._lock:
            conn = self._require()
            self._retry("cannot write to audit database", lambda: write(conn))

    # -- reading -------------------------------------------------------------------

    def query(
        self,
        *,
        migration_id: Optional[bytes] = None,
        agent_id: Optional[bytes] = None,
        event_type: Optional[AuditEventType] = None,
        failures_only: bool = False,
        start: Optional[int] = None,
        end: Optional[int] = None,
    ) -> List[AuditEntry]:
        """Entries matching every given criterion, in insertion order."""
        clauses: List[str] = []
        params: List[Any] = []
        if migration_id is not None:
            clauses.append("migration_id = ?")
            params.append(bytes(migration_id))
        if agent_id is not None:
            clauses.append("agent_id = ?")
            params.append(bytes(agent_id))
        if event_type is not None:
            clauses.append("event_type = ?")
            params.append(event_type.name)
        if failures_only:
            clauses.append("success = 0")
        if start is not None:
            clauses.append("timestamp >= ?")
            params.append(start)
        if end is not None:
            clauses.append("timestamp <= ?")
            params.append(end)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        return self._fetch(f"SELECT {_COLUMNS} FROM audit_entries{where} ORDER BY seq", params)

    def recent(self, n: int) -> List[AuditEntry]:
        """The newest ``n`` entries, oldest first."""
        if n <= 0:
            return []
        return self._fetch(
            f"SELECT {_COLUMNS} FROM (SELECT seq, {_COLUMNS} FROM audit_entries ORDER BY seq DESC LIMIT ?) ORDER BY seq",
            [n],
        )

    def _fetch(self, sql: str, params: Sequence[Any]) -> List[AuditEntry]:
        return [_entry(r) for r in self._read(sql, params)]

    def _read(self, sql: str, params: Sequence[Any] = ()) -> List[Any]:
        with self._lock:
            conn = self._require()
            return self._retry("cannot read audit database", lambda: conn.execute(sql, params).fetchall())

    def count(self) -> int:
        """Number of stored entries."""
        return int(self._read("SELECT count(*) FROM audit_entries")[0][0])

    def integrity_check(self) -> str:
        """SQLite's ``PRAGMA integrity_check`` verdict ("ok" when the file is sound)."""
        return "\n".join(str(r[0]) for r in self._read("PRAGMA integrity_check"))

    # -- lifetime ------------------------------------------------------------------

    def close(self) -> None:
        """Close the database (idempotent). In a forked child that never wrote, the
        connection inherited from the parent is left alone, not closed (SQLite's rule)."""
        with self._lock:
            if self._conn is not None:
                if self._pid != os.getpid() and self._path != ":memory:":
                    _INHERITED.append(self._conn)
                else:
                    self._conn.close()
                self._conn = None

    def __enter__(self) -> "SqliteAuditSink":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"SqliteAuditSink({self._path!r}, {state})"


# -- JSON Lines -------------------------------------------------------------------------


def export_jsonl(entries: Iterable[AuditEntry], destination: Union[PathLike, Any]) -> int:
    """Write one JSON object per line (``AuditEntry.to_dict``) to a path or text file.

    Returns the number of entries written. A path is written atomically
    (:func:`~cellmigrate.statefile.write_bytes_atomic`: a temporary file beside it, fsynced,
    renamed over it; removed on failure).
    """
    lines = [json.dumps(e.to_dict(), sort_keys=True, ensure_ascii=False) + "\n" for e in entries]
    if isinstance(destination, (str, os.PathLike)):
        write_bytes_atomic(destination, "".join(lines).encode("utf-8"))
    else:
        destination.writelines(lines)
    return len(lines)


def import_jsonl(source: Union[PathLike, Any]) -> List[AuditEntry]:
    """Read entries written by :func:`export_jsonl` from a path or text file.

    Blank lines are skipped; any malformed line (not UTF-8, not JSON, nested too deeply,
    not an entry) raises :class:`CorruptDataError` naming its line number.
    """
    if isinstance(source, (str, os.PathLike)):
        with open(os.fspath(source), "rb") as fh:  # bytes: a line that is not UTF-8 is named
            return _parse_lines(fh)
    if isinstance(source, (bytes, bytearray)):
        return _parse_lines(io.BytesIO(bytes(source)))
    return _parse_lines(source)


def _parse_lines(lines: Iterable[Any]) -> List[AuditEntry]:
    out: List[AuditEntry] = []
    number = 0
    rows = iter(lines)
    while True:
        number += 1
        try:
            line = next(rows)  # a text file decodes as it reads: it can fail here
        except StopIteration:
            break
        except UnicodeDecodeError as exc:
            # a text stream decodes ahead of the lines it hands out: the line is a bound
            raise CorruptDataError(f"audit JSON Lines: not UTF-8 at or after line {number} ({exc})") from None
        if not line.strip():
            continue
        try:
            data = parse_json(line)
        except ValueError as exc:
            raise CorruptDataError(f"audit JSON Lines line {number}: not JSON ({exc})") from None
        try:
            out.append(AuditEntry.from_dict(data))
        except CorruptDataError as exc:
            raise CorruptDataError(f"audit JSON Lines line {number}: {exc.message}") from None
    return out
