"""Serving overheads of gpushared, each against a baseline measured in the same run.

1. serve -> READY through the daemon, versus spawning the same stub directly and polling /health
   (target: at most +100 ms and +5%).
2. Time from SIGKILL of a model's main process to the daemon's transition out of READY
   (target: at most 100 ms; the baseline is the stub's own load time, for scale).
3. Daemon kill -9 and restart with 16 READY models: until the API answers, and until all 16 are
   re-adopted and READY again (target: at most 2 s).
4. Idle CPU and RSS of the daemon with 16 READY children (target: at most 1% of a core), beside a
   bare grpc.aio health server's idle figures.

Run as root (cgroups): /opt/gpushare-dev/venv/bin/python bench/serving.py [--runs 10] [--idle 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "client"), str(REPO / "bench")]

import grpc  # noqa: E402
from allocate_latency import BARE_SERVER, footprint, wait_socket  # noqa: E402

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend  # noqa: E402
from gpushared.adapters.cgroupfs import find_cgroup2_mount  # noqa: E402
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi  # noqa: E402
from gpushared.api.v1 import gpushare_pb2 as pb  # noqa: E402
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc  # noqa: E402
from gpushared.domain.gpu import ComputePartition  # noqa: E402

STUB = REPO / "daemon" / "gpushared" / "stub_engine.py"
LOAD_SECONDS = "0.5"
GIB = 1 << 30


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


LAUNCHER = ["/usr/bin/env", f"GPUSHARE_STUB_LOAD_SECONDS={LOAD_SECONDS}", sys.executable, "-I", str(STUB)]


def direct_start(port: int) -> float:
    """Seconds from spawning the stub ourselves to /health 200 (the baseline)."""
    start = time.perf_counter()
    # The same command the daemon's configured launcher runs, /usr/bin/env included.
    process = subprocess.Popen(
        [*LAUNCHER, "serve", "org/direct", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while not healthy(port):
        time.sleep(0.002)
    # The daemon's readiness also needs /v1/models to list the model: the baseline does the same work.
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as response:
        response.read()
    elapsed = time.perf_counter() - start
    process.send_signal(signal.SIGTERM)
    process.wait(10)
    return elapsed


def serve(stub: pb_grpc.GpushareStub, name: str) -> pb.Model:
    spec = pb.ModelSpec(name=name, engine=pb.ENGINE_STUB, model=f"org/{name}", memory_bytes=2 * GIB)
    return stub.Serve(pb.ServeRequest(spec=spec)).model


def wait_ready(stub: pb_grpc.GpushareStub, names: list[str], timeout: float = 60, poll: float = 0.002) -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        if all(n in models and models[n].state == pb.MODEL_STATE_READY for n in names):
            return time.perf_counter() - start
        time.sleep(poll)
    raise SystemExit(f"models {names} not READY within {timeout}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="serve/direct pairs and kill probes (default 10)")
    parser.add_argument("--models", type=int, default=16, help="models for the restart and idle figures (default 16)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window in seconds (default 30)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    mount = find_cgroup2_mount()
    if os.geteuid() != 0 or mount is None:
        raise SystemExit("run as root on a host with a cgroup v2 mount")

    root = Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    root.chmod(0o755)
    state = root / "state"
    state.mkdir(mode=0o711)
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(state / "emulated-host.json", gpu_count=8), name="emulated")
    for gpu in range(8):
        backend.set_compute_partition(gpu, ComputePartition.CPX)
    backend.close()
    cgroup = mount / f"gpushare-bench-{secrets.token_hex(4)}"
    config = root / "gpushared.toml"
    config.write_text(
        f"""
[daemon]
socket_group = ""
[models]
cgroup_root = "{cgroup}"
port_range = "19100-19199"
stub_launcher = ["/usr/bin/env", "GPUSHARE_STUB_LOAD_SECONDS={LOAD_SECONDS}", "{sys.executable}", "-I", "{STUB}"]
stop_models_on_exit = true
"""
    )
    sock = root / "gpushared.sock"
    argv = [
        sys.executable,
        "-m",
        "gpushared",
        "--emulate",
        "--socket",
        str(sock),
        "--state-dir",
        str(state),
        "--config",
        str(config),
        "--log-level",
        "warning",
    ]
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO / 'client'}"}
    log = (root / "daemon.log").open("ab")
    daemon = subprocess.Popen(argv, env=env, stderr=log)
    bare = subprocess.Popen(
        [sys.executable, "-c", BARE_SERVER, str(root / "bare.sock")], stdout=subprocess.DEVNULL, env=env
    )
    results: dict[str, object] = {}
    try:
        wait_socket(sock, daemon)
        wait_socket(root / "bare.sock", bare)
        channel = grpc.insecure_channel(f"unix:{sock}")
        stub = pb_grpc.GpushareStub(channel)

        through, direct = [], []
        for run in range(args.runs):
            # Timed by the daemon's own READY transition, not by our polling: polling the API every 2 ms loads a
            # 2-core machine (about 40% of a core) and slows the very child being measured.
            start = time.time()
            serve(stub, f"s{run}")
            wait_ready(stub, [f"s{run}"], poll=0.02)
            model = stub.GetModel(pb.GetModelRequest(name=f"s{run}")).model
            ready_at = next(t.at for t in model.transitions if t.target == pb.MODEL_STATE_READY)
            through.append(ready_at.ToNanoseconds() / 1e9 - start)
            stub.Stop(pb.StopRequest(name=f"s{run}"))
            direct.append(direct_start(free_port()))
        results["serve_ready_ms"] = statistics.median(through) * 1e3
        results["direct_ready_ms"] = statistics.median(direct) * 1e3
        results["serve_overhead_ms"] = results["serve_ready_ms"] - results["direct_ready_ms"]  # type: ignore[operator]
        results["serve_ratio"] = statistics.median(t / d for t, d in zip(through, direct, strict=True))

        detections = []
        for run in range(args.runs):
            # A fresh model each time: repeated kills of one model would (rightly) trip the crash-loop breaker.
            name = f"victim{run}"
            serve(stub, name)
            wait_ready(stub, [name])
            model = stub.GetModel(pb.GetModelRequest(name=name)).model
            killed_at = time.time()
            os.kill(model.pid, signal.SIGKILL)
            deadline = time.time() + 10
            while time.time() < deadline:
                model = stub.GetModel(pb.GetModelRequest(name=name)).model
                left = [t for t in model.transitions if t.source == pb.MODEL_STATE_READY]
                if left:
                    detections.append(left[0].at.ToNanoseconds() / 1e9 - killed_at)
                    break
                time.sleep(0.005)
            stub.Stop(pb.StopRequest(name=name))
        results["kill_detect_ms_median"] = statistics.median(detections) * 1e3
        results["kill_detect_ms_max"] = max(detections) * 1e3

        names = [f"m{n}" for n in range(args.models)]
        for name in names:
            serve(stub, name)
        wait_ready(stub, names, timeout=120)
        rss, cpu = footprint(daemon.pid, args.idle)
        bare_rss, bare_cpu = footprint(bare.pid, args.idle)
        results.update(
            idle_rss_mib=rss / 2**20, idle_cpu_percent=cpu, bare_rss_mib=bare_rss / 2**20, bare_cpu_percent=bare_cpu
        )

        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        start = time.perf_counter()
        daemon = subprocess.Popen(argv, env=env, stderr=log)
        wait_socket(sock, daemon)
        results["restart_api_ms"] = (time.perf_counter() - start) * 1e3
        channel.close()
        channel = grpc.insecure_channel(f"unix:{sock}")
        stub = pb_grpc.GpushareStub(channel)
        wait_ready(stub, names, timeout=60)
        results["restart_all_ready_ms"] = (time.perf_counter() - start) * 1e3
        restarts = sum(m.restarts for m in stub.ListModels(pb.ListModelsRequest()).models)
        results["restarts_after_readoption"] = restarts
        channel.close()
    finally:
        daemon.send_signal(signal.SIGTERM)  # stop_models_on_exit: the models go with it
        daemon.wait(60)
        bare.send_signal(signal.SIGTERM)
        bare.wait(10)
        log.close()
        for leaf in sorted((p for p in cgroup.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
            (leaf / "cgroup.kill").write_text("1")
            time.sleep(0.2)
            leaf.rmdir()
        if cgroup.exists():
            cgroup.rmdir()
        shutil.rmtree(root, ignore_errors=True)

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        r = results
        print(
            f"serve -> READY: {r['serve_ready_ms']:.0f} ms via daemon vs {r['direct_ready_ms']:.0f} ms direct: "
            f"+{r['serve_overhead_ms']:.0f} ms, {r['serve_ratio']:.3f}x (target <= +100 ms and <= 1.05x)"
        )
        print(
            f"killed child noticed: median {r['kill_detect_ms_median']:.1f} ms, max {r['kill_detect_ms_max']:.1f} ms (target <= 100 ms)"
        )
        print(
            f"kill -9 + restart with {args.models} models: API answering after {r['restart_api_ms']:.0f} ms, all READY "
            f"after {r['restart_all_ready_ms']:.0f} ms (target <= 2000 ms), restarts {r['restarts_after_readoption']}"
        )
        print(
            f"idle with {args.models} READY models over {args.idle:g}s: daemon {r['idle_cpu_percent']:.2f}% of a core, "
            f"RSS {r['idle_rss_mib']:.1f} MiB (target <= 1%); bare grpc server {r['bare_cpu_percent']:.2f}%, "
            f"RSS {r['bare_rss_mib']:.1f} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
