"""The ``oddaemon`` command line: arguments and dispatch (``serve``, ``submit``, ``list``, ``status``,
``cancel``, ``finish``, ``retry``, ``sweep``, ``logs``, ``eval``, ``export``, ``doctor``, ``tensorboard``, ``demo``).

Exit codes (``exit_codes``): 0 done; 1 the daemon refused (no such job, job already finished, ...)
or doctor found problems; 2 usage or configuration error; 3 the daemon is not reachable; 4 the
submitted file was rejected. Each command imports what it needs when it runs: ``list``, ``status``,
``cancel`` and ``retry`` read two settings of the configuration (``control_settings``), ask the
control socket and render the answer, and load nothing of the daemon, D-Bus or the job-spec checks
(``tests/unit/test_cli_speed.py`` holds them to that), so ``oddaemon list`` answers in tens of
milliseconds (``bench/cli``).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from oddaemon import __version__
from oddaemon.adapters.control_client import DaemonUnreachable
from oddaemon.cli.exit_codes import EXIT_OK, EXIT_UNREACHABLE, EXIT_USAGE, exit_status_of
from oddaemon.cli.transport import ask_daemon
from oddaemon.core.errors import OddaemonError, kind_of_reply, user_message

if TYPE_CHECKING:
    from oddaemon.cli.control_settings import ControlSettings
    from oddaemon.core.config import Config

CONTROL_COMMANDS = ("list", "status", "cancel", "finish", "retry", "priority", "sweep")
DEFAULT_CONFIG = "/etc/oddaemon/oddaemon.toml"


def config_path(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("ODDAEMON_CONFIG"):
        return os.environ["ODDAEMON_CONFIG"]
    return DEFAULT_CONFIG if os.path.exists(DEFAULT_CONFIG) else None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="oddaemon",
                                description="Run TensorFlow 2 Object Detection API training as a service.")
    p.add_argument("--config", "-c", help=f"daemon config file (default: $ODDAEMON_CONFIG, else {DEFAULT_CONFIG} "
                                          "if present, else built-in defaults)")
    p.add_argument("--version", action="version", version=f"oddaemon {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # -c/--config also after the subcommand (`oddaemon list -c X`); SUPPRESS keeps one given before it
    config_option = argparse.ArgumentParser(add_help=False)
    config_option.add_argument("--config", "-c", default=argparse.SUPPRESS, help="daemon config file")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[config_option], **kwargs)

    s = command("serve", help="run the daemon in the foreground")
    s.add_argument("--log-level", default="INFO")
    s = command("submit", help="submit a job file (atomic rename into the spool)")
    s.add_argument("file")
    s.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the daemon's verdict (0: don't)")
    for name, text in (("list", "list jobs"), ("status", "show one job"), ("cancel", "cancel a job"),
                       ("finish", "end a job's training now: save a checkpoint, evaluate the rest, export the "
                                  "best; the job succeeds"),
                       ("retry", "retry a failed or cancelled job")):
        s = command(name, help=text)
        if name != "list":
            s.add_argument("name")
        if name in ("list", "status"):
            s.add_argument("--json", action="store_true", help="machine-readable output")
    s = command("priority", help="change a job's priority (its rank in the queue; -1000 to 1000, higher first)")
    s.add_argument("name")
    s.add_argument("priority", type=int)
    s = command("sweep", help="show a sweep: its variants' values, best metric and step, state (no name: all sweeps)")
    s.add_argument("name", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = command("logs", help="show a job's log (train by default; eval, export, preflight)")
    s.add_argument("name")
    s.add_argument("-f", "--follow", action="store_true")
    s.add_argument("-n", "--lines", type=int, default=40)
    s.add_argument("--role", default="train", choices=("train", "eval", "export", "preflight"))
    s = command("eval", help="evaluate one checkpoint of a job now (a cold one-shot worker; prints the metrics)")
    s.add_argument("name")
    s.add_argument("--checkpoint", required=True, help="checkpoint prefix, absolute or relative to the job's model_dir "
                                                        "(e.g. ckpt-12 or best/ckpt-12)")
    s.add_argument("--gpu", type=int, help="GPU id to evaluate on (default: the CPU)")
    s.add_argument("--json", action="store_true", help="print the result JSON")
    s = command("export", help="export one checkpoint of a job to a SavedModel now (the best by default; a one-shot "
                               "worker)")
    s.add_argument("name")
    s.add_argument("--checkpoint", help="checkpoint prefix, absolute or relative to the job's model_dir (e.g. "
                                        "ckpt-12; default: the best, best/ckpt-N)")
    s.add_argument("--output", "-o", required=True, help="a new (or empty) directory for the SavedModel")
    command("doctor", help="check the workers' TF stack, the shims, GPUs and free disk; print what to fix")
    s = command("tensorboard", help="TensorBoard on loopback over jobs' model_dirs (every job's if none is named); "
                                    "Ctrl-C stops it")
    s.add_argument("names", nargs="*", metavar="NAME",
                   help="jobs to show (default: every job the daemon knows that has a model_dir)")
    s.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    s.add_argument("--tensorboard", metavar="COMMAND",
                   help="the TensorBoard command (default: the workers' Python -m tensorboard.main)")
    s.add_argument("--verbose", action="store_true", help="show TensorBoard's own output")
    s = command("demo", help="run the bundled demo job with a local daemon (see README)")
    s.add_argument("--dir", default="demo", help="project folder for the demo's config, spool, state and logs")
    s.add_argument("--keep-serving", action="store_true", help="keep the daemon running after the demo job ends")
    s.add_argument("--standin", action="store_true",
                   help="use the stand-in worker instead of TensorFlow (seconds, not minutes)")
    return p


def load_config(path: str | None) -> Config:
    """The whole configuration, every key checked (``oddaemon.core.config.load_config``)."""
    from oddaemon.core.config import load_config as load  # noqa: PLC0415

    return load(path)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "demo":
            from oddaemon.cli.demo import run_demo  # noqa: PLC0415

            return run_demo(args.dir, args.keep_serving, args.standin)
        if args.command in CONTROL_COMMANDS:
            from oddaemon.cli.control_settings import control_settings  # noqa: PLC0415

            return cmd_control(control_settings(config_path(args.config)), args)
        config = load_config(config_path(args.config))
        if args.command == "serve":
            return cmd_serve(config, args.log_level)
        if args.command == "submit":
            from oddaemon.cli.follow import cmd_submit  # noqa: PLC0415

            return cmd_submit(config, args.file, args.wait)
        if args.command == "logs":
            from oddaemon.cli.follow import cmd_logs  # noqa: PLC0415

            return cmd_logs(config, args.name, args.role, args.lines, args.follow)
        if args.command == "eval":
            from oddaemon.cli.oneshot import cmd_eval  # noqa: PLC0415

            return cmd_eval(config, args.name, args.checkpoint, args.gpu, args.json)
        if args.command == "export":
            from oddaemon.cli.oneshot import cmd_export  # noqa: PLC0415

            return cmd_export(config, args.name, args.checkpoint, args.output)
        if args.command == "tensorboard":
            from oddaemon.cli.tensorboard import cmd_tensorboard  # noqa: PLC0415

            return cmd_tensorboard(config, args.names, args.port, args.tensorboard, args.verbose)
        from oddaemon.cli.oneshot import cmd_doctor  # noqa: PLC0415

        return cmd_doctor(config)
    except DaemonUnreachable as exc:
        print(f"oddaemon: {exc}", file=sys.stderr)
        print("oddaemon: without the daemon you can still submit (files wait in the spool) and read logs.",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    except OddaemonError as exc:
        print(f"oddaemon: {user_message(exc)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def setup_logging(level: str) -> None:
    import logging  # noqa: PLC0415

    from oddaemon.adapters.journal import journal_handler  # noqa: PLC0415
    from oddaemon.core.printable import EscapingFormatter  # noqa: PLC0415

    fmt = "%(levelname)s %(message)s" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s %(levelname)s %(message)s"
    # Under journald: the native protocol, with the job's fields (adapters/journal.py); else plain lines.
    handler = journal_handler(os.environ, sys.stderr) or logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(fmt))  # nothing from outside reaches the log raw
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler])


def cmd_serve(config: Config, level: str) -> int:
    from oddaemon.adapters.loop import make_loop  # noqa: PLC0415
    from oddaemon.service.daemon import run  # noqa: PLC0415

    setup_logging(level)
    return run(config, make_loop(config.event_loop))


def cmd_control(config: Config | ControlSettings, args: argparse.Namespace) -> int:
    """``list``, ``status``, ``cancel``, ``retry``: one request, its answer printed. ``list`` without
    ``--json`` asks for the table's columns only (``brief``; a daemon that does not know it sends
    every view, which renders the same)."""
    payload = {"cmd": args.command}
    if getattr(args, "name", None):
        payload["name"] = args.name
    if args.command == "priority":
        payload["priority"] = args.priority
    as_json = getattr(args, "json", False)
    if args.command == "list" and not as_json:
        payload["brief"] = True
    reply = ask_daemon(config, payload)
    if not reply.get("ok"):
        print(f"oddaemon: {reply.get('error')}", file=sys.stderr)
        return exit_status_of(kind_of_reply(reply))
    if as_json:
        import json  # noqa: PLC0415

        shown = next((reply[k] for k in ("jobs", "job", "sweep", "sweeps") if k in reply), None)
        print(json.dumps(shown, indent=1, sort_keys=True))
    elif args.command == "list":
        from oddaemon.cli.render import format_list  # noqa: PLC0415

        print(format_list(reply))
    elif args.command == "status":
        from oddaemon.cli.render import format_status  # noqa: PLC0415

        print(format_status(reply["job"]))
    elif args.command == "sweep":
        from oddaemon.cli.render import format_sweep, format_sweeps  # noqa: PLC0415

        print(format_sweep(reply["sweep"]) if "sweep" in reply else format_sweeps(reply["sweeps"]))
    elif args.command == "priority":
        position = reply.get("queue_position")
        print(f"{args.name}: {reply.get('state')}, priority {reply.get('priority')}"
              + (f", queue position {position}" if position else ""))
    else:
        print(f"{args.name}: {reply.get('state')}")
    return EXIT_OK
