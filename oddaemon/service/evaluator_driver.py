"""Driving one job's warm evaluator: its placement, the due checkpoints in save order one at a time, its replies.

Failures and exits count failed attempts, retried with backoff. The decisions (which checkpoint is
due, when a failed one is retried or given up, what is best) are the book's (``evalbook``); what
follows an evaluation (the best, the pins, early stopping) is the job's (``EvaluationOutcomes``,
implemented by ``evaluation.JobEvaluation``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.procs import Worker
from oddaemon.core import events as msg
from oddaemon.core.evalbook import CheckpointEval, Finished
from oddaemon.service.evaluation_record import EvaluationRecord, read_result
from oddaemon.service.warm import WarmEvaluator

if TYPE_CHECKING:
    from oddaemon.service.reaction import ReactionTrace

log = logging.getLogger("oddaemon.service.evaluator_driver")

PLACEMENT_RETRY_SECONDS = 10.0
EVALUATOR_RETRY_SECONDS = 10.0


class EvaluationOutcomes(Protocol):
    """What the job does with the driver's results."""

    def still_there(self, c: CheckpointEval) -> bool:
        """A due checkpoint's files can still be read (pinned again if need be)."""

    def evaluated(self, n: int, finished: Finished) -> None:
        """Checkpoint ``n`` is evaluated (recorded and saved): the best, its pin, early stopping."""

    def given_up(self, n: int) -> None:
        """Checkpoint ``n`` failed for good: its pin may go."""

    def nothing_due(self) -> None:
        """Nothing is due and no retry waits."""


class EvaluatorDriver:
    """One job's evaluator and the order of its work. ``start_worker`` and ``stop_worker`` as for
    ``WarmEvaluator``; ``dispatch`` sends events to the scheduler; ``trace``: the stage timings of
    ``bench/reaction`` (None: off)."""

    def __init__(self, name: str, record: EvaluationRecord, loop: Loop, dispatch: Callable[[msg.Event], object],
                 start_worker: Callable[..., Worker | None], stop_worker: Callable[[str, str, str], object],
                 clock: Callable[[], float], outcomes: EvaluationOutcomes, trace: ReactionTrace | None = None):
        self.name = name
        self.record = record
        self.book = record.book
        self.loop = loop
        self.dispatch = dispatch
        self.start_worker = start_worker
        self.stop_worker = stop_worker
        self.clock = clock
        self.outcomes = outcomes
        self.trace = trace
        self.evaluator: WarmEvaluator | None = None
        self.placement_pending = False
        self.timer: object | None = None

    def cancel_timer(self) -> None:
        if self.timer is not None:
            self.loop.remove(self.timer)
            self.timer = None

    def pump(self) -> None:
        """Hand the evaluator the next due checkpoint, when it is free (or ask for an evaluator)."""
        self.cancel_timer()
        now = self.clock()
        due = self.book.next_due(now)
        if due is None:
            retry = self.book.next_retry_at()
            if retry is not None:
                self.timer = self.loop.call_later(max(0.0, retry - now), self.pump)
            else:
                self.outcomes.nothing_due()
            return
        if self.evaluator is None:
            if not self.placement_pending:
                self.placement_pending = True
                self.dispatch(msg.PlaceEvaluator(self.name))
            return
        if not self.evaluator.ready or self.evaluator.busy:
            return
        checking = time.perf_counter()
        if not self.outcomes.still_there(due):
            log.warning("job %s: ckpt-%d was deleted before it could be evaluated", self.name, due.n)
            self.book.miss(due.n, now, "its files were deleted before it could be evaluated")
            self.record.save()
            self.pump()
            return
        recording = time.perf_counter()
        self.book.start(due.n, now)
        self.record.save()  # the journal line; its fsync runs off this path (bookfile: "Durability")
        sending = time.perf_counter()
        if due.attempts == 1:  # a result file left from a book that was lost is not this evaluation's
            self.record.forget_result(due.n)
        self.evaluator.request(due.prefix, self.record.result_path(due.n), due.n, due.attempts)
        if self.trace is not None:
            sent = time.perf_counter()
            self.trace.sent(self.name, due.n, recording - checking, sending - recording, sent - sending, False)

    def warm_up(self) -> None:
        """Training starts: start the evaluator now, before any checkpoint is due, so that it builds its
        model while the trainer builds its own (the caller knows its place needs no new GPU)."""
        if self.evaluator is None and not self.placement_pending and self.timer is None:
            self.placement_pending = True
            self.dispatch(msg.PlaceEvaluator(self.name))

    def placed(self, gpus: tuple[int, ...] | None) -> None:
        """The scheduler's placement for the evaluator (None: device = "gpu" and none is free yet)."""
        self.placement_pending = False
        if gpus is None:
            self.timer = self.loop.call_later(PLACEMENT_RETRY_SECONDS, self.pump)
            return
        if self.evaluator is None:
            self.evaluator = WarmEvaluator(self.name, gpus, self.loop, self.start_worker, self.stop_worker, self)
            if not self.evaluator.start():
                self.evaluator = None
                self.dispatch(msg.EvaluatorStopped(self.name))
                # try again later (not at once: a worker that cannot start would loop)
                self.timer = self.loop.call_later(EVALUATOR_RETRY_SECONDS, self.pump)

    # ---- the evaluator's replies (warm.EvaluatorReplies)
    def on_ready(self) -> None:
        self.pump()

    def on_done(self, n: int, result_path: str) -> None:
        now = self.clock()
        try:
            step, metrics = read_result(result_path)
        except ValueError as exc:
            self.on_failed(n, str(exc))
            return
        finished = self.book.finish(n, step, metrics, now)
        self.record.save()
        log.info("job %s: evaluated ckpt-%d (step %s): %s = %s", self.name, n, step, self.book.policy.metric,
                 metrics.get(self.book.policy.metric))
        self.outcomes.evaluated(n, finished)
        self.pump()

    def _result_written(self, n: int) -> bool:
        """The dead evaluator wrote ckpt-``n``'s result file (atomically) but not its reply: the
        evaluation is done; it is taken as such instead of being run (and written) a second time."""
        path = self.record.result_path(n)
        try:
            read_result(path)
        except ValueError:
            return False
        log.info("job %s: the evaluator exited after writing the result of ckpt-%d; taking it", self.name, n)
        evaluator, self.evaluator = self.evaluator, None
        self.dispatch(msg.EvaluatorStopped(self.name))
        evaluator.busy = None
        self.on_done(n, path)
        return True

    def on_failed(self, n: int, error: str) -> None:
        retried = self.book.fail(n, error, self.clock())
        log.warning("job %s: evaluation of ckpt-%d failed (%s)%s", self.name, n, error,
                    "; will retry" if retried else "; giving up on this checkpoint")
        if not retried:
            self.outcomes.given_up(n)
        self.record.save()
        self.pump()

    def on_exit(self, returncode: int, detail: str) -> None:
        """The evaluator process exited: the checkpoint it was on counts a failed attempt."""
        if self.evaluator is not None:
            self.evaluator.close()  # may still deliver a "done" it wrote before exiting
            busy = self.evaluator.busy
            if busy is not None and self._result_written(busy):
                return
        self.evaluator = None
        self.dispatch(msg.EvaluatorStopped(self.name))
        n = self.book.interrupted(self.clock(), f"evaluator exited ({detail or returncode})")
        if n is not None:
            self.record.save()
            log.warning("job %s: evaluator died during ckpt-%d (%s); retrying", self.name, n, detail or returncode)
        self.pump()

    def finish(self) -> None:
        """No more work: the evaluator's stdin is closed; it exits 0 (then EvaluatorStopped)."""
        if self.evaluator is not None:
            self.evaluator.finish()

    def stop(self, reason: str) -> None:
        """The job's evaluation is torn down: no more timers; the evaluator is stopped."""
        self.cancel_timer()
        if self.evaluator is not None:
            self.evaluator.stop(reason)
