"""Migration validation: can the target take the agent, and did the state arrive intact?

The behaviour and every message text follow the Rust crate ``mielin-cells``
(``migration::types::validation``). One thing goes beyond it (SPEC §6):
:meth:`StateVerifier.verify_state` also compares the two states byte for byte, because the
crate's checksum is trivially forged; the outcome is the new field
:attr:`VerificationResult.content_valid`.
"""

from __future__ import annotations

import enum
import operator
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, List, Optional, Tuple, Union

from ._backend import kernels
from ._buffers import as_bytes_view
from ._forksafe import guard
from ._ids import IdLike, to_id
from ._types import BufferLike
from .audit import AuditEntry, AuditEventType, MigrationAuditLog
from .checksum import PAGE_SIZE, simple_checksum, state_pages_checksum
from .compare import dirty_pages_checksum, first_difference
from .errors import InvalidStateError
from .rollback import RollbackInfo, _agent_id_bytes

if TYPE_CHECKING:  # pragma: no cover - annotations only
    import os

    from .agent import Agent
    from .audit_store import AuditSink

__all__ = [
    "AgentRequirements",
    "NodeCapabilities",
    "CompatibilityKind",
    "CompatibilityStatus",
    "VerificationResult",
    "CompatibilityValidator",
    "StateVerifier",
    "MigrationValidator",
    "DEFAULT_ROLLBACK_MAX_AGE_SECS",
]

#: How long captured rollback info stays usable unless told otherwise (seconds).
DEFAULT_ROLLBACK_MAX_AGE_SECS = 3600

_GIB = 1024 * 1024 * 1024
_U32_MAX = 0xFFFFFFFF


def _count(value: Any, name: str) -> int:
    """A non-negative integer field (the crate's u64/usize)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return int(value)


def _strings(value: Any, name: str) -> List[str]:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be a list of str, not a single {type(value).__name__}")
    items = list(value)
    for item in items:
        if not isinstance(item, str):
            raise TypeError(f"{name} must contain only str, found {type(item).__name__}")
    return items


def _text(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def _nbytes(buffer: BufferLike, name: str) -> int:
    """Size in bytes of any C-contiguous buffer (``len`` would count numpy elements)."""
    with as_bytes_view(buffer, name) as view:
        return view.nbytes


@dataclass
class AgentRequirements:
    """What an agent needs from its target node (all fields optional, zero by default).

    >>> AgentRequirements(architecture="x86_64", required_memory=1 << 20).required_storage
    0
    """

    architecture: Optional[str] = None
    required_memory: int = 0
    required_storage: int = 0
    required_wasm_features: List[str] = field(default_factory=list)
    state_size: int = 0
    version: str = ""

    def __post_init__(self) -> None:
        if self.architecture is not None:
            _text(self.architecture, "architecture")
        self.required_memory = _count(self.required_memory, "required_memory")
        self.required_storage = _count(self.required_storage, "required_storage")
        self.required_wasm_features = _strings(self.required_wasm_features, "required_wasm_features")
        self.state_size = _count(self.state_size, "state_size")
        _text(self.version, "version")


@dataclass
class NodeCapabilities:
    """What a target node offers. The constructor's defaults are all zero/empty (the
    crate's ``Default``); :meth:`new` gives the crate's typical node.

    >>> caps = NodeCapabilities.new()
    >>> caps.architectures, caps.available_memory // 2**30, caps.version
    (['x86_64', 'aarch64'], 8, '0.1.0')
    """

    architectures: List[str] = field(default_factory=list)
    available_memory: int = 0
    available_storage: int = 0
    wasm_features: List[str] = field(default_factory=list)
    max_state_size: int = 0
    version: str = ""
    min_compatible_version: str = ""

    def __post_init__(self) -> None:
        self.architectures = _strings(self.architectures, "architectures")
        self.available_memory = _count(self.available_memory, "available_memory")
        self.available_storage = _count(self.available_storage, "available_storage")
        self.wasm_features = _strings(self.wasm_features, "wasm_features")
        self.max_state_size = _count(self.max_state_size, "max_state_size")
        _text(self.version, "version")
        _text(self.min_compatible_version, "min_compatible_version")

    @classmethod
    def new(cls) -> "NodeCapabilities":
        """x86_64 + aarch64, 8 GiB memory, 100 GiB storage, bulk-memory + simd, 1 GiB max
        state, version and minimum compatible version "0.1.0"."""
        return cls(
            architectures=["x86_64", "aarch64"],
            available_memory=8 * _GIB,
            available_storage=100 * _GIB,
            wasm_features=["bulk-memory", "simd"],
            max_state_size=1 * _GIB,
            version="0.1.0",
            min_compatible_version="0.1.0",
        )


class CompatibilityKind(enum.Enum):
    """The three outcomes of a compatibility check (the Rust enum's variants)."""

    COMPATIBLE = "Compatible"
    COMPATIBLE_WITH_WARNINGS = "CompatibleWithWarnings"
    INCOMPATIBLE = "Incompatible"


class CompatibilityStatus:
    """Outcome of :meth:`CompatibilityValidator.check_compatibility`. Immutable; equal by value.

    >>> s = CompatibilityStatus.compatible_with_warnings(["Low memory headroom"])
    >>> s.can_proceed(), s.warnings(), s.reason
    (True, ['Low memory headroom'], None)
    >>> CompatibilityStatus.incompatible("no") == CompatibilityStatus.incompatible("no")
    True
    >>> CompatibilityStatus.incompatible("no")
    CompatibilityStatus.incompatible('no')
    """

    __slots__ = ("_kind", "_warnings", "_reason")

    _kind: CompatibilityKind
    _warnings: Tuple[str, ...]
    _reason: Optional[str]

    def __init__(
        self, kind: CompatibilityKind, warnings: Iterable[str] = (), reason: Optional[str] = None
    ) -> None:
        if not isinstance(kind, CompatibilityKind):
            raise TypeError(f"kind must be a CompatibilityKind, not {type(kind).__name__}")
        warns = tuple(_strings(warnings, "warnings"))
        if kind is CompatibilityKind.INCOMPATIBLE:
            _text(reason, "reason")  # None included: an incompatible status needs a reason
        elif reason is not None:
            raise ValueError(f"a {kind.value} status has no reason")
        if warns and kind is not CompatibilityKind.COMPATIBLE_WITH_WARNINGS:
            raise ValueError(f"a {kind.value} status has no warnings")
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_warnings", warns)
        object.__setattr__(self, "_reason", reason)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("CompatibilityStatus is immutable")

    @classmethod
    def compatible(cls) -> "CompatibilityStatus":
        """Fully compatible."""
        return cls(CompatibilityKind.COMPATIBLE)

    @classmethod
    def compatible_with_warnings(cls, warnings: Iterable[str]) -> "CompatibilityStatus":
        """Compatible, with warnings the caller should see."""
        return cls(CompatibilityKind.COMPATIBLE_WITH_WARNINGS, warnings)

    @classmethod
    def incompatible(cls, reason: str) -> "CompatibilityStatus":
        """Not compatible, for ``reason``."""
        return cls(CompatibilityKind.INCOMPATIBLE, reason=reason)

    @property
    def kind(self) -> CompatibilityKind:
        """Which of the three outcomes this is."""
        return self._kind

    @property
    def reason(self) -> Optional[str]:
        """Why the target is incompatible; ``None`` unless incompatible."""
        return self._reason

    def can_proceed(self) -> bool:
        """True unless incompatible."""
        return self._kind is not CompatibilityKind.INCOMPATIBLE

    def warnings(self) -> List[str]:
        """The warnings (a new list; empty unless compatible with warnings)."""
        return list(self._warnings)

    def is_compatible(self) -> bool:
        """True only for the warning-free compatible outcome."""
        return self._kind is CompatibilityKind.COMPATIBLE

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CompatibilityStatus):
            return NotImplemented
        return (self._kind, self._warnings, self._reason) == (other._kind, other._warnings, other._reason)

    def __hash__(self) -> int:
        return hash((self._kind, self._warnings, self._reason))

    def __repr__(self) -> str:
        if self._kind is CompatibilityKind.COMPATIBLE:
            return "CompatibilityStatus.compatible()"
        if self._kind is CompatibilityKind.COMPATIBLE_WITH_WARNINGS:
            return f"CompatibilityStatus.compatible_with_warnings({list(self._warnings)!r})"
        return f"CompatibilityStatus.incompatible({self._reason!r})"


@dataclass
class VerificationResult:
    """Outcome of a post-migration verification.

    ``content_valid`` (beyond the crate) is False when a byte-for-byte comparison found
    the states different, or their sizes differ so they cannot be identical. Checks that
    do not compare content (:meth:`StateVerifier.verify_delta`) leave it True.

    >>> VerificationResult.success().details
    ['All verification checks passed']
    >>> r = VerificationResult.failure("agent did not answer")
    >>> r.passed, r.content_valid, r.details
    (False, False, ['agent did not answer'])
    """

    passed: bool
    checksum_valid: bool
    size_valid: bool
    agent_responsive: bool
    details: List[str] = field(default_factory=list)
    content_valid: bool = True

    @classmethod
    def success(cls) -> "VerificationResult":
        """Every check passed."""
        return cls(True, True, True, True, ["All verification checks passed"], True)

    @classmethod
    def failure(cls, reason: str) -> "VerificationResult":
        """Every flag False, ``reason`` as the only detail."""
        return cls(False, False, False, False, [_text(reason, "reason")], False)


def _parse_u32(part: Optional[str]) -> int:
    """Rust's ``str::parse::<u32>().unwrap_or(0)``: optional '+', ASCII digits, no overflow."""
    if part is None:
        return 0
    digits = part[1:] if part.startswith("+") else part
    if not digits or not all("0" <= c <= "9" for c in digits):
        return 0
    value = int(digits)
    return value if value <= _U32_MAX else 0


def _parse_version(version: str) -> Tuple[int, int, int]:
    parts = version.split(".")
    padded: List[Optional[str]] = [*parts, None, None, None]
    return (_parse_u32(padded[0]), _parse_u32(padded[1]), _parse_u32(padded[2]))


class CompatibilityValidator:
    """Pre-migration check: can a node with ``capabilities`` take an agent with ``requirements``?"""

    @staticmethod
    def check_compatibility(
        requirements: AgentRequirements, capabilities: NodeCapabilities
    ) -> CompatibilityStatus:
        """Run the crate's checks in its order; the first failing one decides.

        Order: architecture, memory (then the low-headroom warning when less than a fifth
        of the node's memory would remain), storage, state size, WASM features, version.

        >>> req = AgentRequirements(architecture="riscv64")
        >>> CompatibilityValidator.check_compatibility(req, NodeCapabilities.new()).reason
        'Target does not support architecture: riscv64'
        """
        if not isinstance(requirements, AgentRequirements):
            raise TypeError(f"requirements must be AgentRequirements, not {type(requirements).__name__}")
        if not isinstance(capabilities, NodeCapabilities):
            raise TypeError(f"capabilities must be NodeCapabilities, not {type(capabilities).__name__}")
        req, caps = requirements, capabilities
        warnings: List[str] = []

        if req.architecture is not None and req.architecture not in caps.architectures:
            return CompatibilityStatus.incompatible(f"Target does not support architecture: {req.architecture}")

        if req.required_memory > caps.available_memory:
            return CompatibilityStatus.incompatible(
                f"Insufficient memory: required {req.required_memory} bytes, "
                f"available {caps.available_memory} bytes"
            )
        # The crate's saturating_sub; never negative here since memory fits.
        headroom = max(caps.available_memory - req.required_memory, 0)
        if headroom < caps.available_memory // 5:
            warnings.append(f"Low memory headroom: only {headroom} bytes available after migration")

        if req.required_storage > caps.available_storage:
            return CompatibilityStatus.incompatible(
                f"Insufficient storage: required {req.required_storage} bytes, "
                f"available {caps.available_storage} bytes"
            )

        if req.state_size > caps.max_state_size:
            return CompatibilityStatus.incompatible(
                f"Agent state too large: {req.state_size} bytes exceeds maximum {caps.max_state_size} bytes"
            )

        for feature in req.required_wasm_features:
            if feature not in caps.wasm_features:
                return CompatibilityStatus.incompatible(f"Target does not support WASM feature: {feature}")

        if not CompatibilityValidator.is_version_compatible(req.version, caps.min_compatible_version):
            return CompatibilityStatus.incompatible(
                f"Version incompatible: agent version {req.version} not compatible with "
                f"target minimum {caps.min_compatible_version}"
            )

        if warnings:
            return CompatibilityStatus.compatible_with_warnings(warnings)
        return CompatibilityStatus.compatible()

    @staticmethod
    def is_version_compatible(agent_version: str, min_version: str) -> bool:
        """The crate's simple rule: same major, and (minor, patch) at least the minimum's.

        Missing or non-numeric parts count as 0 (so "" is "0.0.0").

        >>> CompatibilityValidator.is_version_compatible("0.2.0", "0.1.5")
        True
        >>> CompatibilityValidator.is_version_compatible("1.0.0", "0.1.0")
        False
        """
        agent = _parse_version(_text(agent_version, "agent_version"))
        minimum = _parse_version(_text(min_version, "min_version"))
        return agent[0] == minimum[0] and (
            agent[1] > minimum[1] or (agent[1] == minimum[1] and agent[2] >= minimum[2])
        )


#: Below this, both states sit in cache after the first read, so two plain kernel calls
#: (checksum, then first difference) beat the fused pass's page bookkeeping (measured:
#: 4 KiB 0.8 vs 2.5 us, 64 KiB 3.3 vs 7 us; even at 1 MiB).
_FUSE_MIN = 1 << 20


def _scan(original: memoryview, migrated: memoryview) -> Tuple[int, int, Optional[int]]:
    """Checksums of both equal-length states and their first differing offset (or None),
    from one read of each: the pages are compared and ``migrated`` checksummed in a
    single pass, and the checksum being linear in the bytes, the original's is the
    migrated one with the differing pages swapped back."""
    if original.nbytes < _FUSE_MIN:
        got = int(kernels.checksum(migrated, 0))
        first: Optional[int] = kernels.first_difference(original, migrated)
        return (got if first is None else int(kernels.checksum(original, 0))), got, first
    pages, got = dirty_pages_checksum(original, migrated)
    if not len(pages):
        return got, got, None
    start = int(pages[0]) * PAGE_SIZE
    end = min(start + PAGE_SIZE, original.nbytes)
    offset = first_difference(original[start:end], migrated[start:end])
    assert offset is not None  # the page was reported dirty
    before = (got - state_pages_checksum(migrated, pages) + state_pages_checksum(original, pages)) & 0xFFFFFFFF
    return before, got, start + offset


def _check_checksum(result: VerificationResult, what: str, expected: int, got: int) -> None:
    """The crate's checksum outcome lines: "{what} verified" or "{what} mismatch: ..."."""
    if got == expected:
        result.checksum_valid = True
        result.details.append(f"{what} verified")
    else:
        result.passed = False
        result.details.append(f"{what} mismatch: expected {expected}, got {got}")


def _verify(original: memoryview, migrated: memoryview, expected: Optional[int]) -> VerificationResult:
    """:meth:`StateVerifier.verify_state`; ``expected=None`` checks against the original's
    own checksum."""
    result = VerificationResult(passed=True, checksum_valid=False, size_valid=False, agent_responsive=True, details=[])
    offset: Optional[int] = None
    if original.nbytes == migrated.nbytes:
        result.size_valid = True
        result.details.append(f"Size verified: {original.nbytes} bytes")
        before, got, offset = _scan(original, migrated)
        if expected is None:
            expected = before
    else:
        result.passed = False
        result.content_valid = False
        result.details.append(f"Size mismatch: original {original.nbytes} bytes, migrated {migrated.nbytes} bytes")
        got = simple_checksum(migrated)
        if expected is None:
            expected = simple_checksum(original)

    _check_checksum(result, "Checksum", expected, got)

    # Beyond the crate: the checksum is forgeable, the bytes are not.
    if offset is not None:
        result.passed = False
        result.content_valid = False
        result.details.append(f"Content mismatch at offset {offset}")
    return result


class StateVerifier:
    """Post-migration checks of a state (or a delta) against what was sent."""

    @staticmethod
    def verify_state(original_state: BufferLike, migrated_state: BufferLike, original_checksum: int) -> VerificationResult:
        """Compare sizes, the crate's checksum, and then the bytes themselves.

        States are any C-contiguous buffers (read in place, never copied). The details
        are the crate's two lines ("Size verified: {n} bytes" or "Size mismatch: ...", then
        "Checksum verified" or "Checksum mismatch: ..."); when the sizes match but the
        bytes differ, ``content_valid`` is False and "Content mismatch at offset {k}"
        (the first differing byte) is added, which catches forged checksums.

        >>> from cellmigrate import simple_checksum
        >>> a = bytes([10, 20, 30]); forged = bytes([12, 19, 30])   # same checksum
        >>> r = StateVerifier.verify_state(a, forged, simple_checksum(a))
        >>> r.checksum_valid, r.passed, r.details[-1]
        (True, False, 'Content mismatch at offset 0')
        """
        expected = _count(original_checksum, "original_checksum")
        with as_bytes_view(original_state, "original_state") as original, as_bytes_view(
            migrated_state, "migrated_state"
        ) as migrated:
            return _verify(original, migrated, expected)

    @staticmethod
    def verify_delta(base_state: BufferLike, delta: Any, expected_checksum: int) -> VerificationResult:
        """Check a delta before applying it: its checksum and its size against the base.

        ``delta`` needs ``checksum`` and ``total_size`` (a ``DeltaSnapshot``; its
        ``base_size``, when it has one, is the size the base must have). Content is
        not compared (nothing is applied), so ``content_valid`` stays True.
        """
        expected = _count(expected_checksum, "expected_checksum")
        result = VerificationResult(
            passed=True, checksum_valid=False, size_valid=False, agent_responsive=True, details=[]
        )
        checksum = delta.checksum
        # A delta that resizes the state (DeltaSnapshot.create(..., resize=True)) names
        # the size of its base; any other delta's base has its total_size.
        total_size = getattr(delta, "base_size", None)
        if total_size is None:
            total_size = delta.total_size
        _check_checksum(result, "Delta checksum", expected, checksum)
        base_size = _nbytes(base_state, "base_state")
        if total_size == base_size:
            result.size_valid = True
            result.details.append("Delta size compatible with base state")
        else:
            result.passed = False
            result.details.append(
                f"Delta size mismatch: delta expects {total_size} bytes, base has {base_size} bytes"
            )
        return result


class MigrationValidator:
    """Ties the checks, the rollback points and the audit trail of migrations together.

    Every step writes the audit entries the crate writes. Rollback points are kept per
    migration id (16 bytes) until the migration is completed, rolled back or expires
    (``rollback_max_age_secs``, default 3600). Pass ``audit_log`` to share a log, or
    ``sink`` (an :class:`~cellmigrate.audit_store.SqliteAuditSink`, or a database path) to
    get a durable 10000-entry log. Safe to use from several threads.

    >>> import uuid
    >>> from cellmigrate import Agent
    >>> v = MigrationValidator()
    >>> mid, agent = uuid.UUID(int=7).bytes, Agent(b"\\0asm")
    >>> req = AgentRequirements(version="0.1.0")
    >>> v.validate_pre_migration(mid, agent, req, NodeCapabilities.new())
    CompatibilityStatus.compatible()
    >>> state = bytes(range(256)) * 16
    >>> v.verify_post_migration(mid, agent.id, state, bytearray(state)).passed
    True
    >>> [e.details for e in v.audit_log]
    ['Compatibility check passed', 'Size verified: 4096 bytes; Checksum verified']
    """

    def __init__(
        self,
        audit_log: Optional[MigrationAuditLog] = None,
        *,
        sink: Union["AuditSink", str, "os.PathLike[str]", None] = None,
        rollback_max_age_secs: int = DEFAULT_ROLLBACK_MAX_AGE_SECS,
    ) -> None:
        if audit_log is not None and sink is not None:
            raise ValueError("give either audit_log or sink, not both")
        if audit_log is not None and not isinstance(audit_log, MigrationAuditLog):
            raise TypeError(f"audit_log must be a MigrationAuditLog, not {type(audit_log).__name__}")
        # Validate before opening anything, so bad arguments cannot leak an open database.
        self._max_age = _count(rollback_max_age_secs, "rollback_max_age_secs")
        self._audit_log = audit_log if audit_log is not None else MigrationAuditLog(sink=sink)
        self._rollback_info: Dict[bytes, RollbackInfo] = {}
        # Guards the rollback map so that the check-then-remove steps of a rollback are
        # atomic across threads; the audit log has its own lock.
        self._lock = threading.RLock()
        guard(self, "_lock")  # taken around fork(): see _forksafe

    @property
    def audit_log(self) -> MigrationAuditLog:
        """The audit log every step writes to."""
        return self._audit_log

    @property
    def rollback_max_age_secs(self) -> int:
        """Age (seconds) from which captured rollback info is expired."""
        return self._max_age

    def set_rollback_max_age(self, secs: int) -> None:
        """Set the age (seconds) from which rollback info is expired (0 expires everything)."""
        self._max_age = _count(secs, "secs")

    def validate_pre_migration(
        self,
        migration_id: IdLike,
        agent: "Agent",
        requirements: AgentRequirements,
        target_capabilities: NodeCapabilities,
    ) -> CompatibilityStatus:
        """Check compatibility and log it (VALIDATION_COMPLETED)."""
        mid = to_id(migration_id, "migration_id")
        status = CompatibilityValidator.check_compatibility(requirements, target_capabilities)
        self._audit_log.log_validation(mid, _agent_id_bytes(agent), status)
        return status

    def capture_rollback_info(self, migration_id: IdLike, agent: "Agent", state: BufferLike, **capture_options: Any) -> None:
        """Capture a rollback point for ``agent``'s ``state`` under ``migration_id``.

        Replaces any earlier point of the same migration. Extra keyword arguments go to
        ``RollbackInfo.capture`` (e.g. ``spill_to=path`` for GiB states). Logs
        SNAPSHOT_CAPTURED "Rollback info captured: {n} bytes".
        """
        mid = to_id(migration_id, "migration_id")
        info = RollbackInfo.capture(agent, state, **capture_options)
        with self._lock:
            self._rollback_info[mid] = info
        self._audit_log.log(
            AuditEntry.new(
                mid, info.agent_id, AuditEventType.SNAPSHOT_CAPTURED, f"Rollback info captured: {len(info)} bytes", True
            )
        )

    def verify_post_migration(
        self, migration_id: IdLike, agent_id: IdLike, original_state: BufferLike, migrated_state: BufferLike
    ) -> VerificationResult:
        """Verify ``migrated_state`` against ``original_state`` and log it (VERIFICATION_COMPLETED)."""
        mid = to_id(migration_id, "migration_id")
        aid = to_id(agent_id, "agent_id")
        with as_bytes_view(original_state, "original_state") as original, as_bytes_view(
            migrated_state, "migrated_state"
        ) as migrated:
            # The expected checksum is the original's: derived from the same pass that
            # compares the states, instead of reading the original once more for it.
            result = _verify(original, migrated, None)
        self._audit_log.log_verification(mid, aid, result)
        return result

    def execute_rollback(self, migration_id: IdLike) -> RollbackInfo:
        """Hand back the rollback point of a migration, logging the rollback.

        Raises ``InvalidStateError`` when there is none ("No rollback info available for
        migration"), it has expired ("Rollback info has expired") or its holder closed it
        ("Rollback point is closed"; the audit trail records the failed rollback). The
        point is removed in every case.
        """
        mid = to_id(migration_id, "migration_id")
        with self._lock:
            info = self._rollback_info.pop(mid, None)
        if info is None:
            raise InvalidStateError("No rollback info available for migration")
        aid = info.agent_id
        self._audit_log.log_rollback(mid, aid, True, True, "Rollback initiated")
        if not info.is_valid(self._max_age):
            self._audit_log.log_rollback(
                mid, aid, False, False, f"Rollback info expired: {info.age_secs()} seconds old"
            )
            raise InvalidStateError("Rollback info has expired")
        if info.closed:  # its holder closed it: a spilled or loaded state is unmapped
            self._audit_log.log_rollback(mid, aid, False, False, "Rollback failed: the rollback point was closed")
            raise InvalidStateError("Rollback point is closed")
        self._audit_log.log_rollback(mid, aid, False, True, f"Rollback completed: restored {len(info)} bytes")
        return info

    def complete_migration(self, migration_id: IdLike, success: bool, details: str) -> None:
        """Finish a migration: drop its rollback point and log the outcome.

        Does nothing (not even logging) when the migration has no rollback point, as in the crate.
        """
        mid = to_id(migration_id, "migration_id")
        _text(details, "details")
        with self._lock:
            info = self._rollback_info.pop(mid, None)
        if info is not None:
            self._audit_log.log_completion(mid, info.agent_id, bool(success), details)

    def cleanup_expired(self) -> int:
        """Drop every expired rollback point; returns how many were dropped."""
        with self._lock:
            expired = [mid for mid, info in self._rollback_info.items() if not info.is_valid(self._max_age)]
            for mid in expired:
                del self._rollback_info[mid]
        return len(expired)

    def has_rollback_info(self, migration_id: IdLike) -> bool:
        """True while a rollback point is held for ``migration_id``."""
        mid = to_id(migration_id, "migration_id")
        with self._lock:
            return mid in self._rollback_info

    def rollback_count(self) -> int:
        """Number of rollback points held."""
        with self._lock:
            return len(self._rollback_info)

    def __repr__(self) -> str:
        return (
            f"MigrationValidator(rollback_points={self.rollback_count()}, "
            f"rollback_max_age_secs={self._max_age}, audit_log={self._audit_log!r})"
        )
