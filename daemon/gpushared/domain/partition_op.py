"""A partition operation: its journal record, the states it goes through and the one table of allowed transitions.

The record is what the journal stores before and after each step, so a daemon that dies mid-operation can read
it back and finish the operation or roll it back (services/partitions.py). Pure: JSON in, JSON out.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field, replace
from typing import Any

from gpushared.domain.errors import IllegalTransition, StateError
from gpushared.domain.gpu import ComputePartition, MemoryPartition
from gpushared.domain.partitioning import STEP_ORDER, GpuLayout, LayoutRequest, StepKind


class OperationState(enum.StrEnum):
    RUNNING = "running"
    ROLLING_BACK = "rolling_back"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    """Did not happen: the hardware is as it was before (nothing changed, or rolled back)."""
    DEGRADED = "degraded"
    """Could not be rolled back: some GPUs are marked degraded and excluded until an admin clears them."""


S = OperationState
TRANSITIONS: dict[OperationState, frozenset[OperationState]] = {
    S.RUNNING: frozenset({S.SUCCEEDED, S.ROLLING_BACK}),
    S.ROLLING_BACK: frozenset({S.FAILED, S.DEGRADED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset(),
    S.DEGRADED: frozenset(),
}
FINISHED = frozenset({S.SUCCEEDED, S.FAILED, S.DEGRADED})


@dataclass(frozen=True)
class OperationEvent:
    at: float
    text: str


@dataclass(frozen=True)
class PartitionOperation:
    """One apply, as journaled. ``step``/``step_done`` say where it is: the step last started, and whether it
    finished; steps are idempotent, so a resumed operation runs an unfinished step again."""

    id: str
    request: LayoutRequest
    drain: bool
    requested_by: int
    created_at: float
    before: dict[str, GpuLayout]
    """Layout of every touched GPU (by BDF) before the operation: what a rollback restores."""
    after: dict[str, GpuLayout]
    """Planned layout of every touched GPU (by BDF)."""
    gpu_index: dict[str, int]
    state: OperationState = OperationState.RUNNING
    step: StepKind | None = None
    step_done: bool = False
    drained_models: tuple[str, ...] = ()
    stopped_services: tuple[str, ...] = ()
    failed_step: StepKind | None = None
    error: str = ""
    progress: str = ""
    finished_at: float | None = None
    events: tuple[OperationEvent, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.state in FINISHED

    def next_step(self) -> StepKind | None:
        """The step to run now: the unfinished one, else the one after the last finished; None when done."""
        if self.step is None:
            return STEP_ORDER[0]
        if not self.step_done:
            return self.step
        index = STEP_ORDER.index(self.step) + 1
        return STEP_ORDER[index] if index < len(STEP_ORDER) else None

    def log(self, at: float, text: str) -> PartitionOperation:
        # Bounded: an operation that retries a step for an hour must not grow its journal record without end.
        return replace(self, events=(*self.events, OperationEvent(at, text))[-100:], progress=text)

    def starting(self, step: StepKind, at: float, text: str) -> PartitionOperation:
        return replace(self.log(at, text), step=step, step_done=False)

    def done(self, step: StepKind, at: float, text: str) -> PartitionOperation:
        if self.step is not step:
            raise IllegalTransition(f"operation {self.id}: finished step {step} but {self.step} was started")
        return replace(self.log(at, text), step_done=True)

    def moved(self, target: OperationState, at: float, text: str) -> PartitionOperation:
        if target not in TRANSITIONS[self.state]:
            raise IllegalTransition(f"operation {self.id}: {self.state} -> {target} is not allowed ({text})")
        finished_at = at if target in FINISHED else None
        return replace(self.log(at, text), state=target, finished_at=finished_at)

    def failing(self, step: StepKind | None, at: float, error: str) -> PartitionOperation:
        moved = self.moved(S.ROLLING_BACK, at, f"failed: {error}; rolling back")
        return replace(moved, failed_step=step, error=error)

    # -- journal encoding ------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "id": self.id,
                "request": {
                    "gpus": list(self.request.gpus),
                    "compute": str(self.request.compute),
                    "memory": str(self.request.memory) if self.request.memory else None,
                },
                "drain": self.drain,
                "requested_by": self.requested_by,
                "created_at": self.created_at,
                "before": {bdf: str(layout) for bdf, layout in self.before.items()},
                "after": {bdf: str(layout) for bdf, layout in self.after.items()},
                "gpu_index": self.gpu_index,
                "state": str(self.state),
                "step": str(self.step) if self.step else None,
                "step_done": self.step_done,
                "drained_models": list(self.drained_models),
                "stopped_services": list(self.stopped_services),
                "failed_step": str(self.failed_step) if self.failed_step else None,
                "error": self.error,
                "progress": self.progress,
                "finished_at": self.finished_at,
                "events": [[e.at, e.text] for e in self.events],
            },
            sort_keys=True,
        )

    @staticmethod
    def from_json(text: str) -> PartitionOperation:
        try:
            data: dict[str, Any] = json.loads(text)
            request = data["request"]
            return PartitionOperation(
                id=str(data["id"]),
                request=LayoutRequest(
                    tuple(int(i) for i in request["gpus"]),
                    ComputePartition(request["compute"]),
                    MemoryPartition(request["memory"]) if request["memory"] else None,
                ),
                drain=bool(data["drain"]),
                requested_by=int(data["requested_by"]),
                created_at=float(data["created_at"]),
                before={str(k): parse_layout(v) for k, v in data["before"].items()},
                after={str(k): parse_layout(v) for k, v in data["after"].items()},
                gpu_index={str(k): int(v) for k, v in data["gpu_index"].items()},
                state=OperationState(data["state"]),
                step=StepKind(data["step"]) if data["step"] else None,
                step_done=bool(data["step_done"]),
                drained_models=tuple(str(m) for m in data["drained_models"]),
                stopped_services=tuple(str(s) for s in data["stopped_services"]),
                failed_step=StepKind(data["failed_step"]) if data["failed_step"] else None,
                error=str(data["error"]),
                progress=str(data["progress"]),
                finished_at=None if data["finished_at"] is None else float(data["finished_at"]),
                events=tuple(OperationEvent(float(at), str(t)) for at, t in data["events"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(f"partition operation journal: unreadable record ({exc!r})") from exc


def parse_layout(text: str) -> GpuLayout:
    compute, _, memory = text.partition("/")
    return GpuLayout(ComputePartition(compute), MemoryPartition(memory))
