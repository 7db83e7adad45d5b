"""Benchmark: cost of the front-door relay on a unary RPC, against the same grpc.aio server without it.

Run:  PYTHONPATH=daemon python bench/relay_overhead.py [--calls N] [--rounds R] [--json]
      [--designs frontdoor,thread,thread-splice,asyncio] [--duration S]

Every server and every client is its own process: a grpc.aio server with the standard
health servicer on a Unix socket, either bare or behind a relay; clients are a sync
grpc client doing sequential Check calls (latency) and a grpc.aio client keeping 16
calls in flight (throughput).  Bare and relayed runs alternate (ABAB) and the summary
reports medians of the per-round ratios, because a shared 2-core box is noisy.

Designs: frontdoor = gpushared.transport.front_door.FrontDoor (helper process, epoll);
thread = the same epoll relay run as a thread inside the server process;
thread-splice = a thread relaying with os.splice through a pipe per direction;
asyncio = asyncio protocols on the grpc.aio server's own loop.  Only frontdoor is
production code; the others exist here to keep the design choice reproducible.
Informational only: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

DESIGNS = ("frontdoor", "thread", "thread-splice", "asyncio")
WARMUP = 500
CONCURRENCY = 16
TARGETS = {"p50": 1.5, "p99": 2.0, "rps": 0.5}
CHECK = "/grpc.health.v1.Health/Check"
REPO = Path(__file__).resolve().parent.parent


# --- bench-only relays (designs a, b, c) ----------------------------------------------

_serial = itertools.count(1)


def _dial(internal: Path, peer_dir: Path, conn: socket.socket) -> socket.socket:
    pid, uid, gid = struct.unpack("=iII", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    name = f"{peer_dir}/{uid}.{gid}.{pid}.{next(_serial)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(name)
    try:
        sock.connect(str(internal))
    finally:
        os.unlink(name)
    return sock


class _Half(asyncio.Protocol):
    """(a) One side of an asyncio relay: whatever arrives is written to the other side."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.other: _Half | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        for chunk in self.early:
            transport.write(chunk)
        self.early.clear()

    def data_received(self, data: bytes) -> None:
        assert self.other is not None
        if self.other.transport is None:
            self.other.early.append(data)
        else:
            self.other.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.other is not None and self.other.transport is not None:
            if exc is None:
                self.other.transport.close()
            else:
                self.other.transport.abort()


async def _asyncio_relay(listener: socket.socket, internal: Path, peer_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    while True:
        conn, _ = await loop.sock_accept(listener)
        upstream = _dial(internal, peer_dir, conn)
        upstream.setblocking(False)
        a, b = _Half(), _Half()
        a.other, b.other = b, a
        await loop.connect_accepted_socket(_factory(a), sock=conn)
        await loop.create_unix_connection(_factory(b), sock=upstream)


def _factory(half: _Half) -> Callable[[], _Half]:
    return lambda: half


def _splice_relay(listener: socket.socket, internal: Path, peer_dir: Path) -> None:
    """(c) epoll + os.splice through one pipe per direction; simplified (EOF closes both sides), bench only."""
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    ep = select.epoll()
    listen_fd = listener.fileno()
    listener.setblocking(False)
    ep.register(listen_fd, select.EPOLLIN)
    flows: dict[int, _SpliceFlow] = {}  # by source fd
    waiting: dict[int, int] = {}  # destination fd -> source fd whose pipe waits for it

    def close(fd: int) -> None:
        for f in (fd, flows[fd].dst_fd):
            flow = flows.pop(f)
            ep.unregister(f)
            waiting.pop(f, None)
            os.close(flow.pipe_r)
            os.close(flow.pipe_w)
            flow.src.close()

    def drain(flow: _SpliceFlow) -> None:
        while flow.queued:
            flow.queued -= os.splice(flow.pipe_r, flow.dst_fd, flow.queued, flags=flags)

    while True:
        for fd, ev in ep.poll():
            if fd == listen_fd:
                conn, _ = listener.accept()
                upstream = _dial(internal, peer_dir, conn)
                for a, b in ((conn, upstream), (upstream, conn)):
                    a.setblocking(False)
                    flows[a.fileno()] = _SpliceFlow(a, b.fileno())
                    ep.register(a.fileno(), select.EPOLLIN)
                continue
            if fd not in flows:
                continue
            try:
                if ev & select.EPOLLOUT and fd in waiting:
                    src_fd = waiting[fd]
                    drain(flows[src_fd])
                    del waiting[fd]
                    ep.modify(fd, select.EPOLLIN)
                    ep.modify(src_fd, select.EPOLLIN)
                    continue
                flow = flows[fd]
                if flow.queued:
                    continue
                n = os.splice(fd, flow.pipe_w, 1 << 16, flags=flags)
                if n == 0:
                    close(fd)
                    continue
                flow.queued = n
                try:
                    drain(flow)
                except BlockingIOError:
                    waiting[flow.dst_fd] = fd
                    ep.modify(fd, 0)
                    ep.modify(flow.dst_fd, select.EPOLLIN | select.EPOLLOUT)
            except BlockingIOError:
                pass
            except OSError:
                if fd in flows:
                    close(fd)


class _SpliceFlow:
    def __init__(self, src: socket.socket, dst_fd: int) -> None:
        self.src = src
        self.dst_fd = dst_fd
        self.pipe_r, self.pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.queued = 0


def _thread_relay(listener: socket.socket, internal: Path, peer_dir: Path) -> None:
    """(b) the production epoll loop, run as a thread of the server process instead of a helper."""
    from gpushared.transport.front_door import _Relay  # noqa: PLC0415 - private on purpose: same loop, other home

    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    relay = _Relay(listener, theirs, str(internal), str(peer_dir), 1 << 20)

    def drain() -> None:
        while ours.recv(65536):
            pass

    threading.Thread(target=drain, daemon=True).start()
    relay.run()


# --- server and client processes ---------------------------------------------------


def _spin() -> None:
    # 2 ms of pure-Python work every 10 ms: ~20% of a core per server, so that the idle
    # servers of other designs do not starve the pair being measured.
    clock = time.perf_counter
    while True:
        until = clock() + 0.002
        while clock() < until:
            sum(range(200))
        time.sleep(0.008)


async def _serve(design: str, base: Path, busy: bool) -> None:
    import grpc  # noqa: PLC0415 - the parent process never needs grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415
    from grpc_health.v1.health import aio as health_aio  # noqa: PLC0415

    internal, public, peer_dir = base / "internal.sock", base / "public.sock", base / "peers"
    server = grpc.aio.server()
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    server.add_insecure_port(f"unix:{internal}")
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    door = None
    relay_task = None  # held so the task is not garbage-collected
    if design == "bare":
        target = internal
    else:
        target = public
        if design == "frontdoor":
            from gpushared.transport.front_door import FrontDoor  # noqa: PLC0415

            door = FrontDoor(public, internal, peer_dir)
            door.start()
        else:
            peer_dir.mkdir(mode=0o700, exist_ok=True)
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind(str(public))
            listener.listen(socket.SOMAXCONN)
            if design == "asyncio":
                relay_task = asyncio.get_running_loop().create_task(_asyncio_relay(listener, internal, peer_dir))
            else:
                loop_fn = _thread_relay if design == "thread" else _splice_relay
                threading.Thread(target=loop_fn, args=(listener, internal, peer_dir), daemon=True).start()
    if busy:
        # Stands in for the daemon's own Python work (polling GPUs, bookkeeping): it holds
        # the GIL whenever nobody else asks, which is what an in-process relay competes with.
        threading.Thread(target=_spin, daemon=True).start()
    print(f"READY unix:{target} {relay_task is not None}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # parent closes stdin to stop us
    if door is not None:
        door.stop()
    await server.stop(None)


def _client(target: str, kind: str, amount: float) -> dict[str, float]:
    import grpc  # noqa: PLC0415
    from grpc_health.v1 import health_pb2  # noqa: PLC0415

    request = health_pb2.HealthCheckRequest()
    serialize = health_pb2.HealthCheckRequest.SerializeToString
    parse = health_pb2.HealthCheckResponse.FromString
    if kind == "latency":
        with grpc.insecure_channel(target) as channel:
            check = channel.unary_unary(CHECK, request_serializer=serialize, response_deserializer=parse)
            for _ in range(WARMUP):
                check(request)
            samples = []
            clock = time.perf_counter
            for _ in range(int(amount)):
                start = clock()
                check(request)
                samples.append(clock() - start)
        samples.sort()
        return {"p50": samples[len(samples) // 2] * 1e3, "p99": samples[int(len(samples) * 0.99)] * 1e3}

    async def throughput() -> dict[str, float]:
        async with grpc.aio.insecure_channel(target) as channel:
            check = channel.unary_unary(CHECK, request_serializer=serialize, response_deserializer=parse)
            for _ in range(WARMUP // 2):
                await check(request)
            done = 0
            deadline = time.perf_counter() + amount

            async def worker() -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await check(request)
                    done += 1

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
            return {"rps": done / (time.perf_counter() - start)}

    return asyncio.run(throughput())


# --- driver --------------------------------------------------------------------------


class _Server:
    def __init__(self, design: str, root: Path, busy: bool) -> None:
        base = root / design
        base.mkdir()
        self.design = design
        argv = [sys.executable, __file__, "--serve", design, str(base), *(["busy"] if busy else [])]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().split()
        if line[:1] != ["READY"]:
            self.close()
            raise SystemExit(f"{design} server did not start")
        self.target = line[1]

    def measure(self, calls: int, duration: float) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, amount in (("latency", calls), ("throughput", duration)):
            done = subprocess.run(
                [sys.executable, __file__, "--client", self.target, kind, str(amount)],
                capture_output=True,
                text=True,
                check=True,
                env=_env(),
            )
            out |= json.loads(done.stdout)
        return out

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def _env() -> dict[str, str]:
    """Children import gpushared from this checkout unless told otherwise."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO / "daemon"), env.get("PYTHONPATH")) if p)
    return env


def _drive(args: argparse.Namespace) -> None:
    designs = list(DESIGNS) if args.designs == "all" else args.designs.split(",")
    unknown = set(designs) - set(DESIGNS)
    if unknown:
        raise SystemExit(f"unknown design(s): {', '.join(sorted(unknown))}; choose from {', '.join(DESIGNS)}")
    root = Path(tempfile.mkdtemp(prefix="gs-bench-", dir="/tmp"))
    servers: dict[str, _Server] = {}
    rows: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {d: [] for d in designs}
    try:
        for design in ["bare", *designs]:
            servers[design] = _Server(design, root, args.busy_server)
        for rnd in range(args.rounds):
            for design in designs:
                bare = servers["bare"].measure(args.calls, args.duration)
                relayed = servers[design].measure(args.calls, args.duration)
                rows[design].append((bare, relayed))
                if not args.json:
                    print(
                        f"round {rnd + 1}/{args.rounds} {design:13s} bare {_fmt(bare)} | relayed {_fmt(relayed)}",
                        flush=True,
                    )
    finally:
        for server in servers.values():
            server.close()
        shutil.rmtree(root, ignore_errors=True)
    summary = {}
    for design, pairs in rows.items():
        entry: dict[str, Any] = {}
        for key in ("p50", "p99", "rps"):
            entry[key] = {
                "bare": statistics.median(b[key] for b, _ in pairs),
                "relayed": statistics.median(r[key] for _, r in pairs),
                "ratio": statistics.median(r[key] / b[key] for b, r in pairs),
            }
        entry["meets_targets"] = (
            entry["p50"]["ratio"] <= TARGETS["p50"]
            and entry["p99"]["ratio"] <= TARGETS["p99"]
            and entry["rps"]["ratio"] >= TARGETS["rps"]
        )
        summary[design] = entry
    meta = {
        "busy_server": args.busy_server,
        "calls": args.calls,
        "rounds": args.rounds,
        "duration_s": args.duration,
        "concurrency": CONCURRENCY,
        "warmup": WARMUP,
        "cpus": os.cpu_count(),
    }
    if args.json:
        print(json.dumps({"meta": meta, "designs": summary}, indent=2))
        return
    print(
        f"\nmedians over {args.rounds} ABAB rounds; ratio = median of per-round relayed/bare "
        f"(targets p50<={TARGETS['p50']}x p99<={TARGETS['p99']}x rps>={TARGETS['rps']}x)"
    )
    print(f"{'design':13s} {'p50 ms bare->relay':>22s} {'p99 ms bare->relay':>22s} {'rps@16 bare->relay':>24s}")
    for design, e in summary.items():
        cells = [f"{e[k]['bare']:.3f}->{e[k]['relayed']:.3f} {e[k]['ratio']:.2f}x" for k in ("p50", "p99")]
        cells.append(f"{e['rps']['bare']:.0f}->{e['rps']['relayed']:.0f} {e['rps']['ratio']:.2f}x")
        print(
            f"{design:13s} {cells[0]:>22s} {cells[1]:>22s} {cells[2]:>24s}"
            f"  {'ok' if e['meets_targets'] else 'MISSES TARGET'}"
        )


def _fmt(m: dict[str, float]) -> str:
    return f"p50 {m['p50']:.3f} p99 {m['p99']:.3f} rps {m['rps']:.0f}"


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver stops us by closing stdin
        asyncio.run(_serve(sys.argv[2], Path(sys.argv[3]), sys.argv[4:5] == ["busy"]))
        return
    if sys.argv[1:2] == ["--client"]:
        print(json.dumps(_client(sys.argv[2], sys.argv[3], float(sys.argv[4]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=3000, help="measured sequential calls per run (after 500 warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="ABAB rounds per design")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds of the 16-in-flight throughput run")
    parser.add_argument("--designs", default="frontdoor", help=f"comma list of {', '.join(DESIGNS)}, or 'all'")
    parser.add_argument(
        "--busy-server",
        action="store_true",
        help="add a Python thread busy 20%% of the time to every server process (GIL pressure)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON summary instead of tables")
    _drive(parser.parse_args())


if __name__ == "__main__":
    main()
