"""One pass over a state: the weighted checksum next to hashes and checksums of peers."""

from __future__ import annotations

import zlib
from typing import Any, Callable, Dict

import blake3
import numpy as np
import pytest
import xxhash

from cellmigrate import _kernels, _reference, simple_checksum

from conftest import States


def _numpy_weighted_sum(arr: "np.ndarray[Any, Any]") -> int:
    # The obvious numpy formulation (chunked so temporaries stay small): the reference.
    return _reference.checksum(arr)


def _on_path(path: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    def run() -> Any:
        _kernels._set_dispatch(path)
        try:
            return fn()
        finally:
            _kernels._set_dispatch(_kernels._dispatch_paths()[-1])

    return run


PEERS: Dict[str, Callable[[States], Callable[[], Any]]] = {
    "simple_checksum": lambda s: lambda: simple_checksum(s.old),
    "simple_checksum threads=1": lambda s: lambda: simple_checksum(s.old, threads=1),
    "xxhash xxh3_64": lambda s: lambda: xxhash.xxh3_64_intdigest(s.old),
    "xxhash xxh3_128": lambda s: lambda: xxhash.xxh3_128_intdigest(s.old),
    "blake3 (1 thread)": lambda s: lambda: blake3.blake3(s.old).digest(),
    "blake3 (all threads)": lambda s: lambda: blake3.blake3(s.old, max_threads=blake3.blake3.AUTO).digest(),
    "zlib crc32": lambda s: lambda: zlib.crc32(s.old),
    "zlib adler32": lambda s: lambda: zlib.adler32(s.old),
    "numpy weighted sum (reference)": lambda s: lambda: _numpy_weighted_sum(s.np("old")),
    "straightforward loop (_naive_checksum)": lambda s: lambda: _kernels._naive_checksum(s.old),
}
for _path in _kernels._dispatch_paths():
    PEERS[f"checksum path={_path}"] = lambda s, p=_path: _on_path(p, lambda: _kernels.checksum(s.old))


@pytest.mark.parametrize("peer", list(PEERS))
def test_checksum(states: States, measure: Any, peer: str) -> None:
    if peer.startswith("numpy") and states.size > 64 << 20:
        pytest.skip("the numpy reference takes minutes at 1 GiB; its ratio is clear at 64 MiB")
    measure("checksum", peer, PEERS[peer](states), states.size, ours=peer == "simple_checksum")


def test_checksum_call_overhead_4k(measure: Any) -> None:
    """Per-call cost at 4 KiB (the goal is <= 1 us): shown as GB/s and in the stats."""
    data = bytes(range(256)) * 16
    measure("checksum 4KiB call", "simple_checksum", lambda: simple_checksum(data), len(data), ours=True)
