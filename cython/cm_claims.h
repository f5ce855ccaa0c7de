/* Several threads inside one GIL-free call: chunks of a pass claimed from one counter.
 *
 * Why not Python threads, one kernel call per chunk: every return from a GIL-free call
 * must take the GIL back, and while another Python thread is busy (an agent running
 * during a pre-copy round) that waits for the interpreter's switch interval, 5 ms by
 * default. A pass made of one call per 16 MiB chunk paid that per chunk: a 1 GiB create
 * went from 71 to 211 ms, and xxh3_128_tree, one call per 1 MiB leaf, from 30 to over
 * 800 ms. Here the calling thread starts threads - 1 POSIX threads, all of them claim
 * chunks from one atomic counter until none is left (a thread whose core is busy elsewhere
 * simply claims fewer), and the call returns to Python once.
 *
 * No thread outlives the call: nothing to hand over at fork(), nothing to shut down.
 * Workers start with every asynchronous signal blocked, so those stay with the
 * interpreter's own threads (CPython handles them on the main thread); faults (SIGBUS
 * from a mapped file, see cm_guard.h) reach the process's handler on any thread. Where POSIX threads are missing,
 * or cannot be started, the calling thread runs every chunk itself.
 */
#ifndef CM_CLAIMS_H
#define CM_CLAIMS_H

#include <stddef.h>

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <signal.h>
#define CM_HAVE_PTHREADS 1
/* Relaxed atomics: claims only need each chunk taken once; thread join orders results. */
#define CM_LOAD(p) __atomic_load_n(p, __ATOMIC_RELAXED)
#define CM_STORE(p, v) __atomic_store_n(p, v, __ATOMIC_RELAXED)
#define CM_FETCH_ADD(p, v) __atomic_fetch_add(p, v, __ATOMIC_RELAXED)
#else /* one thread (MSVC, say): plain accesses */
#define CM_LOAD(p) (*(p))
#define CM_STORE(p, v) (*(p) = (v))
static size_t cm_fetch_add(size_t *p, size_t v) {
    size_t was = *p;
    *p += v;
    return was;
}
#define CM_FETCH_ADD(p, v) cm_fetch_add(p, v)
#endif

/* More threads than this gain nothing on a memory-bound pass. */
#define CM_MAX_THREADS 64

/* Workers of every call now running, and the most seen at once (tests read it).
 *
 * Why a budget: several Python threads, each in a pass (migrations of several agents at
 * once), would otherwise each start threads - 1 workers, and the process would run
 * calls x threads threads on `threads` cores, each pass's chunks scattered over them. A
 * call takes the workers still free under its own `threads` - 1, maybe none; its calling
 * thread always works, so every call makes progress. Measured on the 2-vCPU VM (two and
 * four Python threads each looping 256 MiB create + digest, quiet, four A/B runs): the
 * same times with the budget and without (memory-bound passes), so it costs nothing
 * there; what it bounds is the thread count, which grows with the calls otherwise.
 * After fork() the child has no workers, whatever the parent's count was. */
static int cm_workers_running = 0;
static int cm_workers_peak = 0;

#ifdef CM_HAVE_PTHREADS
/* Up to `want` workers, as long as no more than `want` run in all (0: none free). */
static int cm_workers_take(int want) {
    int now = __atomic_load_n(&cm_workers_running, __ATOMIC_RELAXED);
    for (;;) {
        int take = want - now;
        if (take <= 0)
            return 0;
        if (__atomic_compare_exchange_n(&cm_workers_running, &now, now + take, 1, __ATOMIC_RELAXED,
                                        __ATOMIC_RELAXED)) {
            int peak = __atomic_load_n(&cm_workers_peak, __ATOMIC_RELAXED);
            while (peak < now + take &&
                   !__atomic_compare_exchange_n(&cm_workers_peak, &peak, now + take, 1, __ATOMIC_RELAXED,
                                                __ATOMIC_RELAXED)) {
            }
            return take;
        }
    }
}

static void cm_workers_give(int n) {
    if (n > 0)
        __atomic_fetch_sub(&cm_workers_running, n, __ATOMIC_RELAXED);
}

static void cm_workers_after_fork(void) {
    cm_workers_running = 0;
    cm_workers_peak = 0;
}

/* Once, at import (pthread_atfork handlers cannot be removed: register one only). */
static int cm_claims_init(void) { return pthread_atfork(NULL, NULL, cm_workers_after_fork); }
#else
static int cm_claims_init(void) { return 0; }
#endif

/* Workers running now into *running, the most at once since the last call into *peak
 * (which restarts from the running count). */
static void cm_workers_stats(int *running, int *peak) {
#ifdef CM_HAVE_PTHREADS
    *running = __atomic_load_n(&cm_workers_running, __ATOMIC_RELAXED);
    *peak = __atomic_exchange_n(&cm_workers_peak, *running, __ATOMIC_RELAXED);
#else
    *running = *peak = 0;
#endif
}

typedef struct cm_claims cm_claims;

struct cm_claims {
    size_t count; /* chunks 0 .. count - 1 */
    /* Run chunk k with this thread's scratch; nonzero stops every thread after its chunk. */
    int (*run)(cm_claims *c, size_t k, void *scratch);
    /* Optional: a thread's scratch, made by the thread itself (NULL: out of memory, the
       thread runs nothing) and freed when it is done. */
    void *(*scratch_new)(cm_claims *c);
    void (*scratch_free)(void *scratch);
    size_t next; /* the next chunk to claim (atomic) */
    size_t done; /* chunks run to the end without failing (atomic) */
    int stop;    /* a chunk failed, or a thread could not make its scratch (atomic) */
};

static void *cm_claims_worker(void *arg) {
    cm_claims *c = (cm_claims *)arg;
    void *scratch = NULL;
    if (c->scratch_new) {
        scratch = c->scratch_new(c);
        if (!scratch) /* the other threads carry on; done tells whether all chunks ran */
            return NULL;
    }
    while (!CM_LOAD(&c->stop)) {
        size_t k = CM_FETCH_ADD(&c->next, 1);
        if (k >= c->count)
            break;
        if (c->run(c, k, scratch) != 0) {
            CM_STORE(&c->stop, 1);
            break;
        }
        CM_FETCH_ADD(&c->done, 1);
    }
    if (c->scratch_free)
        c->scratch_free(scratch);
    return NULL;
}

/* Run every chunk on up to `threads` threads (the caller's among them); returns the
 * threads used: those started, plus the caller (0 when there is no chunk). The results
 * are the caller's to read once this returns (thread join orders their writes before it);
 * all chunks ran when c->done == c->count. */
static int cm_claims_run(cm_claims *c, int threads) {
    c->next = 0;
    c->done = 0;
    c->stop = 0;
    if (c->count == 0)
        return 0;
    if ((size_t)threads > c->count)
        threads = (int)c->count;
    if (threads > CM_MAX_THREADS)
        threads = CM_MAX_THREADS;
    int started = 0, granted = 0;
#ifdef CM_HAVE_PTHREADS
    pthread_t ids[CM_MAX_THREADS];
    if (threads > 1)
        granted = cm_workers_take(threads - 1);
    if (granted > 0) {
        sigset_t async, saved;
        sigfillset(&async);
        /* Faults stay deliverable: a blocked SIGBUS kills the process instead of reaching
           cm_guard.h's handler (a truncated or full file under a mapping). */
        sigdelset(&async, SIGBUS);
        sigdelset(&async, SIGSEGV);
        sigdelset(&async, SIGFPE);
        sigdelset(&async, SIGILL);
        sigdelset(&async, SIGTRAP);
#ifdef SIGSYS
        sigdelset(&async, SIGSYS);
#endif
        /* An explicit stack: the default is RLIMIT_STACK (8 MiB of address space a thread)
           with glibc but 128 KiB with musl; the chunk functions need little either way. */
        pthread_attr_t attr;
        int have_attr = pthread_attr_init(&attr) == 0;
        if (have_attr && pthread_attr_setstacksize(&attr, (size_t)1 << 20) != 0) {
            pthread_attr_destroy(&attr);
            have_attr = 0;
        }
        pthread_sigmask(SIG_SETMASK, &async, &saved); /* the workers inherit this mask */
        while (started < granted &&
               pthread_create(&ids[started], have_attr ? &attr : NULL, cm_claims_worker, c) == 0)
            started++;
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
        if (have_attr)
            pthread_attr_destroy(&attr);
        cm_workers_give(granted - started); /* those that could not be started */
    }
#endif
    cm_claims_worker(c);
#ifdef CM_HAVE_PTHREADS
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
    cm_workers_give(started);
#endif
    return started + 1;
}

/* cm_claims_run on `count` chunks of `run`, with optional per-thread scratch. */
static int cm_claims_start(cm_claims *c, size_t count, int (*run)(cm_claims *, size_t, void *),
                           void *(*scratch_new)(cm_claims *), void (*scratch_free)(void *), int threads) {
    c->count = count;
    c->run = run;
    c->scratch_new = scratch_new;
    c->scratch_free = scratch_free;
    return cm_claims_run(c, threads);
}

#endif /* CM_CLAIMS_H */
