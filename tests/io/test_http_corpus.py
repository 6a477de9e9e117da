"""The smuggling corpus end to end: client -> real medlb -> recording server.

For every case of ``tests/proto/http_corpus.py`` the recording server must see
either *no complete request* (rejected cases; a head already forwarded is cut
with a RST, never completed) or *exactly one* request equal to what the case
says medlb parsed. The recorder parses with the same strict codec, so "equal"
means: the bytes medlb re-serialized mean exactly the request medlb accepted.
"""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from medlb.proto.http import Body, EndOfMessage, HttpError, RequestHead, RequestParser
from tests.helpers import free_port, running_medlb
from tests.io.test_http import http_config
from tests.proto.http_corpus import CORPUS, Accepted, Case, Rejected

#: The config refuses limits this small (max_header_size >= 1024, max_uri >= 256); those
#: cases run against the codec only (tests/proto/test_http.py).
CONFIG_MINIMUMS = {"max_header_bytes": 1024, "max_uri": 256, "max_headers": 8}
_TO_CONFIG = {
    "max_header_bytes": "max_header_size",
    "max_uri": "max_uri",
    "max_headers": "max_headers",
    "max_body": "max_body",
}


def e2e(case: Case) -> bool:
    return all(value >= CONFIG_MINIMUMS.get(key, 0) for key, value in case.limits.items())


CASES = [c for c in CORPUS if e2e(c)]


class RecordingServer(socketserver.ThreadingTCPServer):
    """Parses what medlb forwards; answers 200 to every complete request; records them all."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        outer = self
        self.lock = threading.Lock()
        self.complete: list[tuple[RequestHead, bytes, list[tuple[bytes, bytes]]]] = []
        self.raw: list[bytes] = []

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock: socket.socket = self.request
                parser = RequestParser()
                head: RequestHead | None = None
                body = b""
                try:
                    while data := sock.recv(65536):
                        with outer.lock:
                            outer.raw.append(data)
                        for event in parser.feed(data):
                            if isinstance(event, RequestHead):
                                head, body = event, b""
                            elif isinstance(event, Body):
                                body += event.data
                            elif isinstance(event, EndOfMessage):
                                assert head is not None
                                with outer.lock:
                                    outer.complete.append((head, body, event.trailers))
                                if not head.keep_alive:  # as a real server does
                                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                                    return
                                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                except (OSError, HttpError):
                    pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def port(self) -> int:
        port: int = self.server_address[1]
        return port

    def take(self) -> list[tuple[RequestHead, bytes, list[tuple[bytes, bytes]]]]:
        with self.lock:
            out, self.complete = self.complete, []
            self.raw.clear()
            return out

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture(scope="module")
def corpus_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RecordingServer, dict[str, int]]]:
    """One medlb with one frontend per distinct set of limits in the corpus."""
    recorder = RecordingServer()
    variants = sorted({tuple(sorted(c.limits.items())) for c in CASES})
    ports: dict[str, int] = {}
    frontends: list[dict[str, Any]] = []
    for n, variant in enumerate(variants):
        port = free_port()
        ports[repr(variant)] = port
        http = {_TO_CONFIG[k]: v for k, v in variant}
        frontends.append(
            {
                "name": f"fe{n}",
                "mode": "http",
                "bind": [f"127.0.0.1:{port}"],
                "default_backend": "viewers",
                "http": http,
            }
        )
    config = http_config(free_port(), [])
    config["frontends"] = frontends
    config["backends"][0]["servers"] = [{"name": "rec", "address": f"127.0.0.1:{recorder.port}"}]
    tmp = tmp_path_factory.mktemp("corpus")
    try:
        with running_medlb(config, tmp) as lb:
            lb.wait_for_log("viewers/rec op_state DOWN -> UP")
            yield recorder, ports
    finally:
        recorder.stop()


def exchange(port: int, raw: bytes) -> bytes:
    """Send ``raw``, half-close, return everything medlb answered."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # medlb may have rejected and closed before the end of the payload
        out = b""
        try:
            while chunk := sock.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


def test_the_corpus_is_large_enough_end_to_end() -> None:
    assert len(CASES) >= 60
    assert sum(isinstance(c.expect, Rejected) for c in CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_corpus_case_through_medlb(case: Case, corpus_lab: tuple[RecordingServer, dict[str, int]]) -> None:
    recorder, ports = corpus_lab
    recorder.take()
    port = ports[repr(tuple(sorted(case.limits.items())))]
    answer = exchange(port, case.raw)
    seen = recorder.take()
    expect = case.expect
    if isinstance(expect, Accepted) and expect.method == b"CONNECT":
        # A reverse proxy opens no tunnels to arbitrary hosts: refused, nothing forwarded.
        assert answer.startswith(b"HTTP/1.1 501 "), answer[:120]
        assert seen == []
        return
    if isinstance(expect, Rejected):
        assert seen == [], f"a server saw a complete request for a rejected case: {seen}"
        assert answer.startswith(b"HTTP/1.1 %d " % expect.status), answer[:120]
        return
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert len(seen) == 1, seen
    head, body, trailers = seen[0]
    assert (head.method, head.target, body) == (expect.method, expect.target, expect.body)
    assert tuple(trailers) == expect.trailers
