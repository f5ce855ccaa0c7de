"""The CLI's anonymous memory: streaming ``diff``/``apply`` against the whole delta in RAM.

Run:  CELLMIGRATE_BENCH_LARGE=1 pytest benches/test_bench_cli_memory.py --benchmark-only -s

For a pair of state files (random OLD; NEW with 10% or 100% of its pages rewritten), each
command runs in a child process whose ``RssAnon`` (/proc/PID/status: heap and buffers,
not the file-backed maps of the inputs and outputs) is sampled every millisecond:

* ``cellmigrate diff OLD NEW -o DELTA`` and ``cellmigrate apply OLD DELTA -o OUT`` (the
  streaming CLI: a window of the state at a time);
* the peer: the same work through the in-memory library path, which the CLI used until
  issue 12 (``DeltaSnapshot.create`` on the mapped files + ``write_to``; ``deserialize``
  of the mapped delta + ``apply`` on a private copy-on-write map of BASE).

The goal (issue 12): the CLI's peak <= 64 MiB + 16 bytes per dirty page, whatever the
delta's size. 64 MiB states run by default, 1 GiB with ``CELLMIGRATE_BENCH_LARGE=1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

# The state-file pair and the RssAnon sampler are the test's (tests/test_cli_memory.py).
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))
from memory_support import peak_rss_anon, write_pair  # noqa: E402

ROWS: List[Tuple[str, str, float, float, float]] = []

PEER = textwrap.dedent(
    """
    import sys
    from cellmigrate import DeltaSnapshot
    from cellmigrate.statefile import StateFile
    mode, a, b, out = sys.argv[1:5]
    if mode == "diff":
        with StateFile(a) as old, StateFile(b) as new:
            delta = DeltaSnapshot.create(bytes(16), old.buffer, new.buffer, 0, 1)
            with open(out, "wb") as f:
                delta.write_to(f)
    else:
        with StateFile(b) as f:
            delta = DeltaSnapshot.deserialize(f.buffer)
            with StateFile(a, private=True) as base:
                delta.apply(base.buffer)
    """
)


def _peak(cmd: List[str]) -> Tuple[float, int]:
    """Run ``cmd``; return (seconds, peak RssAnon in bytes), sampled every millisecond."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: List[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    reader.start()
    peak = peak_rss_anon(proc)
    proc.wait()
    reader.join()
    assert proc.returncode == 0, b"".join(err).decode(errors="replace")
    return time.perf_counter() - started, peak


@pytest.mark.parametrize("frac", [0.1, 1.0], ids=["10pct", "100pct"])
def test_cli_memory(size: int, frac: float, tmp_path: Path, benchmark: Any) -> None:
    if size < 64 << 20:
        pytest.skip("memory is only meaningful on large states")
    old, new, dirty = write_pair(tmp_path, size, frac)
    delta, out, peer_delta = tmp_path / "d.cmd", tmp_path / "out.bin", tmp_path / "peer.cmd"
    cli = [sys.executable, "-m", "cellmigrate"]
    figures: Dict[str, Tuple[float, int]] = {}

    def run_cli() -> None:
        for path in (delta, out):
            if path.exists():
                path.unlink()
        figures["diff"] = _peak(cli + ["diff", str(old), str(new), "-o", str(delta)])
        figures["apply -o"] = _peak(cli + ["apply", str(old), str(delta), "-o", str(out)])

    benchmark.group = "CLI anonymous memory"
    benchmark.name = f"diff + apply, {size >> 20} MiB, {frac:.0%} dirty"
    benchmark.pedantic(run_cli, rounds=1, iterations=1)
    figures["peer diff"] = _peak([sys.executable, "-c", PEER, "diff", str(old), str(new), str(peer_delta)])
    figures["peer apply"] = _peak([sys.executable, "-c", PEER, "apply", str(old), str(peer_delta), "-"])
    bound = (64 << 20) + 16 * dirty
    label = f"{size >> 20} MiB, {frac:.0%} dirty, delta {delta.stat().st_size / 2**20:.0f} MiB"
    for what, (seconds, peak) in figures.items():
        benchmark.extra_info[f"{what} peak RssAnon MiB"] = round(peak / 2**20, 1)
        benchmark.extra_info[f"{what} s"] = round(seconds, 2)
        ROWS.append((label, what, peak / 2**20, seconds, bound / 2**20))
    print("\n" + "\n".join(f"  {lab:<40} {what:<11} peak RssAnon {mib:7.1f} MiB  {sec:6.2f} s  (bound {b:.1f} MiB)"
                          for lab, what, mib, sec, b in ROWS[-4:]))
    assert figures["diff"][1] <= bound and figures["apply -o"][1] <= bound
