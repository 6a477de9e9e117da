"""The feedback agent: reply parsing (every word), applying replies, fetching a line."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from medlb.checks.agent import AgentReply, apply_agent_reply, fetch_agent, parse_agent_reply
from medlb.config import HostPort
from medlb.model.health import OpState
from medlb.model.server import AdminState, CheckResult, Server

UP, DOWN = OpState.UP, OpState.DOWN
READY, DRAIN, MAINT = AdminState.READY, AdminState.DRAIN, AdminState.MAINT


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("", AgentReply()),
        ("75%", AgentReply(weight_pct=75)),
        ("0%", AgentReply(weight_pct=0)),
        ("100%\n", AgentReply(weight_pct=100)),
        ("150%", AgentReply(weight_pct=150)),
        ("30000%", AgentReply(weight_pct=25600)),  # HAProxy's overflow clamp
        ("up", AgentReply(op=UP)),
        ("UP", AgentReply(op=UP)),
        ("down", AgentReply(op=DOWN)),
        ("stopped", AgentReply(op=DOWN)),
        ("fail", AgentReply(op=DOWN)),
        ("ready", AgentReply(admin=READY)),
        ("Drain", AgentReply(admin=DRAIN)),
        ("maint", AgentReply(admin=MAINT)),
        ("maxconn:30", AgentReply(maxconn=30)),
        ("MAXCONN:0", AgentReply(maxconn=0)),
        ("weight:5", AgentReply(weight=5)),
        ("weight:256", AgentReply(weight=256)),
        ("up 80%", AgentReply(op=UP, weight_pct=80)),
        ("75%,drain\tmaxconn:10", AgentReply(weight_pct=75, admin=DRAIN, maxconn=10)),
        ("  , 50%  ,,", AgentReply(weight_pct=50)),
        ("down#disk full", AgentReply(op=DOWN, text="disk full")),
        ("down # disk full ", AgentReply(op=DOWN, text="disk full")),
        ("#just a note", AgentReply(text="just a note")),
        ("drain 10% # backup running", AgentReply(admin=DRAIN, weight_pct=10, text="backup running")),
        ("50% 60%", AgentReply(weight_pct=60)),  # last one wins
        ("up down", AgentReply(op=DOWN)),
        ("drain ready", AgentReply(admin=READY)),
        ("75%\r\nmaint", AgentReply(weight_pct=75)),  # one line only
        ("maint\rup", AgentReply(admin=MAINT)),
        ("hello 50%", AgentReply(weight_pct=50, unknown=("hello",))),
        ("75%x", AgentReply(unknown=("75%x",))),
        ("-5%", AgentReply(unknown=("-5%",))),
        ("7.5%", AgentReply(unknown=("7.5%",))),
        ("%", AgentReply(unknown=("%",))),
        ("maxconn:", AgentReply(unknown=("maxconn:",))),
        ("maxconn:-1", AgentReply(unknown=("maxconn:-1",))),
        ("maxconn:abc", AgentReply(unknown=("maxconn:abc",))),
        ("weight:257", AgentReply(unknown=("weight:257",))),
        ("weight:x", AgentReply(unknown=("weight:x",))),
        ("failed halt", AgentReply(unknown=("failed", "halt"))),
    ],
)
def test_parse_agent_reply(line: str, expected: AgentReply) -> None:
    assert parse_agent_reply(line) == expected


def fresh(weight: int = 10, op: OpState = OpState.UP) -> Server:
    return Server("s1", HostPort("127.0.0.1", 104), backend_name="pacs", weight=weight, op_state=op)


def test_apply_weight_pct_and_maxconn() -> None:
    server = fresh(weight=10)
    apply_agent_reply(server, parse_agent_reply("50% maxconn:30"), now=1.0)
    assert server.agent_pct == 50
    assert server.effective_weight(1.0) == 5.0
    assert server.maxconn == 30
    apply_agent_reply(server, parse_agent_reply("maxconn:0"), now=2.0)
    assert server.maxconn == 0  # unlimited again
    assert server.agent_pct == 50  # untouched when not mentioned


def test_apply_pct_caps_resulting_weight_at_256() -> None:
    server = fresh(weight=100)
    apply_agent_reply(server, parse_agent_reply("1000%"), now=1.0)
    assert server.effective_weight(1.0) == 256.0
    small = fresh(weight=1)
    apply_agent_reply(small, parse_agent_reply("1000%"), now=1.0)
    assert small.effective_weight(1.0) == 10.0


def test_apply_absolute_weight_then_pct() -> None:
    server = fresh(weight=10)
    apply_agent_reply(server, parse_agent_reply("weight:4 50%"), now=1.0)
    assert server.weight == 4
    assert server.effective_weight(1.0) == 2.0


def test_apply_op_state_with_cause() -> None:
    server = fresh(op=OpState.UP)
    changes: list[tuple[str, str]] = []
    server.listeners.append(lambda srv, what, cause: changes.append((what, cause)))
    apply_agent_reply(server, parse_agent_reply("down#disk full"), now=5.0)
    assert server.op_state is DOWN
    assert changes == [("op_state UP -> DOWN", "agent: down (disk full)")]
    apply_agent_reply(server, parse_agent_reply("up"), now=6.0)
    assert server.op_state is UP
    assert changes[-1] == ("op_state DOWN -> UP", "agent: up")


def test_agent_up_does_not_override_failing_checks() -> None:
    """HAProxy: "up" restores UP only if the health checks agree; and an agent that
    repeats "up" must not reset the failure run of a server whose checks fail."""
    server = Server("s1", HostPort("127.0.0.1", 104), backend_name="pacs", op_state=OpState.UP, fall=2)
    server.record_check(CheckResult(False, "connection refused", at=1.0, duration=0.0))
    apply_agent_reply(server, parse_agent_reply("up"), now=1.5)
    server.record_check(CheckResult(False, "connection refused", at=2.0, duration=0.0))
    assert server.op_state is DOWN  # fall=2 reached despite the agent's "up"
    apply_agent_reply(server, parse_agent_reply("up"), now=2.5)
    assert server.op_state is DOWN  # the last check failed: "up" is not enough
    server.record_check(CheckResult(True, "L4OK", at=3.0, duration=0.0))
    apply_agent_reply(server, parse_agent_reply("down"), now=3.5)
    assert server.op_state is DOWN
    apply_agent_reply(server, parse_agent_reply("up"), now=4.0)
    assert server.op_state is UP  # checks are fine now: "up" lifts the agent's "down"


def test_agent_may_undo_its_own_admin_state() -> None:
    server = fresh()
    apply_agent_reply(server, parse_agent_reply("drain"), now=1.0)
    assert (server.admin_state, server.admin_source) == (DRAIN, "agent")
    apply_agent_reply(server, parse_agent_reply("maint"), now=2.0)
    assert (server.admin_state, server.admin_source) == (MAINT, "agent")
    apply_agent_reply(server, parse_agent_reply("ready"), now=3.0)
    assert (server.admin_state, server.admin_source) == (READY, "agent")


@pytest.mark.parametrize("source", ["operator", "config"])
@pytest.mark.parametrize("held", [DRAIN, MAINT])
@pytest.mark.parametrize("asked", ["ready", "drain", "maint"])
def test_agent_never_overrides_a_person(source: str, held: AdminState, asked: str) -> None:
    server = fresh()
    server.set_admin_state(held, 1.0, source=source)
    apply_agent_reply(server, parse_agent_reply(f"{asked} 50%"), now=2.0)
    assert (server.admin_state, server.admin_source) == (held, source)
    assert server.agent_pct == 50  # the rest of the reply still applies


def test_agent_may_drain_after_an_operator_made_it_ready() -> None:
    # HAProxy: "set server state ready" clears the forced state; the agent can drain again later.
    server = fresh()
    server.set_admin_state(DRAIN, 1.0, source="operator")
    server.set_admin_state(READY, 2.0, source="operator")
    apply_agent_reply(server, parse_agent_reply("drain"), now=3.0)
    assert (server.admin_state, server.admin_source) == (DRAIN, "agent")


def test_apply_empty_reply_changes_nothing() -> None:
    server = fresh(weight=7)
    changes: list[str] = []
    server.listeners.append(lambda srv, what, cause: changes.append(what))
    apply_agent_reply(server, parse_agent_reply("nonsense"), now=1.0)
    assert changes == []
    assert (server.weight, server.agent_pct, server.admin_state, server.op_state) == (7, 100, READY, UP)


# -- fetch_agent ----------------------------------------------------------------------


async def agent_server(reply: bytes, received: list[bytes], *, close: bool, expect: int = 0) -> tuple[Any, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if expect:
                received.append(await reader.readexactly(expect))
            writer.write(reply)
            await writer.drain()
            if not close:
                await asyncio.sleep(10)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


def test_fetch_agent_reads_one_line_without_waiting_for_close(run: Any) -> None:
    received: list[bytes] = []

    async def main() -> tuple[str, float]:
        server, port = await agent_server(b"75% drain\nsecond line\n", received, close=False, expect=6)
        async with server:
            loop = asyncio.get_running_loop()
            start = loop.time()
            line = await fetch_agent("127.0.0.1", port, "hello\n", timeout=3.0)
            return line, loop.time() - start

    line, elapsed = run(main())
    assert line == "75% drain"
    assert received == [b"hello\n"]
    assert elapsed < 1.0


def test_fetch_agent_line_ended_by_close(run: Any) -> None:
    async def main() -> str:
        server, port = await agent_server(b"up 50%", [], close=True)
        async with server:
            return await fetch_agent("127.0.0.1", port, None, timeout=3.0)

    assert run(main()) == "up 50%"


def test_fetch_agent_reply_is_bounded(run: Any) -> None:
    async def main() -> str:
        server, port = await agent_server(b"x" * 5000, [], close=False)
        async with server:
            return await fetch_agent("127.0.0.1", port, None, timeout=3.0)

    assert run(main()) == "x" * 1024


def test_fetch_agent_refused(run: Any) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        run(fetch_agent("127.0.0.1", port, None, timeout=1.0))


def test_fetch_agent_timeout(run: Any) -> None:
    async def main() -> str:
        server, port = await agent_server(b"", [], close=False)
        async with server:
            return await fetch_agent("127.0.0.1", port, None, timeout=0.2)

    with pytest.raises(TimeoutError):
        run(main())
