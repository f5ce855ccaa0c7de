"""Protocol version 4: a CHUNK's digest covers where its pages go (sequence, round, state
size, page indices), so a header or index run changed in transit fails the chunk itself,
before anything is staged; version-3 streams are still served, and a version-4 sender
speaks version 3 to a receiver not yet upgraded (docs/PROTOCOL.md)."""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Callable, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import CorruptDataError
from cellmigrate.live import BufferSource, BufferTarget, LiveMigration, MemoryStore, RefusedError
from cellmigrate.live import protocol
from cellmigrate.live.pages import placed_digest
from cellmigrate.live.protocol import (
    SENDER_VERSIONS,
    SUPPORTED_VERSIONS,
    VERSION,
    Msg,
    decode_chunk_head,
    older_version_served,
    refuse_version,
)
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.replay import BytesStream, record_sender_stream
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.transport import SocketStream

PAGE = 4096
PAGES = 16
DATA_PAGES = (2, 3, 8)  # one chunk, runs (2, 2) and (8, 1); every other page zero (not sent)


def _state(kind: str) -> bytes:
    """Random data pages (a RAW chunk, written straight into the staging) or repeating
    ones (an LZ4 chunk, decoded and checked before it is copied in)."""
    state = bytearray(PAGES * PAGE)
    rng = np.random.default_rng(11)
    for page in DATA_PAGES:
        fill = rng.integers(1, 256, PAGE, dtype=np.uint8).tobytes() if kind == "raw" else bytes([page]) * PAGE
        state[page * PAGE : (page + 1) * PAGE] = fill
    return bytes(state)


def _frames(stream: bytes) -> List[Tuple[int, int, int]]:
    """``(type, body offset, body length)`` of every frame of an unkeyed stream."""
    out, pos = [], 0
    while pos + 5 <= len(stream):
        length, kind = struct.unpack_from("<IB", stream, pos)
        out.append((kind, pos + 5, length))
        pos += 5 + length
    return out


def _first_chunk(stream: bytes) -> int:
    return next(at for kind, at, _ in _frames(stream) if kind == Msg.CHUNK)


# Each changes one placement field of the first CHUNK and leaves every other check
# satisfied: the indices stay ascending and inside the state, the sizes consistent.
def _grow_state(blob: bytearray, at: int) -> None:
    struct.pack_into("<Q", blob, at + 12, PAGES * PAGE + PAGE)


def _later_round(blob: bytearray, at: int) -> None:
    struct.pack_into("<I", blob, at + 8, 1)


def _move_run(blob: bytearray, at: int) -> None:
    head = decode_chunk_head(memoryview(blob)[at:])
    assert head.runs == 2
    run = at + protocol.CHUNK_HEAD_SIZE + 12  # the second run's u64 first page
    assert struct.unpack_from("<Q", blob, run)[0] == 8
    struct.pack_into("<Q", blob, run, 10)


MUTATIONS = {"state size": _grow_state, "round": _later_round, "index run": _move_run}


def _replay(stream: bytes) -> Tuple[bool, LiveReceiver, BufferTarget, MemoryStore]:
    store, target = MemoryStore(), BufferTarget()
    receiver = LiveReceiver(store, target, timeout=5)
    return receiver.handle(BytesStream(stream)), receiver, target, store


@pytest.mark.parametrize("kind", ["raw", "lz4"])
@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_a_version_4_chunk_moved_in_transit_fails_its_own_digest(kind: str, field: str) -> None:
    state = _state(kind)
    stream = record_sender_stream(state, chunk_bytes=PAGES * PAGE)
    assert stream[9:11] == VERSION.to_bytes(2, "little") == (4).to_bytes(2, "little")
    at = _first_chunk(stream)
    assert decode_chunk_head(memoryview(stream)[at:]).encoding == (0 if kind == "raw" else 1)
    done, _, target, _ = _replay(stream)
    assert done and target.state is not None and bytes(target.state) == state

    blob = bytearray(stream)
    MUTATIONS[field](blob, at)
    done, receiver, target, store = _replay(bytes(blob))
    assert not done and target.state is None
    assert isinstance(receiver.last_error, CorruptDataError)
    assert "chunk 1 digest mismatch" in str(receiver.last_error)
    # Nothing of the chunk was staged: the staging is as the migration started it.
    assert receiver.session is not None and receiver.session.committed_seq == 0
    assert not any(bytes(store.view()))


@pytest.mark.parametrize("field", sorted(MUTATIONS))
def test_a_version_3_chunk_moved_in_transit_is_caught_only_at_the_end(field: str) -> None:
    """What version 4 mends: version 3's digest covers the pages alone, so the moved chunk
    is staged, and the damage shows only when the staged state fails its proof."""
    state = _state("raw")
    stream = record_sender_stream(state, chunk_bytes=PAGES * PAGE, version=3)
    assert stream[9:11] == (3).to_bytes(2, "little")
    done, _, target, _ = _replay(stream)
    assert done and target.state is not None and bytes(target.state) == state
    blob = bytearray(stream)
    MUTATIONS[field](blob, _first_chunk(stream))
    done, receiver, target, _ = _replay(bytes(blob))
    assert not done and target.state is None
    assert receiver.session is not None and receiver.session.committed_seq >= 1  # it was staged


@settings(max_examples=200, deadline=None)
@given(
    st.binary(min_size=16, max_size=16),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**64 - 1),
    st.lists(st.integers(0, 2**52), unique=True, max_size=40),
    st.sampled_from(["root", "seq", "round", "size", "index", "drop", "add"]),
)
def test_placed_digest_changes_with_every_placement_field(
    root: bytes, seq: int, round_no: int, size: int, pages: List[int], what: str
) -> None:
    idx = np.array(sorted(pages), dtype=np.int64)
    digest = placed_digest(root, seq, round_no, size, idx)
    assert digest == placed_digest(root, seq, round_no, size, idx.copy()) and len(digest) == 16
    if what == "root":
        other = placed_digest(bytes([root[0] ^ 1]) + root[1:], seq, round_no, size, idx)
    elif what == "seq":
        other = placed_digest(root, seq ^ 1, round_no, size, idx)
    elif what == "round":
        other = placed_digest(root, seq, round_no ^ 1, size, idx)
    elif what == "size":
        other = placed_digest(root, seq, round_no, size ^ (1 << 12), idx)
    elif what == "index" and len(idx):
        moved = idx.copy()
        moved[-1] += 1
        other = placed_digest(root, seq, round_no, size, moved)
    elif what == "drop" and len(idx):
        other = placed_digest(root, seq, round_no, size, idx[:-1])
    else:  # add a page past the last
        other = placed_digest(root, seq, round_no, size, np.append(idx, (int(idx[-1]) + 1) if len(idx) else 0))
    assert other != digest


def test_a_refused_version_is_read_back_exactly() -> None:
    """The REFUSE text of a version-3 receiver (its release words it so) names what it
    serves; a sender takes the newest of those it speaks. Anything else is no downgrade."""
    assert older_version_served("protocol version 4 not supported (this receiver speaks 2 and 3)", 4) == 3
    assert older_version_served("protocol version 4 not supported (this receiver speaks 2)", 4) is None
    assert older_version_served("protocol version 5 not supported (this receiver speaks 2 and 3)", 4) is None
    assert older_version_served("protocol version 4 not supported (this receiver speaks 3 and 5)", 4) == 3
    assert older_version_served("this receiver requires a shared key (--key-file)", 4) is None
    assert older_version_served(refuse_version(9), 9) == max(SENDER_VERSIONS)
    assert older_version_served(refuse_version(3), 3) is None  # nothing under 3 is spoken
    assert SUPPORTED_VERSIONS == (2, 3, 4) and SENDER_VERSIONS == (3, 4)
    with pytest.raises(ValueError, match="protocol versions"):
        StreamChannel(lambda: BytesStream(b""), version=2)


def _serving(receiver_of: Callable[[], LiveReceiver], connections: List[bytes]) -> Callable[[], SocketStream]:
    """A connect() whose every call is a fresh socket pair served by a new thread; the
    HELLO version of each connection is noted in ``connections``."""
    threads: List[threading.Thread] = []

    def serve(sock: socket.socket) -> None:
        receiver_of().handle(SocketStream(sock))

    def connect() -> SocketStream:
        a, b = socket.socketpair()
        thread = threading.Thread(target=serve, args=(a,), daemon=True)
        thread.start()
        threads.append(thread)
        return _Noting(b, connections)

    return connect


class _Noting(SocketStream):
    """Notes the HELLO's version (bytes 9 and 10 of what is sent first)."""

    def __init__(self, sock: socket.socket, seen: List[bytes]) -> None:
        super().__init__(sock)
        self._seen = seen
        self._head = b""

    def _note(self, parts: Any) -> None:
        if len(self._head) < 11:
            self._head += b"".join(bytes(p) for p in parts)
            if len(self._head) >= 11:
                self._seen.append(self._head[9:11])

    def sendall(self, data: Any, timeout: float) -> None:
        self._note([data])
        super().sendall(data, timeout)

    def send_parts(self, parts: Any, timeout: float) -> Any:
        self._note(parts)
        return super().send_parts(parts, timeout)


@pytest.mark.parametrize("keyed", [False, True])
def test_a_version_4_sender_migrates_to_a_version_3_receiver(monkeypatch: pytest.MonkeyPatch, keyed: bool) -> None:
    """A receiver of the previous release (it serves 2 and 3 and refuses 4 with its
    release's words): the sender connects again at version 3 and the state arrives equal
    and proven."""
    from cellmigrate.live import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "SUPPORTED_VERSIONS", (2, 3))
    monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", (2, 3))  # refuse_version's wording
    key = bytes(range(32)) if keyed else None
    state = np.random.default_rng(3).integers(0, 256, 40 * PAGE + 7, dtype=np.uint8)
    target = BufferTarget()
    hellos: List[bytes] = []
    connect = _serving(lambda: LiveReceiver(MemoryStore(), target, timeout=10, key=key), hellos)
    channel = StreamChannel(connect, retries=0, timeout=10, key=key)
    LiveMigration(BufferSource(state), channel, max_rounds=2, chunk_bytes=8 * PAGE).run()
    assert target.state is not None and bytes(target.state) == state.tobytes()
    assert channel.version == 3
    assert hellos == [(4).to_bytes(2, "little"), (3).to_bytes(2, "little")]


def test_a_receiver_that_serves_no_version_of_ours_is_a_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellmigrate.live import receiver as receiver_module

    monkeypatch.setattr(receiver_module, "SUPPORTED_VERSIONS", (2,))
    monkeypatch.setattr(protocol, "SUPPORTED_VERSIONS", (2,))
    hellos: List[bytes] = []
    connect = _serving(lambda: LiveReceiver(MemoryStore(), BufferTarget(), timeout=10), hellos)
    channel = StreamChannel(connect, retries=0, timeout=10)
    with pytest.raises(RefusedError, match="protocol version 4 not supported"):
        LiveMigration(BufferSource(bytearray(PAGE)), channel).run()
    assert hellos == [(4).to_bytes(2, "little")]


class _MovingFirstChunk(SocketStream):
    """The sender's end of a connection that changes one field of the first CHUNK frame
    it sends (damage TCP missed): its round (0 to 1: the chunk still fits the state), its
    sequence number (1 to 3: out of order), its state size (past any limit) or its first
    page index (past the state)."""

    #: Offsets in the frame: 5 bytes of frame head, then seq u64, round u32, size u64, ...
    FLIPS = {"round": (5 + 8, 0x01), "seq": (5 + 0, 0x02), "size": (5 + 12 + 5, 0x40),
             "index": (5 + protocol.CHUNK_HEAD_SIZE + 3, 0x10)}

    def __init__(self, sock: socket.socket, damage: Optional[str]) -> None:
        super().__init__(sock)
        self.damage = damage

    def send_parts(self, parts: Any, timeout: float) -> Any:
        if self.damage and bytes(parts[0][4:5]) == bytes([Msg.CHUNK]):
            frame = bytearray(b"".join(bytes(p) for p in parts))
            at, bit = self.FLIPS[self.damage]
            frame[at] ^= bit
            parts = [bytes(frame)]
            self.damage = None
        return super().send_parts(parts, timeout)


@pytest.mark.parametrize("version,field", [(3, "round"), (4, "round"), (4, "seq"), (4, "size"), (4, "index")])
def test_a_chunk_moved_in_transit_is_resent_from_version_4(version: int, field: str) -> None:
    """Over real sockets: at version 4 the receiver refuses the moved chunk (its digest,
    or its placement checks, which then say so in the same words), the sender's own copy
    still matches, so it reconnects and resends, and the state arrives equal; at version
    3 a chunk moved within the state is staged and the migration fails (here at the next
    chunk, whose round then runs backwards)."""
    from cellmigrate import CellError

    state = np.random.default_rng(5).integers(0, 256, 24 * PAGE, dtype=np.uint8)
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=10)
    threads: List[threading.Thread] = []
    ends: List[Any] = []  # each connection's end, as the receiver saw it

    def serve(stream: SocketStream) -> None:
        receiver.handle(stream)
        ends.append(receiver.last_error)

    def connect() -> SocketStream:
        a, b = socket.socketpair()
        thread = threading.Thread(target=serve, args=(SocketStream(a),), daemon=True)
        thread.start()
        threads.append(thread)
        return _MovingFirstChunk(b, damage=field if len(threads) == 1 else None)

    channel = StreamChannel(connect, retries=2, retry_delay=0.01, timeout=10, version=version)
    migration = LiveMigration(BufferSource(state), channel, max_rounds=1, chunk_bytes=8 * PAGE)
    if version == 4:
        migration.run()
        assert target.state is not None and bytes(target.state) == state.tobytes()
        assert channel.reconnects == 1 and channel.resent_chunks >= 1
        for thread in threads:
            thread.join(10)
        assert "digest mismatch" in str(ends[0]) and ends[-1] is None
    else:
        with pytest.raises(CellError):
            migration.run()
        assert target.state is None
    for thread in threads:
        thread.join(10)
