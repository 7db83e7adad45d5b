"""What a workload needs to use an allocation: its partitions' device identifiers and environment."""

from __future__ import annotations

from dataclasses import dataclass

from gpushared.domain.allocation import Allocation, PartitionRef
from gpushared.domain.gpu import GpuInfo, HostInventory, PartitionInfo

KFD_NODE = "/dev/kfd"


@dataclass(frozen=True)
class LeasedPartition:
    ref: PartitionRef
    gpu: GpuInfo | None
    partition: PartitionInfo | None
    """None when the recorded partition is not present in the current layout."""

    @property
    def pool(self) -> int:
        return self.gpu.pool_of(self.ref.partition_id) if self.gpu is not None else 0


def leased_partitions(allocation: Allocation, inventory: HostInventory) -> list[LeasedPartition]:
    leased = []
    for ref in allocation.partitions:
        gpu = inventory.gpu_by_bdf(ref.gpu_bdf)
        partition = None
        if gpu is not None and ref.partition_id < len(gpu.partitions):
            partition = gpu.partitions[ref.partition_id]
        leased.append(LeasedPartition(ref, gpu, partition))
    return leased


def lease_environment(allocation: Allocation, leased: list[LeasedPartition]) -> dict[str, str]:
    """Device visibility in one consistent form.

    HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES hold the same physical HIP indices: vLLM on
    ROCm reads CUDA_VISIBLE_DEVICES, copies HIP_ into it, and refuses when both differ; it maps
    them to amdsmi indices, so they must be physical. ROCR_VISIBLE_DEVICES is left unset because
    it renumbers the devices below HIP and would break that mapping.
    """
    indices = ",".join(str(p.partition.hip_index) for p in leased if p.partition is not None)
    return {
        "HIP_VISIBLE_DEVICES": indices,
        "CUDA_VISIBLE_DEVICES": indices,
        "GPUSHARE_ALLOCATION_ID": allocation.id,
        "GPUSHARE_MEMORY_BYTES_PER_PARTITION": str(allocation.memory_bytes_per_partition),
    }


def device_nodes(leased: list[LeasedPartition]) -> list[str]:
    return [KFD_NODE] + [p.partition.render_node for p in leased if p.partition is not None]
