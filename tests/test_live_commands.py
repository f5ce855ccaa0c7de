"""``send --live``'s pause and resume commands, and the receiver's side of a sender that
gives up: whatever the pause command does (fails half-way, hangs, is interrupted), the
writer is resumed and nothing the command started runs on; a receiver staging a
migration the sender aborted says so and exits instead of waiting for ever; bad
durations and counts are usage errors before anything listens or connects. Real
processes throughout (a stopped "writer" is a real process in state T)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from cellmigrate import InvalidStateError, StateChangedError
from cellmigrate.live import AbortedError, BufferSource, BufferTarget, LiveMigration, MemoryStore
from cellmigrate.live.agent import FileStore
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.cli import FileSource
from cellmigrate.live.transport import SocketStream, listen
from live_net import CLI, Receiver, send

MIB = 1 << 20


def _state_of(pid: int) -> str:
    """The process state letter of ``pid`` (``T``: stopped), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _running_with(marker: str) -> List[int]:
    """PIDs of ``sleep MARKER`` (a unique duration; not the send whose options name it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if f.read() == b"sleep\0" + marker.encode() + b"\0":
                        found.append(int(entry))
            except OSError:
                pass
    return found


@pytest.fixture
def writer() -> Any:
    """A process standing for the agent that writes the state file (``kill -STOP`` it)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.send_signal(signal.SIGCONT)
    proc.kill()
    proc.wait()


def _state_file(tmp_path: Path) -> Path:
    src = tmp_path / "agent.bin"
    src.write_bytes(os.urandom(2 * MIB))
    return src


def test_a_pause_command_that_fails_half_way_resumes_the_writer(tmp_path: Path, writer: Any) -> None:
    """It stopped the writer, then failed: the writer was left stopped and --resume-cmd
    never ran. Now the pause counts from its start, so the failure resumes; the receiver,
    told by the ABORT, exits at once saying so (it waited for ever)."""
    src, dst = _state_file(tmp_path), tmp_path / "dst.bin"
    rx = Receiver(dst)
    try:
        sent = send(str(src), rx.address, "--live", "--pause-cmd", f"kill -STOP {writer.pid}; echo 'no second agent' >&2; false",
                    "--resume-cmd", f"kill -CONT {writer.pid}", timeout=60)
        got = rx.wait(30)
    finally:
        rx.kill()
    assert sent.returncode == 2 and "pause command" in sent.stderr and "no second agent" in sent.stderr
    assert _state_of(writer.pid) != "T"
    assert got.returncode == 2 and "the sender aborted the migration: pause command" in got.stderr
    assert f"{str(dst)!r} is unchanged" in got.stderr and not dst.exists()


def test_a_pause_command_that_hangs_is_stopped_at_the_timeout(tmp_path: Path, writer: Any) -> None:
    """A pause command that does not finish within --timeout is killed with all it
    started (it ran on after send gave up, and could stop the writer then), and the
    writer is resumed."""
    src, dst = _state_file(tmp_path), tmp_path / "dst.bin"
    marker = "31.4159"
    rx = Receiver(dst)
    started = time.monotonic()
    try:
        sent = send(str(src), rx.address, "--live", "--timeout", "2",
                    "--pause-cmd", f"sleep {marker}; kill -STOP {writer.pid}",
                    "--resume-cmd", f"touch {tmp_path / 'resumed'}", timeout=60)
        got = rx.wait(30)
    finally:
        rx.kill()
    assert sent.returncode == 2 and "did not finish within 2 s" in sent.stderr, sent.stderr
    assert time.monotonic() - started < 30
    assert (tmp_path / "resumed").exists() and not _running_with(marker)
    assert got.returncode == 2 and "the sender aborted the migration" in got.stderr


def test_an_interrupt_during_the_pause_command_stops_it_and_resumes(tmp_path: Path, writer: Any) -> None:
    """Ctrl-C while the pause command runs: the command (which has stopped the writer
    and would stop it again) is killed, and the writer is resumed."""
    src, dst = _state_file(tmp_path), tmp_path / "dst.bin"
    marker = "27.1828"
    rx = Receiver(dst)
    try:
        proc = subprocess.Popen(
            [*CLI, "send", str(src), rx.address, "--live",
             "--pause-cmd", f"kill -STOP {writer.pid}; sleep {marker}; kill -STOP {writer.pid}",
             "--resume-cmd", f"kill -CONT {writer.pid}"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        deadline = time.monotonic() + 30
        while not _running_with(marker):  # the pause command is running
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
        got = rx.wait(30)
    finally:
        rx.kill()
    assert proc.returncode == 130 and "interrupted" in err, err
    assert not _running_with(marker) and _state_of(writer.pid) != "T"
    assert got.returncode == 2 and "the sender aborted the migration: interrupted" in got.stderr


def test_a_pause_that_did_not_stop_the_writer_is_caught(tmp_path: Path) -> None:
    """'--pause-cmd true' with a writer still writing: the file's times change after the
    pause returned, so the final round is refused, not proven as a mix of moments."""
    path = _state_file(tmp_path)
    source = FileSource(str(path), "true", None, timeout=10)
    try:
        source.state()
        source.pause()
        assert source.extra() == b""  # nothing wrote: fine
        source.pause()
        with open(path, "r+b") as f:  # the writer the command did not stop
            f.seek(4096)
            f.write(b"late")
        with pytest.raises(StateChangedError, match="did not stop the writer"):
            source.extra()
    finally:
        source.close()


def test_downtime_counts_the_pause_itself() -> None:
    """The agent stops during pause(), not after it: a pause taking 0.3 s is downtime."""
    state = np.random.default_rng(1).integers(0, 256, 64 * 4096, dtype=np.uint8)
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=10)
    import socket
    import threading

    a, b = socket.socketpair()
    thread = threading.Thread(target=receiver.handle, args=(SocketStream(a),), daemon=True)
    thread.start()
    source = BufferSource(state, pause=lambda: time.sleep(0.3))
    summary = LiveMigration(source, StreamChannel(lambda: SocketStream(b), retries=0), max_rounds=1).run()
    thread.join(10)
    assert target.state is not None and bytes(target.state) == state.tobytes()
    assert summary.downtime_s >= 0.3 and summary.rounds[-1].actual_downtime_s >= 0.3


def test_a_receiver_serving_on_hears_an_abort_and_stops_unless_it_keeps_listening() -> None:
    """serve() raises AbortedError when the sender aborts the migration it offered; with
    keep_listening it notes it and serves the next one."""
    import threading

    for keep in (False, True):
        listener = listen("127.0.0.1:0")
        address = "127.0.0.1:%d" % listener.getsockname()[1]
        receiver = LiveReceiver(MemoryStore(), BufferTarget(), timeout=10)
        dropped: List[BaseException] = []
        outcome: List[Any] = []

        def serve() -> None:
            try:
                outcome.append(receiver.serve(listener, keep_listening=keep, idle_timeout=3 if keep else None,
                                              on_drop=dropped.append))
            except BaseException as exc:  # noqa: BLE001 - the outcome under test
                outcome.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        from cellmigrate.live.transport import connect

        def fail_at_pause() -> None:
            raise RuntimeError("the agent would not stop")

        source = BufferSource(bytearray(os.urandom(8 * 4096)), pause=fail_at_pause)
        channel = StreamChannel(lambda: connect(address, timeout=10), retries=0)
        with pytest.raises(Exception, match="would not stop"):
            LiveMigration(source, channel, max_rounds=1).run()
        thread.join(20)
        listener.close()
        assert not thread.is_alive()
        if keep:
            assert outcome == [0] and any(isinstance(e, AbortedError) for e in dropped)
        else:
            assert len(outcome) == 1 and isinstance(outcome[0], AbortedError)
            assert "the agent would not stop" in str(outcome[0])


def test_a_sender_with_another_key_is_noted_not_fatal(tmp_path: Path) -> None:
    """A sender that gives up in the handshake (the receiver does not prove its key)
    sends ABORT before any offer: the receiver notes why and keeps listening (an
    unauthenticated peer cannot end it)."""
    src, dst = _state_file(tmp_path), tmp_path / "dst.bin"
    (tmp_path / "key").write_bytes(os.urandom(32))
    (tmp_path / "other").write_bytes(os.urandom(32))
    rx = Receiver(dst, "--key-file", str(tmp_path / "key"))
    try:
        sent = send(str(src), rx.address, "--retries", "0", "--key-file", str(tmp_path / "other"))
        time.sleep(0.5)
        assert rx.proc.poll() is None  # still listening
    finally:
        rx.proc.send_signal(signal.SIGTERM)
        _, err = rx.proc.communicate(timeout=30)
    assert sent.returncode == 2
    assert "the sender gave up before offering a migration" in err and "unexpected ABORT" not in err


def test_a_store_closed_twice_by_a_signal_in_between_never_closes_another_file(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """timeout(1) sends SIGTERM twice: the second landed inside close(), after the
    descriptor was closed but before it was marked so, and the cleanup's second close()
    failed with EBADF (or could close a file opened since under the same number)."""
    from cellmigrate.live import agent as agent_module

    store = FileStore(str(tmp_path / "staging"))
    real_close = os.close

    def interrupted_close(fd: int) -> None:
        real_close(fd)
        raise KeyboardInterrupt  # the signal handler's exception, right after the close

    monkeypatch.setattr(agent_module.os, "close", interrupted_close)
    with pytest.raises(KeyboardInterrupt):
        store.close()
    monkeypatch.setattr(agent_module.os, "close", real_close)
    other = os.open(tmp_path / "other", os.O_CREAT | os.O_RDWR)  # likely the number just freed
    try:
        store.close()  # nothing left to close
        os.fstat(other)  # still open
    finally:
        real_close(other)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_receive_and_send_whose_report_cannot_be_written_say_the_migration_is_done(tmp_path: Path) -> None:
    """stdout on a full disk after a proven migration: both ends said "unexpected error:
    OSError ..." (exit 2), as if nothing had changed. Now one line says the state is
    migrated and the report could not be written."""
    source = tmp_path / "source.bin"
    source.write_bytes(np.random.default_rng(3).integers(0, 256, 5 * 4096 + 7, dtype=np.uint8).tobytes())
    target = tmp_path / "target.bin"
    with open("/dev/full", "w") as full:
        rx = Receiver(target, stdout=full)
        try:
            sent = subprocess.run([*CLI, "send", str(source), rx.address], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=120)
            got = rx.wait()
        finally:
            rx.kill()
    assert sent.returncode == 2 and "is migrated, proven equal on the receiver, but cannot write to stdout" in sent.stderr
    assert got.returncode == 2 and "holds the migrated state, proven, but cannot write to stdout" in got.stderr
    assert "unexpected" not in sent.stderr + got.stderr and "Traceback" not in sent.stderr + got.stderr
    assert target.read_bytes() == source.read_bytes()


def test_a_store_never_opens_its_file_through_a_symlink(tmp_path: Path) -> None:
    """A symlink at the staging path was followed (the staging would be written into, and
    renamed over STATE_FILE from, whatever it names); a dangling one made FileStore give up
    with "in use: it kept being replaced". Both are refused as a symlink."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    for link, points_to in ((tmp_path / "staging", victim), (tmp_path / "dangling", tmp_path / "nowhere")):
        link.symlink_to(points_to)
        with pytest.raises(OSError, match="is a symbolic link: remove it") as refused:
            FileStore(str(link))
        assert refused.value.errno == errno.ELOOP
        assert link.is_symlink()
    assert victim.read_bytes() == b"keep me"


def test_a_store_interrupted_while_it_opens_removes_the_file_it_created_and_no_other(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ctrl-C inside FileStore() (here: while it maps the file) left an empty staging
    file behind it. The file it created goes; a file that was there before it stays, as
    does one another store holds (its lock refuses ours)."""
    def interrupted(self: FileStore) -> None:
        raise KeyboardInterrupt

    created = tmp_path / "created"
    monkeypatch.setattr(FileStore, "_remap", interrupted)
    with pytest.raises(KeyboardInterrupt):
        FileStore(str(created))
    assert not created.exists()
    found = tmp_path / "found"
    found.write_bytes(b"earlier")
    with pytest.raises(KeyboardInterrupt):
        FileStore(str(found))
    assert found.read_bytes() == b"earlier"
    monkeypatch.undo()
    held = FileStore(str(created))
    try:
        with pytest.raises(InvalidStateError, match="in use"):
            FileStore(str(created))
        assert created.exists()
    finally:
        held.close()


@pytest.mark.parametrize("command,option,value", [
    ("send", "--timeout", "0"), ("send", "--timeout", "-1"), ("send", "--timeout", "nan"),
    ("send", "--timeout", "inf"), ("send", "--downtime-limit", "0"), ("send", "--max-rounds", "-1"),
    ("send", "--retries", "-1"), ("receive", "--timeout", "-1"), ("receive", "--resume-timeout", "-1"),
    ("receive", "--linger", "nan"), ("bench", "--min-time", "-1"),
])
def test_bad_durations_and_counts_are_usage_errors(tmp_path: Path, command: str, option: str, value: str) -> None:
    """Refused in one line, exit 2, before anything listens or connects (they surfaced as
    'unexpected error: ValueError' once a sender came, or as a socket's own words)."""
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 4096)
    args = {"send": [str(src), "127.0.0.1:9", "--live", "--pause-cmd", "true"],
            "receive": [str(tmp_path / "dst.bin"), "--listen", "127.0.0.1:0"], "bench": []}[command]
    done = subprocess.run([*CLI, command, *args, option, value], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert f"argument {option}: must be" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert "listening" not in done.stderr and not (tmp_path / "dst.bin").exists()


def test_a_zero_resume_timeout_gives_up_at_once() -> None:
    """``--resume-timeout 0`` (valid: no grace) made the listener non-blocking and
    accept() raised BlockingIOError ("unexpected error"); it now means: only a sender
    already back is taken."""
    import socket
    import struct
    import threading

    from cellmigrate.live.errors import ConnectionLostError
    from cellmigrate.live.replay import record_sender_stream

    recorded = record_sender_stream(os.urandom(3 * 4096))
    pos = 0
    for _ in range(3):  # HELLO, AUTH, OFFER: a migration offered, then the sender drops
        length = struct.unpack_from("<I", recorded, pos)[0]
        pos += 5 + length
    listener = listen("127.0.0.1:0")
    receiver = LiveReceiver(MemoryStore(), BufferTarget(), timeout=10)
    outcome: List[Any] = []

    def serve() -> None:
        try:
            outcome.append(receiver.serve(listener, resume_timeout=0))
        except BaseException as exc:  # noqa: BLE001 - the outcome under test
            outcome.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with socket.create_connection(listener.getsockname()) as sock:
        sock.sendall(recorded[:pos])
        sock.settimeout(10)
        got = b""
        while len(got) < 5 + 67 - 32 + 5 + 9:  # CHALLENGE (unkeyed) and ACCEPT
            piece = sock.recv(4096)
            assert piece
            got += piece
    thread.join(20)
    listener.close()
    assert len(outcome) == 1 and isinstance(outcome[0], ConnectionLostError)
    assert "did not reconnect within 0 s" in str(outcome[0])


def test_an_exec_receiver_that_never_answers_is_stopped_with_what_it_started(tmp_path: Path) -> None:
    """``exec:COMMAND`` whose command never speaks: after the timeout, send ends and the
    command and everything it started are gone (the shell's child ran on)."""
    src = _state_file(tmp_path)
    marker = "33.3331"
    done = send(str(src), f"exec:sleep {marker}; true", "--timeout", "2", timeout=120)
    assert done.returncode == 2 and "sent nothing for 2 s" in done.stderr, done.stderr
    assert not _running_with(marker)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_a_stopped_command_is_reported_stopped_only_once_its_processes_are_dead() -> None:
    """kill() only queues SIGKILL: under load the exec receiver's grandchild (the shell's
    sleep) was still running when send returned (a flaky assertion in the test above).
    stop_command now waits, bounded, until each killed descendant is dead or a zombie."""
    from cellmigrate.live import transport

    child = subprocess.Popen(["sleep", "30"])
    try:
        assert not transport._dead(child.pid)
        child.kill()
        began = time.monotonic()
        transport._await_death([child.pid], 10.0)  # our child: a zombie until we reap it
        assert transport._dead(child.pid) and time.monotonic() - began < 5
    finally:
        child.kill()
        child.wait()
    assert transport._dead(child.pid)  # reaped: gone
    began = time.monotonic()
    transport._await_death([os.getpid()], 0.2)  # alive all along: bounded by the timeout
    assert 0.15 < time.monotonic() - began < 5
