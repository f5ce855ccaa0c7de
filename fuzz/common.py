"""Shared pieces of the atheris harnesses: imports, seed corpus, resealing, the apply oracle.

Not a test module: the harnesses import it by path (``fuzz/`` is not a package). The
third-party libraries are imported *before* instrumentation, so only cellmigrate's own
Python code is instrumented for coverage (instrumenting numpy would be slow and useless).
"""

from __future__ import annotations

import hashlib
import struct
import sys
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import atheris

# Uninstrumented dependencies first.
import blake3  # noqa: F401
import lz4.block  # noqa: F401
import numpy  # noqa: F401
import xxhash
import zstandard  # noqa: F401

with atheris.instrument_imports(include=["cellmigrate"]):
    import cellmigrate
    from cellmigrate import PAGE_SIZE, CorruptDataError, InvalidStateError, compression, digest, simple_checksum
    from cellmigrate import wire
    from cellmigrate.delta import DeltaSnapshot, DirtyPage

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
#: Largest state the apply oracle materializes (keeps each run cheap and memory flat).
MAX_APPLY_SIZE = 1 << 20
KEY = bytes(range(32))  # the golden fixtures' test key

__all__ = [
    "atheris",
    "cellmigrate",
    "CorruptDataError",
    "InvalidStateError",
    "DeltaSnapshot",
    "DirtyPage",
    "PAGE_SIZE",
    "compression",
    "digest",
    "simple_checksum",
    "wire",
    "KEY",
    "MAX_APPLY_SIZE",
    "reseal",
    "check_apply",
    "delta_seeds",
    "write_seeds",
    "main_with_seeds",
]


def reseal(blob: bytes) -> bytes:
    """Recompute every locatable page check and the whole-payload check (attacker model).

    Lets the fuzzer reach the validations behind the checks (indices, lengths, RLE/XZR
    streams) and ``apply``'s digest and header-digest verification with structurally
    mutated deltas. Version 2 (page checks: weighted checksums in the table after the
    payload) and version 1 (XXH3-64 in 24-byte entries before the payloads).
    """
    data = bytearray(blob)
    if len(data) >= wire.HEADER_SIZE + wire.TRAILER_SIZE and data[8:10] == b"\x02\x00" and data[13] == 0:
        count, stored = struct.unpack_from("<IQ", data, 76)
        payload = wire.HEADER_SIZE + 2 * data[12]
        table = payload + stored
        if table + wire.PAGE_ENTRY_SIZE * count <= len(data) - wire.TRAILER_SIZE:
            offset = payload
            for k in range(count):
                (length,) = struct.unpack_from("<H", data, table + 4 * count + 2 * k)
                if offset + length > table:
                    break
                check = simple_checksum(bytes(data[offset : offset + length]))
                struct.pack_into("<I", data, table + 6 * count + 4 * k, check)
                offset += length
    elif len(data) >= wire.HEADER_SIZE_V1 + wire.TRAILER_SIZE:
        digest_length = data[12]
        (count,) = struct.unpack_from("<Q", data, 72)
        table = wire.HEADER_SIZE_V1 + digest_length
        body_end = len(data) - wire.TRAILER_SIZE
        if 0 <= body_end - table and count <= (body_end - table) // wire.PAGE_ENTRY_SIZE_V1:
            offset = table + count * wire.PAGE_ENTRY_SIZE_V1
            for k in range(count):
                entry = table + k * wire.PAGE_ENTRY_SIZE_V1
                (length,) = struct.unpack_from("<I", data, entry + 8)
                if offset + length > body_end:
                    break
                check = xxhash.xxh3_64_intdigest(bytes(data[offset : offset + length]))
                struct.pack_into("<Q", data, entry + 16, check)
                offset += length
    if len(data) >= wire.TRAILER_SIZE:
        data[-wire.TRAILER_SIZE :] = xxhash.xxh3_128_digest(bytes(data[: -wire.TRAILER_SIZE]))
    return bytes(data)


def check_apply(delta: DeltaSnapshot, base: bytes, key: Optional[bytes]) -> bool:
    """Apply ``delta`` to a copy of ``base`` and assert the atomic-apply contract.

    On ``InvalidStateError`` the copy must be byte-for-byte ``base``. On success the
    result must be exactly ``base`` with the delta's decoded pages written over it (grown
    with zeros if the delta is larger), with the delta's checksum and, when it has one,
    its digest. Returns whether the apply succeeded. Any other exception escapes (a bug).
    """
    target = bytearray(base)
    try:
        delta.apply(target, key=key)
    except InvalidStateError:
        assert bytes(target) == base, "InvalidStateError but the base was modified"
        return False
    expected = bytearray(base) + bytes(max(0, delta.total_size - len(base)))
    del expected[delta.total_size :]
    for page in delta.dirty_pages:
        start = page.index * PAGE_SIZE
        length = min(PAGE_SIZE, delta.total_size - start)
        raw = page.get_data(base=base[start : start + length], length=length)  # XZR pages: over the base
        expected[start : start + len(raw)] = raw
    assert len(target) == delta.total_size, "apply left the wrong size"
    assert target == expected, "apply wrote something other than the delta's pages"
    assert simple_checksum(target) == delta.checksum, "apply accepted a checksum mismatch"
    if delta.digest_algorithm is not None:
        assert delta.digest is not None
        assert digest(target, delta.digest_algorithm, key=key if delta.keyed else None) == delta.digest, (
            "apply accepted a digest mismatch"
        )
    return True


def _state(label: str, size: int) -> bytes:
    return hashlib.shake_256(label.encode()).digest(size)


def delta_seeds() -> List[Tuple[str, bytes]]:
    """Valid serialized deltas: the golden fixtures plus a few small generated ones."""
    seeds = [(path.stem, path.read_bytes()) for path in sorted(FIXTURES.glob("*.cmdelta"))]
    for name, size, algorithm, key in [
        ("gen_checksum", 2 * PAGE_SIZE + 10, None, None),
        ("gen_xxh3", 3 * PAGE_SIZE, "xxh3_128", None),
        ("gen_keyed", PAGE_SIZE + 1, "blake3", KEY),
        ("gen_tiny", 9, "xxh3_128", None),
        ("gen_tree", 2 * PAGE_SIZE + 1, "xxh3_128_tree", None),
    ]:
        base = _state(name, size)
        new = bytearray(base)
        new[1:40] = bytes(len(new[1:40]))  # same length: never extends the state
        new[-2:] = b"\xff\x00"
        delta = DeltaSnapshot.create(b"\x01" * 16, base, new, 1, 2, digest=algorithm, key=key)
        seeds.append((name, delta.serialize()))
    return seeds


def write_seeds(directory: Path, seeds: List[Tuple[str, bytes]]) -> None:
    """Write seeds into a libFuzzer corpus directory (created if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds:
        (directory / f"seed-{name}").write_bytes(data)


def main_with_seeds(test_one_input: Callable[[bytes], None], seeds: List[Tuple[str, bytes]]) -> None:
    """Seed the first corpus directory on the command line (if any), then fuzz."""
    dirs = [Path(a) for a in sys.argv[1:] if not a.startswith("-")]
    if dirs:
        write_seeds(dirs[0], seeds)
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
