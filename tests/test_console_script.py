"""The ``cellmigrate`` console script and a Ctrl-C at any moment.

The package takes a few hundred milliseconds to import before the command line's own
handlers exist; the entry point (``_cellmigrate_console``, outside the package) covers
that window, so an interrupt always ends with one line and exit status 130.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = shutil.which("cellmigrate", path=os.path.dirname(sys.executable)) or shutil.which("cellmigrate")


def test_the_console_script_is_the_quiet_entry_point() -> None:
    assert SCRIPT is not None, "the cellmigrate console script is not installed beside this Python"
    assert "_cellmigrate_console" in Path(SCRIPT).read_text()


def _receiver(tmp_path: Path, sigint: "signal.Handlers") -> "subprocess.Popen[str]":
    # A receiver waits forever for a sender. Its SIGINT disposition is set explicitly:
    # a test run started in the background of a non-interactive shell ignores SIGINT,
    # and children inherit that.
    assert SCRIPT is not None
    return subprocess.Popen([SCRIPT, "receive", "--listen", "127.0.0.1:0", str(tmp_path / "state.bin")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, sigint))


@pytest.mark.parametrize("delay", [0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.6, 1.0])
def test_ctrl_c_while_importing_or_waiting_prints_one_line(tmp_path: Path, delay: float) -> None:
    # Every delay lands in the package import or in the wait: both end the same way.
    proc = _receiver(tmp_path, signal.SIG_DFL)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if "listening on" not in line]
    assert proc.returncode == 130, err
    assert "Traceback" not in err and len(lines) == 1 and "interrupted" in lines[0], err
    assert not (tmp_path / "state.bin").exists()


@pytest.mark.parametrize("delay", [0.08, 0.2, 0.6])
def test_an_ignored_sigint_stays_ignored(tmp_path: Path, delay: float) -> None:
    # nohup / a background job: SIGINT is ignored before, during and after the import.
    proc = _receiver(tmp_path, signal.SIG_IGN)
    try:
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and "listening on" in err, err
