"""Compression: the crate's RLE ("simple") format, LZ4, zstd, and adaptive choice.

RLE is ours (bit-exact with the Rust crate, strict decoder). LZ4 and zstd come from the
maintained ``lz4`` and ``zstandard`` packages. Every decoder takes ``max_output`` so a
hostile stream cannot make it allocate without limit, and every undecodable input raises
:class:`~cellmigrate.errors.CorruptDataError`. An input over a method's hard size limit
(only LZ4 has one: :data:`LZ4_MAX_INPUT_SIZE`) raises
:class:`~cellmigrate.errors.InputTooLargeError` from that method, and the adaptive
functions simply do not try that method for it.
"""

from __future__ import annotations

import enum
import operator
import struct
import threading
from typing import Optional, Tuple, Union

import lz4.block as _lz4_block
import zstandard as _zstd

from ._backend import kernels
from ._buffers import as_bytes_view
from ._types import BufferLike
from .errors import CorruptDataError, InputTooLargeError

__all__ = [
    "CompressionMethod",
    "simple_compress",
    "simple_decompress",
    "lz4_compress",
    "lz4_decompress",
    "zstd_compress",
    "zstd_decompress",
    "adaptive_compress",
    "adaptive_compress_aggressive",
    "adaptive_decompress",
    "LZ4_MAX_INPUT_SIZE",
]

ZSTD_DEFAULT_LEVEL = 3
ZSTD_HIGH_LEVEL = 10
_RLE_ONLY_BELOW = 256
_NO_ZSTD_BELOW = 4096
_ZSTD_BOUNDED_PIECE = 1024
# An LZ4 block expands at most ~255x (a match length byte per 255 output bytes).
_LZ4_MAX_RATIO = 255
#: Largest input (bytes) one LZ4 block can hold: ``LZ4_MAX_INPUT_SIZE`` of lz4.h,
#: 0x7E000000 = 2 113 929 216 (the ``lz4`` package enforces it but does not export it;
#: the size prefix is a signed 32-bit int).
LZ4_MAX_INPUT_SIZE = 0x7E000000


class CompressionMethod(enum.IntEnum):
    """Wire ids of the compression methods (the crate's ``CompressionMethod``)."""

    RLE = 0
    LZ4 = 1
    ZSTD_DEFAULT = 2
    ZSTD_HIGH = 3

    @property
    def label(self) -> str:
        """Human-readable name, as the crate prints it."""
        return _LABELS[self]


_LABELS = {
    CompressionMethod.RLE: "RLE",
    CompressionMethod.LZ4: "LZ4",
    CompressionMethod.ZSTD_DEFAULT: "Zstd (default)",
    CompressionMethod.ZSTD_HIGH: "Zstd (high)",
}


def _bound(max_output: Optional[int]) -> int:
    if max_output is None:
        return -1
    if max_output < 0:
        raise ValueError("max_output must be >= 0")
    return max_output


def simple_compress(data: BufferLike) -> bytes:
    """RLE-compress ``data`` exactly as the Rust crate does.

    >>> simple_compress(b"\\xff" * 126).hex()
    'ff7eff'
    >>> simple_compress(bytes(131)).hex()
    'ff7f00ff0400'
    """
    return bytes(kernels.rle_compress(as_bytes_view(data)))


def simple_decompress(data: BufferLike, *, max_output: Optional[int] = None) -> bytes:
    """Decode the RLE format; refuses truncated markers, zero counts and output over ``max_output``.

    >>> simple_decompress(bytes.fromhex("ff0441")) 
    b'AAAA'
    """
    return bytes(kernels.rle_decompress(as_bytes_view(data), _bound(max_output)))


def lz4_compress(data: BufferLike) -> bytes:
    """LZ4 block with its uncompressed size prepended (4 bytes, little-endian).

    Raises :class:`~cellmigrate.errors.InputTooLargeError` (a ``CellError`` and a
    ``ValueError``) for more than :data:`LZ4_MAX_INPUT_SIZE` bytes (0x7E000000), the
    most one LZ4 block can hold; nothing is read then. Use zstd for larger inputs.
    """
    view = as_bytes_view(data)
    try:
        _check_fits(CompressionMethod.LZ4, view.nbytes)
    except InputTooLargeError:
        view.release()  # the traceback must not pin the caller's buffer (an mmap could not close)
        raise
    return bytes(_lz4_block.compress(view, store_size=True))


def lz4_decompress(data: BufferLike, *, max_output: Optional[int] = None) -> bytes:
    """Inverse of :func:`lz4_compress`; the declared size is checked before allocating."""
    view = as_bytes_view(data)
    if view.nbytes < 4:
        raise CorruptDataError("LZ4 frame truncated: missing the 4-byte size prefix")
    (size,) = struct.unpack_from("<i", view, 0)
    if size < 0:
        raise CorruptDataError(f"LZ4 frame declares a negative size ({size})")
    bound = _bound(max_output)
    if 0 <= bound < size:
        raise CorruptDataError(f"LZ4 frame declares {size} bytes, over max_output of {bound}")
    if size > _LZ4_MAX_RATIO * view.nbytes + 64:
        raise CorruptDataError(f"LZ4 frame declares {size} bytes, more than {view.nbytes - 4} compressed bytes can hold")
    try:
        return bytes(_lz4_block.decompress(view))
    except _lz4_block.LZ4BlockError as exc:
        raise CorruptDataError(f"corrupt LZ4 block: {exc}") from None


def zstd_compress(data: BufferLike, level: int = ZSTD_DEFAULT_LEVEL) -> bytes:
    """A zstd frame (content size recorded) at ``level``."""
    return _zstd.ZstdCompressor(level=level).compress(as_bytes_view(data))


_zstd_local = threading.local()


def _zstd_decompressor() -> _zstd.ZstdDecompressor:
    # Building a decompression context costs ~50 us, far more than decoding a page; a
    # context is not safe to share between threads, so each thread keeps its own.
    dctx: Optional[_zstd.ZstdDecompressor] = getattr(_zstd_local, "dctx", None)
    if dctx is None:
        dctx = _zstd_local.dctx = _zstd.ZstdDecompressor()
    return dctx


def zstd_decompress(data: BufferLike, *, max_output: Optional[int] = None) -> bytes:
    """Decode every zstd frame in ``data``, with or without a recorded content size.

    A declared content size is never trusted for allocation (a 16-byte frame can claim a
    terabyte). With ``max_output`` the input is fed in small pieces so the output is checked
    as it grows; a truncated frame or trailing bytes that are not a frame are refused.
    """
    view = as_bytes_view(data)
    bound = _bound(max_output)
    try:
        declared = _zstd.frame_content_size(view)
    except _zstd.ZstdError as exc:
        raise CorruptDataError(f"corrupt zstd frame: {exc}") from None
    if declared >= 0 and 0 <= bound < declared:
        raise CorruptDataError(f"zstd frame declares {declared} bytes, over max_output of {bound}")
    # One compressed byte can yield ~32 KiB, so a small piece bounds the overshoot.
    piece = _ZSTD_BOUNDED_PIECE if bound >= 0 else max(view.nbytes, 1)
    chunks = []
    total = 0
    pos = 0
    try:
        while pos < view.nbytes:
            frame = _zstd_decompressor().decompressobj()
            while not frame.eof:
                if pos >= view.nbytes:
                    raise CorruptDataError(f"zstd frame truncated at byte {view.nbytes}")
                fed = view[pos : pos + piece]
                chunk = frame.decompress(fed)
                pos += len(fed) - len(frame.unused_data) if frame.eof else len(fed)
                if chunk:
                    total += len(chunk)
                    if 0 <= bound < total:
                        raise CorruptDataError(f"zstd output exceeds max_output of {bound} bytes")
                    chunks.append(chunk)
    except _zstd.ZstdError as exc:
        raise CorruptDataError(f"corrupt zstd frame: {exc}") from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


#: Hard input limits (bytes) of the methods that have one; the others are bounded by
#: memory only (RLE: 64-bit sizes; zstd: far beyond any state). The adaptive functions
#: and the methods themselves read the limits from here.
_MAX_INPUT = {CompressionMethod.LZ4: LZ4_MAX_INPUT_SIZE}


def _fits(method: CompressionMethod, size: int) -> bool:
    limit = _MAX_INPUT.get(method)
    return limit is None or size <= limit


def _check_fits(method: CompressionMethod, size: int) -> None:
    if not _fits(method, size):
        limit = _MAX_INPUT[method]
        raise InputTooLargeError(
            f"{method.label} cannot compress {size} bytes: one LZ4 block holds at most {limit} bytes "
            f"(0x{limit:X}, LZ4_MAX_INPUT_SIZE); use zstd or compress in smaller pieces",
            size=size,
            limit=limit,
        )


def _compress_with(data: BufferLike, method: CompressionMethod) -> bytes:
    if method is CompressionMethod.RLE:
        return simple_compress(data)
    if method is CompressionMethod.LZ4:
        return lz4_compress(data)
    if method is CompressionMethod.ZSTD_DEFAULT:
        return zstd_compress(data, ZSTD_DEFAULT_LEVEL)
    return zstd_compress(data, ZSTD_HIGH_LEVEL)


def _smallest(data: memoryview, methods: Tuple[CompressionMethod, ...]) -> Tuple[bytes, CompressionMethod]:
    best: Optional[Tuple[bytes, CompressionMethod]] = None
    for method in methods:
        if not _fits(method, data.nbytes):
            continue  # RLE has no limit, so some method always remains
        payload = _compress_with(data, method)
        # Strictly smaller wins, so ties keep the earlier (cheaper) method.
        if best is None or len(payload) < len(best[0]):
            best = (payload, method)
    assert best is not None
    return best


def adaptive_compress(data: BufferLike) -> Tuple[bytes, CompressionMethod]:
    """Pick the smallest of the methods worth trying for this size.

    Under 256 bytes RLE only; under 4096 the smaller of RLE and LZ4; otherwise the
    smallest of RLE, LZ4 and zstd (level 3). Ties keep the earlier method. LZ4 is not
    tried for inputs over :data:`LZ4_MAX_INPUT_SIZE` (0x7E000000 bytes), which one LZ4
    block cannot hold.
    """
    view = as_bytes_view(data)
    if view.nbytes < _RLE_ONLY_BELOW:
        return simple_compress(view), CompressionMethod.RLE
    if view.nbytes < _NO_ZSTD_BELOW:
        return _smallest(view, (CompressionMethod.RLE, CompressionMethod.LZ4))
    return _smallest(view, (CompressionMethod.RLE, CompressionMethod.LZ4, CompressionMethod.ZSTD_DEFAULT))


def adaptive_compress_aggressive(data: BufferLike) -> Tuple[bytes, CompressionMethod]:
    """Try all four methods and keep the smallest (ties keep the earlier one).

    As in :func:`adaptive_compress`, LZ4 is skipped above :data:`LZ4_MAX_INPUT_SIZE`.
    """
    return _smallest(as_bytes_view(data), tuple(CompressionMethod))


def adaptive_decompress(
    payload: BufferLike, method: Union[CompressionMethod, int], *, max_output: Optional[int] = None
) -> bytes:
    """Decode ``payload`` written with ``method`` (an unknown id raises ``ValueError``)."""
    # IntEnum looks values up by hash: 0.0 or False would pass for RLE.
    if isinstance(method, bool) or not hasattr(method, "__index__"):
        raise TypeError(f"method must be a CompressionMethod or its int id, not {type(method).__name__}")
    method = CompressionMethod(operator.index(method))
    if method is CompressionMethod.RLE:
        return simple_decompress(payload, max_output=max_output)
    if method is CompressionMethod.LZ4:
        return lz4_decompress(payload, max_output=max_output)
    return zstd_decompress(payload, max_output=max_output)
