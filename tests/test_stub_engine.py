"""The stub vLLM engine as a real child process: readiness, endpoints, metrics, process tree, signals, faults."""

from __future__ import annotations

import argparse
import contextlib
import errno
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpushared import stub_engine
from tests.conftest import free_port, wait_for

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
# Variables the stub reads; a developer's shell must not leak them into these tests.
_SCRUB = ("VLLM_API_KEY", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "VLLM_SERVER_DEV_MODE")


def proc_stat(pid: int) -> tuple[str, str, int, int] | None:
    """(comm, state, ppid, pgrp) of a process, or None if it no longer exists."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    comm = text[text.index("(") + 1 : text.rindex(")")]
    fields = text[text.rindex(")") + 2 :].split()
    return comm, fields[0], int(fields[1]), int(fields[2])


def comm(pid: int) -> str:
    stat = proc_stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat[0]


def alive(pid: int) -> bool:
    stat = proc_stat(pid)
    return stat is not None and stat[1] not in ("Z", "X")


def children(pid: int) -> list[tuple[int, str]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := proc_stat(int(entry))) is not None and stat[2] == pid and alive(int(entry)):
            found.append((int(entry), stat[0]))
    return found


def request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if isinstance(body, dict | list) else body
        all_headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers={**all_headers, **(headers or {})})
        response = conn.getresponse()
        try:
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        finally:
            response.close()
    finally:
        conn.close()


def open_stream(port: int, payload: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """A raw streaming request, read up to its first SSE event, so a test controls when the client hangs up."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    body = json.dumps(payload)
    sock.sendall(
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        if not chunk:
            sock.close()
            raise AssertionError(f"stream ended early: {received!r}")
        received += chunk
    return sock, received


def sse_events(raw: bytes) -> list[str]:
    events = [part for part in raw.decode().split("\n\n") if part]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


class Stub:
    """One stub engine process, started the way gpushared starts vLLM, logging to a file."""

    def __init__(
        self, tmp: Path, *args: str, env: dict[str, str] | None = None, load: str = "0.3", port: int | None = None
    ) -> None:
        self.port = port or free_port()
        self.log_path = tmp / f"stub-{self.port}.log"
        self.argv = [PYTHON, "-m", "gpushared.stub_engine", "serve", "tiny-model", "--host", "127.0.0.1"]
        self.argv += ["--port", str(self.port), "--stub-load-seconds", load, *args]
        self.env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("GPUSHARE_STUB_")}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "daemon"), os.environ.get("PYTHONPATH")]))
        self.env.update(env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Stub:
        with self.log_path.open("ab") as log:
            # Its own session, so teardown can kill every process of the tree, orphans included.
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 15.0) -> None:
        wait_for(lambda: text in self.log(), f"{text!r} in the log:\n{self.log()}", timeout)

    def health(self, timeout: float = 5.0) -> int | None:
        """The /health status, or None when nothing answers (refused, or reset by a closing listener)."""
        try:
            return request(self.port, "GET", "/health", timeout=timeout)[0]
        except ConnectionError:
            return None

    def refuses(self) -> bool:
        with socket.socket() as probe:
            try:
                probe.connect(("127.0.0.1", self.port))
            except ConnectionRefusedError:
                return True
            return False

    def wait_ready(self, timeout: float = 15.0) -> Stub:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.health() != 200:
            if self.proc.poll() is not None:
                raise AssertionError(f"stub exited {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"stub not ready within {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"stub still running after {timeout}s:\n{self.log()}") from None

    def engine(self) -> int:
        """The EngineCore child's pid."""
        wait_for(lambda: any(c.startswith("VLLM::Engine") for _, c in children(self.pid)), "EngineCore")
        return next(pid for pid, comm in children(self.pid) if comm.startswith("VLLM::Engine"))

    def start_record(self) -> dict[str, Any]:
        line = next(line for line in self.log().splitlines() if "gpushare-stub-engine start " in line)
        record: dict[str, Any] = json.loads(line.split("gpushare-stub-engine start ", 1)[1])
        return record

    def kill_all(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def stubs(tmp_path: Path) -> Iterator[Callable[..., Stub]]:
    started: list[Stub] = []

    def make(*args: str, env: dict[str, str] | None = None, load: str = "0.3", port: int | None = None) -> Stub:
        stub = Stub(tmp_path, *args, env=env, load=load, port=port).start()
        started.append(stub)
        return stub

    yield make
    for stub in started:
        stub.kill_all()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stub]:
    """One ready stub shared by the read-only endpoint tests."""
    args = ["--served-model-name", "tiny", "alias", "--max-model-len", "256", "--max-num-seqs", "4"]
    args += ["--kv-cache-memory-bytes", "64M", "--stub-token-seconds", "0.005"]
    stub = Stub(tmp_path_factory.mktemp("served"), *args).start()
    try:
        yield stub.wait_ready()
        assert stub.proc is not None
        stub.proc.send_signal(signal.SIGTERM)
        assert stub.wait_exit() == 0, stub.log()
    finally:
        stub.kill_all()


# ---------------------------------------------------------------------------------------------------------------
# Command line (in-process: the parser and settings are pure functions)


def test_parser_reads_vllm_spellings() -> None:
    argv = "serve --port=9000 --model org/m --gpu_memory_utilization 0.5 --max-model-len 1k --kv-cache-memory 4G"
    argv += " --served-model-name a b -tp 2 --disable-log-requests --trust-remote --api-key k1 k2 --no-enforce-eager"
    ns, non_default = stub_engine.parse_serve_args(argv.split())
    assert ns.model_tag == "org/m"
    assert ns.port == 9000
    assert ns.gpu_memory_utilization == 0.5
    assert ns.max_model_len == 1000
    assert ns.kv_cache_memory_bytes == 4 * 2**30
    assert ns.served_model_name == ["a", "b"]
    assert ns.tensor_parallel_size == 2
    assert ns.enable_log_requests is False
    assert ns.trust_remote_code is True
    assert ns.api_key == ["k1", "k2"]
    assert non_default["api_key"] == "[REDACTED]"
    settings = stub_engine.settings_from_args(ns)
    assert settings.metric_model_name == "a"
    assert settings.api_keys == ("k1", "k2")


def test_parser_defaults_and_sizes() -> None:
    ns, _ = stub_engine.parse_serve_args(["serve"])
    assert ns.model_tag == "Qwen/Qwen3-0.6B"
    assert ns.port == 8000
    assert ns.gpu_memory_utilization == 0.92
    assert stub_engine.human_readable_int("4g") == 4 * 10**9
    assert stub_engine.human_readable_int("25.6k") == 25600
    assert stub_engine.human_readable_int_or_auto("auto") == -1
    with pytest.raises(argparse.ArgumentTypeError, match="Decimals are not allowed"):
        stub_engine.human_readable_int("1.5G")


@pytest.mark.parametrize(
    "args",
    [
        ["serve", "m", "--no-such-flag"],
        ["serve", "m", "--trust-remote-code=true"],
        ["serve", "m", "--dtype", "int3"],
        ["serve", "m", "--disable-log"],  # ambiguous abbreviation
        ["serve", "--model"],
        ["run", "m"],
    ],
)
def test_parser_errors_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        stub_engine.parse_serve_args(args)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_served_model_name_needs_a_positional_model() -> None:
    with pytest.raises(ValueError, match="should be provided as the first positional argument"):
        stub_engine.parse_serve_args(["serve", "--served-model-name", "x"])


def test_api_key_flag_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert stub_engine.settings_from_args(stub_engine.parse_serve_args(["serve", "m"])[0]).api_keys == ("from-env",)
    ns = stub_engine.parse_serve_args(["serve", "m", "--api-key", "from-flag"])[0]
    assert stub_engine.settings_from_args(ns).api_keys == ("from-flag",)


def test_stub_settings_come_from_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GPUSHARE_STUB_LOAD_SECONDS", "7")
    monkeypatch.setenv("GPUSHARE_STUB_IGNORE_SIGTERM", "1")
    monkeypatch.setenv("GPUSHARE_STUB_DEVICE_FREE_BYTES", "24G")
    settings = stub_engine.settings_from_args(stub_engine.parse_serve_args(["serve", "m"])[0])
    assert (settings.load_seconds, settings.ignore_sigterm, settings.device_free_bytes) == (7.0, True, 24 * 2**30)
    ns = stub_engine.parse_serve_args(["serve", "m", "--stub-load-seconds", "0.5"])[0]
    assert stub_engine.settings_from_args(ns).load_seconds == 0.5
    monkeypatch.setenv("GPUSHARE_STUB_FAIL_START", "bogus")
    with pytest.raises(stub_engine.UsageError):
        stub_engine.settings_from_args(ns)


def test_prometheus_number_format() -> None:
    assert stub_engine._go_float(1) == "1.0"
    assert stub_engine._go_float(0.001) == "0.001"
    assert stub_engine._go_float(1795771229.5) == "1.7957712295e+09"
    assert stub_engine._go_float(float("inf")) == "+Inf"


# ---------------------------------------------------------------------------------------------------------------
# Readiness and the start record


def test_bound_but_refusing_until_loaded_then_serving(stubs: Callable[..., Stub], tmp_path: Path) -> None:
    record_file = tmp_path / "record.jsonl"
    env = {"HIP_VISIBLE_DEVICES": "3", "GPUSHARE_STUB_RECORD_FILE": str(record_file)}
    stub = stubs(env=env, load="1.5")
    stub.wait_log("Initializing a V1 LLM engine")
    # Loading: the port is bound (nobody else can take it) but not listening, so connecting is refused.
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", stub.port))
    with socket.socket() as squatter, pytest.raises(OSError) as exc:
        squatter.bind(("127.0.0.1", stub.port))
    assert exc.value.errno == errno.EADDRINUSE
    assert "Application startup complete." not in stub.log()

    stub.wait_ready()
    status, headers, body = request(stub.port, "GET", "/health")
    assert (status, body, headers.get("content-length")) == (200, b"", "0")
    assert "content-type" not in headers
    log = stub.log()
    assert f"Starting vLLM server on http://127.0.0.1:{stub.port}" in log
    assert "Application startup complete." in log
    assert "Uvicorn running on" not in log

    record = stub.start_record()
    assert record["pid"] == stub.pid
    assert record["uid"] == os.getuid()
    assert record["argv"][1:] == stub.argv[3:]
    assert (record["HIP_VISIBLE_DEVICES"], record["CUDA_VISIBLE_DEVICES"]) == ("3", None)
    assert json.loads(record_file.read_text().splitlines()[0]) == record


def test_uds_and_a_stale_socket_file(stubs: Callable[..., Stub], tmp_path: Path) -> None:
    path = tmp_path / "vllm.sock"
    stub = stubs("--uds", str(path))
    stub.wait_log("Application startup complete.")

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.connect(str(path))

    def health() -> int:
        conn = UnixConnection("localhost", timeout=5)
        try:
            conn.request("GET", "/health")
            with conn.getresponse() as response:
                return response.status
        finally:
            conn.close()

    wait_for(path.exists, "the socket file")
    assert health() == 200
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.wait_exit() == 0
    assert path.exists()  # vLLM never unlinks it...
    second = stubs("--uds", str(path))
    assert second.wait_exit() == 1  # ...so the next start fails on the stale file
    assert "Address already in use" in second.log()


def test_port_clash_surfaces_only_at_listen(stubs: Callable[..., Stub]) -> None:
    slow = stubs(load="2")
    slow.wait_log("Initializing a V1 LLM engine")
    # Both bind with SO_REUSEADDR while neither listens; the second to finish loading loses.
    fast = stubs(port=slow.port).wait_ready()
    assert slow.wait_exit() == 1
    assert "[Errno 98] Address already in use" in slow.log()
    assert fast.health() == 200


def test_port_already_listening_fails(stubs: Callable[..., Stub]) -> None:
    stub = stubs()
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", stub.port))
        holder.listen()
        assert stub.wait_exit() == 1
    assert "[Errno 98] Address already in use" in stub.log()


# ---------------------------------------------------------------------------------------------------------------
# Endpoints


def test_small_endpoints(served: Stub) -> None:
    status, _, body = request(served.port, "GET", "/ping")
    assert (status, body) == (200, b"")
    assert request(served.port, "POST", "/ping")[0] == 200
    assert json.loads(request(served.port, "GET", "/version")[2]) == {"version": stub_engine.VLLM_VERSION}
    assert json.loads(request(served.port, "GET", "/load")[2]) == {"server_load": 0}
    status, _, body = request(served.port, "GET", "/nope")
    assert (status, json.loads(body)) == (404, {"detail": "Not Found"})
    assert request(served.port, "GET", "/v1/completions")[0] == 405
    status, _, body = request(served.port, "POST", "/tokenize", {"prompt": "hello big world"})
    assert status == 200
    assert json.loads(body)["count"] == 3


def test_models(served: Stub) -> None:
    status, headers, body = request(served.port, "GET", "/v1/models")
    assert (status, headers["content-type"]) == (200, "application/json")
    listing = json.loads(body)
    assert listing["object"] == "list"
    assert [m["id"] for m in listing["data"]] == ["tiny", "alias"]
    model = listing["data"][0]
    assert model["object"] == "model"
    assert model["owned_by"] == "vllm"
    assert model["root"] == "tiny-model"
    assert model["parent"] is None
    assert model["max_model_len"] == 256
    assert model["permission"][0]["object"] == "model_permission"


def test_completion(served: Stub) -> None:
    payload = {"model": "alias", "prompt": "hello world", "max_tokens": 5, "temperature": 0}
    status, _, body = request(served.port, "POST", "/v1/completions", payload)
    assert status == 200, body
    response = json.loads(body)
    assert response["id"].startswith("cmpl-")
    assert response["object"] == "text_completion"
    assert response["model"] == "tiny"  # vLLM answers with the first served name
    (choice,) = response["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert choice["text"]
    assert response["usage"] == {
        "prompt_tokens": 2,
        "total_tokens": 7,
        "completion_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }
    again = json.loads(request(served.port, "POST", "/v1/completions", payload)[2])
    assert again["choices"][0]["text"] == choice["text"]  # deterministic


def test_chat_completion(served: Stub) -> None:
    payload = {"messages": [{"role": "user", "content": "say something"}], "max_tokens": 4}
    status, _, body = request(served.port, "POST", "/v1/chat/completions", payload)
    assert status == 200, body
    response = json.loads(body)
    assert response["id"].startswith("chatcmpl-")
    assert response["object"] == "chat.completion"
    (choice,) = response["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert "tool_calls" not in choice["message"]
    assert choice["finish_reason"] == "length"
    usage = response["usage"]
    assert usage["completion_tokens"] == 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + 4
    # Without max_tokens the made-up text ends on its own.
    unbounded = json.loads(request(served.port, "POST", "/v1/chat/completions", {"messages": payload["messages"]})[2])
    assert unbounded["choices"][0]["finish_reason"] == "stop"


def test_request_errors_use_the_nested_shape(served: Stub) -> None:
    cases: list[tuple[Any, str, int, str, str | None]] = [
        ({"model": "nope", "prompt": "x"}, "/v1/completions", 404, "NotFoundError", "model"),
        ({"prompt": "x", "max_tokens": 1000}, "/v1/completions", 400, "BadRequestError", "max_tokens"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "/v1/completions", 400, "BadRequestError", None),
        ({"model": "tiny"}, "/v1/chat/completions", 400, "Bad Request", "body.messages"),
        (b"{not json", "/v1/completions", 400, "Bad Request", None),
    ]
    for payload, path, code, err_type, param in cases:
        status, _, body = request(served.port, "POST", path, payload)
        error = json.loads(body)["error"]
        assert (status, error["code"], error["type"]) == (code, code, err_type), body
        if param is not None:
            assert error["param"] == param
    too_long = json.loads(request(served.port, "POST", "/v1/completions", cases[1][0])[2])["error"]["message"]
    assert too_long.startswith("max_tokens=1000 cannot be greater than max_model_len=256.")


def test_chat_stream_with_usage(served: Stub) -> None:
    payload = {
        "messages": [{"role": "user", "content": "stream please"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    status, headers, body = request(served.port, "POST", "/v1/chat/completions", payload)
    assert status == 200
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(body)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c for c in chunks[1:] if c["choices"]]
    assert len(content) == 3
    assert all("usage" not in c for c in content)
    assert content[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in content[:-1])
    tail = chunks[-1]
    assert tail["choices"] == []
    assert tail["usage"]["completion_tokens"] == 3


def test_completion_stream(served: Stub) -> None:
    payload = {"prompt": "a b c", "max_tokens": 2, "stream": True}
    events = sse_events(request(served.port, "POST", "/v1/completions", payload)[2])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [c["object"] for c in chunks] == ["text_completion"] * 2
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "length"]


# ---------------------------------------------------------------------------------------------------------------
# Metrics


def parse_metrics(text: str) -> tuple[dict[str, str], dict[str, float]]:
    """TYPE per family and value per sample line (name{labels} -> value); fails on a malformed line."""
    types: dict[str, str] = {}
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif line.startswith("# HELP "):
            continue
        else:
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
            name = key.split("{", 1)[0]
            family = next((f for f in types if name == f or name.startswith(f + "_")), None)
            assert family is not None, f"sample before its # TYPE: {line}"
    return types, samples


def scrape(stub: Stub) -> tuple[dict[str, str], dict[str, float]]:
    status, headers, body = request(stub.port, "GET", "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    return parse_metrics(body.decode())


def test_metrics_names_types_and_labels(served: Stub) -> None:
    types, samples = scrape(served)
    expected = {
        "vllm:num_requests_running": "gauge",
        "vllm:num_requests_waiting": "gauge",
        "vllm:kv_cache_usage_perc": "gauge",
        "vllm:prompt_tokens_total": "counter",
        "vllm:generation_tokens_total": "counter",
        "vllm:request_success_total": "counter",
        "vllm:time_to_first_token_seconds": "histogram",
        "vllm:inter_token_latency_seconds": "histogram",
        "vllm:request_time_per_output_token_seconds": "histogram",
        "vllm:e2e_request_latency_seconds": "histogram",
        "vllm:iteration_tokens_total": "histogram",
        "vllm:cache_config_info": "gauge",
    }
    for name, kind in expected.items():
        assert types.get(name) == kind, name
    assert "vllm:gpu_cache_usage_perc" not in types
    assert "vllm:time_per_output_token_seconds" not in types
    labels = '{engine="0",model_name="tiny"}'
    assert f"vllm:num_requests_running{labels}" in samples
    for reason in ("stop", "length", "abort", "error", "repetition"):
        assert f'vllm:request_success_total{{engine="0",finished_reason="{reason}",model_name="tiny"}}' in samples
    ttft = [k for k in samples if k.startswith("vllm:time_to_first_token_seconds_bucket")]
    assert len(ttft) == 23  # 22 bounds + Inf
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",le="2560.0",model_name="tiny"}' in samples


def test_metrics_move_as_requests_are_served(served: Stub) -> None:
    labels = '{engine="0",model_name="tiny"}'
    before = scrape(served)[1]
    payload = {"prompt": "count these four", "max_tokens": 6}
    assert request(served.port, "POST", "/v1/completions", payload)[0] == 200
    after = scrape(served)[1]
    assert after[f"vllm:prompt_tokens_total{labels}"] - before[f"vllm:prompt_tokens_total{labels}"] == 3
    assert after[f"vllm:generation_tokens_total{labels}"] - before[f"vllm:generation_tokens_total{labels}"] == 6
    length = 'vllm:request_success_total{engine="0",finished_reason="length",model_name="tiny"}'
    assert after[length] == before[length] + 1
    for name in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "inter_token_latency_seconds"):
        assert after[f"vllm:{name}_count{labels}"] > before[f"vllm:{name}_count{labels}"]

    # While a long stream is running the gauges show it; hanging up aborts it and they fall back.
    sock, _ = open_stream(served.port, {"prompt": "keep going", "max_tokens": 200, "ignore_eos": True, "stream": True})
    with sock:
        during = scrape(served)[1]
        assert during[f"vllm:num_requests_running{labels}"] == 1
        assert during[f"vllm:kv_cache_usage_perc{labels}"] > 0
    abort = 'vllm:request_success_total{engine="0",finished_reason="abort",model_name="tiny"}'
    wait_for(lambda: scrape(served)[1][abort] == after[abort] + 1, "the abort to be counted")
    assert scrape(served)[1][f"vllm:num_requests_running{labels}"] == 0


# ---------------------------------------------------------------------------------------------------------------
# API key


def test_api_key_guards_only_v1(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--api-key", "flag-key", env={"VLLM_API_KEY": "env-key"}).wait_ready()
    status, _, body = request(stub.port, "GET", "/v1/models")
    assert (status, json.loads(body)) == (401, {"error": "Unauthorized"})
    assert request(stub.port, "GET", "/v1/models", headers={"Authorization": "Bearer env-key"})[0] == 401
    assert request(stub.port, "GET", "/v1/models", headers={"Authorization": "Bearer flag-key"})[0] == 200
    assert request(stub.port, "POST", "/v1/completions", {"prompt": "x"})[0] == 401
    assert request(stub.port, "GET", "/health")[0] == 200
    assert request(stub.port, "GET", "/metrics")[0] == 200
    assert request(stub.port, "POST", "/tokenize", {"prompt": "x"})[0] == 200


def test_api_key_from_environment(stubs: Callable[..., Stub]) -> None:
    stub = stubs(env={"VLLM_API_KEY": "env-key"}).wait_ready()
    assert request(stub.port, "GET", "/v1/models")[0] == 401
    assert request(stub.port, "GET", "/v1/models", headers={"Authorization": "Bearer env-key"})[0] == 200


# ---------------------------------------------------------------------------------------------------------------
# Process tree and signals


def test_sigterm_stops_the_whole_tree_with_status_0(stubs: Callable[..., Stub]) -> None:
    stub = stubs("-tp", "2").wait_ready()
    engine = stub.engine()
    assert comm(engine) == "VLLM::EngineCor"  # "VLLM::EngineCore" cut to the kernel's 15 bytes
    wait_for(lambda: len(children(engine)) == 2, "two TP workers")
    workers = [pid for pid, _ in children(engine)]
    assert all(comm(w).startswith("VLLM::Worker_TP") for w in workers)
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.wait_exit() == 0, stub.log()
    wait_for(lambda: not any(alive(pid) for pid in (engine, *workers)), "the engine and workers to exit")
    log = stub.log()
    for line in (
        "[shutdown] API server: shutdown triggered",
        "INFO:     Shutting down",
        "Application shutdown complete.",
    ):
        assert line in log


def test_sigterm_with_an_open_stream(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--stub-token-seconds", "0.05").wait_ready()
    engine = stub.engine()
    sock, received = open_stream(stub.port, {"prompt": "long", "max_tokens": 1000, "ignore_eos": True, "stream": True})
    try:
        assert stub.proc is not None
        stub.proc.send_signal(signal.SIGTERM)
        # The listener closes and the engine goes at once, but the process waits for this client to hang up.
        wait_for(stub.refuses, "the listener to close")
        wait_for(lambda: not alive(engine), "EngineCore to exit")
        stub.wait_log("Waiting for connections to close.")
        assert stub.proc.poll() is None
        sock.settimeout(0.3)
        with contextlib.suppress(TimeoutError):
            while chunk := sock.recv(65536):
                received += chunk
        assert b"[DONE]" not in received
        assert stub.proc.poll() is None
    finally:
        sock.close()
    assert stub.wait_exit() == 0, stub.log()


def test_sigkill_orphans_the_engine(stubs: Callable[..., Stub]) -> None:
    stub = stubs().wait_ready()
    engine = stub.engine()
    try:
        assert stub.proc is not None
        stub.proc.kill()
        assert stub.wait_exit() == -signal.SIGKILL
        time.sleep(0.3)
        # Nothing tells EngineCore its parent is gone: it lives on, re-parented, until someone kills it.
        assert alive(engine)
        stat = proc_stat(engine)
        assert stat is not None
        assert stat[2] != stub.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engine, signal.SIGKILL)
    wait_for(lambda: not alive(engine), "the orphaned engine to die")


def test_sigterm_during_load_interrupts(stubs: Callable[..., Stub]) -> None:
    stub = stubs(load="30")
    engine = stub.engine()
    stub.wait_log("Initializing a V1 LLM engine")
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.wait_exit() == -signal.SIGINT  # uncaught KeyboardInterrupt("terminated"), as vLLM
    assert "KeyboardInterrupt: terminated" in stub.log()
    assert not alive(engine)


# ---------------------------------------------------------------------------------------------------------------
# Fault injection


@pytest.mark.parametrize(
    ("args", "env", "text"),
    [
        (["--stub-fail-start", "memory"], {}, "ValueError: Free memory on device cuda:0 ("),
        (
            ["--gpu-memory-utilization", "0.5"],
            {"GPUSHARE_STUB_DEVICE_FREE_BYTES": "10G"},
            "ValueError: Free memory on device cuda:0 (10.00/192.00 GiB) on startup is less than desired GPU memory "
            "utilization (0.5, 96.00 GiB). Decrease GPU memory utilization or reduce GPU memory used by other "
            "processes.",
        ),
        ([], {"GPUSHARE_STUB_FAIL_START": "cache-blocks"}, "ValueError: No available memory for the cache blocks."),
        (["--stub-fail-start", "oom"], {}, "torch.OutOfMemoryError: HIP out of memory."),
    ],
)
def test_engine_init_failures_exit_1(
    stubs: Callable[..., Stub], args: list[str], env: dict[str, str], text: str
) -> None:
    stub = stubs(*args, env=env, load="0.1")
    assert stub.wait_exit() == 1, stub.log()
    log = stub.log()
    assert text in log
    assert "(EngineCore pid=" in log
    assert "EngineCore failed to start." in log
    assert "RuntimeError: Engine core initialization failed. See root cause above." in log
    assert "Application startup complete." not in log


@pytest.mark.parametrize(
    ("args", "text"),
    [
        (["--stub-fail-start", "model"], "huggingface_hub.errors.LocalEntryNotFoundError"),
        (["--gpu-memory-utilization", "1.5"], "Input should be less than or equal to 1"),
    ],
)
def test_api_server_failures_exit_1(stubs: Callable[..., Stub], args: list[str], text: str) -> None:
    stub = stubs(*args)
    assert stub.wait_exit() == 1
    assert text in stub.log()
    assert "EngineCore" not in stub.log()


def test_enough_free_memory_passes_the_check(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--gpu-memory-utilization", "0.1", env={"GPUSHARE_STUB_DEVICE_FREE_BYTES": "24G"})
    stub.wait_ready()


def test_die_after(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--stub-die-after", "0.5", env={"GPUSHARE_STUB_DIE_EXIT_CODE": "3"}).wait_ready()
    engine = stub.engine()
    assert stub.wait_exit() == 3
    assert "simulated API server crash" in stub.log()
    assert not alive(engine)


def test_hang_after(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--stub-hang-after", "1").wait_ready()

    def hung() -> bool:
        try:
            request(stub.port, "GET", "/health", timeout=0.3)
        except TimeoutError:
            return True
        return False

    wait_for(hung, "/health to stop answering")
    with socket.create_connection(("127.0.0.1", stub.port), timeout=5):
        pass  # still accepting
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.wait_exit() == 0, stub.log()


def test_stall_after_keeps_health_200_while_completions_never_finish(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--stub-stall-after", "0.3").wait_ready()
    prompt = {"model": "tiny-model", "prompt": "hi", "max_tokens": 1}
    wait_for(lambda: "engine stalled" in stub.log(), "the engine to stall")
    with pytest.raises(TimeoutError):
        request(stub.port, "POST", "/v1/completions", prompt, timeout=1.0)
    assert stub.health() == 200, "a hung engine still says healthy: only a completion notices"
    assert stub.proc is not None
    stub.proc.send_signal(signal.SIGTERM)
    assert stub.wait_exit() == 0, stub.log()


def test_ignore_sigterm(stubs: Callable[..., Stub]) -> None:
    stub = stubs(env={"GPUSHARE_STUB_IGNORE_SIGTERM": "1"}).wait_ready()
    engine = stub.engine()
    os.killpg(stub.pid, signal.SIGTERM)
    wait_for(lambda: stub.log().count("ignoring SIGTERM") >= 2, "both processes to log the ignored SIGTERM")
    assert stub.health() == 200
    assert stub.proc is not None
    assert stub.proc.poll() is None
    assert alive(engine)


def test_engine_death_turns_health_503_then_exits_0(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--stub-engine-death-after", "0.3", "--stub-engine-death-grace", "1.5").wait_ready()
    engine = stub.engine()
    wait_for(lambda: stub.health() == 503, "/health 503")
    status, _, body = request(stub.port, "POST", "/v1/completions", {"prompt": "x"})
    assert status == 500
    assert json.loads(body)["error"]["type"] == "InternalServerError"
    assert stub.wait_exit() == 0, stub.log()
    assert "Engine core proc EngineCore died unexpectedly" in stub.log()
    assert not alive(engine)


def test_engine_killed_from_outside(stubs: Callable[..., Stub]) -> None:
    stub = stubs(env={"GPUSHARE_STUB_ENGINE_DEATH_GRACE": "0.5"}).wait_ready()
    os.kill(stub.engine(), signal.SIGKILL)
    wait_for(lambda: stub.health() in (503, None), "/health 503")
    assert stub.wait_exit() == 0, stub.log()


# ---------------------------------------------------------------------------------------------------------------
# Start-up validation in a real process


def test_unknown_flag_exits_2(stubs: Callable[..., Stub]) -> None:
    stub = stubs("--no-such-flag")
    assert stub.wait_exit() == 2
    assert "unrecognized arguments: --no-such-flag" in stub.log()
    assert "usage:" in stub.log()


def test_inconsistent_visibility_env_exits_1(stubs: Callable[..., Stub]) -> None:
    stub = stubs(env={"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0,1"})
    assert stub.wait_exit() == 1
    assert (
        "ValueError: Inconsistent GPU visibility env vars: HIP_VISIBLE_DEVICES='0' vs CUDA_VISIBLE_DEVICES='0,1'. "
        "Please set only one, or ensure they match." in stub.log()
    )
    record = stub.start_record()
    assert (record["HIP_VISIBLE_DEVICES"], record["CUDA_VISIBLE_DEVICES"]) == ("0", "0,1")
