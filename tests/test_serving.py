"""Serving end to end: a real daemon starts a stub engine in a real cgroup leaf, survives kill -9, stops cleanly."""

from __future__ import annotations

import contextlib
import grp
import json
import os
import secrets
import signal
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpushared.adapters.cgroupfs import find_cgroup2_mount
from tests.conftest import OTHER_UID, Daemon, _world_readable_source, destroy_cgroup

MOUNT = find_cgroup2_mount()


@contextlib.contextmanager
def daemon_with_models(tmp_short: Path, models_config: str) -> Iterator[Daemon]:
    """A daemon with its own cgroup subtree for model leaves; the subtree is destroyed afterwards."""
    if MOUNT is None:
        pytest.fail("these tests need a writable cgroup v2 mount; none is mounted")
    tmp_short.chmod(0o755)
    root = MOUNT / f"gpushare-test-{secrets.token_hex(4)}"
    low = 18100 + os.getpid() % 500 * 2
    config = f"""
[daemon]
socket_group = ""
[models]
cgroup_root = "{root}"
port_range = "{low}-{low + 99}"
{models_config}
"""
    d = Daemon(tmp_short, config=config)
    try:
        d.start()
        yield d
    finally:
        if d.process is not None and d.process.poll() is None:
            d.stop()
        destroy_cgroup(root)


@pytest.fixture
def serving(tmp_short: Path) -> Iterator[Daemon]:
    stub = _world_readable_source() / "gpushared" / "stub_engine.py"
    config = f"""
stub_launcher = ["{sys.executable}", "-I", "{stub}"]
grace_seconds = 3
probe_interval_seconds = 0.5
"""
    with daemon_with_models(tmp_short, config) as d:
        yield d


def show(d: Daemon, name: str) -> dict[str, object]:
    result = d.ctl("--json", "show", name)
    assert result.returncode == 0, result.stderr
    model: dict[str, object] = json.loads(result.stdout)
    return model


def proc_status(pid: int) -> dict[str, str]:
    return dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return "Z" not in proc_status(pid).get("State", "")


def test_serve_answer_survive_daemon_kill_and_stop(serving: Daemon) -> None:
    result = serving.ctl("serve", "stub-org/tiny", "--engine", "stub", "--name", "tiny", "--memory", "8GiB", "--wait")
    assert result.returncode == 0, result.stderr + result.stdout
    assert result.stdout.strip().splitlines()[-1].startswith("tiny: ready  http://127.0.0.1:")
    model = show(serving, "tiny")
    pid = int(str(model["pid"]))
    assert model["state"] == "MODEL_STATE_READY"
    # This host's cgroup2 has no controllers: the limits are reported as not applied, plainly.
    assert "pids.max=8192 not applied: the pids controller is not enabled" in serving.log()
    endpoint = str(model["endpoint"])
    # The child runs as the service account (nobody here), never as root, inside its own leaf.
    assert proc_status(pid)["Uid"].split()[0] not in ("0", "")
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    assert cgroup.strip().endswith("/tiny")
    argv = model["argv"]
    assert isinstance(argv, list)
    assert "--gpu-memory-utilization" in argv and "--disable-log-stats" not in argv
    request = urllib.request.Request(
        f"{endpoint}/completions",
        data=json.dumps({"model": "stub-org/tiny", "prompt": "Hello", "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        answer = json.load(response)
    assert answer["choices"][0]["text"]

    table = serving.ctl("models").stdout.splitlines()
    assert table[1].split()[:3] == ["tiny", "stub-org/tiny", "ready"]
    shown = serving.ctl("show", "tiny").stdout
    assert "pending -> starting: launched pid" in shown
    assert "starting -> ready: GET /health 200 and /v1/models lists 'stub-org/tiny'" in shown
    uptime = next(line for line in shown.splitlines() if line.startswith("uptime"))
    assert uptime.split()[1].endswith("s") and uptime.split()[1] != "-"

    # kill -9 of the daemon: the model keeps running and is re-adopted, not restarted.
    serving.stop(signal.SIGKILL)
    assert alive(pid)
    serving.start()
    for _ in range(100):
        model = show(serving, "tiny")
        if model["state"] == "MODEL_STATE_READY":
            break
        time.sleep(0.1)
    assert model["state"] == "MODEL_STATE_READY"
    assert int(str(model["pid"])) == pid
    assert model.get("restarts", 0) == 0
    assert "re-adopted model tiny" in serving.log()

    # Stop kills the whole tree and releases the allocation.
    result = serving.ctl("stop", "tiny")
    assert result.returncode == 0, result.stderr
    assert not alive(pid)
    listed = json.loads(serving.ctl("--json", "models").stdout)
    assert listed.get("models", []) == []
    assert json.loads(serving.ctl("--json", "list").stdout).get("allocations", []) == []


def test_serve_runs_as_the_caller_and_hostile_specs_start_nothing(serving: Daemon) -> None:
    bad = [
        (("serve", "--trust-remote-code", "--engine", "stub"), 2),
        (("serve", "../../etc/shadow", "--engine", "stub", "--name", "x"), 1),
        (("serve", "org/m", "--engine", "stub", "--name", "y", "--option", "trust-remote=1"), 1),
        (("serve", "org/m", "--engine", "stub", "--name", "z", "--option", "enable-prefix-caching"), 1),
    ]
    for args, code in bad:
        result = serving.ctl(*args)
        assert result.returncode == code, (args, result.stderr)
    private = serving.root / "private-model"
    private.mkdir(mode=0o700)
    unreadable = serving.ctl(
        "serve", str(private), "--engine", "stub", "--name", "p", user=OTHER_UID, group=OTHER_UID, extra_groups=[0]
    )
    assert unreadable.returncode == 4
    assert f"uid {OTHER_UID}, which the model runs as, cannot read it" in unreadable.stderr
    assert json.loads(serving.ctl("--json", "models").stdout).get("models", []) == []
    assert json.loads(serving.ctl("--json", "list").stdout).get("allocations", []) == []

    result = serving.ctl(
        "serve",
        "org/small",
        "--engine",
        "stub",
        "--name",
        "mine",
        "--memory",
        "4GiB",
        "--wait",
        user=OTHER_UID,
        group=OTHER_UID,
        extra_groups=[0],
    )
    assert result.returncode == 0, result.stderr
    again = serving.ctl("serve", "org/small", "--engine", "stub", "--name", "mine", "--memory", "4GiB")
    assert again.returncode == 1
    assert "model mine: a model of that name exists (" in again.stderr
    assert len(json.loads(serving.ctl("--json", "list").stdout)["allocations"]) == 1, "the refused serve left nothing"
    model = show(serving, "mine")
    pid = int(str(model["pid"]))
    assert proc_status(pid)["Uid"].split()[0] == str(OTHER_UID)
    # Its own gid and the GPU device group (video here; render exists only on ROCm hosts), never root's 0.
    assert sorted(proc_status(pid)["Groups"].split()) == sorted([str(OTHER_UID), str(grp.getgrnam("video").gr_gid)])
    assert model["owner_uid"] == OTHER_UID
    refused = serving.ctl("stop", "mine", user=OTHER_UID + 1, group=OTHER_UID + 1, extra_groups=[0])
    assert refused.returncode == 4
    kept = serving.ctl("stop", "mine", "--keep-allocation", user=OTHER_UID, group=OTHER_UID, extra_groups=[0])
    assert kept.returncode == 0, kept.stderr
    assert not alive(pid)
    blocked = serving.ctl("serve", "org/small", "--engine", "stub", "--name", "mine")
    assert blocked.returncode == 1
    assert "(stopped)" in blocked.stderr and "`gpusharectl stop NAME` releases it" in blocked.stderr
    assert serving.ctl("release", str(model["allocation_id"])).returncode == 0, "release stops the model first"
    assert json.loads(serving.ctl("--json", "models").stdout).get("models", []) == []


def test_daemon_kill_with_eight_models_readopts_all_with_no_restart(serving: Daemon) -> None:
    for n in range(8):
        result = serving.ctl("serve", f"org/m{n}", "--engine", "stub", "--name", f"m{n}", "--memory", "2GiB")
        assert result.returncode == 0, result.stderr
    pids: dict[str, int] = {}
    for _ in range(300):
        models = json.loads(serving.ctl("--json", "models").stdout)["models"]
        if all(m["state"] == "MODEL_STATE_READY" for m in models):
            pids = {m["name"]: int(m["pid"]) for m in models}
            break
        time.sleep(0.1)
    assert len(pids) == 8, "all eight models reach READY"
    serving.stop(signal.SIGKILL)
    serving.start()
    for _ in range(300):
        models = json.loads(serving.ctl("--json", "models").stdout)["models"]
        if all(m["state"] == "MODEL_STATE_READY" for m in models):
            break
        time.sleep(0.1)
    assert {m["name"]: int(m["pid"]) for m in models} == pids, "same processes, re-adopted"
    assert all(m.get("restarts", 0) == 0 for m in models)
    assert serving.log().count("re-adopted model") == 8


def test_logs_are_the_owners_and_follow_rotation(serving: Daemon, tmp_short: Path) -> None:
    result = serving.ctl("serve", "org/logged", "--engine", "stub", "--name", "logged", "--memory", "2GiB", "--wait")
    assert result.returncode == 0, result.stderr
    lines = serving.ctl("logs", "logged", "-n", "3")
    assert lines.returncode == 0, lines.stderr
    assert 0 < len(lines.stdout.splitlines()) <= 3
    everything = serving.ctl("logs", "logged", "-n", "10000").stdout
    assert "gpushare-stub-engine start" in everything
    assert "Application startup complete." in everything
    denied = serving.ctl("logs", "logged", user=OTHER_UID, group=OTHER_UID, extra_groups=[0])
    assert denied.returncode == 4
    assert "only the model's owner or an admin may read it" in denied.stderr
    missing = serving.ctl("logs", "nothing")
    assert missing.returncode == 1
    assert "model 'nothing': no such model" in missing.stderr


def wait_state(d: Daemon, name: str, state: str) -> dict[str, object]:
    for _ in range(300):
        model = show(d, name)
        if model["state"] == state:
            return model
        time.sleep(0.1)
    pytest.fail(f"model {name} never reached {state}: {model}")


def start_seconds(d: Daemon, name: str) -> list[float]:
    db = sqlite3.connect(f"file:{d.state_dir / 'gpushared.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT start_seconds FROM model WHERE name = ?", (name,)).fetchone()
    finally:
        db.close()
    durations: list[float] = json.loads(row[0])
    return durations


def models_get(endpoint: str, key: str | None) -> int:
    request = urllib.request.Request(f"{endpoint}/models")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_api_key_is_required_kept_across_daemon_restarts_and_never_shown(serving: Daemon, tmp_short: Path) -> None:
    key = "gs-" + secrets.token_hex(16)
    key_file = tmp_short / "key"
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    result = serving.ctl(
        "serve", "org/keyed", "--engine", "stub", "--name", "keyed", "--memory", "2GiB",
        "--api-key-file", str(key_file), "--wait",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
    model = show(serving, "keyed")
    endpoint, pid = str(model["endpoint"]), int(str(model["pid"]))
    assert model["api_key_required"] is True
    assert models_get(endpoint, None) == 401
    assert models_get(endpoint, key) == 200, "the probe sent the key, or the model would not be READY"
    assert "requires its API key" in serving.ctl("show", "keyed").stdout
    assert f"VLLM_API_KEY={key}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes(), "argv is world-readable"
    for shown in (serving.ctl("--json", "show", "keyed").stdout, serving.ctl("--json", "models").stdout):
        assert key not in shown
    listed = serving.ctl("list").stdout.splitlines()
    assert listed[1].split()[2] == "keyed", "the allocation names the model on it"
    assert len(start_seconds(serving, "keyed")) == 1, "the start duration is recorded"

    # The daemon dies and the child dies while it is down: the next daemon restarts it with the same key.
    serving.stop(signal.SIGKILL)
    os.kill(pid, signal.SIGKILL)
    serving.start()
    model = wait_state(serving, "keyed", "MODEL_STATE_READY")
    assert int(str(model["pid"])) != pid
    assert models_get(str(model["endpoint"]), key) == 200
    assert models_get(str(model["endpoint"]), None) == 401
    assert len(start_seconds(serving, "keyed")) == 2, "earlier starts survived the daemon restart"
    assert key not in serving.log()


def test_bad_api_keys_are_refused_and_start_nothing(serving: Daemon, tmp_short: Path) -> None:
    empty = tmp_short / "empty"
    empty.write_text("\n")
    spaced = tmp_short / "spaced"
    spaced.write_text("two words\n")
    for path, code, message in (
        (empty, 2, f"--api-key-file {empty}: the first line is empty"),
        (tmp_short / "missing", 2, f"--api-key-file {tmp_short / 'missing'}: cannot read it"),
        (spaced, 1, "api key: must be 1-512 visible ASCII characters"),
    ):
        result = serving.ctl("serve", "org/k", "--engine", "stub", "--name", "k", "--api-key-file", str(path))
        assert result.returncode == code, result.stderr
        assert message in result.stderr
    assert json.loads(serving.ctl("--json", "models").stdout).get("models", []) == []
    assert json.loads(serving.ctl("--json", "list").stdout).get("allocations", []) == []


OLD_VLLM = """#!/bin/sh
# Stands in for an older vLLM: its serve --help=all lists no --disable-prefix-caching and no
# --kv-cache-memory-bytes (the real 0.32 check is tests/test_vllm_argv_parser.py); otherwise it runs the stub.
if [ "$1" = serve ] && [ "$2" = --help=all ]; then
  echo "$0 $*" >> "$(dirname "$0")/probes.log"
  cat <<'HELP'
usage: vllm serve [model_tag] [options]
  --host HOST  --port PORT  --served-model-name NAME [NAME ...]
  --tensor-parallel-size, -tp TENSOR_PARALLEL_SIZE  --gpu-memory-utilization GPU_MEMORY_UTILIZATION
  --dtype {auto,half,float16,bfloat16,float,float32}  --max-model-len MAX_MODEL_LEN
  --max-num-seqs MAX_NUM_SEQS  --enable-prefix-caching, --no-enable-prefix-caching
HELP
  exit 0
fi
exec /usr/bin/env GPUSHARE_STUB_LOAD_SECONDS=0.2 "@PYTHON@" -I "@STUB@" "$@"
"""


def test_options_the_installed_vllm_does_not_know_are_refused_before_anything_starts(tmp_short: Path) -> None:
    tools = tmp_short / "tools"
    tools.mkdir()
    tools.chmod(0o755)
    launcher = tools / "vllm"
    stub = _world_readable_source() / "gpushared" / "stub_engine.py"
    launcher.write_text(OLD_VLLM.replace("@PYTHON@", sys.executable).replace("@STUB@", str(stub)))
    launcher.chmod(0o755)
    config = f"""
vllm_launcher = ["{launcher}"]
option_allowlist = ["enable-prefix-caching"]
"""
    with daemon_with_models(tmp_short, config) as d:
        refused = d.ctl("serve", "org/m", "--name", "m", "--memory", "2GiB", "--option", "disable-prefix-caching")
        assert refused.returncode == 1
        assert f"option --disable-prefix-caching: the installed vLLM ({launcher}) does not know it" in refused.stderr
        kv = d.ctl("serve", "org/m", "--name", "m", "--memory", "2GiB", "--kv-cache-bytes", "1GiB")
        assert kv.returncode == 1 and "option --kv-cache-memory-bytes" in kv.stderr
        assert json.loads(d.ctl("--json", "list").stdout).get("allocations", []) == [], "nothing allocated"
        result = d.ctl(
            "serve", "org/m", "--name", "m", "--memory", "2GiB", "--option", "no-enable-prefix-caching", "--wait"
        )
        assert result.returncode == 0, result.stderr + d.log()[-2000:]
        assert "--no-enable-prefix-caching" in show(d, "m")["argv"]  # type: ignore[operator]
        # Asked once: later serves and the next daemon read the cache in the state directory.
        d.stop()
        d.start()
        again = d.ctl("serve", "org/m2", "--name", "m2", "--memory", "2GiB", "--option", "disable-prefix-caching")
        assert again.returncode == 1 and "does not know it" in again.stderr
        assert len((tools / "probes.log").read_text().splitlines()) == 1
        assert d.ctl("stop", "m").returncode == 0
