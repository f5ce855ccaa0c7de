"""Mutation properties of the delta wire format (hypothesis; a few seconds each).

The long, coverage-guided runs are the atheris harnesses in ``fuzz/`` (see fuzz/README.md);
these properties keep the same contract in the default test run:

* any byte mutation, truncation or extension of a serialized delta raises
  ``CorruptDataError`` from ``deserialize`` (never another exception type), or decodes to a
  delta whose ``apply`` either produces exactly the new state or raises
  ``InvalidStateError`` with the base byte-for-byte unchanged;
* the same holds when the attacker also recomputes every page check and the
  whole-payload check ("resealed" mutations): the XXH3 checks are not authentication, so
  then the strong digest checked by ``apply`` is what must stop a forged state;
* random bytes are refused with ``CorruptDataError``.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Callable, Dict, List, Optional, Tuple

import xxhash
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from cellmigrate import PAGE_SIZE, CorruptDataError, InvalidStateError, simple_checksum
from cellmigrate.delta import DeltaSnapshot
from cellmigrate.wire import HEADER_SIZE, MAGIC, PAGE_ENTRY_SIZE, TRAILER_SIZE

KEY = bytes(range(100, 132))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _states(label: str, size: int) -> Tuple[bytes, bytes]:
    base = hashlib.shake_256(label.encode()).digest(size)
    new = bytearray(base)
    new[5:300] = hashlib.shake_256(label.encode() + b"/edit").digest(295)  # raw page 0
    if size > 2 * PAGE_SIZE:
        new[PAGE_SIZE : 2 * PAGE_SIZE] = bytes(PAGE_SIZE)  # RLE page 1
    new[-3:] = b"\xff\xff\xff"  # the (possibly short) last page
    return base, bytes(new)


def _cases() -> Dict[str, Tuple[bytes, bytes, Optional[bytes], bytes]]:
    """name -> (base, new, key, serialized delta); small so each example is cheap."""
    cases: Dict[str, Tuple[bytes, bytes, Optional[bytes], bytes]] = {}
    for name, size, algorithm, key in [
        ("checksum_only", 3 * PAGE_SIZE + 100, None, None),
        ("xxh3_128", 3 * PAGE_SIZE, "xxh3_128", None),
        ("blake3", 2 * PAGE_SIZE + 1, "blake3", None),
        ("keyed", 3 * PAGE_SIZE + 4000, "blake3", KEY),
        ("single_short_page", 700, "xxh3_128", None),
    ]:
        base, new = _states(name, size)
        delta = DeltaSnapshot.create(b"\x42" * 16, base, new, 7, 8, digest=algorithm, key=key)
        cases[name] = (base, new, key, delta.serialize())
    return cases


CASES = _cases()
NAMES = sorted(CASES)
STRONG = [n for n in NAMES if n != "checksum_only"]


def check_contract(blob: bytes, name: str, *, forgeable: bool = False) -> str:
    """Deserialize ``blob`` and apply it to a copy of case ``name``'s base; assert the contract.

    Returns the outcome ("corrupt", "refused" or "applied") so properties can also assert
    which one happened. ``forgeable``: the delta carries only the weak checksum, so a
    successful apply is only required to give a state with that checksum.
    """
    base, new, key, _ = CASES[name]
    try:
        delta = DeltaSnapshot.deserialize(blob)
    except CorruptDataError:
        return "corrupt"
    # Any exception other than CorruptDataError escapes and fails the test.
    target = bytearray(base)
    try:
        delta.apply(target, key=key)
    except InvalidStateError:
        assert bytes(target) == base, "a refused apply modified the base"
        return "refused"
    if not forgeable:
        assert bytes(target) == new, "apply succeeded with a wrong state"
    return "applied"


def reseal(blob: bytes) -> bytes:
    """Recompute what an attacker can: every page check that can be located, and the trailer.

    Best effort on a mutated (possibly nonsensical) header (version 2 layout, docs/FORMAT.md):
    page checks are fixed only while the table and payload stay inside the input.
    """
    data = bytearray(blob)
    if len(data) >= HEADER_SIZE + TRAILER_SIZE and data[8:10] == b"\x02\x00" and data[13] == 0:
        digest_length = data[12]
        count, wire = struct.unpack_from("<IQ", data, 76)
        payload = HEADER_SIZE + 2 * digest_length
        table = payload + wire
        body_end = len(data) - TRAILER_SIZE
        if table + PAGE_ENTRY_SIZE * count <= body_end:
            offset = payload
            for k in range(count):
                (length,) = struct.unpack_from("<H", data, table + 4 * count + 2 * k)
                if offset + length > table:
                    break
                struct.pack_into("<I", data, table + 6 * count + 4 * k, simple_checksum(bytes(data[offset : offset + length])))
                offset += length
    if len(data) >= TRAILER_SIZE:
        data[-TRAILER_SIZE:] = xxhash.xxh3_128_digest(bytes(data[:-TRAILER_SIZE]))
    return bytes(data)


def test_cases_are_valid() -> None:
    for name in NAMES:
        assert check_contract(CASES[name][3], name) == "applied"
        assert check_contract(reseal(CASES[name][3]), name) == "applied"  # reseal is a no-op on valid input


mutations = st.lists(st.tuples(st.integers(0, 2**32), st.integers(0, 255)), min_size=1, max_size=8)


def _mutate(blob: bytes, edits: List[Tuple[int, int]]) -> bytes:
    data = bytearray(blob)
    for position, value in edits:
        data[position % len(data)] = value
    return bytes(data)


@SETTINGS
@given(name=st.sampled_from(NAMES), edits=mutations)
def test_any_byte_mutation_is_refused(name: str, edits: List[Tuple[int, int]]) -> None:
    blob = CASES[name][3]
    mutated = _mutate(blob, edits)
    assume(mutated != blob)
    # Without resealing, the whole-payload check (or a field check before it) must fire.
    assert check_contract(mutated, name) == "corrupt"


@SETTINGS
@given(name=st.sampled_from(NAMES), position=st.integers(0, 2**32), bit=st.integers(0, 7))
def test_any_bit_flip_is_refused(name: str, position: int, bit: int) -> None:
    data = bytearray(CASES[name][3])
    data[position % len(data)] ^= 1 << bit
    assert check_contract(bytes(data), name) == "corrupt"


@SETTINGS
@given(name=st.sampled_from(NAMES), edits=mutations)
def test_resealed_mutation_never_yields_a_wrong_state(name: str, edits: List[Tuple[int, int]]) -> None:
    """An attacker who recomputes the XXH3 checks is stopped by validation or by apply."""
    check_contract(reseal(_mutate(CASES[name][3], edits)), name, forgeable=name not in STRONG)


@SETTINGS
@given(name=st.sampled_from(STRONG), page_byte=st.integers(0, 2**32), value=st.integers(1, 255))
def test_resealed_payload_tampering_is_refused_by_apply(name: str, page_byte: int, value: int) -> None:
    """Tampered page bytes with valid checks decode (or not) but never apply."""
    blob = CASES[name][3]
    (wire,) = struct.unpack_from("<Q", blob, 80)
    payload_start = HEADER_SIZE + 2 * blob[12]
    payload_len = wire
    data = bytearray(blob)
    data[payload_start + page_byte % payload_len] ^= value
    assert check_contract(reseal(bytes(data)), name) in ("corrupt", "refused")


@SETTINGS
@given(name=st.sampled_from(NAMES), cut=st.integers(0, 2**32))
def test_any_truncation_is_refused(name: str, cut: int) -> None:
    blob = CASES[name][3]
    assert check_contract(blob[: cut % len(blob)], name) == "corrupt"


@SETTINGS
@given(name=st.sampled_from(NAMES), extra=st.binary(min_size=1, max_size=64), resealed=st.booleans())
def test_any_extension_is_refused(name: str, extra: bytes, resealed: bool) -> None:
    blob = CASES[name][3] + extra
    assert check_contract(reseal(blob) if resealed else blob, name) == "corrupt"


@SETTINGS
@given(data=st.binary(max_size=512), with_magic=st.booleans(), resealed=st.booleans())
def test_random_bytes_are_refused(data: bytes, with_magic: bool, resealed: bool) -> None:
    blob = MAGIC + data if with_magic else data
    if resealed:
        blob = reseal(blob)
    try:
        DeltaSnapshot.deserialize(blob)
    except CorruptDataError:
        return
    # Only a structurally valid delta may decode; then it must re-encode to itself.
    assert DeltaSnapshot.deserialize(blob).serialize() == blob


@SETTINGS
@given(
    name=st.sampled_from(NAMES),
    offset=st.sampled_from([8, 10, 11, 12, 13, 14, 48, 56, 76, 80, 88]),
    value=st.integers(0, 2**64 - 1),
)
def test_resealed_header_field_tampering(name: str, offset: int, value: int) -> None:
    """Version, algorithm, flags, digest length, compression, reserved, total size, base
    size, page count, payload sizes: each is validated on its own (or caught by apply's
    header digest) even when the checks were recomputed."""
    data = bytearray(CASES[name][3])
    width = {8: 2, 10: 1, 11: 1, 12: 1, 13: 1, 14: 2, 48: 8, 56: 8, 76: 4, 80: 8, 88: 8}[offset]
    data[offset : offset + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    check_contract(reseal(bytes(data)), name, forgeable=name not in STRONG)


# --------------------------------------------------------------------------------------
# Regression tests for fuzzing findings outside the wire format (compression.py; reported
# to the lead, fixed by that file's owner). Hostile payloads must give CorruptDataError.


def _zstd_header_declaring(size: int) -> bytes:
    """A 16-byte zstd frame: single segment, 8-byte content size ``size``, one empty raw block."""
    return bytes.fromhex("28b52ffd") + bytes([0xE0]) + struct.pack("<Q", size) + b"\x01\x00\x00"


def test_zstd_frame_declaring_a_huge_size_is_corrupt_not_memoryerror() -> None:
    """Finding F2: a 16-byte frame declaring 1 TiB made zstd_decompress (no max_output)
    try to allocate 1 TiB and raise MemoryError instead of CorruptDataError."""
    from cellmigrate import adaptive_decompress, zstd_decompress

    frame = _zstd_header_declaring(1 << 40)
    calls: List[Callable[[], bytes]] = [lambda: zstd_decompress(frame), lambda: adaptive_decompress(frame, 2)]
    for call in calls:
        try:
            call()
        except CorruptDataError:
            continue
        except MemoryError:  # pragma: no cover - the bug
            raise AssertionError("zstd_decompress raised MemoryError on a 16-byte hostile frame") from None
        raise AssertionError("a frame declaring 1 TiB but holding 0 bytes was accepted")


def test_zstd_decompress_does_not_ignore_bytes_after_the_first_frame() -> None:
    """Finding F1: with a declared content size, zstd_decompress decoded the first frame and
    silently dropped whatever followed (garbage, or a second frame's data), unlike the
    no-content-size path which rejects garbage and reads every frame."""
    from cellmigrate import zstd_compress, zstd_decompress

    first, second = b"hello " * 20, b"second frame " * 10
    frame = zstd_compress(first)
    try:
        out = zstd_decompress(frame + b"trailing garbage")
    except CorruptDataError:
        pass
    else:
        raise AssertionError(f"trailing garbage after a zstd frame was ignored ({len(out)} bytes returned)")
    try:
        out = zstd_decompress(frame + zstd_compress(second))
    except CorruptDataError:
        return
    assert out == first + second, "the second zstd frame was silently dropped"
