"""Real-hardware GpuBackend: owns every amdsmi call and turns handles, dicts and statuses into domain types."""

from __future__ import annotations

import contextlib
import importlib
import io
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from gpushared.domain.errors import BackendUnavailable, HardwareError, NotFound
from gpushared.domain.gpu import (
    MIB,
    VALID_COMBINATIONS,
    ComputePartition,
    DeviceProcess,
    GpuInfo,
    GpuTelemetry,
    HostInventory,
    MemoryPartition,
    PartitionInfo,
)

if TYPE_CHECKING:
    from gpushared.ports import GpuBackend

_log = logging.getLogger(__name__)

_T = TypeVar("_T")
_E = TypeVar("_E", ComputePartition, MemoryPartition)

_EMULATE = "to try gpushare without a GPU run `gpushared --emulate`"
_NA = "N/A"

# Our own copy of amdsmi_status_t: amdsmi has no status enum, and `lib.amdsmi_wrapper` is absent
# from look-alike libraries such as the product emulator.
STATUS_NAMES: dict[int, str] = {
    0: "SUCCESS",
    1: "INVAL",
    2: "NOT_SUPPORTED",
    3: "NOT_YET_IMPLEMENTED",
    4: "FAIL_LOAD_MODULE",
    5: "FAIL_LOAD_SYMBOL",
    6: "DRM_ERROR",
    7: "API_FAILED",
    8: "TIMEOUT",
    9: "RETRY",
    10: "NO_PERM",
    11: "INTERRUPT",
    12: "IO",
    13: "ADDRESS_FAULT",
    14: "FILE_ERROR",
    15: "OUT_OF_RESOURCES",
    16: "INTERNAL_EXCEPTION",
    17: "INPUT_OUT_OF_BOUNDS",
    18: "INIT_ERROR",
    19: "REFCOUNT_OVERFLOW",
    20: "DIRECTORY_NOT_FOUND",
    30: "BUSY",
    31: "NOT_FOUND",
    32: "NOT_INIT",
    33: "NO_SLOT",
    34: "DRIVER_NOT_LOADED",
    39: "MORE_DATA",
    40: "NO_DATA",
    41: "INSUFFICIENT_SIZE",
    42: "UNEXPECTED_SIZE",
    43: "UNEXPECTED_DATA",
    44: "NON_AMD_CPU",
    45: "NO_ENERGY_DRV",
    46: "NO_MSR_DRV",
    47: "NO_HSMP_DRV",
    48: "NO_HSMP_SUP",
    49: "NO_HSMP_MSG_SUP",
    50: "HSMP_TIMEOUT",
    51: "NO_DRV",
    52: "FILE_NOT_FOUND",
    53: "ARG_PTR_NULL",
    54: "AMDGPU_RESTART_ERR",
    55: "SETTING_UNAVAILABLE",
    56: "CORRUPTED_EEPROM",
    57: "MORE_DATA",  # its value before ROCm 7.0; nothing else uses 57
    0xFFFFFFFE: "MAP_ERROR",
    0xFFFFFFFF: "UNKNOWN_ERROR",
}

# status -> (what it means here, what the operator can do). Statuses not listed get the bare name.
_STATUS_TEXT: dict[str, tuple[str, str]] = {
    "INVAL": ("the driver rejected the value", "check the GPU's available partition modes"),
    "NOT_SUPPORTED": (
        "not supported by this device",
        "partition settings exist only on the primary partition of an MI300-class GPU, and not while it is in reset",
    ),
    "TIMEOUT": ("the call timed out", "retry"),
    "RETRY": ("the library asked to retry", "retry"),
    "NO_PERM": ("permission denied", "run gpushared as root"),
    "BUSY": ("a process still holds the device", "stop the processes using the GPU, then retry"),
    "NOT_FOUND": (
        "device not found",
        "the device list changed (a partition change or driver reload); re-read the inventory",
    ),
    "NOT_INIT": ("the library is not initialised", "restart gpushared"),
    "DRIVER_NOT_LOADED": ("the amdgpu driver is not loaded", "load it with `modprobe amdgpu`"),
    "NO_DRV": ("the amdgpu driver is not loaded", "load it with `modprobe amdgpu`"),
    "AMDGPU_RESTART_ERR": (
        "reloading the amdgpu driver failed",
        "stop every process and service using any GPU, check dmesg, then reload again",
    ),
    "SETTING_UNAVAILABLE": (
        "the setting is not available",
        "that compute partition is not valid with the current memory partition",
    ),
    "OUT_OF_RESOURCES": ("out of resources", "too many GPU processes to list"),
    "FILE_ERROR": ("a file the library reads could not be read", "see the file named in the message"),
}

DEFAULT_RELOAD_TIMEOUT = 600.0
"""Seconds a configured driver reload command may take: §3.4 allows up to 140 s, DCM 5 min."""

_ALL_GPUS = "all GPUs"
_RELOAD = "reload the amdgpu driver"
_RELOAD_HINT = (
    "configure a driver reload command for gpushared, e.g. sh -c 'modprobe -r amdgpu && modprobe amdgpu' "
    "(ROCm 7.13 removed amdsmi_gpu_driver_reload)"
)
_STDERR_TAIL = 400  # characters of the command's last stderr line kept in the error
_KILLED_GRACE = 5.0  # seconds to wait for a killed reload command's pipe to close

_BDF_RE = re.compile(r"^([0-9a-fA-F]{4}):([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")


class _NeverRaisedError(Exception):
    """Stands in for an exception class a look-alike library does not define."""


def load_amdsmi() -> Any:
    """Import the amdsmi package; any failure becomes a one-line BackendUnavailable."""
    # The real package prints its loader errors to stdout before raising; keep them out of the
    # daemon's output and put the useful first line in the error's hint instead.
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            module = importlib.import_module("amdsmi")
    except KeyError as exc:
        raise BackendUnavailable(
            f"amdsmi: cannot load libamd_smi.so (KeyError {_one_line(str(exc))}): "
            f"install ROCm's amd-smi-lib or set ROCM_PATH; {_EMULATE}",
            hint=_first_line(printed.getvalue()),
        ) from exc
    except ModuleNotFoundError as exc:
        if exc.name != "amdsmi":
            raise BackendUnavailable(
                f"amdsmi: the amdsmi package is incomplete ({_describe(exc)}): reinstall ROCm's amd-smi-lib; {_EMULATE}"
            ) from exc
        raise BackendUnavailable(
            f"amdsmi: the amdsmi Python package is not installed ({_describe(exc)}): install ROCm's "
            f"amd-smi-lib and its Python package (/opt/rocm/share/amd_smi); {_EMULATE}"
        ) from exc
    except OSError as exc:
        raise BackendUnavailable(
            f"amdsmi: cannot load libamd_smi.so ({_describe(exc)}): "
            f"install ROCm's amd-smi-lib or set ROCM_PATH; {_EMULATE}",
            hint=_first_line(printed.getvalue()),
        ) from exc
    except Exception as exc:
        # e.g. AttributeError when libamd_smi.so lacks a symbol the Python bindings bind at import.
        raise BackendUnavailable(
            f"amdsmi: importing amdsmi failed ({_describe(exc)}): the amdsmi package and "
            f"libamd_smi.so probably come from different ROCm releases; reinstall amd-smi-lib; {_EMULATE}",
            hint=_first_line(printed.getvalue()),
        ) from exc
    if printed.getvalue().strip():
        _log.warning("amdsmi import printed: %s", _one_line(printed.getvalue()))
    return module


@dataclass(frozen=True)
class _Device:
    """One amd-smi processor handle and the identity read from it in this pass."""

    handle: object
    amdsmi_index: int
    bdf: str
    slot: tuple[int, int, int]
    partition_id: int
    kfd_id: int
    node_id: int


@dataclass(frozen=True)
class _Gpu:
    """The devices of one physical GPU, primary first."""

    index: int
    devices: tuple[_Device, ...]

    @property
    def primary(self) -> _Device:
        return self.devices[0]

    @property
    def bdf(self) -> str:
        return self.primary.bdf

    @property
    def subject(self) -> str:
        return f"gpu {self.index} ({self.bdf})"

    def subject_of(self, device: _Device) -> str:
        if device is self.primary:
            return self.subject
        return f"gpu {self.index} partition {device.partition_id} ({device.bdf})"


class AmdSmiGpuBackend:
    """GpuBackend over the amdsmi module or any object exposing the same attributes."""

    def __init__(
        self,
        lib: Any,
        *,
        name: str = "amdsmi",
        reload_command: Sequence[str] | None = None,
        reload_timeout: float = DEFAULT_RELOAD_TIMEOUT,
    ) -> None:
        """Initialise ``lib`` and check it sees a GPU.

        ``reload_command`` (an argv, run without a shell) replaces amdsmi_gpu_driver_reload() in
        reload_driver(), for hosts whose amdsmi lacks it or where the operator wants their own
        unload/load sequence; it is used whenever given. Empty means none, as in the
        configuration. It must finish within ``reload_timeout`` seconds.
        """
        if reload_command is not None:
            # A str is a Sequence[str] too, and would run as one program per character.
            if isinstance(reload_command, str):
                raise ValueError(f"reload_command must be an argv list, not a string: {reload_command!r}")
            if not all(isinstance(arg, str) for arg in reload_command):
                raise ValueError(f"reload_command must hold only strings, got {reload_command!r}")
        if not reload_timeout > 0:
            raise ValueError(f"reload_timeout must be > 0 seconds, got {reload_timeout!r}")
        self._lib = lib
        self._name = name
        self._reload_command = tuple(reload_command) if reload_command else None
        self._reload_timeout = float(reload_timeout)
        # Calls are serialised: services call from worker threads, and a partition change in one
        # thread would otherwise invalidate the handles another thread is using.
        self._lock = threading.Lock()
        self._closed = False
        self._initialized = False
        self._base_exc: type[Exception] = getattr(lib, "AmdSmiException", _NeverRaisedError)
        self._library_exc: type[Exception] = getattr(lib, "AmdSmiLibraryException", _NeverRaisedError)
        self._parameter_exc: type[Exception] = getattr(lib, "AmdSmiParameterException", _NeverRaisedError)
        try:
            self._init_library()
        except HardwareError as exc:
            raise BackendUnavailable(f"{exc.message}; {exc.hint + '; ' if exc.hint else ''}{_EMULATE}") from exc
        try:
            self.check_present()
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self._name

    def check_present(self) -> None:
        """Raise BackendUnavailable unless amdsmi sees at least one GPU."""
        with self._lock:
            self._ready()
            self._handles()

    def observe(self) -> HostInventory:
        with self._lock:
            return self._retrying_stale(lambda: HostInventory(gpus=tuple(self._read_gpu(g) for g in self._enumerate())))

    def list_processes(self, gpu_index: int) -> dict[int, tuple[DeviceProcess, ...]]:
        with self._lock:
            return self._retrying_stale(lambda: self._list_processes(gpu_index))

    def read_telemetry(self, gpu_index: int) -> GpuTelemetry | None:
        """Sensors of one GPU through its primary partition (secondaries report N/A there, mi300x.md §4.3); None
        when this amdsmi has no amdsmi_get_gpu_metrics_info."""
        if not callable(getattr(self._lib, "amdsmi_get_gpu_metrics_info", None)):
            return None
        with self._lock:
            return self._retrying_stale(lambda: self._read_telemetry(gpu_index))

    def _read_telemetry(self, gpu_index: int) -> GpuTelemetry:
        gpu = self._gpu(gpu_index)
        info = self._call_mapping(gpu.subject, "read GPU metrics", "amdsmi_get_gpu_metrics_info", gpu.primary.handle)

        def reading(key: str) -> float | None:
            # "N/A" where the sensor does not exist; 0xFFFF / 0xFFFFFFFF are gpu_metrics' own "no data".
            value = info.get(key)
            if isinstance(value, bool) or not isinstance(value, int | float) or value in (0xFFFF, 0xFFFFFFFF):
                return None
            return float(value)

        sensors = (
            ("hotspot", "temperature_hotspot"),
            ("memory", "temperature_mem"),
            ("vrsoc", "temperature_vrsoc"),
            ("edge", "temperature_edge"),
        )
        temperatures = {name: v for name, key in sensors if (v := reading(key)) is not None}
        power = reading("current_socket_power")
        if power is None:
            power = reading("average_socket_power")
        engines = (("gfx", "average_gfx_activity"), ("umc", "average_umc_activity"), ("mm", "average_mm_activity"))
        activity = {name: v / 100.0 for name, key in engines if (v := reading(key)) is not None}
        return GpuTelemetry(temperatures, power, activity)

    def set_compute_partition(self, gpu_index: int, mode: ComputePartition) -> None:
        operation = f"set compute partition {mode.value}"
        needs = " or ".join(m.value for m in MemoryPartition if m in VALID_COMBINATIONS[mode])
        hints = {
            "SETTING_UNAVAILABLE": f"{mode.value} needs memory partition {needs}; change the memory partition first",
        }

        def change() -> None:
            gpu = self._gpu(gpu_index)
            value = self._lib_enum("AmdSmiComputePartitionType", mode.value, gpu.subject, operation)
            handle = gpu.primary.handle
            self._call(gpu.subject, operation, "amdsmi_set_gpu_compute_partition", handle, value, hints=hints)

        with self._lock:
            self._retrying_stale(change)
            self._reinit_after_change()

    def set_memory_partition(self, gpu_index: int, mode: MemoryPartition) -> None:
        operation = f"set memory partition {mode.value}"
        hints = {
            "INVAL": f"{mode.value} is not among the GPU's memory partition capabilities",
            "SETTING_UNAVAILABLE": f"{mode.value} is not available on this GPU",
        }

        def change() -> None:
            gpu = self._gpu(gpu_index)
            value = self._lib_enum("AmdSmiMemoryPartitionType", mode.value, gpu.subject, operation)
            handle = gpu.primary.handle
            self._call(gpu.subject, operation, "amdsmi_set_gpu_memory_partition", handle, value, hints=hints)

        with self._lock:
            self._retrying_stale(change)
            # amdsmi before 7.0 reloads the driver inside the set call, so the handles may be stale.
            self._reinit_after_change()

    def reload_driver(self) -> None:
        with self._lock:
            self._ready()
            command = self._reload_command
            if command is None and not callable(getattr(self._lib, "amdsmi_gpu_driver_reload", None)):
                raise HardwareError(
                    f"{_ALL_GPUS}: {_RELOAD}: this amdsmi library has no amdsmi_gpu_driver_reload() "
                    "and no reload command is configured",
                    status="NOT_SUPPORTED",
                    hint=_RELOAD_HINT,
                )
            try:
                if command is None:
                    self._call(_ALL_GPUS, _RELOAD, "amdsmi_gpu_driver_reload")
                else:
                    # §3.3 4.: amdsmi holds /dev/dri fds, and `modprobe -r` fails while it does.
                    self._shut_down_quietly()
                    self._run_reload_command(command)
            finally:
                # Even a failed reload may have unloaded or half-reloaded the driver: old handles
                # cannot be trusted either way.
                self._reinit_after_change()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._shut_down_quietly()

    def _run_reload_command(self, command: tuple[str, ...]) -> None:
        shown = shlex.join(command)
        failed = f"{_ALL_GPUS}: {_RELOAD}: command {shown}"
        hint = _STATUS_TEXT["AMDGPU_RESTART_ERR"][1]
        try:
            # Its own session, so a timeout can kill the whole group: a shell's modprobe child
            # would otherwise outlive it and keep the stderr pipe open.
            child = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise HardwareError(
                f"{failed} could not be started: {_describe(exc)}", status="AMDGPU_RESTART_ERR", hint=hint
            ) from exc
        _log.info("reloading the amdgpu driver with %s (pid %d)", shown, child.pid)
        try:
            _, stderr = child.communicate(timeout=self._reload_timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            try:
                _, stderr = child.communicate(timeout=_KILLED_GRACE)
            except subprocess.TimeoutExpired:
                # A modprobe stuck in the kernel (state D) ignores SIGKILL; do not hang with it.
                stderr = b""
            raise HardwareError(
                f"{failed} did not finish within {self._reload_timeout:g} s and was killed{_last_line(stderr)}",
                status="AMDGPU_RESTART_ERR",
                hint=hint,
            ) from None
        if child.returncode != 0:
            if child.returncode < 0:
                how = f"was killed by {_signal_name(-child.returncode)}"
            else:
                how = f"exited with status {child.returncode}"
            raise HardwareError(f"{failed} {how}{_last_line(stderr)}", status="AMDGPU_RESTART_ERR", hint=hint)

    # -- library lifecycle -------------------------------------------------------------------

    def _init_library(self) -> None:
        flags = self._lib_enum("AmdSmiInitFlags", "INIT_AMD_GPUS", "amdsmi", "initialise")
        self._call("amdsmi", "initialise", "amdsmi_init", flags)
        self._initialized = True

    def _shut_down_quietly(self) -> None:
        if not self._initialized:
            return
        self._initialized = False
        try:
            self._call("amdsmi", "shut down", "amdsmi_shut_down")
        except HardwareError as exc:
            # Nothing useful to do about it: the process is releasing the library anyway.
            _log.warning("%s", exc)

    def _reinit_after_change(self) -> None:
        # amdsmi builds its device list at init (reference-counted in 7.0.2): after a partition
        # change or reload the old handles are stale and the device count differs until
        # shut_down+init. A failure here is deferred to the next call, which retries the init,
        # so that a change that did succeed is not reported as failed.
        self._shut_down_quietly()
        try:
            self._init_library()
        except HardwareError as exc:
            _log.warning("%s (will retry on the next call)", exc)

    def _ready(self) -> None:
        if self._closed:
            raise BackendUnavailable(f"{self._name}: the GPU backend is closed")
        if not self._initialized:
            self._init_library()

    def _retrying_stale(self, action: Callable[[], _T]) -> _T:
        self._ready()
        try:
            return action()
        except HardwareError as exc:
            if exc.status != "NOT_FOUND":
                raise
            # Someone else (amd-smi, another thread's library user) changed partitions under us;
            # fresh handles need a fresh init. Retry once so one stale pass is not fatal.
            _log.info("%s; re-initialising amdsmi and retrying", exc)
            self._shut_down_quietly()
            self._ready()
            return action()

    # -- enumeration -------------------------------------------------------------------------

    def _handles(self) -> list[object]:
        handles = self._call_list("amdsmi", "list GPUs", "amdsmi_get_processor_handles")
        if not handles:
            raise BackendUnavailable(
                "amdsmi: no AMD GPU found (amdsmi_init succeeded but amdsmi_get_processor_handles() "
                "returned none): check that amdgpu is loaded and /dev/kfd and /dev/dri are accessible; "
                f"{_EMULATE}"
            )
        return handles

    def _enumerate(self) -> list[_Gpu]:
        groups: dict[tuple[int, int, int], list[_Device]] = {}
        for index, handle in enumerate(self._handles()):
            device = self._identify(index, handle)
            groups.setdefault(device.slot, []).append(device)
        gpus = []
        # Group by PCI slot (domain:bus:device), not UUID: before ROCm 7.0 every partition of a
        # GPU shared one UUID, and the BDF function is the partition id.
        for gpu_index, slot in enumerate(sorted(groups)):
            members = sorted(groups[slot], key=lambda d: (d.partition_id, d.bdf))
            gpus.append(_Gpu(index=gpu_index, devices=tuple(members)))
        return gpus

    def _identify(self, index: int, handle: object) -> _Device:
        subject = f"amd-smi device {index}"
        bdf = self._call_str(subject, "read BDF", "amdsmi_get_gpu_device_bdf", handle).lower()
        match = _BDF_RE.match(bdf)
        if match is None:
            raise _unexpected(subject, "read BDF", f"{bdf!r} is not a domain:bus:device.function BDF")
        domain, bus, dev, function = (int(part, 16) for part in match.groups())
        subject = f"amd-smi device {index} ({bdf})"
        kfd = self._call_mapping(subject, "read KFD info", "amdsmi_get_gpu_kfd_info", handle)
        partition_id = _opt_int(kfd.get("current_partition_id"))
        return _Device(
            handle=handle,
            amdsmi_index=index,
            bdf=bdf,
            slot=(domain, bus, dev),
            # Old drivers report N/A; the partition id is the BDF function on MI300.
            partition_id=function if partition_id is None else partition_id,
            kfd_id=_int_or_unknown(kfd.get("kfd_id")),
            node_id=_int_or_unknown(kfd.get("node_id")),
        )

    def _gpu(self, gpu_index: int) -> _Gpu:
        gpus = self._enumerate()
        if 0 <= gpu_index < len(gpus):
            return gpus[gpu_index]
        valid = "0" if len(gpus) == 1 else f"0-{len(gpus) - 1}"
        raise NotFound(f"gpu {gpu_index}: no such GPU; this host has GPUs {valid}")

    # -- one GPU -----------------------------------------------------------------------------

    def _read_gpu(self, gpu: _Gpu) -> GpuInfo:
        primary = gpu.primary.handle
        # Partition modes answer only through the primary; secondaries say N/A or NOT_SUPPORTED.
        compute = _parse_mode(
            ComputePartition,
            self._call_str(gpu.subject, "read compute partition", "amdsmi_get_gpu_compute_partition", primary),
            gpu.subject,
            "read compute partition",
        )
        memory = _parse_mode(
            MemoryPartition,
            self._call_str(gpu.subject, "read memory partition", "amdsmi_get_gpu_memory_partition", primary),
            gpu.subject,
            "read memory partition",
        )
        reported = {d.partition_id: self._vram_total(gpu.subject_of(d), d.handle) for d in gpu.devices}
        gpu_total, primary_cap = _normalize_primary_vram(
            reported[gpu.primary.partition_id],
            [v for pid, v in reported.items() if pid != gpu.primary.partition_id],
            compute.partition_count,
        )
        used = sum(self._vram_used(gpu.subject_of(d), d.handle) for d in gpu.devices)
        partitions = tuple(
            self._read_partition(gpu, d, primary_cap if d is gpu.primary else reported[d.partition_id])
            for d in gpu.devices
        )
        return GpuInfo(
            index=gpu.index,
            bdf=gpu.bdf,
            model_name=self._model_name(gpu),
            compute_partition=compute,
            memory_partition=memory,
            # Newer kernels list exactly the modes valid under the current NPS mode; older ones a
            # fixed list. Derive it so both look the same.
            available_compute_partitions=tuple(c for c in ComputePartition if memory in VALID_COMBINATIONS[c]),
            available_memory_partitions=self._memory_caps(gpu, memory),
            memory_total_bytes=gpu_total,
            memory_used_bytes=used,
            partitions=partitions,
        )

    def _read_partition(self, gpu: _Gpu, device: _Device, cap_bytes: int) -> PartitionInfo:
        subject = gpu.subject_of(device)
        uuid = self._call_str(subject, "read UUID", "amdsmi_get_gpu_device_uuid", device.handle)
        info = self._call_mapping(subject, "read enumeration info", "amdsmi_get_gpu_enumeration_info", device.handle)
        hip = _opt_int(info.get("hip_id"))
        return PartitionInfo(
            gpu_index=gpu.index,
            partition_id=device.partition_id,
            bdf=device.bdf,
            uuid=uuid,
            # Before ROCm 6.4.1 secondaries report the primary's nodes; we pass on what amdsmi says.
            render_minor=_int_or_unknown(info.get("drm_render")),
            card_minor=_int_or_unknown(info.get("drm_card")),
            # hip_id matched the amd-smi index in every observed listing.
            hip_index=device.amdsmi_index if hip is None else hip,
            kfd_id=device.kfd_id,
            node_id=device.node_id,
            memory_total_bytes=cap_bytes,
        )

    def _vram_total(self, subject: str, handle: object) -> int:
        try:
            return self._call_int(subject, "read VRAM total", "amdsmi_get_gpu_memory_total", handle, self._vram_type())
        except HardwareError as exc:
            _log.debug("%s; falling back to vram_usage", exc)
        usage = self._call_mapping(subject, "read VRAM usage", "amdsmi_get_gpu_vram_usage", handle)
        return _required_int(usage, "vram_total", subject, "read VRAM usage") * MIB

    def _vram_used(self, subject: str, handle: object) -> int:
        try:
            return self._call_int(subject, "read VRAM used", "amdsmi_get_gpu_memory_usage", handle, self._vram_type())
        except HardwareError as exc:
            _log.debug("%s; falling back to vram_usage", exc)
        usage = self._call_mapping(subject, "read VRAM usage", "amdsmi_get_gpu_vram_usage", handle)
        return _required_int(usage, "vram_used", subject, "read VRAM usage") * MIB

    def _memory_caps(self, gpu: _Gpu, current: MemoryPartition) -> tuple[MemoryPartition, ...]:
        try:
            config = self._call_mapping(
                gpu.subject, "read memory partition caps", "amdsmi_get_gpu_memory_partition_config", gpu.primary.handle
            )
        except HardwareError as exc:
            _log.debug("%s; reporting only the current memory partition", exc)
            return (current,)
        raw = config.get("partition_caps")
        names = {str(c) for c in raw} if isinstance(raw, list) else set()
        # NPS8 and N/A are not MemoryPartition members and drop out here.
        return tuple(m for m in MemoryPartition if m.value in names or m is current)

    def _model_name(self, gpu: _Gpu) -> str:
        sources = (("amdsmi_get_gpu_asic_info", "market_name"), ("amdsmi_get_gpu_board_info", "product_name"))
        for function, key in sources:
            try:
                info = self._call_mapping(gpu.subject, "read model name", function, gpu.primary.handle)
            except HardwareError as exc:
                _log.debug("%s", exc)
                continue
            value = info.get(key)
            if isinstance(value, str) and value.strip() and value.strip() != _NA:
                return value.strip()
        return "AMD GPU"

    def _list_processes(self, gpu_index: int) -> dict[int, tuple[DeviceProcess, ...]]:
        gpu = self._gpu(gpu_index)
        result: dict[int, tuple[DeviceProcess, ...]] = {}
        for device in gpu.devices:
            subject = gpu.subject_of(device)
            entries = self._call_list(subject, "list processes", "amdsmi_get_gpu_process_list", device.handle)
            # A process shows up with 0 VRAM on every GPU it can see (KFD creates per-device data
            # for each); keep those entries and let callers decide what counts as use.
            result[device.partition_id] = tuple(_process(subject, entry) for entry in entries)
        return result

    # -- calling the library -----------------------------------------------------------------

    def _vram_type(self) -> object:
        return self._lib_enum("AmdSmiMemoryType", "VRAM", "amdsmi", "read memory")

    def _lib_enum(self, enum_name: str, member: str, subject: str, operation: str) -> object:
        try:
            value: object = getattr(self._lib, enum_name)[member]
        except (AttributeError, KeyError, TypeError) as exc:
            raise HardwareError(
                f"{subject}: {operation}: this amdsmi library has no {enum_name}.{member}",
                status="NOT_SUPPORTED",
                hint="install amdsmi from ROCm 6.4 or newer",
            ) from exc
        return value

    def _call(
        self,
        subject: str,
        operation: str,
        function: str,
        *args: object,
        hints: Mapping[str, str] | None = None,
    ) -> object:
        fn = getattr(self._lib, function, None)
        if not callable(fn):
            raise HardwareError(
                f"{subject}: {operation}: this amdsmi library has no {function}()",
                status="NOT_SUPPORTED",
                hint="install amdsmi from ROCm 6.4 or newer",
            )
        try:
            result: object = fn(*args)
        except self._base_exc as exc:
            raise self._hardware_error(subject, operation, exc, hints or {}) from exc
        return result

    def _hardware_error(self, subject: str, operation: str, exc: Exception, hints: Mapping[str, str]) -> HardwareError:
        if isinstance(exc, self._library_exc):
            code = _opt_int(getattr(exc, "err_code", None))
            name = STATUS_NAMES.get(code, "UNKNOWN") if code is not None else "UNKNOWN"
            meaning, hint = _STATUS_TEXT.get(name, ("", ""))
            label = f"AMDSMI_STATUS_{name} ({code})" if name != "UNKNOWN" else f"amdsmi status {code}"
            message = f"{subject}: {operation}: {label}" + (f": {meaning}" if meaning else "")
            # The real amdsmi's exception carries only the status; the emulator's faults-file
            # error adds a `detail` naming the file, without which the message says too little.
            detail = getattr(exc, "detail", None)
            if isinstance(detail, str) and detail.strip():
                message += f": {_one_line(detail)}"
            return HardwareError(message, status=name, hint=hints.get(name, hint))
        if isinstance(exc, self._parameter_exc):
            return HardwareError(
                f"{subject}: {operation}: amdsmi rejected an argument ({_one_line(str(exc))})",
                status="INVAL",
                hint="this is a gpushared bug or an amdsmi version mismatch",
            )
        return HardwareError(f"{subject}: {operation}: {_describe(exc)}", status="UNKNOWN")

    def _call_str(self, subject: str, operation: str, function: str, *args: object) -> str:
        value = self._call(subject, operation, function, *args)
        if not isinstance(value, str):
            raise _unexpected(subject, operation, f"{function}() returned {type(value).__name__}, not str")
        return value

    def _call_int(self, subject: str, operation: str, function: str, *args: object) -> int:
        value = self._call(subject, operation, function, *args)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _unexpected(subject, operation, f"{function}() returned {value!r}, not an int")
        return value

    def _call_mapping(self, subject: str, operation: str, function: str, *args: object) -> Mapping[str, object]:
        value = self._call(subject, operation, function, *args)
        if not isinstance(value, Mapping):
            raise _unexpected(subject, operation, f"{function}() returned {type(value).__name__}, not a dict")
        return {str(k): v for k, v in value.items()}

    def _call_list(self, subject: str, operation: str, function: str, *args: object) -> list[object]:
        value = self._call(subject, operation, function, *args)
        if not isinstance(value, list | tuple):
            raise _unexpected(subject, operation, f"{function}() returned {type(value).__name__}, not a list")
        return list(value)


def _parse_mode(enum: type[_E], raw: str, subject: str, operation: str) -> _E:
    try:
        return enum(raw.strip().upper())
    except ValueError:
        raise _unexpected(
            subject, operation, f"mode {raw!r} is not one gpushared manages (an 8-XCD MI300-class GPU)"
        ) from None


def _normalize_primary_vram(primary: int, secondaries: list[int], partition_count: int) -> tuple[int, int]:
    """Whole-GPU VRAM and the primary partition's cap, from what the partitions report.

    amdsmi 7.0.2 reports the whole GPU on the primary in partitioned modes (amdsmi#132) and each
    secondary's own cap. A fixed library reports the primary's own cap too; tell the two apart
    by comparing with the secondaries, and assume the quirk when none are visible.
    """
    if partition_count > 1 and (not secondaries or max(secondaries) < primary):
        return primary, primary // partition_count
    return primary * partition_count, primary


def _process(subject: str, entry: object) -> DeviceProcess:
    if not isinstance(entry, Mapping):
        raise _unexpected(subject, "list processes", f"process entry {entry!r} is not a dict")
    pid = _opt_int(entry.get("pid"))
    if pid is None:
        raise _unexpected(subject, "list processes", f"process entry without a pid: {entry!r}")
    name = entry.get("name")
    usage = entry.get("memory_usage")
    vram = _opt_int(usage.get("vram_mem")) if isinstance(usage, Mapping) else None
    return DeviceProcess(pid=pid, name=name if isinstance(name, str) else _NA, vram_bytes=vram or 0)


def _opt_int(value: object) -> int | None:
    """An amdsmi number, or None for "N/A" and anything else that is not an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def _int_or_unknown(value: object) -> int:
    # PartitionInfo has no optional fields; -1 marks a value amdsmi reported as N/A.
    found = _opt_int(value)
    return -1 if found is None else found


def _required_int(mapping: Mapping[str, object], key: str, subject: str, operation: str) -> int:
    value = _opt_int(mapping.get(key))
    if value is None:
        raise _unexpected(subject, operation, f"{key} is {mapping.get(key)!r}")
    return value


def _unexpected(subject: str, operation: str, detail: str) -> HardwareError:
    return HardwareError(
        f"{subject}: {operation}: unexpected answer from amdsmi: {detail}",
        status="UNEXPECTED_DATA",
        hint="the amdsmi package and gpushared may not match; gpushared is tested with amdsmi 7.0.2",
    )


def _describe(exc: BaseException) -> str:
    text = _one_line(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def _last_line(stderr: bytes | None) -> str:
    """``: <last non-empty stderr line>`` for an error message, or a note that there was none."""
    text = (stderr or b"").decode("utf-8", errors="replace")
    line = next((line.strip() for line in reversed(text.splitlines()) if line.strip()), "")
    if len(line) > _STDERR_TAIL:
        line = line[:_STDERR_TAIL] + "..."
    return f": {line}" if line else " (no stderr output)"


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


if TYPE_CHECKING:
    # Structural check only: mypy verifies AmdSmiGpuBackend satisfies the port.
    def _conforms(backend: AmdSmiGpuBackend) -> GpuBackend:
        return backend
