"""systemd units that hold GPU devices, stopped and started with systemctl around a partition switch."""

from __future__ import annotations

import subprocess

from gpushared.domain.errors import FailedPrecondition

TIMEOUT_SECONDS = 120.0


class SystemctlUnits:
    """Implements services.partition_ports.UnitManager by running ``systemctl`` (D-Bus through the tool, so no
    binding is needed and the operator can run the same command by hand)."""

    def __init__(self, systemctl: str = "systemctl") -> None:
        self._systemctl = systemctl

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                [self._systemctl, *args], capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise FailedPrecondition(
                f"systemctl {' '.join(args)}: could not run {self._systemctl} ({exc})",
                hint="set partitions.systemctl to the systemctl binary, or empty partitions.holder_services",
            ) from exc

    def is_active(self, unit: str) -> bool:
        return self._run("is-active", "--quiet", unit).returncode == 0

    def stop(self, unit: str) -> None:
        self._checked("stop", unit)

    def start(self, unit: str) -> None:
        self._checked("start", unit)

    def _checked(self, verb: str, unit: str) -> None:
        result = self._run(verb, unit)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no message"])[-1]
            raise FailedPrecondition(
                f"unit {unit}: systemctl {verb} failed (exit {result.returncode}: {last[:200]})",
                hint=f"see `journalctl -u {unit}`",
            )
