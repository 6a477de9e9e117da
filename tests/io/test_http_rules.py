"""Routing rules end to end: host/path routing to two backends, rewrites, header edits, redirects, HSTS."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from tests.helpers import free_port, running_medlb
from tests.io.test_http import Recorder, http_config


def test_rules_route_rewrite_edit_and_redirect(tmp_path: Path) -> None:
    viewer, archive = Recorder("viewer"), Recorder("archive")
    port = free_port()
    config = http_config(port, [viewer])
    config["backends"].append(
        {
            "name": "archive",
            "check": {"type": "tcp"},
            "servers": [{"name": "archive", "address": f"127.0.0.1:{archive.port}"}],
        }
    )
    config["frontends"][0].update(
        {
            "rules": [
                {
                    "if": {"path_prefix": ["/legacy"]},
                    "redirect": {"location": "http://{host}/dicom-web{query}", "code": 308},
                },
                {
                    "if": {"path_prefix": ["/dicom-web"]},
                    "use_backend": "archive",
                    "path": {"strip_prefix": "/dicom-web", "add_prefix": "/orthanc/dicom-web"},
                    "request_headers": {"set": {"X-Route": "archive"}},
                },
            ],
            "request_headers": {"delete": ["X-Debug"]},
            "response_headers": {"delete": ["Server"], "add": {"X-Content-Type-Options": "nosniff"}},
        }
    )
    try:
        with running_medlb(config, tmp_path) as lb:
            lb.wait_for_log("archive/archive op_state DOWN -> UP")
            lb.wait_for_log("viewers/viewer op_state DOWN -> UP")
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/dicom-web/studies?PatientID=7", headers={"X-Debug": "1", "X-Route": "forged"})
            response = conn.getresponse()
            assert json.loads(response.read())["server"] == "archive"
            assert response.headers["Server"] is None and response.headers["X-Content-Type-Options"] == "nosniff"
            record = archive.requests[-1]
            assert record["path"] == "/orthanc/dicom-web/studies?PatientID=7"
            headers = {k.lower(): v for k, v in record["headers"]}
            assert headers["x-route"] == "archive" and "x-debug" not in headers
            conn.request("GET", "/index.html")
            assert json.loads(conn.getresponse().read())["server"] == "viewer"  # the default backend
            conn.request("GET", "/legacy/studies?x=1")
            response = conn.getresponse()
            assert response.status == 308 and response.headers["Location"] == f"http://127.0.0.1:{port}/dicom-web?x=1"
            response.read()
            conn.request("GET", "/index.html")  # the connection is still usable after the redirect
            assert conn.getresponse().status == 200
            conn.close()
            lb.wait_for_log("status=308 redirect=")
    finally:
        viewer.stop()
        archive.stop()
