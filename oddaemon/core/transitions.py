"""The one guarded state change of a job (``transition``: the transition table is checked, the
history, held GPUs and finish time follow), and the end of training (``training_over``). Pure;
the scheduler and the handlers of user requests (``user_requests``) change a job's state only here."""

from __future__ import annotations

from dataclasses import replace

from oddaemon.core.events import Action, SaveJob, StateChanged, StopEvaluator, TrainingEnded
from oddaemon.core.jobs import HISTORY_LIMIT, Job
from oddaemon.core.states import HOLDS_RESOURCES, TERMINAL, JobState, check_transition


def transition(job: Job, new: JobState, now: float, reason: str, **changes) -> tuple[Job, list[Action]]:
    check_transition(job.name, job.state, new)
    history = (job.history + ((now, new.value, reason),))[-HISTORY_LIMIT:]
    if new not in HOLDS_RESOURCES:
        changes.setdefault("gpus", ())
    if new is not JobState.WAITING:
        changes.setdefault("waiting_for", ())
    extra: list[Action] = []
    if new in TERMINAL:
        changes.setdefault("finished_at", now)
        changes.setdefault("eval_gpus", ())
        extra.append(StopEvaluator(job.name, f"job {new.value}"))
    updated = replace(job, state=new, reason=reason, history=history, **changes)
    return updated, [StateChanged(job.name, job.state.value, new.value, reason), SaveJob(updated), *extra]


def training_over(job: Job, now: float, reason: str, **changes) -> tuple[Job, list[Action]]:
    """Training finished (or was stopped early): evaluate what is left first, if evaluation is on."""
    if not job.spec.eval.enabled:
        return transition(job, JobState.SUCCEEDED, now, reason, **changes)
    updated, acts = transition(job, JobState.EVALUATING, now, f"{reason}; evaluating the remaining checkpoints",
                               retry_at=None, **changes)
    return updated, acts + [TrainingEnded(job.name)]
