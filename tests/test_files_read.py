"""Inputs that another process truncates or writes while cellmigrate reads them (issue 10 §2, §5).

Truncation: the child announces each input it has opened and mapped
(``CELLMIGRATE_TEST_PAUSE_FILE``) and waits a moment; the test then truncates the file to
4 KiB, so every read after that touches mapped pages past the end: without the SIGBUS
guard (cython/cm_guard.h) the process dies of SIGBUS (exit -7). Required: one line, exit
2, nothing written. The reads go through cellmigrate's kernels, numpy, xxhash and BLAKE3
(on its own threads), so each checksum algorithm is a separate case.

Changes: a writer process commits two-page transactions (page P, then page Q, each
holding a counter) into NEW while ``diff`` runs over and over; a delta must never hold a
state that never existed (Q newer than P). Required: every diff either refuses (exit 1)
or yields a consistent state, and at least one overlapped a write and refused.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import List

import numpy as np
import pytest

from cellmigrate import PAGE_SIZE, DeltaSnapshot

from files_support import cli_args, cli_env, make_states, one_line_error, run, wait_for_lines, write_delta

MiB = 1 << 20
SIGBUS_EXIT = -7

# (name, argv template, pause points before the read, file to truncate)
_LARGE = pytest.mark.large  # more cases of the same kind, run in CI with -m large
TRUNCATE_CASES = [
    pytest.param("checksum tree", ["checksum", "{new}"], 1, "new", id="checksum tree"),
    pytest.param("checksum xxh3_128", ["checksum", "-a", "xxh3_128", "{new}"], 1, "new", id="checksum xxh3", marks=_LARGE),
    pytest.param("checksum blake3", ["checksum", "-a", "blake3", "{new}"], 1, "new", id="checksum blake3"),
    pytest.param("checksum simple", ["checksum", "-a", "simple", "{new}"], 1, "new", id="checksum simple", marks=_LARGE),
    pytest.param("verify", ["verify", "{old}", "{new}"], 2, "new", id="verify"),
    pytest.param("diff", ["diff", "{old}", "{new}", "-o", "{out}"], 2, "new", id="diff"),
    pytest.param("diff old", ["diff", "{old}", "{new}", "-o", "{out}"], 2, "old", id="diff old", marks=_LARGE),
    pytest.param("inspect", ["inspect", "{delta}"], 1, "delta", id="inspect", marks=_LARGE),
    pytest.param("apply in place", ["apply", "{base}", "{delta}"], 2, "base", id="apply in place"),
    pytest.param("apply -o", ["apply", "{base}", "{delta}", "-o", "{out}"], 2, "base", id="apply -o", marks=_LARGE),
]


@pytest.mark.parametrize("name,argv,points,victim", TRUNCATE_CASES)
def test_input_truncated_while_read_is_one_line_exit_2(tmp_path: Path, name: str, argv: List[str],
                                                        points: int, victim: str) -> None:
    old, new = make_states(16 * MiB)
    files = {"old": tmp_path / "old.bin", "new": tmp_path / "new.bin", "base": tmp_path / "base.bin",
             "delta": tmp_path / "d.cmd", "out": tmp_path / "out.bin"}
    files["old"].write_bytes(old)
    files["new"].write_bytes(new)
    files["base"].write_bytes(old)
    write_delta(files["delta"], old, new)
    flag = tmp_path / "pauses"
    env = {"CELLMIGRATE_TEST_PAUSE_FILE": str(flag), "CELLMIGRATE_TEST_PAUSE_SECONDS": "0.3"}
    proc = subprocess.Popen(cli_args(*(a.format(**{k: str(v) for k, v in files.items()}) for a in argv)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(env))
    wait_for_lines(flag, points, proc)
    os.truncate(files[victim], 4096)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != SIGBUS_EXIT, "killed by SIGBUS"
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out, err.decode()), 2)
    assert "truncated" in line
    assert not files["out"].exists()
    assert not (tmp_path / "base.bin.cmjournal").exists()
    assert [n for n in os.listdir(tmp_path) if "cellmigrate" in n] == []
    if victim == "base":
        assert files["base"].stat().st_size == 4096  # cut by the other process, not written by us


def test_guard_reports_faults_in_process(tmp_path: Path) -> None:
    """The library-level contract: a truncated map reads zeros and ``check`` raises."""
    from cellmigrate import TruncatedInputError, digest
    from cellmigrate.statefile import StateFile

    path = tmp_path / "s.bin"
    path.write_bytes(os.urandom(4 * MiB))
    with StateFile(path) as f:
        os.truncate(path, 4096)
        digest(f.buffer, "blake3")
        assert f.faults() == 4 * MiB // 4096 - 1
        with pytest.raises(TruncatedInputError):
            f.check()


KEPT_VIEW_CHILD = textwrap.dedent("""
    import os, sys
    from cellmigrate.statefile import StateFile
    path = sys.argv[1]
    f = StateFile(path)
    view = memoryview(f.buffer)[4096:]  # close() cannot unmap under a live view
    f.close()
    os.truncate(path, 4096)
    print(bytes(view[-16:]) == bytes(16))  # zeros past the cut, not a SIGBUS
""")


CYCLE_CHILD = textwrap.dedent("""
    import gc, os, sys
    from cellmigrate.statefile import StateFile
    path = sys.argv[1]
    f = StateFile(path)
    view = memoryview(f.buffer)
    f.close()  # the view keeps the map
    class Holder:
        def __del__(self):  # runs in the collection, before the cycle's map is unmapped
            print(bytes(self.view[-16:]) == bytes(16))
    holder = Holder()
    holder.view, holder.me = view, holder
    del view, holder
    os.truncate(path, 4096)
    gc.collect()
""")


@pytest.mark.parametrize("child", [KEPT_VIEW_CHILD, CYCLE_CHILD], ids=["closed under a live view", "freed in a cycle"])
def test_a_state_file_map_stays_guarded_until_it_is_unmapped(tmp_path: Path, child: str) -> None:
    """The guard let a map go before it was unmapped, and a read past a truncation then
    killed the process with SIGBUS: close() removed it first, and a view kept the map; in
    a reference cycle the collector calls weakref callbacks before it frees the cycle, so
    a finalizer read the map unguarded. In a child. From a review."""
    path = tmp_path / "s.bin"
    path.write_bytes(os.urandom(4 * MiB))
    proc = subprocess.run([sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != SIGBUS_EXIT, "killed by SIGBUS"
    assert proc.returncode == 0 and proc.stdout.strip() == "True", (proc.returncode, proc.stderr[-2000:])


WRITER = textwrap.dedent("""
    import os, struct, sys, time
    path, p, q, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    fd = os.open(path, os.O_WRONLY)
    k = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and k < 100000:
        k += 1
        block = struct.pack("<Q", k) * 512
        os.pwrite(fd, block, p * 4096)   # page P first,
        os.pwrite(fd, block, q * 4096)   # then page Q: P >= Q always holds in the file
        time.sleep(0.002)
    print(k)
""")


def _counter(state: bytes, page: int) -> int:
    return int(struct.unpack_from("<Q", state, page * PAGE_SIZE)[0])


def test_diff_refuses_a_state_written_during_the_read(tmp_path: Path) -> None:
    size = 32 * MiB
    old = np.random.default_rng(5).integers(0, 256, size=size, dtype=np.uint8)
    p, q = 3, size // PAGE_SIZE - 3
    for page in (p, q):
        old[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = 0
    old_path, new_path = tmp_path / "old.bin", tmp_path / "new.bin"
    old.tofile(old_path)
    old.tofile(new_path)
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(new_path), str(p), str(q), "20"],
                              stdout=subprocess.PIPE, text=True)
    refused = consistent = 0
    try:
        time.sleep(0.1)
        deadline = time.monotonic() + 15
        while (refused < 2 or consistent + refused < 4) and time.monotonic() < deadline and consistent + refused < 10:
            out = tmp_path / "d.cmd"
            proc = run("diff", str(old_path), str(new_path), "-o", str(out), "-f")
            if proc.returncode == 1:
                assert "changed while it was read" in one_line_error(proc, 1)
                assert not out.exists()
                refused += 1
                continue
            assert proc.returncode == 0, proc.stderr
            state = bytearray(old.tobytes())
            DeltaSnapshot.deserialize(out.read_bytes()).apply(state)
            cp, cq = _counter(state, p), _counter(state, q)
            assert cq <= cp <= cq + 1, f"the delta holds a state that never existed: P={cp}, Q={cq}"
            out.unlink()
            consistent += 1
    finally:
        writer.terminate()
        writer.wait(10)
    print(f"\ndiff during two-page transactions: {refused} refused, {consistent} consistent")
    assert refused >= 1, "no diff overlapped a write"
