/* The whole-state passes as claimed chunks (cm_claims.h): one GIL-free call each.
 *
 * Each job describes its pass over chunks (spans of a state: 2 uint64 a chunk, lo and
 * hi, ascending and not overlapping) and each chunk writes only its own results (its
 * arena, its sum, its leaves' or pages' digests), so threads never share an output.
 */
#ifndef CM_JOBS_H
#define CM_JOBS_H

#include "cm_claims.h"
#include "cm_leaves.h"

/* ---- create: cm_scan_leaves / cm_scan_leaves_fp over chunks, an arena each ---- */

typedef struct {
    cm_claims claims; /* first: the job is its claims */
    const uint8_t *old, *new_;
    size_t leaf;
    const uint64_t *spans;
    uint64_t lo;       /* out's first leaf starts here */
    cm_arena **arenas; /* one per chunk, reserved by the worker that claims it */
    uint32_t *sums;    /* one per chunk */
    uint8_t *stale;    /* one per chunk (fingerprinted changes only) */
    const uint64_t *fp_old;
    uint64_t *fp_new; /* both NULL: compare old and new */
    uint8_t *out;     /* leaf digests, or NULL */
    int changes_only;
    int nomem_chunk; /* a chunk's copies did not fit in memory (atomic) */
} cm_scan_job;

typedef struct {
    int64_t *scratch_idx;
    uint8_t *tmp_raw, *tmp;
    void *state;
} cm_scan_scratch;

static void cm_scan_scratch_free(void *p) {
    cm_scan_scratch *s = (cm_scan_scratch *)p;
    if (!s)
        return;
    free(s->scratch_idx);
    free(s->tmp_raw);
    cm_xxh3_state_free(s->state);
    free(s);
}

static void *cm_scan_scratch_new(cm_claims *c) {
    cm_scan_job *j = (cm_scan_job *)c;
    size_t page = j->arenas[0]->page;
    cm_scan_scratch *s = (cm_scan_scratch *)calloc(1, sizeof *s);
    if (!s)
        return NULL;
    s->scratch_idx = (int64_t *)malloc((j->leaf / page + 1) * sizeof(int64_t));
    if (j->fp_old) {
        /* 64-byte aligned: a row straddling cache lines hashes markedly slower. */
        s->tmp_raw = (uint8_t *)malloc(page + 64);
        s->tmp = (uint8_t *)(((uintptr_t)s->tmp_raw + 63) & ~(uintptr_t)63);
    }
    if (j->out)
        s->state = cm_xxh3_state_new();
    if (!s->scratch_idx || (j->fp_old && !s->tmp_raw) || (j->out && !s->state)) {
        cm_scan_scratch_free(s);
        return NULL;
    }
    return s;
}

static int cm_scan_chunk(cm_claims *c, size_t k, void *p) {
    cm_scan_job *j = (cm_scan_job *)c;
    cm_scan_scratch *s = (cm_scan_scratch *)p;
    uint64_t a = j->spans[2 * k], b = j->spans[2 * k + 1];
    cm_arena *ar = j->arenas[k];
    uint8_t *out = j->out ? j->out + 16 * ((a - j->lo) / j->leaf) : NULL;
    int failed = 0, stale = 0;
    /* Room for every page of the chunk up front (address space: one mapping, no growth),
       the unused part given back right after. */
    if (cm_arena_reserve(ar, (size_t)((b - a + ar->page - 1) / ar->page)) != 0)
        failed = 1;
    else if (j->fp_old)
        j->sums[k] = cm_scan_leaves_fp(j->old, j->new_, a, b, j->leaf, j->fp_old, j->fp_new, s->tmp, ar, s->state,
                                       out, j->changes_only, &stale, &failed);
    else
        j->sums[k] = cm_scan_leaves(j->old, j->new_, a, b, j->leaf, ar, s->scratch_idx, s->state, out, &failed);
    j->stale[k] = (uint8_t)stale;
    cm_arena_trim(ar);
    if (failed)
        CM_STORE(&j->nomem_chunk, 1);
    return failed;
}

static int cm_scan_job_run(cm_scan_job *j, size_t count, int threads) {
    j->nomem_chunk = 0;
    return cm_claims_start(&j->claims, count, cm_scan_chunk, cm_scan_scratch_new, cm_scan_scratch_free, threads);
}

/* ---- apply's check: cm_overlay_leaves over chunks ---- */

typedef struct {
    cm_claims claims;
    const uint8_t *base;
    size_t leaf;
    const uint64_t *spans;
    uint64_t lo;
    const uint8_t *const *pages; /* all of them, ascending starts */
    const size_t *lens;
    const int64_t *starts;
    const size_t *first; /* chunk k's pages are first[k] .. first[k + 1] - 1 */
    uint32_t *sums;
    uint8_t *out;
    uint64_t *changed; /* one line mask a page, or NULL */
} cm_overlay_job;

static void *cm_xxh3_scratch_new(cm_claims *c) {
    (void)c;
    return cm_xxh3_state_new();
}

static void cm_xxh3_scratch_free(void *state) { cm_xxh3_state_free(state); }

static int cm_overlay_chunk(cm_claims *c, size_t k, void *state) {
    cm_overlay_job *j = (cm_overlay_job *)c;
    uint64_t a = j->spans[2 * k], b = j->spans[2 * k + 1];
    size_t p = j->first[k], n = j->first[k + 1] - p;
    j->sums[k] = cm_overlay_leaves(j->base, a, b, j->leaf, j->pages + p, j->lens + p, j->starts + p, n, state,
                                   j->out ? j->out + 16 * ((a - j->lo) / j->leaf) : NULL,
                                   j->changed ? j->changed + p : NULL);
    return 0;
}

static int cm_overlay_job_run(cm_overlay_job *j, size_t count, int threads) {
    return cm_claims_start(&j->claims, count, cm_overlay_chunk, j->out ? cm_xxh3_scratch_new : NULL,
                           j->out ? cm_xxh3_scratch_free : NULL, threads); /* no digests: no state */
}

/* ---- encode: cm_encode_pages over runs of pages, into one payload ---- */

/* Why one payload for every thread: encoded per thread, the parts had to be joined, and
 * both the parts and the join were fresh memory, which costs a VM a host fault a page (a
 * 1 GiB state with 10% of its pages rewritten: 36 ms a copy, of a 150 ms encode). Each
 * run of pages is encoded into its own room of one payload (room = the run's raw bytes:
 * no encoding is larger), then cm_encode_job_pack closes the gaps in order. Raw pages,
 * the incompressible case, leave no gap, so nothing moves; small encoded pages move
 * little. */
typedef struct {
    cm_claims claims;
    const uint8_t *const *pages;
    const size_t *lens;
    const uint8_t *base;
    size_t nbase;
    const int64_t *idx;
    size_t count; /* pages */
    size_t page;
    size_t per; /* pages a run (a claim) */
    unsigned allowed;
    const uint16_t *xzr_hint; /* or NULL */
    uint8_t *enc;
    int64_t *off; /* count + 1: run-relative ends until packed */
    uint32_t *chk;
    uint8_t *dst;
    const size_t *room; /* run k writes from dst + room[k] */
    size_t *used;       /* run k's payload bytes */
} cm_encode_job;

static void *cm_encode_scratch_new(cm_claims *c) { return malloc(5 * ((cm_encode_job *)c)->page + 64); }

static int cm_encode_chunk(cm_claims *c, size_t k, void *scratch) {
    cm_encode_job *j = (cm_encode_job *)c;
    size_t p = k * j->per, n = j->count - p < j->per ? j->count - p : j->per;
    j->used[k] = cm_encode_pages(j->pages + p, j->lens + p, j->base, j->nbase, j->idx + p, n, j->page, j->allowed,
                                 j->xzr_hint ? j->xzr_hint + p : NULL, j->enc + p, j->off + p, j->chk + p,
                                 j->dst + j->room[k], (uint8_t *)scratch);
    return 0;
}

/* room and used need one slot a run: (count + per - 1) / per. */
static int cm_encode_job_run(cm_encode_job *j, int threads) {
    return cm_claims_start(&j->claims, (j->count + j->per - 1) / j->per, cm_encode_chunk, cm_encode_scratch_new, free,
                           threads);
}

/* After a run where every chunk ran: move each run's bytes to follow the previous one's
 * and make the offsets absolute; returns the payload size. */
static size_t cm_encode_job_pack(cm_encode_job *j) {
    size_t at = 0, runs = (j->count + j->per - 1) / j->per;
    j->off[0] = 0;
    for (size_t k = 0; k < runs; k++) {
        size_t p = k * j->per, n = j->count - p < j->per ? j->count - p : j->per;
        if (at != j->room[k] && j->used[k])
            memmove(j->dst + at, j->dst + j->room[k], j->used[k]);
        for (size_t i = p + 1; i <= p + n; i++)
            j->off[i] += (int64_t)at;
        at += j->used[k];
    }
    return at;
}

/* ---- check (and decode): cm_check_pages over runs of pages ---- */

/* One GIL-free call for a big batch (was one a Python thread). Runs are claimed in
 * order and a failing run stops new claims, so every run before it has run: the first
 * failure by position is the one to report. */
typedef struct {
    cm_claims claims;
    const uint8_t *src;
    size_t nsrc;
    const int64_t *off;
    const uint8_t *enc;
    const uint32_t *chk; /* or NULL */
    const int64_t *idx;
    size_t count;
    uint64_t total;
    size_t page;
    size_t per; /* pages a run */
    unsigned allowed;
    int64_t prev; /* the index before the batch */
    const uint8_t *base;
    size_t nbase;
    uint8_t *out; /* or NULL: check only */
    int *rc;      /* a run: its result, position (in the batch) and detail */
    size_t *pos;
    int64_t *detail;
} cm_check_job;

static int cm_check_chunk(cm_claims *c, size_t k, void *unused) {
    cm_check_job *j = (cm_check_job *)c;
    (void)unused;
    size_t p = k * j->per, n = j->count - p < j->per ? j->count - p : j->per, at = 0;
    j->rc[k] = cm_check_pages(j->src, j->nsrc, j->off + p, j->enc + p, j->chk ? j->chk + p : NULL, j->idx + p, n,
                              j->total, j->page, j->allowed, p ? j->idx[p - 1] : j->prev, j->base, j->nbase,
                              j->out ? j->out + p * j->page : NULL, &at, &j->detail[k]);
    j->pos[k] = p + at;
    return j->rc[k] != 0;
}

/* rc, pos and detail need one slot a run: (count + per - 1) / per. */
static int cm_check_job_run(cm_check_job *j, int threads) {
    return cm_claims_start(&j->claims, (j->count + j->per - 1) / j->per, cm_check_chunk, NULL, NULL, threads);
}

/* ---- XXH3-128 of each piece of a flat buffer: 4 KiB pages, or xxh3_128_tree's leaves ---- */

typedef struct {
    cm_claims claims;
    const uint8_t *data;
    size_t n;
    size_t leaf;
    size_t per; /* leaves a chunk */
    uint8_t *out;
} cm_tree_job;

static int cm_tree_chunk(cm_claims *c, size_t k, void *unused) {
    cm_tree_job *j = (cm_tree_job *)c;
    (void)unused;
    size_t i = k * j->per, end = i + j->per;
    for (; i < end && i * j->leaf < j->n; i++) {
        size_t s = i * j->leaf, len = j->n - s < j->leaf ? j->n - s : j->leaf;
        cm_xxh128_canonical(cm_xxh3.one128(j->data + s, len), j->out + 16 * i);
    }
    return 0;
}

static int cm_tree_job_run(cm_tree_job *j, int threads) {
    size_t leaves = (j->n + j->leaf - 1) / j->leaf;
    return cm_claims_start(&j->claims, (leaves + j->per - 1) / j->per, cm_tree_chunk, NULL, NULL, threads);
}

/* ---- a live chunk's pages: gather them into one buffer, XXH3-128 each copy ---- */

typedef struct {
    cm_claims claims;
    const uint8_t *state;
    size_t n; /* the state's bytes */
    size_t page;
    const int64_t *idx; /* in range; only the last may be a short page */
    size_t count;
    size_t per;   /* pages a chunk */
    uint8_t *dst; /* page k at dst + k * page */
    uint8_t *out; /* 16 bytes a page */
} cm_gather_job;

static int cm_gather_chunk(cm_claims *c, size_t k, void *unused) {
    cm_gather_job *j = (cm_gather_job *)c;
    (void)unused;
    size_t i = k * j->per, end = i + j->per < j->count ? i + j->per : j->count;
    for (; i < end; i++) {
        size_t s = (size_t)j->idx[i] * j->page, len = j->n - s < j->page ? j->n - s : j->page;
        uint8_t *copy = j->dst + i * j->page;
        cm_copy_in(copy, j->state + s, len);
        /* From the copy, still in L1: the digest is of what is sent, even if the agent
           writes the page meanwhile. */
        cm_xxh128_canonical(cm_xxh3.one128(copy, len), j->out + 16 * i);
    }
    return 0;
}

static int cm_gather_job_run(cm_gather_job *j, int threads) {
    return cm_claims_start(&j->claims, (j->count + j->per - 1) / j->per, cm_gather_chunk, NULL, NULL, threads);
}

/* ---- page fingerprints (XXH3-64 a page) and the checksum ---- */

typedef struct {
    cm_claims claims;
    const uint8_t *data;
    size_t n;
    size_t page;
    size_t chunk; /* bytes a chunk, whole pages */
    uint64_t offset;
    uint64_t *out;
    uint32_t *sums;
} cm_fp_job;

static int cm_fp_chunk(cm_claims *c, size_t k, void *unused) {
    cm_fp_job *j = (cm_fp_job *)c;
    (void)unused;
    size_t s = k * j->chunk, len = j->n - s < j->chunk ? j->n - s : j->chunk;
    j->sums[k] = cm_page_digests64(j->data + s, len, j->page, j->offset + s, j->out + s / j->page);
    return 0;
}

/* sums needs one slot per chunk: (n + chunk - 1) / chunk. */
static int cm_fp_job_run(cm_fp_job *j, int threads) {
    return cm_claims_start(&j->claims, (j->n + j->chunk - 1) / j->chunk, cm_fp_chunk, NULL, NULL, threads);
}

/* ---- the simple whole-buffer kernels: checksum, first difference, dirty pages ---- */

enum { CM_PAIR_CHECKSUM, CM_PAIR_FIRST_DIFFERENCE, CM_PAIR_DIRTY, CM_PAIR_DIRTY_CHECKSUM };

typedef struct {
    cm_claims claims;
    int kind;
    const uint8_t *a, *b; /* b: unused by the checksum (of a); the dirty pages' new */
    size_t n;
    size_t page;  /* the dirty kinds' page (chunk is a multiple of it) */
    size_t chunk; /* bytes a claim */
    uint64_t offset;
    uint32_t *sums;  /* a chunk: the checksum kinds' sum */
    int64_t *idx;    /* dirty kinds: chunk k's page numbers from idx + k * chunk / page */
    size_t *counts;  /* a chunk: dirty pages found; first difference: its offset, or SIZE_MAX */
} cm_pair_job;

static int cm_pair_chunk(cm_claims *c, size_t k, void *unused) {
    cm_pair_job *j = (cm_pair_job *)c;
    (void)unused;
    size_t s = k * j->chunk, len = j->n - s < j->chunk ? j->n - s : j->chunk;
    if (j->kind == CM_PAIR_CHECKSUM) {
        j->sums[k] = cm_checksum(j->a + s, len, j->offset + s);
        return 0;
    }
    if (j->kind == CM_PAIR_FIRST_DIFFERENCE) {
        int64_t at = cm_first_difference(j->a + s, j->b + s, len);
        j->counts[k] = at < 0 ? SIZE_MAX : (size_t)at;
        return at >= 0; /* found: no thread claims a later chunk (earlier ones are all claimed) */
    }
    size_t first = s / j->page, m;
    int64_t *out = j->idx + first;
    if (j->kind == CM_PAIR_DIRTY)
        m = cm_dirty_pages(j->a + s, j->b + s, len, j->page, out);
    else
        m = cm_dirty_pages_checksum(j->a + s, j->b + s, len, j->page, j->offset + s, out, &j->sums[k]);
    for (size_t i = 0; i < m; i++)
        out[i] += (int64_t)first;
    j->counts[k] = m;
    return 0;
}

/* counts (and sums) need (n + chunk - 1) / chunk slots, counts set to SIZE_MAX for the
   first difference (a chunk not run stays so). */
static int cm_pair_job_run(cm_pair_job *j, int threads) {
    return cm_claims_start(&j->claims, (j->n + j->chunk - 1) / j->chunk, cm_pair_chunk, NULL, NULL, threads);
}

#endif /* CM_JOBS_H */
