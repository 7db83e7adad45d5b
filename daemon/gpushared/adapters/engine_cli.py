"""What the installed engine's command line accepts, read from its own ``serve --help=all`` and cached on disk."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 300.0
"""Importing vLLM takes 10-60 s; a launcher that needs longer than this to print its help is not usable."""
RETRY_SECONDS = 600.0
_FLAG = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")
_CACHE_FILE = "engine-flags.json"


class EngineCli:
    """Implements services.supervision_ports.EngineCliPort.

    The probe runs the admin's configured launcher (trusted configuration) with an environment built from
    scratch. Its result is cached in the state directory, keyed by the launcher's argv and the size and mtime
    of the files it names, so a daemon restart costs nothing and an upgrade of vLLM is noticed."""

    def __init__(self, state_dir: Path, *, timeout: float = PROBE_TIMEOUT_SECONDS) -> None:
        self._cache_path = state_dir / _CACHE_FILE
        self._home = state_dir / "engine-probe"
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}
        self._failed: dict[str, float] = {}

    async def known_flags(self, launcher: Sequence[str]) -> frozenset[str] | None:
        """Every option the launcher's ``serve`` accepts; None when it cannot be asked (then nothing is checked)."""
        key = self._key(launcher)
        cached = self._cached(key)
        if cached is not None:
            return cached
        if time.monotonic() - self._failed.get(key, -RETRY_SECONDS) < RETRY_SECONDS:
            return None
        async with self._locks.setdefault(key, asyncio.Lock()):
            cached = self._cached(key)
            if cached is not None:
                return cached
            flags = await self._probe(launcher)
            if flags is None:
                self._failed[key] = time.monotonic()
                return None
            self._store(key, flags)
            return flags

    async def _probe(self, launcher: Sequence[str]) -> frozenset[str] | None:
        self._home.mkdir(mode=0o700, parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(self._home),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
        }
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *launcher,
                "serve",
                "--help=all",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=str(self._home),
                start_new_session=True,
            )
        except OSError as exc:
            log.warning(
                "engine %s: cannot run it to list its options (%s); serve checks options against gpushare's own "
                "table only",
                launcher[0],
                exc.strerror,
                extra={"event": "engine_probe_failed"},
            )
            return None
        try:
            out, err = await asyncio.wait_for(process.communicate(), self._timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:
            # Never leave a half-imported vLLM behind, whether it hung or the daemon is stopping.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, 9)
            await asyncio.shield(process.wait())
            if isinstance(exc, asyncio.CancelledError):
                raise
            log.warning("engine %s: `serve --help=all` took over %.0f s", launcher[0], self._timeout)
            return None
        flags = frozenset(_FLAG.findall(out.decode(errors="replace")))
        if process.returncode != 0 or "--port" not in flags:
            last = (err.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            log.warning(
                "engine %s: `serve --help=all` failed (exit %s: %s); options are checked against gpushare's own "
                "table only",
                launcher[0],
                process.returncode,
                last[:200],
                extra={"event": "engine_probe_failed"},
            )
            return None
        log.info(
            "engine %s: %d serve options listed in %.1f s",
            launcher[0],
            len(flags),
            time.monotonic() - started,
            extra={"event": "engine_probed"},
        )
        return flags

    @staticmethod
    def _key(launcher: Sequence[str]) -> str:
        parts: list[str] = []
        for index, arg in enumerate(launcher):
            path = shutil.which(arg) if index == 0 else (arg if arg.startswith("/") else None)
            try:
                stat = os.stat(path) if path else None
            except OSError:
                stat = None
            parts.append(f"{arg}\0{stat.st_size}\0{stat.st_mtime_ns}" if stat else arg)
        return hashlib.sha256("\0\0".join(parts).encode()).hexdigest()

    def _read_cache(self) -> dict[str, list[str]]:
        try:
            data = json.loads(self._cache_path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _cached(self, key: str) -> frozenset[str] | None:
        flags = self._read_cache().get(key)
        return frozenset(flags) if isinstance(flags, list) else None

    def _store(self, key: str, flags: frozenset[str]) -> None:
        data = self._read_cache()
        data[key] = sorted(flags)
        tmp = self._cache_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self._cache_path)
        except OSError as exc:
            log.warning("engine option cache %s: cannot write it (%s)", self._cache_path, exc.strerror)
