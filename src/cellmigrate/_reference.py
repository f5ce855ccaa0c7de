"""Pure-Python/numpy reference implementation of every compiled kernel.

This module is a test oracle, not a fallback: the compiled ``cellmigrate._kernels``
must agree with it on every input. It is written for obviousness, not speed. It is
also what ``CELLMIGRATE_PURE_PYTHON=1`` selects, so the whole behavioural test suite
can run against it.

Kernel contract (shared with ``cython/_kernels.pyx``)
-----------------------------------------------------
Buffers arrive as flat C-contiguous ``uint8`` buffers (the callers in ``checksum.py``,
``compare.py`` and ``compression.py`` pass :mod:`cellmigrate._buffers` views; the compiled
kernels also accept any C-contiguous byte buffer, read-only ones included, and refuse
strided ones with ``ValueError``). Sizes are 64-bit. Nothing is copied on input.
Checksums are ints in ``[0, 2**32)``; ``offset`` is an int in ``[0, 2**64)``. The
whole-buffer kernels (``checksum``, ``first_difference``, ``dirty_pages``,
``dirty_pages_checksum``) and the page encoders (``encode_pages``, ``encode_page_list``)
take a last argument ``threads=1`` (an int): the compiled
ones then split the call over that many threads of their own (at most ``MAX_THREADS``,
64) inside one GIL-free call, with the same result; the reference runs on the calling
thread; below 1 is a ``ValueError`` in both.

* ``checksum(data, offset=0) -> int``: sum of ``data[i] * (offset + i + 1)`` mod 2**32
  (weights wrap mod 2**32 too). Positioned form: ``checksum(x[a:b], a)`` is what the
  slice contributes to ``checksum(x)``, so slices add up (mod 2**32) to the whole.
* ``first_difference(a, b) -> int | None``: first index where ``a``/``b`` differ; unequal
  lengths raise ``ValueError``.
* ``dirty_pages(old, new, page_size) -> ndarray[int64]``: ascending indices of the pages
  (``[i*page_size, min((i+1)*page_size, n))``, the last may be short) where old and new
  differ. Unequal lengths or ``page_size <= 0`` raise ``ValueError``.
* ``dirty_pages_checksum(old, new, page_size, offset=0) -> (ndarray[int64], int)``:
  ``(dirty_pages(old, new, page_size), checksum(new, offset))`` in one pass over the
  data (delta creation reads both states once). Indices are relative to the buffers
  given; ``offset`` applies to the checksum only, so a caller splitting a state into
  page-aligned spans passes each span's start and adds ``start // page_size`` to its
  indices.
* ``state_pages_checksum(state, indices, page_size) -> int``: sum over ``indices`` of
  ``checksum(page i of state, i * page_size)``, reading the pages in place. Indices are
  any int sequence or array; one outside ``[0, ceil(n / page_size))`` raises
  ``IndexError``. With ``pages_checksum`` this gives the checksum of a state with some
  pages replaced before anything is written:
  ``checksum(base) - state_pages_checksum(base, idx, ps) + pages_checksum(pages, idx, ps)``.
* ``pages_checksum(pages, indices, page_size) -> int``: sum of
  ``checksum(pages[k], indices[k] * page_size)``; pages are separate buffers of any length.
  A count mismatch raises ``ValueError``, a negative index ``IndexError``.
* ``rle_compress(data) -> bytes``: the crate's "simple" RLE, byte-exact (SPEC §3).
* ``rle_decompress(data, max_output=-1) -> bytes``: strict. Errors, in stream order, are
  ``CorruptDataError`` with these messages: "RLE stream truncated: marker at offset {i}
  needs two more bytes" (0xFF in one of the last two positions), "RLE marker at offset
  {i} has a zero run length", "RLE output exceeds max_output of {m} bytes" (raised as
  soon as the output would pass ``max_output``; ``-1`` means unbounded). Output size is
  computed before allocation, so a bomb allocates nothing.
* ``gather_pages(state, indices, page_size) -> list[bytes]``: copies of the named pages
  (the last page of the state may be short); all indices are checked first, one outside
  the state raises ``IndexError``.
* ``scatter_pages(target, indices, pages, page_size, changed=None) -> None``: writes
  ``pages[k]`` at ``indices[k] * page_size`` into the writable ``target``. Everything is
  checked before the first write: a count mismatch (of pages, indices or line masks) or
  a page longer than ``page_size`` raises ``ValueError``, a page that does not fit (or a
  negative index) ``IndexError``. With ``changed`` (one uint64 line mask a page), only
  the 64-byte lines of page ``k`` whose bit is set are written; ``LINES_ALL`` (every
  bit) writes the whole page, however long.

* ``xzr_encode(new_page, base_page) -> bytes``: the XOR + zero-run ("XZR") stream of
  ``new_page`` against ``base_page`` (zero-extended, or cut, to ``len(new_page)``), per
  docs/FORMAT.md: pairs ``(varint z, varint k, k bytes of new ^ base)``; a literal runs on
  through gaps of fewer than 3 equal bytes and ends at a gap of 3 or more, or where the
  rest of the page equals the base (then nothing more is written).
* ``xzr_decode(stream, base_page, length) -> bytes``: strict; ``length`` bytes of the base
  page (zero-extended or cut) with the literals XORed in. Errors (``CorruptDataError``,
  text from ``xzr_message``), in stream order, at the offset of the pair: a varint cut
  short, an overlong varint (over 5 bytes, or a non-canonical trailing zero group), a
  zero literal length, a pair running past the page, a literal cut short. Never writes
  outside the ``length``-byte page.
* ``encode_pages(old, new, indices, page_size, allowed, threads=1) -> (encodings, offsets, checks, payload)``:
  every page ``indices[k]`` of ``new`` (the last may be short) encoded against the same
  bytes of ``old`` (any length: zeros past its end), as the smallest encoding in the bit
  mask ``allowed`` (``1 << ENC_RAW | 1 << ENC_RLE | 1 << ENC_ZERO | 1 << ENC_XZR``; RAW
  always allowed), a later one of RAW, RLE, ZERO, XZR only when strictly smaller.
  ``encodings`` is uint8[n], ``offsets`` int64[n + 1] into the ``payload`` bytes,
  ``checks`` uint32[n] the ``checksum`` of each page's stored bytes (the wire format's
  per-page check). An index outside ``new`` raises ``IndexError``.
* ``encode_page_list(old, pages, indices, page_size, allowed, xzr_hints=None, threads=1)``:
  ``encode_pages`` for pages given as separate buffers (``pages[k]`` is page
  ``indices[k]`` of the new state, 1..``page_size`` bytes); a count mismatch or a page of
  another length raises ``ValueError``, a negative index ``IndexError``. A page whose
  ``xzr_hints[k]`` is ``XZR_HINT_NO_WIN`` is not tried as XZR (``xzr_hint``: what a
  create pass records while the page and its base are in cache).
* ``join_buffers(parts) -> bytes``: ``b"".join(parts)`` (the compiled one advises the
  output onto huge pages and copies without the GIL).
* ``stored_checks(payload, offsets) -> ndarray[uint32]``: ``checksum`` of each
  ``payload[offsets[k]:offsets[k + 1]]``; offsets outside the payload raise ``ValueError``.
* ``check_pages(payload, offsets, encodings, indices, total_size, page_size, allowed,
  previous=-1, base=None, out=None, checks=None, threads=1) -> (code, position, detail)``: validates
  stored pages in order (with ``checks``, first that each page's stored bytes have that
  ``checksum``: ``PAGE_CHECK``, detail the one found) and, with ``out`` (``n * page_size`` writable bytes), decodes page k into
  ``out[k * page_size:]`` (its length: ``min(page_size, total_size - index * page_size)``;
  XZR pages over the same bytes of ``base``, zeros past its end). ``code`` is 0, or the
  first failure (``PAGE_*`` below) with the page's position and a detail; ``out`` may then
  hold partial pages (on several threads, pages after the failing one too) but nothing
  outside the first ``n * page_size`` bytes is written.

* ``overlay_leaves(base, lo, hi, pages, starts, leaf, out=None, changed=None) -> int``:
  the checksum of bytes ``[lo, hi)`` of ``base`` with ``pages[k]`` laid at absolute byte
  ``starts[k]`` (``lo`` a multiple of ``leaf``, ``hi <= len(base)``, pages ascending,
  inside the span, not overlapping, none across a leaf boundary: ``ValueError``
  otherwise); with ``out``, each leaf's XXH3-128 (canonical 16 bytes, the ``xxhash``
  package's) of those bytes, in order. ``changed`` (uint64, one a page) receives each
  page's line mask: bit ``j`` set when bytes ``[64j, 64j + 64)`` of the page differ from
  the base under it; a page over 4096 bytes gets ``LINES_ALL``. (The compiled kernel
  may set more bits: it compares only pages in blocks that pages cover sparsely.)
* ``scan_leaves_reference(old, new, lo, hi, leaf, page) -> (indices, pages, checksum, leaves)``:
  what the compiled ``scan_leaves`` computes into its ``PageArena``: the dirty pages of
  ``new[lo:hi]`` against ``old`` (page numbers and copies), the checksum of ``old[lo:hi]``
  with the copies over it, and that span's leaf digests.
* ``scan_leaves_fp_reference(new, lo, hi, leaf, page, fingerprints, changes_of=None) ->
  (indices, pages, checksum, leaves, read)``: what the compiled ``scan_leaves`` computes
  when given the base's page fingerprints: ``read[k]`` is page ``k``'s XXH3-64 for each
  page of ``[lo, hi)``; the pages whose ``read`` differs from ``fingerprints`` (numbers
  and copies); the checksum and leaf digests of ``new[lo:hi]`` itself. With
  ``changes_of`` (the base; ``checksum_changes=True``) the checksum is instead
  ``(change, stale)``: the sum over the copies of their positioned checksum minus that of
  the base's page, mod 2**32, and whether the XXH3-64 of the base's page under some copy
  differs from ``fingerprints``.

* ``page_digests64(data, page, out, offset=0) -> int``: ``out[k]`` = XXH3-64 (the
  ``xxhash`` package's, as an unsigned int) of page ``k`` of ``data`` (the last may be
  short); returns ``checksum(data, offset)``; ``out`` too short raises ``ValueError``.

* ``page_digests128(data, page, out) -> None``: XXH3-128 (canonical 16 bytes) of each
  page of ``data`` into ``out`` (16 bytes a page); ``out`` too short raises ``ValueError``.

* ``gather_digests128(state, indices, page, dst, out, threads=1) -> None``: the pages of
  ``state`` at ``indices`` copied back to back into ``dst`` (page ``k`` at byte
  ``k * page``; a short last page of the state may only be named last) and the XXH3-128
  (canonical 16 bytes) of each copy into ``out``; an index out of range, a short page
  not last, or ``dst``/``out`` too small raise ``ValueError``.

* ``send_parts(fd, parts, skip=0, timeout=0.0) -> (written, error, readable)``: write
  the buffers ``parts``, in order and without their first ``skip`` bytes, to the socket
  ``fd`` (non-blocking) within ``timeout`` seconds: ``written`` bytes this
  call; ``error`` 0 when all is written, else an errno value (``ETIMEDOUT``; the compiled
  kernel also returns ``EINTR`` after a signal, to be called again with ``skip +
  written``); ``readable``: the peer had something to read once all was written. A
  negative or NaN timeout raises ``ValueError``.
* ``recv_some(fd, buffer, timeout=0.0) -> (got, error)``: read what has arrived on ``fd``
  (at least one byte, or 0 at the end of the stream) into the writable ``buffer``,
  waiting up to ``timeout`` seconds: ``error`` 0, else an errno value (``ETIMEDOUT``; the
  compiled kernel also returns ``EINTR``). A negative or NaN timeout or an empty buffer
  raises ``ValueError``.

Compiled-only (private, not part of the contract): ``_dispatch_paths()``, ``_dispatch()``,
``_set_dispatch(name)`` (code-path selection for tests), ``NOGIL_MIN_BYTES``, and the
``_naive_*`` straightforward loops used as benchmark baselines.
"""

from __future__ import annotations

import errno
import os
import select
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._types import BufferLike, IndexLike
from .errors import CorruptDataError

IMPLEMENTATION = "reference"

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_CHUNK = 1 << 20


def _u8(data: BufferLike) -> "np.ndarray[Any, np.dtype[np.uint8]]":
    # Before Python 3.12, numpy's stubs accept only concrete buffer types (bytes,
    # memoryview, ...) here, not the Buffer protocol (unused-ignore: 3.12+ accepts it).
    return np.frombuffer(data, dtype=np.uint8)  # type: ignore[arg-type,unused-ignore]


def _view(data: BufferLike) -> memoryview:
    # numpy's stubs declare ndarray.__buffer__ only for Python 3.12+ (unused-ignore: on
    # 3.12+ an ndarray is a Buffer and the call checks).
    return memoryview(data)  # type: ignore[arg-type,unused-ignore]


def checksum(data: BufferLike, offset: int = 0, threads: int = 1) -> int:
    _threads(threads)
    arr = _u8(data)
    total = 0
    for start in range(0, arr.size, _CHUNK):
        chunk = arr[start : start + _CHUNK].astype(np.uint64)
        weights = (np.arange(1, chunk.size + 1, dtype=np.uint64) + np.uint64((offset + start) & _MASK32)) & np.uint64(
            _MASK32
        )
        # Each product is < 2**40 and a chunk has 2**20 of them, so the uint64 sum is exact.
        total = (total + int((chunk * weights).sum())) & _MASK32
    return total


def _threads(threads: int) -> None:
    # The compiled kernels split a call over ``threads`` threads; the reference runs on
    # the calling thread whatever the count, and checks it as they do.
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int, not {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")


def _pages(n: int, page_size: int) -> int:
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    return -(-n // page_size)


def _equal_length(x: "np.ndarray[Any, Any]", y: "np.ndarray[Any, Any]", what: str) -> None:
    if x.size != y.size:
        raise ValueError(f"{what} needs buffers of equal length")


def first_difference(a: BufferLike, b: BufferLike, threads: int = 1) -> Optional[int]:
    _threads(threads)
    x = _u8(a)
    y = _u8(b)
    _equal_length(x, y, "first_difference")
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else None


def dirty_pages(old: BufferLike, new: BufferLike, page_size: int, threads: int = 1) -> "np.ndarray[Any, np.dtype[np.int64]]":
    _threads(threads)
    x = _u8(old)
    y = _u8(new)
    _equal_length(x, y, "dirty_pages")
    _pages(x.size, page_size)
    pages = [i for i, start in enumerate(range(0, x.size, page_size)) if not np.array_equal(
        x[start : start + page_size], y[start : start + page_size])]
    return np.asarray(pages, dtype=np.int64)


def dirty_pages_checksum(
    old: BufferLike, new: BufferLike, page_size: int, offset: int = 0, threads: int = 1
) -> Tuple["np.ndarray[Any, np.dtype[np.int64]]", int]:
    _threads(threads)
    x = _u8(old)
    y = _u8(new)
    _equal_length(x, y, "dirty_pages_checksum")
    return dirty_pages(old, new, page_size), checksum(new, offset)


def _index_list(indices: IndexLike) -> List[int]:
    return [int(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1)]


def _state_pages(state: BufferLike, indices: IndexLike, page_size: int) -> Tuple[memoryview, List[int]]:
    """A byte view of ``state`` and the indices, every one naming a page of it."""
    view = _view(state).cast("B")
    npages = _pages(view.nbytes, page_size)
    idx = _index_list(indices)
    for i in idx:
        if not 0 <= i < npages:
            raise IndexError(f"page {i} is outside a state of {view.nbytes} bytes")
    return view, idx


def _paired_indices(pages: Sequence[BufferLike], indices: IndexLike, page_size: int) -> List[int]:
    """The indices, one per page (``pages`` and ``indices`` go together)."""
    _pages(0, page_size)
    idx = _index_list(indices)
    if len(pages) != len(idx):
        raise ValueError(f"{len(pages)} pages but {len(idx)} indices")
    return idx


def state_pages_checksum(state: BufferLike, indices: IndexLike, page_size: int) -> int:
    view, idx = _state_pages(state, indices, page_size)
    return sum(checksum(view[i * page_size : (i + 1) * page_size], i * page_size) for i in idx) & _MASK32


def pages_checksum(pages: Sequence[BufferLike], indices: IndexLike, page_size: int) -> int:
    idx = _paired_indices(pages, indices, page_size)
    total = 0
    for i, page in zip(idx, pages):
        if i < 0:
            raise IndexError(f"page index {i} is negative")
        total += checksum(page, (i * page_size) & _MASK64)
    return total & _MASK32


def rle_compress(data: BufferLike) -> bytes:
    src = bytes(data)
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        byte = src[i]
        run = 1
        while i + run < n and src[i + run] == byte and run < 127:
            run += 1
        if run >= 4 or byte == 0xFF:
            out += bytes((0xFF, run, byte))
        else:
            out += src[i : i + run]
        i += run
    return bytes(out)


def rle_decompress(data: BufferLike, max_output: int = -1) -> bytes:
    src = bytes(data)
    out = bytearray()
    i, n = 0, len(src)
    while i < n:
        byte = src[i]
        if byte == 0xFF:
            if i + 2 >= n:
                raise CorruptDataError(f"RLE stream truncated: marker at offset {i} needs two more bytes")
            count = src[i + 1]
            if count == 0:
                raise CorruptDataError(f"RLE marker at offset {i} has a zero run length")
            out += bytes((src[i + 2],)) * count
            i += 3
        else:
            out.append(byte)
            i += 1
        if 0 <= max_output < len(out):
            raise CorruptDataError(f"RLE output exceeds max_output of {max_output} bytes")
    return bytes(out)


def gather_pages(state: BufferLike, indices: IndexLike, page_size: int) -> List[bytes]:
    view, idx = _state_pages(state, indices, page_size)
    return [bytes(view[i * page_size : (i + 1) * page_size]) for i in idx]


#: A line mask with every bit set: the whole page (``scatter_pages``, ``overlay_leaves``).
LINES_ALL = (1 << 64) - 1


def line_mask(page: BufferLike, base: BufferLike) -> int:
    """Bit ``j`` set when 64-byte line ``j`` of ``page`` differs from ``base``'s (same
    lengths); ``LINES_ALL`` for a page over 4096 bytes."""
    a, b = bytes(_view(page).cast("B")), bytes(_view(base).cast("B"))
    if len(a) > 64 * 64:
        return LINES_ALL
    return sum(1 << j for j in range(-(-len(a) // 64)) if a[64 * j : 64 * j + 64] != b[64 * j : 64 * j + 64])


def scatter_pages(
    target: BufferLike, indices: IndexLike, pages: Sequence[BufferLike], page_size: int,
    changed: Optional[Sequence[int]] = None,
) -> None:
    view = _view(target).cast("B")
    idx = _paired_indices(pages, indices, page_size)
    sizes = [_view(p).nbytes for p in pages]
    masks = None if changed is None else [int(m) for m in changed]
    if masks is not None and len(masks) != len(idx):
        raise ValueError(f"{len(masks)} line masks but {len(idx)} pages")
    for i, size in zip(idx, sizes):
        if size > page_size:
            raise ValueError(f"page {i} has {size} bytes, more than page_size {page_size}")
        if i < 0 or i * page_size + size > view.nbytes:
            raise IndexError(f"page {i} does not fit a target of {view.nbytes} bytes")
    for k, (i, page, size) in enumerate(zip(idx, pages, sizes)):
        data = _view(page).cast("B")
        if masks is None or masks[k] == LINES_ALL:
            view[i * page_size : i * page_size + size] = data
            continue
        for j in range(64):
            if masks[k] >> j & 1 and 64 * j < size:
                end = min(64 * j + 64, size)
                view[i * page_size + 64 * j : i * page_size + end] = data[64 * j : end]


def overlay_checksum(
    base: BufferLike, offset: int, n: int, pages: Sequence[BufferLike], starts: IndexLike, out: BufferLike
) -> int:
    """``out[:n]`` = ``base`` (zeros past its end, cut at ``n``) with ``pages[k]`` at byte
    ``starts[k]``; returns ``checksum(out[:n], offset)``. Checks everything before writing."""
    at = _index_list(starts)
    target = _view(out).cast("B")
    if n < 0 or target.nbytes < n:
        raise ValueError(f"out holds {target.nbytes} bytes, the chunk needs {n}")
    if len(pages) != len(at):
        raise ValueError(f"{len(pages)} pages but {len(at)} starts")
    views = [_view(p).cast("B") for p in pages]
    for start, page in zip(at, views):
        if start < 0 or start + page.nbytes > n:
            raise ValueError(f"a page of {page.nbytes} bytes at {start} does not fit a chunk of {n} bytes")
    src = _view(base).cast("B")[:n]
    chunk = bytearray(n)
    chunk[: src.nbytes] = src
    for start, page in zip(at, views):
        chunk[start : start + page.nbytes] = page
    target[:n] = chunk
    return checksum(chunk, offset)


def overlay_leaves(
    base: BufferLike, lo: int, hi: int, pages: Sequence[BufferLike], starts: IndexLike, leaf: int,
    out: Optional[BufferLike] = None, changed: Any = None,
) -> int:
    """Checksum (and, with ``out``, leaf digests; with ``changed``, each page's exact
    line mask) of ``base[lo:hi]`` with the pages over it."""
    import xxhash

    src = _view(base).cast("B")
    at = _index_list(starts)
    if leaf <= 0 or lo % leaf or lo > hi or hi > src.nbytes:
        raise ValueError(f"span [{lo}, {hi}) must start on a leaf and fit a base of {src.nbytes} bytes")
    if len(pages) != len(at):
        raise ValueError(f"{len(pages)} pages but {len(at)} starts")
    laid = bytearray(src[lo:hi])
    pos = lo
    for start, page in zip(at, pages):
        data = _view(page).cast("B")
        n = data.nbytes
        if start < pos or start + n > hi or (n and start // leaf != (start + n - 1) // leaf):
            raise ValueError(f"a page of {n} bytes at {start} overlaps another, leaves [{lo}, {hi}) or crosses a leaf")
        laid[start - lo : start - lo + n] = data
        pos = start + n
    if changed is not None:
        if len(changed) < len(at):
            raise ValueError(f"changed holds {len(changed)} masks, there are {len(at)} pages")
        for k, (start, page) in enumerate(zip(at, pages)):
            n = _view(page).nbytes
            changed[k] = line_mask(page, src[start : start + n])
    if out is not None:
        digests = b"".join(xxhash.xxh3_128_digest(bytes(laid[i : i + leaf])) for i in range(0, len(laid), leaf))
        target = _view(out).cast("B")
        if target.nbytes < len(digests):
            raise ValueError(f"out holds {target.nbytes} bytes, the leaf digests need {len(digests)}")
        target[: len(digests)] = digests
    return checksum(laid, lo)


def scan_leaves_reference(
    old: BufferLike, new: BufferLike, lo: int, hi: int, leaf: int, page: int
) -> Tuple["np.ndarray[Any, np.dtype[np.int64]]", List[bytes], int, bytes]:
    """The fused create pass over ``[lo, hi)``: dirty page numbers, copies, checksum, leaf digests."""
    a, b = _view(old).cast("B"), _view(new).cast("B")
    if leaf <= 0 or page <= 0 or leaf % page or lo % leaf or lo > hi or hi > min(a.nbytes, b.nbytes):
        raise ValueError(f"span [{lo}, {hi}) must start on a leaf of whole pages and fit both states")
    rel = dirty_pages(a[lo:hi], b[lo:hi], page)
    indices = rel + lo // page
    copies = [bytes(b[i * page : min((i + 1) * page, hi)]) for i in indices.tolist()]
    out = bytearray(16 * -(-(hi - lo) // leaf))
    total = overlay_leaves(a, lo, hi, copies, [i * page for i in indices.tolist()], leaf, out)
    return indices.astype(np.int64), copies, total, bytes(out)


def scan_leaves_fp_reference(
    new: BufferLike, lo: int, hi: int, leaf: int, page: int, fingerprints: Any, changes_of: Optional[BufferLike] = None
) -> Tuple["np.ndarray[Any, np.dtype[np.int64]]", List[bytes], Any, bytes, Dict[int, int]]:
    """The create pass over ``[lo, hi)`` that reads ``new`` alone, given the base's page
    fingerprints: dirty page numbers, copies, checksum (with ``changes_of``, the base: what
    the copies change in its checksum, and whether it is stale under one), leaf digests,
    each page's XXH3-64."""
    import xxhash

    b = _view(new).cast("B")
    if leaf <= 0 or page <= 0 or leaf % page or lo % leaf or lo > hi or hi > b.nbytes:
        raise ValueError(f"span [{lo}, {hi}) must start on a leaf of whole pages and fit the state")
    read = {k: xxhash.xxh3_64_intdigest(bytes(b[k * page : min((k + 1) * page, hi)]))
            for k in range(lo // page, -(-hi // page))}
    dirty = [k for k, h in read.items() if h != int(fingerprints[k])]
    copies = [bytes(b[k * page : min((k + 1) * page, hi)]) for k in dirty]
    out = bytearray(16 * -(-(hi - lo) // leaf))
    total = overlay_leaves(b, lo, hi, [], [], leaf, out)
    result: Any = total
    if changes_of is not None:
        base = _view(changes_of).cast("B")
        under = [bytes(base[k * page : k * page + len(c)]) for k, c in zip(dirty, copies)]
        change = sum(checksum(c, k * page) - checksum(u, k * page) for k, c, u in zip(dirty, copies, under))
        stale = any(xxhash.xxh3_64_intdigest(u) != int(fingerprints[k]) for k, u in zip(dirty, under))
        result = (change & _MASK32, stale)
    return np.array(dirty, dtype=np.int64), copies, result, bytes(out), read


def page_digests64(data: BufferLike, page: int, out: Any, offset: int = 0) -> int:
    """XXH3-64 of each page of ``data`` into ``out`` (uint64 slots); ``data``'s checksum
    as if it began at byte ``offset``."""
    import xxhash

    src = _view(data).cast("B")
    if page <= 0:
        raise ValueError("page must be positive")
    npages = -(-src.nbytes // page)
    if len(out) < npages:
        raise ValueError(f"out holds {len(out)} digests, {npages} pages need one each")
    for k in range(npages):
        out[k] = xxhash.xxh3_64_intdigest(bytes(src[k * page : (k + 1) * page]))
    return checksum(src, offset)


def page_digests128(data: BufferLike, page: int, out: BufferLike) -> None:
    """XXH3-128 of each page of ``data`` into ``out`` (16 bytes a page)."""
    import xxhash

    src = _view(data).cast("B")
    if page <= 0:
        raise ValueError("page must be positive")
    digests = b"".join(xxhash.xxh3_128_digest(bytes(src[i : i + page])) for i in range(0, src.nbytes, page))
    target = _view(out).cast("B")
    if target.nbytes < len(digests):
        raise ValueError(f"out holds {target.nbytes} bytes, {len(digests) // 16} pages need 16 each")
    target[: len(digests)] = digests


def gather_digests128(
    state: BufferLike, indices: IndexLike, page: int, dst: BufferLike, out: BufferLike, threads: int = 1
) -> None:
    """Pages of ``state`` at ``indices`` back to back into ``dst``, the XXH3-128 of each into ``out``."""
    import xxhash

    _threads(threads)
    if page <= 0:
        raise ValueError("page must be positive")
    src = _view(state).cast("B")
    n = src.nbytes
    idx = _index_list(indices)
    total = 0
    for i, k in enumerate(idx):
        if k < 0 or k >= -(-n // page):
            raise ValueError(f"page {k} is outside a state of {n} bytes")
        if n - k * page < page and i != len(idx) - 1:
            raise ValueError(f"the short last page {k} is not the last one named")
        total += min(page, n - k * page)
    target, digests = _view(dst).cast("B"), _view(out).cast("B")
    if target.nbytes < total:
        raise ValueError(f"dst holds {target.nbytes} bytes, the pages need {total}")
    if digests.nbytes < 16 * len(idx):
        raise ValueError(f"out holds {digests.nbytes} bytes, the leaf digests need {16 * len(idx)}")
    for i, k in enumerate(idx):
        copy = bytes(src[k * page : min((k + 1) * page, n)])
        target[i * page : i * page + len(copy)] = copy
        digests[16 * i : 16 * i + 16] = xxhash.xxh3_128_digest(copy)


# --------------------------------------------------------------------------------------
# page encodings (zero pages, XOR + zero-run)

ENC_RAW = 0
ENC_RLE = 1
ENC_ZERO = 2
ENC_XZR = 3

_XZR_MESSAGES = {
    1: "XZR stream truncated: the varint of the pair at offset {where} is cut short",
    2: "XZR varint in the pair at offset {where} is overlong",
    3: "XZR pair at offset {where} has a zero literal length",
    4: "XZR pair at offset {where} runs past the end of the {length}-byte page",
    5: "XZR stream truncated: the literal of the pair at offset {where} is cut short",
}
#: A literal ends at this many equal bytes (a new pair costs at least 2 bytes of varints).
_XZR_GAP = 3
_VARINT_MAX = 5


def xzr_message(rc: int, where: int, length: int) -> str:
    return _XZR_MESSAGES[rc].format(where=where, length=length)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fit(base_page: BufferLike, length: int) -> bytes:
    raw = bytes(base_page)[:length]
    return raw + bytes(length - len(raw))


def xzr_encode(new_page: BufferLike, base_page: BufferLike) -> bytes:
    new = bytes(new_page)
    n = len(new)
    x = bytes(a ^ b for a, b in zip(new, _fit(base_page, n)))
    out = bytearray()
    pos = 0
    while pos < n:
        s = pos
        while s < n and x[s] == 0:
            s += 1
        if s == n:
            break
        e = s + 1
        while e < n:
            if x[e] != 0:
                e += 1
                continue
            gap = 0
            while e + gap < n and x[e + gap] == 0 and gap < _XZR_GAP:
                gap += 1
            if gap >= _XZR_GAP or e + gap == n:
                break
            e += gap
        out += _varint(s - pos) + _varint(e - s) + x[s:e]
        pos = e
    return bytes(out)


def _read_varint(src: bytes, i: int) -> Tuple[int, int, int]:
    """``(rc, value, next)``: rc 0, or 1 (cut short) / 2 (overlong)."""
    value = 0
    for count in range(_VARINT_MAX):
        if i >= len(src):
            return 1, 0, i
        byte = src[i]
        i += 1
        value |= (byte & 0x7F) << (7 * count)
        if not byte & 0x80:
            if byte == 0 and count > 0:
                return 2, 0, i
            return 0, value, i
    return 2, 0, i


def _xzr_apply(src: bytes, out: Optional[bytearray], length: int) -> Tuple[int, int]:
    """XOR ``src``'s literals into ``out`` (or only check with ``None``): ``(rc, where)``."""
    i = pos = 0
    n = len(src)
    while i < n:
        at = i
        rc, z, i = _read_varint(src, i)
        if rc == 0:
            rc, k, i = _read_varint(src, i)
        if rc:
            return rc, at
        if k == 0:
            return 3, at
        if z > length - pos or k > length - pos - z:
            return 4, at
        if k > n - i:
            return 5, at
        pos += z
        if out is not None:
            for j in range(k):
                out[pos + j] ^= src[i + j]
        pos += k
        i += k
    return 0, 0


def xzr_decode(stream: BufferLike, base_page: BufferLike, length: int) -> bytes:
    if length < 0:
        raise ValueError("length must be >= 0")
    out = bytearray(_fit(base_page, length))
    rc, where = _xzr_apply(bytes(stream), out, length)
    if rc:
        raise CorruptDataError(xzr_message(rc, where, length))
    return bytes(out)


#: ``PageArena.xzr_hints`` values (see ``xzr_hint``).
XZR_HINT_NO_WIN = 0xFFFE
XZR_HINT_UNKNOWN = 0xFFFF


def xzr_hint(page: BufferLike, base: BufferLike) -> int:
    """The XZR hint a create pass takes for a copied page (1..4096 bytes) and the same
    bytes of its base: the XZR stream's size when it is smaller than the page, else
    ``XZR_HINT_NO_WIN``; a longer page gets ``XZR_HINT_UNKNOWN``."""
    data = bytes(_view(page).cast("B"))
    if len(data) > 4096:
        return XZR_HINT_UNKNOWN
    size = len(xzr_encode(data, bytes(_view(base).cast("B"))))
    return size if size < len(data) else XZR_HINT_NO_WIN


def encode_page_list(
    old: BufferLike, pages: Sequence[BufferLike], indices: IndexLike, page_size: int, allowed: int,
    xzr_hints: Optional[Sequence[int]] = None, threads: int = 1,
) -> Tuple[
    "np.ndarray[Any, np.dtype[np.uint8]]", "np.ndarray[Any, np.dtype[np.int64]]", "np.ndarray[Any, np.dtype[np.uint32]]", bytes
]:
    _threads(threads)
    idx = _paired_indices(pages, indices, page_size)
    hints = None if xzr_hints is None else [int(h) for h in xzr_hints]
    if hints is not None and len(hints) != len(idx):
        raise ValueError(f"{len(hints)} XZR hints but {len(idx)} pages")
    old_raw = bytes(_view(old).cast("B"))
    allowed |= 1 << ENC_RAW
    encodings: List[int] = []
    offsets = [0]
    checks: List[int] = []
    payload = bytearray()
    for k, (i, data) in enumerate(zip(idx, pages)):
        if i < 0:
            raise IndexError(f"page index {i} is negative")
        if i > (2**63 - 1 - page_size) // page_size:
            raise IndexError(f"page index {i} of {page_size}-byte pages ends past 2**63 bytes")
        page = bytes(_view(data).cast("B"))
        if not 0 < len(page) <= page_size:
            raise ValueError(f"page {i} has {len(page)} bytes, not 1..{page_size}")
        candidates = [(ENC_RAW, page)]
        if allowed & (1 << ENC_RLE):
            candidates.append((ENC_RLE, rle_compress(page)))
        if allowed & (1 << ENC_ZERO) and not any(page):
            candidates.append((ENC_ZERO, b""))
        if allowed & (1 << ENC_XZR) and not (hints is not None and hints[k] == XZR_HINT_NO_WIN):
            candidates.append((ENC_XZR, xzr_encode(page, old_raw[i * page_size : i * page_size + len(page)])))
        best = candidates[0]
        for candidate in candidates[1:]:
            if len(candidate[1]) < len(best[1]):  # strictly smaller: ties keep the earlier
                best = candidate
        encodings.append(best[0])
        checks.append(checksum(best[1]))
        payload += best[1]
        offsets.append(len(payload))
    return (
        np.asarray(encodings, dtype=np.uint8),
        np.asarray(offsets, dtype=np.int64),
        np.asarray(checks, dtype=np.uint32),
        bytes(payload),
    )


def encode_pages(
    old: BufferLike, new: BufferLike, indices: IndexLike, page_size: int, allowed: int, threads: int = 1
) -> Tuple[
    "np.ndarray[Any, np.dtype[np.uint8]]", "np.ndarray[Any, np.dtype[np.int64]]", "np.ndarray[Any, np.dtype[np.uint32]]", bytes
]:
    new_view, idx = _state_pages(new, indices, page_size)
    pages = [new_view[i * page_size : (i + 1) * page_size] for i in idx]
    return encode_page_list(old, pages, idx, page_size, allowed, threads=threads)


def stored_checks(payload: BufferLike, offsets: IndexLike) -> "np.ndarray[Any, np.dtype[np.uint32]]":
    src = bytes(_view(payload).cast("B"))
    off = _index_list(offsets)
    for a, b in zip(off, off[1:]):
        if a < 0 or b < a or b > len(src):
            raise ValueError(f"offsets {a}..{b} do not fit a payload of {len(src)} bytes")
    return np.asarray([checksum(src[a:b]) for a, b in zip(off, off[1:])], dtype=np.uint32)


def join_buffers(parts: Sequence[BufferLike]) -> bytes:
    return b"".join(bytes(_view(p).cast("B")) for p in parts)


PAGE_OK = 0
PAGE_INDEX_RANGE = 1
PAGE_NOT_INCREASING = 2
PAGE_ENCODING = 3
PAGE_LENGTH = 4
PAGE_RLE_CORRUPT = 5
PAGE_RLE_SIZE = 6
PAGE_XZR_CORRUPT = 7
PAGE_OFFSETS = 8
PAGE_CHECK = 9

_RLE_CODES = {"truncated": 1, "zero run length": 2, "max_output": 3}


def check_pages(
    payload: BufferLike,
    offsets: IndexLike,
    encodings: IndexLike,
    indices: IndexLike,
    total_size: int,
    page_size: int,
    allowed: int,
    previous: int = -1,
    base: Optional[BufferLike] = None,
    out: Optional[BufferLike] = None,
    checks: Optional[IndexLike] = None,
    threads: int = 1,
) -> Tuple[int, int, int]:
    _threads(threads)
    src = bytes(_view(payload).cast("B"))
    off = _index_list(offsets)
    enc = [int(e) for e in np.asarray(encodings, dtype=np.uint8).reshape(-1)]
    idx = _index_list(indices)
    _pages(0, page_size)
    if len(enc) != len(idx) or len(off) != len(idx) + 1:
        raise ValueError(f"{len(idx)} indices need {len(idx)} encodings and {len(idx) + 1} offsets")
    base_raw = b"" if base is None else bytes(_view(base).cast("B"))
    target = None if out is None else _view(out).cast("B")
    if target is not None and target.nbytes < len(idx) * page_size:
        raise ValueError(f"out has {target.nbytes} bytes, {len(idx)} pages need {len(idx) * page_size}")
    chk = None if checks is None else [int(c) for c in np.asarray(checks, dtype=np.uint32).reshape(-1)]
    if chk is not None and len(chk) != len(idx):
        raise ValueError(f"{len(idx)} indices need {len(idx)} checks")
    allowed |= 1 << ENC_RAW
    for k, (index, e) in enumerate(zip(idx, enc)):
        if not 0 <= index < -(-total_size // page_size):
            return PAGE_INDEX_RANGE, k, index
        if index <= previous:
            return PAGE_NOT_INCREASING, k, previous
        previous = index
        if off[k] < 0 or off[k + 1] < off[k] or off[k + 1] > len(src):
            return PAGE_OFFSETS, k, off[k + 1]
        if e > ENC_XZR or not allowed & (1 << e):
            return PAGE_ENCODING, k, e
        start = index * page_size
        length = min(page_size, total_size - start)
        stored = src[off[k] : off[k + 1]]
        if chk is not None and checksum(stored) != chk[k]:
            return PAGE_CHECK, k, checksum(stored)
        n = len(stored)
        if e == ENC_RAW:
            if n != length:
                return PAGE_LENGTH, k, n
            page = stored
        elif e == ENC_ZERO:
            if n != 0:
                return PAGE_LENGTH, k, n
            page = bytes(length)
        elif e == ENC_RLE:
            if not 0 < n <= 3 * length:
                return PAGE_LENGTH, k, n
            try:
                page = rle_decompress(stored, length)
            except CorruptDataError as exc:
                return PAGE_RLE_CORRUPT, k, next(c for t, c in _RLE_CODES.items() if t in str(exc))
            if len(page) != length:
                return PAGE_RLE_SIZE, k, len(page)
        else:
            if n > 3 * length:
                return PAGE_LENGTH, k, n
            buf = bytearray(_fit(base_raw[start : start + length], length))
            rc, _ = _xzr_apply(stored, buf, length)
            if rc:
                return PAGE_XZR_CORRUPT, k, rc
            page = bytes(buf)
        if target is not None:
            target[k * page_size : k * page_size + length] = page
    return PAGE_OK, 0, 0


def send_parts(fd: int, parts: Sequence[BufferLike], skip: int = 0, timeout: float = 0.0) -> Tuple[int, int, bool]:
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    views = [_view(p).cast("B") for p in parts]
    data = b"".join(bytes(v) for v in views)[skip:]
    deadline = time.monotonic() + timeout
    written = 0
    while written < len(data):
        try:
            written += os.write(fd, data[written:])
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [fd], [], left)[1]:
                return written, errno.ETIMEDOUT, False
        except OSError as exc:
            return written, exc.errno or errno.EIO, False
    return written, 0, bool(select.select([fd], [], [], 0)[0])


def recv_some(fd: int, buffer: Any, timeout: float = 0.0) -> Tuple[int, int]:
    if not timeout >= 0:
        raise ValueError(f"timeout must be >= 0 seconds, got {timeout}")
    view = memoryview(buffer).cast("B")
    if view.nbytes == 0:
        raise ValueError("the buffer is empty")
    deadline = time.monotonic() + timeout
    while True:
        # Wait first: a socket left in blocking mode would block os.read past the deadline.
        if not select.select([fd], [], [], max(deadline - time.monotonic(), 0))[0]:
            return 0, errno.ETIMEDOUT
        try:
            data = os.read(fd, view.nbytes)
        except BlockingIOError:
            continue
        except OSError as exc:
            return 0, exc.errno or errno.EIO
        view[: len(data)] = data
        return len(data), 0
