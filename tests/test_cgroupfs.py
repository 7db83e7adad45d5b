"""The cgroupfs adapter against the real cgroup2 hierarchy: every test owns a fresh subtree, killed and removed after."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpushared.adapters.cgroupfs import (
    WANTED_CONTROLLERS,
    CgroupError,
    CgroupFsTree,
    find_cgroup2_mount,
    own_cgroup_path,
    spawn_in_leaf,
)

REPO = Path(__file__).resolve().parent.parent
BASE = find_cgroup2_mount()
OTHER_UID = 4242
OTHER_GID = 4242
PATH_ENV = {"PATH": "/usr/bin:/bin"}
# Only a bound on how long to wait for the kernel before declaring failure, never an assertion on speed.
PATIENCE = 30.0

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or BASE is None, reason="needs root and a writable cgroup2 mount")


@dataclass
class Sandbox:
    tree: CgroupFsTree
    tmp: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def root(self) -> Path:
        return self.tree.root

    def cgroup_line(self, name: str) -> str:
        """The /proc/PID/cgroup line a process in leaf ``name`` shows."""
        assert BASE is not None
        return "0::/" + str((self.root / name).relative_to(BASE))

    def track(self, process: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
        self.processes.append(process)
        return process

    def spawn(
        self,
        name: str,
        argv: list[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str = "/",
        user: int | None = None,
        group: int | None = None,
        extra_groups: list[int] | None = None,
        output: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """spawn_in_leaf with stdout/stderr to files in tmp (or /dev/null)."""
        out = open(self.tmp / output, "wb") if output else open(os.devnull, "wb")  # noqa: SIM115
        err = open(self.tmp / (output + ".err") if output else os.devnull, "wb")  # noqa: SIM115
        with out, err:
            process = spawn_in_leaf(
                self.tree,
                name,
                argv,
                env=PATH_ENV if env is None else env,
                cwd=cwd,
                user=user,
                group=group,
                extra_groups=extra_groups,
                stdout=out.fileno(),
                stderr=err.fileno(),
            )
        return self.track(process)

    def output(self, name: str) -> str:
        return (self.tmp / name).read_text()


def _destroy(root: Path, processes: list[subprocess.Popen[bytes]]) -> None:
    """Kill everything under root, reap our children, then rmdir bottom-up; uses no code under test."""
    if root.is_dir():
        for directory, _, _ in os.walk(root):
            freeze = Path(directory) / "cgroup.freeze"
            if freeze.exists():
                freeze.write_text("0")
        (root / "cgroup.kill").write_text("1")
    for process in processes:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=PATIENCE)
    if not root.is_dir():
        return
    deadline = time.monotonic() + PATIENCE
    while "populated 1" in (root / "cgroup.events").read_text() and time.monotonic() < deadline:
        time.sleep(0.02)
    for directory, _, _ in os.walk(root, topdown=False):
        os.rmdir(directory)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    assert BASE is not None
    root = BASE / f"gpushare-test-{secrets.token_hex(6)}"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        box = Sandbox(CgroupFsTree(root), tmp_path, processes)
        yield box
    finally:
        _destroy(root, processes)
    assert not root.exists()


def wait_for(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        time.sleep(0.02)


def cgroup_of(pid: int) -> str:
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line for line in lines if line.startswith("0::"))


def status_of(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def session_of(pid: int) -> int:
    # Field 6 of /proc/PID/stat, counted after the ")" that ends the command name.
    after_comm = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(after_comm[3])


# --- the tree ---------------------------------------------------------------------------------------------------


def test_probe_reports_writable_and_why_limits_are_not_enforced(sandbox: Sandbox) -> None:
    assert BASE is not None
    delegated = set((BASE / "cgroup.subtree_control").read_text().split())
    support = sandbox.tree.probe()
    assert support.writable
    assert support.controllers == frozenset(delegated & set(WANTED_CONTROLLERS))
    if not delegated & set(WANTED_CONTROLLERS):  # this hybrid host: memory, pids and cpu are bound to cgroup v1
        assert support.reason.startswith(f"cgroup2 at {sandbox.root} has no controllers enabled: ")
        assert "memory.max, pids.max and cpu.weight are not enforced" in support.reason
        sandbox.tree.create_leaf("model-a")
        not_applied = sandbox.tree.set_limits("model-a", memory_max=1 << 30, pids_max=512, cpu_weight=200)
        assert [line.split(" ", 1)[0] for line in not_applied] == [
            "memory.max=1073741824",
            "pids.max=512",
            "cpu.weight=200",
        ]
        assert all("not applied" in line and str(sandbox.root / "model-a") in line for line in not_applied)
        assert not (sandbox.root / "model-a" / "memory.max").exists()
        assert sandbox.tree.set_limits("model-a", memory_max=None, pids_max=None, cpu_weight=None) == []


def test_set_limits_refuses_out_of_range_values(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    for limits in ({"cpu_weight": 0}, {"cpu_weight": 10001}, {"memory_max": 0}, {"pids_max": -1}):
        arguments: dict[str, int | None] = {"memory_max": None, "pids_max": None, "cpu_weight": None, **limits}
        with pytest.raises(CgroupError, match="out of range"):
            sandbox.tree.set_limits("model-a", **arguments)


def test_adopt_supervisor_moves_the_daemon_and_leaves_exclude_it(sandbox: Sandbox) -> None:
    daemon = sandbox.track(subprocess.Popen(["sleep", "600"]))
    sandbox.tree.adopt_supervisor(daemon.pid)
    assert cgroup_of(daemon.pid) == sandbox.cgroup_line("supervisor")
    assert sandbox.tree.leaves() == []
    assert sandbox.tree.create_leaf("model-b") == sandbox.root / "model-b"
    sandbox.tree.create_leaf("model-a")
    assert sandbox.tree.leaves() == ["model-a", "model-b"]
    assert sandbox.tree.pids("model-a") == []
    assert not sandbox.tree.populated("model-a")
    with pytest.raises(CgroupError, match=f"{sandbox.root / 'model-a'}: already exists"):
        sandbox.tree.create_leaf("model-a")
    assert sandbox.tree.probe().writable  # enabling controllers is allowed once root holds no process


def test_create_leaf_refused_while_a_process_lives_in_root(sandbox: Sandbox) -> None:
    daemon = sandbox.track(subprocess.Popen(["sleep", "600"]))
    (sandbox.root / "cgroup.procs").write_text(str(daemon.pid))
    with pytest.raises(CgroupError) as refused:
        sandbox.tree.create_leaf("model-a")
    assert str(sandbox.root) in str(refused.value)
    assert "adopt_supervisor" in str(refused.value)
    assert not (sandbox.root / "model-a").exists()
    sandbox.tree.adopt_supervisor(daemon.pid)
    sandbox.tree.create_leaf("model-a")


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "a/b", "../x", "supervisor", ".control", "memory.max", "cgroup.procs", "a b", "ü", "x" * 256],
)
def test_invalid_leaf_names_are_refused(sandbox: Sandbox, name: str) -> None:
    with pytest.raises(CgroupError, match="invalid"):
        sandbox.tree.create_leaf(name)
    with pytest.raises(CgroupError, match="invalid"):
        sandbox.tree.procs_file(name)
    assert sandbox.tree.leaves() == []


def test_valid_unusual_names_are_accepted(sandbox: Sandbox) -> None:
    for name in ("model-1.q4_K_M", "a", "x" * 255, "memoryless"):
        sandbox.tree.create_leaf(name)
    assert len(sandbox.tree.leaves()) == 4


def test_root_not_on_cgroup2_is_refused_and_not_created(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    with pytest.raises(CgroupError, match="not on a cgroup2 mount") as refused:
        CgroupFsTree(root)
    assert str(root) in str(refused.value)
    assert "--cgroup-root" in str(refused.value)
    assert not root.exists()


def test_root_on_a_cgroup_v1_hierarchy_is_refused_and_not_created() -> None:
    v1 = Path("/sys/fs/cgroup/memory")
    if not (v1 / "memory.limit_in_bytes").exists():
        pytest.skip("no cgroup v1 memory hierarchy on this host")
    root = v1 / f"gpushare-test-{secrets.token_hex(6)}"
    with pytest.raises(CgroupError, match="not on a cgroup2 mount") as refused:
        CgroupFsTree(root)
    assert str(root) in str(refused.value)
    assert not root.exists()


def test_missing_leaf_is_an_error_except_for_remove(sandbox: Sandbox) -> None:
    for operation in (sandbox.tree.pids, sandbox.tree.populated, sandbox.tree.kill):
        with pytest.raises(CgroupError, match=f"{sandbox.root / 'ghost'}: does not exist"):
            operation("ghost")
    with pytest.raises(CgroupError, match="does not exist"):
        sandbox.tree.wait_empty("ghost", 0)
    sandbox.tree.remove_leaf("ghost")


# --- spawning inside a leaf -------------------------------------------------------------------------------------


def test_child_and_its_children_run_in_the_leaf_from_the_start(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    # The program reports its own cgroup as its first action: it was in the leaf before it ran.
    first = sandbox.spawn("model-a", ["cat", "/proc/self/cgroup"], output="first")
    assert first.wait() == 0
    assert sandbox.cgroup_line("model-a") in sandbox.output("first").splitlines()

    main = sandbox.spawn("model-a", ["sh", "-c", "sleep 60 & sleep 60"])
    assert cgroup_of(main.pid) == sandbox.cgroup_line("model-a")  # already there when spawn returns
    wait_for(lambda: len(sandbox.tree.pids("model-a")) >= 2, "sh and its sleeps")
    for pid in sandbox.tree.pids("model-a"):
        assert cgroup_of(pid) == sandbox.cgroup_line("model-a")
        assert session_of(pid) == main.pid  # start_new_session: the child leads its own session
    assert main.pid in sandbox.tree.pids("model-a")
    assert sandbox.tree.populated("model-a")


def test_child_runs_as_the_requested_user_without_root_groups_or_capabilities(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    probe = sandbox.spawn("model-a", ["cat", "/proc/self/status"], user=OTHER_UID, group=OTHER_GID, output="status")
    assert probe.wait() == 0
    status = status_of(sandbox.output("status"))
    assert status["Uid"].split() == [str(OTHER_UID)] * 4
    assert status["Gid"].split() == [str(OTHER_GID)] * 4
    assert status["Groups"] == ""
    assert int(status["CapEff"], 16) == 0
    assert int(status["CapPrm"], 16) == 0

    sleeper = sandbox.spawn("model-a", ["sleep", "60"], user=OTHER_UID, group=OTHER_GID, extra_groups=[4243])
    status = status_of(Path(f"/proc/{sleeper.pid}/status").read_text())
    assert status["Uid"].split() == [str(OTHER_UID)] * 4
    assert status["Groups"].split() == ["4243"]
    assert cgroup_of(sleeper.pid) == sandbox.cgroup_line("model-a")


def test_other_uids_can_execute_the_interpreter(sandbox: Sandbox) -> None:
    executable = Path(os.path.realpath(sys.executable))
    assert executable.stat().st_mode & stat.S_IXOTH
    for directory in executable.parents:
        assert directory.stat().st_mode & stat.S_IXOTH, directory
    sandbox.tree.create_leaf("model-a")
    child = sandbox.spawn(
        "model-a",
        [sys.executable, "-I", "-c", "import os; print(os.getuid(), os.getgid())"],
        user=OTHER_UID,
        group=OTHER_GID,
        output="ids",
    )
    assert child.wait() == 0
    assert sandbox.output("ids").split() == [str(OTHER_UID), str(OTHER_GID)]


def test_child_gets_exactly_the_given_environment(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    env = {**PATH_ENV, "GPUSHARE_X": "a b=c", "LD_PRELOAD": "/nonexistent-gpushare.so"}
    child = sandbox.spawn("model-a", ["env"], env=env, user=OTHER_UID, group=OTHER_GID, output="env")
    assert child.wait() == 0
    assert sorted(sandbox.output("env").splitlines()) == sorted(f"{k}={v}" for k, v in env.items())
    # ld.so complains once, for the child: the root launcher never saw LD_PRELOAD.
    assert sandbox.output("env.err").count("LD_PRELOAD") == 1


def test_own_cgroup_path_inside_a_leaf(sandbox: Sandbox) -> None:
    assert own_cgroup_path() is not None
    sandbox.tree.create_leaf("model-a")
    code = "from gpushared.adapters.cgroupfs import own_cgroup_path; print(own_cgroup_path())"
    child = sandbox.spawn(
        "model-a", [sys.executable, "-c", code], env={**PATH_ENV, "PYTHONPATH": str(REPO / "daemon")}, output="own"
    )
    assert child.wait() == 0, (sandbox.tmp / "own.err").read_text()
    assert sandbox.output("own").strip() == str(sandbox.root / "model-a")


def test_missing_program_raises_and_leaves_nothing_behind(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    with pytest.raises(FileNotFoundError) as missing:
        sandbox.spawn("model-a", ["/nonexistent/vllm", "serve"])
    assert missing.value.filename == "/nonexistent/vllm"
    assert not sandbox.tree.populated("model-a")


def test_working_directory_is_entered_as_the_user(sandbox: Sandbox) -> None:
    private = sandbox.tmp / "private"
    private.mkdir(mode=0o700)
    sandbox.tree.create_leaf("model-a")
    with pytest.raises(PermissionError):
        sandbox.spawn("model-a", ["pwd"], cwd=str(private), user=OTHER_UID, group=OTHER_GID)
    as_root = sandbox.spawn("model-a", ["pwd"], cwd=str(private), output="pwd")
    assert as_root.wait() == 0
    assert sandbox.output("pwd").strip() == str(private)


def test_failure_to_join_the_leaf_runs_nothing(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    leaf = sandbox.tree.create_leaf("model-a")
    # cgroup.events is read-only for everyone, root included: the kernel refuses the join.
    monkeypatch.setattr(sandbox.tree, "procs_file", lambda name: leaf / "cgroup.events")
    marker = sandbox.tmp / "ran"
    with pytest.raises(CgroupError, match="could not join"):
        sandbox.spawn("model-a", ["touch", str(marker)])
    assert not marker.exists()


def test_spawn_into_a_missing_leaf_is_refused(sandbox: Sandbox) -> None:
    with pytest.raises(CgroupError, match=f"{sandbox.root / 'ghost'}: does not exist"):
        sandbox.spawn("ghost", ["true"])


# --- stopping ---------------------------------------------------------------------------------------------------


def test_kill_empties_a_leaf_with_a_sigterm_ignorer_and_a_setsid_grandchild(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    main = sandbox.spawn("model-a", ["sh", "-c", "trap '' TERM; (setsid sleep 600 &); exec sleep 600"])

    def escaped_grandchild() -> bool:
        return any(session_of(pid) != main.pid for pid in sandbox.tree.pids("model-a"))

    wait_for(escaped_grandchild, "the double-forked setsid grandchild")
    for pid in sandbox.tree.pids("model-a"):
        os.kill(pid, signal.SIGTERM)
    assert not sandbox.tree.wait_empty("model-a", 0.3)  # both ignore SIGTERM
    sandbox.tree.kill("model-a")
    assert sandbox.tree.wait_empty("model-a", PATIENCE)
    assert sandbox.tree.pids("model-a") == []
    assert main.wait(timeout=PATIENCE) == -signal.SIGKILL
    sandbox.tree.remove_leaf("model-a")
    assert sandbox.tree.leaves() == []


def test_wait_empty_times_out_while_something_lives_and_returns_after_kill(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    assert sandbox.tree.wait_empty("model-a", 0)  # empty leaf
    sandbox.spawn("model-a", ["sleep", "600"])
    assert not sandbox.tree.wait_empty("model-a", 0)
    assert not sandbox.tree.wait_empty("model-a", 0.2)
    sandbox.tree.kill("model-a")
    assert sandbox.tree.wait_empty("model-a", PATIENCE)
    assert not sandbox.tree.populated("model-a")


def test_kill_fallback_freezes_kills_and_thaws(sandbox: Sandbox) -> None:
    leaf = sandbox.tree.create_leaf("model-a")
    sandbox.spawn("model-a", ["sh", "-c", "trap '' TERM; sleep 600 & sleep 600 & wait"])
    wait_for(lambda: len(sandbox.tree.pids("model-a")) == 3, "sh and two sleeps")
    sandbox.tree._freeze_and_kill(leaf)  # what kill() does on kernels without cgroup.kill
    assert sandbox.tree.wait_empty("model-a", PATIENCE)
    assert (leaf / "cgroup.freeze").read_text().strip() == "0"


def test_remove_leaf_refuses_a_populated_leaf_and_removes_an_empty_one(sandbox: Sandbox) -> None:
    sandbox.tree.create_leaf("model-a")
    sleeper = sandbox.spawn("model-a", ["sleep", "600"])
    with pytest.raises(CgroupError) as refused:
        sandbox.tree.remove_leaf("model-a")
    message = str(refused.value)
    assert str(sandbox.root / "model-a") in message
    assert str(sleeper.pid) in message
    assert "kill" in message
    assert (sandbox.root / "model-a").is_dir()
    sandbox.tree.kill("model-a")
    assert sandbox.tree.wait_empty("model-a", PATIENCE)
    sandbox.tree.remove_leaf("model-a")
    assert not (sandbox.root / "model-a").exists()
    sandbox.tree.remove_leaf("model-a")  # already gone: no-op
    assert sandbox.tree.leaves() == []
