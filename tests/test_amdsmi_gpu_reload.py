"""AmdSmiGpuBackend.reload_driver: amdsmi's own reload, or an operator's reload command run as a real subprocess."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend
from gpushared.domain.errors import HardwareError
from gpushared.domain.gpu import ComputePartition, MemoryPartition

FAKES = Path(__file__).parent / "fakes"
if str(FAKES) not in sys.path:
    sys.path.insert(0, str(FAKES))
amdsmi: Any = importlib.import_module("amdsmi")

BOOM = ["/bin/sh", "-c", "echo first >&2; echo boom >&2; exit 3"]


class RecordingLib:
    """The fake amdsmi, writing its lifecycle calls to the same log the reload command appends to.

    ``hidden`` names functions this library does not have, like amdsmi from ROCm 7.13 without
    amdsmi_gpu_driver_reload.
    """

    def __init__(self, log: Path, hidden: tuple[str, ...] = ()) -> None:
        self.log = log
        self.hidden = hidden

    def _record(self, event: str) -> None:
        with self.log.open("a") as f:
            f.write(event + "\n")

    def amdsmi_init(self, *args: Any) -> None:
        self._record("init")
        amdsmi.amdsmi_init(*args)

    def amdsmi_shut_down(self) -> None:
        self._record("shut_down")
        amdsmi.amdsmi_shut_down()

    def _driver_reload(self) -> None:
        self._record("amdsmi_gpu_driver_reload")
        amdsmi.amdsmi_gpu_driver_reload()

    def __getattr__(self, name: str) -> Any:
        if name in self.hidden:
            raise AttributeError(name)
        if name == "amdsmi_gpu_driver_reload":
            return self._driver_reload
        return getattr(amdsmi, name)

    def events(self) -> list[str]:
        return self.log.read_text().split()


@pytest.fixture
def log(tmp_path: Path) -> Iterator[Path]:
    amdsmi.fake_host.reset()
    path = tmp_path / "events.log"
    path.touch()
    yield path
    amdsmi.fake_host.reset()


def appending(log: Path, line: str, then: str = "") -> list[str]:
    """A command that records itself in the log (and then runs ``then``)."""
    return ["/bin/sh", "-c", f'echo {line} >> "$0"; {then or "true"}', str(log)]


def reload_error(backend: AmdSmiGpuBackend) -> HardwareError:
    with pytest.raises(HardwareError) as info:
        backend.reload_driver()
    return info.value


def test_command_runs_between_shut_down_and_init_instead_of_amdsmi(log: Path) -> None:
    lib = RecordingLib(log)
    backend = AmdSmiGpuBackend(lib, reload_command=appending(log, "command"))
    backend.set_memory_partition(0, MemoryPartition.NPS4)
    log.write_text("")

    backend.reload_driver()

    # §3.3 4.: amdsmi lets go of /dev/dri before the unload, and enumerates afresh after it.
    assert lib.events() == ["shut_down", "command", "init"]
    assert amdsmi.fake_host.init_count == 1
    assert len(backend.observe().gpus) == 8
    backend.close()
    assert amdsmi.fake_host.init_count == 0


def test_true_succeeds(log: Path) -> None:
    backend = AmdSmiGpuBackend(amdsmi, reload_command=["/bin/true"])
    backend.reload_driver()
    backend.set_compute_partition(1, ComputePartition.CPX)  # handles from the new init work
    assert len(backend.observe().partitions()) == 15
    backend.close()


def test_failing_command_is_restart_err_with_its_exit_status_and_last_stderr_line(log: Path) -> None:
    lib = RecordingLib(log)
    backend = AmdSmiGpuBackend(lib, reload_command=BOOM)
    log.write_text("")

    error = reload_error(backend)

    assert error.status == "AMDGPU_RESTART_ERR"
    assert error.message == (
        "all GPUs: reload the amdgpu driver: command /bin/sh -c 'echo first >&2; echo boom >&2; exit 3' "
        "exited with status 3: boom"
    )
    assert "dmesg" in error.hint
    assert lib.events() == ["shut_down", "init"], "amdsmi is initialised again after a failure too"
    assert len(backend.observe().gpus) == 8
    backend.close()


@pytest.mark.parametrize(
    ("command", "ending"),
    [
        (["/bin/false"], "command /bin/false exited with status 1 (no stderr output)"),
        (["/bin/sh", "-c", "kill -TERM $$"], "was killed by SIGTERM (no stderr output)"),
        (
            ["/nonexistent/reload-amdgpu"],
            "could not be started: FileNotFoundError: [Errno 2] No such file or directory",
        ),
    ],
)
def test_other_command_failures(log: Path, command: list[str], ending: str) -> None:
    lib = RecordingLib(log)
    backend = AmdSmiGpuBackend(lib, reload_command=command)
    log.write_text("")
    error = reload_error(backend)
    assert error.status == "AMDGPU_RESTART_ERR"
    assert ending in error.message
    assert lib.events() == ["shut_down", "init"]
    backend.close()


def test_timeout_kills_the_whole_command_and_reinitialises(log: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "sleep.pid"
    # A shell whose child outlives it would keep stderr open; the group must go.
    command = ["/bin/sh", "-c", 'sleep 60 & echo $! > "$0"; echo unloading >&2; wait', str(pid_file)]
    lib = RecordingLib(log)
    backend = AmdSmiGpuBackend(lib, reload_command=command, reload_timeout=0.5)
    log.write_text("")

    started = time.monotonic()
    error = reload_error(backend)

    assert time.monotonic() - started < 30
    assert error.status == "AMDGPU_RESTART_ERR"
    assert error.message.endswith("did not finish within 0.5 s and was killed: unloading")
    assert lib.events() == ["shut_down", "init"]
    sleeper = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(sleeper)
    backend.close()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_library_without_driver_reload_needs_a_command(log: Path) -> None:
    lib = RecordingLib(log, hidden=("amdsmi_gpu_driver_reload",))
    backend = AmdSmiGpuBackend(lib)
    log.write_text("")

    error = reload_error(backend)

    assert error.status == "NOT_SUPPORTED"
    assert error.message == (
        "all GPUs: reload the amdgpu driver: this amdsmi library has no amdsmi_gpu_driver_reload() "
        "and no reload command is configured"
    )
    assert "reload command" in error.hint
    assert "modprobe -r amdgpu && modprobe amdgpu" in error.hint
    assert lib.events() == [], "nothing was touched"
    backend.close()

    backend = AmdSmiGpuBackend(lib, reload_command=appending(log, "command"))
    log.write_text("")
    backend.reload_driver()
    assert lib.events() == ["shut_down", "command", "init"]
    backend.close()


@pytest.mark.parametrize("command", [None, ()], ids=["none", "empty"])
def test_without_a_command_amdsmi_reloads_and_a_failure_still_reinitialises(
    log: Path, command: tuple[str, ...] | None
) -> None:
    lib = RecordingLib(log)
    backend = AmdSmiGpuBackend(lib, reload_command=command)
    backend.set_memory_partition(0, MemoryPartition.NPS4)
    log.write_text("")
    backend.reload_driver()
    assert lib.events() == ["amdsmi_gpu_driver_reload", "shut_down", "init"]
    assert backend.observe().gpus[0].memory_partition is MemoryPartition.NPS4

    amdsmi.fake_host.set_processes([{"pid": os.getpid(), "gpu": 0, "partition": 0}])
    log.write_text("")
    assert reload_error(backend).status == "AMDGPU_RESTART_ERR"
    assert lib.events() == ["amdsmi_gpu_driver_reload", "shut_down", "init"]
    backend.close()


def test_reinit_failure_after_the_command_is_deferred_to_the_next_call(log: Path) -> None:
    backend = AmdSmiGpuBackend(amdsmi, reload_command=["/bin/true"])
    amdsmi.fake_host.fail["amdsmi_init"] = 34  # the driver did not come back
    backend.reload_driver()  # the reload itself succeeded
    with pytest.raises(HardwareError) as info:
        backend.observe()
    assert info.value.status == "DRIVER_NOT_LOADED"
    del amdsmi.fake_host.fail["amdsmi_init"]
    assert len(backend.observe().gpus) == 8
    backend.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reload_command": "modprobe -r amdgpu"}, "must be an argv list, not a string"),
        ({"reload_command": ["/bin/true", 3]}, "must hold only strings"),
        ({"reload_timeout": 0}, "reload_timeout must be > 0"),
        ({"reload_timeout": float("nan")}, "reload_timeout must be > 0"),
    ],
)
def test_bad_reload_settings(log: Path, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AmdSmiGpuBackend(amdsmi, **kwargs)
    assert amdsmi.fake_host.init_count == 0
