"""Rollback points: a saved copy of an agent's state that a failed migration returns to.

:class:`RollbackInfo` is the crate's ``RollbackInfo`` (``capture``, ``age_secs``,
``is_valid``) plus what big states need: a strong digest next to the weak checksum,
``restore_into`` a writable buffer (verified, target untouched on failure), an optional
spill of the copy to a memory-mapped file instead of RAM, and a self-checking binary
serialization (see ``docs/ROLLBACK_FORMAT.md``).
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id, to_optional_id
from .checksum import digest as _digest
from .checksum import simple_checksum
from .compare import first_difference
from .errors import InvalidStateError

__all__ = ["RollbackInfo"]

#: Default strong digest recorded by :meth:`RollbackInfo.capture`.
DEFAULT_DIGEST = "xxh3_128"


def _now() -> int:
    return int(time.time())


def _agent_id_bytes(agent: Any) -> bytes:
    """The agent's id as 16 bytes (``Agent.id_bytes``, or any ``.id`` the id rules accept)."""
    raw = getattr(agent, "id_bytes", None)
    if raw is not None:
        return to_id(raw, "agent.id")
    if not hasattr(agent, "id"):
        raise TypeError(f"agent must have an 'id' (an Agent), not {type(agent).__name__}")
    return to_id(agent.id, "agent.id")


def policy_bytes(agent: Any) -> bytes:
    """Stable serialization of the agent's policy: compact JSON with sorted keys.

    Stable means the same policy always gives the same bytes, so two rollback points can be
    compared (and digested) byte for byte. An agent without a policy gives ``b""``.
    """
    policy = getattr(agent, "policy", None)
    if policy is None:
        return b""
    if dataclasses.is_dataclass(policy) and not isinstance(policy, type):
        payload: Any = dataclasses.asdict(policy)
    else:
        payload = vars(policy)
    return json.dumps(payload, sort_keys=True, separators=(",", ":")).encode("utf-8")


@dataclass(eq=False, repr=False)
class RollbackInfo:
    """A saved copy of an agent's state, taken before a migration so it can be undone.

    Create one with :meth:`capture`; ``is_valid(max_age_secs)`` says whether it is still
    young enough to use.

    >>> from cellmigrate import Agent
    >>> info = RollbackInfo.capture(Agent(), b"state")
    >>> bytes(info.original_state), info.original_checksum
    (b'state', 1607)
    >>> info.is_valid(3600), info.is_valid(0)
    (True, False)
    >>> target = bytearray(b"garbage!")
    >>> info.restore_into(target)
    5
    >>> bytes(target)
    b'state'

    Attributes:
        agent_id: the agent's 16-byte id.
        original_state: the saved copy (``bytes``, or a read-only ``memoryview`` over a
            memory-mapped file when captured with ``spill_to``).
        original_checksum: ``simple_checksum`` of the saved copy (the crate's check).
        original_policy_data: the agent's policy, serialized (compact sorted JSON).
        created_at: Unix seconds of the capture.
        source_node: optional 16-byte id of the node the state was captured on.
        digest_algorithm: "xxh3_128" or "blake3", or ``None`` for a checksum-only point.
        digest: the strong digest of the saved copy (``None`` with ``digest_algorithm``).
    """

    agent_id: bytes
    original_state: Union[bytes, memoryview]
    original_checksum: int
    original_policy_data: bytes
    created_at: int
    source_node: Optional[bytes] = None
    digest_algorithm: Optional[str] = None
    digest: Optional[bytes] = None

    def __post_init__(self) -> None:
        self.agent_id = to_id(self.agent_id, "agent_id")
        self.source_node = to_optional_id(self.source_node, "source_node")
        self.original_policy_data = bytes(self.original_policy_data)
        if isinstance(self.original_state, (bytearray, memoryview)) and not (
            isinstance(self.original_state, memoryview) and self.original_state.readonly
        ):
            # A rollback point must not change under its checksum: keep a private copy.
            self.original_state = bytes(self.original_state)
        elif not isinstance(self.original_state, (bytes, memoryview)):
            self.original_state = bytes(as_bytes_view(self.original_state, "original_state"))
        if (self.digest_algorithm is None) != (self.digest is None):
            raise ValueError("digest_algorithm and digest must be given together")
        if self.digest is not None:
            self.digest = bytes(self.digest)

    # -- the crate's API -------------------------------------------------------------

    @classmethod
    def capture(
        cls,
        agent: Any,
        state: Any,
        *,
        source_node: Optional[IdLike] = None,
        digest_algorithm: Optional[str] = DEFAULT_DIGEST,
    ) -> "RollbackInfo":
        """Copy ``state`` once, checksum and digest the copy, and stamp the time.

        ``state`` is any C-contiguous buffer. The checksum and digest are computed over
        the copy, so the rollback point is self-consistent even if the caller keeps
        mutating its buffer. ``digest_algorithm=None`` records the checksum only.
        """
        agent_id = _agent_id_bytes(agent)
        view = as_bytes_view(state, "state")
        saved = bytes(view)
        return cls(
            agent_id=agent_id,
            original_state=saved,
            original_checksum=simple_checksum(saved),
            original_policy_data=policy_bytes(agent),
            created_at=_now(),
            source_node=to_optional_id(source_node, "source_node"),
            digest_algorithm=digest_algorithm,
            digest=None if digest_algorithm is None else _digest(saved, digest_algorithm),
        )

    def age_secs(self) -> int:
        """Seconds since capture; never negative (a clock stepping back gives 0)."""
        return max(0, _now() - self.created_at)

    def is_valid(self, max_age_secs: int) -> bool:
        """True while ``age_secs() < max_age_secs`` (strict, so ``is_valid(0)`` is False)."""
        return self.age_secs() < max_age_secs

    # -- restore ---------------------------------------------------------------------

    def verify(self) -> None:
        """Check the saved copy against its checksum and digest.

        Raises :class:`InvalidStateError` naming the check that failed.
        """
        got = simple_checksum(self.original_state)
        if got != self.original_checksum:
            raise InvalidStateError(
                f"Rollback state checksum mismatch: expected {self.original_checksum}, got {got}"
            )
        if self.digest_algorithm is not None and self.digest is not None:
            actual = _digest(self.original_state, self.digest_algorithm)
            if not hmac.compare_digest(actual, self.digest):
                raise InvalidStateError(f"Rollback state {self.digest_algorithm} digest mismatch")

    def restore_into(self, target: Any) -> int:
        """Write the saved state back into ``target`` and verify it; return the byte count.

        ``target`` is a writable buffer: ``bytearray`` (grown or shrunk to the saved
        size), writable ``memoryview``, writable ``mmap`` or numpy array (these must
        already have the saved size in bytes). The saved copy is verified (checksum and
        digest) *before* anything is written, so a corrupted rollback point or a target of
        the wrong size raises :class:`InvalidStateError` and leaves ``target`` byte for
        byte unchanged. After writing, the target is compared with the verified copy.
        """
        saved = as_bytes_view(self.original_state, "original_state")
        n = saved.nbytes
        resizable = isinstance(target, bytearray)
        if not resizable:
            view = as_writable_view(target, "target")
            if view.nbytes != n:
                raise InvalidStateError(
                    f"Rollback target size mismatch: expected {n} bytes, got {view.nbytes} bytes"
                )
        self.verify()
        if resizable:
            old = len(target)
            if old > n:
                del target[n:]
            elif old < n:
                # Grow straight from the saved copy: no temporary zero buffer.
                target[old:] = saved[old:]
            view = memoryview(target)
        try:
            view[:] = saved
            diff = first_difference(view, saved)
        finally:
            view.release()
        if diff is not None:
            raise InvalidStateError(f"Restored state differs from the rollback point at offset {diff}")
        return n

    # -- value semantics -------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.original_state)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RollbackInfo):
            return NotImplemented
        return (
            self.agent_id == other.agent_id
            and self.original_checksum == other.original_checksum
            and self.original_policy_data == other.original_policy_data
            and self.created_at == other.created_at
            and self.source_node == other.source_node
            and self.digest_algorithm == other.digest_algorithm
            and self.digest == other.digest
            and len(self.original_state) == len(other.original_state)
            and self.original_state == other.original_state
        )

    __hash__ = None  # type: ignore[assignment]  # mutable value type, like the dataclass default

    def __repr__(self) -> str:
        # Never print the state itself: it can be GiB.
        src = None if self.source_node is None else self.source_node.hex()
        dig = None if self.digest is None else self.digest.hex()
        return (
            f"RollbackInfo(agent_id={self.agent_id.hex()}, "
            f"original_state=<{len(self.original_state)} bytes>, "
            f"original_checksum={self.original_checksum}, "
            f"original_policy_data={self.original_policy_data!r}, created_at={self.created_at}, "
            f"source_node={src}, digest_algorithm={self.digest_algorithm!r}, digest={dig})"
        )
