"""Move agents between the nodes of a Ray cluster: one (:func:`migrate`), many, a whole node.

For each agent (an actor mixing in :class:`~cellmigrate.ray.actor.MigratableActor`):

1. ask the source actor who it is and how it was built;
2. build a new actor of the same class with the same arguments on the chosen node
   (``NodeAffinitySchedulingStrategy(node, soft=False)``), starting paused;
3. start the live migration inside the source actor (:class:`~cellmigrate.live.driver.LiveMigration`
   over a :class:`~cellmigrate.ray.channel.RayChannel`): consistent pre-copy rounds while the
   agent runs, the paused final round, the target's proof of byte equality, adoption, resume;
4. on success retire (kill) the source actor; on any failure kill the new actor — the
   source keeps running, having been resumed by the driver — and report the error.

Every step is written to the fleet audit store (:class:`~cellmigrate.ray.audit.FleetAudit`),
from the driver, the source and the target alike.

:func:`migrate_many` runs several at once, at most ``max_concurrent`` and at most
``max_bytes_in_flight`` unacknowledged bytes in the object store in all, with progress
per agent and overall, and one :class:`MigrationResult` per agent, in input order.
"""

from __future__ import annotations

import collections
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from tqdm import tqdm

from ..audit import AuditEntry, AuditEventType, MigrationAuditLog
from ..checksum import PAGE_SIZE
from ..errors import CellError, InvalidStateError, MigrationFailedError
from ..live.driver import DEFAULT_DOWNTIME_LIMIT, DEFAULT_MAX_ROUNDS
from ..live.page_cache import DEFAULT_PAGE_CACHE_BYTES
from ..live.pages import DEFAULT_CHUNK_BYTES
from ..validation import AgentRequirements, NodeCapabilities
from .actor import REPLICA_KWARG
from .audit import FleetAudit
from .channel import DEFAULT_TIMEOUT, remote_error

__all__ = [
    "MigrationResult",
    "AgentProgress",
    "migrate",
    "migrate_many",
    "drain_node",
    "node_of",
    "default_audit",
    "DEFAULT_MAX_CONCURRENT",
    "DEFAULT_MAX_BYTES_IN_FLIGHT",
]

#: Migrations :func:`migrate_many` runs at once unless told otherwise.
DEFAULT_MAX_CONCURRENT = 4
#: Unacknowledged payload bytes in the object store, all migrations together.
DEFAULT_MAX_BYTES_IN_FLIGHT = 256 << 20
# Seconds between two progress polls of one source actor.
_POLL_S = 0.05


@dataclass(frozen=True)
class MigrationResult:
    """The outcome of one agent's migration.

    ``actor`` is the handle that runs the agent now: the new actor when ``ok``, else
    the source actor (still running). Bytes: ``wire_bytes`` crossed the object store
    (encoded pages), ``page_bytes`` is the raw page bytes they carried. ``downtime_s``
    is the pause from ``cellmigrate_pause`` on the source to the new actor resumed.
    ``error_type``/``error`` name the failure (a cellmigrate error class and its text).
    """

    index: int
    ok: bool
    actor: Any
    source_node: str
    target_node: str
    agent_id: Optional[bytes] = None
    migration_id: Optional[bytes] = None
    state_size: int = 0
    rounds: int = 0
    wire_bytes: int = 0
    page_bytes: int = 0
    downtime_s: Optional[float] = None
    duration_s: float = 0.0
    stop_reason: str = ""
    peak_bytes_in_flight: int = 0
    error_type: Optional[str] = None
    error: Optional[str] = None
    summary: Optional[Dict[str, Any]] = field(default=None, repr=False, compare=False)

    def raise_for_error(self) -> "MigrationResult":
        """Raise the failure as its cellmigrate error class; return ``self`` when ok."""
        if not self.ok:
            raise remote_error(self.error_type or "MigrationFailedError", self.error or "migration failed")
        return self


@dataclass(frozen=True)
class AgentProgress:
    """One agent's progress (``phase``: queued, placing, sending, done, failed)."""

    index: int
    phase: str
    agent_id: Optional[bytes]
    rounds: int
    wire_bytes: int
    state_size: int


_default: Dict[Tuple[str, str], FleetAudit] = {}


def default_audit() -> FleetAudit:
    """The driver's default fleet audit store (in memory in a sink actor), made on first use."""
    ctx = ray.get_runtime_context()
    key = (str(ctx.gcs_address), str(ctx.get_job_id()))
    fleet = _default.get(key)
    if fleet is None:
        fleet = _default[key] = FleetAudit(":memory:")
    return fleet


def node_of(actor: Any, timeout: float = DEFAULT_TIMEOUT) -> str:
    """The id of the node ``actor`` runs on (asks the actor)."""
    return str(ray.get(actor._cellmigrate_ready.remote(), timeout=timeout))


def _alive_nodes() -> Dict[str, Dict[str, Any]]:
    return {str(n["NodeID"]): n for n in ray.nodes() if n.get("Alive")}


def _node16(node_id: str) -> Optional[bytes]:
    """The first 16 bytes of a Ray node id: what an audit entry's node field holds."""
    try:
        raw = bytes.fromhex(node_id)
    except ValueError:
        return None
    return raw[:16] if len(raw) >= 16 else None


def _actor_class(actor: Any) -> Any:
    """The ``@ray.remote`` class ``actor`` was built from, found by its module and name."""
    desc = actor._ray_actor_creation_function_descriptor
    module_name, where = str(desc.module_name), f"{desc.module_name}.{desc.class_name}"
    # Only modules this driver has already loaded: importing one could run a script again
    # (Ray names a class defined in the main script after the script's file).
    module = sys.modules.get(module_name)
    main = sys.modules.get("__main__")
    if module is None and main is not None and Path(str(getattr(main, "__file__", ""))).stem == module_name:
        module = main
    try:
        if module is None:
            raise AttributeError(module_name)
        obj: Any = module
        for part in str(desc.class_name).split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise InvalidStateError(f"cannot find the actor class {where} in this driver; pass actor_class=") from None
    if not isinstance(obj, ray.actor.ActorClass):
        raise InvalidStateError(f"{where} is not a @ray.remote actor class; pass actor_class=")
    return obj


class _Move:
    """One agent's migration, driven step by step by :func:`migrate_many`'s loop."""

    def __init__(self, index: int, source: Any, target_node: str, run: "_Run") -> None:
        self.index = index
        self.source = source
        self.target_node = str(target_node)
        self.run = run
        self.phase = "queued"
        self.ref: Any = None
        self.deadline = 0.0
        self.next_poll = 0.0
        self.started = 0.0
        self.info: Dict[str, Any] = {}
        self.target: Any = None
        self.status: Dict[str, Any] = {}
        self.migration_id = uuid.uuid4().bytes
        self.result: Optional[MigrationResult] = None

    # -- audit -----------------------------------------------------------------------

    def _log(self, event: AuditEventType, details: str, success: bool = True) -> None:
        agent = self.info.get("agent_id")
        if agent is None:
            return  # nothing known about the agent yet: the failure is in the result
        entry = AuditEntry.new(self.migration_id, agent, event, details, success).with_nodes(
            _node16(str(self.info.get("node_id", ""))), _node16(self.target_node)
        )
        try:
            self.run.log.log(entry)
        except CellError as exc:  # the store is gone: say so in the result, keep cleaning up
            self.run.audit_errors.append(str(exc))

    # -- steps -----------------------------------------------------------------------

    def begin(self) -> None:
        self.phase = "placing"
        self.started = time.monotonic()
        self._call(self.source._cellmigrate_info.remote())

    def _call(self, ref: Any) -> None:
        self.ref = ref
        self.deadline = time.monotonic() + self.run.timeout

    def advance(self, value: Any) -> None:
        """The pending call returned ``value``: take the next step."""
        self.ref = None
        if self.phase == "placing" and self.target is None:
            self._place(value)
        elif self.phase == "placing":
            self._start(value)
        elif self.phase == "starting":
            self.phase = "sending"
            self.next_poll = time.monotonic() + _POLL_S
        elif self.phase == "sending":
            self._polled(value)

    def _place(self, info: Dict[str, Any]) -> None:
        self.info = info
        source_node = str(info["node_id"])
        if self.target_node not in _alive_nodes():
            raise InvalidStateError(f"no live Ray node {self.target_node}")
        if self.target_node == source_node:
            raise InvalidStateError(f"the agent already runs on node {source_node}")
        self._log(
            AuditEventType.MIGRATION_STARTED,
            f"Ray migration of actor {info['actor_id']}: node {source_node} -> node {self.target_node}",
        )
        run = self.run
        cls = run.actor_class if run.actor_class is not None else _actor_class(self.source)
        args = info["args"] if run.args is None else run.args
        kwargs = dict(info["kwargs"] if run.kwargs is None else run.kwargs)
        kwargs[REPLICA_KWARG] = True
        strategy = NodeAffinitySchedulingStrategy(self.target_node, soft=False)
        self.target = cls.options(scheduling_strategy=strategy, **run.actor_options).remote(*args, **kwargs)
        self._call(self.target._cellmigrate_ready.remote())

    def _start(self, node: str) -> None:
        if node != self.target_node:
            raise MigrationFailedError(f"the new actor was placed on node {node}, not {self.target_node}")
        self._log(
            AuditEventType.TRANSFER_STARTED,
            f"Ray: new actor {self.target._actor_id.hex()} running on node {node} (node affinity); live rounds start",
        )
        self.phase = "starting"
        self._call(self.source._cellmigrate_start_send.remote(self.target, self.run.send_options(self.migration_id)))

    def _polled(self, status: Dict[str, Any]) -> None:
        self.status = status
        self.next_poll = time.monotonic() + _POLL_S
        if not status["done"]:
            return
        if status["error"] is not None:
            name, message = status["error"]
            self.fail(name, message)
            return
        summary = status["summary"]
        assert summary is not None
        try:
            ray.kill(self.source, no_restart=True)
            retired = "retired"
        except Exception as exc:  # already gone: nothing runs there either way
            retired = f"already gone ({exc})"
        self._log(
            AuditEventType.MIGRATION_COMPLETED,
            f"Ray: agent runs in actor {self.target._actor_id.hex()} on node {self.target_node}; source actor "
            f"{self.info['actor_id']} on node {self.info['node_id']} {retired}; {len(summary['rounds'])} rounds, "
            f"{summary['wire_bytes']} bytes through the object store, downtime {summary['downtime_s']:.3f} s",
        )
        self._finish(True, summary=summary)

    def fail(self, name: str, message: str) -> None:
        """Discard the new actor, make sure the source runs, record the failure."""
        self.ref = None
        paused = bool(self.status.get("paused"))
        target = self.target
        if target is not None:
            self._log(AuditEventType.ROLLBACK_STARTED, f"Ray: discarding the new actor on node {self.target_node}: {message}")
            try:
                ray.kill(target, no_restart=True)
            except Exception:  # already dead with its node
                pass
        running = "source actor running"
        try:
            if self.phase in ("starting", "sending"):
                status = ray.get(self.source._cellmigrate_poll.remote(), timeout=self.run.timeout)
                if status["paused"] or paused:
                    # Outcome unknown: with the new actor killed, only the source can run it.
                    ray.get(self.source._cellmigrate_resume_fenced.remote(), timeout=self.run.timeout)
                    running = "source actor resumed after the new actor was killed"
            ok = True
        except ray.exceptions.RayError as exc:
            running, ok = f"source actor unreachable: {type(exc).__name__}", False
        if target is not None:
            self._log(
                AuditEventType.ROLLBACK_COMPLETED,
                f"Ray: new actor discarded; agent keeps running in actor {self.info.get('actor_id')} "
                f"on node {self.info.get('node_id')} ({running})",
                ok,
            )
        self._log(AuditEventType.MIGRATION_FAILED, f"Ray migration failed: {name}: {message}", False)
        self._finish(False, error=(name, message))

    def _finish(self, ok: bool, summary: Optional[Dict[str, Any]] = None, error: Optional[Tuple[str, str]] = None) -> None:
        self.phase = "done" if ok else "failed"
        status = self.status
        rounds = summary["rounds"] if summary else []
        self.result = MigrationResult(
            index=self.index,
            ok=ok,
            actor=self.target if ok else self.source,
            source_node=str(self.info.get("node_id", "")),
            target_node=self.target_node,
            agent_id=self.info.get("agent_id"),
            migration_id=self.migration_id,
            state_size=int(summary["state_size"]) if summary else int(status.get("state_size", 0) or self.info.get("state_size", 0)),
            rounds=len(rounds) if summary else int(status.get("rounds", 0)),
            wire_bytes=int(summary["wire_bytes"]) if summary else int(status.get("wire_bytes", 0)),
            page_bytes=int(summary["page_bytes"]) if summary else 0,
            downtime_s=float(summary["downtime_s"]) if summary else None,
            duration_s=time.monotonic() - self.started,
            stop_reason=str(summary["stop_reason"]) if summary else "",
            peak_bytes_in_flight=int(status.get("peak_bytes_in_flight", 0)),
            error_type=None if error is None else error[0],
            error=None if error is None else error[1],
            summary=summary,
        )

    def progress(self) -> AgentProgress:
        status = self.status
        return AgentProgress(
            index=self.index,
            phase=self.phase,
            agent_id=self.info.get("agent_id"),
            rounds=int(status.get("rounds", 0)),
            wire_bytes=int(status.get("wire_bytes", 0)),
            state_size=int(status.get("state_size", 0) or self.info.get("state_size", 0)),
        )


class _Run:
    """The settings shared by the moves of one :func:`migrate_many` call."""

    def __init__(self, **kw: Any) -> None:
        self.actor_class: Any = kw["actor_class"]
        self.args: Optional[Sequence[Any]] = kw["args"]
        self.kwargs: Optional[Dict[str, Any]] = kw["kwargs"]
        self.actor_options: Dict[str, Any] = dict(kw["actor_options"] or {})
        self.timeout: float = kw["timeout"]
        self.share: int = kw["share"]
        self.chunk_bytes: int = kw["chunk_bytes"]
        self.downtime_limit: float = kw["downtime_limit"]
        self.max_rounds: int = kw["max_rounds"]
        self.compress: bool = kw["compress"]
        self.page_cache_bytes: int = kw["page_cache_bytes"]
        self.requirements: Optional[AgentRequirements] = kw["requirements"]
        self.capabilities: Optional[NodeCapabilities] = kw["capabilities"]
        self.fleet: FleetAudit = kw["fleet"]
        self.log: MigrationAuditLog = self.fleet.log
        self.audit_errors: List[str] = []

    def send_options(self, migration_id: bytes) -> Dict[str, Any]:
        sink = self.fleet.sink
        return {
            "migration_id": migration_id,
            "timeout": self.timeout,
            "max_bytes_in_flight": self.share,
            "chunk_bytes": self.chunk_bytes,
            "downtime_limit": self.downtime_limit,
            "max_rounds": self.max_rounds,
            "compress": self.compress,
            "page_cache_bytes": self.page_cache_bytes,
            "requirements": self.requirements,
            "audit_sink": sink,
            "target_options": {"timeout": self.timeout, "audit_sink": sink, "capabilities": self.capabilities},
        }


def migrate_many(
    moves: Iterable[Tuple[Any, str]],
    *,
    max_concurrent: int = DEFAULT_MAX_CONCURRENT,
    max_bytes_in_flight: int = DEFAULT_MAX_BYTES_IN_FLIGHT,
    progress: Optional[bool] = None,
    on_progress: Optional[Callable[[AgentProgress], None]] = None,
    audit: Optional[FleetAudit] = None,
    actor_class: Any = None,
    args: Optional[Sequence[Any]] = None,
    kwargs: Optional[Dict[str, Any]] = None,
    actor_options: Optional[Dict[str, Any]] = None,
    downtime_limit: float = DEFAULT_DOWNTIME_LIMIT,
    max_rounds: int = DEFAULT_MAX_ROUNDS,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compress: bool = True,
    page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
    requirements: Optional[AgentRequirements] = None,
    capabilities: Optional[NodeCapabilities] = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> List[MigrationResult]:
    """Migrate each ``(actor, target_node_id)`` of ``moves``; one result per move, in order.

    At most ``max_concurrent`` migrations run at once; each may keep
    ``max_bytes_in_flight // max_concurrent`` unacknowledged bytes in the object store
    (its chunks are made no bigger), so all of them together never exceed
    ``max_bytes_in_flight``. A failure does not stop the others: it is in its result.

    ``progress``: tqdm bars (one per running agent and one overall) — ``None`` shows them
    only on a terminal. ``on_progress`` receives an :class:`AgentProgress` for each agent
    every time its figures change. ``audit`` is the fleet store every step goes to
    (:func:`default_audit` when ``None``). ``actor_class``/``args``/``kwargs``/
    ``actor_options`` override how the new actors are built (default: the source's class,
    found by name, with the source's constructor arguments and the class's options).
    ``downtime_limit``, ``max_rounds``, ``chunk_bytes``, ``compress``, ``page_cache_bytes``
    (the sender's XZR page cache; 0: none), ``requirements``: the live driver's settings;
    ``capabilities``: what the target nodes offer (checked against ``requirements``).
    ``timeout`` bounds every step (seconds).

    Raises ``ValueError`` for bad settings; everything else is reported per agent.
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be >= 1, got {max_concurrent}")
    share = max_bytes_in_flight // max_concurrent
    if share < PAGE_SIZE:
        raise ValueError(
            f"max_bytes_in_flight={max_bytes_in_flight} leaves less than one {PAGE_SIZE}-byte page per concurrent migration"
        )
    if timeout <= 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
    chunk = max(PAGE_SIZE, min(chunk_bytes, share) // PAGE_SIZE * PAGE_SIZE)
    run = _Run(
        actor_class=actor_class,
        args=args,
        kwargs=kwargs,
        actor_options=actor_options,
        timeout=float(timeout),
        share=share,
        chunk_bytes=chunk,
        downtime_limit=downtime_limit,
        max_rounds=max_rounds,
        compress=compress,
        page_cache_bytes=page_cache_bytes,
        requirements=requirements,
        capabilities=capabilities,
        fleet=audit if audit is not None else default_audit(),
    )
    todo: Deque[_Move] = collections.deque(_Move(i, actor, node, run) for i, (actor, node) in enumerate(moves))
    moves_all = list(todo)
    disable = None if progress is None else not progress
    overall = tqdm(total=len(moves_all), desc="agents", unit="agent", disable=disable, leave=True)
    bars: Dict[int, Any] = {}
    active: List[_Move] = []
    last: Dict[int, AgentProgress] = {}

    def report(move: _Move) -> None:
        now = move.progress()
        if last.get(move.index) != now:
            last[move.index] = now
            if on_progress is not None:
                on_progress(now)
        bar = bars.get(move.index)
        if bar is None and move.phase == "sending" and not overall.disable:
            bar = bars[move.index] = tqdm(
                total=max(now.state_size, 1), desc=f"agent {move.index}", unit="B", unit_scale=True, leave=False
            )
        if bar is not None:
            bar.n = min(now.wire_bytes, bar.total)
            bar.set_postfix_str(f"round {now.rounds}", refresh=True)

    def settle(move: _Move) -> None:
        report(move)
        bar = bars.pop(move.index, None)
        if bar is not None:
            bar.close()
        done = [m.result for m in moves_all if m.result is not None]
        overall.update(1)
        overall.set_postfix_str(
            f"{sum(r.ok for r in done)} ok, {sum(not r.ok for r in done)} failed, "
            f"{sum(r.wire_bytes for r in done) / 1e6:.1f} MB moved"
        )

    try:
        while todo or active:
            while todo and len(active) < max_concurrent:
                move = todo.popleft()
                active.append(move)
                _guard(move, move.begin)
                report(move)
            now = time.monotonic()
            for move in active:
                if move.ref is None and move.phase == "sending" and now >= move.next_poll:
                    move._call(move.source._cellmigrate_poll.remote())
            pending = {m.ref: m for m in active if m.ref is not None}
            if pending:
                ray.wait(list(pending), num_returns=1, timeout=_POLL_S)
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
            else:
                time.sleep(_POLL_S)
                ready = []
            for ref in ready:
                move = pending[ref]
                _guard(move, lambda: move.advance(ray.get(ref)))
            now = time.monotonic()
            for move in active:
                if move.ref is not None and move.result is None and now > move.deadline:
                    move.fail("PeerTimeoutError", f"no answer in the {move.phase} step within {run.timeout:.1f} s")
            for move in list(active):
                report(move)
                if move.result is not None:
                    active.remove(move)
                    settle(move)
    finally:
        for move in active + list(todo):  # interrupted (KeyboardInterrupt...): leave no new actor behind
            if move.result is None and move.target is not None:
                try:
                    ray.kill(move.target, no_restart=True)
                except Exception:
                    pass
        for bar in bars.values():
            bar.close()
        overall.close()
    results = [m.result for m in moves_all]
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def _guard(move: _Move, step: Callable[[], None]) -> None:
    """Run one step of ``move``; any error fails the move (and only it)."""
    try:
        step()
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, CellError):
            move.fail(type(cause).__name__, cause.message)
        else:
            move.fail("MigrationFailedError", f"{type(cause).__name__}: {cause}")
    except ray.exceptions.RayError as exc:
        move.fail("ConnectionLostError", f"{type(exc).__name__}: {exc}")
    except CellError as exc:
        move.fail(type(exc).__name__, exc.message)


def migrate(actor: Any, target_node_id: str, **options: Any) -> MigrationResult:
    """Migrate one agent to ``target_node_id``; the result (``.actor`` is the new actor).

    Takes :func:`migrate_many`'s keyword options (its concurrency settings aside:
    ``max_bytes_in_flight`` is this migration's own bound). Raises the failure's
    :class:`~cellmigrate.errors.CellError` after the new actor was discarded and the
    source actor resumed.
    """
    options.setdefault("progress", False)
    options.setdefault("max_bytes_in_flight", DEFAULT_MAX_BYTES_IN_FLIGHT // DEFAULT_MAX_CONCURRENT)
    (result,) = migrate_many([(actor, target_node_id)], max_concurrent=1, **options)
    return result.raise_for_error()


def drain_node(
    actors: Iterable[Any], node_id: str, to_nodes: Sequence[str], **options: Any
) -> List[MigrationResult]:
    """Move every actor of ``actors`` that runs on ``node_id`` to ``to_nodes`` (round-robin).

    Actors elsewhere are left alone (and get no result). ``options``: :func:`migrate_many`'s.
    """
    targets = [str(n) for n in to_nodes if str(n) != str(node_id)]
    if not targets:
        raise ValueError("to_nodes must name at least one node other than the drained one")
    timeout = float(options.get("timeout", DEFAULT_TIMEOUT))
    handles = list(actors)
    where = ray.get([a._cellmigrate_ready.remote() for a in handles], timeout=timeout)
    on_node = [a for a, n in zip(handles, where) if str(n) == str(node_id)]
    return migrate_many([(a, targets[i % len(targets)]) for i, a in enumerate(on_node)], **options)
