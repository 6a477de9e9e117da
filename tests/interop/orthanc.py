"""Real Orthanc nodes for interop tests: N ``Orthanc`` child processes on loopback, each with
its own temporary configuration, SQLite index and storage, HTTP and DICOM ports, and the
DICOMweb plugin loaded. Never the Debian ``orthanc`` service.

    with orthanc_cluster(tmp_path, 2) as nodes:
        for node in nodes:
            node.upload(dicom_bytes)
        status, headers, body = nodes[0].get("/dicom-web/studies")

Also builds small, deterministic DICOM instances with pydicom (``make_instances``, ``make_study``).

With ``postgres=`` (a private cluster from tests/interop/postgres.py) the nodes form one
archive, as in docs/interop.md and the reference recipe: one shared PostgreSQL index
(``"Lock": false``), one shared storage directory, ``DicomCheckCalledAet`` on, the same
``DicomModalities`` table on every node, and the DICOM AE title(s) you give:

    with private_postgres() as pg, orthanc_cluster(
        tmp, 3, postgres=pg, aet="ARCHIVE", modalities={"ws": ("WS01", "127.0.0.1", 11112)}
    ) as nodes:
        ...  # an instance stored on any node is seen by all of them

Orthanc 1.10 has no bind-address setting: both ports listen on 0.0.0.0. HTTP is kept to
loopback clients by ``RemoteAccessAllowed: false`` (authentication is off); the DICOM port
accepts C-ECHO and C-STORE from anywhere while a test runs.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, wait_until
from tests.interop.postgres import PostgresServer

ORTHANC_BINARIES = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc")
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc", "/usr/local/share/orthanc/plugins")
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
POSTGRESQL_INDEX_PLUGIN = "libOrthancPostgreSQLIndex.so"
INSTALL_HINT = (
    "`make test` installs it (scripts/install-deps.sh, Debian packages orthanc, orthanc-dicomweb and "
    "orthanc-postgresql); by hand: apt-get install orthanc orthanc-dicomweb orthanc-postgresql && service orthanc stop"
)


def orthanc_binary() -> str:
    """The Orthanc executable; fails the test (never skips) when it is not installed."""
    for candidate in (shutil.which("Orthanc"), *ORTHANC_BINARIES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail(f"Orthanc is not installed: {INSTALL_HINT}")


def _plugin(filename: str, package: str) -> str:
    for directory in PLUGIN_DIRS:
        path = Path(directory) / filename
        if path.exists():
            return str(path)
    pytest.fail(f"the Orthanc plugin {filename} (Debian package {package}) is not installed: {INSTALL_HINT}")


def dicomweb_plugin() -> str:
    """The DICOMweb plugin shared object; fails the test when it is not installed."""
    return _plugin(DICOMWEB_PLUGIN, "orthanc-dicomweb")


def postgresql_index_plugin() -> str:
    """The PostgreSQL index plugin shared object; fails the test when it is not installed."""
    return _plugin(POSTGRESQL_INDEX_PLUGIN, "orthanc-postgresql")


@dataclass
class OrthancNode:
    """One ``Orthanc <config.json>`` child process with its own directory under the test's tmp."""

    name: str
    directory: Path
    http_port: int
    dicom_port: int
    config: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    _log: Any = field(default=None, repr=False)
    _terminated: bool = field(default=False, repr=False)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def log_path(self) -> Path:
        return self.directory / "orthanc.log"

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self, timeout: float = 20.0) -> None:
        """Start the process (again, after ``stop``/``kill``: same storage, same ports) and wait until ready."""
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(self.config, indent=2))
        self._log = self.log_path.open("ab")
        self._terminated = False
        env = dict(os.environ, TCP_NODELAY="1")  # DCMTK (the DICOM side) leaves Nagle on otherwise
        self.proc = subprocess.Popen(
            [orthanc_binary(), str(config_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=env,
            start_new_session=True,
        )
        self.wait_ready(timeout)

    @property
    def aet(self) -> str:
        """The node's own DICOM AE title (``DicomAet``)."""
        return str(self.config.get("DicomAet", "ORTHANC"))

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Until the REST API and the DICOMweb plugin (when loaded) answer 200 and the DICOM port
        accepts connections (or fail with the log)."""
        dicomweb = any(str(p).endswith(DICOMWEB_PLUGIN) for p in self.config.get("Plugins", ()))
        dicom = bool(self.config.get("DicomServerEnabled", True))

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"Orthanc {self.name} exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                if self.get("/system", timeout=2)[0] != 200:
                    return False
                if dicomweb and self.get("/dicom-web/studies", timeout=2)[0] != 200:
                    return False
                if dicom:
                    socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2).close()
                return True
            except OSError:
                return False

        try:
            wait_until(ready, timeout=timeout, interval=0.05)
        except AssertionError as exc:
            if "condition not met" in str(exc):
                raise AssertionError(f"Orthanc {self.name} not ready after {timeout}s:\n{self.log[-4000:]}") from None
            raise

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case, no goodbye on open connections."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._close_log()

    def terminate(self) -> None:
        """SIGTERM without waiting (Orthanc takes about 2 s to stop: signal every node, then ``stop`` each)."""
        if self.proc is not None and self.proc.poll() is None and not self._terminated:
            self.proc.send_signal(signal.SIGTERM)
            self._terminated = True

    def stop(self) -> None:
        """SIGTERM (Orthanc shuts down cleanly), SIGKILL after 10 s."""
        if self.proc is not None and self.proc.poll() is None:
            self.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 10.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One request on a fresh connection: (status, headers with lower-case names, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, data
        finally:
            conn.close()

    def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> tuple[int, dict[str, str], bytes]:
        return self.request("GET", path, headers=headers, timeout=timeout)

    def get_json(self, path: str) -> Any:
        status, _, body = self.get(path)
        assert status == 200, f"GET {path} on {self.name}: {status} {body[:500]!r}"
        return json.loads(body)

    def post_json(self, path: str, document: Any) -> Any:
        status, _, body = self.request(
            "POST", path, json.dumps(document).encode(), {"Content-Type": "application/json"}
        )
        assert status == 200, f"POST {path} on {self.name}: {status} {body[:500]!r}"
        return json.loads(body)

    def sop_instance_uids(self, study_uid: str) -> set[str]:
        """The SOPInstanceUIDs this node's index holds for the study (REST ``/tools/find``)."""
        found = self.post_json(
            "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
        )
        return {item["MainDicomTags"]["SOPInstanceUID"] for item in found}

    def upload(self, dicom: bytes) -> dict[str, Any]:
        """``POST /instances``: store one DICOM file; return Orthanc's answer."""
        status, _, body = self.request("POST", "/instances", dicom, {"Content-Type": "application/dicom"})
        assert status == 200, f"upload to {self.name}: {status} {body[:500]!r}"
        answer: dict[str, Any] = json.loads(body)
        assert answer.get("Status") in ("Success", "AlreadyStored"), answer
        return answer


def node_config(
    name: str, directory: Path, http_port: int, dicom_port: int, dicomweb: dict[str, Any] | None = None
) -> dict[str, Any]:
    """An Orthanc 1.10 configuration: private storage and index, no auth (loopback only), DICOMweb on."""
    return {
        "Name": name,
        "StorageDirectory": str(directory / "storage"),
        "IndexDirectory": str(directory / "index"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomServerEnabled": True,
        "DicomAet": "ARCHIVE",  # the same public AE title on every node, as behind a balancer
        "RemoteAccessAllowed": False,  # HTTP from loopback clients only (medlb and the test)
        "AuthenticationEnabled": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "HttpCompressionEnabled": False,  # bodies as stored, whatever Accept-Encoding says
        "WebDavEnabled": False,
        "SaveJobs": False,
        "StableAge": 1,
        "Plugins": [dicomweb_plugin()],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, **(dicomweb or {})},
    }


#: A ``DicomModalities`` entry: (AE title, host, port). The same table goes to every node.
Modality = tuple[str, str, int]


def shared_index_config(
    postgres: PostgresServer, storage: Path, aet: str, modalities: dict[str, Modality]
) -> dict[str, Any]:
    """The keys that make a node part of one archive: a shared PostgreSQL index (``Lock: false``)
    and storage directory, its AE title checked on every association, and the peers it knows."""
    return {
        "StorageDirectory": str(storage),
        "DicomAet": aet,
        "DicomCheckCalledAet": True,  # a wrong called AE title gets A-ASSOCIATE-RJ reason 7
        "DicomCheckModalityHost": False,
        "DicomAlwaysAllowFind": False,  # C-FIND, C-MOVE and C-GET only from the modalities below
        "DicomAlwaysAllowMove": False,
        "DicomModalities": {
            key: {"AET": title, "Host": host, "Port": port} for key, (title, host, port) in modalities.items()
        },
        "OverwriteInstances": True,  # a study re-sent through another node is no error
        "PostgreSQL": {
            "EnableIndex": True,
            "EnableStorage": False,
            "Host": postgres.host,
            "Port": postgres.port,
            "Database": postgres.database,
            "Username": postgres.user,
            "Password": postgres.password,
            "Lock": False,  # required to share the database between nodes
            "IndexConnectionsCount": 2,
            "MaximumConnectionRetries": 10,
            "ConnectionRetryInterval": 1,
        },
    }


@contextlib.contextmanager
def orthanc_cluster(
    tmp: Path,
    count: int = 2,
    *,
    dicomweb: dict[str, Any] | None = None,
    postgres: PostgresServer | None = None,
    storage: Path | None = None,
    aet: str | Sequence[str] = "ARCHIVE",
    modalities: dict[str, Modality] | None = None,
    names: Sequence[str] | None = None,
    **overrides: Any,
) -> Iterator[list[OrthancNode]]:
    """Start ``count`` nodes (``o1``, ``o2``, ... or ``names``) each in its own directory under ``tmp``;
    stop them all on exit.

    ``dicomweb`` adds keys to each node's ``DicomWeb`` section (e.g. ``Host``, ``Ssl``,
    ``PublicRoot``); ``overrides`` replace top-level configuration keys.

    Default: independent nodes, each with its own SQLite index and storage. With ``postgres``:
    one archive (see :func:`shared_index_config`) whose storage directory is ``storage``
    (default ``tmp/orthanc/storage``; pass another cluster's to add nodes to it); ``aet`` is the
    AE title of every node or one per node, ``modalities`` the ``DicomModalities`` table. The
    first node starts alone (it creates the database schema), the others in parallel.
    """
    orthanc_binary()
    names = list(names) if names is not None else [f"o{i}" for i in range(1, count + 1)]
    aets = [aet] * len(names) if isinstance(aet, str) else list(aet)
    assert len(aets) == len(names), (aets, names)
    if postgres is not None:
        storage = storage or tmp / "orthanc" / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        plugin = postgresql_index_plugin()
    nodes: list[OrthancNode] = []
    try:
        for name, title in zip(names, aets, strict=True):
            directory = tmp / "orthanc" / name
            directory.mkdir(parents=True)
            http_port, dicom_port = free_port(), free_port()
            config = node_config(name, directory, http_port, dicom_port, dicomweb)
            if postgres is not None:
                assert storage is not None
                config.update(shared_index_config(postgres, storage, title, modalities or {}))
                config["Plugins"] = [plugin, *config["Plugins"]]
            elif title != "ARCHIVE" or modalities:
                config["DicomAet"] = title
                config["DicomModalities"] = {k: list(v) for k, v in (modalities or {}).items()}
            config.update(overrides)
            nodes.append(OrthancNode(name, directory, http_port, dicom_port, config))
        if postgres is None:
            for node in nodes:
                node.start()
        elif nodes:
            nodes[0].start()
            with concurrent.futures.ThreadPoolExecutor(max(1, len(nodes) - 1)) as pool:
                for future in [pool.submit(node.start) for node in nodes[1:]]:
                    future.result()
        yield nodes
    finally:
        for node in nodes:
            node.terminate()
        for node in nodes:
            node.stop()


# --- DICOM instances --------------------------------------------------------------------------

STUDY_LAYOUT: tuple[tuple[str, str, str, tuple[tuple[str, int, int, int], ...]], ...] = (
    # (PatientID, PatientName, study key, ((series key + modality, instances, rows/cols, frames), ...))
    ("MEDLB-A", "MEDLB^ALPHA", "A1", (("CT", 3, 64, 1), ("MR", 2, 64, 1))),
    ("MEDLB-B", "MEDLB^BRAVO", "B1", (("CT", 1, 256, 4),)),  # one 512 KiB multi-frame instance
)


_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://medlb.invalid/tests/interop")


def dicom_uid(*parts: object) -> str:
    """A deterministic UID (2.25.<name-based UUID>): every run and every node sees the same identifiers."""
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, '/'.join(map(str, parts))).int}"


def make_instances() -> list[bytes]:
    """Small synthetic CT/MR instances (Explicit VR Little Endian, pseudo-random 16-bit pixels).

    Two patients, two studies, three series, six instances; the last one is a 4-frame
    256x256 image (512 KiB of pixel data) so bodies larger than one read pass the balancer.
    """
    out: list[bytes] = []
    for patient_id, patient_name, study_key, series_list in STUDY_LAYOUT:
        for series_number, (modality, instance_count, size, frames) in enumerate(series_list, start=1):
            for instance_number in range(1, instance_count + 1):
                ds = make_dataset(
                    patient_id, patient_name, study_key, series_number, instance_number, modality, size, frames
                )
                out.append(_encode(ds))
    return out


def make_study(
    study_key: str, count: int, *, patient_id: str = "", modality: str = "CT", size: int = 32
) -> list[bytes]:
    """One study of ``count`` single-frame instances in one series, UIDs derived from ``study_key``
    (``dicom_uid("study", study_key)`` ...); patient ``MEDLB-<study_key>`` unless ``patient_id``."""
    patient_id = patient_id or f"MEDLB-{study_key}"
    return [
        _encode(make_dataset(patient_id, f"MEDLB^{study_key}", study_key, 1, number, modality, size, 1))
        for number in range(1, count + 1)
    ]


def make_dataset(
    patient_id: str,
    patient_name: str,
    study_key: str,
    series_number: int,
    instance_number: int,
    modality: str = "CT",
    size: int = 32,
    frames: int = 1,
) -> Any:
    """One pydicom ``Dataset`` (with file meta) whose UIDs are ``dicom_uid("study"|"series"|"instance", ...)``."""
    try:
        import pydicom
        from pydicom.dataset import FileMetaDataset
        from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
    except ImportError:
        pytest.fail("pydicom is not installed: `make test` installs the dev dependencies (pip install -e '.[dev]')")

    sop_classes = {"CT": CTImageStorage, "MR": MRImageStorage}
    study_uid = dicom_uid("study", study_key)
    series_uid = dicom_uid("series", study_key, series_number)
    sop_uid = dicom_uid("instance", study_key, series_number, instance_number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_classes[modality]
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_classes[modality]
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC-{study_key}"[:16]
    ds.Modality = modality
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"medlb interop {study_key}"
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = study_key[:16]
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    noise = random.Random(sop_uid).randbytes(size * size * 2 * frames)
    ds.PixelData = bytes(b & 0x0F if i % 2 else b for i, b in enumerate(noise))  # 12 bits stored
    ds["PixelData"].VR = "OW"
    return ds


def _encode(ds: Any) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
