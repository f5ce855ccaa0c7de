"""Crash safety of ``apply`` on files, tested by killing real processes (issue 10 §1, §2).

A child ``cellmigrate apply`` is killed with SIGKILL at random moments of its write
window; afterwards the next command (``recover``, or any command that opens the file)
must find BASE exactly old or exactly new, and ``-o OUT`` absent or exactly new, with no
stray file left once the next run on the same target is done. The window is made wide
enough to hit by ``CELLMIGRATE_TEST_IO_DELAY`` (a sleep after every journal record and
every page run the child writes); kills are placed uniformly over the window measured
on an uninterrupted run, a little past its end too, so commits are hit as well.

The default run does a handful of trials per mode on 32 MiB; ``-m large`` does 30 per
mode on 128 MiB, and every signal/mode combination. Each test prints its outcome counts (``pytest -s`` shows them).
"""

from __future__ import annotations

import collections
import os
import random
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable, Counter, Dict, List, Tuple

import pytest

from files_support import cli_env, leftovers, make_states, one_line_error, run, spawn, write_delta

MiB = 1 << 20


def _state(data: bytes, old: bytes, new: bytes) -> str:
    return "old" if data == old else "new" if data == new else "mixed"


def _wait_until(condition: Callable[[], bool], proc: "subprocess.Popen[bytes]", timeout: float = 60) -> bool:
    """Poll ``condition`` every millisecond; False if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.001)
    raise AssertionError("timed out waiting for the child")


class Setup:
    """OLD/NEW states of ``size`` bytes (5% dirty) and the delta between them."""

    def __init__(self, tmp_path: Path, size: int, delay: float) -> None:
        self.dir = tmp_path
        self.old, self.new = make_states(size)
        self.delta = write_delta(tmp_path / "d.cmd", self.old, self.new)
        self.base = tmp_path / "base.bin"
        self.out = tmp_path / "out.bin"
        self.journal = tmp_path / "base.bin.cmjournal"
        self.env = {"CELLMIGRATE_TEST_IO_DELAY": str(delay)}

    def reset(self) -> None:
        self.base.write_bytes(self.old)
        if self.out.exists():
            self.out.unlink()


# --------------------------------------------------------------------------- in place


def _in_place_loop(tmp_path: Path, size: int, trials: int, delay: float, seed: int) -> Counter[str]:
    s = Setup(tmp_path, size, delay)
    rng = random.Random(seed)
    # Calibrate: how long the journal exists (journal write + page writes + fsync).
    s.reset()
    proc = spawn("apply", str(s.base), str(s.delta), env=s.env)
    assert _wait_until(s.journal.exists, proc), "the journal never appeared"
    appeared = time.monotonic()
    assert proc.wait(60) == 0
    window = time.monotonic() - appeared
    assert s.base.read_bytes() == s.new

    outcomes: Counter[str] = collections.Counter()
    for trial in range(trials):
        s.reset()
        proc = spawn("apply", str(s.base), str(s.delta), env=s.env)
        in_window = _wait_until(s.journal.exists, proc)
        time.sleep(rng.uniform(0.0, 1.1 * window))
        proc.kill()
        proc.wait(60)
        at_kill = _state(s.base.read_bytes(), s.old, s.new)
        journal = "journal" if s.journal.exists() else "no journal"
        if trial % 2 == 0:
            rec = run("recover", str(s.base))
            assert rec.returncode == 0, rec.stderr
        else:
            # Any command that opens BASE rolls the journal back first.
            rec = run("checksum", str(s.base))
            assert rec.returncode == 0, rec.stderr
            if journal == "journal":
                assert "rolled back" in rec.stderr or "incomplete journal" in rec.stderr, rec.stderr
        final = _state(s.base.read_bytes(), s.old, s.new)
        assert final in ("old", "new"), f"trial {trial}: BASE is {final} after recovery (at kill: {at_kill}, {journal})"
        assert not s.journal.exists()
        assert leftovers(tmp_path, ["base.bin", "d.cmd"]) == []
        if trial % 2 == 1:
            assert rec.stdout.strip(), "checksum printed nothing"
        outcomes[f"killed {'in' if in_window else 'after'} window: {at_kill} + {journal} -> {final}"] += 1
    # recover, then apply, ends with the new state.
    done = run("apply", str(s.base), str(s.delta))
    assert done.returncode == 0, done.stderr
    assert s.base.read_bytes() == s.new
    print(f"\nin-place kill loop ({trials} trials, {size >> 20} MiB, window {window:.2f} s): {dict(outcomes)}")
    assert sum(n for k, n in outcomes.items() if "+ journal" in k) >= 1, "no kill landed inside the journal window"
    return outcomes


def test_in_place_apply_survives_sigkill(tmp_path: Path) -> None:
    _in_place_loop(tmp_path, 32 * MiB, trials=3, delay=0.001, seed=1)


@pytest.mark.large
def test_in_place_apply_survives_sigkill_many(tmp_path: Path) -> None:
    outcomes = _in_place_loop(tmp_path, 128 * MiB, trials=30, delay=0.0004, seed=2)
    assert sum(outcomes.values()) == 30


# --------------------------------------------------------------------------- a damaged journal


def _journal_records(journal: bytes) -> List[Tuple[int, bytes]]:
    """``(offset, original bytes)`` of each record of a journal body, which must end
    exactly at the end of the file."""
    import struct

    from cellmigrate.journal import HEADER_SIZE

    records, pos = [], HEADER_SIZE
    while pos < len(journal):
        offset, length, reserved = struct.unpack_from("<QII", journal, pos)
        assert reserved == 0 and pos + 16 + length <= len(journal)
        records.append((offset, journal[pos + 16:pos + 16 + length]))
        pos += 16 + length
    assert pos == len(journal)
    return records


def _killed_while_writing_base(tmp_path: Path) -> Tuple[Setup, bytes]:
    """A SIGKILLed in-place apply that had written some of its pages into BASE: the
    setup, and BASE's bytes (neither old nor new) beside a complete journal."""
    s = Setup(tmp_path, 4 * MiB, delay=0.01)  # ~50 page runs, 10 ms each
    s.reset()
    proc = spawn("apply", str(s.base), str(s.delta), env=s.env)
    assert _wait_until(lambda: s.base.read_bytes() != s.old, proc), "the child never wrote BASE"
    proc.kill()
    proc.wait(60)
    at_kill = s.base.read_bytes()
    assert _state(at_kill, s.old, s.new) == "mixed" and s.journal.exists()
    return s, at_kill


@pytest.mark.parametrize("damage", ["a body byte flipped", "the body one byte short"])
def test_a_damaged_journal_of_an_apply_killed_in_base_is_refused_and_kept(tmp_path: Path, damage: str) -> None:
    """The journal of an apply killed after it began writing BASE, damaged since: its
    header is valid (written only after the body was synced), so the body was complete
    and BASE may be partly written. ``recover`` (the function and the command), and any
    command that opens BASE, refuse with one line, exit 2, and change nothing. (They
    removed it as "incomplete" and said BASE was untouched, which it was not.)"""
    from cellmigrate import JournalError
    from cellmigrate import journal as jr

    s, at_kill = _killed_while_writing_base(tmp_path)
    intact = s.journal.read_bytes()
    info = jr.read_journal(s.journal)
    assert info is not None and info.valid
    damaged = bytearray(intact)
    if damage == "a body byte flipped":
        damaged[jr.HEADER_SIZE + (len(intact) - jr.HEADER_SIZE) // 2] ^= 0x10
    else:
        del damaged[-1]
    s.journal.write_bytes(bytes(damaged))
    base = os.path.realpath(s.base)
    with pytest.raises(JournalError) as caught:
        jr.recover(s.base)
    assert "is damaged" in str(caught.value) and "\n" not in str(caught.value)
    assert s.journal.read_bytes() == bytes(damaged) and s.base.read_bytes() == at_kill
    for argv in (["recover", str(s.base)], ["checksum", str(s.base)], ["apply", str(s.base), str(s.delta)]):
        line = one_line_error(run(*argv), 2)
        assert "is damaged" in line and s.journal.name in line and repr(base) in line, line
        assert "may be partly written" in line and "the journal is kept" in line, line
        assert s.journal.read_bytes() == bytes(damaged) and s.base.read_bytes() == at_kill, argv
    # What was refused was a rollback the intact journal still does.
    s.journal.write_bytes(intact)
    done = run("recover", str(s.base))
    assert done.returncode == 0 and b"rolled back" in done.stdout, done.stderr
    assert s.base.read_bytes() == s.old and leftovers(tmp_path, ["base.bin", "d.cmd"]) == []


def test_a_journal_killed_in_its_body_is_discarded(tmp_path: Path) -> None:
    """Killed while writing the journal's body: its header is still the zero placeholder,
    BASE was not touched, and ``recover`` removes the journal."""
    from cellmigrate.journal import HEADER_SIZE

    s = Setup(tmp_path, 4 * MiB, delay=0.01)
    s.reset()
    proc = spawn("apply", str(s.base), str(s.delta), env=s.env)

    def body_begun() -> bool:
        try:
            return s.journal.stat().st_size > HEADER_SIZE + 2 * 4096
        except FileNotFoundError:
            return False

    assert _wait_until(body_begun, proc), "the child finished first"
    proc.kill()
    proc.wait(60)
    journal = s.journal.read_bytes()
    assert journal[:HEADER_SIZE] == bytes(HEADER_SIZE) and s.base.read_bytes() == s.old
    done = run("recover", str(s.base))
    assert done.returncode == 0 and b"removed an incomplete journal" in done.stdout, (done.stdout, done.stderr)
    assert s.base.read_bytes() == s.old and not s.journal.exists()


def test_killed_between_the_body_sync_and_the_header(tmp_path: Path) -> None:
    """The header is written only after the body's fsync: an apply killed at that point
    (the ``journal body synced`` test hook) left a complete body, every record BASE's
    original bytes, under the zero header, and BASE untouched; ``recover`` removes it."""
    from cellmigrate.journal import HEADER_SIZE

    s = Setup(tmp_path, 4 * MiB, delay=0)
    s.reset()
    flag = tmp_path / "pauses"
    env = {"CELLMIGRATE_TEST_PAUSE_FILE": str(flag), "CELLMIGRATE_TEST_PAUSE_SECONDS": "1"}
    proc = spawn("apply", str(s.base), str(s.delta), env=env)
    reached = _wait_until(lambda: flag.exists() and "journal body synced" in flag.read_text().splitlines(), proc)
    assert reached, "the child never paused between the journal's body and its header"
    proc.kill()
    proc.wait(60)
    journal = s.journal.read_bytes()
    assert journal[:HEADER_SIZE] == bytes(HEADER_SIZE)
    records = _journal_records(journal)
    assert records and all(data == s.old[offset:offset + len(data)] for offset, data in records)
    assert s.base.read_bytes() == s.old
    done = run("recover", str(s.base))
    assert done.returncode == 0 and b"removed an incomplete journal" in done.stdout, (done.stdout, done.stderr)
    assert s.base.read_bytes() == s.old and leftovers(tmp_path, ["base.bin", "d.cmd", "pauses"]) == []


# --------------------------------------------------------------------------- -o and --safe-replace


def _replace_loop(tmp_path: Path, mode: str, size: int, trials: int, delay: float, seed: int) -> Counter[str]:
    s = Setup(tmp_path, size, delay)
    rng = random.Random(seed)
    extra = ["-o", str(s.out)] if mode == "-o" else ["--safe-replace"]
    target = s.out if mode == "-o" else s.base

    # Calibrate on the faster of two runs: a first, cold one (a fresh venv's first start,
    # files not yet cached) can take twice as long, and a kill timed from it then lands
    # after the run has ended.
    durations = []
    for _ in range(2):
        s.reset()
        started = time.monotonic()
        proc = spawn("apply", str(s.base), str(s.delta), *extra, env=s.env)
        assert proc.wait(60) == 0
        durations.append(time.monotonic() - started)
        assert target.read_bytes() == s.new
    duration = min(durations)

    outcomes: Counter[str] = collections.Counter()
    for trial in range(trials):
        s.reset()
        # Half the trials use named temporary files (file systems without O_TMPFILE).
        named = trial % 2 == 1
        env = dict(s.env, **({"CELLMIGRATE_TEST_NO_O_TMPFILE": "1"} if named else {}))
        proc = spawn("apply", str(s.base), str(s.delta), *extra, env=env)
        # The first kill lands mid-run for sure; the others anywhere, past the end too.
        time.sleep(0.6 * duration if trial == 0 else rng.uniform(0.3 * duration, 1.2 * duration))
        proc.kill()
        proc.wait(60)
        if mode == "-o":
            result = "absent" if not s.out.exists() else _state(s.out.read_bytes(), s.old, s.new)
            assert result in ("absent", "new"), f"trial {trial}: OUT is {result}"
            assert s.base.read_bytes() == s.old
        else:
            result = _state(s.base.read_bytes(), s.old, s.new)
            assert result in ("old", "new"), f"trial {trial}: BASE is {result}"
        stray = leftovers(tmp_path, ["base.bin", "d.cmd", "out.bin"])
        # The next run on the same target finishes the job and removes what a killed run left.
        again = run("apply", str(s.base), str(s.delta), *extra, *(["-f"] if mode == "-o" else []), env=env)
        assert again.returncode == 0, again.stderr
        assert target.read_bytes() == s.new
        assert leftovers(tmp_path, ["base.bin", "d.cmd", "out.bin"]) == []
        temps = "named" if named else "O_TMPFILE"
        outcomes[f"{temps}: {result}, {len(stray)} stray file(s) then removed"] += 1
    print(f"\n{mode} kill loop ({trials} trials, {size >> 20} MiB, run {duration:.2f} s): {dict(outcomes)}")
    assert any(("absent" in k or "old" in k) for k in outcomes), "no kill landed before the rename"
    return outcomes


@pytest.mark.parametrize("mode", ["-o", "--safe-replace"])
def test_replacing_apply_survives_sigkill(tmp_path: Path, mode: str) -> None:
    _replace_loop(tmp_path, mode, 32 * MiB, trials=2, delay=0.001, seed=3)


@pytest.mark.large
@pytest.mark.parametrize("mode", ["-o", "--safe-replace"])
def test_replacing_apply_survives_sigkill_many(tmp_path: Path, mode: str) -> None:
    outcomes = _replace_loop(tmp_path, mode, 128 * MiB, trials=30, delay=0.0004, seed=4)
    assert sum(outcomes.values()) == 30


# --------------------------------------------------------------------------- catchable signals

# A few in the default run, every combination under -m large.
_SIGNAL_DEFAULT = {("-o", signal.SIGTERM), ("--safe-replace", signal.SIGHUP), ("in-place", signal.SIGTERM)}
SIGNAL_CASES = [
    pytest.param(mode, signum, marks=() if (mode, signum) in _SIGNAL_DEFAULT else pytest.mark.large)
    for mode in ("-o", "--safe-replace", "in-place")
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
]


@pytest.mark.parametrize("mode,signum", SIGNAL_CASES)
def test_catchable_signals_clean_up(tmp_path: Path, mode: str, signum: int) -> None:
    """SIGTERM/SIGHUP/SIGINT inside the write window: one line, 128+N, nothing left, BASE old."""
    s = Setup(tmp_path, 8 * MiB, delay=0.005)
    s.reset()
    extra = {"-o": ["-o", str(s.out)], "--safe-replace": ["--safe-replace"], "in-place": []}[mode]
    # Named temporary files, so that a leftover would be visible.
    env = dict(s.env, CELLMIGRATE_TEST_NO_O_TMPFILE="1")
    # SIGINT at its default in the child: a suite started as a background job of a
    # non-interactive shell ignores SIGINT, and a child inherits that.
    proc = subprocess.Popen(
        [*__import__("files_support").cli_args("apply", str(s.base), str(s.delta), *extra)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(env),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if mode == "in-place":
        ready = _wait_until(s.journal.exists, proc)
    else:
        ready = _wait_until(lambda: any(".cellmigrate-" in n for n in os.listdir(tmp_path)), proc)
    assert ready, "the child finished before the signal"
    time.sleep(0.1)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    code = 130 if signum == signal.SIGINT else 128 + signum
    done = subprocess.CompletedProcess(proc.args, proc.returncode, b"", err.decode())
    line = one_line_error(done, code)
    assert "interrupted" in line
    assert s.base.read_bytes() == s.old
    assert not s.out.exists()
    assert leftovers(tmp_path, ["base.bin", "d.cmd"]) == []


def test_stale_named_temp_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    """A SIGKILLed run's ``.OUT.cellmigrate-PID.tmp`` goes at the next run on OUT; a live PID's stays."""
    from cellmigrate.statefile import remove_stale_temps, temp_name

    s = Setup(tmp_path, 1 * MiB, delay=0)
    s.reset()
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / temp_name(s.out, pid=dead.pid)
    live = tmp_path / temp_name(s.out, pid=os.getppid())
    other = tmp_path / temp_name(tmp_path / "other.bin", pid=dead.pid)
    for p in (stale, live, other):
        p.write_bytes(b"x" * 100)
    proc = run("apply", str(s.base), str(s.delta), "-o", str(s.out))
    assert proc.returncode == 0, proc.stderr
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert remove_stale_temps(tmp_path / "other.bin") == [other]


def test_a_temp_held_by_a_writer_whose_pid_means_nothing_here_stays(tmp_path: Path) -> None:
    """A writer in another PID namespace sharing the directory: its PID may be dead (or
    ours) here, but it holds its temporary file under flock, so the file stays; once the
    lock is gone, it is stale. A name of an earlier release (no token) is still known."""
    import fcntl

    from cellmigrate.statefile import remove_stale_temps, temp_name

    dest = tmp_path / "out.bin"
    dead = subprocess.Popen(["true"])
    dead.wait()
    held = tmp_path / temp_name(dest, pid=dead.pid)
    old_style = tmp_path / f".out.bin.cellmigrate-{dead.pid}.tmp"
    for p in (held, old_style):
        p.write_bytes(b"x")
    assert held.name != temp_name(dest, pid=dead.pid)  # a token of its own each time
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert remove_stale_temps(dest) == [old_style]
        assert held.exists()
    finally:
        os.close(fd)
    assert remove_stale_temps(dest) == [held]


def test_threads_replacing_one_file_never_publish_a_half_written_one(tmp_path: Path) -> None:
    """Two threads in ``atomic_replace`` on the same target, one failing half-way: each
    writes a temporary file of its own, so the target ends as the complete one, and
    nothing else is left (before, both used ``.NAME.cellmigrate-PID.tmp``: the second
    unlinked the first's, and the first renamed the second's half-written file)."""
    import threading

    from cellmigrate.statefile import atomic_replace

    dest = tmp_path / "point.bin"
    a_written, b_written = threading.Event(), threading.Event()
    errors: List[BaseException] = []

    def a() -> None:
        with atomic_replace(dest) as tmp:
            tmp.write_bytes(b"A" * 100_000)
            a_written.set()
            assert b_written.wait(10)

    def b() -> None:
        assert a_written.wait(10)
        try:
            with atomic_replace(dest) as tmp:
                with open(tmp, "wb") as fh:
                    fh.write(b"B" * 1000)  # half of what it meant to write
                    b_written.set()
                    raise RuntimeError("cancelled")
        except RuntimeError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert len(errors) == 1
    assert dest.read_bytes() == b"A" * 100_000
    assert os.listdir(tmp_path) == ["point.bin"]
