"""The package surface: every SPEC name imports from ``cellmigrate``; the extension is required."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import cellmigrate

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


def test_every_module_docstring_example_runs() -> None:
    """Docstring examples are documentation: each module's must hold for the current code
    (only some modules had a doctest run, so a changed default went stale unnoticed)."""
    import doctest
    import importlib
    import pkgutil

    failed = []
    for info in pkgutil.iter_modules(cellmigrate.__path__):
        if info.name == "__main__":
            continue
        module = importlib.import_module(f"cellmigrate.{info.name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
        if result.failed:
            failed.append(info.name)
    assert failed == []
