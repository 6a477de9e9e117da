"""The relay: moves bytes between two connected sockets until both sides are done.

This is the hot path, so it is built for as little Python per byte as the
language allows:

- No transports, no tasks, no coroutines: two raw non-blocking sockets and
  ``loop.add_reader`` / ``loop.add_writer`` callbacks. A wake-up costs one
  Python call and two system calls.
- **Copy first, splice for bulk** (HAProxy's ``option splice-auto``): every
  direction starts with ``recv_into`` a scratch buffer shared by the whole
  event loop and ``send`` from it; a session that only exchanges small
  messages (a C-ECHO, an HL7 ACK, an HTTP health probe) never allocates a
  buffer or a pipe. Only bytes the destination could not take at once are
  copied out of the scratch buffer and kept. When a read fills the scratch
  buffer the flow is bulk, and that direction switches to **zero copy with
  ``os.splice``**: socket -> pipe -> socket inside the kernel, bytes never
  enter the process.
- Pipes come from a **pool** and go back to it empty, so short bulk sessions
  do not pay ``pipe2`` + ``fcntl`` + two ``close`` each.
- **Backpressure**: a direction stops reading its source while bytes it
  already read are waiting for the destination; the pipe or the leftover is
  the only per-direction memory and its size is bounded.
- **Half-close**: end of stream on one side becomes ``shutdown(SHUT_WR)`` on
  the other once everything read has been delivered; the other direction keeps
  flowing (DICOM release and many HL7 senders rely on this).
- **Idle timeout** without a timer per session or a reset per chunk: the
  frontend's sweeper compares each relay's byte counters with what it saw on
  its previous pass (see :meth:`Relay.sweep`).
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import socket
import sys
import termios
from collections.abc import Callable

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
HAVE_SPLICE = hasattr(os, "splice")

#: Scratch buffer size of the copy path; reads that fill it mark a bulk flow.
COPY_CHUNK = 64 * 1024
#: Pipe size for splice. 64 KiB is Linux's default; a larger pipe moves more
#: per wake-up (measured in bench/) and costs nothing while it is empty: pipe
#: pages are allocated only when filled.
PIPE_SIZE = 1024 * 1024
#: Empty pipes kept for reuse (2 fds each).
PIPE_POOL_MAX = 256
#: Splice rounds per wake-up while the source keeps filling the pipe, before
#: yielding to the loop so other sessions are served (fairness).
SPLICE_BATCH = 8

# One event loop per thread runs a relay's callbacks, and a callback never
# yields while it uses the scratch buffer, so one buffer per process is safe.
_SCRATCH = bytearray(COPY_CHUNK)
_SCRATCH_VIEW = memoryview(_SCRATCH)
_PIPES: list[tuple[int, int]] = []

#: SO_LINGER on, 0 seconds: close() sends a RST instead of a FIN.
LINGER_RESET = b"\x01\x00\x00\x00\x00\x00\x00\x00"

#: Errors that mean "the peer reset or vanished", logged as ``<side>_reset``.
_RESET_ERRNOS = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH})


def _pipe_is_empty(pipe_r: int) -> bool:
    try:
        pending = fcntl.ioctl(pipe_r, termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return False
    return int.from_bytes(pending, sys.byteorder) == 0


def _take_pipe() -> tuple[int, int]:
    if _PIPES:
        return _PIPES.pop()
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(pipe_w, _F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass  # unprivileged and over pipe-user-pages-soft: keep the default size
    return pipe_r, pipe_w


class _Pump:
    """One direction of a relay (client->server or server->client)."""

    __slots__ = (
        "backlog",
        "count",
        "dst",
        "dst_fd",
        "eof",
        "loop",
        "name",
        "pending",
        "pipe_r",
        "pipe_w",
        "reader",
        "reading",
        "relay",
        "src",
        "src_fd",
        "writing",
    )

    def __init__(self, relay: Relay, name: str, src: socket.socket, dst: socket.socket) -> None:
        self.relay = relay
        self.loop = relay.loop
        self.name = name
        self.src = src
        self.dst = dst
        self.src_fd = src.fileno()
        self.dst_fd = dst.fileno()
        self.pipe_r = -1
        self.pipe_w = -1
        #: Copy mode: bytes read but not yet accepted by the destination.
        self.backlog: memoryview | None = None
        #: Splice mode: bytes in the pipe not yet accepted by the destination.
        self.pending = 0
        self.count = 0
        self.eof = False
        self.reading = False
        self.writing = False
        self.reader: Callable[[], None] = self.on_readable_copy

    # -- lifecycle ----------------------------------------------------------------------

    def resume_reading(self) -> None:
        if not self.reading and not self.eof:
            self.reading = True
            self.loop.add_reader(self.src_fd, self.reader)

    def stop(self) -> None:
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if self.pipe_r >= 0:
            # A pooled pipe must be empty, or its bytes would reach the next session:
            # trust the counter, then ask the kernel (one ioctl per returned pipe).
            if self.pending == 0 and len(_PIPES) < PIPE_POOL_MAX and _pipe_is_empty(self.pipe_r):
                _PIPES.append((self.pipe_r, self.pipe_w))
            else:
                os.close(self.pipe_r)
                os.close(self.pipe_w)
            self.pipe_r = self.pipe_w = -1
        self.backlog = None

    @property
    def done(self) -> bool:
        return self.eof and self.pending == 0 and self.backlog is None

    # -- copy path ------------------------------------------------------------------------

    def on_readable_copy(self) -> None:
        try:
            n = self.src.recv_into(_SCRATCH)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay.abort(f"{self.name}_src_error", exc)
            return
        if n == 0:
            self._end_of_stream()
            return
        self.count += n
        try:
            m = self.dst.send(_SCRATCH_VIEW[:n])
        except (BlockingIOError, InterruptedError):
            m = 0
        except OSError as exc:
            self.relay.abort(f"{self.name}_dst_error", exc)
            return
        if m < n:
            # Keep only what the destination did not take; the scratch buffer is shared.
            self.backlog = memoryview(_SCRATCH[m:n])
            self._wait_writable(self.flush_backlog)
        elif n == COPY_CHUNK and self.relay.splice:
            self._start_splicing()

    def flush_backlog(self) -> None:
        backlog = self.backlog
        assert backlog is not None
        try:
            m = self.dst.send(backlog)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.relay.abort(f"{self.name}_dst_error", exc)
            return
        if m < len(backlog):
            self.backlog = backlog[m:]
            return
        self.backlog = None
        self._drained()

    def _start_splicing(self) -> None:
        """A read filled the scratch buffer: bulk flow, go zero-copy for good."""
        try:
            self.pipe_r, self.pipe_w = _take_pipe()
        except OSError:
            # Out of fds for a pipe: this relay keeps copying, correct if slower.
            self.relay.splice = False
            return
        self.reader = self.on_readable_splice
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.loop.add_reader(self.src_fd, self.reader)

    # -- splice path ----------------------------------------------------------------------

    def on_readable_splice(self) -> None:
        splice = os.splice
        src_fd, dst_fd, pipe_r, pipe_w = self.src_fd, self.dst_fd, self.pipe_r, self.pipe_w
        for _ in range(SPLICE_BATCH):
            try:
                n = splice(src_fd, pipe_w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self.relay.abort(f"{self.name}_src_error", exc)
                return
            if n == 0:
                self._end_of_stream()
                return
            self.count += n
            pending = n
            while pending:
                try:
                    pending -= splice(pipe_r, dst_fd, pending, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    self.pending = pending
                    self._wait_writable(self.flush_splice)
                    return
                except OSError as exc:
                    self.pending = pending  # the pipe is dirty: stop() must not pool it
                    self.relay.abort(f"{self.name}_dst_error", exc)
                    return
            if n < PIPE_SIZE:
                return  # the socket is most likely drained: wait for the next wake-up

    def flush_splice(self) -> None:
        while self.pending:
            try:
                self.pending -= os.splice(self.pipe_r, self.dst_fd, self.pending, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                return
            except OSError as exc:
                self.relay.abort(f"{self.name}_dst_error", exc)
                return
        self._drained()

    # -- shared -------------------------------------------------------------------------

    def _wait_writable(self, callback: Callable[[], None]) -> None:
        """Destination is full: stop reading the source until it drains (backpressure)."""
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        if not self.writing:
            self.loop.add_writer(self.dst_fd, callback)
            self.writing = True

    def _drained(self) -> None:
        if self.writing:
            self.loop.remove_writer(self.dst_fd)
            self.writing = False
        if self.eof:
            self._forward_shutdown()
        elif not self.reading:
            self.reading = True
            self.loop.add_reader(self.src_fd, self.reader)

    def _end_of_stream(self) -> None:
        self.eof = True
        if self.reading:
            self.loop.remove_reader(self.src_fd)
            self.reading = False
        self.relay.saw_eof(self)
        if self.pending == 0 and self.backlog is None:
            self._forward_shutdown()

    def _forward_shutdown(self) -> None:
        # When the other direction is finished too, the close() that follows sends
        # the FIN: skip the shutdown syscall (one per short session).
        if not self.relay.other(self).done:
            try:
                self.dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is already gone; the other direction will notice
        self.relay.pump_done()


class Relay:
    """Relays two connected sockets; calls ``on_close(cause)`` exactly once at the end.

    The relay owns both sockets from construction on and closes them when done.
    """

    __slots__ = (
        "c2s",
        "cause",
        "client",
        "closed",
        "last_count",
        "loop",
        "on_close",
        "on_early_reset",
        "quiet_since",
        "s2c",
        "server",
        "splice",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client: socket.socket,
        server: socket.socket,
        on_close: Callable[[str], None],
        *,
        splice: bool = True,
        on_early_reset: Callable[[], None] | None = None,
    ) -> None:
        self.loop = loop
        self.client = client
        self.server = server
        self.on_close = on_close
        #: Called instead of ``on_close`` when the server resets before a single
        #: byte moved either way; the client socket is then left open for a retry.
        self.on_early_reset = on_early_reset
        self.splice = splice and HAVE_SPLICE
        self.closed = False
        self.cause = ""
        self.c2s = _Pump(self, "client", client, server)
        self.s2c = _Pump(self, "server", server, client)
        self.last_count = 0
        #: When the sweeper last saw the counters move; negative until its first pass.
        self.quiet_since = -1.0

    def start(self) -> None:
        self.c2s.resume_reading()
        self.s2c.resume_reading()

    @property
    def bytes_c2s(self) -> int:
        return self.c2s.count

    @property
    def bytes_s2c(self) -> int:
        return self.s2c.count

    def sweep(self, now: float, idle_timeout: float) -> None:
        """Close the relay if no byte moved for ``idle_timeout``; called periodically.

        Precision is one sweep interval, which is all an idle timeout of seconds
        to hours needs, and the data path pays nothing for it.
        """
        total = self.c2s.count + self.s2c.count
        if total != self.last_count or self.quiet_since < 0:
            self.last_count = total
            self.quiet_since = now
        elif now - self.quiet_since >= idle_timeout:
            # A reset, not a FIN: a server that stalled mid-response must not look
            # to the client like one that finished.
            self.close("idle_timeout", reset=True)

    def other(self, pump: _Pump) -> _Pump:
        return self.s2c if pump is self.c2s else self.c2s

    def saw_eof(self, pump: _Pump) -> None:
        if not self.cause:
            self.cause = f"{pump.name}_close"

    def pump_done(self) -> None:
        if self.c2s.done and self.s2c.done:
            self.close(self.cause or "done")

    def abort(self, where: str, exc: OSError) -> None:
        """A side failed: reset *both* connections.

        Closing the survivor with a FIN would tell it the stream ended cleanly;
        for a response delimited by the connection's end (HTTP/1.0, many HL7 and
        raw TCP feeds) that turns a truncated transfer into an apparent success.
        A reset is the only honest way to pass an abort on.
        """
        if exc.errno in _RESET_ERRNOS:
            side = where.split("_", 1)[0]
            # A failed write names the destination: a reset seen writing to the
            # server is the server's reset, not the client's.
            if where.endswith("dst_error"):
                side = "server" if side == "client" else "client"
            if side == "server" and self.on_early_reset is not None and self.c2s.count == 0 and self.s2c.count == 0:
                # The server reset before anything was exchanged (typically a
                # server dying with connections still in its accept queue).
                # Nothing was delivered either way, so another server can take
                # the session without replaying a byte: hand the client back.
                self.closed = True
                self.c2s.stop()
                self.s2c.stop()
                self.server.close()
                self.on_early_reset()
                return
            cause = f"{side}_reset"
        else:
            cause = f"{where}:{errno.errorcode.get(exc.errno or 0, exc.errno)}"
        self.close(cause, reset=True)

    def close(self, cause: str, *, reset: bool = False) -> None:
        """Stop both directions and close both sockets. Idempotent.

        ``reset`` closes with a RST instead of a FIN: for aborts, where a FIN would
        let a peer take a cut transfer for a complete one (see :meth:`abort`).
        """
        if self.closed:
            return
        self.closed = True
        if reset:
            for sock in (self.client, self.server):
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                except OSError:
                    pass
        self.c2s.stop()
        self.s2c.stop()
        self.client.close()
        self.server.close()
        self.on_close(cause)
