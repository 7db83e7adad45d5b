"""Files of served models under the state directory: each child's home (HOME, TMPDIR, caches) and its log."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

from gpushared.domain.errors import FailedPrecondition

_log = logging.getLogger("gpushared.models")

_CHECK_AS = """
import os, sys
uid, gid, groups, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
os.setgroups([int(g) for g in groups.split(",") if g])
os.setresgid(gid, gid, gid)
os.setresuid(uid, uid, uid)
readable = os.access(path, os.R_OK) and (not os.path.isdir(path) or os.access(path, os.X_OK))
sys.exit(0 if readable else 1)
"""
"""Run as root, exits 0 when ``uid``/``gid`` with ``groups`` can read ``path`` and enter it if a directory."""


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

    def readable_by(self, path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> bool:
        """Whether ``uid`` can read ``path`` (and enter it, for a directory), checked AS that user.

        The daemon runs as root, whose view says nothing about the child's: the check runs in a
        short-lived process with the child's credentials, as the kernel would judge the child.
        """
        # The credentials are dropped by the child itself, after exec: subprocess's user=/group= in this
        # multi-threaded daemon use vfork on Python 3.11, and the child then crashed now and then (SIGSEGV in
        # glibc's setxid broadcast), which read as "cannot read it".
        result = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHECK_AS, str(uid), str(gid), ",".join(map(str, groups)), path],
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            check=False,
            timeout=10,
        )
        if result.returncode == 0:
            return True
        detail = result.stderr.decode(errors="replace").strip()[-300:]
        if result.returncode != 1 or detail:
            # test(1) says "no" with status 1 and no output; anything else means the check itself did not run.
            _log.warning(
                "readability check of %s as uid %d gid %d ended with status %d: %s",
                path,
                uid,
                gid,
                result.returncode,
                detail or "no output",
                extra={"event": "readable_check_failed"},
            )
            raise FailedPrecondition(
                f"model {path[:200]}: could not check whether uid {uid} can read it (status {result.returncode}: "
                f"{detail or 'no output'})",
                hint="see the daemon's log; retry",
            )
        return False

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
