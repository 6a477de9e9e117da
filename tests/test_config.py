"""The configuration contract: the issue's example is accepted as written, and
every kind of mistake is reported with its location, all at once."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from medlb.config import (
    HostPort,
    load_config,
    parse_config,
    parse_duration,
    parse_host_port,
    resolve_agent,
    resolve_backend_value,
    resolve_check,
    resolve_timeouts,
)
from medlb.errors import ConfigError

CONTRACT = """
defaults:
  timeouts: {connect: 3s, client: 12h, server: 12h, queue: 30s, check: 2s}
  check: {inter: 2s, fastinter: 500ms, downinter: 5s, rise: 2, fall: 3}
  retries: 2
  redispatch: true

frontends:
  - name: raw
    mode: tcp
    bind: ["127.0.0.1:7000"]
    maxconn: 10000
    default_backend: pool

backends:
  - name: pool
    balance: leastconn          # roundrobin | leastconn | source | random | first
    check: {type: tcp}
    servers:
      - {name: s1, address: "127.0.0.1:7101"}
      - {name: s2, address: "127.0.0.1:7102", weight: 2, maxconn: 500}
      - {name: s3, address: "127.0.0.1:7103", backup: true}
"""


def contract() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(CONTRACT)
    return raw


def errors_of(raw: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(raw)
    return [str(issue) for issue in info.value.issues]


def test_contract_example_is_accepted_as_written() -> None:
    config = parse_config(contract())
    pool = config.backends[0]
    assert pool.balance == "leastconn"
    assert [s.name for s in pool.servers] == ["s1", "s2", "s3"]
    assert pool.servers[1].weight == 2 and pool.servers[1].maxconn == 500
    assert pool.servers[2].backup is True
    assert config.frontends[0].bind == [HostPort("127.0.0.1", 7000)]
    timeouts = resolve_timeouts(config, pool, config.frontends[0])
    assert (timeouts.connect, timeouts.client, timeouts.queue) == (3.0, 43200.0, 30.0)
    check = resolve_check(config, pool, pool.servers[0])
    assert (check.type, check.inter, check.fastinter, check.downinter, check.rise, check.fall) == (
        "tcp",
        2.0,
        0.5,
        5.0,
        2,
        3,
    )
    assert resolve_backend_value(config, pool, "retries", 99) == 2


def test_inner_levels_override_outer_ones() -> None:
    raw = contract()
    raw["backends"][0]["check"] = {"type": "http", "inter": "10s", "path": "/health"}
    raw["backends"][0]["servers"][0]["check"] = {"inter": "1s", "port": 8080}
    raw["backends"][0]["timeouts"] = {"connect": "1s"}
    raw["backends"][0]["retries"] = 0
    raw["frontends"][0]["timeouts"] = {"client": "1h"}
    config = parse_config(raw)
    pool = config.backends[0]
    s1, s2 = pool.servers[0], pool.servers[1]
    assert resolve_check(config, pool, s1).inter == 1.0 and resolve_check(config, pool, s1).port == 8080
    assert resolve_check(config, pool, s2).inter == 10.0 and resolve_check(config, pool, s2).path == "/health"
    assert resolve_check(config, pool, s2).rise == 2  # from defaults
    timeouts = resolve_timeouts(config, pool, config.frontends[0])
    assert timeouts.connect == 1.0 and timeouts.client == 3600.0 and timeouts.server == 43200.0
    assert resolve_backend_value(config, pool, "retries", 2) == 0


def test_agent_is_enabled_by_a_port() -> None:
    raw = contract()
    raw["backends"][0]["agent"] = {"port": 3333, "inter": "5s"}
    config = parse_config(raw)
    agent = resolve_agent(config, config.backends[0], config.backends[0].servers[0])
    assert agent.enabled and agent.port == 3333 and agent.inter == 5.0
    plain = parse_config(contract())
    assert not resolve_agent(plain, plain.backends[0], plain.backends[0].servers[0]).enabled


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda r: r["backends"][0]["servers"][0].update(address="nope"),
            "backends[0].servers[0].address: expected host:port",
        ),
        (lambda r: r["backends"][0]["servers"][0].update(address="1.2.3.4:70000"), "backends[0].servers[0].address:"),
        (lambda r: r["backends"][0]["servers"][1].update(colour="red"), "backends[0].servers[1].colour: unknown key"),
        (lambda r: r["defaults"]["timeouts"].update(connect="3"), "defaults.timeouts.connect: expected a duration"),
        (
            lambda r: r["defaults"]["timeouts"].update(connect="3 parsecs"),
            "defaults.timeouts.connect: expected a duration",
        ),
        (
            lambda r: r["frontends"][0].update(default_backend="nope"),
            "frontends[0].default_backend: backend 'nope' does not exist",
        ),
        (lambda r: r["backends"][0].update(balance="fastest"), "backends[0].balance:"),
        (
            lambda r: r["backends"][0]["servers"][2].update(name="s1"),
            "backends[0].servers[2].name: duplicate server name 's1'",
        ),
        (lambda r: r["backends"].append(copy.deepcopy(r["backends"][0])), "backends[1].name: duplicate name 'pool'"),
        (lambda r: r["backends"][0]["servers"][0].update(weight=-1), "backends[0].servers[0].weight:"),
        (lambda r: r["backends"][0].update(servers=[]), "backends[0].servers:"),
        (lambda r: r["frontends"][0].update(mode="smtp"), "frontends[0].mode:"),
        (lambda r: r["backends"][0].update(check={"type": "external"}), "backends[0].check.command: required"),
        (lambda r: r.update(frontend=[]), "frontend: unknown key"),
        (lambda r: r.update(admin={}), "admin.token_file: the admin API needs a token"),
        (lambda r: r.update(admin={"token_file": "/t", "token_env": "T"}), "admin.token_env: set token_file or"),
        (lambda r: r.update(admin={"token_env": "T", "bind": "nowhere"}), "admin.bind: expected host:port"),
        (lambda r: r.update(admin={"token_env": "bad name"}), "admin.token_env:"),
        (lambda r: r.update(alerts={"webhook": {"url": "ftp://x"}}), "alerts.webhook.url:"),
        (
            lambda r: r.update(alerts={"email": {"host": "h", "from": "a@b", "to": ["c@d"], "password_env": "P"}}),
            "alerts.email.username: required when a password is set",
        ),
        (
            lambda r: r.update(alerts={"email": {"host": "h", "from": "a@b", "to": ["c@d"], "username": "u"}}),
            "alerts.email.password_file: a username needs",
        ),
        (lambda r: r.update(alerts={"email": {"host": "h", "from": "a@b", "to": []}}), "alerts.email.to:"),
        (lambda r: r.update(alerts={"rate_limit": {"burst": 0}}), "alerts.rate_limit.burst:"),
    ],
)
def test_each_mistake_is_reported_with_its_location(mutate: Any, expected: str) -> None:
    raw = contract()
    mutate(raw)
    errors = errors_of(raw)
    assert any(e.startswith(expected) for e in errors), errors


def test_admin_and_alerts_sections_are_optional_and_have_safe_defaults() -> None:
    config = parse_config({**contract(), "admin": {"token_env": "MEDLB_TOKEN"}})
    assert config.admin is not None
    assert str(config.admin.bind) == "127.0.0.1:9900" and config.admin.metrics_auth is True
    assert config.alerts is None and parse_config(contract()).admin is None


def test_all_errors_are_reported_at_once() -> None:
    raw = contract()
    raw["backends"][0]["servers"][0]["address"] = "nope"
    raw["backends"][0]["servers"][1]["foo"] = 1
    raw["frontends"][0]["default_backend"] = "missing"
    raw["defaults"]["check"]["inter"] = "soon"
    errors = errors_of(raw)
    assert len(errors) == 4, errors


def test_duplicate_bind_is_an_error() -> None:
    raw = contract()
    raw["frontends"].append({"name": "two", "bind": ["127.0.0.1:7000"], "default_backend": "pool"})
    assert any("already bound by frontends[0].bind[0]" in e for e in errors_of(raw))


def test_top_level_must_be_a_mapping() -> None:
    assert errors_of(["a"]) == ["the configuration must be a mapping at the top level"]


def test_load_config_reports_yaml_syntax_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("frontends:\n  - name: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "line" in str(info.value) and "YAML syntax error" in str(info.value)


def test_load_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("12h", 43200.0),
        ("5m", 300.0),
        ("1d", 86400.0),
        ("0", 0.0),
        (0, 0.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["5", 5, "s", "-1s", "1 week", True, None, "1.s"])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("10.0.0.5:104", "10.0.0.5", 104),
        ("[::1]:11112", "::1", 11112),
        ("pacs-1.example.org:2762", "pacs-1.example.org", 2762),
    ],
)
def test_host_port(text: str, host: str, port: int) -> None:
    assert parse_host_port(text) == HostPort(host, port)


@pytest.mark.parametrize("text", ["", ":104", "host", "host:", "host:0", "host:65536", "::1:104", "[zz]:1", "a b:1"])
def test_bad_host_port(text: str) -> None:
    with pytest.raises(ValueError):
        parse_host_port(text)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h"]))
def test_duration_roundtrip_units(value: int, unit: str) -> None:
    factor = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}[unit]
    assert parse_duration(f"{value}{unit}") == pytest.approx(value * factor)
