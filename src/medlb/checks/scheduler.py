"""The per-server check loops: when to probe, which probe, and what the result means.

One :class:`ServerChecker` per server owns two loops that the supervisor runs
in its TaskGroup:

- :meth:`ServerChecker.run`, the health check: resolve the address, run the
  probe chosen by ``check.type``, feed the rise/fall counter of
  :mod:`medlb.model.health`, then sleep ``inter`` / ``fastinter`` /
  ``downinter`` (HAProxy's rule, see :func:`medlb.model.health.next_interval`)
  with +/- ``jitter`` so that checks of many servers do not march in step
  (Envoy's ``interval_jitter_percent``);
- :meth:`ServerChecker.run_agent`, the feedback agent (:mod:`medlb.checks.agent`),
  on its own interval, so a slow agent never delays a health check.

Passive observation joins the two worlds, after HAProxy's ``observe layer4``
with ``on-error fail-check``: every connect error on live traffic brings the
next check forward (:meth:`ServerChecker.wake`, at most one check per
``fastinter``), and ``error_limit`` consecutive errors count as one failed
check, so a server that refuses real sessions goes DOWN without waiting for a
full ``fall x inter``.

This module is in the I/O ring: it owns time, sleeps and sockets; the decisions
(counter, intervals, agent semantics) live in pure code it calls.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from medlb.checks.agent import apply_agent_reply, fetch_agent, parse_agent_reply
from medlb.checks.external import external_probe
from medlb.checks.probes import (
    ProbeResult,
    describe_error,
    dicom_echo_probe,
    format_duration,
    hl7_probe,
    http_probe,
    tcp_probe,
)
from medlb.config import ResolvedAgent, ResolvedCheck
from medlb.model.health import OpState, next_interval
from medlb.model.server import AdminState, CheckResult, Server

if TYPE_CHECKING:
    from medlb.io.tls import ClientTls

__all__ = ["ServerChecker", "numeric_sockaddr"]

log = logging.getLogger("medlb.checks")

#: How long a checker without checks (``type: none``) sleeps between looks.
_IDLE = 3600.0

SockAddr = tuple[int, tuple[str, int] | tuple[str, int, int, int]]


def numeric_sockaddr(host: str, port: int) -> SockAddr:
    """Socket address of an IP literal, without DNS (AI_NUMERICHOST never blocks)."""
    family, _, _, _, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)[0]
    return family, sockaddr  # type: ignore[return-value]


class ServerChecker:
    """Health check, passive observation and feedback agent of one server.

    ``clock`` stamps results and state changes (default: the running loop's
    ``time``); waits always use the loop's own clock. ``rng`` draws the jitter.
    """

    def __init__(
        self,
        server: Server,
        check: ResolvedCheck,
        agent: ResolvedAgent | None,
        check_timeout: float,
        *,
        vip: str = "",
        vport: int = 0,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.server = server
        self.check = check
        self.agent = agent
        self.check_timeout = check_timeout
        self.vip = vip
        self.vport = vport
        self.rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._wake = asyncio.Event()
        self._last_start = float("-inf")
        self._agent_ok: bool | None = None
        self._agent_unknown: tuple[str, ...] = ()
        #: Probes started by :meth:`run` (for status output and tests).
        self.checks_run = 0
        #: TLS towards the server (the backend's ``tls:``), used by ``dicom-echo`` checks.
        self.tls: ClientTls | None = None

    def __repr__(self) -> str:
        return f"<ServerChecker {self.server.key} {self.check.type}>"

    # -- time -----------------------------------------------------------------------

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    def interval(self) -> float:
        """The wait before the next check: HAProxy's interval rule, jittered."""
        base = next_interval(self.server.health, self.check.inter, self.check.fastinter, self.check.downinter)
        jitter = self.check.jitter
        if jitter > 0:
            base *= 1.0 + self.rng.uniform(-jitter, jitter)
        return max(base, 0.001)

    async def _sleep(self, delay: float) -> None:
        """Sleep ``delay`` seconds, or less when :meth:`wake` asks for an early check.

        An early check still waits until ``fastinter`` after the start of the
        previous one: a storm of connect errors costs at most one check per
        ``fastinter``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + delay
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return
            self._wake.clear()
            deadline = min(deadline, self._last_start + self.check.fastinter)

    def wake(self) -> None:
        """Bring the next check forward (rate limited to one per ``fastinter``)."""
        self._wake.set()

    # -- resolution -------------------------------------------------------------------

    async def _resolve(self) -> ProbeResult | None:
        """Refresh ``server.sockaddr``; a failed resolution is a failed check."""
        address = self.server.address
        if address.is_literal:
            if self.server.sockaddr is None:
                self.server.sockaddr = numeric_sockaddr(address.host, address.port)
            return None
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.check_timeout):
                infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        except TimeoutError:
            return ProbeResult(
                False, f"cannot resolve host {address.host}: timeout after {format_duration(self.check_timeout)}"
            )
        except (OSError, UnicodeError) as exc:
            text = exc.strerror if isinstance(exc, OSError) and exc.strerror else describe_error(exc)
            return ProbeResult(False, f"cannot resolve host {address.host}: {text}")
        if not infos:
            return ProbeResult(False, f"cannot resolve host {address.host}: no address")
        family, _, _, _, sockaddr = infos[0]
        self.server.sockaddr = (family, sockaddr)  # type: ignore[assignment]
        return None

    def _target_host(self) -> str:
        """The address to probe: the resolved IP when known, else the configured host."""
        if self.server.sockaddr is not None:
            return str(self.server.sockaddr[1][0])
        return self.server.address.host

    # -- the health check -------------------------------------------------------------

    async def _probe(self) -> ProbeResult:
        failed = await self._resolve()
        if failed is not None:
            return failed
        check = self.check
        host = self._target_host()
        port = check.port or self.server.address.port
        kind = check.type
        if kind == "tcp":
            return await tcp_probe(host, port, self.check_timeout)
        if kind in ("http", "https"):
            tls = kind == "https"
            host_header = check.host
            if host_header is None:
                # Virtual hosts answer to the configured name, not to the address.
                name = self.server.address.host
                name = f"[{name}]" if ":" in name else name
                host_header = name if port == (443 if tls else 80) else f"{name}:{port}"
            return await http_probe(
                host,
                port,
                tls=tls,
                method=check.method,
                path=check.path,
                host_header=host_header,
                expect_status=check.expect_status,
                expect_body=check.expect_body,
                timeout=self.check_timeout,
                tls_verify=check.tls_verify,
            )
        if kind == "dicom-echo":
            client_tls = self.tls
            return await dicom_echo_probe(
                host,
                port,
                calling_ae=check.calling_ae,
                called_ae=check.called_ae or "ANY-SCP",
                timeout=self.check_timeout,
                ssl_context=client_tls.context if client_tls is not None else None,
                server_hostname=(client_tls.sni or self.server.address.host) if client_tls is not None else None,
            )
        if kind == "hl7":
            hl7_tls = self.tls
            return await hl7_probe(
                host,
                port,
                message=check.hl7_message,
                timeout=self.check_timeout,
                ssl_context=hl7_tls.context if hl7_tls is not None else None,
                server_hostname=(hl7_tls.sni or self.server.address.host) if hl7_tls is not None else None,
            )
        if kind == "external":
            if not check.command:
                return ProbeResult(False, "external check without a command")
            server = self.server
            return await external_probe(
                check.command,
                vip=self.vip,
                vport=self.vport,
                server_host=host,
                server_port=port,
                env={
                    "PROXY_NAME": server.backend_name,
                    "SERVER_NAME": server.name,
                    "SERVER_CURCONN": str(server.cur_sessions),
                    "SERVER_MAXCONN": str(server.maxconn),
                },
                timeout=self.check_timeout,
            )
        return ProbeResult(False, f"unknown check type {kind!r}")

    async def check_once(self) -> CheckResult:
        """Run one check now and record it on the server."""
        loop = asyncio.get_running_loop()
        self._last_start = start = loop.time()
        self.checks_run += 1
        probe = await self._probe()
        previous = self.server.last_check
        result = CheckResult(probe.ok, probe.text, at=self._now(), duration=loop.time() - start)
        transition = self.server.record_check(result)
        if not probe.ok:
            # Log a failure when its reason is new (HAProxy's "Health check for server
            # ... failed, reason: ..."), so a server that never comes UP, say with a
            # missing check script, is explained once instead of silently or every 2s.
            if previous is None or previous.ok or previous.text != probe.text:
                health = self.server.health
                status = (
                    f"{health.failures}/{health.fall} failures while UP"
                    if health.state is OpState.UP
                    else "server is DOWN"
                )
                log.warning("server %s health check failed: %s (%s)", self.server.key, probe.text, status)
            else:
                log.debug("%s: check failed: %s", self.server.key, probe.text)
        if transition is not None:
            log.debug("%s: %s -> %s (%s)", self.server.key, transition.old.name, transition.new.name, probe.text)
        return result

    async def run(self) -> None:
        """Check forever (until cancelled). MAINT pauses checks; ``type: none`` marks UP once."""
        if self.check.type == "none":
            # HAProxy: a server without "check" is always considered UP.
            self.server.force_op_state(OpState.UP, self._now(), "no health check configured")
            while True:
                await self._sleep(_IDLE)
        while True:
            if not self.server.checks_enabled:
                await self._sleep(self.check.inter)
                continue
            await self.check_once()
            await self._sleep(self.interval())

    # -- passive observation ------------------------------------------------------------

    def report_connect_error(self) -> None:
        """A live session failed to connect to this server (HAProxy ``observe layer4``)."""
        server = self.server
        server.consecutive_errors += 1
        if self.check.type == "none" or not server.checks_enabled:
            # Without checks nothing could bring the server back: count, never fail it.
            return
        if server.consecutive_errors >= self.check.error_limit:
            count, server.consecutive_errors = server.consecutive_errors, 0
            text = f"{count} consecutive connection errors on live traffic"
            server.record_check(CheckResult(False, text, at=self._now(), duration=0.0))
        self.wake()

    def report_connect_ok(self) -> None:
        """A live session connected: the error run is over."""
        self.server.consecutive_errors = 0

    # -- feedback agent -----------------------------------------------------------------

    def _agent_paused(self) -> bool:
        """An operator's MAINT pauses the agent; the agent's own MAINT does not (it may lift it)."""
        server = self.server
        return server.admin_state is AdminState.MAINT and server.admin_source != "agent"

    async def agent_once(self) -> bool:
        """Ask the agent once and apply its reply; False when it could not be reached."""
        agent = self.agent
        if agent is None or agent.port is None:
            return False
        host = agent.address or self._target_host()
        try:
            line = await fetch_agent(host, agent.port, agent.send, self.check_timeout)
        except Exception as exc:
            text = "timeout" if isinstance(exc, TimeoutError) else describe_error(exc)
            self.server.last_agent = f"unreachable: {text}"
            if self._agent_ok is not False:
                log.warning("%s: agent %s:%s unreachable: %s", self.server.key, host, agent.port, text)
            else:
                log.debug("%s: agent %s:%s still unreachable: %s", self.server.key, host, agent.port, text)
            self._agent_ok = False
            return False
        if self._agent_ok is False:
            log.warning("%s: agent %s:%s reachable again", self.server.key, host, agent.port)
        self._agent_ok = True
        self.server.last_agent = line
        reply = parse_agent_reply(line)
        if reply.unknown and reply.unknown != self._agent_unknown:
            log.warning("%s: agent reply %r: ignored words %s", self.server.key, line, " ".join(reply.unknown))
        self._agent_unknown = reply.unknown
        apply_agent_reply(self.server, reply, self._now())
        return True

    async def run_agent(self) -> None:
        """Poll the feedback agent every ``agent.inter`` (returns at once when there is none)."""
        agent = self.agent
        if agent is None or not agent.enabled:
            return
        if agent.port is None:
            log.warning("%s: agent enabled without a port; agent disabled", self.server.key)
            return
        while True:
            if not self._agent_paused():
                await self.agent_once()
            await asyncio.sleep(agent.inter)
