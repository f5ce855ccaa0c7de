"""State files on disk: memory-mapped opening, size parsing, atomic replacement.

The CLI never loads a state file whole. :class:`StateFile` maps it with :mod:`mmap`, so a
4 GiB state costs address space, not RAM: the kernels read the mapping in place and the
OS pages it in and out as needed. Two details the raw ``mmap`` module leaves to callers
are handled here:

* an empty file cannot be mapped (``mmap`` refuses length 0), so it is represented by an
  empty ``bytes``/``bytearray`` that every kernel accepts;
* closing a map fails with ``BufferError`` while a ``memoryview`` of it is still alive
  (for example one held by a traceback frame while an error propagates); we then drop our
  reference and let the garbage collector unmap it, instead of masking the real error.

:func:`atomic_replace` is the crash-safety primitive: the new content is written to a
temporary file in the destination's directory, flushed to disk, and renamed over the
destination, so a reader (or a crash) sees either the old file or the new one, never a
half-written one.

>>> parse_size("256MiB")
268435456
>>> parse_size("1GiB"), parse_size("4096"), parse_size("1.5KiB")
(1073741824, 4096, 1536)
>>> format_size(268435456)
'256 MiB'
"""

from __future__ import annotations

import contextlib
import gc
import mmap
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Callable, Iterator, Optional, Type, Union

__all__ = [
    "StrPath",
    "StateFile",
    "parse_size",
    "format_size",
    "atomic_replace",
    "copy_to_temp",
    "write_bytes_atomic",
]

StrPath = Union[str, "os.PathLike[str]"]

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
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a byte count: plain bytes (``"4096"``) or with a unit (``"256MiB"``, ``"1GiB"``).

    Units are case-insensitive: ``KiB MiB GiB TiB`` (and ``K M G T``) are binary, ``kB MB GB
    TB`` are decimal, ``B`` is bytes. A fraction is accepted when it names a whole number of
    bytes (``"1.5KiB"`` is 1536). Anything else raises :class:`ValueError` with the reason.

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
        raise ValueError(f"invalid size {text!r}: unknown unit {match.group(2)!r} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)")
    multiplier = _UNITS[unit]
    # Exact rational arithmetic: "0.1GiB" must not pick up float rounding.
    if "." in number:
        whole, _, frac = number.partition(".")
        scale = 10 ** len(frac)
        numerator = int(whole or "0") * scale + int(frac or "0")
        total = numerator * multiplier
        value: int = total // scale
        if total % scale:
            raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
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


class StateFile:
    """A state file mapped into memory (read-only unless ``writable=True``).

    ``sequential`` (default: True for read-only maps, False for writable ones, which
    ``apply`` writes at scattered dirty pages) advises the kernel that the map will be
    read front to back.

    ``buffer`` is the mapping (an :class:`mmap.mmap`), or an empty ``bytes``/``bytearray``
    for an empty file, which ``mmap`` cannot map. Use as a context manager; the file
    descriptor is closed right after mapping (the mapping keeps the data reachable).

    >>> import tempfile, os
    >>> with tempfile.TemporaryDirectory() as d:
    ...     p = os.path.join(d, "s.bin")
    ...     _ = open(p, "wb").write(b"abc")
    ...     with StateFile(p) as f:
    ...         bytes(f.buffer[:2]), f.size
    (b'ab', 3)
    """

    def __init__(self, path: StrPath, *, writable: bool = False, sequential: Optional[bool] = None) -> None:
        self.path = Path(path)
        self.writable = writable
        self._map: Optional[mmap.mmap] = None
        self._empty: Union[bytes, bytearray] = bytearray() if writable else b""
        if sequential is None:
            sequential = not writable
        with open(self.path, "r+b" if writable else "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                raise OSError(f"{self.path}: not a regular file")
            if size > 0:
                access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
                self._map = mmap.mmap(fh.fileno(), 0, access=access)
                if sequential and hasattr(self._map, "madvise") and hasattr(mmap, "MADV_SEQUENTIAL"):
                    # Reads of a cold file through a map fault page by page; telling the
                    # kernel the scan is sequential turns on aggressive read-ahead (about
                    # 2x faster on a cold 2 GiB file) and lets it drop pages behind us.
                    self._map.madvise(mmap.MADV_SEQUENTIAL)
        self.size = size

    @property
    def buffer(self) -> Union[mmap.mmap, bytes, bytearray]:
        """The file's bytes, mapped (or an empty buffer for an empty file)."""
        if self._map is not None:
            return self._map
        return self._empty

    def flush(self) -> None:
        """Write dirty pages of a writable mapping back to the file (``msync``)."""
        if self._map is not None and self.writable:
            self._map.flush()

    def close(self) -> None:
        """Unmap. Idempotent; tolerant of views that are still alive (see module doc)."""
        mapping, self._map = self._map, None
        if mapping is None:
            return
        try:
            mapping.close()
        except BufferError:
            # A memoryview of the map is still referenced (typically by the traceback of an
            # exception in flight). Collect cycles once and retry; otherwise leave the
            # unmapping to the garbage collector rather than hide the original error.
            gc.collect()
            with contextlib.suppress(BufferError):
                mapping.close()

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
        return f"StateFile({str(self.path)!r}, size={self.size}, mode={mode!r})"


def _default_mode() -> int:
    """Permissions a newly created file gets under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable by syncing its directory (a no-op where unsupported)."""
    if os.name != "posix":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_replace(dest: StrPath) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success fsync it and rename it over ``dest``.

    On any exception the temporary file is removed and ``dest`` is untouched. The result
    keeps ``dest``'s permission bits when it exists, else gets the umask's default.
    """
    dest = Path(dest)
    directory = dest.parent if str(dest.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        try:
            mode = stat.S_IMODE(os.stat(dest).st_mode)
        except FileNotFoundError:
            mode = _default_mode()
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
        _fsync_dir(directory)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


#: Bytes copied between two progress reports in :func:`copy_to_temp`.
COPY_CHUNK = 64 << 20


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
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            remaining = os.fstat(fin.fileno()).st_size
            kernel_copy = hasattr(os, "copy_file_range")
            while remaining > 0:
                want = min(COPY_CHUNK, remaining)
                done = 0
                if kernel_copy:
                    try:
                        done = os.copy_file_range(fin.fileno(), fout.fileno(), want)
                    except OSError:
                        # Not supported between these file systems: fall back to
                        # reading and writing (positions are unchanged on failure).
                        kernel_copy = False
                if not kernel_copy:
                    block = fin.read(want)
                    fout.write(block)
                    done = len(block)
                if done <= 0:
                    raise OSError(f"{src}: file shrank while being copied")
                remaining -= done
                on_chunk(done)
    if size is not None and size > os.path.getsize(tmp):
        os.truncate(tmp, size)


def write_bytes_atomic(dest: StrPath, data: Union[bytes, bytearray, memoryview]) -> None:
    """Write ``data`` to ``dest`` through :func:`atomic_replace`."""
    with atomic_replace(dest) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
