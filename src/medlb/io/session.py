"""One accepted TCP session (``mode: tcp``): choose a server, connect, relay, log.

The life of a session:

1. **Select** a server from the backend (algorithm, maxconn, backups). If every
   usable server is full, wait in the backend queue for at most
   ``timeouts.queue``; if nothing is usable, close the client at once. A
   session is never left hanging without a deadline.
2. **Connect** without blocking, bounded by ``timeouts.connect`` per attempt.
   A failed attempt is reported to the server's checker (passive observation)
   and retried up to ``retries`` times; with ``redispatch`` each retry goes to
   another server, so a dead server costs the client one fast RST-and-retry
   inside medlb rather than a failed connection.
3. Optionally send a **PROXY protocol** header so the server learns the client.
4. Hand both sockets to the :class:`~medlb.io.relay.Relay`.
5. Release the server slot, serve the queue, and write **one log line**.

Callbacks only, no task per session: a coroutine frame per connection would
cost memory on 10,000 idle associations and time on every connection.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import TYPE_CHECKING

from medlb.io.relay import LINGER_RESET, Relay
from medlb.model.server import Server
from medlb.proto import proxy_protocol

if TYPE_CHECKING:
    import asyncio

    from medlb.io.frontend import Frontend
    from medlb.model.backend import Backend

log = logging.getLogger("medlb.session")

_CONNECT_IN_PROGRESS = frozenset({errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EALREADY})


def _fmt_addr(addr: tuple[str, int] | tuple[str, int, int, int] | None) -> str:
    if addr is None:
        return "-"
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TcpSession:
    """A client connection and, once chosen, its server connection."""

    __slots__ = (
        "accepted_at",
        "attempts",
        "backend",
        "cancelled",
        "client",
        "client_addr",
        "connect_ms",
        "connected_at",
        "excluded",
        "frontend",
        "key",
        "loop",
        "queue_timer",
        "relay",
        "server",
        "server_sock",
        "timeouts",
        "timer",
    )

    def __init__(self, frontend: Frontend, client: socket.socket, client_addr: tuple[str, int]) -> None:
        self.frontend = frontend
        #: Fixed at accept: a reload may point the frontend elsewhere, but this
        #: session's slot, queue place and counters belong to the backend it started on.
        self.backend: Backend = frontend.backend
        self.timeouts = frontend.timeouts
        self.loop: asyncio.AbstractEventLoop = frontend.loop
        self.client = client
        self.client_addr = client_addr
        self.accepted_at = self.loop.time()
        self.server: Server | None = None
        self.server_sock: socket.socket | None = None
        self.relay: Relay | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.queue_timer: asyncio.TimerHandle | None = None
        self.attempts = 0
        self.excluded: list[Server] = []
        self.cancelled = False  # read by the backend queue
        #: The balancing key (client address) when the algorithm hashes; kept so a
        #: session served from the queue keeps its affinity.
        self.key: bytes | None = client_addr[0].encode() if frontend.backend.balancer.needs_key else None
        self.connect_ms = -1.0
        self.connected_at = 0.0

    # -- selection and queueing -----------------------------------------------------------

    def start(self) -> None:
        backend = self.backend
        if backend.queue:
            # Older sessions wait for a slot: they go first. With global.workers a slot another
            # process freed is not announced (the queue polls for it), so one may be free now.
            backend.dispatch_queue()
            if backend.queue:
                self._queue_or_refuse("no_server")
                return
        server = backend.select(self.key)
        if server is not None:
            self._connect(server)
        else:
            self._queue_or_refuse("no_server")

    def _queue_or_refuse(self, cause: str) -> None:
        """No server slot now: wait in the queue if servers are merely full, else end."""
        backend = self.backend
        if backend.saturated():
            if backend.can_queue():
                backend.queue.append(self)
                self.queue_timer = self.loop.call_later(self.timeouts.queue, self._queue_timeout)
                return
            backend.queue_full += 1
            self.finish("queue_full")
            return
        if cause == "no_server":
            backend.no_server += 1
        self.finish(cause)

    def grant(self, server: Server) -> None:
        """Called by the backend queue with a slot already taken on ``server``."""
        if self.queue_timer is not None:
            self.queue_timer.cancel()
            self.queue_timer = None
        self._connect(server)

    def _leave_queue(self) -> None:
        """Drop out of the queue at once, so a dead waiter never counts against maxqueue."""
        self.cancelled = True
        try:
            self.backend.queue.remove(self)
        except ValueError:
            pass

    def _queue_timeout(self) -> None:
        self.queue_timer = None
        self._leave_queue()
        self.backend.queue_timeouts += 1
        self.finish("queue_timeout")

    # -- connecting -----------------------------------------------------------------------

    def _connect(self, server: Server) -> None:
        self.server = server
        self.attempts += 1
        sockaddr = server.sockaddr
        if sockaddr is None:
            self._connect_failed("unresolved")
            return
        family, addr = sockaddr
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            # fd exhaustion: nothing to retry against; fail this session cleanly.
            log.error("cannot create a socket to %s: %s", server.key, exc.strerror)
            self.server = None
            self.backend.release(server)
            self.finish("resource_error")
            return
        self.server_sock = sock
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        if err in _CONNECT_IN_PROGRESS:
            # A server on the same host completes the handshake inside connect();
            # like HAProxy's speculative I/O, look before paying for a poll round
            # trip. One cheap syscall when the handshake is still on the wire.
            try:
                sock.getpeername()
            except OSError:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or err
            else:
                err = 0
        if err == 0:
            self._connected()
        elif err in _CONNECT_IN_PROGRESS:
            self.loop.add_writer(sock.fileno(), self._on_connect_ready)
            self.timer = self.loop.call_later(self.timeouts.connect, self._on_connect_timeout)
        else:
            self._connect_failed(errno.errorcode.get(err, str(err)))

    def _on_connect_ready(self) -> None:
        sock = self.server_sock
        assert sock is not None
        self.loop.remove_writer(sock.fileno())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(errno.errorcode.get(err, str(err)))
        else:
            self._connected()

    def _on_connect_timeout(self) -> None:
        self.timer = None
        if self.server_sock is not None:
            self.loop.remove_writer(self.server_sock.fileno())
        self._connect_failed("connect_timeout")

    def _connect_failed(self, reason: str) -> None:
        server = self.server
        assert server is not None
        backend = self.backend
        if self.server_sock is not None:
            self.server_sock.close()
            self.server_sock = None
        server.connect_errors += 1
        backend.connect_errors += 1
        self.frontend.observer.report_connect_error(server)
        log.info("connect to %s (%s) failed: %s (attempt %d)", server.key, server.address, reason, self.attempts)
        if self.attempts > backend.policy.retries:
            self.server = None
            backend.release(server)
            self.finish(f"connect_failed:{reason}")
            return
        server.retries += 1
        # Pick the next server *before* freeing the failed slot, or the queue
        # would take that slot and leave this retry with nothing.
        nxt: Server | None
        if backend.policy.redispatch:
            self.excluded.append(server)
            nxt = backend.select(self.key, self.excluded)
            if nxt is not None and nxt is not server:
                nxt.redispatches += 1
            self.server = None
            backend.release(server)
        elif server.usable:
            nxt = server  # retry the same server in the slot this session holds
        else:
            nxt = None
            self.server = None
            backend.release(server)
        if nxt is None:
            self._queue_or_refuse(f"connect_failed:{reason}")
            return
        self._connect(nxt)

    def _connected(self) -> None:
        server = self.server
        sock = self.server_sock
        assert server is not None and sock is not None
        now = self.loop.time()
        self.connected_at = now
        self.connect_ms = (now - self.accepted_at) * 1000.0
        self.frontend.observer.report_connect_ok(server)
        version = self.backend.policy.proxy_protocol
        if version != "none":
            try:
                local = self.client.getsockname()
            except OSError:
                # The client is gone: not the server's fault, nothing to retry.
                self.server_sock = None
                sock.close()
                self.server = None
                self.backend.release(server)
                self.finish("client_gone")
                return
            header = proxy_protocol.encode(version, self.client_addr, local)
            try:
                # A fresh socket's send buffer holds a <= 232-byte header in one call.
                if sock.send(header) != len(header):
                    raise OSError(errno.EAGAIN, "short write of PROXY header")
            except OSError as exc:
                log.warning("PROXY header to %s failed: %s", server.key, exc)
                self._connect_failed("proxy_header")
                return
        self.server_sock = None  # ownership moves to the relay
        self.relay = Relay(
            self.loop,
            self.client,
            sock,
            self._relay_closed,
            splice=self.frontend.splice,
            on_early_reset=self._server_reset_early,
        )
        self.relay.start()

    def _server_reset_early(self) -> None:
        """The server reset before any byte moved: retry like a failed connect."""
        self.relay = None
        self._connect_failed("reset_before_data")

    # -- the end ------------------------------------------------------------------------

    def _relay_closed(self, cause: str) -> None:
        relay = self.relay
        server = self.server
        assert relay is not None and server is not None
        server.bytes_in += relay.bytes_c2s
        server.bytes_out += relay.bytes_s2c
        self.backend.release(server)
        self._done(cause)

    def finish(self, cause: str) -> None:
        """End a session that never reached the relay."""
        try:
            # RST rather than FIN: a client must not mistake a refused session for an
            # orderly empty answer (SO_LINGER 0, as HAProxy does on errors).
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
        except OSError:
            pass
        self.client.close()
        self._done(cause)

    def abort(self, cause: str) -> None:
        """Close the session now, wherever it is (hard stop, operator shutdown).

        Both sides get a RST: a session cut in the middle must never look finished.
        """
        if self.relay is not None:
            self.relay.close(cause, reset=True)
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.queue_timer is not None:
            self.queue_timer.cancel()
            self.queue_timer = None
            self._leave_queue()
        sock = self.server_sock
        if sock is not None:
            self.loop.remove_writer(sock.fileno())
            sock.close()
            self.server_sock = None
        if self.server is not None:
            server, self.server = self.server, None
            self.backend.release(server)
        self.finish(cause)

    def _done(self, cause: str) -> None:
        frontend = self.frontend
        frontend.session_ended(self)
        if frontend.log_sessions and log.isEnabledFor(logging.INFO):
            relay = self.relay
            server = self.server
            log.info(
                "session client=%s frontend=%s backend=%s server=%s connect_ms=%.1f duration_s=%.3f "
                "bytes_c2s=%d bytes_s2c=%d attempts=%d term=%s",
                _fmt_addr(self.client_addr),
                frontend.name,
                self.backend.name,
                server.name if server is not None else "-",
                self.connect_ms,
                self.loop.time() - self.accepted_at,
                relay.bytes_c2s if relay else 0,
                relay.bytes_s2c if relay else 0,
                self.attempts,
                cause,
            )
