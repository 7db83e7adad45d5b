#!/usr/bin/python3
"""A stand-in for gpushared that does only what matters to systemd: the unit's delegation/KillMode design is
proven with it, independently of the real daemon (stdlib only; runs on the container's python3).

Like gpushared when no cgroup root is configured, it takes its own cgroup (the one systemd delegated) as the
root of its subtree, moves itself into ``supervisor/``, optionally enables the memory/pids/cpu controllers for
the leaves (as the real daemon does where they are available), and keeps two "models" (``sleep`` processes)
in the sibling leaves ``model-a/`` and ``model-b/``. A model still alive in its leaf is re-adopted (never
restarted); a dead one is started again. Then: READY=1, STATUS=, WATCHDOG=1 every WATCHDOG_USEC/2 unless the
file /run/fake-gpushared-hang exists, STOPPING=1 on SIGTERM, and the models are stopped on exit only when
FAKE_STOP_MODELS=1. What it did is printed (journal) and written to $RUNTIME_DIRECTORY/fake-state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("model-a", "model-b")
HANG_FLAG = Path("/run/fake-gpushared-hang")


def notify(message: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address[0] == "@":
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def log(text: str) -> None:
    print(f"fake-gpushared: {text}", flush=True)


def own_cgroup() -> Path:
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x.startswith("0::"))
    return Path("/sys/fs/cgroup") / line[3:].lstrip("/")


def pids(cgroup: Path) -> list[int]:
    return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]


def scope_models() -> dict[str, dict[str, object]]:
    """FAKE_MODE=scope: each model in its own transient scope (gpushare-<name>.scope in gpushare.slice),
    created through systemd (systemd-run --scope = StartTransientUnit) instead of a leaf of our own subtree."""
    state: dict[str, dict[str, object]] = {}
    for name in MODELS:
        unit = f"gpushare-{name}.scope"
        cgroup = Path("/sys/fs/cgroup/gpushare.slice") / unit
        alive = pids(cgroup) if (cgroup / "cgroup.procs").exists() else []
        if alive:
            state[name] = {"pid": alive[0], "adopted": True, "cgroup": str(cgroup)}
            log(f"{name}: re-adopted pid {alive[0]} in {unit}")
            continue
        subprocess.run(["systemctl", "reset-failed", unit], capture_output=True, check=False)
        child = subprocess.Popen(
            ["systemd-run", "--scope", "--quiet", f"--unit={unit}", "--slice=gpushare.slice",
             "-p", "TasksMax=64", "-p", "MemoryMax=1G", "--", "sleep", "infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if (cgroup / "cgroup.procs").exists() and child.pid in pids(cgroup):
                break
            time.sleep(0.02)
        state[name] = {"pid": child.pid, "adopted": False, "cgroup": str(cgroup)}
        log(f"{name}: started pid {child.pid} in {unit}")
    return state


def main() -> int:
    if os.environ.get("FAKE_MODE") == "scope":
        return serve(scope_models(), [], None)
    root = own_cgroup()
    log(f"started pid {os.getpid()} in cgroup {root}")
    if root.name == "supervisor":  # systemd >= 254 with DelegateSubgroup=supervisor put us there already
        root = root.parent
    supervisor = root / "supervisor"
    supervisor.mkdir(exist_ok=True)
    (supervisor / "cgroup.procs").write_text(str(os.getpid()))
    available = (root / "cgroup.controllers").read_text().split()
    enabled: list[str] = []
    if os.environ.get("FAKE_ENABLE_CONTROLLERS", "1") == "1":
        for controller in ("memory", "pids", "cpu"):
            if controller in available:
                with open(root / "cgroup.subtree_control", "w") as f:
                    f.write(f"+{controller}")
                enabled.append(controller)
    log(f"controllers available {available} enabled for leaves {enabled}")

    state: dict[str, dict[str, object]] = {}
    for name in MODELS:
        leaf = root / name
        leaf.mkdir(exist_ok=True)
        alive = pids(leaf)
        if alive:
            state[name] = {"pid": alive[0], "adopted": True}
            log(f"{name}: re-adopted pid {alive[0]}")
            if "pids" in enabled:  # limits are re-applied: a controller re-enabled after a restart starts at max
                (leaf / "pids.max").write_text("64")
            continue
        # Join the leaf before exec, in a new session (like gpushared's launcher); stdio not tied to us.
        child = subprocess.Popen(
            ["/bin/sh", "-c", f'echo $$ > "{leaf}/cgroup.procs" && exec sleep infinity'],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 5
        while child.pid not in pids(leaf) and time.monotonic() < deadline:
            time.sleep(0.01)
        if "pids" in enabled:
            (leaf / "pids.max").write_text("64")
        state[name] = {"pid": child.pid, "adopted": False}
        log(f"{name}: started pid {child.pid}")
    return serve(state, enabled, root)


def serve(state: dict[str, dict[str, object]], enabled: list[str], root: Path | None) -> int:
    record = {"main": os.getpid(), "models": state, "controllers": enabled}
    runtime = Path(os.environ.get("RUNTIME_DIRECTORY", "/run/gpushared").split(":")[0])
    (runtime / "fake-state").write_text(json.dumps(record))

    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    notify(f"READY=1\nSTATUS=serving {len(state)} models (fake)")
    log("ready")
    interval = int(os.environ.get("WATCHDOG_USEC", "0")) / 2e6 or 1.0
    while not stopping:
        if HANG_FLAG.exists():
            log("hang flag: not pinging the watchdog")
        else:
            notify("WATCHDOG=1")
        time.sleep(min(interval, 0.5))
    notify("STOPPING=1\nSTATUS=stopping")
    if os.environ.get("FAKE_STOP_MODELS") == "1" and root is None:
        for name in MODELS:
            subprocess.run(["systemctl", "stop", f"gpushare-{name}.scope"], check=False)
        log("models stopped")
    elif os.environ.get("FAKE_STOP_MODELS") == "1":
        for name in MODELS:
            leaf = root / name
            (leaf / "cgroup.kill").write_text("1")
            deadline = time.monotonic() + 5
            while "populated 1" in (leaf / "cgroup.events").read_text() and time.monotonic() < deadline:
                time.sleep(0.02)
            leaf.rmdir()
        log("models stopped")
    else:
        log("models left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
