"""``global.workers``: worker processes that share the listening ports and follow the main process.

The unit tests drive the bookkeeping (state snapshots, counter increments, peer
sessions) on real model objects; the end-to-end tests run ``medlb run`` with
``workers: 2`` in front of echo servers and check, through the worker's own log
lines and the admin API, that the second process serves traffic, obeys drain,
shutdown-sessions, API changes and reloads, is counted, and is restarted when it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from medlb.balance import make_balancer
from medlb.config import Config, HostPort
from medlb.io.runtime import Runtime
from medlb.io.workers import (
    MIGRATE_SYSCTL,
    Board,
    Channel,
    Tally,
    apply_state,
    collect,
    migrate_hint,
    poll_queues,
    server_state,
    sum_peer_sessions,
)
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.health import OpState
from medlb.model.server import AdminState, Server
from tests.helpers import Backend as EchoServer
from tests.helpers import (
    api,
    assert_reset_others_alive,
    free_port,
    running_medlb,
    server_of,
    tcp_config,
    wait_until,
    with_admin,
)

# --------------------------------------------------------------------------- unit: bookkeeping


def _runtime(*names: str) -> Runtime:
    runtime = Runtime(Config.model_validate(tcp_config(1, [{"name": "x", "address": "127.0.0.1:1"}])))
    servers = [Server(n, HostPort("127.0.0.1", 1000 + i), op_state=OpState.UP) for i, n in enumerate(names)]
    runtime.backends["pool"] = Backend("pool", servers, make_balancer("roundrobin"), BackendPolicy(), lambda: 0.0)
    return runtime


def test_state_snapshot_is_applied_to_a_worker_and_notifies_its_backend() -> None:
    main, worker = _runtime("s1", "s2"), _runtime("s1", "s2")
    s1, s2 = main.backends["pool"].servers
    s1.set_admin_state(AdminState.DRAIN, 1.0, "operator")
    s2.force_op_state(OpState.DOWN, 1.0, "check")
    s2.set_weight(7, "operator")
    s2.set_agent_pct(50)
    s2.maxconn = 30  # an agent's "maxconn:30"
    state = server_state(main)
    assert state == {
        "pool/s1": ("UP", "drain", "operator", 1, 100, 0, None),
        "pool/s2": ("DOWN", "ready", "config", 7, 50, 30, None),
    }
    # A DNS name the main process's checker resolved: workers run no checks, they take its answer.
    state["pool/s2"] = (*state["pool/s2"][:6], (socket.AF_INET, ("192.0.2.7", 104)))
    backend = worker.backends["pool"]
    assert [s.name for s in backend.usable()] == ["s1", "s2"]
    apply_state(worker, state, 2.0)
    w1, w2 = backend.servers
    assert (w1.admin_state, w1.admin_source, w2.op_state, w2.weight, w2.agent_pct) == (
        AdminState.DRAIN,
        "operator",
        OpState.DOWN,
        7,
        50,
    )
    assert backend.usable() == []  # the backend's cache was invalidated by the notifications
    assert w2.sockaddr == (socket.AF_INET, ("192.0.2.7", 104)) and w1.sockaddr is None
    assert (w1.maxconn, w2.maxconn) == (0, 30)
    apply_state(worker, server_state(_runtime("s1", "s2")), 3.0)
    assert [s.name for s in backend.usable()] == ["s1", "s2"]


def test_tally_adds_increments_and_treats_a_decrease_as_a_reset() -> None:
    tally = Tally()
    assert tally.increments("s", "pool/s1", (10, 100)) == (10, 100)
    assert tally.increments("s", "pool/s1", (15, 160)) == (5, 60)
    assert tally.increments("s", "pool/s1", (15, 160)) == (0, 0)
    assert tally.increments("s", "pool/s1", (2, 170)) == (2, 170)  # a new object at the same key
    tally.clear()
    assert tally.increments("s", "pool/s1", (3, 171)) == (3, 171)  # a restarted worker starts from zero


def test_reports_add_to_the_main_process_and_sessions_are_summed() -> None:
    main, worker = _runtime("s1"), _runtime("s1")
    main_s1 = main.backends["pool"].servers[0]
    main_s1.total_sessions, main_s1.bytes_out, main_s1.cur_sessions = 5, 500, 1
    w_s1 = worker.backends["pool"].servers[0]
    w_s1.total_sessions, w_s1.bytes_in, w_s1.bytes_out, w_s1.cur_sessions = 3, 30, 300, 2
    worker.backends["pool"].total_sessions, worker.backends["pool"].cur_sessions = 3, 2
    a, b = Tally(), Tally()
    a.take(main, collect(worker))
    w_s1.total_sessions, w_s1.cur_sessions = 4, 0
    a.take(main, collect(worker))
    b.take(main, {"t": "report", "servers": {"pool/s1": (1, 0, 0, 0, 0, 0, 4)}, "backends": {}, "frontends": {}})
    sum_peer_sessions(main, [a, b])
    assert (main_s1.total_sessions, main_s1.bytes_in, main_s1.bytes_out) == (5 + 4 + 1, 30, 800)
    assert (main_s1.cur_sessions, main_s1.peer_sessions, main_s1.all_sessions) == (1, 4, 5)
    assert main.backends["pool"].total_sessions == 3
    a.clear()  # worker a died: its sessions are gone, its counts stay
    sum_peer_sessions(main, [a, b])
    assert main_s1.peer_sessions == 4 and main_s1.total_sessions == 10
    # A report about a server the main process no longer has changes nothing and raises nothing.
    b.take(main, {"t": "report", "servers": {"pool/gone": (9, 9, 9, 9, 9, 9, 9)}, "backends": {}, "frontends": {}})


def test_channel_carries_messages_and_reports_the_end() -> None:
    async def main() -> None:
        left, right = socket.socketpair()
        a, b = await Channel.open(left), await Channel.open(right)
        a.send({"t": "state", "state": {"pool/s1": ("UP", "ready", "config", 1, 100, 0, None)}})
        a.send({"t": "stop", "grace": 1.5})
        assert await b.recv() == {"t": "state", "state": {"pool/s1": ("UP", "ready", "config", 1, 100, 0, None)}}
        assert await b.recv() == {"t": "stop", "grace": 1.5}
        a.close()
        assert await b.recv() is None
        b.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- end to end

READY = "INFO    medlb: medlb started"  # the main process's line; a worker's reads "INFO    worker 1 medlb: ..."


@dataclass
class Lab:
    lb: Any
    url: str
    port: int
    servers: list[EchoServer]
    config: dict[str, Any]
    tmp: Path

    def srv(self, name: str, suffix: str = "") -> str:
        return f"{self.url}/api/v1/backends/pool/servers/{name}{suffix}"

    def status(self) -> dict[str, Any]:
        code, doc = api(self.url + "/api/v1/status")
        assert code == 200
        return dict(doc)

    def worker_pid(self) -> int:
        pids = re.findall(r"worker 1 started \(pid (\d+)\)", self.lb.log)
        return int(pids[-1])

    def worker_lines(self, text: str) -> int:
        return sum(1 for line in self.lb.log.splitlines() if "worker 1 medlb.session" in line and text in line)


@contextlib.contextmanager
def lab(tmp: Path, names: tuple[str, ...] = ("s1", "s2"), workers: int = 2, **server_opts: Any) -> Iterator[Lab]:
    servers = [EchoServer(name) for name in names]
    port = free_port()
    config = tcp_config(port, [{"name": s.name, "address": f"127.0.0.1:{s.port}", **server_opts} for s in servers])
    config["global"]["workers"] = workers
    config["defaults"]["timeouts"]["queue"] = "30s"
    url = with_admin(config, tmp)
    try:
        with running_medlb(config, tmp, ready=READY) as lb:
            for name in names:
                lb.wait_for_log(f"pool/{name} op_state DOWN -> UP")
            w = Lab(lb, url, port, servers, config, tmp)
            _synced(w.srv(names[0]))
            yield w
    finally:
        for server in servers:
            server.stop()


def _synced(server_url: str) -> None:
    """Return once every worker has applied what the main process sent so far (the UP
    transitions): a PATCH that changes nothing is still answered only after each worker's pong."""
    code, doc = api(server_url)
    assert code == 200
    code, _ = api(server_url, "PATCH", {"weight": doc["weight"]})
    assert code == 200


def _connect(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(64)
        assert chunk, "closed before the greeting"
        data += chunk
    return sock, data.decode().strip()


def _greet_many(port: int, n: int) -> list[str]:
    out = []
    for _ in range(n):
        sock, name = _connect(port)
        sock.close()
        out.append(name)
    return out


def test_both_processes_serve_and_the_counts_add_up(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        names = _greet_many(w.port, 120)
        assert set(names) == {"s1", "s2"}
        # The kernel spreads connections over both listeners: the worker logged some of them.
        wait_until(lambda: w.worker_lines("term=") > 0, timeout=5)
        worker_share = w.worker_lines("term=")
        assert 0 < worker_share < 120
        # The main process's status counts every session, including the worker's.
        wait_until(lambda: w.status()["frontends"][0]["total_sessions"] == 120, timeout=5)
        doc = w.status()
        assert sum(s["total_sessions"] for s in doc["backends"][0]["servers"]) == 120
        held = [_connect(w.port)[0] for _ in range(16)]
        try:
            wait_until(lambda: w.status()["frontends"][0]["cur_sessions"] == 16, timeout=5)
            assert w.status()["backends"][0]["cur_sessions"] == 16
            code, metrics = api(w.url + "/metrics")
            assert code == 200
            assert re.search(r'medlb_frontend_current_sessions\{frontend="fe"\} 16(\.0)?\n', metrics)
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: w.status()["frontends"][0]["cur_sessions"] == 0, timeout=5)


def test_drain_reaches_the_worker_and_drain_wait_counts_its_sessions(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        held = [_connect(w.port) for _ in range(12)]
        try:
            on_s1 = [s for s, n in held if n == "s1"]
            assert on_s1
            # The worker reports twice a second: wait until its sessions are counted.
            wait_until(lambda: server_of(w.status(), "pool/s1")["cur_sessions"] == len(on_s1), timeout=5)
            code, doc = api(w.srv("s1"), "PATCH", {"admin_state": "drain"})
            assert code == 200
            before = w.worker_lines("server=s2")
            assert set(_greet_many(w.port, 60)) == {"s2"}  # in both processes
            wait_until(lambda: w.worker_lines("server=s2") > before, timeout=5)
            code, doc = api(w.srv("s1", "/wait?until=drained&timeout=500ms"))
            assert code == 408 and doc["cur_sessions"] == len(on_s1)
        finally:
            for sock, _ in held:
                sock.close()
        code, doc = api(w.srv("s1", "/wait?until=drained&timeout=10s"))
        assert code == 200 and doc["drained"] is True


def test_shutdown_sessions_closes_the_workers_sessions_too(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        held = [_connect(w.port) for _ in range(24)]
        try:
            victims = [s for s, n in held if n == "s1"]
            survivors = [s for s, n in held if n == "s2"]
            # Each process round-robins on its own: the split need not be 12/12.
            wait_until(lambda: server_of(w.status(), "pool/s1")["cur_sessions"] == len(victims))
            code, doc = api(w.srv("s1", "/shutdown-sessions"), "POST")
            assert code == 200 and doc["closed"] == len(victims)
            assert_reset_others_alive(victims, survivors)
            wait_until(lambda: w.worker_lines("term=admin_shutdown") > 0, timeout=5)
        finally:
            for sock, _ in held:
                sock.close()


def test_api_added_and_removed_servers_reach_the_worker(tmp_path: Path) -> None:
    with lab(tmp_path, names=("s1",)) as w:
        extra = EchoServer("s3")
        w.servers.append(extra)
        code, _ = api(
            w.url + "/api/v1/backends/pool/servers", "POST", {"name": "s3", "address": f"127.0.0.1:{extra.port}"}
        )
        assert code in (200, 201)
        w.lb.wait_for_log("pool/s3 op_state DOWN -> UP")
        assert set(_greet_many(w.port, 60)) == {"s1", "s3"}
        wait_until(lambda: w.worker_lines("server=s3") > 0, timeout=5)
        api(w.srv("s3"), "PATCH", {"admin_state": "maint"})
        wait_until(lambda: server_of(w.status(), "pool/s3")["cur_sessions"] == 0, timeout=5)
        code, _ = api(w.srv("s3"), "DELETE")
        assert code == 200
        assert set(_greet_many(w.port, 40)) == {"s1"}


def test_reload_reaches_the_worker(tmp_path: Path) -> None:
    with lab(tmp_path, names=("s1",)) as w:
        extra = EchoServer("s2")
        w.servers.append(extra)
        config = yaml.safe_load(yaml.safe_dump(w.config))
        config["backends"][0]["servers"].append({"name": "s2", "address": f"127.0.0.1:{extra.port}"})
        w.lb.config_path.write_text(yaml.safe_dump(config))
        w.lb.signal(signal.SIGHUP)
        w.lb.wait_for_log("configuration reloaded by SIGHUP")
        w.lb.wait_for_log("pool/s2 op_state DOWN -> UP")
        assert set(_greet_many(w.port, 60)) == {"s1", "s2"}
        wait_until(lambda: w.worker_lines("server=s2") > 0, timeout=5)


# --------------------------------------------------------------------------- the session board


def test_the_board_sums_every_processs_column_and_forgets_a_dead_ones() -> None:
    board = Board.create(2)  # 8 columns: main, a worker, and six for replaced workers
    assert board.columns == 8
    main, worker = board.cell(5, 0), board.cell(5, 1)
    main.add(2)
    worker.add(3)
    worker.add(-1)
    assert main.total() == worker.total() == 4
    assert board.cell(4, 0).total() == board.cell(6, 0).total() == 0  # rows do not bleed
    board.clear(1)
    assert main.total() == 2


def _on_board(maxconn: int, before: int = 0) -> tuple[Board, Runtime, Backend, Server, Any]:
    """One server with ``maxconn`` in the main process's column (``before`` sessions taken
    before it joined the board), and the cell of another process's column for it."""
    board = Board.create(2)
    runtime = _runtime("s1")
    backend = runtime.backends["pool"]
    (s1,) = backend.servers
    s1.maxconn = maxconn
    for _ in range(before):
        assert backend.select() is s1
    board.assign(runtime)
    board.share(runtime, 0, board.slots)
    return board, runtime, backend, s1, board.cell(board.slots["pool/s1"], 1)


def test_a_server_on_the_board_is_full_at_the_nodes_maxconn() -> None:
    board, runtime, backend, s1, other = _on_board(3, before=1)  # the session before is carried over
    board.share(runtime, 0, board.slots)  # idempotent
    other.add(2)
    assert s1.cur_sessions == 1 and s1.full  # 1 here + 2 there
    assert backend.select() is None and backend.saturated()
    other.add(-1)
    assert backend.select() is s1
    assert board.cell(board.slots["pool/s1"], 0).total() == 3
    backend.release(s1)
    backend.release(s1)
    assert board.cell(board.slots["pool/s1"], 0).total() == 1


def test_a_queued_session_gets_the_slot_another_process_freed() -> None:
    """Backend.release only wakes this process's queue: poll_queues notices the others' releases."""
    _, runtime, backend, s1, other = _on_board(1)
    other.add(1)

    @dataclass
    class Waiting:
        cancelled: bool = False
        key: bytes | None = None
        got: Server | None = None

        def grant(self, server: Server) -> None:
            self.got = server

    waiter = Waiting()

    async def main() -> None:
        assert backend.select() is None
        backend.queue.append(waiter)
        poller = asyncio.create_task(poll_queues(runtime))
        await asyncio.sleep(0.1)
        assert waiter.got is None  # still full
        other.add(-1)  # the other process's session ended
        for _ in range(50):
            if waiter.got is not None:
                break
            await asyncio.sleep(0.02)
        poller.cancel()

    asyncio.run(main())
    assert waiter.got is s1 and s1.cur_sessions == 1


def test_maxconn_holds_for_the_node_not_per_process(tmp_path: Path) -> None:
    """maxconn: 4 with two processes: four sessions on the server in all, not four per process.
    The others queue, and get the slots sessions of either process free. (Before the board,
    each process admitted four: eight.)"""
    with lab(tmp_path, names=("s1",), maxconn=4) as w:
        socks = [socket.create_connection(("127.0.0.1", w.port), timeout=10) for _ in range(12)]
        pending = list(socks)
        rounds = []
        try:
            while pending:
                wait_until(lambda: any(_readable(s) for s in pending), timeout=10)
                time.sleep(0.5)  # every free slot is taken by now, in both processes
                served = [s for s in pending if _readable(s)]
                rounds.append(len(served))
                for sock in served:
                    assert sock.recv(16) == b"s1\n"
                    sock.close()
                    pending.remove(sock)
        finally:
            for sock in socks:
                sock.close()
        assert rounds[0] == 4, rounds
        # Two processes can take the last free slot in the same instant: one over, at most.
        assert all(n <= 5 for n in rounds) and sum(rounds) == 12, rounds
        # Both processes took part (the kernel spreads 12 connections over both listeners).
        wait_until(lambda: w.worker_lines("server=s1") > 0, timeout=5)
        wait_until(lambda: sum("medlb.session" in x and "server=s1" in x for x in w.lb.log.splitlines()) == 12)


def test_the_migrate_hint_names_the_sysctl_unless_it_is_set(tmp_path: Path) -> None:
    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("1\n")
    assert migrate_hint(sysctl) is None
    sysctl.write_text("0\n")
    assert "'sysctl -w net.ipv4.tcp_migrate_req=1'" in (migrate_hint(sysctl) or "")
    assert "needs Linux 5.14" in (migrate_hint(tmp_path / "absent") or "")


@contextlib.contextmanager
def _sysctl(path: Path, value: str) -> Iterator[None]:
    """Set a sysctl for one test and put the old value back (tests run as root, one at a time)."""
    old = path.read_text()
    try:
        path.write_text(value)
    except OSError as exc:  # a container with a read-only /proc/sys
        pytest.skip(f"cannot set {path}: {exc}")
    try:
        yield
    finally:
        path.write_text(old)


@pytest.mark.skipif(not MIGRATE_SYSCTL.exists(), reason="net.ipv4.tcp_migrate_req needs Linux 5.14")
def test_a_hung_worker_is_killed_and_the_connections_it_queued_are_served(tmp_path: Path) -> None:
    """A stuck worker keeps its share of new connections in its accept queue. medlb kills it
    after HUNG_AFTER; with tcp_migrate_req=1 the kernel moves that queue to the main process,
    which serves every client: none is reset."""
    with _sysctl(MIGRATE_SYSCTL, "1"), lab(tmp_path) as w:
        assert "tcp_migrate_req" not in w.lb.log  # set: no hint at start
        os.kill(w.worker_pid(), signal.SIGSTOP)
        socks = [socket.create_connection(("127.0.0.1", w.port), timeout=15) for _ in range(24)]
        try:
            time.sleep(1.0)
            # The main process greeted its share at once; the stopped worker's share waits.
            waiting = [s for s in socks if not _readable(s)]
            assert waiting, "every connection went to the main process: nothing was queued on the worker"
            w.lb.wait_for_log("worker 1 sent nothing for", timeout=15)
            for sock in socks:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = sock.recv(64)
                    assert chunk, "a connection queued on the killed worker was closed unserved"
                    data += chunk
                assert data.decode().strip() in ("s1", "s2")
        finally:
            for sock in socks:
                sock.close()


def _readable(sock: socket.socket) -> bool:
    import select

    return bool(select.select([sock], [], [], 0)[0])


def test_a_dead_worker_is_restarted_and_the_port_keeps_serving(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        first = w.worker_pid()
        os.kill(first, signal.SIGKILL)
        w.lb.wait_for_log("worker 1 exited (code -9); restarting it")
        wait_until(lambda: len(re.findall(r"worker 1 started \(pid", w.lb.log)) == 2, timeout=15)
        assert w.worker_pid() != first
        before = w.worker_lines("term=")
        assert len(_greet_many(w.port, 80)) == 80  # every connection after the restart is served
        wait_until(lambda: w.worker_lines("term=") > before, timeout=5)


def test_sigterm_stops_every_process_gracefully(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        held = [_connect(w.port) for _ in range(8)]
        worker = w.worker_pid()
        w.lb.signal(signal.SIGTERM)
        time.sleep(0.5)
        for sock, _ in held:  # sessions finish during the graceful stop, in both processes
            sock.sendall(b"bye")
            assert sock.recv(16) == b"bye"
            sock.close()
        assert w.lb.proc.wait(10) == 0
        wait_until(lambda: not os.path.exists(f"/proc/{worker}"), timeout=5)
        assert "worker 1 exited" not in w.lb.log  # a stop is not a crash


def test_header_persistence_holds_across_processes(tmp_path: Path) -> None:
    """A key pinned in one process is honoured by the other: stick-table entries are shared.

    Each process round-robins on its own, so without sharing a key first seen by the
    main process lands on another server in the worker about half the time (checked
    by disabling the sharing: all 12 keys broke).
    """
    import http.client
    import json

    from tests.io.test_http import Recorder, http_config

    recorders = [Recorder("a"), Recorder("b"), Recorder("c")]
    port = free_port()
    config = http_config(port, recorders)
    config["global"]["workers"] = 2
    config["backends"][0]["persistence"] = {"type": "header", "header": "X-Study"}

    def ask(key: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/wado", headers={"X-Study": key})
            response = conn.getresponse()
            assert response.status == 200
            return str(json.loads(response.read())["server"])
        finally:
            conn.close()

    try:
        with running_medlb(config, tmp_path, ready=READY) as lb:
            for r in recorders:
                lb.wait_for_log(f"viewers/{r.name} op_state DOWN -> UP")
            keys = [f"1.2.840.{n}" for n in range(12)]
            first = {key: ask(key) for key in keys}
            assert len(set(first.values())) == 3  # the keys were balanced over the servers
            time.sleep(1.0)  # entries travel through the main process in milliseconds (no answer to wait for)
            broken = sorted({key for key in keys for _ in range(12) if ask(key) != first[key]})
            assert broken == []
            # A restarted worker learns every entry from the main process before it serves.
            pid = int(re.findall(r"worker 1 started \(pid (\d+)\)", lb.log)[-1])
            os.kill(pid, signal.SIGKILL)
            wait_until(lambda: len(re.findall(r"worker 1 started \(pid", lb.log)) == 2, timeout=15)
            broken = sorted({key for key in keys for _ in range(12) if ask(key) != first[key]})
            assert broken == []
    finally:
        for r in recorders:
            r.stop()


def test_a_server_named_by_dns_is_reached_from_the_worker(tmp_path: Path) -> None:
    """Workers run no checks, so no DNS lookups: they connect to the address the main process resolved."""
    server = EchoServer("s1")
    port = free_port()
    config = tcp_config(port, [{"name": "s1", "address": f"localhost:{server.port}"}])
    config["global"]["workers"] = 2
    try:
        with running_medlb(config, tmp_path, ready=READY) as lb:
            lb.wait_for_log("pool/s1 op_state DOWN -> UP")
            time.sleep(1.2)  # one full state message
            assert _greet_many(port, 40) == ["s1"] * 40
            wait_until(lambda: "worker 1 medlb.session" in lb.log and "server=s1" in lb.log, timeout=5)
            assert "unresolved" not in lb.log
    finally:
        server.stop()


# --------------------------------------------------------------------------- the pool, with scripted workers

FAKE_WORKER = r"""
import os, pickle, sys, time
fd = int(sys.argv[sys.argv.index("--channel-fd") + 1])
mode, record = sys.argv[1], sys.argv[2]
f = os.fdopen(fd, "r+b", buffering=0)

def recv():
    size = f.read(4)
    if len(size) < 4:
        return None
    n = int.from_bytes(size, "big")
    data = b""
    while len(data) < n:
        data += f.read(n - len(data))
    return pickle.loads(data)

def send(msg):
    data = pickle.dumps(msg)
    f.write(len(data).to_bytes(4, "big") + data)

hello = recv()
if mode == "die":
    sys.exit(3)
if mode == "refuse":
    send({"t": "error", "message": "cannot bind 127.0.0.1:1: permission denied"})
    sys.exit(1)
if mode == "fail-once":
    send({"t": "ready"})
    marker = record + ".failed"
    if not os.path.exists(marker):  # the first instance cannot apply a reload; its replacement can
        open(marker, "w").close()
        # It holds 3 sessions on the board's first server while it drains.
        import mmap
        bfd = int(sys.argv[sys.argv.index("--board-fd") + 1])
        board = memoryview(mmap.mmap(bfd, os.fstat(bfd).st_size)).cast("i")
        board[hello["board"]["column"]] = 3
        send({"t": "failed", "message": "cannot apply the reload: test"})
        time.sleep(4)  # still draining its sessions while the replacement starts (a slow machine too)
        sys.exit(1)
    while recv() is not None:
        send({"t": "report", "servers": {}, "backends": {}, "frontends": {}})
    sys.exit(0)
if mode == "hang":
    send({"t": "ready"})
    time.sleep(60)  # a stuck event loop: no report ever
    sys.exit(0)
time.sleep(float(mode))  # a slow start: messages broadcast meanwhile must not be lost
send({"t": "ready"})
with open(record, "a") as out:
    while (msg := recv()) is not None:
        out.write(repr(msg.get("t")) + " " + repr(msg.get("n")) + "\n")
        out.flush()
        if msg.get("t") == "ping":
            time.sleep(0.3)  # applying takes a while: sync() must wait for the answer
            send({"t": "pong", "id": msg["id"]})
"""


def _pool(tmp_path: Path, mode: str) -> tuple[Any, Path]:
    from medlb.io.workers import WorkerPool

    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    record = tmp_path / "record.txt"
    record.write_text("")
    runtime = _runtime("s1")
    pool = WorkerPool(
        2, runtime, lambda: {"t": "hello"}, lambda msg: None, argv=[sys.executable, str(script), mode, str(record)]
    )
    return pool, record


def test_messages_sent_while_a_worker_starts_reach_it_in_order(tmp_path: Path) -> None:
    pool, record = _pool(tmp_path, "0.5")

    async def main() -> None:
        starting = asyncio.create_task(pool.start())
        await asyncio.sleep(0.2)  # the worker has its hello and is not ready yet
        for n in range(3):
            pool.broadcast({"t": "reload", "n": n})
        await starting
        pool.broadcast({"t": "state", "n": 3})
        for _ in range(100):
            if record.read_text().count("\n") == 4:
                break
            await asyncio.sleep(0.02)
        await pool.stop(0.0)

    asyncio.run(main())
    lines = record.read_text().splitlines()
    assert lines == ["'reload' 0", "'reload' 1", "'reload' 2", "'state' 3", "'stop' None"]


@pytest.mark.parametrize(("mode", "why"), [("die", "exited before it was ready"), ("refuse", "permission denied")])
def test_a_worker_that_cannot_start_fails_the_start_with_its_reason(tmp_path: Path, mode: str, why: str) -> None:
    from medlb.errors import StartupError

    pool, _ = _pool(tmp_path, mode)
    with pytest.raises(StartupError, match=f"worker 1 failed to start: .*{why}"):
        asyncio.run(pool.start())
    assert all(w.proc is None or w.proc.returncode is not None for w in pool.workers)


def test_drained_is_only_answered_once_the_workers_have_reported_after_the_drain(tmp_path: Path) -> None:
    with lab(tmp_path) as w:
        started = time.monotonic()  # before the change: medlb stamps it before answering the PATCH
        code, _ = api(w.srv("s2"), "PATCH", {"admin_state": "drain"})
        assert code == 200
        code, doc = api(w.srv("s2", "/wait?until=drained&timeout=10s"))
        assert code == 200 and doc["drained"] is True
        assert time.monotonic() - started >= 0.9  # two report intervals after the change


def test_a_second_medlb_on_the_same_port_is_refused_not_sharing_it(tmp_path: Path) -> None:
    """SO_REUSEPORT would let a second instance take a share of the connections; medlb refuses it."""
    from tests.helpers import Medlb

    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    with lab(tmp_path / "first") as w:
        second = Medlb(w.config, tmp_path / "second")
        try:
            assert second.proc.wait(20) != 0
            assert f"cannot bind 127.0.0.1:{w.port}: address already in use" in second.log
        finally:
            second.stop()
        assert _greet_many(w.port, 4)  # the first one is unharmed


def test_a_worker_that_cannot_apply_a_reload_is_replaced_while_it_drains(tmp_path: Path) -> None:
    pool, _ = _pool(tmp_path, "fail-once")

    async def main() -> tuple[int, int, bool]:
        await pool.start()
        first, first_column = pool.workers[0].proc, pool.workers[0].column
        assert first is not None and first_column is not None
        row = pool.board.cell(0, 0)  # the board's first row, as the main process reads it
        watch = asyncio.create_task(pool.run())
        for _ in range(200):
            if pool.workers[0].ready and pool.workers[0].proc is not first:
                break
            await asyncio.sleep(0.05)
        replaced_while_draining = first.returncode is None and first in pool.retiring
        second = pool.workers[0].proc
        assert second is not None
        # The draining worker's sessions still count; its replacement writes in another column.
        assert row.total() == 3 and pool.workers[0].column not in (None, first_column)
        await first.wait()
        for _ in range(50):  # its column is zeroed once it has exited
            if row.total() == 0:
                break
            await asyncio.sleep(0.02)
        assert row.total() == 0
        await pool.stop(0.0)
        watch.cancel()
        return first.pid, second.pid, replaced_while_draining

    first, second, draining = asyncio.run(main())
    assert first != second
    assert draining  # the replacement started before the failed worker had finished


def test_a_hung_worker_is_killed_and_restarted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from medlb.io import workers

    monkeypatch.setattr(workers, "HUNG_AFTER", 0.5)
    pool, _ = _pool(tmp_path, "hang")

    async def main() -> int:
        await pool.start()
        watch = asyncio.create_task(pool.run())
        for _ in range(100):
            if pool.workers[0].restarts:
                break
            await asyncio.sleep(0.05)
        await pool.stop(0.0)
        watch.cancel()
        return pool.workers[0].restarts

    assert asyncio.run(main()) >= 1


def test_a_worker_refuses_a_main_process_running_other_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An upgrade of the files under a running medlb: a new worker would speak another channel version."""
    from medlb.errors import StartupError
    from medlb.io import workers
    from medlb.io.workers import WorkerPool

    monkeypatch.setattr(workers, "CODE", "0000000000000000")
    pool = WorkerPool(2, _runtime("s1"), lambda: {"t": "hello"}, lambda msg: None)
    with pytest.raises(StartupError, match="code on disk differs from the running main process"):
        asyncio.run(pool.start())


def test_a_reload_moving_an_address_between_tcp_and_hl7_is_refused(tmp_path: Path) -> None:
    with lab(tmp_path, names=("s1",)) as w:
        config = yaml.safe_load(yaml.safe_dump(w.config))
        config["frontends"][0]["mode"] = "hl7"
        w.lb.config_path.write_text(yaml.safe_dump(config))
        w.lb.signal(signal.SIGHUP)
        w.lb.wait_for_log("reload by SIGHUP refused")
        assert f"127.0.0.1:{w.port} moves from a mode tcp frontend to mode hl7" in w.lb.log
        assert _greet_many(w.port, 4) == ["s1"] * 4  # still the tcp frontend, in every process


def test_sync_returns_once_every_worker_answered_after_the_changes(tmp_path: Path) -> None:
    """The admin API answers a drain only after this: then no process takes new sessions on it."""
    pool, record = _pool(tmp_path, "0")

    async def main() -> float:
        await pool.start()
        watch = asyncio.create_task(pool.run())
        pool.broadcast({"t": "state", "n": 1})
        started = time.monotonic()
        await pool.sync()
        took = time.monotonic() - started
        await pool.stop(0.0)
        watch.cancel()
        return took

    took = asyncio.run(main())
    assert 0.25 <= took < 2.0
    lines = record.read_text().splitlines()
    # What was sent before, then the full server state sync() flushes, then its ping.
    assert lines[:3] == ["'state' 1", "'state' None", "'ping' None"]
