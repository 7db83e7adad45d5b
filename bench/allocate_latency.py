"""Allocate/Release latency and throughput of gpushared against a bare grpc.health.v1 server; idle footprint.

Targets (issue 2): Allocate and Release p50 <= 1.5x and p99 <= 2x a bare health Check on the same
kind of socket in the same run; throughput with 16 concurrent clients >= 50% of the bare server's.
Both servers run as separate processes on Unix sockets; this process is the client. Rounds are
interleaved (bare, daemon, bare, daemon, ...) and ratios are taken per round, then the median,
because the machines are noisy. Run as root (the daemon's socket group and state dir):

    /opt/gpushare-dev/venv/bin/python bench/allocate_latency.py [--calls 2000] [--rounds 5] [--idle 30] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "client")]

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend  # noqa: E402
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi  # noqa: E402
from gpushared.api.v1 import gpushare_pb2 as pb  # noqa: E402
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc  # noqa: E402
from gpushared.domain.gpu import ComputePartition  # noqa: E402

BARE_SERVER = textwrap.dedent(
    """
    import asyncio, sys
    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    async def main():
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        server.add_insecure_port("unix:" + sys.argv[1])
        await server.start()
        await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        print("ready", flush=True)
        await server.wait_for_termination()

    asyncio.run(main())
    """
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def health_call(
    channel: grpc.Channel,
) -> grpc.UnaryUnaryMultiCallable[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse]:
    return channel.unary_unary(
        "/grpc.health.v1.Health/Check",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )


def wait_socket(path: Path, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"server exited {process.returncode}")
        if path.exists():
            with grpc.insecure_channel(f"unix:{path}") as channel:
                try:
                    health_call(channel)(health_pb2.HealthCheckRequest(), timeout=2)
                    return
                except grpc.RpcError:
                    pass
        time.sleep(0.05)
    raise SystemExit(f"{path}: no server within 30 s")


def sequential_bare(socket: Path, calls: int) -> list[float]:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        check = health_call(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(200):
            check(request)
        latencies = []
        for _ in range(calls):
            start = time.perf_counter()
            check(request)
            latencies.append(time.perf_counter() - start)
    return latencies


def sequential_daemon(socket: Path, calls: int) -> tuple[list[float], list[float], list[float]]:
    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = pb_grpc.GpushareStub(channel)
        check = health_call(channel)
        request = pb.AllocateRequest(memory_bytes=1 << 30)
        for _ in range(100):
            stub.Release(pb.ReleaseRequest(id=stub.Allocate(request).allocation.id))
        allocate, release, relayed = [], [], []
        for _ in range(calls):
            start = time.perf_counter()
            allocation_id = stub.Allocate(request).allocation.id
            middle = time.perf_counter()
            stub.Release(pb.ReleaseRequest(id=allocation_id))
            end = time.perf_counter()
            check(health_pb2.HealthCheckRequest())
            relayed.append(time.perf_counter() - end)
            allocate.append(middle - start)
            release.append(end - middle)
    return allocate, release, relayed


async def concurrent(socket: Path, clients: int, seconds: float, daemon: bool) -> float:
    """RPCs per second with `clients` concurrent callers, each with its own connection."""
    stop = time.monotonic() + seconds
    counts = [0] * clients

    async def worker(index: int) -> None:
        async with grpc.aio.insecure_channel(f"unix:{socket}") as channel:
            if daemon:
                stub = pb_grpc.GpushareStub(channel)
                request = pb.AllocateRequest(memory_bytes=1 << 30)
                while time.monotonic() < stop:
                    allocation = (await stub.Allocate(request)).allocation
                    await stub.Release(pb.ReleaseRequest(id=allocation.id))
                    counts[index] += 2
            else:
                check = channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )
                while time.monotonic() < stop:
                    await check(health_pb2.HealthCheckRequest())
                    counts[index] += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    return sum(counts) / (time.monotonic() - started)


def footprint(pid: int, seconds: float) -> tuple[int, float]:
    """(VmRSS bytes, CPU % of one core over `seconds` of idleness)."""

    def ticks() -> int:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])

    before = ticks()
    time.sleep(seconds)
    used = (ticks() - before) / os.sysconf("SC_CLK_TCK")
    rss = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmRSS:")
    )
    return rss, 100.0 * used / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="sequential calls per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run (default 5)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle measurement window in seconds (default 30)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="gs-bench-", dir=os.environ.get("GPUSHARE_BENCH_DIR", "/tmp")))
    state = root / "state"
    state.mkdir()
    # 8 GPUs in CPX: 64 partitions, so 16 concurrent clients each hold one without running out.
    emulator = EmulatedAmdSmi(state / "emulated-host.json", gpu_count=8)
    backend = AmdSmiGpuBackend(emulator, name="emulated")
    for gpu in range(8):
        backend.set_compute_partition(gpu, ComputePartition.CPX)
    backend.close()
    daemon_socket, bare_socket = root / "gpushared.sock", root / "bare.sock"
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO / 'client'}"}
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpushared",
            "--emulate",
            "--socket",
            str(daemon_socket),
            "--state-dir",
            str(state),
            "--log-level",
            "warning",
        ],
        env=env,
        stderr=(root / "daemon.log").open("wb"),
    )
    bare = subprocess.Popen([sys.executable, "-c", BARE_SERVER, str(bare_socket)], stdout=subprocess.DEVNULL, env=env)
    try:
        wait_socket(daemon_socket, daemon)
        wait_socket(bare_socket, bare)
        rounds = []
        for _ in range(args.rounds):
            bare_lat = sequential_bare(bare_socket, args.calls)
            allocate, release, relayed = sequential_daemon(daemon_socket, args.calls)
            bare_tp = asyncio.run(concurrent(bare_socket, args.clients, args.seconds, daemon=False))
            daemon_tp = asyncio.run(concurrent(daemon_socket, args.clients, args.seconds, daemon=True))
            rounds.append(
                {
                    "bare_p50_ms": percentile(bare_lat, 0.5) * 1e3,
                    "bare_p99_ms": percentile(bare_lat, 0.99) * 1e3,
                    "allocate_p50_ms": percentile(allocate, 0.5) * 1e3,
                    "allocate_p99_ms": percentile(allocate, 0.99) * 1e3,
                    "release_p50_ms": percentile(release, 0.5) * 1e3,
                    "release_p99_ms": percentile(release, 0.99) * 1e3,
                    "relayed_check_p50_ms": percentile(relayed, 0.5) * 1e3,
                    "relayed_check_p99_ms": percentile(relayed, 0.99) * 1e3,
                    "bare_rps": bare_tp,
                    "daemon_rps": daemon_tp,
                }
            )
        idle_daemon = footprint(daemon.pid, args.idle)
        idle_bare = footprint(bare.pid, args.idle)
    finally:
        for process in (daemon, bare):
            process.send_signal(signal.SIGTERM)
            process.wait(20)
        shutil.rmtree(root, ignore_errors=True)

    def ratio(key: str, base: str) -> float:
        return statistics.median(r[key] / r[base] for r in rounds)

    summary = {
        "rounds": rounds,
        "allocate_p50_ratio": ratio("allocate_p50_ms", "bare_p50_ms"),
        "allocate_p99_ratio": ratio("allocate_p99_ms", "bare_p99_ms"),
        "release_p50_ratio": ratio("release_p50_ms", "bare_p50_ms"),
        "release_p99_ratio": ratio("release_p99_ms", "bare_p99_ms"),
        "relayed_check_p50_ratio": ratio("relayed_check_p50_ms", "bare_p50_ms"),
        "throughput_ratio": ratio("daemon_rps", "bare_rps"),
        "daemon_idle_rss_mib": idle_daemon[0] / 2**20,
        "daemon_idle_cpu_percent": idle_daemon[1],
        "bare_idle_rss_mib": idle_bare[0] / 2**20,
        "bare_idle_cpu_percent": idle_bare[1],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for index, r in enumerate(rounds):
        print(
            f"round {index}: bare p50 {r['bare_p50_ms']:.3f} p99 {r['bare_p99_ms']:.3f} ms | "
            f"allocate p50 {r['allocate_p50_ms']:.3f} p99 {r['allocate_p99_ms']:.3f} | "
            f"release p50 {r['release_p50_ms']:.3f} p99 {r['release_p99_ms']:.3f} | "
            f"relayed check p50 {r['relayed_check_p50_ms']:.3f} | "
            f"{args.clients} clients: bare {r['bare_rps']:.0f}/s daemon {r['daemon_rps']:.0f}/s"
        )
    print(
        f"median ratios vs bare Check: allocate p50 {summary['allocate_p50_ratio']:.2f}x (target <= 1.5) "
        f"p99 {summary['allocate_p99_ratio']:.2f}x (<= 2); release p50 {summary['release_p50_ratio']:.2f}x "
        f"p99 {summary['release_p99_ratio']:.2f}x; relayed Check p50 {summary['relayed_check_p50_ratio']:.2f}x; "
        f"throughput {summary['throughput_ratio']:.0%} of bare (>= 50%)"
    )
    print(
        f"idle over {args.idle:g}s: daemon RSS {summary['daemon_idle_rss_mib']:.1f} MiB, CPU {summary['daemon_idle_cpu_percent']:.2f}% "
        f"of a core; bare server RSS {summary['bare_idle_rss_mib']:.1f} MiB, CPU {summary['bare_idle_cpu_percent']:.2f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
