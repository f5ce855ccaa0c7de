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
#endif

/* More threads than this gain nothing on a memory-bound pass. */
#define CM_MAX_THREADS 64

typedef struct cm_claims cm_claims;

struct cm_claims {
    size_t count; /* chunks 0 .. count - 1 */
    /* Run chunk k with this thread's scratch; nonzero stops every thread after its chunk. */
    int (*run)(cm_claims *c, size_t k, void *scratch);
    /* Optional: a thread's scratch, made by the thread itself (NULL: out of memory, the
       thread runs nothing and sets stop) and freed when it is done. */
    void *(*scratch_new)(cm_claims *c);
    void (*scratch_free)(void *scratch);
    size_t next; /* the next chunk to claim (atomic) */
    int stop;    /* a chunk failed (atomic) */
    int nomem;   /* a thread's scratch could not be made (atomic) */
};

static void *cm_claims_worker(void *arg) {
    cm_claims *c = (cm_claims *)arg;
    void *scratch = NULL;
    if (c->scratch_new) {
        scratch = c->scratch_new(c);
        if (!scratch) {
            __atomic_store_n(&c->nomem, 1, __ATOMIC_RELAXED);
            __atomic_store_n(&c->stop, 1, __ATOMIC_RELAXED);
            return NULL;
        }
    }
    while (!__atomic_load_n(&c->stop, __ATOMIC_RELAXED)) {
        size_t k = __atomic_fetch_add(&c->next, 1, __ATOMIC_RELAXED);
        if (k >= c->count)
            break;
        if (c->run(c, k, scratch) != 0) {
            __atomic_store_n(&c->stop, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    if (c->scratch_free)
        c->scratch_free(scratch);
    return NULL;
}

/* Run every chunk on up to `threads` threads (the caller's among them); returns the
 * threads that ran (0 when there is no chunk). The results are the caller's to read once this returns (thread join
 * orders their writes before it). c->stop / c->nomem tell whether all chunks ran. */
static int cm_claims_run(cm_claims *c, int threads) {
    c->next = 0;
    c->stop = 0;
    c->nomem = 0;
    if (c->count == 0)
        return 0;
    if ((size_t)threads > c->count)
        threads = (int)c->count;
    if (threads > CM_MAX_THREADS)
        threads = CM_MAX_THREADS;
    int started = 0;
#ifdef CM_HAVE_PTHREADS
    pthread_t ids[CM_MAX_THREADS];
    if (threads > 1) {
        sigset_t async, saved;
        sigfillset(&async);
        /* Faults stay deliverable: a blocked SIGBUS kills the process instead of reaching
           cm_guard.h's handler (a truncated or full file under a mapping). */
        sigdelset(&async, SIGBUS);
        sigdelset(&async, SIGSEGV);
        sigdelset(&async, SIGFPE);
        sigdelset(&async, SIGILL);
        pthread_sigmask(SIG_SETMASK, &async, &saved); /* the workers inherit this mask */
        while (started < threads - 1 && pthread_create(&ids[started], NULL, cm_claims_worker, c) == 0)
            started++;
        pthread_sigmask(SIG_SETMASK, &saved, NULL);
    }
#endif
    cm_claims_worker(c);
#ifdef CM_HAVE_PTHREADS
    for (int i = 0; i < started; i++)
        pthread_join(ids[i], NULL);
#endif
    return started + 1;
}

#endif /* CM_CLAIMS_H */
