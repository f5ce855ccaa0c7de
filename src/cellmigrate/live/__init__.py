"""Live migration: move a running agent's state between processes and machines.

Pre-copy rounds while the agent runs (QEMU's algorithm), a short pause for the final
round, and a proof that the target holds the source's state byte for byte before the
target resumes. The core package never imports this subpackage.

- :mod:`.agent`: the protocols users implement (source agent, target agent, staging store)
- :mod:`.driver`: :class:`LiveMigration`, the pre-copy driver, and its statistics
- :mod:`.channel`: what the driver sends through; :class:`InProcessChannel`
- :mod:`.session`: the receiving end of one migration, whatever carries it
- :mod:`.pages`, :mod:`.leaves`: chunks of pages, per-leaf digests
"""

from __future__ import annotations

from .agent import (
    MAX_EXTRA_BYTES,
    BufferSource,
    BufferTarget,
    FileStore,
    MemoryStore,
    SourceAgent,
    StateStore,
    TargetAgent,
)
from .channel import Channel, InProcessChannel
from .driver import DEFAULT_DOWNTIME_LIMIT, DEFAULT_MAX_ROUNDS, LiveMigration, LiveMigrationSummary, RoundStats
from .errors import (
    AuthenticationError,
    ConnectionLostError,
    OutcomeUnknownError,
    AbortedError,
    PeerTimeoutError,
    ProtocolError,
    RefusedError,
)
from .pages import Chunk
from .session import Offer, ReceiverSession

__all__ = [
    "MAX_EXTRA_BYTES",
    "SourceAgent",
    "TargetAgent",
    "StateStore",
    "BufferSource",
    "BufferTarget",
    "MemoryStore",
    "FileStore",
    "Channel",
    "InProcessChannel",
    "Chunk",
    "Offer",
    "ReceiverSession",
    "DEFAULT_DOWNTIME_LIMIT",
    "DEFAULT_MAX_ROUNDS",
    "LiveMigration",
    "LiveMigrationSummary",
    "RoundStats",
    "RefusedError",
    "AuthenticationError",
    "PeerTimeoutError",
    "ConnectionLostError",
    "ProtocolError",
    "OutcomeUnknownError",
    "AbortedError",
]
