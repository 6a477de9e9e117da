"""Tests for medlb.proto.http: the smuggling corpus, framing, pipelining, upgrades, responses, limits,
serialization, and property tests (any split of the bytes gives the same events; whatever is
accepted re-serializes to the same request).

Expected bytes and outcomes are written by hand from RFC 9112 and the sources named in
``http_corpus.py``; they are never produced by the code under test.
"""

from __future__ import annotations

import ast
import inspect
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medlb.errors import ProtocolError
from medlb.proto import http
from medlb.proto.http import (
    LAST_CHUNK,
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
    with_framing,
)

from .http_corpus import CORPUS, Accepted, Case, Rejected

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GET = b"GET /studies?limit=10 HTTP/1.1\r\nHost: pacs.example.org\r\nAccept: application/dicom+json\r\n\r\n"
POST = b"POST /upload HTTP/1.1\r\nHost: pacs.example.org\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"POST /stow HTTP/1.1\r\nHost: pacs.example.org\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nX-Sum: 1\r\n\r\n"
)


# --- helpers -----------------------------------------------------------------------------------


def req(events: Sequence[object], index: int = 0) -> RequestHead:
    """``events[index]``, which must be a request head."""
    head = events[index]
    assert isinstance(head, RequestHead)
    return head


def res(events: Sequence[object], index: int = 0) -> ResponseHead:
    """``events[index]``, which must be a response head."""
    head = events[index]
    assert isinstance(head, ResponseHead)
    return head


def merged(events: Sequence[Any]) -> list[Any]:
    """Events with consecutive Body pieces joined: how a body is split is not part of the contract."""
    out: list[Any] = []
    for ev in events:
        if isinstance(ev, Body) and out and isinstance(out[-1], Body):
            out[-1] = Body(out[-1].data + ev.data)
        else:
            out.append(ev)
    return out


def feed_split(parser: RequestParser | ResponseParser, data: bytes, cuts: Sequence[int]) -> list[Any]:
    """Feed ``data`` cut at ``cuts``; return all events (HttpError propagates with earlier events)."""
    events: list[Any] = []
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        try:
            events += parser.feed(data[last:cut])
        except HttpError as exc:
            exc.events = events + list(exc.events)
            raise
        last = cut
    return events


def one_request(events: list[Any]) -> tuple[RequestHead, bytes, list[tuple[bytes, bytes]]]:
    """The single complete request in ``events``: (head, body, trailers)."""
    events = merged(events)
    assert isinstance(events[0], RequestHead)
    assert isinstance(events[-1], EndOfMessage)
    assert sum(isinstance(e, RequestHead) for e in events) == 1
    body = b"".join(e.data for e in events if isinstance(e, Body))
    return events[0], body, events[-1].trailers


def reserialize(head: RequestHead, body: bytes, trailers: list[tuple[bytes, bytes]], *, chunked: bool) -> bytes:
    """What medlb sends to a server: the head with medlb's own framing, and the body re-framed."""
    if chunked:
        fields = with_framing(head.headers, chunked=True)
        return serialize_request_head(head, fields) + encode_chunk(body) + encode_trailers(trailers)
    assert not trailers
    length = len(body) if (body or head.content_length is not None) else None
    return serialize_request_head(head, with_framing(head.headers, content_length=length)) + body


def assert_same_request(a: RequestHead, b: RequestHead) -> None:
    strip = {b"content-length", b"transfer-encoding"}
    assert (a.method, a.target, a.version, a.host) == (b.method, b.target, b.version, b.host)
    assert (a.keep_alive, a.expect_continue, a.upgrade) == (b.keep_alive, b.expect_continue, b.upgrade)
    assert [h for h in a.headers if h[0].lower() not in strip] == [h for h in b.headers if h[0].lower() not in strip]


def assert_round_trip(head: RequestHead, body: bytes, trailers: list[tuple[bytes, bytes]]) -> None:
    """The codec-level form of "the server sees exactly the request medlb parsed"."""
    framings = [True] if trailers else [True, False]
    if head.method == b"CONNECT" or head.version == b"1.0":  # no chunked framing for these
        framings = [False]
    for chunked in framings:
        again = RequestParser().feed(reserialize(head, body, trailers, chunked=chunked))
        head2, body2, trailers2 = one_request(again)
        assert_same_request(head, head2)
        assert (body2, trailers2) == (body, trailers)


def outcome(case: Case, cuts: Sequence[int]) -> tuple[str, Any]:
    parser = RequestParser(Limits(**case.limits))
    try:
        events = feed_split(parser, case.raw, cuts)
        parser.feed_eof()
    except HttpError as exc:
        assert not any(isinstance(e, EndOfMessage) for e in exc.events), "a rejected request was completed"
        return "rejected", exc.status
    return "accepted", events


# --- the corpus --------------------------------------------------------------------------------


def test_corpus_is_large_and_well_formed() -> None:
    assert len(CORPUS) >= 60
    assert len({case.name for case in CORPUS}) == len(CORPUS)
    assert all(case.source and case.raw for case in CORPUS)
    assert sum(isinstance(case.expect, Accepted) for case in CORPUS) >= 15
    for case in CORPUS:
        Limits(**case.limits)  # every override names a real field


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus(case: Case) -> None:
    got = outcome(case, [])
    if isinstance(case.expect, Rejected):
        assert got == ("rejected", case.expect.status)
        return
    kind, events = got
    assert kind == "accepted"
    head, body, trailers = one_request(events)
    expected = case.expect
    assert (head.method, head.target, body) == (expected.method, expected.target, expected.body)
    assert tuple(trailers) == expected.trailers
    assert_round_trip(head, body, trailers)


@pytest.mark.parametrize("case", CORPUS, ids=lambda c: c.name)
def test_corpus_split(case: Case) -> None:
    """Byte by byte and in odd-sized pieces, each payload ends the same way as when read whole."""
    whole = outcome(case, [])
    for step in (1, 2, 7):
        got = outcome(case, range(step, len(case.raw), step))
        if whole[0] == "rejected":
            assert got == whole, f"step {step}"
        else:
            assert got[0] == "accepted"
            assert merged(got[1]) == merged(whole[1]), f"step {step}"


# --- requests: basics --------------------------------------------------------------------------


def test_get_head_fields() -> None:
    [head, end] = RequestParser().feed(GET)
    assert head == RequestHead(
        method=b"GET",
        target=b"/studies?limit=10",
        version=b"1.1",
        headers=[(b"Host", b"pacs.example.org"), (b"Accept", b"application/dicom+json")],
        content_length=None,
        chunked=False,
        keep_alive=True,
        expect_continue=False,
        upgrade=False,
        host=b"pacs.example.org",
    )
    assert end == EndOfMessage([])
    assert head.header(b"ACCEPT") == b"application/dicom+json"
    assert head.header(b"cookie") is None


def test_values_lose_surrounding_ows_names_keep_case() -> None:
    head = req(RequestParser().feed(b"GET / HTTP/1.1\r\nhOsT: \t a \t\r\nX-Empty:   \r\nX-In: a \t b\r\n\r\n"))
    assert head.headers == [(b"hOsT", b"a"), (b"X-Empty", b""), (b"X-In", b"a \t b")]
    assert head.host == b"a"


def test_post_with_content_length() -> None:
    events = RequestParser().feed(POST)
    assert [type(e) for e in events] == [RequestHead, Body, EndOfMessage]
    assert req(events).content_length == 5 and events[1] == Body(b"hello")


def test_chunked_with_extension_and_trailers() -> None:
    head, body, trailers = one_request(RequestParser().feed(CHUNKED))
    assert head.chunked and head.content_length is None
    assert body == b"hello world"
    assert trailers == [(b"X-Sum", b"1")]


def test_content_length_zero_is_bodyless() -> None:
    events = RequestParser().feed(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert req(events).content_length == 0


@pytest.mark.parametrize(
    ("raw", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, CLOSE\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nConnection: close\r\n\r\n", False),
    ],
)
def test_keep_alive_rules(raw: bytes, keep_alive: bool) -> None:
    assert req(RequestParser().feed(raw)).keep_alive is keep_alive


def test_no_keep_alive_ignores_what_follows() -> None:
    parser = RequestParser()
    events = parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGARBAGE\x00")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert parser.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n") == []
    assert parser.feed_eof() == []


def test_expect_100_continue_head_comes_before_the_body() -> None:
    parser = RequestParser()
    head_bytes = b"PUT /x HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n"
    events = parser.feed(head_bytes)
    assert len(events) == 1  # the head alone: the caller can answer 100 Continue now
    head = req(events)
    assert head.expect_continue and head.content_length == 3
    assert parser.feed(b"abc") == [Body(b"abc"), EndOfMessage([])]


def test_expect_is_ignored_in_http10() -> None:
    head = req(RequestParser().feed(b"PUT /x HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\nx"))
    assert not head.expect_continue


# --- pipelining and incremental parsing --------------------------------------------------------


def test_pipelined_requests_in_one_feed() -> None:
    events = RequestParser().feed(GET + POST + CHUNKED + GET)
    heads = [e for e in events if isinstance(e, RequestHead)]
    assert [h.method for h in heads] == [b"GET", b"POST", b"POST", b"GET"]
    assert sum(isinstance(e, EndOfMessage) for e in events) == 4
    assert merged(events) == merged(
        [ev for raw in (GET, POST, CHUNKED, GET) for ev in RequestParser().feed(raw)],
    )


def test_byte_by_byte_equals_whole() -> None:
    stream = GET + POST + CHUNKED + b"\r\n" + GET
    whole = RequestParser().feed(stream)
    parser = RequestParser()
    pieces: list[Any] = []
    for i in range(len(stream)):
        pieces += parser.feed(stream[i : i + 1])
    assert merged(pieces) == merged(whole)


def test_incomplete_head_gives_nothing_yet() -> None:
    parser = RequestParser()
    assert parser.feed(GET[:-1]) == []
    assert [type(e) for e in parser.feed(GET[-1:])] == [RequestHead, EndOfMessage]


def test_crlfcrlf_inside_chunk_data_and_across_feeds() -> None:
    data = b"\r\n\r\n0\r\n\r\n"  # looks like the end of a chunked body: it is data
    raw = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(data), data)
    for cut in range(len(raw)):
        parser = RequestParser()
        events = feed_split(parser, raw + GET, [cut])
        _, body, _ = one_request(events[: events.index(EndOfMessage([])) + 1])
        assert body == data, cut
        assert isinstance(events[-2], RequestHead) and events[-2].target == b"/studies?limit=10"


def test_empty_lines_between_requests_are_skipped() -> None:
    events = RequestParser().feed(POST + b"\r\n\r\n\n" + GET)
    assert sum(isinstance(e, RequestHead) for e in events) == 2


def test_feed_empty_bytes() -> None:
    parser = RequestParser()
    assert parser.feed(b"") == []
    assert len(parser.feed(GET)) == 2


# --- errors ------------------------------------------------------------------------------------


def test_error_is_sticky() -> None:
    parser = RequestParser()
    with pytest.raises(HttpError) as first:
        parser.feed(b"GET /#x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert first.value.status == 400
    for _ in range(2):
        with pytest.raises(HttpError) as again:
            parser.feed(GET)
        assert again.value.status == 400 and again.value.events == []
    with pytest.raises(HttpError):
        parser.feed_eof()


def test_error_carries_events_of_earlier_pipelined_request() -> None:
    with pytest.raises(HttpError) as caught:
        RequestParser().feed(GET + b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx")
    assert [type(e) for e in caught.value.events] == [RequestHead, EndOfMessage]
    assert isinstance(caught.value, ProtocolError)


def test_body_error_after_head_was_emitted() -> None:
    parser = RequestParser()
    events = parser.feed(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert len(events) == 1
    head = req(events)
    assert head.chunked
    with pytest.raises(HttpError) as caught:
        parser.feed(b"5\r\nhello\r\n0_2e\r\n\r\n")
    assert caught.value.status == 400
    assert caught.value.events == [Body(b"hello")]


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhel",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
    ],
)
def test_eof_inside_a_request(raw: bytes) -> None:
    parser = RequestParser()
    parser.feed(raw)
    with pytest.raises(HttpError) as caught:
        parser.feed_eof()
    assert caught.value.status == 400


def test_eof_between_requests_is_clean() -> None:
    parser = RequestParser()
    parser.feed(GET + b"\r\n")
    assert parser.feed_eof() == []


def test_http09_line_is_rejected_without_waiting_for_more() -> None:
    with pytest.raises(HttpError) as caught:
        RequestParser().feed(b"GET /index.html\r\n")
    assert caught.value.status == 400


def test_http2_preface_split_is_505() -> None:
    parser = RequestParser()
    with pytest.raises(HttpError) as caught:
        feed_split(parser, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [3, 9])
    assert caught.value.status == 505


def test_llhttp_is_never_made_lenient() -> None:
    tree = ast.parse(inspect.getsource(http))
    calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
    assert "set_dangerous_leniencies" not in calls


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b"0", 0), (b"0005", 5), (b"123456789012345678", 123456789012345678)]
    + [(v, None) for v in (b"", b"+1", b"-1", b"1_0", b" 1", b"0x1", b"\xd9\xa5", b"1234567890123456789", b"1.0")],
)
def test_content_length_never_goes_through_lenient_int(value: bytes, expected: int | None) -> None:
    assert http._content_length(value) == expected


# --- limits ------------------------------------------------------------------------------------


def test_limits_validate() -> None:
    with pytest.raises(ValueError):
        Limits(max_headers=0)
    with pytest.raises(ValueError):
        Limits(max_body=-1)


def test_header_count_limit_is_exact() -> None:
    def request(n: int) -> bytes:
        return b"GET / HTTP/1.1\r\nHost: a\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(n - 1)) + b"\r\n"

    assert len(req(RequestParser().feed(request(101))).headers) == 101
    with pytest.raises(HttpError) as caught:
        RequestParser().feed(request(102))
    assert caught.value.status == 431


def test_head_size_limit_is_exact() -> None:
    base = b"GET / HTTP/1.1\r\nHost: a\r\nX: \r\n\r\n"
    pad = 200 - len(base)
    exact = base.replace(b"X: ", b"X: " + b"a" * pad)
    assert len(exact) == 200
    limits = Limits(max_header_bytes=200)
    assert len(RequestParser(limits).feed(exact)) == 2
    assert len(RequestParser(limits).feed(b"\r\n\r\n" + exact)) == 2  # leading empty lines do not count
    with pytest.raises(HttpError) as caught:
        RequestParser(limits).feed(exact.replace(b"X: ", b"X: a"))
    assert caught.value.status == 431


def test_uri_limit_is_exact() -> None:
    limits = Limits(max_uri=10)
    assert req(RequestParser(limits).feed(b"GET /123456789 HTTP/1.1\r\nHost: a\r\n\r\n")).target == b"/123456789"
    for cuts in ([], [6, 8]):
        with pytest.raises(HttpError) as caught:
            feed_split(RequestParser(limits), b"GET /1234567890 HTTP/1.1\r\nHost: a\r\n\r\n", cuts)
        assert caught.value.status == 414


def test_body_limit_is_exact() -> None:
    limits = Limits(max_body=5)
    assert len(RequestParser(limits).feed(POST)) == 3
    chunks = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert one_request(RequestParser(limits).feed(chunks))[1] == b"abcde"
    with pytest.raises(HttpError) as caught:
        RequestParser(limits).feed(chunks.replace(b"2\r\nde", b"3\r\ndef"))
    assert caught.value.status == 413
    assert req(caught.value.events).chunked  # the head was out before the body went over


def test_chunk_framing_is_bounded() -> None:
    """A chunk extension or trailer that never ends cannot make medlb buffer without limit."""
    limits = Limits(max_header_bytes=1024)
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    for opener in (b"1;ext=", b"1\r\nx\r\n0\r\nX-Trailer: "):
        parser = RequestParser(limits)
        parser.feed(head + opener)
        with pytest.raises(HttpError) as caught:
            for _ in range(40):
                parser.feed(b"a" * 100)
        assert caught.value.status == 431


def test_paused_stash_is_bounded() -> None:
    parser = RequestParser(Limits(max_header_bytes=100))
    parser.feed(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n" + b"x" * 500)  # same read: kept
    with pytest.raises(HttpError):
        parser.feed(b"y")


# --- upgrades and CONNECT ----------------------------------------------------------------------

WS = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_pauses_and_hands_over_the_rest() -> None:
    parser = RequestParser()
    events = parser.feed(WS + b"\x81\x05hello")
    assert [type(e) for e in events] == [RequestHead, EndOfMessage]
    assert req(events).upgrade and parser.paused
    assert parser.feed(b"more") == []
    assert parser.take_remainder() == b"\x81\x05hellomore"
    assert parser.take_remainder() == b""
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


def test_refused_upgrade_resumes_http() -> None:
    parser = RequestParser()
    parser.feed(WS + GET[:10])
    assert parser.resume() == []
    assert [type(e) for e in parser.feed(GET[10:])] == [RequestHead, EndOfMessage]
    with pytest.raises(RuntimeError):
        parser.resume()


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: 11\r\n\r\nhello world",
        b"Transfer-Encoding: chunked\r\n\r\n6\r\nhello \r\n5\r\nworld\r\n0\r\n\r\n",
    ],
)
def test_upgrade_request_body_is_http_until_its_end(framing: bytes) -> None:
    """llhttp treats an upgrade request's body as the new protocol; medlb, like HAProxy, does not."""
    raw = WS.replace(b"\r\n\r\n", b"\r\n" + framing) + b"TUNNEL"
    for cut in range(len(WS) - 2, len(raw)):
        parser = RequestParser()
        head, body, _ = one_request(feed_split(parser, raw, [cut]))
        assert head.upgrade and body == b"hello world"
        assert parser.take_remainder() == b"TUNNEL"
    parser = RequestParser()
    parser.feed(raw[:-6] + GET)
    assert [type(e) for e in parser.resume()] == [RequestHead, EndOfMessage]


def test_upgrade_ignored_in_http10() -> None:
    parser = RequestParser()
    raw = b"GET / HTTP/1.0\r\nConnection: upgrade, keep-alive\r\nUpgrade: websocket\r\n\r\n"
    events = parser.feed(raw + raw)
    assert [type(e) for e in events] == [RequestHead, EndOfMessage] * 2
    assert not req(events).upgrade and not parser.paused


def test_upgrade_field_without_connection_token_is_no_upgrade() -> None:
    head = req(RequestParser().feed(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n"))
    assert not head.upgrade


def test_connect_pauses() -> None:
    parser = RequestParser()
    head = req(parser.feed(b"CONNECT pacs.example.org:443 HTTP/1.1\r\nHost: pacs.example.org:443\r\n\r\n\x16\x03"))
    assert head.upgrade and head.target == b"pacs.example.org:443"
    assert parser.take_remainder() == b"\x16\x03"


def test_take_remainder_needs_a_pause() -> None:
    with pytest.raises(RuntimeError):
        RequestParser().take_remainder()


# --- responses ---------------------------------------------------------------------------------


def resp(parser: ResponseParser, raw: bytes) -> list[Any]:
    return merged(parser.feed(raw))


def test_response_with_content_length() -> None:
    events = resp(ResponseParser(), b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello")
    assert events == [
        ResponseHead(200, b"OK", b"1.1", [(b"Content-Length", b"5"), (b"Server", b"x")], 5, False, True),
        Body(b"hello"),
        EndOfMessage([]),
    ]
    assert events[0].header(b"server") == b"x"


def test_chunked_response_with_trailers() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-Sum: 9\r\n\r\n"
    events = resp(ResponseParser(), raw)
    assert events[0].chunked and events[1:] == [Body(b"abc"), EndOfMessage([(b"X-Sum", b"9")])]


def test_close_delimited_response() -> None:
    parser = ResponseParser()
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nabc")
    assert not res(events).keep_alive and events[1:] == [Body(b"abc")]
    assert parser.feed(b"def") == [Body(b"def")]
    assert parser.feed_eof() == [EndOfMessage([])]
    assert parser.feed(b"late") == []


def test_http10_response_without_length_is_close_delimited() -> None:
    parser = ResponseParser()
    assert resp(parser, b"HTTP/1.0 200 OK\r\n\r\nabc") == [
        ResponseHead(200, b"OK", b"1.0", [], None, False, False),
        Body(b"abc"),
    ]


@pytest.mark.parametrize("method", [b"HEAD", b"GET"])
@pytest.mark.parametrize("status", [204, 304])
def test_bodyless_statuses_ignore_content_length(method: bytes, status: int) -> None:
    parser = ResponseParser()
    parser.expect(method)
    raw = b"HTTP/1.1 %d X\r\nContent-Length: 10\r\n\r\n" % status
    events = resp(parser, raw + b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage, ResponseHead, Body, EndOfMessage]
    assert events[0].content_length == 10


def test_head_response_has_no_body_and_the_next_response_follows() -> None:
    parser = ResponseParser()
    parser.expect(b"HEAD")
    parser.expect(b"GET")
    parser.expect(b"HEAD")
    raw = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for step in (len(raw), 1, 5):
        p2 = ResponseParser()
        for m in (b"HEAD", b"GET", b"HEAD"):
            p2.expect(m)
        events = merged(feed_split(p2, raw, range(step, len(raw), step)))
        kinds = [ResponseHead, EndOfMessage, ResponseHead, Body, EndOfMessage, ResponseHead, EndOfMessage]
        assert [type(e) for e in events] == kinds
        assert events[0].content_length == 1000 and events[3] == Body(b"ok")


def test_interim_responses_do_not_consume_the_method() -> None:
    parser = ResponseParser()
    parser.expect(b"HEAD")
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n"
    )
    events = resp(parser, raw)
    assert [e.status for e in events if isinstance(e, ResponseHead)] == [100, 103, 200]
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage] * 3  # HEAD: no body despite CL 3


def test_101_pauses_for_the_tunnel() -> None:
    parser = ResponseParser()
    parser.expect(b"GET")
    events = parser.feed(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
    )
    assert res(events).status == 101 and parser.paused
    assert parser.take_remainder() == b"\x81\x00"


def test_2xx_to_connect_pauses_even_with_content_length() -> None:
    parser = ResponseParser()
    parser.expect(b"CONNECT")
    events = parser.feed(b"HTTP/1.1 200 Connection established\r\nContent-Length: 99\r\n\r\n\x16\x03")
    assert [type(e) for e in events] == [ResponseHead, EndOfMessage] and parser.paused
    assert parser.take_remainder() == b"\x16\x03"


def test_refused_connect_has_a_normal_body() -> None:
    parser = ResponseParser()
    parser.expect(b"CONNECT")
    assert resp(parser, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")[1] == Body(b"no")
    assert not parser.paused


def test_response_connection_close_ignores_the_rest() -> None:
    parser = ResponseParser()
    events = parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nxJUNK")
    assert [type(e) for e in events] == [ResponseHead, Body, EndOfMessage] and not res(events).keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx",
        b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nx",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/2.0 200 OK\r\n\r\n",
        b"HTTP/1.1 99 Low\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\x00b\r\n\r\n",
        b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\nx\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 102 + b"\r\n",
    ],
)
def test_bad_responses_are_502(raw: bytes) -> None:
    with pytest.raises(HttpError) as caught:
        ResponseParser().feed(raw)
    assert caught.value.status == 502


def test_response_head_limit_is_502() -> None:
    with pytest.raises(HttpError) as caught:
        ResponseParser(Limits(max_header_bytes=64)).feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100)
    assert caught.value.status == 502


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
)
def test_server_closing_inside_a_response_is_502(raw: bytes) -> None:
    parser = ResponseParser()
    parser.feed(raw)
    with pytest.raises(HttpError) as caught:
        parser.feed_eof()
    assert caught.value.status == 502


def test_server_closing_between_responses_is_clean() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert parser.feed_eof() == []


# --- serialization -----------------------------------------------------------------------------


def test_serialize_request_head_exact_bytes() -> None:
    head = req(RequestParser().feed(GET))
    fields = [*head.headers, (b"X-Forwarded-For", b"192.0.2.7")]
    assert serialize_request_head(head, fields) == (
        b"GET /studies?limit=10 HTTP/1.1\r\nHost: pacs.example.org\r\nAccept: application/dicom+json\r\n"
        b"X-Forwarded-For: 192.0.2.7\r\n\r\n"
    )


def test_serialize_unchecked_gives_the_same_bytes_for_parsed_heads() -> None:
    # check=False is the proxy's hot path: for a head this parser produced, the output must be
    # exactly what the checked path gives (only the re-validation is skipped).
    head = req(RequestParser().feed(GET))
    fields = [*head.headers, (b"X-Forwarded-For", b"192.0.2.7")]
    assert serialize_request_head(head, fields, check=False) == serialize_request_head(head, fields)
    response = ResponseParser().feed(b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 0\r\n\r\n")[0]
    assert isinstance(response, ResponseHead)
    assert serialize_response_head(response, response.headers, check=False) == serialize_response_head(
        response, response.headers
    )


def test_serialize_keeps_http10() -> None:
    head = req(RequestParser().feed(b"GET / HTTP/1.0\r\n\r\n"))
    assert serialize_request_head(head, []) == b"GET / HTTP/1.0\r\n\r\n"


def test_serialize_response_head_exact_bytes() -> None:
    head = ResponseHead(404, b"Not Found", b"1.1", [], 0, False, True)
    assert (
        serialize_response_head(head, [(b"Content-Length", b"0")])
        == b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    assert (
        serialize_response_head(ResponseHead(204, b"", b"1.1", [], None, False, True), []) == b"HTTP/1.1 204 \r\n\r\n"
    )


@pytest.mark.parametrize(
    "fields",
    [
        [(b"X-Forwarded-For", b"1.2.3.4\r\nX-Admin: yes")],
        [(b"X", b"a\nb")],
        [(b"X", b"a\rb")],
        [(b"X", b"a\x00b")],
        [(b"X Y", b"z")],
        [(b"X:Y", b"z")],
        [(b"", b"z")],
        [(b"X\r\nY", b"z")],
    ],
)
def test_serialize_refuses_injection(fields: list[tuple[bytes, bytes]]) -> None:
    head = req(RequestParser().feed(GET))
    with pytest.raises(ValueError):
        serialize_request_head(head, fields)
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(200, b"OK", b"1.1", [], None, False, True), fields)
    with pytest.raises(ValueError):
        encode_trailers(fields)


def test_serialize_refuses_bad_start_lines() -> None:
    head = req(RequestParser().feed(GET))
    for change in (
        {"target": b"/a b"},
        {"target": b"/\r\nX: y"},
        {"method": b"G T"},
        {"version": b"2.0"},
        {"target": b""},
    ):
        bad = RequestHead(**{**{f: getattr(head, f) for f in head.__slots__}, **change})
        with pytest.raises(ValueError):
            serialize_request_head(bad, [])
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(200, b"OK\r\nX: y", b"1.1", [], None, False, True), [])
    with pytest.raises(ValueError):
        serialize_response_head(ResponseHead(42, b"OK", b"1.1", [], None, False, True), [])


def test_with_framing_replaces_every_framing_field() -> None:
    fields = [(b"Host", b"a"), (b"content-length", b"5"), (b"TRANSFER-ENCODING", b"chunked"), (b"X", b"y")]
    assert with_framing(fields, chunked=True) == [(b"Host", b"a"), (b"X", b"y"), (b"Transfer-Encoding", b"chunked")]
    assert with_framing(fields, content_length=7) == [(b"Host", b"a"), (b"X", b"y"), (b"Content-Length", b"7")]
    assert with_framing(fields) == [(b"Host", b"a"), (b"X", b"y")]
    with pytest.raises(ValueError):
        with_framing(fields, content_length=1, chunked=True)


def test_chunk_encoding() -> None:
    assert encode_chunk(b"hello world") == b"b\r\nhello world\r\n"
    assert encode_chunk(b"") == b""  # never a premature last chunk
    assert LAST_CHUNK == b"0\r\n\r\n" == encode_trailers([])
    assert encode_trailers([(b"X-Sum", b"1")]) == b"0\r\nX-Sum: 1\r\n\r\n"


# --- properties --------------------------------------------------------------------------------

VALID_REQUESTS = [
    GET,
    POST,
    CHUNKED,
    b"\r\n" + GET,
    b"DELETE /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"PUT /big HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\n" + bytes(range(20)),
    b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n\r\n\r\n\r\n2\r\n\r\n\r\n0\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: a\r\nX-Long: " + b"v" * 300 + b"\r\n\r\n",
]


@FAST
@given(st.lists(st.sampled_from(VALID_REQUESTS), min_size=1, max_size=5), st.data())
def test_random_splits_give_identical_events(requests: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(requests)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    whole = RequestParser().feed(stream)
    assert merged(feed_split(RequestParser(), stream, cuts)) == merged(whole)
    assert sum(isinstance(e, EndOfMessage) for e in whole) == len(requests)


VALID_RESPONSES = [
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"),
    (b"GET", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nT: 1\r\n\r\n"),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
    (b"GET", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
    (b"POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
]


@FAST
@given(st.lists(st.sampled_from(VALID_RESPONSES), min_size=1, max_size=5), st.data())
def test_random_splits_of_responses(responses: list[tuple[bytes, bytes]], data: st.DataObject) -> None:
    stream = b"".join(raw for _, raw in responses)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    parsers = [ResponseParser(), ResponseParser()]
    for parser in parsers:
        for method, _ in responses:
            parser.expect(method)
    whole = parsers[0].feed(stream)
    assert merged(feed_split(parsers[1], stream, cuts)) == merged(whole)


def check_contract(raw: bytes, cuts: Sequence[int] = ()) -> None:
    """Parse, or raise HttpError, nothing else; whatever is accepted re-serializes to itself."""
    parser = RequestParser(Limits(max_header_bytes=2048, max_uri=512, max_body=4096))
    try:
        events = merged(feed_split(parser, raw, cuts))
    except HttpError as exc:
        assert exc.status in (400, 413, 414, 431, 501, 505)
        return
    while events and isinstance(events[0], RequestHead) and EndOfMessage in map(type, events):
        end = next(i for i, e in enumerate(events) if isinstance(e, EndOfMessage))
        head, body, trailers = one_request(events[: end + 1])
        assert_round_trip(head, body, trailers)
        events = events[end + 1 :]


@FAST
@given(st.binary(max_size=300))
@example(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
def test_fuzz_arbitrary_bytes(raw: bytes) -> None:
    check_contract(raw)


MUTATION_SEEDS = [case.raw for case in CORPUS] + VALID_REQUESTS


@FAST
@given(
    st.sampled_from(MUTATION_SEEDS),
    st.lists(
        st.tuples(st.integers(0, 2000), st.sampled_from(list(b"\r\n \t:;,0aAx\x00\x7f\xff-_#@/"))),
        max_size=4,
    ),
    st.lists(st.integers(0, 2000), max_size=3),
)
def test_fuzz_mutated_corpus(seed: bytes, edits: list[tuple[int, int]], cuts: list[int]) -> None:
    raw = bytearray(seed)
    for where, byte in edits:
        raw[where % len(raw)] = byte
    check_contract(bytes(raw), [c % (len(raw) + 1) for c in cuts])
