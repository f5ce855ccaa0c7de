# Page encodings of a delta (included by _kernels.pyx; the C is cm_pages.h).
#
# Batched: one call encodes, checks or decodes every dirty page of a delta (indices
# array + one contiguous payload + offsets), with the GIL released from NOGIL_MIN_BYTES
# up, so the Python layer has no per-page loop. Contract and oracle:
# cellmigrate._reference (encode_pages, check_pages, xzr_encode, xzr_decode).

cdef extern from "cm_pages.h" nogil:
    size_t cm_xzr_encode_active "cm_xzr_encode_entry"(const uint8_t* nw, const uint8_t* base, size_t L,
                                                       uint8_t* dst, size_t limit)
    int cm_xzr_decode(const uint8_t* src, size_t n, uint8_t* out, size_t L, size_t* where)
    void cm_advise_huge(void* p, size_t n)
    int cm_check_pages(const uint8_t* src, size_t nsrc, const int64_t* off, const uint8_t* enc,
                       const uint32_t* chk, const int64_t* idx, size_t count, uint64_t total, size_t page,
                       unsigned allowed, int64_t prev, const uint8_t* base, size_t nbase,
                       uint8_t* out, size_t* pos, int64_t* detail)

cdef extern from "cm_jobs.h" nogil:
    ctypedef struct cm_encode_job:
        cm_claims claims
        const uint8_t* const* pages
        const size_t* lens
        const uint8_t* base
        size_t nbase
        const int64_t* idx
        size_t count
        size_t page
        size_t per
        unsigned allowed
        const uint16_t* xzr_hint
        uint8_t* enc
        int64_t* off
        uint32_t* chk
        uint8_t* dst
        const size_t* room
        size_t* used
    int cm_encode_job_run(cm_encode_job* j, int threads)
    ctypedef struct cm_check_job:
        cm_claims claims
        const uint8_t* src
        size_t nsrc
        const int64_t* off
        const uint8_t* enc
        const uint32_t* chk
        const int64_t* idx
        size_t count
        uint64_t total
        size_t page
        size_t per
        unsigned allowed
        int64_t prev
        const uint8_t* base
        size_t nbase
        uint8_t* out
        int* rc
        size_t* pos
        int64_t* detail
    int cm_check_job_run(cm_check_job* j, int threads)
    size_t cm_encode_job_pack(cm_encode_job* j)

from libc.stdlib cimport malloc, free
from libc.string cimport memset

#: Wire values of the page encodings (docs/FORMAT.md).
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


def xzr_message(int rc, size_t where, size_t length):
    """The ``CorruptDataError`` text of XZR decode error ``rc`` (shared with the reference)."""
    return _XZR_MESSAGES[rc].format(where=where, length=length)


cdef int64_t[::1] _offsets(offsets) except *:
    return np.ascontiguousarray(offsets, dtype=np.int64).reshape(-1)


cdef const uint8_t[::1] _encs(encodings) except *:
    return np.ascontiguousarray(encodings, dtype=np.uint8).reshape(-1)


def xzr_encode(const uint8_t[::1] new_page, const uint8_t[::1] base_page):
    """XOR + zero-run stream of ``new_page`` against ``base_page`` (zero-extended or cut
    to ``len(new_page)``). Always returns the stream, even when it is not smaller."""
    cdef size_t L = new_page.shape[0]
    cdef size_t nb = base_page.shape[0]
    if L == 0:
        return b""
    cdef bytes padded
    cdef const uint8_t* bp
    if nb >= L:
        bp = &base_page[0]
    else:
        padded = bytes(base_page) + bytes(L - nb)
        bp = <const uint8_t*>PyBytes_AS_STRING(padded)
    cdef PyObject* raw = _new_bytes(NULL, L + 16)
    if raw == NULL:
        raise MemoryError()
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(<object>raw)
    cdef size_t o = cm_xzr_encode_active(&new_page[0], bp, L, dst, L + 16)
    if _PyBytes_Resize(&raw, o) < 0:
        raise MemoryError()
    result = <object>raw
    Py_DECREF(result)
    return result


def xzr_decode(const uint8_t[::1] stream, const uint8_t[::1] base_page, Py_ssize_t length):
    """Strict XZR decoder: ``length`` bytes of ``base_page`` (zero-extended or cut) with the
    stream's literals XORed in. Any malformed stream raises ``CorruptDataError``."""
    if length < 0:
        raise ValueError("length must be >= 0")
    cdef size_t L = length, n = stream.shape[0], nb = base_page.shape[0], where = 0
    out = PyBytes_FromStringAndSize(NULL, L)
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(out)
    cdef size_t have = nb if nb < L else L
    if have:
        memcpy(dst, &base_page[0], have)
    if L > have:
        memset(dst + have, 0, L - have)
    cdef int rc = 0
    if n:
        rc = cm_xzr_decode(&stream[0], n, dst, L, &where)
    if rc:
        raise CorruptDataError(xzr_message(rc, where, L))
    return out


cdef object _encode(const uint8_t* base, size_t nbase, const uint8_t** ptrs, size_t* lens, int64_t[::1] idx,
                    size_t count, size_t total, Py_ssize_t page_size, unsigned allowed,
                    const uint16_t* xzr_hint=NULL, int threads=1):
    """Run cm_encode_job over prepared page pointers (frees nothing: the caller owns them),
    on up to ``threads`` threads, into one payload."""
    encs = np.empty(count, dtype=np.uint8)
    offs = np.empty(count + 1, dtype=np.int64)
    chks = np.empty(count, dtype=np.uint32)
    cdef uint8_t[::1] enc = encs
    cdef int64_t[::1] off = offs
    cdef uint32_t[::1] chk = chks
    # Four runs a thread, so the others take the runs of a thread held up (its core
    # busy elsewhere). Not many more: a run starts writing at its room, and each room begun
    # faults in a fresh huge page of the payload that small encoded pages hardly fill
    # (256-page runs, 102 rooms for 10% of 1 GiB, made the 64-bytes-a-page create 6%
    # slower). One thread: one run, nothing to pack.
    cdef size_t per = count
    if threads > 1 and count > 256:
        per = max(<size_t>256, (count + 4 * threads - 1) // (4 * <size_t>threads))
    cdef size_t runs = (count + per - 1) // per if count else 0
    cdef size_t k, at = 0
    cdef size_t[::1] room = np.empty(runs + 1, dtype=np.uintp)
    cdef size_t[::1] used = np.empty(runs + 1, dtype=np.uintp)
    for k in range(count):
        if k % per == 0:
            room[k // per] = at
        at += lens[k]
    cdef PyObject* raw = _new_bytes(NULL, total)
    if raw == NULL:
        raise MemoryError()
    cdef cm_encode_job job
    job.pages = ptrs
    job.lens = lens
    job.base = base
    job.nbase = nbase
    job.idx = &idx[0] if count else NULL
    job.count = count
    job.page = <size_t>page_size
    job.per = per if per else 1
    job.allowed = allowed | 1u
    job.xzr_hint = xzr_hint
    job.enc = &enc[0] if count else NULL
    job.off = &off[0]
    job.chk = &chk[0] if count else NULL
    job.dst = <uint8_t*>PyBytes_AS_STRING(<object>raw)
    job.room = &room[0]
    job.used = &used[0]
    cdef size_t o = 0
    cdef PyThreadState* ts = _release(total)
    cm_advise_huge(<void*>job.dst, total)
    cm_encode_job_run(&job, threads if threads > 0 else 1)
    if job.claims.done == runs:
        o = cm_encode_job_pack(&job)
    _reacquire(ts)
    if job.claims.done < runs:  # no thread could make its scratch
        result = <object>raw
        Py_DECREF(result)
        raise MemoryError()
    off[0] = 0
    if _PyBytes_Resize(&raw, o) < 0:
        raise MemoryError()
    result = <object>raw
    Py_DECREF(result)
    return encs, offs, chks, result


def encode_pages(const uint8_t[::1] old, const uint8_t[::1] new, indices, Py_ssize_t page_size,
                 unsigned allowed, int threads=1):
    """Encode the pages ``indices`` of ``new`` against ``old`` (any length).

    Returns ``(encodings uint8[n], offsets int64[n + 1], checks uint32[n], payload bytes)``:
    page k is stored as ``payload[offsets[k]:offsets[k + 1]]`` (whose weighted checksum
    is ``checks[k]``) with encoding ``encodings[k]``, the smallest of the encodings in the
    bit mask ``allowed`` (``1 << ENC_*``; RAW is always allowed), ties to the earlier of
    RAW, RLE, ZERO, XZR. ``threads``: at most this many threads encode runs of pages.
    """
    cdef int nthreads = _threads(threads)
    cdef int64_t[::1] idx = _indices(indices)
    cdef size_t count = idx.shape[0], nnew = new.shape[0], nold = old.shape[0]
    cdef size_t npages = _page_count(nnew, page_size)
    cdef Py_ssize_t k
    cdef size_t total = 0, start
    for k in range(<Py_ssize_t>count):
        if idx[k] < 0 or <uint64_t>idx[k] >= npages:
            raise IndexError(f"page {idx[k]} is outside a state of {nnew} bytes")
    cdef const uint8_t** ptrs = <const uint8_t**>malloc((count + 1) * sizeof(uint8_t*))
    cdef size_t* lens = <size_t*>malloc((count + 1) * sizeof(size_t))
    if ptrs == NULL or lens == NULL:
        free(ptrs)
        free(lens)
        raise MemoryError()
    try:
        for k in range(<Py_ssize_t>count):
            start = <size_t>idx[k] * page_size
            lens[k] = nnew - start if nnew - start < <size_t>page_size else page_size
            ptrs[k] = &new[start]
            total += lens[k]
        return _encode(&old[0] if nold else NULL, nold, ptrs, lens, idx, count, total, page_size, allowed, NULL,
                       nthreads)
    finally:
        free(ptrs)
        free(lens)


def encode_page_list(const uint8_t[::1] old, pages, indices, Py_ssize_t page_size, unsigned allowed,
                     const uint16_t[::1] xzr_hints=None, int threads=1):
    """``encode_pages`` for pages given as separate buffers: ``pages[k]`` holds page
    ``indices[k]`` of the new state (at most ``page_size`` bytes; only a state's last page
    is short), encoded against the same bytes of ``old``.

    ``xzr_hints`` (uint16, one a page: ``PageArena.xzr_hints``): a page whose hint is
    ``XZR_HINT_NO_WIN`` is not tried as XZR (the create pass found it no smaller).
    """
    cdef int nthreads = _threads(threads)
    cdef int64_t[::1] idx = _indices(indices)
    cdef size_t count = idx.shape[0], nold = old.shape[0]
    cdef Py_ssize_t k
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    if len(pages) != <Py_ssize_t>count:
        raise ValueError(f"{len(pages)} pages but {count} indices")
    if xzr_hints is not None and <size_t>xzr_hints.shape[0] != count:
        raise ValueError(f"{xzr_hints.shape[0]} XZR hints but {count} pages")
    cdef _PageBuffers held = _PageBuffers(pages)
    # No state to bound the indices by: a page must at least end within 2**63 bytes, or
    # its byte offset wraps and XZR reads before ``old``.
    cdef int64_t last = (INT64_MAX - page_size) // page_size
    for k in range(<Py_ssize_t>count):
        if idx[k] < 0:
            raise IndexError(f"page index {idx[k]} is negative")
        if idx[k] > last:
            raise IndexError(f"page index {idx[k]} of {page_size}-byte pages ends past 2**63 bytes")
        if held.lens[k] == 0 or held.lens[k] > <size_t>page_size:
            raise ValueError(f"page {idx[k]} has {held.lens[k]} bytes, not 1..{page_size}")
    return _encode(&old[0] if nold else NULL, nold, held.ptrs, held.lens, idx, count, held.total, page_size, allowed,
                   &xzr_hints[0] if xzr_hints is not None and count else NULL, nthreads)


def check_pages(const uint8_t[::1] payload, offsets, encodings, indices, uint64_t total_size,
                Py_ssize_t page_size, unsigned allowed, int64_t previous=-1, base=None, out=None, checks=None,
                int threads=1):
    """Check (and decode, when ``out`` is given) stored pages; see ``_reference.check_pages``.

    Returns ``(code, position, detail)``, ``code`` 0 when every page is valid. With
    ``out`` (a writable buffer of ``len(indices) * page_size`` bytes), decoded page k is
    written at ``out[k * page_size:]``; XZR pages XOR into the pages of ``base``. With
    ``checks`` (uint32[n]), each page's stored bytes must have that weighted checksum.
    ``threads``: at most this many threads check runs of pages (the first failure by
    position is reported, as with one).
    """
    cdef int nthreads = _threads(threads)
    cdef int64_t[::1] idx = _indices(indices)
    cdef int64_t[::1] off = _offsets(offsets)
    cdef const uint8_t[::1] enc = _encs(encodings)
    cdef size_t count = idx.shape[0]
    cdef const uint32_t[::1] chk
    cdef const uint32_t* pc = NULL
    cdef const uint8_t[::1] base_view
    cdef uint8_t[::1] out_view
    cdef const uint8_t* pb = NULL
    cdef uint8_t* po = NULL
    cdef size_t nbase = 0
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    if <size_t>enc.shape[0] != count or <size_t>off.shape[0] != count + 1:
        raise ValueError(f"{count} indices need {count} encodings and {count + 1} offsets")
    if checks is not None:
        chk = np.ascontiguousarray(checks, dtype=np.uint32).reshape(-1)
        if <size_t>chk.shape[0] != count:
            raise ValueError(f"{count} indices need {count} checks")
        if count:
            pc = &chk[0]
    if base is not None:
        base_view = base
        nbase = base_view.shape[0]
        if nbase:
            pb = &base_view[0]
    if out is not None:
        out_view = out
        if <size_t>out_view.shape[0] < count * <size_t>page_size:
            raise ValueError(f"out has {out_view.shape[0]} bytes, {count} pages need {count * page_size}")
        if count:
            po = &out_view[0]
    cdef size_t nsrc = payload.shape[0]
    cdef const uint8_t* ps = &payload[0] if nsrc else NULL
    # 256 pages (1 MiB decoded) a claim; one thread: one run.
    cdef size_t per = count if nthreads <= 1 or count <= 256 else 256
    cdef size_t runs = (count + per - 1) // per if count else 0, k
    if runs == 0:
        return 0, 0, 0
    cdef int[::1] rcs = np.zeros(runs, dtype=np.intc)
    cdef size_t[::1] poss = np.zeros(runs, dtype=np.uintp)
    cdef int64_t[::1] details = np.zeros(runs, dtype=np.int64)
    cdef cm_check_job job
    job.src = ps
    job.nsrc = nsrc
    job.off = &off[0]
    job.enc = &enc[0]
    job.chk = pc
    job.idx = &idx[0]
    job.count = count
    job.total = total_size
    job.page = <size_t>page_size
    job.per = per
    job.allowed = allowed | 1u
    job.prev = previous
    job.base = pb
    job.nbase = nbase
    job.out = po
    job.rc = &rcs[0]
    job.pos = &poss[0]
    job.detail = &details[0]
    # The pages' decoded bytes, out or not: RLE and XZR pages are walked to their length
    # either way, and a big batch runs on threads (a batch of zero pages is no payload).
    cdef PyThreadState* ts = _release(nsrc + count * <size_t>page_size)
    cm_check_job_run(&job, nthreads)
    _reacquire(ts)
    for k in range(runs):  # every run before a failing one ran: the first failure is here
        if rcs[k]:
            return rcs[k], poss[k], details[k]
    return 0, 0, 0


def stored_checks(const uint8_t[::1] payload, offsets):
    """uint32[n]: the weighted checksum of each ``payload[offsets[k]:offsets[k + 1]]``."""
    cdef int64_t[::1] off = _offsets(offsets)
    cdef Py_ssize_t k, count = off.shape[0] - 1 if off.shape[0] else 0
    cdef size_t nsrc = payload.shape[0]
    out = np.empty(count, dtype=np.uint32)
    cdef uint32_t[::1] chk = out
    for k in range(count):
        if off[k] < 0 or off[k + 1] < off[k] or <size_t>off[k + 1] > nsrc:
            raise ValueError(f"offsets {off[k]}..{off[k + 1]} do not fit a payload of {nsrc} bytes")
    if count == 0:
        return out
    cdef const uint8_t* p = &payload[0] if nsrc else NULL
    cdef PyThreadState* ts = _release(nsrc)
    for k in range(count):
        chk[k] = cm_checksum(p + off[k], <size_t>(off[k + 1] - off[k]), 0) if off[k + 1] > off[k] else 0
    _reacquire(ts)
    return out


def join_buffers(parts):
    """``b"".join(parts)`` for big outputs: the result is advised onto huge pages before it
    is written (a fresh 100 MB buffer otherwise costs ~25,000 page faults) and filled with
    the GIL released."""
    cdef list views = [memoryview(p).cast("B") if not isinstance(p, bytes) else p for p in parts]
    cdef size_t total = 0
    cdef const uint8_t[::1] view
    cdef Py_ssize_t k, count = len(views)
    for part in views:
        total += len(part)
    cdef PyObject* raw = _new_bytes(NULL, total)
    if raw == NULL:
        raise MemoryError()
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(<object>raw)
    cdef const uint8_t** ptrs = <const uint8_t**>malloc((count + 1) * sizeof(uint8_t*))
    cdef size_t* lens = <size_t*>malloc((count + 1) * sizeof(size_t))
    if ptrs == NULL or lens == NULL:
        free(ptrs)
        free(lens)
        result = <object>raw
        Py_DECREF(result)
        raise MemoryError()
    cdef size_t o = 0
    cdef PyThreadState* ts
    try:
        for k in range(count):
            view = views[k]
            lens[k] = view.shape[0]
            ptrs[k] = &view[0] if lens[k] else NULL
        ts = _release(total)
        cm_advise_huge(<void*>dst, total)
        for k in range(count):
            if lens[k]:
                memcpy(dst + o, ptrs[k], lens[k])
                o += lens[k]
        _reacquire(ts)
    finally:
        free(ptrs)
        free(lens)
    result = <object>raw
    Py_DECREF(result)
    return result
