"""``medlb ctl`` against a real medlb: every command, and the exit codes scripts rely on."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from medlb.ctl import (
    EXIT_AUTH,
    EXIT_INVALID_CONFIG,
    EXIT_NOT_FOUND,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_TIMEOUT,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    human_bytes,
    status_table,
)
from tests.helpers import (
    TOKEN,
    Backend,
    Medlb,
    admin_medlb,
    api,
    free_port,
    greet,
    server_of,
)


@dataclass
class Ctl:
    lb: Medlb
    url: str
    port: int
    tmp: Path

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """Run ``medlb ctl -c <config> ARGS``: address and token come from the config file."""
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("MEDLB_")}
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, "-m", "medlb", "ctl", "-c", str(self.lb.config_path), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )

    def server(self, key: str) -> dict[str, object]:
        return server_of(api(self.url + "/api/v1/status")[1], key)


@pytest.fixture
def ctl(tmp_path: Path) -> Iterator[Ctl]:
    with admin_medlb(tmp_path) as env:
        yield Ctl(env.lb, env.url, env.port, tmp_path)


def test_status_prints_a_table(ctl: Ctl) -> None:
    greet(ctl.port)
    result = ctl("status")
    assert result.returncode == EXIT_OK, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"frontend fe (tcp 127.0.0.1:{ctl.port}) -> pool: 0 session(s), 1 total")
    assert any(line.startswith("backend pool (roundrobin)") for line in lines)
    rows = [line for line in lines if line.startswith("pool/")]
    assert len(rows) == 2
    assert rows[0].split()[:3] == ["pool/s1", "UP", "ready"]
    assert "ok: L4OK" in rows[0]
    as_json = ctl("status", "--json")
    assert yaml.safe_load(as_json.stdout)["backends"][0]["name"] == "pool"


def test_drain_wait_halt_ready_weight(ctl: Ctl) -> None:
    sock = socket.create_connection(("127.0.0.1", ctl.port), timeout=5)
    first = sock.recv(64).decode().strip()
    threading.Timer(0.5, sock.close).start()
    result = ctl("drain", f"pool/{first}", "--wait", "--timeout", "10s", "--reason", "patch Tuesday")
    assert result.returncode == EXIT_OK, result.stderr
    assert f"pool/{first}: admin_state drain" in result.stdout
    assert f"pool/{first}: drained (0 session(s))" in result.stdout
    assert ctl.server(f"pool/{first}")["admin_state"] == "drain"
    ctl.lb.wait_for_log(f"pool/{first} admin_state READY -> DRAIN (operator via token from 127.0.0.1: patch Tuesday)")
    assert ctl("halt", "pool/s2").returncode == EXIT_OK
    assert ctl.server("pool/s2")["admin_state"] == "maint"
    assert ctl("ready", "pool/s2").returncode == EXIT_OK
    assert ctl.server("pool/s2")["admin_state"] == "ready"
    result = ctl("weight", "pool/s2", "7")
    assert result.returncode == EXIT_OK and "weight 7" in result.stdout
    assert ctl.server("pool/s2")["weight"] == 7


def test_drain_wait_times_out_with_exit_5(ctl: Ctl) -> None:
    with socket.create_connection(("127.0.0.1", ctl.port), timeout=5) as sock:
        name = sock.recv(64).decode().strip()
        result = ctl("drain", f"pool/{name}", "--wait", "--timeout", "300ms")
        assert result.returncode == EXIT_TIMEOUT
        assert "still has 1 session(s)" in result.stderr
        result = ctl("halt", f"pool/{name}", "--kill")
        assert result.returncode == EXIT_OK and "closed 1 session(s)" in result.stdout
        with pytest.raises(ConnectionResetError):
            sock.recv(64)


def test_add_and_remove(ctl: Ctl) -> None:
    extra = Backend("s3")
    try:
        result = ctl("add", "pool/s3", f"127.0.0.1:{extra.port}", "--weight", "2")
        assert result.returncode == EXIT_OK, result.stderr
        assert "DOWN until its first check passes" in result.stdout
        ctl.lb.wait_for_log("pool/s3 op_state DOWN -> UP")
        assert ctl("add", "pool/s3", "127.0.0.1:1").returncode == EXIT_REFUSED
        result = ctl("remove", "pool/s3")
        assert result.returncode == EXIT_REFUSED and "put it in maint" in result.stderr
        assert ctl("halt", "pool/s3", "--wait").returncode == EXIT_OK
        result = ctl("remove", "pool/s3")
        assert result.returncode == EXIT_OK, result.stderr
        assert "removed (0 session(s) closed)" in result.stdout
    finally:
        extra.stop()


def test_reload_reports_errors_with_exit_7(ctl: Ctl) -> None:
    assert ctl("reload").returncode == EXIT_OK
    config = yaml.safe_load(ctl.lb.config_path.read_text())
    config["backends"][0]["servers"][0]["weight"] = -4
    ctl.lb.config_path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "medlb",
            "ctl",
            "--url",
            ctl.url,
            "--token-file",
            str(ctl.tmp / "admin.token"),
            "reload",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == EXIT_INVALID_CONFIG
    assert "backends[0].servers[0].weight" in result.stderr


def test_ctl_never_sends_the_token_through_an_http_proxy(ctl: Ctl) -> None:
    dead_proxy = f"http://127.0.0.1:{free_port()}"
    result = ctl("status", env={"http_proxy": dead_proxy, "HTTP_PROXY": dead_proxy, "no_proxy": ""})
    assert result.returncode == EXIT_OK, result.stderr


def test_bad_values_exit_2_before_changing_anything(ctl: Ctl) -> None:
    result = ctl("weight", "pool/s1", "999")
    assert result.returncode == EXIT_USAGE and "weight must be an integer 0..256" in result.stderr
    result = ctl("drain", "pool/s1", "--wait", "--timeout", "5x")
    assert result.returncode == EXIT_USAGE and "--timeout" in result.stderr
    assert ctl.server("pool/s1")["admin_state"] == "ready"
    assert ctl("add", "pool/s9", "127.0.0.1:99999").returncode == EXIT_USAGE


def test_exit_codes_for_not_found_auth_unreachable_and_usage(ctl: Ctl) -> None:
    assert ctl("drain", "pool/nope").returncode == EXIT_NOT_FOUND
    assert ctl("drain", "nope/s1").returncode == EXIT_NOT_FOUND
    assert ctl("drain", "no-slash").returncode == EXIT_USAGE
    wrong = ctl("status", env={"MEDLB_TOKEN": "wrong-token-wrong-token"})
    assert wrong.returncode == EXIT_AUTH and "401" in wrong.stderr
    dead = ctl("status", env={"MEDLB_URL": f"http://127.0.0.1:{free_port()}", "MEDLB_TOKEN": TOKEN})
    assert dead.returncode == EXIT_UNREACHABLE and "cannot reach the admin API" in dead.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "medlb", "ctl", "-c", str(ctl.tmp / "missing.yaml"), "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env={k: v for k, v in os.environ.items() if not k.startswith("MEDLB_")},
    )
    assert missing.returncode == EXIT_USAGE and "cannot read file" in missing.stderr
    assert TOKEN not in wrong.stderr + dead.stderr + missing.stderr


def test_status_table_marks_a_backend_without_usable_servers() -> None:
    doc = {
        "frontends": [],
        "backends": [
            {
                "name": "pacs",
                "balance": "leastconn",
                "up": False,
                "cur_sessions": 0,
                "queue": 0,
                "servers": [
                    {
                        "name": "s1",
                        "backup": True,
                        "op_state": "DOWN",
                        "admin_state": "ready",
                        "weight": 2,
                        "effective_weight": 1.0,
                        "cur_sessions": 0,
                        "total_sessions": 3,
                        "bytes_in": 2048,
                        "bytes_out": 5,
                        "last_check": {"ok": False, "text": "connection refused"},
                        "retired": True,
                    }
                ],
            }
        ],
    }
    table = status_table(doc)
    assert "** NO USABLE SERVER **" in table
    row = table.splitlines()[-1]
    assert row.split()[:4] == ["pacs/s1", "[backup]", "DOWN", "ready"]
    assert "2 (1)" in row and "2.0 KB" in row and "FAIL: connection refused" in row and "(removed)" in row
    assert human_bytes(5) == "5 B" and human_bytes(3 * 1024**3) == "3.0 GB"
