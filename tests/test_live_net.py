"""send/receive between two real processes over localhost TCP: keys, TLS, refusals, hostile
peers, connection cuts at random points, and a changing 1 GiB file (marker ``large``)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

from live_net import CuttingProxy, Receiver, send, self_signed

MIB = 1 << 20


def _files(tmp_path: Path, size: int = 6 * MIB, seed: int = 0) -> Tuple[Path, Path]:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
    data[MIB : 2 * MIB] = 0  # zero pages: never sent
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    data.tofile(src)
    dst.write_bytes(b"the target's own state, which must survive any failed migration")
    return src, dst


def _old(dst: Path) -> bool:
    return dst.read_bytes().startswith(b"the target's own state")


@pytest.mark.parametrize("keyed", [False, True])
def test_send_receive_over_tcp(tmp_path: Path, keyed: bool) -> None:
    src, dst = _files(tmp_path)
    key_args: list = []
    if keyed:
        (tmp_path / "key").write_bytes(os.urandom(32))
        key_args = ["--key-file", str(tmp_path / "key")]
    rx = Receiver(dst, "--json", *key_args)
    # Listening without a key is said to be unauthenticated, on the line naming the address.
    assert ("unauthenticated" in rx.err_lines[-1]) is not keyed
    sent = send(str(src), rx.address, "--json", *key_args)
    got = rx.wait()
    assert sent.returncode == 0, sent.stderr
    assert got.returncode == 0, got.stderr
    assert dst.read_bytes() == src.read_bytes()
    summary = json.loads(sent.stdout)
    assert summary["state_size"] == 6 * MIB and summary["page_bytes"] == 5 * MIB
    assert summary["stop_reason"] == "stop_and_copy" and len(summary["rounds"]) == 1
    received = json.loads(got.stdout)
    assert received["page_bytes"] == 5 * MIB and received["migration_id"] == summary["migration_id"]
    events = [e["event_type"] for e in received["audit"]]
    assert events[0] == "VALIDATION_COMPLETED" and events[-1] == "MIGRATION_COMPLETED"
    assert not list(tmp_path.glob(".dst.bin.cmlive-staging"))


def test_receive_writes_through_a_symlinked_state_file(tmp_path: Path) -> None:
    src, real = _files(tmp_path)
    (tmp_path / "data").mkdir()
    real = real.rename(tmp_path / "data" / "real.bin")
    link = tmp_path / "dst.bin"
    link.symlink_to(real)
    rx = Receiver(link)
    sent = send(str(src), rx.address)
    got = rx.wait()
    assert sent.returncode == 0 and got.returncode == 0, (sent.stderr, got.stderr)
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_bytes() == src.read_bytes()
    assert sorted(p.name for p in real.parent.iterdir()) == ["real.bin"]  # no staging left


def test_tls(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    src, dst = _files(tmp_path, 2 * MIB)
    rx = Receiver(dst, "--tls-cert", str(cert), "--tls-key", str(key))
    # Without TLS the sender cannot talk to a TLS receiver: a clear error, target unchanged.
    plain = send(str(src), rx.address, "--retries", "0", "--timeout", "5")
    assert plain.returncode == 2 and "Traceback" not in plain.stderr and _old(dst)
    sent = send(str(src), rx.address, "--tls-ca", str(cert))
    assert sent.returncode == 0, sent.stderr
    assert rx.wait().returncode == 0
    assert dst.read_bytes() == src.read_bytes()


def test_refused_by_the_compatibility_check(tmp_path: Path) -> None:
    src, dst = _files(tmp_path, MIB)
    rx = Receiver(dst, "--arch", "x86_64")
    try:
        sent = send(str(src), rx.address, "--arch", "riscv64")
        assert sent.returncode == 2
        assert "Target does not support architecture: riscv64" in sent.stderr
        assert len(sent.stderr.strip().splitlines()) == 1 and _old(dst)
    finally:
        rx.kill()


@pytest.mark.parametrize("sender_key", ["other", "none"])
def test_authentication_failure(tmp_path: Path, sender_key: str) -> None:
    src, dst = _files(tmp_path, MIB)
    (tmp_path / "key").write_bytes(os.urandom(32))
    (tmp_path / "other").write_bytes(os.urandom(32))
    rx = Receiver(dst, "--key-file", str(tmp_path / "key"))
    try:
        args = [] if sender_key == "none" else ["--key-file", str(tmp_path / "other")]
        sent = send(str(src), rx.address, "--retries", "0", *args)
        assert sent.returncode == 2 and "Traceback" not in sent.stderr
        assert "key" in sent.stderr.lower()
        assert _old(dst)
    finally:
        rx.kill()


def _listening() -> socket.socket:
    """A TCP socket listening on 127.0.0.1 (a free port) that is no receiver."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1)
    return sock


def test_a_stalled_receiver_times_out(tmp_path: Path) -> None:
    src, _ = _files(tmp_path, MIB)
    silent = _listening()
    try:
        start = time.monotonic()
        sent = send(str(src), f"127.0.0.1:{silent.getsockname()[1]}", "--timeout", "1", "--retries", "0")
        assert sent.returncode == 2 and "sent nothing for 1 s" in sent.stderr
        assert time.monotonic() - start < 20
    finally:
        silent.close()


def test_stalled_and_garbage_peers_leave_the_target_unchanged(tmp_path: Path) -> None:
    src, dst = _files(tmp_path, 2 * MIB)
    rx = Receiver(dst, "--timeout", "1")
    host, port = rx.address.rsplit(":", 1)
    stalled = socket.create_connection((host, int(port)))
    time.sleep(1.6)  # the receiver gives up on it after 1 s
    stalled.close()
    for garbage in (os.urandom(5000), b"CMLV" + os.urandom(100), (10).to_bytes(4, "little") + b"\x01" + b"x" * 10,
                    (1 << 30).to_bytes(4, "little") + b"\x01"):
        with socket.create_connection((host, int(port))) as g:
            g.sendall(garbage)
            time.sleep(0.2)
    assert _old(dst)
    sent = send(str(src), rx.address)  # the receiver still serves a real migration
    assert sent.returncode == 0, sent.stderr
    got = rx.wait()
    assert got.returncode == 0 and dst.read_bytes() == src.read_bytes()
    assert "sent nothing for 1 s" in got.stderr
    assert "bad magic" in got.stderr or "unknown frame type" in got.stderr
    assert "over its limit" in got.stderr


def _cut_trial(tmp_path: Path, rng: random.Random) -> None:
    src, dst = _files(tmp_path, 8 * MIB, seed=rng.randrange(1 << 30))
    rx = Receiver(dst, "--json", "--resume-timeout", "10")
    total = 7 * MIB + 64 * 1024
    cuts = sorted(rng.randrange(0, total) for _ in range(rng.randint(1, 3)))
    # Cut offsets count bytes per connection: turn "the n-th byte overall" into per-connection ones.
    per_conn = [c - p for c, p in zip(cuts, [0] + cuts[:-1])]
    proxy = CuttingProxy(rx.address, per_conn)
    try:
        sent = send(str(src), proxy.address, "--json", "--chunk-size", "1MiB", "--retries", "6", "--timeout", "10")
        got = rx.wait(timeout=60)
    finally:
        proxy.close()
        rx.kill()
    if sent.returncode == 0:
        assert dst.read_bytes() == src.read_bytes()
        summary = json.loads(sent.stdout)
        received = json.loads(got.stdout)
        # Every chunk was committed exactly once; only unacknowledged ones (window: 3) went again.
        assert received["page_bytes"] == 7 * MIB
        assert summary["resent_chunks"] <= 4 * len(cuts)
        assert proxy.forwarded <= 7 * MIB + summary["resent_chunks"] * MIB + 512 * 1024
    else:
        # Only a commit whose outcome is unknown may fail here; then either outcome is whole.
        assert "outcome is unknown" in sent.stderr, sent.stderr
        assert dst.read_bytes() == src.read_bytes() or _old(dst)
    assert not list(tmp_path.glob(".dst.bin.cmlive-staging"))


def test_connection_cuts_at_random_points(tmp_path: Path) -> None:
    rng = random.Random(11)
    for trial in range(2):
        (tmp_path / str(trial)).mkdir()
        _cut_trial(tmp_path / str(trial), rng)


@pytest.mark.live_cuts
def test_connection_cuts_at_random_points_many(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("CELLMIGRATE_CUT_SEED", "2026")))
    for trial in range(24):
        (tmp_path / str(trial)).mkdir()
        _cut_trial(tmp_path / str(trial), rng)


WRITER = r"""
import mmap, os, sys, time, numpy as np
path, rate = sys.argv[1], float(sys.argv[2])
fd = os.open(path, os.O_RDWR)
m = mmap.mmap(fd, os.fstat(fd).st_size)
a = np.frombuffer(m, dtype=np.uint8)
rng = np.random.default_rng(5)
pages = a.nbytes // 4096
print("ready", flush=True)
burst = 64  # pages per burst, 64 bytes each
while True:
    for p in rng.integers(0, pages, burst):
        a[p * 4096 : p * 4096 + 64] = rng.integers(0, 256, 64, dtype=np.uint8)
    time.sleep(burst * 4096 / rate)
"""


def _live_file(tmp_path: Path, size: int, keyed: bool) -> None:
    src, dst = _files(tmp_path, size)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(64 * MIB)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    key_args: list = []
    if keyed:
        (tmp_path / "key").write_bytes(os.urandom(32))
        key_args = ["--key-file", str(tmp_path / "key")]
    rx = Receiver(dst, *key_args)
    try:
        sent = send(str(src), rx.address, "--live", "--json", "--pause-cmd", f"kill -STOP {writer.pid}",
                    "--resume-cmd", f"kill -CONT {writer.pid}", *key_args, timeout=600)
        assert sent.returncode == 0, sent.stderr
        assert rx.wait(timeout=120).returncode == 0
        # The writer is still stopped (a migrated agent does not run twice): compare now.
        assert dst.read_bytes() == src.read_bytes()
        summary = json.loads(sent.stdout)
        assert len(summary["rounds"]) >= 2 and summary["rounds"][-1]["final"]
        assert sum(r["dirty_pages"] for r in summary["rounds"][1:]) > 0
    finally:
        writer.kill()
        writer.wait()
        rx.kill()


def test_live_file_another_process_keeps_writing(tmp_path: Path) -> None:
    _live_file(tmp_path, 16 * MIB, keyed=True)


@pytest.mark.large
@pytest.mark.parametrize("keyed", [False, True])
def test_live_1gib_file_another_process_keeps_writing(tmp_path: Path, keyed: bool) -> None:
    _live_file(tmp_path, 1 << 30, keyed)


def test_receive_over_stdio_pipes(tmp_path: Path) -> None:
    from cellmigrate.live import BufferSource, LiveMigration
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import PipeStream

    src, dst = _files(tmp_path, 3 * MIB)
    rx = subprocess.Popen([sys.executable, "-m", "cellmigrate", "receive", "--stdio", str(dst)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert rx.stdin is not None and rx.stdout is not None
    try:
        channel = StreamChannel(lambda: PipeStream(rx.stdout.fileno(), rx.stdin.fileno()), retries=0)
        LiveMigration(BufferSource(src.read_bytes()), channel, max_rounds=0).run()
        _, err = rx.communicate(timeout=60)
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.communicate()
    assert rx.returncode == 0, err
    assert dst.read_bytes() == src.read_bytes() and b"proven equal" in err


@pytest.mark.parametrize("after", ["refuse", "eof", "silent"])
def test_lost_commit_reply_leaves_the_source_paused(tmp_path: Path, after: str) -> None:
    """The receiver completes (and exits) but its DONE never arrives; reconnecting is then
    refused, closed at once, or unanswered. The sender cannot know whether the target runs
    the agent, so the source must stay paused (no split brain) and say why."""
    from cellmigrate.errors import CellError
    from cellmigrate.live import BufferSource, LiveMigration
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.errors import OutcomeUnknownError
    from cellmigrate.live.transport import connect
    from cellmigrate.validation import MigrationValidator
    from live_net import DoneDroppingProxy

    state = bytearray(np.random.default_rng(3).integers(0, 256, MIB, dtype=np.uint8).tobytes())
    dst = tmp_path / "dst.bin"
    rx = Receiver(dst)
    proxy = DoneDroppingProxy(rx.address, after)
    calls: list = []
    source = BufferSource(state, pause=lambda: calls.append("pause"), resume=lambda: calls.append("resume"))
    channel = StreamChannel(lambda: connect(proxy.address, timeout=5), timeout=1.0, retries=2, retry_delay=0.05)
    validator = MigrationValidator()
    try:
        with pytest.raises(CellError) as info:
            LiveMigration(source, channel, max_rounds=0, validator=validator).run()
        got = rx.wait()
    finally:
        proxy.close()
        rx.kill()
    assert isinstance(info.value, OutcomeUnknownError), repr(info.value)
    assert proxy.dropped_done.is_set()
    assert proxy.connections == (1 if after == "refuse" else 3)  # the first + 2 retries
    assert calls == ["pause"]  # never resumed: the target runs the agent
    assert got.returncode == 0, got.stderr
    assert dst.read_bytes() == state  # the receiver completed
    last = validator.audit_log.entries()[-2:]
    assert [e.event_type.name for e in last] == ["ROLLBACK_COMPLETED", "MIGRATION_FAILED"]
    assert not last[0].success and "outcome of the commit is unknown" in last[0].details
    assert not last[1].success


def test_a_refused_connection_is_a_connection_lost_error() -> None:
    """Before the COMMIT a transport OSError that outlasts the retries is the channel's
    ConnectionLostError (a CellError, classified TARGET_UNREACHABLE), never a bare OSError."""
    from cellmigrate.live import Offer
    from cellmigrate.live.errors import ConnectionLostError, error_type
    from cellmigrate.live.sender import StreamChannel
    from cellmigrate.live.transport import connect
    from cellmigrate.recovery import MigrationErrorType
    from cellmigrate.validation import AgentRequirements

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    offer = Offer(b"m" * 16, b"a" * 16, AgentRequirements(state_size=4096), 4096)
    for retries in (0, 2):
        channel = StreamChannel(lambda: connect(address, timeout=5), retries=retries, retry_delay=0.01)
        with pytest.raises(ConnectionLostError, match="refused") as info:
            channel.open(offer, lambda chunk: None)
        assert isinstance(info.value.__cause__, ConnectionRefusedError)
        assert error_type(info.value) is MigrationErrorType.TARGET_UNREACHABLE
        assert channel.reconnects == retries


HOT_WRITER = WRITER.replace("for p in rng.integers(0, pages, burst):", "for p in rng.integers(0, 16, burst):")


@pytest.mark.parametrize("cache", ["64MiB", "0"])
def test_live_file_hot_pages_go_as_xzr_pages(tmp_path: Path, cache: str) -> None:
    """A writer rewriting 64 bytes of the same 16 pages: after their first resend the
    delta rounds carry them as XZR pages over the sender's page cache (``--page-cache``),
    a few dozen bytes a page instead of 4 KiB; ``--page-cache 0`` sends them whole."""
    src, dst = _files(tmp_path, 16 * MIB)
    # 64 writes to the 16 pages every 2 ms: every round finds them dirty again.
    writer = subprocess.Popen([sys.executable, "-c", HOT_WRITER, str(src), str(128 * MIB)], stdout=subprocess.PIPE,
                              text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    rx = Receiver(dst)
    try:
        sent = send(str(src), rx.address, "--live", "--json", "--pause-cmd", f"kill -STOP {writer.pid}",
                    "--resume-cmd", f"kill -CONT {writer.pid}", "--page-cache", cache, "--downtime-limit", "0.0001",
                    "--max-rounds", "4", timeout=300)
        assert sent.returncode == 0, sent.stderr
        assert rx.wait(timeout=120).returncode == 0
        assert dst.read_bytes() == src.read_bytes()
        # The first delta round that carries pages sends them whole (nothing cached yet).
        later = [r for r in json.loads(sent.stdout)["rounds"][1:] if r["dirty_pages"]][1:]
        dirty, wire = sum(r["dirty_bytes"] for r in later), sum(r["wire_bytes"] for r in later)
        assert dirty > 0
        if cache == "0":
            assert wire >= dirty * 0.9
        else:
            assert wire < dirty / 10
    finally:
        writer.kill()
        writer.wait()
        rx.kill()


def test_page_cache_option_is_checked(tmp_path: Path) -> None:
    src, _ = _files(tmp_path, MIB)
    sent = send(str(src), "127.0.0.1:9", "--page-cache", "lots", "--retries", "0")
    assert sent.returncode == 2 and len(sent.stderr.strip().splitlines()) == 1 and "Traceback" not in sent.stderr


def test_page_cache_sizes_under_a_page_are_refused(tmp_path: Path) -> None:
    src, _ = _files(tmp_path, MIB)
    sent = send(str(src), "127.0.0.1:9", "--page-cache", "100", "--retries", "0")
    assert sent.returncode == 2 and "--page-cache must be 0" in sent.stderr and len(sent.stderr.strip().splitlines()) == 1


def _receive(*args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run([sys.executable, "-m", "cellmigrate", "receive", *args], capture_output=True, text=True,
                          timeout=60)


def test_receive_refuses_a_state_file_it_could_never_replace_before_listening(tmp_path: Path) -> None:
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"x")
    for target, reason in ((tmp_path / "missing" / "x.bin", "/missing' does not exist"),
                           (tmp_path / "afile" / "x.bin", "/afile' is not a directory"),
                           (tmp_path / "adir", "is a directory, not a regular file")):
        got = _receive("--listen", "127.0.0.1:0", str(target))
        assert got.returncode == 2, got.stderr
        assert reason in got.stderr and "listening" not in got.stderr and "Traceback" not in got.stderr
        assert len(got.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["adir", "afile"]  # no staging file left


def test_a_second_receive_on_the_same_state_file_is_refused(tmp_path: Path) -> None:
    """Two receivers given one STATE_FILE staged into one file: each could prove what the
    other wrote (found trying the CLI: a send reported 'proven equal' for a file that
    held the other sender's state). The staging file is locked: the second is refused."""
    src, dst = _files(tmp_path)
    rx = Receiver(dst)
    try:
        second = _receive("--listen", "127.0.0.1:0", str(dst))
        assert second.returncode == 2 and "another receiver is staging into it" in second.stderr, second.stderr
        assert len(second.stderr.strip().splitlines()) == 1
        sent = send(str(src), rx.address)
        assert sent.returncode == 0, sent.stderr
        assert rx.wait().returncode == 0
        assert dst.read_bytes() == src.read_bytes()
    finally:
        rx.kill()
    assert not list(tmp_path.glob(".*cmlive-staging"))


def test_send_live_needs_a_pause_command(tmp_path: Path) -> None:
    src, _ = _files(tmp_path, MIB)
    sent = send("--live", str(src), "127.0.0.1:9", "--retries", "0")
    assert sent.returncode == 2 and "--live needs --pause-cmd" in sent.stderr
    assert len(sent.stderr.strip().splitlines()) == 1


def test_a_failing_receive_resume_cmd_fails_the_migration(tmp_path: Path) -> None:
    """The target's --resume-cmd failing was ignored: both sides said the migration
    completed while the target agent never started. It now fails the migration: the
    sender is told and runs its own --resume-cmd (its writer goes on), and the receiver,
    whose staging file is STATE_FILE now, stops (serving on would stage the next offer
    into STATE_FILE itself) and says what STATE_FILE holds."""
    src, dst = _files(tmp_path)
    marker = tmp_path / "sender-resumed"
    rx = Receiver(dst, "--resume-cmd", "echo no >&2; exit 3")
    try:
        sent = send("--live", "--pause-cmd", "true", "--resume-cmd", f"touch {marker}", str(src), rx.address,
                    "--retries", "0")
        assert sent.returncode != 0 and "could not resume" in sent.stderr, sent.stderr
        assert "Traceback" not in sent.stderr and sent.stderr.count("Migration failed") == 1
        assert marker.exists()  # the source goes on
        got = rx.wait(timeout=60)
        assert got.returncode == 2, got.stderr
        assert "holds the migrated state, proven, but" in got.stderr and "exit 3" in got.stderr
        assert "no" in got.stderr  # the command's own stderr reached the user
        assert dst.read_bytes() == src.read_bytes()
        assert not list(tmp_path.glob(".*cmlive-staging"))
    finally:
        rx.kill()


def test_a_receive_resume_cmd_that_starts_the_agent_in_the_background_returns_at_once(tmp_path: Path) -> None:
    """The command's output is not piped: 'agent &' leaves no pipe open to wait on (with
    a capture the receiver waited for the background agent and the sender timed out)."""
    src, dst = _files(tmp_path)
    marker = tmp_path / "agent-started"
    rx = Receiver(dst, "--resume-cmd", f"(sleep 60 >/dev/null 2>&1) & touch {marker}")  # not holding our pipe
    try:
        started = time.monotonic()
        sent = send(str(src), rx.address, "--timeout", "20")
        assert sent.returncode == 0, sent.stderr
        assert time.monotonic() - started < 20
        assert rx.wait(timeout=60).returncode == 0
        assert marker.exists() and dst.read_bytes() == src.read_bytes()
    finally:
        rx.kill()


def test_a_file_written_during_a_plain_send_is_reported_as_changed(tmp_path: Path) -> None:
    """``send`` without ``--live`` of a file another process writes: the receiver refused
    the chunks ('damaged in transit'), the sender retried five times and ended on a
    broken pipe. Now the receiver's refusal is read after the failed send (no retries)
    and the sender reports the file changed (exit 1); the receiver keeps its state."""
    src, dst = _files(tmp_path, 32 * MIB)
    own = dst.read_bytes()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(256 * MIB)], stdout=subprocess.PIPE, text=True)
    assert writer.stdout is not None and writer.stdout.readline().strip() == "ready"
    rx = Receiver(dst)
    try:
        sent = send(str(src), rx.address, timeout=120)
        assert sent.returncode == 1, sent.stderr
        assert "changed while" in sent.stderr and "--live" in sent.stderr
        assert "reconnecting" not in sent.stderr and len(sent.stderr.strip().splitlines()) == 1
        assert dst.read_bytes() == own
    finally:
        writer.kill()
        writer.wait()
        rx.kill()


def test_a_chunk_damaged_in_transit_is_sent_again(tmp_path: Path) -> None:
    """A flipped payload byte fails the chunk's digest at the receiver, which refuses it
    and closes; the sender's own copy still matches the digest it sent, so the damage was
    in transit: it reconnects and resends (a source that changed would not be retried)."""
    from live_net import FlippingProxy

    src, dst = _files(tmp_path)
    rx = Receiver(dst)
    proxy = FlippingProxy(rx.address, at=200_000)  # inside the first chunk's raw pages
    try:
        sent = send(str(src), proxy.address, timeout=120)
        assert sent.returncode == 0, sent.stderr
        assert "reconnecting (1)" in sent.stderr and "digest mismatch" in sent.stderr
        assert rx.wait().returncode == 0
        assert dst.read_bytes() == src.read_bytes()
        assert proxy.connections == 2
    finally:
        proxy.close()
        rx.kill()


def test_sending_to_something_else_says_so(tmp_path: Path) -> None:
    """A server that is not a receiver (here one answering HTTP) gets a clear refusal."""
    src, _ = _files(tmp_path, MIB)
    server = _listening()

    def answer() -> None:
        server.settimeout(30)
        try:
            conn, _ = server.accept()
        except OSError:
            return
        with conn:
            conn.recv(1024)
            conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    try:
        sent = send(str(src), f"127.0.0.1:{server.getsockname()[1]}", "--retries", "0")
    finally:
        thread.join(30)
        server.close()
    assert sent.returncode == 2 and "is not a cellmigrate receiver" in sent.stderr, sent.stderr
    assert len(sent.stderr.strip().splitlines()) == 1


def test_send_through_a_command_to_receive_stdio(tmp_path: Path) -> None:
    """``send FILE 'exec:ssh nodeB cellmigrate receive --stdio FILE'`` without the ssh: the
    receiver is the command, the protocol its stdin/stdout, keyed end to end."""
    import shlex

    src, dst = _files(tmp_path)
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    command = " ".join(shlex.quote(a) for a in [sys.executable, "-m", "cellmigrate", "receive", "--stdio", str(dst),
                                               "--key-file", str(key)])
    sent = send(str(src), f"exec:{command}", "--key-file", str(key), timeout=120)
    assert sent.returncode == 0, sent.stderr
    assert "proven equal" in sent.stdout
    assert dst.read_bytes() == src.read_bytes()
    refused = send(str(src), "exec:", "--retries", "0")
    assert refused.returncode == 2 and "exec: needs a command" in refused.stderr
