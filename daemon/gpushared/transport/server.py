"""The gRPC server: gpushare.v1, grpc.health.v1 and reflection on the internal socket, behind the front door."""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from gpushared.api.v1 import gpushare_pb2
from gpushared.domain.errors import GpushareError
from gpushared.transport.front_door import FrontDoor, FrontDoorError
from gpushared.transport.servicer import GpushareServicer

log = logging.getLogger("gpushared.server")

SERVICE_NAME = gpushare_pb2.DESCRIPTOR.services_by_name["Gpushare"].full_name
MAX_MESSAGE_BYTES = 64 * 1024
"""Every request is tiny; a larger one is refused by gRPC with RESOURCE_EXHAUSTED before parsing."""
MAX_CONCURRENT_RPCS = 256


class ServerError(GpushareError):
    """The API socket could not be set up."""


def internal_dir_for(public_socket: Path) -> Path:
    """Root-only directory beside the public socket: the internal gRPC socket and relay peer addresses."""
    return public_socket.with_name(public_socket.name + ".d")


def prepare_private_dir(path: Path) -> None:
    """Create a 0700 directory owned by us, or refuse one that someone else could have prepared."""
    try:
        # The socket's own directory (e.g. /run/gpushared when systemd did not create it) must exist
        # and stay traversable by API users; only the internal directory below it is private.
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        path.mkdir(mode=0o700, exist_ok=True)
        info = path.lstat()
    except OSError as exc:
        raise ServerError(
            f"socket directory {path}: cannot create it ({exc.strerror})",
            hint="run gpushared as root, or pass --socket in a directory you can write",
        ) from exc
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise ServerError(
            f"socket directory {path}: must be a directory owned by uid {os.geteuid()} with mode 0700",
            hint="remove it; gpushared creates it itself",
        )


def peer_dir_for(public_socket: Path) -> Path:
    return internal_dir_for(public_socket) / "peers"


class ApiServer:
    def __init__(
        self,
        servicer: GpushareServicer,
        public_socket: Path,
        *,
        socket_mode: int,
        socket_gid: int | None,
    ) -> None:
        self.public_socket = public_socket
        self.internal_dir = internal_dir_for(public_socket)
        self.internal_socket = self.internal_dir / "grpc.sock"
        self.peer_dir = peer_dir_for(public_socket)
        self._servicer = servicer
        self._socket_mode = socket_mode
        self._socket_gid = socket_gid
        self._server: grpc.aio.Server | None = None
        self._front_door: FrontDoor | None = None
        self.health = health.aio.HealthServicer()
        self._lock: int | None = None

    def _claim_socket(self) -> int:
        """Hold a lock beside the socket, so a second daemon never unlinks a live daemon's sockets."""
        fd = os.open(self.internal_dir / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ServerError(
                f"socket {self.public_socket}: another gpushared is already serving on it",
                hint="stop it first (systemctl stop gpushared), or pass a different --socket",
            ) from None
        return fd

    async def start(self) -> None:
        prepare_private_dir(self.internal_dir)
        self._lock = self._claim_socket()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", 16 * 1024 * 1024),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        server.add_generic_rpc_handlers((self._servicer.generic_handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
        )
        self.internal_socket.unlink(missing_ok=True)
        server.add_insecure_port(f"unix:{self.internal_socket}")
        await server.start()
        self._server = server
        front_door = FrontDoor(
            self.public_socket,
            self.internal_socket,
            self.peer_dir,
            socket_mode=self._socket_mode,
            socket_gid=self._socket_gid,
        )
        try:
            front_door.start()
        except FrontDoorError as exc:
            await server.stop(None)
            raise ServerError(str(exc)) from exc
        self._front_door = front_door
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        # New callers are refused at once; calls in flight get ``grace`` seconds and their answers still travel
        # back through the relay, which is dropped only after that.
        if self._front_door is not None:
            self._front_door.stop_accepting()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._front_door is not None:
            self._front_door.stop()
            self._front_door = None
        self.internal_socket.unlink(missing_ok=True)
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None
