"""Delta files in bounded memory: the CLI's ``diff`` and ``apply`` a window at a time.

``DeltaSnapshot.create`` holds every dirty page it copied and ``apply`` decodes every
page into one buffer before writing: fine for a delta in memory, not for files of any
size. Here the same passes run over the state one window (:data:`WINDOW` bytes) at a
time, so the memory a command uses is a few windows plus the page table (11-21 bytes a
dirty page), whatever the delta's size:

* :func:`create_file` scans OLD and NEW window by window with the pass functions of
  ``cellmigrate._passes`` (one hasher fed across windows in order, the positioned
  checksums summed), encodes each window's pages and writes their payload straight into
  the output file at its final offset; then the page table, the header and the trailer.
  A zstd payload is compressed from the file into a spool and copied back in the kernel.
  The bytes are exactly ``DeltaSnapshot.create(...).serialize()``'s for the same inputs
  and timestamp (``tests/test_cli_memory.py`` pins it).
* :class:`WindowedApply` verifies a delta (read from a memory-mapped file: its pages are
  views of the file) against a base window by window (checksum, digest or MAC, header
  digest: every check ``DeltaSnapshot.apply`` makes, before anything is written), then
  decodes the windows again to write them; a window whose decoded pages differ from
  what was verified (the delta or base file changed in between) stops the write.

The compiled kernels and ``_passes`` are used as they are; this module only cuts the
work into windows.
"""

from __future__ import annotations

import hmac
import os
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, TypeVar, cast

import numpy as np
import numpy.typing as npt
import xxhash

from ._backend import kernels
from ._pages import ALLOW_ALL, ALLOW_RAW, ALLOW_XZR, DecodedPages, PageBatch, PageEncoding, encode_batch, zstd_frame_pieces, zstd_sample_rejects
from ._parallel import max_threads, run_spans
from ._passes import Overlay, Result, _claimed_chunks, _fused, _scan_alone, _scan_fused
from ._tree import LEAF_SIZE
from .checksum import DIGEST_SIZES, PAGE_SIZE, Hasher
from .errors import InvalidStateError, StateChangedError
from .statefile import StateFile, copy_range, hook_delay, write_all

__all__ = ["WINDOW", "StreamedDelta", "create_file", "WindowedApply"]

#: Bytes of state handled per step (a multiple of the tree digest's 1 MiB leaf). At 100%
#: dirty a step holds its page copies and their encoded payload: about 2x this.
WINDOW = 4 << 20

_MASK32 = 0xFFFFFFFF

_I64 = npt.NDArray[np.int64]
#: What a window's scan found: dirty page indices, the pages as copied, the checksum of
#: "base + copies" over the window (positioned), the pages' XZR hints (or None).
_Found = Tuple[_I64, List[bytes], int, Optional[npt.NDArray[np.uint16]]]


def _spans(lo: int, hi: int, align: int) -> List[Tuple[int, int]]:
    """``[lo, hi)`` cut into pieces for the threads to claim: 1 MiB leaves (or ``align``
    multiples near that size), so a thread whose core is busy elsewhere takes fewer of a
    window's pieces instead of the window waiting for its fixed half."""
    if max_threads() <= 1 or hi - lo < 2 * align:
        return [(lo, hi)]
    step = max(align, LEAF_SIZE // align * align)
    return [(a, min(a + step, hi)) for a in range(lo, hi, step)]


T = TypeVar("T")


def _claimed(spans: List[Tuple[int, int]], fn: Callable[[int, int], T]) -> List[T]:
    """``[fn(lo, hi) for each span]``, the spans claimed one at a time by the pool's threads
    (the calling thread among them: ``_passes._claimed_chunks``); the results in span order."""
    results: List[Any] = [None] * len(spans)

    def work(k: int, lo: int, hi: int) -> None:
        results[k] = fn(lo, hi)

    _claimed_chunks(spans, work)
    return results


def _windows(total: int, window: int) -> List[Tuple[int, int]]:
    return [(lo, min(lo + window, total)) for lo in range(0, total, window)]


# --------------------------------------------------------------------------------------
# create
# --------------------------------------------------------------------------------------


class StreamedDelta:
    """What :func:`create_file` wrote: the facts ``cellmigrate diff`` reports (the
    attributes and methods of ``DeltaSnapshot`` its summary reads), without the pages."""

    def __init__(self, **fields: Any) -> None:
        self.agent_id: bytes = fields["agent_id"]
        self.sequence: int = fields["sequence"]
        self.base_sequence: int = fields["base_sequence"]
        self.total_size: int = fields["total_size"]
        self.base_size: int = fields["base_size"]
        self.timestamp: int = fields["timestamp"]
        self.checksum: int = fields["checksum"]
        self.digest_algorithm: Optional[str] = fields["digest_algorithm"]
        self.digest: Optional[bytes] = fields["digest"]
        self.keyed: bool = fields["keyed"]
        self.compression: str = fields["compression"]
        self.wire_version = 2
        self.wire_size: int = fields["wire_size"]
        self._count: int = fields["count"]
        self._stored: int = fields["stored"]
        self._counts: Dict[str, Tuple[int, int]] = fields["counts"]

    def dirty_page_count(self) -> int:
        return self._count

    def encoding_counts(self) -> Dict[str, Tuple[int, int]]:
        return dict(self._counts)

    def stored_size(self) -> int:
        return self._stored

    def uncompressed_size(self) -> int:
        return self._count * PAGE_SIZE


class _Table:
    """The page table's four columns, window after window, as the file stores them (11
    bytes a dirty page: u32 indices, u16 stored lengths, u32 page checks, u8 encodings),
    with where each window's payload starts; written to the file column by column, never
    joined in memory."""

    def __init__(self) -> None:
        self.columns: Tuple[List[Any], List[Any], List[Any], List[Any]] = ([], [], [], [])
        self.starts: List[int] = []  # payload offset of each window's first page
        self.count = 0
        self.pages = np.zeros(len(PageEncoding), dtype=np.int64)
        self.stored = np.zeros(len(PageEncoding), dtype=np.int64)

    def add(self, batch: PageBatch, start: int) -> None:
        """Take a window's encoded pages, whose payload starts at ``start``. ``ValueError``
        for an index the 4-byte column cannot hold (a state over 16 TiB)."""
        indices, lengths = batch.indices, batch.stored_lengths()
        if int(indices[-1]) > 0xFFFFFFFF:
            k = self.count + int(np.argmax(indices > 0xFFFFFFFF))
            raise ValueError(f"page {k}: index {int(indices[k - self.count])} does not fit the 4-byte index field")
        if int(lengths.max()) > 0xFFFF:  # pragma: no cover - pages are <= 3 x 4096 bytes
            raise ValueError("stored page data does not fit the 2-byte length field")
        encodings = np.asarray(batch.encodings, dtype=np.uint8)
        for column, values in zip(self.columns, (indices.astype("<u4"), lengths.astype("<u2"),
                                                 np.asarray(batch.checks).astype("<u4"), encodings)):
            column.append(values)
        self.starts.append(start)
        self.count += len(indices)
        self.pages += np.bincount(encodings, minlength=len(PageEncoding))
        self.stored += np.bincount(encodings, weights=lengths, minlength=len(PageEncoding)).astype(np.int64)

    def windows(self) -> Iterator[Tuple[_I64, Any, _I64, Any]]:
        """``(indices, encodings, payload offsets, checks)`` of each window's pages."""
        for indices, lengths, checks, encodings, start in zip(*self.columns, self.starts):
            offsets = np.empty(len(lengths) + 1, dtype=np.int64)
            offsets[0] = start
            np.cumsum(lengths, out=offsets[1:])
            offsets[1:] += start
            yield indices.astype(np.int64), encodings, offsets, checks

    def write(self, fd: int, offset: int) -> int:
        """Write the table at ``offset`` in ``fd``; return its size."""
        for column in self.columns:
            for values in column:
                write_all(fd, memoryview(values).cast("B"), offset)
                offset += values.nbytes
        return PAGE_ENTRY_BYTES * self.count

    def counts(self) -> Dict[str, Tuple[int, int]]:
        """``{encoding label: (pages, stored bytes)}`` (``PageBatch.counts``)."""
        return {e.label: (int(self.pages[e]), int(self.stored[e])) for e in PageEncoding}


#: Bytes of one page-table entry (its four columns).
PAGE_ENTRY_BYTES = 11


def _flatten(chunks: Sequence[Tuple[_I64, List[bytes], int]]) -> _Found:
    found = [idx for idx, _, _ in chunks if len(idx)]
    indices = np.concatenate(found).astype(np.int64, copy=False) if found else np.empty(0, dtype=np.int64)
    pages = [page for _, chunk_pages, _ in chunks for page in chunk_pages]
    return indices, pages, sum(c for _, _, c in chunks) & _MASK32, None


def _scan_windows(
    old: memoryview, new: memoryview, hasher: Optional[Hasher], window: int,
    progress: Optional[Callable[[int, int], None]], xzr_hints: bool = False,
) -> Iterator[_Found]:
    """Each window's dirty pages (copied), in order, with the checksum of "base + copies";
    ``hasher`` is fed every byte of that state in order.

    Tree digest (or none): each window is cut into leaf-aligned spans scanned and hashed
    on every thread (forks of the hasher joined in order), as ``_passes.scan`` does for
    a whole state. A sequential digest: the calling thread hashes window k while a pool
    thread scans window k + 1. ``xzr_hints``: the fused pass records them (see
    ``_passes.scan``); the other passes yield None.
    """
    n = new.nbytes
    base = Overlay(old, n)
    windows = _windows(n, window)
    if old.nbytes >= n and (hasher is None or hasher.splittable) and _fused(hasher is not None):
        # The fused leaf kernel (compare, copy, checksum and leaf hash in one read):
        # ``_passes.scan``'s own pass, on each window cut in leaf-aligned spans.
        for lo, hi in windows:
            found = _scan_fused(old, new, hasher, None, _spans(lo, hi, LEAF_SIZE), xzr_hints)
            yield found.indices, found.pages, found.checksum, found.xzr_hints
            del found
            if progress is not None:
                progress(hi, n)
        return

    def scan_alone(lo: int, hi: int, sink: Optional[Hasher]) -> List[Tuple[_I64, List[bytes], int]]:
        return _scan_alone(base, new, lo, hi, sink, None)

    if hasher is None or hasher.splittable:
        for lo, hi in windows:
            spans = _spans(lo, hi, PAGE_SIZE if hasher is None else LEAF_SIZE)
            sinks = {a: (hasher if hasher is None or len(spans) == 1 else hasher.fork()) for a, _ in spans}
            parts = _claimed(spans, lambda a, b: scan_alone(a, b, sinks[a]))
            if hasher is not None and len(spans) > 1:
                hasher.join([cast(Hasher, sinks[a]) for a, _ in spans])
            yield _flatten([c for part in parts for c in part])
            if progress is not None:
                progress(hi, n)
        return

    def hash_window(lo: int, hi: int, found: _Found) -> None:
        idx, pages, _, _ = found
        base.hash_span(hasher, lo, hi, (idx * PAGE_SIZE).tolist() if len(idx) else [], pages)

    previous: Optional[Tuple[int, int, _Found]] = None
    for lo, hi in windows + [(-1, -1)]:
        if previous is None and lo < 0:
            return  # an empty state
        if previous is None:
            current = _flatten(scan_alone(lo, hi, None))
        elif lo < 0:
            hash_window(*previous)
        else:
            done = run_spans(
                lambda who, _: hash_window(*previous) if who == 0 else _flatten(scan_alone(lo, hi, None)),  # type: ignore[misc]
                [(0, 0), (1, 0)],
            )
            current = cast(_Found, done[1])
        if previous is not None:
            yield previous[2]
            if progress is not None:
                progress(previous[1], n)
        if lo >= 0:
            previous = (lo, hi, current)


def create_file(
    fd: int,
    agent_id: bytes,
    old: memoryview,
    new: memoryview,
    base_sequence: int,
    sequence: int,
    *,
    algorithm: Optional[str],
    key: Optional[bytes],
    plan: Tuple[int, Optional[int], bool],
    timestamp: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
    recheck: Optional[Callable[[DecodedPages], None]] = None,
    window: int = WINDOW,
) -> StreamedDelta:
    """Write the serialized delta from ``old`` to ``new`` into ``fd`` (an empty regular
    file, read-write), in memory bounded by ``window``; return what was written.

    The arguments are those of ``DeltaSnapshot._create`` (``plan``: what
    ``_pages.parse_compress`` returns; sizes already checked by the caller: a delta
    between different sizes is made when they differ). ``timestamp`` defaults to now.
    ``recheck``, if given, is called with each window's decoded pages after the scan
    (the CLI compares them with NEW as it is then). Raises ``OSError`` for a failed
    write (a full disk), ``ValueError`` for a state the format cannot describe.
    """
    if window <= 0 or window % LEAF_SIZE:
        raise ValueError(f"window must be a positive multiple of {LEAF_SIZE} bytes")
    hasher = None if algorithm is None else Hasher(algorithm, key)
    allowed, level, auto = plan
    digest_length = 0 if algorithm is None else DIGEST_SIZES[algorithm]
    payload_start = 96 + 2 * digest_length
    table = _Table()
    checksum = 0
    pos = payload_start
    xzr = bool(allowed & ALLOW_XZR)
    for indices, pages, part, hints in _scan_windows(old, new, hasher, window, progress, xzr):
        checksum += part
        if not len(indices):
            continue
        batch = encode_batch(old, pages, indices, allowed, hints)
        del pages
        size = batch.payload_size
        write_all(fd, memoryview(batch.payload)[:size], pos)
        table.add(batch, pos - payload_start)
        pos += size
        del batch
    checksum &= _MASK32
    value = None if hasher is None else hasher.digest()
    if timestamp is None:
        timestamp = int(time.time())
    payload_size = pos - payload_start

    with StateFile("delta", fd=os.dup(fd), length=pos) as written:
        payload = memoryview(written.buffer)[payload_start:pos] if pos > payload_start else memoryview(b"")
        try:
            if recheck is not None:
                for indices, encodings, offsets, checks in table.windows():
                    batch = PageBatch(indices, encodings, offsets, payload, checks)
                    recheck(batch.decode(old, new.nbytes, ALLOW_ALL))
                    del batch
            compression, wire_payload = _compress(fd, payload, payload_start, level, auto)
        finally:
            payload.release()

    from .wire import header_digest, pack_header

    bound = b""
    if algorithm is not None and value is not None:
        bound = header_digest(
            algorithm=algorithm, keyed=key is not None, compression=compression, agent_id=agent_id,
            sequence=sequence, base_sequence=base_sequence, total_size=new.nbytes, base_size=old.nbytes,
            timestamp=timestamp, checksum=checksum, state_digest=value, key=key,
        )
    header = pack_header(
        algorithm=algorithm, keyed=key is not None, digest_length=digest_length, compression=compression,
        agent_id=agent_id, sequence=sequence, base_sequence=base_sequence, total_size=new.nbytes,
        base_size=old.nbytes, timestamp=timestamp, checksum=checksum, page_count=table.count,
        payload_wire=wire_payload, payload_size=payload_size,
    )
    body_end = payload_start + wire_payload + table.write(fd, payload_start + wire_payload)
    write_all(fd, header + (value or b"") + bound, 0)
    os.ftruncate(fd, body_end)
    hasher_all = xxhash.xxh3_128()
    with StateFile("delta", fd=os.dup(fd), length=body_end) as written:
        with memoryview(written.buffer) as body:
            for start in range(0, body_end, window):
                hasher_all.update(body[start : start + window])
        written.check()
    write_all(fd, hasher_all.digest(), body_end)
    return StreamedDelta(
        agent_id=agent_id, sequence=sequence, base_sequence=base_sequence, total_size=new.nbytes,
        base_size=old.nbytes, timestamp=timestamp, checksum=checksum, digest_algorithm=algorithm,
        digest=value, keyed=key is not None, compression=compression, wire_size=body_end + 16,
        count=table.count, stored=payload_size, counts=table.counts(),
    )


def _compress(fd: int, payload: memoryview, payload_start: int, level: Optional[int], auto: bool) -> Tuple[str, int]:
    """Whether the payload (at ``payload_start`` in ``fd``, also mapped as ``payload``)
    goes as one zstd frame, decided as ``_pages.choose_compression`` does; if so the
    frame replaces it in the file. Returns the compression and the stored payload size."""
    size = payload.nbytes
    if level is None or (auto and zstd_sample_rejects(payload, level)):
        return "none", size
    with tempfile.TemporaryFile() as spool:
        sink = spool.fileno()
        done = [0]

        def emit(piece: bytes) -> None:
            write_all(sink, piece, done[0])
            done[0] += len(piece)

        frame = zstd_frame_pieces(payload, level, emit)
        if auto and frame >= size:
            return "none", size
        copy_range(sink, fd, frame, what="zstd spool", dst_offset=payload_start)
    return "zstd", frame


# --------------------------------------------------------------------------------------
# apply
# --------------------------------------------------------------------------------------


class WindowedApply:
    """A delta's pages verified against a base, then written, one window at a time.

    ``delta`` is a ``DeltaSnapshot`` (read from a file: its pages are views of it);
    ``total`` its state size. :meth:`verify` runs every check of ``DeltaSnapshot.apply``
    on ``base`` (a buffer of the base, ``total`` bytes, or shorter: zeros past its end)
    without writing; :meth:`windows` then yields each window's decoded pages, checked to
    be exactly what was verified.
    """

    def __init__(self, delta: Any, *, window: int = WINDOW) -> None:
        if window <= 0 or window % LEAF_SIZE:
            raise ValueError(f"window must be a positive multiple of {LEAF_SIZE} bytes")
        self.delta = delta
        self.total = int(delta.total_size)
        self.window = window
        store = delta.__dict__.get("_store")
        raw = store.raw_pages() if store is not None else None
        if raw is not None:
            # Made by create and untouched: the pages as its scan copied them, as
            # DeltaSnapshot.apply writes them (no decoding, no base needed).
            indices, pages = raw
            enc, off, chk, payload = kernels.encode_page_list(b"", pages, indices, PAGE_SIZE, ALLOW_RAW)
            self.batch = PageBatch(indices, enc, off, payload, chk)
        else:
            self.batch = delta._page_batch().sorted_unique(InvalidStateError)
        self.indices: _I64 = self.batch.indices
        starts = range(0, max(self.total, 1), window)
        edges = np.arange(len(starts) + 1, dtype=np.int64) * (window // PAGE_SIZE)
        bounds = np.searchsorted(self.indices, edges).tolist()
        bounds[-1] = len(self.indices)  # an index out of range lands in the last window (refused there)
        self._ranges = [(lo, min(lo + window, self.total), bounds[k], bounds[k + 1]) for k, lo in enumerate(starts)]
        self._hashes: Optional[List[bytes]] = None
        self._seal = os.urandom(32)

    def _decode(self, ka: int, kb: int, base: memoryview) -> DecodedPages:
        b = self.batch
        sub = PageBatch(b.indices[ka:kb], b.encodings[ka:kb], b.offsets[ka : kb + 1], b.payload)
        return sub.decode(base, self.total, ALLOW_ALL, error=InvalidStateError)

    def _fingerprint(self, decoded: DecodedPages) -> bytes:
        """What ties the written pages to the verified ones: XXH3-128 of the decoded
        window (keyed BLAKE3 under a per-run secret for an authenticated delta)."""
        used = memoryview(decoded.buffer.data).cast("B")  # type: ignore[arg-type,unused-ignore]
        if len(decoded.indices):  # the state's short last page fills only part of its slot
            used = used[: min(len(used), self.total - int(decoded.indices[-1]) * PAGE_SIZE + (len(used) - PAGE_SIZE))]
        if self.delta.keyed:
            import blake3

            return bytes(blake3.blake3(used, key=self._seal).digest())
        return bytes(xxhash.xxh3_128_digest(used))

    def verify(self, base: memoryview, key: Optional[bytes], progress: Optional[Callable[[int, int], None]] = None) -> None:
        """Every check of ``DeltaSnapshot.apply`` on "base + the delta's pages": page
        decoding, the checksum, the digest or MAC and the header digest. Raises
        :class:`InvalidStateError` in its words; nothing is written."""
        delta = self.delta
        delta._check_key_policy(key)
        total = self.total
        hasher = None if delta.digest_algorithm is None else Hasher(delta.digest_algorithm, key)
        checksum = 0
        hashes: List[bytes] = []
        for lo, hi, ka, kb in self._ranges:
            decoded = self._decode(ka, kb, base)
            hashes.append(self._fingerprint(decoded))
            result = Result(base, total, decoded.indices, decoded.views())
            checksum += _check_window(result, lo, hi, hasher)
            del result, decoded
            if progress is not None:
                progress(min(hi, max(total - 1, 0)), total)
        checksum &= _MASK32
        if checksum != delta.checksum:
            raise InvalidStateError(
                f"Delta checksum mismatch: the result would have checksum {checksum}, the delta says {delta.checksum}"
            )
        if hasher is not None and delta.digest is not None:
            value = hasher.digest()
            if not hmac.compare_digest(value, delta.digest):
                if delta.keyed:
                    raise InvalidStateError("Delta authentication failed: BLAKE3 MAC mismatch (wrong key or tampered delta)")
                raise InvalidStateError(f"Delta {delta.digest_algorithm} digest mismatch: the result is not the new state")
            delta._check_header_digest(value, key)
        self._hashes = hashes

    def windows(self, base: memoryview) -> Iterator[Tuple[int, int, DecodedPages]]:
        """``(lo, hi, decoded pages)`` of each window with pages, after :meth:`verify`;
        a window that does not decode to what was verified raises
        :class:`StateChangedError` (the caller undoes what it wrote)."""
        if self._hashes is None:
            raise RuntimeError("verify() first")
        for (lo, hi, ka, kb), expected in zip(self._ranges, self._hashes):
            if ka == kb:
                continue
            decoded = self._decode(ka, kb, base)
            if not hmac.compare_digest(self._fingerprint(decoded), expected):
                raise StateChangedError(
                    "the delta or the base changed between verification and writing (another process wrote "
                    "to it)"
                )
            yield lo, hi, decoded

    def runs(self, decoded: DecodedPages) -> Iterator[Tuple[int, memoryview]]:
        """``(offset, bytes)`` runs of consecutive pages of a decoded window (cut to the state's size)."""
        idx = decoded.indices
        if not len(idx):
            return
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        starts = np.concatenate(([0], breaks)).tolist()
        ends = np.concatenate((breaks, [len(idx)])).tolist()
        buf = memoryview(decoded.buffer.data).cast("B")  # type: ignore[arg-type,unused-ignore]
        for a, b in zip(starts, ends):
            offset = int(idx[a]) * PAGE_SIZE
            length = min((b - a) * PAGE_SIZE, self.total - offset)
            yield offset, buf[a * PAGE_SIZE : a * PAGE_SIZE + length]

    def write_into(
        self, fd: int, base: memoryview, progress: Optional[Callable[[int, int], None]] = None,
        write: Callable[[int, memoryview, int], None] = write_all,
    ) -> int:
        """``pwrite`` the verified pages into ``fd`` (the file ``base`` maps, or a copy of
        it) with ``write(fd, data, offset)``, window by window; returns the pages written."""
        count = 0
        for _lo, hi, decoded in self.windows(base):
            for offset, data in self.runs(decoded):
                write(fd, data, offset)
                hook_delay()
            count += len(decoded)
            if progress is not None:
                progress(min(hi, max(self.total - 1, 0)), self.total)
        return count

    def write_stream(self, fd: int, base: memoryview, chunk: int = WINDOW) -> None:
        """Write the whole verified result (``total`` bytes: the base with the pages over
        it, zeros past the base's end) to the stream ``fd``, front to back."""
        total, size = self.total, min(base.nbytes, self.total)
        zeros = memoryview(bytes(min(chunk, max(total - size, 0))))
        pos = 0

        def base_until(end: int) -> None:
            nonlocal pos
            while pos < end:
                stop = min(end, pos + chunk)
                if pos < size:
                    stop = min(stop, size)
                    write_all(fd, base[pos:stop])
                else:
                    write_all(fd, zeros[: stop - pos])
                pos = stop

        for _lo, _hi, decoded in self.windows(base):
            for offset, data in self.runs(decoded):
                base_until(offset)
                write_all(fd, data)
                pos = offset + data.nbytes
        base_until(total)


def _check_window(result: Result, lo: int, hi: int, hasher: Optional[Hasher]) -> int:
    """Checksum of result bytes ``[lo, hi)``, ``hasher`` fed them in order: spread over
    the threads as ``Result.checks`` does for a whole state (leaf-aligned spans with
    forks of a tree hasher; a sequential hasher on this thread beside the checksum on
    another)."""
    if hasher is not None and hasher.splittable and result.size == result.total and _fused(True):
        return result.fused(hasher, None, _spans(lo, hi, LEAF_SIZE))
    if hasher is None or hasher.splittable:
        spans = _spans(lo, hi, PAGE_SIZE if hasher is None else LEAF_SIZE)
        sinks = {a: (hasher if hasher is None or len(spans) == 1 else hasher.fork()) for a, _ in spans}
        parts = _claimed(spans, lambda a, b: result.checksum_alone(a, b, sinks[a], None))
        if hasher is not None and len(spans) > 1:
            hasher.join([cast(Hasher, sinks[a]) for a, _ in spans])
        return sum(parts) & _MASK32
    if max_threads() <= 1:
        return result.checksum_alone(lo, hi, hasher, None)
    def work(who: int, _unused: int) -> int:
        if who == 0:
            result.hash_range(hasher, lo, hi)
            return 0
        return result.checksum_alone(lo, hi, None, None)

    return run_spans(work, [(0, 0), (1, 0)])[1] & _MASK32

