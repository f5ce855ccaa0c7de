"""State files on disk: safe opening, mapping, atomic and streamed output, temp files.

The CLI never loads a state file whole. :class:`StateFile` maps it with :mod:`mmap`, so a
4 GiB state costs address space, not RAM: the kernels read the mapping in place and the
OS pages it in and out as needed. What the raw ``mmap`` module leaves to callers is
handled here:

* **File types.** The path is checked with ``os.stat`` *before* any open, and opened
  ``O_NONBLOCK`` (then checked again with ``fstat``): a FIFO, device, socket or directory
  is refused with a clear message instead of hanging in ``open`` or ``read``.
* **Truncation under the map.** Another process may truncate the file while we read it;
  touching a mapped page past the new end raises SIGBUS. Every map is registered with the
  compiled guard (``cython/cm_guard.h``): such a page reads as zeros, the fault is counted,
  and :meth:`StateFile.check` raises :class:`~cellmigrate.errors.TruncatedInputError`.
* **Changes while read.** :meth:`StateFile.check` also compares size, ``mtime_ns`` and
  ``ctime_ns`` with the values at open and raises
  :class:`~cellmigrate.errors.StateChangedError` when another writer touched the file.
* **Pending undo journals.** Opening a file that an interrupted in-place ``apply`` left
  with a journal rolls the journal back first (or refuses, naming ``cellmigrate
  recover``, when this process cannot write it): see :mod:`cellmigrate.journal`.
* An empty file cannot be mapped (``mmap`` refuses length 0); it is an empty
  ``bytes``/``bytearray``, which every kernel accepts. Closing a map while a
  ``memoryview`` of it is alive raises ``BufferError``; we then let the garbage collector
  unmap it instead of masking the real error.

Output goes through :func:`open_output`: a regular file (a symlink is resolved, so the
link stays and its target is replaced) is written to an unnamed temporary file
(``O_TMPFILE``) in the target's directory, fsynced, linked in and renamed over the target,
so the target is either untouched or complete and a killed process leaves nothing behind.
Where ``O_TMPFILE`` is not supported, the temporary file gets a name of its own
(``.NAME.cellmigrate-PID-TOKEN.tmp``, TOKEN random per file, held under ``flock`` while it
is written) that the next run on the same target removes once no process holds it. A
FIFO, character device or ``-`` (stdout) is written through as a stream, never
replaced. Inputs are never overwritten (same device and inode) and an existing output
only with ``force``.

>>> parse_size("256MiB")
268435456
>>> parse_size("1GiB"), parse_size("4096"), parse_size("1.5KiB")
(1073741824, 4096, 1536)
>>> format_size(268435456)
'256 MiB'
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import mmap
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Type, Union

from .errors import JournalError, StateChangedError, TruncatedInputError

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .journal import Recovery

__all__ = [
    "StrPath",
    "StateFile",
    "Output",
    "SignalInterrupt",
    "parse_size",
    "format_size",
    "plural",
    "atomic_replace",
    "copy_to_temp",
    "write_bytes_atomic",
    "open_output",
    "open_input_stream",
    "spool_stream",
    "file_kind",
    "changed_while_read",
    "fsync_dir",
    "reserve",
    "copy_range",
    "lock_file",
    "signals_raise",
    "remove_stale_temps",
    "temp_name",
    "take_over",
    "STREAM",
]

StrPath = Union[str, "os.PathLike[str]"]

#: The path that names stdin (for inputs) or stdout (for outputs).
STREAM = "-"

# Binary units (KiB, MiB, ...) are powers of 1024; the bare letters K/M/G/T follow them,
# as ``dd`` and ``numfmt --from=iec`` do. The SI spellings kB/MB/GB/TB are powers of 1000
# so that a user who writes "1GB" gets what the SI prefix says.
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "ki": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mi": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gi": 1 << 30,
    "gib": 1 << 30,
    "t": 1 << 40,
    "ti": 1 << 40,
    "tib": 1 << 40,
    "p": 1 << 50,
    "pi": 1 << 50,
    "pib": 1 << 50,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    # What format_size prints below 1 KiB ("1 byte", "512 bytes").
    "byte": 1,
    "bytes": 1,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a byte count: plain bytes (``"4096"``) or with a unit (``"256MiB"``, ``"1GiB"``).

    Units are case-insensitive: ``KiB MiB GiB TiB PiB`` (and ``K M G T P``) are binary, ``kB
    MB GB TB PB`` are decimal, ``B`` (``byte``, ``bytes``) is bytes: every text
    :func:`format_size` prints parses back. A fraction is accepted when it names a whole
    number of bytes (``"1.5KiB"`` is 1536), or has one decimal (the precision
    :func:`format_size` prints): rounded to the nearest byte, so ``"1.1 KiB"`` is 1126.
    Anything else raises :class:`ValueError` with the reason.

    >>> parse_size("64 mib")
    67108864
    >>> parse_size("2GB")
    2000000000
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size {text!r}: expected bytes or a number with a unit, e.g. 256MiB, 1GiB, 4096")
    number, unit = match.group(1), match.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(
            f"invalid size {text!r}: unknown unit {match.group(2)!r} (use B, KiB, MiB, GiB, TiB, PiB, kB, MB, GB, TB, PB)"
        )
    multiplier = _UNITS[unit]
    # Exact rational arithmetic: "0.1GiB" must not pick up float rounding.
    if "." in number:
        whole, _, frac = number.partition(".")
        scale = 10 ** len(frac)
        numerator = int(whole or "0") * scale + int(frac or "0")
        total = numerator * multiplier
        value: int = total // scale
        if total % scale:
            if len(frac) != 1 or multiplier == 1:
                raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
            value = (2 * total + scale) // (2 * scale)  # format_size's one decimal: nearest byte
        return value
    return int(number) * multiplier


def format_size(n: int) -> str:
    """Human-readable binary size: ``'512 bytes'``, ``'4 KiB'``, ``'1.5 GiB'``.

    >>> format_size(0), format_size(1536), format_size(3 * 2**30)
    ('0 bytes', '1.5 KiB', '3 GiB')
    """
    if n < 1024:
        return f"{n} byte" if n == 1 else f"{n} bytes"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024.0
        if value < 1024.0 or unit == "PiB":
            break
    text = f"{value:.1f}"
    if text.endswith(".0"):
        text = text[:-2]
    return f"{text} {unit}"


def plural(n: int, noun: str, nouns: Optional[str] = None) -> str:
    """``n`` and the noun agreeing with it, for result lines: ``'1 round'``, ``'3 rounds'``,
    ``'0 entries'`` (``nouns``: the plural, when it is not ``noun + 's'``).

    >>> plural(1, "chunk"), plural(2, "chunk"), plural(0, "entry", "entries")
    ('1 chunk', '2 chunks', '0 entries')
    """
    return f"{n} {noun if n == 1 else (nouns or noun + 's')}"


# --------------------------------------------------------------------------------------
# test hooks
# --------------------------------------------------------------------------------------

#: Crash tests set this (seconds, a float) to widen the write windows so that a SIGKILL
#: sent at a random moment lands inside them: every journal record, page run and copy
#: chunk is followed by a sleep of that length. Unset (the default), it costs one lookup.
TEST_IO_DELAY_ENV = "CELLMIGRATE_TEST_IO_DELAY"
#: Crash tests set this to a file name: ``hook_pause(point)`` appends ``point`` and a
#: newline to it, then sleeps ``CELLMIGRATE_TEST_PAUSE_SECONDS`` (a truncating or writing
#: child process can then act at a known moment of the read).
TEST_PAUSE_ENV = "CELLMIGRATE_TEST_PAUSE_FILE"


#: Tests set this to exercise the named-temporary-file path used where ``O_TMPFILE`` is
#: not supported.
TEST_NO_TMPFILE_ENV = "CELLMIGRATE_TEST_NO_O_TMPFILE"


def hook_delay() -> None:
    """Sleep ``$CELLMIGRATE_TEST_IO_DELAY`` seconds (crash tests only; no-op when unset)."""
    value = os.environ.get(TEST_IO_DELAY_ENV)
    if value:
        time.sleep(float(value))


def hook_pause(point: str) -> None:
    """Announce ``point`` in ``$CELLMIGRATE_TEST_PAUSE_FILE`` and sleep (tests only)."""
    flag = os.environ.get(TEST_PAUSE_ENV)
    if not flag:
        return
    with open(flag, "a", encoding="utf-8") as fh:
        fh.write(point + "\n")
    time.sleep(float(os.environ.get("CELLMIGRATE_TEST_PAUSE_SECONDS", "0.5")))


# --------------------------------------------------------------------------------------
# file types, identities, locks, durability
# --------------------------------------------------------------------------------------


def file_kind(mode: int) -> str:
    """What ``st_mode`` is, in words: ``'a regular file'``, ``'a FIFO'``, ...

    >>> file_kind(stat.S_IFIFO), file_kind(stat.S_IFCHR | 0o666)
    ('a FIFO', 'a character device')
    """
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def _not_regular(mode: int) -> OSError:
    return OSError(errno.EINVAL, f"is {file_kind(mode)}, not a regular file (state files must be regular files)")


def open_regular(path: StrPath, flags: int = os.O_RDONLY) -> int:
    """Open a path that must be a regular file, without ever blocking; return the fd.

    The type is checked with ``os.stat`` first (a FIFO or device is refused before any
    open), and the open itself is non-blocking, so a path swapped for a FIFO in between
    cannot hang us either; ``fstat`` on the descriptor is what finally counts. Raises
    ``OSError`` (``strerror`` says what the path is instead).
    """
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode)
    fd = os.open(path, flags | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def identity(st: os.stat_result) -> Tuple[int, int]:
    """``(st_dev, st_ino)``: two paths name the same file when these are equal."""
    return (st.st_dev, st.st_ino)


def _signature(st: os.stat_result) -> Tuple[int, int, int, int, int]:
    """What a writer changes: size, modification and change times (ns), and identity."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_dev, st.st_ino)


#: How long a command waits for another cellmigrate process's lock on a state file.
LOCK_WAIT = float(os.environ.get("CELLMIGRATE_LOCK_WAIT", "2"))


def lock_file(fd: int, *, exclusive: bool, what: StrPath, wait: Optional[float] = None) -> None:
    """Take a shared (readers) or exclusive (apply, recover) ``flock`` on ``fd``.

    cellmigrate processes use these locks to stay out of each other's way: ``apply``
    holds the exclusive lock on BASE for the whole journaled write, so a reader never
    rolls back the journal of a live apply, and readers hold shared locks while they
    read. The lock dies with the process (a SIGKILL releases it). Polls for ``wait``
    seconds (default :data:`LOCK_WAIT`), then raises :class:`JournalError`. File systems
    without ``flock`` are used unlocked.
    """
    op = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
    deadline = time.monotonic() + (LOCK_WAIT if wait is None else wait)
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                doing = "in use by" if exclusive else "being updated by"
                raise JournalError(
                    f"{os.fspath(what)!r} is {doing} another cellmigrate process; try again when it has finished"
                ) from None
            time.sleep(0.02)
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                return
            raise


#: What a file system answers when it cannot sync a directory at all (some network and
#: FUSE file systems): nothing more can be done there, so it is not an error.
_DIR_SYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF})


def fsync_dir(directory: StrPath) -> None:
    """Make a create, rename or unlink durable by syncing its directory.

    The undo journal's safety rests on this (the journal's directory entry must be on disk
    before the first page write), so a real failure (``EIO``, ``ENOSPC``, a directory that
    cannot be opened) raises ``OSError``; only a file system that does not support
    directory sync at all (``EINVAL``/``ENOTSUP``) is let through.
    """
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_SYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


_fsync_dir = fsync_dir  # the old private name


def reserve(fd: int, offset: int, length: int) -> None:
    """Allocate disk blocks for ``[offset, offset + length)`` before writing there.

    ``posix_fallocate`` turns a full disk into an ordinary ``OSError(ENOSPC)`` *before*
    any byte changes (content is never altered; a range past the end extends the file
    with zeros). File systems that cannot preallocate are left to report ENOSPC on the
    write itself, which is still an ordinary error since nothing is written through a
    memory map.
    """
    if length <= 0:
        return
    try:
        os.posix_fallocate(fd, offset, length)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        if offset + length > os.fstat(fd).st_size:
            os.ftruncate(fd, offset + length)


def write_all(fd: int, data: Union[bytes, bytearray, memoryview], offset: Optional[int] = None) -> None:
    """Write every byte of ``data`` (``os.write`` / ``os.pwrite`` may write less)."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    done = 0
    while done < view.nbytes:
        if offset is None:
            n = os.write(fd, view[done:])
        else:
            n = os.pwrite(fd, view[done:], offset + done)
        if n <= 0:  # pragma: no cover - write(2) reports errors, not 0
            raise OSError(errno.EIO, "short write")
        done += n


#: Bytes copied between two progress reports (and test delays) in the copy helpers.
COPY_CHUNK = 64 << 20
#: Bytes read into memory per step where the kernel cannot copy (``copy_file_range``).
_PREAD_CHUNK = 4 << 20


def copy_range(
    src_fd: int, dst_fd: int, length: int, *, what: StrPath = "input",
    on_chunk: Optional[Callable[[int], object]] = None, chunk: Optional[int] = None,
    src_offset: int = 0, dst_offset: int = 0,
) -> None:
    """Copy the first ``length`` bytes of ``src_fd`` to the start of ``dst_fd`` (or the
    ``length`` bytes at ``src_offset`` to ``dst_offset``).

    In the kernel (``copy_file_range``, which can share extents on copy-on-write file
    systems) where it exists, else by ``pread``/``pwrite``. A source shorter than
    ``length`` (truncated by another process) raises :class:`TruncatedInputError`.
    """
    kernel_copy = hasattr(os, "copy_file_range")
    chunk = chunk or COPY_CHUNK
    pos = 0
    while pos < length:
        want = min(chunk, length - pos)
        done = 0
        if kernel_copy:
            try:
                done = os.copy_file_range(src_fd, dst_fd, want, src_offset + pos, dst_offset + pos)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF):
                    raise
                kernel_copy = False  # not between these file systems: read and write
        if not kernel_copy:
            # At most 4 MiB in memory at a time (the CLI's memory bound holds without a kernel copy).
            block = os.pread(src_fd, min(want, _PREAD_CHUNK), src_offset + pos)
            write_all(dst_fd, block, dst_offset + pos)
            done = len(block)
        if done <= 0:
            raise TruncatedInputError(
                f"{os.fspath(what)!r} was truncated by another process while it was copied "
                f"(expected {length} bytes, got {pos})"
            )
        pos += done
        if on_chunk is not None:
            on_chunk(done)
        hook_delay()


# --------------------------------------------------------------------------------------
# the SIGBUS guard (compiled; see cython/cm_guard.h)
# --------------------------------------------------------------------------------------

try:
    from . import _kernels as _guard_module

    _guard_add: Optional[Callable[[mmap.mmap], int]] = _guard_module._guard_add
    _guard_faults: Callable[[int], int] = _guard_module._guard_faults
    _guard_remove: Callable[[int], int] = _guard_module._guard_remove
except (ImportError, AttributeError):  # pragma: no cover - extension not built
    _guard_add = None
    _guard_faults = _guard_remove = lambda slot: 0


def _guard(mapping: mmap.mmap) -> int:
    """Register a map with the SIGBUS guard; its slot (-1: unguarded: no extension, table
    full). The slot lives as long as the mapping: it is removed when the mapping object is
    freed (after it is unmapped: a map dropped without close, or one that close could not
    unmap because a view was alive), or by :func:`_unguard` once it is closed. Removing
    it before a map is unmapped would leave a truncated file's read unguarded (SIGBUS);
    never removing it would fill the 64 slots, and every later map would go unguarded."""
    if _guard_add is None:
        return -1
    _drain_released()
    slot = _guard_add(mapping)
    if slot >= 0:
        fin = weakref.finalize(mapping, _guard_released, slot, id(mapping))
        fin.atexit = False  # at exit a daemon thread may still read the map
        _guard_finalizers[id(mapping)] = fin
    return slot


#: id(mapping) -> the finalizer that removes its slot (see _guard).
_guard_finalizers: Dict[int, Any] = {}
#: Slots of maps freed by the cyclic garbage collector, removed when the collection ends.
_released_in_collection: List[int] = []
_collecting = False


def _guard_released(slot: int, key: int) -> None:
    # A map freed by its reference count is unmapped before this runs; one in a reference
    # cycle (a view pinned by a traceback) is not: the collector calls weakref callbacks
    # before it frees the cycle. Its slot waits for the collection's end.
    _guard_finalizers.pop(key, None)
    if _collecting:
        _released_in_collection.append(slot)
    else:
        _guard_remove(slot)


def _drain_released() -> None:
    while _released_in_collection:
        _guard_remove(_released_in_collection.pop())


def _gc_phase(phase: str, info: Dict[str, Any]) -> None:
    global _collecting
    _collecting = phase == "start"
    if not _collecting:
        _drain_released()


gc.callbacks.append(_gc_phase)


def _unguard(mapping: mmap.mmap) -> None:
    """Remove ``mapping``'s slot now: call once ``mapping.close()`` has succeeded (it is
    unmapped). Idempotent; nothing for an unguarded map."""
    fin = _guard_finalizers.get(id(mapping))
    if fin is None:
        return
    held = fin.peek()
    if held is not None and held[0] is mapping:
        fin()


# --------------------------------------------------------------------------------------
# mapped state files
# --------------------------------------------------------------------------------------


class StateFile:
    """A state file mapped into memory (read-only unless ``writable=True``).

    ``private=True`` maps it copy-on-write: the buffer is writable, but writes stay in
    this process's memory (only the pages written cost RAM) and never reach the file;
    ``apply`` verifies a delta on such a map before writing the pages with ``pwrite``.
    ``sequential`` (default: True for read-only maps) advises the kernel that the map
    will be read front to back.

    ``buffer`` is the mapping (an :class:`mmap.mmap`), or an empty ``bytes``/``bytearray``
    for an empty file, which ``mmap`` cannot map. Use as a context manager. The file
    stays open (``fd``) so that :meth:`check` can tell whether it was truncated or
    changed while it was read, and so that its lock (shared for readers, exclusive when
    ``writable``) lasts as long as the map. ``fd=`` adopts an already open descriptor
    (a spooled stream) instead of opening ``path``; ``length`` maps only the first
    ``length`` bytes. Opening a file with a pending undo
    journal rolls it back first (``recovered`` then holds the report; see
    :mod:`cellmigrate.journal`), or raises :class:`JournalError` naming
    ``cellmigrate recover`` when this process cannot.

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "s.bin")
    ...     _ = open(p, "wb").write(b"abc")
    ...     with StateFile(p) as f:
    ...         bytes(f.buffer[:2]), f.size
    (b'ab', 3)
    """

    def __init__(
        self,
        path: StrPath,
        *,
        writable: bool = False,
        sequential: Optional[bool] = None,
        private: bool = False,
        fd: Optional[int] = None,
        length: Optional[int] = None,
    ) -> None:
        self.path = Path(path)
        self.writable = writable
        self.recovered: Optional["Recovery"] = None
        self._map: Optional[mmap.mmap] = None
        self._slot = -1
        self._empty: Union[bytes, bytearray] = bytearray() if writable or private else b""
        if sequential is None:
            sequential = not writable and not private
        if fd is None:
            from .journal import recover_if_pending  # journal imports this module

            self.recovered = recover_if_pending(self.path)
            fd = open_regular(self.path, os.O_RDWR if writable else os.O_RDONLY)
            owned_checks = True
        else:
            owned_checks = False
        self.fd = fd
        try:
            if owned_checks:
                lock_file(fd, exclusive=writable, what=self.path)
            st = os.fstat(fd)
            size = st.st_size if length is None else min(length, st.st_size)
            if size > 0:
                access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY if private else mmap.ACCESS_READ
                self._map = mmap.mmap(fd, size, access=access)
                self._slot = _guard(self._map)
                if sequential and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                    # Reads of a cold file through a map fault page by page; telling the
                    # kernel the scan is sequential turns on aggressive read-ahead (about
                    # 2x faster on a cold 2 GiB file) and lets it drop pages behind us.
                    self._map.madvise(mmap.MADV_SEQUENTIAL)
        except BaseException:
            self.close()
            raise
        self.size = size
        self._stat = _signature(st)

    @property
    def buffer(self) -> Union[mmap.mmap, bytes, bytearray]:
        """The file's bytes, mapped (or an empty buffer for an empty file)."""
        if self._map is not None:
            return self._map
        return self._empty

    def faults(self) -> int:
        """Pages read past the file's end so far (they read as zeros; see :meth:`check`)."""
        return _guard_faults(self._slot) if self._slot >= 0 else 0

    def check(self) -> None:
        """Raise if the file was truncated or changed since it was opened.

        :class:`TruncatedInputError` when a mapped page was read past the file's end or
        the file is now shorter; :class:`StateChangedError` when its size, ``mtime_ns``
        or ``ctime_ns`` changed (another process wrote to it). Call it after the work
        that read :attr:`buffer` and before trusting the result. Timestamps have the
        file system's granularity (a few ms on some), so callers that copy pages also
        compare them with the file afterwards (:meth:`pread`).
        """
        st = os.fstat(self.fd)
        if st.st_size < self.size:
            raise TruncatedInputError(
                f"{str(self.path)!r} was truncated by another process while it was read "
                f"({self.size} bytes at open, {st.st_size} now)"
            )
        faults = self.faults()
        if faults:
            # The size is intact, yet pages could not be brought in: an I/O error, or (on
            # tmpfs) a hole of a sparse file that needs memory the full file system lacks.
            reason = "an I/O error, or no space to bring in holes of a sparse file"
            with contextlib.suppress(OSError):
                if os.fstatvfs(self.fd).f_bavail == 0:
                    reason = "No space left on device (holes of a sparse file need space to be read)"
            raise TruncatedInputError(
                f"{str(self.path)!r}: {faults} page(s) could not be read through the memory map: {reason}"
            )
        if _signature(st) != self._stat:
            raise changed_while_read(self.path)

    def pread(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``offset`` read from the file now (not from the map)."""
        return os.pread(self.fd, length, offset)

    def flush(self) -> None:
        """Write dirty pages of a writable mapping back to the file (``msync``)."""
        if self._map is not None and self.writable:
            self._map.flush()

    def close(self) -> None:
        """Unmap and close. Idempotent; tolerant of views that are still alive."""
        mapping, self._map = self._map, None
        self._slot = -1
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:
                # A memoryview of the map is still referenced (typically by the traceback
                # of an exception in flight). Collect cycles once and retry; otherwise
                # leave the unmapping to the garbage collector rather than hide the
                # original error (the guard's slot goes with the map then: _guard).
                gc.collect()
                with contextlib.suppress(BufferError):
                    mapping.close()
            if mapping.closed:
                _unguard(mapping)
        fd, self.fd = getattr(self, "fd", -1), -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "StateFile":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "rw" if self.writable else "r"
        return f"StateFile({str(self.path)!r}, size={getattr(self, 'size', None)}, mode={mode!r})"


# --------------------------------------------------------------------------------------
# temporary files: unnamed where possible, else a name the next run can clean up
# --------------------------------------------------------------------------------------


def _default_mode() -> int:
    """Permissions a newly created file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def take_over(fd: int, dest: StrPath) -> None:
    """Give the file open as ``fd``, about to be renamed over ``dest``, ``dest``'s
    permission bits and, where this process may change them (root; or a group it is
    in), its owner and group, as ``rsync -o -g`` does: a state file that apply or
    receive run as root replaces stays its service's, readable by it. With no ``dest``
    yet: a new file's permissions under the umask (:func:`_default_mode`)."""
    try:
        st = os.stat(dest)
    except FileNotFoundError:
        os.fchmod(fd, _default_mode())
        return
    mine = os.fstat(fd)
    if (st.st_uid, st.st_gid) != (mine.st_uid, mine.st_gid):
        try:
            os.fchown(fd, st.st_uid, st.st_gid)
        except PermissionError:  # not root: the group alone, where we are in it
            with contextlib.suppress(PermissionError):
                os.fchown(fd, -1, st.st_gid)
    os.fchmod(fd, stat.S_IMODE(st.st_mode))  # after chown, which may clear set-id bits


# Earlier releases named them without the token.
_TEMP_RE_TEMPLATE = r"^\.{name}\.cellmigrate-(\d+)(?:-[0-9a-f]+)?\.tmp$"


def temp_name(dest: StrPath, pid: Optional[int] = None, token: Optional[str] = None) -> str:
    """A temporary name beside ``dest``: ``.NAME.cellmigrate-PID-TOKEN.tmp``.

    TOKEN (random unless given) makes it unique per file, so two threads, or processes
    of two PID namespaces sharing the directory, never write the same temporary file;
    the pattern lets the next run on the same target recognise what a run killed with
    SIGKILL left (:func:`remove_stale_temps`).

    >>> temp_name("/data/state.bin", pid=42, token="5eed")
    '.state.bin.cellmigrate-42-5eed.tmp'
    """
    return f".{Path(dest).name}.cellmigrate-{os.getpid() if pid is None else pid}-{token or secrets.token_hex(6)}.tmp"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def remove_stale_temps(dest: StrPath) -> List[Path]:
    """Remove temporary files of ``dest`` left by processes that no longer run.

    Only names matching :func:`temp_name` for this target, whose PID is gone and which no
    process holds locked, are removed: a live PID (even a recycled one) keeps its file,
    and so does a writer whose PID means nothing here (another PID namespace sharing the
    directory), which holds its file under ``flock``. Returns what was removed.
    """
    dest = Path(dest)
    directory = dest.parent if str(dest.parent) else Path(".")
    pattern = re.compile(_TEMP_RE_TEMPLATE.format(name=re.escape(dest.name)))
    removed: List[Path] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match is None:
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _pid_alive(pid) or _held(directory / name):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(directory / name)
            removed.append(directory / name)
    return removed


def _held(path: Path) -> bool:
    """Whether a writer holds ``path`` under ``flock`` (an open file never blocks here)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False  # gone already, or not ours to open: unlink decides
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)  # and with it the lock just taken
    return False


def _named_temp(directory: Path, dest: Path) -> Tuple[int, Path]:
    """Create a fresh :func:`temp_name` of ``dest`` in ``directory``, exclusively, and
    hold it under ``flock`` for as long as the descriptor is open."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = directory / temp_name(dest)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:  # 48 random bits: another token
            continue
        _lock_temp(fd)
        return fd, path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / temp_name(dest)))


def _lock_temp(fd: int) -> None:
    """Hold a temporary file under ``flock`` (:func:`remove_stale_temps` leaves it alone).
    Where the file system refuses ``flock`` the PID check alone protects it."""
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _unnamed_temp(directory: Path) -> Optional[int]:
    """An ``O_TMPFILE`` descriptor in ``directory``, or None where unsupported."""
    flag = getattr(os, "O_TMPFILE", 0)
    if not flag or not os.path.isdir("/proc/self/fd") or os.environ.get(TEST_NO_TMPFILE_ENV):
        return None
    try:
        return os.open(directory, flag | os.O_RDWR | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        if exc.errno in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOSYS):
            return None
        raise


def _link_unnamed(fd: int, directory: Path, name: str) -> None:
    """Give an ``O_TMPFILE`` file a name: ``linkat(/proc/self/fd/N, AT_SYMLINK_FOLLOW)``.

    A directory descriptor is passed on purpose: with default arguments CPython calls
    plain ``link(2)``, which would link the ``/proc`` symlink itself (EXDEV).
    """
    dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.link(f"/proc/self/fd/{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
    finally:
        os.close(dir_fd)


def _linked_name(fd: int, directory: Path, dest: Path) -> Path:
    """Link the unnamed file ``fd`` into ``directory`` under a fresh :func:`temp_name`."""
    for _ in range(100):
        named = directory / temp_name(dest)
        try:
            _link_unnamed(fd, directory, named.name)
        except FileExistsError:
            continue
        return named
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(directory / temp_name(dest)))


@contextlib.contextmanager
def atomic_replace(dest: StrPath) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it over ``dest``.

    ``dest`` is resolved first (a symlink stays a symlink; its target is replaced); an
    existing ``dest`` that is not a regular file (a device, a FIFO) raises ``OSError``. On
    any exception, including :class:`SignalInterrupt` and ``KeyboardInterrupt``, the
    temporary file is removed and ``dest`` is untouched; a SIGKILL leaves
    ``.NAME.cellmigrate-PID-TOKEN.tmp``, which the next call on the same target removes.
    The temporary file is this call's own (:func:`temp_name`): calls from several
    threads on one ``dest`` each replace it with a complete file, the last rename
    winning. The result keeps ``dest``'s permission bits, owner and group where it may
    (:func:`take_over`), else gets the umask's default.
    """
    dest = Path(os.path.realpath(dest))
    directory = dest.parent
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(dest).st_mode
        if not stat.S_ISREG(mode):
            # Renaming over /dev/null or a FIFO would replace the device node itself.
            raise OSError(errno.EINVAL, f"{str(dest)!r} is {file_kind(mode)}; refusing to replace it")
    try:
        remove_stale_temps(dest)
        fd, tmp = _named_temp(directory, dest)  # held open (and locked) until renamed or removed
    except OSError as exc:
        # Named by the path the caller gave, not the hidden temporary name (a missing or
        # unwritable directory is the caller's to fix).
        raise OSError(exc.errno, exc.strerror, str(dest)) from None
    try:
        yield tmp
        with open(tmp, "rb+") as fh:  # the file at tmp now (the caller may have made it anew)
            take_over(fh.fileno(), dest)
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    finally:
        os.close(fd)


def copy_to_temp(
    src: StrPath,
    tmp: StrPath,
    *,
    size: Optional[int] = None,
    on_chunk: Optional[Callable[[int], object]] = None,
) -> None:
    """Copy ``src`` into ``tmp`` (kernel-side copy where the OS offers one).

    With ``size`` larger than the source, the copy is extended with zero bytes, the same
    rule :meth:`DeltaSnapshot.apply` uses to grow a short ``bytearray`` base. With
    ``on_chunk``, the copy runs in chunks and ``on_chunk(nbytes)`` is called after each
    (for a progress bar); the chunks still stay in the kernel (``copy_file_range``, which
    can share extents on copy-on-write file systems) where it exists.
    """
    if on_chunk is None:
        shutil.copyfile(src, tmp)
    else:
        src_fd = open_regular(src)
        try:
            with open(tmp, "wb") as fout:
                copy_range(src_fd, fout.fileno(), os.fstat(src_fd).st_size, what=src, on_chunk=on_chunk)
        finally:
            os.close(src_fd)
    if size is not None and size > os.path.getsize(tmp):
        os.truncate(tmp, size)


def write_bytes_atomic(dest: StrPath, data: Union[bytes, bytearray, memoryview]) -> None:
    """Write ``data`` to ``dest`` through :func:`atomic_replace`."""
    with atomic_replace(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


# --------------------------------------------------------------------------------------
# outputs: a regular file replaced atomically, or a stream written through
# --------------------------------------------------------------------------------------


@dataclass
class Output:
    """Where a command's result goes (see :func:`open_output`).

    ``path`` is the resolved target of a regular file (the symlink's target when the
    user named a link), ``None`` for stdout; ``stream`` is True for stdout, FIFOs and
    character devices, which are written through front to back and never replaced.
    """

    name: str
    path: Optional[Path]
    stream: bool
    exists: bool

    @contextlib.contextmanager
    def open(self, *, size: Optional[int] = None) -> Iterator[int]:
        """Yield a writable descriptor; make the result visible only on success.

        A regular target gets a fresh temporary file in its directory (unnamed with
        ``O_TMPFILE`` where supported), ``size`` bytes reserved up front with
        ``posix_fallocate`` (a full disk fails here, as an ``OSError``, before anything
        is written); on success it is fsynced, given the old file's permission bits and
        renamed over the target, then the directory is fsynced. On any exception
        (signals included) it is removed. A stream is opened for writing (stdout is
        used as is) and only flushed at the end.
        """
        if self.stream:
            if self.path is None:
                if sys.stdout is None:  # started with stdout closed (>&-)
                    raise OSError(errno.EBADF, "stdout is closed")
                sys.stdout.flush()
                yield sys.stdout.fileno()
            else:
                fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_CLOEXEC", 0))
                try:
                    yield fd
                finally:
                    os.close(fd)
            return
        assert self.path is not None
        dest = self.path
        directory = dest.parent
        remove_stale_temps(dest)
        named: Optional[Path] = None
        unnamed = _unnamed_temp(directory)
        if unnamed is None:
            fd, named = _named_temp(directory, dest)
        else:
            fd = unnamed
            _lock_temp(fd)  # held once it has a name, below
        try:
            if size:
                reserve(fd, 0, size)
            yield fd
            take_over(fd, dest)
            os.fsync(fd)
            if named is None:
                # Give the unnamed file a name of its own, then rename it into place:
                # rename is the atomic step that replaces an existing target.
                named = _linked_name(fd, directory, dest)
            os.replace(named, dest)
            named = None
            fsync_dir(directory)
        finally:
            os.close(fd)
            if named is not None:
                with contextlib.suppress(OSError):
                    os.unlink(named)


def _input_identities(inputs: Iterable[Union[StrPath, int]]) -> List[Tuple[Tuple[int, int], str]]:
    found = []
    for item in inputs:
        try:
            st = os.fstat(item) if isinstance(item, int) else os.stat(item)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            found.append((identity(st), "stdin" if isinstance(item, int) else os.fspath(item)))
    return found


def open_output(name: str, *, inputs: Iterable[Union[StrPath, int]] = (), force: bool = False) -> Output:
    """Decide how to write the output ``name`` (no side effect: see :meth:`Output.open`).

    * ``-`` is stdout, a stream.
    * A FIFO or character device (``/dev/stdout``, ``/dev/null``, a named pipe) is a
      stream: written through, never replaced.
    * A symlink is resolved: its target is the file written, the link stays.
    * A path that names the same file (device and inode) as one of ``inputs`` (paths, or
      descriptors such as stdin) is always refused; an existing regular file is refused
      unless ``force``. Directories, block devices and sockets are refused.

    Refusals raise ``OSError`` whose ``strerror`` is the reason (the CLI prints it).
    """
    sources = _input_identities(inputs)

    def refuse_if_input(st: os.stat_result) -> None:
        for ident, source in sources:
            if identity(st) == ident:
                raise OSError(errno.EINVAL, f"is the same file as the input {source!r}; refusing to overwrite an input")

    if name == STREAM:
        try:
            fileno = sys.stdout.fileno()
            st_out: Optional[os.stat_result] = os.fstat(fileno)
            terminal = os.isatty(fileno)
        except (OSError, ValueError, AttributeError):  # no real stdout (embedded, closed): written as is
            st_out, terminal = None, False
        if st_out is not None:
            refuse_if_input(st_out)
        if terminal:
            # As zstd does: binary data on a terminal is never what was meant.
            raise OSError(errno.EINVAL, "stdout is a terminal; redirect or pipe it to write binary data")
        return Output(name=name, path=None, stream=True, exists=True)
    target = Path(os.path.realpath(name))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        return Output(name=name, path=target, stream=False, exists=False)
    refuse_if_input(st)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return Output(name=name, path=target, stream=True, exists=True)
    if not stat.S_ISREG(st.st_mode):
        raise OSError(errno.EINVAL, f"is {file_kind(st.st_mode)}; refusing to write over it")
    if not force:
        raise OSError(errno.EEXIST, "already exists; not overwritten without -f/--force")
    return Output(name=name, path=target, stream=False, exists=True)


# --------------------------------------------------------------------------------------
# stream inputs (stdin, FIFOs, devices)
# --------------------------------------------------------------------------------------


def open_input_stream(name: str) -> Optional[int]:
    """A descriptor to read ``name`` as a stream, or None when it is a regular file.

    ``-`` is stdin (duplicated, so closing it is safe). A FIFO or character device is
    opened for reading: for a FIFO that waits for its writer, as ``cat`` does. The type
    is checked with ``os.stat`` before the open. Directories, sockets and block devices
    raise ``OSError``.
    """
    if name == STREAM:
        if sys.stdin is None:  # started with stdin closed (<&-)
            raise OSError(errno.EBADF, "stdin is closed")
        return os.dup(sys.stdin.fileno())
    st = os.stat(name)
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return os.open(name, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    raise OSError(errno.EINVAL, f"is {file_kind(st.st_mode)}, not a file or a stream")


def spool_stream(
    fd: int,
    *,
    limit: int,
    what: str = "input",
    bound: Optional[Callable[[bytes], Optional[int]]] = None,
) -> StateFile:
    """Read a stream to its end into an unnamed temporary file and map it.

    The copy lives in ``$TMPDIR`` (unlinked at once: nothing is left behind whatever
    happens) and is at most ``limit`` bytes: a longer stream raises ``ValueError``
    naming the limit. Reads in 1 MiB blocks, so memory stays bounded.

    ``bound``, if given, is called with the bytes received so far until it returns the
    most bytes the input can have (None: it needs more); it may raise to refuse the input
    from its first bytes (a foreign or oversized stream is never spooled). A stream
    longer than that bound raises ``ValueError`` too.
    """
    spool = tempfile.TemporaryFile()
    try:
        total = 0
        head = b""
        judged = bound is None
        too_long = f"{what} is larger than the limit of {limit} bytes ({format_size(limit)})"
        while True:
            block = os.read(fd, 1 << 20)
            if not judged:
                assert bound is not None
                head += block[: _SPOOL_HEAD - len(head)]
                declared = bound(head)
                # Ended before the header did: the decoder reports the truncation.
                judged = declared is not None or not block or len(head) >= _SPOOL_HEAD
                if declared is not None and declared < limit:
                    limit = declared
                    too_long = f"{what} is longer than the {limit} bytes its header declares"
            if not block:
                break
            total += len(block)
            if total > limit:
                raise ValueError(too_long)
            _spooled(spool.write, block)
        _spooled(spool.flush)
        dup = os.dup(spool.fileno())
    finally:
        spool.close()
    return StateFile(what, fd=dup)


def changed_while_read(path: StrPath) -> StateChangedError:
    """The error for a state file another process wrote to while it was read."""
    return StateChangedError(f"{str(path)!r} changed while it was read (another process wrote to it); "
                             "the result could describe a state that never existed")


def _spooled(write: Callable[..., Any], *args: Any) -> None:
    """A write into the spool: a failure names the spool, not the stream (a full $TMPDIR
    is no read error of stdin)."""
    try:
        write(*args)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot spool it to a temporary file in {tempfile.gettempdir()!r} "
                                 f"($TMPDIR): {exc.strerror or exc}") from None


#: Most leading bytes of a stream :func:`spool_stream` hands to its ``bound`` callback.
_SPOOL_HEAD = 4096


# --------------------------------------------------------------------------------------
# catchable signals: raise, so that `finally` blocks clean up
# --------------------------------------------------------------------------------------


class SignalInterrupt(BaseException):
    """Raised by :func:`signals_raise` handlers when SIGTERM or SIGHUP arrives.

    A ``BaseException`` (like ``KeyboardInterrupt``) so that ``except Exception`` does
    not swallow it; cleanup code in ``finally``/``except BaseException`` runs.
    """

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def signals_raise(signums: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise :class:`SignalInterrupt`.

    Their default action kills the process without running ``finally`` blocks (a temp
    file would stay). Signals that are ignored (``nohup``) stay ignored; SIGINT already
    raises ``KeyboardInterrupt``. Only the main thread can install handlers: elsewhere
    this is a no-op.
    """
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise SignalInterrupt(signum)

    previous = {}
    for signum in signums:
        if signal.getsignal(signum) == signal.SIG_DFL:
            previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
