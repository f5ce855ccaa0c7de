"""The undo journal of in-place apply (cellmigrate.journal), in process.

Each crash state the kill-loop tests reach at random is built here on purpose: a complete
journal beside a half-written BASE, a journal torn at every length, a damaged one, one
of another version or for another file, a failure or signal inside the write window.
"""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path
from typing import List, Optional, Tuple

import pytest

from cellmigrate import InvalidStateError, JournalError, PAGE_SIZE
from cellmigrate import journal as jr
from cellmigrate.cli import main
from cellmigrate.statefile import StateFile

from files_support import make_states, write_delta


def _files(tmp_path: Path, size: int = 64 * PAGE_SIZE + 100) -> Tuple[Path, bytes, bytes, Path]:
    old, new = make_states(size, dirty_fraction=0.2, seed=3)
    base = tmp_path / "base.bin"
    base.write_bytes(old)
    return base, old, new, write_delta(tmp_path / "d.cmd", old, new)


def _dirty_runs(old: bytes, new: bytes) -> List[Tuple[int, int]]:
    pages = [i for i in range(-(-len(new) // PAGE_SIZE))
             if old[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != new[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]]
    return jr._runs(pages, len(new))


def _journal(base: Path, old: bytes, new: bytes, halfway: bool = False) -> Path:
    """Write the journal of the change OLD -> NEW beside BASE (holding OLD); with
    ``halfway``, then half of the new pages into BASE. Returns the journal's path."""
    runs = _dirty_runs(old, new)
    jpath = jr.journal_path(base)
    fd = os.open(base, os.O_RDWR)
    try:
        jr._write_journal(jpath, fd, runs, len(old), len(new))
        if halfway:
            for offset, length in runs[: len(runs) // 2]:
                os.pwrite(fd, new[offset:offset + length], offset)
    finally:
        os.close(fd)
    return jpath


def _half_written(base: Path, old: bytes, new: bytes) -> None:
    """What a kill in the write window leaves: a complete journal, some pages new."""
    _journal(base, old, new, halfway=True)
    data = base.read_bytes()
    assert data != old and data != new


def test_complete_journal_rolls_back_a_half_written_base(tmp_path: Path) -> None:
    base, old, new, _ = _files(tmp_path)
    _half_written(base, old, new)
    info = jr.read_journal(jr.journal_path(base))
    assert info is not None and info.valid and info.old_size == len(old) and info.records >= 1
    done = jr.recover(base)
    assert done.action == "rolled back" and done.bytes_restored > 0
    assert base.read_bytes() == old
    assert not jr.journal_path(base).exists()
    assert jr.recover(base).action == "clean"


def test_rollback_restores_the_old_size_of_a_grown_base(tmp_path: Path) -> None:
    base, old, new, _ = _files(tmp_path)
    short = old[: 10 * PAGE_SIZE + 7]
    base.write_bytes(short)
    fd = os.open(base, os.O_RDWR)
    try:
        jr._write_journal(jr.journal_path(base), fd, jr._runs(list(range(20)), len(short)), len(short), len(new))
        os.ftruncate(fd, len(new))
        os.pwrite(fd, b"\xff" * PAGE_SIZE, 0)
        os.pwrite(fd, b"\xee" * PAGE_SIZE, 30 * PAGE_SIZE)
    finally:
        os.close(fd)
    assert jr.recover(base).action == "rolled back"
    assert base.read_bytes() == short


def test_torn_journal_at_every_length_is_discarded(tmp_path: Path) -> None:
    """Killed while writing the journal: BASE was never touched, the journal just goes.
    Torn means no valid header: the header is written only after the body was synced."""
    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    jpath = _journal(base, old, new)
    whole = jpath.read_bytes()
    for cut in range(0, jr.HEADER_SIZE):
        jpath.write_bytes(whole[:cut])
        done = jr.recover(base)
        assert done.action == "discarded", cut
        assert base.read_bytes() == old
        assert not jpath.exists()
    # Our own writer's torn states: the zero header (written first) over a body cut
    # anywhere, or over the whole body (killed between the body's fsync and the header).
    for cut in sorted(set(range(jr.HEADER_SIZE, len(whole), 97)) | {jr.HEADER_SIZE + 1, len(whole)}):
        jpath.write_bytes(bytes(jr.HEADER_SIZE) + whole[jr.HEADER_SIZE:cut])
        done = jr.recover(base)
        assert done.action == "discarded" and "bad magic" in done.reason, cut
        assert base.read_bytes() == old and not jpath.exists()


def test_a_sealed_header_over_a_short_or_long_body_is_refused_and_kept(tmp_path: Path) -> None:
    """A valid header proves the body was durable before BASE was touched: a body cut (or
    grown) since is damage, not a tear. BASE may be partly written; nothing is removed or
    written (this once discarded the journal as torn and left BASE half-written)."""
    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    jpath = _journal(base, old, new, halfway=True)
    whole = jpath.read_bytes()
    half = base.read_bytes()
    cuts = sorted(set(range(jr.HEADER_SIZE, len(whole), 97)) | {len(whole) - 1})
    for body in [whole[:cut] for cut in cuts] + [whole + b"\0"]:
        jpath.write_bytes(body)
        with pytest.raises(JournalError, match="is damaged.*may be partly written.*the journal is kept"):
            jr.recover(base)
        assert jpath.read_bytes() == body and base.read_bytes() == half
    jpath.write_bytes(whole)
    assert jr.recover(base).action == "rolled back" and base.read_bytes() == old


@pytest.mark.parametrize("where", ["header", "body"])
def test_damaged_journal_is_not_applied(tmp_path: Path, where: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A bad header: torn (the header is the last thing written), discarded. A valid
    header over a bad body: damaged after it was complete, refused and kept, BASE as is."""
    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    jpath = _journal(base, old, new, halfway=where == "body")  # a torn header: BASE not yet written
    half = base.read_bytes()
    data = bytearray(jpath.read_bytes())
    data[20 if where == "header" else len(data) - 5] ^= 0x01
    jpath.write_bytes(bytes(data))
    if where == "header":
        info = jr.read_journal(jpath)
        assert info is not None and not info.valid and "header digest" in info.reason
        assert jr.recover(base).action == "discarded"
        assert not jpath.exists() and base.read_bytes() == old
        return
    with pytest.raises(JournalError, match="does not match the header's digest") as caught:
        jr.read_journal(jpath)
    message = str(caught.value)
    assert "\n" not in message and str(jpath) in message and repr(str(base.resolve())) in message
    assert "the journal is kept" in message and "from a copy" in message and "remove the journal" in message
    with pytest.raises(JournalError, match="is damaged"):
        jr.recover(base)
    with pytest.raises(JournalError, match="is damaged"):
        jr.recover_if_pending(base)
    with pytest.raises(JournalError, match="is damaged"):
        StateFile(base)
    assert jpath.read_bytes() == bytes(data) and base.read_bytes() == half
    for argv in (["recover", str(base)], ["checksum", str(base)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is damaged" in err[0] and "Traceback" not in err[0], err
    assert jpath.read_bytes() == bytes(data) and base.read_bytes() == half


def test_the_journal_header_is_written_only_after_the_body_is_synced(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's synchronous=FULL order, seen on the journal's descriptor during a real
    apply: zero header and body, fsync, then the real header, fsync (then BASE's pages)."""
    from cellmigrate import DeltaSnapshot

    base, old, new, delta_path = _files(tmp_path)
    delta = DeltaSnapshot.deserialize(delta_path.read_bytes())
    events: List[Tuple[str, ...]] = []

    def target(fd: int) -> str:
        name = os.readlink(f"/proc/self/fd/{fd}")
        return "journal" if name.endswith(jr.SUFFIX) else "base" if name == str(base.resolve()) else "other"

    real_write, real_fsync = jr.write_all, os.fsync

    def write_all(fd: int, data: object, offset: object = None) -> None:
        head = bytes(memoryview(data)[:8])  # type: ignore[arg-type]
        kind = "header" if offset == 0 and head == jr.MAGIC else "zeros" if offset == 0 else "data"
        events.append(("write", target(fd), kind))
        real_write(fd, data, offset)  # type: ignore[arg-type]

    def fsync(fd: int) -> None:
        events.append(("fsync", target(fd)))
        real_fsync(fd)

    monkeypatch.setattr(jr, "write_all", write_all)
    monkeypatch.setattr(jr.os, "fsync", fsync)
    jr.apply_in_place(base, delta)
    assert base.read_bytes() == new
    journal = [e[0] + ":" + (e[2] if len(e) > 2 else "") for e in events if e[1] == "journal"]
    body = journal.index("fsync:")
    assert journal[0] == "write:zeros" and set(journal[1:body]) == {"write:data"} and body > 1
    assert journal[body:] == ["fsync:", "write:header", "fsync:"], journal
    # BASE is written only after the journal's second fsync.
    first_base = next(i for i, e in enumerate(events) if e[1] == "base")
    last_journal = max(i for i, e in enumerate(events) if e[1] == "journal")
    assert first_base > last_journal


def _sealed_journal(base: Path, records: bytes, count: int, old_size: Optional[int] = None,
                    new_size: Optional[int] = None) -> Path:
    """A journal for BASE as it is now, sealed (header and body digests valid) around
    ``records`` whatever they say (and the sizes, BASE's own unless given)."""
    import xxhash

    st = os.stat(base)
    old_size = st.st_size if old_size is None else old_size
    new_size = st.st_size if new_size is None else new_size
    head = struct.pack("<8sIIQQQQQQ16s", jr.MAGIC, 1, jr.HEADER_SIZE, old_size, new_size, st.st_dev, st.st_ino,
                       count, len(records), xxhash.xxh3_128_digest(records))
    jpath = jr.journal_path(base)
    jpath.write_bytes(head + xxhash.xxh3_128_digest(head) + records)
    return jpath


@pytest.mark.parametrize("bad", ["out of bounds", "past the body", "bytes after"])
def test_a_sealed_journal_with_a_bad_record_writes_nothing(tmp_path: Path, bad: str) -> None:
    """The record table is checked whole before the first record is written back: a bad
    second record once left BASE half rolled back (its first record written) and refused."""
    base, old, _, _ = _files(tmp_path, size=2 * PAGE_SIZE)
    first = struct.pack("<QII", 0, 4, 0) + b"XXXX"
    if bad == "out of bounds":
        records, count = first + struct.pack("<QII", 100000, 4, 0) + b"YYYY", 2
    elif bad == "past the body":
        records, count = first + struct.pack("<QII", 8, 400, 0) + b"YYYY", 2
    else:
        records, count = first + b"trailing", 1
    jpath = _sealed_journal(base, records, count)
    info = jr.read_journal(jpath)
    assert info is not None and info.valid  # sealed: only the records are wrong
    with pytest.raises(JournalError):
        jr.recover(base)
    assert base.read_bytes() == old and jpath.exists()
    assert main(["recover", str(base)]) == 2
    assert base.read_bytes() == old


def test_unknown_version_and_other_file_are_refused_and_kept(tmp_path: Path) -> None:
    import xxhash

    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    jpath = _journal(base, old, new)
    good = jpath.read_bytes()
    fields = bytearray(good[:80])
    struct.pack_into("<I", fields, 8, 2)  # version 2, correctly sealed
    jpath.write_bytes(bytes(fields) + xxhash.xxh3_128_digest(bytes(fields)) + good[96:])
    with pytest.raises(JournalError, match="version 2"):
        jr.recover(base)
    assert jpath.exists() and base.read_bytes() == old
    # A journal whose file was replaced since (another inode) is never applied to it.
    jpath.write_bytes(good)
    replacement = tmp_path / "other.bin"
    replacement.write_bytes(new)
    os.replace(replacement, base)
    with pytest.raises(JournalError, match="another file"):
        jr.recover(base)
    assert base.read_bytes() == new and jpath.exists()


def test_apply_in_place_and_the_refusals(tmp_path: Path) -> None:
    from cellmigrate import DeltaSnapshot

    base, old, new, delta_path = _files(tmp_path)
    delta = DeltaSnapshot.deserialize(delta_path.read_bytes())
    # A delta for another base is refused before anything is written (not even mtime).
    other = bytearray(old)
    clean = next(i for i in range(len(old) // PAGE_SIZE)
                 if old[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] == new[i * PAGE_SIZE:(i + 1) * PAGE_SIZE])
    other[clean * PAGE_SIZE + 5] ^= 1  # a page the delta does not carry
    base.write_bytes(bytes(other))
    before = os.stat(base).st_mtime_ns
    with pytest.raises(InvalidStateError, match="checksum"):
        jr.apply_in_place(base, delta)
    assert base.read_bytes() == bytes(other) and os.stat(base).st_mtime_ns == before
    assert not jr.journal_path(base).exists()
    # A short base that the delta does not fit: grown under the journal, then undone.
    short = bytes(other[: 5 * PAGE_SIZE])
    base.write_bytes(short)
    with pytest.raises(InvalidStateError):
        jr.apply_in_place(base, delta)
    assert base.read_bytes() == short
    assert not jr.journal_path(base).exists()
    # The right base: new, and the report says what happened.
    base.write_bytes(old)
    report = jr.apply_in_place(base, delta)
    assert base.read_bytes() == new
    assert report.pages_written == delta.dirty_page_count() and report.bytes_journaled > 0
    assert report.recovered is None
    # A short base that is a prefix of OLD grows to NEW.
    base.write_bytes(old[: 3 * PAGE_SIZE])
    prefix_delta = DeltaSnapshot.create(bytes(16), old[: 3 * PAGE_SIZE] + bytes(len(old) - 3 * PAGE_SIZE), new, 0, 1)
    jr.apply_in_place(base, prefix_delta)
    assert base.read_bytes() == new


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failure_inside_the_write_window_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    exc: BaseException) -> None:
    from cellmigrate import DeltaSnapshot

    base, old, new, delta_path = _files(tmp_path)
    delta = DeltaSnapshot.deserialize(delta_path.read_bytes())
    calls = {"n": 0}
    real = jr.write_all

    def failing(fd: int, data: object, offset: object = None) -> None:
        # Journal records go to the journal fd; count only writes into BASE.
        if offset is not None and os.readlink(f"/proc/self/fd/{fd}") == str(base.resolve()):
            calls["n"] += 1
            if calls["n"] == 3:
                raise exc
        real(fd, data, offset)  # type: ignore[arg-type]

    monkeypatch.setattr(jr, "write_all", failing)
    with pytest.raises(type(exc)):
        jr.apply_in_place(base, delta)
    assert calls["n"] >= 3
    assert base.read_bytes() == old
    assert not jr.journal_path(base).exists()


def test_opening_a_file_with_a_pending_journal_rolls_it_back(tmp_path: Path) -> None:
    base, old, new, _ = _files(tmp_path)
    _half_written(base, old, new)
    with StateFile(base) as f:
        assert f.recovered is not None and f.recovered.action == "rolled back"
        assert bytes(f.buffer) == old


def test_cli_refuses_when_it_cannot_roll_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    base, old, new, delta = _files(tmp_path)
    _half_written(base, old, new)
    real_open = jr.open_regular

    def read_only(path: object, flags: int = os.O_RDONLY) -> int:
        if flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags)  # type: ignore[arg-type]

    monkeypatch.setattr(jr, "open_regular", read_only)
    for argv in (["checksum", str(base)], ["apply", str(base), str(delta)], ["recover", str(base)]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cellmigrate recover" in err[0], err
    assert jr.journal_path(base).exists()
    monkeypatch.undo()
    # recover, then apply: the new state.
    assert main(["recover", str(base)]) == 0
    assert "rolled back" in capsys.readouterr().out
    assert main(["apply", str(base), str(delta)]) == 0
    assert base.read_bytes() == new
    assert main(["recover", str(base)]) == 0
    assert "clean" in capsys.readouterr().out


def test_a_live_apply_is_never_rolled_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another process holds BASE's lock (a running apply), recovery waits, then refuses."""
    from cellmigrate import statefile

    base, old, new, _ = _files(tmp_path)
    _half_written(base, old, new)
    monkeypatch.setattr(statefile, "LOCK_WAIT", 0.1)
    holder = os.open(base, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)  # another open file description: like another process
        with pytest.raises(JournalError, match="another cellmigrate process"):
            jr.recover(base)
        with pytest.raises(JournalError):
            StateFile(base)
        assert jr.journal_path(base).exists()
    finally:
        os.close(holder)
    assert jr.recover(base).action == "rolled back"
    assert base.read_bytes() == old


def test_journal_follows_the_symlink_target(tmp_path: Path) -> None:
    base, old, new, delta = _files(tmp_path)
    link = tmp_path / "link.bin"
    link.symlink_to(base.name)
    assert jr.journal_path(link) == jr.journal_path(base)
    assert main(["apply", str(link), str(delta)]) == 0
    assert link.is_symlink() and base.read_bytes() == new


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_resizing_delta_in_place_and_its_rollback(tmp_path: Path, change: str) -> None:
    """A delta between states of different sizes (``resize=True``): BASE grows or is cut,
    and the cut bytes are journaled so that a crash still rolls back to OLD."""
    from cellmigrate import DeltaSnapshot

    long_state, other = make_states(40 * PAGE_SIZE + 10, dirty_fraction=0.3, seed=21)
    short_state = other[: 23 * PAGE_SIZE + 5]
    old, new = (short_state, long_state) if change == "grow" else (long_state, short_state)
    delta = DeltaSnapshot.create(bytes(16), old, new, 0, 1, resize=True)
    assert delta.base_size == len(old)
    base = tmp_path / "base.bin"
    base.write_bytes(old + b"x")  # not the delta's base size: refused, untouched
    with pytest.raises(InvalidStateError):
        jr.apply_in_place(base, delta)
    assert base.read_bytes() == old + b"x"
    base.write_bytes(old)
    report = jr.apply_in_place(base, delta)
    assert base.read_bytes() == new
    assert (report.old_size, report.new_size) == (len(old), len(new))
    assert not jr.journal_path(base).exists()
    if change == "shrink":
        # Killed after the cut: the journal holds the pages and the cut tail.
        base.write_bytes(old)
        fd = os.open(base, os.O_RDWR)
        try:
            runs = jr._runs([p.index for p in delta.dirty_pages], len(new))
            jr._write_journal(jr.journal_path(base), fd, runs + jr._tail_runs(len(new), len(old)), len(old), len(new))
            os.ftruncate(fd, len(new))
            os.pwrite(fd, new[: PAGE_SIZE], 0)
        finally:
            os.close(fd)
        assert jr.recover(base).action == "rolled back"
        assert base.read_bytes() == old


@pytest.mark.parametrize("change", ["grow", "shrink"])
@pytest.mark.parametrize("mode", ["-o", "--safe-replace", "-o -", "in place"])
def test_cli_applies_resizing_deltas_in_every_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capfdbinary: pytest.CaptureFixture[bytes],
                                                   change: str, mode: str) -> None:
    """The CLI's file modes give the library's result for a resizing delta. (Such a delta
    cannot be serialized until the wire format carries ``base_size``, so it is handed to
    the command directly.)"""
    from cellmigrate import DeltaSnapshot, cli

    long_state, other = make_states(40 * PAGE_SIZE + 10, dirty_fraction=0.3, seed=22)
    short_state = other[: 23 * PAGE_SIZE + 5]
    old, new = (short_state, long_state) if change == "grow" else (long_state, short_state)
    delta = DeltaSnapshot.create(bytes(16), old, new, 0, 1, resize=True)
    import contextlib

    monkeypatch.setattr(cli, "_opened_delta",
                        lambda path, max_size=0, allow_legacy_keyed=False: contextlib.nullcontext((delta, 100)))
    base = tmp_path / "base.bin"
    base.write_bytes(old)
    out = tmp_path / "out.bin"
    extra = {"-o": ["-o", str(out)], "--safe-replace": ["--safe-replace"], "-o -": ["-o", "-"], "in place": []}[mode]
    assert cli.main(["-q", "apply", str(base), str(tmp_path / "unused.cmd"), *extra]) == 0
    written = capfdbinary.readouterr().out
    if mode == "-o":
        assert out.read_bytes() == new and base.read_bytes() == old
    elif mode == "-o -":
        assert written == new and base.read_bytes() == old
    else:
        assert base.read_bytes() == new


def test_recover_on_a_read_only_file_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to roll back and no write access (a read-only file system): clean, not an
    error; with a journal pending, the refusal names what to do."""
    import errno

    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    real = jr.open_regular

    def read_only(path: object, flags: int = os.O_RDONLY) -> int:
        if flags & os.O_RDWR:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(path, flags)  # type: ignore[arg-type]

    monkeypatch.setattr(jr, "open_regular", read_only)
    assert jr.recover(base).action == "clean"
    assert main(["recover", str(base)]) == 0
    _journal(base, old, new)
    with pytest.raises(JournalError, match="recover"):
        jr.recover(base)
    assert base.read_bytes() == old


def test_recover_that_cannot_look_for_a_journal_does_not_say_clean(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """No write access to BASE and no way to tell whether a journal is there (a directory
    that cannot be searched): an error, not 'clean'."""
    import errno

    base, _, _, _ = _files(tmp_path, size=8 * PAGE_SIZE)

    def no_access(path: object, flags: int = os.O_RDONLY) -> int:
        raise OSError(errno.EACCES, "Permission denied")

    real_lstat = os.lstat
    journal = jr.journal_path(base).name

    def lstat(path: object, *a: object, **k: object) -> os.stat_result:
        if str(path).endswith(journal):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_lstat(path, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(jr, "open_regular", no_access)
    monkeypatch.setattr(jr.os, "lstat", lstat)
    with pytest.raises(PermissionError):
        jr.recover(base)


@pytest.mark.parametrize("sizes", [(2**64 - 1, None), (None, 2**64 - 1), (1, 2), (2**40, 2**41)])
def test_a_journal_whose_sizes_do_not_fit_the_file_is_refused_and_kept(tmp_path: Path, sizes: tuple) -> None:
    """An interrupted apply leaves BASE between its old and new sizes; a sealed journal
    that says otherwise (crafted, or another file's) is not followed: its old size would
    be set by ftruncate (a file grown to any size, or a raw OverflowError)."""
    base, old, _, _ = _files(tmp_path, size=2 * PAGE_SIZE)
    jpath = _sealed_journal(base, b"", 0, *sizes)
    with pytest.raises(JournalError, match="does not describe this file"):
        jr.recover(base)
    assert base.read_bytes() == old and jpath.exists()
    assert main(["recover", str(base)]) == 2


def test_a_rollback_the_system_refuses_keeps_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An I/O error while rolling back (EFBIG, EIO, ...) is a JournalError naming the
    cause, and the journal is kept for the next try."""
    import errno

    base, old, new, _ = _files(tmp_path, size=8 * PAGE_SIZE)
    jpath = _journal(base, old, new, halfway=True)

    def refuse(fd: int, size: int) -> None:
        raise OSError(errno.EFBIG, "File too large")

    with monkeypatch.context() as mp:
        mp.setattr(jr.os, "ftruncate", refuse)
        with pytest.raises(JournalError, match=r"File too large\); the journal is kept"):
            jr.recover(base)
    assert jpath.exists()
    assert jr.recover(base).action == "rolled back" and base.read_bytes() == old


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_a_journal_path_that_is_no_file_is_refused_at_once(tmp_path: Path, kind: str) -> None:
    """A FIFO at the journal's path once blocked every command on BASE for ever (opened
    for reading under BASE's lock); a directory or symlink gave a raw OSError. Each is a
    JournalError now, and what is there is left alone."""
    import subprocess
    import sys

    base, old, _, _ = _files(tmp_path, size=2 * PAGE_SIZE)
    jpath = jr.journal_path(base)
    if kind == "fifo":
        os.mkfifo(jpath)
    elif kind == "directory":
        jpath.mkdir()
    else:
        jpath.symlink_to(tmp_path / "elsewhere")
        (tmp_path / "elsewhere").write_bytes(b"x")
    code = ("import sys; from cellmigrate import journal, JournalError\n"
            "try:\n    journal.recover(sys.argv[1])\nexcept JournalError as e:\n    print(e); sys.exit(3)\n")
    done = subprocess.run([sys.executable, "-c", code, str(base)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert {"fifo": "a FIFO", "directory": "a directory", "symlink": "a symlink"}[kind] in done.stdout
    assert base.read_bytes() == old and os.path.lexists(jpath)


def test_an_in_place_apply_in_a_directory_it_cannot_write_names_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """BASE is writable, its directory is not (the journal cannot be made there): the
    error blamed BASE ("cannot write 'base.bin': Permission denied"); it names the
    journal and the directory, and the way out. Nothing is changed."""
    import errno

    base, old, _, delta = _files(tmp_path)
    real_open = os.open

    def no_new_files(path: "os.PathLike[str] | str", flags: int, *args: int, **kw: int) -> int:
        if flags & os.O_CREAT and str(path).endswith(jr.SUFFIX):
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(jr.os, "open", no_new_files)
    assert main(["apply", str(base), str(delta)]) == 2
    err = capsys.readouterr().err
    assert "cannot create the undo journal" in err and str(tmp_path) in err and "-o OUT" in err
    assert base.read_bytes() == old and not jr.journal_path(base).exists()
