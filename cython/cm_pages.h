/*
 * cm_pages.h -- page encodings of a delta: zero pages and XOR + zero-run ("XZR") pages,
 * encoded and decoded for a whole batch of dirty pages in one GIL-free call.
 *
 * Included (after cm_simd.h, whose dispatch it follows) by _encodings.pxi. The contract,
 * and the pure-Python oracle, is cellmigrate._reference (encode_pages, validate_pages,
 * decode_pages, xzr_encode, xzr_decode); the byte format is docs/FORMAT.md, "XZR".
 *
 * How it works (why, not what)
 * ----------------------------
 * A dirty page of a live state usually differs from its base page in a few places (a
 * counter, a string, a struct). X = new ^ base is then mostly zero, and XZR writes X as
 * pairs (varint z, varint k, k literal bytes of X): skip z bytes (equal to the base),
 * then XOR k bytes into the base. Bytes after the last pair equal the base. A literal
 * runs on through zero gaps shorter than 3 bytes (a new pair costs at least 2 bytes of
 * varints), and ends at a zero gap of 3 or more, or where the rest of the page is zero.
 *
 * The encoder never materializes X: it scans new and base side by side. Equal runs
 * (z) are found 32 bytes at a time with AVX2 (cmpeq + movemask) or 8 at a time with
 * word XORs; a literal's end (3 equal bytes) is found 64 positions at a time from the
 * equality masks (m & m >> 1 & m >> 2), so a dense page costs one pass at vector speed
 * however many isolated equal bytes it has (random data: one in 256). An
 * output limit (the size of the best encoding found so far) stops it as soon as it
 * cannot win, so an incompressible page costs at most one scan.
 *
 * Decoding copies the base page (zero-extended when the base state is shorter) into the
 * output slot, then XORs each literal in. Every varint, length and offset is checked
 * before use; nothing is ever written outside the page's slot, whatever the input.
 */
#ifndef CELLMIGRATE_CM_PAGES_H
#define CELLMIGRATE_CM_PAGES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Encodings (wire values, docs/FORMAT.md). */
enum { CM_ENC_RAW = 0, CM_ENC_RLE = 1, CM_ENC_ZERO = 2, CM_ENC_XZR = 3 };
/* Bit masks of allowed encodings. */
#define CM_ALLOW(e) (1u << (e))

/* XZR decode errors (and the detail code of a batch's CM_PAGE_XZR_CORRUPT). */
enum {
    CM_XZR_OK = 0,
    CM_XZR_TRUNCATED_VARINT = 1,
    CM_XZR_OVERLONG_VARINT = 2,
    CM_XZR_ZERO_LITERAL = 3,
    CM_XZR_PAST_PAGE = 4,
    CM_XZR_TRUNCATED_LITERAL = 5,
};

/* Batch errors: (code, position of the page in the batch, detail). */
enum {
    CM_PAGE_OK = 0,
    CM_PAGE_INDEX_RANGE = 1,    /* index * page >= total size */
    CM_PAGE_NOT_INCREASING = 2, /* index <= previous index */
    CM_PAGE_ENCODING = 3,       /* unknown or not allowed here; detail = the value */
    CM_PAGE_LENGTH = 4,         /* stored length impossible for the encoding; detail = the length */
    CM_PAGE_RLE_CORRUPT = 5,    /* detail = cm_rle_decoded_size's code */
    CM_PAGE_RLE_SIZE = 6,       /* RLE decodes to detail bytes, not the page's length */
    CM_PAGE_XZR_CORRUPT = 7,    /* detail = CM_XZR_* */
    CM_PAGE_OFFSETS = 8,        /* offsets not non-decreasing / past the payload (caller bug) */
    CM_PAGE_CHECK = 9,          /* the stored bytes' weighted checksum is not the table's; detail = it */
};

/* Longest varint accepted: 5 bytes (35 bits); every value must also fit the page. */
#define CM_VARINT_MAX 5

/* ------------------------------------------------------------------------------------ */
/* equal / unequal runs of two buffers                                                   */
/* ------------------------------------------------------------------------------------ */

/* Length of the prefix of a[0..n) equal to b[0..n). */
static size_t cm_eq_run_scalar(const uint8_t *a, const uint8_t *b, size_t n) {
    size_t k = 0;
    while (k + 8 <= n) {
        uint64_t x = cm_load64(a + k) ^ cm_load64(b + k);
        if (x)
            return k + (size_t)(__builtin_ctzll(x) >> 3);
        k += 8;
    }
    while (k < n && a[k] == b[k])
        k++;
    return k;
}

/* Length of the prefix of a[0..n) where every byte differs from b (first equal byte). */
static size_t cm_ne_run_scalar(const uint8_t *a, const uint8_t *b, size_t n) {
    size_t k = 0;
    while (k + 8 <= n) {
        uint64_t x = cm_load64(a + k) ^ cm_load64(b + k);
        uint64_t z = cm_has_zero_byte(x);
        if (z)
            return k + (size_t)(__builtin_ctzll(z) >> 3);
        k += 8;
    }
    while (k < n && a[k] != b[k])
        k++;
    return k;
}

#if CM_X86
/* Bit j set when a[i + j] == b[i + j], for j in 0..63; positions at or past L read as equal. */
static inline CM_AVX2 uint64_t cm_eqmask64_avx2(const uint8_t *a, const uint8_t *b, size_t i, size_t L) {
    if (i + 64 <= L) {
        uint32_t lo = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(
            _mm256_loadu_si256((const __m256i *)(a + i)), _mm256_loadu_si256((const __m256i *)(b + i))));
        uint32_t hi = (uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(
            _mm256_loadu_si256((const __m256i *)(a + i + 32)), _mm256_loadu_si256((const __m256i *)(b + i + 32))));
        return (uint64_t)lo | (uint64_t)hi << 32;
    }
    uint64_t m = ~(uint64_t)0;
    for (size_t j = 0; i + j < L && j < 64; j++)
        if (a[i + j] != b[i + j])
            m &= ~((uint64_t)1 << j);
    return m;
}

/* cm_lit_end_scalar, 64 positions at a time: "3 equal bytes from here" is m & m>>1 & m>>2
   (with the next block's first two bits shifted in), so a dense literal costs two vector
   compares per 64 bytes whatever its equal bytes. */
static CM_AVX2 size_t cm_lit_end_avx2(const uint8_t *nw, const uint8_t *base, size_t s, size_t L) {
    size_t e = s + 1;
    if (e >= L)
        return L;
    uint64_t m0 = cm_eqmask64_avx2(nw, base, e, L);
    for (;;) {
        uint64_t m1 = e + 64 < L ? cm_eqmask64_avx2(nw, base, e + 64, L) : ~(uint64_t)0;
        uint64_t f = m0 & ((m0 >> 1) | (m1 << 63)) & ((m0 >> 2) | (m1 << 62));
        if (f) {
            size_t at = e + (size_t)__builtin_ctzll(f);
            return at < L ? at : L;
        }
        e += 64;
        if (e >= L)
            return L;
        m0 = m1;
    }
}

static CM_AVX2 size_t cm_eq_run_avx2(const uint8_t *a, const uint8_t *b, size_t n) {
    size_t k = 0;
    while (k + 32 <= n) {
        __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
        __m256i vb = _mm256_loadu_si256((const __m256i *)(b + k));
        uint32_t ne = ~(uint32_t)_mm256_movemask_epi8(_mm256_cmpeq_epi8(va, vb));
        if (ne)
            return k + (size_t)__builtin_ctz(ne);
        k += 32;
    }
    return k + cm_eq_run_scalar(a + k, b + k, n - k);
}

#endif

typedef size_t (*cm_run_fn)(const uint8_t *, const uint8_t *, size_t);

/* End of the literal that starts at s (a differing byte) in pages of L bytes: the first
   e > s where 3 bytes are equal (bytes past L count as equal, so an equal run reaching
   the end of the page ends it too), or L. */
typedef size_t (*cm_lit_fn)(const uint8_t *, const uint8_t *, size_t, size_t);

static size_t cm_lit_end_scalar(const uint8_t *nw, const uint8_t *base, size_t s, size_t L) {
    size_t e = s + 1;
    for (;;) {
        e += cm_ne_run_scalar(nw + e, base + e, L - e);
        if (e >= L)
            return L;
        size_t g = cm_eq_run_scalar(nw + e, base + e, L - e < 3 ? L - e : 3);
        if (g >= 3 || e + g >= L)
            return e;
        e += g; /* a short gap: stays in the literal */
    }
}

typedef struct {
    cm_run_fn eq_run;
    cm_lit_fn lit_end;
} cm_page_ops;

/* The run finders for the active dispatch path: AVX2 from the "avx2" path up (the
   AVX-512 paths too: at page granularity 32-byte compares already run at L1 speed). */
static cm_page_ops cm_page_ops_active(void) {
    cm_page_ops ops = {cm_eq_run_scalar, cm_lit_end_scalar};
#if CM_X86
    if (cm_active - cm_paths >= 2) {
        ops.eq_run = cm_eq_run_avx2;
        ops.lit_end = cm_lit_end_avx2;
    }
#endif
    return ops;
}

/* Whether p[0..n) is all zero: OR of 64-byte blocks (the compiler vectorizes it for the
   baseline target), stopping at the first non-zero block. */
static int cm_all_zero(const uint8_t *p, size_t n) {
    size_t k = 0;
    for (; k + 64 <= n; k += 64) {
        uint64_t acc = 0;
        for (unsigned j = 0; j < 64; j += 8)
            acc |= cm_load64(p + k + j);
        if (acc)
            return 0;
    }
    for (; k < n; k++)
        if (p[k])
            return 0;
    return 1;
}

/* ------------------------------------------------------------------------------------ */
/* XZR                                                                                   */
/* ------------------------------------------------------------------------------------ */

static inline size_t cm_varint_size(size_t v) {
    size_t s = 1;
    while (v >= 0x80) {
        v >>= 7;
        s++;
    }
    return s;
}

static inline size_t cm_put_varint(uint8_t *dst, size_t o, size_t v) {
    while (v >= 0x80) {
        dst[o++] = (uint8_t)(v | 0x80);
        v >>= 7;
    }
    dst[o++] = (uint8_t)v;
    return o;
}

/* Append the pair for the literal new[s..e) after the equal run from pos: varint(s - pos),
   varint(e - s), then the XORed bytes. Returns the new output size, or SIZE_MAX when
   the stream would reach `limit` bytes. dst NULL: only the size (nothing written). */
static inline size_t cm_xzr_pair(const uint8_t *nw, const uint8_t *base, size_t pos, size_t s, size_t e,
                                 uint8_t *dst, size_t o, size_t limit) {
    size_t k = e - s;
    size_t end = o + cm_varint_size(s - pos) + cm_varint_size(k) + k;
    if (end >= limit)
        return SIZE_MAX;
    if (!dst)
        return end;
    o = cm_put_varint(dst, o, s - pos);
    o = cm_put_varint(dst, o, k);
    size_t j = 0;
    for (; j + 8 <= k; j += 8) {
        uint64_t x = cm_load64(nw + s + j) ^ cm_load64(base + s + j);
        memcpy(dst + o + j, &x, 8);
    }
    for (; j < k; j++)
        dst[o + j] = nw[s + j] ^ base[s + j];
    return o + k;
}

/* XZR of new[0..L) against base[0..L) into dst; returns the stream size, or SIZE_MAX as
   soon as it would reach `limit` bytes (so it never writes `limit` bytes or more). dst
   needs min(limit, L + 16) bytes (NULL: the size only). Both pages are L bytes (the
   caller zero-extends a short base). */
static size_t cm_xzr_encode(const uint8_t *nw, const uint8_t *base, size_t L, uint8_t *dst,
                            size_t limit, cm_page_ops ops) {
    size_t pos = 0, o = 0;
    while (pos < L) {
        size_t s = pos + ops.eq_run(nw + pos, base + pos, L - pos);
        if (s >= L)
            break; /* the rest equals the base: implicit */
        /* The literal: from s to the first equal byte that starts a gap of >= 3 equal
           bytes or runs to the end of the page. */
        size_t e = ops.lit_end(nw, base, s, L);
        o = cm_xzr_pair(nw, base, pos, s, e, dst, o, limit);
        if (o == SIZE_MAX)
            return SIZE_MAX;
        pos = e;
    }
    return o < limit ? o : SIZE_MAX;
}

#if CM_X86
/* cm_xzr_encode for pages of up to 4096 bytes from one equality bitmap of the page (bit j
   of eq[w]: byte 64w + j equal; bytes past L count as equal), built with two AVX2
   compares per 64 bytes. Each literal then costs two bit scans instead of vector
   compares from its start and end: a page of int64 counters has hundreds of literals.
   Same stream as cm_xzr_encode: a literal starts at the next unequal byte s and ends at
   the first e > s where bytes e, e+1, e+2 are all equal ("g3"), or at L. */
#define CM_XZR_MASK_MAX 4096
/* The equality bitmap with AVX-512BW: one compare into a mask per 64 bytes (a third of
   the AVX2 bitmap's instructions; the create pass sizes every rewritten page this way). */
static CM_AVX512 void cm_eqmasks_avx512(const uint8_t *a, const uint8_t *b, size_t L, uint64_t *eq) {
    size_t w = 0;
    for (; 64 * w + 64 <= L; w++)
        eq[w] = (uint64_t)_mm512_cmpeq_epi8_mask(_mm512_loadu_si512((const void *)(a + 64 * w)),
                                                 _mm512_loadu_si512((const void *)(b + 64 * w)));
    if (64 * w < L)
        eq[w] = cm_eqmask64_avx2(a, b, 64 * w, L);
}

static CM_AVX2 size_t cm_xzr_encode_mask_avx2(const uint8_t *nw, const uint8_t *base, size_t L, uint8_t *dst,
                                              size_t limit) {
    uint64_t eq[CM_XZR_MASK_MAX / 64 + 1], g3[CM_XZR_MASK_MAX / 64];
    size_t W = (L + 63) / 64;
    if (cm_active - cm_paths >= 3)
        cm_eqmasks_avx512(nw, base, L, eq);
    else
        for (size_t w = 0; w < W; w++)
            eq[w] = cm_eqmask64_avx2(nw, base, 64 * w, L);
    eq[W] = ~(uint64_t)0;
    uint64_t any_g3 = 0;
    for (size_t w = 0; w < W; w++) {
        g3[w] = eq[w] & ((eq[w] >> 1) | (eq[w + 1] << 63)) & ((eq[w] >> 2) | (eq[w + 1] << 62));
        any_g3 |= g3[w];
    }
    /* No 3 equal bytes in a row (past L counts as equal): the first unequal byte is at
       most the third and the one literal runs to L, so the stream is at least
       1 + 1 + (L - 2) = L bytes. A rewritten page (the 100%-dirty create sizes each one)
       ends here instead of scanning the bitmap for a gap that is not there. */
    if (!any_g3 && limit <= L)
        return SIZE_MAX;
    size_t pos = 0, o = 0;
    while (pos < L) {
        /* s: the next unequal byte at or after pos. */
        size_t w = pos / 64;
        uint64_t ne = ~eq[w] & (~(uint64_t)0 << (pos % 64));
        while (!ne && ++w < W)
            ne = ~eq[w];
        if (!ne)
            break; /* the rest equals the base: implicit */
        size_t s = 64 * w + (size_t)__builtin_ctzll(ne);
        if (s >= L)
            break;
        /* e: the first g3 position after s (positions past L are all equal, so one exists). */
        size_t e = s + 1, we = e / 64;
        if (we >= W) {
            e = L;
        } else {
            uint64_t f = g3[we] & (~(uint64_t)0 << (e % 64));
            while (!f && ++we < W)
                f = g3[we];
            e = f ? 64 * we + (size_t)__builtin_ctzll(f) : L;
            if (e > L)
                e = L;
        }
        o = cm_xzr_pair(nw, base, pos, s, e, dst, o, limit);
        if (o == SIZE_MAX)
            return SIZE_MAX;
        pos = e;
    }
    return o < limit ? o : SIZE_MAX;
}
#endif

/* XZR of one page with the active dispatch path's run finders (the bitmap encoder from
   the "avx2" path up). */
static size_t cm_xzr_encode_with(const uint8_t *nw, const uint8_t *base, size_t L, uint8_t *dst, size_t limit,
                                 cm_page_ops ops) {
#if CM_X86
    if (cm_active - cm_paths >= 2 && L <= CM_XZR_MASK_MAX)
        return cm_xzr_encode_mask_avx2(nw, base, L, dst, limit);
#endif
    return cm_xzr_encode(nw, base, L, dst, limit, ops);
}

/* cm_xzr_encode with the active dispatch path's run finders. */
static size_t cm_xzr_encode_entry(const uint8_t *nw, const uint8_t *base, size_t L, uint8_t *dst,
                                  size_t limit) {
    return cm_xzr_encode_with(nw, base, L, dst, limit, cm_page_ops_active());
}

/* One varint at src[*i..n): CM_XZR_OK and *v, or an error. Canonical only (no
   trailing zero groups), at most CM_VARINT_MAX bytes. */
static inline int cm_get_varint(const uint8_t *src, size_t n, size_t *i, uint64_t *v) {
    uint64_t value = 0;
    size_t j = *i;
    for (unsigned shift = 0, count = 0;; shift += 7, count++) {
        if (count == CM_VARINT_MAX)
            return CM_XZR_OVERLONG_VARINT;
        if (j >= n)
            return CM_XZR_TRUNCATED_VARINT;
        uint8_t b = src[j++];
        value |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            if (b == 0 && count > 0)
                return CM_XZR_OVERLONG_VARINT;
            break;
        }
    }
    *i = j;
    *v = value;
    return CM_XZR_OK;
}

/* Strict XZR decode: out[0..L) already holds the base page; XOR the literals in. With
   out == NULL, only checks the stream. Returns CM_XZR_OK or an error with *where = the
   offending stream offset. Never touches out outside [0, L). */
static int cm_xzr_decode(const uint8_t *src, size_t n, uint8_t *out, size_t L, size_t *where) {
    size_t i = 0, pos = 0;
    while (i < n) {
        uint64_t z, k;
        size_t at = i;
        int rc = cm_get_varint(src, n, &i, &z);
        if (rc == CM_XZR_OK)
            rc = cm_get_varint(src, n, &i, &k);
        if (rc != CM_XZR_OK) {
            *where = at;
            return rc;
        }
        if (k == 0) {
            *where = at;
            return CM_XZR_ZERO_LITERAL;
        }
        if (z > L - pos || k > L - pos - z) {
            *where = at;
            return CM_XZR_PAST_PAGE;
        }
        if (k > n - i) {
            *where = at;
            return CM_XZR_TRUNCATED_LITERAL;
        }
        pos += (size_t)z;
        if (out) {
            for (size_t j = 0; j < (size_t)k; j++)
                out[pos + j] ^= src[i + j];
        }
        pos += (size_t)k;
        i += (size_t)k;
    }
    return CM_XZR_OK;
}

/* ------------------------------------------------------------------------------------ */
/* batches                                                                               */
/* ------------------------------------------------------------------------------------ */

/* The XZR hint of a page copy, taken by the create pass (cm_leaves.h) while the copy and
   its base page are both in cache: the size of the page's XZR stream against its base
   when that is smaller than the page, else CM_XZR_HINT_NO_WIN (XZR cannot be chosen: the
   encoder need not read the base page again to find out), or CM_XZR_HINT_UNKNOWN (not
   taken: pages over CM_XZR_HINT_PAGE_MAX bytes, copies made without hints). */
#define CM_XZR_HINT_UNKNOWN 0xFFFF
#define CM_XZR_HINT_NO_WIN 0xFFFE
#define CM_XZR_HINT_PAGE_MAX 4096

/* Smallest RLE stream of L bytes: every output byte stands for at most 127/3 input bytes. */
static inline size_t cm_rle_min_size(size_t L) { return (3 * L + 126) / 127; }

/* Whether p[0..L) has at least `limit` maximal runs of equal bytes. The crate's RLE
   writes at least one byte per run (a literal byte, or a 3-byte token), so this bounds
   its output from below without running it: pages of small scattered changes (int64
   counters, floats) have thousands of runs, and RLE-compressing them only to throw the
   result away cost as much as their XZR encoding. Counts 8 byte pairs at a time. */
static int cm_runs_at_least(const uint8_t *p, size_t L, size_t limit) {
    if (L == 0)
        return limit == 0;
    size_t runs = 1, i = 0;
    for (; i + 9 <= L; i += 8) {
        uint64_t t = cm_load64(p + i) ^ cm_load64(p + i + 1); /* byte j: p[i+j] vs p[i+j+1] */
        t |= t >> 4;
        t |= t >> 2;
        t |= t >> 1;
        t &= 0x0101010101010101ULL;
        runs += (size_t)((t * 0x0101010101010101ULL) >> 56);
        if (runs >= limit)
            return 1;
    }
    for (; i + 1 < L; i++)
        runs += p[i] != p[i + 1];
    return runs >= limit;
}

/* The base page at byte `start`, L bytes long: a pointer into base when it is whole,
   else `scratch` filled with the part present and zeros. */
static inline const uint8_t *cm_base_page(const uint8_t *base, size_t nbase, size_t start, size_t L,
                                          uint8_t *scratch) {
    if (start <= nbase && L <= nbase - start) /* not start + L: it may wrap */
        return base + start;
    size_t have = start < nbase ? nbase - start : 0;
    if (have)
        memcpy(scratch, base + start, have);
    memset(scratch + have, 0, L - have);
    return scratch;
}

/* Encode page k (pages[k], lens[k] <= page bytes: page idx[k] of the new state) against
   the same bytes of `base` (nbase bytes, zeros past its end). Each page gets the smallest allowed encoding, ties to the lower
   value in the order RAW, RLE, ZERO, XZR (a later one only when strictly smaller).
   Writes enc[k], off[k+1] (not off[0]: the caller's, so that batches encoded at once
   into one offsets array do not write each other's entries), chk[k] (the weighted checksum of the stored
   bytes: the per-page check of the wire format) and the stored bytes back to back into dst, which
   needs room for the sum of the pages' lengths (RAW bounds every choice). scratch needs
   3 * page + page + page + 32 bytes. Indices must be >= 0 (checked by the caller).
   xzr_hint (NULL: none) says, per page, CM_XZR_HINT_NO_WIN when XZR is known not to be
   smaller than the page (it is not tried then); any other value, try it. Returns the
   payload size. */
static size_t cm_encode_pages(const uint8_t *const *pages, const size_t *lens, const uint8_t *base,
                              size_t nbase, const int64_t *idx, size_t count, size_t page, unsigned allowed,
                              const uint16_t *xzr_hint, uint8_t *enc, int64_t *off, uint32_t *chk, uint8_t *dst,
                              uint8_t *scratch) {
    cm_page_ops ops = cm_page_ops_active();
    uint8_t *rle_buf = scratch;                  /* 3 * page */
    uint8_t *xzr_buf = scratch + 3 * page;       /* page + 16 */
    uint8_t *base_buf = scratch + 4 * page + 16; /* page */
    size_t o = 0;
    for (size_t k = 0; k < count; k++) {
        size_t start = (size_t)idx[k] * page;
        size_t L = lens[k];
        const uint8_t *np = pages[k];
        uint8_t best = CM_ENC_RAW;
        size_t best_size = L;
        const uint8_t *best_src = np;
        if ((allowed & CM_ALLOW(CM_ENC_ZERO)) && cm_all_zero(np, L)) {
            best = CM_ENC_ZERO;
            best_size = 0;
        } else {
            size_t xzr = SIZE_MAX;
            /* The create pass found that XZR does not beat the raw page (with the base
               page in cache): not tried, so the base page is not read again. */
            if ((allowed & CM_ALLOW(CM_ENC_XZR)) && !(xzr_hint && xzr_hint[k] == CM_XZR_HINT_NO_WIN)) {
                const uint8_t *bp = cm_base_page(base, nbase, start, L, base_buf);
                xzr = cm_xzr_encode_with(np, bp, L, xzr_buf, L, ops);
            }
            /* RLE (tried first, so it wins a tie) cannot be smaller than its smallest
               possible output, nor than one byte a run: skip it when XZR (or RAW) is
               already below that. */
            if ((allowed & CM_ALLOW(CM_ENC_RLE)) && (xzr == SIZE_MAX || xzr >= cm_rle_min_size(L)) &&
                !cm_runs_at_least(np, L, xzr == SIZE_MAX ? L : xzr + 1)) {
                size_t r = cm_active->rle_compress(np, L, rle_buf);
                if (r < best_size) {
                    best = CM_ENC_RLE;
                    best_size = r;
                    best_src = rle_buf;
                }
            }
            if (xzr < best_size) {
                best = CM_ENC_XZR;
                best_size = xzr;
                best_src = xzr_buf;
            }
        }
        if (best_size)
            memcpy(dst + o, best_src, best_size);
        chk[k] = cm_checksum(dst + o, best_size, 0);
        o += best_size;
        enc[k] = best;
        off[k + 1] = (int64_t)o;
    }
    return o;
}

/* Check (and, with out != NULL, decode) a batch of stored pages.
 *
 * Page k: index idx[k] (strictly increasing, idx * page < total), encoding enc[k] (in
 * `allowed`), stored bytes src[off[k]..off[k+1]) whose weighted checksum is chk[k] (not
 * checked when chk is NULL). Decoded page k goes to
 * out[k * page .. k * page + L) where L is its length in a `total`-byte state; base
 * (nbase bytes) is read only for XZR pages, and is zero past nbase.
 * `prev` is the index before this batch (-1 for none), so a batch can be checked in
 * pieces. Returns CM_PAGE_OK or an error code with *pos = the page and *detail. */
static int cm_check_pages(const uint8_t *src, size_t nsrc, const int64_t *off, const uint8_t *enc,
                          const uint32_t *chk, const int64_t *idx, size_t count, uint64_t total, size_t page,
                          unsigned allowed, int64_t prev, const uint8_t *base, size_t nbase,
                          uint8_t *out, size_t *pos, int64_t *detail) {
    for (size_t k = 0; k < count; k++) {
        int64_t index = idx[k];
        *pos = k;
        if (index < 0 || (uint64_t)index >= total / page + (total % page != 0)) {
            *detail = index;
            return CM_PAGE_INDEX_RANGE;
        }
        if (index <= prev) {
            *detail = prev;
            return CM_PAGE_NOT_INCREASING;
        }
        prev = index;
        if (off[k] < 0 || off[k + 1] < off[k] || (uint64_t)off[k + 1] > nsrc) {
            *detail = off[k + 1];
            return CM_PAGE_OFFSETS;
        }
        uint8_t e = enc[k];
        if (e > CM_ENC_XZR || !(allowed & CM_ALLOW(e))) {
            *detail = e;
            return CM_PAGE_ENCODING;
        }
        size_t start = (size_t)index * page;
        size_t L = (size_t)(total - start) < page ? (size_t)(total - start) : page;
        const uint8_t *s = src + off[k];
        size_t n = (size_t)(off[k + 1] - off[k]);
        uint8_t *slot = out ? out + k * page : NULL;
        if (chk) {
            uint32_t c = cm_checksum(s, n, 0);
            if (c != chk[k]) {
                *detail = (int64_t)c;
                return CM_PAGE_CHECK;
            }
        }
        *detail = (int64_t)n;
        switch (e) {
        case CM_ENC_RAW:
            if (n != L)
                return CM_PAGE_LENGTH;
            if (slot)
                memcpy(slot, s, L);
            break;
        case CM_ENC_ZERO:
            if (n != 0)
                return CM_PAGE_LENGTH;
            if (slot)
                memset(slot, 0, L);
            break;
        case CM_ENC_RLE: {
            size_t size = 0, where = 0;
            if (n == 0 || n > 3 * L)
                return CM_PAGE_LENGTH;
            int rc = cm_rle_decoded_size(s, n, (int64_t)L, &size, &where);
            if (rc) {
                *detail = rc;
                return CM_PAGE_RLE_CORRUPT;
            }
            if (size != L) {
                *detail = (int64_t)size;
                return CM_PAGE_RLE_SIZE;
            }
            if (slot)
                cm_rle_decode(s, n, slot, L);
            break;
        }
        case CM_ENC_XZR: {
            size_t where = 0;
            if (n > 3 * L)
                return CM_PAGE_LENGTH;
            if (slot) {
                size_t have = start < nbase ? nbase - start : 0;
                if (have > L)
                    have = L;
                if (have)
                    memcpy(slot, base + start, have);
                memset(slot + have, 0, L - have);
            }
            int rc = cm_xzr_decode(s, n, slot, L, &where);
            if (rc) {
                *detail = rc;
                return CM_PAGE_XZR_CORRUPT;
            }
            break;
        }
        }
    }
    *pos = 0;
    *detail = 0;
    return CM_PAGE_OK;
}

#endif /* CELLMIGRATE_CM_PAGES_H */
