"""Tell people when servers and backends change state: webhook and email alerts.

An operator of a PACS front end wants to hear about a DOWN server before the
radiologists do, but must not get two hundred mails from one flapping node.
This module turns server and backend state changes into :class:`AlertEvent`
objects, rate-limits them per subject, and delivers them over a JSON webhook
and/or SMTP.

Theory of operation:

- **Sources.** :meth:`AlertManager.watch` subscribes to a backend's
  ``state_listeners``. Each ``(server, what, cause)`` callback becomes a
  ``server_down`` / ``server_up`` / ``admin_state`` / ``weight`` event; agent
  weight changes are not alerted (an agent may move them every few seconds).
  After each change the manager looks at ``backend.usable()`` and emits
  ``backend_down`` / ``backend_up`` when the backend loses or regains its last
  usable server. The supervisor may also call :meth:`AlertManager.emit`
  directly.
- **Startup is not a change.** Servers start DOWN until their first check, so
  every restart would otherwise page someone with one "UP" per server. The
  first UP of a server that was never up (and the first time a backend
  becomes usable) is silent. Instead, a server or backend that is still not up
  ``startup_grace`` seconds after :meth:`~AlertManager.watch` is reported
  DOWN, so a node that is dead at start is not silent either.
- **Rate limit.** Per subject (``backend/server`` or ``backend``), at most
  ``burst`` alerts leave per sliding ``window``. A backend is its own subject,
  so a flapping server can never suppress the critical ``backend_down``.
  Suppressed events are counted; the next alert for that subject carries the
  count. When the window reopens and events were suppressed, the *latest*
  suppressed event is sent (with the count), so the last thing an operator
  reads about a flapping server is its current state, never a stale one.
- **Delivery.** Each channel (``webhook``, ``email``) has its own bounded
  queue and worker coroutine, so a dead SMTP server never delays a webhook.
  A failed delivery is retried a bounded number of times with exponential
  backoff when the failure looks transient, then counted and logged on
  ``medlb.alerts``. Nothing here ever raises into the supervisor's TaskGroup:
  an alerting fault must not take the load balancer down.
- **Secrets.** Header values, SMTP passwords and webhook URL paths (Slack and
  Teams put tokens there) never appear in logs or exceptions: logs name the
  webhook by scheme, host and port only.

This module is in the I/O ring (asyncio, sockets, threads, time).
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import json
import logging
import os
import re
import smtplib
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from medlb.config import AlertsConfig, EmailAlert, WebhookAlert
from medlb.errors import StartupError
from medlb.model.backend import Backend
from medlb.model.server import AdminState, Server

__all__ = [
    "CHANNELS",
    "KINDS",
    "AlertEvent",
    "AlertManager",
    "email_message",
    "webhook_payload",
]

log = logging.getLogger("medlb.alerts")

#: Every event kind, with its severity when produced by :meth:`AlertManager.watch`.
KINDS = {
    "server_down": "warning",
    "server_up": "info",
    "backend_down": "critical",
    "backend_up": "info",
    "admin_state": "info",
    "weight": "info",
}

#: Delivery channels, in the order their counters are reported.
CHANNELS = ("webhook", "email")

#: ``what`` strings of :class:`~medlb.model.server.Server` that are alerted;
#: ``agent weight ...`` deliberately does not match.
_WHAT_RE = re.compile(r"^(op_state|admin_state|weight) (\S+) -> (\S+)$")

#: Webhook statuses worth retrying; any other non-2xx will not fix itself.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})

#: Longest e-mail subject; mail clients cut long ones anyway, and some relays
#: reject headers far beyond RFC 5322's 78-character recommendation.
_SUBJECT_MAX = 200

#: Log a full queue on the first drop and then once per this many drops.
_DROP_LOG_EVERY = 100


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One thing an operator should hear about.

    ``suppressed`` is filled in by the rate limiter: how many alerts for the
    same subject were held back since the last one that went out.
    """

    kind: str
    subject: str
    text: str
    cause: str
    at: float
    severity: str
    suppressed: int = 0


# --------------------------------------------------------------------------- rendering


def _iso(at: float) -> str:
    return datetime.datetime.fromtimestamp(at, datetime.UTC).isoformat(timespec="milliseconds")


def webhook_payload(event: AlertEvent, node: str) -> dict[str, Any]:
    """The JSON document POSTed for ``event``; a stable contract for receivers."""
    return {
        "source": "medlb",
        "node": node,
        "kind": event.kind,
        "severity": event.severity,
        "subject": event.subject,
        "text": event.text,
        "cause": event.cause,
        "at": _iso(event.at),
        "at_unix": event.at,
        "suppressed": event.suppressed,
    }


def _one_line(text: str) -> str:
    """Collapse whitespace: a check's output may hold newlines, a mail header may not."""
    return " ".join(text.split())


def email_message(event: AlertEvent, config: EmailAlert, node: str, now: float) -> EmailMessage:
    """The mail for ``event``: the sentence in the subject, every field in the body."""
    subject = _one_line(f"{config.subject_prefix} {event.severity.upper()}: {event.text}")
    if len(subject) > _SUBJECT_MAX:
        subject = subject[: _SUBJECT_MAX - 3] + "..."
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = config.from_
    msg["To"] = ", ".join(config.to)
    msg["Date"] = formatdate(now, usegmt=True)
    # make_msgid() without a domain calls getfqdn(), a DNS lookup that can hang.
    msg["Message-ID"] = make_msgid("medlb", domain=_ehlo_name(node))
    msg["X-Medlb-Kind"] = event.kind
    msg["X-Medlb-Severity"] = event.severity
    rows = [
        ("kind", event.kind),
        ("severity", event.severity),
        ("subject", event.subject),
        ("cause", event.cause or "-"),
        ("at", f"{_iso(event.at)} (unix {event.at:.3f})"),
        ("node", node),
        ("suppressed", str(event.suppressed)),
    ]
    body = "\n".join(f"{name + ':':<12}{value}" for name, value in rows)
    msg.set_content(f"{event.text}\n\n{body}\n\n-- \nmedlb on {node}\n")
    return msg


def _ehlo_name(node: str) -> str:
    """A name fit for EHLO and Message-ID: the node name, or ``localhost``."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]", "-", node).strip(".-")
    return cleaned or "localhost"


def _webhook_target(url: str) -> str:
    """Scheme, host and port of a webhook URL: what logs may show of it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


# --------------------------------------------------------------------------- channels


def _client_tls_context(verify: bool) -> ssl.SSLContext:
    """TLS 1.2+ client context; ``verify=False`` is for self-signed lab relays only."""
    ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _read_password(config: EmailAlert) -> str | None:
    """Load the SMTP password once, so a missing secret fails at start, not at 3 a.m.

    The error names where the password was expected, never the password.
    """
    if config.password_file:
        try:
            password = Path(config.password_file).read_text(encoding="utf-8").strip()
        except UnicodeDecodeError:
            raise StartupError(f"alerts.email.password_file: {config.password_file} is not UTF-8 text") from None
        except OSError as exc:
            raise StartupError(
                f"alerts.email.password_file: cannot read {config.password_file}: {exc.strerror or exc}"
            ) from None
        if not password:
            raise StartupError(f"alerts.email.password_file: {config.password_file} is empty")
        return password
    if config.password_env:
        password = os.environ.get(config.password_env, "").strip()
        if not password:
            raise StartupError(f"alerts.email.password_env: environment variable {config.password_env} is not set")
        return password
    if config.username:
        raise StartupError("alerts.email.username is set but neither password_file nor password_env is")
    return None


@dataclass(frozen=True, slots=True)
class _EmailTarget:
    """An email channel ready to send: its config, its password, its TLS context."""

    config: EmailAlert
    password: str | None = field(repr=False)
    tls: ssl.SSLContext | None = field(repr=False)


def _send_mail(target: _EmailTarget, msg: EmailMessage, local_hostname: str) -> None:
    """Blocking SMTP delivery; runs in a worker thread (smtplib has no async API)."""
    cfg = target.config
    smtp: smtplib.SMTP
    if cfg.security == "tls":
        smtp = smtplib.SMTP_SSL(cfg.host, cfg.port, local_hostname, timeout=cfg.timeout, context=target.tls)
    else:
        smtp = smtplib.SMTP(cfg.host, cfg.port, local_hostname, timeout=cfg.timeout)
    with smtp:
        if cfg.security == "starttls":
            # Raises SMTPNotSupportedError if the relay does not offer STARTTLS:
            # never fall back to sending credentials and patient-adjacent text in clear.
            smtp.starttls(context=target.tls)
        if cfg.username and target.password is not None:
            smtp.login(cfg.username, target.password)
        smtp.send_message(msg, from_addr=cfg.from_, to_addrs=list(cfg.to))


def _smtp_transient(exc: BaseException) -> bool:
    """Worth retrying: the network or a 4xx reply; not a 5xx, an auth or a TLS failure."""
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        return True
    if isinstance(exc, smtplib.SMTPResponseException):
        return 400 <= exc.smtp_code < 500
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        return all(400 <= code < 500 for code, _ in exc.recipients.values())
    if isinstance(exc, smtplib.SMTPException | ssl.SSLError):
        return False
    return isinstance(exc, OSError)


class _Failure(Exception):
    """A delivery failed; ``transient`` says whether another attempt may help."""

    def __init__(self, reason: str, *, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(slots=True)
class _Channel:
    """One delivery channel's queue and wake-up signal."""

    name: str
    queue: collections.deque[AlertEvent] = field(default_factory=collections.deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)


# --------------------------------------------------------------------------- rate limit


@dataclass(slots=True)
class _Bucket:
    """Sliding-window state of one subject."""

    sent: collections.deque[float] = field(default_factory=collections.deque)
    suppressed: int = 0
    latest: AlertEvent | None = None


@dataclass(slots=True)
class _Watch:
    """What :meth:`AlertManager.watch` remembers about one backend.

    ``usable`` is None while the backend has not been usable since it was
    watched (startup). ``known`` are the servers already looked at;
    ``pending`` the never-UP ones among them, with when they were first seen.
    """

    callback: Callable[[Server, str, str], None]
    since: float
    usable: bool | None
    known: set[Server] = field(default_factory=set)
    pending: dict[Server, float] = field(default_factory=dict)

    def discover(self, servers: list[Server], now: float) -> None:
        """Track servers added since the last look (a reload or the API adds them)."""
        for server in servers:
            if server not in self.known:
                self.known.add(server)
                if not server.ever_up:
                    self.pending[server] = now


# --------------------------------------------------------------------------- manager


class AlertManager:
    """Turns state changes into rate-limited webhook and email alerts.

    ``clock`` (unix time) stamps events and drives the rate limit and the
    startup grace; waits use the event loop. ``retries`` extra attempts with
    ``backoff * 2**n`` seconds between them are made for transient failures;
    ``tick`` is how often suppressed alerts and the startup grace are looked at.

    Counters for metrics: ``sent_total`` and ``failed_total`` per channel,
    ``suppressed_total`` (rate limit) and ``dropped_total`` (queue overflow or
    channel removed by a reload before delivery).
    """

    def __init__(
        self,
        config: AlertsConfig | None,
        *,
        node: str | None = None,
        clock: Callable[[], float] = time.time,
        queue_size: int = 1000,
        retries: int = 2,
        backoff: float = 0.5,
        startup_grace: float = 60.0,
        tick: float = 1.0,
    ) -> None:
        self.node = node if node is not None else socket.gethostname()
        self._clock = clock
        self._queue_size = max(queue_size, 1)
        self._retries = max(retries, 0)
        self._backoff = backoff
        self._startup_grace = startup_grace
        self._tick = tick
        self._config: AlertsConfig | None = None
        self._email: _EmailTarget | None = None
        self._webhook_tls: ssl.SSLContext | None = None
        self._channels = {name: _Channel(name) for name in CHANNELS}
        self._buckets: dict[str, _Bucket] = {}
        self._watches: dict[Backend, _Watch] = {}
        self.sent_total = dict.fromkeys(CHANNELS, 0)
        self.failed_total = dict.fromkeys(CHANNELS, 0)
        self.suppressed_total = 0
        self.dropped_total = 0
        self.reconfigure(config)

    # -- configuration ------------------------------------------------------------------

    @property
    def config(self) -> AlertsConfig | None:
        return self._config

    def reconfigure(self, config: AlertsConfig | None) -> None:
        """Apply a reloaded config; rate-limit state and counters survive.

        Raises :class:`StartupError` (and changes nothing) when the SMTP
        password cannot be loaded. Alerts queued for a channel that the new
        config removes are dropped.
        """
        email: _EmailTarget | None = None
        if config is not None and config.email is not None:
            cfg = config.email
            tls = _client_tls_context(cfg.tls_verify) if cfg.security != "none" else None
            email = _EmailTarget(cfg, _read_password(cfg), tls)
        webhook_tls = None
        if config is not None and config.webhook is not None and config.webhook.url.startswith("https:"):
            webhook_tls = _client_tls_context(True)
        self._config = config
        self._email = email
        self._webhook_tls = webhook_tls
        for name in CHANNELS:
            channel = self._channels[name]
            if not self._active(name) and channel.queue:
                self.dropped_total += len(channel.queue)
                log.warning("alerts: %s removed from the config, %d queued alert(s) dropped", name, len(channel.queue))
                channel.queue.clear()

    def _active(self, name: str) -> bool:
        config = self._config
        if config is None:
            return False
        return (config.webhook if name == "webhook" else config.email) is not None

    def stats(self) -> dict[str, object]:
        """The delivery counters in the shape :class:`medlb.admin.metrics.AlertCollector` reads."""
        return {
            "sent": dict(self.sent_total),
            "failed": dict(self.failed_total),
            "suppressed": self.suppressed_total,
            "dropped": self.dropped_total,
            "queued": self.queued(),
        }

    def queued(self) -> dict[str, int]:
        """Alerts waiting per channel (for metrics and status output)."""
        return {name: len(channel.queue) for name, channel in self._channels.items()}

    # -- sources ------------------------------------------------------------------------

    def watch(self, backend: Backend) -> None:
        """Alert on the state changes of ``backend`` and its servers (idempotent)."""
        if backend in self._watches:
            return

        def on_change(server: Server, what: str, cause: str) -> None:
            # Called inside health checks and admin commands: an alerting bug
            # must never break those, so nothing escapes.
            try:
                self._on_change(backend, server, what, cause)
            except Exception:
                log.exception("alerts: failed to handle %s %s", server.key, what)

        now = self._clock()
        watch = _Watch(on_change, now, True if backend.usable() else None)
        watch.discover(backend.servers, now)
        self._watches[backend] = watch
        backend.state_listeners.append(on_change)

    def unwatch(self, backend: Backend) -> None:
        """Stop alerting on ``backend`` (a reload removed or replaced it)."""
        watch = self._watches.pop(backend, None)
        if watch is not None and watch.callback in backend.state_listeners:
            backend.state_listeners.remove(watch.callback)

    def _on_change(self, backend: Backend, server: Server, what: str, cause: str) -> None:
        watch = self._watches.get(backend)
        if watch is None:
            return
        now = self._clock()
        match = _WHAT_RE.match(what)
        if match is not None:
            axis, old, new = match.groups()
            key = server.key
            tail = f": {cause}" if cause else ""
            # A server added since the last tick is as new as one at startup.
            first_look = server not in watch.known
            watch.known.add(server)
            if axis == "op_state" and new == "UP":
                if watch.pending.pop(server, None) is None and not first_look:
                    self.emit(AlertEvent("server_up", key, f"server {key} is UP{tail}", cause, now, "info"))
            elif axis == "op_state":
                watch.pending.pop(server, None)
                self.emit(AlertEvent("server_down", key, f"server {key} is {new}{tail}", cause, now, "warning"))
            elif axis == "admin_state":
                text = f"server {key} admin state {old} -> {new} ({cause or 'unknown source'})"
                self.emit(AlertEvent("admin_state", key, text, cause, now, "info"))
            else:
                text = f"server {key} weight {old} -> {new} ({cause or 'unknown source'})"
                self.emit(AlertEvent("weight", key, text, cause, now, "info"))
        usable = bool(backend.usable())
        if usable == bool(watch.usable):
            return
        previous, watch.usable = watch.usable, usable
        if previous is None:
            return  # first time usable since watch(): startup, not recovery
        why = f"{server.key} {what}" + (f" ({cause})" if cause else "")
        if usable:
            text = f"backend {backend.name} is usable again: {why}"
            self.emit(AlertEvent("backend_up", backend.name, text, cause, now, "info"))
        else:
            text = f"backend {backend.name} has no usable server: {why}"
            self.emit(AlertEvent("backend_down", backend.name, text, cause, now, "critical"))

    def _check_startup(self, now: float) -> None:
        """Report what is still not up ``startup_grace`` after watch(): dead at start."""
        grace = self._startup_grace
        for backend, watch in list(self._watches.items()):
            watch.discover(backend.servers, now)
            if len(watch.known) > len(backend.servers):
                watch.known.intersection_update(backend.servers)  # forget retired servers
            for server, seen in list(watch.pending.items()):
                if server.ever_up or server not in backend.servers:
                    del watch.pending[server]
                elif now - seen >= grace:
                    del watch.pending[server]
                    if server.admin_state is AdminState.MAINT:
                        continue  # nobody expects a server in maintenance to come up
                    last = server.last_check.text if server.last_check is not None else "no check result yet"
                    text = f"server {server.key} has not come UP since startup: {last}"
                    self.emit(AlertEvent("server_down", server.key, text, last, now, "warning"))
            if watch.usable is None and now - watch.since >= grace:
                watch.usable = bool(backend.usable())
                if not watch.usable:
                    text = f"backend {backend.name} has had no usable server since startup"
                    self.emit(AlertEvent("backend_down", backend.name, text, "startup", now, "critical"))

    # -- rate limit and queueing --------------------------------------------------------

    def emit(self, event: AlertEvent) -> None:
        """Queue ``event`` for every configured channel, unless rate-limited.

        Non-blocking; call it from the event loop's thread.
        """
        if not any(self._active(name) for name in CHANNELS):
            return
        config = self._config
        assert config is not None
        now = self._clock()
        bucket = self._buckets.get(event.subject)
        if bucket is None:
            bucket = self._buckets[event.subject] = _Bucket()
        self._expire(bucket, now, config.rate_limit.window)
        if len(bucket.sent) >= config.rate_limit.burst:
            bucket.suppressed += 1
            bucket.latest = event
            self.suppressed_total += 1
            log.debug("alerts: rate limit holds back %s %s", event.kind, event.subject)
            return
        if bucket.suppressed:
            event = replace(
                event,
                text=f"{event.text} ({bucket.suppressed} similar alerts suppressed)",
                suppressed=bucket.suppressed,
            )
        self._release(bucket, event, now)

    @staticmethod
    def _expire(bucket: _Bucket, now: float, window: float) -> None:
        while bucket.sent and bucket.sent[0] <= now - window:
            bucket.sent.popleft()

    def _release(self, bucket: _Bucket, event: AlertEvent, now: float) -> None:
        bucket.sent.append(now)
        bucket.suppressed = 0
        bucket.latest = None
        self._enqueue(event)

    def _flush_suppressed(self, now: float) -> None:
        """Send the latest held-back alert of each subject whose window reopened."""
        config = self._config
        if config is None:
            return
        window = config.rate_limit.window
        for subject, bucket in list(self._buckets.items()):
            self._expire(bucket, now, window)
            latest = bucket.latest
            if latest is not None and len(bucket.sent) < config.rate_limit.burst:
                count = bucket.suppressed
                text = f"{latest.text} (latest of {count} suppressed alerts)"
                self._release(bucket, replace(latest, text=text, suppressed=count), now)
            elif not bucket.sent and not bucket.suppressed:
                del self._buckets[subject]  # keep the table as small as the active subjects

    def _enqueue(self, event: AlertEvent) -> None:
        for name, channel in self._channels.items():
            if not self._active(name):
                continue
            if len(channel.queue) >= self._queue_size:
                channel.queue.popleft()
                self.dropped_total += 1
                if self.dropped_total % _DROP_LOG_EVERY == 1:
                    log.warning("alerts: %s queue full (%d), oldest alert dropped", name, self._queue_size)
            channel.queue.append(event)
            channel.wake.set()

    def tick(self) -> None:
        """Periodic housekeeping: flush held-back alerts, judge the startup grace."""
        now = self._clock()
        self._flush_suppressed(now)
        self._check_startup(now)

    # -- delivery -----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver alerts until cancelled; one worker per channel, plus housekeeping."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._webhook_worker(), name="alerts-webhook")
            tg.create_task(self._worker(self._channels["email"], self._send_email), name="alerts-email")
            tg.create_task(self._housekeeping(), name="alerts-housekeeping")

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                self.tick()
            except Exception:
                log.exception("alerts: housekeeping failed")

    async def _webhook_worker(self) -> None:
        # One session for the worker's life: pooled connections to the receiver.
        async with aiohttp.ClientSession() as session:

            async def send(event: AlertEvent) -> None:
                await self._send_webhook(session, event)

            await self._worker(self._channels["webhook"], send)

    async def _worker(self, channel: _Channel, send: Callable[[AlertEvent], Awaitable[None]]) -> None:
        while True:
            while not channel.queue:
                channel.wake.clear()
                await channel.wake.wait()
            event = channel.queue.popleft()
            try:
                await self._deliver(channel.name, event, send)
            except Exception:
                # A bug, not a delivery failure: count it, log it, keep the worker alive.
                self.failed_total[channel.name] += 1
                log.exception("alerts: %s delivery of %s %s crashed", channel.name, event.kind, event.subject)

    async def _deliver(self, name: str, event: AlertEvent, send: Callable[[AlertEvent], Awaitable[None]]) -> None:
        attempt = 0
        while True:
            if not self._active(name):
                self.dropped_total += 1
                return
            try:
                await send(event)
            except _Failure as failure:
                if failure.transient and attempt < self._retries:
                    delay = self._backoff * 2**attempt
                    attempt += 1
                    log.info("alerts: %s failed (%s), retry %d in %.1fs", name, failure.reason, attempt, delay)
                    await asyncio.sleep(delay)
                    continue
                self.failed_total[name] += 1
                log.error(
                    "alerts: %s alert %s %s not delivered after %d attempt(s): %s",
                    name,
                    event.kind,
                    event.subject,
                    attempt + 1,
                    failure.reason,
                )
                return
            self.sent_total[name] += 1
            log.info("alerts: %s sent %s %s", name, event.kind, event.subject)
            return

    async def _send_webhook(self, session: aiohttp.ClientSession, event: AlertEvent) -> None:
        config = self._config
        if config is None or config.webhook is None:
            return
        hook: WebhookAlert = config.webhook
        target = _webhook_target(hook.url)
        body = json.dumps(webhook_payload(event, self.node)).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "medlb-alerts", **hook.headers}
        # ssl=False still encrypts an https URL, it only skips verification.
        ssl_arg: ssl.SSLContext | bool = False
        if hook.tls_verify:
            ssl_arg = self._webhook_tls if self._webhook_tls is not None else True
        try:
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                ssl=ssl_arg,
                timeout=aiohttp.ClientTimeout(total=hook.timeout),
                allow_redirects=False,  # a redirect would re-send the headers to another host
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return
                raise _Failure(f"{target} answered HTTP {status}", transient=status in _RETRY_STATUS)
        except TimeoutError:
            raise _Failure(f"{target} timed out after {hook.timeout:g}s", transient=True) from None
        except aiohttp.ClientError as exc:
            # aiohttp's messages may quote the URL; its path can be a secret token.
            reason = str(exc).replace(hook.url, target) or type(exc).__name__
            transient = not isinstance(exc, aiohttp.ClientSSLError | aiohttp.InvalidURL)
            raise _Failure(f"{target}: {reason}", transient=transient) from None

    async def _send_email(self, event: AlertEvent) -> None:
        target = self._email
        if target is None:
            return
        cfg = target.config
        msg = email_message(event, cfg, self.node, self._clock())
        try:
            # smtplib blocks; its own socket timeout bounds the thread.
            await asyncio.to_thread(_send_mail, target, msg, _ehlo_name(self.node))
        except Exception as exc:
            reason = f"smtp {cfg.host}:{cfg.port}: {type(exc).__name__}: {exc}"
            raise _Failure(reason, transient=_smtp_transient(exc)) from None
