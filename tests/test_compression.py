"""Compression wrappers: RLE compatibility vectors, strict decoding, LZ4/zstd, adaptive choice."""

from __future__ import annotations

import os
import struct
from typing import Any

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import (
    CompressionMethod,
    CorruptDataError,
    CellError,
    adaptive_compress,
    adaptive_compress_aggressive,
    adaptive_decompress,
    dirty_pages,
    lz4_compress,
    lz4_decompress,
    simple_checksum,
    simple_compress,
    simple_decompress,
    zstd_compress,
    zstd_decompress,
)

from crate_vectors import RLE_VECTORS


@pytest.mark.parametrize("raw, packed", RLE_VECTORS)
def test_rle_matches_the_crate(raw: bytes, packed: bytes) -> None:
    assert simple_compress(raw) == packed
    assert simple_decompress(packed) == raw


runs = st.lists(
    st.tuples(st.sampled_from([0, 1, 0x7F, 0xFE, 0xFF, 0x41]), st.integers(1, 300)), max_size=40
).map(lambda rs: b"".join(bytes([b]) * n for b, n in rs))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=3000), runs))
def test_rle_round_trips(data: bytes) -> None:
    packed = simple_compress(data)
    assert simple_decompress(packed) == data
    assert simple_decompress(packed, max_output=len(data)) == data


@pytest.mark.parametrize("stream", [b"\xff", b"\xff\x05", b"ab\xff", b"ab\xff\x02"])
def test_rle_refuses_a_truncated_marker(stream: bytes) -> None:
    with pytest.raises(CorruptDataError, match="truncated"):
        simple_decompress(stream)


def test_rle_refuses_a_zero_count() -> None:
    with pytest.raises(CorruptDataError, match="zero run length"):
        simple_decompress(bytes.fromhex("61ff0041"))


def test_rle_max_output_bounds_a_hostile_stream() -> None:
    bomb = bytes.fromhex("ff7f00") * 1000  # 127,000 bytes from 3,000
    with pytest.raises(CorruptDataError, match="max_output"):
        simple_decompress(bomb, max_output=126_999)
    assert len(simple_decompress(bomb, max_output=127_000)) == 127_000
    with pytest.raises(ValueError):
        simple_decompress(bomb, max_output=-1)


def test_corrupt_data_error_is_both_cell_error_and_value_error() -> None:
    with pytest.raises(CellError):
        simple_decompress(b"\xff")
    with pytest.raises(ValueError):
        simple_decompress(b"\xff")


def test_compression_method_ids_and_labels() -> None:
    assert [int(m) for m in CompressionMethod] == [0, 1, 2, 3]
    assert [m.label for m in CompressionMethod] == ["RLE", "LZ4", "Zstd (default)", "Zstd (high)"]
    assert CompressionMethod(2) is CompressionMethod.ZSTD_DEFAULT
    with pytest.raises(ValueError):
        CompressionMethod(4)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=9000))
def test_lz4_is_the_size_prepended_block_format(data: bytes) -> None:
    packed = lz4_compress(data)
    assert struct.unpack_from("<i", packed)[0] == len(data)
    assert lz4.block.decompress(packed) == data
    assert lz4_decompress(packed) == data
    assert lz4_decompress(lz4.block.compress(data, store_size=True)) == data


def test_lz4_refuses_corrupt_and_oversized_frames() -> None:
    packed = lz4_compress(os.urandom(1000) * 4)
    with pytest.raises(CorruptDataError):
        lz4_decompress(packed[:3])
    with pytest.raises(CorruptDataError):
        lz4_decompress(packed[:-10])
    with pytest.raises(CorruptDataError, match="max_output"):
        lz4_decompress(packed, max_output=3999)
    with pytest.raises(CorruptDataError, match="negative"):
        lz4_decompress(struct.pack("<i", -5) + b"\x00")


@pytest.mark.parametrize("level", [1, 3, 10])
def test_zstd_round_trips_and_is_a_standard_frame(level: int) -> None:
    data = os.urandom(500) + bytes(5000) + b"xyz" * 100
    packed = zstd_compress(data, level)
    assert zstandard.ZstdDecompressor().decompress(packed) == data
    assert zstd_decompress(packed) == data


def test_zstd_reads_a_frame_without_content_size() -> None:
    data = b"streamed " * 1000
    cctx = zstandard.ZstdCompressor(write_content_size=False)
    packed = cctx.compress(data)
    assert zstandard.frame_content_size(packed) == -1
    assert zstd_decompress(packed) == data
    with pytest.raises(CorruptDataError, match="max_output"):
        zstd_decompress(packed, max_output=len(data) - 1)


def test_zstd_refuses_garbage_and_oversized_frames() -> None:
    with pytest.raises(CorruptDataError):
        zstd_decompress(b"not a zstd frame at all")
    packed = zstd_compress(bytes(10_000))
    with pytest.raises(CorruptDataError, match="max_output"):
        zstd_decompress(packed, max_output=9_999)
    with pytest.raises(CorruptDataError):
        zstd_decompress(packed[:-3])


def _sizes(data: bytes) -> dict:
    return {
        CompressionMethod.RLE: len(simple_compress(data)),
        CompressionMethod.LZ4: len(lz4_compress(data)),
        CompressionMethod.ZSTD_DEFAULT: len(zstd_compress(data, 3)),
        CompressionMethod.ZSTD_HIGH: len(zstd_compress(data, 10)),
    }


def _expected_choice(data: bytes, candidates: list) -> CompressionMethod:
    sizes = _sizes(data)
    best = candidates[0]
    for method in candidates[1:]:
        if sizes[method] < sizes[best]:
            best = method
    return best


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.binary(max_size=6000), runs, st.integers(0, 9000).map(bytes)))
def test_adaptive_choice_follows_the_size_rules(data: bytes) -> None:
    payload, method = adaptive_compress(data)
    if len(data) < 256:
        assert method is CompressionMethod.RLE
    elif len(data) < 4096:
        assert method is _expected_choice(data, [CompressionMethod.RLE, CompressionMethod.LZ4])
    else:
        assert method is _expected_choice(
            data, [CompressionMethod.RLE, CompressionMethod.LZ4, CompressionMethod.ZSTD_DEFAULT]
        )
    assert len(payload) == _sizes(data)[method]
    assert adaptive_decompress(payload, method) == data
    assert adaptive_decompress(payload, int(method)) == data


@settings(max_examples=40, deadline=None)
@given(st.one_of(st.binary(max_size=6000), runs))
def test_aggressive_tries_all_four(data: bytes) -> None:
    payload, method = adaptive_compress_aggressive(data)
    assert method is _expected_choice(data, list(CompressionMethod))
    assert adaptive_decompress(payload, method) == data


def test_adaptive_prefers_rle_on_ties_and_zstd_on_text() -> None:
    assert adaptive_compress(b"ab")[1] is CompressionMethod.RLE
    text = b"the quick brown fox jumps over the lazy dog. " * 400
    assert adaptive_compress(text)[1] in (CompressionMethod.LZ4, CompressionMethod.ZSTD_DEFAULT)
    assert adaptive_compress(text)[1] is _expected_choice(
        text, [CompressionMethod.RLE, CompressionMethod.LZ4, CompressionMethod.ZSTD_DEFAULT]
    )


def test_adaptive_decompress_rejects_unknown_methods_and_bounds_output() -> None:
    with pytest.raises(ValueError):
        adaptive_decompress(b"", 9)
    payload, method = adaptive_compress(bytes(100_000))
    with pytest.raises(CorruptDataError):
        adaptive_decompress(payload, method, max_output=99_999)


@pytest.mark.parametrize("call", [
    lambda: adaptive_decompress(b"", 0.0),  # an IntEnum lookup by hash took 0.0 for RLE
    lambda: adaptive_decompress(b"", False),
    lambda: adaptive_decompress(b"", "0"),
    lambda: simple_checksum(b"a", offset=1.5),  # "unsupported operand type(s) for &"
    lambda: simple_checksum(b"a", offset=0.0),  # the small-input fast path took it
    lambda: simple_checksum(b"a", offset=True),
], ids=["method 0.0", "method False", "method '0'", "offset 1.5", "offset 0.0", "offset True"])
def test_numbers_of_the_wrong_type_are_refused_by_name(call: Any) -> None:
    with pytest.raises(TypeError, match=r"^(method|offset) must be"):
        call()


def test_integer_like_arguments_still_work() -> None:
    assert simple_checksum(b"\x03", offset=np.int64(2)) == simple_checksum(b"\x03", offset=2) == 9
    assert adaptive_decompress(adaptive_compress(b"abc" * 50)[0], np.uint8(0)) == b"abc" * 50


def test_a_page_size_past_the_kernels_range_is_a_value_error() -> None:
    """dirty_pages(a, b, 2**63) raised a bare OverflowError from the C conversion."""
    for size in (2**63, 2**64 + 5):
        with pytest.raises(ValueError, match="page_size must be in 1 .. 2"):
            dirty_pages(b"ab", b"ab", size)
    assert dirty_pages(b"ab", b"ac", 2**62).tolist() == [0]
