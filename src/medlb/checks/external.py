"""The external check: run an operator's script and turn its exit status into a verdict.

This is the one check that costs a process, so it is for what medlb cannot
probe itself (a site-specific C-FIND, a database query behind a RIS).

Contract (shared with HAProxy's ``external-check command`` and the
Loadbalancer.org appliance, so existing scripts keep working)::

    <command> <proxy_addr> <proxy_port> <server_addr> <server_port>

- ``command`` is a path executed directly, never through a shell; a bare name
  is looked up in ``PATH``. A missing or non-executable script is a failed
  check ("check script not found: ..."), not an exception.
- As in HAProxy, when the proxy address is unknown (a backend without a
  frontend) both proxy arguments are the string ``NOT_USED``.
- The environment is *only* ``PATH`` plus HAProxy's variables
  (``HAPROXY_PROXY_ADDR``, ``HAPROXY_PROXY_PORT``, ``HAPROXY_PROXY_NAME``,
  ``HAPROXY_SERVER_ADDR``, ``HAPROXY_SERVER_PORT``, ``HAPROXY_SERVER_NAME``,
  ``HAPROXY_SERVER_CURCONN``, ``HAPROXY_SERVER_MAXCONN``), each also exported
  with a ``MEDLB_`` prefix. Nothing else of medlb's environment leaks to it.
- Exit status 0 means healthy; anything else, a signal or the timeout means
  failed. The result text carries the exit code and the first output line.

Robustness, because a script is code we do not control:

- it runs in its own session (``start_new_session``), so on timeout the whole
  process group -- the script *and* anything it started -- is killed with
  SIGKILL; the exit status is always collected, so no zombie remains;
- stdout and stderr share one pipe that is always drained: the first 4 KiB are
  kept for the text and the rest is discarded, so a chatty script can never
  block on a full pipe;
- if the script exits but something it left behind still holds the pipe open,
  that leftover group is killed after a short grace instead of stalling the
  check until its timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping
from typing import cast

from medlb.checks.probes import ProbeResult, describe_error, format_duration

__all__ = ["ENV_NAMES", "OUTPUT_LIMIT", "build_check_env", "external_probe"]

log = logging.getLogger("medlb.checks")

#: Bytes of output kept for the result text; the rest is read and dropped.
OUTPUT_LIMIT = 4 * 1024

#: The variables every check script receives, without their prefix.
ENV_NAMES = (
    "PROXY_ADDR",
    "PROXY_PORT",
    "PROXY_NAME",
    "SERVER_ADDR",
    "SERVER_PORT",
    "SERVER_NAME",
    "SERVER_CURCONN",
    "SERVER_MAXCONN",
)
_PREFIXES = ("HAPROXY_", "MEDLB_")

#: After the script exits, how long its last output may take to reach us.
_EOF_GRACE = 0.2
#: Bound on collecting the exit status of a SIGKILLed process (it cannot ignore it).
_REAP_TIMEOUT = 5.0
_NOT_USED = "NOT_USED"


def build_check_env(
    *, vip: str, vport: int | None, server_host: str, server_port: int, env: Mapping[str, str]
) -> dict[str, str]:
    """The complete environment of a check script.

    ``env`` supplies the values the caller knows (``PROXY_NAME``, ``SERVER_NAME``,
    ``SERVER_CURCONN``, ``SERVER_MAXCONN``, ...), by bare name or with either
    prefix; each is exported under both prefixes. ``PATH`` in ``env`` replaces
    medlb's own ``PATH``. The four address arguments always win over ``env``.
    """
    values = {name: "" for name in ENV_NAMES}
    values.update(SERVER_CURCONN="0", SERVER_MAXCONN="0")
    path = os.environ.get("PATH", os.defpath)
    for key, value in env.items():
        if key == "PATH":
            path = value
            continue
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        values[key] = str(value)
    proxy_addr, proxy_port = _proxy_args(vip, vport)
    values.update(PROXY_ADDR=proxy_addr, PROXY_PORT=proxy_port, SERVER_ADDR=server_host, SERVER_PORT=str(server_port))
    out = {"PATH": path}
    for prefix in _PREFIXES:
        out.update({prefix + name: value for name, value in values.items()})
    return out


def _proxy_args(vip: str, vport: int | None) -> tuple[str, str]:
    if not vip or not vport:
        return _NOT_USED, _NOT_USED
    return vip, str(vport)


def _find_script(command: str, search_path: str) -> tuple[str | None, str]:
    """(executable path or None, reason when None)."""
    if os.sep in command:
        if not os.path.isfile(command):
            return None, f"check script not found: {command}"
        if not os.access(command, os.X_OK):
            return None, f"check script not found: {command} (not executable)"
        return command, ""
    found = shutil.which(command, path=search_path)
    if found is None:
        return None, f"check script not found: {command} (not in PATH)"
    return found, ""


class _ScriptProtocol(asyncio.SubprocessProtocol):
    """Keeps the first bytes of output, drops the rest, and signals exit and EOF."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.output = bytearray()
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        #: Known as soon as the process exists, even if the caller is cancelled before
        #: ``subprocess_exec`` returns it: the process must be reaped in every case.
        self.transport: asyncio.SubprocessTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        room = OUTPUT_LIMIT - len(self.output)
        if room > 0:
            self.output += data[:room]

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _first_line(output: bytes) -> str:
    for line in output.decode("utf-8", "replace").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


async def _reap(transport: asyncio.SubprocessTransport, proto: _ScriptProtocol) -> None:
    """Kill what is left of the script's process group and collect its exit status."""
    if not proto.closed.done():
        # The script still runs, or something it started still holds our pipe.
        # start_new_session made the script a group leader: pgid == pid.
        pid = transport.get_pid()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    if not proto.exited.done():
        # Wait for the exit *before* closing the transport: close() would poll and
        # reap the child itself, racing the loop's child watcher.
        await asyncio.wait({proto.exited}, timeout=_REAP_TIMEOUT)
    transport.close()


async def external_probe(
    command: str,
    *,
    vip: str,
    vport: int | None,
    server_host: str,
    server_port: int,
    env: Mapping[str, str],
    timeout: float,  # noqa: ASYNC109 - the deadline is part of the verdict
) -> ProbeResult:
    """Run ``command vip vport server_host server_port``; OK when it exits 0 in time."""
    full_env = build_check_env(vip=vip, vport=vport, server_host=server_host, server_port=server_port, env=env)
    script, reason = _find_script(command, full_env["PATH"])
    if script is None:
        return ProbeResult(False, reason)
    proxy_addr, proxy_port = _proxy_args(vip, vport)
    loop = asyncio.get_running_loop()
    proto = _ScriptProtocol(loop)
    transport: asyncio.SubprocessTransport | None = None
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout):
                spawn = loop.create_task(
                    loop.subprocess_exec(
                        lambda: proto,
                        script,
                        proxy_addr,
                        proxy_port,
                        server_host,
                        str(server_port),
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT,
                        env=full_env,
                        start_new_session=True,
                    )
                )
                try:
                    transport, _ = await asyncio.shield(spawn)
                except asyncio.CancelledError:
                    # Cancelled (a timeout, a stopping checker) while the script was being started:
                    # let the start finish so the script can be killed and reaped below, rather than
                    # leave a running process and an open transport behind.
                    with contextlib.suppress(Exception):
                        transport, _ = await spawn
                    raise
                # asyncio.wait never cancels what it waits on: the futures stay usable.
                await asyncio.wait({proto.exited})
                # Output written just before exit may still be in flight.
                await asyncio.wait({proto.closed}, timeout=_EOF_GRACE)
        except TimeoutError:
            timed_out = True
        finally:
            # A cancellation (a stopping checker) can land while subprocess_exec is still
            # returning: the protocol already holds the transport of the running script.
            started = transport or proto.transport
            if started is not None:
                await _reap(started, proto)
    except (FileNotFoundError, PermissionError, NotADirectoryError):
        return ProbeResult(False, f"check script not found: {command}")
    except Exception as exc:
        return ProbeResult(False, f"cannot run check script: {describe_error(exc)}")

    line = _first_line(bytes(proto.output))
    if timed_out or transport is None:
        text = f"timeout after {format_duration(timeout)}, killed"
        log.debug("external check %s %s:%s: %s", command, server_host, server_port, text)
        return ProbeResult(False, f"{text}: {line}" if line else text)
    code = transport.get_returncode()
    if code is None:
        text = "exit status unknown"
    elif code < 0:
        text = f"killed by signal {-code}"
    else:
        text = f"exit {code}"
    return ProbeResult(code == 0, f"{text}: {line}" if line else text)
