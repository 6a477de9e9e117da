"""The dicom-echo health check (``dicom_echo_probe``) against real peers.

Peers: a pynetdicom Verification SCP (an implementation nobody here wrote) that checks called and
calling AE titles, DCMTK's ``storescp`` (the archive most sites test against), and small scripted
TCP servers for the failures a real SCP will not produce on demand (silence, garbage, a 4 GB PDU
announced, unexpected PDU types). Nothing of the probe is mocked: every verdict comes from bytes on
a loopback socket. Each probe runs on both event loops medlb supports (the ``run`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from medlb.checks.probes import ProbeResult, dicom_echo_probe
from medlb.proto import dicom_dimse, dicom_pdu
from tests.conftest import Runner
from tests.helpers import ThreadedServer, free_port, wait_until
from tests.proto.test_dicom_pdu import pn_ac, pn_rj

STORESCP = "/usr/bin/storescp"
CALLING = "MEDLB"


def probe(port: int, *, called: str = "ARCHIVE", calling: str = CALLING, timeout: float = 5.0) -> Any:
    return dicom_echo_probe("127.0.0.1", port, calling_ae=calling, called_ae=called, timeout=timeout)


# --------------------------------------------------------------------------- pynetdicom SCP


@dataclass
class Scp:
    port: int
    echoes: list[tuple[str, str]] = field(default_factory=list)  # (calling, called) of each C-ECHO served
    released: list[str] = field(default_factory=list)  # calling AE of each association released


def _start_scp(status: int = 0x0000) -> tuple[Any, Scp]:
    port = free_port()
    scp = Scp(port)

    def on_echo(event: Any) -> int:
        scp.echoes.append((event.assoc.requestor.ae_title, event.assoc.acceptor.ae_title))
        return status

    def on_released(event: Any) -> None:
        scp.released.append(event.assoc.requestor.ae_title)

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(Verification)
    ae.require_called_aet = True
    ae.require_calling_aet = [CALLING]
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_ECHO, on_echo), (evt.EVT_RELEASED, on_released)],
    )
    return server, scp


@pytest.fixture(scope="module")
def archive() -> Iterator[Scp]:
    server, scp = _start_scp()
    try:
        yield scp
    finally:
        server.shutdown()


@pytest.fixture(scope="module")
def failing_archive() -> Iterator[Scp]:
    """A Verification SCP that answers every C-ECHO with 0x0110 (processing failure)."""
    server, scp = _start_scp(status=0x0110)
    try:
        yield scp
    finally:
        server.shutdown()


def test_ok_against_pynetdicom(run: Runner, archive: Scp) -> None:
    before = len(archive.echoes)
    result = run(probe(archive.port))
    assert result.ok, result
    assert result.text.startswith("C-ECHO OK in ") and result.text.endswith("ms")
    # The SCP really served a C-ECHO for our titles, and saw an orderly release.
    assert archive.echoes[before:] == [(CALLING, "ARCHIVE")]
    wait_until(lambda: CALLING in archive.released, timeout=5)


def test_wrong_called_ae_is_a_configuration_error(run: Runner, archive: Scp) -> None:
    before = len(archive.echoes)
    result = run(probe(archive.port, called="PACS"))
    assert not result.ok
    assert result.text.startswith("association rejected (permanent): configuration error: ")
    assert "called AE" in result.text and "calling AE" not in result.text
    assert len(archive.echoes) == before


def test_wrong_calling_ae_is_a_configuration_error(run: Runner, archive: Scp) -> None:
    result = run(probe(archive.port, calling="INTRUDER"))
    assert not result.ok
    assert result.text.startswith("association rejected (permanent): configuration error: ")
    assert "calling AE" in result.text and "called AE" not in result.text


def test_c_echo_failure_status_is_reported(run: Runner, failing_archive: Scp) -> None:
    before = len(failing_archive.echoes)
    result = run(probe(failing_archive.port))
    assert result == ProbeResult(False, "C-ECHO status 0x0110")
    assert len(failing_archive.echoes) == before + 1


# --------------------------------------------------------------------------- DCMTK storescp


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    # No skip: a missing storescp must fail the suite (scripts/install-deps.sh installs dcmtk).
    assert os.access(STORESCP, os.X_OK), f"{STORESCP} is missing: install dcmtk"
    port = free_port()
    directory = tmp_path_factory.mktemp("storescp")
    log = directory / "storescp.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [STORESCP, "--aetitle", "ARCHIVE", "--output-directory", str(directory), str(port)],
            env={**os.environ, "TCP_NODELAY": "1"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def accepting() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_until(accepting, timeout=10)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_ok_against_dcmtk_storescp(run: Runner, storescp: int) -> None:
    result = run(probe(storescp))
    assert result.ok, result
    assert result.text.startswith("C-ECHO OK in ")


# --------------------------------------------------------------------------- scripted peers


def test_closed_port_is_connection_refused(run: Runner) -> None:
    port = free_port()
    result = run(probe(port))
    assert result == ProbeResult(False, "connection refused")


def _read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """One whole PDU from ``sock`` (test side, blocking), or None at EOF."""
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return None
        head += chunk
    length = int.from_bytes(head[2:6], "big")
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return head[0], body


CLOSE = b""


class ScriptedPeer(ThreadedServer):
    """Reads one PDU, answers ``replies[0]``; reads the next, answers ``replies[1]``; ...; then reads
    until the probe closes the connection, and sets ``eof`` when it sees that. ``None`` as a reply means
    "say nothing, keep the connection open", ``CLOSE`` "send a FIN"."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = replies
        self.received: list[int] = []  # PDU types read
        self.eof = threading.Event()
        super().__init__()

    def respond(self, sock: socket.socket) -> None:
        sock.settimeout(15)
        try:
            for reply in self.replies:
                pdu = _read_pdu(sock)
                if pdu is None:
                    break
                self.received.append(pdu[0])
                if reply is None:
                    break
                if reply == CLOSE:
                    sock.shutdown(socket.SHUT_WR)
                    break
                sock.sendall(reply)
            while sock.recv(65536):
                pass
        except OSError:  # a reset closes the connection too
            pass
        self.eof.set()


def _scripted(run: Runner, replies: list[bytes | None], **kwargs: Any) -> tuple[ProbeResult, float, ScriptedPeer]:
    """Probe a scripted peer; return (verdict, seconds it took, peer). Checks the socket gets closed."""
    peer = ScriptedPeer(replies)

    async def go() -> tuple[ProbeResult, float]:
        start = time.monotonic()
        result = await probe(peer.port, **kwargs)
        elapsed = time.monotonic() - start
        # Still on the probe's loop, as in medlb: the connection must be closed now, not when the
        # loop is. The peer sees EOF (or a reset) without having closed its side.
        await asyncio.to_thread(peer.eof.wait, 2)
        return result, elapsed

    try:
        result, elapsed = run(go())
        assert peer.eof.is_set(), f"the probe left its connection open after {result}"
        return result, elapsed, peer
    finally:
        peer.stop()


def test_silent_server_is_no_response_within_timeout(run: Runner) -> None:
    result, elapsed, peer = _scripted(run, [None], timeout=0.4)
    assert result == ProbeResult(False, "no response: timeout after 400ms")
    assert 0.35 <= elapsed < 0.4 + 0.6
    assert peer.received == [dicom_pdu.PduType.ASSOCIATE_RQ]  # it did send its A-ASSOCIATE-RQ


def test_silent_after_the_c_echo_is_no_response(run: Runner) -> None:
    result, elapsed, peer = _scripted(run, [pn_ac(), None], timeout=0.4)
    assert result == ProbeResult(False, "no response: timeout after 400ms")
    assert elapsed < 1.0
    assert peer.received == [dicom_pdu.PduType.ASSOCIATE_RQ, dicom_pdu.PduType.P_DATA_TF]


GARBAGE = {
    "http": (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "unknown PDU type 0x48"),
    "4GB-AC": (b"\x02\x00\xff\xff\xff\xff", "over the limit"),
    "4GB-PDATA": (b"\x04\x00\xff\xff\xff\xff", "over the limit"),
    "RJ-length-0": (b"\x03\x00\x00\x00\x00\x00", "must be 4"),
    "AC-zeros": (b"\x02\x00\x00\x00\x00\x44" + b"\x00" * 0x44, "DICOM protocol error"),
    "AC-short": (b"\x02\x00\x00\x00\x00\x10" + b"\x00" * 0x10, "under its minimum"),
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_answer_is_a_protocol_error_quickly(run: Runner, name: str) -> None:
    reply, detail = GARBAGE[name]
    result, elapsed, _ = _scripted(run, [reply, None], timeout=5)
    assert not result.ok
    assert result.text.startswith("DICOM protocol error: ") and detail in result.text, result
    assert elapsed < 1.0  # from the header: not waiting for 4 GB nor for the timeout


def _echo_rsp(status: int, message_id: int = 1, context_id: int = 1) -> bytes:
    return dicom_dimse.command_pdata(dicom_dimse.encode_c_echo_rsp(message_id, status), context_id)


def _fragment(fragment: bytes, control: int) -> bytes:
    """One P-DATA-TF holding one command fragment (``control`` 0x01, or 0x03 for the last)."""
    pdv = (len(fragment) + 2).to_bytes(4, "big") + bytes([1, control]) + fragment
    return bytes([0x04, 0]) + len(pdv).to_bytes(4, "big") + pdv


_ECHO_RSP = dicom_dimse.encode_c_echo_rsp(1)
RELEASE_RP = dicom_pdu.ReleaseRP().encode()
ABORT = dicom_pdu.abort(dicom_pdu.AbortSource.SERVICE_USER, 0).encode()


@pytest.mark.parametrize(
    ("replies", "text"),
    [
        ([pn_rj(2, 3, 1)], "association rejected (transient): temporary congestion"),
        ([pn_rj(1, 3, 2)], "association rejected (permanent): local limit exceeded"),
        ([pn_rj(1, 1, 1)], "association rejected (permanent): no reason given"),
        ([pn_rj(1, 2, 2)], "association rejected (permanent): protocol version not supported"),
        ([pn_rj(1, 1, 3)], "association rejected (permanent): configuration error: calling AE title not recognised"),
        ([ABORT], "association answered with PDU type 0x07"),
        ([RELEASE_RP], "association answered with PDU type 0x06"),
        ([pn_ac(), ABORT], "association aborted by the server during C-ECHO"),
        ([pn_ac(), RELEASE_RP], "C-ECHO answered with PDU type 0x06"),
        ([pn_ac(), _echo_rsp(0xA700), RELEASE_RP], "C-ECHO status 0xA700"),
        ([pn_ac(), _echo_rsp(0x0000, message_id=2)], "DICOM protocol error: C-ECHO-RSP answers message 2"),
        ([pn_ac(), _echo_rsp(0x0000), ABORT], "release answered with PDU type 0x07"),
        ([pn_ac(), _echo_rsp(0x0000), RELEASE_RP], "C-ECHO OK in "),
        # A response split over two PDUs (two command fragments) is reassembled.
        (
            [
                pn_ac(),
                _fragment(_ECHO_RSP[:30], 0x01) + _fragment(_ECHO_RSP[30:], 0x03),
                RELEASE_RP,
            ],
            "C-ECHO OK in ",
        ),
    ],
    ids=[
        "rj-transient",
        "rj-local-limit",
        "rj-no-reason",
        "rj-protocol-version",
        "rj-calling",
        "abort-instead-of-ac",
        "rp-instead-of-ac",
        "abort-instead-of-rsp",
        "rp-instead-of-rsp",
        "status-a700",
        "wrong-message-id",
        "abort-instead-of-rp",
        "ok",
        "ok-fragmented",
    ],
)
def test_scripted_verdicts(run: Runner, replies: list[bytes | None], text: str) -> None:
    result, elapsed, peer = _scripted(run, [*replies, None], timeout=5)
    assert result.text.startswith(text), result
    assert result.ok == (text == "C-ECHO OK in ")
    assert elapsed < 1.0
    # The probe sent what the script answered, in order: RQ, then P-DATA, then RELEASE-RQ.
    expected = [dicom_pdu.PduType.ASSOCIATE_RQ, dicom_pdu.PduType.P_DATA_TF, dicom_pdu.PduType.RELEASE_RQ]
    assert peer.received == expected[: len(peer.received)] and len(peer.received) >= min(len(replies), 3)


@pytest.mark.parametrize("after_release_rq", ["silent", "close", "abort"])
def test_failure_status_is_not_masked_by_a_failed_release(run: Runner, after_release_rq: str) -> None:
    """The C-ECHO-RSP settles the verdict: a server answering 0xA700 and then not completing the
    release (silence, FIN, A-ABORT) is reported as "C-ECHO status 0xA700", not as a timeout or a
    closed connection, which would send an operator after the network instead of the archive."""
    reply = {"silent": None, "close": CLOSE, "abort": ABORT}[after_release_rq]
    result, elapsed, peer = _scripted(run, [pn_ac(), _echo_rsp(0xA700), reply], timeout=0.5)
    assert result == ProbeResult(False, "C-ECHO status 0xA700")
    assert peer.received[-1] == dicom_pdu.PduType.RELEASE_RQ  # the release was still attempted
    assert elapsed < 0.5 + 0.6


def test_peer_closing_mid_association_is_reported(run: Runner) -> None:
    # The peer answers the RQ with half a PDU header and closes.
    class HalfHeader(ThreadedServer):
        def respond(self, sock: socket.socket) -> None:
            _read_pdu(sock)
            sock.sendall(b"\x02\x00\x00")
            sock.close()

    peer = HalfHeader()
    try:
        result = run(probe(peer.port, timeout=5))
    finally:
        peer.stop()
    assert result == ProbeResult(False, "connection closed by peer")
