"""medlb ``mode: dicom`` in front of a real Orthanc cluster: C-ECHO, C-STORE, C-FIND, C-MOVE and
C-GET with DCMTK and pynetdicom through the balancer, AE title rewriting proven against Orthanc's
own called-AE check, and a node killed under a stream of associations.

The lab, started once for the module: a private PostgreSQL (tests/interop/postgres.py) and five
Orthanc nodes sharing its index and one storage directory (tests/interop/orthanc.py), so an
instance stored through any node is seen by all of them:

- ``o1``, ``o2``, ``o3`` all answer to ``ARCHIVE`` (the reference recipe), behind the frontend
  ``pacs`` -> backend ``archive`` (roundrobin, no ``ae_title``: the called title passes as is);
- ``a1`` (``NODE_A``) and ``a2`` (``NODE_B``), behind the frontend ``mixed`` -> backend ``mixed``
  with ``ae_title`` per server: clients call ``ARCHIVE`` and medlb readdresses.

Every node checks the called AE title (``DicomCheckCalledAet``) and knows the same modalities:
the client ``WS01`` (allowed to query and retrieve) and the C-MOVE destination ``DESTSCP``, a
DCMTK ``storescp``. medlb checks every node with an in-process ``dicom-echo`` as ``MEDLB``.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Medlb, free_port, running_medlb, wait_until
from tests.interop.orthanc import OrthancNode, dicom_uid, make_dataset, make_study, orthanc_cluster
from tests.interop.postgres import private_postgres

pytestmark = [pytest.mark.interop, pytest.mark.timeout(120)]

PUBLIC_AET = "ARCHIVE"  # the pool's public title, and the DicomAet of o1..o3
MIXED_AETS = {"a1": "NODE_A", "a2": "NODE_B"}
CLIENT_AET = "WS01"  # the modality / workstation, known to every node
DEST_AET = "DESTSCP"  # the C-MOVE destination (storescp), known to every node
CHECK_AET = "MEDLB"  # medlb's dicom-echo checks (C-ECHO is always allowed)
DCMTK_TOOLS = ("echoscu", "storescu", "findscu", "movescu", "getscu", "storescp")
DCMTK_HINT = "`make test` installs it (scripts/install-deps.sh, Debian package dcmtk); by hand: apt-get install dcmtk"
STUDY_SIZE = 20


def dcmtk(tool: str) -> str:
    """The path of a DCMTK tool; fails the test (never skips) when DCMTK is not installed."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"DCMTK's {tool} is not installed: {DCMTK_HINT}")
    return path


def run_dcmtk(tool: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool with ``TCP_NODELAY=1`` (DCMTK leaves Nagle on otherwise)."""
    return subprocess.run(
        [dcmtk(tool), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, TCP_NODELAY="1"),
    )


def pynetdicom_ae(*contexts: Any, title: str = CLIENT_AET) -> Any:
    try:
        from pynetdicom import AE
    except ImportError:
        pytest.fail("pynetdicom is not installed: `make test` installs the dev dependencies (pip install -e '.[dev]')")
    ae = AE(ae_title=title)
    for context in contexts:
        ae.add_requested_context(context)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    return ae


# --- the lab ------------------------------------------------------------------------------------


@dataclass
class Lab:
    tmp: Path
    nodes: list[OrthancNode]  # o1..o3: DicomAet ARCHIVE
    mixed: list[OrthancNode]  # a1, a2: DicomAet NODE_A, NODE_B
    lb: Medlb
    port: int  # frontend pacs -> backend archive
    mixed_port: int  # frontend mixed -> backend mixed
    dest: subprocess.Popen[bytes]  # DESTSCP (DCMTK storescp), where every node sends C-MOVE sub-operations
    dest_dir: Path  # where it writes what it receives

    def sessions(self, since: int) -> list[dict[str, str]]:
        """medlb's ``dicom ...`` session lines after byte offset ``since``, as key=value dicts, in order."""
        out = []
        for line in self.lb.log[since:].splitlines():
            found = re.search(r" dicom (client=.* term=\S+)$", line)  # not the extra "rejected: ..." line
            if found:
                fields = dict(re.findall(r"(\w+)=(\[[^\]]*\]|\S+)", found.group(1)))
                fields["line"] = line
                out.append(fields)
        return out

    def wait_sessions(self, since: int, count: int, timeout: float = 10) -> list[dict[str, str]]:
        """The first ``count`` session lines after ``since`` (a line is written when the association ends)."""
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(self.sessions(since)) >= count, timeout=timeout)
        sessions = self.sessions(since)
        assert len(sessions) >= count, f"{len(sessions)} dicom session lines, expected {count}:\n{self.lb.log[since:]}"
        return sessions[:count]


def medlb_config(port: int, mixed_port: int, nodes: list[OrthancNode], mixed: list[OrthancNode]) -> dict[str, Any]:
    return {
        "global": {"hard_stop_after": "5s"},
        "defaults": {
            "timeouts": {"connect": "1s", "client": "60s", "server": "60s", "queue": "5s", "check": "1s"},
            "check": {"inter": "500ms", "fastinter": "200ms", "downinter": "500ms", "rise": 1, "fall": 2},
            "retries": 2,
            "redispatch": True,
        },
        "frontends": [
            {
                "name": "pacs",
                "mode": "dicom",
                "bind": [f"127.0.0.1:{port}"],
                "default_backend": "archive",
                "dicom": {"allow_called": [PUBLIC_AET]},
            },
            {
                "name": "mixed",
                "mode": "dicom",
                "bind": [f"127.0.0.1:{mixed_port}"],
                "default_backend": "mixed",
                "dicom": {"allow_called": [PUBLIC_AET]},
            },
        ],
        "backends": [
            {
                "name": "archive",
                "balance": "roundrobin",
                "check": {"type": "dicom-echo", "calling_ae": CHECK_AET, "called_ae": PUBLIC_AET},
                "servers": [{"name": n.name, "address": f"127.0.0.1:{n.dicom_port}"} for n in nodes],
            },
            {
                "name": "mixed",
                "balance": "roundrobin",
                "check": {"type": "dicom-echo", "calling_ae": CHECK_AET},
                "servers": [{"name": n.name, "address": f"127.0.0.1:{n.dicom_port}", "ae_title": n.aet} for n in mixed],
            },
        ],
    }


@contextlib.contextmanager
def storescp(tmp: Path) -> Iterator[tuple[subprocess.Popen[bytes], int, Path]]:
    """DCMTK storescp as DESTSCP on a free port (started before the nodes that name it): (process, port, dir)."""
    out_dir = tmp / "destscp"
    out_dir.mkdir()
    log = (tmp / "destscp.log").open("wb")
    proc: subprocess.Popen[bytes] | None = None
    try:
        for _ in range(3):  # a free port can be taken between free_port() and storescp's bind
            port = free_port()
            proc = subprocess.Popen(
                [dcmtk("storescp"), "-aet", DEST_AET, "-od", str(out_dir), str(port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, TCP_NODELAY="1"),
                start_new_session=True,
            )

            def listening(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                if proc.poll() is not None:
                    return True
                echo = run_dcmtk("echoscu", "-aet", CLIENT_AET, "-aec", DEST_AET, "127.0.0.1", str(port))
                return echo.returncode == 0

            wait_until(listening, timeout=10, interval=0.1)
            if proc.poll() is None:
                yield proc, port, out_dir
                return
        raise AssertionError(f"storescp does not start:\n{(tmp / 'destscp.log').read_text(errors='replace')}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    for tool in DCMTK_TOOLS:
        dcmtk(tool)
    tmp = tmp_path_factory.mktemp("dicom")
    names = ["o1", "o2", "o3", *MIXED_AETS]
    aets = [PUBLIC_AET] * 3 + list(MIXED_AETS.values())
    with storescp(tmp) as (dest, dest_port, dest_dir), private_postgres() as pg:
        modalities = {"ws": (CLIENT_AET, "127.0.0.1", free_port()), "dest": (DEST_AET, "127.0.0.1", dest_port)}
        with orthanc_cluster(tmp, postgres=pg, names=names, aet=aets, modalities=modalities) as all_nodes:
            nodes, mixed = all_nodes[:3], all_nodes[3:]
            port, mixed_port = free_port(), free_port()
            with running_medlb(medlb_config(port, mixed_port, nodes, mixed), tmp) as lb:
                for backend, members in (("archive", nodes), ("mixed", mixed)):
                    for node in members:
                        lb.wait_for_log(f"{backend}/{node.name} op_state DOWN -> UP")
                yield Lab(tmp, nodes, mixed, lb, port, mixed_port, dest, dest_dir)


@pytest.fixture(scope="module")
def stored(lab: Lab) -> tuple[str, list[bytes]]:
    """A 20-instance study put into the cluster over REST (not through medlb): (StudyInstanceUID, files)."""
    files = make_study("R1", STUDY_SIZE)
    for i, dicom in enumerate(files):
        lab.nodes[i % 3].upload(dicom)
    study_uid = dicom_uid("study", "R1")
    for node in lab.nodes:
        assert len(node.sop_instance_uids(study_uid)) == STUDY_SIZE, node.name
    return study_uid, files


def write_files(directory: Path, files: list[bytes]) -> Path:
    directory.mkdir(parents=True)
    for i, dicom in enumerate(files):
        (directory / f"{i:04d}.dcm").write_bytes(dicom)
    return directory


def read_dir(directory: Path) -> dict[str, bytes]:
    """SOPInstanceUID -> PixelData of every DICOM file in ``directory``."""
    import pydicom

    out = {}
    for path in sorted(directory.iterdir()):
        ds = pydicom.dcmread(path)
        out[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
    return out


def expected_pixels(files: list[bytes]) -> dict[str, bytes]:
    import io

    import pydicom

    out = {}
    for dicom in files:
        ds = pydicom.dcmread(io.BytesIO(dicom))
        out[str(ds.SOPInstanceUID)] = bytes(ds.PixelData)
    return out


# --- 1. C-ECHO ----------------------------------------------------------------------------------


def test_c_echo_with_echoscu_and_pynetdicom(lab: Lab) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    since = len(lab.lb.log)
    result = run_dcmtk("echoscu", "-aet", CLIENT_AET, "-aec", PUBLIC_AET, "127.0.0.1", str(lab.port))
    assert result.returncode == 0, (result.stdout, result.stderr, lab.lb.log[since:])

    ae = pynetdicom_ae(Verification)
    assoc = ae.associate("127.0.0.1", lab.port, ae_title=PUBLIC_AET)
    assert assoc.is_established, lab.lb.log[since:]
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    assert status.Status == 0x0000, status

    sessions = lab.wait_sessions(since, 2)
    for s in sessions:
        assert s["calling"] == CLIENT_AET and s["called"] == PUBLIC_AET and s["server_ae"] == PUBLIC_AET, s["line"]
        assert s["commands"] == "[C-ECHO-RQ=1]" and s["responses"] == "[success=1]", s["line"]
        assert s["term"] == "released", s["line"]
    assert sessions[0]["server"] != sessions[1]["server"], "roundrobin sent both associations to one node"


def test_a_title_outside_allow_called_is_refused_by_medlb(lab: Lab) -> None:
    since = len(lab.lb.log)
    result = run_dcmtk("echoscu", "-aet", CLIENT_AET, "-aec", "ELSEWHERE", "127.0.0.1", str(lab.port))
    assert result.returncode != 0
    assert "Called AE Title Not Recognized" in result.stderr, result.stderr
    (session,) = lab.wait_sessions(since, 1)
    assert session["term"].startswith("rejected") and session["server"] == "-", session["line"]


# --- 2. C-STORE ---------------------------------------------------------------------------------


def test_c_store_of_a_study_through_medlb_lands_in_the_cluster_as_direct(lab: Lab) -> None:
    via_lb, direct = make_study("S1", STUDY_SIZE), make_study("S2", STUDY_SIZE)
    before = lab.nodes[0].get_json("/statistics")["CountInstances"]
    since = len(lab.lb.log)
    for files, port, key in ((via_lb, lab.port, "S1"), (direct, lab.nodes[0].dicom_port, "S2")):
        folder = write_files(lab.tmp / f"store-{key}", files)
        result = run_dcmtk(
            "storescu", "-aet", CLIENT_AET, "-aec", PUBLIC_AET, "+sd", "127.0.0.1", str(port), str(folder)
        )
        assert result.returncode == 0, (key, result.stdout, result.stderr, lab.lb.log[since:])

    (session,) = lab.wait_sessions(since, 1)
    assert session["commands"] == f"[C-STORE-RQ={STUDY_SIZE}]", session["line"]
    assert session["responses"] == f"[success={STUDY_SIZE}]", session["line"]
    assert session["term"] == "released", session["line"]
    for files, key in ((via_lb, "S1"), (direct, "S2")):
        expected = set(expected_pixels(files))
        for node in [*lab.nodes, *lab.mixed]:  # one index: every node sees every instance
            assert node.sop_instance_uids(dicom_uid("study", key)) == expected, (node.name, key)
    for node in lab.nodes:
        assert node.get_json("/statistics")["CountInstances"] == before + 2 * STUDY_SIZE, node.name


# --- 3. C-FIND ----------------------------------------------------------------------------------


def find_studies(lab: Lab, port: int, tag: str) -> set[tuple[str, str, str]]:
    """findscu, study root, STUDY level, PatientID MEDLB-*: {(StudyInstanceUID, PatientID, #instances)}."""
    import pydicom

    out_dir = lab.tmp / f"find-{tag}"
    out_dir.mkdir()
    result = run_dcmtk(
        "findscu", "-S", "-aet", CLIENT_AET, "-aec", PUBLIC_AET, "-X", "-od", str(out_dir),
        "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientID=MEDLB-*", "-k", "StudyInstanceUID",
        "-k", "NumberOfStudyRelatedInstances", "127.0.0.1", str(port),
    )  # fmt: skip
    assert result.returncode == 0, (tag, result.stdout, result.stderr)
    matches = set()
    for path in sorted(out_dir.glob("rsp*.dcm")):
        ds = pydicom.dcmread(path)
        matches.add((str(ds.StudyInstanceUID), str(ds.PatientID), str(ds.NumberOfStudyRelatedInstances)))
    return matches


def test_c_find_through_medlb_returns_the_same_matches_as_direct(lab: Lab, stored: tuple[str, list[bytes]]) -> None:
    study_uid, _ = stored
    direct = [find_studies(lab, node.dicom_port, f"direct-{node.name}") for node in lab.nodes]
    assert (study_uid, "MEDLB-R1", str(STUDY_SIZE)) in direct[0], direct[0]
    assert direct[0] == direct[1] == direct[2], "the nodes disagree: the lab is broken"

    since = len(lab.lb.log)
    for i in range(3):
        assert find_studies(lab, lab.port, f"lb-{i}") == direct[0]
    sessions = lab.wait_sessions(since, 3)
    assert {s["server"] for s in sessions} == {"o1", "o2", "o3"}, [s["line"] for s in sessions]
    for s in sessions:
        assert s["commands"] == "[C-FIND-RQ=1]", s["line"]
        assert s["responses"] == "[success=1]", s["line"]  # medlb does not count pending statuses


# --- 4. C-MOVE ----------------------------------------------------------------------------------


def test_c_move_through_medlb_reaches_the_destination_from_every_node(
    lab: Lab, stored: tuple[str, list[bytes]]
) -> None:
    study_uid, files = stored
    expected = expected_pixels(files)
    out_dir = lab.dest_dir
    assert lab.dest.poll() is None, f"storescp exited with {lab.dest.returncode}"
    since = len(lab.lb.log)
    for attempt in range(3):  # roundrobin: each node performs one of the moves
        for path in out_dir.iterdir():
            path.unlink()
        result = run_dcmtk(
            "movescu", "-S", "-aet", CLIENT_AET, "-aec", PUBLIC_AET, "-aem", DEST_AET,
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(lab.port),
        )  # fmt: skip
        assert result.returncode == 0, (attempt, result.stdout, result.stderr, lab.lb.log[since:])
        assert read_dir(out_dir) == expected, f"move {attempt}: not every instance arrived intact"
    sessions = lab.wait_sessions(since, 3)
    assert {s["server"] for s in sessions} == {"o1", "o2", "o3"}, [s["line"] for s in sessions]
    for s in sessions:
        assert s["commands"] == "[C-MOVE-RQ=1]" and s["term"] == "released", s["line"]
        assert s["responses"] == "[success=1]", s["line"]  # the sub-operations go straight to DESTSCP


# --- 5. C-GET -----------------------------------------------------------------------------------


def test_c_get_through_medlb_retrieves_the_study_from_every_node(lab: Lab, stored: tuple[str, list[bytes]]) -> None:
    study_uid, files = stored
    expected = expected_pixels(files)
    since = len(lab.lb.log)
    for attempt in range(3):
        out_dir = lab.tmp / f"get-{attempt}"
        out_dir.mkdir()
        result = run_dcmtk(
            "getscu", "-S", "-aet", CLIENT_AET, "-aec", PUBLIC_AET, "-od", str(out_dir),
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study_uid}", "127.0.0.1", str(lab.port),
        )  # fmt: skip
        assert result.returncode == 0, (attempt, result.stdout, result.stderr, lab.lb.log[since:])
        assert read_dir(out_dir) == expected, f"get {attempt}: not every instance arrived intact"
    sessions = lab.wait_sessions(since, 3)
    assert {s["server"] for s in sessions} == {"o1", "o2", "o3"}, [s["line"] for s in sessions]
    for s in sessions:
        # C-GET's sub-operations come back on the same association: 20 C-STORE-RQ from the node,
        # 20 C-STORE-RSP from getscu and the final C-GET-RSP.
        assert s["commands"] == f"[C-GET-RQ=1 C-STORE-RQ={STUDY_SIZE}]", s["line"]
        assert s["responses"] == f"[success={STUDY_SIZE + 1}]" and s["term"] == "released", s["line"]


# --- 6. spreading and AE title rewriting --------------------------------------------------------


def echo_once(port: int, called: str) -> tuple[bool, int | None, list[Any]]:
    """One pynetdicom association with a C-ECHO: (established and echo succeeded, echo status, PDUs received)."""
    from pynetdicom import evt
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    received: list[Any] = []
    ae = pynetdicom_ae(Verification)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title=called, evt_handlers=[(evt.EVT_PDU_RECV, lambda event: received.append(event.pdu))]
    )
    if not assoc.is_established:
        return False, None, received
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = status.Status if "Status" in status else None
    return code == 0x0000, code, received


def test_associations_follow_roundrobin(lab: Lab) -> None:
    since = len(lab.lb.log)
    for _ in range(9):
        ok, code, _ = echo_once(lab.port, PUBLIC_AET)
        assert ok, (code, lab.lb.log[since:])
    servers = [s["server"] for s in lab.wait_sessions(since, 9)]
    assert sorted(servers[:3]) == ["o1", "o2", "o3"], servers
    assert servers == servers[:3] * 3, f"not a strict rotation: {servers}"


def test_public_title_is_rewritten_to_each_nodes_own_title(lab: Lab) -> None:
    """Orthanc rejects any title but its own (reason 7): medlb's readdressing is what makes it work."""
    import io

    import pydicom
    from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RJ
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    for node in lab.mixed:
        ok, code, pdus = echo_once(node.dicom_port, node.aet)
        assert ok, f"{node.name} refuses its own title {node.aet}: {code} {pdus}"
        for wrong in (PUBLIC_AET, *(n.aet for n in lab.mixed if n is not node)):
            ok, _, pdus = echo_once(node.dicom_port, wrong)
            assert not ok, f"{node.name} ({node.aet}) accepted the called title {wrong}"
            (rj,) = [p for p in pdus if isinstance(p, A_ASSOCIATE_RJ)]
            assert (rj.result, rj.source, rj.reason_diagnostic) == (1, 1, 7), (node.name, wrong, rj)

    since = len(lab.lb.log)
    files = make_study("M1", 4)
    ae = pynetdicom_ae(CTImageStorage)
    for dicom in files:  # the ARCHIVE title works on every node, each association answered as ARCHIVE
        ok, code, pdus = echo_once(lab.mixed_port, PUBLIC_AET)
        assert ok, (code, pdus, lab.lb.log[since:])
        (ac,) = [p for p in pdus if isinstance(p, A_ASSOCIATE_AC)]
        assert ac.called_ae_title.strip() == PUBLIC_AET and ac.calling_ae_title.strip() == CLIENT_AET, ac
        assoc = ae.associate("127.0.0.1", lab.mixed_port, ae_title=PUBLIC_AET)
        assert assoc.is_established, lab.lb.log[since:]
        try:
            status = assoc.send_c_store(pydicom.dcmread(io.BytesIO(dicom)))
        finally:
            assoc.release()
        assert "Status" in status and status.Status == 0x0000, status
    sessions = lab.wait_sessions(since, 2 * len(files))
    used = {(s["server"], s["server_ae"]) for s in sessions}
    assert used == {(n.name, n.aet) for n in lab.mixed}, [s["line"] for s in sessions]
    assert {s["called"] for s in sessions} == {PUBLIC_AET}
    assert all(s["term"] == "released" for s in sessions), [s["line"] for s in sessions]
    expected = set(expected_pixels(files))
    for node in [lab.nodes[0], *lab.mixed]:
        assert node.sop_instance_uids(dicom_uid("study", "M1")) == expected, node.name


# --- 7. a node killed under a stream of associations --------------------------------------------


@dataclass
class Outcome:
    index: int
    sop_uid: str
    started: float
    ended: float
    result: str  # ok, not_established, aborted, status 0x...
    pdus: list[str]


@dataclass
class StoreStream:
    """One thread storing one new small instance per association through medlb, back to back."""

    port: int
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[Outcome] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def run(self) -> None:
        from pynetdicom import evt
        from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

        ae = pynetdicom_ae(CTImageStorage)
        index = 0
        while not self.stop.is_set():
            index += 1
            assoc = None
            try:
                ds = make_dataset("MEDLB-K1", "MEDLB^KILL", "K1", 1, index, "CT", 16)
                pdus: list[str] = []
                started = time.monotonic()
                assoc = ae.associate(
                    "127.0.0.1",
                    self.port,
                    ae_title=PUBLIC_AET,
                    evt_handlers=[(evt.EVT_PDU_RECV, lambda event, pdus=pdus: pdus.append(type(event.pdu).__name__))],
                )
                if not assoc.is_established:
                    result = "aborted" if assoc.is_aborted else "not_established"
                else:
                    status = assoc.send_c_store(ds)
                    if assoc.is_aborted:
                        result = "aborted"
                    elif "Status" not in status:
                        result = "no status"
                    else:
                        result = "ok" if status.Status == 0x0000 else f"status 0x{status.Status:04x}"
                    if assoc.is_established:
                        assoc.release()
                self.outcomes.append(Outcome(index, str(ds.SOPInstanceUID), started, time.monotonic(), result, pdus))
            except Exception as exc:  # a crash of the client loop must fail the test, not hang it
                self.errors.append(f"{type(exc).__name__}: {exc}")
                return
            finally:
                if assoc is not None and assoc.is_established:
                    assoc.abort()  # only after an exception: pynetdicom's reactor thread must not outlive the test

    def count_since(self, moment: float) -> int:
        return sum(1 for o in self.outcomes if o.started >= moment)


def hold_association(ae: Any, port: int) -> tuple[Any, list[str]]:
    """An established association left idle, with what its client receives: (association, events)."""
    from pynetdicom import evt

    events: list[str] = []
    assoc = ae.associate(
        "127.0.0.1",
        port,
        ae_title=PUBLIC_AET,
        evt_handlers=[
            (evt.EVT_PDU_RECV, lambda event: events.append(type(event.pdu).__name__)),
            (evt.EVT_DATA_RECV, lambda event: events.append(f"data {event.data[:12].hex()}")),
            (evt.EVT_CONN_CLOSE, lambda event: events.append(f"closed at {time.monotonic():.3f}")),
        ],
    )
    return assoc, events


@pytest.fixture
def revive(lab: Lab) -> Iterator[None]:
    """After the test, start any node it killed again and wait until medlb sees it UP."""
    yield
    for node in lab.nodes:
        if not node.running:
            up = f"archive/{node.name} op_state DOWN -> UP"
            ups = lab.lb.log.count(up)
            node.start()
            wait_until(lambda up=up, ups=ups: lab.lb.log.count(up) > ups, timeout=10)


def test_a_node_killed_under_a_stream_of_associations(lab: Lab, revive: None) -> None:
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    victim, survivors = lab.nodes[2], {"o1", "o2"}
    down_line = f"archive/{victim.name} op_state UP -> DOWN"
    since = len(lab.lb.log)
    ae = pynetdicom_ae(CTImageStorage)
    held: list[tuple[Any, list[str]]] = []
    stream = StoreStream(lab.port)
    thread = threading.Thread(target=stream.run, daemon=True)
    try:
        # Three associations held open first: roundrobin puts one on each node, so one is on the victim.
        for _ in range(3):
            held.append(hold_association(ae, lab.port))
            assert held[-1][0].is_established, lab.lb.log[since:]

        thread.start()
        wait_until(lambda: len(stream.outcomes) >= 30 or bool(stream.errors), timeout=20)
        assert not stream.errors, stream.errors
        assert {o.result for o in stream.outcomes} == {"ok"}, [o for o in stream.outcomes if o.result != "ok"]
        before = lab.sessions(since)
        assert {s["server"] for s in before} == {"o1", "o2", "o3"}, [s["line"] for s in before]

        killed_at = time.monotonic()
        victim.kill()  # SIGKILL: the node says nothing, its kernel closes its sockets
        lab.lb.wait_for_log(down_line, timeout=10)
        down_at = time.monotonic()
        wait_until(lambda: stream.count_since(down_at) >= 30 or bool(stream.errors), timeout=20)
        stream.stop.set()
        thread.join(20)
        assert not stream.errors, stream.errors

        # The association held on the victim got an A-ABORT from medlb; the two others still work.
        wait_until(lambda: any(assoc.is_aborted for assoc, _ in held), timeout=5)
        aborted = [events for assoc, events in held if assoc.is_aborted]
        assert len(aborted) == 1, [(assoc.is_aborted, events) for assoc, events in held]
        assert "A_ABORT_RQ" in aborted[0], (
            f"the client saw no A-ABORT (killed at {killed_at:.3f}): {aborted[0]}\n{lab.lb.log[since:]}"
        )
        for i, (assoc, _) in enumerate(held):
            if not assoc.is_aborted:
                ds = make_dataset("MEDLB-K1", "MEDLB^KILL", "K1", 2, i, "CT", 16)
                status = assoc.send_c_store(ds)
                assert "Status" in status and status.Status == 0x0000, status
                stream.outcomes.append(Outcome(-i, str(ds.SOPInstanceUID), 0, 0, "ok", []))
                assoc.release()
    finally:
        stream.stop.set()
        if thread.is_alive():
            thread.join(20)
        for assoc, _ in held:
            if assoc.is_established:
                assoc.abort()  # pynetdicom's reactor threads must not outlive the test

    # After medlb saw the node DOWN, every association succeeded on a survivor, none was refused.
    after = [o for o in stream.outcomes if o.started >= down_at]
    assert {o.result for o in after} == {"ok"}, [o for o in after if o.result != "ok"]

    def late_sessions() -> list[dict[str, str]]:
        """Session lines medlb wrote after the DOWN line (what was open on the victim ended before it)."""
        return lab.sessions(lab.lb.log.index(down_line))

    with contextlib.suppress(AssertionError):  # the last lines are written as the associations close
        wait_until(lambda: len(late_sessions()) >= len(after), timeout=5)
    late = late_sessions()
    sessions = lab.sessions(since)
    on_victim = [s for s in sessions if s["server"] == victim.name and s["term"] != "released"]
    assert len(late) >= len(after), "medlb logged fewer associations than the client made"
    assert {s["server"] for s in late} == survivors, [s["line"] for s in late if s["server"] not in survivors]
    assert {s["term"] for s in late} == {"released"}, [s["line"] for s in late if s["term"] != "released"]

    # Around the kill: at most the one association in flight on the victim failed, and it failed
    # visibly (aborted or never established), never with a success or a DIMSE failure status.
    failed = [o for o in stream.outcomes if o.result != "ok"]
    assert len(failed) <= 1, failed
    for o in failed:
        assert o.started < down_at and o.ended >= killed_at, o
        assert o.result in ("aborted", "not_established"), o
    # medlb ended what was open on the victim with an A-ABORT to the client: the node's kernel
    # closes its sockets with a FIN (server_close_aborted), or a RST with unread data (server_reset_aborted).
    assert on_victim, "no association was open on the victim"
    assert all(re.fullmatch(r"server_(close|reset)_aborted", s["term"]) for s in on_victim), [
        s["line"] for s in on_victim
    ]

    # Every C-STORE the client saw succeed is in the cluster (ask a survivor's index).
    stored = lab.nodes[0].sop_instance_uids(dicom_uid("study", "K1"))
    missing = {o.sop_uid for o in stream.outcomes if o.result == "ok"} - stored
    assert not missing, f"{len(missing)} instances reported stored are not in the cluster"
