"""What a live migration needs from the agent on each side: the protocols users implement.

Source side (:class:`SourceAgent`): the running agent whose state is copied while it runs.
Target side: a :class:`StateStore` where incoming rounds are staged (a resizable buffer or
a file; the live agent on the target is never touched before the final round is proven),
and a :class:`TargetAgent` that adopts the proven state and resumes.

The order of calls a migration makes (see :mod:`cellmigrate.live.driver`)::

    source.state()  ... rounds while the agent runs ...
    source.pause(); source.state(); source.extra()     # final round, agent stopped
    target.adopt(staged_state, extra); target.resume() # after the target proved equality
    # on any failure before the target resumed: source.resume(), target untouched

Ready-made adapters: :class:`BufferSource` / :class:`BufferTarget` over a bytearray,
numpy array or a callable returning the current buffer, with optional pause/resume
callables, and :class:`MemoryStore` / :class:`FileStore` staging areas.
"""

from __future__ import annotations

import errno
import mmap
import os
from typing import Any, Callable, Optional, Protocol, Union, runtime_checkable

import numpy as np

from .._buffers import as_bytes_view, as_writable_view
from .._types import BufferLike
from ..errors import InvalidStateError

__all__ = [
    "MAX_EXTRA_BYTES",
    "SourceAgent",
    "TargetAgent",
    "StateStore",
    "BufferSource",
    "BufferTarget",
    "MemoryStore",
    "FileStore",
]

#: Bound on :meth:`SourceAgent.extra` (exported globals, registers): it travels in one frame.
MAX_EXTRA_BYTES = 1 << 20


@runtime_checkable
class SourceAgent(Protocol):
    """The running agent on the source node.

    ``state()`` may be called from the migration's thread while the agent keeps writing;
    pages written after they were copied are found dirty again in the next round.
    """

    def state(self) -> BufferLike:
        """The agent's current state: a C-contiguous buffer, read in place (never copied whole).

        It may be a different object, and of a different size, from one call to the next
        (WebAssembly ``memory.grow``); the migration calls it at the start of every round.
        """
        ...

    def pause(self) -> None:
        """Stop the agent; return only once it no longer writes its state."""
        ...

    def resume(self) -> None:
        """Let the agent run again (the migration failed or was abandoned; never after
        success). Also called when :meth:`pause` raised (or was interrupted): it may
        have stopped part of the agent, so resuming one that runs must be harmless."""
        ...

    def extra(self) -> bytes:
        """A small opaque blob read while paused (e.g. exported mutable globals), ≤ 1 MiB."""
        ...


@runtime_checkable
class StateStore(Protocol):
    """Where the target stages the incoming state; outlives a dropped connection (resume).

    ``view()`` is valid until the next ``resize()``. A store may also offer
    ``write_run(offset, data)`` to write a run of consecutive pages without going through
    the view (used when present; :class:`FileStore` writes with ``pwrite``).
    """

    def size(self) -> int:
        """Current length of the staged state in bytes."""
        ...

    def resize(self, size: int) -> None:
        """Grow (zero-filled) or shrink the staged state to ``size`` bytes."""
        ...

    def view(self) -> memoryview:
        """A writable flat byte view of the staged state."""
        ...

    def flush(self) -> None:
        """Make what was written so far durable (a no-op in memory)."""
        ...


@runtime_checkable
class TargetAgent(Protocol):
    """The agent on the target node: takes over the state once it is proven."""

    def adopt(self, state: memoryview, extra: bytes) -> None:
        """Take the staged state, proven equal to the source's final state, and ``extra``.

        ``state`` is a read-only view valid during the call. Raising here fails the
        migration: the source resumes.
        """
        ...

    def resume(self) -> None:
        """Start the adopted agent."""
        ...


def _noop() -> None:
    return None


class BufferSource:
    """A :class:`SourceAgent` over a buffer, or over a callable returning the current buffer.

    A buffer is checked at once (``TypeError``/``ValueError`` for one that is not a
    C-contiguous bytes-like object: ``as_bytes_view``'s rules); a callable's buffers when
    the migration reads them.

    >>> state = bytearray(8192)
    >>> src = BufferSource(state)
    >>> bytes(src.state()) == bytes(state), src.extra()
    (True, b'')
    """

    def __init__(
        self,
        state: Union[BufferLike, Callable[[], BufferLike]],
        *,
        pause: Callable[[], None] = _noop,
        resume: Callable[[], None] = _noop,
        extra: Callable[[], bytes] = bytes,
    ) -> None:
        if not callable(state):
            as_bytes_view(state, "state").release()  # refused here, not at run()
        self._state = state
        self._pause, self._resume, self._extra = pause, resume, extra

    def state(self) -> BufferLike:
        """The current buffer (the callable's result when one was given)."""
        return self._state() if callable(self._state) else self._state

    def pause(self) -> None:
        """Call the ``pause`` callable."""
        self._pause()

    def resume(self) -> None:
        """Call the ``resume`` callable."""
        self._resume()

    def extra(self) -> bytes:
        """The ``extra`` callable's bytes (``InvalidStateError`` above ``MAX_EXTRA_BYTES``)."""
        blob = bytes(self._extra())
        if len(blob) > MAX_EXTRA_BYTES:
            raise InvalidStateError(f"agent extra is {len(blob)} bytes; the limit is {MAX_EXTRA_BYTES}")
        return blob


class BufferTarget:
    """A :class:`TargetAgent` that keeps a copy of the adopted state and extra.

    ``on_adopt(state, extra)`` and ``on_resume()`` are called when given; ``state`` and
    ``extra`` hold the result after the migration (``bytearray`` and ``bytes``).
    """

    def __init__(
        self,
        *,
        on_adopt: Optional[Callable[[memoryview, bytes], None]] = None,
        on_resume: Callable[[], None] = _noop,
    ) -> None:
        self.state: Optional[bytearray] = None
        self.extra: Optional[bytes] = None
        self.resumed = False
        self._on_adopt, self._on_resume = on_adopt, on_resume

    def adopt(self, state: memoryview, extra: bytes) -> None:
        """Copy the state (or hand it to ``on_adopt``, which then keeps what it needs)."""
        if self._on_adopt is not None:
            self._on_adopt(state, extra)
        else:
            self.state = bytearray(state)
        self.extra = bytes(extra)

    def resume(self) -> None:
        """Call ``on_resume`` and mark the target resumed."""
        self._on_resume()
        self.resumed = True


class MemoryStore:
    """A :class:`StateStore` in memory (a numpy array: growing from empty costs nothing
    until pages are written, since the zeros come from ``calloc``)."""

    def __init__(self, initial: Optional[BufferLike] = None) -> None:
        self._buf: "np.ndarray[Any, np.dtype[np.uint8]]" = (
            np.zeros(0, dtype=np.uint8)
            if initial is None
            else np.frombuffer(as_bytes_view(initial, "initial"), dtype=np.uint8).copy()
        )

    @property
    def array(self) -> "np.ndarray[Any, np.dtype[np.uint8]]":
        """The staged state itself (1-D uint8, ``size()`` bytes; not a copy).

        A target may adopt it as it is once the session committed (zero-copy); a later
        :meth:`resize` replaces it with a new array, leaving this one stale.
        """
        return self._buf

    def size(self) -> int:
        """Bytes staged."""
        return int(self._buf.nbytes)

    def resize(self, size: int) -> None:
        """Zero-extend or truncate (a new array: views taken before stay valid, but stale)."""
        if size < 0:
            raise InvalidStateError(f"state size must be non-negative, not {size}")
        if size != self._buf.nbytes:
            new = np.zeros(size, dtype=np.uint8)
            keep = min(size, self._buf.nbytes)
            new[:keep] = self._buf[:keep]
            self._buf = new

    def view(self) -> memoryview:
        """A writable view."""
        return as_writable_view(self._buf, "staged state")

    def flush(self) -> None:
        """Nothing to do in memory."""


def _lock_exclusive(fd: int, path: str) -> None:
    """An exclusive, non-blocking ``flock`` on ``fd`` (InvalidStateError when another
    holder has it; nothing where the platform has no ``flock``)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks of this kind
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise InvalidStateError(f"{path!r} is in use: another receiver is staging into it") from None


def _symlink(path: str) -> OSError:
    return OSError(errno.ELOOP, "is a symbolic link: remove it (a staging file is never opened through one)", path)


def _unlink_if_same(path: str, fd: int) -> None:
    """Remove ``path`` if it still names ``fd``'s file (best effort: a path renamed away,
    then taken by another receiver's new staging file, is not ours to remove)."""
    try:
        if os.path.samestat(os.stat(path), os.fstat(fd)):
            os.unlink(path)
    except OSError:
        pass


class FileStore:
    """A :class:`StateStore` in a file, mapped into memory (created empty when missing).

    The file is the staging copy, not the target's state file: the CLI renames it over
    the state file only after the final round is proven. The store holds an exclusive
    ``flock`` on the file while open: a second store on the same path (two receivers
    given one state file would stage into one file, each proving what the other wrote)
    raises :class:`~cellmigrate.InvalidStateError`; ``OSError`` when the file cannot be
    opened.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        self.path = os.fspath(path)
        self._map: Optional[mmap.mmap] = None
        # Never through a symlink (one left at the path would have us stage into, and
        # rename over the state file, whatever it names).
        flags = os.O_RDWR | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        for attempt in range(3):
            # Created here (O_EXCL) or found: a file this store created and then failed to
            # open fully (an interrupt, a signal, a failed map) is removed again, so that no
            # empty staging file outlives the receiver; one found there is not ours to remove.
            try:
                self._fd, created = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644), True
            except FileExistsError:
                try:
                    self._fd, created = os.open(self.path, flags), False
                except FileNotFoundError:  # removed between the two opens: try again
                    if os.path.islink(self.path):  # a dangling link: not "in use"
                        raise _symlink(self.path) from None
                    continue
                except OSError as exc:
                    if exc.errno == errno.ELOOP:
                        raise _symlink(self.path) from None
                    raise
            locked = False
            try:
                _lock_exclusive(self._fd, self.path)
                locked = True
                # Locked, but is it still the file at the path? Another store may have
                # renamed it away (a receiver adopting it) between our open and our lock.
                try:
                    current = os.stat(self.path)
                except FileNotFoundError:
                    current = None
                if current is not None and os.path.samestat(current, os.fstat(self._fd)):
                    self._size = os.fstat(self._fd).st_size
                    self._remap()
                    return
            except BaseException:
                fd, self._fd = self._fd, -1
                try:
                    if created and locked:  # ours, and nobody else's yet (we hold the lock)
                        _unlink_if_same(self.path, fd)
                finally:
                    os.close(fd)
                raise
            fd, self._fd = self._fd, -1
            os.close(fd)
        raise InvalidStateError(f"{self.path!r} is in use: it kept being replaced while it was opened")

    def _remap(self) -> None:
        if self._map is not None:
            self._map.close()  # BufferError here means a view() is still held
            self._map = None
        if self._size:
            self._map = mmap.mmap(self._fd, self._size)

    def size(self) -> int:
        """Bytes staged (the file's length)."""
        return self._size

    def resize(self, size: int) -> None:
        """Truncate or zero-extend the file and map it again. A growth that fails (no
        space, or no address space to map it: ``OSError``, ``ValueError``) leaves the
        file and the mapping at their old size."""
        if size < 0:
            raise InvalidStateError(f"state size must be non-negative, not {size}")
        if size == self._size:
            return
        if self._map is not None:
            self._map.close()
            self._map = None
        old = self._size
        try:
            os.ftruncate(self._fd, size)
            self._size = size
            self._remap()
        except BaseException:
            if size > old:  # nothing of ours lay past the old end: cut back to it
                os.ftruncate(self._fd, old)
                self._size = old
                self._remap()
            raise

    def view(self) -> memoryview:
        """A writable view of the mapping (release it before ``resize``)."""
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def write_run(self, offset: int, data: memoryview) -> None:
        """Write ``data`` at ``offset`` with ``pwrite`` (into the page cache: no page faults
        of the mapping, several times faster than writing fresh pages through it)."""
        view = data.cast("B") if data.format != "B" else data
        while view.nbytes:
            n = os.pwrite(self._fd, view, offset)
            view, offset = view[n:], offset + n

    def flush(self) -> None:
        """``msync`` the mapping and ``fsync`` the file."""
        if self._map is not None:
            self._map.flush()
        os.fsync(self._fd)

    def stat(self) -> os.stat_result:
        """``os.fstat`` of the store's file (which the path may no longer name)."""
        return os.fstat(self._fd)

    def unlink(self) -> None:
        """Remove :attr:`path` if it still names the store's file, before :meth:`close`
        (best effort: another store's file at the path is left alone)."""
        _unlink_if_same(self.path, self._fd)

    def close(self) -> None:
        """Unmap and close the file (the file stays; the lock goes, or, while a view is
        still held, with its last view). Never raises for a view still held (a
        traceback's frame, say): the mapping then goes with the last view."""
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # dropped below: unmapped when the last view of it is released
            self._map = None
        if self._fd >= 0:
            # Marked closed first: a signal handler's exception between the two steps
            # (SIGTERM twice, as timeout(1) sends it) must not leave a second close() to
            # close a descriptor number that may be another file's by then.
            fd, self._fd = self._fd, -1
            os.close(fd)
