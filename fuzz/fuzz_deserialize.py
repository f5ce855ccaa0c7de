"""atheris harness: ``DeltaSnapshot.deserialize`` on hostile bytes (then ``apply``).

Input: one mode byte, then the candidate delta. Mode bit 1 set: keyed version-1 deltas
are accepted (``allow_legacy_keyed``). Mode bit 0 set: the harness first
recomputes every page check and the whole-payload check (``reseal``), as an attacker
could, so mutations reach the validations behind those checks and ``apply``'s digest.

Contract checked on every input:
* ``deserialize`` raises ``CorruptDataError`` or returns a delta (no other exception);
* a delta that decodes re-serializes to exactly the same bytes (the format is canonical);
* applying it to a zero state of its size (and to a short, growable one) obeys the
  atomic-apply contract of ``common.check_apply`` with the right, no, and a wrong key.

Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    KEY,
    MAX_APPLY_SIZE,
    CorruptDataError,
    DeltaSnapshot,
    check_apply,
    delta_seeds,
    main_with_seeds,
    reseal,
)

WRONG_KEY = bytes(32)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    mode, blob = data[0], data[1:]
    if mode & 1:
        blob = reseal(blob)
    try:
        delta = DeltaSnapshot.deserialize(blob, allow_legacy_keyed=bool(mode & 2))
    except CorruptDataError:
        return
    assert delta.serialize() == blob, "decoded delta does not re-encode to its input"
    if delta.total_size > MAX_APPLY_SIZE:
        return
    for key in (None, KEY, WRONG_KEY):
        check_apply(delta, bytes(delta.total_size), key)
    check_apply(delta, bytes(delta.total_size // 2), KEY if delta.keyed else None)


def seeds() -> List[Tuple[str, bytes]]:
    out = []
    for name, blob in delta_seeds():
        out.append((f"{name}-raw", b"\x02" + blob))
        out.append((f"{name}-resealed", b"\x03" + blob))
    return out


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
