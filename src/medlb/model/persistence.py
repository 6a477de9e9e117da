"""Persistence ("stickiness"): keep a client on the server it started with.

Three kinds, as Loadbalancer.org and HAProxy offer them:

- **cookie insert**: medlb adds a cookie naming the server. The value is an
  opaque digest of backend and server name, the same on every medlb node with
  the same configuration, so either node of a pair honours it with no shared
  state, and it reveals no address or name;
- **source**: the client address, remembered in a bounded stick table;
- **header**: the value of a request header (a study UID, a session header),
  remembered the same way.

A pinned server is used while it is UP and not in MAINT: DRAIN keeps honouring
persistence (a viewer session in progress finishes on its server) but takes no
new clients. When the pinned server is DOWN or in MAINT the request is balanced
normally and re-pinned to the server it lands on.

Pure ring: time is passed in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from medlb.model.server import AdminState, Server


def cookie_value(backend: str, server: str) -> str:
    """The opaque cookie value for ``backend/server`` (16 hex digits)."""
    return hashlib.sha256(f"medlb-persist:{backend}/{server}".encode()).hexdigest()[:16]


def _named(servers: list[Server], name: str | None) -> Server | None:
    if name is None:
        return None
    for server in servers:
        if server.name == name:
            return server
    return None


def honours(server: Server) -> bool:
    """A pinned server still takes its clients: UP, not in MAINT, weight > 0, not at maxconn."""
    return server.is_up and server.admin_state is not AdminState.MAINT and server.weight > 0 and not server.full


@dataclass
class StickTable:
    """Key -> server name, bounded in size and forgotten after ``idle`` seconds without use.

    The size bound evicts the least recently used entry, so a scan of random
    client addresses costs memory up to ``size`` entries and no more.
    """

    idle: float = 1800.0
    size: int = 100_000

    def __post_init__(self) -> None:
        #: key -> (server name, last use, last time the entry was shared with other processes)
        self._entries: OrderedDict[bytes, tuple[str, float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> str | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        name, seen, _ = entry
        if now - seen > self.idle:
            del self._entries[key]
            return None
        return name

    def put(self, key: bytes, server: str, now: float) -> bool:
        """Remember a use of ``key`` on ``server``; True when other processes should hear of it.

        That is when the entry is new or moved, or was last shared a quarter of the idle
        time ago: with ``global.workers`` each process holds its own table, and sharing
        uses keeps a client's entry alive in the processes its connections did not reach.
        """
        entries = self._entries
        entry = entries.get(key)
        share = entry is None or entry[0] != server or now - entry[2] >= self.idle / 4
        entries[key] = (server, now, now if share or entry is None else entry[2])
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)
        return share

    def snapshot(self, now: float) -> list[tuple[bytes, str, float]]:
        """The live entries and their ages, oldest use first: what a starting worker process learns."""
        return [(key, name, now - seen) for key, (name, seen, _) in self._entries.items() if now - seen <= self.idle]

    def learn(self, key: bytes, server: str, now: float) -> None:
        """Take an entry another process shared (the last one shared wins)."""
        entries = self._entries
        entries[key] = (server, now, now)
        entries.move_to_end(key)
        while len(entries) > self.size:
            entries.popitem(last=False)


@dataclass
class Persistence:
    """The persistence rule of one backend."""

    kind: str  # "cookie" | "source" | "header"
    backend: str
    cookie_name: bytes = b"MEDLBSRV"
    header_name: bytes = b""
    table: StickTable | None = None

    def __post_init__(self) -> None:
        self._by_value: dict[str, str] = {}

    def cookie_for(self, server: Server) -> str:
        value = cookie_value(self.backend, server.name)
        self._by_value[value] = server.name
        return value

    def server_for_cookie(self, value: str, servers: list[Server]) -> Server | None:
        name = self._by_value.get(value)
        if name is None:
            for server in servers:  # a cookie issued by the other node, or before a restart
                if cookie_value(self.backend, server.name) == value:
                    self._by_value[value] = server.name
                    name = server.name
                    break
        return _named(servers, name)

    def server_for_key(self, key: bytes, servers: list[Server], now: float) -> Server | None:
        assert self.table is not None
        return _named(servers, self.table.get(key, now))

    def remember(self, key: bytes, server: Server, now: float) -> bool:
        """Pin ``key`` to ``server``; True when other processes should hear of it (see put)."""
        assert self.table is not None
        return self.table.put(key, server.name, now)
