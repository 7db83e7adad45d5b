"""Files of served models under the state directory: each child's home (HOME, TMPDIR, caches) and its log."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import BinaryIO

from gpushared.domain.errors import FailedPrecondition

_log = logging.getLogger("gpushared.models")


class ModelFiles:
    """Implements services.supervision_ports.ModelFilesPort.

    Children write their stdout and stderr straight to ``logs/NAME.log`` (opened O_APPEND by the
    daemon, inherited as fd 1 and 2), so they never block on a daemon that is down. Rotation is
    copy-then-truncate for that reason: the child keeps its descriptor, and O_APPEND makes its next
    write land at the new end. Lines written between the copy and the truncate are lost; at
    a 64 MiB cap that is a bounded, rare loss, which beats a pipe through the daemon.
    """

    def __init__(self, state_dir: Path) -> None:
        self._homes = state_dir / "models"
        self._logs = state_dir / "logs"

    def home(self, name: str, uid: int, gid: int) -> Path:
        """Create the child's private home with tmp/ and cache/, owned by its uid."""
        self._homes.mkdir(mode=0o711, parents=True, exist_ok=True)
        if not os.stat(self._homes.parent).st_mode & 0o001:
            raise FailedPrecondition(
                f"state directory {self._homes.parent}: model processes (uid {uid}) cannot reach their home under it",
                hint=f"chmod o+x {self._homes.parent} (its files stay private)",
            )
        home = self._homes / name
        for directory in (home, home / "tmp", home / "cache"):
            directory.mkdir(mode=0o700, exist_ok=True)
            os.chown(directory, uid, gid)
        return home

    def readable_by(self, path: str, uid: int, gid: int) -> bool:
        """Whether ``uid`` can read ``path`` (and enter it, for a directory), checked AS that user.

        The daemon runs as root, whose view says nothing about the child's: the check runs in a
        short-lived process with the child's credentials, as the kernel would judge the child.
        """
        result = subprocess.run(
            ["/bin/sh", "-c", 'test -r "$1" && { test ! -d "$1" || test -x "$1"; }', "sh", path],
            user=uid,
            group=gid,
            extra_groups=[],
            env={"PATH": "/usr/bin:/bin"},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
            timeout=10,
        )
        return result.returncode == 0

    def remove_home(self, name: str) -> None:
        shutil.rmtree(self._homes / name, ignore_errors=True)

    def log_path(self, name: str) -> Path:
        self._logs.mkdir(mode=0o750, parents=True, exist_ok=True)
        return self._logs / f"{name}.log"

    def read_log(self, name: str, *, offset: int | None, tail_lines: int, limit: int = 1 << 20) -> tuple[bytes, int]:
        """From ``offset`` (None: the last ``tail_lines`` lines) up to ``limit`` bytes, and where to read next.

        An offset past the end (the log was rotated meanwhile) restarts from the beginning.
        """
        path = self._logs / f"{name}.log"
        try:
            with path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                start = _tail_start(log, size, tail_lines) if offset is None else _resume_at(offset, size)
                log.seek(start)
                data = log.read(limit)
        except FileNotFoundError:
            return b"", 0
        return data, start + len(data)

    def rotate(self, name: str, max_bytes: int) -> bool:
        """Keep NAME.log under ``max_bytes``: copy it to NAME.log.1 and truncate it. True if rotated."""
        path = self._logs / f"{name}.log"
        try:
            if path.stat().st_size <= max_bytes:
                return False
            shutil.copyfile(path, path.with_name(path.name + ".1"))
            os.truncate(path, 0)
        except FileNotFoundError:
            return False
        return True


def _resume_at(offset: int, size: int) -> int:
    # Past the end means the log was rotated since the reader's last call: start over.
    return offset if offset <= size else 0


def _tail_start(log: BinaryIO, size: int, lines: int) -> int:
    """Offset where the last ``lines`` lines begin, reading backwards in blocks (logs can be large)."""
    position, found, block = size, 0, 65536
    while position > 0:
        step = min(block, position)
        position -= step
        log.seek(position)
        chunk = log.read(step)
        # A trailing newline ends the last line; it does not start one.
        end = len(chunk) - 1 if position + step == size and chunk.endswith(b"\n") else len(chunk)
        index = end
        while True:
            index = chunk.rfind(b"\n", 0, index)
            if index < 0:
                break
            found += 1
            if found == lines:
                return position + index + 1
    return 0
