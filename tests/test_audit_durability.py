"""Durability proof for the SQLite audit sink.

A child process logs entries in a loop and prints each entry's sequence number (flushed)
only after ``log()`` returned, i.e. after the entry was acknowledged as durable. The parent
SIGKILLs it at random moments, several times over the same database. After each kill the
database must open, pass ``PRAGMA integrity_check``, and hold every acknowledged entry;
per round the stored entries must be a gap-free prefix of what the child tried to write.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Dict, List, Set, Tuple

from cellmigrate import AuditEventType, MigrationAuditLog, SqliteAuditSink

ROUNDS = 6

_CHILD = textwrap.dedent(
    """
    import sys, uuid
    from cellmigrate import AuditEntry, AuditEventType, MigrationAuditLog, SqliteAuditSink

    path, rnd = sys.argv[1], int(sys.argv[2])
    # A small ring: whatever the parent finds later must come from the database.
    log = MigrationAuditLog.with_capacity(16, sink=SqliteAuditSink(path))
    mid = uuid.UUID(int=rnd).bytes
    agent = uuid.UUID(int=1000 + rnd).bytes
    print("READY", flush=True)
    for i in range(10_000_000):
        if i % 3 == 0:
            log.log_completion(mid, agent, i % 2 == 0, f"{rnd}:{i}")
        else:
            log.log(AuditEntry.new(mid, agent, AuditEventType.TRANSFER_COMPLETED, f"{rnd}:{i}", True))
        print(f"{rnd}:{i}", flush=True)   # acknowledged only once log() has returned
    """
)


def _run_and_kill(db: Path, rnd: int, rng: random.Random) -> Tuple[Set[int], str]:
    """Start a child, SIGKILL it at a random moment, return the acknowledged numbers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(db), str(rnd)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    watchdog = threading.Timer(60.0, proc.kill)  # never hang the suite
    watchdog.start()
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline().strip()
        assert first == "READY", (first, proc.stderr.read() if proc.stderr else "")
        lines: List[str] = []
        if rng.random() < 0.5:
            count = rng.randint(1, 400)
            how = f"after {count} acknowledgements"
            for _ in range(count):
                line = proc.stdout.readline()
                if not line:
                    break
                lines.append(line)
        else:
            delay = rng.uniform(0.0, 0.15)
            how = f"after {delay:.3f} s"
            time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        lines.extend(proc.stdout.read().splitlines())  # what was printed before the kill is still in the pipe
        proc.wait()
    finally:
        watchdog.cancel()
        proc.stdout.close()  # type: ignore[union-attr]
        stderr = proc.stderr.read() if proc.stderr else ""
        if proc.stderr is not None:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, stderr)
    acked = {int(line.strip().split(":")[1]) for line in lines if line.startswith(f"{rnd}:")}
    return acked, how


def _integrity(db: Path) -> str:
    conn = sqlite3.connect(db)
    try:
        return "\n".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def _stored_numbers(sink: SqliteAuditSink, rnd: int) -> List[int]:
    return [int(e.details.split(":")[1]) for e in sink.query(migration_id=uuid.UUID(int=rnd).bytes)]


def test_acknowledged_entries_survive_sigkill(tmp_path: Path) -> None:
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    db = tmp_path / "audit.db"
    acknowledged: Dict[int, List[int]] = {}
    for rnd in range(1, ROUNDS + 1):
        acked, how = _run_and_kill(db, rnd, rng)
        context = f"seed={seed} round={rnd} killed {how}"
        assert _integrity(db) == "ok", context
        with SqliteAuditSink(db) as sink:
            stored = _stored_numbers(sink, rnd)
            # Every acknowledged entry is there ...
            assert acked <= set(stored), (context, sorted(acked - set(stored))[:10])
            # ... in order and without gaps: at most the one in flight at the kill is extra.
            assert stored == list(range(len(stored))), context
            if acked:
                assert len(stored) - 1 <= max(acked) + 1, context
            # earlier rounds are untouched by later kills
            for old_rnd, old_stored in acknowledged.items():
                assert _stored_numbers(sink, old_rnd) == old_stored, (context, old_rnd)
        acknowledged[rnd] = stored

    # Reopen through the public API: queries reach every round, far beyond the ring.
    with SqliteAuditSink(db) as sink:
        log = MigrationAuditLog.with_capacity(4, sink=sink)
        assert len(log) == min(4, sink.count())
        total = sum(len(v) for v in acknowledged.values())
        assert sink.count() == total
        for rnd, stored in acknowledged.items():
            assert [e.details for e in log.get_migration_entries(uuid.UUID(int=rnd))] == [
                f"{rnd}:{i}" for i in stored
            ]
        expected_failures = sum(1 for v in acknowledged.values() for i in v if i % 3 == 0 and i % 2 == 1)
        assert len(log.get_failures()) == expected_failures
        assert all(e.event_type is AuditEventType.MIGRATION_FAILED for e in log.get_failures())
        assert sink.integrity_check() == "ok"
    # Across all rounds at least some entries were acknowledged (the test is not vacuous).
    assert total > 0
