"""Shared fixtures: the kernel implementations, and the same bytes in every buffer kind.

* ``impl`` runs a test once per kernel implementation: the compiled
  ``cellmigrate._kernels`` and the pure reference ``cellmigrate._reference``.
* ``buffer_kind(data, kind)`` returns ``data`` as one of ``BUFFER_KINDS`` (read-only
  ones included); ``writable_buffer(data, kind)`` as one of ``WRITABLE_KINDS``;
  ``as_bytes(obj)`` reads any of them back.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from types import ModuleType
from typing import Any, Iterator, List

import numpy as np
import pytest

from cellmigrate import _reference

from cellmigrate import _kernels as _compiled

IMPLEMENTATIONS: List[ModuleType] = [_compiled, _reference]

#: Every kind of C-contiguous buffer the library accepts.
BUFFER_KINDS = (
    "bytes",
    "bytearray",
    "memoryview",
    "readonly-memoryview",
    "numpy-uint8",
    "numpy-readonly",
    "numpy-wide",
    "mmap",
    "mmap-readonly",
)

#: The kinds a writable target may be.
WRITABLE_KINDS = ("bytearray", "memoryview", "numpy-uint8", "numpy-wide", "mmap")

# mmap objects and temp files are kept alive until the session ends (a buffer exported
# from an mmap must not be closed while a view of it exists).
_keep: List[Any] = []


def _wide_dtype(n: int) -> "np.dtype[Any]":
    """The widest plain dtype whose items tile ``n`` bytes exactly (a void item otherwise)."""
    for dtype in (np.uint64, np.uint32, np.uint16):
        if n % np.dtype(dtype).itemsize == 0:
            return np.dtype(dtype)
    return np.dtype((np.void, n))


def _mmap_of(data: bytes, readonly: bool) -> Any:
    if not data:
        # mmap cannot map zero bytes; an empty slice of a mapping is the closest thing.
        return memoryview(_mmap_of(b"\0", readonly))[:0]
    if readonly:
        fd, path = tempfile.mkstemp(prefix="cellmigrate-test-")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        with open(path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), len(data), access=mmap.ACCESS_READ)
        os.unlink(path)
    else:
        mapping = mmap.mmap(-1, len(data))
        mapping[:] = data
    _keep.append(mapping)
    return mapping


def buffer_kind(data: bytes, kind: str) -> Any:
    """``data`` as a buffer of the given kind (same bytes, no padding)."""
    if kind == "bytes":
        return bytes(data)
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(bytearray(data))
    if kind == "readonly-memoryview":
        return memoryview(bytes(data))
    if kind == "numpy-uint8":
        return np.frombuffer(bytearray(data), dtype=np.uint8)
    if kind == "numpy-readonly":
        arr = np.frombuffer(bytes(data), dtype=np.uint8)
        assert not arr.flags.writeable
        return arr
    if kind == "numpy-wide":
        return np.frombuffer(bytearray(data), dtype=_wide_dtype(len(data))) if data else np.zeros(0, np.uint32)
    if kind == "mmap":
        return _mmap_of(data, readonly=False)
    if kind == "mmap-readonly":
        return _mmap_of(data, readonly=True)
    raise ValueError(f"unknown buffer kind {kind!r}")


def writable_buffer(data: bytes, kind: str) -> Any:
    """``data`` as a writable buffer of one of ``WRITABLE_KINDS``."""
    if kind not in WRITABLE_KINDS:
        raise ValueError(f"{kind!r} is not a writable buffer kind")
    return buffer_kind(data, kind)


def as_bytes(obj: Any) -> bytes:
    """The bytes of any buffer kind (for assertions)."""
    return memoryview(obj).cast("B").tobytes() if memoryview(obj).nbytes else b""


@pytest.fixture(scope="session", params=IMPLEMENTATIONS, ids=[m.IMPLEMENTATION for m in IMPLEMENTATIONS])
def impl(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """Each kernel implementation: compiled (at its default dispatch path) and reference.

    Session-scoped (the modules are stateless), so ``@given`` tests may use it."""
    yield request.param


@pytest.fixture(scope="session", params=BUFFER_KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    """Each buffer kind name (use with ``buffer_kind``)."""
    return str(request.param)


@pytest.fixture
def xxh3_bound() -> Iterator[None]:
    """The leaf kernels hash with the xxhash package's own XXH3 (bound before the test and
    again after it, in case it unbound them to run the Python path)."""
    from cellmigrate import _xxh3

    assert _xxh3.bind(), "the xxhash package's XXH3 functions could not be bound on this platform"
    yield
    _xxh3.bind()
