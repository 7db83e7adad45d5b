"""Group commit: batching while a transaction is in flight, order, failure and cancellation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from gpushared.domain.allocation import Allocation, PartitionRef, PlacementPolicy
from gpushared.domain.errors import StateWriteError
from gpushared.ports import AllocationAdded, AllocationRemoved, StoreChange
from gpushared.services.commit import GroupCommit


class GatedStore:
    """An AllocationStore whose transactions wait for a gate and may fail, to observe batching."""

    def __init__(self) -> None:
        self.batches: list[list[StoreChange]] = []
        self.gate = threading.Event()
        self.fail_next = False

    def load(self) -> list[object]:
        return []

    def apply(self, changes: Sequence[StoreChange]) -> None:
        self.gate.wait(10)
        if self.fail_next:
            self.fail_next = False
            raise StateWriteError("state file x: cannot record the change (disk full); nothing was changed")
        self.batches.append(list(changes))

    def close(self) -> None:
        pass


def removed(n: int) -> AllocationRemoved:
    return AllocationRemoved(f"a-{n:012x}")


def test_changes_made_during_a_commit_share_the_next_one() -> None:
    store = GatedStore()
    commit = GroupCommit(store)  # type: ignore[arg-type]
    order: list[int] = []

    async def scenario() -> None:
        first = asyncio.ensure_future(commit.record(removed(0), then=lambda: order.append(0)))
        await asyncio.sleep(0.05)  # the first transaction is now in flight, waiting at the gate
        rest = [asyncio.ensure_future(commit.record(removed(n), then=lambda n=n: order.append(n))) for n in range(1, 6)]
        await asyncio.sleep(0.05)
        store.gate.set()
        await asyncio.gather(first, *rest)

    asyncio.run(scenario())
    assert [len(b) for b in store.batches] == [1, 5]
    assert order == [0, 1, 2, 3, 4, 5]
    assert store.batches[1] == [removed(n) for n in range(1, 6)]


def test_a_failed_transaction_undoes_every_change_in_it() -> None:
    store = GatedStore()
    store.gate.set()
    store.fail_next = True
    commit = GroupCommit(store)  # type: ignore[arg-type]
    undone: list[int] = []

    async def scenario() -> list[BaseException | None]:
        results = await asyncio.gather(
            *(commit.record(removed(n), undo=lambda n=n: undone.append(n)) for n in range(3)), return_exceptions=True
        )
        await commit.record(removed(9))  # the next transaction works again
        return list(results)

    results = asyncio.run(scenario())
    assert all(isinstance(r, StateWriteError) for r in results)
    assert undone == [0, 1, 2]
    assert store.batches == [[removed(9)]]


def test_a_cancelled_caller_still_gets_its_change_applied_and_followed_up() -> None:
    store = GatedStore()
    commit = GroupCommit(store)  # type: ignore[arg-type]
    followed: list[str] = []

    async def scenario() -> None:
        waiter = asyncio.ensure_future(
            commit.record(AllocationRemoved("a-000000000001"), then=lambda: followed.append("then"))
        )
        await asyncio.sleep(0.05)
        waiter.cancel()  # the client hung up while its change was being written
        store.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await commit.record(removed(2))

    asyncio.run(scenario())
    assert followed == ["then"], "memory must follow what reached the disk"
    assert store.batches[0] == [AllocationRemoved("a-000000000001")]


def test_added_and_removed_keep_their_order_in_one_batch() -> None:
    store = GatedStore()
    commit = GroupCommit(store)  # type: ignore[arg-type]

    async def scenario() -> None:
        blocker = asyncio.ensure_future(commit.record(removed(0)))
        await asyncio.sleep(0.05)
        added = AllocationAdded(
            Allocation(
                "a-00000000000a", "", 0, 0, (PartitionRef("0000:05:00.0", 0),), 1, PlacementPolicy.SPREAD, "", 0.0
            )
        )
        batch = [asyncio.ensure_future(commit.record(c)) for c in (added, removed(1))]
        store.gate.set()
        await asyncio.gather(blocker, *batch)

    asyncio.run(scenario())
    assert isinstance(store.batches[1][0], AllocationAdded)
    assert store.batches[1][1] == removed(1)
