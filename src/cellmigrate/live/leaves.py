"""Per-page digests of a migrating state: how dirty pages are found and equality is proven.

Both ends of a live migration keep a :class:`PageTable`: the XXH3-128 digest of every
4 KiB page of the state the receiver has committed (16 bytes a page: 4 MiB for a GiB).

* The **sender** finds a round's dirty pages by hashing the live state once and comparing
  each page's digest with its table (it keeps no copy of the receiver's state: the table
  replaces a GiB "shadow", and the scan reads the state once instead of state + shadow).
  Its table entries are the digests of the page *copies* it sent, set when the receiver
  acknowledges them.
* The **receiver** hashes each page right after staging it, from the staged state itself
  (the store's view), so its table describes what it actually holds.
* A round ends with both comparing the **page root**: ``xxh3_128_tree`` with 4 KiB
  leaves (:func:`page_root`). In the final round the sender's root is that of the
  paused state as scanned, and the receiver has only the round's few pages to hash:
  the proof no longer re-hashes every 1 MiB leaf a scattered write touched.

What is proven is what ``xxh3_128_tree`` proves, at page granularity: equality up to an
XXH3-128 collision (integrity against accidents, not an adversary; keyed BLAKE3 MACs on
the wire are for that). The same 16-byte page digests find dirty pages, so a page the
agent changed into one with the same XXH3-128 would be neither sent nor noticed, with
the same probability as the proof failing to see a damaged page.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from .._backend import kernels
from .._buffers import as_bytes_view
from .._parallel import plan
from ..checksum import PAGE_SIZE
from .pages import copy_pages, pages_len

__all__ = [
    "PAGE_DIGEST_SIZE",
    "PageTable",
    "page_digests",
    "page_digests_at",
    "page_kernel",
    "page_root",
    "pages_with_digests",
]

#: Bytes of one page digest (XXH3-128, canonical form).
PAGE_DIGEST_SIZE = 16

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]
Digests = npt.NDArray[np.uint8]  # shape (pages, 16)

_digest = _xxhash.xxh3_128_digest
_ZERO_PAGE = _digest(bytes(PAGE_SIZE))


def _python_page_digests(view: memoryview, out: Digests) -> None:
    """The reference: one ``xxh3_128_digest`` call per page (about 0.1 s per GiB, GIL held)."""
    n = view.nbytes
    joined = b"".join(_digest(view[a : a + PAGE_SIZE]) for a in range(0, n, PAGE_SIZE))
    out[:] = np.frombuffer(joined, dtype=np.uint8).reshape(-1, PAGE_DIGEST_SIZE)


def page_kernel() -> Optional[Callable[..., Any]]:
    """A compiled, GIL-free ``kernel(view, out, threads=1)`` that fills ``out`` with the
    page digests of ``view`` on up to ``threads`` threads (``page_digests128``), or None.

    Asked on every call: the kernels hash with the ``xxhash`` package's own XXH3 functions
    only once ``cellmigrate._xxh3`` has bound them and checked them on test vectors (and
    tests unbind them to exercise the Python path).
    """
    try:
        from .. import _xxh3  # type: ignore[attr-defined, unused-ignore]
    except ImportError:  # a build whose kernels cannot hash: the Python path
        return None
    if not _xxh3.available():
        return None
    return lambda view, out, threads=1: kernels.page_digests128(view, PAGE_SIZE, out, threads)


def page_digests(data: Union[bytes, memoryview, U8Array], threads: Optional[int] = None) -> Digests:
    """XXH3-128 of every 4 KiB page of ``data`` (the last page may be short): ``(pages, 16)`` uint8.

    Large inputs are split over up to ``threads`` threads when the compiled kernel is
    available (it hashes without the GIL).
    """
    view = as_bytes_view(data, "pages")
    n = view.nbytes
    out: Digests = np.empty((-(-n // PAGE_SIZE), PAGE_DIGEST_SIZE), dtype=np.uint8)
    if n == 0:
        return out
    kernel = page_kernel()
    if kernel is None:
        _python_page_digests(view, out)
        return out

    kernel(view, out, len(plan(n, threads, PAGE_SIZE)))  # one GIL-free call on the kernel's threads
    return out


def page_digests_at(
    state: U8Array, indices: I64Array, size: int, scratch: Optional[U8Array] = None, threads: Optional[int] = None
) -> Digests:
    """Digests of ``state``'s pages at ascending ``indices`` (``size``: the state's length).

    One run of consecutive pages is hashed in place; scattered pages are gathered first
    (into ``scratch`` when given, a batch at a time: :func:`pages_with_digests`) so each
    batch is one kernel call.
    """
    n = len(indices)
    if n == 0:
        return np.empty((0, PAGE_DIGEST_SIZE), dtype=np.uint8)
    first, last = int(indices[0]), int(indices[-1])
    if last - first == n - 1:
        return page_digests(state[first * PAGE_SIZE : min((last + 1) * PAGE_SIZE, size)], threads)
    out: Digests = np.empty((n, PAGE_DIGEST_SIZE), dtype=np.uint8)
    batch = max(1, (scratch.nbytes if scratch is not None else 8 << 20) // PAGE_SIZE)
    for k in range(0, n, batch):
        part = indices[k : k + batch]
        out[k : k + len(part)] = pages_with_digests(state, part, size, scratch, threads)[1]
    return out


def pages_with_digests(
    state: U8Array, indices: I64Array, size: int, into: Optional[U8Array] = None, threads: Optional[int] = None
) -> "tuple[U8Array, Digests]":
    """:func:`~cellmigrate.live.pages.copy_pages` (``state``'s pages at ascending
    ``indices`` back to back, into ``into`` when given) and the ``(pages, 16)`` digests of
    the copies: with the compiled kernel in one pass, each page hashed from its copy while
    in cache (``gather_digests128``), and one GIL-free call."""
    if page_kernel() is None:
        copied = copy_pages(state, indices, size, into)
        return copied, page_digests(copied, threads)
    length = pages_len(indices, size)
    pages: U8Array = np.empty(length, dtype=np.uint8) if into is None else into[:length]
    digests: Digests = np.empty((len(indices), PAGE_DIGEST_SIZE), dtype=np.uint8)
    kernels.gather_digests128(state[:size], indices, PAGE_SIZE, pages, digests, len(plan(length, threads, PAGE_SIZE)))
    return pages, digests


def page_root(digests: Digests, size: int) -> bytes:
    """The page root of a ``size``-byte state from its page digests, in order:
    ``XXH3-128(d_0 || ... || d_{n-1} || u64le(size))`` (``xxh3_128_tree`` with 4 KiB leaves)."""
    h = _xxhash.xxh3_128()
    if len(digests):
        h.update(as_bytes_view(np.ascontiguousarray(digests), "page digests"))
    h.update(int(size).to_bytes(8, "little"))
    return h.digest()


def _zero_digest(length: int) -> bytes:
    return _ZERO_PAGE if length == PAGE_SIZE else _digest(bytes(length))


class PageTable:
    """The page digests of a state that changes a few pages at a time.

    An entry is either known (its digest) or *stale* (to hash again from the state, or, on
    a sender, simply unknown: a stale page always counts as dirty). :meth:`resize` makes
    the page holding the old or new end stale, and added pages either stale or, with
    ``zero_filled``, the digest of zeros (what a receiver's staging holds after growing).

    >>> state = bytearray(3 * 4096 + 5)
    >>> table = PageTable(len(state)); table.refresh(np.frombuffer(state, np.uint8))
    >>> state[4096] = 1; table.touch([1]); table.refresh(np.frombuffer(state, np.uint8))
    >>> table.root() == page_root(page_digests(state), len(state))
    True
    """

    __slots__ = ("_digests", "_stale", "_size")

    def __init__(self, size: int = 0, *, zero_filled: bool = False) -> None:
        """A table of a ``size``-byte state: all stale, or all zero pages with ``zero_filled``."""
        self._digests: Digests = np.zeros((0, PAGE_DIGEST_SIZE), dtype=np.uint8)
        self._stale: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self._size = 0
        self.resize(size, zero_filled=zero_filled)

    @property
    def size(self) -> int:
        """Length in bytes of the state the table describes."""
        return self._size

    def __len__(self) -> int:
        """Number of pages."""
        return len(self._stale)

    @property
    def digests(self) -> Digests:
        """The ``(pages, 16)`` digest array (stale entries hold old or zero bytes; read only)."""
        out: Digests = self._digests.view()
        out.flags.writeable = False
        return out

    def resize(self, size: int, *, zero_filled: bool = False) -> None:
        """The state now has ``size`` bytes. The page holding the old end (when it is not
        whole in both sizes) is stale; pages past the old end are stale, or with
        ``zero_filled`` the digest of the zeros they hold."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        old = self._size
        if size == old:
            return
        count, old_count = -(-size // PAGE_SIZE), len(self._stale)
        keep = min(count, old_count)
        digests: Digests = np.zeros((count, PAGE_DIGEST_SIZE), dtype=np.uint8)
        stale = np.zeros(count, dtype=np.bool_)
        digests[:keep] = self._digests[:keep]
        stale[:keep] = self._stale[:keep]
        common = min(old, size)
        first = common // PAGE_SIZE  # the first page whose bytes are not all kept
        if common % PAGE_SIZE and first < count:
            stale[first] = True  # cut short, or old bytes followed by new zeros
            first += 1
        if first < count:
            if zero_filled:
                digests[first:] = np.frombuffer(_ZERO_PAGE, dtype=np.uint8)
                stale[first:] = False
                if size % PAGE_SIZE:
                    digests[count - 1] = np.frombuffer(_zero_digest(size % PAGE_SIZE), dtype=np.uint8)
            else:
                stale[first:] = True
        self._digests, self._stale, self._size = digests, stale, size

    def resized(self, size: int, *, zero_filled: bool = False) -> "PageTable":
        """A new table, this one after :meth:`resize` (this one is left as it is)."""
        table = PageTable()
        table._digests, table._stale, table._size = self._digests, self._stale, self._size
        table.resize(size, zero_filled=zero_filled)  # builds new arrays: ours are not written
        return table

    def touch(self, pages: Union[I64Array, "list[int]"]) -> None:
        """Mark pages stale (indices past the end are ignored)."""
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size:
            self._stale[idx[(idx >= 0) & (idx < len(self._stale))]] = True

    def set(self, indices: I64Array, digests: Digests) -> None:
        """Record the digests of the pages at ``indices`` (no longer stale)."""
        if len(indices):
            self._digests[indices] = digests
            self._stale[indices] = False

    def stale_count(self) -> int:
        """Pages whose digest is not known."""
        return int(np.count_nonzero(self._stale))

    def differing(self, first: int, digests: Digests) -> I64Array:
        """Indices (relative to ``first``) of the pages ``first, first + 1, ...`` whose
        digest differs from ``digests`` (or is stale)."""
        k = len(digests)
        mine = self._digests[first : first + k].view(np.uint64)
        theirs = np.ascontiguousarray(digests).view(np.uint64)
        # Two bools a page, viewed as one uint16 (numpy's any(axis=1) is 15x slower).
        changed = (mine != theirs).view(np.uint16).reshape(-1) != 0
        return np.flatnonzero(changed | self._stale[first : first + k]).astype(np.int64, copy=False)

    def refresh(
        self, state: U8Array, below: Optional[int] = None, scratch: Optional[U8Array] = None, threads: Optional[int] = None
    ) -> None:
        """Hash the stale pages (only those numbered below ``below`` when given) from
        ``state`` (the whole state: :attr:`size` bytes; ``ValueError`` otherwise)."""
        if state.nbytes != self._size:
            raise ValueError(f"page table describes {self._size} bytes, the state has {state.nbytes}")
        stale = self._stale if below is None else self._stale[: max(0, below)]
        if not stale.any():
            return
        todo = np.flatnonzero(stale).astype(np.int64, copy=False)
        self.set(todo, page_digests_at(state, todo, self._size, scratch, threads))

    def root(self) -> bytes:
        """The page root (``ValueError`` while pages are stale)."""
        if self._stale.any():
            raise ValueError(f"{self.stale_count()} pages are stale: refresh() the table with the state first")
        return page_root(self._digests, self._size)
