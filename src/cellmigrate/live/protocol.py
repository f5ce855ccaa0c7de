"""The live-migration stream protocol: frames, messages, authentication (docs/PROTOCOL.md).

Every message is one frame::

    u32le body_len | u8 type | body | mac (32 bytes, only once a keyed session is up)

Lengths are bounded per type before anything is allocated (control frames 64 KiB, a
chunk its pages plus index runs, at most ``MAX_CHUNK_BYTES`` of pages); every read has a
deadline. With a shared key both ends prove they hold it (keyed BLAKE3 over the two
nonces and the handshake bytes, so neither side can be replayed or downgraded) and every
later frame carries a keyed-BLAKE3 MAC over a per-direction counter, its type, length
and body. The decoders here never trust a length or count before checking it, and raise
:class:`~cellmigrate.live.errors.ProtocolError` on anything malformed.
"""

from __future__ import annotations

import enum
import hmac
import json
import re
import struct
from dataclasses import asdict
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import blake3 as _blake3
import numpy as np
import numpy.typing as npt

from .._jsontext import parse_json
from ..checksum import PAGE_SIZE
from ..validation import AgentRequirements
from .agent import MAX_EXTRA_BYTES
from .errors import AuthenticationError, ProtocolError
from .pages import MAX_CHUNK_BYTES, Chunk, Encoding, placed_digest
from .session import Offer

__all__ = [
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "SENDER_VERSIONS",
    "older_version_served",
    "refuse_version",
    "MAC_SIZE",
    "NONCE_SIZE",
    "MAX_CONTROL_BODY",
    "MAX_CHUNK_BODY",
    "Msg",
    "body_limit",
    "derive_key",
    "Handshake",
    "encode_hello",
    "decode_hello",
    "encode_challenge",
    "decode_challenge",
    "encode_offer",
    "decode_offer",
    "encode_accept",
    "decode_accept",
    "encode_reason",
    "decode_reason",
    "encode_round_digest",
    "decode_round_digest",
    "decode_commit",
    "decode_u32",
    "decode_u64",
    "encode_chunk_header",
    "ChunkHead",
    "CHUNK_HEAD_SIZE",
    "decode_chunk_head",
    "decode_chunk_runs",
    "check_payload_len",
    "chunk_of",
    "decode_chunk",
    "chunk_parts",
    "FrameMac",
    "ACCEPT_CONTINUE",
    "ACCEPT_COMPLETED",
]

MAGIC = b"CMLV"
#: This side's protocol version: 3 added the PAGES chunk encoding (XZR pages), 4 binds a
#: chunk's digest to its placement (sequence, round, state size, page indices).
VERSION = 4
#: The versions a receiver serves (a version-2 sender never sends PAGES chunks).
SUPPORTED_VERSIONS = (2, 3, 4)
#: The versions a sender speaks (the older when a receiver refuses the newer).
SENDER_VERSIONS = (3, 4)
MAC_SIZE = 32
NONCE_SIZE = 32
#: Bound on every frame but a chunk (and a commit, which may carry the agent's extra).
MAX_CONTROL_BODY = 64 << 10
_MAX_RUNS = MAX_CHUNK_BYTES // PAGE_SIZE
#: Bound on a chunk frame's body: header, index runs, pages.
MAX_CHUNK_BODY = 64 + 12 * _MAX_RUNS + MAX_CHUNK_BYTES
_MAX_REASON = 4096
_MAX_REQUIREMENTS = 16 << 10


class Msg(enum.IntEnum):
    """Frame types (S: sender, R: receiver)."""

    HELLO = 1  # S->R  magic, version, flags, sender nonce
    CHALLENGE = 2  # R->S  version, flags, receiver nonce, receiver proof
    AUTH = 3  # S->R  sender proof (empty without a key)
    OFFER = 4  # S->R  migration id, agent id, state size, requirements
    ACCEPT = 5  # R->S  status, committed chunk sequence
    REFUSE = 6  # R->S  reason (the compatibility check's, or a policy's)
    CHUNK = 7  # S->R  one chunk of a round
    ACK = 8  # R->S  chunk committed
    ROUND_END = 9  # S->R  every chunk of the round was sent
    ROUND_DIGEST = 10  # R->S  digest of the staged state after the round
    COMMIT = 11  # S->R  final digest + agent extra: verify, adopt, resume
    DONE = 12  # R->S  the target agent resumed
    ERROR = 13  # both  reason; the sender closes the connection
    ABORT = 14  # S->R  reason; the receiver discards the migration


_FLAG_KEYED = 0x01
_KNOWN_FLAGS = _FLAG_KEYED


def body_limit(msg: int) -> int:
    """The largest body a frame of type ``msg`` may declare."""
    if msg == Msg.CHUNK:
        return MAX_CHUNK_BODY
    if msg == Msg.COMMIT:
        return 16 + MAX_EXTRA_BYTES
    return MAX_CONTROL_BODY


def _need(view: memoryview, n: int, what: str) -> None:
    if view.nbytes < n:
        raise ProtocolError(f"{what} frame truncated: {view.nbytes} bytes, need {n}")


def _exact(view: memoryview, n: int, what: str) -> None:
    if view.nbytes != n:
        raise ProtocolError(f"{what} frame is {view.nbytes} bytes, expected {n}")


# -- keys and authentication --------------------------------------------------------------


def derive_key(secret: bytes) -> bytes:
    """The 32-byte protocol key from a shared secret of any length (a key file's bytes)."""
    if not secret:
        raise ValueError("the shared key is empty")
    return _blake3.blake3(secret, derive_key_context="cellmigrate live v1 shared key").digest()


def _mac(key: bytes, label: bytes, *parts: Union[bytes, memoryview]) -> bytes:
    h = _blake3.blake3(key=key)
    h.update(label)
    for part in parts:
        h.update(part)
    return h.digest()


class Handshake:
    """The keyed proofs of one connection: both nonces and both handshake bodies bound in.

    ``transcript`` is the HELLO body followed by the CHALLENGE body without its proof.
    """

    def __init__(self, key: bytes, transcript: bytes) -> None:
        self._key = key
        self._transcript = transcript

    def receiver_proof(self) -> bytes:
        return _mac(self._key, b"receiver proof", self._transcript)

    def sender_proof(self) -> bytes:
        return _mac(self._key, b"sender proof", self._transcript)

    def session_key(self) -> bytes:
        return _mac(self._key, b"session key", self._transcript)

    @staticmethod
    def check(expected: bytes, got: Union[bytes, memoryview], who: str) -> None:
        if not hmac.compare_digest(expected, bytes(got)):
            raise AuthenticationError(f"{who} does not hold the shared key (authentication failed)")


class FrameMac:
    """Keyed-BLAKE3 MACs of one direction of a connection: a counter per frame."""

    def __init__(self, session_key: bytes, direction: bytes) -> None:
        self._key = session_key
        self._direction = direction
        self._counter = 0

    def start(self, msg: int, length: int) -> Any:
        """A keyed-BLAKE3 hasher of the next frame, to feed its body to piece by piece
        (advances the counter); its ``digest()`` is the frame's MAC."""
        h = _blake3.blake3(key=self._key)
        h.update(self._direction + struct.pack("<QBI", self._counter, msg, length))
        self._counter += 1
        return h

    def next(self, msg: int, parts: Sequence[Union[bytes, bytearray, memoryview]], length: int) -> bytes:
        """The MAC of the next frame (advances the counter)."""
        h = self.start(msg, length)
        for part in parts:
            h.update(part)
        return bytes(h.digest())


# -- handshake messages ---------------------------------------------------------------------

_HELLO = struct.Struct("<4sHB32s")
_CHALLENGE = struct.Struct("<HB32s")


def encode_hello(keyed: bool, nonce: bytes, version: int = VERSION) -> bytes:
    return _HELLO.pack(MAGIC, version, _FLAG_KEYED if keyed else 0, nonce)


def decode_hello(body: memoryview) -> Tuple[int, bool, bytes]:
    """``(version, keyed, nonce)``; refuses anything that is not this protocol."""
    _exact(body, _HELLO.size, "HELLO")
    magic, version, flags, nonce = _HELLO.unpack(body)
    if magic != MAGIC:
        raise ProtocolError("not a cellmigrate live-migration stream (bad magic)")
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"HELLO has unknown flags 0x{flags:02x}")
    return int(version), bool(flags & _FLAG_KEYED), bytes(nonce)


def encode_challenge(keyed: bool, nonce: bytes, version: int = VERSION) -> bytes:
    """The CHALLENGE body without its proof (the proof is appended when keyed);
    ``version``: the one this connection speaks (the sender's, when supported)."""
    return _CHALLENGE.pack(version, _FLAG_KEYED if keyed else 0, nonce)


def decode_challenge(body: memoryview) -> Tuple[int, bool, bytes, bytes]:
    """``(version, keyed, nonce, proof)``."""
    _need(body, _CHALLENGE.size, "CHALLENGE")
    version, flags, nonce = _CHALLENGE.unpack_from(body)
    if flags & ~_KNOWN_FLAGS:
        raise ProtocolError(f"CHALLENGE has unknown flags 0x{flags:02x}")
    keyed = bool(flags & _FLAG_KEYED)
    _exact(body, _CHALLENGE.size + (MAC_SIZE if keyed else 0), "CHALLENGE")
    return int(version), keyed, bytes(nonce), bytes(body[_CHALLENGE.size :])


# -- offer / accept -------------------------------------------------------------------------

_OFFER = struct.Struct("<16s16sQ")
_ACCEPT = struct.Struct("<BQ")
#: ACCEPT status: the migration is new or continues; or it already completed (a lost DONE).
ACCEPT_CONTINUE, ACCEPT_COMPLETED = 0, 1


def encode_offer(offer: Offer) -> bytes:
    req = json.dumps(asdict(offer.requirements), sort_keys=True, separators=(",", ":")).encode()
    if len(req) > _MAX_REQUIREMENTS:
        raise ValueError(f"agent requirements of {len(req)} bytes exceed {_MAX_REQUIREMENTS}")
    return _OFFER.pack(offer.migration_id, offer.agent_id, offer.state_size) + req


def decode_offer(body: memoryview) -> Offer:
    _need(body, _OFFER.size, "OFFER")
    mid, aid, size = _OFFER.unpack_from(body)
    raw = bytes(body[_OFFER.size :])
    if len(raw) > _MAX_REQUIREMENTS:
        raise ProtocolError(f"OFFER requirements of {len(raw)} bytes exceed {_MAX_REQUIREMENTS}")
    try:
        fields: Dict[str, Any] = parse_json(raw)
        if not isinstance(fields, dict):
            raise TypeError("requirements must be a JSON object")
        known = set(AgentRequirements.__dataclass_fields__)
        requirements = AgentRequirements(**{k: v for k, v in fields.items() if k in known})
    except (ValueError, TypeError) as exc:
        raise ProtocolError(f"OFFER requirements are not valid: {exc}") from None
    return Offer(bytes(mid), bytes(aid), requirements, int(size))


def encode_accept(status: int, committed_seq: int) -> bytes:
    return _ACCEPT.pack(status, committed_seq)


def decode_accept(body: memoryview) -> Tuple[int, int]:
    _exact(body, _ACCEPT.size, "ACCEPT")
    status, seq = _ACCEPT.unpack(body)
    if status not in (ACCEPT_CONTINUE, ACCEPT_COMPLETED):
        raise ProtocolError(f"ACCEPT has unknown status {status}")
    return int(status), int(seq)


def encode_reason(reason: str) -> bytes:
    return reason.encode("utf-8", "replace")[:_MAX_REASON]


def decode_reason(body: memoryview) -> str:
    return bytes(body[:_MAX_REASON]).decode("utf-8", "replace")


def refuse_version(version: int) -> str:
    """A receiver's REFUSE reason for a HELLO at ``version`` (:func:`older_version_served`
    reads it: receivers of every release word it so)."""
    speaks = " and ".join(str(v) for v in SUPPORTED_VERSIONS)
    return f"protocol version {version} not supported (this receiver speaks {speaks})"


_REFUSED_VERSION = re.compile(r"^protocol version (\d+) not supported \(this receiver speaks ((?:\d+)(?: and \d+)*)\)$")


def older_version_served(reason: str, version: int) -> Optional[int]:
    """The newest version under ``version`` that a sender speaks and the receiver whose
    REFUSE ``reason`` (:func:`refuse_version`) turned ``version`` down serves, if any: a
    version-3 receiver takes a version-4 sender's migration at version 3."""
    match = _REFUSED_VERSION.match(reason)
    if match is None or int(match.group(1)) != version:
        return None
    served = [v for v in map(int, match.group(2).split(" and ")) if v < version and v in SENDER_VERSIONS]
    return max(served) if served else None


# -- small fixed messages ------------------------------------------------------------------

U64 = struct.Struct("<Q")
U32 = struct.Struct("<I")
_ROUND_DIGEST = struct.Struct("<I16s")


def decode_u64(body: memoryview, what: str) -> int:
    _exact(body, 8, what)
    return int(U64.unpack(body)[0])


def decode_u32(body: memoryview, what: str) -> int:
    _exact(body, 4, what)
    return int(U32.unpack(body)[0])


def encode_round_digest(round_no: int, digest: bytes) -> bytes:
    return _ROUND_DIGEST.pack(round_no, digest)


def decode_round_digest(body: memoryview) -> Tuple[int, bytes]:
    _exact(body, _ROUND_DIGEST.size, "ROUND_DIGEST")
    r, d = _ROUND_DIGEST.unpack(body)
    return int(r), bytes(d)


def decode_commit(body: memoryview) -> Tuple[bytes, bytes]:
    """``(digest, extra)``."""
    _need(body, 16, "COMMIT")
    if body.nbytes - 16 > MAX_EXTRA_BYTES:
        raise ProtocolError(f"COMMIT carries {body.nbytes - 16} bytes of extra, over {MAX_EXTRA_BYTES}")
    return bytes(body[:16]), bytes(body[16:])


# -- chunks ---------------------------------------------------------------------------------

# seq, round, state size, encoding, pages, runs, raw length, digest of the raw pages
_CHUNK = struct.Struct("<QIQBIIQ16s")
_RUN = np.dtype([("start", "<u8"), ("count", "<u4")])


def _runs(indices: npt.NDArray[np.int64]) -> npt.NDArray[Any]:
    """Ascending page indices as (start, count) runs."""
    if not len(indices):
        return np.zeros(0, dtype=_RUN)
    breaks = np.flatnonzero(np.diff(indices) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(indices)]))
    runs = np.empty(len(starts), dtype=_RUN)
    runs["start"] = indices[starts]
    runs["count"] = ends - starts
    return runs


def encode_chunk_header(chunk: Chunk, version: int = VERSION) -> bytes:
    """Everything of a CHUNK body before its payload (header + index runs), for a
    connection at ``version``: from 4 on the digest is bound to the chunk's placement
    (:func:`~cellmigrate.live.pages.placed_digest`)."""
    runs = _runs(chunk.indices)
    digest = chunk.digest
    if version >= 4 and not chunk.placed:
        digest = placed_digest(digest, chunk.seq, chunk.round, chunk.size, chunk.indices)
    head = _CHUNK.pack(
        chunk.seq, chunk.round, chunk.size, int(chunk.encoding), len(chunk.indices), len(runs), chunk.raw_len, digest
    )
    return head + runs.tobytes()


class ChunkHead(NamedTuple):
    """A CHUNK body's fixed header, checked (what the index runs and payload must match)."""

    seq: int
    round: int
    size: int
    encoding: Encoding
    pages: int
    runs: int
    raw_len: int
    digest: bytes

    @property
    def runs_len(self) -> int:
        """Bytes of index runs that follow the header."""
        return self.runs * _RUN.itemsize


#: Bytes of a CHUNK body before its index runs.
CHUNK_HEAD_SIZE = _CHUNK.size


def decode_chunk_head(head: memoryview) -> ChunkHead:
    """The first :data:`CHUNK_HEAD_SIZE` bytes of a CHUNK body: counts checked against
    each other and the limits, the encoding known (``ProtocolError`` else)."""
    _need(head, _CHUNK.size, "CHUNK")
    seq, round_no, size, encoding, pages, nruns, raw_len, digest = _CHUNK.unpack_from(head)
    if encoding not in (Encoding.RAW, Encoding.LZ4, Encoding.PAGES):
        raise ProtocolError(f"CHUNK has unknown encoding {encoding}")
    if pages > _MAX_RUNS or nruns > pages or raw_len > MAX_CHUNK_BYTES:
        raise ProtocolError(f"CHUNK declares {pages} pages in {nruns} runs, {raw_len} bytes: over the limits")
    if (pages == 0) != (nruns == 0):
        raise ProtocolError("CHUNK page count and run count disagree")
    return ChunkHead(int(seq), int(round_no), int(size), Encoding(encoding), int(pages), int(nruns), int(raw_len), bytes(digest))


def decode_chunk_runs(head: ChunkHead, runs_bytes: memoryview) -> npt.NDArray[np.int64]:
    """The page indices of the ``head.runs_len`` bytes of index runs after ``head``:
    runs ascending and disjoint, adding up to ``head.pages`` (``ProtocolError`` else)."""
    _exact(runs_bytes, head.runs_len, "CHUNK runs")
    nruns, pages = head.runs, head.pages
    if not nruns:
        return np.zeros(0, dtype=np.int64)
    runs = np.frombuffer(runs_bytes, dtype=_RUN, count=nruns)
    counts = runs["count"].astype(np.int64)
    starts = runs["start"]
    if int(counts.min()) < 1 or int(counts.sum()) != pages:
        raise ProtocolError("CHUNK runs do not add up to its page count")
    if int(starts.max()) >= 1 << 52:
        raise ProtocolError("CHUNK page index out of range")
    s = starts.astype(np.int64)
    if nruns > 1 and not bool(np.all(s[1:] > s[:-1] + counts[:-1])):
        raise ProtocolError("CHUNK runs are not ascending and disjoint")
    if nruns == 1:  # one run (round 0 of dense data): no expansion arithmetic
        return np.arange(int(s[0]), int(s[0]) + pages, dtype=np.int64)
    # Expand the runs: page k of run r is starts[r] + k.
    offsets = np.repeat(s - np.concatenate(([0], np.cumsum(counts)[:-1])), counts)
    indices: npt.NDArray[np.int64] = offsets + np.arange(pages, dtype=np.int64)
    return indices


def check_payload_len(head: ChunkHead, payload_len: int, version: int = VERSION) -> None:
    """A RAW payload is exactly ``raw_len`` bytes (an LZ4 or PAGES one is checked when
    decoded); PAGES comes in version 3 on, with its table of 5 bytes a page."""
    if head.encoding == Encoding.RAW and payload_len != head.raw_len:
        raise ProtocolError(f"CHUNK payload is {payload_len} bytes, its header says {head.raw_len}")
    if head.encoding == Encoding.PAGES:
        if version < 3:
            raise ProtocolError(f"CHUNK encoding PAGES is not part of protocol version {version}")
        if payload_len < 5 * head.pages:
            raise ProtocolError(f"PAGES CHUNK of {head.pages} pages has {payload_len} bytes, under its table")


def chunk_of(
    head: ChunkHead, indices: npt.NDArray[np.int64], payload: Union[bytes, memoryview], version: int = VERSION
) -> Chunk:
    """The :class:`Chunk` a decoded header, its indices and its payload make, read off a
    connection at ``version`` (from 4 on its digest covers its placement: ``placed``)."""
    return Chunk(
        head.seq, head.round, head.size, indices, head.encoding, payload, head.raw_len, head.digest, placed=version >= 4
    )


def decode_chunk(body: memoryview, version: int = VERSION) -> Chunk:
    """A CHUNK body as a :class:`Chunk` (its payload a view into ``body``).

    Checks what can be checked without the state: counts against each other and the
    body's length, runs ascending and non-overlapping, the page total, the encoding.
    The receiver session then checks the indices against the state and the digest.
    """
    head = decode_chunk_head(body)
    end = _CHUNK.size + head.runs_len
    _need(body, end, "CHUNK")
    indices = decode_chunk_runs(head, body[_CHUNK.size : end])
    payload = body[end:]
    check_payload_len(head, payload.nbytes, version)
    return chunk_of(head, indices, payload, version)


def chunk_parts(chunk: Chunk, version: int = VERSION) -> List[Union[bytes, memoryview]]:
    """The pieces of a CHUNK body for a connection at ``version``, in order (sent
    without joining them)."""
    payload = chunk.payload if isinstance(chunk.payload, memoryview) else memoryview(chunk.payload)
    return [encode_chunk_header(chunk, version), payload]
