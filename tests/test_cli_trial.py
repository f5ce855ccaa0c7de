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


from cellmigrate import PAGE_SIZE
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
    # The grown state is not the base of that delta: refused, naming both sizes.
    line = assert_one_line_error(run("apply", str(tmp_path / "new"), str(delta), "-o", str(tmp_path / "o2")), 1)
    assert f"is {len(new)} bytes" in line and f"base of {len(old)} bytes" in line
