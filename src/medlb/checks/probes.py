"""In-process health probes: one TCP connect or one HTTP(S) exchange, as a verdict.

Why in-process: a load balancer in front of a hospital's PACS checks dozens of
servers every couple of seconds; a process (or a thread) per check would cost
more than the traffic it protects. Each probe here is one coroutine on the
worker's event loop.

Contract of every probe:

- the *whole* probe (resolution, connect, TLS handshake, request, response) is
  bounded by one ``timeout``, enforced with :func:`asyncio.timeout`;
- the socket is closed in ``finally``, whatever happened;
- the result is a :class:`ProbeResult` with a short text an operator can read in
  a status page ("L4OK in 1ms", "connection refused", "HTTP 503 (expected
  200-399)", "timeout after 2s"); a probe never raises, except
  :class:`asyncio.CancelledError`, which always propagates.

The HTTP response is read into a bounded buffer (64 KiB) and parsed by the pure
function :func:`parse_http_response`, which is unit tested on its own.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
import secrets
import socket
import ssl
import time
from dataclasses import dataclass

from medlb.errors import DicomProtocolError, Hl7ProtocolError
from medlb.proto import dicom_dimse, dicom_pdu, hl7, mllp

__all__ = [
    "MAX_HTTP_RESPONSE",
    "ProbeResult",
    "describe_error",
    "dicom_echo_probe",
    "format_duration",
    "hl7_probe",
    "http_probe",
    "http_response_complete",
    "parse_http_response",
    "tcp_probe",
]

#: Most bytes of an HTTP check response we read. A health page is small; a
#: server that answers a check with a DICOM study must not make us buffer it.
MAX_HTTP_RESPONSE = 64 * 1024

#: Longest error text kept in a result (status pages show one line).
_MAX_TEXT = 200


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """The verdict of one probe: ``ok`` and a short text for humans."""

    ok: bool
    text: str


# -- text helpers -------------------------------------------------------------------


def format_duration(seconds: float) -> str:
    """``0.0123`` -> ``"12ms"``, ``2.0`` -> ``"2s"``, ``2.5`` -> ``"2.5s"``."""
    if seconds < 1.0:
        return f"{max(round(seconds * 1000), 0)}ms"
    return f"{seconds:.3g}s"


_ERRNO_TEXT = {
    ConnectionRefusedError: "connection refused",
    ConnectionResetError: "connection reset by peer",
    ConnectionAbortedError: "connection aborted",
    BrokenPipeError: "connection closed by peer",
}


def describe_error(exc: BaseException) -> str:
    """One short lower-case line for a probe failure (no traceback, no repr noise)."""
    for kind, text in _ERRNO_TEXT.items():
        if isinstance(exc, kind):
            return text
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve host: {exc.strerror or exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message or exc.reason or exc}"[:_MAX_TEXT]
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"[:_MAX_TEXT]
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed by peer"
    if isinstance(exc, OSError):
        # asyncio joins the errors of several addresses into one OSError without errno.
        text = exc.strerror or str(exc) or type(exc).__name__
        return text[:1].lower() + text[1:_MAX_TEXT]
    text = str(exc)
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:_MAX_TEXT]


def _timeout_text(timeout: float) -> str:
    return f"timeout after {format_duration(timeout)}"


def _close(writer: asyncio.StreamWriter | None, *, tls: bool = False) -> None:
    """Close without waiting: a probe's verdict must not wait for the peer's FIN.

    TLS is aborted rather than closed: an orderly close waits for the peer's
    close_notify (up to 30 s in asyncio), which would keep a socket per check
    alive for nothing.
    """
    if writer is None:
        return
    if tls:
        writer.transport.abort()
    else:
        writer.close()


# -- TCP ------------------------------------------------------------------------


async def tcp_probe(host: str, port: int, timeout: float) -> ProbeResult:  # noqa: ASYNC109 - the deadline is part of the verdict
    """Layer-4 check: connect, then close. OK means the server accepts connections."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
        return ProbeResult(True, f"L4OK in {format_duration(loop.time() - start)}")
    except TimeoutError:
        return ProbeResult(False, _timeout_text(timeout))
    except Exception as exc:
        return ProbeResult(False, describe_error(exc))
    finally:
        _close(writer)


# -- HTTP response parsing (pure) ---------------------------------------------------

_STATUS_LINE = re.compile(rb"HTTP/1\.[0-9] ([1-5][0-9][0-9])(?:[ \t][^\r\n]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


@dataclass(frozen=True, slots=True)
class _Parsed:
    status: int
    body: bytes
    complete: bool


def _head_end(data: bytes, start: int) -> tuple[int, int] | None:
    """(end of head, start of body); accepts bare LF line ends like most clients."""
    crlf = data.find(b"\r\n\r\n", start)
    lf = data.find(b"\n\n", start)
    candidates = [(crlf, crlf + 4)] if crlf >= 0 else []
    if lf >= 0:
        candidates.append((lf, lf + 2))
    return min(candidates) if candidates else None


def _dechunk(data: bytes) -> tuple[bytes, bool]:
    """Decode a chunked body as far as ``data`` goes; (body, saw the last chunk).

    Only slices what is present: an announced chunk size never allocates.
    """
    out = bytearray()
    pos = 0
    while True:
        eol = data.find(b"\n", pos)
        if eol < 0:
            return bytes(out), False
        size_text = data[pos:eol].rstrip(b"\r").split(b";", 1)[0].strip(b" \t")
        if not _HEX.fullmatch(size_text):
            raise ValueError("malformed chunk size")
        size = int(size_text, 16)
        pos = eol + 1
        if size == 0:
            return bytes(out), True  # trailers, if any, do not matter to a check
        chunk = data[pos : pos + size]
        out += chunk
        if len(chunk) < size:
            return bytes(out), False
        pos += size
        if data.startswith(b"\r\n", pos):
            pos += 2
        elif data.startswith(b"\n", pos):
            pos += 1
        elif pos < len(data):
            raise ValueError("missing CRLF after chunk")


def _parse(data: bytes, head_request: bool = False) -> _Parsed | None:
    """Parse a response; None while the head is incomplete; ValueError when malformed."""
    start = 0
    while True:
        if not data.startswith(b"HTTP/"[: len(data) - start], start):
            raise ValueError("not an HTTP response")
        bounds = _head_end(data, start)
        if bounds is None:
            return None
        head_end, body_start = bounds
        lines = data[start:head_end].split(b"\n")
        status_line = lines[0].rstrip(b"\r")
        match = _STATUS_LINE.fullmatch(status_line)
        if match is None:
            raise ValueError(f"malformed status line {status_line[:60]!r}")
        status = int(match.group(1))
        if 100 <= status < 200 and status != 101:
            start = body_start  # interim response (100 Continue, 103 Early Hints): skip
            continue
        length: int | None = None
        chunked = False
        for raw in lines[1:]:
            line = raw.rstrip(b"\r")
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise ValueError(f"malformed header line {line[:60]!r}")
            key = name.lower()
            if key == b"content-length":
                text = value.strip()
                if not text.isdigit() or len(text) > 18:
                    raise ValueError("malformed Content-Length")
                length = int(text)
            elif key == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
        rest = data[body_start:]
        if head_request or status in (101, 204, 304):
            return _Parsed(status, b"", True)
        if chunked:
            body, complete = _dechunk(rest)
            return _Parsed(status, body, complete)
        if length is not None:
            return _Parsed(status, rest[:length], len(rest) >= length)
        return _Parsed(status, rest, False)  # delimited by close


def parse_http_response(data: bytes) -> tuple[int, bytes]:
    """Status code and body of an HTTP/1.x response held (possibly truncated) in ``data``.

    Lenient where real servers are sloppy (bare LF line ends, a missing reason
    phrase, a truncated body: the body is what arrived); strict about what the
    verdict depends on: a response that is not HTTP, a malformed status line or
    header, or a head that never ended raises :class:`ValueError`. Interim 1xx
    responses are skipped; a chunked body is decoded; ``Content-Length`` trims
    trailing bytes.
    """
    parsed = _parse(data)
    if parsed is None:
        raise ValueError("incomplete response head")
    return parsed.status, parsed.body


def http_response_complete(data: bytes, *, head_request: bool = False, need_body: bool = True) -> bool:
    """True when reading more cannot change the verdict on ``data``.

    Lets the probe stop at the end of a response even if the server ignores
    ``Connection: close``, and stop after the head when the body does not matter.
    A malformed response is "complete": more bytes would not repair it.
    """
    try:
        parsed = _parse(data, head_request)
    except ValueError:
        return True
    if parsed is None:
        return False
    return parsed.complete or not need_body


# -- HTTP probe -------------------------------------------------------------------


@functools.cache
def _tls_context(verify: bool) -> ssl.SSLContext:
    """One client context per verification mode (loading the CA store costs ms)."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        # A check proves the service answers; most imaging servers use private CAs.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _default_host_header(host: str, port: int, tls: bool) -> str:
    name = f"[{host}]" if ":" in host else host
    return name if port == (443 if tls else 80) else f"{name}:{port}"


def _sni_from_host_header(host_header: str) -> str | None:
    """The name to send in SNI (and verify against): the Host header without its port."""
    if host_header.startswith("["):
        return None  # an IPv6 literal: no SNI
    name, sep, port = host_header.rpartition(":")
    if not sep or not port.isdigit():
        name = host_header
    return None if not name or _is_ip(name) else name


def _expected_text(expect_status: tuple[int, ...] | None) -> str:
    if expect_status is None:
        return "200-399"
    shown = ", ".join(str(code) for code in expect_status[:6])
    return shown + (", ..." if len(expect_status) > 6 else "")


async def http_probe(
    host: str,
    port: int,
    *,
    tls: bool = False,
    method: str = "GET",
    path: str = "/",
    host_header: str | None = None,
    expect_status: tuple[int, ...] | None = None,
    expect_body: str | None = None,
    timeout: float = 2.0,  # noqa: ASYNC109 - the deadline is part of the verdict
    tls_verify: bool = False,
) -> ProbeResult:
    """Layer-7 check: one HTTP/1.1 request with ``Connection: close``.

    OK when the status is in ``expect_status`` (any 2xx/3xx when None, as
    HAProxy's ``option httpchk``) and, if ``expect_body`` is set, the first
    64 KiB of the body contain it. ``host_header`` also names the TLS server
    (SNI, and the name verified when ``tls_verify``).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    if host_header is None:
        host_header = _default_host_header(host, port, tls)
    request = (
        f"{method} {path} HTTP/1.1\r\n"
        f"Host: {host_header}\r\n"
        "User-Agent: medlb-check\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("latin-1", "replace")
    head_request = method == "HEAD"
    need_body = expect_body is not None
    writer: asyncio.StreamWriter | None = None
    data = bytearray()
    try:
        async with asyncio.timeout(timeout):
            if tls:
                # SNI from the Host header; with no name, verify against the address itself
                # (None: asyncio uses ``host``) or, unverified, send no SNI at all ("").
                sni = _sni_from_host_header(host_header)
                if sni is None:
                    sni = None if tls_verify else ""
                reader, writer = await asyncio.open_connection(
                    host, port, ssl=_tls_context(tls_verify), server_hostname=sni
                )
            else:
                reader, writer = await asyncio.open_connection(host, port)
            writer.write(request)
            await writer.drain()
            while len(data) < MAX_HTTP_RESPONSE:
                chunk = await reader.read(MAX_HTTP_RESPONSE - len(data))
                if not chunk:
                    break
                data += chunk
                if http_response_complete(bytes(data), head_request=head_request, need_body=need_body):
                    break
    except TimeoutError:
        return ProbeResult(False, _timeout_text(timeout))
    except Exception as exc:
        return ProbeResult(False, describe_error(exc))
    finally:
        _close(writer, tls=tls)

    elapsed = format_duration(loop.time() - start)
    if not data:
        return ProbeResult(False, "empty response")
    try:
        parsed = _parse(bytes(data), head_request)
        if parsed is None:
            raise ValueError("incomplete response head")
    except ValueError as exc:
        return ProbeResult(False, f"invalid HTTP response: {exc}")
    status = parsed.status
    status_ok = 200 <= status < 400 if expect_status is None else status in expect_status
    if not status_ok:
        return ProbeResult(False, f"HTTP {status} (expected {_expected_text(expect_status)})")
    if expect_body is not None and expect_body.encode("utf-8") not in parsed.body:
        return ProbeResult(False, f"HTTP {status} but body lacks {expect_body[:40]!r}")
    return ProbeResult(True, f"L7OK HTTP {status} in {elapsed}")


# -- DICOM C-ECHO ------------------------------------------------------------------------------

#: Reasons of an A-ASSOCIATE-RJ a check reports as a configuration error rather than an outage.
_RJ_TEXT = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognised (check.calling_ae)",
    (1, 7): "called AE title not recognised (check.called_ae or the server's ae_title)",
    (2, 1): "no reason given (ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}


async def _read_pdu(reader: asyncio.StreamReader, limit: int) -> tuple[int, bytes]:
    """One PDU from a health check peer; the announced length is checked before reading the body."""
    head = await reader.readexactly(6)
    pdu_type, length = head[0], int.from_bytes(head[2:6], "big")
    dicom_pdu.check_header(pdu_type, length, limit)
    return pdu_type, await reader.readexactly(length)


async def dicom_echo_probe(
    host: str,
    port: int,
    *,
    calling_ae: str,
    called_ae: str,
    timeout: float,  # noqa: ASYNC109 - the deadline is part of the verdict
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ProbeResult:
    """Associate (Verification SOP class), C-ECHO, release: the DICOM-level health check.

    Distinct verdicts, because they call for different actions: success; an association rejected
    (a wrong called or calling AE title is a *configuration* error, and says so); no answer in
    time; connection refused; a C-ECHO answered with a failure status. In process, through
    medlb's own codec: no ``echoscu`` per check.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer: asyncio.StreamWriter | None = None
    limit = 1 << 20
    # The C-ECHO-RSP status, once received. A failure status settles the verdict: a release that
    # then goes wrong (no RP in time, connection closed) must not turn it into a network verdict.
    status: int | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname=server_hostname if ssl_context else None
            )
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(dicom_pdu.associate_rq(called_ae, calling_ae).encode())
            pdu_type, body = await _read_pdu(reader, limit)
            if pdu_type == dicom_pdu.PduType.ASSOCIATE_RJ and len(body) >= 4:
                result, source, reason = body[1], body[2], body[3]
                text = _RJ_TEXT.get((source, reason), f"source {source} reason {reason}")
                kind = "configuration error: " if (source, reason) in ((1, 3), (1, 7)) else ""
                permanence = "permanent" if result == 1 else "transient"
                return ProbeResult(False, f"association rejected ({permanence}): {kind}{text}")
            if pdu_type != dicom_pdu.PduType.ASSOCIATE_AC:
                return ProbeResult(False, f"association answered with PDU type 0x{pdu_type:02x}")
            ac = dicom_pdu.decode_body(pdu_type, body)
            assert isinstance(ac, dicom_pdu.AssociateAC)
            if not any(pc.accepted for pc in ac.presentation_contexts):
                return ProbeResult(False, "association accepted but the Verification SOP class was refused")
            context_id = next(pc.context_id for pc in ac.presentation_contexts if pc.accepted)
            writer.write(dicom_dimse.command_pdata(dicom_dimse.encode_c_echo_rq(1), context_id))
            observer = dicom_dimse.DimseObserver()
            commands: list[dicom_dimse.CommandSet] = []
            while not commands:
                pdu_type, body = await _read_pdu(reader, limit)
                if pdu_type == dicom_pdu.PduType.ABORT:
                    return ProbeResult(False, "association aborted by the server during C-ECHO")
                if pdu_type != dicom_pdu.PduType.P_DATA_TF:
                    return ProbeResult(False, f"C-ECHO answered with PDU type 0x{pdu_type:02x}")
                commands = observer.feed(body)
            status = dicom_dimse.parse_c_echo_rsp(commands[0], 1)
            writer.write(dicom_pdu.ReleaseRQ().encode())
            pdu_type, _ = await _read_pdu(reader, limit)
            elapsed = format_duration(loop.time() - start)
            if status != 0x0000:
                return ProbeResult(False, f"C-ECHO status 0x{status:04X}")
            if pdu_type != dicom_pdu.PduType.RELEASE_RP:
                return ProbeResult(False, f"release answered with PDU type 0x{pdu_type:02x}")
            return ProbeResult(True, f"C-ECHO OK in {elapsed}")
    except TimeoutError:
        text = f"no response: {_timeout_text(timeout)}"
    except DicomProtocolError as exc:
        text = f"DICOM protocol error: {exc}"[:_MAX_TEXT]
    except Exception as exc:
        text = describe_error(exc)
    finally:
        _close(writer, tls=ssl_context is not None)
    if status:  # failed during the release, after a failure status: the status is the verdict
        text = f"C-ECHO status 0x{status:04X}"
    return ProbeResult(False, text)


# -- HL7 over MLLP -------------------------------------------------------------------------------

#: What an ``hl7`` check sends when ``check.hl7_message`` is not set: an ADT^A01 marked as a test
#: (MSH-11 ``T``) about a patient that does not exist. Receivers that must never see an ADT can be
#: given a query or a site-specific message instead.
DEFAULT_HL7_CHECK = (
    "MSH|^~\\&|MEDLB|MEDLB|||{timestamp}||ADT^A01^ADT_A01|{control_id}|T|2.5\r"
    "EVN|A01|{timestamp}\r"
    "PID|1||MEDLB-HEALTH-CHECK^^^MEDLB||CHECK^MEDLB\r"
)

_BASE36 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _base36(n: int, width: int = 1) -> str:
    digits = ""
    while n or len(digits) < width:
        n, d = divmod(n, 36)
        digits = _BASE36[d] + digits
    return digits


#: Control IDs of checks: ``MEDLBCHK``, 5 random base-36 digits drawn when the process starts, then a
#: base-36 counter (20 characters, the HL7 v2.5 length of MSH-10, for the first 78 billion checks).
#: The random part keeps the IDs of one run apart from those of the run before: a receiver that
#: suppresses resent control IDs (medlb's own ``dedup_window`` does, for 10 minutes) must not answer a
#: check from its cache after a restart, nor reject it as a duplicate.
_hl7_check_prefix = "MEDLBCHK" + _base36(secrets.randbelow(36**5), 5)
_hl7_checks = iter(range(1, 1 << 62))

#: Python codecs for the MSH-18 character sets (HL7 Table 0211) a check message may declare. The
#: message is encoded as it declares; without MSH-18 (ASCII) or with another set, as Latin-1.
_HL7_CODECS = {
    "UNICODE UTF-8": "utf-8",
    **{f"8859/{n}": f"iso8859-{n}" for n in (1, 2, 3, 4, 5, 6, 7, 8, 9, 15)},
}


def _hl7_check_payload(message: str | None, control_id: str, stamp: str) -> tuple[bytes, hl7.Hl7Header]:
    """The check message with its placeholders filled in, CR-terminated, encoded as its MSH-18 says."""
    text = (message or DEFAULT_HL7_CHECK).replace("{control_id}", control_id).replace("{timestamp}", stamp)
    text = text.replace("\r\n", "\r").replace("\n", "\r")  # LF or CRLF line ends: segments end with CR
    payload = text.encode("latin-1", "replace")
    header = hl7.parse_header(payload)
    codec = _HL7_CODECS.get(header.charset.split(header.repetition_separator, 1)[0].strip().upper())
    if codec is None:
        return payload, header
    payload = text.encode(codec, "replace")
    return payload, hl7.parse_header(payload)


async def hl7_probe(
    host: str,
    port: int,
    *,
    message: str | None,
    timeout: float,  # noqa: ASYNC109 - the deadline is part of the verdict
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> ProbeResult:
    """Send one framed HL7 message; healthy when the answer's MSA-1 is AA/CA and MSA-2 its MSH-10.

    ``{control_id}`` and ``{timestamp}`` in the message are filled in, so every check has its own
    control ID and a late answer to an earlier check can never pass for this one.
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    control_id = _hl7_check_prefix + _base36(next(_hl7_checks))
    # An HL7 time without an offset is read as the sender's local time: say that this one is UTC.
    stamp = time.strftime("%Y%m%d%H%M%S+0000", time.gmtime())
    writer: asyncio.StreamWriter | None = None
    try:
        payload, header = _hl7_check_payload(message, control_id, stamp)
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=ssl_context, server_hostname=server_hostname if ssl_context else None
            )
            writer.write(mllp.frame(payload))
            framer = mllp.MllpFramer(MAX_HTTP_RESPONSE)
            replies: list[bytes] = []
            while not replies:
                data = await reader.read(65536)
                if not data:
                    return ProbeResult(False, "connection closed by peer before the ACK")
                replies = framer.feed(data)
        ack = hl7.parse_ack(replies[0])
        if not ack.acknowledges(header):
            return ProbeResult(False, f"ACK for control ID {ack.control_id!r}, expected {header.control_id!r}")
        if not ack.success:
            reason = f": {ack.text}" if ack.text else ""
            return ProbeResult(False, f"answered {ack.code}{reason}"[:_MAX_TEXT])
        return ProbeResult(True, f"HL7 {ack.code} in {format_duration(loop.time() - start)}")
    except TimeoutError:
        return ProbeResult(False, f"no ACK: {_timeout_text(timeout)}")
    except Hl7ProtocolError as exc:
        return ProbeResult(False, f"HL7 protocol error: {exc}"[:_MAX_TEXT])
    except Exception as exc:
        return ProbeResult(False, describe_error(exc))
    finally:
        _close(writer, tls=ssl_context is not None)
