"""MLLP over TLS through medlb: TLS terminated at the frontend, re-encrypted to a TLS-only receiver
whose certificate medlb verifies; the ``hl7`` check runs over TLS too."""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medlb.proto import hl7, mllp
from tests.helpers import Medlb, free_port, running_medlb
from tests.io.test_tls import Pki, make_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


class TlsReceiver:
    """An MLLP receiver that only speaks TLS (the backend certificate) and answers AA, recording control IDs."""

    def __init__(self, pki: Pki) -> None:
        self.port = free_port()
        self.received: list[str] = []
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.path("backend.crt"), pki.path("backend.key"))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10), "the TLS receiver did not start"

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            framer = mllp.MllpFramer()
            try:
                while data := await reader.read(65536):
                    for payload in framer.feed(data):
                        header = hl7.parse_header(payload)
                        self.received.append(header.control_id)
                        writer.write(mllp.frame(hl7.make_ack(header, "AA", timestamp="20261122120000")))
                    await writer.drain()
            except (ConnectionError, ssl.SSLError):
                pass
            finally:
                writer.close()

        async def main() -> None:
            self.server = await asyncio.start_server(handle, "127.0.0.1", self.port, ssl=self.context)
            self.ready.set()
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except (asyncio.CancelledError, RuntimeError):
            pass
        finally:
            self.server.close()
            self.loop.run_until_complete(self.server.wait_closed())
            self.loop.close()

    def stop(self) -> None:
        def shutdown() -> None:
            for task in asyncio.all_tasks(self.loop):
                task.cancel()

        self.loop.call_soon_threadsafe(shutdown)
        self.thread.join(5)


@pytest.fixture
def lab(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Medlb, TlsReceiver]]:
    receiver = TlsReceiver(pki)
    port = free_port()
    config: dict[str, Any] = {
        "defaults": {"check": {"inter": "500ms"}},
        "frontends": [
            {
                "name": "his",
                "mode": "hl7",
                "bind": [f"127.0.0.1:{port}"],
                "default_backend": "ris",
                "tls": {"certificates": [{"cert": pki.path("pacs.crt"), "key": pki.path("pacs.key")}]},
            }
        ],
        "backends": [
            {
                "name": "ris",
                "check": {"type": "hl7"},
                "tls": {"ca": pki.path("ca.crt")},
                "servers": [{"name": "ris1", "address": f"127.0.0.1:{receiver.port}"}],
            }
        ],
    }
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("server ris/ris1 op_state DOWN -> UP (HL7 AA")  # the check ran over TLS
            yield port, lb, receiver
    finally:
        receiver.stop()


def send_over_tls(pki: Pki, port: int, payload: bytes) -> bytes:
    context = ssl.create_default_context(cafile=pki.path("ca.crt"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with context.wrap_socket(raw, server_hostname="pacs.example") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        tls.sendall(mllp.frame(payload))
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = tls.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


def test_mllp_over_tls_on_both_legs(pki: Pki, lab: tuple[int, Medlb, TlsReceiver]) -> None:
    port, lb, receiver = lab
    answer = send_over_tls(pki, port, b"MSH|^~\\&|HIS|H|RIS|H|20261122||ADT^A01|TLS001|P|2.5\rPID|1||P1^^^H\r")
    ack = hl7.parse_ack(answer[1:-2])
    assert (ack.code, ack.control_id) == ("AA", "TLS001")
    assert "TLS001" in receiver.received
    lb.wait_for_log("control_id=TLS001 type=ADT^A01 key=P1^^^H ack=AA attempts=1")


def test_plain_mllp_on_the_tls_port_reaches_nobody(pki: Pki, lab: tuple[int, Medlb, TlsReceiver]) -> None:
    port, lb, receiver = lab
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        raw.sendall(mllp.frame(b"MSH|^~\\&|HIS|H|RIS|H|20261122||ADT^A01|PLAIN01|P|2.5\r"))
        raw.settimeout(10)
        try:
            answer = raw.recv(4096)
        except (ConnectionResetError, TimeoutError):
            answer = b""
    assert b"MSA" not in answer
    lb.wait_for_log("TLS handshake failed")
    assert "PLAIN01" not in receiver.received
