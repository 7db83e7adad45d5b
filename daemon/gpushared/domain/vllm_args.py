"""Command lines and environments for model-server children (vLLM or the stub engine), built from validated facts.

Pure: the caller passes in the launcher, the resolved model, the port, what the partition reports,
the lease's device visibility and the child's directories; nothing here reads the system. The
stub engine takes the same command line as ``vllm serve`` (vllm.md §10), so one builder serves
both. The result is an argv list for exec, never a shell string.

How the memory budget reaches vLLM (vllm.md §1, §6; vllm/v1/worker/utils.py request_memory in
0.33.0): vLLM reads ``--gpu-memory-utilization F`` as a fraction of the *device total* it sees
(hipMemGetInfo), takes ``ceil(total x F)`` as its whole budget (weights, activations, graphs and
KV cache), and refuses to start if the device's free memory is below that. So F is computed
against what the partition reports, rounded *down* so that vLLM's own arithmetic never yields a
byte more than the budget. ``--kv-cache-memory-bytes`` is different: it fixes the KV cache alone,
skips the profiling that fits the KV cache into F, and does not respect F for sizing; the startup
free-memory check against F still runs. It is passed only when the spec names a KV size, and
always together with F.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

from gpushared.domain.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from gpushared.domain.model import (
    ModelSpec,
    resolve_options,
    validate_absolute_path,
    validate_model_ref,
    validate_spec_fields,
)
from gpushared.domain.units import MAX_BYTES, format_bytes

LOOPBACK = "127.0.0.1"
"""vLLM's --host default binds every interface (vllm.md §1); children listen on loopback only."""
UTILIZATION_DECIMALS = 4
"""1/10000 of a 192 GiB device is about 20 MiB: the most a budget can lose to rounding down."""
MIN_PORT = 1024
"""Children run unprivileged and cannot bind below 1024."""

BASE_ENV_ALLOWED: frozenset[str] = frozenset(
    {
        "PATH",
        "LANG",
        "LANGUAGE",
        "LC_ALL",
        "LC_CTYPE",
        "LC_COLLATE",
        "LC_MESSAGES",
        "LC_MONETARY",
        "LC_NUMERIC",
        "LC_TIME",
        "TZ",
        # Tuning an admin may set for every model (vllm.md §2); none widens what a child can reach.
        "VLLM_LOGGING_LEVEL",
        "VLLM_ENGINE_READY_TIMEOUT_S",
        "VLLM_ROCM_USE_AITER",
        "VLLM_ROCM_USE_AITER_MOE",
        "VLLM_ROCM_USE_AITER_MHA",
        "VLLM_ROCM_USE_AITER_LINEAR",
        "VLLM_ROCM_USE_AITER_RMSNORM",
        "VLLM_ROCM_USE_AITER_MLA",
    }
)
"""The only names taken from ``base``; everything else there is dropped."""

FORBIDDEN_ENV: frozenset[str] = frozenset(
    {
        # systemd's protocol variables: a child that inherits them can notify, feed the watchdog or
        # take over sockets as if it were the daemon.
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
        "CREDENTIALS_DIRECTORY",
        # Code injection into the child's Python or its libraries.
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "PYTHONPATH",
        "PYTHONHOME",
        "PYTHONSTARTUP",
        "PYTHONINSPECT",
        # vLLM: /collective_rpc (arbitrary RPC), runtime LoRA loading from paths, internal port base.
        "VLLM_SERVER_DEV_MODE",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
        "VLLM_PORT",
        "VLLM_HOST_IP",
        # Renumbers devices below HIP and breaks vLLM's physical-index mapping (lease.py).
        "ROCR_VISIBLE_DEVICES",
    }
)
"""Never in a child's environment, whatever ``base`` or the lease holds."""

FIXED_ENV: Mapping[str, str] = {
    # Log lines reach the journal as they are written, not when a buffer fills.
    "PYTHONUNBUFFERED": "1",
    # No usage reports to vLLM's or the hub's servers from a shared host.
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
MAX_ENV_VALUE_CHARS = 4096
MAX_API_KEY_CHARS = 512
_DEVICE_LIST = re.compile(r"^[0-9]{1,4}(,[0-9]{1,4}){0,63}$")
_LEASE_EXTRA = re.compile(r"^GPUSHARE_[A-Z0-9_]{1,64}$")
_API_KEY = re.compile(r"^[\x21-\x7e]+$")


def _format_units(units: int) -> str:
    whole, fraction = divmod(units, 10**UTILIZATION_DECIMALS)
    text = f"{whole}.{fraction:0{UTILIZATION_DECIMALS}d}".rstrip("0")
    return text + "0" if text.endswith(".") else text


def gpu_memory_utilization(budget_bytes: int, device_total_bytes: int) -> str:
    """The ``--gpu-memory-utilization`` value that gives vLLM at most ``budget_bytes``.

    ``device_total_bytes`` is the total vLLM will see for the device; the fraction is of that.
    Floor to ``UTILIZATION_DECIMALS`` in exact integer arithmetic, then step down while vLLM's own
    float computation, ``math.ceil(total * float(F))``, would still exceed the budget (a decimal
    such as 0.3 is stored slightly above itself, which can add a byte).
    """
    for subject, value in (("memory budget", budget_bytes), ("partition total", device_total_bytes)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BYTES:
            raise InvalidArgument(f"{subject}: {value!r} is not a byte count from 1 to 16 EiB")
    if budget_bytes > device_total_bytes:
        raise ResourceExhausted(
            f"memory: the budget of {format_bytes(budget_bytes)} per partition exceeds the "
            f"{format_bytes(device_total_bytes)} the partition reports",
            hint="ask for less memory or more partitions",
        )
    units = budget_bytes * 10**UTILIZATION_DECIMALS // device_total_bytes
    while units > 0 and math.ceil(device_total_bytes * float(_format_units(units))) > budget_bytes:
        units -= 1
    if units == 0:
        raise InvalidArgument(
            f"memory: a budget of {format_bytes(budget_bytes)} is less than 1/{10**UTILIZATION_DECIMALS} "
            f"of the {format_bytes(device_total_bytes)} the partition reports",
            hint="ask for more memory",
        )
    return _format_units(units)


def build_argv(
    spec: ModelSpec,
    *,
    launcher: Sequence[str],
    model_path_or_id: str,
    port: int,
    partition_cap_bytes: int,
    memory_bytes_per_partition: int,
    kv_cache_bytes_supported: bool,
) -> list[str]:
    """The child's argv: ``launcher + ["serve", MODEL, ...]``, same inputs giving the same list.

    ``launcher`` is the daemon's configured command up to the ``serve`` subcommand (e.g. the venv's
    ``vllm``, or the stub). ``model_path_or_id`` is what the child loads: the spec's hub id, or the
    path the adapter resolved and checked. ``partition_cap_bytes`` is the device total vLLM will
    see; when partitions report different totals (on ROCm 7.0.2 the primary DPX partition reports
    the whole GPU, mi300x.md §2.4), pass the largest, since one fraction applies to every rank.

    The spec is re-checked here (all but the admin allowlist, which ``validate_spec`` applies), so
    no owned, denied, unknown or malformed option reaches argv even if a caller skipped it.
    Never passed: ``--disable-log-stats`` (removes every vllm: metric), ``--disable-log-requests``
    (gone as a standalone flag), ``--api-key`` (argv is world-readable in /proc; see build_env).
    """
    validate_spec_fields(spec)
    options = resolve_options(spec.options)
    if isinstance(launcher, str) or not launcher or not all(isinstance(a, str) and a for a in launcher):
        raise InvalidArgument("launcher: must be a non-empty list of non-empty strings")
    if any("\x00" in a for a in launcher):
        raise InvalidArgument("launcher: contains a NUL character")
    validate_model_ref(model_path_or_id, subject="model path or id")
    if not isinstance(port, int) or isinstance(port, bool) or not MIN_PORT <= port <= 65535:
        raise InvalidArgument(f"port: {port!r} is out of range {MIN_PORT}-65535")
    utilization = gpu_memory_utilization(memory_bytes_per_partition, partition_cap_bytes)

    argv = [
        *launcher,
        "serve",
        model_path_or_id,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "--served-model-name",
        spec.served_model_name,
        "--tensor-parallel-size",
        str(spec.partitions),
        "--gpu-memory-utilization",
        utilization,
    ]
    if spec.kv_cache_bytes is not None:
        if not kv_cache_bytes_supported:
            raise FailedPrecondition(
                "kv cache: this vLLM has no --kv-cache-memory-bytes",
                hint="leave the kv cache size unset (the memory budget still applies) or upgrade vLLM",
            )
        if spec.kv_cache_bytes >= memory_bytes_per_partition:
            raise InvalidArgument(
                f"kv cache: {format_bytes(spec.kv_cache_bytes)} per partition leaves nothing of the "
                f"{format_bytes(memory_bytes_per_partition)} budget for weights and activations",
                hint="vLLM adds the KV cache to the weights; ask for a smaller KV cache or more memory",
            )
        argv += ["--kv-cache-memory-bytes", str(spec.kv_cache_bytes)]
    argv += ["--dtype", str(spec.dtype)]
    if spec.max_model_len is not None:
        argv += ["--max-model-len", str(spec.max_model_len)]
    if spec.max_num_seqs is not None:
        argv += ["--max-num-seqs", str(spec.max_num_seqs)]
    for option in options:
        argv += option.argv()
    return argv


FIXED_FLAGS = (
    "--host",
    "--port",
    "--served-model-name",
    "--tensor-parallel-size",
    "--gpu-memory-utilization",
    "--dtype",
)
"""Flags every command line carries; an engine that lacks one cannot be driven by gpushared at all."""


def planned_flags(spec: ModelSpec) -> list[str]:
    """The flags build_argv will put on the command line for ``spec`` (values left out)."""
    flags = list(FIXED_FLAGS)
    if spec.kv_cache_bytes is not None:
        flags.append("--kv-cache-memory-bytes")
    if spec.max_model_len is not None:
        flags.append("--max-model-len")
    if spec.max_num_seqs is not None:
        flags.append("--max-num-seqs")
    return flags + [option.flag for option in resolve_options(spec.options)]


def check_known_flags(argv: list[str], known: frozenset[str], *, launcher: str) -> None:
    """Refuse an argv with a flag the installed engine's parser does not list (its ``serve --help=all``).

    gpushare's option table follows the newest vLLM; an older one rejects newer spellings such as
    ``--disable-prefix-caching`` (0.33) at start with "unrecognized arguments", which would only show up as a
    crash loop. Refusing here names the option and starts nothing."""
    unknown = [a for a in argv if a.startswith("--") and a.split("=", 1)[0] not in known]
    if not unknown:
        return
    fixed = [a for a in unknown if a in FIXED_FLAGS]
    if fixed:
        raise FailedPrecondition(
            f"engine {launcher}: its serve command has no {', '.join(fixed)}",
            hint="point models.vllm_launcher at a vLLM serve command (vLLM 0.10 or newer)",
        )
    raise FailedPrecondition(
        f"option {unknown[0]}: the installed vLLM ({launcher}) does not know it",
        hint="use the spelling that vLLM lists in `vllm serve --help=all` (e.g. --no-enable-prefix-caching "
        "before 0.33), or drop the option",
    )


def _checked_value(name: str, value: str) -> str:
    if (
        not isinstance(value, str)
        or len(value) > MAX_ENV_VALUE_CHARS
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    ):
        raise InvalidArgument(
            f"environment {name}: the value is not text of at most {MAX_ENV_VALUE_CHARS} characters "
            "without control characters"
        )
    return value


def validate_api_key(api_key: str) -> str:
    """The key itself, if vLLM and an HTTP header can carry it unchanged."""
    if not isinstance(api_key, str) or not 1 <= len(api_key) <= MAX_API_KEY_CHARS or not _API_KEY.fullmatch(api_key):
        # An empty key would silently turn authentication off (vLLM checks `if api_key`).
        raise InvalidArgument(
            f"api key: must be 1-{MAX_API_KEY_CHARS} visible ASCII characters",
            hint="leave it unset for no key; spaces and control characters are not allowed",
        )
    return api_key


def build_env(
    *,
    base: Mapping[str, str],
    lease_env: Mapping[str, str],
    home: str,
    tmpdir: str,
    cache_dir: str,
    hf_home: str,
    api_key: str | None,
    offline: bool,
) -> dict[str, str]:
    """The child's whole environment, built from scratch.

    From ``base`` only the names in ``BASE_ENV_ALLOWED`` (PATH, locale, TZ, a few vLLM tuning
    knobs); PATH defaults to ``DEFAULT_PATH``. Device visibility exactly as the lease says, with
    HIP_VISIBLE_DEVICES and CUDA_VISIBLE_DEVICES equal (vLLM on ROCm refuses them unequal) and
    ROCR_VISIBLE_DEVICES never set; the lease's GPUSHARE_* facts pass through. HOME, TMPDIR,
    XDG_CACHE_HOME (= cache_dir), VLLM_CACHE_ROOT (= cache_dir/vllm, vLLM's own layout), HF_HOME;
    VLLM_API_KEY only when a key is given (argv would show it in /proc); HF_HUB_OFFLINE=1 and
    TRANSFORMERS_OFFLINE=1 when offline; ``FIXED_ENV`` always. Nothing in ``FORBIDDEN_ENV`` can
    appear: no source above can supply those names.
    """
    env: dict[str, str] = {"PATH": DEFAULT_PATH}
    for name in sorted(BASE_ENV_ALLOWED & base.keys()):
        env[name] = _checked_value(name, base[name])
    env.update(FIXED_ENV)

    hip = lease_env.get("HIP_VISIBLE_DEVICES")
    cuda = lease_env.get("CUDA_VISIBLE_DEVICES")
    if hip is not None and cuda is not None and hip != cuda:
        raise InvalidArgument(
            f"lease: HIP_VISIBLE_DEVICES {hip[:40]!r} and CUDA_VISIBLE_DEVICES {cuda[:40]!r} differ",
            hint="vLLM on ROCm refuses to start when they differ",
        )
    devices = hip if hip is not None else cuda
    if devices is None or not isinstance(devices, str) or not _DEVICE_LIST.fullmatch(devices):
        raise InvalidArgument(
            f"lease: device list {devices!r:.40} is not a comma-separated list of partition indices",
            hint="a model needs at least one leased partition",
        )
    indices = devices.split(",")
    if len(set(indices)) != len(indices):
        raise InvalidArgument(f"lease: device list {devices!r} names a partition twice")
    env["HIP_VISIBLE_DEVICES"] = devices
    env["CUDA_VISIBLE_DEVICES"] = devices
    for name in sorted(lease_env):
        if _LEASE_EXTRA.fullmatch(name):
            env[name] = _checked_value(name, lease_env[name])

    for name, path in (("HOME", home), ("TMPDIR", tmpdir), ("XDG_CACHE_HOME", cache_dir), ("HF_HOME", hf_home)):
        validate_absolute_path(path, subject=name)
        env[name] = path
    env["VLLM_CACHE_ROOT"] = cache_dir + "/vllm"

    if api_key is not None:
        env["VLLM_API_KEY"] = validate_api_key(api_key)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
        env["TRANSFORMERS_OFFLINE"] = "1"
    return env
