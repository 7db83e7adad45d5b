"""Composition root of gpushared: command line, wiring of adapters to services, signals, lifecycle."""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from gpushared import __version__, stub_engine
from gpushared.adapters.amdsmi_gpu import AmdSmiGpuBackend, load_amdsmi
from gpushared.adapters.cgroupfs import SUPERVISOR, CgroupError, CgroupFsTree, find_cgroup2_mount, own_cgroup_path
from gpushared.adapters.child_process import CgroupLauncher
from gpushared.adapters.emulated_amdsmi import EmulatedAmdSmi, EmulatorStateError
from gpushared.adapters.engine_cli import EngineCli
from gpushared.adapters.http_probe import HttpProbe
from gpushared.adapters.model_files import ModelFiles
from gpushared.adapters.procfs import ProcFs
from gpushared.adapters.sqlite_state import SqliteAllocationStore
from gpushared.adapters.systemd_notify import SystemdNotifier
from gpushared.adapters.systemd_units import SystemctlUnits
from gpushared.adapters.user_db import UserDatabase
from gpushared.config import DEFAULT_CONFIG_PATH, DaemonConfig, load_config, reload_changes, with_overrides
from gpushared.domain.errors import BackendUnavailable, ConfigError, GpushareError
from gpushared.domain.model_state import ModelState
from gpushared.logs import configure_logging, set_level
from gpushared.metrics.exporter import MetricsExporter
from gpushared.metrics.hooks import DaemonMetrics
from gpushared.metrics.settings import DEFAULT_LISTEN
from gpushared.metrics.source import ServicesSource
from gpushared.ports import GpuBackend
from gpushared.services.allocations import AllocationPolicy, AllocationService
from gpushared.services.models import SYSTEM, ModelService
from gpushared.services.partitions import PartitionService
from gpushared.transport.server import ApiServer, peer_dir_for
from gpushared.transport.servicer import Authenticator, GpushareServicer

log = logging.getLogger("gpushared")

EMULATOR_STATE_FILE = "emulated-host.json"
REFRESH_SECONDS = 30.0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_CONFIG = 78  # sysexits EX_CONFIG: systemd can refuse to restart on it
EXIT_NO_BACKEND = 69  # sysexits EX_UNAVAILABLE: no amdsmi or no GPU; restarting cannot fix it either


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpushared",
        description=(
            "Share AMD Instinct MI300X GPUs between LLM workloads: owns partition state, allocates "
            "partitions and pool memory, and serves the gpushare API on a Unix socket. "
            "Runs as root under systemd in production; `gpushared --emulate` runs on an emulated "
            "8-GPU MI300X host for trying it without hardware."
        ),
        epilog=(
            f"Configuration is read from {DEFAULT_CONFIG_PATH} when it exists; command-line options "
            "override it. Signals: SIGTERM/SIGINT stop cleanly, SIGHUP reloads the configuration. "
            "Exit status: 0 stopped cleanly, 1 a startup error (printed on one line), 69 no usable GPU "
            "backend (amdsmi missing or no GPU), 78 invalid configuration."
        ),
    )
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help=f"configuration file (default {DEFAULT_CONFIG_PATH})"
    )
    parser.add_argument(
        "--check-config",
        nargs="?",
        const=True,
        metavar="FILE",
        help="validate the configuration (FILE, or the one --config names) and exit: 0 valid, 78 invalid",
    )
    parser.add_argument(
        "--emulate",
        nargs="?",
        const=-1,
        type=int,
        metavar="N",
        help="use the emulated MI300X host with N GPUs (default: emulator.gpu_count, 8) instead of amdsmi",
    )
    parser.add_argument(
        "--socket", type=Path, metavar="PATH", help="API socket (default /run/gpushared/gpushared.sock)"
    )
    parser.add_argument("--state-dir", type=Path, metavar="DIR", help="durable state (default /var/lib/gpushared)")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="log verbosity (default info)"
    )
    parser.add_argument(
        "--cgroup-root",
        type=Path,
        metavar="PATH",
        help="cgroup v2 directory for model children (default: the cgroup systemd delegates to gpushared); "
        "without one, models cannot be served but allocation works",
    )
    parser.add_argument(
        "--stop-models-on-exit",
        action="store_true",
        default=None,
        help="stop every model when gpushared exits (default: models keep running and are re-adopted)",
    )
    parser.add_argument(
        "--metrics-listen",
        metavar="HOST:PORT",
        help=f"serve Prometheus metrics at http://HOST:PORT/metrics (default {DEFAULT_LISTEN}; off: no listener)",
    )
    parser.add_argument("--version", action="version", version=f"gpushared {__version__}")
    return parser


def command_line_overrides(args: argparse.Namespace) -> dict[str, Any]:
    backend = None
    gpu_count = None
    if args.emulate is not None:
        backend = "emulated"
        if args.emulate != -1:
            if not 1 <= args.emulate <= 8:
                raise ConfigError(f"--emulate {args.emulate}: an emulated host has 1 to 8 GPUs")
            gpu_count = args.emulate
    return {
        "backend": backend,
        "emulated_gpu_count": gpu_count,
        "socket": args.socket.absolute() if args.socket else None,
        "state_dir": args.state_dir.absolute() if args.state_dir else None,
        "log_level": args.log_level,
        "cgroup_root": args.cgroup_root.absolute() if args.cgroup_root else None,
        "stop_models_on_exit": args.stop_models_on_exit,
        "metrics_listen": args.metrics_listen,
    }


def open_cgroups(config: DaemonConfig) -> tuple[CgroupFsTree | None, str]:
    """The model cgroup subtree, with the daemon moved into its supervisor leaf; or why there is none."""
    root = config.cgroup_root
    if root is None:
        own = own_cgroup_path()
        mount = find_cgroup2_mount()
        if mount is None:
            return None, "no cgroup v2 is mounted on this host"
        # Only a cgroup systemd delegated to us is ours to subdivide; anywhere else we would be a second writer.
        if "INVOCATION_ID" not in os.environ or own is None or own == mount:
            return (
                None,
                f"no delegated cgroup: run under systemd (Delegate=yes) or pass --cgroup-root {mount}/gpushared",
            )
        # systemd >= 254 with DelegateSubgroup=supervisor starts us in <unit>/supervisor: the unit is the root.
        root = own.parent if own.name == SUPERVISOR else own
    try:
        tree = CgroupFsTree(root)
        # Out of root first: the kernel refuses to enable controllers for leaves while a process lives in root.
        try:
            tree.adopt_supervisor(os.getpid())
        except CgroupError as exc:
            support = tree.probe()
            return None, support.reason if not support.writable else str(exc)
        support = tree.probe()
        if not support.writable:
            return None, support.reason
    except CgroupError as exc:
        return None, str(exc)
    if support.enforced:
        log.info("cgroup %s: %s", root, support.reason, extra={"event": "cgroup_limits"})
    elif support.reason:
        log.warning("cgroup %s: %s", root, support.reason, extra={"event": "cgroup_limits"})
    return tree, ""


def open_backend(config: DaemonConfig) -> GpuBackend:
    """The configured hardware backend. Never falls back to the emulator on its own."""
    if config.backend == "emulated":
        try:
            lib = EmulatedAmdSmi(config.state_dir / EMULATOR_STATE_FILE, gpu_count=config.emulated_gpu_count)
        except EmulatorStateError as exc:
            raise GpushareError(str(exc)) from exc
        return AmdSmiGpuBackend(lib, name="emulated")
    return AmdSmiGpuBackend(
        load_amdsmi(),
        reload_command=config.partitions.reload_command or None,
        reload_timeout=config.partitions.reload_timeout_seconds,
    )


def allocation_policy(config: DaemonConfig, users: UserDatabase) -> AllocationPolicy:
    quotas = {}
    for user, quota in config.user_quotas.items():
        uid = users.user_id(user)
        if uid is None:
            log.warning("quota for user %r ignored: no such user", user)
            continue
        quotas[uid] = quota
    return AllocationPolicy(config.default_policy, config.default_quota, quotas)


def status_line(backend: str, service: AllocationService, models: ModelService, partitions: PartitionService) -> str:
    """One line for systemctl status: what runs, what is held, what needs attention."""
    view = service.view
    all_models = models.all()
    ready = sum(1 for m in all_models if m.state is ModelState.READY)
    line = (
        f"{ready}/{len(all_models)} models ready, {len(view.ledger.allocations)} allocations, "
        f"{len(view.inventory.partitions())} partitions on {len(view.inventory.gpus)} GPUs ({backend})"
    )
    running = partitions.busy
    if running is not None:
        line += f"; operation {running.id}: {running.progress}"
    if view.ledger.degraded_gpus:
        line += f"; {len(view.ledger.degraded_gpus)} GPUs degraded"
    if partitions.drift:
        line += f"; layout drift on {len(partitions.drift)} GPUs"
    return line


def failpoints_from_env() -> Callable[[str], None] | None:
    """``GPUSHARED_FAILPOINTS=set_memory:started,verify:done``: SIGKILL the daemon right after journaling those
    partition steps. For crash-consistency tests (as in fail-rs or FoundationDB's simulation), never set in
    production; the daemon says loudly when it is."""
    spec = os.environ.get("GPUSHARED_FAILPOINTS", "")
    points = {p.strip() for p in spec.split(",") if p.strip()}
    if not points:
        return None
    log.warning("failpoints armed (testing only): %s", ", ".join(sorted(points)), extra={"event": "failpoints"})

    def hit(name: str) -> None:
        if name in points:
            log.warning("failpoint %s: killing the daemon", name, extra={"event": "failpoint"})
            os.kill(os.getpid(), signal.SIGKILL)

    return hit


def hold_lock(directory: Path) -> int:
    """Take an exclusive lock on ``directory/gpushared.lock`` for the life of the process."""
    path = directory / "gpushared.lock"
    try:
        # 0711: model children, running as other uids, must traverse it to reach their homes under
        # models/; nothing in it can be listed, and each file keeps its own restrictive mode.
        directory.mkdir(mode=0o711, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise GpushareError(
            f"state directory {directory}: cannot use it ({exc.strerror})",
            hint="run gpushared as root, or pass --state-dir with a directory you can write",
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GpushareError(
            f"state directory {directory}: another gpushared (pid {holder}) is using it",
            hint="stop that one first, or give this one its own --state-dir",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


class Daemon:
    def __init__(self, config: DaemonConfig, overrides: dict[str, Any] | None = None) -> None:
        self.config = config
        self.overrides = overrides or {}
        self.users = UserDatabase()
        self._stop = asyncio.Event()
        self._admin_gid: int | None = None
        self.notifier = SystemdNotifier()

    def _stop_requested(self) -> None:
        # STOPPING=1 first: systemd then knows the exit that follows is the one it asked for.
        self.notifier.stopping()
        self._stop.set()

    def _group(self, key: str, name: str) -> int | None:
        if not name:
            return None
        gid = self.users.group_id(name)
        if gid is None:
            log.warning(
                "group %r (daemon.%s) does not exist: %s",
                name,
                key,
                "only root is admin"
                if key == "admin_group"
                else f"the socket keeps the daemon's own group (gid {os.getegid()})",
                extra={"fix": f"groupadd --system {name}"},
            )
        return gid

    def is_admin(self, uid: int, gid: int) -> bool:
        if uid == 0:
            return True
        return self._admin_gid is not None and self._admin_gid in self.users.groups_of(uid, gid)

    async def run(self) -> None:
        config = self.config
        # Handlers first, so a SIGTERM during a slow start still ends in an orderly stop.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop_requested)
        # One daemon per state directory: two would split the allocation record and the emulator's hardware.
        lock = hold_lock(config.state_dir)
        try:
            backend = await asyncio.to_thread(open_backend, config)
        except BaseException:
            os.close(lock)
            raise
        self._admin_gid = self._group("admin_group", config.admin_group)
        try:
            store = SqliteAllocationStore(config.state_dir)
            try:
                await self._serve(backend, store)
            finally:
                store.close()
        finally:
            backend.close()
            os.close(lock)

    async def _serve(self, backend: GpuBackend, store: SqliteAllocationStore) -> None:
        config = self.config
        inventory = await asyncio.to_thread(backend.observe)
        service = AllocationService(store, allocation_policy(config, self.users), inventory, observed_at=time.time())
        tree, problem = open_cgroups(config)
        if tree is None:
            log.warning("models cannot be served: %s", problem, extra={"event": "no_cgroup"})
        serving = config.serving
        metrics = DaemonMetrics(watchdog_enabled=self.notifier.watchdog_seconds is not None)
        if not serving.stub_launcher:
            # The stub is standard-library only, so it runs as a file, readable by any model uid.
            serving = replace(serving, stub_launcher=(sys.executable, "-I", str(Path(stub_engine.__file__))))
        engine_cli = EngineCli(config.state_dir)
        models = ModelService(
            service,
            tree=tree,
            cgroup_problem=problem,
            launcher=CgroupLauncher(tree) if tree is not None else None,
            probe=metrics.metered_probe(HttpProbe()),
            config=serving,
            files=ModelFiles(config.state_dir),
            base_env=os.environ,
            engine_cli=engine_cli,
        )
        # Ask the configured vLLM for its options now, in the background: the first serve then rarely waits.
        warm_up = asyncio.create_task(engine_cli.known_flags(serving.vllm_launcher))
        await models.restore(store.load_models())
        partitions = PartitionService(
            backend,
            service,
            models,
            units=SystemctlUnits(config.partitions.systemctl),
            processes=ProcFs(),
            notifier=self.notifier,
            holder_services=config.partitions.holder_services,
            desired=config.partitions.layout,
            reload_timeout=config.partitions.reload_timeout_seconds,
            failpoint=failpoints_from_env(),
        )
        for warning in config.partitions.layout_warnings:
            log.warning("partitions.layout: %s", warning, extra={"event": "layout_warning"})
        # A partition operation a previous daemon left half-done is finished (or rolled back) before serving.
        await partitions.resume(store.load_operations())
        socket_gid = self._group("socket_group", config.socket_group)
        auth = Authenticator(peer_dir_for(config.socket), self.is_admin)
        server = ApiServer(
            GpushareServicer(service, auth, backend.name, models, partitions, rpc_observer=metrics),
            config.socket,
            socket_mode=config.socket_mode,
            socket_gid=socket_gid,
        )
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: self.reload(service))
        await server.start()
        exporter = MetricsExporter(
            metrics,
            ServicesSource(backend.name, service, models, partitions),
            hardware=backend,
            settings=config.metrics,
            restart_policy=serving.restart,
        )
        if config.metrics.listen is not None:
            try:
                await exporter.start(*config.metrics.listen)
            except OSError as exc:
                # Serving GPUs matters more than serving metrics; Prometheus' `up` and the alert rules say it.
                log.error(
                    "metrics: cannot listen on %s:%d: %s",
                    *config.metrics.listen,
                    exc.strerror or exc,
                    extra={"event": "metrics_listen_failed", "fix": "pick another metrics.listen or --metrics-listen"},
                )
        inventory = service.view.inventory
        log.info(
            "serving on %s: %s backend, %d GPUs, %d partitions, %d allocations",
            config.socket,
            backend.name,
            len(inventory.gpus),
            len(inventory.partitions()),
            len(service.view.ledger.allocations),
            extra={"event": "ready", "socket": str(config.socket), "backend": backend.name},
        )
        partitions.observe_drift(service.view.inventory)

        def summary() -> str:
            return status_line(backend.name, service, models, partitions)

        # READY only now: the API answers, running models are re-adopted, an interrupted partition operation is
        # finished; systemd starts units ordered after us from here on.
        self.notifier.ready(summary())
        refresher = asyncio.create_task(self._refresh(backend, service, partitions))
        housekeeping = asyncio.create_task(models.housekeeping())
        desired = asyncio.create_task(partitions.apply_desired(SYSTEM))
        watchdog = asyncio.create_task(self._watchdog(summary, metrics))
        try:
            await self._stop.wait()
        finally:
            log.info("stopping", extra={"event": "stopping"})
            refresher.cancel()
            housekeeping.cancel()
            desired.cancel()
            watchdog.cancel()
            warm_up.cancel()
            await exporter.stop()
            await server.stop()
            await partitions.shutdown()
            if serving.stop_models_on_exit:
                self.notifier.extend_timeout(serving.grace_seconds + 30)
            await models.shutdown()
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(signum)
        log.info("stopped", extra={"event": "stopped"})

    async def _watchdog(self, summary: Callable[[], str], metrics: DaemonMetrics) -> None:
        """WATCHDOG=1 at half systemd's interval, but only while the event loop keeps time and the API answers a
        health check through the public socket (front door included): a wedged daemon gets restarted."""
        interval = (self.notifier.watchdog_seconds or 10.0) / 2
        channel = grpc.aio.insecure_channel(f"unix:{self.config.socket}")
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        try:
            while True:
                due = time.monotonic() + interval
                await asyncio.sleep(interval)
                late = time.monotonic() - due
                problem = ""
                if late > interval:
                    problem = f"the event loop woke {late:.1f} s late"
                else:
                    try:
                        answer = await check(health_pb2.HealthCheckRequest(), timeout=min(interval, 5.0))
                        if answer.status != health_pb2.HealthCheckResponse.SERVING:
                            problem = (
                                f"the API reports {health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)}"
                            )
                    except grpc.RpcError as exc:
                        problem = f"the API health check failed ({exc.code().name})"
                metrics.watchdog(sent=not problem)
                if problem:
                    log.warning("watchdog ping withheld: %s", problem, extra={"event": "watchdog_withheld"})
                    continue
                if self.notifier.watchdog_seconds is not None:
                    self.notifier.watchdog()
                self.notifier.status(summary())
        finally:
            await channel.close()

    async def _refresh(self, backend: GpuBackend, service: AllocationService, partitions: PartitionService) -> None:
        while True:
            await asyncio.sleep(REFRESH_SECONDS)
            if partitions.busy is not None:
                continue  # the operation re-enumerates itself; mid-switch the hardware is expected to differ
            try:
                inventory = await asyncio.to_thread(backend.observe)
            except GpushareError as exc:
                log.warning("hardware observation failed: %s", exc, extra={"event": "observe_failed"})
                continue
            except Exception:
                # Keep serving from the last observation; a dead refresher would freeze it silently.
                log.exception("hardware observation crashed", extra={"event": "observe_failed"})
                continue
            service.update_inventory(inventory, time.time())
            partitions.observe_drift(inventory)

    def reload(self, service: AllocationService) -> None:
        try:
            # Command-line options keep winning over the file after a reload.
            new = with_overrides(load_config(self.config.source), **self.overrides)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc, extra={"event": "reload_failed"})
            return
        merged, applied, ignored = reload_changes(self.config, new)
        self.config = merged
        set_level(merged.log_level)
        self._admin_gid = self._group("admin_group", merged.admin_group)
        service.set_policy(allocation_policy(merged, self.users))
        log.info(
            "configuration reloaded; applied: %s; need a restart: %s",
            ", ".join(applied) or "nothing changed",
            ", ".join(ignored) or "none",
            extra={"event": "reload"},
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.check_config is not None:
        path = args.config if args.check_config is True else Path(args.check_config)
        try:
            load_config(path)
        except ConfigError as exc:
            print(f"gpushared: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        print(f"gpushared: config {path or DEFAULT_CONFIG_PATH}: ok")
        return 0
    try:
        overrides = command_line_overrides(args)
        config = with_overrides(load_config(args.config), **overrides)
    except ConfigError as exc:
        print(f"gpushared: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_level)
    try:
        asyncio.run(Daemon(config, overrides).run())
    except GpushareError as exc:
        # One line an operator can act on, no traceback: what failed, and how to proceed.
        print(f"gpushared: error: {exc}", file=sys.stderr)
        return EXIT_NO_BACKEND if isinstance(exc, BackendUnavailable) else EXIT_FAILURE
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
