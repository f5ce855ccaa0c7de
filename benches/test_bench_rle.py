"""RLE on random and on zero pages, next to the straightforward loop, LZ4 and zstd."""

from __future__ import annotations

from typing import Any, Callable, Dict

import lz4.block
import pytest
import zstandard

from cellmigrate import _kernels, simple_compress, simple_decompress

from conftest import States

_zstd = zstandard.ZstdCompressor(level=3)

PEERS: Dict[str, Callable[[Any], Callable[[], Any]]] = {
    "simple_compress": lambda d: lambda: simple_compress(d),
    "straightforward loop (_naive_rle_compress)": lambda d: lambda: _kernels._naive_rle_compress(d),
    "lz4.block.compress": lambda d: lambda: lz4.block.compress(d, store_size=True),
    "zstd level 3": lambda d: lambda: _zstd.compress(d),
}


@pytest.mark.parametrize("content", ["random", "zeros"])
@pytest.mark.parametrize("peer", list(PEERS))
def test_compress(states: States, measure: Any, peer: str, content: str) -> None:
    if peer.startswith("zstd") and content == "random" and states.size > 64 << 20:
        pytest.skip("zstd on 1 GiB of random bytes adds minutes and no information")
    data = states.old if content == "random" else states.zeros
    measure(f"compress {content}", peer, PEERS[peer](data), states.size, ours=peer == "simple_compress")


@pytest.mark.parametrize("content", ["random", "zeros"])
def test_decompress(states: States, measure: Any, content: str) -> None:
    data = states.old if content == "random" else states.zeros
    packed = simple_compress(data)
    assert len(simple_decompress(packed)) == states.size
    measure(f"decompress {content}", "simple_decompress", lambda: simple_decompress(packed), states.size, ours=True)
