"""Cost of gpushared's metrics with 16 READY stub models, against the same daemon with metrics off, in one run.

Phases, each measured over the same window on the same 16 models (they survive the daemon's restarts and are
re-adopted, so only the daemon changes):
  A1. metrics off (--metrics-listen off): the baseline, models probed as usual;
  B.  metrics on, with the default refresh (each model's /metrics read every 5 s) and this script scraping the daemon
      every 5 s as Prometheus would (OpenMetrics, gzip);
  A2. metrics off again, so drift over the run shows up instead of being counted as cost.
Figures: scrape latency (p50, p99, max over the window, and over a burst of back-to-back scrapes); the daemon's
added CPU = B minus the mean of A1 and A2 (target: under 1% of a core); the models' own added CPU (answering
/metrics); exposition size and series count.

Run as root (cgroups), after the exporter is wired in:
    /opt/gpushare-dev/venv/bin/python bench/metrics.py [--models 16] [--seconds 60] [--json]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "daemon"), str(REPO / "client")]

import grpc  # noqa: E402

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend  # noqa: E402
from gpushared.adapters.cgroupfs import find_cgroup2_mount  # noqa: E402
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi  # noqa: E402
from gpushared.api.v1 import gpushare_pb2 as pb  # noqa: E402
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc  # noqa: E402
from gpushared.domain.gpu import ComputePartition  # noqa: E402

STUB = REPO / "daemon" / "gpushared" / "stub_engine.py"
GIB = 1 << 30
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
"""What Prometheus 2.x sends."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def leaves_cpu_seconds(cgroup: Path, names: list[str]) -> float:
    """CPU of the models' cgroup leaves (cpu.stat is there even without the cpu controller)."""
    total = 0
    for name in names:
        stat = (cgroup / name / "cpu.stat").read_text().split()
        total += int(stat[stat.index("usage_usec") + 1])
    return total / 1e6


def scrape(url: str) -> tuple[float, int, int]:
    """(seconds, compressed bytes, uncompressed bytes) of one scrape as Prometheus makes it."""
    request = urllib.request.Request(url, headers={"Accept": PROMETHEUS_ACCEPT, "Accept-Encoding": "gzip"})
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
        encoded = response.headers.get("Content-Encoding") == "gzip"
    elapsed = time.perf_counter() - started
    return elapsed, len(body), len(gzip.decompress(body) if encoded else body)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Bench:
    def __init__(self, models: int) -> None:
        mount = find_cgroup2_mount()
        if os.geteuid() != 0 or mount is None:
            raise SystemExit("run as root on a host with a cgroup v2 mount")
        self.root = Path(tempfile.mkdtemp(prefix="gs-bench-metrics-", dir="/tmp"))
        self.root.chmod(0o755)
        self.state = self.root / "state"
        self.state.mkdir(mode=0o711)
        # CPX: 64 partitions, so every model gets one of its own.
        backend = AmdSmiGpuBackend(EmulatedAmdSmi(self.state / "emulated-host.json", gpu_count=8), name="emulated")
        for gpu in range(8):
            backend.set_compute_partition(gpu, ComputePartition.CPX)
        backend.close()
        self.cgroup = mount / f"gpushare-bench-{secrets.token_hex(4)}"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/metrics"
        self.config = self.root / "gpushared.toml"
        self.config.write_text(
            f"""
[daemon]
socket_group = ""
[models]
cgroup_root = "{self.cgroup}"
port_range = "19300-19399"
stub_launcher = ["/usr/bin/env", "GPUSHARE_STUB_LOAD_SECONDS=0.5", "{sys.executable}", "-I", "{STUB}"]
[metrics]
listen = "127.0.0.1:{self.port}"
"""
        )
        self.socket = self.root / "gpushared.sock"
        self.names = [f"m{i:02d}" for i in range(models)]
        self.daemon: subprocess.Popen[bytes] | None = None

    def start(self, *, metrics: bool) -> pb_grpc.GpushareStub:
        argv = [sys.executable, "-m", "gpushared", "--emulate", "--socket", str(self.socket)]
        argv += ["--state-dir", str(self.state), "--config", str(self.config), "--log-level", "warning"]
        if not metrics:
            argv += ["--metrics-listen", "off"]
        env = {**os.environ, "PYTHONPATH": f"{REPO / 'daemon'}:{REPO / 'client'}"}
        with (self.root / "daemon.log").open("ab") as log:
            self.daemon = subprocess.Popen(argv, env=env, stderr=log, cwd=REPO)
        stub = pb_grpc.GpushareStub(grpc.insecure_channel(f"unix:{self.socket}"))
        deadline = time.monotonic() + 60
        while True:
            if self.daemon.poll() is not None:
                raise SystemExit(f"gpushared exited {self.daemon.returncode}: {(self.root / 'daemon.log').read_text()}")
            try:
                stub.GetStatus(pb.GetStatusRequest(), timeout=1)
                return stub
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise SystemExit("gpushared did not answer within 60 s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        assert self.daemon is not None
        self.daemon.terminate()
        self.daemon.wait(60)

    def wait_ready(self, stub: pb_grpc.GpushareStub) -> dict[str, pb.Model]:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
            if all(n in models and models[n].state == pb.MODEL_STATE_READY for n in self.names):
                return models
            time.sleep(0.2)
        raise SystemExit(f"models not READY within 120 s: {self.root / 'daemon.log'}")

    def idle_cpu(self, seconds: float, *, scrape_every: float | None) -> dict[str, float]:
        """The daemon's and the models' CPU over ``seconds``; scraping the daemon every ``scrape_every`` seconds."""
        assert self.daemon is not None
        latencies: list[float] = []
        sizes: list[tuple[int, int]] = []
        daemon_before, leaves_before = cpu_seconds(self.daemon.pid), leaves_cpu_seconds(self.cgroup, self.names)
        started = time.monotonic()
        next_scrape = started
        while (now := time.monotonic()) < started + seconds:
            if scrape_every is not None and now >= next_scrape:
                elapsed, compressed, plain = scrape(self.url)
                latencies.append(elapsed)
                sizes.append((compressed, plain))
                next_scrape += scrape_every
            time.sleep(max(0.0, min(next_scrape if scrape_every else started + seconds, started + seconds) - now))
        span = time.monotonic() - started
        daemon_cpu = cpu_seconds(self.daemon.pid) - daemon_before
        leaves_cpu = leaves_cpu_seconds(self.cgroup, self.names) - leaves_before
        result: dict[str, float] = {
            "daemon_cpu_percent": 100.0 * daemon_cpu / span,
            "models_cpu_percent": 100.0 * leaves_cpu / span,
        }
        if latencies:
            result |= {
                "scrapes": float(len(latencies)),
                "scrape_ms_p50": statistics.median(latencies) * 1e3,
                "scrape_ms_max": max(latencies) * 1e3,
                "exposition_bytes": float(sizes[-1][1]),
                "exposition_gzip_bytes": float(sizes[-1][0]),
            }
        return result

    def cleanup(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.kill()
            self.daemon.wait()
        # Everything the bench started lives in its own cgroup subtree: kill that subtree, remove it bottom-up.
        if self.cgroup.is_dir():
            (self.cgroup / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 10
            while "populated 1" in (self.cgroup / "cgroup.events").read_text() and time.monotonic() < deadline:
                time.sleep(0.05)
            for directory, _, _ in os.walk(self.cgroup, topdown=False):
                os.rmdir(directory)
        shutil.rmtree(self.root, ignore_errors=True)


def complete(port: int, name: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": name, "prompt": "Hello", "max_tokens": 8}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, default=16, help="READY stub models (default 16)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window of each phase (default 60)")
    parser.add_argument("--every", type=float, default=5.0, help="scrape interval in phase B (default 5 s)")
    parser.add_argument("--burst", type=int, default=50, help="back-to-back scrapes after phase B (default 50)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    bench = Bench(args.models)
    results: dict[str, object] = {"models": args.models, "window_seconds": args.seconds, "scrape_every": args.every}
    try:
        stub = bench.start(metrics=False)
        for name in bench.names:
            spec = pb.ModelSpec(name=name, engine=pb.ENGINE_STUB, model=f"org/{name}", memory_bytes=2 * GIB)
            stub.Serve(pb.ServeRequest(spec=spec))
        models = bench.wait_ready(stub)
        for model in models.values():
            for _ in range(3):  # some data in every model's histograms
                complete(model.port, model.spec.served_name or model.spec.model)
        time.sleep(5.0)  # let the starts' own CPU settle
        a1 = results["A1_metrics_off"] = bench.idle_cpu(args.seconds, scrape_every=None)
        bench.stop()

        stub = bench.start(metrics=True)
        bench.wait_ready(stub)
        time.sleep(10.0)  # re-adoption done and two rounds of model reads, before measuring
        b = results["B_metrics_on"] = bench.idle_cpu(args.seconds, scrape_every=args.every)
        burst = [scrape(bench.url)[0] for _ in range(args.burst)]
        burst_ms = results["burst_scrape_ms"] = {
            "p50": statistics.median(burst) * 1e3,
            "p99": percentile(burst, 0.99) * 1e3,
            "max": max(burst) * 1e3,
        }
        text = urllib.request.urlopen(bench.url, timeout=10).read().decode()
        results["series"] = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        results["collect_ms_on_loop"] = next(
            float(line.split()[-1]) * 1e3
            for line in text.splitlines()
            if line.startswith("gpushare_exporter_collect_duration_seconds ")
        )
        bench.stop()

        stub = bench.start(metrics=False)
        bench.wait_ready(stub)
        time.sleep(5.0)
        a2 = results["A2_metrics_off"] = bench.idle_cpu(args.seconds, scrape_every=None)
        for name in bench.names:
            stub.Stop(pb.StopRequest(name=name))
        bench.stop()
    finally:
        bench.cleanup()

    baseline = (a1["daemon_cpu_percent"] + a2["daemon_cpu_percent"]) / 2
    results["daemon_added_cpu_percent"] = b["daemon_cpu_percent"] - baseline
    results["models_added_cpu_percent"] = (
        b["models_cpu_percent"] - (a1["models_cpu_percent"] + a2["models_cpu_percent"]) / 2
    )
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(
        f"{args.models} READY stub models; {args.seconds:.0f} s per phase; Prometheus-like scrape every {args.every:g} s"
    )
    print(
        f"daemon CPU: metrics off {a1['daemon_cpu_percent']:.2f}% / {a2['daemon_cpu_percent']:.2f}%, "
        f"on {b['daemon_cpu_percent']:.2f}% of a core -> added {results['daemon_added_cpu_percent']:.2f}% (target < 1%)"
    )
    print(f"models' CPU added by being read: {results['models_added_cpu_percent']:.2f}% of a core (all {args.models})")
    print(
        f"scrape latency: every {args.every:g} s p50 {b['scrape_ms_p50']:.1f} ms, max {b['scrape_ms_max']:.1f} ms; "
        f"back-to-back p50 {burst_ms['p50']:.1f} ms, p99 {burst_ms['p99']:.1f} ms, max {burst_ms['max']:.1f} ms "
        "(target < 50 ms)"
    )
    print(
        f"exposition: {results['series']} series, {b['exposition_bytes']} bytes ({b['exposition_gzip_bytes']} gzipped); "
        f"collection on the event loop {results['collect_ms_on_loop']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
