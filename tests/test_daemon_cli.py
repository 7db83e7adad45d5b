"""End to end: a real gpushared process on the emulated host, driven by the real gpusharectl CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from tests.conftest import REPO, Daemon

MIB = 1024 * 1024
GIB = 1024 * MIB


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
    assert result.stderr == ""
    return result.stdout


def test_gpus_lists_eight_mi300x_in_spx_nps1(daemon: Daemon) -> None:
    lines = ok(daemon.ctl("gpus")).splitlines()
    assert lines[0].split() == [
        "GPU",
        "BDF",
        "MODEL",
        "COMPUTE",
        "MEMORY",
        "PARTITIONS",
        "VRAM",
        "ALLOCATED",
        "FREE",
        "PER",
        "POOL",
    ]
    assert len(lines) == 9
    for index, line in enumerate(lines[1:]):
        assert line.startswith(f"{index}  ")
        assert "AMD Instinct MI300X" in line
        assert line.split()[5:] == ["SPX", "NPS1", "1", "196592", "MiB", "0", "B", "196592", "MiB"]
    gpus = json.loads(ok(daemon.ctl("--json", "gpus")))["gpus"]
    assert json.loads(ok(daemon.ctl("gpus", "--json")))["gpus"] == gpus
    assert len(gpus) == 8
    assert {g["memory_total_bytes"] for g in gpus} == {str(196592 * MIB)}
    assert {g["compute_partition"] for g in gpus} == {"COMPUTE_PARTITION_SPX"}
    assert gpus[0]["memory_pools"] == [
        {
            "index": 0,
            "total_bytes": str(196592 * MIB),
            "allocated_bytes": "0",
            "free_bytes": str(196592 * MIB),
            "partition_ids": [0],
        }
    ]


def test_partitions_lists_eight_with_identifiers(daemon: Daemon) -> None:
    partitions = json.loads(ok(daemon.ctl("--json", "partitions")))["partitions"]
    assert len(partitions) == 8
    for gpu, part in enumerate(partitions):
        assert part["gpu_index"] == gpu
        assert part["partition_id"] == 0
        assert part["bdf"].endswith(".0")
        assert part["render_node"] == f"/dev/dri/renderD{128 + 8 * gpu}"
        assert part["hip_index"] == gpu
        assert part["state"] == "PARTITION_STATE_FREE"
    table = ok(daemon.ctl("partitions")).splitlines()
    assert len(table) == 9
    assert table[1].split()[:8] == ["0", "0", partitions[0]["bdf"], "/dev/dri/renderD128", "0", "0", "196592", "MiB"]


def test_allocate_list_show_release_and_restart(daemon: Daemon) -> None:
    shown = json.loads(ok(daemon.ctl("--json", "allocate", "--memory", "40GiB", "--name", "llama-8b")))
    allocation_id = shown["id"]
    assert shown["memory_bytes_total"] == str(40 * GIB)
    assert shown["name"] == "llama-8b"
    assert shown["owner_uid"] == 0
    assert shown["environment"]["HIP_VISIBLE_DEVICES"] == "0"
    assert shown["environment"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert shown["device_nodes"] == ["/dev/kfd", "/dev/dri/renderD128"]
    assert shown["placement_reason"].startswith("GPU 0 partition 0 (SPX/NPS1): spread:")

    second = ok(daemon.ctl("allocate", "--memory", "100GiB", "--partitions", "2", "--policy", "pack"))
    assert "memory      100 GiB (50 GiB per partition, 53687091200 bytes)" in second
    listed = ok(daemon.ctl("list")).splitlines()
    assert listed[0].split()[:6] == ["ID", "NAME", "MODEL", "OWNER", "GPU/PART", "MEMORY"]
    assert listed[1].split()[2] == "-", "no model runs on a bare allocation"
    assert len(listed) == 3
    assert allocation_id in listed[1]
    assert "llama-8b" in listed[1]
    assert "40 GiB" in listed[1]

    exports = ok(daemon.ctl("allocate", "--memory", "1GiB", "--env")).splitlines()
    env = dict(line.removeprefix("export ").split("=", 1) for line in exports)
    assert set(env) == {
        "CUDA_VISIBLE_DEVICES",
        "GPUSHARE_ALLOCATION_ID",
        "GPUSHARE_MEMORY_BYTES_PER_PARTITION",
        "HIP_VISIBLE_DEVICES",
    }
    assert env["GPUSHARE_MEMORY_BYTES_PER_PARTITION"] == str(GIB)

    before = json.loads(ok(daemon.ctl("--json", "list")))
    daemon.restart()
    after = json.loads(ok(daemon.ctl("--json", "list")))
    assert after == before, "a restart must keep every allocation exactly"

    released = ok(daemon.ctl("release", allocation_id))
    assert released.strip() == f"released {allocation_id} (0/0, 40 GiB)"
    result = daemon.ctl("show", allocation_id)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"gpusharectl: allocation {allocation_id}: no such allocation (hint: list them with `gpusharectl list`)"
    )
    status = json.loads(ok(daemon.ctl("--json", "status")))
    assert status["backend"] == "emulated"
    assert status["allocation_count"] == 2
    assert status["caller"]["uid"] == 0
    assert status["caller"]["admin"] is True


def test_refusals_are_one_line_with_exit_1(daemon: Daemon) -> None:
    result = daemon.ctl("allocate", "--memory", "200GiB")
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "gpusharectl: memory: 200 GiB exceeds the largest partition cap, 196592 MiB on GPU 0 (SPX) "
        "(hint: ask for less memory or split it over more partitions (--partitions N))"
    )
    for _ in range(8):
        ok(daemon.ctl("allocate", "--memory", "1GiB"))
    result = daemon.ctl("allocate", "--memory", "1GiB")
    assert result.returncode == 1
    assert "partitions: 1 needed but only 0 of 8 are free" in result.stderr
    result = daemon.ctl("allocate", "--memory", "1GiB", "--gpu", "12")
    assert result.returncode == 1
    assert result.stderr.strip() == "gpusharectl: gpu 12: no such GPU (hint: this host has GPUs 0-7)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("allocate", "--memory=-5GiB"), "--memory: cannot read '-5GiB' as a size"),
        (("allocate", "--memory", "-5GiB"), "argument --memory: expected one argument"),
        (("allocate", "--memory", "12XB"), "--memory: unknown unit 'XB'"),
        (("allocate", "--memory", "1GiB", "--partitions", "-1"), "-1 is negative"),
        (("allocate",), "the following arguments are required: --memory"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(daemon: Daemon, args: tuple[str, ...], message: str) -> None:
    result = daemon.ctl(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_health_and_unreachable(daemon: Daemon, tmp_short: Path) -> None:
    assert ok(daemon.ctl("health")).strip() == "SERVING"
    assert ok(daemon.ctl("health", "--service", "gpushare.v1.Gpushare")).strip() == "SERVING"
    missing = tmp_short / "nothing.sock"
    result = subprocess.run(
        [sys.executable, "-m", "gpusharectl", "--socket", str(missing), "status"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 3
    assert result.stderr.startswith(
        f"gpusharectl: {missing}: no such socket; gpushared is not running there (hint: start it"
    )
    dead = tmp_short / "dead.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(dead))
    listener.close()  # a socket file with nobody listening: connection refused
    result = subprocess.run(
        [sys.executable, "-m", "gpusharectl", "status"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "GPUSHARE_SOCKET": str(dead)},
    )
    assert result.returncode == 3
    assert "connection refused; gpushared is not running" in result.stderr


def test_sigterm_stops_cleanly_and_removes_socket(daemon: Daemon) -> None:
    assert daemon.stop(signal.SIGTERM) == 0
    assert not daemon.socket.exists()
    assert "level=info logger=gpushared msg=stopped" in daemon.log()


def test_second_daemon_is_refused_and_the_first_keeps_serving(daemon: Daemon, tmp_short: Path) -> None:
    same_state = Daemon(daemon.root)
    same_state.log_path = tmp_short / "same-state.log"
    same_state.socket = tmp_short / "other.sock"
    same_state.start(wait=False)
    assert same_state.process is not None
    assert same_state.process.wait(30) == 1
    assert same_state.log().strip().splitlines()[-1] == (
        f"gpushared: error: state directory {daemon.state_dir}: another gpushared (pid {daemon.process.pid}) "
        "is using it (hint: stop that one first, or give this one its own --state-dir)"
    )
    same_socket = Daemon(daemon.root)
    same_socket.log_path = tmp_short / "same-socket.log"
    same_socket.state_dir = tmp_short / "state2"
    same_socket.start(wait=False)
    assert same_socket.process is not None
    assert same_socket.process.wait(30) == 1
    assert (
        same_socket.log()
        .strip()
        .splitlines()[-1]
        .startswith(f"gpushared: error: socket {daemon.socket}: another gpushared is already serving on it")
    )
    ok(daemon.ctl("status"))


def test_corrupt_state_is_a_startup_error(tmp_short: Path) -> None:
    (tmp_short / "state").mkdir()
    (tmp_short / "state" / "gpushared.db").write_bytes(b"garbage" * 1000)
    d = Daemon(tmp_short).start(wait=False)
    assert d.process is not None
    assert d.process.wait(30) == 1
    line = d.log().strip().splitlines()[-1]
    assert line.startswith(
        f"gpushared: error: state file {tmp_short}/state/gpushared.db: not a usable gpushared database"
    )
    assert "move the file aside" in line


def test_no_amdsmi_is_a_clear_startup_error_never_the_emulator(tmp_short: Path) -> None:
    # This machine has no ROCm: the default backend must fail loudly, naming --emulate.
    d = Daemon(tmp_short, gpus=None).start(wait=False)
    assert d.process is not None
    assert d.process.wait(30) == 69, "EX_UNAVAILABLE: the unit does not restart on it"
    lines = d.log().strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("gpushared: error: amdsmi:")
    assert "--emulate" in lines[0]
    assert not d.socket.exists()


def test_fake_amdsmi_backend_serves_end_to_end(tmp_short: Path) -> None:
    config = tmp_short / "fake-amdsmi.json"
    config.write_text(json.dumps({"gpu_count": 8, "compute": "CPX", "memory": "NPS4"}))
    d = Daemon(tmp_short, gpus=None)
    env_path = str(REPO / "tests" / "fakes")
    with d.log_path.open("ab") as log:
        d.process = subprocess.Popen(
            d.argv(),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": env_path, "GPUSHARE_FAKE_AMDSMI": str(config)},
        )
    try:
        d.wait_serving()
        status = json.loads(ok(d.ctl("--json", "status")))
        assert status["backend"] == "amdsmi"
        assert status["partition_count"] == 64
        allocation = json.loads(ok(d.ctl("--json", "allocate", "--memory", "20GiB", "--compute", "CPX")))
        assert allocation["partitions"][0]["memory_pool"] == 0
    finally:
        assert d.stop() == 0, d.log()


def test_server_reflection_lists_the_services(daemon: Daemon) -> None:
    with grpc.insecure_channel(f"unix:{daemon.socket}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"gpushare.v1.Gpushare", "grpc.health.v1.Health"} <= services
        descriptor = database.FindFileContainingSymbol("gpushare.v1.Gpushare")
        assert descriptor.package == "gpushare.v1"


def test_missing_socket_directory_is_created(tmp_short: Path) -> None:
    # As /run/gpushared when gpushared runs outside systemd (no RuntimeDirectory=).
    d = Daemon(tmp_short)
    d.socket = tmp_short / "run" / "gpushared" / "gpushared.sock"
    d.start()
    try:
        assert (tmp_short / "run" / "gpushared").stat().st_mode & 0o777 == 0o755
        ok(d.ctl("status"))
    finally:
        assert d.stop() == 0, d.log()
