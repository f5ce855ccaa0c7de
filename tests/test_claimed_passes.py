"""The whole-state kernels that run their own threads (cython/cm_claims.h, cm_jobs.h).

``scan_leaves_chunks``, ``overlay_leaves_chunks``, ``page_digests64``,
``page_digests128`` and the simple kernels (``checksum``, ``first_difference``,
``dirty_pages``, ``dirty_pages_checksum``) take a list of chunks (or cut their input into
claims) and a thread count, and run every chunk inside one GIL-free call, threads claiming chunks from one
counter. Whatever the cut and the thread count, the result must be the reference's for
each chunk (their sums added, their leaves in order, each chunk's copies in its own
arena), on every SIMD dispatch path. The passes built on them (create, apply's check,
``xxh3_128_tree``, ``PageFingerprints.of``) are checked end to end against the Python
path, with and without progress (which cuts a pass into several calls).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import DeltaSnapshot, PageFingerprints, _kernels, _passes, _reference, _xxh3, digest

from kernel_strategies import each_path, edit_page, leaf_states

PAGE = 4096
MiB = 1 << 20
AGENT = bytes(range(16))


pytestmark = pytest.mark.usefixtures("xxh3_bound")


@st.composite
def chunked_states(draw: st.DrawFn) -> Tuple[np.ndarray, np.ndarray, int, List[Tuple[int, int]], int]:
    """``(old, new, leaf, spans, threads)``: a state of 1-12 leaves (the last partly), a
    copy with bytes and whole pages changed, the span ``[lo, hi)`` cut at drawn leaf
    boundaries into contiguous chunks (some empty), and a thread count."""
    leaf = draw(st.sampled_from([PAGE, 2 * PAGE, 4 * PAGE]))
    old, new, lo, hi = leaf_states(draw, leaf, max_leaves=12)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    for index in draw(st.lists(st.integers(0, (old.size - 1) // PAGE), max_size=8)):
        edit_page(draw, rng, new, index * PAGE, min((index + 1) * PAGE, old.size), ("rewrite", "zero"))
    cuts = draw(st.lists(st.integers(lo // leaf, max(lo // leaf, (hi - 1) // leaf)), max_size=6))
    bounds = sorted([lo, hi] + [c * leaf for c in cuts if lo <= c * leaf <= hi])  # repeats: empty chunks
    spans = list(zip(bounds[:-1], bounds[1:]))
    return old, new, leaf, spans, draw(st.sampled_from([1, 2, 3, 8]))


@settings(max_examples=120, deadline=None)
@given(chunked_states(), st.booleans())
def test_scan_leaves_chunks_is_the_reference_per_chunk(
    case: Tuple[np.ndarray, np.ndarray, int, List[Tuple[int, int]], int], hashing: bool
) -> None:
    old, new, leaf, spans, threads = case
    want = [_reference.scan_leaves_reference(old, new, a, b, leaf, PAGE) for a, b in spans]
    lo, hi = spans[0][0], spans[-1][1]
    for path in each_path():
        arenas = [_kernels.PageArena(PAGE) for _ in spans]
        out = bytearray(16 * -(-(hi - lo) // leaf)) if hashing else None
        total, stale = _kernels.scan_leaves_chunks(old, new, spans, leaf, arenas, out, True, threads=threads)
        assert total == sum(w[2] for w in want) & 0xFFFFFFFF and stale is False, path
        for arena, (indices, copies, _, _) in zip(arenas, want):
            assert arena.indices.tolist() == indices.tolist(), path
            held = bytes(memoryview(arena))
            assert [held[k * PAGE : k * PAGE + len(c)] for k, c in enumerate(copies)] == copies, path
            hints = arena.xzr_hints
            assert hints is not None and len(hints) == len(copies)
        if hashing:
            assert bytes(out) == b"".join(w[3] for w in want), path


@settings(max_examples=80, deadline=None)
@given(chunked_states(), st.booleans())
def test_fingerprinted_scan_chunks_is_the_reference_per_chunk(
    case: Tuple[np.ndarray, np.ndarray, int, List[Tuple[int, int]], int], changes: bool
) -> None:
    old, new, leaf, spans, threads = case
    table = np.zeros(-(-old.size // PAGE), dtype=np.uint64)
    _reference.page_digests64(old, PAGE, table)
    if len(table) > 1:
        table[1] ^= 1  # a page the table gets wrong: old under its copy is "stale"
    want = [_reference.scan_leaves_fp_reference(new, a, b, leaf, PAGE, table, old if changes else None)
            for a, b in spans]
    lo, hi = spans[0][0], spans[-1][1]
    for path in each_path():
        arenas = [_kernels.PageArena(PAGE) for _ in spans]
        out = bytearray(16 * -(-(hi - lo) // leaf))
        read = np.zeros_like(table)
        total, stale = _kernels.scan_leaves_chunks(old, new, spans, leaf, arenas, out, False, table, read, changes,
                                                   threads)
        if changes:
            assert total == sum(w[2][0] for w in want) & 0xFFFFFFFF, path
            assert stale == any(w[2][1] for w in want), path
        else:
            assert total == sum(w[2] for w in want) & 0xFFFFFFFF and stale is False, path
        for arena, w in zip(arenas, want):
            assert arena.indices.tolist() == w[0].tolist(), path
        assert bytes(out) == b"".join(w[3] for w in want), path
        for w in want:
            for k, h in w[4].items():
                assert int(read[k]) == h, (path, k)


@settings(max_examples=80, deadline=None)
@given(chunked_states())
def test_overlay_leaves_chunks_is_the_reference_per_chunk(
    case: Tuple[np.ndarray, np.ndarray, int, List[Tuple[int, int]], int]
) -> None:
    old, new, leaf, spans, threads = case
    lo, hi = spans[0][0], spans[-1][1]
    indices = _reference.dirty_pages(old[lo:hi], new[lo:hi], PAGE) + lo // PAGE
    starts = [int(i) * PAGE for i in indices]
    pages = [new[s : min(s + PAGE, hi)].tobytes() for s in starts]
    want_out = bytearray(16 * -(-(hi - lo) // leaf))
    want_changed = np.zeros(len(pages), dtype=np.uint64)
    want = _reference.overlay_leaves(old, lo, hi, pages, starts, leaf, want_out, want_changed)
    for path in each_path():
        out = bytearray(len(want_out))
        changed = np.zeros(len(pages), dtype=np.uint64)
        got = _kernels.overlay_leaves_chunks(old, spans, pages, starts, leaf, out, changed, threads)
        assert got == want and bytes(out) == bytes(want_out), path
        # The kernel may set more bits than the lines that differ, never fewer.
        assert np.all((changed & want_changed) == want_changed), path


def test_chunked_kernels_refuse_bad_chunks_before_any_work() -> None:
    a = np.zeros(8 * PAGE, dtype=np.uint8)
    two = [_kernels.PageArena(PAGE), _kernels.PageArena(PAGE)]
    for spans in ([(PAGE, 2 * PAGE), (2 * PAGE, 4 * PAGE)],  # not on a 2-page leaf
                  [(0, 4 * PAGE), (2 * PAGE, 6 * PAGE)],  # overlapping
                  [(0, 4 * PAGE), (4 * PAGE, 9 * PAGE)],  # past the end
                  [(4 * PAGE, 2 * PAGE), (4 * PAGE, 6 * PAGE)],  # backwards
                  [(0, 1, 2)]):  # not pairs
        with pytest.raises(ValueError):
            _kernels.scan_leaves_chunks(a, a, spans, 2 * PAGE, two)
        with pytest.raises(ValueError):
            _kernels.overlay_leaves_chunks(a, spans, [], [], 2 * PAGE)
    ok = [(0, 4 * PAGE), (4 * PAGE, 8 * PAGE)]
    with pytest.raises(ValueError, match="2 arenas for 1 chunks"):
        _kernels.scan_leaves_chunks(a, a, ok[:1], 2 * PAGE, two)
    with pytest.raises(ValueError, match="pages of"):
        _kernels.scan_leaves_chunks(a, a, ok, 2 * PAGE, [_kernels.PageArena(PAGE), _kernels.PageArena(2 * PAGE)])
    with pytest.raises(TypeError):
        _kernels.scan_leaves_chunks(a, a, ok, 2 * PAGE, [_kernels.PageArena(PAGE), object()])
    with pytest.raises(ValueError, match="threads"):
        _kernels.scan_leaves_chunks(a, a, ok, 2 * PAGE, two, threads=0)
    with pytest.raises(ValueError, match="arena of its own"):  # two threads would fill one arena at once
        _kernels.scan_leaves_chunks(a, a, ok, 2 * PAGE, [two[0], two[0]], threads=2)
    for bad in ([(0.0, 4096.5)], [(-4096, 4096)], [("0", "4096")]):
        with pytest.raises(ValueError, match="pairs of byte offsets"):
            _kernels.scan_leaves_chunks(a, a, bad, PAGE, two[:1])
        with pytest.raises(ValueError, match="pairs of byte offsets"):
            _kernels.overlay_leaves_chunks(a, bad, [], [], PAGE)
    with pytest.raises(ValueError, match="outside the chunks"):  # a page between chunks
        _kernels.overlay_leaves_chunks(a, [(0, 2 * PAGE), (4 * PAGE, 8 * PAGE)], [bytes(PAGE)], [2 * PAGE], PAGE)
    with pytest.raises(ValueError, match="outside the chunks"):  # a page across two chunks' border
        _kernels.overlay_leaves_chunks(a, ok, [bytes(2 * PAGE)], [3 * PAGE], 4 * PAGE)
    view = memoryview(two[0])
    with pytest.raises(BufferError):
        _kernels.scan_leaves_chunks(a, a, ok, 2 * PAGE, two)
    view.release()
    for fn in (_kernels.page_digests64, _kernels.page_digests128):
        with pytest.raises(ValueError, match="threads"):
            fn(a, PAGE, np.zeros(8, dtype=np.uint64) if fn is _kernels.page_digests64 else bytearray(128), threads=-1)


@st.composite
def claimed_pairs(draw: st.DrawFn) -> Tuple[np.ndarray, np.ndarray, int, int, int]:
    """``(old, new, page, claim, threads)``: a state up to 40 pages, a copy with some
    bytes changed, a page size, the bytes a kernel thread claims at a time (small, so
    there are many claims) and a thread count."""
    size = draw(st.integers(0, 40 * PAGE))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    for at in draw(st.lists(st.integers(0, max(size - 1, 0)), max_size=8)) if size else []:
        new[at] ^= draw(st.integers(1, 255))
    page = draw(st.sampled_from([1, 100, PAGE, 3 * PAGE]))
    return old, new, page, draw(st.sampled_from([1, 999, PAGE, 5 * PAGE + 7])), draw(st.sampled_from([2, 3, 8]))


@settings(max_examples=150, deadline=None)
@given(claimed_pairs(), st.integers(0, 2**64 - 1))
def test_simple_kernels_on_threads_are_the_reference(case: Tuple[np.ndarray, np.ndarray, int, int, int],
                                                     offset: int) -> None:
    old, new, page, claim, threads = case
    before = _kernels._set_claim_bytes(claim)
    try:
        for path in each_path():
            assert _kernels.checksum(new, offset, threads) == _reference.checksum(new, offset), path
            assert _kernels.first_difference(old, new, threads) == _reference.first_difference(old, new), path
            assert _kernels.first_difference(old, old, threads) is None
            want = _reference.dirty_pages(old, new, page).tolist()
            assert _kernels.dirty_pages(old, new, page, threads).tolist() == want, path
            pages, total = _kernels.dirty_pages_checksum(old, new, page, offset, threads)
            assert pages.tolist() == want and total == _reference.checksum(new, offset), path
            table = np.zeros(-(-new.size // PAGE), dtype=np.uint64)
            want_table = np.zeros_like(table)
            assert _kernels.page_digests64(new, PAGE, table, offset, threads) == _reference.page_digests64(
                new, PAGE, want_table, offset), path
            assert np.array_equal(table, want_table), path
    finally:
        _kernels._set_claim_bytes(before)
    with pytest.raises(ValueError, match="threads"):
        _kernels.dirty_pages(old, new, page, 0)


@pytest.mark.parametrize("size", [0, 1, PAGE + 3, 20 * MiB + 12345])
def test_page_digests_on_threads_equal_one_thread_and_the_reference(size: int) -> None:
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    npages = -(-size // PAGE)
    one = np.zeros(npages, dtype=np.uint64)
    sum_one = _kernels.page_digests64(data, PAGE, one, 77)
    digests_one = bytearray(16 * npages)
    _kernels.page_digests128(data, PAGE, digests_one)
    leaves_one = bytearray(16 * -(-size // MiB))
    _kernels.page_digests128(data, MiB, leaves_one)
    for threads in (2, 3, 64, 1000):
        many = np.zeros(npages, dtype=np.uint64)
        assert _kernels.page_digests64(data, PAGE, many, 77, threads) == sum_one
        assert np.array_equal(many, one)
        digests = bytearray(16 * npages)
        _kernels.page_digests128(data, PAGE, digests, threads)
        assert digests == digests_one
        leaves = bytearray(len(leaves_one))
        _kernels.page_digests128(data, MiB, leaves, threads)
        assert leaves == leaves_one
    # The reference, on a sample of pages (every page in Python would be slow at 20 MiB).
    for k in sorted({0, npages // 2, npages - 1}) if npages else []:
        page = data[k * PAGE : (k + 1) * PAGE].tobytes()
        assert int(one[k]) == xxhash.xxh3_64_intdigest(page)
        assert bytes(digests_one[16 * k : 16 * k + 16]) == xxhash.xxh3_128_digest(page)
    if size:
        assert sum_one == _reference.checksum(data, 77)
        assert bytes(leaves_one[-16:]) == xxhash.xxh3_128_digest(data[(size - 1) // MiB * MiB :].tobytes())


def _states(size: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    pages = rng.choice(-(-size // PAGE), size // PAGE // 20, replace=False)
    for k in pages:
        new[k * PAGE + int(rng.integers(0, min(PAGE, size - k * PAGE)))] ^= 0xA5
    new[-1] ^= 1  # the short last page
    return old, new


@pytest.mark.parametrize("group", [None, 16 << 20, 32 << 20])
def test_passes_on_the_kernel_threads_equal_the_python_path(monkeypatch: pytest.MonkeyPatch, group: Any) -> None:
    """Create and apply of a 40 MiB state (three 16 MiB chunks) by the claimed kernels,
    in one call or (with progress) in groups of chunks, give the Python path's delta,
    bytes, progress and result."""
    old, new = _states(40 * MiB + 1000, 5)
    if group is not None:
        monkeypatch.setattr(_passes, "_REPORT_GROUP", group)
    made: List[Tuple[int, int]] = []
    applied: List[Tuple[int, int]] = []
    watch = group is not None
    fused = DeltaSnapshot.create(AGENT, old, new, 0, 1, progress=(lambda d, t: made.append((d, t))) if watch else None)
    table = PageFingerprints.of(old)
    fingerprinted = DeltaSnapshot.create(AGENT, old, new, 0, 1, fingerprints=table)
    assert table == PageFingerprints.of(new)  # advanced to the delta's state
    target = old.copy()
    fused.apply(target, progress=(lambda d, t: applied.append((d, t))) if watch else None)
    assert np.array_equal(target, new)
    for seen in (made, applied) if watch else ():
        dones = [d for d, _ in seen]
        assert len(dones) >= 2 and dones == sorted(dones) and seen[-1] == (new.nbytes, new.nbytes), seen
        assert all(t == new.nbytes for _, t in seen)
    _xxh3.unbind()
    try:
        python = DeltaSnapshot.create(AGENT, old, new, 0, 1)
        assert digest(new) == python.digest
    finally:
        _xxh3.bind()
    for other in (python, fingerprinted):
        other.timestamp = fused.timestamp
        other._seal(None)
        assert other.serialize() == fused.serialize()


@settings(max_examples=80, deadline=None)
@given(
    size=st.integers(1, 40 * PAGE + 100),
    picks=st.lists(st.integers(0, 10**6), max_size=60),
    threads=st.sampled_from([1, 2, 3, 64]),
    claim=st.sampled_from([PAGE, 3 * PAGE, 8 * MiB]),
)
def test_gather_digests128_equals_the_reference_and_copy_then_hash(
    size: int, picks: List[int], threads: int, claim: int
) -> None:
    """A live chunk's pages copied and hashed in one pass: the copies back to back and the
    XXH3-128 of each, whatever the thread count and the claims (a page each, three, or one
    claim for all), the state's short last page included."""
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    npages = -(-size // PAGE)
    idx = np.array(sorted({p % npages for p in picks}), dtype=np.int64)
    total = sum(min(PAGE, size - int(k) * PAGE) for k in idx)
    want_pages, want_digests = bytearray(total), bytearray(16 * len(idx))
    _reference.gather_digests128(data, idx, PAGE, want_pages, want_digests)
    assert bytes(want_pages) == b"".join(data[int(k) * PAGE : (int(k) + 1) * PAGE].tobytes() for k in idx)
    assert bytes(want_digests) == b"".join(xxhash.xxh3_128_digest(want_pages[i * PAGE : (i + 1) * PAGE]) for i in range(len(idx)))
    before = _kernels._set_claim_bytes(claim)
    try:
        for _ in each_path():
            pages, digests = np.full(total + 7, 0xAA, np.uint8), np.zeros((len(idx), 16), np.uint8)
            _kernels.gather_digests128(data, idx, PAGE, pages, digests, threads)
            assert pages[:total].tobytes() == bytes(want_pages) and pages[total:].tolist() == [0xAA] * 7
            assert digests.tobytes() == bytes(want_digests)
    finally:
        _kernels._set_claim_bytes(before)


def test_gather_digests128_refuses_bad_input() -> None:
    data = np.zeros(3 * PAGE + 10, np.uint8)  # 4 pages, the last 10 bytes long
    out, dst = np.zeros((4, 16), np.uint8), np.zeros(4 * PAGE, np.uint8)
    for fn in (_kernels.gather_digests128, _reference.gather_digests128):
        for bad in ([4], [-1], [3, 0]):  # out of range, negative, the short page not last
            with pytest.raises(ValueError):
                fn(data, np.array(bad, np.int64), PAGE, dst, out)
        with pytest.raises(ValueError):  # dst too small for two pages
            fn(data, np.array([0, 1], np.int64), PAGE, dst[: PAGE + 1], out)
        with pytest.raises(ValueError):  # out too small
            fn(data, np.array([0, 1], np.int64), PAGE, dst, out[:1])
        with pytest.raises(ValueError):
            fn(data, np.array([0], np.int64), 0, dst, out)
        with pytest.raises(ValueError):
            fn(data, np.array([0], np.int64), PAGE, dst, out, 0)
        fn(data, np.array([], np.int64), PAGE, dst, out)  # nothing to do
    with pytest.raises((TypeError, BufferError)):  # read-only output
        _kernels.gather_digests128(data, np.array([0], np.int64), PAGE, bytes(PAGE), out)
    whole = np.zeros(6 * PAGE, np.uint8)
    for dst_, out_ in ((whole[PAGE:], out), (dst, whole[:64]), (whole[: 2 * PAGE], whole[PAGE : PAGE + 32])):
        with pytest.raises(ValueError, match="overlap"):  # copies into the state, or into each other
            _kernels.gather_digests128(whole, np.array([0, 1], np.int64), PAGE, dst_, out_)


def test_gather_and_page_digests_with_a_claim_far_over_the_input() -> None:
    """A claim of 2**63 bytes (pages a chunk near SIZE_MAX) must not wrap the chunk count."""
    data = np.random.default_rng(9).integers(0, 256, 5 * PAGE + 3, dtype=np.uint8)
    idx = np.arange(6, dtype=np.int64)
    want_pages, want_digests = bytearray(data.nbytes), bytearray(16 * 6)
    _reference.gather_digests128(data, idx, PAGE, want_pages, want_digests)
    before = _kernels._set_claim_bytes(2**63)
    try:
        single, single_digests = bytearray(6), bytearray(16 * 6)
        _kernels.gather_digests128(data, idx, 1, single, single_digests, 2)  # page 1: per ~ 2**63
        assert single == data[:6].tobytes()
        assert single_digests == b"".join(xxhash.xxh3_128_digest(bytes([b])) for b in data[:6])
        pages, digests = bytearray(data.nbytes), bytearray(16 * 6)
        _kernels.gather_digests128(data, idx, PAGE, pages, digests, 2)
        assert pages == want_pages and digests == want_digests
        leaves = bytearray(16 * data.nbytes)
        _kernels.page_digests128(data, 1, leaves, 2)
        assert bytes(leaves[-16:]) == xxhash.xxh3_128_digest(data[-1:].tobytes())
    finally:
        _kernels._set_claim_bytes(before)


def test_live_chunks_copied_and_hashed_in_one_pass_equal_the_python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """scan_chunks' chunks (pages, digests, chunk digest) are the same whether the pages are
    gathered and hashed by the compiled kernel or copied and hashed in Python."""
    from cellmigrate.live import leaves
    from cellmigrate.live.pages import scan_chunks

    state = np.random.default_rng(5).integers(0, 256, 3 * MiB + 1000, dtype=np.uint8)
    shadow = state.copy()
    rng = np.random.default_rng(6)
    for k in rng.choice(-(-state.nbytes // PAGE), 200, replace=False):
        shadow[int(k) * PAGE] ^= 1

    def chunks() -> List[Tuple[Any, ...]]:
        return [
            (c.indices.tolist(), bytes(c.payload), bytes(c.digest), np.asarray(c.digests).tobytes())
            for c in scan_chunks(state, shadow, round_no=1, first_seq=1, chunk_bytes=64 * PAGE, compress=False)
        ]

    fused = chunks()
    monkeypatch.setattr(leaves, "page_kernel", lambda: None)
    assert chunks() == fused and sum(len(c[0]) for c in fused) == 200
