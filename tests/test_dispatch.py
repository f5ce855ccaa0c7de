"""Runtime CPU dispatch: every code path this machine supports agrees with the reference."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from typing import Callable, Iterator, List, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cellmigrate import _kernels, _reference

from kernel_strategies import PATHS, RUN_LENGTHS, aligned, each_path, offsets, old_new


def _cpu_flags() -> Set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@pytest.fixture
def restore_dispatch() -> Iterator[None]:
    before = _kernels._dispatch()
    yield
    _kernels._set_dispatch(before)


def test_paths_cover_what_the_cpu_has() -> None:
    assert PATHS[0] == "scalar"
    forced = os.environ.get("CELLMIGRATE_FORCE_SCALAR", "") not in ("", "0")
    # the default is the fastest supported path, unless the environment forces scalar
    assert _kernels._dispatch() == ("scalar" if forced else PATHS[-1])
    flags = _cpu_flags()
    if platform.machine() in ("x86_64", "AMD64"):
        assert "sse2" in PATHS
        if "avx2" in flags:
            assert "avx2" in PATHS
        if {"avx512f", "avx512bw"} <= flags:
            assert "avx512" in PATHS
        if {"avx512f", "avx512bw", "avx512_vnni"} <= flags:
            assert "avx512vnni" in PATHS
    else:
        assert PATHS == ["scalar"]


def test_set_dispatch_refuses_unknown_paths(restore_dispatch: None) -> None:
    with pytest.raises(ValueError, match="unknown dispatch path"):
        _kernels._set_dispatch("avx9000")
    for name in PATHS:
        _kernels._set_dispatch(name)
        assert _kernels._dispatch() == name


def _dispatch_in_child(env_value: str) -> str:
    env = dict(os.environ, CELLMIGRATE_FORCE_SCALAR=env_value)
    out = subprocess.run(
        [sys.executable, "-c", "from cellmigrate import _kernels; print(_kernels._dispatch())"],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return out.stdout.strip()


def test_env_forces_the_portable_path() -> None:
    assert _dispatch_in_child("1") == "scalar"
    assert _dispatch_in_child("0") == PATHS[-1]


# Deterministic edge cases: every length 0..300 in patterns that stress block and run edges.
EDGE_PATTERNS: List[Callable[[int], bytes]] = [
    lambda n: bytes(n),
    lambda n: b"\xff" * n,
    lambda n: bytes(i % 251 for i in range(n)),
    lambda n: bytes((i // 4) % 3 for i in range(n)),
    lambda n: bytes((0xFF if i % 5 == 0 else i & 0x7F) for i in range(n)),
    lambda n: bytes((i // 127) & 1 for i in range(n)),
]


@pytest.mark.parametrize("pattern", range(len(EDGE_PATTERNS)))
def test_every_path_on_edge_lengths(pattern: int) -> None:
    cases = [EDGE_PATTERNS[pattern](n) for n in range(0, 300)]
    cases += [EDGE_PATTERNS[pattern](n) for n in RUN_LENGTHS + (4095, 4096, 4097, 8193)]
    expected = [(_reference.checksum(c, 7), _reference.rle_compress(c)) for c in cases]
    for name in each_path():
        for data, (checksum, packed) in zip(cases, expected):
            assert _kernels.checksum(data, 7) == checksum, (name, len(data))
            assert _kernels.rle_compress(data) == packed, (name, len(data))


@settings(max_examples=1000, deadline=None)
@given(aligned(), offsets)
def test_every_path_checksum(view_raw: Tuple[memoryview, bytes], offset: int) -> None:
    view, raw = view_raw
    expected = _reference.checksum(raw, offset)
    for name in each_path():
        assert _kernels.checksum(view, offset) == expected, name


@settings(max_examples=800, deadline=None)
@given(aligned())
def test_every_path_rle(view_raw: Tuple[memoryview, bytes]) -> None:
    view, raw = view_raw
    expected = _reference.rle_compress(raw)
    for name in each_path():
        packed = _kernels.rle_compress(view)
        assert packed == expected, name
        assert _kernels.rle_decompress(packed) == raw, name


@settings(max_examples=800, deadline=None)
@given(old_new(), offsets)
def test_every_path_dirty_pages_checksum(case: Tuple[bytes, bytes, int], offset: int) -> None:
    old, new, page_size = case
    pages = _reference.dirty_pages(old, new, page_size).tolist()
    checksum = _reference.checksum(new, offset)
    for name in each_path():
        got_pages, got_checksum = _kernels.dirty_pages_checksum(old, new, page_size, offset)
        assert (got_pages.tolist(), got_checksum) == (pages, checksum), name
        assert _kernels.dirty_pages(old, new, page_size).tolist() == pages, name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.binary(min_size=0, max_size=4096)), max_size=6), st.data())
def test_every_path_page_checksums(pages: List[Tuple[int, bytes]], data: st.DataObject) -> None:
    state = data.draw(st.binary(min_size=1, max_size=6 * 4096))
    npages = -(-len(state) // 4096)
    idx = sorted({i % npages for i, _ in pages})
    expected_state = _reference.state_pages_checksum(state, idx, 4096)
    blobs = [b for _, b in pages]
    expected_pages = _reference.pages_checksum(blobs, [i for i, _ in pages], 4096)
    for name in each_path():
        assert _kernels.state_pages_checksum(state, idx, 4096) == expected_state, name
        assert _kernels.pages_checksum(blobs, [i for i, _ in pages], 4096) == expected_pages, name


PORTABLE_PROBE = r"""
#include "cm_simd.h"
#include <stdio.h>
int main(void) {
    static uint8_t a[20000], b[20000], out[60000];
    int64_t idx[8];
    uint32_t checksum;
    for (int i = 0; i < 20000; i++) a[i] = b[i] = (uint8_t)((i * 7) ^ (i >> 5));
    b[9000] ^= 1;
    cm_dispatch_init();
    size_t dirty = cm_dirty_pages_checksum(a, b, 20000, 4096, 5, idx, &checksum);
    size_t packed = cm_rle_compress(a, 20000, out);
    printf("%s %d %zu %lld %u %u %zu\n", cm_active_name(), cm_npaths(), dirty, (long long)idx[0],
           checksum, cm_checksum(a, 20000, 0), packed);
    return 0;
}
"""


def test_portable_paths_compile_alone(tmp_path: "os.PathLike[str]") -> None:
    """The header with only its portable code (what aarch64 and others compile) builds
    warning-free as C99 and computes the reference results."""
    import shutil
    from pathlib import Path

    header_dir = Path(__file__).resolve().parent.parent / "cython"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None or not (header_dir / "cm_simd.h").exists():
        pytest.skip("needs a C compiler and the source tree's cython/cm_simd.h")
    src = Path(tmp_path) / "probe.c"
    src.write_text(PORTABLE_PROBE)
    exe = Path(tmp_path) / "probe"
    subprocess.run(
        [compiler, "-std=c99", "-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-function",
         "-DCELLMIGRATE_PORTABLE_ONLY", f"-I{header_dir}", str(src), "-o", str(exe)],
        check=True, capture_output=True, timeout=120,
    )
    fields = subprocess.run([str(exe)], check=True, capture_output=True, text=True, timeout=60).stdout.split()
    a = bytes(((i * 7) ^ (i >> 5)) & 0xFF for i in range(20000))
    b = bytearray(a)
    b[9000] ^= 1
    assert fields[:4] == ["scalar", "1", "1", "2"]
    assert int(fields[4]) == _reference.checksum(bytes(b), 5)
    assert int(fields[5]) == _reference.checksum(a)
    assert int(fields[6]) == len(_reference.rle_compress(a))
