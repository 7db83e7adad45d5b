"""The fake's host: static data describing MI300X-like GPUs, their partition modes and processes.

Not part of the real package. Configure it with $GPUSHARE_FAKE_AMDSMI (a JSON file read at the
first amdsmi_init) or in-process with ``amdsmi.fake_host.configure(...)`` / ``reset(...)``.
"""

import zlib

from . import amdsmi_wrapper as _w
from .amdsmi_exception import (
    AmdSmiLibraryException,
    AmdSmiParameterException,
    AmdSmiRetryException,
    AmdSmiTimeoutException,
)

MIB = 1 << 20
VRAM_MIB = 196592
"""What MI300X reports as vram_total (MB), on the primary in every mode."""
CUS_PER_GPU = 304
PARTITIONS = {"SPX": 1, "DPX": 2, "QPX": 4, "CPX": 8}
# The kernel's rule for an 8-XCC part on bare metal (aqua_vanjaram.c).
VALID = {
    "SPX": {"NPS1"},
    "DPX": {"NPS1", "NPS2"},
    "QPX": {"NPS1", "NPS4"},
    "CPX": {"NPS1", "NPS4"},
}
AUTO = {"NPS1": "SPX", "NPS2": "DPX", "NPS4": "CPX"}
DEFAULT_BUSES = ("0c", "22", "38", "5c", "9f", "af", "bf", "df")

DEFAULTS = {
    "gpu_count": 8,
    "bdfs": None,
    "compute": None,
    "memory": "NPS1",
    "memory_caps": ["NPS1", "NPS4"],
    "rocm_version": "7.0.2",
    "library_present": True,
    "root": True,
    "processes": [],
    "fail": {},
    "na_fields": [],
    "market_name": "AMD Instinct MI300X",
    "product_name": "AMD Instinct MI300X OAM",
}
"""Configuration keys.

gpu_count: number of GPUs (ignored when bdfs is given). bdfs: primary BDFs in enumeration order
(real amd-smi lists them sorted; give them unsorted to check a consumer does not rely on it).
compute: one mode for all GPUs or a list per GPU (default: what the driver picks for the memory
mode). memory: the hive-wide NPS mode. memory_caps: partition_caps of the memory config.
rocm_version: "7.0.2"; below 7.0 partitions share one UUID and memory sets reload at once; below
6.4.1 secondaries report the primary's DRM nodes. library_present: false makes `import amdsmi`
fail like the real package without libamd_smi.so. root: false makes setters fail with NO_PERM.
processes: [{gpu, partition, pid, name, vram_bytes, visible_on_all}] (visible_on_all: the process
also shows with 0 VRAM on every other partition, as KFD does for every device a process can see).
fail: {"amdsmi_function": status} makes that call raise. na_fields: dict keys reported as "N/A".
market_name / product_name: asic_info / board_info names.
"""

_HANDLE_BASE = 0x5F0000000000
_SOCKET_BIT = 1 << 19


def _version(text):
    return tuple(int(part) for part in str(text).split(".")[:3])


def raise_status(code):
    """Raise what the real bindings raise for a non-success status."""
    if code == _w.AMDSMI_STATUS_RETRY:
        raise AmdSmiRetryException()
    if code == _w.AMDSMI_STATUS_TIMEOUT:
        raise AmdSmiTimeoutException()
    raise AmdSmiLibraryException(code)


class FakeHost:
    """Static-data host behind the fake amdsmi functions."""

    def __init__(self):
        self.init_count = 0
        self.generation = 0
        self._configured = False
        self._snapshot = []
        self._snapshot_generation = -1
        self.reset()
        self._configured = False

    # -- configuration -----------------------------------------------------------------------

    def reset(self, **config):
        """Configure from scratch, as if no process had the library initialised."""
        self.init_count = 0
        self.configure(**config)

    def configure(self, **config):
        """Replace the host's configuration; handles from before go stale."""
        unknown = set(config) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"fake amdsmi: unknown configuration keys {sorted(unknown)}")
        cfg = {**DEFAULTS, **config}
        bdfs = cfg["bdfs"]
        if bdfs is None:
            count = int(cfg["gpu_count"])
            buses = [DEFAULT_BUSES[g] if g < len(DEFAULT_BUSES) else f"{0xE0 + g:02x}" for g in range(count)]
            bdfs = [f"0000:{bus}:00.0" for bus in buses]
        self.bdfs = [str(b).lower() for b in bdfs]
        self.memory = str(cfg["memory"])
        if self.memory not in AUTO:
            raise ValueError(f"fake amdsmi: memory partition {self.memory!r} is not NPS1, NPS2 or NPS4")
        compute = cfg["compute"] if cfg["compute"] is not None else AUTO[self.memory]
        self.compute = [str(compute)] * len(self.bdfs) if isinstance(compute, str) else [str(c) for c in compute]
        if len(self.compute) != len(self.bdfs):
            raise ValueError("fake amdsmi: compute must be one mode or one per GPU")
        for mode in self.compute:
            if self.memory not in VALID.get(mode, set()):
                raise ValueError(f"fake amdsmi: {mode}+{self.memory} is not a valid MI300X combination")
        self.memory_caps = [str(c) for c in cfg["memory_caps"]]
        self.version = _version(cfg["rocm_version"])
        self.root = bool(cfg["root"])
        self.fail = {str(k): int(v) for k, v in dict(cfg["fail"]).items()}
        self.na_fields = {str(k) for k in cfg["na_fields"]}
        self.market_name = str(cfg["market_name"])
        self.product_name = str(cfg["product_name"])
        self.pending_memory = None
        self.set_processes(cfg["processes"])
        self.generation += 1
        self._configured = True

    def set_processes(self, processes):
        """Replace the processes holding devices: [{gpu, partition, pid, name, vram_bytes, visible_on_all}]."""
        parsed = []
        for proc in processes:
            gpu, partition = int(proc["gpu"]), int(proc.get("partition", 0))
            if not (0 <= gpu < len(self.bdfs) and 0 <= partition < PARTITIONS[self.compute[gpu]]):
                raise ValueError(f"fake amdsmi: no partition {partition} on gpu {gpu} for process {proc}")
            parsed.append(
                {
                    "gpu": gpu,
                    "partition": partition,
                    "pid": int(proc["pid"]),
                    "name": str(proc.get("name", "python3")),
                    "vram_bytes": int(proc.get("vram_bytes", 0)),
                    "visible_on_all": bool(proc.get("visible_on_all", False)),
                }
            )
        self.processes = parsed

    def ensure_configured(self):
        if not self._configured:
            self.configure(**_w.fake_env_config())

    # -- library lifecycle and handles -------------------------------------------------------

    def topology(self):
        return [(g, p) for g in range(len(self.bdfs)) for p in range(PARTITIONS[self.compute[g]])]

    def init(self):
        self.ensure_configured()
        self.maybe_fail("amdsmi_init")
        self.init_count += 1
        if self.init_count == 1:
            # The real library builds its device list here; it is not refreshed until the last
            # shut_down and the next init.
            self._snapshot = self.topology()
            self._snapshot_generation = self.generation

    def shut_down(self):
        self.maybe_fail("amdsmi_shut_down")
        self.init_count = max(0, self.init_count - 1)

    def enter(self, function):
        """Checks every API call makes before doing its work."""
        if self.init_count == 0:
            raise_status(_w.AMDSMI_STATUS_NOT_INIT)
        self.maybe_fail(function)

    def maybe_fail(self, function):
        code = self.fail.get(function)
        if code:
            raise_status(code)

    def processor_handles(self):
        return [self._handle(self._snapshot_generation, g, p) for g, p in self._snapshot]

    def socket_handles(self):
        gpus = sorted({g for g, _ in self._snapshot})
        return [self._handle(self._snapshot_generation, g, 0, socket=True) for g in gpus]

    def device(self, function, handle, *, socket=False):
        """The (gpu, partition) a handle names, with the real bindings' type check."""
        if not isinstance(handle, _w.amdsmi_processor_handle):
            raise AmdSmiParameterException(handle, _w.amdsmi_processor_handle)
        self.enter(function)
        value = handle.value
        if value is None:
            raise_status(_w.AMDSMI_STATUS_INVAL)
        offset = value - _HANDLE_BASE
        generation, is_socket = offset >> 20, bool(offset & _SOCKET_BIT)
        g, p = (offset >> 8) & 0x7FF, offset & 0xFF
        # A handle from before a partition change or reload names a device that no longer exists.
        if offset < 0 or generation != self.generation or is_socket != socket or (g, p) not in self.topology():
            raise_status(_w.AMDSMI_STATUS_NOT_FOUND)
        return g, p

    @staticmethod
    def _handle(generation, g, p, *, socket=False):
        return _w.amdsmi_processor_handle(
            _HANDLE_BASE + (generation << 20) + (_SOCKET_BIT if socket else 0) + (g << 8) + p
        )

    # -- what the devices report -------------------------------------------------------------

    def na(self, info):
        return {k: ("N/A" if k in self.na_fields else v) for k, v in info.items()}

    def partition_count(self, g):
        return PARTITIONS[self.compute[g]]

    def flat_index(self, g, p):
        return self.topology().index((g, p))

    def bdf(self, g, p):
        return self.bdfs[g][:-1] + f"{p:x}"

    def _serial(self, g):
        return zlib.crc32(self.bdfs[g].encode())

    def uuid(self, g, p):
        # One UUID per GPU, shared by its partitions, before ROCm 7.0.
        lead = 0xC0 + (p if self.version >= (7, 0, 0) else 0)
        return f"{lead:02x}ff74a1-0000-1000-80{g % 256:02x}-{self._serial(g):08x}{g % 65536:04x}"

    def hip_uuid(self, g, p):
        q = p if self.version >= (7, 0, 0) else 0
        return f"GPU-{self._serial(g):08x}{g % 256:02x}{q:02x}{g % 65536:04x}"

    def render_minor(self, g, p):
        # Each GPU owns 8 DRM minors whatever the mode; before 6.4.1 secondaries named the primary's.
        mirrored = self.version < (6, 4, 1)
        return 128 + 8 * g + (0 if mirrored else p)

    def kfd_id(self, g, p):
        return zlib.crc32(f"kfd:{self.bdf(g, p)}".encode()) & 0xFFFF

    def node_id(self, g, p):
        # KFD topology lists the CPU nodes first; a 2-socket host has nodes 0 and 1.
        return self.flat_index(g, p) + 2

    def vram_total_bytes(self, g, p):
        # amdsmi#132: the primary reports the whole GPU in every mode, secondaries their cap.
        return VRAM_MIB * MIB if p == 0 else VRAM_MIB // self.partition_count(g) * MIB

    def holders(self, g, p):
        """Process-list entries of one partition: (process, vram_bytes)."""
        out = []
        for proc in self.processes:
            if (proc["gpu"], proc["partition"]) == (g, p):
                out.append((proc, proc["vram_bytes"]))
            elif proc["visible_on_all"]:
                out.append((proc, 0))
        return out

    def vram_used_bytes(self, g, p):
        return sum(vram for _, vram in self.holders(g, p))

    def gpu_busy(self, g):
        return any(self.holders(g, p) for p in range(self.partition_count(g)))

    # -- setters -----------------------------------------------------------------------------

    def set_compute(self, g, p, mode):
        if not self.root:
            raise_status(_w.AMDSMI_STATUS_NO_PERM)
        if p != 0:
            raise_status(_w.AMDSMI_STATUS_NOT_SUPPORTED)
        if mode == "INVALID":
            raise_status(_w.AMDSMI_STATUS_INVAL)
        if self.memory not in VALID.get(mode, set()):
            raise_status(_w.AMDSMI_STATUS_SETTING_UNAVAILABLE)
        if mode == self.compute[g]:
            return  # the kernel returns early without a switch, so no busy check
        if self.gpu_busy(g):
            raise_status(_w.AMDSMI_STATUS_BUSY)
        self.compute[g] = mode
        self.generation += 1

    def set_memory(self, g, p, mode):
        del g
        if not self.root:
            raise_status(_w.AMDSMI_STATUS_NO_PERM)
        if p != 0:
            raise_status(_w.AMDSMI_STATUS_NOT_SUPPORTED)
        if mode not in self.memory_caps or mode not in AUTO:
            raise_status(_w.AMDSMI_STATUS_INVAL)
        self.pending_memory = mode
        if self.version < (7, 0, 0):
            self.reload()  # before 7.0 the set call reloaded the driver itself

    def reload(self):
        if not self.root:
            raise_status(_w.AMDSMI_STATUS_NO_PERM)
        if self.processes:
            raise_status(_w.AMDSMI_STATUS_AMDGPU_RESTART_ERR)
        if self.pending_memory is not None:
            self.memory = self.pending_memory
            self.pending_memory = None
        # The NPS mode is hive-wide; at load the driver picks the compute mode from it (AUTO).
        self.compute = [AUTO[self.memory]] * len(self.bdfs)
        self.generation += 1


fake_host = FakeHost()
