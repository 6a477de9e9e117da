"""A backend at runtime: which server takes the next session, and the queue.

The selection rule, in order (HAProxy's, see ``backend-t.h``):

1. Candidates are the *usable* primaries (op UP, admin READY, weight > 0).
   Backup servers are considered only when no primary is usable at all.
2. Servers at ``maxconn`` are skipped; if every usable server is full, the
   session waits in the backend queue (bounded by ``maxqueue`` and
   ``timeouts.queue``) instead of overloading a PACS node.
3. Servers that already failed this session's connect are excluded on retry
   when ``redispatch`` is on.
4. The balancing algorithm picks among the remaining candidates.

The queue itself is a FIFO of opaque waiters; the I/O ring owns their timers
and calls :meth:`Backend.dispatch_queue` whenever a slot frees up.

Pure ring: time comes in as ``now``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Protocol

from medlb.balance.base import Balancer
from medlb.model.server import Server

log = logging.getLogger("medlb.state")


class Waiter(Protocol):
    """A queued session. ``grant`` hands it a server whose slot is already taken."""

    cancelled: bool
    key: bytes | None

    def grant(self, server: Server) -> None: ...


@dataclass(frozen=True, slots=True)
class BackendPolicy:
    """The per-backend knobs that govern connection attempts and queueing."""

    retries: int = 2
    redispatch: bool = True
    maxqueue: int = 0  # 0: unbounded (still bounded by the frontends' maxconn)
    proxy_protocol: str = "none"


class Backend:
    """Servers in config order, their balancer, and the queue."""

    __slots__ = (
        "_dispatch_again",
        "_dispatching",
        "_usable_cache",
        "balancer",
        "clock",
        "connect_errors",
        "cur_sessions",
        "name",
        "no_server",
        "peer_sessions",
        "policy",
        "queue",
        "queue_full",
        "queue_timeouts",
        "servers",
        "state_listeners",
        "total_sessions",
    )

    def __init__(
        self,
        name: str,
        servers: list[Server],
        balancer: Balancer,
        policy: BackendPolicy,
        clock: Callable[[], float],
    ) -> None:
        self.name = name
        self.servers = servers
        self.balancer = balancer
        self.policy = policy
        self.clock = clock
        self.queue: deque[Waiter] = deque()
        self.state_listeners: list[Callable[[Server, str, str], None]] = []
        self._usable_cache: list[Server] | None = None
        self._dispatching = False
        self._dispatch_again = False
        self.cur_sessions = 0
        #: ``global.workers``: the worker processes' sessions, as last reported (see Server).
        self.peer_sessions = 0
        self.total_sessions = 0
        self.no_server = 0
        self.queue_full = 0
        self.queue_timeouts = 0
        self.connect_errors = 0
        for server in servers:
            self.attach(server)

    @property
    def all_sessions(self) -> int:
        """Sessions of this backend in every process."""
        return self.cur_sessions + self.peer_sessions

    # -- membership ---------------------------------------------------------------------

    def attach(self, server: Server) -> None:
        server.backend_name = self.name
        server.listeners.append(self._on_server_change)
        if server not in self.servers:
            self.servers.append(server)
        self._changed()

    def detach(self, server: Server) -> None:
        if self._on_server_change in server.listeners:
            server.listeners.remove(self._on_server_change)
        if server in self.servers:
            self.servers.remove(server)
        self._changed()

    def reconfigure(self, servers: list[Server], balancer: Balancer, policy: BackendPolicy) -> list[Server]:
        """Take a reloaded server list, algorithm and policy; return the servers dropped.

        Surviving :class:`Server` objects are passed in again (same identity), so
        their health, admin state and counters carry over. Dropped servers are
        detached from selection but keep their sessions, which release their slot
        as usual when they end (the server drains).
        """
        keep = set(servers)
        dropped = [s for s in self.servers if s not in keep]
        for server in dropped:
            if self._on_server_change in server.listeners:
                server.listeners.remove(self._on_server_change)
        for server in servers:
            server.backend_name = self.name
            if self._on_server_change not in server.listeners:
                server.listeners.append(self._on_server_change)
        self.servers = list(servers)
        self.balancer = balancer
        self.policy = policy
        self._changed()
        if self.queue:
            self.dispatch_queue()
        return dropped

    def server(self, name: str) -> Server | None:
        for server in self.servers:
            if server.name == name:
                return server
        return None

    def _on_server_change(self, server: Server, what: str, cause: str) -> None:
        log.warning("server %s %s (%s)", server.key, what, cause)
        was_available = self._usable_cache is None or bool(self._usable_cache)
        self._changed()
        if was_available and not self.usable():
            log.error("backend %s has no usable server", self.name)
        for listener in self.state_listeners:
            listener(server, what, cause)
        # A server that became usable (or got a higher maxconn) may serve the queue.
        if self.queue:
            self.dispatch_queue()

    def _changed(self) -> None:
        self._usable_cache = None
        self.balancer.rebuild(self.usable(), self.clock())

    # -- selection ----------------------------------------------------------------------

    def usable(self) -> list[Server]:
        """The tier that takes new sessions: usable primaries, else usable backups."""
        cached = self._usable_cache
        if cached is None:
            primaries = [s for s in self.servers if not s.backup and s.usable]
            cached = primaries or [s for s in self.servers if s.backup and s.usable]
            self._usable_cache = cached
        return cached

    def select(self, key: bytes | None = None, exclude: Collection[Server] = ()) -> Server | None:
        """Pick a server for a new session and take its slot, or return None.

        None means either nothing is usable or every usable server is full; the
        caller tells them apart with :meth:`saturated` to decide between
        refusing and queueing.
        """
        usable = self.usable()
        if exclude:
            candidates = [s for s in usable if not s.full and s not in exclude]
            if not candidates:
                # Every server of the tier failed this session: try the backups
                # next, and only then retry one that failed (better than refusing).
                candidates = [s for s in self.servers if s.backup and s.usable and not s.full and s not in exclude] or [
                    s for s in usable if not s.full
                ]
        else:
            candidates = [s for s in usable if not s.full]
        if not candidates:
            return None
        server = self.balancer.pick(candidates, self.clock(), key)
        if server is not None:
            self.take(server)
        return server

    def saturated(self) -> bool:
        """True when servers are usable but all are at ``maxconn``: queue, don't refuse."""
        usable = self.usable()
        return bool(usable) and all(s.full for s in usable)

    def can_queue(self) -> bool:
        return self.policy.maxqueue == 0 or len(self.queue) < self.policy.maxqueue

    @staticmethod
    def take(server: Server) -> None:
        server.cur_sessions += 1
        server.total_sessions += 1
        if server.shared is not None:
            server.shared.add(1)

    def release(self, server: Server) -> None:
        """A session left ``server``: free the slot and serve the queue."""
        server.cur_sessions -= 1
        if server.shared is not None:
            server.shared.add(-1)
        if self.queue:
            self.dispatch_queue()

    def dispatch_queue(self) -> None:
        """Grant servers to queued sessions, oldest first, while slots are free.

        Not re-entrant on purpose: a grant whose connect fails at once releases
        its slot, which calls back here; the nested call only asks the running
        loop for another pass. Recursing instead would nest one level per waiter
        and overflow the stack with a few hundred queued sessions.
        """
        if self._dispatching:
            self._dispatch_again = True
            return
        self._dispatching = True
        try:
            again = True
            while again:
                self._dispatch_again = False
                self._dispatch_pass()
                again = self._dispatch_again
        finally:
            self._dispatching = False

    def _dispatch_pass(self) -> None:
        queue = self.queue
        while queue:
            head = queue[0]
            if head.cancelled:
                queue.popleft()
                continue
            server = self.select(head.key)
            if server is None:
                return
            queue.popleft()
            head.grant(server)
