"""How deltas hold, choose, ship and stream their pages (``cellmigrate._pages``, wire v2).

Page choice per ``compress``, the public ``dirty_pages`` view over the batch (SPEC §4: a
changed list is what apply and serialize use), zstd payloads, the streaming writer, the
zero-copy reader, and the per-chunk batch API the live stream uses.
"""

from __future__ import annotations

import io
import mmap
import os
import random
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest

from cellmigrate import PAGE_SIZE, CorruptDataError, InvalidStateError
from cellmigrate._pages import (
    ALLOW_ALL, ALLOW_CRATE, PageBatch, PageEncoding, _zstd_job_size, encode_batch, parse_compress, zstd_payload,
    zstd_sample_rejects,
)
from cellmigrate.delta import DeltaSnapshot, DirtyPage
from cellmigrate.wire import prepare_delta

AGENT = bytes(range(16))


def _states(seed: int = 1) -> Tuple[bytes, bytes]:
    rng = random.Random(seed)
    old = rng.randbytes(8 * PAGE_SIZE + 300)
    new = bytearray(old)
    new[0:PAGE_SIZE] = bytes(PAGE_SIZE)  # zero
    new[PAGE_SIZE + 1000 : PAGE_SIZE + 1064] = rng.randbytes(64)  # XZR
    new[2 * PAGE_SIZE : 3 * PAGE_SIZE] = b"\x05" * PAGE_SIZE  # RLE
    new[3 * PAGE_SIZE : 4 * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)  # raw
    new[-5] ^= 1  # short last page: XZR
    return old, bytes(new)


@pytest.mark.parametrize("compress, counts", [
    ("auto", {"zero": 1, "xzr": 2, "rle": 1, "raw": 1}),
    ("xor", {"zero": 1, "xzr": 2, "rle": 1, "raw": 1}),
    ("rle", {"zero": 0, "xzr": 0, "rle": 2, "raw": 3}),
    ("none", {"zero": 0, "xzr": 0, "rle": 0, "raw": 5}),
    ("zstd:5", {"zero": 1, "xzr": 2, "rle": 1, "raw": 1}),
])
def test_create_chooses_encodings_per_compress(compress: str, counts: dict) -> None:
    old, new = _states()
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress=compress)
    assert {k: n for k, (n, _) in delta.encoding_counts().items()} == counts
    if compress == "auto":  # zstd only when it is strictly smaller
        pages_only = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="xor")
        assert (delta.compression == "zstd") == (len(delta.serialize()) < len(pages_only.serialize()))
    else:
        assert delta.compression == ("zstd" if compress.startswith("zstd") else "none")
    back = DeltaSnapshot.deserialize(delta.serialize())
    assert back == delta and back.compression == delta.compression
    target = bytearray(old)
    back.apply(target)
    assert target == new
    # The public list shows the crate's pages (each decodes without a base).
    assert all(p.get_data() == new[p.index * PAGE_SIZE : (p.index + 1) * PAGE_SIZE] for p in delta.dirty_pages)


def test_compress_choices_and_checksum_only() -> None:
    assert parse_compress("auto", digest=False) == (ALLOW_CRATE, None, False)
    assert parse_compress("auto", digest=True)[0] == ALLOW_ALL
    for bad in ("zstd:0", "zstd:23", "zstd:x", "zstd:", "auto:", "none:", "xor:", ":3", "lz5", "rle:3", ""):
        with pytest.raises(ValueError):
            parse_compress(bad, digest=True)
    with pytest.raises(ValueError, match="strong digest"):
        parse_compress("xor", digest=False)
    old, new = _states()
    crate = DeltaSnapshot.create(AGENT, old, new, 1, 2, digest=None)
    assert crate.encoding_counts()["xzr"][0] == 0 and crate.encoding_counts()["zero"][0] == 0


def test_xzr_in_a_checksum_only_delta_is_refused_by_the_reader() -> None:
    old, new = _states()
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="xor")
    delta.digest_algorithm, delta.digest, delta.header_digest = None, None, None
    with pytest.raises(CorruptDataError, match="unknown encoding 3"):
        DeltaSnapshot.deserialize(delta.serialize())


def test_auto_zstd_only_when_it_wins() -> None:
    counters = np.arange(64 * PAGE_SIZE // 8, dtype="<i8")
    bumped = counters.copy()
    bumped[::5] += 1
    low = DeltaSnapshot.create(AGENT, counters.tobytes(), bumped.tobytes(), 1, 2)
    assert low.compression == "zstd"
    plain = DeltaSnapshot.create(AGENT, counters.tobytes(), bumped.tobytes(), 1, 2, compress="xor")
    assert len(low.serialize()) < len(plain.serialize())
    rng = np.random.default_rng(3)
    old = rng.bytes(64 * PAGE_SIZE)
    noisy = DeltaSnapshot.create(AGENT, old, rng.bytes(64 * PAGE_SIZE), 1, 2)
    assert noisy.compression == "none"


def test_zstd_sample_looks_at_a_quarter_first_then_at_all_of_it() -> None:
    # Payloads over 1 MiB: 16 windows of 64 KiB; windows 0, 4, 8, 12 first, and only if
    # they shrink at all the other twelve (the decision is on all sixteen).
    rng = np.random.default_rng(8)
    window, step = 64 << 10, (4 << 20) // 16
    random = rng.bytes(4 << 20)
    assert zstd_sample_rejects(random, 1)
    assert not zstd_sample_rejects(bytes(4 << 20), 1)
    assert zstd_sample_rejects(b"", 1) and not zstd_sample_rejects(bytes(1 << 20), 1)
    mixed = bytearray(random)  # the first look's windows compress, the others do not:
    for k in range(0, 16, 4):
        mixed[k * step : k * step + window] = bytes(window)
    assert not zstd_sample_rejects(bytes(mixed), 1)  # a quarter shrinks to nothing: 75% < 90%
    mostly = bytearray(4 << 20)  # the first look's windows random, the others zeros
    for k in range(0, 16, 4):
        mostly[k * step : k * step + window] = rng.bytes(window)
    assert zstd_sample_rejects(bytes(mostly), 1)  # the first look found nothing: no second


@pytest.mark.parametrize("size", [8 << 20, 16 << 20, (16 << 20) + 4096, 3 * 528384, 1 << 30])
def test_zstd_jobs_never_divide_the_payload(size: int) -> None:
    # A payload of whole jobs compressed to two different frames (an empty last block or
    # not, as zstd's workers allowed): the job size is chosen so that the last job is short.
    job = _zstd_job_size(size)
    assert job >= 512 << 10 and size % job != 0


def test_big_zstd_payloads_compress_to_one_frame_every_time() -> None:
    import zstandard

    payload = np.random.default_rng(5).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()  # 32 jobs of 512 KiB
    frames = {zstd_payload(payload, 3) for _ in range(6)}  # multi-threaded (over 8 MiB)
    assert len(frames) == 1
    assert zstandard.ZstdDecompressor().decompress(frames.pop()) == payload


def test_changed_page_list_is_what_apply_and_serialize_use() -> None:
    old, new = _states()
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2)
    pages = delta.dirty_pages
    page = pages[3]  # the raw page
    forged = bytearray(page.get_data())
    forged[7] ^= 0x40
    pages[3] = DirtyPage(page.index, bytes(forged))
    target = bytearray(old)
    with pytest.raises(InvalidStateError, match="mismatch"):
        delta.apply(target)
    assert target == old
    with pytest.raises(InvalidStateError):
        DeltaSnapshot.deserialize(delta.serialize()).apply(bytearray(old))
    pages[3] = page  # the original object back: the batch is used again
    DeltaSnapshot.deserialize(delta.serialize()).apply(target)
    assert target == new


def test_write_to_streams_the_same_bytes(tmp_path: Path) -> None:
    old, new = _states()
    for compress in ("auto", "zstd", "rle"):
        delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress=compress)
        blob = delta.serialize()
        sink = io.BytesIO()
        assert delta.write_to(sink) == len(blob) == prepare_delta(delta).size
        assert sink.getvalue() == blob


class _ShortWrites(io.RawIOBase):
    """A raw file that takes at most ``most`` bytes a write (a socket's send buffer), or
    with ``block_after``, returns None (would block) once that many bytes are taken."""

    def __init__(self, most: int, block_after: int = -1) -> None:
        self.got = bytearray()
        self.most, self.block_after = most, block_after

    def writable(self) -> bool:
        return True

    def write(self, b: "bytes | memoryview") -> "int | None":  # type: ignore[override]
        if 0 <= self.block_after <= len(self.got):
            return None
        piece = bytes(memoryview(b)[: self.most])
        self.got += piece
        return len(piece)


def test_write_to_writes_everything_through_short_writes() -> None:
    """A raw file object may take part of a write and return how much: write_to wrote
    each piece once and reported every byte (a socket file gave 241,936 of 8,411,280 bytes
    and the full count). Now the rest is written again; a raw file that would block raises,
    a duck-typed writer that returns None is taken to have written all, as before."""
    old, new = _states()
    for compress in ("auto", "zstd", "rle"):
        delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress=compress)
        blob = delta.serialize()
        for most in (1, 7, 4096, 1 << 20):
            sink = _ShortWrites(most)
            assert delta.write_to(sink) == len(blob)
            assert bytes(sink.got) == blob, (compress, most)
    with pytest.raises(BlockingIOError):
        delta.write_to(_ShortWrites(100, block_after=300))

    class Quiet:  # writes everything, returns nothing
        def __init__(self) -> None:
            self.got = bytearray()

        def write(self, b: bytes) -> None:
            self.got += b

    quiet = Quiet()
    assert delta.write_to(quiet) == len(blob) and bytes(quiet.got) == blob

    class Counting(Quiet):  # returns a number that is not what it took (zstd's writer does)
        def write(self, b: bytes) -> int:  # type: ignore[override]
            self.got += b
            return 1

    counting = Counting()
    assert delta.write_to(counting) == len(blob) and bytes(counting.got) == blob
    legacy = DeltaSnapshot.deserialize(blob)
    legacy.wire_version = 1  # the version-1 writer takes the same path
    sink = _ShortWrites(5)
    assert legacy.write_to(sink) == len(legacy.serialize()) == len(sink.got)


def test_write_to_a_zstd_stream_writer_writes_each_byte_once() -> None:
    """Only a raw file object's count means "taken so far": a zstandard stream writer
    (write_return_read=False) returns what it emitted, and looping on that wrote bytes
    twice (3,264,863 decompressed bytes for a 3,145,728-byte write). From a review."""
    import zstandard

    old, new = _states()
    delta = DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="none")
    blob = delta.serialize()
    sink = io.BytesIO()
    with zstandard.ZstdCompressor().stream_writer(sink, write_return_read=False, closefd=False) as writer:
        assert delta.write_to(writer) == len(blob)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(sink.getvalue()) == blob


def test_write_to_a_socket_file_delivers_the_whole_delta() -> None:
    """The trial's case: an unbuffered socket file with a timeout, read by a thread."""
    import socket
    import threading

    old = bytes(8 << 20)
    new = np.random.default_rng(5).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, compress="none")
    a, b = socket.socketpair()
    got = bytearray()

    def read() -> None:
        while True:
            chunk = b.recv(1 << 16)
            if not chunk:
                return
            got.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        a.settimeout(30)
        with a.makefile("wb", buffering=0) as out:
            n = delta.write_to(out)
        a.shutdown(socket.SHUT_WR)
        reader.join(30)
        assert not reader.is_alive()
        assert n == len(got) and DeltaSnapshot.deserialize(bytes(got)) == delta
    finally:
        a.close()
        b.close()


def test_deserialize_from_a_map_is_zero_copy(tmp_path: Path) -> None:
    old, new = _states()
    path = tmp_path / "d.cmdelta"
    path.write_bytes(DeltaSnapshot.create(AGENT, old, new, 1, 2, compress="xor").serialize())
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        delta = DeltaSnapshot.deserialize(mapped)
        batch = delta._page_batch()
        assert isinstance(batch.payload, memoryview) and batch.payload.obj is mapped
        target = bytearray(old)
        delta.apply(target)
        assert target == new
        del batch, delta
    # A writable input is copied: later writes cannot change the delta.
    data = bytearray(path.read_bytes())
    delta = DeltaSnapshot.deserialize(data)
    data[:] = bytes(len(data))
    target = bytearray(old)
    delta.apply(target)
    assert target == new


def test_batches_for_streams_round_trip_and_refuse_damage() -> None:
    old, new = _states()
    indices = [0, 1, 2, 3, 8]
    batch = encode_batch(old, new, indices)
    assert [PageEncoding(e).label for e in batch.encodings] == ["zero", "xzr", "rle", "raw", "xzr"]
    framed = batch.pack()
    back = PageBatch.unpack(framed)
    back.check(len(new))
    decoded = back.decode(old, len(new))
    for k, view in enumerate(decoded.views()):
        i = indices[k]
        assert bytes(view) == new[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]
    target = bytearray(old)
    decoded.write_into(target)
    assert target == new
    with pytest.raises(CorruptDataError):
        PageBatch.unpack(framed[:-1])
    damaged = bytearray(framed)
    damaged[-1] ^= 1  # a payload byte: the page check refuses it
    with pytest.raises(CorruptDataError, match="page check mismatch"):
        PageBatch.unpack(bytes(damaged)).check(len(new))


def test_large_batches_split_over_threads_match_one_call() -> None:
    rng = np.random.default_rng(4)
    size = 24 << 20
    old = np.frombuffer(rng.bytes(size), dtype=np.uint8)
    new = old.copy()
    pages = np.arange(0, size // PAGE_SIZE, 2)
    new.reshape(-1, PAGE_SIZE)[pages, 100] ^= 1
    whole = encode_batch(old, new, pages)
    from cellmigrate._backend import kernels

    enc, off, chk, payload = kernels.encode_pages(old, new, pages, PAGE_SIZE, ALLOW_ALL)
    assert whole.payload == payload and np.array_equal(whole.offsets, off) and np.array_equal(whole.checks, chk)
    out = whole.decode(old, size)
    assert np.array_equal(out.buffer.reshape(-1, PAGE_SIZE), new.reshape(-1, PAGE_SIZE)[pages])
