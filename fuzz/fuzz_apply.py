"""atheris harness: ``DeltaSnapshot.apply`` on tampered deltas (atomicity and verification).

Input drives edits of a valid delta of one of a few prepared (base, new) pairs, made
directly on the ``DeltaSnapshot`` object (no wire format in the way): page indices
(including huge ones), page bytes, compressed flags, dropped/duplicated/extra pages,
``total_size``, ``checksum``, digest bytes, algorithm and ``keyed``; the base's size and
buffer type (bytearray, memoryview of a bytearray, numpy array); the key given.

Contract: the constructor may refuse (``ValueError``/``TypeError``); ``apply`` either
raises ``InvalidStateError`` with the base byte-for-byte unchanged, or leaves exactly the
base with the delta's pages written over it, with the delta's checksum and digest (see
``common.check_apply``). Untouched deltas with a strong digest must apply to the new state.

Run: see fuzz/README.md.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from common import (  # noqa: E402
    KEY,
    PAGE_SIZE,
    DeltaSnapshot,
    DirtyPage,
    InvalidStateError,
    atheris,
    digest,
    main_with_seeds,
    simple_checksum,
)


def _pair(label: str, size: int) -> Tuple[bytes, bytes]:
    base = hashlib.shake_256(label.encode()).digest(size)
    new = bytearray(base)
    for k in range(0, size, 3 * PAGE_SIZE):
        new[k : k + 50] = bytes(len(new[k : k + 50]))  # never extends the state
    if size:
        new[-1] ^= 0xFF
    return base, bytes(new)


CASES: List[Tuple[bytes, bytes, Optional[str], Optional[bytes]]] = []
for _label, _size, _alg, _key in [
    ("empty", 0, "xxh3_128", None),
    ("tiny", 100, None, None),
    ("page", PAGE_SIZE, "xxh3_128", None),
    ("tail", 3 * PAGE_SIZE + 5, "blake3", None),
    ("keyed", 5 * PAGE_SIZE, "blake3", KEY),
    ("plain", 4 * PAGE_SIZE + 77, None, None),
    ("tree", 2 * PAGE_SIZE + 9, "xxh3_128_tree", None),
    ("tree_leaves", (1 << 20) + PAGE_SIZE + 3, "xxh3_128_tree", None),  # two leaves
]:
    _base, _new = _pair(_label, _size)
    CASES.append((_base, _new, _alg, _key))

BIG_INDICES = [2**31, 2**32, 2**51, 2**52, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**100]


def _edit_pages(fdp: Any, pages: List[DirtyPage], total: int) -> List[Any]:
    out: List[Any] = [DirtyPage(p.index, p.data, p.compressed) for p in pages]
    stranger = False
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        op = fdp.ConsumeIntInRange(0, 7)
        if op == 0 and out:  # retarget a page, possibly far out of range
            k = fdp.ConsumeIntInRange(0, len(out) - 1)
            if fdp.ConsumeBool():
                out[k].index = BIG_INDICES[fdp.ConsumeIntInRange(0, len(BIG_INDICES) - 1)]
            else:
                out[k].index = fdp.ConsumeIntInRange(0, total // PAGE_SIZE + 2)
        elif op == 1 and out:  # overwrite some bytes of a page's stored data
            k = fdp.ConsumeIntInRange(0, len(out) - 1)
            data = bytearray(out[k].data)
            if data:
                pos = fdp.ConsumeIntInRange(0, len(data) - 1)
                data[pos] = fdp.ConsumeIntInRange(0, 255)
            out[k].data = bytes(data)
        elif op == 2 and out:  # replace a page's data with fuzz bytes
            k = fdp.ConsumeIntInRange(0, len(out) - 1)
            out[k].data = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 2 * PAGE_SIZE))
        elif op == 3 and out:  # toggle the compressed flag
            k = fdp.ConsumeIntInRange(0, len(out) - 1)
            out[k].compressed = not out[k].compressed
        elif op == 4 and out:  # drop a page
            out.pop(fdp.ConsumeIntInRange(0, len(out) - 1))
        elif op == 5 and out:  # duplicate a page
            k = fdp.ConsumeIntInRange(0, len(out) - 1)
            out.insert(fdp.ConsumeIntInRange(0, len(out)), DirtyPage(out[k].index, out[k].data, out[k].compressed))
        elif op == 6:  # an extra page from fuzz bytes
            index = fdp.ConsumeIntInRange(0, total // PAGE_SIZE + 1)
            out.append(DirtyPage(index, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, PAGE_SIZE + 1)), fdp.ConsumeBool()))
        elif op == 7:  # not a DirtyPage at all (added last, so the edits above see pages only)
            stranger = True
    if stranger:
        out.insert(fdp.ConsumeIntInRange(0, len(out)), fdp.ConsumeBytes(4))
    return out


def _base_buffer(fdp: Any, base: bytes, total: int) -> Tuple[Any, bytes]:
    """A writable base of a fuzz-chosen size and type, and its bytes."""
    size_choice = fdp.ConsumeIntInRange(0, 3)
    if size_choice == 0 or total == 0:
        raw = base
    elif size_choice == 1:
        raw = base[: fdp.ConsumeIntInRange(0, len(base))]  # short: growable only as bytearray
    elif size_choice == 2:
        raw = base + bytes(fdp.ConsumeIntInRange(1, 64))  # longer than the delta's state
    else:
        raw = bytes(len(base))
    kind = fdp.ConsumeIntInRange(0, 2)
    if kind == 0:
        return bytearray(raw), raw
    if kind == 1:
        return memoryview(bytearray(raw)), raw
    return np.frombuffer(bytearray(raw), dtype=np.uint8), raw


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    base, new, algorithm, key = CASES[fdp.ConsumeIntInRange(0, len(CASES) - 1)]
    good = DeltaSnapshot.create(b"\x07" * 16, base, new, 1, 2, digest=algorithm, key=key)
    fields: Dict[str, Any] = dict(
        agent_id=good.agent_id,
        sequence=good.sequence,
        base_sequence=good.base_sequence,
        dirty_pages=_edit_pages(fdp, good.dirty_pages, good.total_size),
        total_size=good.total_size,
        timestamp=good.timestamp,
        checksum=good.checksum,
        digest_algorithm=good.digest_algorithm,
        digest=good.digest,
        keyed=good.keyed,
    )
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        op = fdp.ConsumeIntInRange(0, 4)
        if op == 0:
            fields["total_size"] = fdp.ConsumeIntInRange(0, good.total_size + 2 * PAGE_SIZE)
        elif op == 1:
            fields["checksum"] = fdp.ConsumeIntInRange(0, 2**32 - 1)
        elif op == 2 and good.digest is not None:
            fields["digest"] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))
        elif op == 3:
            fields["digest_algorithm"] = [None, "xxh3_128", "blake3", "xxh3_128_tree"][fdp.ConsumeIntInRange(0, 3)]
            if fields["digest_algorithm"] is None:
                fields["digest"] = None
            elif fields["digest"] is None:
                fields["digest"] = fdp.ConsumeBytes(32)
        else:
            fields["keyed"] = fdp.ConsumeBool()
    try:
        delta = DeltaSnapshot(**fields)
    except (ValueError, TypeError):
        return
    target, raw = _base_buffer(fdp, base, delta.total_size)
    give = [None, key or KEY, bytes(32)][fdp.ConsumeIntInRange(0, 2)]
    try:
        delta.apply(target, key=give)
    except InvalidStateError:
        assert bytes(memoryview(target).cast("B")) == raw, "InvalidStateError but the base was modified"
        return
    result = bytes(memoryview(target).cast("B"))
    assert len(result) == delta.total_size, "apply left the wrong size"
    expected = bytearray(raw) + bytes(max(0, delta.total_size - len(raw)))
    for page in delta.dirty_pages:
        page_bytes = page.get_data()
        expected[page.index * PAGE_SIZE : page.index * PAGE_SIZE + len(page_bytes)] = page_bytes
    assert result == expected, "apply wrote something other than the delta's pages"
    assert simple_checksum(result) == delta.checksum, "apply accepted a checksum mismatch"
    if delta.digest_algorithm is not None:
        assert digest(result, delta.digest_algorithm, key=give if delta.keyed else None) == delta.digest
    if delta == good and algorithm is not None and raw == base:
        assert result == new, "an untouched delta with a strong digest gave the wrong state"


def seeds() -> List[Tuple[str, bytes]]:
    return [(f"case{k}", bytes([k]) * 64) for k in range(len(CASES))]


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
