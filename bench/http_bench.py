#!/usr/bin/env python3
"""HTTP benchmark: the direct path, HAProxy (``mode http``) and medlb (``mode: http``) in one run, on loopback.

medlb is measured twice: as one process (``medlb``) and with ``global.workers: N`` (``medlb-w``: the main
process and N-1 worker processes share the listening ports with SO_REUSEPORT; ``--medlb-workers``, by default
the number of CPUs and at least 2). Its CPU column counts all N processes.

The backend is one nginx serving a small file and a 10 MiB file, with
keep-alive, over plain HTTP and over TLS. Measured per path with wrk (see
``bench/README.md``):

- small responses over keep-alive connections (``-c50``): requests/s, p50, p99;
- 10 MiB responses over keep-alive connections (``-c8``): requests/s, Gbit/s, p50, p99;
- the same small-response test over TLS, terminated by the proxy (by nginx on the direct path);
- new TLS handshakes per second: ``Connection: close`` over https, every request a full handshake.

Every path terminates TLS for the TLS rows (direct: nginx itself); a path left out of
``TLS_PATHS`` would get a cell saying so rather than a made-up number.

Run: ``.venv/bin/python bench/http_bench.py [--smoke] [--out FILE.md] [--duration S] [--medlb-workers N]``.
Only the standard library is used, with the helpers shared with ``tcp_bench.py`` in ``common.py``.
"""

from __future__ import annotations

import argparse
import functools
import http.client
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench/ is not a package: common.py lies next to this file
    sys.path.insert(0, _HERE)
import common  # noqa: E402
from common import HOST, BenchError, Proc  # noqa: E402

#: The path names, in table order.
PATHS = ("direct", "haproxy", "medlb", "medlb-w")
PATH_TITLES = {"direct": "direct", "haproxy": "HAProxy", "medlb": "medlb", "medlb-w": "medlb-w"}
#: The medlb paths: one process, and ``global.workers: N`` (``--medlb-workers``).
MEDLB_PATHS = ("medlb", "medlb-w")
#: Paths that terminate TLS (direct: nginx itself; medlb: a frontend with ``tls: {certificates: [...]}``).
TLS_PATHS = ("direct", "haproxy", "medlb", "medlb-w")
#: What a TLS cell of a path not in TLS_PATHS says instead of a number.
TLS_PENDING = "not measured (the path is not in TLS_PATHS)"
#: Ratio columns: (title, numerator path, denominator path).
RATIOS = (
    ("medlb/direct", "medlb", "direct"),
    ("medlb/HAProxy", "medlb", "haproxy"),
    ("medlb-w/direct", "medlb-w", "direct"),
    ("medlb-w/HAProxy", "medlb-w", "haproxy"),
)
TOOLS = ("haproxy", "wrk", "nginx", "openssl")
#: Far above wrk's connections, and small enough that HAProxy's fd need (2 per connection) fits any hard
#: RLIMIT_NOFILE seen in containers: HAProxy refuses to start when it cannot raise the limit it computed.
HAPROXY_MAXCONN = 4096
#: What both of medlb's frontends have besides name, bind and TLS.
MEDLB_FRONTEND = "maxconn: 30000, default_backend: be"
#: The header's words for medlb's TLS frontend, once it has one.
MEDLB_TLS = "a second frontend with `tls:` (same certificate, `session_tickets: false`)"


@dataclass(frozen=True)
class Test:
    """One wrk test: which file, over TLS or not, a new connection per request or keep-alive."""

    name: str
    title: str
    doc: str  # the file requested: "small" or "large"
    tls: bool = False
    close: bool = False  # Connection: close, so every request is a new connection (and TLS handshake)


TESTS = (
    Test("small", "Small responses, keep-alive", "small"),
    Test("large", "10 MiB responses, keep-alive", "large"),
    Test("tls_small", "TLS, small responses, keep-alive", "small", tls=True),
    Test("tls_new", "TLS, new connection per request", "small", tls=True, close=True),
)
TEST_BY_NAME = {t.name: t for t in TESTS}
#: Table rows: metric key -> (test, row title). Every metric key starts with its test's name.
METRICS = {
    "small_rps": ("small", "Small responses: requests/s"),
    "small_p50": ("small", "Small responses: p50 latency (ms)"),
    "small_p99": ("small", "Small responses: p99 latency (ms)"),
    "large_rps": ("large", "10 MiB responses: requests/s"),
    "large_gbps": ("large", "10 MiB responses: Gbit/s"),
    "large_p50": ("large", "10 MiB responses: p50 latency (ms)"),
    "large_p99": ("large", "10 MiB responses: p99 latency (ms)"),
    "tls_small_rps": ("tls_small", "TLS, small responses: requests/s"),
    "tls_small_p50": ("tls_small", "TLS, small responses: p50 latency (ms)"),
    "tls_small_p99": ("tls_small", "TLS, small responses: p99 latency (ms)"),
    "tls_new_rps": ("tls_new", "TLS, new handshakes/s (Connection: close)"),
}


def metrics_of(test: str) -> list[str]:
    return [key for key, (t, _) in METRICS.items() if t == test]


def applies(path: str, test: str) -> bool:
    """Whether ``path`` runs ``test``: TLS tests only on the paths that terminate TLS."""
    return not TEST_BY_NAME[test].tls or path in TLS_PATHS


@dataclass
class Settings:
    """The knobs of one run (all of them appear in the report's header)."""

    duration: int
    repeat: int = 3
    smoke: bool = False
    wrk_threads: int = 2
    conns: int = 50
    large_conns: int = 8
    nginx_workers: str = "1"
    small_size: int = 100
    large_size: int = 10 * 1024 * 1024
    haproxy_bufsize: int = 16384
    #: ``option splice-auto``: in a short comparison on the reference VM it raised HAProxy's 10 MiB throughput
    #: by ~40% and did not hurt small responses; the bufsize default (16k) beat 64k for small responses.
    haproxy_splice: bool = True
    #: Certificate key: "rsa2048" or "ec256".
    tls_key: str = "rsa2048"
    #: ``global.workers`` of the ``medlb-w`` path (the ``medlb`` path runs one process).
    medlb_workers: int = field(default_factory=common.default_medlb_workers)


class Fetch:
    """A readiness probe: one GET of ``/doc`` (keep-alive, HTTP/1.1) that must give 200 and the whole file.

    ``last`` keeps what the last failing attempt saw, for the error message.
    """

    def __init__(self, port: int, doc: str, size: int, tls: bool) -> None:
        self.port, self.doc, self.size, self.tls = port, doc, size, tls
        self.last = ""

    def __call__(self) -> bool:
        if self.tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE  # the bench's own self-signed certificate
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(HOST, self.port, timeout=10, context=ctx)
        else:
            conn = http.client.HTTPConnection(HOST, self.port, timeout=10)
        try:
            conn.request("GET", f"/{self.doc}")
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self.last = f"{type(exc).__name__}: {exc}"
            return False
        finally:
            conn.close()
        if response.status == 200 and len(body) == self.size:
            return True
        self.last = f"HTTP {response.status} with {len(body)} bytes of body: {body[:200]!r}"
        return False


class Bench(common.BenchBase):
    """Starts nginx and the proxies and takes the measurements; all children die in :meth:`close`."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("medlb-http-bench-")
        self.s = settings
        self.nginx_port = 0
        self.nginx_tls_port = 0
        self.cert = self.tmp / "cert.pem"
        self.key = self.tmp / "key.pem"
        self.cert_and_key = self.tmp / "cert-and-key.pem"  # HAProxy's ``crt`` wants both in one file

    # -- backend

    def make_certificate(self) -> None:
        """A self-signed certificate for 127.0.0.1 with the key type of ``--tls-key``."""
        key = ["-newkey", "rsa:2048"] if self.s.tls_key == "rsa2048" else ["-newkey", "ec"]
        if self.s.tls_key == "ec256":
            key += ["-pkeyopt", "ec_paramgen_curve:prime256v1"]
        cmd = ["openssl", "req", "-x509", *key, "-nodes", "-days", "2", "-subj", "/CN=medlb-bench"]
        cmd += ["-addext", f"subjectAltName=IP:{HOST}", "-keyout", str(self.key), "-out", str(self.cert)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            raise BenchError(f"openssl req failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        self.cert_and_key.write_text(self.cert.read_text() + self.key.read_text())

    def start_nginx(self) -> None:
        """nginx serving ``small`` and ``large`` from files, plain and TLS, keep-alive, no session resumption.

        TLS session cache and tickets are off so that each new connection of
        the handshake test is a full handshake; the proxies are set up alike.
        """
        docroot = self.tmp / "docroot"
        docroot.mkdir()
        (docroot / "small").write_bytes(b"x" * (self.s.small_size - 1) + b"\n")
        with open(docroot / "large", "wb") as f:
            f.write(os.urandom(self.s.large_size))
        # nginx's worker runs as nobody when started by root: let it reach the files, and nothing else.
        os.chmod(self.tmp, 0o711)
        os.chmod(docroot, 0o755)
        for name in ("small", "large"):
            os.chmod(docroot / name, 0o644)
        self.nginx_port, self.nginx_tls_port = common.free_port(), common.free_port()
        http_extra = """  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 300s;
  ssl_protocols TLSv1.2 TLSv1.3;
  ssl_session_cache off;
  ssl_session_tickets off;"""
        server = f"""  server {{
    listen {HOST}:{self.nginx_port} backlog=4096;
    listen {HOST}:{self.nginx_tls_port} ssl backlog=4096;
    ssl_certificate {self.cert};
    ssl_certificate_key {self.key};
    root {docroot};
    default_type application/octet-stream;
  }}"""
        proc = common.start_nginx(self.children, self.tmp / "nginx", self.s.nginx_workers, server, http_extra)
        for port in (self.nginx_port, self.nginx_tls_port):
            common.wait_port(port, 10, proc.popen)
        probes = [Fetch(self.nginx_port, "small", self.s.small_size, False)]
        probes.append(Fetch(self.nginx_tls_port, "small", self.s.small_size, True))
        for probe in probes:
            if not probe():
                raise BenchError(f"nginx does not serve the test files: {probe.last}; log:\n{proc.log_tail()}")

    # -- proxies

    def haproxy_config(self, port: int, tls_port: int) -> str:
        """``mode http`` in HAProxy's fastest shape: keep-alive both sides, connection reuse, no checks or logs.

        TLS: ``bind ... ssl crt``, no session cache (``tune.ssl.cachesize 0``) and no tickets, like nginx.
        """
        lines = [
            "global",
            f"  maxconn {HAPROXY_MAXCONN}",
            f"  tune.bufsize {self.s.haproxy_bufsize}",
            "  tune.ssl.cachesize 0",
            "  tune.ssl.default-dh-param 2048",
            "  ssl-default-bind-options ssl-min-ver TLSv1.2",
            "defaults",
            "  mode http",
            "  option http-keep-alive",
            "  http-reuse always",
            *(["  option splice-auto"] if self.s.haproxy_splice else []),
            "  timeout connect 3s",
            "  timeout client 1h",
            "  timeout server 1h",
            "  timeout queue 30s",
            "  timeout http-request 10s",
            "  timeout http-keep-alive 60s",
            f"  maxconn {HAPROXY_MAXCONN}",
            "frontend fe_plain",
            f"  bind {HOST}:{port}",
            "  default_backend be",
            "frontend fe_tls",
            f"  bind {HOST}:{tls_port} ssl crt {self.cert_and_key} no-tls-tickets",
            "  default_backend be",
            "backend be",
            f"  server s1 {HOST}:{self.nginx_port}",
        ]
        return "\n".join(lines) + "\n"

    def medlb_config(self, port: int, tls_port: int | None, workers: int = 1) -> str:
        """medlb YAML in the documented format, defaults for ``http:``; the TCP check brings the server UP.

        ``tls_port`` adds a TLS frontend (only once "medlb" is in TLS_PATHS): ``tls:`` with the bench's
        certificate and, like nginx and HAProxy here, no session tickets (full handshakes). ``workers`` > 1
        sets ``global.workers`` (the ``medlb-w`` path).
        """
        frontends = [f'{{name: fe_plain, mode: http, bind: ["{HOST}:{port}"], {MEDLB_FRONTEND}}}']
        if tls_port is not None:
            tls = f'{{certificates: [{{cert: "{self.cert}", key: "{self.key}"}}], session_tickets: false}}'
            frontends.append(f'{{name: fe_tls, mode: http, bind: ["{HOST}:{tls_port}"], tls: {tls}, {MEDLB_FRONTEND}}}')
        out = [
            common.medlb_global(workers),
            "defaults:",
            "  timeouts: {connect: 3s, client: 1h, server: 1h, queue: 30s, check: 2s}",
            "  check: {inter: 2s}",
            "frontends:",
            *(f"  - {f}" for f in frontends),
            "backends:",
            "  - name: be",
            "    balance: roundrobin",
            "    check: {type: tcp}",
            "    servers:",
            f'      - {{name: s1, address: "{HOST}:{self.nginx_port}"}}',
        ]
        return "\n".join(out) + "\n"

    def start_proxy(self, path: str) -> tuple[Proc | None, int, int | None]:
        """Start ``path``'s proxy with a plain and (if it does TLS) a TLS frontend; return it and their ports.

        Ready means every file comes back whole through every frontend.
        """
        if path == "direct":
            return None, self.nginx_port, self.nginx_tls_port
        port = common.free_port()
        tls_port = common.free_port() if path in TLS_PATHS else None
        cfg = self.tmp / f"{path}.cfg"
        workers = self.s.medlb_workers if path == "medlb-w" else 1
        if path == "haproxy":
            assert tls_port is not None
            cfg.write_text(self.haproxy_config(port, tls_port))
            proc = self.children.start("haproxy", ["haproxy", "-f", str(cfg), "-db"])
        else:
            cfg.write_text(self.medlb_config(port, tls_port, workers))
            proc = common.start_medlb(self.children, self.medlb, path, cfg)
        probes = [Fetch(port, "small", self.s.small_size, False), Fetch(port, "large", self.s.large_size, False)]
        if tls_port is not None:
            probes.append(Fetch(tls_port, "small", self.s.small_size, True))
        try:
            common.wait_ready(
                self.children,
                proc,
                [port] if tls_port is None else [port, tls_port],
                [(f"{path}: GET /{p.doc}{' over TLS' if p.tls else ''}", p) for p in probes],
                then=functools.partial(common.wait_processes, proc, workers) if path == "medlb-w" else None,
            )
        except BenchError as exc:
            last = "; ".join(f"/{p.doc}{' (TLS)' if p.tls else ''}: {p.last}" for p in probes if p.last)
            raise BenchError(f"{exc}\nlast probe answers: {last}" if last else str(exc)) from exc
        return proc, port, tls_port

    # -- measurements

    def wrk(self, test: Test, port: int, proxy: Proc | None) -> tuple[dict[str, float], str]:
        """One wrk run of ``test``: its metrics and wrk's error summary.

        Any non-2xx/3xx response, or a proxy that is gone afterwards, fails the
        measurement: a fast error page is not throughput.
        """
        conns = self.s.large_conns if test.doc == "large" else self.s.conns
        args = [f"-t{self.s.wrk_threads}", f"-c{conns}", f"-d{self.s.duration}s", "--latency"]
        if test.close:
            args += ["-H", "Connection: close"]
        args.append(f"{'https' if test.tls else 'http'}://{HOST}:{port}/{test.doc}")
        result = common.run_wrk(args, self.s.duration)
        if proxy is not None and proxy.popen.poll() is not None:
            raise BenchError(f"the proxy exited with {proxy.popen.returncode} during the run ({result.errors()})")
        if result.non_2xx:
            raise BenchError(f"{result.non_2xx} of {result.requests} responses were not 2xx/3xx ({result.errors()})")
        if result.requests == 0:
            raise BenchError(f"no request completed ({result.errors()})")
        values = {f"{test.name}_rps": result.requests_per_s}
        if not test.close:
            for pct in ("50", "99"):
                if pct not in result.latency_ms:
                    raise BenchError(f"wrk printed no {pct}% latency")
                values[f"{test.name}_p{pct}"] = result.latency_ms[pct]
        if test.doc == "large":
            values[f"{test.name}_gbps"] = result.bytes_per_s * 8 / 1e9
        return values, result.errors()

    def measure(self, paths: list[str], results: dict[tuple[str, str], float | None]) -> None:
        """Start every path's proxy, then run all tests interleaved across the paths (``run_interleaved``)."""
        with self.children.scope():
            plans: dict[str, common.Plan] = {}
            proxies: dict[str, Proc | None] = {}
            #: Lines in each proxy's log once it was ready: later ones (medlb logs warnings and errors only) go
            #: into Notes, start-up chatter such as a server going UP does not.
            ready_lines: dict[str, int] = {}
            for path in paths:
                try:
                    proxy, port, tls_port = self.start_proxy(path)
                except BenchError as exc:
                    self._fail(path, [t.name for t in TESTS if applies(path, t.name)], exc, results)
                    continue
                proxies[path] = proxy
                if proxy is not None:
                    ready_lines[path] = len(proxy.log_lines())
                plans[path] = [
                    (test.name, proxy, functools.partial(self.wrk, test, tls_port if test.tls else port, proxy))
                    for test in TESTS
                    if applies(path, test.name) and (tls_port if test.tls else port) is not None
                ]

            def show(path: str, test: str, sample: common.Sample) -> None:
                shown = ", ".join(f"{key.removeprefix(test + '_')} {fmt(v, key)}" for key, v in sample.values.items())
                print(f"  {PATH_TITLES[path]:8} {TEST_BY_NAME[test].title:36} {shown}  errors: {sample.summary}")

            def fail(path: str, test: str, exc: BenchError) -> None:
                proxy = proxies.get(path)
                tail = f"\nproxy output:\n{proxy.log_tail()}" if proxy is not None else ""
                self._fail(path, [test], BenchError(f"{exc}{tail}"), results)

            samples = common.run_interleaved(self.s.repeat, plans, show, fail)
            common.note_proxy_logs(self.notes, proxies, ready_lines, PATH_TITLES)
            for (path, test), runs in samples.items():
                values, cpu = common.medians(runs)
                for key, value in values.items():
                    results[(path, key)] = value
                if cpu is not None:
                    self.cpu[(path, test)] = cpu
                parts = [
                    f"{key.removeprefix(test + '_')} " + ", ".join(fmt(r.values[key], key) for r in runs)
                    for key in values
                ]
                self.details[(path, test)] = (
                    "runs: " + "; ".join(parts) + " — wrk errors: " + ", ".join(r.summary for r in runs)
                )
                bad = [f"run {i + 1}: {r.summary}" for i, r in enumerate(runs) if r.summary != "0"]
                if bad:
                    self.notes.append(
                        f"{PATH_TITLES[path]} / {TEST_BY_NAME[test].title}: wrk errors in {'; '.join(bad)}"
                    )

    def _fail(self, path: str, tests: list[str], exc: Exception, results: dict[tuple[str, str], float | None]) -> None:
        for test in tests:
            for key in metrics_of(test):
                results[(path, key)] = float("nan")
        self.note_failure(f"{PATH_TITLES[path]} / {'; '.join(TEST_BY_NAME[t].title for t in tests)}: FAILED: {exc}")


# --------------------------------------------------------------------------- report


def fmt(value: float | None, key: str) -> str:
    """Requests/s whole (one decimal below 100), Gbit/s with two decimals, milliseconds with two below 100."""

    def number(v: float) -> str:
        if key.endswith("_rps"):
            return f"{v:.0f}" if v >= 100 else f"{v:.1f}"
        if key.endswith("_gbps"):
            return f"{v:.2f}"
        return f"{v:.2f}" if v < 100 else f"{v:.0f}"

    return common.fmt_value(value, number)


def cell(results: dict[tuple[str, str], float | None], path: str, key: str) -> str:
    """A table cell: the number, or why there is none."""
    if not applies(path, METRICS[key][0]):
        return TLS_PENDING
    return fmt(results[(path, key)], key)


def targets(results: dict[tuple[str, str], float | None], path: str = "medlb") -> list[tuple[str, str, bool | None]]:
    """The issue's targets for ``path`` (one of MEDLB_PATHS) against HAProxy: (target, measured, met).

    p99 is judged for both the small and the 10 MiB test; the TLS variants join once the path does TLS.
    """
    t = common.Targets()

    def r(key: str) -> float | None:
        return common.ratio(results[(path, key)], results[("haproxy", key)])

    for prefix, over in [("", "")] + ([("tls_", " over TLS")] if path in TLS_PATHS else []):
        t.add_ratio(f"Small-response throughput{over} >= 0.8x HAProxy", r(f"{prefix}small_rps"), lambda v: v >= 0.8)
        if not prefix:
            t.add_ratio("10 MiB-response throughput >= 1.0x HAProxy", r("large_rps"), lambda v: v >= 1.0)
        t.add_ratio(f"Small responses{over}: p99 latency <= 2x HAProxy's", r(f"{prefix}small_p99"), lambda v: v <= 2)
        if not prefix:
            t.add_ratio("10 MiB responses: p99 latency <= 2x HAProxy's", r("large_p99"), lambda v: v <= 2)
    return t.items


def medlb_title(path: str, workers: int) -> str:
    """How the Targets sections name a medlb path: its column title and how many processes it runs."""
    if path == "medlb":
        return f"{PATH_TITLES[path]} (1 process)"
    return f"{PATH_TITLES[path]} (`global.workers: {workers}`, {workers} processes)"


def render(bench: Bench, results: dict[tuple[str, str], float | None], meta: dict[str, str], paths: list[str]) -> str:
    """Header, the table (a column per path that ran, a ratio column when both its paths ran), targets, details."""
    s = bench.s
    ran = [p for p in PATHS if p in paths]
    ratios = [(title, a, b) for title, a, b in RATIOS if a in ran and b in ran]
    key_type = "RSA 2048" if s.tls_key == "rsa2048" else "ECDSA P-256"
    lines = [
        f"# HTTP benchmark: direct vs HAProxy vs medlb (1 process) vs medlb-w ({s.medlb_workers} processes) "
        f"({meta['date']})",
        "",
        *common.machine_lines(meta),
        f"- HAProxy: {meta['haproxy']} — `mode http`, `option http-keep-alive`, `http-reuse always`, "
        f"nbthread left at default ({meta['haproxy_threads']} here), `tune.bufsize {s.haproxy_bufsize}`, "
        + ("`option splice-auto`, " if s.haproxy_splice else "")
        + "no `option forwardfor`, no checks, no logging, `haproxy -f cfg -db`; TLS: `bind ... ssl crt` "
        "(TLS 1.2+, `tune.ssl.cachesize 0`, `no-tls-tickets`)",
        "- medlb: one `mode: http` frontend per protocol with the default `http:` settings (it adds "
        "X-Forwarded-For/-Proto/-Host; HAProxy adds nothing), pooled keep-alive connections to nginx, one TCP "
        "health check every 2 s, `medlb run --no-session-log --log-level warning`, `global: {nofile: 200000}` "
        f"(one process). TLS: {TLS_PENDING if 'medlb' not in TLS_PATHS else MEDLB_TLS}",
        f"- medlb-w: the same medlb configuration with `global: {{nofile: 200000, workers: {s.medlb_workers}}}` "
        f"(`--medlb-workers`): the main process and {s.medlb_workers - 1} worker process(es) accept on the same "
        "ports with SO_REUSEPORT; health checks run in the main process only; its Proxy CPU counts all "
        f"{s.medlb_workers} processes. TLS: {TLS_PENDING if 'medlb-w' not in TLS_PATHS else MEDLB_TLS}",
        f"- nginx: {meta['nginx']} (worker_processes {s.nginx_workers}), static files of {s.small_size} B and "
        f"{s.large_size} B with `sendfile on`, `keepalive_requests 1000000`, `access_log off`; the same nginx "
        "listens for TLS (the direct TLS path)",
        f"- TLS: self-signed {key_type} certificate ({meta['openssl'].split(' (')[0]}); session cache and "
        "tickets off at every TLS endpoint, so each new connection is a full handshake",
        f"- wrk: {meta['wrk']}; {s.duration} s per run, `-t{s.wrk_threads} --latency`; small responses "
        f"`-c{s.conns}`, 10 MiB responses `-c{s.large_conns}`, new TLS handshakes `-c{s.conns} "
        '-H "Connection: close"` over https' + (" (smoke run)" if s.smoke else ""),
        f"- Cells are the median of {s.repeat} run(s) per metric, interleaved across paths (runs under Details); "
        "latencies are wrk's 50% and 99% lines. Ratio columns are medlb and medlb-w divided by direct and by HAProxy: "
        "higher is better for requests/s and Gbit/s, lower is better for latency.",
    ]
    table = [
        (
            title,
            [cell(results, p, key) for p in ran]
            + [common.fmt_ratio(common.ratio(results[(a, key)], results[(b, key)])) for _, a, b in ratios],
        )
        for key, (_, title) in METRICS.items()
    ]
    lines += common.table_lines([*(PATH_TITLES[p] for p in ran), *(title for title, _, _ in ratios)], table)
    for path in [p for p in MEDLB_PATHS if p in ran] or ["medlb"]:
        who = medlb_title(path, s.medlb_workers)
        lines += common.target_lines(f"Targets: {who} against HAProxy, computed from the table", targets(results, path))
        if path not in TLS_PATHS:
            lines.append(f"- TLS targets for {who}: {TLS_PENDING}.")
    rows = [(p, t.name, bench.cpu.get((p, t.name)), bench.details.get((p, t.name), "")) for p in ran for t in TESTS]
    lines += common.details_lines([(PATH_TITLES[p], TEST_BY_NAME[t].title, cpu, detail) for p, t, cpu, detail in rows])
    lines += common.notes_lines(bench.notes)
    return "\n".join(lines) + "\n"


def collect_meta() -> dict[str, str]:
    """Machine and tool versions for the header; informative, never fatal."""
    return common.collect_meta(TOOLS)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = common.make_parser(
        __doc__,
        "http",
        PATHS,
        smoke="1 s runs, one repetition: proves the harness runs",
        duration="seconds per wrk run",
    )
    p.add_argument("--conns", type=int, default=50, help="wrk connections for small responses (default 50)")
    p.add_argument("--large-conns", type=int, default=8, help="wrk connections for 10 MiB responses (default 8)")
    p.add_argument("--haproxy-bufsize", type=int, default=16384, help="HAProxy tune.bufsize (default 16384)")
    p.add_argument(
        "--haproxy-splice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HAProxy option splice-auto (default on)",
    )
    p.add_argument("--tls-key", choices=("rsa2048", "ec256"), default="rsa2048", help="certificate key type")
    common.add_medlb_workers_arg(p)
    return common.parse_common_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.require_tools(TOOLS)
    paths = common.parse_paths(args.paths, PATHS)
    common.on_sigterm_clean_up()
    common.raise_nofile()
    settings = Settings(
        duration=args.duration,
        repeat=args.repeat,
        smoke=args.smoke,
        conns=args.conns,
        large_conns=args.large_conns,
        nginx_workers=args.nginx_workers,
        haproxy_bufsize=args.haproxy_bufsize,
        haproxy_splice=args.haproxy_splice,
        tls_key=args.tls_key,
        medlb_workers=args.medlb_workers,
    )
    meta = collect_meta()
    out = args.out or common.REPO / "bench" / "results" / f"{meta['stamp']}-http.md"
    bench = Bench(settings)
    results: dict[tuple[str, str], float | None] = {
        (p, k): float("nan") if applies(p, t) else None for p in PATHS for k, (t, _) in METRICS.items()
    }

    def steps() -> None:
        bench.make_certificate()
        bench.start_nginx()
        bench.measure(paths, results)

    return common.run_and_report(bench, steps, lambda: render(bench, results, meta, paths), out, results, paths)


if __name__ == "__main__":
    sys.exit(main())
