"""The daemon's delegated cgroup v2 subtree: supervisor/ and one leaf per model, their limits, kill and removal."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import re
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gpushared.domain.errors import GpushareError

SUPERVISOR = "supervisor"
# The controllers a model leaf needs for memory.max, pids.max and cpu.weight, in the order they are enabled.
WANTED_CONTROLLERS = ("memory", "pids", "cpu")
_LIMIT_FILES = {"memory": "memory.max", "pids": "pids.max", "cpu": "cpu.weight"}

_NAME_RE = re.compile(r"[A-Za-z0-9._-]+")
# Leaf names share a directory with the kernel's interface files ("memory.max", "cgroup.procs"); a leaf named
# like one could collide with a file a future kernel or controller adds (cgroup-v2.rst "Avoid Name Collisions").
_RESERVED_PREFIXES = ("cgroup", "cpu", "cpuset", "io", "memory", "pids", "hugetlb", "rdma", "misc")
_NAME_MAX = 255

# Waits re-read cgroup.events at least this often even without a poll() wakeup: belt and braces against a
# missed notification, and still nowhere near busy polling.
_POLL_CAP_SECONDS = 1.0
_FREEZE_TIMEOUT_SECONDS = 5.0

# The exit status of the launcher when it fails before exec; the real reason travels over the error pipe.
_LAUNCHER_FAILED = 125


class CgroupError(GpushareError):
    """A cgroup operation failed or was refused; the message names the cgroup path and the fix."""


@dataclass(frozen=True)
class CgroupSupport:
    """What the subtree can do: ``controllers`` are those enabled for model leaves (root's subtree_control)."""

    writable: bool
    controllers: frozenset[str]
    reason: str

    @property
    def enforced(self) -> bool:
        """Every limit gpushared sets on a model leaf is enforced."""
        return all(c in self.controllers for c in WANTED_CONTROLLERS)


@dataclass(frozen=True)
class _Mount:
    root: str  # the path inside the hierarchy that is mounted (mountinfo field 4)
    mount_point: Path
    fstype: str


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounts() -> list[_Mount]:
    mounts: list[_Mount] = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, sep, after = line.partition(" - ")
        fields = before.split(" ")
        if not sep or len(fields) < 5 or not after:
            continue
        mounts.append(_Mount(_unescape(fields[3]), Path(_unescape(fields[4])), after.split(" ", 1)[0]))
    return mounts


def _mount_of(path: Path, mounts: list[_Mount]) -> _Mount | None:
    """The mount that holds ``path``: the longest mount point above it, the last one listed if stacked."""
    best: _Mount | None = None
    for mount in mounts:
        if (path == mount.mount_point or mount.mount_point in path.parents) and (
            best is None or len(mount.mount_point.parts) >= len(best.mount_point.parts)
        ):
            best = mount
    return best


def _cgroup2_mount() -> _Mount | None:
    mounts = _mounts()
    for mount in mounts:
        # Skip a cgroup2 mount that something else was mounted over: its files are not reachable there.
        if mount.fstype == "cgroup2" and _mount_of(mount.mount_point, mounts) == mount:
            return mount
    return None


def find_cgroup2_mount() -> Path | None:
    """Where cgroup2 is mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified on a hybrid host); None if nowhere."""
    mount = _cgroup2_mount()
    return None if mount is None else mount.mount_point


def own_cgroup_path() -> Path | None:
    """This process's cgroup2 directory, from the "0::/..." line of /proc/self/cgroup joined to the mount."""
    mount = _cgroup2_mount()
    if mount is None:
        return None
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        if not line.startswith("0::"):
            continue
        inside = line[3:]
        # The mount may show only a sub-tree of the hierarchy (a bind mount in a container without cgroupns);
        # the cgroup path is relative to the hierarchy root, so strip the mounted part.
        mounted = mount.root.rstrip("/")
        if inside != mounted and not inside.startswith(mounted + "/"):
            return None
        return mount.mount_point.joinpath(inside[len(mounted) :].lstrip("/"))
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise CgroupError(
            f"cgroup {path.parent}: does not exist", hint="create it first (create_leaf) or check the name"
        ) from None
    except OSError as exc:
        raise CgroupError(f"cgroup {path.parent}: cannot read {path.name}: {exc.strerror}") from exc


def _write(path: Path, value: str, *, fix: str = "") -> None:
    # One write() per value: cgroup files parse each write on its own, and a buffered file would only report
    # the kernel's refusal at close().
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CgroupError(
            f"cgroup {path.parent}: {path.name} does not exist",
            hint=fix or "create the cgroup first, on a kernel that has this interface file",
        ) from None
    except OSError as exc:
        raise CgroupError(f"cgroup {path.parent}: cannot open {path.name}: {exc.strerror}", hint=fix) from exc
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise CgroupError(
            f"cgroup {path.parent}: writing {value!r} to {path.name} failed: {exc.strerror}", hint=fix
        ) from exc
    finally:
        os.close(fd)


def _pids_in(cgroup: Path) -> list[int]:
    return [int(line) for line in _read(cgroup / "cgroup.procs").split()]


def _event(data: bytes, key: str) -> str | None:
    for line in data.decode().splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return value.strip()
    return None


def _wait_event(events: Path, key: str, want: str, timeout: float) -> bool:
    """Block until ``key`` in cgroup.events reads ``want``; False once ``timeout`` seconds have passed.

    The kernel wakes poll() with POLLPRI|POLLERR when the file changes after our last read, so each
    round reads (which re-arms the notification) and then sleeps in poll(); there is no race between
    the read and the poll because a change in between makes poll() return at once.
    """
    deadline = time.monotonic() + max(timeout, 0.0)
    try:
        fd = os.open(events, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CgroupError(f"cgroup {events.parent}: does not exist", hint="check the leaf name") from None
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while True:
            try:
                os.lseek(fd, 0, os.SEEK_SET)
                data = os.read(fd, 4096)
            except OSError as exc:
                if exc.errno == errno.ENODEV:
                    # The cgroup was removed while we waited: nothing can live in it any more.
                    return want == "0"
                raise CgroupError(f"cgroup {events.parent}: cannot read cgroup.events: {exc.strerror}") from exc
            if _event(data, key) == want:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(min(remaining, _POLL_CAP_SECONDS) * 1000.0)
    finally:
        os.close(fd)


def _check_name(name: str) -> None:
    valid = (
        0 < len(name) <= _NAME_MAX
        and _NAME_RE.fullmatch(name) is not None
        and not name.startswith(".")  # ".", ".." and systemd's ".control" subgroup
        and name != SUPERVISOR
        and not any(name.startswith(prefix + ".") for prefix in _RESERVED_PREFIXES)
    )
    if not valid:
        raise CgroupError(
            f"cgroup leaf name {name!r}: invalid",
            hint=(
                "use one path component of [A-Za-z0-9._-], not starting with '.', not 'supervisor', "
                "not '<controller>.*' (e.g. model-<id>)"
            ),
        )


class CgroupFsTree:
    """The subtree the daemon owns and is the single writer of: root/supervisor plus one leaf per model.

    Not locked: the daemon calls it from one place at a time (the single-writer rule also applies inside it).
    """

    def __init__(self, root: Path) -> None:
        root = Path(os.path.abspath(root)).resolve()
        mounts = _mounts()
        mount = _mount_of(root, mounts)
        if mount is None or mount.fstype != "cgroup2":
            # Checked before mkdir: never create directories on a v1 hierarchy, a tmpfs or a disk.
            where = "no mount" if mount is None else f"{mount.mount_point} ({mount.fstype})"
            found = _cgroup2_mount()
            raise CgroupError(
                f"cgroup root {root}: not on a cgroup2 mount (it is on {where})",
                hint=(
                    f"pass --cgroup-root a directory under the cgroup2 mount at {found.mount_point}"
                    if found is not None
                    else "mount cgroup2 (mount -t cgroup2 none /sys/fs/cgroup) and pass --cgroup-root under it"
                ),
            )
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CgroupError(
                f"cgroup root {root}: cannot create it: {exc.strerror}",
                hint="run gpushared as root, or under systemd with Delegate=yes and --cgroup-root its own cgroup",
            ) from exc
        if not (root / "cgroup.procs").is_file():
            raise CgroupError(f"cgroup root {root}: is not a cgroup directory (no cgroup.procs)")
        self.root = root

    def _leaf(self, name: str) -> Path:
        _check_name(name)
        return self.root / name

    def _existing_leaf(self, name: str) -> Path:
        leaf = self._leaf(name)
        if not (leaf / "cgroup.procs").is_file():
            raise CgroupError(f"cgroup leaf {leaf}: does not exist", hint="create it with create_leaf first")
        return leaf

    def probe(self) -> CgroupSupport:
        """Enable memory, pids and cpu for the leaves where the parent delegates them; say what is missing.

        The kernel refuses (EBUSY) to enable controllers while a process lives in root itself, so call this
        after adopt_supervisor.
        """
        root = self.root
        files = (root, root / "cgroup.procs", root / "cgroup.subtree_control")
        writable = all(os.access(path, os.W_OK) for path in files)
        if not writable:
            return CgroupSupport(
                False,
                frozenset(),
                f"cgroup2 at {root} is not writable by uid {os.geteuid()}: model leaves cannot be created "
                "(run gpushared as root, or under systemd with Delegate=yes)",
            )
        available = frozenset(_read(root / "cgroup.controllers").split())
        failed: dict[str, str] = {}
        for controller in WANTED_CONTROLLERS:
            enabled = frozenset(_read(root / "cgroup.subtree_control").split())
            if controller in available and controller not in enabled:
                # One controller per write: a refusal of one (e.g. cpu with realtime tasks) must not block the rest.
                try:
                    _write(root / "cgroup.subtree_control", f"+{controller}")
                except CgroupError as exc:
                    failed[controller] = exc.message
        enabled = frozenset(_read(root / "cgroup.subtree_control").split())
        missing = [c for c in WANTED_CONTROLLERS if c not in enabled]
        if not missing:
            reason = f"cgroup2 at {root}: memory, pids and cpu are enabled for model leaves: limits are enforced"
        elif not enabled & set(WANTED_CONTROLLERS) and not failed:
            reason = (
                f"cgroup2 at {root} has no controllers enabled: memory.max, pids.max and cpu.weight are not enforced "
                "(the parent cgroup does not delegate them; on a hybrid host they are bound to cgroup v1)"
            )
        else:
            parts = []
            for controller in missing:
                if controller in failed:
                    parts.append(
                        f"{controller} could not be enabled ({failed[controller]}; "
                        f"a process living in {root} itself blocks it: call adopt_supervisor first)"
                    )
                else:
                    parts.append(f"{controller} is not delegated by the parent cgroup")
            unenforced = ", ".join(_LIMIT_FILES[c] for c in missing)
            reason = f"cgroup2 at {root}: {'; '.join(parts)}: {unenforced} not enforced"
        return CgroupSupport(True, enabled, reason)

    def adopt_supervisor(self, pid: int) -> None:
        """Move ``pid`` (the daemon) into root/supervisor, so root holds no process and can have leaves."""
        supervisor = self.root / SUPERVISOR
        try:
            supervisor.mkdir(exist_ok=True)
        except OSError as exc:
            raise CgroupError(f"cgroup {supervisor}: cannot create it: {exc.strerror}") from exc
        _write(
            supervisor / "cgroup.procs",
            str(pid),
            fix=f"pid {pid} must exist, and {self.root} must not be a threaded cgroup",
        )

    def create_leaf(self, name: str) -> Path:
        """Create root/<name> for one model; refuses while a process still lives in root itself."""
        leaf = self._leaf(name)
        squatters = _pids_in(self.root)
        if squatters:
            # No-internal-process rule: leaves next to a process in root would make enabling controllers
            # fail later, so fail now with the cause.
            raise CgroupError(
                f"cgroup root {self.root}: processes {squatters} live in it, so it cannot hold model leaves",
                hint="call adopt_supervisor(<daemon pid>) before creating leaves",
            )
        try:
            leaf.mkdir()
        except FileExistsError:
            raise CgroupError(
                f"cgroup leaf {leaf}: already exists",
                hint="stop and remove the old leaf (kill, wait_empty, remove_leaf) or pick another name",
            ) from None
        except OSError as exc:
            raise CgroupError(f"cgroup leaf {leaf}: cannot create it: {exc.strerror}") from exc
        return leaf

    def set_limits(
        self, name: str, *, memory_max: int | None, pids_max: int | None, cpu_weight: int | None
    ) -> list[str]:
        """Write the limits the leaf's enabled controllers allow; return one line per limit NOT applied."""
        leaf = self._existing_leaf(name)
        requested = {"memory": memory_max, "pids": pids_max, "cpu": cpu_weight}
        bounds = {"memory": (1, None), "pids": (1, None), "cpu": (1, 10000)}
        for controller, value in requested.items():
            low, high = bounds[controller]
            if value is not None and (value < low or (high is not None and value > high)):
                raise CgroupError(
                    f"cgroup leaf {leaf}: {_LIMIT_FILES[controller]}={value} is out of range",
                    hint=f"use {low}..{high}" if high is not None else f"use a value >= {low}",
                )
        enabled = frozenset(_read(leaf / "cgroup.controllers").split())
        not_applied: list[str] = []
        for controller, value in requested.items():
            if value is None:
                continue
            limit_file = _LIMIT_FILES[controller]
            if controller not in enabled:
                listed = ", ".join(sorted(enabled)) or "none"
                not_applied.append(
                    f"{limit_file}={value} not applied: the {controller} controller is not enabled for {leaf} "
                    f"(enabled: {listed})"
                )
                continue
            _write(leaf / limit_file, str(value))
        return not_applied

    def leaves(self) -> list[str]:
        """The model leaves, sorted; supervisor/ and dot-named groups (systemd's .control) are not leaves."""
        names = []
        for entry in self.root.iterdir():
            try:
                _check_name(entry.name)
            except CgroupError:
                continue
            if entry.is_dir():
                names.append(entry.name)
        return sorted(names)

    def pids(self, name: str) -> list[int]:
        """The processes in the leaf (cgroup.procs; zombies are not listed)."""
        return _pids_in(self._existing_leaf(name))

    def populated(self, name: str) -> bool:
        """Whether any live process is in the leaf or below it."""
        leaf = self._existing_leaf(name)
        return _event(_read(leaf / "cgroup.events").encode(), "populated") == "1"

    def wait_empty(self, name: str, timeout: float) -> bool:
        """Block until the leaf is not populated; False if something still lives after ``timeout`` seconds."""
        return _wait_event(self._existing_leaf(name) / "cgroup.events", "populated", "0", timeout)

    def kill(self, name: str) -> None:
        """SIGKILL everything in the leaf, including processes that double-forked or changed session."""
        leaf = self._existing_leaf(name)
        if (leaf / "cgroup.kill").exists():
            # The kernel kills the whole subtree atomically with respect to forks and migrations (Linux >= 5.14).
            _write(leaf / "cgroup.kill", "1")
        else:
            self._freeze_and_kill(leaf)

    def _freeze_and_kill(self, leaf: Path) -> None:
        # Without cgroup.kill, a kill loop races with fork(); freezing first stops new forks, then every pid
        # gets SIGKILL and the thaw lets the signals be delivered.
        _write(leaf / "cgroup.freeze", "1")
        try:
            # A task in uninterruptible sleep may never report frozen; kill what is there anyway.
            _wait_event(leaf / "cgroup.events", "frozen", "1", _FREEZE_TIMEOUT_SECONDS)
            for directory, _, _ in os.walk(leaf):
                for pid in _pids_in(Path(directory)):
                    with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                        os.kill(pid, signal.SIGKILL)
        finally:
            _write(leaf / "cgroup.freeze", "0")

    def remove_leaf(self, name: str) -> None:
        """rmdir the leaf; a missing leaf is fine, a populated one is refused."""
        leaf = self._leaf(name)
        if not leaf.exists():
            return
        if self.populated(name):
            raise CgroupError(
                f"cgroup leaf {leaf}: still holds processes {self.pids(name)}",
                hint="stop them first: kill, then wait_empty, then remove_leaf",
            )
        try:
            leaf.rmdir()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CgroupError(
                f"cgroup leaf {leaf}: cannot remove it: {exc.strerror}",
                hint="a process or a child cgroup is still inside: kill it and wait_empty first",
            ) from exc

    def procs_file(self, name: str) -> Path:
        """root/<name>/cgroup.procs, for a launcher that joins the leaf before exec."""
        return self._leaf(name) / "cgroup.procs"

    def join(self, name: str, pid: int) -> None:
        """Move process ``pid`` into leaf ``name``."""
        procs = self.procs_file(name)
        try:
            procs.write_text(str(pid))
        except OSError as exc:
            raise CgroupError(f"cgroup leaf {procs.parent}: cannot move pid {pid} into it ({exc.strerror})") from exc


# The launcher runs as root with an empty environment, in "/" and isolated (-I: no PYTHON* variables, no user
# site, no cwd on sys.path; -S: no site), so nothing the model owner controls reaches a root process. It:
#   1. reads the real environment from an inherited memfd (env vars like LD_PRELOAD must never reach the root
#      launcher, and Python's locale coercion would add LC_CTYPE to os.environ),
#   2. waits until the daemon has moved it into the leaf (or, if that failed, writes its own pid to the leaf's
#      cgroup.procs while still root: root owns that file, and a migration also needs write access at the common
#      ancestor of supervisor/ and the leaf, which a user never has),
#   3. drops privileges for good: setgroups, setresgid, setresuid (capabilities go with uid 0), and checks that
#      uid 0 cannot be regained,
#   4. chdirs as the user (the daemon cannot read a user's 0700 directories, and should not),
#   5. execs the real argv.
# The first instruction of user code therefore runs inside the leaf and never as root. Any failure is written to
# the error pipe, which exec closes on success (it is close-on-exec), so the parent learns the outcome at once.
_LAUNCHER = r"""
import os, sys
procs, env_fd, err_fd, sync_fd, uid, gid, groups, cwd = sys.argv[1:9]
argv = sys.argv[9:]
err_fd = int(err_fd)
os.set_inheritable(err_fd, False)
stage = "env"
try:
    fd = int(env_fd)
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    env = dict(item.split(b"=", 1) for item in b"".join(chunks).split(b"\0") if item)
    stage = "join"
    fd = int(sync_fd)
    moved = os.read(fd, 1)
    os.close(fd)
    if moved != b"1":
        fd = os.open(procs, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
    stage = "privileges"
    if groups != "-":
        os.setgroups([int(g) for g in groups.split(",") if g])
    if gid != "-":
        os.setresgid(int(gid), int(gid), int(gid))
    if uid != "-":
        os.setresuid(int(uid), int(uid), int(uid))
        if int(uid) != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise PermissionError(1, "uid 0 could be regained after dropping privileges")
    stage = "cwd"
    os.chdir(cwd)
    stage = "exec"
    os.execvpe(argv[0], argv, env)
except BaseException as exc:
    code = getattr(exc, "errno", None) or 0
    os.write(err_fd, ("%s\0%d\0%s" % (stage, code, exc)).encode(errors="replace"))
    os._exit(125)
"""


def _encode_env(env: dict[str, str]) -> bytes:
    items = []
    for key, value in env.items():
        if not key or "=" in key or "\0" in key or "\0" in value:
            raise CgroupError(f"environment variable {key!r}: invalid name or value", hint="no '=' in names, no NUL")
        items.append(os.fsencode(key) + b"=" + os.fsencode(value))
    return b"\0".join(items)


def spawn_in_leaf(
    tree: CgroupFsTree,
    name: str,
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str,
    user: int | None,
    group: int | None,
    extra_groups: list[int] | None,
    stdout: int,
    stderr: int,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` already inside leaf ``name``, as ``user``/``group``, in a new session.

    Returns once the real program has been exec'd. Like subprocess.Popen, a failure to change uid, chdir
    or exec raises OSError (FileNotFoundError for a missing program); a failure to join the leaf raises
    CgroupError. ``user`` without ``group`` uses the passwd primary group; ``user`` without ``extra_groups``
    clears the supplementary groups, so root's groups never leak into the child.
    """
    if not argv:
        raise CgroupError(f"cgroup leaf {tree.root / name}: empty argv", hint="give the program to run")
    procs = tree.procs_file(name)
    if not procs.is_file():
        raise CgroupError(f"cgroup leaf {procs.parent}: does not exist", hint="create it with create_leaf first")
    if user is not None and group is None:
        try:
            group = pwd.getpwuid(user).pw_gid
        except KeyError:
            raise CgroupError(
                f"cgroup leaf {procs.parent}: uid {user} has no passwd entry",
                hint="pass group= explicitly so the child does not keep gid 0",
            ) from None
    if user is not None and extra_groups is None:
        extra_groups = []
    env_blob = _encode_env(env)
    launcher_argv = [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _LAUNCHER,
        str(procs),
        "",  # env fd, filled in below
        "",  # error fd, filled in below
        "",  # sync fd, filled in below
        "-" if user is None else str(user),
        "-" if group is None else str(group),
        "-" if extra_groups is None else ",".join(str(g) for g in extra_groups),
        cwd,
        *argv,
    ]
    # A memfd rather than a pipe: the whole environment is written before the launcher starts, so neither side
    # can block on a full pipe buffer.
    env_fd = os.memfd_create("gpushare-env", os.MFD_CLOEXEC)
    err_read, err_write = os.pipe2(os.O_CLOEXEC)
    sync_read, sync_write = os.pipe2(os.O_CLOEXEC)
    try:
        written = 0
        while written < len(env_blob):
            written += os.write(env_fd, env_blob[written:])
        os.lseek(env_fd, 0, os.SEEK_SET)
        launcher_argv[6], launcher_argv[7], launcher_argv[8] = str(env_fd), str(err_write), str(sync_read)
        proc = subprocess.Popen(
            launcher_argv,
            env={},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            pass_fds=(env_fd, err_write, sync_read),
            start_new_session=True,
        )
        # Move the launcher into the leaf from here while its interpreter starts: the cgroup.procs write can take
        # ~10 ms (the kernel waits out an RCU grace period), and done here it overlaps the ~10 ms start-up instead
        # of following it. The launcher waits for the byte, so nothing it starts can land outside the leaf; on
        # failure it tries the write itself and reports the error.
        try:
            tree.join(name, proc.pid)
        except CgroupError:
            os.write(sync_write, b"0")
        else:
            os.write(sync_write, b"1")
    except BaseException:
        os.close(err_read)
        raise
    finally:
        os.close(env_fd)
        os.close(err_write)
        os.close(sync_read)
        os.close(sync_write)
    with os.fdopen(err_read, "rb") as errors:
        report = errors.read()
    if not report:
        return proc
    proc.wait()
    stage, code_text, message = report.decode(errors="replace").split("\0", 2)
    code = int(code_text)
    if stage == "join" or code == 0:
        raise CgroupError(
            f"cgroup leaf {procs.parent}: the launcher could not join it ({stage}: {message})",
            hint="check that the leaf exists and that gpushared runs as root",
        )
    # OSError(errno, ...) returns the matching subclass (FileNotFoundError, PermissionError), as Popen raises.
    filename = {"cwd": cwd, "exec": argv[0]}.get(stage)
    raise OSError(code, f"{stage} as uid {user if user is not None else 'unchanged'}: {os.strerror(code)}", filename)
