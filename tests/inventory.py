"""Hand-built MI300X inventories for pure domain tests (the backends' own tests cover enumeration)."""

from __future__ import annotations

from gpushared.domain.gpu import (
    MIB,
    VALID_COMBINATIONS,
    ComputePartition,
    GpuInfo,
    HostInventory,
    MemoryPartition,
    PartitionInfo,
)

MI300X_VRAM = 196592 * MIB
BUSES = ("05", "26", "46", "65", "85", "a6", "c6", "e5")


def make_gpu(index: int, compute: ComputePartition, memory: MemoryPartition, first_hip: int) -> GpuInfo:
    count = compute.partition_count
    partitions = tuple(
        PartitionInfo(
            gpu_index=index,
            partition_id=p,
            bdf=f"0000:{BUSES[index]}:00.{p}",
            uuid=f"uuid-{index}-{p}",
            render_minor=128 + 8 * index + p,
            card_minor=8 * index + p,
            hip_index=first_hip + p,
            kfd_id=1000 + 8 * index + p,
            node_id=2 + first_hip + p,
            memory_total_bytes=MI300X_VRAM // count,
        )
        for p in range(count)
    )
    return GpuInfo(
        index=index,
        bdf=f"0000:{BUSES[index]}:00.0",
        model_name="AMD Instinct MI300X",
        compute_partition=compute,
        memory_partition=memory,
        available_compute_partitions=tuple(c for c in ComputePartition if memory in VALID_COMBINATIONS[c]),
        available_memory_partitions=(MemoryPartition.NPS1, MemoryPartition.NPS4),
        memory_total_bytes=MI300X_VRAM,
        memory_used_bytes=283 * MIB,
        partitions=partitions,
    )


def make_inventory(
    modes: list[tuple[ComputePartition, MemoryPartition]] | None = None,
    *,
    gpus: int = 8,
    compute: ComputePartition = ComputePartition.SPX,
    memory: MemoryPartition = MemoryPartition.NPS1,
) -> HostInventory:
    modes = modes or [(compute, memory)] * gpus
    result = []
    hip = 0
    for index, (c, m) in enumerate(modes):
        result.append(make_gpu(index, c, m, hip))
        hip += c.partition_count
    return HostInventory(tuple(result))
