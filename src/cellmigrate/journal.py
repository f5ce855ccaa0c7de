"""Undo journal for in-place ``apply``: after a crash at any instant, BASE is old or new.

Writing a delta's pages into BASE takes many ``pwrite`` calls; a process killed among
them would leave a mix of old and new pages. The cure is SQLite's rollback journal:
before the first byte of BASE changes, the original bytes of every region about to be
written go to ``BASE.cmjournal`` beside it. As with SQLite's ``synchronous=FULL``, the
journal is written in two steps: a zero header and the body (the records), fsync; only
then the real header (sizes, the body's XXH3-128, the header's own digest), fsync, and
its directory. Then the pages are written, BASE is fsynced, and the journal is deleted
(the deletion, made durable by syncing the directory, is the commit point). A valid
header therefore proves that the whole body was durable before BASE was touched, even
across a power loss. So at any instant:

* no journal: BASE is old (nothing written yet) or new (committed);
* a complete journal (its header and body digests check): BASE may be anything between
  old and new, and writing the journal's bytes back (and restoring the old size) makes
  it old;
* a journal without a valid header (short, bad magic, header digest mismatch: the zero
  placeholder, or a header write cut by a power loss): the process died while writing
  it, before it touched BASE, so BASE is old and the journal is simply removed;
* a valid header over a body that does not match it (wrong length, digest mismatch):
  the journal was damaged after it was complete, BASE may be partly written, and
  nothing can make it old: :class:`JournalError`, the journal is kept and BASE is left
  as it is (restore it from a copy, or remove the journal by hand if it is known good).

Every command that opens a state file runs :func:`recover_if_pending` first (through
:class:`~cellmigrate.statefile.StateFile`), and ``cellmigrate recover BASE`` runs
:func:`recover`. ``apply`` holds an exclusive ``flock`` on BASE for the whole journaled
write, so nobody rolls back the journal of an apply that is still running.

Pages are written with ``os.pwrite``, never through a writable memory map: a write into
a map of a sparse file on a full disk is a SIGBUS, a ``pwrite`` is an ordinary
``ENOSPC``. Blocks are reserved (``posix_fallocate``) before the journal is written, and
a growing BASE is extended (under the journal) before any page is written.

Journal layout (little-endian; docs/CLI.md has the same table)::

    header, 96 bytes
      0  8  magic  b"CMJRNL\\r\\n"
      8  4  version (1)
     12  4  header size (96)
     16  8  old size of BASE (restored by a rollback)
     24  8  new size of BASE (the delta's state size)
     32  8  st_dev of BASE      (a journal is only ever rolled back into its own file)
     40  8  st_ino of BASE
     48  8  record count
     56  8  body length in bytes
     64 16  XXH3-128 of the body
     80 16  XXH3-128 of header bytes 0..79
    body: record count times
      offset u64, length u32, reserved u32 (0), then `length` original bytes
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import signal
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import xxhash

from .errors import JournalError, TruncatedInputError
from .statefile import (
    StateFile,
    StrPath,
    file_kind,
    fsync_dir,
    identity,
    lock_file,
    open_regular,
    plural,
    reserve,
    hook_delay,
    hook_pause,
    write_all,
)

if TYPE_CHECKING:  # pragma: no cover - typing only
    from ._streaming import WindowedApply
    from .delta import DeltaSnapshot

__all__ = [
    "MAGIC",
    "VERSION",
    "SUFFIX",
    "HEADER_SIZE",
    "journal_path",
    "JournalInfo",
    "read_journal",
    "Recovery",
    "recover",
    "recover_if_pending",
    "ApplyReport",
    "apply_in_place",
    "apply_into",
    "verify_on",
    "check_base_size",
    "expected_base_size",
]

MAGIC = b"CMJRNL\r\n"
VERSION = 1
SUFFIX = ".cmjournal"
_FIELDS = struct.Struct("<8sIIQQQQQQ16s")
_HEADER_DIGEST = 16
HEADER_SIZE = _FIELDS.size + _HEADER_DIGEST  # 96
_RECORD = struct.Struct("<QII")
#: Longest region in one record (dirty pages are coalesced into runs up to this).
MAX_RUN = 1 << 20
_PAGE = 4096
_READ_CHUNK = 1 << 20


def journal_path(base: StrPath) -> Path:
    """``BASE.cmjournal`` beside the *resolved* BASE (a symlink's target owns it)."""
    real = Path(os.path.realpath(base))
    return real.with_name(real.name + SUFFIX)


# --------------------------------------------------------------------------------------
# reading and validating
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JournalInfo:
    """What a journal file says, and whether it is complete (``valid``).

    An invalid journal (``reason`` says why: short, bad magic, header digest mismatch)
    has no valid header: it was torn while being written, before BASE was touched. (The
    header is written and synced only after the body was: a journal whose header is
    valid but whose body is not is damaged, and :func:`read_journal` raises instead.)
    """

    path: Path
    valid: bool
    reason: str = ""
    old_size: int = 0
    new_size: int = 0
    dev: int = 0
    ino: int = 0
    records: int = 0
    body_length: int = 0


def read_journal(path: StrPath) -> Optional[JournalInfo]:
    """Parse and check a journal file; ``None`` when there is none.

    Reads the whole body once to check its digest. A journal without a valid header is
    torn (``valid`` False). A journal of an unknown version, or with a valid header over
    a body that does not match it (wrong length, digest mismatch: damaged after it was
    complete, so BASE may be partly written), raises :class:`JournalError` (it is never
    discarded as torn).
    """
    path = Path(path)
    try:
        fd = _open_journal(path)
    except FileNotFoundError:
        return None
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, HEADER_SIZE, 0)
        if len(head) < HEADER_SIZE:
            return JournalInfo(path, False, f"header incomplete ({len(head)} of {HEADER_SIZE} bytes)")
        magic, version, header_size, old_size, new_size, dev, ino, records, body_length, body_digest = (
            _FIELDS.unpack_from(head)
        )
        if magic != MAGIC:
            return JournalInfo(path, False, "no journal header (bad magic)")
        if xxhash.xxh3_128_digest(head[: _FIELDS.size]) != head[_FIELDS.size:]:
            return JournalInfo(path, False, "header digest mismatch")
        if version != VERSION or header_size != HEADER_SIZE:
            raise JournalError(
                f"{str(path)!r} is a version {version} journal; this cellmigrate reads version {VERSION}: "
                "recover it with the cellmigrate that wrote it"
            )
        # The header is only written once the body is durable (see _write_journal): past
        # this point the journal was complete, and a body that does not match it is damage.
        if size != HEADER_SIZE + body_length:
            raise _damaged(path, f"its body has {size - HEADER_SIZE} bytes, its header says {body_length}")
        hasher = xxhash.xxh3_128()
        pos = HEADER_SIZE
        while pos < size:
            block = os.pread(fd, min(_READ_CHUNK, size - pos), pos)
            if not block:
                raise _damaged(path, f"its body shrank to {pos - HEADER_SIZE} bytes while read")
            hasher.update(block)
            pos += len(block)
        if hasher.digest() != body_digest:
            raise _damaged(path, "its body does not match the header's digest")
        return JournalInfo(path, True, "", old_size, new_size, dev, ino, records, body_length)
    finally:
        os.close(fd)


def _damaged(path: Path, what: str) -> JournalError:
    """A journal with a valid header and a body that does not match it (kept, never
    followed nor discarded): BASE may be partly written."""
    name = path.name
    base = path.with_name(name[: -len(SUFFIX)]) if name.endswith(SUFFIX) and len(name) > len(SUFFIX) else path
    return JournalError(
        f"{str(path)!r} is damaged ({what}): {str(base)!r} may be partly written by an interrupted apply "
        "and cannot be rolled back from it; the journal is kept and the file left as it is. Restore the file "
        "from a copy, or remove the journal by hand if the file is known good"
    )


def _open_journal(path: Path) -> int:
    """The journal opened for reading: a regular file, not followed through a symlink,
    never waited on (a FIFO put there would block every later command on BASE while it
    holds BASE's lock); anything else is a :class:`JournalError`."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except OSError as exc:
        kind = "a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
        raise JournalError(f"{str(path)!r} cannot be read as a journal ({kind}): remove it by hand if no "
                           "apply of this file was interrupted") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise JournalError(f"{str(path)!r} is {file_kind(mode)}, not a journal: remove it by hand if no apply "
                           "of this file was interrupted")
    return fd


def _record_heads(fd: int, info: JournalInfo) -> Iterator[Tuple[int, int, int]]:
    """``(offset in BASE, length, position in the journal)`` of each record of a checked
    journal, each checked (JournalError); the walk ends checking that the records fill
    the body exactly."""
    pos, end = HEADER_SIZE, HEADER_SIZE + info.body_length
    for _ in range(info.records):
        head = os.pread(fd, _RECORD.size, pos)
        if len(head) != _RECORD.size:
            raise JournalError(f"{str(info.path)!r}: record table ends early")
        offset, length, _reserved = _RECORD.unpack(head)
        pos += _RECORD.size
        if pos + length > end or offset + length > info.old_size:
            raise JournalError(f"{str(info.path)!r}: record at {offset} (+{length}) is out of bounds")
        yield offset, length, pos
        pos += length
    if pos != end:
        raise JournalError(f"{str(info.path)!r}: {end - pos} bytes after the last record")


def _records(fd: int, info: JournalInfo) -> Iterator[Tuple[int, bytes]]:
    """``(offset, original bytes)`` of each record of a checked journal. The whole record
    table is walked and checked first (headers only: a journal of millions of scattered
    pages costs no memory), then walked again to read: a table found bad half-way
    refuses the rollback before it has written a byte."""
    for _ in _record_heads(fd, info):
        pass
    for offset, length, pos in _record_heads(fd, info):
        data = os.pread(fd, length, pos)
        if len(data) != length:
            raise JournalError(f"{str(info.path)!r}: record data ends early")
        yield offset, data


# --------------------------------------------------------------------------------------
# recovery
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recovery:
    """What :func:`recover` did: ``action`` is ``"clean"``, ``"rolled back"`` or ``"discarded"``."""

    base: Path
    action: str
    journal: Path
    bytes_restored: int = 0
    records: int = 0
    old_size: int = 0
    new_size: int = 0
    reason: str = ""

    def describe(self) -> str:
        """One line for the user."""
        if self.action == "clean":
            return f"{self.base}: clean (no pending journal)"
        if self.action == "discarded":
            return (f"{self.base}: removed an incomplete journal {self.journal.name} ({self.reason}); "
                    "the interrupted apply had not modified the file")
        return (f"{self.base}: rolled back an interrupted apply from {self.journal.name}: restored "
                f"{plural(self.bytes_restored, 'byte')} in {plural(self.records, 'region')}, size {self.old_size} bytes; "
                "the file is the state it was before that apply")


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM/SIGHUP until the block ends (a rollback is not interrupted).

    Only Python-level handlers can be swapped, and only in the main thread; the first
    signal that arrived is re-delivered when the block ends.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: List[int] = []

    def hold(signum: int, frame: Optional[FrameType]) -> None:
        pending.append(signum)

    saved = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        old = signal.getsignal(signum)
        if old not in (signal.SIG_IGN, None):
            saved[signum] = signal.signal(signum, hold)
    try:
        yield
    finally:
        for signum, old in saved.items():
            signal.signal(signum, old)
        if pending:
            signal.raise_signal(pending[0])


def _remove_journal(jpath: Path) -> None:
    os.unlink(jpath)
    fsync_dir(jpath.parent)


def _rollback(fd: int, info: JournalInfo) -> int:
    """Write the journal's original bytes back into BASE, restore its size, fsync."""
    restored = 0
    jfd = _open_journal(info.path)
    try:
        for offset, data in _records(jfd, info):
            write_all(fd, data, offset)
            restored += len(data)
    finally:
        os.close(jfd)
    os.ftruncate(fd, info.old_size)
    os.fsync(fd)
    return restored


def _recover_locked(fd: int, base: Path, jpath: Path) -> Recovery:
    """Act on ``jpath`` for BASE open (read-write, exclusively locked) as ``fd``."""
    info = read_journal(jpath)
    if info is None:
        return Recovery(base, "clean", jpath)
    with _signals_deferred():
        if not info.valid:
            _remove_journal(jpath)
            return Recovery(base, "discarded", jpath, reason=info.reason)
        st = os.fstat(fd)
        if (info.dev, info.ino) != identity(st):
            raise JournalError(
                f"{str(jpath)!r} was written for another file than {str(base)!r} (device/inode differ: the file "
                "was replaced since); it cannot be rolled back into this one. Remove the journal by hand "
                "if this file is right"
            )
        # An interrupted apply leaves BASE between its old and new sizes: a journal that
        # says otherwise does not describe this file, and is not followed (its old size
        # would be set by ftruncate: a file grown to any size, or an OverflowError).
        low, high = sorted((info.old_size, info.new_size))
        if high >= 2**63 or not low <= st.st_size <= high:
            raise JournalError(
                f"{str(jpath)!r} records an apply from {info.old_size} to {info.new_size} bytes, but "
                f"{str(base)!r} has {st.st_size}: it does not describe this file. Remove the journal by hand "
                "if this file is right"
            )
        try:
            restored = _rollback(fd, info)
        except OSError as exc:
            if isinstance(exc, PermissionError):
                raise  # recover() names who can
            raise JournalError(
                f"cannot roll {str(base)!r} back from {str(jpath)!r} ({exc.strerror or exc}); the journal is kept: "
                "run 'cellmigrate recover' again once the cause is gone"
            ) from None
        _remove_journal(jpath)
    return Recovery(base, "rolled back", jpath, restored, info.records, info.old_size, info.new_size)


def _cannot_write(base: StrPath, jpath: Path, exc: OSError) -> JournalError:
    return JournalError(
        f"{os.fspath(base)!r} has a pending journal from an interrupted apply ({jpath.name}) and this process "
        f"cannot roll it back ({exc.strerror or exc}): run 'cellmigrate recover {os.fspath(base)}' as a user "
        "who can write the file and its directory"
    )


def _open_for_writing(base: StrPath, path: Path, jpath: Path, *, nothing_to_recover_ok: bool = True) -> int:
    """Open BASE read-write; with a pending journal, a refusal names ``cellmigrate recover``.
    Without one, a refusal raises :class:`_NothingToRecover` when ``nothing_to_recover_ok``
    (the file is clean as it is), else itself."""
    try:
        return open_regular(path, os.O_RDWR)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            try:
                os.lstat(jpath)
            except FileNotFoundError:  # looked, and there is none (not "could not look")
                if nothing_to_recover_ok:
                    raise _NothingToRecover() from None
                raise exc from None
            except OSError:
                raise exc from None
            raise _cannot_write(base, jpath, exc) from None
        raise


class _NothingToRecover(Exception):
    """BASE cannot be opened for writing and has no journal: it is clean as it is."""


def recover(base: StrPath) -> Recovery:
    """Roll back or discard BASE's pending journal; report ``"clean"`` when there is none.

    Takes BASE's exclusive lock (raises :class:`JournalError` while another cellmigrate
    process holds it). Raises :class:`JournalError` when the journal cannot be applied
    (other file, unknown version, damaged body under a valid header, no permission); the
    journal is then kept and BASE left as it is.
    """
    path = Path(os.path.realpath(base))
    jpath = journal_path(path)
    try:
        fd = _open_for_writing(base, path, jpath)
    except _NothingToRecover:  # read-only (a read-only file system, say), and no journal
        return Recovery(path, "clean", jpath)
    try:
        lock_file(fd, exclusive=True, what=base)
        try:
            return _recover_locked(fd, path, jpath)
        except PermissionError as exc:
            raise _cannot_write(base, jpath, exc) from None
    finally:
        os.close(fd)


def recover_if_pending(base: StrPath) -> Optional[Recovery]:
    """:func:`recover` when BASE has a journal beside it, else ``None`` (one ``lstat``)."""
    if not os.path.lexists(journal_path(base)):
        return None
    return recover(base)


# --------------------------------------------------------------------------------------
# the journaled in-place apply
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ApplyReport:
    """What :func:`apply_in_place` did."""

    pages_written: int
    bytes_journaled: int
    old_size: int
    new_size: int
    recovered: Optional[Recovery]


def _runs(indices: Sequence[int], limit: int) -> List[Tuple[int, int]]:
    """Coalesce sorted page indices into ``(offset, length)`` runs clipped to ``limit``."""
    runs: List[Tuple[int, int]] = []
    for index in indices:
        start = index * _PAGE
        if index < 0 or start >= limit:
            continue
        end = min(start + _PAGE, limit)
        if runs and runs[-1][0] + runs[-1][1] == start and runs[-1][1] + (end - start) <= MAX_RUN:
            runs[-1] = (runs[-1][0], runs[-1][1] + end - start)
        else:
            runs.append((start, end - start))
    return runs


def _run_arrays(indices: Any, limit: int) -> Tuple[Any, Any]:
    """:func:`_runs` as two int64 arrays (offsets, lengths), without a Python object per
    page or run: the same runs (consecutive pages, at most :data:`MAX_RUN` bytes each)."""
    import numpy as np

    idx = np.unique(np.asarray(indices, dtype=np.int64))
    idx = idx[(idx >= 0) & (idx < -(-limit // _PAGE))]
    if not len(idx):
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    group = np.concatenate(([0], np.flatnonzero(np.diff(idx) != 1) + 1))
    sizes = np.diff(np.concatenate((group, [len(idx)])))
    position = np.arange(len(idx)) - np.repeat(group, sizes)
    starts = np.flatnonzero(position % (MAX_RUN // _PAGE) == 0)
    ends = np.concatenate((starts[1:], [len(idx)]))
    offsets = idx[starts] * _PAGE
    return offsets, np.minimum((idx[ends - 1] + 1) * _PAGE, limit) - offsets


def _pairs(offsets: Any, lengths: Any) -> Iterator[Tuple[int, int]]:
    """``(offset, length)`` of run arrays, one at a time."""
    for k in range(len(offsets)):
        yield int(offsets[k]), int(lengths[k])


def _write_journal(jpath: Path, fd: int, runs: Iterable[Tuple[int, int]], old_size: int, new_size: int) -> int:
    """Write and fsync the journal of ``runs`` (their bytes read from BASE now).

    Two steps, as SQLite's rollback journal with ``synchronous=FULL``: a zero header and
    the body, fsync; then the real header, fsync. A valid header thus proves the body was
    durable (a power loss may otherwise keep the header and lose part of the body), so
    :func:`read_journal` treats a valid header over a bad body as damage, not a tear.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    try:
        jfd = os.open(jpath, flags, 0o600)
    except FileExistsError:
        raise JournalError(
            f"{str(jpath)!r} appeared while applying (another process?): run 'cellmigrate recover'"
        ) from None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        # BASE itself may be writable: it is its directory that is not (say so).
        raise JournalError(
            f"cannot create the undo journal {str(jpath)!r} ({exc.strerror}): an in-place apply needs to write "
            f"in {str(jpath.parent)!r}; write the result elsewhere with -o OUT"
        ) from None
    try:
        write_all(jfd, bytes(HEADER_SIZE), 0)  # zeros: a journal torn in its body has no valid header
        hasher = xxhash.xxh3_128()
        pos, count, saved = HEADER_SIZE, 0, 0
        for offset, length in runs:
            length = min(length, old_size - offset)
            if length <= 0:
                continue
            data = os.pread(fd, length, offset)
            if len(data) != length:
                raise TruncatedInputError("BASE was truncated by another process while it was journaled")
            record = _RECORD.pack(offset, length, 0) + data
            hasher.update(record)
            write_all(jfd, record, pos)
            pos += len(record)
            count += 1
            saved += length
            hook_delay()
        os.fsync(jfd)  # the body is durable before the header that vouches for it is written
        hook_pause("journal body synced")
        st = os.fstat(fd)
        fields = _FIELDS.pack(MAGIC, VERSION, HEADER_SIZE, old_size, new_size, st.st_dev, st.st_ino,
                              count, pos - HEADER_SIZE, hasher.digest())
        write_all(jfd, fields + xxhash.xxh3_128_digest(fields), 0)
        os.fsync(jfd)
    except BaseException:
        os.close(jfd)
        with contextlib.suppress(OSError):
            os.unlink(jpath)
        raise
    os.close(jfd)
    fsync_dir(jpath.parent)
    return saved


def _undo(fd: int, jpath: Path) -> None:
    """Roll back our own journal after a failure or signal in the write window (a
    damaged one raises :class:`JournalError` from :func:`read_journal` and is kept)."""
    with _signals_deferred():
        info = read_journal(jpath)
        if info is not None and info.valid:
            _rollback(fd, info)
        _remove_journal(jpath)


def expected_base_size(delta: "DeltaSnapshot") -> int:
    """The size a base must have for ``delta``: ``base_size``, else ``total_size``."""
    base_size = getattr(delta, "base_size", None)
    return int(delta.total_size) if base_size is None else int(base_size)


def check_base_size(size: int, delta: "DeltaSnapshot") -> None:
    """The library's rule for a base's size (shorter: zero-extended; longer: refused).

    Raises :class:`~cellmigrate.errors.InvalidStateError` in ``DeltaSnapshot.apply``'s
    words for a base longer than the delta's base.
    """
    from .errors import InvalidStateError

    expected = expected_base_size(delta)
    if size > expected:
        what = "state" if expected == int(delta.total_size) else "base"
        raise InvalidStateError(
            f"Base state is larger than the delta's {what}: base has {size} bytes, delta expects {expected}"
        )


def _tail_runs(start: int, end: int) -> List[Tuple[int, int]]:
    """``[start, end)`` in journal-record-sized runs (the part a shrinking delta cuts)."""
    return [(pos, min(MAX_RUN, end - pos)) for pos in range(start, end, MAX_RUN)]


def apply_in_place(
    base: StrPath,
    delta: "DeltaSnapshot",
    *,
    key: Optional[bytes] = None,
    progress: Optional[Callable[..., Any]] = None,
) -> ApplyReport:
    """Apply ``delta`` to the file BASE in place, crash-safely (see the module doc).

    The delta is verified in full (page table, checksum, digest or MAC) on a read-only
    map of BASE, one window of the state at a time (``cellmigrate._streaming``: memory
    bounded whatever the delta's size), before anything is written; the windows are then
    decoded again and written, each checked to be what was verified. A refused delta raises
    :class:`~cellmigrate.errors.InvalidStateError` and leaves BASE byte for byte
    unchanged. A BASE shorter than the delta's state is grown with zeros (the library's
    rule); as growing must happen before the result can be checked, it is done under the
    journal and undone when the delta is refused. A delta that shrinks the state cuts
    BASE to ``total_size`` (the cut bytes are journaled too). A pending journal is rolled
    back first (``recovered``). A full disk raises ``OSError(ENOSPC)`` with BASE
    unchanged; a signal that raises (SIGINT, or SIGTERM/SIGHUP under
    :func:`~cellmigrate.statefile.signals_raise`) rolls back before propagating.
    """
    path = Path(os.path.realpath(base))
    jpath = journal_path(path)
    fd = _open_for_writing(base, path, jpath, nothing_to_recover_ok=False)
    try:
        lock_file(fd, exclusive=True, what=base)
        recovered = _recover_locked(fd, path, jpath) if os.path.lexists(jpath) else None
        old_size = os.fstat(fd).st_size
        check_base_size(old_size, delta)
        total = int(delta.total_size)
        plan = _windowed(delta)
        report = _reporter(progress, delta)
        offsets, lengths = _run_arrays(plan.indices, min(old_size, total))
        if old_size >= total:
            # Verify first (a refused delta never touches BASE, not even its mtime), then
            # reserve, journal and write (and cut, for a shrinking delta).
            with StateFile(path, fd=os.dup(fd), length=total) as result, _view(result) as view:
                hook_pause("mapped")
                _verify(result, plan, view, key, report)
                _reserve_runs(fd, _pairs(offsets, lengths))
                runs = itertools.chain(_pairs(offsets, lengths), _tail_runs(total, old_size))
                saved = _write_journal(jpath, fd, runs, old_size, total)
                _write_window(fd, jpath, plan, view, total)
            if report is not None:
                report(total, total)
        else:
            _reserve_runs(fd, _pairs(offsets, lengths))
            saved = _write_journal(jpath, fd, _pairs(offsets, lengths), old_size, total)
            try:
                reserve(fd, old_size, total - old_size)  # grows BASE (journaled: undone on failure)
                apply_into(fd, delta, key=key, progress=report, name=path)
                os.fsync(fd)
            except BaseException:
                _undo(fd, jpath)
                raise
            with _signals_deferred():
                _remove_journal(jpath)
        return ApplyReport(len(plan.indices), saved, old_size, total, recovered)
    finally:
        os.close(fd)


def verify_on(
    result: StateFile,
    delta: "DeltaSnapshot",
    *,
    key: Optional[bytes] = None,
    progress: Optional[Callable[..., Any]] = None,
) -> None:
    """``delta.apply`` on a private map, then check the file under it did not change.

    A file truncated or written while it was read explains any refusal of the delta (a
    truncated map reads zeros), so :class:`TruncatedInputError` or
    :class:`StateChangedError` is raised instead, the refusal chained to it.
    """
    try:
        # The file was resized to total_size first (a resizing delta: see DeltaSnapshot.apply).
        delta.apply(result.buffer, key=key, progress=progress, resized=result.size == int(delta.total_size))
    except Exception:
        result.check()
        raise
    result.check()


def apply_into(
    fd: int,
    delta: "DeltaSnapshot",
    *,
    key: Optional[bytes] = None,
    progress: Optional[Callable[..., Any]] = None,
    name: StrPath = "output",
) -> int:
    """Apply ``delta`` to the file open as ``fd`` (read-write, already ``total_size`` long).

    For a fresh copy of BASE (``apply -o``, ``--safe-replace``): the delta is verified on
    a read-only map of the file window by window, then its pages are written with
    ``pwrite`` (:func:`apply_in_place`'s two passes). No journal:
    the caller renames the file into place only when this returned. For a resizing delta
    the caller copied BASE zero-extended or cut to ``total_size`` (after
    :func:`check_base_size`). Returns the number of pages written.
    Raises like :func:`apply_in_place`.
    """
    plan = _windowed(delta)
    report = _reporter(progress, delta)
    with StateFile(name, fd=os.dup(fd)) as result, _view(result) as view:
        _verify(result, plan, view, key, report)
        written = plan.write_into(fd, view, write=_write_at)
    if report is not None:
        report(int(delta.total_size), int(delta.total_size))
    return written


def _windowed(delta: "DeltaSnapshot") -> "WindowedApply":
    from ._streaming import WindowedApply

    return WindowedApply(delta)


def _view(result: StateFile) -> memoryview:
    """A byte view of the map (a context manager: released before the map is closed)."""
    return memoryview(result.buffer)


def _reporter(progress: Optional[Callable[..., Any]], delta: "DeltaSnapshot") -> Optional[Callable[[int, int], None]]:
    """``progress`` as a ``(done, total)`` reporter (RESTORING events for an event callback)."""
    from ._passes import byte_reporter
    from .progress import ProgressEventKind

    return byte_reporter(progress, bytes(delta.agent_id), ProgressEventKind.RESTORING)


def _verify(
    result: StateFile, plan: "WindowedApply", view: memoryview, key: Optional[bytes],
    report: Optional[Callable[[int, int], None]],
) -> None:
    """``plan.verify`` on the map of BASE (or of its copy); a file truncated or written while
    it was read explains any refusal of the delta, so that is raised instead (the refusal
    chained to it), as :func:`verify_on` does."""
    from ._passes import before_end
    from .checksum import check_key

    try:
        plan.verify(view, check_key(key), before_end(report))
    except Exception:
        result.check()
        raise
    result.check()


def _write_at(fd: int, data: memoryview, offset: int) -> None:
    write_all(fd, data, offset)  # looked up at each call (tests replace it)


def _reserve_runs(fd: int, runs: Iterable[Tuple[int, int]]) -> None:
    """Allocate the blocks of every run (holes of a sparse BASE) before the journal.

    Content is unchanged, so a full disk here needs no rollback: ENOSPC is raised with
    BASE as it was and no journal written.
    """
    for offset, length in runs:
        reserve(fd, offset, length)


def _write_window(fd: int, jpath: Path, plan: "WindowedApply", view: memoryview, total: int) -> None:
    """Pages, cut to ``total``, fsync, journal removal; a failure or signal rolls back."""
    try:
        plan.write_into(fd, view, write=_write_at)
        if os.fstat(fd).st_size > total:
            os.ftruncate(fd, total)  # a shrinking delta (the cut bytes are in the journal)
        os.fsync(fd)
    except BaseException:
        _undo(fd, jpath)
        raise
    with _signals_deferred():
        _remove_journal(jpath)
