"""The ``medlb`` command: ``run``, ``check``, ``demo``, ``ctl`` (see :mod:`medlb.ctl` for its exit codes).

Exit codes a script can rely on:

- 0: success (``check``: the config is valid; ``run``: stopped cleanly);
- 1: a runtime error (a port in use, a missing permission);
- 2: the configuration is invalid (every error is printed with its location).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from medlb import __version__
from medlb.config import Config, format_duration, load_config
from medlb.ctl import add_parser as add_ctl_parser
from medlb.ctl import main_ctl
from medlb.errors import ConfigError, MedlbError

EXIT_OK = 0
EXIT_RUNTIME = 1
EXIT_CONFIG = 2


def setup_logging(level: str, tag: str = "") -> None:
    """Log to stderr; ``tag`` marks the lines of a worker process ("worker 2")."""
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(asctime)s %(levelname)-7s {tag + ' ' if tag else ''}%(name)s: %(message)s",
        stream=sys.stderr,
    )


def summarize(config: Config) -> str:
    """One line an operator can eyeball after ``medlb check``."""
    servers = sum(len(b.servers) for b in config.backends)
    fronts = ", ".join(f"{f.name} ({f.mode} {' '.join(str(b) for b in f.bind)})" for f in config.frontends)
    return (
        f"configuration valid: {len(config.frontends)} frontend(s) [{fronts}], "
        f"{len(config.backends)} backend(s), {servers} server(s), "
        f"hard_stop_after {format_duration(config.global_.hard_stop_after)}; "
        + (f"{config.global_.workers} processes for http/tcp frontends; " if config.global_.workers > 1 else "")
        + (f"admin API on {config.admin.bind}" if config.admin else "admin API off")
    )


def _load(path: str) -> Config | None:
    """Load a config, or print every error and return None (the caller exits 2)."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    print(summarize(config))
    return EXIT_OK


def run_config(config: Config, *, log_sessions: bool = True, config_path: str | None = None) -> int:
    from medlb.supervisor import Supervisor, new_event_loop

    async def main() -> int:
        return await Supervisor(config, log_sessions=log_sessions, config_path=config_path).run()

    with asyncio.Runner(loop_factory=new_event_loop(config.global_.loop)) as runner:
        return runner.run(main())


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    setup_logging(args.log_level or config.global_.log_level)
    try:
        return run_config(config, log_sessions=not args.no_session_log, config_path=args.config)
    except MedlbError as exc:
        logging.getLogger("medlb").error("%s", exc)
        return EXIT_RUNTIME


def _cmd_worker(args: argparse.Namespace) -> int:
    """A worker process of ``global.workers``, started by the main process (never by hand)."""
    import pickle
    import socket

    from medlb.io.workers import Board, Channel, WorkerRole
    from medlb.supervisor import Supervisor, new_event_loop

    sock = socket.socket(fileno=args.channel_fd)
    # The first message decides the event loop, so it is read before the loop exists.
    with sock.makefile("rb") as f:
        size = int.from_bytes(f.read(4), "big")
        hello = pickle.loads(f.read(size)) if size else None
    if not isinstance(hello, dict) or hello.get("t") != "hello":
        print("medlb worker: started without a hello from the main process", file=sys.stderr)
        return EXIT_RUNTIME
    from medlb.io.workers import CODE

    if hello.get("code") != CODE:
        # The files under the running main process changed (an upgrade without a restart):
        # this worker would speak another version of the channel. Refuse; restart medlb.
        message = "the medlb code on disk differs from the running main process's: restart medlb"
        data = pickle.dumps({"t": "error", "message": message})
        sock.sendall(len(data).to_bytes(4, "big") + data)
        print(f"medlb worker: {message}", file=sys.stderr)
        return EXIT_RUNTIME
    config = hello["config"]
    setup_logging(args.log_level or hello.get("log_level") or config.global_.log_level, f"worker {args.index}")
    # Workers mirror the main process's state changes: its log already tells them.
    logging.getLogger("medlb.state").setLevel(logging.ERROR)

    async def main() -> int:
        channel = await Channel.open(sock)
        columns = hello.get("board", {}).get("columns")
        board = Board(args.board_fd, columns) if args.board_fd is not None and columns else None
        role = WorkerRole(args.index, channel, hello, board)
        try:
            return await Supervisor(config, log_sessions=hello["log_sessions"], worker=role).run()
        except MedlbError as exc:
            channel.send({"t": "error", "message": str(exc)})
            await channel.writer.drain()
            raise
        finally:
            channel.close()

    try:
        with asyncio.Runner(loop_factory=new_event_loop(config.global_.loop)) as runner:
            return runner.run(main())
    except MedlbError as exc:
        logging.getLogger("medlb").error("%s", exc)
        return EXIT_RUNTIME


def _cmd_demo(args: argparse.Namespace) -> int:
    from medlb.demo import run_demo

    setup_logging(args.log_level or "info")
    try:
        return run_demo(host=args.host, port=args.port, admin_port=args.admin_port)
    except MedlbError as exc:
        logging.getLogger("medlb").error("%s", exc)
        return EXIT_RUNTIME


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medlb", description="A load balancer for medical imaging.")
    parser.add_argument("--version", action="version", version=f"medlb {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the balancer in the foreground")
    run.add_argument("-c", "--config", required=True, help="YAML configuration file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="override global.log_level")
    run.add_argument("--no-session-log", action="store_true", help="do not log one line per session")
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check", help="validate a configuration without running it")
    check.add_argument("-c", "--config", required=True, help="YAML configuration file")
    check.set_defaults(func=_cmd_check)

    demo = sub.add_parser("demo", help="run a self-contained lab of demo backends behind medlb on loopback")
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=7000, help="the demo frontend's port")
    demo.add_argument("--admin-port", type=int, default=9900, help="the admin API and dashboard port")
    demo.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    demo.set_defaults(func=_cmd_demo)

    worker = sub.add_parser(
        "worker", help=argparse.SUPPRESS
    )  # started by the main process for global.workers; not for people
    worker.add_argument("--channel-fd", type=int, required=True)
    worker.add_argument("--index", type=int, required=True)
    worker.add_argument("--board-fd", type=int)
    worker.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    worker.set_defaults(func=_cmd_worker)

    add_ctl_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "ctl":
        return main_ctl(args)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
