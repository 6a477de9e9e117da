"""Request-smuggling and malformed-request corpus for medlb's HTTP/1.1 front side. Pure data.

Each :class:`Case` is what one client sends on a fresh connection, and what must come out of it:

* ``Rejected(status)``: medlb answers ``status`` and a server behind it sees *nothing* (no complete
  request; a head already forwarded must be aborted, never completed);
* ``Accepted(method, target, body, trailers)``: a server behind medlb sees *exactly one* request,
  equal to this one (the body de-chunked; medlb re-frames it with its own Content-Length or chunked
  encoding).

``limits`` overrides fields of ``medlb.proto.http.Limits`` (``{}`` = defaults: 16384-byte head,
101 fields, 8192-byte target, unlimited body). ``source`` names where the payload or technique comes
from: a CVE, an HTTP Garden finding (narfindustries/http-garden), a HAProxy commit or reg-test, a
PortSwigger Web Security Academy technique, or an RFC rule. Entries marked ``[unverified]`` carry a
CVE number that ``reliability-battery.md`` itself marks unverified.

This module imports nothing from medlb so the end-to-end test (client -> medlb -> recording server)
can use it as is; ``tests/proto/test_http.py`` runs it against the codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Rejected:
    """medlb answers ``status``; nothing reaches a server."""

    status: int


@dataclass(frozen=True)
class Accepted:
    """Exactly one request reaches a server, equal to this."""

    method: bytes
    target: bytes
    body: bytes = b""
    trailers: tuple[tuple[bytes, bytes], ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    source: str
    raw: bytes
    expect: Rejected | Accepted
    limits: dict[str, int] = field(default_factory=dict)
    note: str = ""


H = b"Host: example.org\r\n"
SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: example.org\r\n\r\n"


def post(*fields: bytes, body: bytes = b"", version: bytes = b"1.1", method: bytes = b"POST") -> bytes:
    """A request with ``Host`` and the given raw field lines (each without its CRLF)."""
    head = method + b" / HTTP/" + version + b"\r\n" + H + b"".join(f + b"\r\n" for f in fields)
    return head + b"\r\n" + body


def chunked(body: bytes, *fields: bytes) -> bytes:
    """A chunked POST with the given raw chunked body."""
    return post(b"Transfer-Encoding: chunked", *fields, body=body)


def line(request_line: bytes, *fields: bytes) -> bytes:
    return request_line + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n"


PORTSWIGGER = "PortSwigger Web Security Academy, HTTP request smuggling"
TE_OBFUSCATION = PORTSWIGGER + ": obfuscating the TE header (TE.TE)"
INT_PARSE = "CVE-2023-47627 (aiohttp int()), CVE-2022-24761 (waitress int()), HTTP Garden server bug #1"

CORPUS: tuple[Case, ...] = (
    # ---------------------------------------------------------------- CL with TE, and Transfer-Encoding obfuscation
    Case(
        "cl-te-classic",
        PORTSWIGGER + ": CL.TE; RFC 9112 §6.1; CVE-2019-20445 (Netty), CVE-2015-5741 (Go)",
        post(b"Content-Length: 13", b"Transfer-Encoding: chunked", body=b"0\r\n\r\nSMUGGLED"),
        Rejected(400),
    ),
    Case(
        "te-cl-classic",
        PORTSWIGGER + ": TE.CL; CVE-2017-7658 (Jetty)",
        post(b"Transfer-Encoding: chunked", b"Content-Length: 3", body=b"8\r\nSMUGGLED\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-xchunked-with-cl",
        TE_OBFUSCATION,
        post(b"Content-Length: 4", b"Transfer-Encoding: xchunked", body=b"1\r\nZ\r\nQ\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-space-before-colon-with-cl",
        TE_OBFUSCATION + "; CVE-2019-16869 (Netty), CVE-2021-22959 (llhttp)",
        post(b"Content-Length: 5", b"Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-leading-space-line-with-cl",
        TE_OBFUSCATION + "; CVE-2020-7238 (Netty)",
        post(b" Transfer-Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-after-bare-lf",
        TE_OBFUSCATION + " (X: X[\\n]Transfer-Encoding); CVE-2022-32214 (llhttp)",
        post(b"Content-Length: 5", b"X: X\nTransfer-Encoding: chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-newline-before-colon",
        TE_OBFUSCATION + " (Transfer-Encoding[\\n]: chunked)",
        post(b"Content-Length: 5", b"Transfer-Encoding\n: chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-obs-fold",
        "CVE-2022-32215 (llhttp multi-line Transfer-Encoding); RFC 9112 §5.2",
        post(b"Content-Length: 5", b"Transfer-Encoding:", b" chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-second-field-junk",
        TE_OBFUSCATION + "; CVE-2020-8287 (Node.js duplicate Transfer-Encoding)",
        post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: x", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-chunked-twice-fields",
        "RFC 9112 §7 (chunked MUST NOT be applied twice); CVE-2024-1135 (gunicorn)",
        post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-chunked-twice-list",
        "RFC 9112 §7; HAProxy reg-test http-messaging/http_transfer_encoding.vtc",
        post(b"Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-identity",
        "CVE-2021-33037 (Tomcat honoured 'identity'); RFC 9112 §6.3 ¶4",
        post(b"Transfer-Encoding: identity", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-chunked-not-final",
        "CVE-2021-33037 (Tomcat: chunked not final); CVE-2019-18277 (HAProxy) [unverified]; RFC 9112 §6.3 ¶4",
        post(b"Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-gzip-chunked",
        "RFC 9112 §6.1 (501 for an unimplemented transfer-coding)",
        post(b"Transfer-Encoding: gzip, chunked", body=b"0\r\n\r\n"),
        Rejected(501),
        note="medlb forwards only the chunked coding",
    ),
    Case(
        "te-empty",
        "HAProxy 428451fe9 / 4a2dd6f37 (reject empty Transfer-Encoding)",
        post(b"Transfer-Encoding: ", b"Content-Length: 5", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-empty-list-element",
        "CVE-2022-32213 (llhttp Transfer-Encoding parsing); RFC 9110 §5.6.1",
        post(b"Transfer-Encoding: ,chunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-trailing-comma",
        "CVE-2019-15605 (Node.js malformed Transfer-Encoding)",
        post(b"Transfer-Encoding: chunked,", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-quoted",
        TE_OBFUSCATION,
        post(b'Transfer-Encoding: "chunked"', body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-parameter",
        "CVE-2022-1705 (Go net/http accepted invalid Transfer-Encoding)",
        post(b"Transfer-Encoding: chunked;q=1", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-vertical-tab",
        TE_OBFUSCATION + " (control character around the value)",
        post(b"Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "te-in-http10",
        "CVE-2021-33037 (Tomcat ignored TE for HTTP/1.0); RFC 9112 §6.1",
        post(b"Transfer-Encoding: chunked", body=b"0\r\n\r\n", version=b"1.0"),
        Rejected(400),
    ),
    Case(
        "te-underscore",
        "nginx underscores_in_headers off; CGI/WSGI map '-' to '_' (HTTP_TRANSFER_ENCODING)",
        post(b"Transfer_Encoding: chunked", b"Content-Length: 5", body=b"0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "cl-underscore",
        "nginx underscores_in_headers off; CGI/WSGI map '-' to '_' (CONTENT_LENGTH)",
        post(b"Content_Length: 5", body=b"hello"),
        Rejected(400),
    ),
    Case(
        "te-tab-ows",
        TE_OBFUSCATION + " (Transfer-Encoding:[tab]chunked is valid OWS: parse it as chunked)",
        post(b"Transfer-Encoding:\tchunked", body=b"5\r\nhello\r\n0\r\n\r\n"),
        Accepted(b"POST", b"/", b"hello"),
    ),
    Case(
        "te-uppercase",
        "RFC 9112 §7 (transfer-coding names are case-insensitive)",
        post(b"Transfer-Encoding: CHUNKED", body=b"5\r\nhello\r\n0\r\n\r\n"),
        Accepted(b"POST", b"/", b"hello"),
        note="medlb re-frames with lowercase 'chunked', so a case-sensitive server cannot disagree",
    ),
    # ---------------------------------------------------------------- Content-Length
    Case(
        "cl-empty",
        "CVE-2023-40225 (HAProxy 6492f1f29, HTTP Garden)",
        post(b"Content-Length: ", body=SMUGGLED),
        Rejected(400),
    ),
    Case("cl-plus", INT_PARSE, post(b"Content-Length: +5", body=b"hello"), Rejected(400)),
    Case("cl-minus", INT_PARSE, post(b"Content-Length: -1", body=b"hello"), Rejected(400)),
    Case("cl-hex", INT_PARSE, post(b"Content-Length: 0x5", body=b"hello"), Rejected(400)),
    Case("cl-underscore-digits", INT_PARSE, post(b"Content-Length: 1_0", body=b"0123456789"), Rejected(400)),
    Case("cl-inner-space", INT_PARSE, post(b"Content-Length: 1 0", body=b"0123456789"), Rejected(400)),
    Case(
        "cl-unicode-digit",
        INT_PARSE + " (int() reads Arabic-Indic digits)",
        post(b"Content-Length: \xd9\xa5", body=b"hello"),
        Rejected(400),
    ),
    Case("cl-trailing-garbage", "RFC 9110 §8.6 (1*DIGIT)", post(b"Content-Length: 5x", body=b"hello"), Rejected(400)),
    Case(
        "cl-list-equal",
        "RFC 9112 §6.3 ¶5 (a list MAY be accepted; medlb rejects it)",
        post(b"Content-Length: 5, 5", body=b"hello"),
        Rejected(400),
    ),
    Case(
        "cl-duplicate-equal",
        "CVE-2015-5740 (Go double Content-Length); CVE-2021-40346 mitigation (hdr_cnt(content-length) gt 1)",
        post(b"Content-Length: 5", b"Content-Length: 5", body=b"hello"),
        Rejected(400),
        note="RFC 9112 allows identical duplicates; medlb rejects them (one interpretation only)",
    ),
    Case(
        "cl-duplicate-different",
        "CVE-2017-7658 (Jetty ignored the second Content-Length)",
        post(b"Content-Length: 5", b"Content-Length: 44", body=b"hello" + SMUGGLED),
        Rejected(400),
    ),
    Case(
        "cl-overflow",
        "CVE-2017-7657 class (length overflow); reliability-battery.md §1.6 pattern",
        post(b"Content-Length: 18446744073709551621", body=b"hello"),
        Rejected(400),
    ),
    Case(
        "cl-19-digits",
        "reliability-battery.md §1.6 (range-check every length field)",
        post(b"Content-Length: 1000000000000000000", body=b"hello"),
        Rejected(413),
    ),
    Case(
        "cl-name-with-space",
        "CVE-2015-5739 (Go read 'Content Length' as Content-Length)",
        post(b"Content Length: 5", body=b"hello"),
        Rejected(400),
    ),
    Case(
        "cl-http10-get-body",
        "HAProxy e136bd12a (reject HTTP/1.0 GET/HEAD/DELETE with a payload)",
        post(b"Content-Length: 44", body=SMUGGLED, version=b"1.0", method=b"GET"),
        Rejected(400),
    ),
    Case(
        "cl-leading-zeros",
        "RFC 9110 §8.6 (1*DIGIT)",
        post(b"Content-Length: 0005", body=b"hello"),
        Accepted(b"POST", b"/", b"hello"),
    ),
    Case(
        "cl-http10-post",
        "RFC 9112 §6.2",
        post(b"Content-Length: 5", body=b"hello", version=b"1.0"),
        Accepted(b"POST", b"/", b"hello"),
    ),
    Case(
        "cl-body-is-a-request",
        PORTSWIGGER + " (the smuggled request stays inside the declared body)",
        post(b"Content-Length: %d" % len(SMUGGLED), body=SMUGGLED),
        Accepted(b"POST", b"/", SMUGGLED),
    ),
    Case(
        "cl-haproxy-name-length-overflow",
        "CVE-2021-40346 (HAProxy 3b69886f7, JFrog): 'Content-Length0aaa...' header name",
        post(
            b"Content-Length0" + b"a" * 255 + b":",
            b"Content-Length: %d" % len(SMUGGLED),
            body=SMUGGLED,
        ),
        Accepted(b"POST", b"/", SMUGGLED),
        note="the long name is an ordinary field; only the real Content-Length frames the body",
    ),
    # ---------------------------------------------------------------- chunked framing
    Case("chunk-size-underscore", INT_PARSE + " (payload 0_2e)", chunked(b"0_2e\r\n\r\n"), Rejected(400)),
    Case("chunk-size-0x", INT_PARSE, chunked(b"0x2\r\nab\r\n0\r\n\r\n"), Rejected(400)),
    Case("chunk-size-plus", INT_PARSE, chunked(b"+2\r\nab\r\n0\r\n\r\n"), Rejected(400)),
    Case("chunk-size-minus", INT_PARSE, chunked(b"-1\r\nab\r\n0\r\n\r\n"), Rejected(400)),
    Case("chunk-size-leading-space", INT_PARSE, chunked(b" 2\r\nab\r\n0\r\n\r\n"), Rejected(400)),
    Case(
        "chunk-size-trailing-space",
        "HTTP Garden (whitespace after chunk-size); llhttp lenient_spaces_after_chunk_size (off)",
        chunked(b"2 \r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-size-lf-only",
        "HAProxy 7b737da / 4837e9989 (HTTP Garden: bare LF ends a chunk-size line)",
        chunked(b"2\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-data-lf-only",
        "HTTP Garden (bare LF after chunk data); CVE-2022-32214 (llhttp)",
        chunked(b"2\r\nab\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "last-chunk-lf-only",
        "HAProxy 4837e9989 (no LF-only chunk-size line endings)",
        chunked(b"0\n\n"),
        Rejected(400),
    ),
    Case(
        "chunk-size-overflow",
        "CVE-2017-7657 (Jetty chunk length integer overflow)",
        chunked(b"10000000000000002\r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-data-too-long",
        "RFC 9112 §7.1 (chunk-data is exactly chunk-size octets)",
        chunked(b"2\r\nabc\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-data-too-short",
        "RFC 9112 §7.1",
        chunked(b"3\r\nab\r\n0\r\n\r\n" + SMUGGLED),
        Rejected(400),
    ),
    Case(
        "chunk-ext-lf",
        "CVE-2024-52304 (aiohttp: newline in chunk extension)",
        chunked(b"2;a\nb\r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-ext-bare-cr",
        "CVE-2021-22960 (llhttp chunk extension parsing)",
        chunked(b"2;a\rb\r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-ext-nul",
        "HTTP Garden (NUL bytes forwarded)",
        chunked(b"2;a\x00b\r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-size-bare-semicolon",
        "RFC 9112 §7.1.1 (chunk-ext = *( BWS ';' BWS ext-name ... ))",
        chunked(b"2;\r\nab\r\n0\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "chunk-ext-valid",
        "RFC 9112 §7.1.1 (medlb drops extensions when it re-frames)",
        chunked(b'2;name=value;q="x y"\r\nab\r\n0;last\r\n\r\n'),
        Accepted(b"POST", b"/", b"ab"),
    ),
    Case(
        "chunk-size-leading-zeros",
        "HTTP Garden (long chunk-size digits); llhttp checks the value, not the digit count",
        chunked(b"0000000000000000002\r\nab\r\n0\r\n\r\n"),
        Accepted(b"POST", b"/", b"ab"),
        note="accepted: the value is exact; medlb re-frames, so the server never sees the zeros",
    ),
    Case(
        "chunk-size-uppercase-hex",
        "RFC 9112 §7.1 (chunk-size = 1*HEXDIG)",
        chunked(b"A\r\n0123456789\r\n0\r\n\r\n"),
        Accepted(b"POST", b"/", b"0123456789"),
    ),
    Case(
        "chunked-body-is-a-request",
        PORTSWIGGER + " (the smuggled request stays inside the chunk data)",
        chunked(b"%x\r\n" % len(SMUGGLED) + SMUGGLED + b"\r\n0\r\n\r\n"),
        Accepted(b"POST", b"/", SMUGGLED),
    ),
    Case(
        "chunked-trailers",
        "RFC 9112 §7.1.2",
        chunked(b"5\r\nhello\r\n0\r\nX-Checksum: 5d41\r\nX-Other: 1\r\n\r\n"),
        Accepted(b"POST", b"/", b"hello", ((b"X-Checksum", b"5d41"), (b"X-Other", b"1"))),
    ),
    Case(
        "trailer-content-length",
        "RFC 9110 §6.5.1 (no framing fields in trailers)",
        chunked(b"5\r\nhello\r\n0\r\nContent-Length: 44\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "trailer-transfer-encoding",
        "RFC 9110 §6.5.1",
        chunked(b"5\r\nhello\r\n0\r\nTransfer-Encoding: chunked\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "trailer-host",
        "RFC 9110 §6.5.1 (no routing fields in trailers)",
        chunked(b"5\r\nhello\r\n0\r\nHost: evil.example\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "trailer-obs-fold",
        "RFC 9112 §5.2",
        chunked(b"5\r\nhello\r\n0\r\nX: a\r\n b\r\n\r\n"),
        Rejected(400),
    ),
    Case(
        "trailer-nul",
        "HAProxy 0d76a284 (HTTP Garden: NUL in field values)",
        chunked(b"5\r\nhello\r\n0\r\nX: a\x00b\r\n\r\n"),
        Rejected(400),
    ),
    # ---------------------------------------------------------------- field syntax
    Case(
        "field-nul-value",
        "HAProxy 0d76a284 (HTTP Garden: NUL in field values forwarded)",
        post(b"X-Foo: a\x00b", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-nul-name",
        "HAProxy option accept-unsafe-violations-in-http-request (NUL in names)",
        post(b"X-F\x00o: a", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-bare-cr-in-value",
        "CVE-2023-30589 (llhttp: CR not followed by LF)",
        post(b"X-Foo: a\rContent-Length: 44", body=SMUGGLED),
        Rejected(400),
    ),
    Case(
        "field-lf-only-line",
        "CVE-2022-32214 (llhttp: bare LF as a line end); CVE-2022-35256",
        post(b"X-Foo: a\nContent-Length: 44", body=SMUGGLED),
        Rejected(400),
    ),
    Case(
        "field-no-colon",
        "CVE-2019-20444 (Netty accepted a field line without a colon)",
        post(b"X-Foo", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-empty-name",
        "CVE-2023-25725 (HAProxy a8598a2eb: empty field name)",
        post(b": empty", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-space-before-colon",
        "CVE-2021-22959 (llhttp), CVE-2019-16869 (Netty); RFC 9112 §5.1",
        post(b"Content-Length : 44", body=SMUGGLED),
        Rejected(400),
    ),
    Case(
        "field-obs-fold",
        "RFC 9112 §5.2 (obs-fold: reject with 400)",
        post(b"X-Foo: a", b" folded", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-non-token-name",
        "RFC 9110 §5.1 (field-name = token)",
        post(b"X(Foo): a", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-del-in-value",
        "RFC 9110 §5.5 (field-vchar excludes DEL)",
        post(b"X-Foo: a\x7fb", b"Content-Length: 0"),
        Rejected(400),
    ),
    Case(
        "field-obs-text-value",
        "RFC 9110 §5.5 (obs-text is allowed in values)",
        post(b"X-Name: caf\xc3\xa9", b"Content-Length: 0"),
        Accepted(b"POST", b"/"),
    ),
    # ---------------------------------------------------------------- request line and target
    Case(
        "target-fragment",
        "HAProxy 2eab6d354 (CVE-2023-45539 [unverified]); reg-test h1_authority_fragment_char.vtc",
        line(b"GET /index.html#/../admin HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-high-byte",
        "HAProxy accept-unsafe-violations-in-http-request (bytes above 127 in the URI)",
        line(b"GET /caf\xc3\xa9 HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-control-char",
        "HAProxy reg-test h1_request_target_validation.vtc",
        line(b"GET /a\x01b HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-space",
        "RFC 9112 §3 (request-line = method SP request-target SP HTTP-version)",
        line(b"GET /a b HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-tab",
        "RFC 9112 §3.2",
        line(b"GET /a\tb HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-relative",
        "RFC 9112 §3.2 (origin-, absolute-, authority- or asterisk-form only)",
        line(b"GET a/b HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "target-asterisk-get",
        "RFC 9112 §3.2.4 (asterisk-form only for OPTIONS)",
        line(b"GET * HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "absolute-form-userinfo",
        "HAProxy reg-test h1_host_normalization.vtc; RFC 9110 §4.2.4 (userinfo is deprecated)",
        line(b"GET http://admin@internal.example/ HTTP/1.1", b"Host: internal.example"),
        Rejected(400),
    ),
    Case(
        "absolute-form-host-mismatch",
        "HAProxy accept-unsafe-violations-in-http-request (Host must match the authority)",
        line(b"GET http://internal.example/admin HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "connect-origin-form",
        "RFC 9112 §3.2.3 (CONNECT takes authority-form)",
        line(b"CONNECT /admin HTTP/1.1", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "connect-with-body",
        "RFC 9110 §9.3.6 (CONNECT has no content)",
        line(b"CONNECT example.org:443 HTTP/1.1", b"Host: example.org:443", b"Content-Length: 5") + b"hello",
        Rejected(400),
    ),
    Case(
        "http09-request",
        "CVE-2017-7656 (Jetty HTTP/0.9 handling)",
        b"GET /\r\n\r\n",
        Rejected(400),
    ),
    Case(
        "http09-declared",
        "CVE-2017-7656 (Jetty accepted 'HTTP/0.9' in an HTTP/1 request line)",
        line(b"GET / HTTP/0.9", b"Host: example.org"),
        Rejected(400),
    ),
    Case("http12", "RFC 9112 §2.3; HAProxy (odd HTTP versions)", line(b"GET / HTTP/1.2", H[:-2]), Rejected(505)),
    Case("http20-request-line", "RFC 9112 §2.3", line(b"GET / HTTP/2.0", H[:-2]), Rejected(505)),
    Case(
        "http-lowercase", "RFC 9112 §2.3 (HTTP-name is case-sensitive)", line(b"GET / http/1.1", H[:-2]), Rejected(400)
    ),
    Case(
        "http-version-trailing-space",
        "RFC 9112 §3",
        line(b"GET / HTTP/1.1 ", H[:-2]),
        Rejected(400),
    ),
    Case(
        "h2-prior-knowledge-preface",
        "RFC 9113 §3.4 (the preface is not an HTTP/1.1 request)",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        Rejected(505),
    ),
    Case(
        "method-lowercase", "RFC 9110 §9.1 (methods are case-sensitive)", line(b"get / HTTP/1.1", H[:-2]), Rejected(400)
    ),
    Case("method-unknown", "llhttp method table", line(b"FOO / HTTP/1.1", H[:-2]), Rejected(400)),
    Case(
        "absolute-form",
        "RFC 9112 §3.2.2 (servers MUST accept absolute-form)",
        line(b"GET http://example.org/a?b=c HTTP/1.1", b"Host: example.org"),
        Accepted(b"GET", b"http://example.org/a?b=c"),
    ),
    Case(
        "absolute-form-default-port",
        "HAProxy reg-test h1_host_normalization.vtc (default port is the same authority)",
        line(b"GET http://example.org:80/ HTTP/1.1", b"Host: example.org"),
        Accepted(b"GET", b"http://example.org:80/"),
    ),
    Case(
        "options-asterisk",
        "RFC 9112 §3.2.4",
        line(b"OPTIONS * HTTP/1.1", b"Host: example.org"),
        Accepted(b"OPTIONS", b"*"),
    ),
    Case(
        "leading-empty-lines",
        "RFC 9112 §2.2 (ignore at least one empty line before the request-line)",
        b"\r\n\r\n" + line(b"GET / HTTP/1.1", b"Host: example.org"),
        Accepted(b"GET", b"/"),
    ),
    Case(
        "target-unencoded-specials",
        "llhttp URL table; real clients send '|', '{', '}' unencoded in queries",
        line(b"GET /search?q={a|b}&x=%20 HTTP/1.1", b"Host: example.org"),
        Accepted(b"GET", b"/search?q={a|b}&x=%20"),
    ),
    # ---------------------------------------------------------------- Host
    Case("host-missing", "RFC 9112 §3.2 (MUST 400)", line(b"GET / HTTP/1.1", b"X: y"), Rejected(400)),
    Case(
        "host-duplicate",
        "RFC 9112 §3.2 (more than one Host: 400)",
        line(b"GET / HTTP/1.1", b"Host: example.org", b"Host: internal.example"),
        Rejected(400),
    ),
    Case(
        "host-duplicate-equal",
        "RFC 9112 §3.2",
        line(b"GET / HTTP/1.1", b"Host: example.org", b"Host: example.org"),
        Rejected(400),
    ),
    Case(
        "host-userinfo",
        "RFC 9112 §3.2 (Host = uri-host [':' port]); HTTP Garden (Host with '@')",
        line(b"GET / HTTP/1.1", b"Host: example.org@internal.example"),
        Rejected(400),
    ),
    Case(
        "host-space",
        "RFC 9112 §3.2",
        line(b"GET / HTTP/1.1", b"Host: example.org internal.example"),
        Rejected(400),
    ),
    Case(
        "host-bad-port",
        "RFC 3986 §3.2.3 (port = *DIGIT)",
        line(b"GET / HTTP/1.1", b"Host: example.org:80x"),
        Rejected(400),
    ),
    Case(
        "host-missing-http10",
        "RFC 9112 §3.2 (Host is required in HTTP/1.1 only)",
        line(b"GET / HTTP/1.0"),
        Accepted(b"GET", b"/"),
    ),
    Case(
        "host-ipv6-literal",
        "RFC 3986 §3.2.2 (IP-literal)",
        line(b"GET / HTTP/1.1", b"Host: [2001:db8::1]:8080"),
        Accepted(b"GET", b"/"),
    ),
    # ---------------------------------------------------------------- limits
    Case(
        "uri-too-long",
        "RFC 9110 §15.5.15 (414); HAProxy tune.bufsize",
        line(b"GET /" + b"a" * 100 + b" HTTP/1.1", b"Host: example.org"),
        Rejected(414),
        limits={"max_uri": 64},
    ),
    Case(
        "request-line-over-head-limit",
        "HAProxy tune.bufsize (request larger than the buffer)",
        b"GET /" + b"a" * 300,
        Rejected(414),
        limits={"max_header_bytes": 256},
        note="the line never ends within the head limit: the URI is the problem",
    ),
    Case(
        "too-many-fields",
        "HAProxy tune.http.maxhdr (101 by default)",
        line(b"GET / HTTP/1.1", b"Host: example.org", *(b"X-%d: y" % i for i in range(10))),
        Rejected(431),
        limits={"max_headers": 5},
    ),
    Case(
        "head-too-large",
        "HAProxy tune.bufsize - tune.maxrewrite",
        line(b"GET / HTTP/1.1", b"Host: example.org", b"X-Big: " + b"a" * 400),
        Rejected(431),
        limits={"max_header_bytes": 256},
    ),
    Case(
        "cl-over-max-body",
        "RFC 9110 §15.5.14 (413)",
        post(b"Content-Length: 10", body=b"0123456789"),
        Rejected(413),
        limits={"max_body": 4},
    ),
    Case(
        "chunked-over-max-body",
        "RFC 9110 §15.5.14 (413 once the de-chunked total passes the limit)",
        chunked(b"3\r\nabc\r\n3\r\ndef\r\n0\r\n\r\n"),
        Rejected(413),
        limits={"max_body": 4},
    ),
    Case(
        "trailers-too-many",
        "CVE-2023-46589 (Tomcat: oversized trailers split one request into two)",
        chunked(b"0\r\n" + b"".join(b"T-%d: x\r\n" % i for i in range(8)) + b"\r\n"),
        Rejected(431),
        limits={"max_headers": 4},
    ),
    # ---------------------------------------------------------------- connection management
    Case(
        "websocket-upgrade",
        "RFC 6455 §4.1; HAProxy reg-test http-messaging/websocket.vtc",
        line(
            b"GET /ws HTTP/1.1",
            b"Host: example.org",
            b"Connection: Upgrade",
            b"Upgrade: websocket",
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            b"Sec-WebSocket-Version: 13",
        ),
        Accepted(b"GET", b"/ws"),
    ),
    Case(
        "connect-authority-form",
        "RFC 9112 §3.2.3",
        line(b"CONNECT example.org:443 HTTP/1.1", b"Host: example.org:443"),
        Accepted(b"CONNECT", b"example.org:443"),
    ),
    Case(
        "expect-100-continue",
        "RFC 9110 §10.1.1",
        post(b"Expect: 100-continue", b"Content-Length: 5", body=b"hello"),
        Accepted(b"POST", b"/", b"hello"),
    ),
    Case(
        "connection-close",
        "RFC 9112 §9.6",
        post(b"Connection: close", b"Content-Length: 5", body=b"hello"),
        Accepted(b"POST", b"/", b"hello"),
    ),
)
