"""gpushare.v1 servicer: authenticates each call, converts protobuf <-> domain, maps errors; nothing else."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.timestamp_pb2 import Timestamp

from gpushared import __version__
from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.domain.allocation import (
    Allocation,
    AllocationRequest,
    Ledger,
    PartitionRef,
    PartitionState,
    PlacementPolicy,
)
from gpushared.domain.caller import Caller
from gpushared.domain.errors import GpushareError, InvalidArgument, Unauthenticated
from gpushared.domain.gpu import ComputePartition, GpuInfo, PartitionInfo
from gpushared.domain.lease import device_nodes, lease_environment, leased_partitions
from gpushared.domain.model import Engine, ModelSpec
from gpushared.domain.model_state import ModelState
from gpushared.metrics.hooks import RpcObserver
from gpushared.services.allocations import AllocationService, HostView
from gpushared.services.models import ModelService, ModelView
from gpushared.services.partitions import PartitionService
from gpushared.transport.front_door import identity_from_peer
from gpushared.transport.partition_pb import (
    COMPUTE_FROM_PB,
    COMPUTE_TO_PB,
    MEMORY_TO_PB,
    layout_request_from_pb,
    operation_to_pb,
    plan_to_pb,
)
from gpushared.transport.status import HINT_METADATA_KEY, status_for

log = logging.getLogger("gpushared.api")

SERVICE = pb.DESCRIPTOR.services_by_name["Gpushare"]


def _serialize(message: Message) -> bytes:
    return message.SerializeToString()


STATE_TO_PB = {
    PartitionState.FREE: pb.PARTITION_STATE_FREE,
    PartitionState.ALLOCATED: pb.PARTITION_STATE_ALLOCATED,
    PartitionState.DEGRADED: pb.PARTITION_STATE_DEGRADED,
}
POLICY_TO_PB = {PlacementPolicy.SPREAD: pb.PLACEMENT_POLICY_SPREAD, PlacementPolicy.PACK: pb.PLACEMENT_POLICY_PACK}
POLICY_FROM_PB = {v: k for k, v in POLICY_TO_PB.items()}


@dataclass
class Authenticator:
    """Turns the relay's peer address into a Caller; anything else is refused (fail closed)."""

    peer_dir: Path
    is_admin: Callable[[int, int], bool]

    def caller(self, peer: str) -> Caller:
        identity = identity_from_peer(peer, self.peer_dir)
        if identity is None:
            raise Unauthenticated(
                "caller: the daemon could not establish who you are",
                hint="connect through the gpushared socket, not the internal one",
            )
        return Caller(identity.uid, identity.gid, identity.pid, self.is_admin(identity.uid, identity.gid))


class GpushareServicer:
    """Serves gpushare.v1.Gpushare. Requests arrive as raw bytes and are parsed here, so a corrupt
    message gets INVALID_ARGUMENT naming the message type instead of grpcio's opaque UNKNOWN."""

    def __init__(
        self,
        allocations: AllocationService,
        auth: Authenticator,
        backend_name: str,
        models: ModelService,
        partitions: PartitionService,
        *,
        rpc_observer: RpcObserver | None = None,
    ) -> None:
        self._allocations = allocations
        self._observer = rpc_observer
        self._models = models
        self._partitions = partitions
        self._auth = auth
        self._backend = backend_name
        self._started = time.monotonic()
        methods: dict[str, tuple[type[Message], Callable[[Caller, Any], Message | Awaitable[Message]]]] = {
            "GetStatus": (pb.GetStatusRequest, self._get_status),
            "ListGpus": (pb.ListGpusRequest, self._list_gpus),
            "ListPartitions": (pb.ListPartitionsRequest, self._list_partitions),
            "Allocate": (pb.AllocateRequest, self._allocate),
            "Release": (pb.ReleaseRequest, self._release),
            "ListAllocations": (pb.ListAllocationsRequest, self._list_allocations),
            "GetAllocation": (pb.GetAllocationRequest, self._get_allocation),
            "Serve": (pb.ServeRequest, self._serve),
            "Stop": (pb.StopRequest, self._stop),
            "ListModels": (pb.ListModelsRequest, self._list_models),
            "GetModel": (pb.GetModelRequest, self._get_model),
            "ReadModelLog": (pb.ReadModelLogRequest, self._read_model_log),
            "PlanPartitions": (pb.PlanPartitionsRequest, self._plan_partitions),
            "ApplyPartitions": (pb.ApplyPartitionsRequest, self._apply_partitions),
            "GetOperation": (pb.GetOperationRequest, self._get_operation),
            "ListOperations": (pb.ListOperationsRequest, self._list_operations),
            "ClearDegradedGpu": (pb.ClearDegradedGpuRequest, self._clear_degraded_gpu),
        }
        missing = set(SERVICE.methods_by_name) ^ set(methods)
        if missing:
            raise AssertionError(f"servicer and gpushare.proto disagree on {sorted(missing)}")
        self._methods = methods

    def generic_handler(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            name: grpc.unary_unary_rpc_method_handler(
                self._bind(name, request_type, handler),
                request_deserializer=None,
                response_serializer=_serialize,
            )
            for name, (request_type, handler) in self._methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE.full_name, handlers)

    def _bind(
        self, name: str, request_type: type[Message], handler: Callable[[Caller, Any], Message | Awaitable[Message]]
    ) -> Callable[[bytes, grpc.aio.ServicerContext[bytes, Message]], Awaitable[Message]]:
        async def call(raw: bytes, context: grpc.aio.ServicerContext[bytes, Message]) -> Message:
            started = time.perf_counter()
            code = "OK"
            error: BaseException | None = None
            try:
                caller = self._auth.caller(context.peer())
                try:
                    request = request_type.FromString(raw)
                except DecodeError:
                    raise InvalidArgument(
                        f"request: not a valid {request_type.DESCRIPTOR.full_name} message",
                        hint="use a client generated from gpushare.proto",
                    ) from None
                response = handler(caller, request)
                return await response if inspect.isawaitable(response) else response
            except GpushareError as exc:
                code, error = status_for(exc).name, exc
                if exc.hint:
                    context.set_trailing_metadata(((HINT_METADATA_KEY, exc.hint),))
                await context.abort(status_for(exc), exc.message)
            except asyncio.CancelledError:
                code = "CANCELLED"  # the client went away or the daemon is stopping
                raise
            except Exception as exc:
                code, error = "INTERNAL", exc
                log.exception("internal error in %s", name, extra={"event": "internal_error", "method": name})
                await context.abort(
                    grpc.StatusCode.INTERNAL, "internal error in gpushared; see its log (journalctl -u gpushared)"
                )
            finally:
                if self._observer is not None:
                    self._observer.observe_rpc(name, code, time.perf_counter() - started, error)
            raise AssertionError("unreachable")  # pragma: no cover - abort always raises

        return call

    def _get_status(self, caller: Caller, request: pb.GetStatusRequest) -> pb.GetStatusResponse:
        view = self._allocations.view
        ledger = view.ledger
        refs = [PartitionRef(g.bdf, p.partition_id) for g in view.inventory.gpus for p in g.partitions]
        states = [ledger.partition_state(r) for r in refs]
        return pb.GetStatusResponse(
            version=__version__,
            backend=self._backend,
            uptime_seconds=time.monotonic() - self._started,
            gpu_count=len(view.inventory.gpus),
            partition_count=len(refs),
            free_partition_count=states.count(PartitionState.FREE),
            degraded_partition_count=states.count(PartitionState.DEGRADED),
            allocation_count=len(ledger.allocations),
            memory_total_bytes=sum(g.memory_total_bytes for g in view.inventory.gpus),
            memory_allocated_bytes=sum(a.memory_bytes_total for a in ledger.allocations.values()),
            caller=pb.Caller(uid=caller.uid, gid=caller.gid, pid=caller.pid, admin=caller.admin),
            observed_at=_timestamp(view.observed_at),
            drift=self._partitions.drift,
            degraded_gpus=[
                pb.DegradedGpu(gpu_index=g.index, gpu_bdf=g.bdf, reason=ledger.degraded_gpus[g.bdf])
                for g in view.inventory.gpus
                if g.bdf in ledger.degraded_gpus
            ],
            operation_id=running.id if (running := self._partitions.busy) is not None else "",
        )

    async def _plan_partitions(self, caller: Caller, request: pb.PlanPartitionsRequest) -> pb.PlanPartitionsResponse:
        layout = layout_request_from_pb(request.layout, len(self._allocations.view.inventory.gpus))
        return pb.PlanPartitionsResponse(plan=plan_to_pb(await self._partitions.plan(layout)))

    async def _apply_partitions(self, caller: Caller, request: pb.ApplyPartitionsRequest) -> pb.ApplyPartitionsResponse:
        layout = layout_request_from_pb(request.layout, len(self._allocations.view.inventory.gpus))
        operation = await self._partitions.apply(caller, layout, drain=request.drain)
        return pb.ApplyPartitionsResponse(operation=operation_to_pb(operation, time.time()))

    def _get_operation(self, caller: Caller, request: pb.GetOperationRequest) -> pb.GetOperationResponse:
        return pb.GetOperationResponse(operation=operation_to_pb(self._partitions.get(request.id), time.time()))

    def _list_operations(self, caller: Caller, request: pb.ListOperationsRequest) -> pb.ListOperationsResponse:
        now = time.time()
        return pb.ListOperationsResponse(operations=[operation_to_pb(op, now) for op in self._partitions.all()])

    async def _clear_degraded_gpu(
        self, caller: Caller, request: pb.ClearDegradedGpuRequest
    ) -> pb.ClearDegradedGpuResponse:
        return pb.ClearDegradedGpuResponse(reason=await self._partitions.clear_degraded(caller, request.gpu_index))

    def _list_gpus(self, caller: Caller, request: pb.ListGpusRequest) -> pb.ListGpusResponse:
        view = self._allocations.view
        desired = self._partitions.desired
        gpus = []
        for gpu in view.inventory.gpus:
            message = _gpu_to_pb(gpu, view.ledger)
            message.closed_reason = view.ledger.closed_gpus.get(gpu.bdf, "")
            if gpu.index in desired:
                message.desired_compute_partition = COMPUTE_TO_PB[desired[gpu.index].compute]
                message.desired_memory_partition = MEMORY_TO_PB[desired[gpu.index].memory]
            gpus.append(message)
        return pb.ListGpusResponse(gpus=gpus)

    def _list_partitions(self, caller: Caller, request: pb.ListPartitionsRequest) -> pb.ListPartitionsResponse:
        view = self._allocations.view
        return pb.ListPartitionsResponse(
            partitions=[_partition_to_pb(g, p, view.ledger) for g in view.inventory.gpus for p in g.partitions]
        )

    async def _allocate(self, caller: Caller, request: pb.AllocateRequest) -> pb.AllocateResponse:
        allocation = await self._allocations.allocate(caller, _request_from_pb(request))
        return pb.AllocateResponse(allocation=_allocation_to_pb(allocation, self._allocations.view))

    async def _release(self, caller: Caller, request: pb.ReleaseRequest) -> pb.ReleaseResponse:
        view = self._allocations.view
        allocation = await self._models.release_allocation(caller, request.id)
        return pb.ReleaseResponse(allocation=_allocation_to_pb(allocation, view))

    def _list_allocations(self, caller: Caller, request: pb.ListAllocationsRequest) -> pb.ListAllocationsResponse:
        view = self._allocations.view
        allocations = sorted(view.ledger.allocations.values(), key=lambda a: (a.created_at, a.id))
        return pb.ListAllocationsResponse(
            allocations=[_allocation_to_pb(a, view, self._models.model_on(a.id)) for a in allocations]
        )

    def _get_allocation(self, caller: Caller, request: pb.GetAllocationRequest) -> pb.GetAllocationResponse:
        allocation = self._allocations.get(request.id)
        return pb.GetAllocationResponse(
            allocation=_allocation_to_pb(allocation, self._allocations.view, self._models.model_on(allocation.id))
        )

    async def _serve(self, caller: Caller, request: pb.ServeRequest) -> pb.ServeResponse:
        message = request.spec
        spec = _spec_from_pb(message)
        gpu = message.gpu_index if message.HasField("gpu_index") else None
        view = await self._models.serve(
            caller,
            spec,
            gpu_index=gpu,
            compute=_compute_from_pb(message.compute_partition),
            api_key=request.api_key if request.HasField("api_key") else None,
        )
        return pb.ServeResponse(model=_model_to_pb(view))

    async def _stop(self, caller: Caller, request: pb.StopRequest) -> pb.StopResponse:
        view = await self._models.stop(caller, request.name, keep_allocation=request.keep_allocation)
        return pb.StopResponse(model=_model_to_pb(view))

    def _list_models(self, caller: Caller, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[_model_to_pb(v) for v in self._models.all()])

    def _get_model(self, caller: Caller, request: pb.GetModelRequest) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=_model_to_pb(self._models.get(request.name)))

    def _read_model_log(self, caller: Caller, request: pb.ReadModelLogRequest) -> pb.ReadModelLogResponse:
        offset = request.from_offset if request.HasField("from_offset") else None
        data, next_offset = self._models.read_log(
            caller, request.name, offset=offset, tail_lines=request.tail_lines or 100
        )
        return pb.ReadModelLogResponse(data=data, next_offset=next_offset)


ENGINE_FROM_PB = {pb.ENGINE_UNSPECIFIED: Engine.VLLM, pb.ENGINE_VLLM: Engine.VLLM, pb.ENGINE_STUB: Engine.STUB}
ENGINE_TO_PB = {Engine.VLLM: pb.ENGINE_VLLM, Engine.STUB: pb.ENGINE_STUB}
MODEL_STATE_TO_PB = {state: pb.ModelState.Value(f"MODEL_STATE_{state.name}") for state in ModelState}


def _compute_from_pb(value: pb.ComputePartition.ValueType) -> ComputePartition | None:
    if value == pb.COMPUTE_PARTITION_UNSPECIFIED:
        return None
    if value not in COMPUTE_FROM_PB:
        raise InvalidArgument(f"compute_partition: unknown value {value}", hint="use SPX, DPX, QPX or CPX")
    return COMPUTE_FROM_PB[value]


def _spec_from_pb(message: pb.ModelSpec) -> ModelSpec:
    if message.engine not in ENGINE_FROM_PB:
        raise InvalidArgument(f"engine: unknown value {message.engine}", hint="use vllm or stub")
    return ModelSpec(
        name=message.name,
        model=message.model,
        engine=ENGINE_FROM_PB[message.engine],
        served_name=message.served_name,
        memory_bytes=message.memory_bytes or None,
        partitions=message.partition_count or 1,
        max_model_len=message.max_model_len or None,
        dtype=message.dtype or "auto",
        max_num_seqs=message.max_num_seqs or None,
        kv_cache_bytes=message.kv_cache_bytes or None,
        options=tuple((o.name, o.value) for o in message.options),
    )


def _model_to_pb(view: ModelView) -> pb.Model:
    record = view.record
    spec = record.spec
    return pb.Model(
        name=record.name,
        spec=pb.ModelSpec(
            name=spec.name,
            engine=ENGINE_TO_PB[Engine(spec.engine)],
            model=spec.model,
            served_name=spec.served_model_name,
            memory_bytes=spec.memory_bytes or 0,
            partition_count=spec.partitions,
            max_model_len=spec.max_model_len or 0,
            dtype=spec.dtype,
            max_num_seqs=spec.max_num_seqs or 0,
            kv_cache_bytes=spec.kv_cache_bytes or 0,
            options=[pb.EngineOption(name=k, value=v) for k, v in spec.options],
        ),
        state=MODEL_STATE_TO_PB[view.state],
        allocation_id=record.allocation_id,
        owner_uid=record.owner_uid,
        run_as_uid=record.run_as_uid,
        endpoint=view.endpoint,
        port=record.port,
        pid=view.pid,
        restarts=view.restarts,
        last_error=view.last_error,
        transitions=[
            pb.ModelTransition(
                source=MODEL_STATE_TO_PB[t.source],
                target=MODEL_STATE_TO_PB[t.target],
                at=_timestamp(t.at),
                reason=t.reason,
            )
            for t in view.transitions
        ],
        log_path=str(view.log_path),
        argv=list(view.argv),
        api_key_required=record.api_key is not None,
        start_timeout_seconds=view.start_timeout,
    )


def _request_from_pb(request: pb.AllocateRequest) -> AllocationRequest:
    compute = None
    if request.compute_partition != pb.COMPUTE_PARTITION_UNSPECIFIED:
        if request.compute_partition not in COMPUTE_FROM_PB:
            raise InvalidArgument(
                f"compute_partition: unknown value {request.compute_partition}", hint="use SPX, DPX, QPX or CPX"
            )
        compute = COMPUTE_FROM_PB[request.compute_partition]
    policy = None
    if request.policy != pb.PLACEMENT_POLICY_UNSPECIFIED:
        if request.policy not in POLICY_FROM_PB:
            raise InvalidArgument(f"policy: unknown value {request.policy}", hint="use spread or pack")
        policy = POLICY_FROM_PB[request.policy]
    return AllocationRequest(
        memory_bytes=request.memory_bytes,
        partition_count=request.partition_count or 1,
        gpu_index=request.gpu_index if request.HasField("gpu_index") else None,
        compute_partition=compute,
        name=request.name,
        policy=policy,
    )


def _timestamp(unix_seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix_seconds * 1e9))
    return stamp


def _gpu_to_pb(gpu: GpuInfo, ledger: Ledger) -> pb.Gpu:
    allocated = ledger.pool_allocated(gpu)
    pools = [
        pb.MemoryPool(
            index=pool,
            total_bytes=gpu.pool_total_bytes,
            allocated_bytes=allocated.get(pool, 0),
            free_bytes=max(gpu.pool_total_bytes - allocated.get(pool, 0), 0),
            partition_ids=[p.partition_id for p in gpu.partitions if gpu.pool_of(p.partition_id) == pool],
        )
        for pool in range(gpu.pool_count)
    ]
    return pb.Gpu(
        index=gpu.index,
        bdf=gpu.bdf,
        model_name=gpu.model_name,
        compute_partition=COMPUTE_TO_PB[gpu.compute_partition],
        memory_partition=MEMORY_TO_PB[gpu.memory_partition],
        available_compute_partitions=[COMPUTE_TO_PB[m] for m in gpu.available_compute_partitions],
        available_memory_partitions=[MEMORY_TO_PB[m] for m in gpu.available_memory_partitions],
        memory_total_bytes=gpu.memory_total_bytes,
        memory_used_bytes=gpu.memory_used_bytes,
        memory_pools=pools,
        partitions=[_partition_to_pb(gpu, p, ledger) for p in gpu.partitions],
    )


def _partition_to_pb(gpu: GpuInfo, partition: PartitionInfo, ledger: Ledger) -> pb.Partition:
    ref = PartitionRef(gpu.bdf, partition.partition_id)
    state = ledger.partition_state(ref)
    message = pb.Partition(
        gpu_index=gpu.index,
        gpu_bdf=gpu.bdf,
        partition_id=partition.partition_id,
        bdf=partition.bdf,
        uuid=partition.uuid,
        render_node=partition.render_node,
        card_node=partition.card_node,
        hip_index=partition.hip_index,
        memory_pool=gpu.pool_of(partition.partition_id),
        memory_cap_bytes=partition.memory_total_bytes,
        state=STATE_TO_PB[state],
        degraded_reason=ledger.degraded.get(ref, ""),
    )
    holder = ledger.holder_of(ref)
    if holder is not None:
        message.holder.CopyFrom(
            pb.Holder(allocation_id=holder.id, allocation_name=holder.name, owner_uid=holder.owner_uid)
        )
    return message


def _allocation_to_pb(allocation: Allocation, view: HostView, model: str | None = None) -> pb.Allocation:
    leased = leased_partitions(allocation, view.inventory)
    state, reason = view.ledger.allocation_state(allocation)
    return pb.Allocation(
        id=allocation.id,
        name=allocation.name,
        owner_uid=allocation.owner_uid,
        owner_gid=allocation.owner_gid,
        partitions=[
            pb.AllocatedPartition(
                gpu_index=lp.gpu.index if lp.gpu is not None else 0,
                gpu_bdf=lp.ref.gpu_bdf,
                partition_id=lp.ref.partition_id,
                bdf=lp.partition.bdf if lp.partition is not None else "",
                render_node=lp.partition.render_node if lp.partition is not None else "",
                hip_index=lp.partition.hip_index if lp.partition is not None else 0,
                memory_pool=lp.pool,
                memory_bytes=allocation.memory_bytes_per_partition,
            )
            for lp in leased
        ],
        memory_bytes_per_partition=allocation.memory_bytes_per_partition,
        memory_bytes_total=allocation.memory_bytes_total,
        environment=lease_environment(allocation, leased),
        device_nodes=device_nodes(leased),
        placement_reason=allocation.placement_reason,
        created_at=_timestamp(allocation.created_at),
        state=pb.ALLOCATION_STATE_ACTIVE if state.value == "active" else pb.ALLOCATION_STATE_DEGRADED,
        state_reason=reason,
        policy=POLICY_TO_PB[allocation.policy],
        model=model or "",
    )
