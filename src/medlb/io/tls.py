"""TLS contexts: offload on frontends, re-encryption to servers.

Secure defaults live here, not in each caller: TLS 1.2 minimum, forward-secret
AEAD ciphers for TLS 1.2, no compression, no renegotiation, server cipher
preference. SNI picks a certificate among several by the names in the
certificates themselves (or the names the config gives). Building a context
reads files, so it happens at start and on reload, never per connection.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from medlb.config import BackendTls, FrontendTls, TlsCertificate
from medlb.errors import StartupError

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _names_of(cert: TlsCertificate) -> list[str]:
    """The DNS names a certificate serves: the config's list, else its SAN, else its CN."""
    if cert.names:
        return [n.lower() for n in cert.names]
    try:
        decoded = ssl._ssl._test_decode_cert(cert.cert)  # type: ignore[attr-defined]  # stdlib, stable since 3.0
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"tls: cannot read certificate {cert.cert}: {exc}") from None
    names = [value.lower() for kind, value in decoded.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in decoded.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    names.append(value.lower())
    return names


def _server_context(settings: FrontendTls, cert: TlsCertificate) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[settings.min_version]
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if not settings.session_tickets:
        context.options |= ssl.OP_NO_TICKET
        context.num_tickets = 0
    try:
        context.set_ciphers(settings.ciphers)
    except ssl.SSLError:
        raise StartupError(f"tls.ciphers: no usable cipher in {settings.ciphers!r}") from None
    if settings.alpn:
        context.set_alpn_protocols(settings.alpn)
    try:
        context.load_cert_chain(cert.cert, cert.key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"tls: cannot load {cert.cert} / {cert.key}: {exc}") from None
    if settings.client_verify != "none":
        if not settings.client_ca:
            raise StartupError("tls.client_verify needs tls.client_ca")
        try:
            context.load_verify_locations(cafile=settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"tls.client_ca {settings.client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED if settings.client_verify == "required" else ssl.CERT_OPTIONAL
    return context


@dataclass(frozen=True)
class ServerTls:
    """The contexts of one frontend: the default one, and one per extra certificate by SNI name."""

    default: ssl.SSLContext
    by_name: dict[str, ssl.SSLContext]
    handshake_timeout: float
    subject_header: bytes
    client_verify: bool

    def select(self, server_name: str | None) -> ssl.SSLContext | None:
        if not server_name:
            return None
        name = server_name.lower()
        context = self.by_name.get(name)
        if context is None and "." in name:
            context = self.by_name.get("*." + name.split(".", 1)[1])
        return context


def server_tls(settings: FrontendTls) -> ServerTls:
    contexts = [_server_context(settings, cert) for cert in settings.certificates]
    by_name: dict[str, ssl.SSLContext] = {}
    for cert, context in zip(settings.certificates, contexts, strict=True):
        for name in _names_of(cert):
            by_name.setdefault(name, context)
    tls = ServerTls(
        default=contexts[0],
        by_name=by_name,
        handshake_timeout=settings.handshake_timeout,
        subject_header=settings.client_subject_header.encode(),
        client_verify=settings.client_verify != "none",
    )

    def on_sni(sock: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext) -> None:
        chosen = tls.select(server_name)
        if chosen is not None and chosen is not sock.context:
            sock.context = chosen
        return None

    if len(contexts) > 1:
        contexts[0].sni_callback = on_sni
    return tls


#: Control characters (C0 and DEL) as RFC 4514 hex escapes.
_CONTROL_ESCAPES = {c: f"\\{c:02X}" for c in (*range(0x20), 0x7F)}


def subject_text(peercert: dict[str, object] | None) -> str:
    """A client certificate's subject as ``CN=...,O=...`` (RFC 4514 order), or ``""``.

    It goes into a request header: control characters (a certificate may hold any) are written as
    RFC 4514 ``\\XX`` hex escapes, so no subject can break the header line.
    """
    if not peercert:
        return ""
    parts: list[str] = []
    subject = peercert.get("subject", ())
    assert isinstance(subject, tuple)
    short = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU", "countryName": "C"}
    for rdn in reversed(subject):
        for key, value in rdn:
            text = str(value).replace("\\", "\\\\").replace(",", "\\,").translate(_CONTROL_ESCAPES)
            parts.append(f"{short.get(key, key)}={text}")
    return ",".join(parts)


@dataclass(frozen=True)
class ClientTls:
    """How to open TLS towards the servers of a backend."""

    context: ssl.SSLContext
    sni: str | None
    pins: frozenset[bytes]

    def pinned_ok(self, der: bytes | None) -> bool:
        return not self.pins or (der is not None and hashlib.sha256(der).digest() in self.pins)


def client_tls(settings: BackendTls) -> ClientTls:
    try:
        context = ssl.create_default_context(cafile=settings.ca) if settings.ca else ssl.create_default_context()
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"backend tls.ca {settings.ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["http/1.1"])
    return ClientTls(context=context, sni=settings.sni, pins=frozenset(_pins(settings.pin_sha256)))


def _pins(values: Iterable[str]) -> Iterable[bytes]:
    for value in values:
        yield bytes.fromhex(value.replace(":", ""))


def handshake_failure(exc: BaseException) -> str:
    """A short reason for a failed TLS handshake, for the log line."""
    if isinstance(exc, TimeoutError):
        return "handshake timeout"
    reason = getattr(exc, "reason", None)
    return str(reason or exc or type(exc).__name__)


async def accept_transport(
    loop: asyncio.AbstractEventLoop, protocol: asyncio.Protocol, sock: socket.socket, tls: ServerTls | None
) -> str | None:
    """Wrap an accepted socket in a uvloop transport for ``protocol``, with TLS when ``tls`` is set.

    What the protocol modes share: the C read/write path of a transport, and the same code for
    plain TCP and TLS. Returns None once ``protocol.connection_made`` has run, else why it failed
    (a refused handshake: plaintext on a TLS port, no client certificate, an old protocol); the
    socket is then closed, and nothing was read from it.
    """
    try:
        if tls is None:
            await loop.connect_accepted_socket(lambda: protocol, sock)
        else:
            await loop.connect_accepted_socket(
                lambda: protocol, sock, ssl=tls.default, ssl_handshake_timeout=tls.handshake_timeout
            )
    except (OSError, TimeoutError, ValueError) as exc:
        sock.close()
        return handshake_failure(exc)
    return None


def start_session(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.Protocol,
    sock: socket.socket,
    tls: ServerTls | None,
    *,
    log: logging.Logger,
    label: str,
    client: tuple[str, int],
    frontend: str,
    on_failure: Callable[[], None],
) -> None:
    """Start wrapping an accepted session's socket (see :func:`accept_transport`) in a task.

    A refused handshake (plaintext on a TLS port, no client certificate, an old protocol)
    is logged as ``<label> client=... frontend=... TLS handshake failed: ...`` and ends the
    session through ``on_failure``: nothing was parsed and nothing reached a server.
    """

    async def wrap() -> None:
        failure = await accept_transport(loop, protocol, sock, tls)
        if failure is not None:
            if tls is not None:
                log.info("%s client=%s:%d frontend=%s TLS handshake failed: %s", label, *client, frontend, failure)
            on_failure()

    loop.create_task(wrap())


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _TlsSettings(Protocol):
    @property
    def tls(self) -> ServerTls | None: ...


class AcceptedSession(asyncio.Protocol):
    """A frontend session (http, dicom, hl7) that starts on a socket accepted for it.

    ``start`` hands the socket to :func:`start_session`, so every mode wraps it and logs a
    refused handshake the same way. Subclasses name their log (``session_log``) and label,
    set the attributes below in ``__init__``, and say in ``tls_failed`` how they end.
    """

    #: The first word of the handshake-failure log line ("tls" for HTTP, "dicom", "hl7").
    log_label: ClassVar[str]
    session_log: ClassVar[logging.Logger]
    loop: asyncio.AbstractEventLoop
    sock: socket.socket | None
    client_ip: str
    client_port: int
    frontend: _Named
    settings: _TlsSettings

    def start(self) -> None:
        """Wrap the accepted socket in a uvloop transport (its C read/write path), TLS if configured."""
        sock, self.sock = self.sock, None
        assert sock is not None
        start_session(
            self.loop,
            self,
            sock,
            self.settings.tls,
            log=self.session_log,
            label=self.log_label,
            client=(self.client_ip, self.client_port),
            frontend=self.frontend.name,
            on_failure=self.tls_failed,
        )

    def tls_failed(self) -> None:
        """End the session after a refused handshake (nothing was parsed or forwarded)."""
        raise NotImplementedError
