"""Health and readiness probes of a model server on loopback: GET /health and /v1/models over asyncio streams."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket

LOOPBACK = "127.0.0.1"
# /v1/models lists a handful of names; anything larger is not a model server we started.
_MAX_BODY = 1 << 20


async def read_response_head(reader: asyncio.StreamReader) -> tuple[int, int | None]:
    """Status code and Content-Length (None when absent) of an HTTP/1.x response; ValueError if it is not one."""
    status_line = await reader.readline()
    parts = status_line.decode("latin-1").split()
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP response: {status_line[:80]!r}")
    length: int | None = None
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            return int(parts[1]), length
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "content-length":
            length = int(value.strip())


class HttpProbe:
    """Every request is bounded by ``timeout``: a hung server (accepts, never answers) counts as a failed probe."""

    def __init__(self, *, host: str = LOOPBACK, timeout: float = 2.0) -> None:
        self.host = host
        self.timeout = timeout

    async def get(self, port: int, path: str, *, api_key: str | None = None) -> tuple[int, bytes]:
        """Status and body of GET ``path``; raises OSError, TimeoutError or ValueError (not HTTP)."""
        return await self.request(port, "GET", path, api_key=api_key)

    async def request(
        self,
        port: int,
        method: str,
        path: str,
        *,
        api_key: str | None = None,
        body: bytes = b"",
        timeout: float | None = None,
    ) -> tuple[int, bytes]:
        """Status and body of one request; raises OSError, TimeoutError or ValueError (not HTTP)."""
        headers = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{port}\r\nAccept: application/json\r\n"
        if api_key is not None:
            headers += f"Authorization: Bearer {api_key}\r\n"
        if body:
            headers += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        async with asyncio.timeout(self.timeout if timeout is None else timeout):
            reader, writer = await asyncio.open_connection(self.host, port)
            try:
                writer.write(f"{headers}Connection: close\r\n\r\n".encode() + body)
                await writer.drain()
                status, length = await read_response_head(reader)
                if length is not None:
                    body = await reader.readexactly(min(length, _MAX_BODY))
                else:
                    body = await reader.read(_MAX_BODY)  # Connection: close, so EOF ends the body
                return status, body
            finally:
                writer.close()
                # A hung peer may never acknowledge the close; the surrounding timeout still bounds this wait.
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    async def health(self, port: int) -> bool:
        try:
            status, _ = await self.get(port, "/health")
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return False
        return status == 200

    def refused(self, port: int) -> bool:
        """Nothing listens on the port yet: a non-blocking connect() on loopback says so at once, for a fraction of
        what an asyncio connection costs; a starting model is polled often, so this is most polls."""
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setblocking(False)
            return probe.connect_ex((self.host, port)) == errno.ECONNREFUSED

    async def ready(self, port: int, served_name: str, *, api_key: str | None = None) -> bool:
        if self.refused(port) or not await self.health(port):
            return False
        try:
            status, body = await self.get(port, "/v1/models", api_key=api_key)
            listing = json.loads(body)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return False
        if status != 200 or not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            return False
        return any(isinstance(entry, dict) and entry.get("id") == served_name for entry in listing["data"])

    async def completes(self, port: int, served_name: str, *, api_key: str | None, timeout: float) -> bool:
        # One token of a fixed prompt: the cheapest request that needs the engine to schedule and step.
        body = json.dumps({"model": served_name, "prompt": "ping", "max_tokens": 1, "temperature": 0}).encode()
        try:
            status, answer = await self.request(
                port, "POST", "/v1/completions", api_key=api_key, body=body, timeout=timeout
            )
            parsed = json.loads(answer)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):
            return False
        return status == 200 and isinstance(parsed, dict) and isinstance(parsed.get("choices"), list)
