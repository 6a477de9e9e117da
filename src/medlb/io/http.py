"""``mode: http``: a full HTTP/1.1 reverse proxy, balancing per request.

One client connection is a *session*; each request in it is a *stream*
(ARCHITECTURE.md vocabulary) balanced on its own. The pieces:

- :class:`HttpSession` is the client side (an asyncio protocol on a uvloop
  transport). It feeds bytes to the strict codec (:mod:`medlb.proto.http`),
  handles one stream at a time (pipelined requests wait, parsed, in a bounded
  queue) and enforces the header and keep-alive timeouts.
- :class:`Stream` is one request/response exchange: choose a server, borrow a
  pooled connection or open one, forward the request head and body, relay the
  response back, then return the connection to the pool.
- :class:`ServerConn` is one connection to a server, reused across streams
  (keep-alive) through the per-server :class:`Pool`.

What reaches a server is always re-serialized from what medlb parsed (head
and body framing), never the client's raw bytes: a request can only mean to the
server what it meant to medlb, which is what defeats request smuggling.

Failure rules (the issue's contract):

- a connect failure, or a server connection that dies before any byte of the
  request was written, is retried on another server;
- an idempotent request (GET, HEAD, PUT, DELETE, OPTIONS) is retried when the
  server resets before the first response byte, if its body (if any) is still
  held in memory (at most :data:`REPLAY_LIMIT` bytes); a POST is never replayed
  once sent;
- no server: 503 with ``Retry-After``; a bad response: 502; no response in
  ``timeouts.server``: 504. A response cut in the middle is passed on as a cut
  (the client connection is aborted), never completed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from ipaddress import IPv4Network, IPv6Network, ip_address
from typing import TYPE_CHECKING, cast

from medlb.config import CookieSettings
from medlb.io.tls import AcceptedSession, ServerTls, subject_text
from medlb.layers.http_rules import DEFAULT, NO_RULES, Decision, Router
from medlb.model.persistence import Persistence, honours
from medlb.model.server import Server
from medlb.proto.http import (
    DEFAULT_LIMITS,
    Body,
    EndOfMessage,
    HttpError,
    Limits,
    RequestHead,
    RequestParser,
    ResponseHead,
    ResponseParser,
    encode_chunk,
    encode_trailers,
    serialize_request_head,
    serialize_response_head,
)

if TYPE_CHECKING:
    from medlb.io.frontend import Frontend
    from medlb.model.backend import Backend

log = logging.getLogger("medlb.http")

IDEMPOTENT = frozenset({b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"})
#: Request bodies up to this size are kept until the response starts, so an
#: idempotent request can be replayed on another server after a reset.
REPLAY_LIMIT = 64 * 1024
#: Responses up to this size to replayable requests are held until complete (see Stream).
HOLD_LIMIT = 64 * 1024
#: Parsed-but-waiting pipelined events before the client is paused.
PIPELINE_EVENTS = 64
#: Idle keep-alive connections kept per server.
POOL_SIZE = 64
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
#: The usual spellings of hop-by-hop names and the lengths of all of them: a field whose length
#: is not one of these cannot be hop-by-hop, so most fields are never lower-cased (hot path).
_HOP_SPELLINGS = HOP_BY_HOP | {b"-".join(part.capitalize() for part in n.split(b"-")) for n in HOP_BY_HOP}
_HOP_LENGTHS = frozenset(len(n) for n in HOP_BY_HOP)
_TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FORWARDED_NAMES = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"})
#: Lengths of the request field names medlb may drop or change (hop-by-hop, forwarding, Cookie).
_WATCH_LENGTHS = _HOP_LENGTHS | {len(n) for n in _FORWARDED_NAMES} | {len(b"cookie")}
_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """The resolved ``http:`` settings of a frontend."""

    limits: Limits = DEFAULT_LIMITS
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keepalive_timeout: float = 60.0
    retry_after: int = 5
    xff: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    forwarded: bool = False
    trusted: tuple[IPv4Network | IPv6Network, ...] = ()
    tls: ServerTls | None = None
    router: Router = NO_RULES

    @property
    def scheme(self) -> bytes:
        return b"https" if self.tls is not None else b"http"


def end_to_end(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` without the hop-by-hop fields (and the framing ones, which medlb re-creates)."""
    return [
        (n, v)
        for n, v in headers
        if len(n) not in _HOP_LENGTHS or (n not in _HOP_SPELLINGS and n.lower() not in HOP_BY_HOP)
    ]


def _cookies(value: bytes) -> list[tuple[bytes, bytes]]:
    out = []
    for part in value.split(b";"):
        name, sep, val = part.strip().partition(b"=")
        if sep:
            out.append((name, val))
    return out


def _without_cookie(value: bytes, name: bytes) -> bytes:
    return b"; ".join(part.strip() for part in value.split(b";") if part.strip().partition(b"=")[0] != name)


class HttpPersistence:
    """The I/O side of a backend's persistence: the pure rule plus how its cookie looks."""

    def __init__(self, model: Persistence, cookie: CookieSettings) -> None:
        self.model = model
        self.cookie_name = cookie.name.encode()
        self.settings = cookie

    def set_cookie(self, value: str, tls: bool) -> bytes:
        s = self.settings
        parts = [f"{s.name}={value}", "Path=/"]
        if s.max_age > 0:
            parts.append(f"Max-Age={int(s.max_age)}")
        if s.httponly:
            parts.append("HttpOnly")
        secure = tls if s.secure is None else s.secure
        if secure or s.samesite == "None":
            parts.append("Secure")
        parts.append(f"SameSite={s.samesite}")
        return "; ".join(parts).encode()


def error_response(status: int, detail: str, *, retry_after: int | None = None, close: bool = True) -> bytes:
    """A small, complete response medlb itself sends (never cached, always short)."""
    body = f"{status} {_REASONS.get(status, b'Error').decode()}: {detail}\n".encode()
    lines = [
        b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b"Error")),
        b"Content-Type: text/plain; charset=utf-8",
        b"Content-Length: %d" % len(body),
        b"Cache-Control: no-store",
    ]
    if retry_after is not None:
        lines.append(b"Retry-After: %d" % retry_after)
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


# --------------------------------------------------------------------------- server side


class Pool:
    """Idle keep-alive connections to one server, most recently used first."""

    __slots__ = ("idle",)

    def __init__(self) -> None:
        self.idle: deque[ServerConn] = deque()

    def get(self) -> ServerConn | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.usable:
                return conn
        return None

    def put(self, conn: ServerConn) -> None:
        if len(self.idle) >= POOL_SIZE:
            self.idle.popleft().close()
        self.idle.append(conn)

    def discard(self, conn: ServerConn) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


class ServerConn(asyncio.Protocol):
    """One connection to a server; carries one stream at a time."""

    def __init__(self, server: Server, pool: Pool) -> None:
        self.server = server
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.stream: Stream | None = None
        self.closed = False
        self.reused = 0
        #: Corked output: writes made while one batch of client bytes is processed go
        #: out in one send (head and body of a small request in one segment).
        self.out: list[bytes] | None = None
        #: After a 101: raw bytes both ways, no parsing.
        self.tunnel = False

    def write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.append(data)
        elif self.transport is not None:
            self.transport.write(data)

    def flush(self) -> None:
        out, self.out = self.out, None
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    @property
    def usable(self) -> bool:
        return not self.closed and self.transport is not None and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            # Bytes from an idle server (a late 408, garbage): the connection cannot be trusted.
            self.close()
            return
        if self.tunnel:
            stream.tunnel_from_server(data)
            return
        try:
            events = self.parser.feed(data)
        except HttpError as exc:
            stream.server_failed(f"bad_response:{exc.reason}", bad_response=True)
            return
        session = stream.session
        corked = session.cork()
        first = events[0] if events else None
        stream.whole = (
            type(first) is ResponseHead and first.status >= 200 and type(events[-1]) is EndOfMessage and len(events) > 1
        )
        try:
            for i, event in enumerate(events):
                stream.on_response_event(event)
                if self.stream is not stream or self.tunnel:
                    if i + 1 < len(events) and not self.tunnel:
                        # A second response nobody asked for: this connection cannot be trusted.
                        self.close()
                    break  # the stream ended, or became a tunnel (the 101's end event is moot)
        finally:
            if corked:
                session.uncork()

    def eof_received(self) -> bool | None:
        stream = self.stream
        if stream is not None and self.tunnel:
            stream.tunnel_closed("server_close")
            return None
        if stream is not None:
            try:
                events = self.parser.feed_eof()
            except HttpError:
                stream.server_failed("server_close_mid_response")
                return None
            for event in events:
                stream.on_response_event(event)
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.discard(self)
        stream = self.stream
        if stream is not None:
            self.stream = None
            if self.tunnel:
                stream.tunnel_closed("server_reset" if exc else "server_close")
                return
            stream.server_failed("server_reset" if exc else "server_close")

    def pause_writing(self) -> None:
        if self.stream is not None:
            self.stream.session.pause_reading()

    def resume_writing(self) -> None:
        if self.stream is not None:
            self.stream.session.resume_reading()

    def release(self, reusable: bool) -> None:
        """The stream is done with this connection: pool it or close it."""
        self.stream = None
        if reusable and self.usable:
            self.reused += 1
            self.pool.put(self)
        else:
            self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.out = None
        if self.transport is not None:
            self.transport.abort()


# --------------------------------------------------------------------------- one stream


class Stream:
    """One request and its response."""

    __slots__ = (
        "attempts",
        "backend",
        "body_kept",
        "bytes_in",
        "bytes_out",
        "conn",
        "connect_task",
        "cookie_seen",
        "decision",
        "excluded",
        "head",
        "held",
        "key",
        "replayable",
        "request_done",
        "request_sent",
        "response_chunked",
        "response_head",
        "server",
        "session",
        "set_cookie",
        "t_connect",
        "t_response",
        "t_start",
        "waiting_body",
        "whole",
    )

    def __init__(self, session: HttpSession, head: RequestHead, backend: Backend, decision: Decision) -> None:
        self.session = session
        self.head = head
        self.decision = decision
        self.backend: Backend = backend
        self.server: Server | None = None
        self.conn: ServerConn | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.excluded: list[Server] = []
        self.attempts = 0
        self.key: bytes | None = session.client_ip.encode() if self.backend.balancer.needs_key else None
        self.request_sent = False  # any request byte written to the current server
        self.request_done = False  # the whole request (head and body) parsed from the client
        self.response_head: ResponseHead | None = None
        self.response_chunked = False
        self.body_kept: list[bytes] | None = [] if head.method in IDEMPOTENT else None
        self.replayable = head.method in IDEMPOTENT
        self.waiting_body: list[Body | EndOfMessage] = []
        #: Persistence: the cookie value the client sent, and the Set-Cookie to add, if any.
        self.cookie_seen: str | None = None
        self.set_cookie: bytes | None = None
        #: A complete small response being collected before the client sees any of it.
        self.held: list[ResponseHead | Body | EndOfMessage] | None = None
        #: The final response arrived whole in one read: nothing to hold back, no timer to move.
        self.whole = False
        self.bytes_in = 0
        self.bytes_out = 0
        loop = session.loop
        self.t_start = loop.time()
        self.t_connect = -1.0
        self.t_response = -1.0

    # -- choosing a server ------------------------------------------------------------

    def start(self) -> None:
        rule = self.session.frontend.persistence.get(self.backend.name)
        if rule is not None:
            pinned = self._pinned(rule)
            if pinned is not None and honours(pinned):
                self.backend.take(pinned)
                self._use(pinned)
                return
        server = self.backend.select(self.key, self.excluded)
        if server is None:
            self.session.no_server(self)
            return
        self._use(server)

    def _pinned(self, rule: HttpPersistence) -> Server | None:
        """The server this request is persisted to, if any (whatever its state)."""
        servers = self.backend.servers
        if rule.model.kind == "cookie":
            value = self.session.cookie_value(self.head, rule.cookie_name)
            self.cookie_seen = value
            return rule.model.server_for_cookie(value, servers) if value else None
        key = self.persist_key(rule)
        return rule.model.server_for_key(key, servers, self.session.loop.time()) if key else None

    def persist_key(self, rule: HttpPersistence) -> bytes | None:
        if rule.model.kind == "source":
            return self.session.client_ip.encode()
        return self.head.header(rule.model.header_name)

    def _stick(self, server: Server) -> None:
        """Remember (or re-pin) the server this request really went to."""
        rule = self.session.frontend.persistence.get(self.backend.name)
        if rule is None:
            return
        if rule.model.kind == "cookie":
            value = rule.model.cookie_for(server)
            if value != self.cookie_seen:
                self.set_cookie = rule.set_cookie(value, self.session.settings.tls is not None)
            return
        key = self.persist_key(rule)
        if key and rule.model.remember(key, server, self.session.loop.time()):
            share = self.session.frontend.stick_peer
            if share is not None:
                share(self.backend.name, key, server.name)

    def _use(self, server: Server) -> None:
        self.server = server
        self.attempts += 1
        # A pooled connection may be closed by the server at the very moment it is reused;
        # only a request that may be replayed takes that risk (HAProxy's "http-reuse safe").
        conn = self.session.frontend_pools.pool(server).get() if self.replayable else None
        if conn is not None:
            self._attach(conn)
            return
        if server.sockaddr is None:
            self.connect_failed("unresolved")
            return
        self.connect_task = self.session.loop.create_task(self._connect(server))

    async def _connect(self, server: Server) -> None:
        assert server.sockaddr is not None
        loop = self.session.loop
        pool = self.session.frontend_pools.pool(server)
        family, addr = server.sockaddr
        tls = self.session.frontend.backend_tls.get(self.backend.name)
        try:
            async with asyncio.timeout(self.session.frontend.timeouts.connect):
                if tls is None:
                    _, conn = await loop.create_connection(
                        lambda: ServerConn(server, pool), addr[0], addr[1], family=family
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: ServerConn(server, pool),
                        addr[0],
                        addr[1],
                        family=family,
                        ssl=tls.context,
                        server_hostname=tls.sni or server.address.host,
                    )
        except TimeoutError:
            self.connect_task = None
            self.connect_failed("connect_timeout")
            return
        except OSError as exc:  # ssl.SSLError included: a bad certificate is a failed connect
            self.connect_task = None
            self.connect_failed(str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__))
            return
        self.connect_task = None
        if tls is not None and tls.pins:
            ssl_object = conn.transport.get_extra_info("ssl_object") if conn.transport is not None else None
            if not tls.pinned_ok(ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None):
                conn.close()
                self.connect_failed("certificate_pin_mismatch")
                return
        if self.session.closed:
            conn.close()
            if self.server is not None:
                self.backend.release(self.server)
                self.server = None
            return
        self.session.frontend.observer.report_connect_ok(server)
        self._attach(conn)

    def connect_failed(self, reason: str) -> None:
        server = self.server
        assert server is not None
        server.connect_errors += 1
        self.backend.connect_errors += 1
        self.session.frontend.observer.report_connect_error(server)
        log.info("connect to %s failed: %s (attempt %d)", server.key, reason, self.attempts)
        self._retry(server, f"connect_failed:{reason}")

    def _retry(self, failed: Server, cause: str) -> None:
        """Try another server (redispatch), or give up with 503."""
        self.server = None
        backend = self.backend
        if self.attempts > backend.policy.retries:
            backend.release(failed)
            self.session.fail_stream(self, 503, cause)
            return
        failed.retries += 1
        self.excluded.append(failed)
        nxt = backend.select(self.key, self.excluded) if backend.policy.redispatch else None
        backend.release(failed)
        if nxt is None and not backend.policy.redispatch and failed.usable:
            backend.take(failed)
            nxt = failed
        if nxt is None:
            self.session.fail_stream(self, 503, cause)
            return
        if nxt is not failed:
            nxt.redispatches += 1
        self._use(nxt)

    # -- request ------------------------------------------------------------------------

    def _attach(self, conn: ServerConn) -> None:
        self.conn = conn
        conn.stream = self
        self.t_connect = self.session.loop.time()
        if self.server is not None:
            self._stick(self.server)
        conn.parser.expect(self.head.method)
        self.session.cork_conn(conn)
        head = self.head
        if self.decision.target is not None:
            head = replace(head, target=self.decision.target)
        # check=False: every part is proven (see _head_bytes): parsed fields, validated config values,
        # the peer address and escaped certificate subjects.
        conn.write(serialize_request_head(head, self.session.request_headers(self.head, self.decision), check=False))
        self.request_sent = True
        replay = self.body_kept if self.attempts > 1 else None
        if replay:
            for piece in replay:
                conn.write(piece)
        for event in self.waiting_body:
            self._send_body(event)
        self.waiting_body.clear()
        if self.request_done:
            self._arm_response_timer()
        else:
            self.arm_body_timer()

    def arm_body_timer(self) -> None:
        """A request body on its way: the client must keep sending (``http.body_timeout``)."""
        self.session.arm(self.session.settings.body_timeout, self._body_timeout)

    def _body_timeout(self) -> None:
        if self.session.stream is not self or self.request_done:
            return
        if self.response_head is None:
            self._drop_conn()
            self.session.fail_stream(self, 408, "request_body_timeout")
        else:
            self.session.abort_stream(self, "request_body_timeout")

    def on_request_event(self, event: Body | EndOfMessage) -> None:
        if self.conn is None:
            self.waiting_body.append(event)
            if isinstance(event, EndOfMessage):
                self.request_done = True
            return
        self._send_body(event)

    def _send_body(self, event: Body | EndOfMessage) -> None:
        conn = self.conn
        assert conn is not None
        head = self.head
        if isinstance(event, Body):
            data = encode_chunk(event.data) if head.chunked else event.data
            self.bytes_in += len(event.data)
            if self.body_kept is not None:
                self.body_kept.append(data)
                if self.bytes_in > REPLAY_LIMIT:
                    self.body_kept = None
                    self.replayable = False
            conn.write(data)
        else:
            self.request_done = True
            if self.response_head is None:
                self._arm_response_timer()  # the whole request is out: now the server has the floor
            if head.chunked:
                last = encode_trailers(event.trailers)
                conn.write(last)
                if self.body_kept is not None:
                    self.body_kept.append(last)

    def _arm_response_timer(self) -> None:
        self.session.arm(self.session.frontend.timeouts.server, self._response_timeout)

    def _response_timeout(self) -> None:
        if self.session.stream is not self:
            return
        if self.response_head is None:
            self._drop_conn()
            self.session.fail_stream(self, 504, "server_timeout")
        else:
            self.session.abort_stream(self, "server_timeout_mid_response")

    # -- response -----------------------------------------------------------------------

    def on_response_event(self, event: ResponseHead | Body | EndOfMessage) -> None:
        session = self.session
        if isinstance(event, ResponseHead):
            if 100 <= event.status < 200:
                if event.status == 101:
                    if not self.head.upgrade:
                        self.server_failed("unexpected_101", bad_response=True)
                        return
                    self._become_tunnel(event)
                    return
                session.write(serialize_response_head(event, event.headers))
                self._arm_response_timer()
                return
            self.t_response = session.loop.time()
            if not self.whole and self._may_hold(event):
                # A small answer to a replayable request is held until complete: if the
                # server dies half-way, the request is retried elsewhere and the client
                # never sees the broken half (zero failed idempotent requests).
                self.held = [event]
                self._arm_response_timer()
                return
            self._begin_response(event)
            return
        if self.held is not None:
            self.held.append(event)
            if isinstance(event, EndOfMessage):
                held, self.held = self.held, None
                head = held[0]
                assert isinstance(head, ResponseHead)
                self.whole = True  # every piece is here: release them without timers
                self._begin_response(head)
                for piece in held[1:]:
                    self.on_response_event(piece)
            return
        if isinstance(event, Body):
            self.bytes_out += len(event.data)
            session.write(encode_chunk(event.data) if self.response_chunked else event.data)
            if not self.whole:
                self._arm_response_timer()  # a slow download is alive while bytes move
            return
        if self.response_head is None:
            return  # the end of an interim (1xx) response; the final one follows
        if self.response_chunked:
            session.write(encode_trailers(event.trailers))
        self._finish()

    def _may_hold(self, head: ResponseHead) -> bool:
        return (
            self.replayable
            and self.body_kept is not None
            and self.request_done
            and head.content_length is not None
            and head.content_length <= HOLD_LIMIT
            and self.attempts <= self.backend.policy.retries
        )

    def _begin_response(self, head: ResponseHead) -> None:
        self.response_head = head
        self.body_kept = None  # a response has begun: never replay now
        self.response_chunked = self.session.write_response_head(self, head)
        if not self.whole:
            self._arm_response_timer()

    def _become_tunnel(self, head: ResponseHead) -> None:
        """The server accepted the upgrade (WebSocket...): relay raw bytes both ways from now on.

        The stream stays in flight for the tunnel's whole life, so the server's slot
        (``leastconn``, ``maxconn``) counts it, and ``shutdown-sessions`` finds it.
        """
        conn = self.conn
        assert conn is not None
        session = self.session
        self.response_head = head
        self.t_response = session.loop.time()
        self.body_kept = None
        session.write(serialize_response_head(head, head.headers))
        conn.tunnel = True
        session.tunnel = self
        leftover = conn.parser.take_remainder()
        if leftover:
            self.bytes_out += len(leftover)
            session.write(leftover)
        early = session.parser.take_remainder()
        if early:
            self.bytes_in += len(early)
            conn.write(early)
        # A tunnel is idle-timed like a TCP session: the longer of the client/server timeouts.
        timeouts = session.frontend.timeouts
        session.arm(max(timeouts.client, timeouts.server), self._tunnel_idle)

    def tunnel_from_client(self, data: bytes) -> None:
        if self.conn is not None:
            self.bytes_in += len(data)
            self.conn.write(data)
            self._tunnel_alive()

    def tunnel_from_server(self, data: bytes) -> None:
        self.bytes_out += len(data)
        self.session.write(data)
        self._tunnel_alive()

    def _tunnel_alive(self) -> None:
        timeouts = self.session.frontend.timeouts
        self.session.arm(max(timeouts.client, timeouts.server), self._tunnel_idle)

    def _tunnel_idle(self) -> None:
        if self.session.stream is self:
            self.session.abort_stream(self, "tunnel_idle_timeout")

    def tunnel_closed(self, cause: str) -> None:
        """One side of the tunnel ended: end the other, and the stream."""
        conn, server = self.conn, self.server
        self.conn = None
        if conn is not None:
            conn.stream = None
            conn.close()
        if server is not None:
            server.bytes_in += self.bytes_in
            server.bytes_out += self.bytes_out
            self.backend.release(server)
            self.server = None
        session = self.session
        session._log(self, 101, cause)
        session.stream = None
        session.tunnel = None
        session.close()

    def _finish(self) -> None:
        conn, server = self.conn, self.server
        self.conn = None
        head = self.response_head
        # An HTTP/1.0 request went out as 1.0 (without keep-alive): the server closes after it.
        # A refused upgrade leaves the server's state uncertain: that connection is not reused.
        reusable = bool(
            head is not None
            and head.keep_alive
            and self.request_done
            and self.head.version == b"1.1"
            and not self.head.upgrade
        )
        if conn is not None:
            conn.release(reusable)
        if server is not None:
            server.bytes_in += self.bytes_in
            server.bytes_out += self.bytes_out
            self.backend.release(server)
        self.session.stream_done(self)

    def server_failed(self, cause: str, *, bad_response: bool = False) -> None:
        """The server connection broke (or talked nonsense) during this stream."""
        server = self.server
        self.held = None  # a held (never sent) partial response is simply forgotten
        self._drop_conn()
        if server is None:
            return
        if self.response_head is not None:
            self.session.abort_stream(self, cause)
            return
        if bad_response:
            self.server = None
            self.backend.release(server)
            self.session.fail_stream(self, 502, cause)
            return
        # Before the first response byte: replay only what is safe to replay.
        if (self.replayable and self.body_kept is not None) or not self.request_sent:
            log.info(
                "server %s: %s before the response; retrying %s elsewhere", server.key, cause, self.head.method.decode()
            )
            self._retry(server, cause)
            return
        self.server = None
        self.backend.release(server)
        self.session.fail_stream(self, 502, cause)

    def _drop_conn(self) -> None:
        """Abandon the server connection mid-stream: a RST, so a half-sent request is never taken as whole."""
        conn = self.conn
        self.conn = None
        if conn is not None:
            conn.stream = None
            conn.abort()

    def cancel(self) -> None:
        """The client went away or the session is being closed."""
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._drop_conn()
        if self.server is not None:
            server, self.server = self.server, None
            server.bytes_in += self.bytes_in
            server.bytes_out += self.bytes_out
            self.backend.release(server)


# --------------------------------------------------------------------------- client side


class Pools:
    """The connection pools of one frontend, by server."""

    __slots__ = ("pools",)

    def __init__(self) -> None:
        self.pools: dict[Server, Pool] = {}

    def pool(self, server: Server) -> Pool:
        pool = self.pools.get(server)
        if pool is None:
            pool = self.pools[server] = Pool()
        return pool

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.pools.clear()


class HttpSession(AcceptedSession):
    """One client connection: parse, run streams one at a time, keep alive.

    It is also the frontend's *session* object (like :class:`~medlb.io.session.TcpSession`):
    ``start``, ``abort``, ``backend``, ``server`` and ``relay`` are what the
    frontend, the runtime and the admin API use.
    """

    log_label = "tls"
    session_log = log
    frontend: Frontend
    settings: HttpSettings

    #: HTTP sessions have no byte relay for the idle sweeper; their timers are their own.
    relay = None

    def __init__(self, frontend: Frontend, sock: socket.socket, addr: tuple[str, int]) -> None:
        self.frontend = frontend
        settings = frontend.http
        assert settings is not None
        self.settings = settings
        self.frontend_pools = frontend.pools
        self.backend: Backend = frontend.backend
        self.sock: socket.socket | None = sock
        self.loop = frontend.loop
        self.transport: asyncio.Transport | None = None
        self.parser = RequestParser(settings.limits)
        self.pending: deque[RequestHead | Body | EndOfMessage] = deque()
        self.stream: Stream | None = None
        self.closed = False
        self.reading_paused = False
        self.client_ip = "-"
        self.client_port = 0
        self.trusted_peer = False
        #: One timer per session, re-armed lazily: the header, keep-alive and server
        #: response timeouts only move ``deadline``; the timer catches up when it fires.
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.on_deadline: Callable[[], None] | None = None
        self.requests = 0
        self.keep_alive = True
        self.client_ip, self.client_port = addr[0], addr[1]
        #: Corked client output (see :meth:`cork`) and server connections corked meanwhile.
        self.out: list[bytes] | None = None
        self.corked: list[ServerConn] | None = None
        #: The verified client certificate's subject (mTLS), passed to servers in a header.
        self.client_subject = b""
        #: The stream whose upgrade the server accepted: raw relay from then on.
        self.tunnel: Stream | None = None
        #: Bytes of a request head have arrived and its head is not complete yet.
        self.head_started = False

    @property
    def server(self) -> Server | None:
        """The server of the stream in flight (what ``shutdown-sessions`` looks for)."""
        return self.stream.server if self.stream is not None else None

    def tls_failed(self) -> None:
        self._ended()

    # -- connection events ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.settings.tls is not None and self.settings.tls.client_verify:
            self.client_subject = subject_text(transport.get_extra_info("peercert")).encode("utf-8", "replace")
        if self.settings.trusted:
            addr = ip_address(self.client_ip)
            self.trusted_peer = any(addr in net for net in self.settings.trusted)
        self.arm(self.settings.header_timeout, self._header_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.tunnel is not None:
            self.tunnel.tunnel_from_client(data)
            return
        stream = self.stream
        if stream is not None and not stream.request_done and stream.conn is not None:
            stream.arm_body_timer()  # the upload is alive
        try:
            events = self.parser.feed(data)
        except HttpError as exc:
            self._reject(exc.status, exc.reason)
            return
        if not events:
            if stream is None and not self.pending and not self.head_started:
                # A request head has begun and is not complete: the header timeout runs until it is.
                # (A head that arrives whole, the usual case, never arms it: its stream's timer follows.)
                self.head_started = True
                self.arm(self.settings.header_timeout, self._header_timeout)
            return
        self.pending.extend(events)
        corked: list[ServerConn] = []
        self.corked = corked
        if self.stream is not None and self.stream.conn is not None:
            self.cork_conn(self.stream.conn)
        try:
            self._advance()
        finally:
            self.corked = None
            for conn in corked:
                conn.flush()

    def cork_conn(self, conn: ServerConn) -> None:
        """Batch writes to ``conn`` until the current batch of client bytes is handled."""
        if self.corked is not None and conn.out is None:
            conn.out = []
            self.corked.append(conn)

    def cork(self) -> bool:
        """Batch writes to the client (one send per batch of server bytes); False if already corked."""
        if self.out is not None:
            return False
        self.out = []
        return True

    def uncork(self) -> None:
        out, self.out = self.out, None
        if out and self.transport is not None and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def eof_received(self) -> bool | None:
        # A client half-close: finish the stream in flight, then close. A request cut
        # by the close is an error, and one already forwarded is aborted, never completed.
        if self.tunnel is not None:
            self.tunnel.tunnel_closed("client_close")
            return None
        self.keep_alive = False
        try:
            events = self.parser.feed_eof()
        except HttpError as exc:
            self._reject(exc.status, exc.reason)
            return None
        self.pending.extend(events)
        self._advance()
        if self.stream is None and not self.pending:
            self.close()
        # Plain TCP can stay half-open to deliver the response; TLS cannot (asyncio
        # closes an SSL transport after EOF whatever this returns, and warns).
        return None if self.settings.tls is not None else True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_deadline = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        stream = self.stream
        if stream is not None:
            self.stream = None
            stream.cancel()
            self._log(stream, 0, "client_abort")
        self._ended()

    def _ended(self) -> None:
        if not getattr(self, "_gone", False):
            self._gone = True
            self.frontend.session_ended(self)

    def pause_writing(self) -> None:
        conn = self.stream.conn if self.stream is not None else None
        if conn is not None and conn.transport is not None:
            conn.transport.pause_reading()

    def resume_writing(self) -> None:
        conn = self.stream.conn if self.stream is not None else None
        if conn is not None and conn.transport is not None:
            conn.transport.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    # -- streams ---------------------------------------------------------------------------

    def _advance(self) -> None:
        """Hand parsed events to the stream in flight, or start the next stream."""
        pending = self.pending
        while pending and not self.closed:
            event = pending[0]
            if self.stream is None:
                if not isinstance(event, RequestHead):  # the codec guarantees order
                    self._reject(400, "body without a request")
                    return
                pending.popleft()
                # A bodiless request's end is already parsed (same read): the stream starts complete.
                done = bool(pending) and not event.chunked and type(pending[0]) is EndOfMessage
                if done:
                    pending.popleft()
                self._start(event, done)
                continue
            if isinstance(event, RequestHead):
                break  # pipelined: waits for the stream in flight
            pending.popleft()
            self.stream.on_request_event(event)
        if len(pending) > PIPELINE_EVENTS:
            self.pause_reading()
        elif self.stream is None or not pending:
            self.resume_reading()

    def _start(self, head: RequestHead, done: bool = False) -> None:
        self.requests += 1
        self.head_started = False
        self.on_deadline = None
        if not head.keep_alive:
            self.keep_alive = False
        if head.method == b"CONNECT":
            self._reject(501, "CONNECT is not supported by a reverse proxy")
            return
        decision = self.settings.router.decide(head, self.settings.tls is not None)
        if decision.redirect is not None:
            self._redirect(head, decision)
            return
        backend = self.frontend.backend
        if decision.backend is not None:
            routed = self.frontend.backends.get(decision.backend)
            if routed is None:  # removed by a reload between config and request: refuse clearly
                self._reject(503, f"backend {decision.backend} is not configured")
                return
            backend = routed
        stream = Stream(self, head, backend, decision)
        stream.request_done = done
        self.stream = stream
        stream.start()

    def _redirect(self, head: RequestHead, decision: Decision) -> None:
        """Answer a redirect rule; the connection stays open unless the request carried a body."""
        assert decision.redirect is not None
        status, location = decision.redirect
        has_body = head.chunked or bool(head.content_length)
        if has_body:
            self.keep_alive = False  # its body is not forwarded anywhere; do not try to frame past it
        headers = [(b"Location", location), (b"Content-Length", b"0")]
        for edit in decision.response_edits:
            headers = edit.apply(headers)
        if decision.hsts is not None:
            headers.append((b"Strict-Transport-Security", decision.hsts))
        if not self.keep_alive:
            headers.append((b"Connection", b"close"))
        reason = {301: b"Moved Permanently", 302: b"Found", 303: b"See Other", 307: b"Temporary Redirect"}
        self.write(
            b"HTTP/1.1 %d %s\r\n" % (status, reason.get(status, b"Permanent Redirect"))
            + b"".join(n + b": " + v + b"\r\n" for n, v in headers)
            + b"\r\n"
        )
        if log.isEnabledFor(logging.INFO) and self.frontend.log_sessions:
            log.info(
                'http client=%s:%d frontend=%s "%s %s HTTP/%s" status=%d redirect=%s',
                self.client_ip,
                self.client_port,
                self.frontend.name,
                head.method.decode("latin-1"),
                head.target.decode("latin-1")[:512],
                head.version.decode("latin-1"),
                status,
                location.decode("latin-1")[:512],
            )
        if not self.keep_alive:
            self.close()
            return
        # Drop this request's (empty) end event, then go on with the next request.
        while self.pending and not isinstance(self.pending[0], RequestHead):
            self.pending.popleft()
        self.arm(self.settings.keepalive_timeout, self._keepalive_timeout)

    def request_headers(self, head: RequestHead, decision: Decision = DEFAULT) -> list[tuple[bytes, bytes]]:
        """The head sent to the server: hop-by-hop removed, forwarding headers set, framing fixed."""
        settings = self.settings
        keep_forwarded = self.trusted_peer
        headers: list[tuple[bytes, bytes]] = []
        prior_xff: bytes | None = None
        tls = settings.tls
        subject_header = tls.subject_header if tls is not None and tls.client_verify else None
        subject_lower = subject_header.lower() if subject_header else None
        rule = self.frontend.persistence.get(self.backend.name)
        ours = rule.cookie_name if rule is not None and rule.model.kind == "cookie" else None
        watch = _WATCH_LENGTHS if subject_lower is None else _WATCH_LENGTHS | {len(subject_lower)}
        for name, value in head.headers:
            if len(name) not in watch:  # most fields: passed on untouched, never lower-cased
                headers.append((name, value))
                continue
            lower = name.lower()
            if lower in HOP_BY_HOP or lower == subject_lower:
                continue  # hop-by-hop, or a forged client-certificate header
            if ours is not None and lower == b"cookie":
                value = _without_cookie(value, ours)
                if not value:
                    continue  # medlb's own cookie is not the server's business (insert indirect)
            if lower in _FORWARDED_NAMES:
                if not keep_forwarded:
                    continue  # forged unless the peer is a trusted proxy
                if lower == b"x-forwarded-for" and settings.xff:
                    prior_xff = value if prior_xff is None else prior_xff + b", " + value
                    continue
            headers.append((name, value))
        client = self.client_ip.encode()
        if settings.xff:
            headers.append((b"X-Forwarded-For", client if prior_xff is None else prior_xff + b", " + client))
        if settings.x_forwarded_proto and not (keep_forwarded and head.header(b"x-forwarded-proto")):
            headers.append((b"X-Forwarded-Proto", settings.scheme))
        if (
            settings.x_forwarded_host
            and head.host is not None
            and not (keep_forwarded and head.header(b"x-forwarded-host"))
        ):
            headers.append((b"X-Forwarded-Host", head.host))
        if settings.forwarded:
            node = b'"[%s]"' % client if b":" in client else client
            element = b"for=" + node + b";proto=" + settings.scheme
            if head.host is not None:
                # RFC 7239: a token stays bare (Orthanc and others take the value as is);
                # host:port and IPv6 literals are not tokens and must be quoted.
                host = head.host
                element += b";host=" + (host if _TOKEN.fullmatch(host) else b'"' + host.replace(b'"', b"") + b'"')
            prior = head.header(b"forwarded") if keep_forwarded else None
            headers.append((b"Forwarded", element if prior is None else prior + b", " + element))
        for edit in decision.request_edits:
            # Rules may change any header but the framing and connection ones, which medlb owns.
            headers = end_to_end(edit.apply(headers))
        if head.upgrade:
            upgrade = head.header(b"upgrade")
            if upgrade is not None:
                headers.append((b"Connection", b"upgrade"))
                headers.append((b"Upgrade", upgrade))
        if subject_header is not None and self.client_subject:
            headers.append((subject_header, self.client_subject))
        if head.chunked:
            headers.append((b"Transfer-Encoding", b"chunked"))
        elif head.content_length is not None:
            headers.append((b"Content-Length", b"%d" % head.content_length))
        return headers

    def write_response_head(self, stream: Stream, head: ResponseHead) -> bool:
        """Send the response head to the client; return True when the body must be chunk-encoded."""
        headers = end_to_end(head.headers)
        decision = stream.decision
        for edit in decision.response_edits:
            headers = end_to_end(edit.apply(headers))
        if decision.hsts is not None:
            headers = [(n, v) for n, v in headers if n.lower() != b"strict-transport-security"]
            headers.append((b"Strict-Transport-Security", decision.hsts))
        chunked = False
        no_body = stream.head.method == b"HEAD" or head.status in (204, 304) or 100 <= head.status < 200
        if head.content_length is not None and not head.chunked:
            headers.append((b"Content-Length", b"%d" % head.content_length))
        elif not no_body:
            if stream.head.version == b"1.1":
                headers.append((b"Transfer-Encoding", b"chunked"))
                chunked = True
            else:
                self.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if stream.set_cookie is not None:
            headers.append((b"Set-Cookie", stream.set_cookie))
        if not self.keep_alive:
            headers.append((b"Connection", b"close"))
        elif stream.head.version == b"1.0":
            headers.append((b"Connection", b"keep-alive"))
        self.write(serialize_response_head(head, headers, check=False))
        return chunked

    def write(self, data: bytes) -> None:
        if self.out is not None:
            self.out.append(data)
        elif self.transport is not None and not self.closed:
            self.transport.write(data)

    @staticmethod
    def cookie_value(head: RequestHead, name: bytes) -> str | None:
        """The value of cookie ``name`` in the request (the last one wins), if any."""
        found: str | None = None
        for header, value in head.headers:
            if header.lower() == b"cookie":
                for cname, cval in _cookies(value):
                    if cname == name:
                        found = cval.decode("latin-1")
        return found

    def stream_done(self, stream: Stream) -> None:
        head = stream.response_head
        self._log(stream, head.status if head is not None else 0, "done")
        self.stream = None
        if not self.keep_alive or not stream.request_done:
            # A response that ended before its request did (an early 413 from the
            # server, say): the rest of the request cannot be framed any more.
            self.close()
            return
        self.arm(self.settings.keepalive_timeout, self._keepalive_timeout)
        if stream.head.upgrade:
            # The server refused the upgrade with a normal response: the bytes the
            # client sent after its request are HTTP again.
            try:
                self.pending.extend(self.parser.resume())
            except HttpError as exc:
                self._reject(exc.status, exc.reason)
                return
        self._advance()

    def no_server(self, stream: Stream) -> None:
        backend = self.frontend.backend
        backend.no_server += 1
        self.fail_stream(stream, 503, "no_server")

    def fail_stream(self, stream: Stream, status: int, cause: str) -> None:
        """End a stream with an error medlb writes itself (nothing was sent to the client yet)."""
        stream.cancel()
        retry_after = self.settings.retry_after if status == 503 else None
        self.write(error_response(status, cause, retry_after=retry_after))
        self._log(stream, status, cause)
        self.stream = None
        self.close()

    def abort_stream(self, stream: Stream, cause: str) -> None:
        """The response was already under way: cut the client connection, never complete it."""
        self._log(stream, stream.response_head.status if stream.response_head else 0, cause)
        stream.cancel()
        self.stream = None
        self.abort()

    # -- ends -------------------------------------------------------------------------------

    def _reject(self, status: int, reason: str) -> None:
        log.info(
            "http client=%s:%d frontend=%s rejected %d: %s",
            self.client_ip,
            self.client_port,
            self.frontend.name,
            status,
            reason,
        )
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.cancel()
        self.write(error_response(status, reason))
        self.close()

    def _header_timeout(self) -> None:
        if self.stream is None:
            if self.head_started:
                self._reject(408, "request header timeout")
            else:
                self.close()  # an idle connection that never sent a byte: close quietly

    def drain(self) -> None:
        """Graceful stop: close now if idle, else after the stream in flight."""
        self.keep_alive = False
        if self.stream is None and not self.pending:
            self.close()

    def _keepalive_timeout(self) -> None:
        if self.stream is None and not self.pending:
            self.close()

    def arm(self, delay: float, callback: Callable[[], None]) -> None:
        """Call ``callback`` in ``delay`` seconds unless re-armed or disarmed first.

        Cheap on purpose (called several times per request): it moves a deadline;
        a timer is created only when none is pending or the deadline moves earlier.
        """
        if delay <= 0:
            self.on_deadline = None
            return
        deadline = self.loop.time() + delay
        self.deadline = deadline
        self.on_deadline = callback
        timer = self.timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        callback = self.on_deadline
        if callback is None or self.closed:
            return
        if self.loop.time() < self.deadline:
            self.timer = self.loop.call_at(self.deadline, self._on_timer)
            return
        self.on_deadline = None
        callback()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.uncork()  # what was written before the close goes out first
            self.closed = True
            self.transport.close()

    def abort(self, cause: str = "") -> None:
        """Cut the client connection now (hard stop, shutdown-sessions): a RST, never a clean end."""
        if self.transport is None:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
                self._ended()
            return
        if self.stream is not None:
            stream, self.stream = self.stream, None
            stream.cancel()
            self._log(stream, 0, cause or "aborted")
        if self.transport is not None:
            self.out = None
            self.closed = True
            self.transport.abort()

    def _log(self, stream: Stream, status: int, cause: str) -> None:
        if not self.frontend.log_sessions or not log.isEnabledFor(logging.INFO):
            return
        now = self.loop.time()
        start = stream.t_start

        def ms(t: float) -> str:
            return f"{(t - start) * 1000:.1f}" if t >= 0 else "-"

        head = stream.head
        log.info(
            'http client=%s:%d frontend=%s backend=%s server=%s "%s %s HTTP/%s" status=%d bytes_in=%d bytes_out=%d '
            "connect_ms=%s response_ms=%s total_ms=%.1f attempts=%d term=%s",
            self.client_ip,
            self.client_port,
            self.frontend.name,
            stream.backend.name,
            stream.server.name if stream.server is not None else "-",
            head.method.decode("latin-1"),
            head.target.decode("latin-1")[:512],
            head.version.decode("latin-1"),
            status,
            stream.bytes_in,
            stream.bytes_out,
            ms(stream.t_connect),
            ms(stream.t_response),
            (now - start) * 1000,
            stream.attempts,
            cause,
        )
