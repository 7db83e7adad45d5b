"""Model server processes by pidfd: launch into a cgroup leaf, identity (pid, start time, leaf), signals and exit."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

from gpushared.adapters.cgroupfs import CgroupFsTree, find_cgroup2_mount, spawn_in_leaf
from gpushared.services.supervision_ports import ChildIdentity, ChildSpec, ExitStatus

UNKNOWN_EXIT = "exited while the daemon was down or after re-adoption; status unknown"

# Children let go of while still running (detach, for a daemon that exits and leaves them to a successor). They stay
# referenced for the life of the process: a collected Popen of a running child warns, and would reap a pid that a
# re-adopting supervisor may be watching.
_let_go: list[subprocess.Popen[bytes]] = []


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks after boot); None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and ")"; the fields after the LAST ")" start at field 3.
    after_comm = stat.rpartition(")")[2].split()
    return int(after_comm[22 - 3])


def cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of ``pid`` inside the hierarchy (the "0::" line of /proc/PID/cgroup)."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return next((line[3:] for line in lines if line.startswith("0::")), None)


def in_cgroup(pid: int, cgroup_dir: Path) -> bool:
    """Whether ``pid`` lives in ``cgroup_dir`` (a directory under the cgroup2 mount)."""
    inside = cgroup_of(pid)
    mount = find_cgroup2_mount()
    if inside is None or mount is None:
        return False
    try:
        relative = "/" + str(cgroup_dir.relative_to(mount))
    except ValueError:
        return False
    # /proc shows the path from the hierarchy root; when only a sub-tree is mounted (a bind mount in a container)
    # the mounted part is a prefix of it, so compare the tail.
    return inside == relative or inside.endswith(relative)


def _describe(result: os.waitid_result) -> ExitStatus:
    if result.si_code == os.CLD_EXITED:
        return ExitStatus(result.si_status, f"exited with status {result.si_status}")
    try:
        name = signal.Signals(result.si_status).name
    except ValueError:
        name = f"signal {result.si_status}"
    return ExitStatus(-result.si_status, f"killed by {name}")


class PidfdChild:
    """One main process held by a pidfd: exit is noticed through the event loop (the pidfd turns readable), and
    signals go to the pidfd, so a recycled pid can never receive them."""

    def __init__(self, identity: ChildIdentity, pidfd: int, *, popen: subprocess.Popen[bytes] | None = None) -> None:
        self._identity = identity
        self._pidfd: int | None = pidfd
        self._popen = popen
        self._loop = asyncio.get_running_loop()
        self._exited: asyncio.Future[ExitStatus] = self._loop.create_future()
        self._loop.add_reader(pidfd, self._on_readable)

    @property
    def identity(self) -> ChildIdentity:
        return self._identity

    def exited(self) -> asyncio.Future[ExitStatus]:
        return self._exited

    def _on_readable(self) -> None:
        fd = self._pidfd
        if fd is None:
            return
        self._loop.remove_reader(fd)
        status = ExitStatus(None, UNKNOWN_EXIT)
        try:
            # Reap our own child at once (no zombie); a re-adopted process is not our child and PID 1 reaps it.
            result = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            result = None
        if result is not None:
            status = _describe(result)
            if self._popen is not None:
                # Tell Popen it was reaped here, so it neither waits on a recycled pid nor warns at collection.
                self._popen.returncode = status.code
            else:
                status = ExitStatus(status.code, f"{status.description} after re-adoption")
        if not self._exited.done():
            self._exited.set_result(status)

    def send_signal(self, signum: int) -> bool:
        if self._pidfd is None or self._exited.done():
            return False
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is None:
            return
        self._loop.remove_reader(fd)
        os.close(fd)
        if not self._exited.done():
            self._exited.cancel()
            if self._popen is not None:
                _let_go[:] = [p for p in _let_go if p.returncode is None]
                _let_go.append(self._popen)


class CgroupLauncher:
    """Starts children with cgroupfs.spawn_in_leaf (inside the leaf before exec, as the model's uid)."""

    def __init__(self, tree: CgroupFsTree) -> None:
        self._tree = tree
        # Children we forked stay referenced until reaped, so a supervisor that lets go of one (detach) does not
        # make subprocess warn that a running child was garbage-collected.
        self._spawned: list[subprocess.Popen[bytes]] = []

    async def launch(self, spec: ChildSpec) -> PidfdChild:
        self._spawned = [p for p in self._spawned if p.returncode is None]
        # The daemon opens the log, the child writes to it directly; O_APPEND keeps restarts' output in order.
        log_fd = os.open(spec.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            popen = await asyncio.to_thread(
                spawn_in_leaf,
                self._tree,
                spec.name,
                list(spec.argv),
                env=dict(spec.env),
                cwd=spec.cwd,
                user=spec.uid,
                group=spec.gid,
                extra_groups=None if spec.extra_groups is None else list(spec.extra_groups),
                stdout=log_fd,
                stderr=log_fd,
            )
        finally:
            os.close(log_fd)
        self._spawned.append(popen)
        # Our child cannot be recycled before we reap it, so pid -> pidfd -> start time is race-free here.
        pidfd = os.pidfd_open(popen.pid)
        started = start_time(popen.pid)
        if started is None:  # already exited and is a zombie whose stat is gone: only its exit is left to see
            started = 0
        return PidfdChild(ChildIdentity(popen.pid, started, spec.name), pidfd, popen=popen)

    def attach(self, identity: ChildIdentity) -> PidfdChild | None:
        try:
            pidfd = os.pidfd_open(identity.pid)
        except ProcessLookupError:
            return None
        # Read the start time AFTER taking the pidfd: if it matches, the pidfd refers to that very process (a
        # recycled pid would show a later start time), and from now on the pidfd cannot be fooled.
        if start_time(identity.pid) != identity.start_time or not in_cgroup(
            identity.pid, self._tree.root / identity.leaf
        ):
            os.close(pidfd)
            return None
        return PidfdChild(identity, pidfd)
