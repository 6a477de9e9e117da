"""Backend selection: usable tiers, backups, maxconn, exclusion, the queue, and
how admin states (READY / DRAIN / MAINT) gate new sessions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from medlb.balance import make_balancer
from medlb.balance.base import Balancer
from medlb.config import HostPort
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.health import OpState
from medlb.model.server import AdminState, Server


def srv(name: str, **kw: object) -> Server:
    return Server(name, HostPort("127.0.0.1", 1000 + len(name)), op_state=OpState.UP, **kw)  # type: ignore[arg-type]


def backend(*servers: Server, balance: str = "roundrobin", maxqueue: int = 0) -> Backend:
    return Backend("pool", list(servers), make_balancer(balance), BackendPolicy(maxqueue=maxqueue), lambda: 0.0)


@dataclass
class FakeWaiter:
    cancelled: bool = False
    granted: list[Server] = field(default_factory=list)
    key: bytes | None = None

    def grant(self, server: Server) -> None:
        self.granted.append(server)


def test_select_takes_a_slot() -> None:
    a = srv("a")
    b = backend(a)
    assert b.select() is a
    assert a.cur_sessions == 1 and a.total_sessions == 1
    b.release(a)
    assert a.cur_sessions == 0


def test_drain_and_maint_take_no_new_sessions_but_keep_existing() -> None:
    a, c = srv("a"), srv("c")
    b = backend(a, c)
    first = b.select()
    assert first is a
    a.set_admin_state(AdminState.DRAIN, 1.0, "operator")
    picks = {b.select() for _ in range(5)}
    assert picks == {c}
    assert a.cur_sessions == 1  # the existing session is untouched
    c.set_admin_state(AdminState.MAINT, 2.0, "operator")
    assert b.select() is None and not b.saturated()
    a.set_admin_state(AdminState.READY, 3.0, "operator")
    assert b.select() is a


def test_maint_stops_checks_drain_does_not() -> None:
    a = srv("a")
    a.set_admin_state(AdminState.DRAIN, 0.0, "operator")
    assert a.checks_enabled
    a.set_admin_state(AdminState.MAINT, 0.0, "operator")
    assert not a.checks_enabled


def test_backup_only_when_no_primary_is_usable() -> None:
    p1, p2, bk = srv("p1"), srv("p2"), srv("bk", backup=True)
    b = backend(p1, p2, bk)
    assert {b.select() for _ in range(4)} == {p1, p2}
    p1.force_op_state(OpState.DOWN, 1.0, "test")
    p2.set_admin_state(AdminState.MAINT, 1.0, "operator")
    assert b.select() is bk
    p2.set_admin_state(AdminState.READY, 2.0, "operator")
    assert b.select() is p2


def test_full_servers_are_skipped_and_saturation_is_reported() -> None:
    a, c = srv("a", maxconn=1), srv("c", maxconn=1)
    b = backend(a, c)
    assert {b.select(), b.select()} == {a, c}
    assert b.select() is None and b.saturated()


def test_exclusion_on_retry_and_fallback_when_all_excluded() -> None:
    a, c = srv("a"), srv("c")
    b = backend(a, c)
    assert b.select(exclude=[a]) is c
    assert b.select(exclude=[a, c]) in (a, c)


def test_retry_falls_back_to_backups_when_every_primary_failed() -> None:
    p1, bk = srv("p1"), srv("bk", backup=True)
    b = backend(p1, bk)
    assert b.select() is p1
    assert b.select(exclude=[p1]) is bk
    assert b.select(exclude=[p1, bk]) is p1


def test_queue_is_served_in_order_when_a_slot_frees() -> None:
    a = srv("a", maxconn=1)
    b = backend(a)
    assert b.select() is a
    w1, w2, gone = FakeWaiter(), FakeWaiter(), FakeWaiter(cancelled=True)
    b.queue.extend([gone, w1, w2])
    b.release(a)
    assert w1.granted == [a] and w2.granted == [] and list(b.queue) == [w2]
    b.release(a)
    assert w2.granted == [a] and not b.queue


def test_queue_is_served_when_a_server_comes_up() -> None:
    a = srv("a", maxconn=1)
    c = srv("c")
    c.force_op_state(OpState.DOWN, 0.0, "test")
    b = backend(a, c)
    assert b.select() is a
    waiter = FakeWaiter()
    b.queue.append(waiter)
    c.force_op_state(OpState.UP, 1.0, "test")
    assert waiter.granted == [c]


def test_maxqueue_bounds_the_queue() -> None:
    b = backend(srv("a"), maxqueue=1)
    assert b.can_queue()
    b.queue.append(FakeWaiter())
    assert not b.can_queue()


def test_weight_zero_takes_nothing() -> None:
    a, c = srv("a", weight=0), srv("c")
    b = backend(a, c)
    assert {b.select() for _ in range(3)} == {c}


def test_state_changes_reach_listeners() -> None:
    a = srv("a")
    b = backend(a)
    seen: list[str] = []
    b.state_listeners.append(lambda server, what, cause: seen.append(f"{server.key} {what} ({cause})"))
    a.set_admin_state(AdminState.DRAIN, 1.0, "operator", "patching")
    a.force_op_state(OpState.DOWN, 2.0, "L4 refused")
    assert seen == [
        "pool/a admin_state READY -> DRAIN (operator: patching)",
        "pool/a op_state UP -> DOWN (L4 refused)",
    ]


def test_slowstart_ramps_only_after_recovery() -> None:
    a = Server("a", HostPort("127.0.0.1", 1), weight=10, slowstart=10.0)
    a.force_op_state(OpState.UP, 0.0, "first check")
    assert a.effective_weight(0.0) == 10  # cold start: full weight at once
    a.force_op_state(OpState.DOWN, 5.0, "fail")
    a.force_op_state(OpState.UP, 100.0, "recovered")
    assert a.effective_weight(101.0) == 1.0
    assert a.effective_weight(105.0) == 5.0
    assert a.effective_weight(110.0) == 10
    a.set_agent_pct(50)
    assert a.effective_weight(200.0) == 5.0


class RecordingBalancer(Balancer):
    needs_key = True

    def __init__(self) -> None:
        self.keys: list[bytes | None] = []

    def pick(self, candidates: Sequence[Server], now: float, key: bytes | None = None) -> Server | None:
        self.keys.append(key)
        return candidates[0] if candidates else None


def test_queued_sessions_keep_their_hash_key() -> None:
    """Regression: the queue used to select without the key, so under ``source`` every
    queued client hashed alike and landed on one server."""
    a = srv("a", maxconn=1)
    balancer = RecordingBalancer()
    b = Backend("pool", [a], balancer, BackendPolicy(), lambda: 0.0)
    assert b.select(b"10.0.0.1") is a
    waiter = FakeWaiter(key=b"10.0.0.2")
    b.queue.append(waiter)
    b.release(a)
    assert waiter.granted == [a]
    assert balancer.keys == [b"10.0.0.1", b"10.0.0.2"]


def test_dispatch_is_not_reentrant() -> None:
    """A grant that frees its slot at once (its connect failed) re-enters
    dispatch_queue; the nested call must not recurse but make the outer loop go on."""
    a = srv("a", maxconn=1)
    b = backend(a)
    order: list[int] = []

    @dataclass
    class FailingWaiter:
        n: int
        cancelled: bool = False
        key: bytes | None = None

        def grant(self, server: Server) -> None:
            order.append(self.n)
            b.release(server)  # connect failed at once: give the slot back

    assert b.select() is a
    b.queue.extend(FailingWaiter(i) for i in range(2000))  # deep enough to overflow the stack
    b.release(a)
    assert order == list(range(2000)) and not b.queue and a.cur_sessions == 0


def test_reconfigure_keeps_surviving_servers_and_returns_the_dropped() -> None:
    a, b_, c = srv("a"), srv("b"), srv("c")
    pool = backend(a, b_)
    a.cur_sessions = 1  # a session still runs on a
    dropped = pool.reconfigure([b_, c], make_balancer("leastconn"), BackendPolicy(retries=5))
    assert dropped == [a]
    assert pool.servers == [b_, c] and pool.policy.retries == 5
    assert pool.balancer.name == "leastconn"
    assert pool.usable() == [b_, c]
    # The dropped server no longer reports to this backend, but can still release its slot.
    seen: list[str] = []
    pool.state_listeners.append(lambda server, what, cause: seen.append(server.name))
    a.set_admin_state(AdminState.DRAIN, 0.0, "test")
    c.set_admin_state(AdminState.DRAIN, 0.0, "test")
    assert seen == ["c"]
    pool.release(a)
    assert a.cur_sessions == 0


def test_reconfigure_serves_the_queue_when_capacity_grows() -> None:
    a = srv("a", maxconn=1)
    pool = backend(a)
    assert pool.select() is a
    waiter = FakeWaiter()
    pool.queue.append(waiter)
    extra = srv("b")
    pool.reconfigure([a, extra], pool.balancer, pool.policy)
    assert waiter.granted == [extra]
