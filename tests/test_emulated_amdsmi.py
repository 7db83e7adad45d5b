"""Tests of the emulated MI300X host, driven through its amdsmi-shaped API (mi300x.md §1-§4, §7)."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared.adapters.emulated_amdsmi import (
    AmdSmiBdfFormatException,
    AmdSmiComputePartitionType,
    AmdSmiException,
    AmdSmiInitFlags,
    AmdSmiLibraryException,
    AmdSmiMemoryPartitionType,
    AmdSmiMemoryType,
    AmdSmiParameterException,
    EmulatedAmdSmi,
    EmulatedProcessorHandle,
    EmulatorStateError,
)
from gpushared.domain.gpu import GIB, MIB

BDFS = (
    "0000:05:00",
    "0000:26:00",
    "0000:46:00",
    "0000:65:00",
    "0000:85:00",
    "0000:a6:00",
    "0000:c6:00",
    "0000:e5:00",
)
BUSY, NOT_FOUND, NOT_INIT, NO_PERM = 30, 31, 32, 10
NOT_SUPPORTED, INVAL, RESTART_ERR, SETTING_UNAVAILABLE = 2, 1, 54, 55

# mode, partitions per GPU, CUs per partition, secondary vram_total in MB (§1.2, §2.4)
MODES = [
    ("SPX", 1, 304, None),
    ("DPX", 2, 152, 98296),
    ("QPX", 4, 76, 49148),
    ("CPX", 8, 38, 24574),
]


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def state_file(tmp_path: Path) -> Path:
    return tmp_path / "host.json"


@pytest.fixture
def emu(state_file: Path) -> Iterator[EmulatedAmdSmi]:
    lib = EmulatedAmdSmi(state_file)
    lib.amdsmi_init()
    yield lib
    lib.amdsmi_shut_down()


def status_of(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(AmdSmiLibraryException) as info:
        call(*args)
    return info.value.err_code


def reinit(lib: EmulatedAmdSmi) -> None:
    """Shut down and init again: the only way to see a new enumeration (§3.2)."""
    lib.amdsmi_shut_down()
    lib.amdsmi_init()


def primaries(lib: EmulatedAmdSmi) -> list[EmulatedProcessorHandle]:
    handles = lib.amdsmi_get_processor_handles()
    return [h for h in handles if lib.amdsmi_get_gpu_kfd_info(h)["current_partition_id"] == 0]


def set_compute(lib: EmulatedAmdSmi, gpu: int, mode: str) -> None:
    lib.amdsmi_set_gpu_compute_partition(primaries(lib)[gpu], AmdSmiComputePartitionType[mode])
    reinit(lib)


def set_all_compute(lib: EmulatedAmdSmi, mode: str) -> None:
    for gpu in range(len(lib.amdsmi_get_socket_handles())):
        set_compute(lib, gpu, mode)


def stage_and_reload(lib: EmulatedAmdSmi, nps: str, gpu: int = 0) -> None:
    lib.amdsmi_set_gpu_memory_partition(primaries(lib)[gpu], AmdSmiMemoryPartitionType[nps])
    lib.amdsmi_gpu_driver_reload()
    reinit(lib)


def leftover_temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "host.json")


# ------------------------------------------------------------------------------ API surface


def test_exceptions_match_the_real_module() -> None:
    exc = AmdSmiLibraryException(-30)
    assert isinstance(exc, AmdSmiException)
    assert exc.err_code == 30
    assert exc.get_error_code() == 30
    assert str(exc) == "Error code:\n\t30 | AMDSMI_STATUS_BUSY - Device busy"
    assert exc.get_error_info(detailed=False) == "AMDSMI_STATUS_BUSY"
    # MORE_DATA has no text in the real map, so it prints as unknown (§4.1).
    assert "UNKNOWN_ERROR" in str(AmdSmiLibraryException(39))
    param = AmdSmiParameterException(5, AmdSmiComputePartitionType)
    assert param.err_code is None
    assert param.actualType is int
    assert "Invalid parameter" in str(param)
    # The emulator object carries the same classes and enums as module attributes do.
    assert EmulatedAmdSmi.AmdSmiLibraryException is AmdSmiLibraryException
    assert EmulatedAmdSmi.AmdSmiComputePartitionType is AmdSmiComputePartitionType
    assert EmulatedAmdSmi.amdsmi_wrapper.AMDSMI_STATUS_BUSY == 30
    assert EmulatedAmdSmi.amdsmi_wrapper.amdsmi_processor_handle is EmulatedProcessorHandle


@pytest.mark.parametrize(
    ("enum_type", "expected"),
    [
        (
            AmdSmiComputePartitionType,
            {"INVALID": 0, "SPX": 1, "DPX": 2, "TPX": 3, "QPX": 4, "CPX": 5},
        ),
        (AmdSmiMemoryPartitionType, {"UNKNOWN": 0, "NPS1": 1, "NPS2": 2, "NPS4": 4, "NPS8": 8}),
        (AmdSmiMemoryType, {"VRAM": 0, "VIS_VRAM": 1, "GTT": 2}),
        (
            AmdSmiInitFlags,
            {
                "INIT_ALL_PROCESSORS": 0xFFFFFFFF,
                "INIT_AMD_CPUS": 1,
                "INIT_AMD_GPUS": 2,
                "INIT_AMD_APUS": 3,
                "INIT_NON_AMD_CPUS": 4,
                "INIT_NON_AMD_GPUS": 8,
            },
        ),
    ],
)
def test_enum_values_are_the_real_ones(enum_type: Any, expected: dict[str, int]) -> None:
    assert {m.name: m.value for m in enum_type} == expected


def test_init_is_reference_counted_and_required(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file)
    assert status_of(lib.amdsmi_get_socket_handles) == NOT_INIT
    assert status_of(lib.amdsmi_gpu_driver_reload) == NOT_INIT
    lib.amdsmi_init()
    lib.amdsmi_init()
    handle = lib.amdsmi_get_processor_handles()[0]
    lib.amdsmi_shut_down()
    # One init is still outstanding: no teardown, the handle still works (7.0.2, §4.1).
    assert lib.amdsmi_get_gpu_device_bdf(handle) == "0000:05:00.0"
    lib.amdsmi_shut_down()
    assert status_of(lib.amdsmi_get_processor_handles) == NOT_INIT
    assert status_of(lib.amdsmi_get_gpu_device_bdf, handle) == NOT_INIT
    lib.amdsmi_shut_down()  # an extra shutdown is a no-op, as in the real library


@pytest.mark.parametrize(
    "call",
    [
        lambda lib: lib.amdsmi_get_gpu_device_bdf(0),
        lambda lib: lib.amdsmi_get_gpu_process_list("gpu0"),
        lambda lib: lib.amdsmi_init(2),
        lambda lib: lib.amdsmi_get_socket_info(lib.amdsmi_get_processor_handles()[0]),
        lambda lib: lib.amdsmi_set_gpu_compute_partition(primaries(lib)[0], 5),
        lambda lib: lib.amdsmi_set_gpu_compute_partition(primaries(lib)[0], "CPX"),
        lambda lib: lib.amdsmi_set_gpu_memory_partition(primaries(lib)[0], 4),
        lambda lib: lib.amdsmi_get_gpu_memory_total(primaries(lib)[0], 0),
        lambda lib: lib.amdsmi_get_gpu_accelerator_partition_profile(None),
    ],
)
def test_wrong_argument_types_raise_parameter_exception(
    emu: EmulatedAmdSmi, call: Callable[[EmulatedAmdSmi], object]
) -> None:
    with pytest.raises(AmdSmiParameterException):
        call(emu)


def test_type_check_comes_before_the_init_check(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file)
    with pytest.raises(AmdSmiParameterException):
        lib.amdsmi_get_gpu_device_bdf("not a handle")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ enumeration


@pytest.mark.parametrize(("mode", "parts", "cus", "_secondary_mb"), MODES)
def test_counts_and_identifiers_per_mode(
    emu: EmulatedAmdSmi, mode: str, parts: int, cus: int, _secondary_mb: int | None
) -> None:
    set_all_compute(emu, mode)
    sockets = emu.amdsmi_get_socket_handles()
    assert [emu.amdsmi_get_socket_info(s) for s in sockets] == [b.upper() for b in BDFS]
    handles = emu.amdsmi_get_processor_handles()
    assert len(handles) == 8 * parts  # 8/16/32/64 (§2.1)
    uuids, hip_uuids, kfd_ids = set(), set(), set()
    for index, handle in enumerate(handles):
        gpu, part = divmod(index, parts)
        assert emu.amdsmi_get_gpu_device_bdf(handle) == f"{BDFS[gpu]}.{part}"
        kfd = emu.amdsmi_get_gpu_kfd_info(handle)
        assert kfd["current_partition_id"] == part
        assert kfd["node_id"] == 2 + index  # two CPU nodes come first
        assert isinstance(kfd["kfd_id"], int)
        assert 0 < kfd["kfd_id"] < 1 << 16
        kfd_ids.add(kfd["kfd_id"])
        enum_info = emu.amdsmi_get_gpu_enumeration_info(handle)
        assert enum_info["drm_render"] == 128 + 8 * gpu + part
        assert enum_info["drm_card"] == 8 * gpu + part
        assert enum_info["hip_id"] == index
        assert enum_info["hsa_id"] == kfd["node_id"]
        assert enum_info["hip_uuid"].startswith("GPU-")
        assert len(enum_info["hip_uuid"]) == 20
        hip_uuids.add(enum_info["hip_uuid"])
        uuid = emu.amdsmi_get_gpu_device_uuid(handle)
        assert len(uuid) == 36
        assert uuid[2:8] == "ff74a1"
        uuids.add(uuid)
        asic = emu.amdsmi_get_gpu_asic_info(handle)
        assert asic["market_name"] == "AMD Instinct MI300X"
        assert asic["device_id"] == "0x74a1"
        assert asic["target_graphics_version"] == "gfx942"
        assert asic["num_compute_units"] == cus
        assert emu.amdsmi_get_gpu_xcd_counter(handle) == 8 // parts
        assert emu.amdsmi_get_gpu_bdf_id(handle) >> 28 & 0xF == part
    # ROCm >= 7.0: every partition has its own UUID (§2.2); KFD ids are unique per node.
    assert len(uuids) == len(hip_uuids) == len(kfd_ids) == len(handles)
    for handle in primaries(emu):
        assert emu.amdsmi_get_gpu_compute_partition(handle) == mode
        assert emu.amdsmi_get_gpu_memory_partition(handle) == "NPS1"


def test_uuid_shared_by_partitions_before_rocm_7(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file, rocm_version="6.4.1")
    lib.amdsmi_init()
    set_compute(lib, 0, "CPX")
    handles = lib.amdsmi_get_processor_handles()
    gpu0 = {lib.amdsmi_get_gpu_device_uuid(h) for h in handles[:8]}
    assert len(gpu0) == 1
    assert lib.amdsmi_get_gpu_device_uuid(handles[8]) not in gpu0


def test_fewer_gpus_and_bdf_lookup(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file, gpu_count=2)
    lib.amdsmi_init()
    set_compute(lib, 1, "DPX")
    handles = lib.amdsmi_get_processor_handles()
    assert [lib.amdsmi_get_gpu_device_bdf(h) for h in handles] == [
        "0000:05:00.0",
        "0000:26:00.0",
        "0000:26:00.1",
    ]
    found = lib.amdsmi_get_processor_handle_from_bdf("0000:26:00.1")
    assert lib.amdsmi_get_gpu_kfd_info(found)["current_partition_id"] == 1
    assert status_of(lib.amdsmi_get_processor_handle_from_bdf, "0000:46:00.0") == NOT_FOUND
    with pytest.raises(AmdSmiBdfFormatException):
        lib.amdsmi_get_processor_handle_from_bdf("gpu1")


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        ({"gpu_count": 0}, "gpu_count"),
        ({"gpu_count": 9}, "gpu_count"),
        ({"gpu_count": True}, "gpu_count"),
        ({"partition_caps": ("NPS8",)}, "partition_caps"),
        ({"partition_caps": ()}, "partition_caps"),
        ({"rocm_version": "seven"}, "rocm_version"),
        ({"reload_seconds": -1.0}, "reload_seconds"),
    ],
)
def test_bad_constructor_arguments(state_file: Path, kwargs: dict[str, Any], argument: str) -> None:
    with pytest.raises(ValueError, match=argument):
        EmulatedAmdSmi(state_file, **kwargs)


# ------------------------------------------------------------------------------ memory


@pytest.mark.parametrize(("mode", "parts", "_cus", "secondary_mb"), MODES)
def test_memory_reporting_per_mode(
    emu: EmulatedAmdSmi, mode: str, parts: int, _cus: int, secondary_mb: int | None
) -> None:
    set_all_compute(emu, mode)
    for index, handle in enumerate(emu.amdsmi_get_processor_handles()):
        part = index % parts
        usage = emu.amdsmi_get_gpu_vram_usage(handle)
        total = emu.amdsmi_get_gpu_memory_total(handle, AmdSmiMemoryType.VRAM)
        used = emu.amdsmi_get_gpu_memory_usage(handle, AmdSmiMemoryType.VRAM)
        if part == 0:
            # §2.4: the primary reports the whole GPU in every mode, 283 MB used when idle.
            assert usage == {"vram_total": 196592, "vram_used": 283}
        else:
            assert usage["vram_total"] == secondary_mb
        assert total == usage["vram_total"] * MIB  # bytes, not MB
        assert used // MIB == usage["vram_used"]


def test_holder_vram_counts_on_its_partition_only(emu: EmulatedAmdSmi) -> None:
    set_compute(emu, 0, "DPX")
    emu.register_holder(os.getpid(), gpu=0, partition=1, name="vllm", vram_bytes=10 * GIB)
    try:
        handles = emu.amdsmi_get_processor_handles()
        primary, secondary = handles[0], handles[1]
        assert emu.amdsmi_get_gpu_vram_usage(primary)["vram_used"] == 283
        assert emu.amdsmi_get_gpu_vram_usage(secondary)["vram_used"] == 512 + 10 * 1024
        assert emu.amdsmi_get_gpu_memory_usage(secondary, AmdSmiMemoryType.VRAM) == 512 * MIB + 10 * GIB
    finally:
        emu.unregister_holder(os.getpid())


# ------------------------------------------------------------------------------ processes


def test_process_list_shape_and_pdd_on_every_device(emu: EmulatedAmdSmi) -> None:
    set_compute(emu, 1, "QPX")
    emu.register_holder(os.getpid(), gpu=1, partition=2, name="vllm", vram_bytes=3 * GIB)
    try:
        handles = emu.amdsmi_get_processor_handles()
        assert len(handles) == 11
        held = handles[1 + 2]  # gpu 0 (SPX) is index 0, then gpu 1's four partitions
        (entry,) = emu.amdsmi_get_gpu_process_list(held)
        assert entry == {
            "name": "vllm",
            "pid": os.getpid(),
            "mem": 3 * GIB,
            "engine_usage": {"gfx": 0, "enc": 0},
            "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 3 * GIB},
            "cu_occupancy": 0,
        }
        # §6.1: the same process appears with 0 VRAM on every other device of every GPU.
        for handle in handles:
            if handle is held:
                continue
            (other,) = emu.amdsmi_get_gpu_process_list(handle)
            assert other["pid"] == os.getpid()
            assert other["memory_usage"]["vram_mem"] == 0
            assert other["mem"] == 0
    finally:
        emu.unregister_holder(os.getpid())
    assert emu.amdsmi_get_gpu_process_list(handles[0]) == []


# ------------------------------------------------------------------------------ errors


def test_busy_with_a_real_child_process(emu: EmulatedAmdSmi, state_file: Path) -> None:
    with subprocess.Popen(["sleep", "60"]) as child:
        try:
            emu.register_holder(child.pid, gpu=2, partition=0, vram_bytes=GIB)
            assert json.loads(state_file.read_text())["holders"][0]["pid"] == child.pid
            target = primaries(emu)[2]
            cpx = AmdSmiComputePartitionType.CPX
            assert status_of(emu.amdsmi_set_gpu_compute_partition, target, cpx) == BUSY
            # Setting the mode it already has is a no-op, busy or not.
            emu.amdsmi_set_gpu_compute_partition(target, AmdSmiComputePartitionType.SPX)
            # The busy check is per device: another GPU switches (§3.3 3.).
            set_compute(emu, 5, "CPX")
            assert len(emu.amdsmi_get_processor_handles()) == 15
        finally:
            child.kill()
            child.wait()
    # The dead pid is pruned when holders are next read, so the switch goes through.
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[2], AmdSmiComputePartitionType.CPX)
    assert json.loads(state_file.read_text())["holders"] == []


def test_a_zombie_no_longer_holds_the_device(emu: EmulatedAmdSmi) -> None:
    with subprocess.Popen(["sleep", "60"]) as child:
        emu.register_holder(child.pid, gpu=0, partition=0)
        target = primaries(emu)[0]
        child.kill()  # not reaped yet: a zombie has closed /dev/kfd already
        deadline = time.monotonic() + 10
        while emu.amdsmi_get_gpu_process_list(target) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert emu.amdsmi_get_gpu_process_list(target) == []
        child.wait()


def test_strict_busy_blocks_every_gpu(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file, strict_busy=True)
    lib.amdsmi_init()
    lib.register_holder(os.getpid(), gpu=0, partition=0)
    target = primaries(lib)[7]
    assert status_of(lib.amdsmi_set_gpu_compute_partition, target, AmdSmiComputePartitionType.DPX) == BUSY


def test_unprivileged_caller(state_file: Path) -> None:
    lib = EmulatedAmdSmi(state_file, privileged=False)
    lib.amdsmi_init()
    lib.register_holder(os.getpid(), gpu=0, partition=0, name="vllm")
    prim = primaries(lib)[1]
    assert status_of(lib.amdsmi_set_gpu_compute_partition, prim, AmdSmiComputePartitionType.CPX) == NO_PERM
    assert status_of(lib.amdsmi_set_gpu_memory_partition, prim, AmdSmiMemoryPartitionType.NPS4) == NO_PERM
    assert status_of(lib.amdsmi_set_gpu_accelerator_partition_profile, prim, 3) == NO_PERM
    assert status_of(lib.amdsmi_get_gpu_accelerator_partition_profile_config, prim) == NO_PERM
    assert status_of(lib.amdsmi_gpu_driver_reload) == NO_PERM
    # Reads still work; other users' process names show as "N/A" (§4.3).
    assert lib.amdsmi_get_gpu_compute_partition(prim) == "SPX"
    assert [p["name"] for p in lib.amdsmi_get_gpu_process_list(prim)] == ["N/A"]


@pytest.mark.parametrize(
    "call",
    [
        lambda lib, h: lib.amdsmi_get_gpu_compute_partition(h),
        lambda lib, h: lib.amdsmi_get_gpu_memory_partition(h),
        lambda lib, h: lib.amdsmi_get_gpu_memory_partition_config(h),
        lambda lib, h: lib.amdsmi_set_gpu_compute_partition(h, AmdSmiComputePartitionType.SPX),
        lambda lib, h: lib.amdsmi_set_gpu_accelerator_partition_profile(h, 0),
        lambda lib, h: lib.amdsmi_set_gpu_memory_partition(h, AmdSmiMemoryPartitionType.NPS4),
        lambda lib, h: lib.amdsmi_set_gpu_memory_partition_mode(h, AmdSmiMemoryPartitionType.NPS4),
    ],
)
def test_secondary_partitions_are_not_supported(
    emu: EmulatedAmdSmi, call: Callable[[EmulatedAmdSmi, EmulatedProcessorHandle], object]
) -> None:
    set_compute(emu, 0, "CPX")
    secondary = emu.amdsmi_get_processor_handles()[3]
    assert status_of(call, emu, secondary) == NOT_SUPPORTED


def test_accelerator_profile(emu: EmulatedAmdSmi) -> None:
    set_compute(emu, 0, "CPX")
    handles = emu.amdsmi_get_processor_handles()
    profile = emu.amdsmi_get_gpu_accelerator_partition_profile(handles[0])
    assert profile == {
        "partition_id": [0],
        "partition_profile": {
            "profile_type": "CPX",
            "num_partitions": 8,
            "profile_index": 3,
            "memory_caps": ["NPS1", "NPS4"],
            "num_resources": 4,
            "resources": "N/A",
        },
    }
    # On a secondary the 7.0.2 wrapper swallows NOT_SUPPORTED and returns "N/A" fields (§4.3).
    secondary = emu.amdsmi_get_gpu_accelerator_partition_profile(handles[5])
    assert secondary["partition_id"] == [5]
    assert secondary["partition_profile"]["profile_type"] == "N/A"
    config = emu.amdsmi_get_gpu_accelerator_partition_profile_config(handles[0])
    assert [p["profile_type"] for p in config["profiles"]] == ["SPX", "DPX", "QPX", "CPX"]
    assert config["resource_profiles"] == config["profiles"][-1]["resources"]
    emu.amdsmi_set_gpu_accelerator_partition_profile(handles[8], 1)  # gpu 1 primary -> DPX
    reinit(emu)
    assert emu.amdsmi_get_gpu_compute_partition(primaries(emu)[1]) == "DPX"


def test_setting_unavailable_for_the_current_nps(emu: EmulatedAmdSmi) -> None:
    tpx = AmdSmiComputePartitionType.TPX
    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[0], tpx) == SETTING_UNAVAILABLE
    invalid = AmdSmiComputePartitionType.INVALID
    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[0], invalid) == INVAL
    stage_and_reload(emu, "NPS4")
    prim = primaries(emu)[4]
    # §1.4 kernel rule: only QPX and CPX go with NPS4.
    for mode in ("SPX", "DPX"):
        status = status_of(emu.amdsmi_set_gpu_compute_partition, prim, AmdSmiComputePartitionType[mode])
        assert status == SETTING_UNAVAILABLE
    set_compute(emu, 4, "QPX")
    assert emu.amdsmi_get_gpu_compute_partition(primaries(emu)[4]) == "QPX"


@pytest.mark.parametrize(
    ("caps", "mode", "expected"),
    [
        (("NPS1", "NPS4"), "NPS8", INVAL),
        (("NPS1", "NPS4"), "NPS2", INVAL),
        (("NPS1", "NPS4"), "UNKNOWN", INVAL),
        (("NPS1",), "NPS4", INVAL),
        (("NPS1", "NPS2", "NPS4"), "NPS2", None),
    ],
)
def test_memory_modes_outside_caps_are_inval(
    state_file: Path, caps: tuple[str, ...], mode: str, expected: int | None
) -> None:
    lib = EmulatedAmdSmi(state_file, partition_caps=caps)
    lib.amdsmi_init()
    prim = primaries(lib)[0]
    assert lib.amdsmi_get_gpu_memory_partition_config(prim)["partition_caps"] == list(caps)
    call = lib.amdsmi_set_gpu_memory_partition
    if expected is not None:
        assert status_of(call, prim, AmdSmiMemoryPartitionType[mode]) == expected
    else:
        call(prim, AmdSmiMemoryPartitionType[mode])
        lib.amdsmi_gpu_driver_reload()
        reinit(lib)
        # NPS2's AUTO compute mode is DPX: 16 devices.
        assert len(lib.amdsmi_get_processor_handles()) == 16


# ------------------------------------------------------------------------------ staged NPS


def test_staged_nps_applies_hive_wide_at_reload(emu: EmulatedAmdSmi, state_file: Path) -> None:
    set_compute(emu, 0, "DPX")
    handles = emu.amdsmi_get_processor_handles()
    # Stage through GPU 3: the request is for the whole hive (§1.3).
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[3], AmdSmiMemoryPartitionType.NPS4)
    assert json.loads(state_file.read_text())["staged_memory_partition"] == "NPS4"
    # Staging changes nothing yet: same modes, same handles (§3.2).
    assert emu.amdsmi_get_gpu_device_bdf(handles[0]) == "0000:05:00.0"
    for prim in primaries(emu):
        assert emu.amdsmi_get_gpu_memory_partition(prim) == "NPS1"
        assert emu.amdsmi_get_gpu_memory_partition_config(prim)["mp_mode"] == "NPS1"
    emu.amdsmi_gpu_driver_reload()
    assert status_of(emu.amdsmi_get_gpu_device_bdf, handles[0]) == NOT_FOUND
    reinit(emu)
    assert len(emu.amdsmi_get_processor_handles()) == 64
    for prim in primaries(emu):
        # AUTO mode for NPS4 is CPX, on every GPU, including the one that was DPX.
        assert emu.amdsmi_get_gpu_compute_partition(prim) == "CPX"
        assert emu.amdsmi_get_gpu_memory_partition(prim) == "NPS4"
    stage_and_reload(emu, "NPS1", gpu=6)
    assert len(emu.amdsmi_get_processor_handles()) == 8
    assert {emu.amdsmi_get_gpu_compute_partition(p) for p in primaries(emu)} == {"SPX"}


def test_staging_the_current_mode_cancels_a_pending_change(emu: EmulatedAmdSmi) -> None:
    set_compute(emu, 2, "CPX")
    prim = primaries(emu)[0]
    emu.amdsmi_set_gpu_memory_partition(prim, AmdSmiMemoryPartitionType.NPS4)
    emu.amdsmi_set_gpu_memory_partition(prim, AmdSmiMemoryPartitionType.NPS1)
    emu.amdsmi_gpu_driver_reload()
    reinit(emu)
    # Still NPS1; the reload itself reverted GPU 2 to the AUTO mode, SPX (§3.4).
    assert len(emu.amdsmi_get_processor_handles()) == 8


def test_reload_fails_while_gpu_users_remain(emu: EmulatedAmdSmi, state_file: Path) -> None:
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[0], AmdSmiMemoryPartitionType.NPS4)
    emu.register_holder(os.getpid(), gpu=7, partition=0)
    assert status_of(emu.amdsmi_gpu_driver_reload) == RESTART_ERR
    # Nothing happened: still NPS1 with the change pending, handles still valid.
    assert emu.amdsmi_get_gpu_memory_partition(primaries(emu)[0]) == "NPS1"
    assert json.loads(state_file.read_text())["staged_memory_partition"] == "NPS4"
    emu.unregister_holder(os.getpid())
    emu.amdsmi_gpu_driver_reload()
    reinit(emu)
    assert emu.amdsmi_get_gpu_memory_partition(primaries(emu)[0]) == "NPS4"


@pytest.mark.parametrize(("injected", "expected"), [((), RESTART_ERR), ((34,), 34)])
def test_injected_reload_failure_then_recovery(emu: EmulatedAmdSmi, injected: tuple[int, ...], expected: int) -> None:
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[0], AmdSmiMemoryPartitionType.NPS4)
    emu.fail_next_reload(*injected)
    assert status_of(emu.amdsmi_gpu_driver_reload) == expected
    assert emu.amdsmi_get_gpu_memory_partition(primaries(emu)[0]) == "NPS1"
    emu.amdsmi_gpu_driver_reload()  # only the next reload fails
    reinit(emu)
    assert emu.amdsmi_get_gpu_memory_partition(primaries(emu)[0]) == "NPS4"


def test_reload_takes_reload_seconds_on_the_injected_clock(state_file: Path) -> None:
    slept: list[float] = []
    lib = EmulatedAmdSmi(state_file, reload_seconds=140.0, clock=slept.append)
    lib.amdsmi_init()
    lib.register_holder(os.getpid(), gpu=0, partition=0)
    assert status_of(lib.amdsmi_gpu_driver_reload) == RESTART_ERR
    assert slept == []  # modprobe -r fails at once while users remain
    lib.unregister_holder(os.getpid())
    lib.amdsmi_gpu_driver_reload()
    assert slept == [140.0]


# ------------------------------------------------------------------------------ stale handles


@pytest.mark.parametrize(
    "call",
    [
        lambda lib, h: lib.amdsmi_get_gpu_device_bdf(h),
        lambda lib, h: lib.amdsmi_get_gpu_device_uuid(h),
        lambda lib, h: lib.amdsmi_get_gpu_kfd_info(h),
        lambda lib, h: lib.amdsmi_get_gpu_enumeration_info(h),
        lambda lib, h: lib.amdsmi_get_gpu_asic_info(h),
        lambda lib, h: lib.amdsmi_get_gpu_board_info(h),
        lambda lib, h: lib.amdsmi_get_gpu_vram_usage(h),
        lambda lib, h: lib.amdsmi_get_gpu_memory_total(h, AmdSmiMemoryType.VRAM),
        lambda lib, h: lib.amdsmi_get_gpu_memory_usage(h, AmdSmiMemoryType.VRAM),
        lambda lib, h: lib.amdsmi_get_gpu_process_list(h),
        lambda lib, h: lib.amdsmi_get_gpu_compute_partition(h),
        lambda lib, h: lib.amdsmi_set_gpu_compute_partition(h, AmdSmiComputePartitionType.DPX),
        lambda lib, h: lib.amdsmi_set_gpu_memory_partition(h, AmdSmiMemoryPartitionType.NPS4),
    ],
)
def test_handles_go_stale_after_a_partition_change(
    emu: EmulatedAmdSmi, call: Callable[[EmulatedAmdSmi, EmulatedProcessorHandle], object]
) -> None:
    old = emu.amdsmi_get_processor_handles()
    emu.amdsmi_set_gpu_compute_partition(old[1], AmdSmiComputePartitionType.CPX)
    assert status_of(call, emu, old[0]) == NOT_FOUND


def test_enumeration_refreshes_only_at_init(emu: EmulatedAmdSmi) -> None:
    old = emu.amdsmi_get_processor_handles()
    emu.amdsmi_set_gpu_compute_partition(old[0], AmdSmiComputePartitionType.CPX)
    # The library enumerated at init: until shutdown+init it hands back the stale list (§6.3).
    stale = emu.amdsmi_get_processor_handles()
    assert len(stale) == 8
    assert status_of(emu.amdsmi_get_gpu_device_bdf, stale[0]) == NOT_FOUND
    assert status_of(emu.amdsmi_get_socket_info, emu.amdsmi_get_socket_handles()[0]) == NOT_FOUND
    # The profile getter never raises in 7.0.2; it returns the zeroed struct instead (§4.3).
    zeroed = emu.amdsmi_get_gpu_accelerator_partition_profile(stale[0])
    assert zeroed["partition_profile"]["profile_type"] == "N/A"
    reinit(emu)
    fresh = emu.amdsmi_get_processor_handles()
    assert len(fresh) == 15
    assert emu.amdsmi_get_gpu_device_bdf(fresh[7]) == "0000:05:00.7"


def test_handles_do_not_survive_a_full_shutdown(emu: EmulatedAmdSmi) -> None:
    old = emu.amdsmi_get_processor_handles()[0]
    reinit(emu)
    assert status_of(emu.amdsmi_get_gpu_device_bdf, old) == NOT_FOUND


# ------------------------------------------------------------------------------ persistence


def test_state_persists_across_instances(state_file: Path) -> None:
    first = EmulatedAmdSmi(state_file)
    first.amdsmi_init()
    set_compute(first, 3, "CPX")
    first.amdsmi_set_gpu_memory_partition(primaries(first)[0], AmdSmiMemoryPartitionType.NPS4)
    first.register_holder(os.getpid(), gpu=3, partition=5, name="vllm", vram_bytes=GIB)
    first.amdsmi_shut_down()

    doc = json.loads(state_file.read_text())
    assert doc["version"] == 1
    assert doc["compute_partitions"][3] == "CPX"

    second = EmulatedAmdSmi(state_file)
    second.amdsmi_init()
    handles = second.amdsmi_get_processor_handles()
    assert len(handles) == 15
    assert second.amdsmi_get_gpu_compute_partition(primaries(second)[3]) == "CPX"
    held = handles[3 + 5]
    assert second.amdsmi_get_gpu_process_list(held)[0]["mem"] == GIB
    # The staged NPS survived too; the holder blocks the reload until it is gone.
    assert status_of(second.amdsmi_gpu_driver_reload) == RESTART_ERR
    second.unregister_holder(os.getpid())
    second.amdsmi_gpu_driver_reload()
    reinit(second)
    assert len(second.amdsmi_get_processor_handles()) == 64


def test_in_memory_emulator_writes_nothing(tmp_path: Path) -> None:
    lib = EmulatedAmdSmi(None)
    lib.amdsmi_init()
    set_compute(lib, 0, "CPX")
    assert len(lib.amdsmi_get_processor_handles()) == 15
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_a_fresh_host_and_is_created(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "host.json"
    lib = EmulatedAmdSmi(path)
    lib.amdsmi_init()
    assert len(lib.amdsmi_get_processor_handles()) == 8
    assert json.loads(path.read_text())["memory_partition"] == "NPS1"


def _valid_doc() -> dict[str, Any]:
    return {
        "version": 1,
        "gpu_count": 8,
        "compute_partitions": ["SPX"] * 8,
        "memory_partition": "NPS1",
        "staged_memory_partition": None,
        "holders": [],
    }


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        (json.dumps({**_valid_doc(), "version": 2}), "version 2"),
        (json.dumps({**_valid_doc(), "version": None}), "version None"),
        (json.dumps({**_valid_doc(), "gpu_count": 4}), "gpu_count"),
        (json.dumps({**_valid_doc(), "memory_partition": "NPS4"}), "cannot be in"),
        (json.dumps({**_valid_doc(), "compute_partitions": ["XPX"] * 8}), "malformed"),
        (json.dumps({k: v for k, v in _valid_doc().items() if k != "holders"}), "malformed"),
    ],
)
def test_unusable_state_file_names_the_file(state_file: Path, content: str, fragment: str) -> None:
    state_file.write_text(content)
    with pytest.raises(EmulatorStateError) as info:
        EmulatedAmdSmi(state_file)
    message = str(info.value)
    assert str(state_file) in message
    assert "delete it" in message
    assert fragment in message


def test_writes_leave_no_temp_file(emu: EmulatedAmdSmi, state_file: Path) -> None:
    set_compute(emu, 0, "DPX")
    emu.register_holder(os.getpid(), gpu=1, partition=0)
    emu.unregister_holder(os.getpid())
    assert leftover_temp_files(state_file.parent) == []


def test_failed_write_keeps_the_old_file_and_no_temp(
    emu: EmulatedAmdSmi, state_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = state_file.read_bytes()

    def broken_replace(src: str, dst: object) -> None:
        raise OSError("disk full")

    # The emulator calls os.replace for the atomic rename; make that step fail.
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        emu.register_holder(os.getpid(), gpu=0, partition=0)
    monkeypatch.undo()
    assert state_file.read_bytes() == before
    assert leftover_temp_files(state_file.parent) == []


# ------------------------------------------------------------------------------ threads


def test_concurrent_callers(emu: EmulatedAmdSmi) -> None:
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for _ in range(100):
                for handle in emu.amdsmi_get_processor_handles():
                    emu.amdsmi_get_gpu_vram_usage(handle)
                    emu.amdsmi_get_gpu_process_list(handle)
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    def writer() -> None:
        try:
            for _ in range(100):
                emu.register_holder(os.getpid(), gpu=1, partition=0, vram_bytes=GIB)
                emu.unregister_holder(os.getpid())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)] + [threading.Thread(target=writer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
