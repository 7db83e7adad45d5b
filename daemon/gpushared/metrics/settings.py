"""The [metrics] configuration section and --metrics-listen: parsed here, so config.py wires it in a few lines.

Standard library and domain only: gpushared.config imports this, and must not pull in prometheus-client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gpushared.domain.errors import ConfigError

DEFAULT_PORT = 9842
"""See docs/metrics.md "Port": clear of node_exporter (9100), DCGM (9400), AMD's device-metrics-exporter (5000),
Prometheus and Alertmanager (9090-9094), Grafana (3000), vLLM's default (8000) and gpushare's model ports
(8100-8199), and below the kernel's ephemeral range (32768-60999)."""
DEFAULT_LISTEN = f"127.0.0.1:{DEFAULT_PORT}"
OFF = ("", "off")

METRICS_KEYS: dict[str, type | tuple[type, ...]] = {
    "listen": str,
    "vllm_scrape_interval_seconds": (int, float),
    "vllm_scrape_timeout_seconds": (int, float),
    "hardware_interval_seconds": (int, float),
}
"""The [metrics] keys and their TOML types, for config.py's strict schema."""


@dataclass(frozen=True)
class MetricsConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", DEFAULT_PORT)
    """Where /metrics is served; None = no exporter at all."""
    vllm_scrape_interval: float = 5.0
    """How often each serving model's own /metrics is read."""
    vllm_scrape_timeout: float = 2.0
    hardware_interval: float = 30.0
    """How often per-partition VRAM (process lists) and sensor telemetry are read: as often as the daemon re-reads
    the inventory. Each read walks every partition's process list through amdsmi (64 calls in CPX); AMD's
    device-metrics-exporter is the tool for second-level telemetry."""


def parse_listen(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9842`` for IPv6) -> (host, port); "off" or "" -> None. The host is required:
    listening on every interface must be asked for by name (0.0.0.0 or [::]), never reached by leaving it out."""
    text = text.strip()
    if text.lower() in OFF:
        return None
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(
            f"{text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN} (0.0.0.0:{DEFAULT_PORT} for all interfaces, off for none)"
        )
    if host.startswith("["):
        if not host.endswith("]"):
            raise ValueError(f"{text!r}: an IPv6 address goes in brackets, e.g. [::1]:{DEFAULT_PORT}")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: put an IPv6 address in brackets, e.g. [{host}]:{port_text}")
    if not port_text.isdigit() or not 0 < int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_metrics(where: str, section: dict[str, Any]) -> MetricsConfig:
    """The [metrics] table (types already checked against METRICS_KEYS) -> MetricsConfig; ConfigError naming the
    key otherwise."""
    changes: dict[str, Any] = {}
    if "listen" in section:
        try:
            changes["listen"] = parse_listen(section["listen"])
        except ValueError as exc:
            raise ConfigError(f"config {where}: metrics.listen = {exc}") from None
    for key, attr in (
        ("vllm_scrape_interval_seconds", "vllm_scrape_interval"),
        ("vllm_scrape_timeout_seconds", "vllm_scrape_timeout"),
        ("hardware_interval_seconds", "hardware_interval"),
    ):
        if key in section:
            if not section[key] > 0:
                raise ConfigError(f"config {where}: metrics.{key} must be more than 0")
            changes[attr] = float(section[key])
    config = MetricsConfig(**changes)
    if config.vllm_scrape_timeout > config.vllm_scrape_interval:
        raise ConfigError(
            f"config {where}: metrics.vllm_scrape_timeout_seconds ({config.vllm_scrape_timeout:g}) is longer than "
            f"metrics.vllm_scrape_interval_seconds ({config.vllm_scrape_interval:g})",
            hint="a read must end before the next one is due",
        )
    return config


def listen_override(text: str) -> tuple[str, int] | None:
    """--metrics-listen: like metrics.listen, with the error naming the option."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise ConfigError(f"--metrics-listen {exc}") from None
