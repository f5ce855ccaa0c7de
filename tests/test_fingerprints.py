"""Page fingerprints: the create pass that reads the new state alone.

Given the XXH3-64 of each page of the base, ``scan_leaves`` reads ``new`` once and reads
``old`` only under the pages whose hash changed. Checked here: the kernel against the
pure-Python reference on every dispatch path (accurate, stale and arbitrary tables);
``DeltaSnapshot.create(fingerprints=)`` gives the delta a plain create gives, on every
digest and encoding; the table then describes the delta's state; a table that does not
describe the base gives a delta that ``apply`` refuses (the base untouched); bad input.
Races with a writer are in ``test_consistent_rounds``.
"""

from __future__ import annotations

import copy
import os
import pickle
import subprocess
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import (
    DeltaSnapshot,
    DirtyPageTracker,
    InvalidStateError,
    PageFingerprints,
    _kernels,
    _reference,
    _xxh3,
    simple_checksum,
)

from kernel_strategies import each_path, leaf_states

PAGE = 4096
AGENT = bytes(range(16))


pytestmark = pytest.mark.usefixtures("xxh3_bound")


def _table(data: np.ndarray) -> np.ndarray:
    n = -(-len(data) // PAGE)
    return np.array([xxhash.xxh3_64_intdigest(data[k * PAGE : (k + 1) * PAGE].tobytes()) for k in range(n)],
                    dtype=np.uint64)


@st.composite
def fp_cases(draw: st.DrawFn) -> Tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]:
    leaf = draw(st.sampled_from([PAGE, 2 * PAGE, 4 * PAGE, 16 * PAGE]))
    old, new, lo, hi = leaf_states(draw, leaf)
    table = _table(old)
    npages = len(table)
    # A table that does not describe old: entries replaced by anything (a page then reads
    # as dirty, or, where old changed under a kept entry, as clean).
    for page in draw(st.lists(st.integers(0, npages - 1), max_size=4)):
        table[page] = draw(st.integers(0, 2**64 - 1))
    return old, new, table, lo, hi, leaf


@settings(max_examples=150, deadline=None)
@given(fp_cases())
def test_scan_leaves_with_fingerprints_matches_reference_on_every_path(
    case: Tuple[np.ndarray, np.ndarray, np.ndarray, int, int, int]
) -> None:
    old, new, table, lo, hi, leaf = case
    indices, copies, checksum, leaves, read = _reference.scan_leaves_fp_reference(new, lo, hi, leaf, PAGE, table)
    for path in each_path():
        for hashing in (True, False):
            arena = _kernels.PageArena(PAGE)
            out = bytearray(16 * -(-(hi - lo) // leaf)) if hashing else None
            got_read = np.full(len(table), 7, dtype=np.uint64)
            got = _kernels.scan_leaves(old, new, lo, hi, leaf, arena, out, True, table, got_read)
            assert got == checksum, path
            assert arena.indices.tolist() == indices.tolist(), path
            held = bytes(memoryview(arena))
            for k, page in enumerate(copies):
                assert held[k * PAGE : k * PAGE + len(page)] == page, (path, k)
            want_hints = [_reference.xzr_hint(c, old[i * PAGE : i * PAGE + len(c)])
                          for i, c in zip(indices.tolist(), copies)]
            assert arena.xzr_hints.tolist() == want_hints, path
            for k in range(len(table)):  # pages outside [lo, hi) are left alone
                assert int(got_read[k]) == read.get(k, 7), (path, k)
            if hashing:
                assert bytes(out) == leaves, path
            # Given old's checksum, the kernel sums only what the copies change in it, and
            # says whether old under a copy is not what the table says.
            _, _, (change, stale), _, _ = _reference.scan_leaves_fp_reference(new, lo, hi, leaf, PAGE, table,
                                                                               changes_of=old)
            arena = _kernels.PageArena(PAGE)
            out = bytearray(16 * -(-(hi - lo) // leaf)) if hashing else None
            got_read = np.full(len(table), 7, dtype=np.uint64)
            assert _kernels.scan_leaves(old, new, lo, hi, leaf, arena, out, True, table, got_read, True) == \
                (change, stale), path
            assert arena.indices.tolist() == indices.tolist(), path
            assert arena.xzr_hints.tolist() == want_hints, path
            assert all(int(got_read[k]) == read.get(k, 7) for k in range(len(table))), path
            if hashing:
                assert bytes(out) == leaves, path
            # old's checksum plus the change is that of old with the copies over it (new's,
            # where the table describes old).
            patched = _overlay(old, indices, copies)[lo:hi]
            assert (simple_checksum(old[lo:hi], offset=lo) + change) & 0xFFFFFFFF == \
                simple_checksum(patched, offset=lo), path
            under = [xxhash.xxh3_64_intdigest(old[k * PAGE : k * PAGE + len(c)].tobytes())
                     for k, c in zip(indices.tolist(), copies)]
            assert stale == any(h != int(table[k]) for k, h in zip(indices.tolist(), under)), path


def _overlay(old: np.ndarray, indices: np.ndarray, copies: List[bytes]) -> bytes:
    """old with the copies over it, at their pages."""
    out = bytearray(old.tobytes())
    for k, c in zip(indices.tolist(), copies):
        out[k * PAGE : k * PAGE + len(c)] = c
    return bytes(out)


def test_scan_leaves_refuses_bad_fingerprint_tables() -> None:
    a = np.zeros(4 * PAGE, dtype=np.uint8)
    good = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError, match="go together"):
        _kernels.scan_leaves(a, a, 0, 4 * PAGE, PAGE, _kernels.PageArena(PAGE), None, False, good)
    with pytest.raises(ValueError, match="needs 4"):
        _kernels.scan_leaves(a, a, 0, 4 * PAGE, PAGE, _kernels.PageArena(PAGE), None, False, good[:3], good.copy())
    with pytest.raises(ValueError, match="needs 4"):
        _kernels.scan_leaves(a, a, 0, 4 * PAGE, PAGE, _kernels.PageArena(PAGE), None, False, good, good[:3].copy())
    with pytest.raises(ValueError, match="checksum_changes needs"):
        _kernels.scan_leaves(a, a, 0, 4 * PAGE, PAGE, _kernels.PageArena(PAGE), None, False, None, None, True)


def test_one_array_as_both_tables_still_finds_the_changed_pages() -> None:
    """The kernel reads a page's old entry before it writes the new one: the same array
    may serve as both tables (updated in place)."""
    old = np.random.default_rng(2).integers(0, 256, 6 * PAGE, dtype=np.uint8)
    new = old.copy()
    new[[PAGE + 1, 5 * PAGE]] ^= 1
    table = _table(old)
    arena = _kernels.PageArena(PAGE)
    _kernels.scan_leaves(old, new, 0, new.nbytes, 2 * PAGE, arena, None, False, table, table)
    assert arena.indices.tolist() == [1, 5]
    assert table.tolist() == _table(new).tolist()


def _states(size: int, dirty: int, seed: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    old[: size // 3] = 0  # zero pages, so every encoding shows up
    new = old.copy()
    for page in rng.choice(-(-size // PAGE), dirty, replace=False).tolist():
        at = page * PAGE
        kind = page % 4
        if kind == 0:
            new[at : at + 64] = rng.integers(0, 256, 64, dtype=np.uint8)[: len(new[at : at + 64])]
        elif kind == 1:
            new[at : at + PAGE] = rng.integers(0, 256, len(new[at : at + PAGE]), dtype=np.uint8)
        elif kind == 2:
            new[at : at + PAGE] = 0
        else:
            new[at] ^= 1
    return old, new


# A checksum-only delta allows no XZR pages, so neither "xor" nor "zstd" (its XZR pages).
_CASES = [(a, c) for a in ("xxh3_128_tree", "xxh3_128", "blake3") for c in ("auto", "none", "rle", "xor", "zstd")]
_CASES += [(None, c) for c in ("auto", "none", "rle")]


@pytest.mark.parametrize(("algorithm", "compress"), _CASES)
def test_create_with_fingerprints_is_the_plain_create(algorithm: Optional[str], compress: str) -> None:
    """The same delta, byte for byte, with or without the table (sizes straddling the
    16 MiB unit the threads claim, a short last page); the table then describes the new
    state, ready for the next round."""
    old, new = _states((17 << 20) + 1000, 300)
    table = PageFingerprints.of(old)
    with_table = DeltaSnapshot.create(AGENT, old, new, 4, 5, digest=algorithm, compress=compress, fingerprints=table)
    plain = DeltaSnapshot.create(AGENT, old, new, 4, 5, digest=algorithm, compress=compress)
    with_table.timestamp = plain.timestamp
    with_table._seal(None)
    assert with_table.serialize() == plain.serialize()
    assert table == PageFingerprints.of(new)
    target = bytearray(old.tobytes())
    with_table.apply(target)
    assert target == new.tobytes()


def test_rounds_chain_on_the_advanced_table() -> None:
    """Round after round, only the table and the previous state: each delta applies on
    the receiver's state, and the table keeps describing it."""
    rng = np.random.default_rng(5)
    state = rng.integers(0, 256, 3 << 20, dtype=np.uint8)
    receiver = bytearray(state.tobytes())
    table = PageFingerprints.of(receiver)
    for round_ in range(5):
        sent = np.frombuffer(bytes(receiver), dtype=np.uint8)
        for page in rng.choice(len(state) // PAGE, 20, replace=False).tolist():
            state[page * PAGE + int(rng.integers(0, PAGE))] ^= 0xFF
        delta = DeltaSnapshot.create(AGENT, sent, state, round_, round_ + 1, fingerprints=table)
        assert delta.dirty_page_count() == 20
        delta.apply(receiver)
        assert receiver == state.tobytes()
        assert table == PageFingerprints.of(receiver)


def test_a_table_that_does_not_describe_the_base_gives_a_delta_apply_refuses() -> None:
    """The base changed after its table was taken, back to what the new state holds: the
    table says the page is clean, the delta leaves it out, and apply refuses the delta on
    that base without writing it."""
    taken = np.random.default_rng(9).integers(0, 256, 1 << 20, dtype=np.uint8)
    table = PageFingerprints.of(taken)
    base = taken.copy()
    base[5 * PAGE + 10] ^= 1  # written after the table
    new = taken.copy()
    new[9 * PAGE] ^= 1
    delta = DeltaSnapshot.create(AGENT, base, new, 1, 2, fingerprints=table)
    assert [p.index for p in delta.dirty_pages] == [9]  # page 5 looked clean
    target = bytearray(base.tobytes())
    with pytest.raises(InvalidStateError):
        delta.apply(target)
    assert target == base.tobytes()


def test_a_checksum_only_delta_never_trusts_a_table() -> None:
    """The crate's checksum misses +1, -2, +1 on three bytes in a row: had create trusted a
    table taken before such an edit of the base, apply would accept the delta and leave
    the edited page. Without a digest create compares both states instead."""
    taken = np.random.default_rng(3).integers(10, 240, 4 * PAGE, dtype=np.uint8)
    table = PageFingerprints.of(taken)
    base = taken.copy()
    base[PAGE + 10 : PAGE + 13] += np.array([1, 254, 1], dtype=np.uint8)  # +1, -2, +1
    assert simple_checksum(base) == simple_checksum(taken)
    delta = DeltaSnapshot.create(AGENT, base, taken, 1, 2, digest=None, fingerprints=table)
    assert [p.index for p in delta.dirty_pages] == [1]  # found by comparing, not by the table
    target = bytearray(base.tobytes())
    delta.apply(target)
    assert target == taken.tobytes()
    assert table == PageFingerprints.of(taken)


def test_fingerprints_refuse_bad_input_and_a_failed_create_leaves_the_table() -> None:
    old = np.zeros(3 * PAGE, dtype=np.uint8)
    table = PageFingerprints.of(old)
    with pytest.raises(InvalidStateError, match="fingerprints"):
        DeltaSnapshot.create(AGENT, old, np.zeros(4 * PAGE, dtype=np.uint8), 1, 2, resize=True, fingerprints=table)
    with pytest.raises(InvalidStateError, match="fingerprints"):
        DeltaSnapshot.create(AGENT, old[:PAGE], old[:PAGE], 1, 2, fingerprints=table)
    with pytest.raises(TypeError, match="PageFingerprints"):
        DeltaSnapshot.create(AGENT, old, old, 1, 2, fingerprints=table.values)  # type: ignore[arg-type]
    # old_state=None (zeros) with a table: "the states have 0 and 12288 bytes" before
    with pytest.raises(ValueError, match="fingerprints describe old_state: pass the state they were taken of"):
        DeltaSnapshot.create(AGENT, None, old, 1, 2, fingerprints=table)
    new = old.copy()
    new[PAGE] = 1
    kept = table.copy()

    def stop(done: int, total: int) -> None:
        raise RuntimeError("stopped")

    with pytest.raises(RuntimeError, match="stopped"):
        DeltaSnapshot.create(AGENT, old, new, 1, 2, fingerprints=table, progress=stop)
    assert table == kept
    with pytest.raises(ValueError, match="pages"):
        PageFingerprints(3 * PAGE, np.zeros(2, dtype=np.uint64))
    for bad, error in (([1.5, 2.7], TypeError), ([[1], [2]], ValueError), (["ab", "cd"], TypeError),
                       ([-1, 2], ValueError), ([2**64, 1], ValueError), (np.array([[1], [2]]), ValueError),
                       (np.array([1.0, 2.0]), TypeError), (np.array([-1, 2]), ValueError)):
        with pytest.raises(error, match="values"):
            PageFingerprints(2 * PAGE, bad)
    assert PageFingerprints(2 * PAGE, [2**64 - 1, 0]).values.tolist() == [2**64 - 1, 0]
    with pytest.raises(ValueError, match=">= 0"):
        PageFingerprints(-1, [])
    for bad in (None, b"\x01", "1", 7):
        with pytest.raises(TypeError, match="values must be"):
            PageFingerprints(PAGE, bad)
    with pytest.raises(InvalidStateError, match=f"describe a state of {3 * PAGE} bytes; both states have {PAGE}"):
        DeltaSnapshot.create(AGENT, old[:PAGE], old[:PAGE], 1, 2, fingerprints=table)
    with pytest.raises(ValueError):
        table.values[0] = 1  # read-only: create swaps in a new table, never edits in place


def test_the_table_keeps_its_state_checksum_through_rounds() -> None:
    """``of`` takes the state's checksum with its pages; create advances it with the table
    (the delta's checksum is the new state's though the clean pages were never summed);
    a copy keeps it; a table made from parts may go without one (create then sums every
    page) and refuses one that is not a u32."""
    rng = np.random.default_rng(21)
    old = rng.integers(0, 256, (20 << 20) + 77, dtype=np.uint8)
    table = PageFingerprints.of(old)
    assert table.checksum == simple_checksum(old)
    assert PageFingerprints.of(old, threads=1).checksum == table.checksum
    assert table.copy().checksum == table.checksum
    state = old.copy()
    for round_ in range(3):
        for page in rng.choice(-(-len(state) // PAGE), 50, replace=False).tolist():
            state[min(page * PAGE + int(rng.integers(0, PAGE)), len(state) - 1)] += 1
        state[-1] += 1  # the short last page, every round
        delta = DeltaSnapshot.create(AGENT, old, state, round_, round_ + 1, fingerprints=table)
        assert delta.checksum == simple_checksum(state) == table.checksum
        assert table == PageFingerprints.of(state)
        old = state.copy()
    parts = PageFingerprints(len(old), table.values)
    assert parts.checksum is None and parts != table and parts.values.tolist() == table.values.tolist()
    assert "checksum=None" in repr(parts)
    state[PAGE] ^= 1
    delta = DeltaSnapshot.create(AGENT, old, state, 3, 4, fingerprints=parts)
    assert delta.checksum == simple_checksum(state) == parts.checksum
    assert PageFingerprints(0, [], 2**32 - 1).checksum == 2**32 - 1
    for bad, error in ((2**32, ValueError), (-1, ValueError), (1.0, TypeError), (True, TypeError)):
        with pytest.raises(error, match="checksum"):
            PageFingerprints(0, [], bad)  # type: ignore[arg-type]


def test_a_base_written_under_a_copied_page_still_gives_a_delta_that_applies() -> None:
    """The base was written after its table was taken, on a page the new state changes
    too: the page is copied whole, so the delta is right for that base, and its checksum
    must be the base's own (not the table's plus the change). The advanced table's
    checksum is then unknown; the next create sums every page and sets it again."""
    rng = np.random.default_rng(8)
    taken = rng.integers(0, 256, (3 << 20) + 5, dtype=np.uint8)
    table = PageFingerprints.of(taken)
    base = taken.copy()
    base[7 * PAGE + 3] ^= 0x40  # written after the table
    new = base.copy()
    new[7 * PAGE : 8 * PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    new[-2] ^= 1
    delta = DeltaSnapshot.create(AGENT, base, new, 1, 2, fingerprints=table)
    assert delta.checksum == simple_checksum(new)
    target = bytearray(base.tobytes())
    delta.apply(target)
    assert target == new.tobytes()
    assert table.checksum is None and table.values.tolist() == PageFingerprints.of(new).values.tolist()
    later = new.copy()
    later[PAGE] ^= 1
    delta = DeltaSnapshot.create(AGENT, new, later, 2, 3, fingerprints=table)
    delta.apply(target)
    assert target == later.tobytes()
    assert table == PageFingerprints.of(later)  # the checksum known again


def test_a_table_with_a_wrong_checksum_gives_a_delta_apply_refuses() -> None:
    """Create adds the copies' change to the table's checksum: a wrong one (a table from
    parts) makes a delta whose checksum is not its state's, which apply refuses whole."""
    base = np.random.default_rng(4).integers(0, 256, 1 << 20, dtype=np.uint8)
    taken = PageFingerprints.of(base)
    table = PageFingerprints(taken.size, taken.values, (taken.checksum or 0) ^ 1)
    new = base.copy()
    new[3 * PAGE] ^= 1
    delta = DeltaSnapshot.create(AGENT, base, new, 1, 2, fingerprints=table)
    assert delta.checksum != simple_checksum(new)
    target = bytearray(base.tobytes())
    with pytest.raises(InvalidStateError, match="hecksum"):
        delta.apply(target)
    assert target == base.tobytes()


def test_a_pickled_or_copied_table_is_the_same_and_read_only() -> None:
    table = PageFingerprints.of(np.arange(3 * PAGE + 5, dtype=np.uint8))
    for other in (pickle.loads(pickle.dumps(table)), copy.deepcopy(table), copy.copy(table)):
        assert other == table and other.checksum == table.checksum
        assert not other.values.flags.writeable
    without = pickle.loads(pickle.dumps(PageFingerprints(table.size, table.values)))
    assert without.checksum is None and without.values.tolist() == table.values.tolist()


def test_page_fingerprints_of_any_buffer() -> None:
    data = np.random.default_rng(1).integers(0, 256, 5 * PAGE + 17, dtype=np.uint8)
    table = PageFingerprints.of(memoryview(data.tobytes()))
    assert table.size == len(data) and len(table) == 6
    assert table.values.tolist() == _table(data).tolist()
    assert table == PageFingerprints(len(data), _table(data), simple_checksum(data))
    assert table != PageFingerprints(len(data), _table(data))  # a checksum unknown
    assert table != PageFingerprints.of(data[:-1])
    assert len(PageFingerprints.of(b"")) == 0
    assert PageFingerprints.of(data, threads=1) == table
    assert "pages=6" in repr(table)


@pytest.mark.parametrize("env", [{"CELLMIGRATE_PURE_PYTHON": "1"}, {"CELLMIGRATE_XXH3_PYTHON": "1"}])
def test_create_with_fingerprints_without_the_compiled_pass(env: Dict[str, str]) -> None:
    """Without the compiled kernels, or with XXH3 left unbound, tables are taken in Python
    and create compares both states and advances the table from the pages it found: the
    same delta and table."""
    code = (
        "import numpy as np, cellmigrate as cm\n"
        "rng = np.random.default_rng(2)\n"
        "old = rng.integers(0, 256, 40 * 4096 + 5, dtype=np.uint8); new = old.copy()\n"
        "new[[3, 4096 * 7 + 1, len(new) - 1]] ^= 1\n"
        "t = cm.PageFingerprints.of(old)\n"
        "d = cm.DeltaSnapshot.create(bytes(16), old, new, 1, 2, fingerprints=t)\n"
        "assert [p.index for p in d.dirty_pages] == [0, 7, 40]\n"
        "assert t == cm.PageFingerprints.of(new)\n"
        "b = bytearray(old.tobytes()); d.apply(b); assert b == new.tobytes()\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("algorithm", ["xxh3_128_tree", None, "blake3"])
def test_tracker_keeps_its_table_with_the_committed_state(algorithm: Optional[str]) -> None:
    """The tracker diffs by the committed state's fingerprints (default digest or none):
    through commits, a pending delta replaced or discarded, an acknowledged one and a
    resize, every delta applies on the receiver's copy and the table (when kept) is the
    committed state's."""
    rng = np.random.default_rng(12)
    state = rng.integers(0, 256, (2 << 20) + 300, dtype=np.uint8)
    tracker = DirtyPageTracker(AGENT, len(state))
    tracker.initialize(state)
    receiver = bytearray(state.tobytes())

    def edit(count: int) -> None:
        for page in rng.choice(-(-len(state) // PAGE), count, replace=False).tolist():
            state[min(page * PAGE + int(rng.integers(0, PAGE)), len(state) - 1)] ^= 0x81

    def check_table() -> None:
        table = tracker._fingerprints
        if algorithm != "xxh3_128_tree":
            assert table is None  # a sequential digest, or none, compares both states
        else:
            assert table == PageFingerprints.of(tracker.committed_state())

    for round_ in range(3):
        edit(15)
        tracker.create_delta(state, digest=algorithm).apply(receiver)
        assert receiver == state.tobytes()
        check_table()
    edit(5)
    lost = tracker.create_delta(state, digest=algorithm, commit=False)
    edit(5)
    sent = tracker.create_delta(state, digest=algorithm, commit=False)  # replaces the lost one
    assert lost.base_sequence == sent.base_sequence
    check_table()  # nothing committed: the table still describes the committed state
    sent.apply(receiver)
    tracker.acknowledge(sent.sequence)
    check_table()
    edit(5)
    tracker.create_delta(state, digest=algorithm, commit=False)
    tracker.discard()
    grown = np.concatenate([state, rng.integers(0, 256, 5000, dtype=np.uint8)])
    tracker.create_delta(grown, digest=algorithm, resize=True).apply(receiver)
    assert receiver == grown.tobytes()
    assert tracker._fingerprints is None  # a resize drops the table: taken again when next needed
    grown[7] ^= 1
    tracker.create_delta(grown, digest=algorithm).apply(receiver)
    assert receiver == grown.tobytes()
    check_table()
