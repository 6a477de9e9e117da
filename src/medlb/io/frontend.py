"""Frontends and their listeners: accept connections, enforce ``maxconn``.

The accept loop follows trio's ``_highlevel_serve_listeners``: accept in
batches while the kernel has connections ready, and when the process runs out
of file descriptors (EMFILE/ENFILE) or memory, log once, pause accepting for a
moment and carry on; the connections wait in the kernel backlog instead of the
process dying. When a frontend reaches ``maxconn`` it stops accepting until a
session ends (HAProxy's behaviour), which keeps memory bounded under a flood.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, Protocol

from medlb.config import HostPort, ResolvedTimeouts
from medlb.errors import StartupError
from medlb.io.dicom import DicomSession, DicomSettings
from medlb.io.hl7 import Hl7Session, Hl7Settings, Hl7State
from medlb.io.http import HttpPersistence, HttpSession, HttpSettings, Pools
from medlb.io.session import TcpSession
from medlb.io.tls import ClientTls
from medlb.model.backend import Backend
from medlb.model.server import Server

log = logging.getLogger("medlb.frontend")

#: Connections accepted per wake-up before yielding to the loop (fairness
#: between listeners and sessions under a connection storm).
ACCEPT_BATCH = 64
#: Pause after fd/memory exhaustion before accepting again.
ACCEPT_BACKOFF = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class ConnectObserver(Protocol):
    """Passive observation: live-traffic connect results go to the server's checker."""

    def report_connect_error(self, server: Server) -> None: ...

    def report_connect_ok(self, server: Server) -> None: ...


class NullObserver:
    def report_connect_error(self, server: Server) -> None:
        pass

    def report_connect_ok(self, server: Server) -> None:
        pass


def open_listener(address: HostPort, backlog: int, *, reuseport: bool = False, join: bool = False) -> socket.socket:
    """Bind a listening socket; raise :class:`StartupError` with a clear message.

    ``reuseport``: SO_REUSEPORT, so that the worker processes of ``global.workers``
    each bind the same address and the kernel spreads new connections over them.
    Unless ``join`` (a worker joining its main process's port), the address is first
    bound without it: a second medlb started by hand must get "address already in
    use", not a silent share of the port's connections.
    """
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"cannot bind {address}: cannot resolve {address.host!r} ({exc.strerror})") from None
    family, _, _, _, sockaddr = infos[0]
    if reuseport and not join and address.port != 0:
        _probe(address, family, sockaddr)
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise StartupError(f"cannot bind {address}: cannot create a socket ({exc.strerror})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        # Accepted sockets inherit TCP_NODELAY from the listener on Linux, which
        # saves a setsockopt per connection (tests/io check the inheritance).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot bind {address}: address already in use") from None
        if exc.errno == errno.EACCES:
            raise StartupError(f"cannot bind {address}: permission denied (ports below 1024 need root)") from None
        raise StartupError(f"cannot bind {address}: {exc.strerror}") from None
    return sock


def _probe(address: HostPort, family: int, sockaddr: Any) -> None:
    """Fail like a plain bind would when anyone (SO_REUSEPORT or not) holds ``address``."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind(sockaddr)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise StartupError(f"cannot bind {address}: address already in use") from None


class Listener:
    """One bound socket of a frontend."""

    __slots__ = ("_active", "_backoff", "bind", "family", "frontend", "loop", "proto", "sock", "type")

    def __init__(self, frontend: Frontend, sock: socket.socket, bind: HostPort | None = None) -> None:
        self.frontend = frontend
        #: The configured address (port 0 stays 0): what a reload compares.
        self.bind = bind
        self.loop = frontend.loop
        self.sock = sock
        self.family, self.type, self.proto = sock.family, sock.type, sock.proto
        self._active = False
        self._backoff: asyncio.TimerHandle | None = None

    @property
    def address(self) -> tuple[str, int]:
        name = self.sock.getsockname()
        return (name[0], name[1])

    def resume(self) -> None:
        if not self._active and self.sock.fileno() >= 0:
            self._active = True
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def pause(self) -> None:
        if self._active:
            self._active = False
            self.loop.remove_reader(self.sock.fileno())

    def close(self) -> None:
        self.pause()
        if self._backoff is not None:
            self._backoff.cancel()
            self._backoff = None
        self.sock.close()

    def _resume_after_backoff(self) -> None:
        self._backoff = None
        if not self.frontend.full:
            self.resume()

    def _accept(self) -> None:
        frontend = self.frontend
        # socket.accept() re-derives family/type through enum conversions on every
        # call; _accept() plus a socket built from cached values does the same work.
        accept = self.sock._accept  # type: ignore[attr-defined]  # CPython API, stable since 3.0
        family, type_, proto = self.family, self.type, self.proto
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
                conn = socket.socket(family, type_, proto, fileno=fd)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    log.error(
                        "frontend %s: cannot accept (%s); pausing %.0f ms",
                        frontend.name,
                        exc.strerror,
                        1e3 * ACCEPT_BACKOFF,
                    )
                    self.pause()
                    self._backoff = self.loop.call_later(ACCEPT_BACKOFF, self._resume_after_backoff)
                    return
                log.warning("frontend %s: accept failed: %s", frontend.name, exc.strerror)
                return
            conn.setblocking(False)
            frontend.accepted(conn, addr)
            if frontend.full:
                return


class Frontend:
    """A named entry point: listeners, limits, and the backend it feeds."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        name: str,
        backend: Backend,
        *,
        maxconn: int,
        timeouts: ResolvedTimeouts,
        observer: ConnectObserver | None = None,
        splice: bool = True,
        log_sessions: bool = True,
        http: HttpSettings | None = None,
        dicom: DicomSettings | None = None,
        hl7: Hl7Settings | None = None,
        hl7_state: Hl7State | None = None,
    ) -> None:
        self.loop = loop
        #: ``mode: hl7`` settings and what its sessions share (ordering, dedup, server connections).
        self.hl7 = hl7
        self.hl7_state = hl7_state
        #: ``mode: http`` settings; None for the other modes.
        self.http = http
        #: ``mode: dicom`` settings; None for the other modes.
        self.dicom = dicom
        #: Keep-alive connections to servers, shared by this frontend's HTTP sessions.
        self.pools = Pools()
        #: TLS towards servers, by backend name (shared with the runtime, updated on reload).
        self.backend_tls: dict[str, ClientTls] = {}
        #: Every backend by name, for routing rules (the runtime's own dict, so reloads show).
        self.backends: dict[str, Backend] = {backend.name: backend}
        #: Persistence rules, by backend name (shared with the runtime, updated on reload).
        self.persistence: dict[str, HttpPersistence] = {}
        #: ``global.workers``: tells the other processes of a stick-table entry (backend, key, server).
        self.stick_peer: Callable[[str, bytes, str], None] | None = None
        self.name = name
        self.backend = backend
        self.maxconn = maxconn
        self.timeouts = timeouts
        # One idle limit for the session: a relay moves bytes both ways, so idleness
        # of either side is idleness of the session (see docs/configuration.md).
        self.idle_timeout = min(timeouts.client, timeouts.server)
        self.observer: ConnectObserver = observer or NullObserver()
        self.splice = splice
        self.log_sessions = log_sessions
        self.listeners: list[Listener] = []
        self.sessions: set[TcpSession | HttpSession | DicomSession | Hl7Session] = set()
        self.total_sessions = 0
        #: ``global.workers``: the sessions the other processes hold (the main process's view).
        self.peer_sessions = 0
        self.stopping = False
        self.idle_event = asyncio.Event()
        self.idle_event.set()
        # One sweeper per frontend enforces the idle timeout of all its sessions:
        # a quarter of the timeout between passes, at least 50 ms, at most 1 s.
        self.sweep_interval = min(max(self.idle_timeout / 4, 0.05), 1.0)
        self._sweeper: asyncio.TimerHandle | None = None
        if self.idle_timeout > 0:
            self._sweeper = loop.call_later(self.sweep_interval, self._sweep)

    @property
    def mode(self) -> str:
        if self.http is not None:
            return "http"
        if self.dicom is not None:
            return "dicom"
        return "hl7" if self.hl7 is not None else "tcp"

    @property
    def cur_sessions(self) -> int:
        """Sessions of this process, plus those the worker processes last reported."""
        return len(self.sessions) + self.peer_sessions

    @property
    def full(self) -> bool:
        return len(self.sessions) >= self.maxconn

    def add_listener(self, sock: socket.socket, bind: HostPort | None = None) -> Listener:
        listener = Listener(self, sock, bind)
        self.listeners.append(listener)
        if not self.full:
            listener.resume()
        return listener

    def reconfigure(
        self,
        backend: Backend,
        *,
        maxconn: int,
        timeouts: ResolvedTimeouts,
        splice: bool,
        http: HttpSettings | None = None,
        dicom: DicomSettings | None = None,
        hl7: Hl7Settings | None = None,
        hl7_state: Hl7State | None = None,
    ) -> None:
        """Apply a reloaded configuration; listeners and running sessions are untouched.

        Sessions keep the backend they started on (``TcpSession.backend``); only
        new sessions see the new backend, limits and timeouts.
        """
        self.backend = backend
        self.http = http
        self.dicom = dicom
        self.hl7 = hl7
        if hl7 is not None and self.hl7_state is None:
            self.hl7_state = hl7_state
        self.timeouts = timeouts
        self.splice = splice
        self.idle_timeout = min(timeouts.client, timeouts.server)
        self.sweep_interval = min(max(self.idle_timeout / 4, 0.05), 1.0)
        if self._sweeper is None and self.idle_timeout > 0 and not self.stopping:
            self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        was_full = self.full
        self.maxconn = maxconn
        if self.stopping:
            return
        if self.full and not was_full:
            for listener in self.listeners:
                listener.pause()
        elif was_full and not self.full:
            for listener in self.listeners:
                listener.resume()

    def remove_listener(self, listener: Listener) -> None:
        listener.close()
        self.listeners.remove(listener)

    def detach_listener(self, listener: Listener) -> None:
        """Take a listener away without closing its socket (a reload moves it elsewhere)."""
        listener.pause()
        self.listeners.remove(listener)

    def adopt_listener(self, listener: Listener) -> None:
        """Serve a listener that another frontend detached; its socket never closed."""
        listener.frontend = self
        self.listeners.append(listener)
        if not self.full and not self.stopping:
            listener.resume()

    def stop_sweeper(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def accepted(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        session: TcpSession | HttpSession | DicomSession | Hl7Session
        if self.http is not None:
            session = HttpSession(self, conn, addr)
        elif self.dicom is not None:
            session = DicomSession(self, conn, addr)
        elif self.hl7 is not None:
            session = Hl7Session(self, conn, addr)
        else:
            session = TcpSession(self, conn, addr)
        self.sessions.add(session)
        self.total_sessions += 1
        self.backend.total_sessions += 1
        self.backend.cur_sessions += 1
        self.idle_event.clear()
        if self.full:
            for listener in self.listeners:
                listener.pause()
        session.start()

    def session_ended(self, session: TcpSession | HttpSession | DicomSession | Hl7Session) -> None:
        sessions = self.sessions
        was_full = len(sessions) >= self.maxconn
        sessions.discard(session)
        session.backend.cur_sessions -= 1
        if was_full and not self.stopping and len(sessions) < self.maxconn:
            for listener in self.listeners:
                listener.resume()
        if not sessions:
            self.idle_event.set()

    def _sweep(self) -> None:
        # Re-arm first: a failure below must never switch idle timeouts off.
        if self.idle_timeout <= 0:
            self._sweeper = None
            return
        self._sweeper = self.loop.call_later(self.sweep_interval, self._sweep)
        now = self.loop.time()
        idle = self.idle_timeout
        for session in list(self.sessions):
            relay = session.relay
            if relay is not None and not relay.closed:
                try:
                    relay.sweep(now, idle)
                except Exception:
                    log.exception("frontend %s: idle sweep of a session failed", self.name)

    def close_listeners(self) -> None:
        """Stop accepting (graceful stop, first step); sessions keep running."""
        self.stopping = True
        for listener in self.listeners:
            listener.close()
        # HTTP keep-alive and MLLP connections: idle ones close now, busy ones once answered.
        for session in list(self.sessions):
            if isinstance(session, HttpSession | Hl7Session):
                session.drain()

    def abort_sessions(self, cause: str) -> int:
        """Close every session now (hard stop) and stop the sweeper. Returns how many were closed."""
        self.stop_sweeper()
        sessions = list(self.sessions)
        for session in sessions:
            session.abort(cause)
        self.pools.close()
        if self.hl7_state is not None:
            self.hl7_state.close()
        return len(sessions)
