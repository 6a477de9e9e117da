#!/usr/bin/env python3
"""HL7 benchmark: ADT messages over MLLP direct, through HAProxy (``mode tcp``) and through medlb (``mode: hl7``).

One run, one machine, loopback only, the same receiver behind every path (see ``bench/README.md``):

- **one**: 1 sender, stop-and-wait (send one framed ADT^A01, wait for its ACK, send the next) for
  ``--duration`` seconds: messages/s and the p50 and p99 ACK latency;
- **many**: 8 senders (``--senders``) doing the same at once, each on its own connection.

Every message has a unique MSH-10 (unique over the whole run: medlb's duplicate suppression must never answer
one from its table) and a PID-3 drawn from a pool of 1,000 patients (``--patients``). Every ACK is checked:
MSA-1 must be AA and MSA-2 the message's MSH-10; anything else (a NAK, a mismatch, a framing error, a closed
connection, no ACK within 10 s) is an error, counted by kind and reported, never hidden.

The receiver is this file's :func:`receiver_main`, run as ``python -c`` in its own process(es): asyncio on
uvloop, medlb's own ``MllpFramer`` and ``make_ack`` (AA, MSA-2 = MSH-10, MSH-7 from the clock), one write per
batch of ACKs. ``--receivers N`` starts N such processes on one port (``SO_REUSEPORT``; the kernel spreads the
connections). The senders are :func:`sender_main`, run as ``python -c`` worker processes (``--client-procs``
for the 8 senders), callback-driven asyncio protocols on uvloop: no task or future per message, so the client
costs as little as Python allows. The bench process only starts them, says "go" and collects their results.

Run: ``.venv/bin/python bench/hl7_bench.py [--smoke] [--out FILE.md] [--duration S]``.
Standard library plus medlb's own modules (and uvloop, a medlb dependency); the helpers shared with the other
benches are in ``common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench/ is not a package: common.py lies next to this file
    sys.path.insert(0, _HERE)
import common  # noqa: E402
from common import HOST, BenchError, Proc  # noqa: E402
from dicom_bench import cpu_seconds_precise  # noqa: E402

from medlb.errors import Hl7ProtocolError  # noqa: E402
from medlb.proto.hl7 import format_timestamp, make_ack, parse_ack, parse_header  # noqa: E402
from medlb.proto.mllp import MllpFramer, frame  # noqa: E402

#: The path names, in table order.
PATHS = ("direct", "haproxy", "medlb")
PATH_TITLES = {"direct": "direct", "haproxy": "HAProxy", "medlb": "medlb"}
#: Ratio columns: (title, numerator path, denominator path).
RATIOS = (("medlb/direct", "medlb", "direct"), ("medlb/HAProxy", "medlb", "haproxy"))
TOOLS = ("haproxy",)
#: Far above the senders; small enough for HAProxy's fd arithmetic in a container.
HAPROXY_MAXCONN = 4096
#: A sender that waits longer than this for one ACK counts an error and reconnects.
ACK_TIMEOUT = 10.0

#: Test -> row-title prefix; ``{n}`` is the number of senders of the many-senders test.
TESTS = {"one": "1 sender", "many": "{n} senders"}
#: Table rows: metric key -> (test, row title after the test's prefix, whether the ratio columns apply).
METRICS: dict[str, tuple[str, str, bool]] = {
    f"{test}_{key}": (test, title, has_ratio)
    for test in TESTS
    for key, title, has_ratio in (
        ("mps", "messages/s", True),
        ("p50", "ACK latency p50 (ms)", True),
        ("p99", "ACK latency p99 (ms)", True),
        ("cpu_us", "proxy CPU per message (µs)", True),
        ("errors", "errors (all runs)", False),
    )
}

#: The ADT^A01 every sender sends (MSH-7/EVN-2 the send time, MSH-10 unique, PID-3 from the pool).
ADT_A01 = (
    "MSH|^~\\&|BENCHADT|GENHOSP|RECEIVER|GENHOSP|{ts}||ADT^A01^ADT_A01|{cid}|P|2.5\r"
    "EVN|A01|{ts}\r"
    "PID|1||{pid}^^^GENHOSP^MR||BENCH^PATIENT^Q||19700101|M|||1 MAIN ST^^SPRINGFIELD^IL^62701||555-0100\r"
    "PV1|1|I|WARD4^101^1^GENHOSP||||1234^SMITH^JANE^^^DR|||MED||||1|||1234^SMITH^JANE^^^DR|IN||||||||||||||||||"
    "|GENHOSP|||||{ts}\r"
)


def metrics_of(test: str) -> list[str]:
    return [key for key, (t, _, _) in METRICS.items() if t == test]


def patient_id(n: int) -> str:
    return f"PAT{n:06d}"


# --------------------------------------------------------------------------- the receiver (a child process)


class _Clock:
    """An HL7 DTM of the current second, formatted once per second."""

    def __init__(self) -> None:
        self.second = -1
        self.text = ""

    def now(self) -> str:
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.text = format_timestamp(datetime.fromtimestamp(second, UTC))
        return self.text


class ReceiverConn(asyncio.Protocol):
    """One connection to the receiver: every framed message is answered AA at once, in order."""

    clock = _Clock()

    def __init__(self) -> None:
        self.framer = MllpFramer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            payloads = self.framer.feed(data)
            acks = [frame(make_ack(parse_header(p), "AA", timestamp=self.clock.now())) for p in payloads]
        except Hl7ProtocolError as exc:  # never happens with the bench's senders; say so loudly if it does
            print(f"receiver: {exc}; connection closed", file=sys.stderr, flush=True)
            self.transport.close()
            return
        if acks:
            self.transport.write(acks[0] if len(acks) == 1 else b"".join(acks))


def receiver_main(port: int) -> None:
    """Serve MLLP on ``port`` (``SO_REUSEPORT``, so several receivers may share it) until killed."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((HOST, port))
    sock.listen(1024)

    async def serve() -> None:
        server = await asyncio.get_running_loop().create_server(ReceiverConn, sock=sock)
        await server.serve_forever()

    with _runner() as runner:
        runner.run(serve())


def _runner() -> asyncio.Runner:
    """uvloop when available (medlb depends on it), so the receiver and the senders cost as little as possible."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def loop_name() -> str:
    try:
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    except Exception:  # not installed: the stdlib loop
        return "asyncio"


# --------------------------------------------------------------------------- the senders (child processes)


@dataclass
class SenderStats:
    """What one sender process saw: completed messages with their ACK latency, errors by kind."""

    ok: int = 0
    latencies_us: list[int] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    #: ``time.monotonic()`` of the last completed exchange (the end of the measured window).
    last: float = 0.0


class Sender(asyncio.Protocol):
    """One stop-and-wait MLLP connection: the next message goes out from the callback that took the last ACK."""

    def __init__(self, group: SenderGroup, index: int) -> None:
        self.group = group
        self.prefix = f"{group.tag}S{index}N"
        self.rng = random.Random(f"{group.tag}/{index}")
        self.seq = 0
        self.framer = MllpFramer()
        self.transport: asyncio.Transport | None = None
        #: The control ID of the message waiting for its ACK, and when it was sent (``perf_counter``).
        self.cid: str | None = None
        self.sent = 0.0
        self.closing = False

    # -- connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.closing:  # we closed it (abandoned, or the run is over)
            self.closing = False
            return
        self.group.error("connection reset" if exc else "connection closed by the peer")
        self.cid = None
        self.group.reconnect(self)

    def abandon(self, why: str) -> None:
        """Count ``why`` as an error, drop the connection (its answers can no longer be matched), reconnect."""
        self.group.error(why)
        self.cid = None
        self.framer = MllpFramer()
        if self.transport is not None:
            self.closing = True
            self.transport.abort()
            self.transport = None
        self.group.reconnect(self)

    # -- messages

    def send_next(self) -> None:
        if time.monotonic() >= self.group.end or self.transport is None:
            self.group.finished(self)
            return
        self.seq += 1
        cid = f"{self.prefix}{self.seq}"
        ts = self.group.clock.now()
        pid = self.group.patients[self.rng.randrange(len(self.group.patients))]
        payload = ADT_A01.format(ts=ts, cid=cid, pid=pid).encode("ascii")
        self.cid = cid
        self.sent = time.perf_counter()
        self.transport.write(frame(payload))

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.framer.feed(data)
        except Hl7ProtocolError as exc:
            self.abandon(f"framing error in the reply: {exc}")
            return
        for payload in replies:
            now = time.perf_counter()
            cid, self.cid = self.cid, None
            if cid is None:
                self.abandon("a reply with no message outstanding")
                return
            try:
                ack = parse_ack(payload)
            except Hl7ProtocolError as exc:
                self.group.error(f"unreadable ACK: {exc}")
            else:
                if ack.control_id != cid:
                    self.group.error("MSA-2 is not the message's MSH-10")
                elif ack.code != "AA":
                    self.group.error(f"NAK {ack.code}: {ack.text or '(no text)'}"[:120])
                else:
                    stats = self.group.stats
                    stats.ok += 1
                    stats.latencies_us.append(round((now - self.sent) * 1e6))
                    stats.last = time.monotonic()
            self.send_next()


class SenderGroup:
    """The senders of one worker process, their shared stats, the ACK-timeout watchdog and reconnects."""

    def __init__(self, port: int, count: int, tag: str, patients: int) -> None:
        self.port = port
        self.tag = tag
        self.patients = [patient_id(n) for n in range(patients)]
        self.clock = _Clock()
        self.loop = asyncio.get_running_loop()
        self.senders = [Sender(self, i) for i in range(count)]
        self.stats = SenderStats()
        self.end = float("inf")
        self.running: set[Sender] = set()
        self.done: asyncio.Future[None] | None = None

    async def connect_all(self) -> None:
        for sender in self.senders:
            await self.loop.create_connection(lambda s=sender: s, HOST, self.port)  # type: ignore[misc]

    def error(self, kind: str) -> None:
        self.stats.errors[kind] += 1

    def reconnect(self, sender: Sender) -> None:
        if sender in self.running:
            self.loop.create_task(self._reconnect(sender))

    async def _reconnect(self, sender: Sender) -> None:
        while time.monotonic() < self.end:
            try:
                await self.loop.create_connection(lambda: sender, HOST, self.port)
            except OSError as exc:
                self.error(f"reconnect failed: {exc.strerror or exc}")
                await asyncio.sleep(0.1)
                continue
            sender.send_next()
            return
        self.finished(sender)

    def finished(self, sender: Sender) -> None:
        self.running.discard(sender)
        if not self.running and self.done is not None and not self.done.done():
            self.done.set_result(None)

    def _watch(self) -> None:
        now = time.perf_counter()
        for sender in list(self.running):
            if sender.cid is not None and now - sender.sent > ACK_TIMEOUT:
                sender.abandon(f"no ACK within {ACK_TIMEOUT:.0f} s")
        if self.running:
            self.loop.call_later(0.25, self._watch)

    async def run(self, start: float, end: float) -> None:
        self.end = end
        self.done = self.loop.create_future()
        self.running = set(self.senders)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        self.loop.call_later(0.25, self._watch)
        for sender in self.senders:
            sender.send_next()
        await self.done
        for sender in self.senders:
            if sender.transport is not None:
                sender.closing = True
                sender.transport.close()


def sender_main(port: int, count: int, tag: str, patients: int, out: str) -> None:
    """Worker process: connect ``count`` senders, say ``ready``, wait for ``go START END``, run, write the JSON result.

    START and END are ``time.monotonic()`` values (CLOCK_MONOTONIC, the same in every process). The result (a
    latency per message: hundreds of KB) goes to the file ``out`` and only ``done`` to stdout: printed to the
    pipe and left to the interpreter's exit flush, it was seen to arrive cut at 64 or 128 KiB, exit status 0.
    """
    with _runner() as runner:

        async def make() -> SenderGroup:
            group = SenderGroup(port, count, tag, patients)
            await group.connect_all()
            return group

        group = runner.run(make())
        print("ready", flush=True)
        words = sys.stdin.readline().split()
        if len(words) != 3 or words[0] != "go":
            raise SystemExit(f"expected 'go START END', got {words!r}")
        start, end = float(words[1]), float(words[2])
        cpu0 = time.process_time()
        runner.run(group.run(start, end))
        cpu = time.process_time() - cpu0
    s = group.stats
    result = {"ok": s.ok, "lat": s.latencies_us, "errors": dict(s.errors), "last": s.last, "cpu": cpu}
    Path(out).write_text(json.dumps(result))
    print("done", flush=True)


# --------------------------------------------------------------------------- readiness


class Hl7Probe:
    """A readiness probe: one ADT^A01 answered AA with the right MSA-2; ``last`` keeps the last failure."""

    def __init__(self, port: int, tag: str) -> None:
        self.port = port
        self.tag = tag
        self.count = 0
        self.last = ""

    def __call__(self) -> bool:
        self.count += 1
        cid = f"{self.tag}P{self.count}"
        payload = ADT_A01.format(ts=_Clock().now(), cid=cid, pid=patient_id(0)).encode("ascii")
        try:
            with socket.create_connection((HOST, self.port), timeout=5) as s:
                s.sendall(frame(payload))
                framer = MllpFramer()
                replies: list[bytes] = []
                while not replies:
                    data = s.recv(65536)
                    if not data:
                        self.last = "connection closed before the ACK"
                        return False
                    replies = framer.feed(data)
            ack = parse_ack(replies[0])
        except (OSError, Hl7ProtocolError) as exc:
            self.last = f"{type(exc).__name__}: {exc}"
            return False
        if ack.code != "AA" or ack.control_id != cid:
            self.last = f"MSA {ack.code}|{ack.control_id} (expected AA|{cid}): {ack.text or ''}"
            return False
        return True


# --------------------------------------------------------------------------- the bench


@dataclass
class Settings:
    """The knobs of one run (all of them appear in the report's header)."""

    duration: int
    repeat: int = 3
    smoke: bool = False
    senders: int = 8
    client_procs: int = 2
    receivers: int = 1
    patients: int = 1000
    #: medlb ``hl7.connections_per_server``; None keeps medlb's default (4).
    medlb_connections: int | None = None
    haproxy_bufsize: int = 16384
    haproxy_splice: bool = True


@dataclass
class RunResult:
    """The merged result of one test run's worker processes."""

    ok: int
    seconds: float
    latencies_us: list[int]
    errors: Counter[str]
    client_cpu: float

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def error_text(self) -> str:
        return "; ".join(f"{n}x {kind}" for kind, n in self.errors.most_common(5))


class Bench(common.BenchBase):
    """Starts the receiver(s) and the proxies, runs the sender processes; children die in ``close``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("medlb-hl7-bench-")
        self.s = settings
        self.receivers: list[Proc] = []
        self.recv_port = 0
        #: Numbers every run's control IDs, so none repeats within medlb's dedup window.
        self.runs = 0
        #: Load averages (1 min) before and after the measurements: a busy machine shows here.
        self.load: list[str] = []

    def _python_c(self, call: str, *args: object) -> list[str]:
        code = f"import sys; sys.path.insert(0, {_HERE!r}); import hl7_bench; hl7_bench.{call}"
        return [sys.executable, "-c", code, *map(str, args)]

    # -- receiver

    def start_receivers(self) -> None:
        """``--receivers`` processes on one port; ready when a message is answered AA directly."""
        self.recv_port = common.free_port()
        for _ in range(self.s.receivers):
            cmd = self._python_c(f"receiver_main({self.recv_port})")
            proc = self.children.start("receiver", cmd)
            self.receivers.append(proc)
        for proc in self.receivers:  # each binds on its own; wait for all before probing
            listening = functools.partial(_listening, proc.popen.pid, self.recv_port)
            common.retry_until("receiver", listening, 10, proc.popen)
        probe = Hl7Probe(self.recv_port, "RECV")
        if not probe():
            tails = "\n".join(p.log_tail() for p in self.receivers)
            raise BenchError(f"the receiver does not answer AA: {probe.last}; log:\n{tails}")

    def _receiver_cpu(self) -> float:
        return sum(cpu_seconds_precise(p.pgid) for p in self.receivers)

    # -- proxies

    def haproxy_config(self, port: int) -> str:
        """``mode tcp`` as in tcp_bench and dicom_bench: splice, generous timeouts, no checks, no logging."""
        return common.haproxy_tcp_config(
            port,
            f"{HOST}:{self.recv_port}",
            maxconn=HAPROXY_MAXCONN,
            bufsize=self.s.haproxy_bufsize,
            splice=self.s.haproxy_splice,
        )

    def medlb_config(self, port: int) -> str:
        """One ``mode: hl7`` frontend (default ``hl7:`` settings), one backend with the receiver, an hl7 check."""
        hl7 = ""
        if self.s.medlb_connections is not None:
            hl7 = f", hl7: {{connections_per_server: {self.s.medlb_connections}}}"
        out = [
            "global: {nofile: 200000}",
            "defaults:",
            "  timeouts: {connect: 3s, client: 1h, server: 1h, queue: 30s, check: 5s}",
            "  check: {inter: 2s}",
            "frontends:",
            f'  - {{name: adt, mode: hl7, bind: ["{HOST}:{port}"], maxconn: 30000, default_backend: receivers{hl7}}}',
            "backends:",
            "  - name: receivers",
            "    balance: roundrobin",
            "    check: {type: hl7}",
            "    servers:",
            f'      - {{name: recv1, address: "{HOST}:{self.recv_port}"}}',
        ]
        return "\n".join(out) + "\n"

    def start_proxy(self, path: str) -> tuple[Proc | None, int]:
        """Start ``path``'s proxy; ready means one message is answered AA through it."""
        if path == "direct":
            return None, self.recv_port
        port = common.free_port()
        cfg = self.tmp / f"{path}.cfg"
        if path == "haproxy":
            cfg.write_text(self.haproxy_config(port))
            proc = self.children.start("haproxy", ["haproxy", "-f", str(cfg), "-db"])
        else:
            cfg.write_text(self.medlb_config(port))
            proc = common.start_medlb(self.children, self.medlb, path, cfg)
        probe = Hl7Probe(port, f"RDY{path[:3].upper()}")
        try:
            common.wait_ready(self.children, proc, [port], [(f"{path}: ADT^A01 answered AA", probe)])
        except BenchError as exc:
            raise BenchError(f"{exc}\nlast probe answer: {probe.last}" if probe.last else str(exc)) from exc
        return proc, port

    # -- measurements

    def run_senders(self, port: int, senders: int, duration: float) -> tuple[RunResult, float]:
        """``senders`` senders in worker processes for ``duration`` s: their merged result, the receivers' CPU seconds.

        The workers connect first, then all start at one ``time.monotonic()`` instant; the window ends with the
        last ACK any of them took.
        """
        self.runs += 1
        procs = max(1, min(self.s.client_procs if senders > 1 else 1, senders))
        shares = [senders // procs + (1 if i < senders % procs else 0) for i in range(procs)]
        with self.children.scope():
            workers = []
            outputs: list[Path] = []
            for w, count in enumerate(shares):
                tag = f"R{self.runs}W{w}"
                out = self.tmp / f"result-{tag}.json"
                cmd = self._python_c(
                    "sender_main(*map(int, sys.argv[1:3]), sys.argv[3], int(sys.argv[4]), sys.argv[5])"
                )
                cmd += [str(port), str(count), tag, str(self.s.patients), str(out)]
                outputs.append(out)
                workers.append(self.children.start("sender", cmd, stdin=subprocess.PIPE, stdout_pipe=True))
            for proc in workers:
                assert proc.popen.stdout is not None
                line = _read_or_explain(proc, 20)
                if line != "ready":
                    raise BenchError(f"sender worker said {line!r} instead of 'ready'")
            recv0 = self._receiver_cpu()
            start = time.monotonic() + 0.05
            end = start + duration
            for proc in workers:
                assert proc.popen.stdin is not None
                proc.popen.stdin.write(f"go {start} {end}\n".encode())
                proc.popen.stdin.flush()
            outs = []
            for proc, path in zip(workers, outputs, strict=True):
                line = _read_or_explain(proc, duration + ACK_TIMEOUT + 30)
                try:
                    if line != "done":
                        raise ValueError(f"said {line!r} instead of 'done'")
                    outs.append(json.loads(path.read_text()))
                except (OSError, ValueError) as exc:
                    raise BenchError(f"sender worker: no result ({exc}); its output:\n{proc.log_tail()}") from exc
            recv_cpu = self._receiver_cpu() - recv0
        errors: Counter[str] = Counter()
        latencies: list[int] = []
        for out in outs:
            errors.update(out["errors"])
            latencies += out["lat"]
        last = max((out["last"] for out in outs), default=start)
        result = RunResult(
            ok=sum(out["ok"] for out in outs),
            seconds=max(last - start, 1e-9),
            latencies_us=latencies,
            errors=errors,
            client_cpu=sum(out["cpu"] for out in outs),
        )
        return result, recv_cpu

    def exchange(self, test: str, port: int, proxy: Proc | None) -> tuple[dict[str, float], str]:
        """One run of ``test``: messages/s, ACK latency, errors; the proxy's CPU per message over the window."""
        senders = 1 if test == "one" else self.s.senders
        proxy0 = cpu_seconds_precise(proxy.pgid) if proxy is not None else 0.0
        result, recv_cpu = self.run_senders(port, senders, self.s.duration)
        proxy_cpu = cpu_seconds_precise(proxy.pgid) - proxy0 if proxy is not None else 0.0
        if proxy is not None and proxy.popen.poll() is not None:
            raise BenchError(f"the proxy exited with {proxy.popen.returncode} during the run")
        if result.ok == 0:
            raise BenchError(f"no message was acknowledged AA; errors: {result.error_text() or 'none'}")
        us = sorted(result.latencies_us)
        values = {
            f"{test}_mps": result.ok / result.seconds,
            f"{test}_p50": statistics.median(us) / 1000,
            f"{test}_p99": us[min(len(us) - 1, round(0.99 * (len(us) - 1)))] / 1000,
            f"{test}_errors": float(result.failed),
            f"{test}_recv_cpu": recv_cpu / result.seconds,
            f"{test}_recv_us": recv_cpu / result.ok * 1e6,
            f"{test}_client_cpu": result.client_cpu / result.seconds,
        }
        if proxy is not None:
            values[f"{test}_proxy_cpu"] = proxy_cpu / result.seconds
            values[f"{test}_cpu_us"] = proxy_cpu / (result.ok + result.failed) * 1e6
        summary = f"{result.ok} ok, {result.failed} errors in {result.seconds:.2f} s"
        if result.failed:
            summary += f" ({result.error_text()})"
        return values, summary

    def measure(self, paths: list[str], results: dict[tuple[str, str], float | None]) -> None:
        """Start every path's proxy, then run the tests interleaved across the paths (``run_interleaved``)."""
        with self.children.scope():
            plans: dict[str, common.Plan] = {}
            proxies: dict[str, Proc | None] = {}
            ready_lines: dict[str, int] = {}
            for path in paths:
                try:
                    proxy, port = self.start_proxy(path)
                except BenchError as exc:
                    self._fail(path, list(TESTS), exc, results)
                    continue
                proxies[path] = proxy
                try:
                    # One unmeasured second of the many-senders test: first-use costs (medlb's server
                    # connections, the first dedup entries, HAProxy's buffers) stay out of the first repetition.
                    warm, _ = self.run_senders(port, self.s.senders, 1.0)
                    if warm.failed:
                        raise BenchError(f"{warm.failed} error(s): {warm.error_text()}")
                except BenchError as exc:
                    self._fail(path, list(TESTS), BenchError(f"warm-up: {exc}"), results)
                    if proxy is not None:
                        self.children.stop(proxy)
                    continue
                if proxy is not None:
                    ready_lines[path] = len(proxy.log_lines())
                plans[path] = [(test, proxy, functools.partial(self.exchange, test, port, proxy)) for test in TESTS]

            def show(path: str, test: str, sample: common.Sample) -> None:
                shown = ", ".join(
                    f"{METRICS[key][1]} {fmt(v, key)}" for key, v in sample.values.items() if key in METRICS
                )
                title = self.test_title(test)
                print(f"  {PATH_TITLES[path]:8} {title:10} {shown}  [{sample.summary}]", flush=True)

            def fail(path: str, test: str, exc: BenchError) -> None:
                proxy = proxies.get(path)
                tail = f"\nproxy output:\n{proxy.log_tail()}" if proxy is not None else ""
                self._fail(path, [test], BenchError(f"{exc}{tail}"), results)

            self.load.append(common.loadavg())
            samples = common.run_interleaved(self.s.repeat, plans, show, fail)
            self.load.append(common.loadavg())
            common.note_proxy_logs(self.notes, proxies, ready_lines, PATH_TITLES)
            for (path, test), runs in samples.items():
                self._aggregate(path, test, runs, results)
        for proc in self.receivers:
            if proc.popen.poll() is not None:
                self.notes.append(f"a receiver exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            elif proc.log_lines():
                self.notes.append(f"a receiver logged:\n{proc.log_tail()}")

    def test_title(self, test: str) -> str:
        return TESTS[test].format(n=self.s.senders)

    def _aggregate(
        self, path: str, test: str, runs: list[common.Sample], results: dict[tuple[str, str], float | None]
    ) -> None:
        values, _ = common.medians(runs)
        for key in metrics_of(test):
            results[(path, key)] = values.get(key)  # cpu_us: None for direct (no proxy)
        results[(path, f"{test}_errors")] = sum(r.values[f"{test}_errors"] for r in runs)
        if f"{test}_proxy_cpu" in values:
            self.cpu[(path, test)] = values[f"{test}_proxy_cpu"]
        parts = [
            f"{METRICS[key][1]} " + ", ".join(fmt(r.values[key], key) for r in runs)
            for key in metrics_of(test)
            if key in runs[0].values and not key.endswith("_errors")
        ]
        parts.append("receiver CPU " + ", ".join(f"{r.values[f'{test}_recv_cpu']:.2f}" for r in runs))
        parts.append("receiver µs/msg " + ", ".join(f"{r.values[f'{test}_recv_us']:.0f}" for r in runs))
        parts.append("client CPU " + ", ".join(f"{r.values[f'{test}_client_cpu']:.2f}" for r in runs))
        self.details[(path, test)] = "runs: " + "; ".join(parts) + " — " + "; ".join(r.summary for r in runs)
        bad = [f"run {i + 1}: {r.summary}" for i, r in enumerate(runs) if r.values[f"{test}_errors"]]
        if bad:
            self.notes.append(f"{PATH_TITLES[path]} / {self.test_title(test)}: errors in {'; '.join(bad)}")

    def _fail(self, path: str, tests: list[str], exc: Exception, results: dict[tuple[str, str], float | None]) -> None:
        for test in tests:
            for key in metrics_of(test):
                results[(path, key)] = float("nan")
        self.note_failure(f"{PATH_TITLES[path]} / {'; '.join(self.test_title(t) for t in tests)}: FAILED: {exc}")


def _read_or_explain(proc: Proc, timeout: float) -> str:
    """One line from a worker's stdout; on failure, the worker's stderr is part of the error."""
    assert proc.popen.stdout is not None
    try:
        return common.read_line(proc.popen.stdout, timeout, proc.popen)
    except BenchError as exc:
        raise BenchError(f"sender worker: {exc}; its output:\n{proc.log_tail()}") from exc


def _listening(pid: int, port: int) -> bool:
    """True when process ``pid`` holds a listening socket on ``port`` (each SO_REUSEPORT receiver binds alone)."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    want = f":{port:04X}"
    with contextlib.suppress(OSError):
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            cols = line.split()
            if cols[1].endswith(want) and cols[3] == "0A" and cols[9] in inodes:
                return True
    return False


# --------------------------------------------------------------------------- report


def fmt(value: float | None, key: str) -> str:
    """Rates whole, latency in ms with 3 decimals below 1 ms (2 below 10), CPU per message in whole µs."""

    def number(v: float) -> str:
        if key.endswith("_errors"):
            return f"{v:.0f}"
        if key.endswith(("_p50", "_p99")):
            return f"{v:.3f}" if v < 1 else (f"{v:.2f}" if v < 10 else f"{v:.1f}")
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    return common.fmt_value(value, number)


def targets(bench: Bench, results: dict[tuple[str, str], float | None]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, computed from the table: (target, measured, met)."""
    t = common.Targets()
    for test in TESTS:
        key = f"{test}_mps"
        value = common.ratio(results[("medlb", key)], results[("direct", key)])
        t.add_ratio(f"Throughput, {bench.test_title(test)}: medlb >= 0.9x direct", value, lambda v: v >= 0.9)
    return t.items


def render(bench: Bench, results: dict[tuple[str, str], float | None], meta: dict[str, str], paths: list[str]) -> str:
    """Header, the table (a column per path that ran, a ratio column when both its paths ran), targets, details."""
    s = bench.s
    ran = [p for p in PATHS if p in paths]
    ratios = [(title, a, b) for title, a, b in RATIOS if a in ran and b in ran]
    sample = ADT_A01.format(ts="20261122120000+0000", cid="R1W0S0N1", pid=patient_id(0))
    procs = max(1, min(s.client_procs, s.senders))
    lines = [
        f"# HL7 benchmark: direct vs HAProxy vs medlb ({meta['date']})",
        "",
        *common.machine_lines(meta),
        f"- Load average (1/5/15 min) before and after the measurements: {' / '.join(bench.load) or 'n/a'} "
        f"(the machine has {meta['nproc']} CPUs; above that, something else ran too)",
        f"- Receiver: {s.receivers} process(es) of `hl7_bench.receiver_main` on one port"
        + (" (`SO_REUSEPORT`)" if s.receivers > 1 else "")
        + f", asyncio on {loop_name()}: medlb's `MllpFramer`, `parse_header` and `make_ack` (AA, MSA-2 = MSH-10, "
        "MSH-7 from the clock), ACKs written at once; the same receiver behind every path",
        f"- Message: ADT^A01 (MSH, EVN, PID, PV1; HL7 2.5; {len(sample)} bytes plus 3 of MLLP framing), MSH-10 "
        f"unique over the whole run, PID-3 drawn at random from a pool of {s.patients} patients",
        f"- Senders: stop-and-wait MLLP connections (send, wait for the ACK, check MSA-1 = AA and MSA-2 = MSH-10, "
        f"send the next), callback-driven asyncio protocols on {loop_name()}, `TCP_NODELAY`; the 1-sender test in "
        f"one worker process, the {s.senders}-sender test in {procs} worker process(es); connections opened before "
        f"the window; {s.duration} s per run"
        + (" (smoke run)" if s.smoke else "")
        + f"; a NAK, a mismatch, a closed connection or no ACK within {ACK_TIMEOUT:.0f} s is an error",
        f"- HAProxy: {meta['haproxy']} — `mode tcp`, "
        + ("`option splice-auto`, " if s.haproxy_splice else "")
        + f"`tune.bufsize {s.haproxy_bufsize}`, nbthread left at default ({meta['haproxy_threads']} here), "
        "timeouts connect 3s / client 1h / server 1h, no checks, no logging, `haproxy -f cfg -db`",
        "- medlb: one `mode: hl7` frontend ("
        + (
            "default `hl7:` settings: order_key PID-3, dedup window 600 s, 4 connections per server"
            if s.medlb_connections is None
            else f"`hl7: {{connections_per_server: {s.medlb_connections}}}`, otherwise the defaults"
        )
        + "), one backend with the receiver, `check: {type: hl7}` every 2 s, "
        "`medlb run --no-session-log --log-level warning`",
        f"- Cells are the median of {s.repeat} run(s) per metric, interleaved across paths (runs under Details), "
        f"after one unmeasured second of the {s.senders}-sender test per path (warm-up). Messages/s counts the "
        "messages answered AA over the window from the common start to the last ACK; latency is from the "
        "write of a framed message to the callback that read its ACK. Ratio columns are medlb divided by "
        "direct and by HAProxy: higher is better for messages/s, lower for latency and CPU.",
    ]
    rows = []
    for key, (test, title, has_ratio) in METRICS.items():
        cells = [fmt(results[(p, key)], key) for p in ran]
        cells += [
            common.fmt_ratio(common.ratio(results[(a, key)], results[(b, key)])) if has_ratio else "n/a"
            for _, a, b in ratios
        ]
        rows.append((f"{bench.test_title(test)}: {title}", cells))
    lines += common.table_lines([*(PATH_TITLES[p] for p in ran), *(title for title, _, _ in ratios)], rows)
    lines += common.target_lines("Targets (medlb, computed from the table)", targets(bench, results))
    for test in TESTS:
        key = f"{test}_mps"
        vs = common.fmt_ratio(common.ratio(results[("medlb", key)], results[("haproxy", key)]))
        lines.append(f"- For comparison, not a target: throughput, {bench.test_title(test)}, medlb/HAProxy {vs}")
    detail_rows = [(p, t, bench.cpu.get((p, t)), bench.details.get((p, t), "")) for p in ran for t in TESTS]
    lines += common.details_lines(
        [(PATH_TITLES[p], bench.test_title(t), cpu, detail) for p, t, cpu, detail in detail_rows]
    )
    lines += [
        "",
        "Proxy, receiver and client CPU are CPU time over the window in cores (1.00 = one core busy), read from "
        "each thread's `schedstat`; proxy CPU per message is the proxy's CPU time over the window divided by "
        "the messages it carried. The senders, the receiver and the proxy share the machine's CPUs: a proxy "
        "that burns CPU takes it from the other two, and with stop-and-wait senders every microsecond a proxy "
        "adds to a message's round trip lowers the rate.",
    ]
    lines += common.notes_lines(bench.notes)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = common.make_parser(
        __doc__,
        "hl7",
        PATHS,
        smoke="one repetition of 1 s runs: proves the harness runs",
        duration="seconds per run (default 10, smoke 1)",
    )
    for action in p._actions:  # the shared parser's nginx option has no meaning here
        if action.dest == "nginx_workers":
            action.help = argparse.SUPPRESS
    p.add_argument("--senders", type=int, default=8, help="senders of the many-senders test (default 8)")
    p.add_argument("--client-procs", type=int, default=2, help="worker processes for the many-senders test (default 2)")
    p.add_argument("--receivers", type=int, default=1, help="receiver processes on one port (default 1)")
    p.add_argument("--patients", type=int, default=1000, help="PID-3 pool size (default 1000)")
    p.add_argument(
        "--medlb-connections",
        type=int,
        help="medlb hl7.connections_per_server (default: medlb's own default, 4)",
    )
    p.add_argument("--haproxy-bufsize", type=int, default=16384, help="HAProxy tune.bufsize (default 16384)")
    p.add_argument(
        "--haproxy-splice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HAProxy option splice-auto (default on)",
    )
    return common.parse_common_args(p, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.require_tools(TOOLS)
    paths = common.parse_paths(args.paths, PATHS)
    common.on_sigterm_clean_up()
    settings = Settings(
        duration=args.duration,
        repeat=args.repeat,
        smoke=args.smoke,
        senders=max(2, args.senders),
        client_procs=max(1, args.client_procs),
        receivers=max(1, args.receivers),
        patients=max(1, args.patients),
        medlb_connections=args.medlb_connections,
        haproxy_bufsize=args.haproxy_bufsize,
        haproxy_splice=args.haproxy_splice,
    )
    meta = common.collect_meta(TOOLS)
    out = args.out or common.REPO / "bench" / "results" / f"{meta['stamp']}-hl7.md"
    bench = Bench(settings)
    results: dict[tuple[str, str], float | None] = {(p, k): float("nan") for p in PATHS for k in METRICS}

    def steps() -> None:
        bench.start_receivers()
        bench.measure(paths, results)

    return common.run_and_report(bench, steps, lambda: render(bench, results, meta, paths), out, results, paths)


if __name__ == "__main__":
    sys.exit(main())
