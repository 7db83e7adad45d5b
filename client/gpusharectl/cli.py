"""gpusharectl command line: parse, call the daemon, print; never a traceback for a user error."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gpusharectl import render, top
from gpusharectl.client import (
    DEFAULT_SOCKET,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_USAGE,
    SOCKET_ENV,
    Client,
    CtlError,
    socket_path,
)
from gpushared.api.v1 import gpushare_pb2 as pb
from gpushared.domain.errors import InvalidArgument
from gpushared.domain.units import format_bytes, parse_size

COMPUTE = {
    "SPX": pb.COMPUTE_PARTITION_SPX,
    "DPX": pb.COMPUTE_PARTITION_DPX,
    "QPX": pb.COMPUTE_PARTITION_QPX,
    "CPX": pb.COMPUTE_PARTITION_CPX,
}
POLICY = {"spread": pb.PLACEMENT_POLICY_SPREAD, "pack": pb.PLACEMENT_POLICY_PACK}
ENGINE = {"vllm": pb.ENGINE_VLLM, "stub": pb.ENGINE_STUB}

ALLOCATION_ID = re.compile(r"a-[0-9a-f]{12}")

EPILOG = """\
exit codes: 0 ok, 1 the daemon refused (reason printed), 2 usage error,
            3 daemon unreachable, 4 permission denied
sizes: bytes, or a number with an IEC unit (512MiB, 40GiB, 1.5TiB) or SI unit (40GB)
"""


def _size(text: str) -> int:
    try:
        return parse_size(text, subject="--memory")
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpusharectl",
        description="Inspect and allocate the GPU partitions that gpushared manages.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--socket", metavar="PATH", help=f"daemon socket (default ${SOCKET_ENV}, else {DEFAULT_SOCKET})"
    )
    parser.add_argument("--json", action="store_true", help="print the API response as JSON (proto field names)")
    parser.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS", help="per-call deadline (default 10)")
    # --json also after the command (`gpusharectl gpus --json`); SUPPRESS keeps the global value.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the API response as JSON")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    commands.add_parser("status", parents=[common], help="daemon version, backend, uptime and counts")
    commands.add_parser("gpus", parents=[common], help="physical GPUs: modes, memory and pools")
    commands.add_parser("partitions", parents=[common], help="logical devices: identifiers, caps and who holds them")
    allocate = commands.add_parser(
        "allocate",
        parents=[common],
        help="reserve partitions and memory for a workload",
        description="Reserve partitions and pool memory. The memory is the total; it is split evenly over the partitions.",
    )
    allocate.add_argument("--memory", required=True, type=_size, metavar="SIZE", help="total memory, e.g. 40GiB")
    allocate.add_argument("--partitions", type=_count, default=1, metavar="N", help="how many partitions (default 1)")
    allocate.add_argument("--gpu", type=_count, metavar="I", help="place only on GPU I")
    allocate.add_argument(
        "--compute", type=str.upper, choices=sorted(COMPUTE), help="place only on GPUs in this compute partition"
    )
    allocate.add_argument("--name", default="", help="a label: up to 63 of A-Z a-z 0-9 . _ -")
    allocate.add_argument("--policy", choices=sorted(POLICY), help="placement policy (default: the daemon's, spread)")
    allocate.add_argument("--env", action="store_true", help="print only `export VAR=value` lines, for eval")
    release = commands.add_parser("release", parents=[common], help="give an allocation back (owner or admin)")
    release.add_argument("id", help="allocation id, e.g. a-0123456789ab")
    commands.add_parser("list", parents=[common], help="all allocations")
    show = commands.add_parser("show", parents=[common], help="one allocation or one model in full")
    show.add_argument("id", metavar="ID|NAME", help="allocation id (a-0123456789ab) or model name")
    serve = commands.add_parser(
        "serve",
        parents=[common],
        help="serve a model: allocate partitions and start a supervised engine",
        description="Allocate partitions for MODEL (a hub id org/name or an absolute path) and start one "
        "supervised engine child on them, as your uid. Prints the endpoint.",
    )
    serve.add_argument("model", help="hub id (org/name) or absolute path")
    serve.add_argument("--name", help="gpushare name of the model (default: derived from MODEL)")
    serve.add_argument("--served-name", default="", help="name in /v1/models (default: MODEL)")
    serve.add_argument("--engine", choices=sorted(ENGINE), default="vllm", help="vllm (default) or stub")
    serve.add_argument(
        "--memory", type=_size, metavar="SIZE", help="total memory budget (default: 90%% of each partition)"
    )
    serve.add_argument("--partitions", type=_count, default=1, metavar="N", help="tensor parallel size (default 1)")
    serve.add_argument("--gpu", type=_count, metavar="I", help="place only on GPU I")
    serve.add_argument("--compute", type=str.upper, choices=sorted(COMPUTE), help="place only on GPUs in this mode")
    serve.add_argument("--max-model-len", type=_count, metavar="N")
    serve.add_argument("--dtype", choices=("auto", "half", "float16", "bfloat16", "float", "float32"))
    serve.add_argument("--max-num-seqs", type=_count, metavar="N")
    serve.add_argument(
        "--kv-cache-bytes", type=_size, metavar="SIZE", help="fixed KV cache per partition (default: sized by --memory)"
    )
    serve.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE", help="extra engine option the admin allows"
    )
    serve.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="require this key (the file's first line; - reads stdin) as a bearer token on the model's /v1 "
        "endpoints; never given on the command line, which other users can read",
    )
    serve.add_argument("--wait", action="store_true", help="wait until the model is READY (or FAILED)")
    serve.add_argument("--wait-timeout", type=float, default=900.0, metavar="SECONDS", help="for --wait (default 900)")
    stop = commands.add_parser("stop", parents=[common], help="stop a model and release its allocation")
    stop.add_argument("name")
    stop.add_argument("--keep-allocation", action="store_true", help="keep the partitions reserved")
    commands.add_parser("models", parents=[common], help="all served models")
    logs = commands.add_parser("logs", help="a model's log (owner or admin)")
    logs.add_argument("name")
    logs.add_argument("-n", "--lines", type=_count, default=100, metavar="N", help="last N lines (default 100)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until interrupted")
    _partition_parsers(commands, common)
    top_command = commands.add_parser(
        "top", help="live view of GPUs, partitions and models: memory bars, request rates, TTFT (q quits)"
    )
    top.add_arguments(top_command)
    health = commands.add_parser("health", parents=[common], help="grpc.health.v1 check: exit 0 when serving")
    health.add_argument("--service", default="", help="service name (default: the whole server)")
    return parser


MEMORY = {"NPS1": pb.MEMORY_PARTITION_NPS1, "NPS2": pb.MEMORY_PARTITION_NPS2, "NPS4": pb.MEMORY_PARTITION_NPS4}


def _gpu_list(text: str) -> list[int]:
    """``all`` (every GPU: an empty list) or indices and ranges such as 0,2-3."""
    if text.strip() == "all":
        return []
    picked: set[int] = set()
    for item in text.split(","):
        low, dash, high = item.strip().partition("-")
        if not low.isdigit() or (dash and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"{text!r}: use all, or GPU indices and ranges such as 0,2-3")
        if dash and int(high) < int(low):
            raise argparse.ArgumentTypeError(f"{text!r}: range {item.strip()} runs backwards")
        picked.update(range(int(low), int(high if dash else low) + 1))
    return sorted(picked)


def _partition_parsers(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    partition = commands.add_parser(
        "partition",
        help="partition layout: show, plan or apply a compute/memory partition change",
        description="Show the partition layout, or change it. A memory partition (NPS) change applies to every "
        "GPU of the hive and needs a driver reload; models in the way are drained only with --drain.",
    )
    layouts = partition.add_subparsers(dest="partition_command", metavar="ACTION", required=True)
    layouts.add_parser("show", parents=[common], help="one row per GPU: modes, desired modes, a cell per partition")
    for name, text in (
        ("plan", "dry run: the steps, what would be drained, who holds the devices (no side effects)"),
        ("apply", "change the layout (admin): an operation that drains, switches, verifies, restarts models"),
    ):
        action = layouts.add_parser(name, parents=[common], help=text, description=text)
        action.add_argument(
            "--gpus", type=_gpu_list, default=[], metavar="all|LIST", help="GPUs to change, e.g. 0,2-3 (default all)"
        )
        action.add_argument(
            "--compute", required=True, type=str.upper, choices=sorted(COMPUTE), help="compute partition"
        )
        action.add_argument(
            "--memory", type=str.upper, choices=sorted(MEMORY), help="memory partition (default: keep the current one)"
        )
        if name == "apply":
            action.add_argument("--drain", action="store_true", help="stop the models in the way, restart them after")
            action.add_argument("--wait", action="store_true", help="wait until the operation finishes")
            action.add_argument(
                "--wait-timeout", type=float, default=900.0, metavar="SECONDS", help="for --wait (default 900)"
            )
    operation = commands.add_parser("operation", help="partition operations: show, wait, list")
    operations = operation.add_subparsers(dest="operation_command", metavar="ACTION", required=True)
    for name, text in (("show", "one operation: state, step, progress, history"), ("wait", "wait until it finishes")):
        action = operations.add_parser(name, parents=[common], help=text)
        action.add_argument("id", help="operation id, e.g. op-0123abcd")
        if name == "wait":
            action.add_argument("--wait-timeout", type=float, default=900.0, metavar="SECONDS", help="default 900")
    operations.add_parser("list", parents=[common], help="the running operation and recent finished ones")
    gpu = commands.add_parser("gpu", help="one GPU: clear a degraded mark")
    gpus = gpu.add_subparsers(dest="gpu_command", metavar="ACTION", required=True)
    clear = gpus.add_parser("clear", parents=[common], help="let a degraded GPU be allocated again (admin)")
    clear.add_argument("index", type=_count, help="GPU index")


def _partition(args: argparse.Namespace, client: Client, out: Callable[[str], None]) -> int:
    if args.partition_command == "show":
        gpus = client.list_gpus()
        out(render.to_json(gpus) if args.json else render.partition_layout(gpus))
        return EXIT_OK
    layout = pb.LayoutRequest(
        gpu_indices=args.gpus,
        compute_partition=COMPUTE[args.compute],
        memory_partition=MEMORY.get(args.memory or "", pb.MEMORY_PARTITION_UNSPECIFIED),
    )
    if args.partition_command == "plan":
        plan = client.plan_partitions(layout).plan
        out(render.to_json(plan) if args.json else render.partition_plan(plan))
        return EXIT_OK
    operation = client.apply_partitions(layout, drain=args.drain).operation
    if args.wait:
        operation = _wait_operation(client, operation, args.wait_timeout, None if args.json else out)
    out(render.to_json(operation) if args.json else render.operation(operation))
    return _operation_exit(operation) if args.wait else EXIT_OK


def _operation_exit(operation: pb.Operation) -> int:
    """After waiting: 0 only when the layout was changed; a rolled-back or degraded operation is a refusal."""
    return EXIT_OK if operation.state == pb.OPERATION_STATE_SUCCEEDED else EXIT_REFUSED


def _wait_operation(
    client: Client, operation: pb.Operation, timeout: float, progress: Callable[[str], None] | None
) -> pb.Operation:
    deadline = time.monotonic() + timeout
    shown = ""
    while True:
        if progress is not None and operation.progress != shown:
            progress(f"{operation.id}: {operation.progress}")
            shown = operation.progress
        if operation.state not in (pb.OPERATION_STATE_RUNNING, pb.OPERATION_STATE_ROLLING_BACK):
            return operation
        if time.monotonic() > deadline:
            raise CtlError(
                f"operation {operation.id}: not finished after {timeout:g}s ({operation.progress})", EXIT_REFUSED
            )
        time.sleep(0.2)
        operation = client.get_operation(operation.id).operation


def _operation(args: argparse.Namespace, client: Client, out: Callable[[str], None]) -> int:
    if args.operation_command == "list":
        listed = client.list_operations()
        out(render.to_json(listed) if args.json else render.operations(listed))
        return EXIT_OK
    operation = client.get_operation(args.id).operation
    if args.operation_command == "wait":
        operation = _wait_operation(client, operation, args.wait_timeout, None if args.json else out)
    out(render.to_json(operation) if args.json else render.operation(operation))
    return _operation_exit(operation) if args.operation_command == "wait" else EXIT_OK


def _run(args: argparse.Namespace, client: Client) -> int:
    out: Callable[[str], None] = print
    if args.command == "status":
        status = client.get_status()
        out(render.to_json(status) if args.json else render.status(status))
    elif args.command == "gpus":
        gpus = client.list_gpus()
        out(render.to_json(gpus) if args.json else render.gpus(gpus))
    elif args.command == "partitions":
        parts = client.list_partitions()
        out(render.to_json(parts) if args.json else render.partitions(parts))
    elif args.command == "allocate":
        request = pb.AllocateRequest(
            memory_bytes=args.memory,
            partition_count=args.partitions,
            name=args.name,
            compute_partition=COMPUTE.get(args.compute or "", pb.COMPUTE_PARTITION_UNSPECIFIED),
            policy=POLICY.get(args.policy or "", pb.PLACEMENT_POLICY_UNSPECIFIED),
        )
        if args.gpu is not None:
            request.gpu_index = args.gpu
        allocation = client.allocate(request).allocation
        if args.env:
            out(render.env_exports(allocation))
        else:
            out(render.to_json(allocation) if args.json else render.allocation(allocation))
    elif args.command == "release":
        released = client.release(args.id)
        if args.json:
            out(render.to_json(released))
        else:
            a = released.allocation
            out(f"released {a.id} ({render.where(a)}, {format_bytes(a.memory_bytes_total)})")
    elif args.command == "list":
        allocations = client.list_allocations()
        out(render.to_json(allocations) if args.json else render.allocations(allocations))
    elif args.command == "show":
        if ALLOCATION_ID.fullmatch(args.id):
            allocation = client.get_allocation(args.id).allocation
            out(render.to_json(allocation) if args.json else render.allocation(allocation))
        else:
            model = client.get_model(args.id).model
            out(render.to_json(model) if args.json else render.model(model))
    elif args.command == "serve":
        return _serve(args, client, out)
    elif args.command == "partition":
        return _partition(args, client, out)
    elif args.command == "operation":
        return _operation(args, client, out)
    elif args.command == "gpu":
        cleared = client.clear_degraded_gpu(args.index)
        out(render.to_json(cleared) if args.json else f"gpu {args.index}: cleared (was: {cleared.reason})")
    elif args.command == "stop":
        stopped = client.stop(args.name, keep_allocation=args.keep_allocation).model
        out(render.to_json(stopped) if args.json else f"stopped {stopped.name}")
    elif args.command == "logs":
        return _logs(args, client)
    elif args.command == "models":
        models = client.list_models()
        out(render.to_json(models) if args.json else render.models(models))
    elif args.command == "top":
        return top.main(args, client)
    elif args.command == "health":
        response = client.health(args.service)
        name = response.ServingStatus.Name(response.status)
        out(render.to_json(response) if args.json else name)
        return EXIT_OK if name == "SERVING" else EXIT_REFUSED
    return EXIT_OK


def _serve(args: argparse.Namespace, client: Client, out: Callable[[str], None]) -> int:
    name = args.name or args.model.rstrip("/").rsplit("/", 1)[-1]
    options = []
    for item in args.option:
        key, _, value = item.partition("=")
        options.append(pb.EngineOption(name=key, value=value))
    spec = pb.ModelSpec(
        name=name,
        served_name=args.served_name,
        engine=ENGINE[args.engine],
        model=args.model,
        memory_bytes=args.memory or 0,
        partition_count=args.partitions,
        max_model_len=args.max_model_len or 0,
        dtype=args.dtype or "",
        max_num_seqs=args.max_num_seqs or 0,
        kv_cache_bytes=args.kv_cache_bytes or 0,
        options=options,
        compute_partition=COMPUTE.get(args.compute or "", pb.COMPUTE_PARTITION_UNSPECIFIED),
    )
    if args.gpu is not None:
        spec.gpu_index = args.gpu
    model = client.serve(spec, api_key=_read_api_key(args.api_key_file)).model
    if args.wait:
        model = _wait(client, model, args.wait_timeout, None if args.json else out)
    out(render.to_json(model) if args.json else f"{model.name}: {render.state_name(model.state)}  {model.endpoint}")
    return EXIT_OK if not args.wait or model.state == pb.MODEL_STATE_READY else EXIT_REFUSED


def _read_api_key(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = sys.stdin.readline() if path == "-" else Path(path).read_text().split("\n", 1)[0]
    except (OSError, UnicodeDecodeError) as exc:
        raise CtlError(f"--api-key-file {path}: cannot read it ({exc})", EXIT_USAGE) from exc
    key = text.strip()
    if not key:
        raise CtlError(f"--api-key-file {path}: the first line is empty", EXIT_USAGE)
    return key


def _logs(args: argparse.Namespace, client: Client) -> int:
    response = client.read_model_log(args.name, tail_lines=args.lines or 100, from_offset=None)
    sys.stdout.buffer.write(response.data)
    sys.stdout.flush()
    while args.follow:
        try:
            time.sleep(0.5)
        except KeyboardInterrupt:
            return EXIT_OK
        response = client.read_model_log(args.name, tail_lines=0, from_offset=response.next_offset)
        sys.stdout.buffer.write(response.data)
        sys.stdout.flush()
    return EXIT_OK


def _wait(client: Client, model: pb.Model, timeout: float, progress: Callable[[str], None] | None) -> pb.Model:
    """Poll until READY or FAILED, printing each state change."""
    started = time.monotonic()
    deadline = started + timeout
    shown = -1
    while True:
        if model.state != shown and progress is not None:
            progress(f"{model.name}: {render.state_name(model.state)}")
            shown = model.state
        if model.state in (pb.MODEL_STATE_READY, pb.MODEL_STATE_FAILED, pb.MODEL_STATE_STOPPED):
            return model
        if time.monotonic() > deadline:
            raise CtlError(
                f"model {model.name}: not READY after {timeout:g}s (state {render.state_name(model.state)})",
                EXIT_REFUSED,
                hint=f"see `gpusharectl show {model.name}`",
            )
        # Often early (a stub starts in half a second), rarely late (vLLM takes minutes): at most 2% added.
        time.sleep(min(0.2, max(0.02, 0.02 * (time.monotonic() - started))))
        model = client.get_model(model.name).model


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    path = socket_path(args.socket)
    try:
        with Client(path, timeout=args.timeout) as client:
            return _run(args, client)
    except CtlError as exc:
        # One line: what, why, and the fix.
        hint = f" (hint: {exc.hint})" if exc.hint else ""
        print(f"gpusharectl: {exc.message}{hint}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `gpusharectl list | head`
        return EXIT_OK
