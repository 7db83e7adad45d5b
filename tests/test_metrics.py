"""Metrics exporter over real services: the emulated host, the allocation ledger, the partition service, a real stub
engine's /metrics, the HTTP listener, and promtool judging the exposition. No daemon wiring needed."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend
from gpushared.adapters.child_process import CgroupLauncher
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi, EmulatorFaults, FaultHolder, write_faults
from gpushared.adapters.http_probe import HttpProbe
from gpushared.adapters.model_files import ModelFiles
from gpushared.adapters.procfs import ProcFs
from gpushared.adapters.sqlite_state import SqliteAllocationStore
from gpushared.adapters.systemd_notify import SystemdNotifier
from gpushared.adapters.systemd_units import SystemctlUnits
from gpushared.domain.allocation import AllocationRequest, PlacementPolicy, Quota
from gpushared.domain.caller import Caller
from gpushared.domain.errors import ConfigError, GpushareError, HardwareError
from gpushared.domain.gpu import ComputePartition, DeviceProcess, GpuTelemetry, MemoryPartition
from gpushared.domain.model import Engine, ModelSpec
from gpushared.domain.model_state import ModelState, Transition
from gpushared.domain.partitioning import GpuLayout
from gpushared.domain.served_model import ServedModel, ServingConfig
from gpushared.metrics.collector import FAILURE_REASONS, failure_reason
from gpushared.metrics.exporter import MetricsExporter
from gpushared.metrics.hooks import DaemonMetrics
from gpushared.metrics.settings import MetricsConfig, parse_listen, parse_metrics
from gpushared.metrics.source import ServicesSource
from gpushared.metrics.text import COUNTER, GAUGE, HISTOGRAM, ExpositionError, parse, quantile
from gpushared.metrics.vllm import SOURCE_KINDS, fetch_metrics, select_families
from gpushared.services.allocations import AllocationPolicy, AllocationService, HostView
from gpushared.services.models import ModelService, ModelView
from gpushared.services.partitions import PartitionService
from gpushared.services.supervision_ports import LeafTree
from gpushared.transport.status import status_for
from tests.conftest import REPO, free_port, wait_for

PROMTOOL = shutil.which("promtool")
METRICS_DIR = REPO / "daemon" / "gpushared" / "metrics"
ROOT = Caller(uid=0, gid=0, pid=0, admin=True)
ALICE = Caller(uid=4242, gid=4242, pid=0, admin=False)
GIB = 1 << 30


def need_promtool() -> str:
    if PROMTOOL is None:
        pytest.fail("promtool is missing: apt-get install prometheus (it provides /usr/bin/promtool)")
    return PROMTOOL


def promtool_check_metrics(text: str) -> None:
    result = subprocess.run(
        [need_promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=60, check=False
    )
    # promtool prints lint problems and exits 1 (3 for a parse error); silence means it found nothing to say.
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def samples(text: str, name: str) -> dict[str, float]:
    """Label block -> value for one sample name in a text exposition (labels as written, sorted by the client)."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            found[head[len(name) :]] = float(value)
    return found


def value(text: str, name: str, **labels: str) -> float:
    want = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}" if labels else ""
    series = samples(text, name)
    assert want in series, f"{name}{want} not in {sorted(series)[:20]}"
    return series[want]


# -- a host of real services ----------------------------------------------------------------------------------------


@dataclass
class Host:
    state_dir: Path
    backend: AmdSmiGpuBackend
    allocations: AllocationService
    models: ModelService
    partitions: PartitionService
    metrics: DaemonMetrics
    store: SqliteAllocationStore

    def source(self) -> ServicesSource:
        return ServicesSource(self.backend.name, self.allocations, self.models, self.partitions)


@contextlib.asynccontextmanager
async def real_host(
    state_dir: Path,
    *,
    gpus: int = 2,
    tree: LeafTree | None = None,
    serving: ServingConfig | None = None,
    desired: dict[int, GpuLayout] | None = None,
    quotas: dict[int, Quota] | None = None,
) -> AsyncIterator[Host]:
    """The daemon's services as app.py composes them, on an emulated host; models only when ``tree`` is given."""
    state_dir.mkdir(mode=0o711, parents=True, exist_ok=True)
    backend = AmdSmiGpuBackend(EmulatedAmdSmi(state_dir / "emulated-host.json", gpu_count=gpus), name="emulated")
    store = SqliteAllocationStore(state_dir)
    policy = AllocationPolicy(PlacementPolicy.SPREAD, Quota(), quotas or {})
    allocations = AllocationService(store, policy, await asyncio.to_thread(backend.observe), observed_at=time.time())
    metrics = DaemonMetrics()
    models = ModelService(
        allocations,
        tree=tree,
        cgroup_problem="" if tree is not None else "no cgroup in this test",
        launcher=CgroupLauncher(tree) if tree is not None else None,  # type: ignore[arg-type]
        probe=metrics.metered_probe(HttpProbe(timeout=1.0)),
        config=serving or ServingConfig(),
        files=ModelFiles(state_dir),
        base_env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    )
    partitions = PartitionService(
        backend,
        allocations,
        models,
        units=SystemctlUnits("systemctl"),
        processes=ProcFs(),
        notifier=SystemdNotifier(environ={}),
        desired=desired,
    )
    host = Host(state_dir, backend, allocations, models, partitions, metrics, store)
    try:
        yield host
    finally:
        await models.shutdown()
        await partitions.shutdown()
        store.close()
        backend.close()


@contextlib.contextmanager
def stub_engine(*flags: str, name: str = "tiny") -> Iterator[int]:
    """A real stub engine (vLLM look-alike) on a free loopback port, in its own process group; yields the port."""
    port = free_port()
    argv = [sys.executable, "-m", "gpushared.stub_engine", "serve", "org/tiny", "--port", str(port)]
    argv += ["--served-model-name", name, "--stub-load-seconds", "0.1", *flags]
    process = subprocess.Popen(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO, start_new_session=True
    )
    try:
        wait_for(lambda: _answers(port), "the stub engine to listen")
        yield port
    finally:
        # The stub forks an EngineCore that outlives a killed parent, as vLLM's does: kill our whole group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def complete(port: int, name: str = "tiny", tokens: int = 4) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"model": name, "prompt": "Hello", "max_tokens": tokens}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200


class WithModel:
    """A MetricsSource: the real services' source, plus a model served by a stub engine this test started itself
    (ModelService can only start children in a cgroup; tests/test_metrics_models.py covers that path)."""

    def __init__(self, source: ServicesSource, view: ModelView) -> None:
        self._source = source
        self._view = view

    @property
    def backend_name(self) -> str:
        return self._source.backend_name

    def host_view(self) -> HostView:
        return self._source.host_view()

    def models(self) -> Sequence[ModelView]:
        return [*self._source.models(), self._view]

    def operation_running(self) -> bool:
        return self._source.operation_running()

    def drift(self) -> Sequence[str]:
        return self._source.drift()


def ready_view(name: str, port: int, allocation_id: str, state: ModelState = ModelState.READY) -> ModelView:
    """How ModelService shows a model its supervisor launched at t0 and saw READY a second later."""
    t0 = time.time() - 5.0
    spec = ModelSpec(name=name, model=f"stub-org/{name}", engine=Engine.STUB, served_name=name, memory_bytes=8 * GIB)
    record = ServedModel(name, spec, allocation_id, 0, 65534, 65534, port, t0)
    transitions = (
        Transition(ModelState.PENDING, ModelState.STARTING, t0, "launched pid 4242"),
        Transition(ModelState.STARTING, ModelState.READY, t0 + 1.0, f"GET /health 200 and /v1/models lists {name!r}"),
    )
    return ModelView(record, state, 4242, 0, "", transitions, Path("/dev/null"), (), 600.0)


class SensorBackend:
    """The emulated backend plus the TelemetryReader extension, as the amdsmi backend will have it: the emulator has
    no sensors, so the readings here are fixed (power unreadable, to check it is omitted); ``broken`` GPUs fail
    their sensor read and ``bare`` GPUs have no sensors (None)."""

    def __init__(self, backend: AmdSmiGpuBackend, *, broken: tuple[int, ...] = (), bare: tuple[int, ...] = ()) -> None:
        self._backend = backend
        self._broken = broken
        self._bare = bare

    def list_processes(self, gpu_index: int) -> dict[int, tuple[DeviceProcess, ...]]:
        return self._backend.list_processes(gpu_index)

    def read_telemetry(self, gpu_index: int) -> GpuTelemetry | None:
        if gpu_index in self._broken:
            raise HardwareError(f"gpu {gpu_index}: read GPU metrics: not supported", status="NOT_SUPPORTED")
        if gpu_index in self._bare:
            return None
        return GpuTelemetry(
            temperature_celsius={"hotspot": 41.0 + gpu_index, "memory": 35.0},
            power_watts=None,
            activity_ratio={"gfx": 0.25},
        )


# -- the exposition reader ------------------------------------------------------------------------------------------


def test_reads_the_stub_engines_real_exposition() -> None:
    async def scenario(port: int) -> None:
        text = await fetch_metrics(port, 5.0)
        parsed = parse(text, SOURCE_KINDS)
        ttft = parsed["vllm:time_to_first_token_seconds"]
        ((labels, histogram),) = ttft.histograms.items()
        assert dict(labels) == {"engine": "0", "model_name": "tiny"}
        assert [b.le for b in histogram.buckets][:3] == ["0.001", "0.005", "0.01"]
        assert histogram.buckets[-1].le == "+Inf" and histogram.count == 3 == histogram.buckets[-1].count
        assert histogram.sum > 0
        success = parsed["vllm:request_success_total"].samples
        assert success[(("engine", "0"), ("finished_reason", "length"), ("model_name", "tiny"))] == 3
        assert len(success) == 5  # every finished_reason exists from startup
        chosen = select_families(parsed)
        assert set(chosen) >= {
            "gpushare_vllm_time_to_first_token_seconds",
            "gpushare_vllm_inter_token_latency_seconds",
            "gpushare_vllm_e2e_request_latency_seconds",
            "gpushare_vllm_num_requests_running",
            "gpushare_vllm_num_requests_waiting",
            "gpushare_vllm_kv_cache_usage_ratio",
            "gpushare_vllm_request_success_total",
            "gpushare_vllm_generation_tokens_total",
        }
        assert chosen["gpushare_vllm_generation_tokens_total"].samples[(("engine", "0"), ("model_name", "tiny"))] == 12

    with stub_engine() as port:
        for _ in range(3):
            complete(port)
        asyncio.run(scenario(port))


def test_reader_edge_cases() -> None:
    text = "\n".join(
        [
            "# HELP x_total a counter",
            "# TYPE x_total counter",
            'x_total{b="2",a="q\\"uote\\\\n\\n"} 3',
            'x_total{a="plain",} 4.5e+00',
            "unwanted_metric 7",
            'h_bucket{le="0.1"} 1',
            'h_bucket{le="+Inf"} 2',
            "h_sum 0.3",
            'broken_bucket{le="1"} 1',
            "broken_sum 1",
            "g NaN",
            "g_other 1 1700000000000",
        ]
    )
    kinds = {"x_total": COUNTER, "h": HISTOGRAM, "broken": HISTOGRAM, "g": GAUGE}
    parsed = parse(text, kinds)
    assert parsed["x_total"].samples == {(("a", 'q"uote\\n\n'), ("b", "2")): 3.0, (("a", "plain"),): 4.5}
    assert parsed["h"].histograms[()].count == 2  # _count absent: taken from +Inf
    assert parsed["broken"].histograms == {}  # no +Inf bucket: dropped, never half-exported
    assert "g" in parsed and parsed["g"].samples[()] != parsed["g"].samples[()]  # NaN survives
    with pytest.raises(ExpositionError):
        parse('x_total{a="unterminated} 1', kinds)
    with pytest.raises(ExpositionError):
        parse("x_total not-a-number", kinds)


def test_older_vllm_names_are_used_only_when_the_new_ones_are_missing() -> None:
    old = "\n".join(
        [
            'vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.5',
            'vllm:time_per_output_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 1',
            'vllm:time_per_output_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 1',
            'vllm:time_per_output_token_seconds_sum{engine="0",model_name="m"} 0.05',
        ]
    )
    chosen = select_families(parse(old, SOURCE_KINDS))
    assert chosen["gpushare_vllm_kv_cache_usage_ratio"].samples == {(("engine", "0"), ("model_name", "m")): 0.5}
    assert (
        chosen["gpushare_vllm_inter_token_latency_seconds"].histograms[(("engine", "0"), ("model_name", "m"))].count
        == 1
    )
    both = old + '\nvllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
    chosen = select_families(parse(both, SOURCE_KINDS))
    assert chosen["gpushare_vllm_kv_cache_usage_ratio"].samples == {(("engine", "0"), ("model_name", "m")): 0.25}


def test_quantile_interpolates_like_histogram_quantile() -> None:
    inf = float("inf")
    assert quantile(0.5, [(0.1, 0.0), (0.5, 10.0), (inf, 10.0)]) == pytest.approx(0.3)
    assert quantile(0.99, [(2.5, 0.0), (5.0, 60.0), (inf, 60.0)]) == pytest.approx(4.975)  # as in rules_test.yml
    assert quantile(0.99, [(1.0, 5.0), (inf, 10.0)]) == 1.0  # rank in +Inf: the last finite bound
    assert quantile(0.5, [(1.0, 0.0), (inf, 0.0)]) != quantile(0.5, [(1.0, 0.0), (inf, 0.0)])  # no data: NaN


# -- the exporter over real services --------------------------------------------------------------------------------


def test_exposition_of_real_services_describes_the_host_and_passes_promtool(tmp_path: Path) -> None:
    async def scenario() -> str:
        desired = {1: GpuLayout(ComputePartition.CPX, MemoryPartition.NPS4)}
        async with real_host(tmp_path / "state", desired=desired, quotas={4242: Quota(max_allocations=1)}) as host:
            kept = await host.allocations.allocate(ROOT, AllocationRequest(memory_bytes=40 * GIB, name="kept"))
            await host.allocations.allocate(ALICE, AllocationRequest(memory_bytes=8 * GIB, name="alice"))
            for caller, request in (
                (ALICE, AllocationRequest(memory_bytes=8 * GIB)),  # her quota: one allocation
                (ROOT, AllocationRequest(memory_bytes=4000 * GIB)),  # larger than any partition
                (ROOT, AllocationRequest(memory_bytes=0)),  # malformed
            ):
                started = time.perf_counter()
                try:
                    await host.allocations.allocate(caller, request)
                except GpushareError as exc:
                    host.metrics.observe_rpc("Allocate", status_for(exc).name, time.perf_counter() - started, exc)
            host.metrics.observe_rpc("ListGpus", "OK", 0.0003)
            host.metrics.watchdog(sent=True)
            host.metrics.watchdog(sent=False)
            await host.allocations.mark_degraded(host.allocations.view.inventory.gpus[1].bdf, "test: rollback failed")
            host.partitions.observe_drift(host.allocations.view.inventory)
            # A process holding 3 GiB on GPU 0 partition 0, as the emulator's process list reports it.
            write_faults(host.state_dir, EmulatorFaults(holders=(FaultHolder(os.getpid(), gpu=0, vram_bytes=3 * GIB),)))
            exporter = MetricsExporter(host.metrics, host.source(), hardware=host.backend)
            assert exporter.hardware is not None
            await exporter.hardware.poll_once([0, 1])
            body, headers = await exporter.render()
            assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = body.decode()
            assert kept.partitions[0].gpu_bdf == host.allocations.view.inventory.gpus[0].bdf
            return text.replace(kept.id, "KEPT")

    text = asyncio.run(scenario())
    promtool_check_metrics(text)
    assert value(text, "gpushare_backend_info", backend="emulated") == 1
    assert value(text, "gpushare_gpu_compute_partition", gpu="0", mode="SPX") == 1
    assert value(text, "gpushare_gpu_memory_partition", gpu="1", mode="NPS1") == 1
    assert value(text, "gpushare_partition_state", gpu="0", partition="0", state="allocated") == 1
    assert value(text, "gpushare_partition_state", gpu="0", partition="0", state="free") == 0
    assert value(text, "gpushare_partition_state", gpu="1", partition="0", state="degraded") == 1
    assert value(text, "gpushare_partition_holder_info", allocation="KEPT", gpu="0", model="", partition="0") == 1
    assert value(text, "gpushare_partition_allocated_bytes", gpu="0", partition="0") == 40 * GIB
    assert value(text, "gpushare_gpu_memory_pool_allocated_bytes", gpu="0", pool="0") == 40 * GIB
    assert value(text, "gpushare_gpu_memory_pool_total_bytes", gpu="0", pool="0") == 196592 * (1 << 20)
    assert value(text, "gpushare_gpu_degraded", gpu="1") == 1 and value(text, "gpushare_gpu_degraded", gpu="0") == 0
    assert value(text, "gpushare_gpu_closed", gpu="1") == 1
    assert value(text, "gpushare_gpu_layout_drift", gpu="1") == 1 and value(text, "gpushare_layout_drift_gpus") == 1
    assert value(text, "gpushare_allocations", state="active") == 1  # "alice" sits on the degraded GPU
    assert value(text, "gpushare_allocations", state="degraded") == 1
    assert value(text, "gpushare_partition_vram_used_bytes", gpu="0", partition="0") == 3 * GIB
    assert value(text, "gpushare_partition_vram_used_bytes", gpu="1", partition="0") == 0
    assert value(text, "gpushare_allocation_refusals_total", method="Allocate", reason="quota") == 1
    assert value(text, "gpushare_allocation_refusals_total", method="Allocate", reason="capacity") == 1
    assert value(text, "gpushare_allocation_refusals_total", method="Allocate", reason="invalid") == 1
    assert value(text, "gpushare_api_requests_total", method="Allocate", code="RESOURCE_EXHAUSTED") == 2
    assert value(text, "gpushare_api_request_duration_seconds_count", method="ListGpus") == 1
    assert value(text, "gpushare_api_request_duration_seconds_bucket", method="ListGpus", le="0.0005") == 1
    assert value(text, "gpushare_watchdog_pings_total", result="withheld") == 1
    # The emulated MI300X reports sensors through each primary; what it lacks (edge temperature, media activity)
    # is absent, not 0.
    temperatures = samples(text, "gpushare_gpu_temperature_celsius")
    assert value(text, "gpushare_gpu_temperature_celsius", gpu="1", sensor="hotspot") == 43
    assert temperatures and not any('sensor="edge"' in k for k in temperatures)
    assert value(text, "gpushare_gpu_power_watts", gpu="1") == 140
    assert not any('engine="mm"' in k for k in samples(text, "gpushare_gpu_activity_ratio"))
    assert "process_cpu_seconds_total" in text


def test_telemetry_of_a_backend_with_sensors_omits_what_it_cannot_read(tmp_path: Path) -> None:
    async def scenario(sensors: Callable[[AmdSmiGpuBackend], SensorBackend]) -> str:
        async with real_host(tmp_path / "state", gpus=3) as host:
            exporter = MetricsExporter(host.metrics, host.source(), hardware=sensors(host.backend))
            assert exporter.hardware is not None
            await exporter.hardware.poll_once([0, 1, 2])
            body, _ = await exporter.render()
            return body.decode()

    text = asyncio.run(scenario(lambda backend: SensorBackend(backend, broken=(2,))))
    promtool_check_metrics(text)
    assert value(text, "gpushare_gpu_temperature_celsius", gpu="1", sensor="hotspot") == 42
    assert value(text, "gpushare_gpu_activity_ratio", gpu="0", engine="gfx") == 0.25
    assert samples(text, "gpushare_gpu_power_watts") == {}  # unreadable: no sample, not 0
    assert not any('gpu="2"' in k for k in samples(text, "gpushare_gpu_temperature_celsius"))  # its read failed
    assert value(text, "gpushare_partition_vram_used_bytes", gpu="2", partition="0") == 0  # ...the rest did not
    text = asyncio.run(scenario(lambda backend: SensorBackend(backend, bare=(0, 1, 2))))
    assert "gpushare_gpu_temperature_celsius" not in text and "gpushare_gpu_activity_ratio" not in text


def test_reexported_vllm_series_carry_model_gpu_and_partition(tmp_path: Path) -> None:
    async def scenario(port: int) -> str:
        async with real_host(tmp_path / "state") as host:
            held = await host.allocations.allocate(ROOT, AllocationRequest(memory_bytes=8 * GIB, name="tiny"))
            gone = await host.allocations.allocate(ROOT, AllocationRequest(memory_bytes=8 * GIB, name="gone"))
            source = WithModel(host.source(), ready_view("tiny", port, held.id))
            source = WithModel(source, ready_view("gone", free_port(), gone.id))  # type: ignore[arg-type]
            exporter = MetricsExporter(host.metrics, source, settings=MetricsConfig(vllm_scrape_timeout=2.0))
            assert {t.model: (t.gpu, t.partition) for t in exporter.collector.targets()} == {
                "tiny": ("0", "0"),
                "gone": ("1", "0"),
            }
            await exporter.scraper.scrape_once(exporter.collector.targets())
            body, _ = await exporter.render()
            return body.decode()

    with stub_engine() as port:
        complete(port)
        complete(port)
        text = asyncio.run(scenario(port))
    promtool_check_metrics(text)
    labels = {"engine": "0", "gpu": "0", "model": "tiny", "partition": "0"}
    assert value(text, "gpushare_vllm_time_to_first_token_seconds_count", **labels) == 2
    assert value(text, "gpushare_vllm_time_to_first_token_seconds_bucket", **labels, le="+Inf") == 2
    assert value(text, "gpushare_vllm_request_success_total", **labels, finished_reason="length") == 2
    assert value(text, "gpushare_vllm_num_requests_running", **labels) == 0
    assert "model_name=" not in text  # the gpushare name replaces vLLM's served-name label
    assert value(text, "gpushare_vllm_up", model="tiny") == 1
    assert value(text, "gpushare_vllm_up", model="gone") == 0  # nobody listens there
    assert value(text, "gpushare_vllm_scrape_failures_total", model="gone") == 1
    assert not any('model="gone"' in line for line in text.splitlines() if line.startswith("gpushare_vllm_time"))


def test_http_listener(tmp_path: Path) -> None:
    def get(url: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def raw(port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(data)
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async def scenario() -> None:
        async with real_host(tmp_path / "state") as host:
            exporter = MetricsExporter(host.metrics, host.source())
            host_, port = await exporter.start("127.0.0.1", 0)
            base = f"http://{host_}:{port}"
            try:
                status, headers, body = await asyncio.to_thread(get, f"{base}/metrics")
                assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
                assert b"gpushare_build_info{" in body
                status, headers, body = await asyncio.to_thread(
                    get, f"{base}/metrics", Accept="application/openmetrics-text;version=1.0.0"
                )
                assert headers["Content-Type"].startswith("application/openmetrics-text")
                assert body.endswith(b"# EOF\n")
                status, headers, body = await asyncio.to_thread(get, f"{base}/metrics", **{"Accept-Encoding": "gzip"})
                assert headers["Content-Encoding"] == "gzip" and b"gpushare_build_info" in gzip.decompress(body)
                assert (await asyncio.to_thread(get, f"{base}/nope"))[0] == 404
                assert b"/metrics" in (await asyncio.to_thread(get, f"{base}/"))[2]
                head = await asyncio.to_thread(raw, port, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 OK") and head.endswith(b"\r\n\r\n")
                post = await asyncio.to_thread(raw, port, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
                assert post.startswith(b"HTTP/1.1 405")
                assert (await asyncio.to_thread(raw, port, b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
            finally:
                await exporter.stop()
            with pytest.raises(OSError):
                await asyncio.to_thread(get, f"{base}/metrics")

    asyncio.run(scenario())


def test_listen_address_and_metrics_section() -> None:
    assert parse_listen("127.0.0.1:9842") == ("127.0.0.1", 9842)
    assert parse_listen("[::1]:9842") == ("::1", 9842)
    assert parse_listen("0.0.0.0:1") == ("0.0.0.0", 1)
    assert parse_listen("off") is None and parse_listen("") is None
    for bad in (":9842", "9842", "::1:9842", "[::1:9842", "host:http", "host:70000", "host:0"):
        with pytest.raises(ValueError, match=re.escape(repr(bad))):
            parse_listen(bad)
    config = parse_metrics("f.toml", {"listen": "[::]:9900", "vllm_scrape_interval_seconds": 10})
    assert config == MetricsConfig(listen=("::", 9900), vllm_scrape_interval=10.0)
    with pytest.raises(ConfigError, match=r"metrics\.listen = 'localhost'"):
        parse_metrics("f.toml", {"listen": "localhost"})
    with pytest.raises(ConfigError, match=r"vllm_scrape_timeout_seconds .* is longer than"):
        parse_metrics("f.toml", {"vllm_scrape_interval_seconds": 1, "vllm_scrape_timeout_seconds": 2})
    with pytest.raises(ConfigError, match="must be more than 0"):
        parse_metrics("f.toml", {"hardware_interval_seconds": 0})


# -- the whole catalogue --------------------------------------------------------------------------------------------


def full_exposition(tmp_path: Path) -> str:
    """An exposition with every family the exporter can emit holding samples (a real stub engine for the vLLM
    series, the sensor extension for telemetry, real services for the rest)."""

    async def scenario(port: int) -> str:
        async with real_host(tmp_path / "state") as host:
            held = await host.allocations.allocate(ROOT, AllocationRequest(memory_bytes=8 * GIB, name="tiny"))
            host.metrics.observe_rpc("ListGpus", "OK", 0.001)
            host.metrics.probes.record(port, "health", 0.001, True)
            source = WithModel(host.source(), ready_view("tiny", port, held.id))
            exporter = MetricsExporter(host.metrics, source, hardware=SensorBackend(host.backend))
            assert exporter.hardware is not None
            await exporter.hardware.poll_once([0, 1])
            await exporter.scraper.scrape_once(exporter.collector.targets())
            body, _ = await exporter.render()
            return body.decode()

    with stub_engine() as port:
        complete(port)
        return asyncio.run(scenario(port))


def emitted_names(text: str) -> set[str]:
    """Every sample name the exposition's families can carry (a histogram family without samples still declares
    its _bucket, _sum and _count)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{part}" for part in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> str:
    return full_exposition(tmp_path_factory.mktemp("catalogue"))


def test_every_metric_is_documented(catalogue: str) -> None:
    docs = (REPO / "docs" / "metrics.md").read_text()
    families = {line.split()[2] for line in catalogue.splitlines() if line.startswith("# TYPE gpushare_")}
    missing = sorted(f for f in families if f"`{f}`" not in docs)
    assert not missing, f"docs/metrics.md does not describe {missing}"
    documented = set(re.findall(r"`(gpushare_[a-z0-9_]+)`", docs))
    stale = sorted(d for d in documented if not any(n.startswith(d) for n in emitted_names(catalogue)))
    assert not stale, f"docs/metrics.md describes metrics the exporter does not emit: {stale}"


def test_failure_reasons_classify_what_the_supervisor_writes() -> None:
    texts = {
        "exited unexpectedly: exited with status 1": "exit",
        "exited unexpectedly: killed by SIGSEGV": "signal",
        "exited during start: exited with status 1": "start_exit",
        "exited during start: killed by SIGKILL": "signal",
        "not ready within 600 s (GET /health and /v1/models)": "start_timeout",
        "GET /health failed 6 times in a row; killing the hung server": "health",
        "a one-token completion got no answer within 60 s 4 times in a row (/health still says 200: the engine "
        "hangs); killing the hung server": "hung",
        "cannot launch /usr/bin/vllm: [Errno 2] No such file or directory": "launch",
        "supervision failed: cgroup.kill refused": "supervision",
        "something new": "other",
    }
    assert {text: failure_reason(text) for text in texts} == texts
    assert set(texts.values()) == set(FAILURE_REASONS)
