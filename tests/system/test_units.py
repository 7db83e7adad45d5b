"""Fast static gates on systemd/ (run by default, well under a second): systemd/check (verify, the security
exposure threshold, sysusers/tmpfiles parse) plus the promises docs/systemd.md makes about the unit."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"


def directives(path: Path) -> dict[str, list[str]]:
    """Key -> values (repeated keys kept), comments dropped."""
    found: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        found.setdefault(key, []).append(value)
    return found


def test_systemd_check_passes() -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    done = subprocess.run([str(UNITS / "check")], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "exposure" in done.stdout


def test_unit_parses_as_ini_with_expected_sections() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / "gpushared.service").read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
    assert parser["Install"]["WantedBy"] == "multi-user.target"


def test_lifecycle_directives() -> None:
    unit = directives(UNITS / "gpushared.service")
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "ExecStart": "/usr/sbin/gpushared",
        "KillMode": "process",
        "Delegate": "yes",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "69 78",
        "RuntimeDirectory": "gpushared",
        "RuntimeDirectoryPreserve": "yes",
        "StateDirectory": "gpushared",
        "LogsDirectory": "gpushared",
        "ConfigurationDirectory": "gpushared",
        "PrivateTmp": None,
        "DevicePolicy": "closed",
    }
    for key, value in expected.items():
        if value is None:
            assert key not in unit, f"{key}= must stay unset"
        else:
            assert unit.get(key) == [value], (key, unit.get(key))
    assert "WatchdogSec" in unit and "RestartSec" in unit
    assert {"char-kfd rw", "/dev/kfd rw", "char-drm rw"} <= set(unit["DeviceAllow"])
    # no socket unit: the daemon creates its socket itself (docs/systemd.md)
    assert not list(UNITS.glob("*.socket"))


def test_every_left_out_hardening_directive_says_why() -> None:
    text = (UNITS / "gpushared.service").read_text()
    for directive in ("PrivateTmp=yes", "MemoryDenyWriteExecute=yes", "PrivateDevices=yes", "ProcSubset=pid",
                      "ProtectKernelTunables=yes", "ProtectControlGroups=yes", "PrivateNetwork=yes", "PrivateUsers=yes"):  # fmt: skip
        lines = [line for line in text.splitlines() if line.startswith(f"# {directive}")]
        assert len(lines) == 1, directive
        assert len(lines[0].split(directive, 1)[1].strip()) > 15, f"{directive}: no reason given"


def test_sysusers_and_tmpfiles_agree_with_the_unit() -> None:
    sysusers = [line.split() for line in (UNITS / "gpushare.sysusers").read_text().splitlines() if line[:1] in "gu"]
    assert [(f[0], f[1]) for f in sysusers] == [("g", "gpushare"), ("g", "gpushare-admin"), ("u", "gpushare-model")]
    assert sysusers[2][-1].endswith("nologin")
    unit = directives(UNITS / "gpushared.service")
    tmpfiles = {
        f[1]: f[2]
        for f in (line.split() for line in (UNITS / "gpushare.tmpfiles").read_text().splitlines())
        if f and f[0] == "d"
    }
    assert tmpfiles == {
        "/run/gpushared": unit["RuntimeDirectoryMode"][0],
        "/var/lib/gpushared": unit["StateDirectoryMode"][0],
        "/var/log/gpushared": unit["LogsDirectoryMode"][0],
    }
