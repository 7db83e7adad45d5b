"""Messages to systemd's notification socket (sd_notify): readiness, status, watchdog, stopping, timeout extensions."""

from __future__ import annotations

import logging
import os
import socket

import sdnotify

log = logging.getLogger(__name__)


class _Connection(sdnotify.SystemdNotifier):  # type: ignore[misc]
    """sdnotify's sender, connected here: its own constructor reads only the process environment and, when the
    connect fails, drops the socket without closing it (a leaked fd per retry)."""

    def __init__(self, address: str) -> None:
        self.debug = True  # notify() raises instead of swallowing
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect("\0" + address[1:] if address.startswith("@") else address)
        except OSError:
            sock.close()
            raise
        self.socket = sock

    def close(self) -> None:
        self.socket.close()


class SystemdNotifier:
    """Does nothing when systemd did not start us (no NOTIFY_SOCKET).

    sdnotify swallows every send error unless built with debug=True, and a lost WATCHDOG=1 would then stay
    invisible until systemd kills us (reliability.md §1.1): errors are counted, logged, and the connection is
    made again once (systemd re-executing itself recreates the socket our datagram socket was connected to).
    """

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = env.get("NOTIFY_SOCKET", "")
        self.enabled = bool(self._address)
        self.failures = 0
        self.watchdog_seconds = _watchdog_seconds(env)
        self._notifier: _Connection | None = None
        self._last_status = ""

    def _send(self, message: str) -> bool:
        if not self.enabled:
            return False
        for attempt in (1, 2):
            try:
                if self._notifier is None:
                    self._notifier = _Connection(self._address)
                self._notifier.notify(message)
                return True
            except OSError as exc:
                if self._notifier is not None:
                    self._notifier.close()
                    self._notifier = None
                if attempt == 2:
                    self.failures += 1
                    log.error(
                        "systemd notification %r not delivered: %s",
                        message.split("=", 1)[0],
                        exc,
                        extra={"event": "notify_failed", "failures": self.failures},
                    )
        return False

    def ready(self, status: str) -> None:
        self._last_status = status
        self._send(f"READY=1\nSTATUS={status[:200]}\nMAINPID={os.getpid()}")

    def status(self, text: str) -> None:
        if text != self._last_status:
            self._last_status = text
            self._send(f"STATUS={text[:200]}")

    def watchdog(self) -> None:
        self._send("WATCHDOG=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")

    def extend_timeout(self, seconds: float) -> None:
        # Only honoured while systemd waits for us (start-up, stop); a driver reload or stopping many models takes
        # minutes, and without this systemd would kill us mid-way (reliability.md §1.1).
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _watchdog_seconds(env: dict[str, str] | os._Environ[str]) -> float | None:
    """The watchdog interval systemd expects pings within, if it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000
