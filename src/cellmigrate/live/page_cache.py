"""The sender's cache of pages it sent in delta rounds: what XZR pages are encoded against.

An XZR page (XOR with the page the receiver holds, zero runs encoded: ``docs/FORMAT.md``)
costs about 70 bytes for a 4 KiB page with 64 changed bytes, but needs the receiver's
copy of the page on the sender, which keeps no shadow of the state (its page table holds
digests). QEMU's answer is the XBZRLE cache (``migration/xbzrle.c``, ``page_cache.c``):
the last copy sent of recently dirtied pages, bounded in size; a page dirtied again while
still cached goes XOR-encoded, any other page whole. The same here, with the same default
size (64 MiB): pages enter when sent in a delta round (round 0's whole state would only
churn it) and leave first in, first out.

Why a cached copy is what the receiver holds: the receiver applies chunks strictly in
sequence, each atomically, and a chunk cut off by a dropped connection is resent as it was
(same payload); so when a chunk reaches the receiver, every page holds the copy sent in
the last earlier chunk that carried it, which is the copy cached when that chunk was
built. Whatever else happens, the chunk's digest covers the decoded pages: an XZR page
over a wrong base fails it (``CorruptDataError``), it never stages a wrong page.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..checksum import PAGE_SIZE

__all__ = ["DEFAULT_PAGE_CACHE_BYTES", "MAX_PAGE_CACHE_BYTES", "PageCache", "page_cache_size_ok"]

#: QEMU's default XBZRLE cache size (``xbzrle-cache-size``).
DEFAULT_PAGE_CACHE_BYTES = 64 << 20
#: The largest cache a migration takes (the sender reserves it up front).
MAX_PAGE_CACHE_BYTES = 64 << 30

U8Array = npt.NDArray[np.uint8]
I64Array = npt.NDArray[np.int64]


def page_cache_size_ok(nbytes: int) -> bool:
    """Whether ``nbytes`` is a page cache size a migration takes: 0 (none) or 4 KiB .. 64 GiB."""
    return nbytes == 0 or PAGE_SIZE <= nbytes <= MAX_PAGE_CACHE_BYTES


class PageCache:
    """Up to ``capacity_bytes // 4096`` whole pages by page number, first in, first out.

    Only whole pages are kept (a state's short last page never is). The memory is reserved
    at the first :meth:`store`, for no more pages than the state has (a migration without
    delta rounds reserves none). Not thread-safe: one sender thread builds the chunks.
    """

    def __init__(self, capacity_bytes: int = DEFAULT_PAGE_CACHE_BYTES) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int):
            raise TypeError(f"capacity_bytes must be an int, not {type(capacity_bytes).__name__}")
        if capacity_bytes < 0:
            raise ValueError(f"capacity_bytes must be >= 0, got {capacity_bytes}")
        self.limit = capacity_bytes // PAGE_SIZE
        self.capacity = 0  # slots, set when the first pages come: the limit or the state's pages
        self._data = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self._page_of = np.full(0, -1, dtype=np.int64)  # slot -> page number
        self._slot_of = np.full(0, -1, dtype=np.int64)  # page number -> slot
        self._next = 0  # the slot the next new page takes (oldest first)

    def __len__(self) -> int:
        return int(np.count_nonzero(self._page_of >= 0))

    def clear(self) -> None:
        """Forget every page and give the memory back (a state that changed size: the
        receiver's pages moved or were zeroed)."""
        self.capacity = 0
        self._data = np.empty((0, PAGE_SIZE), dtype=np.uint8)
        self._page_of = np.full(0, -1, dtype=np.int64)
        self._slot_of = np.full(0, -1, dtype=np.int64)
        self._next = 0

    def _reserve(self, size: int) -> None:
        """Slots for the cache's limit or the whole pages of a ``size``-byte state, fewer."""
        slots = min(self.limit, size // PAGE_SIZE)
        try:
            self._data = np.empty((slots, PAGE_SIZE), dtype=np.uint8)  # touched only when filled
        except MemoryError:
            raise MemoryError(f"cannot reserve a page cache of {slots * PAGE_SIZE} bytes (page_cache_bytes)") from None
        self._page_of = np.full(slots, -1, dtype=np.int64)
        self.capacity = slots

    def slots(self, indices: I64Array) -> I64Array:
        """The slot of each page at ``indices`` in :attr:`data`, -1 where it is not cached."""
        slots = np.full(len(indices), -1, dtype=np.int64)
        inside = indices < len(self._slot_of)
        slots[inside] = self._slot_of[indices[inside]]
        return slots

    def hits(self, indices: I64Array) -> "npt.NDArray[np.bool_]":
        """Whether each page at ``indices`` is cached."""
        return self.slots(indices) >= 0

    @property
    def data(self) -> U8Array:
        """The cached pages, flat: slot ``k`` at ``k * 4096`` (read it, never keep it:
        :meth:`store` reuses slots). XZR pages encode against it in place, no copy."""
        return self._data.reshape(-1)

    def store(self, indices: I64Array, pages: U8Array, size: int) -> None:
        """Remember ``pages`` (flat, page k being page ``indices[k]`` of a ``size``-byte
        state, ascending and distinct) as sent: cached pages are updated, new ones take
        the oldest slots."""
        if not self.capacity:
            self._reserve(size)
        if not self.capacity or not len(indices):
            return
        whole = int(np.searchsorted(indices, size // PAGE_SIZE))  # the short last page is not kept
        if whole == 0:
            return
        indices = indices[:whole]
        rows = pages[: whole * PAGE_SIZE].reshape(whole, PAGE_SIZE)
        top = int(indices[-1]) + 1
        if top > len(self._slot_of):
            grown = np.full(max(top, 2 * len(self._slot_of)), -1, dtype=np.int64)
            grown[: len(self._slot_of)] = self._slot_of
            self._slot_of = grown
        slots = self.slots(indices)
        hit = slots >= 0
        if hit.any():
            self._data[slots[hit]] = rows[hit]
        fresh = np.flatnonzero(~hit)
        if len(fresh) > self.capacity:  # more new pages than slots: the last ones stay
            fresh = fresh[-self.capacity :]
        if not len(fresh):
            return
        taken = (self._next + np.arange(len(fresh))) % self.capacity
        self._next = int((self._next + len(fresh)) % self.capacity)
        evicted = self._page_of[taken]
        self._slot_of[evicted[evicted >= 0]] = -1
        self._page_of[taken] = indices[fresh]
        self._slot_of[indices[fresh]] = taken
        # Rows straight from the chunk when all are new (no temporary copy: fresh memory
        # costs a VM a page fault a page).
        self._data[taken] = rows if len(fresh) == whole else rows[fresh]
