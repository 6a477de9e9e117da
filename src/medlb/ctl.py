"""``medlb ctl``: the admin API for scripts and people.

It finds the API the way an operator expects: ``--url`` / ``MEDLB_URL`` if
given, else the ``admin.bind`` of the config file (``-c``, default
``/etc/medlb/medlb.yaml``); the token from ``--token-file``, ``MEDLB_TOKEN``,
or the config's own ``token_file``/``token_env``. The token is never taken
as a plain argument: it would show in ``ps`` and in shell history.

Exit codes a script can rely on (also in docs/operations.md):

====  =====================================================================
0     done
1     the API could not be reached, or answered with a server error (500)
2     usage error (bad arguments, unreadable config, a value the API refused with 400)
3     not found (no such backend or server)
4     refused (409: e.g. removing a server that is not in maint and drained, a reload while stopping)
5     timed out waiting (``--wait`` / ``wait``: sessions remain)
6     authentication failed (bad or missing token)
7     the new configuration is invalid; the old one keeps running
====  =====================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, TextIO

from medlb.config import load_config, parse_duration
from medlb.errors import ConfigError

EXIT_OK = 0
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_TIMEOUT = 5
EXIT_AUTH = 6
EXIT_INVALID_CONFIG = 7

DEFAULT_CONFIG = "/etc/medlb/medlb.yaml"
_STATUS_EXIT = {
    400: EXIT_USAGE,
    413: EXIT_USAGE,
    401: EXIT_AUTH,
    403: EXIT_AUTH,
    404: EXIT_NOT_FOUND,
    408: EXIT_TIMEOUT,
    409: EXIT_REFUSED,
    422: EXIT_INVALID_CONFIG,
}


class CtlError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Client:
    """A tiny JSON client over urllib: no dependency, works wherever medlb runs."""

    def __init__(self, url: str, token: str, *, context: ssl.SSLContext | None = None, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.context = context
        self.timeout = timeout
        # No proxy, ever: http_proxy is often set on hospital servers for package
        # installs, and urllib would hand the admin token to that proxy in clear.
        handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
        if context is not None:
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def call(self, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with self._opener.open(request, timeout=timeout or self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            payload = _decode(exc.read())
            message = payload.get("error") or payload.get("message") or exc.reason
            if isinstance(payload.get("errors"), list):
                message = "\n".join(
                    [str(message), *(f"  {e.get('where')}: {e.get('message')}" for e in payload["errors"])]
                )
            raise CtlError(_STATUS_EXIT.get(exc.code, EXIT_UNREACHABLE), f"{exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(EXIT_UNREACHABLE, f"cannot reach the admin API at {self.url}: {reason}") from None
        return _decode(raw)


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw or b"{}")
    except ValueError:
        return {"error": raw[:200].decode("utf-8", "replace")}
    return data if isinstance(data, dict) else {"data": data}


def _client(args: argparse.Namespace) -> Client:
    url = args.url or os.environ.get("MEDLB_URL")
    token = ""
    if args.token_file:
        token = _read_token(args.token_file)
    elif os.environ.get("MEDLB_TOKEN"):
        token = os.environ["MEDLB_TOKEN"].strip()
    context: ssl.SSLContext | None = None
    need_config = not url or not token
    if need_config:
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            raise CtlError(EXIT_USAGE, f"{exc}\n(give --url and --token-file, or a valid -c config)") from None
        admin = config.admin
        if admin is None:
            raise CtlError(EXIT_USAGE, f"{args.config} has no admin section; the admin API is off")
        if not url:
            host = admin.bind.host
            if host in ("0.0.0.0", "::", ""):
                host = "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            url = f"{'https' if admin.tls else 'http'}://{host}:{admin.bind.port}"
        if not token:
            if admin.token_file:
                token = _read_token(admin.token_file)
            elif admin.token_env:
                token = os.environ.get(admin.token_env, "").strip()
            if not token:
                raise CtlError(EXIT_AUTH, "no admin token: set MEDLB_TOKEN, --token-file, or the config's token source")
    assert url is not None
    if url.startswith("https:"):
        context = ssl.create_default_context(cafile=args.cacert) if args.cacert else ssl.create_default_context()
        if args.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    return Client(url, token, context=context)


def _read_token(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CtlError(EXIT_USAGE, f"cannot read token file {path}: {exc.strerror}") from None


def _target(text: str) -> tuple[str, str]:
    backend, sep, server = text.partition("/")
    if not sep or not backend or not server:
        raise CtlError(EXIT_USAGE, f"expected backend/server, got {text!r}")
    return urllib.parse.quote(backend, safe=""), urllib.parse.quote(server, safe="")


def _server_path(text: str) -> str:
    backend, server = _target(text)
    return f"/api/v1/backends/{backend}/servers/{server}"


# --------------------------------------------------------------------------- output


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def status_table(status: dict[str, Any]) -> str:
    """The status document as the table an operator reads in a terminal."""
    lines = []
    for f in status.get("frontends", []):
        lines.append(
            f"frontend {f['name']} ({f['mode']} {' '.join(f['binds'])}) -> {f['default_backend']}: "
            f"{f['cur_sessions']} session(s), {f['total_sessions']} total"
        )
    header = ("SERVER", "OP", "ADMIN", "WEIGHT", "SESS", "TOTAL", "IN", "OUT", "LAST CHECK")
    for b in status.get("backends", []):
        lines.append("")
        flag = "" if b["up"] else "  ** NO USABLE SERVER **"
        lines.append(f"backend {b['name']} ({b['balance']}): {b['cur_sessions']} session(s), queue {b['queue']}{flag}")
        rows = [header]
        for s in b["servers"]:
            check = s.get("last_check")
            admin = s["admin_state"] + (" (removed)" if s.get("retired") else "")
            rows.append(
                (
                    f"{b['name']}/{s['name']}" + (" [backup]" if s["backup"] else ""),
                    s["op_state"],
                    admin,
                    f"{s['weight']}"
                    + (f" ({s['effective_weight']:g})" if s["effective_weight"] != s["weight"] else ""),
                    str(s["cur_sessions"]),
                    str(s["total_sessions"]),
                    human_bytes(s["bytes_in"]),
                    human_bytes(s["bytes_out"]),
                    "-" if check is None else ("ok: " if check["ok"] else "FAIL: ") + check["text"],
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        for row in rows:
            lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    return "\n".join(lines).lstrip("\n")


# --------------------------------------------------------------------------- commands


def _set_state(client: Client, args: argparse.Namespace, state: str, out: TextIO) -> int:
    if getattr(args, "wait", False):
        _duration(args.timeout)  # a typo in --timeout must not leave a half-done change
    body: dict[str, Any] = {"admin_state": state}
    if args.reason:
        body["reason"] = args.reason
    doc = client.call("PATCH", _server_path(args.server), body)
    print(f"{args.server}: admin_state {doc['admin_state']}, {doc['cur_sessions']} session(s)", file=out)
    if getattr(args, "kill", False):
        closed = client.call("POST", _server_path(args.server) + "/shutdown-sessions", {})
        print(f"{args.server}: closed {closed['closed']} session(s)", file=out)
    if getattr(args, "wait", False):
        return _wait(client, args.server, args.timeout, out)
    return EXIT_OK


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CtlError(EXIT_USAGE, f"--timeout: {exc}") from None


def _wait(client: Client, server: str, timeout: str, out: TextIO) -> int:
    seconds = _duration(timeout)
    query = urllib.parse.urlencode({"until": "drained", "timeout": timeout})
    doc = client.call("GET", f"{_server_path(server)}/wait?{query}", timeout=seconds + 10.0)
    print(f"{server}: drained ({doc['cur_sessions']} session(s))", file=out)
    return EXIT_OK


def run_ctl(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    client = _client(args)
    cmd = args.ctl_command
    if cmd == "status":
        status = client.call("GET", "/api/v1/status")
        print(json.dumps(status, indent=2) if args.json else status_table(status), file=out)
        return EXIT_OK
    if cmd == "drain":
        return _set_state(client, args, "drain", out)
    if cmd == "halt":
        return _set_state(client, args, "maint", out)
    if cmd == "ready":
        return _set_state(client, args, "ready", out)
    if cmd == "weight":
        doc = client.call("PATCH", _server_path(args.server), {"weight": args.weight})
        print(f"{args.server}: weight {doc['weight']}", file=out)
        return EXIT_OK
    if cmd == "wait":
        return _wait(client, args.server, args.timeout, out)
    if cmd == "shutdown-sessions":
        doc = client.call("POST", _server_path(args.server) + "/shutdown-sessions", {})
        print(f"{args.server}: closed {doc['closed']} session(s)", file=out)
        return EXIT_OK
    if cmd == "add":
        backend, name = _target(args.server)
        spec: dict[str, Any] = {"name": urllib.parse.unquote(name), "address": args.address, "weight": args.weight}
        if args.maxconn:
            spec["maxconn"] = args.maxconn
        if args.backup:
            spec["backup"] = True
        if args.maint:
            spec["admin_state"] = "maint"
        doc = client.call("POST", f"/api/v1/backends/{backend}/servers", spec)
        print(f"{args.server}: added at {doc['address']} ({doc['op_state']} until its first check passes)", file=out)
        return EXIT_OK
    if cmd == "remove":
        path = _server_path(args.server) + ("?force=true" if args.force else "")
        doc = client.call("DELETE", path)
        print(f"{args.server}: removed ({doc['closed_sessions']} session(s) closed)", file=out)
        return EXIT_OK
    if cmd == "reload":
        doc = client.call("POST", "/api/v1/reload", {})
        print(f"reloaded: {doc['message']}", file=out)
        return EXIT_OK
    raise CtlError(EXIT_USAGE, f"unknown command {cmd!r}")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ctl = sub.add_parser("ctl", help="control a running medlb through its admin API")
    ctl.add_argument(
        "-c", "--config", default=DEFAULT_CONFIG, help=f"config file to find the API in (default {DEFAULT_CONFIG})"
    )
    ctl.add_argument("--url", help="admin API URL, e.g. http://127.0.0.1:9900 (env MEDLB_URL)")
    ctl.add_argument("--token-file", help="file holding the admin token (env MEDLB_TOKEN holds the token itself)")
    ctl.add_argument("--cacert", help="CA bundle to verify an HTTPS admin API")
    ctl.add_argument("--insecure", action="store_true", help="do not verify the admin API's TLS certificate")
    cmds = ctl.add_subparsers(dest="ctl_command", required=True)

    status = cmds.add_parser("status", help="frontends, backends and servers as a table")
    status.add_argument("--json", action="store_true", help="print the raw status document")

    for name, text in (
        ("drain", "take no new sessions; existing ones finish"),
        ("halt", "maintenance: no new sessions, checks stop"),
        ("ready", "back in service"),
    ):
        p = cmds.add_parser(name, help=text)
        p.add_argument("server", metavar="BACKEND/SERVER")
        p.add_argument("--reason", default="", help="why (logged and sent with alerts)")
        if name in ("drain", "halt"):
            p.add_argument("--wait", action="store_true", help="return only when the server has no session")
            p.add_argument("--timeout", default="30s", help="how long --wait waits (default 30s)")
        if name == "halt":
            p.add_argument("--kill", action="store_true", help="also close its sessions now")

    weight = cmds.add_parser("weight", help="set a server's weight (0..256)")
    weight.add_argument("server", metavar="BACKEND/SERVER")
    weight.add_argument("weight", type=int)

    wait = cmds.add_parser("wait", help="wait until a server has no session")
    wait.add_argument("server", metavar="BACKEND/SERVER")
    wait.add_argument("--timeout", default="30s")

    shut = cmds.add_parser("shutdown-sessions", help="close a server's sessions now")
    shut.add_argument("server", metavar="BACKEND/SERVER")

    add = cmds.add_parser("add", help="add a server at runtime (checked before it takes traffic)")
    add.add_argument("server", metavar="BACKEND/SERVER")
    add.add_argument("address", metavar="HOST:PORT")
    add.add_argument("--weight", type=int, default=1)
    add.add_argument("--maxconn", type=int, default=0)
    add.add_argument("--backup", action="store_true")
    add.add_argument("--maint", action="store_true", help="add it in maintenance")

    remove = cmds.add_parser("remove", help="remove a server (must be in maint and drained unless --force)")
    remove.add_argument("server", metavar="BACKEND/SERVER")
    remove.add_argument("--force", action="store_true", help="close its sessions and remove it anyway")

    cmds.add_parser("reload", help="reload the configuration file (like SIGHUP) and report errors")


def main_ctl(args: argparse.Namespace) -> int:
    try:
        return run_ctl(args)
    except CtlError as exc:
        print(f"medlb ctl: {exc.message}", file=sys.stderr)
        return exc.code
