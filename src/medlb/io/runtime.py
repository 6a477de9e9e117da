"""The running balancer as one object: what the admin API, metrics and reload work on.

The supervisor builds it from the configuration and changes it on reload; the
admin API reads it for status and metrics and changes servers through it.
It also owns the checker tasks, so a server added at runtime starts checking
at once and a removed one stops.

Counters stay plain attributes on the model objects (bumped on the data path);
this module only *reads* them, on scrape or on request, so observing medlb
costs the relay nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from medlb.checks.scheduler import ServerChecker
from medlb.config import Config, ServerConfig
from medlb.io.dicom import DicomSession
from medlb.io.frontend import Frontend
from medlb.io.hl7 import Hl7Session
from medlb.io.http import HttpPersistence, HttpSession
from medlb.io.session import TcpSession
from medlb.io.tls import ClientTls
from medlb.model.backend import Backend
from medlb.model.server import Server

log = logging.getLogger("medlb")


@dataclass
class Runtime:
    """Everything the running balancer is made of."""

    config: Config
    backends: dict[str, Backend] = field(default_factory=dict)
    frontends: dict[str, Frontend] = field(default_factory=dict)
    checkers: dict[Server, ServerChecker] = field(default_factory=dict)
    #: Frontends dropped by a reload whose sessions have not all ended yet.
    retired_frontends: list[Frontend] = field(default_factory=list)
    #: Servers removed by a reload or the API that still carry sessions (they drain).
    retired_servers: list[Server] = field(default_factory=list)
    #: Servers added through the API, by backend: a reload keeps them (see docs/operations.md).
    added: dict[tuple[str, str], ServerConfig] = field(default_factory=dict)
    #: Offset from the loop clock to wall-clock time, for timestamps people read.
    epoch_offset: float = 0.0
    started_at: float = field(default_factory=time.time)
    reloads: int = 0
    #: TLS towards servers, by backend name; every frontend holds this same dict.
    backend_tls: dict[str, ClientTls] = field(default_factory=dict)
    #: Persistence rules by backend name; every frontend holds this same dict.
    persistence: dict[str, HttpPersistence] = field(default_factory=dict)
    #: False in a worker process of ``global.workers``: the main process checks the servers.
    run_checks: bool = True
    #: In a worker process: where passive observations go instead (the main process's checker).
    peer_observer: Callable[[Server, bool], None] | None = None
    #: In the main process with workers: closes a server's sessions in the workers too and
    #: returns how many they last reported.
    peer_shutdown: Callable[[Server, str], int] | None = None
    #: In the main process with workers: how old a state change must be before the workers'
    #: reports surely reflect it (two report intervals); 0 without workers.
    peer_lag: float = 0.0
    #: In the main process with workers: returns once every worker has applied the changes
    #: made so far (the admin API awaits it before answering a change).
    peer_sync: Callable[[], Awaitable[None]] | None = None
    _group: asyncio.TaskGroup | None = None
    _tasks: dict[Server, tuple[asyncio.Task[None], asyncio.Task[None]]] = field(default_factory=dict)

    # -- passive observation (the frontends' ConnectObserver) -----------------------------

    def report_connect_error(self, server: Server) -> None:
        if self.peer_observer is not None:
            self.peer_observer(server, False)
            return
        checker = self.checkers.get(server)
        if checker is not None:
            checker.report_connect_error()

    def report_connect_ok(self, server: Server) -> None:
        if self.peer_observer is not None:
            self.peer_observer(server, True)
            return
        if server.consecutive_errors:
            checker = self.checkers.get(server)
            if checker is not None:
                checker.report_connect_ok()

    # -- time -------------------------------------------------------------------------------

    def wall(self, loop_time: float) -> float:
        """A loop-clock timestamp as Unix time."""
        return loop_time + self.epoch_offset

    # -- checker tasks ------------------------------------------------------------------------

    def attach_group(self, group: asyncio.TaskGroup) -> None:
        """Start every checker in ``group``; later checkers start there too."""
        self._group = group
        for server, checker in self.checkers.items():
            self._spawn(server, checker)

    def start_checker(self, server: Server, checker: ServerChecker) -> None:
        self.stop_checker(server)
        self.checkers[server] = checker
        if self._group is not None:
            self._spawn(server, checker)

    def stop_checker(self, server: Server) -> None:
        self.checkers.pop(server, None)
        tasks = self._tasks.pop(server, None)
        if tasks is not None:
            for task in tasks:
                task.cancel()

    def _spawn(self, server: Server, checker: ServerChecker) -> None:
        assert self._group is not None
        if not self.run_checks:
            return
        self._tasks[server] = (
            self._group.create_task(checker.run(), name=f"check {server.key}"),
            self._group.create_task(checker.run_agent(), name=f"agent {server.key}"),
        )

    # -- lookups ------------------------------------------------------------------------------

    def all_frontends(self) -> list[Frontend]:
        return [*self.frontends.values(), *self.retired_frontends]

    def sessions(self) -> Iterator[TcpSession | HttpSession | DicomSession | Hl7Session]:
        for frontend in self.all_frontends():
            yield from frontend.sessions

    def sessions_of(self, server: Server) -> list[TcpSession | HttpSession | DicomSession | Hl7Session]:
        return [s for s in self.sessions() if s.server is server]

    def live_bytes(self) -> dict[Server, tuple[int, int]]:
        """Bytes (client->server, server->client) of every server, live sessions included.

        Finished sessions are already in ``server.bytes_in/out``; running ones
        are read from their relay, so a 2 GB study transfer shows up while it
        moves rather than when it ends.
        """
        out: dict[Server, tuple[int, int]] = {}
        for backend in self.backends.values():
            for server in backend.servers:
                out[server] = (server.bytes_in, server.bytes_out)
        for server in self.retired_servers:
            out[server] = (server.bytes_in, server.bytes_out)
        for session in self.sessions():
            live = session.server
            if live is None:
                continue
            if isinstance(session, DicomSession):
                # An association relays through asyncio transports and counts its own bytes.
                c2s, s2c = session.bytes_in, session.bytes_out
            else:
                relay = session.relay
                if relay is None or relay.closed:
                    continue
                c2s, s2c = relay.bytes_c2s, relay.bytes_s2c
            b_in, b_out = out.get(live, (live.bytes_in, live.bytes_out))
            out[live] = (b_in + c2s, b_out + s2c)
        return out

    def shutdown_sessions(self, server: Server, cause: str) -> int:
        """Close every session on ``server`` the way its protocol requires; return how many.

        TCP sessions get a RST on both sides (never a FIN that could pass for a
        complete transfer); protocol modes override ``abort`` (DICOM: A-ABORT).
        """
        victims = self.sessions_of(server)
        for session in victims:
            session.abort(cause)
        if victims:
            log.warning("server %s: %d session(s) closed (%s)", server.key, len(victims), cause)
        peers = self.peer_shutdown(server, cause) if self.peer_shutdown is not None else 0
        return len(victims) + peers

    def prune(self) -> None:
        """Forget retired frontends and servers whose last session has ended.

        Called on every status read, metrics scrape, history sample and reload, so
        the lists stay as short as the sessions still draining.
        """
        keep: list[Frontend] = []
        for frontend in self.retired_frontends:
            if frontend.sessions:
                keep.append(frontend)
            else:
                frontend.stop_sweeper()  # nothing left to sweep; let it be collected
        self.retired_frontends = keep
        self.retired_servers = [s for s in self.retired_servers if s.cur_sessions > 0]
