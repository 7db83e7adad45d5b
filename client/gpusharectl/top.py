"""gpusharectl top: a live view of GPUs, partitions and models, with memory bars, request rates and TTFT.

The layout (GPUs, partitions, allocations, models) comes from the API, so it works for anyone allowed on the
socket. Request rates and TTFT come from the daemon's metrics endpoint (loopback by default, no credentials),
which already holds every model's vLLM counters: `top` adds no load on the models. Rates are taken between two
reads of the same model by the daemon (its scrape timestamps), so they do not depend on how often `top` refreshes.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import select
import shutil
import sys
import termios
import time
import tty
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

from gpusharectl import render
from gpusharectl.client import EXIT_OK, Client
from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.metrics.text import COUNTER, GAUGE, HISTOGRAM, ExpositionError, Family, parse, quantile

METRICS_ENV = "GPUSHARE_METRICS_URL"
DEFAULT_METRICS_URL = "http://127.0.0.1:9842/metrics"
GIB = 1 << 30
BAR_WIDTH = 20
WANTED = {
    "gpushare_vllm_request_success_total": COUNTER,
    "gpushare_vllm_time_to_first_token_seconds": HISTOGRAM,
    "gpushare_vllm_scrape_timestamp_seconds": GAUGE,
    "gpushare_vllm_scrape_interval_seconds": GAUGE,
    "gpushare_vllm_num_requests_running": GAUGE,
    "gpushare_vllm_num_requests_waiting": GAUGE,
    "gpushare_vllm_kv_cache_usage_ratio": GAUGE,
    "gpushare_partition_vram_used_bytes": GAUGE,
    "gpushare_gpu_temperature_celsius": GAUGE,
    "gpushare_gpu_power_watts": GAUGE,
}
STATE_ORDER = {"ready": 0, "unhealthy": 1, "starting": 2, "pending": 3, "backoff": 4, "failed": 5}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS", help="refresh every SECONDS (2)")
    parser.add_argument(
        "--once",
        action="store_true",
        help="print one screen and exit (waits up to two of the daemon's model reads, to show rates)",
    )
    parser.add_argument(
        "--metrics-url",
        default=os.environ.get(METRICS_ENV, DEFAULT_METRICS_URL),
        metavar="URL",
        help=f"the daemon's metrics endpoint (default ${METRICS_ENV}, else {DEFAULT_METRICS_URL})",
    )


# -- model figures from the metrics endpoint ----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSample:
    """One read of a model by the daemon, as the daemon re-exports it."""

    at: float
    requests: float
    ttft: tuple[tuple[float, float], ...]
    """(upper bound, cumulative count), +Inf last."""
    running: float | None
    waiting: float | None
    kv_usage: float | None


@dataclass(frozen=True)
class Window:
    """What happened to a model between two reads by the daemon."""

    rate: float
    ttft_p50: float
    ttft_p99: float


@dataclass
class Metrics:
    models: dict[str, ModelSample] = field(default_factory=dict)
    partition_vram: dict[tuple[str, str], float] = field(default_factory=dict)
    temperature: dict[str, float] = field(default_factory=dict)
    power: dict[str, float] = field(default_factory=dict)
    scrape_interval: float | None = None
    error: str = ""


def fetch(url: str, timeout: float = 2.0) -> Metrics:
    if not url.startswith(("http://", "https://")):
        return Metrics(error=f"{url}: not an http:// or https:// URL")
    # The scheme is checked above: S310 warns about file: and custom schemes.
    request = urllib.request.Request(url, headers={"Accept": "text/plain;version=0.0.4"})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            text = response.read(64 << 20).decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return Metrics(error=f"{url}: {reason} (rates and TTFT need gpushared's metrics listener)")
    try:
        families = parse(text, WANTED)
    except ExpositionError as exc:
        return Metrics(error=f"{url}: {exc}")
    return metrics_from(families)


def _by(family: Family | None, label: str) -> dict[str, float]:
    if family is None:
        return {}
    out: dict[str, float] = {}
    for labels, value in family.samples.items():
        key = dict(labels).get(label)
        if key is not None:
            out[key] = out.get(key, 0.0) + value
    return out


def metrics_from(families: dict[str, Family]) -> Metrics:
    stamps = _by(families.get("gpushare_vllm_scrape_timestamp_seconds"), "model")
    requests = _by(families.get("gpushare_vllm_request_success_total"), "model")
    running = _by(families.get("gpushare_vllm_num_requests_running"), "model")
    waiting = _by(families.get("gpushare_vllm_num_requests_waiting"), "model")
    kv = families.get("gpushare_vllm_kv_cache_usage_ratio")
    kv_max: dict[str, float] = {}
    if kv is not None:
        for labels, value in kv.samples.items():
            name = dict(labels).get("model", "")
            kv_max[name] = max(kv_max.get(name, 0.0), value)
    ttft: dict[str, dict[float, float]] = {}
    family = families.get("gpushare_vllm_time_to_first_token_seconds")
    if family is not None:
        for labels, histogram in family.histograms.items():
            merged = ttft.setdefault(dict(labels).get("model", ""), {})
            for bucket in histogram.buckets:
                merged[bucket.upper] = merged.get(bucket.upper, 0.0) + bucket.count
    out = Metrics()
    for name, at in stamps.items():
        out.models[name] = ModelSample(
            at=at,
            requests=requests.get(name, 0.0),
            ttft=tuple(sorted(ttft.get(name, {}).items())),
            running=running.get(name),
            waiting=waiting.get(name),
            kv_usage=kv_max.get(name),
        )
    vram = families.get("gpushare_partition_vram_used_bytes")
    if vram is not None:
        for labels, value in vram.samples.items():
            d = dict(labels)
            out.partition_vram[(d.get("gpu", ""), d.get("partition", ""))] = value
    temperature = families.get("gpushare_gpu_temperature_celsius")
    if temperature is not None:
        for labels, value in temperature.samples.items():
            d = dict(labels)
            if d.get("sensor") == "hotspot":
                out.temperature[d.get("gpu", "")] = value
    out.power = _by(families.get("gpushare_gpu_power_watts"), "gpu")
    interval = families.get("gpushare_vllm_scrape_interval_seconds")
    if interval is not None and interval.samples:
        out.scrape_interval = next(iter(interval.samples.values()))
    return out


def window(before: ModelSample, after: ModelSample) -> Window | None:
    """Rate and TTFT quantiles between two reads; None when they are the same read or the counters reset (the
    model restarted in between)."""
    elapsed = after.at - before.at
    requests = after.requests - before.requests
    if elapsed <= 0 or requests < 0:
        return None
    earlier = dict(before.ttft)
    deltas = [(upper, count - earlier.get(upper, 0.0)) for upper, count in after.ttft]
    if any(d < 0 for _, d in deltas):
        return None
    return Window(requests / elapsed, quantile(0.5, deltas), quantile(0.99, deltas))


class Tracker:
    """Keeps each model's previous read and its latest window, across refreshes."""

    def __init__(self) -> None:
        self.previous: dict[str, ModelSample] = {}
        self.windows: dict[str, Window] = {}

    def update(self, metrics: Metrics) -> None:
        for name, sample in metrics.models.items():
            before = self.previous.get(name)
            if before is not None and sample.at > before.at:
                found = window(before, sample)
                if found is None:
                    self.windows.pop(name, None)
                else:
                    self.windows[name] = found
            if before is None or sample.at > before.at:
                self.previous[name] = sample
        for gone in [n for n in self.previous if n not in metrics.models]:
            del self.previous[gone]
            self.windows.pop(gone, None)


# -- the screen ---------------------------------------------------------------------------------------------------


@dataclass
class Snapshot:
    status: pb.GetStatusResponse
    gpus: pb.ListGpusResponse
    allocations: pb.ListAllocationsResponse
    models: pb.ListModelsResponse
    metrics: Metrics


def take(client: Client, url: str) -> Snapshot:
    return Snapshot(
        client.get_status(), client.list_gpus(), client.list_allocations(), client.list_models(), fetch(url)
    )


def _gib(value: float) -> str:
    return f"{value / GIB:.1f}"


def bar(used: float, total: float, width: int = BAR_WIDTH, *, unicode: bool = True) -> str:
    full, empty = ("█", "░") if unicode else ("#", ".")
    filled = 0 if total <= 0 else min(width, round(width * used / total))
    return "[" + full * filled + empty * (width - filled) + "]"


def _ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.0f}ms" if seconds < 10 else f"{seconds:.0f}s"


def frame(snapshot: Snapshot, tracker: Tracker, *, width: int = 120, unicode: bool = True, now: str = "") -> str:
    status = snapshot.status
    models = list(snapshot.models.models)
    ready = sum(1 for m in models if m.state == pb.MODEL_STATE_READY)
    lines = [
        f"gpushare top  {now}  {status.backend} backend, {status.gpu_count} GPUs, {status.partition_count} partitions "
        f"({status.free_partition_count} free), {ready}/{len(models)} models ready, "
        f"{_gib(status.memory_allocated_bytes)} of {_gib(status.memory_total_bytes)} GiB reserved",
    ]
    if status.operation_id:
        lines.append(f"partition operation {status.operation_id} running")
    lines += [f"drift: {line}" for line in status.drift]
    lines += [f"degraded: GPU {g.gpu_index}: {g.reason}" for g in status.degraded_gpus]
    lines.append("")
    lines += _gpu_lines(snapshot, unicode=unicode)
    lines.append("")
    lines += _model_lines(snapshot, tracker, unicode=unicode)
    if snapshot.metrics.error:
        lines += ["", f"metrics: {snapshot.metrics.error}"]
    return "\n".join(line[:width] for line in lines)


def _gpu_lines(snapshot: Snapshot, *, unicode: bool) -> list[str]:
    cell = {pb.PARTITION_STATE_FREE: ".", pb.PARTITION_STATE_ALLOCATED: "A", pb.PARTITION_STATE_DEGRADED: "D"}
    metrics = snapshot.metrics
    rows = []
    for gpu in snapshot.gpus.gpus:
        reserved = sum(p.allocated_bytes for p in gpu.memory_pools)
        total = sum(p.total_bytes for p in gpu.memory_pools) or gpu.memory_total_bytes
        cells = "|".join(
            "".join(cell.get(gpu.partitions[i].state, "?") for i in pool.partition_ids if i < len(gpu.partitions))
            for pool in gpu.memory_pools
        )
        layout = f"{render.compute_name(gpu.compute_partition)}/{render.memory_name(gpu.memory_partition)}"
        key = str(gpu.index)
        sensors = []
        if key in metrics.temperature:
            sensors.append(f"{metrics.temperature[key]:.0f}C")
        if key in metrics.power:
            sensors.append(f"{metrics.power[key]:.0f}W")
        rows.append(
            (
                gpu.index,
                layout,
                f"{bar(reserved, total, unicode=unicode)} {_gib(reserved)}/{_gib(total)} GiB",
                f"{_gib(gpu.memory_used_bytes)} GiB",
                f"[{cells}]",
                " ".join(sensors) or "-",
                gpu.closed_reason or "",
            )
        )
    legend = "partitions: . free  A allocated  D degraded, pools separated by |"
    return [
        *render.table(("GPU", "LAYOUT", "RESERVED", "HW USED", "PARTITIONS", "SENSORS", "CLOSED"), rows).splitlines(),
        legend,
    ]


def _model_lines(snapshot: Snapshot, tracker: Tracker, *, unicode: bool) -> list[str]:
    allocations = {a.id: a for a in snapshot.allocations.allocations}
    caps = {(p.gpu_index, p.partition_id): p.memory_cap_bytes for g in snapshot.gpus.gpus for p in g.partitions}
    vram = snapshot.metrics.partition_vram
    models = sorted(snapshot.models.models, key=lambda m: (STATE_ORDER.get(render.state_name(m.state), 9), m.name))
    rows = []
    for m in models:
        allocation = allocations.get(m.allocation_id)
        where, memory = "-", "-"
        if allocation is not None and allocation.partitions:
            lead = allocation.partitions[0]
            where = f"{lead.gpu_index}/{lead.partition_id}" + (
                f"+{len(allocation.partitions) - 1}" if len(allocation.partitions) > 1 else ""
            )
            cap = caps.get((lead.gpu_index, lead.partition_id), 0)
            share = allocation.memory_bytes_per_partition
            used = vram.get((str(lead.gpu_index), str(lead.partition_id)))
            shown = f" ({_gib(used)} in use)" if used else ""
            memory = f"{bar(share, cap, 10, unicode=unicode)} {_gib(share)}/{_gib(cap)} GiB{shown}"
        sample = snapshot.metrics.models.get(m.name)
        figures = tracker.windows.get(m.name)
        rate = f"{figures.rate:.2f}" if figures is not None else "-"
        p50 = _ms(figures.ttft_p50) if figures is not None else "-"
        p99 = _ms(figures.ttft_p99) if figures is not None else "-"
        load = "-"
        if sample is not None and sample.running is not None:
            load = f"{sample.running:.0f}/{sample.waiting or 0:.0f}"
        kv = f"{sample.kv_usage * 100:.0f}%" if sample is not None and sample.kv_usage is not None else "-"
        rows.append((m.name, render.state_name(m.state), where, memory, rate, p50, p99, load, kv, m.restarts))
    if not rows:
        return ["no models (gpusharectl serve MODEL --engine vllm|stub)"]
    headers = (
        "MODEL",
        "STATE",
        "GPU/PART",
        "MEMORY (per partition)",
        "REQ/S",
        "TTFT p50",
        "p99",
        "RUN/WAIT",
        "KV",
        "RESTARTS",
    )
    return render.table(headers, rows).splitlines()


# -- the loop -------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _terminal(stream: TextIO) -> Iterator[Callable[[float], bool]]:
    """Cbreak input (q quits without Enter), cursor hidden; yields wait(seconds) -> True when q was pressed."""
    fd = sys.stdin.fileno() if sys.stdin.isatty() else None
    saved = termios.tcgetattr(fd) if fd is not None else None
    if fd is not None:
        tty.setcbreak(fd)
    stream.write("\x1b[?25l")

    def wait(seconds: float) -> bool:
        if fd is None:
            time.sleep(seconds)
            return False
        ready, _, _ = select.select([fd], [], [], seconds)
        return bool(ready) and os.read(fd, 16).strip().lower().startswith(b"q")

    try:
        yield wait
    finally:
        stream.write("\x1b[?25h\n")
        stream.flush()
        if fd is not None and saved is not None:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _unicode(stream: TextIO) -> bool:
    return (getattr(stream, "encoding", "") or "").lower().replace("-", "") == "utf8"


def main(args: argparse.Namespace, client: Client, out: TextIO | None = None) -> int:
    """`gpusharectl top`: a full-screen view refreshed every --interval on a terminal (q or Ctrl-C quits); one
    screen with --once; on a pipe, a screen per interval separated by blank lines (like `top -b`)."""
    stream = out if out is not None else sys.stdout
    interval = max(0.2, float(args.interval))
    tracker = Tracker()
    unicode = _unicode(stream)
    if args.once:
        snapshot = _once(client, args.metrics_url, tracker, interval)
        stream.write(frame(snapshot, tracker, unicode=unicode, now=time.strftime("%H:%M:%S")) + "\n")
        return EXIT_OK
    if not stream.isatty():
        try:
            while True:
                snapshot = take(client, args.metrics_url)
                tracker.update(snapshot.metrics)
                stream.write(frame(snapshot, tracker, unicode=unicode, now=time.strftime("%H:%M:%S")) + "\n\n")
                stream.flush()
                time.sleep(interval)
        except KeyboardInterrupt:
            return EXIT_OK
    try:
        with _terminal(stream) as wait:
            while True:
                snapshot = take(client, args.metrics_url)
                tracker.update(snapshot.metrics)
                size = shutil.get_terminal_size()
                text = frame(snapshot, tracker, width=size.columns, unicode=unicode, now=time.strftime("%H:%M:%S"))
                lines = text.splitlines()[: max(1, size.lines - 1)]
                # Home and clear-to-end per line: no flicker from clearing the whole screen first.
                stream.write("\x1b[H" + "\n".join(line + "\x1b[K" for line in lines) + "\x1b[J")
                stream.flush()
                if wait(interval):
                    return EXIT_OK
    except KeyboardInterrupt:
        return EXIT_OK


def _once(client: Client, url: str, tracker: Tracker, interval: float) -> Snapshot:
    """One screen with rates: read the metrics again until every serving model has been read twice by the daemon
    (bounded by three of its read intervals), so the window between the two reads gives rates and TTFT."""
    snapshot = take(client, url)
    tracker.update(snapshot.metrics)
    serving = {m.name for m in snapshot.models.models if m.state in (pb.MODEL_STATE_READY, pb.MODEL_STATE_UNHEALTHY)}
    if snapshot.metrics.error or not serving:
        return snapshot
    patience = 3 * (snapshot.metrics.scrape_interval or interval) + 1.0
    deadline = time.monotonic() + patience
    while not serving <= tracker.windows.keys() and time.monotonic() < deadline:
        time.sleep(min(0.25, interval))
        metrics = fetch(url)
        if metrics.error:
            break
        tracker.update(metrics)
        snapshot.metrics = metrics
    return take_models_again(client, snapshot)


def take_models_again(client: Client, snapshot: Snapshot) -> Snapshot:
    """The layout as of now, with the metrics already read (states may have changed while waiting)."""
    return Snapshot(
        client.get_status(), client.list_gpus(), client.list_allocations(), client.list_models(), snapshot.metrics
    )
