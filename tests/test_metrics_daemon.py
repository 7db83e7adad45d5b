"""The metrics endpoint of a real gpushared serving stub models in real cgroups, read by promtool and by a real
Prometheus server evaluating the shipped rules. Needs the exporter wired into the daemon (docs/metrics.md,
"Wiring"): until then these fail at daemon start-up, saying so."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

import gpushared.metrics
from tests.conftest import REPO, Daemon, _world_readable_source, free_port, wait_for
from tests.test_metrics import complete, promtool_check_metrics, samples, value
from tests.test_serving import daemon_with_models, show

PROMETHEUS = shutil.which("prometheus")
RULES = Path(gpushared.metrics.__file__).parent / "rules.yml"
PATIENCE = 60.0


@contextlib.contextmanager
def metrics_daemon(tmp_short: Path, crash_looping: str = "") -> Iterator[tuple[Daemon, str]]:
    """A daemon with a model subtree, stub models and its metrics on a free loopback port, read fast: every model's
    /metrics each half second. A model whose name contains ``crash_looping`` crashes 0.2 s after each READY (the
    launcher is a command prefix, so a shell in front of the stub picks the fault by the command line)."""
    port = free_port()
    stub = _world_readable_source() / "gpushared" / "stub_engine.py"
    script = "export GPUSHARE_STUB_LOAD_SECONDS=0.2; "
    if crash_looping:
        script += f'case "$*" in *{crash_looping}*) export GPUSHARE_STUB_DIE_AFTER=0.2;; esac; '
    script += f'exec {sys.executable} -I {stub} "$@"'
    config = f"""
stub_launcher = ["/bin/sh", "-c", {json.dumps(script)}, "stub"]
grace_seconds = 3
probe_interval_seconds = 0.5

[metrics]
listen = "127.0.0.1:{port}"
vllm_scrape_interval_seconds = 0.5
vllm_scrape_timeout_seconds = 0.5
hardware_interval_seconds = 1
"""
    try:
        with daemon_with_models(tmp_short, config) as d:
            yield d, f"http://127.0.0.1:{port}/metrics"
    except AssertionError as exc:
        if "unknown section [metrics]" in str(exc):
            pytest.fail("gpushared does not know [metrics]: wire gpushared.metrics in (docs/metrics.md, Wiring)")
        raise


def scrape(url: str, accept: str = "text/plain;version=0.0.4") -> str:
    request = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(request, timeout=10) as response:
        return str(response.read().decode())


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_exposition_of_a_serving_daemon_passes_promtool_and_counts_the_api(tmp_short: Path) -> None:
    with metrics_daemon(tmp_short) as (d, url):
        ok(d.ctl("serve", "stub-org/tiny", "--engine", "stub", "--name", "tiny", "--memory", "8GiB", "--wait"))
        model = show(d, "tiny")
        port = int(str(model["port"]))
        complete(port, "stub-org/tiny")
        complete(port, "stub-org/tiny")
        refused = d.ctl("allocate", "--memory", "4000GiB")
        assert refused.returncode == 1, refused.stderr
        allocation = json.loads(ok(d.ctl("--json", "show", str(model["allocation_id"]))))
        lead = allocation["partitions"][0]
        labels = {"engine": "0", "gpu": str(lead["gpu_index"]), "model": "tiny", "partition": str(lead["partition_id"])}
        key = "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
        wait_for(
            lambda: samples(scrape(url), "gpushare_vllm_time_to_first_token_seconds_count").get(key) == 2,
            "the daemon to re-export the model's two requests",
            timeout=PATIENCE,
        )
        text = scrape(url)
        promtool_check_metrics(text)
        assert value(text, "gpushare_backend_info", backend="emulated") == 1
        assert value(text, "gpushare_model_state", model="tiny", state="ready") == 1
        assert value(text, "gpushare_vllm_request_success_total", **labels, finished_reason="length") == 2
        assert value(text, "gpushare_api_requests_total", method="Serve", code="OK") == 1
        assert value(text, "gpushare_api_requests_total", method="Allocate", code="RESOURCE_EXHAUSTED") == 1
        assert value(text, "gpushare_allocation_refusals_total", method="Allocate", reason="capacity") == 1
        assert value(text, "gpushare_api_request_duration_seconds_count", method="GetModel") >= 1
        assert (
            value(text, "gpushare_partition_state", state="allocated", gpu=labels["gpu"], partition=labels["partition"])
            == 1
        )
        assert value(text, "gpushare_model_probe_failures_total", model="tiny", probe="health") == 0
        assert "process_cpu_seconds_total" in text
        # Prometheus asks for OpenMetrics first; the daemon answers in it.
        assert scrape(url, "application/openmetrics-text;version=1.0.0,text/plain;q=0.5").endswith("# EOF\n")


def test_rules_and_dashboard_are_package_data() -> None:
    """rules.yml, rules_test.yml and dashboard.json sit in gpushared.metrics, and an installed gpushared has them."""
    with (REPO / "pyproject.toml").open("rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]
    assert set(package_data.get("gpushared.metrics", [])) >= {"rules.yml", "rules_test.yml", "dashboard.json"}
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("prometheus-client") for d in dependencies)


def test_metrics_listen_from_the_command_line_and_the_configuration(tmp_short: Path) -> None:
    bad = tmp_short / "bad.toml"
    bad.write_text('[metrics]\nlisten = "9842"\n')
    checked = subprocess.run(
        [sys.executable, "-m", "gpushared", "--check-config", str(bad)], capture_output=True, text=True, check=False
    )
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert "metrics.listen" in checked.stderr and "HOST:PORT" in checked.stderr
    port = free_port()
    d = Daemon(tmp_short, extra=("--metrics-listen", f"127.0.0.1:{port}")).start()
    try:
        assert "gpushare_build_info" in scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        assert d.stop() == 0, d.log()
    d = Daemon(tmp_short, extra=("--metrics-listen", "off")).start()
    try:
        with pytest.raises(urllib.error.URLError):
            scrape(f"http://127.0.0.1:{port}/metrics")
        assert d.ctl("status").returncode == 0
    finally:
        assert d.stop() == 0, d.log()


@contextlib.contextmanager
def prometheus(tmp: Path, target: str) -> Iterator[str]:
    """A real Prometheus (Debian's package) on a free loopback port, scraping ``target`` as job "gpushared" every
    second and evaluating the shipped rules every second; yields its base URL."""
    if PROMETHEUS is None:
        pytest.fail("prometheus is missing: apt-get install prometheus")
    port = free_port()
    config = tmp / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        f"rule_files:\n  - {RULES}\n"
        f'scrape_configs:\n  - job_name: gpushared\n    static_configs:\n      - targets: ["{target}"]\n'
    )
    log = (tmp / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=log,
    )
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(base) or process.poll() is not None, "Prometheus to be ready", timeout=PATIENCE)
        assert process.poll() is None, (tmp / "prometheus.log").read_text()
        yield base
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _ready(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/-/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def api(base: str, path: str, **params: str) -> dict[str, object]:
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{base}/api/v1/{path}{query}", timeout=10) as response:
        answer: dict[str, object] = json.load(response)
    assert answer["status"] == "success", answer
    data = answer["data"]
    assert isinstance(data, dict)
    return data


def firing(base: str, name: str) -> list[dict[str, object]]:
    alerts = api(base, "alerts")["alerts"]
    assert isinstance(alerts, list)
    return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]


@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_and_fires_the_crash_loop_alert(tmp_short: Path) -> None:
    with metrics_daemon(tmp_short, crash_looping="loopy") as (d, url):
        target = urllib.parse.urlsplit(url).netloc
        with prometheus(tmp_short, target) as base:
            ok(d.ctl("serve", "stub-org/steady", "--engine", "stub", "--name", "steady", "--memory", "8GiB", "--wait"))
            steady = int(str(show(d, "steady")["port"]))
            for _ in range(3):
                complete(steady, "stub-org/steady")
            ok(d.ctl("serve", "stub-org/loopy", "--engine", "stub", "--name", "loopy", "--memory", "8GiB"))
            deadline = time.monotonic() + 3 * PATIENCE
            while not (alerts := firing(base, "GpushareModelCrashLooping")):
                if time.monotonic() > deadline:
                    pytest.fail(
                        f"no GpushareModelCrashLooping alert: {api(base, 'alerts')}\n"
                        f"rules: {api(base, 'rules')}\nmodel: {show(d, 'loopy')}"
                    )
                time.sleep(0.5)
            (alert,) = alerts
            labels = alert["labels"]
            assert isinstance(labels, dict)
            assert labels["model"] == "loopy" and labels["severity"] == "critical" and labels["instance"] == target
            up = api(base, "query", query='up{job="gpushared"}')["result"]
            assert isinstance(up, list) and [r["value"][1] for r in up] == ["1"]
            assert not firing(base, "GpushareDaemonDown")
            restarts = api(base, "query", query='gpushare_model_restarts_total{model="loopy"}')["result"]
            assert isinstance(restarts, list) and float(restarts[0]["value"][1]) >= 2
            # The healthy model's re-exported histogram came through Prometheus' OpenMetrics parser intact.
            ttft = api(base, "query", query='gpushare_vllm_time_to_first_token_seconds_count{model="steady"}')
            assert [r["value"][1] for r in ttft["result"]] == ["3"], ttft  # type: ignore[index]
            assert not firing(base, "GpushareModelCrashLooping") or all(
                a["labels"]["model"] == "loopy"  # type: ignore[index]
                for a in firing(base, "GpushareModelCrashLooping")
            )
