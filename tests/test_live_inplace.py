"""Chunks received in place: straight from the socket into the staging, undone on failure.

A raw chunk bound for pages still zero in the staging (round 0) is read into the staging
itself, not into a buffer first; these tests check that a chunk cut, damaged or forged
half-way leaves the staged state exactly as the last committed chunk left it.
"""

from __future__ import annotations

import socket
import sys
import threading
import uuid
from typing import List, Optional

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cellmigrate import digest
from cellmigrate.checksum import PAGE_SIZE
from cellmigrate.errors import CorruptDataError
from cellmigrate.live import BufferSource, BufferTarget, LiveMigration, MemoryStore, ReceiverSession
from cellmigrate.live.errors import ConnectionLostError
from cellmigrate.live.leaves import page_digests
from cellmigrate.live.pages import Chunk, Encoding, pages_digest
from cellmigrate.live.protocol import derive_key
from cellmigrate.live.receiver import LiveReceiver
from cellmigrate.live.sender import StreamChannel
from cellmigrate.live.session import Offer
from cellmigrate.live.transport import SocketStream
from cellmigrate.validation import AgentRequirements

SIZE = 40 * PAGE_SIZE + 100


def _session(prefault: Optional[bool] = None) -> ReceiverSession:
    session = ReceiverSession(MemoryStore(), BufferTarget(), prefault=prefault)
    session.begin(Offer(bytes(16), bytes(16), AgentRequirements(state_size=SIZE), SIZE))
    return session


def _chunk(seq: int, pages: List[int], data: np.ndarray) -> Chunk:
    idx = np.array(pages, dtype=np.int64)
    raw = np.concatenate([data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in pages])
    return Chunk(seq, 0, SIZE, idx, Encoding.RAW, b"", raw.nbytes, pages_digest(raw))


def _fill_with(raw: bytes, fail_after: Optional[int] = None, digest_of: Optional[bytes] = None):  # type: ignore[no-untyped-def]
    def fill(views: List[memoryview]) -> bytes:
        pos = 0
        for view in views:
            n = view.nbytes
            if fail_after is not None and pos + n > fail_after:
                view[: fail_after - pos] = raw[pos:fail_after]
                raise ConnectionLostError("cut in the middle of the payload")
            view[:] = raw[pos : pos + n]
            pos += n
        if digest_of is not None:  # digests of other bytes than those written
            return page_digests(digest_of)
        return np.concatenate([page_digests(view) for view in views])  # hashed back from the staging

    return fill


def test_a_chunk_that_fails_in_place_leaves_the_staging_as_it_was() -> None:
    data = np.random.default_rng(1).integers(1, 256, SIZE, dtype=np.uint8)
    session = _session()
    first = _chunk(1, [0, 1, 2], data)
    assert session.can_apply_direct(first)
    assert session.apply_direct(first, _fill_with(data[: 3 * PAGE_SIZE].tobytes())) is True
    before = bytes(session.store.view())
    assert before[: 3 * PAGE_SIZE] == data[: 3 * PAGE_SIZE].tobytes() and len(before) == SIZE

    second = _chunk(2, [5, 6, 9, 40], data)  # page 40 is the state's short last page
    raw = np.concatenate([data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE] for p in (5, 6, 9, 40)]).tobytes()
    assert len(raw) == second.raw_len == 3 * PAGE_SIZE + 100
    # Cut half-way, a wrong digest, a damaged page: each is undone, the committed point stays.
    with pytest.raises(ConnectionLostError):
        session.apply_direct(second, _fill_with(raw, fail_after=2 * PAGE_SIZE + 7))
    assert bytes(session.store.view()) == before and session.committed_seq == 1
    with pytest.raises(CorruptDataError, match="digest mismatch"):
        session.apply_direct(second, _fill_with(raw, digest_of=b"something else"))
    assert bytes(session.store.view()) == before and session.committed_seq == 1
    damaged = bytearray(raw)
    damaged[5000] ^= 1
    with pytest.raises(CorruptDataError):
        session.apply_direct(second, _fill_with(bytes(damaged), digest_of=bytes(damaged)))
    assert bytes(session.store.view()) == before and session.committed_seq == 1
    # The same chunk, whole: committed; a resend is not taken in place (nothing to do).
    assert session.apply_direct(second, _fill_with(raw)) is True
    assert session.apply_direct(second, _fill_with(raw)) is None and session.committed_seq == 2
    # Pages before the zero frontier are not taken in place (their old bytes would be lost).
    assert not session.can_apply_direct(_chunk(3, [7], data))
    assert session.apply_chunk(
        Chunk(3, 0, SIZE, np.array([7]), Encoding.RAW, data[7 * PAGE_SIZE : 8 * PAGE_SIZE].tobytes(), PAGE_SIZE,
              pages_digest(data[7 * PAGE_SIZE : 8 * PAGE_SIZE]))
    )
    staged = np.frombuffer(session.store.view(), dtype=np.uint8)
    for p in (0, 1, 2, 5, 6, 7, 9, 40):
        assert staged[p * PAGE_SIZE : (p + 1) * PAGE_SIZE].tobytes() == data[p * PAGE_SIZE : (p + 1) * PAGE_SIZE].tobytes()
    for p in (3, 4, 8, 10, 39):
        assert not staged[p * PAGE_SIZE : (p + 1) * PAGE_SIZE].any()


def test_a_failed_first_chunk_shrinks_the_staging_back() -> None:
    data = np.random.default_rng(2).integers(1, 256, SIZE, dtype=np.uint8)
    session = _session()
    chunk = _chunk(1, [3, 4], data)
    with pytest.raises(ConnectionLostError):
        session.apply_direct(chunk, _fill_with(data[3 * PAGE_SIZE : 5 * PAGE_SIZE].tobytes(), fail_after=10))
    assert session.store.size() == 0 and session.committed_seq == 0


class CutStream(SocketStream):
    """The receiver's end of a connection that ends after ``cut`` bytes were received."""

    def __init__(self, sock: socket.socket, cut: Optional[int]) -> None:
        super().__init__(sock)
        self.left = cut

    def recv_into(self, view: memoryview, timeout: float) -> int:
        if self.left is None:
            return super().recv_into(view, timeout)
        if self.left <= 0:
            return 0  # end of stream: the connection is cut here
        n = super().recv_into(view[: self.left], timeout)
        self.left -= n
        return n


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(0, 300_000), min_size=1, max_size=3), st.booleans())
def test_cuts_in_the_middle_of_in_place_chunks(cuts: List[int], keyed: bool) -> None:
    rng = np.random.default_rng(len(cuts))
    state = rng.integers(0, 256, (256 << 10) + 333, dtype=np.uint8)
    state[20 * PAGE_SIZE : 30 * PAGE_SIZE] = 0  # zero pages: chunks of several runs
    key = derive_key(b"k") if keyed else None
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, key=key, timeout=10)
    session = receiver.session
    left = list(cuts)
    threads: List[threading.Thread] = []
    broken: List[str] = []

    def serve(sock: socket.socket, cut: Optional[int]) -> None:
        receiver.handle(CutStream(sock, cut))
        if session.completed:
            return
        # Whatever was cut, the staging holds exactly the committed chunks' pages.
        staged = np.frombuffer(session.store.view(), dtype=np.uint8)
        end = min(session._zero_from * PAGE_SIZE, staged.nbytes)
        if staged[:end].tobytes() != state[:end].tobytes() or staged[end:].any():
            broken.append(f"cut at {cut}: staging differs from the committed chunks ({receiver.last_error})")

    def connect() -> SocketStream:
        a, b = socket.socketpair()
        thread = threading.Thread(target=serve, args=(a, left.pop(0) if left else None))
        thread.start()
        threads.append(thread)
        return SocketStream(b)

    channel = StreamChannel(connect, key=key, retries=len(cuts) + 1, retry_delay=0.001, timeout=10)
    LiveMigration(BufferSource(state), channel, max_rounds=0, chunk_bytes=64 << 10, migration_id=uuid.uuid4()).run()
    for thread in threads:
        thread.join(10)
    assert not broken and len(threads) >= 1
    assert target.state is not None and bytes(target.state) == state.tobytes()
    assert digest(bytes(target.state)) == digest(state)


def test_prefault_maps_pages_ahead_and_changes_nothing() -> None:
    data = np.random.default_rng(3).integers(1, 256, SIZE, dtype=np.uint8)
    session = _session(prefault=True)
    session.prefault(1 << 20)  # nothing staged yet: nothing to touch
    assert session.store.size() == 0
    chunk = _chunk(1, [0, 1, 2], data)
    assert session.apply_direct(chunk, _fill_with(data[: 3 * PAGE_SIZE].tobytes()))
    before = bytes(session.store.view())
    session.prefault(10 * PAGE_SIZE)
    session.prefault(1 << 30)  # past the end: bounded by the staging
    assert bytes(session.store.view()) == before
    if sys.platform.startswith("linux"):  # MADV_POPULATE_WRITE (Linux 5.14+) mapped them
        assert session.can_prefault and session._prefaulted == -(-SIZE // PAGE_SIZE)
    # The next chunk still goes in place after its pages were faulted in.
    nxt = _chunk(2, [3, 4], data)
    assert session.can_apply_direct(nxt)
    assert session.apply_direct(nxt, _fill_with(data[3 * PAGE_SIZE : 5 * PAGE_SIZE].tobytes()))
    assert bytes(session.store.view())[: 5 * PAGE_SIZE] == data[: 5 * PAGE_SIZE].tobytes()


def test_chunk_digest_is_the_page_root_of_the_raw_pages() -> None:
    import xxhash

    raw = np.random.default_rng(4).integers(0, 256, 3 * PAGE_SIZE + 77, dtype=np.uint8).tobytes()
    pages = [raw[a : a + PAGE_SIZE] for a in range(0, len(raw), PAGE_SIZE)]
    expected = xxhash.xxh3_128_digest(b"".join(xxhash.xxh3_128_digest(p) for p in pages) + len(raw).to_bytes(8, "little"))
    assert pages_digest(raw) == expected
    damaged = bytearray(raw)
    damaged[-1] ^= 1
    assert pages_digest(bytes(damaged)) != expected


def test_stop_and_copy_hashes_the_summary_digest_of_the_state_it_sent() -> None:
    from cellmigrate.live import InProcessChannel

    # The tree's leaves are hashed region by region (32 MiB) as the round reaches them:
    # one region, and several with a short last leaf; the same buffer each call and a new one.
    for size in ((3 << 20) + 5, (70 << 20) + 5):
        state = np.random.default_rng(6).integers(0, 256, size, dtype=np.uint8)
        for source in (BufferSource(state), BufferSource(lambda: bytearray(state.tobytes()))):
            target = BufferTarget()
            summary = LiveMigration(source, InProcessChannel(ReceiverSession(MemoryStore(), target)), max_rounds=0).run()
            assert summary.digest == digest(state) and target.state == bytearray(state.tobytes())


def test_prefault_is_off_when_asked_and_decided_by_the_cpus_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from cellmigrate.live import session as session_module

    assert not _session(prefault=False).can_prefault
    for cpus, expected in ((2, False), (4, True)):
        monkeypatch.setattr(session_module.os, "sched_getaffinity", lambda pid, n=cpus: set(range(n)), raising=False)
        assert session_module.prefault_pays() is expected
        assert _session().can_prefault is (expected and sys.platform.startswith("linux"))


def test_a_chunk_may_not_grow_the_state_past_the_growth_bound_whatever_the_capabilities() -> None:
    """Without an explicit ``max_state_size`` a sender may grow the offered state at most 2x
    or by 1 GiB, even when the node's capabilities allow any size (2**62: the CLI's
    ``--arch`` without ``--max-state-size``); an explicit limit is the limit."""
    from cellmigrate.validation import NodeCapabilities

    caps = NodeCapabilities.new()
    caps.max_state_size = 1 << 62
    for explicit, allowed in ((0, SIZE + (1 << 30)), (1 << 40, 1 << 40)):
        session = ReceiverSession(MemoryStore(), BufferTarget(), capabilities=caps, max_state_size=explicit)
        req = AgentRequirements(state_size=SIZE, version=caps.version)
        session.begin(Offer(uuid.uuid4().bytes, bytes(16), req, SIZE))
        assert session._size_limit() == allowed
        grown = Chunk(1, 0, allowed + PAGE_SIZE, np.zeros(0, dtype=np.int64), Encoding.RAW, b"", 0, pages_digest(b""))
        with pytest.raises(CorruptDataError, match="over the limit"):
            session.apply_chunk(grown)
        assert session.store.size() == 0
