"""Per-leaf digests of a state that changes a few pages at a time.

Both ends of a live migration keep the ``xxh3_128_tree`` leaf table of the state the
receiver has committed; after a round only the 1 MiB leaves that round touched are hashed
again, so proving a GiB state equal after a small final round costs a few MiB of hashing,
not a GiB. The root is the same digest :func:`cellmigrate.digest` gives the whole state.
"""

from __future__ import annotations

from typing import List, Optional

import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from .._parallel import plan, run_spans
from .._tree import LEAF_SIZE, root
from ..checksum import PAGE_SIZE

__all__ = ["LeafTable"]

_PAGES_PER_LEAF = LEAF_SIZE // PAGE_SIZE
_digest = _xxhash.xxh3_128_digest


class LeafTable:
    """The ``xxh3_128_tree`` leaf digests of a state, refreshed leaf by leaf.

    Mark what changed with :meth:`touch_pages` / :meth:`resize`, then :meth:`refresh`
    with a view of the state re-hashes just those leaves and returns the root.

    >>> from cellmigrate import digest
    >>> state = bytearray(3 << 20)
    >>> t = LeafTable()
    >>> t.resize(len(state)); t.refresh(memoryview(state)) == digest(state)
    True
    >>> state[5] = 1; t.touch_pages(np.array([0])); t.refresh(memoryview(state)) == digest(state)
    True
    """

    def __init__(self) -> None:
        self._leaves: List[bytes] = []
        self._size = 0
        self._dirty: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)

    @property
    def size(self) -> int:
        """Length in bytes of the state the table describes."""
        return self._size

    def resize(self, size: int) -> None:
        """The state now has ``size`` bytes (new bytes are whatever the state holds)."""
        if size == self._size:
            return
        old_count, new_count = len(self._leaves), -(-size // LEAF_SIZE)
        dirty = np.zeros(new_count, dtype=np.bool_)
        keep = min(old_count, new_count)
        dirty[:keep] = self._dirty[:keep]
        # The leaf holding the old or the new end changes length; every added leaf is new.
        edge = min(self._size, size) // LEAF_SIZE
        dirty[edge:] = True
        self._leaves = self._leaves[:new_count] + [b""] * max(0, new_count - old_count)
        self._dirty = dirty
        self._size = size

    def touch_pages(self, pages: npt.NDArray[np.int64]) -> None:
        """Mark the leaves holding these 4 KiB page indices as changed."""
        if len(pages):
            self._dirty[np.asarray(pages, dtype=np.int64) // _PAGES_PER_LEAF] = True

    def touch_all(self) -> None:
        """Mark every leaf as changed."""
        self._dirty[:] = True

    def dirty_count(self) -> int:
        """Leaves waiting to be hashed again."""
        return int(np.count_nonzero(self._dirty))

    def refresh(self, view: memoryview, threads: Optional[int] = None) -> bytes:
        """Hash the changed leaves of ``view`` (the state, ``size`` bytes) and return the root."""
        self.hash_dirty(view, len(self._leaves), threads)
        return root(self._leaves, self._size)

    def hash_dirty(self, view: memoryview, below: int, threads: Optional[int] = None) -> None:
        """Hash the changed leaves numbered below ``below`` now (a round's pages arrive in
        ascending order, so leaves before the latest page are final for the round)."""
        if view.nbytes != self._size:
            raise ValueError(f"leaf table describes {self._size} bytes, the view has {view.nbytes}")
        todo = np.flatnonzero(self._dirty[: max(0, below)])
        if len(todo):
            leaves, size = self._leaves, self._size

            def hash_leaves(lo: int, hi: int) -> None:
                for i in todo[lo:hi].tolist():
                    leaves[i] = _digest(view[i * LEAF_SIZE : min((i + 1) * LEAF_SIZE, size)])

            # Spans of leaf indices, each worth several MiB of hashing (xxhash frees the GIL).
            spans = plan(len(todo) * LEAF_SIZE, threads, 8 * LEAF_SIZE)
            run_spans(hash_leaves, [(lo // LEAF_SIZE, hi // LEAF_SIZE) for lo, hi in spans])
            self._dirty[todo] = False
