"""Page tables (cellmigrate.live.leaves): digests against xxhash itself, resizes, and what
the receiver's proof catches (a store that does not hold what was written)."""

from __future__ import annotations

from typing import Any, List

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import CorruptDataError, digest
from cellmigrate.live import BufferSource, BufferTarget, InProcessChannel, LiveMigration, MemoryStore, ReceiverSession
from cellmigrate.live import leaves
from cellmigrate.live.leaves import PageTable, page_digests, page_digests_at, page_root

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
P = 4096
MIB = 1 << 20


def _ref_digests(data: bytes) -> List[bytes]:
    return [xxhash.xxh3_128_digest(data[a : a + P]) for a in range(0, len(data), P)]


def _ref_root(data: bytes) -> bytes:
    """xxh3_128_tree with 4 KiB leaves, by its definition."""
    return xxhash.xxh3_128_digest(b"".join(_ref_digests(data)) + len(data).to_bytes(8, "little"))


@SETTINGS
@given(st.integers(0, 5 * P + 17), st.integers(0, 2**32 - 1))
def test_page_digests_and_root_match_the_definition(size: int, seed: int) -> None:
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    got = page_digests(data)
    assert got.shape == (len(_ref_digests(data)), 16)
    assert [bytes(row) for row in got] == _ref_digests(data)
    assert page_root(got, size) == _ref_root(data)
    python = np.empty_like(got)
    if size:
        leaves._python_page_digests(memoryview(data), python)
        assert np.array_equal(python, got)  # the compiled kernel (when present) agrees with the reference


def test_page_digests_threads_and_large_buffers_agree() -> None:
    data = np.random.default_rng(1).integers(0, 256, 40 * MIB + 5, dtype=np.uint8)
    one = page_digests(data, threads=1)
    assert np.array_equal(one, page_digests(data, threads=2))
    assert bytes(one[-1]) == xxhash.xxh3_128_digest(data[-5:].tobytes())


@SETTINGS
@given(st.data())
def test_page_digests_at_scattered_pages(data: st.DataObject) -> None:
    size = data.draw(st.integers(1, 40 * P + 3))
    state = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    count = -(-size // P)
    idx = np.array(sorted(data.draw(st.sets(st.integers(0, count - 1), max_size=30))), dtype=np.int64)
    scratch = np.empty(data.draw(st.sampled_from([P, 3 * P, 64 * P])), dtype=np.uint8)
    got = page_digests_at(state, idx, size, scratch)
    assert [bytes(r) for r in got] == [_ref_digests(state.tobytes())[i] for i in idx]


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 9 * P + 100), st.lists(st.integers(0, 20), max_size=4)), min_size=1, max_size=6))
def test_receiver_table_follows_resizes_and_writes(steps: List[Any]) -> None:
    """Stale pages after a resize are hashed from the state: the root is the state's."""
    rng = np.random.default_rng(0)
    state = np.zeros(0, dtype=np.uint8)
    table = PageTable()
    for size, pages in steps:
        grown = np.zeros(size, dtype=np.uint8)
        keep = min(size, state.nbytes)
        grown[:keep] = state[:keep]
        state = grown
        table.resize(size)
        idx = np.array(sorted({p for p in pages if p * P < size}), dtype=np.int64)
        for p in idx:
            state[p * P] = rng.integers(1, 256)
        table.set(idx, page_digests_at(state, idx, size))
        table.refresh(state)
        assert table.root() == _ref_root(state.tobytes())


@SETTINGS
@given(st.integers(0, 6 * P + 9), st.integers(0, 6 * P + 9))
def test_sender_table_zero_filled_resize(old: int, new: int) -> None:
    """After a zero-filled resize, every known digest is the zero-extended state's, and
    only the page holding the old end (when partial in either size) is unknown."""
    state = np.random.default_rng(old).integers(1, 256, old, dtype=np.uint8)
    table = PageTable(zero_filled=True)
    table.resize(old, zero_filled=True)
    table.set(np.arange(len(table), dtype=np.int64), page_digests(state))
    table.resize(new, zero_filled=True)
    after = np.zeros(new, dtype=np.uint8)
    after[: min(old, new)] = state[: min(old, new)]
    truth = page_digests(after)
    differing = table.differing(0, truth)
    boundary = min(old, new) // P
    expect = [boundary] if old != new and min(old, new) % P and boundary < len(table) else []
    assert differing.tolist() == expect
    if expect:
        with pytest.raises(ValueError, match="stale"):
            table.root()
    else:
        assert table.root() == page_root(truth, new) == _ref_root(after.tobytes())


class _LyingStore(MemoryStore):
    """Stages runs through ``write_run`` but flips one byte: what it holds is not what it got."""

    def write_run(self, offset: int, data: memoryview) -> None:
        view = self.view()
        view[offset : offset + data.nbytes] = data
        view[offset] ^= 0x40


class _DirtyGrowStore(MemoryStore):
    """Grows with garbage instead of zeros (breaking the StateStore contract)."""

    def resize(self, size: int) -> None:
        old = self.size()
        super().resize(size)
        if size > old:
            self.array[old:] = 0x5A


@pytest.mark.parametrize("store", [_LyingStore, _DirtyGrowStore])
def test_the_proof_is_about_the_staged_state(store: type) -> None:
    state = np.random.default_rng(5).integers(0, 256, 2 * MIB + 300, dtype=np.uint8)
    state[:MIB] = 0  # zero pages: never sent, so only the staging's zero-fill vouches for them
    target = BufferTarget()
    resumed: List[int] = []
    with pytest.raises(CorruptDataError, match="digest"):
        LiveMigration(
            BufferSource(state, resume=lambda: resumed.append(1)),
            InProcessChannel(ReceiverSession(store(), target)),
            max_rounds=0,
        ).run()
    assert target.state is None and not target.resumed and resumed == [1]


@pytest.mark.parametrize("sizes", [[4 * MIB + 100, 4 * MIB + 50, 4 * MIB + 4000, 8 * MIB], [3 * P + 1, 0, 2 * P]])
def test_size_changes_inside_the_last_page(sizes: List[int]) -> None:
    rng = np.random.default_rng(7)
    holder = [rng.integers(0, 256, sizes[0], dtype=np.uint8)]
    steps = iter(sizes[1:])

    def resize(stats: Any) -> None:
        n = next(steps, None)
        if n is not None:
            new = np.zeros(n, dtype=np.uint8)
            keep = min(n, holder[0].nbytes)
            new[:keep] = holder[0][:keep]
            holder[0] = new

    target = BufferTarget()
    summary = LiveMigration(
        BufferSource(lambda: holder[0]), InProcessChannel(ReceiverSession(MemoryStore(), target)),
        on_round=resize, max_rounds=len(sizes), downtime_limit=1e-9,
    ).run()
    final = holder[0].tobytes()
    assert target.state is not None and bytes(target.state) == final
    assert summary.digest == digest(final) and summary.proof == _ref_root(final)


def test_kernel_and_python_paths_agree_end_to_end() -> None:
    """The same migration with the compiled page kernel and with the Python path (unbound
    XXH3): same proof, same state."""
    from cellmigrate import _xxh3

    state = np.random.default_rng(9).integers(0, 256, 3 * MIB + 777, dtype=np.uint8)
    proofs = []
    try:
        for bound in (True, False):
            if bound:
                assert _xxh3.bind() and leaves.page_kernel() is not None
            else:
                _xxh3.unbind()
                assert leaves.page_kernel() is None
            target = BufferTarget()
            summary = LiveMigration(BufferSource(state), InProcessChannel(ReceiverSession(MemoryStore(), target))).run()
            assert target.state is not None and bytes(target.state) == state.tobytes()
            proofs.append(summary.proof)
    finally:
        _xxh3.bind()
    assert proofs[0] == proofs[1] == _ref_root(state.tobytes())
