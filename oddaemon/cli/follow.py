"""The CLI commands that follow files: ``submit`` (the delivered file to its verdict in the spool)
and ``logs`` (``-f``: across rotations)."""

from __future__ import annotations

import os
import sys
import time

from oddaemon.adapters.control_client import DaemonForbidden, DaemonUnreachable
from oddaemon.adapters.spool import Spool
from oddaemon.cli.exit_codes import EXIT_OK, EXIT_REFUSED, EXIT_REJECTED, EXIT_UNREACHABLE
from oddaemon.cli.receipt import locate
from oddaemon.cli.transport import ask_daemon, ping
from oddaemon.core import layout
from oddaemon.core.config import Config


def cmd_submit(config: Config, path: str, wait: float) -> int:
    """Deliver the file, then wait for the daemon's verdict on exactly that file (``receipt``)."""
    spool = Spool(config.spool_dir)
    delivery = spool.submit(path)
    print(f"submitted {path} -> {delivery.path}")
    try:
        ping(config, timeout=5)
    except DaemonForbidden:
        pass  # the socket is the daemon group's: whether it runs is not known; the spool will say
    except DaemonUnreachable as exc:
        print(f"oddaemon: {exc}", file=sys.stderr)
        print(f"oddaemon: the file waits in the spool ({delivery.path}); the daemon takes it when it starts",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if wait <= 0:
        return EXIT_OK
    deadline = time.monotonic() + wait
    where = locate(spool, delivery)
    checking = False
    while not where.decided and time.monotonic() < deadline:
        if where.place == "cur" and not checking:
            print("checking it ...", flush=True)
            checking = True
        time.sleep(0.05)
        where = locate(spool, delivery)
    if where.place == "new":
        print(f"the daemon has not taken it yet (after {wait:g}s); it stays in the spool until it does")
        return EXIT_OK
    if where.place == "cur":
        print(f"it is still being checked (after {wait:g}s); see `oddaemon list` and "
              "`oddaemon logs --role preflight NAME`")
        return EXIT_OK
    if where.place == "rejected":
        print(f"REJECTED (kept as {where.path}):")
        try:
            with open(where.error_path, encoding="utf-8", errors="replace") as f:
                print(f.read().rstrip())
        except OSError as exc:
            print(f"(its explanation {where.error_path} cannot be read: {exc.strerror})")
        return EXIT_REJECTED
    if where.place == "gone":
        print(f"oddaemon: {delivery.path} left the spool without a verdict (moved away by someone else?)",
              file=sys.stderr)
        return EXIT_REFUSED
    name = where.job_name
    try:
        reply = ask_daemon(config, {"cmd": "status", "name": name})
    except DaemonUnreachable:
        reply = {}
    job = reply.get("job") if reply.get("ok") else None
    if job is None:
        print(accepted_sweep(config, name) or f"accepted as job {name} (kept as {where.path})")
    else:
        position = f", queue position {job['queue_position']}" if job.get("queue_position") else ""
        waits = f" for {', '.join(job['waiting_for'])}" if job.get("waiting_for") else ""
        print(f"accepted as job {job['name']}: {job['state']}{waits}{position}")
    return EXIT_OK


def accepted_sweep(config: Config, name: str) -> str | None:
    """The verdict line of a file that became a sweep (its variants are the jobs), or None."""
    try:
        reply = ask_daemon(config, {"cmd": "sweep", "name": name})
    except DaemonUnreachable:
        return None
    sweep = reply.get("sweep") if reply.get("ok") else None
    if not sweep:
        return None
    names = [row["name"] for row in sweep["rows"]]
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]} ... {names[-1]}"
    return f"accepted as sweep {name}: {len(names)} jobs ({shown}); see `oddaemon sweep {name}`"


def cmd_logs(config: Config, name: str, role: str, lines: int, follow: bool) -> int:
    path = layout.log_file(config.log_dir, name, role)
    if not os.path.exists(path):
        print(f"oddaemon: no {role} log for job '{name}' at {path}", file=sys.stderr)
        return EXIT_REFUSED
    with open(path, "rb") as f:
        tail = f.read().splitlines()[-lines:] if lines > 0 else []
    sys.stdout.buffer.write(b"".join(line + b"\n" for line in tail))
    sys.stdout.flush()
    if follow:
        follow_file(path)
    return EXIT_OK


def follow_file(path: str) -> None:
    f = open(path, "rb")
    f.seek(0, os.SEEK_END)
    inode = os.fstat(f.fileno()).st_ino
    while True:
        chunk = f.read()
        if chunk:
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            continue
        try:
            if os.stat(path).st_ino != inode:  # rotated: finish the old file, then follow the new one
                f.close()
                f = open(path, "rb")
                inode = os.fstat(f.fileno()).st_ino
                continue
        except FileNotFoundError:
            pass
        time.sleep(0.25)
