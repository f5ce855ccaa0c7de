"""Checksums and digests over whole states.

``simple_checksum`` is the Rust crate's weighted sum, kept bit-exact for compatibility;
it is weak on purpose (see SPEC §6). ``digest`` gives the strong integrity check and,
keyed, the MAC that authenticates a delta.
"""

from __future__ import annotations

import operator
import os
from typing import Any, List, Optional, Sequence, cast

import blake3 as _blake3
import xxhash as _xxhash

from ._backend import kernels
from ._buffers import as_bytes_view
from ._parallel import PARALLEL_MIN_BYTES, plan
from ._tree import TreeStream
from ._types import BufferLike, IndexLike

__all__ = [
    "PAGE_SIZE",
    "simple_checksum",
    "state_pages_checksum",
    "pages_checksum",
    "digest",
    "DIGEST_ALGORITHMS",
    "DEFAULT_DIGEST",
    "DIGEST_SIZES",
    "KEY_SIZE",
]

PAGE_SIZE = 4096
DIGEST_ALGORITHMS = ("xxh3_128_tree", "xxh3_128", "blake3")
#: The strong digest deltas and rollback points carry unless told otherwise: XXH3-128
#: over 1 MiB leaves, which every core can help compute (see ``_tree``); SPEC §6 made it
#: the default on 2026-11-30. Plain ``xxh3_128`` stays selectable and readable.
DEFAULT_DIGEST = "xxh3_128_tree"
#: Bytes of each algorithm's digest.
DIGEST_SIZES = {"xxh3_128_tree": 16, "xxh3_128": 16, "blake3": 32}
KEY_SIZE = 32

_MASK64 = 0xFFFFFFFFFFFFFFFF

# BLAKE3's threads: the blake3 package's rayon pool, whose threads do not survive fork():
# a forked child that hashed on it waited for ever (once the parent had hashed 128 KiB or
# more). A child hashes on its own thread instead.
_blake3_threads: List[int] = [_blake3.blake3.AUTO]


def _blake3_one_thread_after_fork() -> None:
    _blake3_threads[0] = 1


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_blake3_one_thread_after_fork)

_FLAT = (bytes, bytearray)


def _check_offset(offset: int) -> int:
    if isinstance(offset, bool):
        raise TypeError("offset must be an int, not bool")
    try:
        offset = operator.index(offset)  # an int or a numpy integer, not a float
    except TypeError:
        raise TypeError(f"offset must be an int, not {type(offset).__name__}") from None
    if offset < 0:
        raise ValueError("offset must be >= 0")
    return offset & _MASK64


def simple_checksum(data: BufferLike, *, offset: int = 0, threads: Optional[int] = None) -> int:
    """Sum of ``data[i] * (offset + i + 1)`` modulo 2**32 (the crate's ``simple_checksum``).

    ``offset`` gives the positioned form: the checksum ``data`` contributes when it sits at
    byte ``offset`` of a larger state, so a state's checksum is the sum of its slices'.
    Large buffers are split over up to ``threads`` threads (default: the CPU count, capped
    by ``CELLMIGRATE_THREADS``); the result does not depend on the split.

    >>> simple_checksum(bytes([1, 2, 3, 4, 5]))
    55
    >>> simple_checksum(b"\\x03", offset=2)
    9
    """
    # (``type(...) in`` does not narrow for mypy; the ignore keeps this path free of a cast call.)
    if threads is None and type(offset) is int and offset == 0 and type(data) in _FLAT and len(data) < PARALLEL_MIN_BYTES:  # type: ignore[arg-type]
        # Fast path for small calls (4 KiB pages): bytes/bytearray are flat and
        # contiguous by construction, so the kernel can take them directly.
        result: int = kernels.checksum(data)
        return result
    offset = _check_offset(offset)
    view = as_bytes_view(data)
    # One call whatever the split: the kernel runs its own threads (one GIL wait a call).
    return int(kernels.checksum(view, offset, len(plan(view.nbytes, threads))))


def state_pages_checksum(state: BufferLike, indices: IndexLike, page_size: int = PAGE_SIZE) -> int:
    """Sum of the positioned checksums of ``state``'s pages at ``indices`` (mod 2**32).

    ``checksum(state) - state_pages_checksum(state, idx) + pages_checksum(new, idx)`` is
    the checksum ``state`` would have with those pages replaced, computed before writing
    anything. The last page of the state may be short; an index past the end raises
    ``IndexError``.

    >>> state_pages_checksum(bytes(4096) + b"\\x01", [1])
    4097
    """
    return int(kernels.state_pages_checksum(as_bytes_view(state, "state"), indices, page_size))


def pages_checksum(pages: Sequence[BufferLike], indices: IndexLike, page_size: int = PAGE_SIZE) -> int:
    """Sum of ``simple_checksum(pages[k], offset=indices[k] * page_size)`` (mod 2**32).

    >>> pages_checksum([b"\\x01"], [1])
    4097
    """
    return int(kernels.pages_checksum([as_bytes_view(p, "page") for p in pages], indices, page_size))


def check_key(key: Optional[Any]) -> Optional[bytes]:
    """``key`` as 32 bytes (or ``None``): ``TypeError`` for a non-buffer, ``ValueError`` for a wrong length."""
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be {KEY_SIZE} bytes, not {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a BLAKE3 key must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


class Hasher:
    """The one streaming strong digest: ``xxh3_128_tree``, plain XXH3-128 or (keyed) BLAKE3.

    :func:`digest`, the delta passes and the CLI's chunked checks all hash through it, so
    a state has one digest whichever path computed it. ``update`` takes buffers without
    copying and gives the same digest however the input is split. A tree hasher can be
    :meth:`fork`-ed per leaf-aligned span (spans hashed on different threads) and
    :meth:`join`-ed back in order, and keeps the per-leaf digest table (:meth:`leaves`).

    Raises ``ValueError`` for an unknown algorithm or a key with a non-BLAKE3 algorithm
    (a key's type and length as :func:`check_key`).
    """

    __slots__ = ("algorithm", "_h")

    def __init__(self, algorithm: str, key: Optional[bytes] = None) -> None:
        if algorithm not in DIGEST_ALGORITHMS:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {DIGEST_ALGORITHMS}")
        self.algorithm = algorithm
        self._h: Any
        if algorithm in ("xxh3_128_tree", "xxh3_128"):
            if key is not None:
                raise ValueError(f"a key needs algorithm='blake3' ({algorithm} is not a MAC)")
            self._h = TreeStream() if algorithm == "xxh3_128_tree" else _xxhash.xxh3_128()
        else:
            raw = check_key(key)
            if raw is not None:
                self._h = _blake3.blake3(key=raw, max_threads=_blake3_threads[0])
            else:
                self._h = _blake3.blake3(max_threads=_blake3_threads[0])

    def update(self, data: BufferLike) -> None:
        """Feed the next bytes (any C-contiguous buffer; nothing is copied)."""
        self._h.update(data)

    def update_all(self, view: memoryview, threads: Optional[int] = None) -> None:
        """Feed a whole flat byte view; a tree hasher splits its leaves over up to ``threads`` threads."""
        if isinstance(self._h, TreeStream):
            self._h.update_parallel(view, threads)
        else:
            self._h.update(view)

    def digest(self) -> bytes:
        """The digest of everything fed so far (16 bytes, or 32 for BLAKE3)."""
        return bytes(self._h.digest())

    @property
    def splittable(self) -> bool:
        """Whether spans of the input can be hashed on separate threads (leaf-aligned)."""
        return isinstance(self._h, TreeStream)

    def fork(self) -> "Hasher":
        """A hasher for one leaf-aligned span, to :meth:`join` back in order (tree only)."""
        if not self.splittable:
            raise ValueError(f"{self.algorithm} is sequential: only xxh3_128_tree can be split")
        return Hasher("xxh3_128_tree")

    def join(self, spans: Sequence["Hasher"]) -> None:
        """Take the spans' leaves, in order, as if this hasher had seen their bytes."""
        self._h.join([span._h for span in spans])

    def add_leaves(self, digests: BufferLike, nbytes: int) -> None:
        """Take leaf digests hashed elsewhere (the fused kernels) for the next ``nbytes`` bytes
        (``xxh3_128_tree`` only, at a leaf boundary; see ``TreeStream.add_leaves``)."""
        if not isinstance(self._h, TreeStream):
            raise ValueError(f"{self.algorithm} has no leaves: only xxh3_128_tree takes leaf digests")
        self._h.add_leaves(cast(bytes, digests), nbytes)

    def leaves(self) -> List[bytes]:
        """The per-leaf digest table so far (``xxh3_128_tree`` only; see ``_tree``)."""
        if not isinstance(self._h, TreeStream):
            raise ValueError(f"{self.algorithm} has no leaves: only xxh3_128_tree keeps a leaf table")
        return self._h.leaves()


def digest(
    data: BufferLike, algorithm: str = DEFAULT_DIGEST, *, key: Optional[bytes] = None, threads: Optional[int] = None
) -> bytes:
    """Strong digest of ``data``: 16 bytes of XXH3-128, or 32 of BLAKE3 (keyed with ``key``).

    ``xxh3_128_tree`` (the default, the one deltas carry) is XXH3-128 over 1 MiB leaves,
    hashed on up to ``threads`` threads for big states; ``xxh3_128`` is the plain,
    sequential XXH3-128 (what ``xxhsum -H2`` prints).

    >>> [len(digest(b"state", a)) for a in ("xxh3_128_tree", "xxh3_128", "blake3")]
    [16, 16, 32]
    """
    hasher = Hasher(algorithm, key)
    hasher.update_all(as_bytes_view(data), threads)
    return hasher.digest()
