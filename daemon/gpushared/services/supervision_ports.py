"""What the model supervisor needs from the world: the child's spec and identity, and the launcher, cgroup and probe ports."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class ChildLimits:
    """Host-side limits for a model's cgroup leaf; None leaves the kernel default (no limit)."""

    memory_max: int | None = None
    pids_max: int | None = None
    cpu_weight: int | None = None


@dataclass(frozen=True)
class ChildSpec:
    """How to run one model server child; everything is already validated and resolved (vllm_args builds argv/env)."""

    name: str
    """The cgroup leaf name, one per model (e.g. model-<id>)."""
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(hash=False, repr=False)
    """May hold VLLM_API_KEY: kept out of repr, so out of logs."""
    cwd: str
    uid: int | None
    gid: int | None
    extra_groups: tuple[int, ...] | None
    port: int
    served_name: str
    log_path: Path
    """stdout and stderr are appended here by the child itself through an fd the daemon opens: never a pipe the
    daemon must drain (a full pipe blocks the child while the daemon is down, reliability.md §3)."""
    limits: ChildLimits = field(default_factory=ChildLimits)
    api_key: str | None = field(default=None, repr=False)
    """The bearer token the probes send to /v1/* (vLLM then requires it there; /health stays open)."""


@dataclass(frozen=True)
class ChildIdentity:
    """Who the child is, as the kernel sees it: a bare pid can be recycled, pid + start time + leaf cannot."""

    pid: int
    start_time: int
    """Clock ticks since boot, /proc/PID/stat field 22."""
    leaf: str


@dataclass(frozen=True)
class ExitStatus:
    code: int | None
    """Exit status, -N for a signal; None when it cannot be known (the process was not our child)."""
    description: str


class ChildProcess(Protocol):
    """A running main process, held by pidfd so it is never confused with a later process that reuses the pid."""

    @property
    def identity(self) -> ChildIdentity: ...

    def exited(self) -> asyncio.Future[ExitStatus]:
        """Resolves (once, for every caller) when the main process has exited; the kernel tells, nobody polls."""
        ...

    def send_signal(self, signum: int) -> bool:
        """Signal exactly this process; False if it has already exited."""
        ...

    def close(self) -> None:
        """Stop watching and release the pidfd; the process itself is not touched."""
        ...


class ChildLauncher(Protocol):
    async def launch(self, spec: ChildSpec) -> ChildProcess:
        """Start spec.argv already inside leaf spec.name (which exists); OSError if it cannot be exec'd."""
        ...

    def attach(self, identity: ChildIdentity) -> ChildProcess | None:
        """Hold an existing process (not necessarily our child) if it is alive, has that start time and lives
        in that leaf; None otherwise. Never sends anything to the process."""
        ...


class LeafTree(Protocol):
    """The part of CgroupFsTree the supervisor uses; wait_empty blocks, so the supervisor runs it in a thread."""

    def create_leaf(self, name: str) -> Path: ...

    def leaves(self) -> list[str]: ...

    def pids(self, name: str) -> list[int]: ...

    def populated(self, name: str) -> bool: ...

    def kill(self, name: str) -> None: ...

    def wait_empty(self, name: str, timeout: float) -> bool: ...

    def remove_leaf(self, name: str) -> None: ...

    def set_limits(
        self, name: str, *, memory_max: int | None, pids_max: int | None, cpu_weight: int | None
    ) -> list[str]: ...


class HealthProbe(Protocol):
    async def health(self, port: int) -> bool:
        """GET /health answered 200 within the probe's timeout."""
        ...

    async def ready(self, port: int, served_name: str, *, api_key: str | None = None) -> bool:
        """Healthy, and GET /v1/models lists served_name (the server answers for the model we asked for)."""
        ...

    async def completes(self, port: int, served_name: str, *, api_key: str | None, timeout: float) -> bool:
        """A one-token completion is answered within ``timeout``: the engine itself works, not only the API."""
        ...


class EngineCliPort(Protocol):
    async def known_flags(self, launcher: Sequence[str]) -> frozenset[str] | None:
        """The options the engine's ``serve`` accepts, from the engine itself; None when it cannot be asked."""
        ...


class ModelFilesPort(Protocol):
    """Where a model's home and log live (adapters/model_files.py)."""

    def home(self, name: str, uid: int, gid: int) -> Path: ...

    def readable_by(self, path: str, uid: int, gid: int, groups: tuple[int, ...] = ()) -> bool:
        """Checked with the child's own credentials (uid, gid and supplementary groups)."""
        ...

    def remove_home(self, name: str) -> None: ...

    def log_path(self, name: str) -> Path: ...

    def read_log(self, name: str, *, offset: int | None, tail_lines: int, limit: int = ...) -> tuple[bytes, int]: ...

    def rotate(self, name: str, max_bytes: int) -> bool: ...
