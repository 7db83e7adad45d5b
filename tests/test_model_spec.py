"""Model specs, the vLLM option allowlist, and the argv and environment built for a model child (pure)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpushared.domain.errors import ConfigError, FailedPrecondition, InvalidArgument, ResourceExhausted
from gpushared.domain.gpu import GIB, MIB
from gpushared.domain.model import (
    DAEMON_OWNED,
    HARD_DENIED,
    KNOWN_OPTIONS,
    ModelSpec,
    derive_memory_bytes,
    parse_allowlist,
    resolve_option,
    validate_spec,
)
from gpushared.domain.vllm_args import (
    BASE_ENV_ALLOWED,
    FORBIDDEN_ENV,
    build_argv,
    build_env,
    gpu_memory_utilization,
)

ALLOW = ("enable-prefix-caching", "max-num-batched-tokens", "enforce-eager")
SPEC = ModelSpec(name="qwen", model="Qwen/Qwen3-0.6B")
LAUNCHER = ["/opt/vllm/bin/vllm"]
CPX_CAP = 24574 * MIB


def argv_for(spec: ModelSpec, **overrides: object) -> list[str]:
    kwargs: dict[str, object] = {
        "launcher": LAUNCHER,
        "model_path_or_id": spec.model,
        "port": 18100,
        "partition_cap_bytes": CPX_CAP,
        "memory_bytes_per_partition": 12 * GIB,
        "kv_cache_bytes_supported": True,
    }
    kwargs.update(overrides)
    return build_argv(spec, **kwargs)  # type: ignore[arg-type]


def refused(spec: ModelSpec, fragment: str, allowlist: tuple[str, ...] = ALLOW) -> None:
    """The spec is refused by validation AND by the builder, with the same message: nothing is built."""
    with pytest.raises(InvalidArgument) as by_validation:
        validate_spec(spec, allowlist)
    assert fragment in str(by_validation.value)
    if not str(by_validation.value).count("not allowed on this host"):
        with pytest.raises(InvalidArgument) as by_builder:
            argv_for(spec)
        assert str(by_builder.value) == str(by_validation.value)


# --- the model reference -------------------------------------------------------------------------

HOSTILE_MODELS = [
    ("--trust-remote-code", "starts with '-', which vLLM would read as an option"),
    ("-h", "starts with '-'"),
    ("-", "starts with '-'"),
    ("../../etc/shadow", "'..' is not allowed"),
    ("org/..", "'..' is not allowed"),
    ("/models/../etc", "the path has a '..' component"),
    ("/models/./llama", "the path has a '.' component"),
    ("/models//llama", "an empty component"),
    ("/models/llama/", "an empty component"),
    ("/", "'/' is not a model directory"),
    ("models", "neither a hub id (org/name) nor an absolute path"),
    ("./models/llama", "neither a hub id"),
    ("~/models/llama", "neither a hub id"),
    ("org/name/extra", "neither a hub id"),
    ("org/-name", "neither a hub id"),
    ("org/na\x00me", "U+0000"),
    ("/models/llama\x00", "U+0000"),
    ("org/name\n--trust-remote-code", "U+000A"),
    ("/models/llama\r", "U+000D"),
    ("/models/\x1b[31mllama", "U+001B"),
    ("/models/\u202eamall", "U+202E"),
    ("Qwen/Qwen3\u200b", "U+200B"),
    ("/models/llama\u00a03", "U+00A0"),
    ("meta\u2010llama/Llama-3", "non-ASCII character U+2010"),
    ("Qwen/Qw\u0435n3", "non-ASCII character U+0435"),
    ("\uff31wen/Qwen3", "non-ASCII character U+FF31"),
    ("a" * 10240, "10240 characters, more than the 1024 allowed"),
    ("/" + "a" * 10239, "10240 characters"),
    ("/models/" + "a" * 256, "longer than 255 bytes"),
    ("o" * 97 + "/name", "neither a hub id"),
    ("", "model: required"),
]


@pytest.mark.parametrize(("model", "fragment"), HOSTILE_MODELS)
def test_hostile_model_is_refused_and_nothing_is_built(model: str, fragment: str) -> None:
    refused(replace(SPEC, model=model, served_name="qwen"), fragment)


def test_hostile_model_path_passed_to_the_builder_is_refused() -> None:
    with pytest.raises(InvalidArgument, match="model path or id '--trust-remote-code': starts with '-'"):
        argv_for(SPEC, model_path_or_id="--trust-remote-code")
    with pytest.raises(InvalidArgument, match=r"'\.\.' component"):
        argv_for(SPEC, model_path_or_id="/models/../etc")


def test_message_shows_hostile_text_escaped_and_truncated() -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(replace(SPEC, model="org/x\n" + "y" * 10000), ALLOW)
    message = str(caught.value)
    assert "\n" not in message
    assert len(message) < 300
    assert message.startswith("model 'org/x\\ny")


@pytest.mark.parametrize(
    ("model", "served"),
    [
        ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-0.6B"),
        ("meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"),
        ("/models/tiny-llama", "tiny-llama"),
        ("/srv/models/org_x/Llama-3.1-8B", "Llama-3.1-8B"),
        ("/srv/m\u00f6dels/tiny", "tiny"),
    ],
)
def test_good_models_are_accepted_and_served_under_a_derived_name(model: str, served: str) -> None:
    spec = replace(SPEC, model=model)
    validate_spec(spec, ALLOW)
    assert spec.served_model_name == served
    argv = argv_for(spec)
    assert argv[argv.index("--served-model-name") + 1] == served
    assert argv[2] == model


def test_a_path_whose_last_component_is_no_served_name_needs_an_explicit_one() -> None:
    spec = replace(SPEC, model="/srv/models/Llama 3 (8B)")
    with pytest.raises(InvalidArgument, match="derived from the model") as caught:
        validate_spec(spec, ALLOW)
    assert "served name 'Llama 3 (8B)'" in str(caught.value)
    validate_spec(replace(spec, served_name="llama-3-8b"), ALLOW)


# --- other fields ---------------------------------------------------------------------------------

BAD_FIELDS: list[tuple[dict[str, object], str]] = [
    ({"name": ""}, "model name: required"),
    ({"name": "-x"}, "model name '-x': not a valid name"),
    ({"name": "a" * 64}, "not a valid name"),
    ({"name": "a/b"}, "not a valid name"),
    ({"engine": "docker"}, "engine 'docker': unknown"),
    ({"served_name": "--trust-remote-code"}, "not a valid served model name"),
    ({"served_name": "a/b/c"}, "not a valid served model name"),
    ({"served_name": "a/../b"}, "not a valid served model name"),
    ({"served_name": "q\nwen"}, "not a valid served model name"),
    ({"partitions": 0}, "partitions: 0 is out of range 1-8"),
    ({"partitions": 9}, "partitions: 9 is out of range 1-8"),
    ({"partitions": True}, "partitions: must be a whole number, not bool"),
    ({"memory_bytes": 0}, "memory: 0 is out of range"),
    ({"memory_bytes": 2**64}, "memory: 18446744073709551616 is out of range"),
    ({"kv_cache_bytes": -1}, "kv cache: -1 is out of range"),
    ({"max_model_len": 0}, "max model len: 0 is out of range"),
    ({"max_model_len": 2**40}, "max model len"),
    ({"dtype": "int8"}, "dtype 'int8': not a vLLM dtype"),
    ({"dtype": "--trust-remote-code"}, "not a vLLM dtype"),
    ({"max_num_seqs": 0}, "max num seqs: 0 is out of range"),
]


@pytest.mark.parametrize(("fields", "fragment"), BAD_FIELDS)
def test_bad_fields_are_refused_and_nothing_is_built(fields: dict[str, object], fragment: str) -> None:
    refused(replace(SPEC, **fields), fragment)  # type: ignore[arg-type]


@pytest.mark.parametrize("partitions", [1, 2, 3, 4, 8])
def test_any_tensor_parallel_size_up_to_eight_is_accepted(partitions: int) -> None:
    # vLLM itself checks that the model's attention heads divide by it, at config time, before loading.
    validate_spec(replace(SPEC, partitions=partitions), ALLOW)


# --- extra options --------------------------------------------------------------------------------

ACCEPTED_OPTIONS = [
    ("enable-prefix-caching", "", ["--enable-prefix-caching"]),
    ("enable_prefix_caching", "", ["--enable-prefix-caching"]),
    ("--enable-prefix-caching", "", ["--enable-prefix-caching"]),
    ("--enable_prefix_caching", "", ["--enable-prefix-caching"]),
    ("--enable-prefix-cach", "", ["--enable-prefix-caching"]),
    ("--disable-prefix-caching", "", ["--disable-prefix-caching"]),
    ("max_num_batched_tokens", "8192", ["--max-num-batched-tokens", "8192"]),
    ("--max-num-batched", "8192", ["--max-num-batched-tokens", "8192"]),
    ("max-num-batched-tokens", "-1", ["--max-num-batched-tokens", "-1"]),
    ("-enforce-eager", "", ["--enforce-eager"]),
    ("--no-enforce-eager", "", ["--no-enforce-eager"]),
    # vLLM 0.32's negative spelling, which 0.33 still accepts without listing it.
    ("--no-enable-prefix-caching", "", ["--no-enable-prefix-caching"]),
]


@pytest.mark.parametrize(("key", "value", "expected"), ACCEPTED_OPTIONS)
def test_allowlisted_options_are_accepted_in_every_spelling(key: str, value: str, expected: list[str]) -> None:
    spec = replace(SPEC, options=((key, value),))
    validate_spec(spec, ALLOW)
    assert argv_for(spec)[-len(expected) :] == expected


REFUSED_OPTIONS = [
    # Abbreviations and underscores resolve to the option vLLM would run.
    ("--trust-remote", "", "option '--trust-remote' (vLLM reads it as --trust-remote-code): not allowed on this host"),
    ("--trust_remote_code", "", "(vLLM reads it as --trust-remote-code): not allowed on this host"),
    ("trust-remote-code", "", "option --trust-remote-code: not allowed on this host"),
    ("--trust-remote-code", "", "option --trust-remote-code: not allowed on this host"),
    ("--no-trust-remote-code", "", "not allowed on this host (part of --trust-remote-code)"),
    ("--enable-p", "", "ambiguous, it abbreviates --enable-per-request-metrics, --enable-prefix-caching"),
    ("--max-num", "8", "ambiguous"),
    ("--no-such-option", "1", "option '--no-such-option': not a vLLM 0.33.0 serve option"),
    ("--TRUST-REMOTE-CODE", "", "not a vLLM 0.33.0 serve option"),
    ("--seed", "1", "option --seed: not allowed on this host"),
    # One dash reads a short alias, two dashes a prefix of the long options, as argparse does.
    ("-ep", "", "(vLLM reads it as --enable-expert-parallel): not allowed on this host"),
    ("--ep", "{}", "(vLLM reads it as --eplb-config): not allowed on this host"),
    ("-q", "awq", "(vLLM reads it as --quantization): not allowed on this host"),
    # Set by gpushare, allowlisted or not (see test_owned_and_denied_refused_even_if_allowlisted).
    (
        "--gpu-memory-utilization",
        "0.99",
        "option --gpu-memory-utilization: set by gpushare (from the spec's memory budget)",
    ),
    ("--gpu-mem", "0.99", "(vLLM reads it as --gpu-memory-utilization): set by gpushare"),
    ("--device-memory-utilization", "1", "set by gpushare (from the spec's memory budget)"),
    ("--kv-cache-memory", "64G", "(vLLM reads it as --kv-cache-memory-bytes): set by gpushare"),
    ("-tp", "8", "(vLLM reads it as --tensor-parallel-size): set by gpushare"),
    ("--disable-log-stats", "", "set by gpushare (never passed: it removes every vllm: metric)"),
    ("--api-key", "k", "set by gpushare"),
    ("--served-model-name", "other", "set by gpushare"),
    ("--host", "0.0.0.0", "set by gpushare"),
    ("--port", "80", "set by gpushare"),
    ("--model", "evil/model", "set by gpushare"),
    ("--max-model-len", "1000000", "set by gpushare"),
    # Hard-denied whatever the allowlist says.
    ("--worker-cls", "evil.Worker", "option --worker-cls: never allowed, it runs or imports code"),
    ("--chat-template", "/etc/shadow", "option --chat-template: never allowed, it reads or writes files"),
    ("--ssl-keyfile", "/etc/shadow", "never allowed"),
    ("--allowed-local-media-path", "/", "never allowed"),
    ("--lora-modules", "x=/etc", "never allowed"),
    ("--config", "/etc/gpushare.yaml", "never allowed"),
    ("--uds", "/run/x.sock", "never allowed, it opens or exposes network endpoints"),
    ("--device-ids", "0,1,2,3", "never allowed, it uses devices or memory outside"),
    ("--compilation-config", '{"debug_dump_path": "/etc"}', "never allowed"),
    ("-cc", "{}", "(vLLM reads it as --compilation-config): never allowed"),
    ("--help", "", "never allowed"),
    ("-h", "", "never allowed"),
    # Values.
    ("--max-num-batched-tokens", "--trust-remote-code", "value '--trust-remote-code' starts with '-'"),
    ("--max-num-batched-tokens", "-0.5", "value '-0.5' starts with '-'"),
    ("--max-num-batched-tokens", "-", "starts with '-'"),
    ("--max-num-batched-tokens", "1\n--trust-remote-code", "U+000A"),
    ("--max-num-batched-tokens", "1\x00", "U+0000"),
    ("--max-num-batched-tokens", "1\u202e", "U+202E"),
    ("--max-num-batched-tokens", "9" * 10240, "value is 10240 characters, more than the 1024 allowed"),
    ("--max-num-batched-tokens", "", "needs a value"),
    ("--enforce-eager", "true", "takes no value"),
    # Names that are not option names at all.
    ("--max-num-batched-tokens=5", "", "not an option name"),
    ("--compilation-config.debug_dump_path", "/etc", "not an option name"),
    ("--enforce eager", "", "not an option name"),
    ("-O3", "", "not a vLLM 0.33.0 serve option"),
    ("", "", "option: empty name"),
    ("-" * 200, "", "name longer than 100 characters"),
]


@pytest.mark.parametrize(("key", "value", "fragment"), REFUSED_OPTIONS)
def test_refused_options(key: str, value: str, fragment: str) -> None:
    refused(replace(SPEC, options=((key, value),)), fragment)


def test_short_alias_without_dashes_is_read_when_no_long_option_matches() -> None:
    assert resolve_option("q", "awq").argv() == ["--quantization", "awq"]
    with pytest.raises(InvalidArgument, match=r"'tp' \(vLLM reads it as --tensor-parallel-size\): set by gpushare"):
        resolve_option("tp", "2")


def test_malformed_option_pairs_are_refused() -> None:
    refused(replace(SPEC, options=(("enforce-eager", ""), ("seed",))), "each option must be a (name, value) pair")  # type: ignore[arg-type]
    refused(replace(SPEC, options=(("seed", 1),)), "option --seed: the value must be text, not int")  # type: ignore[arg-type]


def test_an_option_given_twice_in_any_spelling_is_refused() -> None:
    spec = replace(SPEC, options=(("enable_prefix_caching", ""), ("--disable-prefix-caching", "")))
    refused(spec, "given twice (also as 'enable_prefix_caching')")


def test_too_many_options_are_refused() -> None:
    refused(replace(SPEC, options=(("enforce-eager", ""),) * 65), "options: 65 given, more than the 64 allowed")


def test_trust_remote_code_is_allowed_only_when_named_explicitly() -> None:
    spec = replace(SPEC, options=(("--trust-remote", ""),))
    refused(spec, "not allowed on this host")
    validate_spec(spec, (*ALLOW, "trust-remote-code"))
    assert argv_for(spec)[-1] == "--trust-remote-code"


@pytest.mark.parametrize("action", sorted({*DAEMON_OWNED, *HARD_DENIED}))
def test_owned_and_denied_refused_even_if_allowlisted(action: str) -> None:
    with pytest.raises(InvalidArgument, match=r"set by gpushare|never allowed"):
        validate_spec(replace(SPEC, options=((action, "1"),)), (*ALLOW, action))
    with pytest.raises(InvalidArgument, match=r"set by gpushare|never allowed"):
        resolve_option(action, "")


def test_owned_and_denied_name_real_vllm_actions() -> None:
    assert set(DAEMON_OWNED) <= KNOWN_OPTIONS
    assert set(HARD_DENIED) <= KNOWN_OPTIONS
    assert not set(DAEMON_OWNED) & set(HARD_DENIED)
    assert "trust-remote-code" not in HARD_DENIED
    assert {"disable-log-stats", "gpu-memory-utilization", "kv-cache-memory-bytes", "api-key"} <= set(DAEMON_OWNED)


def test_options_are_emitted_in_their_canonical_spelling_never_the_requesters() -> None:
    option = resolve_option("--max_num_batch", "4096")
    assert option.argv() == ["--max-num-batched-tokens", "4096"]
    assert option.action == "max-num-batched-tokens"


def test_allowlist_entries_that_name_nothing_grant_nothing() -> None:
    spec = replace(SPEC, options=(("enforce-eager", ""),))
    validate_spec(spec, ("--enforce_eager",))
    refused(spec, "not allowed on this host", allowlist=("enforce", "", "enforce-eager=1", "-", "x" * 500))


def test_parse_allowlist_is_strict() -> None:
    assert parse_allowlist(["--enable_prefix_caching", "disable-prefix-caching", "trust-remote-code"]) == {
        "enable-prefix-caching",
        "trust-remote-code",
    }
    for entry, fragment in [
        ("trust-remote", "not a vLLM 0.33.0 serve option"),
        ("worker-cls", "never allowed"),
        ("gpu-memory-utilization", "set by gpushare"),
        ("max-num-batched-tokens=1", "not an option name"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            parse_allowlist([entry])


# --- memory ---------------------------------------------------------------------------------------


def test_derived_memory_is_ninety_percent_of_each_cap_in_whole_mib() -> None:
    per_partition = CPX_CAP * 90 // 100 // MIB * MIB
    assert derive_memory_bytes(SPEC, CPX_CAP) == per_partition
    assert derive_memory_bytes(replace(SPEC, partitions=4), CPX_CAP) == 4 * per_partition
    assert per_partition % MIB == 0
    assert per_partition <= CPX_CAP * 0.9


def test_explicit_memory_is_kept_when_each_share_fits_the_cap() -> None:
    assert derive_memory_bytes(replace(SPEC, memory_bytes=20 * GIB), CPX_CAP) == 20 * GIB
    assert derive_memory_bytes(replace(SPEC, memory_bytes=2 * CPX_CAP, partitions=2), CPX_CAP) == 2 * CPX_CAP
    with pytest.raises(ResourceExhausted, match="exceeds the partition cap of 24574 MiB"):
        derive_memory_bytes(replace(SPEC, memory_bytes=2 * CPX_CAP + 1, partitions=2), CPX_CAP)
    with pytest.raises(InvalidArgument, match="partition cap: 0 is out of range"):
        derive_memory_bytes(SPEC, 0)
    with pytest.raises(ResourceExhausted, match="too small to derive a budget"):
        derive_memory_bytes(SPEC, MIB)


@pytest.mark.parametrize(
    ("budget", "total", "expected"),
    [
        (24 * GIB, 192 * GIB, "0.125"),
        (96 * GIB, 192 * GIB, "0.5"),
        (192 * GIB, 192 * GIB, "1.0"),
        (22116 * MIB, 24574 * MIB, "0.8999"),
        (3 * GIB, 10 * GIB, "0.3"),
        # 25 * float("0.28") is 7.000000000000001, so vLLM's ceil would take 8 bytes: step down.
        (7, 25, "0.2799"),
    ],
)
def test_utilization_examples(budget: int, total: int, expected: str) -> None:
    assert gpu_memory_utilization(budget, total) == expected


def test_utilization_refuses_budgets_it_cannot_express() -> None:
    with pytest.raises(ResourceExhausted, match="exceeds the 24 GiB the partition reports"):
        gpu_memory_utilization(24 * GIB + 1, 24 * GIB)
    with pytest.raises(InvalidArgument, match="less than 1/10000"):
        gpu_memory_utilization(1 * MIB, 24 * GIB)
    with pytest.raises(InvalidArgument, match="memory budget: 0"):
        gpu_memory_utilization(0, 24 * GIB)


@given(
    total=st.integers(min_value=MIB, max_value=256 * GIB),
    fraction=st.fractions(min_value=0, max_value=1),
)
def test_utilization_never_gives_vllm_more_than_the_budget(total: int, fraction: object) -> None:
    budget = max(1, int(total * fraction))  # type: ignore[operator]
    if budget * 10**4 < total:
        with pytest.raises(InvalidArgument):
            gpu_memory_utilization(budget, total)
        return
    text = gpu_memory_utilization(budget, total)
    utilization = float(text)
    # What vLLM 0.33 computes (v1/worker/utils.py request_memory): ceil(total * F).
    assert math.ceil(total * utilization) <= budget
    assert 0 < utilization <= 1
    assert utilization > budget / total - 0.01
    assert len(text.split(".")[1]) <= 4


# --- argv -----------------------------------------------------------------------------------------


def test_argv_for_a_typical_spec() -> None:
    spec = ModelSpec(
        name="llama",
        model="meta-llama/Llama-3.1-8B-Instruct",
        served_name="llama-8b",
        memory_bytes=40 * GIB,
        partitions=2,
        max_model_len=8192,
        dtype="bfloat16",
        max_num_seqs=64,
        options=(("enable_prefix_caching", ""), ("--max-num-batched", "8192")),
    )
    validate_spec(spec, ALLOW)
    argv = build_argv(
        spec,
        launcher=["/opt/vllm/bin/vllm"],
        model_path_or_id="/var/lib/gpushare/models/meta-llama--Llama-3.1-8B-Instruct",
        port=18100,
        partition_cap_bytes=CPX_CAP,
        memory_bytes_per_partition=20 * GIB,
        kv_cache_bytes_supported=True,
    )
    assert argv == [
        "/opt/vllm/bin/vllm",
        "serve",
        "/var/lib/gpushare/models/meta-llama--Llama-3.1-8B-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        "18100",
        "--served-model-name",
        "llama-8b",
        "--tensor-parallel-size",
        "2",
        "--gpu-memory-utilization",
        "0.8334",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "8192",
        "--max-num-seqs",
        "64",
        "--enable-prefix-caching",
        "--max-num-batched-tokens",
        "8192",
    ]
    assert math.ceil(CPX_CAP * 0.8334) <= 20 * GIB


def test_argv_minimal_spec_and_stub_launcher() -> None:
    argv = argv_for(replace(SPEC, engine="stub"), launcher=["/usr/bin/python3", "-m", "tests.fakes.fake_vllm"])
    assert argv == [
        "/usr/bin/python3",
        "-m",
        "tests.fakes.fake_vllm",
        "serve",
        "Qwen/Qwen3-0.6B",
        "--host",
        "127.0.0.1",
        "--port",
        "18100",
        "--served-model-name",
        "Qwen/Qwen3-0.6B",
        "--tensor-parallel-size",
        "1",
        "--gpu-memory-utilization",
        "0.5",
        "--dtype",
        "auto",
    ]


def test_argv_is_deterministic_and_never_disables_stats_or_request_logs() -> None:
    spec = replace(SPEC, options=(("enforce-eager", ""), ("enable-prefix-caching", "")))
    first, second = argv_for(spec), argv_for(spec)
    assert first == second
    assert not {"--disable-log-stats", "--disable-log-requests", "--api-key"} & set(first)


def test_kv_cache_bytes_go_with_the_utilization_when_supported() -> None:
    spec = replace(SPEC, kv_cache_bytes=4 * GIB)
    argv = argv_for(spec)
    assert argv[argv.index("--kv-cache-memory-bytes") + 1] == str(4 * GIB)
    assert "--gpu-memory-utilization" in argv
    assert "--kv-cache-memory-bytes" not in argv_for(SPEC, kv_cache_bytes_supported=False)
    with pytest.raises(FailedPrecondition, match="kv cache: this vLLM has no --kv-cache-memory-bytes"):
        argv_for(spec, kv_cache_bytes_supported=False)
    with pytest.raises(InvalidArgument, match="leaves nothing of the 4 GiB budget"):
        argv_for(spec, memory_bytes_per_partition=4 * GIB)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"port": 0}, "port: 0 is out of range 1024-65535"),
        ({"port": 80}, "out of range"),
        ({"port": 65536}, "out of range"),
        ({"launcher": []}, "launcher: must be a non-empty list"),
        ({"launcher": "vllm"}, "launcher: must be a non-empty list"),
        ({"launcher": ["/bin/vllm\x00"]}, "launcher: contains a NUL"),
        ({"memory_bytes_per_partition": CPX_CAP + 1}, "exceeds the 24574 MiB the partition reports"),
    ],
)
def test_builder_refuses_bad_facts(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises((InvalidArgument, ResourceExhausted), match=fragment.replace("(", r"\(")):
        argv_for(SPEC, **overrides)


# --- environment ----------------------------------------------------------------------------------

LEASE = {
    "HIP_VISIBLE_DEVICES": "9,10",
    "CUDA_VISIBLE_DEVICES": "9,10",
    "GPUSHARE_ALLOCATION_ID": "a-0123456789ab",
    "GPUSHARE_MEMORY_BYTES_PER_PARTITION": str(20 * GIB),
}


def env_for(**overrides: object) -> dict[str, str]:
    kwargs: dict[str, object] = {
        "base": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
        "lease_env": LEASE,
        "home": "/var/lib/gpushare/m/llama/home",
        "tmpdir": "/var/lib/gpushare/m/llama/tmp",
        "cache_dir": "/var/cache/gpushare/llama",
        "hf_home": "/var/cache/gpushare/hf",
        "api_key": None,
        "offline": False,
    }
    kwargs.update(overrides)
    return build_env(**kwargs)  # type: ignore[arg-type]


def test_env_for_a_typical_child() -> None:
    assert env_for(api_key="s3cret", offline=True) == {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HIP_VISIBLE_DEVICES": "9,10",
        "CUDA_VISIBLE_DEVICES": "9,10",
        "GPUSHARE_ALLOCATION_ID": "a-0123456789ab",
        "GPUSHARE_MEMORY_BYTES_PER_PARTITION": str(20 * GIB),
        "HOME": "/var/lib/gpushare/m/llama/home",
        "TMPDIR": "/var/lib/gpushare/m/llama/tmp",
        "XDG_CACHE_HOME": "/var/cache/gpushare/llama",
        "VLLM_CACHE_ROOT": "/var/cache/gpushare/llama/vllm",
        "HF_HOME": "/var/cache/gpushare/hf",
        "VLLM_API_KEY": "s3cret",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


def test_env_without_key_or_offline_sets_neither() -> None:
    env = env_for(base={})
    assert "VLLM_API_KEY" not in env
    assert "HF_HUB_OFFLINE" not in env
    assert env["PATH"] == "/usr/local/bin:/usr/bin:/bin"


def test_env_visibility_follows_the_lease() -> None:
    env = env_for(lease_env={"HIP_VISIBLE_DEVICES": "3", "ROCR_VISIBLE_DEVICES": "0"})
    assert env["HIP_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "3"
    assert "ROCR_VISIBLE_DEVICES" not in env
    for lease, fragment in [
        ({"HIP_VISIBLE_DEVICES": "1", "CUDA_VISIBLE_DEVICES": "2"}, "differ"),
        ({}, "device list None"),
        ({"HIP_VISIBLE_DEVICES": ""}, "not a comma-separated list"),
        ({"HIP_VISIBLE_DEVICES": "1,2\n"}, "not a comma-separated list"),
        ({"HIP_VISIBLE_DEVICES": "1,1"}, "names a partition twice"),
    ]:
        with pytest.raises(InvalidArgument, match=fragment):
            env_for(lease_env=lease)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"api_key": ""}, "api key: must be 1-512 visible ASCII characters"),
        ({"api_key": "a b"}, "api key"),
        ({"api_key": "k\n"}, "api key"),
        ({"home": "relative/home"}, "HOME 'relative/home': not an absolute path"),
        ({"tmpdir": "/tmp/../etc"}, "TMPDIR"),
        ({"cache_dir": ""}, "XDG_CACHE_HOME: required"),
        ({"hf_home": "/hf\x00"}, "HF_HOME"),
        ({"home": "/" + "h" * 2000}, "HOME '/hhh"),
        ({"base": {"PATH": "/bin\n"}}, "environment PATH"),
    ],
)
def test_env_refuses_bad_facts(overrides: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidArgument, match=fragment):
        env_for(**overrides)


def test_env_allowlist_and_forbidden_names_are_disjoint() -> None:
    assert not BASE_ENV_ALLOWED & FORBIDDEN_ENV
    assert {"NOTIFY_SOCKET", "LD_PRELOAD", "PYTHONPATH", "VLLM_SERVER_DEV_MODE", "VLLM_PORT"} <= FORBIDDEN_ENV


_VALUES = st.text(st.characters(min_codepoint=32, max_codepoint=0x2FFF, exclude_characters="\x7f"), max_size=30)
_NAMES = st.sampled_from(sorted(FORBIDDEN_ENV | BASE_ENV_ALLOWED | {"HOME", "HF_TOKEN", "VLLM_API_KEY"})) | st.text(
    min_size=1, max_size=20
)


@given(base=st.dictionaries(_NAMES, _VALUES, max_size=25), lease_extra=st.dictionaries(_NAMES, _VALUES, max_size=10))
def test_env_never_contains_forbidden_variables(base: dict[str, str], lease_extra: dict[str, str]) -> None:
    lease = {**lease_extra, "HIP_VISIBLE_DEVICES": "4", "CUDA_VISIBLE_DEVICES": "4"}
    env = env_for(base=base, lease_env=lease)
    assert not FORBIDDEN_ENV & env.keys()
    assert env["HIP_VISIBLE_DEVICES"] == env["CUDA_VISIBLE_DEVICES"] == "4"
    # A name from base that is not allowlisted is either absent or holds gpushare's own value.
    reference = env_for(base={}, lease_env=lease)
    for name in set(base) - BASE_ENV_ALLOWED:
        assert env.get(name) == reference.get(name)
    assert "HF_TOKEN" not in env
    assert "VLLM_API_KEY" not in env
