"""In-memory streams: replay recorded or hostile bytes into a receiver (tests, fuzzing).

:class:`BytesStream` serves a fixed byte string to whoever reads it and collects what is
written; :func:`record_sender_stream` runs a real migration over a socket pair and returns
the exact bytes the sender wrote (without a key they do not depend on the receiver's
nonce, so they can be replayed into a fresh receiver, mutated or not).
"""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any, Callable, List, Optional, Sequence, Union

from .._types import BufferLike
from .agent import BufferSource, BufferTarget, MemoryStore
from .driver import LiveMigration
from .protocol import VERSION
from .receiver import LiveReceiver
from .sender import StreamChannel
from .transport import SocketStream

__all__ = ["BytesStream", "RecordingStream", "record_sender_stream"]


class BytesStream:
    """A :class:`~cellmigrate.live.transport.Stream` reading from ``data`` (then end of stream)."""

    def __init__(self, data: Union[bytes, bytearray]) -> None:
        self._data = bytes(data)
        self._pos = 0
        self.written = bytearray()

    def recv_into(self, view: memoryview, timeout: float) -> int:
        n = min(view.nbytes, len(self._data) - self._pos)
        view[:n] = self._data[self._pos : self._pos + n]
        self._pos += n
        return n

    def sendall(self, data: Union[bytes, bytearray, memoryview], timeout: float) -> None:
        self.written += data

    def readable(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass


class RecordingStream(SocketStream):
    """A socket stream that keeps a copy of everything it sends."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.sent: List[bytes] = []

    def sendall(self, data: Union[bytes, bytearray, memoryview], timeout: float) -> None:
        self.sent.append(bytes(data))
        super().sendall(data, timeout)

    def send_parts(self, parts: Sequence[Union[bytes, bytearray, memoryview]], timeout: float) -> Optional[bool]:
        self.sent.extend(bytes(p) for p in parts)
        return super().send_parts(parts, timeout)


def record_sender_stream(
    state: BufferLike,
    *,
    chunk_bytes: int = 4096,
    migration_id: bytes = bytes(16),
    max_rounds: int = 0,
    on_round: Optional[Callable[[Any], None]] = None,
    version: int = VERSION,
) -> bytes:
    """The bytes an unkeyed sender writes to migrate ``state``: by default stop-and-copy
    (one round); with ``max_rounds`` that many pre-copy rounds first, ``on_round`` called
    after each (it may change ``state``, e.g. to have pages re-sent as XZR pages).
    ``version``: the protocol version it speaks (one of ``SENDER_VERSIONS``)."""
    a, b = socket.socketpair()
    receiver = LiveReceiver(MemoryStore(), BufferTarget(), timeout=10)
    thread = threading.Thread(target=receiver.handle, args=(SocketStream(a),), daemon=True)
    thread.start()
    recorder = RecordingStream(b)
    channel = StreamChannel(lambda: recorder, retries=0, timeout=10, version=version)
    LiveMigration(
        BufferSource(state), channel, migration_id=migration_id, agent_id=uuid.UUID(int=1), max_rounds=max_rounds,
        chunk_bytes=chunk_bytes, on_round=on_round, downtime_limit=1e-9,
    ).run()
    thread.join(10)
    return b"".join(recorder.sent)
