"""``mode: hl7``: HL7 v2 over MLLP, balanced message by message, never acknowledging what no server took.

A sender's connection is a *session*; each message is a *stream* (ARCHITECTURE.md vocabulary). The
life of a message:

1. **Framed** by :class:`~medlb.proto.mllp.MllpFramer` (bounded by ``hl7.max_message``) and its MSH
   read by :func:`~medlb.proto.hl7.parse_header`. A framing error gets the NAK the codec names
   (when the message can be identified), then the connection closes: the sender's queue resends.
2. **Deduplicated**: a message whose (MSH-3, MSH-4, MSH-10) a server acknowledged within
   ``hl7.dedup_window`` is answered with that same ACK and not delivered again; one that is still in
   flight gets the ACK of the first copy when it comes.
3. **Ordered**: messages with the same ``hl7.order_key`` (PID-3 by default) go one at a time, in
   arrival order, across every sender connection of the frontend; other keys go in parallel.
4. **Routed** by MSH rules, then **balanced** among the backend's servers (``balance: source``
   hashes the ordering key, so a patient sticks to one server), over persistent MLLP connections
   (``hl7.connections_per_server``, one outstanding message each: MLLP is stop-and-wait).
5. **Acknowledged**: the server's answer is taken only if MSA-2 equals the message's MSH-10.
   - AA/CA: the server's ACK goes to the sender, byte for byte.
   - AR/CR (and AE/CE with ``retry_on_ae``): the message is tried on another server.
   - AE/CE otherwise: the server's answer goes to the sender; it is not a success, and another
     server would say the same.
   - No answer within ``hl7.ack_timeout``, a closed connection, or an answer for another control ID:
     that server connection is closed (a late ACK can never be matched to a later message) and the
     message is tried on another server.
6. **Given up** after ``hl7.delivery_timeout``: the sender gets a NAK (AR, or CR in enhanced mode)
   that names the cause, or its connection is closed (``on_failure: close``). Never an AA/CA that no
   server gave.

Replies go back to a sender in the order its messages arrived (a simple MLLP client matches the next
ACK to its outstanding message), whatever order the servers answered in.

Enhanced mode (MSH-15/16 set): the accept ACK (CA/CE/CR) is what medlb relays and retries on. The
application ACK a receiver may send later is a message of its own, typically on a new connection
to the sender's listener; medlb does not carry it on the pooled connection.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, cast

from medlb.errors import Hl7ProtocolError
from medlb.io.tls import AcceptedSession, ClientTls, ServerTls
from medlb.layers.hl7 import DedupTable, Hl7Router, KeyOrder
from medlb.model.server import Server
from medlb.proto.hl7 import (
    FieldPath,
    Hl7Header,
    dedup_key,
    make_ack,
    nak_code,
    nak_for_error,
    parse_ack,
    parse_header,
)
from medlb.proto.mllp import MllpFramer, frame

if TYPE_CHECKING:
    from medlb.io.frontend import Frontend
    from medlb.model.backend import Backend

log = logging.getLogger("medlb.hl7")

#: How soon a message that found no usable server looks again (until its delivery timeout).
RETRY_PAUSE = 0.25
_control_ids = itertools.count(1)


def _timestamp() -> str:
    return datetime.now(UTC).strftime("%Y%m%d%H%M%S+0000")


def _control_id() -> str:
    return f"MEDLB{next(_control_ids)}"


@dataclass(frozen=True, slots=True)
class Hl7Settings:
    """The resolved ``hl7:`` section of a frontend."""

    max_message: int = 16 * 1024 * 1024
    ack_timeout: float = 10.0
    delivery_timeout: float = 60.0
    order_key: FieldPath | Literal["connection", "none"] = field(default_factory=lambda: FieldPath("PID-3"))
    retry_on_ae: bool = False
    on_failure: Literal["nak", "close"] = "nak"
    connections_per_server: int = 4
    router: Hl7Router = field(default_factory=Hl7Router)
    tls: ServerTls | None = None


class Hl7State:
    """What the sessions of one frontend share: ordering queues, the dedup table, server connections."""

    def __init__(self, dedup_window: float, dedup_size: int) -> None:
        self.order: KeyOrder[Message] = KeyOrder()
        self.dedup = DedupTable(dedup_window, dedup_size)
        #: Messages in flight by dedup key: a resend waits for the first copy's answer.
        self.in_flight: dict[tuple[bytes, bytes, bytes], Message] = {}
        self.pools: dict[Server, ServerPool] = {}

    def pool(self, server: Server) -> ServerPool:
        pool = self.pools.get(server)
        if pool is None:
            pool = self.pools[server] = ServerPool(server)
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


# --------------------------------------------------------------------------- one message


class Message:
    """One HL7 message from a sender, until its reply is decided."""

    __slots__ = (
        "attempts",
        "backend",
        "conn",
        "copies",
        "deadline",
        "dedup",
        "excluded",
        "header",
        "key",
        "payload",
        "reply",
        "reply_code",
        "server",
        "server_name",
        "session",
        "started",
        "term",
        "timer",
    )

    def __init__(self, session: Hl7Session, payload: bytes, header: Hl7Header, key: Hashable | None) -> None:
        self.session = session
        self.payload = payload
        self.header = header
        self.key = key
        self.dedup = dedup_key(header)
        self.backend: Backend = session.backend
        self.server: Server | None = None
        #: The server that gave the answer (for the log line).
        self.server_name = "-"
        self.conn: ServerConn | None = None
        self.attempts = 0
        self.excluded: list[Server] = []
        self.started = session.loop.time()
        self.deadline = self.started + session.settings.delivery_timeout
        self.timer: asyncio.TimerHandle | None = None
        #: The framed answer for the sender once decided (None: not yet; b"": close the connection).
        self.reply: bytes | None = None
        self.reply_code = "-"
        self.term = ""
        #: Resends of this message (same dedup key) that arrived while it was in flight.
        self.copies: list[Message] = []

    @property
    def balance_key(self) -> bytes | None:
        if isinstance(self.key, bytes):
            return self.key
        return None


# --------------------------------------------------------------------------- server side


class ServerConn(asyncio.Protocol):
    """A persistent MLLP connection to one server, carrying one message at a time."""

    def __init__(self, pool: ServerPool, max_message: int) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.framer = MllpFramer(max_message)
        self.message: Message | None = None
        self.closed = False
        #: Counted in its pool's ``count`` until it is lost (exactly once).
        self.counted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        message = self.message
        try:
            replies = self.framer.feed(data)
        except Hl7ProtocolError as exc:
            self.close()
            if message is not None:
                message.session.server_failed(message, self, f"bad_frame:{exc}")
            return
        for payload in replies:
            message = self.message
            if message is None:
                # An answer nobody is waiting for (a late ACK after a timeout never gets here: that
                # connection was closed). The connection cannot be trusted any more.
                log.info("server %s sent an unsolicited message; connection closed", self.pool.server.key)
                self.close()
                return
            message.session.server_answered(message, self, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.lost(self)
        message, self.message = self.message, None
        if message is not None:
            message.session.server_failed(message, self, "server_reset" if exc else "server_close")

    def send(self, message: Message) -> None:
        self.message = message
        if self.transport is not None:
            self.transport.write(frame(message.payload))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.lost(self)
            if self.transport is not None:
                self.transport.close()


class ServerPool:
    """Idle persistent connections to one server, and how many exist."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.idle: deque[ServerConn] = deque()
        self.count = 0
        self.waiting: deque[Message] = deque()

    def lost(self, conn: ServerConn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if conn.counted:
            conn.counted = False
            self.count -= 1
            # The slot is free: a message queued for this server opens a new connection now,
            # instead of waiting for its own ACK timeout (a dead connection hands nothing over).
            self.serve_waiting()

    def serve_waiting(self) -> None:
        """Let queued messages open connections while the server's connection budget allows."""
        while self.waiting:
            waiter = self.waiting[0]
            session = waiter.session
            if self.count >= session.settings.connections_per_server:
                return
            self.waiting.popleft()
            if waiter.reply is None and waiter.server is self.server and waiter.conn is None:
                self.count += 1
                session.loop.create_task(session._connect(waiter, self))

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


# --------------------------------------------------------------------------- the sender's connection


class Hl7Session(AcceptedSession):
    """A sender's MLLP connection. Also the frontend's session object (``start``, ``abort``, ``server``...)."""

    log_label = "hl7"
    session_log = log
    frontend: Frontend
    settings: Hl7Settings

    relay = None
    #: Messages of one sender waiting for their replies; beyond it the sender is paused.
    MAX_PENDING = 256

    def __init__(self, frontend: Frontend, sock: socket.socket, addr: tuple[str, int]) -> None:
        self.frontend = frontend
        settings = frontend.hl7
        state = frontend.hl7_state
        assert settings is not None and state is not None
        self.settings = settings
        self.state = state
        self.backend: Backend = frontend.backend
        self.loop = frontend.loop
        self.sock: socket.socket | None = sock
        self.client_ip, self.client_port = addr[0], addr[1]
        self.transport: asyncio.Transport | None = None
        self.framer = MllpFramer(settings.max_message)
        #: Messages in arrival order; replies are written from the front as they are decided.
        self.pending: deque[Message] = deque()
        self.closed = False
        self.paused = False
        self._gone = False
        self.messages = 0
        #: Idle timeout (the frontend's ``timeouts.client``/``server``, as the other modes): the hot
        #: path only sets ``active``; a timer samples it (see :meth:`_idle_tick`).
        self.active = False
        self._quiet_since = 0.0
        self._idle_timer: asyncio.TimerHandle | None = None
        #: Why the connection ended, for the log line of messages dropped with it.
        self.end_cause = ""
        #: The sender half-closed, or medlb is stopping: close once the last pending reply is out.
        self.finishing = False

    @property
    def server(self) -> Server | None:
        """The server of the oldest message in flight (what ``shutdown-sessions`` looks for)."""
        for message in self.pending:
            if message.server is not None:
                return message.server
        return None

    # -- connection -----------------------------------------------------------------------

    def tls_failed(self) -> None:
        self._ended()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._quiet_since = self.loop.time()
        self._arm_idle()

    def _arm_idle(self) -> None:
        idle = self.frontend.idle_timeout
        if idle > 0 and not self.closed:
            self._idle_timer = self.loop.call_later(max(idle / 4, 0.05), self._idle_tick)

    def _idle_tick(self) -> None:
        """Close a sender that moved no byte for the idle timeout while no reply was due.

        Without it a sender that stops inside a message (no end block, then silence) would hold its
        connection and the partial message forever. A session waiting for a reply is not idle: its
        messages are bounded by ``delivery_timeout``. Checked in quarters of the timeout, as
        ``mode: dicom`` does, so the close comes between one timeout and 1.25 of it.
        """
        self._idle_timer = None
        if self.closed:
            return
        now = self.loop.time()
        if self.active or self.pending:
            self.active = False
            self._quiet_since = now
        elif now - self._quiet_since >= self.frontend.idle_timeout:
            log.info(
                "hl7 client=%s:%d frontend=%s idle timeout%s; connection closed",
                self.client_ip,
                self.client_port,
                self.frontend.name,
                "" if self.framer.at_boundary else " inside a message (dropped, never forwarded)",
            )
            self.end_cause = "idle_timeout"
            self.close()
            return
        self._arm_idle()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.active = True
        try:
            payloads = self.framer.feed(data)
        except Hl7ProtocolError as exc:
            self._framing_error(exc)
            return
        for payload in payloads:
            self._on_message(payload)
        if len(self.pending) >= self.MAX_PENDING and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # The sender is done sending; its replies still go out, then the connection closes.
        if not self.pending:
            self.close()
            return None
        self.finishing = True
        return True if self.settings.tls is None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        for message in list(self.pending):
            if message.reply is None and message.conn is None:
                self._abandon(message)
        # Messages still on the wire stay pending: they are settled (and logged) when their server
        # answers; only the write to this sender is skipped.
        self._flush()
        self._ended()

    def _ended(self) -> None:
        if not self._gone:
            self._gone = True
            self.frontend.session_ended(self)

    # -- a message arrives ------------------------------------------------------------------

    def _on_message(self, payload: bytes) -> None:
        self.messages += 1
        try:
            header = parse_header(payload)
        except Hl7ProtocolError as exc:
            self._framing_error(exc)
            return
        settings = self.settings
        order_key = settings.order_key
        key: Hashable | None
        if order_key == "connection":
            key = ("connection", id(self))
        elif order_key == "none":
            key = None
        else:
            value = order_key.get(payload)
            key = value if value else None  # no patient (a query, say): no ordering constraint
        message = Message(self, payload, header, key)
        self.pending.append(message)
        state = self.state
        now = self.loop.time()
        ack = state.dedup.get(message.dedup, now)
        if ack is not None:
            message.term = "duplicate"  # answered again, not delivered again
            self._decide(message, ack, parse_ack(ack[1:-2]).code)
            return
        first = state.in_flight.get(message.dedup)
        if first is not None:
            first.copies.append(message)  # answered with the first copy's reply
            message.term = "duplicate_in_flight"
            return
        state.in_flight[message.dedup] = message
        routed = settings.router.route(header)
        if routed is not None:
            backend = self.frontend.backends.get(routed)
            if backend is None:
                self._give_up(message, f"backend {routed} is not configured")
                return
            message.backend = backend
        if state.order.admit(message.key, message):
            self._dispatch(message)

    # -- delivery -----------------------------------------------------------------------------

    def _dispatch(self, message: Message) -> None:
        """Send ``message`` to a server (or wait for one, until its deadline)."""
        session = message.session
        if session.closed and message.reply is None:
            # Its sender left before the message went (back) out: drop it, let the next of its key go.
            session._abandon(message)
            session._flush()
            return
        if session is not self:
            session._dispatch(message)
            return
        backend = message.backend
        now = self.loop.time()
        if now >= message.deadline:
            self._give_up(message, "delivery_timeout")
            return
        server = backend.select(message.balance_key, message.excluded)
        if server is not None and server in message.excluded:
            # Backend.select would rather hand back a server that already failed this message than
            # refuse (right for a TCP session that connects once). Here that is the end of a round:
            # take the pause below, or one message hammers a server that refuses a connect or
            # answers AR in microseconds, thousands of times a second, until its deadline.
            backend.release(server)
            server.total_sessions -= 1
            server = None
        if server is None:
            # Nothing usable, or every server failed this message once: pause, then start a new
            # round (a restarted server is back within seconds), until the delivery deadline.
            if not message.excluded:
                backend.no_server += 1
            message.excluded.clear()
            message.term = message.term or "no_server"
            wait = min(RETRY_PAUSE, message.deadline - now)
            message.timer = self.loop.call_later(wait, self._redispatch, message)
            return
        message.server = server
        message.attempts += 1
        pool = self.state.pool(server)
        conn = None
        while pool.idle and conn is None:
            candidate = pool.idle.pop()
            if not candidate.closed:
                conn = candidate
        if conn is not None:
            self._send(message, conn)
        elif pool.count < self.settings.connections_per_server:
            pool.count += 1
            self.loop.create_task(self._connect(message, pool))
        else:
            pool.waiting.append(message)
            self._arm(message)

    def _redispatch(self, message: Message) -> None:
        message.timer = None
        if message.reply is None:
            self._dispatch(message)

    async def _connect(self, message: Message, pool: ServerPool) -> None:
        server = pool.server
        tls: ClientTls | None = self.frontend.backend_tls.get(message.backend.name)
        conn = ServerConn(pool, self.settings.max_message)
        try:
            if server.sockaddr is None:
                raise OSError("unresolved")
            family, addr = server.sockaddr
            remaining = max(message.deadline - self.loop.time(), 0.001)
            async with asyncio.timeout(min(self.frontend.timeouts.connect, remaining)):
                if tls is None:
                    await self.loop.create_connection(lambda: conn, addr[0], addr[1], family=family)
                else:
                    await self.loop.create_connection(
                        lambda: conn,
                        addr[0],
                        addr[1],
                        family=family,
                        ssl=tls.context,
                        server_hostname=tls.sni or server.address.host,
                    )
        except (OSError, TimeoutError) as exc:
            pool.lost(conn)
            server.connect_errors += 1
            message.backend.connect_errors += 1
            self.frontend.observer.report_connect_error(server)
            reason = "connect_timeout" if isinstance(exc, TimeoutError) else str(exc.strerror or exc)
            log.info("connect to %s failed: %s", server.key, reason)
            self._retry(message, f"connect_failed:{reason}")
            pool.serve_waiting()
            return
        self.frontend.observer.report_connect_ok(server)
        if message.reply is not None or message.server is not server:
            self._idle(pool, conn)
            return
        self._send(message, conn)

    def _send(self, message: Message, conn: ServerConn) -> None:
        message.conn = conn
        conn.send(message)
        self._arm(message)

    def _arm(self, message: Message) -> None:
        if message.timer is not None:
            message.timer.cancel()
        wait = min(self.settings.ack_timeout, max(message.deadline - self.loop.time(), 0.0))
        message.timer = self.loop.call_later(wait, self._ack_timeout, message)

    def _ack_timeout(self, message: Message) -> None:
        message.timer = None
        if message.reply is not None:
            return
        conn, server = message.conn, message.server
        if conn is None:
            # Still waiting for a connection slot on that server: look elsewhere.
            if server is not None:
                pool = self.state.pool(server)
                try:
                    pool.waiting.remove(message)
                except ValueError:
                    pass
            self._retry(message, "no_connection_slot")
            return
        log.info(
            "server %s did not acknowledge %s in %.1fs; its connection is closed",
            server.key if server else "-",
            message.header.control_id,
            self.settings.ack_timeout,
        )
        message.conn = None
        conn.message = None
        conn.close()  # its late ACK must never meet another message
        if server is not None:
            self.frontend.observer.report_connect_error(server)
        self._retry(message, "ack_timeout")

    def _retry(self, message: Message, cause: str) -> None:
        server, message.server = message.server, None
        if server is not None:
            server.retries += 1
            message.excluded.append(server)
            message.backend.release(server)
        message.term = cause
        if message.reply is None:
            self._dispatch(message)

    # -- answers ------------------------------------------------------------------------------

    def server_answered(self, message: Message, conn: ServerConn, payload: bytes) -> None:
        if message.conn is not conn or message.reply is not None:
            return
        server = message.server
        try:
            ack = parse_ack(payload)
        except Hl7ProtocolError as exc:
            log.info(
                "server %s answered %s without a usable MSA: %s", conn.pool.server.key, message.header.control_id, exc
            )
            self._drop_conn(message, conn)
            self._retry(message, "bad_ack")
            return
        if not ack.acknowledges(message.header):
            # The late-ACK trap: an answer for another control ID is never taken for this one.
            log.warning(
                "server %s answered control ID %s with an ACK for %s; connection closed, message retried",
                conn.pool.server.key,
                message.header.control_id,
                ack.control_id,
            )
            self._drop_conn(message, conn)
            self._retry(message, "ack_mismatch")
            return
        if message.timer is not None:
            message.timer.cancel()
            message.timer = None
        message.conn = None
        conn.message = None
        self._idle(conn.pool, conn)
        if server is not None:
            codes = server.hl7_acks
            codes[ack.code] = codes.get(ack.code, 0) + 1
        if ack.success:
            message.term = "acked"
            self._finish_server(message)
            self._decide(message, frame(payload), ack.code)
            return
        if ack.code in ("AR", "CR") or (self.settings.retry_on_ae and ack.code in ("AE", "CE")):
            log.info(
                "server %s answered %s with %s; trying another server",
                conn.pool.server.key,
                message.header.control_id,
                ack.code,
            )
            self._retry(message, f"server_{ack.code}")
            return
        message.term = f"server_{ack.code}"
        self._finish_server(message)
        self._decide(message, frame(payload), ack.code)  # the server's own error, never turned into a success

    def server_failed(self, message: Message, conn: ServerConn, cause: str) -> None:
        if message.conn is not conn or message.reply is not None:
            return
        message.conn = None
        if message.timer is not None:
            message.timer.cancel()
            message.timer = None
        if message.server is not None:
            self.frontend.observer.report_connect_error(message.server)
        self._retry(message, cause)

    def _drop_conn(self, message: Message, conn: ServerConn) -> None:
        message.conn = None
        conn.message = None
        if message.timer is not None:
            message.timer.cancel()
            message.timer = None
        conn.close()

    def _idle(self, pool: ServerPool, conn: ServerConn) -> None:
        if conn.closed:
            pool.serve_waiting()
            return
        while pool.waiting:
            waiter = pool.waiting.popleft()
            if waiter.reply is None and waiter.server is pool.server and waiter.conn is None:
                waiter.session._send(waiter, conn)
                return
        pool.idle.append(conn)

    def _finish_server(self, message: Message) -> None:
        server, message.server = message.server, None
        if server is not None:
            kind = message.header.message_type or "-"
            server.hl7_messages[kind] = server.hl7_messages.get(kind, 0) + 1
            message.backend.release(server)
            message.server_name = server.name

    # -- replies ------------------------------------------------------------------------------

    def _give_up(self, message: Message, why: str) -> None:
        """No server took the message in time: the sender hears a NAK (or loses the connection)."""
        if message.timer is not None:
            message.timer.cancel()
            message.timer = None
        if message.server is not None:
            message.backend.release(message.server)
            message.server = None
        message.term = f"gave_up:{why}"
        if self.settings.on_failure == "close":
            self._decide(message, b"", "closed")
            return
        code = nak_code(message.header, "AR")
        try:
            nak = make_ack(message.header, code, f"medlb: {why}", timestamp=_timestamp(), control_id=_control_id())
        except ValueError:
            self._decide(message, b"", "closed")
            return
        self._decide(message, frame(nak), code)

    def _decide(self, message: Message, reply: bytes, code: str) -> None:
        """Settle ``message`` (and its in-flight copies) and write what can be written, in order."""
        message.reply = reply
        message.reply_code = code
        state = self.state
        if message.term != "duplicate":
            if code in ("AA", "CA"):
                state.dedup.remember(message.dedup, reply, self.loop.time())
            self._release_in_flight(message)
            nxt = state.order.done(message.key, message)
            if nxt is not None:
                nxt.session._dispatch(nxt)
        for copy in message.copies:
            copy.reply = reply
            copy.reply_code = code
            copy.session._flush()
        message.copies.clear()
        message.session._flush()

    def _abandon(self, message: Message) -> None:
        """Drop ``message``, not on the wire, whose sender left: it is not sent for nobody (the
        sender resends it), the next message of its key may go, and it still gets its log line.

        It may hold a server slot (waiting for a pooled connection, or for its connect) and a timer;
        both are given back, or the message would later go out from the pool's waiting list, after
        its key's next message. Resends from other connections that wait for its answer get a NAK
        (there will be no answer to share) instead of waiting forever.
        """
        state = self.state
        if message.timer is not None:
            message.timer.cancel()
            message.timer = None
        server, message.server = message.server, None
        if server is not None:
            pool = state.pools.get(server)
            if pool is not None and message in pool.waiting:
                pool.waiting.remove(message)
            message.backend.release(server)
        message.reply = b""
        message.reply_code = "-"
        message.term = self.end_cause or "client_gone"
        first = state.in_flight.get(message.dedup)
        if first is not None and first is not message:
            if message in first.copies:  # a resend waiting for another's answer: nothing else to undo
                first.copies.remove(message)
            return
        copies, message.copies = message.copies, []
        nxt = state.order.forget(message.key, message)
        self._release_in_flight(message)
        for copy in copies:
            copy.session._give_up(copy, "first_copy_abandoned")
        if nxt is not None:
            nxt.session._dispatch(nxt)

    def _release_in_flight(self, message: Message) -> None:
        state = self.state
        if state.in_flight.get(message.dedup) is message:
            del state.in_flight[message.dedup]

    def _flush(self) -> None:
        pending = self.pending
        while pending and pending[0].reply is not None:
            message = pending.popleft()
            self._log(message)
            if self.closed or self.transport is None:
                continue
            if not message.reply:
                self.end_cause = "closed_on_failure"
                self.close()
                return
            self.active = True
            self.transport.write(message.reply)
        if self.finishing and not pending:
            self.close()
        elif (
            self.paused
            and not self.finishing  # a graceful stop paused reading for good
            and len(pending) < self.MAX_PENDING // 2
            and self.transport is not None
            and not self.closed
        ):
            self.paused = False
            self.transport.resume_reading()

    # -- errors and ends ------------------------------------------------------------------------

    def _framing_error(self, exc: Hl7ProtocolError) -> None:
        """The codec's policy (medlb.proto.mllp): a NAK when the message can be identified, then close."""
        self.end_cause = "framing_error"
        log.info("hl7 client=%s:%d frontend=%s %s", self.client_ip, self.client_port, self.frontend.name, exc)
        nak = nak_for_error(exc, timestamp=_timestamp(), control_id=_control_id())
        if nak is not None and self.transport is not None and not self.closed:
            # Replies already decided go first; undecided ones are lost with the connection (the
            # sender resends them: nothing was acknowledged).
            self._flush()
            self.transport.write(frame(nak))
        self.close()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()

    def drain(self) -> None:
        """Graceful stop: stop reading; close once every pending message has its reply."""
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()
            self.finishing = True
            if not self.pending:
                self.close()

    def abort(self, cause: str = "aborted") -> None:
        """Close now (hard stop, ``shutdown-sessions``): unanswered messages get no reply, never a success."""
        if self.transport is None:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
                self._ended()
            return
        self.end_cause = self.end_cause or cause
        for message in list(self.pending):
            if message.reply is None:
                message.term = cause
        if not self.closed:
            self.closed = True
            self.transport.abort()

    def _log(self, message: Message) -> None:
        if not self.frontend.log_sessions or not log.isEnabledFor(logging.INFO):
            return
        header = message.header
        key = message.key
        key_text = key.decode("latin-1")[:64] if isinstance(key, bytes) else ("connection" if key else "-")
        log.info(
            "hl7 client=%s:%d frontend=%s backend=%s server=%s control_id=%s type=%s key=%s ack=%s attempts=%d "
            "latency_ms=%.1f term=%s",
            self.client_ip,
            self.client_port,
            self.frontend.name,
            message.backend.name,
            message.server_name,
            header.control_id[:64],
            header.message_type[:32] or "-",
            key_text,
            message.reply_code,
            message.attempts,
            (self.loop.time() - message.started) * 1000.0,
            message.term or "-",
        )


__all__ = ["Hl7Session", "Hl7Settings", "Hl7State", "Message", "ServerConn", "ServerPool"]
