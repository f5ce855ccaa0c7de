"""The actor protocol: what a Ray actor exposes so that its agent can be migrated.

A migratable actor class mixes in :class:`MigratableActor` and implements two methods;
the other three have working defaults::

    @ray.remote(max_concurrency=4)
    class Worker(MigratableActor):
        def __init__(self, size: int) -> None:
            self.state = np.zeros(size, dtype=np.uint8)

        def step(self, i: int) -> None:
            with self.cellmigrate_writing():       # paused -> waits; pause waits for it
                self.state[i] += 1

        def cellmigrate_state(self) -> np.ndarray:  # the live buffer, read in place
            return self.state

        def cellmigrate_adopt(self, state: np.ndarray, extra: bytes) -> None:
            self.state = state                      # the proven copy, handed over (no copy)

The protocol (every method runs inside the actor's process; docs/RAY.md has the details):

``cellmigrate_state() -> buffer``
    The agent's state: a C-contiguous buffer (numpy array, bytearray, mmap...), read in
    place while the agent keeps writing. Called at the start of every round.
``cellmigrate_pause()`` / ``cellmigrate_resume()``
    Stop writing the state (return only once no write is in progress) / write again.
    Default: a :class:`WriteGate` that :meth:`MigratableActor.cellmigrate_writing` blocks.
``cellmigrate_adopt(state: numpy.ndarray, extra: bytes)``
    On the new actor only, before its ``cellmigrate_resume``: take ``state`` (a writable
    ``uint8`` array proven equal, byte for byte, to the source's paused state; yours to
    keep) and the ``extra`` blob.
``cellmigrate_extra() -> bytes``
    A small blob (≤ 1 MiB) read while the source is paused: counters, RNG state, anything
    outside the buffer. Default ``b""``.

The new actor is built with the constructor arguments the source actor was built with
(recorded by the mixin; ``migrate(..., args=, kwargs=)`` overrides them), and starts
paused: :attr:`MigratableActor.cellmigrate_is_replica` is true and the gate is closed
until the migration has proved the state and called ``cellmigrate_resume``. A
constructor that starts an agent loop should let it write only through
``cellmigrate_writing()`` (or check ``cellmigrate_is_replica``).

Give the actor ``max_concurrency`` ≥ 2 so that its own methods run while a migration
reads its state; the migration endpoints (``_cellmigrate_*``) are ordered and locked
by the mixin whatever the concurrency. They are called by
:func:`cellmigrate.ray.migrate`, never by users.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import traceback
import uuid
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import numpy.typing as npt
import ray

from .._buffers import as_bytes_view
from .._types import BufferLike
from ..audit import MigrationAuditLog
from ..errors import CellError, CorruptDataError, InvalidStateError
from ..live.agent import MAX_EXTRA_BYTES, MemoryStore
from ..live.channel import Channel
from ..live.driver import LiveMigration, RoundStats
from ..live.errors import OutcomeUnknownError, PeerTimeoutError
from ..live.page_cache import DEFAULT_PAGE_CACHE_BYTES
from ..live.pages import Chunk, Encoding
from ..live.session import Offer, ReceiverSession
from ..progress import MigrationProgressEvent, ProgressEventKind
from ..validation import MigrationValidator
from .audit import RemoteAuditSink
from .channel import RayChannel

__all__ = ["MigratableAgent", "MigratableActor", "WriteGate", "REPLICA_KWARG"]

#: The keyword :func:`~cellmigrate.ray.migrate` adds when it builds the new actor; the
#: mixin removes it before the actor's own ``__init__`` sees it.
REPLICA_KWARG = "_cellmigrate_replica"

# Entries each side's audit log keeps in memory (the fleet sink keeps everything).
_RING = 64

U8Array = npt.NDArray[np.uint8]


@runtime_checkable
class MigratableAgent(Protocol):
    """The methods a migratable actor class provides (see the module docstring)."""

    def cellmigrate_state(self) -> BufferLike:
        """The live state buffer, read in place."""
        ...

    def cellmigrate_pause(self) -> None:
        """Stop writing the state; return once no write is in progress."""
        ...

    def cellmigrate_resume(self) -> None:
        """Write again (after a failed migration on the source; after adoption on the target)."""
        ...

    def cellmigrate_adopt(self, state: U8Array, extra: bytes) -> None:
        """Take the proven state (a writable uint8 array, now yours) and the extra blob."""
        ...

    def cellmigrate_extra(self) -> bytes:
        """A small blob (≤ 1 MiB) captured while paused."""
        ...


class WriteGate:
    """Writers pass while it is open; :meth:`close` shuts it and waits for writers inside.

    >>> gate = WriteGate()
    >>> with gate.writing():
    ...     pass
    >>> gate.close(); gate.is_open
    False
    """

    def __init__(self, open: bool = True) -> None:
        self._cond = threading.Condition()
        self._open = open
        self._inside = 0

    @property
    def is_open(self) -> bool:
        """True while writers may enter."""
        with self._cond:
            return self._open

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the gate for one write: waits while it is closed."""
        with self._cond:
            while not self._open:
                self._cond.wait()
            self._inside += 1
        try:
            yield
        finally:
            with self._cond:
                self._inside -= 1
                self._cond.notify_all()

    def close(self) -> None:
        """Stop new writers and wait until the ones inside have left."""
        with self._cond:
            self._open = False
            while self._inside:
                self._cond.wait()

    def open(self) -> None:
        """Let writers in again."""
        with self._cond:
            self._open = True
            self._cond.notify_all()


class _MixinState:
    """What the mixin keeps per actor instance (one attribute, created on first use)."""

    def __init__(self, args: Tuple[Any, ...], kwargs: Dict[str, Any], replica: bool) -> None:
        self.init_args = args
        self.init_kwargs = kwargs
        self.replica = replica
        self.agent_id = uuid.uuid4().bytes
        self.gate = WriteGate(open=not replica)
        self.lock = threading.Lock()
        # source side
        self.sender: Optional["_Sender"] = None
        # target side
        self.receiver: Optional["_Receiver"] = None


def _recording_init(init: Callable[..., None]) -> Callable[..., None]:
    """Wrap a class's ``__init__`` so the outermost call records its arguments."""

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "_cellmigrate" not in self.__dict__:
            replica = bool(kwargs.pop(REPLICA_KWARG, False))
            self.__dict__["_cellmigrate"] = _MixinState(args, dict(kwargs), replica)
        init(self, *args, **kwargs)

    # Ray checks constructor arguments against the signature on the caller's side, after
    # inspect.unwrap(): keep this wrapper the outermost function it finds, and declare the
    # replica keyword in its signature (keyword-only, before any **kwargs).
    del __init__.__wrapped__
    sig = inspect.signature(init)
    params = list(sig.parameters.values())
    if REPLICA_KWARG not in sig.parameters:
        extra = inspect.Parameter(REPLICA_KWARG, inspect.Parameter.KEYWORD_ONLY, default=False)
        at = len(params) - (1 if params and params[-1].kind is inspect.Parameter.VAR_KEYWORD else 0)
        params.insert(at, extra)
    __init__.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    __init__._cellmigrate_wrapped = True  # type: ignore[attr-defined]
    return __init__


class MigratableActor:
    """Mixin for a Ray actor class whose agent state can be migrated live between nodes.

    Implement ``cellmigrate_state`` and ``cellmigrate_adopt``; override
    ``cellmigrate_pause``/``cellmigrate_resume``/``cellmigrate_extra`` if the defaults
    (a :class:`WriteGate` and no extra) do not fit. See the module docstring.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Reached only when no class below defines __init__ (then there are no arguments).
        super().__init__()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        # Ray derives two classes from the user's: its actor wrapper (whose __init__ only
        # refuses direct instantiation) and the worker-side class (no __init__ of its own).
        if init is None or getattr(init, "_cellmigrate_wrapped", False) or issubclass(cls, ray.actor.ActorClass):
            return
        setattr(cls, "__init__", _recording_init(init))

    # -- the mixin's state --------------------------------------------------------------

    def _cm(self) -> _MixinState:
        state = self.__dict__.get("_cellmigrate")
        if state is None:
            state = self.__dict__.setdefault("_cellmigrate", _MixinState((), {}, False))
        assert isinstance(state, _MixinState)
        return state

    @property
    def cellmigrate_agent_id(self) -> bytes:
        """The agent's 16-byte id: random at first, carried over to the new actor."""
        return self._cm().agent_id

    @property
    def cellmigrate_is_replica(self) -> bool:
        """True in an actor built by a migration, before and after it adopted the state."""
        return self._cm().replica

    def cellmigrate_writing(self) -> "contextlib.AbstractContextManager[None]":
        """Context manager around each write of the state (the default pause waits for it)."""
        return self._cm().gate.writing()

    # -- the protocol's defaults ------------------------------------------------------

    def cellmigrate_state(self) -> BufferLike:
        """The live state buffer (override)."""
        raise NotImplementedError(f"{type(self).__name__} must implement cellmigrate_state()")

    def cellmigrate_adopt(self, state: U8Array, extra: bytes) -> None:
        """Take the proven state (override)."""
        raise NotImplementedError(f"{type(self).__name__} must implement cellmigrate_adopt(state, extra)")

    def cellmigrate_pause(self) -> None:
        """Close the write gate and wait for writes in progress."""
        self._cm().gate.close()

    def cellmigrate_resume(self) -> None:
        """Open the write gate."""
        self._cm().gate.open()

    def cellmigrate_extra(self) -> bytes:
        """No extra state by default."""
        return b""

    def cellmigrate_channel(self, target: Any, **settings: Any) -> Channel:
        """The channel this (source) actor sends rounds through (override to wrap it).

        ``settings`` are :class:`~cellmigrate.ray.channel.RayChannel`'s keyword arguments.
        """
        return RayChannel(target, **settings)

    # -- endpoints called by cellmigrate.ray.migrate (not by users) ---------------------

    def _cellmigrate_info(self) -> Dict[str, Any]:
        """Who and where this actor is, and how to build a replica of it."""
        cm = self._cm()
        state = as_bytes_view(self.cellmigrate_state(), "agent state")
        return {
            "agent_id": cm.agent_id,
            "node_id": ray.get_runtime_context().get_node_id(),
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "args": cm.init_args,
            "kwargs": cm.init_kwargs,
            "state_size": state.nbytes,
            "replica": cm.replica,
        }

    def _cellmigrate_ready(self) -> str:
        """The node this actor runs on (the call returns once the actor is constructed)."""
        return str(ray.get_runtime_context().get_node_id())

    def _cellmigrate_start_send(self, target: Any, options: Dict[str, Any]) -> None:
        """Start migrating this agent to ``target`` in a thread; poll for the outcome."""
        cm = self._cm()
        with cm.lock:
            if cm.sender is not None and not cm.sender.done.is_set():
                raise InvalidStateError("a migration of this agent is already running")
            cm.sender = _Sender(self, target, options)
        cm.sender.start()

    def _cellmigrate_poll(self) -> Dict[str, Any]:
        """The running migration's progress, and its outcome once it is done (never blocks)."""
        sender = self._cm().sender
        if sender is None:
            raise InvalidStateError("no migration of this agent was started")
        return sender.status()

    def _cellmigrate_resume_fenced(self) -> bool:
        """Resume a source left paused by an unknown outcome, once the target is known dead."""
        sender = self._cm().sender
        if sender is None or not sender.paused:
            return False
        sender.resume_source("target fenced (killed) after an unknown outcome")
        return True

    def _cellmigrate_begin(self, offer: Offer, options: Dict[str, Any]) -> int:
        """Target side: accept (or refuse) the migration ``offer``."""
        cm = self._cm()
        with cm.lock:
            if cm.receiver is None or cm.receiver.session.completed or cm.receiver.session.failed:
                cm.receiver = _Receiver(self, options)
            receiver = cm.receiver
        return receiver.begin(offer)

    def _cellmigrate_receiver(self) -> "_Receiver":
        receiver = self._cm().receiver
        if receiver is None:
            raise InvalidStateError("no migration has been offered to this actor")
        return receiver

    def _cellmigrate_chunk(self, meta: Tuple[Any, ...], payload: List[Any]) -> bool:
        """Target side: fetch one chunk's pages from the object store, verify, commit."""
        return self._cellmigrate_receiver().chunk(meta, payload)

    def _cellmigrate_end_round(self, round_no: int) -> bytes:
        """Target side: the digest of the staged state after ``round_no``."""
        return self._cellmigrate_receiver().end_round(round_no)

    def _cellmigrate_commit(self, digest: bytes, extra: bytes) -> None:
        """Target side: check the final digest, adopt the state, resume."""
        self._cellmigrate_receiver().commit(digest, extra)

    def _cellmigrate_abort(self, reason: str) -> None:
        """Target side: discard what was staged (idempotent)."""
        receiver = self._cm().receiver
        if receiver is not None:
            receiver.abort(reason)


# --------------------------------------------------------------------------------------
# The source side: LiveMigration in a thread of the source actor
# --------------------------------------------------------------------------------------


def _audit_log(options: Dict[str, Any]) -> MigrationAuditLog:
    sink = options.get("audit_sink")
    if sink is None:
        return MigrationAuditLog.with_capacity(_RING)
    assert isinstance(sink, RemoteAuditSink)
    return MigrationAuditLog.with_capacity(_RING, sink=sink)


class _SourceAdapter:
    """:class:`~cellmigrate.live.agent.SourceAgent` over the actor's protocol methods."""

    def __init__(self, actor: MigratableActor, sender: "_Sender") -> None:
        self._actor = actor
        self._sender = sender

    def state(self) -> BufferLike:
        return self._actor.cellmigrate_state()

    def pause(self) -> None:
        self._actor.cellmigrate_pause()
        self._sender.paused = True

    def resume(self) -> None:
        self._actor.cellmigrate_resume()
        self._sender.paused = False

    def extra(self) -> bytes:
        blob = bytes(self._actor.cellmigrate_extra())
        if len(blob) > MAX_EXTRA_BYTES:
            raise InvalidStateError(f"agent extra is {len(blob)} bytes; the limit is {MAX_EXTRA_BYTES}")
        return blob


class _Sender:
    """One outgoing migration: runs :class:`LiveMigration` and records its outcome."""

    def __init__(self, actor: MigratableActor, target: Any, options: Dict[str, Any]) -> None:
        self.actor = actor
        self.target = target
        self.options = options
        self.done = threading.Event()
        self.paused = False
        self.rounds = 0
        self.wire_bytes = 0
        self.state_size = 0
        self.summary: Optional[Dict[str, Any]] = None
        self.error: Optional[Tuple[str, str]] = None
        self.peak_in_flight = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="cellmigrate-send", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _progress(self, event: MigrationProgressEvent) -> None:
        if event.kind is ProgressEventKind.TRANSFER_PROGRESS:
            self.wire_bytes = int(getattr(event, "transferred_bytes"))

    def _on_round(self, stats: RoundStats) -> None:
        self.rounds = stats.round + 1
        self.state_size = stats.state_size

    def _run(self) -> None:
        opts = self.options
        channel: Optional[Channel] = None
        try:
            channel = self.actor.cellmigrate_channel(
                self.target,
                timeout=float(opts["timeout"]),
                max_bytes_in_flight=int(opts["max_bytes_in_flight"]),
                options=opts["target_options"],
            )
            migration = LiveMigration(
                _SourceAdapter(self.actor, self),
                channel,
                agent_id=self.actor.cellmigrate_agent_id,
                migration_id=opts["migration_id"],
                requirements=opts.get("requirements"),
                downtime_limit=float(opts["downtime_limit"]),
                max_rounds=int(opts["max_rounds"]),
                chunk_bytes=int(opts["chunk_bytes"]),
                compress=bool(opts["compress"]),
                page_cache_bytes=int(opts.get("page_cache_bytes", DEFAULT_PAGE_CACHE_BYTES)),
                validator=MigrationValidator(_audit_log(opts)),
                progress=self._progress,
                on_round=self._on_round,
            )
            summary = migration.run()
            self.summary = summary.to_dict()
            self.summary["migration_id"] = summary.migration_id
            self.summary["agent_id"] = summary.agent_id
        except BaseException as exc:  # reported to the driver through poll
            # The driver rebuilds the error from its class name and this text, and the
            # class adds its prefix again: a CellError travels as its bare message.
            text = exc.message if isinstance(exc, CellError) else str(exc)
            self.error = (type(exc).__name__, text or type(exc).__name__)
            if isinstance(exc, CellError) and not isinstance(exc, OutcomeUnknownError) and self.paused:
                # LiveMigration resumes the source on failure; if that step itself failed
                # (e.g. its audit write raised), the agent must still not stay stopped.
                self.resume_source(f"still paused after: {exc}")
            if not isinstance(exc, Exception):
                self.done.set()
                raise
            if not isinstance(exc, CellError):
                self.error = (type(exc).__name__, "".join(traceback.format_exception_only(type(exc), exc)).strip())
        finally:
            if channel is not None:
                self.peak_in_flight = int(getattr(channel, "peak_bytes_in_flight", 0))
            self.done.set()

    def resume_source(self, why: str) -> None:
        with self._lock:
            if self.paused:
                self.actor.cellmigrate_resume()
                self.paused = False

    def status(self) -> Dict[str, Any]:
        return {
            "done": self.done.is_set(),
            "paused": self.paused,
            "rounds": self.rounds,
            "wire_bytes": self.wire_bytes,
            "state_size": self.state_size,
            "summary": self.summary if self.done.is_set() else None,
            "error": self.error if self.done.is_set() else None,
            "peak_bytes_in_flight": self.peak_in_flight,
        }


# --------------------------------------------------------------------------------------
# The target side: a ReceiverSession staged in the new actor
# --------------------------------------------------------------------------------------


class _Adopter:
    """:class:`~cellmigrate.live.agent.TargetAgent` over the actor's protocol methods."""

    def __init__(self, actor: MigratableActor, store: MemoryStore, agent_id: Callable[[], bytes]) -> None:
        self._actor = actor
        self._store = store
        self._agent_id = agent_id

    def adopt(self, state: memoryview, extra: bytes) -> None:
        # ``state`` is a read-only view of the store's array: hand over the array itself
        # (proven equal to the source's state, writable, and no longer used by the store).
        array = self._store.array
        if array.nbytes != state.nbytes:
            raise InvalidStateError(f"staged array has {array.nbytes} bytes, the proven view {state.nbytes}")
        self._actor.cellmigrate_adopt(array, bytes(extra))
        cm = self._actor._cm()
        cm.agent_id = self._agent_id()

    def resume(self) -> None:
        self._actor.cellmigrate_resume()


class _Receiver:
    """One incoming migration: orders the chunk calls and fetches their payload refs."""

    def __init__(self, actor: MigratableActor, options: Dict[str, Any]) -> None:
        self.timeout = float(options["timeout"])
        self.store = MemoryStore()
        self.session = ReceiverSession(
            self.store,
            _Adopter(actor, self.store, self._offered_agent),
            capabilities=options.get("capabilities"),
            validator=MigrationValidator(_audit_log(options)),
            max_state_size=int(options.get("max_state_size", 0)),
        )
        # Calls may run on several threads of a threaded actor, and chunk calls may start
        # out of order: each waits for its turn, and one at a time touches the session.
        self._cond = threading.Condition()

    def _offered_agent(self) -> bytes:
        offer = self.session.offer
        assert offer is not None
        return offer.agent_id

    def begin(self, offer: Offer) -> int:
        with self._cond:
            return self.session.begin(offer)

    def chunk(self, meta: Tuple[Any, ...], payload: List[Any]) -> bool:
        seq, round_no, size, indices, encoding, raw_len, digest = meta
        deadline = time.monotonic() + self.timeout
        with self._cond:
            while self.session.committed_seq < seq - 1 and not (self.session.failed or self.session.completed):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise PeerTimeoutError(f"chunk {seq} waited {self.timeout:.1f} s for chunk {self.session.committed_seq + 1}")
                self._cond.wait(left)
            if len(payload) != 1:
                raise CorruptDataError(f"chunk {seq} must carry one object reference, not {len(payload)}")
            try:
                data = ray.get(payload[0], timeout=max(deadline - time.monotonic(), 0.001))
            except ray.exceptions.GetTimeoutError:
                raise PeerTimeoutError(f"chunk {seq}: its pages did not arrive from the object store within {self.timeout:.1f} s") from None
            except ray.exceptions.RayError as exc:
                raise CorruptDataError(f"chunk {seq}: its pages could not be fetched from the object store: {exc}") from None
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 1:
                raise CorruptDataError(f"chunk {seq}: the object store holds {type(data).__name__}, not a uint8 array")
            try:
                how = Encoding(int(encoding))
            except ValueError:
                raise CorruptDataError(f"chunk {seq}: unknown page encoding {encoding!r}") from None
            chunk = Chunk(
                int(seq),
                int(round_no),
                int(size),
                np.asarray(indices, dtype=np.int64),
                how,
                as_bytes_view(data, "chunk payload"),
                int(raw_len),
                bytes(digest),
            )
            try:
                return self.session.apply_chunk(chunk)
            finally:
                self._cond.notify_all()

    def end_round(self, round_no: int) -> bytes:
        with self._cond:
            return self.session.end_round(round_no)

    def commit(self, digest: bytes, extra: bytes) -> None:
        with self._cond:
            self.session.commit(digest, extra)

    def abort(self, reason: str) -> None:
        with self._cond:
            self.session.abandon(reason)
            self._cond.notify_all()
