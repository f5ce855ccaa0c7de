"""A round's pages in bounded chunks: scan, copy once, digest the copy, encode; and back.

A round compares the agent's live state with the *shadow* (the state the receiver has
committed) page by page, a region at a time, and copies each dirty page once. The copy
is what the chunk's digest covers and what the receiver writes, never a second read of
the live buffer, so a page the agent rewrites after it was copied is simply dirty again
next round. Round 0 compares against an all-zero shadow: zero pages are never sent (the
receiver's staging starts zero-filled), the rest go LZ4-compressed when that pays.

A chunk holds at most ``chunk_bytes`` of pages (8 MiB by default), the unit a receiver
verifies and commits atomically and the most a dropped connection can cost.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Union

import lz4.block as _lz4_block
import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from .._backend import kernels
from .._buffers import as_bytes_view
from .._pages import ALLOW_ALL, ALLOW_RAW, ALLOW_XZR, ALLOW_ZERO, PageBatch, PageEncoding, encode_batch
from ..checksum import PAGE_SIZE
from ..compare import dirty_pages
from ..errors import CorruptDataError
from .page_cache import PageCache

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "MAX_CHUNK_BYTES",
    "Encoding",
    "Chunk",
    "scan_chunks",
    "BufferPool",
    "copy_pages",
    "encode_pages",
    "decode_pages",
    "base_pages",
    "pages_digest",
    "chunk_digest",
    "placed_digest",
    "write_pages",
]

#: Pages per chunk, in bytes: what a cut can cost, and the sender's copy buffer.
DEFAULT_CHUNK_BYTES = 8 << 20
#: The largest chunk any peer may send (a receiver refuses bigger ones before reading them).
MAX_CHUNK_BYTES = 64 << 20

# Region of the state compared per kernel call: small enough that a chunk's pages are
# copied soon after they were found dirty, big enough to use the threads.
_SCAN_BYTES = 32 << 20
# Bytes of a chunk trial-compressed to decide whether LZ4 is worth it for the whole chunk.
_PROBE_BYTES = 64 << 10
_MIN_GAIN = 0.9  # compress only when the probe shrinks below 90 %
_PAGE_DTYPE = np.dtype(("V", PAGE_SIZE))

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


class Encoding(enum.IntEnum):
    """How a chunk's page bytes travel: as they are, as one LZ4 block, or page by page in
    the delta encodings (``PAGES``: raw, RLE, zero, or XZR over the receiver's page; the
    sender uses it for chunks with pages in its :class:`~cellmigrate.live.page_cache.PageCache`)."""

    RAW = 0
    LZ4 = 1
    PAGES = 2


@dataclass
class Chunk:
    """A batch of a round's pages: the unit sent, verified, committed and acknowledged.

    ``seq`` counts chunks over the whole migration from 1; ``size`` is the state's length
    in this round (the receiver resizes to it before writing); ``indices`` are ascending
    page numbers; ``payload`` is the pages' bytes (the last page of the state may be
    short) encoded with ``encoding``; ``digest`` is the page root of the raw page bytes as
    the sender copied them (:func:`pages_digest`), or, when ``placed`` (a chunk read off a
    protocol-version-4 connection), that root bound to where the pages go
    (:func:`placed_digest`). ``pages`` keeps the raw copy on the sender until
    acknowledged, ``digests`` its page digests.
    """

    seq: int
    round: int
    size: int
    indices: I64Array
    encoding: Encoding
    payload: Union[bytes, memoryview]
    raw_len: int
    digest: bytes
    pages: Optional[U8Array] = field(default=None, repr=False, compare=False)
    #: The ``(pages, 16)`` XXH3-128 digests of ``pages`` (sender side, when known).
    digests: Optional["npt.NDArray[np.uint8]"] = field(default=None, repr=False, compare=False)
    #: ``digest`` covers the placement too (:func:`placed_digest`), not only the pages.
    placed: bool = False

    def digest_for(self, root: bytes) -> bytes:
        """The digest this chunk must carry when its pages' page root is ``root``."""
        return placed_digest(root, self.seq, self.round, self.size, self.indices) if self.placed else root

    @property
    def wire_len(self) -> int:
        """Bytes of payload on the wire."""
        return len(self.payload)


def pages_len(indices: I64Array, size: int) -> int:
    """Bytes of the pages at ``indices`` of a ``size``-byte state (the last may be short)."""
    n = len(indices)
    if n == 0:
        return 0
    tail = size - int(indices[-1]) * PAGE_SIZE
    return (n - 1) * PAGE_SIZE + min(tail, PAGE_SIZE)


def _rows(array: U8Array, pages: int) -> "npt.NDArray[np.void]":
    """The first ``pages`` whole pages of a flat byte array as one 4 KiB item each."""
    return array[: pages * PAGE_SIZE].view(_PAGE_DTYPE)


def _run(indices: I64Array) -> bool:
    """Whether ascending ``indices`` are one run of consecutive pages."""
    n = len(indices)
    return n > 0 and int(indices[-1]) - int(indices[0]) == n - 1


def copy_pages(state: U8Array, indices: I64Array, size: int, into: Optional[U8Array] = None) -> U8Array:
    """One contiguous copy of ``state``'s pages at ``indices`` (ascending, validated),
    written into the front of ``into`` when given (big enough), else a new array."""
    full = size // PAGE_SIZE
    n = len(indices)
    length = pages_len(indices, size)
    out: U8Array = np.empty(length, dtype=np.uint8) if into is None else into[:length]
    if _run(indices):  # one run (round 0 of dense data): a plain slice copy
        lo = int(indices[0]) * PAGE_SIZE
        out[:] = state[lo : lo + length]
        return out
    body = n - 1 if n and int(indices[-1]) >= full else n
    if body:
        # One item per page and mode="clip" (no bounds re-check, no buffering): a memcpy
        # per page, ~10x faster than taking rows of a 2-D uint8 view.
        np.take(_rows(state, full), indices[:body], out=_rows(out, body), mode="clip")
    if body < n:
        out[body * PAGE_SIZE :] = state[full * PAGE_SIZE : size]
    return out


def write_pages(state: U8Array, indices: I64Array, pages: U8Array, size: int) -> None:
    """Inverse of :func:`copy_pages`: write the pages into ``state`` (``size`` bytes)."""
    full = size // PAGE_SIZE
    n = len(indices)
    if _run(indices):
        lo = int(indices[0]) * PAGE_SIZE
        state[lo : lo + pages.nbytes] = pages
        return
    body = n - 1 if n and int(indices[-1]) >= full else n
    if body:
        _rows(state, full)[indices[:body]] = _rows(pages, body)
    if body < n:
        state[full * PAGE_SIZE : size] = pages[body * PAGE_SIZE :]


def pages_digest(pages: Union[bytes, memoryview, U8Array], threads: Optional[int] = None) -> bytes:
    """A chunk's ``digest``: the page root of its raw page bytes (each 4 KiB page's
    XXH3-128, the last page possibly short, then the length: ``xxh3_128_tree`` with 4 KiB
    leaves, see :func:`chunk_digest`). Both sides keep these page digests anyway (the
    receiver's page table, the sender's scan), so a chunk is verified without hashing
    its pages a second time."""
    from .leaves import page_digests  # leaves imports this module

    view = as_bytes_view(pages, "pages")
    return chunk_digest(page_digests(view, threads), view.nbytes)


def chunk_digest(digests: "npt.NDArray[np.uint8]", raw_len: int) -> bytes:
    """A chunk's ``digest`` from the ``(pages, 16)`` XXH3-128 digests of its pages, in
    order, and its ``raw_len``: ``XXH3-128(d_0 || ... || d_{n-1} || u64le(raw_len))``."""
    from .leaves import page_root

    return bytes(page_root(digests, raw_len))


_PLACEMENT = struct.Struct("<QIQ")


def placed_digest(root: bytes, seq: int, round_no: int, size: int, indices: I64Array) -> bytes:
    """A version-4 chunk's ``digest``: its pages' page ``root`` (:func:`chunk_digest`)
    bound to where they go, ``XXH3-128(root || u64le(seq) || u32le(round) ||
    u64le(size) || u64le(i_0) || ... || u64le(i_{n-1}))`` over the page ``indices``, so a
    chunk whose header or index runs changed in transit fails its own digest, before
    anything is staged (docs/PROTOCOL.md, "CHUNK")."""
    h = _xxhash.xxh3_128(root)
    h.update(_PLACEMENT.pack(seq, round_no, size))
    if len(indices):
        h.update(np.ascontiguousarray(indices, dtype="<u8").tobytes())
    return h.digest()


#: Pages of a PAGES chunk: raw, zero or XZR (RLE is left to LZ4, which the whole chunk
#: may get instead: trying it cost 1.1 us a random page, as much as the rest together).
_PAGES_ALLOWED = ALLOW_RAW | ALLOW_ZERO | ALLOW_XZR


def encode_pages(
    pages: U8Array,
    compress: bool = True,
    *,
    indices: Optional[I64Array] = None,
    cache: Optional[PageCache] = None,
    min_hits: float = 0.0,
) -> "tuple[Encoding, Union[bytes, memoryview]]":
    """The smallest of: the raw bytes (not copied); one LZ4 block, when a probe of the
    chunk shows it pays; and, when ``cache`` holds more than ``min_hits`` (a fraction)
    of the pages at ``indices``, the ``PAGES`` form (XZR over the cached copies, the other
    pages raw or zero)."""
    raw = as_bytes_view(pages, "pages")
    best: "tuple[Encoding, Union[bytes, memoryview]]" = (Encoding.RAW, raw)
    if compress and raw.nbytes >= 512:
        probe = raw[:_PROBE_BYTES]
        if len(_lz4_block.compress(probe, store_size=False)) < _MIN_GAIN * probe.nbytes:
            packed = _lz4_block.compress(raw, store_size=False)
            if len(packed) < raw.nbytes:
                best = (Encoding.LZ4, packed)
    if cache is not None and indices is not None and len(indices):
        paged = _encode_paged(raw, indices, cache, min_hits)
        if paged is not None and len(paged) < len(best[1]):
            best = (Encoding.PAGES, paged)
    return best


def _encode_paged(raw: memoryview, indices: I64Array, cache: PageCache, min_hits: float) -> Optional[bytes]:
    """The ``PAGES`` payload of a chunk (``u8 encodings[n] | u32le stored lengths[n] |
    stored pages``), or None when no more than ``min_hits`` of its pages are cached."""
    slots = cache.slots(indices)
    hit = slots >= 0
    hits = int(np.count_nonzero(hit))
    if not hits or hits <= min_hits * len(indices):
        return None
    n = len(indices)
    # Encoded over the cache itself: page k's base is its slot (a page not cached may not
    # go XZR, its receiver's copy being unknown: its "slot" 0 is never read).
    hints = np.where(hit, kernels.XZR_HINT_UNKNOWN, kernels.XZR_HINT_NO_WIN).astype(np.uint16)
    rows = [raw[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] for k in range(n)]
    batch = encode_batch(cache.data, rows, np.where(hit, slots, 0), _PAGES_ALLOWED, hints)
    payload = batch.payload if isinstance(batch.payload, bytes) else bytes(batch.payload)
    return b"".join((batch.encodings.astype(np.uint8).tobytes(), batch.stored_lengths().astype("<u4").tobytes(), payload))


def decode_pages(
    encoding: int, payload: Union[bytes, memoryview], raw_len: int, *, base: Optional[U8Array] = None
) -> Union[bytes, memoryview]:
    """The raw page bytes of a chunk, exactly ``raw_len`` of them (``CorruptDataError`` else).

    A ``PAGES`` chunk needs ``base``: the receiver's copies of the chunk's XZR pages laid
    out as the chunk (page k at ``k * 4096``; see :func:`base_pages`), what they XOR into.
    Its table and every page are checked as strictly as a delta's pages as they are
    decoded, into new memory (the receiver stages nothing before the chunk's digest matched)."""
    if encoding == Encoding.RAW:
        data: Union[bytes, memoryview] = payload
    elif encoding == Encoding.LZ4:
        if raw_len > 255 * len(payload) + 64:
            raise CorruptDataError(f"LZ4 chunk declares {raw_len} bytes, more than {len(payload)} bytes can hold")
        try:
            data = _lz4_block.decompress(payload, uncompressed_size=raw_len)
        except _lz4_block.LZ4BlockError as exc:
            raise CorruptDataError(f"corrupt LZ4 chunk: {exc}") from None
    elif encoding == Encoding.PAGES:
        if base is None:
            raise ValueError("a PAGES chunk decodes over the receiver's copies of its pages")
        data = _decode_paged(as_bytes_view(payload, "payload"), raw_len, base)
    else:
        raise CorruptDataError(f"unknown chunk encoding {encoding}")
    if len(data) != raw_len:
        raise CorruptDataError(f"chunk decodes to {len(data)} bytes, expected {raw_len}")
    return data


def _decode_paged(payload: memoryview, raw_len: int, base: U8Array) -> memoryview:
    n = -(-raw_len // PAGE_SIZE)
    table = 5 * n
    if payload.nbytes < table:
        raise CorruptDataError(f"PAGES chunk of {n} pages has {payload.nbytes} bytes, under its {table}-byte table")
    encodings = np.frombuffer(payload, dtype=np.uint8, count=n)
    lengths = np.frombuffer(payload, dtype="<u4", count=n, offset=n).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if int(offsets[-1]) != payload.nbytes - table:
        raise CorruptDataError(
            f"PAGES chunk table declares {int(offsets[-1])} bytes of pages, the chunk holds {payload.nbytes - table}"
        )
    # Local page numbers over `base` (laid out like the chunk), as the sender encoded them.
    batch = PageBatch(np.arange(n, dtype=np.int64), encodings, offsets, payload[table:])
    decoded = batch.decode(base, raw_len, ALLOW_ALL, error=CorruptDataError)
    return as_bytes_view(decoded.buffer, "pages")[:raw_len]


def base_pages(
    state: U8Array, indices: I64Array, payload: Union[bytes, memoryview], out: Optional[U8Array] = None
) -> U8Array:
    """The base a ``PAGES`` chunk's ``payload`` decodes over: for each of its XZR pages, the
    page of ``state`` at its index (zeros past the end of ``state``), at ``k * 4096`` for
    the chunk's k-th page; other rows hold anything (they are never read).

    Built in ``out`` when it holds the chunk's pages (a receiver reuses one: fresh memory
    costs a VM a page fault a page), else in a new array; either way a copy that holds no
    view of ``state``. A table too short for the pages reads as no XZR page (the
    decoder refuses it)."""
    n = len(indices)
    need = n * PAGE_SIZE
    flat = out[:need] if out is not None and out.nbytes >= need else np.empty(need, dtype=np.uint8)
    if len(payload) < n:
        return flat
    xzr = np.frombuffer(payload, dtype=np.uint8, count=n) == PageEncoding.XZR
    if not xzr.any():
        return flat
    have = state.nbytes
    full = have // PAGE_SIZE
    inside = indices < full
    # Every row in one take (a row of a page that is not XZR is copied for nothing, but
    # no temporary is made: fresh memory costs a VM a page fault a page); one 4 KiB item
    # a page and mode="clip" (indices checked): a memcpy a page, unbuffered.
    if full:
        np.take(_rows(state, full), np.where(inside, indices, 0), out=_rows(flat, n), mode="clip")
    rows = flat.reshape(n, PAGE_SIZE)
    for k in np.flatnonzero(xzr & ~inside).tolist():  # the short last page, or past the end
        start = int(indices[k]) * PAGE_SIZE
        tail = state[start:have] if start < have else state[:0]
        rows[k, : tail.nbytes] = tail
        rows[k, tail.nbytes :] = 0
    return flat


class BufferPool:
    """Reusable chunk-sized copy buffers: fresh memory costs a page fault per 4 KiB on
    first touch (a GiB round would pay ~262k of them for buffers it throws away)."""

    def __init__(self, chunk_bytes: int, keep: int = 8) -> None:
        self.chunk_bytes, self.keep = chunk_bytes, keep
        self._free: List[U8Array] = []

    def take(self) -> U8Array:
        """A buffer of ``chunk_bytes`` (reused when one was given back)."""
        return self._free.pop() if self._free else np.empty(self.chunk_bytes, dtype=np.uint8)

    def give(self, pages: U8Array) -> None:
        """Return the buffer a chunk's ``pages`` view (from :meth:`take`) lives in."""
        base = pages.base if isinstance(pages.base, np.ndarray) else None
        if base is not None and base.nbytes == self.chunk_bytes and base.ndim == 1 and len(self._free) < self.keep:
            self._free.append(base)


def scan_chunks(
    state: U8Array,
    shadow: Optional[U8Array],
    *,
    round_no: int,
    first_seq: int,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    compress: bool = True,
    threads: Optional[int] = None,
    stable: bool = False,
    pool: Optional["BufferPool"] = None,
    find: Optional[Callable[[int, int], I64Array]] = None,
    known: Optional["npt.NDArray[np.uint8]"] = None,
    cache: Optional[PageCache] = None,
    cache_min_hits: float = 0.0,
) -> Iterator[Chunk]:
    """Yield the chunks of one round: ``state``'s pages that differ from ``shadow``.

    Both are flat ``uint8`` arrays of the round's size; instead of a shadow, ``find(lo,
    hi)`` may name the dirty pages of each region ``[lo, hi)`` of the state (ascending
    page numbers of the whole state; the driver compares page digests). Every round yields at least one
    chunk (possibly empty) so the receiver learns the round's size. Pages are copied out
    of ``state`` when their chunk is built, digested and encoded from that copy; with
    ``stable`` (the agent is paused: nothing writes the state) a run of consecutive pages
    is sent from the state itself, uncopied. Copies go into buffers from ``pool`` (give
    them back with :meth:`BufferPool.give` once acknowledged). Each chunk's ``digests``
    are its pages' XXH3-128 digests: hashed from the copy, or with ``stable`` taken from
    ``known`` (the ``(pages, 16)`` digests of the whole paused state, as its scan hashed
    them) so a stop-and-copy reads the state once for hashing, not twice. With ``cache``,
    a chunk holding cached pages (more than ``cache_min_hits`` of them, a fraction) may go
    as ``PAGES`` (XZR over the cached copies), and the pages a delta round (``round_no``
    >= 1, not ``stable``) sends enter the cache.
    """
    size = state.nbytes
    per_chunk = max(1, chunk_bytes // PAGE_SIZE)
    seq = first_seq
    pending: list[I64Array] = []
    count = 0

    def build(indices: I64Array) -> Chunk:
        nonlocal seq
        from .leaves import page_digests, pages_with_digests  # leaves imports this module

        digests: Optional["npt.NDArray[np.uint8]"] = None
        if stable and _run(indices):
            lo = int(indices[0]) * PAGE_SIZE
            pages = state[lo : lo + pages_len(indices, size)]
        elif stable and known is not None:
            pages = copy_pages(state, indices, size, pool.take() if pool is not None else None)
        else:  # copied and hashed in one pass (one GIL-free call)
            pages, digests = pages_with_digests(state, indices, size, pool.take() if pool is not None else None, threads)
        encoding, payload = encode_pages(pages, compress, indices=indices, cache=cache, min_hits=cache_min_hits)
        if cache is not None and round_no >= 1 and not stable:
            cache.store(indices, pages, size)
        if digests is None:
            digests = known[indices] if stable and known is not None else page_digests(pages, threads)
        chunk = Chunk(
            seq, round_no, size, indices, encoding, payload, pages.nbytes, chunk_digest(digests, pages.nbytes), pages, digests
        )
        seq += 1
        return chunk

    emitted = False
    for lo in range(0, size, _SCAN_BYTES):
        hi = min(lo + _SCAN_BYTES, size)
        if find is not None:
            found = find(lo, hi)
        elif shadow is not None:
            found = dirty_pages(shadow[lo:hi], state[lo:hi], PAGE_SIZE, threads=threads) + lo // PAGE_SIZE
        else:
            raise ValueError("scan_chunks needs a shadow or a find function")
        while len(found):
            take = found[: per_chunk - count]
            found = found[len(take) :]
            pending.append(take)
            count += len(take)
            if count == per_chunk:
                yield build(np.concatenate(pending))
                emitted = True
                pending, count = [], 0
    if count or not emitted:
        yield build(np.concatenate(pending) if pending else np.zeros(0, dtype=np.int64))
