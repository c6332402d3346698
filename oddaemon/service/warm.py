"""The daemon's end of the warm evaluator protocol.

The evaluator worker is started as ``<python> -m <module> eval-serve --job JOB.json --reply-fd N``:

* requests, daemon -> worker, JSON lines on the worker's stdin:
  ``{"checkpoint": "<pinned prefix>", "result": "<path of the result JSON>"}``
* replies, worker -> daemon, JSON lines on fd N:
  ``{"event": "ready"}`` once the model is built; then per request
  ``{"event": "done", "checkpoint": ..., "result": ...}`` (the result file is written atomically
  before) or ``{"event": "failed", "checkpoint": ..., "error": "..."}`` (the worker stays up).
* EOF on stdin: the worker exits 0. Its stdout/stderr go to the job's eval.log.

One request at a time. If the process dies, the daemon counts a failed attempt for the checkpoint
it was on and starts a new evaluator after the retry delay.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from oddaemon.adapters.procs import Worker
from oddaemon.adapters.served import Channel

if TYPE_CHECKING:
    from oddaemon.service.evaluation import JobEvaluation

log = logging.getLogger("oddaemon.service.warm")
FINISH_GRACE_SECONDS = 5.0


class WarmEvaluator:
    def __init__(self, job: "JobEvaluation", gpus: tuple[int, ...]):
        self.job = job
        self.gpus = gpus
        self.worker: Worker | None = None
        self.ready = False
        self.busy: int | None = None  # the checkpoint number in flight
        self.channel = Channel(job.owner.loop, self._handle, self._broken, f"job {job.name}: evaluator")

    def start(self) -> bool:
        stdin, reply_fd = self.channel.open()
        worker = self.job.owner.start_worker(self.job.name, "eval", ["eval-serve", "--reply-fd", str(reply_fd)],
                                             self.gpus, stdin=stdin, pass_fds=(reply_fd,))
        self.channel.attach(worker is not None)
        if worker is None:
            return False
        self.worker = worker
        where = f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "CPU"
        log.info("job %s: warm evaluator started on %s (pid %d)", self.job.name, where, worker.pid)
        return True

    def request(self, prefix: str, result: str, n: int) -> None:
        self.busy = n
        if not self.channel.send({"checkpoint": prefix, "result": result}):
            self.stop("evaluator pipe broken")

    def _broken(self, why: str) -> None:
        log.warning("job %s: evaluator: %s; restarting it", self.job.name, why)
        self.stop(why)

    def _handle(self, reply: dict) -> None:
        event = reply.get("event")
        if event == "ready":
            self.ready = True
            self.job.on_ready()
        elif event in ("done", "failed") and self.busy is not None:
            n, self.busy = self.busy, None
            if event == "done":
                self.job.on_done(n, str(reply.get("result", "")))
            else:
                self.job.on_failed(n, str(reply.get("error", "evaluation failed")))

    def finish(self) -> None:
        """No more work: close stdin; the worker exits by itself."""
        self.channel.finish()

    def stop(self, reason: str) -> None:
        """Stop now if it is evaluating; an idle evaluator gets EOF and a few seconds to exit by itself."""
        busy = self.busy is not None
        self.finish()
        if self.worker is None:
            return
        owner, name = self.job.owner, self.job.name
        if busy:
            owner.stop_worker(name, "eval", reason)
        else:
            owner.loop.call_later(FINISH_GRACE_SECONDS, lambda: owner.stop_worker(name, "eval", reason))

    def close(self) -> None:
        """After the process exited: take the replies it sent before dying, then release our ends."""
        self.ready = False  # nothing more is sent to it
        self.channel.close()
