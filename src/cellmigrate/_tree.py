"""``xxh3_128_tree``: XXH3-128 over fixed 1 MiB leaves, so threads can share one digest.

A plain XXH3-128 of a state is one sequential stream: on a machine where one core
draws ~11 GB/s from memory, hashing a GiB state takes the same ~0.1 s however many
cores there are, and the delta apply/create passes wait on it. Cutting the state into
fixed leaves lets each thread hash its own span (fused with its checksum or page scan,
while the bytes are in its cache) and only the short list of leaf digests is hashed at
the end. The definition (also in docs/FORMAT.md)::

    leaf_i = XXH3-128(state[i * LEAF_SIZE : (i + 1) * LEAF_SIZE])   # canonical 16 bytes
    root   = XXH3-128(leaf_0 || leaf_1 || ... || leaf_{n-1} || u64le(len(state)))

``LEAF_SIZE`` is 1 MiB; the last leaf may be shorter; an empty state has no leaves. The
length in the root keeps states that differ only in trailing leaf structure apart.
Strength is XXH3-128's (integrity against accidents, not an adversary: that is what
keyed BLAKE3 is for).
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from . import _xxh3
from ._backend import kernels
from ._parallel import plan, run_spans

__all__ = ["LEAF_SIZE", "LeafTable", "TreeStream", "root", "tree_digest"]

LEAF_SIZE = 1 << 20
#: Bytes of one leaf digest (XXH3-128, canonical form).
_LEAF_DIGEST = 16

_digest = _xxhash.xxh3_128_digest


def root(leaves: Iterable[bytes], length: int) -> bytes:
    """The tree digest from the leaf digests, in order, of a ``length``-byte state."""
    return _digest(b"".join(leaves) + length.to_bytes(8, "little"))


class TreeStream:
    """Streaming ``xxh3_128_tree`` over bytes fed in order, however they are split.

    A stream that starts at a leaf boundary of the state (offset 0, or a span start that
    is a multiple of ``LEAF_SIZE``) yields exactly that span's leaves, so spans hashed on
    different threads are combined with :meth:`join`.
    """

    __slots__ = ("_leaves", "_partial", "_fill", "_length")

    def __init__(self) -> None:
        self._leaves: List[bytes] = []
        self._partial = _xxhash.xxh3_128()
        self._fill = 0  # bytes of the current, unfinished leaf
        self._length = 0

    def update(self, data: Union[bytes, memoryview]) -> None:
        """Feed the next bytes (any C-contiguous buffer; nothing is copied)."""
        view = memoryview(data)
        n = view.nbytes
        if n == 0:
            return  # (cast refuses an empty view with a zero in a multi-dimensional shape)
        if self._fill == 0 and self._length % LEAF_SIZE:
            raise ValueError("a short last leaf was already added: nothing may follow it")
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")  # leaves are cut in bytes, not in items
        pos = 0
        while pos < n:
            if self._fill == 0 and n - pos >= LEAF_SIZE:
                # A whole leaf in one piece: hash it in one call (the common case).
                self._leaves.append(_digest(view[pos : pos + LEAF_SIZE]))
                pos += LEAF_SIZE
                continue
            take = min(LEAF_SIZE - self._fill, n - pos)
            self._partial.update(view[pos : pos + take])
            self._fill += take
            pos += take
            if self._fill == LEAF_SIZE:
                self._leaves.append(self._partial.digest())
                self._partial.reset()
                self._fill = 0
        self._length += n

    def add_leaves(self, digests: Union[bytes, bytearray, memoryview], nbytes: int) -> None:
        """Take the digests of the next leaves, hashed elsewhere, for ``nbytes`` bytes of input.

        The stream must be at a leaf boundary; ``digests`` holds one 16-byte digest per
        ``LEAF_SIZE`` of ``nbytes``, the last one for a shorter leaf when ``nbytes`` is not a
        multiple of it (the end of the state: nothing may follow such a leaf).
        Raises ``ValueError`` otherwise."""
        count = -(-nbytes // LEAF_SIZE)
        raw = bytes(digests)
        if self._fill or len(raw) != count * _LEAF_DIGEST or nbytes < 0:
            raise ValueError(f"{len(raw)} digest bytes for {nbytes} bytes at fill {self._fill}")
        if self._length % LEAF_SIZE:
            raise ValueError("a short last leaf was already added: nothing may follow it")
        self._leaves.extend(raw[i : i + _LEAF_DIGEST] for i in range(0, len(raw), _LEAF_DIGEST))
        self._length += nbytes

    def leaves(self) -> List[bytes]:
        """The leaf digests so far, the unfinished last leaf included (nothing is consumed)."""
        if self._fill:
            return self._leaves + [self._partial.digest()]
        return list(self._leaves)

    def join(self, spans: Iterable["TreeStream"]) -> None:
        """Append streams that hashed the spans following this one, in order.

        Every stream but the last must end on a leaf boundary (spans are cut at
        multiples of ``LEAF_SIZE``); otherwise the leaves would not be the state's.
        """
        for span in spans:
            if self._fill or self._length % LEAF_SIZE:
                raise ValueError("a tree stream can only be joined at a leaf boundary")
            self._leaves.extend(span._leaves)
            self._length += span._length
            self._fill = span._fill
            if span._fill:
                self._partial = span._partial.copy()

    def update_parallel(self, view: memoryview, threads: Optional[int] = None) -> None:
        """:meth:`update` with a whole flat byte view, its leaves hashed on up to ``threads``
        threads (this stream must be at a leaf boundary when the view is split)."""
        spans = plan(view.nbytes, threads, LEAF_SIZE) if self._fill == 0 else [(0, view.nbytes)]
        whole = view.nbytes // LEAF_SIZE * LEAF_SIZE if self._fill == 0 else 0
        if whole and _xxh3.available():  # (never under CELLMIGRATE_PURE_PYTHON)
            # The whole leaves in one GIL-free call on the kernel's own threads (a call
            # per leaf would wait for the GIL after each while another thread runs Python).
            out = bytearray(16 * (whole // LEAF_SIZE))
            kernels.page_digests128(view[:whole], LEAF_SIZE, out, len(spans))
            self.add_leaves(out, whole)
            self.update(view[whole:])
            return
        if len(spans) == 1:
            self.update(view)
            return
        streams = {lo: TreeStream() for lo, _ in spans}

        def hash_span(lo: int, hi: int) -> None:
            streams[lo].update(view[lo:hi])

        run_spans(hash_span, spans)
        self.join(streams[lo] for lo, _ in spans)

    def digest(self) -> bytes:
        """The 16-byte tree digest of everything fed so far."""
        return root(self.leaves(), self._length)


def tree_digest(view: memoryview, threads: Optional[int] = None) -> bytes:
    """``xxh3_128_tree`` of a flat byte view, its leaves hashed on up to ``threads`` threads."""
    stream = TreeStream()
    stream.update_parallel(view, threads)
    return stream.digest()


class LeafTable:
    """The ``xxh3_128_tree`` leaf digests of a state that changes a few pages at a time.

    Keep the table of a committed state; after a change, mark the touched 4 KiB pages
    (:meth:`touch_pages`) and any size change (:meth:`resize`), and :meth:`refresh` with
    a view of the new state re-hashes only the 1 MiB leaves that hold them, returning
    the root: the same 16 bytes as ``digest(state, "xxh3_128_tree")``. Proving a GiB
    state equal after a small round so costs a few MiB of hashing, not a GiB.

    A table is seeded from a whole state (:meth:`of`, which hashes every leaf) or from
    the leaves a pass already computed (:meth:`from_leaves`, e.g. ``Hasher.leaves()`` of
    a delta create or apply: free). The table is only as right as the touches it is
    told about: a page changed but not touched keeps its leaf's old digest.

    >>> from cellmigrate import digest
    >>> state = bytearray(3 << 20)
    >>> table = LeafTable.of(memoryview(state))
    >>> state[5] = 1; table.touch_pages([0]); table.refresh(memoryview(state)) == digest(state)
    True
    >>> state.extend(bytes(10)); table.resize(len(state)); table.refresh(memoryview(state)) == digest(state)
    True
    """

    __slots__ = ("_table", "_size", "_stale")

    def __init__(self, size: int = 0) -> None:
        """An empty table (every leaf of a ``size``-byte state still to hash)."""
        self._table = bytearray()
        self._size = 0
        self._stale: npt.NDArray[np.bool_] = np.zeros(0, dtype=np.bool_)
        self.resize(size)

    @classmethod
    def of(cls, view: memoryview, threads: Optional[int] = None) -> "LeafTable":
        """The table of a whole state, its leaves hashed on up to ``threads`` threads."""
        table = cls(view.nbytes)
        table.refresh(view, threads)
        return table

    @classmethod
    def from_leaves(cls, leaves: Sequence[bytes], size: int) -> "LeafTable":
        """A table from the leaf digests of a ``size``-byte state (``ValueError`` if they do not fit)."""
        count = -(-size // LEAF_SIZE)
        if len(leaves) != count or any(len(leaf) != _LEAF_DIGEST for leaf in leaves):
            raise ValueError(f"a {size}-byte state has {count} leaf digests of 16 bytes, got {len(leaves)}")
        table = cls()
        table._table = bytearray(b"".join(leaves))
        table._size = size
        table._stale = np.zeros(count, dtype=np.bool_)
        return table

    @property
    def size(self) -> int:
        """Length in bytes of the state the table describes."""
        return self._size

    def __len__(self) -> int:
        """Number of leaves."""
        return len(self._stale)

    def resize(self, size: int) -> None:
        """The state now has ``size`` bytes: the leaf holding the old or new end and every
        added leaf are stale (the added bytes are whatever the state holds)."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be an int >= 0, got {size!r}")
        if size == self._size and len(self._table) == len(self._stale) * _LEAF_DIGEST:
            return
        old_count, count = len(self._stale), -(-size // LEAF_SIZE)
        stale = np.zeros(count, dtype=np.bool_)
        keep = min(old_count, count)
        stale[:keep] = self._stale[:keep]
        stale[min(self._size, size) // LEAF_SIZE :] = True
        del self._table[count * _LEAF_DIGEST :]
        self._table.extend(bytes((count - old_count) * _LEAF_DIGEST) if count > old_count else b"")
        self._stale = stale
        self._size = size

    def touch_pages(self, pages: Union[Sequence[int], npt.NDArray[np.int64]], page_size: int = 4096) -> None:
        """Mark the leaves holding these page indices as stale (indices past the end are ignored)."""
        idx = np.asarray(pages, dtype=np.int64)
        if idx.size:
            leaves = idx // (LEAF_SIZE // page_size)
            self._stale[leaves[(leaves >= 0) & (leaves < len(self._stale))]] = True

    def touch_all(self) -> None:
        """Mark every leaf as stale."""
        self._stale[:] = True

    def stale_count(self) -> int:
        """Leaves waiting to be hashed again."""
        return int(np.count_nonzero(self._stale))

    def leaves(self) -> List[bytes]:
        """The leaf digests, in order (``ValueError`` while some are stale)."""
        self._check_fresh()
        t = self._table
        return [bytes(t[i : i + _LEAF_DIGEST]) for i in range(0, len(t), _LEAF_DIGEST)]

    def root(self) -> bytes:
        """The tree digest of the state (``ValueError`` while some leaves are stale)."""
        self._check_fresh()
        return _digest(bytes(self._table) + self._size.to_bytes(8, "little"))

    def refresh(self, view: memoryview, threads: Optional[int] = None) -> bytes:
        """Hash the stale leaves of ``view`` (the state, :attr:`size` bytes), return the root.

        Raises ``ValueError`` when ``view`` does not have :attr:`size` bytes."""
        if view.nbytes != self._size:
            raise ValueError(f"leaf table describes {self._size} bytes, the view has {view.nbytes}")
        todo = np.flatnonzero(self._stale)
        if len(todo):
            table, size = self._table, self._size

            def hash_leaves(lo: int, hi: int) -> None:
                for i in todo[lo:hi].tolist():
                    table[i * _LEAF_DIGEST : (i + 1) * _LEAF_DIGEST] = _digest(
                        view[i * LEAF_SIZE : min((i + 1) * LEAF_SIZE, size)]
                    )

            # Spans of stale leaves, several MiB of hashing each (xxhash frees the GIL).
            spans = plan(len(todo) * LEAF_SIZE, threads, LEAF_SIZE)
            run_spans(hash_leaves, [(lo // LEAF_SIZE, hi // LEAF_SIZE) for lo, hi in spans])
            self._stale[:] = False
        return self.root()

    def _check_fresh(self) -> None:
        if self._stale.any():
            raise ValueError(f"{self.stale_count()} leaves are stale: refresh() the table with the state first")
