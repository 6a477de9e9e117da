"""HTTP routing rules: which backend a request goes to, and what changes on the way.

Sans-IO and pure: a compiled :class:`Router` takes a parsed request head and
returns a :class:`Decision`; the I/O ring carries it out. Rules are evaluated
in order and the first whose conditions all hold applies its actions (the
model of HAProxy's ``use_backend ... if`` lines, without a second language to
learn). Frontend-wide header changes and HSTS apply to every request.

Header values and redirect targets are checked so that no rule can inject a
header line (CR, LF and NUL never pass), and a redirect's ``{host}`` is the
request's validated Host.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from medlb.config import FrontendConfig, HeaderOps, HttpRule, Redirect
from medlb.proto.http import RequestHead

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """A compiled :class:`~medlb.config.HeaderOps`: delete, then set, then add."""

    delete: frozenset[bytes] = frozenset()
    set: tuple[tuple[bytes, bytes], ...] = ()
    add: tuple[tuple[bytes, bytes], ...] = ()

    @classmethod
    def compile(cls, ops: HeaderOps | None) -> HeaderEdit | None:
        if ops is None or not (ops.delete or ops.set or ops.add):
            return None
        return cls(
            delete=frozenset(n.lower().encode() for n in ops.delete),
            set=tuple((n.encode(), v.encode()) for n, v in ops.set.items()),
            add=tuple((n.encode(), v.encode()) for n, v in ops.add.items()),
        )

    def apply(self, headers: Headers) -> Headers:
        drop = self.delete | {n.lower() for n, _ in self.set}
        out = [(n, v) for n, v in headers if n.lower() not in drop] if drop else list(headers)
        out.extend(self.set)
        out.extend(self.add)
        return out


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request. ``backend`` None means the frontend's default backend."""

    backend: str | None = None
    redirect: tuple[int, bytes] | None = None  # (status, Location)
    target: bytes | None = None  # a rewritten request-target
    request_edits: tuple[HeaderEdit, ...] = ()
    response_edits: tuple[HeaderEdit, ...] = ()
    hsts: bytes | None = None  # a Strict-Transport-Security value (TLS responses only)


DEFAULT = Decision()


@dataclass(frozen=True)
class _Rule:
    hosts: tuple[str, ...] | None
    prefixes: tuple[bytes, ...] | None
    regex: re.Pattern[bytes] | None
    methods: frozenset[bytes] | None
    headers: tuple[tuple[bytes, re.Pattern[bytes]], ...]
    tls: bool | None
    backend: str | None
    redirect: Redirect | None
    strip: bytes | None
    add: bytes | None
    request_edit: HeaderEdit | None
    response_edit: HeaderEdit | None

    def matches(self, head: RequestHead, path: bytes, host: str, tls: bool) -> bool:
        if self.tls is not None and self.tls != tls:
            return False
        if self.methods is not None and head.method not in self.methods:
            return False
        if self.hosts is not None and not any(_host_match(pattern, host) for pattern in self.hosts):
            return False
        if self.prefixes is not None and not any(_prefix_match(path, p) for p in self.prefixes):
            return False
        if self.regex is not None and self.regex.search(path) is None:
            return False
        for name, pattern in self.headers:
            value = head.header(name)
            if value is None or pattern.search(value) is None:
                return False
        return True


def _prefix_match(path: bytes, prefix: bytes) -> bool:
    """``/dicom-web`` matches ``/dicom-web`` and ``/dicom-web/...``, not ``/dicom-webx``."""
    if not path.startswith(prefix):
        return False
    return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in b"/?"


def _host_match(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") >= pattern.count(".")
    return host == pattern


def _compile(rule: HttpRule) -> _Rule:
    m = rule.if_
    return _Rule(
        hosts=tuple(h.lower() for h in m.host) if m.host is not None else None,
        prefixes=tuple(p.encode() for p in m.path_prefix) if m.path_prefix is not None else None,
        regex=re.compile(m.path_regex.encode()) if m.path_regex is not None else None,
        methods=frozenset(x.encode() for x in m.method) if m.method is not None else None,
        headers=tuple((n.lower().encode(), re.compile(v.encode())) for n, v in (m.header or {}).items()),
        tls=m.tls,
        backend=rule.use_backend,
        redirect=rule.redirect,
        strip=rule.path.strip_prefix.encode() if rule.path and rule.path.strip_prefix else None,
        add=rule.path.add_prefix.encode() if rule.path and rule.path.add_prefix else None,
        request_edit=HeaderEdit.compile(rule.request_headers),
        response_edit=HeaderEdit.compile(rule.response_headers),
    )


@dataclass(frozen=True)
class Router:
    rules: tuple[_Rule, ...] = ()
    request_edit: HeaderEdit | None = None
    response_edit: HeaderEdit | None = None
    hsts: bytes | None = None
    _empty: bool = field(default=True)

    @classmethod
    def compile(cls, frontend: FrontendConfig) -> Router:
        hsts = None
        if frontend.hsts is not None:
            h = frontend.hsts
            hsts = b"max-age=%d" % int(h.max_age)
            if h.include_subdomains:
                hsts += b"; includeSubDomains"
            if h.preload:
                hsts += b"; preload"
        router = cls(
            rules=tuple(_compile(r) for r in frontend.rules),
            request_edit=HeaderEdit.compile(frontend.request_headers),
            response_edit=HeaderEdit.compile(frontend.response_headers),
            hsts=hsts,
        )
        object.__setattr__(
            router, "_empty", not (router.rules or router.request_edit or router.response_edit or router.hsts)
        )
        return router

    def decide(self, head: RequestHead, tls: bool) -> Decision:
        """The decision for one request; the shared :data:`DEFAULT` when nothing applies (no allocation)."""
        if self._empty:
            return DEFAULT
        target = head.target
        path, _, query = target.partition(b"?")
        host = (head.host or b"").decode("latin-1").lower()
        host_only = host.rsplit(":", 1)[0] if host and not host.endswith("]") else host
        request_edits = [self.request_edit] if self.request_edit is not None else []
        response_edits = [self.response_edit] if self.response_edit is not None else []
        hsts = self.hsts if tls else None
        for rule in self.rules:
            if not rule.matches(head, path, host_only, tls):
                continue
            if rule.request_edit is not None:
                request_edits.append(rule.request_edit)
            if rule.response_edit is not None:
                response_edits.append(rule.response_edit)
            if rule.redirect is not None:
                return Decision(
                    redirect=(rule.redirect.code, _location(rule.redirect, host, path, query)),
                    response_edits=tuple(response_edits),
                    hsts=hsts,
                )
            new_target = None
            if rule.strip is not None or rule.add is not None:
                new_path = path
                if rule.strip is not None and _prefix_match(new_path, rule.strip.rstrip(b"/") or b"/"):
                    new_path = new_path[len(rule.strip.rstrip(b"/")) :] or b"/"
                    if not new_path.startswith(b"/"):
                        new_path = b"/" + new_path
                if rule.add is not None:
                    new_path = rule.add.rstrip(b"/") + new_path
                new_target = new_path + (b"?" + query if query else b"")
            return Decision(
                backend=rule.backend,
                target=new_target,
                request_edits=tuple(request_edits),
                response_edits=tuple(response_edits),
                hsts=hsts,
            )
        return Decision(request_edits=tuple(request_edits), response_edits=tuple(response_edits), hsts=hsts)


#: A frontend without rules, header changes or HSTS.
NO_RULES = Router()


def _location(redirect: Redirect, host: str, path: bytes, query: bytes) -> bytes:
    if redirect.location is not None:
        text = redirect.location.replace("{host}", host).replace("{path}", path.decode("latin-1"))
        text = text.replace("{query}", ("?" + query.decode("latin-1")) if query else "")
    else:
        text = f"{redirect.scheme}://{host}{path.decode('latin-1')}" + (f"?{query.decode('latin-1')}" if query else "")
    # No header injection through a redirect: the parts came from a validated request, but be sure.
    return text.encode("latin-1", "replace").translate(None, b"\r\n\x00")
