/* Fused leaf loops of the delta passes: page comparison, page copies, the weighted
 * checksum and the xxh3_128_tree leaf digests, one 1 MiB leaf at a time while it is in
 * this core's cache.
 *
 * XXH3 is not ours: python-xxhash has no C API, but its extension module exports the
 * xxHash library's functions (XXH3_128bits_dispatch & co., runtime-dispatched to the
 * CPU's best SIMD path). cellmigrate._xxh3 looks their addresses up with ctypes, checks
 * them against xxhash's Python API on test vectors and only then hands them to
 * cm_xxh3_bind(); until that succeeds the passes take the Python path. The prototypes
 * below are xxHash 0.8's stable ABI (XXH128_hash_t is two uint64_t, returned by value).
 */
#ifndef CM_LEAVES_H
#define CM_LEAVES_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cm_simd.h"
#include "cm_pages.h"

#ifndef CM_LEAF_BLOCK
#define CM_LEAF_BLOCK (256 * 1024)
#endif
/* A block is sparse (see cm_overlay_leaf) while its pages cover under NUM/DEN of it. */
#define CM_SPARSE_NUM 3
#define CM_SPARSE_DEN 8

typedef struct {
    uint64_t low64;
    uint64_t high64;
} cm_xxh128_t;

typedef cm_xxh128_t (*cm_xxh3_128_fn)(const void *data, size_t len);
typedef uint64_t (*cm_xxh3_64_fn)(const void *data, size_t len);
typedef void *(*cm_xxh3_create_fn)(void);
typedef int (*cm_xxh3_free_fn)(void *state);
typedef int (*cm_xxh3_reset_fn)(void *state);
typedef int (*cm_xxh3_update_fn)(void *state, const void *data, size_t len);
typedef cm_xxh128_t (*cm_xxh3_digest_fn)(const void *state);

static struct {
    cm_xxh3_128_fn one128;
    cm_xxh3_64_fn one64;
    cm_xxh3_create_fn create;
    cm_xxh3_free_fn free_;
    cm_xxh3_reset_fn reset128;
    cm_xxh3_update_fn update128;
    cm_xxh3_digest_fn digest128;
    int bound;
} cm_xxh3 = {0};

/* Takes the addresses (any 0 unbinds everything). Not meant to race with kernel calls. */
static void cm_xxh3_bind(uintptr_t one128, uintptr_t one64, uintptr_t create, uintptr_t free_,
                         uintptr_t reset128, uintptr_t update128, uintptr_t digest128) {
    cm_xxh3.bound = 0;
    if (!one128 || !one64 || !create || !free_ || !reset128 || !update128 || !digest128)
        return;
    cm_xxh3.one128 = (cm_xxh3_128_fn)one128;
    cm_xxh3.one64 = (cm_xxh3_64_fn)one64;
    cm_xxh3.create = (cm_xxh3_create_fn)create;
    cm_xxh3.free_ = (cm_xxh3_free_fn)free_;
    cm_xxh3.reset128 = (cm_xxh3_reset_fn)reset128;
    cm_xxh3.update128 = (cm_xxh3_update_fn)update128;
    cm_xxh3.digest128 = (cm_xxh3_digest_fn)digest128;
    cm_xxh3.bound = 1;
}

static int cm_xxh3_is_bound(void) { return cm_xxh3.bound; }

/* A streaming XXH3 state from the library (NULL when unbound or out of memory). */
static void *cm_xxh3_state_new(void) { return cm_xxh3.bound ? cm_xxh3.create() : NULL; }

static void cm_xxh3_state_free(void *state) {
    if (state)
        cm_xxh3.free_(state);
}

/* XXH128_canonicalFromHash: big-endian high64, then big-endian low64. */
static inline void cm_xxh128_canonical(cm_xxh128_t h, uint8_t *out) {
    for (int i = 0; i < 8; i++) {
        out[i] = (uint8_t)(h.high64 >> (56 - 8 * i));
        out[8 + i] = (uint8_t)(h.low64 >> (56 - 8 * i));
    }
}

/* The piece of "base with pages over it" that starts at *q: page *i when it starts
 * there (zero-length pages are passed over), else the base up to the next page or
 * `limit`. Advances *q past the piece and *i past its page; returns the piece's bytes,
 * and in *page its page's index (SIZE_MAX for a run of the base). */
static inline const uint8_t *cm_overlay_piece(const uint8_t *base, const uint8_t *const *pages,
                                              const size_t *lens, const int64_t *starts, size_t k1,
                                              uint64_t *q, size_t *i, uint64_t limit, size_t *len,
                                              size_t *page) {
    while (*i < k1 && (uint64_t)starts[*i] == *q && lens[*i] == 0)
        (*i)++;
    if (*i < k1 && (uint64_t)starts[*i] == *q) {
        *len = lens[*i];
        *q += lens[*i];
        *page = *i;
        return pages[(*i)++];
    }
    uint64_t e = *i < k1 && (uint64_t)starts[*i] < limit ? (uint64_t)starts[*i] : limit;
    const uint8_t *p = base + *q;
    *len = (size_t)(e - *q);
    *q = e;
    *page = SIZE_MAX;
    return p;
}

/* Bit j set when 64-byte line j of a[0..n) differs from b's (n <= 4096); a longer page
   gets every bit. The AVX2 path tests a line with two 32-byte XORs and one VPTEST. Not
   read off XZR's equality bitmap (cm_pages.h): a line needs only "any byte differs", and
   folding the bitmap cost 3.5 ms against 1 ms for 26,214 pages on one thread. */
#define CM_ALL_LINES (~(uint64_t)0)
static uint64_t cm_line_mask_scalar(const uint8_t *a, const uint8_t *b, size_t n) {
    if (n > 64 * 64)
        return CM_ALL_LINES;
    uint64_t m = 0;
    for (size_t j = 0, o = 0; o < n; j++, o += 64) {
        size_t w = n - o < 64 ? n - o : 64;
        uint64_t x = 0;
        if (w == 64) {
            for (size_t k = 0; k < 64; k += 8)
                x |= cm_load64(a + o + k) ^ cm_load64(b + o + k);
        } else {
            x = memcmp(a + o, b + o, w) != 0;
        }
        m |= (uint64_t)(x != 0) << j;
    }
    return m;
}

#if CM_X86
static CM_AVX2 uint64_t cm_line_mask_avx2(const uint8_t *a, const uint8_t *b, size_t n) {
    if (n != 64 * 64)
        return cm_line_mask_scalar(a, b, n);
    uint64_t m = 0;
    for (size_t j = 0; j < 64; j++) {
        __m256i x0 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + 64 * j)),
                                      _mm256_loadu_si256((const __m256i *)(b + 64 * j)));
        __m256i x1 = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(a + 64 * j + 32)),
                                      _mm256_loadu_si256((const __m256i *)(b + 64 * j + 32)));
        m |= (uint64_t)!_mm256_testz_si256(_mm256_or_si256(x0, x1), _mm256_or_si256(x0, x1)) << j;
    }
    return m;
}
#endif

static uint64_t cm_line_mask(const uint8_t *a, const uint8_t *b, size_t n) {
#if CM_X86
    if (cm_active - cm_paths >= 2)
        return cm_line_mask_avx2(a, b, n);
#endif
    return cm_line_mask_scalar(a, b, n);
}

/* One leaf [a, b) of "base with pages over it": its XXH3-128 (canonical, into out) and
 * its positioned checksum. pages[k0..k1) start inside the leaf (absolute byte offsets in
 * starts, ascending, not overlapping); base covers the whole leaf. Nothing is assembled:
 * the leaf goes block by block (CM_LEAF_BLOCK bytes; a page is never cut, the block
 * ends after it), the pieces (clean runs of the base, pages) fed to the streaming
 * state in order. Per block, one of three ways:
 * - clean: hashed (read from memory), then checksummed from cache. Measured on a 1 GiB
 *   state, 1 thread, loaded 2-vCPU VM: blocks of 256 KiB 48.8 ms, 64 KiB 52.6, 16 KiB
 *   68.1, the whole leaf hashed one-shot then checksummed 53.1;
 * - a few pages (sparse): see below;
 * - mostly pages: each piece hashed, then checksummed from cache (reading the base
 *   under the pages would add their bytes to the read). */
static uint32_t cm_overlay_leaf(const uint8_t *base, uint64_t a, uint64_t b, const uint8_t *const *pages,
                                const size_t *lens, const int64_t *starts, size_t k0, size_t k1,
                                void *state, uint8_t *out, uint64_t *changed) {
    uint32_t sum = 0;
    if (k0 == k1 && !out)
        return cm_checksum(base + a, (size_t)(b - a), a);
    if (out)
        cm_xxh3.reset128(state);
    uint64_t p = a;
    size_t j = k0;
    while (p < b) {
        uint64_t limit = b - p < CM_LEAF_BLOCK ? b : p + CM_LEAF_BLOCK;
        uint64_t q = p;
        size_t i = j, len, page;
        size_t i_end = j, covered = 0;
        while (i_end < k1 && (uint64_t)starts[i_end] < limit)
            covered += lens[i_end++];
        uint64_t end = i_end > j && (uint64_t)starts[i_end - 1] + lens[i_end - 1] > limit
                           ? (uint64_t)starts[i_end - 1] + lens[i_end - 1] : limit;
        if (i_end == j) {
            /* a clean block: hashed from memory, checksummed from cache */
            if (out)
                cm_xxh3.update128(state, base + p, (size_t)(end - p));
            sum += cm_checksum(base + p, (size_t)(end - p), p);
            q = end;
            i = i_end;
        } else if (covered * CM_SPARSE_DEN < (size_t)(end - p) * CM_SPARSE_NUM) {
            /* A few pages: the whole base block is checksummed first, read from memory
               in order, then the pieces are hashed (the base's from cache) and each
               page's checksum replaces its base page's. Why: skipping the base under
               each page broke the sequential read, and each skip cost ~0.5 us (1 GiB,
               10% of the pages, one thread: 69 ms skipping, 60 ms this way). */
            sum += cm_checksum(base + p, (size_t)(end - p), p);
            while (q < end) {
                uint64_t at = q;
                const uint8_t *piece = cm_overlay_piece(base, pages, lens, starts, k1, &q, &i, end, &len, &page);
                if (len && out)
                    cm_xxh3.update128(state, piece, len);
                if (len && page != SIZE_MAX) {
                    sum += cm_checksum(piece, len, at) - cm_checksum(base + at, len, at);
                    if (changed) /* both in cache now: the lines a scatter must write */
                        changed[page] = cm_line_mask(piece, base + at, len);
                }
            }
        } else {
            /* Mostly pages: reading the base under them would add their bytes to the
               read. Each piece is hashed (read from memory), then checksummed (from
               cache). */
            while (q < end) {
                uint64_t at = q;
                const uint8_t *piece = cm_overlay_piece(base, pages, lens, starts, k1, &q, &i, end, &len, &page);
                if (len && out)
                    cm_xxh3.update128(state, piece, len);
                if (len)
                    sum += cm_checksum(piece, len, at);
                if (page != SIZE_MAX && changed)
                    changed[page] = CM_ALL_LINES;
            }
        }
        p = q;
        j = i;
    }
    if (out)
        cm_xxh128_canonical(cm_xxh3.digest128(state), out);
    return sum;
}

/* Leaves of [lo, hi) (lo leaf-aligned, hi <= the base's end) of "base with pages over it":
 * digests into out (16 bytes per leaf; NULL: checksum only) and the checksum, returned.
 * pages[0..count) start in [lo, hi), ascending. state: an XXH3 state, or NULL when out is.
 * changed (NULL: not wanted) gets a line mask per page: bit j set when 64-byte line j of
 * page k may differ from the base under it (every bit when not compared: a page of
 * more than 4096 bytes, or in a block mostly covered by pages), so a scatter that
 * follows need only write those lines. */
static uint32_t cm_overlay_leaves(const uint8_t *base, uint64_t lo, uint64_t hi, size_t leaf,
                                  const uint8_t *const *pages, const size_t *lens, const int64_t *starts,
                                  size_t count, void *state, uint8_t *out, uint64_t *changed) {
    uint32_t sum = 0;
    size_t k = 0;
    if (changed) /* zero-length pages are never visited: they change no line */
        memset(changed, 0, count * sizeof(uint64_t));
    for (uint64_t a = lo, i = 0; a < hi; a += leaf, i++) {
        uint64_t b = hi - a < leaf ? hi : a + leaf;
        size_t k1 = k;
        while (k1 < count && (uint64_t)starts[k1] < b)
            k1++;
        sum += cm_overlay_leaf(base, a, b, pages, lens, starts, k, k1, state, out ? out + 16 * i : NULL, changed);
        k = k1;
    }
    return sum;
}

/* A growing store of page copies: slot k holds page idx[k] (page bytes a slot). */
typedef struct {
    uint8_t *data;
    int64_t *idx;
    size_t cap;  /* slots */
    size_t used;
    size_t page;
    int advised; /* huge pages asked for the current mapping */
    uint16_t *xzr; /* with cm_arena_want_xzr: slot k's XZR hint (CM_XZR_HINT_*), else NULL */
} cm_arena;


/* Once an arena holds 1 MiB of copies it is filling up: ask for huge pages on the rest,
   so its faults come 512 times fewer (a VM pays dearly for each; measured 16 MiB of
   copies in 3.8 ms instead of 5.5-25). A sparse arena keeps 4 KiB pages: a huge page
   zeroed for a few copies would cost more than it saves. */
static void cm_arena_filling(cm_arena *ar) {
    if (!ar->advised && ar->used * ar->page >= ((size_t)1 << 20)) {
        cm_advise_huge(ar->data, ar->cap * ar->page);
        ar->advised = 1;
    }
}

/* The arena's bytes: on Linux whole pages from mmap, grown with mremap (page-aligned
   rows, never copied: malloc's 16-byte header left every 4 KiB row straddling two
   pages and its vector loads straddling cache lines; measured 1.5x slower to hash). */
#if defined(__linux__)
#include <pthread.h>
#include <errno.h>
#include <sys/mman.h>
#include <time.h>

/* Mappings of freed arenas, kept for the next ones. Fresh memory is expensive where the
 * host backs a VM's pages lazily and takes freed ones back (a Firecracker VM here: 2.8 us
 * a 4 KiB page on first touch, huge pages advised or not, MADV_POPULATE_WRITE no
 * cheaper; at 10% dirty pages of 1 GiB, 26,214 copies faulted for about 35 ms of a
 * 130 ms create). A new arena takes a kept mapping whenever there is one, so arena
 * memory mapped (in use + kept) never exceeds the most ever in use at once, and the
 * kept part is at most cm_pool.cap bytes (_kernels.arena_pool sets it; 0 frees it). */
#define CM_POOL_SLOTS 512
static struct {
    pthread_mutex_t lock;
    void *ptr[CM_POOL_SLOTS];
    size_t bytes[CM_POOL_SLOTS];
    size_t count;
    size_t total;
    size_t cap;
} cm_pool = {PTHREAD_MUTEX_INITIALIZER, {0}, {0}, 0, 0, (size_t)256 << 20};

/* fork() copies the lock as it is: held by a thread the child does not have, it would
 * stop the child's first arena for ever. The handlers take it around fork, so the child
 * starts with it free (registered once, by cm_pool_fork_safe, at import). */
static void cm_pool_prefork(void) { pthread_mutex_lock(&cm_pool.lock); }
static void cm_pool_postfork(void) { pthread_mutex_unlock(&cm_pool.lock); }

static int cm_pool_fork_safe(void) {
    static int registered = 0;
    if (!registered && pthread_atfork(cm_pool_prefork, cm_pool_postfork, cm_pool_postfork) == 0)
        registered = 1;
    return registered;
}

/* Tests only: hold the pool's lock for ms milliseconds (as a thread busy in it would). */
static void cm_pool_hold(unsigned ms) {
    struct timespec ts = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
    pthread_mutex_lock(&cm_pool.lock);
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) /* a signal: sleep the rest */
        ;
    pthread_mutex_unlock(&cm_pool.lock);
}

/* Tests only: whether another thread holds the pool's lock now. */
static int cm_pool_busy(void) {
    if (pthread_mutex_trylock(&cm_pool.lock) != 0)
        return 1;
    pthread_mutex_unlock(&cm_pool.lock);
    return 0;
}

/* Keep (p, bytes) if it fits under the cap, else unmap it. */
static void cm_pool_put(void *p, size_t bytes) {
    pthread_mutex_lock(&cm_pool.lock);
    if (cm_pool.count < CM_POOL_SLOTS && cm_pool.total + bytes <= cm_pool.cap) {
        cm_pool.ptr[cm_pool.count] = p;
        cm_pool.bytes[cm_pool.count++] = bytes;
        cm_pool.total += bytes;
        p = NULL;
    }
    pthread_mutex_unlock(&cm_pool.lock);
    if (p)
        munmap(p, bytes);
}

/* The most recently kept mapping (its size in *bytes), or NULL. */
static void *cm_pool_take(size_t *bytes) {
    void *p = NULL;
    pthread_mutex_lock(&cm_pool.lock);
    if (cm_pool.count) {
        p = cm_pool.ptr[--cm_pool.count];
        *bytes = cm_pool.bytes[cm_pool.count];
        cm_pool.total -= *bytes;
    }
    pthread_mutex_unlock(&cm_pool.lock);
    return p;
}

/* Set the cap (bytes), unmapping what no longer fits; returns the bytes kept. */
static size_t cm_pool_limit(size_t cap) {
    size_t kept;
    pthread_mutex_lock(&cm_pool.lock);
    cm_pool.cap = cap;
    while (cm_pool.count && cm_pool.total > cap) {
        cm_pool.count--;
        cm_pool.total -= cm_pool.bytes[cm_pool.count];
        munmap(cm_pool.ptr[cm_pool.count], cm_pool.bytes[cm_pool.count]);
    }
    kept = cm_pool.total;
    pthread_mutex_unlock(&cm_pool.lock);
    return kept;
}

static uint8_t *cm_arena_bytes(uint8_t *old, size_t old_bytes, size_t bytes) {
    void *p;
    if (bytes == 0) { /* a trim to nothing: nothing was copied, so nothing worth keeping */
        if (old)
            munmap(old, old_bytes);
        return NULL;
    }
    if (!old) {
        size_t kept = 0;
        void *k = cm_pool_take(&kept);
        if (k) {
#if defined(MADV_NOHUGEPAGE)
            /* A new arena starts sparse: no huge pages until it fills (cm_arena_filling). */
            (void)madvise(k, kept, MADV_NOHUGEPAGE);
#endif
            p = kept == bytes ? k : mremap(k, kept, bytes, MREMAP_MAYMOVE);
            if (p != MAP_FAILED)
                return (uint8_t *)p;
            munmap(k, kept);
        }
        p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    } else {
        p = mremap(old, old_bytes, bytes, MREMAP_MAYMOVE);
    }
    return p == MAP_FAILED ? NULL : (uint8_t *)p;
}
static void cm_arena_free(cm_arena *ar) {
    if (ar->data)
        cm_pool_put(ar->data, ar->cap * ar->page);
    free(ar->idx);
    free(ar->xzr);
    ar->data = NULL;
    ar->idx = NULL;
    ar->xzr = NULL;
}
#else
static size_t cm_pool_limit(size_t cap) {
    (void)cap;
    return 0;
}
static int cm_pool_fork_safe(void) { return 1; }
static void cm_pool_hold(unsigned ms) { (void)ms; }
static int cm_pool_busy(void) { return 0; }
static uint8_t *cm_arena_bytes(uint8_t *old, size_t old_bytes, size_t bytes) {
    (void)old_bytes;
    return (uint8_t *)realloc(old, bytes);
}
static void cm_arena_free(cm_arena *ar) {
    free(ar->data);
    free(ar->idx);
    free(ar->xzr);
    ar->data = NULL;
    ar->idx = NULL;
    ar->xzr = NULL;
}
#endif

/* Give back the slots past the used ones (the reservation a pass made for its worst case). */
static void cm_arena_trim(cm_arena *ar) {
    if (ar->cap == ar->used)
        return;
    uint8_t *data = cm_arena_bytes(ar->data, ar->cap * ar->page, ar->used * ar->page);
    if (data || ar->used == 0) {
        ar->data = data;
        ar->cap = ar->used;
    }
}

/* From now on, take each copy's XZR hint (pages of at most 4096 bytes: the others, and
   the copies already held, are CM_XZR_HINT_UNKNOWN). Returns -1 when out of memory. */
static int cm_arena_want_xzr(cm_arena *ar) {
    if (ar->xzr)
        return 0;
    uint16_t *xzr = (uint16_t *)malloc((ar->cap ? ar->cap : 1) * sizeof(uint16_t));
    if (!xzr)
        return -1;
    for (size_t k = 0; k < ar->used; k++)
        xzr[k] = CM_XZR_HINT_UNKNOWN;
    ar->xzr = xzr;
    return 0;
}

/* Room for `more` slots; 0, or -1 when memory runs out (the arena is unchanged). */
static int cm_arena_reserve(cm_arena *ar, size_t more) {
    if (ar->cap - ar->used >= more)
        return 0;
    size_t cap = ar->cap ? ar->cap : 64;
    while (cap - ar->used < more)
        cap *= 2;
    /* The index first: if the bytes then fail, a longer index is harmless. */
    int64_t *idx = (int64_t *)realloc(ar->idx, cap * sizeof(int64_t));
    if (!idx)
        return -1;
    ar->idx = idx;
    if (ar->xzr) {
        uint16_t *xzr = (uint16_t *)realloc(ar->xzr, cap * sizeof(uint16_t));
        if (!xzr)
            return -1;
        ar->xzr = xzr;
    }
    uint8_t *data = cm_arena_bytes(ar->data, ar->cap * ar->page, cap * ar->page);
    if (!data)
        return -1;
    ar->data = data;
    ar->cap = cap;
    ar->advised = 0; /* a grown mapping: the new part has no advice yet */
    return 0;
}

/* Copy page k (len bytes of src, the rest of its slot zeroed: a kept mapping holds
 * earlier bytes) into the next slot, reserved by the caller; returns the copy. With XZR
 * hints, the copy's hint is taken against base_page (old's page under it) now, while
 * both are in cache: later, the old page would be read from memory again (a jump per
 * page: ~0.4 us) just to learn that a rewritten page does not XZR-encode smaller. */
static uint8_t *cm_arena_add(cm_arena *ar, const uint8_t *src, size_t len, const uint8_t *base_page, int64_t k) {
    uint8_t *copy = ar->data + ar->used * ar->page;
    memcpy(copy, src, len);
    memset(copy + len, 0, ar->page - len);
    if (ar->xzr) {
        uint16_t hint = CM_XZR_HINT_UNKNOWN;
        if (len <= CM_XZR_HINT_PAGE_MAX) {
            size_t x = cm_xzr_encode_entry(copy, base_page, len, NULL, len); /* size only */
            hint = x == SIZE_MAX ? CM_XZR_HINT_NO_WIN : (uint16_t)x;
        }
        ar->xzr[ar->used] = hint;
    }
    ar->idx[ar->used++] = k;
    return copy;
}

/* The create pass over leaves of [lo, hi) (lo leaf-aligned, both states cover it): the
 * pages of new that differ from old are copied into the arena, with their page numbers;
 * the checksum of "old with the copies over it" is returned and, when out is not NULL,
 * each leaf's XXH3-128 of those bytes (16 bytes a leaf). Sets *failed (and stops) when
 * memory for the copies runs out.
 *
 * The copies are what the delta describes: the checksum and digests cover old + copies
 * (the pages as copied), never a second read of new, which another thread may write.
 * Each leaf goes in blocks of about CM_LEAF_BLOCK: compared (old checksummed in the same
 * read) from memory, then its runs and copies hashed from cache. */
static uint32_t cm_scan_leaves(const uint8_t *old, const uint8_t *new_, uint64_t lo, uint64_t hi, size_t leaf,
                               cm_arena *ar, int64_t *scratch_idx, void *state, uint8_t *out, int *failed) {
    uint32_t sum = 0;
    size_t page = ar->page;
    size_t block = CM_LEAF_BLOCK < page ? page : CM_LEAF_BLOCK / page * page;
    *failed = 0;
    for (uint64_t a = lo, i = 0; a < hi; a += leaf, i++) {
        uint64_t b = hi - a < leaf ? hi : a + leaf;
        if (out)
            cm_xxh3.reset128(state);
        for (uint64_t c = a; c < b; c += block) {
            size_t n = b - c < block ? (size_t)(b - c) : block;
            uint32_t base_sum;
            size_t dirty = cm_dirty_pages_checksum(new_ + c, old + c, n, page, c, scratch_idx, &base_sum);
            if (dirty && cm_arena_reserve(ar, dirty) != 0) {
                *failed = 1;
                return 0;
            }
            uint64_t pos = c;
            for (size_t j = 0; j < dirty; j++) {
                uint64_t s = c + (uint64_t)scratch_idx[j] * page;
                size_t len = c + n - s < page ? (size_t)(c + n - s) : page;
                uint8_t *copy = cm_arena_add(ar, new_ + s, len, old + s, (int64_t)(s / page));
                /* The copy replaces old's page: take old's bytes out, put the copy's in. */
                base_sum += cm_checksum(copy, len, s) - cm_checksum(old + s, len, s);
                if (out) {
                    if (s > pos)
                        cm_xxh3.update128(state, old + pos, (size_t)(s - pos));
                    cm_xxh3.update128(state, copy, len);
                }
                pos = s + len;
            }
            if (out && pos < c + n)
                cm_xxh3.update128(state, old + pos, (size_t)(c + n - pos));
            sum += base_sum;
            cm_arena_filling(ar);
        }
        if (out)
            cm_xxh128_canonical(cm_xxh3.digest128(state), out + 16 * i);
    }
    return sum;
}

/* The create pass over leaves of [lo, hi) given fp_old, the XXH3-64 of each page of old
 * (indexed by page number): new is read once, a page at a time into tmp (page bytes,
 * 64-byte aligned), and each page whose XXH3-64 differs from fp_old's is copied into the
 * arena; old is read only under those pages (for their XZR hints and, with changes_only,
 * checksums). fp_new gets each page's XXH3-64 as read. Returns the checksum of the bytes
 * read; with out, each leaf's XXH3-128 of them. As in cm_scan_leaves, the checks cover
 * one copy of new, never a second read that a writer could change; they equal "old with
 * the copies over it" wherever fp_old describes old (where it does not, apply refuses
 * the delta).
 *
 * With changes_only (the caller knows old's checksum) the return is instead what the
 * copies change in old's checksum: the sum over them of checksum(copy) - checksum(old's
 * page), read while both are in cache for the hint. The clean pages then cost no
 * checksum at all: on 1 GiB at 1% dirty, two threads, 43 -> 38 ms a create. The caller's
 * checksum is the table's: where old's page under a copy is not the one fp_old
 * describes (old written after its table was taken), *stale is set, and the caller
 * needs old's own checksum to add the change to.
 *
 * A page at a time because the copy then stays in L1 for the three passes over it: on
 * 1 GiB at 1% dirty, two threads, 22.5 GB/s against 17.5 with 16 KiB and 16.5 with
 * 64 KiB copies; software prefetch of the next copy made it slower (15.5). Again on an
 * AVX-512 Xeon (2026-12-02), copying by cm_copy_in: 58-59 ms a page, 62-64 ms with 16 KiB
 * copies hashed by one update (memcpy's `rep movsb` had taken the page copy to 78 ms). */
static uint32_t cm_scan_leaves_fp(const uint8_t *old, const uint8_t *new_, uint64_t lo, uint64_t hi, size_t leaf,
                                  const uint64_t *fp_old, uint64_t *fp_new, uint8_t *tmp, cm_arena *ar,
                                  void *state, uint8_t *out, int changes_only, int *stale, int *failed) {
    uint32_t sum = 0;
    size_t page = ar->page;
    *failed = 0;
    for (uint64_t a = lo, i = 0; a < hi; a += leaf, i++) {
        uint64_t b = hi - a < leaf ? hi : a + leaf;
        if (out)
            cm_xxh3.reset128(state);
        for (uint64_t s = a; s < b; s += page) {
            size_t len = b - s < page ? (size_t)(b - s) : page;
            uint64_t k = s / page;
            cm_copy_in(tmp, new_ + s, len);
            if (!changes_only)
                sum += cm_checksum(tmp, len, s);
            if (out)
                cm_xxh3.update128(state, tmp, len);
            uint64_t h = cm_xxh3.one64(tmp, len), was = fp_old[k];
            fp_new[k] = h; /* after reading fp_old[k]: the two tables may be one array */
            if (h == was)
                continue;
            if (cm_arena_reserve(ar, 1) != 0) {
                *failed = 1;
                return 0;
            }
            uint8_t *copy = cm_arena_add(ar, tmp, len, old + s, (int64_t)k);
            if (changes_only) {
                sum += cm_checksum(copy, len, s) - cm_checksum(old + s, len, s);
                if (cm_xxh3.one64(old + s, len) != was)
                    *stale = 1;
            }
            cm_arena_filling(ar);
        }
        if (out)
            cm_xxh128_canonical(cm_xxh3.digest128(state), out + 16 * i);
    }
    return sum;
}

/* XXH3-64 of each page of data (the last may be short); returns data's checksum as if
 * it started at byte offset of its state (each page summed while in cache). */
static uint32_t cm_page_digests64(const uint8_t *data, size_t n, size_t page, uint64_t offset, uint64_t *out) {
    uint32_t sum = 0;
    for (size_t s = 0, k = 0; s < n; s += page, k++) {
        size_t len = n - s < page ? n - s : page;
        out[k] = cm_xxh3.one64(data + s, len);
        sum += cm_checksum(data + s, len, offset + s);
    }
    return sum;
}

#endif /* CM_LEAVES_H */
