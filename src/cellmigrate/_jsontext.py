"""Standard JSON text for every ``--json`` output (the CLI, ``send``/``receive``, ``bench``),
and one strict reader for JSON that comes from outside (a peer's OFFER, an audit export).

Python's ``json`` writes ``Infinity``/``NaN`` for non-finite floats by default, which is
not JSON (RFC 8259): strict parsers (``jq``, JavaScript's ``JSON.parse``, Go) reject the
whole document. A value with no finite meaning (an expected downtime never estimated, a
rate over zero seconds) is printed as ``null`` instead.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

__all__ = ["finite", "json_text", "parse_json"]


def finite(obj: Any) -> Any:
    """``obj`` with every non-finite float (inf, -inf, nan), at any depth of dicts, lists
    and tuples, replaced by ``None``; other values are returned as they are."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj: Any, *, indent: Optional[int] = 2) -> str:
    """``obj`` as standard JSON text (non-finite floats as ``null``; ``allow_nan=False``
    guarantees none slips through: ``ValueError`` rather than invalid output)."""
    return json.dumps(finite(obj), indent=indent, allow_nan=False)


def parse_json(text: "bytes | str") -> Any:
    """The value of one JSON document (``bytes`` are UTF-8), or ``ValueError`` for
    anything that is not one.

    Why not plain ``json.loads``: input from outside can nest arrays thousands deep in a
    few KiB, and the decoder then raises ``RecursionError``, which callers catching
    ``ValueError`` let through (a receiver's peer could end the receiver with it); bytes
    that are not UTF-8 raise ``UnicodeDecodeError`` (a ``ValueError`` already)."""
    try:
        return json.loads(text.decode("utf-8") if isinstance(text, (bytes, bytearray)) else text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
