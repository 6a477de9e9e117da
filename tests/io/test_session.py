"""Loopback tests of the TCP data path: frontend -> session -> relay -> server.

Servers are real asyncio TCP servers on port 0; the balancer runs in-process on
both asyncio and uvloop, with the splice and the copy pump.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import time
import types
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from medlb.balance import make_balancer
from medlb.config import HostPort, ResolvedTimeouts
from medlb.io import relay as relay_module
from medlb.io import session as session_module
from medlb.io.frontend import Frontend, open_listener
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.health import OpState
from medlb.model.server import Server
from tests.conftest import Runner
from tests.helpers import free_port

#: Test servers started in the current test; ``lab`` closes them (uvloop turns a
#: leaked server into a hang at loop close when warnings are errors).
_OPEN_SERVERS: list[asyncio.Server] = []

TIMEOUTS = ResolvedTimeouts(connect=1.0, client=30.0, server=30.0, queue=2.0, check=1.0)


@dataclass
class EchoServer:
    """Echoes until EOF, then writes ``bye`` and closes (exercises half-close)."""

    name: str
    server: asyncio.Server | None = None
    accepted: int = 0
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    slow: bool = False

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            writer.write(f"{self.name}\n".encode())
            while data := await reader.read(65536):
                if self.slow:
                    await asyncio.sleep(0.001)
                writer.write(data)
                await writer.drain()
            writer.write(b"bye")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        _OPEN_SERVERS.append(self.server)
        port: int = self.server.sockets[0].getsockname()[1]
        return port


def up_server(name: str, port: int, **kw: object) -> Server:
    server = Server(name, HostPort("127.0.0.1", port), op_state=OpState.UP, **kw)  # type: ignore[arg-type]
    server.sockaddr = (socket.AF_INET, ("127.0.0.1", port))
    return server


@dataclass
class Lab:
    frontend: Frontend
    backend: Backend
    port: int
    errors: list[Server]


@contextlib.asynccontextmanager
async def lab(
    servers: list[Server],
    *,
    balance: str = "roundrobin",
    retries: int = 2,
    redispatch: bool = True,
    maxconn: int = 100,
    maxqueue: int = 0,
    splice: bool = True,
    timeouts: ResolvedTimeouts = TIMEOUTS,
    backlog: int = 128,
) -> AsyncIterator[Lab]:
    loop = asyncio.get_running_loop()
    backend = Backend("pool", servers, make_balancer(balance), BackendPolicy(retries, redispatch, maxqueue), loop.time)
    errors: list[Server] = []

    class Observer:
        def report_connect_error(self, server: Server) -> None:
            errors.append(server)

        def report_connect_ok(self, server: Server) -> None:
            pass

    frontend = Frontend(loop, "fe", backend, maxconn=maxconn, timeouts=timeouts, observer=Observer(), splice=splice)
    listener = frontend.add_listener(open_listener(HostPort("127.0.0.1", 0), backlog))
    try:
        yield Lab(frontend, backend, listener.address[1], errors)
    finally:
        frontend.close_listeners()
        frontend.abort_sessions("test_end")
        await asyncio.sleep(0.05)  # let server handlers see EOF and finish
        while _OPEN_SERVERS:
            srv = _OPEN_SERVERS.pop()
            srv.close()
            await srv.wait_closed()


async def roundtrip(port: int, payload: bytes) -> tuple[bytes, bytes]:
    """Send ``payload``, half-close, read everything: (greeting line, rest)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    greeting = await asyncio.wait_for(reader.readline(), 5)

    async def send() -> None:
        writer.write(payload)
        await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    rest = await asyncio.wait_for(reader.read(), 30)
    await sender
    writer.close()
    return greeting, rest


async def eventually(predicate: Callable[[], bool], limit: float = 10.0) -> None:
    """Poll ``predicate`` until it holds, for at most ``limit`` seconds."""
    for _ in range(int(limit / 0.02)):
        if predicate():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def read_all_or_reset(port: int, wait: float = 2.0) -> bytes:
    """Everything the balancer sends before closing, or ``b"reset"`` on a RST
    (which may come so fast that it already fails the connect)."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionError:
        return b"reset"
    try:
        writer.write_eof()  # nothing to send: let an echoing server finish
        return await asyncio.wait_for(reader.read(), wait)
    except ConnectionError:
        return b"reset"
    finally:
        writer.close()


@pytest.mark.parametrize("splice", [True, False], ids=["splice", "copy"])
def test_relay_integrity_and_half_close(run: Runner, splice: bool) -> None:
    """20 MiB through the relay arrive intact in both directions; FIN is forwarded
    (the server only answers ``bye`` after it sees the client's half-close)."""
    payload = os.urandom(20 * 1024 * 1024)

    async def main() -> None:
        echo = EchoServer("s1", slow=False)
        port = await echo.start()
        async with lab([up_server("s1", port)], splice=splice) as env:
            greeting, rest = await roundtrip(env.port, payload)
            assert greeting == b"s1\n"
            assert rest.endswith(b"bye")
            assert hashlib.sha256(rest[:-3]).digest() == hashlib.sha256(payload).digest()
            await asyncio.sleep(0.05)
            server = env.backend.servers[0]
            assert server.bytes_in == len(payload)
            assert server.bytes_out == len(payload) + 3 + 3
            assert server.cur_sessions == 0
            assert env.frontend.cur_sessions == 0

    run(main())


def test_backpressure_bounds_buffering(run: Runner) -> None:
    """A server that reads nothing: medlb stops reading the client, so the client's
    send blocks instead of medlb buffering without limit."""

    async def main() -> None:
        stalled = asyncio.Event()
        accepted: list[asyncio.StreamWriter] = []

        async def never_read(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            accepted.append(writer)
            await stalled.wait()
            writer.close()

        srv = await asyncio.start_server(never_read, "127.0.0.1", 0)
        _OPEN_SERVERS.append(srv)
        port = srv.sockets[0].getsockname()[1]
        async with lab([up_server("s1", port)]) as env:
            _reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            sent = 0
            chunk = b"x" * 65536
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    while True:
                        writer.write(chunk)
                        await writer.drain()
                        sent += len(chunk)
            # Kernel buffers on three sockets plus one pipe: a few MiB at most, never 1 GiB.
            assert 0 < sent < 64 * 1024 * 1024
            stalled.set()
            writer.close()

    run(main())


def test_roundrobin_spreads_by_weight(run: Runner) -> None:
    async def main() -> None:
        echoes = [EchoServer("a"), EchoServer("b")]
        ports = [await e.start() for e in echoes]
        servers = [up_server("a", ports[0], weight=1), up_server("b", ports[1], weight=3)]
        async with lab(servers) as env:
            seen = [(await roundtrip(env.port, b""))[0].decode().strip() for _ in range(8)]
            assert seen.count("a") == 2 and seen.count("b") == 6

    run(main())


def test_dead_server_is_redispatched_without_client_error(run: Runner) -> None:
    """A server believed UP that refuses connections: every client still gets served,
    the failures are reported for passive observation."""

    async def main() -> None:
        echo = EchoServer("alive")
        port = await echo.start()
        dead = up_server("dead", free_port())
        async with lab([dead, up_server("alive", port)], retries=2, redispatch=True) as env:
            for _ in range(6):
                greeting, rest = await roundtrip(env.port, b"ping")
                assert greeting == b"alive\n" and rest == b"pingbye"
            assert dead.connect_errors >= 3
            assert env.errors and all(s is dead for s in env.errors)

    run(main())


def test_without_redispatch_retries_stay_on_the_dead_server(run: Runner) -> None:
    async def main() -> None:
        echo = EchoServer("alive")
        port = await echo.start()
        dead = up_server("dead", free_port())
        async with lab([dead, up_server("alive", port)], retries=1, redispatch=False) as env:
            results = []
            for _ in range(4):
                got = await read_all_or_reset(env.port, wait=5)
                results.append(got if got in (b"", b"reset") else got.split(b"\n")[0] + b"\n")
            # Round robin alternates: the sessions sent to "dead" fail after 1 retry there.
            assert results.count(b"alive\n") == 2
            assert results.count(b"reset") + results.count(b"") == 2
            assert dead.connect_errors == 4

    run(main())


def test_no_usable_server_closes_client_at_once(run: Runner) -> None:
    async def main() -> None:
        server = up_server("s1", free_port())
        server.force_op_state(OpState.DOWN, 0.0, "test")
        async with lab([server]) as env:
            start = asyncio.get_running_loop().time()
            got = await read_all_or_reset(env.port)
            assert got in (b"", b"reset")
            assert asyncio.get_running_loop().time() - start < 1.0
            await asyncio.sleep(0.05)
            assert env.backend.no_server == 1

    run(main())


def test_backup_takes_over_only_when_primaries_are_down(run: Runner) -> None:
    async def main() -> None:
        echoes = [EchoServer("primary"), EchoServer("backup")]
        ports = [await e.start() for e in echoes]
        primary = up_server("primary", ports[0])
        backup = up_server("backup", ports[1], backup=True)
        async with lab([primary, backup]) as env:
            assert {(await roundtrip(env.port, b""))[0] for _ in range(4)} == {b"primary\n"}
            primary.force_op_state(OpState.DOWN, 1.0, "test")
            assert {(await roundtrip(env.port, b""))[0] for _ in range(4)} == {b"backup\n"}

    run(main())


def test_maxconn_queues_then_serves_in_order(run: Runner) -> None:
    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        server = up_server("s1", port, maxconn=1)
        async with lab([server]) as env:
            r1, w1 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await r1.readline() == b"s1\n"
            r2, w2 = await asyncio.open_connection("127.0.0.1", env.port)
            await asyncio.sleep(0.1)
            assert len(env.backend.queue) == 1 and server.cur_sessions == 1
            assert echo.accepted == 1
            w1.write_eof()
            assert await r1.read() == b"bye"
            assert await asyncio.wait_for(r2.readline(), 2) == b"s1\n"
            assert echo.accepted == 2
            w1.close()
            w2.close()

    run(main())


def test_a_newcomer_does_not_take_a_slot_ahead_of_the_queue(run: Runner) -> None:
    """With global.workers, a slot another process frees is not announced: the next new session
    must hand it to the queue's head and wait behind it, not take it."""

    from tests.balance.test_leastconn import OtherProcesses

    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        server = up_server("s1", port, maxconn=1)
        others = OtherProcesses(1)
        server.share(others)  # another process holds the only slot
        async with lab([server]) as env:
            r1, w1 = await asyncio.open_connection("127.0.0.1", env.port)
            await asyncio.sleep(0.1)
            assert len(env.backend.queue) == 1
            others.add(-1)  # that process's session ended; nobody here is told
            r2, w2 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await asyncio.wait_for(r1.readline(), 2) == b"s1\n"  # the older one is served
            await asyncio.sleep(0.1)
            assert len(env.backend.queue) == 1 and echo.accepted == 1  # the newcomer waits its turn
            w1.close()
            assert await asyncio.wait_for(r2.readline(), 2) == b"s1\n"
            w2.close()

    run(main())


def test_queue_timeout_refuses_cleanly(run: Runner) -> None:
    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        timeouts = ResolvedTimeouts(connect=1.0, client=30.0, server=30.0, queue=0.2, check=1.0)
        async with lab([up_server("s1", port, maxconn=1)], timeouts=timeouts) as env:
            r1, w1 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await r1.readline() == b"s1\n"
            r2, w2 = await asyncio.open_connection("127.0.0.1", env.port)
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(r2.read(), 2) == b""
            assert env.backend.queue_timeouts == 1
            assert echo.accepted == 1
            w1.close()
            w2.close()

    run(main())


def test_maxqueue_full_refuses(run: Runner) -> None:
    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        async with lab([up_server("s1", port, maxconn=1)], maxqueue=1) as env:
            c1 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await c1[0].readline() == b"s1\n"
            c2 = await asyncio.open_connection("127.0.0.1", env.port)
            await asyncio.sleep(0.1)
            assert len(env.backend.queue) == 1
            assert await read_all_or_reset(env.port) in (b"", b"reset")
            assert env.backend.queue_full == 1 and len(env.backend.queue) == 1
            for _, w in (c1, c2):
                w.close()

    run(main())


@contextlib.asynccontextmanager
async def short_idle_session() -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """One greeted session through a lab whose idle timeout is 0.3 s."""
    echo = EchoServer("s1")
    port = await echo.start()
    timeouts = ResolvedTimeouts(connect=1.0, client=0.3, server=30.0, queue=1.0, check=1.0)
    async with lab([up_server("s1", port)], timeouts=timeouts) as env:
        reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
        assert await reader.readline() == b"s1\n"
        yield reader, writer


def test_idle_timeout_closes_silent_session(run: Runner) -> None:
    async def main() -> None:
        async with short_idle_session() as (reader, writer):
            start = asyncio.get_running_loop().time()
            # A reset, not a clean end: the client must not take a stalled
            # transfer for a finished one.
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 3)
            elapsed = asyncio.get_running_loop().time() - start
            assert 0.2 < elapsed < 1.5
            writer.close()

    run(main())


def test_traffic_keeps_an_idle_timeout_from_firing(run: Runner) -> None:
    """A session that keeps moving bytes outlives several idle timeouts."""

    async def main() -> None:
        async with short_idle_session() as (reader, writer):
            for _ in range(10):  # 1.5 s in total: five idle timeouts' worth
                writer.write(b"tick")
                assert await asyncio.wait_for(reader.readexactly(4), 1) == b"tick"
                await asyncio.sleep(0.15)
            writer.write_eof()
            assert await reader.read() == b"bye"
            writer.close()

    run(main())


def test_frontend_maxconn_pauses_accepting(run: Runner) -> None:
    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        async with lab([up_server("s1", port)], maxconn=2) as env:
            c1 = await asyncio.open_connection("127.0.0.1", env.port)
            c2 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await c1[0].readline() == b"s1\n" and await c2[0].readline() == b"s1\n"
            # The third waits in the kernel backlog: connected at TCP level, not served.
            r3, w3 = await asyncio.open_connection("127.0.0.1", env.port)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(r3.readline(), 0.3)
            assert env.frontend.cur_sessions == 2
            c1[1].close()
            assert await asyncio.wait_for(r3.readline(), 2) == b"s1\n"
            c2[1].close()
            w3.close()

    run(main())


def test_accepted_sockets_inherit_tcp_nodelay() -> None:
    """The listener sets TCP_NODELAY once; medlb relies on the kernel copying it to
    every accepted socket (DICOM over Nagle is 10-30x slower)."""
    listener = open_listener(HostPort("127.0.0.1", 0), 8)
    listener.setblocking(True)
    try:
        with socket.create_connection(listener.getsockname()):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        listener.close()


def test_connect_timeout_fails_fast_and_redispatches(run: Runner) -> None:
    """A server that accepts no connection (its accept queue is full, so SYNs are
    dropped) costs the client ``timeouts.connect``, not the kernel's minutes of SYN
    retries: medlb gives up on it and redispatches to a live server."""

    async def main() -> None:
        blackhole = socket.socket()
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(0)
        fillers = []
        for _ in range(3):  # fill the accept queue; later SYNs are dropped
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(blackhole.getsockname())
            fillers.append(filler)
        await asyncio.sleep(0.1)
        echo = EchoServer("alive")
        port = await echo.start()
        dead = up_server("dead", blackhole.getsockname()[1])
        timeouts = ResolvedTimeouts(connect=0.3, client=30.0, server=30.0, queue=1.0, check=1.0)
        try:
            async with lab([dead, up_server("alive", port)], timeouts=timeouts) as env:
                loop = asyncio.get_running_loop()
                start = loop.time()
                greeting, rest = await roundtrip(env.port, b"x")
                elapsed = loop.time() - start
                assert greeting == b"alive\n" and rest == b"xbye"
                assert 0.25 < elapsed < 2.0
                assert dead.connect_errors == 1 and env.errors == [dead]
        finally:
            for filler in fillers:
                filler.close()
            blackhole.close()

    run(main())


def test_server_reset_is_passed_on_as_a_reset(run: Runner) -> None:
    """A server that aborts mid-response must not look like a clean end to the
    client: medlb resets the client connection instead of closing it with a FIN."""

    async def main() -> None:
        async def abort_midway(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"partial response")
            await writer.drain()
            await reader.read(1)  # wait for the client's request byte
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()

        srv = await asyncio.start_server(abort_midway, "127.0.0.1", 0)
        _OPEN_SERVERS.append(srv)
        async with lab([up_server("s1", srv.sockets[0].getsockname()[1])]) as env:
            reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
            assert await reader.readexactly(16) == b"partial response"
            writer.write(b"x")
            with pytest.raises(ConnectionResetError):
                await asyncio.wait_for(reader.read(), 3)
            writer.close()
            await asyncio.sleep(0.05)
            assert env.frontend.cur_sessions == 0

    run(main())


def test_server_reset_before_any_byte_is_retried_elsewhere(run: Runner) -> None:
    """A server that accepts and resets at once (dying, or shedding load): nothing
    was exchanged, so medlb redispatches and the client never notices."""

    async def main() -> None:
        async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            writer.transport.abort()

        bad = await asyncio.start_server(reset_at_once, "127.0.0.1", 0)
        _OPEN_SERVERS.append(bad)
        echo = EchoServer("alive")
        port = await echo.start()
        flaky = up_server("flaky", bad.sockets[0].getsockname()[1])
        async with lab([flaky, up_server("alive", port)]) as env:
            for _ in range(4):
                greeting, rest = await roundtrip(env.port, b"data")
                assert greeting == b"alive\n" and rest == b"databye"
            assert flaky.connect_errors >= 2
            assert flaky.cur_sessions == 0

    run(main())


def test_ipv6_frontend_and_server(run: Runner) -> None:
    """Dual-stack hospitals: bind on [::1], relay to a server on [::1]."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6 in this kernel")

    async def main() -> None:
        async def greet6(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"v6\n")
            await writer.drain()
            writer.close()

        try:
            srv = await asyncio.start_server(greet6, "::1", 0)
        except OSError:
            pytest.skip("::1 is not configured")
        _OPEN_SERVERS.append(srv)
        port = srv.sockets[0].getsockname()[1]
        server = Server("s6", HostPort("::1", port), op_state=OpState.UP)
        server.sockaddr = (socket.AF_INET6, ("::1", port, 0, 0))
        loop = asyncio.get_running_loop()
        backend = Backend("pool", [server], make_balancer("roundrobin"), BackendPolicy(), loop.time)
        frontend = Frontend(loop, "fe6", backend, maxconn=10, timeouts=TIMEOUTS)
        listener = frontend.add_listener(open_listener(HostPort("::1", 0), 8))
        try:
            reader, writer = await asyncio.open_connection("::1", listener.address[1])
            assert await asyncio.wait_for(reader.read(), 5) == b"v6\n"
            writer.close()
        finally:
            frontend.close_listeners()
            frontend.abort_sessions("test_end")
            srv.close()
            await srv.wait_closed()
            _OPEN_SERVERS.remove(srv)

    run(main())


def test_a_dirty_pipe_never_reaches_the_next_session(run: Runner) -> None:
    """Regression: a client reset while its pump still had spliced bytes in the
    pipe used to return that pipe to the pool, and the next bulk session received
    the previous session's bytes (one patient's data in another's stream)."""
    relay_module._PIPES.clear()

    async def main() -> None:
        served = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal served
            first = served == 0
            served += 1
            with contextlib.suppress(ConnectionError):
                writer.write((b"A" if first else b"B") * (1 << 20))
                await writer.drain()
                if first:
                    await reader.read()  # the client's FIN, forwarded
                    await asyncio.sleep(0.2)  # the client has reset meanwhile
                    writer.write(b"A" * (256 << 10))
                    await writer.drain()
            writer.close()

        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        _OPEN_SERVERS.append(srv)
        async with lab([up_server("s1", srv.sockets[0].getsockname()[1])]) as env:

            def reset_after_reading() -> None:
                c = socket.create_connection(("127.0.0.1", env.port))
                got = 0
                while got < (1 << 20):
                    got += len(c.recv(1 << 20))
                c.shutdown(socket.SHUT_WR)
                time.sleep(0.05)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                c.close()

            def read_all() -> bytes:
                with socket.create_connection(("127.0.0.1", env.port)) as c:
                    data = bytearray()
                    while chunk := c.recv(1 << 20):
                        data += chunk
                    return bytes(data)

            await asyncio.to_thread(reset_after_reading)
            await asyncio.sleep(0.5)
            data = await asyncio.to_thread(read_all)
            assert data == b"B" * (1 << 20)

    run(main())


def test_a_long_queue_drains_when_its_server_dies(run: Runner) -> None:
    """Regression: hundreds of queued sessions whose grants all fail at once used
    to recurse once per waiter (RecursionError, slots and sessions stuck)."""
    n = 300

    async def main() -> None:
        loop = asyncio.get_running_loop()
        errors: list[object] = []
        loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx.get("exception")))

        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"hi\n")
            await writer.drain()
            await reader.read()
            writer.close()

        srv = await asyncio.start_server(hold, "127.0.0.1", 0)
        server = up_server("s1", srv.sockets[0].getsockname()[1], maxconn=1)
        timeouts = ResolvedTimeouts(connect=1.0, client=30.0, server=30.0, queue=20.0, check=1.0)
        async with lab([server], maxconn=n + 10, timeouts=timeouts, backlog=n + 10) as env:
            first_r, first_w = await asyncio.open_connection("127.0.0.1", env.port)
            assert await first_r.readline() == b"hi\n"
            clients = []
            for _ in range(n):
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", env.port))
                clients.append(c)
            await eventually(lambda: len(env.backend.queue) == n)
            srv.close()
            await srv.wait_closed()
            first_w.close()
            await asyncio.wait_for(env.frontend.idle_event.wait(), 10)
            assert not env.backend.queue and server.cur_sessions == 0 and env.backend.cur_sessions == 0
            assert errors == []
            for c in clients:
                c.close()

    run(main())


def test_timed_out_waiters_leave_the_queue_at_once(run: Runner) -> None:
    """Regression: waiters that timed out stayed in the deque and counted against
    maxqueue, so new clients were refused as queue_full with nobody waiting."""

    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        timeouts = ResolvedTimeouts(connect=1.0, client=30.0, server=30.0, queue=0.2, check=1.0)
        async with lab([up_server("s1", port, maxconn=1)], maxqueue=2, timeouts=timeouts) as env:
            r, w = await asyncio.open_connection("127.0.0.1", env.port)
            assert await r.readline() == b"s1\n"
            waiting = [await asyncio.open_connection("127.0.0.1", env.port) for _ in range(2)]
            await asyncio.sleep(0.5)
            assert env.backend.queue_timeouts == 2 and len(env.backend.queue) == 0
            late = await asyncio.open_connection("127.0.0.1", env.port)
            await asyncio.sleep(0.05)
            assert env.backend.queue_full == 0 and len(env.backend.queue) == 1
            w.close()
            for _, writer in [*waiting, late]:
                writer.close()

    run(main())


def test_no_socket_for_the_server_frees_the_slot(run: Runner, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: when socket() failed (fd exhaustion) the server slot leaked, and
    with maxconn 1 every later client queued until it timed out."""

    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        server = up_server("s1", port, maxconn=1)
        async with lab([server]) as env:

            def no_fds(*args: object, **kwargs: object) -> socket.socket:
                raise OSError(errno.EMFILE, "Too many open files")

            # Only the session module's view of ``socket`` fails; the test's own do not.
            shim = types.SimpleNamespace(**{k: getattr(socket, k) for k in dir(socket) if not k.startswith("__")})
            shim.socket = no_fds
            monkeypatch.setattr(session_module, "socket", shim)
            try:
                assert await read_all_or_reset(env.port) in (b"", b"reset")
            finally:
                monkeypatch.setattr(session_module, "socket", socket)
            await asyncio.sleep(0.05)
            assert server.cur_sessions == 0 and not server.full
            greeting, _ = await roundtrip(env.port, b"")
            assert greeting == b"s1\n"

    run(main())


def test_a_queued_session_keeps_its_backend_across_a_frontend_switch(run: Runner) -> None:
    """A reload may point the frontend at another backend (here with PROXY v2); a session
    already queued on the old backend is served there, and with that backend's settings."""

    async def main() -> None:
        echo = EchoServer("s1")
        port = await echo.start()
        server = up_server("s1", port, maxconn=1)
        async with lab([server]) as env:
            other = Backend(
                "other",
                [],
                make_balancer("roundrobin"),
                BackendPolicy(proxy_protocol="v2"),
                asyncio.get_running_loop().time,
            )
            r1, w1 = await asyncio.open_connection("127.0.0.1", env.port)
            assert await r1.readline() == b"s1\n"
            r2, w2 = await asyncio.open_connection("127.0.0.1", env.port)
            await asyncio.sleep(0.1)
            assert len(env.backend.queue) == 1
            env.frontend.reconfigure(other, maxconn=100, timeouts=TIMEOUTS, splice=True)
            w1.write_eof()
            assert await r1.read() == b"bye"
            assert await asyncio.wait_for(r2.readline(), 2) == b"s1\n"
            w2.write(b"plain")
            await w2.drain()
            # The echo shows exactly what the server received: no PROXY header in front.
            assert await asyncio.wait_for(r2.readexactly(5), 2) == b"plain"
            assert env.backend.cur_sessions == 1 and other.cur_sessions == 0
            w1.close()
            w2.close()
            await asyncio.sleep(0.05)
            assert env.backend.cur_sessions == 0 and other.cur_sessions == 0

    run(main())
