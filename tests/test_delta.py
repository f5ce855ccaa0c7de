"""DirtyPage and DeltaSnapshot: create, apply round trips, digests and keys, sizes, wire."""

from __future__ import annotations

import mmap
import os
import random
from typing import Any, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cellmigrate
from cellmigrate import (
    PAGE_SIZE,
    CorruptDataError,
    DeltaSnapshot,
    DirtyPage,
    InvalidStateError,
    digest,
    dirty_pages,
    simple_checksum,
    simple_compress,
)

AGENT = bytes(range(16))
KEY = bytes(range(100, 132))


def mutate(state: bytes, rng: random.Random, pages: int) -> bytes:
    """Copy of ``state`` with a few random bytes changed in ``pages`` random pages."""
    out = bytearray(state)
    npages = -(-len(out) // PAGE_SIZE)
    for page in rng.sample(range(npages), min(pages, npages)):
        start = page * PAGE_SIZE
        end = min(start + PAGE_SIZE, len(out))
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(start, end)
            out[i] = (out[i] + rng.randint(1, 255)) & 0xFF
    return bytes(out)


# --- DirtyPage ---------------------------------------------------------------------------


def test_dirty_page_compress_keeps_rle_only_when_strictly_smaller() -> None:
    zeros = DirtyPage(0, bytes(PAGE_SIZE))
    zeros.compress()
    assert zeros.compressed and zeros.data == simple_compress(bytes(PAGE_SIZE))
    assert len(zeros.data) < PAGE_SIZE

    noise = os.urandom(PAGE_SIZE).replace(b"\xff", b"\x00")
    raw = DirtyPage(1, noise)
    raw.compress()
    assert not raw.compressed and raw.data == noise

    # RLE of "abc" is "abc": equal length is not strictly smaller, so it stays raw.
    same = DirtyPage(2, b"abc")
    assert simple_compress(b"abc") == b"abc"
    same.compress()
    assert not same.compressed and same.data == b"abc"


def test_dirty_page_decompress_and_get_data() -> None:
    page = DirtyPage(7, b"\x05" * 300 + b"xyz")
    original = page.data
    page.compress()
    assert page.compressed
    assert page.get_data() == original
    assert page.compressed  # get_data does not change the page
    page.compress()  # compressing twice is a no-op
    assert page.get_data() == original
    page.decompress()
    assert not page.compressed and page.data == original
    page.decompress()
    assert page.data == original


def test_dirty_page_eq_repr_and_validation() -> None:
    assert DirtyPage(1, b"ab") == DirtyPage(1, bytearray(b"ab"), False)
    assert DirtyPage(1, b"ab") != DirtyPage(2, b"ab")
    assert DirtyPage(1, b"ab") != DirtyPage(1, b"ab", True)
    assert repr(DirtyPage(3, bytes(10), True)) == "DirtyPage(index=3, data=<10 bytes>, compressed=True)"
    assert isinstance(DirtyPage(1, bytearray(b"x")).data, bytes)
    with pytest.raises(ValueError, match="index"):
        DirtyPage(-1, b"")
    with pytest.raises(TypeError, match="index"):
        DirtyPage("1", b"")  # type: ignore[arg-type]


def test_dirty_page_corrupt_data_raises_corrupt_data_error() -> None:
    page = DirtyPage(0, b"ab\xff", compressed=True)
    with pytest.raises(CorruptDataError):
        page.get_data()
    with pytest.raises(CorruptDataError):
        page.decompress()
    assert page.compressed and page.data == b"ab\xff"


# --- create ------------------------------------------------------------------------------


def test_create_records_fields_pages_and_checks() -> None:
    rng = random.Random(1)
    old = bytes(rng.randrange(256) for _ in range(5 * PAGE_SIZE + 123))
    new = bytearray(old)
    new[PAGE_SIZE + 10] ^= 0x55
    new[-1] ^= 1  # the short last page
    new[3 * PAGE_SIZE : 4 * PAGE_SIZE] = bytes(PAGE_SIZE)  # compresses well
    delta = DeltaSnapshot.create(AGENT, old, new, base_sequence=4, sequence=5)
    assert delta.agent_id == AGENT
    assert (delta.base_sequence, delta.sequence, delta.total_size) == (4, 5, len(new))
    assert [p.index for p in delta.dirty_pages] == [1, 3, 5]
    assert [p.get_data() for p in delta.dirty_pages] == [
        bytes(new[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) for i in (1, 3, 5)
    ]
    assert [p.compressed for p in delta.dirty_pages] == [False, True, False]
    assert delta.checksum == simple_checksum(new)
    assert delta.digest_algorithm == "xxh3_128_tree" and delta.digest == digest(new) and not delta.keyed
    assert isinstance(delta.timestamp, int) and delta.timestamp > 1_600_000_000


def test_create_digest_options() -> None:
    old, new = bytes(9000), b"\x01" + bytes(8999)
    plain = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=None)
    assert (plain.digest_algorithm, plain.digest, plain.keyed) == (None, None, False)
    b3 = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest="blake3")
    assert (b3.digest_algorithm, b3.digest, b3.keyed) == ("blake3", digest(new, "blake3"), False)
    keyed = DeltaSnapshot.create(AGENT, old, new, 0, 1, key=KEY)
    assert (keyed.digest_algorithm, keyed.digest, keyed.keyed) == ("blake3", digest(new, "blake3", key=KEY), True)
    with pytest.raises(ValueError, match="unknown digest"):
        DeltaSnapshot.create(AGENT, old, new, 0, 1, digest="md5")
    with pytest.raises(ValueError, match="32 bytes"):
        DeltaSnapshot.create(AGENT, old, new, 0, 1, key=b"short")
    with pytest.raises(ValueError, match="digest=None"):
        DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=None, key=KEY)


def test_create_rejects_different_lengths_and_bad_inputs() -> None:
    with pytest.raises(InvalidStateError, match="size mismatch"):
        DeltaSnapshot.create(AGENT, bytes(10), bytes(11), 0, 1)
    with pytest.raises(TypeError, match="old_state"):
        DeltaSnapshot.create(AGENT, "text", "text", 0, 1)
    with pytest.raises(ValueError, match="16 bytes"):
        DeltaSnapshot.create(b"short", bytes(10), bytes(10), 0, 1)
    strided = np.zeros(64, dtype=np.uint8)[::2]
    with pytest.raises(ValueError, match="contiguous"):
        DeltaSnapshot.create(AGENT, strided, strided, 0, 1)


def test_create_accepts_every_buffer_kind_in_place() -> None:
    rng = random.Random(2)
    old = bytes(rng.randrange(256) for _ in range(4 * PAGE_SIZE))
    new = mutate(old, rng, 2)
    expected = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    m_old = mmap.mmap(-1, len(old))
    m_old.write(old)
    for a, b in [
        (bytearray(old), memoryview(new)),
        (np.frombuffer(old, dtype=np.uint32), np.frombuffer(new, dtype=np.uint8)),
        (m_old, bytearray(new)),
    ]:
        got = DeltaSnapshot.create(AGENT, a, b, 0, 1)
        assert got.dirty_pages == expected.dirty_pages and got.checksum == expected.checksum
        assert got.digest == expected.digest
    m_old.close()


def test_create_with_uuid_agent_id_and_identical_states() -> None:
    import uuid

    u = uuid.UUID(bytes=AGENT)
    delta = DeltaSnapshot.create(u, bytes(100), bytes(100), 1, 2)
    assert delta.agent_id == AGENT and delta.dirty_pages == [] and delta.checksum == 0
    empty = DeltaSnapshot.create(AGENT, b"", b"", 0, 1)
    assert empty.total_size == 0 and empty.dirty_pages == []
    target = bytearray()
    empty.apply(target)
    assert target == b""


def test_sizes_and_ratio() -> None:
    none = DeltaSnapshot.create(AGENT, bytes(PAGE_SIZE), bytes(PAGE_SIZE), 0, 1)
    assert (none.dirty_page_count(), none.compressed_size(), none.uncompressed_size()) == (0, 0, 0)
    assert none.compression_ratio() == 1.0
    old = bytes(3 * PAGE_SIZE)
    new = b"\x01" + bytes(PAGE_SIZE - 1) + os.urandom(PAGE_SIZE).replace(b"\xff", b"\x01") + bytes(PAGE_SIZE)
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    stored = [len(p.data) for p in delta.dirty_pages]
    assert delta.dirty_page_count() == 2
    assert delta.compressed_size() == sum(stored)
    assert delta.uncompressed_size() == 2 * PAGE_SIZE
    assert delta.compression_ratio() == pytest.approx(sum(stored) / (2 * PAGE_SIZE))


def test_constructor_validation_and_repr() -> None:
    fields: dict[str, Any] = dict(
        agent_id=AGENT, sequence=2, base_sequence=1, dirty_pages=[], total_size=0, timestamp=5, checksum=0
    )
    d = DeltaSnapshot(**fields)
    assert (d.digest_algorithm, d.digest, d.keyed) == (None, None, False)
    assert d == DeltaSnapshot(**fields)
    assert "sequence=2" in repr(d) and "dirty_pages=<0 pages>" in repr(d)
    with pytest.raises(ValueError, match="together"):
        DeltaSnapshot(**fields, digest_algorithm="xxh3_128")
    with pytest.raises(ValueError, match="keyed"):
        DeltaSnapshot(**fields, digest_algorithm="xxh3_128", digest=bytes(16), keyed=True)
    with pytest.raises(ValueError, match="checksum"):
        DeltaSnapshot(**{**fields, "checksum": 1 << 32})
    with pytest.raises(ValueError, match="sequence"):
        DeltaSnapshot(**{**fields, "sequence": -1})


# --- apply round trips -------------------------------------------------------------------


@st.composite
def state_pairs(draw: Any) -> Tuple[bytes, bytes]:
    size = draw(st.integers(0, 6 * PAGE_SIZE + 50))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    sparse = draw(st.booleans())
    if sparse:
        base = bytearray(size)
        for _ in range(draw(st.integers(0, 20))):
            if size:
                base[rng.randrange(size)] = rng.randrange(256)
    else:
        base = bytearray(rng.randbytes(size))
    new = bytearray(base)
    for _ in range(draw(st.integers(0, 30))):
        if size:
            start = rng.randrange(size)
            run = rng.randint(1, 300)
            new[start : start + run] = bytes([rng.randrange(256)]) * len(new[start : start + run])
    return bytes(base), bytes(new)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state_pairs(), st.sampled_from([None, "xxh3_128", "blake3", "keyed"]))
def test_round_trip(pair: Tuple[bytes, bytes], mode: Any) -> None:
    old, new = pair
    key = KEY if mode == "keyed" else None
    algorithm = None if mode in (None, "keyed") else mode
    if mode == "keyed":
        algorithm = "blake3"
    delta = DeltaSnapshot.create(AGENT, old, new, 3, 4, digest=algorithm, key=key)
    assert [p.index for p in delta.dirty_pages] == dirty_pages(old, new).tolist()
    assert delta.checksum == simple_checksum(new)
    for page in delta.dirty_pages:
        raw = new[page.index * PAGE_SIZE : (page.index + 1) * PAGE_SIZE]
        assert page.get_data() == raw
        assert page.compressed == (len(simple_compress(raw)) < len(raw))
    target = bytearray(old)
    delta.apply(target, key=key)
    assert target == new


@settings(max_examples=60, deadline=None)
@given(state_pairs(), st.integers(0, 6 * PAGE_SIZE + 50))
def test_short_bytearray_grows_with_zeros(pair: Tuple[bytes, bytes], cut: int) -> None:
    old, new = pair
    cut = min(cut, len(old))
    # The sender's base had zeros past ``cut``; the receiver holds only the prefix.
    sender_old = old[:cut] + bytes(len(old) - cut)
    delta = DeltaSnapshot.create(AGENT, sender_old, new, 0, 1)
    target = bytearray(old[:cut])
    delta.apply(target)
    assert target == new


def test_apply_on_every_writable_kind() -> None:
    rng = random.Random(3)
    old = rng.randbytes(5 * PAGE_SIZE + 100)
    new = mutate(old, rng, 3)
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    m = mmap.mmap(-1, len(old))
    m.write(old)
    targets: List[Any] = [
        bytearray(old),
        memoryview(bytearray(old)),
        np.frombuffer(bytearray(old), dtype=np.uint8),
        np.frombuffer(bytearray(old), dtype=np.uint32),
        m,
    ]
    for target in targets:
        delta.apply(target)
        assert bytes(memoryview(target).cast("B")) == new
    m.close()


def test_apply_read_only_base_is_type_error() -> None:
    delta = DeltaSnapshot.create(AGENT, bytes(100), b"\x01" + bytes(99), 0, 1)
    frozen = np.zeros(100, dtype=np.uint8)
    frozen.flags.writeable = False
    for base in (bytes(100), memoryview(bytes(100)), frozen):
        with pytest.raises(TypeError, match="writable"):
            delta.apply(base)


def test_apply_uses_current_page_data() -> None:
    old = bytes(2 * PAGE_SIZE)
    new = b"\x07" * 10 + bytes(2 * PAGE_SIZE - 10)
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=None)
    # Decompressing in place changes the stored form, not the content: still applies.
    delta.dirty_pages[0].decompress()
    target = bytearray(old)
    delta.apply(target)
    assert target == new
    # Replacing the data is seen by apply (no hidden cached copy): the checksum refuses it.
    delta.dirty_pages[0].data = b"\x08" * PAGE_SIZE
    target = bytearray(old)
    with pytest.raises(InvalidStateError, match="checksum"):
        delta.apply(target)
    assert target == old


def test_chain_of_deltas() -> None:
    rng = random.Random(4)
    states = [rng.randbytes(8 * PAGE_SIZE)]
    for _ in range(5):
        states.append(mutate(states[-1], rng, 2))
    deltas = [DeltaSnapshot.create(AGENT, a, b, i, i + 1) for i, (a, b) in enumerate(zip(states, states[1:]))]
    target = bytearray(states[0])
    for delta in deltas:
        delta.apply(target)
    assert target == states[-1]


def test_progress_callback_reaches_total() -> None:
    old = bytes(3 << 20)
    new = bytearray(old)
    new[2 << 20] = 1
    seen: List[Tuple[int, int]] = []
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, progress=lambda done, total: seen.append((done, total)))
    assert seen and seen[-1] == (len(new), len(new))
    assert all(a <= b for (a, _), (b, _) in zip(seen, seen[1:]))
    seen.clear()
    target = bytearray(old)
    delta.apply(target, progress=lambda done, total: seen.append((done, total)))
    assert target == new and seen[-1] == (len(new), len(new))


def test_threaded_create_and_apply_match_serial() -> None:
    # 24 MiB is over the threading threshold: exercises the split scan and the digest thread.
    size = 24 << 20
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    pages = rng.choice(size // PAGE_SIZE, 60, replace=False)
    new[pages * PAGE_SIZE + 17] ^= 0x5A
    seen: List[int] = []
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, progress=lambda done, total: seen.append(done))
    assert [p.index for p in delta.dirty_pages] == sorted(pages.tolist())
    assert delta.checksum == simple_checksum(new) and delta.digest == digest(new)
    assert seen[-1] == size
    plain = DeltaSnapshot.create(AGENT, old, new, 0, 1, digest=None)
    assert plain.dirty_pages == delta.dirty_pages and plain.checksum == delta.checksum
    keyed = DeltaSnapshot.create(AGENT, old, new, 0, 1, key=bytes(32))
    assert keyed.digest == digest(new, "blake3", key=bytes(32))
    for d, key in ((delta, None), (plain, None), (keyed, bytes(32))):
        target = old.copy()
        d.apply(target, key=key)
        assert np.array_equal(target, new)
    bad = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    bad.dirty_pages[-1].data = bad.dirty_pages[-1].get_data()[:-1] + b"\x00"
    target = old.copy()
    with pytest.raises(InvalidStateError):
        bad.apply(target)
    assert np.array_equal(target, old)


def test_threaded_growth_of_a_short_bytearray() -> None:
    size = 20 << 20
    new = bytearray(size)
    new[5] = 1
    new[size - 3] = 2
    new[12 << 20] = 3
    delta = DeltaSnapshot.create(AGENT, bytes(size), new, 0, 1)
    target = bytearray(4096)
    delta.apply(target)
    assert target == new


# --- wire --------------------------------------------------------------------------------


def test_serialize_round_trip() -> None:
    rng = random.Random(6)
    old = rng.randbytes(4 * PAGE_SIZE + 7)
    new = mutate(old, rng, 3)
    cases: List[dict[str, Any]] = [{}, {"digest": None}, {"key": KEY}]
    for kwargs in cases:
        delta = DeltaSnapshot.create(AGENT, old, new, 7, 8, **kwargs)
        blob = delta.serialize()
        assert isinstance(blob, bytes)
        back = DeltaSnapshot.deserialize(blob)
        assert back == delta
        target = bytearray(old)
        back.apply(target, key=kwargs.get("key"))
        assert target == new


def test_deserialize_rejects_garbage() -> None:
    delta = DeltaSnapshot.create(AGENT, bytes(PAGE_SIZE), b"\x01" + bytes(PAGE_SIZE - 1), 0, 1)
    blob = bytearray(delta.serialize())
    blob[len(blob) // 2] ^= 0xFF
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(bytes(blob))
    with pytest.raises(CorruptDataError):
        DeltaSnapshot.deserialize(b"not a delta")


def test_exported_from_package() -> None:
    for name in ("DirtyPage", "DeltaSnapshot"):
        assert getattr(cellmigrate, name) is globals()[name]
        assert name in cellmigrate.__all__


@pytest.mark.large
def test_one_gib_round_trip() -> None:
    size = 1 << 30
    rng = np.random.default_rng(7)
    old = np.zeros(size, dtype=np.uint8)
    old[:: 4096 * 7] = 3
    new = old.copy()
    pages = rng.choice(size // PAGE_SIZE, size // PAGE_SIZE // 100, replace=False)
    new[pages * PAGE_SIZE + 100] = 9
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    assert delta.dirty_page_count() == len(pages)
    delta.apply(old)
    assert np.array_equal(old, new)


@pytest.mark.parametrize("threads", [1, 2])
def test_paired_and_single_paths_agree(monkeypatch: pytest.MonkeyPatch, threads: int) -> None:
    # Force each strategy regardless of this machine's CPU count: the results must not
    # depend on how the work is split.
    import cellmigrate._passes as delta_module

    monkeypatch.setattr(delta_module, "max_threads", lambda: threads)
    monkeypatch.setattr(delta_module, "_HELP_CHUNK", 1 << 20)
    monkeypatch.setattr(delta_module, "_HELP_WINDOW", 2)
    size = (17 << 20) + 1234  # over the threading threshold, with a short last page
    rng = np.random.default_rng(threads)
    old = rng.integers(0, 256, size, dtype=np.uint8)
    new = old.copy()
    pages = rng.choice(-(-size // PAGE_SIZE), 40, replace=False)
    new[np.minimum(pages * PAGE_SIZE + 5, size - 1)] ^= 0x11
    for kwargs in ({}, {"digest": None}, {"digest": "blake3"}, {"key": bytes(32)}):
        delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, **kwargs)
        assert [p.index for p in delta.dirty_pages] == dirty_pages(old, new).tolist()
        assert delta.checksum == simple_checksum(new)
        if delta.digest_algorithm is not None:
            assert delta.digest == digest(new, delta.digest_algorithm, key=kwargs.get("key"))  # type: ignore[arg-type]
        target = old.copy()
        delta.apply(target, key=kwargs.get("key"))  # type: ignore[arg-type]
        assert np.array_equal(target, new)
    short = bytearray(old[: 3 << 20].tobytes())
    grown = DeltaSnapshot.create(AGENT, np.concatenate([old[: 3 << 20], np.zeros(size - (3 << 20), np.uint8)]), new, 0, 1)
    grown.apply(short)
    assert short == new.tobytes()


def test_failing_progress_callback_leaves_base_unchanged_and_does_not_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    import cellmigrate._passes as delta_module

    monkeypatch.setattr(delta_module, "max_threads", lambda: 2)
    size = 20 << 20
    old = np.zeros(size, dtype=np.uint8)
    new = old.copy()
    new[::PAGE_SIZE * 50] = 1
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1)

    def boom(done: int, total: int) -> None:
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        DeltaSnapshot.create(AGENT, old, new, 0, 1, progress=boom)
    with pytest.raises(RuntimeError, match="stop"):
        delta.apply(old, progress=boom)
    assert not old.any()
    delta.apply(old)
    assert np.array_equal(old, new)


def test_dirty_page_of_any_length_round_trips() -> None:
    # A hand-built page may hold more than 4096 bytes; get_data is bounded only on request.
    page = DirtyPage(0, bytes(10_000))
    page.compress()
    assert page.compressed and page.get_data() == bytes(10_000)
    with pytest.raises(CorruptDataError, match="max_output"):
        page.get_data(max_output=PAGE_SIZE)
    page.decompress()
    assert page.data == bytes(10_000) and not page.compressed


_CONCURRENT = """
import threading
import numpy as np
import cellmigrate._passes as delta_module
from cellmigrate import PAGE_SIZE, DeltaSnapshot

delta_module.max_threads = lambda: 2  # paired hashing even on a 1-CPU runner
size = 17 << 20
old = np.zeros(size, dtype=np.uint8)
new = old.copy()
new[:: PAGE_SIZE * 97] = 3
deltas = [DeltaSnapshot.create(bytes(16), old, new, 0, 1, digest=d) for d in ("xxh3_128_tree", "xxh3_128", "blake3", None)]
errors = []
def worker(k):
    try:
        for _ in range(3):
            target = old.copy()
            deltas[k % 4].apply(target)
            assert np.array_equal(target, new)
            again = DeltaSnapshot.create(bytes(16), old, new, 0, 1)
            assert again.dirty_pages == deltas[0].dirty_pages and again.digest == deltas[0].digest
    except BaseException as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
assert not errors, errors
print("ok")
"""


def test_concurrent_paired_operations_share_the_pool() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _CONCURRENT], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_progress_event_callbacks() -> None:
    from cellmigrate import CollectingCallback, MigrationProgressEvent, ProgressEventKind

    size = 40 << 20  # several report chunks, threaded paths included
    old = np.zeros(size, dtype=np.uint8)
    new = old.copy()
    new[:: PAGE_SIZE * 300] = 1
    created = CollectingCallback()
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, progress=created)
    kinds = {e.kind for e in created.events}
    assert kinds == {ProgressEventKind.CAPTURING_STATE}
    percents = [e.progress_percent() for e in created.events]
    assert None not in percents
    assert percents == sorted(p or 0 for p in percents) and percents[-1] == 100 and len(percents) == len(set(percents))
    assert all(e.agent_id == AGENT for e in created.events)

    applied = CollectingCallback()
    bad = DeltaSnapshot.create(AGENT, old, new, 0, 1)
    bad.checksum ^= 1
    target = old.copy()
    with pytest.raises(InvalidStateError):
        bad.apply(target, progress=applied)
    assert applied.events and max(e.progress_percent() or 0 for e in applied.events) < 100  # not finished
    applied.clear()
    delta.apply(target, progress=applied)
    assert all(isinstance(e, MigrationProgressEvent) and e.kind is ProgressEventKind.RESTORING for e in applied.events)
    percents = [e.progress_percent() for e in applied.events]
    assert None not in percents
    assert percents == sorted(p or 0 for p in percents) and percents[-1] == 100
    assert np.array_equal(target, new)


def test_progress_forms_are_told_apart() -> None:
    from cellmigrate._passes import takes_done_total as _takes_done_total

    def two(done: int, total: int) -> None: ...
    def two_and_default(done: int, total: int, extra: int = 0) -> None: ...
    def one(event: object) -> None: ...
    def star(*args: object) -> None: ...

    assert _takes_done_total(two) and _takes_done_total(two_and_default)
    assert _takes_done_total(lambda a, b: None)
    assert not _takes_done_total(one) and not _takes_done_total(star) and not _takes_done_total(print)
    with pytest.raises(TypeError, match="callable"):
        DeltaSnapshot.create(AGENT, b"", b"", 0, 1, progress=5)  # type: ignore[arg-type]


def test_span_reporters_sum_all_threads_work_on_the_calling_thread() -> None:
    """Spans on several threads: every span records its bytes, only the first span (run by
    the calling thread) calls back, with the sum, so a bar tracks all threads' work."""
    from cellmigrate._passes import span_reporters as _span_reporters

    seen: List[Tuple[int, int]] = []
    spans = [(0, 100), (100, 200), (200, 250)]
    reports = _span_reporters(lambda done, total: seen.append((done, total)), spans)
    reports[100](160, 250)  # another thread: recorded, no callback from it
    reports[200](250, 250)
    assert seen == []
    reports[0](40, 250)
    assert seen == [(40 + 60 + 50, 250)]
    reports[0](100, 250)
    assert seen[-1] == (100 + 60 + 50, 250)
    # One span, or no callback: passed through untouched.
    only = [(0, 10)]
    cb = lambda done, total: None  # noqa: E731
    assert _span_reporters(cb, only) == {0: cb}
    assert _span_reporters(None, spans) == {0: None, 100: None, 200: None}


_PROGRESS_THREADS = """
import numpy as np
import cellmigrate._passes as delta_module
from cellmigrate import DeltaSnapshot
delta_module.max_threads = lambda: 2
size = 40 << 20
old = np.zeros(size, np.uint8); new = old.copy(); new[::4096 * 7] = 1
for digest in (None, "xxh3_128_tree", "xxh3_128"):
    seen = []
    d = DeltaSnapshot.create(bytes(16), old, new, 0, 1, digest=digest, progress=lambda a, b: seen.append((a, b)))
    assert seen[-1] == (size, size) and all(t == size for _, t in seen), seen[-3:]
    assert [a for a, _ in seen] == sorted(a for a, _ in seen), digest
    applied = []
    d.apply(old.copy(), progress=lambda a, b: applied.append((a, b)))
    assert applied[-1] == (size, size) and [a for a, _ in applied] == sorted(a for a, _ in applied), digest
    assert all(a < size for a, _ in applied[:-1]), digest  # 100% only once the pages are written
print("ok")
"""


def test_progress_on_threads_is_monotonic_and_complete() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _PROGRESS_THREADS], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_first_delta_from_none_is_against_zeros() -> None:
    """``old_state=None`` (documented now; the tracker's first delta) stands for zeros of
    the new length: only the non-zero pages travel, and the delta applies to zeros."""
    new = bytearray(5 * PAGE_SIZE + 7)
    new[PAGE_SIZE + 3] = 1
    new[-1] = 2
    delta = DeltaSnapshot.create(bytes(16), None, new, 0, 1)
    assert [p.index for p in delta.dirty_pages] == [1, 5]
    base = bytearray(len(new))
    delta.apply(base)
    assert base == new
    explicit = DeltaSnapshot.create(bytes(16), bytes(len(new)), new, 0, 1)
    assert [(p.index, bytes(p.data)) for p in delta.dirty_pages] == [(p.index, bytes(p.data)) for p in explicit.dirty_pages]
    assert (delta.checksum, delta.digest) == (explicit.checksum, explicit.digest)
