"""The pages of a delta as they are stored and shipped: one encoding per page, one batch.

A delta's dirty pages travel in one of four encodings, chosen per page by size (the
crate's "keep it only when strictly smaller", extended):

========  =====  ==============================================================
encoding  value  stored bytes
========  =====  ==============================================================
raw       0      the page itself
rle       1      the crate's "simple" RLE of the page (``DirtyPage.compress()``)
zero      2      nothing: the page is all zeros
xzr       3      XOR with the base page, as zero runs and literals (docs/FORMAT.md);
                 decoding needs the base page, so it is only used where a strong
                 digest proves the base (a checksum-only delta never uses it)
========  =====  ==============================================================

Inside a delta the pages are held as a :class:`PageBatch`: index, encoding and offset
arrays over one contiguous payload (a view of the serialized input when that is
read-only, so a delta read from a memory-mapped file holds no copy). Every batch-wide
operation (encode, check, decode) is one GIL-free kernel call; ``DeltaSnapshot``'s public
``dirty_pages`` list of :class:`DirtyPage` objects is built from the batch only when
someone asks for it, and a list that was handed out is what ``apply`` and ``serialize``
then use (SPEC §4: a user may change the pages).

Internal API for page streaming (the live migration protocol calls it per chunk):

* :func:`encode_batch` ``(base, new, indices, allowed) -> PageBatch``;
* :meth:`PageBatch.pack` / :meth:`PageBatch.unpack` to frame a batch as bytes;
* :meth:`PageBatch.check` (hostile input: ``CorruptDataError``) and
  :meth:`PageBatch.decode` ``(base, total_size) -> DecodedPages`` to rebuild the pages.
"""

from __future__ import annotations

import enum
import struct
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type, Union, cast

import numpy as np
import numpy.typing as npt

from ._backend import kernels
from ._buffers import as_bytes_view
from ._parallel import max_threads
from ._types import BufferLike
from .checksum import PAGE_SIZE
from .errors import CellError, CorruptDataError, InvalidStateError

__all__ = [
    "PageEncoding",
    "ALLOW_RAW",
    "ALLOW_CRATE",
    "ALLOW_ALL",
    "ALLOW_XZR",
    "ALLOW_ZERO",
    "DirtyPage",
    "PageBatch",
    "DecodedPages",
    "encode_batch",
    "allowed_mask",
    "PageStore",
]


class PageEncoding(enum.IntEnum):
    """How one page is stored (the wire value)."""

    RAW = 0
    RLE = 1
    ZERO = 2
    XZR = 3

    @property
    def label(self) -> str:
        """Lower-case name, as ``inspect`` prints it."""
        return self.name.lower()


#: Bit masks of allowed encodings (``1 << PageEncoding``).
ALLOW_RAW = 1 << PageEncoding.RAW
#: What a checksum-only delta uses: the crate's encodings, byte-compatible with it.
ALLOW_CRATE = ALLOW_RAW | 1 << PageEncoding.RLE
#: XZR pages: only where the base is proven (a strong digest), and what the create
#: pass takes XZR hints for.
ALLOW_XZR = 1 << PageEncoding.XZR
ALLOW_ZERO = 1 << PageEncoding.ZERO
ALLOW_ALL = ALLOW_CRATE | ALLOW_ZERO | ALLOW_XZR

#: Below this many pages' bytes a batch is encoded or decoded on the calling thread only.
_SPLIT_MIN_BYTES = 8 << 20


def allowed_mask(encodings: Sequence[Union[PageEncoding, int, str]]) -> int:
    """The bit mask of ``encodings`` (names or values); raw is always included."""
    mask = ALLOW_RAW
    for e in encodings:
        mask |= 1 << _encoding(e)
    return mask


def _encoding(value: Union[PageEncoding, int, str]) -> PageEncoding:
    if isinstance(value, str):
        try:
            return PageEncoding[value.upper()]
        except KeyError:
            raise ValueError(f"unknown page encoding {value!r}; expected one of "
                             f"{[e.label for e in PageEncoding]}") from None
    if isinstance(value, bool):
        raise TypeError("page encoding must be a PageEncoding, int or str, not bool")
    try:
        return PageEncoding(value)
    except ValueError:
        raise ValueError(f"unknown page encoding {value!r}") from None


# --------------------------------------------------------------------------------------
# DirtyPage: the public view of one page
# --------------------------------------------------------------------------------------


class DirtyPage:
    """One changed page: its index in the state and its stored bytes.

    >>> page = DirtyPage(3, bytes(4096))
    >>> page.compress()
    >>> page.compressed, len(page.data)
    (True, 99)
    >>> page.get_data() == bytes(4096)
    True
    >>> page.decompress()
    >>> page
    DirtyPage(index=3, data=<4096 bytes>, compressed=False)

    Attributes:
        index: page number; the page covers bytes ``[index*4096, (index+1)*4096)``.
        data: the page's stored bytes (raw, RLE, nothing for a zero page, or XZR).
        compressed: whether ``data`` is anything but the raw page (setting it to True
            on a raw page means RLE, to False means raw: the crate's flag).
        encoding: the :class:`PageEncoding` of ``data`` (``compressed`` follows it).

    A ``zero`` page decodes to the page's length of zeros (pass ``length`` for the short
    last page of a state); an ``xzr`` page needs its base page: ``get_data(base=...)``.
    """

    __slots__ = ("index", "data", "_encoding")
    __hash__ = None  # type: ignore[assignment]  # mutable, like the crate's struct

    def __init__(
        self,
        index: int,
        data: BufferLike,
        compressed: bool = False,
        *,
        encoding: Optional[Union[PageEncoding, int, str]] = None,
    ) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"page index must be an int, not {type(index).__name__}")
        if index < 0:
            raise ValueError(f"page index must be >= 0, got {index}")
        self.index: int = int(index)
        self.data: bytes = data if isinstance(data, bytes) else bytes(as_bytes_view(data, "page data"))
        if encoding is None:
            self._encoding = PageEncoding.RLE if compressed else PageEncoding.RAW
        else:
            self._encoding = _encoding(encoding)

    @classmethod
    def _wrap(cls, index: int, data: bytes, encoding: PageEncoding) -> "DirtyPage":
        """A page over ``data`` as is (no checks, no copy): for pages the library built."""
        page = cls.__new__(cls)
        page.index = index
        page.data = data
        page._encoding = encoding
        return page

    @property
    def encoding(self) -> PageEncoding:
        """The :class:`PageEncoding` of :attr:`data` (settable: a name, value or member)."""
        return self._encoding

    @encoding.setter
    def encoding(self, value: Union[PageEncoding, int, str]) -> None:
        self._encoding = _encoding(value)

    @property
    def compressed(self) -> bool:
        """Whether :attr:`data` is anything but the raw page (the crate's flag: setting True on a raw page means RLE, False means raw)."""
        return self._encoding is not PageEncoding.RAW

    @compressed.setter
    def compressed(self, value: bool) -> None:
        if not value:
            self._encoding = PageEncoding.RAW
        elif self._encoding is PageEncoding.RAW:
            self._encoding = PageEncoding.RLE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyPage):
            return NotImplemented
        return (self.index, self._encoding, self.data) == (other.index, other._encoding, other.data)

    def compress(self) -> None:
        """RLE-compress a raw page in place, keeping the result only when strictly smaller."""
        if self._encoding is not PageEncoding.RAW:
            return
        packed = bytes(kernels.rle_compress(as_bytes_view(self.data)))
        if len(packed) < len(self.data):
            self.data = packed
            self._encoding = PageEncoding.RLE

    def decompress(
        self, *, max_output: Optional[int] = None, base: Optional[BufferLike] = None, length: Optional[int] = None
    ) -> None:
        """Decode ``data`` in place to the raw page (no-op when raw); see :meth:`get_data`."""
        if self._encoding is not PageEncoding.RAW:
            self.data = self.get_data(max_output=max_output, base=base, length=length)
            self._encoding = PageEncoding.RAW

    def get_data(
        self, *, max_output: Optional[int] = None, base: Optional[BufferLike] = None, length: Optional[int] = None
    ) -> bytes:
        """The page's raw bytes (decoded if need be), without changing the page.

        ``max_output`` bounds the decoded size (``CorruptDataError`` past it). ``None``
        leaves RLE only its own limit (at most 127 bytes per 3 stored), like the crate.
        ``length`` is the page's length (default 4096: pass the short last page's) for a
        zero or XZR page; ``base`` is the base page an XZR page is XORed against (read
        up to ``length`` bytes, zeros past its end); without it an XZR page raises
        ``ValueError``. Corrupt data raises ``CorruptDataError``.
        """
        if max_output is not None and max_output < 0:
            raise ValueError("max_output must be >= 0")
        encoding = self._encoding
        if encoding is PageEncoding.RAW:
            return bytes(self.data)
        if encoding is PageEncoding.RLE:
            bound = -1 if max_output is None else max_output  # -1: the kernel's "no bound"
            return bytes(kernels.rle_decompress(as_bytes_view(self.data), bound))
        size = PAGE_SIZE if length is None else int(length)
        if max_output is not None and size > max_output:
            raise CorruptDataError(f"page {self.index} decodes to {size} bytes, over max_output of {max_output}")
        if encoding is PageEncoding.ZERO:
            if len(self.data):
                raise CorruptDataError(f"zero page {self.index} holds {len(self.data)} bytes of data")
            return bytes(size)
        if base is None:
            raise ValueError(f"page {self.index} is XZR-encoded against its base page: pass base=")
        return bytes(kernels.xzr_decode(as_bytes_view(self.data), as_bytes_view(base, "base"), size))

    def __repr__(self) -> str:
        if self._encoding in (PageEncoding.RAW, PageEncoding.RLE):
            return f"DirtyPage(index={self.index}, data=<{len(self.data)} bytes>, compressed={self.compressed})"
        return f"DirtyPage(index={self.index}, data=<{len(self.data)} bytes>, encoding={self._encoding.label!r})"


# --------------------------------------------------------------------------------------
# PageBatch: how a delta holds its pages
# --------------------------------------------------------------------------------------

_I64 = npt.NDArray[np.int64]
_U8 = npt.NDArray[np.uint8]
_U32 = npt.NDArray[np.uint32]
_U16 = npt.NDArray[np.uint16]

# Batch check codes (cm_pages.h / _reference.check_pages).
_PAGE_INDEX_RANGE = 1
_PAGE_NOT_INCREASING = 2
_PAGE_ENCODING = 3
_PAGE_LENGTH = 4
_PAGE_RLE_CORRUPT = 5
_PAGE_RLE_SIZE = 6
_PAGE_XZR_CORRUPT = 7
_PAGE_OFFSETS = 8
_PAGE_CHECK = 9
_RLE_PROBLEMS = {1: "truncated marker", 2: "marker with a zero run length", 3: "decodes past the page"}
_XZR_PROBLEMS = {
    1: "a varint is cut short",
    2: "an overlong varint",
    3: "a zero literal length",
    4: "a pair runs past the end of the page",
    5: "a literal is cut short",
}

# pack(): count, then the table columns and the payload (see PageBatch.pack).
_PACK_HEAD = struct.Struct("<II")


class PageBatch:
    """Stored pages: ``indices`` (int64[n]), ``encodings`` (uint8[n]), ``offsets``
    (int64[n + 1]) into ``payload`` (a bytes-like; page k is
    ``payload[offsets[k]:offsets[k + 1]]``), and ``checks`` (uint32[n], the weighted
    checksum of each page's stored bytes: the wire format's per-page check; computed when
    first asked for if not given).

    Built by :func:`encode_batch`, :meth:`from_pages` or the wire reader; read-only by
    convention (a new batch is made rather than one changed).
    """

    __slots__ = ("indices", "encodings", "offsets", "payload", "_checks", "frame")

    def __init__(
        self, indices: _I64, encodings: _U8, offsets: _I64, payload: BufferLike, checks: Optional[_U32] = None
    ) -> None:
        self.indices = indices
        self.encodings = encodings
        self.offsets = offsets
        self.payload: Union[bytes, memoryview] = payload if isinstance(payload, bytes) else as_bytes_view(payload)
        self._checks = checks
        #: The payload as one zstd frame, when one was made (by ``create``) or read (by the
        #: wire reader) for exactly these pages: serializing writes it again.
        self.frame: Optional[BufferLike] = None

    @property
    def checks(self) -> _U32:
        if self._checks is None:
            self._checks = kernels.stored_checks(self.payload, self.offsets)
        return self._checks

    @classmethod
    def empty(cls) -> "PageBatch":
        return cls(np.empty(0, np.int64), np.empty(0, np.uint8), np.zeros(1, np.int64), b"")

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def payload_size(self) -> int:
        return int(self.offsets[-1])

    def stored_lengths(self) -> _I64:
        return np.diff(self.offsets)

    def stored(self, k: int) -> memoryview:
        """Stored bytes of page ``k`` (a view)."""
        view = self.payload if isinstance(self.payload, memoryview) else memoryview(self.payload)
        return view[int(self.offsets[k]) : int(self.offsets[k + 1])]

    def counts(self) -> Dict[str, Tuple[int, int]]:
        """``{encoding label: (pages, stored bytes)}`` for every encoding (zeros included)."""
        lengths = self.stored_lengths()
        out = {}
        for e in PageEncoding:
            mask = self.encodings == e
            out[e.label] = (int(mask.sum()), int(lengths[mask].sum()))
        return out

    # -- the public view ------------------------------------------------------------------

    def pages(self) -> List[DirtyPage]:
        """One :class:`DirtyPage` per page, each holding a copy of its stored bytes."""
        data = bytes(self.payload) if not isinstance(self.payload, bytes) else self.payload
        offs = self.offsets.tolist()
        encs = [PageEncoding(e) for e in range(len(PageEncoding))]
        wrap = DirtyPage._wrap
        return [
            wrap(i, data[offs[k] : offs[k + 1]], encs[e])
            for k, (i, e) in enumerate(zip(self.indices.tolist(), self.encodings.tolist()))
        ]

    @classmethod
    def from_pages(cls, pages: Sequence[Any]) -> "PageBatch":
        """A batch of ``pages`` (``DirtyPage``-like objects: ``index``, ``data``,
        ``compressed`` and optionally ``encoding``) in their order, data as they hold it.

        Raises ``TypeError`` naming the page for what is not a page, an index that is not
        an integer or data that is not a buffer, ``ValueError`` for an index outside
        ``0 .. 2**63 - 1`` or an unknown encoding.
        """
        count = len(pages)
        indices = np.empty(count, dtype=np.int64)
        encodings = np.empty(count, dtype=np.uint8)
        parts: List[Any] = []
        for k, page in enumerate(pages):
            try:
                index, data = page.index, page.data
                encoding = getattr(page, "encoding", None)
                if encoding is None:
                    encoding = PageEncoding.RLE if page.compressed else PageEncoding.RAW
            except AttributeError:
                raise TypeError(f"page {k}: {type(page).__name__} is not a dirty page") from None
            if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
                raise TypeError(f"page {k}: index {index!r} is not an integer")
            if not 0 <= index < 1 << 63:
                raise ValueError(f"page {k}: index {index} is not a page number")
            indices[k] = index
            encodings[k] = _encoding(encoding)
            parts.append(data if isinstance(data, bytes) else as_bytes_view(data, f"page {k}: data"))
        offsets = np.zeros(count + 1, dtype=np.int64)
        if count:
            np.cumsum([len(p) if isinstance(p, bytes) else p.nbytes for p in parts], out=offsets[1:])
        return cls(indices, encodings, offsets, b"".join(parts))

    def sorted_unique(self, error: Type[CellError] = InvalidStateError) -> "PageBatch":
        """The same pages in index order; a page listed twice raises ``error``."""
        if len(self) < 2 or bool(np.all(self.indices[1:] > self.indices[:-1])):
            return self
        order = np.argsort(self.indices, kind="stable")
        idx = self.indices[order]
        dup = np.flatnonzero(idx[1:] == idx[:-1])
        if len(dup):
            raise error(f"Delta holds page {int(idx[dup[0]])} more than once")
        lengths = self.stored_lengths()[order]
        offsets = np.zeros(len(idx) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        starts = self.offsets[:-1][order]
        src = np.frombuffer(self.payload, dtype=np.uint8)
        payload = np.concatenate([src[s : s + n] for s, n in zip(starts.tolist(), lengths.tolist())]) if len(idx) else src[:0]
        checks = None if self._checks is None else self._checks[order]
        return PageBatch(idx, self.encodings[order], offsets, payload.tobytes(), checks)

    # -- checks and decoding ----------------------------------------------------------------

    def _describe(self, code: int, k: int, detail: int, total_size: int, *, wire: bool) -> str:
        """The message of check failure ``code`` at page position ``k``."""
        index = int(self.indices[k])
        where = f"page {k}" if wire else f"Delta page {index}"
        if code == _PAGE_INDEX_RANGE:
            npages = -(-total_size // PAGE_SIZE)
            if wire:
                return f"{where}: index {index} out of range for total_size {total_size}"
            return f"{where} is out of range for a state of {total_size} bytes ({npages} pages)"
        if code == _PAGE_NOT_INCREASING:
            if wire:
                return f"{where}: index {index} is not after {detail} (indices must be strictly increasing)"
            return f"Delta holds page {index} more than once"
        if code == _PAGE_CHECK:
            return (f"{where}: page check mismatch (stored bytes of page {index} are corrupt)" if wire
                    else f"{where} is corrupt: page check mismatch")
        if code == _PAGE_ENCODING:
            return f"{where}: unknown encoding {detail}" if wire else f"{where} has unknown encoding {detail}"
        length = min(PAGE_SIZE, total_size - index * PAGE_SIZE)
        label = PageEncoding(int(self.encodings[k])).label if code != _PAGE_OFFSETS else ""
        if code == _PAGE_LENGTH:
            if wire:
                return f"{where}: stored length {detail} is impossible for a {label} page {index} of {length} bytes"
            return f"{where} has {detail} bytes, expected {length} ({label} page)" if label == "raw" else (
                f"{where} is corrupt: {detail} stored bytes cannot be a {label} page of {length} bytes")
        if code == _PAGE_RLE_CORRUPT:
            return f"{where}: compressed data is corrupt: RLE {_RLE_PROBLEMS.get(detail, detail)}" if wire else (
                f"{where} is corrupt: RLE {_RLE_PROBLEMS.get(detail, detail)}")
        if code == _PAGE_RLE_SIZE:
            if wire:
                return f"{where}: decompressed to {detail} bytes, page {index} is {length} bytes"
            return f"{where} has {detail} bytes, expected {length}"
        if code == _PAGE_XZR_CORRUPT:
            return f"{where}: XZR data is corrupt: {_XZR_PROBLEMS.get(detail, detail)}" if wire else (
                f"{where} is corrupt: XZR {_XZR_PROBLEMS.get(detail, detail)}")
        return f"{where}: stored bytes lie outside the payload"

    def _run(
        self,
        total_size: int,
        allowed: int,
        error: Type[CellError],
        wire: bool,
        base: Optional[memoryview] = None,
        out: Optional[_U8] = None,
    ) -> None:
        """Check (and decode into ``out``) every page, on the kernel's threads when big."""
        n = len(self)
        threads = 1 if n * PAGE_SIZE < _SPLIT_MIN_BYTES else max_threads()
        code, k, detail = kernels.check_pages(
            self.payload, self.offsets, self.encodings, self.indices, total_size, PAGE_SIZE, allowed, -1, base, out,
            self._checks if wire else None, threads,
        )
        if code:
            raise error(self._describe(code, k, detail, total_size, wire=wire))

    def check(self, total_size: int, allowed: int = ALLOW_ALL, *, wire: bool = True) -> None:
        """Validate every page of a ``total_size``-byte state without decoding any:
        indices in range and strictly increasing, the per-page checks (when the batch has
        them, as one read from the wire does), encodings in ``allowed``, stored lengths,
        RLE and XZR streams. Raises ``CorruptDataError`` naming the page."""
        self._run(total_size, allowed, CorruptDataError, wire)

    def decode(
        self, base: BufferLike, total_size: int, allowed: int = ALLOW_ALL, *, error: Type[CellError] = InvalidStateError
    ) -> "DecodedPages":
        """Every page's raw bytes, in one buffer: XZR pages over ``base``'s pages (zeros past
        its end). Indices must be strictly increasing (see :meth:`sorted_unique`); any
        invalid page raises ``error`` naming it. ``base`` is only read."""
        out = np.empty(len(self) * PAGE_SIZE, dtype=np.uint8)
        self._run(total_size, allowed, error, False, as_bytes_view(base, "base"), out)
        return DecodedPages(self.indices, out, total_size)

    # -- framing for streams ------------------------------------------------------------------

    def pack(self) -> bytes:
        """The batch as bytes: u32 count n, u32 payload size, then indices (u64 LE x n),
        stored lengths (u32 LE x n), per-page checks (u32 LE x n), encodings (u8 x n) and
        the payload."""
        n = len(self)
        return b"".join(
            (
                _PACK_HEAD.pack(n, self.payload_size),
                self.indices.astype("<u8").tobytes(),
                self.stored_lengths().astype("<u4").tobytes(),
                self.checks.astype("<u4").tobytes(),
                self.encodings.astype(np.uint8).tobytes(),
                bytes(self.payload[: self.payload_size]) if not isinstance(self.payload, bytes) else self.payload,
            )
        )

    @classmethod
    def unpack(cls, data: BufferLike) -> "PageBatch":
        """Inverse of :meth:`pack` (structure only: :meth:`check` or :meth:`decode` the
        result). Malformed framing raises ``CorruptDataError``."""
        view = as_bytes_view(data, "batch")
        if view.nbytes < _PACK_HEAD.size:
            raise CorruptDataError(f"page batch truncated: {view.nbytes} bytes")
        n, size = _PACK_HEAD.unpack_from(view, 0)
        table = _PACK_HEAD.size + 17 * n
        if view.nbytes != table + size:
            raise CorruptDataError(f"page batch of {n} pages and {size} payload bytes cannot be {view.nbytes} bytes")
        idx = np.frombuffer(view, dtype="<u8", count=n, offset=_PACK_HEAD.size)
        if n and int(idx.max()) >= 1 << 63:
            raise CorruptDataError("page batch: page index out of range")
        lengths = np.frombuffer(view, dtype="<u4", count=n, offset=_PACK_HEAD.size + 8 * n).astype(np.int64)
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        if offsets[-1] != size:
            raise CorruptDataError(f"page batch: stored lengths add up to {int(offsets[-1])}, not {size}")
        checks = np.frombuffer(view, dtype="<u4", count=n, offset=_PACK_HEAD.size + 12 * n).astype(np.uint32)
        encodings = np.frombuffer(view, dtype=np.uint8, count=n, offset=_PACK_HEAD.size + 16 * n).copy()
        return cls(idx.astype(np.int64), encodings, offsets, bytes(view[table:]), checks)


class DecodedPages:
    """Raw pages of a batch in one buffer: page k (index ``indices[k]``) is
    ``buffer[k * 4096 : k * 4096 + length(k)]`` (only the state's last page is short)."""

    __slots__ = ("indices", "buffer", "total_size")

    def __init__(self, indices: _I64, buffer: _U8, total_size: int) -> None:
        self.indices = indices
        self.buffer = buffer
        self.total_size = total_size

    def __len__(self) -> int:
        return len(self.indices)

    def views(self) -> Sequence[memoryview]:
        """One read-only view per page, of its exact length (with the compiled kernels, the
        rows of the decoded buffer: no Python object per page until one is indexed)."""
        n = len(self.indices)
        last = min(PAGE_SIZE, self.total_size - int(self.indices[-1]) * PAGE_SIZE) if n else PAGE_SIZE
        rows = getattr(kernels, "PageRows", None)
        if rows is not None:
            return cast(Sequence[memoryview], rows([(self.buffer, n)] if n else [], PAGE_SIZE, last))
        mv = memoryview(self.buffer.data).toreadonly()  # type: ignore[arg-type,unused-ignore]
        views = [mv[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] for k in range(n)]
        if n and last < PAGE_SIZE:
            views[-1] = views[-1][:last]
        return views

    def write_into(self, target: BufferLike) -> None:
        """Scatter the pages into ``target`` (writable, at least ``total_size`` bytes)."""
        kernels.scatter_pages(target, self.indices, self.views(), PAGE_SIZE)


def _is_page_rows(obj: Any) -> bool:
    """Whether ``obj`` is the compiled kernels' ``PageRows`` (a create pass's page copies)."""
    rows = getattr(kernels, "PageRows", None)
    return rows is not None and isinstance(obj, rows)


def encode_batch(
    base: BufferLike, new: Any, indices: Any, allowed: int = ALLOW_ALL, xzr_hints: Optional[_U16] = None
) -> PageBatch:
    """Encode pages ``indices`` (ascending) of the new state against the same pages of
    ``base`` (any length: zeros past its end), each as the smallest encoding in ``allowed``.

    ``new`` is the new state (a buffer) or the pages themselves (a list of buffers,
    ``new[k]`` being page ``indices[k]``: what a scan copied; ``xzr_hints`` then the
    scan's :attr:`~cellmigrate._passes.Scan.xzr_hints`, which spare re-reading the base
    pages of pages that XZR cannot shrink). One kernel call (big batches on the kernel's
    threads); raises ``IndexError`` for an index outside the state and
    ``ValueError`` for a page of an impossible length.
    """
    base_view = as_bytes_view(base, "base")
    idx = np.ascontiguousarray(indices, dtype=np.int64).reshape(-1)
    # Big batches are encoded on the kernel's own threads, into one payload (no parts to
    # join: fresh memory costs a VM a host fault a page).
    threads = 1 if len(idx) * PAGE_SIZE < _SPLIT_MIN_BYTES else max_threads()
    if isinstance(new, (list, tuple)) or _is_page_rows(new):
        enc, off, chk, payload = kernels.encode_page_list(base_view, new, idx, PAGE_SIZE, allowed, xzr_hints, threads)
    else:
        enc, off, chk, payload = kernels.encode_pages(base_view, as_bytes_view(new, "new"), idx, PAGE_SIZE, allowed,
                                                      threads)
    return PageBatch(idx, enc, off, payload, chk)


# --------------------------------------------------------------------------------------
# choosing the encodings and the payload compression
# --------------------------------------------------------------------------------------

#: The ``compress`` choices of ``DeltaSnapshot.create`` and ``cellmigrate diff --compress``.
COMPRESS_CHOICES = ("auto", "none", "rle", "xor", "zstd", "zstd:LEVEL")
#: zstd level when none is named.
ZSTD_LEVEL = 3
#: zstd level ``auto`` tries: on XOR pages level 1 was both faster and smaller than 3
#: (512 MiB heap workload: 0.35 s / 4,790,633 bytes vs 0.47 s / 4,859,332 bytes).
AUTO_ZSTD_LEVEL = 1
#: ``auto`` tries zstd on the whole payload up to this size; above it, on a sample first.
_ZSTD_TRY_WHOLE = 1 << 20
#: The sample: this many windows of this size, spread evenly over the payload.
_ZSTD_SAMPLE_WINDOWS = 16
_ZSTD_SAMPLE_WINDOW = 64 << 10
#: A sample must shrink to this fraction for the whole payload to be compressed.
_ZSTD_SAMPLE_GAIN = 0.9
#: From this payload size up, zstd compresses with every thread of the pool.
_ZSTD_THREADS_MIN = 8 << 20
#: Input bytes of one multi-threaded zstd job (zstd's memory grows with it).
_ZSTD_JOB = 512 << 10
#: Most zstd worker threads.
_ZSTD_MAX_THREADS = 4


def parse_compress(text: str, *, digest: bool) -> Tuple[int, Optional[int], bool]:
    """``(allowed page encodings, zstd level or None, auto)`` for a ``compress`` choice.

    ``digest``: whether the delta has a strong digest. Without one, "auto" keeps the
    crate's encodings (RLE or raw, byte-compatible with it, no zstd) and "xor" is refused:
    an XZR page needs the base, and only a strong digest proves the base was the right one.
    Raises ``ValueError`` for an unknown choice or a zstd level outside 1..22.
    """
    if not isinstance(text, str):
        raise TypeError(f"compress must be a str, not {type(text).__name__}")
    choice, colon, level_text = text.partition(":")
    if colon and (choice != "zstd" or not level_text):  # 'zstd:' and 'auto:' were taken as plain choices
        raise ValueError(f"compress {text!r} is not one of {', '.join(COMPRESS_CHOICES)} (LEVEL: 1..22)")
    if choice == "auto" and not level_text:
        return (ALLOW_ALL, AUTO_ZSTD_LEVEL, True) if digest else (ALLOW_CRATE, None, False)
    if choice == "none" and not level_text:
        return ALLOW_RAW, None, False
    if choice == "rle" and not level_text:
        return ALLOW_CRATE, None, False
    if choice == "xor" and not level_text:
        if not digest:
            raise ValueError("compress='xor' needs a strong digest (XZR pages are only valid on a proven base)")
        return ALLOW_ALL, None, False
    if choice == "zstd":
        level = ZSTD_LEVEL
        if level_text:
            try:
                level = int(level_text)
            except ValueError:
                raise ValueError(f"zstd level {level_text!r} is not an integer") from None
            if not 1 <= level <= 22:
                raise ValueError(f"zstd level {level} is outside 1..22")
        return (ALLOW_ALL if digest else ALLOW_CRATE), level, False
    raise ValueError(f"compress {text!r} is not one of {', '.join(COMPRESS_CHOICES)}")


#: zstd is fed a payload in pieces of this many bytes, from memory and from a file alike:
#: its output depends on how the input is split, so one split gives one frame whichever
#: path made it (``DeltaSnapshot.serialize`` and the CLI's streaming writer agree).
ZSTD_FEED = 1 << 20


def _zstd_job_size(size: int) -> int:
    """The multi-threaded job size for a ``size``-byte payload: 512 KiB, or a few pages
    more when that divides ``size``. Why: a payload of whole jobs fills its last job
    before the end of the stream is announced, and zstd then starts that job at once
    or at the end, as its workers allow; started at once, the frame ends with an empty
    block. The same payload compressed to frames 3 bytes apart (1 GiB of random pages:
    2 of 5 runs). A last job that is not full waits for the end: one frame, always."""
    job = _ZSTD_JOB
    while size % job == 0:
        job += 4096
    return job


def zstd_frame_pieces(payload: BufferLike, level: int, emit: Callable[[bytes], object]) -> int:
    """Compress ``payload`` into one zstd frame (content size recorded, multi-threaded
    when big), handing the frame to ``emit`` piece by piece; returns the frame's length.

    Holds no more than zstd's own buffers: the payload may be a memory-mapped file of
    any size and ``emit`` may write to another file.
    """
    import zstandard

    view = as_bytes_view(payload, "payload")
    size = view.nbytes
    # At most 4 workers: zstd's buffers grow with each (the CLI's memory bound holds on
    # any machine), and its multi-threaded frame does not depend on how many there are.
    threads = min(max_threads(), _ZSTD_MAX_THREADS) if size >= _ZSTD_THREADS_MIN and max_threads() > 1 else 0
    # Jobs of 512 KiB: zstd's default (4 windows, 8 MiB at level 3) kept 123 MiB of buffers
    # for 2 threads on 256 MiB, 1 MiB jobs 15 MiB, 512 KiB jobs 8 MiB, as fast (random pages).
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=size, threads=threads, job_size=_zstd_job_size(size) if threads else 0
    )
    frame = zstandard.ZstdCompressor(compression_params=params).compressobj(size=size)
    written = 0
    for start in range(0, size, ZSTD_FEED):
        piece = frame.compress(view[start : start + ZSTD_FEED])
        if piece:
            emit(piece)
            written += len(piece)
    tail = frame.flush()
    emit(tail)
    return written + len(tail)


def zstd_payload(payload: BufferLike, level: int) -> bytes:
    """One zstd frame of ``payload`` (content size recorded), multi-threaded when big."""
    pieces: List[bytes] = []
    zstd_frame_pieces(payload, level, pieces.append)
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def zstd_sample_rejects(payload: BufferLike, level: int) -> bool:
    """``auto``'s first look: True when a payload over 1 MiB does not shrink to 90% on a
    1 MiB sample (16 windows of 64 KiB spread evenly over it): then it goes uncompressed
    and an incompressible payload costs a millisecond, not a pass. Every fourth window is
    compressed first: when those do not shrink at all (random pages), the rest is not
    tried. An empty payload is rejected; up to 1 MiB the whole payload is tried instead
    (False)."""
    view = as_bytes_view(payload, "payload")
    size = view.nbytes
    if size == 0:
        return True
    if size <= _ZSTD_TRY_WHOLE:
        return False
    step = size // _ZSTD_SAMPLE_WINDOWS
    first = b"".join(view[k * step : k * step + _ZSTD_SAMPLE_WINDOW] for k in range(0, _ZSTD_SAMPLE_WINDOWS, 4))
    packed = len(zstd_payload(first, level))
    if packed >= len(first):
        return True
    rest = b"".join(
        view[k * step : k * step + _ZSTD_SAMPLE_WINDOW] for k in range(_ZSTD_SAMPLE_WINDOWS) if k % 4
    )
    return packed + len(zstd_payload(rest, level)) > _ZSTD_SAMPLE_GAIN * (len(first) + len(rest))


def choose_compression(batch: PageBatch, level: Optional[int], auto: bool) -> Tuple[str, Optional[bytes]]:
    """``("zstd", frame)`` or ``("none", None)``: whether the batch's payload goes as one
    zstd frame. Forced when ``level`` is given and not ``auto``; with ``auto``, only when
    the frame is strictly smaller (payloads over 1 MiB are tried on a 1 MiB sample first,
    so an incompressible payload costs a millisecond, not a pass)."""
    if level is None:
        return "none", None
    size = batch.payload_size
    view = memoryview(batch.payload)[:size] if not isinstance(batch.payload, bytes) or len(batch.payload) != size else batch.payload
    if auto and zstd_sample_rejects(view, level):
        return "none", None
    frame = zstd_payload(view, level)
    if auto and len(frame) >= size:
        return "none", None
    return "zstd", frame


# --------------------------------------------------------------------------------------
# PageStore: how a DeltaSnapshot holds its pages
# --------------------------------------------------------------------------------------


class PageStore:
    """A delta's pages: the encoded :class:`PageBatch` that is shipped and applied, and
    the public ``dirty_pages`` list, built only when asked for.

    A delta made by ``create`` also keeps the raw pages its scan copied, so its public
    list shows every page as the crate would (RLE when strictly smaller, else raw: each
    ``get_data()`` works without a base), while the batch it ships may hold zero and XZR
    pages. A delta read from the wire lists its pages as stored. Once the list has been
    handed out, the batch is used only while the list is exactly as handed out (same page
    objects, same data objects, same encodings, same order); any change, and ``apply`` /
    ``serialize`` use the list's current pages (SPEC §4).
    """

    __slots__ = ("_batch", "_raw", "_pages", "_handed")

    def __init__(self, value: Any, raw: Optional[List[bytes]] = None) -> None:
        self._batch: Optional[PageBatch] = None
        self._raw: Optional[List[bytes]] = None
        self._pages: Optional[List[DirtyPage]] = None
        self._handed: Optional[List[Tuple[Any, Any, Any, Any]]] = None
        if isinstance(value, PageBatch):
            self._batch, self._raw = value, raw
        else:
            self._pages = value if isinstance(value, list) else list(value)

    def listed(self) -> List[DirtyPage]:
        """The public list (built from the batch, or the raw pages, the first time)."""
        if self._pages is None:
            batch = self._batch
            assert batch is not None
            if self._raw is not None:
                # The crate's view: RLE when strictly smaller, else raw; one kernel call.
                enc, off, chk, payload = kernels.encode_page_list(b"", self._raw, batch.indices, PAGE_SIZE, ALLOW_CRATE)
                pages = PageBatch(batch.indices, enc, off, payload, chk).pages()
            else:
                pages = batch.pages()
            self._pages = pages
            self._handed = [(p, p.index, p.data, p._encoding) for p in pages]
        return self._pages

    def pristine(self) -> bool:
        """Whether the batch still describes the pages (the list, if handed out, is untouched)."""
        if self._batch is None:
            return False
        if self._pages is None:
            return True
        handed = self._handed
        pages = self._pages
        return handed is not None and len(pages) == len(handed) and all(
            p is q and p.index == i and p.data is d and p._encoding is e for p, (q, i, d, e) in zip(pages, handed)
        )

    def batch(self, error: Optional[Type[Exception]] = InvalidStateError) -> PageBatch:
        """The pages as one batch: the held one while pristine, else one made from the list
        (what cannot be a page raises ``error`` naming it; ``None``: the ``TypeError`` or
        ``ValueError`` of :meth:`PageBatch.from_pages`)."""
        if self.pristine():
            assert self._batch is not None
            return self._batch
        try:
            return PageBatch.from_pages(self.listed())
        except (TypeError, ValueError) as exc:
            if error is None:
                raise
            raise error(str(exc)) from None

    def raw_pages(self) -> Optional[Tuple[_I64, List[bytes]]]:
        """``(indices, raw pages)`` as the scan copied them, while pristine (a delta made by
        ``create``): applying them needs no decoding and no base, and applying twice
        writes the same bytes twice."""
        if self._raw is None or not self.pristine():
            return None
        assert self._batch is not None
        return self._batch.indices, self._raw

    def current_batch(self) -> Optional[PageBatch]:
        """The held batch while pristine, else ``None`` (no per-page work)."""
        return self._batch if self.pristine() else None

    def count(self) -> int:
        batch = self.current_batch()
        return len(batch) if batch is not None else len(self.listed())

    def stored_size(self) -> int:
        """Bytes of page data as the pages ship (the batch's payload)."""
        batch = self.current_batch()
        return batch.payload_size if batch is not None else sum(len(p.data) for p in self.listed())

    def listed_size(self) -> int:
        """Sum of ``len(p.data)`` over the public list, without building it when possible."""
        if self._pages is None and self._raw is not None and self._batch is not None:
            _, off, _, _ = kernels.encode_page_list(b"", self._raw, self._batch.indices, PAGE_SIZE, ALLOW_CRATE)
            return int(off[-1])
        if self._pages is None and self._batch is not None:
            return self._batch.payload_size
        return sum(len(p.data) for p in self.listed())

    def same_pages(self, other: "PageStore") -> bool:
        """Equality of the pages: batches compared as arrays when both are pristine."""
        a, b = self.current_batch(), other.current_batch()
        if a is not None and b is not None:
            return (
                bool(np.array_equal(a.indices, b.indices))
                and bool(np.array_equal(a.encodings, b.encodings))
                and bool(np.array_equal(a.offsets, b.offsets))
                and memoryview(a.payload)[: a.payload_size] == memoryview(b.payload)[: b.payload_size]
            )
        if a is not None or b is not None:
            try:
                return PageStore(self.batch(None)).same_pages(PageStore(other.batch(None)))
            except (TypeError, ValueError):
                return False
        return self.listed() == other.listed()
