"""The feedback agent: a server tells the balancer its own weight and state.

Protocol (HAProxy ``agent-check``, which is the Loadbalancer.org feedback agent
merged into HAProxy 1.5; see HAProxy configuration manual §5.2 "agent-check"
and ``tcpcheck_agent_expect_reply`` in ``src/tcpcheck.c``): connect to the
agent port, optionally send a string (``agent-send``), read one line. The line
holds words separated by spaces, tabs or commas, in any order; when a category
repeats, the last word wins; words are case-insensitive:

==================  ==========================================================
``75%``             weight as a percentage of the configured weight
``maxconn:30``      new maxconn of the server (0 = unlimited)
``weight:5``        absolute weight 0..256 (a medlb extension; HAProxy's CLI form)
``ready`` ``drain`` ``maint``   admin state
``up``              op state UP
``down`` ``stopped`` ``fail``   op state DOWN
``# text``          a description, kept for the log and the state-change cause
==================  ==========================================================

Unknown or malformed words are ignored, but reported (HAProxy logs "agent
reports an error"). Percentages follow HAProxy's ``server_parse_weight_change_request``:
a percentage above 25600 is clamped to 25600 (its overflow guard) and the
resulting weight is capped at 256, HAProxy's maximum weight. Deviation: HAProxy
only treats ``#`` as the start of the description at the beginning of a word;
here any ``#`` starts it, so ``down#disk full`` reads as "down, because disk full".

Semantics kept from HAProxy:

- an agent that cannot be reached changes nothing: connectivity is the job of
  the regular check ("Failure to connect to the agent is not considered an
  error", HAProxy manual);
- the agent may undo an admin state it set itself, but never one a person set:
  DRAIN or MAINT set by an operator (or by the configuration) stays until a
  person lifts it. From READY, the agent may drain, as in HAProxy.

:func:`parse_agent_reply` is pure; :func:`fetch_agent` is the only I/O here.
"""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass

from medlb.model.health import OpState
from medlb.model.server import AdminState, Server

__all__ = ["MAX_AGENT_REPLY", "AgentReply", "apply_agent_reply", "fetch_agent", "parse_agent_reply"]

log = logging.getLogger("medlb.checks")

#: Longest agent reply read; HAProxy's agent reads one buffer, a line is a few words.
MAX_AGENT_REPLY = 1024
#: HAProxy clamps a relative weight here before scaling (overflow guard) ...
MAX_AGENT_PCT = 25600
#: ... and caps the resulting weight here (``SRV_UWGHT_MAX``).
MAX_WEIGHT = 256

_SEPARATORS = re.compile(r"[ \t,]+")
_PCT = re.compile(r"([0-9]{1,9})%")
_NUMBER = re.compile(r"[0-9]{1,9}")

_ADMIN_WORDS = {"ready": AdminState.READY, "drain": AdminState.DRAIN, "maint": AdminState.MAINT}
_OP_WORDS = {"up": OpState.UP, "down": OpState.DOWN, "stopped": OpState.DOWN, "fail": OpState.DOWN}


@dataclass(frozen=True, slots=True)
class AgentReply:
    """What one agent line asks for; None means "not mentioned, leave as is"."""

    weight_pct: int | None = None
    weight: int | None = None
    maxconn: int | None = None
    admin: AdminState | None = None
    op: OpState | None = None
    text: str = ""
    #: Words that were not understood (or had a bad value), in order; ignored.
    unknown: tuple[str, ...] = ()


def parse_agent_reply(line: str) -> AgentReply:
    """Parse one agent line (anything after the first CR or LF is ignored)."""
    line = re.split(r"[\r\n]", line, maxsplit=1)[0]
    words_part, sharp, description = line.partition("#")
    weight_pct: int | None = None
    weight: int | None = None
    maxconn: int | None = None
    admin: AdminState | None = None
    op: OpState | None = None
    unknown: list[str] = []
    for word in _SEPARATORS.split(words_part):
        if not word:
            continue
        lower = word.lower()
        if lower in _OP_WORDS:
            op = _OP_WORDS[lower]
        elif lower in _ADMIN_WORDS:
            admin = _ADMIN_WORDS[lower]
        elif match := _PCT.fullmatch(word):
            weight_pct = min(int(match.group(1)), MAX_AGENT_PCT)
        elif lower.startswith("maxconn:") and _NUMBER.fullmatch(lower[8:]):
            maxconn = int(lower[8:])
        elif lower.startswith("weight:") and _NUMBER.fullmatch(lower[7:]) and int(lower[7:]) <= MAX_WEIGHT:
            weight = int(lower[7:])
        else:
            unknown.append(word)
    return AgentReply(
        weight_pct=weight_pct,
        weight=weight,
        maxconn=maxconn,
        admin=admin,
        op=op,
        text=description.strip(" \t") if sharp else "",
        unknown=tuple(unknown),
    )


def agent_may_set_admin(server: Server) -> bool:
    """Whether the agent may change this server's admin state now (see module doc)."""
    return server.admin_state is AdminState.READY or server.admin_source == "agent"


def apply_agent_reply(server: Server, reply: AgentReply, now: float) -> None:
    """Apply a parsed reply to ``server``, in HAProxy's order: admin, weights, maxconn, health."""
    cause = reply.text
    if reply.admin is not None and reply.admin is not server.admin_state:
        if agent_may_set_admin(server):
            server.set_admin_state(reply.admin, now, source="agent", cause=cause)
        else:
            log.debug(
                "%s: agent asks for %s, ignored: %s set by %s",
                server.key,
                reply.admin.value,
                server.admin_state.value,
                server.admin_source,
            )
    if reply.weight is not None:
        server.set_weight(reply.weight, "agent")
    if reply.weight_pct is not None:
        pct = reply.weight_pct
        if server.weight > 0:
            # HAProxy caps the resulting weight at 256, not the percentage.
            pct = min(pct, MAX_WEIGHT * 100 // server.weight)
        server.set_agent_pct(pct)
    if reply.maxconn is not None:
        server.maxconn = reply.maxconn
    if reply.op is not None and reply.op is not server.op_state:
        word = "up" if reply.op is OpState.UP else "down"
        # HAProxy: "up" brings the server back only "if health checks also report
        # that the service is accessible"; "down" forces it DOWN whatever they say.
        # Acting only on a change also keeps an agent that repeats "up" every poll
        # from resetting the failure run of a server whose checks are failing.
        check = server.last_check
        if reply.op is OpState.DOWN or check is None or check.ok:
            server.force_op_state(reply.op, now, f"agent: {word} ({cause})" if cause else f"agent: {word}")


async def fetch_agent(host: str, port: int, send: str | None, timeout: float) -> str:  # noqa: ASYNC109 - the deadline is part of the verdict
    """Connect to the agent, send ``send`` if given, return its first line (without EOL).

    Reads until a line end, the peer's close or :data:`MAX_AGENT_REPLY` bytes,
    whichever comes first; the whole exchange is bounded by ``timeout``. Raises
    :class:`OSError` (``TimeoutError`` included) when the agent cannot be reached;
    never leaves the socket open.
    """
    writer: asyncio.StreamWriter | None = None
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            if send:
                writer.write(send.encode("utf-8"))
                await writer.drain()
            while len(data) < MAX_AGENT_REPLY and b"\n" not in data and b"\r" not in data:
                chunk = await reader.read(MAX_AGENT_REPLY - len(data))
                if not chunk:
                    break
                data += chunk
    finally:
        if writer is not None:
            writer.close()
    line = re.split(rb"[\r\n]", bytes(data), maxsplit=1)[0]
    return line.decode("utf-8", "replace")
