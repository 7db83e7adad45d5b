"""Front door: caller identity survives the relay, the public socket is guarded, and nothing leaks."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from gpushared.transport.front_door import FrontDoor, FrontDoorError, PeerIdentity, identity_from_peer
from tests.conftest import wait_for

OTHER_UID = 4242
OTHER_GID = 4242
ABSENT_GID = 4343  # a group neither the test nor the other uid is in
WHOAMI = "/test.FrontDoor/Whoami"
HELPER_FLAG = b"--gpushared-relay-helper"
REPO = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching uid and chown need root")

# Runs as another uid: only the standard library and grpc (the venv is world-readable).
CLIENT_SCRIPT = """
import json, os, socket, sys
import grpc
mode, path = sys.argv[1], sys.argv[2]
if mode == "connect":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        print(json.dumps({"errno": 0}))
    except OSError as exc:
        print(json.dumps({"errno": exc.errno}))
    finally:
        s.close()
else:
    with grpc.insecure_channel("unix:" + path) as channel:
        reply = channel.unary_unary("/test.FrontDoor/Whoami")(b"", timeout=30)
    print(json.dumps({"pid": os.getpid(), "reply": json.loads(reply)}))
"""


# --- identity_from_peer ------------------------------------------------------------

PEERS = Path("/run/gpushared/peers")


def test_identity_from_peer_parses_what_the_relay_writes() -> None:
    assert identity_from_peer("unix:/run/gpushared/peers/1000.100.4242.7", PEERS) == PeerIdentity(1000, 100, 4242)
    assert identity_from_peer("unix:/run/gpushared/peers/0.0.1.0", PEERS) == PeerIdentity(0, 0, 1)
    big = "unix:/run/gpushared/peers/4294967294.4294967294.2147483647.18446744073709551615"
    assert identity_from_peer(big, PEERS) == PeerIdentity(4294967294, 4294967294, 2147483647)


@pytest.mark.parametrize(
    "peer",
    [
        "",
        "unix:",
        "unix:/",
        "ipv4:127.0.0.1:5000",
        "unix-abstract:/run/gpushared/peers/1.2.3.4",
        "unix:/run/gpushared/other/1.2.3.4",
        "unix:/run/gpushared/peersX/1.2.3.4",
        "unix:/run/gpushared/1.2.3.4",
        "unix:/run/gpushared/peers/../x/1.2.3.4",
        "unix:/run/gpushared/peers/../peers/1.2.3.4",
        "unix:/run/gpushared/peers//1.2.3.4",
        "unix:/run/gpushared/peers/sub/1.2.3.4",
        "unix:/run/gpushared/peers/1.2.3.4/",
        "unix:/run/gpushared/peers/a.b.c.d",
        "unix:/run/gpushared/peers/1.2.x.4",
        "unix:/run/gpushared/peers/1.2.3.",
        "unix:/run/gpushared/peers/1.2.3",
        "unix:/run/gpushared/peers/1.2.3.4.5",
        "unix:/run/gpushared/peers/-1.2.3.4",
        "unix:/run/gpushared/peers/1.-2.3.4",
        "unix:/run/gpushared/peers/1.2.-3.4",
        "unix:/run/gpushared/peers/+1.2.3.4",
        "unix:/run/gpushared/peers/01.2.3.4",
        "unix:/run/gpushared/peers/1.2.3.4\n",
        "unix:/run/gpushared/peers/ 1.2.3.4",
        "unix:/run/gpushared/peers/\u0661.2.3.4",  # Arabic-Indic digit: int() would take it
        "unix:/run/gpushared/peers/4294967295.2.3.4",  # (uid_t)-1
        "unix:/run/gpushared/peers/1.4294967295.3.4",
        "unix:/run/gpushared/peers/1.2.2147483648.4",
        "unix:/run/gpushared/peers/99999999999.2.3.4",
        " unix:/run/gpushared/peers/1.2.3.4",
        "UNIX:/run/gpushared/peers/1.2.3.4",
    ],
)
def test_identity_from_peer_rejects_everything_else(peer: str) -> None:
    assert identity_from_peer(peer, PEERS) is None


def test_identity_from_peer_needs_an_absolute_peer_dir() -> None:
    assert identity_from_peer("unix:peers/1.2.3.4", Path("peers")) is None


# --- fixtures ------------------------------------------------------------------------


class InternalServer:
    """The daemon's side: a grpc.aio server on its own loop thread, in a root-only directory."""

    def __init__(self, path: Path, peer_dir: Path, handler: Callable[..., Any] | None = None) -> None:
        self.path = path
        self.peer_dir = peer_dir
        self.handler = handler or self._whoami
        self.loop = asyncio.new_event_loop()
        self.server: grpc.aio.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="internal-grpc", daemon=True)

    async def _whoami(self, request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        del request
        peer = context.peer()
        identity = identity_from_peer(peer, self.peer_dir)
        ident = None if identity is None else [identity.uid, identity.gid, identity.pid]
        return json.dumps({"peer": peer, "identity": ident}).encode()

    async def _start(self) -> None:
        self.server = make_server(self.path, self.handler)
        await self.server.start()

    def start(self) -> None:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    def stop(self) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(None), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


def make_server(path: Path, whoami: Callable[..., Any]) -> grpc.aio.Server:
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    handler: grpc.RpcMethodHandler[bytes, bytes] = grpc.unary_unary_rpc_method_handler(whoami)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("test.FrontDoor", {"Whoami": handler})])
    server.add_insecure_port(f"unix:{path}")
    return server


class Env:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.public = root / "public.sock"
        self.peers = root / "peers"
        private = root / "internal"
        private.mkdir(mode=0o700)
        self.internal = private / "grpc.sock"
        self.server = InternalServer(self.internal, self.peers)
        self.doors: list[FrontDoor] = []

    def door(self, **kwargs: Any) -> FrontDoor:
        door = FrontDoor(self.public, self.internal, self.peers, **kwargs)
        self.doors.append(door)
        return door


@pytest.fixture
def env() -> Iterator[Env]:
    # Short and under /tmp: socket paths must fit in 108 bytes, and other uids must reach it.
    root = Path(tempfile.mkdtemp(prefix="gs-fd-", dir="/tmp"))
    root.chmod(0o755)
    e = Env(root)
    e.server.start()
    try:
        yield e
    finally:
        for door in e.doors:
            door.stop()
        e.server.stop()
        shutil.rmtree(root, ignore_errors=True)


def whoami(public: Path) -> dict[str, Any]:
    with grpc.insecure_channel(f"unix:{public}") as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(WHOAMI)
        reply = call(b"", timeout=30)
    result: dict[str, Any] = json.loads(reply)
    return result


def connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(path))
    return s


def closed_by_peer(s: socket.socket, timeout: float = 10.0) -> bool:
    """Read (the internal server greets with HTTP/2 SETTINGS) until EOF; False if it stays open."""
    deadline = time.monotonic() + timeout
    try:
        while (left := deadline - time.monotonic()) > 0:
            s.settimeout(left)
            if s.recv(65536) == b"":
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        pass
    return False


def stays_open(s: socket.socket, seconds: float = 0.3) -> bool:
    return not closed_by_peer(s, seconds)


def helper_pids(parent: int) -> list[int]:
    """Live relay helpers whose parent is `parent` (zombies have no cmdline, so they do not count)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if HELPER_FLAG in cmdline and ppid == parent:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def run_as_other(root: Path, mode: str, *, gid: int = OTHER_GID) -> dict[str, Any]:
    script = root / "client.py"
    script.write_text(CLIENT_SCRIPT)
    script.chmod(0o755)
    done = subprocess.run(
        [sys.executable, str(script), mode, str(root / "public.sock")],
        user=OTHER_UID,
        group=gid,
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=90,
        env={"PATH": "/usr/bin:/bin", "HOME": "/", "LANG": "C.UTF-8"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


# --- relaying identities ---------------------------------------------------------------


def test_caller_sees_its_own_identity(env: Env) -> None:
    env.door().start()
    reply = whoami(env.public)
    assert reply["identity"] == [os.getuid(), os.getgid(), os.getpid()]
    assert reply["peer"].startswith(f"unix:{env.peers}/")
    # The bound name is gone from the file system as soon as the connection is made.
    assert list(env.peers.iterdir()) == []


def test_start_and_serve_inside_a_running_event_loop(env: Env) -> None:
    """The daemon calls start() from its asyncio code; the relay must not need that loop."""
    public = env.root / "aio.sock"
    internal = env.root / "internal" / "aio.sock"

    async def whoami_aio(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        del request
        identity = identity_from_peer(context.peer(), env.peers)
        return json.dumps(None if identity is None else [identity.uid, identity.gid, identity.pid]).encode()

    async def main() -> Any:
        server = make_server(internal, whoami_aio)
        await server.start()
        door = FrontDoor(public, internal, env.peers)
        door.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{public}") as channel:
                call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(WHOAMI)
                replies = await asyncio.gather(*(call(b"", timeout=30) for _ in range(20)))
                health = await channel.unary_unary(
                    "/grpc.health.v1.Health/Check",
                    request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                    response_deserializer=health_pb2.HealthCheckResponse.FromString,
                )(health_pb2.HealthCheckRequest(), timeout=30)
        finally:
            door.stop()
            await server.stop(None)
        return replies, health

    replies, health = asyncio.run(main())
    assert {tuple(json.loads(r)) for r in replies} == {(os.getuid(), os.getgid(), os.getpid())}
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert not public.exists()


@needs_root
def test_other_uid_is_reported_as_itself(env: Env) -> None:
    env.door(socket_gid=OTHER_GID).start()
    result = run_as_other(env.root, "whoami")
    assert result["reply"]["identity"] == [OTHER_UID, OTHER_GID, result["pid"]]


@needs_root
def test_uid_outside_the_socket_group_gets_eacces(env: Env) -> None:
    door = env.door(socket_mode=0o660, socket_gid=ABSENT_GID)
    door.start()
    st = os.stat(env.public)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert (st.st_uid, st.st_gid) == (0, ABSENT_GID)
    assert run_as_other(env.root, "connect") == {"errno": errno.EACCES}
    assert door.active_connections == 0


def test_peer_dir_is_created_private(env: Env) -> None:
    env.door().start()
    st = os.stat(env.peers)
    assert stat.S_ISDIR(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o700


def test_large_payloads_cross_intact(env: Env) -> None:
    """Big messages exercise partial sends and back-pressure in both directions."""
    public = env.root / "echo.sock"

    async def echo(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        del context
        return request[::-1]

    server = InternalServer(env.root / "internal" / "echo.sock", env.peers, echo)
    server.start()
    door = FrontDoor(public, server.path, env.peers)
    door.start()
    try:
        payloads = [os.urandom(n) for n in (0, 1, 65535, 300_000, 3_000_000)]
        with grpc.insecure_channel(f"unix:{public}") as channel:
            call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(WHOAMI)
            for payload in payloads:
                assert call(payload, timeout=60) == payload[::-1]
    finally:
        door.stop()
        server.stop()


# --- the public socket path -------------------------------------------------------------


def test_stale_socket_is_replaced(env: Env) -> None:
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(env.public))
    dead.close()  # the file stays, nobody listens: what a killed daemon leaves
    assert stat.S_ISSOCK(os.lstat(env.public).st_mode)
    env.door().start()
    assert whoami(env.public)["identity"] == [os.getuid(), os.getgid(), os.getpid()]


def test_live_listener_is_not_stolen(env: Env) -> None:
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(env.public))
    other.listen(8)
    try:
        before = os.lstat(env.public).st_ino
        with pytest.raises(FrontDoorError, match=str(env.public)):
            env.door().start()
        assert os.lstat(env.public).st_ino == before
    finally:
        other.close()


def test_regular_file_is_not_replaced(env: Env) -> None:
    env.public.write_text("precious")
    with pytest.raises(FrontDoorError, match=str(env.public)) as info:
        env.door().start()
    assert "not a socket" in str(info.value)
    assert env.public.read_text() == "precious"


def test_second_start_is_refused_and_stop_is_idempotent(env: Env) -> None:
    door = env.door()
    door.start()
    with pytest.raises(FrontDoorError, match=str(env.public)):
        door.start()
    door.stop()
    door.stop()
    assert not env.public.exists()
    door.start()  # a stopped front door can serve again
    assert whoami(env.public)["identity"] is not None


def test_a_path_too_long_for_a_socket_is_refused(env: Env) -> None:
    long_public = env.root / ("x" * 120)
    with pytest.raises(FrontDoorError, match="shorter"):
        FrontDoor(long_public, env.internal, env.peers).start()


# --- lifecycle ----------------------------------------------------------------------


def test_stop_closes_relayed_connections_and_removes_socket(env: Env) -> None:
    door = env.door()
    door.start()
    [helper] = helper_pids(os.getpid())
    clients = [connect(env.public) for _ in range(3)]
    try:
        wait_for(lambda: door.active_connections == 3, "3 relayed connections")
        door.stop()
        for c in clients:
            assert closed_by_peer(c)
    finally:
        for c in clients:
            c.close()
    assert not env.public.exists()
    assert door.active_connections == 0
    assert not alive(helper)
    assert helper_pids(os.getpid()) == []


def test_connection_counts_follow_clients(env: Env) -> None:
    door = env.door()
    door.start()
    whoami(env.public)
    wait_for(lambda: door.active_connections == 0, "the channel's connection to go away")
    c = connect(env.public)
    wait_for(lambda: door.active_connections == 1, "one connection")
    c.close()
    wait_for(lambda: door.active_connections == 0, "no connections")


def test_no_fd_leak_over_a_full_cycle(env: Env) -> None:
    whoami_door = env.door()
    whoami_door.start()
    whoami(env.public)  # grpc's own lazily created descriptors are not ours to count
    whoami_door.stop()

    def count() -> int:
        return len(os.listdir("/proc/self/fd"))

    before = count()
    door = env.door()
    door.start()
    for i in range(100):
        with connect(env.public) as c:
            if i % 2:
                c.sendall(b"PRI * HTTP/2.0\r\n\r\n")  # the internal server drops junk after this
    assert whoami(env.public)["identity"] is not None
    door.stop()
    # The internal server closes its ends once the helper's are gone, asynchronously.
    wait_for(lambda: count() == before, f"fd count back to {before}")


def test_helper_dies_with_the_daemon(env: Env) -> None:
    script = env.root / "daemon.py"
    script.write_text(
        "import os, sys, time\n"
        "from pathlib import Path\n"
        "from gpushared.transport.front_door import FrontDoor\n"
        "FrontDoor(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])).start()\n"
        "print('started', flush=True)\n"
        "time.sleep(600)\n"
    )
    pythonpath = os.pathsep.join([str(REPO / "daemon"), os.environ.get("PYTHONPATH", "")])
    daemon = subprocess.Popen(
        [sys.executable, str(script), str(env.public), str(env.internal), str(env.peers)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    try:
        assert daemon.stdout is not None
        assert daemon.stdout.readline() == b"started\n"
        [helper] = helper_pids(daemon.pid)
        client = connect(env.public)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        wait_for(lambda: not alive(helper), "the helper to exit after its daemon was killed")
        with client:
            assert closed_by_peer(client)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        if daemon.stdout is not None:
            daemon.stdout.close()
    # The killed daemon left its socket behind: the next one takes it over.
    assert stat.S_ISSOCK(os.lstat(env.public).st_mode)
    env.door().start()
    assert whoami(env.public)["identity"] is not None


def test_a_crashed_helper_is_restarted(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="gpushared.front_door")
    door = env.door()
    door.start()
    [first] = helper_pids(os.getpid())
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: [p for p in helper_pids(os.getpid()) if p != first] != [], "a new helper")
    assert whoami(env.public)["identity"] == [os.getuid(), os.getgid(), os.getpid()]
    assert any("exited unexpectedly" in r.getMessage() and r.levelno == logging.ERROR for r in caplog.records)


# --- per-uid cap --------------------------------------------------------------------------


@needs_root
def test_per_uid_cap(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gpushared.front_door")
    door = env.door(max_connections_per_uid=3, socket_mode=0o660, socket_gid=OTHER_GID)
    door.start()
    held = [connect(env.public) for _ in range(3)]
    try:
        wait_for(lambda: door.active_connections == 3, "3 relayed connections")
        with connect(env.public) as extra:
            assert closed_by_peer(extra)
        named = f"uid {os.getuid()}"
        wait_for(lambda: any(named in r.getMessage() for r in caplog.records), "a warning naming the uid")
        assert door.active_connections == 3
        # The cap is per uid: another uid still gets in while this one is full.
        assert run_as_other(env.root, "whoami")["reply"]["identity"][0] == OTHER_UID
        # Freeing a slot lets the same uid in again.
        held.pop().close()
        wait_for(lambda: door.active_connections == 2, "a slot to free up")
        held.append(connect(env.public))
        wait_for(lambda: door.active_connections == 3, "the slot to be taken again")
        assert stays_open(held[-1])  # admitted, not refused
    finally:
        for s in held:
            s.close()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "gpushared.front_door"]
    assert warnings
