"""``roundrobin``: smooth weighted round robin.

Theory of operation (nginx's smooth weighted round robin, ``ngx_http_upstream_get_peer`` in
``ngx_http_upstream_round_robin.c``, added in nginx 1.3.1):

- every server carries a *current* value, starting at 0;
- on each pick, every candidate's current grows by its effective weight, the candidate with the
  largest current is chosen, and the chosen one's current drops by the sum of the effective weights.

Over a fixed set with integer weights this hands out exactly ``weight`` picks per server in every
cycle of ``sum(weights)`` picks, and interleaves them (5,1,1 gives ``a a b a c a a``, not
``a a a a a b c``), so a heavy server never receives a burst of sessions back to back.

The effective weight comes from :meth:`Server.effective_weight`, so the slow-start ramp and the
agent's percentage apply from one pick to the next without a rebuild.

Changing candidate sets (a server full at ``maxconn``, or excluded by a retry) are handled as nginx
handles its skipped peers: an absent server neither gains nor loses, so it keeps its place and is
served first when it comes back; nobody who stays a candidate is starved. The state is a dict keyed
by the :class:`Server` object (identity hash) inside the balancer, never an attribute of the server,
because a server's place in one backend's rotation is this balancer's business.

Pure ring: no clock; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from medlb.balance.base import Balancer
from medlb.model.server import Server


class RoundRobin(Balancer):
    """Smooth weighted round robin (nginx)."""

    name = "roundrobin"

    __slots__ = ("_current", "_rotor")

    def __init__(self) -> None:
        self._current: dict[Server, float] = {}
        # Used only when every candidate has an effective weight of 0 (agent at 0%).
        self._rotor = 0

    def rebuild(self, usable: Sequence[Server], now: float) -> None:
        # Forget servers that left the usable set: a server that comes back starts from 0, as a new
        # nginx peer does, and removed servers (reload) do not leak. The choice only depends on
        # differences between currents, so dropping entries never disturbs the others' order.
        keep = set(usable)
        for server in [s for s in self._current if s not in keep]:
            del self._current[server]

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        # Hot path: one pass, one dict read and write per candidate, no allocation.
        current = self._current
        total = 0.0
        best: Server | None = None
        best_value = 0.0
        for server in candidates:
            weight = server.effective_weight(now)
            if weight <= 0.0:
                continue  # agent at 0%: no share while anyone else has one
            value = current.get(server, 0.0) + weight
            current[server] = value
            total += weight
            # Strict ">" keeps the first maximum in config order, as nginx does.
            if best is None or value > best_value:
                best = server
                best_value = value
        if best is None:
            if not candidates:
                return None
            self._rotor = (self._rotor + 1) % len(candidates)
            return candidates[self._rotor]
        current[best] = best_value - total
        return best
