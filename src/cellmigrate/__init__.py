"""cellmigrate: fast, verified migration of agent memory state between nodes.

Check that a target can take an agent, capture a rollback point, ship only the 4 KiB
pages that changed (compressed), apply them atomically, prove the result is the source
state byte for byte, roll back on failure, and keep an audit trail of every step.

Users import from ``cellmigrate`` only; the compiled kernels are private.
"""

from __future__ import annotations

# --- errors -------------------------------------------------------------------------
from .errors import (
    AuditStoreError,
    CellError,
    CorruptDataError,
    DeclaredSizeError,
    ExecutionFailedError,
    InputTooLargeError,
    InvalidStateError,
    JournalError,
    LegacyKeyedError,
    MigrationFailedError,
    StateChangedError,
    TruncatedInputError,
)

# --- the types of what callers pass (_types.py) ---------------------------------------
from ._types import BufferLike, IndexLike

# --- kernels: checksums, comparison, compression ------------------------------------
from ._backend import kernels as _kernels_impl
from . import _xxh3

# Bind the fused kernels to the xxhash package's XXH3 once, here (0.3 ms): every kernel
# caller, whatever module it reaches the kernels from, then finds them ready.
_xxh3.bind()
from .checksum import DEFAULT_DIGEST, DIGEST_ALGORITHMS, PAGE_SIZE, digest, simple_checksum
from .compare import dirty_pages, first_difference
from .compression import (
    LZ4_MAX_INPUT_SIZE,
    CompressionMethod,
    adaptive_compress,
    adaptive_compress_aggressive,
    adaptive_decompress,
    lz4_compress,
    lz4_decompress,
    simple_compress,
    simple_decompress,
    zstd_compress,
    zstd_decompress,
)

# --- agent --------------------------------------------------------------------------
from .agent import Agent, Policy

# --- delta and incremental migration (delta.py, tracker.py) ---------------------------
from .delta import DeltaSnapshot, DirtyPage
from .fingerprints import PageFingerprints
from .tracker import DirtyPageTracker, IncrementalMigrator, MigrationStats

# --- validation (validation.py) -----------------------------------------------------
from .validation import (
    AgentRequirements,
    CompatibilityKind,
    CompatibilityStatus,
    CompatibilityValidator,
    MigrationValidator,
    NodeCapabilities,
    StateVerifier,
    VerificationResult,
)

# --- audit (audit.py, audit_store.py) -----------------------------------------------
from .audit import AuditEntry, AuditEventType, MigrationAuditLog
from .audit_store import AuditSink, SqliteAuditSink, export_jsonl, import_jsonl

# --- rollback, recovery, progress (rollback.py, recovery.py, progress.py) -------------
from .rollback import RollbackInfo
from .recovery import (
    MigrationError,
    MigrationErrorType,
    MigrationRecoveryManager,
    RecoveryAttempt,
    RecoveryConfig,
    RecoveryStrategy,
)
from .progress import (
    CollectingCallback,
    MigrationPhase,
    MigrationProgressEvent,
    MigrationProgressTracker,
    MultiCallback,
    ProgressEventKind,
    byte_progress,
)

__version__ = "0.1.0"

#: "compiled" or "reference" (CELLMIGRATE_PURE_PYTHON=1).
IMPLEMENTATION: str = _kernels_impl.IMPLEMENTATION

__all__ = [
    "__version__",
    "IMPLEMENTATION",
    # errors
    "CellError",
    "InvalidStateError",
    "CorruptDataError",
    "MigrationFailedError",
    "ExecutionFailedError",
    "TruncatedInputError",
    "StateChangedError",
    "JournalError",
    "InputTooLargeError",
    "DeclaredSizeError",
    "LegacyKeyedError",
    "AuditStoreError",
    # types of arguments
    "BufferLike",
    "IndexLike",
    # kernels
    "PAGE_SIZE",
    "simple_checksum",
    "digest",
    "DEFAULT_DIGEST",
    "DIGEST_ALGORITHMS",
    "first_difference",
    "dirty_pages",
    "CompressionMethod",
    "LZ4_MAX_INPUT_SIZE",
    "simple_compress",
    "simple_decompress",
    "lz4_compress",
    "lz4_decompress",
    "zstd_compress",
    "zstd_decompress",
    "adaptive_compress",
    "adaptive_compress_aggressive",
    "adaptive_decompress",
    # agent
    "Agent",
    "Policy",
    # delta and incremental migration
    "DirtyPage",
    "DeltaSnapshot",
    "PageFingerprints",
    "DirtyPageTracker",
    "IncrementalMigrator",
    "MigrationStats",
    # validation
    "AgentRequirements",
    "NodeCapabilities",
    "CompatibilityKind",
    "CompatibilityStatus",
    "VerificationResult",
    "CompatibilityValidator",
    "StateVerifier",
    "MigrationValidator",
    # audit
    "AuditEventType",
    "AuditEntry",
    "MigrationAuditLog",
    "AuditSink",
    "SqliteAuditSink",
    "export_jsonl",
    "import_jsonl",
    # rollback, recovery, progress
    "RollbackInfo",
    "MigrationErrorType",
    "MigrationError",
    "RecoveryStrategy",
    "RecoveryAttempt",
    "RecoveryConfig",
    "MigrationRecoveryManager",
    "MigrationPhase",
    "ProgressEventKind",
    "MigrationProgressEvent",
    "MigrationProgressTracker",
    "CollectingCallback",
    "MultiCallback",
    "byte_progress",
]
