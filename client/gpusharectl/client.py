"""Typed client for gpushared, and the one place that turns gRPC errors into CLI exit codes."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2

from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.api.v1 import gpushare_pb2_grpc as pb_grpc

DEFAULT_SOCKET = Path("/run/gpushared/gpushared.sock")
SOCKET_ENV = "GPUSHARE_SOCKET"
HINT_METADATA_KEY = "gpushare-hint"

SERVE_TIMEOUT = 180.0
"""Seconds a Serve call may take at least, whatever --timeout says (see Client.serve)."""
EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_PERMISSION = 4

Resp = TypeVar("Resp")

_PERMISSION_CODES = (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED)


class CtlError(Exception):
    """A failure to report in one line (plus an optional hint) and exit with ``exit_code``."""

    def __init__(self, message: str, exit_code: int, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.hint = hint


def socket_path(flag: str | None) -> Path:
    """--socket, else $GPUSHARE_SOCKET, else the default."""
    if flag:
        return Path(flag)
    env = os.environ.get(SOCKET_ENV)
    return Path(env) if env else DEFAULT_SOCKET


def _unreachable(path: Path) -> CtlError | None:
    """Say precisely why the socket cannot be used, from the errno of a plain connect(); None if it can."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2.0)
        probe.connect(str(path))
    except OSError as exc:
        code = exc.errno
    else:
        code = 0
    finally:
        probe.close()
    if code in (errno.EACCES, errno.EPERM):
        return CtlError(
            f"{path}: permission denied",
            EXIT_PERMISSION,
            hint="join the group that owns the socket (usually gpushare: `sudo usermod -aG gpushare $USER`, then log in again)",
        )
    start = "start it with `sudo systemctl start gpushared`, or try `gpushared --emulate`"
    if code == errno.ENOENT:
        return CtlError(f"{path}: no such socket; gpushared is not running there", EXIT_UNREACHABLE, hint=start)
    if code == errno.ECONNREFUSED:
        return CtlError(f"{path}: connection refused; gpushared is not running", EXIT_UNREACHABLE, hint=start)
    if code == 0:
        return None
    return CtlError(
        f"{path}: gpushared did not answer", EXIT_UNREACHABLE, hint=f"check `systemctl status gpushared`; {start}"
    )


class Client:
    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        self.path = path
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{path}")
        self._stub = pb_grpc.GpushareStub(self._channel)
        # The health stub's type stubs lack Check; a typed multicallable does the same.
        self._health_check = self._channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _translate(self, error: grpc.RpcError) -> CtlError:
        assert isinstance(error, grpc.Call)
        code = error.code()
        details = error.details() or code.name
        hint = ""
        for key, value in error.trailing_metadata() or ():
            if key == HINT_METADATA_KEY:
                hint = str(value)
        if code == grpc.StatusCode.UNAVAILABLE:
            # UNAVAILABLE is also the daemon's answer for transient refusals (a busy device, a full
            # disk): only when the socket itself cannot be reached is the daemon unreachable.
            problem = _unreachable(self.path)
            return problem if problem is not None else CtlError(details, EXIT_REFUSED, hint=hint)
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(
                f"{self.path}: gpushared did not answer within {self.timeout:g}s",
                EXIT_UNREACHABLE,
                hint="check `systemctl status gpushared` and its log (`journalctl -u gpushared`)",
            )
        if code in _PERMISSION_CODES:
            return CtlError(details, EXIT_PERMISSION, hint=hint)
        return CtlError(details, EXIT_REFUSED, hint=hint)

    def _call(self, method: Callable[..., Resp], request: object, *, at_least: float = 0.0) -> Resp:
        try:
            return method(request, timeout=max(self.timeout, at_least))
        except grpc.RpcError as exc:
            raise self._translate(exc) from None

    def get_status(self) -> pb.GetStatusResponse:
        return self._call(self._stub.GetStatus, pb.GetStatusRequest())

    def list_gpus(self) -> pb.ListGpusResponse:
        return self._call(self._stub.ListGpus, pb.ListGpusRequest())

    def list_partitions(self) -> pb.ListPartitionsResponse:
        return self._call(self._stub.ListPartitions, pb.ListPartitionsRequest())

    def allocate(self, request: pb.AllocateRequest) -> pb.AllocateResponse:
        return self._call(self._stub.Allocate, request)

    def release(self, allocation_id: str) -> pb.ReleaseResponse:
        return self._call(self._stub.Release, pb.ReleaseRequest(id=allocation_id))

    def list_allocations(self) -> pb.ListAllocationsResponse:
        return self._call(self._stub.ListAllocations, pb.ListAllocationsRequest())

    def get_allocation(self, allocation_id: str) -> pb.GetAllocationResponse:
        return self._call(self._stub.GetAllocation, pb.GetAllocationRequest(id=allocation_id))

    def serve(self, spec: pb.ModelSpec, *, api_key: str | None = None) -> pb.ServeResponse:
        # The first serve after a vLLM install waits while the daemon asks that vLLM which options it knows.
        return self._call(self._stub.Serve, pb.ServeRequest(spec=spec, api_key=api_key), at_least=SERVE_TIMEOUT)

    def stop(self, name: str, *, keep_allocation: bool) -> pb.StopResponse:
        return self._call(self._stub.Stop, pb.StopRequest(name=name, keep_allocation=keep_allocation))

    def list_models(self) -> pb.ListModelsResponse:
        return self._call(self._stub.ListModels, pb.ListModelsRequest())

    def get_model(self, name: str) -> pb.GetModelResponse:
        return self._call(self._stub.GetModel, pb.GetModelRequest(name=name))

    def plan_partitions(self, layout: pb.LayoutRequest) -> pb.PlanPartitionsResponse:
        return self._call(self._stub.PlanPartitions, pb.PlanPartitionsRequest(layout=layout))

    def apply_partitions(self, layout: pb.LayoutRequest, *, drain: bool) -> pb.ApplyPartitionsResponse:
        return self._call(self._stub.ApplyPartitions, pb.ApplyPartitionsRequest(layout=layout, drain=drain))

    def get_operation(self, operation_id: str) -> pb.GetOperationResponse:
        return self._call(self._stub.GetOperation, pb.GetOperationRequest(id=operation_id))

    def list_operations(self) -> pb.ListOperationsResponse:
        return self._call(self._stub.ListOperations, pb.ListOperationsRequest())

    def clear_degraded_gpu(self, gpu_index: int) -> pb.ClearDegradedGpuResponse:
        return self._call(self._stub.ClearDegradedGpu, pb.ClearDegradedGpuRequest(gpu_index=gpu_index))

    def read_model_log(self, name: str, *, tail_lines: int, from_offset: int | None) -> pb.ReadModelLogResponse:
        request = pb.ReadModelLogRequest(name=name, tail_lines=tail_lines)
        if from_offset is not None:
            request.from_offset = from_offset
        return self._call(self._stub.ReadModelLog, request)

    def health(self, service: str = "") -> health_pb2.HealthCheckResponse:
        return self._call(self._health_check, health_pb2.HealthCheckRequest(service=service))
