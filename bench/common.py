"""What the benchmark scripts of ``bench/`` share: child processes, ports, readiness, CPU/RSS readings, the report.

``tcp_bench.py`` and ``http_bench.py`` import this module from their own
directory (``bench/`` is not a package). Only the standard library is used, so
the scripts run under any Python that can also run medlb.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TypeVar

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class BenchError(RuntimeError):
    """A measurement could not be taken; the message says what was seen."""


# --------------------------------------------------------------------------- ports and readiness


def free_port() -> int:
    """A currently free loopback port; the tiny race with other programs is acceptable on a bench box."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def raise_nofile() -> int:
    """Raise our soft RLIMIT_NOFILE to the hard limit; children inherit it (10,000 sessions need ~20,000 fds).

    The hard limit itself can only grow with CAP_SYS_RESOURCE, which containers often drop; the
    idle-session count is then capped to what fits (see ``tcp_bench.main``).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1_048_576
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    except (ValueError, OSError):
        return soft
    return want


def wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Wait until ``port`` accepts a TCP connection (and fail fast if the process behind it died)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"process exited with {proc.returncode} before port {port} opened")
        with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"port {port} did not open within {timeout:.0f} s")


def retry_until(what: str, probe: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes] | None) -> None:
    """Call ``probe`` until it returns True; readiness through a proxy is only known end to end."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BenchError(f"proxy exited with {proc.returncode} while waiting for {what}")
        try:
            if probe():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise BenchError(f"{what}: not ready within {timeout:.0f} s")


def probe_http(port: int) -> bool:
    """One HTTP/1.0 GET; True when a 200 came back (nginx reached through the proxy)."""
    with socket.create_connection((HOST, port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while len(data) < 12:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        return data.startswith(b"HTTP/1.1 200") or data.startswith(b"HTTP/1.0 200")


# --------------------------------------------------------------------------- readings of /proc and versions


def proc_group_pids(pgid: int) -> list[int]:
    """Every live process of a process group and every descendant of its leader (pid ``pgid``).

    HAProxy and nginx could fork, and medlb with ``global.workers: N`` runs N-1 worker processes as
    children of its main process: they are part of what the proxy costs. Descendants count even if one
    ever left the group (``setsid``), so a proxy's CPU and RSS always cover all its processes.
    """
    group: list[int] = []
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()  # fields[0] is the state, [1] the ppid, [2] the pgrp
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)
        if int(fields[2]) == pgid:
            group.append(pid)
    pids = set(group)
    todo = [pgid, *group]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in pids:
                pids.add(child)
                todo.append(child)
    return sorted(pids)


def rss_kb(pgid: int) -> int:
    """Sum of VmRSS (kB) over the process group; threads share one mm, so each process counts once."""
    total = 0
    for pid in proc_group_pids(pgid):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        if m:
            total += int(m.group(1))
    return total


def cpu_seconds(pgid: int) -> float:
    """CPU time of a proxy's processes (``proc_group_pids``), to show how many cores it burnt for a result.

    Per process utime+stime, plus cutime+cstime: the time of its children that exited and were waited for
    (a medlb worker that died and was restarted during a run), which a live process's own times no longer show.
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in proc_group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return total / ticks


def with_cpu(proxy: Proc | None, measure: Callable[[], T]) -> tuple[T, float | None]:
    """Run ``measure``; return its result and the proxy's CPU use meanwhile in cores (None without a proxy)."""
    cpu0 = cpu_seconds(proxy.pgid) if proxy else 0.0
    t0 = time.monotonic()
    value = measure()
    if proxy is None:
        return value, None
    return value, (cpu_seconds(proxy.pgid) - cpu0) / (time.monotonic() - t0)


def first_line(cmd: list[str]) -> str:
    """First non-empty output line of a version command, or 'unknown' (only informative)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    for line in (out.stdout + out.stderr).splitlines():
        if line.strip():
            return line.strip()
    return "unknown"


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


#: How a tool tells its version, when not with ``-v``.
VERSION_ARGS = {"openssl": ["version"]}


def collect_meta(tools: Sequence[str]) -> dict[str, str]:
    """Machine facts and each tool's version line, for the header; informative, never fatal."""
    now = dt.datetime.now(dt.UTC)
    haproxy_threads = str(os.cpu_count() or "?")  # HAProxy 2.6 defaults nbthread to the CPUs it may run on
    with contextlib.suppress(AttributeError):
        haproxy_threads = str(len(os.sched_getaffinity(0)))
    medlb_version = "unknown"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        medlb_version = version("medlb")
    return {
        "date": now.strftime("%Y-%m-%d"),
        "stamp": now.strftime("%Y-%m-%d-%H%M"),
        "datetime": now.strftime("%Y-%m-%d %H:%M:%S UTC"),
        "host": platform.node(),
        "cpu": cpu_model(),
        "nproc": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "medlb": medlb_version,
        "haproxy_threads": haproxy_threads,
        "nofile_hard": str(resource.getrlimit(resource.RLIMIT_NOFILE)[1]),
        **{tool: first_line([tool, *VERSION_ARGS.get(tool, ["-v"])]) for tool in tools},
    }


def machine_lines(meta: dict[str, str]) -> list[str]:
    """The first header lines of every report: when, on what, with which Python and medlb."""
    return [
        f"- Date (UTC): {meta['datetime']}",
        f"- Machine: {meta['host']}; CPU: {meta['cpu']}; nproc: {meta['nproc']}; kernel: {meta['kernel']}",
        f"- Python: {meta['python']}; medlb: {meta['medlb']}",
    ]


# --------------------------------------------------------------------------- process management


@dataclass
class Proc:
    """A child in its own process group, so it and anything it forks can be killed together."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None
    #: Base URL of medlb's admin API (``tcp_bench``'s ``medlb-observed`` only).
    admin_url: str | None = None

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def log_lines(self) -> list[str]:
        """The child's output so far (none when it goes to a pipe)."""
        if self.log_path is None or not self.log_path.exists():
            return []
        return self.log_path.read_text(errors="replace").splitlines()

    def log_tail(self, lines: int = 15) -> str:
        """Last lines of the child's output, for failure reports."""
        return "\n".join(self.log_lines()[-lines:])


@dataclass
class Children:
    """Owns every child process; ``close`` kills them all, whatever happened before."""

    workdir: Path
    procs: list[Proc] = field(default_factory=list)

    def start(
        self, name: str, cmd: list[str], *, stdin: int | None = subprocess.DEVNULL, stdout_pipe: bool = False
    ) -> Proc:
        """Start ``cmd`` in a new session; output goes to a log file in the work dir unless piped."""
        log_path = self.workdir / f"{name}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                cmd,
                stdin=stdin,
                stdout=subprocess.PIPE if stdout_pipe else log,
                stderr=log,
                start_new_session=True,
                cwd=self.workdir,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 5.0) -> None:
        """SIGTERM the group, then SIGKILL; ``haproxy -db``, nginx and medlb all stop on SIGTERM."""
        if proc not in self.procs:
            return
        self.procs.remove(proc)
        _kill_group(proc.popen, timeout)

    @contextlib.contextmanager
    def scope(self) -> Iterator[None]:
        """Stop, on leaving the block, every child started inside it (the others keep running)."""
        before = set(map(id, self.procs))
        try:
            yield
        finally:
            for proc in [p for p in self.procs if id(p) not in before]:
                self.stop(proc)

    def close(self) -> None:
        """Kill every remaining child (reverse start order: clients before proxies before backends)."""
        while self.procs:
            proc = self.procs.pop()
            _kill_group(proc.popen, 3.0)


def _kill_group(popen: subprocess.Popen[bytes], timeout: float) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, sig)
        try:
            popen.wait(timeout)
            break
        except subprocess.TimeoutExpired:
            continue
    for stream in (popen.stdin, popen.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
    # A grandchild could outlive the leader; the group id stays valid while any member lives.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(popen.pid, signal.SIGKILL)


def read_line(stream: IO[bytes], timeout: float, proc: subprocess.Popen[bytes]) -> str:
    """One line from a child's stdout with a deadline (helpers announce ports and progress this way)."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"no output from helper within {timeout:.0f} s (exit code {proc.poll()})")
        line = stream.readline()
    finally:
        sel.close()
    if not line:
        raise BenchError(f"helper exited with {proc.wait()} without output")
    return line.decode().strip()


# --------------------------------------------------------------------------- the programs under test


def medlb_binary() -> str:
    """medlb from the repository's venv, else from PATH."""
    medlb = REPO / ".venv" / "bin" / "medlb"
    return str(medlb) if medlb.exists() else (shutil.which("medlb") or "medlb")


class BenchBase:
    """What every bench has: a temporary directory, its children, notes, and CPU use and details per cell."""

    def __init__(self, prefix: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=prefix))
        self.children = Children(self.tmp)
        self.medlb = medlb_binary()
        self.notes: list[str] = []
        #: (path, test) -> the proxy's median CPU use in cores, and the per-run detail line.
        self.cpu: dict[tuple[str, str], float] = {}
        self.details: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        """Kill every child and remove the temporary directory."""
        self.children.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def note_failure(self, msg: str) -> None:
        """A failed measurement: into *Notes* and onto stderr at once."""
        self.notes.append(msg)
        print("  " + msg, file=sys.stderr, flush=True)


def start_medlb(children: Children, medlb: str, name: str, cfg: Path) -> Proc:
    """``medlb check`` the config (its message is the error), then ``medlb run`` it without session logs."""
    check = subprocess.run([medlb, "check", "-c", str(cfg)], capture_output=True, text=True)
    if check.returncode != 0:
        raise BenchError(f"medlb check failed ({check.returncode}): {check.stderr.strip() or check.stdout}")
    return children.start(name, [medlb, "run", "-c", str(cfg), "--no-session-log", "--log-level", "warning"])


#: ``global.workers`` of medlb allows 1 to 64; the benches' ``medlb-w`` paths run at least 2 (1 is ``medlb``).
MEDLB_WORKERS_RANGE = (2, 64)


def default_medlb_workers() -> int:
    """``--medlb-workers`` by default: one process per CPU, and at least 2 (1 would be the ``medlb`` path)."""
    return max(MEDLB_WORKERS_RANGE[0], os.cpu_count() or 1)


def add_medlb_workers_arg(p: argparse.ArgumentParser) -> None:
    """``--medlb-workers N``: ``global.workers`` of a bench's ``medlb-w`` path (checked by ``parse_common_args``)."""
    low, high = MEDLB_WORKERS_RANGE
    p.add_argument(
        "--medlb-workers",
        type=int,
        default=default_medlb_workers(),
        help=f"global.workers of the medlb-w path, {low} to {high} (default: the number of CPUs, at least {low})",
    )


def medlb_global(workers: int = 1, **settings: str) -> str:
    """medlb's ``global:`` line as the benches write it: ``nofile``, then ``settings``, then ``workers`` if > 1."""
    items = {"nofile": "200000", **settings, **({"workers": str(workers)} if workers > 1 else {})}
    return "global: {" + ", ".join(f"{k}: {v}" for k, v in items.items()) + "}"


def wait_processes(proc: Proc, want: int, timeout: float = 20.0) -> None:
    """Wait until medlb runs ``want`` processes (main and workers, ``proc_group_pids``), so that no measurement
    starts short of a worker; a medlb that ignores ``global.workers`` fails here instead of passing as one process."""
    deadline = time.monotonic() + timeout
    while (have := len(proc_group_pids(proc.pgid))) < want:
        if proc.popen.poll() is not None:
            raise BenchError(f"medlb exited with {proc.popen.returncode} while its workers started")
        if time.monotonic() > deadline:
            raise BenchError(f"medlb runs {have} process(es) after {timeout:.0f} s, want {want} (global.workers)")
        time.sleep(0.1)


def wait_ready(
    children: Children,
    proc: Proc,
    ports: Sequence[int],
    probes: Sequence[tuple[str, Callable[[], bool]]],
    then: Callable[[], None] | None = None,
) -> None:
    """Wait for a started proxy: its ports open, then every ``(what, probe)`` passes end to end, then ``then``.

    medlb's servers start DOWN until their first health check, so an open port is not enough. On failure
    the proxy is stopped and its last log lines are part of the error.
    """
    try:
        for port in ports:
            wait_port(port, 20, proc.popen)
        for what, probe in probes:
            retry_until(what, probe, 20, proc.popen)
        if then is not None:
            then()
    except BenchError as exc:
        tail = proc.log_tail()
        children.stop(proc)
        raise BenchError(f"{exc}; proxy output:\n{tail}") from exc


def start_nginx(children: Children, ndir: Path, workers: str, servers: str, http_extra: str = "") -> Proc:
    """nginx in the foreground with its config, pid, logs and temp files under ``ndir`` (created here).

    ``servers`` is the ``server { ... }`` blocks (their ports are the caller's to wait for); ``http_extra``
    goes into the ``http`` block before them. No access log: it would cost nginx more than the proxies.
    """
    ndir.mkdir()
    temp_paths = "\n".join(
        f"  {kind}_temp_path {ndir / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    cfg = ndir / "nginx.conf"
    cfg.write_text(
        f"""daemon off;
worker_processes {workers};
worker_rlimit_nofile 20000;
pid {ndir / "nginx.pid"};
error_log {ndir / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
{temp_paths}
{http_extra}
{servers}
}}
"""
    )
    return children.start("nginx", ["nginx", "-p", str(ndir), "-e", str(ndir / "error.log"), "-c", str(cfg)])


# --------------------------------------------------------------------------- wrk

_TIME_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
_BINARY_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


@dataclass
class WrkResult:
    """What one wrk run printed: rate, bytes, the latency distribution and the error counts."""

    requests_per_s: float
    bytes_per_s: float
    requests: int
    #: Percentile ("50", "99", ...) -> milliseconds; only with ``--latency``.
    latency_ms: dict[str, float]
    #: connect, read, write, timeout (all 0 when wrk printed no "Socket errors" line).
    socket_errors: tuple[int, int, int, int]
    non_2xx: int

    def errors(self) -> str:
        """``0``, or what went wrong: ``connect/read/write/timeout 0/3/0/0 non-2xx 12``."""
        parts = []
        if any(self.socket_errors):
            parts.append(f"connect/read/write/timeout {'/'.join(map(str, self.socket_errors))}")
        if self.non_2xx:
            parts.append(f"non-2xx {self.non_2xx}")
        return " ".join(parts) or "0"


def parse_wrk(text: str) -> WrkResult:
    """Parse wrk 4's report; a missing ``Requests/sec`` line is an error with wrk's output in it."""
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    t = re.search(r"^Transfer/sec:\s+([\d.]+)([KMGTP]?)B", text, re.M)
    n = re.search(r"^\s*(\d+) requests in ", text, re.M)
    if not (m and t and n):
        raise BenchError(f"unexpected wrk output: {text.strip()[-500:]}")
    latency = {
        pct: float(value) * _TIME_UNITS[unit]
        for pct, value, unit in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M)
    }
    sm = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = (0, 0, 0, 0) if sm is None else tuple(int(x) for x in sm.groups())
    nm = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests_per_s=float(m.group(1)),
        bytes_per_s=float(t.group(1)) * _BINARY_UNITS[t.group(2)],
        requests=int(n.group(1)),
        latency_ms=latency,
        socket_errors=socket_errors,  # type: ignore[arg-type]
        non_2xx=int(nm.group(1)) if nm else 0,
    )


def run_wrk(args: list[str], duration: int) -> WrkResult:
    """Run ``wrk ARGS`` and parse it; a non-zero exit or an unparsable report raises BenchError."""
    out = subprocess.run(["wrk", *args], capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise BenchError(f"wrk failed ({out.returncode}): {(out.stdout + out.stderr).strip()[-300:]}")
    return parse_wrk(out.stdout)


# --------------------------------------------------------------------------- interleaved measurements


@dataclass
class Sample:
    """One run of one test on one path: its numbers per metric key, the proxy's CPU use, a summary for Details."""

    values: dict[str, float]
    cpu: float | None
    summary: str = ""


#: A test as a path runs it: (test name, the proxy measured or None for direct, the measurement).
#: The measurement returns its numbers per metric key and a summary (wrk's error counts, say), or raises BenchError.
Plan = list[tuple[str, Proc | None, Callable[[], tuple[dict[str, float], str]]]]


def run_interleaved(
    repeat: int,
    plans: dict[str, Plan],
    on_sample: Callable[[str, str, Sample], None],
    on_fail: Callable[[str, str, BenchError], None],
    around: Callable[[str, str, Proc | None], contextlib.AbstractContextManager[object]] | None = None,
) -> dict[tuple[str, str], list[Sample]]:
    """Run every path's tests ``repeat`` times, each repetition visiting every path in turn.

    Loopback numbers on a small VM drift by tens of percent from one minute to
    the next; interleaving makes a drift hit all paths alike instead of one.
    A test that fails once (BenchError) is reported through ``on_fail`` and not
    run again on that path; ``around(path, test, proxy)`` wraps each run (the
    admin-API scraper of tcp_bench). Returns the samples per (path, test).
    """
    samples: dict[tuple[str, str], list[Sample]] = {}
    failed: set[tuple[str, str]] = set()
    for rep in range(repeat):
        print(f"== repetition {rep + 1}/{repeat}", flush=True)
        for path, plan in plans.items():
            for test, proxy, measure in plan:
                if (path, test) in failed:
                    continue
                try:
                    with around(path, test, proxy) if around else contextlib.nullcontext():
                        (values, summary), cpu = with_cpu(proxy, measure)
                except BenchError as exc:
                    failed.add((path, test))
                    samples.pop((path, test), None)
                    on_fail(path, test, exc)
                    continue
                sample = Sample(values, cpu, summary)
                samples.setdefault((path, test), []).append(sample)
                on_sample(path, test, sample)
                time.sleep(0.5)  # let TIME_WAIT churn and softirq backlog settle between runs
    return samples


def medians(samples: list[Sample]) -> tuple[dict[str, float], float | None]:
    """Per metric key the median over the runs, and the median CPU use (None for direct)."""
    keys = samples[0].values if samples else {}
    values = {k: statistics.median(s.values[k] for s in samples) for k in keys}
    cpus = [s.cpu for s in samples if s.cpu is not None]
    return values, (statistics.median(cpus) if cpus else None)


# --------------------------------------------------------------------------- numbers and the report


def fmt_value(value: float | None, number: Callable[[float], str]) -> str:
    """A table cell: ``n/a`` for not applicable (None), ``FAIL`` for a failed measurement (NaN), else ``number``."""
    if value is None:
        return "n/a"
    if value != value:
        return "FAIL"
    return number(value)


def table_lines(columns: Sequence[str], rows: Sequence[tuple[str, Sequence[str]]], first: str = "Metric") -> list[str]:
    """A markdown table (first column left-aligned, the others right-aligned), after a blank line."""
    header = [first, *columns]
    lines = ["", "| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
    lines += [f"| {title} | " + " | ".join(cells) + " |" for title, cells in rows]
    return lines


def ratio(a: float | None, b: float | None) -> float | None:
    """a/b, None when either side is not applicable, NaN when either failed."""
    if a is None or b is None:
        return None
    if a != a or b != b or b == 0:
        return float("nan")
    return a / b


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "n/a"
    if r != r:
        return "FAIL"
    return f"{r:.2f}x"


class Targets:
    """The issue's targets evaluated against the table: each is (target, measured as shown, met or None)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, bool | None]] = []

    def add(self, label: str, value: float | None, ok: Callable[[float], bool], shown: Callable[[float], str]) -> None:
        """One target; a value that is missing or failed (None or NaN) is 'not measured', never met."""
        if value is None or value != value:
            self.items.append((label, "FAIL", None))
        else:
            self.items.append((label, shown(value), ok(value)))

    def add_ratio(self, label: str, value: float | None, ok: Callable[[float], bool]) -> None:
        """A target on a ratio, shown as ``1.23x``."""
        self.add(label, value, ok, lambda v: f"{v:.2f}x")


def target_lines(title: str, items: list[tuple[str, str, bool | None]]) -> list[str]:
    """The *Targets* section: one bullet per target with its verdict in bold."""
    lines = ["", f"## {title}", ""]
    for label, shown, met in items:
        verdict = "not measured" if met is None else ("met" if met else "NOT met")
        lines.append(f"- {label}: {shown} — **{verdict}**")
    return lines


def details_lines(rows: Sequence[tuple[str, str, float | None, str]]) -> list[str]:
    """The *Details* table from (path, test, proxy CPU in cores or None, detail); rows with neither are left out."""
    lines = ["", "## Details", "", "| Path | Metric | Proxy CPU (cores) | Detail |", "|---|---|---:|---|"]
    for path, test, cpu, detail in rows:
        if cpu is not None or detail:
            lines.append(f"| {path} | {test} | {'' if cpu is None else f'{cpu:.2f}'} | {detail} |")
    return lines


def notes_lines(notes: list[str]) -> list[str]:
    """The *Notes* section (failures with the proxy's log tail, retries), or nothing when there are none."""
    if not notes:
        return []
    return ["", "## Notes", "", *("- " + note.replace("\n", "\n  ") for note in notes)]


def make_parser(doc: str | None, kind: str, paths: Sequence[str], smoke: str, duration: str) -> argparse.ArgumentParser:
    """A parser with the options every bench script has: smoke, duration, output, repetitions, paths, nginx."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    p.add_argument("--smoke", action="store_true", help=smoke)
    p.add_argument("--duration", type=int, help=duration)
    p.add_argument("--out", type=Path, help=f"markdown output (default bench/results/<date>-<HHMM>-{kind}.md)")
    p.add_argument("--repeat", type=int, help="interleaved repetitions of each test, median shown (default 3)")
    p.add_argument("--paths", default=",".join(paths), help=f"comma-separated subset of {','.join(paths)}")
    p.add_argument("--nginx-workers", default="1", help="nginx worker_processes (default 1)")
    return p


def parse_common_args(p: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse and fill in the defaults that depend on ``--smoke``: 10 s and 3 repetitions, or 1 s and 1.

    ``--medlb-workers`` (``add_medlb_workers_arg``), where a script has it, must lie in MEDLB_WORKERS_RANGE.
    """
    args = p.parse_args(argv)
    args.duration = args.duration if args.duration is not None else (1 if args.smoke else 10)
    args.repeat = max(1, args.repeat if args.repeat is not None else (1 if args.smoke else 3))
    low, high = MEDLB_WORKERS_RANGE
    if getattr(args, "medlb_workers", None) is not None and not low <= args.medlb_workers <= high:
        p.error(
            f"--medlb-workers must be {low} to {high} (medlb's global.workers allows 1 to {high}; 1 is the medlb path)"
        )
    return args


def parse_paths(text: str, known: Sequence[str]) -> list[str]:
    """``--paths`` as a list in the order given; an unknown name is an error (exit status 2)."""
    paths = [p.strip() for p in text.split(",") if p.strip()]
    unknown = set(paths) - set(known)
    if unknown:
        print(f"unknown paths: {', '.join(sorted(unknown))}", file=sys.stderr)
        raise SystemExit(2)
    return paths


def require_tools(tools: Sequence[str]) -> None:
    """Exit with status 2 naming the binaries missing from PATH."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        print(f"missing tools: {', '.join(missing)}", file=sys.stderr)
        raise SystemExit(2)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # take the same cleanup path as Ctrl-C


def on_sigterm_clean_up() -> None:
    """SIGTERM takes the Ctrl-C path, so every child is killed and the temporary directory removed."""
    signal.signal(signal.SIGTERM, _sigterm)


def run_and_report(
    bench: BenchBase,
    steps: Callable[[], None],
    render: Callable[[], str],
    out: Path,
    results: dict[tuple[str, str], float | None],
    paths: Sequence[str],
) -> int:
    """Run the measurements, always clean up, write and show the report; the exit status of the script.

    0: every cell of ``paths`` measured (whatever the numbers); 1: some failed (NaN), see *Notes*;
    130: interrupted (no report). A BenchError out of ``steps`` aborts the run but still gives a report.
    """
    try:
        steps()
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        return 130
    except BenchError as exc:
        bench.notes.append(f"aborted: {exc}")
        print(f"aborted: {exc}", file=sys.stderr)
    finally:
        bench.close()
    report = render()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print()
    print(report)
    print(f"written to {out}")
    failed = any(v is not None and v != v for (p, _), v in results.items() if p in paths)
    return 1 if failed else 0


# --------------------------------------------------------------------------- shared by the protocol benches


def haproxy_tcp_config(port: int, server: str, *, maxconn: int, bufsize: int, splice: bool) -> str:
    """HAProxy ``mode tcp`` in its fastest shape, as every bench runs it: splice, generous timeouts,
    no checks, no logging; one frontend on ``port``, one server at ``server`` (``host:port``)."""
    lines = [
        "global",
        f"  maxconn {maxconn}",
        f"  tune.bufsize {bufsize}",
        "defaults",
        "  mode tcp",
        *(["  option splice-auto"] if splice else []),
        "  timeout connect 3s",
        "  timeout client 1h",
        "  timeout server 1h",
        f"  maxconn {maxconn}",
        "frontend fe",
        f"  bind {HOST}:{port}",
        "  default_backend be",
        "backend be",
        f"  server s1 {server}",
    ]
    return "\n".join(lines) + "\n"


def loadavg() -> str:
    """The 1/5/15-minute load average, for the report header (a loaded machine explains odd runs)."""
    with contextlib.suppress(OSError):
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    return "unknown"


def note_proxy_logs(
    notes: list[str], proxies: dict[str, Proc | None], since: dict[str, int], titles: dict[str, str]
) -> None:
    """Add to ``notes`` what each proxy logged while it was measured (``since``: its line count before)."""
    for path, start in since.items():
        proxy = proxies[path]
        assert proxy is not None
        logged = proxy.log_lines()[start:]
        if logged:
            notes.append(
                f"{titles[path]} logged {len(logged)} line(s) while measured; the last:\n" + "\n".join(logged[-15:])
            )
