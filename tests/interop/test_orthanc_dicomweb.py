"""Orthanc's DICOMweb plugin behind medlb ``mode: http``: QIDO-RS and WADO-RS through the
balancer return the same as direct, and a server killed under load costs no request.

Two real Orthanc nodes (tests/interop/orthanc.py), each loaded with the same six synthetic
instances, sit behind a real ``medlb run`` balancing round robin with HTTP checks on
``/system``. Orthanc builds absolute URLs (RetrieveURL 0008,1190 in QIDO answers,
BulkDataURI in metadata) from the request's ``Host`` header: answers are compared after
replacing the base URL the client used (``http://<Host>``) with a placeholder, and the
URLs seen through medlb must name medlb, never a node. See docs/interop.md.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Medlb, free_port, running_medlb, wait_until
from tests.interop.orthanc import STUDY_LAYOUT, OrthancNode, dicom_uid, make_instances, orthanc_cluster

pytestmark = [pytest.mark.interop, pytest.mark.timeout(60)]

DICOM_ACCEPT = 'multipart/related; type="application/dicom"'
BASE = "{BASE}"


# --- the lab ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Uids:
    study: str
    series: str
    instance: str
    patient: str


def all_uids() -> list[Uids]:
    """The (study, series, instance, PatientID) of every instance ``make_instances`` builds, in order."""
    out = []
    for patient_id, _, study_key, series_list in STUDY_LAYOUT:
        for series_number, (_, count, _, _) in enumerate(series_list, start=1):
            for instance_number in range(1, count + 1):
                out.append(
                    Uids(
                        dicom_uid("study", study_key),
                        dicom_uid("series", study_key, series_number),
                        dicom_uid("instance", study_key, series_number, instance_number),
                        patient_id,
                    )
                )
    return out


def load(nodes: list[OrthancNode]) -> list[bytes]:
    instances = make_instances()
    for node in nodes:
        for dicom in instances:
            node.upload(dicom)
    return instances


def medlb_config(port: int, nodes: list[OrthancNode]) -> dict[str, Any]:
    return {
        "global": {"hard_stop_after": "5s"},
        "defaults": {
            "timeouts": {"connect": "1s", "client": "30s", "server": "10s", "queue": "5s", "check": "500ms"},
            "check": {"inter": "200ms", "fastinter": "100ms", "downinter": "300ms", "rise": 1, "fall": 2},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [{"name": "web", "mode": "http", "bind": [f"127.0.0.1:{port}"], "default_backend": "pacs"}],
        "backends": [
            {
                "name": "pacs",
                "balance": "roundrobin",
                "check": {"type": "http", "path": "/system", "expect_status": [200]},
                "servers": [{"name": n.name, "address": n.address} for n in nodes],
            }
        ],
    }


@dataclass
class Lab:
    nodes: list[OrthancNode]
    lb: Medlb
    port: int
    instances: list[bytes] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)

    def servers_used(self, since: int) -> dict[str, int]:
        """Requests per server in medlb's access log after byte offset ``since``."""
        counts: dict[str, int] = {}
        for server in re.findall(r"medlb\.http: http .* server=(\S+) ", self.lb.log[since:]):
            counts[server] = counts.get(server, 0) + 1
        return counts


@contextlib.contextmanager
def lab_for(tmp: Path) -> Iterator[Lab]:
    with orthanc_cluster(tmp, 2) as nodes:
        instances = load(nodes)
        port = free_port()
        with running_medlb(medlb_config(port, nodes), tmp) as lb:
            for node in nodes:
                lb.wait_for_log(f"pacs/{node.name} op_state DOWN -> UP")
            yield Lab(nodes, lb, port, instances)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with lab_for(tmp_path_factory.mktemp("dicomweb")) as lab:
        yield lab


# --- reading answers ----------------------------------------------------------------------------


def fetch(conn: http.client.HTTPConnection, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    conn.request("GET", path, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.getheader("Content-Type", ""), response.read()


def direct(node: OrthancNode, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, bytes]:
    status, response_headers, body = node.get(path, headers)
    return status, response_headers.get("content-type", ""), body


def normalised(body: bytes, host: str) -> Any:
    """The JSON answer with every absolute URL Orthanc built from ``Host: host`` made relative to ``{BASE}``.

    Fails when a URL still names some other host: an answer read through medlb must not point
    the client at a node behind the balancer.
    """
    text = body.decode("utf-8").replace(f"http://{host}/", f"{BASE}/")
    stray = sorted(set(re.findall(r"https?://[^/\"]*", text)))
    assert not stray, f"URLs not built from Host {host!r}: {stray}"
    return json.loads(text)


def dicom_parts(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The parts of a ``multipart/related`` body: (part Content-Type, part bytes)."""
    assert content_type.startswith("multipart/related"), content_type
    assert re.search(r'type="?application/dicom"?', content_type), content_type
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    assert found, content_type
    delimiter = b"--" + found.group(1).encode()
    chunks = body.split(delimiter)
    assert chunks[0] in (b"", b"\r\n"), chunks[0][:100]
    assert chunks[-1].startswith(b"--"), f"no closing delimiter: {chunks[-1][:100]!r}"
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n"), chunk[:100]
        head, _, data = chunk[2:-2].partition(b"\r\n\r\n")
        fields = dict(
            (k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in head.decode().split("\r\n"))
        )
        if "content-length" in fields:
            assert int(fields["content-length"]) == len(data), (fields, len(data))
        parts.append((fields.get("content-type", ""), data))
    return parts


# --- 1. QIDO-RS ---------------------------------------------------------------------------------


def qido_queries() -> list[tuple[str, int]]:
    """(path, expected number of results)."""
    a1, a2, b1 = all_uids()[0], all_uids()[3], all_uids()[5]
    return [
        ("/dicom-web/studies", 2),
        ("/dicom-web/studies?PatientID=MEDLB-A", 1),
        ("/dicom-web/studies?PatientID=MEDLB-*&includefield=00081030", 2),
        (f"/dicom-web/studies/{a1.study}/series?PatientID=MEDLB-A", 2),
        (f"/dicom-web/studies/{a1.study}/series?PatientID=MEDLB-A&Modality=MR", 1),
        (f"/dicom-web/studies/{a1.study}/series?PatientID=MEDLB-B", 0),
        (f"/dicom-web/studies/{a1.study}/series/{a1.series}/instances?PatientID=MEDLB-A", 3),
        (f"/dicom-web/studies/{a2.study}/series/{a2.series}/instances?PatientID=MEDLB-A&limit=1&offset=1", 1),
        (f"/dicom-web/studies/{b1.study}/series/{b1.series}/instances?PatientID=MEDLB-B", 1),
        ("/dicom-web/series?PatientID=MEDLB-A", 2),
        ("/dicom-web/instances?PatientID=MEDLB-B", 1),
    ]


@pytest.mark.parametrize(("path", "count"), qido_queries(), ids=lambda v: str(v)[:70])
def test_qido_rs_through_medlb_equals_direct(lab: Lab, path: str, count: int) -> None:
    expected = []
    for node in lab.nodes:
        status, ctype, body = direct(node, path)
        assert status == 200, (node.name, path, status, body[:300])
        expected.append((ctype, normalised(body, node.address)))
    assert expected[0] == expected[1], f"the two nodes disagree on {path}: the lab is broken"
    assert len(expected[0][1]) == count, (path, expected[0][1])

    since = len(lab.lb.log)
    conn = lab.conn()
    try:
        for _ in range(4):  # round robin on one keep-alive connection: each node answers twice
            status, ctype, body = fetch(conn, path)
            assert status == 200, (path, status, body[:300], lab.lb.log[since:])
            assert ctype.startswith("application/dicom+json"), ctype
            assert (ctype, normalised(body, lab.address)) == expected[0], path
    finally:
        conn.close()
    wait_until(lambda: sum(lab.servers_used(since).values()) >= 4, timeout=5)
    assert lab.servers_used(since) == {"o1": 2, "o2": 2}, lab.lb.log[since:]


def test_qido_urls_name_the_host_the_client_used(lab: Lab) -> None:
    """Orthanc's DICOMweb 1.7 builds RetrieveURL from ``Host``; medlb passes it unchanged.

    (It ignores the X-Forwarded-Host/Proto medlb adds; see docs/interop.md for TLS.)
    """
    conn = lab.conn()
    try:
        for host in ("pacs.example.org", "pacs.example.org:8443", lab.address):
            status, _, body = fetch(conn, "/dicom-web/studies?PatientID=MEDLB-A", {"Host": host})
            assert status == 200, body[:300]
            (study,) = json.loads(body)
            assert study["00081190"]["Value"] == [f"http://{host}/dicom-web/studies/{all_uids()[0].study}"]
    finally:
        conn.close()


# --- 2. WADO-RS ---------------------------------------------------------------------------------


def instance_path(u: Uids) -> str:
    return f"/dicom-web/studies/{u.study}/series/{u.series}/instances/{u.instance}"


@pytest.mark.parametrize("index", range(len(all_uids())))
def test_wado_rs_instance_and_metadata_through_medlb_equal_direct(lab: Lab, index: int) -> None:
    u = all_uids()[index]
    original = lab.instances[index]
    since = len(lab.lb.log)
    conn = lab.conn()
    try:
        for node in lab.nodes:
            status, ctype, body = direct(node, instance_path(u), {"Accept": DICOM_ACCEPT})
            assert status == 200, (node.name, status, body[:300])
            direct_parts = dicom_parts(ctype, body)
            assert direct_parts == [("application/dicom", original)], "Orthanc changed the stored instance"

            status, ctype, body = fetch(conn, instance_path(u), {"Accept": DICOM_ACCEPT})
            assert status == 200, (status, body[:300], lab.lb.log[since:])
            assert dicom_parts(ctype, body) == direct_parts  # byte-identical DICOM, whatever the boundary

            status, _, body = direct(node, instance_path(u) + "/metadata")
            assert status == 200, body[:300]
            direct_metadata = normalised(body, node.address)
            assert direct_metadata[0]["00080018"]["Value"] == [u.instance]
            assert direct_metadata[0]["7FE00010"]["BulkDataURI"].startswith(f"{BASE}/dicom-web/studies/")
            status, ctype, body = fetch(conn, instance_path(u) + "/metadata")
            assert status == 200, (status, body[:300], lab.lb.log[since:])
            assert ctype.startswith("application/dicom+json"), ctype
            assert normalised(body, lab.address) == direct_metadata
    finally:
        conn.close()
    wait_until(lambda: sum(lab.servers_used(since).values()) >= 4, timeout=5)
    assert lab.servers_used(since) == {"o1": 2, "o2": 2}, lab.lb.log[since:]


def test_wado_rs_series_with_several_instances(lab: Lab) -> None:
    """A series retrieve: one multipart answer with three DICOM parts, as direct."""
    u = all_uids()[0]
    path = f"/dicom-web/studies/{u.study}/series/{u.series}"
    status, ctype, body = direct(lab.nodes[0], path, {"Accept": DICOM_ACCEPT})
    assert status == 200, body[:300]
    expected = sorted(dicom_parts(ctype, body))
    assert expected == sorted(("application/dicom", d) for d in lab.instances[:3])
    conn = lab.conn()
    try:
        for _ in range(2):
            status, ctype, body = fetch(conn, path, {"Accept": DICOM_ACCEPT})
            assert status == 200, body[:300]
            assert sorted(dicom_parts(ctype, body)) == expected
    finally:
        conn.close()


# --- 3. a node killed under load ---------------------------------------------------------------


@dataclass
class Load:
    """Client threads, each on its own keep-alive connection to medlb, cycling through checked GETs."""

    lab: Lab
    checks: list[tuple[str, dict[str, str], Any]]
    threads: int = 1
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: int = 0
    failures: list[str] = field(default_factory=list)

    def run(self, worker: int) -> None:
        conn = self.lab.conn()
        i = worker
        while not self.stop.is_set():
            path, headers, check = self.checks[i % len(self.checks)]
            i += 1
            started = time.monotonic()
            try:
                status, ctype, body = fetch(conn, path, headers)
                problem = None if status == 200 else f"status {status}: {body[:200]!r}"
                if problem is None:
                    problem = check(ctype, body)
            except Exception as exc:
                problem = f"{type(exc).__name__}: {exc}"
                conn.close()
                conn = self.lab.conn()
            with self.lock:
                self.done += 1
                if problem is not None:
                    self.failures.append(f"t={started:.3f} worker {worker} GET {path}: {problem}")
        conn.close()

    def __enter__(self) -> Load:
        self.pool = [threading.Thread(target=self.run, args=(w,), daemon=True) for w in range(self.threads)]
        for thread in self.pool:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.pool:
            thread.join(15)


def test_a_node_killed_under_load_costs_no_idempotent_request(tmp_path: Path) -> None:
    with lab_for(tmp_path) as lab:
        victim = lab.nodes[1]
        u = all_uids()[1]
        qido_path = "/dicom-web/studies?PatientID=MEDLB-A"
        qido = normalised(direct(lab.nodes[0], qido_path)[2], lab.nodes[0].address)
        meta_path = instance_path(u) + "/metadata"
        meta = normalised(direct(lab.nodes[0], meta_path)[2], lab.nodes[0].address)
        instance = [("application/dicom", lab.instances[1])]

        def json_equals(expected: Any) -> Any:
            def check(ctype: str, body: bytes) -> str | None:
                try:
                    return None if normalised(body, lab.address) == expected else "JSON differs"
                except (AssertionError, ValueError) as exc:
                    return f"bad JSON answer: {exc}"

            return check

        def dicom_equals(ctype: str, body: bytes) -> str | None:
            try:
                return None if dicom_parts(ctype, body) == instance else "DICOM part differs"
            except (AssertionError, ValueError) as exc:
                return f"bad multipart answer: {exc}"

        checks = [
            (qido_path, {}, json_equals(qido)),
            (instance_path(u), {"Accept": DICOM_ACCEPT}, dicom_equals),
            (meta_path, {}, json_equals(meta)),
        ]
        since = len(lab.lb.log)
        with Load(lab, checks) as load:
            wait_until(lambda: load.done >= 60 or bool(load.failures), timeout=15)
            assert not load.failures, load.failures
            before = lab.servers_used(since)
            assert before.get("o1", 0) > 10 and before.get("o2", 0) > 10, before

            victim.kill()  # SIGKILL: open connections die without a goodbye
            killed_at = load.done
            lab.lb.wait_for_log(f"pacs/{victim.name} op_state UP -> DOWN", timeout=10)
            down_at = load.done
            wait_until(lambda: load.done >= down_at + 60, timeout=15)

        unusual = [line for line in lab.lb.log[since:].splitlines() if "term=done" not in line]
        assert not load.failures, "\n".join(
            [*load.failures[:20], "--- medlb log, all but term=done ---", *unusual]
        )  # term=server_close_mid_response: Orthanc died between its head and its body, see docs/interop.md
        assert load.done >= down_at + 60 > killed_at
        down_line = next(line for line in lab.lb.log.splitlines() if f"pacs/{victim.name} op_state UP -> DOWN" in line)
        assert "medlb.state" in down_line, down_line
        after = lab.lb.log[lab.lb.log.index(down_line) :]
        served_after = re.findall(r"medlb\.http: http .* server=(\S+) .* status=(\d+)", after)
        assert served_after and {s for s, _ in served_after} == {"o1"}, served_after[:10]
        assert {code for _, code in served_after} == {"200"}
        # Keep-alive held through the failover: medlb closed no client connection.
        clients = set(re.findall(r"medlb\.http: http client=(\S+) ", lab.lb.log[since:]))
        assert len(clients) == load.threads, clients
