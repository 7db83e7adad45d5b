"""gpusharectl top: rates and TTFT between two reads by the daemon, the screen of a real daemon, and (once the
exporter and the `top` subcommand are wired) the live figures of a stub model as a gpushare group member sees them."""

from __future__ import annotations

import argparse
import io
import re
import threading
from pathlib import Path

import pytest

from gpusharectl import top
from gpusharectl.client import Client
from gpushared.metrics.text import parse
from tests.conftest import OTHER_UID, Daemon, free_port
from tests.test_metrics import complete
from tests.test_metrics_daemon import metrics_daemon, ok
from tests.test_serving import show


def exposition(at: float, requests: int, under_20ms: int, under_1s: int) -> str:
    """What the daemon serves for one model after reading it at ``at`` (Unix time)."""
    labels = 'engine="0",gpu="2",model="tiny",partition="5"'
    return "\n".join(
        [
            f'gpushare_vllm_scrape_timestamp_seconds{{model="tiny"}} {at}',
            "gpushare_vllm_scrape_interval_seconds 5.0",
            f'gpushare_vllm_request_success_total{{{labels},finished_reason="length"}} {requests}',
            f'gpushare_vllm_request_success_total{{{labels},finished_reason="stop"}} 0',
            f'gpushare_vllm_time_to_first_token_seconds_bucket{{{labels},le="0.02"}} {under_20ms}',
            f'gpushare_vllm_time_to_first_token_seconds_bucket{{{labels},le="1.0"}} {under_1s}',
            f'gpushare_vllm_time_to_first_token_seconds_bucket{{{labels},le="+Inf"}} {under_1s}',
            f"gpushare_vllm_time_to_first_token_seconds_sum{{{labels}}} 1.0",
            f"gpushare_vllm_num_requests_running{{{labels}}} 3",
            f"gpushare_vllm_num_requests_waiting{{{labels}}} 1",
            f"gpushare_vllm_kv_cache_usage_ratio{{{labels}}} 0.5",
            'gpushare_partition_vram_used_bytes{gpu="2",partition="5"} 1073741824',
        ]
    )


def test_rates_and_ttft_come_from_two_reads_of_the_daemon() -> None:
    tracker = top.Tracker()
    first = top.metrics_from(parse(exposition(1000.0, 10, 10, 10), top.WANTED))
    tracker.update(first)
    assert tracker.windows == {}  # one read: no window yet
    tracker.update(first)  # the same read again (top refreshed faster than the daemon reads): still none
    assert tracker.windows == {}
    second = top.metrics_from(parse(exposition(1005.0, 30, 10, 30), top.WANTED))
    tracker.update(second)
    window = tracker.windows["tiny"]
    assert window.rate == pytest.approx(4.0)  # 20 requests in 5 s
    # All 20 new first tokens fell between 20 ms and 1 s: p50 interpolates to the middle of that bucket.
    assert window.ttft_p50 == pytest.approx(0.02 + 0.98 * 0.5)
    assert second.models["tiny"].running == 3 and second.models["tiny"].kv_usage == 0.5
    assert second.partition_vram[("2", "5")] == 1 << 30
    restarted = top.metrics_from(parse(exposition(1010.0, 2, 2, 2), top.WANTED))
    tracker.update(restarted)  # counters went back: the model restarted; no made-up negative rate
    assert "tiny" not in tracker.windows


def test_once_on_a_real_daemon_without_metrics_still_shows_the_layout(daemon: Daemon) -> None:
    ok(daemon.ctl("allocate", "--memory", "40GiB", "--name", "held", "--gpu", "3"))
    out = io.StringIO()
    args = argparse.Namespace(once=True, interval=0.2, metrics_url=f"http://127.0.0.1:{free_port()}/metrics")
    with Client(daemon.socket) as client:
        assert top.main(args, client, out) == 0
    screen = out.getvalue()
    assert "emulated backend, 8 GPUs, 8 partitions (7 free)" in screen
    gpu3 = next(line for line in screen.splitlines() if line.startswith("3 "))
    assert "SPX/NPS1" in gpu3 and "[A]" in gpu3 and "40.0/192.0 GiB" in gpu3
    assert "no models" in screen
    assert re.search(r"metrics: http://127\.0\.0\.1:\d+/metrics: .*refused", screen), screen


@pytest.mark.slow
def test_top_once_shows_a_models_rate_and_ttft_to_a_group_member(tmp_short: Path) -> None:
    with metrics_daemon(tmp_short) as (d, url):
        ok(d.ctl("serve", "stub-org/tiny", "--engine", "stub", "--name", "tiny", "--memory", "8GiB", "--wait"))
        port = int(str(show(d, "tiny")["port"]))
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                complete(port, "stub-org/tiny", tokens=2)

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        try:
            # A plain member of the socket's group (gid 0 here), not root, on a pipe: --once.
            result = d.ctl("top", "--once", "--metrics-url", url, user=OTHER_UID, extra_groups=[0])
        finally:
            stop.set()
            worker.join(30)
        screen = ok(result)
        assert "metrics:" not in screen, screen
        assert column(screen, "tiny", "STATE") == "ready"
        assert float(column(screen, "tiny", "REQ/S")) > 0, screen
        assert re.fullmatch(r"\d+ms", column(screen, "tiny", "TTFT p50")), screen
        assert re.fullmatch(r"\d+ms", column(screen, "tiny", "p99")), screen


def column(screen: str, row_name: str, header: str) -> str:
    """One cell of the models table: from the header's column start to the next column's."""
    lines = screen.splitlines()
    head = next(line for line in lines if line.startswith("MODEL "))
    row = next(line for line in lines if line.startswith(row_name + " "))
    starts = [m.start() for m in re.finditer(r"(?:(?<=  )|^)\S", head)]
    start = head.index(header if header != "p99" else " p99") + (header == "p99")
    end = next((s for s in starts if s > start), len(row))
    return row[start:end].strip()
