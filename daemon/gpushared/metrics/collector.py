"""The gpushare_* metric families, built at each scrape from the daemon's snapshots and the exporter's caches.

Runs on the event loop thread, so the services' state is read between two awaits, never half-updated, exactly as
the API handlers read it. Label sets are bounded: GPUs, partitions (at most 64) and pools come from the hardware;
models are bounded by the managed port range (each model holds a port); an allocation id appears only on the two
info families, where there is at most one series per held partition at any time, since a partition never serves
two allocations. States are exported StateSet-style (every state, 1 for the current one), so a series never
disappears when a model changes state and ``for:`` clauses in alert rules keep counting.
"""

from __future__ import annotations

import platform
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from gpushared.domain.allocation import Allocation, PartitionRef, PartitionState
from gpushared.domain.gpu import HostInventory
from gpushared.domain.model_state import ModelState, RestartPolicy, Transition
from gpushared.metrics.hardware import HardwarePoller
from gpushared.metrics.hooks import DaemonMetrics, HistogramData
from gpushared.metrics.source import MetricsSource
from gpushared.metrics.vllm import REEXPORTS, ChildScrape, Target, VllmScraper, family_header

TIME_TO_READY_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0)
"""Seconds from launch to READY: a stub in under a second, a 70B vLLM with torch.compile in 5-15 minutes."""
SERVING_STATES = frozenset({ModelState.READY, ModelState.UNHEALTHY})
"""States in which the child's HTTP server answers, so its /metrics can be read."""
FAILURE_REASONS = (
    "exit",
    "start_exit",
    "signal",
    "start_timeout",
    "health",
    "hung",
    "launch",
    "supervision",
    "other",
)
_DRIFT_GPU = re.compile(r"^GPU (\d+):")


def failure_reason(reason: str) -> str:
    """A bounded class for a supervisor's failure text (services/supervisor.py writes these)."""
    if reason.startswith("cannot launch"):
        return "launch"
    if reason.startswith("supervision failed"):
        return "supervision"
    if reason.startswith("not ready within"):
        return "start_timeout"
    if "one-token completion" in reason:
        return "hung"
    if reason.startswith("GET /health failed"):
        return "health"
    if reason.startswith(("exited during start", "exited unexpectedly")):
        if "killed by" in reason:
            return "signal"
        return "start_exit" if reason.startswith("exited during start") else "exit"
    return "other"


@dataclass
class _History:
    """What this daemon has seen of one model's transitions: derived counters that must only grow."""

    last_seen: Transition | None = None
    launched_at: float | None = None
    time_to_ready: HistogramData = field(default_factory=lambda: HistogramData(TIME_TO_READY_BUCKETS))
    failures: dict[str, int] = field(default_factory=dict)
    last_failure: tuple[str, float] | None = None

    def update(self, transitions: Sequence[Transition]) -> None:
        if not transitions:
            return  # no supervisor now (stopped, drained): nothing new happened
        start = 0
        if self.last_seen is not None:
            # The history is a bounded deque; find where we left off. A new supervisor (a model restarted after a
            # partition operation) has a history without it: everything in it is new.
            found = next((i for i in range(len(transitions) - 1, -1, -1) if transitions[i] == self.last_seen), None)
            if found is None:
                self.launched_at = None
            start = 0 if found is None else found + 1
        for transition in transitions[start:]:
            self._see(transition)
        self.last_seen = transitions[-1]

    def _see(self, t: Transition) -> None:
        if t.target is ModelState.STARTING:
            # Re-adoption is not a start: the child was already up when this daemon found it.
            self.launched_at = t.at if t.reason.startswith("launched") else None
        elif t.target is ModelState.READY and t.source is ModelState.STARTING:
            if self.launched_at is not None:
                self.time_to_ready.observe(max(0.0, t.at - self.launched_at))
            self.launched_at = None
        elif t.target is ModelState.BACKOFF or (t.target is ModelState.FAILED and t.source is not ModelState.BACKOFF):
            # FAILED after BACKOFF is the crash-loop verdict on an exit already counted.
            reason = failure_reason(t.reason)
            self.failures[reason] = self.failures.get(reason, 0) + 1
            self.last_failure = (reason, t.at)
            self.launched_at = None


def recent_failures(transitions: Sequence[Transition], now: float, window: float) -> int:
    return sum(1 for t in transitions if t.target is ModelState.BACKOFF and now - t.at <= window)


def ready_since(transitions: Sequence[Transition]) -> float | None:
    """When the model last became READY from STARTING (UNHEALTHY -> READY keeps its uptime, as `show` does)."""
    for t in reversed(transitions):
        if t.target is ModelState.READY and t.source is ModelState.STARTING:
            return t.at
    return None


def lead_partition(allocation: Allocation | None, inventory: HostInventory) -> tuple[str, str]:
    """(gpu, partition) label values of an allocation's first partition; ("", "") when it has none now."""
    if allocation is None or not allocation.partitions:
        return "", ""
    ref = allocation.partitions[0]
    gpu = inventory.gpu_by_bdf(ref.gpu_bdf)
    return (str(gpu.index) if gpu is not None else ""), str(ref.partition_id)


def drift_by_gpu(lines: Iterable[str]) -> set[int]:
    """GPU indices named by layout_drift's "GPU N: ..." lines (domain/partitioning.py)."""
    found = set()
    for line in lines:
        match = _DRIFT_GPU.match(line)
        if match:
            found.add(int(match.group(1)))
    return found


class GpushareCollector:
    """A prometheus_client Collector over a MetricsSource, the event hooks, and the exporter's two caches."""

    def __init__(
        self,
        source: MetricsSource,
        metrics: DaemonMetrics,
        *,
        scraper: VllmScraper | None = None,
        hardware: HardwarePoller | None = None,
        restart_policy: RestartPolicy | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._source = source
        self._metrics = metrics
        self._scraper = scraper
        self._hardware = hardware
        self._window = (restart_policy or RestartPolicy()).window_seconds
        self._wall = wall_clock
        self._histories: dict[str, _History] = {}
        self.last_collect_seconds = 0.0

    # -- bookkeeping that must not wait for a scrape ------------------------------------------------------------

    def track(self) -> None:
        """Fold new model transitions into the derived counters. Called at every scrape and by the exporter's own
        loop, so transitions are not lost to the bounded history while nobody scrapes."""
        models = self._source.models()
        names = {m.record.name for m in models}
        for gone in [n for n in self._histories if n not in names]:
            del self._histories[gone]
        for model in models:
            self._histories.setdefault(model.record.name, _History()).update(model.transitions)

    def targets(self) -> list[Target]:
        """The children whose /metrics the scraper should read now."""
        view = self._source.host_view()
        targets = []
        for model in self._source.models():
            if model.state in SERVING_STATES:
                gpu, partition = lead_partition(view.ledger.allocations.get(model.record.allocation_id), view.inventory)
                targets.append(Target(model.record.name, model.record.port, gpu, partition))
        return targets

    # -- the scrape ---------------------------------------------------------------------------------------------

    def collect(self) -> Iterable[Metric]:
        started = time.perf_counter()
        self.track()
        families = [
            *self._daemon(),
            *self._gpus_and_partitions(),
            *self._models(),
            *self._vllm(),
        ]
        self.last_collect_seconds = time.perf_counter() - started
        return families

    def _daemon(self) -> list[Metric]:
        m = self._metrics
        source = self._source
        build = GaugeMetricFamily(
            "gpushare_build_info",
            "gpushared's version and the Python running it; always 1.",
            labels=["version", "python_version"],
        )
        build.add_metric([m.version, platform.python_version()], 1)
        backend = GaugeMetricFamily(
            "gpushare_backend_info",
            "The hardware backend: amdsmi (real GPUs) or emulated; always 1.",
            labels=["backend"],
        )
        backend.add_metric([source.backend_name], 1)
        requests = CounterMetricFamily(
            "gpushare_api_requests", "gpushare API calls by method and gRPC status code.", labels=["method", "code"]
        )
        for (method, code), n in sorted(m.rpc_requests.items()):
            requests.add_metric([method, code], n)
        latency = HistogramMetricFamily(
            "gpushare_api_request_duration_seconds",
            "gpushare API call latency by method, as the daemon saw it.",
            labels=["method"],
        )
        for method, histogram in sorted(m.rpc_latency.items()):
            latency.add_metric([method], histogram.cumulative(), histogram.sum)
        refusals = CounterMetricFamily(
            "gpushare_allocation_refusals",
            "Allocate and Serve calls refused, by reason (capacity, quota, precondition, ...).",
            labels=["method", "reason"],
        )
        for (method, reason), n in sorted(m.refusals.items()):
            refusals.add_metric([method, reason], n)
        pings = CounterMetricFamily(
            "gpushare_watchdog_pings",
            "Watchdog health checks: sent (the API answered; WATCHDOG=1 when systemd asks for one) or withheld.",
            labels=["result"],
        )
        for result, n in sorted(m.watchdog_pings.items()):
            pings.add_metric([result], n)
        view = source.host_view()
        drift = list(source.drift())
        return [
            build,
            backend,
            GaugeMetricFamily(
                "gpushare_daemon_start_time_seconds", "When gpushared started, Unix time.", value=m.started_at
            ),
            GaugeMetricFamily(
                "gpushare_daemon_uptime_seconds", "Seconds since gpushared started.", value=m.uptime_seconds
            ),
            requests,
            latency,
            refusals,
            pings,
            GaugeMetricFamily(
                "gpushare_watchdog_enabled",
                "1 when systemd asked for watchdog pings (WatchdogSec).",
                value=float(m.watchdog_enabled),
            ),
            GaugeMetricFamily(
                "gpushare_partition_operation_running",
                "1 while a partition operation is changing the layout.",
                value=float(source.operation_running()),
            ),
            GaugeMetricFamily(
                "gpushare_layout_drift_gpus",
                "GPUs whose layout differs from the configured one or from what gpushared last set.",
                value=len(drift),
            ),
            GaugeMetricFamily(
                "gpushare_inventory_observed_timestamp_seconds",
                "When the hardware was last observed (re-read every 30 s), Unix time.",
                value=view.observed_at,
            ),
            GaugeMetricFamily(
                "gpushare_exporter_collect_duration_seconds",
                "How long the previous collection of these metrics took on the daemon's event loop.",
                value=self.last_collect_seconds,
            ),
        ]

    def _gpus_and_partitions(self) -> list[Metric]:
        view = self._source.host_view()
        ledger = view.ledger
        drifted = drift_by_gpu(self._source.drift())
        models_on = {m.record.allocation_id: m.record.name for m in self._source.models() if m.record.allocation_id}
        g = ["gpu"]
        info = GaugeMetricFamily(
            "gpushare_gpu_info", "A physical GPU and its product name; always 1.", labels=["gpu", "bdf", "product"]
        )
        compute = GaugeMetricFamily(
            "gpushare_gpu_compute_partition",
            "The GPU's compute partition mode (SPX, DPX, QPX, CPX); 1.",
            labels=["gpu", "mode"],
        )
        memory = GaugeMetricFamily(
            "gpushare_gpu_memory_partition", "The GPU's memory partition mode (NPS1, NPS4); 1.", labels=["gpu", "mode"]
        )
        count = GaugeMetricFamily("gpushare_gpu_partitions", "Logical devices the GPU exposes now.", labels=g)
        total = GaugeMetricFamily(
            "gpushare_gpu_memory_total_bytes", "Whole-GPU VRAM as the primary partition reports it.", labels=g
        )
        used = GaugeMetricFamily(
            "gpushare_gpu_vram_used_bytes",
            "VRAM in use on the GPU as the hardware reports it, all partitions.",
            labels=g,
        )
        pool_total = GaugeMetricFamily(
            "gpushare_gpu_memory_pool_total_bytes",
            "Size of a memory pool (the GPU in NPS1, a quadrant in NPS4).",
            labels=["gpu", "pool"],
        )
        pool_allocated = GaugeMetricFamily(
            "gpushare_gpu_memory_pool_allocated_bytes", "Pool memory reserved by allocations.", labels=["gpu", "pool"]
        )
        degraded = GaugeMetricFamily(
            "gpushare_gpu_degraded",
            "1 when the GPU is marked degraded (excluded until `gpusharectl gpu clear`).",
            labels=g,
        )
        closed = GaugeMetricFamily(
            "gpushare_gpu_closed",
            "1 when the GPU admits no new allocation (an operation runs, or it is degraded).",
            labels=g,
        )
        drift = GaugeMetricFamily(
            "gpushare_gpu_layout_drift",
            "1 when the GPU's layout differs from the configured or last-set one.",
            labels=g,
        )
        p = ["gpu", "partition"]
        pinfo = GaugeMetricFamily(
            "gpushare_partition_info",
            "A logical device (XCP) and its identifiers; always 1.",
            labels=["gpu", "partition", "bdf", "render_node", "hip_index", "pool"],
        )
        state = GaugeMetricFamily(
            "gpushare_partition_state",
            "1 for the partition's state (free, allocated, degraded), 0 for the others.",
            labels=[*p, "state"],
        )
        cap = GaugeMetricFamily(
            "gpushare_partition_memory_cap_bytes",
            "Most memory one workload may use on the partition (a cap in NPS1).",
            labels=p,
        )
        allocated = GaugeMetricFamily(
            "gpushare_partition_allocated_bytes", "Memory the partition's allocation reserved there.", labels=p
        )
        holder = GaugeMetricFamily(
            "gpushare_partition_holder_info",
            "The allocation (and model, if one runs on it) holding the partition; 1, held partitions only.",
            labels=[*p, "allocation", "model"],
        )
        for gpu in view.inventory.gpus:
            i = str(gpu.index)
            info.add_metric([i, gpu.bdf, gpu.model_name], 1)
            compute.add_metric([i, str(gpu.compute_partition)], 1)
            memory.add_metric([i, str(gpu.memory_partition)], 1)
            count.add_metric([i], len(gpu.partitions))
            total.add_metric([i], gpu.memory_total_bytes)
            used.add_metric([i], gpu.memory_used_bytes)
            reserved = ledger.pool_allocated(gpu)
            for pool in range(gpu.pool_count):
                pool_total.add_metric([i, str(pool)], gpu.pool_total_bytes)
                pool_allocated.add_metric([i, str(pool)], reserved.get(pool, 0))
            degraded.add_metric([i], float(gpu.bdf in ledger.degraded_gpus))
            closed.add_metric([i], float(gpu.bdf in ledger.closed_gpus))
            drift.add_metric([i], float(gpu.index in drifted))
            for part in gpu.partitions:
                ref = PartitionRef(gpu.bdf, part.partition_id)
                j = str(part.partition_id)
                pinfo.add_metric(
                    [i, j, part.bdf, part.render_node, str(part.hip_index), str(gpu.pool_of(part.partition_id))], 1
                )
                current = ledger.partition_state(ref)
                for s in PartitionState:
                    state.add_metric([i, j, str(s)], float(s is current))
                cap.add_metric([i, j], part.memory_total_bytes)
                held = ledger.holder_of(ref)
                allocated.add_metric([i, j], held.memory_bytes_per_partition if held is not None else 0)
                if held is not None:
                    holder.add_metric([i, j, held.id, models_on.get(held.id, "")], 1)
        families: list[Metric] = [info, compute, memory, count, total, used, pool_total, pool_allocated]
        families += [degraded, closed, drift, pinfo, state, cap, allocated, holder]
        families += self._hardware_families()
        alloc_info = GaugeMetricFamily(
            "gpushare_allocation_info",
            "An allocation: name, owner, state, policy and the model running on it; 1.",
            labels=["allocation", "name", "owner_uid", "state", "policy", "model"],
        )
        by_state = GaugeMetricFamily(
            "gpushare_allocations", "Allocations by state (active, degraded).", labels=["state"]
        )
        states: dict[str, int] = {"active": 0, "degraded": 0}
        for allocation in sorted(ledger.allocations.values(), key=lambda a: a.id):
            a_state, _ = ledger.allocation_state(allocation)
            states[str(a_state)] = states.get(str(a_state), 0) + 1
            owner, policy, model = str(allocation.owner_uid), str(allocation.policy), models_on.get(allocation.id, "")
            alloc_info.add_metric([allocation.id, allocation.name, owner, str(a_state), policy, model], 1)
        for allocation_state, n in sorted(states.items()):
            by_state.add_metric([allocation_state], n)
        return [*families, alloc_info, by_state]

    def _hardware_families(self) -> list[Metric]:
        if self._hardware is None:
            return []
        snapshot = self._hardware.snapshot
        vram = GaugeMetricFamily(
            "gpushare_partition_vram_used_bytes",
            "VRAM held by the processes on the partition (per-process data: a secondary partition's own reading is 0).",
            labels=["gpu", "partition"],
        )
        for (gpu, partition), used in sorted(snapshot.partition_vram_bytes.items()):
            vram.add_metric([str(gpu), str(partition)], used)
        families: list[Metric] = [vram]
        if not snapshot.telemetry:
            return families  # a backend without sensors exports no sensor families at all, not zeros
        temperature = GaugeMetricFamily(
            "gpushare_gpu_temperature_celsius",
            "GPU temperature by sensor, from the primary partition.",
            labels=["gpu", "sensor"],
        )
        power = GaugeMetricFamily(
            "gpushare_gpu_power_watts", "GPU socket power, from the primary partition.", labels=["gpu"]
        )
        activity = GaugeMetricFamily(
            "gpushare_gpu_activity_ratio",
            "GPU engine activity, 0-1, from the primary partition.",
            labels=["gpu", "engine"],
        )
        for gpu, reading in sorted(snapshot.telemetry.items()):
            for sensor, celsius in sorted(reading.temperature_celsius.items()):
                temperature.add_metric([str(gpu), sensor], celsius)
            if reading.power_watts is not None:
                power.add_metric([str(gpu)], reading.power_watts)
            for engine, ratio in sorted(reading.activity_ratio.items()):
                activity.add_metric([str(gpu), engine], ratio)
        return [*families, temperature, power, activity]

    def _models(self) -> list[Metric]:
        view = self._source.host_view()
        models = self._source.models()
        now = self._wall()
        m = ["model"]
        info = GaugeMetricFamily(
            "gpushare_model_info",
            "A served model: served name, engine type, source, allocation, lead GPU and partition, port, owner; 1.",
            labels=[
                "model",
                "served_name",
                "engine_type",
                "source",
                "allocation",
                "gpu",
                "partition",
                "port",
                "owner_uid",
            ],
        )
        state = GaugeMetricFamily(
            "gpushare_model_state", "1 for the model's state, 0 for the other states.", labels=[*m, "state"]
        )
        restarts = CounterMetricFamily(
            "gpushare_model_restarts", "Restarts after a failure since the model's supervisor started.", labels=m
        )
        recent = GaugeMetricFamily(
            "gpushare_model_recent_failures",
            f"Failures within the crash-loop window ({self._window:.0f} s); 5 make the model FAILED.",
            labels=m,
        )
        failures = CounterMetricFamily(
            "gpushare_model_failures",
            "Failures (unrequested exits, timeouts, failed probes) seen by this daemon, by reason.",
            labels=[*m, "reason"],
        )
        last = GaugeMetricFamily(
            "gpushare_model_last_failure_info", "The reason of the model's last failure; 1.", labels=[*m, "reason"]
        )
        last_at = GaugeMetricFamily(
            "gpushare_model_last_failure_timestamp_seconds", "When the model last failed, Unix time.", labels=m
        )
        ttr = HistogramMetricFamily(
            "gpushare_model_time_to_ready_seconds", "Seconds from launching the model's server to READY.", labels=m
        )
        uptime = GaugeMetricFamily(
            "gpushare_model_uptime_seconds",
            "Seconds since the model last became READY (READY or UNHEALTHY models only).",
            labels=m,
        )
        timeout = GaugeMetricFamily(
            "gpushare_model_start_timeout_seconds",
            "How long a start may take before it fails, learned from earlier starts.",
            labels=m,
        )
        probe_latency = HistogramMetricFamily(
            "gpushare_model_probe_duration_seconds",
            "Liveness probe latency (health: GET /health; completion: one token).",
            labels=[*m, "probe"],
        )
        probe_failures = CounterMetricFamily(
            "gpushare_model_probe_failures",
            "Liveness probes that failed (no answer, error status, timeout).",
            labels=[*m, "probe"],
        )
        for model in models:
            record = model.record
            name = record.name
            allocation = view.ledger.allocations.get(record.allocation_id)
            gpu, partition = lead_partition(allocation, view.inventory)
            spec = record.spec
            described = [name, spec.served_model_name, str(spec.engine), spec.model, record.allocation_id]
            info.add_metric([*described, gpu, partition, str(record.port), str(record.owner_uid)], 1)
            for s in ModelState:
                state.add_metric([name, str(s)], float(s is model.state))
            restarts.add_metric([name], model.restarts)
            recent.add_metric([name], recent_failures(model.transitions, now, self._window))
            timeout.add_metric([name], model.start_timeout)
            history = self._histories.get(name)
            if history is not None:
                for reason, n in sorted(history.failures.items()):
                    failures.add_metric([name, reason], n)
                if history.last_failure is not None:
                    last.add_metric([name, history.last_failure[0]], 1)
                    last_at.add_metric([name], history.last_failure[1])
                ttr.add_metric([name], history.time_to_ready.cumulative(), history.time_to_ready.sum)
            since = ready_since(model.transitions)
            if model.state in SERVING_STATES and since is not None:
                uptime.add_metric([name], max(0.0, now - since))
        for name, kind, series in self._metrics.probes.by_model({mv.record.port: mv.record.name for mv in models}):
            probe_latency.add_metric([name, kind], series.latency.cumulative(), series.latency.sum)
            probe_failures.add_metric([name, kind], series.failures)
        return [
            info,
            state,
            restarts,
            recent,
            failures,
            last,
            last_at,
            ttr,
            uptime,
            timeout,
            probe_latency,
            probe_failures,
        ]

    def _vllm(self) -> list[Metric]:
        if self._scraper is None:
            return []
        m = ["model"]
        up = GaugeMetricFamily(
            "gpushare_vllm_up", "1 when the model's own /metrics was read at the last attempt.", labels=m
        )
        duration = GaugeMetricFamily(
            "gpushare_vllm_scrape_duration_seconds", "How long the last read of the model's /metrics took.", labels=m
        )
        failures = CounterMetricFamily(
            "gpushare_vllm_scrape_failures", "Failed reads of the model's /metrics.", labels=m
        )
        stamp = GaugeMetricFamily(
            "gpushare_vllm_scrape_timestamp_seconds",
            "When the model's /metrics was last read successfully, Unix time.",
            labels=m,
        )
        interval = GaugeMetricFamily(
            "gpushare_vllm_scrape_interval_seconds",
            "How often gpushared reads each model's /metrics.",
            value=self._scraper.interval,
        )
        for name, result in self._serving_results():
            up.add_metric([name], float(result.up))
            duration.add_metric([name], result.duration)
            failures.add_metric([name], result.failures)
            if result.last_success:
                stamp.add_metric([name], result.last_success)
        return [up, duration, failures, stamp, interval]

    def _serving_results(self) -> list[tuple[str, ChildScrape]]:
        """Reads of children serving now: one that crashed since its last read must not be reported from that old
        read until the next one (up to an interval later)."""
        if self._scraper is None:
            return []
        serving = {m.record.name: m.record.port for m in self._source.models() if m.state in SERVING_STATES}
        return [
            (name, result)
            for name, result in sorted(self._scraper.results.items())
            if serving.get(name) == result.target.port
        ]

    def vllm_text(self, *, openmetrics: bool) -> str:
        """The re-exported vLLM families as exposition text, from the lines rendered when each child was read: one
        HELP/TYPE per family, then every serving model's samples of it (a family's samples must be contiguous)."""
        results = self._serving_results()
        out: list[str] = []
        for reexport in REEXPORTS:
            blocks = [r.lines[reexport.name] for _, r in results if reexport.name in r.lines]
            if blocks:
                out.append(family_header(reexport, openmetrics=openmetrics))
                out += blocks
        return "".join(out)
