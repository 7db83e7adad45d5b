"""Lifecycle of a served model: states, the one transition table, restart backoff and the crash-loop rule.

    PENDING -> STARTING -> READY <-> UNHEALTHY
                  |          |          |
                  +----------+----------+--> BACKOFF -> STARTING ... -> FAILED
    any live state -> STOPPING -> STOPPED

"Started" means the health probe passed, not that a process was forked (supervisord's startsecs
idea, with a real probe because vLLM takes minutes to load). Any exit the supervisor did not ask
for is a failure, whatever its exit code. Time is passed in, never read here, so every rule can be
tested with a fake clock.
"""

from __future__ import annotations

import collections
import enum
from collections.abc import Sequence
from dataclasses import dataclass, field

from gpushared.domain.errors import IllegalTransition


class ModelState(enum.StrEnum):
    PENDING = "pending"
    """Accepted; waiting for its memory pool's start slot."""
    STARTING = "starting"
    """Process launched; health probe not yet passed."""
    READY = "ready"
    UNHEALTHY = "unhealthy"
    """Was ready; liveness probe failing, process still there."""
    BACKOFF = "backoff"
    """Exited or timed out; waiting before the next start. The partitions stay reserved."""
    FAILED = "failed"
    """Gave up: crash loop or an error a restart cannot fix. Partitions stay reserved until stopped."""
    STOPPING = "stopping"
    STOPPED = "stopped"


S = ModelState
TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    S.PENDING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STARTING: frozenset({S.READY, S.BACKOFF, S.FAILED, S.STOPPING}),
    S.READY: frozenset({S.UNHEALTHY, S.BACKOFF, S.STOPPING}),
    S.UNHEALTHY: frozenset({S.READY, S.BACKOFF, S.STOPPING}),
    S.BACKOFF: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.FAILED: frozenset({S.PENDING, S.STOPPING}),
    S.STOPPING: frozenset({S.STOPPED}),
    S.STOPPED: frozenset({S.PENDING}),
}

LIVE = frozenset({S.STARTING, S.READY, S.UNHEALTHY})
"""States in which a process of the model may be running."""


@dataclass(frozen=True)
class Transition:
    source: ModelState
    target: ModelState
    at: float
    """Unix time, seconds."""
    reason: str


@dataclass(frozen=True)
class RestartPolicy:
    """Exponential backoff with full jitter, and a crash-loop breaker.

    Defaults follow reliability.md §4: base 2 s, cap 5 min, give up after 5 failures within
    15 min, and forget old failures once the model has been READY for 10 min.
    """

    base_seconds: float = 2.0
    cap_seconds: float = 300.0
    max_failures: int = 5
    window_seconds: float = 900.0
    healthy_reset_seconds: float = 600.0


def backoff_delay(policy: RestartPolicy, failures: int, jitter: float) -> float:
    """Delay before restart number ``failures`` (1 = first); ``jitter`` in [0, 1) from the caller's RNG.

    Full jitter spreads restarts of models that crashed together (a driver hiccup) instead of
    restarting them in lockstep.
    """
    if failures < 1:
        raise ValueError("failures counts from 1")
    growth: float = 2.0 ** (failures - 1)
    ceiling = min(policy.cap_seconds, policy.base_seconds * growth)
    return ceiling * min(max(jitter, 0.0), 1.0)


def learned_start_timeout(
    previous_start_seconds: Sequence[float], *, floor: float = 600.0, factor: float = 3.0
) -> float:
    """How long to wait for READY: never below vLLM's own 600 s engine timeout, and three times
    the slowest start seen for this model, so a model that once took 15 minutes to compile is not
    killed at minute 10 the next time."""
    if not previous_start_seconds:
        return floor
    return max(floor, factor * max(previous_start_seconds))


@dataclass
class ModelLifecycle:
    """The state of one model and how it got there; only ``transition`` changes it."""

    state: ModelState = S.PENDING
    history: collections.deque[Transition] = field(default_factory=lambda: collections.deque(maxlen=50))
    failure_times: list[float] = field(default_factory=list)
    restarts: int = 0
    ready_since: float | None = None
    last_error: str = ""

    def transition(self, target: ModelState, reason: str, now: float) -> Transition:
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"model state {self.state} -> {target} is not allowed ({reason})")
        record = Transition(self.state, target, now, reason)
        if target is S.READY:
            self.ready_since = now
        elif self.state in (S.READY, S.UNHEALTHY) and target is not S.UNHEALTHY:
            self.ready_since = None
        if target is S.BACKOFF:
            self.failure_times.append(now)
            self.last_error = reason
        if target is S.FAILED:
            self.last_error = reason
        if self.state is S.BACKOFF and target is S.STARTING:
            self.restarts += 1
        self.state = target
        self.history.append(record)
        return record

    def note_healthy(self, now: float, policy: RestartPolicy) -> None:
        """Forget past failures once the model has stayed READY long enough (systemd's RESTART_RESET)."""
        if self.ready_since is not None and now - self.ready_since >= policy.healthy_reset_seconds:
            self.failure_times.clear()

    def recent_failures(self, now: float, policy: RestartPolicy) -> int:
        return sum(1 for t in self.failure_times if now - t <= policy.window_seconds)

    def crash_looping(self, now: float, policy: RestartPolicy) -> bool:
        return self.recent_failures(now, policy) >= policy.max_failures
