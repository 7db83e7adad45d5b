"""Allocations and their placement: which partitions and how much pool memory a workload gets.

Placement is a pure function of the observed inventory, the current allocations and the
request, so the same inputs always give the same answer and every rule is testable without a GPU.

Memory is accounted per memory pool, not per partition. In NPS1 every partition of a GPU draws
on one pool of the whole HBM; a CPX partition's 24 GiB is a cap on one workload, not memory of
its own. In NPS4 each IOD's quadrant is a pool. A request is refused when a pool would be
overcommitted, when a partition's share exceeds its cap, or when a partition is already held:
one partition never serves two allocations.

Why spread places one XCD per IOD before doubling up: two CPX partitions on one IOD share that
IOD's HBM stacks and Infinity Fabric links, so a neighbour's memory traffic halves bandwidth;
spreading first keeps the quiet-neighbour case the common one. Pack does the opposite, leaving
whole GPUs (and IODs) free for large requests.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from gpushared.domain.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QuotaExceeded,
    ResourceExhausted,
)
from gpushared.domain.gpu import ComputePartition, GpuInfo, HostInventory, PartitionInfo, iod_of
from gpushared.domain.units import MAX_BYTES, format_bytes

MAX_PARTITIONS_PER_ALLOCATION = 64
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
ID_PATTERN = re.compile(r"^a-[0-9a-f]{12}$")


class PlacementPolicy(enum.StrEnum):
    SPREAD = "spread"
    PACK = "pack"


class AllocationState(enum.StrEnum):
    ACTIVE = "active"
    DEGRADED = "degraded"


class PartitionState(enum.StrEnum):
    FREE = "free"
    ALLOCATED = "allocated"
    DEGRADED = "degraded"


@dataclass(frozen=True, order=True)
class PartitionRef:
    """A partition by the GPU's primary BDF (stable across reboots and re-enumeration) and its id."""

    gpu_bdf: str
    partition_id: int


@dataclass(frozen=True)
class AllocationRequest:
    memory_bytes: int
    """Total memory the workload needs; split evenly over its partitions."""
    partition_count: int = 1
    gpu_index: int | None = None
    compute_partition: ComputePartition | None = None
    name: str = ""
    policy: PlacementPolicy | None = None
    """None means the daemon's configured default."""


@dataclass(frozen=True)
class Placement:
    partitions: tuple[PartitionRef, ...]
    memory_bytes_per_partition: int
    policy: PlacementPolicy
    reason: str


@dataclass(frozen=True)
class Allocation:
    id: str
    name: str
    owner_uid: int
    owner_gid: int
    partitions: tuple[PartitionRef, ...]
    memory_bytes_per_partition: int
    policy: PlacementPolicy
    placement_reason: str
    created_at: float
    """Unix time, seconds."""

    @property
    def memory_bytes_total(self) -> int:
        return self.memory_bytes_per_partition * len(self.partitions)


@dataclass(frozen=True)
class Quota:
    """Per-user limits; None means unlimited."""

    max_allocations: int | None = None
    max_memory_bytes: int | None = None


def validate_name(name: str) -> None:
    if name and not NAME_PATTERN.fullmatch(name):
        shown = name[:40].encode("unicode_escape").decode("ascii")
        raise InvalidArgument(
            f"name {shown!r}{'...' if len(name) > 40 else ''}: not a valid allocation name",
            hint="use 1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )


def validate_allocation_id(allocation_id: str) -> None:
    if not ID_PATTERN.fullmatch(allocation_id):
        shown = allocation_id[:40].encode("unicode_escape").decode("ascii")
        raise InvalidArgument(
            f"allocation id {shown!r}: not an allocation id",
            hint="ids look like a-0123456789ab; list them with `gpusharectl list`",
        )


def validate_request(request: AllocationRequest) -> None:
    if request.memory_bytes <= 0:
        raise InvalidArgument("memory: must be more than 0 bytes", hint="e.g. --memory 40GiB")
    if request.memory_bytes > MAX_BYTES:
        raise InvalidArgument("memory: larger than 16 EiB")
    if not 1 <= request.partition_count <= MAX_PARTITIONS_PER_ALLOCATION:
        raise InvalidArgument(
            f"partitions: {request.partition_count} is out of range",
            hint=f"ask for 1 to {MAX_PARTITIONS_PER_ALLOCATION} partitions",
        )
    validate_name(request.name)


def share_per_partition(memory_bytes: int, partition_count: int) -> int:
    """Each partition's share, rounded up so the shares never add up to less than was asked."""
    return -(-memory_bytes // partition_count)


def check_quota(held: Sequence[Allocation], request_total_bytes: int, quota: Quota, uid: int) -> None:
    if quota.max_allocations is not None and len(held) + 1 > quota.max_allocations:
        raise QuotaExceeded(
            f"user {uid}: quota allows {quota.max_allocations} allocations and you hold {len(held)}",
            hint="release one (gpusharectl release ID) or ask an admin to raise the quota",
        )
    if quota.max_memory_bytes is not None:
        held_bytes = sum(a.memory_bytes_total for a in held)
        if held_bytes + request_total_bytes > quota.max_memory_bytes:
            raise QuotaExceeded(
                f"user {uid}: quota allows {format_bytes(quota.max_memory_bytes)} and you hold "
                f"{format_bytes(held_bytes)}; {format_bytes(request_total_bytes)} more does not fit",
                hint="release an allocation or ask an admin to raise the quota",
            )


@dataclass
class _Usage:
    """Mutable scratch view of one GPU while a placement is being planned."""

    gpu: GpuInfo
    held: set[int] = field(default_factory=set)
    pool_used: dict[int, int] = field(default_factory=dict)
    allocated_bytes: int = 0

    def pool_free(self, partition_id: int) -> int:
        pool = self.gpu.pool_of(partition_id)
        return self.gpu.pool_total_bytes - self.pool_used.get(pool, 0)

    def iod_load(self, partition_id: int) -> int:
        iod = iod_of(partition_id, self.gpu.compute_partition)
        return sum(1 for p in self.held if iod_of(p, self.gpu.compute_partition) == iod)

    def take(self, partition_id: int, share: int) -> None:
        self.held.add(partition_id)
        pool = self.gpu.pool_of(partition_id)
        self.pool_used[pool] = self.pool_used.get(pool, 0) + share
        self.allocated_bytes += share


class Ledger:
    """Who holds which partition and how much of each pool is reserved, derived from allocations."""

    def __init__(
        self,
        inventory: HostInventory,
        allocations: Iterable[Allocation],
        degraded: Mapping[PartitionRef, str] | None = None,
        *,
        closed_gpus: Mapping[str, str] | None = None,
        degraded_gpus: Mapping[str, str] | None = None,
    ) -> None:
        """``closed_gpus`` (by BDF, with why) admit no new allocation: a partition operation is changing them;
        ``degraded_gpus`` are marked degraded until an admin clears them, and admit none either."""
        self.inventory = inventory
        self.allocations = {a.id: a for a in allocations}
        self.degraded = dict(degraded or {})
        self.degraded_gpus = dict(degraded_gpus or {})
        self.closed_gpus = {**dict(closed_gpus or {}), **self.degraded_gpus}
        self._holder: dict[PartitionRef, Allocation] = {}
        for allocation in self.allocations.values():
            for ref in allocation.partitions:
                self._holder[ref] = allocation

    def holder_of(self, ref: PartitionRef) -> Allocation | None:
        return self._holder.get(ref)

    def partition_state(self, ref: PartitionRef) -> PartitionState:
        if ref in self.degraded or ref.gpu_bdf in self.degraded_gpus:
            return PartitionState.DEGRADED
        if ref in self._holder:
            return PartitionState.ALLOCATED
        return PartitionState.FREE

    def allocation_state(self, allocation: Allocation) -> tuple[AllocationState, str]:
        """DEGRADED when a recorded partition no longer exists as recorded, or is marked degraded."""
        problems = []
        for ref in allocation.partitions:
            gpu = self.inventory.gpu_by_bdf(ref.gpu_bdf)
            if gpu is None:
                problems.append(f"GPU {ref.gpu_bdf} is not present")
            elif ref.partition_id >= len(gpu.partitions):
                problems.append(
                    f"GPU {gpu.index} ({ref.gpu_bdf}) has no partition {ref.partition_id} in {gpu.compute_partition}"
                )
            elif ref in self.degraded:
                problems.append(f"GPU {gpu.index} partition {ref.partition_id}: {self.degraded[ref]}")
            elif ref.gpu_bdf in self.degraded_gpus:
                problems.append(f"GPU {gpu.index} is degraded: {self.degraded_gpus[ref.gpu_bdf]}")
        if problems:
            return AllocationState.DEGRADED, "; ".join(problems)
        return AllocationState.ACTIVE, ""

    def pool_allocated(self, gpu: GpuInfo) -> dict[int, int]:
        used: dict[int, int] = {}
        for ref, allocation in self._holder.items():
            if ref.gpu_bdf == gpu.bdf and ref.partition_id < len(gpu.partitions):
                pool = gpu.pool_of(ref.partition_id)
                used[pool] = used.get(pool, 0) + allocation.memory_bytes_per_partition
        return used

    def _usage(self, gpu: GpuInfo) -> _Usage:
        usage = _Usage(gpu)
        for ref, allocation in self._holder.items():
            if ref.gpu_bdf == gpu.bdf and ref.partition_id < len(gpu.partitions):
                usage.take(ref.partition_id, allocation.memory_bytes_per_partition)
        return usage

    def place(self, request: AllocationRequest, default_policy: PlacementPolicy) -> Placement:
        """Choose partitions for a request, or raise saying exactly what is short."""
        validate_request(request)
        policy = request.policy or default_policy
        count = request.partition_count
        share = share_per_partition(request.memory_bytes, count)
        candidates = self._candidate_gpus(request)
        usages = [self._usage(gpu) for gpu in candidates]

        for usage in _gpu_order(usages, policy):
            picked = self._pick_on_gpu(usage, count, share, policy)
            if picked is not None:
                gpu = usage.gpu
                reason = _reason_single(gpu, picked, policy, usage, share)
                refs = tuple(PartitionRef(gpu.bdf, p) for p in picked)
                return Placement(refs, share, policy, reason)

        if request.gpu_index is None and count > 1:
            spanned = self._pick_across_gpus(usages, count, share, policy)
            if spanned is not None:
                gpus = sorted({ref.gpu_bdf for ref in spanned})
                reason = (
                    f"{policy}: no single GPU has {count} free partitions with "
                    f"{format_bytes(share)} each, so the allocation spans {len(gpus)} GPUs"
                )
                return Placement(tuple(spanned), share, policy, reason)

        raise self._refusal(candidates, count, share)

    def _candidate_gpus(self, request: AllocationRequest) -> list[GpuInfo]:
        gpus = list(self.inventory.gpus)
        if request.gpu_index is not None:
            gpus = [g for g in gpus if g.index == request.gpu_index]
            if not gpus:
                last = len(self.inventory.gpus) - 1
                raise NotFound(
                    f"gpu {request.gpu_index}: no such GPU",
                    hint=f"this host has GPUs 0-{last}" if last >= 0 else "this host has no GPUs",
                )
            if gpus[0].bdf in self.closed_gpus:
                raise FailedPrecondition(
                    f"gpu {request.gpu_index}: admits no allocation now: {self.closed_gpus[gpus[0].bdf]}",
                    hint="pick another GPU, or wait (see `gpusharectl status`)",
                )
        gpus = [g for g in gpus if g.bdf not in self.closed_gpus]
        if request.compute_partition is not None:
            matching = [g for g in gpus if g.compute_partition == request.compute_partition]
            if not matching:
                modes = ", ".join(f"GPU {g.index} {g.compute_partition}" for g in gpus)
                raise FailedPrecondition(
                    f"compute partition {request.compute_partition}: no candidate GPU is in that mode ({modes})",
                    hint="drop --compute, or change the partition layout first",
                )
            gpus = matching
        return gpus

    def _usable(self, usage: _Usage, partition: PartitionInfo, share: int) -> bool:
        ref = PartitionRef(usage.gpu.bdf, partition.partition_id)
        return (
            partition.partition_id not in usage.held
            and ref not in self.degraded
            and partition.memory_total_bytes >= share
            and usage.pool_free(partition.partition_id) >= share
        )

    def _pick_on_gpu(self, usage: _Usage, count: int, share: int, policy: PlacementPolicy) -> list[int] | None:
        trial = _Usage(usage.gpu, set(usage.held), dict(usage.pool_used), usage.allocated_bytes)
        picked: list[int] = []
        for _ in range(count):
            options = [p for p in usage.gpu.partitions if self._usable(trial, p, share)]
            if not options:
                return None
            best = min(options, key=lambda p: _partition_key(trial, p.partition_id, policy))
            trial.take(best.partition_id, share)
            picked.append(best.partition_id)
        return picked

    def _pick_across_gpus(
        self, usages: list[_Usage], count: int, share: int, policy: PlacementPolicy
    ) -> list[PartitionRef] | None:
        # With equal shares, taking any usable partition removes exactly one unit of capacity,
        # so this greedy pass finds `count` partitions whenever that many fit anywhere.
        trials = [_Usage(u.gpu, set(u.held), dict(u.pool_used), u.allocated_bytes) for u in usages]
        picked: list[PartitionRef] = []
        for _ in range(count):
            choice: tuple[_Usage, int] | None = None
            for trial in _gpu_order(trials, policy):
                options = [p for p in trial.gpu.partitions if self._usable(trial, p, share)]
                if options:
                    best = min(options, key=lambda p: _partition_key(trial, p.partition_id, policy))
                    choice = (trial, best.partition_id)
                    break
            if choice is None:
                return None
            trial, partition_id = choice
            trial.take(partition_id, share)
            picked.append(PartitionRef(trial.gpu.bdf, partition_id))
        return picked

    def _refusal(self, gpus: list[GpuInfo], count: int, share: int) -> ResourceExhausted:
        if not gpus:
            closed = "; ".join(f"{bdf}: {why}" for bdf, why in sorted(self.closed_gpus.items()))
            return ResourceExhausted(
                "no GPU is available to this daemon" + (f" (closed: {closed})" if closed else ""),
                hint="check `gpusharectl gpus` and `gpusharectl status`",
            )
        caps = [(p.memory_total_bytes, g) for g in gpus for p in g.partitions]
        largest_cap, cap_gpu = max(caps, key=lambda c: (c[0], -c[1].index))
        each = f" each ({format_bytes(share * count)} over {count} partitions)" if count > 1 else ""
        if share > largest_cap:
            return ResourceExhausted(
                f"memory: {format_bytes(share)}{each} exceeds the largest partition cap, "
                f"{format_bytes(largest_cap)} on GPU {cap_gpu.index} ({cap_gpu.compute_partition})",
                hint="ask for less memory or split it over more partitions (--partitions N)",
            )
        free = [
            (g, p)
            for g in gpus
            for p in g.partitions
            if self.partition_state(PartitionRef(g.bdf, p.partition_id)) == PartitionState.FREE
        ]
        if len(free) < count:
            total = sum(len(g.partitions) for g in gpus)
            return ResourceExhausted(
                f"partitions: {count} needed but only {len(free)} of {total} are free",
                hint="release an allocation, or ask for fewer partitions",
            )
        best_free, best_gpu, best_pool = 0, gpus[0], 0
        for gpu in gpus:
            used = self.pool_allocated(gpu)
            for pool in range(gpu.pool_count):
                pool_free = gpu.pool_total_bytes - used.get(pool, 0)
                if pool_free > best_free:
                    best_free, best_gpu, best_pool = pool_free, gpu, pool
        pool_name = f" pool {best_pool}" if best_gpu.pool_count > 1 else ""
        if count == 1:
            return ResourceExhausted(
                f"memory: no GPU has {format_bytes(share)} free in one pool; largest free: "
                f"{format_bytes(best_free)} on GPU {best_gpu.index}{pool_name}",
                hint="release an allocation or ask for less memory",
            )
        return ResourceExhausted(
            f"memory: no {count} free partitions have {format_bytes(share)}{each} of pool memory; "
            f"largest free pool: {format_bytes(best_free)} on GPU {best_gpu.index}{pool_name}",
            hint="release an allocation, ask for less memory, or use fewer partitions",
        )


def _gpu_order(usages: list[_Usage], policy: PlacementPolicy) -> list[_Usage]:
    if policy is PlacementPolicy.SPREAD:
        return sorted(usages, key=lambda u: (u.allocated_bytes, len(u.held), u.gpu.index))
    return sorted(usages, key=lambda u: (-len(u.held), -u.allocated_bytes, u.gpu.index))


def _partition_key(usage: _Usage, partition_id: int, policy: PlacementPolicy) -> tuple[int, ...]:
    if policy is PlacementPolicy.SPREAD:
        pool_used = usage.pool_used.get(usage.gpu.pool_of(partition_id), 0)
        return (usage.iod_load(partition_id), pool_used, partition_id)
    return (partition_id,)


def _reason_single(gpu: GpuInfo, picked: list[int], policy: PlacementPolicy, before: _Usage, share: int) -> str:
    parts = ", ".join(str(p) for p in picked)
    noun = "partition" if len(picked) == 1 else "partitions"
    where = f"GPU {gpu.index} {noun} {parts} ({gpu.compute_partition}/{gpu.memory_partition})"
    if policy is PlacementPolicy.SPREAD:
        why = (
            f"spread: least-loaded GPU that fits ({format_bytes(before.allocated_bytes)} already allocated, "
            f"{len(before.held)} of {len(gpu.partitions)} partitions held)"
        )
        if len(gpu.partitions) > 1:
            why += "; partitions chosen one XCD per IOD before doubling up"
    else:
        why = f"pack: busiest GPU that fits ({len(before.held)} of {len(gpu.partitions)} partitions held); lowest free partition first"
    return f"{where}: {why}; {format_bytes(share)} per partition"
