"""A full disk is an ordinary error: one line, exit 2, BASE unchanged, no file left (issue 10 §2).

Faithful on purpose: the files live on a real, small file system that is really full,
mounted in a private mount namespace (``unshare -m`` as root, ``unshare -Urm`` otherwise,
so nothing is visible outside and the mount goes away with the process): a 24 MiB tmpfs,
and (as root, under ``-m large``) a 40 MiB ext4 loop image made with ``mkfs.ext4 -m 0`` (no blocks reserved
for root, who would otherwise write past "full"). Writes into holes of a sparse file,
``posix_fallocate`` and ``pwrite`` past the end get the kernel's own ENOSPC there; writes
through a memory map would get SIGBUS, which is what the issue observed (on tmpfs even
*reading* a hole through a map needs a page, and fails the same way). RLIMIT_FSIZE would
only give EFBIG (and SIGXFSZ) at a size limit, not ENOSPC in a hole, so it is not used.
Where a file system cannot be mounted (no ``unshare``, user namespaces disabled, ext4
without root), that case is skipped with the reason.

One child runs every scenario on the same tmpfs, filling it to the brim with a filler
file before each command, and reports what it saw as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Dict, List

import pytest

from files_support import cli_env, make_states, write_delta

MiB = 1 << 20

SCENARIOS = textwrap.dedent(r'''
    import hashlib, json, os, shutil, subprocess, sys
    mnt, data = sys.argv[1], sys.argv[2]

    def cli(*args, env=None):
        e = dict(os.environ, **(env or {}))
        p = subprocess.run([sys.executable, "-m", "cellmigrate", *args], capture_output=True, text=True, env=e)
        return p.returncode, p.stderr

    def digest(path):
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).hexdigest()

    def clear():
        for name in os.listdir(mnt):
            os.unlink(os.path.join(mnt, name))

    def fill(leave):
        """Fill the tmpfs until only `leave` bytes are free."""
        st = os.statvfs(mnt)
        free = st.f_bavail * st.f_frsize
        fd = os.open(os.path.join(mnt, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            if free > leave:
                os.posix_fallocate(fd, 0, free - leave)
        finally:
            os.close(fd)

    def put(name, src, sparse=False):
        path = os.path.join(mnt, name)
        if sparse:
            # A sparse file: the whole size, but only the first page allocated.
            size = os.path.getsize(src)
            with open(src, "rb") as fh:
                first = fh.read(4096)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.ftruncate(fd, size)
            os.pwrite(fd, first, 0)
            os.close(fd)
        else:
            shutil.copyfile(src, path)
        return path

    results = []

    def scenario(name, base_src, delta, extra, leave, sparse=False, env=None, out=False):
        clear()
        base = put("base.bin", os.path.join(data, base_src), sparse)
        before = digest(base)
        size_before = os.path.getsize(base)
        fill(leave)
        args = ["apply", base, os.path.join(data, delta)] + extra
        if out:
            args += ["-o", os.path.join(mnt, "out.bin")]
        code, err = cli(*args, env=env)
        results.append({
            "name": name, "code": code, "stderr": err,
            "base_unchanged": digest(base) == before and os.path.getsize(base) == size_before,
            "files": sorted(os.listdir(mnt)),
        })

    # 1. in place, sparse base: the pages land in holes.
    scenario("in place, sparse base", "sparse_old.bin", "sparse.cmd", [], 1 << 20, sparse=True)
    # 2. in place, full base: the journal itself does not fit.
    scenario("in place, journal does not fit", "old.bin", "d.cmd", [], 256 << 10)
    # 3. in place, short base that must grow.
    scenario("in place, growing base", "short.bin", "grow.cmd", [], 2 << 20)
    # 4./5. -o with a short base (the result needs the full size), unnamed and named temps.
    scenario("-o, short base", "short.bin", "grow.cmd", [], 2 << 20, out=True)
    scenario("-o, short base, named temp", "short.bin", "grow.cmd", [], 2 << 20, out=True,
             env={"CELLMIGRATE_TEST_NO_O_TMPFILE": "1"})
    # 6./7. --safe-replace: the copy does not fit.
    scenario("--safe-replace", "old.bin", "d.cmd", ["--safe-replace"], 2 << 20)
    scenario("--safe-replace, named temp", "old.bin", "d.cmd", ["--safe-replace"], 2 << 20,
             env={"CELLMIGRATE_TEST_NO_O_TMPFILE": "1"})
    # 8. diff -o onto the full disk.
    clear()
    fill(64 << 10)
    code, err = cli("diff", os.path.join(data, "old.bin"), os.path.join(data, "new.bin"), "-o",
                    os.path.join(mnt, "out.cmd"))
    results.append({"name": "diff -o", "code": code, "stderr": err, "base_unchanged": True,
                    "files": sorted(os.listdir(mnt))})
    print(json.dumps(results))
''')


def _namespace_prefix() -> List[str]:
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare(1) to mount a small tmpfs in a private mount namespace")
    return ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-Urm"]


def _run_in_fs(tmp_path: Path, kind: str) -> List[Dict[str, Any]]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "scenarios.py"
    script.write_text(SCENARIOS)
    if kind == "tmpfs":
        mount = f"mount -t tmpfs -o size=24m cmtest {mnt}"
    else:
        if os.geteuid() != 0 or shutil.which("mkfs.ext4") is None:
            pytest.skip("an ext4 loop image needs root and mkfs.ext4")
        image = tmp_path / "ext4.img"
        with open(image, "wb") as fh:
            fh.truncate(40 * MiB)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True, capture_output=True)
        mount = f"mount -o loop {image} {mnt}"
    # The scenarios run in a fresh directory of the new file system (ext4 has lost+found).
    shell = (f"{mount} || exit 97; mkdir {mnt}/w && "
             f"exec {sys.executable} {script} {mnt}/w {tmp_path}")
    proc = subprocess.run([*_namespace_prefix(), "sh", "-c", shell], capture_output=True, text=True,
                          env=cli_env(), timeout=300)
    if proc.returncode == 97 or (proc.returncode != 0 and "unshare" in proc.stderr):
        pytest.skip(f"cannot mount a {kind} file system in a private namespace here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(mnt) == []  # the namespace's mount was never visible here
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("kind", ["tmpfs", pytest.param("ext4", marks=pytest.mark.large)])
def test_disk_full_is_one_line_exit_2_and_changes_nothing(tmp_path: Path, kind: str) -> None:
    old, new = make_states(8 * MiB, dirty_fraction=0.2, seed=9)
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    write_delta(tmp_path / "d.cmd", old, new)
    # Sparse: zeros except page 0; NEW fills 20% of the pages (holes in BASE).
    sparse_old = old[:4096] + bytes(32 * MiB - 4096)
    _, sparse_new = make_states(32 * MiB, dirty_fraction=0.2, seed=10)
    sparse_new = old[:4096] + sparse_new[4096:]
    sparse_target = bytearray(sparse_old)
    for page in range(1, 32 * MiB // 4096, 5):
        sparse_target[page * 4096:(page + 1) * 4096] = sparse_new[page * 4096:(page + 1) * 4096]
    (tmp_path / "sparse_old.bin").write_bytes(sparse_old)
    write_delta(tmp_path / "sparse.cmd", sparse_old, bytes(sparse_target))
    # A short base (1 MiB of OLD) and the delta to a 32 MiB state.
    short = old[: 1 * MiB]
    (tmp_path / "short.bin").write_bytes(short)
    grown_new = bytearray(short + bytes(32 * MiB - len(short)))
    grown_new[20 * MiB:21 * MiB] = new[:MiB]
    # A resizing delta (it records the 1 MiB base; a version-2 delta for the full size refuses a short base).
    write_delta(tmp_path / "grow.cmd", short, bytes(grown_new), resize=True)

    results = _run_in_fs(tmp_path, kind)
    print(f"\ndisk full on {kind}:", [(r["name"], r["code"], r["stderr"].strip()[-90:]) for r in results])
    assert len(results) == 8
    for r in results:
        lines = r["stderr"].splitlines()
        assert r["code"] == 2, r
        assert len(lines) == 1 and "Traceback" not in r["stderr"], r
        assert "No space left on device" in lines[0], r
        assert r["base_unchanged"], r
        expected = ["filler"] if r["name"] == "diff -o" else ["base.bin", "filler"]
        assert r["files"] == expected, r  # no journal, no temporary file, no partial output
