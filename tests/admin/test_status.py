"""Status documents and the dashboard history: rates, alignment and the 15-minute window."""

from __future__ import annotations

from medlb.admin.status import History, backend_doc, server_doc
from medlb.balance import make_balancer
from medlb.config import Config, HostPort, parse_config
from medlb.io.runtime import Runtime
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.health import OpState
from medlb.model.server import AdminState, CheckResult, Server


def _config() -> Config:
    return parse_config(
        {
            "frontends": [{"name": "fe", "bind": ["127.0.0.1:0"], "default_backend": "pool"}],
            "backends": [{"name": "pool", "servers": [{"name": "s1", "address": "127.0.0.1:1"}]}],
        }
    )


def _runtime(*servers: Server) -> tuple[Runtime, Backend]:
    runtime = Runtime(_config())
    pool = Backend("pool", list(servers), make_balancer("roundrobin"), BackendPolicy(), lambda: 100.0)
    runtime.backends["pool"] = pool
    runtime.epoch_offset = 1_000_000.0
    return runtime, pool


def test_server_doc_converts_loop_times_to_unix_time() -> None:
    s1 = Server("s1", HostPort("10.0.0.1", 104), op_state=OpState.UP, now=50.0)
    s1.record_check(CheckResult(True, "L4OK in 1ms", at=60.0, duration=0.001))
    runtime, _ = _runtime(s1)
    doc = server_doc(runtime, s1, 100.0, (10, 20))
    assert doc["address"] == "10.0.0.1:104"
    assert doc["last_check"] == {"ok": True, "text": "L4OK in 1ms", "at": 1_000_060.0, "duration_ms": 1.0}
    assert doc["last_change"] == 1_000_050.0
    assert (doc["bytes_in"], doc["bytes_out"]) == (10, 20)
    assert doc["op_state"] == "UP" and doc["admin_state"] == "ready"


def test_backend_doc_says_when_nothing_is_usable() -> None:
    s1 = Server("s1", HostPort("10.0.0.1", 104), op_state=OpState.UP)
    runtime, pool = _runtime(s1)
    assert backend_doc(runtime, pool, {})["up"] is True
    s1.set_admin_state(AdminState.MAINT, 1.0, "test")
    doc = backend_doc(runtime, pool, {})
    assert doc["up"] is False and doc["usable_servers"] == 0
    assert doc["servers"][0]["admin_source"] == "test"


def test_history_rates_are_counter_differences_per_second() -> None:
    s1 = Server("s1", HostPort("10.0.0.1", 104), op_state=OpState.UP)
    runtime, pool = _runtime(s1)
    history = History(interval=5.0, window=20.0)
    history.sample(runtime, at=0.0)
    s1.bytes_in += 5000
    s1.bytes_out += 50
    pool.cur_sessions = 2
    history.sample(runtime, at=5.0)
    doc = history.doc()
    assert doc["t"] == [0.0, 5.0]
    assert doc["servers"]["pool/s1"]["bytes_in_rate"] == [None, 1000.0]
    assert doc["servers"]["pool/s1"]["bytes_out_rate"] == [None, 10.0]
    assert doc["backends"]["pool"]["cur_sessions"] == [0, 2]
    assert history.rate_of("servers", "pool/s1", "bytes_in_rate") == 1000.0


def test_history_keeps_one_window_and_aligns_late_arrivals() -> None:
    s1 = Server("s1", HostPort("10.0.0.1", 104), op_state=OpState.UP)
    runtime, pool = _runtime(s1)
    history = History(interval=5.0, window=20.0)  # 4 samples
    for n in range(3):
        history.sample(runtime, at=5.0 * n)
    s2 = Server("s2", HostPort("10.0.0.2", 104), op_state=OpState.UP)
    pool.reconfigure([s1, s2], pool.balancer, pool.policy)
    for n in range(3, 6):
        history.sample(runtime, at=5.0 * n)
    doc = history.doc()
    assert doc["t"] == [10.0, 15.0, 20.0, 25.0]
    assert doc["servers"]["pool/s2"]["cur_sessions"] == [None, 0, 0, 0]
    assert all(len(v) == 4 for series in doc["servers"].values() for v in series.values())
    # A server gone for a whole window is forgotten.
    pool.reconfigure([s1], pool.balancer, pool.policy)
    for n in range(6, 11):
        history.sample(runtime, at=5.0 * n)
    assert "pool/s2" not in history.doc()["servers"]
