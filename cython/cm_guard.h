/* cm_guard.h -- survive SIGBUS from a mapped file that another process truncates.
 *
 * Reading a page of a MAP_SHARED/MAP_PRIVATE file mapping that lies past the file's
 * current end raises SIGBUS. The reads are not all ours: the scan kernels, but also
 * xxhash, blake3 (on its own worker threads), numpy and memcpy read the same mapping.
 * A sigsetjmp/siglongjmp guard can only protect code that sets a jump buffer, and
 * jumping out of third-party C code or the interpreter leaves locks and reference
 * counts in an unknown state. So this guard does not jump anywhere:
 *
 *   the process-wide SIGBUS handler looks the faulting address up in a small table of
 *   registered mappings; if it is inside one, it maps a fresh zero page over the
 *   faulting page (mmap MAP_FIXED|MAP_ANONYMOUS, a plain system call on Linux and the
 *   BSDs), counts the fault in that mapping's slot and returns. The faulting load is
 *   retried, reads zeros, and whatever code was running finishes normally (on any
 *   thread). The caller asks afterwards whether its mapping faulted and, if it did,
 *   throws the result away and reports a truncated input.
 *
 * A fault outside every registered range is handed to the previous disposition (for
 * example Python's faulthandler), or the default action is restored so the retried
 * access kills the process as it would have without us.
 *
 * The table is written under the GIL (or with compare-and-swap when free-threaded) and
 * read by the handler with atomic loads only; nothing in the handler allocates or locks.
 */
#ifndef CM_GUARD_H
#define CM_GUARD_H

#include <stddef.h>
#include <stdint.h>

#define CM_GUARD_SLOTS 64

#if defined(__unix__) || defined(__APPLE__)
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#ifndef MAP_ANONYMOUS
#define MAP_ANONYMOUS MAP_ANON
#endif

typedef struct {
    int busy;          /* claimed by a registration (CAS 0 -> 1) */
    uintptr_t start;   /* 0 while the slot is being filled or is free */
    uintptr_t end;
    long faults;       /* pages replaced by zero pages in this range */
} cm_guard_slot;

static cm_guard_slot cm_guard_table[CM_GUARD_SLOTS];
static struct sigaction cm_guard_previous;
static int cm_guard_installed = 0;
static uintptr_t cm_guard_page = 4096;

static void cm_guard_handler(int sig, siginfo_t *info, void *context)
{
    uintptr_t addr = (uintptr_t)info->si_addr;
    int i;
    for (i = 0; i < CM_GUARD_SLOTS; i++) {
        uintptr_t start = __atomic_load_n(&cm_guard_table[i].start, __ATOMIC_ACQUIRE);
        uintptr_t end = __atomic_load_n(&cm_guard_table[i].end, __ATOMIC_ACQUIRE);
        if (start != 0 && addr >= start && addr < end) {
            void *page = (void *)(addr & ~(cm_guard_page - 1));
            void *got = mmap(page, (size_t)cm_guard_page, PROT_READ | PROT_WRITE,
                             MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (got != MAP_FAILED) {
                __atomic_add_fetch(&cm_guard_table[i].faults, 1, __ATOMIC_RELEASE);
                return;
            }
            break;
        }
    }
    /* Not a registered mapping (or the zero page could not be mapped): behave as if we
     * were not installed. */
    if ((cm_guard_previous.sa_flags & SA_SIGINFO) && cm_guard_previous.sa_sigaction != NULL) {
        cm_guard_previous.sa_sigaction(sig, info, context);
        return;
    }
    if (!(cm_guard_previous.sa_flags & SA_SIGINFO) && cm_guard_previous.sa_handler != SIG_DFL &&
        cm_guard_previous.sa_handler != SIG_IGN) {
        cm_guard_previous.sa_handler(sig);
        return;
    }
    {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(sig, &dfl, NULL); /* the access is retried and now kills, as before */
    }
}

/* Install the handler once (keeping the previous one to chain to). 0 on success. */
static int cm_guard_install(void)
{
    struct sigaction act;
    long page;
    if (cm_guard_installed)
        return 0;
    page = sysconf(_SC_PAGESIZE);
    if (page > 0)
        cm_guard_page = (uintptr_t)page;
    memset(&act, 0, sizeof act);
    act.sa_sigaction = cm_guard_handler;
    act.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&act.sa_mask);
    if (sigaction(SIGBUS, &act, &cm_guard_previous) != 0)
        return -1;
    cm_guard_installed = 1;
    return 0;
}

/* Register [start, start + length); returns the slot, or -1 when the table is full or
 * the handler cannot be installed (the mapping is then simply unguarded). */
static int cm_guard_add(const void *start, size_t length)
{
    int i;
    if (length == 0 || cm_guard_install() != 0)
        return -1;
    for (i = 0; i < CM_GUARD_SLOTS; i++) {
        int expected = 0;
        if (__atomic_compare_exchange_n(&cm_guard_table[i].busy, &expected, 1, 0,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            __atomic_store_n(&cm_guard_table[i].faults, 0, __ATOMIC_RELEASE);
            __atomic_store_n(&cm_guard_table[i].end, (uintptr_t)start + length, __ATOMIC_RELEASE);
            __atomic_store_n(&cm_guard_table[i].start, (uintptr_t)start, __ATOMIC_RELEASE);
            return i;
        }
    }
    return -1;
}

/* Faults counted so far in a slot (0 for -1 / out of range). */
static long cm_guard_faults(int slot)
{
    if (slot < 0 || slot >= CM_GUARD_SLOTS)
        return 0;
    return __atomic_load_n(&cm_guard_table[slot].faults, __ATOMIC_ACQUIRE);
}

/* Unregister a slot (before the mapping is unmapped); returns its fault count. */
static long cm_guard_remove(int slot)
{
    long faults;
    if (slot < 0 || slot >= CM_GUARD_SLOTS)
        return 0;
    __atomic_store_n(&cm_guard_table[slot].start, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&cm_guard_table[slot].end, 0, __ATOMIC_RELEASE);
    faults = __atomic_load_n(&cm_guard_table[slot].faults, __ATOMIC_ACQUIRE);
    __atomic_store_n(&cm_guard_table[slot].busy, 0, __ATOMIC_RELEASE);
    return faults;
}

#else /* no SIGBUS on this platform (Windows raises an exception we do not map) */

static int cm_guard_add(const void *start, size_t length) { (void)start; (void)length; return -1; }
static long cm_guard_faults(int slot) { (void)slot; return 0; }
static long cm_guard_remove(int slot) { (void)slot; return 0; }

#endif
#endif /* CM_GUARD_H */
