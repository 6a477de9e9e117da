"""Routing rules as pure decisions: matching, first-match-wins, rewrites, redirects, header edits."""

from __future__ import annotations

from typing import Any

import pytest

from medlb.config import parse_config
from medlb.layers.http_rules import DEFAULT, HeaderEdit, Router
from medlb.proto.http import RequestHead, RequestParser


def router(**frontend: Any) -> Router:
    raw = {
        "frontends": [{"name": "web", "mode": "http", "bind": ["127.0.0.1:0"], "default_backend": "a", **frontend}],
        "backends": [{"name": n, "servers": [{"name": "s", "address": "10.0.0.1:80"}]} for n in ("a", "b", "c")],
    }
    return Router.compile(parse_config(raw).frontends[0])


def head(text: str) -> RequestHead:
    (h, *_) = RequestParser().feed(text.replace("\n", "\r\n").encode() + b"\r\n\r\n")
    assert isinstance(h, RequestHead)
    return h


def test_no_rules_costs_nothing() -> None:
    assert router().decide(head("GET / HTTP/1.1\nHost: x"), tls=False) is DEFAULT


@pytest.mark.parametrize(
    ("request_text", "backend"),
    [
        ("GET /dicom-web/studies HTTP/1.1\nHost: pacs.example", "b"),
        ("GET /dicom-web HTTP/1.1\nHost: pacs.example", "b"),
        ("GET /dicom-webx HTTP/1.1\nHost: pacs.example", None),  # a prefix is a path segment
        ("GET /ohif/viewer HTTP/1.1\nHost: viewer.example:8443", "c"),
        ("GET /ohif/viewer HTTP/1.1\nHost: other.example", None),
        ("POST /stow HTTP/1.1\nHost: x\nContent-Length: 0", "c"),
        ("GET /x HTTP/1.1\nHost: x\nX-Tenant: radiology-7", "b"),
        ("GET /x HTTP/1.1\nHost: x\nX-Tenant: cardio", None),
        ("GET /wado/studies/1.2.3/series/4 HTTP/1.1\nHost: x", "c"),
    ],
)
def test_first_matching_rule_wins(request_text: str, backend: str | None) -> None:
    r = router(
        rules=[
            {"if": {"path_prefix": ["/dicom-web"]}, "use_backend": "b"},
            {"if": {"host": ["viewer.example"], "path_prefix": ["/ohif"]}, "use_backend": "c"},
            {"if": {"method": ["POST"]}, "use_backend": "c"},
            {"if": {"header": {"X-Tenant": "^radiology-"}}, "use_backend": "b"},
            {"if": {"path_regex": "^/wado/studies/[^/]+/series"}, "use_backend": "c"},
        ]
    )
    assert r.decide(head(request_text), tls=False).backend == backend


def test_path_rewrite_keeps_the_query() -> None:
    r = router(rules=[{"if": {"path_prefix": ["/pacs"]}, "path": {"strip_prefix": "/pacs", "add_prefix": "/orthanc"}}])
    assert r.decide(head("GET /pacs/dicom-web/studies?PatientID=1 HTTP/1.1\nHost: x"), False).target == (
        b"/orthanc/dicom-web/studies?PatientID=1"
    )
    assert r.decide(head("GET /pacs HTTP/1.1\nHost: x"), False).target == b"/orthanc/"


def test_redirects_http_to_https_and_by_location() -> None:
    r = router(
        rules=[
            {"if": {"tls": False}, "redirect": {"scheme": "https", "code": 308}},
            {"if": {"path_prefix": ["/old"]}, "redirect": {"location": "https://{host}/new{query}", "code": 301}},
        ]
    )
    d = r.decide(head("POST /upload?x=1 HTTP/1.1\nHost: pacs.example\nContent-Length: 0"), tls=False)
    assert d.redirect == (308, b"https://pacs.example/upload?x=1")
    d = r.decide(head("GET /old/a?y=2 HTTP/1.1\nHost: pacs.example"), tls=True)
    assert d.redirect == (301, b"https://pacs.example/new?y=2")


def test_header_edits_and_hsts() -> None:
    r = router(
        request_headers={"set": {"X-Site": "main"}, "delete": ["X-Debug"]},
        response_headers={"add": {"X-Frame-Options": "DENY"}, "delete": ["Server"]},
        hsts={"max_age": "365d", "include_subdomains": True},
        rules=[{"if": {"path_prefix": ["/api"]}, "request_headers": {"add": {"X-Api": "1"}}}],
    )
    d = r.decide(head("GET /api/x HTTP/1.1\nHost: x"), tls=True)
    headers = [(b"Host", b"x"), (b"X-Debug", b"1"), (b"X-Site", b"forged")]
    for edit in d.request_edits:
        headers = edit.apply(headers)
    assert headers == [(b"Host", b"x"), (b"X-Site", b"main"), (b"X-Api", b"1")]
    response = [(b"Server", b"nginx"), (b"Content-Type", b"text/plain")]
    for edit in d.response_edits:
        response = edit.apply(response)
    assert response == [(b"Content-Type", b"text/plain"), (b"X-Frame-Options", b"DENY")]
    assert d.hsts == b"max-age=31536000; includeSubDomains"
    assert r.decide(head("GET / HTTP/1.1\nHost: x"), tls=False).hsts is None  # HSTS only over TLS


def test_header_edit_compiles_to_nothing_when_empty() -> None:
    assert HeaderEdit.compile(None) is None


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"use_backend": "nope"}, "backend 'nope' does not exist"),
        ({"use_backend": "b", "redirect": {"scheme": "https"}}, "either forwards"),
        ({"redirect": {"code": 301}}, "needs location or scheme"),
        ({"if": {"path_regex": "("}, "use_backend": "b"}, "invalid regular expression"),
        ({"request_headers": {"set": {"X-Bad": "a\nb"}}}, "request_headers.set"),
        # A prefix lands in the request line: no space, CR or LF may come with it.
        ({"path": {"add_prefix": "/a b"}}, "path.add_prefix"),
        ({"path": {"strip_prefix": "/a\r\nX-Injected: 1"}}, "path.strip_prefix"),
    ],
)
def test_bad_rules_are_config_errors(rule: dict[str, Any], message: str) -> None:
    from medlb.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        router(rules=[rule])
    assert message in str(info.value)
