"""XXH3 for the compiled leaf kernels, from the ``xxhash`` package's own C library.

The fused delta passes (``cython/cm_leaves.h``) hash each 1 MiB leaf of the
``xxh3_128_tree`` digest inside a GIL-free loop, right after the page comparison or
checksum read it. They need XXH3 as C functions, and python-xxhash offers no C API; its
extension module, though, is built from the xxHash library and exports its functions
(``XXH3_128bits_dispatch`` & co., dispatched at run time to the CPU's best SIMD path).
We look those addresses up with ctypes and hand them to the kernels only after they
reproduce ``xxhash.xxh3_128_digest`` on test vectors (one-shot and streaming, several
lengths). Anything else (symbols not exported on this platform, another ABI, the
pure-Python kernels, ``CELLMIGRATE_XXH3_PYTHON=1``) leaves the kernels unbound and the
passes keep their Python path, which gives the same digests more slowly. xxHash is never
reimplemented here: these are the library's own functions.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from typing import List, Optional

import xxhash

from ._backend import PURE_PYTHON, kernels

__all__ = ["available", "bind", "unbind"]

#: The library functions the kernels call, in ``_xxh3_bind``'s argument order.
_SYMBOLS = (
    "XXH3_128bits_dispatch",
    "XXH3_64bits_dispatch",
    "XXH3_createState",
    "XXH3_freeState",
    "XXH3_128bits_reset",
    "XXH3_128bits_update_dispatch",
    "XXH3_128bits_digest",
)

_state: List[Optional[bool]] = [None]


def _addresses() -> Optional[List[int]]:
    """The symbols' addresses in xxhash's loaded extension, or None if any is missing."""
    try:
        ext = importlib.import_module("xxhash._xxhash")
        lib = ctypes.CDLL(ext.__file__)  # already loaded: dlopen hands back the same image
        addrs = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value for name in _SYMBOLS]
    except (AttributeError, OSError, ImportError):
        return None
    if not all(addrs):
        return None
    return [int(a) for a in addrs if a is not None]


def _vectors_agree() -> bool:
    """The bound kernels reproduce xxhash's own XXH3-128 on leaves with and without pages
    (lengths across XXH3's internal size classes, a streamed page over a base)."""
    pattern = bytes((i * 131 + 7) % 251 for i in range(251))
    for size in (1, 100, 240, 4096, 70_001):
        base = (pattern * (size // 251 + 1))[:size]
        leaf = -(-size // 4096) * 4096
        out = bytearray(16)
        kernels.overlay_leaves(base, 0, size, [], [], leaf, out)  # the leaf hashed in blocks
        if bytes(out) != xxhash.xxh3_128_digest(base):
            return False
        if size >= 8192:  # a page laid over the base: the streaming functions
            page = pattern[::-1] * 16 + pattern[:80]
            kernels.overlay_leaves(base, 0, size, [page], [4096], leaf, out)
            if bytes(out) != xxhash.xxh3_128_digest(base[:4096] + page + base[8192:]):
                return False
    return True


def bind() -> bool:
    """Bind the kernels to xxHash if possible and correct; returns :func:`available`."""
    if PURE_PYTHON or os.environ.get("CELLMIGRATE_XXH3_PYTHON", "") not in ("", "0"):
        _state[0] = False
        return False
    addrs = _addresses()
    if addrs is None:
        _state[0] = False
        return False
    kernels._xxh3_bind(*addrs)
    ok = _vectors_agree()
    if not ok:
        unbind()
    _state[0] = ok
    return ok


def unbind() -> None:
    """Make the passes take their Python path (tests of both paths)."""
    if not PURE_PYTHON:
        kernels._xxh3_bind(0, 0, 0, 0, 0, 0, 0)
    _state[0] = False


def available() -> bool:
    """Whether the fused leaf kernels can hash (bound on first call)."""
    if _state[0] is None:
        bind()
    return bool(_state[0])
