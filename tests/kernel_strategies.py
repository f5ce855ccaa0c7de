"""Hypothesis strategies for kernel inputs (shared by the kernel test modules), and
:func:`each_path` to run a check on every SIMD path the compiled kernels dispatch to.

Byte streams up to ~20 KiB: arbitrary bytes, streams of runs (rich in 0xFF and in runs
near the 127-byte marker limit), lengths around page boundaries, and buffers sliced at
every start alignment 0-63 out of a larger buffer.
"""

from __future__ import annotations

import random
from typing import Any, Iterator, List, Tuple

import numpy as np
from hypothesis import strategies as st

from cellmigrate import _kernels

MAX_LEN = 20 * 1024
RUN_LENGTHS = (1, 2, 3, 4, 5, 126, 127, 128, 129, 130, 131, 254, 255, 256, 381)
PAGE_EDGES = (0, 1, 63, 64, 65, 127, 128, 4095, 4096, 4097, 8191, 8192, 8193, 12288, 16385)
#: The compiled kernels' dispatch paths on this CPU, "scalar" first.
PATHS: List[str] = _kernels._dispatch_paths()


def each_path() -> Iterator[str]:
    """Switch the compiled kernels to each of :data:`PATHS` in turn (yielding its name);
    the path chosen before is restored after, also when the caller fails or stops early."""
    before = _kernels._dispatch()
    try:
        for name in PATHS:
            _kernels._set_dispatch(name)
            yield name
    finally:
        _kernels._set_dispatch(before)


def _runs(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        byte = rng.choice((0, 0xFF, 0xFF, 1, 0x7F, 0xFE, rng.randrange(256)))
        length = rng.choice(RUN_LENGTHS) if rng.random() < 0.7 else rng.randrange(1, 600)
        out += bytes((byte,)) * length
    return bytes(out[:n])


def _styled(style: str, n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if style == "random":
        return rng.randbytes(n)
    if style == "zeros":
        return bytes(n)
    if style == "ff":
        return bytes(rng.choice((0xFF, 0xFF, 0xFF, 0, 1)) for _ in range(n))
    if style == "runs":
        return _runs(rng, n)
    # "sparse": mostly zero with a few random bytes, like a lightly used memory page
    data = bytearray(n)
    for _ in range(rng.randrange(0, 8)):
        if n:
            data[rng.randrange(n)] = rng.randrange(256)
    return bytes(data)


STYLES = ("random", "zeros", "ff", "runs", "sparse")

lengths = st.one_of(
    st.integers(0, MAX_LEN),
    st.sampled_from(PAGE_EDGES),
    st.sampled_from(PAGE_EDGES).flatmap(lambda e: st.integers(max(0, e - 3), e + 3)),
)

#: Byte strings of every style and length up to ~20 KiB (cheap to generate).
payloads = st.one_of(
    st.binary(max_size=512),
    st.builds(_styled, st.sampled_from(STYLES), lengths, st.integers(0, 2**32)),
)

#: Offsets for the positioned checksum, with many near the 2**32 weight wrap.
offsets = st.one_of(
    st.just(0),
    st.integers(0, 2**40),
    st.integers(2**32 - MAX_LEN, 2**32 + 16),
    st.integers(2**64 - MAX_LEN - 1, 2**64 - 1),
)


@st.composite
def aligned(draw: st.DrawFn, data: st.SearchStrategy[bytes] = payloads) -> Tuple[memoryview, bytes]:
    """``(view, raw)``: ``raw`` sliced at a start alignment 0-63 out of a larger buffer."""
    raw = draw(data)
    start = draw(st.integers(0, 63))
    backing = bytearray(random.Random(len(raw) + start).randbytes(start)) + raw + b"\xa5" * 64
    return memoryview(bytes(backing))[start : start + len(raw)], raw


@st.composite
def old_new(draw: st.DrawFn) -> Tuple[bytes, bytes, int]:
    """``(old, new, page_size)``: ``new`` is ``old`` with a few edits (or none)."""
    old = draw(payloads)
    new = bytearray(old)
    for _ in range(draw(st.integers(0, 6))):
        if new:
            i = draw(st.integers(0, len(new) - 1))
            new[i] ^= draw(st.integers(1, 255))
    page_size = draw(st.sampled_from((1, 7, 16, 32, 48, 64, 100, 128, 4096, 4096, 4096, 8192)))
    return old, bytes(new), page_size


def leaf_states(draw: st.DrawFn, leaf: int, page: int = 4096,
                max_leaves: int = 4) -> Tuple["np.ndarray[Any, Any]", "np.ndarray[Any, Any]", int, int]:
    """``(old, new, lo, hi)``: a state of 1 to ``max_leaves`` leaves of ``leaf`` bytes (the
    last one partly), random or zero, a copy with up to 12 single bytes changed, and a span
    ``[lo, hi)`` starting on a leaf (the fused leaf passes' input)."""
    nleaves = draw(st.integers(1, max_leaves))
    size = draw(st.integers((nleaves - 1) * leaf + 1, nleaves * leaf))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, size, dtype=np.uint8) if draw(st.booleans()) else np.zeros(size, dtype=np.uint8)
    new = old.copy()
    npages = -(-size // page)
    for index in draw(st.lists(st.integers(0, npages - 1), max_size=12)):
        at = index * page + draw(st.integers(0, page - 1))
        if at < size:
            new[at] ^= draw(st.integers(1, 255))
    lo = draw(st.integers(0, nleaves - 1)) * leaf
    hi = draw(st.integers(lo, size))
    return old, new, lo, hi


def edit_page(draw: st.DrawFn, rng: "np.random.Generator", new: "np.ndarray[Any, Any]", at: int, end: int,
              kinds: Tuple[str, ...] = ("edit", "rewrite", "zero", "half")) -> None:
    """Change ``new[at:end]`` (one page) as drawn from ``kinds``: one byte ("edit"), every
    byte ("rewrite"), all zero ("zero"), its first half and a byte ("half"), or not ("none")."""
    kind = draw(st.sampled_from(kinds))
    if kind == "edit":
        new[at + draw(st.integers(0, end - at - 1))] ^= draw(st.integers(1, 255))
    elif kind == "rewrite":
        new[at:end] = rng.integers(0, 256, end - at, dtype=np.uint8)
    elif kind == "zero":
        new[at:end] = 0
    elif kind == "half":
        new[at : (at + end) // 2 + 1] ^= 0x5A
