"""``mode: dicom`` end to end: a real medlb process between real DICOM peers on loopback.

Peers nobody here wrote: DCMTK (``echoscu``, ``storescu``, ``storescp``, ``openssl s_client``) and
pynetdicom (SCU and storage SCPs), plus raw sockets where the test must see the exact bytes on the
wire (the A-ASSOCIATE-AC echo, A-ASSOCIATE-RJ fields, the A-ABORT after a server dies). DCMTK runs
with ``TCP_NODELAY=1``, as ARCHITECTURE.md asks. A missing DCMTK fails the tests: it is a required
interop peer, not an optional one.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import AsynchronousOperationsWindowNegotiation, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from tests.helpers import Backend, LabBase, Medlb, ThreadedServer, free_port, log_field, wait_until

HOST = "127.0.0.1"
DCMTK_TOOLS = ("echoscu", "storescu", "storescp")
VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
#: What medlb sends when it loses the other side: A-ABORT, service provider, reason not specified.
PROVIDER_ABORT = bytes.fromhex("07000000000400000200")


def tool(name: str) -> str:
    """The path of a DCMTK tool; the test fails (never skips) without it."""
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"DCMTK's {name} is required for the mode: dicom interop tests (apt-get install dcmtk)")
    return path


def dcmtk_env() -> dict[str, str]:
    # DCMTK 3.6 keeps Nagle on unless TCP_NODELAY is set (dicom-hl7.md §1.8).
    return dict(os.environ, TCP_NODELAY="1")


def run_tool(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool(args[0]), *args[1:]], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=False
    )


# --------------------------------------------------------------------------- raw DUL bytes


def item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def ae16(title: str) -> bytes:
    return title.encode().ljust(16)


def associate_rq(called: str = "ARCHIVE", calling: str = "RAWSCU") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification (dicom-hl7.md Appendix A)."""
    fixed = struct.pack(">HH", 1, 0) + ae16(called) + ae16(calling) + b"\0" * 32
    context = item(0x20, bytes([1, 0, 0, 0]) + item(0x30, VERIFICATION.encode()) + item(0x40, IMPLICIT_LE.encode()))
    user = item(
        0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433") + item(0x55, b"RAWSCU")
    )
    body = fixed + item(0x10, b"1.2.840.10008.3.1.1.1") + context + user
    return struct.pack(">BBI", 1, 0, len(body)) + body


def associate_ac_for(rq: bytes) -> bytes:
    """The A-ASSOCIATE-AC a minimal SCP answers ``rq`` with: every context accepted with its first
    transfer syntax, the RQ's fixed fields echoed (PS3.8 Table 9-17)."""
    body = rq[6:]
    out = bytearray(body[:68])
    pos = 68
    while pos < len(body):
        item_type = body[pos]
        (length,) = struct.unpack(">H", body[pos + 2 : pos + 4])
        payload = body[pos + 4 : pos + 4 + length]
        if item_type == 0x10:
            out += body[pos : pos + 4 + length]
        elif item_type == 0x20:
            sub = payload[4:]
            first_ts = b""
            i = 0
            while i < len(sub):
                (sub_len,) = struct.unpack(">H", sub[i + 2 : i + 4])
                if sub[i] == 0x40 and not first_ts:
                    first_ts = sub[i : i + 4 + sub_len]
                i += 4 + sub_len
            out += item(0x21, bytes([payload[0], 0, 0, 0]) + first_ts)
        elif item_type == 0x50:
            out += item(0x50, item(0x51, struct.pack(">I", 16384)) + item(0x52, b"1.2.826.0.1.3680043.9.7433.1"))
        pos += 4 + length
    return struct.pack(">BBI", 2, 0, len(out)) + bytes(out)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def read_pdu(sock: socket.socket) -> bytes:
    """One whole PDU, header included."""
    header = recv_exact(sock, 6)
    (length,) = struct.unpack(">I", header[2:])
    assert length < 1 << 20, header
    return header + recv_exact(sock, length)


def read_until_close(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Everything the peer sends until it closes, and how long that took (fails after ``limit``)."""
    sock.settimeout(limit)
    start = time.monotonic()
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit}s (received {data[:32]!r})")
    return data, time.monotonic() - start


def raw_associate(port: int, called: str = "ARCHIVE", calling: str = "RAWSCU") -> tuple[socket.socket, bytes, bytes]:
    """Connect, send an A-ASSOCIATE-RQ, read the answer PDU: (socket, rq, answer)."""
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    rq = associate_rq(called, calling)
    sock.sendall(rq)
    return sock, rq, read_pdu(sock)


def rj(result: int, source: int, reason: int) -> bytes:
    return bytes([3, 0, 0, 0, 0, 4, 0, result, source, reason])


# --------------------------------------------------------------------------- peers


class StoreSCP:
    """pynetdicom storage + verification SCP that records what it was sent."""

    def __init__(self, ae_title: str, *, require_called: bool = True) -> None:
        self.ae_title = ae_title
        self.lock = threading.Lock()
        self.opened = 0
        self.echoes: list[str] = []  # calling AE title as received
        self.stored: list[tuple[str, str]] = []  # (calling AE, SOP Instance UID)
        self.aborted: list[str] = []  # calling AE of associations that received an A-ABORT PDU
        self.requested: list[Any] = []  # the requestor side of each association, as received
        ae = AE(ae_title=ae_title)
        ae.require_called_aet = require_called
        ae.network_timeout = 10
        ae.add_supported_context(Verification)
        for sop_class in (CTImageStorage, MRImageStorage):
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        self.ae = ae
        handlers = [
            (evt.EVT_CONN_OPEN, self._opened),
            (evt.EVT_C_ECHO, self._echo),
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_PDU_RECV, self._pdu),
            (evt.EVT_REQUESTED, self._requested),
        ]
        self.server = ae.start_server((HOST, 0), block=False, evt_handlers=handlers)

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def _opened(self, event: Any) -> None:
        with self.lock:
            self.opened += 1

    def _echo(self, event: Any) -> int:
        with self.lock:
            self.echoes.append(event.assoc.requestor.ae_title)
        return 0x0000

    def _store(self, event: Any) -> int:
        with self.lock:
            self.stored.append((event.assoc.requestor.ae_title, str(event.request.AffectedSOPInstanceUID)))
        return 0x0000

    def _requested(self, event: Any) -> None:
        with self.lock:
            self.requested.append(event.assoc.requestor)

    def _pdu(self, event: Any) -> None:
        # Only a real A-ABORT PDU counts: pynetdicom also reports a bare TCP close as an abort.
        if isinstance(event.pdu, A_ABORT_RQ):
            with self.lock:
                self.aborted.append(event.assoc.requestor.ae_title)

    def stop(self) -> None:
        self.ae.shutdown()


class RawSCP(ThreadedServer):
    """Accepts every association with a hand-built AC, then holds it until :meth:`kill`, which
    resets the connections (a crashed archive: no A-ABORT, no FIN) and stops listening."""

    def __init__(self) -> None:
        self.killed = threading.Event()
        self.callings: list[str] = []
        super().__init__()

    def respond(self, sock: socket.socket) -> None:
        try:
            rq = read_pdu(sock)
        except (ConnectionError, OSError):
            return  # a TCP health check
        self.callings.append(rq[26:42].decode().strip())
        sock.sendall(associate_ac_for(rq))
        self.killed.wait(30)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    def kill(self) -> None:
        self.stop()
        self.killed.set()


def write_instances(directory: Path, copies: int = 1) -> dict[str, pydicom.Dataset]:
    """CT_small, MR_small and ``copies`` copies of each with new SOP Instance UIDs: {path: dataset}."""
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, pydicom.Dataset] = {}
    for name in ("CT_small.dcm", "MR_small.dcm"):
        source = get_testdata_file(name)
        assert isinstance(source, str), name
        ds = pydicom.dcmread(source)
        out[source] = ds
        for i in range(copies):
            copy = pydicom.dcmread(source)
            uid = generate_uid()
            copy.SOPInstanceUID = uid
            copy.file_meta.MediaStorageSOPInstanceUID = uid
            path = directory / f"{name[:-4]}-{i}.dcm"
            copy.save_as(path, enforce_file_format=True)
            out[str(path)] = copy
    return out


def log_lines(lb: Medlb, needle: str) -> list[str]:
    """medlb's per-association log lines that contain ``needle``."""
    return [line for line in lb.log.splitlines() if "medlb.dicom: dicom client=" in line and needle in line]


class Lab(LabBase):
    """Everything a test starts, stopped in reverse order whatever happens."""

    def store_scp(self, ae_title: str, *, require_called: bool = True) -> StoreSCP:
        scp = StoreSCP(ae_title, require_called=require_called)
        self.stack.callback(scp.stop)
        return scp

    def raw_scp(self) -> RawSCP:
        scp = RawSCP()
        self.stack.callback(scp.kill)
        return scp

    def trap(self) -> Backend:
        """A plain TCP listener standing in for a server: it counts the connections it accepts."""
        backend = Backend("trap")
        self.stack.callback(backend.stop)
        return backend

    def process(self, *args: str) -> subprocess.Popen[bytes]:
        log = (self.tmp / f"{args[0]}-{time.monotonic_ns()}.log").open("wb")
        self.stack.callback(log.close)
        proc = subprocess.Popen([tool(args[0]), *args[1:]], env=dcmtk_env(), stdout=log, stderr=subprocess.STDOUT)

        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)

        self.stack.callback(stop)
        return proc

    def storescp(self, ae_title: str, out: Path) -> tuple[subprocess.Popen[bytes], int]:
        out.mkdir(parents=True, exist_ok=True)
        port = free_port()
        proc = self.process("storescp", "-aet", ae_title, "-od", str(out), str(port))

        def listening() -> bool:
            assert proc.poll() is None, f"storescp exited with {proc.returncode}"
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), timeout=1):
                return True
            return False

        wait_until(listening, timeout=10)
        return proc, port


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    for name in DCMTK_TOOLS:
        tool(name)
    lab = Lab(tmp_path)
    with lab.stack:
        yield lab


def dicom_config(
    port: int,
    servers: list[dict[str, Any]],
    *,
    check: dict[str, Any] | None = None,
    dicom: dict[str, Any] | None = None,
    **backend: Any,
) -> dict[str, Any]:
    """One ``mode: dicom`` frontend (calling ARCHIVE) in front of one backend, with fast checks."""
    b: dict[str, Any] = {
        "name": "archive",
        "balance": "roundrobin",
        "check": check or {"type": "dicom-echo"},
        "servers": servers,
    }
    b.update(backend)
    settings = {"artim_timeout": "1s", "association_timeout": "3s"}
    settings.update(dicom or {})
    return {
        "global": {"hard_stop_after": "3s"},
        "defaults": {
            "timeouts": {"connect": "500ms", "client": "1m", "server": "1m", "queue": "2s", "check": "2s"},
            "check": {"inter": "500ms", "fastinter": "200ms", "downinter": "300ms", "rise": 1, "fall": 2},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [
            {
                "name": "pacs",
                "mode": "dicom",
                "bind": [f"{HOST}:{port}"],
                "default_backend": "archive",
                "dicom": settings,
            }
        ],
        "backends": [b],
    }


def wait_up(lb: Medlb, *keys: str) -> None:
    for key in keys:
        lb.wait_for_log(f"server {key} op_state DOWN -> UP")


def scu(ae_title: str = "PYSCU") -> AE:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    return ae


def echo_once(port: int, calling: str) -> None:
    """One pynetdicom association with one successful C-ECHO, released."""
    assoc = scu(calling).associate(HOST, port, ae_title="ARCHIVE")
    assert assoc.is_established, f"{calling}: association not established"
    try:
        status = assoc.send_c_echo()
        assert status is not None and status.Status == 0x0000
    finally:
        assoc.release()


# --------------------------------------------------------------------------- 1. C-ECHO and C-STORE


def test_echo_and_store_through_medlb(lab: Lab, tmp_path: Path) -> None:
    received = tmp_path / "received"
    _, scp_port = lab.storescp("STORESCP", received)
    port = free_port()
    lb = lab.medlb(dicom_config(port, [{"name": "a1", "address": f"{HOST}:{scp_port}", "ae_title": "STORESCP"}]))
    wait_up(lb, "archive/a1")

    echo = run_tool(
        "echoscu", "-to", "5", "-ta", "5", "-td", "5", "-aet", "ECHOSCU", "-aec", "ARCHIVE", HOST, str(port)
    )
    assert echo.returncode == 0, echo.stderr + echo.stdout
    echo_once(port, "PYSCU")

    sent = write_instances(tmp_path / "send", copies=1)
    store = run_tool("storescu", "-aet", "MODALITY", "-aec", "ARCHIVE", HOST, str(port), *sent)
    assert store.returncode == 0, store.stderr + store.stdout

    got = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p) for p in received.iterdir())}
    assert sorted(got) == sorted(ds.SOPInstanceUID for ds in sent.values())
    for ds in sent.values():
        copy = got[ds.SOPInstanceUID]
        assert copy.SOPClassUID == ds.SOPClassUID
        assert copy.PixelData == ds.PixelData
        assert copy.PatientName == ds.PatientName

    lb.wait_for_log("calling=MODALITY")
    (line,) = log_lines(lb, "calling=MODALITY")
    n = len(sent)
    assert f"commands=[C-STORE-RQ={n}]" in line and f"responses=[success={n}]" in line, line
    assert "server=a1" in line and "called=ARCHIVE server_ae=STORESCP" in line and "term=released" in line, line
    for calling in ("ECHOSCU", "PYSCU"):
        lb.wait_for_log(f"calling={calling} ")
        (line,) = log_lines(lb, f"calling={calling} ")
        assert "commands=[C-ECHO-RQ=1] responses=[success=1] term=released" in line, line


# --------------------------------------------------------------------------- 2. balancing


def test_roundrobin_spreads_associations(lab: Lab) -> None:
    scps = [lab.store_scp("ARCHIVE"), lab.store_scp("ARCHIVE")]
    port = free_port()
    servers = [{"name": f"a{i}", "address": f"{HOST}:{s.port}", "ae_title": "ARCHIVE"} for i, s in enumerate(scps, 1)]
    lb = lab.medlb(dicom_config(port, servers))
    wait_up(lb, "archive/a1", "archive/a2")
    for _ in range(6):
        echo = run_tool("echoscu", "-aet", "RR", "-aec", "ARCHIVE", HOST, str(port))
        assert echo.returncode == 0, echo.stderr + echo.stdout
    assert [s.echoes.count("RR") for s in scps] == [3, 3]
    wait_until(lambda: len(log_lines(lb, "calling=RR ")) == 6)
    assert Counter(log_field(line, "server") for line in log_lines(lb, "calling=RR ")) == {"a1": 3, "a2": 3}


def test_source_balance_keeps_a_calling_ae_on_one_server(lab: Lab) -> None:
    scps = [lab.store_scp("ARCHIVE"), lab.store_scp("ARCHIVE")]
    port = free_port()
    servers = [{"name": f"a{i}", "address": f"{HOST}:{s.port}", "ae_title": "ARCHIVE"} for i, s in enumerate(scps, 1)]
    lb = lab.medlb(dicom_config(port, servers, balance="source"))
    wait_up(lb, "archive/a1", "archive/a2")
    for _ in range(5):
        echo_once(port, "CT_SCANNER_1")
    where = [s.echoes.count("CT_SCANNER_1") for s in scps]
    assert sorted(where) == [0, 5], where
    callers = [f"MOD{i:02d}" for i in range(16)]
    for calling in callers:
        echo_once(port, calling)
        echo_once(port, calling)
    homes: dict[str, set[int]] = {}
    for index, scp in enumerate(scps):
        for calling in scp.echoes:
            homes.setdefault(calling, set()).add(index)
    assert all(len(homes[c]) == 1 for c in callers), homes  # each calling AE stayed put
    spread = Counter(next(iter(homes[c])) for c in callers)
    assert len(spread) == 2, spread  # and different calling AEs used both servers


# --------------------------------------------------------------------------- 3. AE title rewriting


def test_called_ae_is_rewritten_per_server_and_restored_in_the_ac(lab: Lab) -> None:
    scps = [lab.store_scp("STORE_A"), lab.store_scp("STORE_B")]
    port, plain_port = free_port(), free_port()
    servers = [{"name": f"s{i}", "address": f"{HOST}:{s.port}", "ae_title": s.ae_title} for i, s in enumerate(scps)]
    config = dicom_config(port, servers)
    # A second frontend in front of the same archives, with no ae_title: they must refuse "ARCHIVE".
    config["frontends"].append({**config["frontends"][0], "name": "plain", "bind": [f"{HOST}:{plain_port}"]})
    config["frontends"][1]["default_backend"] = "plain"
    config["backends"].append(
        {
            "name": "plain",
            "check": {"type": "tcp"},
            "servers": [{"name": f"p{i}", "address": f"{HOST}:{s.port}"} for i, s in enumerate(scps)],
        }
    )
    lb = lab.medlb(config)
    wait_up(lb, "archive/s0", "archive/s1", "plain/p0", "plain/p1")

    for _ in range(2):
        echo_once(port, "REWRITE")
    assert [s.echoes.count("REWRITE") for s in scps] == [1, 1]

    # Negotiation passes through, except the asynchronous operations window (dicom.async_ops off).
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 5
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = CTImageStorage, True, True
    assoc = scu("NEGOTIATE").associate(HOST, port, ae_title="ARCHIVE", ext_neg=[window, role])
    assert assoc.is_established
    assoc.release()
    (requestor,) = [r for s in scps for r in s.requested if r.ae_title == "NEGOTIATE"]
    assert requestor.asynchronous_operations == (1, 1)  # absent: synchronous
    assert [item.sop_class_uid for item in requestor.role_selection.values()] == [CTImageStorage]

    # The AC the client gets echoes its own RQ's titles, whichever server answered (offsets 10-41).
    for _ in range(2):
        sock, rq, ac = raw_associate(port, called="ARCHIVE", calling="RAWSCU")
        with sock:
            assert ac[0] == 0x02, ac[:10]
            assert ac[10:42] == rq[10:42], (ac[10:42], rq[10:42])
            sock.sendall(bytes.fromhex("05000000000400000000"))  # A-RELEASE-RQ
            assert read_pdu(sock)[0] == 0x06
    wait_until(lambda: len(log_lines(lb, "calling=RAWSCU")) == 2)
    assert sorted(log_field(line, "server_ae") for line in log_lines(lb, "calling=RAWSCU")) == ["STORE_A", "STORE_B"]

    # No ae_title: each archive refuses the called AE (reason 7), and the client gets that very RJ.
    for _ in range(2):
        sock, _, answer = raw_associate(plain_port, called="ARCHIVE")
        with sock:
            assert answer == rj(1, 1, 7), answer
    assert [s.echoes.count("RAWSCU") for s in scps] == [0, 0]
    wait_until(lambda: len(log_lines(lb, "frontend=plain")) == 2)
    lines = log_lines(lb, "frontend=plain")
    assert all("term=server_rejected result=1 source=1 reason=7" in line for line in lines), lines


# --------------------------------------------------------------------------- 4. access lists


def test_access_lists_reject_without_touching_a_server(lab: Lab) -> None:
    trap = lab.trap()
    port, net_port = free_port(), free_port()
    config = dicom_config(
        port,
        [{"name": "t1", "address": f"{HOST}:{trap.port}"}],
        check={"type": "none"},
        dicom={"allow_calling": ["MOD*"], "allow_called": ["ARCHIVE"]},
    )
    config["frontends"].append(
        {
            **config["frontends"][0],
            "name": "net",
            "bind": [f"{HOST}:{net_port}"],
            "dicom": {"artim_timeout": "1s", "allow_networks": ["10.0.0.0/8", "::1/128"]},
        }
    )
    lb = lab.medlb(config)
    wait_up(lb, "archive/t1")

    cases = [
        (port, "ARCHIVE", "EVIL", rj(1, 1, 3)),  # calling AE not recognised
        (port, "OTHER", "MOD1", rj(1, 1, 7)),  # called AE not recognised
        (port, "OTHER", "EVIL", rj(1, 1, 3)),  # the calling AE is checked first
        (net_port, "ARCHIVE", "MOD1", rj(1, 1, 1)),  # source network: no reason given
    ]
    for frontend_port, called, calling, expected in cases:
        sock, _, answer = raw_associate(frontend_port, called=called, calling=calling)
        with sock:
            assert answer == expected, (called, calling, answer)
            data, _ = read_until_close(sock, 3)  # and medlb closes after the RJ
            assert data == b""

    echo = run_tool("echoscu", "-aet", "MOD1", "-aec", "NOT_HERE", HOST, str(port))
    assert echo.returncode != 0
    assert "Called AE Title Not Recognized" in echo.stdout + echo.stderr, echo.stdout + echo.stderr

    time.sleep(0.2)
    assert trap.accepted == 0, "a refused association reached the server"
    # Control: an admitted association does reach it (the trap is not a DICOM server, so it fails).
    sock, _, answer = raw_associate(port, called="ARCHIVE", calling="MOD1")
    sock.close()
    assert answer[0] == 0x03 and answer[7] == 2, answer  # transient: the server answered garbage
    assert trap.accepted >= 1
    # medlb logs an association once it has closed it, which can be just after the client saw the answer.
    wait_until(lambda: len(log_lines(lb, "term=rejected")) >= 5, timeout=3)
    assert len(log_lines(lb, "term=rejected")) == 5, lb.log


# --------------------------------------------------------------------------- 5. no server


def test_no_server_available_is_a_quick_transient_reject(lab: Lab) -> None:
    scp = lab.store_scp("ARCHIVE")
    port, down_port = free_port(), free_port()
    config = dicom_config(port, [{"name": "m1", "address": f"{HOST}:{scp.port}", "admin_state": "maint"}])
    config["frontends"].append({**config["frontends"][0], "name": "down", "bind": [f"{HOST}:{down_port}"]})
    config["frontends"][1]["default_backend"] = "dead"
    config["backends"].append(
        {"name": "dead", "check": {"type": "tcp"}, "servers": [{"name": "d1", "address": f"{HOST}:{free_port()}"}]}
    )
    lb = lab.medlb(config)
    lb.wait_for_log("server dead/d1 health check failed")
    for frontend_port in (port, down_port, port, down_port):
        start = time.monotonic()
        sock, _, answer = raw_associate(frontend_port)
        with sock:
            assert answer == rj(2, 3, 1), answer
            read_until_close(sock, 2)
        assert time.monotonic() - start < 2.0
    start = time.monotonic()
    echo = run_tool("echoscu", "-to", "10", "-ta", "10", "-aet", "MOD1", "-aec", "ARCHIVE", HOST, str(port))
    assert echo.returncode != 0 and "Rejected Transient" in echo.stdout + echo.stderr, echo.stdout + echo.stderr
    assert time.monotonic() - start < 2.0
    assert scp.opened == 0  # a server in maintenance is not even checked
    wait_until(lambda: len(log_lines(lb, "term=no_server")) >= 5, timeout=3)
    assert len(log_lines(lb, "term=no_server")) == 5, lb.log


# --------------------------------------------------------------------------- 6. server lost mid-association


def test_server_reset_mid_association_aborts_the_client(lab: Lab) -> None:
    raw, alive = lab.raw_scp(), lab.store_scp("ARCHIVE")
    port = free_port()
    servers = [
        # balance first + maxconn 1: the first association goes to the raw SCP, the next ones to "alive"
        {"name": "dead", "address": f"{HOST}:{raw.port}", "maxconn": 1},
        {"name": "alive", "address": f"{HOST}:{alive.port}"},
    ]
    lb = lab.medlb(dicom_config(port, servers, check={"type": "tcp"}, balance="first"))
    wait_up(lb, "archive/dead", "archive/alive")

    doomed, _, ac = raw_associate(port, calling="DOOMED")
    healthy: Association | None = None
    try:
        assert ac[0] == 0x02, ac
        assert raw.callings == ["DOOMED"]
        # An association on the surviving server must not notice anything.
        healthy = scu("HEALTHY").associate(HOST, port, ae_title="ARCHIVE")
        assert healthy.is_established
        assert healthy.send_c_echo().Status == 0

        raw.kill()
        data, took = read_until_close(doomed, 3)
        assert data == PROVIDER_ABORT, data
        assert took < 1.5, took  # at once, not after a timeout
        assert healthy.send_c_echo().Status == 0
    finally:
        doomed.close()
        if healthy is not None:
            healthy.release()

    lb.wait_for_log("server archive/dead op_state UP -> DOWN", timeout=3)
    for _ in range(6):
        echo_once(port, "AFTER")
    assert alive.echoes.count("AFTER") == 6
    # The last line is written after echoscu has its release answer: wait for it.
    wait_until(lambda: len(log_lines(lb, "calling=AFTER")) >= 6, timeout=3)
    after = log_lines(lb, "calling=AFTER")
    assert len(after) == 6 and all("server=alive" in line and "attempts=1" in line for line in after), after
    assert any("term=server_reset_aborted" in line for line in log_lines(lb, "server=dead")), lb.log


def test_client_lost_mid_association_aborts_the_server(lab: Lab) -> None:
    scp = lab.store_scp("ARCHIVE")
    port = free_port()
    lb = lab.medlb(dicom_config(port, [{"name": "a1", "address": f"{HOST}:{scp.port}", "ae_title": "ARCHIVE"}]))
    wait_up(lb, "archive/a1")
    for calling, linger in (("VANISHED", False), ("RESET", True)):
        sock, _, ac = raw_associate(port, calling=calling)
        assert ac[0] == 0x02, ac
        if linger:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # no A-RELEASE-RQ, no A-ABORT: the modality just went away
    wait_until(lambda: sorted(scp.aborted) == ["RESET", "VANISHED"], timeout=3)
    lb.wait_for_log("calling=RESET")
    assert "term=client_reset" in log_lines(lb, "calling=RESET")[0]
    assert "term=client_close" in log_lines(lb, "calling=VANISHED")[0]


def test_storescp_killed_during_a_transfer(lab: Lab, tmp_path: Path) -> None:
    one, port1 = lab.storescp("STORESCP", tmp_path / "one")
    two, port2 = lab.storescp("STORESCP", tmp_path / "two")
    port = free_port()
    servers = [{"name": "one", "address": f"{HOST}:{port1}"}, {"name": "two", "address": f"{HOST}:{port2}"}]
    lb = lab.medlb(dicom_config(port, servers, check={"type": "tcp"}))
    wait_up(lb, "archive/one", "archive/two")

    files = write_instances(tmp_path / "send", copies=150)
    storescu = lab.process("storescu", "-aet", "MODALITY", "-aec", "STORESCP", HOST, str(port), *files)
    victims = {"one": (one, tmp_path / "one"), "two": (two, tmp_path / "two")}
    wait_until(lambda: any(any(d.iterdir()) for _, d in victims.values()), timeout=10, interval=0.005)
    name = next(n for n, (_, d) in victims.items() if any(d.iterdir()))
    victim, directory = victims[name]
    survivor = "two" if name == "one" else "one"
    victim.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    storescu.wait(5)
    assert time.monotonic() - killed < 2.0
    assert storescu.returncode != 0  # never a false success
    assert len(list(directory.iterdir())) < len(files)

    lb.wait_for_log(f"server archive/{name} op_state UP -> DOWN", timeout=3)
    (line,) = log_lines(lb, "calling=MODALITY")
    # Killed between PDUs: the client got an A-ABORT; killed while it was sending a response PDU
    # (DCMTK writes the PDU and PDV headers separately), a reset, since medlb never forges the rest.
    assert f"server={name}" in line and re.fullmatch(r"server_(close|reset)_(aborted|cut)", log_field(line, "term")), (
        line
    )
    for _ in range(4):
        echo = run_tool("echoscu", "-aet", "AFTER", "-aec", "STORESCP", HOST, str(port))
        assert echo.returncode == 0, echo.stdout + echo.stderr
    # medlb logs an association after echoscu has its release answer: the last line may lag.
    wait_until(lambda: len(log_lines(lb, "calling=AFTER")) >= 4, timeout=5)
    after = log_lines(lb, "calling=AFTER")
    assert len(after) == 4 and all(f"server={survivor}" in line for line in after), after


# --------------------------------------------------------------------------- 7. malformed input


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def bad_http(port: int) -> tuple[bytes, float]:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: pacs\r\n\r\n")
        return read_until_close(sock, 3)


def bad_huge_length(port: int) -> tuple[bytes, float]:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(bytes.fromhex("0100FFFFFFF0") + b"\0" * 64)
        return read_until_close(sock, 3)


def bad_truncated_rq(port: int) -> tuple[bytes, float]:
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(associate_rq()[:50])
        return read_until_close(sock, 3)


def bad_p_data_first(port: int) -> tuple[bytes, float]:
    pdv = struct.pack(">IBB", 4, 1, 0x03) + b"\0\0"
    with socket.create_connection((HOST, port), timeout=5) as sock:
        sock.sendall(struct.pack(">BBI", 4, 0, len(pdv)) + pdv)
        return read_until_close(sock, 3)


def bad_tls_hello(port: int) -> tuple[bytes, float]:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    start = time.monotonic()
    with socket.create_connection((HOST, port), timeout=3) as sock, pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(sock, server_hostname="pacs")
    return b"", time.monotonic() - start


BAD_INPUTS = {
    "http": bad_http,
    "huge_length": bad_huge_length,
    "truncated_rq": bad_truncated_rq,
    "p_data_first": bad_p_data_first,
    "tls_hello": bad_tls_hello,
}


def test_malformed_input_is_cut_quickly_and_harms_nobody(lab: Lab) -> None:
    scp = lab.store_scp("ARCHIVE")
    port = free_port()
    lb = lab.medlb(dicom_config(port, [{"name": "a1", "address": f"{HOST}:{scp.port}", "ae_title": "ARCHIVE"}]))
    wait_up(lb, "archive/a1")
    healthy = scu("HEALTHY").associate(HOST, port, ae_title="ARCHIVE")
    assert healthy.is_established
    try:
        assert healthy.send_c_echo().Status == 0

        # Each kind once, checked precisely; they run concurrently so the ARTIM wait is paid once.
        results: dict[str, tuple[bytes, float]] = {}

        def attempt(kind: str) -> None:
            results[kind] = BAD_INPUTS[kind](port)

        threads = [threading.Thread(target=attempt, args=(kind,)) for kind in BAD_INPUTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert sorted(results) == sorted(BAD_INPUTS)
        for kind, (data, took) in results.items():
            assert data in (b"", PROVIDER_ABORT), (kind, data)
            assert took < 2.0, (kind, took)
        assert results["http"][0] == PROVIDER_ABORT
        assert results["p_data_first"][0] == PROVIDER_ABORT
        assert results["huge_length"][0] == PROVIDER_ABORT
        assert results["truncated_rq"][1] > 0.8, results["truncated_rq"]  # the ARTIM timer, not earlier
        for term in ("bad_pdu", "artim_timeout"):
            lb.wait_for_log(f"frontend=pacs {term}:", timeout=3)

        start = time.monotonic()
        s_client = subprocess.run(
            ["openssl", "s_client", "-connect", f"{HOST}:{port}"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=10,
            check=False,
        )
        assert s_client.returncode != 0 and time.monotonic() - start < 2.0, s_client.stderr

        # ~50 more, 10 of each kind at once, while the healthy association keeps working.
        before = vm_rss_kib(lb.proc.pid)
        batch = [threading.Thread(target=BAD_INPUTS[kind], args=(port,)) for kind in BAD_INPUTS for _ in range(10)]
        for thread in batch:
            thread.start()
        for _ in range(5):
            assert healthy.send_c_echo().Status == 0
            time.sleep(0.1)
        for thread in batch:
            thread.join(10)
        assert not any(thread.is_alive() for thread in batch)
        assert healthy.send_c_echo().Status == 0
        after = vm_rss_kib(lb.proc.pid)
        assert after - before < 4096, (before, after)  # KiB: flat, give or take allocator noise
        # + openssl s_client. A line can be written just after the client saw the close: wait for the counts.
        wait_until(lambda: lb.log.count("artim_timeout:") >= 11 and lb.log.count("bad_pdu:") >= 45, timeout=3)
        assert lb.log.count("artim_timeout:") == 11 and lb.log.count("bad_pdu:") == 45, lb.log
        assert scp.opened >= 1 and scp.echoes.count("HEALTHY") == 7
    finally:
        healthy.release()
    lb.wait_for_log("calling=HEALTHY")
    (line,) = log_lines(lb, "calling=HEALTHY")
    assert "commands=[C-ECHO-RQ=7] responses=[success=7] term=released" in line, line
    # No bad connection ever got as far as a server: the only associations are the checks and HEALTHY.
    assert len(log_lines(lb, "server=a1")) == 1


# --------------------------------------------------------------------------- 8. retry


def test_connect_refused_is_retried_on_the_next_server(lab: Lab) -> None:
    scp = lab.store_scp("ARCHIVE")
    port = free_port()
    servers = [
        {"name": "gone", "address": f"{HOST}:{free_port()}"},  # nothing listens there
        {"name": "good", "address": f"{HOST}:{scp.port}"},
    ]
    lb = lab.medlb(dicom_config(port, servers, check={"type": "none"}))
    wait_up(lb, "archive/gone", "archive/good")
    for _ in range(4):
        echo = run_tool("echoscu", "-aet", "RETRY", "-aec", "ARCHIVE", HOST, str(port))
        assert echo.returncode == 0, echo.stdout + echo.stderr
    assert scp.echoes.count("RETRY") == 4
    wait_until(lambda: len(log_lines(lb, "calling=RETRY")) == 4)
    lines = log_lines(lb, "calling=RETRY")
    assert all("server=good" in line and "term=released" in line for line in lines), lines
    assert any("attempts=2" in line for line in lines), lines
    assert "connect to archive/gone failed" in lb.log


# --------------------------------------------------------------------------- idle timeout


def test_idle_timeout_counts_from_the_last_byte(lab: Lab) -> None:
    scp = lab.store_scp("ARCHIVE")
    port, forever_port = free_port(), free_port()
    config = dicom_config(port, [{"name": "a1", "address": f"{HOST}:{scp.port}", "ae_title": "ARCHIVE"}])
    config["frontends"][0]["timeouts"] = {"client": "2s"}  # idle tick every 500ms
    config["frontends"].append(
        {**config["frontends"][0], "name": "forever", "bind": [f"{HOST}:{forever_port}"], "timeouts": {"client": 0}}
    )
    lb = lab.medlb(config)
    wait_up(lb, "archive/a1")
    quiet = scu("QUIET").associate(HOST, port, ae_title="ARCHIVE")
    forever = scu("FOREVER").associate(HOST, forever_port, ae_title="ARCHIVE")
    try:
        assert quiet.is_established and forever.is_established
        assert quiet.send_c_echo().Status == 0
        time.sleep(1.3)  # quiet for well under the 2 s idle timeout, but for more than a tick or two
        assert quiet.is_established, "aborted as idle before the idle timeout"
        assert quiet.send_c_echo().Status == 0
        start = time.monotonic()
        wait_until(lambda: quiet.is_aborted, timeout=4)
        assert 1.9 < time.monotonic() - start < 4.0  # 2 s idle + a 0.5 s tick + a busy machine's slack
        # "timeouts.client: 0": no idle timeout at all.
        assert forever.is_established and forever.send_c_echo().Status == 0
    finally:
        for assoc in (quiet, forever):
            if assoc.is_established:
                assoc.release()
    lb.wait_for_log("calling=QUIET")
    (line,) = log_lines(lb, "calling=QUIET")
    assert "commands=[C-ECHO-RQ=2] responses=[success=2] term=idle_timeout" in line, line
    lb.wait_for_log("calling=FOREVER")
    assert "term=released" in log_lines(lb, "calling=FOREVER")[0]


# --------------------------------------------------------------------------- a server that never answers


def test_a_server_that_never_answers_the_request_is_skipped_in_time(lab: Lab) -> None:
    """A hung archive (TCP accepted, no A-ASSOCIATE-AC/RJ) costs ``answer_timeout``, not the client's ACSE timeout."""
    scp = lab.store_scp("ARCHIVE")
    # A listener whose backlog accepts the TCP handshake and that never reads or says a word.
    silent = socket.socket()
    silent.bind((HOST, 0))
    silent.listen(16)
    lab.stack.callback(silent.close)
    port = free_port()
    servers = [
        {"name": "hung", "address": f"{HOST}:{silent.getsockname()[1]}"},
        {"name": "good", "address": f"{HOST}:{scp.port}"},
    ]
    lb = lab.medlb(dicom_config(port, servers, check={"type": "none"}, dicom={"answer_timeout": "1s"}))
    wait_up(lb, "archive/hung", "archive/good")
    for n in range(2):  # round robin: one of the two starts on the hung server
        started = time.monotonic()
        echo = run_tool("echoscu", "-aet", f"HUNG{n}", "-aec", "ARCHIVE", HOST, str(port))
        assert echo.returncode == 0, echo.stdout + echo.stderr
        assert time.monotonic() - started < 4, "the hung server held the client"
    lb.wait_for_log("server archive/hung did not answer the association in 1.0s")
    wait_until(lambda: len(log_lines(lb, "calling=HUNG")) == 2)
    assert all("server=good" in line for line in log_lines(lb, "calling=HUNG"))


# --------------------------------------------------------------------------- what the operator sees


def test_dimse_counts_reach_the_status_api_and_the_metrics(lab: Lab, tmp_path: Path) -> None:
    from tests.helpers import api, with_admin

    scp = lab.store_scp("ARCHIVE")
    port = free_port()
    config = dicom_config(port, [{"name": "a1", "address": f"{HOST}:{scp.port}", "ae_title": "ARCHIVE"}])
    url = with_admin(config, tmp_path)
    lb = lab.medlb(config)
    wait_up(lb, "archive/a1")
    source = get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    store = run_tool("storescu", "-aet", "COUNTED", "-aec", "ARCHIVE", HOST, str(port), source, source)
    assert store.returncode == 0, store.stdout + store.stderr
    echo_once(port, "COUNTED")
    lb.wait_for_log("calling=COUNTED called=ARCHIVE server_ae=ARCHIVE established_ms")
    code, status = api(f"{url}/api/v1/backends/archive/servers/a1")
    assert code == 200, status
    dimse = status["dimse"]
    assert dimse["requests"] == {"C-STORE-RQ": 2, "C-ECHO-RQ": 1}, dimse
    assert dimse["responses"] == {"success": 3}, dimse
    code, text = api(f"{url}/metrics")
    assert code == 200
    assert 'medlb_server_dimse_requests_total{backend="archive",command="C-STORE-RQ",server="a1"} 2.0' in text
    assert 'medlb_server_dimse_responses_total{backend="archive",server="a1",status="success"} 3.0' in text


# --------------------------------------------------------------------------- reload


def test_a_reload_applies_new_access_lists_to_new_associations(lab: Lab) -> None:
    import yaml

    trap = lab.trap()
    port = free_port()
    config = dicom_config(port, [{"name": "t", "address": f"{HOST}:{trap.port}"}], check={"type": "none"})
    config["frontends"][0]["dicom"] = {"allow_called": ["OLDNAME"]}
    lb = lab.medlb(config)
    wait_up(lb, "archive/t")

    def reject_reason(called: str) -> int:
        with socket.create_connection((HOST, port), timeout=5) as sock:
            sock.sendall(associate_rq(called=called))
            answer = recv_exact(sock, 10)
        assert answer[0] == 0x03, answer.hex()  # A-ASSOCIATE-RJ
        return answer[9]

    assert reject_reason("NEWNAME") == 7
    config["frontends"][0]["dicom"] = {"allow_called": ["NEWNAME"], "allow_calling": ["OTHERSCU"]}
    lb.config_path.write_text(yaml.safe_dump(config))
    lb.signal(signal.SIGHUP)
    lb.wait_for_log("configuration reloaded by SIGHUP")
    assert reject_reason("NEWNAME") == 3  # the called title passes now; RAWSCU is not an allowed caller
    assert trap.accepted == 0


# --------------------------------------------------------------------------- release


class ReleasingSCP(ThreadedServer):
    """Accepts the association, answers the A-RELEASE-RQ with an RP, then waits for the requestor
    to close (PS3.8 AR-3): ``closed_after_release`` is set when the connection ends."""

    def __init__(self) -> None:
        self.closed_after_release = threading.Event()
        super().__init__()

    def respond(self, sock: socket.socket) -> None:
        try:
            rq = read_pdu(sock)
        except (ConnectionError, OSError):
            return  # a TCP health check
        sock.sendall(associate_ac_for(rq))
        release = read_pdu(sock)
        assert release[0] == 0x05, release.hex()
        sock.sendall(bytes.fromhex("06000000000400000000"))
        sock.settimeout(10)
        if sock.recv(1) == b"":
            self.closed_after_release.set()


def test_the_server_connection_closes_as_soon_as_the_release_is_answered(lab: Lab) -> None:
    scp = ReleasingSCP()
    lab.stack.callback(scp.stop)
    port = free_port()
    lb = lab.medlb(dicom_config(port, [{"name": "r", "address": f"{HOST}:{scp.port}"}], check={"type": "none"}))
    wait_up(lb, "archive/r")
    with socket.create_connection((HOST, port), timeout=5) as client:
        client.sendall(associate_rq())
        assert read_pdu(client)[0] == 0x02
        client.sendall(bytes.fromhex("05000000000400000000"))
        assert read_pdu(client)[0] == 0x06
        # The client has not closed yet: medlb, the release requestor on the server's leg, has.
        assert scp.closed_after_release.wait(3), "the archive was kept waiting for the client's close"
    lb.wait_for_log("calling=RAWSCU")
    assert "term=released" in log_lines(lb, "calling=RAWSCU")[0]
