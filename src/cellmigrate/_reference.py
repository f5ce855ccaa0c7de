"""Pure-Python/numpy reference implementation of every compiled kernel.

This module is a test oracle, not a fallback: the compiled ``cellmigrate._kernels``
must agree with it on every input. It is written for obviousness, not speed. It is
also what ``CELLMIGRATE_PURE_PYTHON=1`` selects, so the whole behavioural test suite
can run against it.

Kernel contract (shared with ``cython/_kernels.pyx``); buffers arrive as flat ``uint8``
memoryviews produced by :mod:`cellmigrate._buffers`:

* ``checksum(data, offset=0) -> int``: sum of ``data[i] * (offset + i + 1)`` mod 2**32.
* ``first_difference(a, b) -> int | None``: first index where equal-length ``a``/``b`` differ.
* ``dirty_pages(old, new, page_size) -> numpy.ndarray[int64]``: indices of differing pages.
* ``rle_compress(data) -> bytes`` / ``rle_decompress(data, max_output=-1) -> bytes``.
* ``gather_pages(state, indices, page_size) -> list[bytes]``: copies of the named pages.
* ``scatter_pages(target, indices, pages, page_size) -> None``: writes pages into target.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence

import numpy as np

from .errors import CorruptDataError

IMPLEMENTATION = "reference"

_MASK32 = 0xFFFFFFFF
_CHUNK = 1 << 20


def checksum(data: Any, offset: int = 0) -> int:
    arr = np.frombuffer(data, dtype=np.uint8)
    total = 0
    for start in range(0, arr.size, _CHUNK):
        chunk = arr[start : start + _CHUNK].astype(np.uint64)
        weights = (np.arange(1, chunk.size + 1, dtype=np.uint64) + np.uint64((offset + start) & _MASK32)) & np.uint64(
            _MASK32
        )
        # Each product is < 2**40 and a chunk has 2**20 of them, so the uint64 sum is exact.
        total = (total + int((chunk * weights).sum())) & _MASK32
    return total


def first_difference(a: Any, b: Any) -> Optional[int]:
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else None


def dirty_pages(old: Any, new: Any, page_size: int) -> "np.ndarray[Any, np.dtype[np.int64]]":
    x = np.frombuffer(old, dtype=np.uint8)
    y = np.frombuffer(new, dtype=np.uint8)
    pages = [i for i, start in enumerate(range(0, x.size, page_size)) if not np.array_equal(
        x[start : start + page_size], y[start : start + page_size])]
    return np.asarray(pages, dtype=np.int64)


def rle_compress(data: Any) -> bytes:
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


def rle_decompress(data: Any, max_output: int = -1) -> bytes:
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


def gather_pages(state: Any, indices: Sequence[int], page_size: int) -> List[bytes]:
    view = memoryview(state)
    return [bytes(view[i * page_size : (i + 1) * page_size]) for i in indices]


def scatter_pages(target: Any, indices: Sequence[int], pages: Sequence[Any], page_size: int) -> None:
    view = memoryview(target)
    for index, page in zip(indices, pages):
        start = index * page_size
        view[start : start + len(page)] = page
