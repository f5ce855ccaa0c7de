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


def test_memory_store_array_is_the_staged_array_itself() -> None:
    store = MemoryStore(b"\x01\x02\x03")
    store.resize(8192)
    store.view()[4096:4100] = b"abcd"
    array = store.array
    assert array.dtype == np.uint8 and array.shape == (8192,)
    assert bytes(array[:3]) == b"\x01\x02\x03" and bytes(array[4096:4100]) == b"abcd"
    array[0] = 9  # not a copy: writes show through the store's own view
    assert store.view()[0] == 9 and store.array is array
    with pytest.raises(AttributeError):
        store.array = np.zeros(1, dtype=np.uint8)  # type: ignore[misc]
    store.resize(4096)  # a new array; the old one is left as it was
    assert store.array is not array and store.array.nbytes == 4096 and array.nbytes == 8192


def test_a_file_source_at_rest_refuses_to_commit_a_file_written_meanwhile(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """``send`` without ``--live``: a page written through a memory map (which may leave
    the file's times alone for seconds) between the open and the COMMIT fails the
    migration: the pages themselves are compared."""
    import mmap

    from cellmigrate.errors import StateChangedError
    from cellmigrate.live.cli import FileSource
    from cellmigrate.statefile import StateFile

    monkeypatch.setattr(StateFile, "check", lambda self: None)  # as if size and times stayed

    path = tmp_path / "state.bin"
    path.write_bytes(bytes(range(256)) * 64 * 8)
    quiet = FileSource(str(path), at_rest=True)
    assert quiet.extra() == b""  # unchanged: nothing to say
    quiet.close()
    source = FileSource(str(path), at_rest=True)
    with open(path, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as m:
        m[5000:5004] = b"new!"
    with pytest.raises(StateChangedError, match="changed while it was read"):
        source.extra()
    source.close()
    live = FileSource(str(path))  # --live: the writer is expected; pause() stops it
    assert live.extra() == b""
    live.close()


def test_a_buffer_source_refuses_a_non_buffer_at_once() -> None:
    """A str, a strided array or an int failed only when run() read the state; now at
    construction (a callable's buffers are still checked when read)."""
    import numpy as np

    from cellmigrate.live import BufferSource

    for bad, kind in (("abc", TypeError), (np.zeros((4, 4))[:, ::2], ValueError), (5, TypeError)):
        with pytest.raises(kind):
            BufferSource(bad)  # type: ignore[arg-type]
    assert bytes(BufferSource(bytearray(b"ok")).state()) == b"ok"
    assert BufferSource(lambda: "checked later").state() == "checked later"
