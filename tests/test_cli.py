"""The ``cellmigrate`` command line, run as a user runs it: a subprocess on real files.

Every test drives ``python -m cellmigrate`` (the same ``main`` as the console script) on
small files in a temporary directory and checks exit codes, stdout/stderr and the files'
bytes against the library.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import pytest

import cellmigrate
from cellmigrate import PAGE_SIZE, digest, dirty_pages, simple_checksum
from cellmigrate.cli import chunked_checksum, chunked_first_difference, main
from cellmigrate.statefile import StateFile, format_size, parse_size

COMMANDS = ["checksum", "diff", "apply", "recover", "verify", "inspect", "demo", "bench"]


def run(*args: str, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter and capture its output."""
    full_env = dict(os.environ)
    full_env.pop("CELLMIGRATE_DEBUG", None)
    if env:
        full_env.update(env)
    return subprocess.run([sys.executable, "-m", "cellmigrate", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    """The failure contract: the exit code, exactly one line on stderr, no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("cellmigrate")
    return lines[0]


def make_pair(tmp_path: Path, size: int = 37 * PAGE_SIZE + 123, dirty: Tuple[int, ...] = (0, 5, 17, 36, 37),
              seed: int = 1) -> Tuple[Path, Path, bytes, bytes]:
    """OLD and NEW files: mixed content, the listed pages changed (the last one short)."""
    rng = np.random.default_rng(seed)
    old = bytearray(rng.integers(0, 256, size=size, dtype=np.uint8).tobytes())
    old[PAGE_SIZE:3 * PAGE_SIZE] = bytes(2 * PAGE_SIZE)  # some zero pages, RLE-friendly
    new = bytearray(old)
    for page in dirty:
        start = page * PAGE_SIZE
        if start < size:
            new[start] ^= 0xFF
            new[min(start + 100, size - 1)] ^= 0x0F
    old_path, new_path = tmp_path / "old.bin", tmp_path / "new.bin"
    old_path.write_bytes(old)
    new_path.write_bytes(new)
    return old_path, new_path, bytes(old), bytes(new)


def diff(tmp_path: Path, old: Path, new: Path, *extra: str, name: str = "delta.cmd") -> Path:
    out = tmp_path / name
    proc = run("diff", str(old), str(new), "-o", str(out), *extra)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return out


# --------------------------------------------------------------------------- help, usage


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    proc = run(command, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: cellmigrate {command}")
    assert "--quiet" in proc.stdout


def test_top_level_help_lists_every_command_and_exit_codes() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert f"    {command} " in proc.stdout
    assert "Exit codes: 0 success, 1" in proc.stdout


def test_version() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"cellmigrate {cellmigrate.__version__}"


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["diff", "a"], ["checksum", "x", "--algorithm", "md5"],
                                  ["demo", "--size", "lots"], ["bench", "--size", "12XB"]])
def test_usage_errors_are_one_line_exit_2(args: List[str]) -> None:
    line = assert_one_line_error(run(*args), 2)
    assert "error:" in line and "--help" in line


def test_main_returns_codes_in_process(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "s.bin"
    f.write_bytes(b"abc")
    assert main(["checksum", str(f), "-a", "simple"]) == 0
    assert capsys.readouterr().out.strip() == str(simple_checksum(b"abc"))
    assert main(["checksum", str(tmp_path / "missing")]) == 2
    assert main(["--help"]) == 0


# --------------------------------------------------------------------------- checksum


@pytest.mark.parametrize("algorithm", ["simple", "xxh3_128", "blake3"])
def test_checksum_matches_library(tmp_path: Path, algorithm: str) -> None:
    _, new_path, _, new = make_pair(tmp_path)
    proc = run("checksum", str(new_path), "--algorithm", algorithm)
    assert proc.returncode == 0 and proc.stderr == ""
    expected = str(simple_checksum(new)) if algorithm == "simple" else digest(new, algorithm).hex()
    assert proc.stdout.strip() == expected

    js = json.loads(run("checksum", str(new_path), "-a", algorithm, "--json").stdout)
    assert js == {"file": str(new_path), "size": len(new), "algorithm": algorithm, "keyed": False, "value": expected}


def test_checksum_keyed_blake3_and_default(tmp_path: Path) -> None:
    _, new_path, _, new = make_pair(tmp_path)
    key = bytes(range(32))
    key_path = tmp_path / "k"
    key_path.write_bytes(key)
    proc = run("checksum", str(new_path), "-a", "blake3", "--key-file", str(key_path))
    assert proc.stdout.strip() == digest(new, "blake3", key=key).hex()
    # The default algorithm is xxh3_128, and even --quiet prints the value asked for.
    assert run("-q", "checksum", str(new_path)).stdout.strip() == digest(new).hex()
    assert_one_line_error(run("checksum", str(new_path), "--key-file", str(key_path)), 2)


def test_checksum_of_empty_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run("checksum", str(empty), "-a", "simple").stdout.strip() == "0"
    assert run("checksum", str(empty)).stdout.strip() == digest(b"").hex()


def test_chunked_paths_match_library() -> None:
    """The chunked functions behind the progress bars give the library's exact values."""
    data = np.random.default_rng(3).integers(0, 256, size=3 * 4096 + 77, dtype=np.uint8).tobytes()
    seen: List[int] = []
    assert chunked_checksum(data, "simple", chunk=1000, on_chunk=seen.append) == simple_checksum(data)
    assert sum(seen) == len(data)
    assert chunked_checksum(data, "xxh3_128_tree", chunk=999) == digest(data)
    assert chunked_checksum(data, "xxh3_128", chunk=999) == digest(data, "xxh3_128")
    assert chunked_checksum(data, "blake3", chunk=4096) == digest(data, "blake3")
    key = b"k" * 32
    assert chunked_checksum(data, "blake3", key=key, chunk=5000) == digest(data, "blake3", key=key)
    other = bytearray(data)
    other[9000] ^= 1
    assert chunked_first_difference(data, other, chunk=1000) == 9000
    assert chunked_first_difference(data, data, chunk=1000) is None
    assert chunked_first_difference(data, data[:5000], chunk=1000) == 5000


# --------------------------------------------------------------------------- diff / apply


def test_diff_then_apply_in_place_reproduces_new(tmp_path: Path) -> None:
    old_path, new_path, old, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    proc = run("apply", str(old_path), str(delta))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "applied 5 pages" in proc.stdout
    assert old_path.read_bytes() == new


def test_diff_then_apply_to_output_leaves_base(tmp_path: Path) -> None:
    old_path, new_path, old, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    out = tmp_path / "sub" / "out.bin"
    out.parent.mkdir()
    proc = run("apply", str(old_path), str(delta), "-o", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["pages_written"] == 5 and summary["in_place"] is False
    assert out.read_bytes() == new
    assert old_path.read_bytes() == old
    # No temporary file is left behind beside OUT.
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.bin"]


def test_apply_safe_replace_in_place(tmp_path: Path) -> None:
    old_path, new_path, _, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    os.chmod(old_path, 0o640)
    assert run("apply", str(old_path), str(delta), "--safe-replace").returncode == 0
    assert old_path.read_bytes() == new
    if os.name == "posix":
        assert (os.stat(old_path).st_mode & 0o777) == 0o640  # permissions survive the rename


def test_diff_quiet_and_json(tmp_path: Path) -> None:
    old_path, new_path, old, new = make_pair(tmp_path)
    proc = run("--quiet", "diff", str(old_path), str(new_path), "-o", str(tmp_path / "d"))
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
    proc = run("diff", str(old_path), str(new_path), "-o", str(tmp_path / "d2"), "--json")
    info = json.loads(proc.stdout)
    assert info["dirty_pages"] == len(dirty_pages(old, new)) == 5
    assert info["total_size"] == len(new)
    assert info["checksum"] == simple_checksum(new)
    assert info["digest"] == digest(new).hex()
    assert info["wire_size"] == (tmp_path / "d2").stat().st_size


def test_diff_of_identical_and_of_empty_files(tmp_path: Path) -> None:
    _, new_path, _, new = make_pair(tmp_path)
    same = tmp_path / "same.bin"
    same.write_bytes(new)
    delta = diff(tmp_path, new_path, same)
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    assert info["dirty_pages"] == 0 and info["compression_ratio"] == 1.0
    assert run("apply", str(new_path), str(delta)).returncode == 0
    assert new_path.read_bytes() == new

    a, b = tmp_path / "ea", tmp_path / "eb"
    a.write_bytes(b"")
    b.write_bytes(b"")
    delta = diff(tmp_path, a, b, name="empty.cmd")
    assert run("apply", str(a), str(delta)).returncode == 0
    out = tmp_path / "eout"
    assert run("apply", str(a), str(delta), "-o", str(out)).returncode == 0
    assert out.read_bytes() == b""


def test_diff_refuses_different_sizes(tmp_path: Path) -> None:
    old_path, _, old, _ = make_pair(tmp_path)
    short = tmp_path / "short"
    short.write_bytes(old[:-1])
    line = assert_one_line_error(run("diff", str(old_path), str(short), "-o", str(tmp_path / "d")), 2)
    assert "same size" in line
    assert not (tmp_path / "d").exists()


def test_delta_for_another_base_is_refused_and_base_unchanged(tmp_path: Path) -> None:
    old_path, new_path, _, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    other_path, _, other, _ = make_pair(tmp_path / "..", seed=99)  # same size, other content
    other_path = other_path.rename(tmp_path / "other.bin")

    line = assert_one_line_error(run("apply", str(other_path), str(delta)), 1)
    assert "refused" in line and "unchanged" in line
    assert other_path.read_bytes() == other

    out = tmp_path / "out.bin"
    assert_one_line_error(run("apply", str(other_path), str(delta), "-o", str(out)), 1)
    assert not out.exists()
    assert other_path.read_bytes() == other
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta.cmd", "new.bin", "old.bin", "other.bin"]


def test_delta_applied_twice_is_idempotent(tmp_path: Path) -> None:
    old_path, new_path, _, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path, "--compress", "rle")
    assert run("apply", str(old_path), str(delta)).returncode == 0
    # BASE now holds NEW; the delta's pages are NEW's pages, so applying it again yields
    # NEW, which the checksum and digest confirm: accepted, and nothing changes.
    proc = run("apply", str(old_path), str(delta))
    assert proc.returncode == 0, proc.stderr
    assert old_path.read_bytes() == new


def test_xor_delta_applied_twice_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    """An XOR page is relative to its base page: applied to NEW it would not give NEW, and
    verification refuses it before writing (exit 1), leaving the file as it was."""
    old_path, new_path, _, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)  # --compress auto: XOR pages
    assert run("apply", str(old_path), str(delta)).returncode == 0
    line = assert_one_line_error(run("apply", str(old_path), str(delta)), 1)
    assert "refused" in line and "mismatch" in line
    assert old_path.read_bytes() == new


def test_longer_base_is_refused(tmp_path: Path) -> None:
    old_path, new_path, old, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(old + b"\x00" * 10)
    line = assert_one_line_error(run("apply", str(longer), str(delta)), 1)
    assert "refused" in line
    assert longer.read_bytes() == old + b"\x00" * 10


def test_short_base_is_refused_by_a_v2_delta_and_grown_by_a_v1_one(tmp_path: Path) -> None:
    """A version-2 delta records its base's size: a shorter BASE is refused up front (exit
    1) naming both sizes, not with a checksum mismatch. A version-1 delta records none: a
    shorter BASE is zero-extended (the bytearray rule), as before."""
    from cellmigrate import DeltaSnapshot

    size = 6 * PAGE_SIZE
    old = bytes(range(256)) * (3 * PAGE_SIZE // 256) + bytes(3 * PAGE_SIZE)
    new = bytearray(old)
    new[4 * PAGE_SIZE + 1] = 9
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    short = tmp_path / "short"
    short.write_bytes(old[: 3 * PAGE_SIZE + 10])
    out = tmp_path / "out"
    v2 = diff(tmp_path, tmp_path / "old", tmp_path / "new")
    for extra in (["-o", str(out)], [], ["--safe-replace"]):
        line = assert_one_line_error(run("apply", str(short), str(v2), *extra), 1)
        assert f"is {3 * PAGE_SIZE + 10} bytes" in line and f"base of {size} bytes" in line, line
        assert "checksum" not in line and "left unchanged" in line
        assert short.read_bytes() == old[: 3 * PAGE_SIZE + 10] and not out.exists()

    v1 = DeltaSnapshot.create(bytes(16), old, bytes(new), 0, 1, compress="rle")
    v1.wire_version = 1
    delta = tmp_path / "v1.cmd"
    delta.write_bytes(v1.serialize())
    assert json.loads(run("inspect", str(delta), "--json").stdout)["base_size"] is None  # v1 records none
    assert run("apply", str(short), str(delta), "-o", str(out)).returncode == 0
    assert out.read_bytes() == bytes(new) and len(new) == size
    assert short.read_bytes() == old[: 3 * PAGE_SIZE + 10]
    assert run("apply", str(short), str(delta)).returncode == 0  # in place, through a temp copy
    assert short.read_bytes() == bytes(new)


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "empty", "append"])
def test_corrupt_delta_exit_2_base_unchanged(tmp_path: Path, damage: str) -> None:
    old_path, new_path, old, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    wire = bytearray(delta.read_bytes())
    if damage == "flip":
        wire[len(wire) // 2] ^= 0x10
    elif damage == "truncate":
        wire = wire[: len(wire) - 7]
    elif damage == "garbage":
        wire = bytearray(b"not a delta at all" * 10)
    elif damage == "empty":
        wire = bytearray()
    else:
        wire += b"extra"
    delta.write_bytes(wire)
    line = assert_one_line_error(run("apply", str(old_path), str(delta)), 2)
    assert "cannot decode delta" in line
    assert old_path.read_bytes() == old
    assert_one_line_error(run("inspect", str(delta)), 2)


def test_missing_files_exit_2(tmp_path: Path) -> None:
    old_path, new_path, _, _ = make_pair(tmp_path)
    missing = str(tmp_path / "missing")
    for args in (["verify", str(old_path), missing], ["diff", missing, str(new_path), "-o", str(tmp_path / "d")],
                 ["inspect", missing], ["apply", missing, missing], ["checksum", missing]):
        line = assert_one_line_error(run(*args), 2)
        assert "No such file" in line


# --------------------------------------------------------------------------- keys / digests


def test_keyed_delta(tmp_path: Path) -> None:
    old_path, new_path, old, new = make_pair(tmp_path)
    key_path, wrong_path = tmp_path / "key", tmp_path / "wrong"
    key_path.write_bytes(os.urandom(32))
    wrong_path.write_text(os.urandom(32).hex() + "\n")  # hex form is accepted too
    delta = diff(tmp_path, old_path, new_path, "--key-file", str(key_path))
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    assert info["keyed"] is True and info["digest_algorithm"] == "blake3"
    assert info["digest"] == digest(new, "blake3", key=key_path.read_bytes()).hex()

    line = assert_one_line_error(run("apply", str(old_path), str(delta)), 2)
    assert "--key-file" in line
    assert_one_line_error(run("apply", str(old_path), str(delta), "--key-file", str(wrong_path)), 1)
    assert old_path.read_bytes() == old
    assert run("apply", str(old_path), str(delta), "--key-file", str(key_path)).returncode == 0
    assert old_path.read_bytes() == new


def test_unkeyed_delta_refused_when_a_key_is_expected(tmp_path: Path) -> None:
    old_path, new_path, old, _ = make_pair(tmp_path)
    key_path = tmp_path / "key"
    key_path.write_bytes(b"K" * 32)
    delta = diff(tmp_path, old_path, new_path)
    assert_one_line_error(run("apply", str(old_path), str(delta), "--key-file", str(key_path)), 1)
    assert old_path.read_bytes() == old


def test_bad_key_file_and_conflicting_options(tmp_path: Path) -> None:
    old_path, new_path, _, _ = make_pair(tmp_path)
    bad = tmp_path / "bad"
    bad.write_bytes(b"short")
    out = str(tmp_path / "d")
    assert "32 raw bytes" in assert_one_line_error(run("diff", str(old_path), str(new_path), "-o", out,
                                                       "--key-file", str(bad)), 2)
    good = tmp_path / "good"
    good.write_bytes(b"G" * 32)
    for digest_name in ("none", "xxh3_128"):
        assert_one_line_error(run("diff", str(old_path), str(new_path), "-o", out, "--key-file", str(good),
                                  "--digest", digest_name), 2)
    assert not Path(out).exists()


@pytest.mark.parametrize("digest_name", ["none", "blake3", "xxh3_128"])
def test_digest_choices_round_trip(tmp_path: Path, digest_name: str) -> None:
    old_path, new_path, _, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path, "--digest", digest_name)
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    if digest_name == "none":
        assert info["digest"] is None and info["digest_algorithm"] is None
    else:
        assert info["digest"] == digest(new, digest_name).hex()
    assert run("apply", str(old_path), str(delta)).returncode == 0
    assert old_path.read_bytes() == new


# --------------------------------------------------------------------------- verify / inspect


def test_verify_equal_and_different(tmp_path: Path) -> None:
    old_path, new_path, old, _ = make_pair(tmp_path)
    copy = tmp_path / "copy"
    copy.write_bytes(old)
    proc = run("verify", str(old_path), str(copy))
    assert proc.returncode == 0 and "identical" in proc.stdout

    proc = run("verify", str(old_path), str(new_path))
    assert proc.returncode == 1
    assert "first difference at offset 0 " in proc.stdout
    assert proc.stderr == ""

    tweaked = bytearray(old)
    tweaked[12345] ^= 0x40
    copy.write_bytes(tweaked)
    js = json.loads(run("verify", str(old_path), str(copy), "--json").stdout)
    assert js["identical"] is False and js["first_difference"] == 12345
    assert run("-q", "verify", str(old_path), str(copy)).stdout == ""


def test_verify_different_sizes(tmp_path: Path) -> None:
    old_path, _, old, _ = make_pair(tmp_path)
    prefix = tmp_path / "prefix"
    prefix.write_bytes(old[:1000])
    proc = run("verify", str(old_path), str(prefix))
    assert proc.returncode == 1
    assert "offset 1000" in proc.stdout and "sizes differ" in proc.stdout
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run("verify", str(empty), str(empty)).returncode == 0
    assert run("verify", str(empty), str(prefix)).returncode == 1


def test_inspect_text_and_json(tmp_path: Path) -> None:
    old_path, new_path, old, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path, "--base-sequence", "7",
                 "--agent-id", "12345678-1234-5678-1234-567812345678")
    info = json.loads(run("inspect", str(delta), "--json", "--pages").stdout)
    assert info["agent_id"] == "12345678-1234-5678-1234-567812345678"
    assert (info["base_sequence"], info["sequence"]) == (7, 8)
    assert [p["index"] for p in info["pages"]] == dirty_pages(old, new).tolist()
    assert info["compressed_size"] == sum(p["stored_size"] for p in info["pages"])
    assert info["uncompressed_size"] == 5 * PAGE_SIZE
    assert info["compression_ratio"] == pytest.approx(info["compressed_size"] / info["uncompressed_size"])
    assert info["rle_pages"] + info["raw_pages"] == info["encodings"]["rle"]["pages"] + info["encodings"]["raw"]["pages"]
    # Every page in exactly one encoding; the counts and bytes match the page list.
    assert sum(e["pages"] for e in info["encodings"].values()) == 5
    for name, e in info["encodings"].items():
        mine = [p for p in info["pages"] if p["encoding"] == name]
        assert (e["pages"], e["bytes"]) == (len(mine), sum(p["stored_size"] for p in mine))
    assert info["wire_version"] == 2 and info["payload_compression"] in ("none", "zstd")

    text = run("inspect", str(delta)).stdout
    assert "encodings    raw " in text and " xzr " in text
    assert "sequence     8 (base 7)" in text
    assert f"checksum     {simple_checksum(new)}" in text
    assert "dirty pages  5 " in text


# --------------------------------------------------------------------------- bench, sizes, progress


def test_bench_json_has_every_row(tmp_path: Path) -> None:
    proc = run("bench", "--size", "256KiB", "--min-time", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = {r["implementation"] for r in rows}
    for expected in ("cellmigrate.simple_checksum", "zlib.crc32", "bytes == (memcmp)", "numpy.array_equal",
                     "cellmigrate.dirty_pages", "DeltaSnapshot.apply (verified)"):
        assert expected in names
    assert any(n.startswith("xxhash") for n in names) and any(n.startswith("blake3") for n in names)
    assert all(r["gbps"] > 0 and r["nbytes"] > 0 for r in rows)
    assert run("bench", "--size", "100").returncode == 2


def test_bench_rows_say_what_they_measured() -> None:
    """At a size that is no whole number of pages, the numpy dirty-page peer measured the
    whole pages only (4096 of 4097 bytes) and the compression rows said "4 MiB" of a
    4097-byte sample."""
    proc = run("bench", "--size", "12289", "--min-time", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    scans = [r for r in rows if r["operation"].startswith("dirty pages")]
    assert {r["nbytes"] for r in scans} == {12289} and len(scans) == 2
    assert {r["operation"] for r in rows if "compress" in r["operation"]} == {"compress (12 KiB mixed)"}


@pytest.mark.parametrize("text,expected", [
    ("4096", 4096), ("0", 0), ("256MiB", 256 << 20), ("1GiB", 1 << 30), ("1gib", 1 << 30), ("4 KiB", 4096),
    ("2K", 2048), ("3M", 3 << 20), ("1.5KiB", 1536), ("2GB", 2_000_000_000), ("10kB", 10_000), ("7B", 7),
    ("1TiB", 1 << 40),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-1", "1.3B", "12XB", "1e3", "0x10", "5 M B"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size() -> None:
    assert [format_size(n) for n in (0, 1, 1023, 1024, 1536, 256 << 20, 5 << 40)] == [
        "0 bytes", "1 byte", "1023 bytes", "1 KiB", "1.5 KiB", "256 MiB", "5 TiB"]


def test_state_file_maps_and_handles_empty(tmp_path: Path) -> None:
    p = tmp_path / "s"
    p.write_bytes(b"hello")
    with StateFile(p) as f:
        assert f.size == 5 and bytes(f.buffer) == b"hello"
        with pytest.raises(TypeError):
            f.buffer[0] = 1  # type: ignore[index]
    with StateFile(p, writable=True) as f:
        f.buffer[0] = ord("J")
        f.flush()
    assert p.read_bytes() == b"Jello"
    p.write_bytes(b"")
    with StateFile(p) as f:
        assert f.size == 0 and bytes(f.buffer) == b""
    with pytest.raises(OSError):
        StateFile(tmp_path)


def test_no_progress_output_when_not_a_terminal_or_quiet(tmp_path: Path) -> None:
    old_path, _, _, _ = make_pair(tmp_path)
    env = {"CELLMIGRATE_PROGRESS_MIN_BYTES": "1"}
    piped = run("checksum", str(old_path), env=env)
    assert piped.returncode == 0 and piped.stderr == ""
    quiet = run("-q", "verify", str(old_path), str(old_path), env=env)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    """On a TTY stderr, long work shows a tqdm bar (a pseudo-terminal stands in for one)."""
    if not hasattr(os, "openpty"):  # Windows: no pseudo-terminals; the piped case above holds
        assert run("verify", str(tmp_path), str(tmp_path)).returncode == 2
        return
    import fcntl
    import pty
    import struct
    import termios

    old_path, new_path, _, new = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    out = tmp_path / "out.bin"
    master, slave = pty.openpty()
    # A fresh pseudo-terminal reports 0 columns, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = dict(os.environ, CELLMIGRATE_PROGRESS_MIN_BYTES="1")
    try:
        proc = subprocess.run([sys.executable, "-m", "cellmigrate", "verify", str(old_path), str(old_path)],
                              stdout=subprocess.PIPE, stderr=slave, env=env, timeout=120)
        applied = subprocess.run([sys.executable, "-m", "cellmigrate", "apply", str(old_path), str(delta),
                                  "-o", str(out)], stdout=subprocess.PIPE, stderr=slave, env=env, timeout=120)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(master)
    assert proc.returncode == 0 and applied.returncode == 0
    shown = b"".join(chunks)
    for label in (b"verify", b"copy", b"apply"):
        assert label + b":" in shown, shown
    assert b"%|" in shown
    assert out.read_bytes() == new


def test_copy_to_temp_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cellmigrate import statefile

    src = tmp_path / "src"
    data = os.urandom(10_000)
    src.write_bytes(data)
    monkeypatch.setattr(statefile, "COPY_CHUNK", 3000)
    seen: List[int] = []
    statefile.copy_to_temp(src, tmp_path / "dst", size=12_000, on_chunk=seen.append)
    assert seen == [3000, 3000, 3000, 1000]
    assert (tmp_path / "dst").read_bytes() == data + bytes(2000)


def test_docstring_examples_run() -> None:
    """The examples in the CLI-layer docstrings are real (run as doctests)."""
    import doctest

    from cellmigrate import demo, statefile

    for module in (statefile, demo):
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.attempted > 0 and result.failed == 0, module.__name__


@pytest.mark.parametrize("old_pages, new_pages", [(5, 9), (9, 5), (3, 3)])
@pytest.mark.parametrize("mode", ["in_place", "output"])
def test_diff_resize_then_apply_gives_new(tmp_path: Path, old_pages: int, new_pages: int, mode: str) -> None:
    """``diff --resize`` (a growing or shrinking state, e.g. WebAssembly memory.grow), then
    ``apply`` in place or to ``-o``: the result is NEW byte for byte, the last page short too."""
    rng = np.random.default_rng(old_pages * 31 + new_pages)
    old = rng.integers(0, 256, old_pages * PAGE_SIZE - 100, dtype=np.uint8)
    new = np.zeros(new_pages * PAGE_SIZE + 7, dtype=np.uint8)
    keep = min(old.size, new.size)
    new[:keep] = old[:keep]
    new[PAGE_SIZE + 5 : PAGE_SIZE + 69] = rng.integers(0, 256, 64, dtype=np.uint8)
    new[-3:] = 9  # a page past OLD's end when growing
    old_path, new_path, delta = tmp_path / "old.bin", tmp_path / "new.bin", tmp_path / "d.cmd"
    old.tofile(old_path)
    new.tofile(new_path)
    if old.size != new.size:
        refused = run("diff", str(old_path), str(new_path), "-o", str(delta))
        assert "--resize" in assert_one_line_error(refused, 2) and not delta.exists()
    made = run("diff", "--resize", str(old_path), str(new_path), "-o", str(delta))
    assert made.returncode == 0, made.stderr
    if mode == "in_place":
        applied = run("apply", str(old_path), str(delta))
        result = old_path
    else:
        result = tmp_path / "out.bin"
        applied = run("apply", str(old_path), str(delta), "-o", str(result))
        assert old_path.read_bytes() == old.tobytes()
    assert applied.returncode == 0, applied.stderr
    assert result.read_bytes() == new.tobytes()
    assert run("verify", str(result), str(new_path)).returncode == 0


def test_the_applied_before_hint_compares_a_mac_in_constant_time(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The hint after a refused apply ("BASE already is this delta's result") hashed BASE
    and compared a keyed delta's MAC with ``==``; every MAC is compared in constant time
    (SPEC §6). It still tells the result from any other state."""
    from cellmigrate import DeltaSnapshot, cli

    key = bytes(range(32))
    old = bytes(3 * PAGE_SIZE)
    new = bytearray(old)
    new[PAGE_SIZE + 5] = 7
    delta = DeltaSnapshot.create(bytes(16), old, bytes(new), 0, 1, key=key)
    result, other = tmp_path / "result.bin", tmp_path / "other.bin"
    result.write_bytes(bytes(new))
    other.write_bytes(old)
    seen: List[Tuple[bytes, bytes]] = []
    real = cli.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        seen.append((bytes(a), bytes(b)))
        return real(a, b)

    monkeypatch.setattr(cli.hmac, "compare_digest", spy)
    assert cli._is_result(str(result), delta, key) is True
    assert cli._is_result(str(other), delta, key) is False  # same size; checksum differs
    assert cli._is_result(str(result), delta, bytes(32)) is False  # the wrong key
    assert [b for _, b in seen] == [bytes(delta.digest)] * 2


def _into_dev_full(*args: str) -> subprocess.CompletedProcess:
    """The CLI with stdout on /dev/full: every write to it fails with ENOSPC."""
    with open("/dev/full", "w") as full:
        return subprocess.run([sys.executable, "-m", "cellmigrate", *args], stdout=full, stderr=subprocess.PIPE,
                              text=True, timeout=120)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
def test_a_report_that_cannot_be_written_says_the_work_is_done(tmp_path: Path) -> None:
    """stdout on a full disk: apply and diff, their work committed, failed with "unexpected
    error: OSError ..." (as if nothing had changed: a retry of the apply is then refused);
    --help and --version exited 0 having written nothing. Each now exits 2 with one line
    that says what is done and what failed."""
    old, new, _, new_bytes = make_pair(tmp_path)
    delta = tmp_path / "d.cmd"
    made = _into_dev_full("diff", str(old), str(new), "-o", str(delta))
    line = assert_one_line_error(made, 2)
    assert f"{str(delta)!r} is written, but cannot write to stdout: No space left on device" in line
    base = tmp_path / "base.bin"
    base.write_bytes(old.read_bytes())
    for extra in ((), ("--json",)):
        base.write_bytes(old.read_bytes())
        applied = _into_dev_full("apply", str(base), str(delta), *extra)
        line = assert_one_line_error(applied, 2)
        assert "holds the result, verified, but cannot write to stdout" in line and "unexpected" not in line
        assert base.read_bytes() == new_bytes
    line = assert_one_line_error(_into_dev_full("checksum", str(base)), 2)
    assert line.endswith("cannot write to stdout: No space left on device")
    for args in (("--help",), ("--version",), ("apply", "--help")):
        line = assert_one_line_error(_into_dev_full(*args), 2)
        assert line.endswith("error: cannot write to stdout: No space left on device"), args
    refused = _into_dev_full("apply", str(base), str(delta))  # nothing to report: the refusal as before
    assert "was it applied before?" in assert_one_line_error(refused, 1)
    clean = assert_one_line_error(_into_dev_full("recover", str(base)), 2)  # no journal: nothing was done
    assert clean.endswith("error: cannot write to stdout: No space left on device"), clean
    # demo said "a step failed unexpectedly: OSError" and then "unexpected error" (two lines)
    for args in (("demo", "--size", "64KiB"), ("bench", "--size", "64KiB", "--min-time", "0")):
        line = assert_one_line_error(_into_dev_full(*args), 2)
        assert line == f"cellmigrate {args[0]}: error: cannot write to stdout: No space left on device", line


def test_a_closed_stdout_is_no_error_unless_the_output_goes_there(tmp_path: Path) -> None:
    """Started with stdout closed (`>&-`, a supervisor): the flush added for a full disk
    met sys.stdout None ("unexpected error: AttributeError", exit 2, after an apply that
    was done; --help printed a traceback). The results go nowhere, as before; only an
    output asked for on stdout (-o -) is an error, before anything is written."""
    old, new, _, new_bytes = make_pair(tmp_path)
    delta = diff(tmp_path, old, new)
    base = tmp_path / "base.bin"
    base.write_bytes(old.read_bytes())

    def closed(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "cellmigrate", *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              preexec_fn=lambda: os.close(1))

    for args in (("--help",), ("--version",), ("checksum", str(old)), ("apply", str(base), str(delta))):
        done = closed(*args)
        assert done.returncode == 0 and done.stderr == "", (args, done.stderr)
    assert base.read_bytes() == new_bytes
    for args in (("apply", str(old), str(delta), "-o", "-"), ("diff", str(old), str(new), "-o", "-")):
        line = assert_one_line_error(closed(*args), 2)
        assert line.endswith("cannot write '-': stdout is closed"), line
    for fd, args, said in ((0, ("apply", str(old), "-", "-o", str(tmp_path / "x.bin")), "cannot open '-': stdin is closed"),
                           (0, ("receive", "--stdio", str(tmp_path / "in.bin")), "stdin is closed"),
                           (1, ("receive", "--stdio", str(tmp_path / "in.bin")), "stdout is closed")):
        done = subprocess.run([sys.executable, "-m", "cellmigrate", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                              preexec_fn=lambda fd=fd: os.close(fd))  # type: ignore[misc]
        line = assert_one_line_error(done, 2)
        assert line.endswith(said), line  # not "unexpected error: AttributeError"
    assert not (tmp_path / "x.bin").exists() and not (tmp_path / "in.bin").exists()


@pytest.mark.parametrize("compress", ["auto", "rle"])
def test_applying_a_delta_twice(tmp_path: Path, compress: str) -> None:
    """An XOR delta (the default) is relative to OLD: applied to its own result it is
    refused, nothing written, and the refusal says the base already is the result; an RLE
    delta gives NEW again."""
    old, new, _, new_bytes = make_pair(tmp_path)
    delta = diff(tmp_path, old, new, "--compress", compress)
    base = tmp_path / "base.bin"
    base.write_bytes(old.read_bytes())
    assert run("apply", str(base), str(delta)).returncode == 0
    again = run("apply", str(base), str(delta))
    if compress == "rle":
        assert again.returncode == 0, again.stderr
    else:
        line = assert_one_line_error(again, 1)
        assert "already is this delta's result" in line
    assert base.read_bytes() == new_bytes
    # Refused against some other state: no such note.
    other = tmp_path / "other.bin"
    other.write_bytes(bytes(len(new_bytes)))
    wrong = run("apply", str(other), str(delta))
    assert wrong.returncode == 1 and "already is" not in wrong.stderr


def test_text_for_a_closed_stream_goes_nowhere(capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """print_out(text, sys.stderr) with stderr closed (None) printed on stdout: receive
    --stdio 2>&- put its report into the protocol's channel. From a review."""
    from cellmigrate._stdout import print_out

    monkeypatch.setattr(sys, "stderr", None)
    print_out("for stderr", sys.stderr)
    print_out("for stdout")
    monkeypatch.setattr(sys, "stdout", None)
    print_out("for a closed stdout")  # no error either
    monkeypatch.undo()
    assert capsys.readouterr().out == "for stdout\n"


def test_a_full_disk_under_a_stream_does_not_claim_nothing_changed() -> None:
    """'-o -' into a full disk said "nothing was changed" when part of the delta was in
    the file stdout points to; files (written beside and renamed) still say it."""
    from cellmigrate.cli import _os_error

    full = OSError(errno.ENOSPC, "No space left on device")
    assert str(_os_error("-", full)).endswith("(disk full: what was written to the stream is incomplete)")
    assert str(_os_error("out.cmd", full)).endswith("(disk full: nothing was changed)")
