#!/usr/bin/env python3
"""TCP benchmark: the direct path, HAProxy (``mode tcp``) and medlb (``tcp`` mode) in one run, on loopback.

Why one script and one run: the numbers only mean something relative to each
other on the same machine at the same moment, so every path is measured with
the same backends, the same clients and the same durations, and the ratios are
computed here rather than by hand.

Measured per path (see ``bench/README.md``):

- bulk throughput with iperf3, 1 stream and 8 streams (receiver Gbit/s);
- new connections per second: ``wrk`` with ``Connection: close`` against
  nginx behind the proxy, so every request is a new TCP connection through it;
- memory per idle proxied session: proxy RSS before/after holding N idle
  connections open to a holding server, divided by N.

``medlb-observed`` is medlb (splice) with its admin API on, scraped by a
thread of this script (``/metrics``, ``/api/v1/status``, ``/api/v1/history``
once per second) while every measurement against it runs: the
``observed/medlb`` column shows what observability costs the data path.

``medlb-w`` is medlb (splice) with ``global.workers: N`` (the main process and
N-1 worker processes share the listening ports with SO_REUSEPORT;
``--medlb-workers``, by default the number of CPUs and at least 2). Its CPU
and RSS readings count all N processes.

Run: ``.venv/bin/python bench/tcp_bench.py [--smoke] [--out FILE.md] [--duration S] [--medlb-workers N]``.

Only the standard library is used so the script runs under any Python that
can also run medlb; the script re-executes itself (``_holder`` and
``_idle_client`` sub-commands) for the helper processes, so there is one file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import secrets
import selectors
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench/ is not a package: common.py lies next to this file
    sys.path.insert(0, _HERE)
from common import (  # noqa: E402
    HOST,
    REPO,
    BenchBase,
    BenchError,
    Plan,
    Proc,
    Sample,
    Targets,
    add_medlb_workers_arg,
    default_medlb_workers,
    details_lines,
    fmt_ratio,
    fmt_value,
    free_port,
    machine_lines,
    make_parser,
    medians,
    medlb_global,
    notes_lines,
    on_sigterm_clean_up,
    parse_common_args,
    parse_paths,
    probe_http,
    raise_nofile,
    ratio,
    read_line,
    require_tools,
    rss_kb,
    run_and_report,
    run_interleaved,
    run_wrk,
    start_medlb,
    start_nginx,
    table_lines,
    target_lines,
    wait_port,
    wait_processes,
    wait_ready,
)
from common import collect_meta as collect_machine_meta  # noqa: E402

#: The path names, in table order. ``medlb`` is the shipped default (splice on); ``medlb-observed`` is the
#: same plus the admin API, scraped while it is measured (next to ``medlb`` so interleaving puts them side by side);
#: ``medlb-w`` is ``medlb`` with ``global.workers: N`` (``--medlb-workers``).
PATHS = ("direct", "haproxy", "medlb", "medlb-observed", "medlb-copy", "medlb-w")
PATH_TITLES = {
    "direct": "direct",
    "haproxy": "HAProxy",
    "medlb": "medlb (splice)",
    "medlb-observed": "medlb (observed)",
    "medlb-copy": "medlb (copy)",
    "medlb-w": "medlb-w (splice)",
}
#: The medlb paths judged against the targets: one process, and ``global.workers: N``.
MEDLB_PATHS = ("medlb", "medlb-w")
#: Ratio columns: (title, numerator path, denominator path).
RATIOS = (
    ("medlb/direct", "medlb", "direct"),
    ("medlb/HAProxy", "medlb", "haproxy"),
    ("observed/medlb", "medlb-observed", "medlb"),
    ("medlb-w/direct", "medlb-w", "direct"),
    ("medlb-w/HAProxy", "medlb-w", "haproxy"),
)
#: Metric keys, in table order, with their row titles.
METRICS = {
    "bulk1": "Bulk throughput, 1 stream (Gbit/s)",
    "bulk8": "Bulk throughput, 8 streams (Gbit/s)",
    "connrate": "New connections/s (wrk, Connection: close)",
    "idle_kb": "RSS per idle session (KB)",
}
#: fds a proxy keeps for itself besides two per session (listeners, epoll, checks, logs, pipes in use).
PROXY_FD_MARGIN = 400
#: Binaries the benchmark runs besides medlb.
TOOLS = ("haproxy", "iperf3", "wrk", "nginx")
PROBE_REQUEST = b"PROBE\n"
PROBE_REPLY = b"OK\n"
#: What the scraper fetches from medlb (observed) each round, in order.
SCRAPE_ENDPOINTS = ("/metrics", "/api/v1/status", "/api/v1/history")
#: Seconds between scrape rounds: 15x more often than Prometheus's default scrape_interval of 15 s.
SCRAPE_INTERVAL = 1.0


# --------------------------------------------------------------------------- probes


def probe_iperf3(port: int) -> bool:
    """Send an iperf3 cookie and expect the server's first state byte.

    A plain connect is not enough: the proxy accepts before its backend is up
    (medlb servers start DOWN until their first check). The iperf3 server
    answers a cookie with PARAM_EXCHANGE (9) or ACCESS_DENIED (-1), then logs an
    error for our early close and goes back to listening, which is harmless.
    """
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(b"benchprobe".ljust(36, b"x") + b"\0")
        return len(s.recv(1)) == 1


def probe_holder(port: int) -> bool:
    """The holding server answers PROBE with OK; idle sessions themselves never carry a byte."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(PROBE_REQUEST)
        data = b""
        while len(data) < len(PROBE_REPLY):
            chunk = s.recv(16)
            if not chunk:
                break
            data += chunk
        return data == PROBE_REPLY


# --------------------------------------------------------------------------- helper processes (re-executed)


def holder_main(count_file: str) -> int:
    """Accept connections and keep them open; report how many are open via ``count_file``.

    Connections that send ``PROBE`` get ``OK`` and are closed: that lets the
    harness see a proxy is really forwarding without putting a byte on the idle
    sessions being measured. Health checks (connect, close) are just dropped.
    """
    raise_nofile()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((HOST, 0))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    print(f"PORT {lsock.getsockname()[1]}", flush=True)
    conns: set[socket.socket] = set()
    last_written = -1
    last_write_time = 0.0
    while True:
        for key, _ in sel.select(0.05):
            if key.data is None:
                while True:
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:  # EMFILE and friends: report it via the count stalling
                        break
                    conn.setblocking(False)
                    conns.add(conn)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            conn = key.fileobj  # type: ignore[assignment]
            assert isinstance(conn, socket.socket)
            try:
                data = conn.recv(64)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if data.startswith(PROBE_REQUEST[:5]):
                with contextlib.suppress(OSError):
                    conn.send(PROBE_REPLY)
            sel.unregister(conn)
            conns.discard(conn)
            conn.close()
        now = time.monotonic()
        if len(conns) != last_written or now - last_write_time > 1.0:
            tmp = count_file + ".tmp"
            with open(tmp, "w") as f:
                f.write(str(len(conns)))
            os.replace(tmp, count_file)
            last_written, last_write_time = len(conns), now


def idle_client_main(port: int, n: int) -> int:
    """Open ``n`` connections to ``port`` and hold them; talk to the harness over stdin/stdout.

    Protocol: print ``CONNECTED k`` after connecting (k = how many connects
    succeeded), then on each stdin line print ``ALIVE m`` (connections neither
    closed nor reset by the proxy), and exit when stdin closes.
    """
    raise_nofile()
    socks: list[socket.socket] = []
    failed = 0
    for _ in range(n):
        try:
            socks.append(socket.create_connection((HOST, port), timeout=15))
        except OSError:
            failed += 1
            if failed > 50:
                break
    print(f"CONNECTED {len(socks)}", flush=True)
    for _ in sys.stdin:
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        dead = len(sel.select(0))  # readable on an idle session == EOF or reset by the proxy
        sel.close()
        print(f"ALIVE {len(socks) - dead}", flush=True)
    for s in socks:
        s.close()
    return 0


# --------------------------------------------------------------------------- admin API scraper

#: No proxy from the environment (http_proxy) for loopback requests to medlb's admin API.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def admin_get(base_url: str, token: str, endpoint: str, timeout: float) -> tuple[int, bytes]:
    """GET ``endpoint`` from medlb's admin API with the bearer token: (status, whole body).

    Non-2xx answers are returned, not raised; no answer at all raises (OSError and friends).
    """
    request = urllib.request.Request(base_url + endpoint, headers={"Authorization": f"Bearer {token}"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, exc.read()
        finally:
            exc.close()


@dataclass
class Scrape:
    """One request of the scraper: during which test and round, when, how long it took, and what went wrong.

    ``phase`` is set afterwards by the test (the idle test marks ``held`` the
    rounds made entirely while all its sessions were open).
    """

    test: str
    round: int
    endpoint: str
    start: float  # time.monotonic()
    seconds: float
    error: str = ""
    phase: str = ""


class Scraper:
    """A thread fetching every ``SCRAPE_ENDPOINTS`` once per ``interval`` while a measurement runs.

    Use as a context manager around the measurement: the first round starts at
    once, the thread stops after its current round on exit. A round that
    overruns the interval delays the next one (no catch-up burst). Every
    request is recorded in ``out``; a non-200 answer or no answer is a failure.
    """

    def __init__(self, base_url: str, token: str, test: str, out: list[Scrape], interval: float = SCRAPE_INTERVAL):
        self.base_url = base_url
        self.token = token
        self.test = test
        self.out = out
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"scraper-{test}", daemon=True)

    def __enter__(self) -> Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def rounds_within(self, since: float, until: float = float("inf")) -> set[int]:
        """Rounds whose every request started at or after ``since`` and finished by ``until`` (monotonic)."""
        per_round: dict[int, list[Scrape]] = {}
        for x in list(self.out):  # a snapshot: the thread may be appending
            if x.test == self.test:
                per_round.setdefault(x.round, []).append(x)
        return {
            n
            for n, xs in per_round.items()
            if len(xs) == len(SCRAPE_ENDPOINTS) and all(since <= x.start and x.start + x.seconds <= until for x in xs)
        }

    def mark(self, rounds: set[int], phase: str) -> None:
        """Label the requests of ``rounds`` with ``phase``."""
        for x in self.out:
            if x.test == self.test and x.round in rounds:
                x.phase = phase

    def _run(self) -> None:
        next_round = time.monotonic()
        n = 0
        while not self._stop.is_set():
            n += 1
            for endpoint in SCRAPE_ENDPOINTS:
                start = time.monotonic()
                try:
                    status, body = admin_get(self.base_url, self.token, endpoint, timeout=10)
                    error = "" if status == 200 else f"HTTP {status}: {body[:300].decode(errors='replace')}"
                except Exception as exc:  # any failure is data; an exception must not end the thread
                    error = f"{type(exc).__name__}: {exc}"
                self.out.append(Scrape(self.test, n, endpoint, start, time.monotonic() - start, error))
            next_round += self.interval
            now = time.monotonic()
            next_round = max(next_round, now)
            self._stop.wait(next_round - now)


def latency_summary(scrapes: list[Scrape], endpoints: tuple[str, ...] = SCRAPE_ENDPOINTS) -> str:
    """``/metrics 3.1/9.8 ms, ...``: median/max latency of the successful requests per endpoint."""
    parts = []
    for endpoint in endpoints:
        times = [x.seconds * 1000 for x in scrapes if x.endpoint == endpoint and not x.error]
        if times:
            parts.append(f"{endpoint} {statistics.median(times):.1f}/{max(times):.1f} ms")
        else:
            parts.append(f"{endpoint} -")
    return ", ".join(parts)


def count_summary(scrapes: list[Scrape]) -> str:
    """``12 scrapes (4 rounds), 0 failed``."""
    rounds = sum(1 for x in scrapes if x.endpoint == SCRAPE_ENDPOINTS[0])
    failed = sum(1 for x in scrapes if x.error)
    return f"{len(scrapes)} scrapes ({rounds} rounds), {failed} failed"


# --------------------------------------------------------------------------- backends and proxies


def one_metric(
    key: str, measure: Callable[[], float] | Callable[[], tuple[float, str]]
) -> Callable[[], tuple[dict[str, float], str]]:
    """Adapt a measurement of one number (and maybe a summary) to ``run_interleaved``'s shape."""

    def run() -> tuple[dict[str, float], str]:
        value = measure()
        number, summary = value if isinstance(value, tuple) else (value, "")
        return {key: number}, summary

    return run


@dataclass
class Route:
    """One frontend -> backend pair a proxy must provide; ``probe`` checks it end to end."""

    name: str
    backend_port: int
    probe: Callable[[int], bool]


@dataclass
class Settings:
    """Everything that shapes a run, recorded in the output header."""

    duration: int
    idle_n: int
    idle_n_requested: int
    wrk_threads: int = 2
    wrk_conns: int = 64
    nginx_workers: str = "1"
    #: HAProxy tuning per kind of test (bufsize, pipesize; pipesize 0 = kernel default), from a sweep on the
    #: reference VM: big buffers and 1 MiB pipes win bulk runs but cost ~10% in connection rate.
    haproxy_bulk: tuple[int, int] = (262144, 1048576)
    haproxy_rate: tuple[int, int] = (65536, 0)
    repeat: int = 3
    smoke: bool = False
    #: medlb (observed), idle test: scrape rounds to wait for with all idle sessions open (for the latencies).
    held_scrape_rounds: int = 10
    #: ``global.workers`` of the ``medlb-w`` path (the other medlb paths run one process).
    medlb_workers: int = field(default_factory=default_medlb_workers)


class Bench(BenchBase):
    """Starts backends and proxies and takes the measurements; all children die in :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("medlb-bench-")
        self.s = settings
        self.nginx_port = 0
        #: Every request the scrapers of medlb (observed) made.
        self.scrapes: list[Scrape] = []
        self.admin_token = secrets.token_urlsafe(32)
        self.admin_token_file = self.tmp / "admin-token"
        fd = os.open(self.admin_token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.admin_token + "\n")

    # -- backends

    def start_nginx(self) -> None:
        """nginx serving a 13-byte body from the config (no file: the worker runs as nobody)."""
        port = free_port()
        server = f"""  server {{
    listen {HOST}:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "hello, bench\\n"; }}
  }}"""
        proc = start_nginx(self.children, self.tmp / "nginx", self.s.nginx_workers, server)
        wait_port(port, 10, proc.popen)
        self.nginx_port = port

    def start_iperf3(self) -> int:
        """A fresh ``iperf3 -s``: it serves one test at a time, so each measured test gets its own."""
        port = free_port()
        proc = self.children.start("iperf3", ["iperf3", "-s", "-p", str(port), "-B", HOST])
        wait_port(port, 10, proc.popen)
        return port

    def start_holder(self) -> tuple[Proc, int, Path]:
        """The holding server for idle sessions (this script re-executed as ``_holder``)."""
        count_file = self.tmp / f"holder-count-{len(self.children.procs)}"
        proc = self.children.start(
            "holder", [sys.executable, str(Path(__file__).resolve()), "_holder", str(count_file)], stdout_pipe=True
        )
        assert proc.popen.stdout is not None
        line = read_line(proc.popen.stdout, 10, proc.popen)
        return proc, int(line.split()[1]), count_file

    # -- proxies

    def haproxy_config(self, routes: list[Route], ports: dict[str, int], tuning: tuple[int, int]) -> str:
        """``mode tcp`` with HAProxy's best settings for this test; no checks, no logs (its fastest shape).

        maxconn and maxpipes are sized so HAProxy's own fd arithmetic
        (2 per connection + 2 per pipe) fits the hard RLIMIT_NOFILE: HAProxy
        refuses to start when it cannot raise the limit it computed.
        """
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        maxconn = self.s.idle_n + 100
        maxpipes = max(32, min(4096, (hard - 2 * maxconn - 150) // 2))
        lines = [
            "global",
            f"  maxconn {maxconn}",
            f"  maxpipes {maxpipes}",
            f"  tune.bufsize {tuning[0]}",
            *([f"  tune.pipesize {tuning[1]}"] if tuning[1] > 0 else []),
            "defaults",
            "  mode tcp",
            "  option splice-auto",
            "  timeout connect 3s",
            "  timeout client 1h",
            "  timeout server 1h",
            "  timeout queue 30s",
            f"  maxconn {maxconn}",
        ]
        for r in routes:
            lines += [
                f"frontend fe_{r.name}",
                f"  bind {HOST}:{ports[r.name]}",
                f"  default_backend be_{r.name}",
                f"backend be_{r.name}",
                f"  server s1 {HOST}:{r.backend_port}",
            ]
        return "\n".join(lines) + "\n"

    def medlb_config(
        self, routes: list[Route], ports: dict[str, int], splice: bool, admin_port: int = 0, workers: int = 1
    ) -> str:
        """medlb YAML in the documented format; the TCP check makes servers UP within one check.

        ``admin_port`` adds the ``admin`` section (the admin API with the bench's token file); ``workers`` > 1
        sets ``global.workers`` (the ``medlb-w`` path).
        """
        out = [
            medlb_global(workers, splice="true" if splice else "false"),
            "defaults:",
            "  timeouts: {connect: 3s, client: 1h, server: 1h, queue: 30s, check: 2s}",
            "  check: {inter: 2s}",
            "frontends:",
        ]
        maxconn = max(30000, self.s.idle_n + 100)
        for r in routes:
            out.append(
                f'  - {{name: fe_{r.name}, mode: tcp, bind: ["{HOST}:{ports[r.name]}"], '
                f"maxconn: {maxconn}, default_backend: be_{r.name}}}"
            )
        out.append("backends:")
        for r in routes:
            out += [
                f"  - name: be_{r.name}",
                "    balance: roundrobin",
                "    check: {type: tcp}",
                "    servers:",
                f'      - {{name: s1, address: "{HOST}:{r.backend_port}"}}',
            ]
        if admin_port:
            out += [
                "admin:",
                f'  bind: "{HOST}:{admin_port}"',
                f"  token_file: {json.dumps(str(self.admin_token_file))}",
            ]
        return "\n".join(out) + "\n"

    def start_proxy(
        self, path: str, routes: list[Route], tuning: tuple[int, int] | None = None
    ) -> tuple[Proc | None, dict[str, int]]:
        """Start the proxy of ``path`` for ``routes``; return it and the port per route once all probes pass.

        ``tuning`` is HAProxy's (bufsize, pipesize); medlb has no such knobs and runs its defaults.
        """
        if path == "direct":
            return None, {r.name: r.backend_port for r in routes}
        ports = {r.name: free_port() for r in routes}
        cfg = self.tmp / f"{path}-{len(self.children.procs)}.cfg"
        if path == "haproxy":
            cfg.write_text(self.haproxy_config(routes, ports, tuning or self.s.haproxy_rate))
            proc = self.children.start("haproxy", ["haproxy", "-f", str(cfg), "-db"])
        else:
            admin_port = free_port() if path == "medlb-observed" else 0
            splice = path in ("medlb", "medlb-observed", "medlb-w")
            workers = self.s.medlb_workers if path == "medlb-w" else 1
            cfg.write_text(self.medlb_config(routes, ports, splice=splice, admin_port=admin_port, workers=workers))
            proc = start_medlb(self.children, self.medlb, path, cfg)
            if admin_port:
                proc.admin_url = f"http://{HOST}:{admin_port}"
        then: Callable[[], None] | None = None
        if proc.admin_url:
            then = functools.partial(self.wait_admin, proc)
        elif path == "medlb-w":
            then = functools.partial(wait_processes, proc, self.s.medlb_workers)
        probes = [(f"{path} route {r.name}", functools.partial(r.probe, ports[r.name])) for r in routes]
        wait_ready(self.children, proc, list(ports.values()), probes, then)
        return proc, ports

    def wait_admin(self, proc: Proc) -> None:
        """Every scraped endpoint must answer 200 to the token before measuring; otherwise its answer is the error.

        No answer is retried (the listener may not be up yet); an HTTP error is final.
        """
        assert proc.admin_url is not None
        for endpoint in SCRAPE_ENDPOINTS:
            deadline = time.monotonic() + 20
            last = "no answer"
            while True:
                if proc.popen.poll() is not None:
                    raise BenchError(f"medlb exited with {proc.popen.returncode} while waiting for admin {endpoint}")
                try:
                    status, body = admin_get(proc.admin_url, self.admin_token, endpoint, timeout=5)
                except Exception as exc:
                    last = f"{type(exc).__name__}: {exc}"
                else:
                    if status == 200:
                        break
                    text = body[:500].decode(errors="replace")
                    raise BenchError(f"admin GET {proc.admin_url}{endpoint} answered HTTP {status}: {text}")
                if time.monotonic() > deadline:
                    raise BenchError(f"admin GET {proc.admin_url}{endpoint}: no answer within 20 s ({last})")
                time.sleep(0.1)

    def scraper(self, proxy: Proc | None, test: str) -> Scraper | None:
        """A scraper for ``proxy`` during ``test`` when the proxy has the admin API on, else None."""
        if proxy is None or proxy.admin_url is None:
            return None
        return Scraper(proxy.admin_url, self.admin_token, test, self.scrapes)

    # -- measurements

    def iperf3(self, port: int, streams: int) -> float:
        """Receiver Gbit/s of one iperf3 run (first second omitted when the run is long enough)."""
        cmd = ["iperf3", "-c", HOST, "-p", str(port), "-t", str(self.s.duration), "-P", str(streams), "-J"]
        if self.s.duration >= 3:
            cmd += ["-O", "1"]
        last = ""
        for attempt in range(2):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=self.s.duration + 60)
            except subprocess.TimeoutExpired:
                last = "iperf3 client timed out"
                continue
            try:
                data = json.loads(out.stdout)
            except json.JSONDecodeError:
                data = {"error": (out.stdout + out.stderr).strip()[-300:]}
            if "error" not in data and out.returncode == 0:
                return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
            last = str(data.get("error", f"exit code {out.returncode}"))
            if attempt == 0:
                self.notes.append(f"iperf3 -P {streams} on port {port} failed once ({last}); retried.")
                time.sleep(1)
        raise BenchError(f"iperf3 -P {streams}: {last}")

    def wrk(self, port: int) -> tuple[float, str]:
        """Requests/s with ``Connection: close`` (each request is a new connection) and an error summary."""
        result = run_wrk(
            [
                f"-t{self.s.wrk_threads}",
                f"-c{self.s.wrk_conns}",
                f"-d{self.s.duration}s",
                "-H",
                "Connection: close",
                f"http://{HOST}:{port}/",
            ],
            self.s.duration,
        )
        return result.requests_per_s, result.errors()

    def idle_memory(
        self, proxy: Proc, port: int, holder: Proc, count_file: Path, scraper: Scraper | None = None
    ) -> tuple[float, str]:
        """KB of proxy RSS per idle session: (RSS with N idle sessions - RSS before) / N.

        With a ``scraper`` (already running), the sessions stay open after the
        RSS reading until ``held_scrape_rounds`` whole scrape rounds were made
        with all N open, so the scrape latencies with many sessions rest on more
        than two samples; those rounds are marked ``held``. The RSS number
        itself is read at the same moment as for the other paths.
        """
        n = self.s.idle_n
        extra = ""
        held_since = float("inf")  # no round counts as held until all N sessions are open
        time.sleep(1.0)  # let start-up garbage settle before the baseline
        before = rss_kb(proxy.pgid)
        client = self.children.start(
            "idle-client",
            [sys.executable, str(Path(__file__).resolve()), "_idle_client", str(port), str(n)],
            stdin=subprocess.PIPE,
            stdout_pipe=True,
        )
        try:
            assert client.popen.stdout is not None and client.popen.stdin is not None
            connected = int(read_line(client.popen.stdout, 180, client.popen).split()[1])
            if connected < n:
                raise BenchError(f"only {connected}/{n} client connections succeeded; proxy:\n{proxy.log_tail()}")
            deadline = time.monotonic() + 60
            held = 0
            while time.monotonic() < deadline:
                if holder.popen.poll() is not None:
                    raise BenchError("holding server died")
                with contextlib.suppress(OSError, ValueError):
                    held = int(count_file.read_text())
                if held >= n:
                    break
                time.sleep(0.1)
            else:
                raise BenchError(f"only {held}/{n} sessions reached the holding server; proxy:\n{proxy.log_tail()}")
            held_since = time.monotonic()
            time.sleep(2.0)  # sessions fully set up (timers armed, buffers settled)
            after = rss_kb(proxy.pgid)
            if scraper is not None:
                want = self.s.held_scrape_rounds
                deadline = time.monotonic() + 30 + 5 * want
                while len(scraper.rounds_within(held_since)) < want and time.monotonic() < deadline:
                    time.sleep(0.1)
                extra = (
                    f"; RSS {rss_kb(proxy.pgid) / 1024:.1f} MB after {len(scraper.rounds_within(held_since))} "
                    f"scrape rounds with the {n} sessions open"
                )
            client.popen.stdin.write(b"check\n")
            client.popen.stdin.flush()
            alive = int(read_line(client.popen.stdout, 30, client.popen).split()[1])
            if alive < n:
                raise BenchError(f"{n - alive} of {n} idle sessions were closed by the proxy")
        finally:
            if scraper is not None:
                scraper.mark(scraper.rounds_within(held_since, time.monotonic()), "held")
            self.children.stop(client)
        detail = f"RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB with {n} sessions ({alive} alive){extra}"
        return (after - before) / n, detail

    # -- orchestration

    def measure_traffic(self, paths: list[str], results: dict[tuple[str, str], float | None]) -> None:
        """Bulk throughput and connection rate: every path set up at once, then runs interleaved.

        Each repetition visits every path in turn and the table shows the
        median (``run_interleaved``). Idle proxies cost nothing meanwhile
        (medlb's health checks are a connect every 2 s).
        """
        keys = ("bulk1", "bulk8", "connrate")
        with self.children.scope():
            plans: dict[str, Plan] = {}
            for path in paths:
                try:
                    bulk = [
                        Route("iperf1", self.start_iperf3(), probe_iperf3),
                        Route("iperf8", self.start_iperf3(), probe_iperf3),
                    ]
                    rate = [Route("http", self.nginx_port, probe_http)]
                    groups = [(bulk, self.s.haproxy_bulk), (rate, self.s.haproxy_rate)]
                    if path != "haproxy":
                        groups = [(bulk + rate, self.s.haproxy_rate)]
                    # route -> (the proxy serving it, its port); HAProxy gets one instance per tuning.
                    routes_of: dict[str, tuple[Proc | None, int]] = {}
                    for routes, tuning in groups:
                        proxy, ports = self.start_proxy(path, routes, tuning)
                        routes_of.update({name: (proxy, port) for name, port in ports.items()})
                except BenchError as exc:
                    self._fail(path, keys, exc, results)
                    continue
                plans[path] = [
                    (key, routes_of[route][0], one_metric(key, functools.partial(measure, routes_of[route][1])))
                    for key, route, measure in (
                        ("bulk1", "iperf1", functools.partial(self.iperf3, streams=1)),
                        ("bulk8", "iperf8", functools.partial(self.iperf3, streams=8)),
                        ("connrate", "http", self.wrk),
                    )
                ]

            def show(path: str, key: str, sample: Sample) -> None:
                print(f"  {PATH_TITLES[path]:15} {METRICS[key]:45} {fmt(sample.values[key], key)}", flush=True)

            def fail(path: str, key: str, exc: BenchError) -> None:
                self._fail(path, (key,), exc, results)

            def around(path: str, key: str, proxy: Proc | None) -> contextlib.AbstractContextManager[object]:
                return self.scraper(proxy, key) or contextlib.nullcontext()

            samples = run_interleaved(self.s.repeat, plans, show, fail, around)
            for (path, key), runs in samples.items():
                values, cpu = medians(runs)
                results[(path, key)] = values[key]
                detail = "runs: " + ", ".join(fmt(run.values[key], key) for run in runs)
                if key == "connrate":
                    detail += " — wrk socket errors: " + ", ".join(run.summary for run in runs)
                scrapes = [x for x in self.scrapes if x.test == key]
                if path == "medlb-observed" and scrapes:
                    detail += f" — {count_summary(scrapes)}; latency median/max: {latency_summary(scrapes)}"
                self.details[(path, key)] = detail
                if cpu is not None:
                    self.cpu[(path, key)] = cpu

    def measure_idle(self, path: str, results: dict[tuple[str, str], float | None]) -> None:
        """Idle-session memory on a fresh proxy, so buffers pooled by bulk tests neither pad nor hide the cost."""
        if path == "direct":
            results[(path, "idle_kb")] = None
            return
        print(f"== idle sessions: {PATH_TITLES[path]}", flush=True)
        with self.children.scope():
            try:
                holder, holder_port, count_file = self.start_holder()
                proxy, ports = self.start_proxy(path, [Route("idle", holder_port, probe_holder)])
                assert proxy is not None
                scraper = self.scraper(proxy, "idle_kb")
                with scraper or contextlib.nullcontext():
                    kb, detail = self.idle_memory(proxy, ports["idle"], holder, count_file, scraper)
                if scraper is not None:
                    scrapes = [x for x in self.scrapes if x.test == "idle_kb"]
                    held = [x for x in scrapes if x.phase == "held"]
                    detail += (
                        f" — {count_summary(scrapes)}; latency median/max with the {self.s.idle_n} sessions open: "
                        f"{latency_summary(held)}"
                    )
                results[(path, "idle_kb")] = kb
                self.details[(path, "idle_kb")] = detail
                print(f"  {PATH_TITLES[path]:15} {METRICS['idle_kb']:45} {fmt(kb, 'idle_kb')}", flush=True)
            except BenchError as exc:
                self._fail(path, ("idle_kb",), exc, results)

    def _fail(
        self, path: str, keys: tuple[str, ...], exc: Exception, results: dict[tuple[str, str], float | None]
    ) -> None:
        for key in keys:
            results[(path, key)] = float("nan")
        self.note_failure(f"{PATH_TITLES[path]} / {', '.join(METRICS[k] for k in keys)}: FAILED: {exc}")


# --------------------------------------------------------------------------- report


def haproxy_tuning(tuning: tuple[int, int]) -> str:
    """The tune.* lines of one HAProxy instance, for the header."""
    pipes = f"`tune.pipesize {tuning[1]}`" if tuning[1] else "kernel default pipe size"
    return f"`tune.bufsize {tuning[0]}`, {pipes}"


def fmt(value: float | None, key: str) -> str:
    """Table formatting per metric; ``n/a`` for not applicable, ``FAIL`` for a failed measurement."""
    return fmt_value(value, lambda v: f"{v:.0f}" if key == "connrate" else f"{v:.2f}")


def targets(results: dict[tuple[str, str], float | None], path: str = "medlb") -> list[tuple[str, str, bool | None]]:
    """The issue's targets for ``path`` (one of MEDLB_PATHS, splice) from the numbers: (target, measured, met)."""
    t = Targets()
    for key, streams in (("bulk1", "1 stream"), ("bulk8", "8 streams")):
        r = ratio(results[(path, key)], results[("haproxy", key)])
        t.add_ratio(f"Bulk throughput ({streams}) >= 1.1x HAProxy", r, lambda v: v >= 1.1)
        r = ratio(results[(path, key)], results[("direct", key)])
        t.add_ratio(f"Bulk throughput ({streams}) >= 0.65x direct", r, lambda v: v >= 0.65)
    r = ratio(results[(path, "connrate")], results[("haproxy", "connrate")])
    t.add_ratio("Connection rate >= 0.5x HAProxy", r, lambda v: v >= 0.5)
    t.add("RSS per idle session < 20 KB", results[(path, "idle_kb")], lambda v: v < 20, lambda v: f"{v:.2f} KB")
    return t.items


def targets_title(path: str, workers: int) -> str:
    """The title of the Targets section of ``path`` (one of MEDLB_PATHS)."""
    if path == "medlb":
        return "Targets (medlb with splice, 1 process, computed from the table)"
    return (
        f"Targets (medlb-w: medlb with splice, `global.workers: {workers}`, {workers} processes, "
        "computed from the table)"
    )


def scrape_note(bench: Bench) -> str:
    """The line under the table: how often medlb (observed) was scraped, how often that failed, how fast it was."""
    traffic = [x for x in bench.scrapes if x.test != "idle_kb"]
    held = [x for x in bench.scrapes if x.test == "idle_kb" and x.phase == "held"]
    failed = sum(1 for x in bench.scrapes if x.error)
    rounds = sum(1 for x in bench.scrapes if x.endpoint == SCRAPE_ENDPOINTS[0])
    return (
        f"- medlb (observed) scrapes: {len(bench.scrapes)} requests in {rounds} rounds "
        f"({', '.join(f'`{e}`' for e in SCRAPE_ENDPOINTS)} every {SCRAPE_INTERVAL:g} s during each of its tests), "
        f"{failed} failed. Latency median/max during the traffic tests: {latency_summary(traffic)}; "
        f"with {bench.s.idle_n} idle sessions open: {latency_summary(held, SCRAPE_ENDPOINTS[:2])}."
    )


def render(
    bench: Bench, results: dict[tuple[str, str], float | None], meta: dict[str, str], paths: list[str] | None = None
) -> str:
    """The markdown report: header, main table, targets, details and notes.

    Only the paths that ran (``paths``, default all) get a column, and only ratios between two of them.
    """
    s = bench.s
    ran = [p for p in PATHS if paths is None or p in paths]
    ratios = [(title, a, b) for title, a, b in RATIOS if a in ran and b in ran]
    lines = [
        f"# TCP benchmark: direct vs HAProxy vs medlb vs medlb-w ({s.medlb_workers} processes) ({meta['date']})",
        "",
        *machine_lines(meta),
        f"- HAProxy: {meta['haproxy']} — nbthread left at default ({meta['haproxy_threads']} here), "
        "`mode tcp`, `option splice-auto`, no checks, no logging; bulk tests: "
        f"{haproxy_tuning(s.haproxy_bulk)}; connection rate and idle: {haproxy_tuning(s.haproxy_rate)}",
        f"- iperf3: {meta['iperf3']}; wrk: {meta['wrk']}; nginx: {meta['nginx']} (worker_processes {s.nginx_workers})",
        f"- Durations: iperf3 {s.duration} s{' (first second omitted, -O 1)' if s.duration >= 3 else ''}; "
        f"wrk {s.duration} s (-t{s.wrk_threads} -c{s.wrk_conns}, `Connection: close`); "
        f"idle sessions N = {s.idle_n}" + (" (smoke run)" if s.smoke else ""),
        f"- Bulk and rate cells are the median of {s.repeat} run(s), interleaved across paths (runs under Details); "
        "idle memory is one measurement on a freshly started proxy.",
        "- medlb (splice) is the default configuration; medlb (copy) sets `global: {splice: false}`. "
        "medlb (observed) is medlb (splice) plus the `admin:` API (token file), scraped by the bench "
        f"(`/metrics`, `/api/v1/status`, `/api/v1/history`, one round every {SCRAPE_INTERVAL:g} s) while each of "
        "its tests runs. Ratio columns medlb/direct and medlb/HAProxy use medlb (splice); observed/medlb is "
        "medlb (observed) divided by medlb (splice).",
        f"- medlb-w (splice) is medlb (splice) with `{medlb_global(s.medlb_workers, splice='true')}` "
        f"(`--medlb-workers`): the main process and {s.medlb_workers - 1} worker process(es) accept on the same "
        "ports with SO_REUSEPORT; health checks run in the main process only; its proxy CPU and RSS count all "
        f"{s.medlb_workers} processes. Ratio columns medlb-w/direct and medlb-w/HAProxy divide it by direct "
        "and by HAProxy.",
    ]
    if s.idle_n != s.idle_n_requested:
        lines.append(
            f"- N idle was capped from {s.idle_n_requested} to {s.idle_n}: the hard RLIMIT_NOFILE here is "
            f"{meta['nofile_hard']} (no CAP_SYS_RESOURCE to raise it) and a proxy needs 2 fds per session."
        )
    rows = [
        (
            title,
            [fmt(results[(p, key)], key) for p in ran]
            + [fmt_ratio(ratio(results[(a, key)], results[(b, key)])) for _, a, b in ratios],
        )
        for key, title in METRICS.items()
    ]
    lines += table_lines([*(PATH_TITLES[p] for p in ran), *(title for title, _, _ in ratios)], rows)
    if "medlb-observed" in ran:
        lines += ["", scrape_note(bench)]
    for path in [p for p in MEDLB_PATHS if p in ran] or ["medlb"]:
        lines += target_lines(targets_title(path, s.medlb_workers), targets(results, path))
    rows = [(p, k, bench.cpu.get((p, k)), bench.details.get((p, k), "")) for p in ran for k in METRICS]
    lines += details_lines([(PATH_TITLES[p], METRICS[k], cpu, detail) for p, k, cpu, detail in rows])
    notes = list(bench.notes)
    errors: dict[str, int] = {}
    for x in bench.scrapes:
        if x.error:
            errors[f"{x.endpoint} ({x.test}): {x.error}"] = errors.get(f"{x.endpoint} ({x.test}): {x.error}", 0) + 1
    notes += [f"medlb (observed) scrape failed {n}x: {error}" for error, n in errors.items()]
    lines += notes_lines(notes)
    return "\n".join(lines) + "\n"


def collect_meta() -> dict[str, str]:
    """Machine and tool versions for the header; informative, never fatal."""
    return collect_machine_meta(TOOLS)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = make_parser(
        __doc__,
        "tcp",
        PATHS,
        smoke="1 s tests and 500 idle sessions: proves the harness runs",
        duration="seconds per iperf3 and wrk test (default 10, smoke 1)",
    )
    p.add_argument("--idle", type=int, help="idle sessions (default 10000, smoke 500; capped by the fd limit)")
    p.add_argument(
        "--held-scrapes",
        type=int,
        help="medlb (observed): scrape rounds made with all idle sessions open (default 10, smoke 3)",
    )
    p.add_argument(
        "--haproxy-bulk",
        default="262144,1048576",
        help="HAProxy tune.bufsize,tune.pipesize for the iperf3 tests (pipesize 0 = kernel default)",
    )
    p.add_argument("--haproxy-rate", default="65536,0", help="the same for the wrk and idle-session tests")
    add_medlb_workers_arg(p)
    return parse_common_args(p, argv)


def parse_tuning(text: str) -> tuple[int, int]:
    """``BUFSIZE,PIPESIZE`` -> (bufsize, pipesize)."""
    bufsize, pipesize = (int(x) for x in text.split(","))
    return bufsize, pipesize


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_holder"]:
        return holder_main(argv[1])
    if argv[:1] == ["_idle_client"]:
        return idle_client_main(int(argv[1]), int(argv[2]))
    args = parse_args(argv)
    require_tools(TOOLS)
    paths = parse_paths(args.paths, PATHS)
    on_sigterm_clean_up()
    nofile = raise_nofile()
    requested = args.idle if args.idle is not None else (500 if args.smoke else 10_000)
    idle_n = max(1, min(requested, (nofile - PROXY_FD_MARGIN) // 2))
    settings = Settings(
        duration=args.duration,
        idle_n=idle_n,
        idle_n_requested=requested,
        nginx_workers=args.nginx_workers,
        haproxy_bulk=parse_tuning(args.haproxy_bulk),
        haproxy_rate=parse_tuning(args.haproxy_rate),
        repeat=args.repeat,
        smoke=args.smoke,
        held_scrape_rounds=max(1, args.held_scrapes if args.held_scrapes is not None else (3 if args.smoke else 10)),
        medlb_workers=args.medlb_workers,
    )
    meta = collect_meta()
    out = args.out or REPO / "bench" / "results" / f"{meta['stamp']}-tcp.md"
    bench = Bench(settings)
    results: dict[tuple[str, str], float | None] = {(p, k): float("nan") for p in PATHS for k in METRICS}
    results.update({("direct", "idle_kb"): None})

    def steps() -> None:
        bench.start_nginx()
        bench.measure_traffic(paths, results)
        for path in paths:
            bench.measure_idle(path, results)

    return run_and_report(bench, steps, lambda: render(bench, results, meta, paths), out, results, paths)


if __name__ == "__main__":
    sys.exit(main())
