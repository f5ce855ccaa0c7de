"""The fused leaf kernels (cython/cm_leaves.h) against the reference, and the delta passes
with and without them.

``overlay_leaves`` and ``scan_leaves`` compare, copy, checksum and hash (XXH3-128 per
leaf, from the xxhash package's own exported functions) in one GIL-free call; the
reference computes the same from first principles. Every SIMD dispatch path is checked,
and whole deltas made and applied by the fused path equal those of the Python path
(``cellmigrate._xxh3.unbind()``), byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import List, Tuple

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import DeltaSnapshot, _kernels, _reference, _xxh3, digest
from cellmigrate._tree import LEAF_SIZE

from kernel_strategies import each_path, edit_page, leaf_states

PAGE = 4096
PATHS = _kernels._dispatch_paths()


pytestmark = pytest.mark.usefixtures("xxh3_bound")


@st.composite
def scan_cases(draw: st.DrawFn) -> Tuple[np.ndarray, np.ndarray, int, int, int]:
    leaf = draw(st.sampled_from([PAGE, 2 * PAGE, 4 * PAGE, 16 * PAGE]))
    old, new, lo, hi = leaf_states(draw, leaf)
    return old, new, lo, hi, leaf


@settings(max_examples=150, deadline=None)
@given(scan_cases())
def test_scan_leaves_matches_reference_on_every_path(case: Tuple[np.ndarray, np.ndarray, int, int, int]) -> None:
    old, new, lo, hi, leaf = case
    indices, copies, checksum, leaves = _reference.scan_leaves_reference(old, new, lo, hi, leaf, PAGE)
    before = _kernels._dispatch()
    try:
        for path in PATHS:
            _kernels._set_dispatch(path)
            for hashing in (True, False):
                arena = _kernels.PageArena(PAGE)
                out = bytearray(16 * -(-(hi - lo) // leaf)) if hashing else None
                got = _kernels.scan_leaves(old, new, lo, hi, leaf, arena, out)
                assert got == checksum, path
                assert arena.indices.tolist() == indices.tolist(), path
                held = bytes(memoryview(arena))
                for k, page in enumerate(copies):
                    assert held[k * PAGE : k * PAGE + len(page)] == page, (path, k)
                if hashing:
                    assert bytes(out) == leaves, path
    finally:
        _kernels._set_dispatch(before)


@st.composite
def overlay_cases(draw: st.DrawFn) -> Tuple[np.ndarray, int, int, List[bytes], List[int], int]:
    leaf = draw(st.sampled_from([PAGE, 2 * PAGE, 8 * PAGE]))
    old, _, lo, hi = leaf_states(draw, leaf)
    first, last = -(-lo // PAGE), hi // PAGE  # whole pages inside [lo, hi)
    chosen = sorted(set(draw(st.lists(st.integers(first, max(first, last - 1)), max_size=10)))) if last > first else []
    rng = np.random.default_rng(draw(st.integers(0, 1000)))
    pages = [rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes() for _ in chosen]
    starts = [i * PAGE for i in chosen]
    if hi % PAGE and hi > lo and hi - hi % PAGE >= lo and (hi // PAGE) not in chosen and draw(st.booleans()):
        pages.append(bytes(hi % PAGE))  # the short last page of a state
        starts.append(hi - hi % PAGE)
    return old, lo, hi, pages, starts, leaf


@settings(max_examples=150, deadline=None)
@given(overlay_cases())
def test_overlay_leaves_matches_reference_on_every_path(case: Tuple[np.ndarray, int, int, List[bytes], List[int], int]) -> None:
    base, lo, hi, pages, starts, leaf = case
    want = bytearray(16 * -(-(hi - lo) // leaf))
    checksum = _reference.overlay_leaves(base, lo, hi, pages, starts, leaf, want)
    before = _kernels._dispatch()
    try:
        for path in PATHS:
            _kernels._set_dispatch(path)
            out = bytearray(len(want))
            masks = np.zeros(len(pages), dtype=np.uint64)
            assert _kernels.overlay_leaves(base, lo, hi, pages, starts, leaf, out, masks) == checksum, path
            assert out == want, path
            exact = np.zeros(len(pages), dtype=np.uint64)
            _reference.overlay_leaves(base, lo, hi, pages, starts, leaf, None, exact)
            assert np.array_equal(masks & exact, exact), path
            assert _kernels.overlay_leaves(base, lo, hi, pages, starts, leaf) == checksum, path
    finally:
        _kernels._set_dispatch(before)


@settings(max_examples=80, deadline=None)
@given(st.data())
def test_scan_xzr_hints_match_the_reference_and_leave_the_encoding_as_it_was(data: st.DataObject) -> None:
    """The create pass's XZR hints (taken while a copy and its old page are in cache) are
    the reference's on every dispatch path, and encoding with them gives the same batch
    as encoding without: they only spare the encoder re-reading old pages that XZR does
    not shrink."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    size = data.draw(st.integers(1, 40 * PAGE))
    old = rng.integers(0, 256, size, dtype=np.uint8) if data.draw(st.booleans()) else np.zeros(size, dtype=np.uint8)
    new = old.copy()
    for page in data.draw(st.lists(st.integers(0, (size - 1) // PAGE), max_size=20)):
        edit_page(data.draw, rng, new, page * PAGE, min(size, (page + 1) * PAGE))
    leaf = 4 * PAGE
    hi = size
    allowed = sum(1 << e for e in (_kernels.ENC_RAW, _kernels.ENC_RLE, _kernels.ENC_ZERO, _kernels.ENC_XZR))
    before = _kernels._dispatch()
    try:
        for path in PATHS:
            _kernels._set_dispatch(path)
            arena, plain = _kernels.PageArena(PAGE), _kernels.PageArena(PAGE)
            _kernels.scan_leaves(old, new, 0, hi, leaf, arena, None, True)
            _kernels.scan_leaves(old, new, 0, hi, leaf, plain)
            assert plain.xzr_hints is None
            hints, idx = arena.xzr_hints, arena.indices
            copies = [bytes(new[i * PAGE : (i + 1) * PAGE]) for i in idx.tolist()]
            want = [_reference.xzr_hint(c, old[i * PAGE : i * PAGE + len(c)]) for i, c in zip(idx.tolist(), copies)]
            assert hints.tolist() == want, path
            with_hints = _kernels.encode_page_list(old, copies, idx, PAGE, allowed, hints)
            without = _kernels.encode_page_list(old, copies, idx, PAGE, allowed)
            ref = _reference.encode_page_list(old, copies, idx, PAGE, allowed, hints)
            for got in (without, ref):  # encodings, offsets, checks, payload
                assert [a.tolist() for a in got[:3]] == [a.tolist() for a in with_hints[:3]], path
                assert bytes(got[3]) == bytes(with_hints[3]), path
    finally:
        _kernels._set_dispatch(before)


def test_line_masks_name_exactly_the_changed_lines_of_sparse_pages() -> None:
    # A leaf with a few pages (sparse blocks): each mask is exactly its page's changed
    # lines (none, one, the last, all); a block crowded with pages is not compared: every bit.
    rng = np.random.default_rng(21)
    base = rng.integers(0, 256, LEAF_SIZE, dtype=np.uint8)
    rows = base.reshape(-1, PAGE)

    def edited(row: int, lines: List[int]) -> bytes:
        page = rows[row].copy()
        for j in lines:
            page[64 * j + 7] ^= 0xFF
        return page.tobytes()

    edits = {3: [], 10: [0], 70: [63], 130: list(range(64)), 200: [5, 6, 40]}
    pages = [edited(r, lines) for r, lines in edits.items()]
    starts = [r * PAGE for r in edits]
    masks = np.zeros(len(pages), dtype=np.uint64)
    _kernels.overlay_leaves(base, 0, LEAF_SIZE, pages, starts, LEAF_SIZE, bytearray(16), masks)
    assert masks.tolist() == [sum(1 << j for j in lines) for lines in edits.values()]
    crowded = list(range(64, 128))  # the second 256 KiB block, every page of it
    dense = [edited(r, [1]) for r in crowded]
    masks = np.zeros(len(dense), dtype=np.uint64)
    _kernels.overlay_leaves(base, 0, LEAF_SIZE, dense, [r * PAGE for r in crowded], LEAF_SIZE, None, masks)
    assert set(masks.tolist()) == {_reference.LINES_ALL}


@pytest.mark.parametrize("fraction", [0.02, 0.3, 1.0])
def test_create_with_and_without_xzr_hints_makes_the_same_batch(fraction: float) -> None:
    # The hints of every chunk's arena, joined in order, line up with the pages.
    from cellmigrate._pages import ALLOW_ALL, encode_batch
    from cellmigrate._passes import scan

    rng = np.random.default_rng(int(fraction * 100))
    old = rng.integers(0, 256, 40 << 20, dtype=np.uint8)  # several 16 MiB chunks
    new = old.copy()
    rows = new.reshape(-1, PAGE)
    chosen = rng.choice(len(rows), int(len(rows) * fraction), replace=False)
    rows[chosen[::2], 100:164] ^= 0x5A  # half shrink with XZR, half are rewritten
    rows[chosen[1::2]] = rng.integers(0, 256, (len(chosen[1::2]), PAGE), dtype=np.uint8)
    hinted = scan(memoryview(old), memoryview(new), None, None, xzr_hints=True)
    plain = scan(memoryview(old), memoryview(new), None, None)
    assert plain.xzr_hints is None and hinted.xzr_hints is not None
    assert len(hinted.xzr_hints) == len(hinted.indices) == len(chosen)
    a = encode_batch(old, hinted.pages, hinted.indices, ALLOW_ALL, hinted.xzr_hints)
    b = encode_batch(old, plain.pages, plain.indices, ALLOW_ALL)
    assert a.encodings.tolist() == b.encodings.tolist() and a.offsets.tolist() == b.offsets.tolist()
    assert bytes(a.payload) == bytes(b.payload)
    assert (hinted.xzr_hints == _kernels.XZR_HINT_NO_WIN).sum() == len(chosen[1::2])


def test_a_no_win_hint_keeps_xzr_untried() -> None:
    # A page XZR would shrink to a few bytes, hinted NO_WIN, is stored raw by both the
    # kernel and the reference; a hint count that does not match the pages is refused.
    old = bytes(PAGE)
    page = b"\x01" + bytes(PAGE - 1)
    allowed = 1 << _kernels.ENC_XZR
    for impl in (_kernels, _reference):
        enc, _, _, payload = impl.encode_page_list(old, [page], [0], PAGE, allowed, np.array([impl.XZR_HINT_NO_WIN], dtype=np.uint16))
        assert list(enc) == [_kernels.ENC_RAW] and bytes(payload) == page
        enc, _, _, payload = impl.encode_page_list(old, [page], [0], PAGE, allowed, np.array([impl.XZR_HINT_UNKNOWN], dtype=np.uint16))
        assert list(enc) == [_kernels.ENC_XZR] and len(payload) < 8
        with pytest.raises(ValueError):
            impl.encode_page_list(old, [page], [0], PAGE, allowed, np.zeros(2, dtype=np.uint16))


BLOCK = 256 * 1024  # CM_LEAF_BLOCK: the kernel's unit inside a leaf (cython/cm_leaves.h)


@st.composite
def block_cases(draw: st.DrawFn) -> Tuple[np.ndarray, int, int, List[bytes], List[int]]:
    """Real 1 MiB leaves (each four kernel blocks), with pages of any size near block
    edges, straddling them, and blocks crowded enough to take the kernel's dense path."""
    size = draw(st.integers(1, 3 * LEAF_SIZE))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    base = rng.integers(0, 256, size, dtype=np.uint8)
    lo = draw(st.integers(0, (size - 1) // LEAF_SIZE)) * LEAF_SIZE
    hi = draw(st.integers(lo, size))
    wanted = []
    for _ in range(draw(st.integers(0, 12))):
        edge = draw(st.integers(lo // BLOCK, hi // BLOCK + 1)) * BLOCK
        at = edge + draw(st.integers(-2 * PAGE, 2 * PAGE)) if draw(st.booleans()) else draw(st.integers(lo, max(lo, hi - 1)))
        wanted.append((at, draw(st.sampled_from([1, 100, PAGE, 3 * PAGE, 16 * PAGE]))))
    if draw(st.booleans()):  # a crowded block: consecutive pages over most of it
        first = draw(st.integers(lo // BLOCK, max(lo // BLOCK, hi // BLOCK))) * BLOCK
        wanted += [(first + k * PAGE, PAGE) for k in range(draw(st.integers(1, BLOCK // PAGE)))]
    pages, starts, pos = [], [], lo
    for at, n in sorted(wanted):
        n = min(n, hi - at, LEAF_SIZE - at % LEAF_SIZE) if at < hi else 0
        if at < pos or n <= 0:
            continue
        pages.append(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
        starts.append(at)
        pos = at + n
    return base, lo, hi, pages, starts


@settings(max_examples=60, deadline=None)
@given(block_cases())
def test_overlay_leaves_blocks_match_reference(case: Tuple[np.ndarray, int, int, List[bytes], List[int]]) -> None:
    # The kernel reads a block with few pages in order and swaps the pages' checksums in,
    # and one with many piece by piece: both must give the reference's leaves and sum.
    # Its line masks name at least every line that differs (more where it did not
    # compare), so a scatter by them writes the same result.
    base, lo, hi, pages, starts = case
    want = bytearray(16 * -(-(hi - lo) // LEAF_SIZE))
    exact = np.zeros(len(pages), dtype=np.uint64)
    checksum = _reference.overlay_leaves(base, lo, hi, pages, starts, LEAF_SIZE, want, exact)
    out = bytearray(len(want))
    masks = np.full(len(pages), 12345, dtype=np.uint64)
    assert _kernels.overlay_leaves(base, lo, hi, pages, starts, LEAF_SIZE, out, masks) == checksum
    assert out == want
    assert np.array_equal(masks & exact, exact)
    assert _kernels.overlay_leaves(base, lo, hi, pages, starts, LEAF_SIZE) == checksum
    whole = [k for k, (s, p) in enumerate(zip(starts, pages)) if s % PAGE == 0 and len(p) <= PAGE]
    full, by_lines = bytearray(base.tobytes()), bytearray(base.tobytes())
    indices = np.array([starts[k] // PAGE for k in whole], dtype=np.int64)
    _kernels.scatter_pages(full, indices, [pages[k] for k in whole], PAGE)
    _kernels.scatter_pages(by_lines, indices, [pages[k] for k in whole], PAGE, masks[whole])
    assert by_lines == full


@pytest.mark.parametrize("impl", [_kernels, _reference], ids=["compiled", "reference"])
def test_overlay_leaves_refuses_bad_layouts(impl: object) -> None:
    base = bytes(4 * PAGE)
    page = bytes(PAGE)
    fn = getattr(impl, "overlay_leaves")
    with pytest.raises(ValueError):
        fn(base, PAGE, 4 * PAGE, [], [], 2 * PAGE)  # lo not on a leaf
    with pytest.raises(ValueError):
        fn(base, 0, 5 * PAGE, [], [], PAGE)  # past the base
    with pytest.raises(ValueError):
        fn(base, 0, 4 * PAGE, [page, page], [PAGE, PAGE], 4 * PAGE)  # overlapping
    with pytest.raises(ValueError):
        fn(base, 0, 4 * PAGE, [page], [PAGE // 2], PAGE)  # across a leaf
    with pytest.raises(ValueError):
        fn(base, 0, 2 * PAGE, [page], [2 * PAGE], 4 * PAGE)  # outside the span
    with pytest.raises(ValueError):
        fn(base, 0, 4 * PAGE, [page], [], 4 * PAGE)  # count mismatch


def test_scan_leaves_refuses_bad_spans() -> None:
    a = bytes(4 * PAGE)
    with pytest.raises(ValueError):
        _kernels.scan_leaves(a, a, PAGE, 4 * PAGE, 2 * PAGE, _kernels.PageArena(PAGE))
    with pytest.raises(ValueError):
        _kernels.scan_leaves(a, a[:PAGE], 0, 2 * PAGE, PAGE, _kernels.PageArena(PAGE))
    with pytest.raises(ValueError):
        _kernels.scan_leaves(a, a, 0, 4 * PAGE, PAGE + 1, _kernels.PageArena(PAGE))
    with pytest.raises(ValueError):
        _kernels.PageArena(0)


def test_page_arena_is_read_only_and_cannot_grow_while_exported() -> None:
    old = bytes(4 * PAGE)
    new = bytearray(old)
    new[PAGE + 5] = 1
    arena = _kernels.PageArena(PAGE)
    _kernels.scan_leaves(old, bytes(new), 0, 2 * PAGE, PAGE, arena)
    assert len(arena) == 1 and arena.indices.tolist() == [1]
    view = memoryview(arena)
    assert view.readonly and view.nbytes == PAGE and bytes(view) == bytes(new[PAGE : 2 * PAGE])
    with pytest.raises(BufferError):
        _kernels.scan_leaves(old, bytes(new), 2 * PAGE, 4 * PAGE, PAGE, arena)
    view.release()
    _kernels.scan_leaves(old, bytes(new), 2 * PAGE, 4 * PAGE, PAGE, arena)
    assert len(arena) == 1
    with pytest.raises(ValueError, match="read-only"):
        np.frombuffer(arena, dtype=np.uint8)[0] = 1


def _pair(size: int, dirty_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    old[: size // 4] = 0
    new = old.copy()
    npages = -(-size // PAGE)
    for page in rng.choice(npages, max(1, int(npages * dirty_fraction)), replace=False):
        at = min(int(page) * PAGE + int(rng.integers(0, PAGE)), size - 1)
        new[at] ^= 0x5A
    return old, new


@pytest.mark.parametrize("size", [5 * LEAF_SIZE + 1234, 24 * LEAF_SIZE, 3 * PAGE + 7])
@pytest.mark.parametrize("dirty", [0.0, 0.01, 0.3, 1.0])
def test_fused_and_python_passes_make_the_same_delta(size: int, dirty: float) -> None:
    old, new = _pair(size, dirty, size + int(dirty * 100))
    events: List[Tuple[int, int]] = []
    fused = DeltaSnapshot.create(bytes(16), old, new, 1, 2, progress=lambda d, t: events.append((d, t)))
    assert events and events[-1] == (size, size) and all(a[0] <= b[0] for a, b in zip(events, events[1:]))
    _xxh3.unbind()
    try:
        plain = DeltaSnapshot.create(bytes(16), old, new, 1, 2)
        plain.timestamp = fused.timestamp
        plain._seal(None)
        assert fused.serialize() == plain.serialize()
        assert fused.digest == digest(new) and fused.checksum == plain.checksum
        base = bytearray(old.tobytes())
        fused.apply(base)  # verified by the Python path
        assert base == new.tobytes()
    finally:
        _xxh3.bind()
    base = bytearray(old.tobytes())
    plain.apply(base)  # verified by the fused path
    assert base == new.tobytes()
    none = DeltaSnapshot.create(bytes(16), old, new, 1, 2, digest=None)
    assert none.checksum == fused.checksum and [p.index for p in none.dirty_pages] == [p.index for p in fused.dirty_pages]


def test_fused_apply_refuses_a_tampered_page_and_leaves_the_base() -> None:
    old, new = _pair(6 * LEAF_SIZE, 0.05, 7)
    delta = DeltaSnapshot.create(bytes(16), old, new, 1, 2)
    pages = delta.dirty_pages
    data = bytearray(pages[3].get_data())
    data[10] ^= 1
    pages[3].data = bytes(data)
    pages[3].compressed = False
    base = bytearray(old.tobytes())
    from cellmigrate import InvalidStateError

    with pytest.raises(InvalidStateError):
        delta.apply(base)
    assert base == old.tobytes()


def test_create_copies_pages_once_while_a_writer_runs() -> None:
    """The fused scan describes old + the copies it made, whatever the writer does."""
    size = 8 * LEAF_SIZE
    old, _ = _pair(size, 0.0, 3)
    live = old.copy()
    stop = threading.Event()

    def writer() -> None:
        rng = np.random.default_rng(5)
        while not stop.is_set():
            live[rng.integers(0, size, 64)] = rng.integers(0, 256, 64, dtype=np.uint8)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        deltas = [DeltaSnapshot.create(bytes(16), old, live, 0, 1) for _ in range(8)]
    finally:
        stop.set()
        thread.join()
    for delta in deltas:
        base = bytearray(old.tobytes())
        delta.apply(base)  # the delta's own checks hold: it describes one state exactly
        assert delta.digest == digest(bytes(base))


def test_without_the_binding_the_python_path_gives_the_same_digests() -> None:
    code = (
        "import numpy as np, cellmigrate; from cellmigrate import _xxh3;"
        "a=np.arange(3<<20, dtype=np.uint8); b=a.copy(); b[5]=9;"
        "d=cellmigrate.DeltaSnapshot.create(bytes(16), a, b, 0, 1);"
        "print(_xxh3.available(), d.digest.hex(), cellmigrate.digest(b).hex())"
    )
    env = dict(os.environ, CELLMIGRATE_XXH3_PYTHON="1")
    forced = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    normal = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert forced.returncode == 0 and normal.returncode == 0, forced.stderr + normal.stderr
    f, n = forced.stdout.split(), normal.stdout.split()
    assert f[0] == "False" and n[0] == "True"
    assert f[1] == f[2] == n[1] == n[2]


def test_bound_functions_are_xxhash_s() -> None:
    data = np.random.default_rng(1).integers(0, 256, 3 * LEAF_SIZE + 99, dtype=np.uint8)
    out = bytearray(16 * 4)
    _kernels.overlay_leaves(data, 0, data.nbytes, [], [], LEAF_SIZE, out)
    assert [bytes(out[i : i + 16]) for i in range(0, 64, 16)] == [
        xxhash.xxh3_128_digest(data[i : i + LEAF_SIZE].tobytes()) for i in range(0, data.nbytes, LEAF_SIZE)
    ]


def test_concurrent_fused_passes_in_threads() -> None:
    """Each call has its own XXH3 state: threads hashing at once get their own digests."""
    pairs = [_pair(4 * LEAF_SIZE + 100 * i, 0.1, i) for i in range(4)]
    want = [DeltaSnapshot.create(bytes(16), o, n, 0, 1).digest for o, n in pairs]
    got: List[bytes] = [b""] * len(pairs)

    def run(k: int) -> None:
        for _ in range(5):
            got[k] = DeltaSnapshot.create(bytes(16), *pairs[k], 0, 1).digest

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert got == want


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * PAGE + 17), st.sampled_from([1, 64, PAGE, 3 * PAGE]), st.integers(0, 2**40))
def test_page_digests64_matches_reference(data: bytes, page: int, offset: int) -> None:
    n = -(-len(data) // page)
    want = np.zeros(n, dtype=np.uint64)
    want_sum = _reference.page_digests64(data, page, want, offset)
    positions = np.arange(offset + 1, offset + len(data) + 1, dtype=np.uint64)
    assert want_sum == int(np.sum(np.frombuffer(data, dtype=np.uint8).astype(np.uint64) * positions) % 2**32)
    for path in each_path():
        got = np.zeros(n, dtype=np.uint64)
        assert _kernels.page_digests64(data, page, got, offset) == want_sum, path
        assert got.tolist() == want.tolist(), path
    if n:
        with pytest.raises(ValueError):
            _kernels.page_digests64(data, page, np.zeros(n - 1, dtype=np.uint64))


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=5 * PAGE + 17), st.sampled_from([1, 64, PAGE, 3 * PAGE]))
def test_page_digests128_matches_reference(data: bytes, page: int) -> None:
    n = -(-len(data) // page)
    want = bytearray(16 * n)
    _reference.page_digests128(data, page, want)
    got = np.zeros((n, 16), dtype=np.uint8)
    _kernels.page_digests128(data, page, got)
    assert got.tobytes() == bytes(want)
    if n:
        with pytest.raises(ValueError):
            _kernels.page_digests128(data, page, bytearray(16 * n - 1))


def test_created_deltas_pickle_and_deepcopy() -> None:
    """A delta's pages are rows of the scan's arenas: pickling (another process, Ray) and
    deepcopy give an equal delta that applies the same."""
    import copy
    import pickle

    old, new = _pair(3 * LEAF_SIZE + 1000, 0.2, 9)  # a short last page, dirty pages in both threads' spans
    new[-1] ^= 1
    delta = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
    for twin in (pickle.loads(pickle.dumps(delta)), copy.deepcopy(delta)):
        assert twin == delta and twin.serialize() == delta.serialize()
        base = bytearray(old.tobytes())
        twin.apply(base)
        assert base == new.tobytes()


@pytest.mark.parametrize("threads", [1, 2, 5])
def test_fused_passes_give_the_same_delta_with_any_thread_count(threads: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks are claimed dynamically: whichever thread takes which chunk, the pages come
    out in order and the checksum, leaves and digest are the state's."""
    import cellmigrate._passes as passes

    old, new = _pair(40 * LEAF_SIZE + 3 * PAGE + 5, 0.05, 11)
    want = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
    monkeypatch.setattr(passes, "max_threads", lambda: threads)
    events: List[Tuple[int, int]] = []
    got = DeltaSnapshot.create(bytes(16), old, new, 0, 1, progress=lambda d, t: events.append((d, t)))
    assert events[-1] == (new.nbytes, new.nbytes)
    got.timestamp = want.timestamp
    got._seal(None)
    assert got.serialize() == want.serialize()
    base = bytearray(old.tobytes())
    got.apply(base)
    assert base == new.tobytes()
