"""End to end through a real ``medlb run`` process: failover under load, admin
states from the config, the feedback agent, and graceful stop."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from medlb.proto import proxy_protocol
from tests.helpers import (
    Backend,
    ThreadedServer,
    free_port,
    greet,
    one_server_medlb,
    running_medlb,
    tcp_config,
    wait_until,
)


def test_killed_server_costs_no_client_connection_and_is_marked_down(tmp_path: Path) -> None:
    """Three servers under steady connection load; one dies. With retries and
    redispatch no client sees a failure, and the dead server is DOWN within
    fall x inter (2 x 200 ms) plus scheduling slack."""
    backends = [Backend(f"s{i}") for i in range(3)]
    port = free_port()
    config = tcp_config(port, [{"name": b.name, "address": f"127.0.0.1:{b.port}"} for b in backends])
    failures: list[str] = []
    served: Counter[str] = Counter()
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            try:
                name = greet(port)
            except OSError as exc:
                failures.append(repr(exc))
            else:
                # An empty answer is a failure too: the connection closed unserved.
                served[name] += 1 if name else 0
                if not name:
                    failures.append("closed without a greeting")

    try:
        with running_medlb(config, tmp_path) as lb:
            for b in backends:
                lb.wait_for_log(f"pool/{b.name} op_state DOWN -> UP")
            with ThreadPoolExecutor(4) as pool:
                for _ in range(4):
                    pool.submit(client)
                time.sleep(1.0)
                killed_at = time.monotonic()
                backends[1].stop()
                seen_down = lb.wait_for_log("pool/s1 op_state UP -> DOWN", timeout=5)
                time.sleep(1.0)
                stop.set()
            assert failures == []
            # Two failed connects at 0.2 s intervals, plus slack for a busy machine (not a 30 s inter).
            assert seen_down - killed_at < 3.0
            assert served["s0"] > 20 and served["s2"] > 20
            assert re.search(r"connect to pool/s1 .* failed", lb.log)
    finally:
        for b in backends:
            if b is not backends[1]:
                b.stop()


def test_drain_and_maint_from_config(tmp_path: Path) -> None:
    ready, drain, maint = Backend("ready"), Backend("drain"), Backend("maint")
    port = free_port()
    config = tcp_config(
        port,
        [
            {"name": "ready", "address": f"127.0.0.1:{ready.port}"},
            {"name": "drain", "address": f"127.0.0.1:{drain.port}", "admin_state": "drain"},
            {"name": "maint", "address": f"127.0.0.1:{maint.port}", "admin_state": "maint"},
        ],
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/drain op_state DOWN -> UP")  # DRAIN keeps checking
            assert {greet(port) for _ in range(6)} == {"ready"}
            time.sleep(0.5)
            assert drain.accepted >= 2  # health checks only
            assert maint.accepted == 0  # MAINT: no traffic and no checks
            assert "pool/maint op_state" not in lb.log
    finally:
        for b in (ready, drain, maint):
            b.stop()


def test_backup_takes_over_when_primaries_die(tmp_path: Path) -> None:
    primary, backup = Backend("primary"), Backend("backup")
    port = free_port()
    config = tcp_config(
        port,
        [
            {"name": "primary", "address": f"127.0.0.1:{primary.port}"},
            {"name": "backup", "address": f"127.0.0.1:{backup.port}", "backup": True},
        ],
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/backup op_state DOWN -> UP")
            lb.wait_for_log("pool/primary op_state DOWN -> UP")
            assert {greet(port) for _ in range(4)} == {"primary"}
            primary.stop()
            # Even before the check notices, redispatch hands sessions to the backup.
            assert {greet(port) for _ in range(4)} == {"backup"}
            lb.wait_for_log("pool/primary op_state UP -> DOWN")
    finally:
        backup.stop()


class AgentServer(ThreadedServer):
    """A feedback agent (Loadbalancer.org / HAProxy agent-check) answering ``reply``."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        super().__init__()

    def respond(self, sock: socket.socket) -> None:
        sock.sendall(f"{self.reply}\n".encode())


def test_agent_drives_weight_and_state(tmp_path: Path) -> None:
    a, b = Backend("a"), Backend("b")
    agent = AgentServer("25%")
    port = free_port()
    config = tcp_config(
        port,
        [
            {
                "name": "a",
                "address": f"127.0.0.1:{a.port}",
                "agent": {"port": agent.port, "inter": "100ms"},
            },
            {"name": "b", "address": f"127.0.0.1:{b.port}"},
        ],
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/a agent weight 100% -> 25%")
            lb.wait_for_log("pool/b op_state DOWN -> UP")
            lb.wait_for_log("pool/a op_state DOWN -> UP")
            seen = Counter(greet(port) for _ in range(50))
            assert seen["a"] == 10 and seen["b"] == 40, seen
            agent.reply = "drain"
            lb.wait_for_log("pool/a admin_state READY -> DRAIN")
            assert {greet(port) for _ in range(6)} == {"b"}
            agent.reply = "ready 100%"
            lb.wait_for_log("pool/a admin_state DRAIN -> READY")
            assert {greet(port) for _ in range(6)} == {"a", "b"}
    finally:
        for s in (a, b):
            s.stop()
        agent.stop()


def test_graceful_stop_lets_sessions_finish(tmp_path: Path) -> None:
    with one_server_medlb(tmp_path) as (lb, port):
        session = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert session.recv(16) == b"s1\n"
        lb.signal(signal.SIGTERM)
        lb.wait_for_log("stopping: listeners closed, waiting up to 5s for 1 session(s)")
        # New clients are refused; the established session still works.
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        session.sendall(b"still here")
        assert session.recv(64) == b"still here"
        assert lb.proc.poll() is None
        session.close()
        assert lb.proc.wait(5) == 0
        assert "hard_stop_after reached" not in lb.log
        assert re.search(r"session client=\S+ frontend=fe backend=pool server=s1 .* term=client_close", lb.log)


def test_hard_stop_after_cuts_what_is_left(tmp_path: Path) -> None:
    with one_server_medlb(tmp_path, hard_stop_after="500ms") as (lb, port):
        session = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert session.recv(16) == b"s1\n"
        start = time.monotonic()
        lb.signal(signal.SIGTERM)
        assert lb.proc.wait(5) == 0
        assert 0.4 < time.monotonic() - start < 3.0
        with pytest.raises(ConnectionResetError):  # cut, and told so: a RST, not a FIN
            session.recv(64)
        assert "hard_stop_after reached: closed 1 session(s)" in lb.log
        assert "term=hard_stop" in lb.log
        session.close()


def test_idle_client_and_flood_do_not_disturb_others(tmp_path: Path) -> None:
    """A client that says nothing and one that floods (server reads slowly) do not
    stop a third client from being served promptly."""
    with one_server_medlb(tmp_path) as (lb, port):
        silent = socket.create_connection(("127.0.0.1", port), timeout=5)
        flood = socket.create_connection(("127.0.0.1", port), timeout=5)
        flood.setblocking(False)
        blob = b"x" * 1_000_000
        sent = 0
        for _ in range(50):
            try:
                sent += flood.send(blob)
            except BlockingIOError:
                break
        assert sent > 0
        start = time.monotonic()
        assert greet(port) == "s1"
        assert time.monotonic() - start < 1.0
        wait_until(lambda: lb.proc.poll() is None)
        silent.close()
        flood.close()


class ProxyProtocolServer(ThreadedServer):
    """Reads a PROXY header (with medlb's own parser), then answers with what it learnt."""

    def respond(self, sock: socket.socket) -> None:
        buf = b""
        header = None
        while header is None:
            chunk = sock.recv(512)
            if not chunk:
                return
            buf += chunk
            header = proxy_protocol.parse(buf)
        sock.sendall(f"v{header.version} {header.src} {header.dst}\n".encode())


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_proxy_protocol_tells_the_server_who_the_client_is(tmp_path: Path, version: str) -> None:
    server = ProxyProtocolServer()
    port = free_port()
    config = tcp_config(
        port,
        [{"name": "s1", "address": f"127.0.0.1:{server.port}"}],
        proxy_protocol=version,
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s1 op_state DOWN -> UP")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
                client_port = client.getsockname()[1]
                line = client.recv(128).decode().strip()
            assert line == f"{version} ('127.0.0.1', {client_port}) ('127.0.0.1', {port})"
    finally:
        server.stop()


def test_external_check_marks_servers_by_exit_code(tmp_path: Path) -> None:
    """The HAProxy / Loadbalancer.org contract: ``script <vip> <vport> <addr> <port>``;
    exit 0 is UP. The script here fails for one server only, by its port."""
    good, bad = Backend("good"), Backend("bad")
    script = tmp_path / "check.sh"
    script.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n[ "$4" != "{bad.port}" ]\n')
    script.chmod(0o755)
    port = free_port()
    config = tcp_config(
        port,
        [
            {"name": "good", "address": f"127.0.0.1:{good.port}"},
            {"name": "bad", "address": f"127.0.0.1:{bad.port}"},
        ],
        check={"type": "external", "command": str(script)},
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/good op_state DOWN -> UP")
            lb.wait_for_log("server pool/bad health check failed: exit 1")
            assert {greet(port) for _ in range(4)} == {"good"}
            calls = (tmp_path / "calls").read_text().splitlines()
            assert f"127.0.0.1 {port} 127.0.0.1 {good.port}" in calls
            assert f"127.0.0.1 {port} 127.0.0.1 {bad.port}" in calls
    finally:
        good.stop()
        bad.stop()


def test_missing_check_script_is_explained_and_medlb_stays_up(tmp_path: Path) -> None:
    backend = Backend("s1")
    port = free_port()
    config = tcp_config(
        port,
        [{"name": "s1", "address": f"127.0.0.1:{backend.port}"}],
        check={"type": "external", "command": str(tmp_path / "nope.sh")},
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("server pool/s1 health check failed: check script not found")
            time.sleep(0.5)
            assert lb.proc.poll() is None
            assert lb.log.count("check script not found") == 1  # explained once, not every check
    finally:
        backend.stop()


def test_sighup_reloads_without_killing_the_balancer(tmp_path: Path) -> None:
    """`systemctl reload` sends SIGHUP; its default action would drop every session."""
    with one_server_medlb(tmp_path) as (lb, port):
        session = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert session.recv(16) == b"s1\n"
        lb.signal(signal.SIGHUP)
        lb.wait_for_log("configuration reloaded by SIGHUP")
        session.sendall(b"alive")
        assert session.recv(16) == b"alive"
        assert lb.proc.poll() is None
        session.close()


def test_a_server_going_down_sends_a_webhook_alert(tmp_path: Path) -> None:
    """The alert wiring end to end: a real medlb, a real HTTP receiver, a server that dies."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict[str, object]] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    s1, s2 = Backend("s1"), Backend("s2")
    port = free_port()
    config = tcp_config(port, [{"name": b.name, "address": f"127.0.0.1:{b.port}"} for b in (s1, s2)])
    config["alerts"] = {"webhook": {"url": f"http://127.0.0.1:{receiver.server_address[1]}/hook"}}
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s2 op_state DOWN -> UP")
            s2.stop()
            lb.wait_for_log("pool/s2 op_state UP -> DOWN")
            wait_until(lambda: any(a["kind"] == "server_down" for a in received))
            alert = next(a for a in received if a["kind"] == "server_down")
            assert alert["subject"] == "pool/s2" and alert["severity"] == "warning"
            assert "DOWN" in str(alert["text"]) and alert["source"] == "medlb"
            s1.stop()
            lb.wait_for_log("pool/s1 op_state UP -> DOWN")
            wait_until(lambda: any(a["kind"] == "backend_down" for a in received))
            down = next(a for a in received if a["kind"] == "backend_down")
            assert down["subject"] == "pool" and down["severity"] == "critical"
    finally:
        receiver.shutdown()
        receiver.server_close()
        for b in (s1, s2):
            with contextlib.suppress(OSError):
                b.stop()
