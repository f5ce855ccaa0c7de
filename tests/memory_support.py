"""Helpers shared by the CLI-memory test (tests/test_cli_memory.py) and its benchmark
(benches/test_bench_cli_memory.py): the state-file pair, and the ``RssAnon`` sampler.

Test support code, not product code: the benchmark imports it by putting ``tests/`` on
``sys.path``.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

PAGE = 4096

__all__ = ["PAGE", "peak_rss_anon", "write_pair"]


def write_pair(directory: Path, size: int, frac: float) -> Tuple[Path, Path, int]:
    """Write ``old.bin`` and ``new.bin`` (``size`` bytes each) in ``directory``.

    OLD is random; NEW is OLD with ``frac`` of its pages rewritten whole (random), chosen
    by a fixed seed. Written in 16 MiB pieces, so the caller never holds a state.
    Returns (OLD path, NEW path, number of dirty pages).
    """
    rng = np.random.default_rng(11)
    old_path, new_path = directory / "old.bin", directory / "new.bin"
    pages = size // PAGE
    dirty = np.zeros(pages, dtype=bool)
    dirty[rng.choice(pages, int(pages * frac), replace=False)] = True
    step = (16 << 20) // PAGE
    with open(old_path, "wb") as fo, open(new_path, "wb") as fn:
        for p in range(0, pages, step):
            block = rng.integers(0, 256, (min(step, pages - p), PAGE), dtype=np.uint8)
            fo.write(block.tobytes())
            mask = dirty[p : p + len(block)]
            block[mask] = rng.integers(0, 256, (int(mask.sum()), PAGE), dtype=np.uint8)
            fn.write(block.tobytes())
    return old_path, new_path, int(dirty.sum())


def peak_rss_anon(proc: "subprocess.Popen[bytes]", seconds: Optional[float] = None) -> int:
    """Sample ``proc``'s ``RssAnon`` (/proc/PID/status) every millisecond until it exits
    (or ``seconds`` have passed, when given); return the peak in bytes.

    ``RssAnon`` is the process's anonymous resident memory: heap, numpy and zstd buffers,
    thread stacks; not its file-backed maps (page cache, shared with every reader).
    Sampling stops early when the status file cannot be read (the process is gone).
    """
    peak = 0
    path = f"/proc/{proc.pid}/status"
    deadline = None if seconds is None else time.monotonic() + seconds
    while proc.poll() is None and (deadline is None or time.monotonic() < deadline):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
                        break
        except OSError:
            break
        time.sleep(0.001)
    return peak
