"""Balancing algorithms: who, among the candidate servers of a backend, takes the next session.

:func:`make_balancer` maps a backend's ``balance`` name to a fresh :class:`Balancer`; one instance per
backend, since some algorithms keep state (the round-robin rotation, the Maglev table).

Pure ring: nothing here imports asyncio, socket, time or uvloop.
"""

from __future__ import annotations

from random import Random

from medlb.balance.base import Balancer
from medlb.balance.first import First
from medlb.balance.hashing import SourceHash
from medlb.balance.leastconn import LeastConn
from medlb.balance.random import PowerOfTwo
from medlb.balance.roundrobin import RoundRobin

#: The ``balance`` names a backend may use.
BALANCE_NAMES = ("roundrobin", "leastconn", "source", "random", "first")


def make_balancer(name: str, rng: Random | None = None) -> Balancer:
    """A new balancer for ``name``; ``rng`` feeds ``random`` (default: a fresh ``Random()``).

    Raises ValueError for an unknown name.
    """
    if name == "roundrobin":
        return RoundRobin()
    if name == "leastconn":
        return LeastConn()
    if name == "source":
        return SourceHash()
    if name == "random":
        return PowerOfTwo(rng)
    if name == "first":
        return First()
    raise ValueError(f"unknown balance algorithm {name!r}; expected one of {', '.join(BALANCE_NAMES)}")


__all__ = [
    "BALANCE_NAMES",
    "Balancer",
    "First",
    "LeastConn",
    "PowerOfTwo",
    "RoundRobin",
    "SourceHash",
    "make_balancer",
]
