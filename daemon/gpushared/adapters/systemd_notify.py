"""Messages to systemd's notification socket (sd_notify): status text and timeout extensions."""

from __future__ import annotations

import logging
import os

import sdnotify

log = logging.getLogger(__name__)


class SystemdNotifier:
    """Implements services.partition_ports.Notifier; does nothing when systemd did not start us (no NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self._enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._notifier = sdnotify.SystemdNotifier() if self._enabled else None

    def _send(self, message: str) -> None:
        if self._notifier is not None:
            self._notifier.notify(message)

    def status(self, text: str) -> None:
        self._send(f"STATUS={text[:200]}")

    def extend_timeout(self, seconds: float) -> None:
        # Only honoured while systemd waits for us (start-up, stop); a driver reload during either takes
        # minutes, and without this systemd would kill us mid-switch (reliability.md §1).
        self._send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
