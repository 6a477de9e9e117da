"""Alerts: webhook and SMTP delivery against local receivers, the per-subject rate
limit, the backend/server watcher, and isolation between channels."""

from __future__ import annotations

import asyncio
import datetime
import email
import email.policy
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP as SMTPServer
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from medlb.admin.alerts import AlertEvent, AlertManager, email_message, webhook_payload
from medlb.balance import make_balancer
from medlb.config import AlertsConfig, EmailAlert, HostPort
from medlb.errors import StartupError
from medlb.model.backend import Backend, BackendPolicy
from medlb.model.health import OpState
from medlb.model.server import AdminState, Server
from tests.helpers import free_port, self_signed_cert

SECRET_HEADER = "Bearer t0ken-never-logged"
SECRET_PATH = "/hooks/T000-SECRETPATH"


class FakeClock:
    """Unix time that only moves when a test says so."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(
    *,
    webhook: str | None = None,
    email_cfg: dict[str, Any] | None = None,
    burst: int = 3,
    window: str = "300s",
    headers: dict[str, str] | None = None,
) -> AlertsConfig:
    raw: dict[str, Any] = {"rate_limit": {"burst": burst, "window": window}}
    if webhook is not None:
        raw["webhook"] = {"url": webhook, "timeout": "2s", "headers": headers or {}}
    if email_cfg is not None:
        raw["email"] = {"from": "medlb@lb1.test", "to": ["pacs-team@hospital.test"], "timeout": "3s", **email_cfg}
    return AlertsConfig.model_validate(raw)


def event(subject: str = "pacs/s1", kind: str = "server_down", at: float = 1_700_000_000.25) -> AlertEvent:
    return AlertEvent(
        kind, subject, f"server {subject} is DOWN: connection refused", "connection refused", at, "warning"
    )


async def wait_until(predicate: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``predicate``: the counters under test have no event to wait on."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@asynccontextmanager
async def running(manager: AlertManager) -> AsyncIterator[asyncio.Task[None]]:
    """Run the delivery loop for the block; it must still be running at the end."""
    task = asyncio.create_task(manager.run())
    try:
        yield task
        assert not task.done(), "run() must never return or raise on its own"
    finally:
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task


# -- a local webhook receiver --------------------------------------------------------


@dataclass
class Receiver:
    """An aiohttp app that records each POST and answers ``status``."""

    status: int = 200
    posts: list[tuple[dict[str, str], dict[str, Any]]] = field(default_factory=list)
    hits: int = 0
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        body = await request.json()
        self.posts.append((dict(request.headers), body))
        return web.Response(status=self.status, text="ok")

    @asynccontextmanager
    async def serve(self) -> AsyncIterator[Receiver]:
        app = web.Application()
        app.router.add_post(SECRET_PATH, self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        self.url = f"http://{host}:{port}{SECRET_PATH}"
        try:
            yield self
        finally:
            await runner.cleanup()


# -- webhook -----------------------------------------------------------------------------


def test_webhook_delivers_the_json_document(run: Any) -> None:
    async def main() -> tuple[Receiver, AlertManager]:
        async with Receiver().serve() as rx:
            cfg = config(webhook=rx.url, headers={"Authorization": SECRET_HEADER, "X-Site": "radiology"})
            mgr = AlertManager(cfg, node="lb1")
            async with running(mgr):
                mgr.emit(event())
                await wait_until(lambda: mgr.sent_total["webhook"] == 1)
            return rx, mgr

    rx, mgr = run(main())
    assert rx.hits == 1
    headers, body = rx.posts[0]
    assert headers["Authorization"] == SECRET_HEADER and headers["X-Site"] == "radiology"
    assert headers["Content-Type"] == "application/json"
    assert body == {
        "source": "medlb",
        "node": "lb1",
        "kind": "server_down",
        "severity": "warning",
        "subject": "pacs/s1",
        "text": "server pacs/s1 is DOWN: connection refused",
        "cause": "connection refused",
        "at": "2023-11-14T22:13:20.250+00:00",
        "at_unix": 1_700_000_000.25,
        "suppressed": 0,
    }
    assert datetime.datetime.fromisoformat(body["at"]).timestamp() == body["at_unix"]
    assert mgr.stats() == {
        "sent": {"webhook": 1, "email": 0},
        "failed": {"webhook": 0, "email": 0},
        "suppressed": 0,
        "dropped": 0,
        "queued": {"webhook": 0, "email": 0},
    }


@pytest.mark.parametrize(("status", "attempts"), [(503, 3), (404, 1)])
def test_webhook_non_2xx_is_retried_when_transient_then_counted_failed(
    run: Any, caplog: pytest.LogCaptureFixture, status: int, attempts: int
) -> None:
    caplog.set_level(logging.INFO, logger="medlb.alerts")

    async def main() -> tuple[Receiver, AlertManager]:
        async with Receiver(status=status).serve() as rx:
            cfg = config(webhook=rx.url, headers={"Authorization": SECRET_HEADER})
            mgr = AlertManager(cfg, node="lb1", retries=2, backoff=0.01)
            async with running(mgr):
                mgr.emit(event())
                await wait_until(lambda: mgr.failed_total["webhook"] == 1)
                await asyncio.sleep(0.05)  # no late extra attempt
            return rx, mgr

    rx, mgr = run(main())
    assert rx.hits == attempts
    assert mgr.sent_total["webhook"] == 0 and mgr.failed_total == {"webhook": 1, "email": 0}
    assert f"HTTP {status}" in caplog.text and "not delivered after" in caplog.text
    assert "t0ken" not in caplog.text and "SECRETPATH" not in caplog.text


def test_webhook_unreachable_is_retried_and_logged_without_the_url_path(
    run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()

    async def main() -> AlertManager:
        mgr = AlertManager(config(webhook=f"http://127.0.0.1:{port}{SECRET_PATH}"), retries=1, backoff=0.01)
        async with running(mgr):
            mgr.emit(event())
            await wait_until(lambda: mgr.failed_total["webhook"] == 1)
        return mgr

    mgr = run(main())
    assert mgr.sent_total["webhook"] == 0
    failure = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(failure) == 1 and "2 attempt(s)" in failure[0] and f"127.0.0.1:{port}" in failure[0]
    assert "SECRETPATH" not in caplog.text


# -- email ---------------------------------------------------------------------------------


@dataclass
class Sink:
    """An aiosmtpd handler that keeps every message, with its session's TLS and login."""

    messages: list[tuple[Envelope, bool, str | None]] = field(default_factory=list)
    logins: list[tuple[bytes, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: SMTPServer, session: Session, envelope: Envelope) -> str:
        login = session.auth_data.login.decode() if session.authenticated else None
        # session.ssl is only set by STARTTLS; implicit TLS shows on the transport.
        tls = server.transport is not None and server.transport.get_extra_info("ssl_object") is not None
        self.messages.append((envelope, tls, login))
        return "250 OK"

    def authenticator(
        self, server: SMTPServer, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        assert isinstance(auth_data, LoginPassword)
        self.logins.append((auth_data.login, auth_data.password))
        ok = auth_data.login == b"medlb" and auth_data.password == b"s3cret"
        return AuthResult(success=ok, auth_data=auth_data)


def start_sink(sink: Sink, **kwargs: Any) -> Controller:
    controller = Controller(sink, hostname="127.0.0.1", port=free_port(), authenticator=sink.authenticator, **kwargs)
    controller.start()
    return controller


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return self_signed_cert(tmp_path_factory.mktemp("tls"), "smtp.test", "IP:127.0.0.1")


def server_tls(cert: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)
    return ctx


def send_one(run: Any, mgr: AlertManager, until: Callable[[], bool]) -> None:
    async def main() -> None:
        async with running(mgr):
            mgr.emit(event())
            await wait_until(until, within=5.0)

    run(main())


def test_email_plain_with_auth_from_password_file(run: Any, tmp_path: Path) -> None:
    secret = tmp_path / "smtp-password"
    secret.write_text("s3cret\n")
    sink = Sink()
    controller = start_sink(sink, auth_require_tls=False)
    try:
        cfg = config(
            email_cfg={
                "host": "127.0.0.1",
                "port": controller.port,
                "security": "none",
                "username": "medlb",
                "password_file": str(secret),
                "subject_prefix": "[pacs-lb]",
            }
        )
        mgr = AlertManager(cfg, node="lb1")
        send_one(run, mgr, lambda: mgr.sent_total["email"] == 1)
    finally:
        controller.stop()
    assert sink.logins == [(b"medlb", b"s3cret")]  # the file's trailing newline is stripped
    assert len(sink.messages) == 1
    envelope, tls, login = sink.messages[0]
    assert (tls, login) == (False, "medlb")
    assert envelope.mail_from == "medlb@lb1.test" and envelope.rcpt_tos == ["pacs-team@hospital.test"]
    assert isinstance(envelope.content, bytes)
    msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
    assert msg["Subject"] == "[pacs-lb] WARNING: server pacs/s1 is DOWN: connection refused"
    assert msg["To"] == "pacs-team@hospital.test"
    body = msg.get_body().get_content()  # type: ignore[union-attr]
    for needle in ("kind:       server_down", "subject:    pacs/s1", "cause:      connection refused", "lb1"):
        assert needle in body
    assert "s3cret" not in envelope.content.decode()


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_email_over_tls_with_a_self_signed_cert(
    run: Any, cert: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, security: str
) -> None:
    monkeypatch.setenv("MEDLB_TEST_SMTP_PASSWORD", "s3cret")
    sink = Sink()
    ctx = server_tls(cert)
    tls_kwargs = (
        {"tls_context": ctx, "require_starttls": True}
        if security == "starttls"
        else {"ssl_context": ctx, "auth_require_tls": False}
    )
    controller = start_sink(sink, **tls_kwargs)
    try:
        cfg = config(
            email_cfg={
                "host": "127.0.0.1",
                "port": controller.port,
                "security": security,
                "tls_verify": False,
                "username": "medlb",
                "password_env": "MEDLB_TEST_SMTP_PASSWORD",
            }
        )
        mgr = AlertManager(cfg, node="lb1")
        send_one(run, mgr, lambda: mgr.sent_total["email"] == 1)
    finally:
        controller.stop()
    assert sink.logins == [(b"medlb", b"s3cret")]
    assert [(tls, login) for _, tls, login in sink.messages] == [(True, "medlb")]


def test_email_tls_is_verified_by_default(run: Any, cert: tuple[Path, Path], caplog: pytest.LogCaptureFixture) -> None:
    sink = Sink()
    controller = start_sink(sink, tls_context=server_tls(cert), require_starttls=True)
    try:
        cfg = config(email_cfg={"host": "127.0.0.1", "port": controller.port, "security": "starttls"})
        mgr = AlertManager(cfg, node="lb1", retries=2, backoff=0.01)
        send_one(run, mgr, lambda: mgr.failed_total["email"] == 1)
    finally:
        controller.stop()
    assert sink.messages == [] and mgr.sent_total["email"] == 0
    # A certificate problem will not fix itself: one attempt, then a clear log line.
    assert "1 attempt(s)" in caplog.text and "CERTIFICATE_VERIFY_FAILED" in caplog.text


def test_missing_password_is_a_startup_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MEDLB_TEST_NO_SUCH_VAR", raising=False)
    base = {"host": "smtp.test", "username": "medlb"}
    missing = tmp_path / "nope"
    with pytest.raises(StartupError, match=r"password_file: cannot read .*nope"):
        AlertManager(config(email_cfg={**base, "password_file": str(missing)}))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(StartupError, match="is empty"):
        AlertManager(config(email_cfg={**base, "password_file": str(tmp_path / "empty")}))
    with pytest.raises(StartupError, match="MEDLB_TEST_NO_SUCH_VAR is not set"):
        AlertManager(config(email_cfg={**base, "password_env": "MEDLB_TEST_NO_SUCH_VAR"}))
    with pytest.raises(StartupError, match="neither password_file nor password_env"):
        AlertManager(config(email_cfg=base))
    # A reload with a bad secret changes nothing.
    good = config(webhook="http://127.0.0.1:9/x")
    mgr = AlertManager(good)
    with pytest.raises(StartupError):
        mgr.reconfigure(config(email_cfg={**base, "password_file": str(missing)}))
    assert mgr.config is good


def test_a_dead_smtp_server_does_not_delay_webhooks(run: Any) -> None:
    """The SMTP relay accepts the connection and then says nothing, for ever."""

    async def main() -> tuple[float, AlertManager]:
        held: list[asyncio.StreamWriter] = []

        async def blackhole(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)

        smtp = await asyncio.start_server(blackhole, "127.0.0.1", 0)
        smtp_port = smtp.sockets[0].getsockname()[1]
        try:
            async with Receiver().serve() as rx:
                cfg = config(
                    webhook=rx.url,
                    email_cfg={"host": "127.0.0.1", "port": smtp_port, "security": "none", "timeout": "10s"},
                )
                mgr = AlertManager(cfg, node="lb1", backoff=0.01)
                async with running(mgr):
                    start = time.monotonic()
                    mgr.emit(event("pacs/s1"))
                    mgr.emit(event("pacs/s2"))
                    await wait_until(lambda: mgr.sent_total["webhook"] == 2, within=5.0)
                    elapsed = time.monotonic() - start
                    await wait_until(lambda: bool(held))
                    assert mgr.sent_total["email"] == 0 and mgr.failed_total["email"] == 0
                    # Let the stuck SMTP thread finish now rather than at its timeout.
                    smtp.close()
                    for writer in held:
                        writer.close()
        finally:
            smtp.close()
            await smtp.wait_closed()
        return elapsed, mgr

    elapsed, mgr = run(main())
    assert elapsed < 2.0  # the email timeout is 10 s
    assert mgr.sent_total["webhook"] == 2


# -- rate limiting ------------------------------------------------------------------------


def test_a_flapping_server_is_rate_limited_and_the_count_is_reported(run: Any) -> None:
    clock = FakeClock()

    async def main() -> list[dict[str, Any]]:
        async with Receiver().serve() as rx:
            mgr = AlertManager(config(webhook=rx.url, burst=3, window="60s"), clock=clock, tick=3600)
            for n in range(20):
                kind = "server_down" if n % 2 == 0 else "server_up"
                mgr.emit(AlertEvent(kind, "pacs/s1", f"flap {n}", "check", clock(), "warning"))
                clock.now += 1
            # The backend is its own subject: the server's flood cannot hold it back.
            mgr.emit(AlertEvent("backend_down", "pacs", "backend pacs has no usable server", "", clock(), "critical"))
            assert mgr.suppressed_total == 17
            async with running(mgr):
                await wait_until(lambda: rx.hits == 4)
                await asyncio.sleep(0.05)
                assert rx.hits == 4
                clock.now += 60
                mgr.emit(AlertEvent("server_down", "pacs/s1", "flap 20", "check", clock(), "warning"))
                await wait_until(lambda: rx.hits == 5)
            return [body for _, body in rx.posts]

    bodies = run(main())
    assert [(b["subject"], b["text"], b["suppressed"]) for b in bodies] == [
        ("pacs/s1", "flap 0", 0),
        ("pacs/s1", "flap 1", 0),
        ("pacs/s1", "flap 2", 0),
        ("pacs", "backend pacs has no usable server", 0),
        ("pacs/s1", "flap 20 (17 similar alerts suppressed)", 17),
    ]


def test_held_back_alerts_are_flushed_with_the_latest_state(run: Any) -> None:
    """A flap that ends UP must not leave DOWN as the last word an operator read."""
    clock = FakeClock()

    async def main() -> list[dict[str, Any]]:
        async with Receiver().serve() as rx:
            mgr = AlertManager(config(webhook=rx.url, burst=1, window="60s"), clock=clock, tick=0.01)
            for n, kind in enumerate(["server_down", "server_up", "server_down", "server_up"]):
                mgr.emit(AlertEvent(kind, "pacs/s1", f"{kind} {n}", "check", clock(), "warning"))
            async with running(mgr):
                await wait_until(lambda: rx.hits == 1)
                await asyncio.sleep(0.05)  # ticks run, but the window is still closed
                assert rx.hits == 1
                clock.now += 60
                await wait_until(lambda: rx.hits == 2)
                await asyncio.sleep(0.05)  # and exactly one flush
            return [body for _, body in rx.posts]

    bodies = run(main())
    assert [(b["kind"], b["text"], b["suppressed"]) for b in bodies] == [
        ("server_down", "server_down 0", 0),
        ("server_up", "server_up 3 (latest of 3 suppressed alerts)", 3),
    ]


def test_reconfigure_keeps_rate_limit_state_and_drops_removed_channels() -> None:
    clock = FakeClock()
    mgr = AlertManager(config(webhook="http://127.0.0.1:9/a", burst=2, window="60s"), clock=clock)
    mgr.emit(event())
    mgr.emit(event())
    mgr.reconfigure(config(webhook="http://127.0.0.1:9/b", burst=2, window="60s"))
    mgr.emit(event())
    assert mgr.suppressed_total == 1 and mgr.queued() == {"webhook": 2, "email": 0}
    mgr.reconfigure(None)
    assert mgr.queued() == {"webhook": 0, "email": 0} and mgr.dropped_total == 2
    mgr.emit(event("pacs/s9"))  # nothing configured: not even counted
    assert mgr.suppressed_total == 1 and mgr.queued() == {"webhook": 0, "email": 0}


def test_a_full_queue_drops_the_oldest(run: Any) -> None:
    async def main() -> list[str]:
        async with Receiver().serve() as rx:
            mgr = AlertManager(config(webhook=rx.url), queue_size=3)
            for n in range(5):
                mgr.emit(event(f"pacs/s{n}"))
            assert mgr.dropped_total == 2 and mgr.queued()["webhook"] == 3
            async with running(mgr):
                await wait_until(lambda: mgr.sent_total["webhook"] == 3)
            return [body["subject"] for _, body in rx.posts]

    assert run(main()) == ["pacs/s2", "pacs/s3", "pacs/s4"]


# -- watch(): real servers and a real backend ------------------------------------------


def srv(name: str, op_state: OpState = OpState.UP) -> Server:
    return Server(name, HostPort("127.0.0.1", 1000 + len(name)), op_state=op_state)


def pool(name: str, *servers: Server) -> Backend:
    return Backend(name, list(servers), make_balancer("roundrobin"), BackendPolicy(), lambda: 0.0)


def recorder(mgr: AlertManager, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, str]]:
    events: list[tuple[str, str, str, str]] = []
    monkeypatch.setattr(mgr, "emit", lambda e: events.append((e.kind, e.subject, e.severity, e.cause)))
    return events


def test_watch_turns_state_changes_into_events(monkeypatch: pytest.MonkeyPatch) -> None:
    s1, s2 = srv("s1"), srv("s2")
    backend = pool("pacs", s1, s2)
    mgr = AlertManager(config(webhook="http://127.0.0.1:9/x"))
    events = recorder(mgr, monkeypatch)
    mgr.watch(backend)
    mgr.watch(backend)  # idempotent: one subscription

    s1.force_op_state(OpState.DOWN, 1.0, "connection refused")
    assert events == [("server_down", "pacs/s1", "warning", "connection refused")]
    events.clear()

    s2.set_admin_state(AdminState.MAINT, 2.0, "operator", "patching")
    assert events == [
        ("admin_state", "pacs/s2", "info", "operator: patching"),
        ("backend_down", "pacs", "critical", "operator: patching"),
    ]
    events.clear()

    s1.force_op_state(OpState.UP, 3.0, "HTTP 200")
    assert events == [("server_up", "pacs/s1", "info", "HTTP 200"), ("backend_up", "pacs", "info", "HTTP 200")]
    events.clear()

    s1.set_agent_pct(50)  # an agent may move this every few seconds: never alerted
    s1.set_weight(3, "operator")
    assert events == [("weight", "pacs/s1", "info", "operator")]
    events.clear()

    mgr.unwatch(backend)
    s1.force_op_state(OpState.DOWN, 4.0, "timeout")
    assert events == [] and backend.state_listeners == []


def test_watch_event_texts(monkeypatch: pytest.MonkeyPatch) -> None:
    s1 = srv("s1")
    backend = pool("pacs", s1)
    mgr = AlertManager(config(webhook="http://127.0.0.1:9/x"))
    texts: list[str] = []
    monkeypatch.setattr(mgr, "emit", lambda e: texts.append(e.text))
    mgr.watch(backend)
    s1.set_admin_state(AdminState.DRAIN, 1.0, "operator", "drain before patching")
    s1.force_op_state(OpState.DOWN, 2.0, "connection refused")
    assert texts == [
        "server pacs/s1 admin state READY -> DRAIN (operator: drain before patching)",
        "backend pacs has no usable server: pacs/s1 admin_state READY -> DRAIN (operator: drain before patching)",
        "server pacs/s1 is DOWN: connection refused",
    ]


def test_startup_is_not_a_change_but_dead_at_start_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    s1, s2 = srv("s1", OpState.DOWN), srv("s2", OpState.DOWN)  # as at startup: DOWN until checked
    dead = srv("d1", OpState.DOWN)
    pacs, archive = pool("pacs", s1, s2), pool("archive", dead)
    mgr = AlertManager(config(webhook="http://127.0.0.1:9/x"), clock=clock, startup_grace=30)
    events = recorder(mgr, monkeypatch)
    mgr.watch(pacs)
    mgr.watch(archive)

    s1.force_op_state(OpState.UP, 1.0, "HTTP 200")  # the first check: no "UP" page on every restart
    mgr.tick()
    assert events == []
    clock.now += 30
    mgr.tick()
    assert events == [
        ("server_down", "pacs/s2", "warning", "no check result yet"),
        ("server_down", "archive/d1", "warning", "no check result yet"),
        ("backend_down", "archive", "critical", "startup"),
    ]
    events.clear()
    mgr.tick()
    assert events == []  # reported once
    s1.force_op_state(OpState.DOWN, 2.0, "timeout")  # a real change after startup
    assert events == [("server_down", "pacs/s1", "warning", "timeout"), ("backend_down", "pacs", "critical", "timeout")]


def test_a_failing_alert_never_breaks_a_state_change(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s1 = srv("s1")
    backend = pool("pacs", s1)
    mgr = AlertManager(config(webhook="http://127.0.0.1:9/x"))

    def broken(event: AlertEvent) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(mgr, "emit", broken)
    mgr.watch(backend)
    s1.force_op_state(OpState.DOWN, 1.0, "timeout")
    assert s1.op_state is OpState.DOWN and "failed to handle pacs/s1" in caplog.text


# -- rendering --------------------------------------------------------------------------


def test_email_subject_is_one_bounded_line() -> None:
    cfg = EmailAlert.model_validate({"host": "smtp.test", "from": "a@b.test", "to": ["c@d.test"]})
    ev = AlertEvent(
        "server_down", "pacs/s1", "server pacs/s1 is DOWN: line one\nline two " + "x" * 300, "", 0.0, "warning"
    )
    msg = email_message(ev, cfg, "lb 1", 0.0)
    assert msg["Subject"].startswith("[medlb] WARNING: server pacs/s1 is DOWN: line one line two x")
    assert len(msg["Subject"]) == 200 and msg["Subject"].endswith("...")
    assert msg["Message-ID"].endswith("@lb-1>")
    assert webhook_payload(ev, "lb1")["at"] == "1970-01-01T00:00:00.000+00:00"
