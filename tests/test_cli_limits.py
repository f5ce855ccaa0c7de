"""The CLI's size limit and its integrity wording (issue 10 §4).

* ``--max-size`` on ``diff``, ``inspect`` and ``apply`` is one limit with one default
  (the wire reader's, 64 GiB): ``diff`` never writes a delta that ``inspect``/``apply``
  then refuse with the same setting, and every refusal names ``--max-size``.
* A delta without a strong digest (checksum only) is never called verified: the CLI says
  "checksum only, not verified" in words (inspect, diff and apply output, JSON field).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Tuple

import pytest

from cellmigrate import PAGE_SIZE, DeltaSnapshot, cli, wire
from cellmigrate.cli import main

NOT_VERIFIED = "checksum only, not verified"
BIG = (64 << 30) + PAGE_SIZE  # the repro: 64 GiB + 4 KiB


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CELLMIGRATE_DEBUG"}
    return subprocess.run([sys.executable, "-m", "cellmigrate", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> Tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def pair(tmp_path: Path, pages: int = 3) -> Tuple[Path, Path, bytes]:
    old = bytes(range(256)) * (pages * PAGE_SIZE // 256)
    new = bytearray(old)
    new[PAGE_SIZE + 7] ^= 0x55
    a, b = tmp_path / "old.bin", tmp_path / "new.bin"
    a.write_bytes(old)
    b.write_bytes(bytes(new))
    return a, b, bytes(new)


# --------------------------------------------------------------------------------------
# --max-size: one limit on both sides
# --------------------------------------------------------------------------------------


def test_one_default_on_the_writing_and_the_reading_side() -> None:
    assert cli.DEFAULT_MAX_SIZE == wire.DEFAULT_MAX_TOTAL_SIZE == 64 << 30
    parser = cli.build_parser()
    for command in (["diff", "a", "b", "-o", "d"], ["apply", "a", "d"], ["inspect", "d"]):
        assert parser.parse_args(command).max_size == wire.DEFAULT_MAX_TOTAL_SIZE


def test_diff_refuses_a_state_readers_would_refuse(tmp_path: Path) -> None:
    """The repro: two sparse 64 GiB + 4 KiB states. diff used to scan them and write a
    delta inspect/apply then refused; now it refuses at once, naming --max-size."""
    old, new = tmp_path / "old.bin", tmp_path / "new.bin"
    for path in (old, new):
        with open(path, "wb") as f:
            f.truncate(BIG)
    out = tmp_path / "delta.cmd"
    started = time.monotonic()
    proc = run("diff", str(old), str(new), "-o", str(out))
    line = one_line_error(proc, 2)
    assert time.monotonic() - started < 60  # refused before reading 128 GiB
    # the reader's bound covers both sizes a delta declares (state and base)
    assert f"OLD '{old}' is {BIG} bytes" in line
    assert f"is {BIG} bytes (64 GiB), over --max-size {64 << 30} bytes (64 GiB)" in line
    assert "pass a larger --max-size to 'diff', 'inspect' and 'apply' alike" in line
    assert not out.exists()


def test_diff_bounds_old_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new, _ = pair(tmp_path)
    code, _, err = run_cli(capsys, "diff", str(old), str(new), "-o", str(tmp_path / "d.cmd"),
                           "--max-size", str(old.stat().st_size - 1))
    assert code == 2 and f"OLD '{old}' is" in err and "--max-size" in err
    assert not (tmp_path / "d.cmd").exists()


def _forged_big_delta(tmp_path: Path) -> Path:
    """A well-formed delta for an all-zero 64 GiB + 4 KiB state (no pages, checksum 0),
    as a diff with --max-size 65GiB writes it; nothing of that size is allocated."""
    delta = DeltaSnapshot.create(bytes(16), bytes(PAGE_SIZE), bytes(PAGE_SIZE), 0, 1, digest=None)
    delta.total_size = BIG
    path = tmp_path / "big.cmd"
    path.write_bytes(delta.serialize())
    return path


def test_readers_refuse_over_max_size_by_name_and_accept_with_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    delta = _forged_big_delta(tmp_path)
    code, out, err = run_cli(capsys, "inspect", str(delta))
    assert code == 2 and out == ""
    assert f"is for a state of {BIG} bytes (64 GiB), over --max-size {64 << 30} bytes" in err
    code, out, err = run_cli(capsys, "inspect", "--max-size", "65GiB", "--json", str(delta))
    assert code == 0, err
    assert json.loads(out)["total_size"] == BIG
    base = tmp_path / "base.bin"
    base.write_bytes(b"\x01" * PAGE_SIZE)
    code, out, err = run_cli(capsys, "apply", str(base), str(delta))
    assert code == 2 and f"over --max-size {64 << 30} bytes" in err
    assert base.read_bytes() == b"\x01" * PAGE_SIZE


def test_writer_and_reader_agree_at_every_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new, new_bytes = pair(tmp_path)
    size = len(new_bytes)
    delta = tmp_path / "d.cmd"
    for limit in (size - 1, size):
        code, _, err = run_cli(capsys, "diff", str(old), str(new), "-o", str(delta), "--max-size", str(limit))
        written = code == 0
        assert written == (limit >= size), err
        if not written:
            assert code == 2 and f"over --max-size {limit} bytes" in err
            assert not delta.exists()
    # the delta written with --max-size=size is read with the same limit, refused with less
    for command in (["inspect", str(delta)], ["apply", str(old), str(delta), "-o", str(tmp_path / "out.bin")]):
        code, _, err = run_cli(capsys, *command, "--max-size", str(size - 1))
        assert code == 2 and "--max-size" in err, err
        assert not (tmp_path / "out.bin").exists()
        code, _, err = run_cli(capsys, *command, "--max-size", str(size))
        assert code == 0, err
    assert (tmp_path / "out.bin").read_bytes() == new_bytes


@pytest.mark.parametrize("bad", ["-1", "lots", "1.5B"])
def test_max_size_must_be_a_size(tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: str) -> None:
    code, _, err = run_cli(capsys, "inspect", "--max-size", bad, str(tmp_path / "d"))
    assert code == 2 and "--max-size" in err


# --------------------------------------------------------------------------------------
# "checksum only, not verified"
# --------------------------------------------------------------------------------------


def _diff(capsys: pytest.CaptureFixture[str], tmp_path: Path, *extra: str) -> Tuple[Path, Path, str, bytes]:
    old, new, new_bytes = pair(tmp_path)
    delta = tmp_path / "d.cmd"
    if delta.exists():
        delta.unlink()
    code, out, err = run_cli(capsys, "diff", str(old), str(new), "-o", str(delta), *extra)
    assert code == 0, err
    return old, delta, out, new_bytes


def test_checksum_only_delta_is_called_not_verified_everywhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, delta, out, new_bytes = _diff(capsys, tmp_path, "--digest", "none")
    assert f"digest: {NOT_VERIFIED}" in out
    code, out, _ = run_cli(capsys, "inspect", str(delta))
    assert code == 0 and f"none ({NOT_VERIFIED})" in out
    code, out, _ = run_cli(capsys, "inspect", "--json", str(delta))
    assert json.loads(out)["integrity"] == NOT_VERIFIED
    result = tmp_path / "out.bin"
    code, out, err = run_cli(capsys, "apply", str(old), str(delta), "-o", str(result))
    assert code == 0, err
    assert NOT_VERIFIED in out and "verified (" not in out
    assert result.read_bytes() == new_bytes
    result.unlink()
    code, out, err = run_cli(capsys, "apply", "--json", str(old), str(delta), "-o", str(result))
    assert code == 0, err
    info: Any = json.loads(out)
    assert info["integrity"] == NOT_VERIFIED and info["verified"] == ["checksum"]


@pytest.mark.parametrize(
    "extra, integrity, checked",
    [((), "xxh3_128_tree digest (checked by apply)", "verified (xxh3_128_tree digest)"),
     (("--digest", "blake3"), "blake3 digest (checked by apply)", "verified (blake3 digest)"),
     (("--key-file", "KEY"), "blake3 MAC (checked by apply)", "authenticated (blake3 MAC)")],
)
def test_a_delta_with_a_digest_is_not_called_checksum_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: Tuple[str, ...], integrity: str, checked: str
) -> None:
    """inspect says what the delta carries (it checks no digest: no base, no key); apply,
    which checked it, says verified / authenticated."""
    key = tmp_path / "key"
    key.write_bytes(bytes(range(32)))
    extra = tuple(str(key) if e == "KEY" else e for e in extra)
    old, delta, out, _ = _diff(capsys, tmp_path, *extra)
    assert "not verified" not in out
    code, out, _ = run_cli(capsys, "inspect", "--json", str(delta))
    assert json.loads(out)["integrity"] == integrity
    keyargs = ("--key-file", str(key)) if "--key-file" in extra else ()
    code, out, err = run_cli(capsys, "apply", str(old), str(delta), "-o", str(tmp_path / "o.bin"), *keyargs)
    assert code == 0, err
    assert "not verified" not in out and "result verified (checksum + " in out
    code, out, err = run_cli(capsys, "apply", "--json", str(old), str(delta), "-o", str(tmp_path / "o2.bin"), *keyargs)
    assert code == 0, err
    assert json.loads(out)["integrity"] == checked


def test_readers_refuse_from_the_header_before_decoding(tmp_path: Path) -> None:
    """The size bound is the wire reader's own, checked before any page is decoded: a
    delta declaring too large a state is refused with DeclaredSizeError (a CorruptDataError
    naming the field), even when its pages are garbage."""
    from cellmigrate import CorruptDataError, DeclaredSizeError, InputTooLargeError

    blob = bytearray(_forged_big_delta(tmp_path).read_bytes())
    with pytest.raises(DeclaredSizeError, match="total_size .* exceeds the maximum") as info:
        DeltaSnapshot.deserialize(bytes(blob))
    err = info.value
    assert isinstance(err, CorruptDataError) and isinstance(err, InputTooLargeError)
    assert (err.field, err.size, err.limit) == ("total_size", BIG, wire.DEFAULT_MAX_TOTAL_SIZE)
    blob[-40] ^= 0xFF  # corrupt the body: the size refusal still comes first
    with pytest.raises(DeclaredSizeError):
        DeltaSnapshot.deserialize(bytes(blob))


def test_readers_bound_the_base_size_of_a_resizing_delta(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = bytes(range(256)) * (2 * PAGE_SIZE // 256)  # 8 KiB shrinking to 4 KiB
    delta = DeltaSnapshot.create(bytes(16), old, old[:PAGE_SIZE], 0, 1, resize=True)
    assert (delta.base_size, delta.total_size) == (2 * PAGE_SIZE, PAGE_SIZE)
    path = tmp_path / "shrink.cmd"
    path.write_bytes(delta.serialize())
    code, _, err = run_cli(capsys, "inspect", str(path), "--max-size", str(PAGE_SIZE))
    assert code == 2 and f"is for a base of {2 * PAGE_SIZE} bytes" in err and "--max-size" in err
    code, _, err = run_cli(capsys, "inspect", str(path), "--max-size", str(2 * PAGE_SIZE))
    assert code == 0, err


# --------------------------------------------------------------------------------------
# key files are read with a bound
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["checksum", "diff", "apply"])
def test_key_file_reads_are_bounded(tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str) -> None:
    """--key-file /dev/zero used to read until the OOM killer ended the process."""
    old, new, _ = pair(tmp_path)
    argv = {
        "checksum": ["checksum", str(old), "-a", "blake3"],
        "diff": ["diff", str(old), str(new), "-o", str(tmp_path / "d.cmd")],
        "apply": ["apply", str(old), str(tmp_path / "d.cmd"), "-o", str(tmp_path / "o.bin")],
    }[command]
    if command == "apply":
        assert run_cli(capsys, "diff", str(old), str(new), "-o", str(tmp_path / "d.cmd"))[0] == 0
    code, out, err = run_cli(capsys, *argv, "--key-file", "/dev/zero")
    assert code == 2 and "holds more than 128 bytes: not a 32-byte key" in err, err
    big = tmp_path / "big.key"
    big.write_bytes(bytes(1 << 20))
    code, out, err = run_cli(capsys, *argv, "--key-file", str(big))
    assert code == 2 and "holds more than 128 bytes" in err
