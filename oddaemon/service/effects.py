"""The scheduler's actions carried out: one handler per action type (a table, not an isinstance
chain). Handlers do I/O only; they never change the job table (``Daemon.dispatch`` does, and an
event a handler causes is queued by it and handled after the current step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oddaemon.adapters.journal import job_fields
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.spool import Spool
from oddaemon.adapters.store import Store
from oddaemon.core import scheduler as sch
from oddaemon.core.checks import Problem
from oddaemon.core.jobs import State
from oddaemon.service.evaluation import Evaluations
from oddaemon.service.executor import Executor
from oddaemon.service.intake import SpoolIntake
from oddaemon.service.job_watch import JobWatching
from oddaemon.service.launch import WorkerLauncher

log = logging.getLogger("oddaemon")


class Effects:
    def __init__(self, loop: Loop, clock: Callable[[], float], state: Callable[[], State], store: Store,
                 spool: Spool, intake: SpoolIntake, executor: Executor, launcher: WorkerLauncher,
                 watching: JobWatching, evaluations: Evaluations, tick: Callable[[], None]):
        self.loop = loop
        self.clock = clock
        self.state = state
        self.store = store
        self.spool = spool
        self.intake = intake
        self.executor = executor
        self.launcher = launcher
        self.watching = watching
        self.evaluations = evaluations
        self.tick = tick  # the scheduler's wake-up is due
        self.on_state_change: list[Callable[[sch.StateChanged], None]] = []
        self._wake_handle: object | None = None
        self._handlers: dict[type, Callable] = {
            sch.SaveJob: self._save_job,
            sch.StartTrain: self._start_train,
            sch.StopTrain: self._stop_train,
            sch.Accepted: self._accepted,
            sch.Rejected: self._rejected,
            sch.StateChanged: self._state_changed,
            sch.WakeAt: self._wake_at,
            sch.TrainingEnded: self._training_ended,
            sch.StopEvaluator: self._stop_evaluator,
        }

    def execute(self, action: sch.Action) -> None:
        handler = self._handlers.get(type(action))
        if handler is not None:
            handler(action)
        else:  # the evaluation side's actions (EvalPlacement, Refused, ...)
            self.evaluations.on_action(action, self.state().jobs.get(getattr(action, "name", "")))

    def _save_job(self, action: sch.SaveJob) -> None:
        self.store.save_job(action.job.name, action.job.to_dict())

    def _start_train(self, action: sch.StartTrain) -> None:
        if self.launcher.shutting_down:
            return  # the saved record says running: the job starts when the daemon does
        self.watching.watch(self.state().jobs[action.name])
        self.launcher.start_train(action)

    def _stop_train(self, action: sch.StopTrain) -> None:
        self.executor.stop(action.name, "train", action.reason, save=action.save)

    def _accepted(self, action: sch.Accepted) -> None:
        if action.token:
            self.spool.accept(action.token, action.name)
        position = self.state().queue_position(action.name)
        log.info("accepted job %s%s", action.name, f" (queue position {position})" if position else "")

    def _rejected(self, action: sch.Rejected) -> None:
        if action.token:
            self.intake.reject(action.token, [Problem(action.reason)], "the daemon cannot run it")

    def _state_changed(self, action: sch.StateChanged) -> None:
        job = self.state().jobs.get(action.name)
        failure = job.failure.kind if job is not None and job.failure and action.new in ("backoff", "failed") else None
        log.info("job %s: %s -> %s (%s)", action.name, action.old or "new", action.new, action.reason,
                 extra=job_fields(action.name, state=action.new, failure=failure,
                                  attempt=job.attempt if job is not None else None))
        for listener in self.on_state_change:
            listener(action)

    def _wake_at(self, action: sch.WakeAt) -> None:
        if self._wake_handle is not None:
            self.loop.remove(self._wake_handle)
        self._wake_handle = self.loop.call_later(max(0.0, action.when - self.clock()), self._wake)

    def _wake(self) -> None:
        self._wake_handle = None
        self.tick()

    def _training_ended(self, action: sch.TrainingEnded) -> None:
        job = self.state().jobs.get(action.name)
        if job is not None:
            self.watching.watch(job)
        self.evaluations.on_action(action, job)

    def _stop_evaluator(self, action: sch.StopEvaluator) -> None:
        self.evaluations.on_action(action, self.state().jobs.get(action.name))
        self.watching.end(action.name)  # the last evaluation's events, before the watch ends
        self.executor.close_logs_if_idle(action.name)
