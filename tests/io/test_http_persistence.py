"""Persistence in ``mode: http``, end to end: cookie insert, source, header; DRAIN keeps
honouring it; a DOWN server's clients are re-pinned."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from medlb.model.persistence import cookie_value
from tests.helpers import api, free_port, running_medlb, with_admin
from tests.io.test_http import Recorder, http_config


@pytest.fixture
def servers() -> Iterator[list[Recorder]]:
    recorders = [Recorder("a"), Recorder("b"), Recorder("c")]
    yield recorders
    for r in recorders:
        try:
            r.stop()
        except OSError:
            pass


def request(port: int, headers: dict[str, str] | None = None) -> tuple[str, str | None]:
    """One request on a fresh connection: (server name, Set-Cookie)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/viewer", headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200
        return json.loads(response.read())["server"], response.headers.get("Set-Cookie")
    finally:
        conn.close()


def all_up(lb: Any) -> None:
    """Checks start together but finish in any order: wait for every server, not just the last named."""
    for name in ("a", "b", "c"):
        lb.wait_for_log(f"viewers/{name} op_state DOWN -> UP")


def start(
    tmp_path: Path, servers: list[Recorder], persistence: dict[str, Any], admin: bool = False
) -> tuple[Any, int, str]:
    port = free_port()
    config = http_config(port, servers)
    config["backends"][0]["persistence"] = persistence
    url = with_admin(config, tmp_path) if admin else ""
    return config, port, url


def test_cookie_insert_pins_a_client_and_stays_out_of_the_servers_way(tmp_path: Path, servers: list[Recorder]) -> None:
    config, port, _ = start(tmp_path, servers, {"type": "cookie"})
    with running_medlb(config, tmp_path) as lb:
        all_up(lb)
        first, set_cookie = request(port)
        assert set_cookie is not None
        name, _, rest = set_cookie.partition("=")
        value = rest.split(";")[0]
        assert name == "MEDLBSRV" and value == cookie_value("viewers", first)
        assert "HttpOnly" in set_cookie and "SameSite=Lax" in set_cookie and "Path=/" in set_cookie
        assert "Secure" not in set_cookie  # plain HTTP
        for _ in range(6):
            server, again = request(port, {"Cookie": f"theme=dark; MEDLBSRV={value}"})
            assert server == first and again is None  # pinned; no new cookie needed
        cookies = [v for s in servers for r in s.requests for k, v in r["headers"] if k.lower() == "cookie"]
        assert cookies == ["theme=dark"] * 6  # medlb's own cookie is removed (insert indirect)
        # Without the cookie, round robin goes on.
        assert len({request(port)[0] for _ in range(3)}) == 3


def test_drain_honours_pins_and_down_re_pins(tmp_path: Path, servers: list[Recorder]) -> None:
    config, port, url = start(tmp_path, servers, {"type": "cookie"}, admin=True)
    with running_medlb(config, tmp_path) as lb:
        all_up(lb)
        pinned, set_cookie = request(port)
        assert set_cookie is not None
        cookie = {"Cookie": set_cookie.split(";")[0]}
        code, _ = api(f"{url}/api/v1/backends/viewers/servers/{pinned}", "PATCH", {"admin_state": "drain"})
        assert code == 200
        assert all(request(port, cookie)[0] == pinned for _ in range(3))  # DRAIN keeps its clients
        assert pinned not in {request(port)[0] for _ in range(4)}  # and takes no new ones
        # The pinned server dies: its client lands elsewhere and is re-pinned there.
        next(s for s in servers if s.name == pinned).stop()
        lb.wait_for_log(f"viewers/{pinned} op_state UP -> DOWN")
        moved, new_cookie = request(port, cookie)
        assert moved != pinned and new_cookie is not None
        assert new_cookie.split(";")[0] == f"MEDLBSRV={cookie_value('viewers', moved)}"
        assert request(port, {"Cookie": new_cookie.split(";")[0]})[0] == moved


def test_a_second_medlb_node_honours_the_first_ones_cookie(tmp_path: Path, servers: list[Recorder]) -> None:
    config, port, _ = start(tmp_path, servers, {"type": "cookie"})
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with running_medlb(config, tmp_path / "one") as lb:
        all_up(lb)
        pinned, set_cookie = request(port)
    assert set_cookie is not None
    port2 = free_port()
    config["frontends"][0]["bind"] = [f"127.0.0.1:{port2}"]
    with running_medlb(config, tmp_path / "two") as lb2:
        all_up(lb2)
        assert {request(port2, {"Cookie": set_cookie.split(";")[0]})[0] for _ in range(4)} == {pinned}


def test_source_persistence(tmp_path: Path, servers: list[Recorder]) -> None:
    config, port, _ = start(tmp_path, servers, {"type": "source", "timeout": "10m"})
    with running_medlb(config, tmp_path) as lb:
        all_up(lb)
        assert len({request(port)[0] for _ in range(6)}) == 1  # every connection from 127.0.0.1


def test_header_persistence(tmp_path: Path, servers: list[Recorder]) -> None:
    config, port, _ = start(tmp_path, servers, {"type": "header", "header": "X-Study-UID"})
    with running_medlb(config, tmp_path) as lb:
        all_up(lb)
        study_a = {request(port, {"X-Study-UID": "1.2.3"})[0] for _ in range(4)}
        study_b = {request(port, {"X-Study-UID": "1.2.4"})[0] for _ in range(4)}
        assert len(study_a) == 1 and len(study_b) == 1
        assert len({request(port)[0] for _ in range(3)}) == 3  # no header: balanced
