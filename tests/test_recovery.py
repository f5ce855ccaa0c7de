"""Recovery: error types, config (retry delays, validate messages), manager (strategies, history)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from cellmigrate import (
    CellError,
    InvalidStateError,
    MigrationError,
    MigrationErrorType,
    MigrationRecoveryManager,
    RecoveryAttempt,
    RecoveryConfig,
    RecoveryStrategy,
)

AID = bytes(range(16))
OTHER = bytes(range(16, 32))
TARGET = b"T" * 16

ET = MigrationErrorType
RS = RecoveryStrategy


# ---- MigrationErrorType ----------------------------------------------------------------


def test_error_type_order() -> None:
    assert [t.name for t in ET] == [
        "NETWORK_TRANSIENT",
        "NETWORK_PERMANENT",
        "INSUFFICIENT_RESOURCES",
        "INCOMPATIBLE_TARGET",
        "STATE_CORRUPTION",
        "TIMEOUT",
        "TARGET_UNREACHABLE",
        "UNKNOWN",
    ]


def test_is_retryable() -> None:
    retryable = {t for t in ET if t.is_retryable()}
    assert retryable == {ET.NETWORK_TRANSIENT, ET.INSUFFICIENT_RESOURCES, ET.TIMEOUT, ET.TARGET_UNREACHABLE}


def test_should_change_target() -> None:
    change = {t for t in ET if t.should_change_target()}
    assert change == {ET.INSUFFICIENT_RESOURCES, ET.INCOMPATIBLE_TARGET, ET.TARGET_UNREACHABLE}


# ---- MigrationError ----------------------------------------------------------------------


def test_migration_error_record() -> None:
    before = int(time.time())
    err = MigrationError(ET.TIMEOUT, "slow", uuid.UUID(bytes=AID))
    assert not isinstance(err, BaseException)
    assert err.agent_id == AID and isinstance(err.agent_id, bytes)
    assert err.message == "slow"
    assert err.target_node is None
    assert err.retry_count == 0
    assert before <= err.timestamp <= int(time.time())
    err.increment_retry()
    err.increment_retry()
    assert err.retry_count == 2
    assert err.age_secs() >= 0


def test_migration_error_new_and_with_target() -> None:
    err = MigrationError.new(ET.UNKNOWN, "?", AID).with_target(uuid.UUID(bytes=TARGET))
    assert err.target_node == TARGET
    assert err.error_type is ET.UNKNOWN


def test_migration_error_age_never_negative() -> None:
    err = MigrationError(ET.TIMEOUT, "future", AID, timestamp=int(time.time()) + 1000)
    assert err.age_secs() == 0
    err.timestamp = int(time.time()) - 50
    assert 50 <= err.age_secs() <= 52


def test_migration_error_equality_and_repr() -> None:
    a = MigrationError(ET.TIMEOUT, "x", AID, timestamp=5)
    b = MigrationError(ET.TIMEOUT, "x", AID, timestamp=5)
    assert a == b
    b.increment_retry()
    assert a != b
    assert "TIMEOUT" in repr(a)


@pytest.mark.parametrize("bad", [b"short", "not-bytes", 123])
def test_migration_error_bad_id(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        MigrationError(ET.TIMEOUT, "x", bad)  # type: ignore[arg-type]


def test_migration_error_bad_type() -> None:
    with pytest.raises(TypeError):
        MigrationError("TIMEOUT", "x", AID)  # type: ignore[arg-type]


# ---- RecoveryConfig ----------------------------------------------------------------------


def test_config_defaults() -> None:
    c = RecoveryConfig()
    assert (
        c.max_retries,
        c.initial_retry_delay_secs,
        c.max_retry_delay_secs,
        c.use_exponential_backoff,
        c.recovery_timeout_secs,
        c.auto_rollback,
    ) == (3, 10, 300, True, 600, True)
    c.validate()
    assert RecoveryConfig.default() == c


@pytest.mark.parametrize(
    "attempt, delay", [(0, 10), (1, 10), (2, 20), (3, 40), (4, 80), (5, 160), (6, 300), (10, 300), (10**6, 300)]
)
def test_retry_delay_table(attempt: int, delay: int) -> None:
    assert RecoveryConfig().calculate_retry_delay(attempt) == delay


def test_retry_delay_without_backoff() -> None:
    c = RecoveryConfig(use_exponential_backoff=False, initial_retry_delay_secs=7)
    assert [c.calculate_retry_delay(a) for a in (0, 1, 2, 5, 100)] == [7, 7, 7, 7, 7]


def test_retry_delay_custom_bounds() -> None:
    c = RecoveryConfig(initial_retry_delay_secs=3, max_retry_delay_secs=20)
    assert [c.calculate_retry_delay(a) for a in range(6)] == [3, 3, 6, 12, 20, 20]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"initial_retry_delay_secs": 0}, "initial_retry_delay_secs must be > 0"),
        ({"initial_retry_delay_secs": -1}, "initial_retry_delay_secs must be > 0"),
        ({"initial_retry_delay_secs": 50, "max_retry_delay_secs": 49}, "max_retry_delay_secs must be >= initial_retry_delay_secs"),
        ({"recovery_timeout_secs": 0}, "recovery_timeout_secs must be > 0"),
        # order: the first failing check wins
        ({"initial_retry_delay_secs": 0, "recovery_timeout_secs": 0}, "initial_retry_delay_secs must be > 0"),
        (
            {"initial_retry_delay_secs": 10, "max_retry_delay_secs": 5, "recovery_timeout_secs": 0},
            "max_retry_delay_secs must be >= initial_retry_delay_secs",
        ),
    ],
)
def test_validate_messages(kwargs: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError) as info:
        RecoveryConfig(**kwargs).validate()
    assert str(info.value) == message


def test_validate_accepts_equal_bounds() -> None:
    RecoveryConfig(initial_retry_delay_secs=30, max_retry_delay_secs=30).validate()


# ---- strategy matrix ---------------------------------------------------------------------

_BASE = {
    ET.NETWORK_TRANSIENT: "same",
    ET.TIMEOUT: "same",
    ET.INSUFFICIENT_RESOURCES: "different",
    ET.INCOMPATIBLE_TARGET: "different",
    ET.TARGET_UNREACHABLE: "different",
    ET.STATE_CORRUPTION: "fallback",
    ET.NETWORK_PERMANENT: "fallback",
    ET.UNKNOWN: "fallback",
}


@pytest.mark.parametrize("error_type", list(ET))
@pytest.mark.parametrize("retry_count", [0, 1, 2, 3, 4, 10])
@pytest.mark.parametrize("auto_rollback", [True, False])
def test_strategy_matrix(error_type: MigrationErrorType, retry_count: int, auto_rollback: bool) -> None:
    mgr = MigrationRecoveryManager(RecoveryConfig(auto_rollback=auto_rollback))
    err = MigrationError(error_type, "e", AID, retry_count=retry_count)
    fallback = RS.ROLLBACK if auto_rollback else RS.GIVE_UP
    if retry_count >= 3:
        expected = fallback
    else:
        expected = {"same": RS.RETRY_ON_SAME_TARGET, "different": RS.RETRY_ON_DIFFERENT_TARGET, "fallback": fallback}[
            _BASE[error_type]
        ]
    assert mgr.determine_strategy(err) is expected


def test_strategy_max_retries_zero_always_falls_back() -> None:
    mgr = MigrationRecoveryManager(RecoveryConfig(max_retries=0, auto_rollback=False))
    assert mgr.determine_strategy(MigrationError(ET.TIMEOUT, "e", AID)) is RS.GIVE_UP


# ---- manager -----------------------------------------------------------------------------


def test_manager_invalid_config_raises() -> None:
    with pytest.raises(ValueError, match="^initial_retry_delay_secs must be > 0$"):
        MigrationRecoveryManager(RecoveryConfig(initial_retry_delay_secs=0))


def test_manager_refuses_non_errors() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    with pytest.raises(TypeError):
        mgr.record_failure("boom")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mgr.determine_strategy(ET.TIMEOUT)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        MigrationRecoveryManager({"max_retries": 1})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        mgr.set_config(None)  # type: ignore[arg-type]


def test_manager_with_defaults() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    assert mgr.config == RecoveryConfig()
    assert MigrationRecoveryManager().config == RecoveryConfig()
    assert mgr.pending_count() == 0


def test_execute_without_pending() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    with pytest.raises(InvalidStateError) as info:
        mgr.execute_recovery(AID)
    assert info.value.message == "No pending recovery for agent"
    assert isinstance(info.value, CellError)


def test_record_failure_replaces_pending_and_keeps_history() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "first", AID))
    assert mgr.get_history(AID) == []
    mgr.execute_recovery(AID)
    mgr.record_failure(MigrationError(ET.STATE_CORRUPTION, "second", AID))
    pending = mgr.get_pending(AID)
    assert pending is not None and pending.message == "second" and pending.retry_count == 0
    assert mgr.pending_count() == 1
    history = mgr.get_history(AID)
    assert history is not None and len(history) == 1  # history survives the replacement


def test_record_failure_stores_a_copy() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    err = MigrationError(ET.TIMEOUT, "x", AID)
    mgr.record_failure(err)
    mgr.execute_recovery(AID)
    assert err.retry_count == 0
    pending = mgr.get_pending(AID)
    assert pending is not None and pending.retry_count == 1


def test_full_recovery_history() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.NETWORK_TRANSIENT, "flaky", AID, target_node=TARGET))
    strategies = []
    for i in range(5):
        strategies.append(mgr.execute_recovery(AID))
        mgr.mark_recovery_failure(AID, f"attempt {i + 1} failed")
    assert strategies == [RS.RETRY_ON_SAME_TARGET] * 3 + [RS.ROLLBACK] * 2
    history = mgr.get_history(AID)
    assert history is not None
    assert [a.attempt_number for a in history] == [1, 2, 3, 4, 5]
    assert [a.strategy for a in history] == strategies
    assert all(a.target_node == TARGET for a in history)
    assert all(a.success is False for a in history)
    assert [a.error for a in history] == [f"attempt {i} failed" for i in range(1, 6)]
    pending = mgr.get_pending(AID)
    assert pending is not None and pending.retry_count == 5


def test_mark_success() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID))
    mgr.execute_recovery(AID)
    mgr.mark_recovery_failure(AID, "nope")
    mgr.execute_recovery(AID)
    mgr.mark_recovery_success(AID)
    assert mgr.pending_count() == 0
    assert mgr.get_pending(AID) is None
    history = mgr.get_history(AID)
    assert history is not None
    assert [(a.success, a.error) for a in history] == [(False, "nope"), (True, None)]
    with pytest.raises(InvalidStateError):
        mgr.execute_recovery(AID)


def test_mark_failure_keeps_pending() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID))
    mgr.execute_recovery(AID)
    mgr.mark_recovery_failure(AID, "again")
    assert mgr.pending_count() == 1


def test_marks_on_unknown_agent_are_harmless() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.mark_recovery_success(AID)
    mgr.mark_recovery_failure(AID, "x")
    assert mgr.get_history(AID) is None
    assert mgr.pending_count() == 0


def test_history_none_if_never_recorded_and_clear() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    assert mgr.get_history(AID) is None
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID))
    mgr.record_failure(MigrationError(ET.TIMEOUT, "y", OTHER))
    mgr.execute_recovery(AID)
    mgr.clear_history(AID)
    assert mgr.get_history(AID) is None
    assert mgr.get_pending(AID) is None
    assert mgr.pending_count() == 1
    assert mgr.get_history(OTHER) == []


def test_get_pending_all_and_copies() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "a", AID))
    mgr.record_failure(MigrationError(ET.UNKNOWN, "b", OTHER))
    assert sorted(e.message for e in mgr.get_pending()) == ["a", "b"]
    got = mgr.get_pending(AID)
    assert got is not None
    got.retry_count = 99
    again = mgr.get_pending(AID)
    assert again is not None and again.retry_count == 0


def test_history_is_a_copy() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    mgr.record_failure(MigrationError(ET.TIMEOUT, "a", AID))
    mgr.execute_recovery(AID)
    h = mgr.get_history(AID)
    assert h is not None
    h[0].success = True
    h.clear()
    again = mgr.get_history(AID)
    assert again is not None and len(again) == 1 and again[0].success is False


def test_uuid_ids_accepted() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    u = uuid.UUID(bytes=AID)
    mgr.record_failure(MigrationError(ET.TIMEOUT, "a", u))
    assert mgr.execute_recovery(u) is RS.RETRY_ON_SAME_TARGET
    history = mgr.get_history(AID)
    assert history is not None and [a.attempt_number for a in history] == [1]
    assert mgr.get_history(u) == history
    pending = mgr.get_pending(u)
    assert pending is not None and pending.agent_id == AID and pending.retry_count == 1


def test_recovery_attempt_record() -> None:
    a = RecoveryAttempt(1, RS.ROLLBACK, 100, None)
    assert a.success is False and a.error is None
    assert a == RecoveryAttempt(1, RS.ROLLBACK, 100, None)
    assert "ROLLBACK" in repr(a)


def test_set_config_validates_and_keeps_old_on_error() -> None:
    mgr = MigrationRecoveryManager(RecoveryConfig(max_retries=5))
    with pytest.raises(ValueError, match="^recovery_timeout_secs must be > 0$"):
        mgr.set_config(RecoveryConfig(recovery_timeout_secs=0))
    assert mgr.config.max_retries == 5
    mgr.set_config(RecoveryConfig(max_retries=1, auto_rollback=False))
    assert mgr.config.max_retries == 1
    assert mgr.determine_strategy(MigrationError(ET.TIMEOUT, "x", AID, retry_count=1)) is RS.GIVE_UP


def test_config_property_is_a_copy() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    c = mgr.config
    c.initial_retry_delay_secs = 0  # would be invalid; must not leak into the manager
    assert mgr.config.initial_retry_delay_secs == 10


def test_next_retry_time_and_readiness() -> None:
    mgr = MigrationRecoveryManager.with_defaults()
    assert mgr.next_retry_time(AID) is None
    assert mgr.is_ready_for_retry(AID) is False
    past = int(time.time()) - 1000
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID, timestamp=past))
    assert mgr.next_retry_time(AID) == past + 10  # retry_count 0 -> 10 s
    assert mgr.is_ready_for_retry(AID) is True
    for _ in range(4):
        mgr.execute_recovery(AID)
    # retry_count 4 -> 80 s
    assert mgr.next_retry_time(AID) == past + 80
    fresh = int(time.time())
    mgr.record_failure(MigrationError(ET.TIMEOUT, "y", OTHER, timestamp=fresh))
    assert mgr.next_retry_time(OTHER) == fresh + 10
    assert mgr.is_ready_for_retry(OTHER) is False


def test_next_retry_time_follows_config() -> None:
    mgr = MigrationRecoveryManager(RecoveryConfig(use_exponential_backoff=False, initial_retry_delay_secs=5))
    mgr.record_failure(MigrationError(ET.TIMEOUT, "x", AID, timestamp=1000, retry_count=7))
    assert mgr.next_retry_time(AID) == 1005


# ---- concurrency ---------------------------------------------------------------------------

_RACE = textwrap.dedent(
    """
    import threading
    from cellmigrate import MigrationError, MigrationErrorType, MigrationRecoveryManager, RecoveryStrategy

    mgr = MigrationRecoveryManager.with_defaults()
    N_AGENTS, N_THREADS, ROUNDS = 8, 8, 200
    ids = [bytes([i]) * 16 for i in range(N_AGENTS)]
    for aid in ids:
        mgr.record_failure(MigrationError(MigrationErrorType.NETWORK_TRANSIENT, "x", aid))
    start = threading.Barrier(N_THREADS)
    errors = []

    def work(t):
        try:
            start.wait()
            for r in range(ROUNDS):
                aid = ids[(t + r) % N_AGENTS]
                mgr.execute_recovery(aid)
                mgr.mark_recovery_failure(aid, "f")
                mgr.next_retry_time(aid)
                mgr.get_history(aid)
                mgr.pending_count()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(N_THREADS)]
    for th in threads: th.start()
    for th in threads: th.join()
    assert not errors, errors
    total = 0
    for aid in ids:
        h = mgr.get_history(aid)
        p = mgr.get_pending(aid)
        # every attempt numbered once, in order, and the count matches the retries
        assert [a.attempt_number for a in h] == list(range(1, len(h) + 1)), aid
        assert p.retry_count == len(h)
        assert all(a.strategy is RecoveryStrategy.RETRY_ON_SAME_TARGET for a in h[:3])
        total += len(h)
    assert total == N_THREADS * ROUNDS, total
    print("OK", total)
    """
)


def test_manager_is_thread_safe() -> None:
    proc = subprocess.run([sys.executable, "-c", _RACE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "OK 1600"


def test_docstring_examples() -> None:
    import doctest

    import cellmigrate.recovery

    result = doctest.testmod(cellmigrate.recovery)
    assert result.attempted > 0 and result.failed == 0
