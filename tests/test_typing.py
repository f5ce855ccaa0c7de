"""The typed API: ``mypy --strict`` on user code calling cellmigrate, and on the package.

mypy runs in a subprocess, the way a user's CI runs it. The user snippet is checked from
a scratch directory, so ``cellmigrate`` is resolved the way a user's checker resolves it
(the installed package with its ``py.typed`` and ``.pyi`` files), not through this
repository's configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import List

import pytest

import cellmigrate

ROOT = Path(__file__).resolve().parents[1]
SNIPPET = Path(__file__).resolve().parent / "typing_snippet.py"


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One cache for the module's runs (numpy's stubs are the slow part), private to this
    # test session so parallel runs by other people never share a half-written cache.
    return tmp_path_factory.mktemp("mypy-cache")


def mypy(args: List[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("MYPYPATH", "MYPY_CONFIG_FILE_DIR")}
    return subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", str(cache), *args], cwd=cwd,
                          capture_output=True, text=True, env=env, timeout=600)


def test_package_ships_type_information() -> None:
    package = Path(cellmigrate.__file__).parent
    assert (package / "py.typed").is_file()


def test_user_snippet_passes_mypy_strict(tmp_path: Path, mypy_cache: Path) -> None:
    proc = mypy(["--strict", str(SNIPPET)], cwd=tmp_path, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


#: Extra target versions: up to 3.11 mypy checks the ``typing_extensions.Buffer`` arm of
#: ``BufferLike``, from 3.12 the ``collections.abc.Buffer`` one (where numpy's stubs make
#: ``ndarray`` a Buffer). 3.9 shares 3.10's arm, and current mypy no longer targets it.
TARGET_PYTHONS = ("3.10", "3.12")


@pytest.mark.parametrize("version", TARGET_PYTHONS)
def test_user_snippet_passes_mypy_strict_on(version: str, tmp_path: Path, mypy_cache: Path) -> None:
    proc = mypy(["--strict", "--python-version", version, str(SNIPPET)], cwd=tmp_path, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout


def test_user_snippet_runs(tmp_path: Path) -> None:
    """The snippet is real code: it runs and its assertions hold."""
    proc = subprocess.run([sys.executable, str(SNIPPET)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("typing snippet ran against cellmigrate")


def test_mypy_catches_misuse(tmp_path: Path, mypy_cache: Path) -> None:
    """The hints are precise enough to reject wrong calls, not just ``Any`` everywhere."""
    bad = tmp_path / "bad.py"
    bad.write_text(textwrap.dedent("""\
        import uuid
        from cellmigrate import Agent, DeltaSnapshot, RecoveryConfig, MigrationValidator, simple_checksum

        agent = Agent(b"", agent_id="not a uuid")
        delay: str = RecoveryConfig().calculate_retry_delay(2)
        count: str = DeltaSnapshot.create(bytes(16), b"", b"", 0, 1).dirty_page_count()
        MigrationValidator().set_rollback_max_age("soon")
        uid: bytes = agent.id
        simple_checksum("abc")
        DeltaSnapshot.create(bytes(16), 1, b"", 0, 1)
        """))
    proc = mypy(["--strict", str(bad)], cwd=tmp_path, cache=mypy_cache)
    assert proc.returncode == 1, proc.stdout
    errors = {int(line.split(":")[1]): line for line in proc.stdout.splitlines() if ": error:" in line}
    assert set(errors) == {4, 5, 6, 7, 8, 9, 10}, proc.stdout
    # A str or an int is not a state buffer (BufferLike), and the error names the call.
    assert 'Argument 1 to "simple_checksum" has incompatible type "str"' in errors[9], proc.stdout
    assert 'Argument 2 to "create" of "DeltaSnapshot" has incompatible type "int"' in errors[10], proc.stdout
    assert all("Buffer" in errors[n] for n in (9, 10)), proc.stdout


#: Configuration for checking the package's own files from outside the source tree (as the
#: wheel tests do): strict, and lz4 (which ships no type information) treated as untyped.
STRICT_CONFIG = """\
[mypy]
strict = True

[mypy-lz4,lz4.*]
ignore_missing_imports = True
"""


def test_cli_modules_pass_mypy_strict(tmp_path: Path, mypy_cache: Path) -> None:
    """The CLI layer (cli, demo, quickbench, statefile) of the imported package is --strict clean."""
    package = Path(cellmigrate.__file__).resolve().parent
    names = ("cli.py", "__main__.py", "demo.py", "quickbench.py", "statefile.py")
    config = tmp_path / "mypy.ini"
    config.write_text(STRICT_CONFIG)
    proc = mypy(["--config-file", str(config), *(str(package / n) for n in names)], cwd=tmp_path, cache=mypy_cache)
    errors = [line for line in proc.stdout.splitlines()
              if ": error:" in line and any(f"{os.sep}{n}:" in line or line.startswith(f"{n}:") for n in names)]
    assert errors == [], proc.stdout
    assert "error:" not in proc.stderr


def test_src_passes_mypy_strict(mypy_cache: Path) -> None:
    """The whole package under the project's [tool.mypy] configuration (strict)."""
    proc = mypy([], cwd=ROOT, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("version", TARGET_PYTHONS)
def test_src_passes_mypy_strict_on(version: str, mypy_cache: Path) -> None:
    """Both arms of BufferLike: the package's type: ignore comments hold on every target."""
    proc = mypy(["--python-version", version], cwd=ROOT, cache=mypy_cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
