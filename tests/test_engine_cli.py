"""Asking the installed engine which serve options it knows: success is cached, every failure means 'unknown'."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from gpushared.adapters.engine_cli import EngineCli


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def test_flags_are_read_once_and_cached_on_disk(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    good = script(tmp_path, "vllm", f'echo x >> {calls}\necho "usage: --port PORT --host HOST --dtype, --foo-bar"\n')
    flags = asyncio.run(EngineCli(tmp_path).known_flags([str(good)]))
    assert flags == frozenset({"--port", "--host", "--dtype", "--foo-bar"})
    assert asyncio.run(EngineCli(tmp_path).known_flags([str(good)])) == flags, "a new daemon reads the cache"
    assert calls.read_text().count("x") == 1
    # Another vLLM at the same path (an upgrade) is asked again.
    good.write_text(good.read_text() + "echo --new-flag\n")
    assert "--new-flag" in (asyncio.run(EngineCli(tmp_path).known_flags([str(good)])) or ())


@pytest.mark.parametrize(
    ("body", "logged"),
    [
        ("echo 'Traceback: no module named vllm' >&2\nexit 1\n", "failed (exit 1: Traceback: no module named vllm)"),
        ("echo 'no options here'\n", "failed (exit 0"),
    ],
)
def test_a_launcher_that_cannot_answer_means_unknown(
    tmp_path: Path, body: str, logged: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = tmp_path / "calls"
    bad = script(tmp_path, "vllm", f"echo x >> {calls}\n" + body)
    cli = EngineCli(tmp_path)
    assert asyncio.run(cli.known_flags([str(bad)])) is None
    assert logged in caplog.text
    assert asyncio.run(cli.known_flags([str(bad)])) is None
    assert calls.read_text().count("x") == 1, "not asked again within the retry period"
    bad.write_text(bad.read_text() + "\n")
    assert asyncio.run(cli.known_flags([str(bad)])) is None
    assert calls.read_text().count("x") == 2, "a changed launcher is asked again"


def test_missing_and_hung_launchers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert asyncio.run(EngineCli(tmp_path).known_flags([str(tmp_path / "absent")])) is None
    assert "cannot run it to list its options" in caplog.text
    pid_file = tmp_path / "pid"
    hung = script(tmp_path, "slow", f"echo $$ > {pid_file}\nexec sleep 60\n")
    assert asyncio.run(EngineCli(tmp_path, timeout=0.5).known_flags([str(hung)])) is None
    assert "took over 0 s" in caplog.text or "took over 1 s" in caplog.text
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
