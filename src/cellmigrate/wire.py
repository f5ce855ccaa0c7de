"""The self-checking binary wire format of :class:`~cellmigrate.delta.DeltaSnapshot`.

Semi-private: users call ``DeltaSnapshot.serialize()`` / ``write_to()`` /
``deserialize()``, which delegate to :func:`encode_delta` / :func:`write_delta` /
:func:`decode_delta` here. The layout is documented byte by byte in ``docs/FORMAT.md``;
this module is its only implementation. It writes version 2 and reads versions 1 and 2.

Design rules, all enforced by :func:`decode_delta`:

* The input is hostile. Every length, count, index and flag is checked against the bytes
  actually present *before* anything is allocated from it, so memory use is bounded by
  the input size (the page table; a copy of the payload only when it is zstd-compressed
  or the input is writable) and a declared ``total_size`` is never allocated here at
  all; it is itself bounded by ``max_total_size``.
* Every failure raises :class:`~cellmigrate.errors.CorruptDataError` whose message names
  the field ("bad magic", "page 3: index 99 out of range ...").
* The page table and the payload are checked without a per-page Python loop: numpy reads
  the table's columns, one kernel call checks every page's stored bytes.
* The whole-payload check is an XXH3-128 hash: it catches corruption in transit, it does
  **not** authenticate. Authentication is the keyed BLAKE3 MAC, which in version 2 covers
  every header field (the header digest, :func:`header_digest`), checked by
  ``DeltaSnapshot.apply``. A keyed version-1 delta (whose header is not under its MAC) is
  refused unless the caller opts in with ``allow_legacy_keyed=True``.

:func:`encode_delta` writes what the delta holds (a delta tampered with in memory is
written as is and refused by the reader); it only refuses what the fixed-width fields
cannot represent.
"""

from __future__ import annotations

import errno
import io
import operator
import os
import struct
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple, Union

import blake3 as _blake3
import numpy as np
import xxhash as _xxhash
import zstandard as _zstd

from ._backend import kernels
from ._buffers import as_bytes_view
from ._pages import ALLOW_ALL, ALLOW_XZR, DirtyPage, PageBatch, PageEncoding, zstd_payload
from ._types import BufferLike
from .checksum import DIGEST_SIZES, PAGE_SIZE
from .compression import simple_decompress
from .errors import CorruptDataError, DeclaredSizeError, LegacyKeyedError


class PageLike(Protocol):
    """What the encoder reads from a dirty page (``DirtyPage``); read-only, so any class fits."""

    @property
    def index(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def compressed(self) -> bool: ...


class DeltaLike(Protocol):
    """What the encoder reads from a delta (the attributes of ``DeltaSnapshot``).

    Version-2 attributes it reads when present: ``base_size`` (default: ``total_size``),
    ``header_digest``, ``compression`` ("none" or "zstd"), ``wire_version`` (default 2),
    and the method ``_page_batch()`` (the pages as one :class:`PageBatch`, else
    ``dirty_pages`` is read page by page).
    """

    @property
    def agent_id(self) -> bytes: ...
    @property
    def sequence(self) -> int: ...
    @property
    def base_sequence(self) -> int: ...
    @property
    def dirty_pages(self) -> Sequence[PageLike]: ...
    @property
    def total_size(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def checksum(self) -> int: ...
    @property
    def digest_algorithm(self) -> Optional[str]: ...
    @property
    def digest(self) -> Optional[bytes]: ...
    @property
    def keyed(self) -> bool: ...


__all__ = [
    "MAGIC",
    "VERSION",
    "READABLE_VERSIONS",
    "DEFAULT_MAX_TOTAL_SIZE",
    "HEADER_SIZE",
    "HEADER_SIZE_V1",
    "PAGE_ENTRY_SIZE",
    "PAGE_ENTRY_SIZE_V1",
    "TRAILER_SIZE",
    "COMPRESSIONS",
    "encode_delta",
    "write_delta",
    "prepare_delta",
    "decode_delta",
    "header_digest",
    "pack_header",
    "pack_table",
    "wire_length_bound",
]

#: PNG-style signature: the high byte catches 7-bit channels, CR LF / LF catch newline
#: translation, 0x1A stops a DOS ``type``. "CMD" = cellmigrate delta.
MAGIC = b"\x89CMD\r\n\x1a\n"
#: The layout this module writes. Any change to the layout bumps it.
VERSION = 2
#: The layouts this module reads.
READABLE_VERSIONS = (1, 2)
#: Largest ``total_size`` (and ``base_size``) :func:`decode_delta` accepts unless told otherwise (64 GiB).
DEFAULT_MAX_TOTAL_SIZE = 64 << 30

# --- version 2 ------------------------------------------------------------------------
# Header: magic, version, digest algorithm id, flags, digest length D, payload compression,
# 2 reserved bytes, agent id, sequence, base_sequence, total_size, base_size, timestamp,
# checksum, page count, payload size on the wire, payload size decoded.
_HEADER = struct.Struct("<8sHBBBB2s16sQQQQQIIQQ")
HEADER_SIZE = _HEADER.size  # 96
# Page table (after the payload), four columns of N entries: index (u32), stored length
# (u16), per-page check (u32: the weighted checksum of the stored bytes), encoding (u8).
PAGE_ENTRY_SIZE = 11
# What the header digest covers, after the domain tag: algorithm id, flags, compression,
# agent id, sequence, base_sequence, total_size, base_size, timestamp, checksum; then the
# state digest. See docs/FORMAT.md, "Header digest".
_BINDING = struct.Struct("<BBB16sQQQQQI")
_BINDING_TAG = b"cellmigrate delta header v2\x00"

# --- version 1 ------------------------------------------------------------------------
# Header: magic, version, digest algorithm id, flags, digest length, 3 reserved bytes,
# agent id, sequence, base_sequence, total_size, timestamp, checksum, 4 reserved bytes,
# page count. Reserved bytes are read (not skipped with "x") so they can be required zero.
_HEADER_V1 = struct.Struct("<8sHBBB3s16sQQQQI4sQ")
HEADER_SIZE_V1 = _HEADER_V1.size  # 80
# Page table entry: index, stored length, encoding, 3 reserved bytes, xxh3_64 of the stored bytes.
_ENTRY_V1 = struct.Struct("<QIB3sQ")
PAGE_ENTRY_SIZE_V1 = _ENTRY_V1.size  # 24

# Trailer (both versions): the canonical XXH3-128 digest of every byte before it.
TRAILER_SIZE = 16

_U16_MAX = (1 << 16) - 1
_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1

# Digest algorithm ids and the digest length each one implies.
_ALG_NONE = 0
_ALG_IDS = {None: 0, "xxh3_128": 1, "blake3": 2, "xxh3_128_tree": 3}
_ALG_NAMES = {v: k for k, v in _ALG_IDS.items()}
_DIGEST_LENGTHS = {_ALG_NONE: 0, **{_ALG_IDS[name]: size for name, size in DIGEST_SIZES.items()}}

_FLAG_KEYED = 0x01
_KNOWN_FLAGS = _FLAG_KEYED

#: Whole-payload compression ids (version 2).
COMPRESSIONS = {"none": 0, "zstd": 1}
_COMPRESSION_NAMES = {v: k for k, v in COMPRESSIONS.items()}
#: zstd level written when the delta does not name one.
ZSTD_LEVEL = 3

# Page encodings of version 1. RLE is the crate's "simple" format (DirtyPage.compress()).
_ENC_RAW = 0
_ENC_RLE = 1
# An RLE stream turns every 3 input bytes into at least 1 output byte (a marker has a
# count of at least 1; a literal is 1 byte for 1), so a stream longer than 3 * L bytes
# cannot decode to L bytes: a sound bound, checked before decoding anything.
_RLE_MAX_EXPANSION = 3

_ZERO2 = b"\x00" * 2
_ZERO3 = b"\x00" * 3
_ZERO4 = b"\x00" * 4

#: Payload bytes written (and hashed) per step by the streaming writer.
_WRITE_CHUNK = 8 << 20


# --------------------------------------------------------------------------------------
# helpers


def _page_length(index: int, total_size: int) -> int:
    """Length of page ``index`` in a state of ``total_size`` bytes (the last may be short)."""
    return min(PAGE_SIZE, total_size - index * PAGE_SIZE)


def _max_pages(total_size: int) -> int:
    """Number of pages of a ``total_size``-byte state (ceiling division)."""
    return -(-total_size // PAGE_SIZE)


def _page_check(stored: Union[bytes, memoryview]) -> int:
    """Version-1 per-page check: XXH3-64 of the stored (possibly compressed) bytes."""
    return int(_xxhash.xxh3_64_intdigest(stored))


def _int_field(name: str, value: Any, maximum: int) -> int:
    """``value`` as an int in ``[0, maximum]`` or a ``ValueError``/``TypeError`` naming the field."""
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if not 0 <= number <= maximum:
        raise ValueError(f"{name} {number} does not fit the wire format (0..{maximum})")
    return number


def _agent_bytes(agent_id: Any) -> bytes:
    if hasattr(agent_id, "bytes") and not isinstance(agent_id, (bytes, bytearray, memoryview)):
        agent_id = agent_id.bytes  # a uuid.UUID
    raw = bytes(agent_id)
    if len(raw) != 16:
        raise ValueError(f"agent_id must be 16 bytes, got {len(raw)}")
    return raw


def _algorithm_id(algorithm: Optional[str]) -> int:
    if algorithm not in _ALG_IDS:
        raise ValueError(f"digest_algorithm {algorithm!r} is not one of {sorted(k for k in _ALG_IDS if k)}")
    return _ALG_IDS[algorithm]


def _compression_id(name: Any) -> int:
    if name not in COMPRESSIONS:
        raise ValueError(f"compression {name!r} is not one of {sorted(COMPRESSIONS)}")
    return COMPRESSIONS[name]


# --------------------------------------------------------------------------------------
# the header digest (version 2): every header field under the digest / MAC


def _identity_fields(
    agent_id: Any, sequence: int, base_sequence: int, total_size: int, base_size: int, timestamp: int, checksum: int
) -> Tuple[Any, ...]:
    """The delta's identity fields, checked for their widths, in the order both the header
    and the header digest's binding carry them (agent id .. checksum)."""
    return (
        _agent_bytes(agent_id),
        _int_field("sequence", sequence, _U64_MAX),
        _int_field("base_sequence", base_sequence, _U64_MAX),
        _int_field("total_size", total_size, _U64_MAX),
        _int_field("base_size", base_size, _U64_MAX),
        _int_field("timestamp", timestamp, _U64_MAX),
        _int_field("checksum", checksum, _U32_MAX),
    )


def header_digest(
    *,
    algorithm: Optional[str],
    keyed: bool,
    compression: str,
    agent_id: Any,
    sequence: int,
    base_sequence: int,
    total_size: int,
    base_size: int,
    timestamp: int,
    checksum: int,
    state_digest: bytes,
    key: Optional[bytes] = None,
) -> bytes:
    """The version-2 header digest: the delta's algorithm over its header fields and the
    state digest (docs/FORMAT.md, "Header digest").

    ``H(tag || alg || flags || compression || agent id || sequence || base sequence ||
    total size || base size || timestamp || checksum || state digest)``, ``H`` being
    XXH3-128 for ``xxh3_128`` and ``xxh3_128_tree``, BLAKE3 for ``blake3`` and BLAKE3
    keyed with ``key`` for a keyed delta (then it is a MAC of every field). The state
    digest is computed as before (in parallel for the tree digest); this is one small
    hash more.
    """
    if algorithm is None:
        raise ValueError("a checksum-only delta has no header digest")
    alg_id = _algorithm_id(algorithm)
    binding = _BINDING_TAG + _BINDING.pack(
        alg_id,
        _FLAG_KEYED if keyed else 0,
        _compression_id(compression),
        *_identity_fields(agent_id, sequence, base_sequence, total_size, base_size, timestamp, checksum),
    ) + bytes(state_digest)
    if algorithm == "blake3":
        if keyed:
            if key is None:
                raise ValueError("a keyed header digest needs the key")
            return bytes(_blake3.blake3(binding, key=key).digest())
        return bytes(_blake3.blake3(binding).digest())
    if keyed:
        raise ValueError(f"{algorithm} cannot be keyed")
    return bytes(_xxhash.xxh3_128_digest(binding))


def pack_header(
    *,
    algorithm: Optional[str],
    keyed: bool,
    digest_length: int,
    compression: str,
    agent_id: Any,
    sequence: int,
    base_sequence: int,
    total_size: int,
    base_size: int,
    timestamp: int,
    checksum: int,
    page_count: int,
    payload_wire: int,
    payload_size: int,
) -> bytes:
    """The 96-byte version-2 header (docs/FORMAT.md, "Header"); ``ValueError`` /
    ``TypeError`` naming a field its width cannot hold. The state digest and the header
    digest (``digest_length`` bytes each) follow it."""
    return _HEADER.pack(
        MAGIC,
        VERSION,
        _algorithm_id(algorithm),
        _FLAG_KEYED if keyed else 0,
        _int_field("digest length", digest_length, 255),
        _compression_id(compression),
        _ZERO2,
        *_identity_fields(agent_id, sequence, base_sequence, total_size, base_size, timestamp, checksum),
        _int_field("page count", page_count, _U32_MAX),
        _int_field("payload size", payload_wire, _U64_MAX),
        _int_field("payload size", payload_size, _U64_MAX),
    )


def pack_table(indices: Any, lengths: Any, checks: Any, encodings: Any) -> bytes:
    """The version-2 page table: four columns of N entries (u32 indices, u16 stored
    lengths, u32 page checks, u8 encodings); ``ValueError`` for an index or a stored
    length its column cannot hold."""
    indices = np.asarray(indices)
    lengths = np.asarray(lengths)
    if len(indices):
        if int(indices.min()) < 0 or int(indices.max()) > _U32_MAX:
            k = int(np.flatnonzero((indices < 0) | (indices > _U32_MAX))[0])
            raise ValueError(f"page {k}: index {int(indices[k])} does not fit the 4-byte index field")
        if int(lengths.max()) > _U16_MAX:
            k = int(np.argmax(lengths > _U16_MAX))
            raise ValueError(f"page {k}: {int(lengths[k])} stored bytes do not fit the 2-byte length field")
    return b"".join((
        indices.astype("<u4").tobytes(),
        lengths.astype("<u2").tobytes(),
        np.asarray(checks).astype("<u4").tobytes(),
        np.asarray(encodings).astype(np.uint8).tobytes(),
    ))


# --------------------------------------------------------------------------------------
# encoding (version 2)


def _batch_of(delta: DeltaLike) -> PageBatch:
    """The delta's pages as one batch (no per-page work when the delta holds one)."""
    batch = getattr(delta, "_page_batch", None)
    if callable(batch):
        got = batch(None)
        if isinstance(got, PageBatch):
            return got
    return PageBatch.from_pages(list(delta.dirty_pages))


class _Prepared:
    """Everything a version-2 writer needs, validated, before a byte is written."""

    def __init__(self, delta: DeltaLike, zstd_level: Optional[int]) -> None:
        total_size = _int_field("total_size", delta.total_size, _U64_MAX)
        base_size = getattr(delta, "base_size", None)
        base_size = total_size if base_size is None else _int_field("base_size", base_size, _U64_MAX)
        _algorithm_id(delta.digest_algorithm)  # an unknown algorithm is refused before anything else
        digest = b"" if delta.digest is None else bytes(delta.digest)
        if len(digest) > 255:
            raise ValueError(f"digest of {len(digest)} bytes does not fit the 1-byte digest length field")
        bound = getattr(delta, "header_digest", None)
        # A delta without a header digest (built by hand) is written with zeros there: the
        # reader takes it, and apply refuses it (its header is not under its digest).
        # Written at the digest's length (the layout has one length for both): a tampered
        # digest length is then refused by the reader, as the faithful writer promises.
        bound = bytes(len(digest)) if bound is None else bytes(bound)[: len(digest)].ljust(len(digest), b"\0")
        compression = getattr(delta, "compression", "none")
        comp_id = _compression_id(compression)
        self.batch = batch = _batch_of(delta)
        count = len(batch)
        if count > _U32_MAX:
            raise ValueError(f"{count} pages do not fit the 4-byte page count")
        if count and int(batch.encodings.max()) > 255:  # pragma: no cover - uint8 array
            raise ValueError("page encoding does not fit")
        self.table = pack_table(batch.indices, batch.stored_lengths(), batch.checks, batch.encodings)
        payload: Union[bytes, memoryview] = batch.payload
        size = batch.payload_size
        if len(payload) != size:
            payload = memoryview(payload)[:size]
        if comp_id:
            # The frame create chose or the reader read, for these very pages; else make one.
            frame = batch.frame
            level = ZSTD_LEVEL if zstd_level is None else zstd_level
            payload = as_bytes_view(frame) if frame is not None else zstd_payload(payload, level)
        self.payload = payload
        self.header = pack_header(
            algorithm=delta.digest_algorithm,
            keyed=delta.keyed,
            digest_length=len(digest),
            compression=compression,
            agent_id=delta.agent_id,
            sequence=delta.sequence,
            base_sequence=delta.base_sequence,
            total_size=total_size,
            base_size=base_size,
            timestamp=delta.timestamp,
            checksum=delta.checksum,
            page_count=count,
            payload_wire=len(payload),
            payload_size=size,
        )
        self.digests = digest + bound

    def parts(self) -> List[Any]:
        return [self.header, self.digests, self.payload, self.table]

    @property
    def size(self) -> int:
        """Bytes the delta takes on the wire (trailer included)."""
        return sum(len(p) for p in self.parts()) + TRAILER_SIZE

    def write(self, fileobj: Any, chunk: int = _WRITE_CHUNK) -> int:
        """Write the delta to ``fileobj`` (anything with ``write``) in pieces of at most
        ``chunk`` bytes, hashing as it goes; returns the bytes written."""
        hasher = _xxhash.xxh3_128()
        written = 0
        for part in self.parts():
            view = part if isinstance(part, memoryview) else memoryview(part)
            for start in range(0, view.nbytes, chunk):
                piece = view[start : start + chunk]
                hasher.update(piece)
                write_all(fileobj, piece)
                written += piece.nbytes
        write_all(fileobj, memoryview(hasher.digest()))
        return written + TRAILER_SIZE


def write_all(fileobj: Any, data: memoryview) -> None:
    """``fileobj.write(data)``, all of it.

    A raw file object (``io.RawIOBase``: an unbuffered file, ``socket.makefile('wb',
    buffering=0)``) may take part of what it is given and return how much: the rest is
    written again (ignoring the count lost the delta's middle while the full count was
    reported). It returns ``None`` when it would block (non-blocking): that raises
    ``BlockingIOError``, as nothing can tell what it took; so does a raw write that takes
    no bytes (``OSError``). Any other object is trusted to take everything, whatever it
    returns: a buffered file's ``write`` does by contract, and a duck-typed writer's return
    may mean something else (a ``zstandard`` stream writer returns what it emitted).
    """
    if not isinstance(fileobj, io.RawIOBase):
        fileobj.write(data)
        return
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    while view.nbytes:
        n = fileobj.write(view)
        if n is None:
            raise BlockingIOError(errno.EAGAIN, "the file object would block (non-blocking): "
                                                "pass a blocking or buffered one")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise TypeError(f"{type(fileobj).__name__}.write returned {n!r}, not a byte count")
        if n == 0:
            raise OSError(errno.EIO, f"{type(fileobj).__name__}.write took no bytes")
        view = view[n:]


def _zstd_level_of(delta: DeltaLike) -> Optional[int]:
    level = getattr(delta, "compression_level", None)
    return None if level is None else int(level)


def encode_delta(delta: DeltaLike) -> bytes:
    """Serialize ``delta`` (any object with the ``DeltaSnapshot`` attributes) to bytes.

    Writes version 2, or version 1 when ``delta.wire_version == 1`` (a delta read from a
    version-1 input re-encodes to exactly its input). The writer is faithful, not a
    validator: it writes whatever the delta holds as long as the fixed-width fields can
    represent it, so a delta tampered with in memory (page out of range, unsorted, wrong
    length, bad RLE/XZR data, mismatched digest length) still serializes and is then
    refused by :func:`decode_delta` on the receiving side, with a message naming the field.

    Raises ``ValueError`` / ``TypeError`` naming the field only for what the format cannot
    represent: an agent id that is not 16 bytes, a negative integer or one wider than its
    field (a page index over 2**32 - 1, stored page data over 65,535 bytes), an unknown
    digest algorithm or compression, a digest over 255 bytes, page data that is not a buffer.
    """
    version = getattr(delta, "wire_version", VERSION)
    if version == 1:
        return _encode_v1(delta)
    if version != VERSION:
        raise ValueError(f"wire_version {version!r} cannot be written (this writer knows 1 and {VERSION})")
    parts = _Prepared(delta, _zstd_level_of(delta)).parts()
    # Hash part by part, then join once: a single copy of the payload in memory.
    hasher = _xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    parts.append(hasher.digest())
    return bytes(kernels.join_buffers(parts))


def prepare_delta(delta: DeltaLike) -> "_Prepared":
    """Everything :func:`write_delta` writes, validated, without writing it: ``.size`` (the
    bytes on the wire, e.g. to reserve them) and ``.write(fileobj)``. Version 2 only."""
    if getattr(delta, "wire_version", VERSION) != VERSION:
        raise ValueError("prepare_delta writes version 2 only (encode_delta writes version 1)")
    return _Prepared(delta, _zstd_level_of(delta))


def write_delta(delta: DeltaLike, fileobj: IO[bytes], *, chunk: int = _WRITE_CHUNK) -> int:
    """Write ``delta`` to the binary file object ``fileobj`` (the bytes of
    :func:`encode_delta`) in pieces of at most ``chunk`` bytes; returns the bytes written.

    The payload is written from the delta's own buffer, view by view: beyond the delta's
    pages, only the page table (11 bytes a page) and, for a zstd payload, its frame are
    held, never the whole serialized delta. ``fileobj`` only needs ``write`` (a file, a
    pipe, a socket file). A failing ``write`` propagates; what was written is then a
    prefix that any reader refuses (the trailer is missing or wrong).
    """
    if getattr(delta, "wire_version", VERSION) == 1:
        data = _encode_v1(delta)
        write_all(fileobj, memoryview(data))
        return len(data)
    return _Prepared(delta, _zstd_level_of(delta)).write(fileobj, chunk)


# --------------------------------------------------------------------------------------
# decoding


def decode_delta(
    data: BufferLike,
    *,
    max_total_size: int = DEFAULT_MAX_TOTAL_SIZE,
    allow_legacy_keyed: bool = False,
    spool_zstd: bool = False,
) -> Dict[str, Any]:
    """Parse and fully validate a serialized delta; return the ``DeltaSnapshot`` keyword fields.

    ``data`` is any C-contiguous buffer, read in place. A read-only buffer (``bytes``, a
    read-only memoryview, an ``mmap`` opened for reading) is held zero-copy: the returned
    pages are views into it; a writable one is copied, so later writes to it cannot change
    the delta. ``max_total_size`` bounds the declared state and base sizes (default 64 GiB).
    A keyed version-1 delta is refused unless ``allow_legacy_keyed`` (its header fields are
    not under its MAC: see docs/FORMAT.md). Raises :class:`CorruptDataError` naming the
    field for any malformed, truncated, extended or tampered input, and ``TypeError`` only
    when ``data`` is not a buffer at all.

    ``spool_zstd=True`` decodes a zstd payload into an unnamed temporary file
    (``$TMPDIR``) mapped read-only instead of memory, so a memory-mapped delta of any
    size is read in bounded memory (the CLI's ``apply`` and ``inspect``).
    """
    view = as_bytes_view(data, "delta")
    if max_total_size < 0:
        raise ValueError("max_total_size must be >= 0")
    size = view.nbytes
    if size < len(MAGIC) or view[: len(MAGIC)] != MAGIC:
        raise CorruptDataError("bad magic: not a cellmigrate delta")
    if size < len(MAGIC) + 2:
        raise CorruptDataError(f"truncated: {size} bytes, a delta has at least {HEADER_SIZE_V1 + TRAILER_SIZE}")
    (version,) = struct.unpack_from("<H", view, len(MAGIC))
    if version == 1:
        return _decode_v1(view, max_total_size, allow_legacy_keyed)
    if version != VERSION:
        raise CorruptDataError(
            f"unsupported version {version} (this reader knows versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}; a newer cellmigrate wrote it)"
            if version > VERSION
            else f"unsupported version {version} (this reader knows versions {', '.join(map(str, READABLE_VERSIONS))})"
        )
    return _decode_v2(view, max_total_size, spool_zstd)


def _check_declared(field: str, size: int, limit: int) -> None:
    """Refuse a size the header declares above the reader's limit, from the header alone."""
    if size > limit:
        raise DeclaredSizeError(
            f"{field} {size} exceeds the maximum of {limit} bytes", field=field, size=size, limit=limit
        )


def _zstd_bound(n: int) -> int:
    """The most bytes zstd stores ``n`` bytes in (ZSTD_COMPRESSBOUND of zstd.h)."""
    return n + (n >> 8) + (((128 << 10) - n) >> 11 if n < (128 << 10) else 0)


def _checked_header(view: memoryview, max_total_size: int) -> Tuple[Any, ...]:
    """Reader rules 2 and 3 on a version-2 header (``view`` holds at least its
    :data:`HEADER_SIZE` bytes): its fields, after the magic and version, and ``keyed``.

    One function for :func:`decode_delta` and :func:`wire_length_bound`: a stream
    reader refuses from the header exactly what the decoder would."""
    (
        _magic, _version, alg_id, flags, digest_length, comp_id, reserved, agent_id, sequence, base_sequence,
        total_size, base_size, timestamp, checksum, page_count, payload_wire, payload_size,
    ) = _HEADER.unpack_from(view, 0)
    keyed = _check_algorithm(alg_id, flags, digest_length)
    if comp_id not in _COMPRESSION_NAMES:
        raise CorruptDataError(f"unknown payload compression id {comp_id}")
    if reserved != _ZERO2:
        raise CorruptDataError("reserved header bytes are not zero")
    _check_declared("total_size", total_size, max_total_size)
    _check_declared("base_size", base_size, max_total_size)
    max_pages = _max_pages(total_size)
    if page_count > max_pages:
        raise CorruptDataError(f"page count {page_count} exceeds the {max_pages} pages of a {total_size}-byte state")
    # Every page stores at most 3 x its length (RLE's bound; XZR's too), zero pages nothing.
    if payload_size > 3 * PAGE_SIZE * page_count:
        raise CorruptDataError(f"payload size {payload_size} is impossible for {page_count} pages")
    if comp_id == 0 and payload_wire != payload_size:
        raise CorruptDataError(f"payload sizes differ ({payload_wire} stored, {payload_size} decoded) without compression")
    if comp_id != 0 and payload_wire > _zstd_bound(payload_size):
        raise CorruptDataError(f"a zstd payload of {payload_wire} bytes is impossible for {payload_size} decoded bytes")
    return (alg_id, flags, digest_length, comp_id, agent_id, sequence, base_sequence, total_size, base_size,
            timestamp, checksum, page_count, payload_wire, payload_size, keyed)


def _decode_v2(view: memoryview, max_total_size: int, spool_zstd: bool = False) -> Dict[str, Any]:
    size = view.nbytes
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise CorruptDataError(f"truncated: {size} bytes, a version-2 delta has at least {HEADER_SIZE + TRAILER_SIZE}")
    (
        alg_id, flags, digest_length, comp_id, agent_id, sequence, base_sequence, total_size, base_size,
        timestamp, checksum, page_count, payload_wire, payload_size, keyed,
    ) = _checked_header(view, max_total_size)

    # --- lengths, all against the bytes actually present, before any allocation --------
    body_end = size - TRAILER_SIZE
    payload_start = HEADER_SIZE + 2 * digest_length
    table_start = payload_start + payload_wire
    needed = table_start + PAGE_ENTRY_SIZE * page_count
    if needed > body_end:
        raise CorruptDataError(
            f"truncated: {page_count} pages with a {payload_wire}-byte payload need {needed + TRAILER_SIZE} bytes, "
            f"{size} present"
        )
    if needed < body_end:
        raise CorruptDataError(f"{body_end - needed} trailing bytes after the page table")

    # Zero-copy only for input nobody can write through (what is checked stays so).
    held = view if view.readonly else memoryview(bytes(view))
    digest = bytes(held[HEADER_SIZE : HEADER_SIZE + digest_length])
    bound = bytes(held[HEADER_SIZE + digest_length : payload_start])

    # --- page table: four columns, read by numpy --------------------------------------------
    n = page_count
    indices = np.frombuffer(held, dtype="<u4", count=n, offset=table_start).astype(np.int64)
    lengths = np.frombuffer(held, dtype="<u2", count=n, offset=table_start + 4 * n)
    # A view of the (read-only) input where the byte order allows: 4 bytes a page not copied.
    checks = np.frombuffer(held, dtype="<u4", count=n, offset=table_start + 6 * n).astype(np.uint32, copy=False)
    encodings = np.frombuffer(held, dtype=np.uint8, count=n, offset=table_start + 10 * n).copy()
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if int(offsets[-1]) != payload_size:
        raise CorruptDataError(f"page table declares {int(offsets[-1])} payload bytes, the header {payload_size}")

    # --- payload and pages: one kernel call checks every page ---------------------------------
    stored = held[payload_start:table_start]
    frame = None
    if comp_id == COMPRESSIONS["zstd"]:
        frame = stored  # kept: re-encoding writes this frame again (zstd frames do not say their level)
        stored = _unzstd_to_file(stored, payload_size) if spool_zstd else memoryview(_unzstd(stored, payload_size))
    batch = PageBatch(indices, encodings, offsets, stored, checks)
    batch.frame = frame  # re-encoding writes this frame again (a zstd frame does not say its level)
    # XZR needs its base, which only a strong digest proves: not in a checksum-only delta.
    allowed = ALLOW_ALL if alg_id != _ALG_NONE else ALLOW_ALL & ~ALLOW_XZR
    batch.check(total_size, allowed)

    # --- whole-payload check -------------------------------------------------------------
    if _xxhash.xxh3_128_digest(view[:body_end]) != bytes(view[body_end:]):
        raise CorruptDataError("whole-payload check mismatch (the delta was corrupted or truncated)")

    return {
        "agent_id": bytes(agent_id),
        "sequence": sequence,
        "base_sequence": base_sequence,
        "dirty_pages": batch,
        "total_size": total_size,
        "timestamp": timestamp,
        "checksum": checksum,
        "digest_algorithm": _ALG_NAMES[alg_id],
        "digest": digest if alg_id != _ALG_NONE else None,
        "keyed": keyed,
        "base_size": base_size,
        "header_digest": bound if alg_id != _ALG_NONE else None,
        "compression": _COMPRESSION_NAMES[comp_id],
        "wire_version": 2,
    }


def _unzstd(stored: memoryview, size: int) -> bytes:
    """The zstd payload decoded: exactly one frame, recording its content size, of exactly
    ``size`` bytes (zstd itself refuses a frame whose output differs from the size it
    records, so nothing over ``size`` is ever produced)."""
    try:
        declared = _zstd.frame_content_size(stored)
        if declared != size:
            raise CorruptDataError(f"payload: zstd frame declares {declared} bytes, the header {size}")
        frame = _zstd.ZstdDecompressor().decompressobj()
        out = frame.decompress(stored)
    except _zstd.ZstdError as exc:
        raise CorruptDataError(f"payload: corrupt zstd frame: {exc}") from None
    if not frame.eof:
        raise CorruptDataError("payload: zstd frame truncated")
    if frame.unused_data:
        raise CorruptDataError(f"payload: {len(frame.unused_data)} bytes after the zstd frame")
    if len(out) != size:
        raise CorruptDataError(f"payload: zstd frame decoded to {len(out)} bytes, the header says {size}")
    return bytes(out)


#: Bytes of a zstd frame fed to the decoder per step when it decodes into a file: the
#: output of one step is what these bytes decode to (a payload of encoded pages rarely
#: compresses 100x, so a few MiB at most; zstd's own content-size check bounds the rest).
_UNZSTD_FEED = 32 << 10


def _unzstd_to_file(stored: memoryview, size: int) -> memoryview:
    """:func:`_unzstd` into an unnamed temporary file, mapped read-only: the same checks
    (one frame, its declared content size equal to ``size``, nothing after it, never more
    than ``size`` bytes kept), in bounded memory. The file is gone once the map is."""
    import mmap
    import tempfile

    if size == 0:
        return memoryview(_unzstd(stored, size))
    try:
        declared = _zstd.frame_content_size(stored)
    except _zstd.ZstdError as exc:
        raise CorruptDataError(f"payload: corrupt zstd frame: {exc}") from None
    if declared != size:
        raise CorruptDataError(f"payload: zstd frame declares {declared} bytes, the header {size}")
    with tempfile.TemporaryFile() as spool:
        fd = spool.fileno()
        frame = _zstd.ZstdDecompressor().decompressobj()
        written = consumed = 0
        try:
            while consumed < stored.nbytes and not frame.eof:
                piece = stored[consumed : consumed + _UNZSTD_FEED]
                out = frame.decompress(piece)
                consumed += piece.nbytes
                if written + len(out) > size:
                    raise CorruptDataError(f"payload: zstd frame decoded past the {size} bytes the header says")
                _write_all_at(fd, out, written)
                written += len(out)
        except _zstd.ZstdError as exc:
            raise CorruptDataError(f"payload: corrupt zstd frame: {exc}") from None
        if not frame.eof:
            raise CorruptDataError("payload: zstd frame truncated")
        extra = len(frame.unused_data) + stored.nbytes - consumed
        if extra:
            raise CorruptDataError(f"payload: {extra} bytes after the zstd frame")
        if written != size:
            raise CorruptDataError(f"payload: zstd frame decoded to {written} bytes, the header says {size}")
        mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
    return memoryview(mapping)


def _write_all_at(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view.nbytes:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _check_algorithm(alg_id: int, flags: int, digest_length: int) -> bool:
    """Validate the digest algorithm, flags and digest length; return ``keyed``."""
    if alg_id not in _ALG_NAMES:
        raise CorruptDataError(f"unknown digest algorithm id {alg_id}")
    if flags & ~_KNOWN_FLAGS:
        raise CorruptDataError(f"unknown flags 0x{flags & ~_KNOWN_FLAGS:02x}")
    keyed = bool(flags & _FLAG_KEYED)
    if keyed and _ALG_NAMES[alg_id] != "blake3":
        raise CorruptDataError(f"flags: keyed is set but the digest algorithm is {_ALG_NAMES[alg_id]!r}, not 'blake3'")
    if digest_length != _DIGEST_LENGTHS[alg_id]:
        raise CorruptDataError(
            f"digest length {digest_length} does not match digest algorithm {_ALG_NAMES[alg_id]!r} "
            f"({_DIGEST_LENGTHS[alg_id]} bytes)"
        )
    return keyed


def _v2_framing(digest_length: int, page_count: int) -> int:
    """Bytes of a version-2 delta that are not its page payload: header, the two digests
    (``digest_length`` bytes each), page table and trailer."""
    return int(HEADER_SIZE + 2 * digest_length + PAGE_ENTRY_SIZE * page_count + TRAILER_SIZE)


def payload_wire_size(wire_size: int, digest_length: int, page_count: int) -> int:
    """Bytes the page payload takes in a version-2 delta of ``wire_size`` bytes (after its
    whole-payload compression, if any), the rest being header, digests, page table and
    trailer (``digest_length``: bytes of its digest, 0 without one)."""
    return int(wire_size - _v2_framing(digest_length, page_count))


def wire_length_bound(prefix: BufferLike, *, max_total_size: int = DEFAULT_MAX_TOTAL_SIZE) -> Optional[int]:
    """The most bytes a delta starting with ``prefix`` can have, from its header alone.

    For a reader of a stream (stdin, a pipe) that must not spool an endless or foreign
    input before noticing what it is: call with the bytes received so far. Returns None
    while ``prefix`` is shorter than the header it needs (at most :data:`HEADER_SIZE`
    bytes); then checks the magic, the version and every rule on the header that
    :func:`decode_delta` has (digest fields, compression id, reserved bytes, the declared
    sizes against ``max_total_size`` and against each other: docs/FORMAT.md's reader rules
    1-3), raising :class:`CorruptDataError`, or :class:`DeclaredSizeError` for a size over
    the limit, exactly as :func:`decode_delta` would, and returns the exact length of a
    version-2 delta (header + digests + payload
    + page table + trailer), or a sound upper bound for version 1 (whose payload length
    is the sum of its page table: every page at most 3x its length, RLE's bound).
    """
    view = as_bytes_view(prefix, "delta")
    size = view.nbytes
    if view[: min(size, len(MAGIC))] != MAGIC[: min(size, len(MAGIC))]:
        raise CorruptDataError("bad magic: not a cellmigrate delta")
    if size < len(MAGIC) + 2:
        return None
    (version,) = struct.unpack_from("<H", view, len(MAGIC))
    if version not in READABLE_VERSIONS:
        raise CorruptDataError(
            f"unsupported version {version} (this reader knows versions {', '.join(map(str, READABLE_VERSIONS))}"
            + ("; a newer cellmigrate wrote it)" if version > VERSION else ")")
        )
    if version != 1:
        if size < HEADER_SIZE:
            return None
        fields = _checked_header(view, max_total_size)  # rules 2 and 3, as decode_delta
        digest_length, page_count, payload_wire = fields[2], fields[11], fields[12]
        return int(_v2_framing(digest_length, page_count) + payload_wire)
    if size < HEADER_SIZE_V1:
        return None
    fields = _checked_header_v1(view, max_total_size)
    digest_length, page_count = fields[2], fields[9]
    entry = PAGE_ENTRY_SIZE_V1 + _RLE_MAX_EXPANSION * PAGE_SIZE
    return int(HEADER_SIZE_V1 + digest_length + page_count * entry + TRAILER_SIZE)


# --------------------------------------------------------------------------------------
# version 1 (read, and written for deltas read from version 1)


def _encode_v1(delta: DeltaLike) -> bytes:
    """Serialize ``delta`` in version 1 (raw and RLE pages, no base size, no header digest)."""
    agent_id = _agent_bytes(delta.agent_id)
    sequence = _int_field("sequence", delta.sequence, _U64_MAX)
    base_sequence = _int_field("base_sequence", delta.base_sequence, _U64_MAX)
    total_size = _int_field("total_size", delta.total_size, _U64_MAX)
    timestamp = _int_field("timestamp", delta.timestamp, _U64_MAX)
    checksum = _int_field("checksum", delta.checksum, _U32_MAX)
    base_size = getattr(delta, "base_size", None)
    if base_size is not None and base_size != total_size:
        raise ValueError(f"version 1 cannot hold a base_size ({base_size}) other than total_size ({total_size})")
    if getattr(delta, "compression", "none") != "none":
        raise ValueError("version 1 has no payload compression")

    alg_id = _algorithm_id(delta.digest_algorithm)
    digest = b"" if delta.digest is None else bytes(delta.digest)
    if len(digest) > 255:
        raise ValueError(f"digest of {len(digest)} bytes does not fit the 1-byte digest length field")
    flags = _FLAG_KEYED if delta.keyed else 0

    pages = list(delta.dirty_pages)
    table = bytearray(len(pages) * PAGE_ENTRY_SIZE_V1)
    payloads: List[memoryview] = []
    for position, page in enumerate(pages):
        try:
            raw_index, raw_data, compressed = page.index, page.data, page.compressed
        except AttributeError:
            raise TypeError(f"page {position}: {type(page).__name__} is not a dirty page") from None
        encoding = getattr(page, "encoding", None)
        if encoding is not None and int(encoding) > _ENC_RLE:
            raise ValueError(f"page {position}: version 1 has no {PageEncoding(int(encoding)).label} pages")
        index = _int_field(f"page {position}: index", raw_index, _U64_MAX)
        stored = as_bytes_view(raw_data, f"page {position}: data")
        if stored.nbytes > _U32_MAX:
            raise ValueError(f"page {position}: {stored.nbytes} bytes of data do not fit the 4-byte length field")
        entry_encoding = _ENC_RLE if compressed else _ENC_RAW
        _ENTRY_V1.pack_into(
            table, position * PAGE_ENTRY_SIZE_V1, index, stored.nbytes, entry_encoding, _ZERO3, _page_check(stored)
        )
        payloads.append(stored)

    header = _HEADER_V1.pack(
        MAGIC, 1, alg_id, flags, len(digest), _ZERO3, agent_id, sequence, base_sequence, total_size, timestamp,
        checksum, _ZERO4, len(pages),
    )
    parts: List[Any] = [header, digest, table, *payloads]
    hasher = _xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    parts.append(hasher.digest())
    return b"".join(parts)


def _checked_header_v1(view: memoryview, max_total_size: int) -> Tuple[Any, ...]:
    """:func:`_checked_header` for a version-1 header (``view`` holds at least
    :data:`HEADER_SIZE_V1` bytes)."""
    (
        _magic, _version, alg_id, flags, digest_length, reserved_a, agent_id, sequence, base_sequence,
        total_size, timestamp, checksum, reserved_b, page_count,
    ) = _HEADER_V1.unpack_from(view, 0)
    keyed = _check_algorithm(alg_id, flags, digest_length)
    if reserved_a != _ZERO3 or reserved_b != _ZERO4:
        raise CorruptDataError("reserved header bytes are not zero")
    _check_declared("total_size", total_size, max_total_size)
    max_pages = _max_pages(total_size)
    if page_count > max_pages:
        raise CorruptDataError(f"page count {page_count} exceeds the {max_pages} pages of a {total_size}-byte state")
    return (alg_id, flags, digest_length, agent_id, sequence, base_sequence, total_size, timestamp, checksum,
            page_count, keyed)


def _decode_v1(view: memoryview, max_total_size: int, allow_legacy_keyed: bool) -> Dict[str, Any]:
    """Parse and fully validate a version-1 delta (docs/FORMAT.md, "Version 1")."""
    size = view.nbytes
    if size < HEADER_SIZE_V1 + TRAILER_SIZE:
        raise CorruptDataError(f"truncated: {size} bytes, a delta has at least {HEADER_SIZE_V1 + TRAILER_SIZE}")
    (
        alg_id, flags, digest_length, agent_id, sequence, base_sequence, total_size, timestamp, checksum,
        page_count, keyed,
    ) = _checked_header_v1(view, max_total_size)

    # --- lengths, all against the bytes actually present, before any allocation --------
    body_end = size - TRAILER_SIZE
    offset = HEADER_SIZE_V1
    if offset + digest_length + page_count * PAGE_ENTRY_SIZE_V1 > body_end:
        raise CorruptDataError(
            f"truncated: page count {page_count} needs a {page_count * PAGE_ENTRY_SIZE_V1}-byte page table "
            f"after the {digest_length}-byte digest, only {body_end - offset} bytes before the trailer"
        )
    digest = bytes(view[offset : offset + digest_length])
    offset += digest_length
    table_end = offset + page_count * PAGE_ENTRY_SIZE_V1
    # The table is read twice, lazily, never materialized: a list of entry tuples would
    # cost ~8x the table's bytes before the first entry is even validated.
    table = view[offset:table_end]
    payload_length = sum(entry[1] for entry in _ENTRY_V1.iter_unpack(table))
    present = body_end - table_end
    if payload_length > present:
        raise CorruptDataError(f"truncated: page payloads declare {payload_length} bytes, {present} present before the trailer")
    if payload_length < present:
        raise CorruptDataError(f"{present - payload_length} trailing bytes after the page payloads")

    # --- pages ---------------------------------------------------------------------------
    pages: List[Any] = []
    previous = -1
    offset = table_end
    for position, (index, stored_length, encoding, reserved, check) in enumerate(_ENTRY_V1.iter_unpack(table)):
        where = f"page {position}"
        if index * PAGE_SIZE >= total_size:
            raise CorruptDataError(f"{where}: index {index} out of range for total_size {total_size}")
        if index <= previous:
            raise CorruptDataError(f"{where}: index {index} is not after {previous} (indices must be strictly increasing)")
        previous = index
        if reserved != _ZERO3:
            raise CorruptDataError(f"{where}: reserved bytes are not zero")
        expected = _page_length(index, total_size)
        if encoding == _ENC_RAW:
            if stored_length != expected:
                raise CorruptDataError(f"{where}: stored length {stored_length}, a raw page {index} is {expected} bytes")
        elif encoding == _ENC_RLE:
            if not 0 < stored_length <= _RLE_MAX_EXPANSION * expected:
                raise CorruptDataError(
                    f"{where}: compressed length {stored_length} cannot decode to the page's {expected} bytes"
                )
        else:
            raise CorruptDataError(f"{where}: unknown encoding {encoding}")
        # Copy first, then check the copy: what we return is exactly what was checked,
        # even if the caller's buffer changes under us.
        stored = bytes(view[offset : offset + stored_length])
        offset += stored_length
        if _page_check(stored) != check:
            raise CorruptDataError(f"{where}: page check mismatch (stored bytes of page {index} are corrupt)")
        if encoding == _ENC_RLE:
            try:
                decoded = simple_decompress(stored, max_output=expected)
            except CorruptDataError as exc:
                raise CorruptDataError(f"{where}: compressed data is corrupt: {exc}") from None
            if len(decoded) != expected:
                raise CorruptDataError(f"{where}: decompressed to {len(decoded)} bytes, page {index} is {expected} bytes")
            del decoded  # only one page's worth of decoded data alive at a time
        pages.append(DirtyPage(index, stored, encoding == _ENC_RLE))

    # --- whole-payload check -----------------------------------------------------------------
    if _xxhash.xxh3_128_digest(view[:body_end]) != bytes(view[body_end:]):
        raise CorruptDataError("whole-payload check mismatch (the delta was corrupted or truncated)")
    # Checked last, like every field above: a corrupt input is reported as corrupt first.
    if keyed and not allow_legacy_keyed:
        raise LegacyKeyedError(
            "keyed version-1 delta refused: its header (agent id, sequences, timestamp, sizes) is not under "
            "its MAC, so it could be replayed to another agent or round; re-create it with this version, or "
            "pass allow_legacy_keyed=True to accept it knowingly"
        )

    return {
        "agent_id": bytes(agent_id),
        "sequence": sequence,
        "base_sequence": base_sequence,
        "dirty_pages": pages,
        "total_size": total_size,
        "timestamp": timestamp,
        "checksum": checksum,
        "digest_algorithm": _ALG_NAMES[alg_id],
        "digest": digest if alg_id != _ALG_NONE else None,
        "keyed": keyed,
        "wire_version": 1,
    }
