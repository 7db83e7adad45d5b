"""Partition plans (pure): valid combinations, the hive-wide memory partition, blockers, steps; operation records."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushared.domain.allocation import (
    Allocation,
    AllocationRequest,
    Ledger,
    PartitionRef,
    PartitionState,
    PlacementPolicy,
)
from gpushared.domain.errors import (
    FailedPrecondition,
    IllegalTransition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StateError,
)
from gpushared.domain.gpu import GIB, ComputePartition, MemoryPartition
from gpushared.domain.partition_op import TRANSITIONS, OperationState, PartitionOperation, parse_layout
from gpushared.domain.partitioning import (
    STEP_ORDER,
    DeviceHolder,
    GpuLayout,
    LayoutRequest,
    StepKind,
    check_combination,
    gpu_ranges,
    layout_drift,
    parse_gpu_set,
    plan_partitions,
)
from tests.inventory import make_inventory

SPX, DPX, QPX, CPX = ComputePartition.SPX, ComputePartition.DPX, ComputePartition.QPX, ComputePartition.CPX
NPS1, NPS4 = MemoryPartition.NPS1, MemoryPartition.NPS4
ALL = tuple(range(8))


def allocation(n: int, gpu: int, bdf_bus: str = "05") -> Allocation:
    return Allocation(
        id=f"a-{n:012x}",
        name=f"w{n}",
        owner_uid=1000 + n,
        owner_gid=1000,
        partitions=(PartitionRef(f"0000:{bdf_bus}:00.0", 0),),
        memory_bytes_per_partition=GIB,
        policy=PlacementPolicy.SPREAD,
        placement_reason="test",
        created_at=float(n),
    )


def holder(pid: int, gpu: int, model: str = "") -> DeviceHolder:
    return DeviceHolder(pid, 1000, "alice", "python3 train.py", gpu, 0, GIB, model)


def test_invalid_combinations_are_refused_with_the_way_out() -> None:
    with pytest.raises(InvalidArgument) as info:
        check_combination(SPX, NPS4)
    assert "layout SPX/NPS4: SPX needs memory partition NPS1" in str(info.value)
    assert "NPS4 works with CPX or QPX" in info.value.hint
    with pytest.raises(InvalidArgument, match="DPX needs memory partition NPS1 or NPS2"):
        check_combination(DPX, NPS4)
    assert check_combination(CPX, NPS4) == []
    assert check_combination(SPX, NPS1) == []
    assert "not validated by AMD" in check_combination(QPX, NPS4)[0]
    assert "CPX/NPS1 is allowed by the kernel but not validated by AMD" in check_combination(CPX, NPS1)[0]


def test_gpu_sets() -> None:
    assert parse_gpu_set("all", 8) == ALL
    assert parse_gpu_set("0,2-3", 8) == (0, 2, 3)
    assert parse_gpu_set(" 3 , 1 ", 8) == (1, 3)
    with pytest.raises(NotFound, match="gpu 8: no such GPU"):
        parse_gpu_set("6-8", 8)
    with pytest.raises(InvalidArgument, match="'x' is not a GPU index"):
        parse_gpu_set("1,x", 8)
    with pytest.raises(InvalidArgument, match="runs backwards"):
        parse_gpu_set("3-1", 8)
    assert gpu_ranges([0, 1, 2, 3, 5, 7, 6]) == "0-3, 5-7"


def test_memory_change_touches_the_whole_hive_and_orders_nps_before_compute() -> None:
    plan = plan_partitions(make_inventory(), LayoutRequest(ALL, CPX, NPS4), allocations=(), models_on={}, holders=())
    assert [c.gpu_index for c in plan.changes] == list(ALL)
    assert all(c.after == GpuLayout(CPX, NPS4) and c.partitions_after == 8 and c.pools_after == 4 for c in plan.changes)
    assert plan.changes[0].pool_bytes_after == 196592 * 1024 * 1024 // 4
    assert [s.kind for s in plan.steps] == list(STEP_ORDER)
    assert plan.memory_change
    assert any("applies to all 8 GPUs of the hive" in w for w in plan.warnings)
    assert plan.blockers(drain=False) == []


def test_memory_change_refused_when_a_gpu_outside_the_request_cannot_follow() -> None:
    with pytest.raises(InvalidArgument) as info:
        plan_partitions(make_inventory(), LayoutRequest((0, 1), CPX, NPS4), allocations=(), models_on={}, holders=())
    assert "gpu 2: the memory partition change to NPS4 applies to every GPU of the hive" in str(info.value)
    assert "include GPU 2 in --gpus" in info.value.hint


def test_gpus_outside_the_request_keep_their_compute_partition_across_the_reload() -> None:
    inventory = make_inventory([(CPX, NPS1)] * 4 + [(QPX, NPS1)] * 4)
    plan = plan_partitions(inventory, LayoutRequest((0, 1, 2, 3), CPX, NPS4), allocations=(), models_on={}, holders=())
    assert [(c.gpu_index, str(c.after), c.why) for c in plan.changes][3:5] == [
        (3, "CPX/NPS4", "requested"),
        (4, "QPX/NPS4", "the memory partition is hive-wide"),
    ]
    compute = next(s for s in plan.steps if s.kind is StepKind.SET_COMPUTE)
    # After the reload every GPU is in the AUTO mode (CPX under NPS4); QPX must be set again.
    assert compute.description.startswith("set compute partition CPX on GPU 0-3, QPX on GPU 4-7")


def test_compute_only_change_touches_only_the_gpus_that_change() -> None:
    inventory = make_inventory([(SPX, NPS1), (CPX, NPS1), (SPX, NPS1)])
    plan = plan_partitions(inventory, LayoutRequest((0, 1), CPX), allocations=(), models_on={}, holders=())
    assert [c.gpu_index for c in plan.changes] == [0]
    assert not plan.memory_change
    assert StepKind.RELOAD_DRIVER not in [s.kind for s in plan.steps]
    assert plan_partitions(inventory, LayoutRequest((1,), CPX), allocations=(), models_on={}, holders=()).noop


def test_blockers_models_need_drain_bare_allocations_and_foreign_holders_never_pass() -> None:
    inventory = make_inventory()
    served, bare, elsewhere = allocation(1, 0, "05"), allocation(2, 7, "e5"), allocation(3, 1, "26")
    request = LayoutRequest((0, 7), CPX)
    plan = plan_partitions(
        inventory,
        request,
        allocations=(served, bare, elsewhere),
        models_on={served.id: "llama"},
        holders=(holder(10, 0, "llama"), holder(11, 7), holder(12, 3)),
    )
    assert [(a.allocation_id, a.model, a.gpus) for a in plan.allocations] == [
        (served.id, "llama", (0,)),
        (bare.id, "", (7,)),
    ], "GPU 1's allocation is not in the way"
    assert [h.pid for h in plan.holders] == [10, 11], "a holder on an untouched GPU does not matter"
    without = plan.blockers(drain=False)
    assert any("model llama on GPU 0: runs there (pass --drain" in b for b in without)
    with_drain = plan.blockers(drain=True)
    assert len(with_drain) == 2
    assert f"allocation {bare.id} (w2, uid 1002) on GPU 7: release it first" in with_drain[0]
    assert "pid 11 'python3 train.py' of alice (uid 1000) on GPU 7 partition 0: holds the device" in with_drain[1]
    # With a device-holder service configured the apply stops it and re-checks, so holders alone do not refuse.
    relaxed = replace(plan, holder_services=("amd-metrics-exporter.service",))
    assert len(relaxed.blockers(drain=True)) == 1
    assert plan.models == ("llama",)


def test_capabilities_are_checked() -> None:
    inventory = make_inventory()
    with pytest.raises(InvalidArgument, match="memory partition NPS2 is not among its capabilities"):
        plan_partitions(
            inventory, LayoutRequest(ALL, DPX, MemoryPartition.NPS2), allocations=(), models_on={}, holders=()
        )
    with pytest.raises(NotFound, match="gpu 9"):
        plan_partitions(inventory, LayoutRequest((9,), CPX), allocations=(), models_on={}, holders=())


def test_drift_names_the_source_of_truth() -> None:
    inventory = make_inventory([(SPX, NPS1), (CPX, NPS1), (SPX, NPS1)])
    drift = layout_drift(
        inventory, desired={0: GpuLayout(SPX, NPS1), 2: GpuLayout(CPX, NPS1)}, last_set={1: GpuLayout(SPX, NPS1)}
    )
    assert drift == [
        "GPU 1: is CPX/NPS1, but gpushared last set SPX/NPS1",
        "GPU 2: is SPX/NPS1, the configured layout says CPX/NPS1",
    ]


def operation() -> PartitionOperation:
    return PartitionOperation(
        id="op-1",
        request=LayoutRequest(ALL, CPX, NPS4),
        drain=True,
        requested_by=0,
        created_at=1.0,
        before={"0000:05:00.0": GpuLayout(SPX, NPS1)},
        after={"0000:05:00.0": GpuLayout(CPX, NPS4)},
        gpu_index={"0000:05:00.0": 0},
        drained_models=("m1",),
    )


def test_operation_walks_the_steps_and_round_trips_through_json() -> None:
    op = operation()
    seen = []
    while (step := op.next_step()) is not None:
        seen.append(step)
        op = op.starting(step, 2.0, f"{step}: started")
        assert op.next_step() is step, "an unfinished step is run again after a crash"
        op = op.done(step, 3.0, f"{step}: done")
        assert PartitionOperation.from_json(op.to_json()) == op
    assert seen == list(STEP_ORDER)
    finished = op.moved(OperationState.SUCCEEDED, 4.0, "succeeded")
    assert finished.finished and finished.finished_at == 4.0
    with pytest.raises(IllegalTransition, match="succeeded -> rolling_back is not allowed"):
        finished.failing(None, 5.0, "late")
    with pytest.raises(IllegalTransition, match="finished step fence but None was started"):
        operation().done(StepKind.FENCE, 1.0, "x")


@given(st.sampled_from(list(OperationState)), st.sampled_from(list(OperationState)))
def test_transition_table_is_the_only_way(source: OperationState, target: OperationState) -> None:
    op = replace(operation(), state=source)
    if target in TRANSITIONS[source]:
        assert op.moved(target, 1.0, "x").state is target
    else:
        with pytest.raises(IllegalTransition):
            op.moved(target, 1.0, "x")


def test_unreadable_journal_record_is_a_state_error() -> None:
    with pytest.raises(StateError, match="unreadable record"):
        PartitionOperation.from_json('{"id": "op-1"}')
    assert parse_layout("QPX/NPS4") == GpuLayout(QPX, NPS4)


def test_events_are_bounded() -> None:
    op = operation()
    for n in range(150):
        op = op.log(float(n), f"event {n}")
    assert len(op.events) == 100 and op.events[-1].text == "event 149" and op.progress == "event 149"


def test_closed_and_degraded_gpus_admit_no_allocation() -> None:
    inventory = make_inventory(gpus=2)
    a, b = inventory.gpus[0].bdf, inventory.gpus[1].bdf
    ledger = Ledger(inventory, (), closed_gpus={a: "operation op-1 is changing it"}, degraded_gpus={b: "broken"})
    request = AllocationRequest(GIB, 1, None, None, "", None)
    with pytest.raises(ResourceExhausted, match=r"no GPU is available to this daemon \(closed: "):
        ledger.place(request, PlacementPolicy.SPREAD)
    with pytest.raises(FailedPrecondition, match="gpu 0: admits no allocation now: operation op-1"):
        ledger.place(replace(request, gpu_index=0), PlacementPolicy.SPREAD)
    assert ledger.partition_state(PartitionRef(b, 0)) is PartitionState.DEGRADED
    assert ledger.partition_state(PartitionRef(a, 0)) is PartitionState.FREE
    open_ledger = Ledger(inventory, (), closed_gpus={a: "x"})
    assert open_ledger.place(request, PlacementPolicy.SPREAD).partitions[0].gpu_bdf == b
