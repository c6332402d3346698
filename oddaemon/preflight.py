"""Preflight: before a job is queued, a worker checks what only the TF stack can check (the
pipeline.config parses, num_classes matches the label map, each input's first record is a
tf.Example the decoder can use, the fine-tune checkpoint and its type, batch size vs GPUs).

While it runs, the job file waits in ``spool/cur/`` (so a rescan never takes it twice and a
daemon restart runs its preflight again); then it is submitted to the scheduler or rejected with
the worker's messages. At most ``MAX_CONCURRENT`` preflights run at once; the rest wait in order.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon.jobspec import JobSpec, Problem
from oddaemon.procs import Worker

log = logging.getLogger("oddaemon.preflight")

MAX_CONCURRENT = 2


@dataclass
class Pending:
    spec: JobSpec
    path: str  # the job file, in spool/cur/
    job_json: str = ""
    result: str = ""


class Preflights:
    def __init__(self, work_dir: str, start_worker: Callable[..., Worker | None],
                 submit: Callable[[JobSpec, str], None], reject: Callable[[str, list[Problem], str], None]):
        self.work_dir = work_dir
        self.start_worker = start_worker  # (name, role, argv_tail, job_json) -> Worker | None
        self.submit = submit
        self.reject = reject
        self.waiting: collections.deque[Pending] = collections.deque()
        self.running: dict[str, Pending] = {}

    def names(self) -> set[str]:
        return set(self.running) | {p.spec.name for p in self.waiting}

    def add(self, spec: JobSpec, path: str) -> None:
        self.waiting.append(Pending(spec, path))
        self._start_more()

    def _start_more(self) -> None:
        while self.waiting and len(self.running) < MAX_CONCURRENT:
            pending = self.waiting.popleft()
            os.makedirs(self.work_dir, exist_ok=True)
            token = uuid.uuid4().hex[:12]
            pending.job_json = os.path.join(self.work_dir, f"{pending.spec.name}.{token}.job.json")
            pending.result = os.path.join(self.work_dir, f"{pending.spec.name}.{token}.result.json")
            with open(pending.job_json, "w") as f:
                json.dump({"spec": pending.spec.to_dict(), "attempt": 0, "gpus": []}, f)
            worker = self.start_worker(pending.spec.name, "preflight", ["preflight", "--result", pending.result],
                                       pending.job_json)
            if worker is None:
                self._finish(pending, None, "the preflight worker could not be started (see the daemon log)")
                continue
            self.running[pending.spec.name] = pending

    def on_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        pending = self.running.pop(worker.name, None)
        if pending is None:
            return
        try:
            with open(pending.result, "rb") as f:
                result = json.loads(f.read())
        except (OSError, ValueError):
            result = None
        why = f"the preflight worker failed ({detail or 'exit status ' + str(returncode)}); see its preflight.log"
        self._finish(pending, result, why)
        self._start_more()

    def _finish(self, pending: Pending, result: dict | None, crash_reason: str) -> None:
        for path in (pending.job_json, pending.result):
            try:
                os.unlink(path)
            except OSError:
                pass
        if result is None:
            self.reject(pending.path, [Problem(crash_reason)], "its preflight could not run")
            return
        for warning in result.get("warnings", []):
            log.warning("job %s: preflight: %s", pending.spec.name, warning)
        if result.get("ok"):
            self.submit(pending.spec, pending.path)
        else:
            problems = [Problem(str(p)) for p in result.get("problems", [])] or [Problem("preflight failed")]
            self.reject(pending.path, problems, "its preflight found problems")
