"""The errors a live migration raises: all :class:`~cellmigrate.errors.CellError` subclasses.

Each maps to the :class:`~cellmigrate.recovery.MigrationErrorType` the recovery manager
uses to choose between retrying and giving up (:func:`error_type`).
"""

from __future__ import annotations

from ..errors import CellError, CorruptDataError, MigrationFailedError
from ..recovery import MigrationErrorType

__all__ = [
    "RefusedError",
    "AuthenticationError",
    "PeerTimeoutError",
    "ConnectionLostError",
    "ProtocolError",
    "OutcomeUnknownError",
    "AbortedError",
    "error_type",
]


class RefusedError(MigrationFailedError):
    """The receiver refused the migration (its compatibility check's reason, or a policy)."""


class AuthenticationError(MigrationFailedError):
    """The peer does not hold the shared key, or a frame's MAC is wrong."""


class PeerTimeoutError(MigrationFailedError):
    """The peer sent nothing (or took nothing) for longer than the timeout."""


class ConnectionLostError(MigrationFailedError):
    """The connection closed or broke mid-migration (resumable)."""


class ProtocolError(CorruptDataError):
    """The peer sent bytes that are not a valid frame of this protocol."""


class OutcomeUnknownError(MigrationFailedError):
    """The commit was sent but its outcome could not be learned: the target may have
    resumed, so the source stays paused (resuming it could run the agent twice)."""


class AbortedError(MigrationFailedError):
    """The sender aborted the migration it offered (its reason follows): the receiver
    discarded what it staged; the target's own state is unchanged."""


def error_type(exc: BaseException) -> MigrationErrorType:
    """The recovery manager's classification of a live-migration failure."""
    if isinstance(exc, RefusedError):
        return MigrationErrorType.INCOMPATIBLE_TARGET
    if isinstance(exc, PeerTimeoutError):
        return MigrationErrorType.TIMEOUT
    if isinstance(exc, ConnectionLostError):
        cause = exc.__cause__  # the retries ran out on an OS error: connection refused, no route, ...
        if isinstance(cause, OSError) and not isinstance(cause, CellError):
            return MigrationErrorType.TARGET_UNREACHABLE
        return MigrationErrorType.NETWORK_TRANSIENT
    if isinstance(exc, AuthenticationError):
        return MigrationErrorType.NETWORK_PERMANENT
    if isinstance(exc, CorruptDataError):
        return MigrationErrorType.STATE_CORRUPTION
    if isinstance(exc, (ConnectionRefusedError, OSError)) and not isinstance(exc, CellError):
        return MigrationErrorType.TARGET_UNREACHABLE
    return MigrationErrorType.UNKNOWN
