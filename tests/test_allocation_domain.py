"""Placement rules, pool accounting and refusals of the pure allocation domain."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpushared.domain.allocation import (
    Allocation,
    AllocationRequest,
    Ledger,
    PartitionRef,
    PartitionState,
    PlacementPolicy,
    Quota,
    check_quota,
    validate_allocation_id,
    validate_name,
)
from gpushared.domain.errors import FailedPrecondition, InvalidArgument, NotFound, QuotaExceeded, ResourceExhausted
from gpushared.domain.gpu import GIB, MIB, ComputePartition, HostInventory, MemoryPartition
from gpushared.domain.units import format_bytes, parse_size
from tests.inventory import MI300X_VRAM, make_inventory

SPREAD = PlacementPolicy.SPREAD
PACK = PlacementPolicy.PACK
CPX, SPX, QPX, DPX = ComputePartition.CPX, ComputePartition.SPX, ComputePartition.QPX, ComputePartition.DPX
NPS1, NPS4 = MemoryPartition.NPS1, MemoryPartition.NPS4


def allocate(ledger: Ledger, request: AllocationRequest, n: int, policy: PlacementPolicy = SPREAD) -> Ledger:
    placement = ledger.place(request, policy)
    allocation = Allocation(
        id=f"a-{n:012x}",
        name="",
        owner_uid=1000,
        owner_gid=1000,
        partitions=placement.partitions,
        memory_bytes_per_partition=placement.memory_bytes_per_partition,
        policy=placement.policy,
        placement_reason=placement.reason,
        created_at=float(n),
    )
    return Ledger(ledger.inventory, [*ledger.allocations.values(), allocation], ledger.degraded)


def test_spread_uses_least_loaded_gpu_first() -> None:
    ledger = Ledger(make_inventory(), [])
    gpus = []
    for n in range(8):
        ledger = allocate(ledger, AllocationRequest(memory_bytes=10 * GIB), n)
        gpus.append(ledger.allocations[f"a-{n:012x}"].partitions[0].gpu_bdf)
    assert len(set(gpus)) == 8, "spread must put eight single-GPU requests on eight GPUs"


def test_spread_takes_one_xcd_per_iod_before_doubling_up() -> None:
    ledger = Ledger(make_inventory(gpus=1, compute=CPX, memory=NPS1), [])
    order = []
    for n in range(8):
        ledger = allocate(ledger, AllocationRequest(memory_bytes=GIB, gpu_index=0), n)
        order.append(ledger.allocations[f"a-{n:012x}"].partitions[0].partition_id)
    assert order == [0, 2, 4, 6, 1, 3, 5, 7]


def test_pack_fills_one_gpu_lowest_partition_first() -> None:
    ledger = Ledger(make_inventory(compute=CPX), [])
    refs = []
    for n in range(9):
        ledger = allocate(ledger, AllocationRequest(memory_bytes=GIB), n, PACK)
        refs.append(ledger.allocations[f"a-{n:012x}"].partitions[0])
    assert [r.partition_id for r in refs[:8]] == list(range(8))
    assert len({r.gpu_bdf for r in refs[:8]}) == 1
    assert refs[8].gpu_bdf != refs[0].gpu_bdf


def test_reason_names_gpu_partition_and_policy() -> None:
    placement = Ledger(make_inventory(), []).place(AllocationRequest(memory_bytes=40 * GIB), SPREAD)
    assert placement.reason.startswith("GPU 0 partition 0 (SPX/NPS1): spread: least-loaded GPU")
    assert "40 GiB per partition" in placement.reason


def test_memory_is_split_evenly_and_rounded_up() -> None:
    ledger = Ledger(make_inventory(compute=CPX), [])
    placement = ledger.place(AllocationRequest(memory_bytes=10 * GIB + 1, partition_count=2), SPREAD)
    assert placement.memory_bytes_per_partition == 5 * GIB + 1
    assert len({r.gpu_bdf for r in placement.partitions}) == 1, (
        "a multi-partition request stays on one GPU when it fits"
    )


def test_multi_partition_spans_gpus_only_when_no_single_gpu_fits() -> None:
    ledger = Ledger(make_inventory(), [])
    placement = ledger.place(AllocationRequest(memory_bytes=200 * GIB, partition_count=2), SPREAD)
    assert len({r.gpu_bdf for r in placement.partitions}) == 2
    assert "spans 2 GPUs" in placement.reason


def test_nps4_pools_are_quadrants_and_never_overcommitted() -> None:
    # CPX/NPS4: partitions 2k and 2k+1 share pool k of 49148 MiB; each partition caps at 24574 MiB.
    inventory = make_inventory(gpus=1, compute=CPX, memory=NPS4)
    gpu = inventory.gpus[0]
    assert [gpu.pool_of(p) for p in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    ledger = Ledger(inventory, [])
    for n in range(8):
        ledger = allocate(ledger, AllocationRequest(memory_bytes=24574 * MIB), n)
    assert ledger.pool_allocated(gpu) == dict.fromkeys(range(4), 49148 * MIB)
    with pytest.raises(ResourceExhausted, match="only 0 of 8 are free"):
        ledger.place(AllocationRequest(memory_bytes=MIB), SPREAD)


def test_qpx_nps4_maps_one_partition_per_pool() -> None:
    gpu = make_inventory(gpus=1, compute=QPX, memory=NPS4).gpus[0]
    assert [gpu.pool_of(p) for p in range(4)] == [0, 1, 2, 3]


def test_refusal_when_share_exceeds_every_cap() -> None:
    ledger = Ledger(make_inventory(compute=CPX), [])
    with pytest.raises(ResourceExhausted) as info:
        ledger.place(AllocationRequest(memory_bytes=30 * GIB), SPREAD)
    assert "exceeds the largest partition cap, 24574 MiB on GPU 0 (CPX)" in info.value.message
    assert "--partitions" in info.value.hint


def with_whole_pool_caps(inventory: HostInventory) -> HostInventory:
    """Newer kernels' compute_partition_mem_alloc_mode=ALL: any partition may use its whole pool."""
    gpus = []
    for gpu in inventory.gpus:
        parts = tuple(replace(p, memory_total_bytes=gpu.pool_total_bytes) for p in gpu.partitions)
        gpus.append(replace(gpu, partitions=parts))
    return HostInventory(tuple(gpus))


def test_refusal_names_largest_free_pool() -> None:
    inventory = with_whole_pool_caps(make_inventory(gpus=2, compute=DPX))
    allocations = [
        Allocation(f"a-{n:012x}", "", 1, 1, (PartitionRef(inventory.gpus[n].bdf, 0),), (100 + n) * GIB, SPREAD, "", 0.0)
        for n in range(2)
    ]
    ledger = Ledger(inventory, allocations)
    # Partition 1 of each GPU is free and may use the whole pool, but the pool has only 196592 MiB - 100 GiB left.
    with pytest.raises(ResourceExhausted) as info:
        ledger.place(AllocationRequest(memory_bytes=100 * GIB), SPREAD)
    assert info.value.message == "memory: no GPU has 100 GiB free in one pool; largest free: 94192 MiB on GPU 0"
    placement = ledger.place(AllocationRequest(memory_bytes=94192 * MIB), SPREAD)
    assert placement.partitions == (PartitionRef(inventory.gpus[0].bdf, 1),)


def test_unknown_gpu_and_wrong_mode() -> None:
    ledger = Ledger(make_inventory(), [])
    with pytest.raises(NotFound, match="gpu 9: no such GPU") as info:
        ledger.place(AllocationRequest(memory_bytes=GIB, gpu_index=9), SPREAD)
    assert info.value.hint == "this host has GPUs 0-7"
    with pytest.raises(FailedPrecondition, match="compute partition CPX: no candidate GPU"):
        ledger.place(AllocationRequest(memory_bytes=GIB, compute_partition=CPX), SPREAD)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (AllocationRequest(memory_bytes=0), "memory: must be more than 0 bytes"),
        (AllocationRequest(memory_bytes=-5), "memory: must be more than 0 bytes"),
        (AllocationRequest(memory_bytes=2**64), "memory: larger than 16 EiB"),
        (AllocationRequest(memory_bytes=GIB, partition_count=0), "partitions: 0 is out of range"),
        (AllocationRequest(memory_bytes=GIB, partition_count=65), "partitions: 65 is out of range"),
        (
            AllocationRequest(memory_bytes=GIB, name="bad\x1bname"),
            r"name 'bad\\\\x1bname': not a valid allocation name",
        ),
        (AllocationRequest(memory_bytes=GIB, name="x" * 64), "not a valid allocation name"),
    ],
)
def test_invalid_requests(request_: AllocationRequest, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        Ledger(make_inventory(), []).place(request_, SPREAD)


def test_names_and_ids() -> None:
    validate_name("")
    validate_name("llama-3.1_8b")
    validate_allocation_id("a-0123456789ab")
    for bad in ("A-0123456789ab", "a-0123", "../etc", "a-0123456789ab\n"):
        with pytest.raises(InvalidArgument):
            validate_allocation_id(bad)


def test_degraded_partitions_are_never_placed_and_degrade_their_allocation() -> None:
    inventory = make_inventory(gpus=1, compute=DPX)
    ref = PartitionRef(inventory.gpus[0].bdf, 0)
    held = Allocation("a-000000000001", "", 1, 1, (ref,), GIB, SPREAD, "", 0.0)
    ledger = Ledger(inventory, [held], {ref: "compute partition switch failed"})
    assert ledger.partition_state(ref) is PartitionState.DEGRADED
    state, reason = ledger.allocation_state(held)
    assert state.value == "degraded"
    assert "compute partition switch failed" in reason
    placement = ledger.place(AllocationRequest(memory_bytes=GIB), SPREAD)
    assert placement.partitions == (PartitionRef(inventory.gpus[0].bdf, 1),)


def test_allocation_on_vanished_partition_is_degraded() -> None:
    cpx = make_inventory(gpus=1, compute=CPX)
    held = Allocation("a-000000000001", "", 1, 1, (PartitionRef(cpx.gpus[0].bdf, 5),), GIB, SPREAD, "", 0.0)
    spx = make_inventory(gpus=1)
    state, reason = Ledger(spx, [held]).allocation_state(held)
    assert state.value == "degraded"
    assert reason == "GPU 0 (0000:05:00.0) has no partition 5 in SPX"


def test_quota() -> None:
    held = [Allocation("a-000000000001", "", 7, 7, (PartitionRef("0000:05:00.0", 0),), 10 * GIB, SPREAD, "", 0.0)]
    check_quota(held, 10 * GIB, Quota(max_allocations=2, max_memory_bytes=20 * GIB), 7)
    with pytest.raises(QuotaExceeded, match="user 7: quota allows 1 allocations and you hold 1"):
        check_quota(held, GIB, Quota(max_allocations=1), 7)
    with pytest.raises(
        QuotaExceeded, match="user 7: quota allows 15 GiB and you hold 10 GiB; 10 GiB more does not fit"
    ):
        check_quota(held, 10 * GIB, Quota(max_memory_bytes=15 * GIB), 7)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("40GiB", 40 * GIB),
        ("512MiB", 512 * MIB),
        ("1.5GiB", 1536 * MIB),
        ("1000", 1000),
        ("2 GB", 2 * 10**9),
        ("7b", 7),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1GiB", "1.5", "12XB", "GiB", "1e9", "99999999999999TiB", "1.0000000001KiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_size(text)


def test_format_bytes() -> None:
    assert format_bytes(MI300X_VRAM) == "196592 MiB"
    assert format_bytes(40 * GIB) == "40 GiB"
    assert format_bytes(1234567) == "1.18 MiB"
    assert format_bytes(12) == "12 B"


# ---- property: whatever the sequence, placement is sound and complete --------------------------

MODES = [(SPX, NPS1), (DPX, NPS1), (QPX, NPS1), (CPX, NPS1), (QPX, NPS4), (CPX, NPS4)]


def fits_somewhere(ledger: Ledger, request: AllocationRequest) -> bool:
    """Independent oracle: can `count` partitions with `share` bytes each be found at all?"""
    share = -(-request.memory_bytes // request.partition_count)
    capacity = 0
    for gpu in ledger.inventory.gpus:
        used = ledger.pool_allocated(gpu)
        for pool in range(gpu.pool_count):
            free_parts = [
                p
                for p in gpu.partitions
                if gpu.pool_of(p.partition_id) == pool
                and ledger.partition_state(PartitionRef(gpu.bdf, p.partition_id)) is PartitionState.FREE
                and p.memory_total_bytes >= share
            ]
            capacity += min(len(free_parts), (gpu.pool_total_bytes - used.get(pool, 0)) // share)
    return capacity >= request.partition_count


def assert_sound(ledger: Ledger, inventory: HostInventory) -> None:
    seen: set[PartitionRef] = set()
    for allocation in ledger.allocations.values():
        for ref in allocation.partitions:
            assert ref not in seen, f"{ref} handed to two allocations"
            seen.add(ref)
    for gpu in inventory.gpus:
        for pool, used in ledger.pool_allocated(gpu).items():
            assert used <= gpu.pool_total_bytes, f"GPU {gpu.index} pool {pool} overcommitted"
        for partition in gpu.partitions:
            holder = ledger.holder_of(PartitionRef(gpu.bdf, partition.partition_id))
            if holder is not None:
                assert holder.memory_bytes_per_partition <= partition.memory_total_bytes


@settings(max_examples=300, deadline=None)
@given(
    modes=st.lists(st.sampled_from(MODES), min_size=1, max_size=8),
    whole_pool_caps=st.booleans(),
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("alloc"), st.integers(1, 200), st.integers(1, 4), st.sampled_from([SPREAD, PACK])),
            st.tuples(st.just("release"), st.integers(0, 50), st.just(0), st.just(SPREAD)),
        ),
        max_size=40,
    ),
)
def test_placement_never_double_allocates_overcommits_or_wrongly_refuses(
    modes: list[tuple[ComputePartition, MemoryPartition]],
    whole_pool_caps: bool,
    ops: list[tuple[str, int, int, PlacementPolicy]],
) -> None:
    inventory = make_inventory(modes)
    if whole_pool_caps:
        inventory = with_whole_pool_caps(inventory)
    ledger = Ledger(inventory, [])
    for n, (op, amount, count, policy) in enumerate(ops):
        if op == "release":
            if ledger.allocations:
                victim = sorted(ledger.allocations)[amount % len(ledger.allocations)]
                ledger = Ledger(inventory, [a for a in ledger.allocations.values() if a.id != victim])
            continue
        request = AllocationRequest(memory_bytes=amount * GIB, partition_count=count)
        possible = fits_somewhere(ledger, request)
        try:
            ledger = allocate(ledger, request, n, policy)
        except ResourceExhausted:
            assert not possible, f"refused {request} although capacity exists"
        else:
            assert possible, "placed a request the oracle says cannot fit"
        assert_sound(ledger, inventory)
