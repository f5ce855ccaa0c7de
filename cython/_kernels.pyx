# cython: language_level=3
"""Compiled hot path of cellmigrate (private: import from ``cellmigrate``).

How the kernels work (why, not what)
------------------------------------
The loops that decide throughput live in ``cm_simd.h``: each is written once portably
and once per x86 instruction set, and the fastest one the CPU supports is picked at
import (``CELLMIGRATE_FORCE_SCALAR=1`` forces the portable one). This module only turns
Python buffers into pointers and lengths (typed ``const uint8_t[::1]`` memoryviews, so
read-only buffers work and nothing is copied), validates arguments, and releases the GIL
around the C call -- but only from ``NOGIL_MIN_BYTES`` up: for a 4 KiB page, dropping
and re-taking the GIL would cost more than the work (python-xxhash does the same).
Big calls start their own threads inside one GIL-free call (``cm_claims.h``, with a
``threads`` argument: the checksum, the comparisons and the whole-state passes of
``_leaves.pxi``), the threads claiming chunks from one counter (the positioned checksum
makes the chunks' sums add up): a return to Python waits a switch interval for the GIL
whenever another thread runs Python, so a call returns once, not once per chunk.
``cellmigrate._parallel`` decides how many threads a call may use.

The contract is documented in ``cellmigrate._reference``, which is the test oracle for
this module. The ``_naive_*`` functions are the straightforward loops of each algorithm,
kept only as baselines for ``benches/``.
"""

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int64_t, INT64_MAX
from libc.string cimport memcmp, memcpy, memmove
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from cpython.bytes cimport _PyBytes_Resize
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF

cdef extern from "Python.h":
    ctypedef struct PyThreadState:
        pass
    PyThreadState* PyEval_SaveThread()
    void PyEval_RestoreThread(PyThreadState*)
    PyObject* _new_bytes "PyBytes_FromStringAndSize"(const char*, Py_ssize_t)

import numpy as np

from cellmigrate.errors import CorruptDataError

IMPLEMENTATION = "compiled"

cdef enum:
    _NOGIL_MIN = 64 * 1024

#: Below this many bytes a kernel keeps the GIL. Measured: dropping and re-taking an
#: uncontended GIL is lost in the noise of a 64 KiB checksum (~1.5 us), but when other
#: threads run Python, re-taking it can wait for a whole switch interval (5 ms), which
#: would multiply the cost of a 4 KiB page call; from 64 KiB up, letting other threads
#: run in parallel is worth that risk.
NOGIL_MIN_BYTES = _NOGIL_MIN


cdef inline PyThreadState* _release(size_t nbytes) noexcept:
    """Drop the GIL for big work only; pair with ``_reacquire``. Nothing between the
    two may touch a Python object (pointers are taken before)."""
    return PyEval_SaveThread() if nbytes >= _NOGIL_MIN else NULL


cdef inline void _reacquire(PyThreadState* ts) noexcept:
    if ts != NULL:
        PyEval_RestoreThread(ts)


cdef extern from "cm_leaves.h" nogil:
    uint64_t CM_ALL_LINES


cdef extern from "cm_simd.h" nogil:
    uint32_t cm_checksum(const uint8_t* p, size_t n, uint64_t offset)
    size_t cm_dirty_pages_checksum(const uint8_t* old, const uint8_t* new_, size_t n, size_t page,
                                   uint64_t offset, int64_t* idx, uint32_t* checksum)
    size_t cm_dirty_pages(const uint8_t* old, const uint8_t* new_, size_t n, size_t page, int64_t* idx)
    int64_t cm_first_difference(const uint8_t* a, const uint8_t* b, size_t n)
    size_t cm_rle_compress(const uint8_t* src, size_t n, uint8_t* dst)
    int cm_rle_decoded_size(const uint8_t* src, size_t n, int64_t max_output, size_t* size, size_t* where)
    void cm_rle_decode(const uint8_t* src, size_t n, uint8_t* dst, size_t size)
    void cm_copy_stream(uint8_t* dst, const uint8_t* src, size_t n)
    void cm_stream_fence()
    int cm_ctz64(uint64_t x)
    void cm_dispatch_init()
    int cm_dispatch_select(const char* name)
    int cm_path_supported(int k)
    const char* cm_path_name(int k)
    int cm_npaths()
    const char* cm_active_name()


cm_dispatch_init()


# --- dispatch (private, for tests and benches) ----------------------------------------

def _dispatch_paths():
    """Names of the code paths this CPU supports, slowest first (``"scalar"`` always)."""
    return [cm_path_name(k).decode() for k in range(cm_npaths()) if cm_path_supported(k)]


def _dispatch():
    """Name of the active code path."""
    return cm_active_name().decode()


def _set_dispatch(str name):
    """Make ``name`` the active path (tests only: not meant to race with kernel calls)."""
    cdef bytes raw = name.encode()
    cdef int rc = cm_dispatch_select(raw)
    if rc == -1:
        raise ValueError(f"unknown dispatch path {name!r}")
    if rc == -2:
        raise ValueError(f"dispatch path {name!r} is not supported by this CPU")


# --- checksums --------------------------------------------------------------------------

def checksum(const uint8_t[::1] data, uint64_t offset=0, int threads=1):
    """Weighted sum of ``data[i] * (offset + i + 1)`` modulo 2**32 (on up to ``threads``
    threads in one GIL-free call)."""
    _threads(threads)
    cdef size_t n = data.shape[0]
    cdef uint32_t result
    if n == 0:
        return 0
    cdef const uint8_t* p = &data[0]
    if threads != 1 and n > _claim_bytes:
        return _pair_pass(CM_PAIR_CHECKSUM, p, NULL, n, 0, offset, threads, NULL)
    cdef PyThreadState* ts = _release(n)
    result = cm_checksum(p, n, offset)
    _reacquire(ts)
    return result


cdef int64_t[::1] _indices(indices) except *:
    return np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)


from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_C_CONTIGUOUS, PyBUF_FORMAT
from libc.stdlib cimport malloc as _malloc, free as _free, calloc as _calloc


cdef class PageRows:
    """Pages held back to back in a few buffers, as a read-only sequence of page views.

    ``segments`` is a list of ``(buffer, count)``: the rows of each buffer are
    ``buffer[k * page : (k + 1) * page]`` for ``k < count``, in order, the segments one
    after the other; the very last row may be ``last`` bytes long (a state's short last
    page). Slicing gives another ``PageRows`` and the list-of-pages kernels read the rows
    straight from the buffers, so tens of thousands of pages cost no Python object each;
    an item is a read-only ``memoryview`` of its row.
    """

    cdef list segs  # [(buffer, first row, count)]
    cdef Py_ssize_t count, page, last

    def __cinit__(self, segments, Py_ssize_t page, Py_ssize_t last=-1):
        cdef Py_ssize_t total = 0, n, first
        if page <= 0:
            raise ValueError("page must be positive")
        if last < 0:
            last = page
        self.segs = []
        for seg in segments:
            if len(seg) == 2:
                base, n = seg
                first = 0
            else:
                base, first, n = seg
            if n < 0 or first < 0 or memoryview(base).nbytes < (first + n) * page - (page - last):
                raise ValueError(f"{n} rows of {page} bytes from row {first} do not fit the buffer")
            if n:
                self.segs.append((base, first, n))
                total += n
        if last > page or (total and last <= 0):
            raise ValueError(f"the last row has {last} bytes, rows have {page}")
        self.count = total
        self.page = page
        self.last = last

    def __len__(self):
        return self.count

    def __getitem__(self, key):
        cdef Py_ssize_t k, a, b, step, first, n, lo, hi
        if isinstance(key, slice):
            a, b, step = key.indices(self.count)
            if step != 1:
                raise ValueError("PageRows slices take step 1")
            out = []
            lo = 0
            for base, first, n in self.segs:
                hi = lo + n
                if hi > a and lo < b:
                    out.append((base, first + max(a, lo) - lo, min(b, hi) - max(a, lo)))
                lo = hi
            return PageRows(out, self.page, self.last if b == self.count and b > a else self.page)
        k = key
        if k < 0:
            k += self.count
        if k < 0 or k >= self.count:
            raise IndexError("page row out of range")
        lo = 0
        for base, first, n in self.segs:
            if k < lo + n:
                a = (first + k - lo) * self.page
                return memoryview(base).toreadonly()[a : a + (self.last if k == self.count - 1 else self.page)]
            lo += n
        raise IndexError("page row out of range")

    def __iter__(self):
        for k in range(self.count):
            yield self[k]

    def __reduce__(self):
        # Pickled (a delta sent to another process, deepcopy) as one bytes of its rows.
        joined = b"".join([bytes(row) for row in self])
        return (PageRows, ([(joined, self.count)] if self.count else [], self.page, self.last))


cdef class _PageBuffers:
    """The byte buffers of a list of pages, held (pointers and lengths) until released.

    One ``PyObject_GetBuffer`` per page: a typed memoryview per page costs a microsecond
    or more, which at tens of thousands of pages was most of a kernel's time. The pages
    must be 1-D C-contiguous unsigned-byte buffers, as the typed memoryviews required
    (``ValueError`` otherwise; ``TypeError`` for an object without the buffer protocol).
    """

    cdef Py_buffer* bufs
    cdef const uint8_t** ptrs
    cdef size_t* lens
    cdef Py_ssize_t count
    cdef Py_ssize_t held
    cdef size_t total

    def __cinit__(self, pages):
        cdef Py_ssize_t n = len(pages), k
        cdef Py_buffer* b
        cdef PageRows rows
        cdef const uint8_t* start
        cdef Py_ssize_t j
        self.count = n
        self.bufs = <Py_buffer*>_calloc(n + 1, sizeof(Py_buffer))
        self.ptrs = <const uint8_t**>_malloc((n + 1) * sizeof(uint8_t*))
        self.lens = <size_t*>_malloc((n + 1) * sizeof(size_t))
        if self.bufs == NULL or self.ptrs == NULL or self.lens == NULL:
            raise MemoryError()
        if isinstance(pages, PageRows):
            # One buffer per segment (checked to hold its rows when the rows were made).
            rows = <PageRows>pages
            k = 0
            for base, first, count in rows.segs:
                b = &self.bufs[self.held]
                PyObject_GetBuffer(base, b, PyBUF_C_CONTIGUOUS)
                self.held += 1
                start = <const uint8_t*>b.buf + <Py_ssize_t>first * rows.page
                for j in range(<Py_ssize_t>count):
                    self.ptrs[k] = start + j * rows.page
                    self.lens[k] = <size_t>(rows.last if k == n - 1 else rows.page)
                    self.total += self.lens[k]
                    k += 1
            return
        for k in range(n):
            b = &self.bufs[k]
            try:
                PyObject_GetBuffer(pages[k], b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
            except BufferError as exc:
                raise ValueError(f"page {k} is not a C-contiguous buffer: {exc}") from None
            self.held += 1
            if b.ndim > 1 or (b.format != NULL and b.format[0] != 0 and not (
                    (b.format[0] == b'B' and b.format[1] == 0) or
                    (b.format[0] in (b'=', b'<', b'>', b'@') and b.format[1] == b'B' and b.format[2] == 0))):
                raise ValueError(f"page {k} must be a 1-D buffer of unsigned bytes (format 'B', "
                                 f"got {(<bytes>b.format).decode() if b.format != NULL else 'B'!r}, ndim {b.ndim})")
            self.ptrs[k] = <const uint8_t*>b.buf
            self.lens[k] = <size_t>b.len
            self.total += <size_t>b.len

    def __dealloc__(self):
        cdef Py_ssize_t k
        if self.bufs != NULL:
            for k in range(self.held):
                PyBuffer_Release(&self.bufs[k])
        _free(self.bufs)
        _free(self.ptrs)
        _free(self.lens)


def state_pages_checksum(const uint8_t[::1] state, indices, Py_ssize_t page_size):
    """Sum of the positioned checksums of ``state``'s pages at ``indices`` (mod 2**32)."""
    cdef size_t n = state.shape[0]
    cdef int64_t[::1] idx = _indices(indices)
    cdef Py_ssize_t k, count = idx.shape[0]
    cdef size_t start, length
    cdef uint32_t total = 0
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    for k in range(count):
        if idx[k] < 0 or <uint64_t>idx[k] >= (n + page_size - 1) // page_size:
            raise IndexError(f"page {idx[k]} is outside a state of {n} bytes")
    cdef const uint8_t* p = &state[0] if n else NULL
    cdef const int64_t* ix = &idx[0] if count else NULL
    cdef PyThreadState* ts = _release(<size_t>count * page_size)
    for k in range(count):
        start = <size_t>ix[k] * page_size
        length = n - start if n - start < <size_t>page_size else page_size
        total += cm_checksum(p + start, length, start)
    _reacquire(ts)
    return total


def pages_checksum(pages, indices, Py_ssize_t page_size):
    """Sum of ``checksum(pages[k], offset=indices[k] * page_size)`` (mod 2**32)."""
    cdef int64_t[::1] idx = _indices(indices)
    cdef uint32_t total = 0
    cdef Py_ssize_t k
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    if len(pages) != idx.shape[0]:
        raise ValueError(f"{len(pages)} pages but {idx.shape[0]} indices")
    cdef _PageBuffers held = _PageBuffers(pages)
    for k in range(held.count):
        if idx[k] < 0:
            raise IndexError(f"page index {idx[k]} is negative")
    cdef PyThreadState* ts = _release(held.total)
    for k in range(held.count):
        if held.lens[k]:
            total += cm_checksum(held.ptrs[k], held.lens[k], <uint64_t>idx[k] * <uint64_t>page_size)
    _reacquire(ts)
    return total


# --- comparison -------------------------------------------------------------------------

def first_difference(const uint8_t[::1] a, const uint8_t[::1] b, int threads=1):
    """Index of the first differing byte of two equal-length buffers, or None (on up to
    ``threads`` threads in one GIL-free call; none reads past the claim (8 MiB) where
    the first difference is, or past the claims other threads had taken by then)."""
    _threads(threads)
    cdef size_t n = a.shape[0]
    cdef int64_t k
    if <size_t>b.shape[0] != n:
        raise ValueError("first_difference needs buffers of equal length")
    if n == 0:
        return None
    cdef const uint8_t* pa = &a[0]
    cdef const uint8_t* pb = &b[0]
    if threads != 1 and n > _claim_bytes:
        return _pair_pass(CM_PAIR_FIRST_DIFFERENCE, pa, pb, n, 0, 0, threads, NULL)
    cdef PyThreadState* ts = _release(n)
    k = cm_first_difference(pa, pb, n)
    _reacquire(ts)
    return None if k < 0 else k


cdef inline size_t _page_count(size_t n, Py_ssize_t page_size) except? 0:
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    return (n + page_size - 1) // <size_t>page_size


cdef object _trim(object out, size_t count, size_t npages):
    # A view keeps the whole index buffer alive: copy when that would waste much memory.
    if count == npages:
        return out
    if npages > 512 and count < npages // 2:
        return out[:count].copy()
    return out[:count]


def dirty_pages(const uint8_t[::1] old, const uint8_t[::1] new, Py_ssize_t page_size, int threads=1):
    """Indices (int64 array) of the pages where ``old`` and ``new`` differ (on up to
    ``threads`` threads in one GIL-free call)."""
    _threads(threads)
    cdef size_t n = old.shape[0]
    if <size_t>new.shape[0] != n:
        raise ValueError("dirty_pages needs buffers of equal length")
    cdef size_t npages = _page_count(n, page_size)
    out = np.empty(npages, dtype=np.int64)
    if n == 0:
        return out
    cdef int64_t[::1] idx = out
    cdef size_t count
    cdef const uint8_t* po = &old[0]
    cdef const uint8_t* pn = &new[0]
    cdef int64_t* pi = &idx[0]
    if threads != 1 and n > _claim_bytes:
        return _trim(out, _pair_pass(CM_PAIR_DIRTY, po, pn, n, <size_t>page_size, 0, threads, pi), npages)
    cdef PyThreadState* ts = _release(n)
    count = cm_dirty_pages(po, pn, n, page_size, pi)
    _reacquire(ts)
    return _trim(out, count, npages)


def dirty_pages_checksum(const uint8_t[::1] old, const uint8_t[::1] new, Py_ssize_t page_size,
                         uint64_t offset=0, int threads=1):
    """``(dirty_pages(old, new, page_size), checksum(new, offset))`` in one pass over ``new``
    (on up to ``threads`` threads in one GIL-free call)."""
    _threads(threads)
    cdef size_t n = old.shape[0]
    if <size_t>new.shape[0] != n:
        raise ValueError("dirty_pages_checksum needs buffers of equal length")
    cdef size_t npages = _page_count(n, page_size)
    out = np.empty(npages, dtype=np.int64)
    if n == 0:
        return out, 0
    cdef int64_t[::1] idx = out
    cdef size_t count
    cdef uint32_t total
    cdef const uint8_t* po = &old[0]
    cdef const uint8_t* pn = &new[0]
    cdef int64_t* pi = &idx[0]
    if threads != 1 and n > _claim_bytes:
        count, total = _pair_pass(CM_PAIR_DIRTY_CHECKSUM, po, pn, n, <size_t>page_size, offset, threads, pi)
        return _trim(out, count, npages), total
    cdef PyThreadState* ts = _release(n)
    count = cm_dirty_pages_checksum(po, pn, n, page_size, offset, pi, &total)
    _reacquire(ts)
    return _trim(out, count, npages), total


# --- RLE ----------------------------------------------------------------------------------

def rle_compress(const uint8_t[::1] data):
    """The crate's "simple" RLE, byte-exact."""
    cdef size_t n = data.shape[0]
    if n == 0:
        return b""
    # Worst case is a lone 0xFF per byte: three output bytes for one input byte. The
    # buffer is then shrunk in place (realloc), not copied into a second object.
    cdef PyObject* raw = _new_bytes(NULL, 3 * n)
    if raw == NULL:
        raise MemoryError()
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(<object>raw)
    cdef const uint8_t* src = &data[0]
    cdef size_t o
    cdef PyThreadState* ts = _release(n)
    o = cm_rle_compress(src, n, dst)
    _reacquire(ts)
    if _PyBytes_Resize(&raw, o) < 0:
        raise MemoryError()
    result = <object>raw
    Py_DECREF(result)
    return result


def rle_decompress(const uint8_t[::1] data, int64_t max_output=-1):
    """Strict decoder: refuses a truncated marker, a zero count and output over ``max_output``."""
    cdef size_t n = data.shape[0]
    cdef size_t size = 0
    cdef size_t where = 0
    cdef int rc
    if n == 0:
        return b""
    cdef const uint8_t* src = &data[0]
    cdef PyThreadState* ts = _release(n)
    rc = cm_rle_decoded_size(src, n, max_output, &size, &where)
    _reacquire(ts)
    if rc == 1:
        raise CorruptDataError(f"RLE stream truncated: marker at offset {where} needs two more bytes")
    if rc == 2:
        raise CorruptDataError(f"RLE marker at offset {where} has a zero run length")
    if rc == 3:
        raise CorruptDataError(f"RLE output exceeds max_output of {max_output} bytes")
    buf = PyBytes_FromStringAndSize(NULL, size)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(buf)
    ts = _release(n + size)
    cm_rle_decode(src, n, dst, size)
    _reacquire(ts)
    return buf


# --- pages ----------------------------------------------------------------------------------

def gather_pages(const uint8_t[::1] state, indices, Py_ssize_t page_size):
    """Copies (``bytes``) of the named pages; the last page of the state may be short."""
    cdef size_t n = state.shape[0]
    cdef size_t npages = _page_count(n, page_size)
    cdef int64_t[::1] idx = _indices(indices)
    cdef Py_ssize_t k
    cdef size_t start, length
    cdef list out = []
    for k in range(idx.shape[0]):
        if idx[k] < 0 or <uint64_t>idx[k] >= npages:
            raise IndexError(f"page {idx[k]} is outside a state of {n} bytes")
    for k in range(idx.shape[0]):
        start = <size_t>idx[k] * page_size
        length = n - start if n - start < <size_t>page_size else page_size
        out.append(PyBytes_FromStringAndSize(<const char*>&state[start], length))
    return out


# From this many bytes of pages on, scatter_pages writes with streaming stores (see
# cm_copy_stream): below it the pages may well be read again soon, from cache.
cdef enum:
    _SCATTER_STREAM_BYTES = 4 * 1024 * 1024


def scatter_pages(uint8_t[::1] target, indices, pages, Py_ssize_t page_size, const uint64_t[::1] changed=None):
    """Write ``pages[k]`` at ``indices[k] * page_size``; everything is checked before any write.

    ``changed`` (uint64, one per page; from ``overlay_leaves``): write only the 64-byte
    lines of page ``k`` whose bit is set (every bit set: the whole page). The caller
    vouches that the other lines already hold the page's bytes.
    """
    cdef size_t n = target.shape[0]
    cdef int64_t[::1] idx = _indices(indices)
    cdef Py_ssize_t k
    cdef size_t start, whole = 0, o, w
    cdef uint64_t m
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    if len(pages) != idx.shape[0]:
        raise ValueError(f"{len(pages)} pages but {idx.shape[0]} indices")
    if changed is not None and changed.shape[0] != idx.shape[0]:
        raise ValueError(f"{changed.shape[0]} line masks but {idx.shape[0]} pages")
    cdef _PageBuffers held = _PageBuffers(pages)
    for k in range(held.count):
        if held.lens[k] > <size_t>page_size:
            raise ValueError(f"page {idx[k]} has {held.lens[k]} bytes, more than page_size {page_size}")
        if idx[k] < 0 or <uint64_t>idx[k] * <uint64_t>page_size + held.lens[k] > n:
            raise IndexError(f"page {idx[k]} does not fit a target of {n} bytes")
        if changed is None or changed[k] == CM_ALL_LINES:
            whole += held.lens[k]
    cdef uint8_t* pt = &target[0] if n else NULL
    cdef const uint64_t* pm = &changed[0] if changed is not None and held.count else NULL
    cdef PyThreadState* ts = _release(held.total)
    for k in range(held.count):
        start = <size_t>idx[k] * page_size
        if pm == NULL or pm[k] == CM_ALL_LINES:
            if held.lens[k] == 0:
                continue
            if whole >= _SCATTER_STREAM_BYTES:
                # More than the caches hold: streaming stores skip reading each target line first.
                cm_copy_stream(pt + start, held.ptrs[k], held.lens[k])
            else:
                memcpy(pt + start, held.ptrs[k], held.lens[k])
            continue
        m = pm[k]
        while m:
            o = 64 * <size_t>cm_ctz64(m)
            m &= m - 1
            if o < held.lens[k]:
                w = held.lens[k] - o if held.lens[k] - o < 64 else 64
                memcpy(pt + start + o, held.ptrs[k] + o, w)
    if whole >= _SCATTER_STREAM_BYTES:
        cm_stream_fence()
    _reacquire(ts)


# --- straightforward loops (benchmark baselines only) ------------------------------------

def _naive_checksum(const uint8_t[::1] data, uint64_t offset=0):
    """The weighted checksum as a plain scalar loop (baseline for benches)."""
    cdef uint32_t acc = 0
    cdef uint32_t w = <uint32_t>offset
    cdef Py_ssize_t i
    with nogil:
        for i in range(data.shape[0]):
            w += 1
            acc += <uint32_t>data[i] * w
    return acc


def _naive_dirty_pages(const uint8_t[::1] old, const uint8_t[::1] new, Py_ssize_t page_size):
    """Dirty pages as a plain byte loop per page (baseline for benches)."""
    cdef Py_ssize_t n = old.shape[0]
    cdef Py_ssize_t npages = (n + page_size - 1) // page_size
    out = np.empty(npages, dtype=np.int64)
    cdef int64_t[::1] idx = out
    cdef Py_ssize_t page, i, end, count = 0
    with nogil:
        for page in range(npages):
            end = min((page + 1) * page_size, n)
            for i in range(page * page_size, end):
                if old[i] != new[i]:
                    idx[count] = page
                    count += 1
                    break
    return out[:count].copy()


def _naive_rle_compress(const uint8_t[::1] data):
    """The crate's RLE encoder as a plain byte loop (baseline for benches)."""
    cdef Py_ssize_t n = data.shape[0]
    if n == 0:
        return b""
    buf = PyBytes_FromStringAndSize(NULL, 3 * n)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t i = 0, o = 0, run
    cdef uint8_t byte
    with nogil:
        while i < n:
            byte = data[i]
            run = 1
            while i + run < n and data[i + run] == byte and run < 127:
                run += 1
            if run >= 4 or byte == 0xFF:
                dst[o] = 0xFF
                dst[o + 1] = <uint8_t>run
                dst[o + 2] = byte
                o += 3
            else:
                memcpy(dst + o, &data[i], run)
                o += run
            i += run
    return buf[:o]


# --- threads inside one GIL-free call (cm_claims.h), shared by the passes below ---------------

cdef extern from "cm_claims.h" nogil:
    ctypedef struct cm_claims:
        size_t done
    int CM_MAX_THREADS


# --- page encodings (zero pages, XOR + zero-run) -------------------------------------------

include "_encodings.pxi"
include "_passes.pxi"
include "_leaves.pxi"
include "_sendv.pxi"


# --- SIGBUS guard for mapped files (see cm_guard.h) ------------------------------------

cdef extern from "cm_guard.h" nogil:
    int cm_guard_add(const void* start, size_t length)
    long cm_guard_faults(int slot)
    long cm_guard_remove(int slot)


def _guard_add(const uint8_t[::1] mapping):
    """Guard a mapped file's pages against SIGBUS; returns a slot (-1: not guarded)."""
    if mapping.shape[0] == 0:
        return -1
    return cm_guard_add(&mapping[0], <size_t>mapping.shape[0])


def _guard_faults(int slot):
    """Pages of the slot's mapping read past the file's end so far (each read zeros)."""
    return cm_guard_faults(slot)


def _guard_remove(int slot):
    """Stop guarding a slot (call before unmapping); returns its final fault count."""
    return cm_guard_remove(slot)
