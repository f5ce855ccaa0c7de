"""Hostile and odd inputs to the library (issue 10 §4).

* Buffers holding Python object references (any numpy dtype whose ``hasobject`` is true,
  or any exporter whose PEP 3118 format has an ``O`` item) are refused with ``TypeError``
  by every public entry point that takes state: their bytes are pointers, so a checksum
  of them sums addresses and an apply over them corrupts the heap.
* ``DeltaSnapshot.apply`` grows a short base only up to the caller's ``max_size``, and an
  allocation failure while growing is an ``InvalidStateError`` with the base unchanged.
* LZ4 above its block limit: ``lz4_compress`` raises ``InputTooLargeError`` naming the
  limit, and the adaptive functions do not try LZ4 there.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys
import textwrap
import uuid
from typing import Any, Callable, Dict

import lz4.block
import numpy as np
import pytest
import zstandard

import cellmigrate as cm
from cellmigrate import (
    CompressionMethod,
    DeltaSnapshot,
    DirtyPage,
    DirtyPageTracker,
    IncrementalMigrator,
    InvalidStateError,
    MigrationValidator,
    RollbackInfo,
    StateVerifier,
)
from cellmigrate import compression
from cellmigrate.checksum import pages_checksum, state_pages_checksum
from cellmigrate.delta import DEFAULT_MAX_GROW_SIZE

AID = bytes(range(16))
MID = bytes(16)
N = 4096  # bytes of every buffer below: one page
PAGE = 4096


# --------------------------------------------------------------------------------------
# buffers of Python object references
# --------------------------------------------------------------------------------------


def _object_kinds() -> Dict[str, Callable[[], Any]]:
    """Every kind of object-reference buffer, each exactly ``N`` bytes (on 64-bit)."""
    n_refs = N // 8
    return {
        "object-array": lambda: np.array([None] * n_refs, dtype=object),
        "object-2d": lambda: np.array([None] * n_refs, dtype=object).reshape(8, -1),
        "structured-with-object": lambda: np.zeros(n_refs // 2, dtype=[("count", "<i8"), ("ref", "O")]),
        "nested-structured": lambda: np.zeros(n_refs // 2, dtype=[("x", [("n", "<i8"), ("o", "O")])]),
        "subarray-of-objects": lambda: np.zeros(n_refs // 4, dtype=[("refs", "O", (4,))]),
        "memoryview-of-object-array": lambda: memoryview(np.array([None] * n_refs, dtype=object)),
        "memoryview-of-structured": lambda: memoryview(np.zeros(n_refs // 2, dtype=[("count", "<i8"), ("ref", "O")])),
        "ctypes-py_object": lambda: (ctypes.py_object * n_refs)(*([None] * n_refs)),
    }


OBJECT_KINDS = _object_kinds()


def _plain(kind: str) -> Any:
    """A plain-data buffer of the same shape and size: what the entry accepts."""
    if kind == "object-2d":
        return np.zeros((8, N // 64), dtype=np.int64)
    if kind == "ctypes-py_object":
        return (ctypes.c_int64 * (N // 8))()
    if kind.startswith("memoryview"):
        return memoryview(np.zeros(N // 16, dtype=[("count", "<i8"), ("ref", "<i8")]))
    # field names with an "O" in them must not be mistaken for object items
    return np.zeros(N // 16, dtype=[("Obj", "<i8"), ("Other", "<u8")])


def _delta() -> DeltaSnapshot:
    new = bytearray(N)
    new[7] = 1
    return DeltaSnapshot.create(AID, bytes(N), bytes(new), 0, 1)


def _tracker(buf: Any) -> Any:
    t = DirtyPageTracker(AID, N)
    t.initialize(bytes(N))
    return t.create_delta(buf)


def _migrator(buf: Any, start: bool) -> Any:
    m = IncrementalMigrator()
    if start:
        return m.start_tracking(AID, buf)
    m.start_tracking(AID, bytes(N))
    return m.create_incremental(AID, buf)


def _restore(buf: Any) -> Any:
    return RollbackInfo.capture(cm.Agent(agent_id=uuid.UUID(bytes=AID)), bytes(N)).restore_into(buf)


def _validator_capture(buf: Any) -> Any:
    v = MigrationValidator()
    return v.capture_rollback_info(MID, cm.Agent(agent_id=uuid.UUID(bytes=AID)), buf)


#: Every public entry that takes a state buffer, as ``call(buffer)``.
ENTRIES: Dict[str, Callable[[Any], Any]] = {
    "simple_checksum": lambda b: cm.simple_checksum(b),
    "simple_checksum(offset)": lambda b: cm.simple_checksum(b, offset=5),
    "simple_checksum(threads)": lambda b: cm.simple_checksum(b, threads=2),
    "state_pages_checksum": lambda b: state_pages_checksum(b, [0]),
    "pages_checksum": lambda b: pages_checksum([b], [0]),
    **{f"digest({a})": (lambda a: lambda b: cm.digest(b, a))(a) for a in cm.DIGEST_ALGORITHMS},
    "digest(keyed)": lambda b: cm.digest(b, "blake3", key=bytes(32)),
    "first_difference(a)": lambda b: cm.first_difference(b, bytes(N)),
    "first_difference(b)": lambda b: cm.first_difference(bytes(N), b),
    "dirty_pages(old)": lambda b: cm.dirty_pages(b, bytes(N)),
    "dirty_pages(new)": lambda b: cm.dirty_pages(bytes(N), b),
    "simple_compress": lambda b: cm.simple_compress(b),
    "simple_decompress": lambda b: cm.simple_decompress(b),
    "lz4_compress": lambda b: cm.lz4_compress(b),
    "zstd_compress": lambda b: cm.zstd_compress(b),
    "adaptive_compress": lambda b: cm.adaptive_compress(b),
    "adaptive_compress_aggressive": lambda b: cm.adaptive_compress_aggressive(b),
    "DirtyPage": lambda b: DirtyPage(0, b),
    "DeltaSnapshot.create(old)": lambda b: DeltaSnapshot.create(AID, b, bytes(N), 0, 1),
    "DeltaSnapshot.create(new)": lambda b: DeltaSnapshot.create(AID, bytes(N), b, 0, 1),
    "DeltaSnapshot.create(checksum only)": lambda b: DeltaSnapshot.create(AID, bytes(N), b, 0, 1, digest=None),
    "DeltaSnapshot.apply": lambda b: _delta().apply(b),
    "DirtyPageTracker.initialize": lambda b: DirtyPageTracker(AID, N).initialize(b),
    "DirtyPageTracker.create_delta": _tracker,
    "IncrementalMigrator.start_tracking": lambda b: _migrator(b, True),
    "IncrementalMigrator.create_incremental": lambda b: _migrator(b, False),
    "RollbackInfo.capture": lambda b: RollbackInfo.capture(cm.Agent(agent_id=uuid.UUID(bytes=AID)), b),
    "RollbackInfo.restore_into": _restore,
    "StateVerifier.verify_state(original)": lambda b: StateVerifier.verify_state(b, bytes(N), 0),
    "StateVerifier.verify_state(migrated)": lambda b: StateVerifier.verify_state(bytes(N), b, 0),
    "StateVerifier.verify_delta": lambda b: StateVerifier.verify_delta(b, _delta(), 0),
    "MigrationValidator.capture_rollback_info": _validator_capture,
    "MigrationValidator.verify_post_migration(original)": lambda b: MigrationValidator().verify_post_migration(
        MID, AID, b, bytes(N)),
    "MigrationValidator.verify_post_migration(migrated)": lambda b: MigrationValidator().verify_post_migration(
        MID, AID, bytes(N), b),
}


@pytest.mark.parametrize("kind", sorted(OBJECT_KINDS))
@pytest.mark.parametrize("entry", sorted(ENTRIES))
def test_object_reference_buffers_are_refused_everywhere(entry: str, kind: str) -> None:
    call = ENTRIES[entry]
    bad = OBJECT_KINDS[kind]()
    assert memoryview(bad).nbytes == N  # the same size as the plain buffer: only the dtype differs
    with pytest.raises(TypeError, match="Python object references"):
        call(bad)
    # the refusal is about the item type, not the entry: the same bytes as plain data pass
    call(_plain(kind))


@pytest.mark.parametrize("method", list(CompressionMethod))
@pytest.mark.parametrize("kind", sorted(OBJECT_KINDS))
def test_object_reference_buffers_are_refused_by_the_decoders(method: CompressionMethod, kind: str) -> None:
    bad = OBJECT_KINDS[kind]()
    with pytest.raises(TypeError, match="Python object references"):
        cm.adaptive_decompress(bad, method)
    with pytest.raises(TypeError, match="Python object references"):
        DeltaSnapshot.deserialize(bad)
    with pytest.raises(TypeError, match="Python object references"):
        RollbackInfo.deserialize(bad)
    for decode in (cm.lz4_decompress, cm.zstd_decompress):
        with pytest.raises(TypeError, match="Python object references"):
            decode(bad)


def test_apply_over_object_array_leaves_the_references_alone() -> None:
    """The SIGSEGV repro: an apply used to write raw bytes over the object pointers."""
    marker = object()
    target = np.array([marker] * (N // 8), dtype=object)
    before = sys.getrefcount(marker)
    with pytest.raises(TypeError, match="Python object references"):
        _delta().apply(target)
    assert all(x is marker for x in target)
    assert sys.getrefcount(marker) == before


def test_object_refusal_names_the_dtype() -> None:
    with pytest.raises(TypeError, match=r"new_state holds Python object references \(numpy dtype object\)"):
        DeltaSnapshot.create(AID, bytes(8), np.array([None], dtype=object), 0, 1)
    with pytest.raises(TypeError, match=r"buffer format 'T\{"):
        cm.simple_checksum(memoryview(np.zeros(2, dtype=[("a", "<i4"), ("b", "O")])))


# --------------------------------------------------------------------------------------
# apply: growth bound and allocation failure
# --------------------------------------------------------------------------------------


def _forged(total_size: int) -> DeltaSnapshot:
    """A checksum-only delta forged to a larger ``total_size``: the weak checksum ignores
    trailing zeros, so nothing in the delta contradicts the forgery."""
    new = bytearray(N)
    new[9] = 0x5A
    delta = DeltaSnapshot.create(AID, bytes(N), bytes(new), 0, 1, digest=None)
    delta.total_size = total_size
    return delta


def test_forged_size_cannot_grow_a_base_past_the_default_bound() -> None:
    base = bytearray(N)
    with pytest.raises(InvalidStateError, match=r"over max_size=1073741824 bytes"):
        _forged(2 << 30).apply(base)
    assert base == bytes(N)
    assert DEFAULT_MAX_GROW_SIZE == 1 << 30


def test_max_size_is_the_callers_bound() -> None:
    base = bytearray(N)
    with pytest.raises(InvalidStateError, match=r"from 4096 to 16384 bytes, over max_size=8192"):
        _forged(4 * N).apply(base, max_size=2 * N)
    assert base == bytes(N)
    _forged(4 * N).apply(base, max_size=4 * N)  # exactly at the bound: grown
    assert len(base) == 4 * N and base[9] == 0x5A and not any(base[10:])


def test_max_size_does_not_bound_a_base_of_the_right_size() -> None:
    """Nothing is allocated for a base that already has total_size bytes."""
    base = np.zeros(N, dtype=np.uint8)
    _forged(N).apply(base, max_size=0)
    assert base[9] == 0x5A


@pytest.mark.parametrize("bad", [-1, 1.5, "1G", True, None])
def test_max_size_must_be_a_non_negative_int(bad: Any) -> None:
    with pytest.raises(ValueError, match="max_size"):
        _forged(N).apply(bytearray(N), max_size=bad)


def test_out_of_memory_while_growing_is_invalid_state_and_leaves_the_base() -> None:
    """A real allocation failure (address-space limit in a child), not a mock."""
    code = textwrap.dedent(
        f"""
        import resource
        import cellmigrate as cm
        from cellmigrate import DeltaSnapshot
        new = bytearray({N}); new[9] = 0x5A
        delta = DeltaSnapshot.create(bytes(16), bytes({N}), bytes(new), 0, 1, digest=None)
        delta.total_size = 1 << 30
        base = bytearray(b"\\x01" * {N})
        # current address space + 256 MiB: growing to 1 GiB cannot fit
        vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))
        try:
            delta.apply(base, max_size=2 << 30)
        except cm.InvalidStateError as exc:
            assert "Out of memory growing the base" in str(exc), exc
            assert len(base) == {N} and base == b"\\x01" * {N}
            print("refused")
        """
    )
    env = {**os.environ, "CELLMIGRATE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "refused"


# --------------------------------------------------------------------------------------
# LZ4's block limit
# --------------------------------------------------------------------------------------


def _zero_mapping(n: int) -> mmap.mmap:
    """``n`` bytes of zeros that cost no memory until read (an anonymous read-only map)."""
    return mmap.mmap(-1, n, prot=mmap.PROT_READ)


def test_lz4_over_its_block_limit_is_a_cell_error_naming_the_limit() -> None:
    assert cm.LZ4_MAX_INPUT_SIZE == 0x7E000000
    big = _zero_mapping(cm.LZ4_MAX_INPUT_SIZE + 1)
    try:
        # The constant is LZ4's own: the real library refuses one byte more (raw error)...
        with memoryview(big) as view, pytest.raises(lz4.block.LZ4BlockError):
            lz4.block.compress(view, store_size=True)
        # ...and ours says why, as a CellError and a ValueError, before reading anything.
        with pytest.raises(cm.InputTooLargeError, match=r"at most 2113929216 bytes \(0x7E000000, LZ4_MAX_INPUT_SIZE\)") as info:
            cm.lz4_compress(big)
        assert isinstance(info.value, cm.CellError) and isinstance(info.value, ValueError)
        assert (info.value.size, info.value.limit) == (cm.LZ4_MAX_INPUT_SIZE + 1, 0x7E000000)
    finally:
        big.close()


def test_adaptive_functions_skip_a_method_that_cannot_take_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    """The adaptive functions and lz4_compress read the limit from one table; with LZ4's
    limit lowered there, an input LZ4 would win is compressed with another method."""
    data = bytes(range(200)) * 5  # no runs: RLE cannot shrink it, LZ4 can
    assert cm.adaptive_compress(data)[1] is CompressionMethod.LZ4
    monkeypatch.setitem(compression._MAX_INPUT, CompressionMethod.LZ4, len(data) - 1)
    for compress in (cm.adaptive_compress, cm.adaptive_compress_aggressive):
        payload, method = compress(data)
        assert method is not CompressionMethod.LZ4
        assert cm.adaptive_decompress(payload, method) == data
    with pytest.raises(cm.InputTooLargeError, match=f"at most {len(data) - 1} bytes"):
        cm.lz4_compress(data)
    monkeypatch.setitem(compression._MAX_INPUT, CompressionMethod.LZ4, len(data))  # at the limit: allowed
    assert cm.adaptive_compress(data)[1] is CompressionMethod.LZ4


@pytest.mark.large
@pytest.mark.parametrize("compress", [cm.adaptive_compress, cm.adaptive_compress_aggressive])
def test_adaptive_compress_of_a_real_input_over_lz4s_limit(compress: Callable[[Any], Any]) -> None:
    n = cm.LZ4_MAX_INPUT_SIZE + PAGE
    big = _zero_mapping(n)
    try:
        payload, method = compress(big)
    finally:
        big.close()
    assert method in (CompressionMethod.ZSTD_DEFAULT, CompressionMethod.ZSTD_HIGH)
    assert zstandard.frame_content_size(payload) == n
    assert len(payload) < 1 << 20


# --------------------------------------------------------------------------------------
# errors cross process boundaries intact (multiprocessing, Ray)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        cm.InvalidStateError("x"),
        cm.CorruptDataError("y"),
        cm.InputTooLargeError("too big", size=5, limit=4),
        cm.DeclaredSizeError("declared", field="total_size", size=5, limit=4),
        cm.AuditStoreError("locked"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_round_trip(error: cm.CellError) -> None:
    import pickle

    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error) and copy.args == error.args
    assert copy.__dict__ == error.__dict__
