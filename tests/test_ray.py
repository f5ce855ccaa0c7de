"""cellmigrate.ray on a real three-node Ray cluster on this machine (marker ``ray``).

One cluster per module (``ray.cluster_utils.Cluster``: a head node for the driver and the
audit sink, nodes A and B for the agents, each with a small object store), every address
on 127.0.0.1 — verified from /proc, not assumed. Ray reads
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when it is imported: at ``0`` every node uses the
loopback address instead of asking the routing table for the machine's interface.

Agents are :class:`ray_agents.Writer` actors whose writes replay exactly, so every test
can check the migrated memory against a replay of the same steps.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List, Set, Tuple

import numpy as np
import pytest

# Before anything imports ray (it reads this once, at import).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

pytestmark = pytest.mark.ray

MiB = 1 << 20
_OBJECT_STORE = 96 * MiB
# Fast failure detection: a removed node is declared dead in about a second.
_SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 300,
    "health_check_failure_threshold": 3,
}


# --------------------------------------------------------------------------------------
# The cluster, and proof that it only uses 127.0.0.1
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    import ray
    from ray._private import ray_constants
    from ray.cluster_utils import Cluster

    assert ray_constants.ENABLE_RAY_CLUSTER is False, "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set"
    # The workers import the test agents (tests/ray_agents.py) by module name.
    here = str(Path(__file__).resolve().parent)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = here if not saved else here + os.pathsep + saved
    node_args = {"num_cpus": 1, "object_store_memory": _OBJECT_STORE, "node_ip_address": "127.0.0.1"}
    c = Cluster(
        initialize_head=True,
        head_node_args={**node_args, "include_dashboard": False, "_system_config": _SYSTEM_CONFIG},
    )
    a = c.add_node(**node_args)
    b = c.add_node(**node_args)
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        c.wait_for_nodes()
        yield SimpleNamespace(
            ray=ray,
            cluster=c,
            head=c.head_node.node_id,
            a=a.node_id,
            b=b.node_id,
            node_args=node_args,
            handles={a.node_id: a, b.node_id: b},
        )
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


@pytest.fixture(scope="module")
def agents(cluster: SimpleNamespace) -> Any:
    import ray_agents

    return ray_agents


@pytest.fixture()
def fleet(cluster: SimpleNamespace, tmp_path: Path) -> Iterator[Any]:
    from cellmigrate.ray import FleetAudit

    with FleetAudit(tmp_path / "fleet.db", node_id=cluster.head) as audit:
        yield audit


def _descendants(root: int) -> Set[int]:
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [root]
    while todo:
        pid = todo.pop()
        out.add(pid)
        todo.extend(children.get(pid, []))
    return out


def _socket_inodes(pids: Set[int]) -> Dict[int, int]:
    inodes: Dict[int, int] = {}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes[int(link[8:-1])] = pid
    return inodes


def _address(hex_addr: str) -> str:
    host, port = hex_addr.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # /proc prints an IPv6 address as four little-endian 32-bit words
        ip = socket.inet_ntop(socket.AF_INET6, b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4)))
    return f"{ip}:{int(port, 16)}"


def _inet_sockets(pids: Set[int]) -> List[Tuple[str, str, str, str]]:
    """(protocol, state, local, remote) of every IP socket the processes hold."""
    inodes = _socket_inodes(pids)
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        with open(f"/proc/net/{proto}") as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                if int(cols[9]) in inodes:
                    found.append((proto, cols[3], _address(cols[1]), _address(cols[2])))
    return found


def _loopback(addr: str) -> bool:
    return addr.rsplit(":", 1)[0] in ("127.0.0.1", "::ffff:127.0.0.1")


def test_cluster_listens_and_talks_on_loopback_only(cluster: SimpleNamespace, agents: Any) -> None:
    ray = cluster.ray
    # Some traffic first: an actor on each agent node and an object between them.
    w = [agents.Writer.options(scheduling_strategy=_on(n)).remote(64 * 1024, 1) for n in (cluster.a, cluster.b)]
    assert ray.get([x.node.remote() for x in w]) == [cluster.a, cluster.b]
    assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
    pids = _descendants(os.getpid())
    sockets = _inet_sockets(pids)
    listening = [s for s in sockets if s[0].startswith("tcp") and s[1] == "0A"]
    # gcs, three raylets (object manager, node manager), the workers' gRPC servers
    assert len(listening) >= 7, sockets
    others = [s for s in sockets if not _loopback(s[2]) or (s[1] != "0A" and s[0].startswith("tcp") and not _loopback(s[3]))]
    assert others == [], f"sockets off 127.0.0.1: {others}"
    udp_remote = [s for s in sockets if s[0].startswith("udp") and not s[3].startswith(("0.0.0.0:0", ":::0"))]
    assert udp_remote == [], udp_remote
    for x in w:
        ray.kill(x)


def _on(node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=False)


def _wait_steps(ray: Any, actor: Any, at_least: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = int(ray.get(actor.step_count.remote(), timeout=timeout))
        if n >= at_least or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def _assert_replays(agents: Any, size: int, seed: int, stopped: Tuple[int, bytes]) -> int:
    steps, state = stopped
    expected = agents.replay(size, seed, steps)
    got = np.frombuffer(state, dtype=np.uint8)
    assert got.nbytes == size
    if not np.array_equal(got, expected):
        bad = int(np.flatnonzero(got != expected)[0])
        raise AssertionError(f"after {steps} steps the state differs from the replay first at byte {bad}")
    return steps


def _events(fleet: Any, migration_id: bytes) -> List[Tuple[str, str, bool]]:
    return [(e.event_type.name, e.details, e.success) for e in fleet.log.get_migration_entries(migration_id)]


# --------------------------------------------------------------------------------------
# One agent, moved while it writes
# --------------------------------------------------------------------------------------


def test_one_agent_moves_while_it_writes(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    from cellmigrate import MigrationAuditLog
    from cellmigrate.ray import migrate, node_of

    ray = cluster.ray
    size, seed = 8 * MiB, 11
    source = agents.Writer.options(scheduling_strategy=_on(cluster.a)).remote(size, seed)
    source.run.remote(3000.0)
    before = _wait_steps(ray, source, 200)
    assert before >= 200

    result = migrate(source, cluster.b, audit=fleet, downtime_limit=0.05, chunk_bytes=2 * MiB, timeout=30)

    assert result.ok and result.error is None
    assert result.source_node == cluster.a and result.target_node == cluster.b
    assert node_of(result.actor) == cluster.b
    assert result.rounds >= 2 and result.state_size == size
    assert result.wire_bytes > 0 and result.downtime_s is not None and result.downtime_s < 5
    # the agent carries on where it stopped, on node B ...
    moved = result.actor
    after = _wait_steps(ray, moved, ray.get(moved.step_count.remote()) + 300)
    assert after > before
    steps = _assert_replays(agents, size, seed, ray.get(moved.stop.remote()))
    assert steps >= after
    # ... and the old actor is gone
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(source.step_count.remote(), timeout=30)

    # Every side's steps are in the one fleet store, with the node ids on the driver's.
    events = _events(fleet, result.migration_id)
    names = [name for name, _, _ in events]
    assert names[0] == "MIGRATION_STARTED" and names[-1] == "MIGRATION_COMPLETED"
    assert names.count("VERIFICATION_COMPLETED") >= 2  # the target's proof and the source's record of it
    assert names.count("MIGRATION_COMPLETED") == 3  # target session, source driver, Ray orchestration
    assert all(ok for _, _, ok in events)
    assert any("Digest verified" in d for _, d, _ in events)
    assert any("retired" in d for _, d, _ in events)
    first = fleet.log.get_migration_entries(result.migration_id)[0]
    assert first.source_node == bytes.fromhex(cluster.a)[:16] and first.target_node == bytes.fromhex(cluster.b)[:16]
    # the same record, read straight from the SQLite file by the core's audit queries
    with MigrationAuditLog(sink=fleet.path) as log:
        assert [e.event_type.name for e in log.get_migration_entries(result.migration_id)] == names


def test_hot_pages_cross_the_object_store_as_xzr_pages(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    """An agent whose steps keep rewriting the same 16 pages: with the sender's page cache
    the rounds after the first resend carry them as XZR pages (PAGES chunks through the
    object store), and the moved agent's memory replays exactly; without the cache the
    same rounds send every page whole."""
    from cellmigrate.ray import migrate

    ray = cluster.ray
    size, seed = 64 * 1024, 12
    wire = {}
    for cache in (64 * MiB, 0):
        source = agents.Writer.options(scheduling_strategy=_on(cluster.a)).remote(size, seed)
        source.run.remote(10000.0)
        _wait_steps(ray, source, 100)
        result = migrate(source, cluster.b, audit=fleet, downtime_limit=1e-9, max_rounds=4, page_cache_bytes=cache,
                         timeout=30)
        assert result.ok and result.rounds >= 3
        _assert_replays(agents, size, seed, ray.get(result.actor.stop.remote()))
        wire[cache] = result.wire_bytes
        ray.kill(result.actor)
    # Round 0 and the first resend are alike; after them a page costs about 80 bytes
    # instead of 4 KiB (measured: 58-83 KB saved of 153-174 KB in all).
    assert wire[0] - wire[64 * MiB] >= 3 * 4096, wire


# --------------------------------------------------------------------------------------
# A node drained of 16 agents
# --------------------------------------------------------------------------------------


def test_drain_sixteen_agents_from_a_node(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    from cellmigrate.ray import AgentProgress, drain_node

    ray = cluster.ray
    size, n = 2 * MiB, 16
    sources = [agents.Writer.options(scheduling_strategy=_on(cluster.a)).remote(size, 100 + i) for i in range(n)]
    bystander = agents.Writer.options(scheduling_strategy=_on(cluster.b)).remote(size, 99)
    for s in sources:
        s.run.remote(500.0)
    for s in sources:
        _wait_steps(ray, s, 20)

    events: List[AgentProgress] = []
    lock = threading.Lock()
    budget, concurrent = 8 * MiB, 4

    def on_progress(p: AgentProgress) -> None:
        with lock:
            events.append(p)

    results = drain_node(
        sources + [bystander],
        cluster.a,
        [cluster.b],
        audit=fleet,
        max_concurrent=concurrent,
        max_bytes_in_flight=budget,
        on_progress=on_progress,
        downtime_limit=0.05,
        timeout=60,
    )
    assert len(results) == n  # the bystander on node B is not moved
    assert [r.index for r in results] == list(range(n))
    failed = [(r.index, r.error_type, r.error) for r in results if not r.ok]
    assert failed == []
    assert all(r.target_node == cluster.b and r.source_node == cluster.a for r in results)
    assert ray.get([r.actor.node.remote() for r in results]) == [cluster.b] * n
    # bounds: each migration kept at most its share of the bytes in flight ...
    share = budget // concurrent
    assert all(0 < r.peak_bytes_in_flight <= share for r in results)
    # ... and no more than `concurrent` agents were between placing and done at once
    phase: Dict[int, str] = {}
    most = 0
    for p in events:
        phase[p.index] = p.phase
        most = max(most, sum(v in ("placing", "starting", "sending") for v in phase.values()))
    assert 1 <= most <= concurrent
    assert {p.index for p in events if p.phase == "done"} == set(range(n))
    assert any(p.wire_bytes > 0 and p.phase == "sending" for p in events)
    # every agent's memory is its own replay, and it keeps running on node B
    stopped = ray.get([r.actor.stop.remote() for r in results])
    for i, s in enumerate(stopped):
        _assert_replays(agents, size, 100 + i, s)
    assert all(r.rounds >= 2 and r.downtime_s is not None for r in results)
    # one durable record of the 16 migrations
    assert len({e.migration_id for e in fleet.log.get_entries_by_type(_type("MIGRATION_COMPLETED"))}) == n
    assert fleet.log.get_failures() == []
    for r in results + [SimpleNamespace(actor=bystander)]:
        ray.kill(r.actor)


def _type(name: str) -> Any:
    from cellmigrate import AuditEventType

    return AuditEventType[name]


# --------------------------------------------------------------------------------------
# Failures: a corrupted delta in the object store; the target node killed
# --------------------------------------------------------------------------------------


def test_corrupted_chunk_in_object_store_is_refused(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    from cellmigrate import CorruptDataError
    from cellmigrate.ray import migrate

    ray = cluster.ray
    size, seed = 4 * MiB, 21
    source = agents.CorruptedWriter.options(scheduling_strategy=_on(cluster.a)).remote(size, seed)
    source.run.remote(1000.0)
    _wait_steps(ray, source, 50)
    with pytest.raises(CorruptDataError, match="digest mismatch"):
        migrate(source, cluster.b, audit=fleet, chunk_bytes=1 * MiB, timeout=30)
    damage = ray.get(source.corruption.remote())
    assert damage["seq"] == 1
    # the source still runs, its memory intact
    n = ray.get(source.step_count.remote())
    assert _wait_steps(ray, source, n + 100) >= n + 100
    _assert_replays(agents, size, seed, ray.get(source.stop.remote()))
    failures = fleet.log.get_failures()
    assert any(e.event_type.name == "MIGRATION_FAILED" and "digest mismatch" in e.details for e in failures)
    rollbacks = fleet.log.get_entries_by_type(_type("ROLLBACK_COMPLETED"))
    assert any("new actor discarded" in e.details and e.success for e in rollbacks)
    ray.kill(source)


def test_target_node_killed_mid_migration(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    from cellmigrate.ray import AgentProgress, migrate_many

    ray = cluster.ray
    extra = cluster.cluster.add_node(**cluster.node_args)
    cluster.cluster.wait_for_nodes()
    size, seed = 8 * MiB, 31
    source = agents.SlowWriter.options(scheduling_strategy=_on(cluster.a)).remote(size, seed)
    source.run.remote(1000.0)
    _wait_steps(ray, source, 50)

    sending = threading.Event()

    def on_progress(p: AgentProgress) -> None:
        if p.phase == "sending" and p.wire_bytes > 0:
            sending.set()

    out: List[Any] = []
    mover = threading.Thread(
        target=lambda: out.extend(
            migrate_many([(source, extra.node_id)], audit=fleet, on_progress=on_progress, chunk_bytes=256 * 1024, timeout=30)
        )
    )
    mover.start()
    assert sending.wait(60), "the migration never started sending"
    cluster.cluster.remove_node(extra)
    mover.join(90)
    assert not mover.is_alive()
    (result,) = out
    assert not result.ok
    assert result.error_type in ("ConnectionLostError", "PeerTimeoutError"), (result.error_type, result.error)
    assert result.actor is source
    # nothing lost: the source kept running; its memory is its replay
    n = ray.get(source.step_count.remote())
    assert _wait_steps(ray, source, n + 100) >= n + 100
    events = _events(fleet, result.migration_id)
    assert events[-1][0] == "MIGRATION_FAILED"
    assert any(name == "ROLLBACK_COMPLETED" and "keeps running" in d for name, d, _ in events)
    # and it can still be moved, to a live node
    from cellmigrate.ray import migrate

    again = migrate(source, cluster.b, audit=fleet, timeout=30)
    _assert_replays(agents, size, seed, ray.get(again.actor.stop.remote()))
    ray.kill(again.actor)


def test_fleet_audit_store_lost_mid_migration(cluster: SimpleNamespace, agents: Any, tmp_path: Path) -> None:
    """The audit store dies while rounds run: the migration fails, the source runs on, alone."""
    from cellmigrate.ray import AgentProgress, FleetAudit, migrate_many

    ray = cluster.ray
    fleet = FleetAudit(tmp_path / "lost.db", node_id=cluster.head)
    size, seed = 4 * MiB, 41
    source = agents.SlowWriter.options(scheduling_strategy=_on(cluster.a)).remote(size, seed)
    source.run.remote(1000.0)
    _wait_steps(ray, source, 50)
    sending = threading.Event()

    def on_progress(p: AgentProgress) -> None:
        if p.phase == "sending" and p.wire_bytes > 0:
            sending.set()

    out: List[Any] = []
    mover = threading.Thread(
        target=lambda: out.extend(
            migrate_many([(source, cluster.b)], audit=fleet, on_progress=on_progress, chunk_bytes=256 * 1024, timeout=30)
        )
    )
    mover.start()
    assert sending.wait(60)
    ray.kill(fleet.actor, no_restart=True)
    mover.join(120)
    assert not mover.is_alive()
    (result,) = out
    assert not result.ok and result.actor is source
    assert "audit store unavailable" in (result.error or ""), result.error
    n = ray.get(source.step_count.remote())
    assert _wait_steps(ray, source, n + 100) >= n + 100  # not left paused
    _assert_replays(agents, size, seed, ray.get(source.stop.remote()))
    ray.kill(source)


def test_bad_target_node_is_refused_and_source_untouched(cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    from cellmigrate import InvalidStateError
    from cellmigrate.ray import migrate

    ray = cluster.ray
    source = agents.Writer.options(scheduling_strategy=_on(cluster.a)).remote(64 * 1024, 5)
    with pytest.raises(InvalidStateError, match="no live Ray node"):
        migrate(source, "ab" * 28, audit=fleet, timeout=30)
    with pytest.raises(InvalidStateError, match="already runs on node"):
        migrate(source, cluster.a, audit=fleet, timeout=30)
    assert ray.get(source.node.remote()) == cluster.a
    ray.kill(source)


def test_a_target_that_cannot_adopt_fails_the_migration_with_one_prefix(
        cluster: SimpleNamespace, agents: Any, fleet: Any) -> None:
    """The source actor reported a CellError as str(exc), prefix included, and the driver
    rebuilt it from that text: "Migration failed: Migration failed: target could not
    adopt the state: nope"."""
    from cellmigrate import MigrationFailedError
    from cellmigrate.ray import migrate

    ray = cluster.ray
    source = agents.RefusingWriter.options(scheduling_strategy=_on(cluster.a)).remote(64 * 1024, 6)
    ray.get(source.run.remote(500.0), timeout=30)
    with pytest.raises(MigrationFailedError) as failed:
        migrate(source, cluster.b, audit=fleet, timeout=30)
    assert str(failed.value) == "Migration failed: target could not adopt the state: nope"
    details = [d for _, d, ok in _events(fleet, fleet.log.get_failures()[-1].migration_id) if not ok]
    assert any(d.endswith("MigrationFailedError: target could not adopt the state: nope") for d in details), details
    n = ray.get(source.step_count.remote(), timeout=30)
    assert _wait_steps(ray, source, n + 50) >= n + 50  # the source runs on
    _assert_replays(agents, 64 * 1024, 6, ray.get(source.stop.remote(), timeout=30))
    ray.kill(source)


# --------------------------------------------------------------------------------------
# The README's example, as a user runs it (its own cluster, in its own process)
# --------------------------------------------------------------------------------------


def test_readme_ray_example_runs(cluster: SimpleNamespace, tmp_path: Path) -> None:
    import re
    import subprocess
    import sys

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    (block,) = re.findall(r"```py\n(.*?)```", readme, flags=re.S)
    script = tmp_path / "example.py"
    script.write_text(block, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert re.search(r"^\d+ rounds, \d+ bytes, downtime \d+\.\d+ s$", proc.stdout, flags=re.M), proc.stdout
    assert "'MIGRATION_COMPLETED']" in proc.stdout
    from cellmigrate import MigrationAuditLog

    with MigrationAuditLog(sink=tmp_path / "fleet.db") as log:
        assert [e.event_type.name for e in log.get_failures()] == []
        assert len(log.get_entries_by_type(_type("MIGRATION_COMPLETED"))) == 3


# -- errors across the actor boundary (no cluster needed) ----------------------------------------


def test_remote_errors_keep_their_class_or_the_nearest_one_built_from_a_message() -> None:
    """An actor's error is raised again by class name; classes that need more than a
    message (``DeclaredSizeError``, ``InputTooLargeError``: a size and limit) come back as
    their nearest base class that is, never as a TypeError from the rebuild."""
    from cellmigrate import CellError, CorruptDataError, InputTooLargeError, StateChangedError
    from cellmigrate.live.errors import ConnectionLostError
    from cellmigrate.ray.channel import remote_error
    from cellmigrate.ray.migrate import MigrationResult

    with pytest.raises(TypeError):
        InputTooLargeError("too big")  # type: ignore[call-arg]
    declared = remote_error("DeclaredSizeError", "delta declares too much")
    assert type(declared) is CorruptDataError and declared.message == "delta declares too much"
    too_big = remote_error("InputTooLargeError", "state too large")
    assert type(too_big) is CellError and too_big.message == "state too large"
    assert type(remote_error("StateChangedError", "x")) is StateChangedError
    assert type(remote_error("ConnectionLostError", "y")) is ConnectionLostError
    assert type(remote_error("NoSuchError", "z")).__name__ == "MigrationFailedError"
    failed = MigrationResult(index=0, ok=False, actor=None, source_node="a", target_node="b",
                             error_type="DeclaredSizeError", error="over the limit")
    with pytest.raises(CorruptDataError, match="over the limit"):
        failed.raise_for_error()


@pytest.mark.parametrize("raised, bare, reported", [
    ("MigrationFailedError", "target could not adopt the state: nope",
     "Migration failed: target could not adopt the state: nope"),
    ("PeerTimeoutError", "commit: no answer from the target actor in time",
     "Migration failed: commit: no answer from the target actor in time"),
    ("InvalidStateError", "agent extra is 9 bytes; the limit is 8", "Invalid state: agent extra is 9 bytes; the limit is 8"),
    ("CorruptDataError", "chunk 3: unknown page encoding 9", "chunk 3: unknown page encoding 9"),
])
def test_a_failed_send_reports_a_cell_error_by_its_bare_message(raised: str, bare: str, reported: str) -> None:
    """What the source actor reports travels as (class name, text) and is rebuilt by
    class, which adds the class's prefix: the text must not carry it already."""
    from cellmigrate.ray.actor import _Sender
    from cellmigrate.ray.channel import error_class
    from cellmigrate.ray.migrate import MigrationResult

    class Source:
        def cellmigrate_channel(self, target: Any, **settings: Any) -> Any:
            raise error_class(raised)(bare)

    sender = _Sender(Source(), None, {"timeout": 5, "max_bytes_in_flight": 1, "target_options": {}})  # type: ignore[arg-type]
    sender._run()
    assert sender.error == (raised, bare)
    failed = MigrationResult(index=0, ok=False, actor=None, source_node="a", target_node="b",
                             error_type=sender.error[0], error=sender.error[1])
    with pytest.raises(error_class(raised)) as again:
        failed.raise_for_error()
    assert str(again.value) == reported


@pytest.mark.parametrize("error", ["unavailable", "died"])
def test_a_commit_without_an_answer_kills_the_target(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """Ray's ActorUnavailableError says the call "may or may not have executed": the
    target may have adopted the state and resumed the agent. Like a timeout, any commit
    that got no answer kills the target, so the source (which resumes) is the only copy."""
    import ray

    from cellmigrate.live.errors import ConnectionLostError
    from cellmigrate.ray import channel as ray_channel

    killed: List[Any] = []
    target = SimpleNamespace(_cellmigrate_commit=SimpleNamespace(remote=lambda digest, extra: "ref"))

    def no_answer(ref: Any, timeout: float) -> None:
        if error == "unavailable":
            raise ray.exceptions.ActorUnavailableError("the actor is temporarily unavailable", None)
        raise ray.exceptions.ActorDiedError()

    monkeypatch.setattr(ray_channel.ray, "get", no_answer)
    monkeypatch.setattr(ray_channel.ray, "kill", lambda actor, no_restart: killed.append((actor, no_restart)))
    channel = ray_channel.RayChannel(target)
    with pytest.raises(ConnectionLostError, match="target actor killed"):
        channel.commit(bytes(16), b"")
    assert killed == [(target, True)]


def test_a_commit_whose_target_cannot_be_killed_leaves_the_outcome_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """No answer, and the kill fails too (killing a dead actor is a no-op in Ray, so this
    is something else): the target may run the agent, so the source must stay paused."""
    import ray

    from cellmigrate.live.errors import OutcomeUnknownError
    from cellmigrate.ray import channel as ray_channel

    target = SimpleNamespace(_cellmigrate_commit=SimpleNamespace(remote=lambda digest, extra: "ref"))

    def no_answer(ref: Any, timeout: float) -> None:
        raise ray.exceptions.ActorUnavailableError("the actor is temporarily unavailable", None)

    def cannot_kill(actor: Any, no_restart: bool) -> None:
        raise RuntimeError("GCS unreachable")

    monkeypatch.setattr(ray_channel.ray, "get", no_answer)
    monkeypatch.setattr(ray_channel.ray, "kill", cannot_kill)
    with pytest.raises(OutcomeUnknownError, match="could not be killed.*stays paused"):
        ray_channel.RayChannel(target).commit(bytes(16), b"")
