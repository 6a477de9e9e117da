"""Hitless reload, end to end: SIGHUP and the API under live traffic.

The promises: listeners that did not change keep their sockets (no refused
connection under churn), established sessions keep running on their server,
surviving servers keep their health and admin state, new servers warm up
before taking traffic, removed servers drain, and a bad config changes nothing.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    AdminLab,
    Backend,
    Medlb,
    admin_medlb,
    api,
    free_port,
    greet,
    running_medlb,
    server_of,
    tcp_config,
    wait_until,
    with_admin,
)


def _config(port: int, servers: list[Backend], **extra: Any) -> dict[str, Any]:
    config = tcp_config(port, [{"name": b.name, "address": f"127.0.0.1:{b.port}"} for b in servers])
    config.update(extra)
    return config


def _rewrite(lb: Medlb, config: dict[str, Any]) -> None:
    tmp = lb.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(lb.config_path)  # atomic, as config management tools do


def _open(port: int) -> tuple[socket.socket, str]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    data = b""
    while not data.endswith(b"\n"):
        data += sock.recv(64)
    return sock, data.decode().strip()


@contextlib.contextmanager
def one_server(tmp_path: Path) -> Iterator[AdminLab]:
    """medlb in front of one UP echo server ``s1``, with the admin API."""
    with admin_medlb(tmp_path, ("s1",)) as env:
        yield env


class Churn(threading.Thread):
    """Opens and closes sessions as fast as it can; counts failures of any kind."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.ok = 0
        self.failures: list[str] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            try:
                name = greet(self.port, timeout=5)
                if not name:
                    self.failures.append("empty greeting")
                else:
                    self.ok += 1
            except OSError as exc:
                self.failures.append(repr(exc))


def test_sighup_reloads_under_churn_with_zero_refused_connections(tmp_path: Path) -> None:
    s1, s2, s3 = Backend("s1"), Backend("s2"), Backend("s3")
    port = free_port()
    config = _config(port, [s1, s2])
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s2 op_state DOWN -> UP")
            long_sock, long_server = _open(port)
            churn = [Churn(port), Churn(port)]
            for c in churn:
                c.start()
            variants = [
                _config(port, [s1, s2, s3]),  # add a server
                _config(port, [s2, s3]),  # remove one (the long session may be on it)
                _config(port, [s1, s2, s3]),
                _config(port, [s1, s2]),
            ]
            for n, variant in enumerate(variants * 2, start=1):
                _rewrite(lb, variant)
                lb.signal(signal.SIGHUP)
                wait_until(lambda n=n: lb.log.count("configuration reloaded by SIGHUP") >= n)
                time.sleep(0.15)
            for c in churn:
                c.halt.set()
            for c in churn:
                c.join(10)
            assert sum(c.ok for c in churn) > 200
            assert [f for c in churn for f in c.failures] == []
            # The long session survived eight reloads, on its original server.
            long_sock.sendall(b"still here")
            assert long_sock.recv(64) == b"still here"
            long_sock.close()
            wait_until(lambda: f"server={long_server} " in lb.log.split("configuration reloaded")[-1])
            assert "term=client_close" in lb.log.split("configuration reloaded")[-1]
    finally:
        for b in (s1, s2, s3):
            b.stop()


def test_reload_keeps_health_and_admin_state_and_warms_up_new_servers(tmp_path: Path) -> None:
    s1, s2, s3 = Backend("s1"), Backend("s2"), Backend("s3")
    port = free_port()
    config = _config(port, [s1, s2])
    url = with_admin(config, tmp_path)
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s2 op_state DOWN -> UP")
            api(f"{url}/api/v1/backends/pool/servers/s1", "PATCH", {"admin_state": "drain"})
            new = _config(port, [s1, s2, s3])
            new["admin"] = config["admin"]
            # Slow checks for the new server: it must stay out until its first one passes.
            new["backends"][0]["servers"][2]["check"] = {"inter": "1s"}
            _rewrite(lb, new)
            code, doc = api(f"{url}/api/v1/reload", "POST")
            assert code == 200, doc
            assert "servers kept 2, added 1, removed 0" in doc["message"]
            code, status = api(f"{url}/api/v1/status")
            s1_doc, s2_doc = server_of(status, "pool/s1"), server_of(status, "pool/s2")
            assert s1_doc["admin_state"] == "drain" and s1_doc["op_state"] == "UP"
            assert s2_doc["op_state"] == "UP" and s2_doc["state_changes"] == 1  # no flap
            lb.wait_for_log("pool/s3 op_state DOWN -> UP")
            seen = {greet(port) for _ in range(6)}
            assert seen == {"s2", "s3"}
            lb.wait_for_log("server=s3 ")  # a session's line is written once it has closed
            log = lb.log
            assert log.index("pool/s3 op_state DOWN -> UP") < log.index("server=s3 ")
    finally:
        for b in (s1, s2, s3):
            b.stop()


def test_a_removed_server_drains_its_sessions(tmp_path: Path) -> None:
    s1, s2 = Backend("s1"), Backend("s2")
    port = free_port()
    config = _config(port, [s1, s2])
    url = with_admin(config, tmp_path)
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s2 op_state DOWN -> UP")
            sessions = [_open(port) for _ in range(2)]
            on_s1 = next(sock for sock, name in sessions if name == "s1")
            new = _config(port, [s2])
            new["admin"] = config["admin"]
            _rewrite(lb, new)
            code, doc = api(f"{url}/api/v1/reload", "POST")
            assert code == 200 and "removed 1" in doc["message"]
            lb.wait_for_log("server pool/s1 removed from the config: draining 1 session(s)")
            code, status = api(f"{url}/api/v1/status")
            retired = server_of(status, "pool/s1")
            assert retired["retired"] is True and retired["cur_sessions"] == 1
            assert {greet(port) for _ in range(3)} == {"s2"}
            on_s1.sendall(b"ping")
            assert on_s1.recv(64) == b"ping"
            for sock, _ in sessions:
                sock.close()

            def gone() -> bool:
                _, st = api(f"{url}/api/v1/status")
                return [s["name"] for s in st["backends"][0]["servers"]] == ["s2"]

            wait_until(gone)
    finally:
        for b in (s1, s2):
            b.stop()


def test_reload_moves_a_listener_and_rejects_a_port_in_use(tmp_path: Path) -> None:
    s1 = Backend("s1")
    port, new_port = free_port(), free_port()
    config = _config(port, [s1])
    url = with_admin(config, tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s1 op_state DOWN -> UP")
            busy = dict(config)
            busy["frontends"] = [dict(config["frontends"][0], bind=[f"127.0.0.1:{blocker.getsockname()[1]}"])]
            _rewrite(lb, busy)
            code, doc = api(f"{url}/api/v1/reload", "POST")
            assert code == 422 and "address already in use" in doc["message"]
            assert greet(port) == "s1"  # nothing changed
            moved = dict(config)
            moved["frontends"] = [dict(config["frontends"][0], bind=[f"127.0.0.1:{new_port}"])]
            _rewrite(lb, moved)
            code, doc = api(f"{url}/api/v1/reload", "POST")
            assert code == 200, doc
            assert greet(new_port) == "s1"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("the old listener should be closed")
    finally:
        blocker.close()
        s1.stop()


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"frontends: [unclosed\n", "YAML syntax error"),
        ("# Z\xfcrich\n".encode("latin-1"), "the file is not UTF-8 text"),
    ],
    ids=["yaml-syntax", "not-utf8"],
)
def test_sighup_with_a_bad_file_is_refused_not_fatal(tmp_path: Path, content: bytes, expected: str) -> None:
    with one_server(tmp_path) as one:
        lb, port = one.lb, one.port
        lb.config_path.write_bytes(content)
        lb.signal(signal.SIGHUP)
        lb.wait_for_log("configuration reload by SIGHUP refused, still running the previous one")
        lb.wait_for_log(expected)
        assert greet(port) == "s1"
        assert lb.proc.poll() is None


def test_reload_applies_a_new_maxconn_to_a_running_frontend(tmp_path: Path) -> None:
    with one_server(tmp_path) as one:
        lb, port = one.lb, one.port
        limited = _config(port, [one.backends[0]])
        limited["frontends"][0]["maxconn"] = 1
        _rewrite(lb, limited)
        lb.signal(signal.SIGHUP)
        lb.wait_for_log("configuration reloaded by SIGHUP")
        first, _ = _open(port)
        second = socket.create_connection(("127.0.0.1", port), timeout=0.5)
        try:
            # The kernel completes the handshake, but medlb does not accept beyond maxconn.
            try:
                data = second.recv(64)
            except TimeoutError:
                data = b""
            assert data == b""
            first.close()
            second.settimeout(5)
            assert second.recv(64) == b"s1\n"  # accepted once the first session ended
        finally:
            second.close()


def test_reload_with_an_unreadable_secret_changes_nothing(tmp_path: Path) -> None:
    with one_server(tmp_path) as one:
        lb, port, url, config = one.lb, one.port, one.url, one.config
        new = _config(port, [one.backends[0]])
        new["admin"] = config["admin"]
        new["backends"][0]["servers"][0]["weight"] = 9
        new["alerts"] = {
            "email": {
                "host": "127.0.0.1",
                "from": "lb@example.org",
                "to": ["pacs-admins@example.org"],
                "username": "medlb",
                "password_file": str(tmp_path / "missing-password"),
            }
        }
        _rewrite(lb, new)
        code, doc = api(f"{url}/api/v1/reload", "POST")
        assert code == 422 and "missing-password" in doc["message"]
        _, status = api(f"{url}/api/v1/status")
        assert server_of(status, "pool/s1")["weight"] == 1
        # A new token file that is too short is refused the same way; the old token keeps working.
        (tmp_path / "admin.token").write_text("short\n")
        _rewrite(lb, config)
        code, doc = api(f"{url}/api/v1/reload", "POST")
        assert code == 422 and "at least 16 characters" in doc["message"]
        assert api(f"{url}/api/v1/status")[0] == 200


def test_renaming_a_frontend_moves_its_socket(tmp_path: Path) -> None:
    with one_server(tmp_path) as one:
        lb, port, url, config = one.lb, one.port, one.url, one.config
        held, _ = _open(port)
        renamed = yaml.safe_load(yaml.safe_dump(config))
        renamed["frontends"][0]["name"] = "dicom"
        _rewrite(lb, renamed)
        code, doc = api(f"{url}/api/v1/reload", "POST")
        assert code == 200, doc
        lb.wait_for_log(f"frontend dicom: took over listener 127.0.0.1:{port}")
        assert greet(port) == "s1"
        _, status = api(f"{url}/api/v1/status")
        assert [f["name"] for f in status["frontends"]] == ["dicom"]
        held.sendall(b"old frontend, still here")
        assert held.recv(64) == b"old frontend, still here"
        held.close()


def test_a_frontend_added_by_a_reload_gets_its_protocol_mode(tmp_path: Path) -> None:
    """An hl7 (or dicom, http) frontend added by a reload must not come up as raw TCP."""
    with one_server(tmp_path) as one:
        lb, url, config = one.lb, one.url, one.config
        added = yaml.safe_load(yaml.safe_dump(config))
        for mode in ("hl7", "dicom", "http"):
            added["frontends"].append(
                {"name": f"new_{mode}", "mode": mode, "bind": [f"127.0.0.1:{free_port()}"], "default_backend": "pool"}
            )
        _rewrite(lb, added)
        code, doc = api(f"{url}/api/v1/reload", "POST")
        assert code == 200, doc
        _, status = api(f"{url}/api/v1/status")
        modes = {f["name"]: f["mode"] for f in status["frontends"]}
        assert modes == {"fe": "tcp", "new_hl7": "hl7", "new_dicom": "dicom", "new_http": "http"}


def test_an_operator_removal_does_not_outlive_its_backend(tmp_path: Path) -> None:
    s1, s2 = Backend("s1"), Backend("s2")
    port = free_port()
    config = _config(port, [s1, s2])
    url = with_admin(config, tmp_path)
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s2 op_state DOWN -> UP")
            api(f"{url}/api/v1/backends/pool/servers/s2", "PATCH", {"admin_state": "maint"})
            assert api(f"{url}/api/v1/backends/pool/servers/s2", "DELETE")[0] == 200
            assert api(f"{url}/api/v1/reload", "POST")[0] == 200  # unchanged file: s2 stays removed
            _, status = api(f"{url}/api/v1/status")
            assert [s["name"] for s in status["backends"][0]["servers"]] == ["s1"]
            # The backend goes away, then comes back from the file: s2 is back for good.
            without = yaml.safe_load(yaml.safe_dump(config))
            without["backends"].append(dict(without["backends"][0], name="tmp"))
            without["frontends"][0]["default_backend"] = "tmp"
            del without["backends"][0]
            _rewrite(lb, without)
            assert api(f"{url}/api/v1/reload", "POST")[0] == 200
            _rewrite(lb, config)
            assert api(f"{url}/api/v1/reload", "POST")[0] == 200
            assert api(f"{url}/api/v1/reload", "POST")[0] == 200
            _, status = api(f"{url}/api/v1/status")
            assert [s["name"] for s in status["backends"][0]["servers"]] == ["s1", "s2"]
    finally:
        s1.stop()
        s2.stop()
