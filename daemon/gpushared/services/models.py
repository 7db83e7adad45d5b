"""Serving use cases: a model spec becomes an allocation plus one supervised engine child; stop, restore, adopt."""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from gpushared.domain.allocation import Allocation, AllocationRequest
from gpushared.domain.caller import Caller, authorize_release
from gpushared.domain.errors import AlreadyExists, FailedPrecondition, GpushareError, NotFound, PermissionDenied
from gpushared.domain.gpu import ComputePartition, GpuInfo
from gpushared.domain.lease import lease_environment, leased_partitions
from gpushared.domain.model import Engine, ModelSpec, derive_memory_bytes, validate_spec
from gpushared.domain.model_state import ModelState, Transition
from gpushared.domain.served_model import KEEP_START_SECONDS, ServedModel, ServingConfig, choose_port
from gpushared.domain.vllm_args import build_argv, build_env, check_known_flags, planned_flags, validate_api_key
from gpushared.ports import ModelDeleted, ModelSaved
from gpushared.services.allocations import AllocationService
from gpushared.services.supervision_ports import (
    ChildIdentity,
    ChildLauncher,
    ChildLimits,
    ChildSpec,
    EngineCliPort,
    HealthProbe,
    LeafTree,
    ModelFilesPort,
)
from gpushared.services.supervisor import ModelSupervisor

log = logging.getLogger("gpushared.models")
RETRY = "retry"
"""drained_by of a model placed again outside any operation (retry_unplaced)."""
SYSTEM = Caller(uid=0, gid=0, pid=0, admin=True)
"""The daemon acting on its own (a partition operation), with an admin's rights."""


@dataclass
class _Entry:
    record: ServedModel
    supervisor: ModelSupervisor | None
    log_path: Path
    argv: tuple[str, ...]


@dataclass(frozen=True)
class ModelView:
    """What the API shows of one model."""

    record: ServedModel
    state: ModelState
    pid: int
    restarts: int
    last_error: str
    transitions: tuple[Transition, ...]
    log_path: Path
    argv: tuple[str, ...]
    start_timeout: float
    """Seconds a start may take before it counts as failed, learned from the model's earlier starts."""

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.record.port}/v1"


class ModelService:
    """Owns the served models. Like AllocationService it decides on the event loop thread without
    yielding, then waits for durability; a model's record and its allocation are written before its
    child is started, so a crash at any point leaves either nothing or something restore() resumes."""

    def __init__(
        self,
        allocations: AllocationService,
        *,
        tree: LeafTree | None,
        cgroup_problem: str,
        launcher: ChildLauncher | None,
        probe: HealthProbe,
        config: ServingConfig,
        files: ModelFilesPort,
        base_env: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        engine_cli: EngineCliPort | None = None,
    ) -> None:
        self._allocations = allocations
        self._tree = tree
        self._cgroup_problem = cgroup_problem
        self._launcher = launcher
        self._probe = probe
        self._config = config
        self._files = files
        self._base_env = dict(base_env)
        self._clock = clock
        self._engine_cli = engine_cli
        self._entries: dict[str, _Entry] = {}
        self._pool_gates: dict[tuple[str, int], asyncio.Lock] = {}
        self._starting: set[asyncio.Task[None]] = set()

    # -- queries ---------------------------------------------------------------------------------

    def all(self) -> list[ModelView]:
        return [
            self._view(e) for e in sorted(self._entries.values(), key=lambda e: (e.record.created_at, e.record.name))
        ]

    def get(self, name: str) -> ModelView:
        return self._view(self._entry(name))

    def model_of_pid(self, pid: int) -> str:
        """The model whose cgroup leaf holds ``pid`` (a vLLM worker holding a device), or ""."""
        if self._tree is None:
            return ""
        leaves = set(self._tree.leaves())
        return next((name for name in self._entries if name in leaves and pid in self._tree.pids(name)), "")

    def model_on(self, allocation_id: str) -> str | None:
        return next((n for n, e in self._entries.items() if e.record.allocation_id == allocation_id), None)

    def _forget(self, name: str) -> None:
        self._entries.pop(name, None)

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise NotFound(f"model {name[:64]!r}: no such model", hint="list them with `gpusharectl models`")
        return entry

    def _view(self, entry: _Entry) -> ModelView:
        supervisor = entry.supervisor
        if supervisor is None:
            record = entry.record
            if record.drained_by:
                # Waiting for the partition operation to finish; it restarts the model on the new layout.
                state, why = ModelState.PENDING, f"drained by partition operation {record.drained_by}"
            elif record.failure:
                state, why = ModelState.FAILED, record.failure
            else:
                state, why = ModelState.STOPPED, ""
            return ModelView(record, state, 0, 0, why, (), entry.log_path, entry.argv, self._config.start_timeout)
        lifecycle = supervisor.lifecycle
        pid = (
            supervisor.identity.pid
            if supervisor.identity is not None
            and lifecycle.state in (ModelState.STARTING, ModelState.READY, ModelState.UNHEALTHY)
            else 0
        )
        return ModelView(
            entry.record,
            lifecycle.state,
            pid,
            lifecycle.restarts,
            lifecycle.last_error,
            tuple(lifecycle.history),
            entry.log_path,
            entry.argv,
            supervisor.start_timeout,
        )

    # -- serve -----------------------------------------------------------------------------------

    async def serve(
        self,
        caller: Caller,
        spec: ModelSpec,
        *,
        gpu_index: int | None,
        compute: ComputePartition | None,
        api_key: str | None = None,
    ) -> ModelView:
        if self._tree is None or self._launcher is None:
            raise FailedPrecondition(
                f"models: this daemon cannot run models: {self._cgroup_problem}",
                hint="allocation still works; see `gpushared --help` for --cgroup-root",
            )
        validate_spec(spec, self._config.option_allowlist)
        if api_key is not None:
            validate_api_key(api_key)
        if spec.name in self._entries:
            existing = self._view(self._entries[spec.name])
            hint = "stop it first (`gpusharectl stop NAME`) or pick another --name"
            if existing.state is ModelState.STOPPED:
                hint = "it is stopped with its allocation kept; `gpusharectl stop NAME` releases it, then serve again"
            raise AlreadyExists(f"model {spec.name}: a model of that name exists ({existing.state})", hint=hint)
        if spec.engine == Engine.VLLM and self._engine_cli is not None:
            known = await self._engine_cli.known_flags(self._config.vllm_launcher)
            if known is not None:
                check_known_flags(planned_flags(spec), known, launcher=" ".join(self._config.vllm_launcher)[:120])
        uid, gid = self._run_as(caller)
        if spec.model.startswith("/") and not await asyncio.to_thread(
            self._files.readable_by, spec.model, uid, gid, self._groups(uid, gid)
        ):
            raise PermissionDenied(
                f"model {spec.model[:200]}: uid {uid}, which the model runs as, cannot read it",
                hint="make the path readable by that user (the daemon never reads models on its behalf)",
            )
        memory = derive_memory_bytes(spec, self._smallest_cap(gpu_index, compute))
        allocation = await self._allocations.allocate(
            caller,
            AllocationRequest(
                memory_bytes=memory,
                partition_count=spec.partitions,
                gpu_index=gpu_index,
                compute_partition=compute,
                name=spec.name,
                policy=None,
            ),
        )
        # Nothing half-done on failure: the allocation and the home go again, and no record stays behind.
        try:
            if spec.name in self._entries:  # taken by a concurrent Serve while we waited for the allocation
                raise AlreadyExists(f"model {spec.name}: a model of that name exists")
            port = choose_port(
                self._config.port_low, self._config.port_high, {e.record.port for e in self._entries.values()}
            )
            record = ServedModel(
                spec.name, spec, allocation.id, caller.uid, uid, gid, port, time.time(), api_key=api_key
            )
            entry = self._prepare(record, allocation)
            self._entries[spec.name] = entry
            await self._allocations.commit.record(ModelSaved(record), undo=lambda: self._forget(spec.name))
        except BaseException:
            if (
                self._entries.get(spec.name) is not None
                and self._entries[spec.name].record.allocation_id == allocation.id
            ):
                self._forget(spec.name)
                self._files.remove_home(spec.name)
            await self._allocations.release(caller, allocation.id)
            raise
        assert entry.supervisor is not None
        self._start_in_background(entry.supervisor)
        log.info(
            "serving model %s (%s, %s engine) on %s as uid %d",
            spec.name,
            spec.model,
            spec.engine,
            allocation.id,
            uid,
            extra={"event": "serve", "model": spec.name, "uid": caller.uid},
        )
        return self._view(entry)

    def _run_as(self, caller: Caller) -> tuple[int, int]:
        """The caller's own uid; for root, the configured service account (never root itself)."""
        if caller.uid != 0:
            return caller.uid, caller.gid
        for account in (self._config.service_account, "nobody"):
            try:
                entry = pwd.getpwnam(account)
            except KeyError:
                log.warning(
                    "model service account %r does not exist", account, extra={"fix": f"useradd --system {account}"}
                )
                continue
            return entry.pw_uid, entry.pw_gid
        raise FailedPrecondition("models: neither the service account nor 'nobody' exists to run root's models")

    def _groups(self, uid: int, gid: int) -> tuple[int, ...]:
        """The child's supplementary groups: its user's own (model files may be group-readable) and the device
        groups that let it open the GPUs; never root's."""
        try:
            groups = set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))
        except KeyError:
            groups = {gid}
        for name in self._config.device_groups:
            try:
                groups.add(grp.getgrnam(name).gr_gid)
            except KeyError:
                continue
        groups.discard(0)
        return tuple(sorted(groups))

    def _smallest_cap(self, gpu_index: int | None, compute: ComputePartition | None) -> int:
        gpus = [
            g
            for g in self._allocations.view.inventory.gpus
            if (gpu_index is None or g.index == gpu_index) and (compute is None or g.compute_partition == compute)
        ]
        caps = [p.memory_total_bytes for g in gpus for p in g.partitions]
        if not caps:
            raise NotFound("models: no GPU matches the placement constraints", hint="check `gpusharectl gpus`")
        return min(caps)

    def _prepare(self, record: ServedModel, allocation: Allocation) -> _Entry:
        """Build the child's command line, environment and directories, and its supervisor."""
        assert self._tree is not None
        assert self._launcher is not None
        view = self._allocations.view
        leased = leased_partitions(allocation, view.inventory)
        if any(lp.partition is None for lp in leased):
            raise FailedPrecondition(f"model {record.name}: its allocation {allocation.id} is degraded")
        cap = max(lp.partition.memory_total_bytes for lp in leased if lp.partition is not None)
        spec = record.spec
        launcher = self._config.stub_launcher if spec.engine == Engine.STUB else self._config.vllm_launcher
        argv = build_argv(
            spec,
            launcher=launcher,
            model_path_or_id=spec.model,
            port=record.port,
            partition_cap_bytes=cap,
            memory_bytes_per_partition=allocation.memory_bytes_per_partition,
            kv_cache_bytes_supported=True,
        )
        home = self._files.home(record.name, record.run_as_uid, record.run_as_gid)
        log_path = self._files.log_path(record.name)
        env = build_env(
            base=self._base_env,
            lease_env=lease_environment(allocation, leased),
            home=str(home),
            tmpdir=str(home / "tmp"),
            cache_dir=str(home / "cache"),
            hf_home=str(home / "cache" / "hf"),
            api_key=record.api_key,
            # A local path needs no hub; a hub id is downloaded into the model's own cache on first start.
            offline=spec.model.startswith("/"),
        )
        child = ChildSpec(
            name=record.name,
            argv=tuple(argv),
            env=env,
            cwd=str(home),
            uid=record.run_as_uid,
            gid=record.run_as_gid,
            extra_groups=self._groups(record.run_as_uid, record.run_as_gid),
            port=record.port,
            served_name=spec.served_model_name,
            log_path=log_path,
            limits=ChildLimits(
                memory_max=self._config.host_memory_max,
                pids_max=self._config.pids_max,
                cpu_weight=self._config.cpu_weight,
            ),
            api_key=record.api_key,
        )
        gpu = view.inventory.gpu_by_bdf(allocation.partitions[0].gpu_bdf)
        gate = self._gate(gpu, allocation.partitions[0].partition_id)
        config = self._config
        supervisor = ModelSupervisor(
            child,
            tree=self._tree,
            launcher=self._launcher,
            probe=self._probe,
            policy=config.restart,
            clock=self._clock,
            rng=random.random,
            grace_seconds=config.grace_seconds,
            probe_interval=config.probe_interval,
            start_timeout=config.start_timeout,
            on_change=self._on_change,
            start_gate=gate,
            start_durations=record.start_seconds,
            completion_probe_interval=config.completion_probe_interval,
            completion_probe_timeout=config.completion_probe_timeout,
        )
        return _Entry(record, supervisor, log_path, tuple(argv))

    def _gate(self, gpu: GpuInfo | None, partition_id: int) -> asyncio.Lock:
        # Two vLLMs profiling free memory on one pool at once would each count the other's memory.
        key = (gpu.bdf, gpu.pool_of(partition_id)) if gpu is not None else ("", 0)
        return self._pool_gates.setdefault(key, asyncio.Lock())

    def _on_change(self, supervisor: ModelSupervisor) -> None:
        entry = self._entries.get(supervisor.spec.name)
        identity = supervisor.identity
        if entry is None or identity is None:
            return
        record = entry.record.with_child(identity.pid, identity.start_time)
        durations = tuple(supervisor.start_durations[-KEEP_START_SECONDS:])
        if durations != record.start_seconds:
            record = replace(record, start_seconds=durations)
        if record == entry.record:
            return
        entry.record = record
        # The new identity must survive a daemon crash, or re-adoption would not recognise the child; the start
        # durations, or the next daemon would forget how long this model takes to load.
        asyncio.get_running_loop().create_task(self._allocations.commit.record(ModelSaved(entry.record)))

    # -- stop ------------------------------------------------------------------------------------

    async def stop(self, caller: Caller, name: str, *, keep_allocation: bool) -> ModelView:
        entry = self._entry(name)
        if entry.record.drained_by:
            raise FailedPrecondition(
                f"model {name}: partition operation {entry.record.drained_by} drained it and will restart it",
                hint="wait for the operation (`gpusharectl operation wait ID`), then stop the model",
            )
        if entry.record.allocation_id not in self._allocations.view.ledger.allocations:
            # It lost its allocation (it did not fit after a layout change): only the record is left.
            if not (caller.admin or caller.uid == entry.record.owner_uid):
                raise PermissionDenied(
                    f"model {name}: owned by uid {entry.record.owner_uid}, not by you (uid {caller.uid})",
                    hint="only the owner or an admin may stop it",
                )
            view = self._view(entry)
            await self._allocations.commit.record(ModelDeleted(name), then=lambda: self._forget(name))
            self._files.remove_home(name)
            return view
        allocation = self._allocations.get(entry.record.allocation_id)
        authorize_release(caller, allocation)
        if entry.supervisor is not None:
            await entry.supervisor.stop()
        view = self._view(entry)
        if keep_allocation:
            entry.record = replace(entry.record, running=False, pid=0, start_time=0)
            await self._allocations.commit.record(ModelSaved(entry.record))
        else:
            await self._allocations.commit.record(ModelDeleted(name), then=lambda: self._forget(name))
            await self._allocations.release(caller, allocation.id)
            self._files.remove_home(name)
        log.info("stopped model %s by %s", name, caller.describe(), extra={"event": "stop", "model": name})
        return view

    async def release_allocation(self, caller: Caller, allocation_id: str) -> Allocation:
        """Release stops the model on the allocation first: nothing may run on partitions given back."""
        name = self.model_on(allocation_id)
        if name is None:
            return await self._allocations.release(caller, allocation_id)
        allocation = self._allocations.get(allocation_id)
        authorize_release(caller, allocation)
        await self.stop(caller, name, keep_allocation=False)
        return allocation

    def read_log(self, caller: Caller, name: str, *, offset: int | None, tail_lines: int) -> tuple[bytes, int]:
        """The owner's or an admin's view of a model's log: it may hold prompts and tracebacks."""
        entry = self._entry(name)
        if not (caller.admin or caller.uid == entry.record.owner_uid):
            raise PermissionDenied(
                f"model {name}: its log belongs to uid {entry.record.owner_uid}, not to you (uid {caller.uid})",
                hint="only the model's owner or an admin may read it",
            )
        return self._files.read_log(name, offset=offset, tail_lines=tail_lines)

    async def housekeeping(self, interval: float = 30.0) -> None:
        """Keep every child's log under its size cap, for as long as the daemon runs."""
        while True:
            await asyncio.sleep(interval)
            for name in list(self._entries):
                if self._files.rotate(name, self._config.log_max_bytes):
                    log.info("rotated the log of model %s", name, extra={"event": "log_rotated", "model": name})

    # -- daemon lifecycle ------------------------------------------------------------------------

    async def restore(self, records: list[ServedModel]) -> None:
        """Re-adopt children that survived the daemon, restart those that died meanwhile."""
        for record in records:
            allocation = self._allocations.view.ledger.allocations.get(record.allocation_id)
            if record.drained_by or (allocation is None and record.failure):
                # A partition operation holds it (and resumes before serving), or it is FAILED with its reason.
                self._entries[record.name] = _Entry(record, None, self._files.log_path(record.name), ())
                continue
            if allocation is None:
                log.error(
                    "model %s: its allocation %s is gone; forgetting the model",
                    record.name,
                    record.allocation_id,
                    extra={"event": "restore_failed", "model": record.name},
                )
                await self._allocations.commit.record(ModelDeleted(record.name))
                continue
            if self._tree is None or not record.running:
                self._entries[record.name] = _Entry(record, None, self._files.log_path(record.name), ())
                continue
            entry = self._prepare(record, allocation)
            self._entries[record.name] = entry
            assert entry.supervisor is not None
            if record.pid and await entry.supervisor.adopt(ChildIdentity(record.pid, record.start_time, record.name)):
                log.info(
                    "re-adopted model %s (pid %d)",
                    record.name,
                    record.pid,
                    extra={"event": "adopt", "model": record.name, "pid": record.pid},
                )
                continue
            log.warning(
                "model %s: its process is gone; starting it again",
                record.name,
                extra={"event": "restart_after_daemon_down", "model": record.name},
            )
            # A child the previous daemon launched but died before recording cannot be verified, so it cannot be
            # adopted; it would hold the port and the memory next to the new one.
            await self._empty_leaf(record.name)
            self._start_in_background(entry.supervisor)

    # -- partition operations ----------------------------------------------------------------------

    async def drain(self, name: str, operation_id: str) -> None:
        """Stop the model and give back its partitions for a layout change, remembering to restart it.

        Idempotent, so a resumed operation can run it again. The record says "drained" before anything is
        stopped: a daemon that dies in between must not restart the model on the GPUs being changed."""
        entry = self._entries.get(name)
        if entry is None:
            return
        if entry.record.drained_by != operation_id:
            entry.record = replace(entry.record, drained_by=operation_id, failure="")
            await self._allocations.commit.record(ModelSaved(entry.record))
        if entry.supervisor is not None:
            await entry.supervisor.stop()
            entry.supervisor = None
        await self._empty_leaf(name)
        allocation = self._allocations.view.ledger.allocations.get(entry.record.allocation_id)
        if allocation is not None:
            await self._allocations.release(SYSTEM, allocation.id)
        if entry.record.allocation_id:
            entry.record = replace(entry.record, allocation_id="", pid=0, start_time=0)
            await self._allocations.commit.record(ModelSaved(entry.record))
        log.info(
            "drained model %s for partition operation %s",
            name,
            operation_id,
            extra={"event": "drain", "model": name, "operation": operation_id},
        )

    async def _empty_leaf(self, name: str) -> None:
        """Kill whatever still runs in the model's leaf and remove it: processes no supervisor holds, left by a
        daemon that crashed between "drained" and the stop, or between a launch and recording its pid."""
        tree = self._tree
        if tree is None or name not in tree.leaves():
            return
        if tree.populated(name):
            log.warning("model %s: killing processes %s left in its leaf", name, tree.pids(name), extra={"model": name})
            tree.kill(name)
            if not await asyncio.to_thread(tree.wait_empty, name, 10.0):
                raise FailedPrecondition(
                    f"model {name}: processes {tree.pids(name)} outlived cgroup.kill (stuck in the driver?)",
                    hint="check dmesg; the operation rolls back",
                )
        tree.remove_leaf(name)

    async def undrain(self, name: str) -> str:
        """Place a drained model again (memory budget recomputed for the partitions it gets) and start it;
        returns "" when started, else why it could not be placed (it is then FAILED with that reason)."""
        entry = self._entries.get(name)
        if entry is None or not entry.record.drained_by:
            return ""
        record = entry.record
        spec = record.spec
        try:
            memory = derive_memory_bytes(spec, self._smallest_cap(None, None))
            allocation = await self._allocations.allocate(
                Caller(uid=record.owner_uid, gid=record.run_as_gid, pid=0, admin=True),
                AllocationRequest(
                    memory_bytes=memory,
                    partition_count=spec.partitions,
                    gpu_index=None,
                    compute_partition=None,
                    name=spec.name,
                    policy=None,
                ),
            )
        except GpushareError as exc:
            after = "" if record.drained_by == RETRY else f" after operation {record.drained_by}"
            why = f"no room on the new partition layout{after}: {str(exc)[:300]}"
            entry.record = replace(record, drained_by="", failure=why)
            await self._allocations.commit.record(ModelSaved(entry.record))
            log.error("model %s: %s", name, why, extra={"event": "undrain_failed", "model": name})
            return why
        entry.record = replace(record, allocation_id=allocation.id, drained_by="", failure="")
        try:
            prepared = self._prepare(entry.record, allocation)
        except GpushareError as exc:
            await self._allocations.release(SYSTEM, allocation.id)
            why = f"cannot run on the new partition layout: {exc}"
            entry.record = replace(entry.record, allocation_id="", failure=why)
            await self._allocations.commit.record(ModelSaved(entry.record))
            return why
        await self._allocations.commit.record(ModelSaved(entry.record))
        entry.supervisor, entry.argv = prepared.supervisor, prepared.argv
        assert entry.supervisor is not None
        self._start_in_background(entry.supervisor)
        log.info(
            "restarting model %s on %s after the partition operation",
            name,
            allocation.id,
            extra={"event": "undrain", "model": name, "allocation": allocation.id},
        )
        return ""

    async def retry_unplaced(self) -> list[str]:
        """Place again the models a partition operation could not (their GPUs may be back, e.g. after
        ``gpu clear``); returns the names now starting."""
        started = []
        for name, entry in list(self._entries.items()):
            record = entry.record
            if record.failure and not record.allocation_id and record.running and entry.supervisor is None:
                entry.record = replace(record, drained_by=RETRY)
                if not await self.undrain(name):
                    started.append(name)
        return started

    def drained(self, operation_id: str) -> list[str]:
        return [n for n, e in self._entries.items() if e.record.drained_by == operation_id]

    def _start_in_background(self, supervisor: ModelSupervisor) -> None:
        """Start without holding the caller: waiting for the pool's start slot can take minutes (another
        vLLM profiling memory there), and neither an RPC nor the daemon's startup may wait that long."""
        task = asyncio.get_running_loop().create_task(supervisor.start(), name=f"start {supervisor.spec.name}")
        self._starting.add(task)
        task.add_done_callback(self._started)

    def _started(self, task: asyncio.Task[None]) -> None:
        self._starting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("starting %s failed: %s", task.get_name(), task.exception(), extra={"event": "start_failed"})

    async def shutdown(self) -> None:
        """Daemon exit: leave children running (re-adopted next start) unless configured to stop them."""
        for task in list(self._starting):
            task.cancel()
        supervisors = [e.supervisor for e in self._entries.values() if e.supervisor is not None]
        # All at once: one grace period for the host, not one per model.
        if self._config.stop_models_on_exit:
            results = await asyncio.gather(*(s.stop() for s in supervisors), return_exceptions=True)
            for supervisor, result in zip(supervisors, results, strict=True):
                if isinstance(result, BaseException):
                    log.error("model %s: stop at exit failed: %s", supervisor.spec.name, result)
        else:
            await asyncio.gather(*(s.detach() for s in supervisors))
