"""What a new user's trial of the CLI found, each pinned: standard JSON, Unix socket paths
cleaned up, inspect's integrity words, a base of the wrong size, help texts that say what
the options do, plurals, and the messages of an unreachable or malformed address."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cellmigrate import PAGE_SIZE
from cellmigrate.cli import _QUIET_HELP
from live_net import CLI, Receiver, send
from test_cli import assert_one_line_error, diff, make_pair, run

README = Path(__file__).resolve().parent.parent / "README.md"


def _strict(text: str) -> Any:
    """``json.loads`` that refuses NaN/Infinity, as RFC 8259 (and jq, JSON.parse) do."""

    def refuse(name: str) -> Any:
        raise ValueError(f"not JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_json_text_maps_non_finite_floats_to_null() -> None:
    from cellmigrate._jsontext import json_text

    obj = {"a": float("inf"), "b": [1.5, float("nan"), (float("-inf"),)], "c": {"d": 2}, "e": "inf"}
    assert _strict(json_text(obj)) == {"a": None, "b": [1.5, None, [None]], "c": {"d": 2}, "e": "inf"}


def test_one_round_send_json_is_standard_json(tmp_path: Path) -> None:
    """A one-round send never estimates a downtime (infinite): that is null, not Infinity;
    the receiver's JSON is standard too."""
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(3 * PAGE_SIZE + 5))
    rx = Receiver(dst, "--json")
    sent = send(str(src), rx.address, "--json")
    got = rx.wait()
    assert sent.returncode == 0 and got.returncode == 0, (sent.stderr, got.stderr)
    summary = _strict(sent.stdout)
    assert len(summary["rounds"]) == 1 and summary["rounds"][0]["expected_downtime_s"] is None
    assert _strict(got.stdout)["state_size"] == 3 * PAGE_SIZE + 5


def test_every_file_command_json_is_standard_json(tmp_path: Path) -> None:
    old_path, new_path, _, _ = make_pair(tmp_path)
    delta = tmp_path / "delta.cmd"
    outputs = [
        run("checksum", str(new_path), "--json"),
        run("diff", str(old_path), str(new_path), "-o", str(delta), "--json"),
        run("inspect", str(delta), "--json", "--pages"),
        run("apply", str(old_path), str(delta), "-o", str(tmp_path / "out.bin"), "--json"),
        run("verify", str(new_path), str(tmp_path / "out.bin"), "--json"),
    ]
    for proc in outputs:
        assert proc.returncode == 0, proc.stderr
        assert isinstance(_strict(proc.stdout), dict)


# --------------------------------------------------------------------------- unix:PATH sockets


def _receiver(path: Path, dst: Path) -> "subprocess.Popen[str]":
    proc = subprocess.Popen([*CLI, "receive", "--listen", f"unix:{path}", str(dst)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    line = proc.stderr.readline()
    assert "listening on unix:" in line, (line, proc.poll())
    return proc


def test_receive_on_unix_socket_removes_its_path(tmp_path: Path) -> None:
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(2 * PAGE_SIZE))
    path = tmp_path / "rx.sock"
    for _ in range(2):  # the second run binds the same path: nothing was left behind
        proc = _receiver(path, dst)
        sent = send(str(src), f"unix:{path}")
        assert sent.returncode == 0, sent.stderr
        assert proc.wait(timeout=60) == 0
        assert not path.exists()
        assert dst.read_bytes() == src.read_bytes()
    proc = _receiver(path, dst)  # a signal: removed too
    proc.terminate()
    assert proc.wait(timeout=60) == 128 + 15
    assert not path.exists()


def test_unix_socket_stale_path_replaced_live_one_and_files_refused(tmp_path: Path) -> None:
    path = tmp_path / "rx.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))  # bound, never listening, closed: what a SIGKILLed receiver leaves
    stale.close()
    assert path.exists()
    proc = _receiver(path, tmp_path / "dst.bin")
    try:
        # A live socket is refused (one line, exit 2) and left to its owner.
        line = assert_one_line_error(run("receive", "--listen", f"unix:{path}", str(tmp_path / "b.bin")), 2)
        assert "cannot listen on" in line and "another process listens on it" in line
        assert path.exists()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    assert not path.exists()
    path.write_bytes(b"precious")  # not a socket: never deleted
    line = assert_one_line_error(run("receive", "--listen", f"unix:{path}", str(tmp_path / "b.bin")), 2)
    assert "is not a socket" in line
    assert path.read_bytes() == b"precious"


def test_unix_listener_close_leaves_a_rebound_path_alone(tmp_path: Path) -> None:
    from cellmigrate.live.transport import listen

    path = tmp_path / "s.sock"
    listener = listen(f"unix:{path}")
    os.unlink(path)  # someone removed it and another listener took the path
    other = listen(f"unix:{path}")
    listener.close()
    assert path.exists()  # not ours any more
    other.close()
    assert not path.exists()


def test_cli_md_documents_unix_addresses() -> None:
    text = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    assert "unix:PATH" in text


# --------------------------------------------------------------------------- inspect, apply


def test_inspect_does_not_claim_a_check_it_did_not_make(tmp_path: Path) -> None:
    old_path, new_path, _, _ = make_pair(tmp_path)
    (tmp_path / "key").write_bytes(os.urandom(32))
    plain = diff(tmp_path, old_path, new_path)
    keyed = diff(tmp_path, old_path, new_path, "--key-file", str(tmp_path / "key"), name="keyed.cmd")
    for delta, words in ((plain, "xxh3_128_tree digest (checked by apply)"), (keyed, "blake3 MAC (checked by apply)")):
        info = json.loads(run("inspect", str(delta), "--json").stdout)
        assert info["integrity"] == words
        text = run("inspect", str(delta)).stdout
        assert "verified" not in text and "authenticated" not in text and "checked by apply" in text
        # diff made the delta, it checked nothing against a base either.
        summary = json.loads(run("diff", str(old_path), str(new_path), "-o", str(tmp_path / "again.cmd"), "-f",
                                 "--json", *(["--key-file", str(tmp_path / "key")] if delta is keyed else [])).stdout)
        assert summary["integrity"] == words
    applied = json.loads(run("apply", str(old_path), str(plain), "-o", str(tmp_path / "o.bin"), "--json").stdout)
    assert applied["integrity"] == "verified (xxh3_128_tree digest)"  # apply did check it


def test_inspect_doc_sample_matches_the_real_output(tmp_path: Path) -> None:
    """docs/CLI.md's inspect sample has the rows inspect prints, and its JSON field list
    every field inspect --json --pages gives."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "CLI.md").read_text()
    section = doc[doc.index("### `inspect DELTA`"):doc.index("## Crash safety")]
    old_path, new_path, _, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    real = run("inspect", str(delta)).stdout.splitlines()[1:]
    sample = section.split("```console")[1].split("```")[0].strip().splitlines()[2:]
    assert [line[:15].strip() for line in sample] == [line[:15].strip() for line in real]
    info = json.loads(run("inspect", str(delta), "--json", "--pages").stdout)
    spans = re.findall(r"`([^`]+)`", section.split("JSON fields:")[1])
    fields = {name for span in spans for name in re.split(r",\s*", " ".join(span.split()))}
    assert set(info) <= fields and set(info["pages"][0]) <= fields


def test_larger_base_refusal_names_both_sizes(tmp_path: Path) -> None:
    old_path, new_path, old, _ = make_pair(tmp_path)
    delta = diff(tmp_path, old_path, new_path)
    longer = tmp_path / "longer.bin"
    longer.write_bytes(old + bytes(10))
    line = assert_one_line_error(run("apply", str(longer), str(delta), "-o", str(tmp_path / "o")), 1)
    assert f"is {len(old) + 10} bytes" in line and f"base of {len(old)} bytes" in line
    assert not (tmp_path / "o").exists()


def test_resize_delta_still_applies(tmp_path: Path) -> None:
    old = os.urandom(3 * PAGE_SIZE)
    new = old + os.urandom(2 * PAGE_SIZE)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(new)
    delta = diff(tmp_path, tmp_path / "old", tmp_path / "new", "--resize")
    assert run("apply", str(tmp_path / "old"), str(delta), "-o", str(tmp_path / "out")).returncode == 0
    assert (tmp_path / "out").read_bytes() == new
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    assert (info["base_size"], info["total_size"]) == (len(old), len(new))
    assert f"base size    12 KiB ({len(old)} bytes; apply refuses" in run("inspect", str(delta)).stdout
    # The grown state is not the base of that delta: refused, naming both sizes.
    line = assert_one_line_error(run("apply", str(tmp_path / "new"), str(delta), "-o", str(tmp_path / "o2")), 1)
    assert f"is {len(new)} bytes" in line and f"base of {len(old)} bytes" in line


# --------------------------------------------------------------------------- help texts


def _help(*cmd: str) -> str:
    proc = run(*cmd, "--help")
    assert proc.returncode == 0, proc.stderr
    return " ".join(proc.stdout.split())


def test_receive_max_state_size_takes_units(tmp_path: Path) -> None:
    from cellmigrate.cli import build_parser

    args = build_parser().parse_args(["receive", "--listen", "127.0.0.1:0", "x", "--max-state-size", "1MiB"])
    assert args.max_state_size == 1 << 20
    text = _help("receive")
    assert "no limit" not in text and "twice the offered size" in text
    protocol = (Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md").read_text()
    assert "twice the offered" in " ".join(protocol.split())


def test_chunk_size_help_says_bytes() -> None:
    text = _help("send")
    assert "--chunk-size SIZE bytes of pages per chunk" in text and "4KiB..64MiB" in text


def test_quiet_help_says_what_it_does_in_each_command() -> None:
    from cellmigrate.cli import build_parser

    commands = sorted(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert sorted(_QUIET_HELP) == commands
    for name in ("checksum", "verify", "send"):
        text = _help(name)
        assert "the value for 'checksum'" not in text and " ".join(_QUIET_HELP[name].split()) in text


def test_demo_help_mentions_the_live_webassembly_part() -> None:
    assert "WebAssembly agent migrated live" in _help("demo")


def test_top_level_exit_codes_match_the_readme() -> None:
    readme = " ".join(README.read_text().split())
    sentence = re.search(r"Exit codes: .*? a full disk\.", readme)
    assert sentence is not None and "1 states differ, delta refused" in sentence.group(0)
    assert sentence.group(0) in _help()


# --------------------------------------------------------------------------- wording


def test_plural_in_result_lines(tmp_path: Path) -> None:
    from cellmigrate.statefile import plural

    assert [plural(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(PAGE_SIZE))
    rx = Receiver(dst)
    sent = send(str(src), rx.address)
    got = rx.wait()
    assert sent.returncode == 0 and got.returncode == 0
    assert " in 1 round," in sent.stdout and " in 1 chunk " in got.stdout
    assert not re.search(r"\b1 (rounds|chunks|pages)\b", sent.stdout + sent.stderr + got.stdout)


def test_unreachable_receiver_says_cannot_connect(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(PAGE_SIZE))
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    line = assert_one_line_error(send(str(src), address, "--retries", "0"), 2)
    assert f"cannot connect to {address}" in line and "connection lost" not in line


def test_bad_address_is_a_usage_error_before_the_file_is_opened(tmp_path: Path) -> None:
    line = assert_one_line_error(send(str(tmp_path / "missing.bin"), "127.0.0.1"), 2)
    assert "HOST:PORT" in line and "missing.bin" not in line and "Migration failed" not in line


def test_failed_pause_command_message(tmp_path: Path) -> None:
    from cellmigrate.errors import CellError
    from cellmigrate.live.cli import FileSource

    (tmp_path / "s").write_bytes(bytes(PAGE_SIZE))
    for cmd, tail in (("false", "(exit 1)"), ("echo it broke >&2; exit 3", "(exit 3): it broke")):
        source = FileSource(str(tmp_path / "s"), pause_cmd=cmd)
        try:
            with pytest.raises(CellError) as info:
                source.pause()
            assert str(info.value).endswith(tail), str(info.value)
        finally:
            source.close()


@pytest.mark.parametrize("command", ["apply", "diff"])
def test_output_to_a_reader_that_goes_away_ends_quietly(tmp_path: Path, command: str) -> None:
    """``-o - | head -c 10``: the reader closing the pipe is not an error of ours, but the
    output was not all delivered: as a Unix filter that SIGPIPE ended, not a word on
    stderr and exit 141 (``set -o pipefail`` sees it; exit 0 hid a delta lost to a dead
    ``ssh``), whether the pipe broke in the middle of the result or of the delta."""
    old = os.urandom(8 << 20)
    new = bytearray(old)
    for page in range(0, len(new) // PAGE_SIZE, 2):  # half the pages rewritten: a 4 MiB delta
        new[page * PAGE_SIZE : (page + 1) * PAGE_SIZE] = os.urandom(PAGE_SIZE)
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    assert run("diff", str(tmp_path / "old"), str(tmp_path / "new"), "-o", str(tmp_path / "d")).returncode == 0
    args = (["apply", str(tmp_path / "old"), str(tmp_path / "d")] if command == "apply"
            else ["diff", str(tmp_path / "old"), str(tmp_path / "new")])
    proc = subprocess.Popen([*CLI, *args, "-o", "-"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(10)
    proc.stdout.close()  # the reader goes away with most of the output unread
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert len(head) == 10 and "error" not in err and "Broken pipe" not in err
    assert not [p for p in tmp_path.iterdir() if p.name not in ("old", "new", "d")]  # no temporary file left


def test_a_probe_and_a_stranger_are_named_as_such(tmp_path: Path) -> None:
    """A connection closed without a byte (a port probe, a health check) and one that
    speaks something else (HTTP) are each noted for what they are; a real migration
    is served after them."""
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    src.write_bytes(os.urandom(2 * PAGE_SIZE + 1))
    rx = Receiver(dst)
    host, port = rx.address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port))).close()
        with socket.create_connection((host, int(port))) as http:
            http.sendall(b"GET / HTTP/1.0\r\n\r\n")
            http.recv(1024)  # the receiver's ERROR, then it closes
        sent = send(str(src), rx.address)
        got = rx.wait()
    finally:
        rx.kill()
    assert sent.returncode == 0 and got.returncode == 0, (sent.stderr, got.stderr)
    assert "connection dropped: peer closed the connection without sending anything" in got.stderr
    assert "connection dropped: the peer is not a cellmigrate sender (unknown frame type 47)" in got.stderr  # "GET /": type is the 5th byte
    assert "Migration failed" not in got.stderr and dst.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("compress", ["zstd", "xor"])
def test_inspect_shows_what_the_page_payload_costs_on_the_wire(tmp_path: Path, compress: str) -> None:
    """The ratio shown was the page encodings' alone: a delta zstd took from 2.2 MiB to
    15 KiB said "ratio 0.809". The payload after zstd is shown too, and with the rest of
    the wire format it adds up to the delta's size."""
    old = bytes(8 << 20)
    new = bytearray(old)
    for page in range(0, len(new) // PAGE_SIZE, 3):
        new[page * PAGE_SIZE : page * PAGE_SIZE + 2000] = bytes([page % 7 + 1]) * 2000
    (tmp_path / "old").write_bytes(old)
    (tmp_path / "new").write_bytes(bytes(new))
    delta = tmp_path / "d"
    assert run("diff", str(tmp_path / "old"), str(tmp_path / "new"), "-o", str(delta), "--compress", compress,
               "--digest", "xxh3_128").returncode == 0
    info = json.loads(run("inspect", str(delta), "--json").stdout)
    overhead = 96 + 2 * 16 + 11 * info["dirty_pages"] + 16  # header, digests, page table, trailer
    assert info["payload_wire_size"] + overhead == delta.stat().st_size == info["wire_size"]
    text = run("inspect", str(delta)).stdout
    if compress == "zstd":
        assert info["payload_wire_size"] < info["compressed_size"] / 10
        assert info["payload_wire_ratio"] < info["compression_ratio"]
        assert re.search(r"payload compression: zstd -> [\d.]+ \w+ \(ratio 0\.\d{3}\)", text), text
    else:
        assert info["payload_wire_size"] == info["compressed_size"]
        assert "payload compression: none;" in text
