"""Kernels called from 8 threads on shared read-only buffers return the serial results.

The race runs in a child process with a timeout, so a deadlock fails the test instead of
hanging the suite. Buffers are above the GIL-release threshold, so the threads really
run the C loops at the same time; the public functions are also called with a forced
split, so the shared pool is used from many threads at once.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent(
    """
    import threading
    import numpy as np
    import cellmigrate
    from cellmigrate import _kernels, _parallel
    from cellmigrate.checksum import simple_checksum, state_pages_checksum
    from cellmigrate.compare import dirty_pages, dirty_pages_checksum, first_difference

    assert _kernels.NOGIL_MIN_BYTES <= (1 << 20)
    _parallel.PARALLEL_MIN_BYTES = 1 << 20   # force the pool on these sizes
    _parallel._MIN_SPAN = 1 << 19

    rng = np.random.default_rng(7)
    n = 6 * (1 << 20) + 123
    old = rng.integers(0, 256, n, dtype=np.uint8)
    old[: 1 << 20] = 0                                   # a zero region (RLE fast path)
    old[(1 << 20) : (1 << 20) + 5000] = 0xFF             # 0xFF markers
    new = old.copy()
    new[rng.integers(0, n, 40)] ^= 0x5A
    old = old.tobytes()                                  # read-only shared buffers
    new_ro = np.frombuffer(new.tobytes(), dtype=np.uint8)
    assert not new_ro.flags.writeable
    rle_src = memoryview(old)[: 2 << 20]
    packed = _kernels.rle_compress(rle_src)
    idx = [0, 5, 300, 1535]

    def work():
        return (
            _kernels.checksum(new_ro, 0),
            _kernels.checksum(old, 2**32 - 77),
            _kernels.dirty_pages(old, new_ro, 4096).tolist(),
            [a.tolist() if hasattr(a, "tolist") else a for a in _kernels.dirty_pages_checksum(old, new_ro, 4096, 9)],
            _kernels.first_difference(old, new_ro),
            _kernels.rle_compress(rle_src),
            _kernels.rle_decompress(packed, -1),
            _kernels.state_pages_checksum(old, idx, 4096),
            _kernels.gather_pages(old, idx, 4096),
            simple_checksum(new_ro),
            dirty_pages(old, new_ro).tolist(),
            [a.tolist() if hasattr(a, "tolist") else a for a in dirty_pages_checksum(old, new_ro)],
            first_difference(old, new_ro),
            cellmigrate.simple_compress(rle_src),
        )

    serial = work()
    assert serial[6] == bytes(rle_src)
    errors = []
    barrier = threading.Barrier(8)

    def racer(k):
        try:
            barrier.wait()
            for _ in range(6):
                got = work()
                if got != serial:
                    bad = [i for i, (a, b) in enumerate(zip(got, serial)) if a != b]
                    errors.append((k, bad))
        except BaseException as exc:  # reported by the parent
            errors.append((k, repr(exc)))

    threads = [threading.Thread(target=racer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("errors", errors)
    print("OK" if not errors else "FAIL")
    """
)


@pytest.mark.parametrize("force_scalar", ["0", "1"], ids=["fastest-path", "scalar-path"])
def test_eight_threads_match_serial_results(force_scalar: str) -> None:
    env = dict(os.environ, CELLMIGRATE_FORCE_SCALAR=force_scalar)
    try:
        done = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=240
        )
    except subprocess.TimeoutExpired:
        pytest.fail("kernel calls from 8 threads did not finish in 240 s (deadlock?)")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "OK", done.stdout[-3000:]


NESTED = textwrap.dedent(
    """
    import numpy as np
    from cellmigrate import _parallel, _reference
    from cellmigrate.checksum import simple_checksum

    _parallel.PARALLEL_MIN_BYTES = 1
    _parallel._MIN_SPAN = 1000
    data = np.random.default_rng(3).integers(0, 256, 50_000, dtype=np.uint8).tobytes()
    expected = _reference.checksum(data)
    # Outer spans run on the pool; each splits again. Without the inline rule the two
    # workers would wait forever on inner tasks queued behind their own.
    got = _parallel.run_spans(lambda a, b: simple_checksum(data, threads=4), [(0, 1), (1, 2), (2, 3), (3, 4)])
    assert got == [expected] * 4, (got, expected)
    print("OK")
    """
)


def test_nested_splits_do_not_deadlock_the_pool() -> None:
    try:
        done = subprocess.run([sys.executable, "-c", NESTED], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("nested run_spans deadlocked the shared pool")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "OK"
