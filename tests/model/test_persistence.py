"""Persistence rules: opaque stable cookies, bounded stick tables, who still honours a pin."""

from __future__ import annotations

from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.persistence import Persistence, StickTable, cookie_value, honours
from medlb.model.server import AdminState, Server


def srv(name: str, **kw: object) -> Server:
    return Server(name, HostPort("10.0.0.1", 104), op_state=OpState.UP, **kw)  # type: ignore[arg-type]


def test_cookie_values_are_stable_opaque_and_distinct() -> None:
    a = cookie_value("viewers", "v1")
    assert a == cookie_value("viewers", "v1")  # every medlb node computes the same value
    assert len(a) == 16 and int(a, 16) >= 0
    assert "v1" not in a and "10.0" not in a
    assert a != cookie_value("viewers", "v2") and a != cookie_value("other", "v1")


def test_a_cookie_from_another_node_is_honoured_without_shared_state() -> None:
    servers = [srv("v1"), srv("v2")]
    fresh = Persistence("cookie", "viewers")  # this node never issued it
    assert fresh.server_for_cookie(cookie_value("viewers", "v2"), servers) is servers[1]
    assert fresh.server_for_cookie("0123456789abcdef", servers) is None


def test_stick_table_forgets_idle_keys_and_stays_bounded() -> None:
    table = StickTable(idle=10.0, size=3)
    table.put(b"a", "v1", 0.0)
    assert table.get(b"a", 9.0) == "v1"
    assert table.get(b"a", 20.0) is None  # idle too long
    for n, key in enumerate([b"k1", b"k2", b"k3", b"k4"]):
        table.put(key, "v1", float(n))
    assert len(table) == 3 and table.get(b"k1", 4.0) is None  # least recently used evicted
    assert table.get(b"k4", 4.0) == "v1"


def test_drain_keeps_honouring_maint_and_down_do_not() -> None:
    s = srv("v1")
    assert honours(s)
    s.set_admin_state(AdminState.DRAIN, 0.0, "test")
    assert honours(s) and not s.usable  # pinned clients stay; new ones go elsewhere
    s.set_admin_state(AdminState.MAINT, 0.0, "test")
    assert not honours(s)
    s.set_admin_state(AdminState.READY, 0.0, "test")
    s.force_op_state(OpState.DOWN, 0.0, "test")
    assert not honours(s)
    full = srv("v2", maxconn=1)
    full.cur_sessions = 1
    assert not honours(full)


def test_put_says_when_other_processes_should_hear_of_an_entry() -> None:
    table = StickTable(idle=100.0)
    assert table.put(b"k", "s1", 0.0) is True  # new
    assert table.put(b"k", "s1", 10.0) is False  # a use: nothing to tell
    assert table.put(b"k", "s2", 11.0) is True  # moved
    assert table.put(b"k", "s2", 35.0) is False
    assert table.put(b"k", "s2", 36.0) is True  # a quarter of the idle time since it was shared
    table.learn(b"k", "s3", 40.0)  # what another process shared wins, and counts as shared
    assert table.get(b"k", 41.0) == "s3"
    assert table.put(b"k", "s3", 60.0) is False
    table.learn(b"x", "s1", 0.0)
    assert table.get(b"x", 101.0) is None  # learned entries expire like the others
