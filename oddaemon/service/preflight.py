"""Preflight: before a job is queued, a worker checks what only the TF stack can check (the
pipeline.config parses and builds a model, num_classes matches the label map, each input's first
record is a tf.Example the decoder can use, the fine-tune checkpoint and its type, batch size vs
GPUs).

The checks run in **warm preflight workers** (``<module> preflight-serve``, protocol in
``oddaemon/workers/preflight.py``): at most ``MAX_SERVERS`` long-lived processes, each importing
tensorflow once and checking job after job, remembering what jobs share (a model config that
builds, an input file's first record). A preflight per process would cost a TensorFlow import
(about 4 s on 2 cores) per job: 500 job files would take over half an hour. A worker idle for
``IDLE_SECONDS`` is let go (it holds TF's memory); the next job starts a new one.

While a job is checked, its file waits in ``spool/cur/`` (so a rescan never takes it twice and a
daemon restart checks it again); then it is submitted to the scheduler or rejected with the
worker's messages, and a line about it goes into the job's own ``preflight.log``. A worker that
dies takes only the job it was on with it (rejected with the reason); one that dies before it is
ready rejects the first waiting job, so a broken worker Python cannot loop.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.served import Channel
from oddaemon.core.checks import Problem
from oddaemon.core.jobspec import JobSpec
from oddaemon.service.executor import RunningWorker

log = logging.getLogger("oddaemon.service.preflight")

MAX_SERVERS = 2
IDLE_SECONDS = 60.0
SERVER_NAME = "_preflight-{}"  # not a job name (those start with a letter or digit): its own log dir


@dataclass
class Pending:
    spec: JobSpec
    path: str  # the job file, in spool/cur/
    job_json: str = ""
    result: str = ""


class PreflightServer:
    def __init__(self, pool: Preflights, name: str):
        self.pool = pool
        self.name = name
        self.worker: RunningWorker | None = None
        self.ready = False
        self.busy: Pending | None = None
        self.idle_timer: object | None = None
        self.channel = Channel(pool.loop, self._reply, self._broken, f"preflight worker {name}")

    def start(self) -> bool:
        stdin, reply_fd = self.channel.open()
        self.worker = self.pool.start_server(self.name, ["preflight-serve", "--reply-fd", str(reply_fd)], stdin,
                                             (reply_fd,))
        self.channel.attach(self.worker is not None)
        return self.worker is not None

    def check(self, pending: Pending) -> bool:
        self._cancel_idle()
        if not self.channel.send({"job": pending.job_json, "result": pending.result}):
            return False
        self.busy = pending
        return True

    def _reply(self, reply: dict) -> None:
        if reply.get("event") == "ready":
            self.ready = True
            self.pool.pump()
        elif reply.get("event") == "done" and self.busy is not None:
            pending, self.busy = self.busy, None
            self.pool.checked(pending, None)
            self.idle_timer = self.pool.loop.call_later(IDLE_SECONDS, self._let_go)
            self.pool.pump()

    def _let_go(self) -> None:
        self.idle_timer = None
        self.channel.finish()  # EOF on its stdin: it exits by itself

    def _broken(self, why: str) -> None:
        log.warning("preflight worker %s: %s; letting it go", self.name, why)
        self.channel.finish()

    def _cancel_idle(self) -> None:
        if self.idle_timer is not None:
            self.pool.loop.remove(self.idle_timer)
            self.idle_timer = None


class Preflights:
    def __init__(self, work_dir: str, loop: Loop, start_server: Callable[..., RunningWorker | None],
                 hand_over: Callable[[str], None], submit: Callable[[JobSpec, str], None],
                 reject: Callable[[str, list[Problem], str], None], note: Callable[[str, str], None],
                 escaped: Callable[[JobSpec], list[str]] = lambda spec: []):
        self.work_dir = work_dir
        self.loop = loop
        self.start_server = start_server  # (name, argv tail, stdin fd, pass_fds) -> RunningWorker | None
        self.hand_over = hand_over  # a file the daemon wrote, given to the worker user
        self.submit = submit
        self.reject = reject
        self.note = note  # (job name, line) into the job's preflight.log
        self.escaped = escaped  # the job's paths that now lead outside the allowed roots (checked again here)
        self.waiting: collections.deque[Pending] = collections.deque()
        self.servers: list[PreflightServer] = []
        self._next = 0

    def names(self) -> set[str]:
        return {s.busy.spec.name for s in self.servers if s.busy} | {p.spec.name for p in self.waiting}

    def add(self, spec: JobSpec, path: str) -> None:
        self.waiting.append(Pending(spec, path))
        self.pump()

    def pump(self) -> None:
        for server in self.servers:
            if not self.waiting:
                return
            if server.ready and server.busy is None and server.channel.request_fd is not None:
                pending = self.waiting.popleft()
                if self._refused(pending):
                    continue
                if not self._prepare(pending) or not server.check(pending):
                    self.checked(pending, "the preflight worker could not be given the job (see the daemon log)")
        starting = any(not s.ready for s in self.servers)
        if self.waiting and not starting and len(self.servers) < MAX_SERVERS:
            self._next += 1
            server = PreflightServer(self, SERVER_NAME.format(self._next))
            if server.start():
                self.servers.append(server)
            else:
                self.checked(self.waiting.popleft(), "the preflight worker could not be started (see the daemon log)")
                self.loop.call_later(0, self.pump)

    def _refused(self, pending: Pending) -> bool:
        """Its paths are checked again as its check starts (a symlink swapped while it waited): a path
        that now leads outside the allowed roots rejects the file, and the worker never reads it."""
        escaped = self.escaped(pending.spec)
        if not escaped:
            return False
        log.error("job %s: not starting its preflight check: %s", pending.spec.name, "; ".join(escaped))
        self.note(pending.spec.name, f"==== oddaemon: preflight not started: {'; '.join(escaped)}\n")
        self.reject(pending.path, [Problem(p) for p in escaped], "a path it names now leads outside the allowed roots")
        return True

    def _prepare(self, pending: Pending) -> bool:
        try:
            os.makedirs(self.work_dir, exist_ok=True)
            token = uuid.uuid4().hex[:12]
            pending.job_json = os.path.join(self.work_dir, f"{pending.spec.name}.{token}.job.json")
            pending.result = os.path.join(self.work_dir, f"{pending.spec.name}.{token}.result.json")
            with open(pending.job_json, "w") as f:
                json.dump({"spec": pending.spec.to_dict(), "attempt": 0, "gpus": []}, f)
            self.hand_over(pending.job_json)
        except OSError as exc:
            log.error("job %s: cannot write its preflight request in %s: %s", pending.spec.name, self.work_dir, exc)
            return False
        return True

    def on_exit(self, worker: RunningWorker, returncode: int, detail: str) -> None:
        server = next((s for s in self.servers if s.worker is worker), None)
        if server is None:
            return
        self.servers.remove(server)
        server._cancel_idle()
        server.channel.close()  # (a "done" it sent before exiting is taken here)
        why = f"the preflight worker failed ({detail or 'exit status ' + str(returncode)}); see its preflight.log"
        if server.busy is not None:
            pending, server.busy = server.busy, None
            self.checked(pending, why)
        elif not server.ready and self.waiting:  # it never came up: do not start one after another
            self.checked(self.waiting.popleft(), why)
        self.pump()

    def checked(self, pending: Pending, crash_reason: str | None) -> None:
        """One job's preflight is over: its result file, or ``crash_reason`` when there is none."""
        result = None
        if pending.result:
            try:
                with open(pending.result, "rb") as f:
                    result = json.loads(f.read())
            except (OSError, ValueError):
                result = None
        for path in (pending.job_json, pending.result):
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
        name = pending.spec.name
        if result is None:
            why = crash_reason or "the preflight worker wrote no result; see its preflight.log"
            self.note(name, f"==== oddaemon: preflight could not run: {why}\n")
            self.reject(pending.path, [Problem(why)], "its preflight could not run")
            return
        for warning in result.get("warnings", []):
            log.warning("job %s: preflight: %s", name, warning)
        problems = [str(p) for p in result.get("problems", [])]
        self.note(name, "".join(f"warning: {w}\n" for w in result.get("warnings", []))
                  + "".join(f"problem: {p}\n" for p in problems)
                  + "==== oddaemon: preflight "
                  f"{'ok' if result.get('ok') else 'found ' + str(len(problems)) + ' problem(s)'}"
                  f" in {result.get('duration_seconds', 0):.2f}s\n")
        if result.get("ok"):
            self.submit(pending.spec, pending.path)
        else:
            self.reject(pending.path, [Problem(p) for p in problems] or [Problem("preflight failed")],
                        "its preflight found problems")
