"""Comparing two states: dirty pages (1% dirty), first difference, and their peers."""

from __future__ import annotations

from typing import Any, Callable, Dict

import numpy as np
import pytest

from cellmigrate import MigrationValidator, StateVerifier, _kernels, dirty_pages, first_difference, simple_checksum
from cellmigrate.compare import dirty_pages_checksum

from conftest import States

CHUNK = 16 << 20
AGENT = bytes(16)
VALIDATOR = MigrationValidator()


def _numpy_page_scan(a: "np.ndarray[Any, Any]", b: "np.ndarray[Any, Any]") -> "np.ndarray[Any, Any]":
    # Rows of 4 KiB, compared and reduced per row; chunked so the bool temporary stays small.
    found = []
    for start in range(0, a.size, CHUNK):
        x = a[start : start + CHUNK]
        y = b[start : start + CHUNK]
        full = x.size // 4096 * 4096
        rows = (x[:full].reshape(-1, 4096) != y[:full].reshape(-1, 4096)).any(axis=1)
        found.append(np.flatnonzero(rows) + start // 4096)
    return np.concatenate(found)


PEERS: Dict[str, Callable[[States], Callable[[], Any]]] = {
    "dirty_pages": lambda s: lambda: dirty_pages(s.old, s.new),
    "dirty_pages threads=1": lambda s: lambda: dirty_pages(s.old, s.new, threads=1),
    "dirty_pages_checksum (fused)": lambda s: lambda: dirty_pages_checksum(s.old, s.new),
    "first_difference (equal states)": lambda s: lambda: first_difference(s.old, s.same),
    "memcmp: bytes == (equal states)": lambda s: lambda: s.old == s.same,
    "numpy array_equal (equal states)": lambda s: lambda: np.array_equal(s.np("old"), s.np("same")),
    "numpy page scan": lambda s: lambda: _numpy_page_scan(s.np("old"), s.np("new")),
    "straightforward loop (_naive_dirty_pages)": lambda s: lambda: _kernels._naive_dirty_pages(s.old, s.new, 4096),
}


@pytest.mark.parametrize("peer", list(PEERS))
def test_compare(states: States, measure: Any, peer: str) -> None:
    fn = PEERS[peer](states)
    if peer.startswith("dirty_pages"):
        result = fn()
        pages = result[0] if isinstance(result, tuple) else result
        assert pages.tolist() == states.dirty.tolist()
    measure("compare (1% dirty)", peer, fn, states.size, ours=peer == "dirty_pages")


VERIFIERS: Dict[str, Callable[[States], Callable[[], Any]]] = {
    "StateVerifier.verify_state": lambda s: lambda: StateVerifier.verify_state(s.old, s.same, s.checksum_old),
    "MigrationValidator.verify_post_migration (+ audit entry)": lambda s: lambda: VALIDATOR.verify_post_migration(
        AGENT, AGENT, s.old, s.same
    ),
    "simple_checksum + memcmp (the same checks, composed)": lambda s: lambda: (
        simple_checksum(s.same) == s.checksum_old and s.old == s.same
    ),
}


@pytest.mark.parametrize("peer", list(VERIFIERS))
def test_verify(states: States, measure: Any, peer: str) -> None:
    """Post-migration proof on equal states (the whole of both is read)."""
    fn = VERIFIERS[peer](states)
    result = fn()
    assert result is True or result.passed
    measure("verify (equal states)", peer, fn, states.size, ours=peer == "StateVerifier.verify_state")
