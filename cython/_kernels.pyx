# cython: language_level=3
"""Compiled hot path of cellmigrate (private: import from ``cellmigrate``).

Every function takes flat ``uint8`` buffers (``const uint8_t[::1]`` accepts read-only
ones), releases the GIL for the loop and uses 64-bit sizes. The contract is the one
documented in ``cellmigrate._reference``, which is the test oracle for this module.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.string cimport memcmp, memcpy
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

import numpy as np

from cellmigrate.errors import CorruptDataError

IMPLEMENTATION = "compiled"


cdef inline uint32_t _checksum(const uint8_t* p, Py_ssize_t n, uint32_t weight0) noexcept nogil:
    cdef uint32_t acc = 0
    cdef uint32_t w = weight0
    cdef Py_ssize_t i
    for i in range(n):
        w += 1
        acc += <uint32_t>p[i] * w
    return acc


def checksum(const uint8_t[::1] data, uint64_t offset=0):
    """Weighted sum of ``data[i] * (offset + i + 1)`` modulo 2**32."""
    cdef Py_ssize_t n = data.shape[0]
    cdef uint32_t result = 0
    if n == 0:
        return 0
    with nogil:
        result = _checksum(&data[0], n, <uint32_t>offset)
    return result


cdef inline Py_ssize_t _first_difference(const uint8_t* a, const uint8_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t block
    cdef Py_ssize_t i
    # memcmp finds the differing block at full speed; the byte loop only runs inside it.
    while start < n:
        block = n - start
        if block > 4096:
            block = 4096
        if memcmp(a + start, b + start, block) != 0:
            for i in range(start, start + block):
                if a[i] != b[i]:
                    return i
        start += block
    return -1


def first_difference(const uint8_t[::1] a, const uint8_t[::1] b):
    """Index of the first differing byte of two equal-length buffers, or None."""
    cdef Py_ssize_t n = a.shape[0]
    cdef Py_ssize_t k = -1
    if b.shape[0] != n:
        raise ValueError("first_difference needs buffers of equal length")
    if n == 0:
        return None
    with nogil:
        k = _first_difference(&a[0], &b[0], n)
    return None if k < 0 else k


def dirty_pages(const uint8_t[::1] old, const uint8_t[::1] new, Py_ssize_t page_size):
    """Indices (int64 array) of the pages where ``old`` and ``new`` differ."""
    cdef Py_ssize_t n = old.shape[0]
    if new.shape[0] != n:
        raise ValueError("dirty_pages needs buffers of equal length")
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    cdef Py_ssize_t npages = (n + page_size - 1) // page_size
    out = np.empty(npages, dtype=np.int64)
    cdef int64_t[::1] idx = out
    cdef Py_ssize_t count = 0
    cdef Py_ssize_t page, start, length
    if n == 0:
        return out[:0]
    with nogil:
        for page in range(npages):
            start = page * page_size
            length = n - start
            if length > page_size:
                length = page_size
            if memcmp(&old[start], &new[start], length) != 0:
                idx[count] = page
                count += 1
    return out[:count].copy() if count < npages // 2 else out[:count]


cdef Py_ssize_t _rle_compress(const uint8_t* src, Py_ssize_t n, uint8_t* dst) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t o = 0
    cdef Py_ssize_t run
    cdef uint8_t byte
    while i < n:
        byte = src[i]
        run = 1
        while i + run < n and src[i + run] == byte and run < 127:
            run += 1
        if run >= 4 or byte == 0xFF:
            dst[o] = 0xFF
            dst[o + 1] = <uint8_t>run
            dst[o + 2] = byte
            o += 3
        else:
            memcpy(dst + o, src + i, run)
            o += run
        i += run
    return o


def rle_compress(const uint8_t[::1] data):
    """The crate's "simple" RLE, byte-exact."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        return b""
    # Worst case is a lone 0xFF per byte: three output bytes for one input byte.
    buf = PyBytes_FromStringAndSize(NULL, 3 * n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t o
    with nogil:
        o = _rle_compress(&data[0], n, dst)
    return buf[:o]


cdef Py_ssize_t _rle_decoded_size(const uint8_t* src, Py_ssize_t n, Py_ssize_t* bad) noexcept nogil:
    """Output size of a stream, or -1 with ``bad[0]`` = offset, ``bad[1]`` = 0 truncated / 1 zero count."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t size = 0
    while i < n:
        if src[i] == 0xFF:
            if i + 2 >= n:
                bad[0] = i
                bad[1] = 0
                return -1
            if src[i + 1] == 0:
                bad[0] = i
                bad[1] = 1
                return -1
            size += src[i + 1]
            i += 3
        else:
            size += 1
            i += 1
    return size


cdef void _rle_decode(const uint8_t* src, Py_ssize_t n, uint8_t* dst) noexcept nogil:
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t o = 0
    cdef Py_ssize_t k, count
    cdef uint8_t byte
    while i < n:
        if src[i] == 0xFF:
            count = src[i + 1]
            byte = src[i + 2]
            for k in range(count):
                dst[o + k] = byte
            o += count
            i += 3
        else:
            dst[o] = src[i]
            o += 1
            i += 1


def rle_decompress(const uint8_t[::1] data, Py_ssize_t max_output=-1):
    """Strict decoder: refuses a truncated marker, a zero count and output over ``max_output``."""
    cdef Py_ssize_t n = data.shape[0]
    cdef Py_ssize_t bad[2]
    cdef Py_ssize_t size
    if n == 0:
        return b""
    with nogil:
        size = _rle_decoded_size(&data[0], n, bad)
    if size < 0:
        if bad[1] == 0:
            raise CorruptDataError(f"RLE stream truncated: marker at offset {bad[0]} needs two more bytes")
        raise CorruptDataError(f"RLE marker at offset {bad[0]} has a zero run length")
    if 0 <= max_output < size:
        raise CorruptDataError(f"RLE output exceeds max_output of {max_output} bytes")
    buf = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(buf)
    with nogil:
        _rle_decode(&data[0], n, dst)
    return buf


def gather_pages(const uint8_t[::1] state, indices, Py_ssize_t page_size):
    """Copies (``bytes``) of the named pages; the last page of the state may be short."""
    cdef Py_ssize_t n = state.shape[0]
    cdef Py_ssize_t start, length
    cdef list out = []
    for index in indices:
        start = <Py_ssize_t>index * page_size
        if index < 0 or start >= n:
            raise IndexError(f"page {index} is outside a state of {n} bytes")
        length = n - start
        if length > page_size:
            length = page_size
        out.append(PyBytes_FromStringAndSize(<const char*>&state[start], length))
    return out


def scatter_pages(uint8_t[::1] target, indices, pages, Py_ssize_t page_size):
    """Write each page at ``index * page_size``; bounds are checked before any write."""
    cdef Py_ssize_t n = target.shape[0]
    cdef Py_ssize_t start
    cdef const uint8_t[::1] page
    for index, data in zip(indices, pages):
        start = <Py_ssize_t>index * page_size
        if index < 0 or start + len(data) > n:
            raise IndexError(f"page {index} does not fit a target of {n} bytes")
    for index, data in zip(indices, pages):
        page = data
        start = <Py_ssize_t>index * page_size
        if page.shape[0]:
            with nogil:
                memcpy(&target[start], &page[0], page.shape[0])
