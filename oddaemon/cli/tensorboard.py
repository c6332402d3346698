"""``oddaemon tensorboard [NAME...]``: TensorBoard over jobs' ``model_dir``s, on loopback, in the
foreground of the user's own terminal.

The CLI asks the daemon for the jobs' ``model_dir``s (``status`` for each named job; ``list`` for
every job it knows when none is named, skipping those that have not written a ``model_dir`` yet),
starts ``<the workers' Python> -m tensorboard.main --logdir_spec NAME:DIR,... --host 127.0.0.1
--port PORT`` (TensorBoard comes with the workers' TF stack; the daemon never imports it), waits
until it answers HTTP, prints the URL and stays until Ctrl-C, then stops it. TensorBoard runs in
its own session (Ctrl-C reaches this command, which stops it with SIGTERM) behind the same
parent-death shim as the workers (``adapters/lifeline.py``): it never outlives this command.

Why not a daemon-managed TensorBoard: it would be a web server in the daemon's service, open while
nobody looks, reading every job's files with the daemon's rights, state to keep across restarts and
a second heavy stack under the daemon's unit. Run by the user, TensorBoard reads only what that
user may read, and the port is open exactly as long as someone looks.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from oddaemon.cli.exit_codes import EXIT_OK, EXIT_REFUSED, EXIT_USAGE, exit_status_of
from oddaemon.core.errors import kind_of_reply

HOST = "127.0.0.1"
READY_TIMEOUT = 180.0  # seconds for TensorBoard to answer (it imports TF when it finds it: seconds)
STOP_GRACE = 10.0


class TensorBoardError(Exception):
    """What keeps TensorBoard from being started, in the user's words (``status`` is the exit status)."""

    def __init__(self, message: str, status: int = EXIT_REFUSED):
        super().__init__(message)
        self.status = status


def choose_runs(views: list[dict], names: list[str], exists: Callable[[str], bool] = os.path.isdir
                ) -> tuple[list[tuple[str, str]], list[str]]:
    """The (run name, model_dir) pairs to show, and notes for the jobs left out. ``views``: the jobs'
    views (every job when ``names`` is empty). A named job whose model_dir does not exist is an
    error; unnamed ones are skipped, with a note. Raises ``TensorBoardError``."""
    notes, runs, missing = [], [], []
    for view in views:
        name, model_dir = view["name"], view.get("model_dir") or ""
        if "," in model_dir:
            raise TensorBoardError(f"job {name}: its model_dir {model_dir} has a ',' in it, which TensorBoard's "
                                   "--logdir_spec cannot carry")
        if not exists(model_dir):
            if names:
                missing.append(f"job {name}: its model_dir {model_dir} does not exist yet (training has not "
                               f"started; `oddaemon status {name}` says why)")
            else:
                notes.append(f"left out {name} ({view.get('state')}): its model_dir {model_dir} does not exist yet")
            continue
        runs.append((name, model_dir))
    if missing:
        raise TensorBoardError("; ".join(missing))
    if not runs:
        raise TensorBoardError("the daemon has no jobs" if not views else "no job has a model_dir to show yet")
    return runs, notes


def logdir_spec(runs: list[tuple[str, str]]) -> str:
    """TensorBoard's ``--logdir_spec``: ``name:dir`` pairs, comma-separated (each job a group of runs:
    ``NAME/train``, ``NAME/eval``)."""
    return ",".join(f"{name}:{model_dir}" for name, model_dir in runs)


def tensorboard_argv(program: list[str], runs: list[tuple[str, str]], port: int, host: str = HOST) -> list[str]:
    return [*program, "--logdir_spec", logdir_spec(runs), "--host", host, "--port", str(port)]


def url_of(host: str, port: int) -> str:
    return f"http://{host}:{port}/"


def default_program(worker_python: str) -> list[str]:
    return [worker_python, "-m", "tensorboard.main"]


def parse_program(text: str) -> list[str]:
    """``--tensorboard``: a command line (``tensorboard``, ``/opt/tb/bin/python -m tensorboard.main``)."""
    argv = shlex.split(text)
    if not argv:
        raise TensorBoardError("--tensorboard is empty", EXIT_USAGE)
    return argv


def resolve(program: list[str]) -> list[str]:
    """The program's first word as an absolute path (the parent-death shim execs it), or an error."""
    first = program[0]
    found = first if "/" in first else shutil.which(first)
    if not found or not os.path.exists(found):
        raise TensorBoardError(f"cannot run {first}: no such executable")
    if not os.access(found, os.X_OK) or os.path.isdir(found):
        raise TensorBoardError(f"cannot run {first}: not executable")
    return [os.path.abspath(found), *program[1:]]


def free_port(port: int = 0, host: str = HOST) -> int:
    """``port`` (0: one the kernel picks) once it is free on ``host``; an error naming it when not."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            raise TensorBoardError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
        return s.getsockname()[1]


def explain_exit(program: list[str], returncode: int, output: str, default: bool) -> str:
    """Why TensorBoard ended before it answered, from its output."""
    if "No module named tensorboard" in output or "No module named 'tensorboard'" in output:
        where = " (the workers' interpreter, [worker] python)" if default else ""
        return (f"tensorboard is not installed for {program[0]}{where}: install it there "
                "(pip install tensorboard; it comes with the TF stack of scripts/setup), or name another "
                "with --tensorboard")
    tail = "\n".join(output.strip().splitlines()[-15:])
    return f"TensorBoard ({' '.join(program)}) exited with status {returncode} before it answered:\n{tail}"


def job_views(ask: Callable[[dict], dict], names: list[str]) -> list[dict]:
    """The named jobs' views (every unknown name in one error), or every job's."""
    if not names:
        reply = ask({"cmd": "list"})
        if not reply.get("ok"):
            raise TensorBoardError(str(reply.get("error")), exit_status_of(kind_of_reply(reply)))
        return list(reply.get("jobs", []))
    views, unknown = [], []
    for name in dict.fromkeys(names):  # once each, in the order given
        reply = ask({"cmd": "status", "name": name})
        if reply.get("ok"):
            views.append(reply["job"])
        elif reply.get("kind") == "not_found":
            unknown.append(name)
        else:
            raise TensorBoardError(str(reply.get("error")), exit_status_of(kind_of_reply(reply)))
    if unknown:
        raise TensorBoardError(f"no job named {', '.join(repr(n) for n in unknown)} (see `oddaemon list`)")
    return views


def answers(url: str) -> bool:
    import http.client  # noqa: PLC0415
    import urllib.request  # noqa: PLC0415

    try:
        with urllib.request.urlopen(url + "data/logdir", timeout=2) as response:
            return response.status == 200
    except (OSError, http.client.HTTPException):
        return False


class TensorBoard:
    """The TensorBoard process: started behind the parent-death shim, in its own session."""

    def __init__(self, argv: list[str], verbose: bool = False):
        from oddaemon.adapters.procs import LIFELINE  # noqa: PLC0415

        self.argv = argv
        self.output = None if verbose else tempfile.TemporaryFile(prefix="oddaemon-tensorboard-")
        try:
            self.proc = subprocess.Popen([sys.executable, "-I", "-S", LIFELINE, str(os.getpid()), *argv],
                                         stdin=subprocess.DEVNULL, stdout=self.output, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        except OSError as exc:
            raise TensorBoardError(f"cannot start {argv[0]}: {exc.strerror}") from exc

    def output_text(self) -> str:
        if self.output is None:
            return ""
        self.output.seek(0)
        return self.output.read()[-20000:].decode(errors="replace")

    def wait_ready(self, url: str, timeout: float) -> int | None:
        """None once ``url`` answers; TensorBoard's exit status if it ended first. Raises on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return self.proc.returncode
            if answers(url):
                return None
            time.sleep(0.2)
        raise TensorBoardError(f"TensorBoard did not answer on {url} within {timeout:.0f}s:\n{self.output_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)  # its own session: the data server with it
                self.proc.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        if self.output is not None:
            self.output.close()


def cmd_tensorboard(config, names: list[str], port: int, program: str | None, verbose: bool = False) -> int:
    from oddaemon.cli.transport import ask_daemon  # noqa: PLC0415

    try:
        runs, notes = choose_runs(job_views(lambda payload: ask_daemon(config, payload), names), names)
        default = program is None
        argv_program = resolve(default_program(config.resolved_worker_python()) if default else parse_program(program))
        chosen = free_port(port)
        for note in notes:
            print(f"oddaemon: {note}", file=sys.stderr)
        return serve(argv_program, runs, chosen, default, verbose)
    except TensorBoardError as exc:
        print(f"oddaemon: {exc}", file=sys.stderr)
        return exc.status


def serve(program: list[str], runs: list[tuple[str, str]], port: int, default: bool, verbose: bool) -> int:
    """Run TensorBoard until Ctrl-C or SIGTERM (or until it ends by itself)."""
    url = url_of(HOST, port)
    board = TensorBoard(tensorboard_argv(program, runs, port), verbose)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        returncode = board.wait_ready(url, READY_TIMEOUT)
        if returncode is not None:
            raise TensorBoardError(explain_exit(program, returncode, board.output_text(), default))
        print(f"TensorBoard on {url} (runs: {', '.join(name for name, _ in runs)}; pid {board.proc.pid}); "
              "Ctrl-C stops it", flush=True)
        returncode = board.proc.wait()
        print(f"oddaemon: TensorBoard exited with status {returncode}\n{board.output_text()}", file=sys.stderr)
        return EXIT_REFUSED
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        board.stop()
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum, frame):
    raise KeyboardInterrupt
