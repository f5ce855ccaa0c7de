"""Kernel behaviour, run against both implementations (``impl``), and the public wrappers.

The compiled kernels are also cross-checked against the reference on generated inputs
here (default dispatch path) and in ``test_dispatch.py`` (every path).
"""

from __future__ import annotations

import mmap
import os
from types import ModuleType
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellmigrate
from cellmigrate import (
    CorruptDataError,
    InvalidStateError,
    PAGE_SIZE,
    dirty_pages,
    first_difference,
    simple_checksum,
    simple_compress,
    simple_decompress,
)
from cellmigrate import _kernels, _parallel, _reference
from cellmigrate.checksum import pages_checksum, state_pages_checksum
from cellmigrate.compare import dirty_pages_checksum

from conftest import BUFFER_KINDS, WRITABLE_KINDS, as_bytes, buffer_kind, writable_buffer
from crate_vectors import CHECKSUM_VECTORS, RLE_VECTORS
from kernel_strategies import aligned, each_path, offsets, old_new, payloads

M32 = 2**32

# --- compatibility vectors (issue 2 / the Rust crate) ----------------------------------


@pytest.mark.parametrize("data, expected", CHECKSUM_VECTORS)
def test_checksum_vectors(impl: ModuleType, data: bytes, expected: int) -> None:
    assert impl.checksum(data) == expected
    assert simple_checksum(data) == expected


@pytest.mark.parametrize("raw, packed", RLE_VECTORS)
def test_rle_vectors(impl: ModuleType, raw: bytes, packed: bytes) -> None:
    assert impl.rle_compress(raw) == packed
    assert impl.rle_decompress(packed) == raw


def test_checksum_weights_wrap_modulo_2_32(impl: ModuleType) -> None:
    # weights (2**32 - 1), 0 (wrapped), 1 -> 2**32 - 1 + 0 + 1 = 0 mod 2**32
    assert impl.checksum(b"\x01\x01\x01", M32 - 2) == 0
    assert impl.checksum(b"\x02", M32 - 1) == 0
    assert impl.checksum(b"\x00\x03", M32 - 1) == 3
    assert impl.checksum(b"\x05", 2**64 - 1) == 0


def test_checksum_positioned_form(impl: ModuleType) -> None:
    assert impl.checksum(b"\x03", 2) == 9
    assert simple_checksum(b"\x03", offset=2) == 9
    with pytest.raises(ValueError):
        simple_checksum(b"\x03", offset=-1)


@settings(max_examples=300, deadline=None)
@given(payloads, st.data())
def test_checksum_slices_add_up(impl: ModuleType, data: bytes, draw: st.DataObject) -> None:
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=4)))
    bounds = [0] + cuts + [len(data)]
    parts = sum(impl.checksum(data[a:b], a) for a, b in zip(bounds, bounds[1:]))
    assert parts % M32 == impl.checksum(data)


# --- cross-checks of compiled vs reference (default dispatch path) ----------------------


@settings(max_examples=1500, deadline=None)
@given(aligned(), offsets)
def test_compiled_checksum_matches_reference(view_raw: Tuple[memoryview, bytes], offset: int) -> None:
    view, raw = view_raw
    assert _kernels.checksum(view, offset) == _reference.checksum(raw, offset)


@settings(max_examples=1000, deadline=None)
@given(aligned())
def test_compiled_rle_matches_reference(view_raw: Tuple[memoryview, bytes]) -> None:
    view, raw = view_raw
    packed = _kernels.rle_compress(view)
    assert packed == _reference.rle_compress(raw)
    assert _kernels.rle_decompress(packed) == raw
    assert _kernels.rle_decompress(packed, len(raw)) == raw


@settings(max_examples=1000, deadline=None)
@given(old_new(), offsets)
def test_compiled_comparisons_match_reference(case: Tuple[bytes, bytes, int], offset: int) -> None:
    old, new, page_size = case
    expected = _reference.dirty_pages(old, new, page_size)
    assert _kernels.dirty_pages(old, new, page_size).tolist() == expected.tolist()
    pages, checksum = _kernels.dirty_pages_checksum(old, new, page_size, offset)
    assert pages.dtype == np.int64 and pages.tolist() == expected.tolist()
    assert checksum == _reference.checksum(new, offset)
    assert _kernels.first_difference(old, new) == _reference.first_difference(old, new)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.integers(-1, 400))
def test_compiled_decoder_matches_reference_on_arbitrary_streams(stream: bytes, bound: int) -> None:
    # Any byte string: both accept it with the same output, or both refuse it the same way.
    outcomes = []
    for module in (_kernels, _reference):
        try:
            outcomes.append(("ok", module.rle_decompress(stream, bound)))
        except CorruptDataError as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]


# --- strict RLE decoding --------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream, offset",
    [(b"\xff", 0), (b"\xff\x05", 0), (b"ab\xff", 2), (b"ab\xff\x02", 2), (bytes.fromhex("ff0341ff"), 3)],
)
def test_truncated_marker(impl: ModuleType, stream: bytes, offset: int) -> None:
    with pytest.raises(CorruptDataError, match=f"RLE stream truncated: marker at offset {offset} needs two more bytes"):
        impl.rle_decompress(stream)


def test_zero_count(impl: ModuleType) -> None:
    with pytest.raises(CorruptDataError, match="RLE marker at offset 1 has a zero run length"):
        impl.rle_decompress(bytes.fromhex("61ff0041"))


def test_max_output(impl: ModuleType) -> None:
    bomb = bytes.fromhex("ff7f00") * 100
    with pytest.raises(CorruptDataError, match="RLE output exceeds max_output of 12699 bytes"):
        impl.rle_decompress(bomb, 12699)
    assert impl.rle_decompress(bomb, 12700) == bytes(12700)
    with pytest.raises(CorruptDataError, match="max_output of 2"):
        impl.rle_decompress(b"abc", 2)
    assert impl.rle_decompress(b"abc", 3) == b"abc"
    assert impl.rle_decompress(b"", 0) == b""


def test_decoding_errors_come_in_stream_order(impl: ModuleType) -> None:
    # the bound is passed before the truncated marker at the end is reached
    with pytest.raises(CorruptDataError, match="max_output"):
        impl.rle_decompress(bytes.fromhex("ff7f00") * 3 + b"\xff", 200)
    # the zero count comes before the bound would be passed
    with pytest.raises(CorruptDataError, match="zero run length"):
        impl.rle_decompress(bytes.fromhex("ff0000") + bytes.fromhex("ff7f00") * 3, 200)


def test_marker_bytes_may_be_0xff(impl: ModuleType) -> None:
    assert impl.rle_decompress(bytes.fromhex("ffffff")) == b"\xff" * 255
    assert impl.rle_compress(b"\xff" * 255) == bytes.fromhex("ff7fffff7fffff01ff")


# --- comparison kernels -------------------------------------------------------------------


def test_dirty_pages_short_last_page(impl: ModuleType) -> None:
    old = bytes(3 * 4096 + 10)
    new = bytearray(old)
    new[4096] = 1
    new[-1] = 2
    assert impl.dirty_pages(old, bytes(new), 4096).tolist() == [1, 3]
    pages, checksum = impl.dirty_pages_checksum(old, bytes(new), 4096, 0)
    assert pages.tolist() == [1, 3]
    assert checksum == (1 * 4097 + 2 * len(old)) % M32
    assert impl.dirty_pages(old, old, 4096).tolist() == []
    assert impl.dirty_pages(b"", b"", 4096).tolist() == []
    assert impl.dirty_pages_checksum(b"", b"", 4096, 0)[0].tolist() == []


def test_comparison_argument_errors(impl: ModuleType) -> None:
    with pytest.raises(ValueError):
        impl.dirty_pages(b"ab", b"abc", 4096)
    with pytest.raises(ValueError):
        impl.dirty_pages_checksum(b"ab", b"abc", 4096, 0)
    with pytest.raises(ValueError):
        impl.first_difference(b"ab", b"abc")
    with pytest.raises(ValueError):
        impl.dirty_pages(b"ab", b"ab", 0)


def test_first_difference(impl: ModuleType) -> None:
    a = bytes(10000)
    for k in (0, 1, 4095, 4096, 9999):
        b = bytearray(a)
        b[k] = 7
        assert impl.first_difference(a, bytes(b)) == k
    assert impl.first_difference(a, a) is None
    assert impl.first_difference(b"", b"") is None


# --- page helpers --------------------------------------------------------------------------


def test_page_checksums_predict_a_patched_state(impl: ModuleType) -> None:
    rng = np.random.default_rng(5)
    base = rng.integers(0, 256, 5 * 4096 + 123, dtype=np.uint8).tobytes()
    idx = [0, 3, 5]
    pages = [rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for _ in idx[:-1]] + [b"\x09" * 123]
    patched = bytearray(base)
    impl.scatter_pages(patched, idx, pages, 4096)
    predicted = (
        impl.checksum(base) - impl.state_pages_checksum(base, idx, 4096) + impl.pages_checksum(pages, idx, 4096)
    ) % M32
    assert predicted == impl.checksum(bytes(patched))
    assert impl.gather_pages(bytes(patched), idx, 4096) == pages
    assert impl.state_pages_checksum(base, np.asarray(idx, dtype=np.int64), 4096) == impl.state_pages_checksum(
        base, idx, 4096
    )
    assert impl.pages_checksum([], [], 4096) == 0


@pytest.mark.parametrize("misalign", [0, 3, 16])
def test_big_scatters_stream_the_same_bytes_on_every_path(misalign: int) -> None:
    """From 4 MiB of pages on, scatter_pages writes with streaming stores (x86): the
    result is the reference's on every dispatch path, whatever the target's alignment,
    with a short last page and the bytes between pages untouched."""
    rng = np.random.default_rng(misalign)
    size = 2000 * 4096 + 1000
    base = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    idx = np.sort(rng.choice(2000, 1300, replace=False)).astype(np.int64).tolist() + [2000]
    pages = [rng.integers(0, 256, 4096, dtype=np.uint8).tobytes() for _ in idx[:-1]] + [b"\x07" * 1000]
    want = bytearray(base)
    _reference.scatter_pages(want, idx, pages, 4096)
    for _ in each_path():
        holder = bytearray(misalign + size)
        target = memoryview(holder)[misalign:]
        target[:] = base
        _kernels.scatter_pages(target, idx, pages, 4096)
        assert target == want


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_scatter_writes_only_the_lines_a_mask_names(data: st.DataObject) -> None:
    """With line masks (from overlay_leaves) scatter_pages writes the 64-byte lines whose
    bit is set and nothing else (every bit: the whole page, also past 64 lines or
    streamed), on every dispatch path, as the reference does."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    npages = data.draw(st.integers(1, 24))
    big = data.draw(st.booleans())  # enough whole pages to take the streaming stores
    count = 1100 if big else npages
    size = count * 4096 - data.draw(st.integers(0, 4095))
    base = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
    idx = np.sort(rng.choice(count, data.draw(st.integers(0, min(count, 20))) if not big else 1050,
                             replace=False)).astype(np.int64)
    pages = [rng.integers(0, 256, min(4096, size - int(i) * 4096), dtype=np.uint8).tobytes() for i in idx]
    choices = st.sampled_from([0, _reference.LINES_ALL, 1, 1 << 63, 0b1011])
    masks = np.array([data.draw(choices) if k < 20 else _reference.LINES_ALL for k in range(len(idx))]
                     + [], dtype=np.uint64) if len(idx) else np.zeros(0, dtype=np.uint64)
    if len(idx) and data.draw(st.booleans()):
        masks[:] = rng.integers(0, 2**63, len(idx), dtype=np.uint64) << np.uint64(1)
    want = bytearray(base)
    _reference.scatter_pages(want, idx, pages, 4096, masks.tolist())
    for k, i in enumerate(idx.tolist()):  # what the reference did, line by line
        for j in range(64):
            line = slice(i * 4096 + 64 * j, min(i * 4096 + 64 * j + 64, i * 4096 + len(pages[k])))
            src = pages[k][64 * j : 64 * j + 64] if int(masks[k]) >> j & 1 else base[line]
            assert want[line] == src
    for _ in each_path():
        target = bytearray(base)
        _kernels.scatter_pages(target, idx, pages, 4096, masks)
        assert target == want
    with pytest.raises(ValueError):
        _kernels.scatter_pages(bytearray(base), idx, pages, 4096, np.zeros(len(idx) + 1, dtype=np.uint64))


def test_page_helper_errors_and_atomicity(impl: ModuleType) -> None:
    state = bytes(range(256)) * 40  # 10240 bytes: pages 0, 1, 2 (short)
    with pytest.raises(IndexError):
        impl.gather_pages(state, [0, 3], 4096)
    with pytest.raises(IndexError):
        impl.gather_pages(state, [-1], 4096)
    with pytest.raises(IndexError):
        impl.state_pages_checksum(state, [3], 4096)
    with pytest.raises(ValueError):
        impl.pages_checksum([b"x"], [1, 2], 4096)
    with pytest.raises(IndexError):
        impl.pages_checksum([b"x"], [-1], 4096)
    target = bytearray(state)
    # the first page would fit, the second not: nothing may be written
    with pytest.raises(IndexError):
        impl.scatter_pages(target, [0, 2], [b"\1" * 4096, b"\1" * 4096], 4096)
    with pytest.raises(ValueError):
        impl.scatter_pages(target, [0, 1], [b"\1" * 4096, b"\1" * 4097], 4096)
    with pytest.raises(ValueError):
        impl.scatter_pages(target, [0], [b"\1", b"\1"], 4096)
    assert target == state
    impl.scatter_pages(target, [2], [b"\1" * (10240 - 8192)], 4096)
    assert target[8192:] == b"\1" * 2048 and target[:8192] == state[:8192]


@pytest.mark.parametrize("kind", WRITABLE_KINDS)
def test_scatter_into_every_writable_kind(impl: ModuleType, kind: str) -> None:
    target = writable_buffer(bytes(3 * 4096), kind)
    view = memoryview(target).cast("B")
    impl.scatter_pages(view, [1], [b"\x05" * 4096], 4096)
    assert as_bytes(target) == bytes(4096) + b"\x05" * 4096 + bytes(4096)


def test_scatter_refuses_a_read_only_target() -> None:
    with pytest.raises((TypeError, ValueError, BufferError)):
        _kernels.scatter_pages(bytes(4096), [0], [b"x"], 4096)


# --- buffers ----------------------------------------------------------------------------------


SAMPLE = (bytes(range(256)) * 40 + b"\xff" * 300 + bytes(5000))[:13000]


@pytest.mark.parametrize("kind", BUFFER_KINDS)
def test_public_kernels_accept_every_buffer_kind(kind: str) -> None:
    other = bytearray(SAMPLE)
    other[9000] ^= 1
    data, changed = buffer_kind(SAMPLE, kind), buffer_kind(bytes(other), kind)
    assert simple_checksum(data) == _reference.checksum(SAMPLE)
    assert simple_checksum(data, offset=12345) == _reference.checksum(SAMPLE, 12345)
    assert simple_compress(data) == _reference.rle_compress(SAMPLE)
    assert simple_decompress(buffer_kind(simple_compress(SAMPLE), kind)) == SAMPLE
    assert first_difference(data, changed) == 9000
    assert dirty_pages(data, changed).tolist() == [2]
    pages, checksum = dirty_pages_checksum(data, changed)
    assert pages.tolist() == [2] and checksum == _reference.checksum(bytes(other))
    assert state_pages_checksum(data, [1]) == _reference.checksum(SAMPLE[4096:8192], 4096)
    assert pages_checksum([buffer_kind(SAMPLE[:10], kind)], [2]) == _reference.checksum(SAMPLE[:10], 8192)


@pytest.mark.parametrize("kind", BUFFER_KINDS)
def test_empty_inputs_of_every_kind(kind: str) -> None:
    empty = buffer_kind(b"", kind)
    assert simple_checksum(empty) == 0
    assert simple_compress(empty) == b""
    assert simple_decompress(empty) == b""
    assert first_difference(empty, buffer_kind(b"", kind)) is None
    assert dirty_pages(empty, buffer_kind(b"", kind)).tolist() == []


def test_compiled_kernels_take_read_only_buffers_without_copying() -> None:
    ro_numpy = np.frombuffer(SAMPLE, dtype=np.uint8)
    ro_mmap = buffer_kind(SAMPLE, "mmap-readonly")
    for buf in (SAMPLE, ro_numpy, ro_mmap, memoryview(SAMPLE)):
        assert _kernels.checksum(buf) == _reference.checksum(SAMPLE)
        assert _kernels.rle_compress(buf) == _reference.rle_compress(SAMPLE)
        assert _kernels.dirty_pages(buf, buf, 4096).tolist() == []


def test_non_contiguous_input_is_refused_not_copied() -> None:
    strided = np.arange(200, dtype=np.uint8)[::2]
    for call in (
        lambda: simple_checksum(strided),
        lambda: simple_compress(strided),
        lambda: simple_decompress(strided),
        lambda: first_difference(strided, strided),
        lambda: dirty_pages(strided, strided),
        lambda: dirty_pages_checksum(strided, strided),
    ):
        with pytest.raises(ValueError, match="C-contiguous"):
            call()
    # the compiled kernels refuse it on their own too (Cython raises BufferError)
    with pytest.raises((ValueError, BufferError)):
        _kernels.checksum(memoryview(bytes(200))[::2])
    fortran = np.asfortranarray(np.arange(64, dtype=np.uint8).reshape(8, 8))
    with pytest.raises(ValueError, match="C-contiguous"):
        simple_checksum(fortran)
    with pytest.raises(TypeError):
        simple_checksum("not bytes")


def test_public_comparisons_need_equal_sizes() -> None:
    with pytest.raises(InvalidStateError):
        first_difference(b"ab", b"abc")
    with pytest.raises(InvalidStateError):
        dirty_pages(b"ab", b"abc")
    with pytest.raises(InvalidStateError):
        dirty_pages_checksum(b"ab", b"abc")
    with pytest.raises(ValueError):
        dirty_pages(b"ab", b"ab", page_size=0)


# --- threads ------------------------------------------------------------------------------------


@pytest.fixture
def tiny_split(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Make calls split small inputs (the planned threads, and the kernels' claims of 1000
    bytes), so the threaded paths run on test-sized states."""
    monkeypatch.setattr(_parallel, "PARALLEL_MIN_BYTES", 1)
    monkeypatch.setattr(_parallel, "_MIN_SPAN", 1000)
    monkeypatch.setattr(_parallel, "_CPUS", 4)  # threads whatever the machine has
    monkeypatch.delenv("CELLMIGRATE_THREADS", raising=False)
    before = _kernels._set_claim_bytes(1000)
    yield
    _kernels._set_claim_bytes(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(old_new(), st.sampled_from([None, 1, 2, 3, 8]))
def test_results_do_not_depend_on_threads(tiny_split: None, case: Tuple[bytes, bytes, int], threads: Any) -> None:
    old, new, page_size = case
    assert simple_checksum(new, threads=threads) == _reference.checksum(new)
    assert simple_checksum(new, offset=M32 - 5, threads=threads) == _reference.checksum(new, M32 - 5)
    assert dirty_pages(old, new, page_size, threads=threads).tolist() == _reference.dirty_pages(
        old, new, page_size
    ).tolist()
    pages, checksum = dirty_pages_checksum(old, new, page_size, threads=threads)
    assert pages.tolist() == _reference.dirty_pages(old, new, page_size).tolist()
    assert checksum == _reference.checksum(new)
    assert first_difference(old, new, threads=threads) == _reference.first_difference(old, new)


def test_plan_splits_on_page_boundaries(tiny_split: None) -> None:
    spans = _parallel.plan(10 * 4096 + 5, 4, 4096)
    assert spans[0][0] == 0 and spans[-1][1] == 10 * 4096 + 5
    assert all(a % 4096 == 0 for a, _ in spans)
    assert all(e == s2 for (_, e), (s2, _) in zip(spans, spans[1:]))
    assert _parallel.plan(10 * 4096, 1, 4096) == [(0, 10 * 4096)]


def test_threads_argument_and_env_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError):
        simple_checksum(b"x", threads=0)
    for odd in (1.5, 1.0, True):  # only ints, whatever the size of the input
        with pytest.raises(TypeError):
            simple_checksum(b"x", threads=odd)  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            dirty_pages(b"x", b"y", threads=odd)  # type: ignore[arg-type]
    for kernel in (_kernels, _reference):
        with pytest.raises(ValueError, match="threads"):
            kernel.checksum(b"x", 0, 0)
    with pytest.raises(TypeError):
        _reference.checksum(b"x", 0, 2.0)
    monkeypatch.setenv("CELLMIGRATE_THREADS", "1")
    assert _parallel.max_threads() == 1
    monkeypatch.setenv("CELLMIGRATE_THREADS", "64")
    assert _parallel.max_threads() == (os.cpu_count() or 1)
    monkeypatch.setenv("CELLMIGRATE_THREADS", "zero")
    with pytest.raises(ValueError, match="CELLMIGRATE_THREADS"):
        _parallel.max_threads()


def test_page_size_must_be_a_positive_int() -> None:
    with pytest.raises(TypeError):
        dirty_pages(b"ab", b"ab", page_size=4096.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dirty_pages_checksum(b"ab", b"ab", page_size=-1)


# --- states over 4 GiB ------------------------------------------------------------------------


@pytest.mark.large
def test_sparse_state_over_4_gib() -> None:
    size = 5 * 2**30 + 7
    # np.zeros maps untouched pages to the shared zero page: reading them costs no RAM.
    state = np.zeros(size, dtype=np.uint8)
    marks = {0: 1, 2**32 - 2: 2, 2**32 - 1: 3, 2**32: 4, 2**32 + 4095: 5, size - 1: 6}
    for position, value in marks.items():
        state[position] = value
    # Analytic: each set byte times its wrapped weight (position + 1) mod 2**32.
    expected = sum(v * ((p + 1) % M32) for p, v in marks.items()) % M32
    assert simple_checksum(state) == expected
    assert simple_checksum(state, threads=1) == expected
    assert simple_checksum(state, offset=3) == (expected + 3 * sum(marks.values())) % M32
    other = np.zeros(size, dtype=np.uint8)
    other[2**32] = 4
    other[0] = 1
    pages, checksum = dirty_pages_checksum(other, state)
    assert checksum == expected
    assert pages.tolist() == sorted({p // PAGE_SIZE for p in marks if p not in (0, 2**32)})
    assert first_difference(other, state) == 2**32 - 2
    packed = simple_compress(state[2**32 - 8 : 2**32 + 8])
    assert simple_decompress(packed) == state[2**32 - 8 : 2**32 + 8].tobytes()
