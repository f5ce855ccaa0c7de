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
Checksums are ints in ``[0, 2**32)``; ``offset`` is an int in ``[0, 2**64)``.

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
* ``scatter_pages(target, indices, pages, page_size) -> None``: writes ``pages[k]`` at
  ``indices[k] * page_size`` into the writable ``target``. Everything is checked before
  the first write: a count mismatch or a page longer than ``page_size`` raises
  ``ValueError``, a page that does not fit (or a negative index) ``IndexError``.

Compiled-only (private, not part of the contract): ``_dispatch_paths()``, ``_dispatch()``,
``_set_dispatch(name)`` (code-path selection for tests), ``NOGIL_MIN_BYTES``, and the
``_naive_*`` straightforward loops used as benchmark baselines.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

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


def checksum(data: BufferLike, offset: int = 0) -> int:
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


def _pages(n: int, page_size: int) -> int:
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    return -(-n // page_size)


def _equal_length(x: "np.ndarray[Any, Any]", y: "np.ndarray[Any, Any]", what: str) -> None:
    if x.size != y.size:
        raise ValueError(f"{what} needs buffers of equal length")


def first_difference(a: BufferLike, b: BufferLike) -> Optional[int]:
    x = _u8(a)
    y = _u8(b)
    _equal_length(x, y, "first_difference")
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else None


def dirty_pages(old: BufferLike, new: BufferLike, page_size: int) -> "np.ndarray[Any, np.dtype[np.int64]]":
    x = _u8(old)
    y = _u8(new)
    _equal_length(x, y, "dirty_pages")
    _pages(x.size, page_size)
    pages = [i for i, start in enumerate(range(0, x.size, page_size)) if not np.array_equal(
        x[start : start + page_size], y[start : start + page_size])]
    return np.asarray(pages, dtype=np.int64)


def dirty_pages_checksum(
    old: BufferLike, new: BufferLike, page_size: int, offset: int = 0
) -> Tuple["np.ndarray[Any, np.dtype[np.int64]]", int]:
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


def scatter_pages(target: BufferLike, indices: IndexLike, pages: Sequence[BufferLike], page_size: int) -> None:
    view = _view(target).cast("B")
    idx = _paired_indices(pages, indices, page_size)
    sizes = [_view(p).nbytes for p in pages]
    for i, size in zip(idx, sizes):
        if size > page_size:
            raise ValueError(f"page {i} has {size} bytes, more than page_size {page_size}")
        if i < 0 or i * page_size + size > view.nbytes:
            raise IndexError(f"page {i} does not fit a target of {view.nbytes} bytes")
    for i, page, size in zip(idx, pages, sizes):
        view[i * page_size : i * page_size + size] = _view(page).cast("B")
