"""Model metrics from real supervision: the real ModelService runs stub engines in real cgroup leaves, and the
exporter (its HTTP listener and background reads included) reports what happened. No daemon wiring needed."""

from __future__ import annotations

import asyncio
import secrets
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from gpushared.adapters.cgroupfs import CgroupFsTree, find_cgroup2_mount
from gpushared.domain.model import Engine, ModelSpec
from gpushared.domain.model_state import ModelState, RestartPolicy
from gpushared.domain.served_model import ServingConfig
from gpushared.metrics.exporter import MetricsExporter
from gpushared.metrics.settings import MetricsConfig
from tests.conftest import _world_readable_source, destroy_cgroup, short_dir
from tests.test_metrics import GIB, ROOT, complete, promtool_check_metrics, real_host, samples, value

MOUNT = find_cgroup2_mount()
PATIENCE = 30.0
FAST = RestartPolicy(base_seconds=0.05, cap_seconds=0.2, max_failures=5, window_seconds=600.0)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MOUNT is None, reason="needs a writable cgroup v2 mount"),
]


def serving(*stub_env: str) -> ServingConfig:
    stub = _world_readable_source() / "gpushared" / "stub_engine.py"
    low = 20100 + secrets.randbelow(2000)
    return ServingConfig(
        port_low=low,
        port_high=low + 20,
        stub_launcher=("/usr/bin/env", "GPUSHARE_STUB_LOAD_SECONDS=0.2", *stub_env, sys.executable, "-I", str(stub)),
        grace_seconds=2.0,
        probe_interval=0.2,
        start_timeout=PATIENCE,
        stop_models_on_exit=True,
        restart=FAST,
    )


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


async def until_scraped(address: tuple[str, int], condition: Callable[[str], bool], what: str) -> None:
    """Scrape (in a thread: the listener runs on this loop) until ``condition`` holds for the exposition."""
    deadline = time.monotonic() + PATIENCE
    while not condition(await asyncio.to_thread(scrape, address)):
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.05)


def scrape(address: tuple[str, int]) -> str:
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=10) as response:
        return str(response.read().decode())


def run(scenario: Callable[[Path, CgroupFsTree], object]) -> None:
    assert MOUNT is not None
    root = MOUNT / f"gpushare-test-{secrets.token_hex(4)}"
    home = short_dir("gs-metrics-")
    home.chmod(0o755)  # model children run as another uid and must reach their homes in the state dir
    try:
        asyncio.run(scenario(home / "state", CgroupFsTree(root)))  # type: ignore[arg-type]
    finally:
        destroy_cgroup(root)
        shutil.rmtree(home, ignore_errors=True)


def test_crash_looping_model_counts_failures_restarts_and_starts() -> None:
    async def scenario(state: Path, tree: CgroupFsTree) -> None:
        async with real_host(state, tree=tree, serving=serving("GPUSHARE_STUB_DIE_AFTER=0.3")) as host:
            exporter = MetricsExporter(
                host.metrics, host.source(), settings=MetricsConfig(vllm_scrape_interval=0.2, vllm_scrape_timeout=0.2)
            )
            address = await exporter.start("127.0.0.1", 0)
            try:
                spec = ModelSpec(name="loopy", model="stub-org/loopy", engine=Engine.STUB, memory_bytes=8 * GIB)
                await host.models.serve(ROOT, spec, gpu_index=None, compute=None)
                await until(lambda: host.models.get("loopy").state is ModelState.FAILED, "the crash loop verdict")
                text = await asyncio.to_thread(scrape, address)
            finally:
                await exporter.stop()
        promtool_check_metrics(text)
        assert value(text, "gpushare_model_state", model="loopy", state="failed") == 1
        assert value(text, "gpushare_model_state", model="loopy", state="ready") == 0
        assert value(text, "gpushare_model_restarts_total", model="loopy") == FAST.max_failures - 1
        assert value(text, "gpushare_model_recent_failures", model="loopy") == FAST.max_failures
        # Each run got READY, then the stub's API server crashed: an unrequested exit, status 1.
        assert value(text, "gpushare_model_failures_total", model="loopy", reason="exit") == FAST.max_failures
        assert value(text, "gpushare_model_last_failure_info", model="loopy", reason="exit") == 1
        assert value(text, "gpushare_model_time_to_ready_seconds_count", model="loopy") == FAST.max_failures
        assert value(text, "gpushare_model_time_to_ready_seconds_sum", model="loopy") > 0
        assert samples(text, "gpushare_model_uptime_seconds") == {}  # not up: no uptime
        assert 'model="loopy"' not in "".join(
            line for line in text.splitlines() if line.startswith("gpushare_vllm_time_to_first")
        )

    run(scenario)


def test_ready_model_gets_probe_uptime_and_its_own_vllm_series() -> None:
    async def scenario(state: Path, tree: CgroupFsTree) -> None:
        async with real_host(state, tree=tree, serving=serving()) as host:
            exporter = MetricsExporter(
                host.metrics, host.source(), settings=MetricsConfig(vllm_scrape_interval=0.2, vllm_scrape_timeout=0.2)
            )
            address = await exporter.start("127.0.0.1", 0)
            try:
                spec = ModelSpec(name="tiny", model="stub-org/tiny", engine=Engine.STUB, memory_bytes=8 * GIB)
                view = await host.models.serve(ROOT, spec, gpu_index=1, compute=None)
                await until(lambda: host.models.get("tiny").state is ModelState.READY, "READY")
                for _ in range(3):
                    await asyncio.to_thread(complete, view.record.port, "stub-org/tiny")
                labels = {"engine": "0", "gpu": "1", "model": "tiny", "partition": "0"}
                key = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
                await until_scraped(
                    address,
                    lambda text: samples(text, "gpushare_vllm_time_to_first_token_seconds_count").get(key) == 3,
                    "the three requests in the re-exported TTFT histogram",
                )
                await until_scraped(
                    address,
                    lambda text: bool(samples(text, "gpushare_model_probe_duration_seconds_count")),
                    "a liveness probe",
                )
                text = await asyncio.to_thread(scrape, address)
                await host.models.stop(ROOT, "tiny", keep_allocation=False)
                after = await asyncio.to_thread(scrape, address)
            finally:
                await exporter.stop()
        promtool_check_metrics(text)
        assert value(text, "gpushare_vllm_request_success_total", **labels, finished_reason="length") == 3
        assert value(text, "gpushare_vllm_up", model="tiny") == 1
        assert value(text, "gpushare_model_state", model="tiny", state="ready") == 1
        assert value(text, "gpushare_model_uptime_seconds", model="tiny") >= 0
        assert value(text, "gpushare_model_time_to_ready_seconds_count", model="tiny") == 1
        assert value(text, "gpushare_model_probe_duration_seconds_count", model="tiny", probe="health") >= 1
        assert value(text, "gpushare_model_probe_failures_total", model="tiny", probe="health") == 0
        info = samples(text, "gpushare_model_info")
        ((key, one),) = info.items()
        assert one == 1 and 'engine_type="stub"' in key and 'gpu="1"' in key and 'served_name="stub-org/tiny"' in key
        holders = samples(text, "gpushare_partition_holder_info")
        assert any('gpu="1"' in k and 'model="tiny"' in k for k in holders)
        # Stopped and released: every series of the model is gone, none left behind as stale.
        assert 'model="tiny"' not in after

    run(scenario)
