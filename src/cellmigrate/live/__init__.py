"""Live migration: move a running agent's state between processes and machines.

Pre-copy rounds while the agent runs (QEMU's algorithm), a short pause for the final
round, and a proof that the target holds the source's state byte for byte before the
target resumes. The core package never imports this subpackage.
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

__all__ = [
    "MAX_EXTRA_BYTES",
    "SourceAgent",
    "TargetAgent",
    "StateStore",
    "BufferSource",
    "BufferTarget",
    "MemoryStore",
    "FileStore",
]
