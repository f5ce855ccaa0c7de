"""The migration audit trail: what happened to which agent, when, and whether it worked.

A :class:`MigrationAuditLog` is a bounded, thread-safe, insertion-ordered record of
:class:`AuditEntry` objects. Without a sink it keeps only the newest ``capacity`` entries in
memory (the Rust crate's behaviour). With a durable sink (for example
:class:`cellmigrate.audit_store.SqliteAuditSink`) every entry is persisted before
:meth:`MigrationAuditLog.log` returns, the in-memory ring only bounds memory, and the
queries (``get_*``) read the sink, so entries evicted from memory, or written by an
earlier process, are still found.
"""

from __future__ import annotations

import enum
import operator
import os
import threading
import time
import unicodedata
from collections import deque
from dataclasses import dataclass, replace
from typing import (
    TYPE_CHECKING,
    Any,
    Deque,
    Dict,
    Iterable,
    Iterator,
    List,
    Mapping,
    Optional,
    Union,
)

from ._forksafe import guard
from ._ids import IdLike, to_id, to_optional_id
from .errors import CorruptDataError

if TYPE_CHECKING:  # pragma: no cover - imported for annotations only
    from .audit_store import AuditSink
    from .validation import CompatibilityStatus, VerificationResult

__all__ = ["AuditEventType", "AuditEntry", "MigrationAuditLog", "DEFAULT_AUDIT_CAPACITY"]

#: Entries a :class:`MigrationAuditLog` keeps in memory unless told otherwise.
DEFAULT_AUDIT_CAPACITY = 10000


class AuditEventType(enum.Enum):
    """Kinds of audit event, in the Rust crate's order."""

    MIGRATION_STARTED = 1
    VALIDATION_COMPLETED = 2
    SNAPSHOT_CAPTURED = 3
    TRANSFER_STARTED = 4
    TRANSFER_COMPLETED = 5
    VERIFICATION_COMPLETED = 6
    MIGRATION_COMPLETED = 7
    MIGRATION_FAILED = 8
    ROLLBACK_STARTED = 9
    ROLLBACK_COMPLETED = 10


def _now() -> int:
    return int(time.time())


def _dict_id(value: Any, field: str, optional: bool) -> Optional[bytes]:
    """Decode an id from a dict: hex string (the JSON form), 16 bytes or a UUID."""
    if value is None:
        if optional:
            return None
        raise CorruptDataError(f"audit entry field {field!r} is missing or null")
    if isinstance(value, str):
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raise CorruptDataError(f"audit entry field {field!r} is not hex: {value!r}") from None
        if len(raw) != 16:
            raise CorruptDataError(f"audit entry field {field!r} must be 16 bytes (32 hex digits), got {len(raw)}")
        return raw
    try:
        return to_id(value, field)
    except (TypeError, ValueError) as exc:
        raise CorruptDataError(f"audit entry field {field!r}: {exc}") from None


@dataclass(frozen=True)
class AuditEntry:
    """One audit record. Ids are 16 bytes (``uuid.UUID`` is accepted and converted).

    Entries are immutable: :meth:`with_nodes` returns a new entry.

    >>> e = AuditEntry.new(bytes(16), bytes(16), AuditEventType.MIGRATION_STARTED, "go", True)
    >>> e.with_nodes(b"S" * 16, None).source_node
    b'SSSSSSSSSSSSSSSS'
    >>> AuditEntry.from_dict(e.to_dict()) == e
    True
    """

    migration_id: bytes
    agent_id: bytes
    event_type: AuditEventType
    timestamp: int
    source_node: Optional[bytes] = None
    target_node: Optional[bytes] = None
    details: str = ""
    success: bool = True

    def __post_init__(self) -> None:
        # Normalise here so every entry, however built, holds exactly the types the
        # queries, the JSON form and the SQLite sink rely on.
        set_ = object.__setattr__
        set_(self, "migration_id", to_id(self.migration_id, "migration_id"))
        set_(self, "agent_id", to_id(self.agent_id, "agent_id"))
        set_(self, "source_node", to_optional_id(self.source_node, "source_node"))
        set_(self, "target_node", to_optional_id(self.target_node, "target_node"))
        if not isinstance(self.event_type, AuditEventType):
            raise TypeError(f"event_type must be an AuditEventType, not {type(self.event_type).__name__}")
        if isinstance(self.timestamp, bool):
            raise TypeError("timestamp must be an int (Unix seconds), not bool")
        try:
            set_(self, "timestamp", operator.index(self.timestamp))
        except TypeError:
            raise TypeError(f"timestamp must be an int (Unix seconds), not {type(self.timestamp).__name__}") from None
        if not -(2**63) <= self.timestamp < 2**63:
            # the durable form stores it as a 64-bit SQLite INTEGER
            raise ValueError(f"timestamp out of the 64-bit range: {self.timestamp}")
        if not isinstance(self.details, str):
            raise TypeError(f"details must be a str, not {type(self.details).__name__}")
        try:
            # Rust strings are UTF-8, and so are the JSON Lines and SQLite forms: a lone
            # surrogate would be accepted here and fail later, far from its cause.
            self.details.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("details must be valid Unicode text (it contains a lone surrogate)") from None
        if not isinstance(self.success, bool):
            raise TypeError(f"success must be a bool, not {type(self.success).__name__}")

    @classmethod
    def new(
        cls,
        migration_id: IdLike,
        agent_id: IdLike,
        event_type: AuditEventType,
        details: str,
        success: bool,
    ) -> "AuditEntry":
        """An entry stamped with the current time (Unix seconds) and no nodes."""
        return cls(
            migration_id=to_id(migration_id, "migration_id"),
            agent_id=to_id(agent_id, "agent_id"),
            event_type=event_type,
            timestamp=_now(),
            details=details,
            success=success,
        )

    def with_nodes(self, source_node: Optional[IdLike], target_node: Optional[IdLike]) -> "AuditEntry":
        """A copy of this entry with both node fields set (``None`` clears one)."""
        return replace(
            self,
            source_node=to_optional_id(source_node, "source_node"),
            target_node=to_optional_id(target_node, "target_node"),
        )

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe form: ids as lowercase hex, the event type by name."""
        return {
            "migration_id": self.migration_id.hex(),
            "agent_id": self.agent_id.hex(),
            "event_type": self.event_type.name,
            "timestamp": self.timestamp,
            "source_node": None if self.source_node is None else self.source_node.hex(),
            "target_node": None if self.target_node is None else self.target_node.hex(),
            "details": self.details,
            "success": self.success,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "AuditEntry":
        """Inverse of :meth:`to_dict`. Malformed input raises :class:`CorruptDataError`."""
        if not isinstance(data, Mapping):
            raise CorruptDataError(f"an audit entry must be a mapping, not {type(data).__name__}")
        for name in ("migration_id", "agent_id", "event_type", "timestamp", "details", "success"):
            if name not in data:
                raise CorruptDataError(f"audit entry field {name!r} is missing")
        event = data["event_type"]
        if isinstance(event, str):
            try:
                event = AuditEventType[event]
            except KeyError:
                raise CorruptDataError(f"unknown audit event type {event!r}") from None
        elif not isinstance(event, AuditEventType):
            raise CorruptDataError(f"audit entry field 'event_type' must be a name, not {type(event).__name__}")
        try:
            return cls(
                migration_id=_dict_id(data["migration_id"], "migration_id", False),  # type: ignore[arg-type]
                agent_id=_dict_id(data["agent_id"], "agent_id", False),  # type: ignore[arg-type]
                event_type=event,
                timestamp=data["timestamp"],
                source_node=_dict_id(data.get("source_node"), "source_node", True),
                target_node=_dict_id(data.get("target_node"), "target_node", True),
                details=data["details"],
                success=data["success"],
            )
        except (TypeError, ValueError) as exc:  # ValueError: a timestamp past 64 bits, a lone surrogate
            raise CorruptDataError(f"malformed audit entry: {exc}") from None


def _render_warnings(warnings: Iterable[str]) -> str:
    """Render like Rust's ``{:?}`` of a ``Vec<String>``: ``["a", "b"]``."""
    return "[" + ", ".join('"' + _escape_debug(w) + '"' for w in warnings) + "]"


_DEBUG_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


#: Unicode categories Rust's Debug prints as ``\u{..}``: what its ``is_printable`` refuses
#: (controls, format, surrogates, private use, unassigned, separators other than ' ') and
#: the grapheme extenders (approximated by the combining-mark categories).
_DEBUG_UNICODE_ESCAPED = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs", "Mn", "Me"})


def _escape_debug(text: str) -> str:
    """Escape a string the way Rust's ``Debug`` does (quotes, backslashes, non-printables)."""
    out = []
    for ch in text:
        if ch in _DEBUG_ESCAPES:
            out.append(_DEBUG_ESCAPES[ch])
        elif ch != " " and unicodedata.category(ch) in _DEBUG_UNICODE_ESCAPED:
            out.append(f"\\u{{{ord(ch):x}}}")
        else:
            out.append(ch)
    return "".join(out)


class MigrationAuditLog:
    """Bounded, thread-safe audit trail of migrations (optionally backed by a durable sink).

    ``len()``, iteration, :meth:`is_empty` and :meth:`clear` concern the in-memory ring
    (the newest ``capacity`` entries). The ``get_*`` queries read the sink when there is
    one, so they also find entries the ring has evicted; without a sink they read the ring.
    A durable record is append-only: :meth:`clear` never deletes persisted entries.

    >>> log = MigrationAuditLog.with_capacity(2)
    >>> mid, aid = bytes(16), b"\\x01" * 16
    >>> log.log_start(mid, aid)
    >>> log.log_completion(mid, aid, False, "target lost")
    >>> log.log_completion(mid, aid, True, "done")
    >>> [e.event_type.name for e in log]
    ['MIGRATION_FAILED', 'MIGRATION_COMPLETED']
    >>> [e.details for e in log.get_failures()]
    ['target lost']
    """

    def __init__(
        self,
        capacity: int = DEFAULT_AUDIT_CAPACITY,
        *,
        sink: Union["AuditSink", str, "os.PathLike[str]", None] = None,
    ) -> None:
        from .audit_store import AuditSink, SqliteAuditSink  # audit_store imports this module

        if isinstance(capacity, bool):
            raise TypeError("capacity must be an int, not bool")
        capacity = operator.index(capacity)
        if capacity < 1:
            raise ValueError(f"audit log capacity must be at least 1, got {capacity}")
        owned = False
        if isinstance(sink, (str, os.PathLike)):
            sink, owned = SqliteAuditSink(sink), True  # a path: the default durable sink
        elif sink is not None and not isinstance(sink, AuditSink):
            raise TypeError(f"sink must be an AuditSink or a database path, not {type(sink).__name__}")
        self._capacity = capacity
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe
        self._sink: Optional[AuditSink] = sink
        # deque(maxlen) drops the oldest entry on append: the ring's eviction order.
        self._entries: Deque[AuditEntry] = deque(maxlen=capacity)
        if sink is not None:
            # Reopening a durable log: the ring shows the newest persisted entries.
            try:
                self._entries.extend(sink.recent(capacity))
            except BaseException:
                if owned:  # a sink opened here is closed here (a corrupt database, say)
                    sink.close()
                raise

    @classmethod
    def with_capacity(
        cls, capacity: int, *, sink: Union["AuditSink", str, "os.PathLike[str]", None] = None
    ) -> "MigrationAuditLog":
        """A log keeping at most ``capacity`` entries in memory (``ValueError`` if < 1)."""
        return cls(capacity, sink=sink)

    @property
    def capacity(self) -> int:
        """Most entries kept in memory."""
        return self._capacity

    @property
    def sink(self) -> Optional["AuditSink"]:
        """The durable sink, or ``None`` for a memory-only log."""
        return self._sink

    # -- writing -------------------------------------------------------------------

    def log(self, entry: AuditEntry) -> None:
        """Append ``entry``; with a sink it is durably stored before this returns.

        If the sink fails, the error propagates and the entry is not added to memory
        either, so memory never claims more than was persisted.
        """
        if not isinstance(entry, AuditEntry):
            raise TypeError(f"entry must be an AuditEntry, not {type(entry).__name__}")
        with self._lock:
            if self._sink is not None:
                self._sink.append(entry)
            self._entries.append(entry)

    def log_start(
        self,
        migration_id: IdLike,
        agent_id: IdLike,
        source_node: Optional[IdLike] = None,
        target_node: Optional[IdLike] = None,
    ) -> None:
        """MIGRATION_STARTED, "Migration initiated", success, with the nodes."""
        entry = AuditEntry.new(
            migration_id, agent_id, AuditEventType.MIGRATION_STARTED, "Migration initiated", True
        ).with_nodes(source_node, target_node)
        self.log(entry)

    def log_completion(self, migration_id: IdLike, agent_id: IdLike, success: bool, details: str) -> None:
        """MIGRATION_COMPLETED when ``success`` else MIGRATION_FAILED, with ``details``."""
        success = bool(success)
        event = AuditEventType.MIGRATION_COMPLETED if success else AuditEventType.MIGRATION_FAILED
        self.log(AuditEntry.new(migration_id, agent_id, event, details, success))

    def log_validation(self, migration_id: IdLike, agent_id: IdLike, status: "CompatibilityStatus") -> None:
        """VALIDATION_COMPLETED with the compatibility outcome (texts as the crate's)."""
        from .validation import CompatibilityKind  # here: validation imports this module

        if status.kind is CompatibilityKind.COMPATIBLE:
            details, success = "Compatibility check passed", True
        elif status.kind is CompatibilityKind.COMPATIBLE_WITH_WARNINGS:
            details = "Compatibility check passed with warnings: " + _render_warnings(status.warnings())
            success = True
        else:
            details, success = f"Incompatible: {status.reason}", False
        self.log(AuditEntry.new(migration_id, agent_id, AuditEventType.VALIDATION_COMPLETED, details, success))

    def log_verification(self, migration_id: IdLike, agent_id: IdLike, result: "VerificationResult") -> None:
        """VERIFICATION_COMPLETED: the result's details joined with "; "."""
        self.log(
            AuditEntry.new(
                migration_id,
                agent_id,
                AuditEventType.VERIFICATION_COMPLETED,
                "; ".join(result.details),
                bool(result.passed),
            )
        )

    def log_rollback(
        self, migration_id: IdLike, agent_id: IdLike, started: bool, success: bool, details: str
    ) -> None:
        """ROLLBACK_STARTED when ``started`` else ROLLBACK_COMPLETED."""
        event = AuditEventType.ROLLBACK_STARTED if started else AuditEventType.ROLLBACK_COMPLETED
        self.log(AuditEntry.new(migration_id, agent_id, event, details, bool(success)))

    # -- queries (insertion order) -------------------------------------------------

    def _select(self, **criteria: Any) -> List[AuditEntry]:
        # The sink serialises its own access: a query need not block log() callers.
        sink = self._sink
        if sink is not None:
            return sink.query(**criteria)
        with self._lock:
            entries = list(self._entries)
        mid = criteria.get("migration_id")
        aid = criteria.get("agent_id")
        event = criteria.get("event_type")
        failures = criteria.get("failures_only", False)
        start = criteria.get("start")
        end = criteria.get("end")
        return [
            e
            for e in entries
            if (mid is None or e.migration_id == mid)
            and (aid is None or e.agent_id == aid)
            and (event is None or e.event_type is event)
            and (not failures or not e.success)
            and (start is None or e.timestamp >= start)
            and (end is None or e.timestamp <= end)
        ]

    def get_migration_entries(self, migration_id: IdLike) -> List[AuditEntry]:
        """Every entry of one migration."""
        return self._select(migration_id=to_id(migration_id, "migration_id"))

    def get_agent_entries(self, agent_id: IdLike) -> List[AuditEntry]:
        """Every entry about one agent."""
        return self._select(agent_id=to_id(agent_id, "agent_id"))

    def get_entries_by_type(self, event_type: AuditEventType) -> List[AuditEntry]:
        """Every entry of one event type."""
        if not isinstance(event_type, AuditEventType):
            raise TypeError(f"event_type must be an AuditEventType, not {type(event_type).__name__}")
        return self._select(event_type=event_type)

    def get_failures(self) -> List[AuditEntry]:
        """Every entry with ``success`` False, of any type."""
        return self._select(failures_only=True)

    def get_entries_in_range(self, start: int, end: int) -> List[AuditEntry]:
        """Entries with ``start <= timestamp <= end`` (empty when ``start > end``)."""
        start, end = operator.index(start), operator.index(end)
        # Timestamps are 64-bit (as stored): a bound past that range selects as its edge.
        start, end = max(start, -(2**63)), min(end, 2**63 - 1)
        if start > end:
            return []
        return self._select(start=start, end=end)

    # -- the in-memory ring --------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __iter__(self) -> Iterator[AuditEntry]:
        # Iterate over a snapshot so concurrent log() calls cannot break the iteration.
        with self._lock:
            snapshot = list(self._entries)
        return iter(snapshot)

    def entries(self) -> List[AuditEntry]:
        """The entries in memory, oldest first (a copy)."""
        with self._lock:
            return list(self._entries)

    def is_empty(self) -> bool:
        """True when no entry is held in memory."""
        return len(self) == 0

    def clear(self) -> None:
        """Drop the in-memory entries; capacity and any persisted entries stay."""
        with self._lock:
            self._entries.clear()

    def close(self) -> None:
        """Close the sink, if any (the in-memory entries stay readable)."""
        if self._sink is not None:
            self._sink.close()

    def __enter__(self) -> "MigrationAuditLog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        sink = "" if self._sink is None else f", sink={self._sink!r}"
        return f"MigrationAuditLog(len={len(self)}, capacity={self._capacity}{sink})"

    # -- JSON Lines ----------------------------------------------------------------

    def all_entries(self) -> List[AuditEntry]:
        """Every entry known: the sink's whole record when there is one, else the ring."""
        return self._select()

    def export_jsonl(self, destination: Union[str, "os.PathLike[str]", Any]) -> int:
        """Write :meth:`all_entries` as JSON Lines to a path or text file; returns the count."""
        from .audit_store import export_jsonl

        return export_jsonl(self.all_entries(), destination)

    def import_jsonl(self, source: Union[str, "os.PathLike[str]", Any]) -> int:
        """Log every entry of a JSON Lines file (persisting them with a sink); returns the count.

        The whole file is parsed first, so a malformed line (``CorruptDataError``) logs nothing.
        """
        from .audit_store import import_jsonl

        entries = import_jsonl(source)
        with self._lock:
            if self._sink is not None:
                self._sink.append_many(entries)
            self._entries.extend(entries)
        return len(entries)

