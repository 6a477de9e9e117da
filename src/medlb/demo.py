"""``medlb demo``: a self-contained lab on loopback.

Three demo backend servers (each greets with its own name, then echoes what it
receives) behind a medlb frontend with health checks, so an engineer can see
balancing, health checking and failover without any real PACS.

DICOM: two demo storage archives (pynetdicom, a development dependency that
``make demo`` installs) with *different* AE titles, behind one ``mode: dicom``
frontend called ``ARCHIVE``: medlb readdresses each association to the archive's
own title, checks both with C-ECHO, and counts what flows.

HL7: two demo MLLP receivers (medlb's own codec) that acknowledge every message with
AA, behind a ``mode: hl7`` frontend that balances message by message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import threading
from typing import Any

from medlb.config import Config, parse_config
from medlb.errors import StartupError

log = logging.getLogger("medlb.demo")

DEMO_TOKEN_ENV = "MEDLB_DEMO_TOKEN"
#: The demo's DICOM frontend listens on the demo port plus this.
DICOM_OFFSET = 4
#: The demo archives: (server name, port offset from the demo port, their own AE title).
DICOM_ARCHIVES = (("pacs1", 105, "DEMO_PACS1"), ("pacs2", 106, "DEMO_PACS2"))
#: The demo's HL7 frontend listens on the demo port plus this; its receivers on the offsets below.
HL7_OFFSET = 5
HL7_RECEIVERS = (("ris1", 107), ("ris2", 108))
#: What the banner's test line sends (MLLP-framed by the line itself).
HL7_SAMPLE = "MSH|^~\\&|DEMO|HIS|RIS|HOSP|20261122120000||ADT^A01|DEMO0001|P|2.5\\rPID|1||12345^^^HOSP||DOE^JANE\\r"


class DemoEchoServer:
    """Greets each client with ``served by NAME`` and echoes its bytes back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.connections = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(f"medlb demo: served by {self.name}\n".encode())
            await writer.drain()
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


class DemoArchive:
    """A DICOM storage SCP (any storage SOP class, and Verification) that keeps nothing but a count.

    pynetdicom runs it in its own threads; it refuses associations not addressed to its own
    AE title, as archives configured with ``DicomCheckCalledAet`` do, so the demo shows that
    medlb's AE title rewriting is what makes two differently named archives one pool.
    """

    def __init__(self, ae_title: str) -> None:
        self.ae_title = ae_title
        self.stored = 0
        self._lock = threading.Lock()
        self._server: Any = None

    def start(self, host: str, port: int) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        def on_store(event: Any) -> int:
            with self._lock:
                self.stored += 1
            return 0x0000

        logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # medlb's own log tells the story
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self._server = ae.start_server((host, port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None


class DemoReceiver:
    """An MLLP receiver that answers every HL7 message with AA (MSA-2 = its MSH-10) and counts them."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.received = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from datetime import UTC, datetime

        from medlb.errors import Hl7ProtocolError
        from medlb.proto import hl7, mllp

        framer = mllp.MllpFramer()
        try:
            while data := await reader.read(65536):
                for payload in framer.feed(data):
                    self.received += 1
                    header = hl7.parse_header(payload)
                    stamp = hl7.format_timestamp(datetime.now(UTC))
                    writer.write(mllp.frame(hl7.make_ack(header, "AA", f"stored by {self.name}", timestamp=stamp)))
                await writer.drain()
        except (ConnectionError, Hl7ProtocolError):
            pass
        finally:
            writer.close()


def demo_config(host: str, port: int, admin_port: int = 9900) -> tuple[Config, list[tuple[str, int]]]:
    """The built-in config: the issue's contract example, pointed at the demo servers.

    The admin API and dashboard are on; the token comes from the environment
    variable ``MEDLB_DEMO_TOKEN``, which :func:`run_demo` fills with a fresh random
    token and prints (a demo on loopback, not a deployment).
    """
    servers = [("s1", port + 101), ("s2", port + 102), ("s3", port + 103)]
    raw: dict[str, Any] = {
        "admin": {"bind": f"{host}:{admin_port}", "token_env": DEMO_TOKEN_ENV},
        "defaults": {
            "timeouts": {"connect": "3s", "client": "12h", "server": "12h", "queue": "30s", "check": "2s"},
            "check": {"inter": "2s", "fastinter": "500ms", "downinter": "5s", "rise": 2, "fall": 3},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [
            {"name": "demo", "mode": "tcp", "bind": [f"{host}:{port}"], "maxconn": 10000, "default_backend": "pool"},
            {
                "name": "dicom",
                "mode": "dicom",
                "bind": [f"{host}:{port + DICOM_OFFSET}"],
                "default_backend": "archives",
                "dicom": {"allow_called": ["ARCHIVE"]},
            },
            {"name": "hl7", "mode": "hl7", "bind": [f"{host}:{port + HL7_OFFSET}"], "default_backend": "ris"},
        ],
        "backends": [
            {
                "name": "pool",
                "balance": "roundrobin",
                "check": {"type": "tcp"},
                "servers": [
                    {"name": "s1", "address": f"{host}:{servers[0][1]}"},
                    {"name": "s2", "address": f"{host}:{servers[1][1]}", "weight": 2, "maxconn": 500},
                    {"name": "s3", "address": f"{host}:{servers[2][1]}", "backup": True},
                ],
            },
            {
                "name": "archives",
                "balance": "roundrobin",
                "check": {"type": "dicom-echo", "calling_ae": "MEDLB"},
                "servers": [
                    {"name": name, "address": f"{host}:{port + offset}", "ae_title": title}
                    for name, offset, title in DICOM_ARCHIVES
                ],
            },
            {
                "name": "ris",
                "balance": "roundrobin",
                "check": {"type": "hl7"},
                "servers": [{"name": name, "address": f"{host}:{port + offset}"} for name, offset in HL7_RECEIVERS],
            },
        ],
    }
    return parse_config(raw, "<demo>"), servers


def banner(host: str, port: int, servers: list[tuple[str, int]], admin_port: int = 9900, token: str = "") -> str:
    listing = "\n".join(f"    {name}  {host}:{p}" for name, p in servers)
    return f"""
medlb demo is running.

  frontend demo (tcp) on {host}:{port} -> backend pool (roundrobin, tcp checks every 2s)
{listing}
    (s2 has weight 2; s3 is a backup that serves only when s1 and s2 are down)

Try:
  python3 -c "import socket; print(socket.create_connection(('{host}', {port})).recv(64).decode())"
      run it a few times: s2 answers two sessions in three (weight 2), interleaved with s1
  bash -c 'exec 3<>/dev/tcp/{host}/{port}; head -1 <&3'

DICOM (mode dicom) on {host}:{port + DICOM_OFFSET}, called AE ARCHIVE -> archives pacs1 (DEMO_PACS1) and pacs2
(DEMO_PACS2), checked with C-ECHO; medlb readdresses each association to the archive's own AE title:
  echoscu -aet MODALITY -aec ARCHIVE {host} {port + DICOM_OFFSET}
  storescu -aet MODALITY -aec ARCHIVE {host} {port + DICOM_OFFSET} some.dcm
  echoscu -aet MODALITY -aec OTHER {host} {port + DICOM_OFFSET}      (refused: called AE not recognised)
  (DCMTK: apt-get install dcmtk; export TCP_NODELAY=1 for realistic speed)

HL7 (mode hl7) on {host}:{port + HL7_OFFSET} -> receivers ris1 and ris2 (they answer AA), balanced per message,
in order per patient (PID-3); the ACK comes back only from a receiver that took the message:
  python3 -c "import socket; s = socket.create_connection(('{host}', {port + HL7_OFFSET})); \\
s.sendall(b'\\x0b{HL7_SAMPLE}\\x1c\\r'); print(s.recv(4096)[1:-2].decode().replace(chr(13), chr(10)))"
  (send it twice: the second copy is answered from medlb's duplicate table, not delivered again)

Dashboard and admin API: http://{host}:{admin_port}/   (log in with the token below)
  token: {token}
  export MEDLB_URL=http://{host}:{admin_port} MEDLB_TOKEN={token}
  medlb ctl status;  medlb ctl drain pool/s1 --wait;  medlb ctl ready pool/s1
  curl -H "Authorization: Bearer $MEDLB_TOKEN" http://{host}:{admin_port}/metrics

Stop with Ctrl-C.
"""


async def _demo_main(host: str, port: int, admin_port: int) -> int:
    from medlb.supervisor import Supervisor

    token = os.environ.setdefault(DEMO_TOKEN_ENV, secrets.token_urlsafe(24))
    config, servers = demo_config(host, port, admin_port)
    started: list[asyncio.Server] = []
    archives: list[DemoArchive] = []
    try:
        for name, offset in HL7_RECEIVERS:
            receiver = DemoReceiver(name)
            try:
                started.append(await asyncio.start_server(receiver.handle, host, port + offset))
            except OSError as exc:
                raise StartupError(f"demo receiver {name} cannot bind {host}:{port + offset}: {exc.strerror}") from None
        for _, offset, title in DICOM_ARCHIVES:
            archive = DemoArchive(title)
            try:
                archive.start(host, port + offset)
            except OSError as exc:
                raise StartupError(f"demo archive {title} cannot bind {host}:{port + offset}: {exc.strerror}") from None
            archives.append(archive)
        for name, server_port in servers:
            echo = DemoEchoServer(name)
            try:
                started.append(await asyncio.start_server(echo.handle, host, server_port))
            except OSError as exc:
                raise StartupError(f"demo backend {name} cannot bind {host}:{server_port}: {exc.strerror}") from None
        supervisor = Supervisor(config)
        task = asyncio.create_task(supervisor.run(), name="supervisor")
        started_wait = asyncio.create_task(supervisor.started.wait())
        await asyncio.wait({task, started_wait}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            started_wait.cancel()
            return task.result()
        print(banner(host, port, servers, admin_port, token), flush=True)
        return await task
    finally:
        for server in started:
            server.close()
        for archive in archives:
            archive.stop()


def run_demo(host: str = "127.0.0.1", port: int = 7000, admin_port: int = 9900) -> int:
    from medlb.supervisor import new_event_loop

    with asyncio.Runner(loop_factory=new_event_loop("auto")) as runner:
        return runner.run(_demo_main(host, port, admin_port))
