"""A live-migration channel through Ray: chunks travel in the object store, node to node.

:class:`RayChannel` is the :class:`~cellmigrate.live.channel.Channel` the pre-copy driver
(:class:`~cellmigrate.live.driver.LiveMigration`, running in the source actor) sends its
rounds through. Each chunk's encoded pages are ``ray.put`` into the source node's object
store as a ``uint8`` array; the target actor's ``_cellmigrate_chunk`` receives the object
reference (nested in a list, so Ray does not resolve it before the call is ordered),
fetches the pages — Ray's object manager copies them from the source node's store to the
target node's, without pickling — verifies the chunk's digest and commits it. The reply
is the acknowledgement that advances the sender's page table; the object is released then.

Flow control: at most ``max_bytes_in_flight`` bytes of payload are in the object store
unacknowledged (at least one chunk, whatever its size). Every wait has ``timeout``.

Errors are the live driver's: the target's refusals arrive as the
:class:`~cellmigrate.errors.CellError` it raised (``CorruptDataError`` for a damaged
chunk); a dead target actor or node is :class:`~cellmigrate.live.errors.ConnectionLostError`;
silence is :class:`~cellmigrate.live.errors.PeerTimeoutError`. A commit whose outcome is
unknown (timeout) fences the target — the actor is killed, so it cannot run the agent —
and fails like any other error, so the source resumes.
"""

from __future__ import annotations

import collections
from typing import Any, Deque, Dict, NoReturn, Optional, Tuple, Type

import numpy as np
import ray

from .. import errors as _core_errors
from ..errors import CellError, MigrationFailedError
from ..live import errors as _live_errors
from ..live.channel import CommitCallback
from ..live.errors import ConnectionLostError, OutcomeUnknownError, PeerTimeoutError
from ..live.pages import Chunk
from ..live.session import Offer

__all__ = ["RayChannel", "DEFAULT_TIMEOUT", "DEFAULT_BYTES_IN_FLIGHT", "raise_from_ray", "error_class", "remote_error"]

#: Seconds any single step (a chunk's acknowledgement, a round's digest, the commit) may take.
DEFAULT_TIMEOUT = 60.0
#: Unacknowledged payload bytes one migration may keep in the object store.
DEFAULT_BYTES_IN_FLIGHT = 64 << 20


def error_class(name: str) -> Type[CellError]:
    """The cellmigrate error class called ``name`` (``MigrationFailedError`` if unknown)."""
    for module in (_live_errors, _core_errors):
        cls = getattr(module, name, None)
        if isinstance(cls, type) and issubclass(cls, CellError):
            return cls
    return MigrationFailedError


def remote_error(name: str, message: str) -> CellError:
    """The error ``name`` (a class name, as an actor reported it) carrying ``message``:
    of that class when it is built from a message alone, else of its nearest base class
    that is (``InputTooLargeError`` needs its size and limit: a ``CorruptDataError``)."""
    for cls in error_class(name).__mro__:
        if isinstance(cls, type) and issubclass(cls, CellError):
            try:
                return cls(message)
            except TypeError:
                continue
    return MigrationFailedError(message)


def raise_from_ray(exc: BaseException, what: str) -> NoReturn:
    """Re-raise a Ray error from a call to the target as the live driver's error."""
    if isinstance(exc, ray.exceptions.GetTimeoutError):
        raise PeerTimeoutError(f"{what}: no answer from the target actor in time") from None
    if isinstance(exc, ray.exceptions.RayTaskError):
        cause = exc.cause
        if isinstance(cause, CellError):
            raise remote_error(type(cause).__name__, cause.message) from None
        raise MigrationFailedError(f"{what}: the target actor failed: {cause!r}") from None
    if isinstance(exc, (ray.exceptions.RayActorError, ray.exceptions.RayError)):
        raise ConnectionLostError(f"{what}: the target actor is gone ({type(exc).__name__}: {exc})") from None
    raise exc


class RayChannel:
    """A :class:`~cellmigrate.live.channel.Channel` to a target actor, through the object store.

    ``target`` is the handle of an actor mixing in
    :class:`~cellmigrate.ray.actor.MigratableActor`. ``options`` are passed to its
    ``_cellmigrate_begin`` (audit sink, capabilities, limits, timeout).
    """

    def __init__(
        self,
        target: Any,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_bytes_in_flight: int = DEFAULT_BYTES_IN_FLIGHT,
        options: Optional[Dict[str, Any]] = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        if max_bytes_in_flight < 1:
            raise ValueError(f"max_bytes_in_flight must be >= 1, got {max_bytes_in_flight}")
        self.target = target
        self.timeout = float(timeout)
        self.max_bytes_in_flight = int(max_bytes_in_flight)
        self.options: Dict[str, Any] = dict(options or {})
        self.options.setdefault("timeout", self.timeout)
        self.bytes_in_flight = 0
        self.peak_bytes_in_flight = 0
        self.resent_chunks = 0
        self._on_commit: CommitCallback = lambda chunk: None
        # (chunk, its payload's object ref, the acknowledgement ref), oldest first
        self._pending: Deque[Tuple[Chunk, Any, Any]] = collections.deque()

    def _get(self, ref: Any, what: str) -> Any:
        try:
            return ray.get(ref, timeout=self.timeout)
        except ray.exceptions.RayError as exc:
            raise_from_ray(exc, what)

    def put(self, chunk: Chunk) -> Any:
        """Put ``chunk``'s payload into the object store; its object reference."""
        return ray.put(np.frombuffer(chunk.payload, dtype=np.uint8))

    def open(self, offer: Offer, on_commit: CommitCallback) -> int:
        """Offer the migration to the target actor; returns its committed chunk count."""
        self._on_commit = on_commit
        return int(self._get(self.target._cellmigrate_begin.remote(offer, self.options), "offer"))

    def send_chunk(self, chunk: Chunk) -> None:
        """Put the chunk in the object store and ask the target to take it."""
        size = chunk.wire_len
        while self._pending and self.bytes_in_flight + size > self.max_bytes_in_flight:
            self._drain_one()
        ref = self.put(chunk)
        meta = (chunk.seq, chunk.round, chunk.size, chunk.indices, int(chunk.encoding), chunk.raw_len, chunk.digest)
        ack = self.target._cellmigrate_chunk.remote(meta, [ref])
        self._pending.append((chunk, ref, ack))
        self.bytes_in_flight += size
        self.peak_bytes_in_flight = max(self.peak_bytes_in_flight, self.bytes_in_flight)

    def _drain_one(self) -> None:
        chunk, _ref, ack = self._pending.popleft()
        self.bytes_in_flight -= chunk.wire_len
        if self._get(ack, f"chunk {chunk.seq}"):
            self._on_commit(chunk)
        else:
            self.resent_chunks += 1

    def _drain(self) -> None:
        while self._pending:
            self._drain_one()

    def end_round(self, round_no: int) -> bytes:
        """Wait for every chunk's acknowledgement; the target's digest of its staged state."""
        self._drain()
        return bytes(self._get(self.target._cellmigrate_end_round.remote(round_no), f"end of round {round_no}"))

    def commit(self, digest: bytes, extra: bytes) -> None:
        """The target checks ``digest``, adopts the state and resumes; returns once it has."""
        self._drain()
        try:
            ray.get(self.target._cellmigrate_commit.remote(digest, extra), timeout=self.timeout)
        except ray.exceptions.GetTimeoutError:
            # The target may be adopting or running the agent: kill it, so that exactly
            # one copy of the agent runs (the source, which resumes on this error).
            self._kill_target("no answer from the target actor in time")
            raise PeerTimeoutError("commit: no answer from the target actor in time; target actor killed") from None
        except ray.exceptions.RayTaskError as exc:  # the target answered: a refusal
            raise_from_ray(exc, "commit")
        except ray.exceptions.RayError as exc:
            # No answer (ActorUnavailableError: "may or may not have executed"; a died
            # actor): the outcome is unknown, so the target goes, as on a timeout.
            self._kill_target(f"the target actor did not answer ({type(exc).__name__}: {exc})")
            raise ConnectionLostError(
                f"commit: the target actor did not answer ({type(exc).__name__}: {exc}); target actor killed"
            ) from None

    def _kill_target(self, why: str) -> None:
        """Kill the target after a commit without an answer; when even that fails, the
        target may run the agent: ``OutcomeUnknownError`` (the source stays paused)."""
        try:
            ray.kill(self.target, no_restart=True)
        except Exception as exc:
            raise OutcomeUnknownError(
                f"commit: {why}, and the target actor could not be killed ({type(exc).__name__}: {exc}): "
                "the source agent stays paused"
            ) from None

    def abort(self, reason: str) -> None:
        """Tell the target to discard what it staged (best effort, never raises)."""
        self._pending.clear()
        self.bytes_in_flight = 0
        try:
            self.target._cellmigrate_abort.remote(reason)
        except Exception:  # the target may be gone: nothing to tell
            pass

    def close(self) -> None:
        """Drop the references of unacknowledged chunks (their objects are freed)."""
        self._pending.clear()
        self.bytes_in_flight = 0

