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


def _keep_arenas() -> None:
    """``CELLMIGRATE_ARENA_POOL_MIB``: how much freed page-copy memory the compiled kernels
    keep for the next deltas (default 256 MiB; 0 keeps none). Fresh memory costs a VM a
    host fault a page; kept memory does not (``_kernels.arena_pool``)."""
    env = os.environ.get("CELLMIGRATE_ARENA_POOL_MIB", "").strip()
    if not env or PURE_PYTHON:
        return
    try:
        mib = int(env)
    except ValueError:
        mib = -1
    if mib < 0:
        raise ValueError(f"CELLMIGRATE_ARENA_POOL_MIB must be an integer >= 0, got {env!r}")
    kernels.arena_pool(mib << 20)


_keep_arenas()
