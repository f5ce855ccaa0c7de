"""Normalisation of 16-byte identifiers (agent, migration, node)."""

from __future__ import annotations

import uuid
from typing import Optional, Union

IdLike = Union[bytes, bytearray, memoryview, uuid.UUID]

__all__ = ["IdLike", "to_id", "to_optional_id"]


def to_id(value: IdLike, what: str = "id") -> bytes:
    """Return ``value`` as 16 ``bytes``; accepts 16 bytes-like bytes or a ``uuid.UUID``."""
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = bytes(value)
        if len(raw) != 16:
            raise ValueError(f"{what} must be 16 bytes, got {len(raw)}")
        return raw
    raise TypeError(f"{what} must be 16 bytes or uuid.UUID, not {type(value).__name__}")


def to_optional_id(value: Optional[IdLike], what: str = "id") -> Optional[bytes]:
    """Like :func:`to_id` but lets ``None`` through."""
    return None if value is None else to_id(value, what)
