"""Status documents: the runtime as JSON for the API, the dashboard and ``medlb ctl``.

Everything here *reads* the runtime; nothing is counted for it. Times are
Unix seconds (people and scripts compare them with wall clocks), converted
from the loop clock the model uses.
"""

from __future__ import annotations

import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from medlb import __version__
from medlb.io.frontend import Frontend
from medlb.io.runtime import Runtime
from medlb.model.backend import Backend
from medlb.model.server import Server

NODE = socket.gethostname()


def server_doc(
    runtime: Runtime, server: Server, now: float, live: tuple[int, int], *, retired: bool = False
) -> dict[str, Any]:
    check = server.last_check
    return {
        "name": server.name,
        "address": str(server.address),
        "op_state": server.op_state.name,
        "admin_state": server.admin_state.value,
        "admin_source": server.admin_source,
        "backup": server.backup,
        "weight": server.weight,
        "effective_weight": round(server.effective_weight(now), 3),
        "cur_sessions": server.all_sessions,
        "maxconn": server.maxconn,
        "total_sessions": server.total_sessions,
        "bytes_in": live[0],
        "bytes_out": live[1],
        "connect_errors": server.connect_errors,
        "retries": server.retries,
        "redispatches": server.redispatches,
        "state_changes": server.state_changes,
        "dimse": {"requests": dict(server.dimse_requests), "responses": dict(server.dimse_responses)},
        "hl7": {"messages": dict(server.hl7_messages), "acks": dict(server.hl7_acks)},
        "last_check": None
        if check is None
        else {
            "ok": check.ok,
            "text": check.text,
            "at": round(runtime.wall(check.at), 3),
            "duration_ms": round(check.duration * 1000.0, 3),
        },
        "last_change": round(runtime.wall(server.last_change), 3),
        "retired": retired,
    }


def backend_doc(runtime: Runtime, backend: Backend, live: dict[Server, tuple[int, int]]) -> dict[str, Any]:
    now = backend.clock()
    servers = [server_doc(runtime, s, now, live.get(s, (s.bytes_in, s.bytes_out))) for s in backend.servers]
    servers += [
        server_doc(runtime, s, now, live.get(s, (s.bytes_in, s.bytes_out)), retired=True)
        for s in runtime.retired_servers
        if s.backend_name == backend.name
    ]
    usable = backend.usable()
    return {
        "name": backend.name,
        "balance": backend.balancer.name,
        "up": bool(usable),
        "usable_servers": len(usable),
        "cur_sessions": backend.all_sessions,
        "total_sessions": backend.total_sessions,
        "queue": len(backend.queue),
        "no_server": backend.no_server,
        "queue_full": backend.queue_full,
        "queue_timeouts": backend.queue_timeouts,
        "connect_errors": backend.connect_errors,
        "bytes_in": sum(s["bytes_in"] for s in servers),
        "bytes_out": sum(s["bytes_out"] for s in servers),
        "servers": servers,
    }


def frontend_doc(frontend: Frontend, rate: float) -> dict[str, Any]:
    return {
        "name": frontend.name,
        "mode": frontend.mode,
        "binds": [_fmt(listener.address) for listener in frontend.listeners if listener.sock.fileno() >= 0],
        "default_backend": frontend.backend.name,
        "cur_sessions": frontend.cur_sessions,
        "total_sessions": frontend.total_sessions,
        "maxconn": frontend.maxconn,
        "session_rate": round(rate, 3),
    }


def _fmt(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """Fixed-size rings of samples for the dashboard's 15-minute charts.

    One sample every ``interval`` seconds, kept for ``window`` seconds: at the
    defaults (5 s, 15 min) 180 points per series, a few KB per server.
    Rates are differences of the counters between two samples.
    """

    interval: float = 5.0
    window: float = 900.0
    times: deque[float] = field(default_factory=deque)
    series: dict[tuple[str, str, str], deque[float | None]] = field(default_factory=dict)
    _last: dict[tuple[str, str, str], float] = field(default_factory=dict)
    _last_time: float | None = None

    @property
    def size(self) -> int:
        return max(int(self.window / self.interval), 1)

    def sample(self, runtime: Runtime, at: float | None = None) -> None:
        at = time.time() if at is None else at
        elapsed = at - self._last_time if self._last_time is not None else 0.0
        self._last_time = at
        seen: set[tuple[str, str, str]] = set()
        live = runtime.live_bytes()

        def put(key: tuple[str, str, str], value: float | None) -> None:
            ring = self.series.get(key)
            if ring is None:
                ring = deque([None] * len(self.times), maxlen=self.size)
                self.series[key] = ring
            ring.append(value)
            seen.add(key)

        def rate(key: tuple[str, str, str], counter: float) -> float | None:
            previous = self._last.get(key)
            self._last[key] = counter
            if previous is None or elapsed <= 0 or counter < previous:
                return None
            return (counter - previous) / elapsed

        for frontend in runtime.frontends.values():
            put(("frontends", frontend.name, "cur_sessions"), frontend.cur_sessions)
            put(("frontends", frontend.name, "session_rate"), rate(("f", frontend.name, "s"), frontend.total_sessions))
        for backend in runtime.backends.values():
            b_in = b_out = 0
            for server in backend.servers:
                s_in, s_out = live.get(server, (server.bytes_in, server.bytes_out))
                b_in += s_in
                b_out += s_out
                key = server.key
                put(("servers", key, "cur_sessions"), server.all_sessions)
                put(("servers", key, "bytes_in_rate"), rate(("s", key, "i"), s_in))
                put(("servers", key, "bytes_out_rate"), rate(("s", key, "o"), s_out))
            put(("backends", backend.name, "cur_sessions"), backend.all_sessions)
            put(("backends", backend.name, "bytes_in_rate"), rate(("b", backend.name, "i"), b_in))
            put(("backends", backend.name, "bytes_out_rate"), rate(("b", backend.name, "o"), b_out))

        if len(self.times) == self.size:
            self.times.popleft()
        self.times.append(at)
        for series_key, ring in list(self.series.items()):
            if series_key not in seen:
                if all(v is None for v in ring):
                    del self.series[series_key]  # gone for a whole window: forget it
                    continue
                ring.append(None)
            while len(ring) > len(self.times):
                ring.popleft()

    def rate_of(self, section: str, name: str, metric: str) -> float:
        ring = self.series.get((section, name, metric))
        if not ring or ring[-1] is None:
            return 0.0
        return float(ring[-1])

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "interval_s": self.interval,
            "window_s": self.window,
            "t": [round(t, 3) for t in self.times],
            "frontends": {},
            "backends": {},
            "servers": {},
        }
        for (section, name, metric), ring in self.series.items():
            out[section].setdefault(name, {})[metric] = [None if v is None else round(v, 3) for v in ring]
        return out


def status_doc(
    runtime: Runtime, history: History, *, config_path: str, last_reload: dict[str, Any] | None
) -> dict[str, Any]:
    runtime.prune()
    live = runtime.live_bytes()
    return {
        "node": NODE,
        "version": __version__,
        "now": round(time.time(), 3),
        "started_at": round(runtime.started_at, 3),
        "reloads": runtime.reloads,
        "config": {"path": config_path, "last_reload": last_reload},
        "frontends": [
            frontend_doc(f, history.rate_of("frontends", f.name, "session_rate")) for f in runtime.frontends.values()
        ],
        "backends": [backend_doc(runtime, b, live) for b in runtime.backends.values()],
    }
