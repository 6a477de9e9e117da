"""Smooth weighted round robin: the nginx sequence, exact shares per cycle, ramps, changing sets."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from medlb.balance.roundrobin import RoundRobin
from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.server import Server


def make_servers(weights: list[int], names: str = "abcdefghijklmnop") -> list[Server]:
    return [
        Server(names[i], HostPort("127.0.0.1", 10000 + i), backend_name="b", weight=w, op_state=OpState.UP)
        for i, w in enumerate(weights)
    ]


def picks(rr: RoundRobin, candidates: list[Server], count: int, now: float = 0.0) -> str:
    out = []
    for _ in range(count):
        chosen = rr.pick(candidates, now)
        assert chosen is not None
        out.append(chosen.name)
    return "".join(out)


def test_nginx_smooth_sequence_5_1_1() -> None:
    servers = make_servers([5, 1, 1])
    rr = RoundRobin()
    rr.rebuild(servers, 0.0)
    # nginx's documented example: {a, a, b, a, c, a, a}, and then the cycle repeats.
    assert picks(rr, servers, 14) == "aabacaa" * 2


def test_equal_weights_alternate() -> None:
    servers = make_servers([1, 1, 1])
    assert picks(RoundRobin(), servers, 6) == "abcabc"


def test_empty_candidates() -> None:
    assert RoundRobin().pick([], 0.0) is None


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8), st.integers(1, 3))
def test_every_cycle_gives_exact_weight_shares(weights: list[int], cycles: int) -> None:
    servers = make_servers(weights)
    rr = RoundRobin()
    rr.rebuild(servers, 0.0)
    total = sum(weights)
    for _ in range(cycles):
        counts = Counter(picks(rr, servers, total))
        assert [counts[s.name] for s in servers] == weights


def test_slowstart_ramp_lowers_share() -> None:
    ramping, steady = make_servers([1, 1])
    ramping.slowstart = 10.0
    ramping.up_since = 0.0  # recovered at t=0: at t=1 it runs at 10% of its weight
    rr = RoundRobin()
    counts = Counter(picks(rr, [ramping, steady], 110, now=1.0))
    assert 8 <= counts["a"] <= 12  # 1 : 10 of 110 picks
    assert counts["b"] >= 98
    # After the ramp, shares are equal again.
    counts = Counter(picks(rr, [ramping, steady], 100, now=11.0))
    assert counts["a"] == counts["b"] == 50


def test_agent_percentage_scales_share() -> None:
    a, b = make_servers([4, 4])
    a.agent_pct = 25
    counts = Counter(picks(RoundRobin(), [a, b], 50))
    assert (counts["a"], counts["b"]) == (10, 40)


def test_zero_effective_weight_gets_nothing_unless_alone() -> None:
    a, b, c = make_servers([1, 1, 1])
    a.agent_pct = 0
    rr = RoundRobin()
    assert "a" not in picks(rr, [a, b, c], 30)
    c.agent_pct = 0
    b.agent_pct = 0
    # Everyone at 0%: still serve, in rotation, rather than refuse.
    assert Counter(picks(rr, [a, b, c], 30)) == Counter({"a": 10, "b": 10, "c": 10})


def test_rebuild_with_same_set_keeps_rotation() -> None:
    servers = make_servers([5, 1, 1])
    rr = RoundRobin()
    first = picks(rr, servers, 3)
    rr.rebuild(servers, 0.0)
    assert first + picks(rr, servers, 11) == "aabacaa" * 2


def test_rebuild_forgets_removed_servers() -> None:
    servers = make_servers([1, 1, 1])
    rr = RoundRobin()
    picks(rr, servers, 4)
    rr.rebuild(servers[:2], 0.0)
    assert set(rr._current) <= set(servers[:2])


def test_excluded_server_is_compensated_when_back() -> None:
    # c is full for a while; when it is a candidate again it is served before the others catch up.
    a, b, c = make_servers([1, 1, 1])
    rr = RoundRobin()
    assert picks(rr, [a, b, c], 2) == "ab"
    picks(rr, [a, b], 6)
    assert picks(rr, [a, b, c], 1) == "c"


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=10), min_size=2, max_size=6),
    st.lists(st.integers(min_value=0, max_value=2**16 - 1), min_size=50, max_size=400),
)
def test_changing_candidate_sets_starve_nobody(weights: list[int], masks: list[int]) -> None:
    """Whatever the sequence of candidate subsets, a server is chosen within ``2 * W / w`` of the picks
    it is a candidate for (W = sum of all weights), however its absences are placed."""
    servers = make_servers(weights)
    total = sum(weights)
    rr = RoundRobin()
    waiting = [0] * len(servers)
    for mask in masks:
        candidates = [s for i, s in enumerate(servers) if mask >> i & 1] or servers
        chosen = rr.pick(candidates, 0.0)
        assert chosen in candidates
        for i, server in enumerate(servers):
            if server is chosen:
                waiting[i] = 0
            elif server in candidates:
                waiting[i] += 1
                assert waiting[i] * server.weight < 2 * total, (server.name, waiting[i])
