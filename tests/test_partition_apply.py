"""Partition operations end to end: a real daemon on the emulated host with stub models in real cgroup leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared.adapters.emulated_amdsmi import EmulatorFaults, FaultHolder, write_faults
from gpushared.domain.partitioning import STEP_ORDER
from tests.conftest import OTHER_UID, Daemon, _world_readable_source
from tests.test_serving import MOUNT, alive, daemon_with_models

PATIENCE = 60.0


@pytest.fixture
def host(tmp_short: Path) -> Iterator[Daemon]:
    stub = _world_readable_source() / "gpushared" / "stub_engine.py"
    config = f"""
stub_launcher = ["/usr/bin/env", "GPUSHARE_STUB_LOAD_SECONDS=0.2", "{sys.executable}", "-I", "{stub}"]
grace_seconds = 3
probe_interval_seconds = 0.5
"""
    with daemon_with_models(tmp_short, config) as d:
        yield d


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def js(d: Daemon, *args: str) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(ok(d.ctl("--json", *args)))
    return loaded


def serve(d: Daemon, name: str, *extra: str) -> int:
    ok(d.ctl("serve", f"org/{name}", "--engine", "stub", "--name", name, "--memory", "8GiB", *extra, "--wait"))
    return int(js(d, "show", name)["pid"])


def wait_ready(d: Daemon, *names: str) -> dict[str, dict[str, Any]]:
    deadline = time.monotonic() + PATIENCE
    while True:
        models = {m["name"]: m for m in js(d, "models").get("models", [])}
        if all(models.get(n, {}).get("state") == "MODEL_STATE_READY" for n in names):
            return models
        if time.monotonic() > deadline:
            pytest.fail(f"models {names} not READY: {models}\n{d.log()[-3000:]}")
        time.sleep(0.1)


def layouts(d: Daemon) -> set[str]:
    gpus = js(d, "gpus")["gpus"]
    return {f"{g['compute_partition'].split('_')[-1]}/{g['memory_partition'].split('_')[-1]}" for g in gpus}


def leaves(d: Daemon) -> set[str]:
    """The model leaves under the daemon's cgroup subtree (its own leaf, supervisor/, excluded)."""
    config = d.config_path.read_text() if d.config_path else ""
    root = Path(next(line.split('"')[1] for line in config.splitlines() if line.startswith("cgroup_root")))
    return {p.name for p in root.iterdir() if p.is_dir()} - {"supervisor"}


def wait_operation(d: Daemon, operation_id: str) -> dict[str, Any]:
    result = d.ctl("--json", "operation", "wait", operation_id, "--wait-timeout", str(PATIENCE), timeout=PATIENCE + 10)
    operation: dict[str, Any] = json.loads(result.stdout)
    return operation


def test_switch_to_cpx_nps4_refused_without_drain_then_drains_and_restarts_models(host: Daemon) -> None:
    pids = {"m0": serve(host, "m0", "--gpu", "0"), "m5": serve(host, "m5", "--gpu", "5")}
    plan = ok(host.ctl("partition", "plan", "--compute", "CPX", "--memory", "NPS4"))
    assert "reload_driver" in plan and "model m0 (drained and restarted)" in plan and "apply needs --drain" in plan

    refused = host.ctl("partition", "apply", "--compute", "CPX", "--memory", "NPS4")
    assert refused.returncode == 1
    assert "model m0 on GPU 0: runs there (pass --drain" in refused.stderr
    assert "model m5 on GPU 5" in refused.stderr
    assert layouts(host) == {"SPX/NPS1"}, "nothing changed"
    assert all(alive(pid) for pid in pids.values())
    assert js(host, "operation", "list").get("operations", []) == []

    result = host.ctl(
        "--json", "partition", "apply", "--compute", "CPX", "--memory", "NPS4", "--drain", "--wait", timeout=PATIENCE
    )
    operation = json.loads(ok(result))
    assert operation["state"] == "OPERATION_STATE_SUCCEEDED", operation
    assert operation["drained_models"] == ["m0", "m5"]
    assert [e["text"] for e in operation["events"]][-1] == "succeeded"
    assert layouts(host) == {"CPX/NPS4"}
    status = js(host, "status")
    assert status["partition_count"] == 64
    assert not status.get("drift") and not status.get("operation_id")

    models = wait_ready(host, "m0", "m5")
    for name, old in pids.items():
        assert not alive(old), f"{name}'s old server is gone"
        assert int(models[name]["pid"]) != old
        allocation = js(host, "show", models[name]["allocation_id"])
        partition = allocation["partitions"][0]
        assert partition["bdf"].endswith(f".{partition.get('partition_id', 0)}")
    assert leaves(host) == {"m0", "m5"}, "no orphan leaf"
    assert len(js(host, "list")["allocations"]) == 2
    shown = ok(host.ctl("partition", "show"))
    assert shown.count("CPX/NPS4") >= 8 and "A" in shown

    # Applying the layout the host already has is a no-op that still succeeds.
    again = json.loads(ok(host.ctl("--json", "partition", "apply", "--compute", "CPX", "--memory", "NPS4")))
    assert again["state"] == "OPERATION_STATE_SUCCEEDED" and "nothing to do" in again["progress"] + str(again["events"])


def test_bad_requests_change_nothing(host: Daemon) -> None:
    invalid = host.ctl("partition", "apply", "--compute", "SPX", "--memory", "NPS4")
    assert invalid.returncode == 1
    assert "layout SPX/NPS4: SPX needs memory partition NPS1" in invalid.stderr
    partial = host.ctl("partition", "plan", "--gpus", "0-1", "--compute", "CPX", "--memory", "NPS4")
    assert partial.returncode == 1 and "applies to every GPU of the hive" in partial.stderr
    missing = host.ctl("partition", "plan", "--gpus", "9", "--compute", "CPX")
    assert missing.returncode == 1 and "gpu 9: no such GPU" in missing.stderr
    usage = host.ctl("partition", "plan", "--gpus", "3-1", "--compute", "CPX")
    assert usage.returncode == 2 and "runs backwards" in usage.stderr
    denied = host.ctl("partition", "apply", "--compute", "CPX", user=OTHER_UID, group=OTHER_UID, extra_groups=[0])
    assert denied.returncode == 4 and "needs an admin" in denied.stderr
    as_member = host.ctl("partition", "plan", "--compute", "CPX", user=OTHER_UID, group=OTHER_UID, extra_groups=[0])
    assert ok(as_member).startswith("changes")
    bare = js(host, "allocate", "--memory", "1GiB", "--gpu", "3")
    blocked = host.ctl("partition", "apply", "--gpus", "3", "--compute", "CPX", "--drain")
    assert (
        blocked.returncode == 1
        and f"allocation {bare['id']}" in blocked.stderr
        and "release it first" in blocked.stderr
    )
    assert layouts(host) == {"SPX/NPS1"}
    assert host.ctl("operation", "show", "op-nothing").returncode == 1


def test_model_that_no_longer_fits_is_failed_with_the_reason(host: Daemon) -> None:
    ok(host.ctl("serve", "org/big", "--engine", "stub", "--name", "big", "--memory", "100GiB", "--wait"))
    operation = json.loads(
        ok(host.ctl("--json", "partition", "apply", "--compute", "CPX", "--memory", "NPS4", "--drain", "--wait"))
    )
    assert operation["state"] == "OPERATION_STATE_SUCCEEDED"
    assert "model big: no room on the new partition layout" in operation["progress"] + str(operation["events"])
    model = js(host, "show", "big")
    assert model["state"] == "MODEL_STATE_FAILED"
    assert "no room on the new partition layout" in model["last_error"]
    assert leaves(host) == set()
    assert js(host, "list").get("allocations", []) == []
    ok(host.ctl("stop", "big"))
    assert js(host, "models").get("models", []) == []


def test_busy_device_is_named_and_a_busy_switch_rolls_back(host: Daemon) -> None:
    holder = subprocess.Popen(["sleep", "300"])
    try:
        write_faults(host.state_dir, EmulatorFaults(holders=(FaultHolder(holder.pid, gpu=2, name="sleep"),)))
        plan = ok(host.ctl("partition", "plan", "--gpus", "2", "--compute", "CPX"))
        assert f"pid {holder.pid} root GPU 2 partition 0: sleep 300" in plan
        refused = host.ctl("partition", "apply", "--gpus", "2", "--compute", "CPX")
        assert refused.returncode == 1 and f"pid {holder.pid} 'sleep 300' of root (uid 0) on GPU 2" in refused.stderr
    finally:
        holder.kill()
        holder.wait()
    # A device held by something the process list does not show: the set fails BUSY mid-operation.
    write_faults(host.state_dir, EmulatorFaults(busy_gpus=(6,)))
    operation = json.loads(host.ctl("--json", "partition", "apply", "--compute", "CPX", "--wait").stdout)
    assert operation["state"] == "OPERATION_STATE_FAILED", operation
    assert operation["failed_step"] == "set_compute" and "BUSY" in operation["error"]
    assert layouts(host) == {"SPX/NPS1"}, "GPUs already switched were set back"
    assert js(host, "status")["partition_count"] == 8
    assert js(host, "status").get("degraded_gpus", []) == []
    shown = ok(host.ctl("operation", "show", operation["id"]))
    assert "rolled back: the GPUs are in their previous layout" in shown


def test_no_permission_and_a_failing_reload_roll_back(host: Daemon) -> None:
    write_faults(host.state_dir, EmulatorFaults(unprivileged=True))
    operation = wait_operation(host, js(host, "partition", "apply", "--compute", "CPX", "--memory", "NPS4")["id"])
    assert operation["state"] == "OPERATION_STATE_FAILED" and "NO_PERM" in operation["error"]
    assert operation["failed_step"] == "set_memory"
    write_faults(host.state_dir, EmulatorFaults(fail_reload="AMDGPU_RESTART_ERR"))
    operation = wait_operation(host, js(host, "partition", "apply", "--compute", "CPX", "--memory", "NPS4")["id"])
    assert operation["state"] == "OPERATION_STATE_FAILED" and "AMDGPU_RESTART_ERR" in operation["error"]
    assert operation["failed_step"] == "reload_driver"
    assert layouts(host) == {"SPX/NPS1"}
    # The staged NPS4 was withdrawn: a later reload must not switch the hive behind the operator's back.
    state = json.loads((host.state_dir / "emulated-host.json").read_text())
    assert state.get("staged_memory_partition") is None, state


def test_ignored_compute_set_fails_verify_and_a_failed_rollback_marks_gpus_degraded(host: Daemon) -> None:
    # Firmware that ignores the write: verify catches it, and the rollback (NPS back to NPS1) fixes it.
    write_faults(host.state_dir, EmulatorFaults(ignore_compute_set=(3,)))
    operation = wait_operation(host, js(host, "partition", "apply", "--compute", "QPX", "--memory", "NPS4")["id"])
    assert operation["state"] == "OPERATION_STATE_FAILED", operation
    assert operation["failed_step"] == "verify" and "GPU 3 is CPX/NPS4, planned QPX/NPS4" in operation["error"]
    assert layouts(host) == {"SPX/NPS1"}

    # Now the forward reload works but every later one fails: the rollback cannot bring NPS1 back.
    serve(host, "m0")
    write_faults(host.state_dir, EmulatorFaults(reload_seconds=2.0))
    started = js(host, "partition", "apply", "--compute", "QPX", "--memory", "NPS4", "--drain")["id"]
    deadline = time.monotonic() + PATIENCE
    while "reloading" not in js(host, "operation", "show", started)["progress"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    write_faults(host.state_dir, EmulatorFaults(busy_gpus=(4,), fail_reload="AMDGPU_RESTART_ERR", fail_reload_count=9))
    operation = wait_operation(host, started)
    assert operation["state"] == "OPERATION_STATE_DEGRADED", operation
    status = js(host, "status")
    assert len(status["degraded_gpus"]) == 8
    assert "could not restore SPX/NPS1" in status["degraded_gpus"][0]["reason"]
    refused = host.ctl("allocate", "--memory", "1GiB")
    assert refused.returncode == 1 and "no GPU is available" in refused.stderr
    assert "degraded" in ok(host.ctl("status"))

    model = js(host, "show", "m0")
    assert model["state"] == "MODEL_STATE_FAILED" and "no room on the new partition layout" in model["last_error"]
    assert len(model["last_error"]) < 600, "the reason stays readable"

    write_faults(host.state_dir, EmulatorFaults())
    cleared = ok(host.ctl("gpu", "clear", "4"))
    assert cleared.startswith("gpu 4: cleared (was: partition operation")
    assert host.ctl("gpu", "clear", "4").returncode == 1
    # The model the failed operation could not place goes back on the GPU the admin cleared.
    model = wait_ready(host, "m0")["m0"]
    assert js(host, "show", model["allocation_id"])["partitions"][0]["gpu_index"] == 4
    ok(host.ctl("allocate", "--memory", "1GiB", "--gpu", "4"))
    host.stop()
    host.start()
    assert len(js(host, "status")["degraded_gpus"]) == 7, "marks survive a restart"


@pytest.mark.parametrize("point", [f"{step}:{phase}" for step in STEP_ORDER for phase in ("started", "done")])
def test_daemon_killed_at_every_step_boundary_resumes_to_a_consistent_host(host: Daemon, point: str) -> None:
    old = serve(host, "m0", "--gpu", "1")
    host.stop()
    host.env = {"GPUSHARED_FAILPOINTS": point}
    host.start()
    wait_ready(host, "m0")
    host.ctl("partition", "apply", "--compute", "CPX", "--memory", "NPS4", "--drain")
    assert host.process is not None
    assert host.process.wait(PATIENCE) == -signal.SIGKILL, host.log()[-2000:]
    assert f"failpoint {point}: killing the daemon" in host.log()

    host.env = {}
    host.start()
    operations = js(host, "operation", "list")["operations"]
    assert len(operations) == 1
    assert operations[0]["state"] == "OPERATION_STATE_SUCCEEDED", operations[0]
    assert "resumed after a daemon restart" in str(operations[0]["events"])
    assert layouts(host) == {"CPX/NPS4"} and js(host, "status")["partition_count"] == 64
    model = wait_ready(host, "m0")["m0"]
    assert not alive(old), "the drained server is gone"
    assert leaves(host) == {"m0"}
    assert MOUNT is not None
    allocations = js(host, "list")["allocations"]
    assert [a["id"] for a in allocations] == [model["allocation_id"]], "no orphan allocation"
    assert js(host, "status").get("degraded_gpus", []) == []
    assert not (host.state_dir / "emulated-host.json").read_text().count('"staged_memory_partition": "NPS4"')
    # Every process in the model's leaf is the new server's (no orphan from the old one).
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except OSError:
            continue
        if cgroup.strip().endswith("/m0"):
            assert alive(pid)


FAKE_SYSTEMCTL = """#!/bin/sh
# Stands in for systemctl (no systemd runs as PID 1 here): one unit whose "service" is the holder process.
dir=$(dirname "$0")
echo "$*" >> "$dir/systemctl.log"
case "$1" in
  is-active) [ "$(cat "$dir/unit.state")" = active ] ;;
  stop) kill "$(cat "$dir/holder.pid")"; echo inactive > "$dir/unit.state" ;;
  start) echo active > "$dir/unit.state" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def host_with_exporter(tmp_short: Path) -> Iterator[tuple[Daemon, Path]]:
    tools = tmp_short / "tools"
    tools.mkdir()
    systemctl = tools / "systemctl"
    systemctl.write_text(FAKE_SYSTEMCTL)
    systemctl.chmod(0o755)
    (tools / "unit.state").write_text("active\n")
    config = f"""
[partitions]
holder_services = ["amd-metrics-exporter.service"]
systemctl = "{systemctl}"
"""
    with daemon_with_models(tmp_short, config) as d:
        yield d, tools


def test_device_holder_service_is_stopped_for_the_switch_and_started_after(
    host_with_exporter: tuple[Daemon, Path],
) -> None:
    host, tools = host_with_exporter
    # The "exporter": a process holding GPU 2, orphaned so that init reaps it once the unit is stopped.
    subprocess.run(["sh", "-c", f"sleep 300 & echo $! > {tools / 'holder.pid'}"], check=True)
    holder = int((tools / "holder.pid").read_text())
    write_faults(host.state_dir, EmulatorFaults(holders=(FaultHolder(holder, gpu=2, name="exporter"),)))
    plan = ok(host.ctl("partition", "plan", "--compute", "CPX"))
    assert f"pid {holder} root GPU 2" in plan and "services stopped around the switch: amd-metrics-exporter" in plan
    assert "refused" not in plan

    operation = json.loads(ok(host.ctl("--json", "partition", "apply", "--compute", "CPX", "--wait")))
    assert operation["state"] == "OPERATION_STATE_SUCCEEDED", operation
    assert operation["stopped_services"] == ["amd-metrics-exporter.service"]
    assert not alive(holder)
    calls = (tools / "systemctl.log").read_text().splitlines()
    assert calls == [
        "is-active --quiet amd-metrics-exporter.service",
        "stop amd-metrics-exporter.service",
        "start amd-metrics-exporter.service",
    ]
    assert (tools / "unit.state").read_text().strip() == "active"
    assert layouts(host) == {"CPX/NPS1"}


def test_configured_layout_is_applied_at_start_when_idle_and_reported_as_drift_otherwise(host: Daemon) -> None:
    assert host.config_path is not None
    serve(host, "m0")
    host.stop()
    base = host.config_path.read_text()
    host.config_path.write_text(base + '\n[partitions]\nlayout = [{gpus = "all", compute = "CPX", memory = "NPS4"}]\n')
    host.start()
    deadline = time.monotonic() + PATIENCE
    while not (status := js(host, "status")).get("drift"):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert "GPU 0: is SPX/NPS1, the configured layout says CPX/NPS4" in status["drift"]
    while "configured partition layout not applied to GPU 0-7" not in host.log():
        assert time.monotonic() < deadline, host.log()[-2000:]
        time.sleep(0.1)
    assert "model m0 on GPU 0: runs there" in host.log()
    assert "(drift)" in ok(host.ctl("partition", "show"))
    assert layouts(host) == {"SPX/NPS1"}, "never changed behind a running model's back"

    ok(host.ctl("stop", "m0"))
    host.stop()
    host.start()
    deadline = time.monotonic() + PATIENCE
    while layouts(host) != {"CPX/NPS4"}:
        assert time.monotonic() < deadline, host.log()[-2000:]
        time.sleep(0.1)
    operations = js(host, "operation", "list")["operations"]
    assert [op["state"] for op in operations] == ["OPERATION_STATE_SUCCEEDED"]
    deadline = time.monotonic() + PATIENCE
    while js(host, "status").get("drift"):
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_a_stopping_daemon_answers_calls_in_flight_and_refuses_new_ones(host: Daemon) -> None:
    write_faults(host.state_dir, EmulatorFaults(reload_seconds=3.0))
    started = js(host, "partition", "apply", "--compute", "CPX", "--memory", "NPS4")["id"]
    deadline = time.monotonic() + PATIENCE
    while "reloading" not in js(host, "operation", "show", started)["progress"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # A plan observes the hardware, which is busy reloading for a few seconds: the call is in flight...
    argv = [
        sys.executable,
        "-m",
        "gpusharectl",
        "--socket",
        str(host.socket),
        "partition",
        "plan",
        "--compute",
        "SPX",
        "--memory",
        "NPS1",
    ]
    in_flight = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert host.process is not None
    host.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while host.socket.exists():
        assert time.monotonic() < deadline, "the public socket goes at once"
        time.sleep(0.02)
    refused = host.ctl("status")
    assert refused.returncode == 3, refused.stderr
    out, err = in_flight.communicate(timeout=PATIENCE)
    assert in_flight.returncode == 0, err
    assert out.startswith("changes"), "...and its answer still arrives"
    assert host.process.wait(PATIENCE) == 0
