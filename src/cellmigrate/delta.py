"""Dirty-page deltas: ship only the 4 KiB pages that changed, apply them atomically.

:class:`DeltaSnapshot` is the crate's ``DeltaSnapshot`` with three fixes (SPEC §3, §6):

* ``create`` reads both states in place through the GIL-free kernels, in cache-sized
  chunks (the page comparison, the weighted checksum and the strong digest share one
  read of the data), and copies only the dirty pages;
* ``apply`` is atomic: every check (sizes, page indices, page decoding, the result's
  checksum, the strong digest or MAC of the result) runs *before* a byte of the base is
  written, so a bad delta leaves the base byte-for-byte unchanged;
* a strong digest (``xxh3_128_tree`` by default: XXH3-128 over 1 MiB leaves that all
  cores hash; plain XXH3-128; BLAKE3; keyed BLAKE3 = a MAC) backs up the crate's weak checksum.
"""

from __future__ import annotations

import bisect
import hmac
import inspect
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, TypeVar, cast

import blake3 as _blake3
import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from ._backend import kernels
from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id
from ._parallel import PARALLEL_MIN_BYTES, max_threads, run_spans
from ._tree import LEAF_SIZE, TreeStream
from ._types import BufferLike
from .checksum import DEFAULT_DIGEST, DIGEST_ALGORITHMS, DIGEST_SIZES, KEY_SIZE, PAGE_SIZE
from .errors import CorruptDataError, InvalidStateError
from .progress import ProgressEventKind, byte_progress

__all__ = ["DirtyPage", "DeltaSnapshot", "DEFAULT_MAX_GROW_SIZE"]

#: Largest size (bytes) :meth:`DeltaSnapshot.apply` grows a short ``bytearray`` base to
#: unless the caller passes ``max_size``: 1 GiB, the Rust crate's default node limit
#: (``NodeCapabilities.new().max_state_size``). A delta's ``total_size`` is only as
#: trustworthy as its digest (the weak checksum ignores trailing zeros), so growth in
#: memory is bounded by what the *caller* allows, never by what the delta declares.
DEFAULT_MAX_GROW_SIZE = 1 << 30

#: Internal form of progress: ``report(bytes_done, bytes_total)``, called from the calling
#: thread between chunks. Callers pass either that or an event callback (see
#: :func:`_byte_reporter`).
ProgressCallback = Callable[[int, int], None]


def _takes_done_total(callback: Callable[..., Any]) -> bool:
    """Whether ``callback`` wants ``(done, total)``: exactly two required positional parameters."""
    try:
        params = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: treat as an event callback
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) == 2


def _byte_reporter(
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
    if _takes_done_total(progress):
        return cast(ProgressCallback, progress)
    return byte_progress(progress, agent_id, kind)

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
#: Bytes per fused step: small enough that a chunk the page comparison (or the checksum)
#: just read from memory is still in this core's cache when the hasher reads it again,
#: big enough that the Python loop costs nothing next to the kernels.
_CHUNK = 1 << 20
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
_ZEROS = memoryview(bytes(_CHUNK))


def _plan(total: int, align: int = PAGE_SIZE) -> List[Tuple[int, int]]:
    """``align``-aligned spans of ``[0, total)``, one per thread (one span: the calling thread only)."""
    threads = max_threads()
    if threads <= 1 or total < PARALLEL_MIN_BYTES:
        return [(0, total)]
    per_thread = -(-total // threads)
    step = -(-per_thread // align) * align
    return [(lo, min(lo + step, total)) for lo in range(0, total, step)]


def _spans(total: int, hasher: Optional["_Hasher"]) -> List[Tuple[int, int]]:
    """How a pass over ``total`` bytes splits over threads: pages without a hasher, 1 MiB
    leaves with a tree hasher, not at all with a sequential one."""
    if hasher is None:
        return _plan(total)
    return _plan(total, LEAF_SIZE) if hasher.splittable else [(0, total)]


def _sinks(hasher: Optional["_Hasher"], spans: List[Tuple[int, int]]) -> Dict[int, Optional["_Hasher"]]:
    """The hasher each span feeds: the one given, or with several spans a fork per span."""
    if hasher is None or len(spans) == 1:
        return {lo: hasher for lo, _ in spans}
    return {lo: hasher.fork() for lo, _ in spans}


def _join(hasher: Optional["_Hasher"], sinks: Dict[int, Optional["_Hasher"]], spans: List[Tuple[int, int]]) -> None:
    if hasher is not None and len(spans) > 1:
        hasher.join([cast("_Hasher", sinks[lo]) for lo, _ in spans])


def _span_reporters(
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
            return helper(claims)
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


def _pages_checksum(pages: Sequence[bytes], indices: npt.NDArray[np.int64]) -> int:
    """Sum of each page's checksum positioned at ``index * PAGE_SIZE``."""
    return int(kernels.pages_checksum(pages, indices, PAGE_SIZE)) if len(indices) else 0


def _before_end(report: Optional[ProgressCallback]) -> Optional[ProgressCallback]:
    """``report`` held one byte short of the end: verification is not the finished apply."""
    if report is None:
        return None
    inner = report

    def held(done: int, total: int) -> None:
        inner(min(done, max(total - 1, 0)), total)

    return held


def _now() -> int:
    return int(time.time())


class _Hasher:
    """Streaming XXH3-128 (plain or over leaves) or (keyed) BLAKE3; ``update`` takes
    buffers without copying."""

    def __init__(self, algorithm: str, key: Optional[bytes]) -> None:
        self._h: Any
        if algorithm in ("xxh3_128_tree", "xxh3_128"):
            if key is not None:
                raise ValueError(f"a key needs algorithm='blake3' ({algorithm} is not a MAC)")
            self._h = TreeStream() if algorithm == "xxh3_128_tree" else _xxhash.xxh3_128()
        elif algorithm == "blake3":
            if key is not None:
                self._h = _blake3.blake3(key=key, max_threads=_blake3.blake3.AUTO)
            else:
                self._h = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        else:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {DIGEST_ALGORITHMS}")

    def update(self, data: BufferLike) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest())

    @property
    def splittable(self) -> bool:
        """Whether spans of the input can be hashed on separate threads (leaf-aligned)."""
        return isinstance(self._h, TreeStream)

    def fork(self) -> "_Hasher":
        """A hasher for one leaf-aligned span, to :meth:`join` back in order."""
        return _Hasher("xxh3_128_tree", None)

    def join(self, spans: Sequence["_Hasher"]) -> None:
        """Take the spans' leaves, in order, as if this hasher had seen their bytes."""
        self._h.join([span._h for span in spans])


def _check_key(key: Optional[Any]) -> Optional[bytes]:
    if key is None:
        return None
    if not isinstance(key, (bytes, bytearray, memoryview)):
        raise TypeError(f"key must be {KEY_SIZE} bytes, not {type(key).__name__}")
    raw = bytes(key)
    if len(raw) != KEY_SIZE:
        raise ValueError(f"a BLAKE3 key must be {KEY_SIZE} bytes, got {len(raw)}")
    return raw


def _page_length(index: int, total_size: int) -> int:
    """Length of page ``index`` in a state of ``total_size`` bytes (the last may be short)."""
    return min(PAGE_SIZE, total_size - index * PAGE_SIZE)


# --------------------------------------------------------------------------------------
# DirtyPage
# --------------------------------------------------------------------------------------


class DirtyPage:
    """One changed page: its index in the state and its bytes, RLE-compressed or raw.

    >>> page = DirtyPage(3, bytes(4096))
    >>> page.compress()
    >>> page.compressed, len(page.data)
    (True, 99)
    >>> page.get_data() == bytes(4096)
    True
    >>> page.decompress()
    >>> page
    DirtyPage(index=3, data=<4096 bytes>, compressed=False)

    Attributes:
        index: page number; the page covers bytes ``[index*4096, (index+1)*4096)``.
        data: the page's bytes, RLE-encoded when ``compressed``.
        compressed: whether ``data`` is RLE ("simple") compressed.
    """

    __slots__ = ("index", "data", "compressed")
    __hash__ = None  # type: ignore[assignment]  # mutable, like the crate's struct

    def __init__(self, index: int, data: BufferLike, compressed: bool = False) -> None:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"page index must be an int, not {type(index).__name__}")
        if index < 0:
            raise ValueError(f"page index must be >= 0, got {index}")
        self.index: int = int(index)
        self.data: bytes = data if isinstance(data, bytes) else bytes(as_bytes_view(data, "page data"))
        self.compressed: bool = bool(compressed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyPage):
            return NotImplemented
        return (self.index, self.compressed, self.data) == (other.index, other.compressed, other.data)

    def compress(self) -> None:
        """RLE-compress ``data`` in place, keeping the result only when strictly smaller."""
        if self.compressed:
            return
        packed = bytes(kernels.rle_compress(as_bytes_view(self.data)))
        if len(packed) < len(self.data):
            self.data = packed
            self.compressed = True

    def decompress(self, *, max_output: Optional[int] = None) -> None:
        """Decode ``data`` in place (no-op when raw); corrupt data raises ``CorruptDataError``."""
        if self.compressed:
            self.data = self.get_data(max_output=max_output)
            self.compressed = False

    def get_data(self, *, max_output: Optional[int] = None) -> bytes:
        """The page's raw bytes (decoded if compressed), without changing the page.

        ``max_output`` bounds the decoded size (``CorruptDataError`` past it). ``None``
        leaves only RLE's own limit (at most 127 bytes per 3 stored), like the crate,
        so a page built by hand from more than 4096 bytes still round-trips;
        :meth:`DeltaSnapshot.apply` always decodes with the exact page length as bound.
        """
        if not self.compressed:
            return self.data
        if max_output is not None and max_output < 0:
            raise ValueError("max_output must be >= 0")
        bound = -1 if max_output is None else max_output  # -1: the kernel's "no bound"
        return bytes(kernels.rle_decompress(as_bytes_view(self.data), bound))

    def __repr__(self) -> str:
        return f"DirtyPage(index={self.index}, data=<{len(self.data)} bytes>, compressed={self.compressed})"


# --------------------------------------------------------------------------------------
# create: page comparison + checksum (+ digest) sharing one read of the data
# --------------------------------------------------------------------------------------

_Found = Tuple[List[npt.NDArray[np.int64]], int]


def _scan_chunk(old: memoryview, new: memoryview, lo: int, hi: int) -> Tuple[npt.NDArray[np.int64], int]:
    """Dirty page indices (absolute) and positioned checksum of ``new[lo:hi]`` (``lo`` aligned)."""
    # One pass: the kernel compares and checksums each block while it is in registers.
    idx, part = kernels.dirty_pages_checksum(old[lo:hi], new[lo:hi], PAGE_SIZE, lo)
    return (idx + lo // PAGE_SIZE if lo and len(idx) else idx), int(part)


def _scan_alone(
    old: memoryview, new: memoryview, lo: int, hi: int, hasher: Optional["_Hasher"], progress: Optional[ProgressCallback]
) -> _Found:
    """``[lo, hi)`` on one thread, chunk by chunk; each chunk is hashed (if asked) right
    after the comparison read it, from cache."""
    step = _CHUNK if hasher is not None else _REPORT
    found: List[npt.NDArray[np.int64]] = []
    total = 0
    for a in range(lo, hi, step):
        b = min(a + step, hi)
        idx, part = _scan_chunk(old, new, a, b)
        if len(idx):
            found.append(idx)
        total += part
        if hasher is not None:
            hasher.update(new[a:b])
        if progress is not None:
            progress(b, new.nbytes)
    return found, total & _MASK32


def _scan_claimed(
    old: memoryview, new: memoryview, hasher: "_Hasher", progress: Optional[ProgressCallback]
) -> Tuple[_Found, _Found]:
    """Hash ``new`` on this thread with a helper scanning chunks ahead (see :class:`_Claims`)."""
    n = new.nbytes
    step = _HELP_CHUNK
    count = -(-n // step)

    def lead(claims: _Claims) -> _Found:
        found: List[npt.NDArray[np.int64]] = []
        total = 0
        reported = 0
        for k in range(count):
            a, b = k * step, min((k + 1) * step, n)
            own = claims.lead_at(k)
            hasher.update(new[a:b])
            if own:
                idx, part = _scan_chunk(old, new, a, b)
                if len(idx):
                    found.append(idx)
                total += part
            if progress is not None and b - reported >= _REPORT:
                reported = b
                progress(b, n)
        return found, total & _MASK32

    def helper(claims: _Claims) -> _Found:
        found: List[npt.NDArray[np.int64]] = []
        total = 0
        while (k := claims.helper_claim()) is not None:
            idx, part = _scan_chunk(old, new, k * step, min((k + 1) * step, n))
            if len(idx):
                found.append(idx)
            total += part
        return found, total & _MASK32

    return _with_helper(lead, helper, count)


def _scan(
    old: memoryview, new: memoryview, hasher: Optional["_Hasher"], progress: Optional[ProgressCallback]
) -> Tuple[npt.NDArray[np.int64], int]:
    """All dirty page indices (ascending) and ``simple_checksum(new)``; feeds ``hasher``."""
    n = new.nbytes
    if hasher is not None and not hasher.splittable and n >= PARALLEL_MIN_BYTES and _paired():
        parts = list(_scan_claimed(old, new, hasher, progress))
    else:
        # Independent spans: checksums add up, indices concatenate, and a tree hasher's
        # leaves, hashed by each thread while its scan has them in cache, join in order.
        spans = _spans(n, hasher)
        sinks, reports = _sinks(hasher, spans), _span_reporters(progress, spans)
        parts = run_spans(lambda a, b: _scan_alone(old, new, a, b, sinks[a], reports[a]), spans)
        _join(hasher, sinks, spans)
    if progress is not None:
        progress(n, n)
    found = [a for f, _ in parts for a in f]
    checksum = sum(c for _, c in parts) & _MASK32
    indices = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    indices.sort()  # two threads may have found them chunk by chunk in either order
    return indices.astype(np.int64, copy=False), checksum


def _compress_pages(pages: Sequence[bytes]) -> List[Tuple[bytes, bool]]:
    out: List[Tuple[bytes, bool]] = []
    for raw in pages:
        packed = bytes(kernels.rle_compress(raw))
        out.append((packed, True) if len(packed) < len(raw) else (raw, False))
    return out


# --------------------------------------------------------------------------------------
# apply: checksum and digest of the result, computed without writing it
# --------------------------------------------------------------------------------------


def _grow_zeros(base: bytearray, total: int) -> None:
    """Extend ``base`` with zeros to ``total`` bytes, or leave it as it was and raise
    :class:`InvalidStateError` (a view of it is alive, or memory runs out)."""
    size = len(base)
    try:
        # In place, from a shared zero chunk: no temporary of the grown size.
        while len(base) < total:
            base += _ZEROS[: min(_CHUNK, total - len(base))]
    except BufferError as exc:
        raise InvalidStateError(f"Base state is too small and cannot be grown: {exc}") from None
    except MemoryError:
        del base[size:]
        raise InvalidStateError(
            f"Out of memory growing the base from {size} to {total} bytes; base left unchanged"
        ) from None


class _Result:
    """The would-be result of an apply: the base with the delta's pages laid over it.

    ``view`` holds ``size`` bytes; past it (a short base that will grow) the result is
    zeros. ``starts`` are the sorted pages' byte offsets.
    """

    def __init__(self, view: memoryview, total: int, indices: List[int], pages: List[bytes]) -> None:
        self.view = view
        self.size = view.nbytes
        self.total = total
        self.indices = np.asarray(indices, dtype=np.int64)
        self.starts = self.indices * PAGE_SIZE
        self.start_list: List[int] = self.starts.tolist()  # plain ints for the Python loop
        self.pages = pages

    def _pages_in(self, lo: int, hi: int) -> Tuple[int, int]:
        """Index range of the pages starting in ``[lo, hi)``."""
        return bisect.bisect_left(self.start_list, lo), bisect.bisect_left(self.start_list, hi)

    def checksum_span(self, lo: int, hi: int) -> int:
        """Checksum of result bytes ``[lo, hi)``: base part, minus the replaced pages' old
        bytes, plus the new pages (the checksum is linear in the bytes)."""
        total = 0
        if lo < self.size:
            total = int(kernels.checksum(self.view[lo : min(hi, self.size)], lo))
        return (total + self.pages_adjustment(lo, hi)) & _MASK32

    def pages_adjustment(self, lo: int, hi: int) -> int:
        """New pages' checksums minus the base bytes they replace, for pages in ``[lo, hi)``."""
        ka, kb = self._pages_in(lo, hi)
        if ka == kb:
            return 0
        idx = self.indices[ka:kb]
        # Pages (partly) over base bytes; past the end of a short base there is nothing to take out.
        covered = idx if self.size == self.total else idx[self.starts[ka:kb] < self.size]
        return (_pages_checksum(self.pages[ka:kb], idx) - _state_pages_checksum(self.view, covered)) & _MASK32

    def hash_span(self, hasher: "_Hasher", lo: int, hi: int) -> None:
        """Feed result bytes ``[lo, hi)`` to ``hasher`` (base runs, zeros, new pages, in order).

        A streaming hash gives the same digest however its input is split, so nothing
        is assembled: clean runs are passed as views of the base."""
        k, kb = self._pages_in(lo, hi)
        starts, pages, view, size = self.start_list, self.pages, self.view, self.size
        pos = lo
        while pos < hi:
            if k < kb and starts[k] == pos:
                page = pages[k]
                hasher.update(page)
                pos += len(page)
                k += 1
                continue
            stop = starts[k] if k < kb else hi
            if pos < size:
                end = min(stop, size)
                hasher.update(view[pos:end])
                pos = end
            while pos < stop:
                end = min(stop, pos + _CHUNK)
                hasher.update(_ZEROS[: end - pos])
                pos = end

    def checksum_alone(self, lo: int, hi: int, hasher: Optional["_Hasher"], progress: Optional[ProgressCallback]) -> int:
        """Checksum of ``[lo, hi)`` on one thread, chunk by chunk; each chunk is hashed (if
        asked) right after the checksum read it, from cache."""
        step = _CHUNK if hasher is not None else _REPORT
        checksum = 0
        for a in range(lo, hi, step):
            b = min(a + step, hi)
            if a < self.size:
                checksum += int(kernels.checksum(self.view[a : min(b, self.size)], a))
            if hasher is not None:
                self.hash_span(hasher, a, b)
            if progress is not None:
                progress(b, self.total)
        return (checksum + self.pages_adjustment(lo, hi)) & _MASK32

    def claimed(self, hasher: "_Hasher", progress: Optional[ProgressCallback]) -> int:
        """Checksum of the result with a helper thread (see :class:`_Claims`)."""
        total, size, step = self.total, self.size, _HELP_CHUNK
        count = -(-total // step)

        def base_sum(k: int) -> int:
            a, b = k * step, min((k + 1) * step, size)
            return int(kernels.checksum(self.view[a:b], a)) if a < b else 0

        def lead(claims: _Claims) -> int:
            checksum = 0
            reported = 0
            for k in range(count):
                a, b = k * step, min((k + 1) * step, total)
                own = claims.lead_at(k)
                self.hash_span(hasher, a, b)
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

    def checks(self, hasher: Optional["_Hasher"], progress: Optional[ProgressCallback]) -> int:
        """Checksum of the whole result; ``hasher`` (if any) sees every byte, in order."""
        total = self.total
        if hasher is not None and not hasher.splittable and total >= PARALLEL_MIN_BYTES and _paired():
            return self.claimed(hasher, progress)
        # Independent spans, as in create's scan: each thread checksums its span and
        # hashes its own leaves (tree digest) from cache.
        spans = _spans(total, hasher)
        sinks, reports = _sinks(hasher, spans), _span_reporters(progress, spans)
        parts = run_spans(lambda a, b: self.checksum_alone(a, b, sinks[a], reports[a]), spans)
        _join(hasher, sinks, spans)
        return sum(parts) & _MASK32


# --------------------------------------------------------------------------------------
# DeltaSnapshot
# --------------------------------------------------------------------------------------


@dataclass(eq=True, repr=False)
class DeltaSnapshot:
    """The pages that changed between two versions of an agent's state, plus checks.

    Build one with :meth:`create`, ship it with :meth:`serialize`, and on the other node
    :meth:`deserialize` and :meth:`apply` it to the base state (atomic: verified first).

    >>> old = bytearray(3 * 4096)
    >>> new = bytearray(old); new[5000] = 7
    >>> delta = DeltaSnapshot.create(bytes(16), old, new, base_sequence=1, sequence=2)
    >>> delta.dirty_page_count(), [p.index for p in delta.dirty_pages], delta.digest_algorithm
    (1, [1], 'xxh3_128_tree')
    >>> delta.apply(old)
    >>> old == new
    True

    Attributes:
        agent_id: the agent's 16-byte id.
        sequence: this delta's sequence number.
        base_sequence: the sequence of the state it applies to.
        dirty_pages: the changed pages (a plain list; ``apply`` reads their current data).
        total_size: size of the new state in bytes.
        timestamp: Unix seconds of creation.
        checksum: ``simple_checksum`` of the new state (the crate's check).
        digest_algorithm: "xxh3_128", "blake3", "xxh3_128_tree", or ``None`` for a
            checksum-only delta.
        digest: strong digest (or MAC when ``keyed``) of the new state, or ``None``.
        keyed: the digest is keyed BLAKE3: ``apply`` needs the key.
    """

    agent_id: bytes
    sequence: int
    base_sequence: int
    dirty_pages: List[DirtyPage]
    total_size: int
    timestamp: int
    checksum: int
    digest_algorithm: Optional[str] = None
    digest: Optional[bytes] = None
    keyed: bool = False

    def __post_init__(self) -> None:
        self.agent_id = to_id(self.agent_id, "agent_id")
        for name in ("sequence", "base_sequence", "total_size", "timestamp", "checksum"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
            setattr(self, name, int(value))
        if self.checksum > _MASK32:
            raise ValueError(f"checksum must fit in 32 bits, got {self.checksum}")
        if not isinstance(self.dirty_pages, list):
            self.dirty_pages = list(self.dirty_pages)
        if (self.digest_algorithm is None) != (self.digest is None):
            raise ValueError("digest_algorithm and digest must be given together")
        if self.digest_algorithm is not None:
            if self.digest_algorithm not in DIGEST_SIZES:
                raise ValueError(
                    f"unknown digest algorithm {self.digest_algorithm!r}; expected one of {DIGEST_ALGORITHMS}"
                )
            self.digest = bytes(self.digest or b"")
        self.keyed = bool(self.keyed)
        if self.keyed and self.digest_algorithm != "blake3":
            raise ValueError("a keyed delta must use digest_algorithm='blake3'")

    # -- create ------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        agent_id: IdLike,
        old_state: BufferLike,
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        *,
        digest: Optional[str] = DEFAULT_DIGEST,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
    ) -> "DeltaSnapshot":
        """Diff two equal-length states page by page.

        Both states are read in place (any C-contiguous buffer); only the dirty pages
        are copied, each RLE-compressed when that makes it strictly smaller.
        ``digest`` names the strong digest of the new state ("xxh3_128_tree", the default:
        XXH3-128 over 1 MiB leaves, which every core helps hash and verify; "xxh3_128",
        plain sequential XXH3-128; "blake3"; or ``None`` for the crate's
        checksum-only delta); a 32-byte ``key`` makes it a keyed
        BLAKE3 MAC (``keyed=True``). Different lengths raise :class:`InvalidStateError`.

        ``progress`` is an event callback (like :class:`~cellmigrate.CollectingCallback`;
        it receives CAPTURING_STATE events, percent 0..100) or a callable taking
        ``(bytes_done, bytes_total)``; it is called from this thread between chunks.
        """
        agent = to_id(agent_id, "agent_id")
        report = _byte_reporter(progress, agent, ProgressEventKind.CAPTURING_STATE)
        delta, _, _ = cls._create_checked(agent, old_state, new_state, base_sequence, sequence, digest, key, report)
        return delta

    @classmethod
    def _create_checked(
        cls,
        agent: bytes,
        old_state: BufferLike,
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        digest: Optional[str],
        key: Optional[bytes],
        progress: Optional[ProgressCallback] = None,
    ) -> Tuple["DeltaSnapshot", npt.NDArray[np.int64], List[bytes]]:
        """Normalise ``digest``/``key`` (a key implies keyed BLAKE3), then :meth:`_create`."""
        raw_key = _check_key(key)
        algorithm = digest
        if algorithm is not None and algorithm not in DIGEST_SIZES:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {DIGEST_ALGORITHMS}")
        if raw_key is not None:
            if algorithm is None:
                raise ValueError("a key needs a digest: digest=None makes an unauthenticated checksum-only delta")
            algorithm = "blake3"
        return cls._create(agent, old_state, new_state, base_sequence, sequence, algorithm, raw_key, progress)

    @classmethod
    def _create(
        cls,
        agent: bytes,
        old_state: BufferLike,
        new_state: BufferLike,
        base_sequence: int,
        sequence: int,
        algorithm: Optional[str],
        key: Optional[bytes],
        progress: Optional[ProgressCallback],
    ) -> Tuple["DeltaSnapshot", npt.NDArray[np.int64], List[bytes]]:
        """``create`` that also returns the dirty indices and raw pages (for the tracker)."""
        old = as_bytes_view(old_state, "old_state")
        new = as_bytes_view(new_state, "new_state")
        if old.nbytes != new.nbytes:
            raise InvalidStateError(
                f"State sizes must match for delta (size mismatch: old state has {old.nbytes} bytes, new state has {new.nbytes} bytes)"
            )
        hasher = None if algorithm is None else _Hasher(algorithm, key)
        indices, checksum = _scan(old, new, hasher, progress)
        raw_pages: List[bytes] = list(kernels.gather_pages(new, indices, PAGE_SIZE))
        pages = [DirtyPage(int(i), data, packed) for i, (data, packed) in zip(indices, _compress_pages(raw_pages))]
        value = None if hasher is None else hasher.digest()
        delta = cls(
            agent_id=agent,
            sequence=sequence,
            base_sequence=base_sequence,
            dirty_pages=pages,
            total_size=new.nbytes,
            timestamp=_now(),
            checksum=checksum,
            digest_algorithm=algorithm,
            digest=value,
            keyed=key is not None,
        )
        return delta, indices, raw_pages

    # -- apply -------------------------------------------------------------------------

    def _decoded_pages(self) -> Tuple[List[int], List[bytes]]:
        """Indices (sorted) and raw bytes of every page, all checked; raises InvalidStateError."""
        total = self.total_size
        npages = -(-total // PAGE_SIZE)
        seen: Dict[int, bytes] = {}
        for page in self.dirty_pages:
            if not isinstance(page, DirtyPage):
                raise InvalidStateError(f"Delta page list holds a {type(page).__name__}, not a DirtyPage")
            index = page.index
            if not 0 <= index < npages:
                raise InvalidStateError(
                    f"Delta page {index} is out of range for a state of {total} bytes ({npages} pages)"
                )
            if index in seen:
                raise InvalidStateError(f"Delta holds page {index} more than once")
            expected = _page_length(index, total)
            if page.compressed:
                try:
                    data = bytes(kernels.rle_decompress(as_bytes_view(page.data), expected))
                except CorruptDataError as exc:
                    raise InvalidStateError(f"Delta page {index} is corrupt: {exc}") from None
            else:
                data = bytes(page.data)
            if len(data) != expected:
                raise InvalidStateError(
                    f"Delta page {index} has {len(data)} bytes, expected {expected}"
                )
            seen[index] = data
        order = sorted(seen)
        return order, [seen[i] for i in order]

    def _check_key_policy(self, key: Optional[bytes]) -> None:
        """The digest fields are consistent and the key matches the delta's kind."""
        if self.keyed and self.digest_algorithm != "blake3":
            raise InvalidStateError(
                f"Delta is marked keyed but its digest is {self.digest_algorithm!r}, not a BLAKE3 MAC"
            )
        if self.keyed and key is None:
            raise InvalidStateError("Delta is authenticated (keyed BLAKE3): a key is needed to apply it")
        if key is not None and not self.keyed:
            raise InvalidStateError(
                "Delta is not authenticated but a key was given: refusing an unauthenticated delta"
            )
        if self.digest_algorithm is not None:
            size = DIGEST_SIZES.get(self.digest_algorithm)
            if size is None:
                raise InvalidStateError(f"Delta names an unknown digest algorithm {self.digest_algorithm!r}")
            if self.digest is None or len(self.digest) != size:
                raise InvalidStateError(
                    f"Delta {self.digest_algorithm} digest has {len(self.digest or b'')} bytes, expected {size}"
                )

    def apply(
        self,
        base: BufferLike,
        *,
        key: Optional[bytes] = None,
        progress: Optional[Callable[..., Any]] = None,
        max_size: int = DEFAULT_MAX_GROW_SIZE,
    ) -> None:
        """Write the delta's pages into ``base``, after verifying everything.

        ``base`` is a writable buffer (bytearray, writable memoryview, writable mmap,
        numpy array) of exactly ``total_size`` bytes, or a shorter ``bytearray`` that is
        then grown with zeros. Before any write, the page indices (in range, unique), the
        page encodings and lengths, the checksum of the result and its strong digest (or
        MAC: pass ``key`` for a keyed delta) are verified; any failure raises
        :class:`InvalidStateError` saying which check failed, and ``base`` is left
        byte-for-byte unchanged (and not grown). A read-only buffer raises ``TypeError``.

        ``max_size`` (bytes, default :data:`DEFAULT_MAX_GROW_SIZE` = 1 GiB) bounds the
        size a short ``bytearray`` base may be grown to: a delta whose ``total_size`` is
        larger raises :class:`InvalidStateError` naming ``max_size`` before anything is
        read or allocated (a checksum-only delta's ``total_size`` is not authenticated by
        anything: its weak checksum ignores trailing zeros). A base that already has
        ``total_size`` bytes is written in place and is not bounded by it. If growing
        the base runs out of memory, the base is shrunk back to its old length and
        :class:`InvalidStateError` is raised (never a raw ``MemoryError``).

        ``progress`` is an event callback (RESTORING events, percent 0..100) or a
        callable taking ``(bytes_done, bytes_total)``; 100% is reported only once the
        pages are written.
        """
        raw_key = _check_key(key)
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 0:
            raise ValueError(f"max_size must be an int >= 0 (bytes), got {max_size!r}")
        report = _byte_reporter(progress, self.agent_id, ProgressEventKind.RESTORING)
        view = as_writable_view(base, "base")
        size, total = view.nbytes, self.total_size
        if size > total:
            raise InvalidStateError(
                f"Base state is larger than the delta's state: base has {size} bytes, delta expects {total}"
            )
        if size < total and not isinstance(base, bytearray):
            raise InvalidStateError(
                f"Base state is too small: base has {size} bytes, delta expects {total}, "
                f"and a {type(base).__name__} cannot be resized"
            )
        if size < total and total > max_size:
            raise InvalidStateError(
                f"Delta would grow the base from {size} to {total} bytes, over max_size={max_size} bytes "
                f"(pass a larger max_size to allow it)"
            )
        self._check_key_policy(raw_key)
        indices, pages = self._decoded_pages()
        hasher = None if self.digest_algorithm is None else _Hasher(self.digest_algorithm, raw_key)
        result = _Result(view, total, indices, pages)
        checksum = result.checks(hasher, _before_end(report))
        value = None if hasher is None else hasher.digest()
        del result  # drops its views of the base, so a bytearray can grow
        if checksum != self.checksum:
            raise InvalidStateError(
                f"Delta checksum mismatch: the result would have checksum {checksum}, the delta says {self.checksum}"
            )
        if self.digest is not None and value is not None:
            if not hmac.compare_digest(value, self.digest):
                if self.keyed:
                    raise InvalidStateError(
                        "Delta authentication failed: BLAKE3 MAC mismatch (wrong key or tampered delta)"
                    )
                raise InvalidStateError(f"Delta {self.digest_algorithm} digest mismatch: the result is not the new state")
        # Everything checked: now (and only now) write.
        if size < total:
            view.release()
            _grow_zeros(cast(bytearray, base), total)  # a bytearray (checked above)
            view = as_writable_view(base, "base")
        kernels.scatter_pages(view, indices, pages, PAGE_SIZE)
        if report is not None:
            report(total, total)

    # -- sizes -------------------------------------------------------------------------

    def dirty_page_count(self) -> int:
        """Number of pages in the delta."""
        return len(self.dirty_pages)

    def compressed_size(self) -> int:
        """Sum of the stored (possibly compressed) page lengths."""
        return sum(len(p.data) for p in self.dirty_pages)

    def uncompressed_size(self) -> int:
        """``dirty_page_count() * PAGE_SIZE`` (the crate's reading)."""
        return len(self.dirty_pages) * PAGE_SIZE

    def compression_ratio(self) -> float:
        """``compressed_size() / uncompressed_size()``; 1.0 when there are no pages."""
        raw = self.uncompressed_size()
        return 1.0 if raw == 0 else self.compressed_size() / raw

    # -- wire --------------------------------------------------------------------------

    def serialize(self) -> bytes:
        """The versioned, self-checking wire format (see docs/FORMAT.md)."""
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        # cast: wire's DeltaLike protocol declares settable attributes, which mypy treats
        # as invariant (list[DirtyPage] vs Sequence[PageLike]); the shape is the agreed one.
        return bytes(wire.encode_delta(cast(Any, self)))

    @classmethod
    def deserialize(cls, data: BufferLike, *, max_total_size: Optional[int] = None) -> "DeltaSnapshot":
        """Parse :meth:`serialize` output; any malformed input raises ``CorruptDataError``.

        ``max_total_size`` bounds the declared state size (the wire module's default
        when ``None``), so a hostile header cannot announce an absurd state.
        """
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        if max_total_size is None:
            fields = wire.decode_delta(data)
        else:
            fields = wire.decode_delta(data, max_total_size=max_total_size)
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            # The wire module checks every field; this is a second line of defence so a
            # hostile input can only ever surface as CorruptDataError.
            raise CorruptDataError(f"delta fields are inconsistent: {exc}") from None

    def __repr__(self) -> str:
        return (
            f"DeltaSnapshot(agent_id={self.agent_id.hex()}, sequence={self.sequence}, "
            f"base_sequence={self.base_sequence}, dirty_pages=<{len(self.dirty_pages)} pages>, "
            f"total_size={self.total_size}, timestamp={self.timestamp}, checksum={self.checksum}, "
            f"digest_algorithm={self.digest_algorithm!r}, keyed={self.keyed})"
        )
