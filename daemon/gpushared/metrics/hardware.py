"""Hardware readings for the exporter: per-partition VRAM from the process lists, and sensor telemetry.

amdsmi is synchronous and the backend serialises its calls (a driver reload may hold it for minutes), so these
reads run in a worker thread on their own interval, one at a time, and never during a partition operation (the
device list is changing). A scrape only reads what the last poll left. Device-level VRAM of a secondary partition
reads 0 on MI300X (device-metrics-exporter#115, #139), so a partition's VRAM here is the sum over the processes
holding it, which the per-partition process list reports correctly; and telemetry comes from the primary only.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from gpushared.domain.errors import GpushareError
from gpushared.domain.gpu import GpuTelemetry
from gpushared.metrics.source import HardwareReader, TelemetryReader

log = logging.getLogger("gpushared.metrics")


@dataclass
class HardwareSnapshot:
    partition_vram_bytes: dict[tuple[int, int], int] = field(default_factory=dict)
    """(GPU index, partition id) -> VRAM held by the processes on that partition."""
    telemetry: dict[int, GpuTelemetry] = field(default_factory=dict)


class HardwarePoller:
    def __init__(self, reader: HardwareReader, *, interval: float = 30.0) -> None:
        if not interval > 0:
            raise ValueError(f"hardware poll interval must be > 0, got {interval!r}")
        self.interval = interval
        self._reader = reader
        self._telemetry: TelemetryReader | None = reader if isinstance(reader, TelemetryReader) else None
        self.snapshot = HardwareSnapshot()
        self._failing = False
        self._telemetry_failing = False

    async def run(self, gpus: Callable[[], Sequence[int]], busy: Callable[[], bool]) -> None:
        while True:
            if busy():
                # Mid-switch the partitions being read may vanish; the old readings describe a layout that is gone.
                self.snapshot = HardwareSnapshot()
            else:
                await self.poll_once(gpus())
            await asyncio.sleep(self.interval)

    async def poll_once(self, gpus: Sequence[int]) -> None:
        try:
            self.snapshot = await asyncio.to_thread(self._read, tuple(gpus))
        except GpushareError as exc:
            # Export nothing rather than stale or zero readings; say so once, not every interval.
            self.snapshot = HardwareSnapshot()
            if not self._failing:
                log.warning("metrics: hardware readings failed: %s", exc, extra={"event": "metrics_hardware_failed"})
            self._failing = True
            return
        except Exception:
            self.snapshot = HardwareSnapshot()
            log.exception("metrics: hardware readings crashed", extra={"event": "metrics_hardware_failed"})
            return
        if self._failing:
            log.info("metrics: hardware readings work again", extra={"event": "metrics_hardware_ok"})
        self._failing = False

    def _read(self, gpus: tuple[int, ...]) -> HardwareSnapshot:
        snapshot = HardwareSnapshot()
        failed: list[str] = []
        for gpu in gpus:
            for partition_id, processes in self._reader.list_processes(gpu).items():
                snapshot.partition_vram_bytes[(gpu, partition_id)] = sum(max(0, p.vram_bytes) for p in processes)
            if self._telemetry is None:
                continue
            try:
                reading = self._telemetry.read_telemetry(gpu)
            except GpushareError as exc:
                # A sensor read that fails costs that GPU its sensor series, not the VRAM readings.
                failed.append(f"GPU {gpu}: {exc}")
                continue
            if reading is not None:
                snapshot.telemetry[gpu] = reading
        if failed and not self._telemetry_failing:
            log.warning("metrics: sensor readings failed: %s", "; ".join(failed), extra={"event": "metrics_sensors"})
        self._telemetry_failing = bool(failed)
        return snapshot
