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
from dataclasses import dataclass, field, fields
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id
from ._pages import ALLOW_ALL, ALLOW_CRATE, ALLOW_XZR, DirtyPage, PageBatch, PageStore, choose_compression, encode_batch, parse_compress
from ._passes import ProgressCallback, Result, Scan, before_end, byte_reporter, scan, scatter
from ._types import BufferLike
from .checksum import DEFAULT_DIGEST, DIGEST_ALGORITHMS, DIGEST_SIZES, PAGE_SIZE, Hasher, check_key
from .errors import CorruptDataError, InvalidStateError
from .fingerprints import PageFingerprints
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
            A delta made by ``create`` lists them as the crate would (raw, or RLE when
            smaller: ``get_data()`` needs nothing else); one read by ``deserialize``
            lists them as shipped, so zero and XZR pages may appear: an XZR page is the
            XOR with its base page, and its ``get_data(base=...)`` needs that page (see
            :meth:`encoding_counts`). ``compressed_size()`` sums the list as it is, so
            the two can differ for equal deltas; ``stored_size()`` is what ships.
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
        header_digest: the digest (MAC when keyed) of every header field and the state
            digest (docs/FORMAT.md, "Header digest"); ``apply`` checks it when present.
            ``None`` for a checksum-only delta and for one read from wire version 1.
        compression: "zstd" when the serialized page payload is one zstd frame, else "none"
            (chosen by ``create``'s ``compress``; under the header digest).
        compression_level: the zstd level ``serialize`` uses (``None``: the default, 3).
        wire_version: the wire format ``serialize`` writes: 2, or 1 for a delta read from
            a version-1 input (so it re-encodes to the same bytes).
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
    header_digest: Optional[bytes] = None
    compression: str = "none"
    compression_level: Optional[int] = field(default=None, compare=False)
    wire_version: int = 2

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
        if self.compression not in ("none", "zstd"):
            raise ValueError(f"compression must be 'none' or 'zstd', not {self.compression!r}")
        if self.wire_version not in (1, 2):
            raise ValueError(f"wire_version must be 1 or 2, not {self.wire_version!r}")
        if self.header_digest is not None:
            self.header_digest = bytes(self.header_digest)
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
        old_state: Optional[BufferLike],
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        *,
        digest: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        resize: bool = False,
        compress: str = "auto",
        fingerprints: Optional[PageFingerprints] = None,
    ) -> "DeltaSnapshot":
        """Diff two states page by page (of equal lengths unless ``resize``).

        ``old_state=None`` stands for zeros of ``new_state``'s length, never allocated (a
        first delta, which carries every non-zero page; it applies to a zero-filled base).
        Both states are read in place (any C-contiguous buffer); only the dirty pages
        are copied, each in the smallest of the encodings ``compress`` allows (kept only
        when strictly smaller than the raw page): "auto" (the default) and "xor" allow
        zero pages, XOR-with-the-base (XZR) and RLE; "rle" the crate's RLE only; "none"
        raw pages only; "zstd" or "zstd:LEVEL" XZR/RLE pages in one zstd frame. "auto"
        also compresses the page payload with zstd when a sample shows that it wins. A
        checksum-only delta (``digest=None``) keeps the crate's encodings under "auto"
        (RLE or raw, byte-compatible with it); XZR, which needs the base that only a
        strong digest proves, is refused for it.
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

        ``fingerprints`` (:class:`~cellmigrate.PageFingerprints` of ``old_state``, of the
        states' one size; ``InvalidStateError`` otherwise, and ``ValueError`` with
        ``old_state=None``: a table needs the state it describes): with the default digest,
        create then reads ``new_state`` once and ``old_state`` only under the pages whose
        fingerprint changed (half the memory traffic of comparing both); on success it
        updates the table to the state the delta describes, the next round's base. A page
        whose fingerprint matches is taken as unchanged: where the table does not describe
        ``old_state``, :meth:`apply` refuses the delta on it (the digest covers the new
        state as read), never writing a wrong state. Other digests read both states as
        usual (and update the table); a checksum-only delta never trusts the table, its
        32-bit checksum being too weak to catch a page left out.

        ``progress`` is an event callback (like :class:`~cellmigrate.CollectingCallback`;
        it receives CAPTURING_STATE events, percent 0..100) or a callable taking
        ``(bytes_done, bytes_total)``; it is called from this thread between chunks.
        """
        agent = to_id(agent_id, "agent_id")
        report = byte_reporter(progress, agent, ProgressEventKind.CAPTURING_STATE)
        if fingerprints is not None and not isinstance(fingerprints, PageFingerprints):
            raise TypeError(f"fingerprints must be a PageFingerprints, not {type(fingerprints).__name__}")
        if fingerprints is not None and old_state is None:
            # Reported as "the states have 0 and N bytes" before: say what is missing.
            raise ValueError("fingerprints describe old_state: pass the state they were taken of, not None")
        delta, _ = cls._create_checked(
            agent, old_state, new_state, base_sequence, sequence, digest, key, report, resize=resize,
            compress=compress, fingerprints=fingerprints,
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
        compress: str = "auto",
        fingerprints: Optional[PageFingerprints] = None,
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
        plan = parse_compress(compress, digest=algorithm is not None)
        return cls._create(
            agent, old_state, new_state, base_sequence, sequence, algorithm, raw_key, progress, resize, plan,
            fingerprints,
        )

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
        plan: Tuple[int, Optional[int], bool] = (ALLOW_CRATE, None, False),
        fingerprints: Optional[PageFingerprints] = None,
    ) -> Tuple["DeltaSnapshot", Scan]:
        """``create`` that also returns what the scan found: the dirty pages as copied,
        which the delta describes (the tracker keeps them as its next base). ``plan`` is
        :func:`~cellmigrate._pages.parse_compress`'s (allowed encodings, zstd level, auto);
        ``fingerprints``: :meth:`create`'s (``old_state`` given), updated on success."""
        old = memoryview(b"") if old_state is None else as_bytes_view(old_state, "old_state")
        new = as_bytes_view(new_state, "new_state")
        # None: zeros of the new length (an empty base reads as zeros), never allocated.
        base_size = new.nbytes if old_state is None else old.nbytes
        if base_size != new.nbytes and not resize:
            raise InvalidStateError(
                f"State sizes must match for delta (size mismatch: old state has {old.nbytes} bytes, "
                f"new state has {new.nbytes} bytes; resize=True makes a delta between them)"
            )
        if fingerprints is not None:
            fingerprints._check_covers(old, new)
        hasher = None if algorithm is None else Hasher(algorithm, key)
        allowed, level, auto = plan
        # Only a digest proves what a table left out: without one, both states are compared.
        table = fingerprints.values if fingerprints is not None and algorithm is not None else None
        found = scan(old, new, hasher, progress, xzr_hints=bool(allowed & ALLOW_XZR), fingerprints=table,
                     base_checksum=None if fingerprints is None else fingerprints.checksum)
        # Encoded from the pages as the scan copied them (never a second read of new).
        batch = encode_batch(old, found.pages, found.indices, allowed, found.xzr_hints)
        compression, payload = choose_compression(batch, level, auto)
        value = None if hasher is None else hasher.digest()
        if hasher is not None and hasher.splittable:
            found.leaves = hasher.leaves()  # the new state's leaf table, for free
        delta = cls(
            agent_id=agent,
            sequence=sequence,
            base_sequence=base_sequence,
            dirty_pages=cast(Any, PageStore(batch, found.pages)),  # dirty_pages lists it when asked
            total_size=new.nbytes,
            timestamp=_now(),
            checksum=found.checksum,
            digest_algorithm=algorithm,
            digest=value,
            keyed=key is not None,
            base_size=base_size,
            compression=compression,
            compression_level=level,
        )
        delta._seal(key)
        batch.frame = payload  # serialize writes this frame (chosen here, under the header digest)
        if fingerprints is not None:  # last: a create that failed leaves the table as it was
            fingerprints._advance(found.indices, found.pages, found.fingerprints, found.table_checksum)
        return delta, found

    def _seal(self, key: Optional[bytes]) -> None:
        """Set :attr:`header_digest` from the header fields and the state digest."""
        if self.digest_algorithm is None or self.digest is None:
            self.header_digest = None
            return
        from .wire import header_digest

        self.header_digest = header_digest(
            algorithm=self.digest_algorithm, keyed=self.keyed, compression=self.compression,
            agent_id=self.agent_id, sequence=self.sequence, base_sequence=self.base_sequence,
            total_size=self.total_size, base_size=self._base_size(), timestamp=self.timestamp,
            checksum=self.checksum, state_digest=self.digest, key=key,
        )

    def _base_size(self) -> int:
        return self.total_size if self.base_size is None else self.base_size

    # -- pages ---------------------------------------------------------------------------

    def _page_batch(self, error: Optional[type] = InvalidStateError) -> PageBatch:
        """The pages as one batch: the one the delta holds, or (once ``dirty_pages`` was
        handed out and changed) one made from the list's current pages; what cannot be a
        page raises ``error`` (``None``: ``TypeError``/``ValueError``)."""
        return cast(PageStore, self.__dict__["_store"]).batch(error)

    # -- apply -------------------------------------------------------------------------

    def _decoded_pages(self, view: memoryview) -> Tuple[npt.NDArray[np.int64], Sequence[BufferLike]]:
        """Indices (sorted) and raw bytes of every page, all checked; XZR pages are decoded
        over ``view`` (the base, only read). Raises InvalidStateError naming the page."""
        store = cast(PageStore, self.__dict__["_store"])
        raw = store.raw_pages()
        if raw is not None:
            # Made by create and untouched: the pages as the scan copied them (checked
            # there), so applying is idempotent like the crate's, and nothing is decoded.
            indices, pages = raw
            if len(indices) and int(indices[-1]) * PAGE_SIZE >= self.total_size:
                raise InvalidStateError(f"Delta page {int(indices[-1])} is out of range for a state of "
                                        f"{self.total_size} bytes")
            if len(indices) and len(pages[-1]) != min(PAGE_SIZE, self.total_size - int(indices[-1]) * PAGE_SIZE):
                raise InvalidStateError(f"Delta page {int(indices[-1])} has {len(pages[-1])} bytes, expected "
                                        f"{min(PAGE_SIZE, self.total_size - int(indices[-1]) * PAGE_SIZE)}")
            return indices, pages
        if store.current_batch() is None:
            for page in store.listed():
                if not isinstance(page, DirtyPage):
                    raise InvalidStateError(f"Delta page list holds a {type(page).__name__}, not a DirtyPage")
        batch = self._page_batch().sorted_unique(InvalidStateError)
        decoded = batch.decode(view, self.total_size, ALLOW_ALL, error=InvalidStateError)
        return decoded.indices, decoded.views()

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

    def _check_header_digest(self, state_digest: bytes, key: Optional[bytes]) -> None:
        """Every header field is what the delta's creator sealed (version 2)."""
        if self.header_digest is None:
            return  # version 1 (keyed ones only by opt-in) or built by hand: no header digest
        from .wire import header_digest

        try:
            expected = header_digest(
                algorithm=self.digest_algorithm, keyed=self.keyed, compression=self.compression,
                agent_id=self.agent_id, sequence=self.sequence, base_sequence=self.base_sequence,
                total_size=self.total_size, base_size=self._base_size(), timestamp=self.timestamp,
                checksum=self.checksum, state_digest=state_digest, key=key,
            )
        except ValueError as exc:
            raise InvalidStateError(f"Delta header cannot be verified: {exc}") from None
        if not hmac.compare_digest(expected, self.header_digest):
            if self.keyed:
                raise InvalidStateError(
                    "Delta authentication failed: the header MAC does not match (agent id, sequence, base "
                    "sequence, timestamp, sizes or compression changed, or a wrong key)"
                )
            raise InvalidStateError(
                f"Delta {self.digest_algorithm} header digest mismatch: a header field (agent id, sequence, "
                f"base sequence, timestamp, sizes, compression) is not what the delta was made with"
            )

    def apply(
        self,
        base: BufferLike,
        *,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        max_size: int = DEFAULT_MAX_GROW_SIZE,
        resized: bool = False,
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
        Nothing else may write ``base`` during the call: what is written is what was
        verified, and a page's 64-byte lines that already hold the delta's bytes are not
        rewritten.

        ``max_size`` (bytes, default :data:`DEFAULT_MAX_GROW_SIZE` = 1 GiB) bounds the
        size a short ``bytearray`` base may be grown to: a delta whose ``total_size`` is
        larger raises :class:`InvalidStateError` naming ``max_size`` before anything is
        read or allocated (a checksum-only delta's ``total_size`` is not authenticated by
        anything: its weak checksum ignores trailing zeros). A base that already has
        ``total_size`` bytes is written in place and is not bounded by it. If growing
        the base runs out of memory, the base is shrunk back to its old length and
        :class:`InvalidStateError` is raised (never a raw ``MemoryError``).

        ``resized=True`` says the caller already resized ``base`` to ``total_size`` (grown
        with zeros or cut), as a file is before it is mapped: ``base`` must then have
        ``total_size`` bytes, whatever ``base_size`` is (it is still checked under the
        header digest). ``cellmigrate.journal`` applies resizing deltas to files this way.

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
        base_size = total if self.base_size is None or resized else self.base_size
        if resized and size != total:
            raise InvalidStateError(
                f"Base state was to be resized to the delta's {total} bytes, but has {size} bytes"
            )
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
        indices, pages = self._decoded_pages(view)
        hasher = None if self.digest_algorithm is None else Hasher(self.digest_algorithm, raw_key)
        result = Result(view, total, cast(Any, indices), cast(Any, pages))
        checksum = result.checks(hasher, before_end(report))
        value = None if hasher is None else hasher.digest()
        changed = result.changed  # the lines that differ from the base (or None: every line)
        del result  # drops its views of the base, so a bytearray can grow
        if checksum != self.checksum:
            grown = f" (the base's {size} bytes were zero-extended to {total}: is it this delta's base?)" if size < total else ""
            raise InvalidStateError(
                f"Delta checksum mismatch: the result would have checksum {checksum}, the delta says {self.checksum}"
                + grown
            )
        if self.digest is not None and value is not None:
            if not hmac.compare_digest(value, self.digest):
                if self.keyed:
                    raise InvalidStateError(
                        "Delta authentication failed: BLAKE3 MAC mismatch (wrong key or tampered delta)"
                    )
                raise InvalidStateError(f"Delta {self.digest_algorithm} digest mismatch: the result is not the new state")
            self._check_header_digest(value, raw_key)
        # Everything checked: now (and only now) write.
        if size != total:
            view.release()
            if size < total:
                _grow_zeros(cast(bytearray, base), total)  # a bytearray (checked above)
            else:
                _shrink(cast(bytearray, base), total)
            view = as_writable_view(base, "base")
        scatter(view, np.asarray(indices, dtype=np.int64), pages, changed if size == total else None)
        if report is not None:
            report(total, total)

    # -- sizes -------------------------------------------------------------------------

    def dirty_page_count(self) -> int:
        """Number of pages in the delta."""
        return cast(PageStore, self.__dict__["_store"]).count()

    def compressed_size(self) -> int:
        """Sum of the ``dirty_pages``' data lengths (the crate's reading: for a delta made by
        :meth:`create`, its pages RLE-compressed when that is smaller). What the pages take
        on the wire, with zero and XZR pages, is :meth:`stored_size`."""
        return cast(PageStore, self.__dict__["_store"]).listed_size()

    def stored_size(self) -> int:
        """Bytes of page data as the pages are shipped (every encoding: see :meth:`encoding_counts`)."""
        return cast(PageStore, self.__dict__["_store"]).stored_size()

    def uncompressed_size(self) -> int:
        """``dirty_page_count() * PAGE_SIZE`` (the crate's reading)."""
        return self.dirty_page_count() * PAGE_SIZE

    def encoding_counts(self) -> Dict[str, Tuple[int, int]]:
        """``{encoding: (pages, stored bytes)}`` for each page encoding ("raw", "rle",
        "zero", "xzr"; every one listed, zeros included)."""
        return self._page_batch().counts()

    def compression_ratio(self) -> float:
        """``compressed_size() / uncompressed_size()``; 1.0 when there are no pages."""
        raw = self.uncompressed_size()
        return 1.0 if raw == 0 else self.compressed_size() / raw

    # -- wire --------------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The versioned, self-checking wire format (see docs/FORMAT.md)."""
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        # cast: wire's DeltaLike protocol declares settable attributes, which mypy treats
        # as invariant (list[DirtyPage] vs Sequence[PageLike]); the shape is the agreed one.
        return bytes(wire.encode_delta(cast(Any, self)))

    def write_to(self, fileobj: IO[bytes]) -> int:
        """Write :meth:`serialize`'s bytes to a binary file object (anything with
        ``write``: a file, a pipe, a socket file) piece by piece, without building them in
        memory; returns the number of bytes written. A raw file object that takes part of
        a write is given the rest; one that would block (non-blocking) raises
        ``BlockingIOError``, and what it took is a prefix any reader refuses."""
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        return int(wire.write_delta(cast(Any, self), fileobj))

    @classmethod
    def deserialize(
        cls, data: BufferLike, *, max_total_size: Optional[int] = None, allow_legacy_keyed: bool = False
    ) -> "DeltaSnapshot":
        """Parse :meth:`serialize` output; any malformed input raises ``CorruptDataError``.

        ``max_total_size`` bounds the declared state size (the wire module's default
        when ``None``), so a hostile header cannot announce an absurd state. A read-only
        ``data`` (``bytes``, an ``mmap`` opened for reading) is held without a copy: the
        delta's pages are views into it. A keyed delta in wire version 1 (whose header
        fields are not under its MAC) is refused unless ``allow_legacy_keyed=True``.
        """
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        limit = wire.DEFAULT_MAX_TOTAL_SIZE if max_total_size is None else max_total_size
        fields = wire.decode_delta(data, max_total_size=limit, allow_legacy_keyed=allow_legacy_keyed)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            # The wire module checks every field; this is a second line of defence so a
            # hostile input can only ever surface as CorruptDataError.
            raise CorruptDataError(f"delta fields are inconsistent: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"DeltaSnapshot(agent_id={self.agent_id.hex()}, sequence={self.sequence}, "
            f"base_sequence={self.base_sequence}, dirty_pages=<{self.dirty_page_count()} pages>, "
            f"total_size={self.total_size}, timestamp={self.timestamp}, checksum={self.checksum}, "
            f"digest_algorithm={self.digest_algorithm!r}, keyed={self.keyed}"
            + (f", base_size={self.base_size})" if self.base_size is not None else ")")
        )


def _get_dirty_pages(self: DeltaSnapshot) -> List[DirtyPage]:
    """The dirty pages as a list of :class:`DirtyPage` (index and stored bytes), ascending (SPEC §4's view; built when first asked for)."""
    return cast(PageStore, self.__dict__["_store"]).listed()


def _set_dirty_pages(self: DeltaSnapshot, value: Any) -> None:
    self.__dict__["_store"] = value if isinstance(value, PageStore) else PageStore(value)


def _eq(self: DeltaSnapshot, other: object) -> bool:
    if not isinstance(other, DeltaSnapshot):
        return cast(bool, NotImplemented)
    if any(getattr(self, f) != getattr(other, f) for f in _COMPARED):
        return False
    return bool(cast(PageStore, self.__dict__["_store"]).same_pages(cast(PageStore, other.__dict__["_store"])))


# dirty_pages is a dataclass field (constructor argument, equality) read and written
# through this property, so the pages can stay in one batch until someone asks for them.
DeltaSnapshot.dirty_pages = property(_get_dirty_pages, _set_dirty_pages)  # type: ignore[assignment]
_COMPARED = [f.name for f in fields(DeltaSnapshot) if f.compare and f.name != "dirty_pages"]
DeltaSnapshot.__eq__ = _eq  # type: ignore[method-assign,assignment]
