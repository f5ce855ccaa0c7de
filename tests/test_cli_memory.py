"""The CLI's ``diff``/``apply`` in bounded memory (issue 12): streamed, window by window.

* The streaming writer (``cellmigrate._streaming.create_file``, what ``diff`` runs) writes
  exactly the bytes of ``DeltaSnapshot.create(...).serialize()`` for the same inputs and
  timestamp, across windows, digests, compressions (zstd multi-threaded included) and
  resizing deltas.
* The windowed apply refuses what ``DeltaSnapshot.apply`` refuses, writes what it writes,
  and stops (rolled back) when the delta or base changes between its two passes.
* The real CLI, run in a subprocess, keeps its anonymous memory (``RssAnon`` in
  ``/proc/PID/status``, sampled every millisecond: file-backed maps of the inputs and the
  output are not counted, they are the page cache) within 64 MiB plus 16 bytes per dirty
  page, on a 64 MiB state with every page dirty in the default run (the old CLI used
  about 4x the delta there) and on 1 GiB states with 10% and 100% of the pages dirty
  under ``-m large``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest

from cellmigrate import DeltaSnapshot
from cellmigrate import journal as jr
from cellmigrate._pages import parse_compress
from cellmigrate._streaming import WindowedApply, create_file
from cellmigrate.errors import InvalidStateError, StateChangedError
from memory_support import PAGE, peak_rss_anon, write_pair

#: The goal: 64 MiB of anonymous memory plus one page table (16 bytes a dirty page).
BOUND_BASE = 64 << 20
BOUND_PER_PAGE = 16
KEY = bytes(range(32))


def _states(rng: np.random.Generator, n_old: int, n_new: int, frac: float, low: bool) -> Tuple[bytes, bytes]:
    """OLD and NEW: random or low-entropy bytes; ``frac`` of NEW's pages get 64 new bytes."""
    if low:
        old = (rng.integers(0, 4, n_old, dtype=np.uint8) * (rng.random(n_old) < 0.1)).astype(np.uint8)
    else:
        old = rng.integers(0, 256, n_old, dtype=np.uint8)
    new = np.zeros(n_new, np.uint8)
    m = min(n_old, n_new)
    new[:m] = old[:m]
    if n_new > n_old:
        new[n_old:] = rng.integers(0, 3, n_new - n_old, dtype=np.uint8)
    pages = -(-n_new // PAGE)
    for p in rng.choice(pages, max(1, int(pages * frac)), replace=False) if pages else []:
        at = int(p) * PAGE + int(rng.integers(0, 4000))
        new[at : at + 64] = rng.integers(0, 256, len(new[at : at + 64]), dtype=np.uint8)
    return old.tobytes(), new.tobytes()


def _streamed(old: bytes, new: bytes, digest: Optional[str], key: Optional[bytes], compress: str,
              timestamp: int, window: int = 1 << 20) -> bytes:
    with tempfile.TemporaryFile() as f:
        info = create_file(f.fileno(), bytes(16), memoryview(old), memoryview(new), 1, 2, algorithm=digest, key=key,
                           plan=parse_compress(compress, digest=digest is not None), timestamp=timestamp,
                           window=window)
        f.seek(0)
        data = f.read()
    assert info.wire_size == len(data)
    return data


# ------------------------------------------------------------------ the bytes diff writes


@pytest.mark.parametrize("sizes", [(3 << 20, 3 << 20), ((5 << 20) + 123, (5 << 20) + 123), (2 << 20, (4 << 20) + 77),
                                   ((4 << 20) + 5, 1 << 20), (0, 0), (PAGE, PAGE)])
@pytest.mark.parametrize("digest,key", [("xxh3_128_tree", None), ("xxh3_128", None), ("blake3", KEY), (None, None)],
                         ids=["tree", "xxh3", "keyed", "checksum-only"])
def test_streamed_delta_is_byte_for_byte_serialize(sizes: Tuple[int, int], digest: Optional[str],
                                                   key: Optional[bytes]) -> None:
    rng = np.random.default_rng(sizes[0] ^ sizes[1])
    for frac, low, compress in [(0.05, False, "auto"), (1.0, True, "auto"), (0.3, True, "zstd:5"), (0.3, False, "none"),
                                (1.0, False, "rle")]:
        old, new = _states(rng, *sizes, frac, low)
        made = DeltaSnapshot.create(bytes(16), old, new, 1, 2, digest=digest, key=key, compress=compress,
                                    resize=sizes[0] != sizes[1])
        assert _streamed(old, new, digest, key, compress, made.timestamp) == made.serialize(), (frac, low, compress)


def test_streamed_zstd_payload_over_the_threading_threshold_matches() -> None:
    """A payload of 12 MiB: zstd runs multi-threaded, from memory and from the file alike."""
    rng = np.random.default_rng(7)
    old = bytes(12 << 20)
    new = rng.integers(0, 4, 12 << 20, dtype=np.uint8).tobytes()  # raw pages, 2 bits of entropy a byte
    for compress in ("zstd", "auto"):
        made = DeltaSnapshot.create(bytes(16), old, new, 1, 2, compress=compress)
        assert made.compression == "zstd"
        assert _streamed(old, new, "xxh3_128_tree", None, compress, made.timestamp, 4 << 20) == made.serialize()


@pytest.mark.parametrize("compress", ["auto", "zstd"])
def test_diff_summary_is_what_inspect_reads_back(tmp_path: Path, compress: str) -> None:
    """``diff --json`` reports from the streaming writer's own tally (no delta object):
    every field must be what ``inspect --json`` reads from the file it wrote."""
    import json

    rng = np.random.default_rng(9)
    old, new = _states(rng, (6 << 20) + 50, (6 << 20) + 50, 0.3, True)
    new = bytearray(new)
    new[PAGE : 3 * PAGE] = bytes(2 * PAGE)  # zero pages
    new[5 * PAGE : 6 * PAGE] = rng.integers(0, 256, PAGE, dtype=np.uint8).tobytes()  # a raw page
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(bytes(new))
    cli = [sys.executable, "-m", "cellmigrate"]
    made = subprocess.run(cli + ["diff", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"), "-o",
                                 str(tmp_path / "d.cmd"), "--compress", compress, "--json"],
                          capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    read = subprocess.run(cli + ["inspect", str(tmp_path / "d.cmd"), "--json"], capture_output=True, text=True,
                          timeout=120)
    assert read.returncode == 0, read.stderr
    said, found = json.loads(made.stdout), json.loads(read.stdout)
    for field in found:
        if field != "file":
            assert said[field] == found[field], field
    assert found["encodings"]["zero"]["pages"] >= 2 and found["encodings"]["xzr"]["pages"] > 0
    assert found["payload_compression"] == ("zstd" if compress == "zstd" else found["payload_compression"])


@pytest.mark.parametrize("extra", [[], ["--compress", "zstd"], ["--digest", "xxh3_128"], ["--digest", "none"],
                                   ["--key-file", "KEY"]], ids=["default", "zstd", "xxh3", "checksum-only", "keyed"])
def test_cli_diff_writes_the_bytes_of_serialize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                extra: List[str]) -> None:
    """End to end: the file ``cellmigrate diff`` writes is ``DeltaSnapshot.create(...).serialize()``
    of the same states, with the timestamp the CLI wrote (read from its header)."""
    import struct

    import cellmigrate.delta as delta_module

    rng = np.random.default_rng(13)
    old, new = _states(rng, (9 << 20) + 77, (9 << 20) + 77, 0.2, True)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    (tmp_path / "key").write_bytes(KEY)
    extra = [str(tmp_path / "key") if e == "KEY" else e for e in extra]
    out = tmp_path / "d.cmd"
    proc = subprocess.run([sys.executable, "-m", "cellmigrate", "diff", str(tmp_path / "old.bin"),
                           str(tmp_path / "new.bin"), "-o", str(out), "--base-sequence", "4", *extra],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    written = out.read_bytes()
    (timestamp,) = struct.unpack_from("<Q", written, 64)
    monkeypatch.setattr(delta_module, "_now", lambda: timestamp)
    digest: Optional[str] = "xxh3_128_tree"
    if extra and extra[0] == "--digest":
        digest = None if extra[1] == "none" else extra[1]
    key = KEY if extra and extra[0] == "--key-file" else None
    made = DeltaSnapshot.create(bytes(16), old, new, 4, 5, digest=digest, key=key,
                                compress=extra[1] if extra and extra[0] == "--compress" else "auto")
    assert written == made.serialize()


# ------------------------------------------------------------------ the windowed apply


def _files(tmp_path: Path, digest: Optional[str], key: Optional[bytes]) -> Tuple[Path, bytes, bytes, DeltaSnapshot]:
    rng = np.random.default_rng(3)
    old, new = _states(rng, (9 << 20) + 300, (9 << 20) + 300, 0.2, False)  # three 4 MiB windows
    base = tmp_path / "base.bin"
    base.write_bytes(old)
    delta = DeltaSnapshot.create(bytes(16), old, new, 0, 1, digest=digest, key=key)
    return base, old, new, DeltaSnapshot.deserialize(delta.serialize())


@pytest.mark.parametrize("digest,key", [("xxh3_128_tree", None), ("xxh3_128", None), ("blake3", KEY), (None, None)],
                         ids=["tree", "xxh3", "keyed", "checksum-only"])
def test_windowed_apply_in_place_writes_new_and_refuses_another_base(tmp_path: Path, digest: Optional[str],
                                                                     key: Optional[bytes]) -> None:
    base, old, new, delta = _files(tmp_path, digest, key)
    other = bytearray(old)
    other[len(other) - 10] ^= 1  # a byte the delta does not carry, in the last window
    base.write_bytes(bytes(other))
    with pytest.raises(InvalidStateError, match="checksum"):
        jr.apply_in_place(base, delta, key=key)
    assert base.read_bytes() == bytes(other) and not jr.journal_path(base).exists()
    base.write_bytes(old)
    report = jr.apply_in_place(base, delta, key=key)
    assert base.read_bytes() == new and report.pages_written == delta.dirty_page_count()


def test_windowed_apply_stops_when_the_base_changes_between_verify_and_write(tmp_path: Path) -> None:
    base, old, new, delta = _files(tmp_path, "xxh3_128_tree", None)
    plan = WindowedApply(delta, window=1 << 20)
    view = bytearray(old)
    plan.verify(memoryview(view), None)
    # An XZR page decodes over its base page: change the base under a page the delta carries.
    batch = delta._page_batch()
    xzr = int(batch.indices[int(np.flatnonzero(batch.encodings == 3)[-1])])
    view[xzr * PAGE] ^= 0xFF
    with pytest.raises(StateChangedError, match="changed between verification and writing"):
        for _ in plan.windows(memoryview(view)):
            pass


# ------------------------------------------------------------------ the real CLI's memory


def _peak_anon(args: List[str], *, stdout: Any = subprocess.DEVNULL, stdin: Any = None) -> Tuple[int, int, str]:
    """Run ``python -m cellmigrate ARGS``; return (exit code, peak RssAnon in bytes, stderr).

    ``RssAnon`` (/proc/PID/status) is the process's anonymous resident memory: heap,
    numpy and zstd buffers, thread stacks; not the file-backed maps of the state files
    and the delta (page cache, shared with every reader). Sampled every millisecond from
    this process: the windows the CLI allocates live for milliseconds or more.
    """
    env = dict(os.environ)
    env.pop("CELLMIGRATE_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "cellmigrate", *args], stdout=stdout, stdin=stdin,
                            stderr=subprocess.PIPE, env=env)
    err: List[bytes] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read() if proc.stderr else b""), daemon=True)
    reader.start()
    peak = peak_rss_anon(proc, seconds=600)
    proc.wait(timeout=60)
    reader.join(timeout=60)
    return proc.returncode, peak, b"".join(err).decode(errors="replace")


def _same(a: Path, b: Path) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(16 << 20), fb.read(16 << 20)
            if x != y:
                return False
            if not x:
                return True


def _check_cli_memory(tmp_path: Path, size: int, frac: float, compress: str = "auto") -> List[Tuple[str, int]]:
    old, new, dirty = write_pair(tmp_path, size, frac)
    bound = BOUND_BASE + BOUND_PER_PAGE * dirty
    delta, out, base, piped = (tmp_path / n for n in ("d.cmd", "out.bin", "base.bin", "piped.bin"))
    peaks: List[Tuple[str, int]] = []

    def run(what: str, args: List[str], **kw: Any) -> None:
        code, peak, err = _peak_anon(args, **kw)
        assert code == 0, err
        peaks.append((what, peak))
        assert peak <= bound, f"{what}: {peak / 2**20:.1f} MiB anonymous, bound {bound / 2**20:.1f} MiB"

    run("diff", ["diff", str(old), str(new), "-o", str(delta), "--compress", compress])
    with open(piped, "wb") as sink:
        run("diff -o -", ["diff", str(old), str(new), "-o", "-", "--compress", compress], stdout=sink)
    assert piped.stat().st_size == delta.stat().st_size
    run("apply -o", ["apply", str(old), str(delta), "-o", str(out)])
    assert _same(out, new)
    os.unlink(out)
    with open(out, "wb") as sink:
        run("apply -o -", ["apply", str(old), str(delta), "-o", "-"], stdout=sink)
    assert _same(out, new)
    os.unlink(out)
    with open(old, "rb") as src, open(base, "wb") as dst:
        while block := src.read(16 << 20):
            dst.write(block)
    run("apply in place", ["apply", str(base), str(delta)])
    assert _same(base, new)
    with open(delta, "rb") as src:
        run("apply from stdin", ["apply", str(old), "-", "-o", str(out)], stdin=src)
    assert _same(out, new)
    return peaks


def test_cli_diff_and_apply_memory_is_bounded_whatever_the_delta_size(tmp_path: Path) -> None:
    """64 MiB, every page dirty: a 64 MiB delta; the old CLI held about 4x that."""
    peaks = _check_cli_memory(tmp_path, 64 << 20, 1.0)
    print("\n64 MiB, 100% dirty: " + ", ".join(f"{w} {p / 2**20:.1f} MiB" for w, p in peaks))


@pytest.mark.large
@pytest.mark.parametrize("frac", [0.1, 1.0])
def test_cli_memory_on_1gib_states(tmp_path: Path, frac: float) -> None:
    peaks = _check_cli_memory(tmp_path, 1 << 30, frac)
    print(f"\n1 GiB, {frac:.0%} dirty: " + ", ".join(f"{w} {p / 2**20:.1f} MiB" for w, p in peaks))


@pytest.mark.large
def test_cli_memory_on_1gib_with_zstd(tmp_path: Path) -> None:
    peaks = _check_cli_memory(tmp_path, 1 << 30, 1.0, compress="zstd")
    print("\n1 GiB, 100% dirty, zstd: " + ", ".join(f"{w} {p / 2**20:.1f} MiB" for w, p in peaks))
