"""The agent being migrated: just what migration needs from the crate's ``Agent``."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import List, Optional, Union

from ._ids import to_id

__all__ = ["Agent", "Policy"]


@dataclass
class Policy:
    """An agent's placement policy (the crate's defaults)."""

    min_battery_percent: int = 20
    max_latency_ms: int = 100
    preferred_architectures: List[str] = field(default_factory=list)


class Agent:
    """An agent: its WebAssembly binary, a stable id and a policy.

    >>> a = Agent(b"\\0asm", agent_id=uuid.UUID(int=1))
    >>> a.id
    UUID('00000000-0000-0000-0000-000000000001')
    >>> a.id_bytes == a.id.bytes
    True
    """

    __slots__ = ("_id", "wasm_binary", "policy")

    def __init__(
        self,
        wasm_binary: bytes = b"",
        *,
        agent_id: Optional[Union[uuid.UUID, bytes]] = None,
        policy: Optional[Policy] = None,
    ) -> None:
        self._id = uuid.uuid4() if agent_id is None else uuid.UUID(bytes=to_id(agent_id, "agent_id"))
        self.wasm_binary = bytes(wasm_binary)
        self.policy = Policy() if policy is None else policy

    @property
    def id(self) -> uuid.UUID:
        """The agent's id (random v4 unless given)."""
        return self._id

    @property
    def id_bytes(self) -> bytes:
        """The id as the 16 bytes that audit entries and deltas carry."""
        return self._id.bytes

    def __repr__(self) -> str:
        return f"Agent(id={self._id}, wasm_binary=<{len(self.wasm_binary)} bytes>, policy={self.policy!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Agent):
            return NotImplemented
        return (self._id, self.wasm_binary, self.policy) == (other._id, other.wasm_binary, other.policy)

    def __hash__(self) -> int:
        return hash(self._id)
