"""The shipped alert rules and dashboard, judged by the real Prometheus tools and against the exporter's output."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from tests.test_metrics import METRICS_DIR, emitted_names, full_exposition, need_promtool

RULES = METRICS_DIR / "rules.yml"
RULES_TEST = METRICS_DIR / "rules_test.yml"
DASHBOARD = METRICS_DIR / "dashboard.json"
PROMETHEUS_OWN = {"up", "scrape_duration_seconds"}
"""Series Prometheus makes itself for every target."""
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__range": "1h",
    "$__interval": "1m",
    '"$instance"': '".*"',
    '"$model"': '".*"',
}


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need_promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def test_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", RULES_TEST.name, cwd=METRICS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_cover_what_the_issue_asks_for() -> None:
    text = RULES.read_text()
    alerts = set(re.findall(r"- alert: (\w+)", text))
    assert alerts >= {
        "GpushareModelCrashLooping",
        "GpushareModelNotReady",
        "GpusharePartitionDrift",
        "GpushareGpuDegraded",
        "GpushareAllocationRefusalsRising",
        "GpushareModelTtftSloBreach",
        "GpushareDaemonDown",
        "GpushareDaemonAbsent",
    }
    tested = set(re.findall(r"alertname: (\w+)", RULES_TEST.read_text()))
    assert alerts == tested, f"alerts without a promtool unit test: {sorted(alerts - tested)}"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(dashboard["panels"])
    return exprs


def test_dashboard_is_importable_json_with_the_asked_for_panels() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 30
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    titles = " | ".join(p["title"] for p in dashboard["panels"])
    for wanted in ("Partitions allocated, per GPU", "Time to first token", "Requests finished per second", "Restarts"):
        assert wanted in titles
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    used = set(re.findall(r"\$(\w+)", json.dumps(dashboard["panels"])))
    assert used - {"__rate_interval", "__range", "__interval"} <= variables


def test_dashboard_queries_parse_and_use_only_emitted_metrics(catalogue: str, tmp_path: Path) -> None:
    emitted = emitted_names(catalogue)
    recorded = set(re.findall(r"- record: ([\w:]+)", RULES.read_text()))
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        for name in re.findall(
            r"\b(gpushare[\w:]*|process_\w+|up|scrape_duration_seconds)\b(?=\s*[{\[(]|\s|\)|$)", expr
        ):
            if ":" in name:
                assert name in recorded, f"{name} in {expr!r} is no recording rule of rules.yml"
            else:
                assert name in emitted or name in PROMETHEUS_OWN, f"{name} in {expr!r} is not emitted by the exporter"
    # promtool parses PromQL only inside rules: every query becomes a recording rule, Grafana's variables filled in.
    lines = ["groups:", "  - name: dashboard", "    rules:"]
    for n, expr in enumerate(exprs):
        query = expr
        for variable, replacement in GRAFANA_VARIABLES.items():
            query = query.replace(variable, replacement)
        assert "$" not in query, query
        lines += [f"      - record: dashboard_query_{n}", f"        expr: {json.dumps(query)}"]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text("\n".join(lines) + "\n")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> str:
    return full_exposition(tmp_path_factory.mktemp("catalogue"))
