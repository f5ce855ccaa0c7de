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
    size_t cm_encode_pages(const uint8_t* nw, size_t nnew, const uint8_t* base, size_t nbase,
                           const int64_t* idx, size_t count, size_t page, unsigned allowed,
                           uint8_t* enc, int64_t* off, uint8_t* dst, uint8_t* scratch)
    int cm_check_pages(const uint8_t* src, size_t nsrc, const int64_t* off, const uint8_t* enc,
                       const int64_t* idx, size_t count, uint64_t total, size_t page,
                       unsigned allowed, int64_t prev, const uint8_t* base, size_t nbase,
                       uint8_t* out, size_t* pos, int64_t* detail)

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


def encode_pages(const uint8_t[::1] old, const uint8_t[::1] new, indices, Py_ssize_t page_size,
                 unsigned allowed):
    """Encode the pages ``indices`` of ``new`` against ``old`` (any length).

    Returns ``(encodings uint8[n], offsets int64[n + 1], payload bytes)``: page k is
    stored as ``payload[offsets[k]:offsets[k + 1]]`` with encoding ``encodings[k]``, the
    smallest of the encodings in the bit mask ``allowed`` (``1 << ENC_*``; RAW is always
    allowed), ties to the earlier of RAW, RLE, ZERO, XZR.
    """
    cdef int64_t[::1] idx = _indices(indices)
    cdef size_t count = idx.shape[0], nnew = new.shape[0], nold = old.shape[0]
    cdef size_t npages = _page_count(nnew, page_size)
    cdef Py_ssize_t k
    cdef size_t total = 0, start
    for k in range(<Py_ssize_t>count):
        if idx[k] < 0 or <uint64_t>idx[k] >= npages:
            raise IndexError(f"page {idx[k]} is outside a state of {nnew} bytes")
        start = <size_t>idx[k] * page_size
        total += nnew - start if nnew - start < <size_t>page_size else page_size
    encs = np.empty(count, dtype=np.uint8)
    offs = np.empty(count + 1, dtype=np.int64)
    cdef uint8_t[::1] enc = encs
    cdef int64_t[::1] off = offs
    cdef PyObject* raw = _new_bytes(NULL, total)
    if raw == NULL:
        raise MemoryError()
    cdef uint8_t* dst = <uint8_t*>PyBytes_AS_STRING(<object>raw)
    cdef uint8_t* scratch = <uint8_t*>malloc(5 * page_size + 64)
    if scratch == NULL:
        result = <object>raw
        Py_DECREF(result)
        raise MemoryError()
    cdef const uint8_t* pn = &new[0] if nnew else NULL
    cdef const uint8_t* po = &old[0] if nold else NULL
    cdef const int64_t* pi = &idx[0] if count else NULL
    cdef size_t o
    cdef PyThreadState* ts = _release(total)
    o = cm_encode_pages(pn, nnew, po, nold, pi, count, page_size, allowed | 1u, &enc[0] if count else NULL,
                        &off[0], dst, scratch)
    _reacquire(ts)
    free(scratch)
    if _PyBytes_Resize(&raw, o) < 0:
        raise MemoryError()
    result = <object>raw
    Py_DECREF(result)
    return encs, offs, result


def check_pages(const uint8_t[::1] payload, offsets, encodings, indices, uint64_t total_size,
                Py_ssize_t page_size, unsigned allowed, int64_t previous=-1, base=None, out=None):
    """Check (and decode, when ``out`` is given) stored pages; see ``_reference.check_pages``.

    Returns ``(code, position, detail)``, ``code`` 0 when every page is valid. With
    ``out`` (a writable buffer of ``len(indices) * page_size`` bytes), decoded page k is
    written at ``out[k * page_size:]``; XZR pages XOR into the pages of ``base``.
    """
    cdef int64_t[::1] idx = _indices(indices)
    cdef int64_t[::1] off = _offsets(offsets)
    cdef const uint8_t[::1] enc = _encs(encodings)
    cdef size_t count = idx.shape[0]
    cdef const uint8_t[::1] base_view
    cdef uint8_t[::1] out_view
    cdef const uint8_t* pb = NULL
    cdef uint8_t* po = NULL
    cdef size_t nbase = 0
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    if <size_t>enc.shape[0] != count or <size_t>off.shape[0] != count + 1:
        raise ValueError(f"{count} indices need {count} encodings and {count + 1} offsets")
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
    cdef size_t pos = 0
    cdef int64_t detail = 0
    cdef int rc
    cdef PyThreadState* ts = _release(nsrc + (count * page_size if po != NULL else 0))
    rc = cm_check_pages(ps, nsrc, &off[0], &enc[0] if count else NULL, &idx[0] if count else NULL, count,
                        total_size, page_size, allowed | 1u, previous, pb, nbase, po, &pos, &detail)
    _reacquire(ts)
    return rc, pos, detail
