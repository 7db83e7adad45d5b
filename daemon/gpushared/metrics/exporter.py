"""The metrics endpoint: an HTTP listener on the daemon's event loop, and the background tasks that keep the
exporter's caches fresh (children's vLLM metrics, per-partition VRAM and sensor telemetry).

Why on the event loop and not prometheus_client's threaded server: the collector reads the services, which only
the loop thread mutates; read from another thread, ModelService's dict could change size mid-iteration and a
HostView could pair one inventory with another ledger. On the loop a scrape sees one consistent state, like an API
call, with no locks added to the services. Only the encoding and compression of the already-collected families run in
a worker thread, so a scrape holds the loop for the collection alone (about 2 ms with 16 models).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
from http import HTTPStatus

from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import CollectorRegistry

from gpushared.domain.model_state import RestartPolicy
from gpushared.metrics.collector import GpushareCollector
from gpushared.metrics.exposition import encode
from gpushared.metrics.hardware import HardwarePoller
from gpushared.metrics.hooks import DaemonMetrics
from gpushared.metrics.settings import MetricsConfig
from gpushared.metrics.source import HardwareReader, MetricsSource
from gpushared.metrics.vllm import VllmScraper

log = logging.getLogger("gpushared.metrics")

REQUEST_TIMEOUT = 10.0
"""Seconds a client has to send its request line and headers; Prometheus sends them at once."""
RESPONSE_TIMEOUT = 30.0
MAX_HEADERS = 64
MAX_CONNECTIONS = 16
LANDING = b"<html><head><title>gpushared</title></head><body><a href='/metrics'>/metrics</a></body></html>\n"


class MetricsExporter:
    """Serves /metrics and runs the caches' refresh tasks between ``start`` and ``stop``."""

    def __init__(
        self,
        metrics: DaemonMetrics,
        source: MetricsSource,
        *,
        hardware: HardwareReader | None = None,
        settings: MetricsConfig | None = None,
        restart_policy: RestartPolicy | None = None,
        process_metrics: bool = True,
    ) -> None:
        """``hardware`` is normally the GpuBackend: per-partition VRAM comes from its process lists, and sensor
        telemetry too when it implements TelemetryReader. ``settings`` gives the refresh intervals (its ``listen``
        is for the caller, who passes it to ``start``). ``restart_policy`` is the supervisors' (its crash-loop
        window). ``process_metrics`` adds process_* (the daemon's own CPU and memory) and python_gc_*."""
        settings = settings or MetricsConfig()
        self.metrics = metrics
        self.source = source
        self.scraper = VllmScraper(interval=settings.vllm_scrape_interval, timeout=settings.vllm_scrape_timeout)
        self.hardware = HardwarePoller(hardware, interval=settings.hardware_interval) if hardware is not None else None
        self.collector = GpushareCollector(
            source, metrics, scraper=self.scraper, hardware=self.hardware, restart_policy=restart_policy
        )
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        if process_metrics:
            ProcessCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._render_lock = asyncio.Lock()
        self._connections = 0
        self.address: tuple[str, int] | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen and start the refresh tasks; returns the bound (host, port) (port 0 picks a free one).
        Raises OSError when the address cannot be bound."""
        self._server = await asyncio.start_server(self._client, host, port)
        sockname = self._server.sockets[0].getsockname()
        self.address = (str(sockname[0]), int(sockname[1]))
        self._tasks.append(
            asyncio.create_task(
                self.scraper.run(self.collector.targets, self.collector.track), name="metrics: vLLM scrape"
            )
        )
        if self.hardware is not None:
            gpus = lambda: [g.index for g in self.source.host_view().inventory.gpus]  # noqa: E731
            self._tasks.append(
                asyncio.create_task(self.hardware.run(gpus, self.source.operation_running), name="metrics: hardware")
            )
        log.info(
            "metrics on http://%s/metrics",
            _hostport(*self.address),
            extra={"event": "metrics_listening", "address": _hostport(*self.address)},
        )
        return self.address

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5.0)
            self._server = None

    async def render(self, accept: str = "", accept_encoding: str = "") -> tuple[bytes, dict[str, str]]:
        """The exposition for an Accept header (OpenMetrics when asked for it, else text 0.0.4) and its headers."""
        # prometheus_client negotiates the format (OpenMetrics when asked for, else text 0.0.4); exposition.py
        # encodes it, several times faster than prometheus_client's encoders.
        _, content_type = choose_encoder(accept)
        openmetrics = content_type.startswith("application/openmetrics-text")
        async with self._render_lock:
            # One collection at a time: two scrapers at once wait for each other instead of doubling the work.
            families = list(self.registry.collect())
            # The vLLM families are most of the samples; their lines were rendered when each child was read.
            vllm = self.collector.vllm_text(openmetrics=openmetrics)
        compress = "gzip" in accept_encoding.lower()

        def encode_all() -> bytes:
            text = encode(families, openmetrics=openmetrics) + vllm + ("# EOF\n" if openmetrics else "")
            # Level 1: a tenth of the bytes for a fraction of the CPU of gzip's default 9.
            return gzip.compress(text.encode(), compresslevel=1) if compress else text.encode()

        body = await asyncio.to_thread(encode_all)
        headers = {"Content-Type": content_type}
        if compress:
            headers["Content-Encoding"] = "gzip"
        return body, headers

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                await self._respond(writer, HTTPStatus.SERVICE_UNAVAILABLE, b"too many connections\n", {}, head=False)
                return
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    method, path, headers = await _read_request(reader)
            except (ValueError, asyncio.IncompleteReadError) as exc:
                await self._respond(writer, HTTPStatus.BAD_REQUEST, f"{exc}\n".encode(), {}, head=False)
                return
            head = method == "HEAD"
            if method not in ("GET", "HEAD"):
                await self._respond(writer, HTTPStatus.METHOD_NOT_ALLOWED, b"GET only\n", {"Allow": "GET, HEAD"}, head)
            elif path == "/metrics":
                body, extra = await self.render(headers.get("accept", ""), headers.get("accept-encoding", ""))
                await self._respond(writer, HTTPStatus.OK, body, extra, head)
            elif path == "/":
                await self._respond(writer, HTTPStatus.OK, LANDING, {"Content-Type": "text/html"}, head)
            else:
                await self._respond(writer, HTTPStatus.NOT_FOUND, b"not found; try /metrics\n", {}, head)
        except (TimeoutError, ConnectionError):
            pass  # a client that hangs up or stalls; nothing to tell it
        except Exception:
            log.exception("metrics: scrape failed", extra={"event": "metrics_scrape_failed"})
            with contextlib.suppress(Exception):
                await self._respond(
                    writer, HTTPStatus.INTERNAL_SERVER_ERROR, b"internal error; see the log\n", {}, False
                )
        finally:
            self._connections -= 1
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter, status: HTTPStatus, body: bytes, headers: dict[str, str], head: bool
    ) -> None:
        lines = [f"HTTP/1.1 {status.value} {status.phrase}", f"Content-Length: {len(body)}", "Connection: close"]
        headers = {"Content-Type": "text/plain; charset=utf-8", **headers}
        lines += [f"{k}: {v}" for k, v in headers.items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (b"" if head else body))
        async with asyncio.timeout(RESPONSE_TIMEOUT):
            await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    request = (await reader.readline()).decode("latin-1").split()
    if len(request) != 3 or not request[2].startswith("HTTP/"):
        raise ValueError("not an HTTP request")
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS):
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            method, target, _ = request
            return method, target.split("?", 1)[0], headers
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    raise ValueError("too many header lines")


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
