"""Helpers for end-to-end tests: real ``medlb run`` processes and small
threaded TCP backends on loopback."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Ports handed out by free_port() in this test process, never handed out twice.
_HANDED_OUT: set[int] = set()
# Below Linux's ephemeral range (32768-60999): a port chosen here cannot be taken
# by an outgoing connection or a bind(0) listener between the choice and the
# moment medlb binds it, and two calls can never return the same port (a bind(0)
# probe can, which once gave a frontend and the admin API one port).
_PORT_RANGE = (20000, 32767)
_PICK = random.Random(os.getpid())


def free_port() -> int:
    """A loopback TCP port that is free now and that no other call returned."""
    for _ in range(1000):
        port = _PICK.randint(*_PORT_RANGE)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError(f"no free port in {_PORT_RANGE}")


class _Handler(socketserver.BaseRequestHandler):
    server: Backend

    def handle(self) -> None:
        backend = self.server
        with backend.lock:
            backend.accepted += 1
        sock: socket.socket = self.request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.sendall(f"{backend.name}\n".encode())
            while data := sock.recv(65536):
                sock.sendall(data)
        except OSError:
            pass


class Backend(socketserver.ThreadingTCPServer):
    """Greets with its name, then echoes. Counts accepted connections (a health
    check connection counts too)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: str, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.name = name
        self.lock = threading.Lock()
        self.accepted = 0
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class ThreadedServer(socketserver.ThreadingTCPServer):
    """A loopback server whose connections are handled by ``respond(sock)`` in threads."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.respond(self.request)

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def respond(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class Medlb:
    """A ``medlb run`` subprocess with its stderr collected in a file."""

    def __init__(self, config: dict[str, Any], tmp: Path) -> None:
        self.config_path = tmp / "medlb.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "medlb.log"
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "medlb", "run", "-c", str(self.config_path), "--log-level", "info"],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for_log(self, text: str, timeout: float = 10.0) -> float:
        """Wait until ``text`` appears in the log; return the monotonic time it was seen."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log:
                return time.monotonic()
            if self.proc.poll() is not None:
                raise AssertionError(f"medlb exited with {self.proc.returncode}:\n{self.log}")
            time.sleep(0.02)
        raise AssertionError(f"{text!r} not in log after {timeout}s:\n{self.log}")

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_medlb(config: dict[str, Any], tmp: Path, ready: str = "medlb started") -> Iterator[Medlb]:
    lb = Medlb(config, tmp)
    try:
        lb.wait_for_log(ready)
        yield lb
    finally:
        lb.stop()


def tcp_config(port: int, servers: list[dict[str, Any]], **backend: Any) -> dict[str, Any]:
    """A one-frontend, one-backend config with fast checks for tests."""
    b: dict[str, Any] = {"name": "pool", "balance": "roundrobin", "check": {"type": "tcp"}, "servers": servers}
    b.update(backend)
    return {
        "global": {"hard_stop_after": "5s"},
        "defaults": {
            "timeouts": {"connect": "1s", "client": "1m", "server": "1m", "queue": "5s", "check": "500ms"},
            "check": {"inter": "200ms", "fastinter": "100ms", "downinter": "300ms", "rise": 2, "fall": 2},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [{"name": "fe", "bind": [f"127.0.0.1:{port}"], "default_backend": "pool"}],
        "backends": [b],
    }


def greet(port: int, timeout: float = 5.0) -> str:
    """Connect through medlb and return the first line the server sends."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(64)
            if not chunk:
                break
            data += chunk
        return data.decode().strip()


def wait_until(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@contextlib.contextmanager
def one_server_medlb(tmp: Path, **global_: Any) -> Iterator[tuple[Medlb, int]]:
    """medlb in front of one echo server ``s1`` that is already UP: (medlb, frontend port)."""
    backend = Backend("s1")
    port = free_port()
    config = tcp_config(port, [{"name": "s1", "address": f"127.0.0.1:{backend.port}"}])
    config["global"].update(global_)
    try:
        with running_medlb(config, tmp) as lb:
            lb.wait_for_log("pool/s1 op_state DOWN -> UP")
            yield lb, port
    finally:
        backend.stop()


TOKEN = "test-admin-token-0123456789"


def with_admin(config: dict[str, Any], tmp: Path, **admin: Any) -> str:
    """Add an admin section (token in a file under ``tmp``) to ``config``; return the API's base URL."""
    token_file = tmp / "admin.token"
    token_file.write_text(TOKEN + "\n")
    port = free_port()
    config["admin"] = {"bind": f"127.0.0.1:{port}", "token_file": str(token_file), **admin}
    return f"http://127.0.0.1:{port}"


def api(
    url: str,
    method: str = "GET",
    body: Any = None,
    *,
    token: str | None = TOKEN,
    headers: dict[str, str] | None = None,
    raw: bytes | None = None,
    timeout: float = 10.0,
) -> tuple[int, Any]:
    """One admin API call: (HTTP status, decoded JSON or text). Never raises on 4xx/5xx."""
    import json
    import urllib.error
    import urllib.request

    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(url, data=data, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload, ctype = response.status, response.read(), response.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, payload, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(payload)
    return status, payload.decode()


def server_of(status: dict[str, Any], key: str) -> dict[str, Any]:
    """The server document ``backend/server`` from a status document."""
    b_name, s_name = key.split("/")
    for backend in status["backends"]:
        if backend["name"] == b_name:
            for server in backend["servers"]:
                if server["name"] == s_name:
                    return dict(server)
    raise KeyError(key)


def self_signed_cert(directory: Path, cn: str, san: str) -> tuple[Path, Path]:
    """A throwaway self-signed certificate and key (openssl, which ``make test`` installs): (cert, key)."""
    key, crt = directory / f"{cn}.key", directory / f"{cn}.crt"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(crt),
         "-days", "2", "-subj", f"/CN={cn}", "-addext", f"subjectAltName={san}"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return crt, key


@dataclasses.dataclass
class AdminLab:
    """medlb with its admin API in front of echo servers that are all UP."""

    lb: Medlb
    url: str
    port: int
    backends: list[Backend]
    config: dict[str, Any]


@contextlib.contextmanager
def admin_medlb(tmp: Path, names: tuple[str, ...] = ("s1", "s2"), **admin: Any) -> Iterator[AdminLab]:
    backends = [Backend(name) for name in names]
    port = free_port()
    config = tcp_config(port, [{"name": b.name, "address": f"127.0.0.1:{b.port}"} for b in backends])
    url = with_admin(config, tmp, **admin)
    try:
        with running_medlb(config, tmp) as lb:
            for name in names:
                lb.wait_for_log(f"pool/{name} op_state DOWN -> UP")
            yield AdminLab(lb, url, port, backends, config)
    finally:
        for b in backends:
            b.stop()


def log_field(line: str, name: str) -> str:
    """The value of ``name=value`` in a log line (the test fails when it is absent)."""
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match is not None, (name, line)
    return match.group(1)


class LabBase:
    """Everything a protocol test starts, stopped in reverse order whatever happens (``stack``)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.stack = contextlib.ExitStack()
        self._n = 0

    def medlb(self, config: dict[str, Any]) -> Medlb:
        """A medlb process with ``config``, in a directory of its own, stopped with the lab."""
        self._n += 1
        directory = self.tmp / f"medlb{self._n}"
        directory.mkdir()
        return self.stack.enter_context(running_medlb(config, directory))


def assert_reset_others_alive(victims: list[socket.socket], survivors: list[socket.socket]) -> None:
    """After shutdown-sessions: the victims' sessions are reset (RST, not a clean close, so a
    client knows it was cut), and the other sessions still echo."""
    for sock in victims:
        sock.settimeout(5)
        try:
            data = sock.recv(64)
        except ConnectionResetError:
            continue
        raise AssertionError(f"a shut-down session must be reset, not {data if data else 'closed cleanly'}")
    for sock in survivors:
        sock.sendall(b"ping")
        assert sock.recv(64) == b"ping"
