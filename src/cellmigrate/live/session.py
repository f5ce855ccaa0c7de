"""The receiving end of one live migration, whatever carries it (stream, in-process, Ray).

A :class:`ReceiverSession` stages rounds into a :class:`~cellmigrate.live.agent.StateStore`:
each chunk is decoded and its digest checked *before* anything is written, then written
whole and acknowledged (its sequence number becomes the committed point a resumed
connection continues from). A raw chunk for pages still zero in the staging (round 0)
may instead be received in place (:meth:`ReceiverSession.apply_direct`): if it then
fails, its pages are zero-filled again, so a chunk that fails still changes nothing.
Each page written is hashed back from the staged state
into the session's :class:`~cellmigrate.live.leaves.PageTable`, so at the end of a round
its page root (``xxh3_128_tree`` with 4 KiB leaves) is ready with nothing left to hash.
The target agent adopts the staged state only when the sender's commit carries the same
root; until then the target's own state is never touched, so a failure at any point
leaves it unchanged. Every step is written to the validator's audit log.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import numpy as np

from ..agent import Agent
from ..audit import AuditEntry, AuditEventType
from ..checksum import PAGE_SIZE
from ..errors import CorruptDataError, InvalidStateError, MigrationFailedError
from ..validation import AgentRequirements, MigrationValidator, NodeCapabilities, VerificationResult
from ..wire import DEFAULT_MAX_TOTAL_SIZE
from .errors import RefusedError
from .agent import MAX_EXTRA_BYTES, StateStore, TargetAgent
from .leaves import PAGE_DIGEST_SIZE, Digests, PageTable, page_digests_at
from .pages import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNK_BYTES,
    Chunk,
    Encoding,
    base_pages,
    chunk_digest,
    decode_pages,
    pages_digest,
    pages_len,
    write_pages,
)

__all__ = ["Offer", "ReceiverSession"]

@dataclass(frozen=True)
class Offer:
    """What a sender proposes: which migration, which agent, what it needs, how big it is."""

    migration_id: bytes
    agent_id: bytes
    requirements: AgentRequirements
    state_size: int


def _mismatch(seq: int) -> str:
    # The sender matches "chunk N digest mismatch" to tell transit damage from a source
    # that changed (sender._MISMATCH): keep the words.
    return (f"chunk {seq} digest mismatch: its pages are not what the sender hashed "
            "(damaged in transit, or changed at the source as they were sent)")


class ReceiverSession:
    """Stage, verify and commit one migration's rounds; adopt on a matching final digest.

    ``capabilities=None`` accepts any requirements (the check still runs and is logged
    against an unlimited node). ``max_state_size`` (bytes) bounds the offered state and
    what a round may grow it to; 0 (the default) bounds offers by the capabilities'
    ``max_state_size`` and :data:`~cellmigrate.wire.DEFAULT_MAX_TOTAL_SIZE` (64 GiB, the
    bound every reader of deltas has by default), whichever is smaller, and a round's
    growth by twice the offered size or the offered size + 1 GiB, never past that: a
    sender cannot make the receiver allocate without bound. ``prefault``:
    whether :meth:`prefault` maps staging pages ahead of the data (see there); ``None``
    decides by the CPUs this process may use (:func:`prefault_pays`).
    """

    def __init__(
        self,
        store: StateStore,
        target: TargetAgent,
        *,
        capabilities: Optional[NodeCapabilities] = None,
        validator: Optional[MigrationValidator] = None,
        max_state_size: int = 0,
        prefault: Optional[bool] = None,
    ) -> None:
        self.store = store
        self.target = target
        self.capabilities = capabilities
        self.validator = validator if validator is not None else MigrationValidator()
        node = capabilities.max_state_size if capabilities is not None and capabilities.max_state_size else 0
        # The offer's bound: a sender chooses the size it offers, so it is never the bound.
        self.max_state_size = max_state_size or min(node or DEFAULT_MAX_TOTAL_SIZE, DEFAULT_MAX_TOTAL_SIZE)
        self._explicit_max = max_state_size
        self.offer: Optional[Offer] = None
        self.committed_seq = 0
        self.committed_round = -1
        self.completed = False
        self.failed = False
        self.bytes_received = 0
        self._pages = PageTable()
        self._scratch: Optional["np.ndarray[Any, np.dtype[np.uint8]]"] = None
        self._round_seen = -1
        self._started = 0.0
        # Every staged page from this index on is zero (never written since begin): a
        # chunk there can be received in place and undone by zero-filling it.
        self._zero_from = 0
        self._prefaulted = 0
        self._can_prefault = sys.platform.startswith("linux") and (prefault_pays() if prefault is None else prefault)

    # -- handshake -------------------------------------------------------------------

    def begin(self, offer: Offer) -> int:
        """Accept ``offer`` (or refuse with :class:`RefusedError`); returns the committed seq.

        The same migration id again (a reconnect) continues where the last committed
        chunk left off; a new one starts from an empty, zero-filled staging area.
        """
        if self.offer is not None and offer.migration_id == self.offer.migration_id:
            if self.completed or self.failed:
                raise RefusedError(f"migration {uuid.UUID(bytes=offer.migration_id)} is already finished")
            return self.committed_seq
        if self.offer is not None and not (self.completed or self.failed):
            raise RefusedError("another migration is in progress on this receiver")
        if offer.state_size > self.max_state_size:
            raise RefusedError(f"state of {offer.state_size} bytes exceeds this node's limit of {self.max_state_size}")
        caps = self.capabilities
        status = self.validator.validate_pre_migration(
            offer.migration_id, Agent(agent_id=offer.agent_id), offer.requirements, caps if caps is not None else _anything(offer.requirements)
        )
        if not status.can_proceed():
            raise RefusedError(status.reason or "incompatible target")
        self.offer = offer
        self.committed_seq, self.committed_round, self._round_seen = 0, -1, -1
        self.completed = self.failed = False
        self.bytes_received = 0
        self._started = time.monotonic()
        self.store.resize(0)  # the staging area starts zero-filled: round 0 skips zero pages
        self._zero_from = 0
        self._prefaulted = 0
        self._pages = PageTable()
        self._audit(AuditEventType.TRANSFER_STARTED, f"Live migration staging started: {offer.state_size} bytes announced")
        return 0

    # -- rounds ----------------------------------------------------------------------

    def apply_chunk(self, chunk: Chunk) -> bool:
        """Verify and commit one chunk; False when it was already committed (a resend).

        Raises ``CorruptDataError`` (digest, bounds, order) with the staged state as it was.
        """
        if not self._check(chunk):
            return False
        idx = chunk.indices
        # XZR pages XOR into the pages staged so far, copied out (no view of the store may
        # outlive this call, or a FileStore could not resize) into the scratch buffer, warm
        # from every delta chunk's commit (a chunk over 8 MiB of pages gets its own).
        base = None
        if chunk.encoding == Encoding.PAGES:
            base = base_pages(self._staged(), idx, chunk.payload, self._scratch_buffer())
        raw = decode_pages(chunk.encoding, chunk.payload, chunk.raw_len, base=base)
        if chunk.digest_for(pages_digest(raw)) != chunk.digest:
            raise CorruptDataError(_mismatch(chunk.seq))
        table = self._table_for(chunk)
        # Verified: now (and only now) change the staged state. Grown before the write,
        # shrunk after it: a write that fails leaves every byte past the new end as it was.
        old_size = self.store.size()
        try:
            if chunk.size > old_size:
                self._resize_store(chunk.size)
            if len(idx):
                write_run = getattr(self.store, "write_run", None)
                if write_run is not None and int(idx[-1]) - int(idx[0]) == len(idx) - 1:
                    write_run(int(idx[0]) * PAGE_SIZE, memoryview(raw))  # one run, e.g. FileStore's pwrite
                else:
                    write_pages(self._staged(), idx, np.frombuffer(raw, dtype=np.uint8), chunk.size)
        except BaseException as exc:
            self._undo_writes(idx, old_size)
            if isinstance(exc, OSError):  # a full disk, an I/O error: this chunk fails, the session goes on
                raise InvalidStateError(f"cannot write chunk {chunk.seq} into the staging: {exc.strerror or exc}") from exc
            raise
        if chunk.size < old_size:
            self._resize_store(chunk.size)
        self._commit(chunk, None, table)
        return True

    def _table_for(self, chunk: Chunk) -> Optional[PageTable]:
        """The page table at ``chunk``'s size (None: the size does not change), made
        before the staging changes: a table too large for memory refuses the chunk with
        nothing written (``InvalidStateError``). Pages a grown store adds are stale:
        hashed from the staging, never taken for the zeros the store should hold (the
        proof is about the staged bytes)."""
        if chunk.size == self._pages.size:
            return None
        try:
            return self._pages.resized(chunk.size)
        except MemoryError:
            raise InvalidStateError(f"cannot stage a state of {chunk.size} bytes: no memory for its page table") from None

    def _undo_writes(self, idx: "np.ndarray[Any, np.dtype[np.int64]]", old_size: int) -> None:
        """After a failed write (a full disk, say): the pages it may have reached are
        hashed from the staging again (never assumed to hold what they held), and the
        size is put back."""
        self._pages.touch(idx)
        if self.store.size() != old_size:
            try:
                self._resize_store(old_size)
            except InvalidStateError:
                pass  # the next chunk sets its own size; the table still says the old one

    def can_apply_direct(self, chunk: Chunk, after: Optional[Chunk] = None) -> bool:
        """Whether :meth:`apply_direct` would write ``chunk``'s pages straight into the
        staging (once ``after``, a chunk still being applied, is committed).

        That is for a raw chunk all of whose pages are still zero in the staging (round 0
        of a new migration, say): a chunk that fails is then undone by zero-filling what
        it wrote. Stores that write through ``write_run`` (a file) take the copy path."""
        idx = chunk.indices
        if chunk.encoding != Encoding.RAW or not len(idx) or getattr(self.store, "write_run", None) is not None:
            return False
        frontier = self._zero_from
        if after is not None and len(after.indices):
            frontier = max(frontier, int(after.indices[-1]) + 1)
        return int(idx[0]) >= frontier

    def apply_direct(self, chunk: Chunk, fill: Callable[[List[memoryview]], Digests]) -> Optional[bool]:
        """:meth:`apply_chunk` with the pages written straight into the staging area.

        ``chunk`` has no payload yet: ``fill(views)`` writes its raw pages into ``views``
        (the staging's byte ranges of each run of pages, in order: e.g. reading them from
        the socket) and returns the ``(pages, 16)`` XXH3-128 digests of the pages as they
        now are in ``views`` (hashed back from the staging, e.g. right after each piece
        landed): they check the chunk's digest and go into the page table, so its pages
        are hashed once. Returns None (nothing done)
        when the chunk cannot go this way (see :meth:`can_apply_direct`, or a resend):
        apply it with :meth:`apply_chunk`. Whatever ``fill`` raises, and a digest
        mismatch (``CorruptDataError``), leave the staged state exactly as it was: the
        pages written are zero-filled again, a size grown for them is shrunk back.
        """
        if not self.can_apply_direct(chunk) or not self._check(chunk):
            return None
        table = self._table_for(chunk)
        old_size = self.store.size()
        if chunk.size > old_size:
            self._resize_store(chunk.size)
        idx = chunk.indices
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        firsts = idx[np.concatenate(([0], breaks))].tolist()
        lasts = idx[np.concatenate((breaks - 1, [len(idx) - 1]))].tolist()
        # No ``with``: a traceback keeping the fill's frames (and these views) alive must
        # not turn a failure into a BufferError; a store without write_run keeps no mapping.
        view = self.store.view()
        ranges = [view[a * PAGE_SIZE : min((b + 1) * PAGE_SIZE, chunk.size)] for a, b in zip(firsts, lasts)]
        try:
            try:
                digests = fill(ranges)
                if digests.shape != (len(idx), PAGE_DIGEST_SIZE) or chunk.digest_for(chunk_digest(digests, chunk.raw_len)) != chunk.digest:
                    raise CorruptDataError(_mismatch(chunk.seq))
            except BaseException:
                for r in ranges:  # they were all zero: the staging is as it was
                    np.frombuffer(r, dtype=np.uint8).fill(0)
                raise
            finally:
                del ranges, view
        except BaseException:
            if self.store.size() != old_size:
                self._resize_store(old_size)
            raise
        if chunk.size < old_size:
            self._resize_store(chunk.size)
        self._commit(chunk, digests, table)
        return True

    @property
    def can_prefault(self) -> bool:
        """Whether :meth:`prefault` does anything here (Linux 5.14+; in-place stores)."""
        return self._can_prefault and getattr(self.store, "write_run", None) is None

    def prefault(self, nbytes: int) -> None:
        """Have the kernel map the staging's pages just past the last committed one (up
        to ``nbytes`` of them) before the next in-place chunks land there: run on a helper
        thread while the socket is read, this takes the first-touch page faults (and the
        kernel's zeroing of fresh pages) off the receiving thread. It uses
        ``madvise(MADV_POPULATE_WRITE)``, which maps pages without touching their bytes,
        so it may run while chunks are read into the same pages. Best effort: where the
        system cannot, it does nothing from then on."""
        if not self._can_prefault:
            return
        view = self.store.view()
        lo = max(self._zero_from, self._prefaulted) * PAGE_SIZE
        hi = min(view.nbytes, self._zero_from * PAGE_SIZE + nbytes)
        if hi > lo:
            if _populate(np.frombuffer(view, dtype=np.uint8), lo, hi):
                self._prefaulted = -(-hi // PAGE_SIZE)
            else:
                self._can_prefault = False

    def _check(self, chunk: Chunk) -> bool:
        """A chunk's place and bounds (``CorruptDataError``); False when already committed.

        A version-4 chunk (``placed``) has its placement in its digest: one that does not
        fit (out of order, out of bounds, a resend of a committed chunk, which version-4
        senders never make) was changed in transit like one whose digest fails, and is
        refused in the same words, so the sender sends it again."""
        try:
            return self._check_place(chunk)
        except CorruptDataError as exc:
            if not chunk.placed:
                raise
            raise CorruptDataError(f"{_mismatch(chunk.seq)}: {exc.message}") from None

    def _check_place(self, chunk: Chunk) -> bool:
        self._need_open()
        if chunk.seq <= self.committed_seq:
            if chunk.placed:
                raise CorruptDataError(f"chunk {chunk.seq} was committed already")
            return False
        if chunk.seq != self.committed_seq + 1:
            raise CorruptDataError(f"chunk {chunk.seq} out of order: expected {self.committed_seq + 1}")
        if chunk.round < self._round_seen or chunk.round < 0:
            raise CorruptDataError(f"chunk of round {chunk.round} after round {self._round_seen}")
        limit = self._size_limit()
        if chunk.size > limit:
            raise CorruptDataError(f"chunk sets the state to {chunk.size} bytes, over the limit of {limit}")
        idx = chunk.indices
        n_pages = -(-chunk.size // PAGE_SIZE)
        if len(idx):
            if int(idx[0]) < 0 or int(idx[-1]) >= n_pages or (len(idx) > 1 and not bool(np.all(np.diff(idx) > 0))):
                raise CorruptDataError("chunk page indices are not ascending within the state")
        if chunk.raw_len != pages_len(idx, chunk.size) or chunk.raw_len > MAX_CHUNK_BYTES:
            raise CorruptDataError(f"chunk declares {chunk.raw_len} bytes for {len(idx)} pages")
        return True

    def _resize_store(self, size: int) -> None:
        try:
            self.store.resize(size)
        except (MemoryError, ValueError, OSError) as exc:
            raise InvalidStateError(f"cannot stage a state of {size} bytes: {exc}") from None
        # Pages past the end are gone; added ones are zero (a shrunk last page is not).
        self._zero_from = min(self._zero_from, -(-size // PAGE_SIZE))

    def _commit(self, chunk: Chunk, digests: Optional[Digests] = None, table: Optional[PageTable] = None) -> None:
        """The verified chunk is in the staging: advance the committed point and the page
        table (``digests``: its pages' digests as hashed from the staging, when known;
        ``table``: :meth:`_table_for`'s, when the size changed)."""
        idx = chunk.indices
        if table is not None:
            self._pages = table
        if len(idx):
            self._zero_from = max(self._zero_from, int(idx[-1]) + 1)
            # Hash the pages back from the staging (what the proof is about), and the pages
            # before this chunk's last one still unknown since a resize (pages of a round
            # come in ascending order: none of those is written later in the round), so the
            # round's root has nothing left to hash.
            state, scratch = self._staged(), self._scratch_buffer()
            self._pages.set(idx, digests if digests is not None else page_digests_at(state, idx, chunk.size, scratch))
            self._pages.refresh(state, int(idx[-1]), scratch)
        self.committed_seq = chunk.seq
        self._round_seen = chunk.round
        self.bytes_received += chunk.raw_len

    def end_round(self, round_no: int) -> bytes:
        """The round is fully committed: return the staged state's digest (and flush it)."""
        self._need_open()
        if round_no != self._round_seen:
            raise CorruptDataError(f"end of round {round_no}, but the last chunk was of round {self._round_seen}")
        self.committed_round = round_no
        return self._root()

    def commit(self, digest: bytes, extra: bytes) -> None:
        """The sender's final digest: adopt and resume the target when it matches ours.

        A mismatch fails the migration (``MigrationFailedError``) and leaves the target
        untouched; so does a failing ``adopt``/``resume`` (logged either way).
        """
        offer = self._need_open()
        if len(extra) > MAX_EXTRA_BYTES:
            raise CorruptDataError(f"agent extra of {len(extra)} bytes exceeds {MAX_EXTRA_BYTES}")
        ours = self._root()
        size = self.store.size()
        ok = ours == digest
        result = VerificationResult(
            passed=ok,
            checksum_valid=ok,
            size_valid=True,
            agent_responsive=True,
            details=[
                f"Size verified: {size} bytes",
                "Digest verified (xxh3_128_tree of 4 KiB pages)" if ok else "Digest mismatch (xxh3_128_tree of 4 KiB pages)",
            ],
            content_valid=ok,
        )
        self.validator.audit_log.log_verification(offer.migration_id, offer.agent_id, result)
        if not ok:
            self.abandon("final digest mismatch: staged state differs from the source's")
            raise MigrationFailedError("final digest mismatch: the target's staged state differs from the source's")
        try:
            self.store.flush()
            with self.store.view() as view:
                self.target.adopt(view.toreadonly(), bytes(extra))
        except Exception as exc:
            self.abandon(f"target could not adopt the state: {exc}")
            raise MigrationFailedError(f"target could not adopt the state: {exc}") from exc
        try:
            self.target.resume()
        except Exception as exc:
            # Past the adopt nothing is discarded: the target holds the proven state but
            # does not run it; the sender, told so, resumes its own agent.
            reason = f"target adopted the state but could not resume: {exc}"
            self.failed = True
            self.validator.audit_log.log_completion(offer.migration_id, offer.agent_id, False,
                                                    f"Live migration failed: {reason}")
            raise MigrationFailedError(reason) from exc
        self.completed = True
        secs = time.monotonic() - self._started
        self._audit(AuditEventType.TRANSFER_COMPLETED, f"Staged {self.bytes_received} bytes in {self.committed_seq} chunks")
        self.validator.audit_log.log_completion(
            offer.migration_id, offer.agent_id, True, f"Live migration completed: {size} bytes in {secs:.3f} s"
        )

    def abandon(self, reason: str) -> None:
        """Give the migration up: the target keeps its own state; log why (idempotent)."""
        offer = self.offer
        if offer is None or self.completed or self.failed:
            return
        self.failed = True
        log = self.validator.audit_log
        log.log_rollback(offer.migration_id, offer.agent_id, True, True, f"Discarding staged state: {reason}")
        log.log_rollback(offer.migration_id, offer.agent_id, False, True, "Staged state discarded; target state unchanged")
        log.log_completion(offer.migration_id, offer.agent_id, False, f"Live migration failed: {reason}")

    # -- helpers ---------------------------------------------------------------------

    def _staged(self) -> "np.ndarray[Any, np.dtype[np.uint8]]":
        """The staged state as a flat uint8 array over the store's view. Hold it only
        within one call: a FileStore cannot resize while a view of its mapping lives."""
        return np.frombuffer(self.store.view(), dtype=np.uint8)

    def _scratch_buffer(self) -> "np.ndarray[Any, np.dtype[np.uint8]]":
        if self._scratch is None:
            self._scratch = np.empty(DEFAULT_CHUNK_BYTES, dtype=np.uint8)
        return self._scratch

    def _root(self) -> bytes:
        """The page root of the staged state (hashing the pages still unknown first)."""
        self._pages.refresh(self._staged(), None, self._scratch_buffer())
        return self._pages.root()

    def _size_limit(self) -> int:
        """Largest state a chunk may announce: the ``max_state_size`` given to this
        session, else the offered size grown at most 2x or by 1 GiB (WebAssembly memory
        grows), never past the bound on offers (see the class)."""
        if self._explicit_max:
            return self._explicit_max
        announced = self.offer.state_size if self.offer is not None else 0
        return min(max(2 * announced, announced + (1 << 30)), self.max_state_size)

    def _need_open(self) -> Offer:
        if self.offer is None:
            raise InvalidStateError("no migration has been offered to this receiver")
        if self.completed or self.failed:
            raise InvalidStateError("this migration is already finished")
        return self.offer

    def _audit(self, event: AuditEventType, details: str) -> None:
        offer = self.offer
        assert offer is not None
        self.validator.audit_log.log(AuditEntry.new(offer.migration_id, offer.agent_id, event, details, True))


def _anything(req: AgentRequirements) -> NodeCapabilities:
    """A node that satisfies ``req`` (when the receiver sets no capabilities)."""
    return NodeCapabilities(
        architectures=[req.architecture] if req.architecture else [],
        available_memory=req.required_memory,
        available_storage=req.required_storage,
        wasm_features=list(req.required_wasm_features),
        max_state_size=req.state_size,
        version=req.version,
        min_compatible_version=req.version,
    )


def prefault_pays() -> bool:
    """Whether prefaulting the staging on a helper thread pays here: only with a core to
    spare for it. It moves the kernel's zeroing of fresh pages off the receiving thread,
    not the work itself. With the receiving thread, the network's kernel work (on
    localhost: the sender) and the helper on two cores, a 1 GiB stop-and-copy over
    localhost took 361-436 and 397-426 ms (min-median of 16, two receivers each way)
    with it, 308-388 and 334-413 ms without it (though with a longer tail: the kernel's
    zeroing of fresh pages, slow at times in a VM, is then on the receiving thread)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return cpus >= 4


_MADV_POPULATE_WRITE = 23  # Linux 5.14+: fault pages in writable without writing them
_libc: List[Any] = []


def _populate(array: "np.ndarray[Any, np.dtype[np.uint8]]", lo: int, hi: int) -> bool:
    """``madvise(MADV_POPULATE_WRITE)`` over the whole pages of ``array[lo:hi]`` (the GIL
    is released during the call); False when the system does not support it."""
    if not _libc:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            libc.madvise.restype = ctypes.c_int
            _libc.append(libc)
        except (OSError, AttributeError):
            _libc.append(None)
    libc = _libc[0]
    if libc is None:
        return False
    base = int(array.ctypes.data)
    start = -(-(base + lo) // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the range
    end = (base + hi) // mmap.PAGESIZE * mmap.PAGESIZE
    if end <= start:
        return True
    return int(libc.madvise(start, end - start, _MADV_POPULATE_WRITE)) == 0
