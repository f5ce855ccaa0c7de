"""Compatibility vectors from the Rust crate's behaviour: the weighted checksum and the
RLE format, shared by the kernel tests (both implementations) and the public-API tests.

(tests/test_acceptance_spec.py keeps its own, written independently from the SPEC text.)
"""

from __future__ import annotations

from typing import List, Tuple

CHECKSUM_VECTORS: List[Tuple[bytes, int]] = [(b"", 0), (bytes([1, 2, 3, 4, 5]), 55), (b"\xff" * 126, 2040255)]

#: (raw, RLE-encoded): runs of 4+ and every 0xFF become ``FF count byte`` (count <= 127).
RLE_VECTORS: List[Tuple[bytes, bytes]] = [
    (b"", b""),
    (b"\xff" * 126, bytes.fromhex("ff7eff")),
    (bytes([1, 1, 1, 2]), bytes.fromhex("01010102")),
    (bytes(129), bytes.fromhex("ff7f000000")),
    (bytes(131), bytes.fromhex("ff7f00ff0400")),
    (b"\xff", bytes.fromhex("ff01ff")),
    (b"\xff\xff", bytes.fromhex("ff02ff")),
    (b"abcd", b"abcd"),
    (b"aaab", b"aaab"),
    (b"aaaa", bytes.fromhex("ff0461")),
    (bytes(127), bytes.fromhex("ff7f00")),
    (bytes(254), bytes.fromhex("ff7f00ff7f00")),
    (bytes(258), bytes.fromhex("ff7f00ff7f00ff0400")),
    (b"\x07" * 130, bytes.fromhex("ff7f07070707")),
    (b"\xff" * 128, bytes.fromhex("ff7fffff01ff")),
    (b"ab\xffcd", b"ab" + bytes.fromhex("ff01ff") + b"cd"),
]
