"""Stub ``vllm serve``: a stdlib-only stand-in that looks like vLLM 0.33 from the outside (no GPU, no model).

gpushared supervises one ``vllm serve`` child per model. This module lets people try gpushare, and the test suite
supervise a real child process, where no GPU vLLM exists. It reproduces what a supervisor can observe:

- the command line: ``gpushared-stub-engine serve MODEL [flags]`` parsed the way vLLM's ``FlexibleArgumentParser``
  does (``--model`` moved to the front, ``_`` equal to ``-``, prefix abbreviations, ``--no-X`` twins, exit 2 with
  usage on an unknown flag);
- readiness: the socket is bound at once but ``listen()`` is only called after a load delay, so connecting while
  "loading" is refused; ``/health`` is 200 with an empty body afterwards;
- ``/health``, ``/ping``, ``/version``, ``/load``, ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (with
  SSE streaming), ``/tokenize``, ``/detokenize``, ``/metrics`` with vLLM's metric names, types, labels and buckets;
  ``--api-key`` / ``VLLM_API_KEY`` guarding only ``/v1``-style paths;
- the process tree: the API server forks a ``VLLM::EngineCore`` child (plus ``VLLM::Worker_TPk`` grandchildren when
  ``-tp`` > 1) that does not die with its parent, so only a cgroup kill cleans up after a SIGKILL;
- exits: SIGTERM closes the listener, aborts streams without ``[DONE]``, waits for clients to hang up, exits 0;
  engine death turns ``/health`` to 503 and exits 0 a moment later; engine init failures exit 1.

Fault injection uses ``--stub-*`` flags or ``GPUSHARE_STUB_*`` variables (the flag wins); see ``--help``. The first
log line records argv, pid, uid and the GPU-visibility variables (and is appended as JSON to
``$GPUSHARE_STUB_RECORD_FILE`` when set) so tests can see where the supervisor told it to run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import http
import json
import math
import os
import re
import select
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, NoReturn, cast
from urllib.parse import parse_qs, urlsplit

VLLM_VERSION = "0.33.0"
DEFAULT_MODEL = "Qwen/Qwen3-0.6B"
GIB = 1 << 30
# An MI300X in SPX mode; the fake memory check and the KV-cache size are computed against it.
DEFAULT_DEVICE_TOTAL_BYTES = 192 * GIB
DEFAULT_MAX_MODEL_LEN = 4096
BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 128 * 1024
FAIL_KINDS = ("memory", "cache-blocks", "oom", "model")
DTYPES = ("auto", "bfloat16", "float", "float16", "float32", "half")
# Paths the vLLM authentication middleware guards (everything else stays open with --api-key).
AUTH_PREFIXES = ("/v1", "/v2", "/inference", "/cohere")
ENGINE_DEAD_MESSAGE = "EngineCore encountered an issue. See stack trace (above) for the root cause."
STUB_FRAME = '  File "<gpushare-stub-engine>", line 0, in <module>'


# ----------------------------------------------------------------------------------------------------------------
# Output: every line a vLLM process writes carries "(Role pid=N) ", uvicorn's own lines included.


class _Out:
    role = "APIServer"
    lock = threading.Lock()


def _emit(text: str, *, err: bool = False) -> None:
    prefix = f"({_Out.role} pid={os.getpid()}) "
    data = "".join(prefix + line + "\n" for line in (text.splitlines() or [""]))
    stream = sys.stderr if err else sys.stdout
    # A closed or full log pipe must never take the server down with it.
    with _Out.lock, contextlib.suppress(OSError, ValueError):
        stream.write(data)
        stream.flush()


def _log(level: str, where: str, message: str) -> None:
    """One vLLM logger record; vLLM repeats the header on every line of a multi-line message."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    _emit("\n".join(f"{level} {stamp} [{where}] {line}" for line in (message.splitlines() or [""])))


def _uvicorn(message: str, level: str = "INFO", *, access: bool = False) -> None:
    # uvicorn's default config sends its error logger to stderr and its access logger to stdout.
    _emit(f"{level}:{' ' * (8 - len(level))} {message}", err=not access)


def _traceback(exception_line: str, *, header: str = "") -> None:
    """What an uncaught exception looks like on stderr (the stub has no real frames worth showing)."""
    _emit(f"{header}Traceback (most recent call last):\n{STUB_FRAME}\n{exception_line}", err=True)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


def _set_process_name(name: str) -> None:
    """vLLM uses setproctitle; PR_SET_NAME is the stdlib-reachable part (comm, truncated to 15 bytes)."""
    with contextlib.suppress(OSError, AttributeError, TypeError):
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_name = 15
        libc.prctl(pr_set_name, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


# ----------------------------------------------------------------------------------------------------------------
# Command line, as vLLM's FlexibleArgumentParser reads it.


class UsageError(Exception):
    """A bad stub setting (environment variable): reported like an argparse error, exit 2."""


def human_readable_int(value: str) -> int:
    """vLLM's parser for sizes: lower-case suffixes are decimal (4g = 4e9), upper-case binary (4G = 4 GiB)."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match:
        number, suffix = match.groups()
        decimal = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
        binary = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
        if suffix in decimal:
            return int(float(number) * decimal[suffix])
        try:
            return int(number) * binary[suffix]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"Decimals are not allowed with binary suffixes like {suffix}. "
                f"Did you mean to use {number}{suffix.lower()} instead?"
            ) from exc
    return int(value)


def human_readable_int_or_auto(value: str) -> int:
    if value.strip() == "-1" or value.strip().lower() == "auto":
        return -1
    return human_readable_int(value)


class _EnableDisableAction(argparse.Action):
    """``--enable-X`` sets True; ``--disable-X`` (vLLM's negative spelling) sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.pop("nargs", None)
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: str | Sequence[Any] | None,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, bool(option_string and option_string.startswith("--enable-")))


def _build_parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    top = argparse.ArgumentParser(prog="vllm", description="vLLM CLI (gpushare stub engine)")
    top.add_argument("-v", "--version", action="version", version=VLLM_VERSION)
    subparsers = top.add_subparsers(dest="subparser", required=True)
    serve = subparsers.add_parser(
        "serve",
        help="Launch a local OpenAI-compatible API server (gpushare stub: no model, made-up text).",
        description="Stand-in for `vllm serve`: same flags and outside behaviour, no GPU.",
    )
    serve.add_argument("model_tag", nargs="?", default=DEFAULT_MODEL, help="model name or path")
    add = serve.add_argument
    add("--host", default=None)
    add("--port", type=int, default=8000)
    add("--uds", default=None, help="Unix socket path; if set, host and port are ignored")
    add("--served-model-name", nargs="+", default=None)
    add("--gpu-memory-utilization", "--device-memory-utilization", type=float, default=0.92)
    add("--kv-cache-memory-bytes", type=human_readable_int, default=None)
    add("--max-model-len", type=human_readable_int_or_auto, default=None)
    add("--max-num-seqs", type=int, default=None)
    add("--max-num-batched-tokens", type=human_readable_int, default=None)
    add("--tensor-parallel-size", "-tp", type=int, default=1)
    add("--pipeline-parallel-size", "-pp", type=int, default=1)
    add("--data-parallel-size", "-dp", type=int, default=1)
    add("--dtype", choices=DTYPES, default="auto")
    add("--kv-cache-dtype", default="auto")
    add("--quantization", "-q", default=None)
    add("--tokenizer", default=None)
    add("--revision", default=None)
    add("--download-dir", default=None)
    add("--load-format", default="auto")
    add("--seed", type=int, default=0)
    add("--block-size", type=int, default=None)
    add("--cpu-offload-gb", type=float, default=0.0)
    add("--device-ids", default=None)
    add("--distributed-executor-backend", choices=("mp", "ray", "uni", "external_launcher"), default=None)
    add("--shutdown-timeout", type=int, default=0)
    add("--api-key", nargs="+", default=None)
    add("--uvicorn-log-level", choices=("critical", "error", "warning", "info", "debug", "trace"), default="info")
    add("--generation-config", default="auto")
    add("--max-logprobs", type=int, default=20)
    add("--fingerprint-mode", choices=("full", "none"), default="full")
    add("--enable-log-requests", "--disable-log-requests", action=_EnableDisableAction, default=False)
    for flag in (
        "--enforce-eager",
        "--trust-remote-code",
        "--enable-sleep-mode",
        "--disable-log-stats",
        "--enable-prefix-caching",
        "--enable-chunked-prefill",
        "--disable-uvicorn-access-log",
        "--enable-request-id-headers",
        "--enable-force-include-usage",
        "--enable-server-load-tracking",
        "--disable-fastapi-docs",
    ):
        add(flag, action=argparse.BooleanOptionalAction, default=False)

    stub = serve.add_argument_group(
        "gpushare stub", "Fault injection and timing; each flag also reads GPUSHARE_STUB_<NAME> (the flag wins)."
    )
    stub.add_argument("--stub-load-seconds", type=float, default=None, help="delay before listen() (default 2)")
    stub.add_argument("--stub-token-seconds", type=float, default=None, help="time per generated token (0.01)")
    stub.add_argument(
        "--stub-fail-start",
        choices=FAIL_KINDS,
        default=None,
        help="fail at start: memory (Free memory on device ValueError), cache-blocks, oom (engine init, exit 1), "
        "model (LocalEntryNotFoundError in the API server, exit 1)",
    )
    stub.add_argument("--stub-device-total-bytes", type=human_readable_int, default=None, help="fake device size")
    stub.add_argument("--stub-device-free-bytes", type=human_readable_int, default=None, help="fake free memory")
    stub.add_argument("--stub-die-after", type=float, default=None, help="API server crashes N s after ready")
    stub.add_argument("--stub-die-exit-code", type=int, default=None, help="exit status of that crash (1)")
    stub.add_argument("--stub-hang-after", type=float, default=None, help="stop answering HTTP N s after ready")
    stub.add_argument(
        "--stub-stall-after",
        type=float,
        default=None,
        help="engine stops generating N s after ready; /health still answers 200",
    )
    stub.add_argument("--stub-ignore-sigterm", action="store_true", default=None, help="ignore SIGTERM")
    stub.add_argument("--stub-engine-death-after", type=float, default=None, help="EngineCore dies N s after ready")
    stub.add_argument(
        "--stub-engine-death-grace", type=float, default=None, help="503 period before exit 0 after engine death (2)"
    )
    return top, serve


def _preprocess(args: list[str], top: argparse.ArgumentParser) -> list[str]:
    """The rewrites FlexibleArgumentParser.parse_args does before argparse sees the arguments."""
    if args[:1] == ["serve"]:
        model_idx = next((i for i, arg in enumerate(args) if re.match(r"^--model(=.+|$)", arg)), None)
        if model_idx is not None:
            _log(
                "WARNING",
                "argparse_utils.py:227",
                "With `vllm serve`, you should provide the model as a positional argument or in a config file "
                "instead of via the `--model` option. The `--model` option will be removed in a future version.",
            )
            if args[model_idx] == "--model":
                if model_idx + 1 >= len(args) or args[model_idx + 1].startswith("-"):
                    top.error("argument --model: expected one argument")
                model_tag, rest = args[model_idx + 1], model_idx + 2
            else:
                model_tag, rest = args[model_idx].removeprefix("--model="), model_idx + 1
            args = ["serve", model_tag, *args[1:model_idx], *args[rest:]]
        if (
            len(args) > 1
            and args[1].startswith("-")
            and any(re.match(r"^--served[-_]model[-_]name(=.+|$)", arg) for arg in args)
        ):
            raise ValueError(
                "`model` should be provided as the first positional argument when using `vllm serve`. "
                "i.e. `vllm serve <model> --<arg> <value>`."
            )
    processed: list[str] = []
    for arg in args:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            processed.append(key.replace("_", "-") + eq + value)
        else:
            processed.append(arg)
    return processed


def parse_serve_args(args: list[str]) -> tuple[argparse.Namespace, dict[str, Any]]:
    """Parse like ``vllm serve``; returns the namespace and the non-default arguments (for the startup log).

    Raises SystemExit(2) on a parse error (after printing usage) and ValueError where vLLM raises one.
    """
    top, serve = _build_parser()
    namespace = top.parse_args(_preprocess(args, top))
    non_default = {
        key: value
        for key, value in vars(namespace).items()
        if key != "subparser" and not key.startswith("stub_") and value != serve.get_default(key)
    }
    if "api_key" in non_default:
        non_default["api_key"] = "[REDACTED]"
    return namespace, non_default


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclass(frozen=True)
class Settings:
    """Everything the stub needs, resolved once from the command line and the environment."""

    model: str
    served_names: tuple[str, ...]
    host: str | None
    port: int
    uds: str | None
    gpu_memory_utilization: float
    kv_cache_memory_bytes: int | None
    max_model_len: int
    max_num_seqs: int
    tensor_parallel_size: int
    dtype: str
    api_keys: tuple[str, ...]
    enable_log_requests: bool
    disable_log_stats: bool
    access_log: bool
    shutdown_timeout: int
    enable_sleep_mode: bool
    force_include_usage: bool
    server_load_tracking: bool
    fingerprint: str | None
    enable_prefix_caching: bool
    load_seconds: float = 2.0
    token_seconds: float = 0.01
    fail_start: str | None = None
    device_total_bytes: int = DEFAULT_DEVICE_TOTAL_BYTES
    device_free_bytes: int | None = None
    die_after: float | None = None
    die_exit_code: int = 1
    hang_after: float | None = None
    stall_after: float | None = None
    ignore_sigterm: bool = False
    engine_death_after: float | None = None
    engine_death_grace: float = 2.0
    keep_alive_on_engine_death: bool = False
    dev_mode: bool = False
    process_prefix: str = "VLLM"
    stats_interval: float = 10.0
    http_keep_alive: float = 5.0
    engine_shutdown_timeout: float = 5.0
    non_default: dict[str, Any] = field(default_factory=dict)

    @property
    def metric_model_name(self) -> str:
        return self.served_names[0]

    @property
    def kv_capacity_blocks(self) -> int:
        budget = self.kv_cache_memory_bytes
        if budget is None:
            # No profiling to do: half of this instance's share of the device stands in for "what is left".
            budget = int(self.device_total_bytes * self.gpu_memory_utilization) // 2
        return max(1, budget // (KV_BYTES_PER_TOKEN * BLOCK_SIZE))


def _env(name: str) -> str | None:
    value = os.environ.get(f"GPUSHARE_STUB_{name}")
    return value if value else None


def _stub_float(flag: float | None, name: str, default: float | None) -> float | None:
    if flag is not None:
        value = flag
    elif (raw := _env(name)) is not None:
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"GPUSHARE_STUB_{name}: not a number: {raw!r}") from None
    else:
        return default
    if value < 0 or math.isnan(value):
        raise UsageError(f"--stub-{name.lower().replace('_', '-')} / GPUSHARE_STUB_{name} must be >= 0")
    return value


def _stub_bytes(flag: int | None, name: str) -> int | None:
    if flag is not None:
        return flag
    raw = _env(name)
    if raw is None:
        return None
    try:
        return human_readable_int(raw)
    except (ValueError, argparse.ArgumentTypeError):
        raise UsageError(f"GPUSHARE_STUB_{name}: not a size: {raw!r}") from None


def _env_flag(raw: str | None, name: str) -> bool:
    if raw is None or raw.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    if raw.strip().lower() in ("1", "true", "yes", "on"):
        return True
    raise UsageError(f"{name}: expected 1 or 0, got {raw!r}")


def _float_env(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        return default


def settings_from_args(namespace: argparse.Namespace, non_default: dict[str, Any] | None = None) -> Settings:
    ns = namespace
    model = str(ns.model_tag)
    served = tuple(ns.served_model_name) if ns.served_model_name else (model,)
    device_total = _stub_bytes(ns.stub_device_total_bytes, "DEVICE_TOTAL_BYTES") or DEFAULT_DEVICE_TOTAL_BYTES
    if ns.api_key:
        api_keys: tuple[str, ...] = tuple(ns.api_key)
    elif os.environ.get("VLLM_API_KEY"):
        api_keys = (os.environ["VLLM_API_KEY"],)
    else:
        api_keys = ()
    max_num_seqs = ns.max_num_seqs
    if max_num_seqs is None:
        max_num_seqs = 1024 if device_total >= 70 * GIB else 256
    fail_start = ns.stub_fail_start or _env("FAIL_START")
    if fail_start is not None and fail_start not in FAIL_KINDS:
        raise UsageError(f"GPUSHARE_STUB_FAIL_START: expected one of {', '.join(FAIL_KINDS)}, got {fail_start!r}")
    die_code = ns.stub_die_exit_code
    if die_code is None:
        raw_code = _env("DIE_EXIT_CODE")
        try:
            die_code = int(raw_code) if raw_code else 1
        except ValueError:
            raise UsageError(f"GPUSHARE_STUB_DIE_EXIT_CODE: not an integer: {raw_code!r}") from None
    ignore = bool(ns.stub_ignore_sigterm) or _env_flag(_env("IGNORE_SIGTERM"), "GPUSHARE_STUB_IGNORE_SIGTERM")
    fingerprint_hash = hashlib.sha256(f"{model}|{ns.dtype}|{ns.max_model_len}".encode()).hexdigest()[:8]
    parallel = f"-tp{ns.tensor_parallel_size}" if ns.tensor_parallel_size > 1 else ""
    return Settings(
        model=model,
        served_names=served,
        host=ns.host,
        port=ns.port,
        uds=ns.uds,
        gpu_memory_utilization=ns.gpu_memory_utilization,
        kv_cache_memory_bytes=ns.kv_cache_memory_bytes,
        max_model_len=DEFAULT_MAX_MODEL_LEN if ns.max_model_len in (None, -1) else ns.max_model_len,
        max_num_seqs=max_num_seqs,
        tensor_parallel_size=ns.tensor_parallel_size,
        dtype=ns.dtype,
        api_keys=api_keys,
        enable_log_requests=ns.enable_log_requests,
        disable_log_stats=ns.disable_log_stats,
        access_log=not ns.disable_uvicorn_access_log,
        shutdown_timeout=ns.shutdown_timeout,
        enable_sleep_mode=ns.enable_sleep_mode,
        force_include_usage=ns.enable_force_include_usage,
        server_load_tracking=ns.enable_server_load_tracking,
        fingerprint=None if ns.fingerprint_mode == "none" else f"vllm-{VLLM_VERSION}{parallel}-{fingerprint_hash}",
        enable_prefix_caching=ns.enable_prefix_caching,
        load_seconds=_stub_float(ns.stub_load_seconds, "LOAD_SECONDS", 2.0) or 0.0,
        token_seconds=_stub_float(ns.stub_token_seconds, "TOKEN_SECONDS", 0.01) or 0.0,
        fail_start=fail_start,
        device_total_bytes=device_total,
        device_free_bytes=_stub_bytes(ns.stub_device_free_bytes, "DEVICE_FREE_BYTES"),
        die_after=_stub_float(ns.stub_die_after, "DIE_AFTER", None),
        die_exit_code=die_code,
        hang_after=_stub_float(ns.stub_hang_after, "HANG_AFTER", None),
        stall_after=_stub_float(ns.stub_stall_after, "STALL_AFTER", None),
        ignore_sigterm=ignore,
        engine_death_after=_stub_float(ns.stub_engine_death_after, "ENGINE_DEATH_AFTER", None),
        engine_death_grace=_stub_float(ns.stub_engine_death_grace, "ENGINE_DEATH_GRACE", 2.0) or 0.0,
        keep_alive_on_engine_death=os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0") not in ("", "0"),
        dev_mode=os.environ.get("VLLM_SERVER_DEV_MODE", "0") == "1",
        process_prefix=os.environ.get("VLLM_PROCESS_NAME_PREFIX") or "VLLM",
        stats_interval=_float_env("VLLM_LOG_STATS_INTERVAL", 10.0),
        http_keep_alive=_float_env("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", 5.0),
        engine_shutdown_timeout=_float_env("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", 5.0),
        non_default=dict(non_default or {}),
    )


# ----------------------------------------------------------------------------------------------------------------
# Prometheus text exposition, formatted the way prometheus_client does it.


def _go_float(value: float) -> str:
    """prometheus_client's floatToGoString: ``1.0``, ``+Inf``, ``1.795e+09``."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+0{dot - 1}"
    return text


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    body = ",".join(
        '{}="{}"'.format(k, v.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\""))
        for k, v in sorted(labels.items())
    )
    return "{" + body + "}"


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, labels: dict[str, str], value: float) -> None:
        self.lines.append(f"{name}{_labels(labels)} {_go_float(value)}")

    def gauge(self, name: str, help_text: str, samples: Sequence[tuple[dict[str, str], float]]) -> None:
        self.family(name, "gauge", help_text)
        for labels, value in samples:
            self.sample(name, labels, value)

    def counter(
        self, name: str, help_text: str, samples: Sequence[tuple[dict[str, str], float]], created: float
    ) -> None:
        self.family(f"{name}_total", "counter", help_text)
        for labels, value in samples:
            self.sample(f"{name}_total", labels, value)
        if samples:
            self.family(f"{name}_created", "gauge", help_text)
        for labels, _ in samples:
            self.sample(f"{name}_created", labels, created)

    def histogram(self, name: str, help_text: str, labels: dict[str, str], hist: _Histogram, created: float) -> None:
        self.family(name, "histogram", help_text)
        for bound, count in zip(hist.bounds, hist.counts, strict=True):
            self.sample(f"{name}_bucket", {**labels, "le": _go_float(bound)}, count)
        self.sample(f"{name}_bucket", {**labels, "le": "+Inf"}, hist.count)
        self.sample(f"{name}_count", labels, hist.count)
        self.sample(f"{name}_sum", labels, hist.total)
        self.family(f"{name}_created", "gauge", help_text)
        self.sample(f"{name}_created", labels, created)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


class _Histogram:
    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.count += 1
        self.total += value
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1


def _buckets_1_2_5(maximum: int) -> list[float]:
    out: list[float] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > maximum:
                return out
            out.append(float(value))
        exponent += 1


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(word) for word in text.split())


TTFT_BUCKETS = _floats(
    "0.001 0.005 0.01 0.02 0.04 0.06 0.08 0.1 0.25 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0 160.0 640.0 2560.0"
)
ITL_BUCKETS = _floats("0.01 0.025 0.05 0.075 0.1 0.15 0.2 0.3 0.4 0.5 0.75 1.0 2.5 5.0 7.5 10.0 20.0 40.0 80.0")
LATENCY_BUCKETS = _floats(
    "0.3 0.5 0.8 1.0 1.5 2.0 2.5 5.0 10.0 15.0 20.0 30.0 40.0 50.0 60.0 120.0 240.0 480.0 960.0 1920.0 7680.0"
)
ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
FINISHED_REASONS = ("stop", "length", "abort", "error", "repetition")
LATENCY_HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("Histogram of time to first token in seconds.", TTFT_BUCKETS),
    "vllm:inter_token_latency_seconds": ("Histogram of inter-token latency in seconds.", ITL_BUCKETS),
    "vllm:request_time_per_output_token_seconds": (
        "Histogram of time_per_output_token_seconds per request.",
        ITL_BUCKETS,
    ),
    "vllm:e2e_request_latency_seconds": ("Histogram of e2e request latency in seconds.", LATENCY_BUCKETS),
    "vllm:request_queue_time_seconds": ("Histogram of time spent in WAITING phase for request.", LATENCY_BUCKETS),
    "vllm:request_inference_time_seconds": ("Histogram of time spent in RUNNING phase for request.", LATENCY_BUCKETS),
    "vllm:request_prefill_time_seconds": ("Histogram of time spent in PREFILL phase for request.", LATENCY_BUCKETS),
    "vllm:request_decode_time_seconds": ("Histogram of time spent in DECODE phase for request.", LATENCY_BUCKETS),
}


# ----------------------------------------------------------------------------------------------------------------
# The simulated engine: scheduling, made-up tokens and the statistics /metrics exposes.

_TEXT = (
    "the quick brown fox jumps over lazy dog while seven silver GPUs share one quiet host "
    "and every model keeps its own memory budget so nothing spills into neighbours when traffic grows"
)
VOCAB = tuple(_TEXT.split())


class EngineDead(Exception):
    """The EngineCore process is gone; requests fail with HTTP 500."""


class Aborted(Exception):
    """Shutdown in abort mode, or a simulated hang: the request never completes and the client is left waiting."""


@dataclass
class _Seq:
    index: int
    prompt_index: int
    prompt_tokens: int
    seed: int
    limit: int
    natural: int
    ignore_eos: bool
    generated: int = 0
    finish: str | None = None
    first_at: float | None = None
    last_at: float | None = None
    blocks: int = 0


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def _token_text(seed: int, position: int) -> str:
    word = VOCAB[(seed + position * 7) % len(VOCAB)]
    return word if position == 0 else " " + word


def _count_tokens(text: str) -> int:
    return len(text.split())


class Engine:
    """Scheduler and statistics; lives in the API-server process (the EngineCore child only has to exist)."""

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(settings.max_num_seqs)
        self.dead = threading.Event()
        self.abort = threading.Event()
        self.hung = threading.Event()
        self.stalled = threading.Event()
        self.running = 0
        self.waiting = 0
        self.kv_blocks = 0
        self.sleep_level = 0
        self.created = time.time()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.preemptions = 0
        self.success = dict.fromkeys(FINISHED_REASONS, 0)
        token_buckets = _buckets_1_2_5(settings.max_model_len)
        self.hist: dict[str, _Histogram] = {name: _Histogram(b) for name, (_, b) in LATENCY_HISTOGRAMS.items()}
        self.hist_prompt = _Histogram(token_buckets)
        self.hist_generation = _Histogram(token_buckets)
        self.hist_iteration = _Histogram(ITERATION_BUCKETS)
        self.hist_n = _Histogram((1, 2, 5, 10, 20))
        self.hist_max_tokens = _Histogram(token_buckets)
        self.hist_max_generation = _Histogram(token_buckets)
        self.seen_prompts: set[int] = set()

    def check(self) -> None:
        if self.dead.is_set():
            raise EngineDead(ENGINE_DEAD_MESSAGE)
        if self.abort.is_set() or self.hung.is_set():
            raise Aborted

    def _pause(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.05))

    def kv_usage(self) -> float:
        if self.sleep_level:
            return 0.0
        return min(1.0, self.kv_blocks / self.s.kv_capacity_blocks)

    def generate(
        self, seqs: list[_Seq], n_param: int, max_tokens_param: int
    ) -> Generator[list[tuple[_Seq, str]], None, None]:
        """Yield one engine step at a time: the (sequence, token text) pairs produced in that step.

        Accounting happens in ``finally`` so a client that hangs up (generator closed) counts as an abort.
        """
        arrival = time.monotonic()
        count = len(seqs)
        with self.lock:
            self.waiting += count
        scheduled_at: float | None = None
        try:
            # A stalled engine (--stub-stall-after) schedules nothing, the way a wedged GPU kernel stops vLLM's
            # engine loop while the API server still answers /health 200 (vllm.md §4).
            while self.stalled.is_set() or not self.slots.acquire(timeout=0.05):
                self._pause(0.05)
            scheduled_at = time.monotonic()
            with self.lock:
                self.waiting -= count
                self.running += count
                for seq in seqs:
                    self.prompt_tokens += seq.prompt_tokens
                    self.prefix_queries += seq.prompt_tokens
                    if seq.seed in self.seen_prompts:
                        self.prefix_hits += seq.prompt_tokens - seq.prompt_tokens % BLOCK_SIZE
                    self.seen_prompts.add(seq.seed)
                    seq.blocks = -(-seq.prompt_tokens // BLOCK_SIZE)
                    self.kv_blocks += seq.blocks
                    self.hist["vllm:request_queue_time_seconds"].observe(scheduled_at - arrival)
                    self.hist_n.observe(n_param)
                    self.hist_max_tokens.observe(max_tokens_param)
                    self.hist_max_generation.observe(seq.limit)
            while any(seq.finish is None for seq in seqs):
                self._pause(self.s.token_seconds)
                now = time.monotonic()
                step: list[tuple[_Seq, str]] = []
                with self.lock:
                    for seq in seqs:
                        if seq.finish is not None:
                            continue
                        text = _token_text(seq.seed, seq.generated)
                        seq.generated += 1
                        if seq.first_at is None:
                            seq.first_at = now
                            self.hist["vllm:time_to_first_token_seconds"].observe(now - arrival)
                        elif seq.last_at is not None:
                            self.hist["vllm:inter_token_latency_seconds"].observe(now - seq.last_at)
                        seq.last_at = now
                        self.generation_tokens += 1
                        if (seq.prompt_tokens + seq.generated) % BLOCK_SIZE == 1:
                            seq.blocks += 1
                            self.kv_blocks += 1
                        if seq.generated >= seq.limit:
                            seq.finish = "length"
                        elif not seq.ignore_eos and seq.generated >= seq.natural:
                            seq.finish = "stop"
                        step.append((seq, text))
                    self.hist_iteration.observe(len(step))
                yield step
        finally:
            self._finish(seqs, arrival, scheduled_at)

    def _finish(self, seqs: list[_Seq], arrival: float, scheduled_at: float | None) -> None:
        now = time.monotonic()
        with self.lock:
            if scheduled_at is None:
                self.waiting -= len(seqs)
            else:
                self.running -= len(seqs)
                self.slots.release()
            for seq in seqs:
                reason = seq.finish or ("error" if self.dead.is_set() else "abort")
                self.success[reason] += 1
                if scheduled_at is None:
                    continue
                self.kv_blocks -= seq.blocks
                first = seq.first_at if seq.first_at is not None else now
                self.hist["vllm:e2e_request_latency_seconds"].observe(now - arrival)
                self.hist["vllm:request_inference_time_seconds"].observe(now - scheduled_at)
                self.hist["vllm:request_prefill_time_seconds"].observe(first - scheduled_at)
                self.hist["vllm:request_decode_time_seconds"].observe(now - first)
                self.hist_prompt.observe(seq.prompt_tokens)
                self.hist_generation.observe(seq.generated)
                if seq.generated > 1 and seq.first_at is not None and seq.last_at is not None:
                    tpot = (seq.last_at - seq.first_at) / (seq.generated - 1)
                    self.hist["vllm:request_time_per_output_token_seconds"].observe(tpot)

    def snapshot(self) -> tuple[int, int, float, int, int, int, int]:
        with self.lock:
            return (
                self.running,
                self.waiting,
                self.kv_usage(),
                self.prompt_tokens,
                self.generation_tokens,
                self.prefix_queries,
                self.prefix_hits,
            )

    def render_vllm_metrics(self, out: _Exposition) -> None:
        s = self.s
        base = {"engine": "0", "model_name": s.metric_model_name}
        created = self.created
        with self.lock:
            out.gauge(
                "vllm:num_requests_running", "Number of requests in model execution batches.", [(base, self.running)]
            )
            out.gauge(
                "vllm:num_requests_waiting", "Number of requests waiting to be processed.", [(base, self.waiting)]
            )
            out.gauge(
                "vllm:num_requests_waiting_by_reason",
                "Number of requests waiting to be processed, by reason.",
                [({**base, "reason": "capacity"}, self.waiting), ({**base, "reason": "deferred"}, 0)],
            )
            out.gauge(
                "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", [(base, self.kv_usage())]
            )
            states = {
                "awake": 0 if self.sleep_level else 1,
                "weights_offloaded": int(self.sleep_level == 1),
                "discard_all": int(self.sleep_level == 2),
            }
            out.gauge(
                "vllm:engine_sleep_state",
                "Engine sleep state; awake = 0 means engine is sleeping; awake = 1 means engine is awake; "
                "weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
                [({**base, "sleep_state": state}, value) for state, value in states.items()],
            )
            cache_info = {
                "block_size": str(BLOCK_SIZE),
                "cache_dtype": "auto",
                "enable_prefix_caching": str(s.enable_prefix_caching),
                "engine": "0",
                "gpu_memory_utilization": str(s.gpu_memory_utilization),
                "kv_cache_memory_bytes": str(s.kv_cache_memory_bytes),
                "num_gpu_blocks": str(s.kv_capacity_blocks),
            }
            out.gauge("vllm:cache_config_info", "Information of the LLMEngine CacheConfig", [(cache_info, 1.0)])
            out.counter(
                "vllm:num_preemptions",
                "Cumulative number of preemption from the engine.",
                [(base, self.preemptions)],
                created,
            )
            out.counter(
                "vllm:prompt_tokens", "Number of prefill tokens processed.", [(base, self.prompt_tokens)], created
            )
            out.counter(
                "vllm:generation_tokens",
                "Number of generation tokens processed.",
                [(base, self.generation_tokens)],
                created,
            )
            out.counter(
                "vllm:request_success",
                "Count of successfully processed requests.",
                [({**base, "finished_reason": reason}, count) for reason, count in self.success.items()],
                created,
            )
            out.counter(
                "vllm:prefix_cache_queries",
                "Prefix cache queries, in terms of number of queried tokens.",
                [(base, self.prefix_queries)],
                created,
            )
            out.counter(
                "vllm:prefix_cache_hits",
                "Prefix cache hits, in terms of number of cached tokens.",
                [(base, self.prefix_hits)],
                created,
            )
            out.histogram(
                "vllm:request_prompt_tokens", "Number of prefill tokens processed.", base, self.hist_prompt, created
            )
            out.histogram(
                "vllm:request_generation_tokens",
                "Number of generation tokens processed.",
                base,
                self.hist_generation,
                created,
            )
            out.histogram(
                "vllm:iteration_tokens_total",
                "Histogram of number of tokens per engine_step.",
                base,
                self.hist_iteration,
                created,
            )
            out.histogram(
                "vllm:request_max_num_generation_tokens",
                "Histogram of maximum number of requested generation tokens.",
                base,
                self.hist_max_generation,
                created,
            )
            out.histogram("vllm:request_params_n", "Histogram of the n request parameter.", base, self.hist_n, created)
            out.histogram(
                "vllm:request_params_max_tokens",
                "Histogram of the max_tokens request parameter.",
                base,
                self.hist_max_tokens,
                created,
            )
            for name, (help_text, _) in LATENCY_HISTOGRAMS.items():
                out.histogram(name, help_text, base, self.hist[name], created)


def _process_metrics(out: _Exposition, started: float) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        out.gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", [({}, float(fields[20]))])
        rss = float(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        out.gauge("process_resident_memory_bytes", "Resident memory size in bytes.", [({}, rss)])
        out.gauge(
            "process_start_time_seconds", "Start time of the process since unix epoch in seconds.", [({}, started)]
        )
        cpu = (float(fields[11]) + float(fields[12])) / ticks
        out.family("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.")
        out.sample("process_cpu_seconds_total", {}, cpu)
        out.gauge(
            "process_open_fds", "Number of open file descriptors.", [({}, float(len(os.listdir("/proc/self/fd"))))]
        )


# ----------------------------------------------------------------------------------------------------------------
# HTTP front end


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    app: App

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # clients that hang up are routine
        _emit(traceback.format_exc().rstrip(), err=True)


class BadRequest(Exception):
    def __init__(self, status: int, message: str, err_type: str, param: str | None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.param = param


Route = Callable[["_Handler", dict[str, list[str]]], None]


class App:
    """State shared by the HTTP handler threads and the main thread."""

    def __init__(self, settings: Settings, engine: Engine) -> None:
        self.s = settings
        self.engine = engine
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.active = 0
        self.connections: set[_Handler] = set()
        self.http_counts: dict[tuple[str, str, str], int] = {}
        self.started = time.time()
        self.routes: dict[str, dict[str, Route]] = {
            "/health": {"GET": _Handler.r_health},
            "/ping": {"GET": _Handler.r_health, "POST": _Handler.r_health},
            "/version": {"GET": _Handler.r_version},
            "/load": {"GET": _Handler.r_load},
            "/metrics": {"GET": _Handler.r_metrics},
            "/v1/models": {"GET": _Handler.r_models},
            "/v1/completions": {"POST": _Handler.r_completions},
            "/v1/chat/completions": {"POST": _Handler.r_chat},
            "/tokenize": {"POST": _Handler.r_tokenize},
            "/detokenize": {"POST": _Handler.r_detokenize},
        }
        if settings.dev_mode:
            self.routes.update(
                {
                    "/sleep": {"POST": _Handler.r_sleep},
                    "/wake_up": {"POST": _Handler.r_wake_up},
                    "/is_sleeping": {"GET": _Handler.r_is_sleeping},
                    "/reset_prefix_cache": {"POST": _Handler.r_reset_prefix_cache},
                }
            )

    def enter(self) -> None:
        with self.lock:
            self.active += 1

    def leave(self) -> None:
        with self.lock:
            self.active -= 1

    def count_http(self, handler: str, method: str, status: int) -> None:
        # prometheus-fastapi-instrumentator leaves these out.
        if handler in ("/health", "/metrics", "/load", "/ping", "/version"):
            return
        key = (handler, method, f"{status // 100}xx")
        with self.lock:
            self.http_counts[key] = self.http_counts.get(key, 0) + 1

    def close_idle_connections(self) -> None:
        """uvicorn closes keep-alive connections that are between requests when it shuts down."""
        with self.lock:
            idle = [h for h in self.connections if not h.busy]
        for handler in idle:
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)

    def metrics_text(self) -> str:
        out = _Exposition()
        _process_metrics(out, self.started)
        with self.lock:
            counts = sorted(self.http_counts.items())
        out.counter(
            "http_requests",
            "Total number of requests by method, status and handler.",
            [({"handler": h, "method": m, "status": st}, n) for (h, m, st), n in counts],
            self.started,
        )
        if not self.s.disable_log_stats:
            self.engine.render_vllm_metrics(out)
        return out.text()


def _usage(prompt_tokens: int, completion_tokens: int, *, details: bool) -> dict[str, Any]:
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:
        usage |= {"prompt_tokens_details": None, "completion_tokens_details": None}
    return usage


def _prompt_tokens(seqs: list[_Seq]) -> int:
    """n choices share one prompt: count each prompt once."""
    return sum({seq.prompt_index: seq.prompt_tokens for seq in seqs}.values())


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _validation_error(loc: str, msg: str, kind: str, given: Any) -> BadRequest:
    detail = {"type": kind, "loc": ("body", loc), "msg": msg, "input": given}
    return BadRequest(400, f"1 validation error:\n  {detail!r}", "Bad Request", f"body.{loc}")


def _int_field(body: dict[str, Any], key: str, default: int | None, minimum: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _validation_error(key, "Input should be a valid integer", "int_type", value)
    if value < minimum:
        raise _validation_error(key, f"Input should be greater than or equal to {minimum}", "greater_than_equal", value)
    return value


def _chat_prompt(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise _validation_error(
            "messages",
            "Field required" if messages is None else "Input should be a valid list",
            "missing" if messages is None else "list_type",
            messages,
        )
    parts: list[str] = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise _validation_error("messages", "Input should be a valid dictionary", "dict_type", message)
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts += [str(p.get("text", "")) for p in content if isinstance(p, dict)]
        # Role markers a chat template adds, so the count differs from the bare words.
        parts.append(f"<|{message['role']}|>")
    return " ".join(parts)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    busy = False
    chunked = False
    body = b""

    @property
    def app(self) -> App:
        return cast(_Server, self.server).app

    # --- connection bookkeeping -------------------------------------------------------------------------------

    def setup(self) -> None:
        super().setup()
        # uvicorn's keep-alive timeout; it also bounds a send to a client that stopped reading.
        self.connection.settimeout(self.app.s.http_keep_alive)
        with self.app.lock:
            self.app.connections.add(self)

    def finish(self) -> None:
        with self.app.lock:
            self.app.connections.discard(self)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass  # BaseHTTPRequestHandler's own lines are not vLLM's; access lines come from log_request

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        if not self.app.s.access_log:
            return
        try:
            phrase = http.HTTPStatus(int(code)).phrase
        except ValueError:
            phrase = ""
        client = f"{self.client_address[0]}:{self.client_address[1]}" if isinstance(self.client_address, tuple) else "-"
        _uvicorn(f'{client} - "{self.requestline}" {code} {phrase}', access=True)

    def version_string(self) -> str:
        return "uvicorn"

    def address_string(self) -> str:
        return str(self.client_address[0]) if isinstance(self.client_address, tuple) else "-"

    # --- dispatch ------------------------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_OPTIONS(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        app = self.app
        if app.closing.is_set():
            self.close_connection = True  # a server that is shutting down drops the request unanswered
            return
        self.busy = True
        app.enter()
        try:
            self._route()
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        finally:
            self.busy = False
            app.leave()

    def _route(self) -> None:
        app = self.app
        url = urlsplit(self.path)
        path = url.path
        try:
            self.body = self._read_body()
        except ValueError:
            self.close_connection = True
            self._json(400, {"detail": "Invalid HTTP request body framing"})
            return
        if app.engine.hung.is_set():
            self._stall()
            return
        if app.s.api_keys and path.startswith(AUTH_PREFIXES) and self.command != "OPTIONS":
            given = self.headers.get("Authorization", "")
            if given not in {f"Bearer {key}" for key in app.s.api_keys}:
                self._json(401, {"error": "Unauthorized"})
                return
        methods = app.routes.get(path)
        if methods is None:
            self._json(404, {"detail": "Not Found"})
            return
        route = methods.get(self.command)
        if route is None:
            self._json(405, {"detail": "Method Not Allowed"}, [("allow", ", ".join(methods))])
            return
        try:
            route(self, parse_qs(url.query))
        except BadRequest as exc:
            self._error(exc.status, exc.message, exc.err_type, exc.param)
        if path in app.routes:
            app.count_http(path, self.command, self.last_status)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks: list[bytes] = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    # --- responses ---------------------------------------------------------------------------------------------

    last_status = 0

    def _send(
        self, status: int, body: bytes, content_type: str | None, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        self.last_status = status
        self.send_response(status)
        if content_type:
            self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        self._send(status, _dumps(obj).encode(), "application/json", headers)

    def _error(self, status: int, message: str, err_type: str, param: str | None) -> None:
        self._json(status, {"error": {"message": message, "type": err_type, "param": param, "code": status}})

    def _sse_begin(self) -> None:
        self.last_status = 200
        self.send_response(200)
        self.send_header("content-type", "text/event-stream; charset=utf-8")
        self.chunked = self.request_version == "HTTP/1.1"
        if self.chunked:
            self.send_header("transfer-encoding", "chunked")
        else:
            self.close_connection = True
        self.end_headers()

    def _sse(self, payload: str) -> None:
        data = f"data: {payload}\n\n".encode()
        if self.chunked:
            data = f"{len(data):x}\r\n".encode() + data + b"\r\n"
        self.wfile.write(data)

    def _sse_end(self) -> None:
        if self.chunked:
            self.wfile.write(b"0\r\n\r\n")

    def _stall(self) -> None:
        """Keep the connection open without answering until the client hangs up.

        That is what a vLLM stream aborted by SIGTERM looks like (no ``[DONE]``, the process stays up while the
        client waits), and what a wedged server looks like.
        """
        self.close_connection = True
        conn = self.connection
        while True:
            try:
                readable, _, _ = select.select([conn], [], [], 1.0)
                if readable and not conn.recv(65536):
                    return
            except (OSError, ValueError):
                return

    def _json_body(self) -> dict[str, Any]:
        try:
            body = json.loads(self.body or b"null")
        except (ValueError, UnicodeDecodeError) as exc:
            detail = {
                "type": "json_invalid",
                "loc": ("body", 0),
                "msg": "JSON decode error",
                "input": {},
                "ctx": {"error": str(exc).split(":")[0]},
            }
            raise BadRequest(400, f"1 validation error:\n  {detail!r}", "Bad Request", "body.0") from None
        if not isinstance(body, dict):
            raise BadRequest(
                400,
                "1 validation error:\n  "
                + repr(
                    {
                        "type": "model_attributes_type",
                        "loc": ("body",),
                        "msg": "Input should be a valid dictionary or object to extract fields from",
                        "input": body,
                    }
                ),
                "Bad Request",
                "body",
            )
        return body

    def _model(self, body: dict[str, Any]) -> str:
        names = self.app.s.served_names
        requested = body.get("model")
        if requested is None:
            return names[0]
        if requested not in names:
            raise BadRequest(
                404,
                f"The model `{requested}` does not exist. Valid aliases: {', '.join(names)}.",
                "NotFoundError",
                "model",
            )
        return names[0]

    # --- routes ----------------------------------------------------------------------------------------------

    def r_health(self, query: dict[str, list[str]]) -> None:
        self._send(503 if self.app.engine.dead.is_set() else 200, b"", None)

    def r_version(self, query: dict[str, list[str]]) -> None:
        self._json(200, {"version": VLLM_VERSION})

    def r_load(self, query: dict[str, list[str]]) -> None:
        load = max(0, self.app.active - 1) if self.app.s.server_load_tracking else 0
        self._json(200, {"server_load": load})

    def r_metrics(self, query: dict[str, list[str]]) -> None:
        self._send(200, self.app.metrics_text().encode(), "text/plain; version=1.0.0; charset=utf-8")

    def r_models(self, query: dict[str, list[str]]) -> None:
        s = self.app.s
        now = int(time.time())
        data = [
            {
                "id": name,
                "object": "model",
                "created": now,
                "owned_by": "vllm",
                "root": s.model,
                "parent": None,
                "max_model_len": s.max_model_len,
                "permission": [
                    {
                        "id": f"modelperm-{os.urandom(16).hex()}",
                        "object": "model_permission",
                        "created": now,
                        "allow_create_engine": False,
                        "allow_sampling": True,
                        "allow_logprobs": True,
                        "allow_search_indices": False,
                        "allow_view": True,
                        "allow_fine_tuning": False,
                        "organization": "*",
                        "group": None,
                        "is_blocking": False,
                    }
                ],
            }
            for name in s.served_names
        ]
        self._json(200, {"object": "list", "data": data})

    def r_tokenize(self, query: dict[str, list[str]]) -> None:
        body = self._json_body()
        self._model(body)
        text = _chat_prompt(body.get("messages")) if "messages" in body else str(body.get("prompt", ""))
        tokens = [_seed(word) % 151_000 for word in text.split()]
        self._json(
            200, {"count": len(tokens), "max_model_len": self.app.s.max_model_len, "tokens": tokens, "token_strs": None}
        )

    def r_detokenize(self, query: dict[str, list[str]]) -> None:
        body = self._json_body()
        self._model(body)
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise _validation_error("tokens", "Input should be a valid list", "list_type", tokens)
        self._json(200, {"prompt": " ".join(VOCAB[t % len(VOCAB)] for t in tokens)})

    def r_sleep(self, query: dict[str, list[str]]) -> None:
        raw_level = (query.get("level") or ["1"])[0]
        if raw_level not in ("1", "2"):
            raise BadRequest(400, f"Invalid sleep level {raw_level!r}; expected 1 or 2.", "BadRequestError", "level")
        level = int(raw_level)
        if not self.app.s.enable_sleep_mode:
            raise BadRequest(
                400, "Sleep mode is not enabled. Start the server with --enable-sleep-mode.", "BadRequestError", None
            )
        self.app.engine.sleep_level = level
        self._json(200, {"status": "sleeping", "level": level})

    def r_wake_up(self, query: dict[str, list[str]]) -> None:
        self.app.engine.sleep_level = 0
        self._json(200, {"status": "awake", "tags": query.get("tags")})

    def r_is_sleeping(self, query: dict[str, list[str]]) -> None:
        self._json(200, {"is_sleeping": self.app.engine.sleep_level > 0})

    def r_reset_prefix_cache(self, query: dict[str, list[str]]) -> None:
        with self.app.engine.lock:
            self.app.engine.seen_prompts.clear()
        self._send(200, b"", None)

    def r_completions(self, query: dict[str, list[str]]) -> None:
        self._generate(chat=False)

    def r_chat(self, query: dict[str, list[str]]) -> None:
        self._generate(chat=True)

    # --- generation ------------------------------------------------------------------------------------------

    def _generate(self, *, chat: bool) -> None:
        app = self.app
        s = app.s
        if app.engine.dead.is_set():
            self._error(500, ENGINE_DEAD_MESSAGE, "InternalServerError", None)
            return
        body = self._json_body()
        model = self._model(body)
        prompts: list[tuple[str, int]]
        if chat:
            text = _chat_prompt(body.get("messages"))
            prompts = [(text, _count_tokens(text) + 1)]
            default_max: int | None = None
            max_tokens = _int_field(body, "max_completion_tokens", None, 1)
            if max_tokens is None:
                max_tokens = _int_field(body, "max_tokens", None, 1)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, str):
                prompts = [(prompt, _count_tokens(prompt))]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
                prompts = [(" ".join(map(str, prompt)), len(prompt))]
            elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
                prompts = [(p, _count_tokens(p)) for p in prompt]
            else:
                kind = "missing" if prompt is None else "string_type"
                raise _validation_error(
                    "prompt", "Field required" if prompt is None else "Input should be a valid string", kind, prompt
                )
            default_max = 16
            max_tokens = _int_field(body, "max_tokens", default_max, 1)
        n = _int_field(body, "n", 1, 1) or 1
        stream = bool(body.get("stream", False))
        options = body.get("stream_options")
        if options is not None and not stream:
            raise BadRequest(
                400, "Stream options can only be defined when `stream=True`.", "BadRequestError", "stream_options"
            )
        include_usage = s.force_include_usage or bool(isinstance(options, dict) and options.get("include_usage"))
        continuous = s.force_include_usage or bool(
            include_usage and isinstance(options, dict) and options.get("continuous_usage_stats")
        )
        longest = max(tokens for _, tokens in prompts)
        limit_max = s.max_model_len
        if max_tokens is not None and max_tokens > limit_max:
            raise BadRequest(
                400,
                f"max_tokens={max_tokens} cannot be greater than max_model_len={limit_max}. "
                "Please request fewer output tokens.",
                "BadRequestError",
                "max_tokens",
            )
        if longest + (max_tokens or 0) > limit_max or longest >= limit_max:
            raise BadRequest(
                400,
                f"This model's maximum context length is {limit_max} tokens. However, you requested "
                f"{max_tokens or 0} output tokens and your prompt contains at least {longest} input tokens, for a "
                f"total of at least {longest + (max_tokens or 0)} tokens. Please reduce the length of the input "
                "prompt or the number of requested output tokens.",
                "BadRequestError",
                "max_tokens",
            )
        ignore_eos = bool(body.get("ignore_eos", False))
        seqs: list[_Seq] = []
        for p_index, (text, p_tokens) in enumerate(prompts):
            base = _seed(text)
            for j in range(n):
                seed = base + j
                limit = max_tokens if max_tokens is not None else limit_max - p_tokens
                seqs.append(_Seq(p_index * n + j, p_index, max(p_tokens, 1), seed, limit, 16 + seed % 16, ignore_eos))
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(8).hex()}"
        if s.enable_log_requests:
            _log(
                "INFO",
                "logger.py:49",
                f"Received request {request_id}: max_tokens={max_tokens}, n={n}, "
                f"stream={stream}, prompt_tokens={[t for _, t in prompts]}",
            )
        generation = app.engine.generate(seqs, n, max_tokens if max_tokens is not None else limit_max)
        created = int(time.time())
        common = {"id": request_id, "created": created, "model": model}
        try:
            if stream:
                self._stream(generation, seqs, chat, common, include_usage=include_usage, continuous=continuous)
            else:
                self._collect(generation, seqs, chat, common)
        finally:
            generation.close()

    def _collect(
        self, generation: Iterator[list[tuple[_Seq, str]]], seqs: list[_Seq], chat: bool, common: dict[str, Any]
    ) -> None:
        texts = {seq.index: "" for seq in seqs}
        try:
            for step in generation:
                for seq, text in step:
                    texts[seq.index] += text
        except EngineDead as exc:
            self._error(500, str(exc), "InternalServerError", None)
            return
        except Aborted:
            self._stall()
            return
        prompt_tokens = _prompt_tokens(seqs)
        completion_tokens = sum(seq.generated for seq in seqs)
        choices: list[dict[str, Any]] = []
        for seq in seqs:
            if chat:
                message = {
                    "role": "assistant",
                    "content": texts[seq.index],
                    "refusal": None,
                    "annotations": None,
                    "audio": None,
                    "function_call": None,
                    "reasoning": None,
                }
                choices.append(
                    {
                        "index": seq.index,
                        "message": message,
                        "logprobs": None,
                        "finish_reason": seq.finish,
                        "stop_reason": None,
                        "token_ids": None,
                    }
                )
            else:
                choices.append(
                    {
                        "index": seq.index,
                        "text": texts[seq.index],
                        "logprobs": None,
                        "finish_reason": seq.finish,
                        "stop_reason": None,
                        "token_ids": None,
                        "prompt_logprobs": None,
                        "prompt_token_ids": None,
                        "routed_experts": None,
                    }
                )
        response: dict[str, Any] = {
            "id": common["id"],
            "object": "chat.completion" if chat else "text_completion",
            "created": common["created"],
            "model": common["model"],
            "choices": choices,
            "service_tier": None,
            "system_fingerprint": self.app.s.fingerprint,
            "usage": _usage(prompt_tokens, completion_tokens, details=True),
        }
        if chat:
            response |= {"prompt_logprobs": None, "prompt_token_ids": None, "kv_transfer_params": None}
        else:
            response |= {"kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}
        self._json(200, response)

    def _stream(
        self,
        generation: Iterator[list[tuple[_Seq, str]]],
        seqs: list[_Seq],
        chat: bool,
        common: dict[str, Any],
        *,
        include_usage: bool,
        continuous: bool,
    ) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self._sse_begin()
        first = True
        try:
            for step in generation:
                if first and chat:
                    for seq in seqs:
                        role = {
                            "index": seq.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        chunk: dict[str, Any] = {**common, "object": obj, "choices": [role]}
                        if continuous:
                            chunk["usage"] = _usage(seq.prompt_tokens, 0, details=False)
                        self._sse(_dumps(chunk))
                first = False
                for seq, text in step:
                    if chat:
                        choice: dict[str, Any] = {
                            "index": seq.index,
                            "delta": {"content": text},
                            "logprobs": None,
                            "finish_reason": seq.finish,
                        }
                        if seq.finish is not None:
                            choice["stop_reason"] = None
                    else:
                        choice = {
                            "index": seq.index,
                            "text": text,
                            "logprobs": None,
                            "finish_reason": seq.finish,
                            "stop_reason": None,
                        }
                    chunk = {**common, "object": obj, "choices": [choice]}
                    if continuous:
                        chunk["usage"] = _usage(seq.prompt_tokens, seq.generated, details=False)
                    self._sse(_dumps(chunk))
            if include_usage:
                tail = {
                    **common,
                    "object": obj,
                    "choices": [],
                    "usage": _usage(_prompt_tokens(seqs), sum(q.generated for q in seqs), details=False),
                    "system_fingerprint": self.app.s.fingerprint,
                }
                self._sse(_dumps(tail))
            self._sse("[DONE]")
            self._sse_end()
        except EngineDead as exc:
            err = {"error": {"message": str(exc), "type": "InternalServerError", "param": None, "code": 500}}
            self._sse(_dumps(err))
            self._sse("[DONE]")
            self._sse_end()
        except Aborted:
            self._stall()


# ----------------------------------------------------------------------------------------------------------------
# EngineCore (and Worker) processes


def _engine_init_error(s: Settings) -> str | None:
    """The exception line EngineCore would die with, or None when it initialises fine."""
    total = s.device_total_bytes
    util = s.gpu_memory_utilization
    requested = math.ceil(total * util)
    free = s.device_free_bytes if s.device_free_bytes is not None else total
    if s.fail_start == "memory":
        free = min(free, requested // 2)
    if free < requested:
        return (
            f"ValueError: Free memory on device cuda:0 ({free / GIB:.2f}/{total / GIB:.2f} GiB) on startup is less "
            f"than desired GPU memory utilization ({util}, {requested / GIB:.2f} GiB). Decrease GPU memory "
            "utilization or reduce GPU memory used by other processes."
        )
    if s.fail_start == "cache-blocks":
        return (
            "ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
            "initializing the engine."
        )
    if s.fail_start == "oom":
        return (
            f"torch.OutOfMemoryError: HIP out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
            f"{total / GIB:.2f} GiB of which {free / GIB * 0.01:.2f} GiB is free."
        )
    return None


def _install_child_signals(ignore_sigterm: bool, stop: Callable[..., None]) -> None:
    signal.set_wakeup_fd(-1)

    def ignore(*_: object) -> None:
        _log("WARNING", "stub_engine.py:1", "gpushare stub: ignoring SIGTERM (--stub-ignore-sigterm)")

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, ignore if ignore_sigterm else stop)


def _worker_main(s: Settings, rank: int, death_r: int) -> NoReturn:
    _Out.role = f"Worker_TP{rank}"

    def stop(*_: object) -> None:
        os._exit(0)

    _install_child_signals(s.ignore_sigterm, stop)
    _set_process_name(f"{s.process_prefix}::Worker_TP{rank}")
    # Workers watch a death pipe from EngineCore, as vLLM's multiproc workers do.
    while os.read(death_r, 1):
        pass
    os._exit(0)


def _engine_main(s: Settings, ready_w: int) -> NoReturn:
    _Out.role = "EngineCore"
    workers: list[int] = []

    def stop(*_: object) -> None:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        for pid in workers:
            with contextlib.suppress(OSError):
                os.waitpid(pid, 0)
        os._exit(0)

    _install_child_signals(s.ignore_sigterm, stop)
    _set_process_name(f"{s.process_prefix}::EngineCore")
    started = time.monotonic()
    _log(
        "INFO",
        "core.py:93",
        f"Initializing a V1 LLM engine (v{VLLM_VERSION}) with config: model={s.model!r}, "
        f"dtype={s.dtype}, max_seq_len={s.max_model_len}, tensor_parallel_size={s.tensor_parallel_size}, "
        f"served_model_name={s.served_names[0]}, gpushare_stub=True",
    )
    if s.tensor_parallel_size > 1:
        death_r, death_w = os.pipe()
        for rank in range(s.tensor_parallel_size):
            _flush()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(death_w)
                    os.close(ready_w)
                    _worker_main(s, rank, death_r)
                finally:
                    os._exit(1)
            workers.append(pid)
        os.close(death_r)
    time.sleep(s.load_seconds / 2)
    _log("INFO", "default_loader.py:267", f"Loading weights took {time.monotonic() - started:.2f} seconds")
    time.sleep(s.load_seconds / 2)
    error = _engine_init_error(s)
    if error is not None:
        lines = ["EngineCore failed to start.", "Traceback (most recent call last):", STUB_FRAME, error]
        _log("ERROR", "core.py:1142", "\n".join(lines))
        _traceback(error, header="Process EngineCore:\n")
        _flush()
        os._exit(1)
    kv_tokens = s.kv_capacity_blocks * BLOCK_SIZE
    _log("INFO", "kv_cache_utils.py:1087", f"GPU KV cache size: {kv_tokens:,} tokens")
    _log(
        "INFO",
        "kv_cache_utils.py:1091",
        f"Maximum concurrency for {s.max_model_len:,} tokens per request: {kv_tokens / s.max_model_len:.2f}x",
    )
    _log(
        "INFO",
        "core.py:252",
        f"init engine (profile, create kv cache, warmup model) took {time.monotonic() - started:.2f} seconds",
    )
    _flush()
    os.write(ready_w, b"R")
    if s.engine_death_after is not None:
        time.sleep(s.engine_death_after)
        _flush()
        # Like an OOM kill or a driver fault: no goodbye, the API server only sees the pipe close.
        os.kill(os.getpid(), signal.SIGKILL)
    while True:
        signal.pause()


# ----------------------------------------------------------------------------------------------------------------
# The API-server process: load, serve, shut down.


class _Exit(Exception):
    """Leave ApiServer.run with this exit status after cleaning up the engine."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class ApiServer:
    """The main ("APIServer") process: bind, fork EngineCore, listen once it is ready, serve, shut down.

    Signals and the engine's ready/death pipe are multiplexed in one select() loop on the main thread; HTTP
    requests run on handler threads and only read the shared state.
    """

    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.engine = Engine(settings)
        self.app = App(settings, self.engine)
        self.sock: socket.socket | None = None
        self.server: _Server | None = None
        self.engine_pid: int | None = None
        self.engine_r: int | None = None
        self.pending: list[int] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)

    # --- signals -------------------------------------------------------------------------------------------------

    def install_signals(self) -> None:
        signal.set_wakeup_fd(self.wake_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.pending.append(signum)

    def _take_stop_request(self) -> bool:
        """True if a signal asks us to stop; an ignored SIGTERM is only logged."""
        stop = False
        while self.pending:
            signum = self.pending.pop(0)
            if signum == signal.SIGTERM and self.s.ignore_sigterm:
                _log("WARNING", "stub_engine.py:1", "gpushare stub: ignoring SIGTERM (--stub-ignore-sigterm)")
            else:
                stop = True
        return stop

    def _wait(self, fds: list[int], timeout: float | None) -> set[int]:
        readable, _, _ = select.select([*fds, self.wake_r], [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wake_r, 512):
                pass
        return {fd for fd in readable if fd != self.wake_r}

    # --- engine process ------------------------------------------------------------------------------------------

    def spawn_engine(self) -> None:
        ready_r, ready_w = os.pipe()
        _flush()
        pid = os.fork()
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                os.close(ready_r)
                for fd in (self.wake_r, self.wake_w):
                    os.close(fd)
                if self.sock is not None:
                    # The engine must not keep the API port bound once its parent is gone.
                    self.sock.close()
                _engine_main(self.s, ready_w)
            finally:
                os._exit(1)
        os.close(ready_w)
        self.engine_pid, self.engine_r = pid, ready_r

    def _reap_engine(self, timeout: float) -> int | None:
        """Wait up to timeout for EngineCore to exit; its exit status, or None if it is still running."""
        if self.engine_pid is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.engine_pid, os.WNOHANG)
            except ChildProcessError:
                self.engine_pid = None
                return 0
            if pid:
                self.engine_pid = None
                return os.waitstatus_to_exitcode(status)
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.02)

    def stop_engine(self, sig: int = signal.SIGTERM) -> None:
        if self.engine_pid is None:
            return
        with contextlib.suppress(OSError):
            os.kill(self.engine_pid, sig)
        if self._reap_engine(self.s.engine_shutdown_timeout) is None and self.engine_pid is not None:
            _log("WARNING", "utils.py:71", "force killing remaining process EngineCore")
            with contextlib.suppress(OSError):
                os.kill(self.engine_pid, signal.SIGKILL)
            self._reap_engine(5.0)

    # --- phases --------------------------------------------------------------------------------------------------

    def bind(self) -> str:
        s = self.s
        if s.uds:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(s.uds)
            except OSError:
                sock.close()
                raise
            self.sock = sock
            return f"unix:{s.uds}"
        host = s.host or ""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, s.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock
        shown = f"[{host}]" if family == socket.AF_INET6 else host or "0.0.0.0"  # noqa: S104 - what vLLM prints
        return f"http://{shown}:{s.port}"

    def wait_engine_ready(self) -> None:
        assert self.engine_r is not None
        while True:
            readable = self._wait([self.engine_r], None)
            if self._take_stop_request():
                self._interrupted_during_load()
            if self.engine_r in readable:
                data = os.read(self.engine_r, 64)
                if b"R" in data:
                    return
                if not data:
                    code = self._reap_engine(5.0)
                    _traceback(
                        "RuntimeError: Engine core initialization failed. See root cause above. "
                        f"Failed core proc(s): {{'EngineCore': {code if code is not None else 1}}}"
                    )
                    raise _Exit(1)

    def _interrupted_during_load(self) -> NoReturn:
        # vLLM turns SIGTERM during startup into KeyboardInterrupt("terminated"); left uncaught, Python then
        # ends the process with SIGINT after the engine has been shut down.
        self.stop_engine()
        _traceback("KeyboardInterrupt: terminated")
        _flush()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        os._exit(130)

    def start_http(self, listen_address: str) -> None:
        assert self.sock is not None
        _log("INFO", "entry.py:140", f"Starting vLLM server on {listen_address}")
        _log("INFO", "launcher.py:46", "Available routes are:")
        for path, methods in self.app.routes.items():
            _log("INFO", "launcher.py:54", f"Route: {path}, Methods: {', '.join(methods)}")
        _uvicorn(f"Started server process [{os.getpid()}]")
        _uvicorn("Waiting for application startup.")
        _uvicorn("Application startup complete.")
        self.sock.listen(2048)
        server = _Server(("127.0.0.1", 0), _Handler, bind_and_activate=False)
        server.socket.close()
        server.socket = self.sock
        server.app = self.app
        self.server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close_listener(self) -> None:
        self.app.closing.set()
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
        elif self.sock is not None:
            self.sock.close()
        self.app.close_idle_connections()

    def finish_http(self) -> int:
        _uvicorn("Shutting down")
        self.close_listener()
        if self.app.active > 0:
            _uvicorn("Waiting for connections to close. (CTRL+C to force quit)")
            while self.app.active > 0:
                self._wait([], 0.1)
                self.pending.clear()  # uvicorn ignores further signals while it waits
        _uvicorn("Waiting for application shutdown.")
        _uvicorn("Application shutdown complete.")
        _uvicorn(f"Finished server process [{os.getpid()}]")
        return 0

    def serve(self) -> int:
        s = self.s
        ready_at = time.monotonic()
        hang_at = ready_at + s.hang_after if s.hang_after is not None else None
        stall_at = ready_at + s.stall_after if s.stall_after is not None else None
        die_at = ready_at + s.die_after if s.die_after is not None else None
        exit_at: float | None = None
        stats_at = ready_at + s.stats_interval if not s.disable_log_stats and s.stats_interval > 0 else None
        last_stats = (0, 0)
        last_active = False
        while True:
            deadlines = [d for d in (hang_at, stall_at, die_at, exit_at, stats_at) if d is not None]
            timeout = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            readable = self._wait([self.engine_r] if self.engine_r is not None else [], timeout)
            if self._take_stop_request():
                return self.graceful_shutdown()
            if self.engine_r is not None and self.engine_r in readable and not os.read(self.engine_r, 64):
                os.close(self.engine_r)
                self.engine_r = None
                self.on_engine_death()
                if not s.keep_alive_on_engine_death:
                    exit_at = time.monotonic() + s.engine_death_grace
            now = time.monotonic()
            if hang_at is not None and now >= hang_at:
                hang_at = None
                _log("WARNING", "stub_engine.py:1", "gpushare stub: no longer answering HTTP (--stub-hang-after)")
                self.engine.hung.set()
            if stall_at is not None and now >= stall_at:
                stall_at = None
                _log("WARNING", "stub_engine.py:1", "gpushare stub: engine stalled (--stub-stall-after)")
                self.engine.stalled.set()
            if die_at is not None and now >= die_at:
                self.crash()
            if exit_at is not None and now >= exit_at:
                return self.finish_http()
            if stats_at is not None and now >= stats_at:
                running, waiting, kv, prompt, generation, queries, hits = self.engine.snapshot()
                interval = s.stats_interval
                active = bool(running or waiting or prompt != last_stats[0] or generation != last_stats[1])
                if active or last_active:
                    _log(
                        "INFO",
                        "loggers.py:259",
                        f"Engine 000: Avg prompt throughput: {(prompt - last_stats[0]) / interval:.1f} tokens/s, "
                        f"Avg generation throughput: {(generation - last_stats[1]) / interval:.1f} tokens/s, "
                        f"Running: {running} reqs, Waiting: {waiting} reqs, GPU KV cache usage: {kv * 100:.1f}%, "
                        f"Prefix cache hit rate: {(hits / queries * 100) if queries else 0.0:.1f}%",
                    )
                last_stats, last_active = (prompt, generation), active
                stats_at = now + interval

    def on_engine_death(self) -> None:
        self.engine.dead.set()
        self._reap_engine(1.0)
        _log("ERROR", "core_client.py:564", "Engine core proc EngineCore died unexpectedly, shutting down client.")
        _log(
            "ERROR",
            "async_llm.py:529",
            f"AsyncLLM output_handler failed.\nvllm.v1.engine.exceptions.EngineDeadError: {ENGINE_DEAD_MESSAGE}",
        )

    def crash(self) -> NoReturn:
        _traceback(
            f"RuntimeError: gpushare stub: simulated API server crash after {self.s.die_after} s (--stub-die-after)"
        )
        if self.engine_pid is not None:
            self.stop_engine(signal.SIGKILL)
        _flush()
        os._exit(self.s.die_exit_code)

    def graceful_shutdown(self) -> int:
        s = self.s
        mode = "abort" if s.shutdown_timeout == 0 else "drain"
        _log("INFO", "launcher.py:113", "[shutdown] API server: shutdown triggered")
        _log(
            "INFO",
            "launcher.py:123",
            f"[shutdown] API server: stopping engine client mode={mode} timeout={s.shutdown_timeout}s",
        )
        self.close_listener()
        if mode == "drain":
            deadline = time.monotonic() + s.shutdown_timeout
            while time.monotonic() < deadline and (self.engine.running or self.engine.waiting):
                self._wait([], 0.05)
                self.pending.clear()
        self.engine.abort.set()
        self.stop_engine()
        _log("INFO", "launcher.py:130", "[shutdown] API server: engine client stopped")
        _log("INFO", "launcher.py:133", "[shutdown] API server: signalling HTTP server shutdown")
        _log("INFO", "launcher.py:156", "[shutdown] API server: shutting down FastAPI HTTP server")
        return self.finish_http()

    def run(self) -> int:
        s = self.s
        self.install_signals()
        try:
            listen_address = self.bind()
        except OSError as exc:
            _traceback(f"OSError: [Errno {exc.errno}] {exc.strerror}")
            return 1
        try:
            self.spawn_engine()
            self.wait_engine_ready()
            try:
                self.start_http(listen_address)
            except OSError as exc:
                _uvicorn(f"[Errno {exc.errno}] {exc.strerror}", "ERROR")
                self.stop_engine()
                return 1
            if s.disable_log_stats:
                _log("INFO", "stub_engine.py:1", "gpushare stub: --disable-log-stats, no vllm:* metrics")
            return self.serve()
        except _Exit as exc:
            self.stop_engine(signal.SIGKILL)
            return exc.code


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _start_record(args: list[str]) -> None:
    cgroup = None
    with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
        cgroup = f.read().strip()
    cwd = None
    with contextlib.suppress(OSError):
        cwd = os.getcwd()
    record = {
        "argv": [sys.argv[0], *args],
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "uid": os.getuid(),
        "euid": os.geteuid(),
        "gid": os.getgid(),
        "cwd": cwd,
        "HIP_VISIBLE_DEVICES": os.environ.get("HIP_VISIBLE_DEVICES"),
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "ROCR_VISIBLE_DEVICES": os.environ.get("ROCR_VISIBLE_DEVICES"),
        "cgroup": cgroup,
    }
    line = json.dumps(record)
    _log("INFO", "stub_engine.py:1", f"gpushare-stub-engine start {line}")
    path = os.environ.get("GPUSHARE_STUB_RECORD_FILE")
    if path:
        try:
            with open(path, "a") as f:
                f.write(line + "\n")
        except OSError as exc:
            _log("WARNING", "stub_engine.py:1", f"gpushare stub: cannot append to {path}: {exc}")


def _sync_visibility_env() -> None:
    """vLLM's ROCm platform check, run at import time in vLLM (so before any argument is parsed)."""
    hip = os.environ.get("HIP_VISIBLE_DEVICES") or None
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES") or None
    if hip is not None and cuda is not None:
        if hip != cuda:
            raise ValueError(
                f"Inconsistent GPU visibility env vars: HIP_VISIBLE_DEVICES='{hip}' vs CUDA_VISIBLE_DEVICES='{cuda}'. "
                "Please set only one, or ensure they match."
            )
    elif hip is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = hip
    elif cuda is not None:
        os.environ["HIP_VISIBLE_DEVICES"] = cuda


def _config_error(s: Settings) -> str | None:
    util = s.gpu_memory_utilization
    if util > 1 or util <= 0:
        kind, text = ("less_than_equal", "less than or equal to 1") if util > 1 else ("greater_than", "greater than 0")
        return (
            "pydantic_core._pydantic_core.ValidationError: 1 validation error for CacheConfig\n"
            f"gpu_memory_utilization\n  Input should be {text} [type={kind}, input_value={util}, input_type=float]"
        )
    if s.fail_start == "model":
        return (
            "huggingface_hub.errors.LocalEntryNotFoundError: Cannot find an appropriate cached snapshot folder for the "
            "specified revision on the local disk and outgoing traffic has been disabled. To enable repo look-ups and "
            "downloads online, pass 'local_files_only=False' as input."
        )
    return None


def main(argv: list[str] | None = None) -> int:
    """``gpushared-stub-engine serve MODEL [flags]``; returns the process exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    _start_record(args)
    try:
        _sync_visibility_env()
    except ValueError as exc:
        _traceback(f"ValueError: {exc}")
        return 1
    try:
        namespace, non_default = parse_serve_args(args)
        settings = settings_from_args(namespace, non_default)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except ValueError as exc:
        _traceback(f"ValueError: {exc}")
        return 1
    except UsageError as exc:
        _emit(f"usage: vllm serve [model_tag] [options]\nvllm serve: error: {exc}", err=True)
        return 2
    if "VLLM_USE_V1" in os.environ:
        _log("WARNING", "envs.py:1687", "Unknown vLLM environment variable detected: VLLM_USE_V1")
    _log("INFO", "api_utils.py:292", f"vLLM API server version {VLLM_VERSION}")
    _log("INFO", "api_utils.py:293", f"model   {settings.model}")
    _log("INFO", "utils.py:253", f"non-default args: {settings.non_default}")
    error = _config_error(settings)
    if error is not None:
        _traceback(error)
        return 1
    return ApiServer(settings).run()


if __name__ == "__main__":
    sys.exit(main())
