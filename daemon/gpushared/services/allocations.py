"""Allocation use cases: place, record durably, release, and answer queries from a cached view."""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from gpushared.domain.allocation import (
    Allocation,
    AllocationRequest,
    Ledger,
    PlacementPolicy,
    Quota,
    check_quota,
    share_per_partition,
    validate_allocation_id,
    validate_request,
)
from gpushared.domain.caller import Caller, authorize_release
from gpushared.domain.errors import FailedPrecondition, NotFound
from gpushared.domain.gpu import HostInventory
from gpushared.ports import AllocationAdded, AllocationRemoved, AllocationStore, GpuCleared, GpuMarked
from gpushared.services.commit import GroupCommit

log = logging.getLogger("gpushared.allocations")


@dataclass(frozen=True)
class HostView:
    """An immutable snapshot for readers: no RPC ever waits on hardware."""

    inventory: HostInventory
    ledger: Ledger
    observed_at: float


@dataclass(frozen=True)
class AllocationPolicy:
    default_policy: PlacementPolicy
    default_quota: Quota
    user_quotas: Mapping[int, Quota]

    def quota_for(self, uid: int) -> Quota:
        return self.user_quotas.get(uid, self.default_quota)


def new_allocation_id() -> str:
    return "a-" + secrets.token_hex(6)


class AllocationService:
    """Single writer of allocations. Methods run on the event loop thread and decide (read the
    ledger, place, reserve) without yielding, so two requests can never both see a partition as
    free; only then do they wait for the change to be durable."""

    def __init__(
        self,
        store: AllocationStore,
        policy: AllocationPolicy,
        inventory: HostInventory,
        *,
        observed_at: float,
        clock: Callable[[], float] = time.time,
        id_factory: Callable[[], str] = new_allocation_id,
    ) -> None:
        self.commit = GroupCommit(store)
        self._releasing: set[str] = set()
        self._policy = policy
        self._clock = clock
        self._new_id = id_factory
        allocations = store.load()
        self._closed: dict[str, str] = {}
        self._degraded = {bdf: reason for bdf, (reason, _) in store.load_gpu_marks().items()}
        self._view = HostView(inventory, Ledger(inventory, allocations, degraded_gpus=self._degraded), observed_at)
        for allocation in allocations:
            state, reason = self._view.ledger.allocation_state(allocation)
            if reason:
                log.warning("allocation %s is %s: %s", allocation.id, state, reason)

    @property
    def view(self) -> HostView:
        return self._view

    def set_policy(self, policy: AllocationPolicy) -> None:
        self._policy = policy

    def update_inventory(self, inventory: HostInventory, observed_at: float) -> None:
        self._rebuild(inventory=inventory, observed_at=observed_at)

    def close_gpus(self, bdfs: Iterable[str], why: str) -> None:
        """Admit no new allocation on these GPUs (a partition operation is changing them)."""
        self._closed.update(dict.fromkeys(bdfs, why))
        self._rebuild()

    def open_gpus(self, bdfs: Iterable[str]) -> None:
        for bdf in bdfs:
            self._closed.pop(bdf, None)
        self._rebuild()

    async def mark_degraded(self, bdf: str, reason: str) -> None:
        """Exclude the GPU from allocation until an admin clears it; durable, since it must survive a restart."""
        since = self._clock()
        await self.commit.record(GpuMarked(bdf, reason, since))
        self._degraded[bdf] = reason
        self._rebuild()

    async def clear_degraded(self, bdf: str) -> None:
        await self.commit.record(GpuCleared(bdf))
        self._degraded.pop(bdf, None)
        self._rebuild()

    def _rebuild(self, *, inventory: HostInventory | None = None, observed_at: float | None = None) -> None:
        view = self._view
        inventory = inventory or view.inventory
        self._view = HostView(
            inventory,
            Ledger(
                inventory,
                view.ledger.allocations.values(),
                view.ledger.degraded,
                closed_gpus=self._closed,
                degraded_gpus=self._degraded,
            ),
            view.observed_at if observed_at is None else observed_at,
        )

    async def allocate(self, caller: Caller, request: AllocationRequest) -> Allocation:
        validate_request(request)
        ledger = self._view.ledger
        if not caller.admin:
            held = [a for a in ledger.allocations.values() if a.owner_uid == caller.uid]
            total = share_per_partition(request.memory_bytes, request.partition_count) * request.partition_count
            check_quota(held, total, self._policy.quota_for(caller.uid), caller.uid)
        placement = ledger.place(request, self._policy.default_policy)
        allocation = Allocation(
            id=self._unused_id(ledger),
            name=request.name,
            owner_uid=caller.uid,
            owner_gid=caller.gid,
            partitions=placement.partitions,
            memory_bytes_per_partition=placement.memory_bytes_per_partition,
            policy=placement.policy,
            placement_reason=placement.reason,
            created_at=self._clock(),
        )
        # Reserve before waiting for the disk, so concurrent requests see the partitions taken;
        # the lease is handed out only once it is durable, and undone if it cannot be.
        self._replace_allocations([*ledger.allocations.values(), allocation])
        await self.commit.record(AllocationAdded(allocation), undo=lambda: self._drop(allocation.id))
        log.info(
            "allocated %s to %s: %s",
            allocation.id,
            caller.describe(),
            placement.reason,
            extra={"event": "allocate", "allocation": allocation.id, "uid": caller.uid, "pid": caller.pid},
        )
        return allocation

    async def release(self, caller: Caller, allocation_id: str) -> Allocation:
        allocation = self.get(allocation_id)
        authorize_release(caller, allocation)
        if allocation.id in self._releasing:
            raise FailedPrecondition(f"allocation {allocation.id}: already being released")
        # The partitions stay reserved until the removal is durable: freed earlier, a crash
        # could bring the allocation back after someone else had been given its partitions.
        self._releasing.add(allocation.id)

        def released() -> None:
            self._releasing.discard(allocation.id)
            self._drop(allocation.id)

        await self.commit.record(
            AllocationRemoved(allocation.id), then=released, undo=lambda: self._releasing.discard(allocation.id)
        )
        log.info(
            "released %s (owner uid %d) by %s",
            allocation.id,
            allocation.owner_uid,
            caller.describe(),
            extra={"event": "release", "allocation": allocation.id, "uid": caller.uid, "pid": caller.pid},
        )
        return allocation

    def _drop(self, allocation_id: str) -> None:
        self._replace_allocations([a for a in self._view.ledger.allocations.values() if a.id != allocation_id])

    def get(self, allocation_id: str) -> Allocation:
        validate_allocation_id(allocation_id)
        allocation = self._view.ledger.allocations.get(allocation_id)
        if allocation is None:
            raise NotFound(f"allocation {allocation_id}: no such allocation", hint="list them with `gpusharectl list`")
        return allocation

    def _unused_id(self, ledger: Ledger) -> str:
        while (candidate := self._new_id()) in ledger.allocations:
            pass
        return candidate

    def _replace_allocations(self, allocations: list[Allocation]) -> None:
        view = self._view
        self._view = HostView(
            view.inventory,
            Ledger(
                view.inventory,
                allocations,
                view.ledger.degraded,
                closed_gpus=self._closed,
                degraded_gpus=self._degraded,
            ),
            view.observed_at,
        )
