"""``xxh3_128_tree``: the definition, every way of computing it, and the paths that use it.

The oracle is the definition written out with plain slicing; the library computes the
same value streaming (split anywhere), joined from leaf-aligned spans, on several
threads, inside delta create/apply (fused with the page scan and the checksum), in the
rollback point and in the CLI.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from typing import Any, List

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

import cellmigrate
from cellmigrate import PAGE_SIZE, DeltaSnapshot, InvalidStateError, RollbackInfo, digest
from cellmigrate._tree import LEAF_SIZE, TreeStream, tree_digest

MiB = 1 << 20


def oracle(data: bytes) -> bytes:
    leaves = b"".join(xxhash.xxh3_128_digest(data[i : i + LEAF_SIZE]) for i in range(0, len(data), LEAF_SIZE))
    return xxhash.xxh3_128_digest(leaves + struct.pack("<Q", len(data)))


def _bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_leaf_size_and_known_structure() -> None:
    assert LEAF_SIZE == 1 << 20
    # The empty state has no leaves: the root covers the length alone.
    assert digest(b"") == xxhash.xxh3_128_digest(bytes(8))
    # One short leaf.
    assert digest(b"abc") == xxhash.xxh3_128_digest(xxhash.xxh3_128_digest(b"abc") + struct.pack("<Q", 3))
    # The plain and the tree digest are different functions.
    assert digest(b"abc") != digest(b"abc", "xxh3_128")


@pytest.mark.parametrize("n", [0, 1, LEAF_SIZE - 1, LEAF_SIZE, LEAF_SIZE + 1, 3 * LEAF_SIZE, 3 * LEAF_SIZE + 4095])
def test_sizes_around_leaf_boundaries(n: int) -> None:
    data = _bytes(n, n)
    assert digest(data) == oracle(data)
    assert tree_digest(memoryview(data), threads=1) == oracle(data)


def test_length_is_bound() -> None:
    # Equal leaf digests with different lengths cannot collide structurally: a state and
    # the same state with one more zero byte differ in a leaf and in the length.
    assert digest(bytes(LEAF_SIZE)) != digest(bytes(LEAF_SIZE + 1))
    assert digest(bytes(10)) != digest(bytes(11))


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 3 * LEAF_SIZE + 100), st.lists(st.integers(0, 3 * LEAF_SIZE), max_size=12), st.integers(0, 9))
def test_stream_split_anywhere(n: int, cuts: List[int], seed: int) -> None:
    data = _bytes(n, seed)
    points = sorted({0, n, *(c for c in cuts if c <= n)})
    stream = TreeStream()
    for a, b in zip(points, points[1:]):
        stream.update(memoryview(data)[a:b])
    assert stream.digest() == oracle(data)
    # digest() does not consume: feeding more continues the same state.
    stream.update(b"tail")
    assert stream.digest() == oracle(data + b"tail")


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 5), st.integers(0, LEAF_SIZE - 1), st.integers(1, 4), st.integers(0, 9))
def test_join_leaf_aligned_spans(whole_leaves: int, tail: int, parts: int, seed: int) -> None:
    n = whole_leaves * LEAF_SIZE + tail
    data = _bytes(n, seed)
    leaves_per_part = max(1, -(-(-(-n // LEAF_SIZE)) // parts))
    starts = list(range(0, n, leaves_per_part * LEAF_SIZE)) or [0]
    spans = [(a, min(a + leaves_per_part * LEAF_SIZE, n)) for a in starts]
    streams = []
    for a, b in spans:
        s = TreeStream()
        s.update(data[a:b])
        streams.append(s)
    head = TreeStream()
    head.join(streams)
    assert head.digest() == oracle(data)


def test_join_refuses_a_misaligned_stream() -> None:
    half = TreeStream()
    half.update(b"x" * 100)
    other = TreeStream()
    other.update(b"y")
    with pytest.raises(ValueError, match="leaf boundary"):
        half.join([other])


@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_threads_do_not_change_the_value(threads: int) -> None:
    data = _bytes(40 * MiB + 12345, 5)  # above the parallel threshold, uneven tail
    assert tree_digest(memoryview(data), threads=threads) == oracle(data)
    assert digest(data, threads=threads) == oracle(data)


def test_every_buffer_kind() -> None:
    raw = _bytes(2 * LEAF_SIZE + 17, 7)
    arr = np.frombuffer(raw[: len(raw) - len(raw) % 4], dtype=np.uint32)
    assert digest(arr) == oracle(arr.tobytes())
    for obj in (raw, bytearray(raw), memoryview(raw)):
        assert digest(obj) == oracle(raw)


def test_key_is_refused() -> None:
    """A key means a MAC; the tree digest is not one, so a key with it is an error."""
    with pytest.raises(ValueError, match="xxh3_128_tree is not a MAC"):
        digest(b"abc", "xxh3_128_tree", key=bytes(32))
    # create with a key always makes keyed BLAKE3, whatever the digest default.
    d = DeltaSnapshot.create(bytes(16), b"a" * 10, b"b" * 10, 0, 1, key=bytes(32))
    assert d.digest_algorithm == "blake3" and d.keyed


def test_is_the_default_everywhere() -> None:
    assert cellmigrate.DEFAULT_DIGEST == "xxh3_128_tree"
    old, new = bytes(3 * PAGE_SIZE), b"\1" * (3 * PAGE_SIZE)
    d = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
    assert d.digest_algorithm == "xxh3_128_tree" and d.digest == oracle(new)
    info = RollbackInfo.capture(cellmigrate.Agent(), new)
    assert info.digest_algorithm == "xxh3_128_tree" and info.digest == oracle(new)


# ---- the fused, threaded paths in delta create/apply ---------------------------------

_PAIRED = """
import sys, numpy as np, xxhash, struct
import cellmigrate._passes as delta_module
from cellmigrate import PAGE_SIZE, DeltaSnapshot, InvalidStateError

delta_module.max_threads = lambda: {threads}  # the paired path even on a 1-CPU runner
def oracle(data):
    leaves = b"".join(xxhash.xxh3_128_digest(data[i:i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
    return xxhash.xxh3_128_digest(leaves + struct.pack("<Q", len(data)))

size = (37 << 20) + 3 * PAGE_SIZE + 123          # several leaves, short last page and leaf
rng = np.random.default_rng(11)
old = rng.integers(0, 256, size, dtype=np.uint8)
new = old.copy()
new[rng.choice(size, 500, replace=False)] ^= 0x5A
new[-1] ^= 1
d = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
assert d.digest == oracle(new.tobytes()), "create"
target = old.copy()
d.apply(target)
assert np.array_equal(target, new), "apply"

# A short bytearray base grows with zeros; the digest covers the zero tail too.
grown = new.copy(); cut = (20 << 20) + 777; grown[cut:] = 0
grown[cut - 5000:cut] ^= 0x33                     # and some dirty pages below the cut
was = grown.copy(); was[cut - 5000:cut] ^= 0x33
grow = DeltaSnapshot.create(bytes(16), was, grown, 0, 1)
assert grow.dirty_pages and grow.digest == oracle(grown.tobytes())
base = bytearray(was[:cut].tobytes())
grow.apply(base)
assert bytes(base) == grown.tobytes(), "grow"

# Two flipped bits (a change the weighted checksum can miss) in a page the delta does not
# replace are caught by the digest, and nothing is written.
dirty = set(p.index for p in d.dirty_pages)
for where in (0, (1 << 20) - 1, 1 << 20, size // 2, size - PAGE_SIZE - 200):
    while where // PAGE_SIZE in dirty or (where + 1) // PAGE_SIZE in dirty:
        where += PAGE_SIZE
    bad = old.copy(); bad[where] ^= 0x80; bad[where + 1] ^= 0x80
    before = bad.copy()
    try:
        d.apply(bad)
    except InvalidStateError as exc:
        assert "mismatch" in str(exc), exc
    else:
        raise AssertionError(f"flip at {{where}} was not caught")
    assert np.array_equal(bad, before), "refused apply wrote"
print("ok")
"""


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_paths_match_the_definition(threads: int) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _PAIRED.format(threads=threads)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_wire_round_trip_keeps_the_algorithm() -> None:
    old, new = bytes(5 * PAGE_SIZE), bytes(4 * PAGE_SIZE) + b"\7" * PAGE_SIZE
    d = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
    back = DeltaSnapshot.deserialize(d.serialize())
    assert back.digest_algorithm == "xxh3_128_tree" and back.digest == d.digest
    target = bytearray(old)
    back.apply(target)
    assert bytes(target) == new
    back.digest = bytes(16)
    with pytest.raises(InvalidStateError, match="xxh3_128_tree digest mismatch"):
        back.apply(bytearray(old))


def test_stream_takes_wide_items_as_bytes() -> None:
    raw = _bytes(LEAF_SIZE + 4096, 13)
    stream = TreeStream()
    stream.update(np.frombuffer(raw, dtype=np.float64))
    assert stream.digest() == oracle(raw)


@pytest.mark.parametrize("shape, dtype", [((0, 3), np.float64), ((2, 0), np.uint32), ((0,), np.uint16)])
def test_empty_numpy_states_of_any_shape(shape: tuple, dtype: type) -> None:
    """An empty state is an empty state, whatever its array shape: memoryview.cast refuses
    a shape holding a zero, so a (0, 3) array used to raise TypeError instead of hashing."""
    from cellmigrate import StateVerifier, simple_checksum

    empty = np.zeros(shape, dtype=dtype)
    assert digest(empty) == oracle(b"") == digest(b"")
    assert digest(empty, "xxh3_128") == xxhash.xxh3_128_digest(b"")
    stream = TreeStream()
    stream.update(empty)
    assert stream.digest() == oracle(b"")
    assert simple_checksum(empty) == 0
    d = DeltaSnapshot.create(bytes(16), empty, empty, 0, 1)
    assert d.total_size == 0 and d.digest == oracle(b"") and not d.dirty_pages
    target = np.zeros(shape, dtype=dtype)
    d.apply(target)
    grown = bytearray()
    d.apply(grown)
    assert grown == b""
    assert StateVerifier.verify_state(empty, b"", 0).passed
    readonly = np.zeros(shape, dtype=dtype)
    readonly.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        d.apply(readonly)


# --- LeafTable: the incremental tree digest ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 5 * LEAF_SIZE // PAGE_SIZE), st.integers(0, 2**32 - 1),
       st.lists(st.tuples(st.booleans(), st.integers(0, 5 * LEAF_SIZE)), max_size=6))
def test_leaf_table_follows_page_writes_and_resizes(pages: int, seed: int, steps: List[Any]) -> None:
    from cellmigrate._tree import LeafTable

    rng = np.random.default_rng(seed)
    state = bytearray(rng.integers(0, 256, pages * PAGE_SIZE + int(rng.integers(0, PAGE_SIZE)), dtype=np.uint8).tobytes())
    table = LeafTable.of(memoryview(state))
    assert table.root() == oracle(bytes(state)) and len(table) == -(-len(state) // LEAF_SIZE)
    for is_resize, where in steps:
        if is_resize:
            state = state[:where] + bytearray(max(0, where - len(state)))
            table.resize(len(state))
        elif state:
            at = where % len(state)
            state[at] ^= 0xA5
            table.touch_pages([at // PAGE_SIZE])
        assert table.refresh(memoryview(state)) == oracle(bytes(state)) == digest(state)


def test_leaf_table_hashes_only_touched_leaves(monkeypatch: pytest.MonkeyPatch) -> None:
    import cellmigrate._tree as tree

    state = bytearray(_bytes(8 * MiB + 100, 3))
    table = tree.LeafTable.of(memoryview(state))
    hashed: List[int] = []
    real = tree._digest

    def counting(data: Any) -> bytes:
        hashed.append(memoryview(data).nbytes)
        return real(data)

    monkeypatch.setattr(tree, "_digest", counting)
    state[3 * MiB + 7] ^= 1
    state[3 * MiB + 9000] ^= 1
    table.touch_pages([(3 * MiB + 7) // PAGE_SIZE, (3 * MiB + 9000) // PAGE_SIZE, 10**9])  # past the end: ignored
    assert table.stale_count() == 1
    assert table.refresh(memoryview(state), threads=1) == oracle(bytes(state))
    assert hashed[0] == LEAF_SIZE and len(hashed) == 2  # one leaf, then the root over the leaf table
    hashed.clear()
    state.extend(bytes(5))  # the last, partial leaf changes length
    table.resize(len(state))
    assert table.stale_count() == 1 and table.refresh(memoryview(state)) == oracle(bytes(state))
    assert hashed[0] == 100 + 5


def test_leaf_table_seeds_from_a_pass_and_refuses_misuse() -> None:
    from cellmigrate._tree import LeafTable
    from cellmigrate.checksum import Hasher

    data = _bytes(3 * MiB + 10, 4)
    hasher = Hasher("xxh3_128_tree")
    hasher.update(data)
    table = LeafTable.from_leaves(hasher.leaves(), len(data))
    assert table.root() == hasher.digest() == digest(data)
    assert table.leaves() == hasher.leaves()
    with pytest.raises(ValueError, match="leaf digests"):
        LeafTable.from_leaves(hasher.leaves()[:-1], len(data))
    with pytest.raises(ValueError, match="has no leaves"):
        Hasher("xxh3_128").leaves()
    table.touch_pages([0])
    with pytest.raises(ValueError, match="stale"):
        table.root()
    with pytest.raises(ValueError, match="describes"):
        table.refresh(memoryview(data[:-1]))
    assert LeafTable().refresh(memoryview(b"")) == digest(b"")


@pytest.mark.parametrize("algorithm", ["xxh3_128_tree", "xxh3_128", None])
def test_tracker_committed_digest(algorithm: Any) -> None:
    from cellmigrate import DirtyPageTracker

    rng = np.random.default_rng(5)
    state = bytearray(rng.integers(0, 256, 3 * MiB + 5, dtype=np.uint8).tobytes())
    tracker = DirtyPageTracker(bytes(16), len(state))
    assert tracker.committed_digest() == digest(b"")
    tracker.initialize(state)
    assert tracker.committed_digest() == digest(state)
    for size in (len(state), 5 * MiB, 2 * MiB - 3):
        state = state[:size] + bytearray(max(0, size - len(state)))
        state[int(rng.integers(0, size))] ^= 0xFF
        delta = tracker.create_delta(state, digest=algorithm, resize=True)
        assert tracker.committed_digest() == digest(state)
        if algorithm == "xxh3_128_tree":
            assert delta.digest == tracker.committed_digest()
