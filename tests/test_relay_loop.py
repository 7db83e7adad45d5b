"""The relay engine that runs inside the front door's helper process, driven here in a thread.

test_front_door.py covers the helper process end to end; coverage cannot see inside that
isolated interpreter, so the same engine is exercised here in-process, with real sockets,
for its corner cases: identity encoding, half-close, back-pressure, the per-uid cap, and
exit when the daemon's channel closes.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpushared.transport.front_door import _Relay, identity_from_peer


@dataclass
class Harness:
    public: Path
    peer_dir: Path
    ctrl: socket.socket
    accepted: list[tuple[socket.socket, str]] = field(default_factory=list)
    messages: list[dict[str, object]] = field(default_factory=list)

    def connect(self) -> socket.socket:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(self.public))
        client.settimeout(5)
        return client

    def server_side(self, index: int, timeout: float = 5.0) -> tuple[socket.socket, str]:
        deadline = time.monotonic() + timeout
        while len(self.accepted) <= index:
            assert time.monotonic() < deadline, "the relay never dialled the internal socket"
            time.sleep(0.01)
        return self.accepted[index]

    def read_messages(self) -> None:
        self.ctrl.setblocking(False)
        try:
            while True:
                self.messages.append(json.loads(self.ctrl.recv(65536)))
        except BlockingIOError:
            pass

    def wait_active(self, count: int, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.read_messages()
            if [m for m in self.messages if "active" in m][-1:] == [{"active": count}]:
                return
            assert time.monotonic() < deadline, f"active connections never reached {count}: {self.messages}"
            time.sleep(0.01)

    def wait_message(self, key: str, timeout: float = 5.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            self.read_messages()
            found = [m for m in self.messages if key in m]
            if found:
                return found[-1]
            assert time.monotonic() < deadline, f"no {key!r} message from the relay: {self.messages}"
            time.sleep(0.01)


@pytest.fixture
def relay(tmp_short: Path) -> Iterator[Harness]:
    public, internal, peer_dir = tmp_short / "public.sock", tmp_short / "internal.sock", tmp_short / "peers"
    peer_dir.mkdir(mode=0o700)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(internal))
    server.listen(64)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(public))
    listener.listen(64)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    harness = Harness(public, peer_dir, ours)
    engine = _Relay(listener, theirs, str(internal), str(peer_dir), 3)

    def serve() -> None:
        while True:
            try:
                conn, address = server.accept()
            except OSError:
                return
            harness.accepted.append((conn, address))

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    loop = threading.Thread(target=engine.run)
    loop.start()
    assert json.loads(ours.recv(4096)) == {"ready": True}
    yield harness
    ours.close()  # the daemon going away ends the loop
    loop.join(10)
    assert not loop.is_alive(), "the relay loop did not exit when its daemon channel closed"
    engine.close_all()
    listener.close()
    theirs.close()
    server.shutdown(socket.SHUT_RDWR)
    server.close()
    acceptor.join(5)
    for conn, _ in harness.accepted:
        conn.close()


def test_caller_identity_is_encoded_in_the_internal_peer_address(relay: Harness) -> None:
    client = relay.connect()
    conn, address = relay.server_side(0)
    identity = identity_from_peer(f"unix:{address}", relay.peer_dir)
    assert identity is not None
    assert (identity.uid, identity.gid, identity.pid) == (os.getuid(), os.getgid(), os.getpid())
    assert not Path(address).exists(), "the bound peer path is unlinked once connected"
    relay.wait_active(1)
    client.close()
    conn.close()


def test_bytes_cross_both_ways_and_half_close_is_passed_on(relay: Harness) -> None:
    client = relay.connect()
    conn, _ = relay.server_side(0)
    payload = os.urandom(3 * 1024 * 1024)
    sender = threading.Thread(target=client.sendall, args=(payload,))
    sender.start()
    received = bytearray()
    conn.settimeout(5)
    while len(received) < len(payload):
        received += conn.recv(1 << 20)
    sender.join()
    assert bytes(received) == payload
    client.shutdown(socket.SHUT_WR)
    assert conn.recv(10) == b"", "the caller's half-close reaches the server"
    conn.sendall(b"still here")
    assert client.recv(100) == b"still here", "the other direction stays open after a half-close"
    conn.close()
    assert client.recv(100) == b""
    client.close()
    relay.wait_active(0)


def test_slow_reader_gets_everything_through_back_pressure(relay: Harness) -> None:
    client = relay.connect()
    conn, _ = relay.server_side(0)
    payload = os.urandom(8 * 1024 * 1024)
    conn.sendall(payload[:1024])
    writer = threading.Thread(target=conn.sendall, args=(payload[1024:],))
    writer.start()
    time.sleep(0.2)  # let the relay's buffers and the socket buffers fill up
    received = bytearray()
    while len(received) < len(payload):
        received += client.recv(1 << 16)
    writer.join()
    assert bytes(received) == payload
    conn.close()
    client.close()


def test_per_uid_cap_refuses_extra_connections_and_logs_once(relay: Harness) -> None:
    clients = [relay.connect() for _ in range(3)]
    for index in range(3):
        relay.server_side(index)
    extra = [relay.connect() for _ in range(3)]
    for sock in extra:
        assert sock.recv(10) == b"", "a connection over the cap is closed at once"
    log = relay.wait_message("log")
    _level, text = log["log"]  # type: ignore[misc]
    assert f"refused a connection from uid {os.getuid()}: it already has 3 open connections" in text
    assert sum(1 for m in relay.messages if "log" in m) == 1, "one warning per interval, not one per refusal"
    # Once a caller hangs up, its slot is free again.
    clients[0].close()
    replacement = relay.connect()
    relay.server_side(3)
    for sock in [*clients[1:], *extra, replacement]:
        sock.close()


def test_internal_socket_gone_drops_the_caller_with_a_log_line(relay: Harness, tmp_short: Path) -> None:
    (tmp_short / "internal.sock").unlink()
    client = relay.connect()
    assert client.recv(10) == b""
    _, text = relay.wait_message("log")["log"]  # type: ignore[misc]
    assert "cannot reach the internal socket" in text
    client.close()


def test_server_closing_first_releases_the_caller(relay: Harness) -> None:
    client = relay.connect()
    conn, _ = relay.server_side(0)
    conn.sendall(b"bye")
    conn.close()
    assert client.recv(10) == b"bye"
    assert client.recv(10) == b""
    client.close()
