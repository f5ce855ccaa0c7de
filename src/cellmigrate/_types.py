"""The types of what callers pass: state buffers and page indices.

``BufferLike`` is any object exposing the buffer protocol (PEP 688): ``bytes``,
``bytearray``, ``memoryview``, ``mmap`` and numpy arrays of any dtype. Type checkers see
``collections.abc.Buffer`` (``typing_extensions.Buffer`` before Python 3.12, where the
buffer protocol has no dunder to declare); numpy's stubs only declare
``ndarray.__buffer__`` for Python 3.12 and later, so arrays are named explicitly.
At run time the functions taking a ``BufferLike`` still check the buffer itself (a
``str`` or a strided view is refused with a clear message; see ``_buffers``).

``IndexLike`` is a list of page indices: a sequence of ints or an integer numpy array.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence, Union

import numpy as np
import numpy.typing as npt

if sys.version_info >= (3, 12):
    from collections.abc import Buffer
else:
    from typing_extensions import Buffer

__all__ = ["Buffer", "BufferLike", "IndexLike"]

#: A buffer the caller owns: read in place, never copied (writable where a target is written).
BufferLike = Union[Buffer, npt.NDArray[Any]]

#: Page indices: a sequence of ints, or an integer numpy array (any integer dtype).
IndexLike = Union[Sequence[int], npt.NDArray[np.integer[Any]]]
