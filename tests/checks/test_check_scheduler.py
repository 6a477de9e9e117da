"""ServerChecker against real loopback listeners: rise/fall, MAINT, passive errors, agent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import socket
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from medlb.checks.scheduler import ServerChecker
from medlb.config import BUILTIN_CHECK, HostPort, ResolvedAgent, ResolvedCheck
from medlb.model.health import OpState, Transition
from medlb.model.server import AdminState, CheckResult, Server

FAST = ResolvedCheck(**{**BUILTIN_CHECK, "inter": 0.05, "fastinter": 0.05, "downinter": 0.05, "jitter": 0.0})
NO_AGENT = ResolvedAgent(enabled=False, port=None, address=None, inter=2.0, send=None)


class RecordingServer(Server):
    """A Server that keeps every check result, for assertions on the sequence."""

    __slots__ = ("results", "transitions")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.results: list[CheckResult] = []
        self.transitions: list[tuple[int, Transition]] = []

    def record_check(self, result: CheckResult) -> Transition | None:
        self.results.append(result)
        transition = super().record_check(result)
        if transition is not None:
            self.transitions.append((len(self.results), transition))
        return transition


class Listener:
    """A loopback TCP listener that counts connections and can be stopped and restarted."""

    def __init__(self, host: str = "127.0.0.1", reply: bytes = b"") -> None:
        self.host = host
        self.port = 0
        self.reply = reply
        self.accepted = 0
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            if self.reply:
                with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                    await reader.readuntil(b"\r\n\r\n")
                writer.write(self.reply)
        finally:
            writer.close()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()
        self.server = None

    async def __aenter__(self) -> Listener:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Every server must be closed: uvloop cannot close a loop with a live
        # listening handle once its ResourceWarning is turned into an error.
        if self.server is not None:
            await self.stop()


async def until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def running(checker: ServerChecker, agent: bool = False) -> AsyncIterator[ServerChecker]:
    tasks = [asyncio.create_task(checker.run())]
    if agent:
        tasks.append(asyncio.create_task(checker.run_agent()))
    try:
        yield checker
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert task.cancelled()


def make_server(port: int, host: str = "127.0.0.1", rise: int = 2, fall: int = 3) -> RecordingServer:
    return RecordingServer("s1", HostPort(host, port), backend_name="pacs", rise=rise, fall=fall)


def test_up_on_first_check_down_after_fall_up_after_rise(run: Any) -> None:
    async def main() -> RecordingServer:
        async with Listener() as listener:
            server = make_server(listener.port, rise=2, fall=3)
            async with running(ServerChecker(server, FAST, NO_AGENT, 1.0)):
                await until(lambda: server.is_up)
                assert len(server.results) == 1  # a fresh server is UP after its first good check
                assert server.sockaddr == (socket.AF_INET, ("127.0.0.1", listener.port))

                await listener.stop()
                await until(lambda: not server.is_up)
                at_down = len(server.results)
                await listener.start()  # same port
                await until(lambda: server.is_up)
                at_up = len(server.results)
            assert [n for n, _ in server.transitions] == [1, at_down, at_up]
            return server

    server = run(main())
    oks = [r.ok for r in server.results]
    (_, first_up), (down_at, down), (up_at, up) = server.transitions
    assert first_up.new is OpState.UP
    # DOWN after exactly `fall` consecutive failures, preceded by a success.
    assert oks[down_at - 4 : down_at] == [True, False, False, False]
    assert down.new is OpState.DOWN
    assert down.cause == "connection refused"
    # UP again after exactly `rise` consecutive successes.
    assert oks[up_at - 3 : up_at] == [False, True, True]
    assert up.new is OpState.UP
    assert all(r.duration >= 0 for r in server.results)


def test_maint_stops_checks_and_ready_resumes_them(run: Any) -> None:
    async def main() -> None:
        async with Listener() as listener:
            server = make_server(listener.port)
            loop = asyncio.get_running_loop()
            checker = ServerChecker(server, FAST, NO_AGENT, 1.0)
            async with running(checker):
                await until(lambda: listener.accepted >= 3)
                server.set_admin_state(AdminState.MAINT, loop.time(), source="operator")
                await asyncio.sleep(0.06)  # a check already under way may still finish
                paused_at = listener.accepted
                await asyncio.sleep(0.4)  # 8 intervals
                assert listener.accepted == paused_at
                server.set_admin_state(AdminState.READY, loop.time(), source="operator")
                checker.wake()
                await until(lambda: listener.accepted >= paused_at + 2)
                # Passive errors during MAINT neither fail the server nor wake checks.
                server.set_admin_state(AdminState.MAINT, loop.time(), source="operator")
                await asyncio.sleep(0.06)
                before = len(server.results)
                for _ in range(10):
                    checker.report_connect_error()
                await asyncio.sleep(0.1)
                assert len(server.results) == before

    run(main())


def test_passive_error_brings_the_next_check_forward(run: Any) -> None:
    slow = dataclasses.replace(FAST, inter=30.0, downinter=30.0, fastinter=0.05, error_limit=5)

    async def main() -> None:
        async with Listener() as listener:
            server = make_server(listener.port)
            checker = ServerChecker(server, slow, NO_AGENT, 1.0)
            async with running(checker):
                await until(lambda: listener.accepted == 1)
                await asyncio.sleep(0.1)
                assert listener.accepted == 1  # inter is 30 s: no second check by itself
                checker.report_connect_error()
                assert server.consecutive_errors == 1
                await until(lambda: listener.accepted == 2, within=1.0)
                checker.report_connect_ok()
                assert server.consecutive_errors == 0

    run(main())


def test_error_limit_records_a_failed_check(run: Any) -> None:
    slow = dataclasses.replace(FAST, inter=30.0, downinter=30.0, fastinter=0.05, error_limit=3)

    async def main() -> RecordingServer:
        async with Listener() as listener:
            server = make_server(listener.port, fall=1)
            checker = ServerChecker(server, slow, NO_AGENT, 1.0)
            async with running(checker):
                await until(lambda: server.is_up)
                await listener.stop()  # the real server died; live traffic notices first
                checker.report_connect_error()
                checker.report_connect_error()
                assert server.is_up
                checker.report_connect_error()
                assert not server.is_up  # fall=1: one (simulated) failed check is enough
                assert server.consecutive_errors == 0
            return server

    server = run(main())
    texts = [r.text for r in server.results if not r.ok]
    assert texts[0] == "3 consecutive connection errors on live traffic"
    assert server.transitions[-1][1].cause == "3 consecutive connection errors on live traffic"


def test_wake_is_rate_limited_to_one_check_per_fastinter(run: Any) -> None:
    slow = dataclasses.replace(FAST, inter=30.0, downinter=30.0, fastinter=0.1)

    async def main() -> tuple[int, float]:
        loop = asyncio.get_running_loop()
        async with Listener() as listener:
            server = make_server(listener.port)
            checker = ServerChecker(server, slow, NO_AGENT, 1.0)
            async with running(checker):
                await until(lambda: listener.accepted == 1)
                start = loop.time()
                while loop.time() - start < 0.5:  # 0.5 s of constant nagging, about 50 wakes
                    checker.wake()
                    await asyncio.sleep(0.01)
                return checker.checks_run, loop.time() - start

    checks, took = run(main())
    # One check per fastinter (0.1 s) at most, however late the loop ran: not one per wake.
    assert 3 <= checks <= took / 0.1 + 2, (checks, took)


def test_jittered_interval_stays_in_bounds() -> None:
    check = dataclasses.replace(FAST, inter=2.0, fastinter=0.5, downinter=4.0, jitter=0.1)
    server = make_server(1, rise=2, fall=3)
    checker = ServerChecker(server, check, NO_AGENT, 1.0, rng=random.Random(7))
    down = [checker.interval() for _ in range(200)]
    assert all(3.6 <= d <= 4.4 for d in down)  # steadily DOWN: downinter
    assert len({round(d, 6) for d in down}) > 100  # and really jittered
    server.force_op_state(OpState.UP, 0.0, "test")
    assert all(1.8 <= checker.interval() <= 2.2 for _ in range(100))
    server.record_check(CheckResult(False, "x", 0.0, 0.0))  # transitional: fastinter
    assert all(0.45 <= checker.interval() <= 0.55 for _ in range(100))


def test_type_none_marks_up_without_probing(run: Any) -> None:
    check = dataclasses.replace(FAST, type="none")

    async def main() -> tuple[RecordingServer, int]:
        async with Listener() as listener:
            server = make_server(listener.port)
            checker = ServerChecker(server, check, NO_AGENT, 1.0)
            async with running(checker):
                await until(lambda: server.is_up)
                await asyncio.sleep(0.2)
                for _ in range(10):
                    checker.report_connect_error()
            return server, listener.accepted

    server, accepted = run(main())
    assert accepted == 0
    assert server.results == []
    assert server.is_up


def test_hostname_is_resolved_into_sockaddr(run: Any) -> None:
    family, _, _, _, sockaddr = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)[0]

    async def main() -> RecordingServer:
        async with Listener(host=str(sockaddr[0])) as listener:
            server = make_server(listener.port, host="localhost")
            async with running(ServerChecker(server, FAST, NO_AGENT, 1.0)):
                await until(lambda: server.is_up)
            return server

    server = run(main())
    assert server.sockaddr is not None
    assert server.sockaddr[0] == family
    assert server.sockaddr[1][0] == sockaddr[0]


def test_unresolvable_host_is_a_failed_check(run: Any) -> None:
    async def main() -> RecordingServer:
        server = make_server(80, host="no-such-host.invalid")
        async with running(ServerChecker(server, FAST, NO_AGENT, 0.5)):
            await until(lambda: len(server.results) >= 1)
        return server

    server = run(main())
    assert not server.results[0].ok
    assert server.results[0].text.startswith("cannot resolve host no-such-host.invalid")
    assert server.sockaddr is None


def test_check_port_overrides_server_port(run: Any) -> None:
    async def main() -> int:
        async with Listener() as listener:
            server = make_server(9)  # nothing listens on the service port
            check = dataclasses.replace(FAST, port=listener.port)
            async with running(ServerChecker(server, check, NO_AGENT, 1.0)):
                await until(lambda: server.is_up)
            return listener.accepted

    assert run(main()) >= 1


def test_http_check_sends_the_configured_host_name(run: Any) -> None:
    check = dataclasses.replace(FAST, type="http", path="/ready", expect_status=(200,))
    requests: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        requests.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    async def main() -> tuple[RecordingServer, int]:
        srv = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        async with srv:
            server = make_server(port)
            async with running(ServerChecker(server, check, NO_AGENT, 1.0)):
                await until(lambda: server.is_up)
        return server, port

    server, port = run(main())
    assert requests[0].startswith(f"GET /ready HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    assert server.results[0].text.startswith("L7OK HTTP 200")


def test_external_check_gets_the_contract(run: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    path = tmp_path / "check.sh"
    path.write_text(f'#!/bin/sh\necho "$@" "$HAPROXY_PROXY_NAME" "$MEDLB_SERVER_NAME" > {out}\nexit 0\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    check = dataclasses.replace(FAST, type="external", command=str(path), port=11112)

    async def main() -> RecordingServer:
        server = make_server(104, host="127.0.0.2")
        async with running(ServerChecker(server, check, NO_AGENT, 2.0, vip="10.0.0.10", vport=104)):
            await until(lambda: server.is_up)
        return server

    server = run(main())
    assert out.read_text().split() == ["10.0.0.10", "104", "127.0.0.2", "11112", "pacs", "s1"]
    assert server.results[0].text == "exit 0"


# -- agent ----------------------------------------------------------------------------


class Agent:
    """A tiny feedback agent whose reply the test changes on the fly."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.asked = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.asked += 1
        writer.write(self.reply.encode() + b"\n")
        writer.close()

    async def __aenter__(self) -> Agent:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def test_agent_drives_weight_and_drain(run: Any) -> None:
    async def main() -> None:
        async with Listener() as listener, Agent("50% drain") as agent:
            server = make_server(listener.port)
            settings = ResolvedAgent(enabled=True, port=agent.port, address="127.0.0.1", inter=0.05, send=None)
            loop = asyncio.get_running_loop()
            async with running(ServerChecker(server, FAST, settings, 1.0), agent=True):
                await until(lambda: server.agent_pct == 50 and server.admin_state is AdminState.DRAIN)
                assert server.admin_source == "agent"
                assert server.last_agent == "50% drain"
                await until(lambda: server.is_up)  # DRAIN keeps checking

                agent.reply = "ready 100%"
                await until(lambda: server.agent_pct == 100 and server.admin_state is AdminState.READY)

                # An operator's MAINT: the agent can neither lift it nor is it asked meanwhile.
                server.set_admin_state(AdminState.MAINT, loop.time(), source="operator")
                agent.reply = "ready 10%"
                await asyncio.sleep(0.07)
                asked = agent.asked
                await asyncio.sleep(0.2)
                assert agent.asked <= asked + 1
                assert server.admin_state is AdminState.MAINT
                assert server.agent_pct == 100

                # An operator's DRAIN: the agent keeps adjusting the weight but cannot lift the drain.
                server.set_admin_state(AdminState.DRAIN, loop.time(), source="operator")
                await until(lambda: server.agent_pct == 10)
                assert (server.admin_state, server.admin_source) == (AdminState.DRAIN, "operator")

                # The agent's "down" is an op state change with its reason.
                agent.reply = "down # disk full"
                await until(lambda: not server.is_up, within=1.0)

    run(main())


def test_unreachable_agent_changes_nothing_and_warns_once(run: Any, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead_port = sock.getsockname()[1]

    async def main() -> tuple[RecordingServer, ServerChecker]:
        async with Listener() as listener:
            server = make_server(listener.port)
            settings = ResolvedAgent(enabled=True, port=dead_port, address=None, inter=0.03, send=None)
            checker = ServerChecker(server, FAST, settings, 1.0)
            async with running(checker, agent=True):
                await until(lambda: server.is_up)
                await asyncio.sleep(0.3)
                assert server.is_up
                assert server.last_agent == "unreachable: connection refused"
                assert (server.admin_state, server.agent_pct) == (AdminState.READY, 100)
            return server, checker

    with caplog.at_level(logging.DEBUG, logger="medlb.checks"):
        run(main())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "unreachable" in warnings[0].getMessage()


def test_agent_disabled_returns_at_once(run: Any) -> None:
    async def main() -> None:
        checker = ServerChecker(make_server(1), FAST, NO_AGENT, 1.0)
        async with asyncio.timeout(1.0):
            await checker.run_agent()
        checker = ServerChecker(make_server(1), FAST, None, 1.0)
        async with asyncio.timeout(1.0):
            await checker.run_agent()

    run(main())
