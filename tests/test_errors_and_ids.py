"""Error hierarchy, Rust-style messages, and 16-byte id normalisation."""

from __future__ import annotations

import uuid

import pytest

from cellmigrate import (
    Agent,
    CellError,
    CorruptDataError,
    ExecutionFailedError,
    InvalidStateError,
    MigrationFailedError,
    Policy,
)
from cellmigrate._ids import to_id, to_optional_id


@pytest.mark.parametrize(
    "cls, prefix",
    [
        (InvalidStateError, "Invalid state: "),
        (MigrationFailedError, "Migration failed: "),
        (ExecutionFailedError, "Agent execution failed: "),
    ],
)
def test_errors_render_like_the_crate(cls: type, prefix: str) -> None:
    err = cls("something broke")
    assert isinstance(err, CellError)
    assert str(err) == prefix + "something broke"
    assert err.message == "something broke"


def test_corrupt_data_error_is_a_value_error() -> None:
    err = CorruptDataError("bad magic")
    assert isinstance(err, CellError) and isinstance(err, ValueError)
    assert str(err) == "bad magic"


def test_ids_accept_bytes_and_uuid() -> None:
    u = uuid.uuid4()
    assert to_id(u) == u.bytes
    assert to_id(u.bytes) == u.bytes
    assert to_id(bytearray(u.bytes)) == u.bytes
    assert to_optional_id(None) is None
    with pytest.raises(ValueError, match="16 bytes"):
        to_id(b"short", "agent_id")
    with pytest.raises(TypeError, match="agent_id"):
        to_id("not-bytes", "agent_id")  # type: ignore[arg-type]


def test_agent_defaults_and_ids() -> None:
    a = Agent()
    assert a.id.version == 4
    assert a.wasm_binary == b""
    assert a.policy == Policy(min_battery_percent=20, max_latency_ms=100, preferred_architectures=[])
    fixed = uuid.UUID(int=7)
    assert Agent(b"wasm", agent_id=fixed).id == fixed
    assert Agent(agent_id=fixed.bytes).id == fixed
    assert Agent(b"x", agent_id=fixed) == Agent(b"x", agent_id=fixed)
    assert Agent() != Agent()
    with pytest.raises(ValueError):
        Agent(agent_id=b"\x00" * 15)
