"""``make_balancer``: every configurable name has an algorithm; unknown names are refused."""

from __future__ import annotations

from random import Random
from typing import get_args

import pytest

from medlb.balance import BALANCE_NAMES, make_balancer
from medlb.balance.base import Balancer
from medlb.balance.first import First
from medlb.balance.hashing import SourceHash
from medlb.balance.leastconn import LeastConn
from medlb.balance.random import PowerOfTwo
from medlb.balance.roundrobin import RoundRobin
from medlb.config import BackendConfig, HostPort
from medlb.model.health import OpState
from medlb.model.server import Server


@pytest.mark.parametrize(
    ("name", "cls"),
    [
        ("roundrobin", RoundRobin),
        ("leastconn", LeastConn),
        ("source", SourceHash),
        ("random", PowerOfTwo),
        ("first", First),
    ],
)
def test_names(name: str, cls: type[Balancer]) -> None:
    balancer = make_balancer(name)
    assert type(balancer) is cls
    assert balancer.needs_key is (name == "source")


def test_fresh_instance_each_time() -> None:
    assert make_balancer("roundrobin") is not make_balancer("roundrobin")


def test_every_config_name_is_known() -> None:
    assert set(get_args(BackendConfig.model_fields["balance"].annotation)) == set(BALANCE_NAMES)


@pytest.mark.parametrize("name", ["", "RoundRobin", "hash", "uri", "leastconn "])
def test_unknown_name_raises(name: str) -> None:
    with pytest.raises(ValueError, match="unknown balance algorithm"):
        make_balancer(name)


def test_rng_is_used_by_random() -> None:
    servers = [
        Server(f"s{i}", HostPort("127.0.0.1", 10000 + i), backend_name="b", weight=1, op_state=OpState.UP)
        for i in range(5)
    ]

    def sequence(balancer: Balancer) -> list[Server | None]:
        return [balancer.pick(servers, 0.0) for _ in range(40)]

    assert sequence(make_balancer("random", Random(99))) == sequence(PowerOfTwo(Random(99)))
