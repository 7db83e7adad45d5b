"""The release gate: packaging/build makes both packages, lintian and rpmlint find no error, and the .rpm (which
no RPM host here can install) carries the right files, scriptlets and dependencies."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    if os.geteuid() != 0:
        pytest.skip("packaging/build runs as root (it installs its tools and stages /opt/gpushare/venv)")
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "FORMATS": "deb rpm",
        "OUT": str(out),
        "WORK": str(REPO / "build" / "release-gate-packaging"),
    }
    done = subprocess.run(
        [str(REPO / "packaging" / "build")], capture_output=True, text=True, env=env, timeout=900, check=False
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return out, done.stdout


def rpm(*args: str) -> str:
    return subprocess.run(["rpm", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_lintian_and_rpmlint_report_no_error(built: tuple[Path, str]) -> None:
    _, log = built
    lintian = re.search(r"lintian: (\d+) errors, (\d+) warnings", log)
    rpmlint = re.search(r"rpmlint: (\d+) errors, (\d+) warnings", log)
    assert lintian is not None and lintian.group(1) == "0", log[-3000:]
    assert rpmlint is not None and rpmlint.group(1) == "0", log[-3000:]


def test_rpm_files_scriptlets_and_dependencies(built: tuple[Path, str]) -> None:
    out, _ = built
    (package,) = out.glob("gpushare-*.x86_64.rpm")
    files = rpm("-qlp", str(package)).splitlines()
    for path in (
        "/usr/lib/systemd/system/gpushared.service",
        "/usr/lib/systemd/system/gpushare-amdgpu-reload.service",
        "/usr/lib/sysusers.d/gpushare.conf",
        "/usr/lib/tmpfiles.d/gpushare.conf",
        "/etc/gpushared/gpushared.toml",
        "/usr/sbin/gpushared",
        "/usr/bin/gpusharectl",
        "/opt/gpushare/venv/bin/gpushared-stub-engine",
        "/usr/share/gpushare/prometheus/gpushare-rules.yml",
        "/usr/share/gpushare/grafana/gpushare.json",
    ):
        assert path in files, path
    assert any(p.startswith("/usr/share/man/man8/gpushared.8") for p in files)
    assert any(p.startswith("/usr/share/man/man1/gpusharectl.1") for p in files)
    assert "/etc/gpushared/gpushared.toml" in rpm("-qcp", str(package)).split(), "the config is %config"
    scripts = rpm("-qp", "--scripts", str(package))
    assert "systemd-sysusers" in scripts and "systemd-tmpfiles" in scripts
    assert "try-restart" in scripts, "an upgrade restarts the daemon, never the models"
    assert "gpushare-teardown" in scripts, "a removal leaves nothing running"
    requires = rpm("-qpR", str(package))
    assert "python3.11" in requires and "systemd" in requires
    assert "amd-smi" not in requires and "vllm" not in requires, "found through configuration, never required"


def test_deb_metadata(built: tuple[Path, str]) -> None:
    out, _ = built
    (package,) = out.glob("gpushare_*_amd64.deb")
    info = subprocess.run(["dpkg-deb", "-I", str(package)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Depends: .*python3\.11", info) and "Suggests: amd-smi-lib" in info
    conffiles = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(package)], capture_output=True, check=True).stdout
    assert b"/etc/gpushared/gpushared.toml" in conffiles, "the config is a conffile"
