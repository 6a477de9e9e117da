"""Worker processes for ``global.workers``: more cores for ``mode: http`` and ``mode: tcp``.

One Python process runs one event loop on one core. ``global.workers: N`` starts
N-1 extra processes that bind the ``http`` and ``tcp`` frontends' addresses with
SO_REUSEPORT, so the kernel spreads new connections over N accept queues (the
model of nginx workers and of HAProxy's old ``nbproc``). The main process stays
the only one that

- runs health checks and agents, and so owns every server's op state;
- serves the admin API, the dashboard, ``/metrics`` and alerts;
- reads the config file (SIGHUP, ``medlb ctl reload``);
- serves ``mode: dicom`` and ``mode: hl7`` frontends: HL7 per-patient ordering and the
  duplicate table only hold within one process, and DICOM associations are few and long.

It tells the workers everything they must agree on over a private socketpair:
server op/admin state and weights (at once on every change, and every second to
heal), servers added or removed through the API, ``shutdown-sessions``, reloads
(the validated :class:`~medlb.config.Config` itself, so no worker re-reads a file
that may have changed since) and stop. Each worker reports its counters twice a
second; the main process adds their increments to its own counters and shows the
workers' current sessions as ``peer_sessions``, so the status API, ``/metrics``,
the dashboard and ``drain --wait`` see the whole node.

Messages are pickled dicts behind a 4-byte length. Pickle is safe here: both ends
are the same program, and the socketpair is inherited by the child and reachable by
nobody else.

Every process's current sessions per server are also on a shared memory
:class:`Board`, so a server's ``maxconn`` is the node's and ``leastconn``/``random``
weigh the whole node's load. What is per process, by design (documented in
docs/operations.md): each backend queue (it polls the board for slots other processes
free), a frontend's ``maxconn``, round-robin rotation and HTTP connection pools.
Source hashing and cookie persistence need no shared state.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import mmap
import os
import pickle
import signal
import socket
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medlb.errors import StartupError
from medlb.io.runtime import Runtime
from medlb.model.health import OpState
from medlb.model.server import AdminState, Server

log = logging.getLogger("medlb.workers")

#: Frontend modes the worker processes serve too.
WORKER_MODES = frozenset({"http", "tcp"})
#: Seconds between two counter reports of a worker.
REPORT_INTERVAL = 0.5
#: Seconds between two full state messages (changes are sent at once; this heals a lost one).
HEAL_INTERVAL = 1.0
#: A worker that has not said "ready" this long after its start failed to start.
START_TIMEOUT = 30.0
#: Delay before restarting a worker that died, doubled per failure in a row, up to the maximum.
RESTART_DELAY = 0.5
RESTART_DELAY_MAX = 30.0
#: A worker that lived this long before dying is restarted after RESTART_DELAY again.
STABLE_AFTER = 10.0
#: A ready worker that has sent no report for this long is hung (a stuck event loop keeps its
#: accept queue and strands its share of new connections): it is killed and restarted.
HUNG_AFTER = 10 * REPORT_INTERVAL
#: How long an admin change waits for the workers to confirm they applied it.
SYNC_TIMEOUT = 2.0
#: The most bytes queued towards one worker; beyond it messages are dropped (a worker that
#: reads nothing is hung, and the full state every second heals what a live one missed).
MAX_QUEUED = 64 * 1024 * 1024


#: Linux 5.14+: when a listener of a SO_REUSEPORT group closes, move its queued connections
#: to another listener of the group instead of resetting them.
MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrate_hint(sysctl: Path = MIGRATE_SYSCTL) -> str | None:
    """Why connections queued on a dying worker would be reset, or None when they are moved.

    A worker that dies (or is killed as hung) closes its listeners; by default the kernel
    resets the connections in their accept queues, and those clients must retry. With
    ``net.ipv4.tcp_migrate_req=1`` it hands them to the main process's listener instead.
    medlb does not set it: it is a setting of the whole network namespace, the host's to choose.
    """
    try:
        value = sysctl.read_text().strip()
    except OSError:
        return (
            "this kernel cannot move the connections queued on a worker that dies to another process "
            "(net.ipv4.tcp_migrate_req needs Linux 5.14): they are reset"
        )
    if value == "1":
        return None
    return (
        "net.ipv4.tcp_migrate_req is 0: connections queued on a worker that dies are reset; "
        "'sysctl -w net.ipv4.tcp_migrate_req=1' has the kernel move them to another process"
    )


def _code_fingerprint() -> str:
    """The medlb code on disk as this process loaded it: the sizes and times of its sources.

    A worker started after an upgrade of the files under a running main process would speak
    another version of the channel; the main process sends this and the worker refuses.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        st = path.stat()
        digest.update(f"{path.relative_to(root)}:{st.st_size}:{st.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


#: Computed at import, i.e. when the process started.
CODE = _code_fingerprint()
#: The largest message accepted on the channel (a config with thousands of servers fits).
MAX_MESSAGE = 64 * 1024 * 1024

Msg = dict[str, Any]

#: Counters a worker reports as running totals; the main process adds the increments.
SERVER_COUNTERS = ("total_sessions", "bytes_in", "bytes_out", "connect_errors", "retries", "redispatches")
BACKEND_COUNTERS = ("total_sessions", "connect_errors", "no_server", "queue_full", "queue_timeouts")
FRONTEND_COUNTERS = ("total_sessions",)


# --------------------------------------------------------------------------- the channel


class Channel:
    """Length-prefixed pickled messages over one end of a socketpair."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: socket.socket) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def send(self, msg: Msg) -> None:
        if self.writer.is_closing() or self.writer.transport.get_write_buffer_size() > MAX_QUEUED:
            return
        data = pickle.dumps(msg, pickle.HIGHEST_PROTOCOL)
        self.writer.write(len(data).to_bytes(4, "big") + data)

    async def recv(self) -> Msg | None:
        """The next message, or None once the other end is gone."""
        try:
            size = int.from_bytes(await self.reader.readexactly(4), "big")
            if size > MAX_MESSAGE:
                raise ValueError(f"message of {size} bytes on the worker channel")
            msg: Msg = pickle.loads(await self.reader.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        except Exception as exc:  # a message this code cannot read: the channel is unusable
            log.error("unreadable message on the worker channel (%r): closing it", exc)
            return None
        if not isinstance(msg, dict):
            log.error("unexpected %s on the worker channel: closing it", type(msg).__name__)
            return None
        return msg

    def close(self) -> None:
        self.writer.close()


# --------------------------------------------------------------------------- state (main -> workers)

#: One server's shared state: op state, admin state, who set it, weight, agent percentage,
#: maxconn (an agent may change it), and its resolved address (the main process's checker
#: resolves DNS names; workers run no checks).
ServerState = tuple[str, str, str, int, int, int, Any]


def server_state(runtime: Runtime) -> dict[str, ServerState]:
    """What the workers must agree on about every server, by ``backend/server``."""
    return {
        s.key: (s.op_state.name, s.admin_state.value, s.admin_source, s.weight, s.agent_pct, s.maxconn, s.sockaddr)
        for b in runtime.backends.values()
        for s in b.servers
    }


def apply_state(runtime: Runtime, state: dict[str, ServerState], now: float) -> None:
    """Make a worker's servers match the main process's (changes notify backends as usual)."""
    for backend in runtime.backends.values():
        for server in backend.servers:
            wanted = state.get(server.key)
            if wanted is None:
                continue
            op, admin, source, weight, pct, maxconn, sockaddr = wanted
            if sockaddr is not None:
                server.sockaddr = sockaddr
            server.maxconn = maxconn
            if server.op_state.name != op:
                server.force_op_state(OpState[op], now, "main process")
            if server.admin_state.value != admin:
                server.set_admin_state(AdminState(admin), now, source)
            server.set_weight(weight, "main process")
            server.set_agent_pct(pct)


# --------------------------------------------------------------------------- shared session counts

#: Server keys the board has a row for (one each, kept for the main process's lifetime).
BOARD_SLOTS = 4096
#: Seconds between two looks at the queues. A slot another process frees is not announced,
#: so this process's queue learns of it at the next look (unless a new session there, or
#: in another process, has taken it first).
QUEUE_POLL = 0.02


class Cell:
    """One server's row of the board, written in one process's column (a SharedCount)."""

    __slots__ = ("_end", "_own", "_start", "_view")

    def __init__(self, view: memoryview, slot: int, column: int, columns: int) -> None:
        self._view = view
        self._start = slot * columns
        self._end = self._start + columns
        self._own = self._start + column

    def add(self, n: int) -> None:
        self._view[self._own] += n

    def total(self) -> int:
        return sum(self._view[self._start : self._end])


class Board:
    """Every process's current sessions per server, in one shared memory block.

    So that ``maxconn`` is the node's limit, not each process's: a PACS that takes 20
    associations must not get 20 per process. A row per server key, a column per
    process; each process writes only its own column (plain int32 stores, no lock), and
    every process reads the row's sum when it checks the limit. Two processes that admit
    a session in the same instant against the last free slot can pass ``maxconn`` by
    ``workers - 1`` for that instant (docs/operations.md names two rarer moments when a
    process counts only its own). The main process zeroes the column of a process that
    died, once it has exited (its sessions died with it).

    A memfd mapped by every process: the workers inherit its descriptor at start.
    """

    def __init__(self, fd: int, columns: int) -> None:
        self.fd = fd
        self.columns = columns
        self._map = mmap.mmap(fd, BOARD_SLOTS * columns * 4)
        self.view = memoryview(self._map).cast("i")
        #: Main process: the row of each server key, handed out in order and never reused.
        self.slots: dict[str, int] = {}
        self._cells: dict[tuple[int, int], Cell] = {}
        self._warned = False

    @classmethod
    def create(cls, workers: int) -> Board:
        """The main process's board: a column for each process, and three times as many
        again for workers replaced after failed reloads, which keep theirs while they drain
        (a column is 16 KiB)."""
        columns = 4 * workers
        fd = os.memfd_create("medlb-sessions")
        os.ftruncate(fd, BOARD_SLOTS * columns * 4)
        return cls(fd, columns)

    def assign(self, runtime: Runtime) -> None:
        """Main process: give every server key a row."""
        for backend in runtime.backends.values():
            for server in backend.servers:
                if server.key not in self.slots:
                    if len(self.slots) >= BOARD_SLOTS:
                        if not self._warned:
                            self._warned = True
                            log.warning(
                                "more than %d server names since start: maxconn of %s and later servers "
                                "counts each process's sessions only (restart medlb to reset)",
                                BOARD_SLOTS,
                                server.key,
                            )
                        continue
                    self.slots[server.key] = len(self.slots)

    def share(self, runtime: Runtime, column: int, slots: Mapping[str, int]) -> None:
        """Count every server's sessions of this process in its row (idempotent)."""
        for backend in runtime.backends.values():
            for server in backend.servers:
                slot = slots.get(server.key)
                if slot is not None:
                    server.share(self.cell(slot, column))

    def cell(self, slot: int, column: int) -> Cell:
        cell = self._cells.get((slot, column))
        if cell is None:
            cell = self._cells[(slot, column)] = Cell(self.view, slot, column, self.columns)
        return cell

    def clear(self, column: int) -> None:
        """The process of ``column`` is gone, and its sessions with it."""
        view = self.view
        for i in range(column, len(view), self.columns):
            view[i] = 0


async def poll_queues(runtime: Runtime) -> None:
    """Give queued sessions the slots other processes freed (each process only hears of its own)."""
    while True:
        await asyncio.sleep(QUEUE_POLL)
        for backend in runtime.backends.values():
            if backend.queue:
                try:
                    backend.dispatch_queue()
                except Exception:
                    log.exception("backend %s: serving its queue failed", backend.name)


# --------------------------------------------------------------------------- counters (workers -> main)


def collect(runtime: Runtime) -> Msg:
    """A worker's counters: running totals per object, and its current sessions last."""
    servers: dict[str, tuple[int, ...]] = {}
    live = runtime.live_bytes()
    # Retired first: a server replaced at the same key by a reload reports the new one.
    for server in [*runtime.retired_servers, *(s for b in runtime.backends.values() for s in b.servers)]:
        b_in, b_out = live.get(server, (server.bytes_in, server.bytes_out))
        servers[server.key] = (
            server.total_sessions,
            b_in,
            b_out,
            server.connect_errors,
            server.retries,
            server.redispatches,
            server.cur_sessions,
        )
    backends = {b.name: (*(getattr(b, f) for f in BACKEND_COUNTERS), b.cur_sessions) for b in runtime.backends.values()}
    frontends = {f.name: (f.total_sessions, len(f.sessions)) for f in runtime.frontends.values()}
    return {"t": "report", "servers": servers, "backends": backends, "frontends": frontends}


@dataclass
class Tally:
    """What one worker reported last: running totals (to take increments) and current sessions."""

    totals: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    sessions: dict[tuple[str, str], int] = field(default_factory=dict)

    def clear(self) -> None:
        """The worker is gone: its totals start again from zero, and it holds no session."""
        self.totals.clear()
        self.sessions.clear()

    def increments(self, kind: str, key: str, totals: tuple[int, ...]) -> tuple[int, ...]:
        old = self.totals.get((kind, key))
        self.totals[(kind, key)] = totals
        if old is None or any(n < o for n, o in zip(totals, old, strict=True)):
            return totals  # first report, or the worker's object was replaced (a reload): a reset
        return tuple(n - o for n, o in zip(totals, old, strict=True))

    def take(self, runtime: Runtime, report: Msg) -> None:
        """Add a report's increments to the main process's objects and note its sessions."""
        servers = {s.key: s for b in runtime.backends.values() for s in b.servers}
        self.sessions = {}
        kinds: list[tuple[str, dict[str, Any], tuple[str, ...]]] = [
            ("s", servers, SERVER_COUNTERS),
            ("b", runtime.backends, BACKEND_COUNTERS),
            ("f", runtime.frontends, FRONTEND_COUNTERS),
        ]
        section = {"s": "servers", "b": "backends", "f": "frontends"}
        for kind, objects, names in kinds:
            for key, values in report[section[kind]].items():
                inc = self.increments(kind, key, tuple(values[:-1]))
                self.sessions[(kind, key)] = values[-1]
                target = objects.get(key)
                if target is None:
                    continue
                for name, n in zip(names, inc, strict=True):
                    if n:
                        setattr(target, name, getattr(target, name) + n)


def sum_peer_sessions(runtime: Runtime, tallies: list[Tally]) -> None:
    """Set ``peer_sessions`` of every server, backend and frontend from the workers' last reports."""

    def total(kind: str, key: str) -> int:
        return sum(t.sessions.get((kind, key), 0) for t in tallies)

    for backend in runtime.backends.values():
        backend.peer_sessions = total("b", backend.name)
        for server in backend.servers:
            server.peer_sessions = total("s", server.key)
    for frontend in runtime.frontends.values():
        frontend.peer_sessions = total("f", frontend.name)


# --------------------------------------------------------------------------- the main process's side


@dataclass
class WorkerRole:
    """What makes a :class:`~medlb.supervisor.Supervisor` a worker: its number, channel and hello."""

    index: int
    channel: Channel
    hello: Msg
    #: The main process's board, mapped from the descriptor the worker inherited.
    board: Board | None = None


@dataclass
class Worker:
    """One worker slot: restarted in place when its process dies."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: Channel | None = None
    #: Its column of the board while its process lives (None: none was free; per-process maxconn).
    column: int | None = None
    tally: Tally = field(default_factory=Tally)
    restarts: int = 0
    ready: bool = False
    started_at: float = 0.0
    #: When its last report came (loop time): a worker silent for HUNG_AFTER is restarted.
    last_report: float = 0.0
    #: Pings sent by :meth:`WorkerPool.sync`, by id, resolved by the worker's pong.
    pongs: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    #: Messages broadcast after this worker's hello was built and before it was ready: they
    #: are sent, in order, once it is (a reload or an API change during a restart is not lost).
    backlog: list[Msg] | None = None


class WorkerPool:
    """Starts, feeds, watches and stops the worker processes of the main process.

    ``hello`` builds the first message of a (re)started worker: the running config, the
    listening ports, server state and the API's added and removed servers. ``on_message``
    takes a worker's other messages: a passive observation (``observe``: a failed or
    recovered connect to a server) or a stick-table entry it learned (``stick``).
    """

    def __init__(
        self,
        count: int,
        runtime: Runtime,
        hello: Callable[[], Msg],
        on_message: Callable[[Msg], None],
        argv: list[str] | None = None,
    ) -> None:
        self.runtime = runtime
        self.hello = hello
        self.on_message = on_message
        self.workers = [Worker(i) for i in range(1, count)]
        #: The command that starts a worker; its last two arguments are added per worker.
        self.argv = argv or [sys.executable, "-m", "medlb", "worker"]
        self.stopping = False
        self.board = Board.create(count)
        self._free_columns = list(range(1, self.board.columns))  # column 0 is the main process's
        #: Tasks that free a retiring worker's column when it exits.
        self._reaping: set[asyncio.Task[None]] = set()
        self._last_state: dict[str, ServerState] | None = None
        self._state_pending = False
        self._watched: set[str] = set()
        #: Workers replaced after a failed reload, finishing their sessions (stop reaps them).
        self.retiring: list[asyncio.subprocess.Process] = []
        self._sync_id = 0

    # -- life cycle

    async def start(self) -> None:
        """Start every worker at once and wait until each is listening; any failure stops them all."""
        results = await asyncio.gather(*(self._spawn(w) for w in self.workers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            await self.stop(0.0)
            raise errors[0]
        self.watch()
        log.info("%d worker process(es) started", len(self.workers))
        if (hint := migrate_hint()) is not None:
            log.warning("%s", hint)

    async def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        worker.started_at = loop.time()
        if worker.column is None and self._free_columns:
            worker.column = self._free_columns.pop(0)
        elif worker.column is None:
            log.warning("worker %d: no free column on the session board; its maxconn is per process", worker.index)
        self.share()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                worker.proc = await asyncio.create_subprocess_exec(
                    *self.argv,
                    "--channel-fd",
                    str(theirs.fileno()),
                    "--index",
                    str(worker.index),
                    "--board-fd",
                    str(self.board.fd),
                    pass_fds=(theirs.fileno(), self.board.fd),
                    stdin=asyncio.subprocess.DEVNULL,
                )
            finally:
                theirs.close()
            worker.channel = await Channel.open(ours)
        except BaseException:
            ours.close()
            await self._kill(worker)
            raise
        try:
            if self.stopping:
                raise StartupError(f"worker {worker.index}: medlb is stopping")
            worker.backlog = []
            board = {"column": worker.column, "columns": self.board.columns, "slots": dict(self.board.slots)}
            worker.channel.send({**self.hello(), "code": CODE, "board": board})
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    answer = await worker.channel.recv()
            except TimeoutError:
                answer = {"t": "error", "message": f"not ready after {START_TIMEOUT:.0f}s"}
            if answer is None or answer.get("t") != "ready":
                why = "exited before it was ready" if answer is None else answer.get("message", "?")
                raise StartupError(f"worker {worker.index} failed to start: {why}")
        except BaseException:
            worker.backlog = None
            await self._kill(worker)
            raise
        for msg in worker.backlog:
            worker.channel.send(msg)
        worker.backlog = None
        worker.ready = True
        worker.last_report = loop.time()
        worker.tally.clear()
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    async def run(self) -> None:
        """Watch every worker until stop: read its messages, restart it when it dies."""
        async with asyncio.TaskGroup() as group:
            for worker in self.workers:
                group.create_task(self._watch(worker), name=f"worker {worker.index}")
            group.create_task(self._heal(), name="worker state")

    async def _watch(self, worker: Worker) -> None:
        """One slot, forever: nothing that happens to the worker may escape into the main TaskGroup."""
        loop = asyncio.get_running_loop()
        delay = RESTART_DELAY
        while True:
            code: int | str | None = None
            channel = worker.channel
            if channel is not None:
                while (msg := await channel.recv()) is not None:
                    if msg.get("t") == "failed":
                        # It could not apply a reload and now drains its sessions: replace it
                        # at once (its listeners are closed) and let it finish on its own.
                        log.error("worker %d: %s; replacing it", worker.index, msg.get("message", "?"))
                        if worker.proc is not None:
                            self.retiring.append(worker.proc)
                            # It keeps its column (and its sessions' counts) until it exits.
                            task = asyncio.create_task(self._reap(worker.proc, worker.column))
                            self._reaping.add(task)
                            task.add_done_callback(self._reaping.discard)
                            worker.proc = None
                            worker.column = None
                        code = "replaced"
                        break
                    try:
                        self._handle(worker, msg)
                    except Exception:
                        log.exception(
                            "worker %d: cannot take its %r message; restarting it", worker.index, msg.get("t")
                        )
                        await self._kill(worker)
                        break
                channel.close()
            worker.ready = False
            worker.channel = None
            _resolve(worker.pongs)  # nobody waits for a worker that is gone
            if worker.proc is not None:
                code = await worker.proc.wait()
            self._free(worker.column)
            worker.column = None
            worker.tally.clear()
            sum_peer_sessions(self.runtime, self.tallies())
            if self.stopping:
                return
            worker.restarts += 1
            if loop.time() - worker.started_at >= STABLE_AFTER:
                delay = RESTART_DELAY
            log.error("worker %d exited (%s); restarting it in %.1fs", worker.index, f"code {code}", delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            delay = min(delay * 2, RESTART_DELAY_MAX)  # a crash loop slows down
            try:
                await self._spawn(worker)
            except Exception as exc:
                log.error("%s", exc)

    async def _reap(self, proc: asyncio.subprocess.Process, column: int | None) -> None:
        await proc.wait()
        self._free(column)

    def _free(self, column: int | None) -> None:
        """A worker's process is gone: its sessions are, too."""
        if column is not None:
            self.board.clear(column)
            self._free_columns.append(column)

    def share(self) -> None:
        """Main process: every server gets a row on the board, and counts its sessions there."""
        self.board.assign(self.runtime)
        self.board.share(self.runtime, 0, self.board.slots)

    def _handle(self, worker: Worker, msg: Msg) -> None:
        kind = msg.get("t")
        if kind == "report":
            worker.last_report = asyncio.get_running_loop().time()
            worker.tally.take(self.runtime, msg)
            sum_peer_sessions(self.runtime, self.tallies())
        elif kind == "pong":
            future = worker.pongs.pop(msg["id"], None)
            if future is not None and not future.done():
                future.set_result(None)
        elif kind in ("observe", "stick"):
            self.on_message(msg)
        else:
            log.warning("worker %d sent an unknown message %r", worker.index, kind)

    def tallies(self) -> list[Tally]:
        return [w.tally for w in self.workers]

    async def stop(self, grace: float) -> None:
        """Ask every worker to stop gracefully (``grace`` seconds for its sessions), then wait."""
        self.stopping = True
        self.broadcast({"t": "stop", "grace": grace})
        procs = [w.proc for w in self.workers if w.proc is not None and w.proc.returncode is None]
        procs += [p for p in self.retiring if p.returncode is None]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace + 5.0):
                for proc in procs:
                    await proc.wait()
        for worker in self.workers:
            await self._kill(worker)
        for proc in self.retiring:
            await _kill(proc)

    async def _kill(self, worker: Worker) -> None:
        if worker.proc is not None:
            await _kill(worker.proc)
        if worker.channel is not None:
            worker.channel.close()
            worker.channel = None

    # -- telling the workers

    def broadcast(self, msg: Msg) -> None:
        """Send ``msg`` to every running worker (a worker that starts later gets ``hello``)."""
        for worker in self.workers:
            if worker.ready and worker.channel is not None:
                worker.channel.send(msg)
            elif worker.backlog is not None:
                worker.backlog.append(msg)

    async def sync(self) -> None:
        """Return once every running worker has applied everything sent to it so far.

        The channel keeps order, so a worker's answer to a ping sent after a change means
        the change is applied: an operator's drain or halt returns only when no process
        takes new sessions on that server any more (or after SYNC_TIMEOUT, for a hung worker).
        """
        self.send_state()  # a change coalesced for the next loop turn goes out now
        self._sync_id += 1
        waiting: list[asyncio.Future[None]] = []
        loop = asyncio.get_running_loop()
        for worker in self.workers:
            if worker.ready and worker.channel is not None:
                future: asyncio.Future[None] = loop.create_future()
                worker.pongs[self._sync_id] = future
                worker.channel.send({"t": "ping", "id": self._sync_id})
                waiting.append(future)
        if waiting:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SYNC_TIMEOUT):
                    await asyncio.gather(*waiting)
        for worker in self.workers:
            worker.pongs.pop(self._sync_id, None)

    def watch(self) -> None:
        """Follow every backend's server changes (idempotent; called again after each reload)."""
        self.share()
        for backend in self.runtime.backends.values():
            if backend.name not in self._watched or self._on_change not in backend.state_listeners:
                backend.state_listeners.append(self._on_change)
                self._watched.add(backend.name)

    def _on_change(self, server: Server, what: str, cause: str) -> None:
        # Coalesce the changes of one event-loop turn (a reload changes many servers at once).
        if not self._state_pending:
            self._state_pending = True
            asyncio.get_running_loop().call_soon(self.send_state)

    def send_state(self, force: bool = False) -> None:
        self._state_pending = False
        self.share()
        state = server_state(self.runtime)
        if force or state != self._last_state:
            self._last_state = state
            self.broadcast({"t": "state", "state": state, "slots": dict(self.board.slots)})

    async def _heal(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(HEAL_INTERVAL)
            try:
                self.send_state(force=True)
                for worker in self.workers:
                    silent = loop.time() - worker.last_report
                    if worker.ready and worker.proc is not None and silent > HUNG_AFTER:
                        log.error("worker %d sent nothing for %.0fs: killing it", worker.index, silent)
                        worker.ready = False
                        with contextlib.suppress(ProcessLookupError):
                            worker.proc.send_signal(signal.SIGKILL)  # _watch sees it end and restarts it
            except Exception:
                log.exception("worker state round failed; trying again in %.0fs", HEAL_INTERVAL)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()


def _resolve(futures: dict[int, asyncio.Future[None]]) -> None:
    for future in futures.values():
        if not future.done():
            future.set_result(None)
    futures.clear()
