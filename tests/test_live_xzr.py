"""Live migration streams the delta page encodings (issue 12 §5): XZR pages over the
sender's page cache (QEMU's XBZRLE cache), in PAGES chunks of protocol version 3.

Checked here: the cache (first in, first out, bounded, whole pages only); a PAGES chunk
decodes to its pages over the receiver's copies (hypothesis) and nothing but
``CorruptDataError`` comes of any other bytes; the protocol's bounds and versions; a
receiver whose pages are not the sender's cached ones refuses the chunk unchanged; and
whole migrations, in process and over a socket, recorded and mutated.
"""

from __future__ import annotations

import socket
import threading
import uuid
from typing import Any, List, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import CellError, CorruptDataError
from cellmigrate.live import (
    BufferSource,
    BufferTarget,
    InProcessChannel,
    LiveMigration,
    MemoryStore,
    ProtocolError,
    ReceiverSession,
)
from cellmigrate.live.page_cache import PageCache
from cellmigrate.live.pages import Chunk, Encoding, base_pages, decode_pages, encode_pages, pages_digest, pages_len
from cellmigrate.live.protocol import check_payload_len, decode_chunk_head, encode_chunk_header
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.replay import BytesStream, record_sender_stream
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.transport import SocketStream

from kernel_strategies import edit_page
from test_live_inplace import CutStream

PAGE = 4096
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _pages(state: np.ndarray, indices: np.ndarray) -> np.ndarray:
    return np.concatenate([state[i * PAGE : (i + 1) * PAGE] for i in indices.tolist()]) if len(indices) else state[:0]


# -- the cache ------------------------------------------------------------------------------


def test_cache_keeps_whole_pages_first_in_first_out() -> None:
    cache = PageCache(3 * PAGE)
    state = np.arange(10 * PAGE + 7, dtype=np.uint64).astype(np.uint8)
    idx = np.array([1, 4], dtype=np.int64)
    cache.store(idx, _pages(state, idx), state.nbytes)
    asked = np.array([0, 1, 4, 99], dtype=np.int64)
    assert cache.hits(asked).tolist() == [False, True, True, False]
    def cached(page: int) -> bytes:
        slot = int(cache.slots(np.array([page], dtype=np.int64))[0])
        assert slot >= 0
        return bytes(cache.data[slot * PAGE : (slot + 1) * PAGE])

    assert cached(1) == bytes(state[PAGE : 2 * PAGE]) and cached(4) == bytes(state[4 * PAGE : 5 * PAGE])
    changed = state.copy()
    changed[PAGE] ^= 1
    cache.store(np.array([1], dtype=np.int64), changed[PAGE : 2 * PAGE], state.nbytes)  # updated in place
    assert len(cache) == 2 and cached(1) == bytes(changed[PAGE : 2 * PAGE])
    more = np.array([6, 7, 10], dtype=np.int64)  # 10 is the short last page: never kept
    cache.store(more, _pages(state, more), state.nbytes)
    assert cache.hits(np.array([1, 4, 6, 7, 10], dtype=np.int64)).tolist() == [False, True, True, True, False]
    big = np.arange(0, 10, dtype=np.int64)  # 7 new pages for 3 slots: the last three new ones stay
    cache.store(big, _pages(state, big), state.nbytes)
    assert np.flatnonzero(cache.hits(big)).tolist() == [5, 8, 9]
    cache.clear()
    assert len(cache) == 0 and not cache.hits(big).any()
    none = PageCache(0)
    none.store(idx, _pages(state, idx), state.nbytes)
    assert len(none) == 0
    with pytest.raises(ValueError):
        PageCache(-1)
    with pytest.raises(TypeError):
        PageCache(4096.0)  # type: ignore[arg-type]


def test_the_cache_reserves_no_more_than_the_state_and_only_when_used() -> None:
    big = PageCache(1 << 30)
    assert big.capacity == 0 and big.data.nbytes == 0  # nothing reserved before pages come
    state = np.ones(5 * PAGE + 10, dtype=np.uint8)
    idx = np.array([0, 2], dtype=np.int64)
    big.store(idx, _pages(state, idx), state.nbytes)
    assert big.capacity == 5 and big.data.nbytes == 5 * PAGE  # the state's whole pages, not 1 GiB
    big.clear()
    assert big.capacity == 0 and big.data.nbytes == 0 and not big.hits(idx).any()


# -- encoding and decoding ----------------------------------------------------------------------


@SETTINGS
@given(st.data())
def test_pages_chunks_decode_over_the_receivers_pages(data: st.DataObject) -> None:
    """Whatever the chunk (short last page included) and whichever pages are cached, the
    encoded chunk decodes to its pages over the receiver's copies, which are the cached
    ones; the smallest form is chosen."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    npages = data.draw(st.integers(1, 24))
    size = npages * PAGE - data.draw(st.integers(0, PAGE - 1))
    old = rng.integers(0, 256, size, dtype=np.uint8) if data.draw(st.booleans()) else np.zeros(size, dtype=np.uint8)
    new = old.copy()
    chosen = sorted(set(data.draw(st.lists(st.integers(0, npages - 1), min_size=1, max_size=npages))))
    idx = np.array(chosen, dtype=np.int64)
    for page in chosen:
        edit_page(data.draw, rng, new, page * PAGE, min(size, (page + 1) * PAGE), ("edit", "rewrite", "zero", "none"))
    cache = PageCache(64 * PAGE)
    cached = np.array(sorted(set(data.draw(st.lists(st.sampled_from(chosen), max_size=len(chosen))))), dtype=np.int64)
    if len(cached):
        cache.store(cached, _pages(old, cached), size)
    pages = _pages(new, idx)
    assert pages.nbytes == pages_len(idx, size)
    encoding, payload = encode_pages(pages, True, indices=idx, cache=cache)
    assert len(payload) <= pages.nbytes
    receiver = old.copy()  # the receiver holds old's pages (the cached ones among them)
    base = base_pages(receiver, idx, payload) if encoding == Encoding.PAGES else None
    got = decode_pages(encoding, payload, pages.nbytes, base=base)
    assert bytes(got) == pages.tobytes()
    if encoding == Encoding.PAGES:
        assert cache.hits(idx).any()


def test_a_page_with_64_changed_bytes_costs_about_70_bytes() -> None:
    rng = np.random.default_rng(3)
    old = rng.integers(0, 256, 64 * PAGE, dtype=np.uint8)
    idx = np.arange(0, 64, 2, dtype=np.int64)
    cache = PageCache()
    cache.store(idx, _pages(old, idx), old.nbytes)
    new = old.copy()
    for page in idx.tolist():
        new[page * PAGE + 100 : page * PAGE + 164] = rng.integers(0, 256, 64, dtype=np.uint8)
    encoding, payload = encode_pages(_pages(new, idx), True, indices=idx, cache=cache)
    assert encoding == Encoding.PAGES
    assert len(payload) <= 80 * len(idx)  # against 4096 raw (random bytes: LZ4 cannot help)
    assert encode_pages(_pages(new, idx), True, indices=idx, cache=None)[0] == Encoding.RAW


@SETTINGS
@given(st.binary(max_size=3000), st.integers(1, 3 * PAGE))
def test_pages_decoder_refuses_garbage_with_corrupt_data_errors_only(blob: bytes, raw_len: int) -> None:
    base = np.zeros(-(-raw_len // PAGE) * PAGE, dtype=np.uint8)
    try:
        got = decode_pages(Encoding.PAGES, blob, raw_len, base=base)
    except CorruptDataError:
        return
    assert len(got) == raw_len


def test_pages_decoder_on_mutated_payloads() -> None:
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, 8 * PAGE, dtype=np.uint8)
    idx = np.arange(8, dtype=np.int64)
    cache = PageCache()
    cache.store(idx, old, old.nbytes)
    new = old.copy()
    new[::97] ^= 0x11
    encoding, payload = encode_pages(new, True, indices=idx, cache=cache)
    assert encoding == Encoding.PAGES
    for trial in range(300):
        blob = bytearray(payload)
        pos = int(rng.integers(0, len(blob)))
        if trial % 3 == 0:
            blob[pos] ^= int(rng.integers(1, 256))
        elif trial % 3 == 1:
            del blob[pos:]
        else:
            blob[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
        try:
            got = decode_pages(Encoding.PAGES, bytes(blob), new.nbytes, base=old)
        except CorruptDataError:
            continue
        assert len(got) == new.nbytes  # decodable damage is the digest's to catch


def test_base_pages_takes_the_xzr_pages_only_with_zeros_past_the_end() -> None:
    state = np.arange(2 * PAGE + 100, dtype=np.uint64).astype(np.uint8) | 1  # no zero byte
    idx = np.array([0, 1, 2, 5], dtype=np.int64)
    table = bytes([3, 0, 3, 3]) + bytes(16)  # XZR, raw, XZR (the short last page), XZR (past the end)
    base = base_pages(state, idx, table).reshape(4, PAGE)
    assert bytes(base[0]) == bytes(state[:PAGE])
    assert bytes(base[2, :100]) == bytes(state[2 * PAGE :]) and not base[2, 100:].any()
    assert not base[3].any()
    assert base_pages(state, idx, b"\3").shape == (4 * PAGE,)  # a table cut short: the decoder refuses it


# -- protocol and receiver ---------------------------------------------------------------------


def test_protocol_carries_pages_chunks_from_version_3() -> None:
    idx = np.array([2, 3], dtype=np.int64)
    chunk = Chunk(1, 1, 8 * PAGE, idx, Encoding.PAGES, b"x" * 10, 2 * PAGE, bytes(16))
    head = decode_chunk_head(memoryview(encode_chunk_header(chunk)))
    assert head.encoding == Encoding.PAGES
    check_payload_len(head, 10, 3)
    with pytest.raises(ProtocolError, match="version 2"):
        check_payload_len(head, 10, 2)
    with pytest.raises(ProtocolError, match="table"):
        check_payload_len(head, 9, 3)


def test_a_receiver_whose_pages_differ_refuses_the_chunk_unchanged() -> None:
    """XZR pages decoded over pages that are not the ones the sender cached give other
    bytes: the chunk's digest fails and nothing is staged."""
    rng = np.random.default_rng(8)
    state = rng.integers(0, 256, 4 * PAGE, dtype=np.uint8)
    session = ReceiverSession(MemoryStore(), BufferTarget())
    from cellmigrate.live.session import Offer
    from cellmigrate.validation import AgentRequirements

    session.begin(Offer(bytes(16), bytes(16), AgentRequirements(), state.nbytes))
    idx = np.arange(4, dtype=np.int64)
    first = Chunk(1, 0, state.nbytes, idx, Encoding.RAW, state.tobytes(), state.nbytes, pages_digest(state))
    assert session.apply_chunk(first)
    cache = PageCache()
    sent_base = state.copy()
    sent_base[PAGE + 5] ^= 1  # the sender believes page 1 holds this
    cache.store(idx, sent_base, state.nbytes)
    new = state.copy()
    new[PAGE + 100] ^= 0xFF
    encoding, payload = encode_pages(new, True, indices=idx, cache=cache)
    assert encoding == Encoding.PAGES
    bad = Chunk(2, 1, state.nbytes, idx, encoding, payload, new.nbytes, pages_digest(new))
    with pytest.raises(CorruptDataError, match="digest"):
        session.apply_chunk(bad)
    assert bytes(session.store.view()) == state.tobytes()
    cache.store(idx, state, state.nbytes)  # the right base: accepted
    encoding, payload = encode_pages(new, True, indices=idx, cache=cache)
    assert session.apply_chunk(Chunk(2, 1, state.nbytes, idx, encoding, payload, new.nbytes, pages_digest(new)))
    assert bytes(session.store.view()) == new.tobytes()


# -- whole migrations ---------------------------------------------------------------------------


class HotPages:
    """An agent rewriting 64 bytes of the same 300 pages between rounds (a hot heap)."""

    def __init__(self, state: np.ndarray, rounds: int) -> None:
        self.state = state
        self.rng = np.random.default_rng(2)
        self.hot = np.sort(self.rng.choice(state.nbytes // PAGE, 300, replace=False))
        self.left = rounds

    def __call__(self, stats: Any) -> None:
        if self.left <= 0:
            return
        self.left -= 1
        for page in self.hot.tolist():
            at = page * PAGE + int(self.rng.integers(0, PAGE - 64))
            self.state[at : at + 64] = self.rng.integers(0, 256, 64, dtype=np.uint8)


def _recorded(channel: Any) -> List[Chunk]:
    """The chunks ``channel`` is given to send, in order (its ``send_chunk`` wrapped)."""
    chunks: List[Chunk] = []
    send = channel.send_chunk

    def record(chunk: Chunk) -> None:
        chunks.append(chunk)
        send(chunk)

    channel.send_chunk = record
    return chunks


def _migrate(page_cache_bytes: int) -> Any:
    state = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8)
    target = BufferTarget()
    channel = InProcessChannel(ReceiverSession(MemoryStore(), target))
    chunks = _recorded(channel)
    summary = LiveMigration(
        BufferSource(state), channel, on_round=HotPages(state, 3), max_rounds=3, downtime_limit=1e-9,
        page_cache_bytes=page_cache_bytes,
    ).run()
    assert target.state is not None and bytes(target.state) == state.tobytes()
    return summary, chunks


def test_hot_pages_travel_as_xzr_pages_after_their_first_resend() -> None:
    summary, chunks = _migrate(64 << 20)
    plain, plain_chunks = _migrate(0)
    assert [r.dirty_pages for r in summary.rounds] == [2048, 300, 300, 300]
    assert all(c.encoding != Encoding.PAGES for c in plain_chunks)
    by_round = {r: [c.encoding for c in chunks if c.round == r] for r in range(4)}
    assert Encoding.PAGES not in by_round[0] + by_round[1]  # nothing cached before round 1 sent it
    assert by_round[2] == by_round[3] == [Encoding.PAGES]
    # 300 random 4 KiB pages (1.2 MB) a round, against about 80 bytes each as XZR pages.
    for ours, theirs in zip(summary.rounds[2:], plain.rounds[2:]):
        assert ours.wire_bytes <= 300 * 90 and theirs.wire_bytes >= 300 * PAGE


def test_xzr_chunks_over_a_socket_and_their_recorded_stream() -> None:
    """A real protocol stream with PAGES chunks: the receiver ends byte-equal; the same
    bytes replayed into a fresh receiver complete, and mutated, end in a CellError only."""
    state = bytearray(np.random.default_rng(6).integers(0, 256, 64 * PAGE, dtype=np.uint8).tobytes())
    hot = [3, 9, 10, 40]

    def touch(stats: Any, left: List[int] = [2]) -> None:
        if left[0]:
            left[0] -= 1
            for page in hot:
                state[page * PAGE + 7 * left[0] + 1] ^= 0x5A

    recorded = record_sender_stream(state, chunk_bytes=8 * PAGE, max_rounds=3, on_round=touch)
    head_at = 4 + 1  # u32 length, u8 type, then the HELLO body
    assert recorded[head_at : head_at + 4] == b"CMLV"
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=5)
    assert receiver.handle(BytesStream(recorded))
    assert target.state is not None and bytes(target.state) == bytes(state)
    assert b"CMLV\x04\x00" in recorded[:16]
    rng = np.random.default_rng(0)
    for _ in range(60):
        blob = bytearray(recorded)
        pos = int(rng.integers(40, len(blob)))
        blob[pos] ^= int(rng.integers(1, 256))
        mutated = BufferTarget()
        rx = LiveReceiver(MemoryStore(), mutated, timeout=1)
        if not rx.handle(BytesStream(bytes(blob))):
            assert rx.last_error is None or isinstance(rx.last_error, CellError)
            assert mutated.state is None


def test_receiver_still_serves_version_2_senders() -> None:
    """A version-2 sender (which never sends PAGES chunks) is served at its version; an
    older one is refused."""
    state = np.random.default_rng(2).integers(0, 256, 3 * PAGE, dtype=np.uint8).tobytes()
    recorded = bytearray(record_sender_stream(state, version=3))  # version 2's digests are 3's
    at = 4 + 1 + 4  # the HELLO body's u16 version, after the frame head and the magic
    assert recorded[at : at + 2] == (3).to_bytes(2, "little")
    recorded[at : at + 2] = (2).to_bytes(2, "little")
    target = BufferTarget()
    rx = LiveReceiver(MemoryStore(), target, timeout=5)
    stream = BytesStream(bytes(recorded))
    assert rx.handle(stream)
    assert target.state is not None and bytes(target.state) == state
    assert stream.written[4] == 2 and stream.written[5:7] == (2).to_bytes(2, "little")  # CHALLENGE at version 2
    recorded[at : at + 2] = (1).to_bytes(2, "little")
    rx = LiveReceiver(MemoryStore(), BufferTarget(), timeout=5)
    assert not rx.handle(BytesStream(bytes(recorded)))
    assert "version 1" in str(rx.last_error)


def test_socket_migration_with_a_busy_agent_arrives_equal() -> None:
    a, b = socket.socketpair()
    state = np.random.default_rng(4).integers(0, 256, 4 << 20, dtype=np.uint8)
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=10)
    thread = threading.Thread(target=receiver.handle, args=(SocketStream(a),), daemon=True)
    thread.start()
    channel = StreamChannel(lambda: SocketStream(b), retries=0, timeout=10)
    summary = LiveMigration(BufferSource(state), channel, on_round=HotPages(state, 3), max_rounds=3,
                            downtime_limit=1e-9, chunk_bytes=1 << 20).run()
    thread.join(10)
    assert target.state is not None and bytes(target.state) == state.tobytes()
    assert summary.rounds[2].wire_bytes < summary.rounds[2].dirty_bytes // 20


def _make_live_fixtures() -> Any:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent / "fixtures" / "make_live_fixtures.py"
    spec = importlib.util.spec_from_file_location("cellmigrate_make_live_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", [3, 4])
def test_the_golden_streams_still_replay(version: int) -> None:
    """The committed recordings (RAW, LZ4 and PAGES chunks of protocol versions 3 and 4)
    are taken by today's receiver and stage exactly the state their recipe describes.
    (A fresh recording is compared by ``make_live_fixtures.py --check``, not here: LZ4's
    bytes may differ between releases of the library.) Version 4's, spoken as version 3
    (its HELLO rewritten), fails its first chunk: its digests cover the placement too."""
    fixtures = _make_live_fixtures()
    golden = fixtures.STREAMS[version].read_bytes()
    assert golden[9:11] == version.to_bytes(2, "little")
    encodings = {e for _, e in fixtures.chunk_encodings(golden)}
    assert encodings == {Encoding.RAW, Encoding.LZ4, Encoding.PAGES}
    target = BufferTarget()
    rx = LiveReceiver(MemoryStore(), target, timeout=5)
    assert rx.handle(BytesStream(golden)), rx.last_error
    assert target.state is not None and bytes(target.state) == fixtures.final_state()
    other = bytearray(golden)
    other[9:11] = (7 - version).to_bytes(2, "little")
    rx = LiveReceiver(MemoryStore(), BufferTarget(), timeout=5)
    assert not rx.handle(BytesStream(bytes(other)))
    assert isinstance(rx.last_error, CorruptDataError) and "chunk 1 digest mismatch" in str(rx.last_error)


def test_pages_chunks_resent_after_cuts_arrive_equal() -> None:
    """Connections cut inside the rounds that carry PAGES chunks: the chunks not yet
    committed are resent as they were (their XZR pages over the same cached copies), and
    the receiver, which applies them in order, ends byte-equal."""
    def migrate(cuts: List[int]) -> Tuple[bool, int, List[Tuple[int, int, int]]]:
        rng = np.random.default_rng(9)
        state = rng.integers(0, 256, (1 << 20) + 333, dtype=np.uint8)
        hot = np.sort(rng.choice(255, 100, replace=False))
        left = [3]

        def touch(stats: Any) -> None:
            if left[0] > 0:
                left[0] -= 1
                for page in hot.tolist():
                    at = page * PAGE + int(rng.integers(0, PAGE - 64))
                    state[at : at + 64] = rng.integers(0, 256, 64, dtype=np.uint8)

        target = BufferTarget()
        receiver = LiveReceiver(MemoryStore(), target, timeout=10)
        pending, threads = list(cuts), []
        def connect() -> SocketStream:
            a, b = socket.socketpair()
            cut = pending.pop(0) if pending else None
            thread = threading.Thread(target=receiver.handle, args=(CutStream(a, cut),), daemon=True)
            thread.start()
            threads.append(thread)
            return SocketStream(b)

        channel = StreamChannel(connect, retries=len(cuts) + 1, retry_delay=0.001, timeout=10)
        chunks = _recorded(channel)
        LiveMigration(BufferSource(state), channel, max_rounds=3, downtime_limit=1e-9, chunk_bytes=64 << 10,
                      migration_id=uuid.uuid4(), on_round=touch).run()
        for thread in threads:
            thread.join(10)
        sent = [(c.round, int(c.encoding), c.wire_len) for c in chunks]
        return target.state is not None and bytes(target.state) == state.tobytes(), channel.resent_chunks, sent

    ok, _, sent = migrate([])
    assert ok and any(e == Encoding.PAGES for _, e, _ in sent)
    # Cut points inside the PAGES rounds: past the bytes of rounds 0 and 1 (frame heads
    # and the handshake add a little; the spread covers it).
    before = sum(w for r, _, w in sent if r < 2)
    total = sum(w for _, _, w in sent)
    resent = 0
    for cut in range(before, total + 4000, max(1, (total + 4000 - before) // 8)):
        ok, again, _ = migrate([cut])
        assert ok, cut
        resent += again
    assert resent > 0  # some cut did land before a chunk was committed


def test_a_resize_empties_the_page_cache() -> None:
    """The state grows between rounds: the receiver's pages past the old end are zeros,
    and the cached copies are dropped, so the round after the resize sends no PAGES
    chunk; later rounds use the cache again, and the target ends byte-equal."""
    rng = np.random.default_rng(4)
    holder = [rng.integers(0, 256, 64 * PAGE + 100, dtype=np.uint8)]
    hot = list(range(0, 60, 3))
    step = [0]

    def touch(stats: Any) -> None:
        step[0] += 1
        state = holder[0]
        if step[0] == 2:  # after round 1: grow (hot pages changed as well)
            state = np.concatenate([state, rng.integers(0, 256, 5 * PAGE, dtype=np.uint8)])
            holder[0] = state
        if step[0] <= 4:
            for page in hot:
                state[page * PAGE + 8 * step[0]] ^= 0x33

    target = BufferTarget()
    channel = InProcessChannel(ReceiverSession(MemoryStore(), target))
    chunks = _recorded(channel)
    LiveMigration(BufferSource(lambda: holder[0]), channel, on_round=touch, max_rounds=5, downtime_limit=1e-9).run()
    assert target.state is not None and bytes(target.state) == holder[0].tobytes()
    by_round = {r: {c.encoding for c in chunks if c.round == r} for r in range(6)}
    assert Encoding.PAGES not in by_round[2]  # the first round at the new size
    assert Encoding.PAGES in by_round[3] | by_round[4]


def test_page_cache_settings_are_checked() -> None:
    channel = InProcessChannel(ReceiverSession(MemoryStore(), BufferTarget()))
    for bad in (-1, 1, 4095, (64 << 30) + 1):
        with pytest.raises(ValueError, match="page_cache_bytes"):
            LiveMigration(BufferSource(bytearray(8)), channel, page_cache_bytes=bad)
    for wrong in (4096.0, "64MiB", None, True):
        with pytest.raises(TypeError, match="page_cache_bytes"):
            LiveMigration(BufferSource(bytearray(8)), channel, page_cache_bytes=wrong)  # type: ignore[arg-type]


def test_base_pages_of_a_state_under_one_page() -> None:
    state = np.arange(1, 101, dtype=np.uint8)
    base = base_pages(state, np.array([0, 1], dtype=np.int64), bytes([3, 3]) + bytes(8)).reshape(2, PAGE)
    assert bytes(base[0, :100]) == state.tobytes() and not base[0, 100:].any() and not base[1].any()
