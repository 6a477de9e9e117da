"""TLS offload and re-encryption in ``mode: http``, end to end with curl and Python TLS clients.

A throwaway CA (openssl) signs the frontend certificates (two names for SNI),
a client certificate for mTLS and the certificate of a TLS backend.
"""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import free_port, running_medlb
from tests.io.test_http import Recorder, http_config


@dataclass
class Pki:
    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _issue(pki: Path, name: str, subject: str, san: str | None) -> None:
    _openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        subject,
        cwd=pki,
    )
    ext = pki / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        cwd=pki,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def make_pki(d: Path) -> Pki:
    """A test CA and certificates issued by it (server, client, backend), plus an unrelated CA."""
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=medlb test CA",
        cwd=d,
    )
    _issue(d, "pacs", "/CN=pacs.example", "DNS:pacs.example,IP:127.0.0.1")
    _issue(d, "viewer", "/CN=viewer.example", "DNS:viewer.example")
    _issue(d, "client", "/O=Radiology/CN=modality-01", None)
    _issue(d, "backend", "/CN=backend", "IP:127.0.0.1")
    # A second, unrelated CA: what a wrongly configured backend trust looks like.
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other.key",
        "-out",
        "other.crt",
        "-days",
        "2",
        "-subj",
        "/CN=other CA",
        cwd=d,
    )
    return Pki(d)


def tls_frontend(pki: Pki, **extra: Any) -> dict[str, Any]:
    return {
        "certificates": [
            {"cert": pki.path("pacs.crt"), "key": pki.path("pacs.key")},
            {"cert": pki.path("viewer.crt"), "key": pki.path("viewer.key")},
        ],
        **extra,
    }


@pytest.fixture
def tls_lab(pki: Pki, tmp_path: Path) -> Iterator[tuple[int, Recorder, Any]]:
    recorder = Recorder("a")
    port = free_port()
    config = http_config(port, [recorder])
    config["frontends"][0]["tls"] = tls_frontend(pki)
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            yield port, recorder, lb
    finally:
        recorder.stop()


def _client(pki: Pki, name: str, port: int, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    context = context or ssl.create_default_context(cafile=pki.path("ca.crt"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return context.wrap_socket(raw, server_hostname=name)


def _get(sock: ssl.SSLSocket | socket.socket, host: str, path: str = "/", headers: str = "") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n".encode())
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_curl_over_tls_reaches_the_server_as_https(pki: Pki, tls_lab: tuple[int, Recorder, Any]) -> None:
    port, recorder, _ = tls_lab
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http1.1",
            "--cacert",
            pki.path("ca.crt"),
            "--resolve",
            f"pacs.example:{port}:127.0.0.1",
            f"https://pacs.example:{port}/qido-rs/studies",
        ],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["path"] == "/qido-rs/studies"
    headers = {k.lower(): v for k, v in recorder.requests[-1]["headers"]}
    assert headers["x-forwarded-proto"] == "https"


def test_sni_chooses_the_certificate_and_tls_1_3_is_offered(pki: Pki, tls_lab: tuple[int, Recorder, Any]) -> None:
    port, _, _ = tls_lab
    for name in ("pacs.example", "viewer.example"):
        with _client(pki, name, port) as sock:
            subject = dict(x[0] for x in sock.getpeercert()["subject"])
            assert subject["commonName"] == name
            assert sock.version() == "TLSv1.3"
            assert sock.selected_alpn_protocol() in (None, "http/1.1")
            assert b"200 OK" in _get(sock, name)


def test_old_protocols_and_plaintext_are_refused_before_any_server(
    pki: Pki, tls_lab: tuple[int, Recorder, Any]
) -> None:
    port, recorder, lb = tls_lab
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.check_hostname = False
        old.verify_mode = ssl.CERT_NONE
        old.set_ciphers("DEFAULT:@SECLEVEL=0")
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises(OSError):
        _client(pki, "pacs.example", port, old)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: pacs.example\r\n\r\n")
        assert plain.recv(100) == b""  # closed, no HTTP answer in clear
    lb.wait_for_log("handshake failed")
    assert recorder.requests == []


def test_a_tls_client_hello_on_a_plain_port_gets_nowhere(pki: Pki, tmp_path: Path) -> None:
    recorder = Recorder("a")
    port = free_port()
    try:
        with running_medlb(http_config(port, [recorder]), tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            with pytest.raises(OSError):
                _client(pki, "pacs.example", port)
            lb.wait_for_log("rejected 400")
            assert recorder.requests == []
    finally:
        recorder.stop()


def test_a_certificate_subject_cannot_break_the_header_line() -> None:
    from medlb.io.tls import subject_text

    subject = ((("commonName", "dr\r\nX-Admin: yes"),), (("organizationName", "A, B\\C\x7f"),))
    text = subject_text({"subject": subject})
    assert text == "O=A\\, B\\\\C\\7F,CN=dr\\0D\\0AX-Admin: yes"
    assert not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)


def test_session_resumption(pki: Pki, tls_lab: tuple[int, Recorder, Any]) -> None:
    port, _, _ = tls_lab
    context = ssl.create_default_context(cafile=pki.path("ca.crt"))
    context.maximum_version = ssl.TLSVersion.TLSv1_2  # a TLS 1.2 session id/ticket is available at once
    with _client(pki, "pacs.example", port, context) as first:
        _get(first, "pacs.example")
        session = first.session
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="pacs.example", session=session) as second:
        assert second.session_reused
        assert b"200 OK" in _get(second, "pacs.example")


def test_mutual_tls_passes_the_subject_and_refuses_anonymous_clients(pki: Pki, tmp_path: Path) -> None:
    recorder = Recorder("a")
    port = free_port()
    config = http_config(port, [recorder])
    config["frontends"][0]["tls"] = tls_frontend(pki, client_ca=pki.path("ca.crt"), client_verify="required")
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            anonymous = ssl.create_default_context(cafile=pki.path("ca.crt"))
            # With TLS 1.3 the refusal can arrive after the client's side of the
            # handshake: either way the client gets no HTTP answer.
            try:
                with _client(pki, "pacs.example", port, anonymous) as sock:
                    refused = _get(sock, "pacs.example")
            except OSError:
                refused = b""
            assert refused == b""
            assert recorder.requests == []
            lb.wait_for_log("handshake failed")
            with_cert = ssl.create_default_context(cafile=pki.path("ca.crt"))
            with_cert.load_cert_chain(pki.path("client.crt"), pki.path("client.key"))
            with _client(pki, "pacs.example", port, with_cert) as sock:
                out = _get(sock, "pacs.example", headers="X-Client-Cert-Subject: CN=forged\r\n")
            assert b"200 OK" in out
            (record,) = recorder.requests
            subjects = [v for k, v in record["headers"] if k.lower() == "x-client-cert-subject"]
            assert subjects == ["CN=modality-01,O=Radiology"]
    finally:
        recorder.stop()


class TlsRecorder(Recorder):
    """The recording server, speaking TLS with the backend certificate."""

    def __init__(self, name: str, pki: Pki) -> None:
        super().__init__(name)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.path("backend.crt"), pki.path("backend.key"))
        self.socket = context.wrap_socket(self.socket, server_side=True, do_handshake_on_connect=False)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        try:
            sock.do_handshake()  # type: ignore[attr-defined]
        except (OSError, ssl.SSLError):
            sock.close()
            raise
        return sock, addr


@pytest.mark.parametrize(
    ("tls", "expect"),
    [
        ({"ca": "ca.crt"}, 200),
        ({"ca": "other.crt"}, 503),  # wrong trust: the certificate does not verify
        ({"ca": "ca.crt", "pin_sha256": ["00" * 32]}, 503),  # verifies, but is not the pinned one
        ({"ca": "ca.crt", "pin_sha256": ["PIN"]}, 200),
    ],
    ids=["verified", "wrong-ca", "pin-mismatch", "pinned"],
)
def test_re_encryption_verifies_the_server(pki: Pki, tmp_path: Path, tls: dict[str, Any], expect: int) -> None:
    backend = TlsRecorder("secure", pki)
    port = free_port()
    config = http_config(port, [backend])
    config["backends"][0]["check"] = {"type": "tcp"}
    pem = Path(pki.path("backend.crt")).read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    settings = {**tls, "ca": pki.path(tls["ca"])}
    if settings.get("pin_sha256") == ["PIN"]:
        settings["pin_sha256"] = [hashlib.sha256(der).hexdigest()]
    config["backends"][0]["tls"] = settings
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/secure op_state DOWN -> UP")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                out = _get(sock, "pacs.example", "/wado")
            assert out.startswith(b"HTTP/1.1 %d" % expect), out[:200]
            if expect == 200:
                assert backend.requests[-1]["path"] == "/wado"
            else:
                assert backend.requests == []
                lb.wait_for_log("connect to viewers/secure failed")
    finally:
        backend.stop()


def test_hsts_on_tls_responses(pki: Pki, tmp_path: Path) -> None:
    recorder = Recorder("a")
    port = free_port()
    config = http_config(port, [recorder])
    config["frontends"][0]["tls"] = tls_frontend(pki)
    config["frontends"][0]["hsts"] = {"max_age": "180d", "include_subdomains": True}
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("viewers/a op_state DOWN -> UP")
            with _client(pki, "pacs.example", port) as sock:
                out = _get(sock, "pacs.example")
            assert b"\r\nStrict-Transport-Security: max-age=15552000; includeSubDomains\r\n" in out
    finally:
        recorder.stop()
