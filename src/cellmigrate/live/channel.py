"""What the pre-copy driver needs from whatever carries a migration to the target.

A :class:`Channel` opens a migration (handshake), sends a round's chunks, reports which
chunks the receiver committed (in order, through the ``on_commit`` callback given to
:meth:`Channel.open`, so the sender's page table advances only on acknowledgement), closes a
round with the receiver's digest of its staged state, and commits. The stream protocol
(:mod:`cellmigrate.live.sender`) is one implementation; :class:`InProcessChannel`, which
hands chunks straight to a :class:`~cellmigrate.live.session.ReceiverSession`, is
another (tests, and one-process moves); the Ray integration adds an object-store one.
"""

from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

from .pages import Chunk
from .session import Offer, ReceiverSession

__all__ = ["CommitCallback", "Channel", "InProcessChannel"]

#: Called with each chunk the receiver committed, in sequence order.
CommitCallback = Callable[[Chunk], None]


@runtime_checkable
class Channel(Protocol):
    """The driver's link to one receiver."""

    def open(self, offer: Offer, on_commit: CommitCallback) -> int:
        """Handshake; returns the receiver's committed sequence number (0: a new migration).

        Raises :class:`~cellmigrate.live.session.RefusedError` when the receiver refuses.
        """
        ...

    def send_chunk(self, chunk: Chunk) -> None:
        """Send one chunk (may return before it is acknowledged; may block on flow control)."""
        ...

    def end_round(self, round_no: int) -> bytes:
        """Wait until every chunk sent is committed; the receiver's digest of its staged state."""
        ...

    def commit(self, digest: bytes, extra: bytes) -> None:
        """Final step: the receiver checks ``digest``, adopts the state with ``extra``, resumes.

        Returns once the target agent has resumed; raises when it refused or failed.
        """
        ...

    def abort(self, reason: str) -> None:
        """Tell the receiver to discard the migration (best effort; never raises)."""
        ...

    def close(self) -> None:
        """Release the link."""
        ...


class InProcessChannel:
    """A :class:`Channel` calling a :class:`ReceiverSession` in the same process.

    Chunks are handed over as they are (their payload is encoded and verified exactly as
    on a stream), and committed synchronously.
    """

    def __init__(self, session: ReceiverSession) -> None:
        self.session = session
        self._on_commit: CommitCallback = lambda chunk: None

    def open(self, offer: Offer, on_commit: CommitCallback) -> int:
        """Begin (or continue) the session."""
        self._on_commit = on_commit
        return self.session.begin(offer)

    def send_chunk(self, chunk: Chunk) -> None:
        """Commit the chunk now and report it."""
        if self.session.apply_chunk(chunk):
            self._on_commit(chunk)

    def end_round(self, round_no: int) -> bytes:
        """The session's digest of its staged state."""
        return self.session.end_round(round_no)

    def commit(self, digest: bytes, extra: bytes) -> None:
        """Have the session verify, adopt and resume."""
        self.session.commit(digest, extra)

    def abort(self, reason: str) -> None:
        """Abandon the session."""
        self.session.abandon(reason)

    def close(self) -> None:
        """Nothing to release."""
