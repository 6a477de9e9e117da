"""The external check: argument and environment contract, exit codes, timeouts, no zombies."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from medlb.checks.external import OUTPUT_LIMIT, build_check_env, external_probe
from medlb.checks.probes import ProbeResult

ENV = {"PROXY_NAME": "pacs", "SERVER_NAME": "orthanc1", "SERVER_CURCONN": "3", "SERVER_MAXCONN": "50"}


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def probe(command: str | Path, timeout: float = 5.0, **kwargs: Any) -> Any:
    args: dict[str, Any] = {
        "vip": "10.0.0.10",
        "vport": 104,
        "server_host": "10.0.0.21",
        "server_port": 11112,
        "env": ENV,
        "timeout": timeout,
    }
    args.update(kwargs)
    return external_probe(str(command), **args)


def process_gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: gone from /proc, or a zombie nobody of ours holds."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, within: float = 3.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return process_gone(pid)


def test_argument_and_environment_contract(run: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # /proc/$$/environ is exactly the environment exec() received (the shell adds nothing there).
    path = script(tmp_path, "check.sh", f'printf "%s\\n" "$#" "$@" > {out}.args\ncat /proc/$$/environ > {out}.env\n')
    result = run(probe(path))
    assert result == ProbeResult(True, "exit 0")
    assert (tmp_path / "out.args").read_text().splitlines() == ["4", "10.0.0.10", "104", "10.0.0.21", "11112"]
    env = dict(item.split("=", 1) for item in (tmp_path / "out.env").read_text().split("\0") if item)
    expected = {
        "PROXY_ADDR": "10.0.0.10",
        "PROXY_PORT": "104",
        "PROXY_NAME": "pacs",
        "SERVER_ADDR": "10.0.0.21",
        "SERVER_PORT": "11112",
        "SERVER_NAME": "orthanc1",
        "SERVER_CURCONN": "3",
        "SERVER_MAXCONN": "50",
    }
    want = {"PATH": os.environ["PATH"]}
    for prefix in ("HAPROXY_", "MEDLB_"):
        want.update({prefix + key: value for key, value in expected.items()})
    assert env == want


def test_backend_without_frontend_passes_not_used(run: Any, tmp_path: Path) -> None:
    out = tmp_path / "args"
    path = script(tmp_path, "check.sh", f'printf "%s\\n" "$@" > {out}\n')
    assert run(probe(path, vip="", vport=0)).ok
    assert out.read_text().splitlines() == ["NOT_USED", "NOT_USED", "10.0.0.21", "11112"]


def test_build_env_prefixes_and_overrides() -> None:
    env = build_check_env(
        vip="1.2.3.4",
        vport=80,
        server_host="5.6.7.8",
        server_port=8080,
        env={"HAPROXY_SERVER_NAME": "a", "MEDLB_PROXY_NAME": "b", "SERVER_ADDR": "spoofed", "PATH": "/opt/bin"},
    )
    assert env["PATH"] == "/opt/bin"
    assert env["HAPROXY_SERVER_NAME"] == env["MEDLB_SERVER_NAME"] == "a"
    assert env["HAPROXY_PROXY_NAME"] == env["MEDLB_PROXY_NAME"] == "b"
    assert env["HAPROXY_SERVER_ADDR"] == "5.6.7.8"  # the arguments win
    assert env["MEDLB_SERVER_CURCONN"] == "0"
    assert len(env) == 17


@pytest.mark.parametrize(
    ("body", "ok", "text"),
    [
        ("exit 0\n", True, "exit 0"),
        ("echo all good; exit 0\n", True, "exit 0: all good"),
        ("echo; echo '  disk full  ' >&2; echo more; exit 1\n", False, "exit 1: disk full"),
        ("exit 3\n", False, "exit 3"),
        ("kill -TERM $$\n", False, "killed by signal 15"),
    ],
)
def test_exit_status(run: Any, tmp_path: Path, body: str, ok: bool, text: str) -> None:
    assert run(probe(script(tmp_path, "check.sh", body))) == ProbeResult(ok, text)


def test_missing_script(run: Any, tmp_path: Path) -> None:
    missing = tmp_path / "nope.sh"
    assert run(probe(missing)) == ProbeResult(False, f"check script not found: {missing}")


def test_not_executable_script(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "check.sh"
    path.write_text("#!/bin/sh\nexit 0\n")
    result = run(probe(path))
    assert result == ProbeResult(False, f"check script not found: {path} (not executable)")


def test_bare_name_is_looked_up_in_path(run: Any, tmp_path: Path) -> None:
    script(tmp_path, "my-check", "exit 0\n")
    env = dict(ENV, PATH=str(tmp_path))
    assert run(probe("my-check", env=env)) == ProbeResult(True, "exit 0")
    assert run(probe("other-check", env=env)) == ProbeResult(False, "check script not found: other-check (not in PATH)")


def test_script_without_interpreter_line(run: Any, tmp_path: Path) -> None:
    path = tmp_path / "check.bin"
    path.write_bytes(b"\x00\x01garbage")
    path.chmod(0o755)
    result = run(probe(path))
    assert not result.ok
    # asyncio reports ENOEXEC; uvloop (libuv's execvp) retries with /bin/sh, which fails with 127.
    assert result.text.startswith(("cannot run check script: exec format error", "exit 127"))


def test_hanging_script_and_its_grandchild_are_killed(run: Any, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "hang.sh", f"sleep 30 &\necho $$ $! > {pids}\necho started\nsleep 30\n")

    async def main() -> tuple[ProbeResult, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await probe(path, timeout=2.0)  # bash has time to start on a busy machine
        return result, loop.time() - start

    result, elapsed = run(main())
    assert result == ProbeResult(False, "timeout after 2s, killed: started")
    assert elapsed < 4.0
    script_pid, grandchild_pid = map(int, pids.read_text().split())
    # The script was reaped by us: not even a zombie is left.
    assert not os.path.exists(f"/proc/{script_pid}")
    assert wait_gone(grandchild_pid)


def test_background_process_holding_the_pipe_does_not_stall_the_check(run: Any, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "daemon.sh", f"sleep 30 &\necho $! > {pids}\necho ok\nexit 0\n")

    async def main() -> tuple[ProbeResult, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await probe(path, timeout=5.0)
        return result, loop.time() - start

    result, elapsed = run(main())
    assert result == ProbeResult(True, "exit 0: ok")
    assert elapsed < 2.0
    assert wait_gone(int(pids.read_text()), within=10.0)


def test_chatty_script_does_not_hang(run: Any, tmp_path: Path) -> None:
    # 8 MB on stdout and 8 MB on stderr: far beyond any pipe buffer.
    path = script(
        tmp_path, "chatty.sh", "head -c 8000000 /dev/zero | tr '\\0' 'a'\nyes err | head -c 8000000 >&2\nexit 0\n"
    )

    async def main() -> tuple[ProbeResult, float]:
        loop = asyncio.get_running_loop()
        start = loop.time()
        result = await probe(path, timeout=10.0)
        return result, loop.time() - start

    result, elapsed = run(main())
    assert result.ok, result
    assert result.text.startswith("exit 0: aaaa")
    assert len(result.text) <= 220
    assert elapsed < 5.0
    assert OUTPUT_LIMIT == 4096


def test_cancellation_kills_the_script(run: Any, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    path = script(tmp_path, "hang.sh", f"echo $$ > {pids}\nsleep 30\n")

    async def main() -> None:
        task = asyncio.create_task(probe(path, timeout=20.0))
        for _ in range(1000):  # up to 10 s: a loaded CI machine can be slow to start bash
            await asyncio.sleep(0.01)
            if pids.exists() and pids.read_text().strip():
                break
        assert pids.exists() and pids.read_text().strip(), "the script never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())
    assert wait_gone(int(pids.read_text()), within=10.0)
