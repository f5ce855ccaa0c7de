"""atheris harness: the live-migration receiver's frame decoder on hostile byte streams.

Input: the bytes a sender would write on the connection. They are fed through
``LiveReceiver.handle`` (frame reader, handshake, OFFER/CHUNK/ROUND_END/COMMIT decoders,
the session's checks and staging) over an in-memory stream.

Contract checked on every input:
* ``handle`` returns (never raises); a connection that did not complete leaves a
  ``CellError`` subclass (or nothing) as ``last_error`` and the target agent untouched;
* a completed one (possible unkeyed: the digest is not a MAC) adopted exactly the staged
  state, whose page root is the receiver's page table's (what the COMMIT was checked
  against).

Seeds: recorded real migrations (``replay.record_sender_stream``) of a few small states,
and the golden protocol-version-3 stream with RAW, LZ4 and PAGES (XZR) chunks
(``tests/fixtures/live_v3_pages.cmlive``).

Run: see fuzz/README.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import atheris, main_with_seeds  # noqa: E402

with atheris.instrument_imports(include=["cellmigrate"]):
    from cellmigrate import CellError
    from cellmigrate.live import BufferTarget, MemoryStore
    from cellmigrate.live.leaves import page_digests, page_root
    from cellmigrate.live.receiver import LiveReceiver
    from cellmigrate.live.replay import BytesStream, record_sender_stream


def TestOneInput(data: bytes) -> None:
    target = BufferTarget()
    receiver = LiveReceiver(MemoryStore(), target, timeout=1, max_state_size=1 << 22)
    done = receiver.handle(BytesStream(data))
    if done:
        assert target.state is not None and target.resumed
        with receiver.session.store.view() as view:
            assert bytes(view) == bytes(target.state)
        state = bytes(target.state)
        assert page_root(page_digests(state), len(state)) == receiver.session._pages.root()
    else:
        assert receiver.last_error is None or isinstance(receiver.last_error, CellError), repr(receiver.last_error)
        assert target.state is None and not target.resumed


def seeds() -> List[Tuple[str, bytes]]:
    out = []
    for size in (0, 100, 4096 * 3 + 7, 20000):
        state = bytes((i * 7 + 3) % 251 for i in range(size))
        out.append((f"migration-{size}", record_sender_stream(state)))
    golden = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "live_v3_pages.cmlive"
    out.append(("golden-v3-pages", golden.read_bytes()))
    return out


if __name__ == "__main__":
    main_with_seeds(TestOneInput, seeds())
