"""Dirty-page deltas: ship only the 4 KiB pages that changed, apply them atomically.

:class:`DeltaSnapshot` is the crate's ``DeltaSnapshot`` with three fixes (SPEC §3, §6):

* ``create`` reads both states in place through the GIL-free kernels, in cache-sized
  chunks (the page comparison, the weighted checksum and the strong digest share one
  read of the data), and copies only the dirty pages;
* ``apply`` is atomic: every check (sizes, page indices, page decoding, the result's
  checksum, the strong digest or MAC of the result) runs *before* a byte of the base is
  written, so a bad delta leaves the base byte-for-byte unchanged;
* a strong digest (``xxh3_128_tree`` by default: XXH3-128 over 1 MiB leaves that all
  cores hash; plain XXH3-128; BLAKE3; keyed BLAKE3 = a MAC) backs up the crate's weak checksum.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id
from ._passes import ProgressCallback, Result, Scan, before_end, byte_reporter, scan
from ._types import BufferLike
from .checksum import DEFAULT_DIGEST, DIGEST_ALGORITHMS, DIGEST_SIZES, PAGE_SIZE, Hasher, check_key
from .errors import CorruptDataError, InvalidStateError
from .progress import ProgressEventKind

__all__ = ["DirtyPage", "DeltaSnapshot", "DEFAULT_MAX_GROW_SIZE"]

#: Largest size (bytes) :meth:`DeltaSnapshot.apply` grows a short ``bytearray`` base to
#: unless the caller passes ``max_size``: 1 GiB, the Rust crate's default node limit
#: (``NodeCapabilities.new().max_state_size``). A delta's ``total_size`` is only as
#: trustworthy as its digest (the weak checksum ignores trailing zeros), so growth in
#: memory is bounded by what the *caller* allows, never by what the delta declares.
DEFAULT_MAX_GROW_SIZE = 1 << 30

_MASK32 = 0xFFFFFFFF
#: A base grows by appending this shared zero chunk (no temporary of the grown size).
_GROW_CHUNK = 1 << 20
_ZEROS = memoryview(bytes(_GROW_CHUNK))


def _now() -> int:
    return int(time.time())


def _page_length(index: int, total_size: int) -> int:
    """Length of page ``index`` in a state of ``total_size`` bytes (the last may be short)."""
    return min(PAGE_SIZE, total_size - index * PAGE_SIZE)


# --------------------------------------------------------------------------------------
# DirtyPage
# --------------------------------------------------------------------------------------


class DirtyPage:
    """One changed page: its index in the state and its bytes, RLE-compressed or raw.

    >>> page = DirtyPage(3, bytes(4096))
    >>> page.compress()
    >>> page.compressed, len(page.data)
    (True, 99)
    >>> page.get_data() == bytes(4096)
    True
    >>> page.decompress()
    >>> page
    DirtyPage(index=3, data=<4096 bytes>, compressed=False)

    Attributes:
        index: page number; the page covers bytes ``[index*4096, (index+1)*4096)``.
        data: the page's bytes, RLE-encoded when ``compressed``.
        compressed: whether ``data`` is RLE ("simple") compressed.
    """

    __slots__ = ("index", "data", "compressed")
    __hash__ = None  # type: ignore[assignment]  # mutable, like the crate's struct

    def __init__(self, index: int, data: BufferLike, compressed: bool = False) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"page index must be an int, not {type(index).__name__}")
        if index < 0:
            raise ValueError(f"page index must be >= 0, got {index}")
        self.index: int = int(index)
        self.data: bytes = data if isinstance(data, bytes) else bytes(as_bytes_view(data, "page data"))
        self.compressed: bool = bool(compressed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyPage):
            return NotImplemented
        return (self.index, self.compressed, self.data) == (other.index, other.compressed, other.data)

    def compress(self) -> None:
        """RLE-compress ``data`` in place, keeping the result only when strictly smaller."""
        if self.compressed:
            return
        packed = bytes(kernels.rle_compress(as_bytes_view(self.data)))
        if len(packed) < len(self.data):
            self.data = packed
            self.compressed = True

    def decompress(self, *, max_output: Optional[int] = None) -> None:
        """Decode ``data`` in place (no-op when raw); corrupt data raises ``CorruptDataError``."""
        if self.compressed:
            self.data = self.get_data(max_output=max_output)
            self.compressed = False

    def get_data(self, *, max_output: Optional[int] = None) -> bytes:
        """The page's raw bytes (decoded if compressed), without changing the page.

        ``max_output`` bounds the decoded size (``CorruptDataError`` past it). ``None``
        leaves only RLE's own limit (at most 127 bytes per 3 stored), like the crate,
        so a page built by hand from more than 4096 bytes still round-trips;
        :meth:`DeltaSnapshot.apply` always decodes with the exact page length as bound.
        """
        if not self.compressed:
            return self.data
        if max_output is not None and max_output < 0:
            raise ValueError("max_output must be >= 0")
        bound = -1 if max_output is None else max_output  # -1: the kernel's "no bound"
        return bytes(kernels.rle_decompress(as_bytes_view(self.data), bound))

    def __repr__(self) -> str:
        return f"DirtyPage(index={self.index}, data=<{len(self.data)} bytes>, compressed={self.compressed})"


def _compress_pages(pages: Sequence[bytes]) -> List[Tuple[bytes, bool]]:
    out: List[Tuple[bytes, bool]] = []
    for raw in pages:
        packed = bytes(kernels.rle_compress(raw))
        out.append((packed, True) if len(packed) < len(raw) else (raw, False))
    return out


def _grow_zeros(base: bytearray, total: int) -> None:
    """Extend ``base`` with zeros to ``total`` bytes, or leave it as it was and raise
    :class:`InvalidStateError` (a view of it is alive, or memory runs out)."""
    size = len(base)
    try:
        # In place, from a shared zero chunk: no temporary of the grown size.
        while len(base) < total:
            base += _ZEROS[: min(_GROW_CHUNK, total - len(base))]
    except BufferError as exc:
        raise InvalidStateError(f"Base state is too small and cannot be grown: {exc}") from None
    except MemoryError:
        del base[size:]
        raise InvalidStateError(
            f"Out of memory growing the base from {size} to {total} bytes; base left unchanged"
        ) from None


def _shrink(base: bytearray, total: int) -> None:
    """Cut ``base`` to ``total`` bytes, or leave it as it was and raise :class:`InvalidStateError`."""
    try:
        del base[total:]
    except BufferError as exc:
        raise InvalidStateError(f"Base state must shrink but cannot be resized: {exc}") from None


# --------------------------------------------------------------------------------------
# DeltaSnapshot
# --------------------------------------------------------------------------------------


@dataclass(eq=True, repr=False)
class DeltaSnapshot:
    """The pages that changed between two versions of an agent's state, plus checks.

    Build one with :meth:`create`, ship it with :meth:`serialize`, and on the other node
    :meth:`deserialize` and :meth:`apply` it to the base state (atomic: verified first).

    >>> old = bytearray(3 * 4096)
    >>> new = bytearray(old); new[5000] = 7
    >>> delta = DeltaSnapshot.create(bytes(16), old, new, base_sequence=1, sequence=2)
    >>> delta.dirty_page_count(), [p.index for p in delta.dirty_pages], delta.digest_algorithm
    (1, [1], 'xxh3_128_tree')
    >>> delta.apply(old)
    >>> old == new
    True

    Attributes:
        agent_id: the agent's 16-byte id.
        sequence: this delta's sequence number.
        base_sequence: the sequence of the state it applies to.
        dirty_pages: the changed pages (a plain list; ``apply`` reads their current data).
        total_size: size of the new state in bytes.
        timestamp: Unix seconds of creation.
        checksum: ``simple_checksum`` of the new state (the crate's check).
        digest_algorithm: "xxh3_128", "blake3", "xxh3_128_tree", or ``None`` for a
            checksum-only delta.
        digest: strong digest (or MAC when ``keyed``) of the new state, or ``None``.
        keyed: the digest is keyed BLAKE3: ``apply`` needs the key.
        base_size: size of the state the delta applies to (bytes) when it differs from
            ``total_size`` (a delta made with ``create(..., resize=True)`` between states
            of different sizes); ``None`` when the base has ``total_size`` bytes.
    """

    agent_id: bytes
    sequence: int
    base_sequence: int
    dirty_pages: List[DirtyPage]
    total_size: int
    timestamp: int
    checksum: int
    digest_algorithm: Optional[str] = None
    digest: Optional[bytes] = None
    keyed: bool = False
    base_size: Optional[int] = None

    def __post_init__(self) -> None:
        self.agent_id = to_id(self.agent_id, "agent_id")
        for name in ("sequence", "base_sequence", "total_size", "timestamp", "checksum", "base_size"):
            value = getattr(self, name)
            if value is None and name == "base_size":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, int(value))
        if self.base_size == self.total_size:
            self.base_size = None  # one spelling of "same size", so equal deltas compare equal
        if self.checksum > _MASK32:
            raise ValueError(f"checksum must fit in 32 bits, got {self.checksum}")
        if not isinstance(self.dirty_pages, list):
            self.dirty_pages = list(self.dirty_pages)
        if (self.digest_algorithm is None) != (self.digest is None):
            raise ValueError("digest_algorithm and digest must be given together")
        if self.digest_algorithm is not None:
            if self.digest_algorithm not in DIGEST_SIZES:
                raise ValueError(
                    f"unknown digest algorithm {self.digest_algorithm!r}; expected one of {DIGEST_ALGORITHMS}"
                )
            self.digest = bytes(self.digest or b"")
        self.keyed = bool(self.keyed)
        if self.keyed and self.digest_algorithm != "blake3":
            raise ValueError("a keyed delta must use digest_algorithm='blake3'")

    # -- create ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        agent_id: IdLike,
        old_state: BufferLike,
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        *,
        digest: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        resize: bool = False,
    ) -> "DeltaSnapshot":
        """Diff two states page by page (of equal lengths unless ``resize``).

        Both states are read in place (any C-contiguous buffer); only the dirty pages
        are copied, each RLE-compressed when that makes it strictly smaller.
        ``digest`` names the strong digest of the new state ("xxh3_128_tree", the default:
        XXH3-128 over 1 MiB leaves, which every core helps hash and verify; "xxh3_128",
        plain sequential XXH3-128; "blake3"; or ``None`` for the crate's
        checksum-only delta); a 32-byte ``key`` makes it a keyed
        BLAKE3 MAC (``keyed=True``). Different lengths raise :class:`InvalidStateError`
        (SPEC §3), unless ``resize=True``: then ``new_state`` may be longer than
        ``old_state`` (a WebAssembly ``memory.grow``: the pages past the old end are
        compared with zeros, so zero pages there cost nothing) or shorter (the state is
        cut); ``base_size`` records ``len(old_state)`` when it differs, and
        :meth:`apply` resizes a ``bytearray`` base to ``total_size``.

        ``new_state`` may be written by another thread meanwhile (a running agent): each
        dirty page is copied once, when the scan finds it, and the checksum and digest
        cover the old state with those copies over it, so the delta describes one state
        exactly and applies to its base; a page written after it was read is not in it.

        ``progress`` is an event callback (like :class:`~cellmigrate.CollectingCallback`;
        it receives CAPTURING_STATE events, percent 0..100) or a callable taking
        ``(bytes_done, bytes_total)``; it is called from this thread between chunks.
        """
        agent = to_id(agent_id, "agent_id")
        report = byte_reporter(progress, agent, ProgressEventKind.CAPTURING_STATE)
        delta, _ = cls._create_checked(
            agent, old_state, new_state, base_sequence, sequence, digest, key, report, resize=resize
        )
        return delta

    @classmethod
    def _create_checked(
        cls,
        agent: bytes,
        old_state: Optional[BufferLike],
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        digest: Optional[str],
        key: Optional[bytes],
        progress: Optional[ProgressCallback] = None,
        *,
        resize: bool = False,
    ) -> Tuple["DeltaSnapshot", Scan]:
        """Normalise ``digest``/``key`` (a key implies keyed BLAKE3), then :meth:`_create`.

        ``old_state`` ``None`` stands for zeros of the new state's length (the tracker's
        first delta), without allocating them."""
        raw_key = check_key(key)
        algorithm = digest
        if algorithm is not None and algorithm not in DIGEST_SIZES:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {DIGEST_ALGORITHMS}")
        if raw_key is not None:
            if algorithm is None:
                raise ValueError("a key needs a digest: digest=None makes an unauthenticated checksum-only delta")
            algorithm = "blake3"
        return cls._create(agent, old_state, new_state, base_sequence, sequence, algorithm, raw_key, progress, resize)

    @classmethod
    def _create(
        cls,
        agent: bytes,
        old_state: Optional[BufferLike],
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        algorithm: Optional[str],
        key: Optional[bytes],
        progress: Optional[ProgressCallback],
        resize: bool,
    ) -> Tuple["DeltaSnapshot", Scan]:
        """``create`` that also returns what the scan found: the dirty pages as copied,
        which the delta describes (the tracker keeps them as its next base)."""
        old = memoryview(b"") if old_state is None else as_bytes_view(old_state, "old_state")
        new = as_bytes_view(new_state, "new_state")
        # None: zeros of the new length (an empty base reads as zeros), never allocated.
        base_size = new.nbytes if old_state is None else old.nbytes
        if base_size != new.nbytes and not resize:
            raise InvalidStateError(
                f"State sizes must match for delta (size mismatch: old state has {old.nbytes} bytes, "
                f"new state has {new.nbytes} bytes; resize=True makes a delta between them)"
            )
        hasher = None if algorithm is None else Hasher(algorithm, key)
        found = scan(old, new, hasher, progress)
        pages = [
            DirtyPage(int(i), data, packed) for i, (data, packed) in zip(found.indices, _compress_pages(found.pages))
        ]
        value = None if hasher is None else hasher.digest()
        if hasher is not None and hasher.splittable:
            found.leaves = hasher.leaves()  # the new state's leaf table, for free
        delta = cls(
            agent_id=agent,
            sequence=sequence,
            base_sequence=base_sequence,
            dirty_pages=pages,
            total_size=new.nbytes,
            timestamp=_now(),
            checksum=found.checksum,
            digest_algorithm=algorithm,
            digest=value,
            keyed=key is not None,
            base_size=base_size,
        )
        return delta, found

    # -- apply -------------------------------------------------------------------------

    def _decoded_pages(self) -> Tuple[List[int], List[bytes]]:
        """Indices (sorted) and raw bytes of every page, all checked; raises InvalidStateError."""
        total = self.total_size
        npages = -(-total // PAGE_SIZE)
        seen: Dict[int, bytes] = {}
        for page in self.dirty_pages:
            if not isinstance(page, DirtyPage):
                raise InvalidStateError(f"Delta page list holds a {type(page).__name__}, not a DirtyPage")
            index = page.index
            if not 0 <= index < npages:
                raise InvalidStateError(
                    f"Delta page {index} is out of range for a state of {total} bytes ({npages} pages)"
                )
            if index in seen:
                raise InvalidStateError(f"Delta holds page {index} more than once")
            expected = _page_length(index, total)
            if page.compressed:
                try:
                    data = bytes(kernels.rle_decompress(as_bytes_view(page.data), expected))
                except CorruptDataError as exc:
                    raise InvalidStateError(f"Delta page {index} is corrupt: {exc}") from None
            else:
                data = bytes(page.data)
            if len(data) != expected:
                raise InvalidStateError(
                    f"Delta page {index} has {len(data)} bytes, expected {expected}"
                )
            seen[index] = data
        order = sorted(seen)
        return order, [seen[i] for i in order]

    def _check_key_policy(self, key: Optional[bytes]) -> None:
        """The digest fields are consistent and the key matches the delta's kind."""
        if self.keyed and self.digest_algorithm != "blake3":
            raise InvalidStateError(
                f"Delta is marked keyed but its digest is {self.digest_algorithm!r}, not a BLAKE3 MAC"
            )
        if self.keyed and key is None:
            raise InvalidStateError("Delta is authenticated (keyed BLAKE3): a key is needed to apply it")
        if key is not None and not self.keyed:
            raise InvalidStateError(
                "Delta is not authenticated but a key was given: refusing an unauthenticated delta"
            )
        if self.digest_algorithm is not None:
            size = DIGEST_SIZES.get(self.digest_algorithm)
            if size is None:
                raise InvalidStateError(f"Delta names an unknown digest algorithm {self.digest_algorithm!r}")
            if self.digest is None or len(self.digest) != size:
                raise InvalidStateError(
                    f"Delta {self.digest_algorithm} digest has {len(self.digest or b'')} bytes, expected {size}"
                )

    def apply(
        self,
        base: BufferLike,
        *,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        max_size: int = DEFAULT_MAX_GROW_SIZE,
    ) -> None:
        """Write the delta's pages into ``base``, after verifying everything.

        ``base`` is a writable buffer (bytearray, writable memoryview, writable mmap,
        numpy array) of exactly ``base_size`` bytes (``total_size`` unless the delta
        changes the state's size), or a shorter ``bytearray``, which reads as zeros past
        its end. A delta that changes the size (``base_size != total_size``, see
        ``create(..., resize=True)``) needs a ``bytearray`` base, which is grown with
        zeros or cut to ``total_size``; a longer base is an error. Before any write, the page indices (in range, unique), the
        page encodings and lengths, the checksum of the result and its strong digest (or
        MAC: pass ``key`` for a keyed delta) are verified; any failure raises
        :class:`InvalidStateError` saying which check failed, and ``base`` is left
        byte-for-byte unchanged (and not resized). A read-only buffer raises ``TypeError``.

        ``max_size`` (bytes, default :data:`DEFAULT_MAX_GROW_SIZE` = 1 GiB) bounds the
        size a short ``bytearray`` base may be grown to: a delta whose ``total_size`` is
        larger raises :class:`InvalidStateError` naming ``max_size`` before anything is
        read or allocated (a checksum-only delta's ``total_size`` is not authenticated by
        anything: its weak checksum ignores trailing zeros). A base that already has
        ``total_size`` bytes is written in place and is not bounded by it. If growing
        the base runs out of memory, the base is shrunk back to its old length and
        :class:`InvalidStateError` is raised (never a raw ``MemoryError``).

        ``progress`` is an event callback (RESTORING events, percent 0..100) or a
        callable taking ``(bytes_done, bytes_total)``; 100% is reported only once the
        pages are written.
        """
        raw_key = check_key(key)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"max_size must be an int >= 0 (bytes), got {max_size!r}")
        report = byte_reporter(progress, self.agent_id, ProgressEventKind.RESTORING)
        view = as_writable_view(base, "base")
        size, total = view.nbytes, self.total_size
        base_size = total if self.base_size is None else self.base_size
        if size > base_size:
            what = "state" if base_size == total else "base"
            raise InvalidStateError(
                f"Base state is larger than the delta's {what}: base has {size} bytes, delta expects {base_size}"
            )
        if size > total and not isinstance(base, bytearray):
            raise InvalidStateError(
                f"Delta shrinks the state from {size} to {total} bytes, and a {type(base).__name__} base "
                f"cannot be resized (use a bytearray)"
            )
        if size < total and not isinstance(base, bytearray):
            raise InvalidStateError(
                f"Base state is too small: base has {size} bytes, delta expects {total}, "
                f"and a {type(base).__name__} cannot be resized"
            )
        if size < total and total > max_size:
            raise InvalidStateError(
                f"Delta would grow the base from {size} to {total} bytes, over max_size={max_size} bytes "
                f"(pass a larger max_size to allow it)"
            )
        self._check_key_policy(raw_key)
        indices, pages = self._decoded_pages()
        hasher = None if self.digest_algorithm is None else Hasher(self.digest_algorithm, raw_key)
        result = Result(view, total, indices, pages)
        checksum = result.checks(hasher, before_end(report))
        value = None if hasher is None else hasher.digest()
        del result  # drops its views of the base, so a bytearray can grow
        if checksum != self.checksum:
            raise InvalidStateError(
                f"Delta checksum mismatch: the result would have checksum {checksum}, the delta says {self.checksum}"
            )
        if self.digest is not None and value is not None:
            if not hmac.compare_digest(value, self.digest):
                if self.keyed:
                    raise InvalidStateError(
                        "Delta authentication failed: BLAKE3 MAC mismatch (wrong key or tampered delta)"
                    )
                raise InvalidStateError(f"Delta {self.digest_algorithm} digest mismatch: the result is not the new state")
        # Everything checked: now (and only now) write.
        if size != total:
            view.release()
            if size < total:
                _grow_zeros(cast(bytearray, base), total)  # a bytearray (checked above)
            else:
                _shrink(cast(bytearray, base), total)
            view = as_writable_view(base, "base")
        kernels.scatter_pages(view, indices, pages, PAGE_SIZE)
        if report is not None:
            report(total, total)

    # -- sizes -------------------------------------------------------------------------

    def dirty_page_count(self) -> int:
        """Number of pages in the delta."""
        return len(self.dirty_pages)

    def compressed_size(self) -> int:
        """Sum of the stored (possibly compressed) page lengths."""
        return sum(len(p.data) for p in self.dirty_pages)

    def uncompressed_size(self) -> int:
        """``dirty_page_count() * PAGE_SIZE`` (the crate's reading)."""
        return len(self.dirty_pages) * PAGE_SIZE

    def compression_ratio(self) -> float:
        """``compressed_size() / uncompressed_size()``; 1.0 when there are no pages."""
        raw = self.uncompressed_size()
        return 1.0 if raw == 0 else self.compressed_size() / raw

    # -- wire --------------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The versioned, self-checking wire format (see docs/FORMAT.md)."""
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        if self.base_size is not None:
            # The wire format has no base_size field yet (the v2 bump adds it); shipping
            # such a delta would lose the size change. Refuse rather than mislead.
            raise InvalidStateError(
                f"This wire format cannot carry a delta that resizes the state "
                f"({self.base_size} -> {self.total_size} bytes)"
            )
        # cast: wire's DeltaLike protocol declares settable attributes, which mypy treats
        # as invariant (list[DirtyPage] vs Sequence[PageLike]); the shape is the agreed one.
        return bytes(wire.encode_delta(cast(Any, self)))

    @classmethod
    def deserialize(cls, data: BufferLike, *, max_total_size: Optional[int] = None) -> "DeltaSnapshot":
        """Parse :meth:`serialize` output; any malformed input raises ``CorruptDataError``.

        ``max_total_size`` bounds the declared state size (the wire module's default
        when ``None``), so a hostile header cannot announce an absurd state.
        """
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        if max_total_size is None:
            fields = wire.decode_delta(data)
        else:
            fields = wire.decode_delta(data, max_total_size=max_total_size)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            # The wire module checks every field; this is a second line of defence so a
            # hostile input can only ever surface as CorruptDataError.
            raise CorruptDataError(f"delta fields are inconsistent: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"DeltaSnapshot(agent_id={self.agent_id.hex()}, sequence={self.sequence}, "
            f"base_sequence={self.base_sequence}, dirty_pages=<{len(self.dirty_pages)} pages>, "
            f"total_size={self.total_size}, timestamp={self.timestamp}, checksum={self.checksum}, "
            f"digest_algorithm={self.digest_algorithm!r}, keyed={self.keyed}"
            + (f", base_size={self.base_size})" if self.base_size is not None else ")")
        )
