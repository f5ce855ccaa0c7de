"""Kernel calls made at once from several Python threads share one budget of worker
threads (cython/cm_claims.h): a call with ``threads=n`` starts only the workers still free
under ``n - 1``, so the process never runs more than its callers plus ``n - 1`` workers,
and after ``fork()`` the child starts with the whole budget free."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from typing import List

import numpy as np
import pytest

from cellmigrate import _kernels

CALLERS = 6
THREADS = 4  # a call may use the caller and 3 workers


def _hammer(data: np.ndarray, want: int, errors: List[str], stop: threading.Event) -> None:
    for _ in range(40):
        if stop.is_set():
            return
        got = _kernels.checksum(data, 0, THREADS)
        if got != want:
            errors.append(f"checksum {got:#x}, the reference {want:#x}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc/self/task (Linux)")
def test_concurrent_calls_never_run_more_workers_than_one_call_may() -> None:
    data = np.random.default_rng(7).integers(0, 256, 8 << 20, dtype=np.uint8)
    want = _kernels.checksum(data, 0, 1)  # one thread: no budget involved
    previous = _kernels._set_claim_bytes(64 << 10)  # 128 claims a call: the workers overlap
    _kernels._workers_stats()  # restart the peak
    errors: List[str] = []
    stop = threading.Event()
    callers = [threading.Thread(target=_hammer, args=(data, want, errors, stop)) for _ in range(CALLERS)]
    before = len(os.listdir("/proc/self/task"))
    most = before
    try:
        for t in callers:
            t.start()
        while any(t.is_alive() for t in callers):
            most = max(most, len(os.listdir("/proc/self/task")))
        for t in callers:
            t.join(timeout=60)
    finally:
        stop.set()
        _kernels._set_claim_bytes(previous)
    running, peak = _kernels._workers_stats()
    assert not errors, errors[:3]
    assert running == 0
    assert 1 <= peak <= THREADS - 1
    # Seen from outside: the callers, at most THREADS - 1 workers, nothing else new.
    assert most <= before + CALLERS + THREADS - 1


def test_one_call_still_gets_its_workers() -> None:
    data = np.random.default_rng(8).integers(0, 256, 4 << 20, dtype=np.uint8)
    previous = _kernels._set_claim_bytes(64 << 10)
    try:
        _kernels._workers_stats()
        assert _kernels.checksum(data, 0, THREADS) == _kernels.checksum(data, 0, 1)
        running, peak = _kernels._workers_stats()
    finally:
        _kernels._set_claim_bytes(previous)
    assert running == 0
    assert peak == THREADS - 1


_CHILD = textwrap.dedent(
    """
    import os, sys, threading
    import numpy as np
    from cellmigrate import _kernels

    _kernels._set_claim_bytes(64 << 10)
    data = np.zeros(32 << 20, dtype=np.uint8)
    stop = threading.Event()

    def busy():
        while not stop.is_set():
            _kernels.checksum(data, 0, 4)

    t = threading.Thread(target=busy, daemon=True)
    t.start()
    inside = 0
    for _ in range(20):
        parent_running = _kernels._workers_stats()[0]
        pid = os.fork()
        if pid == 0:
            # Only this thread exists here: the budget must be whole again.
            running, _ = _kernels._workers_stats()
            ok = running == 0 and _kernels.checksum(data, 0, 4) == _kernels.checksum(data, 0, 1)
            ok = ok and _kernels._workers_stats()[1] == 3
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            print("child saw a budget in use", flush=True)
            stop.set()
            t.join()
            sys.exit(1)
        inside += parent_running > 0
    stop.set()
    t.join()
    print("forks taken while workers ran:", inside, flush=True)
    """
)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() only")
def test_a_forked_child_starts_with_the_whole_budget() -> None:
    run = subprocess.run([sys.executable, "-W", "ignore", "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    # The parent's calls were running workers around the forks (else the test shows nothing).
    taken = int(run.stdout.rsplit(":", 1)[1])
    assert taken > 0, run.stdout
