"""The real package under real systemd 252: dist/gpushare_*_amd64.deb installed with apt into a Debian 12 root
booted with systemd-nspawn, gpushared on its emulated 8-GPU host (a drop-in adds --emulate), stub models.

One container for the module (installing the package is the slow part); the tests run in file order and each
one leaves the service running with models a and b READY for the next. The last test removes and purges.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.system import nspawn
from tests.system.conftest import REPO, binds

pytestmark = [pytest.mark.slow, pytest.mark.system, pytest.mark.timeout(900)]

UNIT = "gpushared.service"
CGROUP = "/sys/fs/cgroup/system.slice/gpushared.service"
DROPIN_DIR = "/etc/systemd/system/gpushared.service.d"
# The emulator, and a start timeout short enough for a test (the shipped 3 min covers real partition work).
EMULATE = "[Service]\nExecStart=\nExecStart=/usr/sbin/gpushared --emulate\nTimeoutStartSec=60s\nRestartSec=200ms\n"
MEMBER, OUTSIDER = "alice", "mallory"


@pytest.fixture(scope="module")
def box(system_root: Path, deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    logs = tmp_path_factory.mktemp("nspawn")
    with nspawn.Container(system_root, binds_ro=binds({deb.parent: "/mnt/dist"}), log_dir=logs) as c:
        c.run("apt-get", "install", "-y", "-q", "--no-install-recommends", f"/mnt/dist/{deb.name}",
              env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)  # fmt: skip
        c.write(f"{DROPIN_DIR}/50-test-emulate.conf", EMULATE)
        c.run("systemctl", "daemon-reload")
        c.run("useradd", "--no-create-home", "--groups", "gpushare", MEMBER)
        c.run("useradd", "--no-create-home", OUTSIDER)
        yield c


def ctl(
    c: nspawn.Container, *args: str, user: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return c.run("gpusharectl", *args, user=user, check=check, timeout=180)


def models(c: nspawn.Container) -> dict[str, dict]:
    listed = json.loads(ctl(c, "--json", "models").stdout)
    return {m["name"]: m for m in listed.get("models", [])}


def model_pids(c: nspawn.Container) -> dict[str, int]:
    return {name: int(m["pid"]) for name, m in models(c).items()}


def main_pid(c: nspawn.Container) -> str:
    return c.show(UNIT, "MainPID")["MainPID"]


def journal(c: nspawn.Container) -> str:
    return c.run("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", check=False).stdout


def wait_back(c: nspawn.Container, old_main: str, timeout: float = 60) -> dict[str, str]:
    """Until the unit is active again under a new main pid and the API answers."""
    deadline = time.monotonic() + timeout
    props: dict[str, str] = {}
    while time.monotonic() < deadline:
        props = c.show(UNIT, "MainPID", "ActiveState", "SubState", "NRestarts", "Result")
        back = props["ActiveState"] == "active" and props["MainPID"] not in ("0", old_main)
        if back and ctl(c, "health", check=False).returncode == 0:
            return props
        time.sleep(0.2)
    raise AssertionError(f"{UNIT} not back within {timeout}s: {props}\n{journal(c)[-4000:]}")


def wait_models_ready(c: nspawn.Container, names: tuple[str, ...] = ("a", "b"), timeout: float = 60) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline:
        seen = models(c)
        if all(seen.get(n, {}).get("state") == "MODEL_STATE_READY" for n in names):
            return seen
        time.sleep(0.2)
    raise AssertionError(f"models {names} not READY within {timeout}s: {seen}")


def cgroup_of(c: nspawn.Container, pid: int) -> str:
    """The cgroup2 path of ``pid`` (the "0::" line; the host's v1 hierarchies show up as "/" lines too)."""
    lines = c.run("cat", f"/proc/{pid}/cgroup").stdout.splitlines()
    return next(line[3:] for line in lines if line.startswith("0::"))


def alive(c: nspawn.Container, pid: int) -> bool:
    return c.run("kill", "-0", str(pid), check=False).returncode == 0


def test_package_installs_units_accounts_and_directories(box: nspawn.Container) -> None:
    shipped = (REPO / "systemd" / "gpushared.service").read_text()
    assert box.run("cat", "/usr/lib/systemd/system/gpushared.service").stdout == shipped
    assert box.run("test", "-f", "/usr/lib/sysusers.d/gpushare.conf").returncode == 0
    assert box.run("test", "-f", "/usr/lib/tmpfiles.d/gpushare.conf").returncode == 0
    for group in ("gpushare", "gpushare-admin"):
        assert box.run("getent", "group", group).returncode == 0
    shell = box.run("getent", "passwd", "gpushare-model").stdout.strip().split(":")[-1]
    assert shell.endswith(("nologin", "false")), shell
    assert box.run("stat", "-c", "%a", "/var/lib/gpushared").stdout.strip() == "711"


def test_start_is_active_after_ready(box: nspawn.Container) -> None:
    box.run("systemctl", "start", UNIT, timeout=120)
    props = box.show(UNIT, "ActiveState", "SubState", "Type", "StatusText", "WatchdogUSec")
    assert props["ActiveState"] == "active", props
    assert props["Type"] == "notify"
    assert props["StatusText"], f"the daemon sent no STATUS= line: {props}"
    ctl(box, "health")
    mode = box.run("stat", "-c", "%a %U:%G", "/run/gpushared/gpushared.sock").stdout.split()
    assert mode == ["660", "root:gpushare"], mode


def test_status_for_members_only(box: nspawn.Container) -> None:
    ok = ctl(box, "status", user=MEMBER)
    assert "emulated" in ok.stdout, ok.stdout
    refused = ctl(box, "status", user=OUTSIDER, check=False)
    assert refused.returncode == 4, (refused.returncode, refused.stdout, refused.stderr)


def test_serve_two_stub_models(box: nspawn.Container) -> None:
    for name in ("a", "b"):
        ctl(box, "serve", f"stub-org/{name}", "--engine", "stub", "--name", name, "--memory", "2GiB", "--wait")
    seen = wait_models_ready(box)
    for name in ("a", "b"):
        assert cgroup_of(box, int(seen[name]["pid"])).startswith("/system.slice/gpushared.service/")
        assert not cgroup_of(box, int(seen[name]["pid"])).endswith("/supervisor")
    assert cgroup_of(box, int(main_pid(box))) == "/system.slice/gpushared.service/supervisor"


def test_restart_keeps_model_pids(box: nspawn.Container) -> None:
    before, old = model_pids(box), main_pid(box)
    box.run("systemctl", "restart", UNIT, timeout=120)
    wait_back(box, old)
    assert model_pids(box) == before
    wait_models_ready(box)
    assert model_pids(box) == before


def test_kill_9_restarts_and_readopts(box: nspawn.Container) -> None:
    before, old = model_pids(box), main_pid(box)
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    box.run("kill", "-9", old)
    props = wait_back(box, old)
    assert int(props["NRestarts"]) == restarts + 1, props
    wait_models_ready(box)
    assert model_pids(box) == before


def test_stalled_watchdog_restarts(box: nspawn.Container) -> None:
    # Stall the daemon from outside: SIGSTOP freezes every thread, so no WATCHDOG=1 arrives; after WatchdogSec
    # systemd sends SIGABRT (+SIGCONT, so the stopped process receives it) and restarts the unit.
    box.write(f"{DROPIN_DIR}/60-test-watchdog.conf", "[Service]\nWatchdogSec=5s\nTimeoutAbortSec=5s\n")
    box.run("systemctl", "daemon-reload")
    box.run("systemctl", "restart", UNIT, timeout=120)
    wait_models_ready(box)
    before, old = model_pids(box), main_pid(box)
    restarts = int(box.show(UNIT, "NRestarts")["NRestarts"])
    time.sleep(6)  # the daemon's own pings keep it alive past WatchdogSec while it is not stalled
    assert box.show(UNIT, "MainPID", "NRestarts") == {"MainPID": old, "NRestarts": str(restarts)}
    box.run("kill", "-STOP", old)
    props = wait_back(box, old, timeout=60)
    assert int(props["NRestarts"]) == restarts + 1, props
    assert "Watchdog timeout (limit 5s)!" in journal(box)
    wait_models_ready(box)
    assert model_pids(box) == before
    box.run("rm", f"{DROPIN_DIR}/60-test-watchdog.conf")
    box.run("systemctl", "daemon-reload")


def test_journal_has_the_daemons_lines(box: nspawn.Container) -> None:
    text = journal(box)
    assert "event=" in text, text[-2000:]  # logfmt lines from gpushared itself, not only systemd's
    own = box.run("journalctl", "-u", UNIT, "--no-pager", "-o", "json", "_COMM=gpushared", check=False).stdout
    python = box.run(
        "journalctl", "-u", UNIT, "--no-pager", "-o", "cat", "SYSLOG_IDENTIFIER=gpushared", check=False
    ).stdout
    assert own.strip() or python.strip(), "no journal entries from the gpushared process"


def test_stop_keeps_models_by_default(box: nspawn.Container) -> None:
    before = model_pids(box)
    box.run("systemctl", "stop", UNIT, timeout=120)
    assert box.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert all(alive(box, pid) for pid in before.values())
    box.run("systemctl", "start", UNIT, timeout=120)
    wait_models_ready(box)
    assert model_pids(box) == before


def test_stop_with_stop_models_on_exit_stops_them(box: nspawn.Container) -> None:
    box.write(
        f"{DROPIN_DIR}/70-test-stop-models.conf",
        "[Service]\nExecStart=\nExecStart=/usr/sbin/gpushared --emulate --stop-models-on-exit\n",
    )
    box.run("systemctl", "daemon-reload")
    before, old = model_pids(box), main_pid(box)
    box.run("systemctl", "restart", UNIT, timeout=120)  # the new daemon re-adopts them under the new policy
    wait_back(box, old)
    wait_models_ready(box)
    assert model_pids(box) == before
    box.run("systemctl", "stop", UNIT, timeout=120)
    assert not any(alive(box, pid) for pid in before.values())
    leaves = box.run(
        "sh", "-c", f"ls {CGROUP} 2>/dev/null | grep -v -e '^cgroup' -e '^supervisor$' || true"
    ).stdout.split()
    assert leaves == [], leaves
    box.run("rm", f"{DROPIN_DIR}/70-test-stop-models.conf")
    box.run("systemctl", "daemon-reload")


def test_remove_then_purge_leave_nothing_running(box: nspawn.Container) -> None:
    box.run("systemctl", "start", UNIT, timeout=120)
    for name in ("a", "b"):  # remove must cope with running models: make sure there are some
        if name not in models(box):
            ctl(box, "serve", f"stub-org/{name}", "--engine", "stub", "--name", name, "--memory", "2GiB", "--wait")
    wait_models_ready(box)
    pids = list(model_pids(box).values())
    assert all(alive(box, pid) for pid in pids)
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    box.run("apt-get", "remove", "-y", "-q", "gpushare", env=env, timeout=300)
    leftovers = box.run("sh", "-c", "pgrep -a -f '[g]pushare' || true").stdout.strip()
    assert leftovers == "", f"after remove: {leftovers}"
    assert not any(alive(box, pid) for pid in pids)
    assert box.run("test", "-e", CGROUP, check=False).returncode != 0, box.run("find", CGROUP, check=False).stdout
    assert box.run("test", "-d", "/var/lib/gpushared").returncode == 0  # remove keeps state
    box.run("apt-get", "purge", "-y", "-q", "gpushare", env=env, timeout=300)
    assert box.run("sh", "-c", "pgrep -a -f '[g]pushare' || true").stdout.strip() == ""
    assert box.run("test", "-e", CGROUP, check=False).returncode != 0
    for gone in ("/var/lib/gpushared", "/etc/gpushared"):
        assert box.run("test", "-e", gone, check=False).returncode != 0, f"{gone} survived purge"
