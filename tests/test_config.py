"""Strict configuration parsing, --check-config, and what SIGHUP may change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gpushared.config import DaemonConfig, load_config, reload_changes
from gpushared.domain.allocation import PlacementPolicy, Quota
from gpushared.domain.errors import ConfigError
from gpushared.domain.gpu import GIB, ComputePartition, MemoryPartition
from gpushared.domain.partitioning import GpuLayout

FULL = """
[daemon]
backend = "emulated"
socket = "/run/gs/api.sock"
socket_group = "gpushare"
socket_mode = "0660"
admin_group = "wheel"
state_dir = "/var/lib/gs"
log_level = "debug"

[emulator]
gpu_count = 4

[allocation]
default_policy = "pack"

[quota]
max_allocations = 8
max_memory = "400GiB"

[quota.users.alice]
max_allocations = 2

[quota.users."1001"]
max_memory = 1073741824
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gpushared.toml"
    path.write_text(text)
    return path


def test_full_file(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, FULL))
    assert config.backend == "emulated"
    assert config.socket == Path("/run/gs/api.sock")
    assert config.admin_group == "wheel"
    assert config.emulated_gpu_count == 4
    assert config.default_policy is PlacementPolicy.PACK
    assert config.default_quota == Quota(max_allocations=8, max_memory_bytes=400 * GIB)
    assert config.user_quotas == {"alice": Quota(max_allocations=2), "1001": Quota(max_memory_bytes=GIB)}


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, ""))
    assert config.socket == Path("/run/gpushared/gpushared.sock")
    assert config.state_dir == Path("/var/lib/gpushared")
    assert config.default_quota == Quota()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[daemon]\nsockett = '/x'\n", "unknown key daemon.sockett"),
        ("[deamon]\n", r"unknown section \[deamon\]"),
        ("[daemon]\nsocket = 5\n", "daemon.socket must be a str, not int"),
        ("[emulator]\ngpu_count = true\n", "emulator.gpu_count must be a int, not bool"),
        ("[emulator]\ngpu_count = 9\n", "emulator.gpu_count = 9 is out of range"),
        ("[daemon]\nsocket = 'relative.sock'\n", "must be an absolute path"),
        ("[daemon]\nsocket_mode = '0666'\n", "lets every user on the host connect"),
        ("[daemon]\nsocket_mode = 'rw'\n", "is not an octal mode"),
        ("[daemon]\nbackend = 'cuda'\n", "daemon.backend = 'cuda' is not one of amdsmi, emulated"),
        ("[allocation]\ndefault_policy = 'random'\n", "is not one of spread, pack"),
        ("[quota]\nmax_memory = 'lots'\n", "quota.max_memory: cannot read 'lots' as a size"),
        ("[quota]\nmax_allocations = -1\n", "quota.max_allocations must be 0"),
        ("[quota.users.bob]\nmax_gpus = 1\n", "unknown key quota.users.bob.max_gpus"),
        ("daemon = 3\n", "daemon must be a table"),
        ("[daemon\n", "not valid TOML"),
        ("[models]\npids_max = -1\n", "models.pids_max = -1 is out of range"),
        ("[models]\ncpu_weight = 0\n", "models.cpu_weight = 0 is out of range"),
        ("[models]\nport_range = '80-90'\n", "is not LOW-HIGH within 1024-65535"),
        ("[models]\noption_allowlist = ['no-such-flag']\n", "models.option_allowlist"),
        ("[models]\nvllm_launcher = []\n", "must be a non-empty list of strings"),
        ("[models]\ngrace_seconds = 0\n", "models.grace_seconds must be more than 0"),
        ("[models]\ncompletion_probe_interval_seconds = -1\n", "must be 0 \\(off\\) or more"),
        ("[models]\ncompletion_probe_timeout_seconds = 0\n", "completion_probe_timeout_seconds must be more than 0"),
        ("[partitions]\nlayout = [{gpus = 'all', compute = 'SPX', memory = 'NPS4'}]\n", "SPX needs memory partition"),
        ("[partitions]\nlayout = [{gpus = 'all', compute = 'CPX'}]\n", r"partitions.layout\[0\].memory is missing"),
        ("[partitions]\nlayout = [{gpus = '0-9', compute = 'CPX', memory = 'NPS1'}]\n", "gpu 8: no such GPU"),
        ("[partitions]\nlayout = [{gpus = 'all', compute = 'TPX', memory = 'NPS1'}]\n", "'TPX' is not one of"),
        ("[partitions]\nlayout = [{gpus = '0', compute = 'CPX', memory = 'NPS1', extra = 1}]\n", "unknown key"),
        ("[partitions]\nlayout = ['0-3']\n", "must be a table"),
        (
            "[partitions]\nlayout = [{gpus = '0-3', compute = 'CPX', memory = 'NPS4'},"
            " {gpus = '3-7', compute = 'SPX', memory = 'NPS1'}]\n",
            "GPU 3 is already in an earlier entry",
        ),
        (
            "[partitions]\nlayout = [{gpus = '0-3', compute = 'CPX', memory = 'NPS4'},"
            " {gpus = '4-7', compute = 'SPX', memory = 'NPS1'}]\n",
            "mixes memory partitions NPS1, NPS4",
        ),
        ("[partitions]\nholder_services = ['']\n", "must be a list of non-empty strings"),
        ("[partitions]\nreload_timeout_seconds = 0\n", "reload_timeout_seconds must be more than 0"),
    ],
)
def test_errors_name_the_key_and_file(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_completion_probe_is_off_unless_configured(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).serving.completion_probe_interval == 0.0
    config = load_config(
        write(tmp_path, "[models]\ncompletion_probe_interval_seconds = 60\ncompletion_probe_timeout_seconds = 20\n")
    )
    assert (config.serving.completion_probe_interval, config.serving.completion_probe_timeout) == (60.0, 20.0)


def test_partitions_section(tmp_path: Path) -> None:
    config = load_config(
        write(
            tmp_path,
            """
[partitions]
layout = [{gpus = "0-3", compute = "cpx", memory = "NPS4"}, {gpus = "4-7", compute = "QPX", memory = "NPS4"}]
holder_services = ["amd-metrics-exporter.service"]
reload_command = ["/bin/sh", "-c", "modprobe -r amdgpu && modprobe amdgpu"]
reload_timeout_seconds = 200
systemctl = "/bin/systemctl"
""",
        )
    ).partitions
    assert config.layout[0] == GpuLayout(ComputePartition.CPX, MemoryPartition.NPS4)
    assert config.layout[7] == GpuLayout(ComputePartition.QPX, MemoryPartition.NPS4)
    assert config.layout_warnings == (
        "QPX/NPS4 is allowed by the kernel but not validated by AMD on MI300X (validated: SPX/NPS1 and CPX/NPS4)",
    )
    assert config.holder_services == ("amd-metrics-exporter.service",)
    assert config.reload_command[0] == "/bin/sh" and config.reload_timeout_seconds == 200.0
    assert config.systemctl == "/bin/systemctl"
    assert load_config(write(tmp_path, "")).partitions.layout == {}


def test_missing_explicit_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_reload_applies_only_reloadable_fields() -> None:
    old = DaemonConfig()
    new = DaemonConfig(log_level="debug", socket=Path("/elsewhere.sock"), default_policy=PlacementPolicy.PACK)
    merged, applied, ignored = reload_changes(old, new)
    assert applied == ["log_level", "default_policy"]
    assert ignored == ["socket"]
    assert merged.socket == old.socket
    assert merged.log_level == "debug"


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpushared", *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = write(tmp_path, FULL)
    result = run_daemon("--check-config", str(good))
    assert result.returncode == 0
    assert result.stdout.strip() == f"gpushared: config {good}: ok"
    bad = tmp_path / "bad.toml"
    bad.write_text("[daemon]\nlog_level = 'loud'\n")
    result = run_daemon("--check-config", str(bad))
    assert result.returncode == 78
    assert result.stderr.strip() == (
        f"gpushared: config {bad}: daemon.log_level = 'loud' is not one of debug, info, warning, error"
    )
    assert "Traceback" not in result.stderr
