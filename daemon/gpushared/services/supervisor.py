"""Supervision of one model server child: start until the probe passes, liveness, restart with backoff, stop, re-adopt.

One ModelSupervisor per model. It owns one background task that walks the child through ModelLifecycle
(domain/model_state.py holds the only transition table) and talks to the world only through the ports in
supervision_ports.py. The kernel is the truth: the child is held by pidfd (identity = leaf + pid + start time),
its exit is noticed when the pidfd turns readable, and cleanup is always by cgroup (cgroup.kill, then
cgroup.events "populated 0"), because vLLM's EngineCore survives a SIGKILL of its parent (vllm.md §5).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gpushared.domain.errors import FailedPrecondition
from gpushared.domain.model_state import (
    ModelLifecycle,
    ModelState,
    RestartPolicy,
    backoff_delay,
    learned_start_timeout,
)
from gpushared.services.supervision_ports import (
    ChildIdentity,
    ChildLauncher,
    ChildProcess,
    ChildSpec,
    ExitStatus,
    HealthProbe,
    LeafTree,
)

__all__ = ["ChildIdentity", "ChildSpec", "ModelSupervisor"]

_log = logging.getLogger(__name__)
S = ModelState
T = TypeVar("T")

LOG_TAIL_LINES = 20
# Readiness is polled much faster than liveness, and faster still early in a start: until the port listens a
# probe is one refused connect() (about 60 us), and the poll interval is added, half of it on average, to every
# model's time to READY. The interval grows with the time already spent (2% of it, 5 ms to 50 ms), so it stays
# under 1% of any start while a 30-minute vLLM start still polls only every 50 ms.
READY_POLL_SECONDS = 0.05
READY_POLL_MIN_SECONDS = 0.005
READY_POLL_FRACTION = 0.02
# How long cgroup.events may take to say "populated 0" after cgroup.kill; longer means a task stuck in the
# driver (D state), which reliability.md §4 says to report rather than wait on forever.
EMPTY_TIMEOUT_SECONDS = 10.0


class _ChildExited(Exception):
    def __init__(self, status: ExitStatus) -> None:
        super().__init__(status.description)
        self.status = status


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of the child's log (read from the end: logs grow without bound)."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError as exc:
        return f"(log unreadable: {exc.strerror})"
    return "\n".join(data.decode(errors="replace").splitlines()[-lines:])


class ModelSupervisor:
    """Runs one model's child through PENDING -> STARTING -> READY <-> UNHEALTHY, BACKOFF, FAILED, STOPPED."""

    def __init__(
        self,
        spec: ChildSpec,
        *,
        tree: LeafTree,
        launcher: ChildLauncher,
        probe: HealthProbe,
        policy: RestartPolicy,
        clock: Callable[[], float],
        rng: Callable[[], float],
        grace_seconds: float,
        probe_interval: float,
        start_timeout: float,
        on_change: Callable[[ModelSupervisor], None],
        start_gate: asyncio.Lock | None = None,
        unhealthy_after: int = 3,
        kill_after: int = 3,
        wall_clock: Callable[[], float] = time.time,
        start_durations: Sequence[float] = (),
        completion_probe_interval: float = 0.0,
        completion_probe_timeout: float = 60.0,
    ) -> None:
        """``clock`` is monotonic (deadlines, backoff); ``wall_clock`` stamps transitions and the crash-loop window
        (ModelLifecycle keeps one time base for both). ``start_timeout`` is the floor of learned_start_timeout.
        ``unhealthy_after`` failed liveness probes make READY UNHEALTHY; ``kill_after`` more restart the child.
        ``start_gate`` is shared by the models of one memory pool: held from launch until READY or failure, so
        two vLLM instances never profile free memory at the same time (vllm.md §6). ``start_durations`` are the
        model's earlier starts (persisted by the caller) that the start timeout is learned from.
        ``completion_probe_interval`` > 0 adds a one-token completion to liveness every that many seconds: vLLM's
        /health answers 200 while the engine hangs (vllm.md §4). One that fails makes READY UNHEALTHY at once
        (it already waited ``completion_probe_timeout``); ``kill_after`` more, one per probe interval, restart."""
        self.spec = spec
        self.lifecycle = ModelLifecycle()
        self.identity: ChildIdentity | None = None
        self.start_durations: list[float] = list(start_durations)
        self._tree = tree
        self._launcher = launcher
        self._probe = probe
        self._policy = policy
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng
        self._grace = grace_seconds
        self._probe_interval = probe_interval
        self._start_timeout_floor = start_timeout
        self._on_change = on_change
        self._gate = start_gate
        self._gate_held = False
        self._unhealthy_after = unhealthy_after
        self._kill_after = kill_after
        self._completion_interval = completion_probe_interval
        self._completion_timeout = completion_probe_timeout
        self._child: ChildProcess | None = None
        self._task: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._stopping: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------------------------------------------------
    # Public API

    @property
    def state(self) -> ModelState:
        return self.lifecycle.state

    @property
    def start_timeout(self) -> float:
        return learned_start_timeout(self.start_durations, floor=self._start_timeout_floor)

    async def start(self) -> None:
        """Wait for the pool's start slot, launch the child and return once STARTING (or FAILED if it cannot
        be launched at all); READY follows in the background when the probe passes."""
        if self.state in (S.STOPPED, S.FAILED):
            self._transition(S.PENDING, "start requested")
        elif self.state is not S.PENDING or (self._task is not None and not self._task.done()):
            raise FailedPrecondition(f"model {self.spec.name}: cannot start while {self.state}")
        # The launch runs in the supervision task, so a stop() that arrives while we wait for the start slot or
        # for the exec cancels one task and finds every process it has to kill.
        task = asyncio.create_task(self._supervise(adopted=False, launch=True), name=f"supervise {self.spec.name}")
        self._task = task
        while self.state is S.PENDING and not task.done():
            changed = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()

    async def adopt(self, identity: ChildIdentity) -> bool:
        """Take over a child left running by a previous daemon: True once it is verified to be the same process
        (alive, same start time, in our leaf) and probing has resumed; False, with nothing sent to any
        process, otherwise."""
        if self.state is not S.PENDING:
            raise FailedPrecondition(f"model {self.spec.name}: can only adopt a child while pending, not {self.state}")
        if identity.leaf != self.spec.name:
            return False
        child = self._launcher.attach(identity)
        if child is None:
            return False
        self._child, self.identity = child, identity
        # The previous daemon's stop released the controllers (systemd < 254 cannot restart a unit otherwise):
        # the limits are back at "max" until they are written again.
        self._apply_limits()
        self._transition(S.STARTING, f"re-adopted pid {identity.pid} (start time {identity.start_time})")
        self._task = asyncio.create_task(
            self._supervise(adopted=True, launch=False), name=f"supervise {self.spec.name}"
        )
        return True

    async def stop(self, grace: float | None = None) -> None:
        """SIGTERM to the main process, ``grace`` seconds, then cgroup.kill, wait for "populated 0", remove the
        leaf: STOPPED means nothing of the model runs any more, grandchildren included."""
        if self.state is S.STOPPED:
            return
        if self._stopping is None:
            self._stopping = asyncio.create_task(self._stop(self._grace if grace is None else grace))
        try:
            await asyncio.shield(self._stopping)
        finally:
            if self._stopping.done():
                self._stopping = None

    async def detach(self) -> None:
        """Let go of the child without touching it, as a daemon that exits with children kept running does; a
        later supervisor re-adopts it with adopt(identity)."""
        await self._cancel_task()
        if self._child is not None:
            self._child.close()
            self._child = None
        self._release_gate()

    async def wait_state(self, *states: ModelState, timeout: float) -> ModelState:
        """Wait until the model is in one of ``states``; TimeoutError naming the state it is in instead."""
        deadline = self._clock() + timeout
        while self.state not in states:
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise TimeoutError(
                    f"model {self.spec.name}: still {self.state} after {timeout} s, waiting for "
                    f"{', '.join(states)} (last error: {self.lifecycle.last_error or 'none'})"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
        return self.state

    # ----------------------------------------------------------------------------------------------------------
    # Transitions

    def _transition(self, target: ModelState, reason: str) -> None:
        self.lifecycle.transition(target, reason, self._wall())
        _log.info("model %s: %s (%s)", self.spec.name, target, reason)
        # A fresh event per transition: waiters woken by the old one re-check the state, none misses a change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        try:
            self._on_change(self)
        except Exception:
            # An observer's bug must not leave the child unsupervised.
            _log.exception("model %s: on_change callback failed", self.spec.name)

    # ----------------------------------------------------------------------------------------------------------
    # Launch, readiness, liveness

    async def _acquire_gate(self) -> None:
        if self._gate is not None and not self._gate_held:
            await self._gate.acquire()
            self._gate_held = True

    def _release_gate(self) -> None:
        if self._gate is not None and self._gate_held:
            self._gate_held = False
            self._gate.release()

    def _apply_limits(self) -> None:
        name, limits = self.spec.name, self.spec.limits
        not_applied = self._tree.set_limits(
            name, memory_max=limits.memory_max, pids_max=limits.pids_max, cpu_weight=limits.cpu_weight
        )
        for line in not_applied:
            # Said plainly, once per leaf: on a host without the controllers the limits do not exist.
            _log.warning("model %s: %s", name, line, extra={"event": "limit_not_applied", "model": name})

    async def _prepare_leaf(self) -> None:
        name = self.spec.name
        if name not in self._tree.leaves():
            self._tree.create_leaf(name)
            self._apply_limits()
        elif self._tree.populated(name):
            # Something we do not hold runs in our leaf (a previous daemon's child that was not re-adopted):
            # starting a second server next to it would fight it for the port and the memory.
            raise FailedPrecondition(
                f"model {name}: cgroup leaf already holds processes {self._tree.pids(name)}",
                hint="re-adopt them, or stop the model to kill them",
            )

    async def _launch(self) -> bool:
        """From PENDING or BACKOFF: take the start slot, launch, go STARTING; False -> FAILED."""
        await self._acquire_gate()
        try:
            await self._prepare_leaf()
            launch = asyncio.ensure_future(self._launcher.launch(self.spec))
            try:
                child = await asyncio.shield(launch)
            except asyncio.CancelledError:
                # Stopped mid-launch: keep hold of what was started so stop() can account for it.
                with contextlib.suppress(Exception):
                    self._child = await launch
                raise
        except asyncio.CancelledError:
            self._release_gate()
            raise
        except Exception as exc:
            # A program that cannot be exec'd, a uid that cannot be taken, a leaf that cannot be made: a restart
            # cannot fix any of them.
            self._release_gate()
            self._transition(S.FAILED, f"cannot launch {self.spec.argv[0]}: {exc}")
            return False
        self._child, self.identity = child, child.identity
        self._transition(S.STARTING, f"launched pid {child.identity.pid}")
        return True

    async def _until_exit(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless the main process exits first (then _ChildExited, the awaitable cancelled)."""
        assert self._child is not None
        exited = self._child.exited()
        work = asyncio.ensure_future(awaitable)
        watched: set[asyncio.Future[Any]] = {work, exited}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await work
        if exited.done() and not exited.cancelled():
            raise _ChildExited(exited.result())
        return work.result()

    async def _wait_ready(self) -> str | None:
        """None once the probe passes; otherwise why the start failed."""
        deadline = self._clock() + self.start_timeout
        started = self._clock()
        while True:
            try:
                if await self._until_exit(
                    self._probe.ready(self.spec.port, self.spec.served_name, api_key=self.spec.api_key)
                ):
                    self.start_durations.append(self._clock() - started)
                    return None
                now = self._clock()
                remaining = deadline - now
                if remaining <= 0:
                    return f"not ready within {self.start_timeout:.0f} s (GET /health and /v1/models)"
                interval = min(READY_POLL_SECONDS, max(READY_POLL_MIN_SECONDS, READY_POLL_FRACTION * (now - started)))
                await self._until_exit(asyncio.sleep(min(interval, remaining)))
            except _ChildExited as exited:
                return f"exited during start: {exited.status.description}"

    async def _watch(self) -> str:
        """Liveness while READY/UNHEALTHY; returns why the child must be restarted."""
        health_failures = completion_failures = 0
        next_completion = self._clock() + self._completion_interval
        while True:
            try:
                await self._until_exit(asyncio.sleep(self._probe_interval))
                healthy = await self._until_exit(self._probe.health(self.spec.port))
                health_failures = 0 if healthy else health_failures + 1
                if (
                    healthy
                    and self._completion_interval > 0
                    and (completion_failures or self._clock() >= next_completion)
                ):
                    answered = await self._until_exit(
                        self._probe.completes(
                            self.spec.port,
                            self.spec.served_name,
                            api_key=self.spec.api_key,
                            timeout=self._completion_timeout,
                        )
                    )
                    completion_failures = 0 if answered else completion_failures + 1
                    next_completion = self._clock() + self._completion_interval
            except _ChildExited as exited:
                return f"exited unexpectedly: {exited.status.description}"
            if health_failures == 0 and completion_failures == 0:
                if self.state is S.UNHEALTHY:
                    self._transition(S.READY, "probes pass again")
                self.lifecycle.note_healthy(self._wall(), self._policy)
                continue
            if completion_failures:
                why = (
                    f"a one-token completion got no answer within {self._completion_timeout:g} s "
                    f"{completion_failures} times in a row (/health still says 200: the engine hangs)"
                )
                unhealthy, kill = completion_failures >= 1, completion_failures >= 1 + self._kill_after
            else:
                why = f"GET /health failed {health_failures} times in a row"
                unhealthy = health_failures >= self._unhealthy_after
                kill = health_failures >= self._unhealthy_after + self._kill_after
            if self.state is S.READY and unhealthy:
                self._transition(S.UNHEALTHY, why)
            elif self.state is S.UNHEALTHY and kill:
                return f"{why}; killing the hung server"

    async def _supervise(self, *, adopted: bool, launch: bool) -> None:
        try:
            if launch and not await self._launch():
                return
            while True:
                try:
                    failure = await self._wait_ready()
                finally:
                    self._release_gate()
                if failure is None:
                    how = "re-adopted child answers" if adopted else "GET /health 200 and /v1/models lists"
                    self._transition(S.READY, f"{how} {self.spec.served_name!r}")
                    failure = await self._watch()
                adopted = False
                # Whatever is left of this instance (an orphaned EngineCore, a hung server) goes before the next
                # start, so it can hold neither the port nor the GPU memory.
                await self._kill_leaf()
                self._transition(S.BACKOFF, failure)
                now = self._wall()
                if self.lifecycle.crash_looping(now, self._policy):
                    failures = self.lifecycle.recent_failures(now, self._policy)
                    self._transition(
                        S.FAILED,
                        f"crash loop: {failures} failures within {self._policy.window_seconds:.0f} s; last: {failure}"
                        f"\n--- last lines of {self.spec.log_path} ---\n{log_tail(self.spec.log_path)}",
                    )
                    return
                delay = backoff_delay(self._policy, self.lifecycle.recent_failures(now, self._policy), self._rng())
                await asyncio.sleep(delay)
                if not await self._launch():
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A supervisor bug or a cgroup that refuses: never leave a model silently unsupervised.
            _log.exception("model %s: supervision failed", self.spec.name)
            if self.state not in (S.FAILED, S.STOPPING, S.STOPPED):
                with contextlib.suppress(Exception):
                    await self._kill_leaf()
                self._transition(S.FAILED, f"supervision failed: {exc}")

    # ----------------------------------------------------------------------------------------------------------
    # Killing and stopping

    async def _kill_leaf(self) -> None:
        """cgroup.kill the leaf, wait until cgroup.events says empty, and reap the main process."""
        name = self.spec.name
        if name in self._tree.leaves():
            if self._tree.populated(name):
                self._tree.kill(name)
            if not await asyncio.to_thread(self._tree.wait_empty, name, EMPTY_TIMEOUT_SECONDS):
                raise FailedPrecondition(
                    f"model {name}: processes {self._tree.pids(name)} outlived cgroup.kill for "
                    f"{EMPTY_TIMEOUT_SECONDS:.0f} s (stuck in the driver?)",
                    hint="the partition may still hold memory; check dmesg before reusing it",
                )
        child, self._child = self._child, None
        if child is not None:
            # The leaf is empty, so the main process has exited; wait for the pidfd to say so (and reap it).
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.exited()), EMPTY_TIMEOUT_SECONDS)
            child.close()

    async def _cancel_task(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _stop(self, grace: float) -> None:
        await self._cancel_task()
        self._release_gate()
        if self.state is not S.STOPPING:
            self._transition(S.STOPPING, "stop requested")
        how = "leaf was empty"
        child = self._child
        if child is not None and not child.exited().done():
            how = "exited after SIGTERM"
            if child.send_signal(signal.SIGTERM):
                try:
                    await asyncio.wait_for(asyncio.shield(child.exited()), grace)
                except TimeoutError:
                    how = f"still running {grace:g} s after SIGTERM: cgroup.kill"
        elif child is not None:
            how = "had already exited"
        try:
            await self._kill_leaf()
            self._tree.remove_leaf(self.spec.name)
        except Exception as exc:
            self.lifecycle.last_error = f"stop: {exc}"
            raise
        self._transition(S.STOPPED, f"stopped: main process {how}; cgroup leaf emptied and removed")
