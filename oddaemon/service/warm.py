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
from collections.abc import Callable
from typing import Protocol

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.procs import Worker
from oddaemon.adapters.served import Channel

log = logging.getLogger("oddaemon.service.warm")
FINISH_GRACE_SECONDS = 5.0


class EvaluatorReplies(Protocol):
    """Who hears what the evaluator says (``evaluator_driver.EvaluatorDriver``)."""

    def on_ready(self) -> None: ...

    def on_done(self, n: int, result_path: str) -> None: ...

    def on_failed(self, n: int, error: str) -> None: ...


class WarmEvaluator:
    """One job's warm evaluator process and its pipes. ``start_worker(name, role, args, gpus, stdin=,
    pass_fds=)`` starts it (None: it could not), ``stop_worker(name, role, reason)`` stops it."""

    def __init__(self, name: str, gpus: tuple[int, ...], loop: Loop, start_worker: Callable[..., Worker | None],
                 stop_worker: Callable[[str, str, str], object], replies: EvaluatorReplies):
        self.name = name
        self.gpus = gpus
        self.loop = loop
        self.start_worker = start_worker
        self.stop_worker = stop_worker
        self.replies = replies
        self.worker: Worker | None = None
        self.ready = False
        self.busy: int | None = None  # the checkpoint number in flight
        self.channel = Channel(loop, self._handle, self._broken, f"job {name}: evaluator")

    def start(self) -> bool:
        stdin, reply_fd = self.channel.open()
        worker = self.start_worker(self.name, "eval", ["eval-serve", "--reply-fd", str(reply_fd)],
                                   self.gpus, stdin=stdin, pass_fds=(reply_fd,))
        self.channel.attach(worker is not None)
        if worker is None:
            return False
        self.worker = worker
        where = f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "CPU"
        log.info("job %s: warm evaluator started on %s (pid %d)", self.name, where, worker.pid)
        return True

    def request(self, prefix: str, result: str, n: int, attempt: int = 1) -> None:
        """Evaluate ckpt-``n``; ``attempt`` > 1 tells the worker that an earlier attempt may have written
        its events already (then it takes them instead of writing them twice)."""
        self.busy = n
        if not self.channel.send({"checkpoint": prefix, "result": result, "attempt": attempt}):
            self.stop("evaluator pipe broken")

    def _broken(self, why: str) -> None:
        log.warning("job %s: evaluator: %s; restarting it", self.name, why)
        self.stop(why)

    def _handle(self, reply: dict) -> None:
        event = reply.get("event")
        if event == "ready":
            self.ready = True
            self.replies.on_ready()
        elif event in ("done", "failed") and self.busy is not None:
            n, self.busy = self.busy, None
            if event == "done":
                self.replies.on_done(n, str(reply.get("result", "")))
            else:
                self.replies.on_failed(n, str(reply.get("error", "evaluation failed")))

    def finish(self) -> None:
        """No more work: close stdin; the worker exits by itself."""
        self.channel.finish()

    def stop(self, reason: str) -> None:
        """Stop now if it is evaluating; an idle evaluator gets EOF and a few seconds to exit by itself."""
        busy = self.busy is not None
        self.finish()
        if self.worker is None:
            return
        stop_worker, name, worker = self.stop_worker, self.name, self.worker
        if busy:
            stop_worker(name, "eval", reason)
        else:  # only this process: a new evaluator of the job may have started by then
            self.loop.call_later(FINISH_GRACE_SECONDS, lambda: stop_worker(name, "eval", reason, only=worker))

    def close(self) -> None:
        """After the process exited: take the replies it sent before dying, then release our ends."""
        self.ready = False  # nothing more is sent to it
        self.channel.close()
