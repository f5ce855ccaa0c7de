"""The receiving end of the stream protocol: handshake, compatibility check, staging, commit.

:class:`LiveReceiver` serves connections one at a time into one
:class:`~cellmigrate.live.session.ReceiverSession`. A connection that drops mid-migration
leaves the session at its last committed chunk; the sender reconnects and continues from
there (``resume_timeout`` bounds how long :meth:`LiveReceiver.serve` waits for it before
discarding what was staged). A peer that stalls, sends garbage or fails authentication
is dropped with a clear error, and the staged state stays exactly as last committed.
"""

from __future__ import annotations

import os
import socket
import ssl
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..checksum import PAGE_SIZE
from ..errors import CellError, MigrationFailedError
from ..validation import MigrationValidator, NodeCapabilities
from .agent import StateStore, TargetAgent
from .errors import AbortedError, AuthenticationError, ConnectionLostError, PeerTimeoutError, ProtocolError, RefusedError
from .protocol import (
    ACCEPT_COMPLETED,
    ACCEPT_CONTINUE,
    NONCE_SIZE,
    SUPPORTED_VERSIONS,
    Handshake,
    Msg,
    CHUNK_HEAD_SIZE,
    check_payload_len,
    chunk_of,
    decode_chunk_head,
    decode_chunk_runs,
    decode_commit,
    decode_hello,
    decode_offer,
    decode_reason,
    decode_u32,
    encode_accept,
    encode_challenge,
    encode_reason,
    encode_round_digest,
    refuse_version,
)
from .session import ReceiverSession
from .leaves import PAGE_DIGEST_SIZE, Digests, page_digests, page_kernel
from .pages import Chunk
from .transport import DEFAULT_TIMEOUT, Connection, FrameReader, Stream, accept

__all__ = ["DEFAULT_RESUME_TIMEOUT", "LiveReceiver"]

#: Seconds a receiver waits for a dropped sender to reconnect before discarding the staged state.
DEFAULT_RESUME_TIMEOUT = 60.0


class LiveReceiver:
    """Serve live migrations into ``store``, handing the proven state to ``target``.

    ``key`` is the 32-byte protocol key (:func:`~cellmigrate.live.protocol.derive_key` of
    the shared secret); with it, senders must prove they hold it and every frame is
    MAC-checked; without it, keyed senders are still served (they detect the missing
    proof and refuse on their side). ``capabilities`` are checked against each offer's
    requirements (refused with the check's reason). ``prefault``: see
    :class:`~cellmigrate.live.session.ReceiverSession`. ``finished`` maps migrations
    completed earlier on the same address (migration id, 16 bytes, to its committed
    chunk count; see :attr:`finished_migration`) whose sender, reconnecting because its
    DONE was lost, is told it completed, while new migrations are served: what
    :meth:`linger` does for one, without refusing new senders meanwhile.
    """

    def __init__(
        self,
        store: StateStore,
        target: TargetAgent,
        *,
        key: Optional[bytes] = None,
        capabilities: Optional[NodeCapabilities] = None,
        validator: Optional[MigrationValidator] = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_state_size: int = 0,
        prefault: Optional[bool] = None,
        finished: Optional[Mapping[bytes, int]] = None,
    ) -> None:
        if key is not None and len(key) != 32:
            raise ValueError("key must be the 32-byte protocol key (see protocol.derive_key)")
        self.key = key
        self.timeout = timeout
        self.session = ReceiverSession(
            store, target, capabilities=capabilities, validator=validator, max_state_size=max_state_size,
            prefault=prefault,
        )
        #: The last error that ended a connection (None after a clean one).
        self.last_error: Optional[CellError] = None
        self.completed = 0
        #: Only tell reconnecting senders the outcome of the finished migration (see linger).
        self.answer_only = False
        self._finished: Dict[bytes, int] = dict(finished or {})

    @property
    def finished_migration(self) -> Optional[Tuple[bytes, int]]:
        """``(migration id, committed chunks)`` of the migration this receiver completed,
        else None: an entry of the next receiver's ``finished``."""
        s = self.session
        return (s.offer.migration_id, s.committed_seq) if s.completed and s.offer is not None else None

    @property
    def in_progress(self) -> bool:
        """A migration was offered and is neither completed nor abandoned."""
        s = self.session
        return s.offer is not None and not (s.completed or s.failed)

    def handle(self, stream: Stream) -> bool:
        """Serve one connection; True when it completed a migration (the target resumed)."""
        conn = Connection(stream, timeout=self.timeout, buffers=2)
        self.last_error = None
        try:
            return self._handle(conn)
        except (ConnectionLostError, PeerTimeoutError, AbortedError) as exc:
            self.last_error = exc  # resumable (the session keeps its committed point), or the sender's own end
        except CellError as exc:  # garbage, bad MAC, refused, a chunk that failed its checks
            self.last_error = exc
            _try_send(conn, Msg.ERROR, encode_reason(str(exc)))
        finally:
            conn.close()
        return False

    def _handle(self, conn: Connection) -> bool:
        try:
            _, body = conn.recv(Msg.HELLO)
        except ProtocolError as exc:  # e.g. an HTTP request: say what it is not
            raise ProtocolError(f"the peer is not a cellmigrate sender ({exc})") from None
        version, keyed, _nonce = decode_hello(body)
        hello = bytes(body)
        if version not in SUPPORTED_VERSIONS:
            conn.send(Msg.REFUSE, encode_reason(refuse_version(version)))
            raise RefusedError(f"sender speaks protocol version {version}")
        if self.key is not None and not keyed:
            conn.send(Msg.REFUSE, encode_reason("this receiver requires a shared key (--key-file)"))
            raise AuthenticationError("sender offered no key; this receiver requires one")
        challenge = encode_challenge(self.key is not None, os.urandom(NONCE_SIZE), version)
        handshake = Handshake(self.key, hello + challenge) if self.key is not None else None
        conn.send(Msg.CHALLENGE, challenge, handshake.receiver_proof() if handshake else b"")
        msg, body = conn.recv(Msg.AUTH, Msg.ABORT)
        _raise_if_error(msg, body)
        if handshake is not None:
            Handshake.check(handshake.sender_proof(), body, "the sender")
            conn.enable_macs(handshake.session_key(), b"R", b"S")
        msg, body = conn.recv(Msg.OFFER, Msg.ABORT)
        _raise_if_error(msg, body)
        offer = decode_offer(body)
        session = self.session
        if session.completed and session.offer is not None and session.offer.migration_id == offer.migration_id:
            conn.send(Msg.ACCEPT, encode_accept(ACCEPT_COMPLETED, session.committed_seq))  # its DONE was lost
            return False
        if offer.migration_id in self._finished:  # completed by an earlier receiver here
            conn.send(Msg.ACCEPT, encode_accept(ACCEPT_COMPLETED, self._finished[offer.migration_id]))
            return False
        if self.answer_only:
            conn.send(Msg.REFUSE, encode_reason("this receiver has finished its migration"))
            raise RefusedError("offer after the receiver finished")
        try:
            committed = session.begin(offer)
        except RefusedError as exc:
            conn.send(Msg.REFUSE, encode_reason(exc.message))
            raise
        conn.send(Msg.ACCEPT, encode_accept(ACCEPT_CONTINUE, committed))
        # A chunk is verified and written on a helper thread while the next frame arrives
        # (both mostly outside the GIL: socket reads, LZ4, pwrite/memcpy). Its ACK goes out
        # as soon as it is done, or once the next frame is in: order is kept either way.
        # A raw chunk bound for pages still zero in the staging (round 0) skips all that:
        # it is read from the socket straight into the staging (see _receive_direct).
        pending: Optional["Future[bool]"] = None
        pending_chunk: Optional[Chunk] = None
        prefaulting: Optional["Future[None]"] = None

        def settle() -> None:
            nonlocal pending, pending_chunk
            if pending is not None and pending_chunk is not None:
                job, seq = pending, pending_chunk.seq
                pending = pending_chunk = None
                job.result()  # re-raises the chunk's error (nothing of it was written)
                conn.send(Msg.ACK, seq.to_bytes(8, "little"))

        def prefaulted() -> None:
            # The prefault holds a view of the store: it must be done before the store is
            # resized (a view is valid until then) or the session ends. It is best effort,
            # but an exception in it is a bug: raised here.
            nonlocal prefaulting
            job, prefaulting = prefaulting, None
            if job is not None:
                job.result()

        with ThreadPoolExecutor(1, thread_name_prefix="cellmigrate-rx") as worker:
            while True:
                while pending is not None and not pending.done() and not conn.readable():
                    wait([pending], timeout=0.002)
                if pending is not None and pending.done():
                    settle()
                msg, length = conn.recv_header(Msg.CHUNK, Msg.ROUND_END, Msg.COMMIT, Msg.ABORT)
                if msg is Msg.CHUNK:
                    reader = conn.reader(msg, length)
                    head = decode_chunk_head(reader.read(CHUNK_HEAD_SIZE))
                    chunk = chunk_of(head, decode_chunk_runs(head, reader.read(head.runs_len)), b"", version)
                    check_payload_len(head, reader.remaining, version)
                    if session.can_apply_direct(chunk, pending_chunk):
                        settle()  # the staging must hold every chunk before this one
                        if chunk.size != session.store.size():
                            prefaulted()  # the chunk resizes the store
                        if _receive_direct(session, chunk, reader):
                            conn.send(Msg.ACK, chunk.seq.to_bytes(8, "little"))
                            # The helper keeps faulting in ahead; this thread does not wait
                            # for it (where it falls behind, the socket read faults the pages
                            # in itself and the helper's call skips them).
                            if session.can_prefault and (prefaulting is None or prefaulting.done()):
                                prefaulted()
                                prefaulting = worker.submit(session.prefault, _PREFAULT)
                            continue
                    chunk.payload = reader.read(reader.remaining)
                    reader.finish()
                    settle()
                    pending, pending_chunk = worker.submit(session.apply_chunk, chunk), chunk
                    continue
                body = conn.recv_body(msg, length)
                settle()
                prefaulted()
                if msg is Msg.ROUND_END:
                    round_no = decode_u32(body, "ROUND_END")
                    conn.send(Msg.ROUND_DIGEST, encode_round_digest(round_no, session.end_round(round_no)))
                    # Make the round durable while the sender scans the next one, so the
                    # final commit (inside the agent's pause) has only its last round to sync.
                    session.store.flush()
                elif msg is Msg.COMMIT:
                    digest, extra = decode_commit(body)
                    session.commit(digest, extra)  # raises (and abandons) on a mismatch
                    self.completed += 1
                    _try_send(conn, Msg.DONE)
                    return True
                elif msg is Msg.ABORT:
                    reason = decode_reason(body)
                    session.abandon(f"sender aborted: {reason}")
                    raise AbortedError(f"the sender aborted the migration: {reason}")
                else:  # ERROR: the sender gives this connection up; the session may resume
                    raise ConnectionLostError(f"sender reported: {decode_reason(body)}")

    def serve(
        self,
        listener: socket.socket,
        *,
        tls: Optional[ssl.SSLContext] = None,
        keep_listening: bool = False,
        resume_timeout: float = DEFAULT_RESUME_TIMEOUT,
        idle_timeout: Optional[float] = None,
        on_drop: Optional[Callable[[CellError], None]] = None,
    ) -> int:
        """Accept connections until one migration completes (or forever with ``keep_listening``).

        Returns the number of completed migrations once ``idle_timeout`` (None: wait
        forever) passes with no connection. Raises ``ConnectionLostError`` when a sender
        that dropped mid-migration does not come back within ``resume_timeout``,
        :class:`~cellmigrate.live.errors.AbortedError` when the sender aborts its
        migration, and the refusal when this side refused it for good (a commit whose
        proof failed, a target that could not adopt), these two unless
        ``keep_listening``; in each case the staged state is discarded and the target's
        own state is unchanged. ``on_drop`` is told why each connection
        that did not complete a migration ended.
        """
        while True:
            waiting = self.in_progress
            try:
                stream = accept(listener, resume_timeout if waiting else idle_timeout, tls)
            except ConnectionLostError as exc:  # a failed TLS handshake: next connection
                self.last_error = exc
                if on_drop is not None:
                    on_drop(exc)
                continue
            if stream is None:
                if waiting:
                    reason = f"the sender did not reconnect within {resume_timeout:g} s"
                    self.session.abandon(reason)
                    raise ConnectionLostError(reason)
                return self.completed
            if self.handle(stream):
                if not keep_listening:
                    return self.completed
            elif not keep_listening and (isinstance(self.last_error, AbortedError) or self.session.failed):
                # The sender aborted, or this side refused the migration for good (its
                # commit, say): nothing more will come for it.
                raise self.last_error or MigrationFailedError("the migration failed")
            elif on_drop is not None and self.last_error is not None:
                on_drop(self.last_error)


    def linger(self, listener: socket.socket, seconds: float, tls: Optional[ssl.SSLContext] = None) -> None:
        """After a completion, answer senders whose DONE was lost ("completed") for ``seconds``."""
        self.answer_only = True
        try:
            self.serve(listener, tls=tls, idle_timeout=seconds)
        finally:
            self.answer_only = False


# Pieces a chunk's pages are read in: each is hashed right after it lands, from cache.
_PIECE = 1 << 20
# Bytes of the staging past the last in-place chunk a helper thread faults in ahead.
_PREFAULT = 32 << 20


def _receive_direct(session: ReceiverSession, chunk: Chunk, reader: FrameReader) -> bool:
    """Read ``chunk``'s pages from ``reader`` straight into the staging and commit them
    (:meth:`ReceiverSession.apply_direct`); False when the session wants the copy path."""

    kernel = page_kernel()  # looked up once a chunk: a piece costs a socket read and one kernel call

    def fill(views: List[memoryview]) -> Digests:
        out: Digests = np.empty((len(chunk.indices), PAGE_DIGEST_SIZE), dtype=np.uint8)
        k = 0
        for view in views:
            for lo in range(0, view.nbytes, _PIECE):
                piece = view[lo : lo + _PIECE]
                reader.read_into(piece)
                # Hashed from the cache, right after the piece landed.
                n = -(-piece.nbytes // PAGE_SIZE)
                if kernel is not None:
                    kernel(piece, out[k : k + n])
                else:
                    out[k : k + n] = page_digests(piece, 1)
                k += n
        reader.finish()  # the MAC, before anything counts as received
        return out

    return session.apply_direct(chunk, fill) is not None


def _raise_if_error(msg: Msg, body: memoryview) -> None:
    if msg is Msg.ERROR:
        raise ConnectionLostError(f"sender reported: {decode_reason(body)}")
    if msg is Msg.ABORT:  # before its offer: e.g. this receiver failed to prove the key
        raise ConnectionLostError(f"the sender gave up before offering a migration: {decode_reason(body)}")


def _try_send(conn: Connection, msg: Msg, body: bytes = b"") -> None:
    try:
        conn.send(msg, body)
    except CellError:
        pass
