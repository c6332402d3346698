"""Checkpoint watching and evaluation orchestration (the I/O side; decisions live in
``evalbook.py`` and the scheduler).

Per job with ``[eval] enabled``:

* inotify on ``model_dir``: every event that can change the set of complete checkpoints triggers a
  re-listing (``checkpoints.complete_checkpoints``); a rescan runs at start-up and on queue
  overflow too, so nothing written while the daemon was down or while events were lost is missed;
* each new complete checkpoint is **pinned** at once: hard links in ``model_dir/.oddaemon/pins``
  (same filesystem, no copy), so ``checkpoint_max_to_keep`` cannot delete it before evaluation;
* a **warm evaluator** (one long-lived worker per job, started on the placement the scheduler
  gives) builds the model once and is handed checkpoint after checkpoint over a pipe, in save
  order, one at a time; if it dies, the checkpoint it was on is retried with backoff;
* the best checkpoint (``[eval] metric`` / ``higher_is_better``) lives in ``model_dir/best`` with
  ``best.json``; with ``export_best`` it is exported to ``model_dir/exported`` by a worker that reads
  a pin of its own (``exports.py``: at the end by default, or each new best);
* patience runs out -> ``EarlyStop``; training over and all evaluated -> ``EvaluationsDone``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

from oddaemon.adapters import bookfile
from oddaemon.core import events as msg
from oddaemon.core.checkpoints import complete_checkpoints
from oddaemon.core.evalbook import EvalBook, EvalPolicy
from oddaemon.service.exports import JobExports
from oddaemon.core.jobs import Job
from oddaemon.adapters.loop import Loop
from oddaemon.core.pinbudget import PinBudget
from oddaemon.adapters.pins import Pins
from oddaemon.adapters.procs import Worker
from oddaemon.adapters.store import remove_stale_temps
from oddaemon.service.warm import WarmEvaluator

log = logging.getLogger("oddaemon.service.evaluation")

PLACEMENT_RETRY_SECONDS = 10.0
# model_dir/best is swapped at most this often (a flood of ever better checkpoints would otherwise
# rebuild it at every evaluation); a best that a better one replaces before its turn is never placed.
BEST_MIN_INTERVAL = 0.5
EVALUATOR_RETRY_SECONDS = 10.0


def policy_for(job: Job) -> EvalPolicy:
    e = job.spec.eval
    return EvalPolicy(metric=e.metric, higher_is_better=e.higher_is_better, min_delta=e.min_delta,
                      patience=e.patience, when_behind=e.when_behind, max_behind=e.max_behind)


class JobEvaluation:
    """One job's watch, pins, book, evaluator and exporter."""

    def __init__(self, owner: "Evaluations", job: Job):
        self.owner = owner
        self.name = job.name
        self.job = job
        self.model_dir = job.spec.model_dir
        self.pins = Pins(self.name, self.model_dir)
        self.results = os.path.join(owner.state_dir, "evals", self.name)
        self.book_path = os.path.join(owner.state_dir, "evals", f"{self.name}.json")
        remove_stale_temps(os.path.dirname(self.book_path))  # left by a daemon killed mid-write
        self.bookfile = bookfile.BookFile(self.book_path, label=self.name)
        self.book = self._load_book()
        for d in (self.results, self.pins.dir):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as exc:  # model_dir read-only or gone: _pin tries again, and says so
                log.warning("job %s: cannot create %s: %s", self.name, d, exc.strerror)
        self.evaluator: WarmEvaluator | None = None
        self.placement_pending = False
        self.training_over = False
        self.exports = JobExports(self.name, self.model_dir, lambda prefix, output, info: owner.start_export(
            self.name, prefix, output, info)) if job.spec.eval.export_best else None
        self.timer: object | None = None
        self.best_due: int | None = None  # a new best waiting for its turn in model_dir/best
        self.best_placed_at = -BEST_MIN_INTERVAL
        self.best_timer: object | None = None

    def _load_book(self) -> EvalBook:
        try:
            book, journal_lines = bookfile.load(self.book_path, policy_for(self.job))
        except FileNotFoundError:
            return EvalBook(policy_for(self.job))
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("job %s: evaluation record %s unreadable (%s); starting a new one", self.name, self.book_path, exc)
            return EvalBook(policy_for(self.job))
        book.interrupted(time.time(), "the daemon restarted during this evaluation")
        if journal_lines or book.checkpoints:
            self.bookfile.compact(book)  # one snapshot again: nothing is appended after a torn line
        return book

    def save(self) -> None:
        """Persist what changed (a journal line per changed checkpoint: ``bookfile``)."""
        self.bookfile.save(self.book)

    # ---- pinning (the daemon's ModelDirWatcher calls rescan on every checkpoint event)
    def rescan(self) -> None:
        try:
            listing = os.listdir(self.model_dir)
        except OSError as exc:
            log.warning("job %s: cannot list model_dir %s: %s", self.name, self.model_dir, exc.strerror)
            return
        now = self.owner.clock()
        added = False
        complete = complete_checkpoints(listing)
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
            prefix = self.pins.pin(n, listing)
            if prefix is None:
                self.book.add_missed(n, now, "deleted before it could be pinned")
                log.warning("job %s: checkpoint ckpt-%d vanished before it could be pinned", self.name, n)
            else:
                self.book.add(n, prefix, self._completed_at(prefix, now))
                added = True
        # Pins of checkpoints the book already knows (after a restart) stay valid: nothing to do.
        if added:
            skipped = self.book.apply_skip_policy()
            for n in skipped:
                self.pins.unpin(n)
        cap = self.job.spec.eval.max_pinned_bytes or self.owner.pin_budget.max_bytes_per_job
        released = self.pins.keep_within(self.book, set(listing), self.owner.pin_budget, cap, now)
        if added or released:
            self.save()
            self.pump()

    @staticmethod
    def _completed_at(prefix: str, now: float) -> float:
        """When the checkpoint became complete: its index was closed just before (its mtime)."""
        try:
            return min(now, os.stat(prefix + ".index").st_mtime)
        except OSError:
            return now

    def _still_there(self, c) -> bool:
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

    # ---- driving the evaluator
    def pump(self) -> None:
        if self.timer is not None:
            self.owner.loop.remove(self.timer)
            self.timer = None
        now = self.owner.clock()
        due = self.book.next_due(now)
        if due is None:
            retry = self.book.next_retry_at()
            if retry is not None:
                self.timer = self.owner.loop.call_later(max(0.0, retry - now), self.pump)
            elif self.training_over and self.book.drained():
                self._finish()
            return
        if self.evaluator is None:
            if not self.placement_pending:
                self.placement_pending = True
                self.owner.dispatch(msg.PlaceEvaluator(self.name))
            return
        if not self.evaluator.ready or self.evaluator.busy:
            return
        if not self._still_there(due):
            log.warning("job %s: ckpt-%d was deleted before it could be evaluated", self.name, due.n)
            self.book.miss(due.n, now, "its files were deleted before it could be evaluated")
            self.save()
            self.pump()
            return
        self.book.start(due.n, now)
        self.save()
        result = os.path.join(self.results, f"ckpt-{due.n}.json")
        self.evaluator.request(due.prefix, result, due.n)

    def placed(self, gpus: tuple[int, ...] | None) -> None:
        self.placement_pending = False
        if gpus is None:  # device = "gpu" and none is free yet
            self.timer = self.owner.loop.call_later(PLACEMENT_RETRY_SECONDS, self.pump)
            return
        if self.evaluator is None:
            self.evaluator = WarmEvaluator(self, gpus)
            if not self.evaluator.start():
                self.evaluator = None
                self.owner.dispatch(msg.EvaluatorStopped(self.name))
                # try again later (not at once: a worker that cannot start would loop)
                self.timer = self.owner.loop.call_later(EVALUATOR_RETRY_SECONDS, self.pump)

    def on_ready(self) -> None:
        self.pump()

    def on_done(self, n: int, result_path: str) -> None:
        now = self.owner.clock()
        try:
            with open(result_path, "rb") as f:
                result = json.loads(f.read())
            metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
            step = result.get("step")
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            self.on_failed(n, f"unreadable result {result_path}: {exc}")
            return
        finished = self.book.finish(n, step, metrics, now)
        self.save()
        log.info("job %s: evaluated ckpt-%d (step %s): %s = %s", self.name, n, step, self.book.policy.metric,
                 metrics.get(self.book.policy.metric))
        if finished.improved:
            self._new_best(n)
        elif n != self.book.best_n:
            self.pins.unpin(n)
        self.owner.checkpoint_evaluated(self.name, self.book.checkpoints[n])
        if finished.early_stop and not self.training_over:
            self.owner.dispatch(msg.EarlyStop(self.name, finished.early_stop))
        self.pump()

    def on_failed(self, n: int, error: str) -> None:
        retried = self.book.fail(n, error, self.owner.clock())
        log.warning("job %s: evaluation of ckpt-%d failed (%s)%s", self.name, n, error,
                    "; will retry" if retried else "; giving up on this checkpoint")
        if not retried:
            self.pins.unpin(n)
        self.save()
        self.pump()

    def on_evaluator_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        if self.evaluator is not None:
            self.evaluator.close()  # may still deliver a "done" it wrote before exiting
        self.evaluator = None
        self.owner.dispatch(msg.EvaluatorStopped(self.name))
        n = self.book.interrupted(self.owner.clock(), f"evaluator exited ({detail or returncode})")
        if n is not None:
            self.save()
            log.warning("job %s: evaluator died during ckpt-%d (%s); retrying", self.name, n, detail or returncode)
        self.pump()

    def training_ended(self) -> None:
        self.training_over = True
        self.rescan()
        self.book.training_ended()
        self.save()
        self.pump()

    def _finish(self) -> None:
        self._place_best()
        if self.evaluator is not None:
            self.evaluator.finish()  # closes its stdin: it exits 0, then EvaluatorStopped
        if self.exports is not None:
            best = self.book.best()
            if best is not None and best.n not in self.exports.tried and self.exports.exported_checkpoint() != best.n:
                self._export(best.n)  # the final best, whatever export_when says (after a running one)
            if not self.exports.idle:
                return  # EvaluationsDone once the last export has exited (on_export_exit)
        self.owner.dispatch(msg.EvaluationsDone(self.name))

    def stop(self, reason: str) -> None:
        if self.timer is not None:
            self.owner.loop.remove(self.timer)
            self.timer = None
        self._place_best()
        if self.evaluator is not None:
            self.evaluator.stop(reason)
        if self.exports is not None:
            self.exports.stop()
        self.close()

    def close(self) -> None:
        """Write the whole book (a finished job's snapshot is complete, its journal empty) and let go of the journal."""
        self.bookfile.compact(self.book)
        self.bookfile.close()

    # ---- best checkpoint and export
    def _new_best(self, n: int) -> None:
        waiting = self.best_due
        if waiting is not None and waiting != n:
            self.pins.unpin(waiting)  # replaced before its turn: never placed
        self.best_due = n
        wait = self.best_placed_at + BEST_MIN_INTERVAL - time.monotonic()
        if wait <= 0:
            self._place_best()
        elif self.best_timer is None:
            self.best_timer = self.owner.loop.call_later(wait, self._best_turn)

    def _best_turn(self) -> None:
        self.best_timer = None  # fired: removing it again would make GLib warn
        self._place_best()

    def _place_best(self) -> None:
        if self.best_timer is not None:
            self.owner.loop.remove(self.best_timer)
            self.best_timer = None
        n, self.best_due = self.best_due, None
        if n is None:
            return
        self.best_placed_at = time.monotonic()
        try:
            self._update_best(n)
        except OSError as exc:
            log.error("job %s: cannot keep the best checkpoint ckpt-%d in %s/best: %s", self.name, n,
                      self.model_dir, exc)

    def _update_best(self, n: int) -> None:
        c = self.book.checkpoints[n]
        previous = self.pins.keep_best(n, {
            "checkpoint": f"ckpt-{n}", "step": c.step, "metric": self.book.policy.metric,
            "value": self.book.best_value, "higher_is_better": self.book.policy.higher_is_better,
            "metrics": c.metrics, "evaluated_at": c.finished_at})
        if previous is not None and previous != n and previous in self.book.checkpoints:
            self.pins.unpin(previous)
        log.info("job %s: new best ckpt-%d (step %s) %s = %.4g", self.name, n, c.step, self.book.policy.metric,
                 self.book.best_value)
        if self.exports is not None and self.job.spec.eval.export_when == "each_best":
            self._export(n)

    def _export(self, n: int) -> None:
        c = self.book.checkpoints[n]
        if c.step == 0:  # TF writes it before the first step, before the model's variables all exist
            log.info("job %s: not exporting ckpt-%d: it is the untrained step-0 checkpoint, which does not hold "
                     "the whole model", self.name, n)
            self.exports.tried.add(n)
            return
        self.exports.want(n, os.path.join(self.model_dir, "best", f"ckpt-{n}"), {
            "job": self.name, "checkpoint": f"ckpt-{n}", "step": c.step, "metric": self.book.policy.metric,
            "value": c.metrics.get(self.book.policy.metric), "higher_is_better": self.book.policy.higher_is_better,
            "metrics": c.metrics, "evaluated_at": c.finished_at})

    def on_export_exit(self, returncode: int, detail: str) -> None:
        self.exports.exited(returncode, detail)
        if self.exports.idle and self.training_over and self.book.drained():
            self._finish()


class Evaluations:
    """All jobs' evaluations; the daemon forwards actions and worker exits here."""

    def __init__(self, loop: Loop, state_dir: str, dispatch: Callable[[msg.Event], object],
                 start_worker: Callable[..., Worker | None], stop_worker: Callable[[str, str, str], object],
                 clock: Callable[[], float] = time.time, pin_budget: PinBudget = PinBudget()):
        self.loop = loop
        self.pin_budget = pin_budget
        self.state_dir = state_dir
        self.dispatch = dispatch
        self.start_worker = start_worker  # (name, role, args, gpus, stdin=None, pass_fds=()) -> Worker | None
        self.stop_worker = stop_worker  # (name, role, reason)
        self.clock = clock
        self.jobs: dict[str, JobEvaluation] = {}
        self.saved_books: dict[str, tuple[list, EvalBook | None]] = {}  # finished jobs' books, as last read
        self.listeners: list[Callable[[str, object], None]] = []

    def ensure(self, job: Job) -> JobEvaluation | None:
        if not job.spec.eval.enabled:
            return None
        if job.name not in self.jobs:
            self.jobs[job.name] = JobEvaluation(self, job)
        return self.jobs[job.name]

    def close(self) -> None:
        """The daemon stops: every live book written whole."""
        for ev in self.jobs.values():
            ev.close()

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
            self.jobs[action.name].placed(action.gpus)
        elif isinstance(action, msg.StopEvaluator) and action.name in self.jobs:
            self.jobs.pop(action.name).stop(action.reason)

    def on_worker_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        ev = self.jobs.get(worker.name)
        if ev is None:
            return
        if worker.role == "eval":
            ev.on_evaluator_exit(worker, returncode, detail)
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
        if ev is not None:
            return ev.book
        path = os.path.join(self.state_dir, "evals", f"{name}.json")
        signature = []
        for p in (path, bookfile.journal_path(path)):
            try:
                st = os.stat(p)
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                signature.append(None)
        cached = self.saved_books.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            book = bookfile.load(path, EvalPolicy())[0]
        except (OSError, ValueError, TypeError, KeyError):
            book = None
        self.saved_books[name] = (signature, book)
        return book
