"""Small interfaces (ports) through which services reach the world; adapters implement them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gpushared.domain.allocation import Allocation
from gpushared.domain.gpu import ComputePartition, DeviceProcess, HostInventory, MemoryPartition
from gpushared.domain.partition_op import PartitionOperation
from gpushared.domain.served_model import ServedModel


class GpuBackend(Protocol):
    """The hardware: real amdsmi or the emulated MI300X host.

    Every method may block (amdsmi is synchronous); services call them off the event loop.
    Failures raise ``HardwareError`` carrying the amdsmi status name, or ``BackendUnavailable``.
    """

    @property
    def name(self) -> str:
        """ "amdsmi" or "emulated"."""
        ...

    def observe(self) -> HostInventory:
        """Enumerate every GPU and partition now (fresh handles; nothing cached across calls)."""
        ...

    def list_processes(self, gpu_index: int) -> dict[int, tuple[DeviceProcess, ...]]:
        """Processes holding each partition of a GPU, keyed by partition id."""
        ...

    def set_compute_partition(self, gpu_index: int, mode: ComputePartition) -> None:
        """Set a GPU's compute partition through its primary partition (root; no process may hold it)."""
        ...

    def set_memory_partition(self, gpu_index: int, mode: MemoryPartition) -> None:
        """Stage a memory partition change for the whole hive; it takes effect at ``reload_driver``."""
        ...

    def reload_driver(self) -> None:
        """Unload and reload amdgpu so a staged memory partition applies; handles are stale afterwards."""
        ...

    def close(self) -> None:
        """Release the library (amdsmi_shut_down); idempotent."""
        ...


@dataclass(frozen=True)
class AllocationAdded:
    allocation: Allocation


@dataclass(frozen=True)
class AllocationRemoved:
    allocation_id: str


@dataclass(frozen=True)
class ModelSaved:
    model: ServedModel


@dataclass(frozen=True)
class ModelDeleted:
    name: str


@dataclass(frozen=True)
class OperationSaved:
    operation: PartitionOperation


@dataclass(frozen=True)
class GpuMarked:
    """The GPU is degraded (excluded from allocation) until an admin clears it."""

    bdf: str
    reason: str
    since: float


@dataclass(frozen=True)
class GpuCleared:
    bdf: str


StoreChange = AllocationAdded | AllocationRemoved | ModelSaved | ModelDeleted | OperationSaved | GpuMarked | GpuCleared


class AllocationStore(Protocol):
    """Durable record of allocations and served models."""

    def load(self) -> list[Allocation]:
        """Every allocation recorded; raises ``StateError`` naming the file when it cannot be trusted."""
        ...

    def load_models(self) -> list[ServedModel]:
        """Every served model recorded."""
        ...

    def load_operations(self) -> list[PartitionOperation]:
        """Every journaled partition operation, unfinished ones included, oldest first."""
        ...

    def load_gpu_marks(self) -> dict[str, tuple[str, float]]:
        """Degraded GPUs by BDF: (reason, since)."""
        ...

    def apply(self, changes: Sequence[StoreChange]) -> None:
        """Record the changes, in order, in one crash-safe transaction: all of them or none."""
        ...

    def close(self) -> None: ...
