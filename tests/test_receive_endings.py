"""How ``cellmigrate receive`` ends, and the options around it (from a new user's trial).

- An interrupt after the migration completed (in ``--linger``) said "interrupted", exit
  130, for a migration that had succeeded: exit 0.
- ``--keep-listening`` refused a second sender for the 2 s of the linger, printed
  concatenated pretty JSON objects, and its documented stop (Ctrl-C) exited 130: now a
  finished migration's late sender is answered while new ones are served, ``--json`` is
  JSON Lines, and an interrupt between migrations exits 0.
- ``--max-state-size 0`` meant "no limit"; ``send --resume-cmd`` without ``--live`` was
  accepted and never ran; a failed ``--resume-cmd`` read "but target adopted the state but
  could not resume"; what a successful pause or resume command wrote to stderr was lost.

Signals are SIGTERM: a test run from a non-interactive shell's background job ignores
SIGINT, and its children inherit that (both end the same way in the CLI).
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path
from typing import List

import numpy as np
import pytest

from live_net import CLI, DoneDroppingProxy, Receiver, send

MIB = 1 << 20


def _file(path: Path, seed: int, size: int = 2 * MIB) -> Path:
    np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tofile(path)
    return path


def _read_stdout_line(rx: Receiver) -> str:
    assert rx.proc.stdout is not None
    line = rx.proc.stdout.readline()
    assert line, f"receiver exited: {rx.wait().stderr}"
    return line


def test_an_interrupt_while_lingering_ends_a_completed_receive_with_0(tmp_path: Path) -> None:
    src, dst = _file(tmp_path / "src.bin", 1), tmp_path / "dst.bin"
    rx = Receiver(dst, "--linger", "60", "--resume-cmd", "echo resumed-note >&2")
    try:
        sent = send(str(src), rx.address)
        assert sent.returncode == 0, sent.stderr
        assert "proven equal" in _read_stdout_line(rx)  # reported: now in the linger
        rx.proc.send_signal(signal.SIGTERM)
        got = rx.wait()
    finally:
        rx.kill()
    assert got.returncode == 0, got.stderr
    assert "error" not in got.stderr and "Traceback" not in got.stderr
    assert "resumed-note" in got.stderr  # a successful command's stderr reaches the user
    assert dst.read_bytes() == src.read_bytes()


def test_keep_listening_serves_senders_back_to_back_and_answers_a_lost_done(tmp_path: Path) -> None:
    from cellmigrate.live import BufferSource, LiveMigration
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import connect

    dst = tmp_path / "dst.bin"
    rx = Receiver(dst, "--keep-listening", "--json")
    proxy = DoneDroppingProxy(rx.address, "forward")
    try:
        # 1. Its DONE is dropped: it reconnects and is told by the next receiver that its
        #    migration completed (the linger that did so refused every other sender).
        state = bytearray(np.random.default_rng(2).integers(0, 256, MIB, dtype=np.uint8).tobytes())
        calls: List[str] = []
        source = BufferSource(state, pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"))
        channel = StreamChannel(lambda: connect(proxy.address, timeout=5), timeout=5.0, retries=3, retry_delay=0.05)
        summary = LiveMigration(source, channel, max_rounds=0).run()
        assert proxy.dropped_done.is_set() and proxy.connections >= 2
        assert calls == ["pause"] and summary.digest is not None  # completed: not resumed
        # 2. A second sender at once (within the old 2 s linger) is served.
        src2 = _file(tmp_path / "src2.bin", 3)
        sent = send(str(src2), rx.address)
        assert sent.returncode == 0, sent.stderr
        records = [json.loads(_read_stdout_line(rx)) for _ in range(2)]  # JSON Lines
        rx.proc.send_signal(signal.SIGTERM)  # between migrations: how one stops it
        got = rx.wait()
    finally:
        proxy.close()
        rx.kill()
    assert got.returncode == 0, got.stderr
    assert "stopped after 2 migrations" in got.stderr and "error" not in got.stderr
    assert got.stdout == ""  # nothing after the two lines
    assert records[0]["migration_id"] != records[1]["migration_id"]
    assert all(uuid.UUID(r["migration_id"]) for r in records)
    assert dst.read_bytes() == src2.read_bytes()


def test_keep_listening_serves_on_after_a_failed_migration(tmp_path: Path) -> None:
    """A migration that fails before STATE_FILE changes (here the sender aborts: its pause
    command fails) is noted, and the next sender is served (it exited 2 and refused every
    later sender, against its documentation)."""
    src, dst = _file(tmp_path / "src.bin", 7), tmp_path / "dst.bin"
    dst.write_bytes(b"the target's own state")
    rx = Receiver(dst, "--keep-listening")
    try:
        failed = send("--live", "--pause-cmd", "false", str(src), rx.address)
        assert failed.returncode != 0
        assert dst.read_bytes() == b"the target's own state"
        sent = send(str(src), rx.address)
        assert sent.returncode == 0, sent.stderr
        assert "proven equal" in _read_stdout_line(rx)
        rx.proc.send_signal(signal.SIGTERM)
        got = rx.wait()
    finally:
        rx.kill()
    assert got.returncode == 0, got.stderr
    notes = [line for line in got.stderr.splitlines() if "migration failed" in line]
    assert len(notes) == 1 and "aborted" in notes[0] and "is unchanged (serving on)" in notes[0], got.stderr
    assert "stopped after 1 migration" in got.stderr
    assert dst.read_bytes() == src.read_bytes()
    assert not list(tmp_path.glob(".*cmlive-staging"))


def test_a_finished_migration_is_answered_by_the_next_receiver() -> None:
    """The library side of it: a sender whose DONE was lost reconnects and is told by
    ``LiveReceiver(finished=...)``, the next receiver on the address, that its migration
    completed (nothing is staged again); that receiver then serves another migration."""
    import threading

    from cellmigrate.live import BufferSource, BufferTarget, LiveMigration, MemoryStore
    from cellmigrate.live.receiver import LiveReceiver
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import connect, listen

    state = bytes(np.random.default_rng(4).integers(0, 256, 256 << 10, dtype=np.uint8))
    listener = listen("127.0.0.1:0")
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    proxy = DoneDroppingProxy(address, "forward")
    first_target, second_target = BufferTarget(), BufferTarget()
    first = LiveReceiver(MemoryStore(), first_target)
    receivers: List[LiveReceiver] = []

    def serve() -> None:
        first.serve(listener)
        finished = first.finished_migration
        assert finished is not None
        second = LiveReceiver(MemoryStore(), second_target, finished=dict([finished]))
        receivers.append(second)
        second.serve(listener, idle_timeout=20)

    def migrate(to: str) -> List[str]:
        calls: List[str] = []
        source = BufferSource(bytearray(state), pause=lambda: calls.append("pause"),
                              resume=lambda: calls.append("resume"))
        channel = StreamChannel(lambda: connect(to, timeout=5), timeout=5.0, retries=3, retry_delay=0.05)
        LiveMigration(source, channel, max_rounds=0).run()
        return calls

    serving = threading.Thread(target=serve, daemon=True)
    serving.start()
    try:
        assert first.finished_migration is None
        assert migrate(proxy.address) == ["pause"]  # completed: its agent stays paused
        assert proxy.dropped_done.is_set() and proxy.connections >= 2
        assert bytes(first_target.state or b"") == state
        assert migrate(address) == ["pause"]  # the next migration is served, not refused
        serving.join(30)
        assert not serving.is_alive()
        assert receivers[0].completed == 1 and bytes(second_target.state or b"") == state
    finally:
        proxy.close()
        listener.close()


def test_max_state_size_must_be_positive(tmp_path: Path) -> None:
    got = subprocess.run([*CLI, "receive", "--listen", "127.0.0.1:0", str(tmp_path / "r.bin"),
                          "--max-state-size", "0"], capture_output=True, text=True, timeout=60)
    assert got.returncode == 2 and "--max-state-size" in got.stderr and "at least 1 byte" in got.stderr
    assert len(got.stderr.strip().splitlines()) <= 3 and "Traceback" not in got.stderr
    assert not (tmp_path / "r.bin").exists()


@pytest.mark.parametrize("options, named", [
    (["--resume-cmd", "touch resumed"], "--resume-cmd needs --live"),
    (["--max-rounds", "3"], "--max-rounds needs --live"),
    (["--downtime-limit", "1"], "--downtime-limit needs --live"),
    (["--pause-cmd", "true", "--max-rounds", "3"], "--pause-cmd and --max-rounds need --live"),
])
def test_send_names_the_live_options_given_without_live(tmp_path: Path, options: List[str], named: str) -> None:
    src = _file(tmp_path / "s.bin", 5, 8192)
    got = subprocess.run([*CLI, "send", *options, str(src), "127.0.0.1:1"], capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert got.returncode == 2, got.stderr
    assert got.stderr.strip().splitlines() == [f"cellmigrate send: error: {named}"]
    assert not (tmp_path / "resumed").exists()


def test_a_failed_receive_resume_cmd_says_so_plainly(tmp_path: Path) -> None:
    src, dst = _file(tmp_path / "src.bin", 6), tmp_path / "dst.bin"
    rx = Receiver(dst, "--resume-cmd", "echo cannot-start >&2; exit 3")
    try:
        sent = send(str(src), rx.address, "--retries", "0")
        got = rx.wait()
    finally:
        rx.kill()
    assert sent.returncode != 0
    assert got.returncode == 2
    line = [x for x in got.stderr.splitlines() if "error" in x]
    assert len(line) == 1 and "target adopted the state but" not in line[0], got.stderr
    assert "holds the migrated state, proven, but the migration failed: resume command" in line[0]
    assert "exit 3" in line[0] and "cannot-start" in line[0] and "sender resumes its writer" in line[0]
    assert dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("bound, shown", [
    (("127.0.0.1", 7070), "127.0.0.1:7070"),
    (("::1", 7070, 0, 0), "[::1]:7070"),
    ("/tmp/rx.sock", "unix:/tmp/rx.sock"),
])
def test_the_listening_address_is_shown_as_send_takes_it(bound: object, shown: str) -> None:
    from cellmigrate.live.cli import _shown_address
    from cellmigrate.live.transport import check_address

    assert _shown_address(bound) == shown
    check_address(shown, tls=False)  # send accepts it back
