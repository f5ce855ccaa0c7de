"""Zero-copy views over caller buffers.

Every public function that takes state goes through these two helpers: they accept any
object exposing a C-contiguous buffer (bytes, bytearray, memoryview, mmap, numpy arrays
of any plain-data dtype) and return a flat unsigned-byte ``memoryview`` over the same
memory. A non-contiguous buffer is refused with a message naming the problem; it is never
copied. A buffer that holds Python object references (a numpy dtype whose ``hasobject``
is true: ``object``, structured or sub-array dtypes with an object field; any exporter
whose PEP 3118 format has an ``O`` item) is refused with ``TypeError``: its bytes are
addresses, so checksumming them is meaningless and writing them corrupts the heap.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from ._types import BufferLike

__all__ = ["as_bytes_view", "as_writable_view"]


#: Field names in a PEP 3118 struct format (``T{i:count:O:ref:}``): stripped before looking
#: for the object item code, so a field merely *named* with an ``O`` is not mistaken for one.
_FIELD_NAMES = re.compile(r":[^:]*:")


def _object_refusal(what: str, described: str) -> TypeError:
    return TypeError(
        f"{what} holds Python object references ({described}); its bytes are pointers, not "
        f"state: refusing it (store plain data, e.g. a numeric or bytes dtype)"
    )


def _view(obj: BufferLike, what: str) -> memoryview:
    if isinstance(obj, str):
        raise TypeError(f"{what} must be a bytes-like buffer, not str")
    if isinstance(obj, np.ndarray) and obj.dtype.hasobject:
        raise _object_refusal(what, f"numpy dtype {obj.dtype}")
    try:
        # numpy's stubs declare ndarray.__buffer__ only for Python 3.12+ (unused-ignore: on
        # 3.12+ an ndarray is a Buffer and the call checks).
        view = memoryview(obj)  # type: ignore[arg-type,unused-ignore]
    except TypeError:
        raise TypeError(
            f"{what} must support the buffer protocol (bytes, bytearray, memoryview, "
            f"mmap or numpy array), not {type(obj).__name__}"
        ) from None
    except ValueError:
        # numpy will not export datetime64/timedelta64 through the buffer protocol; a
        # uint8 view of the same memory is still zero-copy.
        if not isinstance(obj, np.ndarray):
            raise
        if not obj.flags.c_contiguous:
            raise ValueError(f"{what} must be a C-contiguous buffer; refusing to copy a strided view") from None
        view = obj.reshape(-1).view(np.uint8).data
    if not view.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous buffer; refusing to copy a strided view")
    if view.format != "B" and "O" in _FIELD_NAMES.sub("", view.format):
        # A memoryview (or any other exporter) over object references: the same refusal.
        raise _object_refusal(what, f"buffer format {view.format!r}")
    if view.format != "B" or view.ndim != 1:
        if view.nbytes == 0:
            # memoryview.cast refuses shapes holding a zero (an empty 2-D array): an empty
            # buffer is simply no bytes, with the same writability.
            return memoryview(b"" if view.readonly else bytearray())
        view = view.cast("B")
    return view


def as_bytes_view(obj: BufferLike, what: str = "data") -> memoryview:
    """Return a read-only-capable flat ``uint8`` view of ``obj`` without copying."""
    return _view(obj, what)


def as_writable_view(obj: BufferLike, what: str = "target") -> memoryview:
    """Return a writable flat ``uint8`` view of ``obj``; read-only buffers are refused."""
    view = _view(obj, what)
    if view.readonly:
        raise TypeError(f"{what} must be a writable buffer (bytearray, writable memoryview, mmap or numpy array)")
    return view
