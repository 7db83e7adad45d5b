"""Output of gpusharectl: aligned tables for people, the API message as JSON for scripts. No RPCs here."""

from __future__ import annotations

import datetime
import pwd
import shlex
from collections.abc import Sequence

from google.protobuf import json_format
from google.protobuf.message import Message

from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.domain.units import format_bytes


def to_json(message: Message) -> str:
    """The API message in proto3 JSON, field names as in the .proto (uint64 values are strings)."""
    return json_format.MessageToJson(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True, indent=2
    )


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in cells]
    return "\n".join(lines)


def _enum(value: int, enum_type: object, prefix: str) -> str:
    name: str = enum_type.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix)


def compute_name(value: int) -> str:
    return _enum(value, pb.ComputePartition, "COMPUTE_PARTITION_")


def memory_name(value: int) -> str:
    return _enum(value, pb.MemoryPartition, "MEMORY_PARTITION_")


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def status(response: pb.GetStatusResponse) -> str:
    caller = response.caller
    rows = [
        ("version", response.version),
        ("backend", response.backend),
        ("uptime", f"{response.uptime_seconds:.0f}s"),
        ("gpus", response.gpu_count),
        (
            "partitions",
            f"{response.partition_count} ({response.free_partition_count} free, "
            f"{response.degraded_partition_count} degraded)",
        ),
        ("allocations", response.allocation_count),
        (
            "memory",
            f"{format_bytes(response.memory_allocated_bytes)} allocated of {format_bytes(response.memory_total_bytes)}",
        ),
        ("you", f"{user_name(caller.uid)} (uid {caller.uid}){' admin' if caller.admin else ''}"),
    ]
    if response.operation_id:
        rows.append(
            ("operation", f"{response.operation_id} running (gpusharectl operation show {response.operation_id})")
        )
    rows += [("drift", line) for line in response.drift]
    rows += [("degraded", f"GPU {g.gpu_index}: {g.reason}") for g in response.degraded_gpus]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def gpus(response: pb.ListGpusResponse) -> str:
    rows = []
    for gpu in response.gpus:
        pools = " ".join(f"{format_bytes(p.free_bytes)}" for p in gpu.memory_pools)
        rows.append(
            (
                gpu.index,
                gpu.bdf,
                gpu.model_name,
                compute_name(gpu.compute_partition),
                memory_name(gpu.memory_partition),
                len(gpu.partitions),
                format_bytes(gpu.memory_total_bytes),
                format_bytes(sum(p.allocated_bytes for p in gpu.memory_pools)),
                pools,
            )
        )
    return table(("GPU", "BDF", "MODEL", "COMPUTE", "MEMORY", "PARTITIONS", "VRAM", "ALLOCATED", "FREE PER POOL"), rows)


def partitions(response: pb.ListPartitionsResponse) -> str:
    rows = []
    for part in response.partitions:
        state = _enum(part.state, pb.PartitionState, "PARTITION_STATE_").lower()
        holder = ""
        if part.HasField("holder"):
            holder = part.holder.allocation_id + (
                f" ({part.holder.allocation_name})" if part.holder.allocation_name else ""
            )
            holder += f" {user_name(part.holder.owner_uid)}"
        elif part.degraded_reason:
            holder = part.degraded_reason
        rows.append(
            (
                part.gpu_index,
                part.partition_id,
                part.bdf,
                part.render_node,
                part.hip_index,
                part.memory_pool,
                format_bytes(part.memory_cap_bytes),
                state,
                holder,
            )
        )
    return table(("GPU", "PART", "BDF", "RENDER", "HIP", "POOL", "CAP", "STATE", "HOLDER"), rows)


def where(allocation: pb.Allocation) -> str:
    return ", ".join(f"{p.gpu_index}/{p.partition_id}" for p in allocation.partitions)


def allocations(response: pb.ListAllocationsResponse) -> str:
    rows = [
        (
            a.id,
            a.name or "-",
            a.model or "-",
            user_name(a.owner_uid),
            where(a),
            format_bytes(a.memory_bytes_total),
            _enum(a.state, pb.AllocationState, "ALLOCATION_STATE_").lower(),
            a.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        )
        for a in response.allocations
    ]
    return table(("ID", "NAME", "MODEL", "OWNER", "GPU/PART", "MEMORY", "STATE", "CREATED (UTC)"), rows)


def allocation(a: pb.Allocation) -> str:
    lines = [
        f"id          {a.id}",
        f"name        {a.name or '-'}",
        f"model       {a.model or '-'}",
        f"owner       {user_name(a.owner_uid)} (uid {a.owner_uid})",
        f"state       {_enum(a.state, pb.AllocationState, 'ALLOCATION_STATE_').lower()}"
        + (f": {a.state_reason}" if a.state_reason else ""),
        f"memory      {format_bytes(a.memory_bytes_total)} "
        f"({format_bytes(a.memory_bytes_per_partition)} per partition, {a.memory_bytes_per_partition} bytes)",
        f"placement   {a.placement_reason}",
        "partitions",
    ]
    for p in a.partitions:
        lines.append(
            f"  GPU {p.gpu_index} partition {p.partition_id}  {p.bdf}  {p.render_node}  hip {p.hip_index}  pool {p.memory_pool}"
        )
    lines.append("environment")
    lines.extend(f"  {k}={v}" for k, v in sorted(a.environment.items()))
    lines.append("devices     " + " ".join(a.device_nodes))
    return "\n".join(lines)


def env_exports(a: pb.Allocation) -> str:
    """`export VAR=value` lines for eval, values shell-quoted."""
    return "\n".join(f"export {k}={shlex.quote(v)}" for k, v in sorted(a.environment.items()))


def state_name(value: int) -> str:
    return _enum(value, pb.ModelState, "MODEL_STATE_").lower()


def models(response: pb.ListModelsResponse) -> str:
    rows = [
        (
            m.name,
            m.spec.model,
            state_name(m.state),
            m.endpoint,
            m.pid or "-",
            m.restarts,
            m.allocation_id,
            user_name(m.run_as_uid),
        )
        for m in response.models
    ]
    return table(("NAME", "MODEL", "STATE", "ENDPOINT", "PID", "RESTARTS", "ALLOCATION", "RUNS AS"), rows)


def model(m: pb.Model) -> str:
    lines = [
        f"name        {m.name}",
        f"model       {m.spec.model} ({_enum(m.spec.engine, pb.Engine, 'ENGINE_').lower()} engine, served as {m.spec.served_name})",
        f"state       {state_name(m.state)}" + (f": {m.last_error.splitlines()[0]}" if m.last_error else ""),
        f"endpoint    {m.endpoint}" + ("  (requires its API key as a bearer token)" if m.api_key_required else ""),
        f"pid         {m.pid or '-'} (runs as {user_name(m.run_as_uid)}, uid {m.run_as_uid})",
        f"restarts    {m.restarts}",
        f"uptime      {_uptime(m)}",
        f"start limit {m.start_timeout_seconds:.0f} s (learned from its earlier starts)",
        f"allocation  {m.allocation_id}",
        f"log         {m.log_path}",
        "transitions",
    ]
    for t in m.transitions:
        when = t.at.ToDatetime().strftime("%H:%M:%S")
        lines.append(f"  {when}  {state_name(t.source)} -> {state_name(t.target)}: {t.reason}")
    if m.last_error and "\n" in m.last_error:
        lines.append("last error")
        lines.extend(f"  {line}" for line in m.last_error.splitlines())
    return "\n".join(lines)


def _uptime(m: pb.Model) -> str:
    """Time since the model last became READY, from its recorded transitions."""
    if m.state not in (pb.MODEL_STATE_READY, pb.MODEL_STATE_UNHEALTHY):
        return "-"
    ready = [t.at.ToDatetime() for t in m.transitions if t.target == pb.MODEL_STATE_READY]
    if not ready:
        return "-"
    seconds = int((datetime.datetime.now(datetime.UTC).replace(tzinfo=None) - ready[-1]).total_seconds())
    hours, rest = divmod(max(seconds, 0), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _layout(compute: int, memory: int) -> str:
    if compute == pb.COMPUTE_PARTITION_UNSPECIFIED:
        return "-"
    return f"{compute_name(compute)}/{memory_name(memory)}"


def _gpus(indices: Sequence[int]) -> str:
    return ", ".join(map(str, indices)) or "-"


def partition_layout(response: pb.ListGpusResponse) -> str:
    """One row per GPU with a cell per partition, pools separated by |: . free, A allocated, D degraded."""
    cell = {pb.PARTITION_STATE_FREE: ".", pb.PARTITION_STATE_ALLOCATED: "A", pb.PARTITION_STATE_DEGRADED: "D"}
    rows = []
    for gpu in response.gpus:
        pools = [
            "".join(cell.get(gpu.partitions[p].state, "?") for p in pool.partition_ids if p < len(gpu.partitions))
            for pool in gpu.memory_pools
        ]
        desired = _layout(gpu.desired_compute_partition, gpu.desired_memory_partition)
        now = _layout(gpu.compute_partition, gpu.memory_partition)
        rows.append(
            (
                gpu.index,
                gpu.bdf,
                now,
                desired if desired in ("-", now) else f"{desired} (drift)",
                " ".join(compute_name(m) for m in gpu.available_compute_partitions),
                "[" + "|".join(pools) + "]",
                gpu.closed_reason or "",
            )
        )
    legend = "cells: one per partition, pools separated by |; . free, A allocated, D degraded"
    return table(("GPU", "BDF", "LAYOUT", "DESIRED", "AVAILABLE", "PARTITIONS", "CLOSED"), rows) + "\n" + legend


def _changes(changes: Sequence[pb.GpuLayoutChange]) -> list[str]:
    return [
        f"  GPU {c.gpu_index}: {_layout(c.compute_before, c.memory_before)} -> {_layout(c.compute_after, c.memory_after)}"
        + (
            f", {c.partitions_after} partitions, {c.pools_after} pool(s) of {format_bytes(c.pool_bytes_after)}"
            if c.pool_bytes_after
            else ""
        )
        + (f" ({c.why})" if c.why else "")
        for c in changes
    ]


def partition_plan(plan: pb.PartitionPlan) -> str:
    if not plan.changes:
        return "nothing to do: the GPUs are already in this layout"
    lines = ["changes", *_changes(plan.changes), "steps"]
    lines += [f"  {n}. {s.kind:<13} {s.description}" for n, s in enumerate(plan.steps, 1)]
    if plan.allocations:
        lines.append("allocations on the GPUs")
        lines += [
            f"  {a.allocation_id} {a.name or '-'} of {user_name(a.owner_uid)} on GPU {_gpus(a.gpu_indices)}: "
            + (f"model {a.model} (drained and restarted)" if a.model else "bare allocation (must be released)")
            for a in plan.allocations
        ]
    if plan.holders:
        lines.append("processes holding the devices")
        lines += [
            f"  pid {h.pid} {h.user} GPU {h.gpu_index} partition {h.partition_id}"
            + (f" [model {h.model}]" if h.model else "")
            + f": {h.command[:80]}"
            for h in plan.holders
        ]
    if plan.holder_services:
        lines.append("services stopped around the switch: " + ", ".join(plan.holder_services))
    lines += [f"warning: {w}" for w in plan.warnings]
    if plan.blockers_with_drain:
        lines.append("apply would be refused:")
        lines += [f"  {b}" for b in plan.blockers_with_drain]
    elif plan.blockers:
        lines.append("apply needs --drain:")
        lines += [f"  {b}" for b in plan.blockers]
    return "\n".join(lines)


def operation_state(value: int) -> str:
    return _enum(value, pb.OperationState, "OPERATION_STATE_").lower()


def operation(op: pb.Operation) -> str:
    step = f"step {op.steps_done}/{op.step_count}" + (f" ({op.step})" if op.step else "")
    lines = [
        f"operation   {op.id}",
        f"state       {operation_state(op.state)}, {step}",
        f"progress    {op.progress}",
        f"elapsed     {op.elapsed_seconds:.1f}s",
        f"requested   by {user_name(op.requested_by_uid)}{', with --drain' if op.drain else ''}",
    ]
    if op.error:
        lines.append(f"error       {op.error}" + (f" (at {op.failed_step})" if op.failed_step else ""))
    if op.drained_models:
        lines.append("drained     " + ", ".join(op.drained_models))
    if op.stopped_services:
        lines.append("services    " + ", ".join(op.stopped_services))
    lines += ["changes", *_changes(op.changes), "events"]
    lines += [f"  {e.at.ToDatetime().strftime('%H:%M:%S')}  {e.text}" for e in op.events]
    return "\n".join(lines)


def operations(response: pb.ListOperationsResponse) -> str:
    rows = [
        (
            op.id,
            operation_state(op.state),
            ", ".join(f"{c.gpu_index}" for c in op.changes) or "-",
            ", ".join(sorted({_layout(c.compute_after, c.memory_after) for c in op.changes})) or "-",
            op.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            f"{op.elapsed_seconds:.1f}s",
            op.progress[:60],
        )
        for op in response.operations
    ]
    return table(("ID", "STATE", "GPUS", "LAYOUT", "CREATED (UTC)", "ELAPSED", "PROGRESS"), rows)
