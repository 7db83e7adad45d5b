"""Model specs: what one model server serves, its memory budget, and which extra vLLM options a requester may pass.

A ``ModelSpec`` is what a user asks for; ``validate_spec`` refuses anything that could turn into
a second command-line option, a file read or a wider grant than asked, before any argv is built.
Pure and synchronous: standard library and other domain modules only, no I/O. Whether a local
model path is readable by the child's user is checked elsewhere, by an adapter, as that user.

Extra vLLM options (``ModelSpec.options``) are matched the way vLLM's own parser reads them, not
as strings: vLLM's ``FlexibleArgumentParser`` turns ``_`` into ``-`` and argparse accepts any
unique prefix of a long option (``--trust-remote`` IS ``--trust-remote-code``), so an exact-string
deny list is bypassed trivially (vllm.md §1). Each option is resolved against the full list of
``vllm serve`` options embedded below, to the one action vLLM would run, and then:

1. an unknown option or an ambiguous prefix is refused;
2. an option gpushare sets itself (``DAEMON_OWNED``) is refused, "set by gpushare", even if an
   admin allowlisted it;
3. an option on the hard-deny list (``HARD_DENIED``) is refused whatever the allowlist says;
4. anything else is accepted only if the admin's allowlist names its action.

The argv then carries the option's full canonical spelling, never the requester's spelling, so
the vLLM parser sees exactly the option that was checked.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from gpushared.domain.allocation import NAME_PATTERN
from gpushared.domain.errors import ConfigError, InvalidArgument, ResourceExhausted
from gpushared.domain.gpu import MIB
from gpushared.domain.units import MAX_BYTES, format_bytes


class Engine(enum.StrEnum):
    """What runs the model: real vLLM, or the stub that behaves like it (same command line)."""

    VLLM = "vllm"
    STUB = "stub"


class Dtype(enum.StrEnum):
    """The values vLLM's ``--dtype`` accepts (vllm.md §1; anything else exits with status 2)."""

    AUTO = "auto"
    HALF = "half"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT = "float"
    FLOAT32 = "float32"


MAX_PARTITIONS_PER_MODEL = 8
"""Tensor-parallel size limit (one vLLM rank per partition): 8 is a node's 8 GPUs, or one GPU's 8 CPX partitions.

Not restricted to powers of two: vLLM checks that the model's attention heads divide by it, at
config time, before any weights load, so a bad size fails fast with vLLM's own message."""
MAX_MODEL_LEN = 16 * 1024 * 1024
MAX_NUM_SEQS = 16384
MAX_MODEL_REF_CHARS = 1024
MAX_PATH_COMPONENT_BYTES = 255
"""NAME_MAX on Linux."""
MAX_OPTIONS = 64
MAX_OPTION_KEY_CHARS = 100
MAX_OPTION_VALUE_CHARS = 1024
DERIVED_BUDGET_PERCENT = 90
"""Share of each partition's reported memory a spec without ``memory_bytes`` gets; see derive_memory_bytes."""

HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
"""A Hugging Face repo id, org/name. ASCII only, so confusable look-alikes (U+2010, Cyrillic а) fail."""
SERVED_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
"""The name clients send as "model" and see in /v1/models and the metrics' model_name label.

One '/' is allowed so the default, a hub id, can be served under its own name (what OpenAI-style
clients expect); otherwise the allocation-name alphabet. It can never start with '-'."""
_OPTION_KEY = re.compile(r"^-*[A-Za-z0-9][A-Za-z0-9_-]*$")
_NEGATIVE_INTEGER = re.compile(r"^-[0-9]{1,20}$")


@dataclass(frozen=True)
class ModelSpec:
    """One model a user asks gpushare to serve.

    ``name`` is the gpushare name (allocation-name rules). ``model`` is a hub id ``org/name`` or an
    absolute local path. ``served_name`` empty means derived (see ``served_model_name``).
    ``memory_bytes`` is the total budget over all partitions; None means derived
    (``derive_memory_bytes``). ``partitions`` is the tensor-parallel size. ``kv_cache_bytes`` is
    an optional fixed KV-cache size per partition (``--kv-cache-memory-bytes``; see vllm_args).
    ``options`` are extra vLLM options as (name, value) pairs; value "" for an option that takes
    none.
    """

    name: str
    model: str
    engine: str = Engine.VLLM
    served_name: str = ""
    memory_bytes: int | None = None
    partitions: int = 1
    max_model_len: int | None = None
    dtype: str = Dtype.AUTO
    max_num_seqs: int | None = None
    kv_cache_bytes: int | None = None
    options: tuple[tuple[str, str], ...] = ()

    @property
    def served_model_name(self) -> str:
        """``served_name``, or derived: the hub id itself, or a local path's last component."""
        if self.served_name:
            return self.served_name
        if self.model.startswith("/"):
            return self.model.rstrip("/").rsplit("/", 1)[-1]
        return self.model


def _shown(text: str, limit: int = 40) -> str:
    """A short, printable rendering of untrusted text for messages (escaped, truncated)."""
    # unicode_escape shows a newline as \n and U+202E as \u202e, so a message stays one honest line.
    escaped = text[:limit].encode("unicode_escape").decode("ascii")
    return f"'{escaped}'" + ("..." if len(text) > limit else "")


def _bad_character(text: str) -> str | None:
    """The first character that has no business in a path or an option value, if any.

    Control (Cc: NUL, newline, ESC...), format (Cf: bidi overrides, zero-width), surrogates and
    unassigned code points, line and paragraph separators, and any space but U+0020 (a no-break
    space looks like a space in a log and is not one).
    """
    for ch in text:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp") or (category == "Zs" and ch != " "):
            return ch
    return None


def _describe(ch: str) -> str:
    return f"U+{ord(ch):04X}" + (f" {unicodedata.name(ch)}" if unicodedata.name(ch, "") else "")


# ---------------------------------------------------------------------------------------------
# Model reference, names, numbers


def validate_model_ref(model: str, *, subject: str = "model") -> None:
    """A hub id ``org/name`` or an absolute local path, nothing that vLLM could read as an option.

    Local paths: absolute, no empty, ``.`` or ``..`` component (the adapter resolves symlinks and
    checks the child's user can read it, as that user), at most 1024 characters, no control or
    format characters. A relative path is refused: vLLM would resolve it against its working
    directory. Hub ids: ASCII ``[A-Za-z0-9._-]`` in two parts, no ``..``.
    """
    if not isinstance(model, str) or not model:
        raise InvalidArgument(f"{subject}: required", hint="give a hub id such as Qwen/Qwen3-0.6B or an absolute path")
    if len(model) > MAX_MODEL_REF_CHARS:
        raise InvalidArgument(
            f"{subject} {_shown(model)}: {len(model)} characters, more than the {MAX_MODEL_REF_CHARS} allowed"
        )
    bad = _bad_character(model)
    if bad is not None:
        raise InvalidArgument(
            f"{subject} {_shown(model)}: contains the character {_describe(bad)}",
            hint="model ids and paths may not contain control, format or unusual space characters",
        )
    if model.startswith("-"):
        raise InvalidArgument(
            f"{subject} {_shown(model)}: starts with '-', which vLLM would read as an option",
            hint="give a hub id such as Qwen/Qwen3-0.6B or an absolute path",
        )
    if model.startswith("/"):
        validate_absolute_path(model, subject=subject)
        return
    if ".." in model:
        raise InvalidArgument(
            f"{subject} {_shown(model)}: '..' is not allowed in a model id",
            hint="a local model needs an absolute path without '..' components",
        )
    if not model.isascii():
        odd = next(ch for ch in model if not ch.isascii())
        raise InvalidArgument(
            f"{subject} {_shown(model)}: contains the non-ASCII character {_describe(odd)}",
            hint="hub ids use only A-Z a-z 0-9 . _ - (look-alike characters are refused on purpose)",
        )
    if not HUB_ID_PATTERN.fullmatch(model):
        raise InvalidArgument(
            f"{subject} {_shown(model)}: neither a hub id (org/name) nor an absolute path",
            hint="hub ids are org/name of A-Z a-z 0-9 . _ - (each part 1-96, starting with a letter or digit); "
            "a local model needs an absolute path",
        )


def validate_absolute_path(path: str, *, subject: str) -> None:
    """An absolute, canonical-looking path: no empty, '.' or '..' component, no odd characters.

    Purely textual: symlinks are the adapter's business (it resolves and checks as the child's user).
    """
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"{subject}: required")
    if len(path) > MAX_MODEL_REF_CHARS:
        raise InvalidArgument(
            f"{subject} {_shown(path)}: {len(path)} characters, more than the {MAX_MODEL_REF_CHARS} allowed"
        )
    bad = _bad_character(path)
    if bad is not None:
        raise InvalidArgument(f"{subject} {_shown(path)}: contains the character {_describe(bad)}")
    if not path.startswith("/"):
        raise InvalidArgument(f"{subject} {_shown(path)}: not an absolute path")
    components = path.split("/")[1:]
    if components == [""]:
        raise InvalidArgument(f"{subject} {_shown(path)}: '/' is not a model directory")
    for component in components:
        if component in ("", ".", ".."):
            what = "an empty component ('//' or a trailing '/')" if not component else f"a {component!r} component"
            raise InvalidArgument(
                f"{subject} {_shown(path)}: the path has {what}",
                hint="give the canonical absolute path, without '.', '..' or repeated '/'",
            )
        if len(component.encode("utf-8", "surrogatepass")) > MAX_PATH_COMPONENT_BYTES:
            raise InvalidArgument(
                f"{subject} {_shown(path)}: a path component is longer than {MAX_PATH_COMPONENT_BYTES} bytes"
            )


def validate_served_name(served_name: str, *, derived_from: str = "") -> None:
    """Check the name a model is served as; ``derived_from`` says it came from the model, for the hint."""
    if not isinstance(served_name, str) or ".." in served_name or not SERVED_NAME_PATTERN.fullmatch(served_name):
        hint = "use A-Z a-z 0-9 . _ - with at most one '/', starting with a letter or digit, no '..'"
        if derived_from:
            hint = f"the served name was derived from the model {_shown(derived_from)}; set one explicitly ({hint})"
        raise InvalidArgument(f"served name {_shown(str(served_name))}: not a valid served model name", hint=hint)


def _validate_model_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("model name: required", hint="name the model, e.g. llama-8b")
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            f"model name {_shown(name)}: not a valid name",
            hint="use 1-63 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit",
        )


def _check_range(subject: str, value: object, low: int, high: int, hint: str = "") -> None:
    # bool is an int in Python; True as a partition count is a caller bug, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"{subject}: must be a whole number, not {type(value).__name__}")
    if not low <= value <= high:
        raise InvalidArgument(f"{subject}: {value} is out of range {low}-{high}", hint=hint)


def validate_spec_fields(spec: ModelSpec) -> None:
    """Every check on a spec except the admin's option allowlist; raises InvalidArgument."""
    _validate_model_name(spec.name)
    if spec.engine not in tuple(Engine):
        raise InvalidArgument(
            f"engine {_shown(str(spec.engine))}: unknown", hint=f"use one of {', '.join(e.value for e in Engine)}"
        )
    validate_model_ref(spec.model)
    validate_served_name(spec.served_model_name, derived_from="" if spec.served_name else spec.model)
    _check_range(
        "partitions",
        spec.partitions,
        1,
        MAX_PARTITIONS_PER_MODEL,
        hint=f"tensor-parallel size is 1 to {MAX_PARTITIONS_PER_MODEL}; the model's attention heads must divide by it",
    )
    if spec.memory_bytes is not None:
        _check_range("memory", spec.memory_bytes, 1, MAX_BYTES, hint="e.g. 40GiB, or leave it unset to derive it")
    if spec.kv_cache_bytes is not None:
        _check_range("kv cache", spec.kv_cache_bytes, 1, MAX_BYTES)
    if spec.max_model_len is not None:
        _check_range("max model len", spec.max_model_len, 1, MAX_MODEL_LEN)
    if spec.dtype not in tuple(Dtype):
        raise InvalidArgument(
            f"dtype {_shown(str(spec.dtype))}: not a vLLM dtype", hint=f"use one of {', '.join(d.value for d in Dtype)}"
        )
    if spec.max_num_seqs is not None:
        _check_range("max num seqs", spec.max_num_seqs, 1, MAX_NUM_SEQS)


def validate_spec(spec: ModelSpec, allowlist: Collection[str]) -> None:
    """Refuse a spec that is malformed or passes an option the admin did not allow.

    ``allowlist`` holds the option names the admin allows (any spelling of a vLLM option,
    e.g. "enable-prefix-caching" or "--enable_prefix_caching"); entries that name no vLLM
    option, or a daemon-owned or hard-denied one, grant nothing here (``parse_allowlist`` is the
    strict check for the configuration file).
    """
    validate_spec_fields(spec)
    allowed = _allowed_actions(allowlist)
    for option in resolve_options(spec.options):
        check_allowed(option, allowed)


def derive_memory_bytes(spec: ModelSpec, partition_cap_bytes: int) -> int:
    """The total memory budget of ``spec`` over all its partitions.

    An explicit ``memory_bytes`` is returned as it is, once each partition's even share (rounded
    up, as allocation.share_per_partition does) is known to fit under ``partition_cap_bytes``.

    Without one, each partition gets ``DERIVED_BUDGET_PERCENT`` (90 %) of its cap, rounded down
    to a whole MiB, times ``partitions``. Not the whole cap: vLLM refuses to start unless the
    device's *free* memory covers ``ceil(total x gpu_memory_utilization)`` (vllm.md §6), and free
    is always below total (the driver's reservation, ~283 MiB idle on an SPX MI300X, and the
    process's own HIP context, which exists before the check), so 100 % never starts. 90 % is
    vLLM 0.10's own default and leaves the same margin vLLM's authors chose.
    """
    _check_range("partition cap", partition_cap_bytes, 1, MAX_BYTES)
    _check_range("partitions", spec.partitions, 1, MAX_PARTITIONS_PER_MODEL)
    if spec.memory_bytes is None:
        per_partition = partition_cap_bytes * DERIVED_BUDGET_PERCENT // 100 // MIB * MIB
        if per_partition == 0:
            raise ResourceExhausted(
                f"memory: a partition reporting {format_bytes(partition_cap_bytes)} is too small to derive a budget"
            )
        return per_partition * spec.partitions
    share = -(-spec.memory_bytes // spec.partitions)
    if share > partition_cap_bytes:
        each = f" ({format_bytes(share)} on each of {spec.partitions} partitions)" if spec.partitions > 1 else ""
        raise ResourceExhausted(
            f"memory: {format_bytes(spec.memory_bytes)}{each} exceeds the partition cap of "
            f"{format_bytes(partition_cap_bytes)}",
            hint="ask for less memory or more partitions",
        )
    return spec.memory_bytes


# ---------------------------------------------------------------------------------------------
# vLLM options

VLLM_OPTIONS_VERSION = "0.33.0"

# Every option string of `vllm serve` in vLLM 0.33.0, dumped from the real parser's
# _option_string_actions: make_arg_parser(FlexibleArgumentParser(prog="vllm serve")) from
# vllm.entrypoints.common.cli_args, imported from the 0.33.0 PyPI wheel with VLLM_TARGET_DEVICE=cpu
# (vllm.md §7), and cross-checked: every prefix of every option resolves here as argparse resolves
# it there. One action per line: what it takes, then its option strings; the first long string is
# the action's name.
#   -  no value (store_true, or a --X/--no-X or --enable-X/--disable-X pair)
#   1  one value      +  one or more values (gpushare passes exactly one)      ?  an optional value
# 0.33 lists --disable-X for the negative form and still accepts 0.32's --no-enable-X (unlisted, last
# on its line). Options added later are "unknown" until this table is refreshed: that fails closed.
_SERVE_ACTIONS_TABLE = """
- --help -h
- --headless
1 --api-server-count -asc
1 --config
- --grpc
+ --lora-modules
1 --chat-template
1 --chat-template-content-format
- --trust-request-chat-template --no-trust-request-chat-template
- --trust-request-mm-kwargs --no-trust-request-mm-kwargs
1 --default-chat-template-kwargs
1 --reasoning-effort-map
1 --response-role
- --return-tokens-as-token-ids --no-return-tokens-as-token-ids
- --enable-auto-tool-choice --disable-auto-tool-choice --no-enable-auto-tool-choice
- --exclude-tools-when-tool-choice-none --no-exclude-tools-when-tool-choice-none
1 --tool-call-parser
1 --tool-parser-plugin
1 --tool-strict-level
1 --tool-server
1 --max-log-len
- --enable-prompt-tokens-details --disable-prompt-tokens-details --no-enable-prompt-tokens-details
- --enable-per-request-metrics --disable-per-request-metrics --no-enable-per-request-metrics
- --enable-server-load-tracking --disable-server-load-tracking --no-enable-server-load-tracking
- --enable-force-include-usage --disable-force-include-usage --no-enable-force-include-usage
1 --sse-keep-alive-interval
- --enable-tokenizer-info-endpoint --disable-tokenizer-info-endpoint --no-enable-tokenizer-info-endpoint
- --enable-log-outputs --disable-log-outputs --no-enable-log-outputs
- --enable-log-deltas --disable-log-deltas --no-enable-log-deltas
- --cohere-is-reasoning-model --no-cohere-is-reasoning-model
1 --cohere-format
1 --anthropic-disabled-thinking-effort
- --log-error-stack --no-log-error-stack
- --tokens-only --no-tokens-only
- --enable-scale-out --disable-scale-out --no-enable-scale-out
1 --fingerprint-mode
1 --fingerprint-value
1 --host
1 --port
1 --grpc-port
1 --data-parallel-supervisor-port
1 --dp-supervisor-probe-interval-s
1 --dp-supervisor-probe-timeout-s
1 --dp-supervisor-probe-failure-threshold
1 --uds
1 --uvicorn-log-level
- --disable-uvicorn-access-log --enable-uvicorn-access-log --no-disable-uvicorn-access-log
1 --disable-access-log-for-endpoints
- --allow-credentials --no-allow-credentials
1 --allowed-origins
1 --allowed-methods
1 --allowed-headers
+ --api-key
1 --ssl-keyfile
1 --ssl-certfile
1 --ssl-ca-certs
- --enable-ssl-refresh --disable-ssl-refresh --no-enable-ssl-refresh
1 --ssl-cert-reqs
1 --ssl-ciphers
1 --root-path
1 --middleware
- --enable-request-id-headers --disable-request-id-headers --no-enable-request-id-headers
- --disable-fastapi-docs --enable-fastapi-docs --no-disable-fastapi-docs
1 --h11-max-incomplete-event-size
1 --h11-max-header-count
- --enable-offline-docs --disable-offline-docs --no-enable-offline-docs
- --enable-flash-late-interaction --disable-flash-late-interaction --no-enable-flash-late-interaction
1 --model
1 --runner
1 --convert
1 --tokenizer
1 --tokenizer-mode
- --trust-remote-code --no-trust-remote-code
1 --dtype
1 --seed
1 --hf-config-path
1 --allowed-local-media-path
+ --allowed-media-domains
1 --revision
1 --code-revision
1 --tokenizer-revision
1 --max-model-len
1 --quantization -q
1 --quantization-config
- --allow-deprecated-quantization --no-allow-deprecated-quantization
- --enforce-eager --no-enforce-eager
- --enable-return-routed-experts --disable-return-routed-experts --no-enable-return-routed-experts
- --return-sampling-mask --no-return-sampling-mask
1 --max-logprobs
1 --logprobs-mode
- --use-fp64-gumbel --no-use-fp64-gumbel
- --enable-trace-replay --disable-trace-replay --no-enable-trace-replay
- --disable-sliding-window --enable-sliding-window --no-disable-sliding-window
- --disable-cascade-attn --enable-cascade-attn --no-disable-cascade-attn
- --skip-tokenizer-init --no-skip-tokenizer-init
- --enable-prompt-embeds --disable-prompt-embeds --no-enable-prompt-embeds
+ --served-model-name
1 --config-format
? --hf-token
1 --hf-overrides
1 --model-class-overrides
1 --pooler-config
1 --generation-config
1 --override-generation-config
- --enable-sleep-mode --disable-sleep-mode --no-enable-sleep-mode
1 --sleep-mode-backend
- --sleep-mode-offload-cudagraph --no-sleep-mode-offload-cudagraph
+ --sleep-preserve-parameter-names
- --enable-cumem-allocator --disable-cumem-allocator --no-enable-cumem-allocator
- --enable-nccl-comm-suspend --disable-nccl-comm-suspend --no-enable-nccl-comm-suspend
1 --model-impl
+ --logits-processors
1 --io-processor-plugin
1 --renderer-num-workers
1 --load-format
1 --download-dir
1 --safetensors-load-strategy
1 --safetensors-prefetch-num-threads
1 --safetensors-prefetch-block-size
1 --model-loader-extra-config
+ --ignore-patterns
- --use-tqdm-on-load --no-use-tqdm-on-load
1 --pt-load-map-location
1 --attention-backend
1 --mamba-backend
1 --mamba-ssu-algorithm
- --enable-mamba-cache-stochastic-rounding --disable-mamba-cache-stochastic-rounding --no-enable-mamba-cache-stochastic-rounding
1 --mamba-cache-philox-rounds
1 --reasoning-parser
1 --reasoning-parser-plugin
1 --distributed-executor-backend
1 --pipeline-parallel-size -pp
1 --master-addr
1 --master-port
1 --nnodes -n
1 --node-rank -r
1 --distributed-timeout-seconds
1 --cpu-distributed-timeout-seconds
- --numa-bind --no-numa-bind
+ --numa-bind-nodes
+ --numa-bind-cpus
1 --device-ids
1 --tensor-parallel-size -tp
1 --decode-context-parallel-size -dcp
1 --dcp-comm-backend
- --dcp-q-replicate --no-dcp-q-replicate
1 --dcp-kv-cache-interleave-size
1 --cp-kv-cache-interleave-size
1 --prefill-context-parallel-size -pcp
1 --data-parallel-size -dp
1 --data-parallel-rank -dpn
1 --data-parallel-start-rank -dpr
1 --data-parallel-size-local -dpl
1 --data-parallel-address -dpa
1 --data-parallel-rpc-port -dpp
1 --data-parallel-backend -dpb
- --data-parallel-hybrid-lb --no-data-parallel-hybrid-lb -dph
- --data-parallel-external-lb --no-data-parallel-external-lb -dpe
- --data-parallel-multi-port-external-lb -dpm
- --enable-hc-sp --disable-hc-sp --no-enable-hc-sp
- --enable-expert-parallel --disable-expert-parallel --no-enable-expert-parallel -ep
- --enable-batch-sharded-sampling --disable-batch-sharded-sampling --no-enable-batch-sharded-sampling
- --enable-ep-weight-filter --disable-ep-weight-filter --no-enable-ep-weight-filter
1 --all2all-backend
- --enable-dbo --disable-dbo --no-enable-dbo
- --enable-shm-tensor-arena --disable-shm-tensor-arena --no-enable-shm-tensor-arena
1 --ubatch-size
- --enable-elastic-ep --disable-elastic-ep --no-enable-elastic-ep
1 --elastic-ep-max-dp-size
1 --dbo-decode-token-threshold
1 --dp-sync-interval
1 --dbo-prefill-token-threshold
- --disable-nccl-for-dp-synchronization --enable-nccl-for-dp-synchronization --no-disable-nccl-for-dp-synchronization
- --enable-eplb --disable-eplb --no-enable-eplb
1 --eplb-config
1 --expert-placement-strategy
1 --max-parallel-loading-workers
- --ray-workers-use-nsight --no-ray-workers-use-nsight
- --disable-custom-all-reduce --enable-custom-all-reduce --no-disable-custom-all-reduce
1 --worker-cls
1 --worker-extension-cls
- --enable-fault-tolerance --disable-fault-tolerance --no-enable-fault-tolerance
1 --fault-tolerance-config
1 --block-size
1 --gpu-memory-utilization --device-memory-utilization
1 --kv-cache-memory-bytes
1 --kv-cache-dtype
1 --num-gpu-blocks-override
- --enable-prefix-caching --disable-prefix-caching --no-enable-prefix-caching
1 --prefix-caching-hash-algo
1 --prefix-cache-retention-interval
+ --kv-cache-dtype-skip-layers
- --kv-sharing-fast-prefill --no-kv-sharing-fast-prefill
- --swa-bounded-replay --no-swa-bounded-replay
1 --mamba-cache-dtype
1 --mamba-ssm-cache-dtype
1 --mamba-block-size
1 --prefix-match-unit
1 --mamba-cache-mode
- --enable-mamba-shared-prefix-checkpoint --disable-mamba-shared-prefix-checkpoint --no-enable-mamba-shared-prefix-checkpoint
1 --replayssm-buffer-len
- --use-replayssm --no-use-replayssm
1 --kv-offloading-size
1 --kv-offloading-backend
1 --offload-backend
1 --cpu-offload-gb
+ --cpu-offload-params
1 --offload-group-size
1 --offload-num-in-group
1 --offload-prefetch-step
+ --offload-params
- --language-model-only --no-language-model-only
1 --limit-mm-per-prompt
- --enable-mm-embeds --disable-mm-embeds --no-enable-mm-embeds
1 --media-io-kwargs
1 --mm-processor-kwargs
1 --mm-processor-cache-gb
1 --mm-processor-cache-type
1 --mm-hasher-algorithm
1 --mm-shm-cache-max-object-size-mb
- --mm-encoder-only --no-mm-encoder-only
1 --mm-encoder-tp-mode
1 --mm-encoder-attn-backend
1 --mm-encoder-attn-dtype
1 --mm-encoder-fp8-scale-path
1 --mm-encoder-fp8-scale-save-path
1 --mm-encoder-fp8-scale-save-margin
- --interleave-mm-strings --no-interleave-mm-strings
- --skip-mm-profiling --no-skip-mm-profiling
1 --video-pruning-rate
1 --video-pruning-method
1 --mm-tensor-ipc
1 --mm-processor-device
1 --mm-ipc-gpu-memory-gb
- --mm-device-do-normalize --no-mm-device-do-normalize
- --enable-lora --disable-lora --no-enable-lora
1 --max-loras
1 --max-lora-rank
1 --lora-dtype
- --enable-tower-connector-lora --disable-tower-connector-lora --no-enable-tower-connector-lora
1 --max-cpu-loras
- --fully-sharded-loras --no-fully-sharded-loras
+ --lora-target-modules
1 --default-mm-loras
- --specialize-active-lora --no-specialize-active-lora
- --enable-mixed-moe-lora-format --disable-mixed-moe-lora-format --no-enable-mixed-moe-lora-format
- --enable-moe-shared-loras --disable-moe-shared-loras --no-enable-moe-shared-loras
1 --max-lora-cls-labels
1 --logging-config
1 --log-level
1 --log-config-file
1 --show-hidden-metrics-for-version
1 --otlp-traces-endpoint
+ --collect-detailed-traces
1 --per-request-spec-decode-metrics
- --kv-cache-metrics --no-kv-cache-metrics
1 --kv-cache-metrics-sample
1 --custom-histogram-buckets
- --cudagraph-metrics --no-cudagraph-metrics
- --enable-layerwise-nvtx-tracing --disable-layerwise-nvtx-tracing --no-enable-layerwise-nvtx-tracing
- --enable-mfu-metrics --disable-mfu-metrics --no-enable-mfu-metrics
- --enable-logging-iteration-details --disable-logging-iteration-details --no-enable-logging-iteration-details
1 --jit-monitor-mode
- --jit-monitor-verbose --no-jit-monitor-verbose
1 --max-num-batched-tokens
1 --max-num-scheduled-tokens
1 --max-num-seqs
1 --max-num-active-seqs
1 --max-num-queued-reqs
1 --max-num-queued-tokens
1 --long-prefill-token-threshold
- --long-prefill-token-threshold-adaptive --no-long-prefill-token-threshold-adaptive
1 --scheduling-policy
- --enable-chunked-prefill --disable-chunked-prefill --no-enable-chunked-prefill
- --disable-chunked-mm-input --enable-chunked-mm-input --no-disable-chunked-mm-input
1 --scheduler-cls
- --scheduler-reserve-full-isl --no-scheduler-reserve-full-isl
1 --watermark
1 --prefill-schedule-interval
- --disable-hybrid-kv-cache-manager --enable-hybrid-kv-cache-manager --no-disable-hybrid-kv-cache-manager
- --async-scheduling --no-async-scheduling
1 --stream-interval
+ --cudagraph-capture-sizes
1 --max-cudagraph-capture-size
1 --ir-op-priority
- --enable-flashinfer-autotune --disable-flashinfer-autotune --no-enable-flashinfer-autotune
- --monokernel --no-monokernel
1 --moe-backend
1 --linear-backend
1 --sparse-indexer-topk-backend
1 --speculative-config -sc
1 --spec-method
1 --spec-model
1 --spec-tokens
1 --watermark-config
1 --diffusion-config -dc
1 --kv-transfer-config
1 --kv-events-config
1 --ec-transfer-config
1 --ec-manager-config
1 --compilation-config -cc
1 --attention-config -ac
1 --engram-config
1 --reasoning-config
1 --kernel-config
1 --additional-config
1 --structured-outputs-config
1 --aux-output-config
1 --profiler-config
1 --watchdog-config
1 --optimization-level
1 --performance-mode
1 --weight-transfer-config
- --disable-log-stats
- --aggregate-engine-logging
- --fail-on-environ-validation --no-fail-on-environ-validation
1 --shutdown-timeout
1 --gdn-prefill-backend
1 --kda-prefill-backend
1 --kda-decode-backend
- --enable-log-requests --disable-log-requests --no-enable-log-requests
"""


class Arity(enum.Enum):
    NONE = "-"
    ONE = "1"
    MANY = "+"
    OPTIONAL = "?"


@dataclass(frozen=True)
class _Action:
    name: str
    """The action's first long option string without dashes, e.g. "trust-remote-code"."""
    arity: Arity


def _parse_table(table: str) -> tuple[dict[str, _Action], dict[str, _Action]]:
    longs: dict[str, _Action] = {}
    shorts: dict[str, _Action] = {}
    for line in table.strip().splitlines():
        kind, *strings = line.split()
        names = [s[2:] for s in strings if s.startswith("--")]
        action = _Action(names[0], Arity(kind))
        for s in strings:
            if s.startswith("--"):
                longs[s[2:]] = action
            else:
                shorts[s[1:]] = action
    return longs, shorts


_LONG_OPTIONS, _SHORT_OPTIONS = _parse_table(_SERVE_ACTIONS_TABLE)
KNOWN_OPTIONS: frozenset[str] = frozenset(_LONG_OPTIONS)
"""Every long option string of `vllm serve` 0.33.0, without the leading dashes."""

DAEMON_OWNED: Mapping[str, str] = {
    # Action name -> how gpushare sets it. Refused even when allowlisted: these are gpushare's.
    "model": "from the spec's model",
    "served-model-name": "from the spec's served name",
    "host": "loopback only",
    "port": "one unique port per model",
    "tensor-parallel-size": "from the spec's partitions",
    "gpu-memory-utilization": "from the spec's memory budget",
    "kv-cache-memory-bytes": "from the spec's kv cache size",
    "max-model-len": "from the spec's max model len",
    "max-num-seqs": "from the spec's max num seqs",
    "dtype": "from the spec's dtype",
    "api-key": "through VLLM_API_KEY, never argv, which /proc shows to everyone",
    "disable-log-stats": "never passed: it removes every vllm: metric",
    "shutdown-timeout": "its stop grace period depends on it",
}

_CODE = "it runs or imports code the requester chooses"
_FILES = "it reads or writes files, or fetches URLs, the requester chooses"
_NETWORK = "it opens or exposes network endpoints, or sends data elsewhere"
_PARTITION = "it uses devices or memory outside the model's partitions and budget"
_PROCESS = "it changes what the server process is, not how it serves"

HARD_DENIED: Mapping[str, str] = {
    # Action name -> why it is never allowed, whatever an admin allowlists (vllm.md §1 "Flags an
    # untrusted requester must not control", reliability.md §2.4). --trust-remote-code is NOT here:
    # it is arbitrary code execution too, but an admin may allow it, by naming it explicitly.
    "worker-cls": _CODE,
    "worker-extension-cls": _CODE,
    "scheduler-cls": _CODE,
    "logits-processors": _CODE,
    "middleware": _CODE,
    "tool-parser-plugin": _CODE,
    "reasoning-parser-plugin": _CODE,
    "io-processor-plugin": _CODE,
    "model-class-overrides": _CODE,
    "hf-overrides": _CODE,
    "model-loader-extra-config": _CODE,
    "load-format": _CODE,
    "tool-server": _CODE,
    "speculative-config": _CODE + " (a second model)",
    "spec-method": _CODE + " (a second model, or a custom class)",
    "spec-model": _CODE + " (a second model)",
    "spec-tokens": _CODE + " (speculative decoding)",
    "compilation-config": _CODE + " (inductor passes by name, dump and cache paths)",
    "additional-config": _CODE + " (free-form platform settings)",
    "ec-manager-config": _CODE + " (a cache manager class by name)",
    "structured-outputs-config": _CODE + " (a reasoning parser plugin path)",
    "trust-request-chat-template": _CODE + " (Jinja templates sent by clients)",
    "trust-request-mm-kwargs": _CODE + " (processor arguments sent by clients)",
    "chat-template": _FILES,
    "config": _FILES,
    "tokenizer": _FILES,
    "hf-config-path": _FILES,
    "generation-config": _FILES,
    "download-dir": _FILES,
    "allowed-local-media-path": _FILES,
    "allowed-media-domains": _FILES,
    "lora-modules": _FILES,
    "default-mm-loras": _FILES,
    "mm-encoder-fp8-scale-path": _FILES,
    "mm-encoder-fp8-scale-save-path": _FILES,
    "log-config-file": _FILES,
    "logging-config": _FILES,
    "profiler-config": _FILES,
    "watchdog-config": _FILES,
    "hf-token": _FILES + " (a hub credential)",
    "ssl-keyfile": _FILES,
    "ssl-certfile": _FILES,
    "ssl-ca-certs": _FILES,
    "ssl-cert-reqs": _FILES,
    "ssl-ciphers": _FILES,
    "enable-ssl-refresh": _FILES,
    "uds": _NETWORK,
    "root-path": _NETWORK,
    "allowed-origins": _NETWORK,
    "allowed-methods": _NETWORK,
    "allowed-headers": _NETWORK,
    "allow-credentials": _NETWORK,
    "enable-tokenizer-info-endpoint": _NETWORK,
    "otlp-traces-endpoint": _NETWORK,
    "kv-transfer-config": _NETWORK,
    "kv-events-config": _NETWORK,
    "ec-transfer-config": _NETWORK,
    "weight-transfer-config": _NETWORK,
    "grpc": _NETWORK + " (gRPC instead of HTTP on the port)",
    "grpc-port": _NETWORK,
    "headless": _NETWORK,
    "api-server-count": _NETWORK,
    "master-addr": _NETWORK,
    "master-port": _NETWORK,
    "nnodes": _NETWORK,
    "node-rank": _NETWORK,
    "distributed-executor-backend": _NETWORK,
    "data-parallel-size": _PARTITION,
    "data-parallel-rank": _PARTITION,
    "data-parallel-start-rank": _PARTITION,
    "data-parallel-size-local": _PARTITION,
    "data-parallel-address": _NETWORK,
    "data-parallel-rpc-port": _NETWORK,
    "data-parallel-backend": _NETWORK,
    "data-parallel-hybrid-lb": _PARTITION,
    "data-parallel-external-lb": _PARTITION,
    "data-parallel-multi-port-external-lb": _PARTITION,
    "data-parallel-supervisor-port": _NETWORK,
    "enable-elastic-ep": _PARTITION,
    "elastic-ep-max-dp-size": _PARTITION,
    "enable-scale-out": _PARTITION,
    "device-ids": _PARTITION,
    "pipeline-parallel-size": _PARTITION,
    "prefill-context-parallel-size": _PARTITION,
    "num-gpu-blocks-override": _PARTITION,
    "cpu-offload-gb": _PARTITION,
    "cpu-offload-params": _PARTITION,
    "offload-backend": _PARTITION,
    "offload-group-size": _PARTITION,
    "offload-num-in-group": _PARTITION,
    "offload-prefetch-step": _PARTITION,
    "offload-params": _PARTITION,
    "kv-offloading-size": _PARTITION,
    "kv-offloading-backend": _PARTITION,
    "enable-sleep-mode": _PARTITION,
    "sleep-mode-backend": _PARTITION,
    "sleep-mode-offload-cudagraph": _PARTITION,
    "sleep-preserve-parameter-names": _PARTITION,
    "help": _PROCESS + " (prints help and exits)",
}


@dataclass(frozen=True)
class VllmOption:
    """One extra option as vLLM will read it: canonical spelling, the action it runs, its value."""

    flag: str
    """The full option string passed on the command line, e.g. "--enable-prefix-caching"."""
    action: str
    """The action's name, what allowlists, DAEMON_OWNED and HARD_DENIED name."""
    value: str | None
    """None for an option that takes no value."""
    requested: str = ""
    """The name as the requester wrote it, for messages."""

    def argv(self) -> list[str]:
        return [self.flag] if self.value is None else [self.flag, self.value]


def _option_subject(key: str, flag: str) -> str:
    """Name the option as the requester wrote it, and as vLLM reads it when that differs."""
    if "--" + key.lstrip("-") == flag:
        return f"option {flag}"
    return f"option {_shown(key)} (vLLM reads it as {flag})"


def _normalise_key(key: str) -> str:
    """The option name without leading dashes and with '_' as '-', as vLLM's parser treats it."""
    if not isinstance(key, str) or not key:
        raise InvalidArgument("option: empty name", hint="name a vLLM option, e.g. enable-prefix-caching")
    if len(key) > MAX_OPTION_KEY_CHARS:
        raise InvalidArgument(f"option {_shown(key)}: name longer than {MAX_OPTION_KEY_CHARS} characters")
    if not _OPTION_KEY.fullmatch(key):
        raise InvalidArgument(
            f"option {_shown(key)}: not an option name",
            hint="give the name alone (e.g. max-num-batched-tokens) and the value separately; "
            "'=', '.' and spaces are not allowed in names",
        )
    return key.lstrip("-").replace("_", "-")


def _resolve_name(key: str) -> tuple[str, _Action]:
    """The full option string vLLM would match for ``key``, and its action.

    As argparse: an exact long option, else a unique prefix of the long options; several prefix
    matches are ambiguous and refused (vLLM itself exits 2 for them). A short alias such as
    ``-tp`` or ``-q`` counts when written with one dash (as argparse reads it), or, without dashes,
    when nothing long matches.
    """
    name = _normalise_key(key)
    single_dash = key.startswith("-") and not key.startswith("--")
    if single_dash and name in _SHORT_OPTIONS:
        action = _SHORT_OPTIONS[name]
        return "--" + action.name, action
    if name in _LONG_OPTIONS:
        return "--" + name, _LONG_OPTIONS[name]
    matches = sorted(option for option in _LONG_OPTIONS if option.startswith(name))
    if len(matches) == 1:
        return "--" + matches[0], _LONG_OPTIONS[matches[0]]
    if not key.startswith("-") and name in _SHORT_OPTIONS:
        action = _SHORT_OPTIONS[name]
        return "--" + action.name, action
    if not matches:
        raise InvalidArgument(
            f"option {_shown(key)}: not a vLLM {VLLM_OPTIONS_VERSION} serve option",
            hint="see `vllm serve --help=all`; spell the option out in full",
        )
    listed = ", ".join("--" + m for m in matches[:6]) + (f" and {len(matches) - 6} more" if len(matches) > 6 else "")
    raise InvalidArgument(
        f"option {_shown(key)}: ambiguous, it abbreviates {listed}", hint="spell the option out in full"
    )


def _check_value(subject: str, action: _Action, value: str) -> str | None:
    if not isinstance(value, str):
        raise InvalidArgument(f"{subject}: the value must be text, not {type(value).__name__}")
    if action.arity is Arity.NONE:
        if value:
            raise InvalidArgument(
                f"{subject}: takes no value, got {_shown(value)}",
                hint="pass an empty value; use the option's negative form (e.g. --disable-...) to turn it off",
            )
        return None
    if not value:
        if action.arity is Arity.OPTIONAL:
            return None
        raise InvalidArgument(f"{subject}: needs a value")
    if len(value) > MAX_OPTION_VALUE_CHARS:
        raise InvalidArgument(
            f"{subject}: value is {len(value)} characters, more than the {MAX_OPTION_VALUE_CHARS} allowed"
        )
    bad = _bad_character(value)
    if bad is not None:
        raise InvalidArgument(
            f"{subject}: value {_shown(value)} contains the character {_describe(bad)}",
            hint="option values may not contain control, format or unusual space characters",
        )
    # argparse reads a '-'-prefixed word as an option, and vLLM's FlexibleArgumentParser turns any
    # '-'-prefixed word containing '.' into a dotted config key that swallows the NEXT argument
    # (`--seed -0.5 --enforce-eager` parses as {"5": "--enforce-eager"}, seen with vLLM 0.33.0).
    # Only a negative integer is safe.
    if value.startswith("-") and not _NEGATIVE_INTEGER.fullmatch(value):
        raise InvalidArgument(
            f"{subject}: value {_shown(value)} starts with '-'",
            hint="vLLM would read it as another option; only negative whole numbers may start with '-'",
        )
    return value


def resolve_option(key: str, value: str) -> VllmOption:
    """Resolve one requested option as vLLM's parser would, refusing what no allowlist may grant.

    Raises InvalidArgument for an unknown or ambiguous name, a daemon-owned or hard-denied
    option, or a bad value. Whether the admin allows the option is ``check_allowed``'s job.
    """
    flag, action = _resolve_name(key)
    subject = _option_subject(key, flag)
    owner = DAEMON_OWNED.get(action.name)
    if owner is not None:
        raise InvalidArgument(f"{subject}: set by gpushare ({owner})", hint="use the model spec's own fields")
    reason = HARD_DENIED.get(action.name)
    if reason is not None:
        raise InvalidArgument(f"{subject}: never allowed, {reason}")
    return VllmOption(flag, action.name, _check_value(subject, action, value), key)


def resolve_options(options: Iterable[tuple[str, str]]) -> tuple[VllmOption, ...]:
    """Resolve every option of a spec; an action given twice (in any spelling) is refused."""
    pairs = list(options)
    if len(pairs) > MAX_OPTIONS:
        raise InvalidArgument(f"options: {len(pairs)} given, more than the {MAX_OPTIONS} allowed")
    resolved: list[VllmOption] = []
    seen: dict[str, str] = {}
    for pair in pairs:
        if not isinstance(pair, tuple) or len(pair) != 2:
            raise InvalidArgument("options: each option must be a (name, value) pair")
        key, value = pair
        option = resolve_option(key, value)
        if option.action in seen:
            raise InvalidArgument(
                f"{_option_subject(key, option.flag)}: given twice (also as {_shown(seen[option.action])})",
                hint="vLLM would silently keep only the last one; pass it once",
            )
        seen[option.action] = key
        resolved.append(option)
    return tuple(resolved)


def _allowed_actions(allowlist: Collection[str]) -> frozenset[str]:
    """Action names an allowlist grants; lenient: unknown entries grant nothing (see parse_allowlist)."""
    allowed = set()
    for entry in allowlist:
        if isinstance(entry, str) and _OPTION_KEY.fullmatch(entry):
            name = entry.lstrip("-").replace("_", "-")
            action = _LONG_OPTIONS.get(name)
            if action is not None:
                allowed.add(action.name)
    return frozenset(allowed)


def check_allowed(option: VllmOption, allowed_actions: Collection[str]) -> None:
    """Refuse an option whose action the admin's allowlist does not name."""
    if option.action not in allowed_actions:
        subject = _option_subject(option.requested or option.flag, option.flag)
        via = "" if option.flag == f"--{option.action}" else f" (part of --{option.action})"
        raise InvalidArgument(
            f"{subject}: not allowed on this host{via}",
            hint=f"an admin can add {option.action} to the daemon's allowed vLLM options",
        )


def parse_allowlist(names: Iterable[str]) -> frozenset[str]:
    """The admin's allowed options, checked strictly: each entry must be a full vLLM option name.

    Abbreviations are refused here (an admin must mean exactly one option), as are daemon-owned
    and hard-denied options, so a bad configuration fails at load time with ConfigError rather
    than silently granting nothing. Returns action names.
    """
    allowed = set()
    for entry in names:
        if not isinstance(entry, str) or not _OPTION_KEY.fullmatch(entry):
            raise ConfigError(f"allowed vLLM option {_shown(str(entry))}: not an option name")
        name = entry.lstrip("-").replace("_", "-")
        action = _LONG_OPTIONS.get(name)
        if action is None:
            raise ConfigError(
                f"allowed vLLM option {_shown(entry)}: not a vLLM {VLLM_OPTIONS_VERSION} serve option",
                hint="write the option's full name, e.g. enable-prefix-caching",
            )
        if action.name in DAEMON_OWNED:
            raise ConfigError(
                f"allowed vLLM option --{name}: set by gpushare ({DAEMON_OWNED[action.name]})",
                hint="remove it from the allowlist",
            )
        if action.name in HARD_DENIED:
            raise ConfigError(
                f"allowed vLLM option --{name}: never allowed, {HARD_DENIED[action.name]}",
                hint="remove it from the allowlist",
            )
        allowed.add(action.name)
    return frozenset(allowed)
