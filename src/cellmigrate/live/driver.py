"""Pre-copy live migration (QEMU's algorithm), with the result proven byte for byte.

:class:`LiveMigration` drives one running agent over a :class:`~cellmigrate.live.channel.Channel`:

1. round 0 sends the whole state (zero pages are never sent: the receiver's staging
   starts zero-filled; the rest LZ4-compressed when that pays) while the agent runs;
2. delta rounds send the pages written since the previous round's copy, measuring the
   agent's dirty rate and the link's bandwidth, until the final round is expected to
   fit ``downtime_limit`` (0.3 s, QEMU's default), or after ``max_rounds``, or once
   rounds stop shrinking;
3. ``pause()``, the final round (plus the agent's ``extra`` blob), and the commit: the
   target checks that its staged state has the source's page root (``xxh3_128_tree``
   with 4 KiB leaves, :mod:`cellmigrate.live.leaves`), adopts it and resumes.

Both sides keep a :class:`~cellmigrate.live.leaves.PageTable`, the XXH3-128 digest of
every page the receiver has committed. The sender's advances only on acknowledgement,
with the digests of the pages as they were copied (never re-read); a round finds its
dirty pages by hashing the live state once and comparing with the table, and ends with
both sides' roots compared. In the final round the sender's root is the paused state's
as scanned and the receiver hashes only the pages it just staged, so the pause costs one
read of the state, the dirty pages' transfer and a few milliseconds. Once the target
runs, the summary's ``digest`` (the state's ``xxh3_128_tree``, what ``cellmigrate
checksum`` prints) is computed from the paused source, outside the pause.

On any failure before the commit the source agent resumes, the receiver discards what
it staged (the target's own state was never touched), and both audit logs say why.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import numpy.typing as npt

from .._buffers import as_bytes_view
from .._ids import IdLike, to_id
from .._tree import tree_digest
from ..audit import AuditEntry, AuditEventType
from ..checksum import PAGE_SIZE
from ..errors import CellError, CorruptDataError, MigrationFailedError
from ..progress import MigrationProgressTracker, ProgressCallback
from ..recovery import MigrationError, MigrationRecoveryManager
from ..validation import AgentRequirements, MigrationValidator, VerificationResult
from .agent import MAX_EXTRA_BYTES, SourceAgent
from .channel import Channel
from .errors import OutcomeUnknownError, error_type
from .leaves import PageTable, page_digests, page_root
from .page_cache import DEFAULT_PAGE_CACHE_BYTES, PageCache, page_cache_size_ok
from .pages import DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES, BufferPool, Chunk, scan_chunks
from .paused import PausedScan
from .session import Offer

__all__ = ["DEFAULT_DOWNTIME_LIMIT", "DEFAULT_MAX_ROUNDS", "RoundStats", "LiveMigrationSummary", "LiveMigration"]

#: Seconds the agent may stay paused (QEMU's default ``downtime-limit``, 300 ms).
DEFAULT_DOWNTIME_LIMIT = 0.3
#: Pre-copy rounds before the final one at most (round 0 included).
DEFAULT_MAX_ROUNDS = 30
# A PAGES chunk costs both ends about this much a page (encode ~0.6 us, the receiver's
# copy of its pages and decode ~0.5 us; 253 random pages, 25 cached): worth it when the
# cached pages' saved bytes cross the link in more time than that, i.e. when more than
# cost * link rate / 4096 of the chunk's pages are cached (3% at 1 Gb/s, 15% at 600 MB/s),
# and always when 90% are (it would take a link of over 3.7 GB/s for that not to pay).
_PAGES_COST_S = 1e-6
_PAGES_ALWAYS = 0.9
# Wire bytes a round must carry to measure the link's rate.
_LINK_SAMPLE = 1 << 20
# A round "shrinks" when it carries less than this fraction of the previous one's bytes;
# two rounds in a row that do not mean the agent dirties as fast as the link drains.
_SHRINK = 0.9


@dataclass(frozen=True)
class RoundStats:
    """One round. Bytes are raw page bytes unless named ``wire``; rates are bytes/second.

    ``dirty_rate`` is the agent's estimated write rate (pages found dirty / time since the
    previous round's scan; 0 for round 0), ``bandwidth`` the rate pages crossed the link,
    ``expected_downtime_s`` the predicted pause if the next round were the final one,
    ``actual_downtime_s`` (final round only) the pause from ``pause()`` to the target resumed.
    """

    round: int
    state_size: int
    dirty_pages: int
    dirty_bytes: int
    wire_bytes: int
    chunks: int
    duration_s: float
    scan_s: float
    send_s: float
    verify_s: float
    dirty_rate: float
    bandwidth: float
    expected_downtime_s: float
    final: bool = False
    actual_downtime_s: Optional[float] = None


@dataclass(frozen=True)
class LiveMigrationSummary:
    """What a completed live migration did (``to_dict`` gives the ``--json`` form).

    ``digest`` is the final state's ``xxh3_128_tree``; ``proof`` the page root the target
    checked before it resumed (see :mod:`cellmigrate.live.leaves`). Outside a
    stop-and-copy, ``digest`` is hashed from the source after the commit (no downtime for
    it): it is the proven state's only when the source's ``pause()`` really stopped its
    writes, as the :class:`~cellmigrate.live.SourceAgent` contract asks.
    """

    migration_id: bytes
    agent_id: bytes
    state_size: int
    rounds: Tuple[RoundStats, ...]
    wire_bytes: int
    page_bytes: int
    duration_s: float
    downtime_s: float
    stop_reason: str
    digest: bytes
    extra_bytes: int = 0
    resent_chunks: int = 0
    proof: bytes = b""

    @property
    def transfer_ratio(self) -> float:
        """Wire bytes sent over the final state size (1.0: as much as the state itself)."""
        return self.wire_bytes / self.state_size if self.state_size else 0.0

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: ids and digest in hex, rounds as dicts."""
        out = asdict(self)
        out["migration_id"] = str(uuid.UUID(bytes=self.migration_id))
        out["agent_id"] = str(uuid.UUID(bytes=self.agent_id))
        out["digest"] = self.digest.hex()
        out["proof"] = self.proof.hex()
        out["transfer_ratio"] = self.transfer_ratio
        out["rounds"] = [asdict(r) for r in self.rounds]
        return out


U8Array = npt.NDArray[np.uint8]


def _state_array(buffer: Any) -> U8Array:
    return np.frombuffer(as_bytes_view(buffer, "agent state"), dtype=np.uint8)


class LiveMigration:
    """Move a running :class:`~cellmigrate.live.agent.SourceAgent` to a target over ``channel``.

    >>> from cellmigrate.live import BufferSource, BufferTarget, MemoryStore, InProcessChannel, ReceiverSession
    >>> state = bytearray(b"agent memory" * 1000)
    >>> target = BufferTarget()
    >>> channel = InProcessChannel(ReceiverSession(MemoryStore(), target))
    >>> summary = LiveMigration(BufferSource(state), channel).run()
    >>> target.state == state, target.resumed, summary.stop_reason
    (True, True, 'downtime')

    ``max_rounds`` bounds the pre-copy rounds (0: pause first and copy once, for a
    source that is not running). ``compress`` sends chunks as LZ4 when that pays and, with
    a ``page_cache_bytes`` cache (QEMU's XBZRLE cache; 64 MiB by default, never more than
    the state, reserved at the first delta round; 0: none), pages dirtied again as XZR
    pages over the copy sent before (:mod:`~cellmigrate.live.page_cache`);
    ``compress=False`` sends every page raw (no LZ4, no XZR pages).
    ``progress`` receives the migration's progress events (TRANSFER_PROGRESS per chunk,
    VALIDATING per round with its figures, then COMPLETED or FAILED); ``on_round`` gets
    each :class:`RoundStats` as it completes. ``validator`` supplies the audit log
    (a fresh in-memory one by default), ``recovery`` records the failure for a retry policy.
    """

    def __init__(
        self,
        source: SourceAgent,
        channel: Channel,
        *,
        agent_id: Optional[IdLike] = None,
        migration_id: Optional[IdLike] = None,
        requirements: Optional[AgentRequirements] = None,
        downtime_limit: float = DEFAULT_DOWNTIME_LIMIT,
        max_rounds: int = DEFAULT_MAX_ROUNDS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        compress: bool = True,
        page_cache_bytes: int = DEFAULT_PAGE_CACHE_BYTES,
        validator: Optional[MigrationValidator] = None,
        recovery: Optional[MigrationRecoveryManager] = None,
        progress: Optional[ProgressCallback] = None,
        on_round: Optional[Callable[[RoundStats], None]] = None,
        threads: Optional[int] = None,
    ) -> None:
        if downtime_limit <= 0:
            raise ValueError(f"downtime_limit must be > 0 seconds, got {downtime_limit}")
        if max_rounds < 0:
            raise ValueError(f"max_rounds must be >= 0, got {max_rounds}")
        if not 4096 <= chunk_bytes <= MAX_CHUNK_BYTES:
            raise ValueError(f"chunk_bytes must be in 4096..{MAX_CHUNK_BYTES}, got {chunk_bytes}")
        if isinstance(page_cache_bytes, bool) or not isinstance(page_cache_bytes, int):
            raise TypeError(f"page_cache_bytes must be an int, not {type(page_cache_bytes).__name__}")
        if not page_cache_size_ok(page_cache_bytes):
            raise ValueError(f"page_cache_bytes must be 0 (none) or 4 KiB .. 64 GiB, got {page_cache_bytes}")
        self.source = source
        self.channel = channel
        self.agent_id = to_id(agent_id, "agent_id") if agent_id is not None else uuid.uuid4().bytes
        self.migration_id = to_id(migration_id, "migration_id") if migration_id is not None else uuid.uuid4().bytes
        self.requirements = requirements
        self.downtime_limit = float(downtime_limit)
        self.max_rounds = int(max_rounds)
        self.chunk_bytes = int(chunk_bytes)
        self.compress = compress
        self.validator = validator if validator is not None else MigrationValidator()
        self.recovery = recovery
        self.progress = progress
        self.on_round = on_round
        self.threads = threads
        self.rounds: List[RoundStats] = []
        # What the receiver holds, page by page (its staging starts zero-filled).
        self._table = PageTable(zero_filled=True)
        self._next_seq = 1
        self._page_bytes = 0
        self._wire_bytes = 0
        self._tracker: Optional[MigrationProgressTracker] = None
        self._final = False
        self._pool = BufferPool(self.chunk_bytes)
        # The last copy sent of pages dirtied in delta rounds (XZR bases), and the state
        # size they were sent at: a resize may move or zero the receiver's pages.
        self._cache = PageCache(page_cache_bytes) if compress and page_cache_bytes else None
        self._cache_size = -1
        # The link's rate in wire bytes/s, as the last round with enough bytes measured it
        # (0: not known yet): it sets how many cached pages make a PAGES chunk worth it.
        self._link_rate = 0.0
        # Stop-and-copy: the summary's tree digest, hashed with the final scan.
        self._tree: Optional[bytes] = None

    # -- the page table advances only on acknowledgement ------------------------------

    def _on_commit(self, chunk: Chunk) -> None:
        pages = chunk.pages
        if pages is None:
            raise MigrationFailedError(f"chunk {chunk.seq} acknowledged twice")
        # In the final round the proof is the paused state's root as scanned: the table is
        # done with. Before, the receiver now holds these copies: record their digests.
        if len(chunk.indices) and not self._final:
            digests = chunk.digests if chunk.digests is not None else page_digests(pages, self.threads)
            self._table.set(chunk.indices, digests)
        chunk.pages = None  # the copy is no longer needed: its buffer serves the next chunk
        if not self._final:
            self._pool.give(pages)

    # -- one round -------------------------------------------------------------------

    def _round(
        self, round_no: int, final: bool, previous_scan: Optional[float]
    ) -> Tuple[RoundStats, bytes, float, U8Array]:
        t0 = time.monotonic()
        state = _state_array(self.source.state())
        self._table.resize(state.nbytes, zero_filled=True)  # the receiver grows its staging with zeros
        self._final = final
        # The final round hashes the paused state as it streams (see PausedScan): its page
        # digests are the proof, and a stop-and-copy hashes the summary's tree digest with
        # them, on a helper thread ahead of the sending one (it sends nearly every page).
        paused = PausedScan(state, self.threads, tree=self.max_rounds == 0) if final else None
        try:
            return self._stream_round(round_no, final, previous_scan, t0, state, paused)
        finally:
            if paused is not None:
                paused.close()  # before the source may resume (and change or move the state)

    def _stream_round(
        self,
        round_no: int,
        final: bool,
        previous_scan: Optional[float],
        t0: float,
        state: U8Array,
        paused: Optional[PausedScan],
    ) -> Tuple[RoundStats, bytes, float, U8Array]:
        size = state.nbytes
        table, threads = self._table, self.threads
        if self._cache is not None and size != self._cache_size:
            self._cache.clear()
            self._cache_size = size

        def find(lo: int, hi: int) -> "npt.NDArray[np.int64]":
            # The region's page digests (while the agent runs: read now, one region at a
            # time, so dirty pages are copied soon after), compared with what the receiver holds.
            first = lo // PAGE_SIZE
            digests = paused.region(lo, hi) if paused is not None else page_digests(state[lo:hi], threads)
            return table.differing(first, digests) + first

        pages = page_bytes = wire = chunks = 0
        send_s = 0.0
        for chunk in scan_chunks(
            state,
            None,
            round_no=round_no,
            first_seq=self._next_seq,
            chunk_bytes=self.chunk_bytes,
            compress=self.compress,
            threads=self.threads,
            stable=final,
            pool=self._pool,
            find=find,
            known=paused.digests if paused is not None else None,  # chunk digests from the scan: no second hashing pass
            cache=self._cache,
            cache_min_hits=min(_PAGES_COST_S * self._link_rate / PAGE_SIZE, _PAGES_ALWAYS),
        ):
            self._next_seq = chunk.seq + 1
            pages += len(chunk.indices)
            page_bytes += chunk.raw_len
            wire += chunk.wire_len
            chunks += 1
            ts = time.monotonic()
            self.channel.send_chunk(chunk)
            send_s += time.monotonic() - ts
            self._page_bytes += chunk.raw_len
            self._wire_bytes += chunk.wire_len
            if self._tracker is not None:
                self._tracker.update_transfer_progress(self._wire_bytes)
        t_sent = time.monotonic()
        theirs = self.channel.end_round(round_no)  # every chunk acknowledged: the table is complete
        ours = page_root(paused.digests, size) if paused is not None else table.root()
        if paused is not None and paused.tree:
            self._tree = paused.tree_digest()
        if theirs != ours:
            raise CorruptDataError(
                f"after round {round_no} the receiver's digest {theirs.hex()} differs from the sender's {ours.hex()}"
            )
        t1 = time.monotonic()
        duration = t1 - t0
        scan_s = max(t_sent - t0 - send_s, 0.0)
        verify_s = t1 - t_sent
        since = t0 - previous_scan if previous_scan is not None else 0.0
        dirty_rate = page_bytes / since if round_no > 0 and since > 0 else 0.0
        bandwidth = page_bytes / (send_s + verify_s) if send_s + verify_s > 0 else float("inf")
        if wire >= _LINK_SAMPLE and send_s + verify_s > 0:
            self._link_rate = wire / (send_s + verify_s)
        # If this were the last pre-copy round: the agent keeps writing while it ran, and
        # the final round must scan the whole state again, ship that, and prove it.
        remaining = dirty_rate * duration
        link = bandwidth if bandwidth > 0 else float("inf")
        expected = scan_s + remaining / link + verify_s if round_no > 0 else float("inf")
        stats = RoundStats(
            round=round_no,
            state_size=size,
            dirty_pages=pages,
            dirty_bytes=page_bytes,
            wire_bytes=wire,
            chunks=chunks,
            duration_s=duration,
            scan_s=scan_s,
            send_s=send_s,
            verify_s=verify_s,
            dirty_rate=dirty_rate,
            bandwidth=bandwidth,
            expected_downtime_s=expected,
            final=final,
        )
        return stats, ours, t0, state

    def _report(self, stats: RoundStats) -> None:
        self.rounds.append(stats)
        if self._tracker is not None:
            self._tracker.report_validating(
                f"round {stats.round}{' (final)' if stats.final else ''}: {stats.dirty_pages} pages, "
                f"{stats.wire_bytes} bytes sent in {stats.duration_s:.3f} s; dirty rate {stats.dirty_rate / 1e6:.1f} MB/s, "
                f"bandwidth {stats.bandwidth / 1e6:.1f} MB/s, expected downtime {stats.expected_downtime_s:.3f} s"
            )
        if self.on_round is not None:
            self.on_round(stats)

    def _stop_reason(self, stats: RoundStats) -> Optional[str]:
        rounds = self.rounds
        if stats.round > 0 and stats.expected_downtime_s <= self.downtime_limit:
            return "downtime"
        if len(rounds) >= self.max_rounds:
            return "max_rounds"
        if len(rounds) >= 3 and all(
            rounds[-k].dirty_bytes > _SHRINK * rounds[-k - 1].dirty_bytes for k in (1, 2)
        ):
            return "not_shrinking"
        return None

    # -- the whole migration ----------------------------------------------------------

    def _audit(self, event: AuditEventType, details: str, success: bool = True) -> None:
        self.validator.audit_log.log(AuditEntry.new(self.migration_id, self.agent_id, event, details, success))

    def run(self) -> LiveMigrationSummary:
        """Migrate; returns the summary once the target runs the agent.

        Raises a :class:`~cellmigrate.errors.CellError` subclass on failure, after the
        source resumed (except :class:`~cellmigrate.live.errors.OutcomeUnknownError`,
        where the target may already run the agent and the source stays paused).
        """
        mid, aid = self.migration_id, self.agent_id
        log = self.validator.audit_log
        started = time.monotonic()
        size = as_bytes_view(self.source.state(), "agent state").nbytes
        self._tracker = MigrationProgressTracker(aid, size, self.progress)
        self._tracker.report_started()
        log.log_start(mid, aid)
        paused = committing = False
        try:
            requirements = self.requirements or AgentRequirements(state_size=size)
            committed = self.channel.open(Offer(mid, aid, requirements, size), self._on_commit)
            if committed:
                raise MigrationFailedError(f"the receiver already holds {committed} chunks of a new migration")
            self._audit(AuditEventType.TRANSFER_STARTED, f"Live migration started: {size} bytes")
            previous: Optional[float] = None
            round_no = 0
            # max_rounds=0: stop-and-copy (a source that is not running: one round, paused).
            reason: Optional[str] = "stop_and_copy" if self.max_rounds == 0 else None
            while reason is None:
                stats, _, previous, _ = self._round(round_no, False, previous)
                self._report(stats)
                reason = self._stop_reason(stats)
                round_no += 1
            # Paused from the moment pause() starts: a pause that fails or is interrupted
            # half-way (a command that stopped the writer, then failed) is resumed too;
            # the downtime counts the pause's own time.
            paused = True
            t_pause = time.monotonic()
            self.source.pause()
            stats, proof, _, final_state = self._round(round_no, True, previous)
            extra = bytes(self.source.extra())
            if len(extra) > MAX_EXTRA_BYTES:
                raise MigrationFailedError(f"agent extra is {len(extra)} bytes; the limit is {MAX_EXTRA_BYTES}")
            committing = True
            self.channel.commit(proof, extra)
            downtime = time.monotonic() - t_pause
            stats = RoundStats(**{**asdict(stats), "actual_downtime_s": downtime})
            self._report(stats)
        except BaseException as exc:
            self._fail(exc, paused, committing)
            if isinstance(exc, CellError) or not isinstance(exc, Exception):
                raise
            raise MigrationFailedError(f"live migration failed: {exc}") from exc
        final_size = stats.state_size
        # The target runs; the source stays paused for good (never resumed after success),
        # so its state is still the one proven: its tree digest costs no downtime here.
        digest = self._tree if self._tree is not None else tree_digest(as_bytes_view(final_state), self.threads)
        log.log_verification(
            mid,
            aid,
            VerificationResult(
                True,
                True,
                True,
                True,
                [
                    f"Size verified: {final_size} bytes",
                    f"Target proved the digest (xxh3_128_tree of 4 KiB pages) {proof.hex()}",
                    f"State digest (xxh3_128_tree): {digest.hex()}",
                ],
                True,
            ),
        )
        self._audit(
            AuditEventType.TRANSFER_COMPLETED,
            f"{len(self.rounds)} rounds, {self._wire_bytes} bytes sent, downtime {downtime:.3f} s",
        )
        log.log_completion(mid, aid, True, f"Live migration completed: {final_size} bytes, stopped on {reason}")
        self._tracker.report_completed()
        self.channel.close()
        return LiveMigrationSummary(
            migration_id=mid,
            agent_id=aid,
            state_size=final_size,
            rounds=tuple(self.rounds),
            wire_bytes=self._wire_bytes,
            page_bytes=self._page_bytes,
            duration_s=time.monotonic() - started,
            downtime_s=downtime,
            stop_reason=reason,
            digest=digest,
            extra_bytes=len(extra),
            resent_chunks=int(getattr(self.channel, "resent_chunks", 0)),
            proof=proof,
        )

    def _fail(self, exc: BaseException, paused: bool, committing: bool = False) -> None:
        """Resume the source (unless the outcome is unknown), tell the target, log it all.

        The source resumes first: no later step (an audit sink that is full, locked or
        gone, a channel or progress callback that raises) can leave it paused. Each step is
        guarded; their own errors are attached to ``exc`` as notes, ``exc`` stays the one
        raised. An interrupt (not an ``Exception``) during the commit leaves the outcome
        unknown too, so the source stays paused then.
        """
        mid, aid = self.migration_id, self.agent_id
        log = self.validator.audit_log
        message = str(exc) or ("interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__)
        unknown = isinstance(exc, OutcomeUnknownError) or (committing and not isinstance(exc, Exception))

        def guarded(what: str, step: Callable[..., Any], *args: Any) -> None:
            try:
                step(*args)
            except Exception as step_exc:  # the original failure stays the one raised
                _add_note(exc, f"cellmigrate: {what} failed too: {type(step_exc).__name__}: {step_exc}")

        resume_error: Optional[Exception] = None
        if paused and not unknown:
            try:
                self.source.resume()
            except Exception as resume_exc:
                resume_error = resume_exc
        if not unknown:
            guarded("aborting the receiver", self.channel.abort, message)
        guarded("closing the channel", self.channel.close)
        if paused and not unknown:
            guarded("the audit log", log.log_rollback, mid, aid, True, True, f"Resuming the source agent: {message}")
            if resume_error is None:
                guarded("the audit log", log.log_rollback, mid, aid, False, True, "Source agent resumed; target state unchanged")
            else:
                guarded("the audit log", log.log_rollback, mid, aid, False, False, f"Source agent did not resume: {resume_error}")
        elif unknown:
            guarded(
                "the audit log", log.log_rollback, mid, aid, False, False,
                "Source agent left paused: the outcome of the commit is unknown (the target may have resumed it)",
            )
        guarded("the audit log", log.log_completion, mid, aid, False, f"Live migration failed: {message}")
        if self._tracker is not None:
            guarded("the progress callback", self._tracker.report_failed, message)
        if self.recovery is not None:
            guarded("the recovery manager", self.recovery.record_failure, MigrationError(error_type(exc), message, aid))


def _add_note(exc: BaseException, note: str) -> None:
    """``exc.add_note(note)`` (Python 3.11+; before, the same ``__notes__`` list, not printed)."""
    try:
        add = getattr(exc, "add_note", None)
        if add is not None:
            add(note)
        else:
            notes = getattr(exc, "__notes__", None)
            if not isinstance(notes, list):
                notes = []
                setattr(exc, "__notes__", notes)
            notes.append(note)
    except Exception:  # an exception type that takes no attributes: the note is lost, not the error
        pass
