"""Test harness: real gpushared processes on temporary sockets, real gpusharectl clients, other uids."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
OTHER_UID = 4242
OTHER_GID = 4242


def wait_for(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll until ``predicate`` holds; fail naming ``what`` after ``timeout`` (never a timing assertion)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def short_dir(prefix: str) -> Path:
    """A short directory under /tmp: Unix socket paths must fit in 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Daemon:
    """One gpushared process, started the way an operator would, talking on its own socket."""

    def __init__(
        self, root: Path, *, gpus: int | None = 8, config: str | None = None, extra: tuple[str, ...] = ()
    ) -> None:
        self.root = root
        self.socket = root / "gpushared.sock"
        self.state_dir = root / "state"
        self.log_path = root / "daemon.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = root / "gpushared.toml"
            self.config_path.write_text(config)
        self.gpus = gpus
        self.extra = extra
        self.env: dict[str, str] = {}
        """Added to the daemon's environment at each start (e.g. GPUSHARED_FAILPOINTS)."""
        self.process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        argv = [PYTHON, "-m", "gpushared", "--socket", str(self.socket), "--state-dir", str(self.state_dir)]
        if self.gpus is not None:
            argv += ["--emulate", str(self.gpus)]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv + list(self.extra)

    def start(self, *, wait: bool = True) -> Daemon:
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env} if self.env else None
        self.process = subprocess.Popen(self.argv(), stdout=log, stderr=log, cwd=REPO, env=env)
        log.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"gpushared exited {self.process.returncode}:\n{self.log()}")
            if self.socket.exists():
                with grpc.insecure_channel(f"unix:{self.socket}") as channel:
                    try:
                        response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
                    except grpc.RpcError:
                        pass
                    else:
                        if response.status == health_pb2.HealthCheckResponse.SERVING:
                            return
            time.sleep(0.05)
        raise AssertionError(f"gpushared did not serve within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"gpushared ignored signal {sig} for {timeout}s:\n{self.log()}") from None

    def restart(self) -> Daemon:
        assert self.stop() == 0, self.log()
        return self.start()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def ctl(
        self,
        *args: str,
        user: int | None = None,
        group: int | None = None,
        extra_groups: list[int] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> subprocess.CompletedProcess[str]:
        """Run the real gpusharectl CLI, optionally as another uid (no such user needs to exist)."""
        argv = [PYTHON, "-m", "gpusharectl", "--socket", str(self.socket), *args]
        if user is None:
            return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, check=False)
        return run_as(argv, user=user, group=group if group is not None else user, extra_groups=extra_groups or [])


_readable_copy: Path | None = None


def _world_readable_source() -> Path:
    """The client's code where any uid can read it (the checkout may sit under /root)."""
    global _readable_copy
    if _readable_copy is None:
        target = short_dir("gpushare-src-")
        for package in ("daemon/gpushared", "client/gpusharectl"):
            shutil.copytree(REPO / package, target / Path(package).name, ignore=shutil.ignore_patterns("__pycache__"))
        subprocess.run(["chmod", "-R", "a+rX", str(target)], check=True)
        _readable_copy = target
    return _readable_copy


def run_as(argv: list[str], *, user: int, group: int, extra_groups: list[int]) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(_world_readable_source()), "HOME": "/", "LANG": "C.UTF-8"}
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        user=user,
        group=group,
        extra_groups=extra_groups,
        cwd="/",
        check=False,
    )


def destroy_cgroup(root: Path, patience: float = 10.0) -> None:
    """Kill everything a test left under a cgroup subtree, then rmdir it bottom-up (no code under test)."""
    if not root.is_dir():
        return
    (root / "cgroup.kill").write_text("1")
    deadline = time.monotonic() + patience
    while "populated 1" in (root / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    for directory, _, _ in os.walk(root, topdown=False):
        os.rmdir(directory)


@pytest.fixture
def tmp_short() -> Iterator[Path]:
    path = short_dir("gs-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(tmp_short: Path) -> Iterator[Daemon]:
    """A running gpushared on an emulated 8-GPU host, stopped (and checked to stop cleanly) after the test."""
    d = Daemon(tmp_short).start()
    yield d
    if d.process is not None and d.process.poll() is None:
        code = d.stop()
        assert code == 0, f"gpushared exited {code} on SIGTERM:\n{d.log()}"


@pytest.fixture(scope="session", autouse=True)
def _world_traversable_python() -> None:
    """Other uids run the venv's python: make sure the venv is readable (dev/setup does this too)."""
    prefix = Path(sys.prefix)
    if os.geteuid() == 0 and not str(prefix).startswith("/root"):
        subprocess.run(["chmod", "-R", "a+rX", str(prefix)], check=False)
