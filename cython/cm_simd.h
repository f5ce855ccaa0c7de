/*
 * cm_simd.h -- the SIMD regions of cellmigrate's kernels and their runtime dispatch.
 *
 * How the kernels work (why, not what)
 * ------------------------------------
 * Wheels are built for the baseline CPU (x86-64 v1, plain aarch64), yet the states we
 * scan are GiB large and the machines that run us have AVX2 or AVX-512. So, as CRoaring
 * does, the few loops that decide throughput are written here several times, each
 * compiled with a `target` attribute for one instruction set, and one of them is chosen
 * once per process from a cached cpuid check (`cm_dispatch_init`). The portable scalar
 * versions are the only ones compiled on other architectures or compilers, and the
 * env var CELLMIGRATE_FORCE_SCALAR=1 selects them anywhere.
 *
 * Threads are not started here: the Python layer splits big buffers into page-aligned
 * spans and adds the positioned partial results. Sizes are size_t throughout.
 *
 * Weighted checksum. The crate's sum of data[i] * (i + 1) mod 2**32 looks serial (the
 * weight grows by one per byte), but it splits like Adler-32: for a block of B bytes
 * starting at byte b*B, the block adds b*B * (plain sum of the block) + (the block's
 * bytes weighted 1..B). The in-block part is a fixed-weight dot product (maddubs/madd,
 * or one vpdpbusd with VNNI); the b*B part needs only the running plain sum, because
 * sum_b b*S_b = nb*T - sum_b (S_0 + ... + S_b). Everything is mod 2**32, so 32- and
 * 64-bit lanes may wrap freely. maddubs saturates a pair at 32767: with byte weights
 * up to 64 a pair is at most 255 * (63 + 64) = 32385, so no saturation. A positioned
 * checksum (the slice sits at byte `offset` of a state) is W + offset * S, which is
 * what lets threads and page lists combine partial results linearly.
 *
 * Fused dirty scan. Delta creation needs the dirty pages of (old, new) and the checksum
 * of new. Reading new twice costs a second trip through memory, so one loop (`scan`)
 * checksums new and compares it with old while both sit in registers; the checksum
 * accumulators run across pages (only the "differs" bit is reset per page), so a page
 * boundary costs one test, not a horizontal reduction. The plain checksum is the same
 * loop without old. dirty_pages alone is memcmp per page: glibc's memcmp already runs
 * at memory speed and stops at the first difference of a dirty page.
 *
 * RLE. On real states the stream is mostly literal stretches (random-ish data, where
 * only 0xFF bytes become markers) or long runs (zero pages). Literal stretches are
 * found 32/64 bytes at a time by comparing the block with itself shifted by 1, 2 and 3
 * (four equal bytes start a run) and with 0xFF, and copied by storing the whole vector
 * (the output buffer has 3x room). A lone 0xFF, the common case in random data, gets
 * its marker without leaving the vector loop. A run is measured to its end with vector compares,
 * then emitted as 127-byte markers, so a zero page costs one pass and 33 stores. The
 * crate's scanner always restarts at the beginning of a maximal run (or 127 bytes into
 * one), so "a maximal run of L >= 4 bytes (or of 0xFF) = L // 127 full markers plus the
 * remainder as a marker (if >= 4 or 0xFF) or literals" is exactly its output.
 */
#ifndef CELLMIGRATE_CM_SIMD_H
#define CELLMIGRATE_CM_SIMD_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* CELLMIGRATE_PORTABLE_ONLY compiles the portable paths alone (what non-x86 targets
   get), so their build can be checked on any machine. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && \
    !defined(CELLMIGRATE_PORTABLE_ONLY)
#define CM_X86 1
#include <immintrin.h>
#else
#define CM_X86 0
#endif

/* ------------------------------------------------------------------------------------ */
/* Portable (scalar) paths                                                              */
/* ------------------------------------------------------------------------------------ */

/* Plain sum S and in-slice weighted sum W (weights 1..n) of p[0..n), both mod 2**32. */
static void cm_sums_scalar(const uint8_t *p, size_t n, uint32_t *ps, uint32_t *pw) {
    uint32_t S = 0, W = 0;
    size_t i = 0;
    /* Fixed 64-byte blocks with fixed weights: the inner loop is a dot product the
       compiler can vectorize even for the baseline target. A product is at most
       255 * 64 < 2**16, so it is formed in 16 bits (SSE2 has a 16-bit multiply, not a
       32-bit one): twice as fast as the 32-bit form, measured. */
    for (; i + 64 <= n; i += 64) {
        uint32_t s = 0, w = 0;
        for (unsigned j = 0; j < 64; j++) {
            s += p[i + j];
            w += (uint16_t)(p[i + j] * (uint16_t)(j + 1));
        }
        W += (uint32_t)i * s + w;
        S += s;
    }
    for (; i < n; i++) {
        S += p[i];
        W += (uint32_t)p[i] * (uint32_t)(i + 1);
    }
    *ps = S;
    *pw = W;
}

/* Scan protocol shared by every path:
     scan(p, q, n, page, idx, &S, &W) -> number of dirty pages
   sets S and W (plain and 1..n-weighted sums of p, mod 2**32) and, when q is not NULL,
   writes the ascending indices of the `page`-byte pages where p and q differ to idx.
   SIMD paths need `page` to be a multiple of their block; the driver falls back to a
   page-by-page loop otherwise. */
typedef size_t (*cm_scan_fn)(const uint8_t *, const uint8_t *, size_t, size_t, int64_t *,
                             uint32_t *, uint32_t *);

/* Bytes [from, n) after the last whole block: add them to the sums and, if they differ,
   record their page (the last one) unless the block loop already did. */
static inline size_t cm_scan_tail(const uint8_t *p, const uint8_t *q, size_t from, size_t n,
                                  size_t page, int64_t *idx, size_t count, uint32_t *S,
                                  uint32_t *W) {
    uint32_t s = *S, w = *W;
    int differs = 0;
    for (size_t i = from; i < n; i++) {
        s += p[i];
        w += (uint32_t)p[i] * (uint32_t)(i + 1);
        if (q && p[i] != q[i])
            differs = 1;
    }
    if (differs) {
        int64_t last = (int64_t)(from / page);
        if (count == 0 || idx[count - 1] != last)
            idx[count++] = last;
    }
    *S = s;
    *W = w;
    return count;
}

/* Portable scan: sums only (the driver's page loop does the comparing with memcmp). */
static size_t cm_scan_scalar(const uint8_t *p, const uint8_t *q, size_t n, size_t page,
                             int64_t *idx, uint32_t *ps, uint32_t *pw) {
    (void)q, (void)page, (void)idx;
    cm_sums_scalar(p, n, ps, pw);
    return 0;
}

static uint64_t cm_load64(const uint8_t *p);

static size_t cm_run_length_scalar(const uint8_t *p, size_t n) {
    const uint8_t b = p[0];
    const uint64_t bb = 0x0101010101010101ULL * b;
    size_t k = 1;
    while (k + 8 <= n && cm_load64(p + k) == bb)
        k += 8;
    while (k < n && p[k] == b)
        k++;
    return k;
}

/* Emit a maximal run of `len` copies of `b` the way the crate's scanner does. */
static inline size_t cm_emit_run(uint8_t *dst, size_t o, uint8_t b, size_t len) {
    while (len >= 127) {
        dst[o] = 0xFF;
        dst[o + 1] = 127;
        dst[o + 2] = b;
        o += 3;
        len -= 127;
    }
    if (len >= 4 || (len > 0 && b == 0xFF)) {
        dst[o] = 0xFF;
        dst[o + 1] = (uint8_t)len;
        dst[o + 2] = b;
        o += 3;
    } else {
        for (size_t k = 0; k < len; k++)
            dst[o + k] = b;
        o += len;
    }
    return o;
}

typedef size_t (*cm_run_length_fn)(const uint8_t *, size_t);

/* One token at src[i]: a maximal run, either markers or (short, not 0xFF) literals. */
static inline size_t cm_rle_token(const uint8_t *src, size_t n, size_t *pi, uint8_t *dst, size_t o,
                                  cm_run_length_fn run_length) {
    size_t i = *pi;
    size_t len = run_length(src + i, n - i);
    o = cm_emit_run(dst, o, src[i], len);
    *pi = i + len;
    return o;
}

static uint64_t cm_load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Nonzero when some byte of v is zero (exact: the classic has-zero-byte test). */
static inline uint64_t cm_has_zero_byte(uint64_t v) {
    return (v - 0x0101010101010101ULL) & ~v & 0x8080808080808080ULL;
}

/* dst needs room for 3 * n bytes (a lone 0xFF becomes three). Returns the output size.
   Portable: 8 bytes at a time, a word with no equal neighbours and no 0xFF is all
   literals (a run of 4 needs equal neighbours), so it is copied as a word. */
static size_t cm_rle_compress_scalar(const uint8_t *src, size_t n, uint8_t *dst) {
    size_t i = 0, o = 0;
    while (i < n) {
        while (i + 9 <= n) {
            uint64_t x = cm_load64(src + i), y = cm_load64(src + i + 1);
            if (cm_has_zero_byte(x ^ y) | cm_has_zero_byte(~x))
                break;
            memcpy(dst + o, &x, 8);
            i += 8;
            o += 8;
        }
        /* Byte by byte through the word that has a candidate. */
        size_t stop = i + 8 < n ? i + 8 : n;
        while (i < stop) {
            uint8_t b = src[i];
            if (b == 0xFF || (i + 3 < n && src[i + 1] == b && src[i + 2] == b && src[i + 3] == b) ||
                i + 3 >= n)
                break;
            dst[o++] = b;
            i++;
        }
        if (i < stop)
            o = cm_rle_token(src, n, &i, dst, o, cm_run_length_scalar);
    }
    return o;
}

/* ------------------------------------------------------------------------------------ */
/* x86-64: AVX2 and AVX-512 paths                                                       */
/* ------------------------------------------------------------------------------------ */
#if CM_X86

/* SSE2 is part of x86-64 itself, so this path needs no target attribute: it is what a
   baseline wheel gets on a CPU without AVX2. */
static inline uint64_t cm_hsum64_sse2(__m128i v) {
    return (uint64_t)_mm_cvtsi128_si64(v) + (uint64_t)_mm_cvtsi128_si64(_mm_unpackhi_epi64(v, v));
}

static inline uint32_t cm_hsum32_sse2(__m128i s) {
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(s);
}

/* 16-byte blocks; bytes widened to 16 bits and dotted with weights 1..16 by pmaddwd. */
static size_t cm_scan_sse2(const uint8_t *p, const uint8_t *q, size_t n, size_t page, int64_t *idx,
                           uint32_t *ps, uint32_t *pw) {
    const __m128i zero = _mm_setzero_si128();
    const __m128i wlo = _mm_setr_epi16(1, 2, 3, 4, 5, 6, 7, 8);
    const __m128i whi = _mm_setr_epi16(9, 10, 11, 12, 13, 14, 15, 16);
    __m128i vs = zero, vq = zero, vw0 = zero, vw1 = zero;
    size_t nb = n / 16, b = 0, count = 0, pg = 0;
    size_t per_page = q ? page / 16 : nb;
    while (b < nb) {
        size_t end = nb - b < per_page ? nb : b + per_page;
        __m128i diff = zero;
        for (; b < end; b++) {
            __m128i a = _mm_loadu_si128((const __m128i *)(p + 16 * b));
            if (q)
                diff = _mm_or_si128(diff, _mm_xor_si128(a, _mm_loadu_si128((const __m128i *)(q + 16 * b))));
            vs = _mm_add_epi64(vs, _mm_sad_epu8(a, zero));
            vq = _mm_add_epi64(vq, vs);
            vw0 = _mm_add_epi32(vw0, _mm_madd_epi16(_mm_unpacklo_epi8(a, zero), wlo));
            vw1 = _mm_add_epi32(vw1, _mm_madd_epi16(_mm_unpackhi_epi8(a, zero), whi));
        }
        if (q && _mm_movemask_epi8(_mm_cmpeq_epi8(diff, zero)) != 0xFFFF)
            idx[count++] = (int64_t)pg;
        pg++;
    }
    uint64_t T = cm_hsum64_sse2(vs), Q = cm_hsum64_sse2(vq);
    uint32_t S = (uint32_t)T;
    uint32_t W = (uint32_t)(16u * ((uint64_t)nb * T - Q)) + cm_hsum32_sse2(_mm_add_epi32(vw0, vw1));
    count = cm_scan_tail(p, q, 16 * nb, n, page, idx, count, &S, &W);
    *ps = S;
    *pw = W;
    return count;
}

static size_t cm_run_length_sse2(const uint8_t *p, size_t n) {
    const __m128i b = _mm_set1_epi8((char)p[0]);
    size_t k = 1;
    while (k + 16 <= n) {
        uint32_t ne = 0xFFFFu & ~(uint32_t)_mm_movemask_epi8(
                                     _mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(p + k)), b));
        if (ne)
            return k + (size_t)__builtin_ctz(ne);
        k += 16;
    }
    while (k < n && p[k] == p[0])
        k++;
    return k;
}

static size_t cm_rle_compress_sse2(const uint8_t *src, size_t n, uint8_t *dst) {
    const __m128i ff = _mm_set1_epi8((char)0xFF);
    size_t i = 0, o = 0;
    while (i < n) {
        while (i + 19 <= n) {
            __m128i v0 = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i v1 = _mm_loadu_si128((const __m128i *)(src + i + 1));
            __m128i v2 = _mm_loadu_si128((const __m128i *)(src + i + 2));
            __m128i v3 = _mm_loadu_si128((const __m128i *)(src + i + 3));
            __m128i run4 = _mm_and_si128(_mm_and_si128(_mm_cmpeq_epi8(v0, v1), _mm_cmpeq_epi8(v1, v2)),
                                         _mm_cmpeq_epi8(v2, v3));
            uint32_t m = (uint32_t)_mm_movemask_epi8(_mm_or_si128(run4, _mm_cmpeq_epi8(v0, ff)));
            _mm_storeu_si128((__m128i *)(dst + o), v0);
            if (!m) {
                i += 16;
                o += 16;
                continue;
            }
            size_t k = (size_t)__builtin_ctz(m);
            i += k;
            o += k;
            if (src[i] == 0xFF && src[i + 1] != 0xFF) {
                /* A lone 0xFF (1 in 256 random bytes): emit its marker and stay in the
                   vector loop instead of leaving it for the general run handling. */
                dst[o] = 0xFF;
                dst[o + 1] = 1;
                dst[o + 2] = 0xFF;
                i += 1;
                o += 3;
                continue;
            }
            break;
        }
        if (i >= n)
            break;
        o = cm_rle_token(src, n, &i, dst, o, cm_run_length_sse2);
    }
    return o;
}

#define CM_AVX2 __attribute__((target("avx2")))
#define CM_AVX512 __attribute__((target("avx512f,avx512bw")))
#define CM_AVX512VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* See cm_copy_in. 128 bytes an iteration; the tail by memcpy. */
static CM_AVX2 void cm_copy_in_avx2(uint8_t *dst, const uint8_t *src, size_t n) {
    size_t i = 0;
    for (; i + 128 <= n; i += 128) {
        __m256i a = _mm256_loadu_si256((const __m256i *)(src + i));
        __m256i b = _mm256_loadu_si256((const __m256i *)(src + i + 32));
        __m256i c = _mm256_loadu_si256((const __m256i *)(src + i + 64));
        __m256i d = _mm256_loadu_si256((const __m256i *)(src + i + 96));
        _mm256_storeu_si256((__m256i *)(dst + i), a);
        _mm256_storeu_si256((__m256i *)(dst + i + 32), b);
        _mm256_storeu_si256((__m256i *)(dst + i + 64), c);
        _mm256_storeu_si256((__m256i *)(dst + i + 96), d);
    }
    memcpy(dst + i, src + i, n - i);
}

static inline CM_AVX2 uint64_t cm_hsum64_avx2(__m256i v) {
    __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    return (uint64_t)_mm_cvtsi128_si64(s) + (uint64_t)_mm_extract_epi64(s, 1);
}

static inline CM_AVX2 uint32_t cm_hsum32_avx2(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(s);
}

/* 32-byte blocks, four per iteration (independent dot-product accumulators hide the
   multiply latency). When q is not NULL the same loads feed the page compare. */
static inline CM_AVX2 __attribute__((always_inline)) size_t
cm_scan_body_avx2(const uint8_t *p, const uint8_t *q, size_t n, size_t page, int64_t *idx,
                  uint32_t *ps, uint32_t *pw) {
    const __m256i zero = _mm256_setzero_si256();
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i wts = _mm256_setr_epi8(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17,
                                         18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32);
    __m256i vs = zero, vq = zero, vw0 = zero, vw1 = zero, vw2 = zero, vw3 = zero;
    size_t nb = n / 32, b = 0, count = 0, pg = 0;
    size_t per_page = q ? page / 32 : nb;
#define CM_LOAD_AVX2(k) _mm256_loadu_si256((const __m256i *)(p + 32 * (b + (k))))
#define CM_XOR_AVX2(v, k) _mm256_xor_si256((v), _mm256_loadu_si256((const __m256i *)(q + 32 * (b + (k)))))
#define CM_DOT_AVX2(acc, v) _mm256_add_epi32((acc), _mm256_madd_epi16(_mm256_maddubs_epi16((v), wts), ones))
    while (b < nb) {
        size_t end = nb - b < per_page ? nb : b + per_page;
        __m256i diff = zero;
        for (; b + 4 <= end; b += 4) {
            __m256i a0 = CM_LOAD_AVX2(0), a1 = CM_LOAD_AVX2(1), a2 = CM_LOAD_AVX2(2), a3 = CM_LOAD_AVX2(3);
            if (q)
                diff = _mm256_or_si256(diff, _mm256_or_si256(_mm256_or_si256(CM_XOR_AVX2(a0, 0), CM_XOR_AVX2(a1, 1)),
                                                             _mm256_or_si256(CM_XOR_AVX2(a2, 2), CM_XOR_AVX2(a3, 3))));
            vs = _mm256_add_epi64(vs, _mm256_sad_epu8(a0, zero));
            vq = _mm256_add_epi64(vq, vs);
            vs = _mm256_add_epi64(vs, _mm256_sad_epu8(a1, zero));
            vq = _mm256_add_epi64(vq, vs);
            vs = _mm256_add_epi64(vs, _mm256_sad_epu8(a2, zero));
            vq = _mm256_add_epi64(vq, vs);
            vs = _mm256_add_epi64(vs, _mm256_sad_epu8(a3, zero));
            vq = _mm256_add_epi64(vq, vs);
            vw0 = CM_DOT_AVX2(vw0, a0);
            vw1 = CM_DOT_AVX2(vw1, a1);
            vw2 = CM_DOT_AVX2(vw2, a2);
            vw3 = CM_DOT_AVX2(vw3, a3);
        }
        for (; b < end; b++) {
            __m256i a0 = CM_LOAD_AVX2(0);
            if (q)
                diff = _mm256_or_si256(diff, CM_XOR_AVX2(a0, 0));
            vs = _mm256_add_epi64(vs, _mm256_sad_epu8(a0, zero));
            vq = _mm256_add_epi64(vq, vs);
            vw0 = CM_DOT_AVX2(vw0, a0);
        }
        if (q && !_mm256_testz_si256(diff, diff))
            idx[count++] = (int64_t)pg;
        pg++;
    }
#undef CM_LOAD_AVX2
#undef CM_XOR_AVX2
#undef CM_DOT_AVX2
    uint64_t T = cm_hsum64_avx2(vs), Q = cm_hsum64_avx2(vq);
    uint32_t S = (uint32_t)T;
    __m256i vw = _mm256_add_epi32(_mm256_add_epi32(vw0, vw1), _mm256_add_epi32(vw2, vw3));
    uint32_t W = (uint32_t)(32u * ((uint64_t)nb * T - Q)) + cm_hsum32_avx2(vw);
    count = cm_scan_tail(p, q, 32 * nb, n, page, idx, count, &S, &W);
    *ps = S;
    *pw = W;
    return count;
}

static CM_AVX2 size_t cm_scan_avx2(const uint8_t *p, const uint8_t *q, size_t n, size_t page,
                                   int64_t *idx, uint32_t *ps, uint32_t *pw) {
    /* Two copies: the compiler drops the compare entirely from the sums-only one. */
    if (q)
        return cm_scan_body_avx2(p, q, n, page, idx, ps, pw);
    return cm_scan_body_avx2(p, NULL, n, page, idx, ps, pw);
}

/* 64-byte blocks, weights 1..64: a maddubs pair is at most 255 * 127, no saturation.
   With VNNI one vpdpbusd replaces maddubs + madd (no 16-bit intermediate at all); its
   latency is why there are four accumulators. */
#define CM_SCAN_BODY_AVX512(NAME, TARGET, DOT)                                                   \
    static inline TARGET __attribute__((always_inline)) size_t NAME(                            \
        const uint8_t *p, const uint8_t *q, size_t n, size_t page, int64_t *idx, uint32_t *ps,  \
        uint32_t *pw) {                                                                          \
        const __m512i zero = _mm512_setzero_si512();                                             \
        const __m512i ones = _mm512_set1_epi16(1);                                               \
        const __m512i wts = _mm512_set_epi8(                                                     \
            64, 63, 62, 61, 60, 59, 58, 57, 56, 55, 54, 53, 52, 51, 50, 49, 48, 47, 46, 45, 44,  \
            43, 42, 41, 40, 39, 38, 37, 36, 35, 34, 33, 32, 31, 30, 29, 28, 27, 26, 25, 24, 23,  \
            22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1);      \
        __m512i vs = zero, vq = zero, vw0 = zero, vw1 = zero, vw2 = zero, vw3 = zero;             \
        size_t nb = n / 64, b = 0, count = 0, pg = 0;                                            \
        size_t per_page = q ? page / 64 : nb;                                                    \
        (void)ones;                                                                              \
        while (b < nb) {                                                                         \
            size_t end = nb - b < per_page ? nb : b + per_page;                                  \
            __m512i diff = zero;                                                                 \
            for (; b + 4 <= end; b += 4) {                                                       \
                __m512i a0 = _mm512_loadu_si512((const void *)(p + 64 * b));                     \
                __m512i a1 = _mm512_loadu_si512((const void *)(p + 64 * b + 64));                \
                __m512i a2 = _mm512_loadu_si512((const void *)(p + 64 * b + 128));               \
                __m512i a3 = _mm512_loadu_si512((const void *)(p + 64 * b + 192));               \
                if (q) {                                                                         \
                    __m512i x0 = _mm512_xor_si512(a0, _mm512_loadu_si512((const void *)(q + 64 * b)));       \
                    __m512i x1 = _mm512_xor_si512(a1, _mm512_loadu_si512((const void *)(q + 64 * b + 64)));  \
                    __m512i x2 = _mm512_xor_si512(a2, _mm512_loadu_si512((const void *)(q + 64 * b + 128))); \
                    __m512i x3 = _mm512_xor_si512(a3, _mm512_loadu_si512((const void *)(q + 64 * b + 192))); \
                    /* 0xFE: a | b | c, two ternary-logic ops fold four XORs into diff */ \
                    diff = _mm512_ternarylogic_epi64(diff, x0, x1, 0xFE);                        \
                    diff = _mm512_ternarylogic_epi64(diff, x2, x3, 0xFE);                        \
                }                                                                                \
                vs = _mm512_add_epi64(vs, _mm512_sad_epu8(a0, zero));                            \
                vq = _mm512_add_epi64(vq, vs);                                                   \
                vs = _mm512_add_epi64(vs, _mm512_sad_epu8(a1, zero));                            \
                vq = _mm512_add_epi64(vq, vs);                                                   \
                vs = _mm512_add_epi64(vs, _mm512_sad_epu8(a2, zero));                            \
                vq = _mm512_add_epi64(vq, vs);                                                   \
                vs = _mm512_add_epi64(vs, _mm512_sad_epu8(a3, zero));                            \
                vq = _mm512_add_epi64(vq, vs);                                                   \
                vw0 = DOT(vw0, a0, wts, ones);                                                   \
                vw1 = DOT(vw1, a1, wts, ones);                                                   \
                vw2 = DOT(vw2, a2, wts, ones);                                                   \
                vw3 = DOT(vw3, a3, wts, ones);                                                   \
            }                                                                                    \
            for (; b < end; b++) {                                                               \
                __m512i a0 = _mm512_loadu_si512((const void *)(p + 64 * b));                     \
                if (q)                                                                           \
                    diff = _mm512_or_si512(                                                      \
                        diff, _mm512_xor_si512(a0, _mm512_loadu_si512((const void *)(q + 64 * b)))); \
                vs = _mm512_add_epi64(vs, _mm512_sad_epu8(a0, zero));                            \
                vq = _mm512_add_epi64(vq, vs);                                                   \
                vw0 = DOT(vw0, a0, wts, ones);                                                   \
            }                                                                                    \
            if (q && _mm512_test_epi64_mask(diff, diff))                                         \
                idx[count++] = (int64_t)pg;                                                      \
            pg++;                                                                                \
        }                                                                                        \
        uint64_t T = (uint64_t)_mm512_reduce_add_epi64(vs);                                      \
        uint64_t Q = (uint64_t)_mm512_reduce_add_epi64(vq);                                      \
        uint32_t S = (uint32_t)T;                                                                \
        __m512i vw = _mm512_add_epi32(_mm512_add_epi32(vw0, vw1), _mm512_add_epi32(vw2, vw3));   \
        uint32_t W = (uint32_t)(64u * ((uint64_t)nb * T - Q)) + (uint32_t)_mm512_reduce_add_epi32(vw); \
        count = cm_scan_tail(p, q, 64 * nb, n, page, idx, count, &S, &W);                        \
        *ps = S;                                                                                 \
        *pw = W;                                                                                 \
        return count;                                                                            \
    }

#define CM_DOT_MADDUBS(acc, v, w, ones) \
    _mm512_add_epi32((acc), _mm512_madd_epi16(_mm512_maddubs_epi16((v), (w)), (ones)))
#define CM_DOT_VNNI(acc, v, w, ones) _mm512_dpbusd_epi32((acc), (v), (w))

CM_SCAN_BODY_AVX512(cm_scan_body_avx512, CM_AVX512, CM_DOT_MADDUBS)
CM_SCAN_BODY_AVX512(cm_scan_body_avx512vnni, CM_AVX512VNNI, CM_DOT_VNNI)

static CM_AVX512 size_t cm_scan_avx512(const uint8_t *p, const uint8_t *q, size_t n, size_t page,
                                       int64_t *idx, uint32_t *ps, uint32_t *pw) {
    if (q)
        return cm_scan_body_avx512(p, q, n, page, idx, ps, pw);
    return cm_scan_body_avx512(p, NULL, n, page, idx, ps, pw);
}

static CM_AVX512VNNI size_t cm_scan_avx512vnni(const uint8_t *p, const uint8_t *q, size_t n,
                                               size_t page, int64_t *idx, uint32_t *ps,
                                               uint32_t *pw) {
    if (q)
        return cm_scan_body_avx512vnni(p, q, n, page, idx, ps, pw);
    return cm_scan_body_avx512vnni(p, NULL, n, page, idx, ps, pw);
}

/* --- RLE ---------------------------------------------------------------------------- */

static CM_AVX2 size_t cm_run_length_avx2(const uint8_t *p, size_t n) {
    const __m256i b = _mm256_set1_epi8((char)p[0]);
    size_t k = 1;
    while (k + 32 <= n) {
        uint32_t ne = ~(uint32_t)_mm256_movemask_epi8(
            _mm256_cmpeq_epi8(_mm256_loadu_si256((const __m256i *)(p + k)), b));
        if (ne)
            return k + (size_t)__builtin_ctz(ne);
        k += 32;
    }
    while (k < n && p[k] == p[0])
        k++;
    return k;
}

static CM_AVX2 size_t cm_rle_compress_avx2(const uint8_t *src, size_t n, uint8_t *dst) {
    const __m256i ff = _mm256_set1_epi8((char)0xFF);
    size_t i = 0, o = 0;
    while (i < n) {
        /* Literal stretch: store whole vectors, advance to the first run/0xFF candidate. */
        while (i + 35 <= n) {
            __m256i v0 = _mm256_loadu_si256((const __m256i *)(src + i));
            __m256i v1 = _mm256_loadu_si256((const __m256i *)(src + i + 1));
            __m256i v2 = _mm256_loadu_si256((const __m256i *)(src + i + 2));
            __m256i v3 = _mm256_loadu_si256((const __m256i *)(src + i + 3));
            __m256i run4 = _mm256_and_si256(
                _mm256_and_si256(_mm256_cmpeq_epi8(v0, v1), _mm256_cmpeq_epi8(v1, v2)),
                _mm256_cmpeq_epi8(v2, v3));
            uint32_t m = (uint32_t)_mm256_movemask_epi8(_mm256_or_si256(run4, _mm256_cmpeq_epi8(v0, ff)));
            _mm256_storeu_si256((__m256i *)(dst + o), v0);
            if (!m) {
                i += 32;
                o += 32;
                continue;
            }
            size_t k = (size_t)__builtin_ctz(m);
            i += k;
            o += k;
            if (src[i] == 0xFF && src[i + 1] != 0xFF) {
                /* A lone 0xFF (1 in 256 random bytes): emit its marker and stay in the
                   vector loop instead of leaving it for the general run handling. */
                dst[o] = 0xFF;
                dst[o + 1] = 1;
                dst[o + 2] = 0xFF;
                i += 1;
                o += 3;
                continue;
            }
            break;
        }
        if (i >= n)
            break;
        /* At a candidate (the start of a maximal run) or in the last few bytes. */
        o = cm_rle_token(src, n, &i, dst, o, cm_run_length_avx2);
    }
    return o;
}

static CM_AVX512 size_t cm_run_length_avx512(const uint8_t *p, size_t n) {
    const __m512i b = _mm512_set1_epi8((char)p[0]);
    size_t k = 1;
    while (k + 64 <= n) {
        uint64_t ne = _mm512_cmpneq_epi8_mask(_mm512_loadu_si512((const void *)(p + k)), b);
        if (ne)
            return k + (size_t)__builtin_ctzll(ne);
        k += 64;
    }
    while (k < n && p[k] == p[0])
        k++;
    return k;
}

static CM_AVX512 size_t cm_rle_compress_avx512(const uint8_t *src, size_t n, uint8_t *dst) {
    const __m512i ff = _mm512_set1_epi8((char)0xFF);
    size_t i = 0, o = 0;
    while (i < n) {
        while (i + 67 <= n) {
            __m512i v0 = _mm512_loadu_si512((const void *)(src + i));
            __m512i v1 = _mm512_loadu_si512((const void *)(src + i + 1));
            __m512i v2 = _mm512_loadu_si512((const void *)(src + i + 2));
            __m512i v3 = _mm512_loadu_si512((const void *)(src + i + 3));
            uint64_t m = (_mm512_cmpeq_epi8_mask(v0, v1) & _mm512_cmpeq_epi8_mask(v1, v2) &
                          _mm512_cmpeq_epi8_mask(v2, v3)) |
                         _mm512_cmpeq_epi8_mask(v0, ff);
            _mm512_storeu_si512((void *)(dst + o), v0);
            if (!m) {
                i += 64;
                o += 64;
                continue;
            }
            size_t k = (size_t)__builtin_ctzll(m);
            i += k;
            o += k;
            if (src[i] == 0xFF && src[i + 1] != 0xFF) {
                /* A lone 0xFF (1 in 256 random bytes): emit its marker and stay in the
                   vector loop instead of leaving it for the general run handling. */
                dst[o] = 0xFF;
                dst[o + 1] = 1;
                dst[o + 2] = 0xFF;
                i += 1;
                o += 3;
                continue;
            }
            break;
        }
        if (i >= n)
            break;
        o = cm_rle_token(src, n, &i, dst, o, cm_run_length_avx512);
    }
    return o;
}

#endif /* CM_X86 */

/* ------------------------------------------------------------------------------------ */
/* Runtime dispatch                                                                     */
/* ------------------------------------------------------------------------------------ */

typedef size_t (*cm_rle_fn)(const uint8_t *, size_t, uint8_t *);

typedef struct {
    const char *name;
    cm_scan_fn scan;
    size_t block; /* page sizes that are multiples of this are compared in `scan`; 0 = never */
    cm_rle_fn rle_compress;
} cm_path;

/* Ordered slowest to fastest; the last supported one is the default. */
static const cm_path cm_paths[] = {
    {"scalar", cm_scan_scalar, 0, cm_rle_compress_scalar},
#if CM_X86
    {"sse2", cm_scan_sse2, 16, cm_rle_compress_sse2},
    {"avx2", cm_scan_avx2, 32, cm_rle_compress_avx2},
    {"avx512", cm_scan_avx512, 64, cm_rle_compress_avx512},
    {"avx512vnni", cm_scan_avx512vnni, 64, cm_rle_compress_avx512},
#endif
};
#define CM_NPATHS ((int)(sizeof(cm_paths) / sizeof(cm_paths[0])))

/* The active path. Set once at import (cm_dispatch_init) and, in tests only, through
   cm_dispatch_select; a pointer store is atomic on every supported platform. */
static const cm_path *cm_active = &cm_paths[0];

static int cm_path_supported(int k) {
#if CM_X86
    static int cached = -1; /* bit k set = path k supported */
    if (cached < 0) {
        int bits = 1 | 2; /* scalar; SSE2 is part of x86-64 */
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx2"))
            bits |= 1 << 2;
        if ((bits & (1 << 2)) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
            bits |= 1 << 3;
        if ((bits & (1 << 3)) && __builtin_cpu_supports("avx512vnni"))
            bits |= 1 << 4;
        cached = bits;
    }
    return (cached >> k) & 1;
#else
    return k == 0;
#endif
}

static void cm_dispatch_init(void) {
    const char *force = getenv("CELLMIGRATE_FORCE_SCALAR");
    int k = 0;
    if (!(force && force[0] && strcmp(force, "0") != 0)) {
        for (int j = CM_NPATHS - 1; j > 0; j--) {
            if (cm_path_supported(j)) {
                k = j;
                break;
            }
        }
    }
    cm_active = &cm_paths[k];
}

/* Select a path by name; returns 0 on success, -1 unknown, -2 unsupported here. */
static int cm_dispatch_select(const char *name) {
    for (int k = 0; k < CM_NPATHS; k++) {
        if (strcmp(cm_paths[k].name, name) == 0) {
            if (!cm_path_supported(k))
                return -2;
            cm_active = &cm_paths[k];
            return 0;
        }
    }
    return -1;
}

static const char *cm_path_name(int k) { return k >= 0 && k < CM_NPATHS ? cm_paths[k].name : NULL; }
static int cm_npaths(void) { return CM_NPATHS; }
static const char *cm_active_name(void) { return cm_active->name; }

/* ------------------------------------------------------------------------------------ */
/* Path-independent drivers                                                             */
/* ------------------------------------------------------------------------------------ */

/* Ask for transparent huge pages on a large output buffer before writing it. A fresh
   GiB of 4 KiB pages costs a quarter million page faults, which (measured) makes
   writing the output, not the algorithm, the limit of RLE on big states; 2 MiB pages
   take 512 times fewer. Advisory only: any failure is ignored. */
#if defined(__linux__)
#include <sys/mman.h>
#endif
static void cm_advise_huge(void *p, size_t n) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20;
    uintptr_t start = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t end = ((uintptr_t)p + n) & ~(huge - 1);
    if (n >= ((size_t)8 << 20) && end > start)
        (void)madvise((void *)start, end - start, MADV_HUGEPAGE);
#else
    (void)p;
    (void)n;
#endif
}

/* memcpy with streaming (non-temporal) stores on x86 (SSE2, part of x86-64; not on the
   "scalar" path): a big scatter of pages, an apply's, writes far more than the caches
   hold, and a normal store first reads each target line in, only to overwrite it.
   Measured for 26,214 scattered 4 KiB pages into 1 GiB on one thread: memcpy 10.5-11.1
   ms, streaming 5.9-6.1 ms (SSE2; AVX2 stores were no faster). Call cm_stream_fence()
   once the copies are done, before anyone else reads the target. */
static void cm_copy_stream(uint8_t *dst, const uint8_t *src, size_t n) {
#if CM_X86
    if (cm_active != &cm_paths[0]) {
        size_t i = (16 - ((uintptr_t)dst & 15)) & 15; /* streaming stores need 16-byte alignment */
        if (i > n)
            i = n;
        memcpy(dst, src, i);
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_stream_si128((__m128i *)(dst + i), a);
            _mm_stream_si128((__m128i *)(dst + i + 16), b);
            _mm_stream_si128((__m128i *)(dst + i + 32), c);
            _mm_stream_si128((__m128i *)(dst + i + 48), d);
        }
        memcpy(dst + i, src + i, n - i);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* memcpy of a page or so from memory into a buffer that stays in cache, to be read
   again at once (hashed, compared): the fused passes read each page of a live state
   once, into a copy, so that every check covers the same bytes whatever a writer does.
   glibc's memcpy moves 4 KiB with `rep movsb`, which stalls on memory before the hash
   of the copy starts; plain vector loads let the core's prefetchers and the next
   page's hash overlap. Measured on one thread, 1 GiB in 4 KiB pages, each copied then
   hashed (XXH3-64): memcpy 121 ms, SSE2 loads 93, AVX2 loads 74; hashing the pages in
   place, 63 (AVX-512 Xeon, 2026-12-02). */
static void cm_copy_in(uint8_t *dst, const uint8_t *src, size_t n) {
#if CM_X86
    if (cm_active >= &cm_paths[2]) { /* avx2 and up */
        cm_copy_in_avx2(dst, src, n);
        return;
    }
    if (cm_active != &cm_paths[0]) {
        size_t i = 0;
        for (; i + 64 <= n; i += 64) {
            __m128i a = _mm_loadu_si128((const __m128i *)(src + i));
            __m128i b = _mm_loadu_si128((const __m128i *)(src + i + 16));
            __m128i c = _mm_loadu_si128((const __m128i *)(src + i + 32));
            __m128i d = _mm_loadu_si128((const __m128i *)(src + i + 48));
            _mm_storeu_si128((__m128i *)(dst + i), a);
            _mm_storeu_si128((__m128i *)(dst + i + 16), b);
            _mm_storeu_si128((__m128i *)(dst + i + 32), c);
            _mm_storeu_si128((__m128i *)(dst + i + 48), d);
        }
        memcpy(dst + i, src + i, n - i);
        return;
    }
#endif
    memcpy(dst, src, n);
}

/* Index of the lowest set bit of x (x != 0). */
static inline int cm_ctz64(uint64_t x) { return __builtin_ctzll(x); }

/* Order the streaming stores of cm_copy_stream before whatever follows. */
static void cm_stream_fence(void) {
#if CM_X86
    _mm_sfence();
#endif
}

/* Positioned checksum: sum of p[i] * (offset + i + 1) mod 2**32. */
static uint32_t cm_checksum(const uint8_t *p, size_t n, uint64_t offset) {
    uint32_t S, W;
    if (n == 0)
        return 0;
    cm_active->scan(p, NULL, n, 0, NULL, &S, &W);
    return W + (uint32_t)offset * S;
}

/* Dirty pages of (old, new) into idx (room for every page) and the positioned checksum
   of new; returns the number of dirty pages. */
static size_t cm_dirty_pages_checksum(const uint8_t *old, const uint8_t *new_, size_t n,
                                      size_t page, uint64_t offset, int64_t *idx,
                                      uint32_t *checksum) {
    const cm_path *path = cm_active;
    uint32_t S = 0, W = 0;
    size_t count = 0, k = 0;
    if (path->block && page % path->block == 0) {
        count = path->scan(new_, old, n, page, idx, &S, &W);
    } else {
        /* Page sizes the vector loop cannot follow: page by page, memcmp while hot. */
        for (size_t start = 0; start < n; start += page, k++) {
            size_t len = n - start < page ? n - start : page;
            uint32_t s, w;
            path->scan(new_ + start, NULL, len, 0, NULL, &s, &w);
            if (memcmp(new_ + start, old + start, len) != 0)
                idx[count++] = (int64_t)k;
            W += w + (uint32_t)start * s;
            S += s;
        }
    }
    *checksum = W + (uint32_t)offset * S;
    return count;
}

/* Dirty pages only: memcmp per page (libc's memcmp is already vectorized). */
static size_t cm_dirty_pages(const uint8_t *old, const uint8_t *new_, size_t n, size_t page,
                             int64_t *idx) {
    size_t count = 0, k = 0;
    for (size_t start = 0; start < n; start += page, k++) {
        size_t len = n - start < page ? n - start : page;
        if (memcmp(old + start, new_ + start, len) != 0)
            idx[count++] = (int64_t)k;
    }
    return count;
}

/* First differing byte or -1: memcmp finds the block, a byte loop the byte. */
static int64_t cm_first_difference(const uint8_t *a, const uint8_t *b, size_t n) {
    for (size_t start = 0; start < n; start += 4096) {
        size_t len = n - start < 4096 ? n - start : 4096;
        if (memcmp(a + start, b + start, len) != 0) {
            for (size_t i = start; i < start + len; i++)
                if (a[i] != b[i])
                    return (int64_t)i;
        }
    }
    return -1;
}

static size_t cm_rle_compress(const uint8_t *src, size_t n, uint8_t *dst) {
    cm_advise_huge(dst, 3 * n);
    return cm_active->rle_compress(src, n, dst);
}

/* Strict RLE decoding, first pass: the output size, checking markers and the bound in
   stream order (as the reference does). Returns 0 and sets *size, or an error kind with
   *where = offending offset: 1 truncated marker, 2 zero count, 3 over max_output.
   memchr jumps between markers, so literal stretches cost what libc's memchr costs. */
static int cm_rle_decoded_size(const uint8_t *src, size_t n, int64_t max_output, size_t *size,
                               size_t *where) {
    size_t i = 0, total = 0;
    while (i < n) {
        const uint8_t *f = (const uint8_t *)memchr(src + i, 0xFF, n - i);
        size_t j = f ? (size_t)(f - src) : n;
        total += j - i;
        if (max_output >= 0 && total > (uint64_t)max_output) {
            *where = j;
            return 3;
        }
        if (j == n)
            break;
        if (j + 2 >= n) {
            *where = j;
            return 1;
        }
        if (src[j + 1] == 0) {
            *where = j;
            return 2;
        }
        total += src[j + 1];
        if (max_output >= 0 && total > (uint64_t)max_output) {
            *where = j;
            return 3;
        }
        i = j + 3;
    }
    *size = total;
    return 0;
}

/* Second pass over a stream the first pass accepted: bulk copies and fills. */
static void cm_rle_decode(const uint8_t *src, size_t n, uint8_t *dst, size_t size) {
    size_t i = 0, o = 0;
    cm_advise_huge(dst, size);
    while (i < n) {
        const uint8_t *f = (const uint8_t *)memchr(src + i, 0xFF, n - i);
        size_t j = f ? (size_t)(f - src) : n;
        memcpy(dst + o, src + i, j - i);
        o += j - i;
        if (j == n)
            break;
        memset(dst + o, src[j + 2], src[j + 1]);
        o += src[j + 1];
        i = j + 3;
    }
}

#endif /* CELLMIGRATE_CM_SIMD_H */
