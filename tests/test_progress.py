"""Progress: phases, event variants, tracker (percent edge cases, phases), callbacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from typing import List

import pytest

from cellmigrate import (
    CollectingCallback,
    MigrationPhase,
    MigrationProgressEvent,
    MigrationProgressTracker,
    MultiCallback,
    ProgressEventKind,
    byte_progress,
)

AID = bytes(range(16))
E = MigrationProgressEvent


def _all_events() -> List[MigrationProgressEvent]:
    return [
        E.Started(AID, 100),
        E.CapturingState(AID, 10),
        E.TransferProgress(AID, 50, 100, 50),
        E.Validating(AID, "checksum"),
        E.Restoring(AID, 70),
        E.Completed(AID, 1234, 100),
        E.Failed(AID, "boom"),
    ]


def test_phase_order() -> None:
    assert [p.name for p in MigrationPhase] == [
        "CAPTURING",
        "TRANSFERRING",
        "VALIDATING",
        "RESTORING",
        "COMPLETED",
        "FAILED",
    ]


def test_event_kinds_in_order() -> None:
    assert [e.kind for e in _all_events()] == list(ProgressEventKind)
    assert [k.name for k in ProgressEventKind] == [
        "STARTED",
        "CAPTURING_STATE",
        "TRANSFER_PROGRESS",
        "VALIDATING",
        "RESTORING",
        "COMPLETED",
        "FAILED",
    ]


def test_progress_percent_only_for_percent_kinds() -> None:
    assert [e.progress_percent() for e in _all_events()] == [None, 10, 50, None, 70, None, None]


def test_is_terminal_only_completed_and_failed() -> None:
    assert [e.is_terminal() for e in _all_events()] == [False, False, False, False, False, True, True]


def test_every_event_has_agent_id() -> None:
    assert all(e.agent_id == AID for e in _all_events())


def test_spec_names_are_kinds_and_rust_names_are_classes() -> None:
    pairs = [
        (E.STARTED, E.Started),
        (E.CAPTURING_STATE, E.CapturingState),
        (E.TRANSFER_PROGRESS, E.TransferProgress),
        (E.VALIDATING, E.Validating),
        (E.RESTORING, E.Restoring),
        (E.COMPLETED, E.Completed),
        (E.FAILED, E.Failed),
    ]
    assert [k for k, _ in pairs] == list(ProgressEventKind)
    for (kind, cls), ev in zip(pairs, _all_events()):
        assert isinstance(kind, ProgressEventKind) and kind.event_class is cls
        # kinds answer isinstance (ProgressEventKind.__instancecheck__); mypy cannot know that
        assert isinstance(ev, cls) and isinstance(ev, kind) and isinstance(ev, MigrationProgressEvent)  # type: ignore[arg-type]
        assert ev.kind == kind and ev.kind is cls.KIND
        others = [k for k, _ in pairs if k is not kind]
        assert not any(isinstance(ev, k) for k in others)
    assert not isinstance("x", E.STARTED)  # type: ignore[arg-type]


def test_every_spelling_builds_the_same_event() -> None:
    want = E.TransferProgress(AID, 5, 10, 50)
    assert E.TRANSFER_PROGRESS(AID, 5, 10, 50) == want
    assert ProgressEventKind.TRANSFER_PROGRESS(agent_id=AID, transferred_bytes=5, total_bytes=10, percent=50) == want
    assert MigrationProgressEvent(E.TRANSFER_PROGRESS, AID, 5, 10, 50) == want
    assert MigrationProgressEvent(kind=E.TRANSFER_PROGRESS, agent_id=AID, transferred_bytes=5, total_bytes=10, percent=50) == want
    assert MigrationProgressEvent(E.TransferProgress, AID, 5, 10, 50) == want
    assert type(MigrationProgressEvent(E.FAILED, AID, "x")) is E.Failed


def test_factories_build_the_variants() -> None:
    built = [
        E.started(AID, 100),
        E.capturing_state(AID, 10),
        E.transfer_progress(AID, 50, 100, 50),
        E.validating(AID, "checksum"),
        E.restoring(AID, 70),
        E.completed(AID, 1234, 100),
        E.failed(AID, "boom"),
    ]
    assert built == _all_events()


def test_fields_equality_repr_and_uuid_ids() -> None:
    # ids are typed as bytes; a uuid.UUID is accepted at run time and stored as bytes
    ev = E.TransferProgress(uuid.UUID(bytes=AID), transferred_bytes=5, total_bytes=10, percent=50)  # type: ignore[arg-type]
    assert ev.agent_id == AID
    assert (ev.transferred_bytes, ev.total_bytes, ev.percent) == (5, 10, 50)
    assert ev == E.TransferProgress(AID, 5, 10, 50)
    assert ev != E.TransferProgress(AID, 5, 10, 51)
    assert E.Restoring(AID, 5) != E.CapturingState(AID, 5)  # type: ignore[comparison-overlap]
    assert repr(ev).startswith("MigrationProgressEvent.TransferProgress(agent_id=")
    assert E.Completed(AID, 7, 8).duration_ms == 7 and E.Completed(AID, 7, 8).bytes_transferred == 8
    assert E.Failed(AID, "x").error == "x" and E.Validating(AID, "s").step == "s"
    assert E.Started(AID, 3).total_bytes == 3
    with pytest.raises(AttributeError):
        ev.percent = 3  # type: ignore[misc]  # events are immutable


_MATCH_SOURCE = """
def dispatch(ev):
    match ev:
        case E.TransferProgress(transferred_bytes=t, total_bytes=n):
            return f"{t}/{n}"
        case E.Completed() | E.Failed():
            return "end"
        case _:
            return ev.kind.name
"""


def test_pattern_matching() -> None:
    # Kept in a string so this file still imports on Python 3.9 (the package supports it).
    assert E.TransferProgress.__match_args__ == ("agent_id", "transferred_bytes", "total_bytes", "percent")
    if sys.version_info < (3, 10):
        return
    scope: dict = {"E": E}  # type: ignore[type-arg]
    exec(compile(_MATCH_SOURCE, "<match>", "exec"), scope)
    seen = [scope["dispatch"](ev) for ev in _all_events()]
    assert seen == ["STARTED", "CAPTURING_STATE", "50/100", "VALIDATING", "RESTORING", "end", "end"]


def test_base_class_needs_a_kind() -> None:
    with pytest.raises(TypeError, match="kind must be a ProgressEventKind"):
        MigrationProgressEvent(AID)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs a kind"):
        MigrationProgressEvent()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        MigrationProgressEvent(E.STARTED, AID)  # total_bytes missing


@pytest.mark.parametrize("bad", [-1, 101, 1000])
def test_event_percent_out_of_range(bad: int) -> None:
    with pytest.raises(ValueError):
        E.CapturingState(AID, bad)
    with pytest.raises(ValueError):
        E.Restoring(AID, bad)
    with pytest.raises(ValueError):
        E.TransferProgress(AID, 1, 1, bad)


def test_event_bad_values() -> None:
    with pytest.raises(ValueError):
        E.Started(AID, -1)
    with pytest.raises(TypeError):
        E.CapturingState(AID, 5.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        E.Started(b"short", 1)


# ---- tracker ---------------------------------------------------------------------------------


def test_tracker_starts_capturing() -> None:
    t = MigrationProgressTracker(AID, 1000)
    assert t.phase is MigrationPhase.CAPTURING
    assert t.progress_percent() == 0
    assert t.agent_id == AID and t.total_bytes == 1000 and t.bytes_transferred == 0


def test_tracker_zero_total_is_100_before_any_update() -> None:
    t = MigrationProgressTracker(AID, 0)
    assert t.progress_percent() == 100
    cb = CollectingCallback()
    t2 = MigrationProgressTracker(AID, 0, cb)
    t2.update_transfer_progress(0)
    ev = cb.latest_event()
    assert isinstance(ev, E.TransferProgress) and ev.percent == 100
    t2.update_transfer_progress(10)
    assert t2.progress_percent() == 100


@pytest.mark.parametrize(
    "total, transferred, percent",
    [
        (1000, 0, 0),
        (1000, 1, 0),
        (1000, 9, 0),
        (1000, 10, 1),
        (1000, 999, 99),
        (1000, 1000, 100),
        (1000, 5000, 100),  # clamped
        (3, 1, 33),
        (3, 2, 66),
        (7, 7, 100),
        (1 << 40, (1 << 40) - 1, 99),
    ],
)
def test_transfer_percent_floor_and_clamp(total: int, transferred: int, percent: int) -> None:
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, total, cb)
    t.update_transfer_progress(transferred)
    assert t.progress_percent() == percent
    assert t.phase is MigrationPhase.TRANSFERRING
    assert cb.latest_event() == E.TransferProgress(AID, transferred, total, percent)


def test_transfer_negative_refused() -> None:
    t = MigrationProgressTracker(AID, 10)
    with pytest.raises(ValueError):
        t.update_transfer_progress(-1)
    assert t.bytes_transferred == 0 and t.phase is MigrationPhase.CAPTURING


def test_tracker_rejects_bad_construction() -> None:
    with pytest.raises(ValueError):
        MigrationProgressTracker(AID, -1)
    with pytest.raises(TypeError):
        MigrationProgressTracker(AID, 10, callback="nope")  # type: ignore[arg-type]


def test_tracker_full_sequence() -> None:
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 200, callback=cb)
    t.report_started()
    assert t.phase is MigrationPhase.CAPTURING
    t.update_capturing_progress(50)
    t.update_capturing_progress(100)
    assert t.phase is MigrationPhase.CAPTURING
    t.update_transfer_progress(100)
    t.update_transfer_progress(200)
    assert t.phase is MigrationPhase.TRANSFERRING  # type: ignore[comparison-overlap]  # mypy narrows the property
    t.report_validating("checksum")
    assert t.phase is MigrationPhase.VALIDATING
    t.update_restoring_progress(40)
    assert t.phase is MigrationPhase.RESTORING
    t.report_completed()
    assert t.phase is MigrationPhase.COMPLETED
    events = cb.events
    assert [e.kind for e in events] == [
        ProgressEventKind.STARTED,
        ProgressEventKind.CAPTURING_STATE,
        ProgressEventKind.CAPTURING_STATE,
        ProgressEventKind.TRANSFER_PROGRESS,
        ProgressEventKind.TRANSFER_PROGRESS,
        ProgressEventKind.VALIDATING,
        ProgressEventKind.RESTORING,
        ProgressEventKind.COMPLETED,
    ]
    assert events[0] == E.Started(AID, 200)
    assert [e.progress_percent() for e in events[1:5]] == [50, 100, 50, 100]
    assert events[5] == E.Validating(AID, "checksum")
    last = events[-1]
    assert isinstance(last, E.Completed) and last.bytes_transferred == 200 and last.duration_ms >= 0
    assert last.is_terminal()


def test_tracker_failed() -> None:
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 10, cb)
    t.report_failed("link down")
    assert t.phase is MigrationPhase.FAILED
    assert cb.latest_event() == E.Failed(AID, "link down")


@pytest.mark.parametrize("given, clamped", [(-5, 0), (0, 0), (55, 55), (100, 100), (250, 100)])
def test_capturing_and_restoring_clamped(given: int, clamped: int) -> None:
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 10, cb)
    t.update_capturing_progress(given)
    t.update_restoring_progress(given)
    assert [e.progress_percent() for e in cb.events] == [clamped, clamped]


def test_completed_duration_measured_from_construction() -> None:
    cb = CollectingCallback()
    t = MigrationProgressTracker(AID, 10, cb)
    time.sleep(0.03)  # lower bound only: sleep guarantees at least this much
    assert t.elapsed_ms() >= 20
    t.report_completed()
    ev = cb.latest_event()
    assert isinstance(ev, E.Completed) and ev.duration_ms >= 20


def test_tracker_without_callback_still_tracks() -> None:
    t = MigrationProgressTracker(AID, 4)
    t.report_started()
    t.update_transfer_progress(2)
    t.report_completed()
    assert t.phase is MigrationPhase.COMPLETED and t.progress_percent() == 50


def test_plain_function_callback_and_reentrancy() -> None:
    seen: List[int] = []
    tracker: MigrationProgressTracker

    def cb(ev: MigrationProgressEvent) -> None:
        # a callback may read the tracker while being called
        seen.append(tracker.progress_percent())

    tracker = MigrationProgressTracker(AID, 10, cb)
    tracker.update_transfer_progress(3)
    tracker.update_transfer_progress(10)
    assert seen == [30, 100]


# ---- callbacks ---------------------------------------------------------------------------------


def test_collecting_callback() -> None:
    cb = CollectingCallback()
    assert cb.event_count() == 0 and cb.latest_event() is None and cb.events == []
    for ev in _all_events():
        cb(ev)
    assert cb.event_count() == 7
    assert cb.latest_event() == E.Failed(AID, "boom")
    snapshot = cb.events
    snapshot.clear()  # a copy: the callback keeps its events
    assert cb.event_count() == 7
    cb.clear()
    assert cb.event_count() == 0 and cb.latest_event() is None


def test_multi_callback_fans_out_in_order() -> None:
    order: List[str] = []
    a, b = CollectingCallback(), CollectingCallback()
    multi = MultiCallback()
    assert multi.callback_count() == 0
    multi(E.Started(AID, 1))  # no callbacks: nothing happens
    multi.add(a)
    multi.add(lambda ev: order.append("first"))
    multi.add(b)
    multi.add(lambda ev: order.append("second"))
    assert multi.callback_count() == 4
    t = MigrationProgressTracker(AID, 10, multi)
    t.report_started()
    t.report_validating("x")
    assert a.events == b.events == [E.Started(AID, 10), E.Validating(AID, "x")]
    assert order == ["first", "second", "first", "second"]


def test_multi_callback_initial_and_nesting() -> None:
    inner = CollectingCallback()
    outer = MultiCallback(MultiCallback(inner), inner)
    assert outer.callback_count() == 2
    outer(E.Failed(AID, "e"))
    assert inner.event_count() == 2
    with pytest.raises(TypeError):
        outer.add(42)  # type: ignore[arg-type]


_RACE = textwrap.dedent(
    """
    import threading
    from cellmigrate import CollectingCallback, MultiCallback, MigrationProgressTracker
    cb = CollectingCallback()
    multi = MultiCallback(cb)
    trackers = [MigrationProgressTracker(bytes([i]) * 16, 1000, multi) for i in range(8)]
    barrier = threading.Barrier(8)
    def work(i):
        barrier.wait()
        for n in range(1, 1001):
            trackers[i].update_transfer_progress(n)
    ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in ts: t.start()
    for t in ts: t.join()
    events = cb.events
    assert len(events) == 8000, len(events)
    for i in range(8):
        mine = [e.transferred_bytes for e in events if e.agent_id == bytes([i]) * 16]
        assert mine == list(range(1, 1001))  # per-tracker order preserved
    assert all(t.progress_percent() == 100 for t in trackers)
    print("OK")
    """
)


def test_callbacks_thread_safe() -> None:
    proc = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK"


def test_docstring_examples() -> None:
    import doctest

    import cellmigrate.progress

    result = doctest.testmod(cellmigrate.progress)
    assert result.attempted > 0 and result.failed == 0


# ---- byte-count adapter ------------------------------------------------------------------------


def test_byte_progress_transfer_events() -> None:
    cb = CollectingCallback()
    report = byte_progress(cb, uuid.UUID(bytes=AID))
    for done in (0, 1, 5, 9, 10, 10, 99, 100):
        report(done, 100)
    assert cb.events == [
        E.TransferProgress(AID, 0, 100, 0),
        E.TransferProgress(AID, 1, 100, 1),
        E.TransferProgress(AID, 5, 100, 5),
        E.TransferProgress(AID, 9, 100, 9),
        E.TransferProgress(AID, 10, 100, 10),
        E.TransferProgress(AID, 99, 100, 99),
        E.TransferProgress(AID, 100, 100, 100),
    ]


@pytest.mark.parametrize("kind", [ProgressEventKind.CAPTURING_STATE, ProgressEventKind.RESTORING])
def test_byte_progress_percent_kinds(kind: ProgressEventKind) -> None:
    cb = CollectingCallback()
    report = byte_progress(cb, AID, kind)
    for done in range(0, 1001, 7):
        report(done, 1000)
    report(1000, 1000)
    report(0, 0)  # nothing to do counts as done; no repeat of 100
    assert all(e.kind is kind for e in cb.events)
    percents = [e.progress_percent() or 0 for e in cb.events]
    assert None not in [e.progress_percent() for e in cb.events]
    assert percents == sorted(set(percents)) and percents[0] == 0 and percents[-1] == 100


def test_byte_progress_refuses_bad_use() -> None:
    with pytest.raises(ValueError):
        byte_progress(CollectingCallback(), AID, ProgressEventKind.COMPLETED)
    with pytest.raises(TypeError):
        byte_progress(42, AID)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        byte_progress(CollectingCallback(), AID)(-1, 10)


def test_byte_progress_drives_delta_create_and_apply() -> None:
    from cellmigrate import DeltaSnapshot

    old = bytes(64 * 4096)
    new = bytearray(old)
    new[5 * 4096] = 1
    cb = CollectingCallback()
    delta = DeltaSnapshot.create(AID, old, new, 0, 1, progress=byte_progress(cb, AID, ProgressEventKind.CAPTURING_STATE))
    assert cb.event_count() >= 1 and cb.latest_event() == E.CapturingState(AID, 100)
    cb.clear()
    base = bytearray(old)
    delta.apply(base, progress=byte_progress(cb, AID, ProgressEventKind.RESTORING))
    assert base == new
    assert cb.latest_event() == E.Restoring(AID, 100)
