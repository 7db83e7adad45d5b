"""Faults injected into the emulated host through its faults file, directly and through AmdSmiGpuBackend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend
from gpushared.adapters.emulated_amdsmi import (
    FAULTS_FILE,
    AmdSmiComputePartitionType,
    AmdSmiLibraryException,
    AmdSmiMemoryPartitionType,
    AmdSmiMemoryType,
    EmulatedAmdSmi,
    EmulatedProcessorHandle,
    EmulatorFaults,
    EmulatorFaultsError,
    FaultHolder,
    clear_faults,
    write_faults,
)
from gpushared.domain.errors import HardwareError
from gpushared.domain.gpu import GIB, MIB, ComputePartition, MemoryPartition

NO_PERM, FILE_ERROR, BUSY, DRIVER_NOT_LOADED, RESTART_ERR = 10, 14, 30, 34, 54
CPX = AmdSmiComputePartitionType.CPX
NPS4 = AmdSmiMemoryPartitionType.NPS4


# ------------------------------------------------------------------------------ helpers


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


def open_host(state_dir: Path, **kwargs: Any) -> EmulatedAmdSmi:
    lib = EmulatedAmdSmi(state_dir / "emulated-host.json", **kwargs)
    lib.amdsmi_init()
    return lib


@pytest.fixture
def emu(state_dir: Path) -> Iterator[EmulatedAmdSmi]:
    lib = open_host(state_dir)
    yield lib
    lib.amdsmi_shut_down()


@pytest.fixture
def backend(state_dir: Path) -> Iterator[AmdSmiGpuBackend]:
    b = AmdSmiGpuBackend(EmulatedAmdSmi(state_dir / "emulated-host.json"), name="emulated")
    yield b
    b.close()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A live process to name as a holder."""
    with subprocess.Popen(["sleep", "60"]) as child:
        yield child
        child.kill()


def status_of(call: Callable[..., object], *args: object) -> int:
    with pytest.raises(AmdSmiLibraryException) as info:
        call(*args)
    return info.value.err_code


def hardware_status(call: Callable[..., object], *args: object) -> HardwareError:
    with pytest.raises(HardwareError) as info:
        call(*args)
    return info.value


def reinit(lib: EmulatedAmdSmi) -> None:
    lib.amdsmi_shut_down()
    lib.amdsmi_init()


def primaries(lib: EmulatedAmdSmi) -> list[EmulatedProcessorHandle]:
    handles = lib.amdsmi_get_processor_handles()
    return [h for h in handles if lib.amdsmi_get_gpu_kfd_info(h)["current_partition_id"] == 0]


def host_state(state_dir: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((state_dir / "emulated-host.json").read_text())
    return doc


# ------------------------------------------------------------------------------ the file


def test_no_file_is_no_faults_and_write_then_clear(emu: EmulatedAmdSmi, state_dir: Path, sleeper: Any) -> None:
    assert not (state_dir / FAULTS_FILE).exists()
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[0], CPX)
    reinit(emu)

    path = write_faults(
        state_dir,
        EmulatorFaults(
            unprivileged=True,
            fail_reload="AMDSMI_STATUS_AMDGPU_RESTART_ERR",
            fail_reload_count=2,
            reload_seconds=1.5,
            ignore_compute_set=(1,),
            holders=(FaultHolder(pid=sleeper.pid, gpu=3, name="vllm", vram_bytes=GIB),),
            busy_gpus=(4, 5),
            kill_after="reload",
        ),
    )
    assert path == state_dir / FAULTS_FILE
    doc = json.loads(path.read_text())
    start_time = int(Path(f"/proc/{sleeper.pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    assert doc == {
        "revision": doc["revision"],
        "unprivileged": True,
        "fail_reload": "AMDGPU_RESTART_ERR",  # the prefix is optional and dropped
        "fail_reload_count": 2,
        "reload_seconds": 1.5,
        "ignore_compute_set": [1],
        "holders": [
            {"pid": sleeper.pid, "gpu": 3, "partition": 0, "name": "vllm", "vram_bytes": GIB, "start_time": start_time}
        ],
        "busy_gpus": [4, 5],
        "kill_after": "reload",
    }
    assert EmulatorFaults.from_json(doc).holders[0].start_time == start_time
    assert sorted(p.name for p in state_dir.iterdir()) == ["emulated-host.json", FAULTS_FILE], "no temp file left"
    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[2], CPX) == NO_PERM

    clear_faults(state_dir)
    clear_faults(state_dir)  # clearing twice is fine
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[2], CPX)


def test_every_write_has_a_new_revision(state_dir: Path) -> None:
    revisions = {json.loads(write_faults(state_dir, EmulatorFaults()).read_text())["revision"] for _ in range(3)}
    assert len(revisions) == 3


def test_in_memory_emulator_has_no_faults_file(tmp_path: Path) -> None:
    write_faults(tmp_path, EmulatorFaults(unprivileged=True))
    lib = EmulatedAmdSmi(None)
    lib.amdsmi_init()
    lib.amdsmi_set_gpu_compute_partition(primaries(lib)[0], CPX)


def test_faults_written_by_another_process_apply_on_the_next_call(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    code = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from gpushared.adapters.emulated_amdsmi import EmulatorFaults, clear_faults, write_faults
        state_dir, what = Path(sys.argv[1]), sys.argv[2]
        if what == "clear":
            clear_faults(state_dir)
        else:
            write_faults(state_dir, EmulatorFaults(busy_gpus=(6,), unprivileged=what == "unprivileged"))
        """
    )

    def in_another_process(what: str) -> None:
        subprocess.run([sys.executable, "-c", code, str(state_dir), what], check=True, timeout=60)

    target = primaries(emu)[6]
    emu.amdsmi_set_gpu_compute_partition(target, AmdSmiComputePartitionType.SPX)  # healthy before

    in_another_process("busy")
    assert status_of(emu.amdsmi_set_gpu_compute_partition, target, CPX) == BUSY
    in_another_process("unprivileged")
    assert status_of(emu.amdsmi_set_gpu_compute_partition, target, CPX) == NO_PERM
    assert status_of(emu.amdsmi_gpu_driver_reload) == NO_PERM
    in_another_process("clear")
    emu.amdsmi_set_gpu_compute_partition(target, CPX)


# ------------------------------------------------------------------------------ each fault


def test_unprivileged(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    emu.register_holder(os.getpid(), gpu=7, partition=0, name="pytest")
    write_faults(state_dir, EmulatorFaults(unprivileged=True))
    prim = primaries(emu)[1]
    assert status_of(emu.amdsmi_set_gpu_compute_partition, prim, CPX) == NO_PERM
    assert status_of(emu.amdsmi_set_gpu_accelerator_partition_profile, prim, 3) == NO_PERM
    assert status_of(emu.amdsmi_set_gpu_memory_partition, prim, NPS4) == NO_PERM
    assert status_of(emu.amdsmi_set_gpu_memory_partition_mode, prim, NPS4) == NO_PERM
    assert status_of(emu.amdsmi_get_gpu_accelerator_partition_profile_config, prim) == NO_PERM
    assert status_of(emu.amdsmi_gpu_driver_reload) == NO_PERM
    # As for a caller that is not root: reads work, other users' process names are hidden.
    assert emu.amdsmi_get_gpu_compute_partition(prim) == "SPX"
    assert [p["name"] for p in emu.amdsmi_get_gpu_process_list(prim)] == ["N/A"]
    clear_faults(state_dir)
    assert [p["name"] for p in emu.amdsmi_get_gpu_process_list(prim)] == ["pytest"]


def test_fail_reload_counts_down_and_leaves_the_host_unchanged(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[3], AmdSmiComputePartitionType.DPX)
    reinit(emu)
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[0], NPS4)
    handles = emu.amdsmi_get_processor_handles()
    write_faults(state_dir, EmulatorFaults(fail_reload="AMDGPU_RESTART_ERR", fail_reload_count=2))

    for used in (1, 2):
        assert status_of(emu.amdsmi_gpu_driver_reload) == RESTART_ERR
        # Like a refused modprobe -r: still staged, every GPU in its old mode, handles valid.
        state = host_state(state_dir)
        assert (state["memory_partition"], state["staged_memory_partition"]) == ("NPS1", "NPS4")
        assert state["compute_partitions"][3] == "DPX"
        assert state["fault_use"]["failed_reloads"] == used
        assert emu.amdsmi_get_processor_handles() == handles
        assert emu.amdsmi_get_gpu_memory_partition(handles[0]) == "NPS1"

    emu.amdsmi_gpu_driver_reload()
    reinit(emu)
    assert emu.amdsmi_get_gpu_memory_partition(primaries(emu)[0]) == "NPS4"
    assert len(emu.amdsmi_get_processor_handles()) == 64


def test_fail_reload_use_survives_a_restart_and_a_rewrite_rearms_it(state_dir: Path) -> None:
    faults = EmulatorFaults(fail_reload="DRIVER_NOT_LOADED", fail_reload_count=2)
    write_faults(state_dir, faults)
    first = open_host(state_dir)
    assert status_of(first.amdsmi_gpu_driver_reload) == DRIVER_NOT_LOADED
    del first  # the daemon is killed; its successor opens the same state

    second = open_host(state_dir)
    assert status_of(second.amdsmi_gpu_driver_reload) == DRIVER_NOT_LOADED
    second.amdsmi_gpu_driver_reload()  # the count is used up across both processes
    reinit(second)
    second.amdsmi_gpu_driver_reload()

    write_faults(state_dir, faults)  # the same faults again: a new version, armed afresh
    assert status_of(second.amdsmi_gpu_driver_reload) == DRIVER_NOT_LOADED


def test_reload_seconds_override(state_dir: Path) -> None:
    slept: list[float] = []
    lib = open_host(state_dir, reload_seconds=140.0, clock=slept.append)
    write_faults(state_dir, EmulatorFaults(reload_seconds=2.5))
    lib.amdsmi_gpu_driver_reload()
    write_faults(state_dir, EmulatorFaults(reload_seconds=0))
    lib.amdsmi_gpu_driver_reload()
    write_faults(state_dir, EmulatorFaults(reload_seconds=3, fail_reload="AMDGPU_RESTART_ERR"))
    assert status_of(lib.amdsmi_gpu_driver_reload) == RESTART_ERR  # a failing reload takes its time too
    clear_faults(state_dir)
    lib.amdsmi_gpu_driver_reload()
    assert slept == [2.5, 3.0, 140.0]


def test_ignored_compute_set_succeeds_without_changing_the_mode(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    write_faults(state_dir, EmulatorFaults(ignore_compute_set=(2,)))
    handles = emu.amdsmi_get_processor_handles()
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[2], CPX)
    assert emu.amdsmi_get_gpu_compute_partition(handles[2]) == "SPX"
    assert emu.amdsmi_get_processor_handles() == handles, "nothing re-enumerated"
    assert host_state(state_dir)["compute_partitions"][2] == "SPX"
    # The usual checks still come first.
    assert status_of(emu.amdsmi_set_gpu_compute_partition, handles[2], AmdSmiComputePartitionType.TPX) == 55
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[1], CPX)  # other GPUs obey
    reinit(emu)
    assert emu.amdsmi_get_gpu_compute_partition(primaries(emu)[1]) == "CPX"


def test_injected_holders_show_up_and_block(emu: EmulatedAmdSmi, state_dir: Path, sleeper: Any) -> None:
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[3], AmdSmiComputePartitionType.DPX)
    reinit(emu)
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[0], NPS4)
    write_faults(
        state_dir,
        EmulatorFaults(holders=(FaultHolder(pid=sleeper.pid, gpu=3, partition=1, name="vllm", vram_bytes=GIB),)),
    )
    gpu3_secondary = emu.amdsmi_get_processor_handles()[4]
    assert emu.amdsmi_get_gpu_kfd_info(gpu3_secondary)["current_partition_id"] == 1

    (entry,) = emu.amdsmi_get_gpu_process_list(gpu3_secondary)
    assert (entry["pid"], entry["name"], entry["memory_usage"]["vram_mem"]) == (sleeper.pid, "vllm", GIB)
    # §6.1: listed on every device, with 0 VRAM where it holds nothing.
    assert [p["memory_usage"]["vram_mem"] for p in emu.amdsmi_get_gpu_process_list(primaries(emu)[0])] == [0]
    assert emu.amdsmi_get_gpu_memory_usage(gpu3_secondary, AmdSmiMemoryType.VRAM) == 512 * MIB + GIB
    assert emu.amdsmi_get_gpu_vram_usage(gpu3_secondary)["vram_used"] == 512 + 1024

    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[3], CPX) == BUSY
    assert status_of(emu.amdsmi_gpu_driver_reload) == RESTART_ERR
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[4], CPX)  # only its own GPU is blocked
    assert host_state(state_dir)["holders"] == [], "injected holders are not persisted as registered ones"

    sleeper.kill()
    sleeper.wait()  # a dead holder no longer counts
    reinit(emu)
    assert emu.amdsmi_get_gpu_process_list(primaries(emu)[0]) == []
    emu.amdsmi_gpu_driver_reload()


def test_holders_add_to_registered_ones_and_need_the_same_process(
    emu: EmulatedAmdSmi, state_dir: Path, sleeper: Any
) -> None:
    emu.register_holder(os.getpid(), gpu=0, partition=0, name="pytest")
    stale = FaultHolder(pid=sleeper.pid, gpu=5, start_time=1)  # the pid was recycled since
    write_faults(state_dir, EmulatorFaults(holders=(FaultHolder(pid=sleeper.pid, gpu=1, name="sleep"), stale)))
    assert [p["name"] for p in emu.amdsmi_get_gpu_process_list(primaries(emu)[2])] == ["pytest", "sleep"]
    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[1], CPX) == BUSY
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[5], CPX)


def test_busy_gpus(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    write_faults(state_dir, EmulatorFaults(busy_gpus=(0, 7)))
    assert emu.amdsmi_get_gpu_process_list(primaries(emu)[0]) == [], "held by something amdsmi does not list"
    assert status_of(emu.amdsmi_set_gpu_compute_partition, primaries(emu)[7], CPX) == BUSY
    assert status_of(emu.amdsmi_set_gpu_accelerator_partition_profile, primaries(emu)[0], 3) == BUSY
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[0], AmdSmiComputePartitionType.SPX)  # no-op: no busy check
    emu.amdsmi_set_gpu_compute_partition(primaries(emu)[6], CPX)
    reinit(emu)
    emu.amdsmi_set_gpu_memory_partition(primaries(emu)[0], NPS4)
    emu.amdsmi_gpu_driver_reload()  # reloads are not affected


# ------------------------------------------------------------------------------ malformed files


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not valid JSON"),
        ("", "is not valid JSON"),
        ("[1, 2]", "does not hold a JSON object"),
        ('{"busy_gpu": [1]}', "unknown keys ['busy_gpu']"),
        ('{"unprivileged": "yes"}', "unprivileged must be true or false"),
        ('{"fail_reload": "EXPLODED"}', "'EXPLODED' is not an amdsmi failure status name"),
        ('{"fail_reload": "SUCCESS"}', "is not an amdsmi failure status name"),
        ('{"fail_reload_count": 0}', "fail_reload_count must be >= 1"),
        ('{"reload_seconds": -1}', "reload_seconds must be >= 0"),
        ('{"busy_gpus": 3}', "busy_gpus must be a list"),
        ('{"ignore_compute_set": [true]}', "ignore_compute_set[0] must be an integer"),
        ('{"busy_gpus": [8]}', "busy_gpus[0] must be from 0 to 7"),
        ('{"busy_gpus": [2]}', "names gpu 2 in busy_gpus, but the host has 2 GPUs"),
        ('{"holders": [{"gpu": 0}]}', "holders[0] lacks ['pid']"),
        ('{"holders": [{"pid": 1, "gpu": 0, "vram": 1}]}', "holders[0] has unknown keys ['vram']"),
        ('{"holders": [{"pid": "1", "gpu": 0}]}', "holders[0].pid must be an integer"),
        ('{"holders": [{"pid": 1, "gpu": 2}]}', "names gpu 2 in holders[0].gpu, but the host has 2 GPUs"),
        ('{"kill_after": "lunch"}', "kill_after must be one of set_compute, set_memory, reload"),
    ],
)
def test_malformed_file_fails_the_call_that_reads_it(state_dir: Path, content: str, fragment: str) -> None:
    lib = open_host(state_dir, gpu_count=2)
    path = state_dir / FAULTS_FILE
    path.write_text(content)
    prim = primaries(lib)[0]
    calls: list[Callable[[], object]] = [
        lambda: lib.amdsmi_set_gpu_compute_partition(prim, CPX),
        lambda: lib.amdsmi_set_gpu_memory_partition(prim, NPS4),
        lib.amdsmi_gpu_driver_reload,
        lambda: lib.amdsmi_get_gpu_process_list(prim),
        lambda: lib.amdsmi_get_gpu_memory_usage(prim, AmdSmiMemoryType.VRAM),
    ]
    for call in calls:
        with pytest.raises(EmulatorFaultsError) as info:
            call()
        assert isinstance(info.value, AmdSmiLibraryException)
        assert info.value.err_code == FILE_ERROR
        assert info.value.path == path
        assert str(path) in info.value.detail
        assert fragment in info.value.detail
        assert str(path) in str(info.value)
    # Calls that do not depend on faults keep working, and nothing changed.
    assert lib.amdsmi_get_gpu_compute_partition(prim) == "SPX"
    assert host_state(state_dir)["staged_memory_partition"] is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"fail_reload": "NOPE"}, "not an amdsmi failure status name"),
        ({"fail_reload_count": 0}, "fail_reload_count must be >= 1"),
        ({"reload_seconds": float("nan")}, "reload_seconds must be a number"),
        ({"busy_gpus": (-1,)}, "busy_gpus[0] must be from 0 to 7"),
        ({"holders": ({"pid": 1, "gpu": 0},)}, "holders[0] must be a FaultHolder"),
        ({"kill_after": "set_power"}, "kill_after must be one of"),
    ],
)
def test_faults_are_checked_when_built(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        EmulatorFaults(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pid": 0, "gpu": 0}, "pid must be >= 1"),
        ({"pid": 1, "gpu": 0, "partition": 8}, "partition must be from 0 to 7"),
        ({"pid": 1, "gpu": 0, "name": ""}, "name must be a non-empty string"),
        ({"pid": 1, "gpu": 0, "vram_bytes": -1}, "vram_bytes must be >= 0"),
    ],
)
def test_holders_are_checked_when_built(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FaultHolder(**kwargs)


def test_unreadable_file_is_a_file_error(emu: EmulatedAmdSmi, state_dir: Path) -> None:
    (state_dir / FAULTS_FILE).mkdir()
    assert status_of(emu.amdsmi_gpu_driver_reload) == FILE_ERROR


def test_state_files_from_before_fault_injection_still_load(state_dir: Path) -> None:
    open_host(state_dir)
    path = state_dir / "emulated-host.json"
    doc = json.loads(path.read_text())
    del doc["fault_use"]
    path.write_text(json.dumps(doc))
    open_host(state_dir).amdsmi_gpu_driver_reload()


# ------------------------------------------------------------------------------ kill_after

KILLED_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from gpushared.adapters.emulated_amdsmi import (
        AmdSmiComputePartitionType, AmdSmiMemoryPartitionType, EmulatedAmdSmi,
    )
    lib = EmulatedAmdSmi(Path(sys.argv[1]) / "emulated-host.json", gpu_count=2)
    lib.amdsmi_init()
    prim = [h for h in lib.amdsmi_get_processor_handles() if lib.amdsmi_get_gpu_kfd_info(h)["current_partition_id"] == 0]
    action = sys.argv[2]
    if action == "set_compute":
        lib.amdsmi_set_gpu_compute_partition(prim[1], AmdSmiComputePartitionType.DPX)
    elif action == "set_memory":
        lib.amdsmi_set_gpu_memory_partition(prim[0], AmdSmiMemoryPartitionType.NPS4)
    else:
        lib.amdsmi_gpu_driver_reload()
    print("survived", flush=True)
    """
)


def run_killed_script(state_dir: Path, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", KILLED_SCRIPT, str(state_dir), action],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("action", "changed"),
    [
        ("set_compute", {"compute_partitions": ["SPX", "DPX"]}),
        ("set_memory", {"staged_memory_partition": "NPS4"}),
        ("reload", {"memory_partition": "NPS4", "compute_partitions": ["CPX", "CPX"], "staged_memory_partition": None}),
    ],
)
def test_kill_after_sigkills_the_caller_once_the_change_is_durable(
    state_dir: Path, action: str, changed: dict[str, Any]
) -> None:
    host = open_host(state_dir, gpu_count=2)
    if action == "reload":
        host.amdsmi_set_gpu_memory_partition(primaries(host)[0], NPS4)
    del host  # the daemon stops; the scripts below stand in for its next runs
    write_faults(state_dir, EmulatorFaults(kill_after=action))
    other = "reload" if action != "reload" else "set_compute"

    result = run_killed_script(state_dir, other)
    assert (result.returncode, result.stdout) == (0, "survived\n"), result.stderr  # other calls are not armed
    result = run_killed_script(state_dir, action)
    assert (result.returncode, result.stdout) == (-9, ""), result.stderr
    state = host_state(state_dir)
    for key, value in changed.items():
        assert state[key] == value
    assert state["fault_use"]["killed"] is True

    result = run_killed_script(state_dir, action)  # the restarted caller is not killed again
    assert (result.returncode, result.stdout) == (0, "survived\n"), result.stderr


# ------------------------------------------------------------------------------ through the backend


def test_backend_statuses_for_each_fault(backend: AmdSmiGpuBackend, state_dir: Path, sleeper: Any) -> None:
    write_faults(state_dir, EmulatorFaults(unprivileged=True))
    for call, args in (
        (backend.set_compute_partition, (0, ComputePartition.CPX)),
        (backend.set_memory_partition, (0, MemoryPartition.NPS4)),
        (backend.reload_driver, ()),
    ):
        error = hardware_status(call, *args)
        assert error.status == "NO_PERM"
        assert "AMDSMI_STATUS_NO_PERM (10)" in error.message

    write_faults(state_dir, EmulatorFaults(busy_gpus=(2,)))
    error = hardware_status(backend.set_compute_partition, 2, ComputePartition.CPX)
    assert (error.status, error.message.split(":")[0]) == ("BUSY", "gpu 2 (0000")

    write_faults(state_dir, EmulatorFaults(holders=(FaultHolder(pid=sleeper.pid, gpu=4, vram_bytes=GIB),)))
    assert [(p.pid, p.vram_bytes) for p in backend.list_processes(4)[0]] == [(sleeper.pid, GIB)]
    assert [(p.pid, p.vram_bytes) for p in backend.list_processes(1)[0]] == [(sleeper.pid, 0)]
    assert backend.observe().gpus[4].memory_used_bytes == 283 * MIB + GIB
    assert hardware_status(backend.set_compute_partition, 4, ComputePartition.CPX).status == "BUSY"
    assert hardware_status(backend.reload_driver).status == "AMDGPU_RESTART_ERR"

    write_faults(state_dir, EmulatorFaults(ignore_compute_set=(5,)))
    backend.set_compute_partition(5, ComputePartition.CPX)
    backend.set_compute_partition(6, ComputePartition.CPX)
    modes = [g.compute_partition for g in backend.observe().gpus]
    assert modes[5:7] == [ComputePartition.SPX, ComputePartition.CPX], "only a read-back shows the ignored write"

    backend.set_memory_partition(0, MemoryPartition.NPS4)
    write_faults(state_dir, EmulatorFaults(fail_reload="AMDGPU_RESTART_ERR"))
    error = hardware_status(backend.reload_driver)
    assert error.status == "AMDGPU_RESTART_ERR"
    assert error.message.startswith("all GPUs: reload the amdgpu driver: AMDSMI_STATUS_AMDGPU_RESTART_ERR (54)")
    assert {g.memory_partition for g in backend.observe().gpus} == {MemoryPartition.NPS1}
    backend.reload_driver()
    assert {(g.compute_partition, g.memory_partition) for g in backend.observe().gpus} == {
        (ComputePartition.CPX, MemoryPartition.NPS4)
    }


def test_backend_reports_a_malformed_file_as_file_error_naming_it(backend: AmdSmiGpuBackend, state_dir: Path) -> None:
    path = state_dir / FAULTS_FILE
    path.write_text('{"busy_gpus": "all"}')
    error = hardware_status(backend.set_compute_partition, 0, ComputePartition.CPX)
    assert error.status == "FILE_ERROR"
    assert error.message.startswith("gpu 0 (0000:05:00.0): set compute partition CPX: AMDSMI_STATUS_FILE_ERROR (14)")
    assert f"emulator faults file {path} is malformed: busy_gpus must be a list" in error.message
    assert "delete it" in error.message
    assert hardware_status(backend.observe).status == "FILE_ERROR"  # VRAM used depends on holders
    path.unlink()
    assert len(backend.observe().gpus) == 8


def test_backend_reload_seconds_override(state_dir: Path) -> None:
    slept: list[float] = []
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(state_dir / "emulated-host.json", clock=slept.append))
    try:
        write_faults(state_dir, EmulatorFaults(reload_seconds=7.0))
        backend.reload_driver()
        assert slept == [7.0]
    finally:
        backend.close()
