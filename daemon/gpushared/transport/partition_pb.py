"""protobuf <-> domain conversion for partition plans, layout requests and operations."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.domain.errors import InvalidArgument
from gpushared.domain.gpu import ComputePartition, MemoryPartition
from gpushared.domain.partition_op import OperationState, PartitionOperation
from gpushared.domain.partitioning import STEP_ORDER, GpuChange, LayoutRequest, PartitionPlan

COMPUTE_TO_PB = {
    ComputePartition.SPX: pb.COMPUTE_PARTITION_SPX,
    ComputePartition.DPX: pb.COMPUTE_PARTITION_DPX,
    ComputePartition.QPX: pb.COMPUTE_PARTITION_QPX,
    ComputePartition.CPX: pb.COMPUTE_PARTITION_CPX,
}
COMPUTE_FROM_PB = {v: k for k, v in COMPUTE_TO_PB.items()}
MEMORY_TO_PB = {
    MemoryPartition.NPS1: pb.MEMORY_PARTITION_NPS1,
    MemoryPartition.NPS2: pb.MEMORY_PARTITION_NPS2,
    MemoryPartition.NPS4: pb.MEMORY_PARTITION_NPS4,
}
MEMORY_FROM_PB = {v: k for k, v in MEMORY_TO_PB.items()}
OPERATION_STATE_TO_PB = {state: pb.OperationState.Value(f"OPERATION_STATE_{state.name}") for state in OperationState}


def timestamp(at: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(at * 1e9))
    return stamp


def layout_request_from_pb(message: pb.LayoutRequest, gpu_count: int) -> LayoutRequest:
    if message.compute_partition not in COMPUTE_FROM_PB:
        raise InvalidArgument(
            "layout: no compute partition given"
            if message.compute_partition == 0
            else f"layout: unknown compute partition {message.compute_partition}",
            hint="use SPX, DPX, QPX or CPX",
        )
    memory = None
    if message.memory_partition != pb.MEMORY_PARTITION_UNSPECIFIED:
        if message.memory_partition not in MEMORY_FROM_PB:
            raise InvalidArgument(
                f"layout: unknown memory partition {message.memory_partition}",
                hint="use NPS1, NPS2 or NPS4 (MI300X offers NPS1 and NPS4)",
            )
        memory = MEMORY_FROM_PB[message.memory_partition]
    gpus = tuple(sorted(set(message.gpu_indices))) or tuple(range(gpu_count))
    return LayoutRequest(gpus, COMPUTE_FROM_PB[message.compute_partition], memory)


def change_to_pb(change: GpuChange) -> pb.GpuLayoutChange:
    return pb.GpuLayoutChange(
        gpu_index=change.gpu_index,
        gpu_bdf=change.gpu_bdf,
        compute_before=COMPUTE_TO_PB[change.before.compute],
        memory_before=MEMORY_TO_PB[change.before.memory],
        compute_after=COMPUTE_TO_PB[change.after.compute],
        memory_after=MEMORY_TO_PB[change.after.memory],
        why=change.why,
        partitions_after=change.partitions_after,
        pools_after=change.pools_after,
        pool_bytes_after=change.pool_bytes_after,
    )


def plan_to_pb(plan: PartitionPlan) -> pb.PartitionPlan:
    return pb.PartitionPlan(
        changes=[change_to_pb(c) for c in plan.changes],
        steps=[pb.PlanStep(kind=str(s.kind), gpu_indices=s.gpus, description=s.description) for s in plan.steps],
        allocations=[
            pb.AffectedAllocation(
                allocation_id=a.allocation_id, name=a.name, owner_uid=a.owner_uid, model=a.model, gpu_indices=a.gpus
            )
            for a in plan.allocations
        ],
        holders=[
            pb.DeviceHolder(
                pid=h.pid,
                uid=h.uid,
                user=h.user,
                command=h.command,
                gpu_index=h.gpu_index,
                partition_id=h.partition_id,
                vram_bytes=h.vram_bytes,
                model=h.model,
            )
            for h in plan.holders
        ],
        holder_services=plan.holder_services,
        warnings=plan.warnings,
        blockers=plan.blockers(drain=False),
        blockers_with_drain=plan.blockers(drain=True),
    )


def operation_to_pb(operation: PartitionOperation, now: float) -> pb.Operation:
    done = 0
    if operation.step is not None:
        done = STEP_ORDER.index(operation.step) + (1 if operation.step_done else 0)
    end = operation.finished_at if operation.finished_at is not None else now
    message = pb.Operation(
        id=operation.id,
        state=OPERATION_STATE_TO_PB[operation.state],
        step=str(operation.step or ""),
        step_done=operation.step_done,
        steps_done=done,
        step_count=len(STEP_ORDER),
        progress=operation.progress,
        created_at=timestamp(operation.created_at),
        elapsed_seconds=max(0.0, end - operation.created_at),
        error=operation.error,
        failed_step=str(operation.failed_step or ""),
        events=[pb.OperationEvent(at=timestamp(e.at), text=e.text) for e in operation.events],
        changes=[
            pb.GpuLayoutChange(
                gpu_index=operation.gpu_index[bdf],
                gpu_bdf=bdf,
                compute_before=COMPUTE_TO_PB[before.compute],
                memory_before=MEMORY_TO_PB[before.memory],
                compute_after=COMPUTE_TO_PB[operation.after[bdf].compute],
                memory_after=MEMORY_TO_PB[operation.after[bdf].memory],
                partitions_after=operation.after[bdf].compute.partition_count,
                pools_after=operation.after[bdf].memory.pool_count,
            )
            for bdf, before in operation.before.items()
        ],
        drained_models=operation.drained_models,
        stopped_services=operation.stopped_services,
        drain=operation.drain,
        requested_by_uid=operation.requested_by,
    )
    if operation.finished_at is not None:
        message.finished_at.CopyFrom(timestamp(operation.finished_at))
    return message
