"""The delta passes' chunk kernel and both ways a chunk is checked (runs or scratch)."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import cellmigrate._passes as passes
from cellmigrate import PAGE_SIZE, DeltaSnapshot, digest, simple_checksum
from cellmigrate import _kernels, _reference
from cellmigrate.checksum import Hasher

AGENT = bytes(16)


@st.composite
def overlays(draw: Any) -> tuple[bytes, int, int, List[bytes], List[int]]:
    n = draw(st.integers(0, 6 * PAGE_SIZE + 5))
    base = draw(st.binary(min_size=0, max_size=n + 100))
    npages = -(-n // PAGE_SIZE)
    chosen = sorted(draw(st.sets(st.integers(0, max(npages - 1, 0)), max_size=npages))) if n else []
    pages = [draw(st.binary(min_size=min(PAGE_SIZE, n - i * PAGE_SIZE), max_size=min(PAGE_SIZE, n - i * PAGE_SIZE)))
             for i in chosen]
    offset = draw(st.integers(0, 2**40))
    return base, offset, n, pages, [i * PAGE_SIZE for i in chosen]


@settings(max_examples=80, deadline=None)
@given(overlays())
def test_overlay_checksum_matches_reference(case: tuple[bytes, int, int, List[bytes], List[int]]) -> None:
    base, offset, n, pages, starts = case
    out_c, out_r = bytearray(n + 7), bytearray(n + 7)
    got = _kernels.overlay_checksum(base, offset, n, pages, np.array(starts, dtype=np.int64), out_c)
    want = _reference.overlay_checksum(base, offset, n, pages, starts, out_r)
    assert got == want and out_c[:n] == out_r[:n]
    expected = bytearray(base[:n]) + bytearray(max(0, n - len(base)))
    for start, page in zip(starts, pages):
        expected[start : start + len(page)] = page
    assert out_c[:n] == expected and got == simple_checksum(bytes(expected), offset=offset)


@pytest.mark.parametrize("impl", [_kernels, _reference])
def test_overlay_checksum_refuses_before_writing(impl: Any) -> None:
    out = bytearray(b"\x07" * 100)
    with pytest.raises(ValueError, match="does not fit"):
        impl.overlay_checksum(b"", 0, 100, [b"xx"], [99], out)
    with pytest.raises(ValueError, match="out holds"):
        impl.overlay_checksum(b"", 0, 200, [], [], out)
    with pytest.raises(ValueError, match="pages but"):
        impl.overlay_checksum(b"", 0, 10, [b"x"], [], out)
    assert out == b"\x07" * 100


@pytest.mark.parametrize("threshold", [1, 10**9])
@pytest.mark.parametrize("fraction", [0.01, 0.3])
def test_scratch_and_run_paths_agree(monkeypatch: pytest.MonkeyPatch, threshold: int, fraction: float) -> None:
    """Create and apply give the same delta/result whichever way each chunk is checked."""
    monkeypatch.setattr(passes, "_SCRATCH_PAGES", threshold)
    rng = np.random.default_rng(3)
    size = (20 << 20) + 999  # spans over threads, a short last page
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    npages = -(-size // PAGE_SIZE)
    for p in rng.choice(npages, int(npages * fraction), replace=False):
        new[p * PAGE_SIZE] ^= 1
    new[-1] ^= 1
    for algorithm in ("xxh3_128_tree", "xxh3_128", None):
        delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=algorithm)
        assert delta.checksum == simple_checksum(new)
        if algorithm is not None:
            assert delta.digest == digest(new, algorithm)
        base = bytearray(old.tobytes())
        delta.apply(base)
        assert base == new.tobytes()


@settings(max_examples=40, deadline=None)
@example(seed=0, pages_total=600, tail=0, density=1.0, base_short=0, first=0, within=2048, algorithm="xxh3_128")
@example(seed=1, pages_total=700, tail=5, density=0.05, base_short=0, first=1, within=1, algorithm="xxh3_128")
@given(
    seed=st.integers(0, 2**32 - 1),
    pages_total=st.integers(1, 700),  # up to ~2.7 MiB: several 1 MiB steps
    tail=st.integers(0, PAGE_SIZE - 1),
    density=st.sampled_from([0.0, 0.002, 0.05, 0.5, 1.0]),
    base_short=st.integers(0, 3 * PAGE_SIZE),
    first=st.integers(0, 300),
    within=st.sampled_from([0, 0, 1, 2048, 4095]),
    algorithm=st.sampled_from(["xxh3_128", "blake3"]),
)
def test_hash_span_feeds_the_overlaid_bytes(
    seed: int, pages_total: int, tail: int, density: float, base_short: int, first: int, within: int, algorithm: str
) -> None:
    """``Overlay.hash_span`` feeds the hasher exactly the base with the pages over it (zeros
    past a short base), whether a 1 MiB step goes page by page or through the scratch, and
    from any start (``within`` bytes into a page: the pages are those starting after it)."""
    rng = np.random.default_rng(seed)
    total = pages_total * PAGE_SIZE - (tail if pages_total > 1 else 0)
    base = rng.integers(0, 256, max(0, total - base_short), dtype=np.uint8).tobytes()
    npages = -(-total // PAGE_SIZE)
    lo_page = min(first, npages - 1)
    lo = min(lo_page * PAGE_SIZE + within, total - 1)
    chosen = [int(i) for i in np.flatnonzero(rng.random(npages) < density) if i * PAGE_SIZE >= lo]
    pages = [rng.integers(0, 256, min(PAGE_SIZE, total - i * PAGE_SIZE), dtype=np.uint8).tobytes() for i in chosen]
    expected = bytearray(base) + bytearray(total - len(base))
    for i, page in zip(chosen, pages):
        expected[i * PAGE_SIZE : i * PAGE_SIZE + len(page)] = page
    hasher = Hasher(algorithm)
    passes.Overlay(memoryview(base), total).hash_span(hasher, lo, total, [i * PAGE_SIZE for i in chosen], pages)
    assert hasher.digest() == digest(bytes(expected[lo:]), algorithm)
