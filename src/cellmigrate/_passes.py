"""The delta passes: one read of the data for page scan, checksum and digest, on every core.

``DeltaSnapshot.create`` compares two states page by page, checksums the new one and
hashes it; ``apply`` checksums and hashes the would-be result (base + the delta's pages)
without writing it. Each pass reads every byte once, in cache-sized chunks, fusing the
kernels while a chunk is in cache, and spreads over every core:

* with a tree digest (``xxh3_128_tree``, the default) or none, the fused leaf kernels
  compare, copy, checksum and hash 16 MiB chunks on threads of their own, inside one
  GIL-free call for the whole pass (:func:`_scan_fused`, :meth:`Result.fused`); without
  them (Python path) the state is cut into leaf-aligned spans, one per thread of the
  shared pool, and the leaf tables join in order (:func:`scan`, :meth:`Result.checks`);
* with a sequential digest (plain XXH3-128, BLAKE3) the calling thread hashes in order
  while a helper thread checks chunks just ahead of it (:class:`_Claims`).

Progress callbacks (:func:`byte_reporter`) always run on the calling thread.
"""

from __future__ import annotations

import bisect
import inspect
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

import numpy as np
import numpy.typing as npt

from . import _xxh3
from ._backend import PURE_PYTHON, kernels
from ._parallel import PARALLEL_MIN_BYTES, max_threads, run_spans
from ._tree import LEAF_SIZE
from ._types import BufferLike
from .checksum import PAGE_SIZE, Hasher, simple_checksum
from .progress import ProgressEventKind, byte_progress

__all__ = [
    "Overlay",
    "scatter",
    "ProgressCallback",
    "Result",
    "Scan",
    "before_end",
    "byte_reporter",
    "scan",
    "span_reporters",
    "takes_done_total",
]

_MASK32 = 0xFFFFFFFF

#: Internal form of progress: ``report(bytes_done, bytes_total)``, called from the calling
#: thread between chunks. Callers pass either that or an event callback (see
#: :func:`byte_reporter`).
ProgressCallback = Callable[[int, int], None]


def takes_done_total(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` wants ``(done, total)``: exactly two required positional parameters."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: treat as an event callback
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 2


def byte_reporter(
    progress: Optional[Callable[..., Any]], agent_id: bytes, kind: ProgressEventKind
) -> Optional[ProgressCallback]:
    """The ``(done, total)`` reporter for ``progress``.

    A callable taking two positional arguments gets byte counts as they are; any other
    callable is an event callback (SPEC: the same callbacks as
    :class:`~cellmigrate.MigrationProgressTracker`) and gets ``kind`` events whose percent
    only moves forward, through :func:`~cellmigrate.byte_progress`.
    """
    if progress is None:
        return None
    if not callable(progress):
        raise TypeError(f"progress must be callable, not {type(progress).__name__}")
    if takes_done_total(progress):
        return cast(ProgressCallback, progress)
    return byte_progress(progress, agent_id, kind)


#: Bytes per fused step: small enough that a chunk the page comparison (or the checksum)
#: just read from memory is still in this core's cache when the hasher reads it again,
#: big enough that the Python loop costs nothing next to the kernels.
_CHUNK = 1 << 20
#: From this many pages in a 1 MiB chunk on, the chunk is laid out in a scratch buffer
#: and hashed in one call instead of one call per clean run and page (see
#: ``Overlay.check_chunk``): one extra pass over a cached MiB against two hasher calls
#: per page. Measured on a 1 GiB apply at 10% dirty (26 pages a chunk; busy 2-vCPU VM,
#: best of 3): threshold 4: 344 ms, 8: 339, 16: 236, 64 (runs): 357, never: 407.
_SCRATCH_PAGES = 16
#: Progress is reported about this often (bytes).
_REPORT = 16 << 20
#: With a strong digest the hasher is sequential. On big states the calling thread
#: hashes chunk by chunk while a helper thread checks (compares/checksums) chunks just
#: ahead of it, at most ``_HELP_WINDOW`` chunks ahead so the hasher finds them in the
#: shared cache; a chunk the helper has not reached is checked by the hashing thread
#: right after hashing it (from its own cache). Measured on the 2-vCPU dev VM against a
#: fixed split and a strict pipeline: this was the best or near it both with the second
#: vCPU free and with it busy, because the split adapts to the CPU the helper gets.
#: 1 MiB chunks (window 16 MiB) beat 512 KiB (window 32) on a 1 GiB apply, best of 7,
#: three alternations: 10.1-10.4 vs 9.1-9.5 GB/s (plain XXH3-128 alone: 11.7-11.9);
#: create was unchanged (7.7-8.3 either way).
_HELP_CHUNK = 1 << 20
_HELP_WINDOW = 16
#: Zeros for the part of a pass past the end of a short base. numpy's zeros come from
#: calloc: untouched, the whole buffer maps the kernel's one zero page, so it costs no
#: memory and reads from cache.
_ZERO_BUFFER = np.zeros(_REPORT, dtype=np.uint8)


def _plan(total: int, align: int = PAGE_SIZE) -> List[Tuple[int, int]]:
    """``align``-aligned spans of ``[0, total)``, one per thread (one span: the calling thread only)."""
    threads = max_threads()
    if threads <= 1 or total < PARALLEL_MIN_BYTES:
        return [(0, total)]
    per_thread = -(-total // threads)
    step = -(-per_thread // align) * align
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


def _spans(total: int, hasher: Optional[Hasher]) -> List[Tuple[int, int]]:
    """How a pass over ``total`` bytes splits over threads: pages without a hasher, 1 MiB
    leaves with a tree hasher, not at all with a sequential one."""
    if hasher is None:
        return _plan(total)
    return _plan(total, LEAF_SIZE) if hasher.splittable else [(0, total)]


def _sinks(hasher: Optional[Hasher], spans: List[Tuple[int, int]]) -> Dict[int, Optional[Hasher]]:
    """The hasher each span feeds: the one given, or with several spans a fork per span."""
    if hasher is None or len(spans) == 1:
        return {lo: hasher for lo, _ in spans}
    return {lo: hasher.fork() for lo, _ in spans}


def _join(hasher: Optional[Hasher], sinks: Dict[int, Optional[Hasher]], spans: List[Tuple[int, int]]) -> None:
    if hasher is not None and len(spans) > 1:
        hasher.join([cast(Hasher, sinks[lo]) for lo, _ in spans])


def span_reporters(
    progress: Optional[ProgressCallback], spans: List[Tuple[int, int]]
) -> Dict[int, Optional[ProgressCallback]]:
    """Per-span ``(end, total)`` reporters for spans run on several threads.

    Callbacks run on the calling thread only (as documented), which runs the first span:
    every span records how far it got, and the first one reports the sum, so a bar
    moves with all threads' work instead of stopping at the first span's share.
    """
    if progress is None or len(spans) == 1:
        return {lo: progress for lo, _ in spans}
    report_to: ProgressCallback = progress
    done = {lo: 0 for lo, _ in spans}
    first = spans[0][0]

    def reporter(lo: int) -> ProgressCallback:
        def report(end: int, total: int) -> None:
            done[lo] = end - lo
            if lo == first:
                report_to(sum(done.values()), total)

        return report

    return {lo: reporter(lo) for lo, _ in spans}


def _paired() -> bool:
    """Whether a big hashing pass gets a second thread (the checks run beside the hasher)."""
    return max_threads() > 1


T = TypeVar("T")
L = TypeVar("L")


class _Claims:
    """Chunks of a pass that a hashing thread (the lead) walks in order while a helper
    thread checks chunks a little ahead of it. Each chunk is checked by whoever claims it
    first: the helper claims the next unclaimed chunk (at most ``window`` chunks ahead of
    the lead, so the lead finds the bytes in the shared cache); the lead checks a chunk
    itself, right after hashing it, when the helper has not got there. So the split
    adapts: with a free core the helper takes most chunks, without one the lead does.
    """

    def __init__(self, count: int, window: int) -> None:
        self._cond = threading.Condition()
        self._next = 0  # first unclaimed chunk
        self._lead = 0  # chunk the lead is at
        self._count = count
        self._window = window
        self._helper_waiting = False
        self._stopped = False
        self._failed = False
        self._done: set[int] = set()  # chunks the helper has finished

    def lead_at(self, k: int) -> bool:
        """The lead reached chunk ``k``: True when it must check the chunk itself."""
        with self._cond:
            self._lead = k
            if self._helper_waiting:
                self._cond.notify()
            if self._next <= k:
                self._next = k + 1
                return True
            return False

    def helper_claim(self) -> Optional[int]:
        """The next chunk for the helper, or None when every chunk is claimed."""
        with self._cond:
            while not self._stopped and self._next < self._count:
                if self._next - self._lead <= self._window:
                    k = self._next
                    self._next += 1
                    return k
                self._helper_waiting = True
                self._cond.wait()
                self._helper_waiting = False
            return None

    def helper_done(self, k: int) -> None:
        """The helper finished chunk ``k`` (its results are stored for the lead)."""
        with self._cond:
            self._done.add(k)
            self._cond.notify_all()

    def wait_done(self, k: int) -> None:
        """Block the lead until the helper has finished chunk ``k`` (which it claimed).

        Raises ``RuntimeError`` when the helper failed instead (its own exception is
        raised from :func:`_with_helper`)."""
        with self._cond:
            while k not in self._done:
                if self._failed:
                    raise RuntimeError("the helper thread of a delta pass failed")
                self._cond.wait()
            self._done.discard(k)

    def fail(self) -> None:
        """The helper failed: wake a lead waiting for one of its chunks."""
        with self._cond:
            self._failed = True
            self._stopped = True
            self._cond.notify_all()

    def stop(self) -> None:
        """The lead is done (or failed): the helper claims nothing more."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()


def _with_helper(lead: Callable[[_Claims], L], helper: Callable[[_Claims], T], count: int) -> Tuple[L, T]:
    """Run ``lead`` on this thread and ``helper`` on the shared pool over ``count`` chunks."""
    claims = _Claims(count, _HELP_WINDOW)

    def run(who: int) -> Any:
        if who == 1:
            try:
                return helper(claims)
            except BaseException:
                claims.fail()
                raise
        try:
            return lead(claims)
        finally:
            claims.stop()

    # run_spans runs the first "span" on this thread and the second on the shared pool.
    first, second = run_spans(lambda who, _unused: run(who), [(0, 0), (1, 0)])
    return first, second


def _state_pages_checksum(view: memoryview, indices: npt.NDArray[np.int64]) -> int:
    """Sum of the positioned checksums of ``view``'s pages at ``indices`` (last may be short)."""
    return int(kernels.state_pages_checksum(view, indices, PAGE_SIZE)) if len(indices) else 0


def _pages_checksum(pages: Sequence[BufferLike], indices: npt.NDArray[np.int64]) -> int:
    """Sum of each page's checksum positioned at ``index * PAGE_SIZE``."""
    return int(kernels.pages_checksum(pages, indices, PAGE_SIZE)) if len(indices) else 0


def before_end(report: Optional[ProgressCallback]) -> Optional[ProgressCallback]:
    """``report`` held one byte short of the end: verification is not the finished apply."""
    if report is None:
        return None
    inner = report

    def held(done: int, total: int) -> None:
        inner(min(done, max(total - 1, 0)), total)

    return held


# --------------------------------------------------------------------------------------
# The bytes a pass checks: a base with pages laid over it
# --------------------------------------------------------------------------------------


class Overlay:
    """Bytes ``[0, total)`` of a base state with pages laid over it, never assembled.

    ``view`` is the base; past its end (a base shorter than ``total``) the bytes are
    zeros, and a longer base is cut at ``total``. Both passes check such bytes: ``create``
    the base with the dirty pages as it copied them (so a writer changing the live state
    meanwhile cannot make the delta disagree with its own checks), ``apply`` the base
    with the delta's pages. The checksum is linear in the bytes, so it is the base's
    minus the covered base pages' plus the pages' (positioned at ``index * PAGE_SIZE``);
    a streaming hasher is fed the clean runs as views of the base and the pages as they
    are, in order.
    """

    def __init__(self, view: memoryview, total: int) -> None:
        self.size = min(view.nbytes, total)
        self.view = view[: self.size] if view.nbytes > total else view
        self.total = total

    def base_checksum(self, lo: int, hi: int) -> int:
        """Positioned checksum of the base part of ``[lo, hi)`` (zeros past the base add nothing)."""
        if lo >= self.size:
            return 0
        return int(kernels.checksum(self.view[lo : min(hi, self.size)], lo))

    def base_view(self, lo: int, hi: int) -> memoryview:
        """The base's own bytes of ``[lo, hi)`` (short or empty past the end of a short base)."""
        return self.view[min(lo, self.size) : min(hi, self.size)]

    def check_chunk(
        self,
        hasher: Optional[Hasher],
        lo: int,
        hi: int,
        indices: npt.NDArray[np.int64],
        pages: Sequence[BufferLike],
        base_sum: Optional[int] = None,
    ) -> int:
        """Checksum of bytes ``[lo, hi)`` with ``pages`` (at ``indices``, the pages that
        start in the chunk, ascending) over the base; feeds ``hasher`` those bytes in order.

        With a hasher and many pages (``hi - lo`` at most 1 MiB), the chunk is laid out once
        in this thread's scratch buffer by a kernel (which checksums it) and hashed in one
        call: one call per clean run would cost more than the hashing. Otherwise the
        checksum is the base's (``base_sum`` when the caller has it) adjusted for the
        pages, and the hasher gets the clean runs as views of the base.
        """
        if hasher is not None and len(indices) >= _SCRATCH_PAGES:
            return self._hash_laid_out(hasher, lo, hi, indices * PAGE_SIZE, pages, _thread_scratch())
        if base_sum is None:
            base_sum = self.base_checksum(lo, hi)
        if hasher is not None:
            self.hash_span(hasher, lo, hi, (indices * PAGE_SIZE).tolist() if len(indices) else [], pages)
        return (base_sum + self.adjustment(indices, pages)) & _MASK32

    def base_chunk(self, lo: int, hi: int) -> memoryview:
        """The base's bytes ``[lo, hi)`` as one buffer: a view, shared zeros, or (for the
        one chunk that straddles the end of a short base) a padded copy."""
        if hi <= self.size:
            return self.view[lo:hi]
        if lo >= self.size:
            return _zeros(hi - lo)
        padded = bytearray(hi - lo)
        padded[: self.size - lo] = self.view[lo:]
        return memoryview(padded)

    def adjustment(self, indices: npt.NDArray[np.int64], pages: Sequence[BufferLike]) -> int:
        """The pages' checksums minus the base bytes they cover (``indices`` ascending)."""
        if not len(indices):
            return 0
        # Pages (partly) over base bytes; past the end of a short base there is nothing to take out.
        covered = indices if self.size == self.total else indices[indices * PAGE_SIZE < self.size]
        return (_pages_checksum(pages, indices) - _state_pages_checksum(self.view, covered)) & _MASK32

    def _hash_laid_out(
        self,
        hasher: Hasher,
        lo: int,
        hi: int,
        starts: npt.NDArray[np.int64],
        pages: Sequence[BufferLike],
        scratch: "_Scratch",
    ) -> int:
        """Lay bytes ``[lo, hi)`` out in ``scratch`` (a kernel, which checksums them), feed
        them to ``hasher`` in one call, and return their checksum."""
        n = hi - lo
        buf = scratch.get(n)
        checksum = int(kernels.overlay_checksum(self.base_view(lo, hi), lo, n, pages, starts - lo, buf))
        hasher.update(memoryview(buf)[:n])
        return checksum

    def hash_span(self, hasher: Hasher, lo: int, hi: int, starts: Sequence[int], pages: Sequence[BufferLike]) -> None:
        """Feed bytes ``[lo, hi)`` to ``hasher``: base runs, zeros, pages, in order.

        ``starts`` are the byte offsets of ``pages``, the pages that start in
        ``[lo, hi)``, ascending. A streaming hash gives the same digest however its input
        is split, so nothing is assembled: clean runs are passed as views of the base,
        except in a 1 MiB step with many pages, which is laid out in this thread's scratch
        buffer and hashed in one call. Besides costing more than the hashing, a call per
        page is a GIL hand-off per page for a hasher that releases the GIL: with another
        Python thread running (the agent itself), each one waits for that thread's switch
        interval, and a 64 MiB create with 16k dirty pages took 1.5 s instead of 25 ms."""
        kb = len(starts)
        if kb < _SCRATCH_PAGES:
            self._hash_runs(hasher, lo, hi, starts, pages)
            return
        scratch = _thread_scratch()
        at = np.asarray(starts, dtype=np.int64)
        k = 0
        a = lo
        while a < hi:
            # Steps end on absolute 1 MiB boundaries, which no page crosses (whatever lo is).
            b = min((a // _CHUNK + 1) * _CHUNK, hi)
            end = bisect.bisect_left(starts, b, k)
            if end - k >= _SCRATCH_PAGES:
                self._hash_laid_out(hasher, a, b, at[k:end], pages[k:end], scratch)
            else:
                self._hash_runs(hasher, a, b, starts[k:end], pages[k:end])
            k, a = end, b

    def _hash_runs(self, hasher: Hasher, lo: int, hi: int, starts: Sequence[int], pages: Sequence[BufferLike]) -> None:
        """:meth:`hash_span`'s bytes as one hasher call per clean run, zero run and page."""
        view, size = self.view, self.size
        k, kb = 0, len(starts)
        pos = lo
        while pos < hi:
            if k < kb and starts[k] == pos:
                page = pages[k]
                hasher.update(page)
                pos += len(cast(bytes, page))  # bytes or a 1-D byte view
                k += 1
                continue
            stop = starts[k] if k < kb else hi
            if pos < size:
                end = min(stop, size)
                hasher.update(view[pos:end])
                pos = end
            while pos < stop:
                end = min(stop, pos + _REPORT)
                hasher.update(_zeros(end - pos))
                pos = end


class _Scratch:
    """A thread's scratch buffer for laying a chunk out (:meth:`Overlay.check_chunk`,
    :meth:`Overlay.hash_span`), allocated on first use (a thread whose chunks all have few
    pages allocates nothing)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf: Optional[bytearray] = None

    def get(self, n: int) -> bytearray:
        if self._buf is None or len(self._buf) < n:
            self._buf = bytearray(n)
        return self._buf


_SCRATCHES = threading.local()


def _thread_scratch() -> "_Scratch":
    """This thread's :class:`_Scratch` (kept between passes: a fresh MiB per pass or step
    would cost its page faults every time)."""
    scratch: Optional[_Scratch] = getattr(_SCRATCHES, "scratch", None)
    if scratch is None:
        scratch = _SCRATCHES.scratch = _Scratch()
    return scratch


def _fused(hashing: bool) -> bool:
    """Whether the fused leaf kernels run (compiled kernels; XXH3 bound when ``hashing``)."""
    return not PURE_PYTHON and (not hashing or _xxh3.available())


def _zeros(n: int) -> memoryview:
    """``n`` zero bytes (a view of a shared buffer when it is big enough)."""
    if n <= _REPORT:
        return _ZERO_BUFFER.data[:n]
    return np.zeros(n, dtype=np.uint8).data


# --------------------------------------------------------------------------------------
# create: page comparison, page copies, checksum (+ digest) in one read of the data
# --------------------------------------------------------------------------------------


class Scan:
    """What a create pass found: the dirty pages as copied, and the checks of "base + copies".

    Attributes:
        indices: dirty page numbers, int64, ascending.
        pages: each dirty page's bytes (``bytes``; the last page of the state may be
            short), copied once from the new state when the scan found it.
        checksum: ``simple_checksum`` of the base with ``pages`` laid over it: the state
            the delta describes, whatever a writer did to the live state meanwhile.
        leaves: that state's ``xxh3_128_tree`` leaf digests when the pass hashed it with
            the tree digest (set by the caller from ``Hasher.leaves()``), else ``None``.
        xzr_hints: when asked of the fused pass, each page's XZR hint (uint16,
            ``kernels.PageArena.xzr_hints``) for :func:`~cellmigrate._pages.encode_batch`,
            else ``None``.
        fingerprints: when the pass was given the base's page fingerprints and read the
            new state alone, the XXH3-64 of each page as read (uint64, one a page), else
            ``None``.
        table_checksum: the checksum of the state the advanced table describes (the
            pages as read): :attr:`checksum`, or ``None`` when not known (the base was
            not what its table said under a copied page).
    """

    __slots__ = ("indices", "pages", "checksum", "leaves", "xzr_hints", "fingerprints", "table_checksum")

    def __init__(self, indices: npt.NDArray[np.int64], pages: List[bytes], checksum: int) -> None:
        self.indices = indices
        self.pages = pages
        self.checksum = checksum
        self.leaves: Optional[List[bytes]] = None
        self.xzr_hints: Optional[npt.NDArray[np.uint16]] = None
        self.fingerprints: Optional[npt.NDArray[np.uint64]] = None
        self.table_checksum: Optional[int] = checksum


_Chunk = Tuple[npt.NDArray[np.int64], List[bytes], int]
_NO_PAGES: _Chunk = (np.empty(0, dtype=np.int64), [], 0)


def _scan_chunk(base: Overlay, new: memoryview, lo: int, hi: int) -> _Chunk:
    """Dirty pages of ``new[lo:hi]`` (``lo`` page-aligned) against the base, copied, and
    the positioned checksum of the base's bytes of the chunk (not yet adjusted)."""
    chunk = new[lo:hi]
    # One pass over both: the kernel compares each block of the base with the new state
    # and checksums the *base* (which no one writes) while the block is in registers.
    idx, base_sum = kernels.dirty_pages_checksum(chunk, base.base_chunk(lo, hi), PAGE_SIZE, lo)
    if not len(idx):
        return _NO_PAGES[0], [], int(base_sum)
    # The one read of the dirty pages after the comparison: everything below (checksum,
    # digest, the delta's pages, the tracker's copy) uses these copies, never `new` again.
    pages: List[bytes] = kernels.gather_pages(chunk, idx, PAGE_SIZE)
    if lo:
        idx = idx + lo // PAGE_SIZE
    return idx, pages, int(base_sum)


def _check_scanned(base: Overlay, hasher: Optional[Hasher], lo: int, hi: int, found: _Chunk) -> _Chunk:
    """The scanned chunk with its checksum of "base + copies" (the hasher fed those bytes)."""
    idx, pages, base_sum = found
    return idx, pages, base.check_chunk(hasher, lo, hi, idx, pages, base_sum)


def _scan_alone(
    base: Overlay, new: memoryview, lo: int, hi: int, hasher: Optional[Hasher], progress: Optional[ProgressCallback]
) -> List[_Chunk]:
    """``[lo, hi)`` on one thread, chunk by chunk; each chunk is hashed (if asked) right
    after the comparison read it, from cache."""
    step = _CHUNK if hasher is not None else _REPORT
    found: List[_Chunk] = []
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        found.append(_check_scanned(base, hasher, a, b, _scan_chunk(base, new, a, b)))
        if progress is not None:
            progress(b, new.nbytes)
    return found


def _scan_claimed(
    base: Overlay, new: memoryview, hasher: Hasher, progress: Optional[ProgressCallback]
) -> List[_Chunk]:
    """Hash on this thread with a helper scanning and copying chunks ahead (see :class:`_Claims`).

    The lead hashes chunk ``k`` of "base + copies", so it needs chunk ``k``'s copies:
    it waits for the helper when the helper claimed ``k``, scans ``k`` itself otherwise."""
    n = new.nbytes
    step = _HELP_CHUNK
    count = -(-n // step)
    found: List[_Chunk] = [_NO_PAGES] * count

    def lead(claims: _Claims) -> None:
        reported = 0
        for k in range(count):
            a, b = k * step, min((k + 1) * step, n)
            if claims.lead_at(k):
                found[k] = _check_scanned(base, None, a, b, _scan_chunk(base, new, a, b))
            else:
                claims.wait_done(k)
            idx, pages, _ = found[k]
            base.hash_span(hasher, a, b, (idx * PAGE_SIZE).tolist() if len(idx) else [], pages)
            if progress is not None and b - reported >= _REPORT:
                reported = b
                progress(b, n)

    def helper(claims: _Claims) -> None:
        while (k := claims.helper_claim()) is not None:
            a, b = k * step, min((k + 1) * step, n)
            found[k] = _check_scanned(base, None, a, b, _scan_chunk(base, new, a, b))
            claims.helper_done(k)

    _with_helper(lead, helper, count)
    return found


#: Work unit of the fused passes (16 MiB, whole leaves): threads claim these one at a
#: time, so a thread whose core is busy elsewhere takes fewer, instead of the whole pass
#: waiting for its fixed half (a static split ran at half speed with the other core loaded).
_FUSED_CHUNK = _REPORT


def _fused_chunks(total: int) -> List[Tuple[int, int]]:
    """``[0, total)`` cut into ``_FUSED_CHUNK`` chunks (a state under 16 MiB is one chunk,
    so it runs on one thread: not worth a hand-off)."""
    return [(lo, min(lo + _FUSED_CHUNK, total)) for lo in range(0, total, _FUSED_CHUNK)]


def _claimed_chunks(spans: Sequence[Tuple[int, int]], work: Callable[[int, int, int], None]) -> None:
    """Run ``work(k, lo, hi)`` for every span ``k``, the spans claimed one by one by the
    pool's threads (the calling thread too). A failure stops the others after their
    current span."""
    count = len(spans)
    threads = min(max_threads(), count)
    lock = threading.Lock()
    state = {"next": 0, "failed": False}

    def worker(_who: int, _unused: int) -> None:
        while True:
            with lock:
                k = state["next"]
                if k >= count or state["failed"]:
                    return
                state["next"] = k + 1
            lo, hi = spans[k]
            try:
                work(k, lo, hi)
            except BaseException:
                state["failed"] = True  # a failed kernel: the others stop
                raise

    run_spans(worker, [(who, 0) for who in range(max(threads, 1))])


#: With a progress callback the fused passes call their kernel for about this many bytes
#: of chunks at a time and report between the calls; without one, a single call runs the
#: whole pass. Each return from a GIL-free call must take the GIL back, which waits a
#: switch interval (5 ms) whenever another thread is running Python: one call per pass
#: pays that once, not once per chunk.
_REPORT_GROUP = 128 << 20


def _run_groups(chunks: Sequence[Tuple[int, int]], call: Callable[[int, int], None],
                progress: Optional[ProgressCallback]) -> None:
    """``call(a, b)`` for groups ``chunks[a:b]`` covering all chunks: one group without
    ``progress``; else groups of about ``_REPORT_GROUP`` bytes, reporting the bytes done
    (of all the chunks' bytes) after each, the end once."""
    count = len(chunks)
    if progress is None:
        if count:
            call(0, count)
        return
    origin = chunks[0][0] if count else 0
    total = chunks[-1][1] - origin if count else 0
    a = 0
    while a < count:
        b = a + 1
        while b < count and chunks[b][1] - chunks[a][0] <= _REPORT_GROUP:
            b += 1
        call(a, b)
        a = b
        if a < count:
            progress(chunks[a - 1][1] - origin, total)
    progress(total, total)


def _kernel_threads(count: int) -> int:
    """Threads for a fused kernel call over ``count`` chunks (at least one)."""
    return max(1, min(max_threads(), count))


def _scan_fused(
    old: memoryview,
    new: memoryview,
    hasher: Optional[Hasher],
    progress: Optional[ProgressCallback],
    spans: Optional[Sequence[Tuple[int, int]]] = None,
    xzr_hints: bool = False,
    fingerprints: Optional[npt.NDArray[np.uint64]] = None,
    base_checksum: Optional[int] = None,
) -> Scan:
    """:func:`scan` by the fused leaf kernel (``old`` covers ``new``; no or a tree hasher):
    each chunk compared, copied into its own page arena, checksummed and (with a tree
    hasher) hashed leaf by leaf by whichever of the kernel's threads claims it, the
    whole pass in one GIL-free call (one per ``_REPORT_GROUP`` with ``progress``).

    ``spans``: the chunks, contiguous and leaf-aligned, of the part of the state to scan
    (the CLI's windowed diff passes one window's); by default the whole state in 16 MiB
    chunks. The hasher takes that part's leaves; the page indices are the state's.
    ``xzr_hints``: record each copy's XZR hint (:attr:`Scan.xzr_hints`).
    ``fingerprints``: the base's page fingerprints (XXH3-64 a page): read ``new`` alone
    and find the dirty pages by them (:attr:`Scan.fingerprints` gets ``new``'s as read).
    ``base_checksum`` (with ``fingerprints``, whole state only): ``old``'s checksum by
    its table; the kernel then sums only what the copies change in it instead of
    checksumming every page read. Where ``old`` under a copy is not what the table says
    (written after the table was taken), ``old``'s own checksum is taken instead (one
    more read of it) and :attr:`Scan.table_checksum` is ``None``.
    """
    n = new.nbytes
    start = base_checksum if fingerprints is not None else None  # known: sum only the changes
    changes = start is not None
    if changes and spans is not None:
        raise ValueError("base_checksum is the whole state's: it cannot go with spans")
    chunks = _fused_chunks(n) if spans is None else spans
    table = None if fingerprints is None else np.empty(-(-n // PAGE_SIZE), dtype=np.uint64)
    lo, hi = (chunks[0][0], chunks[-1][1]) if chunks else (0, 0)
    arenas = [kernels.PageArena(PAGE_SIZE) for _ in chunks]  # each reserved and trimmed by the kernel
    bounds = np.array(chunks, dtype=np.uint64).reshape(-1, 2)
    threads = _kernel_threads(len(chunks))
    leaves = bytearray(16 * -(-(hi - lo) // LEAF_SIZE)) if hasher is not None else None
    got = {"sum": 0, "stale": False}

    def call(a: int, b: int) -> None:
        out = None if leaves is None else memoryview(leaves)[16 * ((chunks[a][0] - lo) // LEAF_SIZE) :]
        total, stale = kernels.scan_leaves_chunks(old, new, bounds[a:b], LEAF_SIZE, arenas[a:b], out, xzr_hints,
                                                  fingerprints, table, changes, threads)
        got["sum"] += total
        got["stale"] = got["stale"] or stale

    _run_groups(chunks, call, progress)
    if hasher is not None:
        hasher.add_leaves(cast(bytearray, leaves), hi - lo)
    held = [a for a in arenas if len(a)]
    indices = np.concatenate([a.indices for a in held]) if held else np.empty(0, dtype=np.int64)
    last = n - int(indices[-1]) * PAGE_SIZE if len(indices) and int(indices[-1]) == (n - 1) // PAGE_SIZE else PAGE_SIZE
    pages = kernels.PageRows([(a, len(a)) for a in held], PAGE_SIZE, last)
    if got["stale"]:
        start = simple_checksum(old[:n])  # the table's checksum is not old's
    found = Scan(indices, cast(List[bytes], pages), (int(got["sum"]) + (start or 0)) & _MASK32)
    if got["stale"]:
        found.table_checksum = None
    if xzr_hints:
        found.xzr_hints = np.concatenate([a.xzr_hints for a in held]) if held else np.empty(0, dtype=np.uint16)
    found.fingerprints = table
    return found


def scan(
    old: memoryview, new: memoryview, hasher: Optional[Hasher], progress: Optional[ProgressCallback],
    xzr_hints: bool = False, fingerprints: Optional[npt.NDArray[np.uint64]] = None,
    base_checksum: Optional[int] = None,
) -> Scan:
    """The dirty pages of ``new`` against ``old``, copied, and the checks of what was copied.

    ``old`` may be shorter than ``new`` (the pages past its end are compared with zeros)
    or longer (it is cut at ``len(new)``). Each dirty page is copied once, right after the
    scan found it; the checksum and ``hasher`` (fed every byte in order) cover ``old``
    with those copies over it, not a second read of ``new``: if another thread writes
    ``new`` meanwhile, the result still describes one state exactly (a page written after
    it was compared is simply not in this round). ``xzr_hints``: have the fused pass
    record :attr:`Scan.xzr_hints` (for deltas that may use XZR pages). ``fingerprints``:
    the XXH3-64 of each page of ``old`` (one a page of ``new``): the fused pass then reads
    ``new`` alone (:attr:`Scan.fingerprints`); the other passes compare as usual.
    ``base_checksum``: ``old``'s checksum, if known (the fused pass with ``fingerprints``
    then checksums only the copies and ``old`` under them).
    """
    n = new.nbytes
    if old.nbytes >= n and (hasher is None or hasher.splittable) and _fused(hasher is not None or fingerprints is not None):
        return _scan_fused(old, new, hasher, progress, xzr_hints=xzr_hints, fingerprints=fingerprints,
                           base_checksum=base_checksum)
    base = Overlay(old, n)
    if hasher is not None and not hasher.splittable and n >= PARALLEL_MIN_BYTES and _paired():
        chunks = _scan_claimed(base, new, hasher, progress)
    else:
        # Independent spans: checksums add up, pages concatenate in span order, and a
        # tree hasher's leaves, hashed by each thread while its scan has them in cache,
        # join in order.
        spans = _spans(n, hasher)
        sinks, reports = _sinks(hasher, spans), span_reporters(progress, spans)
        parts = run_spans(lambda a, b: _scan_alone(base, new, a, b, sinks[a], reports[a]), spans)
        _join(hasher, sinks, spans)
        chunks = [c for part in parts for c in part]
    if progress is not None:
        progress(n, n)
    found = [idx for idx, _, _ in chunks if len(idx)]
    indices = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    pages = [page for _, chunk_pages, _ in chunks for page in chunk_pages]
    checksum = sum(c for _, _, c in chunks) & _MASK32
    return Scan(indices.astype(np.int64, copy=False), pages, checksum)


def scatter(
    target: memoryview, indices: npt.NDArray[np.int64], pages: Sequence[BufferLike],
    changed: Optional[npt.NDArray[np.uint64]] = None,
) -> None:
    """Write ``pages[k]`` at page ``indices[k]`` of ``target`` (``kernels.scatter_pages``),
    split over the pool when there are many: the pages are independent, and one core
    writing scattered pages waits on memory more than it copies. The kernel checks each
    part before writing it; callers pass pages already checked to fit (an apply's).
    ``changed``: the line masks of :attr:`Result.changed` (only those lines are written)."""
    count = len(indices)
    threads = max_threads()
    if threads <= 1 or count * PAGE_SIZE < PARALLEL_MIN_BYTES:
        kernels.scatter_pages(target, indices, pages, PAGE_SIZE, changed)
        return
    step = -(-count // threads)
    run_spans(lambda a, b: kernels.scatter_pages(target, indices[a:b], pages[a:b], PAGE_SIZE,
                                                 None if changed is None else changed[a:b]),
              [(a, min(a + step, count)) for a in range(0, count, step)])


# --------------------------------------------------------------------------------------
# apply: checksum and digest of the result, computed without writing it
# --------------------------------------------------------------------------------------


class Result(Overlay):
    """The would-be result of an apply: the base with the delta's pages laid over it.

    ``view`` holds the base; past it (a short base that will grow) the result is
    zeros. ``indices`` are sorted; ``pages`` their decoded bytes.
    """

    def __init__(self, view: memoryview, total: int, indices: Any, pages: Sequence[BufferLike]) -> None:
        super().__init__(view, total)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.starts = self.indices * PAGE_SIZE
        self.start_list: List[int] = self.starts.tolist()  # plain ints for the Python loop
        self.pages = pages
        #: After :meth:`checks` on the fused path over the whole result, each page's line
        #: mask (``kernels.overlay_leaves``): every 64-byte line that differs from the base
        #: (and maybe others), all that a scatter of the pages must write while the base
        #: stays as it was checked. None otherwise.
        self.changed: Optional[npt.NDArray[np.uint64]] = None

    def _pages_in(self, lo: int, hi: int) -> Tuple[int, int]:
        """Index range of the pages starting in ``[lo, hi)``."""
        return bisect.bisect_left(self.start_list, lo), bisect.bisect_left(self.start_list, hi)

    def pages_adjustment(self, lo: int, hi: int) -> int:
        """New pages' checksums minus the base bytes they replace, for pages in ``[lo, hi)``."""
        ka, kb = self._pages_in(lo, hi)
        return self.adjustment(self.indices[ka:kb], self.pages[ka:kb]) if ka < kb else 0

    def hash_range(self, hasher: Hasher, lo: int, hi: int) -> None:
        """Feed result bytes ``[lo, hi)`` to ``hasher``."""
        ka, kb = self._pages_in(lo, hi)
        self.hash_span(hasher, lo, hi, self.start_list[ka:kb], self.pages[ka:kb])

    def checksum_alone(self, lo: int, hi: int, hasher: Optional[Hasher], progress: Optional[ProgressCallback]) -> int:
        """Checksum of ``[lo, hi)`` on one thread, chunk by chunk; each chunk is hashed (if
        asked) right after the checksum read it, from cache."""
        step = _CHUNK if hasher is not None else _REPORT
        checksum = 0
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            ka, kb = self._pages_in(a, b)
            checksum += self.check_chunk(hasher, a, b, self.indices[ka:kb], self.pages[ka:kb])
            if progress is not None:
                progress(b, self.total)
        return checksum & _MASK32

    def fused(
        self, hasher: Hasher, progress: Optional[ProgressCallback], spans: Optional[Sequence[Tuple[int, int]]] = None
    ) -> int:
        """Checksum and tree digest of the result by the fused leaf kernel: one GIL-free
        call for all chunks (one per ``_REPORT_GROUP`` with ``progress``), each chunk on
        whichever of its threads claims it, each leaf hashed and checksummed
        while in cache (the base covers the whole result).

        ``spans``: the chunks, contiguous and leaf-aligned, of the part of the result to
        check (the CLI's windowed apply passes one window's); by default the whole result
        in 16 MiB chunks. Returns that part's positioned checksum; the hasher takes its
        leaves."""
        chunks = _fused_chunks(self.total) if spans is None else spans
        lo, hi = (chunks[0][0], chunks[-1][1]) if chunks else (0, 0)
        bounds = np.array(chunks, dtype=np.uint64).reshape(-1, 2)
        threads = _kernel_threads(len(chunks))
        leaves = bytearray(16 * -(-(hi - lo) // LEAF_SIZE))
        changed = np.empty(len(self.start_list), dtype=np.uint64) if spans is None else None  # the kernel fills each
        sums = [0]

        def call(a: int, b: int) -> None:
            ka, kb = self._pages_in(chunks[a][0], chunks[b - 1][1])
            out = memoryview(leaves)[16 * ((chunks[a][0] - lo) // LEAF_SIZE) :]
            sums[0] += kernels.overlay_leaves_chunks(self.view, bounds[a:b], self.pages[ka:kb], self.starts[ka:kb],
                                                     LEAF_SIZE, out, None if changed is None else changed[ka:kb],
                                                     threads)

        _run_groups(chunks, call, progress)
        hasher.add_leaves(leaves, hi - lo)
        self.changed = changed
        return sums[0] & _MASK32

    def claimed(self, hasher: Hasher, progress: Optional[ProgressCallback]) -> int:
        """Checksum of the result with a helper thread (see :class:`_Claims`)."""
        total, step = self.total, _HELP_CHUNK
        count = -(-total // step)

        def base_sum(k: int) -> int:
            return self.base_checksum(k * step, (k + 1) * step)

        def lead(claims: _Claims) -> int:
            checksum = 0
            reported = 0
            for k in range(count):
                a, b = k * step, min((k + 1) * step, total)
                own = claims.lead_at(k)
                self.hash_range(hasher, a, b)
                if own:
                    checksum += base_sum(k)
                if progress is not None and b - reported >= _REPORT:
                    reported = b
                    progress(b, total)
            return checksum

        def helper(claims: _Claims) -> int:
            checksum = 0
            while (k := claims.helper_claim()) is not None:
                checksum += base_sum(k)
            return checksum

        mine, theirs = _with_helper(lead, helper, count)
        return (mine + theirs + self.pages_adjustment(0, total)) & _MASK32

    def checks(self, hasher: Optional[Hasher], progress: Optional[ProgressCallback]) -> int:
        """Checksum of the whole result; ``hasher`` (if any) sees every byte, in order."""
        total = self.total
        if hasher is not None and hasher.splittable and self.size == total and _fused(True):
            return self.fused(hasher, progress)
        if hasher is not None and not hasher.splittable and total >= PARALLEL_MIN_BYTES and _paired():
            return self.claimed(hasher, progress)
        # Independent spans, as in create's scan: each thread checksums its span and
        # hashes its own leaves (tree digest) from cache.
        spans = _spans(total, hasher)
        sinks, reports = _sinks(hasher, spans), span_reporters(progress, spans)
        parts = run_spans(lambda a, b: self.checksum_alone(a, b, sinks[a], reports[a]), spans)
        _join(hasher, sinks, spans)
        return sum(parts) & _MASK32
