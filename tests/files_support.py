"""Helpers shared by the file-safety tests (test_files_*.py): states, deltas, CLI runs.

The tests drive ``python -m cellmigrate`` in child processes and kill, truncate, or
write to files under them; these helpers keep that plumbing in one place.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from cellmigrate import PAGE_SIZE, DeltaSnapshot

AGENT = bytes(16)


def cli_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = dict(os.environ)
    env.pop("CELLMIGRATE_DEBUG", None)
    for name in ("CELLMIGRATE_TEST_IO_DELAY", "CELLMIGRATE_TEST_PAUSE_FILE", "CELLMIGRATE_TEST_NO_O_TMPFILE"):
        env.pop(name, None)
    if extra:
        env.update(extra)
    return env


def cli_args(*args: str) -> List[str]:
    return [sys.executable, "-m", "cellmigrate", *args]


def run(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 120,
        input: Optional[bytes] = None) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    """Run the CLI; stdout is bytes (it may carry a delta), stderr text.

    The working directory is the temp directory, not the checkout: an implementation
    that took ``-`` for a file name would litter there, not in the source tree.
    """
    proc = subprocess.run(cli_args(*args), capture_output=True, env=cli_env(env), timeout=timeout, input=input,
                          cwd=tempfile.gettempdir())
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout, proc.stderr.decode(errors="replace"))


def spawn(*args: str, env: Optional[Dict[str, str]] = None) -> subprocess.Popen:  # type: ignore[type-arg]
    return subprocess.Popen(cli_args(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=cli_env(env),
                            cwd=tempfile.gettempdir())


def one_line_error(proc: subprocess.CompletedProcess, code: int) -> str:  # type: ignore[type-arg]
    """The failure contract: exit code, one line on stderr, no traceback, no signal death."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("cellmigrate")
    return lines[0]


def make_states(size: int, dirty_fraction: float = 0.05, seed: int = 7) -> Tuple[bytes, bytes]:
    """OLD (random bytes) and NEW (``dirty_fraction`` of the pages changed, scattered)."""
    rng = np.random.default_rng(seed)
    old = rng.integers(0, 256, size=size, dtype=np.uint8)
    new = old.copy()
    npages = -(-size // PAGE_SIZE)
    for page in rng.choice(npages, size=max(1, int(npages * dirty_fraction)), replace=False):
        start = int(page) * PAGE_SIZE
        end = min(start + PAGE_SIZE, size)
        new[start:end] = rng.integers(0, 256, size=end - start, dtype=np.uint8)
    return old.tobytes(), new.tobytes()


def write_delta(path: Path, old: bytes, new: bytes, resize: bool = False) -> Path:
    delta = DeltaSnapshot.create(AGENT, old, new, 0, 1, resize=resize)
    path.write_bytes(delta.serialize())
    return path


def wait_for_lines(flag: Path, count: int, proc: "subprocess.Popen[bytes]", timeout: float = 30) -> None:
    """Wait until the child announced ``count`` pause points in ``flag`` (or died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if flag.exists() and len(flag.read_text().splitlines()) >= count:
            return
        if proc.poll() is not None:
            raise AssertionError(f"child exited early ({proc.returncode}): {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.005)
    raise AssertionError(f"child never reached pause point {count} in {flag}")


def leftovers(directory: Path, keep: Sequence[str]) -> List[str]:
    """Names in ``directory`` other than ``keep`` (temp files, journals)."""
    return sorted(name for name in os.listdir(directory) if name not in keep)
