"""vLLM's own metrics: each serving child's /metrics read on an interval, off the scrape path, kept for re-export.

A Prometheus scrape of gpushared must never wait on a model child (a child that hangs would hang the scrape, and
16 children are 16 round trips), so a background task reads every READY or UNHEALTHY child every few seconds, with
a timeout, and keeps what it parsed. The collector re-exports the last good read under gpushare_vllm_* names with
``model``, ``gpu`` and ``partition`` labels; a child that cannot be read has no vLLM series (stale data would look
current) and ``gpushare_vllm_up`` 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from gpushared.adapters.http_probe import read_response_head
from gpushared.metrics.exposition import escape_label, header, number
from gpushared.metrics.text import (
    COUNTER,
    GAUGE,
    HISTOGRAM,
    ExpositionError,
    Family,
    Labels,
    parse_lines,
    select_lines,
    wanted_names,
)

log = logging.getLogger("gpushared.metrics")

LOOPBACK = "127.0.0.1"
MAX_EXPOSITION_BYTES = 16 << 20
"""A vLLM exposition is tens of kilobytes; anything this large is not one."""


@dataclass(frozen=True)
class Reexport:
    """One gpushared family fed from vLLM: ``sources`` in order of preference (vLLM renamed some across versions;
    vllm.md §4), the first one the child exposes wins."""

    name: str
    kind: str
    sources: tuple[str, ...]
    help: str


REEXPORTS: tuple[Reexport, ...] = (
    Reexport(
        "gpushare_vllm_num_requests_running",
        GAUGE,
        ("vllm:num_requests_running",),
        "Requests in the model's running batch (vLLM vllm:num_requests_running).",
    ),
    Reexport(
        "gpushare_vllm_num_requests_waiting",
        GAUGE,
        ("vllm:num_requests_waiting",),
        "Requests queued in the model (vLLM vllm:num_requests_waiting).",
    ),
    Reexport(
        "gpushare_vllm_kv_cache_usage_ratio",
        GAUGE,
        ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
        "KV-cache usage, 0-1 (vLLM vllm:kv_cache_usage_perc, or vllm:gpu_cache_usage_perc before 0.10).",
    ),
    Reexport(
        "gpushare_vllm_request_success_total",
        COUNTER,
        ("vllm:request_success_total",),
        "Finished requests by finished_reason (vLLM vllm:request_success_total).",
    ),
    Reexport(
        "gpushare_vllm_prompt_tokens_total",
        COUNTER,
        ("vllm:prompt_tokens_total",),
        "Prefill tokens processed (vLLM vllm:prompt_tokens_total).",
    ),
    Reexport(
        "gpushare_vllm_generation_tokens_total",
        COUNTER,
        ("vllm:generation_tokens_total",),
        "Tokens generated (vLLM vllm:generation_tokens_total).",
    ),
    Reexport(
        "gpushare_vllm_num_preemptions_total",
        COUNTER,
        ("vllm:num_preemptions_total",),
        "Requests preempted for lack of KV cache (vLLM vllm:num_preemptions_total).",
    ),
    Reexport(
        "gpushare_vllm_time_to_first_token_seconds",
        HISTOGRAM,
        ("vllm:time_to_first_token_seconds",),
        "Time to first token, vLLM's buckets (vLLM vllm:time_to_first_token_seconds).",
    ),
    Reexport(
        "gpushare_vllm_inter_token_latency_seconds",
        HISTOGRAM,
        ("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
        "Time between output tokens, per decode step (vLLM vllm:inter_token_latency_seconds, or "
        "vllm:time_per_output_token_seconds before it).",
    ),
    Reexport(
        "gpushare_vllm_e2e_request_latency_seconds",
        HISTOGRAM,
        ("vllm:e2e_request_latency_seconds",),
        "End-to-end request latency (vLLM vllm:e2e_request_latency_seconds).",
    ),
    Reexport(
        "gpushare_vllm_request_queue_time_seconds",
        HISTOGRAM,
        ("vllm:request_queue_time_seconds",),
        "Time a request waited before being scheduled (vLLM vllm:request_queue_time_seconds).",
    ),
)
SOURCE_KINDS: dict[str, str] = {source: r.kind for r in REEXPORTS for source in r.sources}
SOURCE_LOOKUP = wanted_names(SOURCE_KINDS)
UNREADABLE_AFTER = 3
"""Consecutive failed reads of a serving model before the log says so."""
CACHE_LIMIT = 4096
"""Label sets remembered per child; a child repeats the same hundred or so at every read."""
DROPPED_LABELS = frozenset({"model_name"})
"""vLLM's served-name label: ``model`` (the gpushare name, unique on the host) replaces it; the served name is on
gpushare_model_info."""


@dataclass(frozen=True)
class Target:
    """A child to read: its model, loopback port, and the labels its series get (the lead partition of its
    allocation: where vLLM's rank 0 runs; every partition it holds is on gpushare_partition_holder_info)."""

    model: str
    port: int
    gpu: str
    partition: str


@dataclass
class ChildScrape:
    target: Target
    families: dict[str, Family] = field(default_factory=dict)
    """By gpushare_vllm_* name; empty unless the last read succeeded."""
    lines: dict[str, str] = field(default_factory=dict)
    """The same families as exposition sample lines, rendered once per read: re-encoding some 190 samples per
    model at every Prometheus scrape is what made scrapes slow (tens of ms for 16 models)."""
    up: bool = False
    duration: float = 0.0
    last_success: float = 0.0
    """Unix time of the last good read; 0 before the first."""
    failures: int = 0
    consecutive_failures: int = 0
    error: str = ""
    raw: list[str] = field(default_factory=list)
    """The wanted lines of the last good read: an idle model repeats them exactly, and is then not parsed again."""
    rendered_for: Target | None = None
    label_cache: dict[str, Labels] = field(default_factory=dict)
    text_cache: dict[tuple[Labels, str], str] = field(default_factory=dict)


Fetch = Callable[[int, float], Awaitable[str]]


async def fetch_metrics(port: int, timeout: float, *, host: str = LOOPBACK) -> str:
    """GET /metrics from a child on loopback. HTTP/1.0, so no server may answer chunked, and the body ends at EOF
    or Content-Length. Raises OSError, TimeoutError or ValueError."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(
                f"GET /metrics HTTP/1.0\r\nHost: {host}:{port}\r\nAccept: text/plain;version=0.0.4\r\n\r\n".encode()
            )
            await writer.drain()
            status, length = await read_response_head(reader)
            if status != 200:
                raise ValueError(f"GET /metrics answered {status}")
            if length is not None and length > MAX_EXPOSITION_BYTES:
                raise ValueError(f"exposition of {length} bytes is too large")
            body = await (reader.readexactly(length) if length is not None else reader.read(MAX_EXPOSITION_BYTES + 1))
            if len(body) > MAX_EXPOSITION_BYTES:
                raise ValueError("exposition too large")
            return body.decode("utf-8", errors="replace")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def select_families(parsed: dict[str, Family]) -> dict[str, Family]:
    """The re-exported families, each from its preferred source present in ``parsed``, renamed."""
    chosen: dict[str, Family] = {}
    for reexport in REEXPORTS:
        for source in reexport.sources:
            family = parsed.get(source)
            if family is not None and (family.samples or family.histograms):
                chosen[reexport.name] = Family(reexport.name, reexport.kind, family.samples, family.histograms)
                break
    return chosen


def _label_text(
    labels: Labels, base: dict[str, str], le: str = "", cache: dict[tuple[Labels, str], str] | None = None
) -> str:
    key = (labels, le)
    if cache is not None and key in cache:
        return cache[key]
    merged = {k: v for k, v in labels if k not in DROPPED_LABELS and k not in base}
    merged.update(base)
    if le:
        merged["le"] = le
    text = "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in sorted(merged.items())) + "}"
    if cache is not None:
        cache[key] = text
    return text


def render_lines(family: Family, base: dict[str, str], cache: dict[tuple[Labels, str], str] | None = None) -> str:
    """A re-exported family's sample lines, with ``base`` (model, gpu, partition) replacing the child's own labels
    of those names and vLLM's model_name. The same lines serve the text format and OpenMetrics: they differ only in
    the HELP and TYPE lines (see family_header). ``cache`` keeps rendered label sets for one ``base``."""
    out: list[str] = []
    name = family.name
    if family.kind in (GAUGE, COUNTER):
        for labels, value in family.samples.items():
            out.append(f"{name}{_label_text(labels, base, '', cache)} {number(value)}\n")
    else:
        for labels, histogram in family.histograms.items():
            for bucket in histogram.buckets:
                out.append(f"{name}_bucket{_label_text(labels, base, bucket.le, cache)} {number(bucket.count)}\n")
            label_text = _label_text(labels, base, "", cache)
            out.append(f"{name}_count{label_text} {number(histogram.count)}\n")
            out.append(f"{name}_sum{label_text} {number(histogram.sum)}\n")
    return "".join(out)


def family_header(reexport: Reexport, *, openmetrics: bool) -> str:
    return header(reexport.name, reexport.kind, reexport.help, openmetrics=openmetrics)


class VllmScraper:
    """Reads every target's /metrics each ``interval`` seconds (``concurrency`` at a time, each bounded by
    ``timeout``) and keeps the last result per model in ``results``. Runs on the event loop."""

    def __init__(
        self,
        *,
        interval: float = 5.0,
        timeout: float = 2.0,
        concurrency: int = 4,
        fetch: Fetch | None = None,
        wall_clock: Callable[[], float] = time.time,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not interval > 0 or not timeout > 0:
            raise ValueError(f"vLLM scrape interval and timeout must be > 0, got {interval!r} and {timeout!r}")
        self.interval = interval
        self.timeout = min(timeout, interval)
        self._gate = asyncio.Semaphore(concurrency)
        self._fetch = fetch or fetch_metrics
        self._wall = wall_clock
        self._clock = clock
        self.results: dict[str, ChildScrape] = {}

    async def scrape_once(self, targets: Sequence[Target]) -> None:
        wanted = {t.model: t for t in targets}
        for gone in [m for m in self.results if m not in wanted]:
            del self.results[gone]
        await asyncio.gather(*(self._scrape(target) for target in wanted.values()))

    async def run(self, targets: Callable[[], Sequence[Target]], tick: Callable[[], None] | None = None) -> None:
        """Forever: scrape, then call ``tick`` (the collector's bookkeeping rides on this loop), then sleep."""
        while True:
            started = self._clock()
            try:
                await self.scrape_once(targets())
                if tick is not None:
                    tick()
            except Exception:
                # A bug here must not end the loop: the metrics would freeze silently.
                log.exception("vLLM metrics scrape failed", extra={"event": "metrics_scrape_crashed"})
            await asyncio.sleep(max(0.0, self.interval - (self._clock() - started)))

    async def _scrape(self, target: Target) -> None:
        entry = self.results.get(target.model)
        if entry is None or entry.target.port != target.port:
            entry = self.results[target.model] = ChildScrape(target)
        entry.target = target
        async with self._gate:
            started = self._clock()
            try:
                text = await self._fetch(target.port, self.timeout)
                selected = select_lines(text, SOURCE_LOOKUP)
                unchanged = entry.up and entry.rendered_for == target and selected == entry.raw
                if not unchanged:
                    if len(entry.label_cache) > CACHE_LIMIT:
                        entry.label_cache.clear()
                    families = select_families(parse_lines(selected, SOURCE_LOOKUP, SOURCE_KINDS, entry.label_cache))
            except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
                # ExpositionError is a ValueError: a child that writes garbage counts as unreadable.
                entry.duration = self._clock() - started
                entry.up, entry.families, entry.lines, entry.raw, entry.error = False, {}, {}, [], _describe(exc)
                entry.failures += 1
                entry.consecutive_failures += 1
                if entry.consecutive_failures == UNREADABLE_AFTER:
                    # Said once, and only when it lasts: a child that just died (the supervisor reports that) fails
                    # one read on its way out.
                    log.warning(
                        "model %s: cannot read vLLM metrics from port %d: %s",
                        target.model,
                        target.port,
                        entry.error,
                        extra={"event": "vllm_metrics_unreadable", "model": target.model},
                    )
                return
            entry.duration = self._clock() - started
            warned, entry.consecutive_failures = entry.consecutive_failures >= UNREADABLE_AFTER, 0
            if warned:
                log.info(
                    "model %s: vLLM metrics readable again",
                    target.model,
                    extra={"event": "vllm_metrics_readable", "model": target.model},
                )
            if not unchanged:
                if entry.rendered_for != target or len(entry.text_cache) > CACHE_LIMIT:
                    entry.text_cache.clear()
                base = {"model": target.model, "gpu": target.gpu, "partition": target.partition}
                entry.lines = {name: render_lines(f, base, entry.text_cache) for name, f in families.items()}
                entry.families, entry.raw, entry.rendered_for = families, selected, target
            entry.up, entry.error = True, ""
            entry.last_success = self._wall()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ExpositionError):
        return f"not the exposition format ({exc})"
    return str(exc) or type(exc).__name__
