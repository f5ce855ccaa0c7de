"""atheris harness: ``adaptive_decompress`` (RLE, LZ4, zstd) on hostile payloads.

Input: a method id (0-3 valid, anything else must give ``ValueError``), a ``max_output``
bound (up to 1 MiB: an unbounded call may legitimately allocate what a frame declares),
then the payload. Contract: ``CorruptDataError`` or bytes no longer than ``max_output``
(no other exception); decoded bytes survive a round trip through every method.

Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CorruptDataError, atheris, compression, main_with_seeds  # noqa: E402

MAX_BOUND = 1 << 20


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    method = fdp.ConsumeIntInRange(0, 5)
    max_output = fdp.ConsumeIntInRange(0, MAX_BOUND)
    payload = fdp.ConsumeBytes(fdp.remaining_bytes())
    if method > 3:
        try:
            compression.adaptive_decompress(payload, method, max_output=max_output)
        except ValueError:
            return
        raise AssertionError(f"unknown method id {method} accepted")
    try:
        out = compression.adaptive_decompress(payload, method, max_output=max_output)
    except CorruptDataError:
        return
    assert len(out) <= max_output, f"method {method}: {len(out)} bytes over max_output {max_output}"
    for m in compression.CompressionMethod:
        packed = compression._compress_with(out, m)
        assert compression.adaptive_decompress(packed, m, max_output=len(out)) == out, f"round trip via {m!r}"


def seeds() -> List[Tuple[str, bytes]]:
    sample = b"hello, world " * 40 + bytes(300)
    out = []
    for m in compression.CompressionMethod:
        packed = compression._compress_with(sample, m)
        # ConsumeIntInRange reads little-endian-ish raw bytes; the exact prefix does not matter.
        out.append((f"m{int(m)}", bytes([int(m)]) + b"\x00\x00\x10" + packed))
    return out


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
