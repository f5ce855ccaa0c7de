"""Delta wire format (docs/FORMAT.md): golden fixtures, layout, strict validation.

The crafted inputs here are built by a small independent writer (``Wire`` below) that
follows docs/FORMAT.md rather than ``cellmigrate.wire``, so the layout documentation is
checked too. Crafted inputs get valid per-page and whole-payload checks, so each test
reaches the one validation it targets and the message names that field.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
import tracemalloc
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import PAGE_SIZE, CorruptDataError, InvalidStateError, digest, simple_checksum, simple_compress
from cellmigrate.delta import DeltaSnapshot, DirtyPage
from cellmigrate.wire import DEFAULT_MAX_TOTAL_SIZE, MAGIC, VERSION, decode_delta, encode_delta

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _load_make_fixtures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cellmigrate_make_fixtures", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses/NamedTuple need the module registered
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_make_fixtures()
MANIFEST: Dict[str, Dict[str, Any]] = json.loads((FIXTURES / "manifest.json").read_text())


# --------------------------------------------------------------------------------------
# golden fixtures


def test_every_recipe_has_a_committed_fixture() -> None:
    assert set(MANIFEST) == set(make_fixtures.RECIPES)
    assert len(MANIFEST) >= 6
    for name, entry in MANIFEST.items():
        assert (FIXTURES / entry["file"]).is_file(), name


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_golden_fixture_decodes_applies_and_reencodes(name: str) -> None:
    entry = MANIFEST[name]
    blob = (FIXTURES / entry["file"]).read_bytes()
    base, new = make_fixtures.RECIPES[name].states()
    # The recipes themselves are pinned: a change there is not a format change.
    assert hashlib.sha256(base).hexdigest() == entry["base_sha256"]
    assert hashlib.sha256(new).hexdigest() == entry["new_sha256"]

    version = entry.get("version", 1)
    assert struct.unpack_from("<H", blob, 8)[0] == version
    delta = DeltaSnapshot.deserialize(blob, allow_legacy_keyed=entry["keyed"] and version == 1)
    assert delta.agent_id == make_fixtures.AGENT_ID
    assert (delta.base_sequence, delta.sequence) == (make_fixtures.BASE_SEQUENCE, make_fixtures.SEQUENCE)
    assert delta.timestamp == make_fixtures.TIMESTAMP
    assert delta.total_size == entry["total_size"] == len(new)
    assert delta.checksum == simple_checksum(new)
    assert delta.digest_algorithm == entry["digest_algorithm"]
    assert delta.keyed is entry["keyed"]
    if version == 1:
        assert [[p.index, p.compressed] for p in delta.dirty_pages] == entry["pages"]
    else:
        assert [[p.index, p.encoding.label, len(p.data)] for p in delta.dirty_pages] == entry["encodings"]
        assert (delta.base_size or delta.total_size, delta.compression) == (entry["base_size"], entry["compression"])
    key = None if entry["key_hex"] is None else bytes.fromhex(entry["key_hex"])
    if delta.digest_algorithm is not None:
        assert delta.digest == digest(new, delta.digest_algorithm, key=key)

    target = bytearray(base)
    delta.apply(target, key=key)
    assert bytes(target) == new

    # (b) the format is canonical: decoding then encoding gives the same bytes.
    assert delta.serialize() == blob
    assert encode_delta(delta) == blob


def test_golden_fixtures_cover_the_required_cases() -> None:
    algorithms = {e["digest_algorithm"] for e in MANIFEST.values()}
    assert {None, "xxh3_128", "blake3"} <= algorithms
    assert any(e["keyed"] for e in MANIFEST.values())
    assert any(e["pages"] == [] for e in MANIFEST.values())
    assert any(e["total_size"] % PAGE_SIZE and e["pages"] and e["pages"][-1][0] == e["total_size"] // PAGE_SIZE
               for e in MANIFEST.values())
    assert any(e["pages"] and all(c for _, c in e["pages"]) for e in MANIFEST.values())


@pytest.mark.parametrize("name", ["keyed_blake3", "v2_keyed"])
def test_keyed_fixture_needs_its_key(name: str) -> None:
    blob = (FIXTURES / MANIFEST[name]["file"]).read_bytes()
    base, _ = make_fixtures.RECIPES[name].states()
    delta = DeltaSnapshot.deserialize(blob, allow_legacy_keyed=name == "keyed_blake3")
    for key in (None, bytes(32)):
        target = bytearray(base)
        with pytest.raises(InvalidStateError):
            delta.apply(target, key=key)
        assert bytes(target) == base


def test_keyed_version_1_delta_needs_the_opt_in() -> None:
    """No downgrade: a keyed v1 delta's header is not under its MAC, so it is refused
    unless the caller names the opt-in."""
    blob = (FIXTURES / MANIFEST["keyed_blake3"]["file"]).read_bytes()
    expect(blob, "keyed version-1 delta refused", "allow_legacy_keyed")
    assert DeltaSnapshot.deserialize(blob, allow_legacy_keyed=True).keyed
    # Unkeyed version-1 deltas need no opt-in.
    assert DeltaSnapshot.deserialize((FIXTURES / MANIFEST["blake3"]["file"]).read_bytes()).wire_version == 1


@pytest.mark.parametrize("field, value", [
    ("agent_id", b"\x09" * 16), ("sequence", 43), ("base_sequence", 40), ("timestamp", 1),
    ("checksum", 5), ("total_size", 30172 + 1), ("base_size", 4096), ("compression", "zstd"),
])
def test_every_header_field_is_under_the_mac(field: str, value: Any) -> None:
    """Replay to another agent or round: a keyed v2 delta with any header field changed (and
    the wire checks recomputed, as an attacker can) is refused by apply, base unchanged."""
    name = "v2_keyed"
    blob = (FIXTURES / MANIFEST[name]["file"]).read_bytes()
    base, new = make_fixtures.RECIPES[name].states()
    delta = DeltaSnapshot.deserialize(blob)
    setattr(delta, field, value)
    forged = DeltaSnapshot.deserialize(delta.serialize())  # re-sealed wire checks
    target = bytearray(base)
    with pytest.raises(InvalidStateError):
        forged.apply(target, key=make_fixtures.TEST_KEY, max_size=1 << 20)
    assert bytes(target) == base
    # The untouched delta applies.
    target = bytearray(base)
    DeltaSnapshot.deserialize(blob).apply(target, key=make_fixtures.TEST_KEY)
    assert bytes(target) == new


@pytest.mark.parametrize("field, value", [("sequence", 43), ("timestamp", 1), ("agent_id", b"\x09" * 16)])
def test_header_fields_are_under_the_unkeyed_digest(field: str, value: Any) -> None:
    blob = (FIXTURES / MANIFEST["v2_encodings"]["file"]).read_bytes()
    base, _ = make_fixtures.RECIPES["v2_encodings"].states()
    delta = DeltaSnapshot.deserialize(blob)
    setattr(delta, field, value)
    target = bytearray(base)
    with pytest.raises(InvalidStateError, match="header digest mismatch"):
        DeltaSnapshot.deserialize(delta.serialize()).apply(target)
    assert bytes(target) == base


def test_newer_version_is_refused_by_name() -> None:
    blob = bytearray((FIXTURES / MANIFEST["v2_encodings"]["file"]).read_bytes())
    blob[8:10] = struct.pack("<H", 3)
    expect(bytes(blob), "unsupported version 3", "newer")


def test_make_fixtures_reproduces_the_committed_bytes() -> None:
    files, manifest = make_fixtures.build()
    for filename, data in files.items():
        assert (FIXTURES / filename).read_bytes() == data, filename
    assert json.loads(manifest) == MANIFEST


# --------------------------------------------------------------------------------------
# an independent writer, straight from docs/FORMAT.md


HEADER = struct.Struct("<8sHBBB3s16sQQQQI4sQ")
ENTRY = struct.Struct("<QIB3sQ")


@dataclass
class Page:
    index: int
    stored: bytes
    encoding: int = 0
    reserved: bytes = b"\0\0\0"
    check: Optional[int] = None  # None: the correct XXH3-64


@dataclass
class Wire:
    magic: bytes = MAGIC
    version: int = 1
    algorithm: int = 1
    flags: int = 0
    digest_length: Optional[int] = None  # None: len(digest)
    reserved_a: bytes = b"\0\0\0"
    agent_id: bytes = bytes(range(16))
    sequence: int = 2
    base_sequence: int = 1
    total_size: int = 3 * PAGE_SIZE
    timestamp: int = 1_700_000_000
    checksum: int = 0
    reserved_b: bytes = b"\0\0\0\0"
    page_count: Optional[int] = None  # None: len(pages)
    digest: bytes = bytes(16)
    pages: List[Page] = field(default_factory=list)

    def build(self, *, trailer: bool = True) -> bytes:
        header = HEADER.pack(
            self.magic, self.version, self.algorithm, self.flags,
            len(self.digest) if self.digest_length is None else self.digest_length,
            self.reserved_a, self.agent_id, self.sequence, self.base_sequence, self.total_size,
            self.timestamp, self.checksum, self.reserved_b,
            len(self.pages) if self.page_count is None else self.page_count,
        )
        table = b"".join(
            ENTRY.pack(p.index, len(p.stored), p.encoding, p.reserved,
                       xxhash.xxh3_64_intdigest(p.stored) if p.check is None else p.check)
            for p in self.pages
        )
        body = header + self.digest + table + b"".join(p.stored for p in self.pages)
        return body + xxhash.xxh3_128_digest(body) if trailer else body


def reseal(body: bytes) -> bytes:
    """Replace the trailer of ``body`` with a correct whole-payload check."""
    return body[:-16] + xxhash.xxh3_128_digest(body[:-16])


def valid_wire() -> Wire:
    """Three pages of a 2.5-page state: a raw page, an RLE page, the short raw tail."""
    total = 2 * PAGE_SIZE + 2048
    return Wire(
        total_size=total,
        pages=[
            Page(0, bytes(range(256)) * 16),
            Page(1, simple_compress(bytes(PAGE_SIZE)), encoding=1),
            Page(2, b"\x07" * 2048),
        ],
    )


def test_independent_writer_matches_the_encoder() -> None:
    """docs/FORMAT.md is accurate: a writer built from it produces encode_delta's bytes."""
    wire = valid_wire()
    blob = wire.build()
    fields = decode_delta(blob)
    assert fields["agent_id"] == wire.agent_id
    assert fields["total_size"] == wire.total_size
    assert fields["digest_algorithm"] == "xxh3_128" and fields["digest"] == wire.digest
    assert [(p.index, p.compressed, p.data) for p in fields["dirty_pages"]] == [
        (p.index, p.encoding == 1, p.stored) for p in wire.pages
    ]
    assert encode_delta(SimpleNamespace(**fields)) == blob


HEADER_V2 = struct.Struct("<8sHBBBB2s16sQQQQQIIQQ")


def test_real_delta_layout_matches_the_documentation() -> None:
    """docs/FORMAT.md, version 2: header, state digest, header digest, payload, page table
    (indices, stored lengths, page checks, encodings), trailer."""
    old = bytearray(5 * PAGE_SIZE + 10)
    new = bytearray(old)
    new[3 * PAGE_SIZE + 5] = 9
    new[-10:] = b"0123456789"
    delta = DeltaSnapshot.create(uuid.UUID(int=7), old, new, 3, 4, digest="blake3")
    blob = delta.serialize()
    (magic, version, alg, flags, dlen, comp, _, agent, seq, base_seq, total, base_size, ts, checksum, count,
     wire_size, payload_size) = HEADER_V2.unpack_from(blob)
    assert (magic, version, alg, flags, dlen, comp) == (b"\x89CMD\r\n\x1a\n", 2, 2, 0, 32, 0)
    assert agent == uuid.UUID(int=7).bytes
    assert (seq, base_seq, total, base_size, ts, checksum, count) == (
        4, 3, len(new), len(old), delta.timestamp, simple_checksum(new), 2)
    assert blob[96:128] == digest(new, "blake3") == delta.digest
    assert blob[128:160] == delta.header_digest
    table = 160 + wire_size
    assert wire_size == payload_size
    idx = struct.unpack_from("<2I", blob, table)
    lengths = struct.unpack_from("<2H", blob, table + 8)
    checks = struct.unpack_from("<2I", blob, table + 12)
    encodings = list(blob[table + 20 : table + 22])
    assert idx == (3, 5)
    # page 3, one byte set over zeros: XZR (skip 5, 1 literal: 9); the 10-byte tail: raw
    # (its XZR stream, 2 + 10 bytes, is not smaller)
    assert encodings == [3, 0] and lengths == (3, 10)
    assert blob[160:163] == bytes([5, 1, 9]) and blob[163:173] == b"0123456789"
    assert checks == (simple_checksum(blob[160:163]), simple_checksum(blob[163:173]))
    assert table + 22 + 16 == len(blob)
    assert blob[-16:] == xxhash.xxh3_128_digest(blob[:-16])


# --------------------------------------------------------------------------------------
# round trips


pages_strategy = st.lists(
    st.tuples(st.integers(0, 7), st.sampled_from(["zeros", "random", "runs", "ff"])), max_size=8, unique_by=lambda t: t[0]
)


@settings(max_examples=60, deadline=None)
@given(
    npages=st.integers(0, 8),
    tail=st.integers(0, PAGE_SIZE - 1),
    edits=pages_strategy,
    algorithm=st.sampled_from([None, "xxh3_128", "blake3", "keyed"]),
    seed=st.binary(min_size=1, max_size=8),
)
def test_create_serialize_deserialize_apply_round_trip(
    npages: int, tail: int, edits: List[Tuple[int, str]], algorithm: Optional[str], seed: bytes
) -> None:
    size = npages * PAGE_SIZE + tail
    old = hashlib.shake_256(seed).digest(size)
    new = bytearray(old)
    for index, kind in edits:
        start = index * PAGE_SIZE
        if start >= size:
            continue
        length = min(PAGE_SIZE, size - start)
        fill = {
            "zeros": bytes(length),
            "random": hashlib.shake_256(seed + bytes([index])).digest(length),
            "runs": (b"\x01" * 100 + b"\x02" * 50) * (length // 150) + b"\x03" * (length % 150),
            "ff": b"\xff" * length,
        }[kind]
        new[start : start + length] = fill
    key = bytes(range(32)) if algorithm == "keyed" else None
    delta = DeltaSnapshot.create(b"\x01" * 16, old, new, 5, 6, digest="blake3" if key else algorithm, key=key)
    blob = delta.serialize()
    back = DeltaSnapshot.deserialize(blob)
    assert back == delta
    assert back.serialize() == blob
    target = bytearray(old)
    back.apply(target, key=key)
    assert target == new


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview, "numpy"])
def test_decode_accepts_any_buffer(kind: Any) -> None:
    blob = valid_wire().build()
    data = np.frombuffer(blob, dtype=np.uint8) if kind == "numpy" else kind(blob)
    assert decode_delta(data)["total_size"] == 2 * PAGE_SIZE + 2048


def test_decode_refuses_non_buffers() -> None:
    with pytest.raises(TypeError):
        decode_delta("not bytes")
    with pytest.raises(TypeError):
        DeltaSnapshot.deserialize(12345)


def test_decoded_pages_do_not_alias_the_input() -> None:
    blob = bytearray(valid_wire().build())
    fields = decode_delta(blob)
    before = [p.data for p in fields["dirty_pages"]]
    blob[:] = bytes(len(blob))
    assert [p.data for p in fields["dirty_pages"]] == before


# --------------------------------------------------------------------------------------
# every validation, one field at a time


def expect(blob: bytes, *fragments: str, **kwargs: Any) -> CorruptDataError:
    with pytest.raises(CorruptDataError) as info:
        DeltaSnapshot.deserialize(blob) if not kwargs else decode_delta(blob, **kwargs)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert isinstance(info.value, ValueError)
    return info.value


def test_bad_magic() -> None:
    blob = valid_wire().build()
    expect(b"", "bad magic")
    expect(b"\x89CMD", "bad magic")
    expect(b"PK\x03\x04" + blob[4:], "bad magic")
    expect(replace(valid_wire(), magic=b"\x89CMD\n\n\x1a\n").build(), "bad magic")


def test_truncated_header() -> None:
    blob = valid_wire().build()
    expect(blob[:50], "truncated")
    expect(blob[:95], "truncated")


def test_unsupported_version() -> None:
    expect(replace(valid_wire(), version=3).build(), "version 3")
    expect(replace(valid_wire(), version=0).build(), "version 0")


def test_unknown_digest_algorithm_and_flags() -> None:
    expect(replace(valid_wire(), algorithm=4).build(), "digest algorithm id 4")
    expect(replace(valid_wire(), flags=0x02).build(), "unknown flags 0x02")
    expect(replace(valid_wire(), flags=0x81).build(), "unknown flags 0x80")
    expect(replace(valid_wire(), flags=1).build(), "keyed", "xxh3_128")
    expect(replace(valid_wire(), flags=1, algorithm=0, digest=b"").build(), "keyed")


def test_digest_length_must_match_the_algorithm() -> None:
    expect(replace(valid_wire(), digest=bytes(32)).build(), "digest length 32", "xxh3_128")
    expect(replace(valid_wire(), algorithm=2).build(), "digest length 16", "blake3")
    expect(replace(valid_wire(), algorithm=0).build(), "digest length 16")
    # The declared length lies about the bytes that follow: still the digest-length check.
    expect(replace(valid_wire(), digest_length=32).build(), "digest length 32")


def test_keyed_blake3_decodes() -> None:
    fields = decode_delta(replace(valid_wire(), algorithm=2, flags=1, digest=bytes(range(32))).build(),
                          allow_legacy_keyed=True)
    assert (fields["digest_algorithm"], fields["keyed"], fields["digest"]) == ("blake3", True, bytes(range(32)))
    fields = decode_delta(replace(valid_wire(), algorithm=0, digest=b"").build())
    assert (fields["digest_algorithm"], fields["digest"], fields["keyed"]) == (None, None, False)


def test_reserved_header_bytes_must_be_zero() -> None:
    expect(replace(valid_wire(), reserved_a=b"\0\x01\0").build(), "reserved")
    expect(replace(valid_wire(), reserved_b=b"\0\0\0\x80").build(), "reserved")


def test_total_size_is_bounded() -> None:
    expect(replace(valid_wire(), total_size=DEFAULT_MAX_TOTAL_SIZE + 1, pages=[]).build(), "total_size", "maximum")
    expect(replace(valid_wire(), total_size=2**64 - 1, pages=[]).build(), "total_size")
    assert decode_delta(replace(valid_wire(), total_size=DEFAULT_MAX_TOTAL_SIZE, pages=[]).build())["total_size"] == (
        DEFAULT_MAX_TOTAL_SIZE
    )
    blob = valid_wire().build()
    expect(blob, "total_size 10240 exceeds the maximum of 10000", max_total_size=10_000)
    assert decode_delta(blob, max_total_size=10_240)["total_size"] == 10_240
    with pytest.raises(CorruptDataError, match="total_size 10240 exceeds the maximum of 10239"):
        DeltaSnapshot.deserialize(blob, max_total_size=10_239)
    with pytest.raises(ValueError):
        decode_delta(blob, max_total_size=-1)


def test_page_count_is_bounded_by_the_state_and_the_input() -> None:
    expect(replace(valid_wire(), page_count=4).build(), "page count 4", "3 pages")
    expect(replace(valid_wire(), total_size=0, pages=[]).build()[:-16], "truncated")  # no room for the digest
    # Within the state's page count, but the table does not fit in the input.
    big = replace(valid_wire(), total_size=1 << 36, pages=[], page_count=1 << 24)
    expect(big.build(), "page count 16777216", "page table")


def _peak_bytes(run: Callable[[], object]) -> int:
    """Peak bytes Python allocated while ``run`` ran."""
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_declared_sizes_are_never_allocated() -> None:
    """A 112-byte input declaring a 64 GiB state and 2**24 pages allocates next to nothing."""
    blob = replace(valid_wire(), total_size=DEFAULT_MAX_TOTAL_SIZE, pages=[], page_count=1 << 24).build()
    assert len(blob) == 112
    assert _peak_bytes(lambda: expect(blob, "page count")) < 64 * 1024


def test_a_huge_page_table_is_not_materialized() -> None:
    """100,000 table entries (2.4 MB of input) that fail at the first entry: the reader
    must not build per-entry objects for the whole table first."""
    entries = [Page(k, b"", encoding=1) for k in range(100_000)]
    blob = replace(valid_wire(), total_size=100_000 * PAGE_SIZE, pages=entries).build()
    peak = _peak_bytes(lambda: expect(blob, "page 0: compressed length 0"))
    assert peak < 256 * 1024, peak


def test_payload_lengths_must_match_the_input() -> None:
    wire = valid_wire()
    body = wire.build(trailer=False)
    trailer = wire.build()[-16:]
    # A page's bytes missing: the table declares more than is present.
    cut = body[:-100]
    expect(cut + xxhash.xxh3_128_digest(cut), "truncated", "page payloads")
    # Extra bytes between the payloads and the trailer, or after the trailer.
    padded = body + b"\0" * 5
    expect(padded + xxhash.xxh3_128_digest(padded), "5 trailing bytes")
    expect(body + trailer + b"\0", "trailing bytes")
    expect(body + trailer + trailer, "16 trailing bytes")


def test_page_index_out_of_range() -> None:
    wire = valid_wire()
    wire.pages[2] = Page(3, b"\x07" * 2048)
    expect(wire.build(), "page 2: index 3 out of range")
    wire.pages[2] = Page(2**63, b"\x07" * 2048)
    expect(wire.build(), "page 2: index 9223372036854775808 out of range")
    wire.pages[2] = Page(2**64 - 1, b"\x07" * 2048)
    expect(wire.build(), "page 2: index 18446744073709551615 out of range")


def test_page_indices_strictly_increasing() -> None:
    wire = valid_wire()
    wire.pages[1], wire.pages[0] = wire.pages[0], wire.pages[1]
    expect(wire.build(), "page 1: index 0", "strictly increasing")
    dup = valid_wire()
    dup.pages[1] = Page(0, bytes(PAGE_SIZE))
    expect(dup.build(), "page 1: index 0", "strictly increasing")


def test_page_encoding_and_reserved() -> None:
    wire = valid_wire()
    wire.pages[1].encoding = 2
    expect(wire.build(), "page 1: unknown encoding 2")
    wire = valid_wire()
    wire.pages[0].reserved = b"\x01\0\0"
    expect(wire.build(), "page 0: reserved")


def test_raw_page_length_must_be_the_page_length() -> None:
    wire = valid_wire()
    wire.pages[0] = Page(0, bytes(PAGE_SIZE - 1))
    expect(wire.build(), "page 0: stored length 4095")
    wire = valid_wire()
    wire.pages[2] = Page(2, bytes(PAGE_SIZE))  # the tail page is 2048 bytes
    expect(wire.build(), "page 2: stored length 4096", "2048")
    wire = valid_wire()
    wire.pages[0] = Page(0, bytes(PAGE_SIZE + 1))
    expect(wire.build(), "page 0: stored length 4097")


def test_compressed_page_length_bounds() -> None:
    wire = valid_wire()
    wire.pages[1] = Page(1, b"", encoding=1)
    expect(wire.build(), "page 1: compressed length 0")
    wire.pages[1] = Page(1, b"\x01" * (3 * PAGE_SIZE + 1), encoding=1)
    expect(wire.build(), "page 1: compressed length 12289")
    # 3 * L bytes of count-1 markers is the longest stream that can decode to L bytes.
    wire.pages[2] = Page(2, b"\xff\x01\x07" * 2048, encoding=1)
    wire.pages[1] = Page(1, simple_compress(bytes(PAGE_SIZE)), encoding=1)
    assert decode_delta(wire.build())["dirty_pages"][2].data == b"\xff\x01\x07" * 2048


def test_compressed_page_must_decode_to_exactly_the_page() -> None:
    wire = valid_wire()
    wire.pages[1] = Page(1, simple_compress(bytes(PAGE_SIZE - 1)), encoding=1)
    expect(wire.build(), "page 1: decompressed to 4095 bytes")
    wire.pages[1] = Page(1, simple_compress(bytes(PAGE_SIZE + 1)), encoding=1)
    expect(wire.build(), "page 1: compressed data is corrupt", "max_output")
    # A decompression bomb: 12 KiB of markers would be 127 * 4096 bytes.
    wire.pages[1] = Page(1, b"\xff\x7f\x00" * PAGE_SIZE, encoding=1)
    expect(wire.build(), "page 1: compressed data is corrupt")
    wire.pages[1] = Page(1, simple_compress(bytes(PAGE_SIZE - 2)) + b"\xff\x02", encoding=1)
    expect(wire.build(), "page 1: compressed data is corrupt", "truncated")
    wire.pages[1] = Page(1, b"\xff\x00\x00" + simple_compress(bytes(PAGE_SIZE)), encoding=1)
    expect(wire.build(), "page 1: compressed data is corrupt", "zero run length")


def test_page_check_mismatch() -> None:
    wire = valid_wire()
    wire.pages[2].check = xxhash.xxh3_64_intdigest(wire.pages[2].stored) ^ 1
    expect(wire.build(), "page 2: page check mismatch")
    # A flipped payload byte with the whole-payload check recomputed by an attacker.
    blob = bytearray(valid_wire().build())
    blob[-16 - 1] ^= 0x40
    expect(reseal(bytes(blob)), "page 2: page check mismatch")


def test_whole_payload_check_mismatch() -> None:
    blob = bytearray(valid_wire().build())
    blob[-1] ^= 1
    expect(bytes(blob), "whole-payload check mismatch")
    for offset in (16, 33, 60, 66):  # agent id, sequence, timestamp, checksum: not covered by a page check
        blob = bytearray(valid_wire().build())
        blob[offset] ^= 0x10
        expect(bytes(blob), "whole-payload check mismatch")


@pytest.mark.parametrize("cut", [0, 1, 8, 79, 80, 95, 96, 100, 200, 1000, -17, -16, -1])
def test_every_truncation_is_refused(cut: int) -> None:
    blob = valid_wire().build()
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(blob[:cut])


# --------------------------------------------------------------------------------------
# the encoder refuses what the decoder would reject


def stand_in(**overrides: Any) -> SimpleNamespace:
    """A duck-typed delta (the encoder reads attributes only)."""
    fields: Dict[str, Any] = dict(
        agent_id=bytes(16), sequence=1, base_sequence=0, total_size=PAGE_SIZE + 10, timestamp=0,
        checksum=0, digest_algorithm=None, digest=None, keyed=False,
        dirty_pages=[SimpleNamespace(index=0, data=bytes(PAGE_SIZE), compressed=False),
                     SimpleNamespace(index=1, data=b"\x01" * 10, compressed=False)],
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_stand_in_encodes_and_decodes() -> None:
    blob = encode_delta(stand_in())
    fields = decode_delta(blob)
    pages = DeltaSnapshot(**fields).dirty_pages
    assert [p.index for p in pages] == [0, 1]
    assert isinstance(pages[0], DirtyPage)
    assert encode_delta(stand_in(agent_id=uuid.UUID(bytes=b"\x02" * 16)))[16:32] == b"\x02" * 16


@pytest.mark.parametrize(
    "overrides, error, fragment",
    [
        (dict(agent_id=bytes(15)), ValueError, "agent_id"),
        (dict(sequence=-1), ValueError, "sequence"),
        (dict(base_sequence=2**64), ValueError, "base_sequence"),
        (dict(timestamp=1.5), TypeError, "timestamp"),
        (dict(checksum=2**32), ValueError, "checksum"),
        (dict(total_size=-5), ValueError, "total_size"),
        (dict(digest_algorithm="md5", digest=bytes(16)), ValueError, "digest_algorithm"),
        (dict(digest_algorithm="blake3", digest=bytes(256)), ValueError, "digest of 256 bytes"),
        (dict(dirty_pages=[SimpleNamespace(index=-1, data=b"", compressed=False)]), ValueError, "page 0: index -1"),
        (dict(dirty_pages=[SimpleNamespace(index=2**64, data=b"", compressed=False)]), ValueError, "page 0: index"),
        (dict(dirty_pages=[SimpleNamespace(index=0, data="text", compressed=False)]), TypeError, "page 0: data"),
        (dict(dirty_pages=[b"not a page"]), TypeError, "page 0: bytes is not a dirty page"),
    ],
)
def test_encoder_refuses_what_the_format_cannot_represent(overrides: Dict[str, Any], error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        encode_delta(stand_in(**overrides))
    assert fragment in str(info.value)


def _fresh_delta() -> Tuple[bytes, bytes, DeltaSnapshot]:
    base = hashlib.shake_256(b"tamper").digest(4 * PAGE_SIZE + 100)
    new = bytearray(base)
    new[0:300] = bytes(300)  # page 0 random with a zero run: RLE
    new[PAGE_SIZE + 5] ^= 1  # page 1: raw
    new[-1] ^= 1  # page 4 (short tail): raw
    return base, bytes(new), DeltaSnapshot.create(b"\x05" * 16, base, new, 1, 2)


def _swap(d: DeltaSnapshot) -> None:
    d.dirty_pages[0], d.dirty_pages[1] = d.dirty_pages[1], d.dirty_pages[0]


def _set(attr: str, value: Any, page: Optional[int] = None) -> Any:
    def edit(d: DeltaSnapshot) -> None:
        setattr(d if page is None else d.dirty_pages[page], attr, value)

    return edit


@pytest.mark.parametrize(
    "tamper, fragment",
    [
        (_set("index", 999, page=2), "page 2: index 999 out of range"),
        (_set("index", 2**32 - 1, page=0), "page 0: index 4294967295 out of range"),
        (_swap, "page 1: index 0", ),
        (lambda d: d.dirty_pages.append(d.dirty_pages[-1]), "page 3: index 4 is not after 4"),
        (_set("data", b"\x01" * 10, page=1), "page 1: stored length 10"),
        (_set("data", b"\xff\x01", page=0), "page 0: compressed data is corrupt"),
        (_set("data", b"\xff\x10\x00", page=0), "page 0: decompressed to 16 bytes"),
        (_set("compressed", False, page=0), "page 0: stored length"),
        (_set("digest", bytes(8)), "digest length 8"),
        (_set("keyed", True), "keyed"),
        (_set("digest_algorithm", "blake3"), "digest length 16 does not match digest algorithm 'blake3'"),
        (_set("digest_algorithm", None), "digest length 16 does not match digest algorithm None"),
        (_set("total_size", DEFAULT_MAX_TOTAL_SIZE + 1), "total_size"),
        (_set("total_size", PAGE_SIZE), "page count 3 exceeds the 1 pages"),
    ],
)
def test_delta_tampered_in_memory_serializes_and_is_refused_by_the_reader(tamper: Any, fragment: str) -> None:
    _, _, delta = _fresh_delta()
    tamper(delta)
    blob = delta.serialize()  # the writer is faithful: it does not hide the tampering
    expect(blob, fragment)


@pytest.mark.parametrize("page, offset", [(0, 0), (1, 5), (2, 99)])
def test_same_length_content_tampering_is_refused_by_apply(page: int, offset: int) -> None:
    """The wire checks are recomputed by the writer, so content forgery reaches apply,
    whose checksum/digest verification refuses it with the base untouched."""
    base, new, delta = _fresh_delta()
    target = bytearray(base)
    raw = bytearray(delta.dirty_pages[page].get_data())
    raw[offset] ^= 0x20
    delta.dirty_pages[page] = DirtyPage(delta.dirty_pages[page].index, bytes(raw))
    back = DeltaSnapshot.deserialize(delta.serialize())
    with pytest.raises(InvalidStateError):
        back.apply(target)
    assert bytes(target) == base


def test_encoding_is_deterministic_and_version_pinned() -> None:
    blob = encode_delta(stand_in())
    assert blob == encode_delta(stand_in())
    assert blob[:8] == MAGIC and struct.unpack_from("<H", blob, 8)[0] == VERSION == 2
    # Version 2 cannot hold a page index over 2**32 - 1 (16 TiB states): refused by the writer.
    with pytest.raises(ValueError, match="page 0: index 4294967296 does not fit"):
        encode_delta(stand_in(dirty_pages=[SimpleNamespace(index=2**32, data=b"", compressed=False)]))
