"""The admin API contract, end to end against a real ``medlb run`` process.

Every endpoint of the issue, its auth failures and its bad inputs. The
process is real (subprocess, uvloop, real sockets); the clients are urllib.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers import (
    TOKEN,
    Backend,
    Medlb,
    admin_medlb,
    api,
    assert_reset_others_alive,
    free_port,
    greet,
    running_medlb,
    self_signed_cert,
    server_of,
    tcp_config,
    wait_until,
    with_admin,
)


class Lab:
    """medlb with an admin API in front of two echo servers s1, s2 (both UP)."""

    def __init__(self, lb: Medlb, url: str, port: int, backends: list[Backend], config: dict[str, Any]) -> None:
        self.lb = lb
        self.url = url
        self.port = port
        self.backends = backends
        self.config = config

    def status(self) -> dict[str, Any]:
        code, doc = api(self.url + "/api/v1/status")
        assert code == 200, doc
        return dict(doc)

    def server(self, key: str) -> dict[str, Any]:
        return server_of(self.status(), key)

    def srv(self, name: str, suffix: str = "") -> str:
        return f"{self.url}/api/v1/backends/pool/servers/{name}{suffix}"

    def open_session(self) -> tuple[socket.socket, str]:
        """An open session through medlb and the name of the server it landed on."""
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        data = b""
        while not data.endswith(b"\n"):
            data += sock.recv(64)
        return sock, data.decode().strip()

    def rewrite(self, config: dict[str, Any]) -> None:
        self.lb.config_path.write_text(yaml.safe_dump(config))


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with admin_medlb(tmp_path) as env:
        yield Lab(env.lb, env.url, env.port, env.backends, env.config)


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    ("headers", "token"),
    [
        ({}, None),
        ({}, "not-the-token-at-all-xxxxx"),
        ({"Authorization": f"Basic {TOKEN}"}, None),
        ({"Authorization": "Bearer"}, None),
    ],
    ids=["missing", "wrong", "basic-scheme", "empty-bearer"],
)
def test_requests_without_the_token_get_401_and_no_data(lab: Lab, headers: dict[str, str], token: str | None) -> None:
    for method, path in (("GET", "/api/v1/status"), ("GET", "/metrics"), ("POST", "/api/v1/reload")):
        code, doc = api(lab.url + path, method, token=token, headers=headers)
        assert code == 401, (path, doc)
        assert "authentication required" in doc["error"]
        assert "backends" not in doc
    code, _ = api(lab.srv("s1"), "PATCH", {"admin_state": "maint"}, token=token, headers=headers)
    assert code == 401
    assert lab.server("pool/s1")["admin_state"] == "ready"  # nothing changed
    lab.lb.wait_for_log("refused:")


def test_a_wrong_token_is_logged_without_the_token(lab: Lab) -> None:
    secret_guess = "guess-guess-guess-1234567"
    code, _ = api(lab.url + "/api/v1/status", token=secret_guess)
    assert code == 401
    lab.lb.wait_for_log("GET /api/v1/status from 127.0.0.1 refused: invalid token")
    assert secret_guess not in lab.lb.log
    assert TOKEN not in lab.lb.log


def test_dashboard_login_sets_an_httponly_cookie_and_changes_need_the_csrf_header(lab: Lab) -> None:
    import urllib.request

    code, doc = api(lab.url + "/api/v1/login", "POST", {"token": "wrong-wrong-wrong-wrong"}, token=None)
    assert (code, doc["error"]) == (401, "invalid token")
    request = urllib.request.Request(lab.url + "/api/v1/login", data=b'{"token": "%s"}' % TOKEN.encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=5) as response:
        cookie_header = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header and "Path=/" in cookie_header
    cookie = cookie_header.split(";", 1)[0]
    code, doc = api(lab.url + "/api/v1/status", token=None, headers={"Cookie": cookie})
    assert code == 200 and doc["backends"][0]["name"] == "pool"
    code, doc = api(lab.srv("s1"), "PATCH", {"admin_state": "drain"}, token=None, headers={"Cookie": cookie})
    assert code == 403 and "X-Medlb-Request" in doc["error"]
    assert lab.server("pool/s1")["admin_state"] == "ready"
    code, doc = api(
        lab.srv("s1"), "PATCH", {"admin_state": "drain"}, token=None, headers={"Cookie": cookie, "X-Medlb-Request": "1"}
    )
    assert code == 200 and doc["admin_state"] == "drain"
    assert "operator via dashboard" in doc["admin_source"]
    code, _ = api(
        lab.url + "/api/v1/logout", "POST", {}, token=None, headers={"Cookie": cookie, "X-Medlb-Request": "1"}
    )
    assert code == 200
    code, _ = api(lab.url + "/api/v1/status", token=None, headers={"Cookie": cookie})
    assert code == 401
    code, _ = api(lab.url + "/api/v1/status", token=None, headers={"Cookie": "medlb_session=forged"})
    assert code == 401


def test_client_text_cannot_forge_log_lines(lab: Lab) -> None:
    forged = "/x%0a2026-01-01 00:00:00,000 WARNING medlb.state: server pool/s1 admin_state READY -> MAINT".replace(
        " ", "%20"
    )
    code, _ = api(lab.url + forged, token=None)
    assert code == 401
    lab.lb.wait_for_log("refused: no token")
    assert "\n2026-01-01" not in lab.lb.log
    code, doc = api(lab.srv("s1"), "PATCH", {"admin_state": "drain", "reason": "ok\nWARNING forged"})
    assert code == 400 and "no line breaks" in doc["error"]
    code, doc = api(lab.url + "/api/v1/login", "POST", raw=b'{"token": "\\ud800"}', token=None)
    assert code == 401 and doc["error"] == "invalid token"


def test_security_headers_and_unknown_routes(lab: Lab) -> None:
    import urllib.request

    with urllib.request.urlopen(lab.url + "/", timeout=5) as response:
        assert response.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in response.headers["Content-Security-Policy"]
    code, doc = api(lab.url + "/api/v1/nothing-here")
    assert code == 404 and "error" in doc
    code, doc = api(lab.url + "/api/v1/status", "DELETE")
    assert code == 405


# --------------------------------------------------------------------------- status


def test_status_reports_frontends_backends_and_servers_after_known_traffic(lab: Lab) -> None:
    for _ in range(4):
        greet(lab.port)
    # The last session may still be closing when its greeting arrived: wait for both counts.
    wait_until(lambda: (fe := lab.status()["frontends"][0])["total_sessions"] == 4 and fe["cur_sessions"] == 0)
    doc = lab.status()
    (fe,) = doc["frontends"]
    assert fe["name"] == "fe" and fe["mode"] == "tcp" and fe["binds"] == [f"127.0.0.1:{lab.port}"]
    assert fe["default_backend"] == "pool" and fe["cur_sessions"] == 0
    (backend,) = doc["backends"]
    assert backend["up"] is True and backend["total_sessions"] == 4 and backend["queue"] == 0
    servers = {s["name"]: s for s in backend["servers"]}
    assert set(servers) == {"s1", "s2"}
    for name, s in servers.items():
        assert s["address"] == f"127.0.0.1:{lab.backends[int(name[1]) - 1].port}"
        assert s["op_state"] == "UP" and s["admin_state"] == "ready"
        assert s["weight"] == 1 and s["effective_weight"] == 1.0
        assert s["total_sessions"] == 2  # round robin
        assert s["bytes_out"] == 2 * len(f"{name}\n")  # each greeting, counted per server
        assert s["last_check"]["ok"] is True and "L4OK" in s["last_check"]["text"]
        assert abs(s["last_check"]["at"] - time.time()) < 60
        assert s["last_change"] <= time.time()
    # A running session shows up live, bytes included, before it ends.
    sock, name = lab.open_session()
    with sock:
        sock.sendall(b"x" * 1000)
        got = b""
        while len(got) < 1000:
            got += sock.recv(4096)
        s = lab.server(f"pool/{name}")
        assert s["cur_sessions"] == 1
        assert s["bytes_in"] == 1000


# --------------------------------------------------------------------------- PATCH


def test_drain_stops_new_sessions_but_keeps_running_ones(lab: Lab) -> None:
    sock, name = lab.open_session()
    with sock:
        code, doc = api(lab.srv(name), "PATCH", {"admin_state": "drain", "reason": "patching"})
        assert code == 200 and doc["admin_state"] == "drain" and doc["cur_sessions"] == 1
        other = "s2" if name == "s1" else "s1"
        assert {greet(lab.port) for _ in range(4)} == {other}
        sock.sendall(b"still here")  # the drained session keeps working
        assert sock.recv(64) == b"still here"
    lab.lb.wait_for_log(f"pool/{name} admin_state READY -> DRAIN (operator via token from 127.0.0.1: patching)")
    code, doc = api(lab.srv(name), "PATCH", {"admin_state": "ready"})
    assert code == 200
    assert {greet(lab.port) for _ in range(4)} == {"s1", "s2"}


def test_weight_changes_the_share(lab: Lab) -> None:
    code, doc = api(lab.srv("s1"), "PATCH", {"weight": 3})
    assert code == 200 and doc["weight"] == 3
    names = [greet(lab.port) for _ in range(8)]
    assert names.count("s1") == 6 and names.count("s2") == 2
    code, doc = api(lab.srv("s2"), "PATCH", {"weight": 0})
    assert code == 200
    assert {greet(lab.port) for _ in range(3)} == {"s1"}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"admin_state": "bogus"}, 400, "admin_state must be one of ready, drain, maint"),
        ({"admin_state": None}, 400, "admin_state must be one of"),
        ({"weight": 300}, 400, "weight must be an integer 0..256"),
        ({"weight": True}, 400, "weight must be an integer"),
        ({"weight": "2"}, 400, "weight must be an integer"),
        ({"colour": "red"}, 400, "unknown field(s) ['colour']"),
        ({}, 400, "nothing to change"),
        ([1, 2], 400, "must be a JSON object"),
    ],
)
def test_bad_patch_bodies_get_400_with_the_reason(lab: Lab, body: Any, status: int, message: str) -> None:
    code, doc = api(lab.srv("s1"), "PATCH", body)
    assert code == status
    assert message in doc["error"]
    assert lab.server("pool/s1")["admin_state"] == "ready"
    assert lab.server("pool/s1")["weight"] == 1


def test_malformed_and_oversize_bodies(lab: Lab) -> None:
    code, doc = api(lab.srv("s1"), "PATCH", raw=b'{"admin_state": ')
    assert code == 400 and doc["error"].startswith("invalid JSON")
    code, doc = api(lab.srv("s1"), "PATCH", raw=b"\xff\xfe")
    assert code == 400 and "invalid JSON" in doc["error"]
    code, doc = api(lab.srv("s1"), "PATCH", raw=b'{"reason": "' + b"x" * 100_000 + b'"}')
    assert code == 413 and "larger than" in doc["error"]
    greet(lab.port)  # the balancer is unaffected


def test_unknown_backend_or_server_is_404_with_the_names_that_exist(lab: Lab) -> None:
    code, doc = api(f"{lab.url}/api/v1/backends/nope/servers/s1", "PATCH", {"admin_state": "drain"})
    assert code == 404 and doc["error"] == "no backend named 'nope'" and doc["backends"] == ["pool"]
    code, doc = api(lab.srv("s9"), "PATCH", {"admin_state": "drain"})
    assert code == 404 and "no server named 's9'" in doc["error"] and doc["servers"] == ["s1", "s2"]
    code, doc = api(lab.srv("s9"))
    assert code == 404


# --------------------------------------------------------------------------- add / remove


def test_add_a_server_at_runtime_checks_it_before_traffic(lab: Lab) -> None:
    extra = Backend("s3")
    try:
        code, doc = api(
            f"{lab.url}/api/v1/backends/pool/servers", "POST", {"name": "s3", "address": f"127.0.0.1:{extra.port}"}
        )
        assert code == 201, doc
        assert doc["name"] == "s3" and doc["op_state"] == "DOWN"  # warms up first
        lab.lb.wait_for_log("pool/s3 op_state DOWN -> UP")
        assert "s3" in {greet(lab.port) for _ in range(6)}
        lab.lb.wait_for_log("server=s3")  # a session's line is written once it has closed
        log = lab.lb.log
        # No session reached s3 before its first check passed.
        assert log.index("pool/s3 op_state DOWN -> UP") < log.index("server=s3")
        code, doc = api(f"{lab.url}/api/v1/backends/pool/servers", "POST", {"name": "s3", "address": "127.0.0.1:1"})
        assert code == 409 and "already has a server named 's3'" in doc["error"]
    finally:
        extra.stop()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"name": "s4"}, "address: Field required"),
        ({"name": "s4", "address": "nowhere"}, "address: expected host:port"),
        ({"name": "bad name!", "address": "127.0.0.1:1"}, "name: String should match pattern"),
        ({"name": "s4", "address": "127.0.0.1:1", "weight": -1}, "weight: Input should be greater than or equal to 0"),
        ({"name": "s4", "address": "127.0.0.1:1", "extra": 1}, "extra: Extra inputs are not permitted"),
        (
            {"name": "s4", "address": "127.0.0.1:1", "check": {"type": "external", "command": "/usr/bin/touch"}},
            "check cannot be set through the API",
        ),
        ({"name": "s4", "address": "127.0.0.1:1", "agent": {"port": 3333}}, "agent cannot be set through the API"),
    ],
)
def test_adding_an_invalid_server_says_what_is_wrong(lab: Lab, body: dict[str, Any], message: str) -> None:
    code, doc = api(f"{lab.url}/api/v1/backends/pool/servers", "POST", body)
    assert code == 400
    assert message in doc["error"], doc
    assert [s["name"] for s in lab.status()["backends"][0]["servers"]] == ["s1", "s2"]


def test_adding_to_an_unknown_backend_is_404(lab: Lab) -> None:
    code, doc = api(f"{lab.url}/api/v1/backends/nope/servers", "POST", {"name": "s4", "address": "127.0.0.1:1"})
    assert code == 404 and "no backend named 'nope'" in doc["error"]


def test_remove_is_refused_unless_maint_and_drained_or_forced(lab: Lab) -> None:
    code, doc = api(lab.srv("s1"), "DELETE")
    assert code == 409 and "put it in maint" in doc["error"] and doc["admin_state"] == "ready"
    sock, name = lab.open_session()
    with sock:
        api(lab.srv(name), "PATCH", {"admin_state": "maint"})
        code, doc = api(lab.srv(name), "DELETE")
        assert code == 409 and doc["cur_sessions"] == 1
        code, doc = api(lab.srv(name) + "?force=maybe", "DELETE")
        assert code == 400
        code, doc = api(lab.srv(name) + "?force=true", "DELETE")
        assert code == 200 and doc == {"removed": name, "closed_sessions": 1}
        # The forced-off client sees the connection reset, never a clean end.
        with pytest.raises(ConnectionResetError):
            sock.recv(64)
    assert [s["name"] for s in lab.status()["backends"][0]["servers"]] == ["s2" if name == "s1" else "s1"]
    other = "s2" if name == "s1" else "s1"
    api(lab.srv(other), "PATCH", {"admin_state": "maint"})
    code, doc = api(lab.srv(other), "DELETE")
    assert code == 200 and doc["closed_sessions"] == 0
    assert lab.status()["backends"][0]["up"] is False


# --------------------------------------------------------------------------- wait / shutdown


def test_wait_until_drained(lab: Lab) -> None:
    sock, name = lab.open_session()
    api(lab.srv(name), "PATCH", {"admin_state": "drain"})
    started = time.monotonic()
    code, doc = api(lab.srv(name, "/wait?until=drained&timeout=500ms"))
    assert code == 408 and doc["drained"] is False and doc["cur_sessions"] == 1
    assert "still has 1 session(s)" in doc["error"]
    assert time.monotonic() - started >= 0.45
    import threading

    threading.Timer(0.3, sock.close).start()
    code, doc = api(lab.srv(name, "/wait?until=drained&timeout=10s"))
    assert code == 200 and doc == {"drained": True, "cur_sessions": 0, "admin_state": "drain"}
    code, doc = api(lab.srv(name, "/wait?until=empty"))
    assert code == 400
    code, doc = api(lab.srv(name, "/wait?timeout=soon"))
    assert code == 400 and "timeout" in doc["error"]
    code, doc = api(lab.srv(name, "/wait?timeout=2h"))
    assert code == 400


def test_shutdown_sessions_resets_exactly_that_servers_sessions(lab: Lab) -> None:
    sessions = [lab.open_session() for _ in range(4)]
    try:
        victims = [s for s, n in sessions if n == "s1"]
        survivors = [s for s, n in sessions if n == "s2"]
        assert len(victims) == 2 and len(survivors) == 2
        code, doc = api(lab.srv("s1", "/shutdown-sessions"), "POST")
        assert code == 200 and doc == {"closed": 2}
        assert_reset_others_alive(victims, survivors)
        lab.lb.wait_for_log("term=admin_shutdown")
    finally:
        for sock, _ in sessions:
            sock.close()


# --------------------------------------------------------------------------- reload and metrics


def test_reload_applies_a_valid_config_and_refuses_an_invalid_one(lab: Lab) -> None:
    config = yaml.safe_load(yaml.safe_dump(lab.config))
    config["backends"][0]["servers"][1]["weight"] = 3
    lab.rewrite(config)
    code, doc = api(lab.url + "/api/v1/reload", "POST")
    assert code == 200 and doc["ok"] is True and "servers kept 2" in doc["message"]
    assert lab.server("pool/s2")["weight"] == 3
    config["backends"][0]["servers"][1]["address"] = "not an address"
    config["frontends"][0]["default_backend"] = "missing"
    lab.rewrite(config)
    code, doc = api(lab.url + "/api/v1/reload", "POST")
    assert code == 422 and doc["ok"] is False
    wheres = {e["where"] for e in doc["errors"]}
    assert wheres == {"backends[0].servers[1].address", "frontends[0].default_backend"}
    assert lab.server("pool/s2")["weight"] == 3 and lab.server("pool/s2")["address"] != "not an address"
    assert greet(lab.port) in {"s1", "s2"}  # still serving the previous config
    assert lab.status()["config"]["last_reload"]["ok"] is False
    lab.lb.wait_for_log("refused, still running the previous one")


def test_runtime_changes_survive_a_reload_of_an_unchanged_config(lab: Lab) -> None:
    extra = Backend("s3")
    try:
        api(lab.srv("s1"), "PATCH", {"admin_state": "drain", "weight": 5})
        code, _ = api(
            f"{lab.url}/api/v1/backends/pool/servers", "POST", {"name": "s3", "address": f"127.0.0.1:{extra.port}"}
        )
        assert code == 201
        lab.lb.wait_for_log("pool/s3 op_state DOWN -> UP")
        code, doc = api(lab.url + "/api/v1/reload", "POST")
        assert code == 200, doc
        s1, s3 = lab.server("pool/s1"), lab.server("pool/s3")
        assert (s1["admin_state"], s1["weight"]) == ("drain", 5)
        assert s3["op_state"] == "UP" and s3["admin_state"] == "ready"  # kept, health included
        # The file's own value wins once the file changes it.
        config = yaml.safe_load(yaml.safe_dump(lab.config))
        config["backends"][0]["servers"][0]["admin_state"] = "maint"
        lab.rewrite(config)
        assert api(lab.url + "/api/v1/reload", "POST")[0] == 200
        s1 = lab.server("pool/s1")
        assert (s1["admin_state"], s1["weight"]) == ("maint", 5)
    finally:
        extra.stop()


def test_metrics_need_the_token_unless_configured_open(tmp_path: Path) -> None:
    backend = Backend("s1")
    port = free_port()
    config = tcp_config(port, [{"name": "s1", "address": f"127.0.0.1:{backend.port}"}])
    url = with_admin(config, tmp_path, metrics_auth=False)
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/s1 op_state DOWN -> UP")
            greet(port)
            code, text = api(url + "/metrics", token=None)
            assert code == 200
            assert 'medlb_server_sessions_total{backend="pool",server="s1"} 1.0' in text
            code, _ = api(url + "/api/v1/status", token=None)
            assert code == 401  # only /metrics is open
    finally:
        backend.stop()


def test_admin_api_over_tls_refuses_old_protocols(tmp_path: Path) -> None:
    import ssl
    import urllib.request
    import warnings

    cert, key = self_signed_cert(tmp_path, "127.0.0.1", "IP:127.0.0.1")
    backend = Backend("s1")
    port = free_port()
    config = tcp_config(port, [{"name": "s1", "address": f"127.0.0.1:{backend.port}"}])
    url = with_admin(config, tmp_path, tls={"cert": str(cert), "key": str(key)}).replace("http:", "https:")
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log(f"admin API and dashboard on {url}/")
            context = ssl.create_default_context(cafile=str(cert))
            context.check_hostname = False
            request = urllib.request.Request(url + "/api/v1/status", headers={"Authorization": f"Bearer {TOKEN}"})
            with urllib.request.urlopen(request, timeout=5, context=context) as response:
                assert response.status == 200
                assert response.fp.raw._sock.version() in ("TLSv1.2", "TLSv1.3")  # type: ignore[attr-defined]
            # A TLS 1.2 client offering only a static-RSA cipher (no forward secrecy) is refused.
            weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            weak.check_hostname = False
            weak.verify_mode = ssl.CERT_NONE
            weak.maximum_version = ssl.TLSVersion.TLSv1_2
            weak.set_ciphers("AES256-SHA256")
            with pytest.raises(OSError, match=r"HANDSHAKE_FAILURE|handshake failure|UNEXPECTED_EOF"):
                urllib.request.urlopen(url + "/api/v1/status", timeout=5, context=weak)
            # TLS 1.1, offered by a client that allows it (security level 0), is refused too.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
                old.check_hostname = False
                old.verify_mode = ssl.CERT_NONE
                old.set_ciphers("DEFAULT:@SECLEVEL=0")
                old.minimum_version = ssl.TLSVersion.TLSv1
                old.maximum_version = ssl.TLSVersion.TLSv1_1
            with pytest.raises(OSError, match=r"VERSION|version|UNEXPECTED_EOF"):
                urllib.request.urlopen(url + "/api/v1/status", timeout=5, context=old)
            # Plain HTTP on the TLS port gets no answer at all.
            with pytest.raises(OSError):
                api(url.replace("https:", "http:") + "/api/v1/status")
    finally:
        backend.stop()
