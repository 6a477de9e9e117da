"""The admin HTTP API, the metrics endpoint and the dashboard, in medlb's own process.

One aiohttp application on the admin address (loopback by default). Why in
process: the API acts on the very objects the data path uses (a drain is one
attribute write, seen by the next ``select``), so there is no second source
of truth to keep in step, and no IPC to secure.

Security, by default and not by configuration:

- every request needs the token, as ``Authorization: Bearer <token>`` or as
  the dashboard's session cookie (set by ``POST /api/v1/login``; HttpOnly,
  SameSite=Strict); a wrong or missing token gets 401, a log line with the
  peer address (never the token), and no data;
- cookie-authenticated changes must carry ``X-Medlb-Request: 1``: a header a
  cross-site form cannot send, so a page elsewhere cannot drain a PACS node
  through a logged-in browser (CSRF);
- bodies are capped at 64 KiB, every input is validated and a bad one gets a
  4xx that says what is wrong.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from pydantic import ValidationError

from medlb.config import AdminConfig, ServerConfig, parse_duration
from medlb.errors import ConfigIssue, StartupError
from medlb.io.runtime import Runtime
from medlb.model.server import AdminState, Server

from .status import History, server_doc, status_doc

log = logging.getLogger("medlb.admin")

DASHBOARD = Path(__file__).resolve().parent / "dashboard"
MAX_BODY = 64 * 1024
#: Dashboard sessions kept at once; the oldest is forgotten beyond this.
MAX_COOKIE_SESSIONS = 256
#: Longest ``wait?until=drained`` a request may ask for.
MAX_WAIT = 3600.0
#: Pause before answering a failed login: slows guessing, costs a person nothing.
LOGIN_FAILURE_DELAY = 0.5
COOKIE = "medlb_session"
CSRF_HEADER = "X-Medlb-Request"
MIN_TOKEN_LENGTH = 16

_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
        "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ),
}


class AdminError(Exception):
    """A request that cannot be done; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


@dataclass
class ReloadResult:
    """What a reload did. ``status`` is the HTTP status of a refusal: 422 for a config
    that cannot be applied (invalid, a port in use, an unreadable secret), 409 when
    medlb cannot reload now, 500 for an internal error."""

    ok: bool
    message: str
    issues: list[ConfigIssue] = field(default_factory=list)
    status: int = 422

    def doc(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ok": self.ok, "message": self.message}
        if self.issues:
            out["errors"] = [{"where": i.loc, "message": i.message} for i in self.issues]
        return out


class Control(Protocol):
    """What the API needs from the supervisor beyond reading the runtime."""

    runtime: Runtime
    config_path: str
    last_reload: dict[str, Any] | None

    def add_server(self, backend: str, spec: ServerConfig, source: str) -> Server: ...

    def remove_server(self, backend: str, server: str, *, force: bool, source: str) -> int: ...

    async def reload(self, source: str) -> ReloadResult: ...


MetricsRenderer = Callable[[], tuple[bytes, str]]


def load_token(config: AdminConfig) -> str:
    """Read the admin token from its file or environment variable; refuse weak ones."""
    if config.token_file:
        try:
            token = Path(config.token_file).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise StartupError(
                f"admin.token_file {config.token_file}: not UTF-8 text (use e.g. openssl rand -base64 32)"
            ) from None
        except OSError as exc:
            raise StartupError(f"admin.token_file {config.token_file}: {exc.strerror}") from None
        where = f"admin.token_file {config.token_file}"
    elif config.token_env:
        token = os.environ.get(config.token_env, "").strip()
        where = f"admin.token_env {config.token_env}"
        if not token:
            raise StartupError(f"{where}: the environment variable is not set or empty")
    else:  # the config schema already refuses this
        raise StartupError("admin: no token configured")
    if len(token) < MIN_TOKEN_LENGTH:
        raise StartupError(f"{where}: the token must be at least {MIN_TOKEN_LENGTH} characters")
    return token


def tls_context(config: AdminConfig) -> ssl.SSLContext | None:
    if config.tls is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    try:
        context.load_cert_chain(config.tls.cert, config.tls.key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"admin.tls: cannot load {config.tls.cert} / {config.tls.key}: {exc}") from None
    return context


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, separators=(",", ":")))


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return _json({"error": message, **extra}, status)


class AdminServer:
    """The admin listener: API, metrics, dashboard, and the history sampler."""

    def __init__(self, config: AdminConfig, control: Control, metrics: MetricsRenderer | None = None) -> None:
        self.config = config
        self.control = control
        self.metrics = metrics
        self.token = load_token(config)
        self.ssl = tls_context(config)
        self.history = History()
        self._cookies: OrderedDict[str, float] = OrderedDict()
        self._runner: web.AppRunner | None = None
        self.address: tuple[str, int] | None = None

    def reconfigure(self, config: AdminConfig) -> None:
        """Reload: a new token takes effect at once (rotation); the bind needs a restart."""
        token = load_token(config)
        if token != self.token:
            self.token = token
            self._cookies.clear()
            log.warning("admin token changed: dashboard sessions logged out")
        if config.bind != self.config.bind or config.tls != self.config.tls:
            log.warning("admin.bind/admin.tls changes take effect at the next restart")
        self.config = config.model_copy(update={"bind": self.config.bind, "tls": self.config.tls})

    # -- lifecycle --------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = app.router
        r.add_get("/", self._index)
        r.add_static("/static/", DASHBOARD, show_index=False, follow_symlinks=False)
        r.add_get("/metrics", self._metrics)
        r.add_get("/api/v1/session", self._session)
        r.add_post("/api/v1/login", self._login)
        r.add_post("/api/v1/logout", self._logout)
        r.add_get("/api/v1/status", self._status)
        r.add_get("/api/v1/history", self._history)
        r.add_post("/api/v1/reload", self._reload)
        base = "/api/v1/backends/{backend}/servers"
        r.add_post(base, self._add_server)
        r.add_get(base + "/{server}", self._get_server)
        r.add_patch(base + "/{server}", self._patch_server)
        r.add_delete(base + "/{server}", self._delete_server)
        r.add_get(base + "/{server}/wait", self._wait)
        r.add_post(base + "/{server}/shutdown-sessions", self._shutdown_sessions)
        return app

    async def start(self) -> None:
        runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await runner.setup()
        bind = self.config.bind
        site = web.TCPSite(runner, bind.host, bind.port, ssl_context=self.ssl, backlog=128, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(f"cannot bind admin {bind}: {exc.strerror}") from None
        self._runner = runner
        server = site._server  # aiohttp keeps the asyncio server private; the port is needed for port 0
        sockets = getattr(server, "sockets", None) or []
        name = sockets[0].getsockname() if sockets else (bind.host, bind.port)
        self.address = (name[0], name[1])
        scheme = "https" if self.ssl else "http"
        if self.ssl is None and not ipaddress.ip_address(self.address[0]).is_loopback:
            log.warning(
                "admin API on %s without TLS: the token crosses the network in clear; set admin.tls",
                self.address[0],
            )
        log.info("admin API and dashboard on %s://%s:%d/", scheme, self.address[0], self.address[1])

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def sample_forever(self) -> None:
        """Feed the dashboard history (one sample per interval); runs in the TaskGroup."""
        while True:
            try:
                self.control.runtime.prune()
                self.history.sample(self.control.runtime)
            except Exception:
                log.exception("history sample failed")
            await asyncio.sleep(self.history.interval)

    # -- authentication -----------------------------------------------------------------------

    def _check_bearer(self, request: web.Request) -> bool | None:
        """True/False for a present bearer token, None when there is none."""
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return _same_token(value.strip(), self.token)

    def _check_cookie(self, request: web.Request) -> bool:
        sid = request.cookies.get(COOKIE)
        if not sid:
            return False
        expires = self._cookies.get(sid)
        if expires is None:
            return False
        if expires < time.monotonic():
            del self._cookies[sid]
            return False
        return True

    def _who(self, request: web.Request) -> str:
        return f"operator via {request.get('auth', 'api')} from {request.remote}"

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            response = await self._dispatch(request, handler)
        except AdminError as exc:
            response = _error(exc.status, exc.message, **exc.extra)
        except web.HTTPException as exc:
            if exc.status >= 400:
                text = exc.reason if exc.status != 413 else f"request body larger than {MAX_BODY} bytes"
                response = _error(exc.status, text)
            else:
                raise
        if request.method not in ("GET", "HEAD") and request.path != "/api/v1/login" and "auth" in request:
            log.info(
                "admin: %s %s by %s -> %d",
                request.method,
                _loggable(request.raw_path),
                self._who(request),
                response.status,
            )
        for key, value in _SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        if request.path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    async def _dispatch(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        path = request.path
        public = path == "/" or path.startswith("/static/") or path == "/api/v1/login"
        if path == "/metrics" and not self.config.metrics_auth:
            public = True
        if public:
            return await handler(request)
        bearer = self._check_bearer(request)
        if bearer:
            request["auth"] = "token"
        elif bearer is None and self._check_cookie(request):
            if request.method not in ("GET", "HEAD") and request.headers.get(CSRF_HEADER) != "1":
                log.warning(
                    "admin: %s %s from %s refused: missing %s header", request.method, path, request.remote, CSRF_HEADER
                )
                raise AdminError(403, f"cookie-authenticated changes need the {CSRF_HEADER}: 1 header")
            request["auth"] = "dashboard"
        else:
            log.warning(
                "admin: %s %s from %s refused: %s",
                _loggable(request.method),
                _loggable(request.raw_path),
                request.remote,
                "invalid token" if bearer is False else "no token",
            )
            return _json({"error": "authentication required: send Authorization: Bearer <token>"}, 401)
        return await handler(request)

    # -- dashboard and session ----------------------------------------------------------------

    async def _index(self, request: web.Request) -> web.StreamResponse:
        index = DASHBOARD / "index.html"
        if not index.is_file():
            return _error(404, "dashboard assets are not installed")
        return web.FileResponse(index, headers={"Cache-Control": "no-cache"})

    async def _session(self, request: web.Request) -> web.Response:
        return _json({"authenticated": True, "via": request.get("auth")})

    async def _login(self, request: web.Request) -> web.Response:
        body = await _body(request)
        token = body.get("token")
        if not isinstance(token, str) or not _same_token(token, self.token):
            log.warning("admin: failed dashboard login from %s", request.remote)
            await asyncio.sleep(LOGIN_FAILURE_DELAY)
            return _error(401, "invalid token")
        sid = secrets.token_urlsafe(32)
        self._cookies[sid] = time.monotonic() + self.config.session_ttl
        while len(self._cookies) > MAX_COOKIE_SESSIONS:
            self._cookies.popitem(last=False)
        log.info("admin: dashboard login from %s", request.remote)
        response = _json({"ok": True})
        response.set_cookie(
            COOKIE,
            sid,
            max_age=int(self.config.session_ttl),
            httponly=True,
            samesite="Strict",
            secure=self.ssl is not None,
            path="/",
        )
        return response

    async def _logout(self, request: web.Request) -> web.Response:
        sid = request.cookies.get(COOKIE)
        if sid:
            self._cookies.pop(sid, None)
        response = _json({"ok": True})
        response.del_cookie(COOKIE, path="/")
        return response

    # -- reading ------------------------------------------------------------------------------

    async def _status(self, request: web.Request) -> web.Response:
        control = self.control
        return _json(
            status_doc(control.runtime, self.history, config_path=control.config_path, last_reload=control.last_reload)
        )

    async def _history(self, request: web.Request) -> web.Response:
        return _json(self.history.doc())

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return _error(404, "metrics are not available")
        body, content_type = self.metrics()
        response = web.Response(body=body)
        response.headers["Content-Type"] = content_type
        return response

    def _server(self, request: web.Request) -> Server:
        runtime = self.control.runtime
        b_name, s_name = request.match_info["backend"], request.match_info["server"]
        backend = runtime.backends.get(b_name)
        if backend is None:
            raise AdminError(404, f"no backend named {b_name!r}", backends=sorted(runtime.backends))
        server = backend.server(s_name)
        if server is None:
            raise AdminError(
                404, f"backend {b_name!r} has no server named {s_name!r}", servers=[s.name for s in backend.servers]
            )
        return server

    def _server_doc(self, server: Server) -> dict[str, Any]:
        runtime = self.control.runtime
        backend = runtime.backends[server.backend_name]
        live = runtime.live_bytes().get(server, (server.bytes_in, server.bytes_out))
        return server_doc(runtime, server, backend.clock(), live)

    async def _get_server(self, request: web.Request) -> web.Response:
        return _json(self._server_doc(self._server(request)))

    # -- changing -----------------------------------------------------------------------------

    async def _patch_server(self, request: web.Request) -> web.Response:
        # Body first: the server is looked up after the last await, so a reload that
        # replaces it while the body arrives cannot leave us changing a retired object.
        body = await _body(request)
        server = self._server(request)
        unknown = set(body) - {"admin_state", "weight", "reason"}
        if unknown:
            raise AdminError(400, f"unknown field(s) {sorted(unknown)}; expected admin_state, weight, reason")
        if not body.keys() & {"admin_state", "weight"}:
            raise AdminError(400, "nothing to change: send admin_state and/or weight")
        state: AdminState | None = None
        if "admin_state" in body:
            try:
                state = AdminState(body["admin_state"])
            except ValueError:
                raise AdminError(
                    400, f"admin_state must be one of ready, drain, maint; got {body['admin_state']!r}"
                ) from None
        weight = body.get("weight")
        if "weight" in body and (not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 256):
            raise AdminError(400, f"weight must be an integer 0..256; got {weight!r}")
        reason = body.get("reason", "")
        if not isinstance(reason, str) or len(reason) > 200 or not reason.isprintable():
            raise AdminError(400, "reason must be printable text of at most 200 characters (no line breaks)")
        source = self._who(request)
        backend = self.control.runtime.backends[server.backend_name]
        if state is not None:
            server.set_admin_state(state, backend.clock(), source, reason)
        if isinstance(weight, int):
            server.set_weight(weight, source)
        await self._peers_applied()
        return _json(self._server_doc(server))

    async def _add_server(self, request: web.Request) -> web.Response:
        b_name = request.match_info["backend"]
        body = await _body(request)
        overrides = sorted(body.keys() & {"check", "agent"})
        if overrides:
            # A check is code the balancer runs (``external`` runs a program, ``http``
            # makes requests to any host): the API token must not grant that. An added
            # server is checked like the rest of its backend; per-server checks belong
            # in the config file, which only root can edit.
            raise AdminError(
                400, f"{', '.join(overrides)} cannot be set through the API; the server inherits its backend's"
            )
        try:
            spec = ServerConfig.model_validate(body)
        except ValidationError as exc:
            problems = [
                {
                    "where": ".".join(str(p) for p in e["loc"]) or "(body)",
                    "message": e["msg"].removeprefix("Value error, "),
                }
                for e in exc.errors()
            ]
            raise AdminError(
                400, "invalid server: " + "; ".join(f"{p['where']}: {p['message']}" for p in problems), errors=problems
            ) from None
        server = self.control.add_server(b_name, spec, self._who(request))
        await self._peers_applied()
        return _json(self._server_doc(server), 201)

    async def _delete_server(self, request: web.Request) -> web.Response:
        force = _flag(request, "force")
        closed = self.control.remove_server(
            request.match_info["backend"], request.match_info["server"], force=force, source=self._who(request)
        )
        await self._peers_applied()
        return _json({"removed": request.match_info["server"], "closed_sessions": closed})

    async def _wait(self, request: web.Request) -> web.Response:
        server = self._server(request)
        until = request.query.get("until", "drained")
        if until != "drained":
            raise AdminError(400, f"until must be 'drained'; got {until!r}")
        try:
            timeout = parse_duration(request.query.get("timeout", "30s"))
        except ValueError as exc:
            raise AdminError(400, f"timeout: {exc}") from None
        if not 0 <= timeout <= MAX_WAIT:
            raise AdminError(400, f"timeout must be at most {MAX_WAIT:.0f}s")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        # With worker processes, a session a worker opened just before the drain reached it
        # shows in its next report: "drained" is only believed once one has surely arrived.
        settled = server.last_change + self.control.runtime.peer_lag
        # Polling on purpose: an event would cost the data path a callback on every
        # session end to serve a request an operator makes a few times a month.
        while (server.all_sessions > 0 or loop.time() < settled) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(min(0.1, max(deadline - loop.time(), 0.0)))
        drained = server.all_sessions == 0 and loop.time() >= settled
        doc = {"drained": drained, "cur_sessions": server.all_sessions, "admin_state": server.admin_state.value}
        if not drained:
            doc["error"] = f"{server.key} still has {server.all_sessions} session(s) after {timeout:g}s"
            return _json(doc, 408)
        return _json(doc)

    async def _peers_applied(self) -> None:
        """With worker processes: answer a change only once every process has applied it."""
        sync = self.control.runtime.peer_sync
        if sync is not None:
            await sync()

    async def _shutdown_sessions(self, request: web.Request) -> web.Response:
        server = self._server(request)
        closed = self.control.runtime.shutdown_sessions(server, "admin_shutdown")
        await self._peers_applied()
        return _json({"closed": closed})

    async def _reload(self, request: web.Request) -> web.Response:
        result = await self.control.reload(self._who(request))
        if result.ok:
            await self._peers_applied()
        return _json(result.doc(), 200 if result.ok else result.status)


def _same_token(given: str, token: str) -> bool:
    """Constant-time comparison that cannot raise on odd input (lone surrogates)."""
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def _loggable(text: str, limit: int = 200) -> str:
    """Client-controlled text made safe for one log line: no line breaks, bounded."""
    out = text if text.isprintable() else text.encode("unicode_escape").decode("ascii")
    return out if len(out) <= limit else out[:limit] + "..."


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON object of a request, or a 400 that says what is wrong with it."""
    if not request.can_read_body:
        return {}
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdminError(400, f"invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise AdminError(400, "the request body must be a JSON object")
    return data


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value in ("1", "true", "yes"):
        return True
    if value in ("0", "false", "no", ""):
        return False
    raise AdminError(400, f"{name} must be true or false; got {value!r}")
