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

import json
import logging
import os
from typing import TYPE_CHECKING

from oddaemon.procs import Worker

if TYPE_CHECKING:
    from oddaemon.evaluation import JobEvaluation

log = logging.getLogger("oddaemon.warm")
MAX_REPLY_LINE = 1 << 20
FINISH_GRACE_SECONDS = 5.0


class WarmEvaluator:
    def __init__(self, job: "JobEvaluation", gpus: tuple[int, ...]):
        self.job = job
        self.gpus = gpus
        self.worker: Worker | None = None
        self.ready = False
        self.busy: int | None = None  # the checkpoint number in flight
        self._request_fd: int | None = None
        self._reply_fd: int | None = None
        self._reply_handle: object | None = None
        self._buffer = b""

    def start(self) -> bool:
        req_r, req_w = os.pipe2(os.O_CLOEXEC)
        rep_r, rep_w = os.pipe2(os.O_CLOEXEC)
        owner = self.job.owner
        worker = owner.start_worker(self.job.name, "eval", ["eval-serve", "--reply-fd", str(rep_w)], self.gpus,
                                    stdin=req_r, pass_fds=(rep_w,))
        os.close(req_r)
        os.close(rep_w)
        if worker is None:
            os.close(req_w)
            os.close(rep_r)
            return False
        self.worker = worker
        self._request_fd = req_w
        self._reply_fd = rep_r
        os.set_blocking(rep_r, False)
        self._reply_handle = owner.loop.add_reader(rep_r, self._on_reply)
        where = f"GPU {','.join(map(str, self.gpus))}" if self.gpus else "CPU"
        log.info("job %s: warm evaluator started on %s (pid %d)", self.job.name, where, worker.pid)
        return True

    def request(self, prefix: str, result: str, n: int) -> None:
        self.busy = n
        line = (json.dumps({"checkpoint": prefix, "result": result}) + "\n").encode()
        try:
            os.write(self._request_fd, line)  # a few hundred bytes: fits the pipe buffer
        except OSError as exc:
            log.warning("job %s: cannot send a checkpoint to the evaluator: %s", self.job.name, exc.strerror)
            self.stop("evaluator pipe broken")

    def _on_reply(self) -> None:
        try:
            chunk = os.read(self._reply_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._close_reply()
            return
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._handle(line)
        if len(self._buffer) > MAX_REPLY_LINE:
            log.warning("job %s: evaluator sent an over-long reply; restarting it", self.job.name)
            self._buffer = b""
            self.stop("protocol error")

    def _handle(self, line: bytes) -> None:
        try:
            reply = json.loads(line)
            event = reply["event"]
        except (ValueError, KeyError, TypeError):
            log.warning("job %s: evaluator sent an unreadable reply: %r", self.job.name, line[:200])
            return
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
        if self._request_fd is not None:
            os.close(self._request_fd)
            self._request_fd = None

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

    def _close_reply(self) -> None:
        if self._reply_handle is not None:
            self.job.owner.loop.remove(self._reply_handle)
            self._reply_handle = None
        if self._reply_fd is not None:
            os.close(self._reply_fd)
            self._reply_fd = None

    def close(self) -> None:
        """After the process exited: take the replies it sent before dying, then release our ends."""
        self.ready = False  # nothing more is sent to it
        if self._reply_fd is not None:
            self._on_reply()
        self._close_reply()
        self.finish()
