"""The systemd notification protocol, against a real datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpushared.adapters.systemd_notify import SystemdNotifier
from tests.conftest import Daemon


class FakeSystemd:
    """Collects what the daemon sends, like systemd's notify socket does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                return [m for _, m in self.messages]
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, fragment: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for message in self.drain():
                if fragment in message:
                    return message
        raise AssertionError(f"no message with {fragment!r}; got {[m for _, m in self.messages]}")

    def count(self, fragment: str) -> int:
        return sum(1 for _, m in self.messages if fragment in m)


@pytest.fixture
def systemd(tmp_short: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(tmp_short / "notify.sock")
    yield fake
    fake.sock.close()


def relay_pid(daemon_pid: int) -> int:
    children = Path(f"/proc/{daemon_pid}/task/{daemon_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_ready_status_watchdog_gated_on_the_api_and_stopping(tmp_short: Path, systemd: FakeSystemd) -> None:
    d = Daemon(tmp_short)
    d.env = {"NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": "1000000"}
    d.start()
    assert d.process is not None
    ready = systemd.wait_for("READY=1")
    assert f"MAINPID={d.process.pid}" in ready
    assert "STATUS=0/0 models ready, 0 allocations, 8 partitions on 8 GPUs (emulated)" in ready
    systemd.wait_for("WATCHDOG=1", timeout=5)

    # An allocation changes the status line at the next tick.
    assert d.ctl("allocate", "--memory", "1GiB").returncode == 0
    systemd.wait_for("STATUS=0/0 models ready, 1 allocations", timeout=5)

    # A stalled API (its front door frozen) gets no more pings: systemd would restart the daemon.
    relay = relay_pid(d.process.pid)
    os.kill(relay, signal.SIGSTOP)
    try:
        time.sleep(1.5)  # let a ping that was already under way arrive
        systemd.drain()
        before = systemd.count("WATCHDOG=1")
        time.sleep(3)
        systemd.drain()
        assert systemd.count("WATCHDOG=1") == before, "no ping while the API does not answer"
    finally:
        os.kill(relay, signal.SIGCONT)
    systemd.wait_for("WATCHDOG=1", timeout=10)
    assert "watchdog ping withheld: the API health check failed" in d.log()

    assert d.stop() == 0
    stopping = systemd.wait_for("STOPPING=1", timeout=5)
    assert "STATUS=stopping" in stopping


def test_without_notify_socket_nothing_is_sent_and_failures_are_counted(tmp_short: Path) -> None:
    quiet = SystemdNotifier(environ={})
    quiet.ready("x")
    quiet.watchdog()
    assert not quiet.enabled and quiet.failures == 0 and quiet.watchdog_seconds is None
    # A socket that is gone: the failure is counted, not swallowed.
    broken = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_short / "absent.sock"), "WATCHDOG_USEC": "4000000"})
    assert broken.watchdog_seconds == 4.0
    broken.watchdog()
    broken.status("a")
    assert broken.failures == 2
    other = SystemdNotifier(environ={"NOTIFY_SOCKET": "x", "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_seconds is None, "a watchdog meant for another process is not ours"
