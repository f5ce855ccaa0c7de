"""Rollback points: a saved copy of an agent's state that a failed migration returns to.

:class:`RollbackInfo` is the crate's ``RollbackInfo`` (``capture``, ``age_secs``,
``is_valid``) plus what big states need:

* a strong digest (``xxh3_128_tree`` by default) next to the crate's weak checksum, or with a
  32-byte ``key`` a keyed BLAKE3 MAC, so a rollback file rewritten by someone without the
  key is refused (and a keyed point is never restored without its key, nor an unkeyed one
  when a key is given: no downgrade);
* :meth:`RollbackInfo.restore_into` writes the saved state back into a writable buffer,
  verifying the saved copy first (so a corrupted rollback point, or a target of the wrong
  size, leaves the target byte for byte unchanged) and the written target afterwards;
* ``RollbackInfo.capture(..., spill_to=path)`` keeps the copy in a file, memory-mapped
  read-only, instead of RAM; the file is in the serialized format below, so
  :meth:`RollbackInfo.load` reopens it (after a crash, say) without reading it into RAM;
* :meth:`RollbackInfo.serialize` / :meth:`RollbackInfo.deserialize` use a small versioned,
  self-checking binary layout documented in ``docs/ROLLBACK_FORMAT.md``; every malformed,
  truncated or tampered input raises :class:`CorruptDataError`;
* capture and restore accept ``progress=callback`` (a plain callable taking a
  :class:`MigrationProgressEvent`): they report CAPTURING_STATE / RESTORING percentages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import json
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Dict, List, Optional, Tuple, Type, Union

import xxhash

from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id, to_optional_id
from ._types import BufferLike
from .checksum import DEFAULT_DIGEST, DIGEST_ALGORITHMS, DIGEST_SIZES
from .checksum import digest as _digest
from .checksum import simple_checksum
from .errors import CorruptDataError, InvalidStateError
from .progress import ProgressCallback, ProgressEventKind, byte_progress
from .statefile import _guard, _guard_faults, _unguard, atomic_replace, open_regular

__all__ = ["RollbackInfo", "policy_bytes", "FORMAT_MAGIC", "FORMAT_VERSION"]

#: Work is done (and progress reported) in slices of this many bytes.
PROGRESS_CHUNK = 64 << 20

StrPath = Union[str, "os.PathLike[str]"]

# ---- serialized layout (docs/ROLLBACK_FORMAT.md) --------------------------------------
FORMAT_MAGIC = b"CMRB"
FORMAT_VERSION = 1
_FLAG_SOURCE_NODE = 0x0001
_FLAG_DIGEST = 0x0002
_FLAG_KEYED = 0x0004
_KNOWN_FLAGS = _FLAG_SOURCE_NODE | _FLAG_DIGEST | _FLAG_KEYED
# magic, version, flags, agent_id, source_node, created_at, checksum, digest id,
# digest length, reserved, policy length, state length, digest (zero padded to 32)
_HEADER = struct.Struct("<4sHH16s16sQIBBHQQ32s")
_CHECK_SIZE = 16  # XXH3-128
_HEADER_SIZE = _HEADER.size + _CHECK_SIZE  # header fields + their own check
_OVERHEAD = _HEADER_SIZE + _CHECK_SIZE  # + the trailer over everything before it
_DIGEST_IDS = {"xxh3_128": 1, "blake3": 2, "xxh3_128_tree": 3}
_DIGEST_NAMES = {v: k for k, v in _DIGEST_IDS.items()}
_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF

assert _HEADER.size == 104


def _now() -> int:
    return int(time.time())


def _check_algorithm(digest_algorithm: Optional[str]) -> None:
    if digest_algorithm is not None and digest_algorithm not in DIGEST_ALGORITHMS:
        raise ValueError(f"unknown digest algorithm {digest_algorithm!r}; expected one of {DIGEST_ALGORITHMS}")


def _agent_id_bytes(agent: Any) -> bytes:
    """The agent's id as 16 bytes (``Agent.id_bytes``, or any ``.id`` the id rules accept)."""
    raw = getattr(agent, "id_bytes", None)
    if raw is not None:
        return to_id(raw, "agent.id")
    if not hasattr(agent, "id"):
        raise TypeError(f"agent must have an 'id' (an Agent), not {type(agent).__name__}")
    return to_id(agent.id, "agent.id")


def policy_bytes(agent: Any) -> bytes:
    """Stable serialization of the agent's policy: compact JSON with sorted keys.

    Stable means the same policy always gives the same bytes, so two rollback points can be
    compared (and digested) byte for byte. An agent without a policy gives ``b""``.

    >>> from cellmigrate import Agent
    >>> policy_bytes(Agent())
    b'{"max_latency_ms":100,"min_battery_percent":20,"preferred_architectures":[]}'
    """
    policy = getattr(agent, "policy", None)
    if policy is None:
        return b""
    if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
        payload: Any = dataclasses.asdict(policy)
    else:
        payload = vars(policy)
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


class _Reporter:
    """Counts units of work done and reports them through :func:`byte_progress` (which
    emits an event only when the percent moves)."""

    def __init__(
        self,
        callback: Optional[ProgressCallback],
        kind: ProgressEventKind,
        agent_id: bytes,
        total_units: int,
    ) -> None:
        if callback is not None and not callable(callback):
            raise TypeError(f"progress must be callable (taking one MigrationProgressEvent), not {type(callback).__name__}")
        self._report = None if callback is None else byte_progress(callback, agent_id, kind)
        self._total = max(total_units, 1)
        self._done = 0

    def start(self) -> None:
        self._emit(0)

    def advance(self, units: int) -> None:
        self._done = min(self._total, self._done + units)
        self._emit(self._done)

    def finish(self) -> None:
        self._emit(self._total)

    def _emit(self, done: int) -> None:
        if self._report is not None:
            self._report(done, self._total)


def _chunks(n: int) -> List[Tuple[int, int]]:
    step = max(1, PROGRESS_CHUNK)
    return [(off, min(off + step, n)) for off in range(0, n, step)]


def _checksum_chunked(view: memoryview, reporter: Optional[_Reporter] = None) -> int:
    """simple_checksum in slices (it is linear: a state's checksum is the sum of its slices')."""
    total = 0
    for a, b in _chunks(view.nbytes):
        total = (total + simple_checksum(view[a:b], offset=a)) & _U32
        if reporter is not None:
            reporter.advance(b - a)
    return total


def _state_of(obj: BufferLike, mapped: bool) -> Union[bytes, memoryview]:
    """A rollback point's state must not change under its checksum: keep a private copy
    unless it is ``bytes`` or a view of the point's own read-only file mapping (a
    read-only view of someone else's buffer does not stop its owner from writing)."""
    if isinstance(obj, bytes):
        return obj
    if mapped and isinstance(obj, memoryview) and obj.readonly:
        return obj
    return bytes(as_bytes_view(obj, "original_state"))


@dataclass(init=False, eq=False, repr=False)
class RollbackInfo:
    """A saved copy of an agent's state, taken before a migration so it can be undone.

    Create one with :meth:`capture`; ``is_valid(max_age_secs)`` says whether it is still
    young enough to use, :meth:`restore_into` puts the state back.

    >>> from cellmigrate import Agent
    >>> info = RollbackInfo.capture(Agent(), b"state")
    >>> bytes(info.original_state), info.original_checksum, info.digest_algorithm
    (b'state', 1607, 'xxh3_128_tree')
    >>> info.is_valid(3600), info.is_valid(0)
    (True, False)
    >>> target = bytearray(b"garbage!")
    >>> info.restore_into(target)
    5
    >>> bytes(target)
    b'state'
    >>> RollbackInfo.deserialize(info.serialize()) == info
    True

    Attributes:
        agent_id: the agent's 16-byte id.
        original_state: the saved copy (``bytes``, or a read-only ``memoryview`` over a
            memory-mapped file when captured with ``spill_to`` or opened with ``load``).
        original_checksum: ``simple_checksum`` of the saved copy (the crate's check).
        original_policy_data: the agent's policy, serialized (compact sorted JSON).
        created_at: Unix seconds of the capture.
        source_node: optional 16-byte id of the node the state was captured on.
        digest_algorithm: "xxh3_128_tree", "xxh3_128" or "blake3", or ``None`` for a
            checksum-only point.
        digest: the strong digest of the saved copy (``None`` with ``digest_algorithm``).
        keyed: ``digest`` is a keyed BLAKE3 MAC: restoring needs the key.
    """

    agent_id: bytes
    original_state: Union[bytes, memoryview]
    original_checksum: int
    original_policy_data: bytes
    created_at: int
    source_node: Optional[bytes]
    digest_algorithm: Optional[str]
    digest: Optional[bytes]
    keyed: bool
    #: The file holding a spilled/loaded state (None for a point in RAM).
    spill_path: Optional[Path]

    def __init__(
        self,
        agent_id: IdLike,
        original_state: BufferLike,
        original_checksum: int,
        original_policy_data: bytes,
        created_at: int,
        source_node: Optional[IdLike] = None,
        digest_algorithm: Optional[str] = None,
        digest: Optional[bytes] = None,
        keyed: bool = False,
        *,
        spill_path: Optional[StrPath] = None,
        _mapping: Optional[mmap.mmap] = None,
        _guard_slot: int = -1,
    ) -> None:
        """Build a point from its parts (normally use :meth:`capture`).

        ``original_state`` may be any C-contiguous buffer; unless it is ``bytes`` it is
        copied, so the point cannot change under its checksum.
        """
        if (digest_algorithm is None) != (digest is None):
            raise ValueError("digest_algorithm and digest must be given together")
        _check_algorithm(digest_algorithm)
        self.agent_id = to_id(agent_id, "agent_id")
        self.original_state = _state_of(original_state, _mapping is not None)
        self.original_checksum = original_checksum
        self.original_policy_data = bytes(original_policy_data)
        self.created_at = created_at
        self.source_node = to_optional_id(source_node, "source_node")
        self.digest_algorithm = digest_algorithm
        self.digest = None if digest is None else bytes(digest)
        self.keyed = bool(keyed)
        if self.keyed and digest_algorithm != "blake3":
            raise ValueError("a keyed rollback point must use digest_algorithm='blake3'")
        self.spill_path = None if spill_path is None else Path(spill_path)
        # The mapping behind a spilled/loaded state; released by close(). Registered with
        # the SIGBUS guard (statefile, cython/cm_guard.h): a file truncated while mapped
        # reads as zeros past its end instead of killing the process, and every check of
        # the state asks the guard afterwards (_check_faults).
        self._mapping = _mapping
        self._slot = _guard_slot  # registered by whoever mapped it (load, capture)
        self._mapped_len = len(self.original_state)  # for close() of a copy's released view
        self._closed = False
        # The state's length once close() released a mapped state (len() and repr() say it).
        self._released_len: Optional[int] = None

    # -- the crate's API -------------------------------------------------------------

    @classmethod
    def capture(
        cls,
        agent: Any,
        state: BufferLike,
        *,
        source_node: Optional[IdLike] = None,
        digest_algorithm: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        spill_to: Optional[StrPath] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> "RollbackInfo":
        """Copy ``state`` once, checksum and digest the copy, and stamp the time.

        ``state`` is any C-contiguous buffer. The checksum and digest are computed over
        the copy, so the rollback point is self-consistent even if the caller keeps
        mutating its buffer. ``digest_algorithm=None`` records the checksum only; a
        32-byte ``key`` records a keyed BLAKE3 MAC instead (``keyed=True``), which
        :meth:`restore_into` then checks with the same key.

        ``spill_to=path`` writes the copy to ``path`` in the serialized format (to a
        temporary file beside it, fsynced, then renamed over ``path``) and maps it
        read-only instead of holding it in RAM; :meth:`close` unmaps it, the file stays,
        and :meth:`load` reopens it. ``progress`` receives CAPTURING_STATE
        events (0..100).
        """
        agent_id = _agent_id_bytes(agent)
        if key is not None:
            if digest_algorithm is None:
                raise ValueError("a key needs a digest: digest_algorithm=None cannot be keyed")
            digest_algorithm = "blake3"  # a key implies keyed BLAKE3
        _check_algorithm(digest_algorithm)
        view = as_bytes_view(state, "state")
        source = to_optional_id(source_node, "source_node")
        policy = policy_bytes(agent)
        n = view.nbytes
        digest_units = n if digest_algorithm is not None else 0
        if spill_to is not None:
            # write pass, checksum pass, digest pass, trailer pass
            reporter = _Reporter(progress, ProgressEventKind.CAPTURING_STATE, agent_id, 3 * n + digest_units)
            reporter.start()
            path = Path(spill_to)
            # Written beside ``path`` and renamed over it when complete: a crash or error
            # never leaves a half file at ``path``, and a point already mapping an older
            # file there keeps its (now unlinked) inode instead of seeing it truncated.
            with atomic_replace(path) as tmp:
                info = cls._capture_spilled(
                    tmp, path, view, agent_id, policy, source, digest_algorithm, key, reporter
                )
        else:
            # copy (one memcpy), checksum pass, digest pass
            reporter = _Reporter(progress, ProgressEventKind.CAPTURING_STATE, agent_id, 2 * n + digest_units)
            reporter.start()
            saved = bytes(view)
            reporter.advance(n)
            saved_view = memoryview(saved)
            checksum = _checksum_chunked(saved_view, reporter)
            dig = None if digest_algorithm is None else _digest(saved, digest_algorithm, key=key)
            reporter.advance(digest_units)
            info = cls(
                agent_id=agent_id,
                original_state=saved,
                original_checksum=checksum,
                original_policy_data=policy,
                created_at=_now(),
                source_node=source,
                digest_algorithm=digest_algorithm,
                digest=dig,
                keyed=key is not None,
            )
        reporter.finish()
        return info

    def age_secs(self) -> int:
        """Seconds since capture; never negative (a clock stepping back gives 0)."""
        return max(0, _now() - self.created_at)

    def is_valid(self, max_age_secs: int) -> bool:
        """True while ``age_secs() < max_age_secs`` (strict, so ``is_valid(0)`` is False)."""
        return self.age_secs() < max_age_secs

    # -- verification and restore ----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise InvalidStateError("Rollback point is closed")

    def _check_key(self, key: Optional[bytes]) -> None:
        """No downgrade: a keyed point needs its key, an unkeyed one is refused when a key is given."""
        if self.keyed and key is None:
            raise InvalidStateError("Rollback point is authenticated (keyed BLAKE3): a key is needed to use it")
        if key is not None and not self.keyed:
            raise InvalidStateError(
                "Rollback point is not authenticated but a key was given: refusing an unauthenticated rollback point"
            )

    def _check_faults(self, what: str = "was truncated while mapped: its state cannot be read") -> None:
        """``InvalidStateError`` (the file ``what``) when the mapped file was read past its
        end (truncated while mapped: those pages read as zeros, nothing read can be trusted)."""
        if self._slot >= 0 and _guard_faults(self._slot):
            where = f" {str(self.spill_path)!r}" if self.spill_path is not None else ""
            raise InvalidStateError(f"Rollback file{where} {what}")

    def _check(self, data: memoryview, reporter: Optional[_Reporter], what: str, key: Optional[bytes]) -> None:
        """Raise InvalidStateError unless ``data`` has the recorded checksum and digest."""
        got = _checksum_chunked(data, reporter)
        self._check_faults()
        if got != self.original_checksum:
            raise InvalidStateError(f"{what} checksum mismatch: expected {self.original_checksum}, got {got}")
        if self.digest_algorithm is not None and self.digest is not None:
            actual = _digest(data, self.digest_algorithm, key=key if self.keyed else None)
            self._check_faults()
            if reporter is not None:
                reporter.advance(data.nbytes)
            if not hmac.compare_digest(actual, self.digest):
                name = "MAC (keyed BLAKE3)" if self.keyed else f"{self.digest_algorithm} digest"
                raise InvalidStateError(f"{what} {name} mismatch")

    def _verify(self, reporter: Optional[_Reporter], key: Optional[bytes]) -> None:
        self._check_open()
        self._check_key(key)
        self._check(as_bytes_view(self.original_state, "original_state"), reporter, "Rollback state", key)

    def verify(self, *, key: Optional[bytes] = None) -> None:
        """Check the saved copy against its checksum and digest (``key`` for a keyed point).

        Raises :class:`InvalidStateError` naming the check that failed.
        """
        self._verify(None, key)

    def restore_into(
        self, target: BufferLike, *, key: Optional[bytes] = None, progress: Optional[ProgressCallback] = None
    ) -> int:
        """Write the saved state back into ``target`` and verify it; return the byte count.

        ``target`` is a writable buffer: a ``bytearray`` is grown or shrunk to the saved
        size; a writable ``memoryview``, writable ``mmap`` or numpy array must already have
        the saved size in bytes. The saved copy is verified (checksum and digest) *before*
        anything is written, so a corrupted rollback point or a target of the wrong size
        raises :class:`InvalidStateError` and leaves ``target`` byte for byte unchanged;
        a read-only target raises ``TypeError``. After writing, the target itself is
        checked against the recorded checksum and digest. A keyed point needs its
        ``key`` (and a key is refused for an unkeyed point); both are checked before any
        write. ``progress`` receives RESTORING events (0..100).
        """
        self._check_open()
        self._check_key(key)
        saved = as_bytes_view(self.original_state, "original_state")
        n = saved.nbytes
        resizable = isinstance(target, bytearray)
        view: Optional[memoryview] = None
        if not resizable:
            view = as_writable_view(target, "target")
            if view.nbytes != n:
                got = view.nbytes
                view.release()
                raise InvalidStateError(f"Rollback target size mismatch: expected {n} bytes, got {got} bytes")
        digest_units = n if self.digest_algorithm is not None else 0
        # verify the saved copy, write, verify the target (each check: checksum + digest)
        reporter = _Reporter(progress, ProgressEventKind.RESTORING, self.agent_id, 3 * n + 2 * digest_units)
        reporter.start()
        try:
            self._check(saved, reporter, "Rollback state", key)
            # A grown bytearray already holds the saved tail: only the head is copied.
            copy_n = n
            if resizable:  # target is a bytearray (mypy does not narrow through ``resizable``)
                copy_n = min(len(target), n)  # type: ignore[arg-type]
                view = self._resize_bytearray(target, saved)  # type: ignore[arg-type]
                reporter.advance(n - copy_n)
            assert view is not None
            for a, b in _chunks(copy_n):
                view[a:b] = saved[a:b]
                reporter.advance(b - a)
            # Cut after the first check: say what it did to the target.
            self._check_faults("was truncated while it was restored: the target is partly overwritten "
                               "(with zeros past the cut)")
            # Checked against the recorded values, not against the saved copy: a mapped
            # file changed by another writer after the first check is still caught.
            self._check(view, reporter, "Restored state", key)
        finally:
            if view is not None:
                view.release()
        reporter.finish()
        return n

    @staticmethod
    def _resize_bytearray(target: bytearray, saved: memoryview) -> memoryview:
        n, old = saved.nbytes, len(target)
        try:
            if old > n:
                del target[n:]
            elif old < n:
                # Grow straight from the saved copy: no temporary zero buffer.
                target[old:] = saved[old:]
        except BufferError:
            raise InvalidStateError(
                "Rollback target bytearray cannot be resized while a view of it is alive"
            ) from None
        return memoryview(target)

    # -- serialization ---------------------------------------------------------------

    def _header(self, policy_len: int, state_len: int) -> bytes:
        if not 0 <= self.created_at <= _U64:
            raise ValueError(f"created_at must be in 0..2**64-1 to serialize, got {self.created_at}")
        if not 0 <= self.original_checksum <= _U32:
            raise ValueError(f"original_checksum must be a u32, got {self.original_checksum}")
        flags = 0
        if self.source_node is not None:
            flags |= _FLAG_SOURCE_NODE
        dig = b""
        dig_id = 0
        if self.digest_algorithm is not None and self.digest is not None:
            flags |= _FLAG_DIGEST
            if self.keyed:
                flags |= _FLAG_KEYED
            dig, dig_id = self.digest, _DIGEST_IDS[self.digest_algorithm]
            if len(dig) != DIGEST_SIZES[self.digest_algorithm]:
                raise ValueError(f"{self.digest_algorithm} digest must be {DIGEST_SIZES[self.digest_algorithm]} bytes")
        fields = _HEADER.pack(
            FORMAT_MAGIC,
            FORMAT_VERSION,
            flags,
            self.agent_id,
            self.source_node or bytes(16),
            self.created_at,
            self.original_checksum,
            dig_id,
            len(dig),
            0,
            policy_len,
            state_len,
            dig.ljust(32, b"\0"),
        )
        return fields + xxhash.xxh3_128_digest(fields)

    def serialize(self) -> bytes:
        """The rollback point in the versioned, self-checking layout of ``docs/ROLLBACK_FORMAT.md``.

        The state is copied once (into the result); the check values stream over it.
        """
        self._check_open()
        state = as_bytes_view(self.original_state, "original_state")
        header = self._header(len(self.original_policy_data), state.nbytes)
        trailer = xxhash.xxh3_128()
        trailer.update(header)
        trailer.update(self.original_policy_data)
        for a, b in _chunks(state.nbytes):
            trailer.update(state[a:b])
        out = b"".join((header, self.original_policy_data, state, trailer.digest()))
        self._check_faults()  # a mapped file truncated meanwhile: zeros were read
        return out

    @classmethod
    def deserialize(cls, data: BufferLike, *, key: Optional[bytes] = None) -> "RollbackInfo":
        """Rebuild a rollback point from :meth:`serialize` output (the state is copied).

        Every field is checked before it is trusted (magic, version, flags, header check,
        lengths against the input size, trailer check, digest id and size, then the
        state's checksum and digest); any failure raises :class:`CorruptDataError` naming
        the field. Nothing larger than the input is allocated. A keyed point's MAC is
        checked here when ``key`` is given (else by :meth:`restore_into`, which needs the
        key); a ``key`` given for an unkeyed point is refused (no downgrade).
        """
        view = as_bytes_view(data, "data")
        fields, policy, state = _parse(view, key)
        return cls(original_state=bytes(state), original_policy_data=bytes(policy), **fields)

    @classmethod
    def load(cls, path: StrPath, *, key: Optional[bytes] = None) -> "RollbackInfo":
        """Open a serialized rollback point file (e.g. a ``spill_to`` file) without reading it
        into RAM: the file is mapped read-only, fully checked like :meth:`deserialize`,
        and the state stays a view into the mapping until :meth:`close`. A file truncated
        in place while mapped is refused by whatever reads it next (``CorruptDataError``
        here, ``InvalidStateError`` from :meth:`verify`, :meth:`restore_into`,
        :meth:`serialize`), never a SIGBUS (the mapping is registered with the guard of
        ``cython/cm_guard.h``, as the CLI's state files are)."""
        p = Path(path)
        try:
            fd = open_regular(p, os.O_RDONLY)  # never a FIFO (it would block) nor a device
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise  # not found, no permission: the OSError says it
            raise CorruptDataError(f"cannot load rollback point {str(p)!r}: it {exc.strerror}") from None
        with open(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < _OVERHEAD:
                raise CorruptDataError(f"Rollback file truncated: {size} bytes, at least {_OVERHEAD} needed")
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        slot = _guard(mapping)  # a file truncated while parsed reads as zeros, not SIGBUS
        whole = memoryview(mapping)
        try:
            fields, policy, state = _parse(whole, key)
            policy_copy = bytes(policy)
            policy.release()
            if slot >= 0 and _guard_faults(slot):
                raise CorruptDataError(f"Rollback file {str(p)!r} was truncated while it was read")
            return cls(
                original_state=state,
                original_policy_data=policy_copy,
                _mapping=mapping,
                _guard_slot=slot,
                spill_path=p,
                **fields,
            )
        except BaseException:
            # Views made while parsing may still be pinned by the traceback: if so, the
            # garbage collector unmaps the file once they are gone (and the guard's slot
            # goes with the map: statefile._guard).
            with contextlib.suppress(BufferError):
                whole.release()
                mapping.close()
                _unguard(mapping)
            raise

    @classmethod
    def _capture_spilled(
        cls,
        tmp: Path,
        path: Path,
        view: memoryview,
        agent_id: bytes,
        policy: bytes,
        source: Optional[bytes],
        digest_algorithm: Optional[str],
        key: Optional[bytes],
        reporter: _Reporter,
    ) -> "RollbackInfo":
        """Write the serialized layout to ``tmp`` (renamed to ``path`` by the caller) and map
        it; check values come from the file's own bytes, so the point describes exactly
        what is on disk."""
        n = view.nbytes
        created = _now()
        # The header needs the checksum and digest of the copy: write placeholders first,
        # compute over the mapped file, then fill the header and the trailer in place.
        placeholder = cls(
            agent_id=agent_id,
            original_state=b"",
            original_checksum=0,
            original_policy_data=policy,
            created_at=created,
            source_node=source,
        )
        state_at = _HEADER_SIZE + len(policy)
        with open(tmp, "w+b") as f:
            f.write(placeholder._header(len(policy), n))
            f.write(policy)
            for a, b in _chunks(n):
                f.write(view[a:b])
                reporter.advance(b - a)
            f.write(bytes(_CHECK_SIZE))
            f.flush()
            mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            slot = _guard(mapping)  # truncated by someone else while mapped: zeros, not SIGBUS
            whole = memoryview(mapping)
            state: Optional[memoryview] = None
            info: Optional[RollbackInfo] = None
            try:
                state = whole[state_at : state_at + n]
                checksum = _checksum_chunked(state, reporter)
                dig = None if digest_algorithm is None else _digest(state, digest_algorithm, key=key)
                reporter.advance(n if digest_algorithm is not None else 0)
                info = cls(
                    agent_id=agent_id,
                    original_state=state,
                    original_checksum=checksum,
                    original_policy_data=policy,
                    created_at=created,
                    source_node=source,
                    digest_algorithm=digest_algorithm,
                    digest=dig,
                    keyed=key is not None,
                    _mapping=mapping,
                    _guard_slot=slot,
                    spill_path=path,
                )
                header = info._header(len(policy), n)
                f.seek(0)
                f.write(header)
                f.flush()  # the read-only mapping shares the page cache: it sees this write
                trailer = xxhash.xxh3_128()
                end = state_at + n
                for a, b in [(0, state_at)] + [(state_at + a, state_at + b) for a, b in _chunks(n)]:
                    trailer.update(whole[a:b])
                    if a >= state_at:
                        reporter.advance(b - a)
                f.seek(end)
                f.write(trailer.digest())
                f.flush()
                os.fsync(f.fileno())
                info._check_faults()  # the values above were read from what is on disk
            except BaseException:
                if info is not None:
                    info.close()
                if state is not None:
                    state.release()
                whole.release()
                with contextlib.suppress(BufferError):  # a traceback may still pin a view
                    mapping.close()
                    _unguard(mapping)
                raise
            whole.release()
        assert info is not None
        return info

    # -- lifetime of a mapped point ----------------------------------------------------

    @property
    def spilled(self) -> bool:
        """True when the state lives in a memory-mapped file rather than RAM."""
        return self._mapping is not None

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called (a spilled or loaded point's state is
        then unmapped: restoring or comparing it raises ``InvalidStateError``)."""
        return self._closed

    def close(self) -> None:
        """Unmap a spilled/loaded state (the file stays). Idempotent; no-op for RAM points."""
        if self._closed:
            return
        self._closed = True
        self._slot = -1
        if self._mapping is not None:
            try:
                self._released_len = len(self.original_state)
            except ValueError:  # released by a copy of this point closed first: same map
                self._released_len = self._mapped_len
            if isinstance(self.original_state, memoryview):
                self.original_state.release()
            try:
                self._mapping.close()
            except BufferError:
                # A caller still holds a view of the state: the GC unmaps it later, and
                # the guard's slot goes with the map (statefile._guard), not before.
                pass
            else:
                _unguard(self._mapping)
            self._mapping = None

    def __enter__(self) -> "RollbackInfo":
        return self

    def __exit__(
        self,
        exc_type: Optional[Type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> None:
        self.close()

    # -- value semantics -------------------------------------------------------------

    def __len__(self) -> int:
        return self._released_len if self._released_len is not None else len(self.original_state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RollbackInfo):
            return NotImplemented
        if self._released_len is not None or other._released_len is not None:
            raise InvalidStateError("Rollback point is closed: its state is unmapped and cannot be compared")
        return (
            self.agent_id == other.agent_id
            and self.original_checksum == other.original_checksum
            and self.original_policy_data == other.original_policy_data
            and self.created_at == other.created_at
            and self.source_node == other.source_node
            and self.digest_algorithm == other.digest_algorithm
            and self.digest == other.digest
            and self.keyed == other.keyed
            and len(self.original_state) == len(other.original_state)
            and self.original_state == other.original_state
        )

    __hash__ = None  # type: ignore[assignment]  # mutable value type, like the dataclass default

    def __repr__(self) -> str:
        # Never print the state itself: it can be GiB.
        src = None if self.source_node is None else self.source_node.hex()
        dig = None if self.digest is None else self.digest.hex()
        where = f", spill_path={str(self.spill_path)!r}" if self.spill_path is not None else ""
        return (
            f"RollbackInfo(agent_id={self.agent_id.hex()}, "
            f"original_state=<{len(self)} bytes{', closed' if self._released_len is not None else ''}>, "
            f"original_checksum={self.original_checksum}, "
            f"original_policy_data={self.original_policy_data!r}, created_at={self.created_at}, "
            f"source_node={src}, digest_algorithm={self.digest_algorithm!r}, digest={dig}, "
            f"keyed={self.keyed}{where})"
        )


def _parse(view: memoryview, key: Optional[bytes] = None) -> Tuple[Dict[str, Any], memoryview, memoryview]:
    """Validate a serialized rollback point; return its fields and views of policy and state."""
    size = view.nbytes
    if size < _OVERHEAD:
        raise CorruptDataError(f"Rollback data truncated: {size} bytes, at least {_OVERHEAD} needed")
    (
        magic,
        version,
        flags,
        agent_id,
        source_node,
        created_at,
        checksum,
        dig_id,
        dig_len,
        reserved,
        policy_len,
        state_len,
        dig_field,
    ) = _HEADER.unpack_from(view, 0)
    if magic != FORMAT_MAGIC:
        raise CorruptDataError(f"Rollback data has bad magic {bytes(magic)!r} (expected {FORMAT_MAGIC!r})")
    if version != FORMAT_VERSION:
        raise CorruptDataError(f"Rollback data has unsupported version {version} (expected {FORMAT_VERSION})")
    if not hmac.compare_digest(
        xxhash.xxh3_128_digest(view[: _HEADER.size]), bytes(view[_HEADER.size : _HEADER_SIZE])
    ):
        raise CorruptDataError("Rollback data header check mismatch")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptDataError(f"Rollback data has unknown flags 0x{flags:04x}")
    if reserved != 0:
        raise CorruptDataError("Rollback data reserved field is not zero")
    # Lengths are never trusted: they must add up to exactly the input size.
    if policy_len > size or state_len > size or _OVERHEAD + policy_len + state_len != size:
        raise CorruptDataError(
            f"Rollback data length mismatch: policy {policy_len} + state {state_len} bytes "
            f"do not fit the {size}-byte input"
        )
    end = size - _CHECK_SIZE
    trailer = xxhash.xxh3_128()
    for a, b in [(0, _HEADER_SIZE)] + [(_HEADER_SIZE + a, _HEADER_SIZE + b) for a, b in _chunks(end - _HEADER_SIZE)]:
        trailer.update(view[a:b])
    if not hmac.compare_digest(trailer.digest(), bytes(view[end:])):
        raise CorruptDataError("Rollback data trailer check mismatch")
    if not flags & _FLAG_SOURCE_NODE and source_node != bytes(16):
        raise CorruptDataError("Rollback data source_node is set but its flag is not")
    keyed = bool(flags & _FLAG_KEYED)
    if keyed and (not flags & _FLAG_DIGEST or _DIGEST_NAMES.get(dig_id) != "blake3"):
        raise CorruptDataError("Rollback data is marked keyed but has no BLAKE3 digest")
    if key is not None and not keyed:
        raise CorruptDataError("Rollback data is not authenticated but a key was given: refusing it")
    if flags & _FLAG_DIGEST:
        algorithm = _DIGEST_NAMES.get(dig_id)
        if algorithm is None:
            raise CorruptDataError(f"Rollback data has unknown digest algorithm id {dig_id}")
        if dig_len != DIGEST_SIZES[algorithm]:
            raise CorruptDataError(f"Rollback data digest length {dig_len} is wrong for {algorithm}")
        dig: Optional[bytes] = bytes(dig_field[:dig_len])
        if any(dig_field[dig_len:]):
            raise CorruptDataError("Rollback data digest padding is not zero")
    else:
        if dig_id != 0 or dig_len != 0 or any(dig_field):
            raise CorruptDataError("Rollback data has digest fields but no digest flag")
        algorithm, dig = None, None
    policy = view[_HEADER_SIZE : _HEADER_SIZE + policy_len]
    state = view[_HEADER_SIZE + policy_len : end]
    got = _checksum_chunked(state)
    if got != checksum:
        raise CorruptDataError(f"Rollback data state checksum mismatch: expected {checksum}, got {got}")
    if algorithm is not None and dig is not None and (key is not None or not keyed):
        # A keyed point without the key cannot be checked here; restore_into needs the key.
        if not hmac.compare_digest(_digest(state, algorithm, key=key), dig):
            name = "MAC (keyed BLAKE3)" if keyed else f"{algorithm} digest"
            raise CorruptDataError(f"Rollback data state {name} mismatch")
    fields: Dict[str, Any] = dict(
        agent_id=bytes(agent_id),
        original_checksum=checksum,
        created_at=created_at,
        source_node=bytes(source_node) if flags & _FLAG_SOURCE_NODE else None,
        digest_algorithm=algorithm,
        digest=dig,
        keyed=keyed,
    )
    return fields, policy, state
