"""Dirty-page deltas: ship only the 4 KiB pages that changed, apply them atomically.

:class:`DeltaSnapshot` is the crate's ``DeltaSnapshot`` with three fixes (SPEC §3, §6):

* ``create`` reads both states in place through the GIL-free kernels, in cache-sized
  chunks (the page comparison, the weighted checksum and the strong digest share one
  read of the data), and copies only the dirty pages;
* ``apply`` is atomic: every check (sizes, page indices, page decoding, the result's
  checksum, the strong digest or MAC of the result) runs *before* a byte of the base is
  written, so a bad delta leaves the base byte-for-byte unchanged;
* a strong digest (XXH3-128 by default, or BLAKE3, keyed BLAKE3 = a MAC) backs up the
  crate's weak checksum.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, cast

import blake3 as _blake3
import numpy as np
import numpy.typing as npt
import xxhash as _xxhash

from ._backend import kernels
from ._buffers import as_bytes_view, as_writable_view
from ._ids import IdLike, to_id
from .checksum import DIGEST_ALGORITHMS, KEY_SIZE, PAGE_SIZE
from .errors import CorruptDataError, InvalidStateError

__all__ = ["DirtyPage", "DeltaSnapshot", "ProgressCallback"]

#: ``progress(bytes_done, bytes_total)``, called from the calling thread between chunks.
ProgressCallback = Callable[[int, int], None]

_MASK32 = 0xFFFFFFFF
#: Digest sizes in bytes, per algorithm.
_DIGEST_SIZES = {"xxh3_128": 16, "blake3": 32}
#: Bytes per fused step: small enough that a chunk read for the page comparison is still
#: in cache when the checksum and the hasher read it again, big enough that the Python
#: loop costs nothing next to the kernels.
_CHUNK = 1 << 20
#: States under this size are processed on the calling thread only.
_PARALLEL_MIN = 16 << 20
_ZEROS = memoryview(bytes(_CHUNK))

_pool_lock = threading.Lock()
_pool: Optional[ThreadPoolExecutor] = None


def _threads() -> int:
    """Worker count: ``CELLMIGRATE_THREADS`` if set, else the CPU count (at least 1)."""
    env = os.environ.get("CELLMIGRATE_THREADS", "")
    if env.strip():
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads(), thread_name_prefix="cellmigrate-delta")
        return _pool


def _now() -> int:
    return int(time.time())


class _Hasher:
    """Streaming XXH3-128 or (keyed) BLAKE3; ``update`` takes buffers without copying."""

    def __init__(self, algorithm: str, key: Optional[bytes]) -> None:
        self._h: Any
        if algorithm == "xxh3_128":
            if key is not None:
                raise ValueError("a key needs algorithm='blake3' (xxh3_128 is not a MAC)")
            self._h = _xxhash.xxh3_128()
        elif algorithm == "blake3":
            if key is not None:
                self._h = _blake3.blake3(key=key, max_threads=_blake3.blake3.AUTO)
            else:
                self._h = _blake3.blake3(max_threads=_blake3.blake3.AUTO)
        else:
            raise ValueError(f"unknown digest algorithm {algorithm!r}; expected one of {DIGEST_ALGORITHMS}")

    def update(self, data: Any) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return bytes(self._h.digest())


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

    def __init__(self, index: int, data: Any, compressed: bool = False) -> None:
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

        ``max_output`` bounds the decoded size (``CorruptDataError`` past it); ``None``
        means one page.
        """
        if not self.compressed:
            return self.data
        bound = PAGE_SIZE if max_output is None else max_output
        return bytes(kernels.rle_decompress(as_bytes_view(self.data), bound))

    def __repr__(self) -> str:
        return f"DirtyPage(index={self.index}, data=<{len(self.data)} bytes>, compressed={self.compressed})"


# --------------------------------------------------------------------------------------
# create: fused page comparison + checksum (+ digest) over cache-sized chunks
# --------------------------------------------------------------------------------------


def _scan_range(old: memoryview, new: memoryview, start: int, stop: int) -> Tuple[List[npt.NDArray[np.int64]], int]:
    """Dirty page indices and positioned checksum of ``new[start:stop]`` (page-aligned start)."""
    found: List[npt.NDArray[np.int64]] = []
    total = 0
    for lo in range(start, stop, _CHUNK):
        hi = min(lo + _CHUNK, stop)
        n = new[lo:hi]
        idx = kernels.dirty_pages(old[lo:hi], n, PAGE_SIZE)
        # The chunk was just read by the comparison: the checksum reads it from cache.
        total = (total + int(kernels.checksum(n, lo))) & _MASK32
        if len(idx):
            found.append(idx + (lo // PAGE_SIZE))
    return found, total


def _split(n: int, parts: int) -> List[Tuple[int, int]]:
    """``parts`` page-aligned ranges covering ``[0, n)``."""
    step = -(-n // parts)
    step = max(PAGE_SIZE, -(-step // PAGE_SIZE) * PAGE_SIZE)
    return [(lo, min(lo + step, n)) for lo in range(0, n, step)]


def _scan(
    old: memoryview, new: memoryview, workers: int, progress: Optional[ProgressCallback]
) -> Tuple[npt.NDArray[np.int64], int]:
    """All dirty page indices and ``simple_checksum(new)``, with ``workers`` threads."""
    n = new.nbytes
    found: List[npt.NDArray[np.int64]] = []
    checksum = 0
    if workers > 1 and progress is None:
        # Page-aligned slices, one per thread (the caller's thread takes the first);
        # checksums are additive across slices.
        (lo0, hi0), *rest = _split(n, workers)
        futures = [_executor().submit(_scan_range, old, new, lo, hi) for lo, hi in rest]
        parts = [_scan_range(old, new, lo0, hi0)] + [f.result() for f in futures]
        for f, c in parts:
            found.extend(f)
            checksum = (checksum + c) & _MASK32
    else:
        step = _CHUNK * 16
        for lo in range(0, n, step):
            hi = min(lo + step, n)
            f, c = _scan_range(old, new, lo, hi)
            found.extend(f)
            checksum = (checksum + c) & _MASK32
            if progress is not None:
                progress(hi, n)
    indices = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
    return indices.astype(np.int64, copy=False), checksum


def _digest_of(view: memoryview, algorithm: str, key: Optional[bytes]) -> bytes:
    hasher = _Hasher(algorithm, key)
    hasher.update(view)
    return hasher.digest()


def _compress_pages(pages: Sequence[bytes]) -> List[Tuple[bytes, bool]]:
    out: List[Tuple[bytes, bool]] = []
    for raw in pages:
        packed = bytes(kernels.rle_compress(raw))
        out.append((packed, True) if len(packed) < len(raw) else (raw, False))
    return out


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
    (1, [1], 'xxh3_128')
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
        digest_algorithm: "xxh3_128", "blake3", or ``None`` for a checksum-only delta.
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
            if self.digest_algorithm not in _DIGEST_SIZES:
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
        old_state: Any,
        new_state: Any,
        base_sequence: int,
        sequence: int,
        *,
        digest: Optional[str] = "xxh3_128",
        key: Optional[bytes] = None,
        progress: Optional[ProgressCallback] = None,
    ) -> "DeltaSnapshot":
        """Diff two equal-length states page by page.

        Both states are read in place (any C-contiguous buffer); only the dirty pages
        are copied, each RLE-compressed when that makes it strictly smaller.
        ``digest`` names the strong digest of the new state ("xxh3_128", "blake3", or
        ``None`` for the crate's checksum-only delta); a 32-byte ``key`` makes it a keyed
        BLAKE3 MAC (``keyed=True``). ``progress(done, total)`` is called between chunks.
        Different lengths raise :class:`InvalidStateError`.
        """
        delta, _, _ = cls._create_checked(
            to_id(agent_id, "agent_id"), old_state, new_state, base_sequence, sequence, digest, key, progress
        )
        return delta

    @classmethod
    def _create_checked(
        cls,
        agent: bytes,
        old_state: Any,
        new_state: Any,
        base_sequence: int,
        sequence: int,
        digest: Optional[str],
        key: Optional[bytes],
        progress: Optional[ProgressCallback] = None,
    ) -> Tuple["DeltaSnapshot", npt.NDArray[np.int64], List[bytes]]:
        """Normalise ``digest``/``key`` (a key implies keyed BLAKE3), then :meth:`_create`."""
        raw_key = _check_key(key)
        algorithm = digest
        if algorithm is not None and algorithm not in _DIGEST_SIZES:
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
        old_state: Any,
        new_state: Any,
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
                f"State size mismatch: old state has {old.nbytes} bytes, new state has {new.nbytes} bytes"
            )
        digest_future = None
        workers = _threads() if new.nbytes >= _PARALLEL_MIN else 1
        if algorithm is not None and workers > 1:
            # The hasher is sequential: it gets a thread of its own beside the comparison.
            digest_future = _executor().submit(_digest_of, new, algorithm, key)
            workers -= 1
        indices, checksum = _scan(old, new, workers, progress)
        raw_pages: List[bytes] = list(kernels.gather_pages(new, indices, PAGE_SIZE))
        pages = [DirtyPage(int(i), data, packed) for i, (data, packed) in zip(indices, _compress_pages(raw_pages))]
        value: Optional[bytes] = None
        if digest_future is not None:
            value = digest_future.result()
        elif algorithm is not None:
            value = _digest_of(new, algorithm, key)
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
        if self.keyed and key is None:
            raise InvalidStateError("Delta is authenticated (keyed BLAKE3): a key is needed to apply it")
        if key is not None and not self.keyed:
            raise InvalidStateError(
                "Delta is not authenticated but a key was given: refusing an unauthenticated delta"
            )
        if self.digest_algorithm is not None:
            size = _DIGEST_SIZES.get(self.digest_algorithm)
            if size is None:
                raise InvalidStateError(f"Delta names an unknown digest algorithm {self.digest_algorithm!r}")
            if self.digest is None or len(self.digest) != size:
                raise InvalidStateError(
                    f"Delta {self.digest_algorithm} digest has {len(self.digest or b'')} bytes, expected {size}"
                )

    def apply(self, base: Any, *, key: Optional[bytes] = None, progress: Optional[ProgressCallback] = None) -> None:
        """Write the delta's pages into ``base``, after verifying everything.

        ``base`` is a writable buffer (bytearray, writable memoryview, writable mmap,
        numpy array) of exactly ``total_size`` bytes, or a shorter ``bytearray`` that is
        then grown with zeros. Before any write, the page indices (in range, unique), the
        page encodings and lengths, the checksum of the result and its strong digest (or
        MAC: pass ``key`` for a keyed delta) are verified; any failure raises
        :class:`InvalidStateError` saying which check failed, and ``base`` is left
        byte-for-byte unchanged (and not grown). A read-only buffer raises ``TypeError``.
        """
        raw_key = _check_key(key)
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
        self._check_key_policy(raw_key)
        indices, pages = self._decoded_pages()
        checksum, value = self._result_checks(view, indices, pages, raw_key, progress)
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
            try:
                base.extend(bytes(total - size))
            except BufferError as exc:
                raise InvalidStateError(f"Base state is too small and cannot be grown: {exc}") from None
            view = as_writable_view(base, "base")
        kernels.scatter_pages(view, indices, pages, PAGE_SIZE)

    def _result_checks(
        self,
        view: memoryview,
        indices: List[int],
        pages: List[bytes],
        key: Optional[bytes],
        progress: Optional[ProgressCallback],
    ) -> Tuple[int, Optional[bytes]]:
        """Checksum and digest of base-with-pages-applied, computed without writing.

        The result is streamed as segments (runs of base bytes, zeros past the end of a
        short base, and the new pages), in order, through the positioned checksum and the
        hasher; a streaming hash gives the same digest however the input is split.
        """
        size, total = view.nbytes, self.total_size
        hasher = None if self.digest_algorithm is None else _Hasher(self.digest_algorithm, key)
        checksum = 0
        pos = 0
        k = 0
        npages = len(indices)
        done_report = 0
        seg: Any
        while pos < total:
            if k < npages and indices[k] * PAGE_SIZE == pos:
                seg = pages[k]
                k += 1
            else:
                nxt = indices[k] * PAGE_SIZE if k < npages else total
                end = min(nxt, pos + _CHUNK)
                if pos < size:
                    seg = view[pos : min(end, size)]
                else:
                    seg = _ZEROS[: end - pos]
            n = len(seg)
            checksum = (checksum + int(kernels.checksum(seg, pos))) & _MASK32
            if hasher is not None:
                hasher.update(seg)
            pos += n
            if progress is not None and pos - done_report >= _CHUNK * 16:
                done_report = pos
                progress(pos, total)
        if progress is not None:
            progress(total, total)
        return checksum, None if hasher is None else hasher.digest()

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
    def deserialize(cls, data: Any, *, max_total_size: Optional[int] = None) -> "DeltaSnapshot":
        """Parse :meth:`serialize` output; any malformed input raises ``CorruptDataError``.

        ``max_total_size`` bounds the declared state size (the wire module's default
        when ``None``), so a hostile header cannot announce an absurd state.
        """
        from . import wire  # type: ignore[attr-defined,unused-ignore]

        if max_total_size is None:
            return cls(**wire.decode_delta(data))
        return cls(**wire.decode_delta(data, max_total_size=max_total_size))

    def __repr__(self) -> str:
        return (
            f"DeltaSnapshot(agent_id={self.agent_id.hex()}, sequence={self.sequence}, "
            f"base_sequence={self.base_sequence}, dirty_pages=<{len(self.dirty_pages)} pages>, "
            f"total_size={self.total_size}, timestamp={self.timestamp}, checksum={self.checksum}, "
            f"digest_algorithm={self.digest_algorithm!r}, keyed={self.keyed})"
        )
