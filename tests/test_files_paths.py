"""What the user names is what gets written (issue 10 §3; issue 11 §4's ``-``).

Symlinks are resolved (the link stays, its target is replaced or updated); FIFOs and
character devices are written through as streams, never replaced; an input is never
overwritten, an existing output only with ``-f``; a FIFO given as a state input is
refused at once instead of hanging; ``-`` is stdin/stdout for deltas, so
``cellmigrate diff a b -o - | cellmigrate apply base -`` works in a real shell pipe.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import List, Tuple

import pytest

from cellmigrate import DeltaSnapshot

from files_support import cli_env, make_states, one_line_error, run, write_delta

MiB = 1 << 20


def _setup(tmp_path: Path, size: int = 1 * MiB) -> Tuple[Path, Path, Path, bytes, bytes]:
    old, new = make_states(size, seed=11)
    paths = tmp_path / "old.bin", tmp_path / "new.bin"
    paths[0].write_bytes(old)
    paths[1].write_bytes(new)
    delta = write_delta(tmp_path / "d.cmd", old, new)
    return paths[0], paths[1], delta, old, new


# --------------------------------------------------------------------------- symlinks


@pytest.mark.parametrize("mode", ["in-place", "in-place-grow", "--safe-replace", "--safe-replace-grow"])
def test_symlinked_base_stays_a_link_and_its_target_is_updated(tmp_path: Path, mode: str) -> None:
    old_path, _, delta, old, new = _setup(tmp_path)
    real = tmp_path / "data" / "state.bin"
    real.parent.mkdir()
    grow = mode.endswith("-grow")
    if grow:
        # A short base, grown by apply: a resizing delta (it records the short base's size;
        # a version-2 delta for the full size refuses a short base).
        short = old[: 100 * 4096]
        real.write_bytes(short)
        d = DeltaSnapshot.create(bytes(16), short, new, 0, 1, resize=True)
        delta.write_bytes(d.serialize())
    else:
        real.write_bytes(old)
    link = tmp_path / "link.bin"
    link.symlink_to(os.path.relpath(real, tmp_path))
    extra = ["--safe-replace"] if mode.startswith("--safe-replace") else []
    proc = run("apply", str(link), str(delta), *extra)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == os.path.relpath(real, tmp_path)
    assert real.read_bytes() == new
    assert sorted(os.listdir(real.parent)) == ["state.bin"]


def test_output_symlink_is_resolved(tmp_path: Path) -> None:
    old_path, new_path, delta, old, new = _setup(tmp_path)
    target = tmp_path / "real.cmd"
    target.write_bytes(b"previous")
    link = tmp_path / "out.cmd"
    link.symlink_to(target.name)
    assert run("diff", str(old_path), str(new_path), "-o", str(link), "-f").returncode == 0
    assert link.is_symlink() and DeltaSnapshot.deserialize(target.read_bytes()).dirty_page_count() > 0
    # A dangling link: its target is created.
    dangling = tmp_path / "dangling.bin"
    dangling.symlink_to("made.bin")
    proc = run("apply", str(old_path), str(delta), "-o", str(dangling))
    assert proc.returncode == 0, proc.stderr
    assert dangling.is_symlink() and (tmp_path / "made.bin").read_bytes() == new


# --------------------------------------------------------------------------- streams out


def _read_fifo(path: Path, into: List[bytes]) -> threading.Thread:
    def reader() -> None:
        with open(path, "rb") as fh:
            into.append(fh.read())

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize("command", ["diff", "apply"])
def test_fifo_output_is_written_through_not_replaced(tmp_path: Path, command: str) -> None:
    old_path, new_path, delta, old, new = _setup(tmp_path)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: List[bytes] = []
    t = _read_fifo(fifo, got)
    if command == "diff":
        proc = run("diff", str(old_path), str(new_path), "-o", str(fifo), timeout=60)
    else:
        proc = run("apply", str(old_path), str(delta), "-o", str(fifo), timeout=60)
    t.join(30)
    assert proc.returncode == 0, proc.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    if command == "diff":
        state = bytearray(old)
        DeltaSnapshot.deserialize(got[0]).apply(state)
        assert state == new
    else:
        assert got[0] == new
        assert old_path.read_bytes() == old


def _private_null(tmp_path: Path) -> Path:
    """A character device to write to: as root, our own node of the null device in
    tmp_path (so a broken implementation replaces that node, never the machine's
    /dev/null); otherwise /dev/null itself, which a non-root process cannot replace."""
    if os.geteuid() != 0:
        return Path("/dev/null")
    node = tmp_path / "devnull"
    os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return node


def test_character_device_output_is_written_through(tmp_path: Path) -> None:
    old_path, new_path, delta, _, _ = _setup(tmp_path)
    device = _private_null(tmp_path)
    link = tmp_path / "null"
    link.symlink_to(device)
    for target in (str(device), str(link)):
        assert run("diff", str(old_path), str(new_path), "-o", target).returncode == 0
        assert run("apply", str(old_path), str(delta), "-o", target).returncode == 0
    assert stat.S_ISCHR(os.stat(device).st_mode) and link.is_symlink()


def test_stdout_outputs(tmp_path: Path) -> None:
    old_path, new_path, delta, old, new = _setup(tmp_path)
    proc = run("diff", str(old_path), str(new_path), "-o", "-")
    assert proc.returncode == 0 and "<stdout>" in proc.stderr
    state = bytearray(old)
    DeltaSnapshot.deserialize(proc.stdout).apply(state)
    assert state == new
    proc = run("apply", str(old_path), str(delta), "-o", "-")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == new and old_path.read_bytes() == old


# --------------------------------------------------------------------------- streams in


def test_shell_pipe_diff_to_apply(tmp_path: Path) -> None:
    old_path, new_path, _, old, new = _setup(tmp_path, 4 * MiB)
    base = tmp_path / "base.bin"
    base.write_bytes(old)
    exe = shlex.quote(sys.executable)
    line = (f"{exe} -m cellmigrate diff {shlex.quote(str(old_path))} {shlex.quote(str(new_path))} -o - | "
            f"{exe} -m cellmigrate apply {shlex.quote(str(base))} -")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True,
                          env=cli_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert base.read_bytes() == new
    # inspect and apply -o from stdin too; a process substitution is a pipe path.
    line = (f"{exe} -m cellmigrate diff {shlex.quote(str(old_path))} {shlex.quote(str(new_path))} -o - | "
            f"{exe} -m cellmigrate inspect - --json")
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True,
                          env=cli_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0 and '"dirty_pages"' in proc.stdout, proc.stderr
    out = tmp_path / "out.bin"
    line = (f"{exe} -m cellmigrate apply {shlex.quote(str(old_path))} "
            f"<({exe} -m cellmigrate diff {shlex.quote(str(old_path))} {shlex.quote(str(new_path))} -o -) "
            f"-o {shlex.quote(str(out))}")
    proc = subprocess.run(["bash", "-c", line], capture_output=True, text=True, env=cli_env(), timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == new


def test_bad_stream_input_is_one_line(tmp_path: Path) -> None:
    old_path, _, _, old, _ = _setup(tmp_path)
    proc = run("apply", str(old_path), "-", input=b"not a delta at all")
    assert "cannot decode delta" in one_line_error(proc, 2)
    assert old_path.read_bytes() == old
    proc = run("inspect", "-", input=b"")
    assert "empty" in one_line_error(proc, 2)


@pytest.mark.parametrize("argv", [
    ["checksum", "{fifo}"], ["verify", "{fifo}", "{old}"], ["diff", "{old}", "{fifo}", "-o", "{out}"],
    ["apply", "{fifo}", "{delta}"], ["apply", "{fifo}", "{delta}", "-o", "{out}"], ["recover", "{fifo}"],
    ["checksum", "-"], ["apply", "-", "{delta}"],
])
def test_fifo_as_a_state_input_is_refused_without_hanging(tmp_path: Path, argv: List[str]) -> None:
    old_path, _, delta, _, _ = _setup(tmp_path)
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    names = {"fifo": str(fifo), "old": str(old_path), "out": str(tmp_path / "out.bin"), "delta": str(delta)}
    proc = run(*(a.format(**names) for a in argv), timeout=30)  # a hang fails with TimeoutExpired
    line = one_line_error(proc, 2)
    assert "FIFO" in line or "'-'" in line or "stdin" in line, line
    assert not (tmp_path / "out.bin").exists()


def test_delta_from_a_named_fifo_is_streamed(tmp_path: Path) -> None:
    old_path, _, delta, old, new = _setup(tmp_path)
    fifo = tmp_path / "p"
    os.mkfifo(fifo)
    data = delta.read_bytes()

    def writer() -> None:
        with open(fifo, "wb") as fh:
            fh.write(data)

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    proc = run("apply", str(old_path), str(fifo), timeout=60)
    t.join(30)
    assert proc.returncode == 0, proc.stderr
    assert old_path.read_bytes() == new


# --------------------------------------------------------------------------- never clobber


def _main(argv: List[str], capsys: pytest.CaptureFixture[str]) -> Tuple[int, str]:
    """The CLI in process (these refusals need no child process): code and stderr."""
    from cellmigrate.cli import main

    code = main(argv)
    return code, capsys.readouterr().err


def test_inputs_are_never_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_path, new_path, delta, old, new = _setup(tmp_path)
    hard = tmp_path / "hard.bin"
    os.link(old_path, hard)
    cases = [
        ["diff", str(old_path), str(new_path), "-o", str(old_path)],
        ["diff", str(old_path), str(new_path), "-o", str(new_path), "-f"],
        ["diff", str(old_path), str(new_path), "-o", str(hard), "-f"],
        ["apply", str(old_path), str(delta), "-o", str(delta), "-f"],
        ["apply", str(old_path), str(delta), "-o", str(old_path), "-f"],
        ["apply", str(delta), str(delta)],
    ]
    for argv in cases:
        code, err = _main(argv, capsys)
        lines = err.splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert "input" in lines[0] or "same file" in lines[0], lines[0]
    assert old_path.read_bytes() == old and new_path.read_bytes() == new
    assert DeltaSnapshot.deserialize(delta.read_bytes()).dirty_page_count() > 0


def test_existing_output_needs_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old_path, new_path, delta, old, new = _setup(tmp_path)
    out = tmp_path / "out.bin"
    out.write_bytes(b"keep me")
    for argv in (["diff", str(old_path), str(new_path), "-o", str(out)],
                 ["apply", str(old_path), str(delta), "-o", str(out)]):
        code, err = _main(argv, capsys)
        assert code == 2 and len(err.splitlines()) == 1 and "--force" in err, err
        assert out.read_bytes() == b"keep me"
    out.chmod(0o640)
    code, err = _main(["-q", "apply", str(old_path), str(delta), "-o", str(out), "--force"], capsys)
    assert code == 0, err
    assert out.read_bytes() == new
    assert stat.S_IMODE(out.stat().st_mode) == 0o640  # the replaced file keeps its mode
    code, err = _main(["diff", str(old_path), str(new_path), "-o", str(tmp_path), "-f"], capsys)
    assert code == 2 and "directory" in err


def test_binary_to_a_terminal_is_refused(tmp_path: Path) -> None:
    """``-o -`` on a terminal: refused, as zstd does (never binary garbage on a tty)."""
    from files_support import cli_args

    old_path, new_path, _, _, _ = _setup(tmp_path)
    master, slave = os.openpty()
    try:
        proc = subprocess.run(cli_args("diff", str(old_path), str(new_path), "-o", "-"), stdout=slave,
                              stderr=subprocess.PIPE, env=cli_env(), timeout=60, cwd=tmp_path)
    finally:
        os.close(slave)
        os.close(master)
    done = subprocess.CompletedProcess(proc.args, proc.returncode, b"", proc.stderr.decode())
    assert "terminal" in one_line_error(done, 2)


@pytest.mark.parametrize("how", ["apply -o", "apply --safe-replace", "receive"])
def test_a_replaced_state_file_keeps_its_owner_and_mode(tmp_path: Path, how: str) -> None:
    """Run as root, apply and receive turned a service's state file into root's (mode
    kept, owner lost): the file replacing it now takes its owner, group and mode. (Not
    root: the file is ours already, and its mode is what is checked.)"""
    from files_support import make_states, write_delta

    old, new = make_states(16 * 4096, dirty_fraction=0.3, seed=5)
    target = tmp_path / "state.bin"
    target.write_bytes(old)
    os.chmod(target, 0o640)
    owner = (65534, 65534) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(target, *owner)
    cli = [sys.executable, "-m", "cellmigrate"]
    if how == "receive":
        from live_net import Receiver, send

        src = tmp_path / "src.bin"
        src.write_bytes(new)
        rx = Receiver(target)
        try:
            assert send(str(src), rx.address).returncode == 0
            assert rx.wait().returncode == 0
        finally:
            rx.kill()
    else:
        delta = write_delta(tmp_path / "d.cmd", old, new)
        base = tmp_path / "base.bin"
        base.write_bytes(old)
        args = ["-o", str(target), "-f"] if how == "apply -o" else ["--safe-replace"]
        base_or_target = str(base) if how == "apply -o" else str(target)
        done = subprocess.run([*cli, "apply", base_or_target, str(delta), *args], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
    st = target.stat()
    assert target.read_bytes() == new
    assert (st.st_uid, st.st_gid) == owner and stat.S_IMODE(st.st_mode) == 0o640
