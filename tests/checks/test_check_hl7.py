"""The hl7 health check (``hl7_probe``) against real peers.

Peers: python-hl7's MLLP server (``hl7.mllp.start_hl7_server``, an implementation nobody here wrote),
which parses what the probe sends and answers with its own ``create_ack``, and small scripted asyncio
servers for what a real receiver will not do on demand (silence, garbage, an ACK for another message,
a close before the ACK). Nothing of the probe is mocked: every verdict comes from bytes on a loopback
socket, and each probe runs on both event loops medlb supports (the ``run`` fixture).

Every peer notes when the probe's connection reaches end-of-file, so the tests also see that no
socket outlives a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hl7
import hl7.mllp
import pytest

from medlb.checks.probes import DEFAULT_HL7_CHECK, ProbeResult, hl7_probe
from tests.conftest import Runner
from tests.helpers import free_port

HOST = "127.0.0.1"
VT, END = b"\x0b", b"\x1c\r"


@dataclass
class Peer:
    """What a test peer saw: the messages it received and how many connections ended cleanly."""

    port: int = 0
    messages: list[Any] = field(default_factory=list)  # hl7.Message (python-hl7 peer)
    payloads: list[bytes] = field(default_factory=list)  # raw MLLP payloads (scripted peer)
    connections: int = 0
    eofs: int = 0  # connections the probe closed (end-of-file at a message boundary)
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while eofs == connections

    def opened(self) -> None:
        self.connections += 1
        self.idle.clear()

    def eof(self) -> None:
        self.eofs += 1
        if self.eofs == self.connections:
            self.idle.set()

    async def all_closed(self, within: float = 2.0) -> bool:
        """True once every connection the peer accepted was closed by the probe."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.idle.wait()
        return self.connections > 0 and self.eofs == self.connections


def probe(port: int, *, message: str | None = None, timeout: float = 5.0) -> Any:
    return hl7_probe(HOST, port, message=message, timeout=timeout)


def field_of(payload: bytes, n: int) -> bytes:
    """MSH-n of an ER7 payload (MSH-1 is the separator, so MSH-n is item n - 1)."""
    return payload.split(b"\r", 1)[0].split(b"|")[n - 1]


def ack_for(control_id: bytes | str, code: str = "AA", text: str = "") -> bytes:
    cid = control_id.decode() if isinstance(control_id, bytes) else control_id
    msa = f"MSA|{code}|{cid}" + (f"|{text}" if text else "")
    return f"MSH|^~\\&|RIS|RAD|MEDLB|MEDLB|20240301120000||ACK^A01^ACK|ACK{cid}|T|2.5\r{msa}\r".encode()


# --------------------------------------------------------------------------- peers


@contextlib.asynccontextmanager
async def python_hl7_peer(code: str = "AA", text: str = "", *, encoding: str = "ascii") -> AsyncIterator[Peer]:
    """python-hl7's MLLP server answering every message with ``create_ack(code)`` (plus MSA-3 ``text``)."""
    peer = Peer()

    async def handle(reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter) -> None:
        peer.opened()
        try:
            while True:
                message = await reader.readmessage()
                peer.messages.append(message)
                ack = message.create_ack(code)
                if text:
                    ack.segment("MSA").assign_field(text, 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                peer.eof()
        finally:
            writer.close()

    server = await hl7.mllp.start_hl7_server(handle, HOST, 0, encoding=encoding, limit=1 << 20)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()


Answer = Callable[[bytes], "bytes | list[bytes] | None"]


@contextlib.asynccontextmanager
async def scripted_peer(answer: Answer, *, close_after: bool = False) -> AsyncIterator[Peer]:
    """Reads one framed message, writes ``answer(payload)`` (a list: in pieces, a little apart), then
    waits for the probe to close (or closes itself, ``close_after``)."""
    peer = Peer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer.opened()
        try:
            framed = await reader.readuntil(END)
            assert framed.startswith(VT)
            peer.payloads.append(framed[1:-2])
            reply = answer(framed[1:-2])
            for piece in [reply] if isinstance(reply, bytes) else reply or []:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
            if close_after:
                peer.eof()  # we close: nothing for the probe to leave open
                return
            if await reader.read() == b"":
                peer.eof()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    peer.port = server.sockets[0].getsockname()[1]
    try:
        yield peer
    finally:
        server.close()
        await server.wait_closed()


# --------------------------------------------------------------------------- python-hl7 receiver


def test_an_aa_from_python_hl7_is_healthy(run: Runner) -> None:
    async def scenario() -> tuple[ProbeResult, Peer, bool]:
        async with python_hl7_peer("AA") as peer:
            result = await probe(peer.port)
            return result, peer, await peer.all_closed()

    result, peer, closed = run(scenario())
    assert result.ok, result
    assert re.fullmatch(r"HL7 AA in \d+ms", result.text), result.text
    assert closed
    # python-hl7 parsed the default message: an ADT^A01 test message with its placeholders filled in.
    (message,) = peer.messages
    msh = message.segment("MSH")
    assert str(msh(9)) == "ADT^A01^ADT_A01"
    assert str(msh(11)) == "T"
    assert str(msh(10)).startswith("MEDLBCHK")
    assert "{" not in str(message)
    assert str(message.segment("PID")(3)) == "MEDLB-HEALTH-CHECK^^^MEDLB"


def test_a_commit_accept_is_healthy(run: Runner) -> None:
    # Enhanced mode (MSH-15 set): the immediate answer is a commit ACK.
    enhanced = "MSH|^~\\&|MEDLB|MEDLB|||{timestamp}||ADT^A01^ADT_A01|{control_id}|T|2.5|||AL|NE\rPID|1\r"

    async def scenario() -> ProbeResult:
        async with python_hl7_peer("CA") as peer:
            return await probe(peer.port, message=enhanced)

    result = run(scenario())
    assert result.ok and result.text.startswith("HL7 CA in "), result


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        ("AR", "", "answered AR"),
        ("AR", "database offline", "answered AR: database offline"),
        ("AE", "unknown patient", "answered AE: unknown patient"),
        ("CR", "", "answered CR"),
        ("CE", "queue full", "answered CE: queue full"),
    ],
)
def test_a_reject_or_error_is_unhealthy_and_says_why(run: Runner, code: str, text: str, expected: str) -> None:
    async def scenario() -> tuple[ProbeResult, bool]:
        async with python_hl7_peer(code, text) as peer:
            result = await probe(peer.port)
            return result, await peer.all_closed()

    result, closed = run(scenario())
    assert result == ProbeResult(False, expected)
    assert closed


def test_a_custom_message_is_sent_with_its_placeholders_filled_in(run: Runner) -> None:
    custom = (
        "MSH|^~\\&|MEDLB|LB-CHECK|RIS|RAD|{timestamp}||QRY^A19^QRY_A19|{control_id}|D|2.5\n"
        "QRD|{timestamp}|R|I|{control_id}|||1^RD|MEDLB-HEALTH-CHECK|DEM\n"
    )

    async def scenario() -> tuple[list[ProbeResult], Peer]:
        async with python_hl7_peer("AA") as peer:
            return [await probe(peer.port, message=custom), await probe(peer.port, message=custom)], peer

    results, peer = run(scenario())
    assert all(r.ok for r in results), results
    ids = []
    for message in peer.messages:
        msh, qrd = message.segment("MSH"), message.segment("QRD")
        assert [str(msh(n)) for n in (3, 4, 5, 6, 9, 11)] == ["MEDLB", "LB-CHECK", "RIS", "RAD", "QRY^A19^QRY_A19", "D"]
        assert str(qrd(4)) == str(msh(10))  # every occurrence is filled in
        assert str(qrd(1)) == str(msh(7))
        assert len(message) == 2  # LF line ends became segment ends
        ids.append(str(msh(10)))
    # Two consecutive checks never share a control ID (HL7 v2.5: MSH-10 is at most 20 characters).
    assert len(set(ids)) == 2
    assert all(i.startswith("MEDLBCHK") and len(i) <= 20 for i in ids)


def test_the_timestamp_is_now_and_says_it_is_utc(run: Runner) -> None:
    async def scenario() -> Peer:
        async with python_hl7_peer("AA") as peer:
            assert (await probe(peer.port)).ok
            return peer

    message = run(scenario()).messages[0]
    for stamp in (str(message.segment("MSH")(7)), str(message.segment("EVN")(2))):
        # Without an offset an HL7 time is the sender's local time; the probe's clock is UTC.
        assert re.fullmatch(r"\d{14}\+0000", stamp), stamp
        sent = datetime.strptime(stamp, "%Y%m%d%H%M%S%z")
        assert abs((datetime.now(UTC) - sent).total_seconds()) < 60


@pytest.mark.parametrize(
    ("charset", "encoding", "facility"),
    [
        ("UNICODE UTF-8", "utf-8", "Hôpital Łódź 東京"),
        ("8859/1", "latin-1", "Hôpital Zürich"),
        ("8859/2", "iso8859-2", "Szpital Łódź"),
        ("", "latin-1", "Hôpital"),  # no MSH-18: sent as Latin-1, the byte-per-character default
    ],
)
def test_a_custom_message_is_encoded_as_its_msh_18_declares(
    run: Runner, charset: str, encoding: str, facility: str
) -> None:
    custom = (
        f"MSH|^~\\&|MEDLB|{facility}|||{{timestamp}}||ADT^A01^ADT_A01|{{control_id}}|T|2.5||||||{charset}\r"
        "PID|1||MEDLB-HEALTH-CHECK^^^MEDLB||CHECK^MEDLB\r"
    )

    async def scenario() -> tuple[ProbeResult, Peer]:
        async with python_hl7_peer("AA", encoding=encoding) as peer:
            return await probe(peer.port, message=custom, timeout=2.0), peer

    result, peer = run(scenario())
    assert result.ok, result
    (message,) = peer.messages
    assert str(message.segment("MSH")(4)) == facility
    assert str(message.segment("MSH")(18)) == charset


def test_control_ids_differ_from_one_run_to_the_next() -> None:
    """A restarted medlb must not reuse the control IDs of its previous run: a receiver that suppresses
    resent messages (medlb's own dedup_window, an interface engine) would answer from its cache or
    reject the check as a duplicate."""
    child = (
        "import asyncio, sys\n"
        "from medlb.checks.probes import hl7_probe\n"
        "r = asyncio.run(hl7_probe('127.0.0.1', int(sys.argv[1]), message=None, timeout=5))\n"
        "assert r.ok, r\n"
    )

    async def scenario() -> Peer:
        async with python_hl7_peer("AA") as peer:
            for _ in range(2):
                proc = await asyncio.create_subprocess_exec(sys.executable, "-c", child, str(peer.port))
                assert await proc.wait() == 0
            return peer

    peer = asyncio.run(scenario())
    ids = [str(m.segment("MSH")(10)) for m in peer.messages]
    assert len(ids) == 2 and ids[0] != ids[1], ids


# --------------------------------------------------------------------------- scripted peers


def test_an_ack_may_come_in_pieces_after_keep_alive_filler(run: Runner) -> None:
    def answer(payload: bytes) -> list[bytes]:
        framed = VT + ack_for(field_of(payload, 10)) + END
        return [b"\r\n\x00", framed[:5], framed[5:30], framed[30:-1], framed[-1:]]

    async def scenario() -> ProbeResult:
        async with scripted_peer(answer) as peer:
            return await probe(peer.port)

    result = run(scenario())
    assert result.ok and result.text.startswith("HL7 AA in "), result


def test_crlf_line_ends_become_single_segment_terminators(run: Runner) -> None:
    custom = "MSH|^~\\&|MEDLB|MEDLB|||{timestamp}||ADT^A01|{control_id}|T|2.5\r\nPID|1\r\n"

    async def scenario() -> tuple[ProbeResult, Peer]:
        async with scripted_peer(lambda p: VT + ack_for(field_of(p, 10)) + END) as peer:
            return await probe(peer.port, message=custom), peer

    result, peer = run(scenario())
    assert result.ok, result
    (payload,) = peer.payloads
    segments = payload.split(b"\r")
    assert len(segments) == 3 and segments[-1] == b"", payload  # MSH, PID, nothing empty in between
    assert segments[1] == b"PID|1"


def test_an_ack_for_another_control_id_is_unhealthy_and_names_both(run: Runner) -> None:
    async def scenario() -> tuple[ProbeResult, Peer, bool]:
        async with scripted_peer(lambda p: VT + ack_for("MEDLBCHK-OLD-7") + END) as peer:
            result = await probe(peer.port)
            return result, peer, await peer.all_closed()

    result, peer, closed = run(scenario())
    sent = field_of(peer.payloads[0], 10).decode()
    assert result == ProbeResult(False, f"ACK for control ID 'MEDLBCHK-OLD-7', expected {sent!r}")
    assert closed


def test_a_silent_peer_times_out(run: Runner) -> None:
    async def scenario() -> tuple[ProbeResult, float, Peer, bool]:
        async with scripted_peer(lambda p: None) as peer:
            loop = asyncio.get_running_loop()
            start = loop.time()
            result = await probe(peer.port, timeout=0.3)
            took = loop.time() - start
            return result, took, peer, await peer.all_closed()

    result, took, peer, closed = run(scenario())
    assert result == ProbeResult(False, "no ACK: timeout after 300ms")
    assert 0.25 < took < 2.0
    assert len(peer.payloads) == 1  # the message did go out
    assert closed


def test_a_closed_port_is_connection_refused(run: Runner) -> None:
    result = run(probe(free_port()))
    assert result == ProbeResult(False, "connection refused")


@pytest.mark.parametrize(
    ("answer", "detail"),
    [
        (lambda p: b"HTTP/1.1 400 Bad Request\r\n\r\n", "junk before start block"),
        (lambda p: b"ok " + VT + ack_for(field_of(p, 10)) + END, "junk before start block"),
        (lambda p: VT + b"MSH|^~\\&|RIS|RAD|||20240301||ACK^A01^ACK|A1|P|2.5\r" + END, "no MSA"),
        (lambda p: VT + ack_for(field_of(p, 10)).replace(b"MSA|AA|", b"MSA||") + END, "MSA-1"),
        (lambda p: VT + b"hello" + END, ""),
        (lambda p: VT + b"MSH|^~\\&|" + VT + END, "start block inside a message"),
        (lambda p: VT + b"x" * (65 * 1024), "larger than max_message"),
    ],
    ids=["http", "junk-then-ack", "no-msa", "empty-msa-1", "not-hl7", "vt-inside", "oversized"],
)
def test_an_unreadable_answer_is_a_protocol_error(run: Runner, answer: Answer, detail: str) -> None:
    async def scenario() -> tuple[ProbeResult, bool]:
        async with scripted_peer(answer) as peer:
            result = await probe(peer.port)
            return result, await peer.all_closed()

    result, closed = run(scenario())
    assert not result.ok
    assert result.text.startswith("HL7 protocol error: "), result.text
    assert detail in result.text
    assert len(result.text) <= 200
    assert closed


@pytest.mark.parametrize(
    "answer",
    [lambda p: None, lambda p: (VT + ack_for(field_of(p, 10)) + END)[:40]],
    ids=["nothing", "half-an-ack"],
)
def test_a_peer_closing_before_the_ack(run: Runner, answer: Answer) -> None:
    async def scenario() -> ProbeResult:
        async with scripted_peer(answer, close_after=True) as peer:
            return await probe(peer.port)

    assert run(scenario()) == ProbeResult(False, "connection closed by peer before the ACK")


def test_an_invalid_check_message_fails_without_connecting(run: Runner) -> None:
    async def scenario() -> tuple[ProbeResult, Peer]:
        async with scripted_peer(lambda p: None) as peer:
            result = await probe(peer.port, message="PID|1||NO-MSH-SEGMENT")
            await asyncio.sleep(0.05)
            return result, peer

    result, peer = run(scenario())
    assert not result.ok and result.text.startswith("HL7 protocol error: "), result
    assert peer.connections == 0


def test_the_default_message_is_a_valid_test_adt() -> None:
    filled = DEFAULT_HL7_CHECK.replace("{control_id}", "X").replace("{timestamp}", "20240301120000+0000")
    parsed = hl7.parse(filled)
    assert str(parsed.segment("MSH")(11)) == "T"
    assert str(parsed.segment("MSH")(10)) == "X"
    assert filled.endswith("\r") and "\n" not in filled


def test_checks_run_concurrently_each_with_its_own_control_id(run: Runner) -> None:
    async def scenario() -> tuple[list[ProbeResult], Peer, bool]:
        async with scripted_peer(lambda p: VT + ack_for(field_of(p, 10)) + END) as peer:
            results = await asyncio.gather(*(probe(peer.port) for _ in range(20)))
            return list(results), peer, await peer.all_closed()

    results, peer, closed = run(scenario())
    assert all(r.ok for r in results), results
    assert len({field_of(p, 10) for p in peer.payloads}) == 20
    assert closed
