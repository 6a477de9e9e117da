"""``mode: dicom``: route each association by its AE titles, then relay it at TCP speed while counting.

The life of an association (one client connection, ARCHITECTURE.md's *session*):

1. **Wait for the A-ASSOCIATE-RQ**, bounded by ``dicom.artim_timeout`` (PS3.8's ARTIM) and by
   ``dicom.max_associate_pdu`` (checked from the PDU header, before any body byte is kept). Anything
   else first (an HTTP request, a TLS ClientHello on a plain port, P-DATA) gets an A-ABORT and the
   connection is closed: no server ever sees it.
2. **Admit** it (:mod:`medlb.layers.dicom`): source network, calling and called AE titles. A refusal is
   an A-ASSOCIATE-RJ with the reason the standard names, and no server connection is opened.
3. **Choose and connect** a server of the routed backend (``balance: source`` hashes the calling AE
   title by default), retrying and redispatching failed connects, and servers that close or abort
   before answering, until ``dicom.association_timeout``. The RQ goes out readdressed to the server's
   ``ae_title`` (and ``dicom.calling_ae``), without the asynchronous operations window unless
   ``dicom.async_ops``. Nothing reached: a transient A-ASSOCIATE-RJ, quickly, never a hang.
4. **Answer**: the server's A-ASSOCIATE-AC goes to the client with the client's own AE titles put
   back (PS3.8 Table 9-17: the AC echoes the RQ). A server's A-ASSOCIATE-RJ is passed through.
5. **Relay** both ways as bytes arrive (``TCP_NODELAY``, one write per read, no re-framing), with an
   :class:`~medlb.proto.dicom_tap.AssociationTap` per direction counting DIMSE commands and statuses.
6. **End**: after a release both sides close. If the server dies mid-association the client gets an
   A-ABORT at once (never a silent hang, never a false success) and the server is re-checked at once;
   if the client vanishes the server gets the A-ABORT. One log line per association.

Asyncio protocols on uvloop transports (as for ``mode: http``): the same code serves plain TCP and
DICOM TLS on either side.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from medlb.errors import DicomProtocolError
from medlb.io.tls import AcceptedSession, ClientTls, ServerTls
from medlb.layers.dicom import NO_SERVER, SERVERS_FAILED, DicomPolicy, Reject
from medlb.model.server import Server
from medlb.proto.dicom_dimse import StatusCategory
from medlb.proto.dicom_pdu import (
    AbortSource,
    AssociateRQ,
    PduReader,
    PduType,
    RawPdu,
    abort,
    associate_rj,
    decode_body,
    read_ae_titles,
    replace_ae_titles,
    restore_ae_titles,
    with_async_ops_window,
)
from medlb.proto.dicom_tap import ABORT, RELEASE_RP, RELEASE_RQ, AssociationTap, TapEvents

if TYPE_CHECKING:
    from medlb.io.frontend import Frontend
    from medlb.model.backend import Backend

log = logging.getLogger("medlb.dicom")

#: An A-ABORT from medlb itself (service provider, reason not specified).
ABORT_PDU = abort().encode()


@dataclass(frozen=True, slots=True)
class DicomSettings:
    """The resolved ``dicom:`` section of a frontend."""

    policy: DicomPolicy = field(default_factory=DicomPolicy)
    artim_timeout: float = 10.0
    association_timeout: float = 25.0
    answer_timeout: float = 5.0
    max_associate_pdu: int = 65536
    calling_ae: str | None = None
    async_ops: bool = False
    hash_calling_ae: bool = True
    tls: ServerTls | None = None


def _rj_pdu(reject: Reject) -> bytes:
    return associate_rj(reject.result, reject.source, reject.reason).encode()


def _certificate_cn(peercert: dict[str, object] | None) -> str | None:
    if not peercert:
        return None
    subject = peercert.get("subject", ())
    assert isinstance(subject, tuple)
    for rdn in subject:
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


class _ServerSide(asyncio.Protocol):
    """The connection to the chosen server; everything it sees goes to its session."""

    def __init__(self, session: DicomSession, server: Server) -> None:
        self.session = session
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.session.server_side is self:
            self.session.from_server(data)

    def eof_received(self) -> bool | None:
        if self.session.server_side is self:
            self.session.server_gone("server_close")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.session.server_side is self:
            self.session.server_gone("server_reset" if exc else "server_close")

    def pause_writing(self) -> None:
        self.session.pause_client()

    def resume_writing(self) -> None:
        self.session.resume_client()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


# Session phases.
_ARTIM = 0  # waiting for the A-ASSOCIATE-RQ
_CHOOSING = 1  # connecting to servers, waiting for their answer
_RELAY = 2  # established: bytes flow both ways
_DONE = 3


class DicomSession(AcceptedSession):
    """One client association. Also the frontend's session object (``start``, ``abort``, ``server``...)."""

    log_label = "dicom"
    session_log = log
    frontend: Frontend
    settings: DicomSettings

    #: Not a byte relay for the frontend's idle sweeper: the session keeps its own idle timer.
    relay = None

    def __init__(self, frontend: Frontend, sock: socket.socket, addr: tuple[str, int]) -> None:
        self.frontend = frontend
        settings = frontend.dicom
        assert settings is not None
        self.settings = settings
        self.backend: Backend = frontend.backend
        self.loop = frontend.loop
        self.sock: socket.socket | None = sock
        self.client_ip, self.client_port = addr[0], addr[1]
        self.transport: asyncio.Transport | None = None
        self.reader: PduReader | None = PduReader(settings.max_associate_pdu, expect_associate_rq=True)
        self.phase = _ARTIM
        self.rq: RawPdu | None = None
        self.upstream_rq = b""
        self.calling = self.called = ""
        self.server: Server | None = None
        self.server_side: _ServerSide | None = None
        self.server_reader: PduReader | None = None
        self.excluded: list[Server] = []
        self.attempts = 0
        self.key: bytes | None = None
        self.deadline = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.answer_timer: asyncio.TimerHandle | None = None
        self.tap_in = AssociationTap()  # client -> server
        self.tap_out = AssociationTap()  # server -> client
        self.commands: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.bytes_in = 0
        self.bytes_out = 0
        self.released = False
        self.release_requested = False
        self.started = self.loop.time()
        self.t_established = -1.0
        self.quiet_since = 0.0
        self.active = False
        self.cause = ""
        self._ended = False

    # -- start --------------------------------------------------------------------------

    def tls_failed(self) -> None:
        self._finish("tls_handshake_failed")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._arm(self.settings.artim_timeout)

    # -- timers -------------------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        phase = self.phase
        if phase == _ARTIM:
            self._protocol_abort("artim_timeout", "no A-ASSOCIATE-RQ in time")
        elif phase == _CHOOSING:
            self._give_up(SERVERS_FAILED, "association_timeout")
        elif phase == _RELAY and self.released and self.server_side is None:
            self._end("released")  # the client never closed after its release: ARTIM expired
        elif phase == _RELAY:
            # The tick only samples ``active`` (the hot path just sets a flag), so idleness is
            # measured from the last tick that saw traffic: an association is aborted between one
            # idle timeout and one tick after it (docs/configuration.md), never after a single
            # quiet tick. An idle timeout of 0 means none, as for the other modes' sweeper.
            now = self.loop.time()
            idle = self.frontend.idle_timeout
            if self.active:
                self.active = False
                self.quiet_since = now
            elif idle > 0 and now - self.quiet_since >= idle:
                self.abort("idle_timeout")
                return
            self._arm(self._idle_check_interval())

    def _idle_check_interval(self) -> float:
        """Idle associations are aborted after the idle timeout; checked in quarters of it."""
        return max(self.frontend.idle_timeout / 4, 0.05)

    # -- client side --------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == _RELAY:
            self.active = True
            self.bytes_in += len(data)
            try:
                events = self.tap_in.feed(data)
            except DicomProtocolError as exc:
                self._relay_protocol_error("client", exc)
                return
            side = self.server_side
            if side is not None:
                side.write(data)
            if events is not None:
                self._count(events, from_client=True)
            return
        if phase == _ARTIM:
            reader = self.reader
            assert reader is not None
            try:
                pdus = reader.feed(data)
            except DicomProtocolError as exc:
                self._protocol_abort("bad_pdu", str(exc))
                return
            if not pdus:
                return
            if len(pdus) > 1 or not reader.at_boundary:
                self._protocol_abort("bad_pdu", "data after the A-ASSOCIATE-RQ before its answer")
                return
            self._on_rq(pdus[0])
            return
        if phase == _CHOOSING:
            # PS3.8: nothing may follow the RQ before the AC; never buffer a client that talks anyway.
            self._protocol_abort("bad_pdu", "data after the A-ASSOCIATE-RQ before its answer")

    def eof_received(self) -> bool | None:
        if self.phase == _RELAY and self.server_side is not None:
            # A half-close after a release is normal; before it, the association is being abandoned.
            if self.released or self.release_requested:
                if self.server_side.transport is not None and self.server_side.transport.can_write_eof():
                    self.server_side.transport.write_eof()
                return True if self.settings.tls is None else None
            self._client_gone("client_close")
            return None
        self._client_gone("client_close")
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.phase != _DONE:
            self._client_gone("client_reset" if exc else "client_close")

    def pause_writing(self) -> None:
        side = self.server_side
        if side is not None and side.transport is not None:
            side.transport.pause_reading()

    def resume_writing(self) -> None:
        side = self.server_side
        if side is not None and side.transport is not None and not side.closed:
            side.transport.resume_reading()

    def pause_client(self) -> None:
        if self.transport is not None and self.phase == _RELAY:
            self.transport.pause_reading()

    def resume_client(self) -> None:
        if self.transport is not None and self.phase == _RELAY:
            self.transport.resume_reading()

    # -- association request --------------------------------------------------------------

    def _on_rq(self, raw: RawPdu) -> None:
        try:
            rq = decode_body(raw.pdu_type, raw.body)
            called, calling = read_ae_titles(raw.body)
        except DicomProtocolError as exc:
            self._protocol_abort("bad_rq", str(exc), reject=exc.reject)
            return
        assert isinstance(rq, AssociateRQ)
        self.rq = raw
        self.called, self.calling = called, calling
        cn = None
        if self.settings.tls is not None and self.transport is not None:
            cn = _certificate_cn(self.transport.get_extra_info("peercert"))
        verdict = self.settings.policy.admit(calling, called, self.client_ip, cn)
        if verdict.reject is not None:
            self._reject(verdict.reject, "rejected")
            return
        if verdict.backend is not None:
            routed = self.frontend.backends.get(verdict.backend)
            if routed is None:  # removed by a reload between config and association
                self._reject(NO_SERVER, f"backend {verdict.backend} is not configured")
                return
            self._move_to(routed)
        try:
            # Only a request that offers the window is re-encoded; any other goes out byte for byte.
            strip = not self.settings.async_ops and rq.user_information.async_ops_window is not None
            body = with_async_ops_window(rq, None).encode_body() if strip else raw.body
        except DicomProtocolError as exc:
            self._protocol_abort("bad_rq", str(exc), reject=exc.reject)
            return
        self.upstream_rq = body
        if self.backend.balancer.needs_key:
            self.key = calling.encode("latin-1") if self.settings.hash_calling_ae else self.client_ip.encode()
        self.phase = _CHOOSING
        self.deadline = self.loop.time() + self.settings.association_timeout
        self._arm(self.settings.association_timeout)
        if self.transport is not None:
            self.transport.pause_reading()  # nothing may come before the answer; do not read it
        self._try_next(first=True)

    def _move_to(self, backend: Backend) -> None:
        """A rule routed the association elsewhere: its session counts there from now on."""
        if backend is self.backend:
            return
        self.backend.cur_sessions -= 1
        backend.cur_sessions += 1
        backend.total_sessions += 1
        self.backend = backend

    def _try_next(self, *, first: bool = False) -> None:
        backend = self.backend
        if not first and self.attempts > backend.policy.retries:
            self._give_up(SERVERS_FAILED, "servers_failed")
            return
        exclude = self.excluded if backend.policy.redispatch else ()
        server = backend.select(self.key, exclude)
        if server is None and self.excluded and backend.policy.redispatch:
            server = backend.select(self.key)  # every server failed once: try again rather than refuse
        if server is None:
            if first:
                backend.no_server += 1
            self._give_up(NO_SERVER if first else SERVERS_FAILED, "no_server" if first else "servers_failed")
            return
        self.server = server
        self.attempts += 1
        self.connect_task = self.loop.create_task(self._connect(server))

    async def _connect(self, server: Server) -> None:
        tls: ClientTls | None = self.frontend.backend_tls.get(self.backend.name)
        side = _ServerSide(self, server)
        try:
            if server.sockaddr is None:
                raise OSError("unresolved")
            family, addr = server.sockaddr
            timeout = min(self.frontend.timeouts.connect, max(self.deadline - self.loop.time(), 0.001))
            async with asyncio.timeout(timeout):
                if tls is None:
                    await self.loop.create_connection(lambda: side, addr[0], addr[1], family=family)
                else:
                    await self.loop.create_connection(
                        lambda: side,
                        addr[0],
                        addr[1],
                        family=family,
                        ssl=tls.context,
                        server_hostname=tls.sni or server.address.host,
                    )
                    ssl_object = side.transport.get_extra_info("ssl_object") if side.transport else None
                    if tls.pins and not tls.pinned_ok(ssl_object.getpeercert(True) if ssl_object else None):
                        side.abort()
                        raise OSError("certificate_pin_mismatch")
        except TimeoutError:
            self.connect_task = None
            self._connect_failed(server, "connect_timeout")
            return
        except OSError as exc:
            self.connect_task = None
            self._connect_failed(server, str(getattr(exc, "reason", None) or exc.strerror or exc))
            return
        self.connect_task = None
        if self.phase != _CHOOSING:  # the client left meanwhile
            side.abort()
            self._release_server()
            return
        self.frontend.observer.report_connect_ok(server)
        self.server_side = side
        self.server_reader = PduReader(self.settings.max_associate_pdu, expect_associate_rq=False)
        ae_title = server.ae_title
        body = self.upstream_rq
        if ae_title is not None or self.settings.calling_ae is not None:
            body = replace_ae_titles(body, called=ae_title, calling=self.settings.calling_ae)
        rq = self.rq
        assert rq is not None
        side.write(RawPdu(PduType.ASSOCIATE_RQ, body, rq.reserved).encode())
        # A server that took the connection but does not answer (hung, or busy with another
        # association) must not hold the client until association_timeout: try the next one.
        wait = min(self.settings.answer_timeout, max(self.deadline - self.loop.time(), 0.001))
        self.answer_timer = self.loop.call_later(wait, self._no_answer, side)

    def _no_answer(self, side: _ServerSide) -> None:
        self.answer_timer = None
        server = self.server
        if self.phase != _CHOOSING or self.server_side is not side or server is None:
            return
        log.info("server %s did not answer the association in %.1fs", server.key, self.settings.answer_timeout)
        self.frontend.observer.report_connect_error(server)
        self._drop_server_side()
        self._server_failed(server)

    def _connect_failed(self, server: Server, reason: str) -> None:
        server.connect_errors += 1
        self.backend.connect_errors += 1
        self.frontend.observer.report_connect_error(server)
        log.info("connect to %s failed: %s (attempt %d)", server.key, reason, self.attempts)
        self._server_failed(server)

    def _server_failed(self, server: Server) -> None:
        """This server will not serve the association: try another one, if time allows."""
        self._cancel_answer_timer()
        self._release_server()
        if self.phase != _CHOOSING:
            return
        server.retries += 1
        self.excluded.append(server)
        self._try_next()

    def _cancel_answer_timer(self) -> None:
        if self.answer_timer is not None:
            self.answer_timer.cancel()
            self.answer_timer = None

    def _release_server(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            self.backend.release(server)

    # -- the server's answer -----------------------------------------------------------------

    def from_server(self, data: bytes) -> None:
        if self.phase == _RELAY:
            self.active = True
            self.bytes_out += len(data)
            try:
                events = self.tap_out.feed(data)
            except DicomProtocolError as exc:
                self._relay_protocol_error("server", exc)
                return
            if self.transport is not None:
                self.transport.write(data)
            if events is not None:
                self._count(events, from_client=False)
                if self.released and self.release_requested and self.tap_out.at_boundary:
                    self._server_released()
            return
        if self.phase != _CHOOSING:
            return
        reader = self.server_reader
        server = self.server
        assert reader is not None and server is not None
        try:
            pdus = reader.feed(data)
        except DicomProtocolError as exc:
            log.info("server %s answered the association with garbage: %s", server.key, exc)
            self._drop_server_side()
            self._server_failed(server)
            return
        if not pdus:
            return
        answer = pdus[0]
        if answer.pdu_type == PduType.ASSOCIATE_AC:
            self._established(answer, pdus[1:], reader)
        elif answer.pdu_type == PduType.ASSOCIATE_RJ:
            self._server_rejected(answer)
        else:
            log.info("server %s answered the association with PDU type 0x%02x", server.key, answer.pdu_type)
            self._drop_server_side()
            self._server_failed(server)

    def _established(self, ac: RawPdu, more: list[RawPdu], reader: PduReader) -> None:
        self._cancel_answer_timer()
        rq = self.rq
        assert rq is not None and self.transport is not None
        try:
            body = restore_ae_titles(ac.body, rq.body)
        except DicomProtocolError as exc:
            server = self.server
            assert server is not None
            log.info("server %s sent a bad A-ASSOCIATE-AC: %s", server.key, exc)
            self._drop_server_side()
            self._server_failed(server)
            return
        self.phase = _RELAY
        self.t_established = self.quiet_since = self.loop.time()
        self.server_reader = None
        out = RawPdu(PduType.ASSOCIATE_AC, body, ac.reserved).encode()
        # PDUs the server sent right behind its AC (rare) are relayed like any other.
        tail = b"".join(p.encode() for p in more)
        if not reader.at_boundary:
            self._relay_protocol_error("server", DicomProtocolError("a partial PDU right behind the AC"))
            return
        self.transport.write(out)
        if tail:
            self.from_server(tail)
        if self.frontend.idle_timeout > 0:
            self._arm(self._idle_check_interval())
        elif self.timer is not None:  # no idle timeout: only the association timer to stop
            self.timer.cancel()
            self.timer = None
        self.transport.resume_reading()

    def _server_rejected(self, rj: RawPdu) -> None:
        self._cancel_answer_timer()
        server = self.server
        assert server is not None and self.transport is not None
        rj_pdu = rj.encode()
        detail = "-"
        if len(rj.body) >= 4:
            detail = f"result={rj.body[1]} source={rj.body[2]} reason={rj.body[3]}"
        log.info("server %s rejected the association: %s", server.key, detail)
        self.transport.write(rj_pdu)
        self._end("server_rejected " + detail)

    # -- relay bookkeeping ---------------------------------------------------------------------

    def _count(self, events: TapEvents, *, from_client: bool) -> None:
        """Count what the taps saw, per association (the log line) and per server (status, metrics)."""
        server = self.server
        for command in events.commands:
            if command.is_response:
                category = command.status_category
                if category is not None and category is not StatusCategory.PENDING:
                    status = category.name.lower()
                    self.statuses[status] += 1
                    if server is not None:
                        server.dimse_responses[status] = server.dimse_responses.get(status, 0) + 1
            else:
                name = command.name
                self.commands[name] += 1
                if server is not None:
                    server.dimse_requests[name] = server.dimse_requests.get(name, 0) + 1
        for pdu_type in events.control:
            if pdu_type == RELEASE_RQ:
                self.release_requested = True
            elif pdu_type == RELEASE_RP:
                self.released = True
            elif pdu_type == ABORT:
                self.cause = "client_abort" if from_client else "server_abort"

    def _server_released(self) -> None:
        """The server answered the client's A-RELEASE-RQ: close the server connection now.

        PS3.8 (AR-3): the requestor of the release closes the transport once it has the
        A-RELEASE-RP. medlb is the requestor on the server's leg, so it closes at once rather
        than after the client's own close travels through: an archive that serves one
        association at a time (DCMTK storescp) is free for the next one two hops earlier.
        """
        side, self.server_side = self.server_side, None
        if side is not None:
            side.close()
        # The client closes next (it requested the release); ARTIM bounds the wait (AR-4 / Sta13).
        self._arm(self.settings.artim_timeout)

    def _relay_protocol_error(self, side: str, exc: DicomProtocolError) -> None:
        log.info("dicom client=%s:%d %s broke the protocol: %s", self.client_ip, self.client_port, side, exc)
        self.abort(f"{side}_protocol_error")

    # -- ends ----------------------------------------------------------------------------------

    def server_gone(self, cause: str) -> None:
        """The server side closed or reset."""
        side = self.server_side
        self.server_side = None
        if self.phase == _CHOOSING:
            server = self.server
            assert server is not None
            log.info("server %s closed before answering the association", server.key)
            if side is not None:
                side.abort()
            self._server_failed(server)
            return
        if self.phase != _RELAY:
            return
        if side is not None:
            side.close()
        if self.released or self.cause:
            self._end(self.cause or "released")
            return
        # Mid-association: the client must learn at once that nothing more will be answered.
        server = self.server
        if server is not None:
            self.frontend.observer.report_connect_error(server)
        if self.transport is not None and self.tap_out.at_boundary:
            self.transport.write(ABORT_PDU)
            self._end(cause + "_aborted")
        else:
            self._end(cause + "_cut", reset=True)

    def _client_gone(self, cause: str) -> None:
        if self.phase == _DONE:
            return
        side = self.server_side
        if self.phase == _RELAY and side is not None and not (self.released or self.cause):
            if self.tap_in.at_boundary:
                side.write(ABORT_PDU)  # the archive must not keep a half-done association open
            side.close()
        elif side is not None:
            side.abort()
        self.server_side = None
        self._end(self.cause or ("released" if self.released else cause), client_gone=True)

    def _drop_server_side(self) -> None:
        side, self.server_side = self.server_side, None
        if side is not None:
            side.abort()

    def _reject(self, reject: Reject, cause: str) -> None:
        log.info(
            "dicom client=%s:%d frontend=%s calling=%s called=%s %s: %s (result=%d source=%d reason=%d)",
            self.client_ip,
            self.client_port,
            self.frontend.name,
            self.calling,
            self.called,
            cause,
            reject.why,
            reject.result,
            reject.source,
            reject.reason,
        )
        if self.transport is not None:
            self.transport.write(_rj_pdu(reject))
        self._end(f"{cause}:{reject.why.replace(' ', '_')}")

    def _give_up(self, reject: Reject, cause: str) -> None:
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        self._drop_server_side()
        self._release_server()
        self._reject(reject, cause)

    def _protocol_abort(self, cause: str, detail: str, reject: tuple[int, int, int] | None = None) -> None:
        log.info(
            "dicom client=%s:%d frontend=%s %s: %s", self.client_ip, self.client_port, self.frontend.name, cause, detail
        )
        if self.transport is not None:
            if reject is not None:
                self.transport.write(associate_rj(*reject).encode())
            else:
                self.transport.write(ABORT_PDU)
        self._end(cause)

    def abort(self, cause: str = "aborted") -> None:
        """Stop now (hard stop, ``shutdown-sessions``, idle): an A-ABORT to each side, never a silent cut."""
        if self.phase == _DONE:
            return
        if self.transport is None:
            if self.sock is not None:
                self.sock.close()
                self.sock = None
            self._finish(cause)
            return
        if self.connect_task is not None:
            self.connect_task.cancel()
            self.connect_task = None
        side, self.server_side = self.server_side, None
        if side is not None:
            if self.phase == _RELAY and self.tap_in.at_boundary:
                side.write(ABORT_PDU)
                side.close()
            else:
                side.abort()
        if (self.phase == _RELAY and self.tap_out.at_boundary) or self.phase == _ARTIM:
            self.transport.write(ABORT_PDU)
            self._end(cause)
        elif self.phase == _CHOOSING:
            self._release_server()
            self.transport.write(_rj_pdu(SERVERS_FAILED))
            self._end(cause)
        else:
            self._end(cause, reset=True)

    def drain(self) -> None:
        """Graceful stop: associations finish on their own (a C-STORE must never be cut)."""

    def _end(self, cause: str, *, reset: bool = False, client_gone: bool = False) -> None:
        if self.phase == _DONE:
            return
        self.phase = _DONE
        self._cancel_answer_timer()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        side, self.server_side = self.server_side, None
        if side is not None:
            side.close()
        transport = self.transport
        if transport is not None and not client_gone:
            if reset:
                transport.abort()
            else:
                transport.close()
        self._release_server_counters()
        self._finish(cause)

    def _release_server_counters(self) -> None:
        server, self.server = self.server, None
        if server is not None:
            server.bytes_in += self.bytes_in
            server.bytes_out += self.bytes_out
            self.backend.release(server)
            self._logged_server = server.name
            self._logged_server_ae = server.ae_title

    def _finish(self, cause: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.phase = _DONE
        self.frontend.session_ended(self)
        if self.frontend.log_sessions and log.isEnabledFor(logging.INFO):
            commands = " ".join(f"{k}={v}" for k, v in sorted(self.commands.items())) or "-"
            statuses = " ".join(f"{k}={v}" for k, v in sorted(self.statuses.items())) or "-"
            now = self.loop.time()
            log.info(
                "dicom client=%s:%d frontend=%s backend=%s server=%s calling=%s called=%s server_ae=%s "
                "established_ms=%s duration_s=%.3f bytes_in=%d bytes_out=%d attempts=%d commands=[%s] "
                "responses=[%s] term=%s",
                self.client_ip,
                self.client_port,
                self.frontend.name,
                self.backend.name,
                getattr(self, "_logged_server", "-"),
                self.calling or "-",
                self.called or "-",
                getattr(self, "_logged_server_ae", None) or self.called or "-",
                f"{(self.t_established - self.started) * 1000:.1f}" if self.t_established >= 0 else "-",
                now - self.started,
                self.bytes_in,
                self.bytes_out,
                self.attempts,
                commands,
                statuses,
                cause,
            )


__all__ = ["ABORT_PDU", "AbortSource", "DicomSession", "DicomSettings"]
