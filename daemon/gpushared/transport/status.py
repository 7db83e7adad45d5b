"""The one table that maps domain errors to gRPC status codes."""

from __future__ import annotations

import grpc

from gpushared.domain import errors

HINT_METADATA_KEY = "gpushare-hint"

ERROR_STATUS: dict[type[errors.GpushareError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.HardwareError: grpc.StatusCode.FAILED_PRECONDITION,
    errors.StateError: grpc.StatusCode.INTERNAL,
    errors.StateWriteError: grpc.StatusCode.UNAVAILABLE,
    errors.ConfigError: grpc.StatusCode.INTERNAL,
}

HARDWARE_STATUS: dict[str, grpc.StatusCode] = {
    # Transient: the device is held; retrying after the holder leaves can succeed.
    "BUSY": grpc.StatusCode.UNAVAILABLE,
    "RETRY": grpc.StatusCode.UNAVAILABLE,
    "TIMEOUT": grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_for(error: errors.GpushareError) -> grpc.StatusCode:
    if isinstance(error, errors.HardwareError) and error.status in HARDWARE_STATUS:
        return HARDWARE_STATUS[error.status]
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return grpc.StatusCode.INTERNAL
