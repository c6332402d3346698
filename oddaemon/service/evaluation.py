"""Checkpoint evaluation of the jobs with ``[eval] enabled``: pins, book, evaluator, ``best/`` and export, wired.

Per job:

* the daemon's model_dir watcher calls ``rescan`` on every event that can change the set of
  complete checkpoints (and at start-up, and on queue overflow), so nothing written while the
  daemon was down or while events were lost is missed; each new complete checkpoint is **pinned**
  at once (``adapters/pins.py``), so ``checkpoint_max_to_keep`` cannot delete it before evaluation;
* the book (``core/evalbook.py``) decides what is due; it is persisted with the result files by
  ``evaluation_record.py``;
* a **warm evaluator** (one long-lived worker per job, on the placement the scheduler gives) is
  handed checkpoint after checkpoint in save order, one at a time (``evaluator_driver.py``,
  ``warm.py``); if it dies, the checkpoint it was on is retried with backoff. It is started when
  training starts (``warm_up``), so that it builds its model while the trainer builds its own and the
  first checkpoint is evaluated at once, where its place is known then: ``[eval] device = "cpu"``, or
  an eval GPU the job already holds (a GPU is taken for evaluation only when a checkpoint is due);
* the reaction to a new checkpoint (inotify -> listing -> pin -> journal line -> request in the
  evaluator's pipe) does no fsync and waits for no timer: the journal's fsync runs on a thread of its
  own (``adapters/bookfile.py``, "Durability", for why the order is safe); ``reaction.py`` times the
  stages for ``bench/reaction``;
* the best checkpoint (``[eval] metric`` / ``higher_is_better``) lives in ``model_dir/best`` with
  ``best.json`` (``best_checkpoint.py``); with ``export_best`` it is exported to
  ``model_dir/exported`` by a worker that reads a pin of its own (``exports.py``: at the end by
  default, or each new best);
* patience runs out -> ``EarlyStop``; training over and all evaluated -> ``EvaluationsDone``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.pins import Pins
from oddaemon.adapters.procs import Worker
from oddaemon.core import events as msg
from oddaemon.core.checkpoints import complete_checkpoints
from oddaemon.core.evalbook import CheckpointEval, EvalBook, EvalPolicy, Finished
from oddaemon.core.jobs import Job
from oddaemon.core.pinbudget import PinBudget
from oddaemon.core.states import JobState
from oddaemon.service.best_checkpoint import BestCheckpoint
from oddaemon.service.evaluation_record import EvaluationRecord, SavedBooks
from oddaemon.service.evaluator_driver import EvaluatorDriver
from oddaemon.service.exports import JobExports
from oddaemon.service.reaction import ReactionTrace

log = logging.getLogger("oddaemon.service.evaluation")


def policy_for(job: Job) -> EvalPolicy:
    e = job.spec.eval
    return EvalPolicy(metric=e.metric, higher_is_better=e.higher_is_better, min_delta=e.min_delta,
                      patience=e.patience, when_behind=e.when_behind, max_behind=e.max_behind)


class JobEvaluation:
    """One job's pins, record, evaluator, best checkpoint and exports (``evaluator_driver.EvaluationOutcomes``)."""

    def __init__(self, owner: Evaluations, job: Job):
        self.owner = owner
        self.name = job.name
        self.job = job
        self.model_dir = job.spec.model_dir
        self.pins = Pins(self.name, self.model_dir)
        self.record = EvaluationRecord(owner.state_dir, self.name, policy_for(job))
        self.book = self.record.book
        self.pins.make_dir()
        self.training_over = False
        self.exports = JobExports(self.name, self.model_dir, lambda prefix, output, info: owner.start_export(
            self.name, prefix, output, info)) if job.spec.eval.export_best else None
        self.best = BestCheckpoint(self.name, self.model_dir, self.book, self.pins, owner.loop, self._best_placed)
        self.driver = EvaluatorDriver(self.name, self.record, owner.loop, owner.dispatch, owner.start_worker,
                                      owner.stop_worker, owner.clock, self, owner.trace)

    # ---- pinning (the daemon's ModelDirWatcher calls rescan on every checkpoint event)
    def rescan(self) -> None:
        trace = self.owner.trace
        rescan_at, started = (time.time(), time.perf_counter()) if trace is not None else (0.0, 0.0)
        try:
            listing = os.listdir(self.model_dir)
        except OSError as exc:
            log.warning("job %s: cannot list model_dir %s: %s", self.name, self.model_dir, exc.strerror)
            return
        now = self.owner.clock()
        added = False
        complete = complete_checkpoints(listing)
        listed = time.perf_counter() if trace is not None else 0.0
        new: list[int] = []
        known = self.book.newest or 0
        # Checkpoints are numbered by save count: a gap below a new one was written and deleted by
        # max_to_keep before the daemon could pin it (a daemon far behind a checkpoint flood). It is
        # recorded missed, never silently lost.
        for n in range(known + 1, max(complete, default=0)):
            if n not in complete and not os.path.exists(os.path.join(self.model_dir, f"ckpt-{n}.index")):
                self.book.add_missed(n, now, "deleted by checkpoint_max_to_keep before it could be pinned")
                added = True
        for n in complete:
            if n in self.book.checkpoints:
                continue
            pin_started = time.perf_counter() if trace is not None else 0.0
            prefix = self.pins.pin(n, listing)
            if prefix is None:
                self.book.add_missed(n, now, "deleted before it could be pinned")
                log.warning("job %s: checkpoint ckpt-%d vanished before it could be pinned", self.name, n)
            else:
                self.book.add(n, prefix, self._completed_at(prefix, now))
                added = True
                new.append(n)
                if trace is not None:
                    trace.arrived(self.name, n, rescan_at, listed - started, time.perf_counter() - pin_started)
        # Pins of checkpoints the book already knows (after a restart) stay valid: nothing to do.
        if added:
            skipped = self.book.apply_skip_policy()
            for n in skipped:
                self.pins.unpin(n)
        cap = self.job.spec.eval.max_pinned_bytes or self.owner.pin_budget.max_bytes_per_job
        released = self.pins.keep_within(self.book, set(listing), self.owner.pin_budget, cap, now)
        if added or released:
            saving = time.perf_counter() if trace is not None else 0.0
            self.record.save()  # journal lines, no fsync on this path (bookfile: "Durability")
            if trace is not None:
                trace.recorded(self.name, new, time.perf_counter() - saving)
            self.driver.pump()
            if trace is not None:
                trace.rescan_done(self.name)

    @staticmethod
    def _completed_at(prefix: str, now: float) -> float:
        """When the checkpoint became complete: its index was closed just before (its mtime)."""
        try:
            return min(now, os.stat(prefix + ".index").st_mtime)
        except OSError:
            return now

    # ---- what follows the evaluator's work (EvaluationOutcomes)
    def still_there(self, c: CheckpointEval) -> bool:
        """A waiting checkpoint can still be read: its pin exists, or (pins deleted with model_dir) it pins again."""
        if os.path.exists(c.prefix + ".index"):
            return True
        try:
            listing = os.listdir(self.model_dir)
        except OSError:
            return False
        prefix = self.pins.pin(c.n, listing) if c.n in complete_checkpoints(listing) else None
        if prefix is not None and prefix != c.prefix:
            c.prefix = prefix
            self.book.touched(c.n)
        return prefix is not None

    def evaluated(self, n: int, finished: Finished) -> None:
        if finished.improved:
            self.best.offer(n)
        elif n != self.book.best_n:
            self.pins.unpin(n)
        self.owner.checkpoint_evaluated(self.name, self.book.checkpoints[n])
        if finished.early_stop and not self.training_over:
            self.owner.dispatch(msg.EarlyStop(self.name, finished.early_stop))

    def given_up(self, n: int) -> None:
        self.pins.unpin(n)

    def nothing_due(self) -> None:
        if self.training_over and self.book.drained():
            self._finish()

    # ---- the end
    def training_ended(self) -> None:
        self.training_over = True
        self.rescan()
        self.book.training_ended()
        self.record.save()
        self.driver.pump()

    def _finish(self) -> None:
        self.best.place_now()
        self.driver.finish()  # closes the evaluator's stdin: it exits 0, then EvaluatorStopped
        if self.exports is not None:
            best = self.book.best()
            if best is not None:
                self.exports.offer_final_best(best, self.book.policy)
            if not self.exports.idle:
                return  # EvaluationsDone once the last export has exited (on_export_exit)
        self.owner.dispatch(msg.EvaluationsDone(self.name))

    def _best_placed(self, n: int) -> None:
        if self.exports is not None and self.job.spec.eval.export_when == "each_best":
            self.exports.offer_best(self.book.checkpoints[n], self.book.policy)

    def on_export_exit(self, returncode: int, detail: str) -> None:
        self.exports.exited(returncode, detail)
        if self.exports.idle and self.training_over and self.book.drained():
            self._finish()

    def stop(self, reason: str) -> None:
        self.best.place_now()
        self.driver.stop(reason)  # its retry timer too
        if self.exports is not None:
            self.exports.stop()
        self.close()

    def close(self) -> None:
        self.record.close()


class Evaluations:
    """All jobs' evaluations; the daemon forwards actions and worker exits here."""

    def __init__(self, loop: Loop, state_dir: str, dispatch: Callable[[msg.Event], object],
                 start_worker: Callable[..., Worker | None], stop_worker: Callable[[str, str, str], object],
                 clock: Callable[[], float] = time.time, pin_budget: PinBudget | None = None):
        self.loop = loop
        self.pin_budget = pin_budget if pin_budget is not None else PinBudget()
        self.state_dir = state_dir
        self.dispatch = dispatch
        self.start_worker = start_worker  # (name, role, args, gpus, stdin=None, pass_fds=()) -> Worker | None
        self.stop_worker = stop_worker  # (name, role, reason)
        self.clock = clock
        self.trace = ReactionTrace.from_environment()  # bench/reaction's stage timings (None: off)
        self.jobs: dict[str, JobEvaluation] = {}
        self.saved_books = SavedBooks(state_dir)  # finished jobs' books, as last read
        self.listeners: list[Callable[[str, object], None]] = []

    def ensure(self, job: Job) -> JobEvaluation | None:
        if not job.spec.eval.enabled:
            return None
        if job.name not in self.jobs:
            self.jobs[job.name] = JobEvaluation(self, job)
        return self.jobs[job.name]

    def training_started(self, job: Job) -> None:
        """A train worker started (not one that was refused): the job's evaluator starts too, where its
        place needs no new GPU (``EvaluatorDriver.warm_up``), and builds its model meanwhile."""
        ev = self.jobs.get(job.name)
        if ev is not None and job.state is JobState.RUNNING and (job.spec.eval.device == "cpu" or job.eval_gpus):
            ev.driver.warm_up()

    def close(self) -> None:
        """The daemon stops: every live book written whole."""
        for ev in self.jobs.values():
            ev.close()
        if self.trace is not None:
            self.trace.close()

    def rescan(self, name: str) -> None:
        if name in self.jobs:
            self.jobs[name].rescan()

    def on_action(self, action: msg.Action, job: Job | None) -> None:
        if isinstance(action, msg.TrainingEnded) and job is not None:
            ev = self.ensure(job)
            if ev is not None:
                ev.training_ended()
            else:
                self.dispatch(msg.EvaluationsDone(job.name))
        elif isinstance(action, msg.EvalPlacement) and action.name in self.jobs:
            self.jobs[action.name].driver.placed(action.gpus)
        elif isinstance(action, msg.StopEvaluator) and action.name in self.jobs:
            self.jobs.pop(action.name).stop(action.reason)

    def on_worker_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        ev = self.jobs.get(worker.name)
        if ev is None:
            return
        if worker.role == "eval":
            current = ev.driver.evaluator
            if current is not None and current.worker is not None and current.worker is not worker:
                return  # an earlier evaluator of the job, stopped before this one started
            ev.driver.on_exit(returncode, detail)
        elif worker.role == "export" and ev.exports is not None:
            ev.on_export_exit(returncode, detail)

    def start_export(self, name: str, prefix: str, output: str, info: str) -> bool:
        args = ["export", "--checkpoint", prefix, "--output", output, "--info", info]
        return self.start_worker(name, "export", args, ()) is not None

    def checkpoint_evaluated(self, name: str, record: object) -> None:
        for listener in self.listeners:
            listener(name, record)

    def book(self, name: str) -> EvalBook | None:
        """A job's book: the live one, or (a finished job) the saved one, read again only when its files change."""
        ev = self.jobs.get(name)
        return ev.book if ev is not None else self.saved_books.get(name)
