"""fork() from a process that uses cellmigrate on other threads.

fork() copies only the calling thread: a lock another thread held is copied held, and a
thread pool's threads are gone. Each case runs in its own interpreter (with a timeout),
forks there, and fails if the child does not finish its work within 30 s.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

# Runs the child's work (the code in CHILD) in a forked process and prints its exit code,
# or "child stuck" after 30 s.
FORK = r"""
import os, time
def in_child(work):
    pid = os.fork()
    if pid == 0:
        try:
            ok = work()
        except BaseException as exc:
            print("child raised", repr(exc), flush=True)
            os._exit(4)
        os._exit(0 if ok else 3)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return "child stuck"
"""


def _run(code: str) -> str:
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", FORK + code], capture_output=True, text=True,
                          timeout=180, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_blake3_digests_and_keyed_deltas_in_a_forked_child() -> None:
    """The parent hashed 16 MiB with BLAKE3 (on the blake3 package's thread pool, whose
    threads a child does not have): the child's BLAKE3 digest and keyed delta still run
    and agree with the parent's (before, the child waited for ever)."""
    out = _run(r"""
import numpy as np, cellmigrate as cm
data = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8)
key = bytes(range(32))
want = cm.digest(data, "blake3")
new = data.copy(); new[::4096] ^= 1
made = cm.DeltaSnapshot.create(bytes(16), data, new, 1, 2, digest="blake3", key=key)
def work():
    if cm.digest(data, "blake3") != want:
        return False
    d = cm.DeltaSnapshot.create(bytes(16), data, new, 1, 2, digest="blake3", key=key)
    target = bytearray(data.tobytes()); d.apply(target, key=key)
    return target == new.tobytes() and d.digest == made.digest
print(in_child(work))
""")
    assert out == "0"


def test_a_tracker_busy_on_another_thread_at_fork_works_in_the_child() -> None:
    """Another thread is inside ``DirtyPageTracker.create_delta`` (its lock held, its
    progress callback sleeping) when the main thread forks: the fork waits for it, and
    the child's copy of the tracker makes and commits its own delta."""
    out = _run(r"""
import threading, numpy as np, cellmigrate as cm
state = np.random.default_rng(2).integers(0, 256, 4 << 20, dtype=np.uint8)
tracker = cm.DirtyPageTracker(bytes(16), len(state))
tracker.initialize(state)
inside = threading.Event()
def slow(event):
    if not inside.is_set():
        inside.set()
        time.sleep(1.0)  # still inside create_delta, under the tracker's lock
busy = state.copy(); busy[5] ^= 1
worker = threading.Thread(target=lambda: tracker.create_delta(busy, progress=slow))
worker.start()
inside.wait(30)
def work():
    mine = busy.copy(); mine[4096 * 9] ^= 1
    receiver = bytearray(tracker.committed_state())
    tracker.create_delta(mine).apply(receiver)
    return receiver == mine.tobytes()
print(in_child(work))
worker.join()
""")
    assert out == "0"


def test_a_fork_from_a_progress_callback_inside_a_tracker_call() -> None:
    """The forking thread itself holds the tracker's lock (it forks from the progress
    callback of ``create_delta``): taking it before the fork is re-entrant, so the fork
    does not wait, and the child (the same thread, still inside that call) uses the
    tracker and another one."""
    out = _run(r"""
import numpy as np, cellmigrate as cm
state = np.zeros(1 << 20, dtype=np.uint8)
tracker = cm.DirtyPageTracker(bytes(16), len(state))
tracker.initialize(state)
other = cm.DirtyPageTracker(bytes(16), len(state))
other.initialize(state)
results = []
def fork_here(event):
    if not results:
        def work():
            plain = state.copy(); plain[1] = 7
            return (other.create_delta(plain).dirty_page_count() == 1
                    and tracker.create_delta(plain, commit=False).dirty_page_count() == 1)
        started = time.monotonic()
        results.append((in_child(work), time.monotonic() - started < 5))
new = state.copy(); new[0] = 1
tracker.create_delta(new, progress=fork_here)
print(*results[0])
""")
    assert out == "0 True"


def test_a_lock_held_past_the_wait_is_made_anew_in_the_child() -> None:
    """Another thread holds a guarded lock longer than WAIT_SECONDS (here 0.2 s): the
    fork stops waiting and the child gets that lock fresh, so its calls run (without the
    reset it would wait for ever on a lock no thread of its own holds)."""
    out = _run(r"""
import threading, cellmigrate as cm
from cellmigrate import _forksafe
_forksafe.WAIT_SECONDS = 0.2
stats = cm.MigrationStats()
held = threading.Event()
def hold():
    with stats._lock:  # a long call under the lock
        held.set()
        time.sleep(3)
worker = threading.Thread(target=hold)
worker.start()
held.wait(30)
def work():
    stats.record_full(4096, 10)
    return stats.full_migrations == 1
print(in_child(work))
worker.join()
""")
    assert out == "0"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the compiled kernels keep arenas on Linux only")
def test_a_fork_while_another_thread_holds_the_arena_pool() -> None:
    """fork() while a thread is inside the compiled kernels' arena pool lock (held 1.5 s
    on purpose): the fork waits for it (pthread_atfork), and the child's first create and
    apply run (before, the child copied a held lock and stopped at its first arena)."""
    out = _run(r"""
import threading, numpy as np
from cellmigrate import DeltaSnapshot, _kernels
old = np.zeros(4 << 20, dtype=np.uint8); new = old.copy(); new[::4096] = 1
holder = threading.Thread(target=_kernels._hold_arena_pool, args=(1500,))
holder.start()
wait = time.monotonic() + 30
while not _kernels._arena_pool_busy():  # until the holder is inside the pool's lock
    assert time.monotonic() < wait, "the holder never took the lock"
    time.sleep(0.001)
def work():  # the child's first arena takes the pool's lock
    d = DeltaSnapshot.create(bytes(16), old, new, 1, 2)
    b = bytearray(old.tobytes()); d.apply(b)
    return b == new.tobytes()
print(in_child(work))
holder.join()
assert not _kernels._arena_pool_busy()
""")
    assert out == "0"
