"""MI300X vocabulary and observed hardware facts: compute partitions, memory partitions, XCPs, memory pools."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

MIB = 1024 * 1024
GIB = 1024 * MIB

XCDS_PER_GPU = 8
"""An MI300X has 8 XCDs (one XCC each), stacked two per IOD."""
IODS_PER_GPU = 4


class ComputePartition(enum.StrEnum):
    """Compute (accelerator) partition mode of one GPU; TPX does not exist on an 8-XCD part."""

    SPX = "SPX"
    DPX = "DPX"
    QPX = "QPX"
    CPX = "CPX"

    @property
    def partition_count(self) -> int:
        """How many logical devices (XCPs) the GPU exposes in this mode."""
        return _PARTITIONS[self]

    @property
    def xcds_per_partition(self) -> int:
        return XCDS_PER_GPU // self.partition_count


_PARTITIONS = {
    ComputePartition.SPX: 1,
    ComputePartition.DPX: 2,
    ComputePartition.QPX: 4,
    ComputePartition.CPX: 8,
}


class MemoryPartition(enum.StrEnum):
    """Memory partition (NPS) mode; NPS8 is defined by amdsmi but unsupported on MI300X."""

    NPS1 = "NPS1"
    NPS2 = "NPS2"
    NPS4 = "NPS4"

    @property
    def pool_count(self) -> int:
        """How many memory pools (NUMA ranges) the GPU's HBM is split into."""
        return _POOLS[self]


_POOLS = {MemoryPartition.NPS1: 1, MemoryPartition.NPS2: 2, MemoryPartition.NPS4: 4}

VALID_COMBINATIONS: dict[ComputePartition, frozenset[MemoryPartition]] = {
    # The kernel's rule (aqua_vanjaram.c __aqua_vanjaram_get_px_mode_info), bare metal.
    ComputePartition.SPX: frozenset({MemoryPartition.NPS1}),
    ComputePartition.DPX: frozenset({MemoryPartition.NPS1, MemoryPartition.NPS2}),
    ComputePartition.QPX: frozenset({MemoryPartition.NPS1, MemoryPartition.NPS4}),
    ComputePartition.CPX: frozenset({MemoryPartition.NPS1, MemoryPartition.NPS4}),
}

AMD_VALIDATED: frozenset[tuple[ComputePartition, MemoryPartition]] = frozenset(
    {
        # What AMD's compatibility matrix validates on MI300X (mi300x.md §1.4: SPX+NPS1 and CPX+NPS4 from
        # ROCm 6.4; CPX+NPS1 is validated on MI300A only); the rest the kernel merely allows.
        (ComputePartition.SPX, MemoryPartition.NPS1),
        (ComputePartition.CPX, MemoryPartition.NPS4),
    }
)


def is_valid_combination(compute: ComputePartition, memory: MemoryPartition) -> bool:
    return memory in VALID_COMBINATIONS[compute]


def auto_compute_partition(memory: MemoryPartition) -> ComputePartition:
    """The compute mode the driver picks at load with user_partt_mode=AUTO (NPS1→SPX, NPS2→DPX, NPS4→CPX)."""
    return {
        MemoryPartition.NPS1: ComputePartition.SPX,
        MemoryPartition.NPS2: ComputePartition.DPX,
        MemoryPartition.NPS4: ComputePartition.CPX,
    }[memory]


def pool_of(partition_id: int, compute: ComputePartition, memory: MemoryPartition) -> int:
    """Memory pool that backs a partition.

    XCPs are numbered along the IODs (two XCDs per IOD) and an NPS4 quadrant is one IOD's pair of
    HBM stacks, so partition p of n draws on pool ``p * pools // n``.
    """
    return partition_id * memory.pool_count // compute.partition_count


def iod_of(partition_id: int, compute: ComputePartition) -> int:
    """First IOD a partition's XCDs sit on (CPX: two partitions per IOD; SPX/DPX span several)."""
    return partition_id * compute.xcds_per_partition // 2


@dataclass(frozen=True)
class DeviceProcess:
    """A process that holds a logical device, as the per-device process list reports it."""

    pid: int
    name: str
    vram_bytes: int


@dataclass(frozen=True)
class PartitionInfo:
    """One logical device (XCP) as the hardware reports it."""

    gpu_index: int
    partition_id: int
    bdf: str
    uuid: str
    render_minor: int
    card_minor: int
    hip_index: int
    kfd_id: int
    node_id: int
    memory_total_bytes: int
    """Memory cap of this partition as reported (a cap, not memory of its own in NPS1)."""

    @property
    def render_node(self) -> str:
        return f"/dev/dri/renderD{self.render_minor}"

    @property
    def card_node(self) -> str:
        return f"/dev/dri/card{self.card_minor}"


@dataclass(frozen=True)
class GpuInfo:
    """One physical GPU (an amdsmi socket) and the partitions it exposes now."""

    index: int
    bdf: str
    """BDF of the primary partition (function 0); stable across repartitioning, used as the GPU's key."""
    model_name: str
    compute_partition: ComputePartition
    memory_partition: MemoryPartition
    available_compute_partitions: tuple[ComputePartition, ...]
    available_memory_partitions: tuple[MemoryPartition, ...]
    memory_total_bytes: int
    """Whole-GPU VRAM as the primary reports it (196592 MiB on MI300X)."""
    memory_used_bytes: int
    """VRAM in use as the hardware reports it, across all partitions."""
    partitions: tuple[PartitionInfo, ...]

    @property
    def pool_count(self) -> int:
        return self.memory_partition.pool_count

    @property
    def pool_total_bytes(self) -> int:
        return self.memory_total_bytes // self.pool_count

    def pool_of(self, partition_id: int) -> int:
        return pool_of(partition_id, self.compute_partition, self.memory_partition)


@dataclass(frozen=True)
class HostInventory:
    """Everything the backend observed in one pass."""

    gpus: tuple[GpuInfo, ...]

    def partitions(self) -> tuple[PartitionInfo, ...]:
        return tuple(p for g in self.gpus for p in g.partitions)

    def gpu_by_bdf(self, bdf: str) -> GpuInfo | None:
        return next((g for g in self.gpus if g.bdf == bdf), None)


@dataclass(frozen=True)
class GpuTelemetry:
    """Sensor readings of one GPU, read through its primary partition (secondaries report N/A or 0 for these:
    ROCm/device-metrics-exporter#115, #139). A reading the hardware does not provide is absent, never 0."""

    temperature_celsius: Mapping[str, float] = field(default_factory=dict)
    """By sensor: "hotspot", "memory", "vrsoc", "edge" (MI300X has no edge sensor)."""
    power_watts: float | None = None
    """Current socket power."""
    activity_ratio: Mapping[str, float] = field(default_factory=dict)
    """By engine, 0-1: "gfx" (compute), "umc" (memory controller), "mm" (media)."""
