"""CLI argument and output hygiene: streamed deltas refused from their header, integer
options range-checked before any I/O, the legacy-keyed opt-in flag, sizes that parse back
and result lines that stay one line whatever a file name holds."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Dict, List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import PAGE_SIZE, CorruptDataError, DeclaredSizeError
from cellmigrate.cli import _one_line
from cellmigrate.statefile import format_size, parse_size, spool_stream
from cellmigrate.wire import HEADER_SIZE, HEADER_SIZE_V1, MAGIC, decode_delta, wire_length_bound

from test_cli import assert_one_line_error, diff, make_pair, run

FIXTURES = Path(__file__).resolve().parent / "fixtures"
MANIFEST: Dict[str, Dict[str, Any]] = json.loads((FIXTURES / "manifest.json").read_text())
U64_MAX = (1 << 64) - 1
#: A version-2 fixture (its header declares its exact length).
V2_FIXTURE = FIXTURES / next(e["file"] for e in MANIFEST.values() if e.get("version", 1) == 2)


def _make_fixtures() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cellmigrate_make_fixtures_cli", FIXTURES / "make_fixtures.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _cli_pipe(stdin: Any, *args: str) -> subprocess.CompletedProcess:
    """The CLI with ``stdin`` (a file object or a pipe) as its standard input."""
    env = dict(os.environ)
    env.pop("CELLMIGRATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "cellmigrate", *args], stdin=stdin, capture_output=True,
                          text=True, env=env, timeout=60)


# --------------------------------------------------------------------------- 1. streams


def test_wire_length_bound_is_exact_for_v2_and_sound_for_v1() -> None:
    for name, entry in MANIFEST.items():
        blob = (FIXTURES / entry["file"]).read_bytes()
        version = struct.unpack_from("<H", blob, 8)[0]
        header = HEADER_SIZE if version == 2 else HEADER_SIZE_V1
        for cut in (0, 3, len(MAGIC), header - 1):
            assert wire_length_bound(blob[:cut]) is None, (name, cut)
        bound = wire_length_bound(blob[:header])
        assert bound is not None
        if version == 2:
            assert bound == len(blob), name
        else:
            assert bound >= len(blob), name
        assert wire_length_bound(blob) == bound  # more bytes than the header change nothing


def test_wire_length_bound_refuses_from_the_header() -> None:
    with pytest.raises(CorruptDataError, match="bad magic"):
        wire_length_bound(b"\x00")
    with pytest.raises(CorruptDataError, match="unsupported version 9"):
        wire_length_bound(MAGIC + struct.pack("<H", 9))
    blob = V2_FIXTURE.read_bytes()
    with pytest.raises(DeclaredSizeError) as info:
        wire_length_bound(blob[:HEADER_SIZE], max_total_size=PAGE_SIZE)
    assert info.value.field == "total_size"


def _fixture(name: str) -> bytes:
    return (FIXTURES / MANIFEST[name]["file"]).read_bytes()


def _with(blob: bytes, fmt: str, offset: int, value: int) -> bytes:
    out = bytearray(blob)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _set_sizes(blob: bytes, stored: int, decoded: int) -> bytes:
    """``blob`` with the header's payload sizes P (stored) and U (decoded) set."""
    return _with(_with(blob, "<Q", 80, stored), "<Q", 88, decoded)


# Headers decode_delta refuses by rules 2-3 (docs/FORMAT.md), whatever follows them.
HEADER_REFUSALS = {
    "no pages, a 1 TiB payload": lambda: _with(_set_sizes(_fixture("v2_encodings"), 1 << 40, 1 << 40), "<I", 76, 0),
    "P != U uncompressed": lambda: _set_sizes(_fixture("v2_encodings"), 1 << 40, 4096),
    "a zstd payload over zstd's bound": lambda: _with(_fixture("v2_zstd"), "<Q", 80, 1 << 40),
    "unknown compression id": lambda: _with(_fixture("v2_encodings"), "<B", 13, 7),
    "reserved bytes": lambda: _with(_fixture("v2_encodings"), "<B", 14, 1),
    "v1 reserved bytes": lambda: _with(_fixture("xxh3_128"), "<B", 13, 1),
}


@pytest.mark.parametrize("case", sorted(HEADER_REFUSALS))
def test_wire_length_bound_refuses_every_header_the_decoder_refuses(case: str) -> None:
    """A stream reader must refuse from the header what decoding would: the CLI spooled
    up to --max-size (64 GiB by default) to disk for a header declaring 0 pages and a
    1 TiB payload before decode_delta refused it at once."""
    blob = HEADER_REFUSALS[case]()
    with pytest.raises(CorruptDataError) as decoded:
        decode_delta(blob)
    header = HEADER_SIZE if struct.unpack_from("<H", blob, 8)[0] == 2 else HEADER_SIZE_V1
    with pytest.raises(CorruptDataError) as bounded:
        wire_length_bound(blob[:header])
    assert bounded.value.message == decoded.value.message


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(MANIFEST)), st.lists(st.tuples(st.integers(10, HEADER_SIZE - 1), st.integers(1, 255)),
                                                    min_size=1, max_size=3))
def test_wire_length_bound_and_the_decoder_agree_on_mutated_headers(name: str, flips: List[Tuple[int, int]]) -> None:
    """Whatever a header says, a bound that refuses it refuses it with the decoder's own
    error, and a delta the decoder accepts is never refused nor cut short by the bound."""
    blob = bytearray(_fixture(name))
    header = HEADER_SIZE if struct.unpack_from("<H", blob, 8)[0] == 2 else HEADER_SIZE_V1
    for at, x in flips:
        if at < header:
            blob[at] ^= x
    try:
        bound = wire_length_bound(bytes(blob[:header]))
    except CorruptDataError as exc:
        with pytest.raises(CorruptDataError) as decoded:
            decode_delta(bytes(blob))
        assert decoded.value.message == exc.message
        return
    try:
        decode_delta(bytes(blob))
    except CorruptDataError:
        return
    assert bound is not None and bound >= len(blob)


def test_spool_stops_at_the_declared_length(tmp_path: Path) -> None:
    """An endless stream behind a valid header is cut off at what the header declares."""
    blob = V2_FIXTURE.read_bytes()
    r, w = os.pipe()
    os.write(w, blob + bytes(PAGE_SIZE))
    os.close(w)
    try:
        with pytest.raises(ValueError, match=f"longer than the {len(blob)} bytes its header declares"):
            spool_stream(r, limit=1 << 30, what="stdin", bound=wire_length_bound)
    finally:
        os.close(r)
    r, w = os.pipe()
    os.write(w, blob)
    os.close(w)
    try:
        with spool_stream(r, limit=1 << 30, what="stdin", bound=wire_length_bound) as f:
            assert bytes(f.buffer) == blob
    finally:
        os.close(r)


def test_inspect_of_an_endless_stream_is_refused_at_once(tmp_path: Path) -> None:
    """/dev/zero (a path, or stdin) is not a delta: refused from its first bytes, not
    after spooling --max-size worth of zeros (the timeout would fire first)."""
    line = assert_one_line_error(run("inspect", "/dev/zero"), 2)
    assert "bad magic" in line
    with open("/dev/zero", "rb") as zero:
        line = assert_one_line_error(_cli_pipe(zero, "inspect", "-"), 2)
    assert "bad magic" in line
    old, _, _, _ = make_pair(tmp_path)
    with open("/dev/zero", "rb") as zero:
        line = assert_one_line_error(_cli_pipe(zero, "apply", str(old), "-", "-o", str(tmp_path / "out")), 2)
    assert "bad magic" in line and not (tmp_path / "out").exists()


def test_streamed_delta_with_endless_tail_or_oversized_header(tmp_path: Path) -> None:
    old, new, _, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old, new)
    # A valid delta followed by an endless stream: refused once past the declared length.
    cat = subprocess.Popen(["cat", str(delta), "/dev/zero"], stdout=subprocess.PIPE)
    try:
        assert cat.stdout is not None
        line = assert_one_line_error(_cli_pipe(cat.stdout, "inspect", "-"), 2)
    finally:
        cat.kill()
        cat.wait()
    assert f"longer than the {delta.stat().st_size} bytes its header declares" in line
    # A header declaring a state over --max-size: refused with the --max-size words at once.
    cat = subprocess.Popen(["cat", str(delta), "/dev/zero"], stdout=subprocess.PIPE)
    try:
        assert cat.stdout is not None
        line = assert_one_line_error(_cli_pipe(cat.stdout, "inspect", "-", "--max-size", "4KiB"), 2)
    finally:
        cat.kill()
        cat.wait()
    assert "over --max-size" in line
    # The delta itself still goes through stdin.
    with open(delta, "rb") as f:
        proc = _cli_pipe(f, "inspect", "-", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["wire_size"] == delta.stat().st_size


# --------------------------------------------------------------------------- 2. integers


@pytest.mark.parametrize("args", [
    ["--sequence", str(U64_MAX + 1)],
    ["--base-sequence", str(U64_MAX + 1)],
    ["--base-sequence", str(U64_MAX)],  # the default sequence, base + 1, does not fit
])
def test_sequences_out_of_u64_are_usage_errors_before_any_io(tmp_path: Path, args: list) -> None:
    # OLD and NEW do not exist: the range error must come first (no I/O at all).
    proc = run("diff", str(tmp_path / "missing-old"), str(tmp_path / "missing-new"), "-o",
               str(tmp_path / "d"), *args)
    line = assert_one_line_error(proc, 2)
    assert "missing" not in line and "unexpected" not in line
    assert str(U64_MAX) in line
    assert not (tmp_path / "d").exists()


def test_sequences_at_the_u64_limits_are_written(tmp_path: Path) -> None:
    old, new, _, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old, new, "--base-sequence", str(U64_MAX), "--sequence", "0")
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    assert (info["base_sequence"], info["sequence"]) == (U64_MAX, 0)
    delta = diff(tmp_path, old, new, "--sequence", str(U64_MAX), name="d2")
    assert json.loads(run("inspect", str(delta), "--json").stdout)["sequence"] == U64_MAX


# --------------------------------------------------------------------------- 3. legacy keyed


def test_keyed_v1_delta_names_the_cli_flag(tmp_path: Path) -> None:
    entry = MANIFEST["keyed_blake3"]
    fixture = FIXTURES / entry["file"]
    base_bytes, new_bytes = _make_fixtures().RECIPES["keyed_blake3"].states()
    base = tmp_path / "base.bin"
    base.write_bytes(base_bytes)
    key = tmp_path / "key"
    key.write_text(entry["key_hex"])
    for args in (["inspect", str(fixture)], ["apply", str(base), str(fixture), "--key-file", str(key)]):
        line = assert_one_line_error(run(*args), 2)
        assert "--allow-legacy-keyed" in line and "allow_legacy_keyed=True" not in line, line
        assert base.read_bytes() == base_bytes
    proc = run("inspect", str(fixture), "--allow-legacy-keyed", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["keyed"] is True
    proc = run("apply", str(base), str(fixture), "--key-file", str(key), "--allow-legacy-keyed")
    assert proc.returncode == 0, proc.stderr
    assert base.read_bytes() == new_bytes


def test_allow_legacy_keyed_help_says_why_it_is_dangerous() -> None:
    for command in ("inspect", "apply"):
        text = " ".join(run(command, "--help").stdout.split())
        assert "--allow-legacy-keyed" in text and "not under the MAC" in text


# --------------------------------------------------------------------------- 4. sizes


def test_every_size_format_size_prints_parses_back() -> None:
    sizes = {0, 1, 2, 1023, 1024, 1025, 1536, 4095, 4096, (1 << 60) + 12345, 1 << 70}
    for shift in range(0, 62, 3):
        for mult in (1, 3, 7, 1000, 1023, 1025, 99999):
            sizes.add(mult << shift)
            sizes.add((mult << shift) + 17)
    units = set()
    for n in sorted(sizes):
        text = format_size(n)
        units.add(text.split()[1])
        value = parse_size(text)
        number, unit = text.split()
        scale = parse_size(f"1 {unit}")
        # One printed decimal: the parsed value is within half a tenth of the unit (a tie
        # may round either way, and format_size divides in floats: 2**-40 relative slack).
        assert abs(value - n) <= scale // 20 + (n >> 40) + 32, (n, text, value)
        if "." not in number:
            assert value == int(number) * scale
    assert units == {"byte", "bytes", "KiB", "MiB", "GiB", "TiB", "PiB"}


@pytest.mark.parametrize("text,expected", [
    ("1PiB", 1 << 50), ("2 pib", 2 << 50), ("1P", 1 << 50), ("3PB", 3 * 10**15), ("512 bytes", 512),
    ("1 byte", 1), ("1.1 KiB", 1126), ("0.1GiB", 107374182), ("1.5KiB", 1536),
])
def test_parse_size_accepts_what_format_size_prints(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["1.3B", "0.5 bytes", "1.23KiB", "1 EiB"])
def test_parse_size_still_refuses_fractional_bytes(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --------------------------------------------------------------------------- 5. one line


def test_one_line_helper() -> None:
    assert _one_line("a\nb\r\n\tc\x1b[31md\u2028e") == "a b c [31md e"
    assert _one_line("  two  spaces kept ") == "  two  spaces kept "


def test_result_lines_stay_one_line_with_newlines_in_names(tmp_path: Path) -> None:
    old, new, _, _ = make_pair(tmp_path)
    evil = tmp_path / "a\nFAKE: line"
    proc = run("diff", str(old), str(new), "-o", str(evil))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1 and "FAKE" in proc.stdout
    proc = run("inspect", str(evil))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(str(tmp_path / "a FAKE: line"))
    assert len(proc.stdout.splitlines()) == len(run("inspect", str(evil)).stdout.splitlines())
    assert not any(line.startswith("FAKE") for line in proc.stdout.splitlines())
    out = tmp_path / "out\nFAKE"
    proc = run("apply", str(old), str(evil), "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == 1
    assert out.read_bytes() == new.read_bytes()
    proc = run("verify", str(out), str(new))
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1, proc.stdout


def test_a_full_tmpdir_is_named_not_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """A full $TMPDIR while spooling stdin said 'cannot read delta from stdin: No space
    left on device', as if stdin failed: the error names the spool."""
    import errno

    import cellmigrate.statefile as sf

    class FullSpool:
        def write(self, data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(sf.tempfile, "TemporaryFile", FullSpool)
    r, w = os.pipe()
    os.write(w, b"x" * 100)
    os.close(w)
    try:
        with pytest.raises(OSError, match=r"cannot spool it to a temporary file in .*\(\$TMPDIR\): No space left"):
            spool_stream(r, limit=1 << 20, what="stdin")
    finally:
        os.close(r)


@pytest.mark.parametrize("argv", [["apply", "a", "b", "--bogus"], ["checksum", "f", "--nope", "x"],
                                  ["verify", "a", "b", "c"], ["send", "f", "127.0.0.1:9", "--live-ish"]])
def test_unknown_arguments_name_their_command(argv: List[str]) -> None:
    """Reported by the command's own parser (CLI.md's ``cellmigrate COMMAND: error:``),
    not the top level's, which named no command."""
    line = assert_one_line_error(run(*argv), 2)
    assert line.startswith(f"cellmigrate {argv[0]}: error: unrecognized arguments: ")
    assert f"(see 'cellmigrate {argv[0]} --help')" in line
