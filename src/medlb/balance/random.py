"""``random``: the power of two choices.

Theory of operation (Mitzenmacher, "The Power of Two Choices in Randomized Load Balancing", IEEE TPDS
12(10), 2001; HAProxy's ``balance random(2)``, its default number of draws): draw two distinct
candidates at random, weighted by effective weight, and keep the one with the lower load
``node_sessions / effective_weight`` (every process's sessions with ``global.workers``). Purely
random placement leaves the busiest of n servers about ``log n / log log n`` above the mean; a
second draw brings that down to ``log log n``, exponentially better, while needing no shared
rotation state. That makes it the algorithm of choice when several processes balance the same pool
without talking to each other (one medlb worker per core).

On a tie (typically both idle) the first draw wins, so on an idle pool the share of each server is
exactly its weight's share.

The random source is an injected :class:`random.Random`, so tests seed it and production may share
one per worker.

Pure ring: no clock; ``now`` is passed in.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from itertools import accumulate
from random import Random

from medlb.balance.base import Balancer
from medlb.model.server import Server


class PowerOfTwo(Balancer):
    """Two weighted random draws, the less loaded one wins."""

    name = "random"

    __slots__ = ("_rng",)

    def __init__(self, rng: Random | None = None) -> None:
        self._rng = rng if rng is not None else Random()

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        n = len(candidates)
        if n < 2:
            return candidates[0] if n else None
        # One effective_weight() call per candidate, running sums built in C by accumulate, then two
        # bisections: O(n) with a small constant; the weights of the two drawn servers are read back
        # from the sums instead of being recomputed.
        cumulative = list(accumulate([s.effective_weight(now) for s in candidates]))
        total = cumulative[-1]
        rng = self._rng
        if total <= 0.0:
            # Every candidate at effective weight 0 (agent at 0%): no load ratio to compare; one
            # uniform draw keeps them all in service.
            i = rng.randrange(n)
            return candidates[i]
        i = min(bisect_right(cumulative, rng.random() * total), n - 1)
        low = cumulative[i - 1] if i else 0.0
        weight_i = cumulative[i] - low
        rest = total - weight_i
        if rest <= 0.0:
            return candidates[i]  # nobody else has any weight
        # Draw from the others by skipping over i's slice of [0, total).
        r = rng.random() * rest
        if r >= low:
            r += weight_i
        j = min(bisect_right(cumulative, r), n - 1)
        if j == i:  # float rounding at a slice edge; never return i twice
            j = i + 1 if i + 1 < n else i - 1
        weight_j = cumulative[j] - (cumulative[j - 1] if j else 0.0)
        first, second = candidates[i], candidates[j]
        # Compare cur_i / w_i with cur_j / w_j without dividing (both weights are >= 0; a zero
        # weight j, only reachable through the rounding guard above, never wins).
        if weight_j > 0.0 and second.node_sessions * weight_i < first.node_sessions * weight_j:
            return second
        return first
