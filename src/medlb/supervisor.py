"""The composition root: turn a :class:`~medlb.config.Config` into a running balancer.

It builds the runtime (servers, backends, balancers, frontends, checkers),
binds every listener *before* anything else starts (so a port in use is one
clear error and nothing half-runs), owns the long-lived tasks in one
``asyncio.TaskGroup``, and performs the graceful stop:

1. close the listeners (new clients go to the peer node or get refused);
2. let established sessions finish, up to ``global.hard_stop_after``;
3. close whatever is left and log how many sessions were cut.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import ipaddress
import logging
import random
import resource
import signal
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, TypeVar

from medlb.admin.alerts import AlertManager
from medlb.admin.api import AdminError, AdminServer, ReloadResult, load_token
from medlb.admin.metrics import MetricsExporter
from medlb.balance import make_balancer
from medlb.checks.scheduler import ServerChecker, numeric_sockaddr
from medlb.config import (
    BackendConfig,
    Config,
    DicomFrontendSettings,
    FrontendConfig,
    Hl7FrontendSettings,
    HostPort,
    HttpFrontendSettings,
    PersistenceConfig,
    ServerConfig,
    load_config,
    resolve_agent,
    resolve_backend_value,
    resolve_check,
    resolve_timeouts,
)
from medlb.errors import ConfigError, StartupError
from medlb.io.dicom import DicomSettings
from medlb.io.frontend import Frontend, Listener, open_listener
from medlb.io.hl7 import Hl7Settings, Hl7State
from medlb.io.http import HttpPersistence, HttpSettings
from medlb.io.runtime import Runtime
from medlb.io.tls import ClientTls, client_tls, server_tls
from medlb.io.workers import (
    REPORT_INTERVAL,
    WORKER_MODES,
    Msg,
    WorkerPool,
    WorkerRole,
    apply_state,
    collect,
    poll_queues,
    server_state,
)
from medlb.layers.dicom import DicomPolicy
from medlb.layers.hl7 import Hl7Router
from medlb.layers.http_rules import Router
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.persistence import Persistence, StickTable
from medlb.model.server import AdminState, Server
from medlb.proto.hl7 import FieldPath
from medlb.proto.http import Limits

log = logging.getLogger("medlb")


class _HasName(Protocol):
    @property
    def name(self) -> str: ...


_Named = TypeVar("_Named", bound=_HasName)


#: Allocations between young-generation collections (CPython's default is 700).
GC_GEN0_THRESHOLD = 50_000


def tune_gc() -> None:
    """Make the cyclic garbage collector cheap for a proxy.

    Per-request objects die by reference counting; the collector only has to
    find the rare cycle. At CPython's default threshold it ran every 700
    allocations and took a quarter of the CPU of ``mode: http`` under load
    (py-spy, 50 keep-alive clients). Everything built at start-up is frozen
    out of the collector's view, and young collections are 70x rarer.
    """
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, gen1, gen2)


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE towards ``wanted``; every proxied session costs 2-6 fds."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return soft
    for new_hard in (max(hard, wanted), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, new_hard), new_hard))
            return min(wanted, new_hard)
        except (ValueError, OSError):
            continue
    return soft


class Supervisor:
    """Runs one configuration until asked to stop; reloads it in place on request."""

    def __init__(
        self,
        config: Config,
        *,
        log_sessions: bool = True,
        config_path: str | None = None,
        worker: WorkerRole | None = None,
    ) -> None:
        self.config = config
        #: Set in a worker process of ``global.workers`` (see io/workers.py); None in the main one.
        self.worker = worker
        #: The main process's worker processes, once started (``global.workers`` > 1).
        self.pool: WorkerPool | None = None
        #: Worker: the board row of each server key, as the main process last said.
        self._slots: dict[str, int] = {}
        #: Processes serving http/tcp frontends; fixed at start (a reload cannot change it).
        self.workers: int = worker.hello["workers"] if worker is not None else config.global_.workers
        self.config_path = config_path or ""
        self.log_sessions = log_sessions
        self.runtime = Runtime(config)
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self.exit_code = 0
        self.last_reload: dict[str, Any] | None = None
        self.admin: AdminServer | None = None
        # Workers mirror state changes from the main process: only the main process alerts.
        self.alerts = AlertManager(config.alerts if worker is None else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reload_lock = asyncio.Lock()
        self._group: asyncio.TaskGroup | None = None
        #: Config servers removed through the API: a reload of an unchanged entry keeps them out.
        self._removed: set[tuple[str, str]] = set()
        #: Worker: servers whose connect failures were reported to the main process.
        self._failing: set[str] = set()

    # -- building -----------------------------------------------------------------------

    def _make_server(self, config: Config, b_cfg: BackendConfig, s_cfg: ServerConfig, now: float) -> Server:
        check = resolve_check(config, b_cfg, s_cfg)
        server = Server(
            s_cfg.name,
            s_cfg.address,
            backend_name=b_cfg.name,
            weight=s_cfg.weight,
            maxconn=s_cfg.maxconn,
            backup=s_cfg.backup,
            slowstart=_slowstart(config, b_cfg, s_cfg),
            rise=check.rise,
            fall=check.fall,
            admin_state=AdminState(s_cfg.admin_state),
            now=now,
        )
        server.ae_title = s_cfg.ae_title
        if s_cfg.address.is_literal:
            server.sockaddr = numeric_sockaddr(s_cfg.address.host, s_cfg.address.port)
        return server

    @staticmethod
    def _make_checker(config: Config, b_cfg: BackendConfig, s_cfg: ServerConfig, server: Server) -> ServerChecker:
        # The external-check contract passes the frontend address in front of the
        # backend (HAProxy passes the proxy's first bind).
        vip, vport = "0.0.0.0", 0
        for f_cfg in config.frontends:
            if f_cfg.default_backend == b_cfg.name:
                vip, vport = f_cfg.bind[0].host, f_cfg.bind[0].port
                break
        checker = ServerChecker(
            server,
            resolve_check(config, b_cfg, s_cfg),
            resolve_agent(config, b_cfg, s_cfg),
            resolve_timeouts(config, b_cfg).check,
            vip=vip,
            vport=vport,
            rng=random.Random(),
        )
        if b_cfg.tls is not None and checker.check.type in ("dicom-echo", "hl7"):
            checker.tls = client_tls(b_cfg.tls)  # a TLS-only archive is checked over TLS too
        return checker

    @staticmethod
    def _policy(config: Config, b_cfg: BackendConfig) -> BackendPolicy:
        return BackendPolicy(
            retries=int(resolve_backend_value(config, b_cfg, "retries", 2)),
            redispatch=bool(resolve_backend_value(config, b_cfg, "redispatch", True)),
            maxqueue=int(resolve_backend_value(config, b_cfg, "maxqueue", 0)),
            proxy_protocol=str(resolve_backend_value(config, b_cfg, "proxy_protocol", "none")),
        )

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        config = self.config
        runtime = self.runtime
        runtime.epoch_offset = time.time() - loop.time()
        if self.worker is not None:
            runtime.run_checks = False
            runtime.peer_observer = self._observed
        now = loop.time()
        for b_cfg in config.backends:
            servers = [self._make_server(config, b_cfg, s_cfg, now) for s_cfg in b_cfg.servers]
            backend = Backend(b_cfg.name, servers, make_balancer(b_cfg.balance), self._policy(config, b_cfg), loop.time)
            runtime.backends[b_cfg.name] = backend
            self.alerts.watch(backend)
            for s_cfg, server in zip(b_cfg.servers, servers, strict=True):
                runtime.checkers[server] = self._make_checker(config, b_cfg, s_cfg, server)

        runtime.backend_tls.update(backend_tls(config))
        runtime.persistence.update(persistence_rules(config, {}))
        http = {f_cfg.name: http_settings(f_cfg) for f_cfg in config.frontends}
        dicom = {f_cfg.name: dicom_settings(f_cfg) for f_cfg in config.frontends}
        hl7 = {f_cfg.name: hl7_settings(f_cfg) for f_cfg in config.frontends}
        for f_cfg in config.frontends:
            runtime.frontends[f_cfg.name] = self._make_frontend(
                loop, config, f_cfg, http[f_cfg.name], dicom[f_cfg.name], hl7[f_cfg.name]
            )

    def _make_frontend(
        self,
        loop: asyncio.AbstractEventLoop,
        config: Config,
        f_cfg: FrontendConfig,
        http: HttpSettings | None,
        dicom: DicomSettings | None = None,
        hl7: Hl7Settings | None = None,
    ) -> Frontend:
        backend = self.runtime.backends[f_cfg.default_backend]
        frontend = Frontend(
            loop,
            f_cfg.name,
            backend,
            http=http,
            dicom=dicom,
            hl7=hl7,
            hl7_state=hl7_state(f_cfg),
            maxconn=f_cfg.maxconn,
            timeouts=resolve_timeouts(config, config.backend(f_cfg.default_backend), f_cfg),
            observer=self.runtime,
            splice=config.global_.splice,
            log_sessions=self.log_sessions,
        )
        frontend.backend_tls = self.runtime.backend_tls
        frontend.persistence = self.runtime.persistence
        if self.workers > 1:
            frontend.stick_peer = self._share_stick
        frontend.backends = self.runtime.backends
        return frontend

    def _bind(self) -> None:
        """Bind every listener or none: a half-started balancer is worse than none."""
        opened = self._open_listeners(self.config, keep={})
        for frontend_name, bind, sock in opened:
            self._add_listener(self.runtime.frontends[frontend_name], bind, sock)

    def _open_listeners(
        self, config: Config, keep: dict[HostPort, Listener]
    ) -> list[tuple[str, HostPort, socket.socket]]:
        """Open the sockets ``config`` needs that ``keep`` does not already have; all or none.

        Kept listeners are matched by address alone, so renaming a frontend moves
        its socket instead of trying to bind the same port twice.
        """
        opened: list[tuple[str, HostPort, socket.socket]] = []
        ports: dict[tuple[str, int], int] = self.worker.hello["ports"] if self.worker is not None else {}
        try:
            for f_cfg in config.frontends:
                shared = self.workers > 1 and f_cfg.mode in WORKER_MODES
                if self.worker is not None and f_cfg.mode not in WORKER_MODES:
                    continue  # dicom and hl7 frontends are the main process's alone
                for i, address in enumerate(f_cfg.bind):
                    if address not in keep or address.port == 0:
                        at = address
                        if self.worker is not None:  # the main process's port (it differs from 0)
                            at = HostPort(address.host, ports.get((f_cfg.name, i), address.port))
                        sock = open_listener(at, f_cfg.backlog, reuseport=shared, join=self.worker is not None)
                        opened.append((f_cfg.name, address, sock))
        except StartupError:
            _close_all(opened)
            raise
        return opened

    @staticmethod
    def _add_listener(frontend: Frontend, bind: HostPort, sock: socket.socket) -> None:
        listener = frontend.add_listener(sock, bind)
        host, port = listener.address
        log.info("frontend %s listening on %s:%d (mode %s)", frontend.name, host, port, frontend.mode)

    # -- runtime changes (admin API) ----------------------------------------------------------

    def add_server(self, backend_name: str, spec: ServerConfig, source: str) -> Server:
        """Add a server to a running backend; it checks at once and takes traffic once UP."""
        backend = self.runtime.backends.get(backend_name)
        if backend is None:
            raise AdminError(404, f"no backend named {backend_name!r}")
        if backend.server(spec.name) is not None:
            raise AdminError(409, f"backend {backend_name!r} already has a server named {spec.name!r}")
        assert self._loop is not None
        b_cfg = self.config.backend(backend_name)
        server = self._make_server(self.config, b_cfg, spec, self._loop.time())
        server.admin_source = source
        backend.reconfigure([*backend.servers, server], backend.balancer, backend.policy)
        self.runtime.added[(backend_name, spec.name)] = spec
        self._removed.discard((backend_name, spec.name))
        self.runtime.start_checker(server, self._make_checker(self.config, b_cfg, spec, server))
        log.warning(
            "server %s added at %s by %s (starts DOWN until its first check passes)", server.key, spec.address, source
        )
        if self.pool is not None:
            self.pool.broadcast({"t": "add", "backend": backend_name, "spec": spec, "source": source})
            self.pool.send_state()  # with the new server's row on the session board
        elif self.worker is not None:
            self._share()
        return server

    def remove_server(
        self, backend_name: str, server_name: str, *, force: bool, source: str, checked: bool = False
    ) -> int:
        """Remove a server: only from MAINT with no sessions, unless ``force`` closes them.

        ``checked``: the main process already checked (a worker applying its removal): a
        worker's own sessions on the server, if any, finish on the retired server.
        """
        backend = self.runtime.backends.get(backend_name)
        if backend is None:
            raise AdminError(404, f"no backend named {backend_name!r}")
        server = backend.server(server_name)
        if server is None:
            raise AdminError(404, f"backend {backend_name!r} has no server named {server_name!r}")
        if not force and not checked and (server.admin_state is not AdminState.MAINT or server.all_sessions > 0):
            raise AdminError(
                409,
                f"{server.key} is {server.admin_state.value} with {server.all_sessions} session(s): "
                "put it in maint and wait until drained, or use force=true to close its sessions",
                admin_state=server.admin_state.value,
                cur_sessions=server.all_sessions,
            )
        backend.reconfigure([s for s in backend.servers if s is not server], backend.balancer, backend.policy)
        self.runtime.stop_checker(server)
        self.runtime.added.pop((backend_name, server_name), None)
        if _find(self.config.backend(backend_name).servers, server_name) is not None:
            self._removed.add((backend_name, server_name))
        if self.pool is not None:
            self.pool.broadcast({"t": "remove", "backend": backend_name, "server": server_name, "force": force})
        closed = self.runtime.shutdown_sessions(server, "server_removed") if force else 0
        if not force and server.cur_sessions > 0:
            self.runtime.retired_servers.append(server)
        log.warning("server %s removed by %s (%d session(s) closed)", server.key, source, closed)
        return closed

    # -- reload ---------------------------------------------------------------------------

    async def reload(self, source: str) -> ReloadResult:
        """Re-read the config file and apply it without dropping a session.

        Validation, every bind and every secret come first; only then is the new
        config applied, in one synchronous step (no await), so no connection ever
        sees a half-applied state and a bad config changes nothing. Whatever goes
        wrong, the answer is a refused reload, never a dead balancer: SIGHUP runs
        this in the supervisor's TaskGroup, where an escaping exception would stop
        every session.
        """
        async with self._reload_lock:
            try:
                result = self._reload(source)
            except Exception as exc:
                log.exception("reload failed unexpectedly")
                result = ReloadResult(False, f"internal error during reload: {exc!r}", status=500)
        self.last_reload = {"at": round(time.time(), 3), "ok": result.ok, "message": result.message, "by": source}
        if result.ok:
            log.warning("configuration reloaded by %s: %s", source, result.message)
        else:
            log.error("configuration reload by %s refused, still running the previous one: %s", source, result.message)
            for issue in result.issues:
                log.error("  %s", issue)
        return result

    def _reload(self, source: str) -> ReloadResult:
        if self._stop.is_set():
            return ReloadResult(False, "medlb is stopping; reload refused", status=409)
        if not self.config_path:
            return ReloadResult(False, "medlb was started without a config file; nothing to reload", status=409)
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            return ReloadResult(False, f"{self.config_path} is invalid ({len(exc.issues)} error(s))", exc.issues)
        crossing = self._crossing(new) if self.workers > 1 else None
        if crossing is not None:
            return ReloadResult(False, crossing)
        result = self._reload_config(new)
        if result.ok and self.pool is not None:
            self.pool.watch()
            self.pool.broadcast({"t": "reload", "config": new, "ports": self.ports(), "source": source})
            self.pool.send_state()  # new servers' rows on the session board
        return result

    def _crossing(self, new: Config) -> str | None:
        """With workers, an address cannot move between an http/tcp frontend and a dicom/hl7 one.

        Workers bind only http/tcp addresses, with SO_REUSEPORT: a kept socket on the other
        side of that line would be served by the wrong processes, or could not be joined.
        """
        shared: dict[HostPort, str] = {}
        for frontend in self.runtime.frontends.values():
            for listener in frontend.listeners:
                if listener.bind is not None and listener.bind.port != 0:
                    shared[listener.bind] = frontend.mode
        for f_cfg in new.frontends:
            for bind in f_cfg.bind:
                old = shared.get(bind)
                if old is not None and (old in WORKER_MODES) != (f_cfg.mode in WORKER_MODES):
                    return (
                        f"{bind} moves from a mode {old} frontend to mode {f_cfg.mode} ({f_cfg.name}): with "
                        "global.workers > 1 that needs a restart (workers serve only http and tcp frontends)"
                    )
        return None

    def _reload_config(self, new: Config) -> ReloadResult:
        """Apply ``new`` (already validated): the main process's reload, or a worker's."""
        runtime = self.runtime
        keep: dict[HostPort, Listener] = {}
        for frontend in runtime.frontends.values():
            for listener in frontend.listeners:
                if listener.bind is not None:
                    keep[listener.bind] = listener
        try:
            opened = self._open_listeners(new, keep)
        except StartupError as exc:
            return ReloadResult(False, str(exc))
        # Secrets next: a token or SMTP password that cannot be read refuses the reload.
        # Each reconfigure below changes nothing when it raises, and the token is read
        # once before anything changes, so a failure leaves everything as it was.
        try:
            http = {f_cfg.name: http_settings(f_cfg) for f_cfg in new.frontends}
            dicom = {f_cfg.name: dicom_settings(f_cfg) for f_cfg in new.frontends}
            hl7 = {f_cfg.name: hl7_settings(f_cfg) for f_cfg in new.frontends}
            tls_to_servers = backend_tls(new)
            if new.admin is not None and self.admin is not None:
                load_token(new.admin)
            if self.worker is None:
                self.alerts.reconfigure(new.alerts)
            if new.admin is not None and self.admin is not None:
                self.admin.reconfigure(new.admin)
        except StartupError as exc:
            _close_all(opened)
            return ReloadResult(False, str(exc))
        try:
            summary = self._apply(new, keep, opened, http, dicom, hl7, tls_to_servers)
        except Exception as exc:  # a bug, not a config problem: keep serving, say so loudly
            log.exception("reload failed while applying the new configuration")
            _close_all(opened)
            return ReloadResult(False, f"internal error while applying the configuration: {exc!r}", status=500)
        return ReloadResult(True, summary)

    def _apply(
        self,
        new: Config,
        keep: dict[HostPort, Listener],
        opened: list[tuple[str, HostPort, socket.socket]],
        http: dict[str, HttpSettings | None],
        dicom: dict[str, DicomSettings | None],
        hl7: dict[str, Hl7Settings | None],
        tls_to_servers: dict[str, ClientTls],
    ) -> str:
        old = self.config
        runtime = self.runtime
        loop = self._loop
        assert loop is not None
        now = loop.time()
        counts = {"added": 0, "removed": 0, "kept": 0}
        #: Weight and admin-state changes wait until every backend has its new server
        #: list: applied earlier, they would serve queues against the old lists.
        deferred: list[Callable[[], object]] = []

        # Backends first: frontends point at them.
        for b_cfg in new.backends:
            backend = runtime.backends.get(b_cfg.name)
            old_b = _find(old.backends, b_cfg.name)
            if backend is None or old_b is None:
                self._forget_removed(b_cfg.name)
                fresh = [self._make_server(new, b_cfg, s_cfg, now) for s_cfg in b_cfg.servers]
                backend = Backend(b_cfg.name, fresh, make_balancer(b_cfg.balance), self._policy(new, b_cfg), loop.time)
                runtime.backends[b_cfg.name] = backend
                self.alerts.watch(backend)
                for s_cfg, made in zip(b_cfg.servers, fresh, strict=True):
                    runtime.start_checker(made, self._make_checker(new, b_cfg, s_cfg, made))
                counts["added"] += len(fresh)
                continue
            servers: list[Server] = []
            for s_cfg in b_cfg.servers:
                server: Server | None = backend.server(s_cfg.name)
                old_s = _find(old_b.servers, s_cfg.name) or runtime.added.get((b_cfg.name, s_cfg.name))
                if (b_cfg.name, s_cfg.name) in self._removed:
                    if old_s == s_cfg:
                        continue  # removed by an operator, and the file did not change it
                    self._removed.discard((b_cfg.name, s_cfg.name))
                if server is not None and server.address == s_cfg.address:
                    deferred += self._update_server(new, b_cfg, s_cfg, old_s, server, now)
                    counts["kept"] += 1
                else:
                    server = self._make_server(new, b_cfg, s_cfg, now)
                    runtime.start_checker(server, self._make_checker(new, b_cfg, s_cfg, server))
                    counts["added"] += 1
                runtime.added.pop((b_cfg.name, s_cfg.name), None)
                servers.append(server)
            # Servers added through the API survive a reload that does not mention them,
            # and follow the backend's new check and slowstart settings.
            for (b_name, s_name), spec in runtime.added.items():
                if b_name == b_cfg.name:
                    extra = backend.server(s_name)
                    if extra is not None:
                        deferred += self._update_server(new, b_cfg, spec, spec, extra, now)
                        servers.append(extra)
            balancer = backend.balancer if old_b.balance == b_cfg.balance else make_balancer(b_cfg.balance)
            for server in backend.reconfigure(servers, balancer, self._policy(new, b_cfg)):
                self._retire_server(server)
                counts["removed"] += 1
        for name in [n for n in runtime.backends if _find(new.backends, n) is None]:
            backend = runtime.backends.pop(name)
            self.alerts.unwatch(backend)
            for server in backend.servers:
                self._retire_server(server)
                counts["removed"] += 1
            runtime.added = {k: v for k, v in runtime.added.items() if k[0] != name}
            self._forget_removed(name)

        # Frontends: a listener whose address is still wanted keeps its socket, even
        # when the frontend around it was renamed; the rest close after the switch.
        wanted = {b: f.name for f in new.frontends for b in f.bind if b.port != 0}
        moving: dict[HostPort, Listener] = {}
        for current in list(runtime.frontends.values()):
            for listener in list(current.listeners):
                if listener.bind is not None and listener.bind in wanted:
                    if wanted[listener.bind] != current.name:
                        current.detach_listener(listener)
                        moving[listener.bind] = listener
                else:
                    log.info("frontend %s: closing listener %s", current.name, listener.bind)
                    current.remove_listener(listener)
        for f_cfg in new.frontends:
            frontend = runtime.frontends.get(f_cfg.name)
            backend = runtime.backends[f_cfg.default_backend]
            if frontend is None:
                frontend = self._make_frontend(loop, new, f_cfg, http[f_cfg.name], dicom[f_cfg.name], hl7[f_cfg.name])
                runtime.frontends[f_cfg.name] = frontend
            else:
                frontend.reconfigure(
                    backend,
                    maxconn=f_cfg.maxconn,
                    timeouts=resolve_timeouts(new, new.backend(f_cfg.default_backend), f_cfg),
                    splice=new.global_.splice,
                    http=http[f_cfg.name],
                    dicom=dicom[f_cfg.name],
                    hl7=hl7[f_cfg.name],
                    hl7_state=hl7_state(f_cfg),
                )
            for bind in f_cfg.bind:
                if bind in moving:
                    frontend.adopt_listener(moving.pop(bind))
                    log.info("frontend %s: took over listener %s", f_cfg.name, bind)
        for frontend_name, bind, sock in opened:
            self._add_listener(runtime.frontends[frontend_name], bind, sock)
        for name in [n for n in runtime.frontends if all(f.name != n for f in new.frontends)]:
            frontend = runtime.frontends.pop(name)
            frontend.close_listeners()
            runtime.retired_frontends.append(frontend)
            log.info("frontend %s removed; %d session(s) finish on their own", name, frontend.cur_sessions)

        runtime.backend_tls.clear()
        runtime.backend_tls.update(tls_to_servers)
        rules = persistence_rules(new, {b.name: (b.persistence, runtime.persistence.get(b.name)) for b in old.backends})
        runtime.persistence.clear()
        runtime.persistence.update(rules)
        for change in deferred:
            change()
        runtime.prune()
        if new.global_.log_level != old.global_.log_level:
            logging.getLogger().setLevel(getattr(logging, new.global_.log_level.upper()))
        for key in ("loop", "nofile", "workers"):
            if getattr(new.global_, key) != getattr(old.global_, key):
                log.warning("global.%s changes take effect at the next restart", key)
        if (new.admin is None) != (old.admin is None):
            log.warning("adding or removing the admin section takes effect at the next restart")
        self.config = new
        runtime.config = new
        runtime.reloads += 1
        return (
            f"{len(new.frontends)} frontend(s), {len(new.backends)} backend(s); "
            f"servers kept {counts['kept']}, added {counts['added']}, removed {counts['removed']}"
        )

    def _forget_removed(self, backend_name: str) -> None:
        """A backend that is gone or rebuilt starts from its file: forget operator removals in it."""
        self._removed = {key for key in self._removed if key[0] != backend_name}

    def _update_server(
        self,
        new: Config,
        b_cfg: BackendConfig,
        s_cfg: ServerConfig,
        old_s: ServerConfig | None,
        server: Server,
        now: float,
    ) -> list[Callable[[], object]]:
        """A surviving server keeps health and counters; the file wins only where it changed.

        A runtime change (drain, weight) survives a reload of an unchanged
        config: the operator's drain must not be undone by a colleague's reload.
        When the file's own value changed, the file is the newer intent. The
        weight and admin-state changes are returned for the caller to apply once
        every backend has its new server list.
        """
        deferred: list[Callable[[], object]] = []
        if old_s is None or old_s.weight != s_cfg.weight:
            deferred.append(functools.partial(server.set_weight, s_cfg.weight, "config reload"))
        if old_s is None or old_s.admin_state != s_cfg.admin_state:
            state = AdminState(s_cfg.admin_state)
            deferred.append(functools.partial(server.set_admin_state, state, now, "config reload"))
        server.maxconn = s_cfg.maxconn
        server.backup = s_cfg.backup
        server.ae_title = s_cfg.ae_title
        server.slowstart = _slowstart(new, b_cfg, s_cfg)
        check = resolve_check(new, b_cfg, s_cfg)
        server.health.rise, server.health.fall = check.rise, check.fall
        current = self.runtime.checkers.get(server)
        fresh = self._make_checker(new, b_cfg, s_cfg, server)
        if current is None or (current.check, current.agent, current.check_timeout, current.vip, current.vport) != (
            fresh.check,
            fresh.agent,
            fresh.check_timeout,
            fresh.vip,
            fresh.vport,
        ):
            self.runtime.start_checker(server, fresh)
        return deferred

    def _retire_server(self, server: Server) -> None:
        self.runtime.stop_checker(server)
        if server.cur_sessions > 0:
            self.runtime.retired_servers.append(server)
            log.warning("server %s removed from the config: draining %d session(s)", server.key, server.cur_sessions)

    # -- running ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        """SIGHUP: reload in a task (the signal handler itself must not block)."""
        if self._group is not None:
            self._group.create_task(self.reload("SIGHUP"), name="reload")
        else:
            log.warning("SIGHUP ignored: medlb is still starting or already stopping")

    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        self._loop = loop
        nofile = raise_nofile(self.config.global_.nofile)
        tune_gc()
        self._build(loop)
        self._bind()
        if self.worker is not None:
            self._adopt(self.worker.hello)
        if install_signals and self.worker is not None:
            # A worker stops on SIGTERM (systemd's stop reaches the whole group) or when the
            # main process says so; Ctrl-C and SIGHUP are the main process's to act on.
            loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGHUP, signal.SIG_IGN)
        elif install_signals:
            # Installed before anything slow: a SIGHUP while workers start must not kill medlb.
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            # SIGHUP reloads (never kills: `systemctl reload` must not cut associations).
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            if self.config.admin is not None and self.worker is None:
                self.admin = AdminServer(self.config.admin, self, self._metrics().render)
                await self.admin.start()
        except BaseException:
            for frontend in self.runtime.frontends.values():
                frontend.close_listeners()
                frontend.abort_sessions("startup_failed")
            if self.admin is not None:
                await self.admin.close()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            raise
        failed: StartupError | None = None
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self.runtime.attach_group(group)
                group.create_task(self.alerts.run(), name="alerts")
                if self.admin is not None:
                    group.create_task(self.admin.sample_forever(), name="history")
                if self.worker is None and self.workers > 1:
                    # Checks already run (attach_group), so servers come UP while workers start.
                    self.pool = WorkerPool(self.workers, self.runtime, self._hello, self._from_worker)
                    self.runtime.peer_shutdown = self._peer_shutdown
                    self.runtime.peer_lag = 2 * REPORT_INTERVAL + 0.1
                    self.runtime.peer_sync = self.pool.sync
                    try:
                        await self.pool.start()
                    except StartupError as exc:
                        failed = exc
                        for frontend in self.runtime.frontends.values():
                            frontend.close_listeners()
                        raise _Stopped from None
                    group.create_task(self.pool.run(), name="workers")
                    group.create_task(poll_queues(self.runtime), name="queues")
                log.info(
                    "medlb started: %d frontend(s), %d backend(s), %d server(s); nofile=%d; loop=%s",
                    len(self.runtime.frontends),
                    len(self.runtime.backends),
                    len(self.runtime.checkers),
                    nofile,
                    type(loop).__module__.split(".")[0],
                )
                if self.worker is not None:
                    group.create_task(self._follow_main(self.worker), name="main process")
                    group.create_task(self._report(self.worker), name="report")
                    group.create_task(poll_queues(self.runtime), name="queues")
                    self.worker.channel.send({"t": "ready"})
                self.started.set()
                await self._stop.wait()
                if self.pool is not None:
                    await asyncio.gather(self._graceful_stop(), self.pool.stop(self.config.global_.hard_stop_after))
                else:
                    await self._graceful_stop()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            self._group = None
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            if self.pool is not None and not self.pool.stopping:
                await self.pool.stop(0.0)
            if self.admin is not None:
                await self.admin.close()
        if failed is not None:
            raise failed
        log.info("medlb stopped")
        return self.exit_code

    # -- worker processes (``global.workers``; see io/workers.py) -----------------------------

    def ports(self) -> dict[tuple[str, int], int]:
        """The port of each bind of each frontend, by (frontend, bind index): what workers bind."""
        out: dict[tuple[str, int], int] = {}
        for f_cfg in self.config.frontends:
            frontend = self.runtime.frontends.get(f_cfg.name)
            if frontend is None:
                continue
            free = list(frontend.listeners)
            for i, address in enumerate(f_cfg.bind):
                for listener in free:
                    if listener.bind == address:
                        out[(f_cfg.name, i)] = listener.address[1]
                        free.remove(listener)
                        break
        return out

    def _hello(self) -> Msg:
        """Everything a (re)starting worker needs to serve like the main process does now."""
        return {
            "t": "hello",
            "config": self.config,
            "workers": self.workers,
            "ports": self.ports(),
            "state": server_state(self.runtime),
            "added": dict(self.runtime.added),
            "removed": set(self._removed),
            "sticks": self._sticks(),
            "log_sessions": self.log_sessions,
            "log_level": logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
        }

    def _adopt(self, hello: Msg) -> None:
        """A worker takes the main process's runtime changes: API-added and removed servers, state."""
        assert self._loop is not None
        for (backend_name, _), spec in hello["added"].items():
            with contextlib.suppress(AdminError):
                self.add_server(backend_name, spec, "main process")
        for backend_name, server_name in hello["removed"]:
            with contextlib.suppress(AdminError):
                self.remove_server(backend_name, server_name, force=False, source="main process", checked=True)
        self._slots = hello["board"]["slots"]
        self._share()
        apply_state(self.runtime, hello["state"], self._loop.time())
        for backend_name, entries in hello["sticks"].items():
            for key, server_name, age in entries:
                self._learn({"backend": backend_name, "key": key, "server": server_name, "age": age})

    def _share(self) -> None:
        """Worker: count every server's sessions on the main process's board (idempotent)."""
        assert self.worker is not None
        column = self.worker.hello["board"]["column"]
        if self.worker.board is not None and column is not None:
            self.worker.board.share(self.runtime, column, self._slots)

    def _sticks(self) -> dict[str, list[tuple[bytes, str, float]]]:
        """Every stick-table entry of this process (the main one holds what all workers shared)."""
        assert self._loop is not None
        now = self._loop.time()
        return {
            name: rule.model.table.snapshot(now)
            for name, rule in self.runtime.persistence.items()
            if rule.model.table is not None
        }

    def _server(self, key: str) -> Server | None:
        backend_name, _, server_name = key.partition("/")
        backend = self.runtime.backends.get(backend_name)
        return backend.server(server_name) if backend is not None else None

    def _from_worker(self, msg: Msg) -> None:
        """Main process: a worker's observation of a server, or a stick-table entry it learned."""
        if msg["t"] == "stick":
            self._learn(msg)
            assert self.pool is not None
            self.pool.broadcast(msg)  # to every worker (the sender's own entry is unchanged by it)
            return
        server = self._server(msg["server"])
        if server is not None:
            if msg["ok"]:
                self.runtime.report_connect_ok(server)
            else:
                self.runtime.report_connect_error(server)

    def _share_stick(self, backend: str, key: bytes, server: str) -> None:
        """A stick-table entry this process learned (``source``/``header`` persistence): tell the others."""
        msg = {"t": "stick", "backend": backend, "key": key, "server": server}
        if self.worker is not None:
            self.worker.channel.send(msg)
        elif self.pool is not None:
            self.pool.broadcast(msg)

    def _learn(self, msg: Msg) -> None:
        assert self._loop is not None
        rule = self.runtime.persistence.get(msg["backend"])
        if rule is not None and rule.model.table is not None:
            rule.model.table.learn(msg["key"], msg["server"], self._loop.time() - msg.get("age", 0.0))

    def _peer_shutdown(self, server: Server, cause: str) -> int:
        assert self.pool is not None
        self.pool.broadcast({"t": "kill", "server": server.key, "cause": cause})
        return server.peer_sessions

    def _observed(self, server: Server, ok: bool) -> None:
        """Worker: pass connect failures, and the first success after them, to the main process."""
        assert self.worker is not None
        if ok:
            if server.key not in self._failing:
                return
            self._failing.discard(server.key)
        else:
            self._failing.add(server.key)
        self.worker.channel.send({"t": "observe", "server": server.key, "ok": ok})

    async def _follow_main(self, role: WorkerRole) -> None:
        """Worker: apply what the main process says; stop when it says so or is gone."""
        while (msg := await role.channel.recv()) is not None:
            try:
                if self._on_main(role, msg):
                    return
            except Exception:
                log.exception("worker %d: cannot apply %r from the main process", role.index, msg.get("t"))
        log.error("worker %d: the main process is gone; stopping", role.index)
        self.request_stop()

    def _on_main(self, role: WorkerRole, msg: Msg) -> bool:
        """Apply one message; True when the worker must stop."""
        assert self._loop is not None
        kind = msg.get("t")
        if kind == "state":
            # Rows first: a server this state brings UP may take queued sessions at once.
            self._slots = msg.get("slots", self._slots)
            self._share()
            apply_state(self.runtime, msg["state"], self._loop.time())
        elif kind == "add":
            with contextlib.suppress(AdminError):
                self.add_server(msg["backend"], msg["spec"], msg["source"])
        elif kind == "remove":
            with contextlib.suppress(AdminError):
                self.remove_server(
                    msg["backend"], msg["server"], force=msg["force"], source="main process", checked=True
                )
        elif kind == "stick":
            self._learn(msg)
        elif kind == "kill":
            server = self._server(msg["server"])
            if server is not None:
                self.runtime.shutdown_sessions(server, msg["cause"])
        elif kind == "reload":
            role.hello["ports"] = msg["ports"]
            result = self._reload_config(msg["config"])
            if not result.ok:
                # The main process runs the new config; a worker that cannot is replaced at once by
                # one started with it, and finishes its own sessions meanwhile.
                log.error("worker %d: cannot apply the reload (%s); stopping", role.index, result.message)
                role.channel.send({"t": "failed", "message": f"cannot apply the reload: {result.message}"})
                self.exit_code = 1
                self.request_stop()
                return True
            self._share()  # servers the reload made are counted on the board at once
        elif kind == "ping":
            role.channel.send({"t": "pong", "id": msg["id"]})
        elif kind == "stop":
            self.request_stop()
            return True
        return False

    async def _report(self, role: WorkerRole) -> None:
        """Worker: send the counters to the main process, twice a second."""
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.runtime.prune()
            role.channel.send(collect(self.runtime))

    def _metrics(self) -> MetricsExporter:
        return MetricsExporter(lambda: self.runtime, alert_stats_getter=self.alerts.stats)

    async def _graceful_stop(self) -> None:
        frontends = self.runtime.all_frontends()
        for frontend in frontends:
            frontend.close_listeners()
        active = sum(f.cur_sessions for f in frontends)
        deadline = self.config.global_.hard_stop_after
        log.info("stopping: listeners closed, waiting up to %.0fs for %d session(s)", deadline, active)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(deadline):
                for frontend in frontends:
                    await frontend.idle_event.wait()
        cut = sum(f.abort_sessions("hard_stop") for f in frontends)
        if cut:
            log.warning("hard_stop_after reached: closed %d session(s)", cut)


def _find(items: Sequence[_Named], name: str) -> _Named | None:
    for item in items:
        if item.name == name:
            return item
    return None


def http_settings(f_cfg: FrontendConfig) -> HttpSettings | None:
    """The I/O ring's view of a frontend's ``http:`` section (None for ``mode: tcp``)."""
    if f_cfg.mode != "http":
        return None
    h = f_cfg.http or HttpFrontendSettings()
    fwd = h.forwarded_headers
    return HttpSettings(
        limits=Limits(
            max_header_bytes=h.max_header_size, max_headers=h.max_headers, max_uri=h.max_uri, max_body=h.max_body
        ),
        header_timeout=h.header_timeout,
        body_timeout=h.body_timeout,
        keepalive_timeout=h.keepalive_timeout,
        retry_after=max(int(h.retry_after), 0),
        xff=fwd.x_forwarded_for,
        x_forwarded_proto=fwd.x_forwarded_proto,
        x_forwarded_host=fwd.x_forwarded_host,
        forwarded=fwd.forwarded,
        trusted=tuple(ipaddress.ip_network(n) for n in h.trusted_proxies),
        tls=server_tls(f_cfg.tls) if f_cfg.tls is not None else None,
        router=Router.compile(f_cfg),
    )


def dicom_settings(f_cfg: FrontendConfig) -> DicomSettings | None:
    """The I/O ring's view of a frontend's ``dicom:`` section (None unless ``mode: dicom``).

    DICOM TLS (BCP 195 profile, PS3.15 Annex B.12) asks for client certificates: ``client_verify``
    defaults to ``required`` here, and no ALPN is offered (DICOM has no ALPN name).
    """
    if f_cfg.mode != "dicom":
        return None
    d = f_cfg.dicom or DicomFrontendSettings()
    tls = None
    if f_cfg.tls is not None:
        verify = f_cfg.tls.client_verify if "client_verify" in f_cfg.tls.model_fields_set else "required"
        tls = server_tls(f_cfg.tls.model_copy(update={"alpn": [], "client_verify": verify}))
    return DicomSettings(
        policy=DicomPolicy.compile(f_cfg),
        artim_timeout=d.artim_timeout,
        association_timeout=d.association_timeout,
        answer_timeout=d.answer_timeout,
        max_associate_pdu=d.max_associate_pdu,
        calling_ae=d.calling_ae,
        async_ops=d.async_ops,
        hash_calling_ae=d.hash == "calling_ae",
        tls=tls,
    )


def hl7_settings(f_cfg: FrontendConfig) -> Hl7Settings | None:
    """The I/O ring's view of a frontend's ``hl7:`` section (None unless ``mode: hl7``)."""
    if f_cfg.mode != "hl7":
        return None
    h = f_cfg.hl7 or Hl7FrontendSettings()
    order: FieldPath | Literal["connection", "none"]
    if h.order_key == "connection":
        order = "connection"
    elif h.order_key == "none":
        order = "none"
    else:
        order = FieldPath(h.order_key)
    return Hl7Settings(
        max_message=h.max_message,
        ack_timeout=h.ack_timeout,
        delivery_timeout=h.delivery_timeout,
        order_key=order,
        retry_on_ae=h.retry_on_ae,
        on_failure=h.on_failure,
        connections_per_server=h.connections_per_server,
        router=Hl7Router.compile(f_cfg),
        tls=server_tls(f_cfg.tls.model_copy(update={"alpn": []})) if f_cfg.tls is not None else None,
    )


def hl7_state(f_cfg: FrontendConfig) -> Hl7State | None:
    """Fresh shared state for a ``mode: hl7`` frontend (a reloaded frontend keeps its own)."""
    if f_cfg.mode != "hl7":
        return None
    h = f_cfg.hl7 or Hl7FrontendSettings()
    return Hl7State(h.dedup_window, h.dedup_size)


def persistence_rules(
    config: Config, previous: dict[str, tuple[PersistenceConfig | None, HttpPersistence | None]]
) -> dict[str, HttpPersistence]:
    """Persistence per backend; a rule whose config did not change keeps its stick table across a reload."""
    rules: dict[str, HttpPersistence] = {}
    for b in config.backends:
        p = b.persistence
        if p is None:
            continue
        old_cfg, old_rule = previous.get(b.name, (None, None))
        if old_rule is not None and old_cfg == p:
            rules[b.name] = old_rule
            continue
        table = StickTable(idle=p.timeout, size=p.table_size) if p.type != "cookie" else None
        header = (p.header or "").lower().encode()
        model = Persistence(
            kind=p.type, backend=b.name, cookie_name=p.cookie.name.encode(), header_name=header, table=table
        )
        rules[b.name] = HttpPersistence(model, p.cookie)
    return rules


def backend_tls(config: Config) -> dict[str, ClientTls]:
    """TLS contexts towards servers, for the backends that re-encrypt (files are read here)."""
    return {b.name: client_tls(b.tls) for b in config.backends if b.tls is not None}


def _close_all(opened: list[tuple[str, HostPort, socket.socket]]) -> None:
    for _, _, sock in opened:
        sock.close()


def _slowstart(config: Config, b_cfg: BackendConfig, s_cfg: ServerConfig) -> float:
    slowstart = s_cfg.slowstart
    if slowstart is None:
        slowstart = resolve_backend_value(config, b_cfg, "slowstart", 0.0)
    return float(slowstart)


class _Stopped(Exception):
    """Leaves the TaskGroup, cancelling the checker tasks."""


def new_event_loop(choice: str = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop when available (and asked for), else the stdlib loop (uvicorn's rule)."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise StartupError("global.loop is uvloop but uvloop is not installed") from None
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop
