"""Byte-for-byte comparison of two states: first difference and dirty pages.

Large states are split over threads the kernel starts for the call, in one GIL-free call
(``threads`` caps them, as in :mod:`cellmigrate._parallel`); ``threads=1`` keeps a call
on the calling thread.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view
from ._parallel import PARALLEL_MIN_BYTES, plan
from ._types import BufferLike
from .checksum import PAGE_SIZE
from .errors import InvalidStateError

__all__ = ["first_difference", "dirty_pages", "dirty_pages_checksum"]

_FLAT = (bytes, bytearray)


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
    if not 0 < page_size <= _MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be in 1 .. 2**62, got {page_size}")
    return int(page_size)


#: Beyond any state (and the kernels' signed sizes): larger only overflowed in C.
_MAX_PAGE_SIZE = 1 << 62


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
    # One call whatever the split: the kernel's threads claim 8 MiB chunks in order and
    # stop claiming once one finds a difference.
    found: Optional[int] = kernels.first_difference(va, vb, len(plan(n, threads)))
    return found


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
    result: npt.NDArray[np.int64] = kernels.dirty_pages(vo, vn, page_size, len(plan(vo.nbytes, threads, page_size)))
    return result


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
    pages, checksum = kernels.dirty_pages_checksum(vo, vn, page_size, 0, len(plan(vo.nbytes, threads, page_size)))
    return pages, int(checksum)
