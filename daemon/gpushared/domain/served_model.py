"""What the daemon records about a served model: intent (spec, owner, allocation) and the child it last ran."""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import asdict, dataclass, field, replace

from gpushared.domain.errors import ResourceExhausted
from gpushared.domain.model import ModelSpec
from gpushared.domain.model_state import RestartPolicy

KEEP_START_SECONDS = 5
"""Start durations kept per model: enough to learn from, short enough to forget an old slow version."""


@dataclass(frozen=True)
class ServingConfig:
    """How the daemon runs model children (the [models] section of the configuration)."""

    port_low: int = 8100
    port_high: int = 8199
    service_account: str = "gpushare-model"
    device_groups: tuple[str, ...] = ("render", "video")
    """Groups every child gets besides its user's own: /dev/kfd and /dev/dri/renderD* are root:render (or video)
    0660 on ROCm hosts, and a model that cannot open them cannot use the GPU. Names that do not exist are skipped."""
    vllm_launcher: tuple[str, ...] = ("vllm",)
    stub_launcher: tuple[str, ...] = ()
    """Empty = the composition root's default (the shipped stub engine)."""
    option_allowlist: frozenset[str] = frozenset()
    grace_seconds: float = 30.0
    probe_interval: float = 5.0
    completion_probe_interval: float = 0.0
    """Seconds between one-token completions as a liveness probe (0 = off). /health alone misses a hung
    engine: it answers 200 as long as the engine has not errored (vllm.md §4)."""
    completion_probe_timeout: float = 60.0
    start_timeout: float = 600.0
    stop_models_on_exit: bool = False
    log_max_bytes: int = 64 * 1024 * 1024
    """Each child's log is rotated (one .1 kept) past this size."""
    host_memory_max: int | None = None
    """memory.max of each model's leaf (host RAM, not GPU memory); None = no limit."""
    pids_max: int | None = 8192
    cpu_weight: int | None = 100
    restart: RestartPolicy = field(default_factory=RestartPolicy)


@dataclass(frozen=True)
class ServedModel:
    name: str
    spec: ModelSpec
    allocation_id: str
    owner_uid: int
    run_as_uid: int
    run_as_gid: int
    port: int
    created_at: float
    pid: int = 0
    """Main process of the running child; 0 when none. With start_time and the cgroup leaf it
    identifies the child across daemon restarts (a bare pid could have been recycled)."""
    start_time: int = 0
    running: bool = True
    """Desired state: False once stopped with its allocation kept."""
    api_key: str | None = field(default=None, repr=False)
    """Clients must send it as a bearer token to /v1/*; kept for restarts, never shown (repr=False keeps it out
    of logs and tracebacks)."""
    start_seconds: tuple[float, ...] = ()
    """How long its last starts took to READY (newest last), so the learned start timeout survives a daemon
    restart."""
    drained_by: str = ""
    """The partition operation that stopped it to change its GPUs' layout and will restart it; its allocation
    is released meanwhile (allocation_id is then empty)."""
    failure: str = ""
    """Why it is not running although nobody stopped it (e.g. it no longer fits after a layout change)."""

    def with_child(self, pid: int, start_time: int) -> ServedModel:
        return replace(self, pid=pid, start_time=start_time)


def spec_to_json(spec: ModelSpec) -> str:
    return json.dumps(asdict(spec), sort_keys=True)


def spec_from_json(text: str) -> ModelSpec:
    data = json.loads(text)
    data["options"] = tuple((str(k), str(v)) for k, v in data.get("options", ()))
    return ModelSpec(**data)


def choose_port(low: int, high: int, held: Collection[int]) -> int:
    """The lowest port of the managed range that no model holds; never one still held."""
    for port in range(low, high + 1):
        if port not in held:
            return port
    raise ResourceExhausted(
        f"ports: all {high - low + 1} ports of the model range {low}-{high} are held",
        hint="stop a model, or widen models.port_range in the configuration",
    )
