"""Sweeps in the daemon: successive halving across a sweep's variants, after each evaluation.

Listens to every recorded evaluation (``Evaluations.listeners``); when the job is a variant of a
sweep with ``halving_steps``, its peers' evaluated metrics are read from their books and
``core.sweep.halving_stops`` decides; each variant it names gets an ``EarlyStop`` with the reason,
the way patience stops a job. The rule itself is in ``core/sweep.py``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oddaemon.core import events as msg
from oddaemon.core.evalbook import CheckpointState, EvalBook
from oddaemon.core.jobs import Job
from oddaemon.core.states import JobState
from oddaemon.core.sweep import Standing, halving_stops

log = logging.getLogger("oddaemon.service.sweeps")

TRAINING = (JobState.RUNNING, JobState.BACKOFF)


class SweepHalving:
    def __init__(self, jobs: Callable[[], dict[str, Job]], book: Callable[[str], EvalBook | None],
                 dispatch: Callable[[msg.Event], object]):
        self.jobs = jobs
        self.book = book
        self.dispatch = dispatch

    def checkpoint_evaluated(self, name: str, record: object) -> None:
        jobs = self.jobs()
        job = jobs.get(name)
        if job is None or not job.spec.sweep.of or not job.spec.sweep.halving_steps:
            return
        sweep, metric = job.spec.sweep, job.spec.eval.metric
        members = [j for j in jobs.values() if j.spec.sweep.of == sweep.of]
        standings = [Standing(j.name, j.state in TRAINING, self._evaluations(j.name, metric)) for j in members]
        best = self._best(members, metric, job.spec.eval.higher_is_better)
        for variant, reason in halving_stops(sweep.of, sweep.halving_steps, sweep.keep_fraction,
                                             job.spec.eval.higher_is_better, metric, standings, best):
            log.info("job %s: %s", variant, reason)
            self.dispatch(msg.EarlyStop(variant, reason))

    def _evaluations(self, name: str, metric: str) -> tuple[tuple[int, float], ...]:
        book = self.book(name)
        if book is None:
            return ()
        return tuple(sorted((c.step, c.metrics[metric]) for c in book.checkpoints.values()
                            if c.state is CheckpointState.DONE and c.step is not None and metric in c.metrics))

    def _best(self, members: list[Job], metric: str, higher: bool) -> str | None:
        scored = []
        for j in members:
            book = self.book(j.name)
            best = book.best() if book is not None else None
            if best is not None and metric in best.metrics:
                scored.append((-best.metrics[metric] if higher else best.metrics[metric], j.spec.sweep.index, j.name))
        return min(scored)[2] if scored else None
