"""The model lifecycle: transition table, recorded history, backoff, crash-loop breaker, learned timeouts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushared.domain.errors import IllegalTransition
from gpushared.domain.model_state import (
    TRANSITIONS,
    ModelLifecycle,
    ModelState,
    RestartPolicy,
    backoff_delay,
    learned_start_timeout,
)

S = ModelState
POLICY = RestartPolicy()


def test_every_state_has_a_row_and_stopping_always_ends_in_stopped() -> None:
    assert set(TRANSITIONS) == set(ModelState)
    for state in ModelState:
        if state not in (S.STOPPING, S.STOPPED):
            assert S.STOPPING in TRANSITIONS[state], f"{state} must be stoppable"
    assert TRANSITIONS[S.STOPPING] == {S.STOPPED}


@pytest.mark.parametrize(("source", "target"), list(itertools.product(ModelState, ModelState)))
def test_table_is_enforced(source: ModelState, target: ModelState) -> None:
    lifecycle = ModelLifecycle(state=source)
    if target in TRANSITIONS[source]:
        record = lifecycle.transition(target, "test", 10.0)
        assert (record.source, record.target, record.at, record.reason) == (source, target, 10.0, "test")
        assert lifecycle.state is target
    else:
        with pytest.raises(IllegalTransition, match=f"model state {source} -> {target} is not allowed"):
            lifecycle.transition(target, "test", 10.0)
        assert lifecycle.state is source
        assert not lifecycle.history


def test_crash_loop_history_and_restart_count() -> None:
    lifecycle = ModelLifecycle()
    now = 0.0
    lifecycle.transition(S.STARTING, "launched pid 10", now)
    for attempt in range(POLICY.max_failures):
        now += 1
        lifecycle.transition(S.BACKOFF, f"exited with status 1 (attempt {attempt})", now)
        if lifecycle.crash_looping(now, POLICY):
            lifecycle.transition(S.FAILED, "crash loop: 5 failures in 15 min", now)
            break
        lifecycle.transition(S.STARTING, "backoff over", now)
    assert lifecycle.state is S.FAILED
    assert lifecycle.restarts == POLICY.max_failures - 1
    assert lifecycle.last_error == "crash loop: 5 failures in 15 min"
    assert [t.target for t in lifecycle.history][:3] == [S.STARTING, S.BACKOFF, S.STARTING]


def test_failures_outside_the_window_do_not_count_and_health_resets_them() -> None:
    lifecycle = ModelLifecycle(state=S.STARTING)
    lifecycle.transition(S.BACKOFF, "exit 1", 0.0)
    lifecycle.transition(S.STARTING, "retry", 1.0)
    assert lifecycle.recent_failures(POLICY.window_seconds + 1, POLICY) == 0
    lifecycle.transition(S.READY, "probe ok", 2.0)
    lifecycle.note_healthy(2.0 + POLICY.healthy_reset_seconds - 1, POLICY)
    assert lifecycle.failure_times == [0.0]
    lifecycle.note_healthy(2.0 + POLICY.healthy_reset_seconds, POLICY)
    assert lifecycle.failure_times == []


def test_ready_since_follows_readiness() -> None:
    lifecycle = ModelLifecycle(state=S.STARTING)
    lifecycle.transition(S.READY, "ok", 5.0)
    lifecycle.transition(S.UNHEALTHY, "/health timed out", 6.0)
    assert lifecycle.ready_since == 5.0
    lifecycle.transition(S.BACKOFF, "killed after 3 failed probes", 7.0)
    assert lifecycle.ready_since is None


@given(failures=st.integers(1, 40), jitter=st.floats(0, 1, exclude_max=True))
def test_backoff_is_bounded_and_grows(failures: int, jitter: float) -> None:
    delay = backoff_delay(POLICY, failures, jitter)
    ceiling = min(POLICY.cap_seconds, POLICY.base_seconds * 2 ** (failures - 1))
    assert 0 <= delay <= ceiling <= POLICY.cap_seconds
    assert backoff_delay(POLICY, failures, 0.999999) <= backoff_delay(POLICY, failures + 1, 0.999999)


def test_backoff_rejects_zero() -> None:
    with pytest.raises(ValueError, match="counts from 1"):
        backoff_delay(POLICY, 0, 0.5)


def test_learned_start_timeout() -> None:
    assert learned_start_timeout([]) == 600.0
    assert learned_start_timeout([40.0, 55.0]) == 600.0
    assert learned_start_timeout([40.0, 400.0]) == 1200.0
