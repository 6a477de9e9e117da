"""``mode: hl7`` end to end: a real medlb process between real HL7 v2 peers over MLLP on loopback.

Peers nobody here wrote: python-hl7's asyncio MLLP API (``hl7.mllp.start_hl7_server`` receivers that
answer with ``Message.create_ack``, ``hl7.mllp.open_hl7_connection`` senders), run in threads with
their own event loop or, where a test must SIGKILL one, as a subprocess (``python -m
tests.io.test_hl7``). Raw sockets stand in where the exact bytes on the wire matter (framing torture,
a server whose ACK comes late). Every receiver records what it got (control ID, exact bytes, when)
and the exact ACK bytes it sent; every ACK a receiver sends names it in MSH-3, so a test can tell
which server really answered a message and check that this server really stored it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest

from tests.helpers import LabBase, Medlb, ThreadedServer, free_port, log_field, running_medlb, wait_until

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[2]
#: python-hl7 defaults to asyncio's 64 KiB limit and ASCII; every peer here sets both.
LIMIT = 4 * 1024 * 1024
VT, END = b"\x0b", b"\x1c\r"
CHECK_PREFIX = "MEDLBCHK"  # control IDs of medlb's own hl7 health checks
#: Most retry rounds a message can have in the tests' delivery_timeout (3 s, a round every 250 ms).
MAX_ROUNDS = 3 / 0.25 + 2

#: ``answer(control_id)`` -> (MSA-1 to answer with or None to never answer, seconds to wait first).
Answer = Callable[[str], tuple[str | None, float]]


def always(code: str | None = "AA", delay: float = 0.0) -> Answer:
    return lambda _control_id: (code, delay)


# --------------------------------------------------------------------------- messages


def message(
    control_id: str,
    patient: str = "P1",
    *,
    mtype: str = "ADT^A01^ADT_A01",
    app: str = "HIS",
    facility: str = "NORTH",
    name: str = "DOE^JOHN",
    charset: str = "",
    enhanced: bool = False,
    note: str = "",
) -> str:
    """An ER7 message; ``enhanced`` sets MSH-15/16 (AL/NE), ``charset`` MSH-18."""
    msh = ["MSH", "^~\\&", app, facility, "RIS", "RADIOLOGY", "20240501120000", "", mtype, control_id, "P", "2.5"]
    if enhanced or charset:
        msh += ["", "", "AL" if enhanced else "", "NE" if enhanced else "", "", charset]
    segments = ["|".join(msh), "EVN|A01|20240501120000", f"PID|1||{patient}^^^HOSP^MR||{name}"]
    if note:
        segments.append(f"OBX|1|TX|NOTE||{note}")
    return "\r".join(segments) + "\r"


def framed(text: str, encoding: str = "utf-8") -> bytes:
    return VT + text.encode(encoding) + END


@dataclasses.dataclass(frozen=True)
class Reply:
    """An acknowledgement as the sender saw it."""

    raw: bytes
    code: str  # MSA-1
    acked: str  # MSA-2
    sender: str  # MSH-3: the receiver's name, or the message's MSH-5 in medlb's own NAKs
    text: str  # MSA-3


def read_reply(raw: bytes, encoding: str = "utf-8") -> Reply:
    parsed = hl7.parse(raw.decode(encoding))
    msa = parsed.segment("MSA")
    text = str(msa(3)) if len(msa) > 3 else ""
    return Reply(raw, str(msa(1)), str(msa(2)), str(parsed.segment("MSH")(3)), text)


# --------------------------------------------------------------------------- receivers


@dataclasses.dataclass
class Got:
    """One message as a receiver got it."""

    control_id: str
    raw: bytes
    patient: str
    conn: int  # which of the receiver's connections carried it
    at: float  # time.monotonic() when it was read
    done: float = 0.0  # when the answer was written (0: never)
    code: str = ""
    ack: bytes = b""  # the exact ACK payload written


class Receiver:
    """A python-hl7 MLLP receiver (``start_hl7_server``) on its own event loop in a thread.

    Each message is answered with ``create_ack(code, application=name)`` after ``answer`` says; the
    ACK's MSA-3 carries the message's PID-5 (so non-ASCII text travels back too). medlb's health
    checks (control ID ``MEDLBCHK...``) are answered with ``check_code`` and kept apart.
    """

    def __init__(
        self,
        name: str,
        *,
        answer: Answer | None = None,
        check_code: str = "AA",
        encoding: str = "utf-8",
        port: int = 0,
        on_event: Callable[[str, str], None] | None = None,
    ) -> None:
        self.name = name
        self.answer = answer or always()
        self.check_code = check_code
        self.encoding = encoding
        self.on_event = on_event
        self.lock = threading.Lock()
        self.got: list[Got] = []
        self.checks: list[str] = []
        self.errors: list[str] = []
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[Any] = set()
        self._server: asyncio.Server | None = None
        self._stopped = False
        self.port = port
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), name=f"receiver-{name}", daemon=True)
        self.thread.start()
        if not started.wait(10) or self._server is None:
            raise RuntimeError(f"receiver {name} did not start: {self.errors}")

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self._server = self.loop.run_until_complete(
                hl7.mllp.start_hl7_server(self._serve, HOST, self.port, limit=LIMIT, encoding=self.encoding)
            )
            self.port = self._server.sockets[0].getsockname()[1]
        except OSError as exc:
            self.errors.append(repr(exc))
            started.set()
            return
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: Any, writer: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        with self.lock:
            self.connections += 1
            conn = self.connections
        try:
            while True:
                block: bytes = await reader.readblock()
                parsed = hl7.parse(block.decode(self.encoding))
                control_id = str(parsed.segment("MSH")(10))
                if control_id.startswith(CHECK_PREFIX):
                    with self.lock:
                        self.checks.append(control_id)
                    code: str | None = self.check_code
                    delay = 0.0
                    got = None
                else:
                    try:
                        pid = parsed.segment("PID")
                        patient = str(pid(3)).split("^")[0]
                        note = str(pid(5))
                    except (KeyError, IndexError):
                        patient, note = "", ""
                    got = Got(control_id, block, patient, conn, time.monotonic())
                    with self.lock:
                        self.got.append(got)
                    if self.on_event is not None:
                        self.on_event("got", control_id)
                    code, delay = self.answer(control_id)
                if delay:
                    await asyncio.sleep(delay)
                if code is None:
                    continue
                ack = parsed.create_ack(code, application=self.name)
                if got is not None and note:
                    ack.segment("MSA").assign_field(note, 3)
                payload = str(ack).encode(self.encoding)
                if got is not None:
                    # Recorded before the write: medlb may send the next message the moment it lands.
                    with self.lock:
                        got.done, got.code, got.ack = time.monotonic(), code, payload
                    if self.on_event is not None:
                        self.on_event(code, control_id)
                writer.writeblock(payload)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            self._writers.discard(writer)
            writer.transport.abort()
            self._tasks.discard(task)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def stop(self) -> None:
        """Stop listening and reset every connection (what a crashed receiver looks like to medlb)."""
        if self._stopped:
            return
        self._stopped = True
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        self.loop.close()

    # -- what it got ----------------------------------------------------------------------

    def ids(self) -> list[str]:
        with self.lock:
            return [g.control_id for g in self.got]

    def record(self, control_id: str) -> Got:
        with self.lock:
            matches = [g for g in self.got if g.control_id == control_id]
        assert len(matches) == 1, (self.name, control_id, matches)
        return matches[0]


def _receiver_main(argv: list[str]) -> None:
    """``python -m tests.io.test_hl7 NAME PORT RECORD DELAY``: a receiver as a process of its own.

    It appends ``got <id>`` when a message arrives and ``<code> <id>`` once its ACK is written, flushed
    each time, so what it stored survives a SIGKILL.
    """
    name, port, record, delay = argv[0], int(argv[1]), Path(argv[2]), float(argv[3])
    out = record.open("a", buffering=1)
    lock = threading.Lock()

    def event(what: str, control_id: str) -> None:
        with lock:
            out.write(f"{what} {control_id}\n")
            out.flush()

    Receiver(name, answer=always("AA", delay), port=port, on_event=event)
    event("ready", name)
    threading.Event().wait()


class RecordFile:
    """What a subprocess receiver wrote: control IDs it got, and the ones it acknowledged."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[tuple[str, str]]:
        if not self.path.exists():
            return []
        pairs = (line.partition(" ") for line in self.path.read_text().splitlines())
        return [(what, cid) for what, sep, cid in pairs if sep]

    def got(self) -> set[str]:
        return {cid for what, cid in self.lines() if what == "got"}

    def acked(self) -> set[str]:
        return {cid for what, cid in self.lines() if what == "AA"}


# --------------------------------------------------------------------------- raw MLLP sockets


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed sender's kernel does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class FrameReader:
    """Reads MLLP frames from a socket, keeping what follows a frame for the next call."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def frame(self, timeout: float = 10.0) -> bytes:
        self.sock.settimeout(timeout)
        while END not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed before a whole frame: {self.buf[:64]!r}")
            self.buf += chunk
        block, self.buf = self.buf.split(END, 1)
        assert block[:1] == VT, block[:16]
        return block[1:]

    def until_close(self, limit: float) -> tuple[bytes, float]:
        """Everything left until the peer closes, and how long that took (fails after ``limit``)."""
        self.sock.settimeout(limit)
        start = time.monotonic()
        data, self.buf = self.buf, b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(f"connection still open after {limit}s (received {data[:64]!r})")
        return data, time.monotonic() - start


class LateServer(ThreadedServer):
    """A raw MLLP server that answers the first message it ever gets only after ``late`` seconds (on
    the same connection, then keeps reading it), and every later one correctly after ``delay``. ACKs
    name it ``LATE`` in MSH-3. Health-check connections (no data) are ignored."""

    def __init__(self, late: float, delay: float = 0.0) -> None:
        self.late, self.delay = late, delay
        self.lock = threading.Lock()
        self.got: list[tuple[int, str]] = []  # (connection number, control ID)
        self.sent: list[tuple[int, str, float]] = []  # (connection, MSA-2, when), late ACK included
        self.write_errors: list[str] = []
        self.connections = 0
        super().__init__()

    def respond(self, sock: socket.socket) -> None:
        with self.lock:
            self.connections += 1
            conn = self.connections
        reader = FrameReader(sock)
        try:
            while True:
                payload = reader.frame(timeout=30)
                control_id = payload.split(b"\r")[0].split(b"|")[9].decode()
                with self.lock:
                    first = not self.got
                    self.got.append((conn, control_id))
                time.sleep(self.late if first else self.delay)
                ack = (
                    f"MSH|^~\\&|LATE|X|HIS|NORTH|20240501120000||ACK^A01^ACK|L{control_id}|P|2.5\rMSA|AA|{control_id}\r"
                )
                try:
                    sock.sendall(framed(ack))
                except OSError as exc:
                    self.write_errors.append(repr(exc))
                    return
                with self.lock:
                    self.sent.append((conn, control_id, time.monotonic()))
        except (ConnectionError, OSError, IndexError):
            return


# --------------------------------------------------------------------------- medlb and the lab


def backend(
    name: str, servers: list[tuple[str, int]], *, check: dict[str, Any] | None = None, balance: str = "roundrobin"
) -> dict[str, Any]:
    return {
        "name": name,
        "balance": balance,
        "check": check or {"type": "none"},
        "servers": [{"name": s, "address": f"{HOST}:{p}"} for s, p in servers],
    }


def hl7_config(
    port: int, backends: list[dict[str, Any]], *, hl7_settings: dict[str, Any] | None = None, **frontend: Any
) -> dict[str, Any]:
    """One ``mode: hl7`` frontend with short timeouts; the first backend is the default."""
    settings: dict[str, Any] = {"ack_timeout": "1s", "delivery_timeout": "3s", "connections_per_server": 2}
    settings.update(hl7_settings or {})
    fe: dict[str, Any] = {
        "name": "feed",
        "mode": "hl7",
        "bind": [f"{HOST}:{port}"],
        "default_backend": backends[0]["name"],
        "hl7": settings,
    }
    fe.update(frontend)
    return {
        "global": {"hard_stop_after": "2s"},
        "defaults": {
            "timeouts": {"connect": "500ms", "client": "1m", "server": "1m", "queue": "2s", "check": "500ms"},
            "check": {"inter": "500ms", "fastinter": "200ms", "downinter": "300ms", "rise": 1, "fall": 1},
        },
        "frontends": [fe],
        "backends": backends,
    }


def wait_up(lb: Medlb, *keys: str) -> None:
    for key in keys:
        lb.wait_for_log(f"server {key} op_state DOWN -> UP")


def log_lines(lb: Medlb) -> list[str]:
    """medlb's per-message log lines."""
    return [line for line in lb.log.splitlines() if "medlb.hl7: hl7 client=" in line]


def lines_for(lb: Medlb, control_id: str) -> list[str]:
    return [line for line in log_lines(lb) if f" control_id={control_id} " in line]


def the_line(lb: Medlb, control_id: str, timeout: float = 5.0) -> str:
    """The one log line of ``control_id`` (waits for it; fails on none or several)."""
    wait_until(lambda: lines_for(lb, control_id), timeout=timeout)
    time.sleep(0.05)
    lines = lines_for(lb, control_id)
    assert len(lines) == 1, lines
    return lines[0]


class Lab(LabBase):
    """Everything a test starts, stopped in reverse order whatever happens."""

    def receiver(self, name: str, **kwargs: Any) -> Receiver:
        receiver = Receiver(name, **kwargs)
        self.stack.callback(receiver.stop)
        return receiver

    def late_server(self, late: float, delay: float = 0.0) -> LateServer:
        server = LateServer(late, delay)
        self.stack.callback(server.stop)
        return server

    def receiver_process(self, name: str, delay: float) -> tuple[subprocess.Popen[bytes], int, RecordFile]:
        """A python-hl7 receiver in a subprocess of its own (to be SIGKILLed): (process, port, record)."""
        port = free_port()
        record = RecordFile(self.tmp / f"{name}.record")
        log = (self.tmp / f"{name}.log").open("wb")
        self.stack.callback(log.close)
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.io.test_hl7", name, str(port), str(record.path), str(delay)],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.stack.callback(stop)

        def ready() -> bool:
            assert proc.poll() is None, f"receiver {name} exited: {(self.tmp / f'{name}.log').read_text()}"
            return any(what == "ready" for what, _ in record.lines())

        wait_until(ready, timeout=15)
        return proc, port, record


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    lab = Lab(tmp_path)
    with lab.stack:
        yield lab


# --------------------------------------------------------------------------- python-hl7 senders


@contextlib.asynccontextmanager
async def sender(port: int, encoding: str = "utf-8") -> Any:
    """A python-hl7 MLLP client connection: (reader, writer)."""
    reader, writer = await hl7.mllp.open_hl7_connection(HOST, port, limit=LIMIT, encoding=encoding)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def send(writer: Any, text: str, encoding: str = "utf-8") -> None:
    writer.writeblock(text.encode(encoding))
    await writer.drain()


async def next_reply(reader: Any, within: float = 10.0, encoding: str = "utf-8") -> Reply:
    block: bytes = await asyncio.wait_for(reader.readblock(), within)
    return read_reply(block, encoding)


def exchange(port: int, texts: list[str], encoding: str = "utf-8", timeout: float = 10.0) -> list[Reply]:
    """Send ``texts`` pipelined on one python-hl7 connection; return the replies in arrival order."""

    async def run() -> list[Reply]:
        async with sender(port, encoding) as (reader, writer):
            for text in texts:
                writer.writeblock(text.encode(encoding))
            await writer.drain()
            return [await next_reply(reader, timeout, encoding) for _ in texts]

    return asyncio.run(run())


def assert_stored(reply: Reply, control_id: str, *receivers: Receiver) -> Receiver:
    """``reply`` is an AA for ``control_id`` from a receiver that stored it and sent those exact bytes."""
    assert (reply.code, reply.acked) == ("AA", control_id), reply
    by_name = {r.name: r for r in receivers}
    assert reply.sender in by_name, f"{reply} came from no receiver"
    got = by_name[reply.sender].record(control_id)
    assert got.code == "AA" and got.ack == reply.raw, (got, reply)
    return by_name[reply.sender]


def total(control_id: str, *receivers: Receiver) -> int:
    return sum(r.ids().count(control_id) for r in receivers)


# --------------------------------------------------------------------------- 1. basics and the log line


def test_each_message_gets_its_own_server_ack_and_one_log_line(lab: Lab) -> None:
    r1, r2 = lab.receiver("R1"), lab.receiver("R2")
    port = free_port()
    lb = lab.medlb(hl7_config(port, [backend("ris", [("r1", r1.port), ("r2", r2.port)])]))
    wait_up(lb, "ris/r1", "ris/r2")
    ids = [f"BASIC{i}" for i in range(6)]
    replies = exchange(port, [message(cid, f"PAT{i}") for i, cid in enumerate(ids)])

    assert [r.acked for r in replies] == ids
    for reply, cid in zip(replies, ids, strict=True):
        stored_by = assert_stored(reply, cid, r1, r2)
        assert stored_by.record(cid).raw == message(cid, f"PAT{ids.index(cid)}").encode()
        assert total(cid, r1, r2) == 1
    assert r1.ids() and r2.ids(), "both servers take messages"
    for reply, cid in zip(replies, ids, strict=True):
        line = the_line(lb, cid)
        assert log_field(line, "client").startswith(f"{HOST}:")
        assert log_field(line, "type") == "ADT^A01^ADT_A01"
        assert log_field(line, "server") == reply.sender.lower()
        assert log_field(line, "ack") == "AA"
        assert log_field(line, "attempts") == "1"
        assert log_field(line, "term") == "acked"
        assert float(log_field(line, "latency_ms")) >= 0.0
    assert len(log_lines(lb)) == len(ids)


# --------------------------------------------------------------------------- 2. framing torture


@dataclasses.dataclass
class FramingLab:
    """One medlb for the framing tests (they only differ in what a sender writes): ``max_message``
    2048, an idle timeout of 1 s, and sending facility LATIN routed to an ISO-8859-1 receiver."""

    lb: Medlb
    port: int
    utf8: Receiver
    latin: Receiver

    def ids(self, prefix: str) -> list[str]:
        """Control IDs starting with ``prefix`` that any receiver got (each test uses its own prefix)."""
        return [cid for r in (self.utf8, self.latin) for cid in r.ids() if cid.startswith(prefix)]


@pytest.fixture(scope="module")
def framing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FramingLab]:
    lab = Lab(tmp_path_factory.mktemp("framing"))
    with lab.stack:
        utf8 = lab.receiver("RU", encoding="utf-8")
        latin = lab.receiver("RL", encoding="latin-1")
        port = free_port()
        config = hl7_config(
            port,
            [backend("utf8", [("ru", utf8.port)]), backend("latin", [("rl", latin.port)])],
            hl7_settings={
                "max_message": 2048,
                "rules": [{"if": {"sending_facility": ["LATIN"]}, "use_backend": "latin"}],
            },
            timeouts={"client": "1s"},
        )
        lb = lab.medlb(config)
        wait_up(lb, "utf8/ru", "latin/rl")
        yield FramingLab(lb, port, utf8, latin)


def test_one_byte_writes_and_two_messages_in_one_write(framing: FramingLab) -> None:
    r1 = framing.utf8
    texts = [message("BYTE1", "A"), message("BYTE2", "B"), message("BYTE3", "C")]
    with connect(framing.port) as sock:
        reader = FrameReader(sock)
        for byte in framed(texts[0]):
            sock.send(bytes([byte]))
            time.sleep(0.001)
        first = read_reply(reader.frame())
        sock.sendall(framed(texts[1]) + framed(texts[2]))  # two messages in one write
        second, third = read_reply(reader.frame()), read_reply(reader.frame())
    assert [first.acked, second.acked, third.acked] == ["BYTE1", "BYTE2", "BYTE3"]
    for reply, text in zip((first, second, third), texts, strict=True):
        assert_stored(reply, reply.acked, r1)
        assert r1.record(reply.acked).raw == text.encode()
    # A sender that half-closes after its last message still gets the reply, then medlb closes.
    with connect(framing.port) as sock:
        reader = FrameReader(sock)
        sock.sendall(b"\r\n\x00" + framed(message("BYTE4", "D")) + b"\r\n")  # fillers are skipped
        sock.shutdown(socket.SHUT_WR)
        half = read_reply(reader.frame())
        rest, took = reader.until_close(limit=5.0)
    assert_stored(half, "BYTE4", r1)
    assert rest == b"" and took < 0.9, (rest, took)  # at once, not at the idle timeout (1 s)
    assert framing.ids("BYTE") == ["BYTE1", "BYTE2", "BYTE3", "BYTE4"]


def test_message_without_end_block_is_never_forwarded(framing: FramingLab) -> None:
    """A sender stalls inside a frame: the idle timeout (``timeouts.client``, 1 s here) closes the
    connection; a start block inside a message (its end block lost) gets AR, then close. Either way
    nothing is forwarded and nothing is acknowledged."""
    with connect(framing.port) as sock:
        sock.sendall(VT + message("NOEND1").encode())  # no FS CR, ever
        data, took = FrameReader(sock).until_close(limit=6.0)
    assert data == b"", data
    assert 0.9 <= took < 2.5, f"closed after {took:.1f}s"
    with connect(framing.port) as sock:
        sock.sendall(VT + message("NOEND2").encode() + framed(message("NOEND3")))
        reader = FrameReader(sock)
        nak = read_reply(reader.frame())
        rest, took = reader.until_close(limit=3.0)
    assert (nak.code, nak.acked, nak.sender) == ("AR", "NOEND2", "RIS"), nak
    assert rest == b"" and took < 0.9  # at once, not at the idle timeout
    time.sleep(0.2)
    assert framing.ids("NOEND") == []
    assert "idle timeout inside a message" in framing.lb.log


def test_junk_before_the_start_block_closes_and_forwards_nothing(framing: FramingLab) -> None:
    with connect(framing.port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + framed(message("JUNK1")))
        data, took = FrameReader(sock).until_close(limit=3.0)
    assert data == b""
    assert took < 0.9  # at once, not at the idle timeout
    # The same message on a clean connection is served: the junk alone kept it from any server.
    [reply] = exchange(framing.port, [message("JUNK2")])
    assert_stored(reply, "JUNK2", framing.utf8)
    assert framing.ids("JUNK") == ["JUNK2"]


def test_oversize_message_gets_ae_then_close_and_is_not_forwarded(framing: FramingLab) -> None:
    fits = message("SIZE1", note="x" * 1500)
    big = message("SIZE2", note="x" * 5000)
    assert len(fits.encode()) <= 2048 < len(big.encode())
    with connect(framing.port) as sock:
        reader = FrameReader(sock)
        sock.sendall(framed(fits))
        ok = read_reply(reader.frame())
        sock.sendall(framed(big))
        nak = read_reply(reader.frame())
        rest, _ = reader.until_close(limit=3.0)
    assert_stored(ok, "SIZE1", framing.utf8)
    assert (nak.code, nak.acked) == ("AE", "SIZE2")
    assert nak.sender == "RIS"  # medlb's own NAK (MSH-3 = the message's MSH-5), from no server
    assert rest == b""
    assert framing.ids("SIZE") == ["SIZE1"]


def test_non_ascii_bytes_reach_the_server_and_come_back_exactly(framing: FramingLab) -> None:
    utf8, latin = framing.utf8, framing.latin
    name = "MÜLLER^JÖRG^ÇÅ"
    u_text = message("UTF1", "U1", name=name + "^日本", charset="UNICODE UTF-8")
    l_text = message("LAT1", "L1", name=name, facility="LATIN", charset="8859/1")
    [u_reply] = exchange(framing.port, [u_text], encoding="utf-8")
    [l_reply] = exchange(framing.port, [l_text], encoding="latin-1")

    assert utf8.record("UTF1").raw == u_text.encode("utf-8")
    assert latin.record("LAT1").raw == l_text.encode("latin-1")
    assert_stored(u_reply, "UTF1", utf8)  # the ACK bytes the receiver wrote, MSA-3 = PID-5
    assert_stored(l_reply, "LAT1", latin)
    assert (name + "^日本").encode("utf-8") in u_reply.raw
    assert name.encode("latin-1") in l_reply.raw and b"\xc3" not in l_reply.raw
    assert utf8.errors == [] and latin.errors == []


# --------------------------------------------------------------------------- 3. the ACK must match


def test_a_late_ack_is_never_taken_for_the_next_message(lab: Lab) -> None:
    """LATE answers message 1 after ack_timeout: medlb closes that connection and delivers message 1 on
    R1. Messages sent right after go to LATE again (``balance: first``) on a new connection; each ACK
    must carry its own MSA-2 and come from a server that got that message."""
    late = lab.late_server(late=1.6, delay=0.2)
    r1 = lab.receiver("R1")
    port = free_port()
    lb = lab.medlb(
        hl7_config(
            port,
            [backend("ris", [("late", late.port), ("r1", r1.port)], balance="first")],
            hl7_settings={"order_key": "none", "connections_per_server": 1},
        )
    )
    wait_up(lb, "ris/late", "ris/r1")

    async def run() -> tuple[Reply, float, list[Reply]]:
        async with sender(port) as (reader, writer):
            start = time.monotonic()
            await send(writer, message("TRAP1", "A"))
            first = await next_reply(reader)
            took = time.monotonic() - start
            later = []
            for i in range(2, 6):  # right after, while LATE's late ACK for TRAP1 is still due
                await send(writer, message(f"TRAP{i}", "B"))
                later.append(await next_reply(reader))
            return first, took, later

    first, took, later = asyncio.run(run())
    assert (first.code, first.acked, first.sender) == ("AA", "TRAP1", "R1")
    assert 0.9 <= took < 2.5, took  # after ack_timeout (1 s), from R1
    assert r1.ids() == ["TRAP1"]
    assert [cid for _, cid in late.got][:2] == ["TRAP1", "TRAP2"]
    for i, reply in enumerate(later, start=2):
        cid = f"TRAP{i}"
        assert (reply.code, reply.acked) == ("AA", cid), reply
        assert reply.sender == "LATE" and any(c == cid for _, c in late.got), (reply, late.got)
    trap_conn = late.got[0][0]
    assert all(conn != trap_conn for conn, cid in late.got[1:]), late.got  # never on the timed-out connection
    wait_until(lambda: any(cid == "TRAP1" for _, cid, _ in late.sent) or late.write_errors, timeout=3)
    line = the_line(lb, "TRAP1")
    assert (log_field(line, "server"), log_field(line, "attempts"), log_field(line, "ack")) == ("r1", "2", "AA")
    assert "did not acknowledge TRAP1" in lb.log


@pytest.mark.parametrize("reject", ["AR", "CR"])
def test_rejected_message_goes_to_another_server(lab: Lab, reject: str) -> None:
    """AR (original mode) or CR (enhanced mode, MSH-15/16 set: the commit ACK) from REJ: the message
    goes to OK, whose AA/CA is relayed byte for byte. Where every server rejects, medlb's own NAK."""
    enhanced = reject == "CR"
    success = "CA" if enhanced else "AA"
    rej = lab.receiver("REJ", answer=always(reject))
    ok = lab.receiver("OK", answer=always(success))
    only_rej = lab.receiver("REJ2", answer=always(reject))
    port = free_port()
    config = hl7_config(
        port,
        [
            backend("ris", [("rej", rej.port), ("ok", ok.port)], balance="first"),
            backend("dead", [("rej2", only_rej.port)]),
        ],
        hl7_settings={"rules": [{"if": {"message_type": ["ORU*"]}, "use_backend": "dead"}]},
    )
    lb = lab.medlb(config)
    wait_up(lb, "ris/rej", "ris/ok", "dead/rej2")
    texts = [message(f"REJ{i}", f"P{i}", enhanced=enhanced) for i in range(3)]
    replies = exchange(port, texts)
    for i, reply in enumerate(replies):
        cid = f"REJ{i}"
        assert (reply.code, reply.acked, reply.sender) == (success, cid, "OK"), reply
        assert ok.record(cid).raw == texts[i].encode() and ok.record(cid).ack == reply.raw
        assert cid in rej.ids()  # it was tried there first
        line = the_line(lb, cid)
        assert (log_field(line, "server"), log_field(line, "ack"), log_field(line, "attempts")) == ("ok", success, "2")
    # A pool where every server rejects: the sender never hears a success, only medlb's NAK in time.
    start = time.monotonic()
    [nak] = exchange(port, [message("ALLREJ1", "Z", mtype="ORU^R01^ORU_R01", enhanced=enhanced)])
    took = time.monotonic() - start
    assert (nak.code, nak.acked, nak.sender) == (reject, "ALLREJ1", "RIS"), nak
    assert 2.5 <= took < 5.0, took
    # Retried on it until the deadline, never taken as a success; one try per round, a round every
    # 250 ms (docs/hl7.md), not as fast as a rejecting server can answer.
    assert 2 <= len(only_rej.ids()) <= MAX_ROUNDS, len(only_rej.ids())
    assert log_field(the_line(lb, "ALLREJ1"), "term").startswith("gave_up:")


@pytest.mark.parametrize("retry_on_ae", [False, True])
def test_ae_is_passed_on_unless_retry_on_ae(lab: Lab, retry_on_ae: bool) -> None:
    err = lab.receiver("ERR", answer=always("AE"))
    ok = lab.receiver("OK")
    port = free_port()
    config = hl7_config(
        port,
        [backend("ris", [("err", err.port), ("ok", ok.port)], balance="first")],
        hl7_settings={"retry_on_ae": retry_on_ae},
    )
    lb = lab.medlb(config)
    wait_up(lb, "ris/err", "ris/ok")
    [reply] = exchange(port, [message("AE1")])
    assert err.ids() == ["AE1"]
    if retry_on_ae:
        assert_stored(reply, "AE1", ok)
        assert log_field(the_line(lb, "AE1"), "attempts") == "2"
    else:
        assert (reply.code, reply.acked, reply.sender) == ("AE", "AE1", "ERR")
        assert reply.raw == err.record("AE1").ack
        assert ok.ids() == []
        line = the_line(lb, "AE1")
        assert (log_field(line, "ack"), log_field(line, "term"), log_field(line, "attempts")) == (
            "AE",
            "server_AE",
            "1",
        )


# --------------------------------------------------------------------------- 4. giving up


@pytest.mark.parametrize("on_failure", ["nak", "close"])
def test_no_server_within_delivery_timeout(lab: Lab, on_failure: str) -> None:
    dead1, dead2 = free_port(), free_port()
    port = free_port()
    lb = lab.medlb(
        hl7_config(
            port,
            [backend("ris", [("d1", dead1), ("d2", dead2)])],
            hl7_settings={"on_failure": on_failure},
        )
    )
    wait_up(lb, "ris/d1", "ris/d2")

    async def run() -> tuple[list[Reply], float, bool]:
        async with sender(port) as (reader, writer):
            start = time.monotonic()
            await send(writer, message("DOWN1", "A"))
            await send(writer, message("DOWN2", "B", enhanced=True))
            replies: list[Reply] = []
            closed = False
            try:
                for _ in range(2):
                    replies.append(await next_reply(reader))
            except asyncio.IncompleteReadError as exc:
                assert exc.partial == b""
                closed = True
            return replies, time.monotonic() - start, closed

    replies, took, closed = asyncio.run(run())
    assert 2.5 <= took < 5.0, took
    if on_failure == "nak":
        assert not closed
        assert [(r.code, r.acked, r.sender) for r in replies] == [("AR", "DOWN1", "RIS"), ("CR", "DOWN2", "RIS")]
        assert "delivery_timeout" in replies[0].text
    else:
        assert closed and replies == []
    line = the_line(lb, "DOWN1")
    assert log_field(line, "term") == "gave_up:delivery_timeout"
    assert log_field(line, "ack") == ("closed" if on_failure == "close" else "AR")
    # While every server is down a message looks again every 250 ms (docs/hl7.md), one try per
    # server per round: not a connect storm against servers that refuse in microseconds.
    assert 2 <= int(log_field(line, "attempts")) <= 2 * MAX_ROUNDS, line
    assert lb.log.count("connect to ris/d1 failed") <= 2 * MAX_ROUNDS
    line = the_line(lb, "DOWN2")
    if on_failure == "nak":
        assert (log_field(line, "term"), log_field(line, "ack")) == ("gave_up:delivery_timeout", "CR")
    else:
        # Gone with the connection that DOWN1's failure closed (or given up just before, its deadline
        # being a moment later): logged all the same, never a success.
        outcome = (log_field(line, "term"), log_field(line, "ack"))
        assert outcome in {("closed_on_failure", "-"), ("gave_up:delivery_timeout", "closed")}, line


def test_a_server_back_within_the_window_gets_the_message(lab: Lab) -> None:
    back_port = free_port()
    port = free_port()
    lb = lab.medlb(hl7_config(port, [backend("ris", [("back", back_port)])]))
    wait_up(lb, "ris/back")

    async def run() -> tuple[Reply, float]:
        async with sender(port) as (reader, writer):
            start = time.monotonic()
            await send(writer, message("LATE1"))
            await asyncio.sleep(1.2)
            holder.append(lab.receiver("BACK", port=back_port))
            return await next_reply(reader), time.monotonic() - start

    holder: list[Receiver] = []
    reply, took = asyncio.run(run())
    assert_stored(reply, "LATE1", *holder)
    assert 1.2 <= took < 3.0, took
    line = the_line(lb, "LATE1")
    assert log_field(line, "term") == "acked" and int(log_field(line, "attempts")) >= 2


# --------------------------------------------------------------------------- 5. ordering


def test_one_patient_in_order_one_at_a_time_while_another_proceeds(lab: Lab) -> None:
    slow = always("AA", 0.5)
    r1, r2 = lab.receiver("R1", answer=slow), lab.receiver("R2", answer=slow)
    port = free_port()
    lb = lab.medlb(hl7_config(port, [backend("ris", [("r1", r1.port), ("r2", r2.port)], balance="leastconn")]))
    wait_up(lb, "ris/r1", "ris/r2")

    async def run() -> tuple[list[Reply], list[Reply]]:
        async with sender(port) as (reader, writer), sender(port) as (reader2, writer2):
            for cid, patient in (("A1", "PA"), ("A2", "PA"), ("A3", "PA"), ("B1", "PB")):
                writer.writeblock(message(cid, patient).encode())
            await writer.drain()
            await asyncio.sleep(0.2)
            await send(writer2, message("A4", "PA"))  # another connection, same patient: waits too
            first = [await next_reply(reader) for _ in range(4)]
            second = [await next_reply(reader2)]
            return first, second

    first, second = asyncio.run(run())
    assert [r.acked for r in first] == ["A1", "A2", "A3", "B1"]  # the sender's order, not the servers'
    assert [r.acked for r in second] == ["A4"]
    receivers = (r1, r2)
    for reply in first + second:
        assert_stored(reply, reply.acked, *receivers)
    got = {g.control_id: g for r in receivers for g in r.got}
    chain = [got[cid] for cid in ("A1", "A2", "A3", "A4")]
    for before, after in itertools.pairwise(chain):
        assert after.at >= before.done > 0, (before, after)  # strictly one at a time, in order
    b1 = got["B1"]
    assert b1.at < got["A1"].done and b1.done < got["A2"].done  # in parallel, answered before A2
    assert {first[0].sender, first[3].sender} == {"R1", "R2"}  # on the other server


def test_order_key_connection_orders_per_sender_connection(lab: Lab) -> None:
    slow = always("AA", 0.4)
    r1, r2 = lab.receiver("R1", answer=slow), lab.receiver("R2", answer=slow)
    port = free_port()
    lb = lab.medlb(
        hl7_config(
            port,
            [backend("ris", [("r1", r1.port), ("r2", r2.port)], balance="leastconn")],
            hl7_settings={"order_key": "connection"},
        )
    )
    wait_up(lb, "ris/r1", "ris/r2")

    async def one(tag: str) -> list[Reply]:
        async with sender(port) as (reader, writer):
            for i in range(3):  # three patients, yet one at a time: the key is the connection
                writer.writeblock(message(f"{tag}{i}", f"{tag}PAT{i}").encode())
            await writer.drain()
            return [await next_reply(reader) for _ in range(3)]

    async def run() -> list[list[Reply]]:
        return list(await asyncio.gather(one("X"), one("Y")))

    xs, ys = asyncio.run(run())
    assert [r.acked for r in xs] == ["X0", "X1", "X2"] and [r.acked for r in ys] == ["Y0", "Y1", "Y2"]
    got = {g.control_id: g for r in (r1, r2) for g in r.got}
    for tag in "XY":
        chain = [got[f"{tag}{i}"] for i in range(3)]
        for before, after in itertools.pairwise(chain):
            assert after.at >= before.done > 0, (before, after)
    assert got["Y0"].at < got["X0"].done and got["X0"].at < got["Y0"].done  # the two connections in parallel
    for reply in xs + ys:
        assert_stored(reply, reply.acked, r1, r2)


# --------------------------------------------------------------------------- 6. duplicates


def test_duplicates_are_answered_without_a_second_delivery(lab: Lab) -> None:
    r1 = lab.receiver("R1", answer=always("AA", 0.5))
    r2 = lab.receiver("R2", answer=always("AA", 0.5))
    port = free_port()
    lb = lab.medlb(hl7_config(port, [backend("ris", [("r1", r1.port), ("r2", r2.port)])]))
    wait_up(lb, "ris/r1", "ris/r2")
    [first] = exchange(port, [message("DUP1", "A")])
    assert_stored(first, "DUP1", r1, r2)
    # Resent after its AA (the sender missed it): the same ACK, no second delivery.
    [again] = exchange(port, [message("DUP1", "A")])
    assert again.raw == first.raw
    # Same MSH-10 from another facility is another message: delivered.
    [other] = exchange(port, [message("DUP1", "A", facility="SOUTH")])
    assert other.raw != first.raw
    assert total("DUP1", r1, r2) == 2

    # A copy that arrives while the first is in flight (another connection) gets the first's answer.
    async def run() -> tuple[Reply, Reply]:
        async with sender(port) as (reader, writer), sender(port) as (reader2, writer2):
            await send(writer, message("DUP2", "B"))
            await asyncio.sleep(0.1)
            await send(writer2, message("DUP2", "B"))
            return await next_reply(reader), await next_reply(reader2)

    one, two = asyncio.run(run())
    assert_stored(one, "DUP2", r1, r2)
    assert two.raw == one.raw
    assert total("DUP2", r1, r2) == 1
    wait_until(lambda: len(lines_for(lb, "DUP1") + lines_for(lb, "DUP2")) >= 5, timeout=3)
    terms = sorted(log_field(line, "term") for line in lines_for(lb, "DUP1") + lines_for(lb, "DUP2"))
    assert terms == ["acked", "acked", "acked", "duplicate", "duplicate_in_flight"], terms


def test_a_resend_waiting_on_a_copy_whose_sender_left_is_answered(lab: Lab) -> None:
    """A resend attaches to the first copy in flight; when that copy's sender leaves before it went
    out, the resend must not wait forever for an answer that will never come: it gets a NAK."""
    port = free_port()
    lb = lab.medlb(hl7_config(port, [backend("ris", [("d1", free_port())])], hl7_settings={"delivery_timeout": "8s"}))
    wait_up(lb, "ris/d1")

    async def run() -> tuple[Reply, float]:
        _, writer_a = await hl7.mllp.open_hl7_connection(HOST, port, limit=LIMIT, encoding="utf-8")
        await send(writer_a, message("ORPHAN1"))
        await asyncio.sleep(0.3)
        async with sender(port) as (reader_b, writer_b):
            await send(writer_b, message("ORPHAN1"))
            await asyncio.sleep(0.3)
            # The first sender dies (a reset: a FIN would only mean "done sending, still reading").
            writer_a.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer_a.transport.abort()
            start = time.monotonic()
            return await next_reply(reader_b, within=4.0), time.monotonic() - start

    reply, took = asyncio.run(run())
    assert (reply.code, reply.acked, reply.sender) == ("AR", "ORPHAN1", "RIS"), reply
    assert took < 2.0, took
    wait_until(lambda: len(lines_for(lb, "ORPHAN1")) >= 2, timeout=3)
    terms = sorted(log_field(line, "term") for line in lines_for(lb, "ORPHAN1"))
    assert terms == ["client_gone", "gave_up:first_copy_abandoned"], terms


# --------------------------------------------------------------------------- 7. routing


def test_routing_by_message_type_and_sending_facility(lab: Lab) -> None:
    adt, oru, fac, other = lab.receiver("ADT"), lab.receiver("ORU"), lab.receiver("FAC"), lab.receiver("DEF")
    port = free_port()
    rules = [
        {"if": {"sending_facility": ["SOUTH*"]}, "use_backend": "south"},
        {"if": {"message_type": ["ORU*"]}, "use_backend": "results"},
        {"if": {"message_type": ["ADT^A0*"]}, "use_backend": "adt"},
    ]
    config = hl7_config(
        port,
        [
            backend("pool", [("def", other.port)]),
            backend("adt", [("adt", adt.port)]),
            backend("results", [("oru", oru.port)]),
            backend("south", [("fac", fac.port)]),
        ],
        hl7_settings={"rules": rules},
    )
    lb = lab.medlb(config)
    wait_up(lb, "pool/def", "adt/adt", "results/oru", "south/fac")
    texts = {
        "RT-ADT": message("RT-ADT", "P1", mtype="ADT^A01^ADT_A01"),
        "RT-ADT8": message("RT-ADT8", "P2", mtype="ADT^A08"),
        "RT-ORU": message("RT-ORU", "P3", mtype="ORU^R01^ORU_R01"),
        "RT-SOUTH": message("RT-SOUTH", "P4", mtype="ORU^R01^ORU_R01", facility="SOUTH-WING"),
        "RT-QRY": message("RT-QRY", "P5", mtype="QRY^A19^QRY_A19"),
        "RT-ADT40": message("RT-ADT40", "P6", mtype="ADT^A40^ADT_A39"),
    }
    replies = exchange(port, list(texts.values()))
    for reply, cid in zip(replies, texts, strict=True):
        assert_stored(reply, cid, adt, oru, fac, other)
    assert adt.ids() == ["RT-ADT", "RT-ADT8"]
    assert oru.ids() == ["RT-ORU"]
    assert fac.ids() == ["RT-SOUTH"]
    assert sorted(other.ids()) == ["RT-ADT40", "RT-QRY"]
    assert log_field(the_line(lb, "RT-SOUTH"), "backend") == "south"


# --------------------------------------------------------------------------- 8. a receiver killed mid-stream


def test_a_receiver_killed_mid_stream_loses_nothing(lab: Lab) -> None:
    victim, victim_port, victim_record = lab.receiver_process("VICTIM", delay=0.3)
    _, survivor_port, survivor_record = lab.receiver_process("SURVIVOR", delay=0.05)
    port = free_port()
    lb = lab.medlb(
        hl7_config(
            port,
            [backend("ris", [("victim", victim_port), ("survivor", survivor_port)], balance="first")],
            hl7_settings={"order_key": "none", "ack_timeout": "2s", "delivery_timeout": "5s"},
        )
    )
    wait_up(lb, "ris/victim", "ris/survivor")
    ids = [f"KILL{i:02d}" for i in range(20)]

    def in_flight_on_victim() -> bool:
        return bool(victim_record.got() - victim_record.acked()) and len(victim_record.acked()) >= 2

    async def run() -> list[Reply]:
        async with sender(port) as (reader, writer):
            for i, cid in enumerate(ids):
                writer.writeblock(message(cid, f"K{i}").encode())
            await writer.drain()
            replies = []
            for _ in ids:
                replies.append(await next_reply(reader))
                if victim.poll() is None and in_flight_on_victim():
                    victim.send_signal(signal.SIGKILL)
            return replies

    replies = asyncio.run(run())
    assert victim.wait(5) == -signal.SIGKILL, "the victim was killed mid-stream"
    assert [r.acked for r in replies] == ids
    stored = {"VICTIM": victim_record.acked(), "SURVIVOR": survivor_record.acked()}
    for reply in replies:
        assert reply.code == "AA" and reply.sender in stored, reply
        assert reply.acked in stored[reply.sender], (
            f"{reply.acked} acknowledged by {reply.sender}, which never ACKed it"
        )
    lost_in_flight = victim_record.got() - victim_record.acked()
    assert lost_in_flight, "a message was in flight on the victim when it died"
    assert lost_in_flight <= survivor_record.acked()
    for cid in lost_in_flight:
        line = the_line(lb, cid)
        assert log_field(line, "server") == "survivor" and int(log_field(line, "attempts")) >= 2, line


def test_messages_of_a_sender_that_left_are_not_sent_later_and_are_logged(lab: Lab) -> None:
    """GONE1 is on the wire to R1 when its sender leaves; GONE2 waits for R1's only connection. GONE1
    is still settled and logged; GONE2 must never go out (its sender resends it), and is logged."""
    r1 = lab.receiver("R1", answer=always("AA", 0.8))
    port = free_port()
    lb = lab.medlb(
        hl7_config(
            port, [backend("ris", [("r1", r1.port)])], hl7_settings={"connections_per_server": 1, "ack_timeout": "2s"}
        )
    )
    wait_up(lb, "ris/r1")
    sock = connect(port)
    sock.sendall(framed(message("GONE1", "X")) + framed(message("GONE2", "Y")))
    wait_until(lambda: r1.ids() == ["GONE1"], timeout=5)
    time.sleep(0.1)
    reset(sock)  # the sender dies: a reset, not a FIN (which only means "done sending")
    line = the_line(lb, "GONE1")
    assert (log_field(line, "server"), log_field(line, "ack"), log_field(line, "term")) == ("r1", "AA", "acked")
    line = the_line(lb, "GONE2")
    assert (log_field(line, "ack"), log_field(line, "term")) == ("-", "client_gone"), line
    # The next message of GONE2's patient is not held behind it, and GONE2 never reached R1.
    [reply] = exchange(port, [message("GONE3", "Y")])
    assert_stored(reply, "GONE3", r1)
    time.sleep(0.5)
    assert r1.ids() == ["GONE1", "GONE3"]


def test_graceful_stop_answers_what_is_in_flight_then_closes(lab: Lab) -> None:
    r1 = lab.receiver("R1", answer=always("AA", 0.6))
    port = free_port()
    config = hl7_config(port, [backend("ris", [("r1", r1.port)])])
    config["global"]["hard_stop_after"] = "6s"
    lb = lab.medlb(config)
    wait_up(lb, "ris/r1")

    async def run() -> tuple[Reply, bytes, float]:
        async with sender(port) as (reader, writer):
            await send(writer, message("STOP1"))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            lb.signal(signal.SIGTERM)
            reply = await next_reply(reader)
            rest = await asyncio.wait_for(reader.read(), 8.0)  # until medlb closes the connection
            return reply, rest, time.monotonic() - start

    reply, rest, took = asyncio.run(run())
    assert_stored(reply, "STOP1", r1)
    assert rest == b""
    assert took < 3.0, f"connection closed only after {took:.1f}s (hard_stop_after is 6s)"
    assert lb.proc.wait(10) == 0
    assert "hard_stop_after reached" not in lb.log


# --------------------------------------------------------------------------- 9. the hl7 health check


def test_hl7_check_brings_a_receiver_up_and_an_ar_receiver_down(lab: Lab) -> None:
    good = lab.receiver("GOOD")
    flaky = lab.receiver("FLAKY")
    rej = lab.receiver("REJ", check_code="AR")
    port = free_port()
    check = {"type": "hl7"}
    lb = lab.medlb(
        hl7_config(port, [backend("ris", [("good", good.port), ("flaky", flaky.port), ("rej", rej.port)], check=check)])
    )
    for name in ("good", "flaky"):
        lb.wait_for_log(f"server ris/{name} op_state DOWN -> UP (HL7 AA")
    lb.wait_for_log("server ris/rej health check failed: answered AR")
    assert "server ris/rej op_state DOWN -> UP" not in lb.log
    assert good.checks and all(cid.startswith(CHECK_PREFIX) for cid in good.checks)
    flaky.check_code = "AR"
    lb.wait_for_log("server ris/flaky op_state UP -> DOWN (answered AR")
    # Traffic goes only where the check passes.
    replies = exchange(port, [message(f"HC{i}", f"P{i}") for i in range(4)])
    for i, reply in enumerate(replies):
        assert_stored(reply, f"HC{i}", good)
    assert flaky.ids() == [] and rej.ids() == []


if __name__ == "__main__":
    _receiver_main(sys.argv[1:])


def test_a_message_queued_for_a_dead_connection_does_not_wait_for_its_ack_timeout(tmp_path: Path) -> None:
    """A message queued for a server's only connection is sent as soon as that connection dies,
    not after its own ``ack_timeout`` (found by the chaos test)."""
    import socket as socket_module
    import threading

    def frame_text(text: str) -> bytes:
        return b"\x0b" + text.encode() + b"\x1c\r"

    def silent_then_close(conn: socket_module.socket) -> None:
        with conn:  # takes the message, never answers, hangs up
            conn.recv(65536)
            time.sleep(1.0)

    listener = socket_module.socket()
    listener.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def accept_loop() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=silent_then_close, args=(conn,), daemon=True).start()

    threading.Thread(target=accept_loop, daemon=True).start()
    good = frame_text("MSH|^~\\&|R|R|S|S|20261122||ACK|A1|P|2.5\rMSA|AA|X\r")

    def answer(conn: socket_module.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
                while b"\x1c\r" in data:
                    _, _, data = data.partition(b"\x1c\r")
                    conn.sendall(good)

    healthy = socket_module.socket()
    healthy.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_REUSEADDR, 1)
    healthy.bind(("127.0.0.1", 0))
    healthy.listen()

    def healthy_loop() -> None:
        while True:
            try:
                conn, _ = healthy.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(conn,), daemon=True).start()

    threading.Thread(target=healthy_loop, daemon=True).start()
    port = free_port()
    config = {
        "global": {"hard_stop_after": "2s"},
        "frontends": [
            {
                "name": "fe",
                "mode": "hl7",
                "bind": [f"127.0.0.1:{port}"],
                "default_backend": "pool",
                "hl7": {"connections_per_server": 1, "ack_timeout": "5s", "delivery_timeout": "30s"},
            }
        ],
        "backends": [
            {
                "name": "pool",
                "balance": "first",
                "check": {"type": "none"},
                "servers": [
                    {"name": "stall", "address": f"127.0.0.1:{listener.getsockname()[1]}"},
                    {"name": "good", "address": f"127.0.0.1:{healthy.getsockname()[1]}"},
                ],
            }
        ],
    }
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("server pool/good op_state DOWN -> UP")
            first = socket_module.create_connection(("127.0.0.1", port), timeout=20)
            first.sendall(frame_text("MSH|^~\\&|A|F|R|H|20261122||ADT^A08|H1|P|2.5\rPID|1||K1\r"))
            time.sleep(0.2)
            second = socket_module.create_connection(("127.0.0.1", port), timeout=20)
            started = time.monotonic()
            second.sendall(frame_text("MSH|^~\\&|A|F|R|H|20261122||ADT^A08|X|P|2.5\rPID|1||K2\r"))
            assert b"MSA|AA|X" in second.recv(4096)
            # Queued behind H1 on the stalling server's only connection: sent again once that connection
            # died (~1 s), then once more after the second silent hang-up (~2 s); never 5 s.
            assert time.monotonic() - started < 4.0
            first.close()
            second.close()
    finally:
        listener.close()
        healthy.close()


def test_message_and_ack_counts_reach_the_status_api_and_the_metrics(lab: Lab) -> None:
    from tests.helpers import api, with_admin

    r1 = lab.receiver("r1")
    port = free_port()
    config = hl7_config(port, [backend("ris", [("r1", r1.port)])])
    url = with_admin(config, lab.tmp)
    lb = lab.medlb(config)
    wait_up(lb, "ris/r1")
    replies = exchange(port, [message("CNT1"), message("CNT2", "P2"), message("CNT3", mtype="ORU^R01^ORU_R01")])
    assert [r.code for r in replies] == ["AA", "AA", "AA"]
    code, doc = api(f"{url}/api/v1/backends/ris/servers/r1")
    assert code == 200, doc
    assert doc["hl7"] == {"messages": {"ADT^A01^ADT_A01": 2, "ORU^R01^ORU_R01": 1}, "acks": {"AA": 3}}, doc["hl7"]
    code, text = api(f"{url}/metrics")
    assert code == 200
    assert 'medlb_server_hl7_messages_total{backend="ris",server="r1",type="ADT^A01^ADT_A01"} 2.0' in text
    assert 'medlb_server_hl7_acks_total{backend="ris",code="AA",server="r1"} 3.0' in text
