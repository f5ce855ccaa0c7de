"""atheris harness: ``simple_decompress`` (compiled RLE decoder) against the reference.

Input: 4 bytes choosing ``max_output`` (``None`` or a bound up to 64 KiB), then the stream.
Contract: the compiled decoder and the pure-Python reference (``cellmigrate._reference``)
agree exactly: both raise ``CorruptDataError`` or both return the same bytes; the output
never exceeds ``max_output``; and re-compressing the output decodes back to it.
The stream is at most libFuzzer's ``-max_len`` bytes, so ``None`` is safe here (the
output of an RLE stream is at most 127/3 times its length).

Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CorruptDataError, atheris, compression, main_with_seeds  # noqa: E402

with atheris.instrument_imports(include=["cellmigrate"]):
    from cellmigrate import _reference


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    choice = fdp.ConsumeIntInRange(0, 65536 + 1)
    max_output = None if choice == 65536 + 1 else choice
    stream = fdp.ConsumeBytes(fdp.remaining_bytes())
    try:
        got = compression.simple_decompress(stream, max_output=max_output)
    except CorruptDataError as exc:
        try:
            _reference.rle_decompress(memoryview(stream), -1 if max_output is None else max_output)
        except CorruptDataError:
            return
        raise AssertionError(f"compiled decoder refused what the reference accepts: {exc}") from None
    want = _reference.rle_decompress(memoryview(stream), -1 if max_output is None else max_output)
    assert got == want, "compiled and reference RLE decoders disagree"
    assert max_output is None or len(got) <= max_output, "output over max_output"
    assert compression.simple_decompress(compression.simple_compress(got)) == got, "round trip failed"


def seeds() -> List[Tuple[str, bytes]]:
    samples = [b"", b"abc", bytes.fromhex("ff7f00ff0400"), bytes.fromhex("ff7eff"), b"\xff\x01", b"\xff\x00\x00"]
    return [(f"s{k}", b"\xff\xff\xff\xff" + s) for k, s in enumerate(samples)]


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
