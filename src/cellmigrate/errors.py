"""The library's exceptions.

Every error the library raises on purpose is a :class:`CellError`. The three variants
that exist in the Rust crate render like its ``Display`` impl ("Invalid state: ...");
the raw text is kept in ``.message`` so callers can match it without the prefix.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Dict, Optional, Tuple

__all__ = [
    "CellError",
    "InvalidStateError",
    "MigrationFailedError",
    "ExecutionFailedError",
    "CorruptDataError",
    "TruncatedInputError",
    "StateChangedError",
    "JournalError",
    "InputTooLargeError",
    "DeclaredSizeError",
    "LegacyKeyedError",
    "AuditStoreError",
]


def _rebuild(cls: "type[CellError]", args: Tuple[Any, ...], state: Dict[str, Any]) -> "CellError":
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class CellError(Exception):
    """Base class of every error raised by cellmigrate."""

    prefix = ""

    def __init__(self, message: str = "") -> None:
        self.message = message
        super().__init__(f"{self.prefix}{message}")

    def __reduce__(self) -> Tuple[Any, ...]:
        # Pickled (multiprocessing, Ray) as its args and attributes, rebuilt without
        # calling __init__ again: that would prefix the message twice, and some
        # subclasses take required keyword-only fields.
        return (_rebuild, (type(self), self.args, dict(self.__dict__)))


class InvalidStateError(CellError):
    """A state, delta or request is not valid here (Rust ``CellError::InvalidState``)."""

    prefix = "Invalid state: "


class MigrationFailedError(CellError):
    """A migration could not be carried out (Rust ``CellError::MigrationFailed``)."""

    prefix = "Migration failed: "


class ExecutionFailedError(CellError):
    """The agent failed while executing (Rust ``CellError::ExecutionFailed``)."""

    prefix = "Agent execution failed: "


class CorruptDataError(CellError, ValueError):
    """Bytes that cannot be decoded, or that were tampered with."""


class TruncatedInputError(CellError):
    """A file could not be read to its end: another process truncated it while it was
    read, or pages of its memory map could not be brought in (an I/O error; a hole of a
    sparse tmpfs file on a full file system).

    Whatever was computed from it is discarded; the CLI exits 2 (the input is the problem).
    """


class StateChangedError(CellError):
    """A state file changed while it was being read (size, times or copied pages differ).

    The result could describe a state that never existed, so it is refused (CLI exit 1).
    """


class JournalError(CellError):
    """A state file has an undo journal that cannot be rolled back here and now.

    Raised when an interrupted ``apply`` left a journal beside the file and the caller
    cannot repair it (no write access, another process is applying, the journal belongs
    to another file); the message names ``cellmigrate recover``.
    """


class InputTooLargeError(CellError, ValueError):
    """An input over a hard size limit of the format or library asked to take it.

    ``size`` is the input's size and ``limit`` the largest accepted, both in bytes; the
    message names the limit (e.g. LZ4's block limit, ``LZ4_MAX_INPUT_SIZE``).
    """

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class DeclaredSizeError(CorruptDataError, InputTooLargeError):
    """Serialized input declares a size over the reader's limit (e.g. a delta's
    ``total_size`` over ``max_total_size``), refused before anything is decoded.

    A :class:`CorruptDataError` (what a reader raises for input it refuses) and an
    :class:`InputTooLargeError`: ``field`` names the header field, ``size`` is the
    declared size and ``limit`` the reader's bound, both in bytes.
    """

    def __init__(self, message: str, *, field: str, size: int, limit: int) -> None:
        super().__init__(message, size=size, limit=limit)
        self.field = field


class LegacyKeyedError(CorruptDataError):
    """A keyed version-1 delta, refused unless the reader opts in.

    Its header fields (agent id, sequences, timestamp, sizes) are not under its MAC, so it
    could be replayed to another agent or round. Raised only after every other check
    passed (the delta is intact); ``DeltaSnapshot.deserialize(allow_legacy_keyed=True)``
    (CLI: ``--allow-legacy-keyed``) accepts it.
    """


class AuditStoreError(CellError, sqlite3.OperationalError):
    """The audit database could not be opened, read or written.

    Raised by :class:`~cellmigrate.audit_store.SqliteAuditSink` once the retryable
    conditions (``SQLITE_BUSY``, "database is locked") have been retried for its
    ``timeout``, and at once for the others (missing directory, read-only file, disk
    full, I/O error). The ``sqlite3`` error is chained as ``__cause__`` and, where it has
    them (Python 3.11+), its ``sqlite_errorcode``/``sqlite_errorname`` are copied. It is also a
    ``sqlite3.OperationalError``, which is what callers caught before it existed.
    """

    def __init__(self, message: str, cause: Optional[sqlite3.Error] = None) -> None:
        super().__init__(message)
        # Python 3.11+ sets these on sqlite3 errors; copied so callers need not dig in __cause__.
        code = getattr(cause, "sqlite_errorcode", None)
        name = getattr(cause, "sqlite_errorname", None)
        if code is not None:
            self.sqlite_errorcode = int(code)
        if name is not None:
            self.sqlite_errorname = str(name)
