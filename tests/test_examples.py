"""Every ``examples/*.py`` runs as it is, with no arguments, and exits 0.

Each example starts whatever helper process it needs itself, binds 127.0.0.1 only and
bounds its waits; the timeout here only keeps a broken example from hanging the suite.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(EXAMPLES.glob("*.py"))


def test_examples_are_there() -> None:
    # A missing directory would make the parametrized test below vanish, not fail.
    assert [p.name for p in SCRIPTS if p.name == "wasm_live_migration.py"] == ["wasm_live_migration.py"]


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_example_runs_with_no_arguments(script: Path, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    if script.name == "wasm_live_migration.py":
        _check_wasm_proof(proc.stdout)


def _check_wasm_proof(out: str) -> None:
    """The wasm example printed the rounds, the proof and both nodes' audit trails."""
    assert "both nodes hold a fresh 32-byte shared key" in out
    assert "final round (agent paused)" in out
    assert "PROOF: the migrated agent's final memory and globals are byte-for-byte identical" in out
    a, b = out.index("audit trail, node A:"), out.index("audit trail, node B:")
    node_a, node_b = out[a:b], out[b:]
    assert "MIGRATION_STARTED" in node_a and "Target proved the digest" in node_a
    assert "Compatibility check passed" in node_b and "Digest verified" in node_b
    for trail in (node_a, node_b):
        assert "MIGRATION_COMPLETED    ok" in trail and "FAIL" not in trail


def test_wasm_example_refuses_arguments() -> None:
    proc = subprocess.run([sys.executable, str(EXAMPLES / "wasm_live_migration.py"), "--bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
