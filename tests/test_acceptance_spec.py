"""Independent acceptance tests of cellmigrate against SPEC.md, SPEC-audit-recovery.md and
the seed ``validation.rs``.

Black box: only public names of ``cellmigrate`` are used, and every expected value comes
from an oracle written here from the spec text (pure Python), or from the maintained
``lz4`` / ``zstandard`` / ``xxhash`` / ``blake3`` packages named by the spec.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import mmap
import os
import struct
import tempfile
import time
import uuid

import blake3
import lz4.block
import numpy as np
import pytest
import xxhash
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellmigrate
from cellmigrate import (
    PAGE_SIZE,
    Agent,
    AgentRequirements,
    AuditEntry,
    AuditEventType,
    CellError,
    CollectingCallback,
    CompatibilityStatus,
    CompatibilityValidator,
    CompressionMethod,
    CorruptDataError,
    DeltaSnapshot,
    DirtyPage,
    DirtyPageTracker,
    ExecutionFailedError,
    IncrementalMigrator,
    InvalidStateError,
    MigrationAuditLog,
    MigrationError,
    MigrationErrorType,
    MigrationFailedError,
    MigrationPhase,
    MigrationProgressEvent,
    MigrationProgressTracker,
    MigrationRecoveryManager,
    MigrationStats,
    MigrationValidator,
    MultiCallback,
    NodeCapabilities,
    Policy,
    RecoveryAttempt,
    RecoveryConfig,
    RecoveryStrategy,
    RollbackInfo,
    StateVerifier,
    VerificationResult,
    adaptive_compress,
    adaptive_compress_aggressive,
    adaptive_decompress,
    digest,
    dirty_pages,
    first_difference,
    lz4_compress,
    lz4_decompress,
    simple_checksum,
    simple_compress,
    simple_decompress,
    zstd_compress,
    zstd_decompress,
)

HSET = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
M32 = 0xFFFFFFFF
MID = bytes([1] * 16)
AID = bytes([2] * 16)
SRC = bytes([3] * 16)
DST = bytes([4] * 16)
GiB = 1024 ** 3


# ---------------------------------------------------------------------------------------
# Oracles (written from the spec text)
# ---------------------------------------------------------------------------------------


def o_checksum(data: bytes) -> int:
    """sum(data[i] * (i + 1)) with u32 wrapping (weights wrap too)."""
    n = len(data)
    if n == 0:
        return 0
    a = np.frombuffer(data, dtype=np.uint8).astype(np.uint64)
    w = (np.arange(1, n + 1, dtype=np.uint64) & np.uint64(M32))
    prod = (a * w) & np.uint64(M32)
    return int(prod.sum(dtype=np.uint64)) & M32


def o_checksum_slow(data: bytes) -> int:
    s = 0
    for i, b in enumerate(data):
        s = (s + ((b * ((i + 1) & M32)) & M32)) & M32
    return s


def o_tree(data: bytes) -> bytes:
    """xxh3_128_tree by its definition: XXH3-128 of the 1 MiB leaves' XXH3-128 digests
    followed by the length as u64 little-endian."""
    data = bytes(data)
    leaves = b"".join(xxhash.xxh3_128_digest(data[i : i + (1 << 20)]) for i in range(0, len(data), 1 << 20))
    return xxhash.xxh3_128_digest(leaves + struct.pack("<Q", len(data)))


def o_rle(data: bytes) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        j = i + 1
        while j < n and data[j] == b and j - i < 127:
            j += 1
        run = j - i
        if run >= 4 or b == 0xFF:
            out += bytes((0xFF, run, b))
        else:
            out += data[i:j]
        i = j
    return bytes(out)


class _OCorrupt(Exception):
    pass


def o_unrle(data: bytes, max_output=None) -> bytes:
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        if data[i] == 0xFF:
            if i + 2 >= n:
                raise _OCorrupt("truncated marker")
            cnt = data[i + 1]
            if cnt == 0:
                raise _OCorrupt("zero count")
            out += bytes([data[i + 2]]) * cnt
            i += 3
        else:
            out.append(data[i])
            i += 1
        if max_output is not None and len(out) > max_output:
            raise _OCorrupt("too long")
    return bytes(out)


def o_dirty(old: bytes, new: bytes, ps: int = PAGE_SIZE):
    n = len(new)
    return [i for i in range((n + ps - 1) // ps) if old[i * ps:(i + 1) * ps] != new[i * ps:(i + 1) * ps]]


def o_version_part(s):
    # Rust: s.parse::<u32>().ok().unwrap_or(0)  ('+' allowed, no whitespace/underscore/sign '-')
    if s is None:
        return 0
    body = s[1:] if s.startswith("+") else s
    if not body or not all(c in "0123456789" for c in body):
        return 0
    v = int(body)
    return v if v <= M32 else 0


def o_version_compatible(agent: str, minimum: str) -> bool:
    def parse(v):
        parts = v.split(".")
        return tuple(o_version_part(parts[k] if k < len(parts) else None) for k in range(3))

    a, m = parse(agent), parse(minimum)
    return a[0] == m[0] and (a[1] > m[1] or (a[1] == m[1] and a[2] >= m[2]))


def rust_debug_list(items):
    def esc(s):
        out = []
        for ch in s:
            if ch == '"':
                out.append('\\"')
            elif ch == "\\":
                out.append("\\\\")
            elif ch == "\n":
                out.append("\\n")
            elif ch == "\t":
                out.append("\\t")
            elif ch == "\r":
                out.append("\\r")
            else:
                out.append(ch)
        return '"' + "".join(out) + '"'

    return "[" + ", ".join(esc(s) for s in items) + "]"


def rnd(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def b(x) -> bytes:
    if isinstance(x, mmap.mmap):
        return x[:]
    if isinstance(x, np.ndarray):
        return x.tobytes()
    return bytes(x)


# ---------------------------------------------------------------------------------------
# §1 / §4 package shape and errors
# ---------------------------------------------------------------------------------------


def test_error_hierarchy():
    assert issubclass(CellError, Exception)
    assert issubclass(InvalidStateError, CellError)
    assert issubclass(CorruptDataError, CellError)
    assert issubclass(CorruptDataError, ValueError)
    assert issubclass(MigrationFailedError, CellError)
    assert issubclass(ExecutionFailedError, CellError)


def test_error_display_prefixes():
    assert str(InvalidStateError("x y")) == "Invalid state: x y"
    assert str(MigrationFailedError("boom")) == "Migration failed: boom"
    assert str(ExecutionFailedError("trap")) == "Agent execution failed: trap"


def test_page_size():
    assert PAGE_SIZE == 4096


def test_compiled_kernels_are_private():
    names = [n for n in cellmigrate.__all__] if hasattr(cellmigrate, "__all__") else []
    assert not any(n.startswith("_") and not n.startswith("__") for n in names)
    assert "_kernels" not in names and "_reference" not in names


# ---------------------------------------------------------------------------------------
# §3 simple_checksum
# ---------------------------------------------------------------------------------------


def test_checksum_spec_examples():
    assert simple_checksum(b"") == 0
    assert simple_checksum(bytes([1, 2, 3, 4, 5])) == 55
    assert simple_checksum(b"\xff" * 126) == 2040255
    assert simple_checksum(bytes([1, 2, 3, 4, 5])) != simple_checksum(bytes([1, 2, 3, 4, 6]))


def test_checksum_trailing_zeros_do_not_change_it():
    d = rnd(1000, 3)
    assert simple_checksum(d) == simple_checksum(d + b"\0" * 5000)


def test_checksum_wraps_mod_2_32():
    d = b"\xff" * 300000  # sum = 255 * n(n+1)/2 > 2**32
    assert simple_checksum(d) == o_checksum(d)
    assert simple_checksum(d) == (255 * 300000 * 300001 // 2) % 2 ** 32


@HSET
@given(st.binary(max_size=3000))
def test_checksum_matches_oracle(data):
    assert simple_checksum(data) == o_checksum_slow(data)


@pytest.mark.parametrize("n", [0, 1, 7, 15, 16, 31, 32, 33, 63, 64, 65, 4095, 4096, 4097, 100003, 1 << 20])
def test_checksum_lengths(n):
    d = rnd(n, n)
    assert simple_checksum(d) == o_checksum(d)


# ---------------------------------------------------------------------------------------
# §2 buffers
# ---------------------------------------------------------------------------------------


def _kinds(data: bytes):
    mm = mmap.mmap(-1, max(len(data), 1))
    mm[: len(data)] = data
    out = {
        "bytes": data,
        "bytearray": bytearray(data),
        "memoryview": memoryview(data),
        "memoryview-cast": memoryview(bytearray(data)).cast("B"),
        "numpy-uint8": np.frombuffer(data, dtype=np.uint8).copy(),
    }
    if len(data) == len(mm):
        out["mmap"] = mm
    n = len(data)
    for dt in (np.uint16, np.int32, np.float64, np.complex128):
        size = np.dtype(dt).itemsize
        if n % size == 0:
            out["numpy-" + np.dtype(dt).name] = np.frombuffer(data, dtype=dt).copy()
    if n % 64 == 0 and n:
        out["numpy-2d"] = np.frombuffer(data, dtype=np.uint8).copy().reshape(-1, 64)
        out["numpy-2d-u32"] = np.frombuffer(data, dtype=np.uint32).copy().reshape(-1, 4)
    return out


def test_every_buffer_kind_checksum_compress_digest():
    data = rnd(4096 * 3, 11)[:12288]
    data = data[:6000] + b"\0" * 6288
    for kind, obj in _kinds(data).items():
        assert simple_checksum(obj) == o_checksum(data), kind
        assert simple_compress(obj) == o_rle(data), kind
        assert digest(obj) == o_tree(data), kind
        assert digest(obj, "xxh3_128") == xxhash.xxh3_128_digest(data), kind
        assert digest(obj, "blake3") == blake3.blake3(data).digest(), kind
        assert first_difference(obj, data) is None, kind


def test_every_buffer_kind_delta_create_and_verify():
    old = rnd(4096 * 4, 1)
    new = bytearray(old)
    new[5000] ^= 1
    new = bytes(new)
    ko, kn = _kinds(old), _kinds(new)
    for kind in ko:
        d = DeltaSnapshot.create(AID, ko[kind], kn[kind], 0, 1)
        assert [p.index for p in d.dirty_pages] == [1], kind
        assert d.checksum == o_checksum(new)
        assert list(dirty_pages(ko[kind], kn[kind])) == [1], kind
        assert first_difference(ko[kind], kn[kind]) == 5000, kind
        r = StateVerifier.verify_state(ko[kind], ko[kind], o_checksum(old))
        assert r.passed, kind


def test_numpy_views_as_raw_bytes():
    a = np.arange(1000, dtype=np.uint32)
    assert simple_checksum(a) == o_checksum(a.tobytes())
    f = np.linspace(0, 1, 999, dtype=np.float32)
    assert simple_checksum(f) == o_checksum(f.tobytes())
    assert simple_checksum(np.zeros(0, dtype=np.float64)) == 0


def _noncontig():
    base = np.arange(8192, dtype=np.uint8)
    return [
        base[::2],
        np.asfortranarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)),
        memoryview(bytearray(8192))[::2],
        np.arange(4096, dtype=np.uint16)[::3],
        memoryview(bytes(8192))[::-1],
        np.arange(8192, dtype=np.uint8)[::-1],
    ]


@pytest.mark.parametrize("idx", range(6))
def test_non_contiguous_refused_by_every_reader(idx):
    x = _noncontig()[idx]
    n = x.nbytes
    calls = [
        lambda: simple_checksum(x),
        lambda: simple_compress(x),
        lambda: digest(x),
        lambda: first_difference(x, bytes(n)),
        lambda: dirty_pages(bytes(n), x),
        lambda: DeltaSnapshot.create(AID, bytes(n), x, 0, 1),
        lambda: StateVerifier.verify_state(x, bytes(n), 0),
    ]
    for k, call in enumerate(calls):
        with pytest.raises((TypeError, ValueError)) as ei:
            call()
        assert "contiguous" in str(ei.value).lower(), (k, str(ei.value))


def test_non_contiguous_target_refused_and_untouched():
    old = bytes(8192)
    new = bytearray(old)
    new[1] = 9
    d = DeltaSnapshot.create(AID, old, bytes(new), 0, 1)
    big = np.zeros(16384, dtype=np.uint8)
    view = big[::2]
    with pytest.raises((TypeError, ValueError)) as ei:
        d.apply(view)
    assert "contiguous" in str(ei.value).lower()
    assert not big.any()


@pytest.mark.large
def test_sparse_over_4gib_checksum_wraps_weights():
    size = 2 ** 32 + 3 * 4096
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for k in range(2):
            p = os.path.join(tmp, "s%d" % k)
            with open(p, "wb") as f:
                f.truncate(size)
                for off, val in ((10, 2), (2 ** 32 - 1, 7), (2 ** 32, 5), (2 ** 32 + 10, 3)):
                    f.seek(off)
                    f.write(bytes([val]))
                if k == 1:
                    f.seek(2 ** 32 + 4096 + 5)
                    f.write(b"\x01")
            paths.append(p)
        fa, fb = open(paths[0], "rb"), open(paths[1], "rb")
        ma = mmap.mmap(fa.fileno(), 0, access=mmap.ACCESS_READ)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            # weight(i) = (i + 1) mod 2**32: byte at 2**32 - 1 has weight 0, at 2**32 weight 1
            assert simple_checksum(ma) == 2 * 11 + 7 * 0 + 5 * 1 + 3 * 11
            exp_b = (2 * 11 + 5 * 1 + 3 * 11 + 1 * ((2 ** 32 + 4096 + 6) % 2 ** 32)) % 2 ** 32
            assert simple_checksum(mb) == exp_b
            assert first_difference(ma, mb) == 2 ** 32 + 4096 + 5
            assert list(dirty_pages(ma, mb)) == [(2 ** 32 + 4096 + 5) // 4096]
        finally:
            ma.close()
            mb.close()
            fa.close()
            fb.close()


# ---------------------------------------------------------------------------------------
# §3 RLE
# ---------------------------------------------------------------------------------------

RLE_VECTORS = [
    (b"", b""),
    (b"A", b"A"),
    (b"AAA", b"AAA"),
    (b"AAAA", b"\xff\x04A"),
    (b"\x00" * 4096, b"\xff\x7f\x00" * 32 + b"\xff\x20\x00"),
    (b"\xff", b"\xff\x01\xff"),
    (b"\xff\xff", b"\xff\x02\xff"),
    (b"\xff\xff\xff", b"\xff\x03\xff"),
    (b"\x00" * 127, b"\xff\x7f\x00"),
    (b"\x00" * 128, b"\xff\x7f\x00\x00"),
    (b"\x00" * 131, b"\xff\x7f\x00\xff\x04\x00"),
    (b"\x00" * 130, b"\xff\x7f\x00\x00\x00\x00"),
    (b"ab\x00\x00\x00\x00\x00cd", b"ab\xff\x05\x00cd"),
    (b"\xff" * 128, b"\xff\x7f\xff\xff\x01\xff"),
    (b"\xfe\xfe\xfe\xff", b"\xfe\xfe\xfe\xff\x01\xff"),
]


@pytest.mark.parametrize("raw,enc", RLE_VECTORS)
def test_rle_vectors(raw, enc):
    assert o_rle(raw) == enc  # the oracle agrees with the hand vectors
    assert simple_compress(raw) == enc
    assert simple_decompress(enc) == raw


def test_rle_crate_test_vectors():
    original = b"\0" * 500 + bytes(range(200)) + b"\xff" * 300
    enc = simple_compress(original)
    assert enc == o_rle(original)
    assert simple_decompress(enc) == original
    z = b"\0" * 1000
    assert len(simple_compress(z)) < len(z)


@HSET
@given(st.binary(max_size=2000))
def test_rle_matches_oracle_random(data):
    enc = simple_compress(data)
    assert enc == o_rle(data)
    assert simple_decompress(enc) == data


@HSET
@given(st.lists(st.tuples(st.sampled_from([0, 1, 0xFF, 0x41]), st.integers(1, 300)), max_size=20))
def test_rle_matches_oracle_runs(runs):
    data = b"".join(bytes([v]) * n for v, n in runs)
    assert simple_compress(data) == o_rle(data)
    assert simple_decompress(simple_compress(data)) == data


@HSET
@given(st.binary(max_size=60).map(lambda x: x.replace(b"\x01", b"\xff")))
def test_rle_decoder_matches_strict_oracle(stream):
    try:
        want = o_unrle(stream)
    except _OCorrupt:
        with pytest.raises(CorruptDataError):
            simple_decompress(stream)
        return
    assert simple_decompress(stream) == want


@pytest.mark.parametrize(
    "stream",
    [b"\xff", b"\xff\x05", b"abc\xff", b"abc\xff\x03", b"\xff\x00A", b"x\xff\x00\x00y", b"\xff\x04A\xff"],
)
def test_rle_strict_refusals(stream):
    with pytest.raises(CorruptDataError):
        simple_decompress(stream)


def test_rle_non_canonical_markers_decode():
    assert simple_decompress(b"\xff\x02A") == b"AA"
    assert simple_decompress(b"\xff\x01\x00\x00") == b"\x00\x00"
    assert simple_decompress(b"\xff\xff\xff") == b"\xff" * 255


def test_rle_max_output():
    enc = b"\xff\x7f\x00" * 10
    assert simple_decompress(enc, max_output=1270) == b"\0" * 1270
    with pytest.raises(CorruptDataError):
        simple_decompress(enc, max_output=1269)
    with pytest.raises(CorruptDataError):
        simple_decompress(b"abc", max_output=2)
    assert simple_decompress(b"", max_output=0) == b""
    with pytest.raises(TypeError):
        simple_decompress(enc, 10)  # keyword-only


# ---------------------------------------------------------------------------------------
# §3 compression methods
# ---------------------------------------------------------------------------------------


def test_compression_method_enum():
    assert issubclass(CompressionMethod, enum.IntEnum)
    assert [(m.name, int(m)) for m in CompressionMethod] == [
        ("RLE", 0), ("LZ4", 1), ("ZSTD_DEFAULT", 2), ("ZSTD_HIGH", 3)]
    assert [m.label for m in CompressionMethod] == ["RLE", "LZ4", "Zstd (default)", "Zstd (high)"]
    assert CompressionMethod(3) is CompressionMethod.ZSTD_HIGH
    with pytest.raises(ValueError):
        CompressionMethod(4)
    with pytest.raises(ValueError):
        adaptive_decompress(b"\x01\x02\x03", 99)
    with pytest.raises(ValueError):
        adaptive_decompress(b"\x01\x02\x03", 4)


def test_lz4_format_is_lz4_block_with_size():
    for data in (b"", b"\0" * 1000, rnd(5000, 2), b"abcd" * 300):
        c = lz4_compress(data)
        assert lz4.block.decompress(c) == data
        assert struct.unpack("<I", c[:4])[0] == len(data)
        assert lz4_decompress(lz4.block.compress(data, store_size=True)) == data
        assert lz4_decompress(c) == data


def test_zstd_levels_and_frames():
    data = b"\0" * 5000 + rnd(3000, 5)
    c3, c10 = zstd_compress(data, 3), zstd_compress(data, 10)
    d = zstandard.ZstdDecompressor()
    assert d.decompressobj().decompress(c3) == data
    assert d.decompressobj().decompress(c10) == data
    assert zstd_decompress(c3) == data
    # frames written by a streaming encoder (no content size in the header, as zstd::encode_all)
    cobj = zstandard.ZstdCompressor(level=3).compressobj()
    streamed = cobj.compress(data) + cobj.flush()
    assert zstd_decompress(streamed) == data
    assert zstd_decompress(zstandard.ZstdCompressor(level=3).compress(data)) == data
    z = b"\0" * 5000
    assert len(zstd_compress(z, 10)) <= len(zstd_compress(z, 3))


def _expected_choice(data, aggressive=False):
    cands = [(CompressionMethod.RLE, simple_compress(data))]
    if aggressive or len(data) >= 256:
        cands.append((CompressionMethod.LZ4, lz4_compress(data)))
    if aggressive or len(data) >= 4096:
        cands.append((CompressionMethod.ZSTD_DEFAULT, zstd_compress(data, 3)))
    if aggressive:
        cands.append((CompressionMethod.ZSTD_HIGH, zstd_compress(data, 10)))
    best = cands[0]
    for c in cands[1:]:
        if len(c[1]) < len(best[1]):
            best = c
    return best


ADAPTIVE_INPUTS = [
    b"",
    b"\0" * 100,
    rnd(255, 1),
    b"\0" * 256,
    rnd(300, 2),
    b"\0" * 2000,
    bytes((i * 13 + 7) % 256 for i in range(5000)),
    b"\0" * 10000,
    rnd(4096, 3),
    b"".join(bytes([i % 256, (i + 1) % 256] * 2) for i in range(100)),
    b"\0\0\0\0\x01\x02\x03\x04" * 100,
    b"\x2a" * 5000,
    rnd(4095, 4),
    # RLE and LZ4 sizes tie on these: the earlier (RLE) is kept
    bytes(80) + bytes((i * 37 + 11) % 251 for i in range(347 - 80)),
    bytes(390) + bytes((i * 37 + 11) % 251 for i in range(410 - 390)),
]


def test_adaptive_tie_keeps_rle():
    for n, z in ((347, 80), (375, 108), (410, 390), (417, 390)):
        data = bytes(z) + bytes((i * 37 + 11) % 251 for i in range(n - z))
        assert len(o_rle(data)) == len(lz4.block.compress(data, store_size=True)) or \
            len(simple_compress(data)) == len(lz4_compress(data))
        if len(simple_compress(data)) == len(lz4_compress(data)):
            assert adaptive_compress(data)[1] == CompressionMethod.RLE


@pytest.mark.parametrize("i", range(len(ADAPTIVE_INPUTS)))
def test_adaptive_choice_rules(i):
    data = ADAPTIVE_INPUTS[i]
    for aggressive, fn in ((False, adaptive_compress), (True, adaptive_compress_aggressive)):
        payload, method = fn(data)
        want_m, want_p = _expected_choice(data, aggressive)
        assert int(method) == int(want_m), (aggressive, len(data))
        assert bytes(payload) == want_p
        assert adaptive_decompress(payload, method) == data
        assert adaptive_decompress(payload, int(method)) == data
    if len(data) < 256:
        assert adaptive_compress(data)[1] == CompressionMethod.RLE


def test_adaptive_roundtrip_all_methods():
    data = b"\x2a" * 5000
    for m, payload in enumerate([simple_compress(data), lz4_compress(data),
                                 zstd_compress(data, 3), zstd_compress(data, 10)]):
        assert adaptive_decompress(payload, m) == data


# ---------------------------------------------------------------------------------------
# §4 DirtyPage
# ---------------------------------------------------------------------------------------


def test_dirty_page_compress_rle_only_strictly_smaller():
    z = b"\0" * PAGE_SIZE
    p = DirtyPage(0, z)
    assert p.compressed is False
    p.compress()
    assert p.compressed is True
    assert bytes(p.data) == o_rle(z)
    assert p.get_data() == z
    p.compress()  # already compressed: no-op
    assert bytes(p.data) == o_rle(z)
    p.decompress()
    assert p.compressed is False and bytes(p.data) == z
    # equal length (0xFF x3 -> FF 03 FF): kept raw
    q = DirtyPage(1, b"\xff\xff\xff")
    q.compress()
    assert q.compressed is False and bytes(q.data) == b"\xff\xff\xff"
    # larger: kept raw
    r = rnd(PAGE_SIZE, 9)
    p2 = DirtyPage(2, r)
    p2.compress()
    assert p2.compressed is False and bytes(p2.data) == r
    # RLE is used even when LZ4/zstd would be smaller
    pat = b"\0\0\0\0\1\2\3\4" * 512
    p3 = DirtyPage(3, pat)
    p3.compress()
    assert bytes(p3.data) == o_rle(pat) and p3.compressed
    e = DirtyPage(4, b"")
    e.compress()
    assert e.compressed is False and bytes(e.data) == b""
    assert isinstance(p.get_data(), bytes)
    assert "object at 0x" not in repr(p)


def test_dirty_page_crate_tests():
    data = bytes(range(100))
    p = DirtyPage(0, data)
    p.compress()
    assert p.get_data() == data


# ---------------------------------------------------------------------------------------
# §3/§4 DeltaSnapshot
# ---------------------------------------------------------------------------------------


def _pair(n=PAGE_SIZE * 4, seed=0, changes=((100, 42), (PAGE_SIZE + 50, 99))):
    old = bytes(n)
    new = bytearray(old)
    for off, v in changes:
        new[off] = v
    return old, bytes(new)


def test_delta_fields_and_pages():
    old = rnd(PAGE_SIZE * 5 + 123, 1)
    new = bytearray(old)
    new[10] ^= 1
    new[PAGE_SIZE * 3 + 7] ^= 0xFF
    new[-1] ^= 1  # short last page
    new = bytes(new)
    t0 = int(time.time())
    d = DeltaSnapshot.create(AID, old, new, 7, 8)
    t1 = int(time.time())
    assert d.agent_id == AID and isinstance(d.agent_id, bytes)
    assert (d.sequence, d.base_sequence) == (8, 7)
    assert d.total_size == len(new)
    assert t0 <= d.timestamp <= t1 and isinstance(d.timestamp, int)
    assert d.checksum == o_checksum(new)
    assert type(d.dirty_pages) is list
    assert [p.index for p in d.dirty_pages] == o_dirty(old, new) == [0, 3, 5]
    for p in d.dirty_pages:
        raw = new[p.index * PAGE_SIZE:(p.index + 1) * PAGE_SIZE]
        enc = o_rle(raw)
        if len(enc) < len(raw):
            assert p.compressed and bytes(p.data) == enc
        else:
            assert not p.compressed and bytes(p.data) == raw
        assert p.get_data() == raw
    assert d.dirty_page_count() == 3
    assert d.uncompressed_size() == 3 * PAGE_SIZE
    assert d.compressed_size() == sum(len(p.data) for p in d.dirty_pages)
    assert d.compression_ratio() == d.compressed_size() / (3 * PAGE_SIZE)
    assert d.digest_algorithm == "xxh3_128_tree"
    assert d.digest == o_tree(new)
    assert d.keyed is False


def test_delta_uuid_agent_id():
    u = uuid.UUID(bytes=AID)
    old, new = _pair()
    d = DeltaSnapshot.create(u, old, new, 0, 1)
    assert d.agent_id == AID


def test_delta_identical_and_empty():
    s = b"\x2a" * (PAGE_SIZE * 4)
    d = DeltaSnapshot.create(AID, s, s, 0, 1)
    assert d.dirty_page_count() == 0 and d.compressed_size() == 0
    assert d.compression_ratio() == 1.0
    e = DeltaSnapshot.create(AID, b"", b"", 0, 1)
    assert e.total_size == 0 and e.checksum == 0 and e.dirty_page_count() == 0
    base = bytearray()
    e.apply(base)
    assert base == b""


def test_delta_size_mismatch():
    with pytest.raises(InvalidStateError) as ei:
        DeltaSnapshot.create(AID, bytes(10), bytes(11), 0, 1)
    assert str(ei.value).startswith("Invalid state: ")


def test_delta_crate_tests():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    assert d.dirty_page_count() == 2
    base = bytearray(old)
    d.apply(base)
    assert bytes(base) == new
    size = PAGE_SIZE * 100
    old = bytes(size)
    new = bytearray(old)
    for i in range(5):
        off = i * PAGE_SIZE * 10
        new[off:off + PAGE_SIZE] = bytes([i + 1]) * PAGE_SIZE
    d = DeltaSnapshot.create(AID, old, bytes(new), 0, 1)
    assert d.dirty_page_count() == 5
    base = bytearray(old)
    d.apply(base)
    assert base == new


def _writable(kind, data):
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "mmap":
        m = mmap.mmap(-1, len(data))
        m[:] = data
        return m
    if kind == "numpy-uint8":
        return np.frombuffer(data, dtype=np.uint8).copy()
    if kind == "numpy-uint32":
        return np.frombuffer(data, dtype=np.uint32).copy()
    if kind == "numpy-2d":
        return np.frombuffer(data, dtype=np.uint8).copy().reshape(-1, 64)
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["bytearray", "memoryview", "mmap", "numpy-uint8", "numpy-uint32", "numpy-2d"])
def test_delta_apply_every_writable_kind(kind):
    old = rnd(PAGE_SIZE * 8, 5)
    new = bytearray(old)
    new[PAGE_SIZE * 2:PAGE_SIZE * 3] = bytes(PAGE_SIZE)
    new[PAGE_SIZE * 6 + 9] ^= 3
    new = bytes(new)
    for dg in ("xxh3_128_tree", "xxh3_128", "blake3", None):
        d = DeltaSnapshot.create(AID, old, new, 0, 1, digest=dg)
        t = _writable(kind, old)
        d.apply(t)
        assert b(t) == new
        # a bad delta leaves this kind untouched too
        d.checksum ^= 1
        t2 = _writable(kind, old)
        with pytest.raises(InvalidStateError):
            d.apply(t2)
        assert b(t2) == old


def test_apply_grows_resizable_bytearray_only():
    old = bytes(PAGE_SIZE * 2)
    new = bytearray(PAGE_SIZE * 2 + 100)
    new[PAGE_SIZE * 2 + 5] = 1
    d = DeltaSnapshot.create(AID, bytes(len(new)), bytes(new), 0, 1)
    base = bytearray(old)
    d.apply(base)
    assert base == new
    # not resizable: memoryview / numpy / mmap -> error, untouched
    for t in (memoryview(bytearray(old)), np.zeros(len(old), dtype=np.uint8)):
        with pytest.raises(InvalidStateError):
            d.apply(t)
        assert not any(b(t))


def test_apply_longer_base_is_error_and_untouched():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    base = bytearray(old + b"\x07" * 10)
    before = bytes(base)
    with pytest.raises(InvalidStateError):
        d.apply(base)
    assert base == before


def test_apply_atomic_failure_modes():
    old = rnd(PAGE_SIZE * 4, 8)
    new = bytearray(old)
    new[0] ^= 1
    new[PAGE_SIZE * 3 + 1] ^= 1
    new = bytes(new)

    def fresh(**kw):
        return DeltaSnapshot.create(AID, old, new, 0, 1, **kw)

    tampers = []

    def t_checksum(d):
        d.checksum = (d.checksum + 1) & M32
    tampers.append(("checksum", t_checksum, {"digest": None}))
    tampers.append(("checksum-with-digest", t_checksum, {}))

    def t_digest(d):
        d.digest = bytes(16)
    tampers.append(("digest", t_digest, {}))

    def t_index(d):
        d.dirty_pages[-1].index = 10 ** 6
    tampers.append(("index-out-of-range", t_index, {"digest": None}))

    def t_index4(d):
        d.dirty_pages[-1].index = 4
    tampers.append(("index-just-past-end", t_index4, {"digest": None}))

    def t_negative(d):
        d.dirty_pages[-1].index = -1
    tampers.append(("negative-index", t_index4, {"digest": None}))

    def t_corrupt(d):
        d.dirty_pages[0].data = b"\xff\x00\x01"
        d.dirty_pages[0].compressed = True
    tampers.append(("corrupt-rle", t_corrupt, {}))

    def t_trunc_rle(d):
        d.dirty_pages[0].data = b"\x01\x02\xff"
        d.dirty_pages[0].compressed = True
    tampers.append(("truncated-rle", t_trunc_rle, {}))

    def t_short(d):
        d.dirty_pages[0].data = bytes(d.dirty_pages[0].get_data())[:100]
        d.dirty_pages[0].compressed = False
    tampers.append(("short-page", t_short, {"digest": None}))

    def t_long(d):
        d.dirty_pages[0].data = bytes(d.dirty_pages[0].get_data()) + b"\x05" * 10
        d.dirty_pages[0].compressed = False
    tampers.append(("long-page", t_long, {"digest": None}))

    def t_forge(d):  # +2 / -1 keeps the weak checksum
        raw = bytearray(d.dirty_pages[-1].get_data())
        raw[10] = (raw[10] + 2) % 256 if raw[10] <= 253 else raw[10]
        raw[11] = (raw[11] - 1) % 256 if raw[11] >= 1 else raw[11]
        d.dirty_pages[-1].data = bytes(raw)
        d.dirty_pages[-1].compressed = False
    tampers.append(("forged-page", t_forge, {}))

    def t_dup(d):
        d.dirty_pages.append(DirtyPage(d.dirty_pages[0].index, bytes(PAGE_SIZE)))
    tampers.append(("duplicate-page", t_dup, {}))

    for name, fn, kw in tampers:
        d = fresh(**kw)
        fn(d)
        base = bytearray(old)
        with pytest.raises(InvalidStateError):
            d.apply(base)
        assert base == old, name


def test_checksum_only_delta_accepts_weak_forgery_but_digest_refuses():
    old = bytes(PAGE_SIZE)
    new = bytearray(old)
    new[0] = 10
    new[1] = 10
    new = bytes(new)
    forged = bytearray(new)
    forged[0] += 2
    forged[1] -= 1
    assert o_checksum(forged) == o_checksum(new)
    weak = DeltaSnapshot.create(AID, old, new, 0, 1, digest=None)
    assert not weak.digest and weak.keyed is False
    weak.dirty_pages[0] = DirtyPage(0, bytes(forged))
    base = bytearray(old)
    weak.apply(base)  # the seed's checksum-only delta cannot notice
    assert base == forged
    strong = DeltaSnapshot.create(AID, old, new, 0, 1)
    strong.dirty_pages[0] = DirtyPage(0, bytes(forged))
    base = bytearray(old)
    with pytest.raises(InvalidStateError):
        strong.apply(base)
    assert base == old


def test_apply_uses_current_page_objects():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    for p in d.dirty_pages:
        p.decompress()
    base = bytearray(old)
    d.apply(base)
    assert base == new
    # replacing the list content is honoured (an uncompressed page object)
    d2 = DeltaSnapshot.create(AID, old, new, 0, 1)
    d2.dirty_pages = [DirtyPage(p.index, p.get_data()) for p in d2.dirty_pages]
    base = bytearray(old)
    d2.apply(base)
    assert base == new
    # dropping a page makes it fail (no hidden cached copy)
    d3 = DeltaSnapshot.create(AID, old, new, 0, 1)
    d3.dirty_pages.pop()
    base = bytearray(old)
    with pytest.raises(InvalidStateError):
        d3.apply(base)
    assert base == old


def test_delta_apply_twice_and_to_wrong_base():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    base = bytearray(old)
    d.apply(base)
    d.apply(base)
    assert base == new
    other = bytearray(rnd(len(old), 4))
    snap = bytes(other)
    with pytest.raises(InvalidStateError):
        d.apply(other)
    assert other == snap


def test_apply_readonly_target_refused():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    with pytest.raises((TypeError, ValueError, InvalidStateError)):
        d.apply(bytes(old))


# ---------------------------------------------------------------------------------------
# §6 digest / keyed deltas
# ---------------------------------------------------------------------------------------

KEY = bytes(range(32))
KEY2 = bytes(range(1, 33))


def test_digest_function():
    for data in (b"", b"abc", rnd(100000, 1)):
        assert digest(data) == o_tree(data)
        assert digest(data, "xxh3_128_tree") == o_tree(data)
        assert digest(data, "xxh3_128") == xxhash.xxh3_128_digest(data)
        assert digest(data, "blake3") == blake3.blake3(data).digest()
        assert digest(data, "blake3", key=KEY) == blake3.blake3(data, key=KEY).digest()
        assert digest(data, algorithm="blake3") == blake3.blake3(data).digest()
        assert isinstance(digest(data), bytes)
    with pytest.raises(ValueError):
        digest(b"x", "md5")
    with pytest.raises((ValueError, TypeError)):
        digest(b"x", "blake3", key=b"short")
    with pytest.raises(TypeError):
        digest(b"x", "blake3", KEY)  # key is keyword-only


def test_keyed_delta_rules():
    old = rnd(PAGE_SIZE * 3, 2)
    new = bytearray(old)
    new[5] ^= 1
    new = bytes(new)
    d = DeltaSnapshot.create(AID, old, new, 0, 1, key=KEY)
    assert d.digest_algorithm == "blake3" and d.keyed is True
    assert d.digest == blake3.blake3(new, key=KEY).digest()
    for kw in ({}, {"key": KEY2}):
        base = bytearray(old)
        with pytest.raises(InvalidStateError):
            d.apply(base, **kw)
        assert base == old
    base = bytearray(old)
    d.apply(base, key=KEY)
    assert base == new
    # no downgrade: an unkeyed delta is refused when a key is given
    for dg in ("xxh3_128_tree", "xxh3_128", "blake3", None):
        u = DeltaSnapshot.create(AID, old, new, 0, 1, digest=dg)
        base = bytearray(old)
        with pytest.raises(InvalidStateError):
            u.apply(base, key=KEY)
        assert base == old
    # stripping the MAC flag with a valid unkeyed digest is still refused with a key
    s = DeltaSnapshot.create(AID, old, new, 0, 1, key=KEY)
    s.keyed = False
    s.digest = blake3.blake3(new).digest()
    base = bytearray(old)
    with pytest.raises(InvalidStateError):
        s.apply(base, key=KEY)
    assert base == old
    # a forged MAC (recomputed without the key) is refused
    f = DeltaSnapshot.create(AID, old, new, 0, 1, key=KEY)
    f.digest = blake3.blake3(new, key=KEY2).digest()
    base = bytearray(old)
    with pytest.raises(InvalidStateError):
        f.apply(base, key=KEY)
    assert base == old


def test_keyed_delta_survives_wire():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1, key=KEY)
    r = DeltaSnapshot.deserialize(d.serialize())
    assert r.keyed is True and r.digest_algorithm == "blake3" and r.digest == d.digest
    base = bytearray(old)
    with pytest.raises(InvalidStateError):
        r.apply(base)
    assert base == old
    r.apply(base, key=KEY)
    assert base == new


# ---------------------------------------------------------------------------------------
# §6 wire format
# ---------------------------------------------------------------------------------------

MAGIC = b"\x89CMD\r\n\x1a\n"


def _sample_delta(**kw):
    old = rnd(PAGE_SIZE * 3 + 500, 12)
    new = bytearray(old)
    new[3] ^= 1
    new[PAGE_SIZE:PAGE_SIZE * 2] = bytes(PAGE_SIZE)
    new[-2] ^= 7
    return old, bytes(new), DeltaSnapshot.create(AID, old, bytes(new), 4, 5, **kw)


@pytest.mark.parametrize("kw", [{}, {"digest": None}, {"digest": "blake3"}, {"key": KEY}])
def test_wire_roundtrip(kw):
    old, new, d = _sample_delta(**kw)
    w = d.serialize()
    assert isinstance(w, bytes)
    assert w[:8] == MAGIC
    assert struct.unpack("<H", w[8:10])[0] == 2  # wire format version 2 (docs/FORMAT.md)
    r = DeltaSnapshot.deserialize(w)
    for f in ("agent_id", "sequence", "base_sequence", "total_size", "timestamp", "checksum",
              "digest_algorithm", "keyed"):
        assert getattr(r, f) == getattr(d, f), f
    assert (r.digest or None) == (d.digest or None)
    # The pages as shipped (zero and XOR pages included) are the pages read back.
    assert r == d and r.encoding_counts() == d.encoding_counts()
    assert r.serialize() == w
    assert DeltaSnapshot.deserialize(bytearray(w)).serialize() == w
    assert DeltaSnapshot.deserialize(memoryview(w)).serialize() == w
    base = bytearray(old)
    r.apply(base, **({"key": KEY} if "key" in kw else {}))
    assert base == new


def test_wire_every_byte_flip_and_truncation_refused():
    _, _, d = _sample_delta()
    w = d.serialize()
    for i in range(len(w)):
        for mask in (0x01, 0x80):
            m = bytearray(w)
            m[i] ^= mask
            with pytest.raises(CorruptDataError):
                DeltaSnapshot.deserialize(bytes(m))
    for n in range(len(w)):
        with pytest.raises(CorruptDataError):
            DeltaSnapshot.deserialize(w[:n])
    for extra in (b"\0", b"\xff" * 17):
        with pytest.raises(CorruptDataError):
            DeltaSnapshot.deserialize(w + extra)


@HSET
@given(st.binary(max_size=400))
def test_wire_random_input_refused(data):
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(data)


@HSET
@given(st.binary(max_size=300))
def test_wire_random_after_magic_refused(data):
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(MAGIC + b"\x01\x00" + data)


def _reseal(body: bytes) -> bytes:
    return body + xxhash.xxh3_128_digest(body)


def _v2_table(w):
    """Offsets of a version-2 delta's page table columns (docs/FORMAT.md): indices (u32),
    stored lengths (u16), page checks (u32), encodings (u8), after header, digests, payload."""
    dlen = w[12]
    count, wire = struct.unpack_from("<IQ", w, 76)
    start = 96 + 2 * dlen + wire
    return count, start, start + 4 * count, start + 6 * count, start + 10 * count


def test_wire_forgeries_with_valid_trailer_refused():
    _, _, d = _sample_delta(digest=None)
    w = d.serialize()
    body = bytearray(w[:-16])
    assert _reseal(bytes(body)) == w  # documented trailer
    count, idx_at, len_at, _, enc_at = _v2_table(w)
    forged = []
    # total_size shrunk so that the last page index is out of range
    f = bytearray(body)
    f[48:56] = struct.pack("<Q", PAGE_SIZE)
    forged.append(("total_size-shrunk", f))
    # total size absurdly large
    f = bytearray(body)
    f[48:56] = struct.pack("<Q", 2 ** 63)
    forged.append(("total_size-huge", f))
    # page count huge
    f = bytearray(body)
    f[76:80] = struct.pack("<I", 2 ** 32 - 1)
    forged.append(("page-count-huge", f))
    # page count zero with payload present
    f = bytearray(body)
    f[76:80] = struct.pack("<I", 0)
    forged.append(("page-count-zero", f))
    # version 3 (a newer writer)
    f = bytearray(body)
    f[8:10] = struct.pack("<H", 3)
    forged.append(("version", f))
    # keyed flag without blake3
    f = bytearray(body)
    f[11] = 1
    forged.append(("keyed-without-blake3", f))
    # reserved byte
    f = bytearray(body)
    f[14] = 1
    forged.append(("reserved", f))
    # page index of first entry moved past the end
    f = bytearray(body)
    f[idx_at : idx_at + 4] = struct.pack("<I", 10 ** 9)
    forged.append(("page-index", f))
    # stored length of first page zero
    f = bytearray(body)
    f[len_at : len_at + 2] = struct.pack("<H", 0)
    forged.append(("stored-length", f))
    # unknown encoding
    f = bytearray(body)
    f[enc_at] = 9
    forged.append(("encoding", f))
    for name, fb in forged:
        with pytest.raises(CorruptDataError):
            DeltaSnapshot.deserialize(_reseal(bytes(fb)))


def test_wire_tampered_in_memory_delta_is_refused_by_reader():
    _, _, d = _sample_delta()
    d.dirty_pages[-1].index = 999
    try:
        w = d.serialize()
    except (ValueError, TypeError):
        return
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(w)


def test_wire_max_total_size():
    _, _, d = _sample_delta()
    w = d.serialize()
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(w, max_total_size=100)
    assert DeltaSnapshot.deserialize(w, max_total_size=d.total_size).total_size == d.total_size


# ---------------------------------------------------------------------------------------
# §6 first_difference / dirty_pages
# ---------------------------------------------------------------------------------------


@HSET
@given(st.binary(min_size=0, max_size=20000), st.lists(st.integers(0, 19999), max_size=5))
def test_first_difference_and_dirty_pages_oracle(data, flips):
    new = bytearray(data)
    for f in flips:
        if f < len(new):
            new[f] ^= 0x5A
    new = bytes(new)
    want = next((i for i in range(len(data)) if data[i] != new[i]), None)
    assert first_difference(data, new) == want
    dp = dirty_pages(data, new)
    assert isinstance(dp, np.ndarray) and dp.dtype == np.int64
    assert list(dp) == o_dirty(data, new)
    assert list(dirty_pages(data, new, page_size=512)) == o_dirty(data, new, 512)


def test_dirty_pages_size_mismatch():
    with pytest.raises((InvalidStateError, ValueError)):
        dirty_pages(bytes(10), bytes(11))


# ---------------------------------------------------------------------------------------
# §4 DirtyPageTracker
# ---------------------------------------------------------------------------------------


def test_tracker_bitmap_rules():
    t = DirtyPageTracker(AID, PAGE_SIZE * 4)
    assert t.sequence == 0
    t.mark_dirty(0)
    t.mark_dirty(2)
    assert t.is_dirty(0) and not t.is_dirty(1) and t.is_dirty(2)
    assert t.dirty_count() == 2
    t.mark_dirty(2)
    assert t.dirty_count() == 2
    t.mark_dirty(4)
    t.mark_dirty(10 ** 9)
    assert t.dirty_count() == 2 and not t.is_dirty(4) and not t.is_dirty(10 ** 9)
    t.clear_all()
    assert t.dirty_count() == 0


def test_tracker_negative_index_never_marks_other_pages():
    t = DirtyPageTracker(AID, PAGE_SIZE * 4)
    try:
        t.mark_dirty(-1)
    except (ValueError, OverflowError, TypeError):
        pass
    assert t.dirty_count() == 0 and not t.is_dirty(3)
    try:
        assert not t.is_dirty(-1)
    except (ValueError, OverflowError, TypeError):
        pass


def test_tracker_range_rules():
    t = DirtyPageTracker(AID, PAGE_SIZE * 10)
    t.mark_range_dirty(PAGE_SIZE + 100, PAGE_SIZE * 2)
    assert [i for i in range(10) if t.is_dirty(i)] == [1, 2, 3]
    t.clear_all()
    t.mark_range_dirty(PAGE_SIZE * 8, PAGE_SIZE * 100)  # clipped
    assert [i for i in range(10) if t.is_dirty(i)] == [8, 9] and t.dirty_count() == 2
    t.clear_all()
    t.mark_range_dirty(PAGE_SIZE * 50, 10)  # entirely out of range
    assert t.dirty_count() == 0
    t.mark_range_dirty(0, 0)
    assert t.dirty_count() == 0
    t.mark_range_dirty(PAGE_SIZE, 0)  # ceil(4096/4096) = 1: nothing
    assert t.dirty_count() == 0
    t.mark_range_dirty(100, 0)  # pages 0 .. ceil(100/4096)=1: page 0
    assert [i for i in range(10) if t.is_dirty(i)] == [0]
    t.clear_all()
    t.mark_range_dirty(PAGE_SIZE - 1, 2)
    assert [i for i in range(10) if t.is_dirty(i)] == [0, 1]
    # short last page counts as a page
    u = DirtyPageTracker(AID, PAGE_SIZE * 2 + 1)
    u.mark_range_dirty(0, 10 ** 12)
    assert u.dirty_count() == 3


def test_tracker_sequence_and_create_delta():
    init = bytes(PAGE_SIZE * 2)
    t = DirtyPageTracker(AID, len(init))
    t.mark_dirty(1)
    t.initialize(init)
    assert t.sequence == 1 and t.dirty_count() == 0
    new = bytearray(init)
    new[50] = 42
    t.mark_dirty(1)  # advisory only: page 0 is found anyway, page 1 is not dirty
    d = t.create_delta(bytes(new))
    assert d.dirty_page_count() == 1 and d.dirty_pages[0].index == 0
    assert (d.base_sequence, d.sequence) == (1, 2)
    assert t.sequence == 2 and t.dirty_count() == 0
    assert d.agent_id == AID
    d2 = t.create_delta(bytes(new))
    assert d2.dirty_page_count() == 0 and (d2.base_sequence, d2.sequence) == (2, 3)
    assert t.sequence == 3


def test_tracker_stores_a_copy():
    t = DirtyPageTracker(AID, PAGE_SIZE * 2)
    state = bytearray(PAGE_SIZE * 2)
    t.initialize(state)
    state[PAGE_SIZE + 1] = 9  # mutate the caller's buffer after initialize
    d = t.create_delta(state)
    assert [p.index for p in d.dirty_pages] == [1]
    state[0] = 1  # and after create_delta
    d = t.create_delta(state)
    assert [p.index for p in d.dirty_pages] == [0]


def test_tracker_before_initialize_diffs_against_zeros():
    cur = bytearray(PAGE_SIZE * 3)
    cur[PAGE_SIZE * 2 + 3] = 1
    t = DirtyPageTracker(AID, len(cur))
    d = t.create_delta(bytes(cur))
    assert [p.index for p in d.dirty_pages] == [2]
    assert (d.base_sequence, d.sequence) == (0, 1) and t.sequence == 1
    d2 = t.create_delta(bytes(cur))
    assert d2.dirty_page_count() == 0 and (d2.base_sequence, d2.sequence) == (1, 2)


def test_tracker_create_delta_size_mismatch():
    t = DirtyPageTracker(AID, PAGE_SIZE)
    t.initialize(bytes(PAGE_SIZE))
    with pytest.raises(InvalidStateError):
        t.create_delta(bytes(PAGE_SIZE + 1))


# ---------------------------------------------------------------------------------------
# §4 MigrationStats / IncrementalMigrator
# ---------------------------------------------------------------------------------------


def test_stats_defaults_and_math():
    s = MigrationStats()
    assert (s.bytes_transferred, s.bytes_saved_compression, s.bytes_saved_delta, s.full_migrations,
            s.incremental_migrations, s.avg_delta_ratio, s.total_time_us) == (0, 0, 0, 0, 0, 0.0, 0)
    assert s.overall_compression_ratio() == 1.0
    assert s.throughput_mbps() == 0.0
    s.record_full(1000, 100)
    assert (s.full_migrations, s.bytes_transferred, s.total_time_us) == (1, 1000, 100)
    assert s.avg_delta_ratio == 0.0
    s.record_incremental(200, 1000, 50)
    assert s.incremental_migrations == 1 and s.bytes_saved_delta == 800
    assert s.bytes_transferred == 1200 and s.total_time_us == 150
    assert s.avg_delta_ratio == pytest.approx((0.0 * 1 + 0.2) / 2)
    s.record_incremental(0, 0, 0)  # full_size 0 -> ratio delta/max(0,1) = 0
    assert s.avg_delta_ratio == pytest.approx((0.1 * 2 + 0.0) / 3)
    s.record_compression(500, 100)
    assert s.bytes_saved_compression == 400
    assert s.overall_compression_ratio() == pytest.approx(1200 / 1600)
    assert s.throughput_mbps() == pytest.approx((1200 / 1e6) / (150 / 1e6))
    t = MigrationStats()
    t.record_full(2_000_000, 1_000_000)
    assert t.throughput_mbps() == pytest.approx(2.0)
    u = MigrationStats()
    u.record_incremental(30, 100, 1)
    assert u.avg_delta_ratio == pytest.approx(0.3)
    u.record_incremental(10, 100, 1)
    assert u.avg_delta_ratio == pytest.approx(0.2)


def test_incremental_migrator():
    m = IncrementalMigrator()
    init = bytes(PAGE_SIZE * 4)
    assert not m.is_tracking(AID) and m.get_sequence(AID) is None
    with pytest.raises(InvalidStateError) as ei:
        m.create_incremental(AID, init)
    assert "Agent not being tracked for incremental migration" in str(ei.value)
    assert str(ei.value) == "Invalid state: Agent not being tracked for incremental migration"
    m.mark_dirty(AID, 0, 10)  # untracked: no-op
    m.start_tracking(AID, init)
    assert m.is_tracking(AID) and m.get_sequence(AID) == 1
    assert m.is_tracking(uuid.UUID(bytes=AID))
    new = bytearray(init)
    new[100] = 42
    new[PAGE_SIZE * 3 + 1] = 1
    m.mark_dirty(AID, 0, 10)
    d = m.create_incremental(AID, bytes(new))
    assert d.dirty_page_count() == 2
    assert m.get_sequence(AID) == 2
    s = m.stats
    assert s.incremental_migrations == 1 and s.full_migrations == 0
    assert s.bytes_transferred == d.compressed_size() > 0
    assert s.bytes_saved_delta == len(new) - d.compressed_size()
    assert s.bytes_saved_compression == d.uncompressed_size() - d.compressed_size()
    assert s.avg_delta_ratio == pytest.approx(d.compressed_size() / len(new))
    assert s.total_time_us >= 0
    m.reset_stats()
    assert m.stats.incremental_migrations == 0 and m.stats.bytes_transferred == 0
    m.stop_tracking(AID)
    assert not m.is_tracking(AID) and m.get_sequence(AID) is None
    m.stop_tracking(AID)  # idempotent


# ---------------------------------------------------------------------------------------
# validation (seed)
# ---------------------------------------------------------------------------------------


def test_requirements_and_capabilities_defaults():
    r = AgentRequirements()
    assert (r.architecture, r.required_memory, r.required_storage, r.required_wasm_features,
            r.state_size, r.version) == (None, 0, 0, [], 0, "")
    r.required_wasm_features.append("x")
    assert AgentRequirements().required_wasm_features == []
    c = NodeCapabilities()
    assert (c.architectures, c.available_memory, c.available_storage, c.wasm_features,
            c.max_state_size, c.version, c.min_compatible_version) == ([], 0, 0, [], 0, "", "")
    n = NodeCapabilities.new()
    assert n.architectures == ["x86_64", "aarch64"]
    assert n.available_memory == 8 * GiB
    assert n.available_storage == 100 * GiB
    assert n.wasm_features == ["bulk-memory", "simd"]
    assert n.max_state_size == GiB
    assert n.version == "0.1.0" and n.min_compatible_version == "0.1.0"
    n.architectures.append("riscv64")
    assert NodeCapabilities.new().architectures == ["x86_64", "aarch64"]
    r2 = AgentRequirements(architecture="x86_64", required_memory=1, required_storage=2,
                           required_wasm_features=["simd"], state_size=3, version="0.1.0")
    assert r2.state_size == 3


def _caps(**kw):
    c = NodeCapabilities.new()
    for k, v in kw.items():
        setattr(c, k, v)
    return c


def _check(req, caps):
    return CompatibilityValidator.check_compatibility(req, caps)


def test_compatibility_messages():
    C = CompatibilityStatus
    caps = NodeCapabilities.new()
    ok = AgentRequirements(architecture="x86_64", required_memory=1024 * 1024, required_storage=1024 * 1024,
                           required_wasm_features=["bulk-memory"], state_size=1024, version="0.1.0")
    assert _check(ok, caps) == C.compatible()
    assert _check(AgentRequirements(architecture="riscv64"), caps) == C.incompatible(
        "Target does not support architecture: riscv64")
    assert _check(AgentRequirements(required_memory=2 ** 64 - 1), caps) == C.incompatible(
        "Insufficient memory: required 18446744073709551615 bytes, available 8589934592 bytes")
    st_ = _check(AgentRequirements(required_memory=7 * GiB, version="0.1.0"), caps)
    assert st_ == C.compatible_with_warnings(
        ["Low memory headroom: only 1073741824 bytes available after migration"])
    assert st_.can_proceed() and st_.warnings() == [
        "Low memory headroom: only 1073741824 bytes available after migration"]
    assert _check(AgentRequirements(required_storage=100 * GiB + 1, version="0.1.0"), caps) == C.incompatible(
        "Insufficient storage: required 107374182401 bytes, available 107374182400 bytes")
    assert _check(AgentRequirements(state_size=GiB + 1, version="0.1.0"), caps) == C.incompatible(
        "Agent state too large: 1073741825 bytes exceeds maximum 1073741824 bytes")
    assert _check(AgentRequirements(required_wasm_features=["bulk-memory", "threads", "gc"], version="0.1.0"),
                  caps) == C.incompatible("Target does not support WASM feature: threads")
    assert _check(AgentRequirements(version="0.0.1"), caps) == C.incompatible(
        "Version incompatible: agent version 0.0.1 not compatible with target minimum 0.1.0")
    assert _check(AgentRequirements(), caps) == C.incompatible(
        "Version incompatible: agent version  not compatible with target minimum 0.1.0")
    assert _check(AgentRequirements(architecture=""), caps) == C.incompatible(
        "Target does not support architecture: ")


def test_compatibility_check_order():
    C = CompatibilityStatus
    caps = NodeCapabilities.new()
    every = dict(architecture="sparc", required_memory=9 * GiB, required_storage=200 * GiB,
                 required_wasm_features=["threads"], state_size=2 * GiB, version="9.9.9")
    order = ["architecture", "required_memory", "required_storage", "state_size",
             "required_wasm_features", "version"]
    expected = [
        "Target does not support architecture: sparc",
        "Insufficient memory: required 9663676416 bytes, available 8589934592 bytes",
        "Insufficient storage: required 214748364800 bytes, available 107374182400 bytes",
        "Agent state too large: 2147483648 bytes exceeds maximum 1073741824 bytes",
        "Target does not support WASM feature: threads",
        "Version incompatible: agent version 9.9.9 not compatible with target minimum 0.1.0",
    ]
    fields = dict(every)
    for k, msg in zip(order, expected):
        r = _check(AgentRequirements(**fields), caps)
        assert r == C.incompatible(msg), k
        assert r.reason == msg and not r.can_proceed() and r.warnings() == []
        fields.pop(k)
    # a headroom warning is dropped when a later check fails
    r = _check(AgentRequirements(required_memory=8 * GiB, required_storage=200 * GiB, version="0.1.0"), caps)
    assert r == C.incompatible("Insufficient storage: required 214748364800 bytes, available 107374182400 bytes")
    # memory exactly equal is fine (headroom 0 -> warning)
    r = _check(AgentRequirements(required_memory=8 * GiB, version="0.1.0"), caps)
    assert r == C.compatible_with_warnings(["Low memory headroom: only 0 bytes available after migration"])


@pytest.mark.parametrize("avail,req,warn", [
    (10, 8, False), (10, 9, True), (11, 9, False), (14, 12, False), (14, 13, True),
    (0, 0, False), (4, 4, False), (5, 5, True), (9, 8, False), (9, 9, True),
    (1000, 800, False), (1000, 801, True), (1004, 804, False), (1004, 805, True),
])
def test_headroom_warning_integer_fifth(avail, req, warn):
    caps = _caps(available_memory=avail)
    r = _check(AgentRequirements(required_memory=req, version="0.1.0"), caps)
    headroom = avail - req
    if warn:
        assert r == CompatibilityStatus.compatible_with_warnings(
            ["Low memory headroom: only %d bytes available after migration" % headroom])
    else:
        assert r == CompatibilityStatus.compatible()


VERSION_CASES = [
    ("0.1.0", "0.1.0"), ("0.1.1", "0.1.0"), ("0.2.0", "0.1.5"), ("0.1.0", "0.1.1"), ("1.0.0", "0.1.0"),
    ("0.0.1", "0.1.0"), ("1.2", "1.2.0"), ("1", "1.0.0"), ("", "0.0.0"), ("", "0.1.0"),
    ("1.2.3.4", "1.2.3"), ("1..3", "1.0.3"), ("v1.0.0", "1.0.0"), ("v1.0.0", "0.0.0"),
    ("1.x.0", "1.0.0"), ("1 .0.0", "0.0.0"), ("1 .0.0", "1.0.0"), (" 1.0.0", "1.0.0"),
    ("+1.0.0", "1.0.0"), ("-1.0.0", "0.0.0"), ("1_0.0.0", "0.0.0"), ("1_0.0.0", "10.0.0"),
    ("4294967296.0.0", "0.0.0"), ("4294967295.0.0", "4294967295.0.0"), ("1.4294967296.0", "1.0.0"),
    ("\u0661.0.0", "0.0.0"), ("\u0661.0.0", "1.0.0"), ("01.02.03", "1.2.3"), ("1.2.3-beta", "1.2.0"),
    ("1.2.3-beta", "1.2.3"), ("2.0.0", "1.9.9"), ("1.10.0", "1.9.0"), ("0.1.0", ""), ("1.0.0", ""),
    ("\u00b2.0.0", "0.0.0"), ("\uff11.0.0", "0.0.0"), ("\uff11.0.0", "1.0.0"), ("0.\u0663.0", "0.3.0"),
    ("+", "0.0.0"), ("1.+2.0", "1.2.0"), ("1.2.3 ", "1.2.3"), ("1.2.\t3", "1.2.3"), ("0x1.0.0", "0.0.0"),
]


@pytest.mark.parametrize("agent,minimum", VERSION_CASES)
def test_version_rule(agent, minimum):
    caps = _caps(min_compatible_version=minimum)
    r = _check(AgentRequirements(version=agent), caps)
    assert r.can_proceed() == o_version_compatible(agent, minimum), (agent, minimum)
    if not r.can_proceed():
        assert r.reason == ("Version incompatible: agent version %s not compatible with target minimum %s"
                            % (agent, minimum))


def test_compatibility_status_type():
    C = CompatibilityStatus
    assert C.compatible().can_proceed()
    assert C.compatible_with_warnings(["warning"]).can_proceed()
    assert not C.incompatible("reason").can_proceed()
    w = ["warning1", "warning2"]
    s = C.compatible_with_warnings(w)
    assert s.warnings() == w
    s.warnings().append("x")
    assert s.warnings() == w
    assert C.compatible().warnings() == [] and C.incompatible("r").warnings() == []
    assert C.incompatible("r").reason == "r"
    assert C.compatible().reason is None and C.compatible_with_warnings(["a"]).reason is None
    assert C.compatible() == C.compatible()
    assert C.compatible_with_warnings(["a"]) == C.compatible_with_warnings(["a"])
    assert C.compatible_with_warnings(["a"]) != C.compatible_with_warnings(["b"])
    assert C.incompatible("a") != C.incompatible("b")
    assert C.incompatible("a") != C.compatible()
    assert C.compatible() != C.compatible_with_warnings(["a"])
    assert "object at 0x" not in repr(C.incompatible("a"))


def test_verification_result():
    r = VerificationResult.success()
    assert (r.passed, r.checksum_valid, r.size_valid, r.agent_responsive) == (True, True, True, True)
    assert r.details == ["All verification checks passed"]
    f = VerificationResult.failure("Test failure")
    assert (f.passed, f.checksum_valid, f.size_valid, f.agent_responsive) == (False, False, False, False)
    assert f.details == ["Test failure"]
    v = VerificationResult(True, True, True, True, ["x"])
    assert v.details == ["x"]
    assert "object at 0x" not in repr(v)


def test_verify_state_texts():
    s = bytes([1, 2, 3, 4, 5])
    cs = o_checksum(s)
    r = StateVerifier.verify_state(s, s, cs)
    assert r.passed and r.checksum_valid and r.size_valid and r.agent_responsive
    assert r.content_valid is True
    assert r.details == ["Size verified: 5 bytes", "Checksum verified"]
    r = StateVerifier.verify_state(s, bytes([1, 2, 3]), cs)
    assert not r.passed and not r.size_valid and not r.checksum_valid and r.agent_responsive
    assert r.details[:2] == ["Size mismatch: original 5 bytes, migrated 3 bytes",
                             "Checksum mismatch: expected 55, got 14"]
    r = StateVerifier.verify_state(s, bytes([1, 2, 3, 4, 6]), cs)
    assert not r.passed and r.size_valid and not r.checksum_valid
    assert r.details[:2] == ["Size verified: 5 bytes", "Checksum mismatch: expected 55, got 60"]
    # trailing zeros keep the weak checksum: size check catches it
    r = StateVerifier.verify_state(s, s + b"\0", cs)
    assert not r.passed and not r.size_valid and r.checksum_valid
    assert r.details[:2] == ["Size mismatch: original 5 bytes, migrated 6 bytes", "Checksum verified"]
    # wrong original_checksum given: the seed compares the migrated checksum to it
    r = StateVerifier.verify_state(s, s, 7)
    assert not r.passed and r.details[1] == "Checksum mismatch: expected 7, got 55"


def test_verify_state_content_forgery():
    orig = bytearray(rnd(10000, 3))
    for k in (0, 3000):
        for j in (k, k + 1, 2 * k + 2):
            orig[j] = 100
    orig = bytes(orig)
    cs = o_checksum(orig)
    # +2 at byte 0 and -1 at byte 1 (the spec's example)
    f0 = bytearray(orig)
    f0[0] += 2
    f0[1] -= 1
    # +1 at k, +1 at k+1, -1 at 2k+2: weights (k+1) + (k+2) - (2k+3) = 0
    f1 = bytearray(orig)
    f1[3000] += 1
    f1[3001] += 1
    f1[6002] -= 1
    for k, forged in ((0, bytes(f0)), (3000, bytes(f1))):
        assert o_checksum(forged) == cs
        r = StateVerifier.verify_state(orig, forged, cs)
        assert r.passed is False
        assert r.content_valid is False
        assert r.size_valid and r.checksum_valid
        assert r.details[:2] == ["Size verified: 10000 bytes", "Checksum verified"]
        assert "Content mismatch at offset %d" % k in r.details
    # validator logs it too
    v = MigrationValidator()
    r = v.verify_post_migration(MID, AID, orig, bytes(f0))
    assert not r.passed
    e = list(v.audit_log)[-1]
    assert e.success is False and "Content mismatch at offset 0" in e.details


def test_verify_delta_texts():
    base = bytes(PAGE_SIZE)
    new = bytearray(base)
    new[100] = 42
    d = DeltaSnapshot.create(AID, base, bytes(new), 0, 1)
    r = StateVerifier.verify_delta(base, d, d.checksum)
    assert r.passed and r.checksum_valid and r.size_valid and r.agent_responsive
    assert r.details == ["Delta checksum verified", "Delta size compatible with base state"]
    r = StateVerifier.verify_delta(base + b"\0", d, d.checksum + 1)
    assert not r.passed and not r.checksum_valid and not r.size_valid
    assert r.details == ["Delta checksum mismatch: expected %d, got %d" % (d.checksum + 1, d.checksum),
                         "Delta size mismatch: delta expects 4096 bytes, base has 4097 bytes"]


# ---------------------------------------------------------------------------------------
# MigrationValidator + audit texts
# ---------------------------------------------------------------------------------------


def _types(log):
    return [e.event_type for e in log]


def test_validator_flow_and_texts():
    v = MigrationValidator()
    assert len(v.audit_log) == 0 and v.audit_log.is_empty()
    agent = Agent(b"\x00asm")
    aid = agent.id.bytes
    st_ = v.validate_pre_migration(MID, agent, AgentRequirements(version="0.1.0"), NodeCapabilities.new())
    assert st_ == CompatibilityStatus.compatible()
    e = list(v.audit_log)[-1]
    assert (e.event_type, e.details, e.success, e.migration_id, e.agent_id) == (
        AuditEventType.VALIDATION_COMPLETED, "Compatibility check passed", True, MID, aid)
    st_ = v.validate_pre_migration(MID, agent, AgentRequirements(required_memory=7 * GiB, version="0.1.0"),
                                   NodeCapabilities.new())
    e = list(v.audit_log)[-1]
    assert e.details == ('Compatibility check passed with warnings: '
                         '["Low memory headroom: only 1073741824 bytes available after migration"]')
    assert e.success is True
    v.validate_pre_migration(MID, agent, AgentRequirements(architecture="riscv64"), NodeCapabilities.new())
    e = list(v.audit_log)[-1]
    assert e.details == "Incompatible: Target does not support architecture: riscv64" and e.success is False

    state = bytes([1, 2, 3, 4, 5])
    v.capture_rollback_info(MID, agent, state)
    e = list(v.audit_log)[-1]
    assert (e.event_type, e.details, e.success) == (AuditEventType.SNAPSHOT_CAPTURED,
                                                    "Rollback info captured: 5 bytes", True)
    r = v.verify_post_migration(MID, aid, state, state)
    assert r.passed
    e = list(v.audit_log)[-1]
    assert (e.event_type, e.details, e.success) == (AuditEventType.VERIFICATION_COMPLETED,
                                                    "Size verified: 5 bytes; Checksum verified", True)
    r = v.verify_post_migration(MID, aid, state, bytes([1, 2, 3]))
    e = list(v.audit_log)[-1]
    assert e.success is False
    assert e.details.startswith("Size mismatch: original 5 bytes, migrated 3 bytes; Checksum mismatch: expected 55, got 14")
    n = len(v.audit_log)
    info = v.execute_rollback(MID)
    assert isinstance(info, RollbackInfo)
    assert bytes(info.original_state) == state and info.agent_id == aid
    new = list(v.audit_log)[n:]
    assert [(x.event_type, x.details, x.success) for x in new] == [
        (AuditEventType.ROLLBACK_STARTED, "Rollback initiated", True),
        (AuditEventType.ROLLBACK_COMPLETED, "Rollback completed: restored 5 bytes", True)]
    with pytest.raises(InvalidStateError) as ei:
        v.execute_rollback(MID)
    assert str(ei.value) == "Invalid state: No rollback info available for migration"
    assert len(v.audit_log) == n + 2


def test_validator_expired_rollback():
    v = MigrationValidator()
    agent = Agent()
    v.capture_rollback_info(MID, agent, b"abc")
    v.set_rollback_max_age(0)
    n = len(v.audit_log)
    with pytest.raises(InvalidStateError) as ei:
        v.execute_rollback(MID)
    assert str(ei.value) == "Invalid state: Rollback info has expired"
    new = list(v.audit_log)[n:]
    assert [(x.event_type, x.success) for x in new] == [
        (AuditEventType.ROLLBACK_STARTED, True), (AuditEventType.ROLLBACK_COMPLETED, False)]
    assert new[0].details == "Rollback initiated"
    assert new[1].details in ("Rollback info expired: 0 seconds old", "Rollback info expired: 1 seconds old")
    with pytest.raises(InvalidStateError) as ei:
        v.execute_rollback(MID)
    assert "No rollback info available for migration" in str(ei.value)


def test_validator_complete_and_cleanup():
    v = MigrationValidator()
    agent = Agent(b"\x00asm")
    v.complete_migration(MID, True, "Success")  # no info: nothing logged
    assert len(v.audit_log) == 0
    v.capture_rollback_info(MID, agent, b"12345")
    v.complete_migration(MID, True, "Success")
    e = list(v.audit_log)[-1]
    assert (e.event_type, e.details, e.success, e.agent_id) == (
        AuditEventType.MIGRATION_COMPLETED, "Success", True, agent.id.bytes)
    with pytest.raises(InvalidStateError):
        v.execute_rollback(MID)
    mid2 = bytes([9] * 16)
    v.capture_rollback_info(mid2, agent, b"12345")
    v.complete_migration(uuid.UUID(bytes=mid2), False, "Failed hard")
    e = list(v.audit_log)[-1]
    assert (e.event_type, e.details, e.success, e.migration_id) == (
        AuditEventType.MIGRATION_FAILED, "Failed hard", False, mid2)
    v.capture_rollback_info(MID, agent, b"1")
    v.cleanup_expired()
    assert isinstance(v.execute_rollback(MID), RollbackInfo)  # still valid (3600 s)
    v.capture_rollback_info(MID, agent, b"1")
    v.set_rollback_max_age(0)
    v.cleanup_expired()
    with pytest.raises(InvalidStateError) as ei:
        v.execute_rollback(MID)
    assert "No rollback info available for migration" in str(ei.value)


def test_validator_default_log_capacity_10000():
    v = MigrationValidator()
    for _ in range(10005):
        v.audit_log.log_start(MID, AID)
    assert len(v.audit_log) == 10000


# ---------------------------------------------------------------------------------------
# Audit types
# ---------------------------------------------------------------------------------------


def test_audit_event_type_order():
    assert issubclass(AuditEventType, enum.Enum)
    assert [m.name for m in AuditEventType] == [
        "MIGRATION_STARTED", "VALIDATION_COMPLETED", "SNAPSHOT_CAPTURED", "TRANSFER_STARTED",
        "TRANSFER_COMPLETED", "VERIFICATION_COMPLETED", "MIGRATION_COMPLETED", "MIGRATION_FAILED",
        "ROLLBACK_STARTED", "ROLLBACK_COMPLETED"]


def test_audit_entry():
    t0 = int(time.time())
    e = AuditEntry.new(MID, AID, AuditEventType.MIGRATION_STARTED, "Test", True)
    assert (e.migration_id, e.agent_id, e.event_type, e.details, e.success) == (
        MID, AID, AuditEventType.MIGRATION_STARTED, "Test", True)
    assert e.source_node is None and e.target_node is None
    assert t0 <= e.timestamp <= int(time.time()) + 1 and isinstance(e.timestamp, int)
    w = e.with_nodes(SRC, DST)
    assert (w.source_node, w.target_node) == (SRC, DST)
    c = w.with_nodes(None, None)
    assert c.source_node is None and c.target_node is None
    u = AuditEntry.new(uuid.UUID(bytes=MID), uuid.UUID(bytes=AID), AuditEventType.MIGRATION_FAILED, "x", False)
    assert u.migration_id == MID and u.agent_id == AID
    d = w.to_dict()
    assert AuditEntry.from_dict(json.loads(json.dumps(d))) == w
    assert AuditEntry.from_dict(d) == w
    assert e == AuditEntry.new(MID, AID, AuditEventType.MIGRATION_STARTED, "Test", True) or \
        e.timestamp != int(time.time())
    assert "object at 0x" not in repr(e)
    with pytest.raises((ValueError, TypeError)):
        AuditEntry.new(b"short", AID, AuditEventType.MIGRATION_STARTED, "x", True)


def test_audit_log_helpers_and_queries():
    log = MigrationAuditLog()
    assert log.is_empty() and len(log) == 0
    m1, m2 = bytes([1] * 16), bytes([2] * 16)
    a = bytes([3] * 16)
    log.log_start(m1, a, None, None)
    log.log_start(m2, a, SRC, DST)
    log.log_completion(m1, a, True, "Success")
    log.log_completion(m1, a, False, "Failed")
    es = list(log)
    assert (es[0].event_type, es[0].details, es[0].success) == (AuditEventType.MIGRATION_STARTED,
                                                                "Migration initiated", True)
    assert (es[1].source_node, es[1].target_node) == (SRC, DST)
    assert (es[2].event_type, es[2].details, es[2].success) == (AuditEventType.MIGRATION_COMPLETED, "Success", True)
    assert (es[3].event_type, es[3].details, es[3].success) == (AuditEventType.MIGRATION_FAILED, "Failed", False)
    assert len(log.get_migration_entries(m1)) == 3
    assert len(log.get_migration_entries(m2)) == 1
    assert len(log.get_agent_entries(a)) == 4
    assert log.get_migration_entries(uuid.UUID(bytes=m1)) == log.get_migration_entries(m1)
    assert log.get_failures() == [es[3]]
    assert log.get_entries_by_type(AuditEventType.MIGRATION_STARTED) == es[:2]
    log.log_rollback(m1, a, True, True, "go")
    log.log_rollback(m1, a, False, False, "no")
    es = list(log)
    assert (es[4].event_type, es[4].success, es[4].details) == (AuditEventType.ROLLBACK_STARTED, True, "go")
    assert (es[5].event_type, es[5].success, es[5].details) == (AuditEventType.ROLLBACK_COMPLETED, False, "no")
    assert log.get_failures() == [es[3], es[5]]
    log.log_verification(m1, a, VerificationResult(False, False, True, True, ["a", "b c"]))
    e = list(log)[-1]
    assert (e.event_type, e.details, e.success) == (AuditEventType.VERIFICATION_COMPLETED, "a; b c", False)
    log.log_verification(m1, a, VerificationResult.success())
    assert list(log)[-1].details == "All verification checks passed" and list(log)[-1].success


@pytest.mark.parametrize("warnings", [["a", "b"], ["it's"], ['say "hi"'], ["back\\slash"], ["caf\u00e9"], [],
                                      ["line\nbreak", "tab\there"]])
def test_log_validation_warning_rendering(warnings):
    log = MigrationAuditLog()
    log.log_validation(MID, AID, CompatibilityStatus.compatible_with_warnings(warnings))
    e = list(log)[-1]
    assert e.details == "Compatibility check passed with warnings: " + rust_debug_list(warnings)
    assert e.success is True and e.event_type == AuditEventType.VALIDATION_COMPLETED
    log.log_validation(MID, AID, CompatibilityStatus.compatible())
    assert list(log)[-1].details == "Compatibility check passed"
    log.log_validation(MID, AID, CompatibilityStatus.incompatible("why"))
    e = list(log)[-1]
    assert e.details == "Incompatible: why" and e.success is False


def test_audit_log_capacity_and_range():
    with pytest.raises(ValueError):
        MigrationAuditLog.with_capacity(0)
    with pytest.raises(ValueError):
        MigrationAuditLog.with_capacity(-3)
    log = MigrationAuditLog.with_capacity(5)
    for i in range(10):
        log.log(AuditEntry(MID, AID, AuditEventType.TRANSFER_STARTED, 100 + i, details=str(i), success=True))
    assert len(log) == 5
    assert [e.details for e in log] == ["5", "6", "7", "8", "9"]
    assert [e.details for e in log.get_entries_in_range(106, 108)] == ["6", "7", "8"]
    assert [e.details for e in log.get_entries_in_range(109, 109)] == ["9"]
    assert log.get_entries_in_range(108, 106) == []
    assert log.get_entries_in_range(0, 104) == []
    log.clear()
    assert log.is_empty()
    for i in range(8):
        log.log_start(MID, AID)
    assert len(log) == 5
    one = MigrationAuditLog.with_capacity(1)
    one.log_start(MID, AID)
    one.log_completion(MID, AID, True, "done")
    assert [e.details for e in one] == ["done"]


# ---------------------------------------------------------------------------------------
# RollbackInfo
# ---------------------------------------------------------------------------------------


def test_rollback_info_capture():
    agent = Agent(b"\x00asm")
    state = bytearray([1, 2, 3, 4, 5])
    t0 = int(time.time())
    r = RollbackInfo.capture(agent, state)
    state[0] = 99  # the capture is a copy
    assert r.agent_id == agent.id.bytes
    assert bytes(r.original_state) == bytes([1, 2, 3, 4, 5])
    assert r.original_checksum == 55
    assert isinstance(r.original_policy_data, bytes)
    assert t0 <= r.created_at <= int(time.time())
    assert r.source_node is None
    assert r.is_valid(3600) and not r.is_valid(0)
    assert r.age_secs() >= 0
    r.created_at = int(time.time()) + 1000
    assert r.age_secs() == 0
    r.created_at = int(time.time()) - 50
    assert 50 <= r.age_secs() <= 51
    assert not r.is_valid(50) and r.is_valid(100)


def test_rollback_restore_into():
    agent = Agent()
    state = rnd(PAGE_SIZE * 3 + 7, 4)
    r = RollbackInfo.capture(agent, state)
    for kind in ("bytearray", "memoryview", "mmap", "numpy-uint8"):
        t = _writable(kind, bytes(len(state)))
        r.restore_into(t)
        assert b(t) == state
    # a forged original (same weak checksum) is caught by the digest
    forged = bytearray(state)
    forged[0] = (forged[0] + 2) % 256 if forged[0] < 254 else forged[0] - 2
    forged[1] = (forged[1] - 1) % 256 if forged[0] >= 2 else forged[1]
    r2 = RollbackInfo.capture(agent, state)
    if o_checksum(forged) == o_checksum(state):
        try:
            r2.original_state = bytes(forged)
        except (AttributeError, dataclasses.FrozenInstanceError):
            return
        with pytest.raises(CellError):
            r2.restore_into(bytearray(len(state)))


# ---------------------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------------------

ET = MigrationErrorType


def test_error_type_enum_and_predicates():
    assert [m.name for m in ET] == ["NETWORK_TRANSIENT", "NETWORK_PERMANENT", "INSUFFICIENT_RESOURCES",
                                    "INCOMPATIBLE_TARGET", "STATE_CORRUPTION", "TIMEOUT",
                                    "TARGET_UNREACHABLE", "UNKNOWN"]
    retry = {ET.NETWORK_TRANSIENT, ET.INSUFFICIENT_RESOURCES, ET.TIMEOUT, ET.TARGET_UNREACHABLE}
    change = {ET.INSUFFICIENT_RESOURCES, ET.INCOMPATIBLE_TARGET, ET.TARGET_UNREACHABLE}
    for m in ET:
        assert m.is_retryable() == (m in retry), m
        assert m.should_change_target() == (m in change), m
    assert [m.name for m in RecoveryStrategy] == ["RETRY_ON_SAME_TARGET", "RETRY_ON_DIFFERENT_TARGET",
                                                  "ROLLBACK", "GIVE_UP"]


def test_migration_error_record():
    t0 = int(time.time())
    e = MigrationError(ET.NETWORK_TRANSIENT, "Connection timeout", AID, DST)
    assert (e.error_type, e.message, e.agent_id, e.target_node, e.retry_count) == (
        ET.NETWORK_TRANSIENT, "Connection timeout", AID, DST, 0)
    assert t0 <= e.timestamp <= int(time.time())
    assert not isinstance(e, BaseException)
    e.increment_retry()
    e.increment_retry()
    assert e.retry_count == 2
    assert e.age_secs() >= 0
    u = MigrationError(ET.TIMEOUT, "t", uuid.UUID(bytes=AID))
    assert u.agent_id == AID and u.target_node is None


def test_recovery_config():
    c = RecoveryConfig()
    assert (c.max_retries, c.initial_retry_delay_secs, c.max_retry_delay_secs, c.use_exponential_backoff,
            c.recovery_timeout_secs, c.auto_rollback) == (3, 10, 300, True, 600, True)
    assert [c.calculate_retry_delay(a) for a in (0, 1, 2, 3, 4, 5, 10, 100)] == [10, 10, 20, 40, 80, 160, 300, 300]
    n = RecoveryConfig(use_exponential_backoff=False)
    assert [n.calculate_retry_delay(a) for a in (0, 1, 5, 50)] == [10, 10, 10, 10]
    c.validate()
    cases = [
        (dict(initial_retry_delay_secs=0, max_retry_delay_secs=0, recovery_timeout_secs=0),
         "initial_retry_delay_secs must be > 0"),
        (dict(initial_retry_delay_secs=0), "initial_retry_delay_secs must be > 0"),
        (dict(initial_retry_delay_secs=5, max_retry_delay_secs=2, recovery_timeout_secs=0),
         "max_retry_delay_secs must be >= initial_retry_delay_secs"),
        (dict(recovery_timeout_secs=0), "recovery_timeout_secs must be > 0"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError) as ei:
            RecoveryConfig(**kw).validate()
        assert str(ei.value) == msg
    RecoveryConfig(initial_retry_delay_secs=5, max_retry_delay_secs=5).validate()


def test_recovery_manager_matrix():
    mgr = MigrationRecoveryManager.with_defaults()
    same = {ET.NETWORK_TRANSIENT, ET.TIMEOUT}
    diff = {ET.INSUFFICIENT_RESOURCES, ET.INCOMPATIBLE_TARGET, ET.TARGET_UNREACHABLE}
    no_rb = MigrationRecoveryManager(RecoveryConfig(auto_rollback=False))
    for t in ET:
        for rc in (0, 1, 2, 3, 4, 5):
            e = MigrationError(t, "m", AID, None, retry_count=rc)
            for m, fallback in ((mgr, RecoveryStrategy.ROLLBACK), (no_rb, RecoveryStrategy.GIVE_UP)):
                got = m.determine_strategy(e)
                if rc >= 3:
                    want = fallback
                elif t in same:
                    want = RecoveryStrategy.RETRY_ON_SAME_TARGET
                elif t in diff:
                    want = RecoveryStrategy.RETRY_ON_DIFFERENT_TARGET
                else:
                    want = fallback
                assert got == want, (t, rc, m.config.auto_rollback)


def test_recovery_manager_flow():
    with pytest.raises(ValueError) as ei:
        MigrationRecoveryManager(RecoveryConfig(recovery_timeout_secs=0))
    assert str(ei.value) == "recovery_timeout_secs must be > 0"
    mgr = MigrationRecoveryManager.with_defaults()
    assert mgr.pending_count() == 0 and mgr.get_history(AID) is None
    with pytest.raises(InvalidStateError) as ei:
        mgr.execute_recovery(AID)
    assert str(ei.value) == "Invalid state: No pending recovery for agent"
    assert mgr.next_retry_time(AID) is None
    assert not mgr.is_ready_for_retry(AID)
    err = MigrationError(ET.TIMEOUT, "Timeout", AID, DST, timestamp=1000)
    mgr.record_failure(err)
    assert mgr.pending_count() == 1 and mgr.get_history(AID) == []
    assert mgr.next_retry_time(AID) == 1010
    assert mgr.is_ready_for_retry(AID)
    strategies = []
    for k in range(4):
        strategies.append(mgr.execute_recovery(AID))
        if k < 3:
            mgr.mark_recovery_failure(AID, "Try %d failed" % (k + 1))
    assert strategies == [RecoveryStrategy.RETRY_ON_SAME_TARGET] * 3 + [RecoveryStrategy.ROLLBACK]
    h = mgr.get_history(AID)
    assert [a.attempt_number for a in h] == [1, 2, 3, 4]
    assert [a.strategy for a in h] == strategies
    assert all(a.target_node == DST for a in h)
    assert [a.error for a in h] == ["Try 1 failed", "Try 2 failed", "Try 3 failed", None]
    assert [a.success for a in h] == [False] * 4
    assert mgr.pending_count() == 1
    assert mgr.get_pending()[0].retry_count == 4
    assert mgr.next_retry_time(AID) == 1000 + RecoveryConfig().calculate_retry_delay(4)
    mgr.mark_recovery_success(AID)
    assert mgr.pending_count() == 0 and mgr.get_history(AID)[-1].success is True
    mgr.clear_history(AID)
    assert mgr.get_history(AID) is None


def test_recovery_manager_misc():
    mgr = MigrationRecoveryManager.with_defaults()
    a1, a2 = bytes([1] * 16), bytes([2] * 16)
    mgr.record_failure(MigrationError(ET.TIMEOUT, "Error 1", a1))
    mgr.record_failure(MigrationError(ET.NETWORK_TRANSIENT, "Error 2", a2))
    assert len(mgr.get_pending()) == 2
    mgr.record_failure(MigrationError(ET.UNKNOWN, "Error 3", a1))  # replaces
    assert mgr.pending_count() == 2
    assert mgr.execute_recovery(a1) == RecoveryStrategy.ROLLBACK
    fresh = MigrationError(ET.TIMEOUT, "now", a2)
    mgr.record_failure(fresh)
    assert mgr.next_retry_time(a2) == fresh.timestamp + 10
    assert not mgr.is_ready_for_retry(a2)
    mgr.execute_recovery(a1)
    mgr.clear_history(a1)
    assert mgr.get_history(a1) is None and mgr.pending_count() == 1
    assert mgr.set_config(RecoveryConfig(max_retries=5)) is None or True
    assert mgr.config.max_retries == 5
    with pytest.raises(ValueError):
        mgr.set_config(RecoveryConfig(initial_retry_delay_secs=0))
    assert mgr.config.max_retries == 5 and mgr.config.initial_retry_delay_secs == 10
    att = RecoveryAttempt(1, RecoveryStrategy.ROLLBACK, 5, None)
    assert att.success is False and att.error is None


# ---------------------------------------------------------------------------------------
# Progress
# ---------------------------------------------------------------------------------------


def test_phase_enum():
    assert [m.name for m in MigrationPhase] == ["CAPTURING", "TRANSFERRING", "VALIDATING", "RESTORING",
                                                "COMPLETED", "FAILED"]


def test_progress_events():
    E = MigrationProgressEvent
    ev = [E.STARTED(agent_id=AID, total_bytes=1000),
          E.CAPTURING_STATE(agent_id=AID, percent=10),
          E.TRANSFER_PROGRESS(agent_id=AID, transferred_bytes=500, total_bytes=1000, percent=50),
          E.VALIDATING(agent_id=AID, step="s"),
          E.RESTORING(agent_id=AID, percent=75),
          E.COMPLETED(agent_id=AID, duration_ms=1000, bytes_transferred=1000),
          E.FAILED(agent_id=AID, error="Error")]
    assert [e.progress_percent() for e in ev] == [None, 10, 50, None, 75, None, None]
    assert [e.is_terminal() for e in ev] == [False] * 5 + [True, True]
    assert all(e.agent_id == AID for e in ev)


def test_progress_tracker_flow():
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 1000, cb)
    assert t.phase == MigrationPhase.CAPTURING and t.progress_percent() == 0
    t.report_started()
    assert t.phase == MigrationPhase.CAPTURING
    t.update_capturing_progress(50)
    assert t.phase == MigrationPhase.CAPTURING
    t.update_transfer_progress(500)
    assert t.phase == MigrationPhase.TRANSFERRING and t.progress_percent() == 50
    t.update_transfer_progress(666)
    assert t.progress_percent() == 66
    t.update_transfer_progress(999)
    assert t.progress_percent() == 99
    t.report_validating("Checksums")
    assert t.phase == MigrationPhase.VALIDATING
    t.update_restoring_progress(75)
    assert t.phase == MigrationPhase.RESTORING
    t.report_completed()
    assert t.phase == MigrationPhase.COMPLETED
    assert t.elapsed_ms() >= 0
    evs = cb.events
    assert cb.event_count() == 8
    assert [e.progress_percent() for e in evs] == [None, 50, 50, 66, 99, None, 75, None]
    assert evs[0].total_bytes == 1000
    assert (evs[2].transferred_bytes, evs[2].total_bytes, evs[2].percent) == (500, 1000, 50)
    assert evs[5].step == "Checksums"
    assert evs[-1].is_terminal() and cb.latest_event() is evs[-1] or cb.latest_event() == evs[-1]
    assert evs[-1].duration_ms >= 0
    cb.clear()
    assert cb.event_count() == 0 and cb.latest_event() is None
    f = MigrationProgressTracker(AID, 1000, cb)
    f.report_failed("Test error")
    assert f.phase == MigrationPhase.FAILED
    assert cb.latest_event().error == "Test error" and cb.latest_event().is_terminal()


def test_progress_percent_rules():
    t = MigrationProgressTracker(AID, 3)
    t.update_transfer_progress(1)
    assert t.progress_percent() == 33
    t.update_transfer_progress(2)
    assert t.progress_percent() == 66
    t.update_transfer_progress(10)  # clamped
    assert t.progress_percent() == 100
    z = MigrationProgressTracker(AID, 0)
    assert z.progress_percent() == 100
    cb = CollectingCallback()
    z2 = MigrationProgressTracker(AID, 0, callback=cb)
    z2.update_transfer_progress(0)
    assert z2.progress_percent() == 100 and cb.latest_event().percent == 100
    big = MigrationProgressTracker(AID, 2 ** 64 - 1, callback=cb)
    big.update_transfer_progress(2 ** 63)
    assert big.progress_percent() == 50 and cb.latest_event().percent == 50
    over = MigrationProgressTracker(AID, 100, callback=cb)
    over.update_transfer_progress(250)
    assert cb.latest_event().percent == 100 and over.progress_percent() == 100


def test_callbacks():
    seen = []
    t = MigrationProgressTracker(AID, 10, callback=seen.append)
    t.report_started()
    assert len(seen) == 1 and seen[0].total_bytes == 10
    order = []
    mc = MultiCallback()
    mc.add(lambda e: order.append(("a", e)))
    c = CollectingCallback()
    mc.add(c)
    mc.add(lambda e: order.append(("b", e)))
    assert mc.callback_count() == 3
    ev = MigrationProgressEvent.STARTED(agent_id=AID, total_bytes=5)
    mc(ev)
    assert [x[0] for x in order] == ["a", "b"] and c.event_count() == 1 and c.events[0] is ev
    c(ev)
    assert c.event_count() == 2


# ---------------------------------------------------------------------------------------
# Agent / ids
# ---------------------------------------------------------------------------------------


def test_agent():
    a = Agent(b"\x00asm")
    assert isinstance(a.id, uuid.UUID) and a.id.version == 4
    assert a.wasm_binary == b"\x00asm"
    assert Agent().wasm_binary == b""
    assert Agent().id != Agent().id
    assert Agent(agent_id=AID).id == uuid.UUID(bytes=AID)
    u = uuid.uuid4()
    assert Agent(agent_id=u).id == u
    assert a.policy == Policy(min_battery_percent=20, max_latency_ms=100, preferred_architectures=[])
    assert Policy().preferred_architectures == []
    p = Policy(min_battery_percent=5)
    assert Agent(policy=p).policy == p
    with pytest.raises(TypeError):
        Agent(b"", AID)  # agent_id is keyword-only
    with pytest.raises((ValueError, TypeError)):
        Agent(agent_id=b"short")


# ---------------------------------------------------------------------------------------
# Large-ish states (threaded paths): boundaries, ordering, atomicity
# ---------------------------------------------------------------------------------------


def o_checksum_chunked(data, chunk=1 << 22) -> int:
    mv = memoryview(data)
    total = 0
    for start in range(0, len(mv), chunk):
        part = np.frombuffer(mv[start:start + chunk], dtype=np.uint8).astype(np.uint64)
        w = (np.arange(start + 1, start + 1 + len(part), dtype=np.uint64) & np.uint64(M32))
        total = (total + int(((part * w) & np.uint64(M32)).sum(dtype=np.uint64))) & M32
    return total


BIG = 40 * 1024 * 1024 + 1234


@pytest.fixture(scope="module")
def big_pair():
    old = np.random.default_rng(77).integers(0, 256, BIG, dtype=np.uint8).tobytes()
    pos = {0, 1, 4095, 4096, BIG - 1, BIG - 1234, BIG - 1235}
    for k in range(12, 26):
        pos |= {2 ** k - 1, 2 ** k, 2 ** k + 1}
    new = bytearray(old)
    for p in pos:
        new[p] ^= 0xA5
    return old, bytes(new), sorted(pos)


def test_big_state_kernels_match_oracles(big_pair):
    old, new, pos = big_pair
    assert simple_checksum(new) == o_checksum_chunked(new)
    assert simple_checksum(old) == o_checksum_chunked(old)
    pages = sorted({p // PAGE_SIZE for p in pos})
    assert list(dirty_pages(old, new)) == pages
    assert first_difference(old, new) == 0
    assert first_difference(old[1:], new[1:]) == 0
    assert first_difference(old[2:], new[2:]) == 4093
    assert digest(new) == o_tree(new)
    assert digest(new, "xxh3_128") == xxhash.xxh3_128_digest(new)
    # the first difference is the lowest offset even when a later region differs too
    late = bytearray(old)
    late[30 * 1024 * 1024 + 5] ^= 1
    late[10 * 1024 * 1024 + 7] ^= 1
    assert first_difference(old, bytes(late)) == 10 * 1024 * 1024 + 7


def test_big_state_delta_roundtrip_and_atomicity(big_pair):
    old, new, pos = big_pair
    pages = sorted({p // PAGE_SIZE for p in pos})
    for kw in ({}, {"digest": None}, {"key": KEY}):
        d = DeltaSnapshot.create(AID, old, new, 0, 1, **kw)
        assert [p.index for p in d.dirty_pages] == pages
        assert d.checksum == o_checksum_chunked(new) and d.total_size == BIG
        apply_kw = {"key": KEY} if "key" in kw else {}
        base = bytearray(old)
        d.apply(base, **apply_kw)
        assert base == new
        w = d.serialize()
        r = DeltaSnapshot.deserialize(w)
        base = np.frombuffer(old, dtype=np.uint8).copy()
        r.apply(base, **apply_kw)
        assert base.tobytes() == new
    # tampered large deltas leave the base unchanged
    for tamper in ("checksum", "index", "mid-page", "last-page"):
        d = DeltaSnapshot.create(AID, old, new, 0, 1, digest=None)
        if tamper == "checksum":
            d.checksum ^= 0x10
        elif tamper == "index":
            d.dirty_pages[-1].index = (BIG + PAGE_SIZE - 1) // PAGE_SIZE
        elif tamper == "mid-page":
            p = d.dirty_pages[len(d.dirty_pages) // 2]
            raw = bytearray(p.get_data())
            raw[0] ^= 1
            p.data, p.compressed = bytes(raw), False
        else:
            p = d.dirty_pages[-1]
            p.data, p.compressed = bytes(p.get_data())[:-1], False
        base = bytearray(old)
        with pytest.raises(InvalidStateError):
            d.apply(base)
        assert xxhash.xxh3_128_digest(base) == xxhash.xxh3_128_digest(old), tamper


def test_big_state_content_forgery_far_offset(big_pair):
    old, _, _ = big_pair
    k = 2 ** 24 + 3
    f = bytearray(old)
    for j, dv in ((k, 1), (k + 1, 1), (2 * k + 2, -1)):
        if not (0 < f[j] + dv < 256):
            f[j] = 100 - dv
    base = bytes(f)  # a copy whose three bytes allow the forgery
    forged = bytearray(base)
    forged[k] += 1
    forged[k + 1] += 1
    forged[2 * k + 2] -= 1
    cs = o_checksum_chunked(base)
    assert o_checksum_chunked(forged) == cs
    r = StateVerifier.verify_state(base, bytes(forged), cs)
    assert not r.passed and not r.content_valid and r.checksum_valid and r.size_valid
    assert "Content mismatch at offset %d" % k in r.details


# ---------------------------------------------------------------------------------------
# Sizes are in bytes for every buffer kind; memory: no copies to read
# ---------------------------------------------------------------------------------------


def test_sizes_are_bytes_for_wide_numpy():
    a = np.arange(1000, dtype=np.uint32)
    b2 = a.copy()
    b2[3] = 7
    v = MigrationValidator()
    agent = Agent()
    v.capture_rollback_info(MID, agent, a)
    assert list(v.audit_log)[-1].details == "Rollback info captured: 4000 bytes"
    r = v.verify_post_migration(MID, AID, a, a.copy())
    assert r.details == ["Size verified: 4000 bytes", "Checksum verified"]
    r = StateVerifier.verify_state(a, a[:500].copy(), o_checksum(a.tobytes()))
    assert r.details[0] == "Size mismatch: original 4000 bytes, migrated 2000 bytes"
    d = DeltaSnapshot.create(AID, a, b2, 0, 1)
    assert d.total_size == 4000
    assert StateVerifier.verify_delta(a, d, d.checksum).details[1] == "Delta size compatible with base state"
    info = v.execute_rollback(MID)
    assert list(v.audit_log)[-1].details == "Rollback completed: restored 4000 bytes"
    assert bytes(info.original_state) == a.tobytes()
    assert info.digest == o_tree(a.tobytes())
    m = IncrementalMigrator()
    m.start_tracking(AID, a)
    dd = m.create_incremental(AID, b2)
    assert m.stats.bytes_saved_delta == 4000 - dd.compressed_size()
    assert m.stats.avg_delta_ratio == pytest.approx(dd.compressed_size() / 4000)
    t = DirtyPageTracker(AID, 4000)
    t.mark_range_dirty(0, 4000)
    assert t.dirty_count() == 1
    import array
    assert simple_checksum(array.array("d", [1.5, 2.5])) == o_checksum(struct.pack("=2d", 1.5, 2.5))
    assert simple_checksum(memoryview(a)) == o_checksum(a.tobytes())
    assert simple_decompress(memoryview(b"\xff\x04A")) == b"AAAA"
    assert simple_decompress(np.frombuffer(b"\xff\x04A", dtype=np.uint8)) == b"AAAA"


def test_readers_make_no_copy():
    import tracemalloc
    if getattr(cellmigrate, "IMPLEMENTATION", "compiled") == "reference":
        pytest.skip("the pure-Python reference is a test oracle, not the zero-copy path")
    n = 16 * 1024 * 1024
    old = bytes(n)
    nb = bytearray(n)
    nb[5] = 3
    nb[n // 2] = 1
    new = bytes(nb)
    d0 = DeltaSnapshot.create(AID, old, new, 0, 1)
    calls = {
        "checksum": lambda: simple_checksum(new),
        "first_difference": lambda: first_difference(old, new),
        "dirty_pages": lambda: dirty_pages(old, new),
        "digest": lambda: digest(new),
        "verify_state": lambda: StateVerifier.verify_state(old, new, 1),
        "create": lambda: DeltaSnapshot.create(AID, old, new, 0, 1),
        "create-none": lambda: DeltaSnapshot.create(AID, old, new, 0, 1, digest=None),
        "apply": lambda: d0.apply(bytearray_base),
    }
    bytearray_base = bytearray(old)
    for name, fn in calls.items():
        tracemalloc.start()
        try:
            fn()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < n // 8, (name, peak)
    tracemalloc.start()
    try:
        RollbackInfo.capture(Agent(), new)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < n * 1.5  # "copies the state once"


# ---------------------------------------------------------------------------------------
# Misc edges
# ---------------------------------------------------------------------------------------


def test_misc_edges():
    with pytest.raises(ValueError):
        dirty_pages(b"a" * 10, b"b" * 10, page_size=0)
    with pytest.raises((CorruptDataError, ValueError)):
        lz4_decompress(struct.pack("<I", 0x7FFFFFFF) + b"\x00")
    with pytest.raises((CorruptDataError, ValueError)):
        zstd_decompress(b"garbage")
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID))
    mgr.mark_recovery_success(AID)  # no attempt yet: just drops pending
    assert mgr.pending_count() == 0 and mgr.get_history(AID) == []
    mgr.mark_recovery_failure(bytes(16), "e")
    mgr.clear_history(bytes([7] * 16))
    capped = RecoveryConfig(initial_retry_delay_secs=500, max_retry_delay_secs=300)
    assert capped.calculate_retry_delay(1) == 300
    assert RecoveryConfig(initial_retry_delay_secs=500, max_retry_delay_secs=300,
                          use_exponential_backoff=False).calculate_retry_delay(3) == 500
    # rollback info keyed by migration id: UUID and bytes are the same key
    v = MigrationValidator()
    v.capture_rollback_info(uuid.UUID(bytes=MID), Agent(), b"xyz")
    assert bytes(v.execute_rollback(MID).original_state) == b"xyz"
    # audit entries without nodes round-trip through JSON
    e = AuditEntry.new(MID, AID, AuditEventType.TRANSFER_COMPLETED, "t", False)
    assert AuditEntry.from_dict(json.loads(json.dumps(e.to_dict()))) == e


def test_apply_failure_does_not_grow_bytearray():
    new = bytearray(PAGE_SIZE * 2 + 100)
    new[PAGE_SIZE * 2 + 5] = 1
    d = DeltaSnapshot.create(AID, bytes(len(new)), bytes(new), 0, 1)
    d.checksum ^= 1
    base = bytearray(PAGE_SIZE * 2)
    with pytest.raises(InvalidStateError):
        d.apply(base)
    assert base == bytes(PAGE_SIZE * 2)
    k = DeltaSnapshot.create(AID, bytes(len(new)), bytes(new), 0, 1, key=KEY)
    base = bytearray(PAGE_SIZE)
    with pytest.raises(InvalidStateError):
        k.apply(base)
    assert base == bytes(PAGE_SIZE)


def test_rollback_restore_size_mismatch_untouched():
    r = RollbackInfo.capture(Agent(), b"abcdef" * 1000)
    for t in (np.zeros(10, dtype=np.uint8), memoryview(bytearray(7000))):
        with pytest.raises((CellError, ValueError)):
            r.restore_into(t)
        assert not any(b(t))


# ---------------------------------------------------------------------------------------
# §1 extension missing / pure-Python opt-in (subprocess, extension import blocked)
# ---------------------------------------------------------------------------------------

_BLOCK = r'''
import sys, json, importlib.abc
class _B(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.startswith("cellmigrate._kernels"):
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, _B())
try:
    import cellmigrate as c
except ImportError as e:
    print(json.dumps({"error": str(e)}))
    raise SystemExit(0)
out = {}
data = bytes(range(256)) * 20 + b"\0" * 5000 + b"\xff" * 3
out["checksum"] = c.simple_checksum(data)
out["rle"] = c.simple_compress(data).hex()
out["unrle"] = c.simple_decompress(bytes.fromhex(out["rle"])) == data
bad = []
for s in (b"\xff", b"a\xff\x01", b"\xff\x00a"):
    try:
        c.simple_decompress(s)
        bad.append(False)
    except c.CorruptDataError:
        bad.append(True)
out["strict"] = bad
new = bytearray(data); new[4097] ^= 1
out["first"] = c.first_difference(data, bytes(new))
out["pages"] = [int(x) for x in c.dirty_pages(data, bytes(new))]
print(json.dumps(out))
'''


def _run_blocked(env_extra):
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop("CELLMIGRATE_PURE_PYTHON", None)
    env.update(env_extra)
    p = subprocess.run([sys.executable, "-c", _BLOCK], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_missing_extension_fails_clearly_unless_opted_in():
    r = _run_blocked({})
    assert "error" in r and "CELLMIGRATE_PURE_PYTHON" in r["error"]
    r = _run_blocked({"CELLMIGRATE_PURE_PYTHON": "1"})
    data = bytes(range(256)) * 20 + b"\0" * 5000 + b"\xff" * 3
    assert r["checksum"] == o_checksum(data)
    assert r["rle"] == o_rle(data).hex() and r["unrle"] is True
    assert r["strict"] == [True, True, True]
    assert r["first"] == 4097 and r["pages"] == [1]


# ---------------------------------------------------------------------------------------
# §5 durable audit sink, JSON Lines
# ---------------------------------------------------------------------------------------


def test_durable_sink_keeps_evicted_entries(tmp_path):
    p = str(tmp_path / "audit.db")
    log = MigrationAuditLog(2, sink=p)
    for _ in range(5):
        log.log_start(MID, AID)
    log.log_completion(MID, AID, False, "x")
    assert len(log) == 2
    assert len(log.get_migration_entries(MID)) == 6
    del log
    import gc
    gc.collect()
    again = MigrationAuditLog(sink=p)
    assert len(again.get_migration_entries(MID)) == 6
    assert len(again.get_agent_entries(AID)) == 6
    assert [e.details for e in again.get_failures()] == ["x"]
    assert len(again.get_entries_by_type(AuditEventType.MIGRATION_STARTED)) == 5


def test_jsonl_roundtrip(tmp_path):
    log = MigrationAuditLog()
    log.log_start(MID, AID, SRC, DST)
    log.log_validation(MID, AID, CompatibilityStatus.compatible_with_warnings(["a"]))
    log.log_completion(MID, AID, False, "caf\u00e9 \"q\"")
    p = str(tmp_path / "a.jsonl")
    cellmigrate.export_jsonl(list(log), p)
    assert cellmigrate.import_jsonl(p) == list(log)
    with open(p, encoding="utf-8") as f:
        lines = [json.loads(x) for x in f if x.strip()]
    assert len(lines) == 3


# ---------------------------------------------------------------------------------------
# §5 Beyond: long operations report through the same (event) callbacks
# ---------------------------------------------------------------------------------------


def test_delta_create_apply_report_through_event_callbacks():
    old = bytes(PAGE_SIZE * 64)
    nb = bytearray(old)
    nb[7] = 1
    cb = CollectingCallback()
    d = DeltaSnapshot.create(AID, old, bytes(nb), 0, 1, progress=cb)
    assert cb.event_count() >= 1
    assert all(isinstance(e, MigrationProgressEvent) for e in cb.events)
    pct = [e.progress_percent() for e in cb.events if e.progress_percent() is not None]
    assert pct and pct == sorted(pct) and pct[-1] == 100
    cb2 = CollectingCallback()
    base = bytearray(old)
    d.apply(base, progress=cb2)
    assert base == nb and cb2.event_count() >= 1
    assert all(isinstance(e, MigrationProgressEvent) for e in cb2.events)


def test_progress_adapter_reaches_100():
    old = bytes(PAGE_SIZE * 64)
    nb = bytearray(old)
    nb[7] = 1
    cb = CollectingCallback()
    d = DeltaSnapshot.create(AID, old, bytes(nb), 0, 1, progress=cellmigrate.byte_progress(cb, AID))
    assert cb.latest_event().progress_percent() == 100
    cb.clear()
    d.apply(bytearray(old), progress=cellmigrate.byte_progress(cb, AID))
    assert cb.latest_event().progress_percent() == 100


def test_static_style_calls_and_case_sensitivity():
    caps = NodeCapabilities.new()
    r = CompatibilityValidator().check_compatibility(AgentRequirements(architecture="X86_64"), caps)
    assert r == CompatibilityStatus.incompatible("Target does not support architecture: X86_64")
    s = bytes([1, 2, 3])
    assert StateVerifier().verify_state(s, s, o_checksum(s)).passed
    assert VerificationResult.failure("x").content_valid is False
    e = AuditEntry.new(MID, AID, AuditEventType.MIGRATION_STARTED, "t", True).with_nodes(
        uuid.UUID(bytes=SRC), uuid.UUID(bytes=DST))
    assert (e.source_node, e.target_node) == (SRC, DST)
    log = MigrationAuditLog()
    log.log_start(uuid.UUID(bytes=MID), uuid.UUID(bytes=AID), uuid.UUID(bytes=SRC), uuid.UUID(bytes=DST))
    e = list(log)[0]
    assert (e.migration_id, e.agent_id, e.source_node, e.target_node) == (MID, AID, SRC, DST)
    me = MigrationError(ET.TIMEOUT, "t", AID, uuid.UUID(bytes=DST))
    assert me.target_node == DST


def test_delta_pages_are_copies():
    old = bytes(PAGE_SIZE * 3)
    nb = bytearray(old)
    nb[1] = 5
    nb[PAGE_SIZE * 2 + 1] = 7
    rand_page = rnd(PAGE_SIZE, 5)
    nb[PAGE_SIZE:PAGE_SIZE * 2] = rand_page  # an uncompressible page
    want = bytes(nb)
    d = DeltaSnapshot.create(AID, old, nb, 0, 1)
    nb[:] = bytes(len(nb))  # the caller reuses its buffer
    base = bytearray(old)
    d.apply(base)
    assert base == want
    w = bytearray(DeltaSnapshot.create(AID, old, want, 0, 1).serialize())
    r = DeltaSnapshot.deserialize(w)
    w[:] = bytes(len(w))
    base = bytearray(old)
    r.apply(base)
    assert base == want
    dg = DeltaSnapshot.create(AID, old, want, 0, 1, digest="blake3")
    assert dg.digest == blake3.blake3(want).digest() and dg.keyed is False
    with pytest.raises(ValueError):
        DeltaSnapshot.create(AID, old, want, 0, 1, digest="md5")
    with pytest.raises((ValueError, TypeError)):
        DeltaSnapshot.create(AID, old, want, 0, 1, key=b"short")


# ---------------------------------------------------------------------------------------
# Wire mutation fuzz with a resealed trailer: every mutation reaches the field checks
# ---------------------------------------------------------------------------------------

_FUZZ_OLD = rnd(PAGE_SIZE * 3 + 300, 21)
_FUZZ_NEW = bytearray(_FUZZ_OLD)
_FUZZ_NEW[PAGE_SIZE:PAGE_SIZE * 2] = bytes(PAGE_SIZE)
_FUZZ_NEW[5] ^= 1
_FUZZ_NEW[-1] ^= 1
_FUZZ_NEW = bytes(_FUZZ_NEW)
_FUZZ_WIRES = [DeltaSnapshot.create(AID, _FUZZ_OLD, _FUZZ_NEW, 1, 2, **kw).serialize()
               for kw in ({}, {"digest": None}, {"key": KEY})]


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, 2), st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4),
       st.integers(-40, 40))
def test_wire_mutation_fuzz_resealed(which, muts, resize):
    w = _FUZZ_WIRES[which]
    body = bytearray(w[:-16])
    for pos, val in muts:
        body[pos % len(body)] = val
    if resize > 0:
        body += bytes([resize]) * resize
    elif resize < 0:
        del body[resize:]
    data = _reseal(bytes(body))
    try:
        r = DeltaSnapshot.deserialize(data)
    except CorruptDataError:
        return
    assert r.serialize() == data  # a delta that decodes re-encodes to exactly its input
    base = bytearray(_FUZZ_OLD)
    try:
        r.apply(base, **({"key": KEY} if r.keyed else {}))
    except InvalidStateError:
        assert base == _FUZZ_OLD
        return
    assert len(base) == r.total_size
    assert simple_checksum(base) == r.checksum


def test_recovery_manager_history_rules():
    mgr = MigrationRecoveryManager(RecoveryConfig(max_retries=0))
    assert mgr.determine_strategy(MigrationError(ET.TIMEOUT, "t", AID)) == RecoveryStrategy.ROLLBACK
    m = MigrationRecoveryManager.with_defaults()
    m.record_failure(MigrationError(ET.TIMEOUT, "a", AID, DST))
    m.execute_recovery(AID)
    m.record_failure(MigrationError(ET.INCOMPATIBLE_TARGET, "b", AID, SRC))  # replaces, history kept
    assert len(m.get_history(AID)) == 1
    assert m.execute_recovery(AID) == RecoveryStrategy.RETRY_ON_DIFFERENT_TARGET
    h = m.get_history(AID)
    assert [a.attempt_number for a in h] == [1, 1]
    assert [a.target_node for a in h] == [DST, SRC]


def test_progress_ids_are_bytes():
    cb = CollectingCallback()
    t = MigrationProgressTracker(uuid.UUID(bytes=AID), 10, callback=cb)
    t.report_started()
    t.update_capturing_progress(40)
    t.update_restoring_progress(60)
    assert all(e.agent_id == AID for e in cb.events)
    assert [e.progress_percent() for e in cb.events] == [None, 40, 60]
    assert cb.events[1].percent == 40 and cb.events[2].percent == 60


def test_dirty_page_corrupt_stream_raises_corrupt():
    p = DirtyPage(0, b"\x01\xff", compressed=True)
    with pytest.raises(CorruptDataError):
        p.get_data()
    with pytest.raises(CorruptDataError):
        p.decompress()


def test_readonly_targets_refused_untouched():
    old, new = _pair()
    d = DeltaSnapshot.create(AID, old, new, 0, 1)
    ro = np.frombuffer(old, dtype=np.uint8)  # read-only numpy view
    with pytest.raises((TypeError, ValueError, InvalidStateError)):
        d.apply(ro)
    assert ro.tobytes() == old
    with tempfile.TemporaryFile() as f:
        f.write(old)
        f.flush()
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            with pytest.raises((TypeError, ValueError, InvalidStateError)):
                d.apply(m)
            assert m[:] == old
        finally:
            m.close()
    with pytest.raises((TypeError, ValueError, InvalidStateError)):
        d.apply(memoryview(old))


@pytest.mark.large
def test_sparse_over_4gib_delta_create_apply_wire():
    size = 2 ** 32 + 2 * 4096 + 100
    hot = 2 ** 32 + 4096 + 9
    with tempfile.TemporaryDirectory() as tmp:
        pa, pb = os.path.join(tmp, "a"), os.path.join(tmp, "b")
        for p, extra in ((pa, False), (pb, True)):
            with open(p, "wb") as f:
                f.truncate(size)
                f.seek(2 ** 32)
                f.write(b"\x05")
                if extra:
                    f.seek(hot)
                    f.write(b"\x07")
                    f.seek(size - 1)
                    f.write(b"\x01")
        fa, fb = open(pa, "r+b"), open(pb, "rb")
        ma = mmap.mmap(fa.fileno(), 0)
        mb = mmap.mmap(fb.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            d = DeltaSnapshot.create(AID, ma, mb, 0, 1)
            assert d.total_size == size
            assert [p.index for p in d.dirty_pages] == [hot // 4096, (size - 1) // 4096]
            want = (5 * 1 + 7 * ((hot + 1) % 2 ** 32) + 1 * (size % 2 ** 32)) % 2 ** 32
            assert d.checksum == want
            r = DeltaSnapshot.deserialize(d.serialize())
            assert r.total_size == size and [p.index for p in r.dirty_pages] == [hot // 4096, (size - 1) // 4096]
            r.checksum ^= 1
            with pytest.raises(InvalidStateError):
                r.apply(ma)
            assert ma[hot] == 0 and ma[size - 1] == 0
            d.apply(ma)
            assert ma[hot] == 7 and ma[size - 1] == 1 and ma[2 ** 32] == 5
            assert first_difference(ma, mb) is None
        finally:
            ma.close()
            mb.close()
            fa.close()
            fb.close()


def test_audit_eviction_is_insertion_order_not_time_order():
    log = MigrationAuditLog.with_capacity(3)
    for ts in (500, 400, 300, 200, 100):
        log.log(AuditEntry(MID, AID, AuditEventType.TRANSFER_STARTED, ts, details=str(ts), success=True))
    assert [e.details for e in log] == ["300", "200", "100"]
    assert [e.details for e in log.get_entries_in_range(0, 1000)] == ["300", "200", "100"]
    assert [e.details for e in log.get_entries_in_range(200, 300)] == ["300", "200"]
    plain = MigrationAuditLog()
    for _ in range(10001):
        plain.log_start(MID, AID)
    assert len(plain) == 10000


def test_progress_completed_duration():
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 10, callback=cb)
    time.sleep(0.03)
    t.report_completed()
    ev = cb.latest_event()
    assert ev.is_terminal() and ev.duration_ms >= 25
    assert t.elapsed_ms() >= 25


def test_rollback_digest_catches_weak_forgery():
    state = bytearray(rnd(5000, 8))
    state[0] = 10
    state[1] = 10
    state = bytes(state)
    forged = bytearray(state)
    forged[0] = 12
    forged[1] = 9
    assert o_checksum(forged) == o_checksum(state)
    r = RollbackInfo.capture(Agent(), state)
    assert r.digest == o_tree(state)
    r.original_state = bytes(forged)
    with pytest.raises(CellError):
        r.restore_into(bytearray(len(state)))
    k = RollbackInfo.capture(Agent(), state, key=KEY)
    t = bytearray(len(state))
    k.restore_into(t, key=KEY)
    assert t == state


def test_ids_must_be_16_bytes():
    for bad in (b"", b"x" * 15, b"x" * 17):
        with pytest.raises((ValueError, TypeError)):
            DeltaSnapshot.create(bad, b"", b"", 0, 1)
        with pytest.raises((ValueError, TypeError)):
            MigrationError(ET.TIMEOUT, "t", bad)
        with pytest.raises((ValueError, TypeError)):
            MigrationValidator().verify_post_migration(bad, AID, b"", b"")


def test_misaligned_views_and_all_small_lengths():
    rng = np.random.default_rng(99)
    raw = bytearray(rng.integers(0, 256, 70000, dtype=np.uint8).tobytes())
    raw[20000:30000] = bytes(10000)
    raw[30000:30500] = b"\xff" * 500
    raw = bytes(raw)
    mv = memoryview(raw)
    for off in range(0, 67):
        for n in (0, 1, 2, 3, 5, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257,
                  4095, 4096, 4097, 8191, 12288 + 7):
            view = mv[off:off + n]
            data = raw[off:off + n]
            assert simple_checksum(view) == o_checksum(data), (off, n)
    for off in (1, 3, 7, 13, 31, 33):
        for start in (0, 19990, 29990):
            view = mv[start + off:start + off + 9000]
            data = bytes(view)
            assert simple_compress(view) == o_rle(data)
            other = bytearray(data)
            for k in (0, 1, 15, 16, 31, 32, 63, 64, 4095, 4096, 8999):
                o2 = bytearray(data)
                o2[k] ^= 0x40
                assert first_difference(view, bytes(o2)) == k
                assert first_difference(bytes(o2), view) == k
                assert list(dirty_pages(view, bytes(o2))) == [k // PAGE_SIZE]
            assert first_difference(view, bytes(other)) is None
    for n in range(0, 300):
        d = raw[1000:1000 + n]
        assert simple_checksum(d) == o_checksum(d)
        z = bytes(n)
        assert simple_compress(z) == o_rle(z)
        f = b"\xff" * n
        assert simple_compress(f) == o_rle(f)


@pytest.mark.parametrize("dtype", ["datetime64[s]", "timedelta64[ms]", "U3", "S2", "float16", "bool", ">u4",
                                   "complex64", "V3"])
def test_numpy_any_dtype_viewed_as_raw_bytes(dtype):
    """SPEC §2: numpy arrays of *any* dtype (viewed as raw bytes), for readers and targets."""
    base = np.arange(4096 * 3, dtype=np.int64)
    if dtype.startswith(("datetime64", "timedelta64")):
        arr = base.astype(dtype)
    elif dtype == "U3":
        arr = np.array([str(i % 1000) for i in range(2000)], dtype="U3")
    elif dtype == "S2":
        arr = np.array([b"%02d" % (i % 100) for i in range(5000)], dtype="S2")
    elif dtype == "V3":
        arr = np.frombuffer(rnd(3 * 3000, 2), dtype="V3").copy()
    else:
        arr = base.astype(dtype)
    raw = arr.tobytes()
    assert simple_checksum(arr) == o_checksum(raw)
    assert simple_compress(arr) == o_rle(raw)
    assert digest(arr) == o_tree(raw)
    assert digest(arr, "xxh3_128") == xxhash.xxh3_128_digest(raw)
    new = bytearray(raw)
    new[len(new) // 2] ^= 1
    new = bytes(new)
    assert first_difference(arr, new) == len(raw) // 2
    assert StateVerifier.verify_state(arr, arr.copy(), o_checksum(raw)).passed
    d = DeltaSnapshot.create(AID, arr, new, 0, 1)
    assert d.total_size == len(raw)
    target = arr.copy()
    d.apply(target)
    assert target.tobytes() == new


def test_apply_to_exported_bytearray_cannot_grow():
    new = bytearray(PAGE_SIZE * 2 + 100)
    new[PAGE_SIZE * 2 + 5] = 1
    d = DeltaSnapshot.create(AID, bytes(len(new)), bytes(new), 0, 1)
    ba = bytearray(PAGE_SIZE * 2)
    view = memoryview(ba)
    with pytest.raises(InvalidStateError):
        d.apply(ba)
    assert len(ba) == PAGE_SIZE * 2 and not any(ba)
    view.release()
    d.apply(ba)
    assert ba == new


def test_crate_compression_ratio_tests():
    z = b"\0" * 10000
    payload, method = adaptive_compress(z)
    assert len(payload) < len(z) // 10
    agg, agg_m = adaptive_compress_aggressive(z)
    assert len(agg) <= len(payload)
    assert adaptive_decompress(agg, agg_m) == z
    s = b"\0" * 50000
    for enc in (simple_compress(s), lz4_compress(s), zstd_compress(s, 3)):
        assert len(enc) < len(s) // 10
    pat = b"\0\0\0\0\1\2\3\4" * 100
    enc, m = adaptive_compress_aggressive(pat)
    assert adaptive_decompress(enc, m) == pat and len(enc) / len(pat) < 0.5
    for data in (b"\0" * 1000, b"".join(bytes([i % 256, (i + 1) % 256] * 2) for i in range(100))):
        enc, m = adaptive_compress(data)
        assert adaptive_decompress(enc, m) == data
    med, mm = adaptive_compress(b"\0" * 2000)
    assert mm in (CompressionMethod.RLE, CompressionMethod.LZ4)


def test_tampered_digest_fields_raise_invalid_state_untouched():
    """SPEC §3: on any failure ... the base is unchanged and InvalidStateError says what failed."""
    old = bytes(PAGE_SIZE * 2)
    nb = bytearray(old)
    nb[3] = 1
    new = bytes(nb)

    def run(tamper, key=None):
        d = DeltaSnapshot.create(AID, old, new, 0, 1)
        tamper(d)
        base = bytearray(old)
        with pytest.raises(InvalidStateError):
            if key is None:
                d.apply(base)
            else:
                d.apply(base, key=key)
        assert base == old

    run(lambda d: setattr(d, "digest", b"abc"))
    run(lambda d: setattr(d, "digest_algorithm", "md5"))
    run(lambda d: setattr(d, "digest", None))
    run(lambda d: setattr(d, "keyed", True))
    run(lambda d: setattr(d, "keyed", True), key=KEY)  # "keyed" xxh3 delta: refused, not a ValueError
    run(lambda d: setattr(d, "total_size", PAGE_SIZE * 2 - 1))


def test_wire_reader_messages_name_the_field():
    """docs/FORMAT.md (SPEC §6: a documented format): each refusal names its field."""
    _, _, d = _sample_delta(digest=None)
    w = d.serialize()
    body = bytearray(w[:-16])

    def msg(data, **kw):
        with pytest.raises(CorruptDataError) as ei:
            DeltaSnapshot.deserialize(data, **kw)
        return str(ei.value)

    assert "bad magic" in msg(b"garbage" * 20)
    assert "truncated" in msg(MAGIC + b"\x01\x00" + bytes(20))
    f = bytearray(body)
    f[8:10] = struct.pack("<H", 3)
    assert "unsupported version 3" in msg(_reseal(bytes(f)))
    f = bytearray(body)
    f[10] = 7
    assert "unknown digest algorithm" in msg(_reseal(bytes(f)))
    assert "total_size" in msg(w, max_total_size=10)
    f = bytearray(body)
    f[76:80] = struct.pack("<I", 10 ** 6)
    assert "page count" in msg(_reseal(bytes(f)))
    _, idx_at, _, _, _ = _v2_table(w)
    f = bytearray(body)
    f[idx_at : idx_at + 4] = struct.pack("<I", 10 ** 6)
    assert msg(_reseal(bytes(f))).startswith("page 0:")
    m = bytearray(w)
    m[-1] ^= 1
    assert "whole-payload check mismatch" in msg(bytes(m))


def test_deserialize_allocation_bounded_by_input():
    import tracemalloc
    if getattr(cellmigrate, "IMPLEMENTATION", "compiled") == "reference":
        pytest.skip("the pure-Python reference is a test oracle; allocation bounds are a property of the compiled path")
    n = 4 << 20
    new = rnd(n, 31)
    w = DeltaSnapshot.create(AID, bytes(n), new, 0, 1).serialize()
    tracemalloc.start()
    try:
        DeltaSnapshot.deserialize(w)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(w)
    # a forged header declaring a huge state and page count allocates nothing like it
    body = bytearray(w[:-16])
    body[48:56] = struct.pack("<Q", 60 * GiB)
    body[76:80] = struct.pack("<I", 60 * GiB // PAGE_SIZE)
    forged = _reseal(bytes(body))
    del body
    tracemalloc.start()
    try:
        with pytest.raises(CorruptDataError):
            DeltaSnapshot.deserialize(forged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(w)
