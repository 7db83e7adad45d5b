"""The emulated MI300X host behind an amdsmi 7.0.2 API: partitions, enumeration, errors, state, injected faults."""

# Facts come from /work/shared/reference/mi300x.md (cited as §n). The object mirrors the real
# `amdsmi` module (functions, enums, exceptions) so the same adapter code runs on either.

from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
import os
import re
import secrets
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar, Final

from gpushared.domain.gpu import (
    GIB,
    MIB,
    VALID_COMBINATIONS,
    XCDS_PER_GPU,
    ComputePartition,
    MemoryPartition,
    auto_compute_partition,
)

# --------------------------------------------------------------------------------------------
# Status codes (§4.1). The real module keeps them as plain ints in amdsmi.amdsmi_wrapper.
# --------------------------------------------------------------------------------------------

AMDSMI_STATUS_SUCCESS: Final = 0
AMDSMI_STATUS_INVAL: Final = 1
AMDSMI_STATUS_NOT_SUPPORTED: Final = 2
AMDSMI_STATUS_NOT_YET_IMPLEMENTED: Final = 3
AMDSMI_STATUS_FAIL_LOAD_MODULE: Final = 4
AMDSMI_STATUS_FAIL_LOAD_SYMBOL: Final = 5
AMDSMI_STATUS_DRM_ERROR: Final = 6
AMDSMI_STATUS_API_FAILED: Final = 7
AMDSMI_STATUS_TIMEOUT: Final = 8
AMDSMI_STATUS_RETRY: Final = 9
AMDSMI_STATUS_NO_PERM: Final = 10
AMDSMI_STATUS_INTERRUPT: Final = 11
AMDSMI_STATUS_IO: Final = 12
AMDSMI_STATUS_ADDRESS_FAULT: Final = 13
AMDSMI_STATUS_FILE_ERROR: Final = 14
AMDSMI_STATUS_OUT_OF_RESOURCES: Final = 15
AMDSMI_STATUS_INTERNAL_EXCEPTION: Final = 16
AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS: Final = 17
AMDSMI_STATUS_INIT_ERROR: Final = 18
AMDSMI_STATUS_REFCOUNT_OVERFLOW: Final = 19
AMDSMI_STATUS_DIRECTORY_NOT_FOUND: Final = 20
AMDSMI_STATUS_BUSY: Final = 30
AMDSMI_STATUS_NOT_FOUND: Final = 31
AMDSMI_STATUS_NOT_INIT: Final = 32
AMDSMI_STATUS_NO_SLOT: Final = 33
AMDSMI_STATUS_DRIVER_NOT_LOADED: Final = 34
AMDSMI_STATUS_MORE_DATA: Final = 39
AMDSMI_STATUS_NO_DATA: Final = 40
AMDSMI_STATUS_INSUFFICIENT_SIZE: Final = 41
AMDSMI_STATUS_UNEXPECTED_SIZE: Final = 42
AMDSMI_STATUS_UNEXPECTED_DATA: Final = 43
AMDSMI_STATUS_FILE_NOT_FOUND: Final = 52
AMDSMI_STATUS_ARG_PTR_NULL: Final = 53
AMDSMI_STATUS_AMDGPU_RESTART_ERR: Final = 54
AMDSMI_STATUS_SETTING_UNAVAILABLE: Final = 55
AMDSMI_STATUS_CORRUPTED_EEPROM: Final = 56
AMDSMI_STATUS_MAP_ERROR: Final = 0xFFFFFFFE
AMDSMI_STATUS_UNKNOWN_ERROR: Final = 0xFFFFFFFF

# Text the real exception prints for each status (§4.1); MORE_DATA has none there, so it falls
# through to UNKNOWN_ERROR like the real map does.
_STATUS_INFO: Final[dict[int, str]] = {
    AMDSMI_STATUS_INVAL: "AMDSMI_STATUS_INVAL - Invalid parameters",
    AMDSMI_STATUS_NOT_SUPPORTED: "AMDSMI_STATUS_NOT_SUPPORTED - Feature not supported",
    AMDSMI_STATUS_NOT_YET_IMPLEMENTED: ("AMDSMI_STATUS_NOT_YET_IMPLEMENTED - Feature not yet implemented"),
    AMDSMI_STATUS_FAIL_LOAD_MODULE: "AMDSMI_STATUS_FAIL_LOAD_MODULE - Fail to load lib",
    AMDSMI_STATUS_FAIL_LOAD_SYMBOL: "AMDSMI_STATUS_FAIL_LOAD_SYMBOL - Fail to load symbol",
    AMDSMI_STATUS_DRM_ERROR: "AMDSMI_STATUS_DRM_ERROR - Error when called libdrm",
    AMDSMI_STATUS_API_FAILED: "AMDSMI_STATUS_API_FAILED - API call failed",
    AMDSMI_STATUS_TIMEOUT: "AMDSMI_STATUS_TIMEOUT - Timeout in API call",
    AMDSMI_STATUS_RETRY: "AMDSMI_STATUS_RETRY - Retry operation",
    AMDSMI_STATUS_NO_PERM: "AMDSMI_STATUS_NO_PERM - Permission Denied",
    AMDSMI_STATUS_INTERRUPT: "AMDSMI_STATUS_INTERRUPT - Interrupt ocurred during execution",
    AMDSMI_STATUS_IO: "AMDSMI_STATUS_IO - I/O Error",
    AMDSMI_STATUS_ADDRESS_FAULT: "AMDSMI_STATUS_ADDRESS_FAULT - Bad address",
    AMDSMI_STATUS_FILE_ERROR: "AMDSMI_STATUS_FILE_ERROR - Error opening file",
    AMDSMI_STATUS_OUT_OF_RESOURCES: "AMDSMI_STATUS_OUT_OF_RESOURCES - Not enough memory",
    AMDSMI_STATUS_INTERNAL_EXCEPTION: "AMDSMI_STATUS_INTERNAL_EXCEPTION -  Internal error",
    AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS: "AMDSMI_STATUS_INPUT_OUT_OF_BOUNDS - Out of bounds",
    AMDSMI_STATUS_INIT_ERROR: "AMDSMI_STATUS_INIT_ERROR - Initialization error",
    AMDSMI_STATUS_REFCOUNT_OVERFLOW: (
        "AMDSMI_STATUS_REFCOUNT_OVERFLOW - Internal reference counter exceeded INT32_MAX"
    ),
    AMDSMI_STATUS_DIRECTORY_NOT_FOUND: (
        "AMDSMI_STATUS_DIRECTORY_NOT_FOUND - Error when a directory is not found, maps to ENOTDIR"
    ),
    AMDSMI_STATUS_BUSY: "AMDSMI_STATUS_BUSY - Device busy",
    AMDSMI_STATUS_NOT_FOUND: "AMDSMI_STATUS_NOT_FOUND - Device Not found",
    AMDSMI_STATUS_NOT_INIT: "AMDSMI_STATUS_NOT_INIT - Device not initialized",
    AMDSMI_STATUS_NO_SLOT: "AMDSMI_STATUS_NO_SLOT - No more free slot",
    AMDSMI_STATUS_DRIVER_NOT_LOADED: "AMDSMI_STATUS_DRIVER_NOT_LOADED - Driver not loaded",
    AMDSMI_STATUS_NO_DATA: "AMDSMI_STATUS_NO_DATA - No data was found for given input",
    AMDSMI_STATUS_INSUFFICIENT_SIZE: ("AMDSMI_STATUS_INSUFFICIENT_SIZE - Insufficient size for operation"),
    AMDSMI_STATUS_UNEXPECTED_SIZE: ("AMDSMI_STATUS_UNEXPECTED_SIZE - unexpected size of data was read"),
    AMDSMI_STATUS_UNEXPECTED_DATA: ("AMDSMI_STATUS_UNEXPECTED_DATA - The data read or provided was unexpected"),
    AMDSMI_STATUS_FILE_NOT_FOUND: "AMDSMI_STATUS_FILE_NOT_FOUND - File or directory not found",
    AMDSMI_STATUS_ARG_PTR_NULL: "AMDSMI_STATUS_ARG_PTR_NULL - Parsed argument is invalid",
    AMDSMI_STATUS_AMDGPU_RESTART_ERR: (
        "AMDSMI_STATUS_AMDGPU_RESTART_ERR - AMDGPU restart failed, please check dmsg for errors"
    ),
    AMDSMI_STATUS_SETTING_UNAVAILABLE: ("AMDSMI_STATUS_SETTING_UNAVAILABLE - Setting is not available"),
    AMDSMI_STATUS_CORRUPTED_EEPROM: "AMDSMI_STATUS_CORRUPTED_EEPROM - Setting is not available",
    AMDSMI_STATUS_MAP_ERROR: ("AMDSMI_STATUS_MAP_ERROR - The internal library error did not map to a status code"),
    AMDSMI_STATUS_UNKNOWN_ERROR: "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred",
}
_UNKNOWN_INFO: Final = "AMDSMI_STATUS_UNKNOWN_ERROR - An unknown error occurred"
# Failure statuses by the name AmdSmiGpuBackend reports them under (HardwareError.status).
_STATUS_BY_NAME: Final[dict[str, int]] = {
    name.removeprefix("AMDSMI_STATUS_"): value
    for name, value in list(globals().items())
    if name.startswith("AMDSMI_STATUS_") and value != AMDSMI_STATUS_SUCCESS
}


# --------------------------------------------------------------------------------------------
# Exceptions: same constructors and attributes as amdsmi_exception.py in the 7.0.2 wheel (§4.1).
# --------------------------------------------------------------------------------------------


class AmdSmiException(Exception):
    """Base smi exception class."""


class AmdSmiLibraryException(AmdSmiException):
    """A non-success status returned by the library; ``err_code`` is the absolute status value."""

    def __init__(self, err_code: int) -> None:
        err_code = abs(err_code)
        super().__init__(err_code)
        self.err_code = err_code
        self.err_info = _STATUS_INFO.get(err_code, _UNKNOWN_INFO)

    def __str__(self) -> str:
        return f"Error code:\n\t{self.err_code} | {self.err_info}"

    def get_error_info(self, detailed: bool = True) -> str:
        return self.err_info if detailed else self.err_info.split(" - ")[0]

    def get_error_code(self) -> int:
        return self.err_code


class AmdSmiRetryException(AmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(AMDSMI_STATUS_RETRY)


class AmdSmiTimeoutException(AmdSmiLibraryException):
    def __init__(self) -> None:
        super().__init__(AMDSMI_STATUS_TIMEOUT)


class AmdSmiParameterException(AmdSmiException):
    """An argument of the wrong type (a non-handle, a bare int instead of an enum member)."""

    # The parameter names are the real ones, so keyword callers behave the same.
    def __init__(
        self,
        receivedValue: object,  # noqa: N803
        expectedType: object,  # noqa: N803
        msg: str | None = None,
    ) -> None:
        super().__init__(msg)
        self.err_code: int | None = None
        self.actualType = type(receivedValue)
        self.expectedType = expectedType
        self.err_msg = f"Invalid parameter:\nActual type: {self.actualType}\nExpected type: {self.expectedType}"
        if msg is not None:
            self.err_msg = msg

    def __str__(self) -> str:
        return self.err_msg


class AmdSmiKeyException(AmdSmiException):
    def __init__(self, key: str) -> None:
        super().__init__()
        self.key = key
        self.err_msg = "Key " + key + " is missing from dictionary"

    def __str__(self) -> str:
        return self.err_msg


class AmdSmiBdfFormatException(AmdSmiException):
    def __init__(self, bdf: object) -> None:
        super().__init__()
        self.bdf = bdf

    def __str__(self) -> str:
        return (
            f"Wrong BDF format: {self.bdf}. \n"
            "BDF string should be: <domain>:<bus>:<device>.<function>\n"
            " or <bus>:<device>.<function> in hexcode format.\n"
            "Where:\n\t<domain> is 4 hex digits long from 0000-FFFF interval\n"
            "\t<bus> is 2 hex digits long from 00-FF interval\n"
            "\t<device> is 2 hex digits long from 00-1F interval\n"
            "\t<function> is 1 hex digit long from 0-7 interval"
        )


class EmulatorStateError(Exception):
    """The emulator's state file cannot be used (corrupt, foreign, or from another version)."""


class EmulatorFaultsError(AmdSmiLibraryException):
    """The faults file cannot be used; raised by the call that read it, as AMDSMI_STATUS_FILE_ERROR.

    A library exception, not an EmulatorStateError: the faults file is read on every call, long
    after start-up, so the error must surface through the adapter like any failed call, as a
    HardwareError on the operation that tripped over it. FILE_ERROR is what the real library
    reports for a sysfs file it cannot read, the nearest real analogue. ``detail`` names the file
    and the problem; the adapter appends it, since the status text alone would not say which file.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(AMDSMI_STATUS_FILE_ERROR)
        self.path = path
        self.detail = f"emulator faults file {path} {reason}; fix it or delete it (no file means no faults)"

    def __str__(self) -> str:
        return f"{super().__str__()}\n\t{self.detail}"


# --------------------------------------------------------------------------------------------
# Enums with the real values (§4.1, §4.4).
# --------------------------------------------------------------------------------------------


class AmdSmiInitFlags(enum.IntEnum):
    INIT_ALL_PROCESSORS = 0xFFFFFFFF
    INIT_AMD_CPUS = 1
    INIT_AMD_GPUS = 2
    INIT_AMD_APUS = 3
    INIT_NON_AMD_CPUS = 4
    INIT_NON_AMD_GPUS = 8


class AmdSmiComputePartitionType(enum.IntEnum):
    INVALID = 0
    SPX = 1
    DPX = 2
    TPX = 3
    QPX = 4
    CPX = 5


class AmdSmiAcceleratorPartitionType(enum.IntEnum):
    INVALID = 0
    SPX = 1
    DPX = 2
    TPX = 3
    QPX = 4
    CPX = 5


class AmdSmiMemoryPartitionType(enum.IntEnum):
    UNKNOWN = 0
    NPS1 = 1
    NPS2 = 2
    NPS4 = 4
    NPS8 = 8


class AmdSmiMemoryType(enum.IntEnum):
    VRAM = 0
    VIS_VRAM = 1
    GTT = 2


# Inside EmulatedAmdSmi, class attributes of the same names shadow these: annotations use aliases.
_InitFlags = AmdSmiInitFlags
_ComputeType = AmdSmiComputePartitionType
_MemoryPartitionType = AmdSmiMemoryPartitionType
_MemoryType = AmdSmiMemoryType


class _AmdSmiWrapper:
    """Stand-in for ``amdsmi.amdsmi_wrapper``: the status constants and the handle types."""

    AMDSMI_STATUS_SUCCESS: ClassVar[int] = AMDSMI_STATUS_SUCCESS
    AMDSMI_STATUS_INVAL: ClassVar[int] = AMDSMI_STATUS_INVAL
    AMDSMI_STATUS_NOT_SUPPORTED: ClassVar[int] = AMDSMI_STATUS_NOT_SUPPORTED
    AMDSMI_STATUS_TIMEOUT: ClassVar[int] = AMDSMI_STATUS_TIMEOUT
    AMDSMI_STATUS_RETRY: ClassVar[int] = AMDSMI_STATUS_RETRY
    AMDSMI_STATUS_NO_PERM: ClassVar[int] = AMDSMI_STATUS_NO_PERM
    AMDSMI_STATUS_OUT_OF_RESOURCES: ClassVar[int] = AMDSMI_STATUS_OUT_OF_RESOURCES
    AMDSMI_STATUS_BUSY: ClassVar[int] = AMDSMI_STATUS_BUSY
    AMDSMI_STATUS_NOT_FOUND: ClassVar[int] = AMDSMI_STATUS_NOT_FOUND
    AMDSMI_STATUS_NOT_INIT: ClassVar[int] = AMDSMI_STATUS_NOT_INIT
    AMDSMI_STATUS_DRIVER_NOT_LOADED: ClassVar[int] = AMDSMI_STATUS_DRIVER_NOT_LOADED
    AMDSMI_STATUS_AMDGPU_RESTART_ERR: ClassVar[int] = AMDSMI_STATUS_AMDGPU_RESTART_ERR
    AMDSMI_STATUS_SETTING_UNAVAILABLE: ClassVar[int] = AMDSMI_STATUS_SETTING_UNAVAILABLE
    AMDSMI_STATUS_UNKNOWN_ERROR: ClassVar[int] = AMDSMI_STATUS_UNKNOWN_ERROR
    amdsmi_processor_handle: ClassVar[type[EmulatedProcessorHandle]]
    amdsmi_socket_handle: ClassVar[type[EmulatedSocketHandle]]


# --------------------------------------------------------------------------------------------
# Handles
# --------------------------------------------------------------------------------------------


class EmulatedSocketHandle:
    """Opaque socket handle (one per physical GPU), valid for one enumeration generation."""

    __slots__ = ("_generation", "_gpu", "_owner")

    def __init__(self, owner: object, generation: int, gpu: int) -> None:
        self._owner = owner
        self._generation = generation
        self._gpu = gpu

    def __repr__(self) -> str:
        return f"<EmulatedSocketHandle gpu={self._gpu} generation={self._generation}>"


class EmulatedProcessorHandle:
    """Opaque processor handle: one logical GPU (XCP), valid for one enumeration generation."""

    __slots__ = ("_generation", "_gpu", "_owner", "_partition")

    def __init__(self, owner: object, generation: int, gpu: int, partition: int) -> None:
        self._owner = owner
        self._generation = generation
        self._gpu = gpu
        self._partition = partition

    def __repr__(self) -> str:
        return f"<EmulatedProcessorHandle gpu={self._gpu} partition={self._partition} generation={self._generation}>"


_AmdSmiWrapper.amdsmi_processor_handle = EmulatedProcessorHandle
_AmdSmiWrapper.amdsmi_socket_handle = EmulatedSocketHandle


# --------------------------------------------------------------------------------------------
# Hardware constants
# --------------------------------------------------------------------------------------------

STATE_VERSION: Final = 1

# Realistic PCI addresses of the 8 OAM slots of an MI300X platform (domain, bus, device).
_GPU_PCI: Final = (
    (0, 0x05, 0),
    (0, 0x26, 0),
    (0, 0x46, 0),
    (0, 0x65, 0),
    (0, 0x85, 0),
    (0, 0xA6, 0),
    (0, 0xC6, 0),
    (0, 0xE5, 0),
)
MAX_GPUS: Final = len(_GPU_PCI)

_VRAM_TOTAL_MIB: Final = 196592  # §2.4: what amd-smi reports for a whole MI300X
_PRIMARY_IDLE_USED_MIB: Final = 283  # §2.4: "283/196592 MB" idle
_SECONDARY_IDLE_USED_MIB: Final = 512  # §2.4: secondaries "0.5/24.0 GB" idle (6.4.1; exact figure unconfirmed)
_GTT_TOTAL_BYTES: Final = 1152 * GIB  # amdgpu's default GTT is 3/4 of host RAM; a 1.5 TiB host
_CUS_PER_GPU: Final = 304  # §1.1
_CPU_KFD_NODES: Final = 2  # §2.2: KFD numbers CPU nodes first; a two-socket host
_DRM_RENDER_BASE: Final = 128
_MAX_NUM_PROCESSES: Final = 1024  # §4.3: buffer size of amdsmi_get_gpu_process_list
_DEVICE_ID: Final = 0x74A1  # §1.1 MI300X
_MARKET_NAME: Final = "AMD Instinct MI300X"

# §3.1: accelerator profile index of each mode on MI300X.
_PROFILE_INDEX: Final[dict[ComputePartition, int]] = {
    ComputePartition.SPX: 0,
    ComputePartition.DPX: 1,
    ComputePartition.QPX: 2,
    ComputePartition.CPX: 3,
}
# §3.6 observed resources per profile: (type, per-partition amount, partitions sharing one).
_PROFILE_RESOURCES: Final[dict[ComputePartition, tuple[tuple[str, int, int], ...]]] = {
    ComputePartition.SPX: (("XCC", 8, 1), ("DECODER", 4, 1), ("DMA", 16, 1), ("JPEG", 40, 1)),
    ComputePartition.DPX: (("XCC", 4, 1), ("DECODER", 2, 1), ("DMA", 8, 1), ("JPEG", 20, 1)),
    ComputePartition.QPX: (("XCC", 2, 1), ("DECODER", 1, 1), ("DMA", 4, 1), ("JPEG", 10, 1)),
    ComputePartition.CPX: (("XCC", 1, 1), ("DECODER", 1, 2), ("DMA", 2, 1), ("JPEG", 10, 2)),
}
_NPS_ORDER: Final = (MemoryPartition.NPS1, MemoryPartition.NPS2, MemoryPartition.NPS4)
_BDF_RE: Final = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")
_VERSION_RE: Final = re.compile(r"^(\d+)\.(\d+)(?:\.(\d+))?$")


@dataclass
class _Holder:
    """A process registered as holding one logical device (it has VRAM there)."""

    pid: int
    gpu: int
    partition: int
    name: str
    vram_bytes: int
    start_time: int | None
    """Kernel start time of the pid at registration, so a recycled pid is not mistaken for it."""


@dataclass
class _FaultUse:
    """How much of one version of the faults file is used up (its one-shot faults)."""

    digest: str
    """Digest of the faults file's bytes: a new write is a new version, armed afresh."""
    failed_reloads: int = 0
    killed: bool = False


@dataclass
class _HostState:
    """Everything about the hardware that survives a daemon restart."""

    compute: list[ComputePartition]
    memory: MemoryPartition
    staged_memory: MemoryPartition | None
    holders: list[_Holder]
    # Persisted with the hardware so a daemon killed after a one-shot fault does not meet it again.
    fault_use: _FaultUse | None = None


@dataclass(frozen=True)
class _Snapshot:
    """What one amdsmi_init saw: the library enumerates at init and never again (§3.2, §6.3)."""

    generation: int
    sockets: tuple[EmulatedSocketHandle, ...]
    processors: tuple[EmulatedProcessorHandle, ...]


def _parse_rocm_version(version: str) -> tuple[int, int, int]:
    match = _VERSION_RE.match(version)
    if match is None:
        raise ValueError(f"rocm_version must look like '7.0.2', got {version!r}")
    major, minor, patch = match.groups()
    return int(major), int(minor), int(patch or 0)


# proc(5): after "(comm)", field 3 (state) is index 0, so field 22 (starttime) is index 19.
_STAT_STARTTIME: Final = 19


def _read_proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks) of a pid from /proc, or None if unreadable."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # The command name is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) <= _STAT_STARTTIME:
        return None
    try:
        return fields[0], int(fields[_STAT_STARTTIME])
    except ValueError:
        return None


_HAVE_PROC: Final = Path("/proc/self/stat").exists()


def _pid_alive(pid: int, start_time: int | None) -> bool:
    """Whether the process still exists and could still hold /dev/kfd.

    A zombie has already closed its files, so the KFD process is gone (§3.3 3.); a pid whose
    start time changed was recycled by another process.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    if not _HAVE_PROC:
        return True
    stat = _read_proc_stat(pid)
    if stat is None:
        return False  # vanished between kill() and the read
    state, started = stat
    if state in ("Z", "X"):
        return False
    return start_time is None or started == start_time


def _stable_hash(*parts: object, bits: int = 64) -> int:
    digest = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & ((1 << bits) - 1)


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` crash-safely: temp file in the same dir, fsync, rename, fsync the dir."""
    directory = path.parent
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave a partial temp file behind; the old file is still intact.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    # The rename is durable only once the directory entry is on disk.
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# --------------------------------------------------------------------------------------------
# Fault injection from another process: the faults file
# --------------------------------------------------------------------------------------------

FAULTS_FILE: Final = "emulator-faults.json"
"""Name of the faults file, next to the emulator's state file (the daemon's state dir)."""

KILL_POINTS: Final = ("set_compute", "set_memory", "reload")
"""Operations ``EmulatorFaults.kill_after`` can name."""

_FAULT_KEYS: Final = frozenset(
    {
        "revision",
        "unprivileged",
        "fail_reload",
        "fail_reload_count",
        "reload_seconds",
        "ignore_compute_set",
        "holders",
        "busy_gpus",
        "kill_after",
    }
)
_HOLDER_KEYS: Final = frozenset({"pid", "gpu", "partition", "name", "vram_bytes", "start_time"})


def _check_int(value: object, where: str, low: int, high: int | None = None) -> None:
    # bool is an int to Python but never a meaningful count or index in this file.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{where} must be {bounds}, got {value}")


def _check_gpus(values: tuple[int, ...], where: str) -> None:
    for i, gpu in enumerate(values):
        _check_int(gpu, f"{where}[{i}]", 0, MAX_GPUS - 1)


@dataclass(frozen=True)
class FaultHolder:
    """A process the faults file says holds logical device (gpu, partition), like register_holder.

    It counts only while ``pid`` is alive (not a zombie) and, when ``start_time`` is known, still
    the same process; write_faults records the start time so a recycled pid never counts.
    """

    pid: int
    gpu: int
    partition: int = 0
    name: str = "python3"
    vram_bytes: int = 0
    start_time: int | None = None

    def __post_init__(self) -> None:
        _check_int(self.pid, "pid", 1)
        _check_int(self.gpu, "gpu", 0, MAX_GPUS - 1)
        # Any id a GPU can have in some mode: the holder may outlive the mode it was written for.
        _check_int(self.partition, "partition", 0, XCDS_PER_GPU - 1)
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"name must be a non-empty string, got {self.name!r}")
        _check_int(self.vram_bytes, "vram_bytes", 0)
        if self.start_time is not None:
            _check_int(self.start_time, "start_time", 0)


@dataclass(frozen=True)
class EmulatorFaults:
    """Hardware faults a test injects into a running emulator through FAULTS_FILE; defaults are none.

    The emulator re-reads the file on every call that changes partitions, on every reload, and on
    every query that reports holders (process lists, VRAM usage), so a change takes effect on the
    next such call without restarting the daemon. See docs/emulator.md.

    - ``unprivileged``: every set call, the driver reload and the (root-only) profile config fail
      with NO_PERM (10), and process names read "N/A", as for a caller that is not root (§3.3 1.).
    - ``fail_reload`` / ``fail_reload_count``: the next ``fail_reload_count`` driver reloads
      after this version of the file was written fail with that status name (e.g.
      "AMDGPU_RESTART_ERR", §3.5), after taking their usual time; later ones succeed. A failed
      reload leaves the staged memory partition staged and every GPU in its old mode, with handles
      still valid. Real hardware fails that way when ``modprobe -r`` refuses (module in use);
      had the unload succeeded and the load failed, the GPUs would vanish until a later load.
      The emulator models the first case only. Reloads already failed are recorded in the
      emulator's state file, so a daemon restart does not re-arm them.
    - ``reload_seconds``: how long a driver reload takes, instead of the emulator's own setting
      (§3.4: 40 to 140 s on real hardware). The emulator holds its lock meanwhile, as now.
    - ``ignore_compute_set``: GPUs whose firmware acknowledges a compute partition write and
      keeps its mode. The set returns success after the usual checks; only reading the mode
      back shows the mismatch.
    - ``holders``: processes holding devices, in addition to those registered with
      register_holder. They appear in every process list of that host (§6.1), count towards
      VRAM used, make a compute set on their GPU BUSY (30) (§3.3 3.) and any reload
      AMDGPU_RESTART_ERR (54) (§3.3 4.).
    - ``busy_gpus``: a compute set on these GPUs fails BUSY whatever the holders: the device is
      held by something amdsmi does not list. Setting the mode a GPU already has still succeeds,
      as the kernel returns before its busy check. Reloads are not affected.
    - ``kill_after``: one of KILL_POINTS. The next successful call of that kind, after this
      version of the file was written, makes its change durable and then SIGKILLs the calling
      process, the window between a hardware change and the caller recording it. Once per
      version of the file, remembered across restarts like ``fail_reload``.
    """

    unprivileged: bool = False
    fail_reload: str | None = None
    fail_reload_count: int = 1
    reload_seconds: float | None = None
    ignore_compute_set: tuple[int, ...] = ()
    holders: tuple[FaultHolder, ...] = ()
    busy_gpus: tuple[int, ...] = ()
    kill_after: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.unprivileged, bool):
            raise ValueError(f"unprivileged must be true or false, got {self.unprivileged!r}")
        if self.fail_reload is not None:
            if not isinstance(self.fail_reload, str):
                raise ValueError(f"fail_reload must be a status name or null, got {self.fail_reload!r}")
            name = self.fail_reload.upper().removeprefix("AMDSMI_STATUS_")
            if name not in _STATUS_BY_NAME:
                raise ValueError(
                    f"fail_reload {self.fail_reload!r} is not an amdsmi failure status name (e.g. AMDGPU_RESTART_ERR)"
                )
            object.__setattr__(self, "fail_reload", name)
        _check_int(self.fail_reload_count, "fail_reload_count", 1)
        if self.reload_seconds is not None:
            seconds = self.reload_seconds
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
                raise ValueError(f"reload_seconds must be a number of seconds or null, got {seconds!r}")
            if seconds < 0:
                raise ValueError(f"reload_seconds must be >= 0, got {seconds!r}")
            object.__setattr__(self, "reload_seconds", float(seconds))
        # Callers may pass lists; keep the value immutable like the dataclass.
        object.__setattr__(self, "ignore_compute_set", tuple(self.ignore_compute_set))
        object.__setattr__(self, "busy_gpus", tuple(self.busy_gpus))
        object.__setattr__(self, "holders", tuple(self.holders))
        _check_gpus(self.ignore_compute_set, "ignore_compute_set")
        _check_gpus(self.busy_gpus, "busy_gpus")
        for i, holder in enumerate(self.holders):
            if not isinstance(holder, FaultHolder):
                raise ValueError(f"holders[{i}] must be a FaultHolder, got {holder!r}")
        if self.kill_after is not None and self.kill_after not in KILL_POINTS:
            raise ValueError(f"kill_after must be one of {', '.join(KILL_POINTS)} or null, got {self.kill_after!r}")

    @property
    def fail_reload_status(self) -> int | None:
        """The status code ``fail_reload`` names, or None."""
        return None if self.fail_reload is None else _STATUS_BY_NAME[self.fail_reload]

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ignore_compute_set"] = list(self.ignore_compute_set)
        doc["busy_gpus"] = list(self.busy_gpus)
        return doc

    @classmethod
    def from_json(cls, doc: object) -> EmulatorFaults:
        """Parse the faults file's JSON object; ValueError says which key is wrong."""
        if not isinstance(doc, dict):
            raise ValueError("does not hold a JSON object")
        unknown = sorted(set(doc) - _FAULT_KEYS)
        if unknown:
            raise ValueError(f"has unknown keys {unknown}; known keys are {sorted(_FAULT_KEYS)}")
        values = {k: v for k, v in doc.items() if k != "revision"}
        for key in ("ignore_compute_set", "busy_gpus", "holders"):
            if key in values:
                if not isinstance(values[key], list):
                    raise ValueError(f"{key} must be a list, got {values[key]!r}")
                values[key] = tuple(values[key])
        holders: list[FaultHolder] = []
        for i, item in enumerate(values.get("holders", ())):
            if not isinstance(item, dict):
                raise ValueError(f"holders[{i}] must be an object, got {item!r}")
            if missing := {"pid", "gpu"} - set(item):
                raise ValueError(f"holders[{i}] lacks {sorted(missing)}")
            if extra := sorted(set(item) - _HOLDER_KEYS):
                raise ValueError(f"holders[{i}] has unknown keys {extra}")
            try:
                holders.append(FaultHolder(**item))
            except ValueError as exc:
                raise ValueError(f"holders[{i}].{exc}") from None
        values["holders"] = tuple(holders)
        return cls(**values)


NO_FAULTS: Final = EmulatorFaults()


def faults_path(state_dir: Path) -> Path:
    """Where the emulator whose state file is in ``state_dir`` looks for its faults."""
    return state_dir / FAULTS_FILE


def write_faults(state_dir: Path, faults: EmulatorFaults) -> Path:
    """Atomically replace the faults of the emulator whose state file is in ``state_dir``.

    Every write is a new version of the file: its one-shot faults (``fail_reload``,
    ``kill_after``) are armed afresh even when the faults are the same as before. Holders
    without a start time get the pid's current one. Returns the file's path.
    """
    holders = []
    for holder in faults.holders:
        stat = _read_proc_stat(holder.pid) if holder.start_time is None and _HAVE_PROC else None
        holders.append(holder if stat is None else replace(holder, start_time=stat[1]))
    doc = {"revision": secrets.token_hex(8), **replace(faults, holders=tuple(holders)).to_json()}
    path = faults_path(state_dir)
    _write_atomically(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def clear_faults(state_dir: Path) -> None:
    """Remove the faults file: the emulator behaves as a healthy host from its next call."""
    faults_path(state_dir).unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------
# The emulator
# --------------------------------------------------------------------------------------------


class EmulatedAmdSmi:
    """An 8-GPU MI300X host (or fewer GPUs) answering the amdsmi 7.0.2 Python API.

    Behaviour follows mi300x.md §1 to §4 and the §7 checklist. Thread-safe: every call takes one
    lock. One instance owns its state file at a time.
    """

    # The real module's exception classes, enums and wrapper namespace, as attributes.
    AmdSmiException: ClassVar[type[AmdSmiException]] = AmdSmiException
    AmdSmiLibraryException: ClassVar[type[AmdSmiLibraryException]] = AmdSmiLibraryException
    AmdSmiRetryException: ClassVar[type[AmdSmiRetryException]] = AmdSmiRetryException
    AmdSmiTimeoutException: ClassVar[type[AmdSmiTimeoutException]] = AmdSmiTimeoutException
    AmdSmiParameterException: ClassVar[type[AmdSmiParameterException]] = AmdSmiParameterException
    AmdSmiKeyException: ClassVar[type[AmdSmiKeyException]] = AmdSmiKeyException
    AmdSmiBdfFormatException: ClassVar[type[AmdSmiBdfFormatException]] = AmdSmiBdfFormatException
    AmdSmiInitFlags: ClassVar[type[AmdSmiInitFlags]] = AmdSmiInitFlags
    AmdSmiComputePartitionType: ClassVar[type[AmdSmiComputePartitionType]] = AmdSmiComputePartitionType
    AmdSmiMemoryPartitionType: ClassVar[type[AmdSmiMemoryPartitionType]] = AmdSmiMemoryPartitionType
    AmdSmiMemoryType: ClassVar[type[AmdSmiMemoryType]] = AmdSmiMemoryType
    amdsmi_wrapper: ClassVar[type[_AmdSmiWrapper]] = _AmdSmiWrapper

    def __init__(
        self,
        state_path: Path | None,
        *,
        gpu_count: int = 8,
        rocm_version: str = "7.0.2",
        privileged: bool = True,
        reload_seconds: float = 0.0,
        partition_caps: tuple[str, ...] = ("NPS1", "NPS4"),
        clock: Callable[[float], None] = time.sleep,
        strict_busy: bool = False,
    ) -> None:
        """Open (or create) the emulated host.

        ``strict_busy`` models older kernels where any KFD process anywhere blocks a compute
        switch (§3.3 3.); by default only processes holding a device of that GPU do. With a
        ``state_path``, the emulator also obeys the faults file FAULTS_FILE next to it (see
        EmulatorFaults); an in-memory emulator has none.
        """
        if isinstance(gpu_count, bool) or not isinstance(gpu_count, int) or not 1 <= gpu_count <= MAX_GPUS:
            raise ValueError(f"gpu_count must be an integer from 1 to {MAX_GPUS}, got {gpu_count!r}")
        if reload_seconds < 0:
            raise ValueError(f"reload_seconds must be >= 0, got {reload_seconds!r}")
        caps: list[MemoryPartition] = []
        for cap in partition_caps:
            # NPS8 exists in the API but not on MI300X (§1.3), so firmware never offers it.
            if cap not in MemoryPartition.__members__:
                raise ValueError(f"partition_caps entries must be NPS1, NPS2 or NPS4, got {cap!r}")
            caps.append(MemoryPartition(cap))
        if not caps:
            raise ValueError("partition_caps must name at least one memory partition mode")

        self._state_path = state_path
        self._faults_path = None if state_path is None else faults_path(state_path.parent)
        self._gpu_count = gpu_count
        self._rocm_version = _parse_rocm_version(rocm_version)
        self._privileged = privileged
        self._reload_seconds = float(reload_seconds)
        self._caps = frozenset(caps)
        self._clock = clock
        self._strict_busy = strict_busy

        self._lock = threading.RLock()
        self._token = object()  # handles from another emulator instance are foreign here
        self._refcount = 0
        self._generation = 0  # bumped by every full init and every hardware change
        self._snapshot: _Snapshot | None = None
        self._fail_next_reload: int | None = None

        loaded = self._load()
        if loaded is None:
            # A missing file is a fresh host: SPX/NPS1 is the default at first boot (§1.2).
            self._state = _HostState(
                compute=[ComputePartition.SPX] * gpu_count,
                memory=MemoryPartition.NPS1,
                staged_memory=None,
                holders=[],
            )
            self._save()
        else:
            self._state = loaded

    # ---------------------------------------------------------------- persistence

    def _state_error(self, reason: str) -> EmulatorStateError:
        return EmulatorStateError(
            f"emulator state file {self._state_path}: {reason}; "
            "delete it to reset the emulated host to a fresh SPX/NPS1 machine"
        )

    def _load(self) -> _HostState | None:
        if self._state_path is None:
            return None
        try:
            raw = self._state_path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._state_error(f"is not valid JSON ({exc})") from exc
        if not isinstance(doc, dict):
            raise self._state_error("does not hold a JSON object")
        version = doc.get("version")
        if version != STATE_VERSION:
            raise self._state_error(f"has version {version!r}, but this gpushared reads version {STATE_VERSION}")
        try:
            return self._parse_state(doc)
        except (KeyError, TypeError, ValueError) as exc:
            raise self._state_error(f"is malformed ({exc!r})") from exc

    def _parse_state(self, doc: dict[str, Any]) -> _HostState:
        gpu_count = doc["gpu_count"]
        if gpu_count != self._gpu_count:
            raise ValueError(
                f"written for gpu_count={gpu_count}, but the emulator was started with gpu_count={self._gpu_count}"
            )
        compute = [ComputePartition(str(m)) for m in doc["compute_partitions"]]
        if len(compute) != self._gpu_count:
            raise ValueError(f"compute_partitions has {len(compute)} entries for {self._gpu_count} GPUs")
        memory = MemoryPartition(str(doc["memory_partition"]))
        staged_raw = doc["staged_memory_partition"]
        staged = None if staged_raw is None else MemoryPartition(str(staged_raw))
        for gpu, mode in enumerate(compute):
            if memory not in VALID_COMBINATIONS[mode]:
                raise ValueError(f"gpu {gpu} is {mode} under {memory}, which MI300X cannot be in")
        holders: list[_Holder] = []
        for item in doc["holders"]:
            holder = _Holder(
                pid=int(item["pid"]),
                gpu=int(item["gpu"]),
                partition=int(item["partition"]),
                name=str(item["name"]),
                vram_bytes=int(item["vram_bytes"]),
                start_time=None if item["start_time"] is None else int(item["start_time"]),
            )
            if not 0 <= holder.gpu < self._gpu_count:
                raise ValueError(f"holder pid {holder.pid} on gpu {holder.gpu}, which does not exist")
            if not 0 <= holder.partition < compute[holder.gpu].partition_count:
                raise ValueError(f"holder pid {holder.pid} on partition {holder.partition}, which does not exist")
            holders.append(holder)
        # Absent from files written before fault injection existed.
        use = doc.get("fault_use")
        fault_use = (
            None
            if use is None
            else _FaultUse(
                digest=str(use["digest"]), failed_reloads=int(use["failed_reloads"]), killed=bool(use["killed"])
            )
        )
        return _HostState(compute=compute, memory=memory, staged_memory=staged, holders=holders, fault_use=fault_use)

    def _save(self) -> None:
        path = self._state_path
        if path is None:
            return
        use = self._state.fault_use
        doc = {
            "version": STATE_VERSION,
            "gpu_count": self._gpu_count,
            "compute_partitions": [str(m) for m in self._state.compute],
            "memory_partition": str(self._state.memory),
            "staged_memory_partition": None if self._state.staged_memory is None else str(self._state.staged_memory),
            "holders": [
                {
                    "pid": h.pid,
                    "gpu": h.gpu,
                    "partition": h.partition,
                    "name": h.name,
                    "vram_bytes": h.vram_bytes,
                    "start_time": h.start_time,
                }
                for h in self._state.holders
            ],
            "fault_use": None if use is None else asdict(use),
        }
        _write_atomically(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    # ---------------------------------------------------------------- fault injection, tests

    def register_holder(self, pid: int, gpu: int, partition: int, name: str = "python3", vram_bytes: int = 0) -> None:
        """Record that ``pid`` holds logical device (gpu, partition) with ``vram_bytes`` of VRAM.

        A process may hold several devices (one call each); registering the same device again
        replaces the entry. Dead pids are pruned whenever holders are read.
        """
        if pid <= 0:
            raise ValueError(f"pid must be positive, got {pid}")
        if vram_bytes < 0:
            raise ValueError(f"vram_bytes must be >= 0, got {vram_bytes}")
        with self._lock:
            if not 0 <= gpu < self._gpu_count:
                raise ValueError(f"gpu must be 0..{self._gpu_count - 1}, got {gpu}")
            count = self._state.compute[gpu].partition_count
            if not 0 <= partition < count:
                raise ValueError(
                    f"partition must be 0..{count - 1} for gpu {gpu} in {self._state.compute[gpu]}, got {partition}"
                )
            stat = _read_proc_stat(pid) if _HAVE_PROC else None
            holder = _Holder(pid, gpu, partition, name, vram_bytes, None if stat is None else stat[1])
            self._state.holders = [
                h for h in self._state.holders if (h.pid, h.gpu, h.partition) != (pid, gpu, partition)
            ]
            self._state.holders.append(holder)
            self._save()

    def unregister_holder(self, pid: int) -> None:
        """Forget every device ``pid`` holds (as if it closed /dev/kfd)."""
        with self._lock:
            kept = [h for h in self._state.holders if h.pid != pid]
            if len(kept) != len(self._state.holders):
                self._state.holders = kept
                self._save()

    def fail_next_reload(self, status: int = AMDSMI_STATUS_AMDGPU_RESTART_ERR) -> None:
        """Make the next amdsmi_gpu_driver_reload() fail with ``status``; the host is unchanged."""
        with self._lock:
            self._fail_next_reload = status

    def _live_holders(self, faults: EmulatorFaults) -> list[_Holder]:
        # Pruning here means a killed child stops blocking the next switch, as KFD would (§3.3).
        live = [h for h in self._state.holders if _pid_alive(h.pid, h.start_time)]
        if len(live) != len(self._state.holders):
            self._state.holders = live
            self._save()
        # Injected holders are never pruned: the faults file belongs to whoever wrote it.
        injected = [
            _Holder(h.pid, h.gpu, h.partition, h.name, h.vram_bytes, h.start_time)
            for h in faults.holders
            if _pid_alive(h.pid, h.start_time)
        ]
        return live + injected

    def _read_faults(self) -> tuple[EmulatorFaults, str]:
        """The faults in force now and the digest of the file they came from ("" for none)."""
        path = self._faults_path
        if path is None:
            return NO_FAULTS, ""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return NO_FAULTS, ""
        except OSError as exc:
            raise EmulatorFaultsError(path, f"cannot be read ({exc.strerror or exc})") from exc
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise EmulatorFaultsError(path, f"is not valid JSON ({exc})") from exc
        try:
            faults = EmulatorFaults.from_json(doc)
        except (TypeError, ValueError) as exc:
            raise EmulatorFaultsError(path, f"is malformed: {exc}") from exc
        named = [("busy_gpus", g) for g in faults.busy_gpus]
        named += [("ignore_compute_set", g) for g in faults.ignore_compute_set]
        named += [(f"holders[{i}].gpu", h.gpu) for i, h in enumerate(faults.holders)]
        for where, gpu in named:
            if gpu >= self._gpu_count:
                raise EmulatorFaultsError(path, f"names gpu {gpu} in {where}, but the host has {self._gpu_count} GPUs")
        return faults, hashlib.blake2b(raw, digest_size=16).hexdigest()

    def _fault_use(self, digest: str) -> _FaultUse:
        use = self._state.fault_use
        if use is None or use.digest != digest:
            use = self._state.fault_use = _FaultUse(digest)
        return use

    def _kill_if_armed(self, operation: str, faults: EmulatorFaults, digest: str) -> None:
        if faults.kill_after != operation:
            return
        use = self._fault_use(digest)
        if use.killed:
            return
        use.killed = True
        self._save()
        # SIGKILL rather than an exception: the caller must get no chance to record the change.
        os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------- identity helpers

    def _bdf_parts(self, gpu: int) -> tuple[int, int, int]:
        return _GPU_PCI[gpu]

    def _bdf(self, gpu: int, partition: int) -> str:
        domain, bus, dev = self._bdf_parts(gpu)
        # §2.2: partitions share the parent's bus:dev; the function number is the partition id.
        return f"{domain:04x}:{bus:02x}:{dev:02x}.{partition:x}"

    def _index(self, gpu: int, partition: int, modes: Iterable[ComputePartition]) -> int:
        # §2.2: amd-smi index is sorted by BDF then partition; BDFs here ascend with the GPU.
        before = sum(m.partition_count for m in list(modes)[:gpu])
        return before + partition

    def _unique_id(self, gpu: int, partition: int) -> int:
        # §2.2: one UUID per partition from ROCm 7.0; before that every partition shares the GPU's.
        shared = self._rocm_version < (7, 0, 0)
        return _stable_hash("mi300x-unique-id", self._bdf(gpu, 0), "gpu" if shared else partition)

    def _kfd_ids(self, modes: tuple[ComputePartition, ...]) -> dict[tuple[int, int], int]:
        # KFD's gpu_id is a 16-bit hash of node properties, re-hashed until unique (§2.2).
        used: set[int] = set()
        ids: dict[tuple[int, int], int] = {}
        for gpu, mode in enumerate(modes):
            for part in range(mode.partition_count):
                value = _stable_hash("kfd", self._bdf(gpu, part), mode, bits=16)
                while value == 0 or value in used:
                    value = (value + 1) & 0xFFFF
                used.add(value)
                ids[(gpu, part)] = value
        return ids

    # ---------------------------------------------------------------- library session

    def _require_init(self) -> _Snapshot:
        if self._refcount == 0 or self._snapshot is None:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_INIT)
        return self._snapshot

    def _resolve(self, handle: object) -> tuple[int, int]:
        """(gpu, partition) of a live handle; the type check runs first, as in the wrapper."""
        if not isinstance(handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(handle, EmulatedProcessorHandle)
        self._require_init()
        if handle._owner is not self._token or handle._generation != self._generation:
            # §6.3: after a partition change or reload, old handles no longer name a device.
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_FOUND)
        return handle._gpu, handle._partition

    def _resolve_socket(self, handle: object) -> int:
        if not isinstance(handle, EmulatedSocketHandle):
            raise AmdSmiParameterException(handle, EmulatedSocketHandle)
        self._require_init()
        if handle._owner is not self._token or handle._generation != self._generation:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_FOUND)
        return handle._gpu

    def _is_root(self, faults: EmulatorFaults) -> bool:
        return self._privileged and not faults.unprivileged

    def _require_root(self, faults: EmulatorFaults) -> None:
        # §3.3 1.: rsmi's set functions start with REQUIRE_ROOT_ACCESS.
        if not self._is_root(faults):
            raise AmdSmiLibraryException(AMDSMI_STATUS_NO_PERM)

    @staticmethod
    def _require_primary(partition: int) -> None:
        # §2.3: partition mode files live on the PCI device (partition 0) only.
        if partition != 0:
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_SUPPORTED)

    def _hardware_changed(self) -> None:
        self._generation += 1
        self._save()

    def amdsmi_init(self, flag: _InitFlags = _InitFlags.INIT_AMD_GPUS) -> None:
        if not isinstance(flag, AmdSmiInitFlags):
            raise AmdSmiParameterException(flag, AmdSmiInitFlags)
        with self._lock:
            if self._refcount > 0:
                # 7.0.2 counts references; a nested init does not re-enumerate (§4.1).
                self._refcount += 1
                return
            self._generation += 1
            gpus = range(self._gpu_count) if flag & AmdSmiInitFlags.INIT_AMD_GPUS else range(0)
            sockets = tuple(EmulatedSocketHandle(self._token, self._generation, g) for g in gpus)
            by_gpu = tuple(
                tuple(
                    EmulatedProcessorHandle(self._token, self._generation, g, p)
                    for p in range(self._state.compute[g].partition_count)
                )
                for g in gpus
            )
            self._snapshot = _Snapshot(
                generation=self._generation,
                sockets=sockets,
                processors=tuple(h for group in by_gpu for h in group),
            )
            self._refcount = 1

    def amdsmi_shut_down(self) -> None:
        with self._lock:
            # The real library returns success when the count is already zero.
            if self._refcount == 0:
                return
            self._refcount -= 1
            if self._refcount == 0:
                self._snapshot = None
                self._generation += 1

    # ---------------------------------------------------------------- discovery and identity

    def amdsmi_get_socket_handles(self) -> list[EmulatedSocketHandle]:
        with self._lock:
            return list(self._require_init().sockets)

    def amdsmi_get_socket_info(self, socket_handle: EmulatedSocketHandle) -> str:
        with self._lock:
            gpu = self._resolve_socket(socket_handle)
            domain, bus, dev = self._bdf_parts(gpu)
            # The library names a GPU socket by the BD part of the BDF, upper-case hex.
            return f"{domain:04X}:{bus:02X}:{dev:02X}"

    def amdsmi_get_processor_handles(self) -> list[EmulatedProcessorHandle]:
        # §2.1: the Python wrapper concatenates every socket's partitions into one flat list. The
        # list is the one enumerated at init: after a switch it stays stale until shut_down+init.
        with self._lock:
            return list(self._require_init().processors)

    def amdsmi_get_processor_handle_from_bdf(self, bdf: str) -> EmulatedProcessorHandle:
        match = _BDF_RE.match(bdf) if isinstance(bdf, str) else None
        if match is None:
            raise AmdSmiBdfFormatException(bdf)
        domain_s, bus_s, dev_s, fn_s = match.groups()
        domain, bus, dev, fn = (int(x or "0", 16) for x in (domain_s, bus_s, dev_s, fn_s))
        wanted = f"{domain:04x}:{bus:02x}:{dev:02x}.{fn:x}"
        with self._lock:
            snapshot = self._require_init()
            for handle in snapshot.processors:
                if self._bdf(handle._gpu, handle._partition) == wanted:
                    return handle
            raise AmdSmiLibraryException(AMDSMI_STATUS_NOT_FOUND)

    def amdsmi_get_gpu_device_bdf(self, processor_handle: EmulatedProcessorHandle) -> str:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            return self._bdf(gpu, part)

    def amdsmi_get_gpu_bdf_id(self, processor_handle: EmulatedProcessorHandle) -> int:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            domain, bus, dev = self._bdf_parts(gpu)
            # §2.2: partition id in bits [31:28] of the 64-bit BDF id.
            return (domain << 32) | (part << 28) | (bus << 8) | (dev << 3)

    def amdsmi_get_gpu_device_uuid(self, processor_handle: EmulatedProcessorHandle) -> str:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            uid = self._unique_id(gpu, part)
            # Layout of the real string, e.g. c0ff74a1-0000-1000-80b1-06985c515c91 (§4.2).
            head, mid, tail = uid >> 56, (uid >> 48) & 0xFF, uid & 0xFFFFFFFFFFFF
            return f"{head:02x}ff{_DEVICE_ID:04x}-0000-1000-80{mid:02x}-{tail:012x}"

    def amdsmi_get_gpu_enumeration_info(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            index = self._index(gpu, part, self._state.compute)
            return {
                # §2.2: renderD128+8g+p; each GPU owns 8 DRM minors whatever its mode (§2.1).
                "drm_render": _DRM_RENDER_BASE + XCDS_PER_GPU * gpu + part,
                "drm_card": XCDS_PER_GPU * gpu + part,
                "hsa_id": _CPU_KFD_NODES + index,
                "hip_id": index,
                "hip_uuid": f"GPU-{self._unique_id(gpu, part):016x}",
            }

    def amdsmi_get_gpu_kfd_info(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            modes = tuple(self._state.compute)
            return {
                "kfd_id": self._kfd_ids(modes)[(gpu, part)],
                "node_id": _CPU_KFD_NODES + self._index(gpu, part, modes),
                "current_partition_id": part,
            }

    def amdsmi_get_gpu_asic_info(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            mode = self._state.compute[gpu]
            return {
                "market_name": _MARKET_NAME,
                "vendor_id": "0x1002",
                "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
                "subvendor_id": "0x1002",
                "device_id": f"0x{_DEVICE_ID:04x}",
                "rev_id": "0x00",
                # §2.3: the ASIC serial is a primary-only datum.
                "asic_serial": f"0x{self._unique_id(gpu, 0):016X}" if part == 0 else "N/A",
                "oam_id": gpu,
                # §4.2: num_compute_units is per partition (152 in DPX).
                "num_compute_units": _CUS_PER_GPU // mode.partition_count,
                "target_graphics_version": "gfx942",
                "subsystem_id": f"0x{_DEVICE_ID:04x}",
            }

    def amdsmi_get_gpu_board_info(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            serial = f"{_stable_hash('board', self._bdf(gpu, 0), bits=40):012d}"[-12:]
            return {
                "model_number": "102-G30211-0C",
                "product_serial": serial if part == 0 else "N/A",  # §2.3: primary only
                "fru_id": "N/A",
                "product_name": "AMD Instinct MI300X OAM",
                "manufacturer_name": "AMD",
            }

    def amdsmi_get_gpu_xcd_counter(self, processor_handle: EmulatedProcessorHandle) -> int:
        with self._lock:
            gpu, _ = self._resolve(processor_handle)
            return self._state.compute[gpu].xcds_per_partition

    # ---------------------------------------------------------------- memory and processes

    def _vram_total_mib(self, gpu: int, part: int) -> int:
        # §2.4: the primary reports the whole GPU in every mode; secondaries 196592/n.
        if part == 0:
            return _VRAM_TOTAL_MIB
        return _VRAM_TOTAL_MIB // self._state.compute[gpu].partition_count

    def _vram_used_bytes(self, gpu: int, part: int) -> int:
        faults, _ = self._read_faults()
        idle = _PRIMARY_IDLE_USED_MIB if part == 0 else _SECONDARY_IDLE_USED_MIB
        held = sum(h.vram_bytes for h in self._live_holders(faults) if (h.gpu, h.partition) == (gpu, part))
        return idle * MIB + held

    def amdsmi_get_gpu_vram_usage(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            # amdsmi_vram_usage_t is in MB (MiB), §4.3.
            return {
                "vram_total": self._vram_total_mib(gpu, part),
                "vram_used": self._vram_used_bytes(gpu, part) // MIB,
            }

    @staticmethod
    def _check_mem_args(processor_handle: object, mem_type: object) -> None:
        # The wrapper checks argument types before it calls into the library (§4.1).
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        if not isinstance(mem_type, AmdSmiMemoryType):
            raise AmdSmiParameterException(mem_type, AmdSmiMemoryType)

    def amdsmi_get_gpu_memory_total(self, processor_handle: EmulatedProcessorHandle, mem_type: _MemoryType) -> int:
        self._check_mem_args(processor_handle, mem_type)
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            if mem_type is AmdSmiMemoryType.GTT:
                return _GTT_TOTAL_BYTES
            # MI300X exposes all VRAM through its large BAR, so VIS_VRAM equals VRAM.
            return self._vram_total_mib(gpu, part) * MIB

    def amdsmi_get_gpu_memory_usage(self, processor_handle: EmulatedProcessorHandle, mem_type: _MemoryType) -> int:
        self._check_mem_args(processor_handle, mem_type)
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            if mem_type is AmdSmiMemoryType.GTT:
                return 0
            return self._vram_used_bytes(gpu, part)

    def amdsmi_get_gpu_process_list(self, processor_handle: EmulatedProcessorHandle) -> list[dict[str, Any]]:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            faults, _ = self._read_faults()
            by_pid: dict[int, list[_Holder]] = {}
            for holder in self._live_holders(faults):
                by_pid.setdefault(holder.pid, []).append(holder)
            if len(by_pid) > _MAX_NUM_PROCESSES:
                raise AmdSmiLibraryException(AMDSMI_STATUS_OUT_OF_RESOURCES)
            result: list[dict[str, Any]] = []
            for pid in sorted(by_pid):
                held = by_pid[pid]
                # §6.1: opening /dev/kfd gives a process a pdd on every visible GPU, so it shows
                # up on every device, with 0 VRAM where it holds nothing.
                vram = sum(h.vram_bytes for h in held if (h.gpu, h.partition) == (gpu, part))
                result.append(
                    {
                        # §4.3: other users' process names read "N/A" for a non-root caller.
                        "name": held[0].name if self._is_root(faults) else "N/A",
                        "pid": pid,
                        "mem": vram,
                        "engine_usage": {"gfx": 0, "enc": 0},
                        "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
                        "cu_occupancy": 0,
                    }
                )
            return result

    # ---------------------------------------------------------------- partition queries

    def amdsmi_get_gpu_metrics_info(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        """A few of gpu_metrics' ~80 keys (mi300x.md §4.3): temperatures in °C, socket power in W, activity in %.
        MI300X has no edge sensor ("N/A"); secondaries report N/A for power and temperatures. The values are steady,
        derived from the GPU index, and rise with the processes holding the GPU."""
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            faults, _ = self._read_faults()
            busy = sum(1 for h in self._live_holders(faults) if h.gpu == gpu)
            primary = part == 0
            power = 140 + 90 * min(busy, 4)
            return {
                "temperature_edge": "N/A",
                "temperature_hotspot": 42 + gpu + 6 * busy if primary else "N/A",
                "temperature_mem": 36 + gpu + 3 * busy if primary else "N/A",
                "temperature_vrsoc": 35 + gpu if primary else "N/A",
                "current_socket_power": power if primary else "N/A",
                "average_socket_power": power if primary else "N/A",
                "average_gfx_activity": min(100, 25 * busy),
                "average_umc_activity": min(100, 10 * busy),
                "average_mm_activity": "N/A",
            }

    def amdsmi_get_gpu_compute_partition(self, processor_handle: EmulatedProcessorHandle) -> str:
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            self._require_primary(part)
            return str(self._state.compute[gpu])

    def amdsmi_get_gpu_memory_partition(self, processor_handle: EmulatedProcessorHandle) -> str:
        with self._lock:
            _, part = self._resolve(processor_handle)
            self._require_primary(part)
            # The staged mode is invisible until the reload (§3.2): report what is in effect.
            return str(self._state.memory)

    def _caps_list(self, allowed: Iterable[MemoryPartition]) -> list[str]:
        allowed_set = set(allowed)
        return [str(m) for m in _NPS_ORDER if m in self._caps and m in allowed_set]

    def amdsmi_get_gpu_memory_partition_config(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        with self._lock:
            _, part = self._resolve(processor_handle)
            self._require_primary(part)
            # §4.3: the 7.0.2 wrapper always reports the NUMA fields as "N/A".
            return {
                "partition_caps": self._caps_list(_NPS_ORDER),
                "mp_mode": str(self._state.memory),
                "num_numa_ranges": "N/A",
                "numa_range": "N/A",
            }

    def amdsmi_get_gpu_accelerator_partition_profile(self, processor_handle: EmulatedProcessorHandle) -> dict[str, Any]:
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        na_profile: dict[str, Any] = {
            "profile_type": "N/A",
            "num_partitions": "N/A",
            "profile_index": "N/A",
            "memory_caps": "N/A",
            "num_resources": "N/A",
            "resources": "N/A",
        }
        with self._lock:
            try:
                gpu, part = self._resolve(processor_handle)
            except AmdSmiLibraryException:
                # §4.3: the 7.0.2 wrapper returns inside `finally`, so a library error never
                # escapes; the caller gets a dict built from the zeroed struct instead.
                return {
                    "partition_id": [0],
                    "partition_profile": {
                        "profile_type": "N/A",
                        "num_partitions": 0,
                        "profile_index": 0,
                        "memory_caps": [],
                        "num_resources": 0,
                        "resources": "N/A",
                    },
                }
            if part != 0:
                # NOT_SUPPORTED on a secondary still fills in the partition id (§4.3).
                return {"partition_id": [part], "partition_profile": na_profile}
            mode = self._state.compute[gpu]
            return {
                "partition_id": [0],
                "partition_profile": {
                    "profile_type": str(mode),
                    "num_partitions": mode.partition_count,
                    "profile_index": _PROFILE_INDEX[mode],
                    "memory_caps": self._caps_list(VALID_COMBINATIONS[mode]),
                    "num_resources": len(_PROFILE_RESOURCES[mode]),
                    "resources": "N/A",
                },
            }

    def amdsmi_get_gpu_accelerator_partition_profile_config(
        self, processor_handle: EmulatedProcessorHandle
    ) -> dict[str, Any]:
        with self._lock:
            _, part = self._resolve(processor_handle)
            self._require_root(self._read_faults()[0])  # §3.3 1.: the profile config needs root
            self._require_primary(part)
            profiles: list[dict[str, Any]] = []
            resources: list[dict[str, Any]] = []
            for mode, index in _PROFILE_INDEX.items():
                resources = [
                    {
                        "profile_index": index,
                        "resource_type": rtype,
                        "partition_resource": amount,
                        "num_partitions_share_resource": shared,
                    }
                    for rtype, amount, shared in _PROFILE_RESOURCES[mode]
                ]
                profiles.append(
                    {
                        "profile_type": str(mode),
                        "num_partitions": mode.partition_count,
                        "profile_index": index,
                        "memory_caps": self._caps_list(VALID_COMBINATIONS[mode]),
                        "num_resources": len(resources),
                        "resources": resources,
                    }
                )
            return {
                "num_profiles": len(profiles),
                "num_resource_profiles": len(resources),
                # §4.3: the wrapper returns the last profile's resource list here.
                "resource_profiles": resources,
                "default_profile_index": _PROFILE_INDEX[ComputePartition.SPX],
                "profiles": profiles,
            }

    # ---------------------------------------------------------------- partition control

    def _switch_compute(self, gpu: int, requested: _ComputeType, faults: EmulatorFaults) -> None:
        if requested is AmdSmiComputePartitionType.INVALID:
            raise AmdSmiLibraryException(AMDSMI_STATUS_INVAL)
        if requested.name not in ComputePartition.__members__:
            # TPX needs 6 XCCs; it is never offered on an 8-XCC part (§1.2).
            raise AmdSmiLibraryException(AMDSMI_STATUS_SETTING_UNAVAILABLE)
        mode = ComputePartition(requested.name)
        if self._state.memory not in VALID_COMBINATIONS[mode]:
            # §1.4 kernel rule; §3.3 5.: e.g. SPX under NPS4 is refused.
            raise AmdSmiLibraryException(AMDSMI_STATUS_SETTING_UNAVAILABLE)
        if self._state.compute[gpu] == mode:
            return  # writing the current mode is a no-op for the driver
        holders = self._live_holders(faults)
        if gpu in faults.busy_gpus or any(self._strict_busy or h.gpu == gpu for h in holders):
            # §3.3 3.: the kernel cannot lock KFD while a process has the device open.
            raise AmdSmiLibraryException(AMDSMI_STATUS_BUSY)
        if gpu in faults.ignore_compute_set:
            return  # acknowledged and ignored: nothing re-enumerates, handles stay valid
        self._state.compute[gpu] = mode
        self._hardware_changed()

    def amdsmi_set_gpu_compute_partition(
        self, processor_handle: EmulatedProcessorHandle, compute_partition: _ComputeType
    ) -> None:
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        if not isinstance(compute_partition, AmdSmiComputePartitionType):
            raise AmdSmiParameterException(compute_partition, AmdSmiComputePartitionType)
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            faults, digest = self._read_faults()
            self._require_root(faults)
            self._require_primary(part)
            self._switch_compute(gpu, compute_partition, faults)
            self._kill_if_armed("set_compute", faults, digest)

    def amdsmi_set_gpu_accelerator_partition_profile(
        self, processor_handle: EmulatedProcessorHandle, profile_index: int
    ) -> None:
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        if not isinstance(profile_index, int):
            raise AmdSmiParameterException(profile_index, int)
        with self._lock:
            gpu, part = self._resolve(processor_handle)
            faults, digest = self._read_faults()
            self._require_root(faults)
            self._require_primary(part)
            by_index = {index: mode for mode, index in _PROFILE_INDEX.items()}
            if profile_index not in by_index:
                raise AmdSmiLibraryException(AMDSMI_STATUS_INVAL)
            self._switch_compute(gpu, AmdSmiComputePartitionType[by_index[profile_index].name], faults)
            self._kill_if_armed("set_compute", faults, digest)

    def amdsmi_set_gpu_memory_partition(
        self, processor_handle: EmulatedProcessorHandle, memory_partition: _MemoryPartitionType
    ) -> None:
        if not isinstance(processor_handle, EmulatedProcessorHandle):
            raise AmdSmiParameterException(processor_handle, EmulatedProcessorHandle)
        if not isinstance(memory_partition, AmdSmiMemoryPartitionType):
            raise AmdSmiParameterException(memory_partition, AmdSmiMemoryPartitionType)
        with self._lock:
            _, part = self._resolve(processor_handle)
            faults, digest = self._read_faults()
            self._require_root(faults)
            self._require_primary(part)
            name = memory_partition.name
            if name not in MemoryPartition.__members__ or MemoryPartition(name) not in self._caps:
                # §1.3/§3.5: the driver returns EINVAL for a mode outside supported_nps_modes.
                raise AmdSmiLibraryException(AMDSMI_STATUS_INVAL)
            mode = MemoryPartition(name)
            # §1.3/§3.2: 7.0+ only stages the request, for the whole hive; nothing changes (and no
            # handle goes stale) until amdsmi_gpu_driver_reload(). Re-requesting the current mode
            # cancels a pending change.
            self._state.staged_memory = None if mode == self._state.memory else mode
            self._save()
            self._kill_if_armed("set_memory", faults, digest)

    def amdsmi_set_gpu_memory_partition_mode(
        self, processor_handle: EmulatedProcessorHandle, memory_partition: _MemoryPartitionType
    ) -> None:
        # §3.2: in 7.0.2 the _mode form calls the same C setter.
        self.amdsmi_set_gpu_memory_partition(processor_handle, memory_partition)

    def amdsmi_gpu_driver_reload(self) -> None:
        with self._lock:
            self._require_init()
            faults, digest = self._read_faults()
            self._require_root(faults)
            if self._live_holders(faults):
                # §3.3 4.: `modprobe -r amdgpu` fails while any GPU user remains.
                raise AmdSmiLibraryException(AMDSMI_STATUS_AMDGPU_RESTART_ERR)
            # §3.4: 40-140 s on real hardware. The lock stays held: while the driver is out,
            # nothing can observe the host. A caller killed meanwhile never completes the
            # reload: the host stays as it was.
            seconds = self._reload_seconds if faults.reload_seconds is None else faults.reload_seconds
            if seconds > 0:
                self._clock(seconds)
            if self._fail_next_reload is not None:
                status, self._fail_next_reload = self._fail_next_reload, None
                raise AmdSmiLibraryException(status)
            injected = faults.fail_reload_status
            if injected is not None:
                use = self._fault_use(digest)
                if use.failed_reloads < faults.fail_reload_count:
                    use.failed_reloads += 1
                    self._save()
                    # As with modprobe -r refusing: staged memory stays staged, no GPU changed.
                    raise AmdSmiLibraryException(injected)
            if self._state.staged_memory is not None:
                self._state.memory = self._state.staged_memory
                self._state.staged_memory = None
            # §1.3: the NPS mode applies to every GPU of the hive; §3.4/§1.4: each GPU's compute
            # mode comes back as the AUTO mode for that NPS (NPS1→SPX, NPS4→CPX).
            auto = auto_compute_partition(self._state.memory)
            self._state.compute = [auto] * self._gpu_count
            self._hardware_changed()
            self._kill_if_armed("reload", faults, digest)
