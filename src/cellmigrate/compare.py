"""Byte-for-byte comparison of two states: first difference and dirty pages.

Large states are split over a small thread pool (see :mod:`cellmigrate._parallel`);
``threads=1`` keeps a call on the calling thread.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view
from ._parallel import PARALLEL_MIN_BYTES, plan, run_spans
from ._types import BufferLike
from .checksum import PAGE_SIZE
from .errors import InvalidStateError

__all__ = ["first_difference", "dirty_pages", "dirty_pages_checksum"]

_MASK32 = 0xFFFFFFFF
_FLAT = (bytes, bytearray)

# first_difference scans in rounds of this many bytes per thread, so an early
# difference stops the scan instead of every thread reading its whole span.
_ROUND_BYTES = 16 << 20


def _same_length(a: memoryview, b: memoryview) -> None:
    if a.nbytes != b.nbytes:
        raise InvalidStateError(f"State sizes must match (size mismatch: {a.nbytes} bytes vs {b.nbytes} bytes)")


def _small_flat(a: BufferLike, b: BufferLike, threads: Optional[int]) -> bool:
    """Whether a call can skip the view and thread machinery: two small bytes/bytearray
    objects (flat and contiguous by construction) of equal length, default threads."""
    # ``type(x) in _FLAT`` does not narrow for mypy, so ``len`` is checked against the
    # whole BufferLike union; the ignores keep this per-call path free of cast calls.
    return (
        threads is None
        and type(a) in _FLAT
        and type(b) in _FLAT
        and len(a) == len(b)  # type: ignore[arg-type]
        and len(a) < PARALLEL_MIN_BYTES  # type: ignore[arg-type]
    )


def _page_size(page_size: int) -> int:
    if isinstance(page_size, bool) or not isinstance(page_size, (int, np.integer)):
        raise TypeError(f"page_size must be an int, not {type(page_size).__name__}")
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    return int(page_size)


def first_difference(a: BufferLike, b: BufferLike, *, threads: Optional[int] = None) -> Optional[int]:
    """Offset of the first byte where ``a`` and ``b`` differ, or ``None`` when equal.

    Both must have the same length (else ``InvalidStateError``).

    >>> first_difference(b"abcd", b"abXd")
    2
    """
    if _small_flat(a, b, threads):
        small: Optional[int] = kernels.first_difference(a, b)
        return small
    va, vb = as_bytes_view(a, "a"), as_bytes_view(b, "b")
    _same_length(va, vb)
    n = va.nbytes
    spans = plan(n, threads)
    if len(spans) == 1:
        found: Optional[int] = kernels.first_difference(va, vb)
        return found
    width = len(spans) * _ROUND_BYTES
    for base in range(0, n, width):
        end = min(base + width, n)
        sub = [(base + s, base + e) for s, e in plan(end - base, threads)]
        hits = run_spans(lambda s, e: kernels.first_difference(va[s:e], vb[s:e]), sub)
        for (s, _), hit in zip(sub, hits):
            if hit is not None:
                return s + int(hit)
    return None


def dirty_pages(
    old: BufferLike, new: BufferLike, page_size: int = PAGE_SIZE, *, threads: Optional[int] = None
) -> npt.NDArray[np.int64]:
    """Indices of the ``page_size`` pages where ``old`` and ``new`` differ (int64 array).

    The last page may be short. Both states must have the same length (else
    ``InvalidStateError``).

    >>> dirty_pages(bytes(8192), bytes(4096) + b"x" + bytes(4095)).tolist()
    [1]
    """
    page_size = _page_size(page_size)
    if _small_flat(old, new, threads):
        small: npt.NDArray[np.int64] = kernels.dirty_pages(old, new, page_size)
        return small
    vo, vn = as_bytes_view(old, "old"), as_bytes_view(new, "new")
    _same_length(vo, vn)
    spans = plan(vo.nbytes, threads, page_size)
    if len(spans) == 1:
        result: npt.NDArray[np.int64] = kernels.dirty_pages(vo, vn, page_size)
        return result
    parts = run_spans(lambda s, e: kernels.dirty_pages(vo[s:e], vn[s:e], page_size) + s // page_size, spans)
    return np.concatenate(parts).astype(np.int64, copy=False)


def dirty_pages_checksum(
    old: BufferLike, new: BufferLike, page_size: int = PAGE_SIZE, *, threads: Optional[int] = None
) -> Tuple[npt.NDArray[np.int64], int]:
    """``(dirty_pages(old, new, page_size), simple_checksum(new))`` in one pass.

    Each page of ``new`` is checksummed and compared while it is in registers, so delta
    creation reads both states once instead of reading ``new`` twice.

    >>> pages, checksum = dirty_pages_checksum(bytes(8192), bytes(4096) + b"x" + bytes(4095))
    >>> pages.tolist(), checksum == 120 * 4097
    ([1], True)
    """
    page_size = _page_size(page_size)
    if _small_flat(old, new, threads):
        pages, checksum = kernels.dirty_pages_checksum(old, new, page_size, 0)
        return pages, int(checksum)
    vo, vn = as_bytes_view(old, "old"), as_bytes_view(new, "new")
    _same_length(vo, vn)
    spans = plan(vo.nbytes, threads, page_size)
    if len(spans) == 1:
        pages, checksum = kernels.dirty_pages_checksum(vo, vn, page_size, 0)
        return pages, int(checksum)

    def span(s: int, e: int) -> Tuple[npt.NDArray[np.int64], int]:
        pages, checksum = kernels.dirty_pages_checksum(vo[s:e], vn[s:e], page_size, s)
        return pages + s // page_size, int(checksum)

    parts: List[Tuple[npt.NDArray[np.int64], int]] = run_spans(span, spans)
    indices = np.concatenate([p for p, _ in parts]).astype(np.int64, copy=False)
    return indices, sum(c for _, c in parts) & _MASK32
