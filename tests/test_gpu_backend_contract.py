"""One contract for every GpuBackend: the adapter over the fake amdsmi package, and the emulated host.

Both must report what mi300x.md says an 8x MI300X host reports, through the same port.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi
from gpushared.domain.errors import HardwareError, NotFound
from gpushared.domain.gpu import MIB, ComputePartition, MemoryPartition

FAKES = Path(__file__).parent / "fakes"
VRAM = 196592 * MIB
CPX, SPX, DPX = ComputePartition.CPX, ComputePartition.SPX, ComputePartition.DPX
NPS1, NPS4 = MemoryPartition.NPS1, MemoryPartition.NPS4


@dataclass
class Harness:
    backend: AmdSmiGpuBackend
    hold: Callable[[int, int, int], None]
    """Make a live process hold (gpu, partition)."""


Factory = Callable[..., Harness]


def fake_amdsmi() -> Any:
    if str(FAKES) not in sys.path:
        sys.path.insert(0, str(FAKES))
    return importlib.import_module("amdsmi")


@pytest.fixture(params=["fake-amdsmi", "emulated"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    backends: list[AmdSmiGpuBackend] = []

    def factory(gpus: int = 8, privileged: bool = True) -> Harness:
        if request.param == "fake-amdsmi":
            lib = fake_amdsmi()
            lib.fake_host.reset(gpu_count=gpus, root=privileged)
            processes: list[dict[str, int]] = []

            def hold_fake(pid: int, gpu: int, partition: int) -> None:
                processes.append({"pid": pid, "gpu": gpu, "partition": partition, "vram_bytes": MIB})
                lib.fake_host.set_processes(processes)

            backend = AmdSmiGpuBackend(lib)
            hold = hold_fake
        else:
            emulator = EmulatedAmdSmi(tmp_path / "host.json", gpu_count=gpus, privileged=privileged)

            def hold_emulated(pid: int, gpu: int, partition: int) -> None:
                emulator.register_holder(pid, gpu, partition, vram_bytes=MIB)

            backend = AmdSmiGpuBackend(emulator, name="emulated")
            hold = hold_emulated
        backends.append(backend)
        return Harness(backend, hold)

    yield factory
    for backend in backends:
        backend.close()


def test_default_host_is_eight_mi300x_in_spx_nps1(make: Factory) -> None:
    inventory = make().backend.observe()
    assert len(inventory.gpus) == 8
    bdfs = [g.bdf for g in inventory.gpus]
    assert bdfs == sorted(bdfs)
    for index, gpu in enumerate(inventory.gpus):
        assert gpu.index == index
        assert gpu.model_name == "AMD Instinct MI300X"
        assert (gpu.compute_partition, gpu.memory_partition) == (SPX, NPS1)
        assert gpu.memory_total_bytes == VRAM
        assert gpu.pool_count == 1
        assert gpu.pool_total_bytes == VRAM
        assert NPS1 in gpu.available_memory_partitions
        assert set(gpu.available_compute_partitions) == {SPX, DPX, ComputePartition.QPX, CPX}
        (partition,) = gpu.partitions
        assert partition.bdf == gpu.bdf
        assert partition.bdf.endswith(".0")
        assert partition.render_minor == 128 + 8 * index
        assert partition.hip_index == index
        assert partition.memory_total_bytes == VRAM


@pytest.mark.parametrize(("mode", "count"), [(DPX, 2), (ComputePartition.QPX, 4), (CPX, 8)])
def test_compute_partition_changes_enumeration(make: Factory, mode: ComputePartition, count: int) -> None:
    backend = make().backend
    backend.set_compute_partition(0, mode)
    inventory = backend.observe()
    gpu0, gpu1 = inventory.gpus[0], inventory.gpus[1]
    assert gpu0.compute_partition is mode
    assert len(gpu0.partitions) == count
    assert [p.partition_id for p in gpu0.partitions] == list(range(count))
    assert [p.bdf[-1] for p in gpu0.partitions] == [str(p) for p in range(count)], "BDF function = partition id"
    assert [p.render_minor for p in gpu0.partitions] == [128 + p for p in range(count)]
    assert [p.hip_index for p in gpu0.partitions] == list(range(count))
    assert gpu1.partitions[0].hip_index == count, "amd-smi/HIP index is global, sorted by BDF then partition"
    # The primary reports the whole GPU in partitioned modes; the backend reports its cap.
    assert {p.memory_total_bytes for p in gpu0.partitions} == {VRAM // count}
    assert gpu0.memory_total_bytes == VRAM
    assert len(inventory.partitions()) == 7 + count


def test_busy_gpu_refuses_a_compute_switch(make: Factory) -> None:
    harness = make()
    harness.hold(os.getpid(), 3, 0)
    with pytest.raises(HardwareError) as info:
        harness.backend.set_compute_partition(3, CPX)
    assert info.value.status == "BUSY"
    assert info.value.message.startswith("gpu 3 (")
    harness.backend.set_compute_partition(2, CPX)  # other GPUs are not blocked
    processes = harness.backend.list_processes(3)
    assert [p.pid for p in processes[0]] == [os.getpid()]


def test_unprivileged_set_is_no_perm(make: Factory) -> None:
    backend = make(privileged=False).backend
    with pytest.raises(HardwareError) as info:
        backend.set_compute_partition(0, CPX)
    assert info.value.status == "NO_PERM"


def test_nps4_is_staged_until_reload_then_auto_cpx(make: Factory) -> None:
    backend = make().backend
    backend.set_memory_partition(0, NPS4)
    assert backend.observe().gpus[5].memory_partition is NPS1, "a memory partition change waits for the reload"
    backend.reload_driver()
    inventory = backend.observe()
    for gpu in inventory.gpus:
        assert (gpu.compute_partition, gpu.memory_partition) == (CPX, NPS4), "hive-wide, compute reverts to AUTO"
        assert gpu.pool_count == 4
        assert [gpu.pool_of(p.partition_id) for p in gpu.partitions] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert len(inventory.partitions()) == 64
    with pytest.raises(HardwareError) as info:
        backend.set_compute_partition(0, SPX)
    assert info.value.status == "SETTING_UNAVAILABLE"


def test_unsupported_memory_mode_and_unknown_gpu(make: Factory) -> None:
    backend = make().backend
    with pytest.raises(HardwareError) as info:
        backend.set_memory_partition(0, MemoryPartition.NPS2)
    assert info.value.status == "INVAL"
    with pytest.raises(NotFound, match="gpu 8"):
        backend.set_compute_partition(8, CPX)
    with pytest.raises(NotFound):
        backend.list_processes(-1)


def test_smaller_hosts(make: Factory) -> None:
    inventory = make(gpus=2).backend.observe()
    assert [g.index for g in inventory.gpus] == [0, 1]


def test_emulated_sensors_come_from_the_primary_and_leave_out_what_mi300x_lacks(tmp_path: Path) -> None:
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(tmp_path / "host.json", gpu_count=2), name="emulated")
    try:
        reading = backend.read_telemetry(1)
    finally:
        backend.close()
    assert reading is not None
    assert reading.temperature_celsius == {"hotspot": 43.0, "memory": 37.0, "vrsoc": 36.0}, "no edge sensor"
    assert reading.power_watts == 140.0
    assert reading.activity_ratio == {"gfx": 0.0, "umc": 0.0}, "no media activity on MI300X"
