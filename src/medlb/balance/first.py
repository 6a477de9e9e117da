"""``first``: the first candidate in config order (HAProxy's ``balance first``).

Candidates arrive in config order and already exclude servers at ``maxconn``, so this fills the first
server up to its ``maxconn`` before touching the next one. That is useful for license-limited or
power-managed servers: the later ones stay idle until the earlier ones are full. Without a
``maxconn`` it sends everything to the first usable server, which is the point of the algorithm, not
a bug; the backend validator may warn about it.

Pure ring: no clock; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

from medlb.balance.base import Balancer
from medlb.model.server import Server


class First(Balancer):
    """The first candidate, in config order."""

    name = "first"

    __slots__ = ()

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        return candidates[0] if candidates else None
