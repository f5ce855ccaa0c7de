"""Progress reporting for migrations: phases, events, a tracker and two ready-made callbacks.

A *callback* is any plain callable taking one :class:`MigrationProgressEvent`. The
:class:`MigrationProgressTracker` turns the steps of one migration into events and hands
them to its callback; :class:`CollectingCallback` stores them and :class:`MultiCallback`
fans each event out to several callbacks in order. Long operations of the library (for
example :meth:`cellmigrate.RollbackInfo.capture` and ``restore_into`` on GiB states)
report through the same kind of callable.

Events mirror the Rust enum ``MigrationProgressEvent``: one small frozen dataclass per
variant, all subclasses of :class:`MigrationProgressEvent` and reachable from it under the
Rust variant name (``MigrationProgressEvent.TransferProgress``). The SPEC's kind names
(``MigrationProgressEvent.TRANSFER_PROGRESS``) are the :class:`ProgressEventKind` members;
calling one builds an event of that kind. Each event has ``agent_id`` and ``kind``, so a
caller can compare ``event.kind``, test ``isinstance`` or (Python 3.10+) ``match``:

>>> aid = bytes(16)
>>> ev = MigrationProgressEvent.TransferProgress(aid, transferred_bytes=50, total_bytes=200, percent=25)
>>> ev.kind is ProgressEventKind.TRANSFER_PROGRESS, ev.progress_percent(), ev.is_terminal()
(True, 25, False)
>>> isinstance(ev, MigrationProgressEvent.TransferProgress)
True

::

    match ev:
        case MigrationProgressEvent.TransferProgress(percent=p):
            print(f"{p}% sent")
        case MigrationProgressEvent.Completed() | MigrationProgressEvent.Failed():
            print("done")
"""

from __future__ import annotations

import enum
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, List, Optional, Tuple, Type, Union

from ._forksafe import guard
from ._ids import IdLike, to_id

__all__ = [
    "MigrationPhase",
    "ProgressEventKind",
    "MigrationProgressEvent",
    "ProgressCallback",
    "ByteProgressCallback",
    "byte_progress",
    "MigrationProgressTracker",
    "CollectingCallback",
    "MultiCallback",
]


class MigrationPhase(enum.Enum):
    """The phase a migration is in, in the order a successful one goes through them."""

    CAPTURING = enum.auto()
    TRANSFERRING = enum.auto()
    VALIDATING = enum.auto()
    RESTORING = enum.auto()
    COMPLETED = enum.auto()
    FAILED = enum.auto()


class ProgressEventKind(enum.Enum):
    """Which variant a :class:`MigrationProgressEvent` is (the SPEC's kind names)."""

    STARTED = enum.auto()
    CAPTURING_STATE = enum.auto()
    TRANSFER_PROGRESS = enum.auto()
    VALIDATING = enum.auto()
    RESTORING = enum.auto()
    COMPLETED = enum.auto()
    FAILED = enum.auto()

    @property
    def event_class(self) -> Type["MigrationProgressEvent"]:
        """The event class of this kind (``STARTED.event_class`` is ``MigrationProgressEvent.Started``)."""
        return _CLASS_OF[self]

    def __call__(self, *args: Any, **kwargs: Any) -> "MigrationProgressEvent":
        """Build an event of this kind: ``ProgressEventKind.STARTED(agent_id, total_bytes)``."""
        return _CLASS_OF[self](*args, **kwargs)

    def __instancecheck__(self, instance: object) -> bool:
        # isinstance(event, MigrationProgressEvent.STARTED) asks "is it of this kind?"
        return isinstance(instance, MigrationProgressEvent) and instance.kind is self


def _int(value: int, what: str) -> int:
    """Refuse bools and non-ints (floats included) with a TypeError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return value


def _check_count(value: int, what: str) -> int:
    """Byte counts and durations are unsigned in the crate: refuse bools, floats, negatives."""
    if _int(value, what) < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


def _clamp_percent(value: int, what: str = "percent") -> int:
    return min(100, max(0, _int(value, what)))


def _check_percent(value: int) -> int:
    """An event's percent must already be in 0..100 (the tracker clamps before building one)."""
    if not 0 <= _int(value, "percent") <= 100:
        raise ValueError(f"percent must be in 0..100, got {value}")
    return value


def _transfer_percent(transferred: int, total: int) -> int:
    """floor(transferred * 100 / total) clamped to 0..100; 100 when there is nothing to send."""
    if total == 0:
        return 100
    return min(100, max(0, transferred * 100 // total))


class _EventMeta(type):
    """Lets ``MigrationProgressEvent(kind, agent_id, ...)`` build the variant of that kind."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls.__dict__.get("_IS_BASE", False):
            if "kind" in kwargs:
                kind = kwargs.pop("kind")
            elif args:
                kind, args = args[0], args[1:]
            else:
                raise TypeError("MigrationProgressEvent(kind, agent_id, ...) needs a kind")
            if isinstance(kind, type) and issubclass(kind, MigrationProgressEvent) and kind is not cls:
                kind = kind.KIND
            if not isinstance(kind, ProgressEventKind):
                raise TypeError(
                    "MigrationProgressEvent(kind, agent_id, ...): kind must be a ProgressEventKind "
                    f"such as MigrationProgressEvent.STARTED, not {type(kind).__name__}"
                )
            return kind(*args, **kwargs)
        return super().__call__(*args, **kwargs)


@dataclass(frozen=True, init=False)
class MigrationProgressEvent(metaclass=_EventMeta):
    """Base of the progress events: every event is an instance of one of its variants.

    Variants (each also has ``agent_id``, 16 bytes; a ``uuid.UUID`` is accepted):
    ``Started(total_bytes)``, ``CapturingState(percent)``,
    ``TransferProgress(transferred_bytes, total_bytes, percent)``, ``Validating(step)``,
    ``Restoring(percent)``, ``Completed(duration_ms, bytes_transferred)``,
    ``Failed(error)``. The CamelCase names are the variant classes (for ``match`` and
    ``isinstance``); the SPEC's upper-case names are the kinds (:class:`ProgressEventKind`
    members, compare them with ``event.kind``). Every spelling builds the same object:

    >>> aid = bytes(16)
    >>> a = MigrationProgressEvent.Started(aid, total_bytes=10)
    >>> a == MigrationProgressEvent.STARTED(aid, 10) == MigrationProgressEvent.started(aid, 10)
    True
    >>> a == MigrationProgressEvent(MigrationProgressEvent.STARTED, aid, total_bytes=10)
    True
    >>> a.kind == MigrationProgressEvent.STARTED, isinstance(a, MigrationProgressEvent.STARTED)
    (True, True)
    """

    _IS_BASE: ClassVar[bool] = True
    agent_id: bytes

    #: The variant's kind; set on each subclass.
    KIND: ClassVar[ProgressEventKind]

    # The variant classes under their Rust names (attached below), then the kinds under
    # the SPEC's names.
    Started: ClassVar[Type["_Started"]]
    CapturingState: ClassVar[Type["_CapturingState"]]
    TransferProgress: ClassVar[Type["_TransferProgress"]]
    Validating: ClassVar[Type["_Validating"]]
    Restoring: ClassVar[Type["_Restoring"]]
    Completed: ClassVar[Type["_Completed"]]
    Failed: ClassVar[Type["_Failed"]]
    STARTED: ClassVar[ProgressEventKind] = ProgressEventKind.STARTED
    CAPTURING_STATE: ClassVar[ProgressEventKind] = ProgressEventKind.CAPTURING_STATE
    TRANSFER_PROGRESS: ClassVar[ProgressEventKind] = ProgressEventKind.TRANSFER_PROGRESS
    VALIDATING: ClassVar[ProgressEventKind] = ProgressEventKind.VALIDATING
    RESTORING: ClassVar[ProgressEventKind] = ProgressEventKind.RESTORING
    COMPLETED: ClassVar[ProgressEventKind] = ProgressEventKind.COMPLETED
    FAILED: ClassVar[ProgressEventKind] = ProgressEventKind.FAILED

    def __init__(
        self, kind: "Union[ProgressEventKind, Type[MigrationProgressEvent]]", *args: Any, **kwargs: Any
    ) -> None:
        # Never runs: the metaclass turns MigrationProgressEvent(kind, ...) into kind(...).
        # It exists to give that call its real signature.
        raise TypeError("build a variant such as MigrationProgressEvent.Started")  # pragma: no cover

    def __post_init__(self) -> None:
        if type(self) is MigrationProgressEvent:
            raise TypeError("MigrationProgressEvent is abstract; build a variant such as MigrationProgressEvent.Started")
        # frozen dataclass: normalise through object.__setattr__
        object.__setattr__(self, "agent_id", to_id(self.agent_id, "agent_id"))

    @property
    def kind(self) -> ProgressEventKind:
        """The variant's :class:`ProgressEventKind`."""
        return self.KIND

    def progress_percent(self) -> Optional[int]:
        """The percent carried by CAPTURING_STATE, TRANSFER_PROGRESS and RESTORING; else None."""
        return None

    def is_terminal(self) -> bool:
        """True only for COMPLETED and FAILED: no further event follows for this migration."""
        return False

    # -- factories (same objects as the variant constructors) ----------------------

    @staticmethod
    def started(agent_id: IdLike, total_bytes: int) -> "_Started":
        """A STARTED event: the migration of ``agent_id`` began, ``total_bytes`` of state (>= 0, else ValueError)."""
        return _Started(agent_id, total_bytes)  # type: ignore[arg-type]

    @staticmethod
    def capturing_state(agent_id: IdLike, percent: int) -> "_CapturingState":
        """A CAPTURING_STATE event: ``percent`` (0..100, else ValueError) of the state captured."""
        return _CapturingState(agent_id, percent)  # type: ignore[arg-type]

    @staticmethod
    def transfer_progress(
        agent_id: IdLike, transferred_bytes: int, total_bytes: int, percent: int
    ) -> "_TransferProgress":
        """A TRANSFER_PROGRESS event: ``transferred_bytes`` of ``total_bytes`` sent, ``percent`` (0..100)."""
        return _TransferProgress(agent_id, transferred_bytes, total_bytes, percent)  # type: ignore[arg-type]

    @staticmethod
    def validating(agent_id: IdLike, step: str) -> "_Validating":
        """A VALIDATING event: ``step`` names the check being run."""
        return _Validating(agent_id, step)  # type: ignore[arg-type]

    @staticmethod
    def restoring(agent_id: IdLike, percent: int) -> "_Restoring":
        """A RESTORING event: ``percent`` (0..100, else ValueError) of the state restored."""
        return _Restoring(agent_id, percent)  # type: ignore[arg-type]

    @staticmethod
    def completed(agent_id: IdLike, duration_ms: int, bytes_transferred: int) -> "_Completed":
        """A COMPLETED event (final): ``duration_ms`` milliseconds, ``bytes_transferred`` bytes."""
        return _Completed(agent_id, duration_ms, bytes_transferred)  # type: ignore[arg-type]

    @staticmethod
    def failed(agent_id: IdLike, error: str) -> "_Failed":
        """A FAILED event (final): ``error`` says why."""
        return _Failed(agent_id, error)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Started(MigrationProgressEvent):
    """The migration began; ``total_bytes`` is the state size."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.STARTED
    total_bytes: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self.total_bytes, "total_bytes")


@dataclass(frozen=True)
class _CapturingState(MigrationProgressEvent):
    """Capturing the state; ``percent`` done (0..100, else ValueError)."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.CAPTURING_STATE
    percent: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_percent(self.percent)

    def progress_percent(self) -> Optional[int]:
        return self.percent


@dataclass(frozen=True)
class _TransferProgress(MigrationProgressEvent):
    """Sending the state: ``transferred_bytes`` of ``total_bytes`` (``percent``, 0..100)."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.TRANSFER_PROGRESS
    transferred_bytes: int
    total_bytes: int
    percent: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self.transferred_bytes, "transferred_bytes")
        _check_count(self.total_bytes, "total_bytes")
        _check_percent(self.percent)

    def progress_percent(self) -> Optional[int]:
        return self.percent


@dataclass(frozen=True)
class _Validating(MigrationProgressEvent):
    """Validating; ``step`` names the check being run."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.VALIDATING
    step: str


@dataclass(frozen=True)
class _Restoring(MigrationProgressEvent):
    """Restoring the state on the target (or from a rollback point); ``percent`` done."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.RESTORING
    percent: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_percent(self.percent)

    def progress_percent(self) -> Optional[int]:
        return self.percent


@dataclass(frozen=True)
class _Completed(MigrationProgressEvent):
    """The migration finished after ``duration_ms`` having sent ``bytes_transferred``."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.COMPLETED
    duration_ms: int
    bytes_transferred: int

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self.duration_ms, "duration_ms")
        _check_count(self.bytes_transferred, "bytes_transferred")

    def is_terminal(self) -> bool:
        return True


@dataclass(frozen=True)
class _Failed(MigrationProgressEvent):
    """The migration failed; ``error`` says why."""

    KIND: ClassVar[ProgressEventKind] = ProgressEventKind.FAILED
    error: str

    def is_terminal(self) -> bool:
        return True


_VARIANTS: Tuple[Tuple[str, Type[MigrationProgressEvent]], ...] = (
    ("Started", _Started),
    ("CapturingState", _CapturingState),
    ("TransferProgress", _TransferProgress),
    ("Validating", _Validating),
    ("Restoring", _Restoring),
    ("Completed", _Completed),
    ("Failed", _Failed),
)
_CLASS_OF: Dict[ProgressEventKind, Type[MigrationProgressEvent]] = {}
for _rust_name, _cls in _VARIANTS:
    # Public names: the repr shows MigrationProgressEvent.TransferProgress(...), like Rust.
    _cls.__name__ = _rust_name
    _cls.__qualname__ = f"MigrationProgressEvent.{_rust_name}"
    _cls._IS_BASE = False
    setattr(MigrationProgressEvent, _rust_name, _cls)
    _CLASS_OF[_cls.KIND] = _cls
del _rust_name, _cls
assert set(_CLASS_OF) == set(ProgressEventKind)

#: A progress callback: any callable taking one event.
ProgressCallback = Callable[[MigrationProgressEvent], None]


def _check_callback(callback: object) -> None:
    if not callable(callback):
        raise TypeError(f"callback must be callable (taking one MigrationProgressEvent), not {type(callback).__name__}")


#: The byte-count form used by ``DeltaSnapshot.create/apply`` and the CLI: ``(done, total)``.
ByteProgressCallback = Callable[[int, int], None]

_PERCENT_KINDS = (
    ProgressEventKind.CAPTURING_STATE,
    ProgressEventKind.TRANSFER_PROGRESS,
    ProgressEventKind.RESTORING,
)


def byte_progress(
    callback: ProgressCallback,
    agent_id: IdLike,
    kind: ProgressEventKind = ProgressEventKind.TRANSFER_PROGRESS,
) -> ByteProgressCallback:
    """Adapt an event callback to a ``progress(bytes_done, bytes_total)`` callable.

    Operations that count bytes (delta create/apply) then report through the same event
    callbacks as the tracker: ``kind`` is CAPTURING_STATE or RESTORING (percent events)
    or TRANSFER_PROGRESS (bytes and percent). An event is emitted only when the percent
    changes, so a GiB operation reporting per chunk costs at most 101 events.

    >>> events = CollectingCallback()
    >>> report = byte_progress(events, bytes(16))
    >>> for done in (0, 10, 11, 50, 100):
    ...     report(done, 100)
    >>> [e.percent for e in events.events]
    [0, 10, 11, 50, 100]
    """
    _check_callback(callback)
    aid = to_id(agent_id, "agent_id")
    if kind not in _PERCENT_KINDS:
        raise ValueError(f"kind must be one of {[k.name for k in _PERCENT_KINDS]}, not {kind!r}")
    last = [-1]
    lock = threading.Lock()

    def report(done: int, total: int) -> None:
        _check_count(done, "bytes_done")
        _check_count(total, "bytes_total")
        percent = _transfer_percent(done, total)
        with lock:
            if percent == last[0]:
                return
            last[0] = percent
        if kind is ProgressEventKind.TRANSFER_PROGRESS:
            callback(_TransferProgress(aid, done, total, percent))
        elif kind is ProgressEventKind.CAPTURING_STATE:
            callback(_CapturingState(aid, percent))
        else:
            callback(_Restoring(aid, percent))

    return report


class MigrationProgressTracker:
    """Tracks one migration and reports each step to ``callback`` as an event.

    The tracker starts in :attr:`MigrationPhase.CAPTURING`. Each ``update_*`` /
    ``report_*`` call moves it to the matching phase and emits one event (the callback
    is called synchronously, in the caller's thread). Percentages are clamped to 0..100.

    >>> events = CollectingCallback()
    >>> t = MigrationProgressTracker(bytes(16), total_bytes=1000, callback=events)
    >>> t.update_transfer_progress(250)
    >>> t.phase, t.progress_percent(), events.latest_event().percent
    (<MigrationPhase.TRANSFERRING: 2>, 25, 25)
    """

    def __init__(self, agent_id: IdLike, total_bytes: int, callback: Optional[ProgressCallback] = None) -> None:
        if callback is not None:
            _check_callback(callback)
        self._agent_id = to_id(agent_id, "agent_id")
        self._total_bytes = _check_count(total_bytes, "total_bytes")
        self._callback = callback
        self._phase = MigrationPhase.CAPTURING
        self._bytes_transferred = 0
        self._start = time.monotonic()
        # Re-entrant: a callback may read the tracker while an event is being emitted.
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    # -- read-only state -------------------------------------------------------------

    @property
    def agent_id(self) -> bytes:
        """The 16-byte id of the agent being migrated."""
        return self._agent_id

    @property
    def total_bytes(self) -> int:
        """The state's size in bytes, as given at creation."""
        return self._total_bytes

    @property
    def bytes_transferred(self) -> int:
        """Bytes reported by the last :meth:`update_transfer_progress` (0 before any)."""
        return self._bytes_transferred

    @property
    def phase(self) -> MigrationPhase:
        """The phase the last reported event put the migration in."""
        return self._phase

    def elapsed_ms(self) -> int:
        """Milliseconds since the tracker was created (monotonic clock)."""
        return int((time.monotonic() - self._start) * 1000)

    def progress_percent(self) -> int:
        """Transfer progress so far: floor(transferred*100/total) in 0..100; 100 if total is 0."""
        return _transfer_percent(self._bytes_transferred, self._total_bytes)

    # -- steps -----------------------------------------------------------------------

    def _emit(self, event: MigrationProgressEvent, phase: Optional[MigrationPhase]) -> None:
        with self._lock:
            if phase is not None:
                self._phase = phase
            if self._callback is not None:
                self._callback(event)

    def report_started(self) -> None:
        """Emit STARTED(total_bytes); the phase does not change."""
        self._emit(_Started(self._agent_id, self._total_bytes), None)

    def update_capturing_progress(self, percent: int) -> None:
        """Phase CAPTURING; emit CAPTURING_STATE(percent clamped to 0..100)."""
        self._emit(_CapturingState(self._agent_id, _clamp_percent(percent)), MigrationPhase.CAPTURING)

    def update_transfer_progress(self, transferred_bytes: int) -> None:
        """Phase TRANSFERRING; record the bytes sent so far and emit TRANSFER_PROGRESS."""
        _check_count(transferred_bytes, "transferred_bytes")
        with self._lock:
            self._bytes_transferred = transferred_bytes
            percent = _transfer_percent(transferred_bytes, self._total_bytes)
            event = _TransferProgress(self._agent_id, transferred_bytes, self._total_bytes, percent)
            self._emit(event, MigrationPhase.TRANSFERRING)

    def report_validating(self, step: str) -> None:
        """Phase VALIDATING; emit VALIDATING(step)."""
        self._emit(_Validating(self._agent_id, str(step)), MigrationPhase.VALIDATING)

    def update_restoring_progress(self, percent: int) -> None:
        """Phase RESTORING; emit RESTORING(percent clamped to 0..100)."""
        self._emit(_Restoring(self._agent_id, _clamp_percent(percent)), MigrationPhase.RESTORING)

    def report_completed(self) -> None:
        """Phase COMPLETED; emit COMPLETED(duration since construction, bytes transferred)."""
        with self._lock:
            event = _Completed(self._agent_id, self.elapsed_ms(), self._bytes_transferred)
            self._emit(event, MigrationPhase.COMPLETED)

    def report_failed(self, error: str) -> None:
        """Phase FAILED; emit FAILED(error)."""
        self._emit(_Failed(self._agent_id, str(error)), MigrationPhase.FAILED)

    def __repr__(self) -> str:
        return (
            f"MigrationProgressTracker(agent_id={self._agent_id.hex()}, total_bytes={self._total_bytes}, "
            f"phase={self._phase.name}, bytes_transferred={self._bytes_transferred})"
        )


class CollectingCallback:
    """A callback that keeps every event it receives (thread-safe), e.g. for tests or a UI.

    >>> cb = CollectingCallback()
    >>> cb(MigrationProgressEvent.Failed(bytes(16), error="link down"))
    >>> cb.event_count(), cb.latest_event().error
    (1, 'link down')
    """

    def __init__(self) -> None:
        self._events: List[MigrationProgressEvent] = []
        self._lock = threading.Lock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    def __call__(self, event: MigrationProgressEvent) -> None:
        with self._lock:
            self._events.append(event)

    @property
    def events(self) -> List[MigrationProgressEvent]:
        """A snapshot (copy) of the events received so far, oldest first."""
        with self._lock:
            return list(self._events)

    def event_count(self) -> int:
        """How many events were collected (since the last :meth:`clear`)."""
        with self._lock:
            return len(self._events)

    def latest_event(self) -> Optional[MigrationProgressEvent]:
        """The most recent event, or None before the first."""
        with self._lock:
            return self._events[-1] if self._events else None

    def clear(self) -> None:
        """Forget every collected event."""
        with self._lock:
            self._events.clear()

    def __repr__(self) -> str:
        return f"CollectingCallback(event_count={self.event_count()})"


class MultiCallback:
    """A callback that forwards each event to several callbacks, in the order added.

    >>> a, b = CollectingCallback(), CollectingCallback()
    >>> multi = MultiCallback(a)
    >>> multi.add(b)
    >>> multi(MigrationProgressEvent.Started(bytes(16), total_bytes=10))
    >>> multi.callback_count(), a.event_count(), b.event_count()
    (2, 1, 1)
    """

    def __init__(self, *callbacks: ProgressCallback) -> None:
        self._callbacks: List[ProgressCallback] = []
        self._lock = threading.Lock()
        guard(self, "_lock")  # taken around fork(): see _forksafe
        for cb in callbacks:
            self.add(cb)

    def add(self, callback: ProgressCallback) -> None:
        """Append ``callback`` (any callable taking one event)."""
        _check_callback(callback)
        with self._lock:
            self._callbacks.append(callback)

    def callback_count(self) -> int:
        """How many callbacks events are forwarded to."""
        with self._lock:
            return len(self._callbacks)

    def __call__(self, event: MigrationProgressEvent) -> None:
        # Call outside the lock so a callback may add another callback without deadlock.
        with self._lock:
            targets = list(self._callbacks)
        for cb in targets:
            cb(event)

    def __repr__(self) -> str:
        return f"MultiCallback(callback_count={self.callback_count()})"
