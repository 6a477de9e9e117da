"""``random``: power of two choices over weighted draws, with an injected RNG."""

from __future__ import annotations

from collections import Counter
from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from medlb.balance.random import PowerOfTwo
from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.server import Server


def make_servers(weights: list[int]) -> list[Server]:
    return [
        Server(f"s{i}", HostPort("127.0.0.1", 10000 + i), backend_name="b", weight=w, op_state=OpState.UP)
        for i, w in enumerate(weights)
    ]


def names(balancer: PowerOfTwo, candidates: list[Server], count: int) -> Counter[str]:
    out: Counter[str] = Counter()
    for _ in range(count):
        chosen = balancer.pick(candidates, 0.0)
        assert chosen is not None
        out[chosen.name] += 1
    return out


def test_empty_and_single() -> None:
    (only,) = make_servers([1])
    balancer = PowerOfTwo(Random(1))
    assert balancer.pick([], 0.0) is None
    assert balancer.pick([only], 0.0) is only


@settings(max_examples=150, deadline=None)
@given(
    st.integers(min_value=0, max_value=2**32),
    st.lists(st.tuples(st.integers(1, 20), st.integers(0, 30)), min_size=1, max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_only_candidates_are_returned(seed: int, specs: list[tuple[int, int]], present: list[bool]) -> None:
    servers = make_servers([w for w, _ in specs])
    for server, (_, sessions) in zip(servers, specs, strict=True):
        server.cur_sessions = sessions
    candidates = [s for s, keep in zip(servers, present, strict=False) if keep] or servers[:1]
    balancer = PowerOfTwo(Random(seed))
    for _ in range(20):
        assert balancer.pick(candidates, 0.0) in candidates


def test_loaded_server_loses_every_duel() -> None:
    loaded, a, b = make_servers([1, 1, 1])
    loaded.cur_sessions = 100
    counts = names(PowerOfTwo(Random(7)), [loaded, a, b], 3000)
    # Two distinct draws always include an idle server when only one is loaded.
    assert counts["s0"] == 0
    assert abs(counts["s1"] - counts["s2"]) < 300


def test_less_loaded_wins_most() -> None:
    busy, quiet = make_servers([1, 1])
    busy.cur_sessions = 5
    quiet.cur_sessions = 1
    counts = names(PowerOfTwo(Random(3)), [busy, quiet], 1000)
    assert counts["s1"] == 1000


def test_load_is_relative_to_weight() -> None:
    # 3 sessions on weight 3 (load 1) against 2 sessions on weight 1 (load 2): the heavy one wins.
    heavy, light = make_servers([3, 1])
    heavy.cur_sessions = 3
    light.cur_sessions = 2
    assert names(PowerOfTwo(Random(5)), [heavy, light], 100)["s0"] == 100


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=8), min_size=2, max_size=5), st.integers(0, 2**32))
def test_idle_pool_share_follows_weights(weights: list[int], seed: int) -> None:
    servers = make_servers(weights)
    draws = 8000
    counts = names(PowerOfTwo(Random(seed)), servers, draws)
    total = sum(weights)
    for server in servers:
        p = server.weight / total
        expected = draws * p
        # Five binomial standard deviations: fails for a wrong share, practically never by chance.
        assert abs(counts[server.name] - expected) <= 5 * (draws * p * (1 - p)) ** 0.5 + 1


def test_seeded_rng_is_reproducible() -> None:
    servers = make_servers([1, 2, 3, 4])

    def sequence(seed: int) -> list[str]:
        balancer = PowerOfTwo(Random(seed))
        return [balancer.pick(servers, 0.0).name for _ in range(50)]  # type: ignore[union-attr]

    assert sequence(42) == sequence(42)
    assert sequence(42) != sequence(43)


def test_zero_effective_weight_is_never_drawn_unless_all_are() -> None:
    off, a, b = make_servers([1, 1, 1])
    off.agent_pct = 0
    assert names(PowerOfTwo(Random(11)), [off, a, b], 1000)["s0"] == 0
    a.agent_pct = b.agent_pct = 0
    # Everyone at 0%: still serve somebody, spread over all.
    assert set(names(PowerOfTwo(Random(11)), [off, a, b], 300)) == {"s0", "s1", "s2"}


def test_slowstart_ramp_lowers_share() -> None:
    ramping, steady = make_servers([1, 1])
    ramping.slowstart = 10.0
    ramping.up_since = 0.0
    balancer = PowerOfTwo(Random(9))
    counts: Counter[str] = Counter()
    for _ in range(2000):
        chosen = balancer.pick([ramping, steady], 1.0)  # ramp at 10%
        assert chosen is not None
        counts[chosen.name] += 1
    assert counts["s0"] < 0.2 * counts["s1"]


def test_with_workers_the_whole_nodes_sessions_count() -> None:
    """Two candidates are always both drawn: the one other processes load less wins every time."""
    from tests.balance.test_leastconn import OtherProcesses

    a, b = make_servers([1, 1])
    a.share(OtherProcesses(9))  # idle here, busy in the other processes
    b.cur_sessions = 1
    b.share(OtherProcesses(0))
    assert names(PowerOfTwo(Random(3)), [a, b], 50) == Counter({"s1": 50})
