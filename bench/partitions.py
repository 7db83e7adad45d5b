"""Partition operation overheads, each against a baseline measured in the same run.

1. Plan time for 8 GPUs: the pure planner (domain/partitioning.py) on an 8-GPU inventory, and the whole
   PlanPartitions RPC through the daemon (observe + process lists + plan), beside a GetStatus RPC
   (target: under 10 ms for the plan).
2. Apply overhead: SPX/NPS1 -> CPX/NPS4 on 8 GPUs through the daemon (ApplyPartitions, then polling
   GetOperation until it finishes) versus the same hardware sequence run directly on the emulator
   (set memory on 8 primaries, driver reload, set compute on 8 GPUs, re-enumerate), both with the same
   emulated reload time (target: the daemon adds under 1 s).

Run as root: /opt/gpushare-dev/venv/bin/python bench/partitions.py [--runs 5] [--reload-seconds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "client"), str(REPO / "bench")]

import grpc  # noqa: E402
from allocate_latency import wait_socket  # noqa: E402

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend  # noqa: E402
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi, EmulatorFaults, write_faults  # noqa: E402
from gpushared.api.v1 import gpushare_pb2 as pb  # noqa: E402
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc  # noqa: E402
from gpushared.domain.gpu import ComputePartition, MemoryPartition  # noqa: E402
from gpushared.domain.partitioning import LayoutRequest, plan_partitions  # noqa: E402

CPX_NPS4 = pb.LayoutRequest(compute_partition=pb.COMPUTE_PARTITION_CPX, memory_partition=pb.MEMORY_PARTITION_NPS4)
SPX_NPS1 = pb.LayoutRequest(compute_partition=pb.COMPUTE_PARTITION_SPX, memory_partition=pb.MEMORY_PARTITION_NPS1)


def ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 3)


def direct_switch(state: Path, reload_seconds: float, memory: MemoryPartition, compute: ComputePartition) -> float:
    """The hardware sequence alone, on a fresh emulator over the same state file."""
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(state / "emulated-host.json", reload_seconds=reload_seconds))
    try:
        started = time.perf_counter()
        inventory = backend.observe()
        for gpu in inventory.gpus:
            backend.set_memory_partition(gpu.index, memory)
        backend.reload_driver()
        for gpu in backend.observe().gpus:
            if gpu.compute_partition != compute:
                backend.set_compute_partition(gpu.index, compute)
        backend.observe()
        return time.perf_counter() - started
    finally:
        backend.close()


def daemon_switch(stub: pb_grpc.GpushareStub, layout: pb.LayoutRequest) -> float:
    started = time.perf_counter()
    operation = stub.ApplyPartitions(pb.ApplyPartitionsRequest(layout=layout, drain=True), timeout=30).operation
    while operation.state in (pb.OPERATION_STATE_RUNNING, pb.OPERATION_STATE_ROLLING_BACK):
        time.sleep(0.005)
        operation = stub.GetOperation(pb.GetOperationRequest(id=operation.id), timeout=30).operation
    elapsed = time.perf_counter() - started
    if operation.state != pb.OPERATION_STATE_SUCCEEDED:
        raise SystemExit(f"operation {operation.id} ended {operation.state}: {operation.error}")
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="switches each way per side (default 5)")
    parser.add_argument("--reload-seconds", type=float, default=2.0, help="emulated driver reload time (default 2)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    # 1a. The pure planner.
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(None), name="emulated")
    inventory = backend.observe()
    backend.close()
    request = LayoutRequest(tuple(range(8)), ComputePartition.CPX, MemoryPartition.NPS4)
    pure = []
    for _ in range(200):
        started = time.perf_counter()
        plan_partitions(inventory, request, allocations=(), models_on={}, holders=())
        pure.append(time.perf_counter() - started)

    root = Path(tempfile.mkdtemp(prefix="gs-bench-part-", dir="/tmp"))
    state = root / "state"
    state.mkdir(mode=0o711)
    write_faults(state, EmulatorFaults(reload_seconds=args.reload_seconds))
    socket_path = root / "gpushared.sock"
    log = (root / "daemon.log").open("wb")
    daemon = subprocess.Popen(
        [sys.executable, "-m", "gpushared", "--emulate", "--socket", str(socket_path), "--state-dir", str(state)],
        stdout=log,
        stderr=log,
        cwd=REPO,
    )
    try:
        wait_socket(socket_path, daemon)
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            stub = pb_grpc.GpushareStub(channel)
            status, rpc_plan = [], []
            for _ in range(100):
                started = time.perf_counter()
                stub.GetStatus(pb.GetStatusRequest(), timeout=10)
                status.append(time.perf_counter() - started)
                started = time.perf_counter()
                stub.PlanPartitions(pb.PlanPartitionsRequest(layout=CPX_NPS4), timeout=10)
                rpc_plan.append(time.perf_counter() - started)

            # 2. Alternate daemon and direct switches so both see the same machine load.
            through_daemon, direct = [], []
            for _ in range(args.runs):
                through_daemon.append(daemon_switch(stub, CPX_NPS4))
                through_daemon.append(daemon_switch(stub, SPX_NPS1))
            daemon.terminate()
            daemon.wait(30)
            for _ in range(args.runs):
                direct.append(direct_switch(state, args.reload_seconds, MemoryPartition.NPS4, ComputePartition.CPX))
                direct.append(direct_switch(state, args.reload_seconds, MemoryPartition.NPS1, ComputePartition.SPX))
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        log.close()
        shutil.rmtree(root, ignore_errors=True)

    overhead = statistics.median(through_daemon) - statistics.median(direct)
    result = {
        "plan_pure_ms_p50": ms(pure),
        "plan_rpc_ms_p50": ms(rpc_plan),
        "get_status_rpc_ms_p50": ms(status),
        "plan_rpc_vs_get_status": round(statistics.median(rpc_plan) / statistics.median(status), 2),
        "apply_through_daemon_s_p50": round(statistics.median(through_daemon), 3),
        "same_hardware_sequence_direct_s_p50": round(statistics.median(direct), 3),
        "apply_overhead_s": round(overhead, 3),
        "apply_ratio": round(statistics.median(through_daemon) / statistics.median(direct), 3),
        "reload_seconds": args.reload_seconds,
        "targets": {"plan_ms": 10, "apply_overhead_s": 1.0},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:40} {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
