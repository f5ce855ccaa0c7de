"""What a sender can make a receiver allocate, and what a chunk that fails leaves behind.

A sender chooses the size it offers, so that size never bounds itself: by default offers
are bounded by the node's capabilities and by the 64 GiB every reader of deltas has. A
chunk that grows the state gets its page table before anything is written (a table too
large for memory refuses the chunk with the staging untouched), and a chunk whose write
fails (a full disk) leaves its pages to be hashed from the staging again, the size put
back.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest

from cellmigrate.checksum import PAGE_SIZE
from cellmigrate.errors import InvalidStateError
from cellmigrate.live import BufferTarget, FileStore, MemoryStore, ReceiverSession
from cellmigrate.live.errors import RefusedError
from cellmigrate.live.leaves import PageTable, page_digests, page_root
from cellmigrate.live.pages import Chunk, Encoding, pages_digest
from cellmigrate.live.session import Offer
from cellmigrate.validation import AgentRequirements, NodeCapabilities
from cellmigrate.wire import DEFAULT_MAX_TOTAL_SIZE

GiB = 1 << 30


def _offer(size: int) -> Offer:
    return Offer(uuid.uuid4().bytes, bytes(16), AgentRequirements(state_size=size, version="0.1.0"), size)


def _chunk(seq: int, size: int, pages: List[int], fill: int) -> Chunk:
    raw = bytes([fill]) * (PAGE_SIZE * len(pages))
    return Chunk(seq, 0, size, np.array(pages, dtype=np.int64), Encoding.RAW, raw, len(raw), pages_digest(raw))


@pytest.mark.parametrize("node", [0, 1 << 62])
def test_offers_over_the_default_bound_are_refused_whatever_they_announce(node: int) -> None:
    caps = None
    if node:
        caps = NodeCapabilities.new()
        caps.max_state_size = node  # the CLI's --arch without --max-state-size: "no limit"
    session = ReceiverSession(MemoryStore(), BufferTarget(), capabilities=caps)
    with pytest.raises(RefusedError, match="exceeds this node's limit"):
        session.begin(_offer(1 << 43))  # 8 TiB, from a 60-byte frame
    with pytest.raises(RefusedError, match="exceeds this node's limit"):
        session.begin(_offer(DEFAULT_MAX_TOTAL_SIZE + 1))
    assert session.offer is None and session.store.size() == 0
    session.begin(_offer(40 * GiB))
    assert session._size_limit() == DEFAULT_MAX_TOTAL_SIZE  # 2x would be 80 GiB


def test_a_smaller_node_limit_and_an_explicit_limit_still_rule() -> None:
    caps = NodeCapabilities.new()
    caps.max_state_size = GiB
    session = ReceiverSession(MemoryStore(), BufferTarget(), capabilities=caps)
    with pytest.raises(RefusedError):
        session.begin(_offer(GiB + 1))
    big = ReceiverSession(MemoryStore(), BufferTarget(), max_state_size=1 << 44)
    big.begin(_offer(1 << 43))  # the operator said so
    assert big._size_limit() == 1 << 44


def test_a_chunk_that_grows_the_state_is_proven_over_the_grown_staging() -> None:
    session = ReceiverSession(MemoryStore(), BufferTarget())
    session.begin(_offer(PAGE_SIZE))
    size = 64 * 1024 * PAGE_SIZE + 100  # 256 MiB and a short last page
    assert session.apply_chunk(_chunk(1, size, [5], 7))
    staged = np.frombuffer(session.store.view(), dtype=np.uint8)
    assert session.end_round(0) == page_root(page_digests(staged), size)


@pytest.mark.parametrize("direct", [False, True])
def test_no_memory_for_the_page_table_refuses_the_chunk_before_a_write(monkeypatch: pytest.MonkeyPatch,
                                                                       direct: bool) -> None:
    session = ReceiverSession(MemoryStore(), BufferTarget())
    session.begin(_offer(4 * PAGE_SIZE))
    assert session.apply_chunk(_chunk(1, 4 * PAGE_SIZE, [0, 1], 3))
    before = bytes(session.store.view())

    def no_memory(self: PageTable, size: int, *, zero_filled: bool = False) -> PageTable:
        raise MemoryError

    monkeypatch.setattr(PageTable, "resized", no_memory)
    grow = _chunk(2, 64 * PAGE_SIZE, [3], 9)
    with pytest.raises(InvalidStateError, match="no memory for its page table"):
        if direct:
            session.apply_direct(grow, lambda views: pytest.fail("the pages were read into the staging"))
        else:
            session.apply_chunk(grow)
    assert session.committed_seq == 1 and bytes(session.store.view()) == before
    monkeypatch.undo()
    assert session.apply_chunk(_chunk(2, 4 * PAGE_SIZE, [3], 9))  # the session carries on
    staged = np.frombuffer(session.store.view(), dtype=np.uint8)
    assert session.end_round(0) == page_root(page_digests(staged), 4 * PAGE_SIZE)


def test_a_write_that_fails_half_way_leaves_its_pages_to_be_hashed_again(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    store = FileStore(tmp_path / "staging")
    session = ReceiverSession(store, BufferTarget())
    session.begin(_offer(8 * PAGE_SIZE))
    assert session.apply_chunk(_chunk(1, 8 * PAGE_SIZE, [0, 1, 2, 3], 1))
    real = FileStore.write_run

    def half_then_full(self: FileStore, offset: int, data: memoryview) -> None:
        real(self, offset, data[: PAGE_SIZE + 10])  # a page and a bit land
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileStore, "write_run", half_then_full)
    with pytest.raises(InvalidStateError, match="No space left"):  # the chunk fails, not the receiver
        session.apply_chunk(_chunk(2, 12 * PAGE_SIZE, [1, 2, 3], 2))  # grows, then the disk is full
    monkeypatch.undo()
    assert session.committed_seq == 1 and store.size() == 8 * PAGE_SIZE  # the size is put back
    # What landed is hashed from the staging, never taken for what the table held: the
    # root is of the bytes there (page 1 and 10 bytes of page 2 are now 2s).
    staged = np.frombuffer(store.view(), dtype=np.uint8)
    assert staged[PAGE_SIZE] == 2
    assert session.end_round(0) == page_root(page_digests(staged), 8 * PAGE_SIZE)
    del staged  # a FileStore cannot unmap while a view lives
    store.close()


def _filesystems(tmp_path: Path) -> List[Any]:
    places = [tmp_path]
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
        places.append(Path("/dev/shm"))  # tmpfs: ftruncate to 256 TiB works, the mmap fails
    return places


def test_a_file_store_growth_that_fails_leaves_the_file_and_mapping_as_they_were(tmp_path: Path) -> None:
    for place in _filesystems(tmp_path):
        path = place / f"cm-store-{uuid.uuid4().hex}"
        store = FileStore(path)
        try:
            store.resize(3 * PAGE_SIZE)
            store.view()[:4] = b"keep"
            with pytest.raises((OSError, ValueError, OverflowError)):
                store.resize(1 << 48)
            assert store.size() == 3 * PAGE_SIZE == os.stat(path).st_size
            assert bytes(store.view()[:4]) == b"keep" and store.view().nbytes == 3 * PAGE_SIZE
        finally:
            store.close()
            os.unlink(path)


def test_a_target_that_adopts_but_cannot_resume_fails_the_migration_honestly() -> None:
    """The target's resume failing (the CLI's receive --resume-cmd) fails the migration:
    the source resumes, and the audit trail says the target adopted the state, not that
    it was left unchanged."""
    from cellmigrate import MigrationFailedError
    from cellmigrate.live import BufferSource, InProcessChannel, LiveMigration

    class NoStart(BufferTarget):
        def resume(self) -> None:
            raise RuntimeError("the agent would not start")

    state = np.random.default_rng(3).integers(0, 256, 64 * PAGE_SIZE, dtype=np.uint8)
    target = NoStart()
    session = ReceiverSession(MemoryStore(), target)
    resumed: List[int] = []
    with pytest.raises(MigrationFailedError, match="could not resume"):
        LiveMigration(BufferSource(state, resume=lambda: resumed.append(1)), InProcessChannel(session),
                      max_rounds=0).run()
    assert resumed == [1]  # the source goes on
    assert target.state is not None and bytes(target.state) == state.tobytes()  # it was adopted
    details = [e.details for e in session.validator.audit_log]
    assert any("could not resume" in d for d in details)
    assert not any("target state unchanged" in d for d in details)


def test_a_shrinking_chunk_whose_write_fails_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk that shrinks the state writes before it cuts: a failed write leaves the
    pages past the new end as they were (they were cut, then grown back as zeros, while
    the table still held their digests)."""
    store = FileStore(tmp_path / "staging")
    session = ReceiverSession(store, BufferTarget())
    session.begin(_offer(8 * PAGE_SIZE))
    assert session.apply_chunk(_chunk(1, 8 * PAGE_SIZE, list(range(8)), 1))
    before = bytes(store.view())

    def full(self: FileStore, offset: int, data: memoryview) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(FileStore, "write_run", full)
    with pytest.raises(InvalidStateError, match="cannot write chunk 2 into the staging"):
        session.apply_chunk(_chunk(2, 4 * PAGE_SIZE + 100, [0, 1], 2))  # an OSError would end the receiver
    monkeypatch.undo()
    assert bytes(store.view()) == before and session.committed_seq == 1
    staged = np.frombuffer(store.view(), dtype=np.uint8)
    assert session.end_round(0) == page_root(page_digests(staged), 8 * PAGE_SIZE)
    del staged
    # The same chunk, written this time, shrinks the state after its pages landed.
    assert session.apply_chunk(_chunk(2, 4 * PAGE_SIZE + 100, [0, 1], 2))
    assert store.size() == 4 * PAGE_SIZE + 100
    assert bytes(store.view()) == bytes([2]) * (2 * PAGE_SIZE) + before[2 * PAGE_SIZE : 4 * PAGE_SIZE + 100]
    store.close()
