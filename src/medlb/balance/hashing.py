"""``source``: consistent hashing of a key (the client address) with a weighted Maglev table.

Its job: the same client lands on the same server for as long as that server is usable, and when
the usable set changes only the keys that must move do move. In imaging this is what keeps a
modality's associations, or a viewer's cached study, on one archive node.

Theory of operation (Eisenbud et al., "Maglev: A Fast and Reliable Software Network Load Balancer",
NSDI 2016, section 3.4 "Consistent Hashing"):

- Each server gets a permutation of the table slots from two hashes of its name:
  ``offset = h1 % M``, ``skip = h2 % (M - 1) + 1``, slot ``j`` is ``(offset + j * skip) % M``.
  ``M`` is prime, so every ``skip`` is coprime with it and every permutation covers the table.
- Servers take turns claiming their next free preferred slot until the table is full. Weights
  (section 3.4 leaves them as an extension; this is the scheme Envoy's Maglev uses) change only
  how often a server gets a turn: the heaviest server claims on every round, a server of half its
  weight on every other round, so table shares are proportional to configured weight.
- A lookup is one hash of the key and one list index.

Because each server's preferences do not depend on the others, removing one server mostly refills
its own slots and leaves the rest where they were (the paper measures this disruption; the tests
here bound it).

Design decisions:

- **Hash.** ``blake2b`` with an 8-byte digest, for both server names and keys: stable across
  processes and restarts (Python's ``hash()`` is salted per process, so two workers would disagree),
  well mixed even for keys that differ in one bit (neighbouring IPv4 addresses), and fast in C.
- **Table size.** The paper wants ``M`` well above ``100 * N`` for a per-server imbalance near 1%, and
  disruption shrinks as ``M`` grows: removing one of 2-10 servers moved at most ~6% of the other
  servers' keys with ``M = 4093``, ~1% with ``16381`` and ~0.7% with ``65537`` (5000 keys, 200 random
  pools). The build runs on the event loop, in Python, in about ``M * ln M`` probes: ~10 ms for
  ``16381`` but ~40-90 ms for ``65537``, too long a stall on every health transition of a small
  pool. Imaging pools are a handful of servers, so the table starts at the prime 16381 (up to 163
  usable servers) and grows to 65537 only when the usable set outgrows it. It never shrinks,
  because changing ``M`` remaps every key; growth therefore happens at most once in a process's
  life, normally while the first checks bring the pool up.
- **Weights.** The table uses configured weights, not the slow-start ramp nor the agent's
  percentage: a recovering server gets its keys back at once, and affinity does not churn each time
  an agent reports a new load (both would remap keys on every step). :meth:`rebuild`
  is called when the usable set or a weight changes and skips the build when nothing it uses did.
- **Fallback.** ``pick`` receives candidates, a subset of the usable set (a server at ``maxconn``
  or excluded by a retry is missing). When the key's slot names a server that is not a candidate,
  the lookup walks the table from that slot with a stride derived from the key, up to
  :data:`FALLBACK_PROBES` slots, and takes the first candidate it meets. The walk is deterministic
  for a key, spreads a missing server's keys over the others in proportion to their table shares,
  and leaves keys of other servers untouched. If the walk finds nobody (the table is empty or stale,
  or the candidates own very few slots), the key chooses among the candidates directly by hash.

Pure ring: no clock; ``now`` is passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b
from heapq import heapreplace

from medlb.balance.base import Balancer
from medlb.model.server import Server

#: Table sizes, all prime; the smallest one with ``M >= MIN_SLOTS_PER_SERVER * N`` is used, and the
#: table never shrinks (see the module docstring).
TABLE_SIZES = (16381, 65537)
MIN_SLOTS_PER_SERVER = 100
#: How many slots the fallback walk probes before choosing among the candidates by hash.
FALLBACK_PROBES = 64


def _hash64(data: bytes) -> int:
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "little")


def table_size_for(servers: int, current: int = 0) -> int:
    """The table size for ``servers`` usable servers, never smaller than ``current``."""
    for size in TABLE_SIZES:
        if size >= current and size >= MIN_SLOTS_PER_SERVER * servers:
            return size
    return max(TABLE_SIZES[-1], current)


def build_table(servers: Sequence[Server], size: int) -> list[Server]:
    """Populate a weighted Maglev lookup table of ``size`` (prime) slots.

    Servers with a weight of 0 get no slot; with nobody left the table is empty.
    """
    members = [s for s in servers if s.weight > 0]
    if not members:
        return []
    count = len(members)
    positions: list[int] = []
    skips: list[int] = []
    for server in members:
        digest = blake2b(server.name.encode(), digest_size=16).digest()
        positions.append(int.from_bytes(digest[:8], "little") % size)
        skips.append(int.from_bytes(digest[8:], "little") % (size - 1) + 1)
    weights = [s.weight for s in members]
    heaviest = max(weights)
    # Turns: server i makes its k-th claim in round max(k + 1, ceil(k * heaviest / weight_i)), so the
    # heaviest claims once every round and a server of a third of that weight once every third
    # round; within a round, servers go in config order. A heap of (round, index) yields the turns
    # in that order at O(log n) per slot, however skewed the weights (a loop over rounds would cost
    # rounds x servers, which is large for one heavy server among many light ones).
    claims = [0] * count
    turns = [(1, i) for i in range(count)]  # already a heap
    slots: list[Server | None] = [None] * size
    for _ in range(size):
        i = turns[0][1]
        slot, skip = positions[i], skips[i]
        while slots[slot] is not None:
            slot += skip
            if slot >= size:
                slot -= size
        slots[slot] = members[i]
        # Next preference after the claimed slot.
        slot += skip
        positions[i] = slot - size if slot >= size else slot
        k = claims[i] = claims[i] + 1
        next_round = -(-k * heaviest // weights[i])
        heapreplace(turns, (next_round if next_round > k else k + 1, i))
    return [s for s in slots if s is not None]


class SourceHash(Balancer):
    """Consistent hashing of the client address over a weighted Maglev table."""

    name = "source"

    __slots__ = ("_signature", "_size", "_table")

    needs_key = True

    def __init__(self) -> None:
        self._table: list[Server] = []
        self._size = 0
        self._signature: tuple[tuple[Server, str, int], ...] = ()

    @property
    def table(self) -> Sequence[Server]:
        """The lookup table (read-only view for status output and tests)."""
        return self._table

    def rebuild(self, usable: Sequence[Server], now: float) -> None:
        signature = tuple((s, s.name, s.weight) for s in usable)
        if signature == self._signature and self._table:
            return
        self._signature = signature
        self._size = table_size_for(len(usable), self._size)
        self._table = build_table(usable, self._size)

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        if not candidates:
            return None
        h = _hash64(key if key is not None else b"")
        table = self._table
        if table:
            size = len(table)
            slot = h % size
            server = table[slot]
            # Fast path: the mapped server is a candidate. Identity scan of a short sequence, no
            # allocation.
            if server in candidates:
                return server
            allowed = set(candidates)
            stride = (h >> 32) % (size - 1) + 1
            for _ in range(FALLBACK_PROBES):
                slot += stride
                if slot >= size:
                    slot -= size
                server = table[slot]
                if server in allowed:
                    return server
        return candidates[h % len(candidates)]
