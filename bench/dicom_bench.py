#!/usr/bin/env python3
"""DICOM benchmark: storescu to storescp direct, through HAProxy (``mode tcp``) and through medlb (``mode: dicom``).

One run, one machine, loopback only, the same instances on every path (see ``bench/README.md``):

- **small**: one storescu association sending every small instance (copies of pydicom's ``CT_small.dcm``,
  ~39 KB each, fresh SOP Instance UIDs): instances/s and MB/s;
- **large**: one storescu association sending the large instances (Secondary Capture, ~25 MB of
  uncompressed 16-bit pixel data each): MB/s;
- **echo**: C-ECHO associations per second (associate, C-ECHO, release, close), from N concurrent
  loops of an asyncio client in this process built on medlb's own codec (``medlb.proto.dicom_pdu``,
  ``medlb.proto.dicom_dimse``): a process per association would measure ``fork``/``exec``, not the path.

The storage SCP is one DCMTK ``storescp --ignore`` (receives every byte, writes none: the path is measured,
not the disk). Throughput is timed inside storescu, from its own log timestamps: from "Requesting
Association" to "Releasing Association" (connect, negotiation, every C-STORE and its response), so process
start and the scan of the input files are left out. ``TCP_NODELAY=1`` is in the environment of every DCMTK
process (without it DCMTK leaves Nagle on, and 40 ms delayed-ACK stalls dominate).

Run: ``.venv/bin/python bench/dicom_bench.py [--smoke] [--out FILE.md] [--duration S]``.
Standard library plus the venv's pydicom (to make the instances) and medlb's own modules; the helpers shared
with ``tcp_bench.py`` and ``http_bench.py`` are in ``common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import io
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # bench/ is not a package: common.py lies next to this file
    sys.path.insert(0, _HERE)
import common  # noqa: E402
from common import HOST, BenchError, Proc  # noqa: E402

from medlb.errors import DicomProtocolError  # noqa: E402
from medlb.proto import dicom_dimse, dicom_pdu  # noqa: E402

#: The path names, in table order.
PATHS = ("direct", "haproxy", "medlb")
PATH_TITLES = {"direct": "direct", "haproxy": "HAProxy", "medlb": "medlb"}
#: Ratio columns: (title, numerator path, denominator path).
RATIOS = (("medlb/direct", "medlb", "direct"), ("medlb/HAProxy", "medlb", "haproxy"))
TOOLS = ("haproxy", "storescu", "storescp")
#: AE titles: storescp's own (what every client calls), the bench's (storescu and the echo client), medlb's checks.
SCP_AE = "STORE"
SCU_AE = "BENCH"
CHECK_AE = "MEDLB"
#: Far above the echo client's concurrency; small enough for HAProxy's fd arithmetic in a container.
HAPROXY_MAXCONN = 4096
MB = 1e6  # throughput in decimal megabytes per second, as storage vendors quote it

TESTS = {
    "small": "Small instances, one association",
    "large": "Large instances, one association",
    "echo": "C-ECHO associations",
}
#: Table rows: metric key -> (test, row title, whether the ratio columns apply). Keys start with their test.
METRICS: dict[str, tuple[str, str, bool]] = {
    "small_ips": ("small", "Small instances: instances/s", True),
    "small_mbps": ("small", "Small instances: MB/s", True),
    "large_mbps": ("large", "Large instances: MB/s", True),
    "echo_aps": ("echo", "C-ECHO: associations/s", True),
    "echo_p50": ("echo", "C-ECHO: association p50 (ms)", True),
    "echo_p99": ("echo", "C-ECHO: association p99 (ms)", True),
    "echo_failed": ("echo", "C-ECHO: failed associations (all runs)", False),
}

#: storescu's log: timestamps to the microsecond, and no progress dots (one write(2) per PDU otherwise).
STORESCU_LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.logger.dcmtk.apps.storescu.progress = WARN
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%H:%M:%S.%Q} %5p: %m%n
"""
#: One line of that log: ``11:31:04.566.805  INFO: Requesting Association``.
_LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3})\.(\d{3})\s+([A-Z]+): (.*)$")


def metrics_of(test: str) -> list[str]:
    return [key for key, (t, _, _) in METRICS.items() if t == test]


@dataclass
class Settings:
    """The knobs of one run (all of them appear in the report's header)."""

    duration: int
    repeat: int = 3
    smoke: bool = False
    small_count: int = 300
    large_count: int = 4
    large_mb: int = 25
    #: DCMTK's maximum receive PDU, the same on storescp and storescu (DCMTK's default is 16384).
    pdu: int = 16384
    concurrency: int = 8
    haproxy_bufsize: int = 16384
    haproxy_splice: bool = True


@dataclass
class InstanceSet:
    """Instances written once into the bench's temporary directory; ``dataset_bytes`` is what goes on the wire."""

    directory: Path
    count: int
    file_bytes: int
    dataset_bytes: int
    description: str


# --------------------------------------------------------------------------- the instances


def make_small(directory: Path, count: int) -> InstanceSet:
    """``count`` copies of pydicom's CT_small.dcm (one series), each with a fresh SOP Instance UID."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    source = get_testdata_file("CT_small.dcm")
    if source is None:
        raise BenchError("pydicom's test file CT_small.dcm is missing")
    ds = pydicom.dcmread(source)
    directory.mkdir()
    file_bytes = dataset_bytes = 0
    for i in range(count):
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.InstanceNumber = i + 1
        path = directory / f"ct{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size = path.stat().st_size
        file_bytes += size
        dataset_bytes += size - _file_header_bytes(ds.file_meta)
    per = file_bytes / count
    description = (
        f"{count} x CT_small.dcm from pydicom ({ds.Rows}x{ds.Columns} 16-bit CT, {per / 1000:.1f} KB per file, "
        f"transfer syntax {ds.file_meta.TransferSyntaxUID.name}), each with a fresh SOP Instance UID"
    )
    return InstanceSet(directory, count, file_bytes, dataset_bytes, description)


def make_large(directory: Path, count: int, megabytes: int) -> InstanceSet:
    """``count`` Secondary Capture images of 4096 columns and ~``megabytes`` MB of random 16-bit pixel data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    columns = 4096
    rows = max(1, round(megabytes * MB / (2 * columns)))
    directory.mkdir()
    file_bytes = dataset_bytes = 0
    study = generate_uid()
    series = generate_uid()
    for i in range(count):
        uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
        meta.MediaStorageSOPInstanceUID = uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = SecondaryCaptureImageStorage
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.PatientName = "BENCH^LARGE"
        ds.PatientID = "BENCH-LARGE"
        ds.Modality = "OT"
        ds.ConversionType = "WSD"
        ds.InstanceNumber = i + 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = os.urandom(rows * columns * 2)  # incompressible, like real noise; nothing compresses here
        path = directory / f"sc{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        size = path.stat().st_size
        file_bytes += size
        dataset_bytes += size - _file_header_bytes(meta)
    description = (
        f"{count} x Secondary Capture, {rows}x{columns} 16-bit random pixel data, "
        f"{file_bytes / count / MB:.1f} MB per file, Explicit VR Little Endian, fresh UIDs"
    )
    return InstanceSet(directory, count, file_bytes, dataset_bytes, description)


def _file_header_bytes(meta: object) -> int:
    """Preamble, ``DICM`` and file meta group: the part of a file that is not sent in a C-STORE."""
    from pydicom.filewriter import write_file_meta_info

    buf = io.BytesIO()
    write_file_meta_info(buf, meta, enforce_standard=False)  # type: ignore[arg-type]
    return 128 + 4 + len(buf.getvalue())


# --------------------------------------------------------------------------- the C-ECHO client


@dataclass
class EchoResult:
    """What the C-ECHO loops did: completed associations with their times, failures by kind."""

    ok: int = 0
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def failure_text(self) -> str:
        return "; ".join(f"{n}x {kind}" for kind, n in self.failures.most_common(5))


_ASSOCIATE_RQ = dicom_pdu.associate_rq(SCP_AE, SCU_AE).encode()
_RELEASE_RQ = dicom_pdu.ReleaseRQ().encode()
_PDU_LIMIT = 1 << 20


async def _read_pdu(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(dicom_pdu.PDU_HEADER_LENGTH)
    pdu_type, length = head[0], int.from_bytes(head[2:6], "big")
    dicom_pdu.check_header(pdu_type, length, _PDU_LIMIT)
    return pdu_type, await reader.readexactly(length)


def _unexpected(pdu_type: int, body: bytes, what: str) -> BenchError:
    if pdu_type == dicom_pdu.PduType.ASSOCIATE_RJ and len(body) >= 4:
        kind = "permanent" if body[1] == 1 else "transient"
        return BenchError(f"A-ASSOCIATE-RJ ({kind}, source {body[2]}, reason {body[3]})")
    if pdu_type == dicom_pdu.PduType.ABORT and len(body) >= 4:
        return BenchError(f"A-ABORT (source {body[2]}, reason {body[3]}) {what}")
    return BenchError(f"PDU type 0x{pdu_type:02x} {what}")


async def echo_association(port: int, limit: float = 10.0) -> None:
    """One association: A-ASSOCIATE-RQ (Verification), C-ECHO-RQ, A-RELEASE-RQ; raise unless all succeed."""
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(HOST, port)
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            writer.write(_ASSOCIATE_RQ)
            pdu_type, body = await _read_pdu(reader)
            if pdu_type != dicom_pdu.PduType.ASSOCIATE_AC:
                raise _unexpected(pdu_type, body, "instead of the A-ASSOCIATE-AC")
            ac = dicom_pdu.decode_body(pdu_type, body)
            assert isinstance(ac, dicom_pdu.AssociateAC)
            context_id = next((pc.context_id for pc in ac.presentation_contexts if pc.accepted), None)
            if context_id is None:
                raise BenchError("Verification SOP class refused")
            writer.write(dicom_dimse.command_pdata(dicom_dimse.encode_c_echo_rq(1), context_id))
            observer = dicom_dimse.DimseObserver()
            commands: list[dicom_dimse.CommandSet] = []
            while not commands:
                pdu_type, body = await _read_pdu(reader)
                if pdu_type != dicom_pdu.PduType.P_DATA_TF:
                    raise _unexpected(pdu_type, body, "instead of the C-ECHO-RSP")
                commands = observer.feed(body)
            status = dicom_dimse.parse_c_echo_rsp(commands[0], 1)
            if status != 0x0000:
                raise BenchError(f"C-ECHO status 0x{status:04X}")
            writer.write(_RELEASE_RQ)
            pdu_type, body = await _read_pdu(reader)
            if pdu_type != dicom_pdu.PduType.RELEASE_RP:
                raise _unexpected(pdu_type, body, "instead of the A-RELEASE-RP")
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def _failure_kind(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout (10 s)"
    if isinstance(exc, asyncio.IncompleteReadError):
        return "connection closed mid-PDU" if exc.partial else "connection closed"
    if isinstance(exc, BenchError | DicomProtocolError):
        return str(exc)[:120]
    return f"{type(exc).__name__}: {exc}"[:120]


async def _echo_loops(port: int, concurrency: int, duration: float) -> EchoResult:
    result = EchoResult()
    clock = time.perf_counter  # not loop.time(): uvloop's clock ticks in whole milliseconds
    start = clock()
    deadline = start + duration

    async def one_loop() -> None:
        while clock() < deadline:
            t0 = clock()
            try:
                await echo_association(port)
            except Exception as exc:  # every failure is data, counted by kind
                result.failures[_failure_kind(exc)] += 1
                continue
            result.ok += 1
            result.latencies.append(clock() - t0)

    await asyncio.gather(*(one_loop() for _ in range(concurrency)))
    result.seconds = clock() - start
    return result


def _runner() -> asyncio.Runner:
    """uvloop when available (medlb depends on it), so the client costs as little as the loop allows."""
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def echo_loop_name() -> str:
    try:
        from importlib.metadata import version

        return f"uvloop {version('uvloop')}"
    except Exception:  # not installed: the stdlib loop
        return "asyncio"


def run_echo(port: int, concurrency: int, duration: float) -> EchoResult:
    with _runner() as runner:
        return runner.run(_echo_loops(port, concurrency, duration))


class EchoProbe:
    """A readiness probe: one whole C-ECHO association; ``last`` keeps what the last failed attempt saw."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.last = ""

    def __call__(self) -> bool:
        try:
            with _runner() as runner:
                runner.run(echo_association(self.port, limit=5.0))
        except Exception as exc:
            self.last = _failure_kind(exc)
            return False
        return True


# --------------------------------------------------------------------------- storescu


@dataclass
class StoreRun:
    """One storescu run, read from its log: the association window, the successes, the complaints."""

    window: float
    successes: int
    problems: list[str]


def parse_storescu_log(text: str) -> StoreRun:
    """From "Requesting Association" to "Releasing Association", on storescu's own clock."""
    start = end = None
    successes = 0
    problems = []
    for line in text.splitlines():
        m = _LOG_LINE.match(line.strip())
        if m is None:
            if line.strip():
                problems.append(line.strip())
            continue
        hh, mm, ss, ms, us, level, message = m.groups()
        t = int(hh) * 3600 + int(mm) * 60 + int(ss) + int(ms) / 1e3 + int(us) / 1e6
        if start is not None and t < start:
            t += 86400  # the run crossed midnight
        if message.startswith("Requesting Association"):
            start = t
        elif message.startswith("Releasing Association"):
            end = t
        elif message.startswith("Received Store Response (Success)"):
            successes += 1
        if level in ("WARN", "ERROR", "FATAL"):
            problems.append(f"{level}: {message}")
    if start is None or end is None:
        raise BenchError(f"storescu's log has no association window: {text.strip()[-500:]}")
    return StoreRun(end - start, successes, problems)


# --------------------------------------------------------------------------- the bench


class Bench(common.BenchBase):
    """Makes the instances, starts storescp and the proxies, takes the measurements; children die in ``close``."""

    def __init__(self, settings: Settings) -> None:
        super().__init__("medlb-dicom-bench-")
        self.s = settings
        self.scp: Proc | None = None
        self.scp_port = 0
        self.log_config = self.tmp / "storescu-log.cfg"
        self.instances: dict[str, InstanceSet] = {}
        #: Load averages (1 min) before and after the measurements: a busy machine shows here.
        self.load: list[str] = []

    # -- backend

    def make_instances(self) -> None:
        print(f"== writing {self.s.small_count} small and {self.s.large_count} large instances", flush=True)
        self.instances["small"] = make_small(self.tmp / "small", self.s.small_count)
        self.instances["large"] = make_large(self.tmp / "large", self.s.large_count, self.s.large_mb)
        self.log_config.write_text(STORESCU_LOG_CONFIG)

    def start_storescp(self) -> None:
        """One storescp, single process (associations one at a time), receiving everything and writing nothing."""
        self.scp_port = common.free_port()
        cmd = ["storescp", "--ignore", "-dhl", "-aet", SCP_AE, "-pdu", str(self.s.pdu), str(self.scp_port)]
        self.scp = self.children.start("storescp", cmd)
        common.wait_port(self.scp_port, 10, self.scp.popen)
        probe = EchoProbe(self.scp_port)
        if not probe():
            raise BenchError(f"storescp does not answer a C-ECHO: {probe.last}; log:\n{self.scp.log_tail()}")

    # -- proxies

    def haproxy_config(self, port: int) -> str:
        """``mode tcp`` as in tcp_bench: splice, generous timeouts, no checks, no logging."""
        return common.haproxy_tcp_config(
            port,
            f"{HOST}:{self.scp_port}",
            maxconn=HAPROXY_MAXCONN,
            bufsize=self.s.haproxy_bufsize,
            splice=self.s.haproxy_splice,
        )

    def medlb_config(self, port: int) -> str:
        """One ``mode: dicom`` frontend, one backend with storescp (``ae_title`` STORE), a C-ECHO check every 2 s."""
        out = [
            "global: {nofile: 200000}",
            "defaults:",
            "  timeouts: {connect: 3s, client: 1h, server: 1h, queue: 30s, check: 5s}",
            "  check: {inter: 2s}",
            "frontends:",
            f'  - {{name: pacs, mode: dicom, bind: ["{HOST}:{port}"], maxconn: 30000, default_backend: archive}}',
            "backends:",
            "  - name: archive",
            "    balance: roundrobin",
            f"    check: {{type: dicom-echo, calling_ae: {CHECK_AE}}}",
            "    servers:",
            f'      - {{name: store1, address: "{HOST}:{self.scp_port}", ae_title: {SCP_AE}}}',
        ]
        return "\n".join(out) + "\n"

    def start_proxy(self, path: str) -> tuple[Proc | None, int]:
        """Start ``path``'s proxy; ready means a whole C-ECHO association succeeds through it."""
        if path == "direct":
            return None, self.scp_port
        port = common.free_port()
        cfg = self.tmp / f"{path}.cfg"
        if path == "haproxy":
            cfg.write_text(self.haproxy_config(port))
            proc = self.children.start("haproxy", ["haproxy", "-f", str(cfg), "-db"])
        else:
            cfg.write_text(self.medlb_config(port))
            proc = common.start_medlb(self.children, self.medlb, path, cfg)
        probe = EchoProbe(port)
        try:
            common.wait_ready(self.children, proc, [port], [(f"{path}: C-ECHO", probe)])
        except BenchError as exc:
            raise BenchError(f"{exc}\nlast probe answer: {probe.last}" if probe.last else str(exc)) from exc
        return proc, port

    # -- measurements

    def _cpu(self, proc: Proc | None) -> float:
        return cpu_seconds_precise(proc.pgid) if proc is not None else 0.0

    def store(self, test: str, port: int, proxy: Proc | None) -> tuple[dict[str, float], str]:
        """One storescu association sending every instance of ``test``; a single failed store fails the run."""
        inst = self.instances[test]
        cmd = ["storescu", "-lc", str(self.log_config), "-aet", SCU_AE, "-aec", SCP_AE, "-pdu", str(self.s.pdu)]
        cmd += [HOST, str(port), "+sd", str(inst.directory)]
        proxy0, scp0 = self._cpu(proxy), self._cpu(self.scp)
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=self.tmp)
        except subprocess.TimeoutExpired as exc:
            raise BenchError("storescu did not finish within 300 s") from exc
        wall = time.monotonic() - t0
        children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        proxy_cpu, scp_cpu = self._cpu(proxy) - proxy0, self._cpu(self.scp) - scp0
        if proxy is not None and proxy.popen.poll() is not None:
            raise BenchError(f"the proxy exited with {proxy.popen.returncode} during the run")
        log = out.stdout + out.stderr
        run = parse_storescu_log(log)
        if out.returncode != 0 or run.successes != inst.count or run.problems:
            complaints = "; ".join(run.problems[-5:]) or log.strip()[-300:]
            raise BenchError(
                f"storescu exited with {out.returncode}, {run.successes} of {inst.count} stores succeeded: {complaints}"
            )
        scu_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
        values = {f"{test}_mbps": inst.dataset_bytes / run.window / MB}
        if test == "small":
            values["small_ips"] = inst.count / run.window
        # CPU per second of association window: the proxy and storescp do nothing outside it.
        values[f"{test}_scp_cpu"] = scp_cpu / run.window
        if proxy is not None:
            values[f"{test}_proxy_cpu"] = proxy_cpu / run.window
        summary = f"window {run.window:.3f} s (storescu wall {wall:.3f} s, storescu CPU {scu_cpu:.2f} s)"
        if proxy is not None:
            summary += f", proxy CPU {_per(proxy_cpu / inst.count)} per instance"
        return values, summary

    def echo(self, port: int, proxy: Proc | None) -> tuple[dict[str, float], str]:
        """C-ECHO associations from ``concurrency`` loops for ``duration`` s; failures are counted, never dropped."""
        proxy0, scp0 = self._cpu(proxy), self._cpu(self.scp)
        client0 = time.process_time()
        result = run_echo(port, self.s.concurrency, self.s.duration)
        client_cpu = time.process_time() - client0
        proxy_cpu, scp_cpu = self._cpu(proxy) - proxy0, self._cpu(self.scp) - scp0
        if proxy is not None and proxy.popen.poll() is not None:
            raise BenchError(f"the proxy exited with {proxy.popen.returncode} during the run")
        if result.ok == 0:
            raise BenchError(f"no C-ECHO association completed; failures: {result.failure_text()}")
        ms = sorted(x * 1000 for x in result.latencies)
        values = {
            "echo_aps": result.ok / result.seconds,
            "echo_p50": statistics.median(ms),
            "echo_p99": ms[min(len(ms) - 1, round(0.99 * (len(ms) - 1)))],
            "echo_failed": float(result.failed),
            "echo_scp_cpu": scp_cpu / result.seconds,
            "echo_client_cpu": client_cpu / result.seconds,
        }
        if proxy is not None:
            values["echo_proxy_cpu"] = proxy_cpu / result.seconds
        summary = f"{result.ok} ok, {result.failed} failed"
        if proxy is not None:
            summary += f", proxy CPU {_per(proxy_cpu / (result.ok + result.failed))} per association"
        if result.failed:
            summary += f" ({result.failure_text()})"
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
                    # One unmeasured association of small instances: first-use costs (a proxy's first
                    # association, storescu's first read of the files) stay out of the first repetition.
                    self.store("small", port, proxy)
                except BenchError as exc:
                    self._fail(path, list(TESTS), BenchError(f"warm-up: {exc}"), results)
                    if proxy is not None:
                        self.children.stop(proxy)
                    continue
                if proxy is not None:
                    ready_lines[path] = len(proxy.log_lines())
                plans[path] = [
                    ("small", proxy, functools.partial(self.store, "small", port, proxy)),
                    ("large", proxy, functools.partial(self.store, "large", port, proxy)),
                    ("echo", proxy, functools.partial(self.echo, port, proxy)),
                ]

            def show(path: str, test: str, sample: common.Sample) -> None:
                shown = ", ".join(
                    f"{METRICS[key][1].split(': ', 1)[1]} {fmt(v, key)}"
                    for key, v in sample.values.items()
                    if key in METRICS
                )
                print(f"  {PATH_TITLES[path]:8} {TESTS[test]:34} {shown}  [{sample.summary}]", flush=True)

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

    def _aggregate(
        self, path: str, test: str, runs: list[common.Sample], results: dict[tuple[str, str], float | None]
    ) -> None:
        values, _ = common.medians(runs)
        for key in metrics_of(test):
            results[(path, key)] = values[key]
        if test == "echo":
            results[(path, "echo_failed")] = sum(r.values["echo_failed"] for r in runs)
        if f"{test}_proxy_cpu" in values:
            self.cpu[(path, test)] = values[f"{test}_proxy_cpu"]
        parts = [
            f"{METRICS[key][1].split(': ', 1)[1]} " + ", ".join(fmt(r.values[key], key) for r in runs)
            for key in metrics_of(test)
            if key != "echo_failed"
        ]
        parts.append("storescp CPU " + ", ".join(f"{r.values[f'{test}_scp_cpu']:.2f}" for r in runs))
        if test == "echo":
            parts.append("client CPU " + ", ".join(f"{r.values['echo_client_cpu']:.2f}" for r in runs))
        self.details[(path, test)] = "runs: " + "; ".join(parts) + " — " + "; ".join(r.summary for r in runs)
        bad = [f"run {i + 1}: {r.summary}" for i, r in enumerate(runs) if r.values.get("echo_failed")]
        if bad:
            self.notes.append(f"{PATH_TITLES[path]} / {TESTS[test]}: failed associations in {'; '.join(bad)}")

    def _fail(self, path: str, tests: list[str], exc: Exception, results: dict[tuple[str, str], float | None]) -> None:
        for test in tests:
            for key in metrics_of(test):
                results[(path, key)] = float("nan")
        self.note_failure(f"{PATH_TITLES[path]} / {'; '.join(TESTS[t] for t in tests)}: FAILED: {exc}")


def cpu_seconds_precise(pgid: int) -> float:
    """CPU time of a process group from every thread's ``schedstat`` (nanoseconds), else from ``stat`` (ticks).

    ``common.cpu_seconds`` counts clock ticks (10 ms): too coarse for a storage run of a few hundred ms.
    """
    total_ns = 0
    try:
        for pid in common.proc_group_pids(pgid):
            with contextlib.suppress(OSError):  # a thread or process that ended meanwhile
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with contextlib.suppress(OSError):
                        total_ns += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (ValueError, IndexError):
        return common.cpu_seconds(pgid)
    return total_ns / 1e9


def _per(seconds: float) -> str:
    """A CPU time per instance or association: microseconds below 10 ms, else milliseconds."""
    return f"{seconds * 1e6:.0f} µs" if seconds < 0.01 else f"{seconds * 1e3:.1f} ms"


# --------------------------------------------------------------------------- report


def fmt(value: float | None, key: str) -> str:
    """Rates whole (one decimal below 100), MB/s whole above 100, milliseconds with two decimals below 10."""

    def number(v: float) -> str:
        if key == "echo_failed":
            return f"{v:.0f}"
        if key.endswith(("_p50", "_p99")):
            return f"{v:.2f}" if v < 10 else f"{v:.1f}"
        return f"{v:.0f}" if v >= 100 else f"{v:.1f}"

    return common.fmt_value(value, number)


def targets(results: dict[tuple[str, str], float | None]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, computed from the table: (target, measured, met)."""
    t = common.Targets()

    def r(key: str, other: str) -> float | None:
        return common.ratio(results[("medlb", key)], results[(other, key)])

    for key, what in (("small_mbps", "Small-instance throughput"), ("large_mbps", "Large-instance throughput")):
        t.add_ratio(f"{what} >= 0.95x direct", r(key, "direct"), lambda v: v >= 0.95)
        t.add_ratio(f"{what} >= 1.0x HAProxy", r(key, "haproxy"), lambda v: v >= 1.0)
    t.add_ratio("C-ECHO association rate >= 0.7x direct", r("echo_aps", "direct"), lambda v: v >= 0.7)
    return t.items


def render(bench: Bench, results: dict[tuple[str, str], float | None], meta: dict[str, str], paths: list[str]) -> str:
    """Header, the table (a column per path that ran, a ratio column when both its paths ran), targets, details."""
    s = bench.s
    ran = [p for p in PATHS if p in paths]
    ratios = [(title, a, b) for title, a, b in RATIOS if a in ran and b in ran]
    small, large = bench.instances.get("small"), bench.instances.get("large")
    lines = [
        f"# DICOM benchmark: direct vs HAProxy vs medlb ({meta['date']})",
        "",
        *common.machine_lines(meta),
        f"- Load average (1/5/15 min) before and after the measurements: {' / '.join(bench.load) or 'n/a'} "
        f"(the machine has {meta['nproc']} CPUs; above that, something else ran too)",
        f"- DCMTK: {meta['dcmtk']}; `TCP_NODELAY=1` in the environment of every DCMTK process; "
        f"max PDU {s.pdu} on both sides (`-pdu {s.pdu}`)",
        f"- Storage SCP: `storescp --ignore -dhl -aet {SCP_AE} -pdu {s.pdu} PORT`: one process, one association at "
        "a time, receives every byte and writes none; the same storescp behind every path",
        f"- storescu: `storescu -lc LOGCFG -aet {SCU_AE} -aec {SCP_AE} -pdu {s.pdu} 127.0.0.1 PORT +sd DIR` "
        "(DCMTK's default proposal of presentation contexts), one association per run; LOGCFG adds microsecond "
        "timestamps and turns off the progress dots",
        f"- Small instances: {small.description if small else 'not made'}",
        f"- Large instances: {large.description if large else 'not made'} (pydicom {meta['pydicom']})",
        f"- HAProxy: {meta['haproxy']} — `mode tcp`, "
        + ("`option splice-auto`, " if s.haproxy_splice else "")
        + f"`tune.bufsize {s.haproxy_bufsize}`, nbthread left at default ({meta['haproxy_threads']} here), "
        "timeouts connect 3s / client 1h / server 1h, no checks, no logging, `haproxy -f cfg -db`",
        f"- medlb: one `mode: dicom` frontend (default `dicom:` settings), one backend with the storescp "
        f"(`ae_title: {SCP_AE}`), `check: {{type: dicom-echo, calling_ae: {CHECK_AE}}}` every 2 s, "
        "`medlb run --no-session-log --log-level warning`",
        f"- C-ECHO: {s.concurrency} concurrent loops for {s.duration} s per run, in the bench process "
        f"({echo_loop_name()}), each association a new TCP connection (`TCP_NODELAY`): A-ASSOCIATE-RQ "
        "(Verification, Implicit VR LE) from medlb's codec, C-ECHO-RQ, A-RELEASE-RQ, A-RELEASE-RP, close; "
        "latency is connect to A-RELEASE-RP" + (" (smoke run)" if s.smoke else ""),
        f"- Cells are the median of {s.repeat} run(s) per metric, interleaved across paths (runs under Details), "
        "after one unmeasured association of the small instances per path (warm-up). "
        "Storage throughput is the data sets' bytes (the files without preamble and file meta) over the "
        'association window on storescu\'s own clock, from "Requesting Association" to "Releasing '
        'Association"; MB = 10^6 bytes. Ratio columns are medlb divided by direct and by HAProxy: higher is '
        "better for rates and MB/s, lower is better for latency.",
    ]
    rows = []
    for key, (_, title, has_ratio) in METRICS.items():
        cells = [fmt(results[(p, key)], key) for p in ran]
        cells += [
            common.fmt_ratio(common.ratio(results[(a, key)], results[(b, key)])) if has_ratio else "n/a"
            for _, a, b in ratios
        ]
        rows.append((title, cells))
    lines += common.table_lines([*(PATH_TITLES[p] for p in ran), *(title for title, _, _ in ratios)], rows)
    lines += common.target_lines("Targets (medlb, computed from the table)", targets(results))
    detail_rows = [(p, t, bench.cpu.get((p, t)), bench.details.get((p, t), "")) for p in ran for t in TESTS]
    lines += common.details_lines([(PATH_TITLES[p], TESTS[t], cpu, detail) for p, t, cpu, detail in detail_rows])
    lines += [
        "",
        "Proxy CPU is the proxy's CPU time over the association window (storage) or the run (C-ECHO), in cores "
        "(1.00 = one core busy); storescp and client CPU likewise, and the proxy's CPU time per instance or per "
        "association is in the detail. storescp serves one association at a time, so the C-ECHO rate is the "
        "inverse of the time storescp spends per association, and that time includes the round trips through "
        "the proxy: the C-ECHO rows measure what a proxy adds to an association's latency, more than how many "
        "associations it could carry.",
    ]
    lines += common.notes_lines(bench.notes)
    return "\n".join(lines) + "\n"


def collect_meta() -> dict[str, str]:
    """Machine and tool versions for the header; informative, never fatal."""
    meta = common.collect_meta(("haproxy",))
    meta["dcmtk"] = common.first_line(["storescu", "--version"]).strip("$ ").removeprefix("dcmtk: ")
    meta["pydicom"] = "unknown"
    with contextlib.suppress(ImportError):
        import pydicom

        meta["pydicom"] = pydicom.__version__
    return meta


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = common.make_parser(
        __doc__,
        "dicom",
        PATHS,
        smoke="one repetition, 50 small and 1 large instance, 1 s of C-ECHO: proves the harness runs",
        duration="seconds per C-ECHO run (default 10, smoke 1)",
    )
    for action in p._actions:  # the shared parser's nginx option has no meaning here
        if action.dest == "nginx_workers":
            action.help = argparse.SUPPRESS
    p.add_argument("--small", type=int, help="small instances (default 300, smoke 50)")
    p.add_argument("--large", type=int, help="large instances (default 4, smoke 1)")
    p.add_argument("--large-mb", type=int, default=25, help="MB of pixel data per large instance (default 25)")
    p.add_argument("--pdu", type=int, default=16384, help="DCMTK -pdu on storescp and storescu (default 16384)")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent C-ECHO loops (default 8)")
    p.add_argument("--haproxy-bufsize", type=int, default=16384, help="HAProxy tune.bufsize (default 16384)")
    p.add_argument(
        "--haproxy-splice",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="HAProxy option splice-auto (default on)",
    )
    args = common.parse_common_args(p, argv)
    if not 4096 <= args.pdu <= 131072:
        p.error("--pdu must be within 4096..131072 (DCMTK's range)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    common.require_tools(TOOLS)
    paths = common.parse_paths(args.paths, PATHS)
    common.on_sigterm_clean_up()
    os.environ["TCP_NODELAY"] = "1"  # read by DCMTK (storescp, storescu): Nagle off, as the others do
    settings = Settings(
        duration=args.duration,
        repeat=args.repeat,
        smoke=args.smoke,
        small_count=max(1, args.small if args.small is not None else (50 if args.smoke else 300)),
        large_count=max(1, args.large if args.large is not None else (1 if args.smoke else 4)),
        large_mb=max(1, args.large_mb),
        pdu=args.pdu,
        concurrency=max(1, args.concurrency),
        haproxy_bufsize=args.haproxy_bufsize,
        haproxy_splice=args.haproxy_splice,
    )
    meta = collect_meta()
    out = args.out or common.REPO / "bench" / "results" / f"{meta['stamp']}-dicom.md"
    bench = Bench(settings)
    results: dict[tuple[str, str], float | None] = {(p, k): float("nan") for p in PATHS for k in METRICS}

    def steps() -> None:
        bench.make_instances()
        bench.start_storescp()
        bench.measure(paths, results)

    return common.run_and_report(bench, steps, lambda: render(bench, results, meta, paths), out, results, paths)


if __name__ == "__main__":
    sys.exit(main())
