"""``mode: http`` end to end: a real medlb process, real HTTP clients (curl,
http.client, raw sockets) and recording HTTP/1.1 servers on loopback."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Medlb, free_port, running_medlb, wait_until


class Recorder(ThreadingHTTPServer):
    """An HTTP/1.1 keep-alive server that records every request it parses."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str) -> None:
        outer = self
        self.name = name
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.mode = "ok"
        self.big = b""

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                length = int(self.headers.get("Content-Length") or 0)
                data = self.rfile.read(length) if length else b""
                if len(data) < length:
                    # The connection was cut mid-body: this request never arrived whole.
                    raise ConnectionError("request body cut short")
                return data

            def _handle(self) -> None:
                try:
                    body = self._body() if self.command != "HEAD" else b""
                except (ConnectionError, ValueError):
                    self.close_connection = True
                    return
                record = {
                    "method": self.command,
                    "path": self.path,
                    "headers": [(k, v) for k, v in self.headers.items()],
                    "body": body,
                }
                with outer.lock:
                    outer.requests.append(record)
                mode = outer.mode
                if mode == "garbage":
                    self.wfile.write(b"NOT HTTP AT ALL\r\n\r\n")
                    self.close_connection = True
                    return
                if mode == "silent":
                    time.sleep(3)
                    return
                if mode == "big":
                    payload = outer.big
                else:
                    payload = json.dumps({"server": outer.name, "path": self.path, "body": len(body)}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("X-Server", outer.name)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_OPTIONS = _handle

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def http_config(port: int, servers: list[Recorder], **http: Any) -> dict[str, Any]:
    return {
        "global": {"hard_stop_after": "5s"},
        "defaults": {
            "timeouts": {"connect": "1s", "client": "30s", "server": "2s", "queue": "2s", "check": "500ms"},
            "check": {"inter": "200ms", "fastinter": "100ms", "downinter": "300ms", "rise": 1, "fall": 1},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [
            {"name": "web", "mode": "http", "bind": [f"127.0.0.1:{port}"], "default_backend": "viewers", "http": http}
        ],
        "backends": [
            {
                "name": "viewers",
                "balance": "roundrobin",
                "check": {"type": "tcp"},
                "servers": [{"name": s.name, "address": f"127.0.0.1:{s.port}"} for s in servers],
            }
        ],
    }


class Lab:
    def __init__(self, lb: Medlb, port: int, servers: list[Recorder]) -> None:
        self.lb = lb
        self.port = port
        self.servers = servers

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)

    def raw(self, data: bytes, *, read_timeout: float = 3.0) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout) as sock:
            sock.sendall(data)
            out = b""
            try:
                while chunk := sock.recv(65536):
                    out += chunk
            except TimeoutError:
                pass
            return out

    def seen(self) -> list[dict[str, Any]]:
        return [r for s in self.servers for r in s.requests]


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    servers = [Recorder("a"), Recorder("b")]
    port = free_port()
    try:
        with running_medlb(http_config(port, servers), tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            lb.wait_for_log("viewers/b op_state DOWN -> UP")
            yield Lab(lb, port, servers)
    finally:
        for s in servers:
            s.stop()


def test_keep_alive_balances_each_request(lab: Lab) -> None:
    conn = lab.conn()
    names = []
    for n in range(6):
        conn.request("GET", f"/wado?n={n}")
        response = conn.getresponse()
        assert response.status == 200
        names.append(json.loads(response.read())["server"])
    conn.close()
    assert names == ["a", "b"] * 3  # one client connection, requests spread
    lab.lb.wait_for_log('"GET /wado?n=5 HTTP/1.1" status=200')


def test_forwarding_headers_are_set_and_forged_ones_dropped(lab: Lab) -> None:
    conn = lab.conn()
    conn.request(
        "GET", "/qido", headers={"X-Forwarded-For": "6.6.6.6", "Host": "pacs.example", "Forwarded": "for=6.6.6.6"}
    )
    assert conn.getresponse().read()
    conn.close()
    (record,) = lab.seen()
    headers = {k.lower(): v for k, v in record["headers"]}
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-forwarded-host"] == "pacs.example"
    assert "forwarded" not in headers
    assert [k for k, _ in record["headers"] if k.lower() == "x-forwarded-for"] == ["X-Forwarded-For"]


def test_request_bodies_content_length_and_chunked(lab: Lab) -> None:
    payload = bytes(range(256)) * 4000  # ~1 MB
    conn = lab.conn()
    conn.request("POST", "/stow", body=payload, headers={"Content-Type": "application/dicom"})
    assert json.loads(conn.getresponse().read())["body"] == len(payload)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 70000):
            yield payload[i : i + 70000]

    conn.request("POST", "/stow", body=chunks(), encode_chunked=True)
    assert json.loads(conn.getresponse().read())["body"] == len(payload)
    conn.close()
    bodies = [r["body"] for r in lab.seen()]
    assert bodies == [payload, payload]


def test_large_response_streams_intact(lab: Lab) -> None:
    big = hashlib.sha256(b"seed").digest() * (20 * 1024 * 1024 // 32)
    for s in lab.servers:
        s.big = big
        s.mode = "big"
    conn = lab.conn()
    conn.request("GET", "/wado/instances/1")
    response = conn.getresponse()
    assert response.status == 200 and int(response.headers["Content-Length"]) == len(big)
    assert hashlib.sha256(response.read()).digest() == hashlib.sha256(big).digest()
    conn.close()


def test_head_and_pipelining(lab: Lab) -> None:
    out = lab.raw(
        b"HEAD /a HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert out.count(b"HTTP/1.1 200") == 3
    assert out.index(b'"path": "/b"') < out.index(b'"path": "/c"')
    assert b'"path": "/a"' not in out  # HEAD: no body
    assert [r["path"] for r in sorted(lab.seen(), key=lambda r: r["path"])] == ["/a", "/b", "/c"]


def test_smuggling_attempt_is_rejected_and_reaches_no_server(lab: Lab) -> None:
    out = lab.raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nG")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert lab.seen() == []
    lab.lb.wait_for_log("rejected 400")


def test_no_server_gives_503_with_retry_after(tmp_path: Path) -> None:
    port = free_port()
    config = http_config(port, [])
    config["backends"][0]["servers"] = [{"name": "dead", "address": f"127.0.0.1:{free_port()}"}]
    with running_medlb(config, tmp_path):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/")
        response = conn.getresponse()
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        assert b"no_server" in response.read()


def test_bad_response_is_502_and_silence_is_504(lab: Lab) -> None:
    for s in lab.servers:
        s.mode = "garbage"
    conn = lab.conn()
    conn.request("GET", "/")
    response = conn.getresponse()
    assert response.status == 502
    response.read()
    conn.close()
    for s in lab.servers:
        s.mode = "silent"
    conn = lab.conn()
    started = time.monotonic()
    conn.request("GET", "/slow")
    response = conn.getresponse()
    assert response.status == 504 and 1.5 < time.monotonic() - started < 4
    conn.close()
    lab.lb.wait_for_log("term=server_timeout")


def test_a_dead_server_costs_no_failed_get(lab: Lab) -> None:
    lab.servers[1].stop()
    conn = lab.conn()
    for n in range(6):
        conn.request("GET", f"/after-kill/{n}")
        response = conn.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["server"] == "a"
    conn.close()


def test_curl_expect_100_continue(lab: Lab, tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(b"D" * 2_000_000)
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            f"@{upload}",
            f"http://127.0.0.1:{lab.port}/stow",
            "-w",
            "\\n%{http_code}",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    body, code = result.stdout.rsplit("\n", 1)
    assert code == "200", result.stderr
    assert json.loads(body)["body"] == 2_000_000
    wait_until(lambda: any(r["path"] == "/stow" for r in lab.seen()))


class UpgradeServer(ThreadingHTTPServer):
    """Answers an Upgrade with 101 and then echoes raw bytes (a WebSocket-like tunnel);
    refuses upgrades to ``refuse`` with 426 and a normal response."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.headers.get("Upgrade") == "refuse":
                    self.send_response(426)
                    self.send_header("Content-Length", "7")
                    self.end_headers()
                    self.wfile.write(b"refused")
                    return
                if self.headers.get("Upgrade") != "echo" or "upgrade" not in self.headers.get("Connection", "").lower():
                    body = b"plain"
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                self.send_response(101)
                self.send_header("Upgrade", "echo")
                self.send_header("Connection", "Upgrade")
                self.end_headers()
                self.wfile.flush()
                while data := self.connection.recv(65536):
                    self.connection.sendall(data.upper())
                self.close_connection = True

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_upgrade_becomes_a_tunnel_and_a_refused_upgrade_stays_http(tmp_path: Path) -> None:
    server = UpgradeServer()
    port = free_port()
    config = http_config(port, [])
    config["backends"][0]["servers"] = [{"name": "ws", "address": f"127.0.0.1:{server.server_address[1]}"}]
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/ws op_state DOWN -> UP")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nearly")
                got = b""
                while b"EARLY" not in got:
                    got += sock.recv(4096)
                assert got.startswith(b"HTTP/1.1 101 ")
                for word in (b"ping", b"x" * 100_000):
                    sock.sendall(word)
                    back = b""
                    while len(back) < len(word):
                        back += sock.recv(65536)
                    assert back == word.upper()
            lb.wait_for_log("status=101")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(
                    b"GET /live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: refuse\r\n\r\n"
                    b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                out = b""
                while chunk := sock.recv(65536):
                    out += chunk
                assert out.startswith(b"HTTP/1.1 426 ") and b"refused" in out
                assert b"HTTP/1.1 200 " in out and out.endswith(b"plain")
            out = Lab(lb, port, []).raw(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 501 ")
    finally:
        server.shutdown()
        server.server_close()


def test_slow_clients_get_408(tmp_path: Path) -> None:
    recorder = Recorder("a")
    port = free_port()
    config = http_config(port, [recorder], header_timeout="500ms", body_timeout="500ms")
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            # Slowloris: a head that trickles in never completes within header_timeout.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                started = time.monotonic()
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
                for _ in range(3):
                    time.sleep(0.2)
                    try:
                        sock.sendall(b"X-Slow: 1\r\n")
                    except OSError:
                        break
                out = sock.recv(4096)
                assert out.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 3
            # A body that stops arriving: 408, and the server never sees a complete request.
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"POST /stow HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10)
                out = sock.recv(4096)
                assert out.startswith(b"HTTP/1.1 408 ") and b"request_body_timeout" in out
            assert recorder.requests == []
            lb.wait_for_log("term=request_body_timeout")
    finally:
        recorder.stop()


class HalfAnswer(ThreadingHTTPServer):
    """Sends a 200 head and part of its body, then resets: a server dying mid-response."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Server: half\r\n\r\npartial")
                self.wfile.flush()
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                self.close_connection = True

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_a_small_get_answer_cut_half_way_is_retried_not_delivered_broken(tmp_path: Path) -> None:
    good, half = Recorder("good"), HalfAnswer()
    port = free_port()
    config = http_config(port, [good])
    config["backends"][0]["servers"].append({"name": "half", "address": f"127.0.0.1:{half.server_address[1]}"})
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/half op_state DOWN -> UP")
            lb.wait_for_log("viewers/good op_state DOWN -> UP")
            for n in range(6):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", f"/study/{n}")
                response = conn.getresponse()
                assert response.status == 200 and json.loads(response.read())["server"] == "good"
                conn.close()
            lb.wait_for_log("before the response; retrying GET elsewhere")
    finally:
        good.stop()
        half.shutdown()
        half.server_close()


class DoubleAnswer(ThreadingHTTPServer):
    """Answers each GET with its response and, in the same write, a second one nobody asked for.

    ``per_connection`` lists how many GETs each TCP connection carried: a proxy that trusted a
    connection after a stray response would reuse it (and risk handing the stray answer on).
    """

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        outer = self
        self.per_connection: list[int] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            slot = -1

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                if self.slot < 0:
                    self.slot = len(outer.per_connection)
                    outer.per_connection.append(0)
                outer.per_connection[self.slot] += 1
                ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst"
                stray = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstray"
                self.wfile.write(ok + stray)
                self.wfile.flush()

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()


def test_a_stray_second_response_is_never_delivered_and_its_connection_is_dropped(tmp_path: Path) -> None:
    server = DoubleAnswer()
    port = free_port()
    config = http_config(port, [])
    config["backends"][0]["servers"] = [{"name": "double", "address": f"127.0.0.1:{server.server_address[1]}"}]
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/double op_state DOWN -> UP")
            for _ in range(3):
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("GET", "/")
                response = conn.getresponse()
                assert (response.status, response.read()) == (200, b"first")
                conn.close()
            # Every request needed a fresh server connection: none was reused after its stray answer.
            assert server.per_connection == [1, 1, 1]
    finally:
        server.shutdown()
        server.server_close()


def test_end_to_end_drops_hop_by_hop_fields_in_any_spelling() -> None:
    from medlb.io.http import end_to_end

    headers = [
        (b"Server", b"x"),
        (b"CONNECTION", b"close"),
        (b"Keep-Alive", b"timeout=5"),
        (b"tE", b"trailers"),
        (b"Transfer-encoding", b"chunked"),
        (b"content-length", b"3"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"Trailer", b"X"),
        (b"UPGRADE", b"h2c"),
        (b"Content-Type", b"text/plain"),
        (b"Te-Extra", b"kept"),
    ]
    assert end_to_end(headers) == [(b"Server", b"x"), (b"Content-Type", b"text/plain"), (b"Te-Extra", b"kept")]
