"""Slurm's command-line tools run off the event loop: each command is a child process whose output
the loop reads as it comes, with a deadline, so a slow or unreachable controller never stalls the
daemon. ``run(argv, done)`` calls ``done(CommandResult)`` once, on the loop. What the commands mean
is ``core/slurm.py``'s business; this module only runs them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from oddaemon.adapters.loop import Loop

log = logging.getLogger("oddaemon.slurm")
MAX_OUTPUT = 64 * 1024 * 1024  # squeue --json of a large cluster: tens of MB at most


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int | None  # None: it could not be started, or it ran past its deadline and was killed
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        """What went wrong, for a log line or a failure message."""
        tool = self.argv[0] if self.argv else "?"
        if self.returncode is None:
            return f"{tool}: {self.stderr or 'did not answer in time'}"
        return f"{tool} exited {self.returncode}: {(self.stderr or self.stdout).strip()[:300] or 'no output'}"


class SlurmCommands:
    """Runs Slurm's tools with ``env`` (e.g. ``SLURM_CONF``) on ``loop``."""

    def __init__(self, loop: Loop, env: Mapping[str, str] | None = None, timeout: float = 30.0):
        self.loop = loop
        self.env = dict(os.environ if env is None else env)
        self.timeout = timeout
        self.running = 0

    def run(self, argv: list[str], done: Callable[[CommandResult], None], stdin: bytes = b"") -> None:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=self.env,
                                    start_new_session=True)
        except OSError as exc:
            result = CommandResult(tuple(argv), None, "", f"cannot run: {exc.strerror}")
            self.loop.call_later(0, lambda: done(result))
            return
        if stdin:
            try:
                proc.stdin.write(stdin)
            except OSError:
                pass
            proc.stdin.close()
        self.running += 1
        _Reading(self, proc, argv, done)


class _Reading:
    """One command's output, read on the loop until both pipes close, then its exit status."""

    def __init__(self, owner: SlurmCommands, proc: subprocess.Popen, argv: list[str],
                 done: Callable[[CommandResult], None]):
        self.owner, self.proc, self.argv, self.done = owner, proc, argv, done
        self.chunks: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
        self.size = 0
        self.handles = {fd: owner.loop.add_reader(fd, lambda fd=fd: self._read(fd)) for fd in self.chunks}
        self.deadline = owner.loop.call_later(owner.timeout, self._expired)
        self.finished = False

    def _read(self, fd: int) -> None:
        try:
            data = os.read(fd, 1 << 20)
        except OSError:
            data = b""
        if data and self.size + len(data) <= MAX_OUTPUT:
            self.chunks[fd].append(data)
            self.size += len(data)
            return
        if data:  # more than any Slurm answer: stop reading, the command is killed
            self._kill()
        self.owner.loop.remove(self.handles.pop(fd))
        if not self.handles:
            self._finish(self.proc.wait())

    def _expired(self) -> None:
        self.deadline = None
        if not self.finished:
            log.warning("%s did not answer within %gs: killed", self.argv[0], self.owner.timeout)
            self._kill()
            for handle in self.handles.values():
                self.owner.loop.remove(handle)
            self.handles.clear()
            self.proc.wait()
            self._finish(None, f"did not answer within {self.owner.timeout:g}s")

    def _kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def _finish(self, returncode: int | None, why: str = "") -> None:
        if self.finished:
            return
        self.finished = True
        self.owner.running -= 1
        if self.deadline is not None:
            self.owner.loop.remove(self.deadline)
        self.proc.stdout.close()
        self.proc.stderr.close()
        out, err = (b"".join(self.chunks[fd]).decode("utf-8", "replace") for fd in self.chunks)
        self.done(CommandResult(tuple(self.argv), returncode, out, why or err))
