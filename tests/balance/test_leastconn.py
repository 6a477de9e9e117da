"""Weighted least connections: least loaded wins, weights count, ties rotate."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from medlb.balance.leastconn import LeastConn
from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.server import Server


def make_servers(weights: list[int]) -> list[Server]:
    return [
        Server(f"s{i}", HostPort("127.0.0.1", 10000 + i), backend_name="b", weight=w, op_state=OpState.UP)
        for i, w in enumerate(weights)
    ]


def test_picks_least_loaded() -> None:
    servers = make_servers([1, 1, 1])
    for server, sessions in zip(servers, [5, 2, 7], strict=True):
        server.cur_sessions = sessions
    lc = LeastConn()
    for _ in range(5):
        assert lc.pick(servers, 0.0) is servers[1]


def test_empty_candidates() -> None:
    assert LeastConn().pick([], 0.0) is None


def test_weight_counts_on_idle_pool() -> None:
    # (0 + 1) / 3 < (0 + 1) / 1: the heavier server takes the first session.
    light, heavy = make_servers([1, 3])
    assert LeastConn().pick([light, heavy], 0.0) is heavy


def test_weight_respected_as_sessions_accumulate() -> None:
    servers = make_servers([3, 1])
    lc = LeastConn()
    for _ in range(40):
        chosen = lc.pick(servers, 0.0)
        assert chosen is not None
        chosen.cur_sessions += 1
    assert [s.cur_sessions for s in servers] == [30, 10]


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.integers(min_value=1, max_value=20), min_size=1, max_size=8),
    st.lists(st.integers(min_value=0, max_value=50), min_size=8, max_size=8),
)
def test_choice_minimises_load_after_pick(weights: list[int], sessions: list[int]) -> None:
    servers = make_servers(weights)
    for server, count in zip(servers, sessions, strict=False):
        server.cur_sessions = count
    chosen = LeastConn().pick(servers, 0.0)
    assert chosen is not None
    best = min((s.cur_sessions + 1) / s.weight for s in servers)
    assert (chosen.cur_sessions + 1) / chosen.weight == best


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6), st.integers(10, 200))
def test_sessions_track_weights(weights: list[int], rounds: int) -> None:
    """Opening sessions one by one keeps every server within one session of its weighted share."""
    servers = make_servers(weights)
    lc = LeastConn()
    for _ in range(rounds):
        chosen = lc.pick(servers, 0.0)
        assert chosen is not None
        chosen.cur_sessions += 1
    total = sum(weights)
    for server in servers:
        share = rounds * server.weight / total
        assert abs(server.cur_sessions - share) <= server.weight + 1, (weights, [s.cur_sessions for s in servers])


def test_ties_rotate() -> None:
    servers = make_servers([1, 1, 1])
    lc = LeastConn()
    # Sessions are not counted here (they have not been opened yet): equal servers take turns.
    names = [lc.pick(servers, 0.0).name for _ in range(6)]  # type: ignore[union-attr]
    assert names == ["s0", "s1", "s2", "s0", "s1", "s2"]


def test_ties_rotate_evenly_past_a_loaded_server() -> None:
    a, b, loaded = make_servers([1, 1, 1])
    loaded.cur_sessions = 10
    lc = LeastConn()
    counts = Counter(lc.pick([a, b, loaded], 0.0).name for _ in range(100))  # type: ignore[union-attr]
    assert counts == Counter({"s0": 50, "s1": 50})


def test_slowstart_ramp_lowers_share() -> None:
    ramping, steady = make_servers([1, 1])
    ramping.slowstart = 10.0
    ramping.up_since = 0.0
    lc = LeastConn()
    for _ in range(22):
        chosen = lc.pick([ramping, steady], 1.0)  # ramp at 10%
        assert chosen is not None
        chosen.cur_sessions += 1
    assert ramping.cur_sessions <= 3
    assert steady.cur_sessions >= 19


def test_zero_effective_weight_only_when_alone() -> None:
    a, b = make_servers([1, 1])
    a.agent_pct = 0
    b.cur_sessions = 1000
    lc = LeastConn()
    assert lc.pick([a, b], 0.0) is b
    assert lc.pick([a], 0.0) is a


class OtherProcesses:
    """A SharedCount with sessions other processes hold (global.workers): ``total`` includes them."""

    def __init__(self, theirs: int) -> None:
        self.n = theirs

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


def test_with_workers_the_whole_nodes_sessions_count() -> None:
    """Here ``a`` looks idle, but other processes hold 6 sessions on it: ``b``, with 2 here, wins."""
    a, b = make_servers([1, 1])
    b.cur_sessions = 2
    a.share(OtherProcesses(6))
    b.share(OtherProcesses(0))  # the 2 sessions it has are carried into the shared count
    assert (a.node_sessions, b.node_sessions) == (6, 2)
    lc = LeastConn()
    assert all(lc.pick([a, b], 0.0) is b for _ in range(4))
