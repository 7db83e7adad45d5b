"""AmdSmiGpuBackend against the fake amdsmi package (tests/fakes/amdsmi), which mirrors amdsmi 7.0.2's shapes."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend, load_amdsmi
from gpushared.domain.errors import BackendUnavailable, HardwareError, NotFound
from gpushared.domain.gpu import GIB, MIB, VALID_COMBINATIONS, ComputePartition, MemoryPartition
from gpushared.ports import GpuBackend

FAKES = Path(__file__).parent / "fakes"
DAEMON = Path(__file__).parent.parent / "daemon"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))
amdsmi: Any = importlib.import_module("amdsmi")

VRAM = 196592 * MIB
BUSES = ("0c", "22", "38", "5c", "9f", "af", "bf", "df")
STATUSES = {
    name.removeprefix("AMDSMI_STATUS_"): value
    for name, value in vars(amdsmi.amdsmi_wrapper).items()
    if name.startswith("AMDSMI_STATUS_") and name != "AMDSMI_STATUS_SUCCESS"
}

Make = Callable[..., AmdSmiGpuBackend]


@pytest.fixture
def make() -> Iterator[Make]:
    """Configure the fake host from scratch, then build a backend on it."""
    backends: list[AmdSmiGpuBackend] = []

    def build(**config: Any) -> AmdSmiGpuBackend:
        amdsmi.fake_host.reset(**config)
        backend = AmdSmiGpuBackend(amdsmi)
        backends.append(backend)
        return backend

    yield build
    for backend in backends:
        backend.close()
    amdsmi.fake_host.reset()


class LookAlike:
    """A library object that is not the amdsmi module: same attributes, some answers replaced."""

    def __init__(self, **overrides: Any) -> None:
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name == "amdsmi_wrapper":
            raise AttributeError(name)  # the product emulator does not have it either
        return self._overrides.get(name, getattr(amdsmi, name))


def run_python(code: str, *, pythonpath: list[Path], config: dict[str, Any] | None, tmp_path: Path) -> Any:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "GPUSHARE_FAKE_AMDSMI")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    if config is not None:
        path = tmp_path / "fake-amdsmi.json"
        path.write_text(json.dumps(config), encoding="utf-8")
        env["GPUSHARE_FAKE_AMDSMI"] = str(path)
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code], env=env, capture_output=True, text=True, timeout=60, check=False
    )


# -- enumeration ------------------------------------------------------------------------------


def test_default_host_is_eight_spx_nps1_mi300x(make: Make) -> None:
    backend: GpuBackend = make()
    inventory = backend.observe()

    assert backend.name == "amdsmi"
    assert len(inventory.gpus) == 8
    assert len(inventory.partitions()) == 8
    for index, gpu in enumerate(inventory.gpus):
        assert gpu.index == index
        assert gpu.bdf == f"0000:{BUSES[index]}:00.0"
        assert gpu.model_name == "AMD Instinct MI300X"
        assert gpu.compute_partition is ComputePartition.SPX
        assert gpu.memory_partition is MemoryPartition.NPS1
        assert gpu.available_compute_partitions == tuple(ComputePartition)
        assert gpu.available_memory_partitions == (MemoryPartition.NPS1, MemoryPartition.NPS4)
        assert gpu.memory_total_bytes == VRAM
        assert gpu.memory_used_bytes == 0
        (part,) = gpu.partitions
        assert (part.gpu_index, part.partition_id, part.bdf) == (index, 0, gpu.bdf)
        assert part.render_node == f"/dev/dri/renderD{128 + 8 * index}"
        assert part.hip_index == index
        assert part.node_id == index + 2
        assert part.memory_total_bytes == VRAM


def test_cpx_gives_64_partitions_with_mi300x_identifiers(make: Make) -> None:
    inventory = make(compute="CPX").observe()

    assert len(inventory.partitions()) == 64
    uuids = {p.uuid for p in inventory.partitions()}
    assert len(uuids) == 64  # one UUID per partition from ROCm 7.0
    for g, gpu in enumerate(inventory.gpus):
        assert gpu.compute_partition is ComputePartition.CPX
        assert gpu.memory_total_bytes == VRAM
        assert [p.partition_id for p in gpu.partitions] == list(range(8))
        for p, part in enumerate(gpu.partitions):
            assert part.bdf == f"0000:{BUSES[g]}:00.{p}"
            assert part.render_minor == 128 + 8 * g + p
            assert part.card_minor == 8 * g + p
            assert part.hip_index == 8 * g + p
            assert part.node_id == 8 * g + p + 2
            assert part.kfd_id >= 0
            # The primary reports the whole GPU (amdsmi#132); every partition gets the even cap.
            assert part.memory_total_bytes == 24574 * MIB


@pytest.mark.parametrize(("compute", "cap_mib"), [("SPX", 196592), ("DPX", 98296), ("QPX", 49148), ("CPX", 24574)])
def test_partition_caps_normalize_the_primary_quirk(make: Make, compute: str, cap_mib: int) -> None:
    inventory = make(compute=compute).observe()

    for gpu in inventory.gpus:
        assert gpu.memory_total_bytes == VRAM
        assert [p.memory_total_bytes for p in gpu.partitions] == [cap_mib * MIB] * len(gpu.partitions)


def test_a_fixed_library_reporting_the_primarys_own_cap_is_not_divided_again(make: Make) -> None:
    make(compute="DPX")

    def memory_total(handle: Any, mem_type: Any) -> int:
        if amdsmi.amdsmi_get_gpu_kfd_info(handle)["current_partition_id"] == 0:
            return 98296 * MIB
        result: int = amdsmi.amdsmi_get_gpu_memory_total(handle, mem_type)
        return result

    backend = AmdSmiGpuBackend(LookAlike(amdsmi_get_gpu_memory_total=memory_total), name="look-alike")
    try:
        gpu = backend.observe().gpus[0]
    finally:
        backend.close()
    assert gpu.memory_total_bytes == VRAM
    assert [p.memory_total_bytes for p in gpu.partitions] == [98296 * MIB, 98296 * MIB]


def test_memory_falls_back_to_vram_usage_in_mib(make: Make) -> None:
    processes = [{"gpu": 1, "partition": 2, "pid": 10, "vram_bytes": 3 * GIB}]
    fail = {"amdsmi_get_gpu_memory_total": 2, "amdsmi_get_gpu_memory_usage": 2}
    inventory = make(compute="CPX", processes=processes, fail=fail).observe()

    assert inventory.gpus[1].memory_total_bytes == VRAM
    assert {p.memory_total_bytes for p in inventory.partitions()} == {24574 * MIB}
    assert inventory.gpus[1].memory_used_bytes == 3 * GIB


def test_memory_used_sums_the_gpus_partitions(make: Make) -> None:
    processes = [
        {"gpu": 1, "partition": 2, "pid": 10, "vram_bytes": 3 * GIB},
        {"gpu": 1, "partition": 5, "pid": 11, "vram_bytes": 1 * GIB, "visible_on_all": True},
    ]
    inventory = make(compute="CPX", processes=processes).observe()

    assert [g.memory_used_bytes for g in inventory.gpus] == [0, 4 * GIB, 0, 0, 0, 0, 0, 0]


def test_partitions_group_by_bdf_when_uuids_are_shared_before_rocm_7(make: Make) -> None:
    inventory = make(compute="CPX", rocm_version="6.4.0").observe()

    assert len(inventory.gpus) == 8
    per_gpu_uuids = [{p.uuid for p in gpu.partitions} for gpu in inventory.gpus]
    assert all(len(u) == 1 for u in per_gpu_uuids)
    assert len(set.union(*per_gpu_uuids)) == 8
    for g, gpu in enumerate(inventory.gpus):
        assert len(gpu.partitions) == 8
        # Before 6.4.1 secondaries name the primary's render node; reported as amdsmi says.
        assert {p.render_minor for p in gpu.partitions} == {128 + 8 * g}


def test_gpus_are_ordered_by_bdf_not_enumeration_order(make: Make) -> None:
    bdfs = ["0000:9f:00.0", "0000:0c:00.0", "0001:05:00.0", "0000:38:00.0"]
    inventory = make(bdfs=bdfs).observe()

    assert [g.bdf for g in inventory.gpus] == ["0000:0c:00.0", "0000:38:00.0", "0000:9f:00.0", "0001:05:00.0"]
    assert [g.index for g in inventory.gpus] == [0, 1, 2, 3]
    # hip_id is amd-smi's order, which the fake keeps as configured.
    assert [g.partitions[0].hip_index for g in inventory.gpus] == [1, 3, 0, 2]


def test_na_values_fall_back(make: Make) -> None:
    inventory = make(compute="QPX", na_fields=["hip_id", "current_partition_id", "kfd_id", "drm_render"]).observe()

    parts = inventory.gpus[2].partitions
    assert [p.partition_id for p in parts] == [0, 1, 2, 3]  # from the BDF function
    assert [p.hip_index for p in parts] == [8, 9, 10, 11]  # amd-smi index
    assert {p.kfd_id for p in parts} == {-1}
    assert {p.render_minor for p in parts} == {-1}


@pytest.mark.parametrize(
    ("na_fields", "expected"),
    [
        ([], "AMD Instinct MI300X"),
        (["market_name"], "AMD Instinct MI300X OAM"),
        (["market_name", "product_name"], "AMD GPU"),
    ],
)
def test_model_name_falls_back(make: Make, na_fields: list[str], expected: str) -> None:
    assert make(na_fields=na_fields).observe().gpus[0].model_name == expected


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        (["NPS1", "NPS2", "NPS4", "NPS8"], ("NPS1", "NPS2", "NPS4")),
        (["NPS1"], ("NPS1",)),
        ([], ("NPS1",)),
    ],
)
def test_available_memory_partitions_ignore_nps8_and_na(make: Make, caps: list[str], expected: tuple[str, ...]) -> None:
    gpu = make(memory_caps=caps).observe().gpus[0]
    assert tuple(m.value for m in gpu.available_memory_partitions) == expected


def test_available_compute_partitions_follow_the_memory_partition(make: Make) -> None:
    gpu = make(memory="NPS4").observe().gpus[0]
    assert gpu.compute_partition is ComputePartition.CPX  # what the driver picks for NPS4
    assert gpu.available_compute_partitions == (ComputePartition.QPX, ComputePartition.CPX)
    assert gpu.pool_count == 4


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(list(MemoryPartition)).flatmap(
        lambda memory: st.tuples(
            st.just(memory),
            st.lists(
                st.sampled_from([c for c in ComputePartition if memory in VALID_COMBINATIONS[c]]),
                min_size=1,
                max_size=8,
            ),
        )
    )
)
def test_any_valid_host_is_reported_consistently(host: tuple[MemoryPartition, list[ComputePartition]]) -> None:
    memory, modes = host
    amdsmi.fake_host.reset(memory=memory.value, compute=[m.value for m in modes], gpu_count=len(modes))
    backend = AmdSmiGpuBackend(amdsmi)
    try:
        inventory = backend.observe()
    finally:
        backend.close()
        amdsmi.fake_host.reset()

    assert [g.compute_partition for g in inventory.gpus] == modes
    assert [p.hip_index for p in inventory.partitions()] == list(range(sum(m.partition_count for m in modes)))
    for gpu, mode in zip(inventory.gpus, modes, strict=True):
        assert gpu.memory_partition is memory
        assert [p.partition_id for p in gpu.partitions] == list(range(mode.partition_count))
        assert sum(p.memory_total_bytes for p in gpu.partitions) == gpu.memory_total_bytes == VRAM
        assert all(memory in VALID_COMBINATIONS[c] for c in gpu.available_compute_partitions)


# -- processes --------------------------------------------------------------------------------


def test_list_processes_keeps_zero_vram_entries_and_na_names(make: Make) -> None:
    processes = [
        {"gpu": 1, "partition": 3, "pid": 100, "name": "N/A", "vram_bytes": 2 * GIB},
        {"gpu": 4, "partition": 0, "pid": 7, "name": "monitor", "vram_bytes": 0, "visible_on_all": True},
    ]
    backend = make(compute="CPX", processes=processes)

    listing = backend.list_processes(1)

    assert sorted(listing) == list(range(8))
    assert {(p.pid, p.name, p.vram_bytes) for p in listing[3]} == {(100, "N/A", 2 * GIB), (7, "monitor", 0)}
    assert all([(p.pid, p.vram_bytes) for p in listing[q]] == [(7, 0)] for q in (0, 1, 2, 4, 5, 6, 7))
    assert backend.list_processes(2)[0][0].pid == 7


def test_list_processes_of_an_unknown_gpu_is_not_found(make: Make) -> None:
    with pytest.raises(NotFound, match=r"gpu 8: .*0-7"):
        make().list_processes(8)


# -- partition changes ------------------------------------------------------------------------


def test_set_compute_partition_then_observe_uses_fresh_handles(make: Make) -> None:
    backend = make()
    backend.set_compute_partition(3, ComputePartition.CPX)

    inventory = backend.observe()

    assert [g.compute_partition.value for g in inventory.gpus] == ["SPX"] * 3 + ["CPX"] + ["SPX"] * 4
    assert len(inventory.partitions()) == 15
    assert inventory.gpus[4].partitions[0].hip_index == 11
    assert amdsmi.fake_host.init_count == 1  # re-initialised, and init/shut_down stay balanced


def test_fake_handles_go_stale_after_a_change(make: Make) -> None:
    backend = make()
    old = amdsmi.amdsmi_get_processor_handles()[0]
    backend.set_compute_partition(0, ComputePartition.DPX)

    with pytest.raises(amdsmi.AmdSmiLibraryException) as caught:
        amdsmi.amdsmi_get_gpu_device_bdf(old)
    assert caught.value.get_error_code() == amdsmi.amdsmi_wrapper.AMDSMI_STATUS_NOT_FOUND
    assert len(backend.observe().gpus[0].partitions) == 2


def test_observe_recovers_when_partitions_change_behind_its_back(make: Make) -> None:
    backend = make()
    handle = amdsmi.amdsmi_get_processor_handles()[0]
    amdsmi.amdsmi_set_gpu_compute_partition(handle, amdsmi.AmdSmiComputePartitionType.CPX)  # e.g. `amd-smi set`

    assert backend.observe().gpus[0].compute_partition is ComputePartition.CPX


def test_gpus_disappearing_is_backend_unavailable(make: Make) -> None:
    backend = make()
    amdsmi.fake_host.configure(gpu_count=0)

    with pytest.raises(BackendUnavailable, match="no AMD GPU found"):
        backend.observe()


def test_busy_gpu_refuses_a_compute_change(make: Make) -> None:
    backend = make(processes=[{"gpu": 2, "pid": 4242, "vram_bytes": GIB}])

    with pytest.raises(HardwareError) as caught:
        backend.set_compute_partition(2, ComputePartition.CPX)

    err = caught.value
    assert err.status == "BUSY"
    assert (
        err.message
        == "gpu 2 (0000:38:00.0): set compute partition CPX: AMDSMI_STATUS_BUSY (30): a process still holds the device"
    )
    assert "stop the processes" in err.hint
    assert isinstance(err.__cause__, amdsmi.AmdSmiLibraryException)
    backend.set_compute_partition(3, ComputePartition.CPX)  # other GPUs are not held


def test_non_root_gets_no_perm(make: Make) -> None:
    backend = make(root=False)

    changes: list[Callable[[], None]] = [
        lambda: backend.set_compute_partition(0, ComputePartition.CPX),
        lambda: backend.set_memory_partition(0, MemoryPartition.NPS4),
        backend.reload_driver,
    ]
    for change in changes:
        with pytest.raises(HardwareError) as caught:
            change()
        assert caught.value.status == "NO_PERM"
        assert caught.value.hint == "run gpushared as root"


def test_invalid_combination_is_setting_unavailable(make: Make) -> None:
    backend = make(memory="NPS4")

    with pytest.raises(HardwareError) as caught:
        backend.set_compute_partition(5, ComputePartition.SPX)

    assert caught.value.status == "SETTING_UNAVAILABLE"
    assert caught.value.message.startswith("gpu 5 (0000:af:00.0): set compute partition SPX: AMDSMI_STATUS_SETTING")
    assert "NPS1" in caught.value.hint


def test_memory_partition_is_staged_until_the_driver_reload(make: Make) -> None:
    backend = make()
    backend.set_memory_partition(0, MemoryPartition.NPS4)

    assert {g.memory_partition for g in backend.observe().gpus} == {MemoryPartition.NPS1}

    backend.reload_driver()
    inventory = backend.observe()

    assert {(g.compute_partition, g.memory_partition) for g in inventory.gpus} == {
        (ComputePartition.CPX, MemoryPartition.NPS4)
    }
    assert len(inventory.partitions()) == 64
    assert amdsmi.fake_host.init_count == 1


def test_memory_partition_applies_at_once_before_rocm_7(make: Make) -> None:
    backend = make(rocm_version="6.4.1")
    backend.set_memory_partition(0, MemoryPartition.NPS4)
    assert {g.memory_partition for g in backend.observe().gpus} == {MemoryPartition.NPS4}


def test_memory_partition_outside_the_caps_is_inval(make: Make) -> None:
    with pytest.raises(HardwareError) as caught:
        make().set_memory_partition(1, MemoryPartition.NPS2)
    assert caught.value.status == "INVAL"
    assert caught.value.message.startswith("gpu 1 (0000:22:00.0): set memory partition NPS2: AMDSMI_STATUS_INVAL (1)")


def test_reload_with_gpu_users_is_restart_err(make: Make) -> None:
    backend = make(processes=[{"gpu": 7, "pid": 1}])
    with pytest.raises(HardwareError) as caught:
        backend.reload_driver()
    assert caught.value.status == "AMDGPU_RESTART_ERR"
    assert caught.value.message.startswith("all GPUs: reload the amdgpu driver: AMDSMI_STATUS_AMDGPU_RESTART_ERR (54)")


def test_unknown_gpu_index_is_not_found(make: Make) -> None:
    with pytest.raises(NotFound, match=r"^gpu 9: no such GPU; this host has GPUs 0-7$"):
        make().set_compute_partition(9, ComputePartition.CPX)


# -- error mapping ----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "code"), sorted(STATUSES.items()))
def test_every_status_maps_to_hardware_error(make: Make, name: str, code: int) -> None:
    backend = make()
    amdsmi.fake_host.configure(fail={"amdsmi_get_gpu_compute_partition": code})

    with pytest.raises(HardwareError) as caught:
        backend.observe()

    err = caught.value
    assert err.status == name
    assert err.message.startswith(f"gpu 0 (0000:0c:00.0): read compute partition: AMDSMI_STATUS_{name} ({code})")
    assert "\n" not in str(err)
    assert isinstance(err.__cause__, amdsmi.AmdSmiLibraryException)
    assert err.__cause__.err_code == code


@pytest.mark.parametrize("name", ["BUSY", "NO_PERM", "SETTING_UNAVAILABLE", "NOT_SUPPORTED", "INVAL", "RETRY"])
def test_setter_errors_name_the_gpu_and_bdf(make: Make, name: str) -> None:
    backend = make(fail={"amdsmi_set_gpu_compute_partition": STATUSES[name]})

    with pytest.raises(HardwareError) as caught:
        backend.set_compute_partition(3, ComputePartition.CPX)

    assert caught.value.status == name
    assert caught.value.message.startswith(f"gpu 3 (0000:5c:00.0): set compute partition CPX: AMDSMI_STATUS_{name} (")


def test_parameter_exception_is_inval_and_other_exceptions_unknown(make: Make) -> None:
    make()

    def bad_kfd_info(handle: Any) -> Any:
        return amdsmi.amdsmi_get_gpu_kfd_info(str(handle))

    def bad_uuid(handle: Any) -> Any:
        raise amdsmi.AmdSmiKeyException("uuid")

    for overrides, status in (
        ({"amdsmi_get_gpu_kfd_info": bad_kfd_info}, "INVAL"),
        ({"amdsmi_get_gpu_device_uuid": bad_uuid}, "UNKNOWN"),
    ):
        backend = AmdSmiGpuBackend(LookAlike(**overrides))
        try:
            with pytest.raises(HardwareError) as caught:
                backend.observe()
        finally:
            backend.close()
        assert caught.value.status == status
        assert caught.value.message.startswith(("amd-smi device 0 (0000:0c:00.0): ", "gpu 0 (0000:0c:00.0): "))
        assert "\n" not in str(caught.value)


# -- lifecycle and loading --------------------------------------------------------------------


def test_no_gpus_is_backend_unavailable(make: Make) -> None:
    with pytest.raises(BackendUnavailable, match=r"no AMD GPU found.*gpushared --emulate") as caught:
        make(gpu_count=0)
    assert "\n" not in str(caught.value)
    assert amdsmi.fake_host.init_count == 0


def test_init_failure_is_backend_unavailable(make: Make) -> None:
    with pytest.raises(BackendUnavailable, match=r"AMDSMI_STATUS_DRIVER_NOT_LOADED \(34\).*modprobe amdgpu.*--emulate"):
        make(fail={"amdsmi_init": 34})


def test_close_is_idempotent(make: Make) -> None:
    backend = make()
    backend.close()
    backend.close()
    assert amdsmi.fake_host.init_count == 0
    with pytest.raises(BackendUnavailable, match="closed"):
        backend.observe()


def test_load_amdsmi_returns_the_module() -> None:
    assert load_amdsmi() is amdsmi


def test_importing_the_adapter_does_not_import_amdsmi(tmp_path: Path) -> None:
    code = "import sys, gpushared.adapters.amdsmi_gpu; print('amdsmi' in sys.modules)"
    result = run_python(code, pythonpath=[FAKES, DAEMON], config=None, tmp_path=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (0, "False\n", "")


LOAD = """
from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend, load_amdsmi
from gpushared.domain.errors import BackendUnavailable
try:
    lib = load_amdsmi()
except BackendUnavailable as exc:
    print(exc)
    raise SystemExit(3)
backend = AmdSmiGpuBackend(lib)
print(sum(len(g.partitions) for g in backend.observe().gpus))
backend.close()
"""


def test_missing_library_is_one_line_backend_unavailable(tmp_path: Path) -> None:
    result = run_python(LOAD, pythonpath=[FAKES, DAEMON], config={"library_present": False}, tmp_path=tmp_path)

    assert result.returncode == 3, result.stderr
    (line,) = result.stdout.splitlines()  # the package's own loader output is captured, not printed
    assert line.startswith("amdsmi: cannot load libamd_smi.so (KeyError 'libamd_smi.so'): install ROCm's amd-smi-lib")
    assert "`gpushared --emulate`" in line


def test_missing_package_is_backend_unavailable(tmp_path: Path) -> None:
    result = run_python(LOAD, pythonpath=[DAEMON], config=None, tmp_path=tmp_path)
    if result.returncode == 0:
        pytest.skip("a real amdsmi package is installed")

    assert result.returncode == 3, result.stderr
    (line,) = result.stdout.splitlines()
    assert line.startswith("amdsmi: the amdsmi Python package is not installed")
    assert "--emulate" in line


def test_fake_reads_its_configuration_from_the_environment(tmp_path: Path) -> None:
    result = run_python(LOAD, pythonpath=[FAKES, DAEMON], config={"gpu_count": 2, "compute": "CPX"}, tmp_path=tmp_path)
    assert (result.returncode, result.stdout) == (0, "16\n"), result.stderr


# -- the fake itself: shapes the adapter relies on --------------------------------------------


def test_fake_mirrors_amdsmi_shapes(make: Make) -> None:
    make(compute="DPX")
    primary, secondary = amdsmi.amdsmi_get_processor_handles()[:2]

    assert str(amdsmi.AmdSmiLibraryException(-30)) == "Error code:\n\t30 | AMDSMI_STATUS_BUSY - Device busy"
    assert amdsmi.AmdSmiComputePartitionType.CPX == 5
    assert amdsmi.AmdSmiMemoryPartitionType.NPS4 == 4
    assert amdsmi.AmdSmiMemoryType.VRAM == 0
    assert amdsmi.amdsmi_get_gpu_vram_usage(primary) == {"vram_total": 196592, "vram_used": 0}
    assert amdsmi.amdsmi_get_gpu_vram_usage(secondary) == {"vram_total": 98296, "vram_used": 0}
    assert amdsmi.amdsmi_get_gpu_device_bdf(secondary) == "0000:0c:00.1"
    with pytest.raises(amdsmi.AmdSmiLibraryException) as caught:
        amdsmi.amdsmi_get_gpu_compute_partition(secondary)
    assert caught.value.err_code == amdsmi.amdsmi_wrapper.AMDSMI_STATUS_NOT_SUPPORTED
    with pytest.raises(amdsmi.AmdSmiParameterException):
        amdsmi.amdsmi_get_gpu_device_bdf("0000:0c:00.0")
    with pytest.raises(amdsmi.AmdSmiParameterException):
        amdsmi.amdsmi_init(2)


def test_an_amdsmi_without_gpu_metrics_has_no_telemetry(make: Make) -> None:
    # The fake mirrors a library without amdsmi_get_gpu_metrics_info: no readings, and no error either.
    assert make().read_telemetry(0) is None
