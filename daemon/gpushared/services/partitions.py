"""Partition use cases: observe the layout, plan a change, apply it as a journaled operation, resume after a crash.

An apply runs its steps (domain/partitioning.py StepKind) in order, writing the operation record to the journal
before and after each one. Every step is idempotent, so a daemon that died mid-step runs it again on the next
start; a failure rolls the hardware back to the layout it had, or marks the GPUs it could not restore as
degraded. Only one operation runs at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from gpushared.domain.caller import Caller
from gpushared.domain.errors import FailedPrecondition, GpushareError, NotFound, PermissionDenied
from gpushared.domain.gpu import HostInventory
from gpushared.domain.partition_op import OperationState, PartitionOperation
from gpushared.domain.partitioning import (
    STEP_ORDER,
    DeviceHolder,
    GpuLayout,
    LayoutRequest,
    PartitionPlan,
    StepKind,
    gpu_ranges,
    layout_drift,
    plan_partitions,
)
from gpushared.ports import GpuBackend, OperationSaved
from gpushared.services.allocations import AllocationService
from gpushared.services.models import ModelService
from gpushared.services.partition_ports import Notifier, ProcessInfo, UnitManager

log = logging.getLogger("gpushared.partitions")
S = OperationState

HOLDER_WAIT_SECONDS = 10.0
"""How long device holders may take to go after their model's cgroup is empty (the driver closes the fds)."""


def new_operation_id() -> str:
    return "op-" + secrets.token_hex(4)


class PartitionService:
    def __init__(
        self,
        backend: GpuBackend,
        allocations: AllocationService,
        models: ModelService,
        *,
        units: UnitManager,
        processes: ProcessInfo,
        notifier: Notifier,
        holder_services: tuple[str, ...] = (),
        desired: Mapping[int, GpuLayout] | None = None,
        reload_timeout: float = 300.0,
        clock: Callable[[], float] = time.time,
        failpoint: Callable[[str], None] | None = None,
        id_factory: Callable[[], str] = new_operation_id,
    ) -> None:
        """``failpoint`` is called with "<step>:started" and "<step>:done" right after each journal write; the
        composition root can make it kill the process there, which is how the crash-at-every-step tests work."""
        self._backend = backend
        self._allocations = allocations
        self._models = models
        self._units = units
        self._processes = processes
        self._notifier = notifier
        self._holder_services = holder_services
        self.desired = dict(desired or {})
        self._reload_timeout = reload_timeout
        self._clock = clock
        self._failpoint = failpoint or (lambda _: None)
        self._new_id = id_factory
        self._operations: dict[str, PartitionOperation] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_set: dict[str, GpuLayout] = {}
        self.drift: list[str] = []

    # -- queries ---------------------------------------------------------------------------------

    @property
    def busy(self) -> PartitionOperation | None:
        return next((op for op in self._operations.values() if not op.finished), None)

    def get(self, operation_id: str) -> PartitionOperation:
        operation = self._operations.get(operation_id)
        if operation is None:
            raise NotFound(
                f"operation {operation_id[:40]!r}: no such operation",
                hint="list them with `gpusharectl operation list` (finished ones are kept for a while)",
            )
        return operation

    def all(self) -> list[PartitionOperation]:
        return sorted(self._operations.values(), key=lambda op: (op.created_at, op.id))

    def last_set(self) -> dict[int, GpuLayout]:
        inventory = self._allocations.view.inventory
        return {g.index: self._last_set[g.bdf] for g in inventory.gpus if g.bdf in self._last_set}

    def observe_drift(self, inventory: HostInventory) -> list[str]:
        """Compare the hardware with the configured layout and with what gpushared last set; log what changed."""
        if self.busy is not None:
            return self.drift  # mid-operation the hardware is expected to differ
        drift = layout_drift(inventory, self.desired, self.last_set())
        for line in sorted(set(drift) - set(self.drift)):
            log.warning("partition layout drift: %s", line, extra={"event": "drift"})
        for line in sorted(set(self.drift) - set(drift)):
            log.info("partition layout drift gone: %s", line, extra={"event": "drift_gone"})
        self.drift = drift
        return drift

    # -- plan ------------------------------------------------------------------------------------

    async def plan(self, request: LayoutRequest) -> PartitionPlan:
        """A dry run against the hardware as it is now: no side effects."""
        inventory = await asyncio.to_thread(self._backend.observe)
        holders = await asyncio.to_thread(self._device_holders, inventory)
        return self._plan(inventory, request, holders)

    def _plan(self, inventory: HostInventory, request: LayoutRequest, holders: list[DeviceHolder]) -> PartitionPlan:
        ledger = self._allocations.view.ledger
        allocations = ledger.allocations.values()
        models_on = {a.id: m for a in allocations if (m := self._models.model_on(a.id))}
        return plan_partitions(
            inventory,
            request,
            allocations=allocations,
            models_on=models_on,
            holders=holders,
            holder_services=self._holder_services,
        )

    def _device_holders(self, inventory: HostInventory) -> list[DeviceHolder]:
        found = []
        for gpu in inventory.gpus:
            for partition_id, processes in sorted(self._backend.list_processes(gpu.index).items()):
                for process in processes:
                    described = self._processes.describe(process.pid)
                    uid, user, command = described if described is not None else (-1, "?", process.name)
                    found.append(
                        DeviceHolder(
                            process.pid,
                            uid,
                            user,
                            command,
                            gpu.index,
                            partition_id,
                            process.vram_bytes,
                            self._models.model_of_pid(process.pid),
                        )
                    )
        return found

    # -- apply -----------------------------------------------------------------------------------

    async def apply(self, caller: Caller, request: LayoutRequest, *, drain: bool) -> PartitionOperation:
        """Start an operation and return it at once; it runs in the background (see ``wait``)."""
        if not caller.admin:
            raise PermissionDenied(
                f"partition layout: changing it needs an admin, not uid {caller.uid}",
                hint="run as root or as a member of the admin group",
            )
        running = self.busy
        if running is not None:
            raise FailedPrecondition(
                f"partition operation {running.id} is still running ({running.progress})",
                hint=f"wait for it: `gpusharectl operation wait {running.id}`",
            )
        inventory = await asyncio.to_thread(self._backend.observe)
        holders = await asyncio.to_thread(self._device_holders, inventory)
        # From here to the fence nothing yields: no allocation or model can appear on the GPUs in between.
        if self.busy is not None:
            raise FailedPrecondition("partition operation: another one started meanwhile", hint="try again")
        plan = self._plan(inventory, request, holders)
        now = self._clock()
        operation = PartitionOperation(
            id=self._unused_id(),
            request=request,
            drain=drain,
            requested_by=caller.uid,
            created_at=now,
            before={c.gpu_bdf: c.before for c in plan.changes},
            after={c.gpu_bdf: c.after for c in plan.changes},
            gpu_index={c.gpu_bdf: c.gpu_index for c in plan.changes},
            drained_models=plan.models,
        )
        if plan.noop:
            done = operation.log(now, "nothing to do: the GPUs are already in this layout").moved(
                S.SUCCEEDED, now, "succeeded: nothing to do"
            )
            await self._journal(done)
            return done
        blockers = plan.blockers(drain=drain)
        if blockers:
            raise FailedPrecondition(
                f"partition apply: {len(blockers)} thing(s) in the way: " + "; ".join(blockers),
                hint="pass --drain to stop the models and restart them on the new layout"
                if not drain and plan.models
                else "release the listed allocations and stop the listed processes, then apply again",
            )
        self._allocations.close_gpus(operation.after, f"partition operation {operation.id} is changing its layout")
        self._operations[operation.id] = operation
        try:
            operation = await self._journal(operation.log(now, f"planned by uid {caller.uid}"))
        except BaseException:
            self._operations.pop(operation.id, None)
            self._allocations.open_gpus(operation.after)
            raise
        log.info(
            "partition operation %s: %s on GPU %s (%s)",
            operation.id,
            ", ".join(f"{c.after}" for c in plan.changes[:1]),
            ", ".join(str(c.gpu_index) for c in plan.changes),
            "drain" if drain else "no drain",
            extra={"event": "partition_apply", "operation": operation.id, "uid": caller.uid},
        )
        self._task = asyncio.get_running_loop().create_task(self._run(operation), name=f"operation {operation.id}")
        return operation

    async def wait(self, operation_id: str, timeout: float) -> PartitionOperation:
        self.get(operation_id)
        deadline = time.monotonic() + timeout
        while not (operation := self.get(operation_id)).finished and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return operation

    def _unused_id(self) -> str:
        while (candidate := self._new_id()) in self._operations:
            pass
        return candidate

    async def _journal(self, operation: PartitionOperation) -> PartitionOperation:
        await self._allocations.commit.record(OperationSaved(operation))
        self._operations[operation.id] = operation
        self._notifier.status(f"partition operation {operation.id}: {operation.progress}")
        return operation

    # -- running ---------------------------------------------------------------------------------

    async def _run(self, operation: PartitionOperation) -> None:
        step: StepKind | None = None
        try:
            while (step := operation.next_step()) is not None:
                operation = await self._journal(operation.starting(step, self._clock(), f"{step}: started"))
                self._failpoint(f"{step}:started")
                operation, text = await self._step(step, operation)
                operation = await self._journal(operation.done(step, self._clock(), f"{step}: {text}"))
                self._failpoint(f"{step}:done")
            operation = await self._journal(operation.moved(S.SUCCEEDED, self._clock(), "succeeded"))
            self._last_set.update(operation.after)
            log.info("partition operation %s succeeded", operation.id, extra={"event": "partition_done"})
            self.observe_drift(self._allocations.view.inventory)
        except asyncio.CancelledError:
            # The daemon is stopping: the journal says where we are, and the next start resumes from there.
            raise
        except Exception as exc:
            error = str(exc) if isinstance(exc, GpushareError) else f"{type(exc).__name__}: {exc}"
            if not isinstance(exc, GpushareError):
                log.exception("partition operation %s crashed", operation.id)
            log.error(
                "partition operation %s failed at %s: %s",
                operation.id,
                step,
                error,
                extra={"event": "partition_failed", "operation": operation.id},
            )
            operation = await self._journal(operation.failing(step, self._clock(), error))
            await self._roll_back(operation)

    async def _step(self, step: StepKind, operation: PartitionOperation) -> tuple[PartitionOperation, str]:
        bdfs = list(operation.after)
        memory_change = any(operation.before[b].memory != operation.after[b].memory for b in bdfs)
        if step is StepKind.FENCE:
            self._allocations.close_gpus(bdfs, f"partition operation {operation.id} is changing its layout")
            return operation, f"GPU {self._indices(operation, bdfs)} admit no new allocation"
        if step is StepKind.DRAIN:
            return operation, await self._drain(operation)
        if step is StepKind.CLEAR_HOLDERS:
            return await self._clear_holders(operation)
        if step is StepKind.SET_MEMORY:
            if not memory_change:
                return operation, "memory partition unchanged"
            target = next(iter(operation.after.values())).memory
            inventory = await asyncio.to_thread(self._backend.observe)
            for gpu in inventory.gpus:
                await asyncio.to_thread(self._backend.set_memory_partition, gpu.index, target)
            return operation, f"memory partition {target} staged on every GPU"
        if step is StepKind.RELOAD_DRIVER:
            if not memory_change:
                return operation, "no reload needed"
            target = next(iter(operation.after.values())).memory
            inventory = await asyncio.to_thread(self._backend.observe)
            if all(g.memory_partition == target for g in inventory.gpus):
                return operation, f"already {target} (reloaded before a restart)"
            operation = await self._journal(
                operation.log(self._clock(), f"reloading the amdgpu driver (up to {self._reload_timeout:.0f} s)")
            )
            self._notifier.extend_timeout(self._reload_timeout)
            started = time.monotonic()
            await asyncio.to_thread(self._backend.reload_driver)
            return operation, f"driver reloaded in {time.monotonic() - started:.1f} s"
        if step is StepKind.SET_COMPUTE:
            inventory = await asyncio.to_thread(self._backend.observe)
            changed = []
            for gpu in inventory.gpus:
                planned = operation.after.get(gpu.bdf)
                if planned is not None and gpu.compute_partition != planned.compute:
                    await asyncio.to_thread(self._backend.set_compute_partition, gpu.index, planned.compute)
                    changed.append(f"GPU {gpu.index} {planned.compute}")
            return operation, "set " + ", ".join(changed) if changed else "every GPU already had its compute partition"
        if step is StepKind.REENUMERATE:
            inventory = await asyncio.to_thread(self._backend.observe)
            self._allocations.update_inventory(inventory, self._clock())
            return operation, f"{len(inventory.gpus)} GPUs, {len(inventory.partitions())} partitions"
        if step is StepKind.VERIFY:
            inventory = self._allocations.view.inventory
            problems = self._mismatches(inventory, operation.after)
            if problems:
                raise FailedPrecondition(
                    "verify: the hardware does not show the planned layout: " + "; ".join(problems),
                    hint="check `amd-smi partition`; the operation rolls back",
                )
            return operation, "the observed layout matches the plan"
        return operation, await self._restore(operation)

    @staticmethod
    def _indices(operation: PartitionOperation, bdfs: list[str]) -> str:
        return gpu_ranges(operation.gpu_index[b] for b in bdfs)

    @staticmethod
    def _mismatches(inventory: HostInventory, expected: Mapping[str, GpuLayout]) -> list[str]:
        problems = []
        for bdf, layout in expected.items():
            gpu = inventory.gpu_by_bdf(bdf)
            if gpu is None:
                problems.append(f"GPU {bdf} is missing")
            elif GpuLayout.of(gpu) != layout:
                problems.append(f"GPU {gpu.index} is {GpuLayout.of(gpu)}, planned {layout}")
            elif len(gpu.partitions) != layout.compute.partition_count:
                problems.append(
                    f"GPU {gpu.index} exposes {len(gpu.partitions)} partitions, {layout.compute} has "
                    f"{layout.compute.partition_count}"
                )
        return problems

    async def _drain(self, operation: PartitionOperation) -> str:
        touched = set(operation.after)
        ledger = self._allocations.view.ledger
        strangers = [
            a
            for a in ledger.allocations.values()
            if any(r.gpu_bdf in touched for r in a.partitions) and self._models.model_on(a.id) is None
        ]
        if strangers:
            # Allocations that were placed before the fence, with nothing gpushared can stop on them.
            raise FailedPrecondition(
                "drain: allocation "
                + ", ".join(f"{a.id} (uid {a.owner_uid})" for a in strangers)
                + " holds partitions of the GPUs being changed",
                hint="release it, then apply again",
            )
        for name in operation.drained_models:
            await self._models.drain(name, operation.id)
        late = [
            m
            for a in ledger.allocations.values()
            if any(r.gpu_bdf in touched for r in a.partitions)
            and (m := self._models.model_on(a.id)) is not None
            and m not in operation.drained_models
        ]
        if late:
            raise FailedPrecondition(f"drain: model {', '.join(late)} started on the GPUs after the plan")
        return f"stopped model {', '.join(operation.drained_models)}" if operation.drained_models else "no model ran"

    async def _clear_holders(self, operation: PartitionOperation) -> tuple[PartitionOperation, str]:
        stopped = list(operation.stopped_services)
        for unit in self._holder_services:
            if unit in stopped or not await asyncio.to_thread(self._units.is_active, unit):
                continue
            # Journaled before it is stopped, so a crash right after still starts it again.
            operation = await self._journal(replace(operation, stopped_services=(*stopped, unit)))
            stopped.append(unit)
            await asyncio.to_thread(self._units.stop, unit)
        touched = {operation.gpu_index[b] for b in operation.after}
        deadline = time.monotonic() + HOLDER_WAIT_SECONDS
        while True:
            inventory = await asyncio.to_thread(self._backend.observe)
            holders = [h for h in await asyncio.to_thread(self._device_holders, inventory) if h.gpu_index in touched]
            if not holders or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        if holders:
            raise FailedPrecondition(
                "clear holders: " + "; ".join(h.describe() for h in holders[:8]) + " still hold(s) the devices",
                hint="stop those processes (or add their service to partitions.holder_services), then apply again",
            )
        return operation, (f"stopped {', '.join(stopped)}; " if stopped else "") + "no process holds the devices"

    async def _restore(self, operation: PartitionOperation) -> str:
        self._allocations.open_gpus(operation.after)
        failed = []
        for name in operation.drained_models:
            why = await self._models.undrain(name)
            if why:
                failed.append(f"model {name}: {why}")
        for unit in operation.stopped_services:
            try:
                await asyncio.to_thread(self._units.start, unit)
            except GpushareError as exc:
                failed.append(str(exc))
        started = len(operation.drained_models) - sum(1 for f in failed if f.startswith("model "))
        text = f"restarted {started} model(s)" + (
            f", started {', '.join(operation.stopped_services)}" if operation.stopped_services else ""
        )
        return text + ("; " + "; ".join(failed) if failed else "")

    async def _roll_back(self, operation: PartitionOperation) -> None:
        """Bring every touched GPU back to its layout before the operation where the hardware allows it; mark the
        others degraded; restart the drained models on whatever layout there is; end FAILED or DEGRADED."""
        before = operation.before
        inventory: HostInventory | None = None
        notes = []
        memory = next(iter(before.values())).memory
        # Only an operation that got as far as setting the memory partition can have left one staged; setting it
        # again on hardware that never saw a change is not a no-op everywhere, so it is not done then.
        reached = operation.failed_step is None or STEP_ORDER.index(operation.failed_step) >= STEP_ORDER.index(
            StepKind.SET_MEMORY
        )
        staged = reached and any(operation.after[b].memory != before[b].memory for b in before)
        try:
            inventory = await asyncio.to_thread(self._backend.observe)
            if staged or self._mismatches(inventory, before):
                reload = any(g.memory_partition != memory for g in inventory.gpus)
                if staged or reload:
                    # Setting the current mode again also cancels a change still staged for the next reload, which
                    # would otherwise surprise the operator at the next driver load.
                    for gpu in inventory.gpus:
                        await asyncio.to_thread(self._backend.set_memory_partition, gpu.index, memory)
                if reload:
                    self._notifier.extend_timeout(self._reload_timeout)
                    await asyncio.to_thread(self._backend.reload_driver)
                    inventory = await asyncio.to_thread(self._backend.observe)
                for gpu in inventory.gpus:
                    layout = before.get(gpu.bdf)
                    if layout is not None and gpu.compute_partition != layout.compute:
                        await asyncio.to_thread(self._backend.set_compute_partition, gpu.index, layout.compute)
                inventory = await asyncio.to_thread(self._backend.observe)
        except GpushareError as exc:
            notes.append(f"rollback: {exc}")
            with contextlib.suppress(GpushareError):
                inventory = await asyncio.to_thread(self._backend.observe)
        stuck = (
            list(before) if inventory is None else [b for b in before if self._mismatches(inventory, {b: before[b]})]
        )
        if inventory is not None:
            self._allocations.update_inventory(inventory, self._clock())
        for bdf in stuck:
            found = inventory.gpu_by_bdf(bdf) if inventory is not None else None
            seen = str(GpuLayout.of(found)) if found is not None else "unknown"
            await self._allocations.mark_degraded(
                bdf,
                f"partition operation {operation.id} failed ({operation.error[:200]}) and could not restore "
                f"{before[bdf]} (now {seen})",
            )
        restored = await self._restore(operation)
        if stuck:
            final, text = (
                S.DEGRADED,
                (
                    f"degraded: GPU {self._indices(operation, stuck)} could not be restored and are excluded until an "
                    f"admin clears them (`gpusharectl gpu clear I`); {restored}"
                ),
            )
        else:
            final, text = S.FAILED, f"rolled back: the GPUs are in their previous layout; {restored}"
        operation = await self._journal(operation.moved(final, self._clock(), "; ".join([text, *notes])))
        log.error("partition operation %s %s", operation.id, text, extra={"event": "partition_" + str(final)})
        self.observe_drift(self._allocations.view.inventory)

    # -- daemon lifecycle ------------------------------------------------------------------------

    async def resume(self, operations: list[PartitionOperation]) -> None:
        """At start-up, before serving: finish the operation a previous daemon left, or roll it back."""
        for operation in operations:
            self._operations[operation.id] = operation
            if operation.state is S.SUCCEEDED:
                self._last_set.update(operation.after)
        for interrupted in operations:
            if interrupted.finished:
                continue
            operation = interrupted
            log.warning(
                "partition operation %s was interrupted at %s; %s",
                operation.id,
                operation.step,
                "resuming" if operation.state is S.RUNNING else "finishing its rollback",
                extra={"event": "partition_resume", "operation": operation.id},
            )
            self._notifier.extend_timeout(self._reload_timeout)
            self._allocations.close_gpus(operation.after, f"partition operation {operation.id} is changing its layout")
            operation = await self._journal(operation.log(self._clock(), "resumed after a daemon restart"))
            if operation.state is S.RUNNING:
                await self._run(operation)
            else:
                await self._roll_back(operation)

    async def apply_desired(self, caller: Caller) -> None:
        """At start-up: bring the GPUs to the configured layout when they are idle; otherwise only report drift.

        One operation per compute partition in the layout (the memory partition is one for the hive), in turn."""
        inventory = self._allocations.view.inventory
        groups: dict[GpuLayout, list[int]] = {}
        for gpu in inventory.gpus:
            layout = self.desired.get(gpu.index)
            if layout is not None and layout != GpuLayout.of(gpu):
                groups.setdefault(layout, []).append(gpu.index)
        for layout, gpus in sorted(groups.items(), key=lambda item: item[1]):
            request = LayoutRequest(tuple(gpus), layout.compute, layout.memory)
            try:
                operation = await self.apply(caller, request, drain=False)
            except GpushareError as exc:
                log.warning(
                    "configured partition layout not applied to GPU %s: %s",
                    gpu_ranges(gpus),
                    exc,
                    extra={"event": "layout_not_applied"},
                )
                return
            operation = await self.wait(operation.id, timeout=float("inf"))
            if operation.state is not S.SUCCEEDED:
                return

    async def shutdown(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def clear_degraded(self, caller: Caller, gpu_index: int) -> str:
        if not caller.admin:
            raise PermissionDenied(f"gpu {gpu_index}: clearing a degraded mark needs an admin, not uid {caller.uid}")
        gpu = next((g for g in self._allocations.view.inventory.gpus if g.index == gpu_index), None)
        if gpu is None:
            raise NotFound(f"gpu {gpu_index}: no such GPU")
        reason = self._allocations.view.ledger.degraded_gpus.get(gpu.bdf)
        if reason is None:
            raise FailedPrecondition(f"gpu {gpu_index}: is not marked degraded")
        await self._allocations.clear_degraded(gpu.bdf)
        log.info("gpu %d: degraded mark cleared by %s", gpu_index, caller.describe(), extra={"event": "gpu_cleared"})
        restarted = await self._models.retry_unplaced()
        if restarted:
            log.info("models %s placed again after gpu %d was cleared", ", ".join(restarted), gpu_index)
        return reason
