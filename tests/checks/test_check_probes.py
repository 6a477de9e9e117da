"""TCP and HTTP(S) probes against small loopback servers, and the pure HTTP response parser."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from medlb.checks.probes import (
    ProbeResult,
    format_duration,
    http_probe,
    http_response_complete,
    parse_http_response,
    tcp_probe,
)
from tests.helpers import free_port, self_signed_cert

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler, ssl_ctx: ssl.SSLContext | None = None) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=ssl_ctx)
    return server, int(server.sockets[0].getsockname()[1])


def canned(response: bytes, requests: list[bytes] | None = None, *, close: bool = True) -> Handler:
    """A handler that reads the request head, answers ``response`` and closes (or not)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if requests is not None:
                requests.append(head)
            writer.write(response)
            await writer.drain()
            if not close:
                await asyncio.sleep(10)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept and say nothing."""
    try:
        await asyncio.sleep(10)
    finally:
        writer.close()


async def with_server(handler: Handler, probe: Callable[[int], Awaitable[Any]]) -> Any:
    server, port = await serve(handler)
    try:
        return await probe(port)
    finally:
        # Handlers still sleeping are cancelled when the runner closes the loop.
        server.close()


# -- format_duration ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.0, "0ms"), (0.0014, "1ms"), (0.05, "50ms"), (1.0, "1s"), (2.0, "2s"), (2.5, "2.5s")]
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# -- TCP ----------------------------------------------------------------------------


def test_tcp_probe_ok(run: Any) -> None:
    accepted: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writer.close()

    async def main() -> ProbeResult:
        server, port = await serve(handler)
        async with server:
            result = await tcp_probe("127.0.0.1", port, 1.0)
            await asyncio.sleep(0.05)
            return result

    result = run(main())
    assert result.ok
    assert result.text.startswith("L4OK in ")
    assert accepted == [1]


def test_tcp_probe_refused(run: Any) -> None:
    result = run(tcp_probe("127.0.0.1", free_port(), 1.0))
    assert result == ProbeResult(False, "connection refused")


def test_tcp_probe_timeout_when_syn_is_dropped(run: Any) -> None:
    # A listener whose accept queue is full drops further SYNs (Linux), so connect hangs.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)

        async def main() -> tuple[ProbeResult, float]:
            loop = asyncio.get_running_loop()
            await asyncio.sleep(0.05)
            start = loop.time()
            result = await tcp_probe("127.0.0.1", port, 0.3)
            return result, loop.time() - start

        result, elapsed = run(main())
    finally:
        for filler in fillers:
            filler.close()
        listener.close()
    assert result == ProbeResult(False, "timeout after 300ms")
    assert 0.25 <= elapsed < 1.5


def test_tcp_probe_unresolvable_host(run: Any) -> None:
    result = run(tcp_probe("no-such-host.invalid", 80, 2.0))
    assert not result.ok
    assert result.text.startswith("cannot resolve host") or result.text.startswith("timeout")


def test_probe_propagates_cancellation(run: Any) -> None:
    async def main() -> None:
        server, port = await serve(hang)
        async with server:
            task = asyncio.create_task(http_probe("127.0.0.1", port, timeout=5.0))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run(main())


# -- HTTP ---------------------------------------------------------------------------


def response(status: str, body: bytes = b"", headers: str = "") -> bytes:
    return f"HTTP/1.1 {status}\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def test_http_probe_default_accepts_2xx_and_sends_a_proper_request(run: Any) -> None:
    requests: list[bytes] = []

    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, path="/health?x=1", timeout=2.0)

    result = run(with_server(canned(response("200 OK", b"fine"), requests), probe))
    assert result.ok, result
    assert result.text.startswith("L7OK HTTP 200 in ")
    (head,) = requests
    lines = head.decode().split("\r\n")
    assert lines[0] == "GET /health?x=1 HTTP/1.1"
    port = int(lines[1].rsplit(":", 1)[1])
    assert lines[1] == f"Host: 127.0.0.1:{port}"
    assert "Connection: close" in lines


def test_http_probe_host_header_and_method(run: Any) -> None:
    requests: list[bytes] = []

    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, method="HEAD", host_header="pacs.example", timeout=2.0)

    # HEAD: Content-Length announces a body that never comes; the probe must not wait for it.
    result = run(
        with_server(canned(b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\n", requests, close=False), probe)
    )
    assert result.ok, result
    assert requests[0].startswith(b"HEAD / HTTP/1.1\r\nHost: pacs.example\r\n")


@pytest.mark.parametrize(
    ("status", "expect", "ok", "text"),
    [
        ("301 Moved", None, True, "L7OK HTTP 301"),
        ("404 Not Found", None, False, "HTTP 404 (expected 200-399)"),
        ("503 Service Unavailable", None, False, "HTTP 503 (expected 200-399)"),
        ("200 OK", (204,), False, "HTTP 200 (expected 204)"),
        ("204 No Content", (200, 204), True, "L7OK HTTP 204"),
        ("503 Service Unavailable", (200, 204), False, "HTTP 503 (expected 200, 204)"),
    ],
)
def test_http_probe_status(run: Any, status: str, expect: tuple[int, ...] | None, ok: bool, text: str) -> None:
    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, expect_status=expect, timeout=2.0)

    result = run(with_server(canned(response(status)), probe))
    assert result.ok is ok
    assert result.text.startswith(text)


@pytest.mark.parametrize(
    ("body", "needle", "ok"),
    [(b'{"status": "UP"}', '"UP"', True), (b'{"status": "DOWN"}', '"UP"', False), (b"", "UP", False)],
)
def test_http_probe_body_substring(run: Any, body: bytes, needle: str, ok: bool) -> None:
    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, expect_body=needle, timeout=2.0)

    result = run(with_server(canned(response("200 OK", body)), probe))
    assert result.ok is ok
    if not ok:
        assert result.text == f"HTTP 200 but body lacks {needle!r}"


def test_http_probe_chunked_body_split_across_chunks(run: Any) -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nall\r\n4\r\n-is-\r\n4\r\nwell\r\n0\r\n\r\n"

    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, expect_body="is-well", timeout=2.0)

    # close=False: the probe must stop at the last chunk, not wait for the close.
    result = run(with_server(canned(raw, close=False), probe))
    assert result.ok, result


def test_http_probe_keep_alive_server_does_not_stall_the_probe(run: Any) -> None:
    async def probe(port: int) -> tuple[ProbeResult, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await http_probe("127.0.0.1", port, expect_body="ok", timeout=3.0)
        return result, loop.time() - start

    result, elapsed = run(with_server(canned(response("200 OK", b"ok"), close=False), probe))
    assert result.ok, result
    assert elapsed < 1.0


def test_http_probe_body_read_is_bounded(run: Any) -> None:
    # 1 MiB body, the needle only at the end: beyond the 64 KiB we read.
    body = b"x" * (1 << 20) + b"NEEDLE"

    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, expect_body="NEEDLE", timeout=3.0)

    result = run(with_server(canned(response("200 OK", body)), probe))
    assert result == ProbeResult(False, "HTTP 200 but body lacks 'NEEDLE'")


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"SSH-2.0-OpenSSH_9.6\r\n", "invalid HTTP response: not an HTTP response"),
        (b"HTTP/1.1 2OO OK\r\n\r\n", "invalid HTTP response: malformed status line"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 5", "invalid HTTP response: incomplete response head"),
        (b"", "empty response"),
    ],
)
def test_http_probe_garbage(run: Any, raw: bytes, text: str) -> None:
    async def probe(port: int) -> ProbeResult:
        return await http_probe("127.0.0.1", port, timeout=2.0)

    result = run(with_server(canned(raw), probe))
    assert not result.ok
    assert result.text.startswith(text)


def test_http_probe_timeout_on_silent_server(run: Any) -> None:
    async def probe(port: int) -> tuple[ProbeResult, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await http_probe("127.0.0.1", port, timeout=0.2)
        return result, loop.time() - start

    result, elapsed = run(with_server(hang, probe))
    assert result == ProbeResult(False, "timeout after 200ms")
    assert elapsed < 1.0


def test_http_probe_refused(run: Any) -> None:
    assert run(http_probe("127.0.0.1", free_port(), timeout=1.0)) == ProbeResult(False, "connection refused")


# -- HTTPS --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "pacs.test", "DNS:pacs.test")


def test_https_probe(run: Any, cert: tuple[Path, Path]) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    requests: list[bytes] = []

    async def main() -> tuple[ProbeResult, ProbeResult, ProbeResult]:
        server, port = await serve(canned(response("200 OK", b"ok"), requests), ctx)
        async with server:
            unverified = await http_probe("127.0.0.1", port, tls=True, expect_body="ok", timeout=3.0)
            verified = await http_probe(
                "127.0.0.1", port, tls=True, host_header="pacs.test", timeout=3.0, tls_verify=True
            )
            plain = await http_probe("127.0.0.1", port, tls=False, timeout=1.0)
            return unverified, verified, plain

    unverified, verified, plain = run(main())
    assert unverified.ok, unverified
    # Self-signed: verification must reject it, naming the reason.
    assert not verified.ok
    assert verified.text.startswith("TLS certificate rejected")
    # Plain HTTP against a TLS port: a failure, not an exception.
    assert not plain.ok


# -- parse_http_response ------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "status", "body"),
    [
        (b"HTTP/1.1 200 OK\r\n\r\n", 200, b""),
        (b"HTTP/1.0 503 Service Unavailable\r\nServer: x\r\n\r\nbusy", 503, b"busy"),
        (b"HTTP/1.1 200\r\n\r\n", 200, b""),  # no reason phrase
        (b"HTTP/1.1 200 OK\n\nbare-lf", 200, b"bare-lf"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA", 200, b"ok"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\ntrunc", 200, b"trunc"),
        (b"HTTP/1.1 200 OK\r\ncontent-length:  3 \r\n\r\nabcd", 200, b"abc"),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\nx", 201, b"x"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n1;ext=1\r\nc\r\n0\r\n\r\n", 200, b"abc"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab", 200, b"ab"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", 204, b""),
        (b"HTTP/1.1 304 Not Modified\r\n\r\nignored", 304, b""),
    ],
)
def test_parse_http_response(raw: bytes, status: int, body: bytes) -> None:
    assert parse_http_response(raw) == (status, body)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "incomplete"),
        (b"HTTP/1.1 200 OK\r\n", "incomplete"),
        (b"HTTP/1.1 200 OK\r\nServer: x\r\n", "incomplete"),
        (b"<html>hello</html>\r\n\r\n", "not an HTTP response"),
        (b"HTTP/2 200\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200OK\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 999 Huh\r\n\r\n", "malformed status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "malformed header"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n", "malformed Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "malformed chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc", "missing CRLF"),
    ],
)
def test_parse_http_response_rejects(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_http_response(raw)


FULL = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-A: b\r\n\r\nbody"


def test_parse_byte_by_byte_prefixes() -> None:
    """Every prefix either parses (head complete) or says "incomplete"; never anything else."""
    head_len = FULL.index(b"\r\n\r\n") + 4
    for n in range(len(FULL) + 1):
        prefix = FULL[:n]
        if n < head_len:
            with pytest.raises(ValueError, match="incomplete"):
                parse_http_response(prefix)
            assert not http_response_complete(prefix)
        else:
            assert parse_http_response(prefix) == (200, FULL[head_len:n])
            assert http_response_complete(prefix) is (n == len(FULL))
            assert http_response_complete(prefix, need_body=False)


def test_parse_ignores_trailing_data() -> None:
    assert parse_http_response(FULL + b"HTTP/1.1 500 Oops\r\n\r\n") == (200, b"body")


def test_response_complete_on_garbage_stops_reading() -> None:
    assert http_response_complete(b"SSH-2.0-x\r\n")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parse_arbitrary_bytes_only_raises_value_error(data: bytes) -> None:
    for candidate in (
        data,
        b"HTTP/1.1 200 OK\r\n" + data,
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + data,
    ):
        try:
            status, body = parse_http_response(candidate)
        except ValueError:
            continue
        assert 100 <= status <= 599
        assert len(body) <= len(candidate)
