"""More of the stub vLLM engine's observable paths, through the real process.

Every stub here is stopped gracefully (SIGTERM/SIGINT, exit status asserted), never only SIGKILLed: that is part of
what a supervisor observes, and it is also what lets the subprocess's coverage data be written.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared import stub_engine
from tests.test_stub_engine import (
    PYTHON,
    Stub,
    alive,
    children,
    free_port,
    open_stream,
    request,
    sse_events,
    wait_for,
)

Make = Callable[..., Stub]
LABELS = '{engine="0",model_name="tiny"}'
TINY_LABELS = '{engine="0",model_name="tiny-model"}'


def make_stub(tmp: Path, args: list[str], env: dict[str, str] | None = None, *, load: str | None = "0.2") -> Stub:
    """A stub with a hand-written command line (``serve`` plus args), not yet started; host and port are added."""
    port = free_port()
    stub = Stub(tmp, env=env, port=port)
    stub.argv = [PYTHON, "-m", "gpushared.stub_engine", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    if load is not None:
        stub.argv += ["--stub-load-seconds", load]
    return stub


def stop(stub: Stub, sig: int = signal.SIGTERM) -> int:
    assert stub.proc is not None
    if stub.proc.poll() is None:
        stub.proc.send_signal(sig)
    return stub.wait_exit()


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Make]:
    started: list[Stub] = []

    def make(*args: str, env: dict[str, str] | None = None, load: str | None = "0.2") -> Stub:
        stub = make_stub(tmp_path, list(args), env, load=load).start()
        started.append(stub)
        return stub

    yield make
    for stub in started:
        stub.kill_all()


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    """A ready stub in dev mode with sleep mode, request logging and a few start-up quirks."""
    tmp = tmp_path_factory.mktemp("dev")
    args = ["--model=org/tiny", "--served-model-name", "tiny", "alias", "--max-model-len", "64"]
    args += ["--enable-sleep-mode", "--enable-log-requests", "--stub-token-seconds", "0.002"]
    args += ["--stub-device-total-bytes", "96G"]
    env = {
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_USE_V1": "1",
        "HIP_VISIBLE_DEVICES": "1",
        "VLLM_LOG_STATS_INTERVAL": "often",
        "GPUSHARE_STUB_RECORD_FILE": str(tmp / "record.jsonl"),
    }
    stub = make_stub(tmp, args, env).start()
    try:
        yield stub.wait_ready()
        assert stop(stub) == 0, stub.log()
    finally:
        stub.kill_all()


def error_of(response: tuple[int, dict[str, str], bytes]) -> tuple[int, dict[str, Any]]:
    status, _, body = response
    error: dict[str, Any] = json.loads(body)["error"]
    assert error["code"] == status
    return status, error


def raw_exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes on a fresh connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def ask(conn: http.client.HTTPConnection, method: str, path: str) -> int:
    """One more request on an existing (kept-alive) connection; its status."""
    conn.request(method, path)
    with conn.getresponse() as response:
        response.read()
        return response.status


def dechunk(body: bytes) -> bytes:
    """The payload of a complete HTTP/1.1 chunked body."""
    out = b""
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]


def metric(stub: Stub, key: str) -> float:
    body = request(stub.port, "GET", "/metrics")[2].decode()
    for line in body.splitlines():
        if line.startswith(key + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{key} not in /metrics")


# ---------------------------------------------------------------------------------------------------------------
# Start-up: command line and environment


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        ([], {"GPUSHARE_STUB_LOAD_SECONDS": "soon"}, "GPUSHARE_STUB_LOAD_SECONDS: not a number: 'soon'"),
        (["--stub-token-seconds", "-1"], {}, "--stub-token-seconds / GPUSHARE_STUB_TOKEN_SECONDS must be >= 0"),
        ([], {"GPUSHARE_STUB_DEVICE_FREE_BYTES": "lots"}, "GPUSHARE_STUB_DEVICE_FREE_BYTES: not a size: 'lots'"),
        ([], {"GPUSHARE_STUB_IGNORE_SIGTERM": "maybe"}, "GPUSHARE_STUB_IGNORE_SIGTERM: expected 1 or 0, got 'maybe'"),
        ([], {"GPUSHARE_STUB_DIE_EXIT_CODE": "x"}, "GPUSHARE_STUB_DIE_EXIT_CODE: not an integer: 'x'"),
    ],
)
def test_bad_stub_settings_exit_2_with_usage(launch: Make, args: list[str], env: dict[str, str], message: str) -> None:
    stub = launch("tiny-model", *args, env=env, load=None)  # the flag would win over GPUSHARE_STUB_LOAD_SECONDS
    assert stub.wait_exit() == 2
    log = stub.log()
    assert "usage: vllm serve [model_tag] [options]" in log
    assert f"vllm serve: error: {message}" in log
    assert "EngineCore" not in log


def test_served_model_name_before_the_model_exits_1(launch: Make) -> None:
    stub = launch("--served-model-name", "x")
    assert stub.wait_exit() == 1
    log = stub.log()
    assert "ValueError: `model` should be provided as the first positional argument" in log
    assert "Traceback (most recent call last):" in log
    assert "EngineCore" not in log


def test_start_up_log_and_record(dev: Stub) -> None:
    log = dev.log()
    assert "The `--model` option will be removed in a future version." in log
    assert "Unknown vLLM environment variable detected: VLLM_USE_V1" in log
    assert "model   org/tiny" in log
    for route in ("/sleep", "/wake_up", "/is_sleeping", "/reset_prefix_cache"):
        assert f"Route: {route}, Methods:" in log
    record = dev.start_record()
    assert (record["HIP_VISIBLE_DEVICES"], record["CUDA_VISIBLE_DEVICES"]) == ("1", None)
    record_file = Path(dev.env["GPUSHARE_STUB_RECORD_FILE"])
    assert json.loads(record_file.read_text().splitlines()[0]) == record
    models = json.loads(request(dev.port, "GET", "/v1/models")[2])["data"]
    assert [(m["id"], m["root"]) for m in models] == [("tiny", "org/tiny"), ("alias", "org/tiny")]


# ---------------------------------------------------------------------------------------------------------------
# Endpoints


def test_tokenize_and_detokenize(dev: Stub) -> None:
    messages = [{"role": "user", "content": [{"type": "text", "text": "two words"}, "ignored"]}]
    status, _, body = request(dev.port, "POST", "/tokenize", {"model": "alias", "messages": messages})
    assert status == 200
    tokenized = json.loads(body)
    assert tokenized["count"] == 3  # two words plus the role marker
    assert tokenized["max_model_len"] == 64
    assert tokenized["token_strs"] is None

    status, _, body = request(dev.port, "POST", "/detokenize", {"tokens": tokenized["tokens"]})
    assert status == 200
    assert len(json.loads(body)["prompt"].split()) == 3

    status, error = error_of(request(dev.port, "POST", "/detokenize", {"tokens": "abc"}))
    assert (status, error["type"], error["param"]) == (400, "Bad Request", "body.tokens")
    status, error = error_of(request(dev.port, "POST", "/tokenize", {"model": "other", "prompt": "x"}))
    assert (status, error["type"]) == (404, "NotFoundError")
    status, error = error_of(request(dev.port, "POST", "/tokenize", {"messages": ["not a message"]}))
    assert (status, error["param"]) == (400, "body.messages")
    assert "dict_type" in error["message"]


def test_sleep_routes_in_dev_mode(dev: Stub) -> None:
    sleep_state = 'vllm:engine_sleep_state{engine="0",model_name="tiny",sleep_state="%s"}'
    assert json.loads(request(dev.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": False}
    status, error = error_of(request(dev.port, "POST", "/sleep?level=3"))
    assert (status, error["param"]) == (400, "level")
    status, _, body = request(dev.port, "POST", "/sleep?level=2")
    assert (status, json.loads(body)) == (200, {"status": "sleeping", "level": 2})
    try:
        assert json.loads(request(dev.port, "GET", "/is_sleeping")[2]) == {"is_sleeping": True}
        assert metric(dev, sleep_state % "awake") == 0
        assert metric(dev, sleep_state % "discard_all") == 1
        assert metric(dev, f"vllm:kv_cache_usage_perc{LABELS}") == 0
    finally:
        status, _, body = request(dev.port, "POST", "/wake_up?tags=weights")
    assert (status, json.loads(body)) == (200, {"status": "awake", "tags": ["weights"]})
    assert metric(dev, sleep_state % "awake") == 1
    status, headers, body = request(dev.port, "POST", "/reset_prefix_cache")
    assert (status, body, headers["content-length"]) == (200, b"", "0")


@pytest.mark.parametrize(
    ("payload", "param", "kind"),
    [
        ({"prompt": "x", "n": "2"}, "body.n", "int_type"),
        ({"prompt": "x", "n": 0}, "body.n", "greater_than_equal"),
        ({"prompt": 5}, "body.prompt", "string_type"),
        ({"max_tokens": 1}, "body.prompt", "missing"),
        ({"prompt": []}, "body.prompt", "string_type"),
        ([1, 2], "body", "model_attributes_type"),
    ],
)
def test_completion_validation_errors(dev: Stub, payload: Any, param: str, kind: str) -> None:
    status, error = error_of(request(dev.port, "POST", "/v1/completions", payload))
    assert (status, error["type"], error["param"]) == (400, "Bad Request", param)
    assert error["message"].startswith("1 validation error:")
    assert kind in error["message"]


def test_prompt_lists_and_context_length(dev: Stub) -> None:
    status, _, body = request(dev.port, "POST", "/v1/completions", {"prompt": [11, 12, 13], "max_tokens": 2})
    assert status == 200, body
    assert json.loads(body)["usage"]["prompt_tokens"] == 3
    status, _, body = request(dev.port, "POST", "/v1/completions", {"prompt": ["a b", "c d e"], "max_tokens": 2})
    assert status == 200, body
    batch = json.loads(body)
    assert [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["usage"]["prompt_tokens"] == 5
    assert batch["usage"]["completion_tokens"] == 4

    long_prompt = " ".join(["word"] * 60)
    status, error = error_of(request(dev.port, "POST", "/v1/completions", {"prompt": long_prompt}))
    assert (status, error["type"], error["param"]) == (400, "BadRequestError", "max_tokens")
    assert error["message"].startswith("This model's maximum context length is 64 tokens. However, you requested 16")


def test_chat_with_n_choices(dev: Stub) -> None:
    payload = {"messages": [{"role": "user", "content": "pick two"}], "n": 2}
    status, _, body = request(dev.port, "POST", "/v1/chat/completions", payload)
    assert status == 200, body
    response = json.loads(body)
    choices = response["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    assert all(c["finish_reason"] == "stop" for c in choices)
    lengths = [len(c["message"]["content"].split()) for c in choices]
    assert lengths[0] != lengths[1]  # the choices end on their own at different lengths
    usage = response["usage"]
    assert usage["completion_tokens"] == sum(lengths)
    assert usage["total_tokens"] == usage["prompt_tokens"] + sum(lengths)
    assert "Received request chatcmpl-" in dev.log()
    assert "n=2, stream=False" in dev.log()


def test_chat_stream_with_continuous_usage(dev: Stub) -> None:
    payload = {
        "messages": [{"role": "user", "content": "count"}],
        "max_completion_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    status, _, body = request(dev.port, "POST", "/v1/chat/completions", payload)
    assert status == 200
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c for c in chunks)
    assert chunks[0]["usage"]["completion_tokens"] == 0
    assert [c["usage"]["completion_tokens"] for c in chunks[1:4]] == [1, 2, 3]
    assert chunks[3]["choices"][0]["finish_reason"] == "length"
    assert chunks[3]["choices"][0]["stop_reason"] is None
    assert chunks[-1]["choices"] == []


def test_http_1_0_stream_is_not_chunked(dev: Stub) -> None:
    body = json.dumps({"prompt": "a b", "max_tokens": 2, "stream": True}).encode()
    head = f"POST /v1/completions HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    raw = raw_exchange(dev.port, head.encode() + body)  # returns once the server closes the connection
    headers, _, payload = raw.partition(b"\r\n\r\n")
    assert headers.startswith(b"HTTP/1.1 200 OK")
    assert b"transfer-encoding" not in headers.lower()  # an HTTP/1.0 client gets the body up to the close
    assert sse_events(payload)[-1] == "[DONE]"


def test_request_body_framing(dev: Stub) -> None:
    body = b'{"prompt": "a b c"}'
    chunked = b"%x\r\n%s\r\n%x;ext=1\r\n%s\r\n0\r\nX-Trailer: 1\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:])
    head = b"POST /tokenize HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status_line, _, rest = raw_exchange(dev.port, head + chunked).partition(b"\r\n")
    assert status_line == b"HTTP/1.1 200 OK"
    assert json.loads(rest.partition(b"\r\n\r\n")[2])["count"] == 3

    for bad in (b"Content-Length: many\r\n\r\n", b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"):
        raw = raw_exchange(dev.port, b"POST /tokenize HTTP/1.1\r\nHost: x\r\n" + bad)
        assert raw.startswith(b"HTTP/1.1 400 ")
        assert json.loads(raw.partition(b"\r\n\r\n")[2]) == {"detail": "Invalid HTTP request body framing"}


def test_other_methods(dev: Stub) -> None:
    for method in ("PUT", "DELETE", "PATCH", "OPTIONS"):
        status, headers, body = request(dev.port, method, "/v1/models")
        assert (status, json.loads(body), headers["allow"]) == (405, {"detail": "Method Not Allowed"}, "GET")
    status, headers, body = request(dev.port, "HEAD", "/version")
    assert (status, headers["allow"], body) == (405, "GET", b"")
    raw = raw_exchange(dev.port, b"BREW /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 501 ")
    assert '"BREW /health HTTP/1.1" 501 Not Implemented' in dev.log()


def test_idle_keep_alive_connection_is_closed_at_shutdown(launch: Make) -> None:
    stub = launch("tiny-model", "--shutdown-timeout", "30", "--stub-token-seconds", "0.02").wait_ready()
    idle = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    busy = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    try:
        idle.request("GET", "/version")
        with idle.getresponse() as response:
            assert (response.status, response.getheader("connection")) == (200, None)  # kept alive
            response.read()
        payload = json.dumps({"prompt": "drain me", "max_tokens": 40, "ignore_eos": True})
        busy.request("POST", "/v1/completions", body=payload, headers={"Content-Type": "application/json"})
        wait_for(lambda: metric(stub, f"vllm:num_requests_running{TINY_LABELS}") == 1, "a running request")
        assert stub.proc is not None
        stub.proc.send_signal(signal.SIGTERM)
        # Drain mode: the running request still completes in full...
        with busy.getresponse() as response:
            assert response.status == 200
            done = json.loads(response.read())
        assert done["choices"][0]["finish_reason"] == "length"
        assert done["usage"]["completion_tokens"] == 40
        # ...while the idle connection was closed, and a new request on the busy one is not answered.
        assert idle.sock is not None
        assert idle.sock.recv(1) == b""
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            ask(busy, "GET", "/version")
    finally:
        idle.close()
        busy.close()
    assert stub.wait_exit() == 0, stub.log()
    assert "stopping engine client mode=drain timeout=30s" in stub.log()


# ---------------------------------------------------------------------------------------------------------------
# Options that change what is exposed


def test_api_key_no_stats_no_access_log_no_sleep_mode(launch: Make, tmp_path: Path) -> None:
    env = {"VLLM_SERVER_DEV_MODE": "1", "CUDA_VISIBLE_DEVICES": "0", "GPUSHARE_STUB_RECORD_FILE": str(tmp_path)}
    stub = launch("tiny-model", "--api-key", "k", "--disable-log-stats", "--disable-uvicorn-access-log", env=env)
    stub.wait_ready()
    assert request(stub.port, "GET", "/v1/models")[0] == 401
    assert request(stub.port, "GET", "/v1/models", headers={"Authorization": "Bearer k"})[0] == 200
    status, _, body = request(stub.port, "OPTIONS", "/v1/models")  # CORS preflight is never guarded
    assert (status, json.loads(body)) == (405, {"detail": "Method Not Allowed"})
    status, error = error_of(request(stub.port, "POST", "/sleep"))
    assert (status, error["type"]) == (400, "BadRequestError")
    assert error["message"] == "Sleep mode is not enabled. Start the server with --enable-sleep-mode."
    metrics = request(stub.port, "GET", "/metrics")[2].decode()
    assert "vllm:" not in metrics
    assert 'http_requests_total{handler="/v1/models",method="GET",status="2xx"} 1.0' in metrics
    assert stop(stub) == 0, stub.log()
    log = stub.log()
    assert f"gpushare stub: cannot append to {tmp_path}" in log
    assert "gpushare stub: --disable-log-stats, no vllm:* metrics" in log
    assert '"GET /v1/models HTTP/1.1"' not in log
    assert stub.start_record()["CUDA_VISIBLE_DEVICES"] == "0"


def test_default_kv_cache_size_follows_device_and_utilization(launch: Make) -> None:
    stub = launch("tiny-model", "--gpu-memory-utilization", "0.5", "--stub-device-total-bytes", "64G")
    stub.wait_ready()
    body = request(stub.port, "GET", "/metrics")[2].decode()
    info = next(line for line in body.splitlines() if line.startswith("vllm:cache_config_info{"))
    # Half of this instance's 32 GiB share, in 16-token blocks of 128 KiB per token.
    assert 'num_gpu_blocks="8192"' in info
    assert 'kv_cache_memory_bytes="None"' in info
    assert stop(stub) == 0, stub.log()


# ---------------------------------------------------------------------------------------------------------------
# Engine death, aborts and signals


def test_engine_death_fails_running_and_queued_requests_and_keep_alive(launch: Make) -> None:
    env = {"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1", "GPUSHARE_STUB_ENGINE_DEATH_GRACE": "0"}
    stub = launch("tiny-model", "--max-num-seqs", "1", "--stub-token-seconds", "0.02", env=env).wait_ready()
    engine = stub.engine()
    labels = TINY_LABELS
    stream, received = open_stream(stub.port, {"prompt": "a", "max_tokens": 1000, "ignore_eos": True, "stream": True})
    queued = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    try:
        queued.request("POST", "/v1/completions", body=json.dumps({"prompt": "b"}))
        wait_for(lambda: metric(stub, f"vllm:num_requests_waiting{labels}") == 1, "a queued request")
        os.kill(engine, signal.SIGKILL)
        with queued.getresponse() as response:
            status, body = response.status, json.loads(response.read())
        assert (status, body["error"]["type"]) == (500, "InternalServerError")
        assert body["error"]["message"] == stub_engine.ENGINE_DEAD_MESSAGE
        while not received.endswith(b"\r\n0\r\n\r\n"):  # the last chunk of the chunked body
            chunk = stream.recv(65536)
            assert chunk, received
            received += chunk
    finally:
        queued.close()
        stream.close()
    # The running stream ends with an error event and [DONE].
    events = sse_events(dechunk(received.partition(b"\r\n\r\n")[2]))
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2]) == {
        "error": {"message": stub_engine.ENGINE_DEAD_MESSAGE, "type": "InternalServerError", "param": None, "code": 500}
    }
    # Grace 0 would exit at once; VLLM_KEEP_ALIVE_ON_ENGINE_DEATH keeps the server up and reporting 503.
    stub.wait_log("Engine core proc EngineCore died unexpectedly")
    assert stub.health() == 503
    assert stub.proc is not None
    assert stub.proc.poll() is None
    error = 'vllm:request_success_total{engine="0",finished_reason="error",model_name="tiny-model"}'
    assert metric(stub, error) == 2
    assert not alive(engine)
    assert stop(stub) == 0, stub.log()


def test_sigterm_aborts_a_non_streaming_request(launch: Make) -> None:
    stub = launch("tiny-model", "--stub-token-seconds", "0.05").wait_ready()
    labels = TINY_LABELS
    conn = http.client.HTTPConnection("127.0.0.1", stub.port, timeout=10)
    try:
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "x", "max_tokens": 500, "ignore_eos": 1}))
        wait_for(lambda: metric(stub, f"vllm:num_requests_running{labels}") == 1, "a running request")
        assert stub.proc is not None
        stub.proc.send_signal(signal.SIGTERM)
        stub.wait_log("Waiting for connections to close.")
        # Aborted: no answer at all, and the process waits for this client to hang up.
        assert conn.sock is not None
        conn.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            conn.sock.recv(1)
        assert stub.proc.poll() is None
    finally:
        conn.close()
    assert stub.wait_exit() == 0, stub.log()
    assert "stopping engine client mode=abort timeout=0s" in stub.log()


def test_engine_ignoring_sigterm_is_force_killed(launch: Make) -> None:
    env = {"GPUSHARE_STUB_IGNORE_SIGTERM": "1", "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS": "0.2"}
    stub = launch("tiny-model", "-tp", "2", env=env).wait_ready()
    engine = stub.engine()
    wait_for(lambda: len(children(engine)) == 2, "two TP workers")
    workers = [pid for pid, _ in children(engine)]
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    stub.wait_log("ignoring SIGTERM")
    assert stub.health() == 200
    assert stop(stub, signal.SIGINT) == 0, stub.log()  # SIGINT is never ignored
    log = stub.log()
    assert "force killing remaining process EngineCore" in log
    assert "Application shutdown complete." in log
    # The workers notice EngineCore is gone (their death pipe closes) and exit too.
    wait_for(lambda: not any(alive(pid) for pid in (engine, *workers)), "the engine and its workers to exit")


# ---------------------------------------------------------------------------------------------------------------
# Pure helpers the real process only reaches in its EngineCore child (which exits with os._exit).


def test_engine_init_error_texts() -> None:
    def settings(*args: str, **env: str) -> stub_engine.Settings:
        with pytest.MonkeyPatch.context() as mp:
            for name, value in env.items():
                mp.setenv(name, value)
            return stub_engine.settings_from_args(stub_engine.parse_serve_args(["serve", "m", *args])[0])

    assert stub_engine._engine_init_error(settings()) is None
    fits = settings("--gpu-memory-utilization", "0.5", "--stub-device-free-bytes", "96G")
    assert stub_engine._engine_init_error(fits) is None
    short = settings("--gpu-memory-utilization", "0.5", "--stub-device-free-bytes", "95G")
    assert stub_engine._engine_init_error(short) == (
        "ValueError: Free memory on device cuda:0 (95.00/192.00 GiB) on startup is less than desired GPU memory "
        "utilization (0.5, 96.00 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes."
    )
    memory = stub_engine._engine_init_error(settings("--stub-fail-start", "memory"))
    assert memory is not None
    assert memory.startswith("ValueError: Free memory on device cuda:0 (88.32/192.00 GiB)")
    blocks = stub_engine._engine_init_error(settings(GPUSHARE_STUB_FAIL_START="cache-blocks"))
    assert blocks is not None
    assert blocks.startswith("ValueError: No available memory for the cache blocks.")
    oom = stub_engine._engine_init_error(settings("--stub-fail-start", "oom", "--stub-device-total-bytes", "64G"))
    assert oom == (
        "torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
        "64.00 GiB of which 0.64 GiB is free."
    )
    assert stub_engine._go_float(float("nan")) == "NaN"
