"""Real systemd 252 as PID 1 for system tests: a cached Debian 12 root booted with systemd-nspawn.

Follows shared/tools/nspawn-recipe.sh (the recipe proven on these machines, whose PID 1 is not systemd):

* the root is built once with ``debootstrap --variant=minbase`` and cached under
  ``/var/cache/gpushare-test/bookworm-root``, keyed by the package list (a different list rebuilds it);
* every boot uses ``--volatile=overlay`` so the cached root is never written to (changes live in a tmpfs);
* ``--register=no --keep-unit``: there is no machined or system bus on the host;
* each container runs in its own host cgroup (both the cgroup2 and the name=systemd v1 hierarchy), so two
  containers never share nspawn's ``payload/`` cgroup, and the harness removes those cgroups afterwards;
* commands run inside through ``nsenter -t <container PID 1> -a`` with a clean environment;
* teardown always happens: ``systemctl poweroff``, then SIGKILL of the container's PID 1, then of nspawn.

Nothing here imports gpushare: it is plain host plumbing, usable from a shell (``python -m tests.system.nspawn``).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

CACHE = Path(os.environ.get("GPUSHARE_TEST_CACHE", "/var/cache/gpushare-test"))
ROOT = CACHE / "bookworm-root"
MIRROR = os.environ.get("GPUSHARE_TEST_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
# What the root holds besides minbase. systemd/systemd-sysv/dbus: a real PID 1 with a bus; python3: the runtime
# the package's venv is built against (Debian 12 = 3.11, like the build host); procps: ps/pgrep for the tests;
# adduser/passwd: what a maintainer script may call. Changing this list rebuilds the cached root.
PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "procps", "adduser", "passwd")
HOST_TOOLS = {"debootstrap": "debootstrap", "systemd-nspawn": "systemd-container"}
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup"))
CLEAN_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "HOME": "/root"}


class HarnessError(RuntimeError):
    """The environment cannot run system tests (no root, no tools, no network for the first build)."""


def why_unavailable() -> str | None:
    """None when system tests can run here, else the reason (for pytest.skip)."""
    if os.geteuid() != 0:
        return "system tests need root (debootstrap, systemd-nspawn)"
    if not any((h / "cgroup.procs").exists() and _is_cgroup2(h) for h in CGROUP_HIERARCHIES):
        return "no cgroup2 hierarchy on this host"
    return None


def _is_cgroup2(path: Path) -> bool:
    return (path / "cgroup.controllers").exists()


def ensure_host_tools() -> None:
    """debootstrap and systemd-nspawn from Debian's packages (apt), installed once if missing."""
    missing = sorted({pkg for tool, pkg in HOST_TOOLS.items() if shutil.which(tool) is None})
    if not missing:
        return
    env = {**CLEAN_ENV, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *missing]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False, timeout=600)
        if done.returncode != 0:
            raise HarnessError(
                f"{' '.join(argv)} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
            )


def root_key(packages: Sequence[str] = PACKAGES) -> str:
    text = "\n".join([SUITE, "minbase", *sorted(packages)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def ensure_root(packages: Sequence[str] = PACKAGES) -> Path:
    """The cached Debian 12 root; built (about 90 s, network to the Debian mirror) when absent or stale."""
    ensure_host_tools()
    key = root_key(packages)
    key_file = CACHE / "bookworm-root.key"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs must not build into the same place
        if (ROOT / "usr/lib/systemd/systemd").exists() and key_file.exists() and key_file.read_text().strip() == key:
            return ROOT
        building = CACHE / f"bookworm-root.building-{os.getpid()}"
        shutil.rmtree(building, ignore_errors=True)
        argv = ["debootstrap", "--variant=minbase", f"--include={','.join(packages)}", SUITE, str(building), MIRROR]
        done = subprocess.run(argv, env=CLEAN_ENV, capture_output=True, text=True, check=False, timeout=1200)
        if done.returncode != 0 or not (building / "usr/lib/systemd/systemd").exists():
            shutil.rmtree(building, ignore_errors=True)
            raise HarnessError(f"debootstrap failed ({done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        (building / "etc/apt/sources.list").write_text(f"deb {MIRROR} {SUITE} main\n")
        subprocess.run(["chroot", str(building), "apt-get", "clean"], env=CLEAN_ENV, check=False, capture_output=True)
        # A fixed machine-id: journald needs one, and --volatile=overlay would otherwise make a new one each boot.
        (building / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        old = CACHE / f"bookworm-root.old-{os.getpid()}"
        if ROOT.exists():
            ROOT.rename(old)
        building.rename(ROOT)
        key_file.write_text(key + "\n")
        shutil.rmtree(old, ignore_errors=True)
        return ROOT


def _own_cgroups(name: str) -> list[Path]:
    """One fresh cgroup per container in every writable host hierarchy that tracks processes."""
    dirs = []
    for hierarchy in CGROUP_HIERARCHIES:
        if (hierarchy / "cgroup.procs").exists() and os.access(hierarchy / "cgroup.procs", os.W_OK):
            dirs.append(hierarchy / "gpushare-test" / name)
    return dirs


def run_isolated(argv: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a one-shot ``systemd-nspawn ...`` in cgroups of its own, removed afterwards (nspawn creates
    payload/ and supervisor/ below whatever cgroup it starts in)."""
    cgroups = _own_cgroups(f"run-{uuid.uuid4().hex[:8]}")
    for cgroup in cgroups:
        cgroup.mkdir(parents=True, exist_ok=True)
    moves = " ".join(f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))};" for c in cgroups)
    try:
        return subprocess.run(
            ["sh", "-c", f"{moves} exec {shlex.join(argv)}"],
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            check=False,
            timeout=timeout,
        )
    finally:
        for cgroup in cgroups:
            _rmdir_tree(cgroup)


def _rmdir_tree(top: Path) -> None:
    if not top.is_dir():
        return
    for directory, _, _ in os.walk(top, topdown=False):
        with contextlib.suppress(OSError):
            os.rmdir(directory)
    with contextlib.suppress(OSError):  # the shared parent, once no other container uses it
        top.parent.rmdir()


class Container:
    """A booted Debian 12 root with systemd 252 as PID 1. Use as a context manager: teardown always runs."""

    def __init__(
        self,
        root: Path,
        *,
        binds_ro: dict[Path, str] | None = None,
        name: str | None = None,
        log_dir: Path | None = None,
    ) -> None:
        self.root = root
        self.binds_ro = binds_ro or {}
        self.name = name or f"gst-{uuid.uuid4().hex[:8]}"
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="gpushare-nspawn-"))
        self.console_log = self.log_dir / f"{self.name}.console.log"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader: int | None = None
        self._cgroups = _own_cgroups(self.name)

    # -- lifecycle ---------------------------------------------------------------------------------------------

    def __enter__(self) -> Container:
        try:
            self.boot()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.teardown()

    def boot(self, timeout: float = 60.0) -> None:
        for cgroup in self._cgroups:
            cgroup.mkdir(parents=True, exist_ok=True)
        moves = " ".join(f"echo $$ > {shlex.quote(str(c / 'cgroup.procs'))};" for c in self._cgroups)
        argv = [
            "systemd-nspawn",
            "-D",
            str(self.root),
            "--boot",
            "--register=no",
            "--keep-unit",
            "--volatile=overlay",
            "--private-network",
            "--console=pipe",
            f"--machine={self.name}",
        ]
        for host, inside in self.binds_ro.items():
            argv.append(f"--bind-ro={host}:{inside}")
        # The shell puts itself (and so nspawn, which it execs) into this container's own cgroups first.
        # SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1: a pure cgroup2 inside, which Delegate= needs (read by nspawn itself).
        script = f"{moves} exec env SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1 {shlex.join(argv)}"
        with open(self.console_log, "wb") as log:
            self.nspawn = subprocess.Popen(
                ["sh", "-c", script],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=CLEAN_ENV,
            )
        deadline = time.monotonic() + timeout
        while self.leader is None:
            if self.nspawn.poll() is not None:
                raise HarnessError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}")
            if time.monotonic() > deadline:
                raise HarnessError(f"no container PID 1 after {timeout}s:\n{self.console()}")
            for child in _children(self.nspawn.pid):
                if _comm(child) == "systemd":
                    self.leader = child
            time.sleep(0.05)
        self.wait_running(deadline - time.monotonic())

    def wait_running(self, timeout: float = 60.0) -> str:
        """Block until PID 1 reports running (or degraded); return that state."""
        deadline = time.monotonic() + max(timeout, 5.0)
        state = ""
        while time.monotonic() < deadline:
            done = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=max(deadline - time.monotonic(), 1)
            )
            state = done.stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.1)
        raise HarnessError(f"container systemd not running after {timeout}s (last: {state!r}):\n{self.console()}")

    def teardown(self) -> None:
        """Power off; if that does not end nspawn in time, SIGKILL the container's PID 1, then nspawn."""
        nspawn, leader = self.nspawn, self.leader
        if nspawn is not None and nspawn.poll() is None:
            if leader is not None:
                with contextlib.suppress(Exception):
                    self.run("systemctl", "poweroff", "--no-block", check=False, timeout=10)
            else:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(nspawn.pid, signal.SIGTERM)
            try:
                nspawn.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # Killing PID 1 ends the whole PID namespace; SIGKILL of nspawn alone would orphan the container.
                if leader is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(leader, signal.SIGKILL)
                try:
                    nspawn.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    nspawn.kill()
                    nspawn.wait(timeout=10)
        if nspawn is not None and nspawn.returncode is None:
            nspawn.wait(timeout=10)
        self.nspawn = None
        self.leader = None
        for cgroup in self._cgroups:
            _rmdir_tree(cgroup)

    # -- inside ------------------------------------------------------------------------------------------------

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 120,
        user: str | None = None,
        input: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in all of the container's namespaces, as root or as ``user`` (with its groups)."""
        if self.leader is None:
            raise HarnessError("container is not running")
        inner = list(argv)
        if user is not None:
            inner = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", *inner]
        environment = {**CLEAN_ENV, **(env or {})}
        if user is not None:
            environment["HOME"] = "/"
        command = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "env",
            "-i",
            *(f"{k}={v}" for k, v in environment.items()),
            *inner,
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, input=input, check=False)
        if check and done.returncode != 0:
            raise AssertionError(
                f"{shlex.join(argv)} exited {done.returncode} in {self.name}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
            )
        return done

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str, mode: str = "0644") -> None:
        self.run(
            "sh",
            "-c",
            f'mkdir -p "$(dirname {shlex.quote(path)})" && cat > {shlex.quote(path)} && chmod {mode} {shlex.quote(path)}',
            input=text,
        )

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def console(self) -> str:
        return self.console_log.read_text(errors="replace")[-6000:] if self.console_log.exists() else ""


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(p) for p in text.split()]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def booted(binds_ro: dict[Path, str] | None = None) -> Iterator[Container]:
    with Container(ensure_root(), binds_ro=binds_ro) as container:
        yield container


if __name__ == "__main__":  # build the cached root ahead of time: python -m tests.system.nspawn
    print(ensure_root())
