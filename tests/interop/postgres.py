"""A private PostgreSQL cluster for interop tests: ``initdb`` into a fresh temporary directory,
``pg_ctl start`` on a free loopback port, a role and a database for Orthanc; stopped and removed
on exit, whatever happened in between. Never the Debian ``postgresql`` service, which stays
stopped.

    with private_postgres() as pg:
        orthanc_cluster(tmp, 2, postgres=pg)  # tests/interop/orthanc.py

PostgreSQL refuses to run as root: when the tests run as root, ``initdb`` and ``pg_ctl`` run as
the ``postgres`` OS user (``runuser``) and the cluster lives in its own directory under the
system temporary directory, owned by ``postgres`` (pytest's own tmp tree is private to root).
Clients (``psql``, Orthanc) connect over TCP to 127.0.0.1 with ``trust`` authentication.
The cluster trades durability for speed (``fsync=off``): it is thrown away after the tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import free_port

INSTALL_HINT = (
    "`make test` installs it (scripts/install-deps.sh, Debian package postgresql; the system service "
    "is not used and can stay stopped); by hand: apt-get install postgresql && service postgresql stop"
)
PG_BIN_GLOBS = ("/usr/lib/postgresql/*/bin", "/usr/pgsql-*/bin", "/usr/local/pgsql/bin")
OS_USER = "postgres"


def postgres_bindir() -> Path:
    """The directory holding ``initdb``, ``pg_ctl`` and ``psql`` (newest version first); fails the test when absent."""

    def version(path: str) -> tuple[int, ...]:
        digits = "".join(c if c.isdigit() else " " for c in path).split()
        return tuple(int(d) for d in digits)

    candidates = sorted((d for pattern in PG_BIN_GLOBS for d in glob.glob(pattern)), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory) / tool, os.X_OK) for tool in ("initdb", "pg_ctl", "psql")):
            return Path(directory)
    pytest.fail(f"PostgreSQL (initdb, pg_ctl, psql) is not installed: {INSTALL_HINT}")


@dataclass
class PostgresServer:
    """A running private cluster: where it is and how to reach it."""

    bindir: Path
    directory: Path  # owns data/, sock/ and postgres.log
    port: int
    host: str = "127.0.0.1"
    database: str = "orthanc"
    user: str = "orthanc"
    password: str = "orthanc"

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def socket_dir(self) -> Path:
        return self.directory / "sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "postgres.log"

    @property
    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def psql(self, sql: str, *, database: str = "postgres", user: str = "postgres") -> str:
        """Run ``sql`` with ``psql`` over TCP (stops at the first error); return its output."""
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
             "-h", self.host, "-p", str(self.port), "-U", user, "-d", database, "-c", sql],
            capture_output=True,
            text=True,
            timeout=30,
            env=dict(os.environ, PGCONNECT_TIMEOUT="5"),
        )  # fmt: skip
        if result.returncode != 0:
            raise AssertionError(f"psql {sql!r} failed ({result.returncode}): {result.stderr}\n{self.log[-3000:]}")
        return result.stdout


def _as_postgres(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` OS user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return argv
    for runner in (shutil.which("runuser"), "/usr/sbin/runuser", "/sbin/runuser"):
        if runner and os.access(runner, os.X_OK):
            return [runner, "-u", OS_USER, "--", *argv]
    return ["su", OS_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]


def _run(argv: list[str], what: str, server: PostgresServer, timeout: float = 60) -> None:
    result = subprocess.run(
        _as_postgres(argv), capture_output=True, text=True, timeout=timeout, cwd=server.directory, env=dict(os.environ)
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({result.returncode}): {result.stdout}\n{result.stderr}\n{server.log[-3000:]}"
        )


def _postmaster_pid(data: Path) -> int | None:
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _stop(server: PostgresServer) -> None:
    """``pg_ctl stop -m fast``, then ``immediate``, then SIGKILL of the postmaster: never leave it running."""
    pg_ctl = str(server.bindir / "pg_ctl")
    for mode in ("fast", "immediate"):
        if _postmaster_pid(server.data) is None:
            return
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            _run([pg_ctl, "-D", str(server.data), "-m", mode, "-w", "-t", "15", "stop"], "pg_ctl stop", server, 20)
            return
    pid = _postmaster_pid(server.data)
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)  # pg_ctl starts the postmaster as a session leader
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def private_postgres(
    database: str = "orthanc", user: str = "orthanc", password: str = "orthanc"
) -> Iterator[PostgresServer]:
    """Start a throwaway PostgreSQL cluster with ``database`` owned by the login role ``user``.

    Fails the test (never skips) when PostgreSQL is missing or does not start, with its log.
    """
    bindir = postgres_bindir()
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam(OS_USER)
        except KeyError:
            pytest.fail(f"PostgreSQL refuses to run as root and there is no {OS_USER!r} OS user: {INSTALL_HINT}")
    directory = Path(tempfile.mkdtemp(prefix="medlb-pg-"))  # /tmp/medlb-pg-XXXX: short enough for a socket path
    server = PostgresServer(bindir, directory, free_port(), database=database, user=user, password=password)
    started = False
    try:
        server.socket_dir.mkdir()
        if os.geteuid() == 0:
            for path in (directory, server.socket_dir):
                os.chown(path, account.pw_uid, account.pw_gid)
        _run(
            [str(bindir / "initdb"), "-D", str(server.data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--locale=C", "--no-sync"],
            "initdb",
            server,
        )  # fmt: skip
        options = (
            f"-p {server.port} -k {server.socket_dir} -c listen_addresses={server.host} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=100"
        )
        started = True
        _run(
            [str(bindir / "pg_ctl"), "-D", str(server.data), "-o", options, "-l", str(server.log_path), "-w",
             "-t", "30", "start"],
            "pg_ctl start",
            server,
        )  # fmt: skip
        server.psql(f"CREATE ROLE {user} LOGIN PASSWORD '{password}'")
        server.psql(f"CREATE DATABASE {database} OWNER {user}")
        yield server
    finally:
        try:
            if started:
                _stop(server)
        finally:
            shutil.rmtree(directory, ignore_errors=True)
