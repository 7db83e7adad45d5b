"""Partition layouts and plans: what a compute/memory partition change touches, drains and produces (pure).

A plan is computed from an observed inventory, the allocations, the models on them and the processes
holding the devices; nothing here reads hardware. The order of steps follows mi300x.md §3.2 and §3.3:
memory partition (NPS) first, which is hive-wide and needs a driver reload that resets every GPU's compute
partition to the AUTO mode for the new NPS; then the compute partition on each GPU's primary partition.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gpushared.domain.allocation import Allocation
from gpushared.domain.errors import InvalidArgument, NotFound
from gpushared.domain.gpu import (
    AMD_VALIDATED,
    VALID_COMBINATIONS,
    ComputePartition,
    GpuInfo,
    HostInventory,
    MemoryPartition,
)
from gpushared.domain.units import format_bytes


@dataclass(frozen=True)
class GpuLayout:
    """One GPU's compute partition and memory partition."""

    compute: ComputePartition
    memory: MemoryPartition

    def __str__(self) -> str:
        return f"{self.compute}/{self.memory}"

    @staticmethod
    def of(gpu: GpuInfo) -> GpuLayout:
        return GpuLayout(gpu.compute_partition, gpu.memory_partition)


def check_combination(compute: ComputePartition, memory: MemoryPartition) -> list[str]:
    """Refuse a combination the kernel does not allow (mi300x.md §1.4); return warnings for allowed ones
    AMD has not validated on MI300X."""
    if memory not in VALID_COMBINATIONS[compute]:
        allowed = " or ".join(sorted(VALID_COMBINATIONS[compute]))
        takes = " or ".join(sorted(c for c, mems in VALID_COMBINATIONS.items() if memory in mems))
        raise InvalidArgument(
            f"layout {compute}/{memory}: {compute} needs memory partition {allowed}",
            hint=f"{memory} works with {takes} (AMD validates CPX/NPS4); the plan sets the memory partition "
            "before the compute partition, so going back to SPX only needs --memory NPS1",
        )
    if (compute, memory) not in AMD_VALIDATED:
        return [
            f"{compute}/{memory} is allowed by the kernel but not validated by AMD on MI300X "
            "(validated: SPX/NPS1 and CPX/NPS4)"
        ]
    return []


def parse_gpu_set(text: str, gpu_count: int) -> tuple[int, ...]:
    """``all`` or a list like ``0,2-3`` -> sorted GPU indices, each checked against the host."""
    text = text.strip()
    if text == "all":
        return tuple(range(gpu_count))
    picked: set[int] = set()
    for item in text.split(","):
        low_text, dash, high_text = item.strip().partition("-")
        try:
            low = int(low_text)
            high = int(high_text) if dash else low
        except ValueError:
            raise InvalidArgument(
                f"gpus {text[:40]!r}: {item.strip()[:20]!r} is not a GPU index or range",
                hint="use all, or indices and ranges such as 0,2-3",
            ) from None
        if low > high:
            raise InvalidArgument(f"gpus {text[:40]!r}: range {low}-{high} runs backwards")
        picked.update(range(low, high + 1))
    outside = sorted(i for i in picked if not 0 <= i < gpu_count)
    if outside:
        raise NotFound(
            f"gpu {outside[0]}: no such GPU",
            hint=f"this host has GPUs 0-{gpu_count - 1}" if gpu_count else "this host has no GPUs",
        )
    return tuple(sorted(picked))


@dataclass(frozen=True)
class LayoutRequest:
    """Put ``gpus`` in ``compute``; ``memory`` None keeps the memory partition the host has."""

    gpus: tuple[int, ...]
    compute: ComputePartition
    memory: MemoryPartition | None = None


class StepKind(enum.StrEnum):
    """The steps of an apply, in the order they run."""

    FENCE = "fence"
    DRAIN = "drain"
    CLEAR_HOLDERS = "clear_holders"
    SET_MEMORY = "set_memory"
    RELOAD_DRIVER = "reload_driver"
    SET_COMPUTE = "set_compute"
    REENUMERATE = "reenumerate"
    VERIFY = "verify"
    RESTORE = "restore"


STEP_ORDER: tuple[StepKind, ...] = tuple(StepKind)


@dataclass(frozen=True)
class PlanStep:
    kind: StepKind
    gpus: tuple[int, ...]
    description: str


@dataclass(frozen=True)
class GpuChange:
    """One GPU the plan touches: its layout before and after, and what it exposes afterwards."""

    gpu_index: int
    gpu_bdf: str
    before: GpuLayout
    after: GpuLayout
    why: str
    """"requested", or why a GPU outside the request is touched (the hive-wide memory partition)."""
    partitions_after: int
    pools_after: int
    pool_bytes_after: int
    """Memory of one pool afterwards: the most any one partition can be given (partitions of a pool share it)."""


@dataclass(frozen=True)
class DeviceHolder:
    """A process holding a logical device, as the per-device process list reports it, with who runs it."""

    pid: int
    uid: int
    user: str
    command: str
    gpu_index: int
    partition_id: int
    vram_bytes: int
    model: str = ""
    """The served model whose cgroup leaf the process is in; empty for a process gpushared does not run."""

    def describe(self) -> str:
        who = f"model {self.model}" if self.model else f"{self.user} (uid {self.uid})"
        return f"pid {self.pid} {self.command[:60]!r} of {who} on GPU {self.gpu_index} partition {self.partition_id}"


@dataclass(frozen=True)
class AffectedAllocation:
    allocation_id: str
    name: str
    owner_uid: int
    model: str
    """The served model on it (drained and restarted by the apply); empty for a bare allocation."""
    gpus: tuple[int, ...]


@dataclass(frozen=True)
class PartitionPlan:
    """What an apply of ``request`` would do; computing it has no side effects."""

    request: LayoutRequest
    changes: tuple[GpuChange, ...]
    steps: tuple[PlanStep, ...]
    allocations: tuple[AffectedAllocation, ...]
    holders: tuple[DeviceHolder, ...]
    holder_services: tuple[str, ...]
    warnings: tuple[str, ...]

    @property
    def noop(self) -> bool:
        return not self.changes

    @property
    def memory_change(self) -> bool:
        return any(c.before.memory != c.after.memory for c in self.changes)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(a.model for a in self.allocations if a.model)

    @property
    def touched_bdfs(self) -> tuple[str, ...]:
        return tuple(c.gpu_bdf for c in self.changes)

    def blockers(self, *, drain: bool) -> list[str]:
        """Why an apply must be refused: bare allocations always (gpushared cannot stop what it does not run);
        models and their processes unless ``drain``; foreign device holders always, unless a configured
        device-holder service may be what holds them."""
        found = [
            f"allocation {a.allocation_id} ({a.name or 'unnamed'}, uid {a.owner_uid}) on GPU "
            f"{', '.join(map(str, a.gpus))}: release it first"
            for a in self.allocations
            if not a.model
        ]
        if not drain:
            found += [
                f"model {a.model} on GPU {', '.join(map(str, a.gpus))}: runs there (pass --drain to stop it and "
                "restart it on the new layout)"
                for a in self.allocations
                if a.model
            ]
        if not self.holder_services:
            found += [f"{h.describe()}: holds the device; stop it first" for h in self.holders if not h.model]
        return found


def _pool_bytes(gpu: GpuInfo, memory: MemoryPartition) -> int:
    return gpu.memory_total_bytes // memory.pool_count


def plan_partitions(
    inventory: HostInventory,
    request: LayoutRequest,
    *,
    allocations: Iterable[Allocation],
    models_on: Mapping[str, str],
    holders: Sequence[DeviceHolder],
    holder_services: Sequence[str] = (),
) -> PartitionPlan:
    """The plan to bring ``request.gpus`` to the requested layout.

    A memory partition change applies to every GPU of the hive at the driver reload (mi300x.md §1.3, §3.3 4.),
    which also resets every GPU's compute partition to the AUTO mode for the new NPS (§3.4); so GPUs outside
    the request are touched too, and are put back in their current compute partition, which must be valid
    under the new memory partition.
    """
    gpus = {g.index: g for g in inventory.gpus}
    for index in request.gpus:
        if index not in gpus:
            raise NotFound(f"gpu {index}: no such GPU", hint=f"this host has GPUs 0-{len(gpus) - 1}")
    if not request.gpus:
        raise InvalidArgument("gpus: the request names no GPU", hint="use --gpus all or a list such as 0,2-3")
    current_memory = {g.memory_partition for g in inventory.gpus}
    memory = request.memory or (
        next(iter(current_memory)) if len(current_memory) == 1 else gpus[request.gpus[0]].memory_partition
    )
    warnings = check_combination(request.compute, memory)
    for index in request.gpus:
        gpu = gpus[index]
        if gpu.available_memory_partitions and memory not in gpu.available_memory_partitions:
            raise InvalidArgument(
                f"gpu {index}: memory partition {memory} is not among its capabilities "
                f"({', '.join(gpu.available_memory_partitions)})",
            )
    memory_changes = any(g.memory_partition != memory for g in inventory.gpus)

    changes: list[GpuChange] = []
    for gpu in inventory.gpus:
        before = GpuLayout.of(gpu)
        if gpu.index in request.gpus:
            after, why = GpuLayout(request.compute, memory), "requested"
        elif memory_changes:
            if memory not in VALID_COMBINATIONS[gpu.compute_partition]:
                raise InvalidArgument(
                    f"gpu {gpu.index}: the memory partition change to {memory} applies to every GPU of the hive, "
                    f"and GPU {gpu.index}'s compute partition {gpu.compute_partition} is not valid with it",
                    hint=f"include GPU {gpu.index} in --gpus (e.g. --gpus all) with a compute partition valid "
                    f"under {memory}",
                )
            after, why = GpuLayout(gpu.compute_partition, memory), "the memory partition is hive-wide"
        else:
            continue
        if after == before and not memory_changes:
            continue
        changes.append(
            GpuChange(
                gpu.index,
                gpu.bdf,
                before,
                after,
                why,
                after.compute.partition_count,
                memory.pool_count,
                _pool_bytes(gpu, memory),
            )
        )
    if memory_changes:
        warnings.append(
            f"the memory partition change to {memory} applies to all {len(inventory.gpus)} GPUs of the hive and "
            "needs a driver reload (up to 140 s), during which no GPU can be used"
        )

    touched = {c.gpu_bdf: c.gpu_index for c in changes}
    affected = tuple(
        AffectedAllocation(
            a.id,
            a.name,
            a.owner_uid,
            models_on.get(a.id, ""),
            tuple(sorted({touched[r.gpu_bdf] for r in a.partitions if r.gpu_bdf in touched})),
        )
        for a in sorted(allocations, key=lambda a: (a.created_at, a.id))
        if any(r.gpu_bdf in touched for r in a.partitions)
    )
    touched_indices = set(touched.values())
    on_touched = tuple(h for h in holders if h.gpu_index in touched_indices)

    steps = _steps(changes, affected, on_touched, tuple(holder_services), memory if memory_changes else None)
    return PartitionPlan(
        request=request,
        changes=tuple(changes),
        steps=steps,
        allocations=affected,
        holders=on_touched,
        holder_services=tuple(holder_services),
        warnings=tuple(warnings),
    )


def _steps(
    changes: Sequence[GpuChange],
    affected: Sequence[AffectedAllocation],
    holders: Sequence[DeviceHolder],
    holder_services: tuple[str, ...],
    new_memory: MemoryPartition | None,
) -> tuple[PlanStep, ...]:
    if not changes:
        return ()
    all_touched = tuple(c.gpu_index for c in changes)
    models = [a.model for a in affected if a.model]
    steps = [
        PlanStep(StepKind.FENCE, all_touched, f"stop admitting allocations on GPU {gpu_ranges(all_touched)}"),
        PlanStep(
            StepKind.DRAIN,
            all_touched,
            f"stop model {', '.join(models)} (grace period, then cgroup kill) and release its partitions"
            if models
            else "no model to stop",
        ),
        PlanStep(
            StepKind.CLEAR_HOLDERS,
            all_touched,
            (f"stop {', '.join(holder_services)}; " if holder_services else "")
            + "check that no process holds a device"
            + (f" ({len(holders)} now)" if holders else ""),
        ),
    ]
    if new_memory is not None:
        steps += [
            PlanStep(
                StepKind.SET_MEMORY,
                all_touched,
                f"set memory partition {new_memory} on each GPU's primary partition (staged until the reload)",
            ),
            PlanStep(
                StepKind.RELOAD_DRIVER,
                all_touched,
                "reload the amdgpu driver (every GPU of the hive; compute partitions reset to AUTO)",
            ),
        ]
    compute = [c for c in changes if new_memory is not None or c.before.compute != c.after.compute]
    by_compute: dict[str, list[int]] = {}
    for c in compute:
        by_compute.setdefault(str(c.after.compute), []).append(c.gpu_index)
    by_layout: dict[str, list[int]] = {}
    for c in changes:
        by_layout.setdefault(f"{c.after} ({c.partitions_after} partitions each)", []).append(c.gpu_index)
    steps += [
        PlanStep(
            StepKind.SET_COMPUTE,
            tuple(c.gpu_index for c in compute),
            "set compute partition "
            + ", ".join(f"{mode} on GPU {gpu_ranges(gpus)}" for mode, gpus in by_compute.items())
            + " through each primary partition (where it differs)",
        ),
        PlanStep(StepKind.REENUMERATE, all_touched, "shut down and re-initialise amdsmi; enumerate every device"),
        PlanStep(
            StepKind.VERIFY,
            all_touched,
            "check the observed layout: "
            + ", ".join(f"GPU {gpu_ranges(gpus)} {what}" for what, gpus in by_layout.items()),
        ),
        PlanStep(
            StepKind.RESTORE,
            all_touched,
            (f"restart model {', '.join(models)} on the new layout; " if models else "")
            + (f"start {', '.join(holder_services)}; " if holder_services else "")
            + "admit allocations again",
        ),
    ]
    return tuple(steps)


def gpu_ranges(indices: Iterable[int]) -> str:
    """0,1,2,3,5 -> "0-3, 5"."""
    ordered = sorted(set(indices))
    runs: list[str] = []
    start = previous = None
    for index in [*ordered, None]:
        if index is not None and previous is not None and index == previous + 1:
            previous = index
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = index
    return ", ".join(runs)


def describe_change(change: GpuChange) -> str:
    return (
        f"GPU {change.gpu_index}: {change.before} -> {change.after}, {change.partitions_after} partitions, "
        f"{change.pools_after} pool(s) of {format_bytes(change.pool_bytes_after)} ({change.why})"
    )


def layout_drift(
    inventory: HostInventory, desired: Mapping[int, GpuLayout], last_set: Mapping[int, GpuLayout]
) -> list[str]:
    """Where the hardware differs from the configured layout or from what gpushared last set (someone ran
    amd-smi by hand, a reload reverted a compute partition). Reported, never fixed behind models' backs."""
    found = []
    for gpu in inventory.gpus:
        observed = GpuLayout.of(gpu)
        if gpu.index in last_set and last_set[gpu.index] != observed:
            found.append(f"GPU {gpu.index}: is {observed}, but gpushared last set {last_set[gpu.index]}")
        elif gpu.index in desired and desired[gpu.index] != observed:
            found.append(f"GPU {gpu.index}: is {observed}, the configured layout says {desired[gpu.index]}")
    return found
