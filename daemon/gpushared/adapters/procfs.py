"""Who a process is, read from /proc: owner uid, user name and command line (for naming device holders)."""

from __future__ import annotations

import pwd
from pathlib import Path


class ProcFs:
    """Implements services.partition_ports.ProcessInfo."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self._proc = proc

    def describe(self, pid: int) -> tuple[int, str, str] | None:
        """(uid, user, command) of a live process; None once it is gone."""
        base = self._proc / str(pid)
        try:
            status = (base / "status").read_text()
            raw = (base / "cmdline").read_bytes()
        except OSError:
            return None
        uid = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Uid:")), -1)
        name = next((line.split(None, 1)[1].strip() for line in status.splitlines() if line.startswith("Name:")), "")
        # Kernel threads and zombies have no command line; their Name: is all there is.
        command = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part) or f"[{name}]"
        try:
            user = pwd.getpwuid(uid).pw_name
        except KeyError:
            user = str(uid)
        return uid, user, command
