"""The configuration schema, its YAML loader and its validation errors.

The schema is a contract with operators: it is strict (unknown keys are
errors), every value is typed, and every error comes back with the location an
operator can find in the file (``backends[1].servers[0].address``). All errors
are collected in one pass, so ``medlb check`` reports everything at once.

Values cascade ``defaults`` -> backend -> server: a key left unset (``None``)
at an inner level inherits the outer one. The ``resolve_*`` helpers at the end
apply that cascade so the rest of the code never sees an unset value.

This module imports only :mod:`medlb.errors` from medlb (innermost ring).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
)

from medlb.errors import ConfigError, ConfigIssue

# --------------------------------------------------------------------------- scalars

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Parse ``"500ms"``, ``"2s"``, ``"12h"`` into seconds.

    A unit is mandatory (HAProxy reads a bare number as milliseconds, a classic
    source of 1000x mistakes); the only unit-less value accepted is ``0``.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 12h")
    if isinstance(value, int | float) and value == 0:
        return 0.0
    if isinstance(value, str):
        if value.strip() == "0":
            return 0.0
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"expected a duration with a unit (us, ms, s, m, h, d) such as 500ms or 5s, got {value!r}")


def format_duration(seconds: float) -> str:
    """Render seconds back in the config's own style (for logs and ``check``)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True)
class HostPort:
    """A parsed ``host:port``; ``host`` has no brackets even for IPv6."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_literal(self) -> bool:
        """True when ``host`` is an IP address, so no DNS lookup is needed."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


def parse_host_port(value: object) -> HostPort:
    """Parse ``"10.0.0.5:104"``, ``"[::1]:11112"`` or ``"pacs1.local:104"``."""
    if isinstance(value, HostPort):
        return value
    if not isinstance(value, str):
        raise ValueError("expected host:port")
    text = value.strip()
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError("expected host:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"expected host:port, {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError("expected host:port (write IPv6 as [addr]:port)")
        if not _HOSTNAME_RE.match(host):
            raise ValueError(f"expected host:port, {host!r} is not a valid host name or address")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"expected host:port, port {port_text!r} must be 1..65535")
    return HostPort(host, int(port_text))


def _network(value: object) -> str:
    """A CIDR (``10.0.0.0/8``) or a single address, normalised."""
    if not isinstance(value, str):
        raise ValueError("expected an address or a network such as 10.0.0.0/8")
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise ValueError(f"expected an address or a network such as 10.0.0.0/8, got {value!r}") from None


def parse_bind(value: object) -> HostPort:
    """A bind address allows port 0 (pick a free port; used by tests and the demo)."""
    if isinstance(value, str) and value.rstrip().endswith(":0"):
        parsed = parse_host_port(value.rstrip()[:-1] + "1")
        return HostPort(parsed.host, 0)
    return parse_host_port(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Address = Annotated[HostPort, BeforeValidator(parse_host_port)]
BindAddress = Annotated[HostPort, BeforeValidator(parse_bind)]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


def _ae_title(value: object) -> str:
    """A DICOM AE title: 1-16 characters of the default repertoire without backslash or control
    characters, not only spaces (PS3.5 §6.2; leading and trailing spaces are not significant)."""
    if not isinstance(value, str):
        raise ValueError("expected an AE title (1-16 characters)")
    if not 1 <= len(value) <= 16 or not value.strip(" "):
        raise ValueError("an AE title has 1-16 characters and is not only spaces")
    if any(not " " <= c <= "~" or c == "\\" for c in value):
        raise ValueError("an AE title holds printable ASCII characters other than backslash")
    return value


#: A DICOM AE title (see :func:`_ae_title`).
AeTitle = Annotated[str, AfterValidator(_ae_title)]
#: An AE title pattern for access lists and rules: ``*`` and ``?`` are wildcards.
AePattern = Annotated[str, AfterValidator(_ae_title)]
Network = Annotated[str, BeforeValidator(_network)]


class _Strict(BaseModel):
    """Frozen, and unknown keys are errors: a typo must never be silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


# --------------------------------------------------------------------------- sections


class Timeouts(_Strict):
    """Timeouts. ``connect`` is separate from the idle ones on purpose: a dead
    server must fail fast while a long C-STORE must never be cut while bytes flow.

    - ``connect``: TCP connect to a server (per attempt).
    - ``client`` / ``server``: idle time allowed on either side of a session.
    - ``queue``: how long a session may wait for a free server slot.
    - ``check``: how long one health check may take (may exceed ``inter``).
    """

    connect: Duration | None = None
    client: Duration | None = None
    server: Duration | None = None
    queue: Duration | None = None
    check: Duration | None = None


class FrontendTimeouts(_Strict):
    """A frontend may only set the client-side idle timeout; the rest belongs to
    the backend it feeds (HAProxy's split)."""

    client: Duration | None = None


class CheckSettings(_Strict):
    """Health check settings; any level may set any key, inner levels win."""

    type: Literal["tcp", "http", "https", "dicom-echo", "hl7", "external", "none"] | None = None
    inter: Duration | None = None
    fastinter: Duration | None = None
    downinter: Duration | None = None
    rise: Annotated[int, Field(ge=1, le=100)] | None = None
    fall: Annotated[int, Field(ge=1, le=100)] | None = None
    jitter: Annotated[float, Field(ge=0.0, le=0.5)] | None = None
    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    # http / https
    method: Annotated[str, Field(pattern=r"^[A-Z]{1,16}$")] | None = None
    path: Annotated[str, Field(pattern=r"^/[\x21-\x7e]*$")] | None = None
    host: str | None = None
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] | None = None
    expect_body: str | None = None
    tls_verify: bool | None = None
    # dicom-echo: the AE titles of the check's association (called: the server's ae_title if unset)
    calling_ae: AeTitle | None = None
    called_ae: AeTitle | None = None
    # hl7: the message to send; {control_id} and {timestamp} are filled in per check
    hl7_message: Annotated[str, Field(min_length=8, max_length=65536)] | None = None
    # external
    command: str | None = None
    # passive observation: consecutive connect failures on live traffic
    error_limit: Annotated[int, Field(ge=1, le=1000)] | None = None


class AgentSettings(_Strict):
    """HAProxy agent-check / Loadbalancer.org feedback agent."""

    port: Annotated[int, Field(ge=1, le=65535)] | None = None
    address: str | None = None
    inter: Duration | None = None
    send: str | None = None
    enabled: bool | None = None


class Defaults(_Strict):
    timeouts: Timeouts = Timeouts()
    check: CheckSettings = CheckSettings()
    agent: AgentSettings = AgentSettings()
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    redispatch: bool | None = None
    maxqueue: Annotated[int, Field(ge=0)] | None = None
    slowstart: Duration | None = None
    proxy_protocol: Literal["v1", "v2", "none"] | None = None


class ServerConfig(_Strict):
    name: Name
    address: Address
    weight: Annotated[int, Field(ge=0, le=256)] = 1
    maxconn: Annotated[int, Field(ge=0)] = 0
    backup: bool = False
    slowstart: Duration | None = None
    admin_state: Literal["ready", "drain", "maint"] = "ready"
    #: ``mode: dicom``: this server's own AE title. Associations are readdressed to it and the
    #: client still sees the title it called, so archives with different titles share a pool.
    ae_title: AeTitle | None = None
    check: CheckSettings = CheckSettings()
    agent: AgentSettings = AgentSettings()


class BackendConfig(_Strict):
    name: Name
    balance: Literal["roundrobin", "leastconn", "source", "random", "first"] = "roundrobin"
    check: CheckSettings = CheckSettings()
    agent: AgentSettings = AgentSettings()
    timeouts: Timeouts = Timeouts()
    retries: Annotated[int, Field(ge=0, le=10)] | None = None
    redispatch: bool | None = None
    maxqueue: Annotated[int, Field(ge=0)] | None = None
    slowstart: Duration | None = None
    proxy_protocol: Literal["v1", "v2", "none"] | None = None
    tls: BackendTls | None = None
    persistence: PersistenceConfig | None = None
    servers: Annotated[list[ServerConfig], Field(min_length=1)]


class ForwardedHeaders(_Strict):
    """Which client-address headers medlb adds towards servers (``mode: http``)."""

    x_forwarded_for: bool = True
    x_forwarded_proto: bool = True
    x_forwarded_host: bool = True
    forwarded: bool = False  # RFC 7239


class HttpFrontendSettings(_Strict):
    """``mode: http`` limits, timeouts and forwarding headers.

    Defaults follow HAProxy (101 headers, 16 KB of headers) and imaging practice
    (no body limit: a STOW-RS upload of a whole study is legitimate).
    """

    max_header_size: Annotated[int, Field(ge=1024, le=1 << 20)] = 16384
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 101
    max_uri: Annotated[int, Field(ge=256, le=1 << 20)] = 8192
    max_body: Annotated[int, Field(ge=0)] = 0
    header_timeout: Duration = 10.0
    body_timeout: Duration = 30.0
    keepalive_timeout: Duration = 60.0
    retry_after: Duration = 5.0
    forwarded_headers: ForwardedHeaders = ForwardedHeaders()
    trusted_proxies: list[Annotated[str, BeforeValidator(_network)]] = []


class TlsCertificate(_Strict):
    """One certificate chain and key (PEM). ``names`` are the SNI names it serves;
    empty means the names in the certificate itself (subjectAltName, else CN)."""

    cert: str
    key: str
    names: list[Annotated[str, Field(pattern=r"^(\*\.)?[A-Za-z0-9_.-]{1,253}$")]] = []


class FrontendTls(_Strict):
    """TLS offload on a frontend's binds (``mode: http``).

    Secure by default: TLS 1.2 and 1.3 only, forward-secret AEAD ciphers only
    for TLS 1.2 (TLS 1.3 suites are all modern), ALPN ``http/1.1``. The first
    certificate is the default; the others are chosen by SNI.
    """

    certificates: Annotated[list[TlsCertificate], Field(min_length=1)]
    min_version: Literal["1.2", "1.3"] = "1.2"
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"
    alpn: list[str] = ["http/1.1"]
    client_ca: str | None = None
    client_verify: Literal["none", "optional", "required"] = "none"
    client_subject_header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] = "X-Client-Cert-Subject"
    handshake_timeout: Duration = 10.0
    session_tickets: bool = True


class CookieSettings(_Strict):
    """The persistence cookie medlb inserts (HAProxy ``cookie NAME insert indirect``)."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "MEDLBSRV"
    secure: bool | None = None  # None: Secure when the client connection is TLS
    httponly: bool = True
    samesite: Literal["Lax", "Strict", "None"] = "Lax"
    max_age: Duration = 0.0  # 0: a session cookie


class PersistenceConfig(_Strict):
    """Keep a client on its server (``mode: http``): by cookie, source address or a header."""

    type: Literal["cookie", "source", "header"]
    cookie: CookieSettings = CookieSettings()
    header: Annotated[str, Field(pattern=r"^[A-Za-z0-9-]{1,64}$")] | None = None
    timeout: Duration = 1800.0  # source/header: forget a key after this long unused
    table_size: Annotated[int, Field(ge=1, le=10_000_000)] = 100_000


class BackendTls(_Strict):
    """Re-encrypt to the servers of a backend (``mode: http``).

    Server certificates are verified by default, against ``ca`` (or the
    system's CAs), with SNI and the host name taken from ``sni`` or the server
    address; ``pin_sha256`` additionally pins the certificate itself.
    """

    ca: str | None = None
    verify: bool = True
    sni: str | None = None
    pin_sha256: list[Annotated[str, Field(pattern=r"^[0-9a-fA-F:]{64,95}$")]] = []


HeaderName = Annotated[str, Field(pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")]
HeaderValue = Annotated[str, Field(pattern=r"^[^\x00-\x08\x0a-\x1f\x7f]{0,4096}$")]


class HeaderOps(_Strict):
    """Header changes, applied in the order delete, set, add."""

    delete: list[HeaderName] = []
    set: dict[HeaderName, HeaderValue] = {}
    add: dict[HeaderName, HeaderValue] = {}


class RuleMatch(_Strict):
    """Conditions of a rule; all given ones must hold."""

    host: list[Annotated[str, Field(pattern=r"^(\*\.)?[A-Za-z0-9_.:-]{1,260}$")]] | None = None
    path_prefix: list[Annotated[str, Field(pattern=r"^/")]] | None = None
    path_regex: str | None = None
    method: list[Annotated[str, Field(pattern=r"^[A-Z]{1,16}$")]] | None = None
    header: dict[HeaderName, str] | None = None  # name -> regex the value must match ("" = present)
    tls: bool | None = None


class Redirect(_Strict):
    """Answer with a redirect instead of forwarding. ``location`` may use {host}, {path}, {query}."""

    location: str | None = None
    scheme: Literal["https", "http"] | None = None
    code: Literal[301, 302, 303, 307, 308] = 301


#: A path prefix: visible ASCII only (no space, CR, LF or NUL can reach a request line).
PathPrefix = Annotated[str, Field(pattern=r"^/[!-~]*$")]


class PathRewrite(_Strict):
    strip_prefix: PathPrefix | None = None
    add_prefix: PathPrefix | None = None


class HttpRule(_Strict):
    """One routing rule: the first whose ``if`` matches applies its actions, then evaluation stops."""

    if_: RuleMatch = Field(default=RuleMatch(), alias="if")
    use_backend: Name | None = None
    redirect: Redirect | None = None
    path: PathRewrite | None = None
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Hsts(_Strict):
    max_age: Duration = 31536000.0
    include_subdomains: bool = False
    preload: bool = False


class DicomRuleMatch(_Strict):
    """Conditions of a DICOM routing rule; all given ones must hold (any item of a list)."""

    called: list[AePattern] | None = None
    calling: list[AePattern] | None = None
    source: list[Network] | None = None


class DicomRule(_Strict):
    """Send matching associations to ``use_backend``; the first matching rule wins."""

    if_: DicomRuleMatch = Field(default=DicomRuleMatch(), alias="if")
    use_backend: Name

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class DicomFrontendSettings(_Strict):
    """``mode: dicom``: association admission, routing and rewriting.

    - ``artim_timeout``: how long a new connection may take to send its A-ASSOCIATE-RQ.
    - ``association_timeout``: how long medlb may spend finding a server that accepts (connects,
      retries and the server's A-ASSOCIATE-AC). Keep it below the clients' own ACSE timeout
      (30 s in DCMTK and pynetdicom) so they get a clear reject instead of a timeout.
    - ``answer_timeout``: how long one server may take to answer the A-ASSOCIATE-RQ before the
      association is tried on another one (a busy single-threaded archive, a hung process).
    - ``max_associate_pdu``: largest A-ASSOCIATE-RQ/AC accepted, checked from the PDU header.
    - ``allow_calling`` / ``allow_called`` / ``allow_networks``: access lists (empty: anyone).
      A refused association gets A-ASSOCIATE-RJ (permanent; calling AE not recognised = reason 3,
      called AE not recognised = reason 7) and no server connection is opened.
    - ``calling_ae``: present this calling AE title to servers instead of the client's.
    - ``async_ops``: pass the client's asynchronous operations window upstream (off: dropped, so
      every association is synchronous, which every archive supports).
    - ``hash``: what ``balance: source`` hashes: the calling AE title (a modality sticks to one
      archive) or the client address.
    - ``certificate_ae_titles``: with DICOM TLS, the calling AE titles each client certificate
      (by its subject's CN) may use.
    """

    artim_timeout: Duration = 10.0
    association_timeout: Duration = 25.0
    answer_timeout: Duration = 5.0
    max_associate_pdu: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    allow_calling: list[AePattern] = []
    allow_called: list[AePattern] = []
    allow_networks: list[Network] = []
    calling_ae: AeTitle | None = None
    async_ops: bool = False
    hash: Literal["calling_ae", "source"] = "calling_ae"
    rules: list[DicomRule] = []
    certificate_ae_titles: dict[Annotated[str, Field(min_length=1, max_length=256)], list[AePattern]] = {}


class Hl7RuleMatch(_Strict):
    """Conditions of an HL7 routing rule on MSH fields; all given ones must hold (any pattern of a list).

    Patterns use ``*`` and ``?``; ``message_type`` matches MSH-9 as sent (``ADT^A01`` or
    ``ADT^A01^ADT_A01``: a pattern ``ADT^A0*`` matches both).
    """

    message_type: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = None
    sending_application: list[Annotated[str, Field(min_length=1, max_length=227)]] | None = None
    sending_facility: list[Annotated[str, Field(min_length=1, max_length=227)]] | None = None
    receiving_application: list[Annotated[str, Field(min_length=1, max_length=227)]] | None = None
    receiving_facility: list[Annotated[str, Field(min_length=1, max_length=227)]] | None = None


class Hl7Rule(_Strict):
    """Send matching messages to ``use_backend``; the first matching rule wins."""

    if_: Hl7RuleMatch = Field(default=Hl7RuleMatch(), alias="if")
    use_backend: Name

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Hl7FrontendSettings(_Strict):
    """``mode: hl7``: message-level balancing over MLLP.

    - ``max_message``: largest message accepted (results with PDFs are large); over it, AE and close.
    - ``ack_timeout``: how long one server may take to acknowledge a message before it is sent to
      another one (that server connection is closed: its late ACK can never be taken for another's).
    - ``delivery_timeout``: how long medlb keeps trying servers before it answers the sender with a
      NAK (``on_failure: nak``, AR/CR) or closes the connection (``on_failure: close``).
    - ``order_key``: messages with the same key are delivered one at a time, in order: a field path
      (``PID-3``, ``PID-3.1``, ``MSH-4``...), ``connection`` (per sender connection) or ``none``.
    - ``retry_on_ae``: also try another server after an AE/CE (content error), when servers differ.
    - ``dedup_window`` / ``dedup_size``: a message whose (MSH-3, MSH-4, MSH-10) was acknowledged in
      the window is answered with that ACK and not delivered again (at-least-once senders resend).
    - ``connections_per_server``: persistent MLLP connections medlb keeps to each server; one message
      is outstanding on each (MLLP original mode is stop-and-wait).
    """

    max_message: Annotated[int, Field(ge=1024, le=1 << 30)] = 16 * 1024 * 1024
    ack_timeout: Duration = 10.0
    delivery_timeout: Duration = 60.0
    order_key: Annotated[
        str, Field(pattern=r"^(connection|none|[A-Z][A-Z0-9]{2}-[0-9]{1,3}(\[[0-9]{1,3}\])?(\.[0-9]{1,3}){0,2})$")
    ] = "PID-3"
    retry_on_ae: bool = False
    dedup_window: Duration = 600.0
    dedup_size: Annotated[int, Field(ge=0, le=10_000_000)] = 100_000
    on_failure: Literal["nak", "close"] = "nak"
    connections_per_server: Annotated[int, Field(ge=1, le=256)] = 4
    rules: list[Hl7Rule] = []


class FrontendConfig(_Strict):
    name: Name
    mode: Literal["tcp", "http", "dicom", "hl7"] = "tcp"
    bind: Annotated[list[BindAddress], Field(min_length=1)]
    maxconn: Annotated[int, Field(ge=1)] = 10000
    backlog: Annotated[int, Field(ge=1)] = 1024
    default_backend: Name
    timeouts: FrontendTimeouts = FrontendTimeouts()
    http: HttpFrontendSettings | None = None
    tls: FrontendTls | None = None
    rules: list[HttpRule] = []
    request_headers: HeaderOps | None = None
    response_headers: HeaderOps | None = None
    hsts: Hsts | None = None
    dicom: DicomFrontendSettings | None = None
    hl7: Hl7FrontendSettings | None = None


class GlobalConfig(_Strict):
    hard_stop_after: Duration = 60.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    nofile: Annotated[int, Field(ge=1024)] = 200_000
    loop: Literal["auto", "asyncio", "uvloop"] = "auto"
    splice: bool = True
    #: Processes serving ``mode: http`` and ``mode: tcp`` frontends (SO_REUSEPORT). The main
    #: process is one of them and keeps checks, the admin API and the dicom/hl7 frontends.
    workers: Annotated[int, Field(ge=1, le=64)] = 1


class AdminTls(_Strict):
    """Serve the admin API over HTTPS (TLS 1.2+ only)."""

    cert: str
    key: str


class AdminConfig(_Strict):
    """The admin API, metrics and dashboard: one HTTP listener inside medlb.

    Secure by default: loopback only, and a token is mandatory (there is no
    anonymous mode). ``/metrics`` needs the token too unless ``metrics_auth``
    is switched off for a scraper that cannot send one.
    """

    bind: BindAddress = HostPort("127.0.0.1", 9900)
    token_file: str | None = None
    token_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    metrics_auth: bool = True
    session_ttl: Duration = 8 * 3600.0
    tls: AdminTls | None = None


class WebhookAlert(_Strict):
    """POST one JSON document per alert to ``url``."""

    url: Annotated[str, Field(pattern=r"^https?://[^\s]+$")]
    timeout: Duration = 5.0
    headers: dict[str, str] = {}
    tls_verify: bool = True


class EmailAlert(_Strict):
    """Send alerts by SMTP; ``security`` is ``starttls`` (port 587), ``tls`` (465) or ``none``."""

    host: str
    port: Annotated[int, Field(ge=1, le=65535)] = 587
    security: Literal["starttls", "tls", "none"] = "starttls"
    username: str | None = None
    password_file: str | None = None
    password_env: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")] | None = None
    from_: Annotated[str, Field(alias="from", pattern=r"^[^@\s]+@[^@\s]+$")]
    to: Annotated[list[Annotated[str, Field(pattern=r"^[^@\s]+@[^@\s]+$")]], Field(min_length=1)]
    timeout: Duration = 10.0
    tls_verify: bool = True
    subject_prefix: str = "[medlb]"

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class AlertRateLimit(_Strict):
    """At most ``burst`` alerts per subject (a server or a backend) per ``window``.

    Alerts over the limit are not lost silently: they are counted, and the
    next alert that goes out for that subject says how many were suppressed.
    """

    burst: Annotated[int, Field(ge=1, le=1000)] = 3
    window: Duration = 300.0


class AlertsConfig(_Strict):
    webhook: WebhookAlert | None = None
    email: EmailAlert | None = None
    rate_limit: AlertRateLimit = AlertRateLimit()


class Config(_Strict):
    global_: GlobalConfig = Field(default=GlobalConfig(), alias="global")
    defaults: Defaults = Defaults()
    admin: AdminConfig | None = None
    alerts: AlertsConfig | None = None
    frontends: Annotated[list[FrontendConfig], Field(min_length=1)]
    backends: Annotated[list[BackendConfig], Field(min_length=1)]

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    def backend(self, name: str) -> BackendConfig:
        for backend in self.backends:
            if backend.name == name:
                return backend
        raise KeyError(name)


# --------------------------------------------------------------------------- loading


def _loc_text(loc: Iterable[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def _pydantic_issues(error: ValidationError) -> list[ConfigIssue]:
    issues = []
    for item in error.errors():
        msg = str(item["msg"])
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        # pydantic adds the branch name of Annotated/union members; drop them.
        loc = [p for p in item["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))]
        issues.append(ConfigIssue(_loc_text(loc), msg))
    return issues


def _semantic_issues(raw: Mapping[str, Any]) -> list[ConfigIssue]:
    """Cross-reference checks that pydantic cannot express per field.

    They run on the raw mapping so they are reported even when field errors
    exist elsewhere; the operator sees every problem in one run.
    """
    issues: list[ConfigIssue] = []

    def names(section: str) -> list[tuple[int, str]]:
        items = raw.get(section)
        if not isinstance(items, list):
            return []
        return [(n, i["name"]) for n, i in enumerate(items) if isinstance(i, dict) and isinstance(i.get("name"), str)]

    for section in ("frontends", "backends"):
        seen: set[str] = set()
        for index, name in names(section):
            if name in seen:
                issues.append(ConfigIssue(f"{section}[{index}].name", f"duplicate name {name!r}"))
            seen.add(name)

    backend_names = {name for _, name in names("backends")}
    binds: dict[str, str] = {}
    frontends = raw.get("frontends")
    for f_index, frontend in enumerate(frontends if isinstance(frontends, list) else []):
        if not isinstance(frontend, dict):
            continue
        mode = frontend.get("mode", "tcp")
        for key in ("http", "rules", "request_headers", "response_headers", "hsts"):
            if frontend.get(key) and mode != "http":
                issues.append(ConfigIssue(f"frontends[{f_index}].{key}", "only valid with mode: http"))
        if frontend.get("tls") and mode not in ("http", "dicom", "hl7"):
            issues.append(ConfigIssue(f"frontends[{f_index}].tls", "only valid with mode: http, dicom or hl7"))
        for section in ("dicom", "hl7"):
            if frontend.get(section) is not None and mode != section:
                issues.append(ConfigIssue(f"frontends[{f_index}].{section}", f"only valid with mode: {section}"))
            settings = frontend.get(section)
            s_rules = settings.get("rules") if isinstance(settings, dict) else None
            for r_index, rule in enumerate(s_rules if isinstance(s_rules, list) else []):
                target = rule.get("use_backend") if isinstance(rule, dict) else None
                if isinstance(target, str) and target not in backend_names:
                    where = f"frontends[{f_index}].{section}.rules[{r_index}].use_backend"
                    issues.append(ConfigIssue(where, f"backend {target!r} does not exist"))
        tls = frontend.get("tls")
        needs_ca = mode == "dicom" and isinstance(tls, dict) and tls.get("client_verify", "required") != "none"
        if needs_ca and isinstance(tls, dict) and not tls.get("client_ca"):
            issues.append(
                ConfigIssue(
                    f"frontends[{f_index}].tls.client_ca",
                    "DICOM TLS verifies client certificates by default: set client_ca, or client_verify: none",
                )
            )
        rules = frontend.get("rules")
        for r_index, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, dict):
                continue
            where = f"frontends[{f_index}].rules[{r_index}]"
            target = rule.get("use_backend")
            if isinstance(target, str) and target not in backend_names:
                issues.append(ConfigIssue(f"{where}.use_backend", f"backend {target!r} does not exist"))
            if rule.get("use_backend") and rule.get("redirect"):
                issues.append(ConfigIssue(where, "a rule either forwards (use_backend) or redirects, not both"))
            redirect = rule.get("redirect")
            if isinstance(redirect, dict) and not (redirect.get("location") or redirect.get("scheme")):
                issues.append(ConfigIssue(f"{where}.redirect", "needs location or scheme"))
            match = rule.get("if")
            for pattern_where, pattern in _patterns(match):
                try:
                    re.compile(pattern)
                except re.error as exc:
                    issues.append(ConfigIssue(f"{where}.if.{pattern_where}", f"invalid regular expression: {exc}"))
        target = frontend.get("default_backend")
        if isinstance(target, str) and target not in backend_names:
            issues.append(ConfigIssue(f"frontends[{f_index}].default_backend", f"backend {target!r} does not exist"))
        bind_list = frontend.get("bind")
        for b_index, bind in enumerate(bind_list if isinstance(bind_list, list) else []):
            if isinstance(bind, str) and not bind.endswith(":0"):
                where = f"frontends[{f_index}].bind[{b_index}]"
                if bind in binds:
                    issues.append(ConfigIssue(where, f"{bind} is already bound by {binds[bind]}"))
                binds[bind] = where

    backends = raw.get("backends")
    for b_index, backend in enumerate(backends if isinstance(backends, list) else []):
        if not isinstance(backend, dict) or not isinstance(backend.get("servers"), list):
            continue
        seen = set()
        for s_index, server in enumerate(backend["servers"]):
            if isinstance(server, dict) and isinstance(server.get("name"), str):
                if server["name"] in seen:
                    issues.append(
                        ConfigIssue(
                            f"backends[{b_index}].servers[{s_index}].name",
                            f"duplicate server name {server['name']!r}",
                        )
                    )
                seen.add(server["name"])
        persistence = backend.get("persistence")
        if isinstance(persistence, dict) and persistence.get("type") == "header" and not persistence.get("header"):
            issues.append(ConfigIssue(f"backends[{b_index}].persistence.header", "required for type header"))
        if isinstance(persistence, dict) or backend.get("tls") is not None:
            allowed = ("http",) if isinstance(persistence, dict) else ("http", "dicom", "hl7")
            for f_index, frontend in enumerate(frontends if isinstance(frontends, list) else []):
                if (
                    isinstance(frontend, dict)
                    and frontend.get("default_backend") == backend.get("name")
                    and frontend.get("mode", "tcp") not in allowed
                ):
                    what = "persistence" if isinstance(persistence, dict) else "tls"
                    issues.append(
                        ConfigIssue(
                            f"backends[{b_index}].{what}",
                            f"needs mode: {' or '.join(allowed)}, but frontends[{f_index}] uses this backend"
                            f" in mode {frontend.get('mode', 'tcp')}",
                        )
                    )
        check = backend.get("check")
        if isinstance(check, dict) and check.get("type") == "external" and not check.get("command"):
            issues.append(ConfigIssue(f"backends[{b_index}].check.command", "required for type external"))
    admin = raw.get("admin")
    if isinstance(admin, dict):
        sources = [k for k in ("token_file", "token_env") if admin.get(k)]
        if not sources:
            issues.append(ConfigIssue("admin.token_file", "the admin API needs a token: set token_file or token_env"))
        elif len(sources) > 1:
            issues.append(ConfigIssue("admin.token_env", "set token_file or token_env, not both"))
    alerts = raw.get("alerts")
    email = alerts.get("email") if isinstance(alerts, dict) else None
    if isinstance(email, dict):
        if email.get("password_file") and email.get("password_env"):
            issues.append(ConfigIssue("alerts.email.password_env", "set password_file or password_env, not both"))
        has_password = bool(email.get("password_file") or email.get("password_env"))
        if has_password and not email.get("username"):
            issues.append(ConfigIssue("alerts.email.username", "required when a password is set"))
        if email.get("username") and not has_password:
            issues.append(ConfigIssue("alerts.email.password_file", "a username needs password_file or password_env"))
    return issues


def _patterns(match: object) -> list[tuple[str, str]]:
    if not isinstance(match, dict):
        return []
    out: list[tuple[str, str]] = []
    if isinstance(match.get("path_regex"), str):
        out.append(("path_regex", match["path_regex"]))
    headers = match.get("header")
    if isinstance(headers, dict):
        out += [(f"header.{k}", v) for k, v in headers.items() if isinstance(v, str)]
    return out


def parse_config(raw: object, source: str = "") -> Config:
    """Validate an already-parsed mapping; raise :class:`ConfigError` with every issue."""
    if not isinstance(raw, dict):
        raise ConfigError([ConfigIssue("", "the configuration must be a mapping at the top level")], source)
    issues: list[ConfigIssue] = []
    config: Config | None = None
    try:
        config = Config.model_validate(raw)
    except ValidationError as exc:
        issues.extend(_pydantic_issues(exc))
    issues.extend(_semantic_issues(raw))
    if issues or config is None:
        raise ConfigError(issues, source)
    return config


def load_config(path: str | Path) -> Config:
    """Read and validate a YAML file. YAML syntax errors carry line and column."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([ConfigIssue(f"byte {exc.start}", "the file is not UTF-8 text")], str(path)) from None
    except OSError as exc:
        raise ConfigError([ConfigIssue("", f"cannot read file: {exc.strerror}")], str(path)) from None
    return parse_config_text(text, str(path))


def parse_config_text(text: str, source: str = "") -> Config:
    """Validate YAML text: what :func:`load_config` read, or what a worker process was sent."""
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([ConfigIssue(where, f"YAML syntax error: {problem}")], source) from None
    return parse_config(raw, source)


# --------------------------------------------------------------------------- resolution

#: Built-in defaults, applied below ``defaults:``. They follow HAProxy where it has one
#: (inter 2s, rise 2, fall 3) and imaging practice elsewhere (12h idle timeouts: a
#: modality may hold an association open for a whole study transfer).
BUILTIN_TIMEOUTS = {"connect": 3.0, "client": 12 * 3600.0, "server": 12 * 3600.0, "queue": 30.0, "check": 2.0}
BUILTIN_CHECK: dict[str, Any] = {
    "type": "tcp",
    "inter": 2.0,
    "fastinter": None,  # falls back to inter
    "downinter": None,  # falls back to inter
    "rise": 2,
    "fall": 3,
    "jitter": 0.1,
    "port": None,
    "method": "GET",
    "path": "/",
    "host": None,
    "expect_status": None,
    "expect_body": None,
    "tls_verify": False,
    "command": None,
    "error_limit": 3,
    "calling_ae": "MEDLB",
    "called_ae": None,
    "hl7_message": None,
}
BUILTIN_AGENT: dict[str, Any] = {"port": None, "address": None, "inter": 2.0, "send": None, "enabled": None}


def _cascade(builtin: Mapping[str, Any], *layers: BaseModel) -> dict[str, Any]:
    out = dict(builtin)
    for layer in layers:
        for key, value in layer.model_dump().items():
            if value is not None:
                out[key] = value
    return out


@dataclass(frozen=True, slots=True)
class ResolvedTimeouts:
    connect: float
    client: float
    server: float
    queue: float
    check: float


@dataclass(frozen=True, slots=True)
class ResolvedCheck:
    type: str
    inter: float
    fastinter: float
    downinter: float
    rise: int
    fall: int
    jitter: float
    port: int | None
    method: str
    path: str
    host: str | None
    expect_status: tuple[int, ...] | None
    expect_body: str | None
    tls_verify: bool
    command: str | None
    error_limit: int
    calling_ae: str
    called_ae: str | None
    hl7_message: str | None


@dataclass(frozen=True, slots=True)
class ResolvedAgent:
    enabled: bool
    port: int | None
    address: str | None
    inter: float
    send: str | None


def resolve_timeouts(
    config: Config, backend: BackendConfig, frontend: FrontendConfig | None = None
) -> ResolvedTimeouts:
    layers: list[BaseModel] = [config.defaults.timeouts, backend.timeouts]
    if frontend is not None:
        layers.append(frontend.timeouts)
    return ResolvedTimeouts(**_cascade(BUILTIN_TIMEOUTS, *layers))


def resolve_check(config: Config, backend: BackendConfig, server: ServerConfig) -> ResolvedCheck:
    merged = _cascade(BUILTIN_CHECK, config.defaults.check, backend.check, server.check)
    merged["fastinter"] = merged["fastinter"] or merged["inter"]
    merged["downinter"] = merged["downinter"] or merged["inter"]
    if merged["expect_status"] is not None:
        merged["expect_status"] = tuple(merged["expect_status"])
    # dicom-echo calls the server by its own AE title unless the check names another.
    merged["called_ae"] = merged["called_ae"] or server.ae_title or "ANY-SCP"
    return ResolvedCheck(**merged)


def resolve_agent(config: Config, backend: BackendConfig, server: ServerConfig) -> ResolvedAgent:
    merged = _cascade(BUILTIN_AGENT, config.defaults.agent, backend.agent, server.agent)
    if merged["enabled"] is None:
        merged["enabled"] = merged["port"] is not None
    return ResolvedAgent(**merged)


def resolve_backend_value(config: Config, backend: BackendConfig, key: str, builtin: Any) -> Any:
    """``retries``, ``redispatch``, ``maxqueue``, ``slowstart``, ``proxy_protocol``."""
    value = getattr(backend, key)
    if value is None:
        value = getattr(config.defaults, key)
    return builtin if value is None else value
