"""Migrate agents held by Ray actors between the nodes of a Ray cluster, live and verified.

``pip install "cellmigrate[ray]"``. Nothing else in cellmigrate imports this subpackage;
inside it, ``import ray`` is the real Ray.

- :class:`MigratableActor`: the mixin an actor class adds (the protocol:
  ``cellmigrate_state``, ``cellmigrate_adopt``, and optionally ``cellmigrate_pause``,
  ``cellmigrate_resume``, ``cellmigrate_extra``; see :mod:`cellmigrate.ray.actor` and docs/RAY.md);
- :func:`migrate`: one agent to a chosen node — a new actor there (node affinity), the
  live pre-copy rounds of :class:`cellmigrate.live.LiveMigration` with every chunk carried
  by Ray's object store, the paused final round, the target's proof of byte equality,
  then the new actor resumes and the old one is retired; on failure the old one keeps
  running and the new one is discarded;
- :func:`migrate_many` / :func:`drain_node`: many agents at once, bounded in concurrency
  and in bytes in flight, with progress per agent and overall and a result per agent;
- :class:`FleetAudit`: every node's audit entries in one durable SQLite store.
"""

from __future__ import annotations

from .actor import REPLICA_KWARG, MigratableActor, MigratableAgent, WriteGate
from .audit import AuditSinkActor, FleetAudit, RemoteAuditSink
from .channel import DEFAULT_BYTES_IN_FLIGHT, DEFAULT_TIMEOUT, RayChannel
from .migrate import (
    DEFAULT_MAX_BYTES_IN_FLIGHT,
    DEFAULT_MAX_CONCURRENT,
    AgentProgress,
    MigrationResult,
    default_audit,
    drain_node,
    migrate,
    migrate_many,
    node_of,
)

__all__ = [
    "MigratableActor",
    "MigratableAgent",
    "WriteGate",
    "REPLICA_KWARG",
    "RayChannel",
    "FleetAudit",
    "RemoteAuditSink",
    "AuditSinkActor",
    "MigrationResult",
    "AgentProgress",
    "migrate",
    "migrate_many",
    "drain_node",
    "node_of",
    "default_audit",
    "DEFAULT_TIMEOUT",
    "DEFAULT_BYTES_IN_FLIGHT",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_BYTES_IN_FLIGHT",
]
