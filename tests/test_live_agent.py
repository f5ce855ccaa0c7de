"""The live-migration agent protocols and their ready-made adapters."""

from __future__ import annotations

import numpy as np
import pytest

from cellmigrate import InvalidStateError
from cellmigrate.live import (
    MAX_EXTRA_BYTES,
    BufferSource,
    BufferTarget,
    FileStore,
    MemoryStore,
    SourceAgent,
    StateStore,
    TargetAgent,
)


def test_buffer_source_is_a_source_agent_and_calls_back() -> None:
    calls = []
    arr = np.arange(16, dtype=np.uint32)
    src = BufferSource(lambda: arr, pause=lambda: calls.append("p"), resume=lambda: calls.append("r"), extra=lambda: b"g")
    assert isinstance(src, SourceAgent)
    assert bytes(memoryview(src.state())) == arr.tobytes()
    src.pause()
    src.resume()
    assert calls == ["p", "r"] and src.extra() == b"g"


def test_extra_is_bounded() -> None:
    src = BufferSource(bytearray(1), extra=lambda: bytes(MAX_EXTRA_BYTES + 1))
    with pytest.raises(InvalidStateError, match="limit"):
        src.extra()


def test_buffer_target_copies_and_resumes() -> None:
    tgt = BufferTarget()
    assert isinstance(tgt, TargetAgent)
    tgt.adopt(memoryview(b"abc"), b"x")
    tgt.resume()
    assert tgt.state == bytearray(b"abc") and tgt.extra == b"x" and tgt.resumed


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_stores_resize_zero_filled(kind: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    store = MemoryStore() if kind == "memory" else FileStore(tmp_path / "stage")
    assert isinstance(store, StateStore)
    assert store.size() == 0 and store.view().nbytes == 0
    store.resize(10000)
    with store.view() as v:
        assert bytes(v) == bytes(10000)
        v[5] = 7
    store.resize(20000)
    with store.view() as v:
        assert v[5] == 7 and bytes(v[10000:]) == bytes(10000)
    store.resize(6)
    store.flush()
    with store.view() as v:
        assert bytes(v) == b"\0\0\0\0\0\x07"
    with pytest.raises(InvalidStateError):
        store.resize(-1)
    if isinstance(store, FileStore):
        store.close()
        assert (tmp_path / "stage").read_bytes() == b"\0\0\0\0\0\x07"
