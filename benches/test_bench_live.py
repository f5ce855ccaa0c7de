"""Live migration over localhost TCP between two processes (issue 11 §6).

1. Full-state transfer, verified (stop-and-copy: ``LiveMigration(max_rounds=0)`` of a file's
   pages, receiver proves the page root, ``xxh3_128_tree`` of 4 KiB pages), next to ``socket.sendfile`` of the
   same file into a receiver that only stores the bytes (no verification). Goal: ≥ 0.7×.
2. Pre-copy of an agent whose writer thread dirties 64 MiB/s (64-byte writes to random
   pages): rounds, wire bytes ÷ state size, and downtime (pause → target resumed) against
   the goal ``2 × (time to read the state once) + final dirty bytes ÷ link bandwidth``.

Both receivers stage into fresh memory in a separate process (page faults included on both
sides). Sizes: 64 MiB; 1 GiB with ``--bench-large`` / ``CELLMIGRATE_BENCH_LARGE=1``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import numpy as np
import pytest
import xxhash

from cellmigrate.live import BufferSource, LiveMigration, RoundStats
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.transport import connect

from conftest import GiB, MiB, _large, _label

SERVER = r"""
import socket, sys, numpy as np
from cellmigrate.live import BufferTarget, MemoryStore
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.transport import SocketStream, accept, listen
mode = sys.argv[1]
lst = listen("127.0.0.1:0")
print(lst.getsockname()[1], flush=True)
while True:
    if mode.startswith("live"):
        # "live-prefault": the staging prefault helper forced on (by default it runs only
        # with >= 4 usable CPUs), to show what it costs or gains on this machine.
        prefault = True if mode == "live-prefault" else None
        rx = LiveReceiver(MemoryStore(), BufferTarget(on_adopt=lambda state, extra: None), prefault=prefault)
        rx.serve(lst)
        continue
    conn, _ = lst.accept()
    with conn:
        head = conn.recv(8, socket.MSG_WAITALL)
        if len(head) < 8:
            continue
        n = int.from_bytes(head, "little")
        buf = np.empty(n, dtype=np.uint8)  # fresh memory, as the live receiver's staging
        view, got = memoryview(buf), 0
        while got < n:
            k = conn.recv_into(view[got:])
            if not k:
                break
            got += k
        conn.sendall(b"k")
"""


def _server(mode: str) -> Iterator[str]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, mode], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    try:
        yield f"127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def live_server() -> Iterator[str]:
    yield from _server("live")


@pytest.fixture(scope="module")
def prefault_server() -> Iterator[str]:
    yield from _server("live-prefault")


@pytest.fixture(scope="module")
def raw_server() -> Iterator[str]:
    yield from _server("raw")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "live_size" in metafunc.fixturenames:
        sizes = [64 * MiB] + ([GiB] if _large(metafunc.config) else [])
        metafunc.parametrize("live_size", sizes, ids=[_label(s) for s in sizes])


@pytest.fixture(scope="module")
def state_file(tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    made = {}

    def make(size: int) -> Path:
        if size not in made:
            path = tmp_path_factory.mktemp("live") / f"state-{size}.bin"
            data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
            data[: size // 8] = 0  # an eighth zero pages, as real states have
            data.tofile(path)
            made[size] = path
        return made[size]

    return make


@pytest.mark.parametrize("receiver", ["live_server", "prefault_server"])
def test_full_state_transfer_verified(
    measure: Callable[..., float], request: pytest.FixtureRequest, receiver: str, state_file: Callable[[int], Path],
    live_size: int,
) -> None:
    """Stop-and-copy into the default receiver, and into one with its staging prefaulted on
    a helper thread (off by default below 4 usable CPUs: on two it slowed this row down)."""
    server: str = request.getfixturevalue(receiver)
    path = state_file(live_size)
    with open(path, "rb") as f:
        import mmap

        mapped = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)

    def migrate() -> None:
        LiveMigration(BufferSource(mapped), StreamChannel(lambda: connect(server)), max_rounds=0).run()

    default = receiver == "live_server"
    name = "LiveMigration stop-and-copy (verified)" + ("" if default else ", receiver prefault helper on")
    measure("live transfer, localhost TCP", name, migrate, live_size, ours=default)


def test_sendfile_baseline(
    measure: Callable[..., float], raw_server: str, state_file: Callable[[int], Path], live_size: int
) -> None:
    path = state_file(live_size)
    host, port = raw_server.rsplit(":", 1)

    def push() -> None:
        with socket.create_connection((host, int(port))) as s, open(path, "rb") as f:
            s.sendall(live_size.to_bytes(8, "little"))
            s.sendfile(f)
            assert s.recv(1) == b"k"

    measure("live transfer, localhost TCP", "socket.sendfile (no verification)", push, live_size)


class Writer:
    """Dirties ``rate`` bytes/s of pages: bursts of 64-byte writes to random pages."""

    def __init__(self, state: "np.ndarray[Any, Any]", rate: float) -> None:
        self.state, self.rate = state, rate
        self.paused = threading.Event()
        self.idle = threading.Event()
        self.quit = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    BURST = 256  # pages per burst

    def run(self) -> None:
        rng = np.random.default_rng(1)
        pages = self.state.nbytes // 4096
        rows = self.state[: pages * 4096].reshape(pages, 4096)
        while not self.quit:
            if self.paused.is_set():
                self.idle.set()
                time.sleep(0.001)
                continue
            self.idle.clear()
            self.burst(rng, rows)
            self.until_next_burst()

    def until_next_burst(self) -> None:
        time.sleep(self.BURST * 4096 / self.rate)

    def burst(self, rng: "np.random.Generator", rows: "np.ndarray[Any, Any]") -> None:
        rows[rng.integers(0, len(rows), self.BURST), :64] = rng.integers(0, 256, (self.BURST, 64), dtype=np.uint8)

    def pause(self) -> None:
        self.paused.set()
        self.idle.wait(5)

    def resume(self) -> None:
        self.paused.clear()


def _read_once_seconds(state: "np.ndarray[Any, Any]") -> float:
    """Best of 3: one pass over the state (the fastest of a uint64 sum and XXH3-64)."""
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        state.view(np.uint64).sum()
        best = min(best, time.perf_counter() - t)
        t = time.perf_counter()
        xxhash.xxh3_64_digest(state)
        best = min(best, time.perf_counter() - t)
    return best


def test_precopy_dirtying_64mib_per_second(live_server: str, live_size: int, record_property: Any) -> None:
    state = np.random.default_rng(3).integers(0, 256, live_size, dtype=np.uint8)
    read_s = _read_once_seconds(state)
    writer = Writer(state, 64 * MiB)
    rounds: List[RoundStats] = []
    try:
        summary = LiveMigration(
            BufferSource(state, pause=writer.pause, resume=writer.resume),
            StreamChannel(lambda: connect(live_server)),
            on_round=rounds.append,
        ).run()
    finally:
        writer.quit = True
        writer.thread.join(5)
    final = summary.rounds[-1]
    link = max(r.bandwidth for r in summary.rounds if r.dirty_bytes >= 8 * MiB) if any(
        r.dirty_bytes >= 8 * MiB for r in summary.rounds) else summary.rounds[0].bandwidth
    goal = 2 * read_s + final.dirty_bytes / link
    floor = read_s + final.dirty_bytes / link
    lines = [
        f"pre-copy {_label(live_size)} @ 64 MiB/s dirtied: {len(summary.rounds)} rounds ({summary.stop_reason}), "
        f"wire bytes / state = {summary.transfer_ratio:.3f}",
        f"  downtime {summary.downtime_s * 1e3:.1f} ms (final round: {final.dirty_pages} pages, scan "
        f"{final.scan_s * 1e3:.1f} ms, send {final.send_s * 1e3:.1f} ms, verify {final.verify_s * 1e3:.1f} ms)",
        f"  goal 2 x read-once ({read_s * 1e3:.1f} ms) + dirty/link ({final.dirty_bytes / link * 1e3:.1f} ms) "
        f"= {goal * 1e3:.1f} ms -> {'MET' if summary.downtime_s <= goal else 'NOT met'} "
        f"({summary.downtime_s / goal:.2f}x of the goal)",
        # Without a dirty log the paused state must be read once (to find the dirty pages and
        # prove them: every page hashed) and the dirty pages sent: that is the floor.
        f"  physical floor read-once + dirty/link = {floor * 1e3:.1f} ms ({summary.downtime_s / floor:.2f}x of it)",
    ] + [
        f"  round {r.round}{' final' if r.final else ''}: {r.dirty_pages} pages, {r.wire_bytes / MiB:.1f} MiB, "
        f"{r.duration_s * 1e3:.0f} ms, dirty {r.dirty_rate / MiB:.1f} MiB/s, bw {r.bandwidth / MiB:.0f} MiB/s, "
        f"expected downtime {r.expected_downtime_s * 1e3:.0f} ms"
        for r in summary.rounds
    ]
    print("\n" + "\n".join(lines))
    for k, v in (("downtime_s", summary.downtime_s), ("goal_s", goal), ("floor_s", floor), ("read_once_s", read_s),
                 ("rounds", len(summary.rounds)), ("transfer_ratio", summary.transfer_ratio)):
        record_property(k, v)
    assert summary.rounds[-1].final and summary.digest  # proven; the figures are the result


class HotWriter(Writer):
    """Dirties ``rate`` bytes/s of pages: 64-byte writes into the same ``hot`` pages (a hot heap)."""

    def __init__(self, state: "np.ndarray[Any, Any]", rate: float, hot: int) -> None:
        self.hot = np.sort(np.random.default_rng(1).choice(state.nbytes // 4096, hot, replace=False))
        super().__init__(state, rate)

    def burst(self, rng: "np.random.Generator", rows: "np.ndarray[Any, Any]") -> None:
        at = int(rng.integers(0, 4096 - 64))
        picked = self.hot[rng.integers(0, len(self.hot), self.BURST)]
        rows[picked, at : at + 64] = rng.integers(0, 256, (self.BURST, 64), dtype=np.uint8)


@pytest.mark.parametrize("cache", ["page cache 64 MiB (XZR pages)", "no page cache"])
def test_precopy_hot_pages_wire_bytes(live_server: str, live_size: int, cache: str, record_property: Any) -> None:
    """Pre-copy of an agent rewriting 64 bytes of the same 1,024 pages (4 MiB) at 64 MiB/s:
    the delta rounds' wire bytes with the sender's page cache (pages dirtied again go as
    XZR pages) and without it, side by side (issue 12 §5)."""
    state = np.random.default_rng(3).integers(0, 256, live_size, dtype=np.uint8)
    writer = HotWriter(state, 64 * MiB, 1024)
    try:
        summary = LiveMigration(
            BufferSource(state, pause=writer.pause, resume=writer.resume),
            StreamChannel(lambda: connect(live_server)),
            page_cache_bytes=64 * MiB if cache.startswith("page cache") else 0,
        ).run()
    finally:
        writer.quit = True
        writer.thread.join(5)
    later = summary.rounds[1:]
    dirty = sum(r.dirty_bytes for r in later)
    wire = sum(r.wire_bytes for r in later)
    print(f"\nhot pages, {_label(live_size)}, {cache}: {len(summary.rounds)} rounds, delta rounds {dirty / MiB:.1f} MiB "
          f"of pages as {wire / MiB:.2f} MiB on the wire ({wire / max(dirty, 1):.3f}), downtime "
          f"{summary.downtime_s * 1e3:.1f} ms, total {summary.duration_s:.2f} s")
    for r in summary.rounds:
        print(f"  round {r.round}{' final' if r.final else ''}: {r.dirty_pages} pages, {r.wire_bytes / MiB:.2f} MiB, "
              f"{r.duration_s * 1e3:.0f} ms (scan {r.scan_s * 1e3:.1f}, send {r.send_s * 1e3:.1f}, verify "
              f"{r.verify_s * 1e3:.1f}), bw {r.bandwidth / MiB:.0f} MiB/s")
    for k, v in (("delta_page_bytes", dirty), ("delta_wire_bytes", wire), ("downtime_s", summary.downtime_s),
                 ("rounds", len(summary.rounds))):
        record_property(k, v)
    assert summary.rounds[-1].final and summary.digest


class BusyPythonAgent(Writer):
    """A pure-Python agent: between its page writes (as :class:`Writer`'s, 16 MiB/s) it runs
    Python bytecode without pause, so it holds the GIL whenever the sender gives it up, the
    worst case for a sender in the same process. ``pause`` stops it, as a real agent's."""

    _due = 0.0

    def until_next_burst(self) -> None:
        # On a fixed schedule: a burst the sender delayed (holding the GIL) is made up at
        # once, so the agent keeps its rate.
        self._due = (self._due or time.perf_counter()) + self.BURST * 4096 / self.rate
        count = 0
        while time.perf_counter() < self._due and not self.paused.is_set() and not self.quit:
            count += 1  # the agent's own work: pure Python, GIL held


@pytest.mark.parametrize("agent", ["numpy writer (sleeps between writes)", "busy pure-Python agent"])
def test_precopy_with_a_python_agent(live_server: str, live_size: int, agent: str, record_property: Any) -> None:
    """Pre-copy while the agent runs Python in the sender's process: every return of the
    sender from a GIL-free call (a kernel, a socket write) may wait the interpreter's
    switch interval (5 ms) for the agent to give the GIL back. Round times, downtime and
    total, the idle-between-writes agent beside the busy one."""
    state = np.random.default_rng(3).integers(0, 256, live_size, dtype=np.uint8)
    # Untimed, first: a VM's never-touched memory costs the receiver a host fault a page
    # (up to 10 us here: seconds a GiB), which would swamp what this compares.
    LiveMigration(BufferSource(state), StreamChannel(lambda: connect(live_server)), max_rounds=0).run()
    writer = (BusyPythonAgent if agent.startswith("busy") else Writer)(state, 16 * MiB)
    try:
        t = time.perf_counter()
        summary = LiveMigration(
            BufferSource(state, pause=writer.pause, resume=writer.resume),
            StreamChannel(lambda: connect(live_server)),
        ).run()
        total = time.perf_counter() - t
    finally:
        writer.quit = True
        writer.thread.join(5)
    first = summary.rounds[0]
    print(f"\n{agent}, {_label(live_size)}: total {total * 1e3:.0f} ms, {len(summary.rounds)} rounds, downtime "
          f"{summary.downtime_s * 1e3:.1f} ms; round 0 {first.duration_s * 1e3:.0f} ms (scan {first.scan_s * 1e3:.0f}, "
          f"send {first.send_s * 1e3:.0f}, {first.chunks} chunks)")
    for k, v in (("total_s", total), ("round0_s", first.duration_s), ("downtime_s", summary.downtime_s),
                 ("rounds", len(summary.rounds))):
        record_property(k, v)
    assert summary.rounds[-1].final and summary.digest
