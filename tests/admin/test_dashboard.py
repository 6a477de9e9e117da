"""The live dashboard end to end, in a real headless Chromium driven by Playwright.

A real ``medlb run`` with an admin section fronts two backends: ``pacs`` with
two echo servers that come UP, and ``ris`` whose only server is a closed port
(so it has no UP server and the page must show the red banner). The test logs
in through the form, sees the servers, drains one through the page's buttons
and confirmation dialog, checks the change through the API with the bearer
token, and keeps a screenshot in ``tests/artifacts/dashboard.png``.

Chromium is Debian's ``/usr/bin/chromium`` (Playwright's own browser downloads
are not used). A missing browser fails the test: it is never skipped.
"""

from __future__ import annotations

import re
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright

from tests.helpers import TOKEN, Backend, api, free_port, running_medlb, server_of, tcp_config, wait_until, with_admin

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
SCREENSHOT = ARTIFACTS / "dashboard.png"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Network errors Chromium logs for answers the page expects: the session probe
#: before login and the wrong-token login both answer 401 by contract.
EXPECTED_401 = ("/api/v1/session", "/api/v1/login")

expect.set_options(timeout=10_000)


class Site:
    """The running medlb: its admin base URL and the pacs frontend's port."""

    def __init__(self, url: str, frontend_port: int) -> None:
        self.url = url
        self.frontend_port = frontend_port


def _status(url: str) -> dict[str, Any]:
    code, doc = api(url + "/api/v1/status")
    assert code == 200, doc
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="medlb-dashboard-")))
        s1, s2 = Backend("s1"), Backend("s2")
        stack.callback(s1.stop)
        stack.callback(s2.stop)
        pacs_port, ris_port, closed_port = free_port(), free_port(), free_port()
        config = tcp_config(
            pacs_port,
            [
                {"name": "s1", "address": f"127.0.0.1:{s1.port}"},
                {"name": "s2", "address": f"127.0.0.1:{s2.port}"},
            ],
            name="pacs",
        )
        config["frontends"][0].update(name="pacs", default_backend="pacs")
        config["frontends"].append({"name": "ris", "bind": [f"127.0.0.1:{ris_port}"], "default_backend": "ris"})
        config["backends"].append(
            {
                "name": "ris",
                "balance": "roundrobin",
                "check": {"type": "tcp"},
                "servers": [{"name": "r1", "address": f"127.0.0.1:{closed_port}"}],
            }
        )
        # mode: dicom and mode: hl7, each with one real peer, so the page shows protocol counters.
        archive = _archive(stack)
        receiver = _hl7_receiver(stack)
        dicom_port, hl7_port = free_port(), free_port()
        config["frontends"] += [
            {"name": "modalities", "mode": "dicom", "bind": [f"127.0.0.1:{dicom_port}"], "default_backend": "archive"},
            {"name": "orders", "mode": "hl7", "bind": [f"127.0.0.1:{hl7_port}"], "default_backend": "results"},
        ]
        config["backends"] += [
            {
                "name": "archive",
                "check": {"type": "dicom-echo"},
                "servers": [{"name": "a1", "address": f"127.0.0.1:{archive}", "ae_title": "ARCHIVE"}],
            },
            {
                "name": "results",
                "check": {"type": "hl7"},
                "servers": [{"name": "h1", "address": f"127.0.0.1:{receiver}"}],
            },
        ]
        url = with_admin(config, tmp)
        lb = stack.enter_context(running_medlb(config, tmp))
        lb.wait_for_log("admin API and dashboard on")
        lb.wait_for_log("pacs/s1 op_state DOWN -> UP")
        lb.wait_for_log("pacs/s2 op_state DOWN -> UP")
        wait_until(lambda: _status(url)["backends"][0]["usable_servers"] == 2)
        lb.wait_for_log("archive/a1 op_state DOWN -> UP")
        lb.wait_for_log("results/h1 op_state DOWN -> UP")
        _echo(dicom_port)
        _hl7_message(hl7_port)
        # Three open sessions, one of them with steady traffic, so the page has live numbers.
        socks = [stack.enter_context(socket.create_connection(("127.0.0.1", pacs_port), timeout=5)) for _ in range(3)]
        for sock in socks:
            sock.recv(64)
        stop = threading.Event()
        pump = threading.Thread(target=_pump, args=(socks[0], stop), daemon=True)
        pump.start()
        stack.callback(pump.join, 5)
        stack.callback(stop.set)
        yield Site(url, pacs_port)


def _archive(stack: ExitStack) -> int:
    """A pynetdicom Verification SCP called ARCHIVE; returns its port."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="ARCHIVE")
    ae.add_supported_context(Verification)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    stack.callback(server.shutdown)
    return port


def _echo(port: int) -> None:
    """One C-ECHO association through medlb's mode: dicom frontend."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="WORKSTATION")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="ARCHIVE")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assoc.release()


def _hl7_receiver(stack: ExitStack) -> int:
    """An MLLP receiver (medlb's own codec, in a thread) that answers AA; returns its port."""
    from medlb.proto import hl7, mllp

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stack.callback(listener.close)

    def serve(conn: socket.socket) -> None:
        framer = mllp.MllpFramer()
        with conn:
            while data := conn.recv(65536):
                for payload in framer.feed(data):
                    ack = hl7.make_ack(hl7.parse_header(payload), "AA", timestamp="20261122120000")
                    conn.sendall(mllp.frame(ack))

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return int(listener.getsockname()[1])


def _hl7_message(port: int) -> None:
    """One ADT^A01 through medlb's mode: hl7 frontend, acknowledged AA."""
    from medlb.proto import mllp

    payload = b"MSH|^~\\&|HIS|H|RIS|H|20261122||ADT^A01|DASH1|P|2.5\rPID|1||P1^^^H\r"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(mllp.frame(payload))
        answer = b""
        while not answer.endswith(b"\x1c\r"):
            chunk = sock.recv(4096)
            assert chunk, "no ACK"
            answer += chunk
    assert b"MSA|AA|DASH1" in answer, answer


def _pump(sock: socket.socket, stop: threading.Event) -> None:
    """Echo 32 KiB through medlb ten times a second until ``stop`` (or 60 s at most)."""
    chunk = b"x" * 32_768
    deadline = time.monotonic() + 60
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            sock.sendall(chunk)
            got = 0
            while got < len(chunk):
                data = sock.recv(65_536)
                if not data:
                    return
                got += len(data)
            stop.wait(0.1)
    except OSError:
        return


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    # No skip: CI installs Debian's chromium, and a dashboard test that silently
    # does not run would hide a broken page.
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install chromium"
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


class Console:
    """Errors the page reports: console errors and uncaught exceptions."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        if msg.type != "error":
            return
        url = msg.location.get("url", "")
        if "status of 401" in msg.text and url.endswith(EXPECTED_401):
            return
        self.errors.append(f"{msg.text} ({url})")


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1440, "height": 1000}, locale="en-GB", timezone_id="UTC")
    context.set_default_timeout(10_000)
    try:
        yield context.new_page()
    finally:
        context.close()


def test_wrong_token_shows_an_error_and_no_data(site: Site, page: Page) -> None:
    console = Console(page)
    page.goto(site.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#login-token")).to_have_attribute("type", "password")

    page.fill("#login-token", "not-the-admin-token")
    page.click("#login-submit")
    expect(page.locator("#login-error")).to_have_text("Invalid token.")
    expect(page.locator("#login-form")).to_be_visible()
    expect(page.locator("#dashboard")).to_be_hidden()
    assert page.locator("[data-server]").count() == 0
    assert page.locator("[data-backend]").count() == 0
    assert "pacs" not in page.locator("body").inner_text()
    assert not [c for c in page.context.cookies() if c["name"] == "medlb_session"]
    assert console.errors == []


def test_login_see_servers_drain_and_screenshot(site: Site, page: Page) -> None:
    console = Console(page)
    page.goto(site.url + "/")
    expect(page.locator("#login-form")).to_be_visible()
    page.fill("#login-token", TOKEN)
    page.click("#login-submit")

    # Both pacs servers UP and ready; the session cookie is HttpOnly and SameSite=Strict.
    s1 = page.locator('tr[data-server="pacs/s1"]')
    s2 = page.locator('tr[data-server="pacs/s2"]')
    expect(s1).to_have_attribute("data-state", "UP/ready")
    expect(s2).to_have_attribute("data-state", "UP/ready")
    expect(s1.locator(".pill")).to_have_text("UP")
    expect(page.locator("#login-form")).to_be_hidden()
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "medlb_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert "medlb_session" not in page.evaluate("document.cookie")

    # Live numbers: the three open sessions and the last check of each server.
    facts = page.locator('[data-backend="pacs"] .facts')
    expect(facts.locator('[data-fact="sessions"]')).to_have_text("3")
    expect(facts.locator('[data-fact="bytes-in"]')).to_have_text(re.compile(r"^[\d.]+ kB/s$"))
    expect(facts.locator('[data-fact="bytes-out"]')).to_have_text(re.compile(r"^[\d.]+ kB/s$"))
    expect(s1.locator(".check")).to_have_attribute("data-ok", "true")
    expect(s1.locator(".check-age")).to_have_text(re.compile(r"(just now|\d+ s ago) · [\d.]+ ms"))
    expect(page.locator('tr[data-frontend="pacs"]')).to_be_visible()

    # The backend with no UP server gets the red banner; the healthy one does not.
    expect(page.locator('tr[data-server="ris/r1"]')).to_have_attribute("data-op-state", "DOWN")
    banner = page.locator('.banner[data-banner-backend="ris"]')
    expect(banner).to_have_text("Backend ris has no UP server")
    expect(banner).to_have_attribute("role", "alert")
    assert page.locator('.banner[data-banner-backend="pacs"]').count() == 0

    # Protocol counters under each server's throughput: DIMSE for mode dicom, messages/ACKs for hl7.
    expect(page.locator('tr[data-server="archive/a1"] .dimse')).to_have_text("C-ECHO 1 · ok 1 · fail 0")
    expect(page.locator('tr[data-server="results/h1"] .dimse')).to_have_text("ADT^A01 1 · AA 1")
    expect(page.locator('tr[data-server="pacs/s1"] .dimse')).to_have_text("")

    # Cancelling the confirmation changes nothing.
    s2.locator('button[data-action="maint"]').click()
    dialog = page.locator("#confirm-dialog")
    expect(dialog).to_be_visible()
    dialog.locator('button[data-confirm="cancel"]').click()
    expect(dialog).to_be_hidden()
    assert server_of(_status(site.url), "pacs/s2")["admin_state"] == "ready"

    # Drain s1 through the page: button, confirmation, then the row turns amber.
    s1.locator('button[data-action="drain"]').click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("pacs/s1")
    dialog.locator('button[data-confirm="ok"]').click()
    expect(s1).to_have_attribute("data-admin-state", "drain")
    expect(s1).to_have_attribute("data-tone", "drain")
    expect(s1.locator(".pill")).to_have_text("DRAIN")
    expect(s1.locator('button[data-action="drain"]')).to_be_disabled()
    expect(s1.locator('button[data-action="ready"]')).to_be_enabled()
    expect(s2).to_have_attribute("data-state", "UP/ready")

    # The change is real: the API (bearer token) says so too.
    status = _status(site.url)
    assert server_of(status, "pacs/s1")["admin_state"] == "drain"
    assert server_of(status, "pacs/s2")["admin_state"] == "ready"

    # Charts are drawn by uPlot (sessions and throughput per backend, sparklines per server).
    expect(page.locator('[data-backend="pacs"] .chart-box .uplot')).to_have_count(2)
    expect(page.locator('tr[data-server="pacs/s1"] .spark .uplot')).to_have_count(1)

    # Let one more status poll land so the screenshot shows a settled page.
    before = page.locator("#live-text").inner_text()
    deadline = time.monotonic() + 5
    while page.locator("#live-text").inner_text() == before and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    expect(page.locator("#live")).to_have_attribute("data-live", "ok")
    expect(page.locator(".toast")).to_have_count(0)  # the "is draining" notice fades after a few seconds
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    assert SCREENSHOT.stat().st_size > 10_000

    # Logging out hides every number and shows the form again.
    page.click("#logout")
    expect(page.locator("#login-form")).to_be_visible()
    assert page.locator("[data-server]").count() == 0
    assert console.errors == []
