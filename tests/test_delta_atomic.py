"""Atomic apply: every failure path, on every writable buffer kind, leaves the base unchanged.

Each case builds a valid delta, breaks it one way, applies it to a fresh base of each
kind and checks three things: ``InvalidStateError`` is raised, its message names the
check that failed, and the base is byte-for-byte what it was (same length: not grown).
"""

from __future__ import annotations

import mmap
import random
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import PAGE_SIZE, DeltaSnapshot, DirtyPage, InvalidStateError, simple_checksum

AGENT = bytes(16)
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SIZE = 5 * PAGE_SIZE + 100  # a short last page; a multiple of 4 for the uint32 view

_rng = random.Random(11)
OLD = _rng.randbytes(SIZE)
_new = bytearray(OLD)
for _page in (0, 2, 5):
    _new[_page * PAGE_SIZE + 7] ^= 0x3C
_new[3 * PAGE_SIZE : 4 * PAGE_SIZE] = bytes(PAGE_SIZE)  # an RLE-compressed page
NEW = bytes(_new)


# --- buffer kinds ------------------------------------------------------------------------

Factory = Callable[[bytes], Any]


def _mmap(content: bytes) -> mmap.mmap:
    m = mmap.mmap(-1, len(content))
    m.write(content)
    return m


WRITABLE_KINDS: Dict[str, Factory] = {
    "bytearray": bytearray,
    "memoryview": lambda c: memoryview(bytearray(c)),
    "numpy_uint8": lambda c: np.frombuffer(bytearray(c), dtype=np.uint8),
    "numpy_uint32": lambda c: np.frombuffer(bytearray(c), dtype=np.uint32),
    "mmap": _mmap,
    "mmap_memoryview": lambda c: memoryview(_mmap(c)),
}


def content(buf: Any) -> bytes:
    return bytes(memoryview(buf).cast("B"))


# --- broken deltas -----------------------------------------------------------------------


def fresh(**kwargs: Any) -> DeltaSnapshot:
    return DeltaSnapshot.create(AGENT, OLD, NEW, 1, 2, **kwargs)


def _wrong_checksum() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh(digest=None)
    d.checksum ^= 1
    return d, None


def _wrong_checksum_with_digest() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.checksum = (d.checksum + 12345) & 0xFFFFFFFF
    return d, None


def _wrong_digest() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    assert d.digest is not None
    d.digest = bytes([d.digest[0] ^ 1]) + d.digest[1:]
    return d, None


def _forged_page() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    # +2 at weight w and -1 at weight 2w keep the weak checksum: only the digest sees it.
    # Page 0 starts at offset 0, so byte p has weight p + 1 and byte 2p + 1 has 2(p + 1).
    d = fresh()
    page = d.dirty_pages[0]
    assert page.index == 0
    page.decompress()
    data = bytearray(page.data)
    p = next(p for p in range(PAGE_SIZE // 2 - 1) if data[p] <= 253 and data[2 * p + 1] >= 1)
    data[p] += 2
    data[2 * p + 1] -= 1
    page.data = bytes(data)
    return d, None


def _wrong_key() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    return fresh(key=KEY), OTHER_KEY


def _missing_key() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    return fresh(key=KEY), None


def _key_for_unkeyed() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    return fresh(), KEY


def _key_for_checksum_only() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    return fresh(digest=None), KEY


def _unkeyed_blake3_with_key() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    # A plain BLAKE3 digest is not a MAC: a receiver holding a key must refuse it.
    return fresh(digest="blake3"), KEY


def _page_out_of_range() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.dirty_pages.append(DirtyPage(6, bytes(PAGE_SIZE)))
    return d, None


def _duplicate_page() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    first = d.dirty_pages[0]
    d.dirty_pages.append(DirtyPage(first.index, first.data, first.compressed))
    return d, None


def _corrupt_rle_truncated() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if p.compressed)
    page.data = page.data + b"\xff"
    return d, None


def _corrupt_rle_zero_count() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if p.compressed)
    page.data = b"\xff\x00\x00" + page.data
    return d, None


def _rle_page_too_long() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if p.compressed)
    page.data = page.data + b"\xff\x7f\x00"
    return d, None


def _rle_page_too_short() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if p.compressed)
    page.data = page.data[:-3]
    return d, None


def _raw_page_too_short() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if not p.compressed)
    page.data = page.data[:-1]
    return d, None


def _raw_page_too_long() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    page = next(p for p in d.dirty_pages if not p.compressed and p.index == 0)
    page.data = page.data + b"!"
    return d, None


def _last_page_full_length() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    # The last page is 100 bytes long; a full 4096-byte page there would write past the end.
    d = fresh()
    page = next(p for p in d.dirty_pages if p.index == 5)
    page.decompress()
    page.data = page.data + bytes(PAGE_SIZE - len(page.data))
    return d, None


def _keyed_flag_on_xxh3() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.keyed = True  # a "keyed" XXH3 delta is not a MAC: refused, key or not
    return d, KEY


def _digest_removed() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.digest = None
    return d, None


def _digest_truncated() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    assert d.digest is not None
    d.digest = d.digest[:8]
    return d, None


def _unknown_algorithm() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.digest_algorithm = "md5"
    return d, None


def _total_size_changed() -> Tuple[DeltaSnapshot, Optional[bytes]]:
    d = fresh()
    d.total_size -= 1
    return d, None


BROKEN: Dict[str, Tuple[Callable[[], Tuple[DeltaSnapshot, Optional[bytes]]], str]] = {
    "wrong checksum": (_wrong_checksum, "checksum mismatch"),
    "wrong checksum (digest delta)": (_wrong_checksum_with_digest, "checksum mismatch"),
    "wrong digest": (_wrong_digest, "digest mismatch"),
    "forged page keeping the checksum": (_forged_page, "digest mismatch"),
    "wrong key": (_wrong_key, "authentication failed"),
    "missing key": (_missing_key, "a key is needed"),
    "key given for an unkeyed delta": (_key_for_unkeyed, "not authenticated"),
    "key given for a checksum-only delta": (_key_for_checksum_only, "not authenticated"),
    "key given for an unkeyed blake3 delta": (_unkeyed_blake3_with_key, "not authenticated"),
    "page out of range": (_page_out_of_range, "out of range"),
    "duplicate page": (_duplicate_page, "more than once"),
    "corrupt RLE (truncated marker)": (_corrupt_rle_truncated, "corrupt"),
    "corrupt RLE (zero count)": (_corrupt_rle_zero_count, "corrupt"),
    "RLE page decodes too long": (_rle_page_too_long, "corrupt"),
    "RLE page decodes too short": (_rle_page_too_short, "expected 4096"),
    "raw page too short": (_raw_page_too_short, "expected 4096"),
    "raw page too long": (_raw_page_too_long, "expected 4096"),
    "full-length last page": (_last_page_full_length, "expected 100"),
    "keyed flag on an xxh3 delta": (_keyed_flag_on_xxh3, "not a BLAKE3 MAC"),
    "digest removed": (_digest_removed, "digest has 0 bytes"),
    "digest truncated": (_digest_truncated, "digest has 8 bytes"),
    "unknown digest algorithm": (_unknown_algorithm, "unknown digest algorithm"),
    "total_size changed": (_total_size_changed, "larger"),
}


def test_forgery_really_keeps_the_checksum() -> None:
    delta, _ = _forged_page()
    target = bytearray(OLD)
    page = delta.dirty_pages[0]
    start = page.index * PAGE_SIZE
    target[start : start + PAGE_SIZE] = page.get_data()
    for other in delta.dirty_pages[1:]:
        s = other.index * PAGE_SIZE
        raw = other.get_data()
        target[s : s + len(raw)] = raw
    assert simple_checksum(target) == delta.checksum and bytes(target) != NEW


@pytest.mark.parametrize("kind", sorted(WRITABLE_KINDS))
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_delta_leaves_base_unchanged(case: str, kind: str) -> None:
    make, message = BROKEN[case]
    delta, key = make()
    base = WRITABLE_KINDS[kind](OLD)
    with pytest.raises(InvalidStateError, match=message):
        delta.apply(base, key=key)
    assert content(base) == OLD


@pytest.mark.parametrize("kind", sorted(WRITABLE_KINDS))
def test_stale_base_is_refused(kind: str) -> None:
    delta = fresh()
    stale = bytearray(OLD)
    stale[4 * PAGE_SIZE + 1] ^= 1  # a page the delta does not carry
    base = WRITABLE_KINDS[kind](bytes(stale))
    with pytest.raises(InvalidStateError, match="checksum mismatch"):
        delta.apply(base)
    assert content(base) == bytes(stale)


@pytest.mark.parametrize("kind", sorted(WRITABLE_KINDS))
def test_longer_base_is_refused(kind: str) -> None:
    delta = fresh()
    longer = OLD + bytes(4)
    base = WRITABLE_KINDS[kind](longer)
    with pytest.raises(InvalidStateError, match="larger"):
        delta.apply(base)
    assert content(base) == longer


@pytest.mark.parametrize("kind", sorted(k for k in WRITABLE_KINDS if k != "bytearray"))
def test_short_non_resizable_base_is_refused(kind: str) -> None:
    delta = fresh()
    short = OLD[:-100]
    base = WRITABLE_KINDS[kind](short)
    with pytest.raises(InvalidStateError, match="too small"):
        delta.apply(base)
    assert content(base) == short


@pytest.mark.parametrize("kind", sorted(WRITABLE_KINDS))
def test_valid_delta_applies(kind: str) -> None:
    for kwargs, key in (({}, None), ({"digest": None}, None), ({"key": KEY}, KEY)):
        base = WRITABLE_KINDS[kind](OLD)
        fresh(**kwargs).apply(base, key=key)
        assert content(base) == NEW


def test_short_bytearray_with_bad_delta_is_not_grown() -> None:
    sender_old = OLD[: 2 * PAGE_SIZE] + bytes(SIZE - 2 * PAGE_SIZE)
    delta = DeltaSnapshot.create(AGENT, sender_old, NEW, 0, 1)
    delta.checksum ^= 2
    base = bytearray(OLD[: 2 * PAGE_SIZE])
    with pytest.raises(InvalidStateError, match="checksum") as refused:
        delta.apply(base)
    assert base == OLD[: 2 * PAGE_SIZE]
    # The short base is named as the likely cause (a wrong base, zero-extended by the rule).
    assert f"the base's {2 * PAGE_SIZE} bytes were zero-extended to {SIZE}" in str(refused.value)


def test_short_bytearray_that_cannot_grow_is_unchanged() -> None:
    sender_old = OLD[:PAGE_SIZE] + bytes(SIZE - PAGE_SIZE)
    delta = DeltaSnapshot.create(AGENT, sender_old, NEW, 0, 1)
    base = bytearray(OLD[:PAGE_SIZE])
    export = memoryview(base)  # an exported buffer cannot be resized
    with pytest.raises(InvalidStateError, match="cannot be grown"):
        delta.apply(base)
    assert bytes(export) == OLD[:PAGE_SIZE]
    export.release()
    delta.apply(base)
    assert base == NEW


def test_bad_key_argument_is_rejected_before_anything() -> None:
    delta = fresh(key=KEY)
    base = bytearray(OLD)
    with pytest.raises(ValueError, match="32 bytes"):
        delta.apply(base, key=b"short")
    with pytest.raises(TypeError, match="key"):
        delta.apply(base, key="x" * 32)  # type: ignore[arg-type]
    assert base == OLD


@st.composite
def mutations(draw: Any) -> Tuple[str, int, int]:
    kind = draw(st.sampled_from(["checksum", "digest", "index", "flag", "data_byte", "truncate", "extend"]))
    return kind, draw(st.integers(0, 10**6)), draw(st.integers(1, 255))


def _mutate(delta: DeltaSnapshot, m: Tuple[str, int, int]) -> None:
    """Apply one mutation to the delta's fields or one of its pages."""
    kind, where, value = m
    pages = delta.dirty_pages
    page = pages[where % len(pages)]
    if kind == "checksum":
        delta.checksum ^= value
    elif kind == "digest":
        assert delta.digest is not None
        i = where % len(delta.digest)
        delta.digest = delta.digest[:i] + bytes([delta.digest[i] ^ value]) + delta.digest[i + 1 :]
    elif kind == "index":
        page.index = (page.index + value) % 7
    elif kind == "flag":
        page.compressed = not page.compressed
    elif kind == "data_byte" and page.data:
        i = where % len(page.data)
        page.data = page.data[:i] + bytes([page.data[i] ^ value]) + page.data[i + 1 :]
    elif kind == "truncate":
        page.data = page.data[: where % max(len(page.data), 1)]
    elif kind == "extend":
        page.data = page.data + bytes([value]) * (1 + where % 5)


@settings(max_examples=200, deadline=None)
@given(st.lists(mutations(), min_size=1, max_size=3), st.sampled_from(["bytearray", "numpy_uint32", "mmap"]))
def test_any_mutation_is_refused_or_exact(muts: List[Tuple[str, int, int]], kind: str) -> None:
    delta = fresh()
    for m in muts:
        _mutate(delta, m)
    base = WRITABLE_KINDS[kind](OLD)
    try:
        delta.apply(base)
    except InvalidStateError:
        assert content(base) == OLD
    else:
        # Accepted only when the result is exactly the new state (the digest guarantees it).
        assert content(base) == NEW


def test_every_kind_is_really_writable_and_distinct() -> None:
    seen = set()
    for kind in sorted(WRITABLE_KINDS):
        buf = WRITABLE_KINDS[kind](OLD)
        assert not memoryview(buf).readonly and content(buf) == OLD
        seen.add(type(buf).__name__ + str(getattr(buf, "dtype", "")))
    assert len(seen) >= 5


@pytest.mark.large
def test_one_gib_refusals_leave_base_unchanged() -> None:
    from cellmigrate import digest

    size = 1 << 30
    rng = np.random.default_rng(12)
    old = np.zeros(size, dtype=np.uint8)
    old[:: 4096 * 3 + 1] = 5
    new = old.copy()
    pages = rng.choice(size // PAGE_SIZE, 2000, replace=False)
    new[pages * PAGE_SIZE + 1] = 7
    before = digest(old)
    bad_checksum = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    bad_checksum.checksum ^= 1
    bad_digest = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    assert bad_digest.digest is not None
    bad_digest.digest = bytes(16)
    keyed = DeltaSnapshot.create(AGENT, old, new, 0, 1, key=KEY)
    for delta, key in ((bad_checksum, None), (bad_digest, None), (keyed, OTHER_KEY), (keyed, None)):
        with pytest.raises(InvalidStateError):
            delta.apply(old, key=key)
        assert digest(old) == before
    keyed.apply(old, key=KEY)
    assert np.array_equal(old, new)
