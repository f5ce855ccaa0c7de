"""Live-migrate a running WebAssembly agent to a second process over localhost TCP.

Run it as it is (``python examples/wasm_live_migration.py``; needs ``cellmigrate[wasm]``):

1. This process (node A) instantiates the shipped agent module (``mutator.wat``: it keeps
   rewriting its linear memory and grows it) with wasmtime and runs it in a background
   thread, paced like an agent that does real work.
2. It starts node B: this same script as a second process (``--target``), which listens on
   127.0.0.1 (a free port) with a fresh instance of the same module waiting to adopt.
3. While the agent runs, ``LiveMigration`` pre-copies its memory in rounds over the
   stream protocol, authenticated with a fresh shared key (both nodes prove they hold it,
   every frame carries a MAC; node B gets the secret on its stdin, never on its command
   line) - pages written meanwhile travel again - then pauses it, sends the last
   pages and the agent's exported mutable globals; node B proves the digest of what it
   staged equals node A's, adopts memory and globals and continues the run to
   ``TOTAL_STEPS`` iterations.
4. Node B sends back its final memory and globals; node A runs an unmigrated reference
   of the same ``TOTAL_STEPS`` and compares byte for byte. The exit code is 0 only if
   they are identical.

Everything binds 127.0.0.1 and every wait is bounded.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from cellmigrate import MigrationValidator, first_difference
from cellmigrate.live import LiveMigration, MemoryStore, RoundStats
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.protocol import derive_key
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.transport import connect, listen
from cellmigrate.wasm import WASM_PAGE_SIZE, WasmAgent

#: Iterations the agent runs in total, on node A then node B.
TOTAL_STEPS = 250_000
#: Node A's pace (iterations per second) and iterations per step call.
RATE, BATCH = 40_000, 128
#: Bound on every wait, in seconds.
TIMEOUT = 60.0


def _audit_lines(validator: MigrationValidator) -> List[str]:
    return [f"{time.strftime('%H:%M:%S', time.gmtime(e.timestamp))} {e.event_type.name:<22} "
            f"{'ok' if e.success else 'FAIL':<4} {e.details}" for e in validator.audit_log]


# ------------------------------------------------------------------------- node B

def run_target(out_dir: Path) -> int:
    """Node B: receive one migration into a fresh instance, finish the run, report."""
    key = derive_key(bytes.fromhex(sys.stdin.readline().strip()))  # the shared secret, from node A
    target = WasmAgent(batch=4096, stop_at=TOTAL_STEPS)
    validator = MigrationValidator()
    listener = listen("127.0.0.1:0")
    print(f"LISTENING {listener.getsockname()[1]}", flush=True)
    receiver = LiveReceiver(MemoryStore(), target, key=key, validator=validator, timeout=TIMEOUT)
    try:
        if receiver.serve(listener, idle_timeout=TIMEOUT, resume_timeout=TIMEOUT) != 1:
            print(f"node B: no migration arrived ({receiver.last_error})", file=sys.stderr)
            return 1
    finally:
        listener.close()
    steps = target.wait(TIMEOUT)  # adopt() resumed it: it runs on to TOTAL_STEPS
    (out_dir / "memory.bin").write_bytes(target.state())
    report: Dict[str, Any] = {"adopted_at": target.adopted_at, "steps": steps, "globals": target.globals(),
                              "audit": _audit_lines(validator)}
    (out_dir / "target.json").write_text(json.dumps(report))
    return 0


# ------------------------------------------------------------------------- node A

def _read_port(child: "subprocess.Popen[str]") -> int:
    """The port node B printed, within TIMEOUT seconds."""
    found: List[str] = []
    reader = threading.Thread(target=lambda: found.append(child.stdout.readline() if child.stdout else ""), daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    if not found or not found[0].startswith("LISTENING "):
        raise RuntimeError(f"node B did not start listening: {found[0] if found else 'timeout'!r}")
    return int(found[0].split()[1])


def _print_round(stats: RoundStats) -> None:
    what = "final round (agent paused)" if stats.final else f"round {stats.round}"
    line = (f"  {what:<27} {stats.dirty_pages:>5} pages, {stats.wire_bytes / 2**20:6.2f} MiB sent, "
            f"state {stats.state_size // WASM_PAGE_SIZE} wasm pages, {stats.duration_s * 1e3:6.1f} ms")
    if stats.actual_downtime_s is not None:
        line += f"; downtime {stats.actual_downtime_s * 1e3:.1f} ms"
    print(line, flush=True)


def run_source() -> int:
    with tempfile.TemporaryDirectory(prefix="cellmigrate-wasm-") as tmp:
        out_dir = Path(tmp)
        child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--target", str(out_dir)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        source: Optional[WasmAgent] = None
        try:
            secret = os.urandom(32)
            assert child.stdin is not None
            child.stdin.write(secret.hex() + "\n")
            child.stdin.close()
            port = _read_port(child)
            print(f"node B (pid {child.pid}) listens on 127.0.0.1:{port}; both nodes hold a fresh 32-byte shared key")
            # stop_at: even on a very slow machine node A never runs past the total.
            source = WasmAgent(batch=BATCH, rate=RATE, stop_at=TOTAL_STEPS)
            source.start()
            time.sleep(0.3)  # the agent runs on node A for a while
            print(f"node A runs the agent: {source.steps} iterations so far, memory {source.memory_size} bytes; "
                  f"live-migrating to node B while it runs")
            validator = MigrationValidator()
            # The stream protocol over TCP; the channel reconnects (and resumes) by itself.
            channel = StreamChannel(lambda: connect(f"127.0.0.1:{port}", timeout=TIMEOUT),
                                    key=derive_key(secret), timeout=TIMEOUT)
            migration = LiveMigration(source, channel, validator=validator, on_round=_print_round)
            summary = migration.run()
            paused_at = source.steps
            source.stop()  # it stays paused after a migration; node B runs the agent now
            print(f"migrated at iteration {paused_at}: {len(summary.rounds)} rounds, "
                  f"{summary.wire_bytes / 2**20:.2f} MiB sent for a {summary.state_size / 2**20:.2f} MiB memory, "
                  f"downtime {summary.downtime_s * 1e3:.1f} ms, stopped on {summary.stop_reason}")
            child.wait(TIMEOUT)
            if child.returncode != 0:
                print(f"FAILED: node B exited with {child.returncode}")
                return 1
            report = json.loads((out_dir / "target.json").read_text())
            memory = (out_dir / "memory.bin").read_bytes()
        finally:
            if source is not None:
                source.stop()
            if child.poll() is None:
                child.kill()
                child.wait()
    print(f"node B adopted at iteration {report['adopted_at']} and ran on to {report['steps']}")

    reference = WasmAgent(batch=1 << 16)
    reference.run(TOTAL_STEPS)
    expected = reference.state()
    diff = first_difference(expected, memory) if len(expected) == len(memory) else min(len(expected), len(memory))
    same_globals = report["globals"] == reference.globals()
    print(f"reference run without migration: {TOTAL_STEPS} iterations, memory {len(expected)} bytes, "
          f"globals {reference.globals()}")
    print(f"node B:                          {report['steps']} iterations, memory {len(memory)} bytes, "
          f"globals {report['globals']}")
    print("audit trail, node A:")
    for line in _audit_lines(validator):
        print(f"  {line}")
    print("audit trail, node B:")
    for line in report["audit"]:
        print(f"  {line}")
    if report["adopted_at"] != paused_at or diff is not None or not same_globals:
        print(f"FAILED: adopted at {report['adopted_at']} (paused at {paused_at}); memory "
              f"{'identical' if diff is None else f'differs at byte {diff}'}; globals {'equal' if same_globals else 'differ'}")
        return 1
    print("PROOF: the migrated agent's final memory and globals are byte-for-byte identical "
          "to the unmigrated reference run")
    return 0


def main(argv: List[str]) -> int:
    if argv[:1] == ["--target"] and len(argv) == 2:
        return run_target(Path(argv[1]))
    if argv:
        print("usage: python examples/wasm_live_migration.py   (no arguments)", file=sys.stderr)
        return 2
    return run_source()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
