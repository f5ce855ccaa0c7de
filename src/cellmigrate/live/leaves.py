"""The incremental tree digest of a staged state, hashing a round's finished leaves early.

Both ends keep the ``xxh3_128_tree`` leaf table (:class:`cellmigrate._tree.LeafTable`) of
the state the receiver has committed, so after a round only the 1 MiB leaves it touched
are hashed again. A round's pages arrive in ascending order, so once a chunk is written
every touched leaf before its last page is final for the round: :meth:`LeafTable.hash_before`
hashes those while the next chunk is still on the wire, and the round's digest (the final
proof's, inside the agent's pause) has little left to do.
"""

from __future__ import annotations

from typing import Optional

from .._tree import LeafTable as _LeafTable

__all__ = ["LeafTable"]


class LeafTable(_LeafTable):
    """:class:`cellmigrate._tree.LeafTable` plus :meth:`hash_before`.

    >>> from cellmigrate import digest
    >>> state = bytearray(3 << 20)
    >>> t = LeafTable.of(memoryview(state))
    >>> state[5] = state[(2 << 20) + 1] = 1; t.touch_pages([0, 512])
    >>> t.hash_before(memoryview(state), 1); t.stale_count()
    1
    >>> t.refresh(memoryview(state)) == digest(state)
    True
    """

    __slots__ = ()

    def hash_before(self, view: memoryview, below: int, threads: Optional[int] = None) -> None:
        """Hash the stale leaves numbered below ``below`` now (``view``: the whole state)."""
        later = self._stale[max(0, below) :].copy()
        if not self._stale[: max(0, below)].any():
            return
        self._stale[max(0, below) :] = False
        try:
            self.refresh(view, threads)  # hashes exactly the earlier stale leaves
        finally:
            self._stale[max(0, below) :] = later
