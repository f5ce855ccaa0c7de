# Included from _kernels.pyx (shares its imports, the GIL helpers and the SIMD kernels).
#
# The fused leaf kernels of the delta passes (cm_leaves.h): with the xxh3_128_tree digest
# a pass cuts the state into 1 MiB leaves, and one GIL-free call per span compares,
# copies, checksums and hashes each leaf while it is in this core's cache. Before these,
# the Python layer made a hasher call per clean run and per page and one `bytes` per
# copied page, which at 10% dirty pages cost more than reading the GiB.
#
# XXH3 comes from the xxhash package's own extension module (see cm_leaves.h and
# cellmigrate._xxh3, which binds it after checking it on test vectors).

from libc.stdint cimport uintptr_t
from cpython.buffer cimport PyBUF_SIMPLE, PyBUF_WRITABLE, PyBUF_ND, PyBUF_STRIDES

cdef extern from "cm_leaves.h" nogil:
    void cm_xxh3_bind(uintptr_t one128, uintptr_t one64, uintptr_t create, uintptr_t free_,
                      uintptr_t reset128, uintptr_t update128, uintptr_t digest128)
    int cm_xxh3_is_bound()
    void* cm_xxh3_state_new()
    void cm_xxh3_state_free(void* state)
    uint32_t cm_overlay_leaves(const uint8_t* base, uint64_t lo, uint64_t hi, size_t leaf,
                               const uint8_t* const* pages, const size_t* lens, const int64_t* starts,
                               size_t count, void* state, uint8_t* out, uint64_t* changed)
    ctypedef struct cm_arena:
        uint8_t* data
        int64_t* idx
        size_t cap
        size_t used
        size_t page
        uint16_t* xzr
    int CM_XZR_HINT_UNKNOWN
    int CM_XZR_HINT_NO_WIN
    int cm_arena_want_xzr(cm_arena* ar)
    void cm_arena_free(cm_arena* ar)
    void cm_arena_trim(cm_arena* ar)
    int cm_arena_reserve(cm_arena* ar, size_t more)
    size_t cm_pool_limit(size_t cap)
    int cm_pool_fork_safe()
    void cm_pool_hold(unsigned ms)
    int cm_pool_busy()
    uint32_t cm_scan_leaves(const uint8_t* old, const uint8_t* new_, uint64_t lo, uint64_t hi, size_t leaf,
                            cm_arena* ar, int64_t* scratch_idx, void* state, uint8_t* out, int* failed)
    uint32_t cm_scan_leaves_fp(const uint8_t* old, const uint8_t* new_, uint64_t lo, uint64_t hi, size_t leaf,
                               const uint64_t* fp_old, uint64_t* fp_new, uint8_t* tmp, cm_arena* ar,
                               void* state, uint8_t* out, int changes_only, int* stale, int* failed)


def _xxh3_bind(uintptr_t one128, uintptr_t one64, uintptr_t create, uintptr_t free_,
               uintptr_t reset128, uintptr_t update128, uintptr_t digest128):
    """Bind the xxHash library's functions by address (``cellmigrate._xxh3`` only; any 0 unbinds)."""
    cm_xxh3_bind(one128, one64, create, free_, reset128, update128, digest128)


def _xxh3_bound():
    """Whether the leaf kernels can hash (the xxHash functions are bound)."""
    return bool(cm_xxh3_is_bound())


cdef inline uint8_t* _leaf_out(out, Py_buffer* buf, Py_ssize_t need) except? NULL:
    """A writable pointer to ``need`` bytes of ``out`` (buf must be released by the caller)."""
    PyObject_GetBuffer(out, buf, PyBUF_SIMPLE | PyBUF_WRITABLE)
    if buf.len < need:
        PyBuffer_Release(buf)
        raise ValueError(f"out holds {buf.len} bytes, the leaf digests need {need}")
    return <uint8_t*>buf.buf


cdef extern from "cm_jobs.h" nogil:
    ctypedef struct cm_overlay_job:
        cm_claims claims
        const uint8_t* base
        size_t leaf
        const uint64_t* spans
        uint64_t lo
        const uint8_t* const* pages
        const size_t* lens
        const int64_t* starts
        const size_t* first
        uint32_t* sums
        uint8_t* out
        uint64_t* changed
    int cm_overlay_job_run(cm_overlay_job* j, size_t count, int threads)
    ctypedef struct cm_scan_job:
        cm_claims claims
        const uint8_t* old
        const uint8_t* new_
        size_t leaf
        const uint64_t* spans
        uint64_t lo
        cm_arena** arenas
        uint32_t* sums
        uint8_t* stale
        const uint64_t* fp_old
        uint64_t* fp_new
        uint8_t* out
        int changes_only
        int nomem_chunk
    int cm_scan_job_run(cm_scan_job* j, size_t count, int threads)
    ctypedef struct cm_tree_job:
        cm_claims claims
        const uint8_t* data
        size_t n
        size_t leaf
        size_t per
        uint8_t* out
    int cm_tree_job_run(cm_tree_job* j, int threads)
    ctypedef struct cm_fp_job:
        cm_claims claims
        const uint8_t* data
        size_t n
        size_t page
        size_t chunk
        uint64_t offset
        uint64_t* out
        uint32_t* sums
    int cm_fp_job_run(cm_fp_job* j, int threads)
    ctypedef struct cm_gather_job:
        cm_claims claims
        const uint8_t* state
        size_t n
        size_t page
        const int64_t* idx
        size_t count
        size_t per
        uint8_t* dst
        uint8_t* out
    int cm_gather_job_run(cm_gather_job* j, int threads)


#: The most threads one kernel call starts (more gain nothing on a memory-bound pass).
MAX_THREADS = CM_MAX_THREADS

cdef extern from "cm_claims.h" nogil:
    int cm_claims_init()
    void cm_workers_stats(int* running, int* peak)

if cm_claims_init() != 0:
    raise ImportError("cellmigrate._kernels: pthread_atfork failed")


def _workers_stats():
    """``(running, peak)``: worker threads of kernel calls running now, and the most that
    ran at once since the previous call (which restarts the peak from ``running``).

    Calls share one budget: a call with ``threads=n`` starts only the workers left free
    under ``n - 1`` by the calls already running (its own thread always works)."""
    cdef int running = 0, peak = 0
    cm_workers_stats(&running, &peak)
    return running, peak


cdef int _threads(int threads) except -1:
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return threads if threads < CM_MAX_THREADS else CM_MAX_THREADS


cdef object _chunk_spans(spans, uint64_t leaf, uint64_t limit):
    """``spans`` as a C-contiguous (count, 2) uint64 array of ``(lo, hi)`` byte ranges,
    checked: each starts on a leaf (a multiple of ``leaf``), none before the end of the
    one before, none past ``limit``; ``ValueError`` otherwise."""
    try:
        given = np.asarray(spans)
        if given.size and (given.dtype.kind not in "iu" or (given.dtype.kind == "i" and given.min() < 0)):
            raise TypeError(f"{given.dtype} values")
        arr = np.ascontiguousarray(given, dtype=np.uint64).reshape(-1, 2)
    except (OverflowError, TypeError, ValueError) as exc:
        raise ValueError(f"spans must be (lo, hi) pairs of byte offsets: {exc}") from None
    cdef const uint64_t[:, ::1] s = arr
    cdef Py_ssize_t k
    for k in range(s.shape[0]):
        if s[k, 0] % leaf or s[k, 0] > s[k, 1] or s[k, 1] > limit or (k and s[k, 0] < s[k - 1, 1]):
            raise ValueError(f"span [{s[k, 0]}, {s[k, 1]}) must start on a leaf of {leaf} bytes, not before "
                             f"the span before it, and end within {limit} bytes")
    return arr


def overlay_leaves(const uint8_t[::1] base, uint64_t lo, uint64_t hi, pages, starts, Py_ssize_t leaf, out=None,
                   uint64_t[::1] changed=None):
    """Checksum of bytes ``[lo, hi)`` of ``base`` with ``pages`` laid over it, and with
    ``out`` each 1-leaf XXH3-128 digest of those bytes (canonical, 16 bytes a leaf, in order).

    ``lo`` is a multiple of ``leaf``; ``hi <= len(base)``; ``pages[k]`` (any C-contiguous
    buffer) goes at absolute byte ``starts[k]``; starts ascending, pages inside
    ``[lo, hi)``, not overlapping and none across a leaf boundary. ``ValueError`` before
    any work otherwise, or when ``out`` is given but XXH3 is not bound.

    ``changed`` (uint64, at least one per page) receives each page's line mask: bit ``j``
    set for every 64-byte line ``j`` of the page that differs from the base under it, and
    maybe for others (all bits where the kernel did not compare: a page over 4096 bytes,
    a block mostly covered by pages); see ``scatter_pages``.
    """
    if leaf <= 0 or lo % <uint64_t>leaf or lo > hi or hi > <uint64_t>base.shape[0]:
        raise ValueError(f"span [{lo}, {hi}) must start on a leaf and fit a base of {base.shape[0]} bytes")
    return overlay_leaves_chunks(base, [(lo, hi)], pages, starts, leaf, out, changed)


def overlay_leaves_chunks(const uint8_t[::1] base, spans, pages, starts, Py_ssize_t leaf, out=None,
                          uint64_t[::1] changed=None, int threads=1):
    """:func:`overlay_leaves` over several chunks in one call, on up to ``threads`` threads
    that claim the chunks one at a time; returns the checksum of all of them (mod 2**32).

    ``spans``: the chunks' ``(lo, hi)`` byte ranges, each starting on a leaf, ascending,
    not overlapping, within ``base``; ``out`` holds the digests of the leaves from the
    first chunk's start to the last one's end (16 bytes a leaf; a gap between chunks
    leaves its slots unwritten); every page lies inside one chunk. ``ValueError`` before
    any work otherwise.
    """
    if leaf <= 0:
        raise ValueError("leaf must be positive")
    cdef int nthreads = _threads(threads)
    arr = _chunk_spans(spans, <uint64_t>leaf, <uint64_t>base.shape[0])
    cdef const uint64_t[:, ::1] s = arr
    cdef Py_ssize_t nchunks = s.shape[0]
    cdef int64_t[::1] at = _indices(starts)
    cdef Py_ssize_t count = at.shape[0], k, c
    if len(pages) != count:
        raise ValueError(f"{len(pages)} pages but {count} starts")
    if out is not None and not cm_xxh3_is_bound():
        raise ValueError("XXH3 is not bound: leaf digests need cellmigrate._xxh3")
    if changed is not None and changed.shape[0] < count:
        raise ValueError(f"changed holds {changed.shape[0]} masks, there are {count} pages")
    cdef uint64_t lo = s[0, 0] if nchunks else 0
    cdef uint64_t hi = s[nchunks - 1, 1] if nchunks else 0
    cdef uint64_t nleaves = (hi - lo + <uint64_t>leaf - 1) // <uint64_t>leaf
    cdef _PageBuffers held = _PageBuffers(pages)
    firsts = np.zeros(nchunks + 1, dtype=np.uintp)
    cdef size_t[::1] first = firsts
    cdef uint64_t pos = lo
    c = 0
    for k in range(count):
        # Page k belongs to the last chunk starting at or before it (chunks and pages
        # ascend); it must fit in that chunk, after the page before, within one leaf.
        while c + 1 < nchunks and <uint64_t>at[k] >= s[c + 1, 0]:
            c += 1
            first[c] = <size_t>k
            pos = s[c, 0]
        if (nchunks == 0 or at[k] < <int64_t>pos or <uint64_t>at[k] + held.lens[k] > s[c, 1] or (held.lens[k] and
                <uint64_t>at[k] // <uint64_t>leaf != (<uint64_t>at[k] + held.lens[k] - 1) // <uint64_t>leaf)):
            raise ValueError(f"a page of {held.lens[k]} bytes at {at[k]} overlaps another, lies outside the chunks "
                             f"or crosses a leaf")
        pos = <uint64_t>at[k] + held.lens[k]
    for c in range(c + 1, nchunks + 1):
        first[c] = <size_t>count
    cdef Py_buffer outbuf
    cdef uint8_t* po = NULL
    cdef uint32_t[::1] sums = np.zeros(max(nchunks, 1), dtype=np.uint32)
    cdef cm_overlay_job job
    memset(&job, 0, sizeof(job))
    cdef PyThreadState* ts
    if out is not None:
        po = _leaf_out(out, &outbuf, <Py_ssize_t>(16 * nleaves))
    try:
        job.base = &base[0] if base.shape[0] else NULL
        job.leaf = <size_t>leaf
        job.spans = &s[0, 0] if nchunks else NULL
        job.lo = lo
        job.pages = held.ptrs
        job.lens = held.lens
        job.starts = &at[0] if count else NULL
        job.first = &first[0]
        job.sums = &sums[0]
        job.out = po
        job.changed = &changed[0] if changed is not None and count else NULL
        if changed is not None:
            changed[:count] = 0  # zero-length pages of empty chunks are not visited
        if hi > lo:
            ts = _release(<size_t>(hi - lo))
            cm_overlay_job_run(&job, <size_t>nchunks, nthreads)
            _reacquire(ts)
            if job.claims.done < <size_t>nchunks:
                raise MemoryError()  # no thread could make its scratch
    finally:
        if po != NULL:
            PyBuffer_Release(&outbuf)
    return int(np.asarray(sums)[:nchunks].sum(dtype=np.uint64) & 0xFFFFFFFF)


_arena_pool_cap = 256 << 20
if not cm_pool_fork_safe():
    raise ImportError("cellmigrate._kernels: pthread_atfork failed (the arena pool would not be fork-safe)")


def _hold_arena_pool(unsigned ms):
    """Tests only: hold the arena pool's lock for ``ms`` milliseconds, GIL released (a
    thread in the middle of taking or keeping an arena, as a fork may find it). Linux
    only: elsewhere there is no pool, and this returns at once."""
    with nogil:
        cm_pool_hold(ms)


def _arena_pool_busy():
    """Tests only: whether some thread holds the arena pool's lock right now."""
    return bool(cm_pool_busy())


def arena_pool(limit=None):
    """The bytes of freed page arenas kept for the next ones (fresh memory costs a VM a
    host fault a page: 2.8 us a 4 KiB page on the Firecracker VM measured). ``limit``
    (bytes) sets the most kept (256 MiB at first; 0 frees them all); returns
    ``(kept, limit)``. A new arena always takes a kept mapping first, so arena memory
    mapped never exceeds the most in use at once. Linux only (elsewhere nothing is kept).
    """
    global _arena_pool_cap
    cdef size_t cap = <size_t>_arena_pool_cap
    if limit is not None:
        if not 0 <= limit < 2**63:
            raise ValueError(f"limit must be 0 .. 2**63 - 1 bytes, got {limit}")
        cap = <size_t>limit
        _arena_pool_cap = int(limit)
    return int(cm_pool_limit(cap)), _arena_pool_cap


cdef class PageArena:
    """The page copies of a create pass: one growing buffer, slot ``k`` holding page
    ``indices[k]`` (``page`` bytes a slot; the state's last page may use part of its slot).
    ``reserve`` slots are mapped up front (address space only: pages are faulted in as
    copies land, on huge pages where the kernel allows); :meth:`trim` returns the rest.

    Exposes the used slots as a read-only 1-D byte buffer (``memoryview(arena)``): the
    delta's pages are views of it, so no page is a Python object of its own.
    """

    cdef cm_arena ar
    cdef Py_ssize_t exports
    cdef bint busy  # a scan_leaves_chunks call is filling it (GIL released)

    def __cinit__(self, Py_ssize_t page, Py_ssize_t reserve=0):
        if page <= 0 or reserve < 0:
            raise ValueError("page must be positive, reserve non-negative")
        self.ar.page = <size_t>page
        if reserve and cm_arena_reserve(&self.ar, <size_t>reserve) != 0:
            raise MemoryError(f"cannot reserve {reserve} pages")

    def trim(self):
        """Give back the reserved slots past the used ones (after a pass filled what it would)."""
        if self.exports or self.busy:
            raise BufferError("the arena's pages are exported or being filled: it cannot shrink")
        cm_arena_trim(&self.ar)

    def __dealloc__(self):
        cm_arena_free(&self.ar)

    def __len__(self):
        """Pages held."""
        return self.ar.used

    @property
    def indices(self):
        """The page numbers, int64, in slot order (a copy)."""
        out = np.empty(self.ar.used, dtype=np.int64)
        cdef int64_t[::1] o = out
        if self.ar.used:
            memcpy(&o[0], self.ar.idx, self.ar.used * sizeof(int64_t))
        return out

    @property
    def xzr_hints(self):
        """Each copy's XZR hint (uint16, slot order, a copy; ``None`` unless a pass was
        asked for them): the size of the page's XZR stream against its base when that
        is smaller than the page, ``XZR_HINT_NO_WIN`` when it is not, ``XZR_HINT_UNKNOWN``
        when not taken (see ``scan_leaves``)."""
        if self.ar.xzr == NULL:
            return None
        out = np.empty(self.ar.used, dtype=np.uint16)
        cdef uint16_t[::1] o = out
        if self.ar.used:
            memcpy(&o[0], self.ar.xzr, self.ar.used * sizeof(uint16_t))
        return out

    def __getbuffer__(self, Py_buffer* buf, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("a PageArena is read-only")
        if self.busy:
            raise BufferError("the arena is being filled by a scan")
        buf.buf = self.ar.data
        buf.obj = self
        buf.len = <Py_ssize_t>(self.ar.used * self.ar.page)
        buf.readonly = 1
        buf.itemsize = 1
        if flags & PyBUF_FORMAT:
            buf.format = b"B"
        else:
            buf.format = NULL
        buf.ndim = 1
        buf.shape = &buf.len if flags & PyBUF_ND else NULL
        buf.strides = &buf.itemsize if (flags & PyBUF_STRIDES) == PyBUF_STRIDES else NULL
        buf.suboffsets = NULL
        buf.internal = NULL
        self.exports += 1

    def __releasebuffer__(self, Py_buffer* buf):
        self.exports -= 1


def scan_leaves(const uint8_t[::1] old, const uint8_t[::1] new, uint64_t lo, uint64_t hi, Py_ssize_t leaf,
                PageArena arena, out=None, bint xzr_hints=False, const uint64_t[::1] fingerprints=None,
                uint64_t[::1] new_fingerprints=None, bint checksum_changes=False):
    """The create pass over the leaves of ``[lo, hi)``; returns the checksum.

    Pages of ``new`` that differ from ``old`` are copied into ``arena`` with their page
    numbers; the checksum is the positioned checksum of ``old`` with those copies over it
    (never a second read of ``new``) and, with ``out``, each leaf's XXH3-128 of those
    bytes goes to ``out`` (16 bytes a leaf, from the leaf at ``lo``). ``lo`` is a multiple
    of ``leaf``, ``leaf`` of the arena's page; both states hold ``hi`` bytes at least
    (``ValueError`` otherwise); ``MemoryError`` when the copies do not fit in memory.

    ``xzr_hints``: also take each copy's XZR hint (``PageArena.xzr_hints``) while the copy
    and its old page are in cache, for ``encode_page_list``.

    ``fingerprints`` and ``new_fingerprints`` (uint64, one per page, indexed by page
    number, covering ``[lo, hi)``; given together): the XXH3-64 of each page of ``old``
    in, each page of ``new`` as read out. Then ``new`` is read once, and ``old`` only under
    the pages whose XXH3-64 differs from the table (for their XZR hints); the checksum and
    leaves cover the bytes read from ``new``, which equal "old with the copies over it"
    wherever the table describes ``old``. ``checksum_changes`` (with the tables): return
    ``(change, stale)`` instead: what the copies change in ``old[lo:hi]``'s checksum (mod
    2**32), for a caller that knows that checksum (the clean pages are then not
    checksummed at all), and whether ``old`` under some copy is not what the table says
    (then the table's checksum is not ``old``'s: take ``old``'s own).

    The arena gets room for every page of the span before the pass (one mapping, no
    growth while copying) and gives back what it did not use after it.
    """
    if leaf <= 0 or <size_t>leaf % arena.ar.page or lo % <uint64_t>leaf or lo > hi:
        raise ValueError(f"span [{lo}, {hi}) must start on a leaf of whole pages")
    if hi > <uint64_t>old.shape[0] or hi > <uint64_t>new.shape[0]:
        raise ValueError(f"span [{lo}, {hi}) does not fit states of {old.shape[0]} and {new.shape[0]} bytes")
    got = scan_leaves_chunks(old, new, [(lo, hi)], leaf, [arena], out, xzr_hints, fingerprints, new_fingerprints,
                             checksum_changes)
    return got if checksum_changes else got[0]


def scan_leaves_chunks(const uint8_t[::1] old, const uint8_t[::1] new, spans, Py_ssize_t leaf, arenas, out=None,
                       bint xzr_hints=False, const uint64_t[::1] fingerprints=None,
                       uint64_t[::1] new_fingerprints=None, bint checksum_changes=False, int threads=1):
    """:func:`scan_leaves` over several chunks in one call, on up to ``threads`` threads
    that claim the chunks one at a time (one return to Python for the whole pass).

    ``spans``: the chunks' ``(lo, hi)`` byte ranges, each starting on a leaf, ascending,
    not overlapping, within both states; ``arenas``: one :class:`PageArena` a chunk (all
    of one page size dividing ``leaf``; a chunk's copies go to its own); ``out`` holds
    the digests of the leaves from the first chunk's start to the last one's end.
    Returns ``(checksum, stale)``: the checksum of all chunks (mod 2**32; with
    ``checksum_changes``, what the copies change in old's) and whether ``old`` under
    some copy is not what the fingerprint table says (always False without it).
    ``ValueError`` before any work on a bad argument; ``MemoryError`` when the copies do
    not fit in memory (the arenas then hold part of them).
    """
    if leaf <= 0:
        raise ValueError("leaf must be positive")
    cdef int nthreads = _threads(threads)
    arr = _chunk_spans(spans, <uint64_t>leaf, <uint64_t>min(old.shape[0], new.shape[0]))
    cdef const uint64_t[:, ::1] s = arr
    cdef Py_ssize_t nchunks = s.shape[0], k
    arenas = tuple(arenas)  # held for the call, whatever the caller does with its list
    if len(arenas) != nchunks:
        raise ValueError(f"{len(arenas)} arenas for {nchunks} chunks")
    if len({id(a) for a in arenas}) != nchunks:
        raise ValueError("each chunk needs an arena of its own (threads fill them at once)")
    cdef size_t page = 0
    cdef PageArena arena
    for arena in arenas:  # (a non-PageArena raises TypeError here)
        if page == 0:
            page = arena.ar.page
        if arena.ar.page != page or <size_t>leaf % page:
            raise ValueError(f"arenas of {arena.ar.page}-byte pages: each must have pages of {page} bytes, "
                             f"a divisor of the {leaf}-byte leaf")
        if arena.exports or arena.busy:
            raise BufferError("the arena's pages are exported or being filled: it cannot grow")
    if (out is not None or fingerprints is not None) and not cm_xxh3_is_bound():
        raise ValueError("XXH3 is not bound: leaf digests and fingerprints need cellmigrate._xxh3")
    if (fingerprints is None) != (new_fingerprints is None):
        raise ValueError("fingerprints and new_fingerprints go together")
    if checksum_changes and fingerprints is None:
        raise ValueError("checksum_changes needs the fingerprint tables")
    cdef uint64_t lo = s[0, 0] if nchunks else 0
    cdef uint64_t hi = s[nchunks - 1, 1] if nchunks else 0
    cdef uint64_t need = (hi + page - 1) // page if page else 0
    if fingerprints is not None and <uint64_t>min(fingerprints.shape[0], new_fingerprints.shape[0]) < need:
        raise ValueError(f"fingerprint tables of {fingerprints.shape[0]} and {new_fingerprints.shape[0]} pages; "
                         f"[{lo}, {hi}) needs {need}")
    cdef uint64_t nleaves = (hi - lo + <uint64_t>leaf - 1) // <uint64_t>leaf
    for arena in arenas:
        if xzr_hints and cm_arena_want_xzr(&arena.ar) != 0:
            raise MemoryError()
    ptrs = np.zeros(max(nchunks, 1), dtype=np.uintp)
    cdef size_t[::1] pa = ptrs
    for k in range(nchunks):
        pa[k] = <size_t>&(<PageArena>arenas[k]).ar
    cdef uint32_t[::1] sums = np.zeros(max(nchunks, 1), dtype=np.uint32)
    cdef uint8_t[::1] stale = np.zeros(max(nchunks, 1), dtype=np.uint8)
    cdef Py_buffer outbuf
    cdef uint8_t* po = NULL
    cdef cm_scan_job job
    memset(&job, 0, sizeof(job))
    cdef PyThreadState* ts
    if out is not None:
        po = _leaf_out(out, &outbuf, <Py_ssize_t>(16 * nleaves))
    for arena in arenas:
        arena.busy = True
    try:
        job.old = &old[0] if old.shape[0] else NULL
        job.new_ = &new[0] if new.shape[0] else NULL
        job.leaf = <size_t>leaf
        job.spans = &s[0, 0] if nchunks else NULL
        job.lo = lo
        job.arenas = <cm_arena**>&pa[0]
        job.sums = &sums[0]
        job.stale = &stale[0]
        job.fp_old = &fingerprints[0] if fingerprints is not None and fingerprints.shape[0] else NULL
        job.fp_new = &new_fingerprints[0] if new_fingerprints is not None and new_fingerprints.shape[0] else NULL
        job.out = po
        job.changes_only = checksum_changes
        if hi > lo:
            ts = _release(<size_t>(hi - lo))
            cm_scan_job_run(&job, <size_t>nchunks, nthreads)
            _reacquire(ts)
            if job.nomem_chunk or job.claims.done < <size_t>nchunks:
                raise MemoryError(f"out of memory copying the dirty pages of [{lo}, {hi})")
    finally:
        for arena in arenas:
            arena.busy = False
        if po != NULL:
            PyBuffer_Release(&outbuf)
    total = int(np.asarray(sums)[:nchunks].sum(dtype=np.uint64) & 0xFFFFFFFF)
    return total, bool(np.asarray(stale)[:nchunks].any())


# Bytes a thread claims at a time in the whole-buffer kernels: big enough that claiming
# costs nothing, small enough that a thread whose core is busy elsewhere takes fewer of
# them instead of the call waiting for its fixed half.
cdef size_t _claim_bytes = 8 << 20


def _set_claim_bytes(size_t n):
    """Tests only: the bytes a thread claims at a time (at least one page is taken);
    returns the previous value. Small claims run the many-chunk paths on small inputs.
    Process-wide and not itself thread-safe (each call reads it once, with the GIL)."""
    global _claim_bytes
    if n == 0:
        raise ValueError("claims must be at least one byte")
    previous = _claim_bytes
    _claim_bytes = n
    return previous


cdef inline size_t _units_a_claim(size_t unit, size_t units) noexcept:
    """Units (pages, leaves; ``unit`` bytes each) a thread claims at a time: ``_claim_bytes``
    worth, at least one, at most ``units`` (the whole input: no wrap in ``units + per - 1``)."""
    cdef size_t per = _claim_bytes // unit
    if per == 0:
        per = 1
    return per if per < units else (units if units else 1)


def page_digests64(const uint8_t[::1] data, Py_ssize_t page, uint64_t[::1] out, uint64_t offset=0,
                   int threads=1):
    """XXH3-64 of each ``page``-byte page of ``data`` (the last may be short) into ``out``;
    returns ``data``'s positioned checksum as if it began at byte ``offset`` of its state.

    A per-page fingerprint table: comparing a state's page digests with the table of what
    was sent finds the pages written since, reading the state once (not state + shadow).
    ``out`` needs one slot per page; ``ValueError`` otherwise or when XXH3 is not bound.
    Runs on up to ``threads`` threads, in one GIL-free call.
    """
    cdef size_t n = data.shape[0]
    if page <= 0:
        raise ValueError("page must be positive")
    cdef int nthreads = _threads(threads)
    cdef size_t npages = (n + <size_t>page - 1) // <size_t>page
    if <size_t>out.shape[0] < npages:
        raise ValueError(f"out holds {out.shape[0]} digests, {npages} pages need one each")
    if not cm_xxh3_is_bound():
        raise ValueError("XXH3 is not bound: page digests need cellmigrate._xxh3")
    if n == 0:
        return 0
    cdef cm_fp_job job
    memset(&job, 0, sizeof(job))
    job.data = &data[0]
    job.n = n
    job.page = <size_t>page
    job.chunk = _units_a_claim(<size_t>page, npages) * <size_t>page
    job.offset = offset
    job.out = &out[0]
    cdef uint32_t[::1] sums = np.zeros((n + job.chunk - 1) // job.chunk, dtype=np.uint32)
    job.sums = &sums[0]
    cdef PyThreadState* ts = _release(n)
    cm_fp_job_run(&job, nthreads)
    _reacquire(ts)
    return int(np.asarray(sums).sum(dtype=np.uint64) & 0xFFFFFFFF)


def page_digests128(const uint8_t[::1] data, Py_ssize_t page, out, int threads=1):
    """XXH3-128 (canonical, 16 bytes) of each ``page``-byte piece of ``data`` (the last
    may be short) into the writable buffer ``out`` (16 bytes a piece, in order), on up to
    ``threads`` threads in one GIL-free call: with 4 KiB pages the live migration's
    per-page proof table, with 1 MiB pieces the leaves of ``xxh3_128_tree``.
    ``ValueError`` when ``out`` is too small or XXH3 is not bound.
    """
    cdef size_t n = data.shape[0]
    if page <= 0:
        raise ValueError("page must be positive")
    cdef int nthreads = _threads(threads)
    cdef size_t npages = (n + <size_t>page - 1) // <size_t>page
    if not cm_xxh3_is_bound():
        raise ValueError("XXH3 is not bound: page digests need cellmigrate._xxh3")
    cdef Py_buffer outbuf
    cdef uint8_t* po = _leaf_out(out, &outbuf, <Py_ssize_t>(16 * npages))
    cdef cm_tree_job job
    memset(&job, 0, sizeof(job))
    cdef PyThreadState* ts
    try:
        if n:
            job.data = &data[0]
            job.n = n
            job.leaf = <size_t>page
            job.per = _units_a_claim(<size_t>page, npages)
            job.out = po
            ts = _release(n)
            cm_tree_job_run(&job, nthreads)
            _reacquire(ts)
    finally:
        PyBuffer_Release(&outbuf)


cdef inline bint _overlaps(const uint8_t* a, size_t na, const uint8_t* b, size_t nb) noexcept:
    return na != 0 and nb != 0 and a < b + nb and b < a + na


def gather_digests128(const uint8_t[::1] state, indices, Py_ssize_t page, dst, out, int threads=1):
    """Copy ``state``'s pages at ``indices`` back to back into ``dst`` (page ``k`` at byte
    ``k * page``; the state's short last page, if named, must come last) and write the
    XXH3-128 (canonical, 16 bytes) of each copy into ``out``, in order, on up to
    ``threads`` threads in one GIL-free call: a live chunk's pages and their digests in
    one pass (each page hashed from its copy while in cache). ``dst`` must not overlap
    ``state``. ``ValueError`` for an index out of range, a short page not last, ``dst`` or
    ``out`` too small, or XXH3 not bound.
    """
    if page <= 0:
        raise ValueError("page must be positive")
    cdef int nthreads = _threads(threads)
    # A private copy: the indices are checked here and read again without the GIL, when
    # another thread could change the caller's array (8 bytes a page).
    cdef int64_t[::1] idx = np.array(indices, dtype=np.int64, copy=True).reshape(-1)
    cdef size_t n = state.shape[0], count = idx.shape[0], i, total = 0, start
    if not cm_xxh3_is_bound():
        raise ValueError("XXH3 is not bound: page digests need cellmigrate._xxh3")
    for i in range(count):
        if idx[i] < 0 or <size_t>idx[i] >= (n + <size_t>page - 1) // <size_t>page:
            raise ValueError(f"page {idx[i]} is outside a state of {n} bytes")
        start = <size_t>idx[i] * <size_t>page
        if n - start < <size_t>page and i != count - 1:
            raise ValueError(f"the short last page {idx[i]} is not the last one named")
        total += min(<size_t>page, n - start)
    cdef Py_buffer dstbuf, outbuf
    PyObject_GetBuffer(dst, &dstbuf, PyBUF_SIMPLE | PyBUF_WRITABLE)
    cdef Py_ssize_t held = dstbuf.len
    if held < <Py_ssize_t>total:
        PyBuffer_Release(&dstbuf)
        raise ValueError(f"dst holds {held} bytes, the pages need {total}")
    cdef uint8_t* pd = <uint8_t*>dstbuf.buf
    cdef uint8_t* po
    try:
        po = _leaf_out(out, &outbuf, <Py_ssize_t>(16 * count))
    except BaseException:
        PyBuffer_Release(&dstbuf)
        raise
    cdef const uint8_t* ps = &state[0] if n else NULL
    if total and (_overlaps(pd, total, ps, n) or _overlaps(po, 16 * count, ps, n) or _overlaps(pd, total, po, 16 * count)):
        PyBuffer_Release(&outbuf)
        PyBuffer_Release(&dstbuf)
        raise ValueError("dst, out and state must not overlap")
    cdef cm_gather_job job
    memset(&job, 0, sizeof(job))
    cdef PyThreadState* ts
    try:
        if count:
            job.state = &state[0]
            job.n = n
            job.page = <size_t>page
            job.idx = &idx[0]
            job.count = count
            job.per = _units_a_claim(<size_t>page, count)
            job.dst = pd
            job.out = po
            ts = _release(total)
            cm_gather_job_run(&job, nthreads)
            _reacquire(ts)
    finally:
        PyBuffer_Release(&outbuf)
        PyBuffer_Release(&dstbuf)


#: ``PageArena.xzr_hints`` values: the page's XZR stream is not smaller than the page
#: (an encoder need not try it), and no hint taken.
XZR_HINT_NO_WIN = CM_XZR_HINT_NO_WIN
XZR_HINT_UNKNOWN = CM_XZR_HINT_UNKNOWN


cdef extern from "cm_jobs.h" nogil:
    int CM_PAIR_CHECKSUM
    int CM_PAIR_FIRST_DIFFERENCE
    int CM_PAIR_DIRTY
    int CM_PAIR_DIRTY_CHECKSUM
    ctypedef struct cm_pair_job:
        cm_claims claims
        int kind
        const uint8_t* a
        const uint8_t* b
        size_t n
        size_t page
        size_t chunk
        uint64_t offset
        uint32_t* sums
        int64_t* idx
        size_t* counts
    int cm_pair_job_run(cm_pair_job* j, int threads)


cdef object _pair_pass(int kind, const uint8_t* a, const uint8_t* b, size_t n, size_t page, uint64_t offset,
                       int threads, int64_t* idx):
    """One of the simple kernels over ``[0, n)`` (``n > 0``) on up to ``threads`` threads
    claiming ``_claim_bytes`` (8 MiB) at a time, in one GIL-free call. Returns the checksum (mod 2**32) for
    CM_PAIR_CHECKSUM, the first difference or None, the number of dirty pages (their
    numbers packed at the front of ``idx``, ascending), or ``(count, checksum)``."""
    cdef int nthreads = _threads(threads)
    cdef cm_pair_job job
    memset(&job, 0, sizeof(job))
    job.kind = kind
    job.a = a
    job.b = b
    job.n = n
    job.page = page if page else 1
    job.chunk = _units_a_claim(job.page, (n + job.page - 1) // job.page) * job.page
    job.offset = offset
    job.idx = idx
    cdef Py_ssize_t nchunks = <Py_ssize_t>((n + job.chunk - 1) // job.chunk), k
    cdef uint32_t[::1] sums = np.zeros(nchunks, dtype=np.uint32)
    counts_arr = np.full(nchunks, np.iinfo(np.uintp).max, dtype=np.uintp)
    cdef size_t[::1] counts = counts_arr
    job.sums = &sums[0]
    job.counts = &counts[0]
    cdef PyThreadState* ts = _release(n)
    cm_pair_job_run(&job, nthreads)
    _reacquire(ts)
    if kind == CM_PAIR_FIRST_DIFFERENCE:
        for k in range(nchunks):
            if counts[k] != <size_t>-1:
                return int(<size_t>k * job.chunk + counts[k])
        return None
    total = int(np.asarray(sums).sum(dtype=np.uint64) & 0xFFFFFFFF)
    if kind == CM_PAIR_CHECKSUM:
        return total
    cdef size_t packed = 0, per = job.chunk // job.page
    for k in range(nchunks):  # each chunk's pages after the ones before
        if counts[k] and packed != <size_t>k * per:
            memmove(idx + packed, idx + <size_t>k * per, counts[k] * sizeof(int64_t))
        packed += counts[k]
    return packed if kind == CM_PAIR_DIRTY else (packed, total)
