"""Job files are parsed in child processes, never on the event loop (the daemon side).

``ParserPool.parse(data, filename, ctx, done)`` hands one file to an idle ``parser_child`` (or
queues it) and returns at once; ``done(result)`` runs on the loop with a ``JobSpec`` or the list of
``Problem``s. Each child works within a CPU and a memory limit (see ``parser_child``); the pool adds
a wall-clock limit per file: a child that has not answered by then is killed, the file is
rejected with that reason, and a fresh child takes the next file. A child that dies is replaced
the same way. So one hostile file costs the daemon a few milliseconds of its loop and no memory,
whatever its structure.

``settle(timeout)`` waits (on the calling thread, at most ``timeout``) for answers already asked
for: the D-Bus submit call uses it to give small files their verdict in the same call.
"""

from __future__ import annotations

import base64
import collections
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from oddaemon.adapters.loop import Loop
from oddaemon.core.checks import Problem
from oddaemon.core.job_validation import ValidationContext
from oddaemon.core.jobspec import JobSpec

log = logging.getLogger("oddaemon.adapters.parsers")

WALL_SECONDS = 10.0  # per file, on top of the child's own 2 s CPU limit: a busy machine is slow
Result = JobSpec | list[Problem]


def context_fields(ctx: ValidationContext) -> dict:
    """Every data field of ``ctx`` (its file-system functions stay the child's own), for the child's
    ``ValidationContext(**fields)``: a field added to the context reaches the child without more code."""
    return {f.name: getattr(ctx, f.name) for f in fields(ctx) if not callable(getattr(ctx, f.name))}


@dataclass
class _Request:
    id: int
    line: bytes
    done: Callable[[Result], None]


@dataclass
class _Child:
    proc: subprocess.Popen
    handle: object = None
    buffer: bytearray = field(default_factory=bytearray)
    busy: _Request | None = None
    timer: object = None


def result_of(reply: dict) -> Result:
    if "spec" in reply:
        return JobSpec.from_dict(reply["spec"])
    return [Problem(**p) for p in reply.get("problems", [])] or [Problem("the parser gave no answer")]


class ParserPool:
    def __init__(self, loop: Loop, size: int = 2, wall_seconds: float = WALL_SECONDS,
                 argv: list[str] | None = None):
        self.loop = loop
        self.size = max(1, size)
        self.wall_seconds = wall_seconds
        self.argv = argv or [sys.executable, "-m", "oddaemon.adapters.parser_child"]
        self.children: list[_Child] = []
        self.queue: collections.deque[_Request] = collections.deque()
        self._ids = 0
        self.closed = False

    def start(self) -> None:
        """Start the children now, so the first file does not wait for a Python start."""
        while len(self.children) < self.size and self._spawn() is not None:
            pass

    def parse(self, data: bytes, filename: str, ctx: ValidationContext, done: Callable[[Result], None]) -> None:
        self._ids += 1
        line = (json.dumps({"id": self._ids, "filename": filename, "data": base64.b64encode(data).decode(),
                            "context": context_fields(ctx)}) + "\n").encode()
        self.queue.append(_Request(self._ids, line, done))
        self._dispatch()

    @property
    def pending(self) -> int:
        return len(self.queue) + sum(1 for c in self.children if c.busy is not None)

    def _dispatch(self) -> None:
        while self.queue and not self.closed:
            child = next((c for c in self.children if c.busy is None), None)
            if child is None:
                if len(self.children) >= self.size:
                    return
                child = self._spawn()
                if child is None:
                    request = self.queue.popleft()
                    self._answer(request, [Problem("the daemon could not start its job-file parser; see the "
                                                   "daemon log")])
                    continue
            request = self.queue.popleft()
            child.busy = request
            try:
                child.proc.stdin.write(request.line)
                child.proc.stdin.flush()
            except OSError as exc:
                self._lost(child, f"the job-file parser could not be reached ({exc.strerror or exc})")
                continue
            child.timer = self.loop.call_later(self.wall_seconds, lambda c=child: self._too_slow(c))

    def _spawn(self) -> _Child | None:
        try:
            proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                    env={k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG")})
        except OSError as exc:
            log.error("cannot start the job-file parser %s: %s", " ".join(self.argv), exc)
            return None
        os.set_blocking(proc.stdout.fileno(), False)
        child = _Child(proc)
        child.handle = self.loop.add_reader(proc.stdout.fileno(), lambda: self._readable(child))
        self.children.append(child)
        return child

    def _readable(self, child: _Child) -> None:
        try:
            chunk = os.read(child.proc.stdout.fileno(), 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._lost(child, "the job-file parser exited while reading this file")
            return
        child.buffer.extend(chunk)
        while b"\n" in child.buffer:
            raw, _, rest = bytes(child.buffer).partition(b"\n")
            child.buffer = bytearray(rest)
            self._reply(child, raw)

    def _reply(self, child: _Child, raw: bytes) -> None:
        request, child.busy = child.busy, None
        if child.timer is not None:
            self.loop.remove(child.timer)
            child.timer = None
        if request is None:
            return
        try:
            reply = json.loads(raw)
            result = result_of(reply) if reply.get("id") == request.id else [Problem("the parser answered out of turn")]
        except (ValueError, TypeError, KeyError) as exc:
            result = [Problem(f"the parser's answer could not be read ({exc})")]
        self._answer(request, result)
        self._dispatch()

    def _too_slow(self, child: _Child) -> None:
        child.timer = None
        log.warning("job-file parser pid %d took more than %gs; killing it", child.proc.pid, self.wall_seconds)
        self._lost(child, f"parsing this file took longer than {self.wall_seconds:g} s (wall clock), the limit "
                          "for one job file; a job file is a few dozen keys: simplify its structure")

    def _lost(self, child: _Child, why: str) -> None:
        """The child is gone or killed: its file is answered with ``why``; a new child takes the rest."""
        self._forget(child)
        request, child.busy = child.busy, None
        if request is not None:
            self._answer(request, [Problem(why)])
        self._dispatch()

    def _forget(self, child: _Child) -> None:
        if child in self.children:
            self.children.remove(child)
        if child.handle is not None:
            self.loop.remove(child.handle)
            child.handle = None
        if child.timer is not None:
            self.loop.remove(child.timer)
            child.timer = None
        try:
            child.proc.send_signal(signal.SIGKILL)
        except ProcessLookupError:
            pass
        for stream in (child.proc.stdin, child.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        child.proc.wait()

    @staticmethod
    def _answer(request: _Request, result: Result) -> None:
        try:
            request.done(result)
        except Exception:
            log.exception("handling the parse result of request %d failed", request.id)

    def settle(self, timeout: float) -> None:
        """Read the answers that arrive within ``timeout`` seconds (blocking the caller that long at most)."""
        deadline = time.monotonic() + timeout
        while self.pending:
            busy = [c for c in self.children if c.busy is not None]
            left = deadline - time.monotonic()
            if not busy or left <= 0:
                return
            ready, _, _ = select.select([c.proc.stdout.fileno() for c in busy], [], [], left)
            for child in busy:
                if child.proc.stdout.fileno() in ready:
                    self._readable(child)

    def close(self) -> None:
        self.closed = True
        for child in list(self.children):
            self._forget(child)
