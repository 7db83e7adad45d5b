"""gpushared's configuration: the TOML schema, strict parsing, defaults, and what SIGHUP may change."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from gpushared.domain.allocation import PlacementPolicy, Quota
from gpushared.domain.errors import ConfigError, GpushareError
from gpushared.domain.gpu import ComputePartition, MemoryPartition
from gpushared.domain.model import parse_allowlist
from gpushared.domain.partitioning import GpuLayout, check_combination, parse_gpu_set
from gpushared.domain.served_model import ServingConfig
from gpushared.domain.units import parse_size
from gpushared.metrics.settings import METRICS_KEYS, MetricsConfig, listen_override, parse_metrics

DEFAULT_CONFIG_PATH = Path("/etc/gpushared/gpushared.toml")
LOG_LEVELS = ("debug", "info", "warning", "error")
BACKENDS = ("amdsmi", "emulated")


@dataclass(frozen=True)
class DaemonConfig:
    backend: str = "amdsmi"
    socket: Path = Path("/run/gpushared/gpushared.sock")
    socket_group: str = "gpushare"
    socket_mode: int = 0o660
    admin_group: str = "gpushare-admin"
    state_dir: Path = Path("/var/lib/gpushared")
    log_level: str = "info"
    emulated_gpu_count: int = 8
    default_policy: PlacementPolicy = PlacementPolicy.SPREAD
    default_quota: Quota = field(default_factory=Quota)
    user_quotas: dict[str, Quota] = field(default_factory=dict)
    """Keyed by user name or decimal uid, as written in the file."""
    cgroup_root: Path | None = None
    """The cgroup v2 subtree for model leaves; None = the daemon's own cgroup when systemd runs it."""
    serving: ServingConfig = field(default_factory=ServingConfig)
    partitions: PartitionConfig = field(default_factory=lambda: PartitionConfig())  # noqa: PLW0108 (defined below)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: Path | None = None


@dataclass(frozen=True)
class PartitionConfig:
    """The [partitions] section: the desired layout and how an apply reaches the host around the GPUs."""

    layout: dict[int, GpuLayout] = field(default_factory=dict)
    """Desired layout by GPU index; GPUs not named are left as they are."""
    layout_warnings: tuple[str, ...] = ()
    holder_services: tuple[str, ...] = ()
    """systemd units that hold GPU devices (e.g. a metrics exporter): stopped for a switch, started after."""
    reload_command: tuple[str, ...] = ()
    """Driver reload on a real host where amdsmi has no amdsmi_gpu_driver_reload (ROCm >= 7.13); empty = amdsmi's."""
    reload_timeout_seconds: float = 300.0
    systemctl: str = "systemctl"


RELOADABLE = ("log_level", "admin_group", "default_policy", "default_quota", "user_quotas")
"""Fields SIGHUP applies; every other change needs a restart."""

_SCHEMA: dict[str, dict[str, type | tuple[type, ...]]] = {
    "daemon": {
        "backend": str,
        "socket": str,
        "socket_group": str,
        "socket_mode": str,
        "admin_group": str,
        "state_dir": str,
        "log_level": str,
    },
    "emulator": {"gpu_count": int},
    "partitions": {
        "layout": list,
        "holder_services": list,
        "reload_command": list,
        "reload_timeout_seconds": (int, float),
        "systemctl": str,
    },
    "allocation": {"default_policy": str},
    "metrics": METRICS_KEYS,
    "quota": {"max_allocations": int, "max_memory": (str, int), "users": dict},
    "models": {
        "cgroup_root": str,
        "port_range": str,
        "service_account": str,
        "device_groups": list,
        "vllm_launcher": list,
        "stub_launcher": list,
        "option_allowlist": list,
        "grace_seconds": (int, float),
        "probe_interval_seconds": (int, float),
        "start_timeout_seconds": (int, float),
        "completion_probe_interval_seconds": (int, float),
        "completion_probe_timeout_seconds": (int, float),
        "stop_models_on_exit": bool,
        "log_max_size": str,
        "host_memory_max": str,
        "pids_max": int,
        "cpu_weight": int,
    },
}
_QUOTA_KEYS: dict[str, type | tuple[type, ...]] = {"max_allocations": int, "max_memory": (str, int)}


def load_config(path: Path | None) -> DaemonConfig:
    """Read and validate a config file. ``None`` reads the default path if it exists, else defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return DaemonConfig()
        path = DEFAULT_CONFIG_PATH
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"config {path}: no such file", hint="pass an existing file with --config") from exc
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read it ({exc.strerror})") from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config {path}: not valid TOML ({exc})") from exc
    return parse_config(data, path)


def parse_config(data: dict[str, Any], path: Path) -> DaemonConfig:
    where = str(path)
    for section, values in data.items():
        if section not in _SCHEMA:
            raise ConfigError(f"config {where}: unknown section [{section}]", hint=f"known: {', '.join(_SCHEMA)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config {where}: {section} must be a table ([{section}])")
        for key, value in values.items():
            _check_type(where, f"{section}.{key}", value, _SCHEMA[section].get(key), _SCHEMA[section])

    daemon = data.get("daemon", {})
    config = DaemonConfig(source=path)
    updates: dict[str, Any] = {}
    if "backend" in daemon:
        updates["backend"] = _choice(where, "daemon.backend", daemon["backend"], BACKENDS)
    for key in ("socket", "state_dir"):
        if key in daemon:
            updates[key] = _absolute(where, f"daemon.{key}", daemon[key])
    for key in ("socket_group", "admin_group"):
        if key in daemon:
            updates[key] = daemon[key]
    if "socket_mode" in daemon:
        updates["socket_mode"] = _mode(where, daemon["socket_mode"])
    if "log_level" in daemon:
        updates["log_level"] = _choice(where, "daemon.log_level", daemon["log_level"], LOG_LEVELS)
    emulator = data.get("emulator", {})
    if "gpu_count" in emulator:
        count = emulator["gpu_count"]
        if not 1 <= count <= 8:
            raise ConfigError(f"config {where}: emulator.gpu_count = {count} is out of range", hint="use 1 to 8")
        updates["emulated_gpu_count"] = count
    allocation = data.get("allocation", {})
    if "default_policy" in allocation:
        policy = _choice(where, "allocation.default_policy", allocation["default_policy"], tuple(PlacementPolicy))
        updates["default_policy"] = PlacementPolicy(policy)
    quota = data.get("quota", {})
    updates["default_quota"] = _quota(where, "quota", quota)
    users = {}
    for user, values in quota.get("users", {}).items():
        subject = f"quota.users.{user}"
        if not isinstance(values, dict):
            raise ConfigError(f"config {where}: {subject} must be a table")
        for key, value in values.items():
            _check_type(where, f"{subject}.{key}", value, _QUOTA_KEYS.get(key), _QUOTA_KEYS)
        users[str(user)] = _quota(where, subject, values)
    updates["user_quotas"] = users
    models = data.get("models", {})
    if "cgroup_root" in models:
        updates["cgroup_root"] = _absolute(where, "models.cgroup_root", models["cgroup_root"])
    updates["serving"] = _serving(where, models)
    updates["partitions"] = _partitions(where, data.get("partitions", {}), updates.get("emulated_gpu_count", 8))
    updates["metrics"] = parse_metrics(where, data.get("metrics", {}))
    return replace(config, **updates)


_LAYOUT_KEYS = {"gpus": str, "compute": str, "memory": str}


def _partitions(where: str, section: dict[str, Any], gpu_count: int) -> PartitionConfig:
    changes: dict[str, Any] = {}
    layout: dict[int, GpuLayout] = {}
    warnings: list[str] = []
    for n, entry in enumerate(section.get("layout", [])):
        subject = f"partitions.layout[{n}]"
        if not isinstance(entry, dict):
            raise ConfigError(f'config {where}: {subject} must be a table, e.g. {{gpus = "0-3", compute = "CPX"}}')
        for key, value in entry.items():
            _check_type(where, f"{subject}.{key}", value, _LAYOUT_KEYS.get(key), _LAYOUT_KEYS)
        for key in ("gpus", "compute", "memory"):
            if key not in entry:
                raise ConfigError(
                    f"config {where}: {subject}.{key} is missing", hint="each entry needs gpus, compute, memory"
                )
        compute = ComputePartition(
            _choice(where, f"{subject}.compute", entry["compute"].upper(), tuple(ComputePartition))
        )
        memory = MemoryPartition(_choice(where, f"{subject}.memory", entry["memory"].upper(), tuple(MemoryPartition)))
        try:
            # The highest index a layout may name; the daemon checks it against the host it finds.
            indices = parse_gpu_set(entry["gpus"], 8 if entry["gpus"].strip() != "all" else gpu_count)
            warnings += check_combination(compute, memory)
        except GpushareError as exc:
            raise ConfigError(f"config {where}: {subject}: {exc}") from exc
        for index in indices:
            if index in layout:
                raise ConfigError(f"config {where}: {subject}: GPU {index} is already in an earlier entry")
            layout[index] = GpuLayout(compute, memory)
    memories = {layout_.memory for layout_ in layout.values()}
    if len(memories) > 1:
        raise ConfigError(
            f"config {where}: partitions.layout mixes memory partitions {', '.join(sorted(memories))}",
            hint="the memory partition (NPS) applies to every GPU of the hive: use one for all entries",
        )
    changes["layout"] = layout
    changes["layout_warnings"] = tuple(dict.fromkeys(warnings))
    for key in ("holder_services", "reload_command"):
        if key in section:
            values = section[key]
            if not all(isinstance(v, str) and v for v in values):
                raise ConfigError(f"config {where}: partitions.{key} must be a list of non-empty strings")
            changes[key] = tuple(values)
    if "reload_timeout_seconds" in section:
        if section["reload_timeout_seconds"] <= 0:
            raise ConfigError(f"config {where}: partitions.reload_timeout_seconds must be more than 0")
        changes["reload_timeout_seconds"] = float(section["reload_timeout_seconds"])
    if "systemctl" in section:
        changes["systemctl"] = section["systemctl"]
    return PartitionConfig(**changes)


def _serving(where: str, models: dict[str, Any]) -> ServingConfig:
    serving = ServingConfig()
    changes: dict[str, Any] = {}
    if "port_range" in models:
        low, _, high = models["port_range"].partition("-")
        if not (low.isdigit() and high.isdigit() and 1024 <= int(low) <= int(high) <= 65535):
            raise ConfigError(
                f"config {where}: models.port_range = {models['port_range']!r} is not LOW-HIGH within 1024-65535"
            )
        changes["port_low"], changes["port_high"] = int(low), int(high)
    if "service_account" in models:
        changes["service_account"] = models["service_account"]
    if "device_groups" in models:
        groups = models["device_groups"]
        if not all(isinstance(g, str) and g for g in groups):
            raise ConfigError(f'config {where}: models.device_groups must be a list of group names, e.g. ["render"]')
        changes["device_groups"] = tuple(groups)
    for key in ("vllm_launcher", "stub_launcher"):
        if key in models:
            launcher = models[key]
            if not launcher or not all(isinstance(a, str) and a for a in launcher):
                raise ConfigError(
                    f'config {where}: models.{key} must be a non-empty list of strings, e.g. ["/opt/vllm/bin/vllm"]'
                )
            changes[key] = tuple(launcher)
    if "option_allowlist" in models:
        try:
            changes["option_allowlist"] = parse_allowlist(models["option_allowlist"])
        except GpushareError as exc:
            raise ConfigError(f"config {where}: models.option_allowlist: {exc}") from exc
    for key, attr in (
        ("grace_seconds", "grace_seconds"),
        ("probe_interval_seconds", "probe_interval"),
        ("start_timeout_seconds", "start_timeout"),
        ("completion_probe_timeout_seconds", "completion_probe_timeout"),
    ):
        if key in models:
            if models[key] <= 0:
                raise ConfigError(f"config {where}: models.{key} must be more than 0")
            changes[attr] = float(models[key])
    if "completion_probe_interval_seconds" in models:
        if models["completion_probe_interval_seconds"] < 0:
            raise ConfigError(
                f"config {where}: models.completion_probe_interval_seconds must be 0 (off) or more",
                hint="e.g. 60 sends a one-token completion to each model every minute",
            )
        changes["completion_probe_interval"] = float(models["completion_probe_interval_seconds"])
    if "log_max_size" in models:
        try:
            changes["log_max_bytes"] = parse_size(models["log_max_size"], subject="models.log_max_size")
        except GpushareError as exc:
            raise ConfigError(f"config {where}: {exc}") from exc
    if "host_memory_max" in models:
        try:
            changes["host_memory_max"] = parse_size(models["host_memory_max"], subject="models.host_memory_max") or None
        except GpushareError as exc:
            raise ConfigError(f"config {where}: {exc}") from exc
    for key, low, high in (("pids_max", 0, 4194304), ("cpu_weight", 1, 10000)):
        if key in models:
            if not low <= models[key] <= high:
                raise ConfigError(
                    f"config {where}: models.{key} = {models[key]} is out of range", hint=f"use {low} to {high}"
                )
            changes[key] = models[key] or None
    if "stop_models_on_exit" in models:
        changes["stop_models_on_exit"] = models["stop_models_on_exit"]
    return replace(serving, **changes)


def with_overrides(config: DaemonConfig, **overrides: Any) -> DaemonConfig:
    """Apply command-line overrides (None = not given)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if "stop_models_on_exit" in given:
        given["serving"] = replace(config.serving, stop_models_on_exit=given.pop("stop_models_on_exit"))
    if "metrics_listen" in given:
        given["metrics"] = replace(config.metrics, listen=listen_override(given.pop("metrics_listen")))
    return replace(config, **given)


def reload_changes(old: DaemonConfig, new: DaemonConfig) -> tuple[DaemonConfig, list[str], list[str]]:
    """What SIGHUP does: returns (config to use, fields applied, fields that need a restart)."""
    applied = [
        f.name for f in fields(DaemonConfig) if f.name in RELOADABLE and getattr(old, f.name) != getattr(new, f.name)
    ]
    ignored = [
        f.name
        for f in fields(DaemonConfig)
        if f.name not in RELOADABLE and f.name != "source" and getattr(old, f.name) != getattr(new, f.name)
    ]
    merged = replace(old, **{name: getattr(new, name) for name in RELOADABLE})
    return merged, applied, ignored


def _check_type(
    where: str, key: str, value: object, expected: type | tuple[type, ...] | None, known: dict[str, Any]
) -> None:
    if expected is None:
        raise ConfigError(f"config {where}: unknown key {key}", hint=f"known keys here: {', '.join(known)}")
    # bool is an int in Python; TOML true/false is never a valid number here.
    wants_bool = expected is bool
    if (isinstance(value, bool) and not wants_bool) or not isinstance(value, expected):
        names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
        raise ConfigError(f"config {where}: {key} must be a {names}, not {type(value).__name__}")


def _choice(where: str, key: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"config {where}: {key} = {value!r} is not one of {', '.join(allowed)}")
    return value


def _absolute(where: str, key: str, value: str) -> Path:
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(f"config {where}: {key} = {value!r} must be an absolute path")
    return path


def _mode(where: str, value: str) -> int:
    try:
        mode = int(value, 8)
    except ValueError:
        mode = -1
    if not 0 <= mode <= 0o777:
        raise ConfigError(f'config {where}: daemon.socket_mode = {value!r} is not an octal mode like "0660"')
    if mode & 0o007:
        raise ConfigError(
            f"config {where}: daemon.socket_mode = {value!r} lets every user on the host connect",
            hint="use 0660 and put API users in daemon.socket_group",
        )
    return mode


def _quota(where: str, subject: str, values: dict[str, Any]) -> Quota:
    max_allocations = values.get("max_allocations", 0)
    if max_allocations < 0:
        raise ConfigError(f"config {where}: {subject}.max_allocations must be 0 (unlimited) or more")
    raw_memory = values.get("max_memory", 0)
    if isinstance(raw_memory, int):
        if raw_memory < 0:
            raise ConfigError(f"config {where}: {subject}.max_memory must be 0 (unlimited) or more")
        max_memory = raw_memory
    else:
        try:
            max_memory = parse_size(raw_memory, subject=f"{subject}.max_memory")
        except GpushareError as exc:
            raise ConfigError(f"config {where}: {exc}") from exc
    return Quota(
        max_allocations=max_allocations or None,
        max_memory_bytes=max_memory or None,
    )
