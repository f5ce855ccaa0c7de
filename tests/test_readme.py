"""The README's Python examples run as written."""

from __future__ import annotations

import pathlib
import re

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _python_blocks() -> list:
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_has_a_python_example() -> None:
    assert _python_blocks()


def test_readme_python_examples_run() -> None:
    for block in _python_blocks():
        namespace: dict = {}
        exec(compile(block, str(README), "exec"), namespace)
        if "target" in namespace and "source" in namespace:
            assert bytes(namespace["target"]) == bytes(namespace["source"])
            entries = list(namespace["validator"].audit_log)
            assert [e.event_type.name for e in entries] == [
                "VALIDATION_COMPLETED",
                "SNAPSHOT_CAPTURED",
                "VERIFICATION_COMPLETED",
                "MIGRATION_COMPLETED",
            ]
