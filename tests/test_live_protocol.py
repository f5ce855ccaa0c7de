"""The stream protocol's codecs and frame decoder on hostile bytes (hypothesis), pipes, MACs."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, List

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import CellError, digest
from cellmigrate.live import BufferSource, BufferTarget, LiveMigration, MemoryStore, ProtocolError
from cellmigrate.live.errors import AuthenticationError
from cellmigrate.live.leaves import page_digests, page_root
from cellmigrate.live.pages import Chunk, Encoding, pages_digest, placed_digest
from cellmigrate.live.protocol import SENDER_VERSIONS, Msg, decode_chunk, derive_key, encode_chunk_header
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.replay import BytesStream, record_sender_stream
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.transport import Connection, PipeStream, SocketStream

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
STATE = bytes(np.random.default_rng(4).integers(0, 256, 3 * 4096 + 100, dtype=np.uint8)) + bytes(4096)
RECORDED = record_sender_stream(STATE)


@SETTINGS
@given(st.lists(st.integers(0, 5000), unique=True, max_size=300), st.integers(0, 2**40), st.booleans())
def test_chunk_header_round_trip(pages: List[int], size: int, lz4: bool) -> None:
    idx = np.array(sorted(pages), dtype=np.int64)
    payload = b"p" * 10
    chunk = Chunk(7, 3, size, idx, Encoding.LZ4 if lz4 else Encoding.RAW, payload, 10 if not lz4 else 4096, b"d" * 16)
    for version in SENDER_VERSIONS:
        got = decode_chunk(memoryview(encode_chunk_header(chunk, version) + payload), version)
        assert (got.seq, got.round, got.size, got.encoding, got.raw_len) == (7, 3, size, chunk.encoding, chunk.raw_len)
        assert got.indices.tolist() == idx.tolist() and bytes(got.payload) == payload
        # Version 4 carries the page root bound to the placement; 3 the root itself.
        assert got.placed == (version >= 4) and got.digest_for(b"d" * 16) == got.digest
        assert got.digest == (placed_digest(b"d" * 16, 7, 3, size, idx) if version >= 4 else b"d" * 16)


@SETTINGS
@given(st.binary(max_size=600))
def test_chunk_decoder_refuses_garbage_with_protocol_errors_only(blob: bytes) -> None:
    try:
        chunk = decode_chunk(memoryview(blob))
    except ProtocolError:
        return
    assert len(chunk.indices) == len(np.unique(chunk.indices))


def _replay(data: bytes) -> BufferTarget:
    """Feed ``data`` to a fresh receiver: it must end cleanly or with a CellError."""
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=1)
    done = receiver.handle(BytesStream(data))
    if done:
        # Unkeyed, a consistent forgery is possible: the target holds what the digest proved.
        assert target.state is not None
        assert page_root(page_digests(bytes(target.state)), len(target.state)) == receiver.session._pages.root()
    else:
        assert receiver.last_error is None or isinstance(receiver.last_error, CellError)
        assert target.state is None and not target.resumed
    return target


def test_the_recorded_stream_replays_into_a_fresh_receiver() -> None:
    target = _replay(RECORDED)
    assert target.state is not None and bytes(target.state) == STATE


@SETTINGS
@given(st.data())
def test_frame_decoder_on_mutated_streams(data: st.DataObject) -> None:
    blob = bytearray(RECORDED)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
        pos = data.draw(st.integers(0, max(len(blob) - 1, 0)))
        if kind == "flip" and blob:
            blob[pos] ^= data.draw(st.integers(1, 255))
        elif kind == "truncate":
            del blob[pos:]
        elif kind == "insert":
            blob[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
        elif blob:
            del blob[pos : pos + data.draw(st.integers(1, 64))]
    _replay(bytes(blob))


@SETTINGS
@given(st.binary(max_size=2000))
def test_frame_decoder_on_random_bytes(blob: bytes) -> None:
    _replay(blob)


def _frames(data: bytes) -> List[Any]:
    """The unkeyed stream's frames as ``[type, body]`` (a frame: u32 body length, type, body)."""
    frames, at = [], 0
    while at < len(data):
        n = int.from_bytes(data[at : at + 4], "little")
        frames.append([data[at + 4], data[at + 5 : at + 5 + n]])
        at += 5 + n
    return frames


@pytest.mark.parametrize("requirements", [b"[" * 3000 + b"]" * 3000, b'{"x":' * 2500 + b"1" + b"}" * 2500,
                                          b'{"version": "\xff"}'])
def test_an_offer_nested_too_deeply_or_not_utf8_is_a_protocol_error(requirements: bytes) -> None:
    """JSON nested thousands deep fits the OFFER's 16 KiB and made json raise RecursionError,
    which no CellError handler caught: one unauthenticated peer ended the receiver."""
    from cellmigrate.live.protocol import decode_offer

    frames = _frames(RECORDED)
    offer = next(f for f in frames if f[0] == Msg.OFFER)
    body = offer[1][:40] + requirements
    with pytest.raises(ProtocolError, match="OFFER requirements are not valid"):
        decode_offer(memoryview(body))
    offer[1] = body
    forged = b"".join(len(b).to_bytes(4, "little") + bytes([t]) + b for t, b in frames)
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=1)
    assert receiver.handle(BytesStream(forged)) is False  # refused, not raised
    assert isinstance(receiver.last_error, ProtocolError)
    assert target.state is None


def test_migration_over_a_pair_of_pipes() -> None:
    state = np.random.default_rng(9).integers(0, 256, 2 << 20, dtype=np.uint8)
    to_rx, from_tx = os.pipe()
    to_tx, from_rx = os.pipe()
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, key=derive_key(b"pipe key"))
    thread = threading.Thread(target=receiver.handle, args=(PipeStream(to_rx, from_rx),))
    thread.start()
    channel = StreamChannel(lambda: PipeStream(to_tx, from_tx), key=derive_key(b"pipe key"), retries=0)
    LiveMigration(BufferSource(state), channel, chunk_bytes=1 << 19).run()
    thread.join(10)
    for fd in (to_rx, from_tx, to_tx, from_rx):
        os.close(fd)
    assert target.state is not None and bytes(target.state) == state.tobytes()


def test_a_tampered_frame_fails_its_mac() -> None:
    a, b = socket.socketpair()
    left, right = Connection(SocketStream(a), timeout=5), Connection(SocketStream(b), timeout=5)
    key = bytes(range(32))
    left.enable_macs(key, b"S", b"R")
    right.enable_macs(key, b"R", b"S")
    left.send(Msg.ACK, (5).to_bytes(8, "little"))
    assert right.recv(Msg.ACK)[1].tobytes() == (5).to_bytes(8, "little")
    # A frame replayed or forged without the key: same bytes, next counter -> refused.
    a.sendall(len(b"x" * 8).to_bytes(4, "little") + bytes([int(Msg.ACK)]) + b"x" * 8 + bytes(32))
    with pytest.raises(AuthenticationError, match="MAC"):
        right.recv(Msg.ACK)
    left.close()
    right.close()


def test_chunk_digest_covers_the_pages() -> None:
    pages = np.zeros(4096, dtype=np.uint8)
    assert pages_digest(pages) != pages_digest(np.ones(4096, dtype=np.uint8))


def test_socket_reads_keep_their_timeouts_within_the_slack() -> None:
    """A socket's timeout is set again only when the asked one is longer than the set one
    or more than 5 % shorter: a silent peer is reported no earlier than asked and at most
    5 % later, and a longer timeout asked afterwards is honoured."""
    import time

    a, b = socket.socketpair()
    stream = SocketStream(a)
    view = memoryview(bytearray(8))
    try:
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv_into(view, 0.3)
        assert 0.29 <= time.monotonic() - start < 0.3 * 1.05 + 1.0
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv_into(view, 0.29)  # within 5 %: the 0.3 s set before is kept
        assert 0.29 <= time.monotonic() - start < 0.3 * 1.05 + 1.0
        start = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv_into(view, 0.31)  # longer than the set 0.3 s: set again, not cut short
        assert time.monotonic() - start >= 0.305
        timer = threading.Timer(0.6, lambda: b.sendall(b"late"))
        timer.start()
        start = time.monotonic()
        assert stream.recv_into(view, 2.0) == 4 and bytes(view[:4]) == b"late"  # not cut at 0.31 s
        assert time.monotonic() - start >= 0.55
        timer.join()
    finally:
        a.close()
        b.close()


class _RemappingStore:
    """A store whose resize replaces its mapping (``view()`` is valid until the next
    ``resize()``, as StateStore says): resizing while a view is out raises BufferError."""

    def __init__(self) -> None:
        import mmap

        self._mmap = mmap
        self._map: Any = None
        self._n = 0

    def size(self) -> int:
        return self._n

    def resize(self, n: int) -> None:
        new = self._mmap.mmap(-1, n) if n else None
        if new is not None and self._map is not None:
            new[: min(n, self._n)] = self._map[: min(n, self._n)]
        if self._map is not None:
            self._map.close()  # BufferError while a view is exported
        self._map, self._n = new, n

    def view(self) -> memoryview:
        return memoryview(self._map) if self._map is not None else memoryview(bytearray())

    def flush(self) -> None:
        pass


def test_a_state_that_grows_waits_for_the_prefault_before_resizing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The receiver's prefault helper holds a view of the staging: a chunk that grows the
    state (``memory.grow`` during the pause) must not resize the store under it."""
    import time

    from cellmigrate.live import session as session_module

    real = session_module._populate

    def slow_populate(array: Any, lo: int, hi: int) -> bool:
        time.sleep(0.2)  # a helper the scheduler runs late, as on a loaded machine
        return bool(real(array, lo, hi))

    monkeypatch.setattr(session_module, "_populate", slow_populate)
    small = np.random.default_rng(4).integers(0, 256, 4 << 20, dtype=np.uint8)
    grown = np.concatenate([small, np.random.default_rng(5).integers(0, 256, 2 << 20, dtype=np.uint8)])
    current = [small]
    a, b = socket.socketpair()
    target = BufferTarget()
    receiver = LiveReceiver(_RemappingStore(), target, prefault=True)
    errors: List[BaseException] = []

    def serve() -> None:
        try:
            receiver.handle(SocketStream(b))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    source = BufferSource(lambda: current[0], pause=lambda: current.__setitem__(0, grown))
    LiveMigration(source, StreamChannel(lambda: SocketStream(a), retries=0), chunk_bytes=1 << 20, max_rounds=1).run()
    thread.join(30)
    a.close()
    b.close()
    assert not errors and target.state is not None and bytes(target.state) == grown.tobytes()
