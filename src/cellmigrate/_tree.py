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

from typing import Iterable, List, Optional, Union

import xxhash as _xxhash

from ._parallel import plan, run_spans

__all__ = ["LEAF_SIZE", "TreeStream", "root", "tree_digest"]

LEAF_SIZE = 1 << 20

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
            if self._fill:
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
