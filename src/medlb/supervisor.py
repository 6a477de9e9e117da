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
import logging
import random
import resource
import signal
import socket
from collections.abc import Callable

from medlb.balance import make_balancer
from medlb.checks.scheduler import ServerChecker, numeric_sockaddr
from medlb.config import (
    Config,
    resolve_agent,
    resolve_backend_value,
    resolve_check,
    resolve_timeouts,
)
from medlb.errors import StartupError
from medlb.io.frontend import Frontend, open_listener
from medlb.io.runtime import Runtime
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.server import AdminState, Server

log = logging.getLogger("medlb")


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
    """Runs one configuration until asked to stop."""

    def __init__(self, config: Config, *, log_sessions: bool = True) -> None:
        self.config = config
        self.log_sessions = log_sessions
        self.runtime = Runtime(config)
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self.exit_code = 0

    # -- building -----------------------------------------------------------------------

    def _build(self, loop: asyncio.AbstractEventLoop) -> None:
        config = self.config
        runtime = self.runtime
        now = loop.time()
        for b_cfg in config.backends:
            servers = []
            for s_cfg in b_cfg.servers:
                check = resolve_check(config, b_cfg, s_cfg)
                slowstart = s_cfg.slowstart
                if slowstart is None:
                    slowstart = resolve_backend_value(config, b_cfg, "slowstart", 0.0)
                server = Server(
                    s_cfg.name,
                    s_cfg.address,
                    backend_name=b_cfg.name,
                    weight=s_cfg.weight,
                    maxconn=s_cfg.maxconn,
                    backup=s_cfg.backup,
                    slowstart=float(slowstart),
                    rise=check.rise,
                    fall=check.fall,
                    admin_state=AdminState(s_cfg.admin_state),
                    now=now,
                )
                if s_cfg.address.is_literal:
                    server.sockaddr = numeric_sockaddr(s_cfg.address.host, s_cfg.address.port)
                servers.append(server)
            policy = BackendPolicy(
                retries=int(resolve_backend_value(config, b_cfg, "retries", 2)),
                redispatch=bool(resolve_backend_value(config, b_cfg, "redispatch", True)),
                maxqueue=int(resolve_backend_value(config, b_cfg, "maxqueue", 0)),
                proxy_protocol=str(resolve_backend_value(config, b_cfg, "proxy_protocol", "none")),
            )
            backend = Backend(b_cfg.name, servers, make_balancer(b_cfg.balance), policy, loop.time)
            runtime.backends[b_cfg.name] = backend

        for f_cfg in config.frontends:
            backend = runtime.backends[f_cfg.default_backend]
            b_cfg = config.backend(f_cfg.default_backend)
            timeouts = resolve_timeouts(config, b_cfg, f_cfg)
            frontend = Frontend(
                loop,
                f_cfg.name,
                backend,
                maxconn=f_cfg.maxconn,
                timeouts=timeouts,
                observer=runtime,
                proxy_protocol=backend.policy.proxy_protocol,
                splice=config.global_.splice,
                log_sessions=self.log_sessions,
            )
            runtime.frontends[f_cfg.name] = frontend

        # Checkers: the external-check contract passes the frontend address in front
        # of the backend (HAProxy passes the proxy's first bind).
        vips: dict[str, tuple[str, int]] = {}
        for f_cfg in config.frontends:
            vips.setdefault(f_cfg.default_backend, (f_cfg.bind[0].host, f_cfg.bind[0].port))
        for b_cfg in config.backends:
            backend = runtime.backends[b_cfg.name]
            vip, vport = vips.get(b_cfg.name, ("0.0.0.0", 0))
            for s_cfg, server in zip(b_cfg.servers, backend.servers, strict=True):
                runtime.checkers[server] = ServerChecker(
                    server,
                    resolve_check(config, b_cfg, s_cfg),
                    resolve_agent(config, b_cfg, s_cfg),
                    resolve_timeouts(config, b_cfg).check,
                    vip=vip,
                    vport=vport,
                    rng=random.Random(),
                )

    def _bind(self) -> None:
        """Bind every listener or none: a half-started balancer is worse than none."""
        opened: list[tuple[Frontend, socket.socket]] = []
        try:
            for f_cfg in self.config.frontends:
                frontend = self.runtime.frontends[f_cfg.name]
                for address in f_cfg.bind:
                    opened.append((frontend, open_listener(address, f_cfg.backlog)))
        except StartupError:
            for _, sock in opened:
                sock.close()
            raise
        for frontend, sock in opened:
            listener = frontend.add_listener(sock)
            host, port = listener.address
            log.info("frontend %s listening on %s:%d (mode tcp)", frontend.name, host, port)

    # -- running ------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    @staticmethod
    def _sighup() -> None:
        log.warning("SIGHUP received: configuration reload is not supported yet; still running the loaded config")

    async def run(self, install_signals: bool = True) -> int:
        loop = asyncio.get_running_loop()
        nofile = raise_nofile(self.config.global_.nofile)
        self._build(loop)
        self._bind()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
            # SIGHUP's default action would kill the balancer and every association
            # with it; `systemctl reload` must never do that. Hitless reload comes
            # with the admin API; until then, say so and keep running.
            loop.add_signal_handler(signal.SIGHUP, self._sighup)
        log.info(
            "medlb started: %d frontend(s), %d backend(s), %d server(s); nofile=%d; loop=%s",
            len(self.runtime.frontends),
            len(self.runtime.backends),
            len(self.runtime.checkers),
            nofile,
            type(loop).__module__.split(".")[0],
        )
        try:
            async with asyncio.TaskGroup() as group:
                self.runtime.attach_group(group)
                self.started.set()
                await self._stop.wait()
                await self._graceful_stop()
                raise _Stopped
        except* _Stopped:
            pass
        finally:
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
        log.info("medlb stopped")
        return self.exit_code

    async def _graceful_stop(self) -> None:
        frontends = list(self.runtime.frontends.values())
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
