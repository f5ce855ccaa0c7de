"""atheris harness: the page decoders (XZR and the batch ``check_pages``) against the reference.

Input: 2 bytes choosing the page length (1..4096) and 1 byte the encoding (0-4, 4 is
unknown), then the stored bytes. Contract on every input:

* ``xzr_decode`` (compiled) and ``cellmigrate._reference.xzr_decode`` agree exactly: both
  raise ``CorruptDataError`` with the same message, or both return the same bytes, of
  exactly the page length; re-encoding what they return and decoding it gives it back;
* ``check_pages`` on the bytes as one stored page (the last page of a state, so its
  length is the chosen one) gives the same verdict in both implementations and, when it
  decodes, the same page; the 64 guard bytes after the page's slot are never written.

Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CorruptDataError, atheris, main_with_seeds  # noqa: E402

with atheris.instrument_imports(include=["cellmigrate"]):
    from cellmigrate import _kernels, _reference

PAGE = 4096
BASE = bytes((i * 131 + 7) & 0xFF for i in range(PAGE))
GUARD = b"\xa5" * 64


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    length = fdp.ConsumeIntInRange(1, PAGE)
    encoding = fdp.ConsumeIntInRange(0, 4)
    stored = fdp.ConsumeBytes(fdp.remaining_bytes())
    base = BASE[: length - (length // 3)]  # a base page shorter than the page: zero-extended
    try:
        got = _kernels.xzr_decode(stored, base, length)
    except CorruptDataError as exc:
        try:
            _reference.xzr_decode(stored, base, length)
        except CorruptDataError as ref:
            assert str(ref) == str(exc), "compiled and reference XZR errors differ"
        else:
            raise AssertionError(f"compiled XZR decoder refused what the reference accepts: {exc}") from None
    else:
        assert got == _reference.xzr_decode(stored, base, length), "compiled and reference XZR decoders disagree"
        assert len(got) == length, "XZR output is not the page length"
        again = _kernels.xzr_encode(got, base)
        assert _kernels.xzr_decode(again, base, length) == got, "XZR round trip failed"

    total = 5 * PAGE + length  # the page is the short (or whole) last page: index 5
    results = []
    for impl in (_kernels, _reference):
        out = bytearray(PAGE) + bytearray(GUARD)
        verdict = impl.check_pages(stored, [0, len(stored)], [encoding], [5], total, PAGE, 0xF,
                                   base=bytes(5 * PAGE) + base, out=memoryview(out)[:PAGE])
        assert bytes(out[PAGE:]) == GUARD, "a page decoder wrote past its slot"
        results.append((verdict, bytes(out[:length]) if verdict[0] == 0 else None))
    assert results[0] == results[1], f"check_pages differs: {results[0][0]} vs {results[1][0]}"


def seeds() -> List[Tuple[str, bytes]]:
    page = bytearray(BASE)
    page[100:164] = bytes(64)
    stream = _kernels.xzr_encode(bytes(page), BASE)
    samples = [(3, stream), (3, b""), (3, b"\x00\x01\x07"), (3, b"\x80\x00\x01\x07"), (1, b"\xff\x7f\x00"), (0, BASE), (2, b"")]
    return [(f"s{k}", b"\x0f\xff" + bytes([e]) + s) for k, (e, s) in enumerate(samples)]


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
