"""Page-encoding kernels (zero pages, XOR + zero-run "XZR"): compiled vs the reference.

The compiled batch kernels (``encode_pages``, ``check_pages``) and the single-page
``xzr_encode`` / ``xzr_decode`` must agree byte for byte with ``cellmigrate._reference``
on random pages, sparse edits, all-zero and all-equal pages, short last pages and bases
of another length, on every dispatch path; decoding is strict and never writes outside
its page, whatever the input.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from pathlib import Path
from types import ModuleType
from typing import List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import CorruptDataError
from cellmigrate import _kernels, _reference

from kernel_strategies import each_path

PAGE = 4096
ALL = 0xF  # raw, RLE, zero, XZR
CRATE = 0x3  # raw, RLE: what a checksum-only (crate-compatible) delta may use
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _edit_page(rng: random.Random, page: bytes, style: str) -> bytes:
    n = len(page)
    out = bytearray(page)
    if style == "sparse":  # a few scattered bytes
        for _ in range(rng.randrange(1, 12)):
            out[rng.randrange(n)] = rng.randrange(256)
    elif style == "block":  # one run of random bytes at a random offset (issue 12's workload)
        length = rng.randrange(1, min(n, 200) + 1)
        start = rng.randrange(n - length + 1)
        out[start : start + length] = rng.randbytes(length)
    elif style == "counters":  # int64 counters incremented
        arr = np.frombuffer(bytes(out[: n - n % 8]), dtype="<i8").copy()
        arr[:: rng.randrange(1, 9)] += rng.randrange(1, 4)
        out[: len(arr) * 8] = arr.tobytes()
    elif style == "random":
        out[:] = rng.randbytes(n)
    elif style == "zeros":
        out[:] = bytes(n)
    elif style == "run":
        out[:] = bytes([rng.randrange(256)]) * n
    elif style == "gaps":  # literals separated by gaps of 1..4 equal bytes (the split rule)
        pos = rng.randrange(4)
        while pos < n:
            out[pos] ^= rng.randrange(1, 256)
            pos += rng.randrange(1, 6)
    # "same": unchanged
    return bytes(out)


STYLES = ("sparse", "block", "counters", "random", "zeros", "run", "gaps", "same")


@st.composite
def states(draw: st.DrawFn) -> Tuple[bytes, bytes, List[int]]:
    """``(old, new, dirty indices)``: new has pages edited in every style; old may be
    shorter or longer than new (deltas between states of different sizes)."""
    seed = draw(st.integers(0, 2**32))
    rng = random.Random(seed)
    npages = draw(st.integers(0, 6))
    tail = draw(st.sampled_from([0, 0, 1, 7, 100, 4095]))
    size = npages * PAGE + tail
    base_kind = draw(st.sampled_from(["random", "zeros", "counters"]))
    if base_kind == "random":
        base = rng.randbytes(size)
    elif base_kind == "zeros":
        base = bytes(size)
    else:
        base = np.arange(size // 8 + 1, dtype="<i8").tobytes()[:size]
    new = bytearray(base)
    count = -(-size // PAGE)
    for i in range(count):
        style = draw(st.sampled_from(STYLES))
        new[i * PAGE : (i + 1) * PAGE] = _edit_page(rng, bytes(new[i * PAGE : (i + 1) * PAGE]), style)
    old = base
    resize = draw(st.sampled_from(["same", "same", "shorter", "longer"]))
    if resize == "shorter" and old:
        old = old[: rng.randrange(len(old))]
    elif resize == "longer":
        old = old + rng.randbytes(rng.randrange(1, 2 * PAGE))
    indices = sorted(draw(st.sets(st.integers(0, max(count - 1, 0)), max_size=count))) if count else []
    return old, bytes(new), indices


def _pages_of(data: bytes, indices: List[int]) -> List[bytes]:
    return [data[i * PAGE : (i + 1) * PAGE] for i in indices]


# --------------------------------------------------------------------------------------
# single pages


def test_xzr_examples() -> None:
    base = bytes(range(256)) * 16
    new = bytearray(base)
    new[300:364] = bytes(b ^ 0x5A for b in new[300:364])
    stream = _kernels.xzr_encode(bytes(new), base)
    # varint 300 (2 bytes), varint 64, then the 64 XOR bytes (all 0x5A); nothing after.
    assert stream == bytes([0xAC, 0x02, 64]) + b"\x5a" * 64
    assert _reference.xzr_encode(bytes(new), base) == stream
    assert _kernels.xzr_decode(stream, base, PAGE) == bytes(new)
    assert _kernels.xzr_encode(base, base) == b""
    # Gaps of 1 and 2 equal bytes stay inside the literal; a gap of 3 starts a new pair.
    new = bytearray(base)
    new[10] ^= 1
    new[12] ^= 1  # gap 1
    new[15] ^= 1  # gap 2
    new[19] ^= 1  # gap 3
    assert _kernels.xzr_encode(bytes(new), base) == bytes([10, 6, 1, 0, 1, 0, 0, 1, 3, 1, 1])
    # Equal bytes at the end of the page are implicit, even fewer than 3.
    new = bytearray(base)
    new[PAGE - 3] ^= 0xFF
    assert _kernels.xzr_encode(bytes(new), base) == bytes([0xFD, 0x1F, 1, 0xFF])


@SETTINGS
@given(st.data())
def test_xzr_single_page_matches_reference(data: st.DataObject) -> None:
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    length = data.draw(st.sampled_from([1, 2, 3, 4, 5, 31, 32, 33, 64, 100, 4095, PAGE]))
    base = rng.randbytes(length) if data.draw(st.booleans()) else bytes(length)
    new = _edit_page(rng, base, data.draw(st.sampled_from(STYLES)))
    base_given = base[: data.draw(st.integers(0, length))] if data.draw(st.booleans()) else base
    want = _reference.xzr_encode(new, base_given)
    for path in each_path():
        assert _kernels.xzr_encode(new, base_given) == want, path
    assert _kernels.xzr_decode(want, base_given, length) == new
    assert _reference.xzr_decode(want, base_given, length) == new


XZR_CORRUPT = [
    (b"\x80", "varint of the pair at offset 0 is cut short"),
    (b"\x00", "varint of the pair at offset 0 is cut short"),
    (b"\x00\x01", "literal of the pair at offset 0 is cut short"),
    (b"\x00\x00", "pair at offset 0 has a zero literal length"),
    (b"\x80\x00\x01\x07", "varint in the pair at offset 0 is overlong"),
    (b"\xff\xff\xff\xff\xff\x01\x01\x07", "varint in the pair at offset 0 is overlong"),
    (b"\x00\x01\x07\x80\x20\x01\x07", "pair at offset 3 runs past the end of the 4096-byte page"),
    (b"\xff\x1f\x02\x01\x01", "pair at offset 0 runs past the end"),
    (b"\x00\x81\x20" + bytes(4097), "pair at offset 0 runs past the end"),
    (b"\x00\x01\x07\x00", "varint of the pair at offset 3 is cut short"),
]


@pytest.mark.parametrize("stream, fragment", XZR_CORRUPT)
def test_xzr_decode_refuses_malformed_streams(impl: ModuleType, stream: bytes, fragment: str) -> None:
    with pytest.raises(CorruptDataError) as info:
        impl.xzr_decode(stream, bytes(PAGE), PAGE)
    assert fragment in str(info.value)


@SETTINGS
@given(stream=st.binary(max_size=64), length=st.integers(0, 70), base=st.binary(max_size=80))
def test_xzr_decoders_agree_on_arbitrary_streams(stream: bytes, length: int, base: bytes) -> None:
    try:
        want = _reference.xzr_decode(stream, base, length)
    except CorruptDataError as exc:
        with pytest.raises(CorruptDataError) as info:
            _kernels.xzr_decode(stream, base, length)
        assert str(info.value) == str(exc)
        return
    got = _kernels.xzr_decode(stream, base, length)
    assert got == want and len(got) == length


# --------------------------------------------------------------------------------------
# batches


def _reference_best(old: bytes, new: bytes, indices: List[int], allowed: int) -> List[Tuple[int, bytes]]:
    """The choice rule spelled out: smallest allowed candidate, ties to the earlier."""
    out = []
    for i in indices:
        page = new[i * PAGE : (i + 1) * PAGE]
        base = (old[i * PAGE : i * PAGE + len(page)] + bytes(len(page)))[: len(page)]
        candidates = [(0, page)]
        if allowed & 2:
            candidates.append((1, _reference.rle_compress(page)))
        if allowed & 4 and page == bytes(len(page)):
            candidates.append((2, b""))
        if allowed & 8:
            candidates.append((3, _reference.xzr_encode(page, base)))
        best = candidates[0]
        for c in candidates[1:]:
            if len(c[1]) < len(best[1]):
                best = c
        out.append(best)
    return out


@SETTINGS
@given(case=states(), allowed=st.sampled_from([ALL, CRATE, 0x1, 0x9, 0x5]))
def test_encode_pages_matches_reference_on_every_path(case: Tuple[bytes, bytes, List[int]], allowed: int) -> None:
    old, new, indices = case
    want_enc, want_off, want_chk, want_payload = _reference.encode_pages(old, new, indices, PAGE, allowed)
    expected = _reference_best(old, new, indices, allowed)
    assert want_enc.tolist() == [e for e, _ in expected]
    assert want_payload == b"".join(s for _, s in expected)
    for path in each_path():
        enc, off, chk, payload = _kernels.encode_pages(old, new, indices, PAGE, allowed)
        assert enc.dtype == np.uint8 and off.dtype == np.int64 and chk.dtype == np.uint32, path
        assert enc.tolist() == want_enc.tolist(), path
        assert off.tolist() == want_off.tolist(), path
        assert chk.tolist() == want_chk.tolist(), path
        assert payload == want_payload, path
        assert _kernels.stored_checks(payload, off).tolist() == chk.tolist(), path
        # The same pages given as separate buffers (what a scan copies) encode the same.
        listed = _kernels.encode_page_list(old, _pages_of(new, indices), indices, PAGE, allowed)
        assert [a.tolist() for a in listed[:3]] + [listed[3]] == [enc.tolist(), off.tolist(), chk.tolist(), payload]
    # Decoding the batch against old gives back new's pages, in both implementations.
    for impl in (_kernels, _reference):
        out = bytearray(len(indices) * PAGE)
        assert impl.check_pages(want_payload, want_off, want_enc, indices, len(new), PAGE, allowed,
                                base=old, out=out, checks=want_chk) == (0, 0, 0)
        assert impl.stored_checks(want_payload, want_off).tolist() == want_chk.tolist()
        for k, page in enumerate(_pages_of(new, indices)):
            assert bytes(out[k * PAGE : k * PAGE + len(page)]) == page
        assert impl.check_pages(want_payload, want_off, want_enc, indices, len(new), PAGE, allowed) == (0, 0, 0)


#: Page kinds of the threaded-encoder tests, each encoding best as a different choice.
_KINDS = ("zero", "runs", "edit", "random", "same")


def _kinds_state(kinds: List[str], seed: int, tail: int) -> Tuple[bytes, bytes]:
    """``old``/``new`` where page k of ``new`` is of kind ``kinds[k]`` against ``old``;
    ``tail`` > 0 cuts the last page to that many bytes (a state's short last page)."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, len(kinds) * PAGE, dtype=np.uint8)
    new = old.copy()
    rows = new.reshape(-1, PAGE)
    for k, kind in enumerate(kinds):
        if kind == "zero":
            rows[k] = 0
        elif kind == "runs":
            rows[k] = np.repeat(rng.integers(0, 256, 32, dtype=np.uint8), PAGE // 32)
        elif kind == "edit":
            at = int(rng.integers(0, PAGE - 64))
            rows[k, at : at + 64] ^= rng.integers(1, 256, 64, dtype=np.uint8)
        elif kind == "random":
            rows[k] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    cut = len(new) - (PAGE - tail if tail else 0)
    return old.tobytes(), new[:cut].tobytes()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(_KINDS), min_size=257, max_size=1100),
    seed=st.integers(0, 2**32 - 1),
    tail=st.integers(0, PAGE - 1),
    threads=st.integers(2, 5),
    allowed=st.sampled_from([ALL, CRATE, 0x1, 0x9]),
    data=st.data(),
)
def test_threaded_encoders_match_one_thread(kinds: List[str], seed: int, tail: int, threads: int, allowed: int,
                                            data: st.DataObject) -> None:
    """Over 256 pages the encoders split the pages into runs encoded on several threads
    into one payload, then packed: the same result as one thread's (the one-thread
    kernels are checked against the reference above), on every SIMD path."""
    old, new = _kinds_state(kinds, seed, tail)
    npages = len(kinds)
    keep = data.draw(st.lists(st.booleans(), min_size=npages, max_size=npages))
    indices = [k for k in range(npages) if keep[k]]
    hints = np.asarray(data.draw(st.lists(st.sampled_from([0, _kernels.XZR_HINT_NO_WIN, 7]),
                                          min_size=len(indices), max_size=len(indices))), dtype=np.uint16)
    for path in each_path():
        want = _kernels.encode_pages(old, new, indices, PAGE, allowed)
        got = _kernels.encode_pages(old, new, indices, PAGE, allowed, threads)
        assert [a.tolist() for a in got[:3]] + [got[3]] == [a.tolist() for a in want[:3]] + [want[3]], path
        pages = _pages_of(new, indices)
        want = _kernels.encode_page_list(old, pages, indices, PAGE, allowed, hints)
        got = _kernels.encode_page_list(old, pages, indices, PAGE, allowed, hints, threads)
        assert [a.tolist() for a in got[:3]] + [got[3]] == [a.tolist() for a in want[:3]] + [want[3]], path


def test_threaded_encoder_matches_the_reference_and_uses_threads() -> None:
    """Against the pure-Python reference directly: 700 pages of mixed kinds (so runs
    pack with gaps of every size), on three threads, then decoded back."""
    kinds = [_KINDS[(k * 7 + k // 3) % len(_KINDS)] for k in range(700)]
    old, new = _kinds_state(kinds, 12, 1000)
    indices = [k for k in range(700) if kinds[k] != "same" or k % 2]
    want = _reference.encode_pages(old, new, indices, PAGE, ALL)
    _kernels._workers_stats()  # restart the peak
    got = _kernels.encode_pages(old, new, indices, PAGE, ALL, 3)
    assert _kernels._workers_stats()[1] >= 1  # a worker thread took runs
    assert [a.tolist() for a in got[:3]] + [got[3]] == [a.tolist() for a in want[:3]] + [want[3]]
    assert len(set(got[0].tolist())) == 4  # every encoding occurs
    out = bytearray(len(indices) * PAGE)
    assert _kernels.check_pages(got[3], got[1], got[0], indices, len(new), PAGE, ALL, base=old, out=out,
                                checks=got[2]) == (0, 0, 0)
    for k, page in enumerate(_pages_of(new, indices)):
        assert bytes(out[k * PAGE : k * PAGE + len(page)]) == page


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kinds=st.lists(st.sampled_from(_KINDS[:4]), min_size=257, max_size=1100),
    seed=st.integers(0, 2**32 - 1),
    threads=st.integers(2, 5),
    damage=st.lists(st.tuples(st.sampled_from(["byte", "index", "encoding", "offset", "check"]),
                              st.floats(0, 1, exclude_max=True), st.integers(1, 255)), max_size=3),
    with_out=st.booleans(),
)
def test_threaded_check_reports_the_first_failure(kinds: List[str], seed: int, threads: int,
                                                  damage: List[Tuple[str, float, int]], with_out: bool) -> None:
    """Checked on several threads, a batch with any damage (none, or up to three spots
    anywhere) gives the result of one thread: the first failure by position."""
    old, new = _kinds_state(kinds, seed, 0)
    indices = list(range(len(kinds)))
    enc, off, chk, payload = _kernels.encode_pages(old, new, indices, PAGE, ALL, threads)
    idx = np.asarray(indices, dtype=np.int64)
    data = bytearray(payload)
    for what, where, value in damage:
        k = int(where * len(indices))
        if what == "byte" and data:
            data[int(where * len(data))] ^= value
        elif what == "index":
            idx[k] = (int(idx[k]) + value) % (len(kinds) + 2)
        elif what == "encoding":
            enc[k] = value % 6
        elif what == "offset":
            off[k + 1] = max(0, int(off[k + 1]) - value)
        else:
            chk[k] ^= value
    results = []
    for t in (1, threads):
        out = bytearray(len(indices) * PAGE) if with_out else None
        results.append((_kernels.check_pages(bytes(data), off, enc, idx, len(new), PAGE, ALL, -1, old, out, chk, t),
                        out))
    assert results[0][0] == results[1][0]
    if results[0][0][0] == 0 and with_out:
        assert results[0][1] == results[1][1] == new


@pytest.mark.parametrize("impl", [_kernels, _reference])
@pytest.mark.parametrize("threads", [0, -1])
def test_encoders_refuse_fewer_than_one_thread(impl: ModuleType, threads: int) -> None:
    with pytest.raises(ValueError, match="threads"):
        impl.encode_pages(bytes(PAGE), bytes(PAGE), [0], PAGE, ALL, threads)
    with pytest.raises(ValueError, match="threads"):
        impl.encode_page_list(bytes(PAGE), [bytes(PAGE)], [0], PAGE, ALL, None, threads)
    with pytest.raises(ValueError, match="threads"):
        impl.check_pages(b"", [0, 0], [2], [0], PAGE, PAGE, ALL, -1, None, None, None, threads)


def test_encode_pages_chooses_zero_xzr_rle_raw() -> None:
    rng = random.Random(5)
    old = rng.randbytes(5 * PAGE)
    new = bytearray(old)
    new[0:PAGE] = bytes(PAGE)  # zero page
    new[PAGE + 300 : PAGE + 364] = rng.randbytes(64)  # XZR: 2 + 1 + 64 = 67 bytes
    new[2 * PAGE : 3 * PAGE] = b"\x07" * PAGE  # RLE: 99 bytes, XZR would be ~4 KiB
    new[3 * PAGE : 4 * PAGE] = rng.randbytes(PAGE)  # raw
    new[4 * PAGE : 5 * PAGE] = bytes(PAGE)
    enc, off, _, payload = _kernels.encode_pages(old, bytes(new), [0, 1, 2, 3, 4], PAGE, ALL)
    assert enc.tolist() == [2, 3, 1, 0, 2]
    assert np.diff(off).tolist() == [0, 67, 99, PAGE, 0]
    # The crate-compatible subset: zero pages become RLE, the edited page stays raw.
    enc, off, _, _ = _kernels.encode_pages(old, bytes(new), [0, 1, 2, 3, 4], PAGE, CRATE)
    assert enc.tolist() == [1, 0, 1, 0, 1]
    assert np.diff(off).tolist() == [99, PAGE, 99, PAGE, 99]


def test_encode_pages_argument_errors(impl: ModuleType) -> None:
    with pytest.raises(IndexError):
        impl.encode_pages(bytes(PAGE), bytes(PAGE), [1], PAGE, ALL)
    with pytest.raises(IndexError):
        impl.encode_pages(bytes(PAGE), bytes(PAGE), [-1], PAGE, ALL)
    with pytest.raises(ValueError):
        impl.encode_pages(b"", b"", [], 0, ALL)
    enc, off, chk, payload = impl.encode_pages(b"", b"", [], PAGE, ALL)
    assert (enc.tolist(), off.tolist(), chk.tolist(), payload) == ([], [0], [], b"")
    with pytest.raises(ValueError):
        impl.stored_checks(b"abc", [0, 4])
    with pytest.raises(ValueError):
        impl.encode_page_list(b"", [b"x" * (PAGE + 1)], [0], PAGE, ALL)
    with pytest.raises(ValueError):
        impl.encode_page_list(b"", [b"x"], [0, 1], PAGE, ALL)
    with pytest.raises(IndexError):
        impl.encode_page_list(b"", [b"x"], [-1], PAGE, ALL)
    # A page past 2**63 bytes: its byte offset wrapped, and XZR read before the base.
    old = bytes(range(256)) * 2 * PAGE
    for page_size, index in [(PAGE, 2**52 - 1), (PAGE, 2**63 // PAGE), (3, (2**63 - 1) // 3), (1, 2**63 - 1)]:
        with pytest.raises(IndexError, match="past 2\\*\\*63"):
            impl.encode_page_list(old, [b"x"], [index], page_size, ALL)
    last = (2**63 - 1 - PAGE) // PAGE  # the last page that fits: past the base, so zeros
    assert impl.encode_page_list(old, [b"\0" * PAGE], [last], PAGE, ALL)[0].tolist() == [2]
    assert impl.encode_page_list(b"", [b"\0\0"], [3], PAGE, ALL)[0].tolist() == [2]


def _batch(total: int = 3 * PAGE) -> Tuple[bytes, bytes, List[int], np.ndarray, np.ndarray, bytes]:
    rng = random.Random(11)
    old = rng.randbytes(total)
    new = bytearray(old)
    new[10:20] = bytes(10)
    new[PAGE : 2 * PAGE] = bytes(PAGE)
    new[2 * PAGE : 2 * PAGE + 99] = b"\x01" * 99
    indices = [0, 1, 2]
    enc, off, _, payload = _kernels.encode_pages(old, bytes(new), indices, PAGE, ALL)
    return old, bytes(new), indices, enc, off, payload


CHECK_CASES = [
    # (what to change, expected code, position, detail or None)
    ("index_range", 1, 2, 3),
    ("not_increasing", 2, 1, 0),
    ("encoding", 3, 0, 9),
    ("raw_length", 4, 2, None),
    ("zero_length", 4, 1, 5),
    ("xzr_corrupt", 7, 0, None),
    ("offsets", 8, 2, None),
    ("check", 9, 1, 0),
]


@pytest.mark.parametrize("change, code, position, detail", CHECK_CASES)
def test_check_pages_reports_the_first_bad_page(impl: ModuleType, change: str, code: int, position: int,
                                                detail: object) -> None:
    old, new, indices, enc, off, payload = _batch()
    enc, off, idx = enc.copy(), off.copy(), list(indices)
    assert enc.tolist() == [3, 2, 3]
    if change == "index_range":
        idx[2] = 3
    elif change == "not_increasing":
        idx[1] = 0
    elif change == "encoding":
        enc[0] = 9
    elif change == "raw_length":
        enc[2] = 0
    elif change == "zero_length":
        off[2:] += 5  # page 1 (a zero page) gets 5 stored bytes
        payload = payload[: off[1]] + bytes(5) + payload[off[1] :]
    elif change == "xzr_corrupt":
        payload = b"\x80" + payload[1:]
        off = off.copy()
    elif change == "offsets":
        off[3] = len(payload) + 1
    checks = _reference.stored_checks(payload, off) if change != "offsets" else None
    if change == "check":
        checks[1] = 5  # the zero page's stored bytes (none) sum to 0
    out = bytearray(3 * PAGE)
    got = impl.check_pages(payload, off, enc, idx, len(new), PAGE, ALL, base=old, out=out, checks=checks)
    assert got[:2] == (code, position)
    if detail is not None:
        assert got[2] == detail


def test_check_pages_allowed_mask_and_previous(impl: ModuleType) -> None:
    old, new, indices, enc, off, payload = _batch()
    assert impl.check_pages(payload, off, enc, indices, len(new), PAGE, CRATE)[:3] == (3, 0, 3)
    assert impl.check_pages(payload, off, enc, indices, len(new), PAGE, ALL, previous=0)[:2] == (2, 0)
    assert impl.check_pages(payload, off, enc, indices, len(new), PAGE, ALL, previous=-1) == (0, 0, 0)
    with pytest.raises(ValueError):
        impl.check_pages(payload, off[:-1], enc, indices, len(new), PAGE, ALL)
    with pytest.raises(ValueError):
        impl.check_pages(payload, off, enc, indices, len(new), PAGE, ALL, out=bytearray(PAGE))


def test_rle_pages_in_a_batch(impl: ModuleType) -> None:
    packed = _reference.rle_compress(bytes(PAGE))
    ok = impl.check_pages(packed, [0, len(packed)], [1], [0], PAGE, PAGE, ALL)
    assert ok == (0, 0, 0)
    short = _reference.rle_compress(bytes(PAGE - 1))
    assert impl.check_pages(short, [0, len(short)], [1], [0], PAGE, PAGE, ALL) == (6, 0, PAGE - 1)
    assert impl.check_pages(b"\xff\x05", [0, 2], [1], [0], PAGE, PAGE, ALL) == (5, 0, 1)
    assert impl.check_pages(b"\xff\x00\x00", [0, 3], [1], [0], PAGE, PAGE, ALL) == (5, 0, 2)
    assert impl.check_pages(b"\xff\x7f\x00" * 40, [0, 120], [1], [0], PAGE, PAGE, ALL) == (5, 0, 3)
    assert impl.check_pages(b"", [0, 0], [1], [0], PAGE, PAGE, ALL) == (4, 0, 0)


@SETTINGS
@given(payload=st.binary(max_size=300), enc=st.integers(0, 4), total=st.integers(1, 3 * PAGE),
       guard=st.binary(min_size=8, max_size=8))
def test_hostile_pages_never_write_outside_their_slot(payload: bytes, enc: int, total: int, guard: bytes) -> None:
    """Arbitrary stored bytes as one page: same verdict from both decoders, and the bytes
    after the page's slot are untouched."""
    index = (total - 1) // PAGE
    results = []
    for impl in (_kernels, _reference):
        out = bytearray(PAGE) + bytearray(guard)
        got = impl.check_pages(payload, [0, len(payload)], [enc], [index], total, PAGE, ALL,
                               base=bytes(range(256)) * 16, out=memoryview(out)[:PAGE])
        assert bytes(out[PAGE:]) == guard
        results.append((got, bytes(out[: total - index * PAGE]) if got[0] == 0 else None))
    assert results[0] == results[1]


# --------------------------------------------------------------------------------------
# the portable C alone


PORTABLE_PROBE = r"""
#include "cm_simd.h"
#include "cm_pages.h"
#include <stdio.h>
int main(void) {
    static uint8_t a[4096], b[4096], out[4096 + 16], back[4096];
    for (int i = 0; i < 4096; i++) a[i] = b[i] = (uint8_t)(i * 13);
    for (int i = 700; i < 764; i++) b[i] ^= 0x5A;
    cm_dispatch_init();
    size_t n = cm_xzr_encode_entry(b, a, 4096, out, 4096);
    size_t where = 0;
    memcpy(back, a, 4096);
    int rc = cm_xzr_decode(out, n, back, 4096, &where);
    printf("%zu %d %d\n", n, rc, memcmp(back, b, 4096));
    return 0;
}
"""


def test_portable_page_encodings_compile_alone(tmp_path: Path) -> None:
    header_dir = Path(__file__).resolve().parent.parent / "cython"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not (header_dir / "cm_pages.h").exists():
        pytest.skip("needs a C compiler and the source tree's cython/cm_pages.h")
    src = tmp_path / "probe.c"
    src.write_text(PORTABLE_PROBE)
    exe = tmp_path / "probe"
    subprocess.run(
        [compiler, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
         "-DCELLMIGRATE_PORTABLE_ONLY", f"-I{header_dir}", str(src), "-o", str(exe)],
        check=True, capture_output=True, timeout=120,
    )
    fields = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.split()
    assert fields == ["67", "0", "0"]


@SETTINGS
@given(st.integers(0, 2**32), st.sampled_from([8, 7, 5, 4, 3, 2, 1]), st.sampled_from([PAGE, PAGE - 1, 4000, 65]))
def test_xzr_many_short_literals_match_reference(seed: int, stride: int, length: int) -> None:
    """Pages of counters (a small change every ``stride`` bytes): hundreds of literals a
    page, gaps just under, at and over the 3-byte rule, on every dispatch path."""
    rng = random.Random(seed)
    base = rng.randbytes(length)
    new = bytearray(base)
    for at in range(rng.randrange(stride), length, stride):
        new[at] ^= rng.randrange(1, 256)
        if rng.random() < 0.3 and at + 1 < length:
            new[at + 1] ^= rng.randrange(1, 256)
    want = _reference.xzr_encode(bytes(new), base)
    for path in each_path():
        assert _kernels.xzr_encode(bytes(new), base) == want, path


@pytest.mark.parametrize("length", [1, 2, 3, 4, 62, 63, 64, 65, 127, 128, 4094, 4095, 4096])
def test_xzr_without_three_equal_bytes_in_a_row_matches_reference(length: int) -> None:
    """Pages with no three equal bytes in a row but up to three equal at either end (the
    bitmap encoder's early "cannot win" exit): the same choice, sizes and hints as the
    reference on every path, at the lengths around its words and the page."""
    rng = np.random.default_rng(length)
    for lead in range(4):
        for trail in range(4):
            if lead + trail >= length:
                continue  # the page would equal its base: not dirty
            base = rng.integers(0, 256, length, dtype=np.uint8)
            new = base ^ rng.integers(1, 256, length, dtype=np.uint8)  # every byte differs ...
            new[:lead] = base[:lead]  # ... but these
            if trail:
                new[length - trail :] = base[length - trail :]
            if length > 8:  # and a lone equal byte and an equal pair inside
                new[length // 2] = base[length // 2]
                new[length // 3 : length // 3 + 2] = base[length // 3 : length // 3 + 2]
            old_state, new_state = base.tobytes(), new.tobytes()
            want = _reference.encode_pages(old_state, new_state, [0], PAGE, ALL)
            hint = _reference.xzr_hint(new_state, old_state)
            for path in each_path():
                got = _kernels.encode_pages(old_state, new_state, [0], PAGE, ALL)
                assert got[0].tolist() == want[0].tolist() and got[3] == want[3], (path, lead, trail)
                assert _kernels.xzr_encode(new, base) == _reference.xzr_encode(new_state, old_state), (path, lead, trail)
                arena = _kernels.PageArena(PAGE)
                _kernels.scan_leaves(base, new, 0, length, PAGE, arena, None, True)
                assert arena.xzr_hints.tolist() == [hint], (path, lead, trail)
