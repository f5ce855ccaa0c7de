"""Recovery from failed migrations: classify the error, pick a strategy, retry with backoff.

The Rust crate's recovery module, restated: :class:`MigrationError` is a *record* of a
failure (not an exception), :class:`MigrationRecoveryManager` keeps one pending error per
agent plus the history of recovery attempts, and :class:`RecoveryConfig` holds the retry
policy. The manager is safe to share between threads.

>>> aid = bytes(16)
>>> mgr = MigrationRecoveryManager.with_defaults()
>>> mgr.record_failure(MigrationError(MigrationErrorType.TIMEOUT, "no answer", aid))
>>> mgr.execute_recovery(aid)
<RecoveryStrategy.RETRY_ON_SAME_TARGET: 1>
>>> mgr.get_pending(aid).retry_count, len(mgr.get_history(aid))
(1, 1)
>>> mgr.mark_recovery_success(aid)
>>> mgr.pending_count(), mgr.get_history(aid)[-1].success
(0, True)
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Union, overload

from ._forksafe import guard
from ._ids import IdLike, to_id, to_optional_id
from .errors import InvalidStateError

__all__ = [
    "MigrationErrorType",
    "MigrationError",
    "RecoveryStrategy",
    "RecoveryAttempt",
    "RecoveryConfig",
    "MigrationRecoveryManager",
]


def _now() -> int:
    return int(time.time())


class MigrationErrorType(enum.Enum):
    """What kind of failure stopped a migration; drives the recovery strategy."""

    NETWORK_TRANSIENT = enum.auto()
    NETWORK_PERMANENT = enum.auto()
    INSUFFICIENT_RESOURCES = enum.auto()
    INCOMPATIBLE_TARGET = enum.auto()
    STATE_CORRUPTION = enum.auto()
    TIMEOUT = enum.auto()
    TARGET_UNREACHABLE = enum.auto()
    UNKNOWN = enum.auto()

    def is_retryable(self) -> bool:
        """True when trying again may succeed (transient network, resources, timeout, unreachable)."""
        return self in _RETRYABLE

    def should_change_target(self) -> bool:
        """True when the target itself is the problem (resources, incompatible, unreachable)."""
        return self in _CHANGE_TARGET


_RETRYABLE = frozenset(
    {
        MigrationErrorType.NETWORK_TRANSIENT,
        MigrationErrorType.INSUFFICIENT_RESOURCES,
        MigrationErrorType.TIMEOUT,
        MigrationErrorType.TARGET_UNREACHABLE,
    }
)
_CHANGE_TARGET = frozenset(
    {
        MigrationErrorType.INSUFFICIENT_RESOURCES,
        MigrationErrorType.INCOMPATIBLE_TARGET,
        MigrationErrorType.TARGET_UNREACHABLE,
    }
)


@dataclass(init=False)
class MigrationError:
    """A record of one migration failure (named after the Rust struct; not an exception).

    ``agent_id`` and ``target_node`` accept 16 bytes or ``uuid.UUID`` and are stored as
    bytes; ``timestamp`` defaults to now (Unix seconds).

    >>> err = MigrationError(MigrationErrorType.TIMEOUT, "no answer", bytes(16))
    >>> err.retry_count, err.error_type.is_retryable()
    (0, True)
    """

    error_type: MigrationErrorType
    message: str
    agent_id: bytes
    target_node: Optional[bytes]
    timestamp: int
    retry_count: int

    def __init__(
        self,
        error_type: MigrationErrorType,
        message: str,
        agent_id: IdLike,
        target_node: Optional[IdLike] = None,
        timestamp: Optional[int] = None,
        retry_count: int = 0,
    ) -> None:
        if not isinstance(error_type, MigrationErrorType):
            raise TypeError(f"error_type must be a MigrationErrorType, not {type(error_type).__name__}")
        if retry_count < 0:
            raise ValueError(f"retry_count must be >= 0, got {retry_count}")
        self.error_type = error_type
        self.message = str(message)
        self.agent_id = to_id(agent_id, "agent_id")
        self.target_node = to_optional_id(target_node, "target_node")
        self.timestamp = _now() if timestamp is None else timestamp
        self.retry_count = retry_count

    @classmethod
    def new(cls, error_type: MigrationErrorType, message: str, agent_id: IdLike) -> "MigrationError":
        """The Rust constructor: no target, stamped now, no retries yet."""
        return cls(error_type, message, agent_id)

    def with_target(self, target_node: Optional[IdLike]) -> "MigrationError":
        """Return this error with ``target_node`` set (the Rust builder)."""
        self.target_node = to_optional_id(target_node, "target_node")
        return self

    def increment_retry(self) -> None:
        """Count one more retry of this error (``retry_count``)."""
        self.retry_count += 1

    def age_secs(self) -> int:
        """Seconds since the failure; never negative."""
        return max(0, _now() - self.timestamp)


class RecoveryStrategy(enum.Enum):
    """What to do about a failed migration."""

    RETRY_ON_SAME_TARGET = enum.auto()
    RETRY_ON_DIFFERENT_TARGET = enum.auto()
    ROLLBACK = enum.auto()
    GIVE_UP = enum.auto()


@dataclass
class RecoveryAttempt:
    """One recovery attempt in an agent's history (``attempt_number`` counts from 1)."""

    attempt_number: int
    strategy: RecoveryStrategy
    timestamp: int
    target_node: Optional[bytes]
    success: bool = False
    error: Optional[str] = None

    def __post_init__(self) -> None:
        self.target_node = to_optional_id(self.target_node, "target_node")


#: Exponents past this cannot matter: 2**63 seconds already exceeds any sane max delay.
_MAX_SHIFT = 63


@dataclass
class RecoveryConfig:
    """Retry policy of a :class:`MigrationRecoveryManager` (defaults are the crate's).

    >>> [RecoveryConfig().calculate_retry_delay(a) for a in (0, 1, 2, 3, 10)]
    [10, 10, 20, 40, 300]
    """

    max_retries: int = 3
    initial_retry_delay_secs: int = 10
    max_retry_delay_secs: int = 300
    use_exponential_backoff: bool = True
    recovery_timeout_secs: int = 600
    auto_rollback: bool = True

    @classmethod
    def default(cls) -> "RecoveryConfig":
        """The crate's defaults (same as ``RecoveryConfig()``)."""
        return cls()

    def calculate_retry_delay(self, attempt: int) -> int:
        """Seconds to wait before retry ``attempt``.

        Without backoff, always the initial delay; with backoff
        ``min(initial * 2**max(attempt - 1, 0), max)``.
        """
        if not self.use_exponential_backoff:
            return self.initial_retry_delay_secs
        shift = min(max(attempt - 1, 0), _MAX_SHIFT)
        return min(self.initial_retry_delay_secs << shift, self.max_retry_delay_secs)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first bad setting (checked in the SPEC's order)."""
        if self.initial_retry_delay_secs <= 0:
            raise ValueError("initial_retry_delay_secs must be > 0")
        if self.max_retry_delay_secs < self.initial_retry_delay_secs:
            raise ValueError("max_retry_delay_secs must be >= initial_retry_delay_secs")
        if self.recovery_timeout_secs <= 0:
            raise ValueError("recovery_timeout_secs must be > 0")


class MigrationRecoveryManager:
    """Tracks failed migrations per agent and decides how to recover (thread-safe).

    One pending :class:`MigrationError` per agent (a new failure replaces it) and the list
    of :class:`RecoveryAttempt` made for it. Getters return copies, so callers can never
    change the manager's state behind its lock.
    """

    def __init__(self, config: Optional[RecoveryConfig] = None) -> None:
        config = RecoveryConfig() if config is None else config
        if not isinstance(config, RecoveryConfig):
            raise TypeError(f"config must be a RecoveryConfig, not {type(config).__name__}")
        config.validate()
        self._config = dataclasses.replace(config)
        self._pending: Dict[bytes, MigrationError] = {}
        self._history: Dict[bytes, List[RecoveryAttempt]] = {}
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    @classmethod
    def with_defaults(cls) -> "MigrationRecoveryManager":
        """A manager with the default :class:`RecoveryConfig` (the crate's defaults)."""
        return cls(RecoveryConfig())

    # -- configuration ---------------------------------------------------------------

    @property
    def config(self) -> RecoveryConfig:
        """A copy of the current config (change it with :meth:`set_config`)."""
        with self._lock:
            return dataclasses.replace(self._config)

    def set_config(self, config: RecoveryConfig) -> None:
        """Validate and install ``config``; on ``ValueError`` the old config stays."""
        if not isinstance(config, RecoveryConfig):
            raise TypeError(f"config must be a RecoveryConfig, not {type(config).__name__}")
        config.validate()
        with self._lock:
            self._config = dataclasses.replace(config)

    # -- failures and strategies -----------------------------------------------------

    def record_failure(self, error: MigrationError) -> None:
        """Make ``error`` (a copy) the agent's pending failure, replacing any earlier one."""
        if not isinstance(error, MigrationError):
            raise TypeError(f"error must be a MigrationError, not {type(error).__name__}")
        with self._lock:
            self._pending[error.agent_id] = dataclasses.replace(error)
            self._history.setdefault(error.agent_id, [])

    def determine_strategy(self, error: MigrationError) -> RecoveryStrategy:
        """The strategy for ``error`` under the current config.

        Out of retries -> ROLLBACK (auto_rollback) or GIVE_UP; else transient network and
        timeouts retry on the same target, target-side problems retry elsewhere, and
        corruption, permanent network failures and unknown errors roll back (or give up).
        """
        if not isinstance(error, MigrationError):
            raise TypeError(f"error must be a MigrationError, not {type(error).__name__}")
        with self._lock:
            cfg = self._config
        fallback = RecoveryStrategy.ROLLBACK if cfg.auto_rollback else RecoveryStrategy.GIVE_UP
        if error.retry_count >= cfg.max_retries:
            return fallback
        kind = error.error_type
        # The error type's own classification: target-side problems retry elsewhere, the
        # other retryable kinds (transient network, timeout) on the same target.
        if kind.should_change_target():
            return RecoveryStrategy.RETRY_ON_DIFFERENT_TARGET
        if kind.is_retryable():
            return RecoveryStrategy.RETRY_ON_SAME_TARGET
        return fallback

    def execute_recovery(self, agent_id: IdLike) -> RecoveryStrategy:
        """Start the next recovery attempt for the agent and return its strategy.

        Raises ``InvalidStateError("No pending recovery for agent")`` when nothing is
        pending. The attempt is appended to the history and the retry count goes up.
        """
        aid = to_id(agent_id, "agent_id")
        with self._lock:
            error = self._pending.get(aid)
            if error is None:
                raise InvalidStateError("No pending recovery for agent")
            strategy = self.determine_strategy(error)
            attempt = RecoveryAttempt(
                attempt_number=error.retry_count + 1,
                strategy=strategy,
                timestamp=_now(),
                target_node=error.target_node,
            )
            self._history.setdefault(aid, []).append(attempt)
            error.increment_retry()
            return strategy

    def mark_recovery_success(self, agent_id: IdLike) -> None:
        """The last attempt worked: drop the pending failure and mark the attempt successful."""
        aid = to_id(agent_id, "agent_id")
        with self._lock:
            self._pending.pop(aid, None)
            history = self._history.get(aid)
            if history:
                history[-1].success = True

    def mark_recovery_failure(self, agent_id: IdLike, error: str) -> None:
        """The last attempt failed with ``error``; the failure stays pending."""
        aid = to_id(agent_id, "agent_id")
        with self._lock:
            history = self._history.get(aid)
            if history:
                history[-1].success = False
                history[-1].error = str(error)

    # -- queries ---------------------------------------------------------------------

    def pending_count(self) -> int:
        """How many agents have a pending error (recorded, not yet resolved)."""
        with self._lock:
            return len(self._pending)

    @overload
    def get_pending(self) -> List[MigrationError]: ...

    @overload
    def get_pending(self, agent_id: IdLike) -> Optional[MigrationError]: ...

    def get_pending(self, agent_id: Optional[IdLike] = None) -> Union[Optional[MigrationError], List[MigrationError]]:
        """The agent's pending failure (a copy) or None; without an id, all pending failures."""
        with self._lock:
            if agent_id is None:
                return [dataclasses.replace(e) for e in self._pending.values()]
            error = self._pending.get(to_id(agent_id, "agent_id"))
            return None if error is None else dataclasses.replace(error)

    def get_history(self, agent_id: IdLike) -> Optional[List[RecoveryAttempt]]:
        """The agent's attempts, oldest first (copies); None if no failure was ever recorded."""
        with self._lock:
            history = self._history.get(to_id(agent_id, "agent_id"))
            return None if history is None else [dataclasses.replace(a) for a in history]

    def clear_history(self, agent_id: IdLike) -> None:
        """Forget the agent entirely: its history and any pending failure."""
        aid = to_id(agent_id, "agent_id")
        with self._lock:
            self._history.pop(aid, None)
            self._pending.pop(aid, None)

    def next_retry_time(self, agent_id: IdLike) -> Optional[int]:
        """Unix time of the next retry: failure time + delay for its retry count; None if not pending."""
        aid = to_id(agent_id, "agent_id")
        with self._lock:
            error = self._pending.get(aid)
            if error is None:
                return None
            return error.timestamp + self._config.calculate_retry_delay(error.retry_count)

    def is_ready_for_retry(self, agent_id: IdLike) -> bool:
        """True when a failure is pending and its :meth:`next_retry_time` has come."""
        when = self.next_retry_time(agent_id)
        return when is not None and _now() >= when

    def __repr__(self) -> str:
        with self._lock:
            return f"MigrationRecoveryManager(config={self._config!r}, pending={len(self._pending)})"
