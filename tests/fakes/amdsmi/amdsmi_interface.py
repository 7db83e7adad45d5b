"""Fake of amdsmi.amdsmi_interface: the GPU discovery, memory, process and partition calls gpushare uses.

Names, argument checks, return shapes and raised exceptions follow amdsmi 7.0.2; the answers come
from the static host in ``_fake_host``.
"""

import re
from enum import IntEnum

from . import amdsmi_wrapper as _w
from ._fake_host import CUS_PER_GPU, MIB, fake_host, raise_status
from .amdsmi_exception import AmdSmiBdfFormatException, AmdSmiLibraryException, AmdSmiParameterException


class AmdSmiInitFlags(IntEnum):
    INIT_ALL_PROCESSORS = _w.AMDSMI_INIT_ALL_PROCESSORS
    INIT_AMD_CPUS = _w.AMDSMI_INIT_AMD_CPUS
    INIT_AMD_GPUS = _w.AMDSMI_INIT_AMD_GPUS
    INIT_AMD_APUS = _w.AMDSMI_INIT_AMD_APUS
    INIT_NON_AMD_CPUS = _w.AMDSMI_INIT_NON_AMD_CPUS
    INIT_NON_AMD_GPUS = _w.AMDSMI_INIT_NON_AMD_GPUS


class AmdSmiComputePartitionType(IntEnum):
    SPX = _w.AMDSMI_COMPUTE_PARTITION_SPX
    DPX = _w.AMDSMI_COMPUTE_PARTITION_DPX
    TPX = _w.AMDSMI_COMPUTE_PARTITION_TPX
    QPX = _w.AMDSMI_COMPUTE_PARTITION_QPX
    CPX = _w.AMDSMI_COMPUTE_PARTITION_CPX
    INVALID = _w.AMDSMI_COMPUTE_PARTITION_INVALID


class AmdSmiAcceleratorPartitionType(IntEnum):
    SPX = _w.AMDSMI_ACCELERATOR_PARTITION_SPX
    DPX = _w.AMDSMI_ACCELERATOR_PARTITION_DPX
    TPX = _w.AMDSMI_ACCELERATOR_PARTITION_TPX
    QPX = _w.AMDSMI_ACCELERATOR_PARTITION_QPX
    CPX = _w.AMDSMI_ACCELERATOR_PARTITION_CPX
    INVALID = _w.AMDSMI_ACCELERATOR_PARTITION_INVALID


class AmdSmiMemoryPartitionType(IntEnum):
    NPS1 = _w.AMDSMI_MEMORY_PARTITION_NPS1
    NPS2 = _w.AMDSMI_MEMORY_PARTITION_NPS2
    NPS4 = _w.AMDSMI_MEMORY_PARTITION_NPS4
    NPS8 = _w.AMDSMI_MEMORY_PARTITION_NPS8
    UNKNOWN = _w.AMDSMI_MEMORY_PARTITION_UNKNOWN


class AmdSmiMemoryType(IntEnum):
    VRAM = _w.AMDSMI_MEM_TYPE_VRAM
    VIS_VRAM = _w.AMDSMI_MEM_TYPE_VIS_VRAM
    GTT = _w.AMDSMI_MEM_TYPE_GTT


class AmdSmiProcessorType(IntEnum):
    UNKNOWN = _w.AMDSMI_PROCESSOR_TYPE_UNKNOWN
    AMDSMI_PROCESSOR_TYPE_AMD_GPU = _w.AMDSMI_PROCESSOR_TYPE_AMD_GPU
    AMDSMI_PROCESSOR_TYPE_AMD_CPU = _w.AMDSMI_PROCESSOR_TYPE_AMD_CPU
    AMDSMI_PROCESSOR_TYPE_NON_AMD_GPU = _w.AMDSMI_PROCESSOR_TYPE_NON_AMD_GPU
    AMDSMI_PROCESSOR_TYPE_NON_AMD_CPU = _w.AMDSMI_PROCESSOR_TYPE_NON_AMD_CPU


_GTT_TOTAL_BYTES = 128 * 1024 * MIB
_BDF_RE = re.compile(r"^(?:([0-9a-fA-F]{4}):)?([0-9a-fA-F]{2}):([0-1][0-9a-fA-F])\.([0-7])$")


def _check_enum(value, enum_type):
    if not isinstance(value, enum_type):
        raise AmdSmiParameterException(value, enum_type)


# -- initialisation and discovery ---------------------------------------------------------------


def amdsmi_init(flag=AmdSmiInitFlags.INIT_AMD_GPUS):
    _check_enum(flag, AmdSmiInitFlags)
    fake_host.init()


def amdsmi_shut_down():
    fake_host.shut_down()


def amdsmi_get_socket_handles():
    fake_host.enter("amdsmi_get_socket_handles")
    return fake_host.socket_handles()


def amdsmi_get_socket_info(socket_handle):
    g, _ = fake_host.device("amdsmi_get_socket_info", socket_handle, socket=True)
    return fake_host.bdf(g, 0)[:-2]


def amdsmi_get_processor_handles():
    fake_host.enter("amdsmi_get_processor_handles")
    return fake_host.processor_handles()


def amdsmi_get_processor_type(processor_handle):
    fake_host.device("amdsmi_get_processor_type", processor_handle)
    return {"processor_type": AmdSmiProcessorType.AMDSMI_PROCESSOR_TYPE_AMD_GPU.name}


def amdsmi_get_processor_handle_from_bdf(bdf):
    match = _BDF_RE.match(bdf) if isinstance(bdf, str) else None
    if match is None:
        raise AmdSmiBdfFormatException(bdf)
    fake_host.enter("amdsmi_get_processor_handle_from_bdf")
    wanted = (match.group(1) or "0000") + ":" + ":".join(match.groups()[1:3]) + "." + match.group(4)
    for handle in fake_host.processor_handles():
        try:
            g, p = fake_host.device("amdsmi_get_processor_handle_from_bdf", handle)
        except AmdSmiLibraryException:
            continue  # a stale handle matches nothing
        if fake_host.bdf(g, p) == wanted.lower():
            return handle
    raise_status(_w.AMDSMI_STATUS_NOT_FOUND)
    return None


# -- identity -----------------------------------------------------------------------------------


def amdsmi_get_gpu_device_bdf(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_device_bdf", processor_handle)
    return fake_host.bdf(g, p)


def amdsmi_get_gpu_bdf_id(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_bdf_id", processor_handle)
    domain, bus, rest = fake_host.bdf(g, p).split(":")
    dev = rest.split(".")[0]
    # Partition id in bits [31:28] as well as in the function bits [2:0].
    return (int(domain, 16) << 32) | (p << 28) | (int(bus, 16) << 8) | (int(dev, 16) << 3) | p


def amdsmi_get_gpu_device_uuid(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_device_uuid", processor_handle)
    return fake_host.uuid(g, p)


def amdsmi_get_gpu_enumeration_info(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_enumeration_info", processor_handle)
    render = fake_host.render_minor(g, p)
    return fake_host.na(
        {
            "drm_render": render,
            "drm_card": render - 128,
            "hsa_id": fake_host.node_id(g, p),
            "hip_id": fake_host.flat_index(g, p),
            "hip_uuid": fake_host.hip_uuid(g, p),
        }
    )


def amdsmi_get_gpu_kfd_info(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_kfd_info", processor_handle)
    return fake_host.na(
        {"kfd_id": fake_host.kfd_id(g, p), "node_id": fake_host.node_id(g, p), "current_partition_id": p}
    )


def amdsmi_get_gpu_asic_info(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_asic_info", processor_handle)
    primary = p == 0
    return fake_host.na(
        {
            "market_name": fake_host.market_name or "N/A",
            "vendor_id": "0x1002",
            "vendor_name": "Advanced Micro Devices Inc. [AMD/ATI]",
            "subvendor_id": "0x1002",
            "device_id": "0x74a1",
            "rev_id": "0x00",
            "asic_serial": f"0x{fake_host.kfd_id(g, 0):016X}" if primary else "N/A",
            "oam_id": g if primary else "N/A",
            "num_compute_units": CUS_PER_GPU // fake_host.partition_count(g),
            "target_graphics_version": "gfx942",
            "subsystem_id": "0x74a1",
        }
    )


def amdsmi_get_gpu_board_info(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_board_info", processor_handle)
    if p != 0:
        return dict.fromkeys(("model_number", "product_serial", "fru_id", "product_name", "manufacturer_name"), "N/A")
    return fake_host.na(
        {
            "model_number": "N/A",
            "product_serial": f"{fake_host.kfd_id(g, 0):016X}",
            "fru_id": "N/A",
            "product_name": fake_host.product_name or "N/A",
            "manufacturer_name": "AMD",
        }
    )


def amdsmi_get_gpu_xcd_counter(processor_handle):
    g, _ = fake_host.device("amdsmi_get_gpu_xcd_counter", processor_handle)
    return 8 // fake_host.partition_count(g)


def amdsmi_get_rocm_version():
    return True, ".".join(str(part) for part in fake_host.version)


# -- memory and processes -----------------------------------------------------------------------


def amdsmi_get_gpu_memory_total(processor_handle, mem_type):
    _check_enum(mem_type, AmdSmiMemoryType)
    g, p = fake_host.device("amdsmi_get_gpu_memory_total", processor_handle)
    if mem_type == AmdSmiMemoryType.GTT:
        return _GTT_TOTAL_BYTES
    return fake_host.vram_total_bytes(g, p)


def amdsmi_get_gpu_memory_usage(processor_handle, mem_type):
    _check_enum(mem_type, AmdSmiMemoryType)
    g, p = fake_host.device("amdsmi_get_gpu_memory_usage", processor_handle)
    if mem_type == AmdSmiMemoryType.GTT:
        return 0
    return fake_host.vram_used_bytes(g, p)


def amdsmi_get_gpu_vram_usage(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_vram_usage", processor_handle)
    return {"vram_total": fake_host.vram_total_bytes(g, p) // MIB, "vram_used": fake_host.vram_used_bytes(g, p) // MIB}


def amdsmi_get_gpu_process_list(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_process_list", processor_handle)
    result = []
    for proc, vram in fake_host.holders(g, p):
        result.append(
            {
                "name": proc["name"] or "N/A",
                "pid": proc["pid"],
                "mem": vram,
                "engine_usage": {"gfx": 0, "enc": 0},
                "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": vram},
                "cu_occupancy": 0,
            }
        )
    return result


# -- partitions ---------------------------------------------------------------------------------


def amdsmi_get_gpu_compute_partition(processor_handle):
    g, p = fake_host.device("amdsmi_get_gpu_compute_partition", processor_handle)
    if p != 0:
        raise_status(_w.AMDSMI_STATUS_NOT_SUPPORTED)
    return fake_host.compute[g]


def amdsmi_get_gpu_memory_partition(processor_handle):
    _, p = fake_host.device("amdsmi_get_gpu_memory_partition", processor_handle)
    if p != 0:
        raise_status(_w.AMDSMI_STATUS_NOT_SUPPORTED)
    return fake_host.memory


def amdsmi_get_gpu_memory_partition_config(processor_handle):
    _, p = fake_host.device("amdsmi_get_gpu_memory_partition_config", processor_handle)
    if p != 0:
        raise_status(_w.AMDSMI_STATUS_NOT_SUPPORTED)
    order = ("NPS1", "NPS2", "NPS4", "NPS8")
    caps = [c for c in order if c in fake_host.memory_caps]
    return {
        "partition_caps": caps or ["N/A"],
        "mp_mode": fake_host.memory,
        # The 7.0.2 bindings never fill these two.
        "num_numa_ranges": "N/A",
        "numa_range": "N/A",
    }


def amdsmi_set_gpu_compute_partition(processor_handle, compute_partition):
    if not isinstance(processor_handle, _w.amdsmi_processor_handle):
        raise AmdSmiParameterException(processor_handle, _w.amdsmi_processor_handle)
    _check_enum(compute_partition, AmdSmiComputePartitionType)
    g, p = fake_host.device("amdsmi_set_gpu_compute_partition", processor_handle)
    fake_host.set_compute(g, p, compute_partition.name)


def amdsmi_set_gpu_memory_partition(processor_handle, memory_partition):
    if not isinstance(processor_handle, _w.amdsmi_processor_handle):
        raise AmdSmiParameterException(processor_handle, _w.amdsmi_processor_handle)
    _check_enum(memory_partition, AmdSmiMemoryPartitionType)
    g, p = fake_host.device("amdsmi_set_gpu_memory_partition", processor_handle)
    fake_host.set_memory(g, p, memory_partition.name)


def amdsmi_set_gpu_memory_partition_mode(processor_handle, memory_partition):
    # In 7.0.2 the _mode form calls the same C function.
    amdsmi_set_gpu_memory_partition(processor_handle, memory_partition)


def amdsmi_gpu_driver_reload():
    fake_host.enter("amdsmi_gpu_driver_reload")
    fake_host.reload()
