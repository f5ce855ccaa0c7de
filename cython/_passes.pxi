# Included from _kernels.pyx (shares its imports, the GIL helpers and cm_checksum).
#
# The delta passes check "a base with pages laid over it" a chunk at a time (create: the
# base with the dirty pages as copied; apply: the base with the delta's pages). With a
# few pages in a chunk the Python layer feeds the hasher the clean runs as views of the
# base; with many (10% dirty is ~26 pages per MiB), one update call per run costs more
# than the hashing, so this kernel lays the chunk out once in a scratch buffer (the base
# bytes, zeros past a short base, the pages over them) and returns its checksum: the
# caller then hashes the scratch in one call, from cache.

from libc.stdlib cimport malloc, free
from libc.string cimport memset


def overlay_checksum(const uint8_t[::1] base, uint64_t offset, Py_ssize_t n, pages, starts,
                     uint8_t[::1] out):
    """Lay ``pages`` over ``base`` into ``out[:n]`` and return its checksum at ``offset``.

    ``base`` holds the chunk's base bytes (shorter than ``n``: zeros follow); ``pages[k]``
    (any buffer) goes at byte ``starts[k]`` of the chunk. Every page must fit in
    ``[0, n)`` and ``out`` must hold ``n`` bytes (``ValueError`` otherwise, before any
    write). Returns ``checksum(out[:n], offset)``.
    """
    cdef int64_t[::1] at = _indices(starts)
    cdef Py_ssize_t count = at.shape[0], k
    cdef size_t nb = base.shape[0]
    if n < 0 or <size_t>out.shape[0] < <size_t>n:
        raise ValueError(f"out holds {out.shape[0]} bytes, the chunk needs {n}")
    if len(pages) != count:
        raise ValueError(f"{len(pages)} pages but {count} starts")
    cdef _PageBuffers held = _PageBuffers(pages)
    for k in range(count):
        if at[k] < 0 or at[k] + <int64_t>held.lens[k] > n:
            raise ValueError(f"a page of {held.lens[k]} bytes at {at[k]} does not fit a chunk of {n} bytes")
    if n == 0:
        return 0
    cdef const uint8_t* const* src = held.ptrs
    cdef size_t* lens = held.lens
    cdef uint8_t* dst = &out[0]
    cdef const uint8_t* pb = &base[0] if nb else NULL
    cdef const int64_t* pa = &at[0] if count else NULL
    cdef size_t keep = nb if nb < <size_t>n else <size_t>n
    cdef uint32_t total
    cdef PyThreadState* ts = _release(<size_t>n)
    if keep:
        memcpy(dst, pb, keep)
    if keep < <size_t>n:
        memset(dst + keep, 0, <size_t>n - keep)
    for k in range(count):
        if lens[k]:
            memcpy(dst + pa[k], src[k], lens[k])
    total = cm_checksum(dst, <size_t>n, offset)
    _reacquire(ts)
    return total
