"""The balancing algorithm interface (HAProxy's ``lb_ops``, as a small class).

A :class:`Balancer` chooses one server among *candidates*: servers the backend
has already found usable (op UP, admin READY, weight > 0), below their
``maxconn`` and not excluded by a retry. The backend decides who is eligible;
the algorithm only decides who among them is next. Keeping that split means an
algorithm never has to know about admin states, backups or retries.

``rebuild`` is called whenever the *usable* set or a weight changes, so that
algorithms with precomputed tables (the Maglev table of ``source``) rebuild
them off the per-session path.

Pure ring: no asyncio, no sockets, no clock; ``now`` comes in as an argument.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from medlb.model.server import Server


class Balancer(ABC):
    """Chooses the next server. One instance per backend; not thread-safe."""

    #: True when the choice depends on a key (the client address) so the caller
    #: must pass one.
    needs_key = False
    #: The config name of the algorithm (``balance:``), for status output.
    name = ""

    def rebuild(self, usable: Sequence[Server], now: float) -> None:  # noqa: B027 - optional hook
        """The usable set or a weight changed. Default: nothing to precompute."""

    @abstractmethod
    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        """Return one of ``candidates`` (in config order), or None if it is empty."""
