"""What the daemon notifies: job transitions (``succeeded``, ``failed``), evaluations (``new_best``)
and two conditions watched every few seconds (``stalled``: no new training step for a job's
``stalled_after_seconds``; ``evaluator_behind``: more than ``[eval] max_behind`` checkpoints wait,
or checkpoints were skipped or released unevaluated). A condition is notified once per episode:
``stalled`` again only after a new step (or a new start), ``evaluator_behind`` again only after
the evaluator caught up (nothing waiting).

Each event goes to the job's targets (``core/notifications.py`` decides which), through
``adapters/notify.py`` (off the loop); each outcome becomes a history entry of the job (the
``NotificationRecorded`` event) and a count by target and result for the metrics. What still waits
when the daemon stops is kept in ``keep_path`` and sent by the next daemon (``core/notify_waiting.py``).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.notify import Sender
from oddaemon.adapters.store import atomic_write
from oddaemon.core import notifications as nt
from oddaemon.core import notify_waiting
from oddaemon.core import scheduler as sch
from oddaemon.core.errors import OperationError, user_message
from oddaemon.core.evalbook import EvalBook
from oddaemon.core.jobs import Job
from oddaemon.core.states import JobState

log = logging.getLogger("oddaemon")

POLL_SECONDS = 5.0  # how often stalled / evaluator_behind are checked (less when a job's stall time is shorter)
MIN_POLL_SECONDS = 0.5
WATCHED = (JobState.RUNNING, JobState.EVALUATING)
MAX_KEPT_BYTES = 64 << 20  # (queue_size x targets x a payload of a few KiB: far below)


class NotifyHook:
    """``progress(name)``: the job's training progress (``.step``) or None; ``counted(counts)``: the
    counts by (target, result) changed (a new dict each time: the metrics thread reads it)."""

    def __init__(self, settings: nt.Settings, loop: Loop, clock: Callable[[], float],
                 jobs: Callable[[], dict[str, Job]], progress: Callable[[str], object | None],
                 book: Callable[[str], EvalBook | None], dispatch: Callable[[sch.Event], object],
                 counted: Callable[[dict], None] = lambda counts: None, keep_path: str | None = None):
        self.keep_path = keep_path
        self.loop = loop
        self.clock = clock
        self.jobs = jobs
        self.progress = progress
        self.book = book
        self.dispatch = dispatch
        self.counted = counted
        self.host = socket.gethostname()
        self.counts: dict[tuple[str, str], int] = {}
        self.sender: Sender | None = None
        self.settings = settings
        self._steps: dict[str, tuple[int, int | None, float]] = {}  # name -> (attempt, step seen, since)
        self._stalled: set[str] = set()
        self._skipped: dict[str, int] = {}
        self._behind: set[str] = set()
        self._best: dict[str, float] = {}
        self._timer: object | None = None
        self.configure(settings)

    def configure(self, settings: nt.Settings) -> None:
        """At start and on reload."""
        self.settings = settings
        if self.sender is None and settings.targets:
            self.sender = Sender(self.loop, settings, self.outcome)
        elif self.sender is not None:
            self.sender.configure(settings)
        self._arm()

    def close(self) -> None:
        """The daemon stops: what still waits is kept for the next one."""
        if self._timer is not None:
            self.loop.remove(self._timer)
            self._timer = None
        if self.sender is not None:
            waiting = self.sender.close()
            self.sender = None
            if waiting and self.keep_path:
                try:
                    atomic_write(self.keep_path, notify_waiting.encode(waiting, self.settings), mode=0o600)
                    log.info("%d notification(s) still waiting, kept for the next start in %s", len(waiting),
                             self.keep_path)
                except OperationError as exc:
                    log.warning("%d notification(s) still waiting are lost: %s", len(waiting), user_message(exc))

    def restore(self) -> None:
        """At start, once the jobs are known: send what the daemon that stopped kept."""
        if not self.keep_path:
            return
        try:
            with open(self.keep_path, "rb") as f:
                raw = f.read(MAX_KEPT_BYTES + 1)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot read the kept notifications %s: %s", self.keep_path, exc.strerror or exc)
            return
        try:
            if len(raw) > MAX_KEPT_BYTES:
                raise ValueError(f"larger than {MAX_KEPT_BYTES} bytes")
            send, drop = notify_waiting.decode(raw, self.settings)
        except ValueError as exc:
            log.warning("the kept notifications %s cannot be used (%s); set aside as %s.bad", self.keep_path, exc,
                        self.keep_path)
            self._set_aside(os.replace, self.keep_path, self.keep_path + ".bad")
            return
        if not self._set_aside(os.unlink, self.keep_path):
            return  # (sending them now and again at every start would be worse than once not at all)
        for w, why in drop:
            self.outcome(nt.Outcome(w.job, w.event, w.target, "dropped", w.tries, why))
        for w in send:
            target = self.settings.target(w.target)
            if self.sender is not None and target is not None:
                self.sender.resend(w, target)
        if send or drop:
            log.info("notifications kept by the daemon that stopped: %d queued again, %d dropped", len(send),
                     len(drop))

    @staticmethod
    def _set_aside(operation: Callable[..., None], *paths: str) -> bool:
        try:
            operation(*paths)
            return True
        except OSError as exc:
            log.warning("cannot remove or rename %s: %s", paths[0], exc.strerror or exc)
            return False

    # ---- events
    def state_changed(self, change: sch.StateChanged) -> None:
        job = self.jobs().get(change.name)
        if job is None or change.new not in ("succeeded", "failed"):
            return
        now, spec = self.clock(), job.spec
        if change.new == "succeeded":
            book = self.book(job.name) if spec.eval.enabled else None
            best = book.best() if book is not None else None
            value = book.best_value if best is not None else None
            self.emit(job, nt.succeeded(job.name, now, self.host, change.reason, spec.model_dir, spec.eval.metric,
                                        value, best.step if best is not None else None))
        else:
            kind = job.failure.kind if job.failure is not None else None
            self.emit(job, nt.failed(job.name, now, self.host, change.reason, kind, spec.model_dir))

    def checkpoint_evaluated(self, name: str, record: object) -> None:
        job, book = self.jobs().get(name), self.book(name)
        if job is None or book is None or book.best_n is None or book.best_n != getattr(record, "n", None):
            return
        value = book.best_value
        if value is None:
            return
        previous = self._best.get(name)
        self._best[name] = value
        self.emit(job, nt.new_best(name, self.clock(), self.host, job.state.value, job.spec.eval.metric, value,
                                   getattr(record, "step", None), previous))

    # ---- the conditions
    def _arm(self) -> None:
        if self._timer is not None or self.sender is None:
            return
        shortest = min((nt.stalled_after(j.spec, self.settings) for j in self.jobs().values()
                        if j.state is JobState.RUNNING), default=POLL_SECONDS * 4)
        self._timer = self.loop.call_later(max(MIN_POLL_SECONDS, min(POLL_SECONDS, shortest / 4)), self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.clock()
        watched = {j.name: j for j in self.jobs().values() if j.state in WATCHED}
        for job in watched.values():
            events, _ = nt.choices(job.spec, self.settings)
            if "stalled" in events and job.state is JobState.RUNNING:
                self._check_stall(job, now)
            if "evaluator_behind" in events and job.spec.eval.enabled:
                self._check_behind(job, now)
        for table in (self._steps, self._skipped):
            for name in [n for n in table if n not in watched]:
                del table[name]
        self._stalled &= set(self._steps)
        self._behind &= set(self._skipped)
        self._arm()

    def _check_stall(self, job: Job, now: float) -> None:
        progress = self.progress(job.name)
        step = getattr(progress, "step", None)
        seen = self._steps.get(job.name)
        if seen is None or seen[0] != job.attempt:
            seen = self._steps[job.name] = (job.attempt, step, job.started_at or now)
            self._stalled.discard(job.name)
        elif step != seen[1]:
            self._steps[job.name] = (job.attempt, step, now)
            self._stalled.discard(job.name)
            return
        quiet = now - seen[2]
        if job.name not in self._stalled and quiet >= nt.stalled_after(job.spec, self.settings):
            self._stalled.add(job.name)
            self.emit(job, nt.stalled(job.name, now, self.host, quiet, step))

    def _check_behind(self, job: Job, now: float) -> None:
        book = self.book(job.name)
        if book is None:
            return
        waiting, skipped = book.pending_count(), book.counts().get("skipped", 0)
        before = self._skipped.setdefault(job.name, skipped)  # (skips before the daemon started are old news)
        self._skipped[job.name] = skipped
        if job.name in self._behind:
            if waiting == 0:
                self._behind.discard(job.name)
        elif waiting > job.spec.eval.max_behind or skipped > before:
            self._behind.add(job.name)
            self.emit(job, nt.evaluator_behind(job.name, now, self.host, job.state.value, waiting, skipped - before))

    # ---- delivery
    def emit(self, job: Job, event: dict) -> None:
        events, targets = nt.choices(job.spec, self.settings)
        if event["event"] not in events or self.sender is None:
            return
        for name in targets:
            target = self.settings.target(name)
            if target is None:  # removed from the configuration since the job was accepted
                self.outcome(nt.Outcome(job.name, event["event"], name, "failed", 0,
                                        "no such target in the daemon configuration any more"))
                continue
            self.sender.send(job.name, event["event"], target, nt.body(target, event))

    def outcome(self, outcome: nt.Outcome) -> None:
        """(on the loop) A delivery ended: its history entry and its count."""
        key = (outcome.target, outcome.result)
        self.counts = {**self.counts, key: self.counts.get(key, 0) + 1}
        self.counted(self.counts)
        log.debug("job %s: %s", outcome.job, outcome.text())  # (the sender logs a failing target once)
        if outcome.job in self.jobs():
            self.dispatch(sch.NotificationRecorded(outcome.job, outcome.text()))
