"""``first``: the first candidate in config order."""

from __future__ import annotations

from medlb.balance.first import First
from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.server import Server


def make_servers(weights: list[int]) -> list[Server]:
    return [
        Server(f"s{i}", HostPort("127.0.0.1", 10000 + i), backend_name="b", weight=w, op_state=OpState.UP)
        for i, w in enumerate(weights)
    ]


def test_returns_first_candidate_whatever_the_load_or_weight() -> None:
    a, b, c = make_servers([1, 5, 9])
    a.cur_sessions = 1000
    balancer = First()
    for _ in range(3):
        assert balancer.pick([a, b, c], 0.0) is a
    # a full at maxconn is no longer a candidate: the next in config order takes over.
    assert balancer.pick([b, c], 0.0) is b


def test_empty() -> None:
    assert First().pick([], 0.0) is None
