"""The self-checking binary wire format of :class:`~cellmigrate.delta.DeltaSnapshot`.

Semi-private: users call ``DeltaSnapshot.serialize()`` / ``DeltaSnapshot.deserialize()``,
which delegate to :func:`encode_delta` / :func:`decode_delta` here. The layout is
documented byte by byte in ``docs/FORMAT.md``; this module is its only implementation.

Design rules, all enforced by :func:`decode_delta`:

* The input is hostile. Every length, count, index and flag is checked against the bytes
  actually present *before* anything is allocated from it, so memory use is bounded by
  the input size (the page table, the page copies) and by one page at a time (the
  decompression check); a declared ``total_size`` is never allocated here at all, and it
  is itself bounded by ``max_total_size``.
* Every failure raises :class:`~cellmigrate.errors.CorruptDataError` whose message names
  the field ("bad magic", "page 3: index 99 out of range ...").
* The per-page and whole-payload checks are XXH3 hashes: they catch corruption in
  transit and localize it, they do **not** authenticate. Authentication is the keyed
  BLAKE3 digest of the new state, which ``DeltaSnapshot.apply`` verifies.

:func:`encode_delta` writes what the delta holds (a delta tampered with in memory is
written as is and refused by the reader); it only refuses what the fixed-width fields
cannot represent.
"""

from __future__ import annotations

import operator
import struct
from typing import Any, Dict, List, Optional, Protocol, Sequence, Union

import xxhash as _xxhash

from ._buffers import as_bytes_view
from ._types import BufferLike
from .checksum import DIGEST_SIZES, PAGE_SIZE
from .compression import simple_decompress
from .errors import CorruptDataError


class PageLike(Protocol):
    """What the encoder reads from a dirty page (``DirtyPage``); read-only, so any class fits."""

    @property
    def index(self) -> int: ...
    @property
    def data(self) -> bytes: ...
    @property
    def compressed(self) -> bool: ...


class DeltaLike(Protocol):
    """What the encoder reads from a delta (the attributes of ``DeltaSnapshot``)."""

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
    "DEFAULT_MAX_TOTAL_SIZE",
    "HEADER_SIZE",
    "PAGE_ENTRY_SIZE",
    "TRAILER_SIZE",
    "encode_delta",
    "decode_delta",
]

#: PNG-style signature: the high byte catches 7-bit channels, CR LF / LF catch newline
#: translation, 0x1A stops a DOS ``type``. "CMD" = cellmigrate delta.
MAGIC = b"\x89CMD\r\n\x1a\n"
#: The only layout this module reads or writes. Any change to the layout bumps it.
VERSION = 1
#: Largest ``total_size`` :func:`decode_delta` accepts unless told otherwise (64 GiB).
DEFAULT_MAX_TOTAL_SIZE = 64 << 30

# Header: magic, version, digest algorithm id, flags, digest length, 3 reserved bytes,
# agent id, sequence, base_sequence, total_size, timestamp, checksum, 4 reserved bytes,
# page count. Reserved bytes are read (not skipped with "x") so they can be required zero.
_HEADER = struct.Struct("<8sHBBB3s16sQQQQI4sQ")
HEADER_SIZE = _HEADER.size  # 80
# Page table entry: index, stored length, encoding, 3 reserved bytes, xxh3_64 of the stored bytes.
_ENTRY = struct.Struct("<QIB3sQ")
PAGE_ENTRY_SIZE = _ENTRY.size  # 24
# Trailer: the canonical XXH3-128 digest of every byte before it.
TRAILER_SIZE = 16

_U32_MAX = (1 << 32) - 1
_U64_MAX = (1 << 64) - 1

# Digest algorithm ids and the digest length each one implies.
_ALG_NONE = 0
_ALG_IDS = {None: 0, "xxh3_128": 1, "blake3": 2, "xxh3_128_tree": 3}
_ALG_NAMES = {v: k for k, v in _ALG_IDS.items()}
_DIGEST_LENGTHS = {_ALG_NONE: 0, **{_ALG_IDS[name]: size for name, size in DIGEST_SIZES.items()}}

_FLAG_KEYED = 0x01
_KNOWN_FLAGS = _FLAG_KEYED

# Page encodings. RLE is the crate's "simple" format, what DirtyPage.compress() produces.
_ENC_RAW = 0
_ENC_RLE = 1
# An RLE stream turns every 3 input bytes into at least 1 output byte (a marker has a
# count of at least 1; a literal is 1 byte for 1), so a stream longer than 3 * L bytes
# cannot decode to L bytes: a sound bound, checked before decoding anything.
_RLE_MAX_EXPANSION = 3

_ZERO3 = b"\x00" * 3
_ZERO4 = b"\x00" * 4


# --------------------------------------------------------------------------------------
# helpers


def _page_length(index: int, total_size: int) -> int:
    """Length of page ``index`` in a state of ``total_size`` bytes (the last may be short)."""
    return min(PAGE_SIZE, total_size - index * PAGE_SIZE)


def _max_pages(total_size: int) -> int:
    """Number of pages of a ``total_size``-byte state (ceiling division)."""
    return -(-total_size // PAGE_SIZE)


def _page_check(stored: Union[bytes, memoryview]) -> int:
    """Per-page check: XXH3-64 of the stored (possibly compressed) bytes."""
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


# --------------------------------------------------------------------------------------
# encoding


def encode_delta(delta: DeltaLike) -> bytes:
    """Serialize ``delta`` (any object with the ``DeltaSnapshot`` attributes) to bytes.

    The writer is faithful, not a validator: it writes whatever the delta holds as long as
    the fixed-width fields can represent it, so a delta tampered with in memory (page out
    of range, unsorted, wrong length, bad RLE, mismatched digest length) still serializes
    and is then refused by :func:`decode_delta` on the receiving side, with a message
    naming the field. Every delta made by ``DeltaSnapshot.create`` round-trips.

    Raises ``ValueError`` / ``TypeError`` naming the field only for what the format cannot
    represent: an agent id that is not 16 bytes, a negative integer or one wider than its
    field, an unknown digest algorithm, a digest over 255 bytes, page data that is not a
    buffer or is 4 GiB or more.
    """
    agent_id = delta.agent_id
    if hasattr(agent_id, "bytes") and not isinstance(agent_id, (bytes, bytearray, memoryview)):
        agent_id = agent_id.bytes  # a uuid.UUID
    agent_id = bytes(agent_id)
    if len(agent_id) != 16:
        raise ValueError(f"agent_id must be 16 bytes, got {len(agent_id)}")
    sequence = _int_field("sequence", delta.sequence, _U64_MAX)
    base_sequence = _int_field("base_sequence", delta.base_sequence, _U64_MAX)
    total_size = _int_field("total_size", delta.total_size, _U64_MAX)
    timestamp = _int_field("timestamp", delta.timestamp, _U64_MAX)
    checksum = _int_field("checksum", delta.checksum, _U32_MAX)

    algorithm = delta.digest_algorithm
    if algorithm not in _ALG_IDS:
        raise ValueError(f"digest_algorithm {algorithm!r} is not one of {sorted(k for k in _ALG_IDS if k)}")
    alg_id = _ALG_IDS[algorithm]
    digest = b"" if delta.digest is None else bytes(delta.digest)
    if len(digest) > 255:
        raise ValueError(f"digest of {len(digest)} bytes does not fit the 1-byte digest length field")
    flags = _FLAG_KEYED if delta.keyed else 0

    pages = list(delta.dirty_pages)
    table = bytearray(len(pages) * PAGE_ENTRY_SIZE)
    payloads: List[memoryview] = []
    for position, page in enumerate(pages):
        try:
            raw_index, raw_data, compressed = page.index, page.data, page.compressed
        except AttributeError:
            raise TypeError(f"page {position}: {type(page).__name__} is not a dirty page") from None
        index = _int_field(f"page {position}: index", raw_index, _U64_MAX)
        stored = as_bytes_view(raw_data, f"page {position}: data")
        if stored.nbytes > _U32_MAX:
            raise ValueError(f"page {position}: {stored.nbytes} bytes of data do not fit the 4-byte length field")
        encoding = _ENC_RLE if compressed else _ENC_RAW
        _ENTRY.pack_into(table, position * PAGE_ENTRY_SIZE, index, stored.nbytes, encoding, _ZERO3, _page_check(stored))
        payloads.append(stored)

    header = _HEADER.pack(
        MAGIC,
        VERSION,
        alg_id,
        flags,
        len(digest),
        _ZERO3,
        agent_id,
        sequence,
        base_sequence,
        total_size,
        timestamp,
        checksum,
        _ZERO4,
        len(pages),
    )
    parts: List[Any] = [header, digest, table, *payloads]
    # Hash part by part, then join once: a single copy of the payload in memory.
    hasher = _xxhash.xxh3_128()
    for part in parts:
        hasher.update(part)
    parts.append(hasher.digest())
    return b"".join(parts)


# --------------------------------------------------------------------------------------
# decoding


def decode_delta(data: BufferLike, *, max_total_size: int = DEFAULT_MAX_TOTAL_SIZE) -> Dict[str, Any]:
    """Parse and fully validate a serialized delta; return the ``DeltaSnapshot`` keyword fields.

    ``data`` is any C-contiguous buffer (it is read in place; page payloads are copied
    out). ``max_total_size`` bounds the declared state size (default 64 GiB). Raises
    :class:`CorruptDataError` naming the field for any malformed, truncated, extended or
    tampered input, and ``TypeError`` only when ``data`` is not a buffer at all.
    """
    view = as_bytes_view(data, "delta")
    if max_total_size < 0:
        raise ValueError("max_total_size must be >= 0")
    size = view.nbytes

    # --- header ------------------------------------------------------------------------
    if size < len(MAGIC) or view[: len(MAGIC)] != MAGIC:
        raise CorruptDataError("bad magic: not a cellmigrate delta")
    if size < HEADER_SIZE + TRAILER_SIZE:
        raise CorruptDataError(f"truncated: {size} bytes, a delta has at least {HEADER_SIZE + TRAILER_SIZE}")
    (
        _magic,
        version,
        alg_id,
        flags,
        digest_length,
        reserved_a,
        agent_id,
        sequence,
        base_sequence,
        total_size,
        timestamp,
        checksum,
        reserved_b,
        page_count,
    ) = _HEADER.unpack_from(view, 0)
    if version != VERSION:
        raise CorruptDataError(f"unsupported version {version} (this reader knows version {VERSION})")
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
    if reserved_a != _ZERO3 or reserved_b != _ZERO4:
        raise CorruptDataError("reserved header bytes are not zero")
    if total_size > max_total_size:
        raise CorruptDataError(f"total_size {total_size} exceeds the maximum of {max_total_size} bytes")
    max_pages = _max_pages(total_size)
    if page_count > max_pages:
        raise CorruptDataError(f"page count {page_count} exceeds the {max_pages} pages of a {total_size}-byte state")

    # --- lengths, all against the bytes actually present, before any allocation --------
    body_end = size - TRAILER_SIZE
    offset = HEADER_SIZE
    if offset + digest_length + page_count * PAGE_ENTRY_SIZE > body_end:
        raise CorruptDataError(
            f"truncated: page count {page_count} needs a {page_count * PAGE_ENTRY_SIZE}-byte page table "
            f"after the {digest_length}-byte digest, only {body_end - offset} bytes before the trailer"
        )
    digest = bytes(view[offset : offset + digest_length])
    offset += digest_length
    table_end = offset + page_count * PAGE_ENTRY_SIZE
    # The table is read twice, lazily, never materialized: a list of entry tuples would
    # cost ~8x the table's bytes before the first entry is even validated.
    table = view[offset:table_end]
    payload_length = sum(entry[1] for entry in _ENTRY.iter_unpack(table))
    present = body_end - table_end
    if payload_length > present:
        raise CorruptDataError(f"truncated: page payloads declare {payload_length} bytes, {present} present before the trailer")
    if payload_length < present:
        raise CorruptDataError(f"{present - payload_length} trailing bytes after the page payloads")

    # --- pages ---------------------------------------------------------------------------
    from .delta import DirtyPage  # lazy: delta.py imports this module

    pages: List[Any] = []
    previous = -1
    offset = table_end
    for position, (index, stored_length, encoding, reserved, check) in enumerate(_ENTRY.iter_unpack(table)):
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
    }
