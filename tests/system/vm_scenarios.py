#!/usr/bin/python3
"""Runs INSIDE the QEMU guest (systemd 252, cgroup2 with every controller): the delegation scenarios of
test_delegation_controllers.py. Prints one ``RESULT {json}`` line per scenario. Stdlib only.

Files next to it: gpushared.service (the shipped unit), gpushare.sysusers, fake_gpushared.py.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
UNIT = "gpushared.service"
CG = Path("/sys/fs/cgroup/system.slice/gpushared.service")
DROPINS = Path("/etc/systemd/system/gpushared.service.d")


def sh(*argv: str, check: bool = False) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check).stdout.strip()


def show() -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, "-p", "ActiveState,SubState,Result,MainPID,NRestarts,ExecMainStatus")
    return dict(line.split("=", 1) for line in out.splitlines())


def fake_state() -> dict:
    try:
        return json.loads(Path("/run/gpushared/fake-state").read_text())
    except (OSError, ValueError):
        return {}


def wait_new_main(old: str, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        props = show()
        back = props["ActiveState"] == "active" and props["MainPID"] not in ("0", old)
        if back and fake_state().get("main") == int(props["MainPID"]):
            return True
        time.sleep(0.2)
    return False


def snapshot() -> dict:
    state = fake_state()
    leaves = {}
    for name in ("model-a", "model-b"):
        leaf = CG / name
        if (leaf / "cgroup.procs").exists():
            pids_max = (leaf / "pids.max").read_text().strip() if (leaf / "pids.max").exists() else None
            leaves[name] = {"procs": (leaf / "cgroup.procs").read_text().split(), "pids.max": pids_max}
    return {
        "unit": show(),
        "subtree_control": (CG / "cgroup.subtree_control").read_text().split() if CG.exists() else None,
        "models": {n: m["pid"] for n, m in state.get("models", {}).items()},
        "adopted": all(m.get("adopted") for m in state.get("models", {}).values()) if state else None,
        "leaves": leaves,
    }


def reset() -> None:
    sh("systemctl", "stop", UNIT)
    sh("systemctl", "kill", "--kill-whom=all", "--signal=SIGKILL", UNIT)
    for scope in ("gpushare-model-a.scope", "gpushare-model-b.scope"):
        sh("systemctl", "stop", scope)
    time.sleep(1)
    for leaf in ("model-a", "model-b", "supervisor"):
        with contextlib.suppress(OSError):
            (CG / leaf).rmdir()
    sh("systemctl", "reset-failed")
    for dropin in DROPINS.glob("2*.conf"):
        dropin.unlink()
    sh("systemctl", "daemon-reload")


def scenario(name: str, dropin: str = "") -> None:
    if dropin:
        (DROPINS / "20-scenario.conf").write_text(dropin)
        sh("systemctl", "daemon-reload")
    result: dict = {"scenario": name}
    cursor = sh("journalctl", "-n0", "--show-cursor", "-o", "cat").rpartition("-- cursor: ")[2]
    sh("systemctl", "start", UNIT)
    time.sleep(0.5)
    result["start"] = snapshot()
    old = show()["MainPID"]
    sh("systemctl", "restart", UNIT)
    result["restart_came_back"] = wait_new_main(old)
    result["restart"] = snapshot()
    if result["restart_came_back"]:
        old = show()["MainPID"]
        sh("kill", "-9", old)
        result["kill9_came_back"] = wait_new_main(old)
        result["kill9"] = snapshot()
    journal = sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", f"--after-cursor={cursor}")
    result["status_219"] = "status=219/CGROUP" in journal
    print("RESULT " + json.dumps(result), flush=True)
    reset()


def real_package(deb: Path) -> None:
    """The real gpushared from the package (emulated GPUs, two stub models): restart and kill -9."""
    env = {"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    install = subprocess.run(
        ["apt-get", "install", "-y", "-q", str(deb)], capture_output=True, text=True, env=env, check=False
    )
    result: dict = {"scenario": "package", "installed": install.returncode == 0}
    # Only this scenario's journal: the fake daemon's no-release scenario before it hits 219 on purpose.
    cursor = sh("journalctl", "-n0", "--show-cursor", "-o", "cat").rpartition("-- cursor: ")[2]
    if install.returncode != 0:
        result["error"] = install.stdout[-1500:] + install.stderr[-1500:]
        print("RESULT " + json.dumps(result), flush=True)
        return
    (DROPINS / "50-emulate.conf").write_text(
        "[Service]\nExecStart=\nExecStart=/usr/sbin/gpushared --emulate\nRestartSec=500ms\nTimeoutStartSec=120s\n"
    )
    sh("systemctl", "daemon-reload")
    sh("systemctl", "start", UNIT)
    result["serve"] = []
    for name in ("a", "b"):
        done = subprocess.run(
            ["gpusharectl", "serve", f"stub-org/{name}", "--engine", "stub", "--name", name, "--memory", "2GiB", "--wait"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        result["serve"].append([done.returncode, done.stdout[-500:], done.stderr[-500:]])

    def real_snapshot() -> dict:
        try:
            listed = json.loads(sh("gpusharectl", "--json", "models") or "{}").get("models", [])
        except ValueError:
            listed = []
        leaves = {}
        for leaf in sorted(p for p in CG.iterdir() if p.is_dir()) if CG.exists() else []:
            limits = {
                f: (leaf / f).read_text().strip()
                for f in ("pids.max", "memory.max", "cpu.weight")
                if (leaf / f).exists()
            }
            leaves[leaf.name] = {"procs": (leaf / "cgroup.procs").read_text().split(), **limits}
        return {
            "unit": show(),
            "subtree_control": (CG / "cgroup.subtree_control").read_text().split() if CG.exists() else None,
            "models": {m["name"]: [m.get("pid"), m.get("state")] for m in listed},
            "leaves": leaves,
        }

    def wait_ready(old: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            props = show()
            if props["ActiveState"] == "active" and props["MainPID"] not in ("0", old):
                snap = real_snapshot()["models"]
                if snap and all(state == "MODEL_STATE_READY" for _, state in snap.values()):
                    return True
            time.sleep(0.5)
        return False

    result["start"] = real_snapshot()
    old = show()["MainPID"]
    sh("systemctl", "restart", UNIT)
    result["restart_came_back"] = wait_ready(old)
    result["restart"] = real_snapshot()
    old = show()["MainPID"]
    sh("kill", "-9", old)
    result["kill9_came_back"] = wait_ready(old)
    result["kill9"] = real_snapshot()
    journal = sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", f"--after-cursor={cursor}")
    result["status_219"] = "status=219/CGROUP" in journal
    result["journal_tail"] = [line[:240] for line in journal.splitlines()[-25:]]
    result["cgroup_lines"] = [
        line[:300] for line in journal.splitlines() if "cgroup" in line and "gpushared[" not in line
    ][:3] + [line[:300] for line in journal.splitlines() if "controller" in line][:4]
    print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    print("RESULT " + json.dumps({"controllers": Path("/sys/fs/cgroup/cgroup.controllers").read_text().split(),
                                   "systemd": sh("systemctl", "--version").splitlines()[0]}), flush=True)  # fmt: skip
    sh("systemd-sysusers", str(HERE / "gpushare.sysusers"))
    Path("/etc/systemd/system/gpushared.service").write_text((HERE / "gpushared.service").read_text())
    DROPINS.mkdir(parents=True, exist_ok=True)
    (DROPINS / "10-fake.conf").write_text(
        f"[Service]\nExecStart=\nExecStart=/usr/bin/python3 {HERE}/fake_gpushared.py\nRestartSec=500ms\n"
    )
    sh("systemctl", "daemon-reload")
    scenario("shipped")
    # The same unit without its ExecStopPost= (an empty assignment clears the list): the systemd#24064 hazard.
    scenario("no-release", "[Service]\nExecStopPost=\n")
    # The alternative design: each model in a transient scope of its own (gpushare.slice), no leaves of ours.
    scenario("scopes", "[Service]\nEnvironment=FAKE_MODE=scope\n")
    debs = sorted(HERE.glob("gpushare_*_amd64.deb"))
    if debs:
        (DROPINS / "10-fake.conf").unlink()
        Path("/etc/systemd/system/gpushared.service").unlink()  # the package's copy takes over
        sh("systemctl", "daemon-reload")
        real_package(debs[-1])


if __name__ == "__main__":
    main()
