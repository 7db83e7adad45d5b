"""ModelSupervisor with real stub-engine children in real cgroup v2 leaves: start, crash, hang, stop, crash loop, adopt."""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from gpushared.adapters.cgroupfs import CgroupFsTree, find_cgroup2_mount
from gpushared.adapters.child_process import CgroupLauncher, start_time
from gpushared.adapters.http_probe import HttpProbe
from gpushared.domain.model_state import ModelState, RestartPolicy
from gpushared.services.supervisor import ChildIdentity, ChildSpec, ModelSupervisor
from tests.conftest import _world_readable_source, destroy_cgroup, free_port

BASE = find_cgroup2_mount()
OTHER_UID = 4242
OTHER_GID = 4242
# Bounds on how long to wait before declaring failure, never assertions on speed.
PATIENCE = 20.0
LEAF = "model-a"
FAST = RestartPolicy(base_seconds=0.05, cap_seconds=0.2, max_failures=5, window_seconds=600.0)

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or BASE is None, reason="needs root and a writable cgroup2 mount")
S = ModelState


@dataclass
class World:
    tree: CgroupFsTree
    tmp: Path
    changes: list[ModelState] = field(default_factory=list)

    def spec(self, *stub_flags: str, uid: int | None = None, name: str = "tiny") -> ChildSpec:
        port = free_port()
        source = _world_readable_source()
        argv: tuple[str, ...] = (sys.executable, "-m", "gpushared.stub_engine", "serve", "m", "--port", str(port))
        argv += ("--served-model-name", name, "--stub-load-seconds", "0.3", *stub_flags)
        return ChildSpec(
            name=LEAF,
            argv=argv,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(source), "HOME": "/", "LANG": "C.UTF-8"},
            cwd="/",
            uid=uid,
            gid=None if uid is None else OTHER_GID,
            extra_groups=None if uid is None else (),
            port=port,
            served_name=name,
            log_path=self.tmp / "model.log",
        )

    def supervisor(
        self,
        spec: ChildSpec,
        policy: RestartPolicy = FAST,
        grace: float = 2.0,
        gate: asyncio.Lock | None = None,
        start_timeout: float = PATIENCE,
        completion_probe_interval: float = 0.0,
        start_durations: tuple[float, ...] = (),
    ) -> ModelSupervisor:
        return ModelSupervisor(
            spec,
            tree=self.tree,
            launcher=CgroupLauncher(self.tree),
            probe=HttpProbe(timeout=0.3),
            policy=policy,
            clock=time.monotonic,
            rng=random.Random(7).random,
            grace_seconds=grace,
            probe_interval=0.1,
            start_timeout=start_timeout,
            on_change=lambda sup: self.changes.append(sup.state),
            start_gate=gate,
            completion_probe_interval=completion_probe_interval,
            completion_probe_timeout=0.5,
            start_durations=start_durations,
        )

    def log(self) -> str:
        path = self.tmp / "model.log"
        return path.read_text(errors="replace") if path.exists() else ""


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    assert BASE is not None
    root = BASE / f"gpushare-test-{secrets.token_hex(6)}"
    try:
        yield World(CgroupFsTree(root), tmp_path)
    finally:
        destroy_cgroup(root, PATIENCE)
    assert not root.exists()


async def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up waiting for {what}")
        await asyncio.sleep(0.02)


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def assert_gone(world: World, *pids: int) -> None:
    assert LEAF not in world.tree.leaves()
    assert not (world.tree.root / LEAF).exists()
    for pid in pids:
        assert not alive(pid), f"pid {pid} outlived the stop"


def engine_pids(world: World, main: int) -> list[int]:
    return [pid for pid in world.tree.pids(LEAF) if pid != main]


def test_start_reaches_ready_and_stop_leaves_nothing(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec())
        try:
            await sup.start()
            assert world.changes[0] is S.STARTING
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            main = sup.identity.pid
            assert sup.identity.start_time == start_time(main)
            status, body = await HttpProbe().get(sup.spec.port, "/v1/models")
            assert status == 200
            assert [entry["id"] for entry in json.loads(body)["data"]] == ["tiny"]
            engines = engine_pids(world, main)
            assert engines, "the stub's EngineCore runs in the leaf too"
            await sup.stop()
            assert sup.state is S.STOPPED
            assert_gone(world, main, *engines)
            assert [t.target for t in sup.lifecycle.history] == [S.STARTING, S.READY, S.STOPPING, S.STOPPED]
            assert world.changes == [S.STARTING, S.READY, S.STOPPING, S.STOPPED]
            assert "shutdown triggered" in world.log()
        finally:
            await sup.stop()

    asyncio.run(scenario())


def test_sigkill_of_main_restarts_and_kills_the_orphaned_engine(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec())
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            first = sup.identity.pid
            (orphan,) = engine_pids(world, first)
            os.kill(first, signal.SIGKILL)
            await sup.wait_state(S.BACKOFF, S.STARTING, timeout=PATIENCE)
            await until(lambda: sup.state is S.READY and sup.lifecycle.restarts == 1, "READY after one restart")
            assert sup.identity is not None
            assert sup.identity.pid != first
            assert orphan not in world.tree.pids(LEAF)
            assert not alive(orphan), "EngineCore outlived its parent's failure"
            targets = [t.target for t in sup.lifecycle.history]
            assert targets == [S.STARTING, S.READY, S.BACKOFF, S.STARTING, S.READY]
            assert "SIGKILL" in sup.lifecycle.last_error
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_hung_server_goes_unhealthy_then_is_killed_and_restarted(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec("--stub-hang-after", "0.2"))
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            first = sup.identity.pid
            await sup.wait_state(S.UNHEALTHY, timeout=PATIENCE)
            await until(lambda: sup.lifecycle.restarts >= 1, "a restart of the hung server")
            assert not alive(first)
            await until(lambda: sup.state in (S.READY, S.UNHEALTHY), "the restarted server to be ready")
            assert sup.identity is not None
            assert sup.identity.pid != first
            targets = [t.target for t in sup.lifecycle.history]
            assert targets[:6] == [S.STARTING, S.READY, S.UNHEALTHY, S.BACKOFF, S.STARTING, S.READY]
            assert "GET /health failed" in sup.lifecycle.history[3].reason
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_child_ignoring_sigterm_is_killed_by_cgroup_after_the_grace(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec("--stub-ignore-sigterm"), grace=0.3)
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            pids = world.tree.pids(LEAF)
            await sup.stop()
            assert sup.state is S.STOPPED
            assert "cgroup.kill" in sup.lifecycle.history[-1].reason
            assert_gone(world, *pids)
            assert "ignoring SIGTERM" in world.log()
        finally:
            await sup.stop()

    asyncio.run(scenario())


def test_crash_loop_ends_failed_with_the_childs_error(world: World) -> None:
    async def scenario() -> None:
        policy = replace(FAST, max_failures=3)
        sup = world.supervisor(world.spec("--stub-fail-start", "oom"), policy=policy)
        try:
            await sup.start()
            await sup.wait_state(S.FAILED, timeout=PATIENCE)
            assert sup.lifecycle.restarts == 2
            error = sup.lifecycle.last_error
            assert "crash loop" in error
            assert "exited during start: exited with status 1" in error
            assert "torch.OutOfMemoryError: HIP out of memory" in error
            assert "Engine core initialization failed" in error
            assert not world.tree.populated(LEAF)
            # An operator's new start after FAILED begins again from PENDING, in the same (emptied) leaf.
            await sup.start()
            assert [t.target for t in sup.lifecycle.history][-2:] == [S.PENDING, S.STARTING]
        finally:
            await sup.stop()
        assert sup.state is S.STOPPED
        assert_gone(world)

    asyncio.run(scenario())


def test_adopt_takes_over_a_running_child_without_touching_it(world: World) -> None:
    async def scenario() -> None:
        spec = world.spec()
        first = world.supervisor(spec)
        await first.start()
        await first.wait_state(S.READY, timeout=PATIENCE)
        identity = first.identity
        assert identity is not None
        # The daemon dies: the supervisor goes away, the child keeps running.
        await first.detach()
        del first
        assert alive(identity.pid)

        impostor = world.supervisor(spec)
        wrong = ChildIdentity(identity.pid, identity.start_time + 1, identity.leaf)
        assert not await impostor.adopt(wrong)
        assert impostor.state is S.PENDING
        assert not await impostor.adopt(ChildIdentity(identity.pid, identity.start_time, "model-b"))
        assert alive(identity.pid)

        second = world.supervisor(spec)
        try:
            assert await second.adopt(identity)
            await second.wait_state(S.READY, timeout=PATIENCE)
            assert second.identity == identity
            assert second.lifecycle.restarts == 0
            assert alive(identity.pid)
            assert "shutdown triggered" not in world.log()
            assert "ignoring SIGTERM" not in world.log()
            # Still supervised: a crash after re-adoption is noticed through the pidfd and restarted.
            os.kill(identity.pid, signal.SIGKILL)
            await until(lambda: second.lifecycle.restarts == 1 and second.state is S.READY, "restart after crash")
            assert second.identity is not None
            assert second.identity.pid != identity.pid
        finally:
            await second.stop()
        assert_gone(world, identity.pid)

    asyncio.run(scenario())


def test_child_runs_as_the_models_uid(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec(uid=OTHER_UID))
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            for pid in world.tree.pids(LEAF):
                fields = dict(
                    line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
                )
                assert fields["Uid"].split() == [str(OTHER_UID)] * 4
                assert fields["Gid"].split() == [str(OTHER_GID)] * 4
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_start_gate_serializes_starts_on_one_pool(world: World) -> None:
    async def scenario() -> None:
        gate = asyncio.Lock()
        sup = world.supervisor(world.spec(), gate=gate)
        try:
            await gate.acquire()
            starting = asyncio.create_task(sup.start())
            await asyncio.sleep(0.2)
            assert sup.state is S.PENDING, "launched without the pool's start slot"
            gate.release()
            await starting
            assert gate.locked(), "the slot is held until READY"
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert not gate.locked()
        finally:
            await sup.stop()
        assert not gate.locked()

    asyncio.run(scenario())


def test_stop_while_waiting_for_the_start_slot_launches_nothing(world: World) -> None:
    async def scenario() -> None:
        gate = asyncio.Lock()
        sup = world.supervisor(world.spec(), gate=gate)
        async with gate:
            starting = asyncio.create_task(sup.start())
            await asyncio.sleep(0.1)
            await sup.stop()
            await starting
            assert sup.state is S.STOPPED
            assert [t.target for t in sup.lifecycle.history] == [S.STOPPING, S.STOPPED]
        assert not gate.locked()
        assert_gone(world)

    asyncio.run(scenario())


def test_start_timeout_counts_as_a_failure(world: World) -> None:
    async def scenario() -> None:
        spec = world.spec("--stub-load-seconds", "30")
        sup = world.supervisor(spec, policy=replace(FAST, max_failures=1), start_timeout=0.5)
        try:
            await sup.start()
            await sup.wait_state(S.FAILED, timeout=PATIENCE)
            assert "not ready within" in sup.lifecycle.last_error
            assert not world.tree.populated(LEAF), "the slow child was killed"
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_stalled_engine_is_caught_by_the_completion_probe_and_restarted(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec("--stub-stall-after", "0.3"), completion_probe_interval=0.2)
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert sup.identity is not None
            first = sup.identity.pid
            await until(lambda: sup.lifecycle.restarts >= 1, "a restart of the stalled engine")
            assert not alive(first)
            targets = [t.target for t in sup.lifecycle.history]
            assert targets[:4] == [S.STARTING, S.READY, S.UNHEALTHY, S.BACKOFF]
            assert "one-token completion got no answer within 0.5 s" in sup.lifecycle.history[2].reason
            assert "killing the hung server" in sup.lifecycle.history[3].reason
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_completion_probe_keeps_a_working_engine_ready(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec(), completion_probe_interval=0.1)
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            await until(lambda: "POST /v1/completions" in world.log(), "a completion probe to reach the server")
            await asyncio.sleep(1.0)
            assert sup.state is S.READY and sup.lifecycle.restarts == 0
            assert world.log().count("POST /v1/completions") >= 3, "probed again and again, and answered"
        finally:
            await sup.stop()

    asyncio.run(scenario())


def test_probes_send_the_models_api_key(world: World) -> None:
    async def scenario() -> None:
        keyed = world.spec()
        keyed = replace(keyed, env={**keyed.env, "VLLM_API_KEY": "k-123"}, api_key="k-123")
        sup = world.supervisor(keyed)
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
        finally:
            await sup.stop()
        assert_gone(world)

        # The control: a server that requires a key the probe does not send never counts as ready.
        unkeyed = replace(keyed, api_key=None, port=free_port())
        sup = world.supervisor(unkeyed, policy=replace(FAST, max_failures=1), start_timeout=1.5)
        try:
            await sup.start()
            await sup.wait_state(S.FAILED, timeout=PATIENCE)
            assert "not ready within" in sup.lifecycle.last_error
        finally:
            await sup.stop()
        assert_gone(world)

    asyncio.run(scenario())


def test_start_timeout_is_learned_from_earlier_starts(world: World) -> None:
    async def scenario() -> None:
        sup = world.supervisor(world.spec(), start_timeout=1.0, start_durations=(2.0,))
        assert sup.start_timeout == 6.0, "three times the slowest earlier start, above the floor"
        try:
            await sup.start()
            await sup.wait_state(S.READY, timeout=PATIENCE)
            assert len(sup.start_durations) == 2 and sup.start_durations[-1] > 0, "the new start is recorded"
        finally:
            await sup.stop()

    asyncio.run(scenario())
