"""``leastconn``: weighted least connections.

Theory of operation (HAProxy's ``leastconn`` and nginx's ``least_conn``): choose the candidate that
minimises ``(cur_sessions + 1) / effective_weight``, i.e. the server whose load would be lowest *after*
taking this session. The ``+ 1`` is what makes weights matter on an idle pool: with no sessions
anywhere, a server of weight 3 scores 1/3 and wins over a server of weight 1, and it keeps winning
until it holds three times as many sessions.

Ties (equal servers, typically all idle) are broken round robin: the scan starts just after the
server chosen last time, so equal servers share evenly instead of the first in config order taking
every session until its count rises. This matters for DICOM and HL7, where associations are long and
few, so "first wins ties" would pile a burst of new associations onto one server.

The effective weight comes from :meth:`Server.effective_weight` (slow-start ramp, agent percentage).
A candidate at effective weight 0 (agent at 0%) is chosen only when every candidate is.

Pure ring: no clock; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from medlb.balance.base import Balancer
from medlb.model.server import Server


class LeastConn(Balancer):
    """Weighted least connections with round-robin tie breaking."""

    name = "leastconn"

    __slots__ = ("_start",)

    def __init__(self) -> None:
        self._start = 0

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        n = len(candidates)
        if n == 0:
            return None
        start = self._start % n
        best_index = -1
        best_load = 0.0
        # One pass, starting after last time's winner; strict "<" keeps the first minimum met in
        # rotation order, which is the round-robin tie break.
        for offset in range(n):
            index = start + offset
            if index >= n:
                index -= n
            server = candidates[index]
            weight = server.effective_weight(now)
            if weight <= 0.0:
                continue
            load = (server.node_sessions + 1) / weight
            if best_index < 0 or load < best_load:
                best_index = index
                best_load = load
        if best_index < 0:
            best_index = start  # every candidate at weight 0: plain rotation
        self._start = best_index + 1
        return candidates[best_index]
