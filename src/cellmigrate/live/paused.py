"""The final round's hashing of the paused state: page digests (the proof) and, for a
stop-and-copy, the summary's tree digest, in one read of the state.

The final round runs while the agent is paused, so the state it hashes cannot change.
:class:`PausedScan` hashes it region by region as the round reaches each region (the
first chunks leave at once instead of after a whole-state pass) and keeps the page
digests: their root is the proof (the receiver's table, after the round, must have the
same). A stop-and-copy also hashes the ``xxh3_128_tree`` leaves, each 1 MiB leaf right
after its pages, from cache.

A stop-and-copy sends nearly every page, so hashing a region on the sending thread
would stop the stream while the receiver drains what is buffered: there a helper thread
hashes the whole state in order, and the sending thread waits only for a region the
helper has not reached yet, so hashing and sending overlap. A pre-copy's final round
sends few pages; it hashes each region inline, on the pool's threads.
"""

from __future__ import annotations

import threading
from typing import List, Optional

import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from .._buffers import as_bytes_view
from .._tree import LEAF_SIZE
from .._tree import root as tree_root
from ..checksum import PAGE_SIZE
from .leaves import PAGE_DIGEST_SIZE, Digests, page_digests, page_kernel

__all__ = ["PausedScan"]

U8Array = npt.NDArray[np.uint8]


class PausedScan:
    """Page digests of the paused ``state`` into :attr:`digests` (``(pages, 16)`` uint8,
    XXH3-128 of each 4 KiB page, the last one possibly short), filled as :meth:`region`
    is called for consecutive regions from the start.

    With ``tree`` (a stop-and-copy), one helper thread hashes the whole state from the
    start, the ``xxh3_128_tree`` leaves too (:meth:`tree_digest` once every region was
    asked for); without the compiled page kernel the tree is left to the caller
    (:attr:`tree` is then False) and regions are hashed inline. Call :meth:`close` before
    the state may change or go away (the source resumes; ``memory.grow`` may move it): it
    stops the helper after its current leaf and waits for it. A failure of the helper is
    raised by :meth:`region`. Without ``tree``, each region is hashed inline on up to
    ``threads`` pool threads.
    """

    def __init__(self, state: U8Array, threads: Optional[int], *, tree: bool) -> None:
        n = state.nbytes
        self.view = as_bytes_view(state)
        self.threads = threads
        self.digests: Digests = np.empty((-(-n // PAGE_SIZE), PAGE_DIGEST_SIZE), dtype=np.uint8)
        self._kernel = page_kernel()
        self.tree = tree and self._kernel is not None and n > 0
        self._leaves: List[bytes] = [b""] * -(-n // LEAF_SIZE)
        self._done = 0  # bytes hashed by the helper (a leaf boundary, or n)
        self._error: Optional[BaseException] = None
        self._stop = False
        self._progress = threading.Condition()
        self._helper: Optional[threading.Thread] = None
        if self.tree:
            self._helper = threading.Thread(target=self._hash_all, name="cellmigrate-paused-scan", daemon=True)
            self._helper.start()

    def _hash_all(self) -> None:
        """The helper: each leaf's pages, then the leaf itself from cache, in order."""
        kernel = self._kernel
        assert kernel is not None
        n = self.view.nbytes
        try:
            for x in range(0, n, LEAF_SIZE):
                if self._stop:
                    return
                y = min(x + LEAF_SIZE, n)
                leaf = self.view[x:y]
                kernel(leaf, self.digests[x // PAGE_SIZE : -(-y // PAGE_SIZE)])
                h = _xxhash.xxh3_128()  # streaming: hashes without the GIL
                h.update(leaf)
                self._leaves[x // LEAF_SIZE] = h.digest()
                with self._progress:
                    self._done = y
                    self._progress.notify_all()
        except BaseException as exc:  # handed to the sending thread by region()
            with self._progress:
                self._error = exc
                self._progress.notify_all()

    def region(self, lo: int, hi: int) -> Digests:
        """The page digests of ``[lo, hi)`` (``lo`` leaf-aligned), hashed by now."""
        assert lo % LEAF_SIZE == 0, "regions start on leaf boundaries"
        out = self.digests[lo // PAGE_SIZE : -(-hi // PAGE_SIZE)]
        if self._helper is not None:
            with self._progress:
                self._progress.wait_for(lambda: self._done >= hi or self._error is not None)
                if self._done < hi and self._error is not None:
                    raise self._error
            return out
        out[:] = page_digests(self.view[lo:hi], self.threads)
        return out

    def tree_digest(self) -> bytes:
        """The state's ``xxh3_128_tree`` from the leaves hashed so far (all of them, once
        every region was asked for)."""
        if not all(self._leaves):
            raise RuntimeError("the tree digest of a paused scan that did not hash every leaf")
        return tree_root(self._leaves, self.view.nbytes)

    def close(self) -> None:
        """Stop the helper (after its current leaf) and wait for it; idempotent."""
        helper, self._helper = self._helper, None
        if helper is not None:
            self._stop = True
            helper.join()
