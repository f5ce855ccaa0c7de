"""Page fingerprints: what lets a pre-copy round read the live state alone.

A create compares the new state with its base page by page, so it reads both: 2 GiB of
memory for a 1 GiB state. Given the XXH3-64 of each page of the base (8 bytes a 4 KiB
page, 2 MiB for 1 GiB), it reads only the new state, hashes each page as it goes and
reads the base only under the pages whose hash changed (to encode them against it). The
table it then holds describes the state the delta describes: the next round's base.

Trust, and what a wrong table costs: a page whose XXH3-64 equals the table's entry is
taken as unchanged. A table that does not describe the base (the base written after it
was taken), or an XXH3-64 collision (about 2**-64 a changed page), leaves a changed page
out of the delta; the delta's digest still covers the new state as read, so
``DeltaSnapshot.apply`` refuses it on its base (``InvalidStateError``) and never writes a
wrong state. That takes a digest: a checksum-only delta (``digest=None``) never trusts a
table (create compares both states, then updates the table), since the crate's 32-bit
checksum misses some edits (+1, -2, +1 on three bytes in a row, say).

The table also keeps its state's checksum (SPEC's ``simple_checksum``), so create sums
only what the pages it copies change in it, not every page it reads. Where the base under
a copied page is not what the table says (it was written after the table was taken),
create reads the base once more for its own checksum, and the advanced table's checksum
is unknown (``None``) until the next create, which sums every page. A wrong checksum in
a table made from its parts gives deltas that apply refuses, as wrong pages do; take a
new table with :meth:`PageFingerprints.of` then.
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from . import _reference, _xxh3
from ._backend import kernels
from ._buffers import as_bytes_view
from ._parallel import plan, run_spans
from ._passes import _fused
from ._types import BufferLike
from .checksum import PAGE_SIZE
from .errors import InvalidStateError

__all__ = ["PageFingerprints", "reads_new_alone"]

U64Array = npt.NDArray[np.uint64]

_MASK32 = 0xFFFFFFFF


def _page_count(size: int) -> int:
    return -(-size // PAGE_SIZE)


def _table_of(values: Any) -> U64Array:
    """``values`` as a new uint64 array: a 1-D integer array, or a sequence of ints (not
    through numpy's inference, which makes floats of ints past 2**63)."""
    if not isinstance(values, np.ndarray):
        if isinstance(values, (bytes, bytearray, memoryview, str)) or not hasattr(values, "__iter__"):
            raise TypeError(f"values must be a sequence or 1-D array of integers, not {type(values).__name__}")
        items = list(values)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in items):
            if any(isinstance(v, (list, tuple, np.ndarray)) for v in items):
                raise ValueError("values must be 1-D, one a page")
            raise TypeError("values must be integers in 0 .. 2**64 - 1")
        if any(not 0 <= int(v) < 2**64 for v in items):
            raise ValueError("values must be integers in 0 .. 2**64 - 1")
        return np.array([int(v) for v in items], dtype=np.uint64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, one a page; got {values.ndim} dimensions")
    if len(values) and values.dtype.kind not in "iu":
        raise TypeError(f"values must be integers in 0 .. 2**64 - 1, not {values.dtype}")
    if values.dtype.kind == "i" and len(values) and int(values.min()) < 0:
        raise ValueError("values must be integers in 0 .. 2**64 - 1 (a negative one was given)")
    return values.astype(np.uint64)


class PageFingerprints:
    """The XXH3-64 of each 4 KiB page of a state (the last page may be short).

    Take one with :meth:`of` from a state as a receiver has it, pass it to
    :meth:`DeltaSnapshot.create` with that state as ``old_state``: with the default digest,
    create then reads the new state once instead of both states; on success it updates the
    table in place to the state the delta describes, ready for the next round (see the
    module's notes on what a table that does not describe the base costs: a delta that
    apply refuses, never a wrong state). Give create a :meth:`copy` when the delta may
    have to be made again (a send that failed): the table it advanced describes a state
    the receiver may never get. With another digest, create compares both states and
    refreshes only the entries of the pages the delta carries: a table that did not
    describe ``old_state`` stays wrong for the others.

    Attributes:
        size: bytes of the state the table describes.
        values: uint64 array, shape ``(ceil(size / 4096),)``: page ``k``'s XXH3-64
            (the ``xxhash`` package's ``xxh3_64_intdigest`` of the page's bytes). Read-only.
        checksum: that state's ``simple_checksum`` (u32), or ``None`` when not known (a
            table made from its parts without one, or advanced over a base that was not
            what it said): create then checksums every page, and sets it.
    """

    __slots__ = ("_size", "_values", "_checksum")

    def __init__(self, size: int, values: Any, checksum: Optional[int] = None) -> None:
        """A table from its parts: ``values`` (one integer in 0 .. 2**64 - 1 a page of
        ``size`` bytes, a sequence or 1-D array) is copied; ``checksum``: the state's
        ``simple_checksum``, if known.

        Raises ``TypeError`` for values or a checksum that are not integers, ``ValueError``
        when ``size`` is negative, ``checksum`` is outside 0 .. 2**32 - 1, or ``values`` is
        not 1-D, out of range or of the wrong length."""
        if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
            raise TypeError(f"size must be an int, not {type(size).__name__}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if checksum is not None:
            if isinstance(checksum, bool) or not isinstance(checksum, (int, np.integer)):
                raise TypeError(f"checksum must be an int or None, not {type(checksum).__name__}")
            if not 0 <= checksum <= _MASK32:
                raise ValueError(f"checksum must be in 0 .. 2**32 - 1, got {checksum}")
        table = _table_of(values)
        if len(table) != _page_count(int(size)):
            raise ValueError(f"a state of {size} bytes has {_page_count(int(size))} pages, not {len(table)}")
        self._size = int(size)
        self._checksum = None if checksum is None else int(checksum)
        self._set(table)

    @classmethod
    def of(cls, state: BufferLike, *, threads: Optional[int] = None) -> "PageFingerprints":
        """Fingerprint every page of ``state`` (any C-contiguous buffer; read once, split
        over up to ``threads`` threads, default the CPU count) and take its checksum."""
        view = as_bytes_view(state, "state")
        table = np.empty(_page_count(view.nbytes), dtype=np.uint64)
        spans = plan(view.nbytes, threads, PAGE_SIZE)
        if _xxh3.available():  # (never under CELLMIGRATE_PURE_PYTHON)
            # The compiled kernel hashes with the xxhash package's own library, on its own
            # threads, in one GIL-free call.
            checksum = kernels.page_digests64(view, PAGE_SIZE, table, 0, len(spans))
        else:  # each page through the xxhash package's Python API
            checksum = sum(run_spans(
                lambda a, b: _reference.page_digests64(view[a:b], PAGE_SIZE, table[a // PAGE_SIZE :], a), spans))
        made = cls.__new__(cls)
        made._size = view.nbytes
        made._checksum = checksum & _MASK32
        made._set(table)
        return made

    def _set(self, table: U64Array) -> None:
        table.flags.writeable = False
        self._values = table

    @property
    def size(self) -> int:
        """Bytes of the state the table describes."""
        return self._size

    @property
    def values(self) -> U64Array:
        """The XXH3-64 of each page (read-only uint64 array, one a page)."""
        return self._values

    @property
    def checksum(self) -> Optional[int]:
        """The state's ``simple_checksum`` (u32), or ``None`` when not known."""
        return self._checksum

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: object) -> bool:
        """Same size, checksum (or both unknown) and page values."""
        if not isinstance(other, PageFingerprints):
            return NotImplemented
        return (self._size == other._size and self._checksum == other._checksum
                and bool(np.array_equal(self._values, other._values)))

    __hash__ = None  # type: ignore[assignment]  # mutable: create updates it in place

    def __reduce__(self) -> Tuple[Any, ...]:
        # Through the constructor: an unpickled (or deep-copied) table is checked and
        # read-only like any other.
        return (PageFingerprints, (self._size, self._values, self._checksum))

    def copy(self) -> "PageFingerprints":
        """An independent table with the same values (create advances the one it is given)."""
        return PageFingerprints(self._size, self._values, self._checksum)

    def __repr__(self) -> str:
        return f"PageFingerprints(size={self._size}, pages={len(self._values)}, checksum={self._checksum})"

    def _advance(
        self, indices: npt.NDArray[np.int64], pages: Any, read: Optional[U64Array], checksum: Optional[int]
    ) -> None:
        """Describe the state a create described (its ``checksum``, if known): ``read`` when
        its pass hashed every page (the single-read pass), else this table with each
        copied page's XXH3-64 over it."""
        if read is None:
            read = self._values.copy()
            for k, page in zip(indices.tolist(), pages):
                read[k] = _xxhash.xxh3_64_intdigest(page)
        self._set(read)
        self._checksum = checksum

    def _check_covers(self, old: memoryview, new: memoryview) -> None:
        """``InvalidStateError`` unless the table, ``old`` and ``new`` have one size."""
        if not (self._size == old.nbytes == new.nbytes):
            states = (f"both states have {new.nbytes} bytes" if old.nbytes == new.nbytes
                      else f"the states have {old.nbytes} and {new.nbytes} bytes (fingerprints need equal sizes)")
            raise InvalidStateError(f"page fingerprints describe a state of {self._size} bytes; {states}")


def reads_new_alone(algorithm: Optional[str], key: Optional[bytes] = None) -> bool:
    """Whether ``DeltaSnapshot.create`` given a table reads the new state alone for this
    digest: the tree digest (the default) with the compiled kernels. With a sequential
    digest (``xxh3_128``, BLAKE3, a key) or none it compares both states and updates the
    table page by page from the copies (in Python: worth it only for few pages). Without a
    digest the table is never trusted: the crate's 32-bit checksum alone could not refuse
    a delta that a table not describing the base left a page out of."""
    return key is None and algorithm == "xxh3_128_tree" and _fused(True)
