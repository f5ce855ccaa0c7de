"""How many threads a call uses, and a small pool for the work split in Python.

The compiled kernels start their own threads inside one GIL-free call (``cm_claims.h``);
for them :func:`plan` only counts the threads a call may use (``len(plan(...))``). The
pool runs what is still split in Python (the Python paths of the delta passes, BLAKE3
and plain XXH3-128 beside a helper thread): the compiled kernels release the GIL for
large inputs, so plain Python threads run them in parallel, and results combine exactly
(a positioned checksum of each span adds up to the whole checksum, dirty-page lists
concatenate). Small inputs never split: handing work to a thread costs tens of
microseconds, more than scanning a few MiB.

By default a call may use ``os.cpu_count()`` threads; ``CELLMIGRATE_THREADS=<n>`` caps
that for the whole process and a ``threads=`` argument caps a single call.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

__all__ = ["PARALLEL_MIN_BYTES", "max_threads", "plan", "run_spans"]

T = TypeVar("T")

#: Inputs smaller than this are processed on the calling thread. Measured on the 2-vCPU
#: dev VM (best of 3, GB/s, 1 thread -> 2 threads): checksum 25.5 -> 34.5 at 16 MiB and
#: 16.5 -> 23.5 at 32 MiB (cache-resident spans), neutral from 64 MiB (11-13 GB/s, the
#: VM's memory bandwidth, which one core already saturates); below a few MiB the hand-off
#: costs more than it saves. Machines whose cores each bring their own bandwidth gain
#: from here on.
PARALLEL_MIN_BYTES = 16 << 20

#: Each thread gets at least this many bytes, so a split never makes tiny spans.
_MIN_SPAN = 8 << 20

_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None

# os.cpu_count() costs microseconds (it reads /sys); ask once.
_CPUS = os.cpu_count() or 1


def max_threads() -> int:
    """Threads a call may use: the CPU count, capped by ``CELLMIGRATE_THREADS``."""
    count = _CPUS
    env = os.environ.get("CELLMIGRATE_THREADS", "").strip()
    if env:
        try:
            cap = int(env)
        except ValueError:
            raise ValueError(f"CELLMIGRATE_THREADS must be a positive integer, got {env!r}") from None
        if cap < 1:
            raise ValueError(f"CELLMIGRATE_THREADS must be a positive integer, got {env!r}")
        count = min(count, cap)
    return count


def _check_threads(threads: Optional[int]) -> int:
    limit = max_threads()
    if threads is None:
        return limit
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise TypeError(f"threads must be an int or None, not {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return min(threads, limit)


def plan(nbytes: int, threads: Optional[int], align: int = 1) -> List[Tuple[int, int]]:
    """Split ``[0, nbytes)`` into ``(start, end)`` spans, one per thread to use.

    Span boundaries are multiples of ``align`` (a page size, so no page is split). A
    single span means "run on the calling thread".
    """
    if (threads is None or (type(threads) is int and threads == 1)) and nbytes < PARALLEL_MIN_BYTES:
        return [(0, nbytes)]  # the common small call: no environment lookups
    wanted = _check_threads(threads)
    if wanted == 1 or nbytes < PARALLEL_MIN_BYTES:
        return [(0, nbytes)]
    parts = max(1, min(wanted, nbytes // _MIN_SPAN))
    units = -(-nbytes // align)
    per = -(-units // parts) * align
    spans = []
    start = 0
    while start < nbytes:
        end = min(start + per, nbytes)
        spans.append((start, end))
        start = end
    return spans


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_CPUS, thread_name_prefix="cellmigrate")
        return _pool


def _forget_pool_after_fork() -> None:
    # Worker threads do not survive fork(); a child builds its own pool on first use.
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool_after_fork)


_local = threading.local()


def _in_worker(fn: Callable[[int, int], T], start: int, end: int) -> T:
    _local.worker = True
    try:
        return fn(start, end)
    finally:
        _local.worker = False


def run_spans(fn: Callable[[int, int], T], spans: Sequence[Tuple[int, int]]) -> List[T]:
    """``[fn(start, end) for each span]``, the first on this thread, the rest on the pool.

    Called from inside a pool task (a span function that itself splits work), the spans
    run inline: a worker waiting on tasks queued behind it could deadlock the pool.
    """
    if len(spans) == 1 or getattr(_local, "worker", False):
        return [fn(start, end) for start, end in spans]
    pool = _executor()
    futures: List[Future[T]] = [pool.submit(_in_worker, fn, start, end) for start, end in spans[1:]]
    first = fn(*spans[0])
    return [first] + [f.result() for f in futures]
