"""A frame's buffers written in one GIL-free call (``send_parts``, cython/cm_sendv.h) and the
connection's read-ahead: bytes, partial writes, deadlines, signals, the readable hint."""

from __future__ import annotations

import errno
import os
import signal
import ssl
import socket
import threading
import time
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import _reference
from cellmigrate._backend import PURE_PYTHON, kernels
from cellmigrate.live.protocol import Msg
from cellmigrate.live.transport import Connection, SocketStream

IMPLS = [pytest.param(_reference.send_parts, id="reference")]
if not PURE_PYTHON:
    IMPLS.append(pytest.param(kernels.send_parts, id="compiled"))


@pytest.fixture
def pair() -> Iterator[Tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def _drain(sock: socket.socket, n: int, out: bytearray) -> threading.Thread:
    def run() -> None:
        while len(out) < n:
            got = sock.recv(1 << 20)
            if not got:
                return
            out.extend(got)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


parts_strategy = st.lists(
    st.one_of(st.binary(max_size=3000), st.integers(0, 300_000).map(lambda n: os.urandom(n))), max_size=8
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(parts=parts_strategy, cut=st.integers(0, 100))
@pytest.mark.parametrize("send_parts", IMPLS)
def test_writes_every_byte_in_order_from_skip(send_parts, parts: List[bytes], cut: int) -> None:  # type: ignore[no-untyped-def]
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        whole = b"".join(parts)
        skip = len(whole) * cut // 100
        # Parts of every buffer kind: bytes, bytearray, read-only memoryview, numpy array.
        kinds = [bytes, bytearray, lambda x: memoryview(x), lambda x: np.frombuffer(x, np.uint8)]
        given_parts = [kinds[i % 4](p) for i, p in enumerate(parts)]
        got = bytearray()
        t = _drain(b, len(whole) - skip, got)
        written, err, _ = send_parts(a.fileno(), given_parts, skip, 10.0)
        t.join(10)
        assert (written, err) == (len(whole) - skip, 0)
        assert bytes(got) == whole[skip:]
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("send_parts", IMPLS)
def test_deadline_with_a_peer_that_reads_nothing(send_parts, pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    big = bytes(64 << 20)  # far more than any socket buffer
    t = time.monotonic()
    written, err, _ = send_parts(a.fileno(), [b"head", memoryview(big)], 0, 0.3)
    took = time.monotonic() - t
    assert err == errno.ETIMEDOUT
    assert 0 < written < len(big) + 4  # what the socket buffers took, no more
    assert 0.3 <= took < 5.0


@pytest.mark.parametrize("send_parts", IMPLS)
def test_readable_reports_what_the_peer_sent(send_parts, pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    assert send_parts(a.fileno(), [b"x"], 0, 1.0) == (1, 0, False)
    b.sendall(b"ack")
    time.sleep(0.05)
    assert send_parts(a.fileno(), [b"y"], 0, 1.0) == (1, 0, True)
    b.close()  # a closed peer is readable too (the next read reports it)
    assert send_parts(a.fileno(), [], 0, 1.0)[2] is True


@pytest.mark.parametrize("send_parts", IMPLS)
def test_errors_come_back_as_errno(send_parts, pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    b.close()
    time.sleep(0.05)
    _, err, _ = send_parts(a.fileno(), [bytes(1 << 20)], 0, 1.0)
    assert err in (errno.EPIPE, errno.ECONNRESET)
    with pytest.raises(ValueError):
        send_parts(a.fileno(), [b"x"], 0, -1.0)
    with pytest.raises((TypeError, BufferError, ValueError)):
        send_parts(a.fileno(), ["not a buffer"], 0, 1.0)


@pytest.mark.skipif(PURE_PYTHON, reason="EINTR is the compiled kernel's (os.write retries it in Python)")
def test_a_signal_returns_what_was_written_and_a_second_call_finishes(pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    data = os.urandom(32 << 20)
    seen: List[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        main = threading.main_thread().ident
        assert main == threading.get_ident()
        assert main is not None
        timer = threading.Timer(0.3, lambda: signal.pthread_kill(main, signal.SIGUSR1))
        timer.start()
        written, err, _ = kernels.send_parts(a.fileno(), [data], 0, 20.0)
        timer.join()
        assert err == errno.EINTR and 0 < written < len(data)
        assert seen == [signal.SIGUSR1]  # the handler ran once the call returned
        got = bytearray()
        t = _drain(b, len(data), got)
        rest, err, _ = kernels.send_parts(a.fileno(), [data[:1000], memoryview(data)[1000:]], written, 20.0)
        t.join(20)
        assert (err, written + rest) == (0, len(data)) and bytes(got) == data
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_connection_frames_through_send_parts_and_read_ahead() -> None:
    a, b = socket.socketpair()
    tx, rx = Connection(SocketStream(a), timeout=10), Connection(SocketStream(b), timeout=10)
    try:
        big = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
        got: List[Tuple[Msg, bytes]] = []

        def read() -> None:
            for _ in range(202):
                msg, body = rx.recv()
                got.append((msg, bytes(body)))

        t = threading.Thread(target=read)
        t.start()
        for k in range(100):  # small frames: the reader gets many in one read
            tx.send(Msg.ACK, k.to_bytes(8, "little"))
        tx.send(Msg.CHUNK, b"head", memoryview(big))  # read straight into its buffer
        tx.send(Msg.CHUNK, memoryview(big)[:100_000], b"tail")  # the first bytes from the read-ahead
        for k in range(100):
            tx.send(Msg.ACK, (1000 + k).to_bytes(8, "little"))
        t.join(20)
        assert [int.from_bytes(body, "little") for _, body in got[:100]] == list(range(100))
        assert got[100] == (Msg.CHUNK, b"head" + big.tobytes())
        assert got[101] == (Msg.CHUNK, big.tobytes()[:100_000] + b"tail")
        assert [int.from_bytes(body, "little") for _, body in got[102:]] == list(range(1000, 1100))
        assert rx.bytes_received == tx.bytes_sent
        # The send's readable hint: nothing came back yet, then an ACK did.
        tx.send(Msg.ACK, bytes(8))
        assert tx.readable() is False
        rx.send(Msg.ACK, bytes(8))
        time.sleep(0.05)
        tx.send(Msg.ACK, bytes(8))
        assert tx.readable() is True and not tx.buffered()
        assert tx.recv(Msg.ACK)[0] is Msg.ACK
    finally:
        tx.close()
        rx.close()


def test_a_hint_is_never_used_after_a_read() -> None:
    """A receiver that sends an ACK and then reads the frame that had arrived must not take
    the send's "readable" for the next frame (it would block waiting for it)."""
    a, b = socket.socketpair()
    tx, rx = Connection(SocketStream(a), timeout=10), Connection(SocketStream(b), timeout=10)
    try:
        tx.send(Msg.ACK, bytes(8))
        time.sleep(0.05)
        rx.send(Msg.ACK, bytes(8))  # sees tx's frame waiting: hint True
        rx.recv(Msg.ACK)  # consumes it
        assert rx.readable() is False  # asks the socket, not the stale hint
    finally:
        tx.close()
        rx.close()


RECV_IMPLS = [pytest.param(_reference.recv_some, id="reference")]
if not PURE_PYTHON:
    RECV_IMPLS.append(pytest.param(kernels.recv_some, id="compiled"))


@pytest.mark.parametrize("recv_some", RECV_IMPLS)
def test_recv_some_reads_what_came_then_times_out_then_sees_the_end(recv_some, pair) -> None:  # type: ignore[no-untyped-def]
    a, b = pair
    buf = bytearray(10)
    b.sendall(b"hello")
    assert recv_some(a.fileno(), buf, 1.0) == (5, 0) and buf[:5] == b"hello"
    b.sendall(bytes(range(30)))
    time.sleep(0.05)
    assert recv_some(a.fileno(), buf, 1.0) == (10, 0) and buf == bytes(range(10))  # no more than fits
    assert recv_some(a.fileno(), memoryview(buf)[:4], 1.0) == (4, 0) and buf[:4] == bytes(range(10, 14))
    arr = np.zeros(100, np.uint8)
    assert recv_some(a.fileno(), arr, 1.0) == (16, 0) and arr[:16].tolist() == list(range(14, 30))
    t = time.monotonic()
    assert recv_some(a.fileno(), buf, 0.2) == (0, errno.ETIMEDOUT)
    assert 0.2 <= time.monotonic() - t < 5.0
    threading.Timer(0.1, b.close).start()
    assert recv_some(a.fileno(), buf, 5.0) == (0, 0)  # the end of the stream
    with pytest.raises(ValueError):
        recv_some(a.fileno(), buf, -1.0)
    with pytest.raises(ValueError):
        recv_some(a.fileno(), bytearray(), 1.0)
    with pytest.raises((TypeError, BufferError, ValueError)):
        recv_some(a.fileno(), b"read-only", 1.0)


@pytest.mark.skipif(PURE_PYTHON, reason="EINTR is the compiled kernel's (os.read retries it in Python)")
def test_recv_some_returns_on_a_signal(pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    seen: List[int] = []
    old = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(signum))
    try:
        main = threading.main_thread().ident
        assert main == threading.get_ident() and main is not None
        threading.Timer(0.2, lambda: signal.pthread_kill(main, signal.SIGUSR1)).start()
        t = time.monotonic()
        assert kernels.recv_some(a.fileno(), bytearray(8), 20.0) == (0, errno.EINTR)
        assert time.monotonic() - t < 10 and seen == [signal.SIGUSR1]
    finally:
        signal.signal(signal.SIGUSR1, old)


def test_socket_stream_maps_errors_like_python_sockets() -> None:
    """SocketStream (the compiled paths) raises what socket.recv_into/sendall would:
    TimeoutError past the timeout, ConnectionResetError/BrokenPipeError from the peer."""
    a, b = socket.socketpair()
    s = SocketStream(a)
    try:
        with pytest.raises(TimeoutError):
            s.recv_into(memoryview(bytearray(4)), 0.1)
        with pytest.raises(TimeoutError):
            s.send_parts([bytes(64 << 20)], 0.2)
        b.close()
        with pytest.raises(OSError) as info:
            for _ in range(100):
                s.send_parts([bytes(1 << 20)], 1.0)
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    finally:
        s.close()


@pytest.mark.parametrize("send_parts", IMPLS)
@pytest.mark.parametrize("recv_some", RECV_IMPLS)
def test_a_nan_timeout_is_refused(send_parts, recv_some, pair) -> None:  # type: ignore[no-untyped-def]
    a, _ = pair
    with pytest.raises(ValueError):
        send_parts(a.fileno(), [b"x"], 0, float("nan"))
    with pytest.raises(ValueError):
        recv_some(a.fileno(), bytearray(4), float("nan"))


@pytest.mark.parametrize("recv_some", RECV_IMPLS)
def test_recv_some_takes_any_writable_buffer_and_ignores_blocking_mode(recv_some) -> None:  # type: ignore[no-untyped-def]
    """Any item format, as socket.recv_into; and a socket someone set blocking still
    times out (MSG_DONTWAIT) instead of waiting with the GIL released."""
    a, b = socket.socketpair()
    try:
        a.setblocking(True)
        t = time.monotonic()
        assert recv_some(a.fileno(), bytearray(4), 0.2) == (0, errno.ETIMEDOUT)
        assert time.monotonic() - t < 5.0
        b.sendall(bytes(range(1, 9)))
        time.sleep(0.05)
        signed = np.zeros(4, np.int8)
        assert recv_some(a.fileno(), signed, 1.0) == (4, 0) and signed.tolist() == [1, 2, 3, 4]
        words = memoryview(bytearray(4)).cast("i")
        assert recv_some(a.fileno(), words, 1.0) == (4, 0) and bytes(words) == bytes([5, 6, 7, 8])
    finally:
        a.close()
        b.close()


def test_frames_read_into_buffers_of_any_format() -> None:
    """A store's view need not be of unsigned bytes: a body read into a signed-char view
    works through the read-ahead (the first bytes) and straight reads (the rest)."""
    a, b = socket.socketpair()
    tx, rx = Connection(SocketStream(a), timeout=10), Connection(SocketStream(b), timeout=10)
    try:
        body = np.random.default_rng(3).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
        tx.send(Msg.CHUNK, body)
        msg, length = rx.recv_header(Msg.CHUNK)
        into = memoryview(bytearray(length)).cast("b")
        reader = rx.reader(msg, length)
        reader.read_into(into)
        reader.finish()
        assert bytes(into) == body
    finally:
        tx.close()
        rx.close()


def test_a_recording_stream_records_each_frame_once_over_tls(tmp_path: Any) -> None:
    from cellmigrate.live.replay import RecordingStream

    from live_net import self_signed

    cert, key = self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(cert), str(key))
    client_ctx = ssl.create_default_context(cafile=str(cert))
    listener = socket.create_server(("127.0.0.1", 0))
    got: List[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            rx = Connection(SocketStream(tls), timeout=10)
            got.append(bytes(rx.recv(Msg.CHUNK)[1]))

    t = threading.Thread(target=serve)
    t.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        stream = RecordingStream(client_ctx.wrap_socket(raw, server_hostname="127.0.0.1"))
        tx = Connection(stream, timeout=10)
        tx.send(Msg.CHUNK, b"head", bytes(100_000))  # over _SMALL: sent as parts
        t.join(10)
        assert got == [b"head" + bytes(100_000)]
        assert sum(len(p) for p in stream.sent) == 5 + 4 + 100_000  # header + body, once
        tx.close()
    finally:
        listener.close()
