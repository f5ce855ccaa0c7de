"""Byte-for-byte comparison of two states: first difference and dirty pages."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view
from .checksum import PAGE_SIZE
from .errors import InvalidStateError

__all__ = ["first_difference", "dirty_pages"]


def _same_length(a: memoryview, b: memoryview) -> None:
    if a.nbytes != b.nbytes:
        raise InvalidStateError(f"State size mismatch: {a.nbytes} bytes vs {b.nbytes} bytes")


def first_difference(a: Any, b: Any) -> Optional[int]:
    """Offset of the first byte where ``a`` and ``b`` differ, or ``None`` when equal.

    >>> first_difference(b"abcd", b"abXd")
    2
    """
    va, vb = as_bytes_view(a, "a"), as_bytes_view(b, "b")
    _same_length(va, vb)
    return kernels.first_difference(va, vb)


def dirty_pages(old: Any, new: Any, page_size: int = PAGE_SIZE) -> npt.NDArray[np.int64]:
    """Indices of the ``page_size`` pages where ``old`` and ``new`` differ (int64 array).

    >>> dirty_pages(bytes(8192), bytes(4096) + b"x" + bytes(4095)).tolist()
    [1]
    """
    if page_size <= 0:
        raise ValueError("page_size must be positive")
    vo, vn = as_bytes_view(old, "old"), as_bytes_view(new, "new")
    _same_length(vo, vn)
    return kernels.dirty_pages(vo, vn, page_size)
