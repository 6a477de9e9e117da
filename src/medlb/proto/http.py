"""Sans-IO HTTP/1.1 codec for ``mode: http``: strict request and response parsing, and serialization.

Spec: RFC 9112 (HTTP/1.1 message syntax and framing) and RFC 9110 (semantics). The hardening rules
and their sources are tabulated in ``docs/http-hardening.md``.

Theory of operation
-------------------
The byte-level grammar is parsed by llhttp (through ``httptools``), in its default strict mode: no
``set_dangerous_leniencies`` call is ever made. llhttp already rejects bare CR or LF line ends,
obs-fold, whitespace before a colon, empty or non-token header names, control bytes and NUL in
values, bytes above 127 in the request-target, malformed or duplicated ``Content-Length``, ``Content-
Length`` together with ``Transfer-Encoding``, and chunk sizes that are not plain hex (``0x``, ``_``,
``+``, ``-``, spaces, 2**64 overflow). medlb adds, on top, the rules where llhttp is lenient or where
a proxy must be stricter than an origin server (Host, ``#``, HTTP/0.9 and /2.0 request lines, only
``chunked`` as a transfer coding, HTTP/1.0 bodies, size limits); see ``_common_fields`` and
``_on_request_head``.

**Message boundaries are medlb's, not llhttp's.** llhttp is never given a byte past the end of the
message it is parsing:

* a head ends at the first CRLFCRLF after its first byte (empty lines before it are skipped, RFC
  9112 §2.2). Strict llhttp accepts no other line end, so the two cannot disagree; if they ever did,
  ``_on_message_begin`` or the ``_head_done`` check turns it into a 400 instead of a desync. Head bytes are
  handed to llhttp as they arrive, so a bad start line fails at once, and the head size limit is
  checked on exact byte counts before llhttp sees (and httptools buffers) them;
* a ``Content-Length`` body is fed exactly ``Content-Length`` bytes;
* a chunked body always ends with CRLFCRLF (last-chunk CRLF + empty trailer line, or trailer CRLF +
  empty line), so it is fed in pieces cut after each CRLFCRLF and the message ends where llhttp
  reports ``on_message_complete`` at a piece end. Binary data rarely contains CRLFCRLF, so this is
  usually one ``feed_data`` call per read.

This keeps llhttp's state in step with ours, gives exact offsets for pipelining and for the bytes
after an upgrade, and lets llhttp be replaced when the proxy's view of framing differs from an origin
server's (a response to HEAD or to CONNECT has no body although it may carry ``Content-Length``).

Events: ``feed`` returns, in order, a head (:class:`RequestHead` / :class:`ResponseHead`), zero or
more :class:`Body` (de-chunked bytes) and an :class:`EndOfMessage` per message, for as many
pipelined messages as the bytes hold. A head is emitted only once it passed every check; a body
error can still come after it, so a caller that already forwarded the head must abort the server
connection when ``feed`` raises. Errors are :class:`HttpError` with the status to answer; the
events completed before the error in the same call are on ``HttpError.events``. After an error
the parser stays failed: every later call raises the same status again.

After a message that does not keep the connection alive, further bytes are ignored (the caller
closes after the response). After an ``Upgrade`` request (HTTP/1.1, ``Connection: upgrade`` and an
``Upgrade`` field) or ``CONNECT``, the parser pauses once the request (with its body, if any) is
complete, as HAProxy does: bytes are kept until the caller has the server's answer, then
``take_remainder()`` hands them over for a tunnel (101, or 2xx to CONNECT) or ``resume()`` parses
them as HTTP again (the upgrade was refused).

Performance: a small request read in one piece costs one ``bytes.find``, one ``feed_data`` and one
Python callback per field plus one per head. Field names are looked up as sent (the spellings
clients use) and lower-cased only when they might be a field medlb interprets; valid Host values
are cached. Body pieces go to llhttp as ``memoryview`` slices (no copy before llhttp's own). About
100,000 300-byte GETs per second on one core; see ``docs/http-hardening.md`` for measurements.

This module must not import asyncio, socket or time (ARCHITECTURE.md §2).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeAlias, TypeVar

import httptools

from medlb.errors import ProtocolError

__all__ = [
    "DEFAULT_LIMITS",
    "LAST_CHUNK",
    "Body",
    "EndOfMessage",
    "HttpError",
    "Limits",
    "RequestEvent",
    "RequestHead",
    "RequestParser",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "encode_chunk",
    "encode_trailers",
    "serialize_request_head",
    "serialize_response_head",
    "with_framing",
]

Headers: TypeAlias = list[tuple[bytes, bytes]]

LAST_CHUNK: Final = b"0\r\n\r\n"
"""The last chunk with no trailers: ends a chunked body."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of one message head and of a request body.

    Defaults follow HAProxy: ``tune.bufsize`` 16384 bounds a head, ``tune.http.maxhdr`` 101 bounds
    the number of fields, and the request-target gets half of the buffer.

    * ``max_header_bytes``: start line + fields + the final CRLF (leading empty lines excluded).
      Also bounds a trailer section and the framing bytes (chunk-size lines, extensions) seen
      between two pieces of chunk data. Over it: 431, or 414 if the request line is not even
      complete yet.
    * ``max_headers``: number of header fields (and, separately, of trailer fields): 431.
    * ``max_uri``: request-target length: 414.
    * ``max_body``: request body (``Content-Length`` or the de-chunked total); 0 means unlimited: 413.
      Responses are not limited (the server is trusted with its own payloads).
    """

    max_header_bytes: int = 16384
    max_headers: int = 101
    max_uri: int = 8192
    max_body: int = 0

    def __post_init__(self) -> None:
        if self.max_header_bytes < 1 or self.max_headers < 1 or self.max_uri < 1 or self.max_body < 0:
            raise ValueError(f"limits must be positive (max_body may be 0): {self}")


DEFAULT_LIMITS: Final = Limits()


def _first(headers: Headers, name: bytes) -> bytes | None:
    name = name.lower()
    size = len(name)
    for key, value in headers:
        if len(key) == size and key.lower() == name:
            return value
    return None


@dataclass(slots=True)
class RequestHead:
    """A request line and header section that passed every check.

    ``headers`` keeps order and the names' case as received; values have their surrounding OWS
    removed. ``content_length`` is ``None`` for a chunked body or when no ``Content-Length`` was
    sent; ``chunked`` means ``Transfer-Encoding: chunked`` (the only coding medlb accepts).
    ``keep_alive`` follows RFC 9112 §9.3 (HTTP/1.1 unless ``close``; HTTP/1.0 only with
    ``keep-alive``). ``expect_continue`` is an HTTP/1.1 ``Expect: 100-continue``. ``upgrade`` is true
    for CONNECT and for an HTTP/1.1 ``Upgrade`` request: the parser pauses after this message.
    ``host`` is the ``Host`` field (``None`` if absent, allowed in HTTP/1.0 only).
    """

    method: bytes
    target: bytes
    version: bytes
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool
    upgrade: bool
    host: bytes | None

    def header(self, name: bytes) -> bytes | None:
        """First value of field ``name`` (case-insensitive), or ``None``."""
        return _first(self.headers, name)


@dataclass(slots=True)
class ResponseHead:
    """A status line and header section.

    Body rules (RFC 9112 §6.3): 1xx, 204, 304, a response to HEAD and a 2xx to CONNECT have no body
    whatever their fields say; otherwise ``chunked``, else ``content_length``, else the body runs
    until the server closes (then ``keep_alive`` is false). ``content_length`` is reported as sent
    even when it does not frame a body (HEAD, 304), so it can be forwarded unchanged.
    """

    status: int
    reason: bytes
    version: bytes
    headers: Headers
    content_length: int | None
    chunked: bool
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """First value of field ``name`` (case-insensitive), or ``None``."""
        return _first(self.headers, name)


@dataclass(slots=True)
class Body:
    """A piece of message body, already de-chunked."""

    data: bytes


@dataclass(slots=True)
class EndOfMessage:
    """The message is complete; ``trailers`` holds the trailer fields of a chunked body."""

    trailers: Headers = field(default_factory=list)


RequestEvent: TypeAlias = RequestHead | Body | EndOfMessage
ResponseEvent: TypeAlias = ResponseHead | Body | EndOfMessage


class HttpError(ProtocolError):
    """A peer broke an HTTP/1.1 rule; ``status`` is what to answer the client with.

    Request parsing raises 400, 413, 414, 431, 501 or 505 (408 is the caller's timeout); response
    parsing always raises 502. ``reason`` is short and meant for logs. ``events`` holds the events
    completed before the error within the failing ``feed`` call (e.g. a valid pipelined request
    before a bad one), so a careful caller can still serve them.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.events: list[RequestEvent | ResponseEvent] = []


# --------------------------------------------------------------------------- grammar helpers

_TCHAR: Final = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
# Header names joined by single spaces: one regex call checks them all (space is not a tchar).
_TOKEN: Final = re.compile(rb"[%s]+" % _TCHAR)
_TOKENS: Final = re.compile(rb"[%s]+(?: [%s]+)*" % (_TCHAR, _TCHAR))
# RFC 9112 §3.2 / RFC 3986 §3.2.2: uri-host [ ":" port ]. No userinfo ("@"), no spaces.
_HOST_CHARS: Final = rb"A-Za-z0-9\-._~!$&'()*+,;=%"
_HOST: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[%s]*)(?::[0-9]*)?" % _HOST_CHARS)
_AUTHORITY_FORM: Final = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[%s]+):[0-9]{1,5}" % _HOST_CHARS)
_ABSOLUTE_FORM: Final = re.compile(rb"(https?)://([^/?]*)", re.IGNORECASE)
_VERSION_TOKEN: Final = re.compile(rb"HTTP/[0-9]\.[0-9]")

_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
_DEFAULT_PORTS: Final = {b"http": b":80", b"https": b":443"}
# llhttp reasons that mean "a version medlb does not speak" rather than "malformed".
_VERSION_ERRORS: Final = frozenset({"Invalid HTTP version", "Pause on PRI/Upgrade"})

# Field names medlb interprets. The header callback only notes names of these lengths (no
# lower-casing per field: it runs for every field of every request); the head check sorts them.
_HOST_F: Final = 1
_CL_F: Final = 2
_TE_F: Final = 3
_CONNECTION_F: Final = 4
_EXPECT_F: Final = 5
_UPGRADE_F: Final = 6
_KIND: Final = {
    b"host": _HOST_F,
    b"content-length": _CL_F,
    b"transfer-encoding": _TE_F,
    b"connection": _CONNECTION_F,
    b"expect": _EXPECT_F,
    b"upgrade": _UPGRADE_F,
}
_SPECIAL_LENGTHS: Final = frozenset(len(name) for name in _KIND)
# The spellings real clients use, looked up without lower-casing: 0 marks a common field that
# needs no interpretation, so the head check never sees it. Other spellings take the slow path.
_KIND_EXACT: Final = {
    **_KIND,
    **{name.title(): kind for name, kind in _KIND.items()},
    b"Accept": 0,
    b"accept": 0,
    b"Cookie": 0,
    b"cookie": 0,
    b"User-Agent": 0,
    b"user-agent": 0,
    b"Referer": 0,
    b"referer": 0,
    b"Content-Type": 0,
}
_FRAMING: Final = frozenset({b"content-length", b"transfer-encoding"})
# RFC 9110 §6.5.1: framing, routing and connection control must not come from trailers; a
# recipient that merges trailers into the head would otherwise be steered by them.
_FORBIDDEN_TRAILERS: Final = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"upgrade",
        b"te",
        b"trailer",
        b"expect",
    }
)
_BODYLESS_HTTP10: Final = frozenset({b"GET", b"HEAD", b"DELETE"})
_CRLF_BYTES: Final = (13, 10)

# Hosts already validated: clients repeat the same few, and the regex costs more than the rest of
# the head checks together. Bounded: at most 256 short entries, cleared when full.
_HOST_CACHE: Final[dict[bytes, bool]] = {}
_HOST_CACHE_SIZE: Final = 256

# States.
_HEAD: Final = 0  # waiting for, or inside, a head
_CL: Final = 1  # Content-Length body
_CHUNKED: Final = 2  # chunked body
_EOF: Final = 3  # body until the server closes (responses only)
_PAUSED: Final = 4  # after an upgrade/CONNECT (or 101): keeping bytes until the caller decides
_CLOSED: Final = 5  # after a message without keep-alive: bytes are ignored
_TUNNEL: Final = 6  # bytes were handed over with take_remainder()
_FAILED: Final = 7
_NONE: Final = 8  # framing only: no body


def _valid_host(host: bytes) -> bool:
    ok = _HOST_CACHE.get(host)
    if ok is None:
        ok = _HOST.fullmatch(host) is not None
        if len(host) <= 260:  # a DNS name and a port; longer values are not worth keeping
            if len(_HOST_CACHE) >= _HOST_CACHE_SIZE:
                _HOST_CACHE.clear()
            _HOST_CACHE[host] = ok
    return ok


def _connection(values: list[bytes]) -> tuple[bool, bool, bool]:
    """``close``, ``keep-alive`` and ``upgrade`` tokens of the ``Connection`` fields."""
    if len(values) == 1:  # the common case, one token: no split
        one = values[0].lower()
        if one == b"keep-alive":
            return False, True, False
        if one == b"close":
            return True, False, False
    tokens = {item.strip(b" \t") for item in b",".join(values).lower().split(b",")}
    return b"close" in tokens, b"keep-alive" in tokens, b"upgrade" in tokens


def _content_length(value: bytes) -> int | None:
    """Parse a ``Content-Length`` value, or ``None`` if it is not 1*DIGIT of at most 18 digits.

    Never ``int()`` on raw text: ``int`` accepts ``+``, ``_``, surrounding spaces and non-ASCII
    digits (CVE-2023-47627). ``bytes.isdigit`` is ASCII-only, and 18 digits always fit an int64.
    llhttp already rejects the same inputs; this is the second, independent check.
    """
    if not value.isdigit() or len(value) > 18:
        return None
    return int(value)


def _codings(values: list[bytes]) -> list[bytes]:
    """Lower-cased, OWS-stripped transfer-codings of the ``Transfer-Encoding`` fields, in order."""
    return [c.strip(b" \t") for c in b",".join(values).lower().split(b",")]


def _check_trailers(trailers: Headers, limits: Limits) -> tuple[int, str] | None:
    if len(trailers) > limits.max_headers:
        return 431, f"more than {limits.max_headers} trailer fields"
    for name, _ in trailers:
        lname = name.lower()
        if lname in _FORBIDDEN_TRAILERS or lname.replace(b"_", b"-") in _FORBIDDEN_TRAILERS:
            return 400, f"forbidden trailer field {name!r}"
    return None


class _Callbacks:
    """The protocol object handed to llhttp: attributes are bound methods of the parser.

    Keeping them off the parser keeps ``on_*`` names out of its public API at no call cost.
    """

    __slots__ = (
        "on_body",
        "on_header",
        "on_headers_complete",
        "on_message_begin",
        "on_message_complete",
        "on_status",
        "on_url",
    )

    on_body: Callable[[bytes], None]
    on_header: Callable[[bytes, bytes], None]
    on_headers_complete: Callable[[], None]
    on_message_begin: Callable[[], None]
    on_message_complete: Callable[[], None]
    on_status: Callable[[bytes], None]
    on_url: Callable[[bytes], None]


# --------------------------------------------------------------------------- parsers

_E = TypeVar("_E", RequestEvent, ResponseEvent)


class _Parser(Generic[_E]):
    """What request and response parsing share: message delimiting and llhttp driving."""

    __slots__ = (
        "_after",
        "_cb_error",
        "_error",
        "_events",
        "_feeding_head",
        "_framing",
        "_head_done",
        "_head_size",
        "_headers",
        "_limits",
        "_line",
        "_line_seen",
        "_ll",
        "_max_head",
        "_mc",
        "_overhead",
        "_primed",
        "_progress",
        "_remaining",
        "_special",
        "_stash",
        "_state",
        "_tail",
    )

    _ll: httptools.HttpRequestParser | httptools.HttpResponseParser
    _BAD: int  # the status of a protocol error in this direction

    def __init__(self, limits: Limits) -> None:
        self._limits = limits
        self._max_head = limits.max_header_bytes
        self._state = _HEAD
        self._after = _HEAD
        self._framing = _NONE
        self._error: HttpError | None = None
        self._cb_error: HttpError | None = None
        self._head_size = 0
        self._tail = b""
        self._line = b""
        self._line_seen = False
        self._head_done = False
        self._feeding_head = False
        self._mc = False
        self._primed = False
        self._remaining = 0
        self._overhead = 0
        self._progress = False
        self._headers: Headers = []
        self._special: Headers = []
        self._stash = bytearray()
        self._events: list[Any] = []
        self._ll = self._new_ll()

    # -- provided by subclasses

    def _callbacks(self, on_head: Callable[[], None]) -> _Callbacks:
        """The callbacks both directions share; each adds its start-line callback."""
        cb = _Callbacks()
        cb.on_message_begin = self._on_message_begin
        cb.on_header = self._on_header
        cb.on_headers_complete = on_head
        cb.on_body = self._on_body
        cb.on_message_complete = self._on_message_complete
        return cb

    def _new_ll(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    def _prime(self) -> httptools.HttpRequestParser | httptools.HttpResponseParser:
        raise NotImplementedError

    def _translate(self, exc: httptools.HttpParserError) -> HttpError:
        raise NotImplementedError

    def _head_too_large(self, data: bytes, pos: int, stop: int) -> HttpError:
        raise NotImplementedError

    def _check_start_line(self, line: bytes) -> None:
        pass

    # -- public surface

    def feed(self, data: bytes) -> list[_E]:
        """Parse ``data`` (the next bytes from the peer) and return the events it completes.

        Raises :class:`HttpError`; the events completed before the error are on its ``events``.
        """
        if self._error is not None:
            raise HttpError(self._error.status, self._error.reason)
        events: list[_E] = []
        self._events = events
        pos = 0
        n = len(data)
        try:
            while pos < n:
                state = self._state
                if state == _HEAD:
                    pos = self._feed_head(data, pos, n)
                elif state == _CL:
                    pos = self._feed_cl(data, pos, n)
                elif state == _CHUNKED:
                    pos = self._feed_chunked(data, pos, n)
                elif state == _EOF:
                    self._events.append(Body(data if pos == 0 else data[pos:]))
                    break
                elif state == _PAUSED:
                    # What arrived with the paused message is bounded by the caller's read size;
                    # later feeds (before take_remainder/resume) are bounded here.
                    if pos == 0 and len(self._stash) + n > self._max_head:
                        raise HttpError(self._BAD, "too much data before the upgrade was agreed")
                    self._stash += memoryview(data)[pos:]
                    break
                elif state == _CLOSED:  # the peer said this was its last message: ignore the rest
                    break
                else:
                    raise RuntimeError("feed() after take_remainder(): relay raw bytes instead")
        except HttpError as exc:
            self._fail(exc)
            raise
        return events

    def take_remainder(self) -> bytes:
        """Hand over the bytes after an upgrade/CONNECT request (or a 101 / 2xx-to-CONNECT response).

        Call it once the tunnel is agreed; the parser is finished afterwards and ``feed`` must not
        be called again (the caller relays raw bytes from now on).
        """
        if self._state not in (_PAUSED, _TUNNEL):
            raise RuntimeError("take_remainder() is only valid after an upgrade, CONNECT or 101")
        self._state = _TUNNEL
        data = bytes(self._stash)
        self._stash.clear()
        return data

    @property
    def paused(self) -> bool:
        """True after an upgrade/CONNECT request, a 101, or a 2xx to CONNECT: the caller decides."""
        return self._state == _PAUSED

    # -- machinery

    def _fail(self, exc: HttpError) -> None:
        self._error = exc
        self._state = _FAILED
        exc.events = [*self._events]

    def _abort(self, status: int, reason: str) -> HttpError:
        """An error raised inside an llhttp callback: llhttp itself only reports "callback error"."""
        exc = HttpError(status if self._BAD == 400 else self._BAD, reason)
        self._cb_error = exc
        return exc

    def _run(self, piece: bytes | memoryview) -> None:
        """Feed one delimited piece to llhttp, turning its errors into HttpError."""
        try:
            self._ll.feed_data(piece)
        except httptools.HttpParserUpgrade as up:
            self._check_pause(up, piece)
        except httptools.HttpParserError as exc:
            raise self._translate(exc) from None

    def _check_pause(self, up: httptools.HttpParserUpgrade, piece: bytes | memoryview) -> None:
        # llhttp pauses right after the head of an upgrade/CONNECT request (and a 101). It is only
        # ever given head bytes there, so the pause must be at the end of the piece.
        if up.args and up.args[0] != len(piece):
            raise self._abort(400, "message boundary mismatch after upgrade")

    def _feed_head(self, data: bytes, pos: int, n: int) -> int:
        size = self._head_size
        if not size and data[pos] in _CRLF_BYTES:
            # RFC 9112 §2.2: ignore empty lines before the start line. llhttp skips them too, but
            # medlb must, to find the head's own CRLFCRLF.
            while pos < n and data[pos] in _CRLF_BYTES:
                pos += 1
            if pos == n:
                return n
        end = -1
        tail = self._tail
        if tail:  # a CRLFCRLF may straddle the previous piece and this one
            j = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
            if j >= 0:
                end = pos + j + 4 - len(tail)
        if end < 0:
            end = data.find(b"\r\n\r\n", pos)
            if end >= 0:
                end += 4
        stop = end if end >= 0 else n
        size += stop - pos
        if size > self._max_head:  # checked before llhttp sees (and httptools buffers) the bytes
            raise self._head_too_large(data, pos, stop)
        piece = data if (pos == 0 and stop == n) else data[pos:stop]
        self._feeding_head = True
        try:  # _run(), inlined: this is the per-request hot path
            self._ll.feed_data(piece)
        except httptools.HttpParserUpgrade as up:
            self._check_pause(up, piece)
        except httptools.HttpParserError as exc:
            raise self._translate(exc) from None
        self._feeding_head = False
        if end < 0:
            self._head_size = size
            self._tail = piece[-3:] if len(piece) >= 3 else (tail + piece)[-3:]
            if not self._line_seen:  # a head split across reads: check its start line early
                line = self._line + piece
                nl = line.find(b"\n")
                if nl >= 0:
                    self._line_seen = True
                    self._line = b""
                    self._check_start_line(line[:nl])
                else:
                    self._line = line
            return n
        if not self._head_done:
            if not self._line_seen:  # e.g. the HTTP/2 preface "PRI * HTTP/2.0": llhttp waits for "SM"
                line = self._line + piece
                self._check_start_line(line[: line.find(b"\n")])
            raise self._abort(400, "message boundary mismatch in head")
        self._head_done = False
        self._head_size = 0
        self._tail = b""
        if self._line_seen:
            self._line_seen = False
        elif self._line:
            self._line = b""
        if self._mc and self._framing == _NONE:  # the common bodiless request: done already
            self._end_message()
        else:
            self._after_head()
        return stop

    def _after_head(self) -> None:
        framing = self._framing
        # llhttp and medlb agree on framing except where a proxy knows more (HEAD/CONNECT
        # responses) or llhttp stops early (it treats an upgrade request's body as the new
        # protocol). Then llhttp is replaced: primed with a synthetic head for the body, or fresh.
        if (framing == _NONE) is not self._mc:
            if framing == _NONE:
                self._ll = self._new_ll()
            else:
                self._ll = self._prime()
                self._primed = True
        self._mc = False
        if framing == _NONE:
            self._end_message()
        else:
            self._state = framing
            self._overhead = 0

    def _feed_cl(self, data: bytes, pos: int, n: int) -> int:
        rem = self._remaining
        piece: bytes | memoryview
        if n - pos <= rem:
            stop = n
            piece = data if pos == 0 else memoryview(data)[pos:]
        else:
            stop = pos + rem
            piece = memoryview(data)[pos:stop]
        self._run(piece)
        rem -= stop - pos
        self._remaining = rem
        if not rem:
            if not self._mc:
                raise self._abort(400, "message boundary mismatch in body")
            self._end_message()
        return stop

    def _feed_chunked(self, data: bytes, pos: int, n: int) -> int:
        while True:
            end = -1
            tail = self._tail
            if tail:
                j = (tail + data[pos : pos + 3]).find(b"\r\n\r\n")
                if j >= 0:
                    end = pos + j + 4 - len(tail)
            if end < 0:
                end = data.find(b"\r\n\r\n", pos)
                if end >= 0:
                    end += 4
            stop = end if end >= 0 else n
            self._progress = False
            self._run(data if (pos == 0 and stop == n) else memoryview(data)[pos:stop])
            if self._mc:
                self._tail = b""
                self._end_message()
                return stop
            # Chunk-size lines, extensions and trailers are framing, not payload: bound what may
            # pass between two pieces of data (httptools buffers a trailer value until it ends).
            if self._progress:
                self._overhead = 0
            else:
                self._overhead += stop - pos
                if self._overhead > self._max_head:
                    raise self._abort(431, "chunk framing or trailer section too large")
            self._tail = data[stop - 3 : stop] if stop - pos >= 3 else (tail + data[pos:stop])[-3:]
            pos = stop
            if pos >= n:
                return n

    def _end_message(self) -> None:
        trailers = self._headers  # a fresh list since the head: only trailer fields land there
        if trailers:
            problem = _check_trailers(trailers, self._limits)
            if problem is not None:
                raise self._abort(*problem)
        self._events.append(EndOfMessage(trailers))
        self._headers = []
        self._mc = False
        self._state = self._after
        if self._primed:  # a primed llhttp forwards no heads: the next message needs a fresh one
            self._primed = False
            self._ll = self._new_ll()

    def _eof(self, what: str) -> None:
        """Shared ``feed_eof`` logic: raise if the peer closed inside a message."""
        if self._error is not None:
            raise HttpError(self._error.status, self._error.reason)
        state = self._state
        if (state == _HEAD and self._head_size) or state in (_CL, _CHUNKED):
            exc = HttpError(self._BAD, f"connection closed in the middle of a {what}")
            self._events = []
            self._fail(exc)
            raise exc

    # -- llhttp callbacks shared by both directions

    def _on_header(
        self,
        name: bytes,
        value: bytes,
        _kind: Callable[[bytes], int | None] = _KIND_EXACT.get,
        _lengths: frozenset[int] = _SPECIAL_LENGTHS,
    ) -> None:
        # The hot path: runs for every field (hence the lookups bound as defaults). llhttp strips
        # leading OWS only; rstrip returns the same object when there is nothing to strip.
        value = value.rstrip(b" \t")
        self._headers.append((name, value))
        kind = _kind(name)
        if kind or (kind is None and len(name) in _lengths):
            self._special.append((name, value))

    def _on_body(self, data: bytes) -> None:
        self._progress = True
        self._events.append(Body(data))

    def _on_message_complete(self) -> None:
        self._mc = True

    def _on_message_begin(self) -> None:
        raise NotImplementedError

    def _common_fields(
        self, version: bytes, request: bool
    ) -> tuple[bytes | None, int | None, bool, bool, bool, bool, bool]:
        """Sort the noted fields: (host, content_length, chunked, close, keep_alive, upgrade, expect).

        ``upgrade`` is a ``Connection: upgrade`` token together with an ``Upgrade`` field.
        """
        bad = self._BAD
        if len(self._headers) > self._limits.max_headers:
            raise self._abort(431, f"more than {self._limits.max_headers} header fields")
        host: bytes | None = None
        content_length: int | None = None
        te: list[bytes] | None = None
        connection: list[bytes] | None = None
        expect = upgrade_field = False
        for name, value in self._special:
            kind = _KIND_EXACT.get(name) or _KIND.get(name.lower())
            if kind is None:
                # CGI/WSGI turn "-" into "_": Content_Length would become CONTENT_LENGTH on the
                # server (requests only: clients do not map names).
                if request and b"_" in name and name.lower().replace(b"_", b"-") in _FRAMING:
                    raise self._abort(400, f"framing field spelled with an underscore: {name!r}")
            elif kind == _HOST_F:
                if host is not None and request:
                    raise self._abort(400, "more than one Host field")
                host = value
            elif kind == _CL_F:
                if content_length is not None:  # llhttp rejects it first; keep the rule local
                    raise self._abort(400, "more than one Content-Length field")
                content_length = _content_length(value)
                if content_length is None:
                    raise self._abort(400 if not value.isdigit() else 413, f"bad Content-Length {value!r}")
            elif kind == _TE_F:
                if te is None:
                    te = []
                te.append(value)
            elif kind == _CONNECTION_F:
                if connection is None:
                    connection = []
                connection.append(value)
            elif kind == _EXPECT_F:
                expect = expect or value.lower() == b"100-continue"
            else:
                upgrade_field = True

        chunked = False
        if te is not None:
            if version == b"1.0":  # RFC 9112 §6.1: treat as faulty framing
                raise self._abort(bad, "Transfer-Encoding in an HTTP/1.0 message")
            if content_length is not None:  # §6.1: smuggling attempt; llhttp rejects it first
                raise self._abort(bad, "both Content-Length and Transfer-Encoding")
            codings = _codings(te)
            if codings != [b"chunked"]:
                if b"" in codings:
                    raise self._abort(bad, "empty transfer-coding")
                if codings[-1] != b"chunked":  # §6.3 ¶4: a request MUST get a 400
                    raise self._abort(bad, "chunked is not the final transfer-coding")
                if b"chunked" in codings[:-1]:
                    raise self._abort(bad, "chunked applied more than once")
                # §6.1: a coding medlb does not implement; it could not re-frame the body.
                raise self._abort(501, f"transfer-coding not implemented: {b', '.join(codings[:-1])!r}")
            chunked = True

        close = keep_alive = conn_upgrade = False
        if connection is not None:
            close, keep_alive, conn_upgrade = _connection(connection)
        return host, content_length, chunked, close, keep_alive, conn_upgrade and upgrade_field, expect


class _PrimedCallbacks:
    """Callbacks of an llhttp parser primed with a synthetic head to parse a body only.

    Used when llhttp's framing stopped short of medlb's: an upgrade request with a body (llhttp
    treats that body as the new protocol; HAProxy, and medlb, parse it as HTTP and switch only after
    the request is complete). The synthetic head's own callbacks are swallowed.
    """

    __slots__ = ("_live", "_owner")

    def __init__(self, owner: RequestParser) -> None:
        self._owner = owner
        self._live = False

    def on_message_begin(self) -> None:
        if self._live:  # a second message on a primed parser: boundary mismatch
            self._owner._on_message_begin()

    def on_headers_complete(self) -> None:
        self._live = True

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._live:
            self._owner._on_header(name, value)

    def on_body(self, data: bytes) -> None:
        self._owner._on_body(data)

    def on_message_complete(self) -> None:
        if self._live:
            self._owner._on_message_complete()


class RequestParser(_Parser[RequestEvent]):
    """Parse the client side of an HTTP/1.x connection into :data:`RequestEvent` lists.

    ``feed(data)`` returns the events of every complete part found (several pipelined requests in
    order). It raises :class:`HttpError` with 400, 413, 414, 431, 501 or 505; see the module
    docstring for what happens after errors, ``Connection: close``, upgrades and CONNECT.
    """

    __slots__ = ("_body_seen", "_max_body", "_max_uri", "_target")

    _ll: httptools.HttpRequestParser
    _BAD = 400

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._max_uri = limits.max_uri
        self._max_body = limits.max_body
        self._body_seen = 0
        self._target = b""
        super().__init__(limits)

    def feed_eof(self) -> list[RequestEvent]:
        """The client closed its side. Raises 400 if it did so in the middle of a request."""
        self._eof("request")
        return []

    def resume(self) -> list[RequestEvent]:
        """The server refused the upgrade: parse the kept bytes (and later ones) as HTTP again."""
        if self._state != _PAUSED:
            raise RuntimeError("resume() is only valid while paused after an upgrade or CONNECT")
        self._state = _HEAD
        self._ll = self._new_ll()
        data = bytes(self._stash)
        self._stash.clear()
        return self.feed(data) if data else []

    # -- llhttp

    def _new_ll(self) -> httptools.HttpRequestParser:
        cb = self._callbacks(self._on_request_head)
        cb.on_url = self._on_url
        return httptools.HttpRequestParser(cb)

    def _prime(self) -> httptools.HttpRequestParser:
        ll = httptools.HttpRequestParser(_PrimedCallbacks(self))
        if self._framing == _CHUNKED:
            ll.feed_data(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        else:
            ll.feed_data(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % self._remaining)
        return ll

    def _translate(self, exc: httptools.HttpParserError) -> HttpError:
        if self._cb_error is not None:
            return self._cb_error
        reason = str(exc)
        return HttpError(505 if reason in _VERSION_ERRORS else 400, f"malformed request: {reason}")

    def _head_too_large(self, data: bytes, pos: int, stop: int) -> HttpError:
        if self._line_seen or data.find(b"\n", pos, stop) >= 0:
            return HttpError(431, f"request head larger than {self._max_head} bytes")
        return HttpError(414, f"request line longer than {self._max_head} bytes")

    def _check_start_line(self, line: bytes) -> None:
        # Only reached while the head is incomplete: llhttp would wait for header fields after
        # an HTTP/0.9 line, so answer now instead of after the client's timeout.
        words = line.rstrip(b"\r").split()
        if len(words) == 2:
            raise HttpError(400, "HTTP/0.9 request")
        if len(words) == 3 and _VERSION_TOKEN.fullmatch(words[2]) and words[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
            raise HttpError(400 if words[2] == b"HTTP/0.9" else 505, f"{words[2]!r} not supported")

    def _on_message_begin(self) -> None:
        if not self._feeding_head:
            # llhttp saw a new message where medlb saw none: never let the two views diverge.
            raise self._abort(400, "message boundary mismatch")
        self._headers = []
        self._special = []
        self._target = b""
        self._body_seen = 0

    def _on_url(self, url: bytes) -> None:
        if self._target:  # the target arrived in several pieces
            url = self._target + url
        if len(url) > self._max_uri:
            raise self._abort(414, f"request-target longer than {self._max_uri} bytes")
        self._target = url

    def _on_body(self, data: bytes) -> None:
        self._progress = True
        if self._max_body:
            self._body_seen += len(data)
            if self._body_seen > self._max_body:
                raise self._abort(413, f"request body larger than {self._max_body} bytes")
        self._events.append(Body(data))

    def _on_request_head(self) -> None:
        ll = self._ll
        raw_version = ll.get_http_version()
        version = _VERSIONS.get(raw_version)
        if version is None:
            if raw_version in ("0.9", "0.0"):  # Jetty CVE-2017-7656: never treat a line as 0.9
                raise self._abort(400, "HTTP/0.9 request")
            raise self._abort(505, f"HTTP/{raw_version} not supported")
        method = ll.get_method()
        target = self._target
        host, content_length, chunked, close, keep_alive, upgrade, expect = self._common_fields(version, True)

        # -- request-target (RFC 9112 §3.2)
        if b"#" in target:  # HAProxy 2eab6d354: a fragment is never sent; its presence is an attack
            raise self._abort(400, "fragment ('#') in request-target")
        if method == b"CONNECT":
            if not _AUTHORITY_FORM.fullmatch(target):
                raise self._abort(400, "CONNECT needs an authority-form target (host:port)")
        elif not target.startswith(b"/"):
            if target == b"*":
                if method != b"OPTIONS":
                    raise self._abort(400, "asterisk-form target is only valid for OPTIONS")
            else:
                absolute = _ABSOLUTE_FORM.match(target)
                if absolute is None:
                    raise self._abort(400, "request-target is not origin-, absolute- or asterisk-form")
                authority = absolute.group(2)
                if not authority or b"@" in authority or not _valid_host(authority):
                    raise self._abort(400, "bad authority in absolute-form target")
                if host is not None and not _same_authority(authority, host, absolute.group(1).lower()):
                    raise self._abort(400, "Host does not match the absolute-form target")

        # -- Host (RFC 9112 §3.2: exactly one in HTTP/1.1)
        if host is None:
            if version == b"1.1":
                raise self._abort(400, "missing Host field")
        elif not _valid_host(host):
            raise self._abort(400, f"bad Host {host!r}")

        # -- bodies that must not be
        if method == b"CONNECT" and (chunked or content_length):
            raise self._abort(400, "CONNECT with a body")
        if content_length and version == b"1.0" and method in _BODYLESS_HTTP10:
            raise self._abort(400, f"HTTP/1.0 {method.decode()} with a body")  # HAProxy e136bd12a
        if content_length and self._max_body and content_length > self._max_body:
            raise self._abort(413, f"Content-Length {content_length} over {self._max_body}")

        # -- connection management (RFC 9112 §9.3, RFC 9110 §7.8 and §10.1.1)
        if version == b"1.1":
            keep_alive = not close
        else:
            keep_alive = keep_alive and not close
            upgrade = expect = False  # both are ignored in HTTP/1.0
        upgrade = upgrade or method == b"CONNECT"

        if chunked:
            self._framing = _CHUNKED
        elif content_length:
            self._framing = _CL
            self._remaining = content_length
        else:
            self._framing = _NONE
        self._after = _PAUSED if upgrade else (_HEAD if keep_alive else _CLOSED)
        headers = self._headers
        self._headers = []  # trailers, if any, land in a fresh list
        self._head_done = True
        self._events.append(
            RequestHead(method, target, version, headers, content_length, chunked, keep_alive, expect, upgrade, host)
        )


def _same_authority(authority: bytes, host: bytes, scheme: bytes) -> bool:
    """Compare an absolute-form authority with Host, case-insensitively, modulo the default port."""
    a, h = authority.lower(), host.lower()
    if a == h:
        return True
    port = _DEFAULT_PORTS[scheme]
    return a.removesuffix(port) == h.removesuffix(port)


class ResponseParser(_Parser[ResponseEvent]):
    """Parse the server side of an HTTP/1.x connection into :data:`ResponseEvent` lists.

    Call ``expect(method)`` for each request sent, in order, so a response to HEAD (or CONNECT) is
    framed right; with nothing queued, GET is assumed. Interim 1xx responses yield a head and an
    end of message each and do not consume the queued method. Any violation raises
    :class:`HttpError` with status 502.
    """

    __slots__ = ("_methods", "_reason")

    _ll: httptools.HttpResponseParser
    _BAD = 502

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._methods: deque[bytes] = deque()
        self._reason = b""
        super().__init__(limits)

    def expect(self, method: bytes) -> None:
        """Queue the method of a request sent to the server (its response comes in this order)."""
        self._methods.append(method)

    def feed_eof(self) -> list[ResponseEvent]:
        """The server closed: ends a close-delimited body, or raises 502 inside a message."""
        if self._state == _EOF:
            events: list[ResponseEvent] = []
            self._events = events
            self._end_message()
            self._state = _CLOSED
            return events
        self._eof("response")
        return []

    # -- llhttp

    def _new_ll(self) -> httptools.HttpResponseParser:
        cb = self._callbacks(self._on_response_head)
        cb.on_status = self._on_status
        return httptools.HttpResponseParser(cb)

    def _prime(self) -> httptools.HttpResponseParser:  # pragma: no cover - unreachable
        # llhttp never ends a response before medlb does, so no response body needs priming.
        raise AssertionError("responses are never primed")

    def _translate(self, exc: httptools.HttpParserError) -> HttpError:
        if self._cb_error is not None:
            return self._cb_error
        return HttpError(502, f"malformed response: {exc}")

    def _head_too_large(self, data: bytes, pos: int, stop: int) -> HttpError:
        return HttpError(502, f"response head larger than {self._max_head} bytes")

    def _on_message_begin(self) -> None:
        if not self._feeding_head:
            raise self._abort(502, "message boundary mismatch")
        self._headers = []
        self._special = []
        self._reason = b""

    def _on_status(self, reason: bytes) -> None:
        self._reason += reason

    def _on_response_head(self) -> None:
        ll = self._ll
        version = _VERSIONS.get(ll.get_http_version())
        if version is None:
            raise self._abort(502, f"HTTP/{ll.get_http_version()} response")
        status = ll.get_status_code()
        _, content_length, chunked, close, keep_alive, _, _ = self._common_fields(version, False)
        keep_alive = not close if version == b"1.1" else keep_alive and not close

        interim = 100 <= status < 200 and status != 101
        method = self._methods[0] if self._methods else b"GET"
        if not interim and self._methods:
            self._methods.popleft()
        tunnel = status == 101 or (method == b"CONNECT" and 200 <= status < 300)
        if interim or tunnel or status in (204, 304) or method == b"HEAD":
            self._framing = _NONE
        elif chunked:
            self._framing = _CHUNKED
        elif content_length is not None:
            self._framing = _CL if content_length else _NONE
            self._remaining = content_length
        else:
            self._framing = _EOF
            keep_alive = False
        if tunnel:
            self._after = _PAUSED
        elif interim:
            self._after = _HEAD
        else:
            self._after = _HEAD if keep_alive else _CLOSED
        headers = self._headers
        self._headers = []
        self._head_done = True
        self._events.append(ResponseHead(status, self._reason, version, headers, content_length, chunked, keep_alive))

    def _after_head(self) -> None:
        if self._framing == _EOF:
            # llhttp cannot tell the end of a close-delimited body (httptools has no llhttp_finish):
            # medlb passes those bytes through itself and ends the message in feed_eof().
            self._mc = False
            self._state = _EOF
            return
        super()._after_head()


# --------------------------------------------------------------------------- serialization


def _head_bytes(start_line: bytes, headers: Headers, check: bool) -> bytes:
    """Join a start line and fields; with ``check``, refuse anything that would change the message's structure.

    The proxy rewrites fields (X-Forwarded-For, Host, framing): a CR, LF or NUL in a value or a
    non-token name would let a rewrite inject fields or a second message (response splitting).
    Counting CR and LF over the whole output checks every value and the start line in two C scans.
    ``check=False`` is for heads whose every part is already proven: fields as this module parsed
    them (llhttp refuses CR, LF and NUL in values and non-token names) plus values the caller
    built from validated configuration. It is the per-request hot path of the proxy.
    """
    parts = [start_line]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    out = b"".join(parts)
    if not check:
        return out
    if headers:
        names = b" ".join([name for name, _ in headers])
        if not _TOKENS.fullmatch(names) or names.count(b" ") != len(headers) - 1:
            raise ValueError("header field name is not a token")
    lines = len(headers) + 2
    if out.count(b"\n") != lines or out.count(b"\r") != lines or b"\x00" in out:
        raise ValueError("CR, LF or NUL inside a start line or header field")
    return out


def serialize_request_head(head: RequestHead, headers: Headers, *, check: bool = True) -> bytes:
    """Request line of ``head`` plus ``headers`` (the fields to send, as the proxy rewrote them).

    The client's version is kept, as HAProxy does: it tells the server what the client can take
    (an HTTP/1.0 client cannot read a chunked response). The caller owns framing: send either
    ``Content-Length`` or ``Transfer-Encoding: chunked`` matching the body it writes (see
    :func:`with_framing`).
    """
    if check:
        if head.version not in (b"1.1", b"1.0"):
            raise ValueError(f"bad HTTP version {head.version!r}")
        if not _TOKEN.fullmatch(head.method) or not head.target or b" " in head.target:
            raise ValueError("bad method or request-target")
    return _head_bytes(b"%s %s HTTP/%s\r\n" % (head.method, head.target, head.version), headers, check)


def serialize_response_head(head: ResponseHead, headers: Headers, *, check: bool = True) -> bytes:
    """Status line of ``head`` plus ``headers``; the server's version and reason are kept."""
    if check:
        if head.version not in (b"1.1", b"1.0"):
            raise ValueError(f"bad HTTP version {head.version!r}")
        if not 100 <= head.status <= 999:
            raise ValueError(f"bad status {head.status}")
    return _head_bytes(b"HTTP/%s %d %s\r\n" % (head.version, head.status, head.reason), headers, check)


def with_framing(headers: Headers, *, content_length: int | None = None, chunked: bool = False) -> Headers:
    """``headers`` without any received framing field, plus the single one medlb will send.

    Forwarding received ``Content-Length``/``Transfer-Encoding`` fields verbatim invites the
    server to read them differently (case, OWS, list syntax); the proxy re-frames what it parsed.
    """
    if chunked and content_length is not None:
        raise ValueError("a message is either chunked or has a Content-Length")
    out = [(n, v) for n, v in headers if not (len(n) in (14, 17) and n.lower() in _FRAMING)]
    if chunked:
        out.append((b"Transfer-Encoding", b"chunked"))
    elif content_length is not None:
        out.append((b"Content-Length", b"%d" % content_length))
    return out


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body. Empty data gives ``b""``: an empty chunk would end the body."""
    if not data:
        return b""
    return b"%x\r\n%b\r\n" % (len(data), data)


def encode_trailers(trailers: Headers) -> bytes:
    """The last chunk with a trailer section (just :data:`LAST_CHUNK` when there are none)."""
    if not trailers:
        return LAST_CHUNK
    return _head_bytes(b"0\r\n", trailers, True)
