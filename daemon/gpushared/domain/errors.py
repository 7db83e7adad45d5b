"""Domain error classes; each names its subject first and maps to exactly one gRPC status (transport/status.py)."""

from __future__ import annotations


class GpushareError(Exception):
    """Base of every error the daemon reports to a caller.

    ``message`` is one line that names the subject first ("gpu 9: ..."), says why, and where
    possible how to fix it. ``hint`` is an optional second sentence for the operator.
    """

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class InvalidArgument(GpushareError):
    """The request itself is malformed: a size, a name, an index out of range."""


class NotFound(GpushareError):
    """The named allocation, GPU or partition does not exist."""


class AlreadyExists(GpushareError):
    """A name or id is already taken."""


class FailedPrecondition(GpushareError):
    """The request is well-formed but the system is not in a state that allows it."""


class IllegalTransition(FailedPrecondition):
    """A state machine was asked for a transition its table does not allow: a bug, or a request that does not
    fit the current state."""


class ResourceExhausted(GpushareError):
    """Not enough free partitions or pool memory to place the request."""


class QuotaExceeded(ResourceExhausted):
    """The caller's per-user quota (allocations or bytes) would be exceeded."""


class PermissionDenied(GpushareError):
    """The caller is identified but not allowed to do this."""


class Unauthenticated(GpushareError):
    """The caller's identity could not be established from the kernel; fail closed."""


class HardwareError(GpushareError):
    """The GPU backend (amdsmi or the emulator) refused or failed.

    ``status`` is the amdsmi status name without its prefix: BUSY, NO_PERM, NOT_SUPPORTED,
    SETTING_UNAVAILABLE, INVAL, AMDGPU_RESTART_ERR, ...
    """

    def __init__(self, message: str, *, status: str, hint: str = "") -> None:
        super().__init__(message, hint=hint)
        self.status = status


class BackendUnavailable(GpushareError):
    """The hardware backend cannot be loaded at all (no libamd_smi.so, no GPU)."""


class StateError(GpushareError):
    """The persisted state cannot be used (corrupt, unreadable, newer version)."""


class StateWriteError(GpushareError):
    """A change could not be made durable (disk full, I/O error); nothing was changed."""


class ConfigError(GpushareError):
    """The configuration file is invalid."""
