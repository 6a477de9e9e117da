"""DICOM TLS through medlb with DCMTK as the real peer on both sides.

medlb terminates DICOM TLS from ``echoscu``/``storescu +tls`` (client certificates required by
default, CN mapped to calling AE titles) and re-encrypts to a ``storescp +tls`` archive, verifying
its certificate; the ``dicom-echo`` check runs over TLS too.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import Medlb, free_port, running_medlb, wait_until
from tests.io.test_tls import Pki, make_pki

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"DCMTK's {tool} is not installed: `make test` installs it (apt-get install dcmtk)")
    return path


def _port_open(port: int) -> bool:
    import socket

    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_archive(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """``storescp +tls`` with the backend certificate; it accepts clients without certificates."""
    port = free_port()
    out = tmp_path / "received"
    out.mkdir()
    cmd = [_dcmtk("storescp"), "+tls", pki.path("backend.key"), pki.path("backend.crt")]
    cmd += ["+cf", pki.path("ca.crt"), "-ic", "-aet", "ARCHIVE", "-od", str(out), str(port)]
    proc = subprocess.Popen(cmd, env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _port_open(port), timeout=10)
        yield port, out
    finally:
        proc.kill()
        proc.wait()


def dicom_tls_config(pki: Pki, port: int, archive_port: int, **frontend: Any) -> dict[str, Any]:
    return {
        "defaults": {"check": {"inter": "500ms"}},
        "frontends": [
            {
                "name": "pacs",
                "mode": "dicom",
                "bind": [f"127.0.0.1:{port}"],
                "default_backend": "archive",
                "tls": {
                    "certificates": [{"cert": pki.path("pacs.crt"), "key": pki.path("pacs.key")}],
                    "client_ca": pki.path("ca.crt"),
                },
                **frontend,
            }
        ],
        "backends": [
            {
                "name": "archive",
                "check": {"type": "dicom-echo"},
                "tls": {"ca": pki.path("ca.crt")},
                "servers": [{"name": "tls1", "address": f"127.0.0.1:{archive_port}", "ae_title": "ARCHIVE"}],
            }
        ],
    }


def echoscu(pki: Pki, port: int, calling: str, *, certificate: bool = True) -> subprocess.CompletedProcess[str]:
    tls = ["+tls", pki.path("client.key"), pki.path("client.crt")] if certificate else ["+tla"]
    cmd = [_dcmtk("echoscu"), *tls, "+cf", pki.path("ca.crt"), "-aet", calling, "-aec", "PACS", "-to", "5"]
    cmd += ["127.0.0.1", str(port)]
    return subprocess.run(cmd, env=DCMTK_ENV, capture_output=True, text=True, timeout=30)


@pytest.fixture
def lab(pki: Pki, tls_archive: tuple[int, Path], tmp_path: Path) -> Iterator[tuple[int, Medlb, Path]]:
    archive_port, received = tls_archive
    port = free_port()
    config = dicom_tls_config(pki, port, archive_port, dicom={"certificate_ae_titles": {"modality-01": ["CT*"]}})
    with running_medlb(config, tmp_path) as lb:
        # The dicom-echo check reaches the archive over TLS, verifying its certificate.
        lb.wait_for_log("archive/tls1 op_state DOWN -> UP (C-ECHO OK")
        yield port, lb, received


def test_echo_and_store_over_dicom_tls_on_both_legs(pki: Pki, lab: tuple[int, Medlb, Path]) -> None:
    port, lb, received = lab
    result = echoscu(pki, port, "CT01")
    assert result.returncode == 0, result.stderr
    lb.wait_for_log("calling=CT01 called=PACS server_ae=ARCHIVE")
    import pydicom
    import pydicom.data

    source = pydicom.data.get_testdata_file("CT_small.dcm")
    assert isinstance(source, str)
    store = [_dcmtk("storescu"), "+tls", pki.path("client.key"), pki.path("client.crt"), "+cf", pki.path("ca.crt")]
    store += ["-aet", "CT01", "-aec", "PACS", "127.0.0.1", str(port), source]
    result = subprocess.run(store, env=DCMTK_ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: len(list(received.iterdir())) == 1, timeout=5)
    sent, stored = pydicom.dcmread(source), pydicom.dcmread(next(received.iterdir()))
    assert stored.SOPInstanceUID == sent.SOPInstanceUID and stored.PixelData == sent.PixelData  # arrived intact
    lb.wait_for_log("commands=[C-STORE-RQ=1] responses=[success=1] term=released")


def test_a_client_without_a_certificate_never_reaches_the_archive(pki: Pki, lab: tuple[int, Medlb, Path]) -> None:
    port, lb, _ = lab
    result = echoscu(pki, port, "CT01", certificate=False)
    assert result.returncode != 0
    lb.wait_for_log("TLS handshake failed")
    lb.wait_for_log("attempts=0 commands=[-] responses=[-] term=tls_handshake_failed")


def test_the_certificate_limits_the_calling_ae_titles(pki: Pki, lab: tuple[int, Medlb, Path]) -> None:
    port, lb, _ = lab
    result = echoscu(pki, port, "MR01")  # modality-01's certificate may only call as CT*
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    lb.wait_for_log("calling AE 'MR01' not allowed for certificate CN 'modality-01' (result=1 source=1 reason=3)")


def test_an_archive_with_an_untrusted_certificate_is_down(
    pki: Pki, tls_archive: tuple[int, Path], tmp_path: Path
) -> None:
    archive_port, _ = tls_archive
    port = free_port()
    config = dicom_tls_config(pki, port, archive_port)
    config["backends"][0]["tls"] = {"ca": pki.path("other.crt")}  # trusts another CA
    with running_medlb(config, tmp_path) as lb:
        lb.wait_for_log("health check failed: TLS certificate rejected")
        result = echoscu(pki, port, "CT01")
        assert result.returncode != 0
        assert "Rejected Transient" in result.stdout + result.stderr
        lb.wait_for_log("term=no_server")


def test_dicom_tls_requires_a_client_ca_unless_verification_is_off(pki: Pki) -> None:
    from medlb.config import parse_config
    from medlb.errors import ConfigError

    config = dicom_tls_config(pki, 104, 105)
    del config["frontends"][0]["tls"]["client_ca"]
    with pytest.raises(ConfigError, match="DICOM TLS verifies client certificates by default"):
        parse_config(config)
    config["frontends"][0]["tls"]["client_verify"] = "none"
    assert parse_config(config).frontends[0].tls is not None
