"""``medlb check`` and ``medlb run`` as an operator meets them: exit codes and messages."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import yaml

from medlb.cli import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME
from tests.helpers import Backend, free_port, greet, running_medlb, tcp_config
from tests.test_config import CONTRACT


def medlb(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medlb", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_check_accepts_the_contract_example(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(CONTRACT)
    result = medlb("check", "-c", str(path))
    assert result.returncode == EXIT_OK, result.stderr
    assert result.stdout.startswith("configuration valid: 1 frontend(s) [raw (tcp 127.0.0.1:7000)]")
    assert "3 server(s)" in result.stdout
    assert "processes" not in result.stdout
    raw = yaml.safe_load(CONTRACT)
    raw.setdefault("global", {})["workers"] = 4
    path.write_text(yaml.safe_dump(raw))
    result = medlb("check", "-c", str(path))
    assert result.returncode == EXIT_OK and "4 processes for http/tcp frontends" in result.stdout
    raw["global"]["workers"] = 0
    path.write_text(yaml.safe_dump(raw))
    result = medlb("check", "-c", str(path))
    assert result.returncode == EXIT_CONFIG and "global.workers" in result.stderr


def test_check_lists_every_error_with_its_location(tmp_path: Path) -> None:
    raw = yaml.safe_load(CONTRACT)
    raw["backends"][0]["servers"][1]["address"] = "pacs2"
    raw["backends"][0]["servers"][2]["wieght"] = 3
    raw["frontends"][0]["default_backend"] = "archive"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = medlb("check", "-c", str(path))
    assert result.returncode == EXIT_CONFIG
    assert "3 configuration error(s)" in result.stderr
    assert "backends[0].servers[1].address: expected host:port" in result.stderr
    assert "backends[0].servers[2].wieght: unknown key" in result.stderr
    assert "frontends[0].default_backend: backend 'archive' does not exist" in result.stderr
    assert result.stdout == ""


def test_run_refuses_an_invalid_config_and_starts_nothing(tmp_path: Path) -> None:
    port = free_port()
    config = tcp_config(port, [{"name": "s1", "address": "127.0.0.1:1", "weight": "heavy"}])
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = medlb("run", "-c", str(path))
    assert result.returncode == EXIT_CONFIG
    assert "backends[0].servers[0].weight" in result.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_run_reports_a_port_in_use_clearly(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(tcp_config(port, [{"name": "s1", "address": "127.0.0.1:1"}])))
        result = medlb("run", "-c", str(path))
    assert result.returncode == EXIT_RUNTIME
    assert f"cannot bind 127.0.0.1:{port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_unresolvable_server_is_down_and_the_rest_serve(tmp_path: Path) -> None:
    backend = Backend("alive")
    port = free_port()
    config = tcp_config(
        port,
        [
            {"name": "ghost", "address": "no-such-host.invalid:104"},
            {"name": "alive", "address": f"127.0.0.1:{backend.port}"},
        ],
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("pool/alive op_state DOWN -> UP")
            assert {greet(port) for _ in range(4)} == {"alive"}
            assert lb.proc.poll() is None
            assert "pool/ghost op_state" not in lb.log
    finally:
        backend.stop()


def test_version() -> None:
    result = medlb("--version")
    assert result.returncode == 0 and result.stdout.startswith("medlb ")


def test_demo_serves_through_medlb_and_stops_on_sigint() -> None:
    """The README's first command: the demo lab answers through medlb, with the
    weighted rotation it announces, and stops cleanly on Ctrl-C."""
    import os
    import signal
    import time

    from tests.helpers import greet

    port = _demo_port()
    known_token = "test-demo-token-0123456789abcdef"  # the demo keeps a token it is given
    proc = subprocess.Popen(
        [sys.executable, "-m", "medlb", "demo", "--port", str(port), "--admin-port", str(port + 104)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "MEDLB_DEMO_TOKEN": known_token},
    )
    try:
        deadline = time.monotonic() + 30
        seen: list[str] = []
        while time.monotonic() < deadline and len(seen) < 6:
            try:
                seen.append(greet(port, timeout=2))
            except OSError:
                time.sleep(0.1)
        if len(seen) < 6:
            proc.kill()
            raise AssertionError(f"demo did not serve: {seen}\n{proc.communicate()[0]}")
        assert seen.count("medlb demo: served by s2") == 4 and seen.count("medlb demo: served by s1") == 2
        # The DICOM part: C-ECHO through the mode: dicom frontend, called ARCHIVE, reaches both demo
        # archives (their own AE titles differ) once their C-ECHO checks have brought them UP.
        from tests.helpers import api, wait_until

        def archives_up() -> bool:
            code, doc = api(f"http://127.0.0.1:{port + 104}/api/v1/status", token=known_token)
            if code != 200:
                return False
            states = {s["name"]: s["op_state"] for b in doc["backends"] for s in b["servers"]}
            return states.get("pacs1") == states.get("pacs2") == "UP"

        wait_until(archives_up, timeout=20, interval=0.2)
        echoed = _dicom_echoes(port + 4, count=4, deadline=time.monotonic() + 20)
        assert echoed == [0, 0, 0, 0], echoed
        # The HL7 part: a message through the mode: hl7 frontend is acknowledged by a demo receiver.
        ack = _hl7_send(port + 5, b"MSH|^~\\&|T|H|R|H|20261122||ADT^A01|CLITEST1|P|2.5\rPID|1||9^^^H\r")
        assert b"MSA|AA|CLITEST1|stored by ris" in ack, ack
        # The dashboard/API is up too, behind the token the banner prints.
        code, _ = api(f"http://127.0.0.1:{port + 104}/api/v1/status", token=None)
        assert code == 401
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert "medlb demo is running." in out and "medlb stopped" in out
        token = out.split("  token: ", 1)[1].split()[0]
        assert token == known_token and f"http://127.0.0.1:{port + 104}/" in out
        # Round robin sent the C-ECHO associations to both archives, each called by its own AE title.
        for archive, title in (("pacs1", "DEMO_PACS1"), ("pacs2", "DEMO_PACS2")):
            assert f"server={archive} calling=MODALITY called=ARCHIVE server_ae={title}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _hl7_send(port: int, payload: bytes) -> bytes:
    """One MLLP message and its answer; retried while the demo receivers are not UP yet."""
    import time

    deadline = time.monotonic() + 20
    while True:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"\x0b" + payload + b"\x1c\r")
            answer = b""
            while not answer.endswith(b"\x1c\r"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
        if b"MSA|AA|" in answer or time.monotonic() > deadline:
            return answer
        time.sleep(0.3)


def _dicom_echoes(port: int, *, count: int, deadline: float) -> list[int]:
    """Statuses of ``count`` C-ECHOs (pynetdicom SCU), each on its own association; waits for the archives."""
    import time

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    statuses: list[int] = []
    while len(statuses) < count and time.monotonic() < deadline:
        assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
        if not assoc.is_established:
            time.sleep(0.3)  # the archives are not UP yet: medlb answers with a transient reject
            continue
        status = assoc.send_c_echo()
        statuses.append(int(status.Status))
        assoc.release()
    return statuses


def _demo_port() -> int:
    """A frontend port whose demo server ports (+101..+103) and admin port (+104) are free too. Taken below
    the ephemeral range, where client sockets of other tests cannot hold them."""
    import random

    for _ in range(200):
        port = random.randrange(20000, 30000)
        probes: list[socket.socket] = []
        try:
            for candidate in (port, port + 4, port + 5, *range(port + 101, port + 109)):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return port
    raise AssertionError("no free port block for the demo")
