"""The sending end of the stream protocol: a :class:`~cellmigrate.live.channel.Channel`.

:class:`StreamChannel` keeps the chunks the receiver has not acknowledged yet (at most
``window_bytes`` of them, so a round streams in bounded memory) and hands each one to
the driver's ``on_commit`` when its ACK arrives. When the connection drops or stalls it
reconnects (``retries`` times, backing off as :class:`~cellmigrate.recovery.RecoveryConfig`
says), learns the receiver's committed sequence number from the handshake, and resends
only the chunks after it: committed data is never sent twice.

The final COMMIT is the one step whose outcome can be lost with the connection: the
channel then reconnects and asks; a receiver that completed says so, one that did not
gets the COMMIT again; if it cannot be reached at all (refused, timed out, closed, any
error) :class:`OutcomeUnknownError` tells the driver to keep the source paused. Before
the COMMIT, a transport failure that outlasts the retries is a :class:`ConnectionLostError`
(never a bare ``OSError``).
"""

from __future__ import annotations

import collections
import os
import re
import time
from typing import Callable, Deque, List, Optional, TypeVar

from ..errors import CellError, MigrationFailedError, StateChangedError
from ..recovery import RecoveryConfig
from .channel import CommitCallback
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    OutcomeUnknownError,
    PeerTimeoutError,
    ProtocolError,
    RefusedError,
)
from .pages import Chunk, Encoding, pages_digest
from .protocol import (
    ACCEPT_COMPLETED,
    NONCE_SIZE,
    SENDER_VERSIONS,
    VERSION,
    Handshake,
    Msg,
    chunk_parts,
    decode_accept,
    decode_challenge,
    decode_reason,
    decode_round_digest,
    decode_u64,
    encode_hello,
    encode_offer,
    encode_reason,
    older_version_served,
)
from .session import Offer
from .transport import DEFAULT_TIMEOUT, Connection, Stream

__all__ = ["DEFAULT_WINDOW_BYTES", "StreamChannel"]

#: Unacknowledged page bytes the sender keeps (and may have to resend after a cut).
DEFAULT_WINDOW_BYTES = 24 << 20

T = TypeVar("T")
_RETRYABLE = (ConnectionLostError, PeerTimeoutError, ConnectionError, TimeoutError)
#: The receiver's reason for a chunk that failed its digest (session.apply_chunk).
_MISMATCH = re.compile(r"\bchunk (\d+) digest mismatch\b")


class StreamChannel:
    """A :class:`~cellmigrate.live.channel.Channel` over a byte stream from ``connect()``.

    ``connect`` opens a fresh :class:`~cellmigrate.live.transport.Stream` each time it is
    called (a TCP/Unix/TLS connection, or a pipe pair when ``retries=0``). ``key`` is the
    32-byte protocol key; with it the receiver must prove it holds the key too.
    ``retry_delay`` (seconds) doubles per attempt up to ``max_retry_delay``; pass a
    ``recovery`` config to take ``max_retries`` and the delays from it instead.
    ``version`` is the protocol version offered first (:data:`~.protocol.VERSION`); a
    receiver that refuses it but serves an older one of
    :data:`~.protocol.SENDER_VERSIONS` is connected to again at that one (a receiver
    not yet upgraded), and :attr:`version` says which the migration speaks.
    """

    def __init__(
        self,
        connect: Callable[[], Stream],
        *,
        key: Optional[bytes] = None,
        timeout: float = DEFAULT_TIMEOUT,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        retries: int = 5,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
        recovery: Optional[RecoveryConfig] = None,
        on_reconnect: Optional[Callable[[int, BaseException], None]] = None,
        version: int = VERSION,
    ) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("key must be the 32-byte protocol key (see protocol.derive_key)")
        if version not in SENDER_VERSIONS:
            raise ValueError(f"a sender speaks protocol versions {SENDER_VERSIONS}, not {version!r}")
        if recovery is not None:
            retries = recovery.max_retries
            retry_delay = float(recovery.initial_retry_delay_secs)
            max_retry_delay = float(recovery.max_retry_delay_secs)
        self._connect = connect
        self.key = key
        self.timeout = timeout
        self.window_bytes = window_bytes
        self.retries = retries
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.on_reconnect = on_reconnect
        self.version = version
        self._accepted = False  # a receiver took the offer: it stages this migration
        self._conn: Optional[Connection] = None
        self._offer: Optional[Offer] = None
        self._on_commit: CommitCallback = lambda chunk: None
        self._pending: Deque[Chunk] = collections.deque()
        self._pending_bytes = 0
        self._next_unsent = 1
        #: Reconnections made, and chunks sent again after one (never committed ones; a
        #: resend that a new cut interrupted counts too).
        self.reconnects = 0
        self.resent_chunks = 0
        self.bytes_sent = 0

    # -- connection and handshake ----------------------------------------------------

    def _handshake(self) -> int:
        """Connect, authenticate, offer; returns the committed sequence number."""
        assert self._offer is not None
        conn = Connection(self._connect(), timeout=self.timeout)
        self._conn = conn
        hello = encode_hello(self.key is not None, os.urandom(NONCE_SIZE), self.version)
        conn.send(Msg.HELLO, hello)
        try:
            msg, body = conn.recv(Msg.CHALLENGE, Msg.REFUSE)
        except ProtocolError as exc:  # its first reply is no frame of ours
            raise ProtocolError(f"the peer is not a cellmigrate receiver (its reply: {exc})") from None
        if msg is Msg.REFUSE:
            reason = decode_reason(body)
            older = older_version_served(reason, self.version)
            if older is None:
                raise _refusal(reason)
            # A receiver of an earlier release: its REFUSE ended that connection; the
            # next speaks its version (a forged REFUSE gains nothing: version 3 differs
            # only in what an unkeyed chunk digest covers, and a keyed link MACs it all).
            self._drop()
            self.version = older
            return self._handshake()
        if msg is Msg.ERROR:
            raise ConnectionLostError(f"receiver reported: {decode_reason(body)}")
        version, keyed, _nonce, proof = decode_challenge(body)
        if version != self.version:
            raise RefusedError(f"receiver speaks protocol version {version}, this sender {self.version}")
        if self.key is not None:
            if not keyed:
                raise AuthenticationError("the receiver has no shared key; refusing to send unauthenticated")
            handshake = Handshake(self.key, hello + bytes(body[: body.nbytes - len(proof)]))
            Handshake.check(handshake.receiver_proof(), proof, "the receiver")
            conn.send(Msg.AUTH, handshake.sender_proof())
            conn.enable_macs(handshake.session_key(), b"S", b"R")
        else:
            conn.send(Msg.AUTH)
        conn.send(Msg.OFFER, encode_offer(self._offer))
        msg, body = conn.recv(Msg.ACCEPT, Msg.REFUSE)
        if msg is Msg.REFUSE:
            raise RefusedError(decode_reason(body))
        if msg is Msg.ERROR:
            raise ConnectionLostError(f"receiver reported: {decode_reason(body)}")
        status, committed = decode_accept(body)
        if status == ACCEPT_COMPLETED:
            raise _AlreadyCompleted()
        self._accepted = True
        return committed

    def _drop(self) -> None:
        if self._conn is not None:
            self.bytes_sent += self._conn.bytes_sent
            self._conn.close()
            self._conn = None

    def _reconnect(self, cause: BaseException) -> None:
        """Reconnect after ``cause`` (retrying), then resend what was not committed."""
        self._drop()
        attempt = 0
        while True:
            attempt += 1
            if attempt > self.retries:
                raise _lost(cause)
            time.sleep(min(self.retry_delay * (2 ** (attempt - 1)), self.max_retry_delay))
            self.reconnects += 1
            if self.on_reconnect is not None:
                self.on_reconnect(attempt, cause)
            try:
                committed = self._handshake()
                first = self._pending[0].seq if self._pending else self._next_unsent
                if committed < first - 1:
                    raise MigrationFailedError(
                        f"the receiver holds {committed} chunks but had acknowledged {first - 1}: "
                        "it lost the staged state (restarted?)"
                    )
                self._acknowledged_up_to(committed)
                for chunk in list(self._pending):
                    self.resent_chunks += 1  # counted when it starts: a resend cut short sent bytes too
                    self._send_chunk_frame(chunk)
                return
            except _RETRYABLE as exc:
                cause = exc
                self._drop()
            except OSError as exc:  # connection refused while the receiver restarts
                cause = ConnectionLostError(f"cannot reconnect: {exc}")
                self._drop()

    def _retrying(self, op: Callable[[], T]) -> T:
        while True:
            try:
                if self._conn is None:
                    raise ConnectionLostError("not connected")
                return op()
            except _RETRYABLE as exc:
                self._reconnect(exc)

    # -- acknowledgements ------------------------------------------------------------

    def _acknowledged_up_to(self, seq: int) -> None:
        while self._pending and self._pending[0].seq <= seq:
            chunk = self._pending.popleft()
            self._pending_bytes -= chunk.raw_len
            self._on_commit(chunk)

    def _read_one(self) -> Optional[bytes]:
        """Handle one frame from the receiver: an ACK, or a ROUND_DIGEST (returned)."""
        assert self._conn is not None
        msg, body = self._conn.recv(Msg.ACK, Msg.ROUND_DIGEST)
        if msg is Msg.ERROR:
            raise self._refusal_of(decode_reason(body))
        if msg is Msg.ACK:
            seq = decode_u64(body, "ACK")
            if not self._pending or seq != self._pending[0].seq:
                raise ProtocolError(f"ACK of chunk {seq} out of order")
            self._acknowledged_up_to(seq)
            return None
        _, digest = decode_round_digest(body)
        return digest

    def _send_chunk_frame(self, chunk: Chunk) -> None:
        assert self._conn is not None
        try:
            self._conn.send(Msg.CHUNK, *chunk_parts(chunk, self.version))
        except ConnectionLostError:
            self._raise_refusal_sent()
            raise
        # Read the ACKs already here so the window keeps moving: whether any came is what
        # the send saw, and one read brings them all (no select() after the last one: each
        # system call may wait 5 ms for the GIL while the agent runs Python).
        if self._conn.readable():
            while self._pending and self._read_one() is None and self._conn.buffered():
                pass

    def _raise_refusal_sent(self) -> None:
        """After a send failed: a receiver that refuses a chunk sends ERROR and closes, and
        the send fails first (a broken pipe). Raise that ERROR's error (:meth:`_refusal_of`:
        its reason, not the broken pipe, decides whether a resend may pass) when it is among
        the frames already here; else return, and the send's own error stands."""
        conn = self._conn
        assert conn is not None
        for _ in range(1024):  # ACKs may come first; bounded, all already received
            try:
                if not conn.buffered() and not conn.stream.readable(0):
                    return
                msg, body = conn.recv(Msg.ACK, Msg.ROUND_DIGEST)
            except CellError:
                return  # no whole frame: the send's own error stands
            except OSError:
                return
            if msg is Msg.ERROR:
                raise self._refusal_of(decode_reason(body))

    def _refusal_of(self, reason: str) -> CellError:
        """The error for the receiver's ERROR ``reason``. A chunk that failed its digest
        was damaged in transit (a resend may pass: retryable), unless its pages as this
        sender holds them no longer hash to the digest sent: then the source changed
        under them as they were sent (not paused, or a file written while sent), and a
        resend would fail alike (``StateChangedError``). The receiver ends a connection
        after its ERROR: it is dropped here (an ABORT then needs a new one)."""
        self._drop()
        found = _MISMATCH.search(reason)
        if found is None:
            return _receiver_error(reason)
        seq = int(found.group(1))
        chunk = next((c for c in self._pending if c.seq == seq), None)
        raw = None if chunk is None else chunk.pages if chunk.pages is not None else (
            chunk.payload if chunk.encoding == Encoding.RAW else None)
        if chunk is not None and raw is not None and pages_digest(raw) != chunk.digest:
            return StateChangedError(f"the source state changed while chunk {seq} was sent (its pages no longer "
                                     "match the digest sent): it was not paused, or a file was written meanwhile")
        return ConnectionLostError(f"receiver reported: {reason}")

    # -- the Channel interface ---------------------------------------------------------

    def open(self, offer: Offer, on_commit: CommitCallback) -> int:
        """Connect and offer the migration (retrying a connection that fails to open)."""
        self._offer = offer
        self._on_commit = on_commit
        try:
            return self._handshake()
        except _RETRYABLE as exc:
            self._reconnect(exc)
            return 0
        except OSError as exc:  # not retryable (no route, TLS verification, ...)
            self._drop()
            raise _lost(exc)  # chained to exc

    def send_chunk(self, chunk: Chunk) -> None:
        """Send ``chunk``; block while more than ``window_bytes`` are unacknowledged."""
        self._pending.append(chunk)
        self._pending_bytes += chunk.raw_len
        self._next_unsent = chunk.seq + 1
        try:
            if self._conn is None:
                raise ConnectionLostError("not connected")
            self._send_chunk_frame(chunk)
        except _RETRYABLE as exc:
            self._reconnect(exc)  # resends every pending chunk, this one included
        self._retrying(self._drain_window)

    def _drain_window(self) -> None:
        while self._pending_bytes > self.window_bytes and self._pending:
            self._read_one()

    def end_round(self, round_no: int) -> bytes:
        """ROUND_END, then wait for every ACK and the receiver's digest."""

        def finish() -> bytes:
            assert self._conn is not None
            self._conn.send(Msg.ROUND_END, round_no.to_bytes(4, "little"))
            while True:
                digest = self._read_one()
                if digest is not None:
                    if self._pending:
                        raise ProtocolError("ROUND_DIGEST before every chunk of the round was acknowledged")
                    return digest

        return self._retrying(finish)

    def commit(self, digest: bytes, extra: bytes) -> None:
        """COMMIT and wait for DONE; after a cut, ask the receiver what became of it.

        Only an explicit refusal of the COMMIT (the receiver's digest differs, or it could
        not adopt) is a plain failure; once the COMMIT frame was (even partly) sent,
        anything else that leaves the outcome open - a timeout, a closed or refused
        reconnection, any ``OSError`` or other exception - raises
        :class:`OutcomeUnknownError`: the target may already run the agent.
        """
        refused: List[CellError] = []
        sent = False

        def finish() -> None:
            nonlocal sent
            assert self._conn is not None
            sent = True  # from here on the receiver may have it, whatever happens next
            self._conn.send(Msg.COMMIT, digest, extra)
            msg, body = self._conn.recv(Msg.DONE)
            if msg is Msg.ERROR:
                # Its own "Migration failed: " is ours to say, once.
                reason = decode_reason(body).removeprefix(MigrationFailedError.prefix)
                refused.append(MigrationFailedError(f"the receiver refused the commit: {reason}"))

        try:
            self._retrying(finish)
        except _AlreadyCompleted:
            return  # the receiver completed; only its DONE was lost
        except Exception as exc:  # not only CellError: a refused reconnect is an OSError
            if not sent:
                raise _lost(exc)  # chained to exc
            raise OutcomeUnknownError(
                f"commit sent but its outcome is unknown ({exc or type(exc).__name__}); "
                "the source agent stays paused"
            ) from exc
        finally:
            self._drop()
        if refused:
            raise refused[0]

    def abort(self, reason: str) -> None:
        """Best effort: tell the receiver to discard the migration. When the connection
        is gone (the receiver refused a chunk and closed it, say), one new connection
        carries the ABORT, so a receiver staging the migration does not wait for a
        reconnection that never comes (not with ``retries=0``: a pipe pair's, or a
        command's, where a new connection is a new receiver)."""
        if self._conn is None and self._accepted and self._offer is not None and self.retries > 0:
            try:
                self._handshake()
            except (CellError, OSError):
                self._drop()
        if self._conn is not None:
            try:
                self._conn.send(Msg.ABORT, encode_reason(reason))
            except CellError:
                pass
        self._drop()

    def close(self) -> None:
        """Close the connection."""
        self._drop()


class _AlreadyCompleted(CellError):
    """The receiver reports the migration completed (only seen while committing)."""

    def __init__(self) -> None:
        super().__init__("the receiver already completed this migration")


def _lost(exc: BaseException) -> BaseException:
    """``exc`` as a :class:`CellError`: a transport ``OSError`` becomes ConnectionLostError."""
    if isinstance(exc, CellError) or not isinstance(exc, OSError):
        return exc
    lost = ConnectionLostError(f"connection lost: {exc or type(exc).__name__}")
    lost.__cause__ = exc
    return lost


def _refusal(reason: str) -> CellError:
    if "key" in reason:
        return AuthenticationError(reason)
    return RefusedError(reason)


def _receiver_error(reason: str) -> CellError:
    """An ERROR frame from the receiver: it refuses this migration's data."""
    if "MAC" in reason or "key" in reason:
        return AuthenticationError(f"receiver reported: {reason}")
    return ProtocolError(f"receiver reported: {reason}")
