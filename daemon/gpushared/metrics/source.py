"""What the exporter reads from the daemon: a small port over its services, and the hardware it may poll.

Every read here is a snapshot the daemon already keeps (the allocation service's HostView, the model supervisors'
lifecycles, the partition service's drift): answering a scrape never waits on amdsmi or a model child. The two
blocking reads (per-process VRAM, telemetry) are only ever called from the exporter's own poller thread.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

from gpushared.domain.gpu import DeviceProcess, GpuTelemetry
from gpushared.services.allocations import AllocationService, HostView
from gpushared.services.models import ModelService, ModelView
from gpushared.services.partitions import PartitionService


class MetricsSource(Protocol):
    """The daemon's state as the collector reads it, on the event loop thread, at every scrape."""

    @property
    def backend_name(self) -> str:
        """ "amdsmi" or "emulated"."""
        ...

    def host_view(self) -> HostView:
        """Inventory (last hardware observation) and ledger (allocations, degraded and closed GPUs)."""
        ...

    def models(self) -> Sequence[ModelView]: ...

    def operation_running(self) -> bool:
        """A partition operation is changing the layout now (the hardware is expected to differ meanwhile)."""
        ...

    def drift(self) -> Sequence[str]:
        """Where the hardware differs from the configured or last-set layout, one "GPU N: ..." line per GPU."""
        ...


class HardwareReader(Protocol):
    """The part of the GpuBackend the hardware poller uses; blocking, so it runs in a worker thread."""

    def list_processes(self, gpu_index: int) -> Mapping[int, Sequence[DeviceProcess]]: ...


@runtime_checkable
class TelemetryReader(Protocol):
    """Optional extension of the GpuBackend. ``read_telemetry`` blocks (amdsmi), returns None when this backend or
    GPU has no sensors to read (the emulator), and raises HardwareError when a read fails. Temperature, power and
    activity families are exported only for GPUs that returned readings: nothing rather than zeros."""

    def read_telemetry(self, gpu_index: int) -> GpuTelemetry | None: ...


class ServicesSource:
    """MetricsSource over the daemon's three services, as the composition root builds them."""

    def __init__(
        self,
        backend_name: str,
        allocations: AllocationService,
        models: ModelService,
        partitions: PartitionService,
    ) -> None:
        self._backend_name = backend_name
        self._allocations = allocations
        self._models = models
        self._partitions = partitions

    @property
    def backend_name(self) -> str:
        return self._backend_name

    def host_view(self) -> HostView:
        return self._allocations.view

    def models(self) -> Sequence[ModelView]:
        return self._models.all()

    def operation_running(self) -> bool:
        return self._partitions.busy is not None

    def drift(self) -> Sequence[str]:
        return self._partitions.drift
