"""Delta create and apply (1% dirty pages, RLE pages), next to the straightforward create.

Written against the SPEC API (``cellmigrate.DeltaSnapshot``). The goals of issue 4 are
ratios within one run: create vs the straightforward create; apply vs simple_checksum.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from typing import Any, Callable, Dict, List

import pytest

import cellmigrate
from cellmigrate import _kernels, simple_checksum

from conftest import States

DeltaSnapshot = getattr(cellmigrate, "DeltaSnapshot", None)
pytestmark = pytest.mark.skipif(DeltaSnapshot is None, reason="cellmigrate.DeltaSnapshot not landed yet")

AGENT = bytes(range(16))


def straightforward_create(old: bytes, new: bytes) -> Any:
    """The crate's create as plain compiled loops: byte-loop page diff, scalar checksum
    loop over the new state, then copy and RLE-compress each dirty page."""
    indices = _kernels._naive_dirty_pages(old, new, 4096)
    checksum = _kernels._naive_checksum(new)
    view = memoryview(new)
    pages: List[Any] = []
    for i in indices:
        raw = bytes(view[i * 4096 : (i + 1) * 4096])
        packed = _kernels._naive_rle_compress(raw)
        pages.append((int(i), packed if len(packed) < len(raw) else raw))
    return checksum, pages


CREATES: Dict[str, Callable[[States], Callable[[], Any]]] = {
    "DeltaSnapshot.create digest=None": lambda s: lambda: DeltaSnapshot.create(AGENT, s.old, s.new, 0, 1, digest=None),
    "DeltaSnapshot.create (default xxh3_128 digest)": lambda s: lambda: DeltaSnapshot.create(AGENT, s.old, s.new, 0, 1),
    "DeltaSnapshot.create (xxh3_128_tree digest)":
        lambda s: lambda: DeltaSnapshot.create(AGENT, s.old, s.new, 0, 1, digest="xxh3_128_tree"),
    "straightforward create (naive loops)": lambda s: lambda: straightforward_create(s.old, s.new),
    "simple_checksum (new state)": lambda s: lambda: simple_checksum(s.new),
}


@pytest.mark.parametrize("peer", list(CREATES))
def test_create(states: States, measure: Any, peer: str) -> None:
    measure("delta create", peer, CREATES[peer](states), states.size, ours=peer == "DeltaSnapshot.create digest=None")


APPLY_DIGESTS = {
    "checksum-only (digest=None)": None,
    "default (xxh3_128 verified)": "xxh3_128",
    "xxh3_128_tree verified": "xxh3_128_tree",
}


@pytest.mark.parametrize("variant", list(APPLY_DIGESTS))
def test_apply(states: States, measure: Any, variant: str) -> None:
    digest = APPLY_DIGESTS[variant]
    delta = DeltaSnapshot.create(AGENT, states.old, states.new, 0, 1, digest=digest)
    base = bytearray(states.old)
    delta.apply(base)  # afterwards base == new; applying again re-verifies and rewrites
    assert base == states.new
    measure("delta apply", f"DeltaSnapshot.apply {variant}", lambda: delta.apply(base), states.size)
    del base


def test_apply_anchor(states: States, measure: Any) -> None:
    measure("delta apply", "simple_checksum (same state)", lambda: simple_checksum(states.new), states.size, ours=True)


MEMORY_CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import cellmigrate

    def status(field):
        # /proc/self/status, not getrusage: ru_maxrss survives exec() on Linux, so a
        # child of a big process would report its parent's peak.
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError(field)

    size = int(sys.argv[1])
    rng = np.random.default_rng(1)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    npages = size // 4096
    dirty = rng.choice(npages, max(1, npages // 100), replace=False)
    for p in dirty:
        new[p * 4096] ^= 1
    del rng
    # Current RSS now (not the peak: building the states had temporaries). The peak
    # after create is max(earlier peak, now + growth), so peak - now bounds the growth
    # from above: a conservative figure.
    before = status("VmRSS")
    delta = cellmigrate.DeltaSnapshot.create(bytes(16), old, new, 0, 1)
    after = status("VmHWM")
    print(json.dumps({"growth": max(0, after - before), "dirty_bytes": len(dirty) * 4096}))
    """
)


def test_create_peak_memory(size: int, benchmark: Any) -> None:
    """Peak RSS growth of create over two states (goal: <= 64 MiB + the dirty bytes).

    Runs once in a child process (ru_maxrss is a high-water mark, so the states are
    built before the baseline is read); the timing recorded is the child's whole run.
    """
    if size < 64 << 20:
        pytest.skip("memory growth is only meaningful on large states")
    result: Dict[str, int] = {}

    def child() -> None:
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(size)], capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        result.update(json.loads(out.stdout))

    benchmark.group = "delta create peak RSS"
    benchmark.name = f"create over two {size >> 20} MiB states"
    benchmark.pedantic(child, rounds=1, iterations=1)
    growth, dirty = result["growth"], result["dirty_bytes"]
    benchmark.extra_info["peak_rss_growth_MiB"] = round(growth / 2**20, 1)
    benchmark.extra_info["dirty_MiB"] = round(dirty / 2**20, 1)
    print(f"\ncreate over two {size >> 20} MiB states: peak RSS growth {growth / 2**20:.1f} MiB "
          f"(dirty bytes {dirty / 2**20:.1f} MiB; goal <= 64 MiB + dirty)")
    assert growth <= (64 << 20) + dirty
