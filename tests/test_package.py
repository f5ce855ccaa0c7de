"""The package surface: every SPEC name imports from ``cellmigrate``; the extension is required."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cellmigrate
import pytest

SPEC_NAMES = """
CellError InvalidStateError CorruptDataError MigrationFailedError ExecutionFailedError Agent Policy PAGE_SIZE
simple_checksum simple_compress simple_decompress lz4_compress lz4_decompress zstd_compress zstd_decompress
CompressionMethod adaptive_compress adaptive_compress_aggressive adaptive_decompress
DirtyPage DeltaSnapshot DirtyPageTracker MigrationStats IncrementalMigrator
AgentRequirements NodeCapabilities CompatibilityStatus VerificationResult CompatibilityValidator StateVerifier
MigrationValidator first_difference dirty_pages digest
AuditEventType AuditEntry MigrationAuditLog RollbackInfo MigrationErrorType MigrationError RecoveryStrategy
RecoveryAttempt RecoveryConfig MigrationRecoveryManager MigrationPhase MigrationProgressEvent
MigrationProgressTracker CollectingCallback MultiCallback
""".split()


def test_every_spec_name_is_exported() -> None:
    missing = [name for name in SPEC_NAMES if not hasattr(cellmigrate, name)]
    assert missing == []
    assert set(SPEC_NAMES) <= set(cellmigrate.__all__)
    assert all(hasattr(cellmigrate, name) for name in cellmigrate.__all__)


def test_kernels_are_compiled_by_default() -> None:
    if os.environ.get("CELLMIGRATE_PURE_PYTHON", "") in ("", "0"):
        assert cellmigrate.IMPLEMENTATION == "compiled"
    else:
        assert cellmigrate.IMPLEMENTATION == "reference"


_BLOCK_EXTENSION = textwrap.dedent(
    """
    import sys
    class Block:
        def find_spec(self, name, path=None, target=None):
            if name == "cellmigrate._kernels":
                raise ImportError("simulated: extension not built")
    sys.meta_path.insert(0, Block())
    """
)


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "CELLMIGRATE_PURE_PYTHON"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=120
    )


def test_missing_extension_fails_loudly() -> None:
    proc = _run(_BLOCK_EXTENSION + "import cellmigrate")
    assert proc.returncode != 0
    assert "compiled kernels" in proc.stderr
    assert "CELLMIGRATE_PURE_PYTHON=1" in proc.stderr


def test_pure_python_is_an_explicit_opt_in() -> None:
    proc = _run(
        _BLOCK_EXTENSION + "import cellmigrate; print(cellmigrate.IMPLEMENTATION, cellmigrate.simple_checksum(b'abc'))",
        CELLMIGRATE_PURE_PYTHON="1",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["reference", str(97 * 1 + 98 * 2 + 99 * 3)]


#: Optional integrations whose dependency is not in the ``test`` extra: their docstring
#: examples run in the marker run that installs it (``-m ray`` installs ``cellmigrate[ray]``).
_MARKER_RUN_PACKAGES = {"ray": pytest.mark.ray}


def _doctest_failures(names: "list[str]") -> "list[str]":
    import doctest
    import importlib

    failed = []
    for name in names:
        module = importlib.import_module(name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
        if result.failed:
            failed.append(name)
    return failed


def _modules(package: str) -> "list[str]":
    """Every module below ``package`` (subpackages too), without importing anything."""
    import importlib.util
    import pkgutil

    spec = importlib.util.find_spec(package)
    assert spec is not None and spec.submodule_search_locations is not None
    names = []
    for info in pkgutil.iter_modules(spec.submodule_search_locations):
        if info.name == "__main__":
            continue
        name = f"{package}.{info.name}"
        names.append(name)
        if info.ispkg and info.name not in _MARKER_RUN_PACKAGES:
            names += _modules(name)
    return names


def test_every_module_docstring_example_runs() -> None:
    """Docstring examples are documentation: each module's must hold for the current code
    (only some modules had a doctest run, so a changed default went stale unnoticed).
    Subpackages are walked too; the Ray integration's run under its own marker."""
    names = [
        name
        for name in _modules("cellmigrate")
        if name.split(".")[1] not in _MARKER_RUN_PACKAGES
    ]
    assert "cellmigrate.live.driver" in names and "cellmigrate.wasm" in names
    assert _doctest_failures(names) == []


@pytest.mark.ray
def test_ray_integration_docstring_examples_run() -> None:
    names = ["cellmigrate.ray"] + _modules("cellmigrate.ray")
    assert "cellmigrate.ray.actor" in names
    assert _doctest_failures(names) == []
