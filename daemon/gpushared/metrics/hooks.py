"""Event counters the daemon feeds as things happen: API calls and refusals, watchdog pings, health probes.

Everything here is called on the event loop thread (gRPC aio handlers, the watchdog task, the supervisors' probes)
and read there by the collector, so plain dicts suffice: no lock, and an increment costs a dict update. Label
values are bounded by construction: methods come from the servicer's fixed table, codes from grpc.StatusCode,
refusal reasons and probe kinds from the closed sets below.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from gpushared import __version__
from gpushared.domain import errors
from gpushared.services.supervision_ports import HealthProbe

RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds. Queries answer from memory in well under a millisecond; Stop waits up to a grace period (30 s)."""
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds. A /health answer takes about a millisecond on loopback; a one-token completion may take up to its
60 s timeout on a loaded engine."""

ALLOCATING_METHODS = ("Allocate", "Serve")
"""RPCs that place an allocation: their refusals are what capacity planning needs to see."""
REFUSAL_REASONS = (
    "capacity",
    "quota",
    "precondition",
    "invalid",
    "not_found",
    "exists",
    "permission",
    "unavailable",
    "internal",
)
PROBE_KINDS = ("health", "completion")
WATCHDOG_RESULTS = ("sent", "withheld")

_CODE_REASON = {
    "RESOURCE_EXHAUSTED": "capacity",
    "FAILED_PRECONDITION": "precondition",
    "INVALID_ARGUMENT": "invalid",
    "NOT_FOUND": "not_found",
    "ALREADY_EXISTS": "exists",
    "PERMISSION_DENIED": "permission",
    "UNAUTHENTICATED": "permission",
    "UNAVAILABLE": "unavailable",
}


def refusal_reason(code: str, error: BaseException | None = None) -> str:
    """A bounded reason for a refused request: the error's class when known (quota and capacity share a code),
    else its status code."""
    if isinstance(error, errors.QuotaExceeded):
        return "quota"
    if isinstance(error, errors.ResourceExhausted):
        return "capacity"
    return _CODE_REASON.get(code, "internal")


@dataclass
class HistogramData:
    """A cumulative histogram with fixed buckets: counts per bucket (not cumulative), sum, count."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (le means "less than or equal").
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs as prometheus_client's HistogramMetricFamily takes them, +Inf last."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((_le(bound), float(running)))
        out.append(("+Inf", float(self.count)))
        return out


def _le(bound: float) -> str:
    # The form prometheus_client's own histograms use ("0.005", "1.0", "30.0").
    return repr(float(bound))


@dataclass
class ProbeSeries:
    latency: HistogramData = field(default_factory=lambda: HistogramData(PROBE_BUCKETS))
    failures: int = 0


class ProbeStats:
    """Probe outcomes by model port. The port, not the model name, is what the probe is called with; the collector
    names the model at scrape time, and resets a port's series when a different model holds it."""

    def __init__(self) -> None:
        self.series: dict[tuple[int, str], ProbeSeries] = {}
        self.owner: dict[int, str] = {}

    def record(self, port: int, kind: str, seconds: float, ok: bool) -> None:
        series = self.series.get((port, kind))
        if series is None:
            series = self.series[(port, kind)] = ProbeSeries()
        series.latency.observe(seconds)
        if not ok:
            series.failures += 1

    def by_model(self, port_owner: dict[int, str]) -> list[tuple[str, str, ProbeSeries]]:
        """(model, kind, series) for ports a model holds now; forgets the others."""
        for port, name in port_owner.items():
            if self.owner.get(port, name) != name:
                for kind in PROBE_KINDS:
                    self.series.pop((port, kind), None)
            self.owner[port] = name
        for port in [p for p in self.owner if p not in port_owner]:
            del self.owner[port]
        for key in [k for k in self.series if k[0] not in port_owner]:
            del self.series[key]
        return [(port_owner[port], kind, series) for (port, kind), series in sorted(self.series.items())]


class MeteredProbe:
    """A HealthProbe that times the liveness probes of the one it wraps. Readiness polling (every 50 ms while a
    model loads, refused until it listens) is passed through unmeasured: time to READY covers it."""

    def __init__(self, inner: HealthProbe, stats: ProbeStats, clock: Callable[[], float] = time.perf_counter) -> None:
        self._inner = inner
        self._stats = stats
        self._clock = clock

    async def health(self, port: int) -> bool:
        started = self._clock()
        ok = await self._inner.health(port)
        self._stats.record(port, "health", self._clock() - started, ok)
        return ok

    async def ready(self, port: int, served_name: str, *, api_key: str | None = None) -> bool:
        return await self._inner.ready(port, served_name, api_key=api_key)

    async def completes(self, port: int, served_name: str, *, api_key: str | None, timeout: float) -> bool:
        started = self._clock()
        ok = await self._inner.completes(port, served_name, api_key=api_key, timeout=timeout)
        self._stats.record(port, "completion", self._clock() - started, ok)
        return ok


class DaemonMetrics:
    """The daemon's event hooks. Create it first in the composition root (the probe and the servicer need it),
    then hand it to MetricsExporter with the services."""

    def __init__(
        self,
        *,
        version: str = __version__,
        watchdog_enabled: bool = False,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.version = version
        self.watchdog_enabled = watchdog_enabled
        self.started_at = wall_clock()
        self._clock = clock
        self._started = clock()
        self.rpc_requests: dict[tuple[str, str], int] = {}
        self.rpc_latency: dict[str, HistogramData] = {}
        # Every (method, reason) exists from the start at 0: increase() then sees the very first refusal.
        self.refusals: dict[tuple[str, str], int] = {(m, r): 0 for m in ALLOCATING_METHODS for r in REFUSAL_REASONS}
        self.watchdog_pings: dict[str, int] = dict.fromkeys(WATCHDOG_RESULTS, 0)
        self.probes = ProbeStats()

    @property
    def uptime_seconds(self) -> float:
        return self._clock() - self._started

    def observe_rpc(self, method: str, code: str, seconds: float, error: BaseException | None = None) -> None:
        """One finished API call: ``code`` is the grpc.StatusCode name ("OK", "RESOURCE_EXHAUSTED", ...); ``error``
        the domain error it failed with, if any, which tells a quota refusal from a capacity one."""
        key = (method, code)
        self.rpc_requests[key] = self.rpc_requests.get(key, 0) + 1
        latency = self.rpc_latency.get(method)
        if latency is None:
            latency = self.rpc_latency[method] = HistogramData(RPC_BUCKETS)
        latency.observe(seconds)
        # A call the client abandoned was not refused.
        if code not in ("OK", "CANCELLED") and method in ALLOCATING_METHODS:
            refusal = (method, refusal_reason(code, error))
            self.refusals[refusal] = self.refusals.get(refusal, 0) + 1

    def watchdog(self, *, sent: bool) -> None:
        """The watchdog's health check passed (WATCHDOG=1 sent when systemd asked for one) or a ping was withheld."""
        result = "sent" if sent else "withheld"
        self.watchdog_pings[result] += 1

    def metered_probe(self, inner: HealthProbe) -> MeteredProbe:
        return MeteredProbe(inner, self.probes)


class RpcObserver(Protocol):
    """What the servicer needs: DaemonMetrics implements it (the servicer never imports prometheus-client)."""

    def observe_rpc(self, method: str, code: str, seconds: float, error: BaseException | None = None) -> None: ...
