"""Drain a Ray node: 16 agents × 64 MiB moved to another node, cellmigrate vs the naive way.

Run (needs ``pip install ".[ray]"``, ~4 GiB of free RAM, ~3 minutes)::

    pytest benches/test_bench_ray.py -m ray --benchmark-only -s

A three-node ``ray.cluster_utils.Cluster`` on 127.0.0.1 (head: the driver; A: the agents;
B: where they go). Each agent (:class:`ray_bench_agents.Dirtier`) holds 64 MiB of random
bytes and keeps rewriting 1% of its pages every 100 ms while it runs. Three ways to move
all 16 from A to B, at most 4 at a time:

- ``cellmigrate``: :func:`cellmigrate.ray.drain_node` — live pre-copy rounds through the
  object store while the agent runs, the paused final round, the target's proof of byte
  equality (``max_bytes_in_flight`` 256 MiB);
- ``naive (ray.get)``: what a Ray user writes today — pause the agent,
  ``state = ray.get(old.get_state.remote())`` in the driver, ``new.set_state.remote(state)``,
  resume the new actor, kill the old one (the state crosses A → driver → B; nothing verified);
- ``naive (ref)``: the same, passing the object reference straight to the new actor
  (A → B, once; nothing verified).

Reported side by side: wall time of the drain, bytes moved between nodes (cellmigrate:
the payload put in the object store; naive: the state per hop), the agents' downtime
(paused → running on B), rounds. The agent runs on its own threads in the meantime,
so wall time includes the other agents' dirtying on this 2-core machine.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Dict, Iterator, List

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: loopback only

pytestmark = pytest.mark.ray

MiB = 1 << 20
AGENTS = 16
STATE = 64 * MiB
DIRTY_FRACTION = 0.01
DIRTY_PERIOD = 0.1
CONCURRENT = 4
IN_FLIGHT = 256 * MiB
_ROWS: List[Dict[str, Any]] = []


@pytest.fixture(scope="module")
def cluster() -> Iterator[SimpleNamespace]:
    import ray
    from ray.cluster_utils import Cluster

    here = str(Path(__file__).resolve().parent)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = here if not saved else here + os.pathsep + saved
    args = {"num_cpus": 1, "object_store_memory": 768 * MiB, "node_ip_address": "127.0.0.1"}
    c = Cluster(initialize_head=True, head_node_args={**args, "include_dashboard": False})
    a, b = c.add_node(**args), c.add_node(**args)
    ray.init(address=c.address, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        c.wait_for_nodes()
        yield SimpleNamespace(ray=ray, a=a.node_id, b=b.node_id, head=c.head_node.node_id)
    finally:
        ray.shutdown()
        c.shutdown()
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
        _print_table()


def _on(node: str) -> Any:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(node, soft=False)


def _agents(cluster: SimpleNamespace) -> List[Any]:
    import ray_bench_agents

    ray = cluster.ray
    agents = [ray_bench_agents.Dirtier.options(scheduling_strategy=_on(cluster.a)).remote(STATE) for _ in range(AGENTS)]
    ray.get([x.fill.remote(i) for i, x in enumerate(agents)])
    ray.get([x.run.remote(DIRTY_FRACTION, DIRTY_PERIOD, i) for i, x in enumerate(agents)])
    time.sleep(2 * DIRTY_PERIOD)
    return agents


def _naive(cluster: SimpleNamespace, agents: List[Any], by_ref: bool) -> Dict[str, Any]:
    import ray_bench_agents

    ray = cluster.ray
    downtimes: List[float] = []
    moved: List[Any] = []
    t0 = time.monotonic()
    for lo in range(0, len(agents), CONCURRENT):
        batch = agents[lo : lo + CONCURRENT]
        new = [ray_bench_agents.Dirtier.options(scheduling_strategy=_on(cluster.b)).remote(STATE) for _ in batch]
        ray.get([n.digest.remote() for n in new])  # placed and constructed (cellmigrate waits for this too)
        paused = time.monotonic()
        refs = [old.get_state.remote() for old in batch]
        if by_ref:
            ray.get([n.set_state.remote(r) for n, r in zip(new, refs)])
        else:
            states = ray.get(refs)
            ray.get([n.set_state.remote(s) for n, s in zip(new, states)])
            del states
        ray.get([n.resume.remote() for n in new])
        downtimes += [time.monotonic() - paused] * len(batch)
        for old in batch:
            ray.kill(old)
        moved += new
    wall = time.monotonic() - t0
    hops = 1 if by_ref else 2
    for n in moved:
        ray.kill(n)
    return {"wall_s": wall, "bytes": hops * STATE * len(agents), "downtimes": downtimes, "rounds": [1] * len(agents)}


def _cellmigrate(cluster: SimpleNamespace, agents: List[Any]) -> Dict[str, Any]:
    from cellmigrate.ray import FleetAudit, drain_node

    ray = cluster.ray
    with FleetAudit(":memory:", node_id=cluster.head) as fleet:
        t0 = time.monotonic()
        results = drain_node(
            agents, cluster.a, [cluster.b], audit=fleet, max_concurrent=CONCURRENT, max_bytes_in_flight=IN_FLIGHT, timeout=120
        )
        wall = time.monotonic() - t0
    bad = [(r.index, r.error) for r in results if not r.ok]
    assert bad == []
    digests = ray.get([r.actor.digest.remote() for r in results])
    assert len(set(digests)) == len(results)  # 16 distinct agents arrived
    per_round = [
        statistics.mean(x["dirty_pages"] for x in r.summary["rounds"][1:]) / (STATE // 4096)
        for r in results
        if r.summary and len(r.summary["rounds"]) > 1
    ]
    for r in results:
        ray.kill(r.actor)
    return {
        "wall_s": wall,
        "bytes": sum(r.wire_bytes for r in results),
        "downtimes": [r.downtime_s for r in results],
        "rounds": [r.rounds for r in results],
        "dirty_per_delta_round": statistics.mean(per_round) if per_round else 0.0,
    }


def _record(benchmark: Any, name: str, row: Dict[str, Any]) -> None:
    downtimes = row.pop("downtimes")
    rounds = row.pop("rounds")
    row.update(
        name=name,
        downtime_mean_s=statistics.mean(downtimes),
        downtime_max_s=max(downtimes),
        rounds_mean=statistics.mean(rounds),
        bytes_over_state=row["bytes"] / (STATE * AGENTS),
    )
    benchmark.extra_info.update(row)
    _ROWS.append(row)


@pytest.mark.parametrize("method", ["cellmigrate", "naive (ray.get)", "naive (ref)"])
def test_drain_16_agents(benchmark: Any, cluster: SimpleNamespace, method: str) -> None:
    benchmark.group = "ray drain 16 x 64 MiB"
    out: Dict[str, Any] = {}

    def setup() -> Any:
        return (_agents(cluster),), {}

    def run(agents: List[Any]) -> None:
        if method == "cellmigrate":
            out.update(_cellmigrate(cluster, agents))
        else:
            out.update(_naive(cluster, agents, by_ref=method == "naive (ref)"))

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1)
    _record(benchmark, method, out)


def _print_table() -> None:
    if not _ROWS:
        return
    lines = [
        "",
        f"Ray drain: {AGENTS} agents x {STATE // MiB} MiB, {DIRTY_FRACTION:.0%} of pages dirtied every "
        f"{DIRTY_PERIOD:.1f} s, node A -> node B, {CONCURRENT} at a time",
        "| method | wall s | MB moved | moved / state | downtime mean s | downtime max s | rounds | verified |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in _ROWS:
        lines.append(
            f"| {r['name']} | {r['wall_s']:.2f} | {r['bytes'] / 1e6:.0f} | {r['bytes_over_state']:.2f} | "
            f"{r['downtime_mean_s']:.3f} | {r['downtime_max_s']:.3f} | {r['rounds_mean']:.1f} | "
            f"{'yes (digest proof)' if r['name'] == 'cellmigrate' else 'no'} |"
        )
    ours = next((r for r in _ROWS if r["name"] == "cellmigrate"), None)
    if ours is not None:
        lines.append(f"cellmigrate delta rounds carried {ours['dirty_per_delta_round']:.2%} of the pages on average")
    print("\n".join(lines))
