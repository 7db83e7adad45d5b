"""The small interfaces PartitionService reaches the host through, besides the GPU backend."""

from __future__ import annotations

from typing import Protocol


class UnitManager(Protocol):
    """systemd units that hold GPU devices (a metrics exporter, an agent)."""

    def is_active(self, unit: str) -> bool: ...

    def stop(self, unit: str) -> None:
        """Raises FailedPrecondition naming the unit when systemd refuses."""
        ...

    def start(self, unit: str) -> None: ...


class ProcessInfo(Protocol):
    def describe(self, pid: int) -> tuple[int, str, str] | None:
        """(uid, user name, command line) of a live process; None once it is gone."""
        ...


class Notifier(Protocol):
    """The service manager that started the daemon (systemd), if any."""

    def status(self, text: str) -> None: ...

    def extend_timeout(self, seconds: float) -> None:
        """Ask for more time before the start-up or stop timeout fires (a driver reload takes minutes)."""
        ...
