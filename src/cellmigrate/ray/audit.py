"""The fleet audit trail: every node's audit entries in one durable store.

A :class:`FleetAudit` starts one small sink actor, pinned to a node (the driver's by
default), that owns a :class:`~cellmigrate.audit_store.SqliteAuditSink`. Every actor
taking part in a migration — the source, which runs the pre-copy driver, and the target,
which stages and proves the state — and the orchestrating driver log through a
:class:`RemoteAuditSink` pointing at that actor: ``append`` returns only once the sink
actor has committed the entry to SQLite (WAL, ``synchronous=FULL`` by default), exactly
the durability contract of a local sink.

The record is queried with the usual audit queries, through Ray
(``fleet.log.get_migration_entries(mid)``) or, once closed, straight from the file::

    fleet = FleetAudit("/var/lib/cellmigrate/fleet.db")
    migrate_many(moves, audit=fleet)
    fleet.log.get_failures()
    fleet.close()
    MigrationAuditLog(sink="/var/lib/cellmigrate/fleet.db").get_failures()   # same entries
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Union

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..audit import AuditEntry, AuditEventType, MigrationAuditLog
from ..audit_store import SqliteAuditSink
from ..errors import MigrationFailedError

__all__ = ["FleetAudit", "RemoteAuditSink", "AuditSinkActor"]

#: Seconds an audit write or query may take before the caller gives up.
DEFAULT_AUDIT_TIMEOUT = 30.0


class _SinkActor:
    """The process that owns the fleet's SQLite audit database."""

    def __init__(self, path: str, synchronous: str) -> None:
        self._sink = SqliteAuditSink(path, synchronous=synchronous)

    def append(self, entry: AuditEntry) -> int:
        return self._sink.append(entry)

    def append_many(self, entries: Sequence[AuditEntry]) -> None:
        self._sink.append_many(list(entries))

    def query(self, criteria: Dict[str, Any]) -> List[AuditEntry]:
        return self._sink.query(**criteria)

    def recent(self, n: int) -> List[AuditEntry]:
        return self._sink.recent(n)

    def count(self) -> int:
        return self._sink.count()

    def close(self) -> None:
        self._sink.close()


#: The sink actor class (one CPU-free process; calls are served one at a time).
AuditSinkActor = ray.remote(num_cpus=0, max_restarts=0)(_SinkActor)


class RemoteAuditSink:
    """An :class:`~cellmigrate.audit_store.AuditSink` forwarding to the fleet's sink actor.

    Picklable (it holds the actor's handle), so it travels to every actor of a migration.
    ``close()`` closes nothing: the store belongs to its :class:`FleetAudit`.
    """

    def __init__(self, actor: Any, timeout: float = DEFAULT_AUDIT_TIMEOUT) -> None:
        self.actor = actor
        self.timeout = float(timeout)

    def _call(self, ref: Any) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayError as exc:
            raise MigrationFailedError(f"fleet audit store unavailable: {type(exc).__name__}: {exc}") from None

    def append(self, entry: AuditEntry) -> int:
        """Store ``entry``; returns once the sink actor committed it."""
        return int(self._call(self.actor.append.remote(entry)))

    def append_many(self, entries: Sequence[AuditEntry]) -> None:
        """Store several entries in one transaction."""
        self._call(self.actor.append_many.remote(list(entries)))

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
        """Entries matching every criterion, in insertion order."""
        criteria = {
            "migration_id": migration_id,
            "agent_id": agent_id,
            "event_type": event_type,
            "failures_only": failures_only,
            "start": start,
            "end": end,
        }
        return list(self._call(self.actor.query.remote(criteria)))

    def recent(self, n: int) -> List[AuditEntry]:
        """The newest ``n`` entries, oldest first."""
        return list(self._call(self.actor.recent.remote(n)))

    def count(self) -> int:
        """Entries stored."""
        return int(self._call(self.actor.count.remote()))

    def close(self) -> None:
        """Nothing to close here (see :meth:`FleetAudit.close`)."""

    def __repr__(self) -> str:
        return f"RemoteAuditSink({self.actor!r})"


class FleetAudit:
    """One durable audit store for a whole Ray cluster (a sink actor and its SQLite file).

    ``path`` is the database file on ``node_id`` (default: the calling driver's node,
    so the file is local to the driver), or ``":memory:"`` for a store that lives as
    long as the actor. ``synchronous`` is SQLite's setting ("FULL": each entry survives
    power loss). :attr:`log` is a :class:`~cellmigrate.audit.MigrationAuditLog` over it.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"] = ":memory:",
        *,
        node_id: Optional[str] = None,
        synchronous: str = "FULL",
        timeout: float = DEFAULT_AUDIT_TIMEOUT,
    ) -> None:
        where = os.fspath(path)
        if where != ":memory:":
            where = os.path.abspath(where)  # the sink actor's working directory is not ours
        node = node_id if node_id is not None else ray.get_runtime_context().get_node_id()
        self.path = where
        self.node_id = str(node)
        self.actor = AuditSinkActor.options(scheduling_strategy=NodeAffinitySchedulingStrategy(self.node_id, soft=False)).remote(
            where, synchronous
        )
        self.sink = RemoteAuditSink(self.actor, timeout)
        try:
            self.sink.count()  # fails here, not mid-migration, if the store cannot open
        except MigrationFailedError:
            ray.kill(self.actor, no_restart=True)
            raise
        self.log = MigrationAuditLog.with_capacity(1024, sink=self.sink)

    def close(self) -> None:
        """Close the database and stop the sink actor (idempotent)."""
        actor, self.actor = self.actor, None
        if actor is None:
            return
        try:
            ray.get(actor.close.remote(), timeout=self.sink.timeout)
        finally:
            ray.kill(actor, no_restart=True)

    def __enter__(self) -> "FleetAudit":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FleetAudit({self.path!r}, node={self.node_id[:12]})"
