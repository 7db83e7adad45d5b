"""Front door: owns the public socket and relays each caller to the internal gRPC socket, named by its credentials."""

# grpcio hides the transport from handlers (context.peer() is just 'unix:'), so the
# only caller fact that survives into a handler is the *client* address of the
# connection.  The relay accepts on the public socket, reads SO_PEERCRED, and dials
# the internal server from a socket bound to <peer_dir>/<uid>.<gid>.<pid>.<n>; the
# handler then parses context.peer() back with identity_from_peer().
#
# The relay runs in a helper process (this file, executed as a script with only the
# standard library), not in the daemon.  On an idle 2-core box every design measured
# (asyncio on the grpc loop, an epoll thread, epoll+splice) stays within ~1.1-1.3x of
# bare p50; once the daemon's own Python work holds the GIL, a relay thread or an
# asyncio relay must queue for it on every hop (up to 1.4-1.5x p50, 0.5-0.7x
# throughput) while the helper stays at ~1.0x.  See bench/relay_overhead.py.

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import re
import resource
import select
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FrontDoor", "FrontDoorError", "PeerIdentity", "identity_from_peer"]

logger = logging.getLogger("gpushared.front_door")

# Canonical decimal only (no sign, no leading zeros, ASCII digits): the relay never
# writes anything else, so anything else was not written by the relay.
_DEC = r"(0|[1-9][0-9]{0,9})"
_NAME_RE = re.compile(rf"{_DEC}\.{_DEC}\.{_DEC}\.(?:0|[1-9][0-9]{{0,19}})")
_MAX_UGID = 0xFFFFFFFE  # (uid_t)-1 means "no id" to the kernel, never a caller
_MAX_PID = 0x7FFFFFFF
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path is 108 bytes including the NUL
_LONGEST_NAME = len("4294967294.4294967294.2147483647.") + 20
# pid is a signed pid_t but uid/gid are unsigned: '3i' would turn uids >= 2**31 negative.
_UCRED = struct.Struct("=iII")
_CHILD_FLAG = "--gpushared-relay-helper"
_READY_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_RESPAWN_DELAY = 1.0


@dataclass(frozen=True)
class PeerIdentity:
    """Kernel credentials of the process that opened a connection to the public socket."""

    uid: int
    gid: int
    pid: int


def identity_from_peer(peer: str, peer_dir: Path) -> PeerIdentity | None:
    """Parse a grpc ``context.peer()`` produced by the relay; None for anything else, so callers fail closed."""
    if not peer_dir.is_absolute():
        return None
    prefix = f"unix:{peer_dir}/"
    if not peer.startswith(prefix):
        return None
    # fullmatch on the remainder also rejects any '/' in it, hence '..' traversal.
    match = _NAME_RE.fullmatch(peer[len(prefix) :])
    if match is None:
        return None
    uid, gid, pid = int(match[1]), int(match[2]), int(match[3])
    if uid > _MAX_UGID or gid > _MAX_UGID or pid > _MAX_PID:
        return None
    return PeerIdentity(uid=uid, gid=gid, pid=pid)


DRAIN = b"drain"
"""Sent to the helper on its control channel: stop accepting, keep relaying."""


class FrontDoorError(Exception):
    """The public socket cannot be served; the message names the path and what to do about it."""


class FrontDoor:
    """Serves ``public_path`` by relaying every connection to ``internal_path`` from a helper process."""

    def __init__(
        self,
        public_path: Path,
        internal_path: Path,
        peer_dir: Path,
        *,
        socket_mode: int = 0o660,
        socket_gid: int | None = None,
        max_connections_per_uid: int = 64,
    ) -> None:
        if max_connections_per_uid < 1:
            raise ValueError("max_connections_per_uid must be at least 1")
        self._public_path = public_path
        self._internal_path = internal_path
        self._peer_dir = peer_dir
        self._socket_mode = socket_mode
        self._socket_gid = socket_gid
        self._max_per_uid = max_connections_per_uid
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._bound_id: tuple[int, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ctrl: socket.socket | None = None
        self._supervisor: threading.Thread | None = None
        self._stopping = threading.Event()
        self._draining = False
        self._active = 0

    @property
    def active_connections(self) -> int:
        """Relayed connections open right now, as last reported by the helper (it lags by a message)."""
        return self._active

    def start(self) -> None:
        """Listen on the public socket and start relaying; raises FrontDoorError with the fix."""
        with self._lock:
            if self._listener is not None:
                raise FrontDoorError(f"front door on {self._public_path} is already started; call stop() first")
            self._check_paths()
            self._prepare_peer_dir()
            listener = self._bind_public()
            self._stopping = threading.Event()
            self._draining = False
            try:
                proc, ctrl = self._spawn(listener)
            except BaseException:
                listener.close()
                self._unlink_public()
                self._bound_id = None
                raise
            self._listener, self._proc, self._ctrl = listener, proc, ctrl
            self._supervisor = threading.Thread(target=self._supervise, name="gpushared-front-door", daemon=True)
            self._supervisor.start()
        logger.info(
            "front door listening on %s (mode %o, gid %s), relaying to %s",
            self._public_path,
            self._socket_mode,
            "unchanged" if self._socket_gid is None else self._socket_gid,
            self._internal_path,
        )

    def stop_accepting(self) -> None:
        """First half of a graceful stop: new connections are refused (the path is gone, the listener closed here
        and in the helper) while open ones still carry the responses of calls in flight; stop() then drops them."""
        with self._lock:
            if self._listener is None or self._draining:
                return
            self._draining = True
            self._unlink_public()
            self._listener.close()
            if self._ctrl is not None:
                # A helper that is gone already is found out by stop().
                with contextlib.suppress(OSError):
                    self._ctrl.send(DRAIN)

    def stop(self) -> None:
        """Stop accepting, drop every relayed connection, remove the public socket. Idempotent."""
        with self._lock:
            if self._listener is None:
                return
            self._stopping.set()
            if self._ctrl is not None:
                # shutdown, not close: it wakes the supervisor's blocking recv and is
                # the helper's signal to exit (it watches its end for EOF).
                _quiet_shutdown(self._ctrl)
            supervisor = self._supervisor
        if supervisor is not None and supervisor is not threading.current_thread():
            supervisor.join()
        with self._lock:
            if self._proc is not None:
                _reap(self._proc)
            for sock in (self._ctrl, self._listener):
                if sock is not None:
                    sock.close()
            self._unlink_public()
            self._listener = self._ctrl = self._proc = self._supervisor = None
            self._bound_id = None
            self._active = 0
        logger.info("front door on %s stopped", self._public_path)

    # --- start() helpers -------------------------------------------------------

    def _check_paths(self) -> None:
        if not self._peer_dir.is_absolute():
            raise FrontDoorError(f"peer directory {self._peer_dir} must be an absolute path")
        if len(os.fsencode(self._public_path)) > _SUN_PATH_MAX:
            raise FrontDoorError(
                f"socket path {self._public_path} is longer than {_SUN_PATH_MAX} bytes; choose a shorter path"
            )
        if len(os.fsencode(self._peer_dir)) + 1 + _LONGEST_NAME > _SUN_PATH_MAX:
            raise FrontDoorError(
                f"peer directory {self._peer_dir} is too long to hold relay socket names; "
                f"keep it under {_SUN_PATH_MAX - 1 - _LONGEST_NAME} bytes"
            )

    def _prepare_peer_dir(self) -> None:
        path = self._peer_dir
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.lstat(path)
        except OSError as exc:
            raise FrontDoorError(
                f"cannot create peer directory {path}: {exc}; "
                "check that its parent exists and is writable by the daemon"
            ) from exc
        if not stat.S_ISDIR(st.st_mode):
            raise FrontDoorError(f"peer directory {path} exists and is not a directory; remove it")
        if st.st_uid != os.geteuid():
            # Names created here are what the internal server trusts as identities.
            raise FrontDoorError(
                f"peer directory {path} is owned by uid {st.st_uid}, not by the daemon; "
                "remove it so that the daemon recreates it"
            )
        try:
            os.chmod(path, 0o700)
            # A helper killed between bind() and unlink() leaves a name behind; drop them
            # so a recycled pid cannot collide with one.  (Unlinking a name that a live
            # helper still holds is harmless: the address stays on its socket.)
            with os.scandir(path) as entries:
                for entry in entries:
                    if _NAME_RE.fullmatch(entry.name) and stat.S_ISSOCK(entry.stat(follow_symlinks=False).st_mode):
                        _quiet_unlink(entry.path)
        except OSError as exc:
            raise FrontDoorError(f"cannot prepare peer directory {path}: {exc}") from exc

    def _bind_public(self) -> socket.socket:
        path = self._public_path
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise FrontDoorError(f"cannot inspect socket path {path}: {exc}") from exc
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise FrontDoorError(
                    f"socket path {path} exists and is not a socket; refusing to replace it. "
                    "Remove it or configure another socket path"
                )
            if _is_live(path):
                raise FrontDoorError(
                    f"another process is already listening on {path}; stop it (another "
                    "gpushared?) or configure another socket path"
                )
            _quiet_unlink(path)
            logger.warning("removed stale socket %s left by a previous daemon", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(str(path))
            bound = True
            # Permissions go on before listen(): until then connect() is refused, so no
            # caller ever gets in under the umask's mode.
            os.chmod(path, self._socket_mode)
            if self._socket_gid is not None:
                os.chown(path, -1, self._socket_gid)
            sock.listen(socket.SOMAXCONN)
            st = os.stat(path)
        except OSError as exc:
            sock.close()
            if bound:
                _quiet_unlink(path)
            raise FrontDoorError(
                f"cannot listen on {path}: {exc}; check that its directory exists and is "
                "writable by the daemon and that socket_gid is a valid group"
            ) from exc
        self._bound_id = (st.st_dev, st.st_ino)
        return sock

    def _unlink_public(self) -> None:
        # Only our own inode: a successor daemon may already have replaced the path.
        if self._bound_id is None:
            return
        try:
            st = os.lstat(self._public_path)
        except OSError:
            return
        if (st.st_dev, st.st_ino) == self._bound_id:
            _quiet_unlink(self._public_path)

    def _spawn(self, listener: socket.socket) -> tuple[subprocess.Popen[bytes], socket.socket]:
        script = Path(__file__).resolve()
        if not sys.executable or not script.is_file():
            raise FrontDoorError(
                f"cannot start the relay helper for {self._public_path}: no python executable "
                f"or {script} is not a plain file"
            )
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {
            "listen_fd": listener.fileno(),
            "ctrl_fd": theirs.fileno(),
            "internal_path": str(self._internal_path),
            "peer_dir": str(self._peer_dir),
            "max_per_uid": self._max_per_uid,
        }
        try:
            # -I -S: the helper needs the standard library only and must not pick up
            # PYTHON* variables or site hooks while running as root.
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(script), _CHILD_FLAG, json.dumps(config)],
                pass_fds=(listener.fileno(), theirs.fileno()),
                stdin=subprocess.DEVNULL,
                # Own session: a Ctrl-C meant for the daemon must not kill the relay
                # under it; the daemon stops it through stop() or by exiting.
                start_new_session=True,
            )
        except OSError as exc:
            ours.close()
            raise FrontDoorError(f"cannot start the relay helper for {self._public_path}: {exc}") from exc
        finally:
            theirs.close()
        try:
            ours.settimeout(_READY_TIMEOUT)
            try:
                first = ours.recv(65536)
            except TimeoutError:
                first = b""
            ours.settimeout(None)
            if not first or not json.loads(first).get("ready"):
                _reap(proc)
                raise FrontDoorError(
                    f"relay helper for {self._public_path} did not start (exit code "
                    f"{proc.returncode}); see the log above"
                )
        except BaseException:
            ours.close()
            _reap(proc)
            raise
        return proc, ours

    # --- supervisor thread ----------------------------------------------------

    def _supervise(self) -> None:
        while True:
            with self._lock:
                ctrl, proc = self._ctrl, self._proc
            if ctrl is not None:
                self._pump(ctrl)
            if self._stopping.is_set():
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                if proc is not None:
                    _reap(proc)
                    logger.error(
                        "relay helper for %s exited unexpectedly with code %s; restarting it",
                        self._public_path,
                        proc.returncode,
                    )
                if ctrl is not None:
                    ctrl.close()
                self._ctrl = self._proc = None
                self._active = 0
            # Outside the lock, so that stop() is never held up by the back-off.
            if self._stopping.wait(_RESPAWN_DELAY):
                return
            with self._lock:
                if self._stopping.is_set() or self._listener is None or self._draining:
                    return
                try:
                    self._proc, self._ctrl = self._spawn(self._listener)
                except FrontDoorError as exc:
                    logger.error("%s", exc)

    def _pump(self, ctrl: socket.socket) -> None:
        """Apply the helper's messages until its end (or stop()) closes the channel."""
        while True:
            try:
                data = ctrl.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                message = json.loads(data)
                if "active" in message:
                    self._active = int(message["active"])
                if "log" in message:
                    level, text = message["log"]
                    logger.log(int(level), "%s", text)
            except (ValueError, TypeError, KeyError):
                # Never let one bad message end supervision of the helper.
                logger.exception("unreadable message from the relay helper: %r", data[:200])


def _is_live(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError:
        # Backlog full, timeout, or anything we cannot explain: assume someone is
        # there rather than steal their socket.
        return True
    finally:
        probe.close()
    return True


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        proc.wait(_STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _quiet_unlink(path: str | Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _quiet_shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# --- the helper process (standard library only below this line) -----------------

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_HUP_ERR = select.EPOLLHUP | select.EPOLLERR
_BUF_SIZE = 256 * 1024
_CAP_WARN_INTERVAL = 10.0
_ACCEPT_PAUSE = 0.1
_MAX_QUEUED_LOGS = 256


class _Flow:
    """One direction of a relayed connection; `pending` is what `dst` could not take yet."""

    __slots__ = ("dst", "dst_fd", "eof", "link", "pending", "src", "src_fd")

    def __init__(self, src: socket.socket, dst: socket.socket, link: _Link) -> None:
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pending = b""
        self.eof = False
        self.link = link

    @property
    def done(self) -> bool:
        return self.eof and not self.pending


class _Link:
    __slots__ = ("closed", "down", "uid", "up")

    def __init__(self, uid: int, caller: socket.socket, internal: socket.socket) -> None:
        self.uid = uid
        self.up = _Flow(caller, internal, self)
        self.down = _Flow(internal, caller, self)
        self.closed = False


class _Relay:
    def __init__(
        self, listener: socket.socket, ctrl: socket.socket, internal_path: str, peer_dir: str, max_per_uid: int
    ) -> None:
        self._listener = listener
        self._listen_fd = listener.fileno()
        self._ctrl = ctrl
        self._ctrl_fd = ctrl.fileno()
        self._internal_path = internal_path
        self._peer_dir = peer_dir
        self._max_per_uid = max_per_uid
        self._ep = select.epoll()
        self._probe = select.poll()
        self._interest: dict[int, int] = {}
        self._reader: dict[int, _Flow] = {}
        self._writer: dict[int, _Flow] = {}
        self._by_uid: dict[int, set[_Link]] = {}
        self._cap_warned: dict[int, tuple[float, int]] = {}
        self._active = 0
        self._serial = 0
        self._buf = bytearray(_BUF_SIZE)
        self._view = memoryview(self._buf)
        self._outbox: collections.deque[bytes] = collections.deque()
        self._dropped_logs = 0
        self._report_active = False
        self._listen_resume = 0.0
        listener.setblocking(False)
        ctrl.setblocking(False)
        self._set_interest(self._listen_fd, _IN)
        self._set_interest(self._ctrl_fd, _IN)

    # -- messages to the daemon

    def log(self, level: int, text: str) -> None:
        if len(self._outbox) >= _MAX_QUEUED_LOGS:
            self._dropped_logs += 1
            return
        self._outbox.append(json.dumps({"log": [level, text]}).encode())

    def _flush_ctrl(self) -> None:
        if self._dropped_logs and len(self._outbox) < _MAX_QUEUED_LOGS:
            self._outbox.append(
                json.dumps({"log": [logging.WARNING, f"relay dropped {self._dropped_logs} log messages"]}).encode()
            )
            self._dropped_logs = 0
        try:
            while self._outbox:
                self._ctrl.send(self._outbox[0])
                self._outbox.popleft()
            # Only the latest count matters, so it is never queued, just retried.
            if self._report_active:
                self._ctrl.send(json.dumps({"active": self._active}).encode())
                self._report_active = False
        except BlockingIOError:
            pass
        except OSError:
            # The daemon is gone; the loop sees EOF on the channel and exits.
            self._outbox.clear()
            self._report_active = False
        # A daemon slow to read must never stall the relay: wait for room instead.
        backlog = self._outbox or self._report_active
        self._set_interest(self._ctrl_fd, _IN | _OUT if backlog else _IN)

    # -- epoll bookkeeping

    def _set_interest(self, fd: int, want: int) -> None:
        have = self._interest.get(fd)
        if want == have:
            return
        if want == 0:
            # Unregistered rather than masked, so a paused socket's HUP cannot spin us.
            self._ep.unregister(fd)
            del self._interest[fd]
        elif have is None:
            self._ep.register(fd, want)
            self._interest[fd] = want
        else:
            self._ep.modify(fd, want)
            self._interest[fd] = want

    def _refresh(self, fd: int) -> None:
        reading = self._reader[fd]
        writing = self._writer[fd]
        want = 0
        if not reading.eof and not reading.pending:
            want |= _IN
        if writing.pending:
            want |= _OUT
        self._set_interest(fd, want)

    # -- main loop

    def run(self) -> None:
        self._ctrl.send(json.dumps({"ready": True}).encode())
        poll = self._ep.poll
        reader = self._reader
        listen_fd, ctrl_fd = self._listen_fd, self._ctrl_fd
        while True:
            timeout = -1.0
            if self._listen_resume and self._listener.fileno() != -1:
                timeout = max(0.0, self._listen_resume - time.monotonic())
                if timeout == 0.0:
                    self._listen_resume = 0.0
                    self._set_interest(listen_fd, _IN)
                    timeout = -1.0
            for fd, events in poll(timeout):
                flow = reader.get(fd)
                if flow is not None:
                    self._on_socket(flow, fd, events)
                elif fd == listen_fd:
                    self._accept()
                elif fd == ctrl_fd:
                    if events & _OUT:
                        self._flush_ctrl()
                    if events & (_IN | _HUP_ERR) and not self._daemon_alive():
                        return
            if (self._outbox or self._report_active or self._dropped_logs) and self._interest[ctrl_fd] == _IN:
                self._flush_ctrl()

    def _daemon_alive(self) -> bool:
        try:
            data = self._ctrl.recv(4096)
        except BlockingIOError:
            return True
        except OSError:
            return False
        if DRAIN in data:
            self._stop_accepting()
        return bool(data)

    def _stop_accepting(self) -> None:
        """The daemon is stopping: accept nothing more, keep relaying what is open until told to exit."""
        if self._listener.fileno() == -1:
            return
        self._listen_resume = 0.0
        self._set_interest(self._listen_fd, 0)
        self._listener.close()

    def last_words(self) -> None:
        """Deliver queued messages before exiting, waiting briefly for the daemon to read them."""
        self._ctrl.settimeout(1.0)
        try:
            for message in self._outbox:
                self._ctrl.send(message)
        except OSError:
            pass
        self._outbox.clear()

    def close_all(self) -> None:
        for flow in list(self._reader.values()):
            self._close(flow.link)
        self._ep.close()

    # -- accepting

    def _accept(self) -> None:
        for _ in range(64):
            try:
                conn, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # Out of descriptors: the listener would stay readable and spin.
                    self.log(logging.ERROR, f"cannot accept on the public socket: {exc}; pausing accepts")
                    self._set_interest(self._listen_fd, 0)
                    self._listen_resume = time.monotonic() + _ACCEPT_PAUSE
                    return
                raise
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        try:
            pid, uid, gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        except OSError as exc:
            conn.close()
            self.log(logging.WARNING, f"dropped a connection whose credentials could not be read: {exc}")
            return
        if len(self._by_uid.get(uid, ())) >= self._max_per_uid:
            self._sweep(uid)
            if len(self._by_uid.get(uid, ())) >= self._max_per_uid:
                conn.close()
                self._warn_cap(uid)
                return
        try:
            internal = self._dial(uid, gid, pid)
        except OSError as exc:
            conn.close()
            self.log(
                logging.WARNING,
                f"dropped a connection from uid {uid} pid {pid}: cannot reach the internal "
                f"socket {self._internal_path}: {exc}",
            )
            return
        conn.setblocking(False)
        link = _Link(uid, conn, internal)
        for flow in (link.up, link.down):
            self._reader[flow.src_fd] = flow
            self._writer[flow.dst_fd] = flow
            self._set_interest(flow.src_fd, _IN)
        self._by_uid.setdefault(uid, set()).add(link)
        self._active += 1
        self._report_active = True

    def _sweep(self, uid: int) -> None:
        """Finish the uid's connections whose callers already hung up but whose EOF is still queued.

        A burst of short connections is accepted faster than their hang-ups are read,
        and those must not count against the cap; what they sent is still forwarded.
        """
        for link in list(self._by_uid.get(uid, ())):
            flow = link.up
            while not (link.closed or flow.pending or flow.eof) and self._gone(flow.src_fd):
                self._read(flow)

    def _warn_cap(self, uid: int) -> None:
        # At most one line per uid per interval: a looping client must not flood the log.
        now = time.monotonic()
        last, suppressed = self._cap_warned.get(uid, (-_CAP_WARN_INTERVAL, 0))
        if now - last < _CAP_WARN_INTERVAL:
            self._cap_warned[uid] = (last, suppressed + 1)
            return
        more = f" ({suppressed} more refused since the last report)" if suppressed else ""
        self.log(
            logging.WARNING,
            f"refused a connection from uid {uid}: it already has {self._max_per_uid} "
            f"open connections (max_connections_per_uid){more}",
        )
        self._cap_warned[uid] = (now, 0)

    def _dial(self, uid: int, gid: int, pid: int) -> socket.socket:
        self._serial += 1
        name = f"{self._peer_dir}/{uid}.{gid}.{pid}.{self._serial}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.bind(name)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                # Only a dead helper of ours can have left it (peer_dir is ours, 0700).
                _quiet_unlink(name)
                sock.bind(name)
            try:
                # Non-blocking: a unix connect either completes at once or reports a
                # full backlog (EAGAIN); it must never block the loop.
                sock.setblocking(False)
                sock.connect(self._internal_path)
            finally:
                # The address stays on the socket (and in the server's peer()) after unlink.
                _quiet_unlink(name)
        except BaseException:
            sock.close()
            raise
        return sock

    # -- relaying

    def _on_socket(self, flow: _Flow, fd: int, events: int) -> None:
        if events & _OUT:
            self._write_pending(self._writer[fd])
            if flow.link.closed:
                return
        if self._interest.get(fd, 0) & _IN:
            if events & (_IN | _HUP_ERR):
                self._read(flow)
        elif events & _HUP_ERR:
            # Not reading it (EOF or paused) and its peer hung up: nothing more can cross.
            self._close(flow.link)

    def _read(self, flow: _Flow) -> None:
        try:
            n = flow.src.recv_into(self._buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(flow.link)
            return
        if n == 0:
            if self._gone(flow.src_fd):
                # Closed, not half-closed: nothing more can reach it, and holding the
                # other side until the server notices would keep the caller's slot taken.
                self._close(flow.link)
                return
            flow.eof = True
            self._end_flow(flow)
            return
        try:
            sent = flow.dst.send(self._view[:n])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(flow.link)
            return
        if sent < n:
            flow.pending = bytes(self._view[sent:n])
            self._refresh(flow.src_fd)
            self._refresh(flow.dst_fd)

    def _gone(self, fd: int) -> bool:
        self._probe.register(fd, select.POLLOUT)
        try:
            return any(events & (select.POLLHUP | select.POLLERR) for _, events in self._probe.poll(0))
        finally:
            self._probe.unregister(fd)

    def _write_pending(self, flow: _Flow) -> None:
        if not flow.pending:
            return
        try:
            sent = flow.dst.send(flow.pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(flow.link)
            return
        flow.pending = flow.pending[sent:]
        if flow.pending:
            return
        if flow.eof:
            self._end_flow(flow)
        else:
            self._refresh(flow.src_fd)
            self._refresh(flow.dst_fd)

    def _end_flow(self, flow: _Flow) -> None:
        """EOF from src and everything delivered: pass the half-close on, close when both ends are done."""
        if flow.pending:
            self._refresh(flow.src_fd)
            return
        with contextlib.suppress(OSError):
            flow.dst.shutdown(socket.SHUT_WR)
        link = flow.link
        if link.up.done and link.down.done:
            self._close(link)
        else:
            self._refresh(flow.src_fd)

    def _close(self, link: _Link) -> None:
        if link.closed:
            return
        link.closed = True
        for flow in (link.up, link.down):
            fd = flow.src_fd
            if fd in self._interest:
                self._ep.unregister(fd)
                del self._interest[fd]
            self._reader.pop(fd, None)
            self._writer.pop(fd, None)
            flow.src.close()
        links = self._by_uid[link.uid]
        links.discard(link)
        if not links:
            del self._by_uid[link.uid]
        self._active -= 1
        self._report_active = True


def _child_main(argv: list[str]) -> int:
    config = json.loads(argv[0])
    # The daemon owns shutdown; a terminal's signals are for it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    listener = socket.socket(fileno=int(config["listen_fd"]))
    ctrl = socket.socket(fileno=int(config["ctrl_fd"]))
    relay = _Relay(listener, ctrl, str(config["internal_path"]), str(config["peer_dir"]), int(config["max_per_uid"]))
    try:
        relay.run()
    except Exception:
        relay.log(logging.CRITICAL, "relay helper crashed:\n" + traceback.format_exc())
        relay.last_words()
        return 1
    finally:
        relay.close_all()
        listener.close()
        ctrl.close()
    return 0


if __name__ == "__main__" and sys.argv[1:2] == [_CHILD_FLAG]:
    sys.exit(_child_main(sys.argv[2:]))
