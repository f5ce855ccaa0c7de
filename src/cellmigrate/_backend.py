"""Chooses the kernel implementation: the compiled extension, or the reference on request.

The reference is a test oracle, not a silent fallback. Without the extension,
``import cellmigrate`` fails with a message saying how to build it, unless the user sets
``CELLMIGRATE_PURE_PYTHON=1`` on purpose.
"""

from __future__ import annotations

import os
from types import ModuleType

__all__ = ["kernels", "PURE_PYTHON"]

PURE_PYTHON = os.environ.get("CELLMIGRATE_PURE_PYTHON", "") not in ("", "0")


def _load() -> ModuleType:
    if PURE_PYTHON:
        from . import _reference

        return _reference
    try:
        from . import _kernels
    except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
        raise ImportError(
            "cellmigrate's compiled kernels (cellmigrate._kernels) are missing: install the "
            "package with `pip install .` so they are built, or set CELLMIGRATE_PURE_PYTHON=1 "
            f"to run on the slow pure-Python reference on purpose ({exc})"
        ) from exc
    return _kernels


kernels: ModuleType = _load()
