"""What a user's ``cancel``, ``finish`` and ``retry`` make of a job (pure; the scheduler's ``step``
calls these). A request that cannot be done becomes a ``Refused`` action with the reason.

* cancel: from any state; a running job is stopped (SIGTERM, grace, SIGKILL), then ``cancelled``.
* finish: training ends now with its work kept: a running worker saves a checkpoint and exits
  (``StopTrain(save=True)``), then the job is ``evaluating`` as at the end of training, and
  ``succeeded`` once the rest is evaluated (and the best exported).
* retry: a failed or cancelled job is queued again (or waits again for its dependencies).
* priority: a job's rank from now on (queued and waiting jobs are ranked by it; a running, failed or
  cancelled one keeps it for its next start); the change is in its history.
"""

from __future__ import annotations

from dataclasses import replace

from oddaemon.core import dependencies
from oddaemon.core.errors import ErrorKind
from oddaemon.core.events import Action, Refused, SaveJob, StopTrain
from oddaemon.core.jobs import HISTORY_LIMIT, Job, State
from oddaemon.core.jobspec import MAX_PRIORITY
from oddaemon.core.placement import fits_ever
from oddaemon.core.states import TERMINAL, JobState
from oddaemon.core.transitions import training_over, transition


def cancel(jobs: dict[str, Job], name: str, now: float, actions: list[Action]) -> None:
    job = jobs.get(name)
    if job is None:
        actions.append(Refused(f"no job named '{name}'", ErrorKind.NOT_FOUND))
        return
    if job.state in TERMINAL:
        actions.append(Refused(f"job '{name}' is already {job.state}"))
    elif job.state is JobState.STOPPING and not job.stop_reason:
        actions.append(Refused(f"job '{name}' is already stopping"))
    elif job.state is JobState.STOPPING:  # stopping early: make it a cancel (same state, new intent)
        history = (job.history + ((now, job.state.value, "cancel requested"),))[-HISTORY_LIMIT:]
        jobs[name] = replace(job, stop_reason="", reason="cancel requested", history=history)
        actions.append(SaveJob(jobs[name]))
    elif job.state is JobState.RUNNING:
        jobs[name], acts = transition(job, JobState.STOPPING, now, "cancel requested")
        actions += acts + [StopTrain(name, "cancel requested")]
    else:
        jobs[name], acts = transition(job, JobState.CANCELLED, now, "cancelled by request", retry_at=None)
        actions += acts


def finish(jobs: dict[str, Job], name: str, now: float, actions: list[Action]) -> None:
    """Training ends now, its work kept: a running worker saves a checkpoint and exits (then the
    job is evaluating, as at the end of training); a job in backoff has its checkpoints already."""
    job, reason = jobs.get(name), "finished by request"
    if job is None:
        actions.append(Refused(f"no job named '{name}'", ErrorKind.NOT_FOUND))
    elif job.state is JobState.RUNNING:
        jobs[name], acts = transition(job, JobState.STOPPING, now, f"{reason}: saving a checkpoint",
                                      stop_reason=reason)
        actions += acts + [StopTrain(name, reason, save=True)]
    elif job.state is JobState.BACKOFF:
        jobs[name], acts = training_over(replace(job, stop_reason=reason), now, reason)
        actions += acts
    else:
        why = {JobState.STOPPING: f"is already stopping ({job.stop_reason or 'cancel requested'})",
               JobState.EVALUATING: "has finished training; its last checkpoints are being evaluated",
               JobState.QUEUED: "has not started training: `oddaemon cancel` it instead",
               JobState.WAITING: "has not started training: `oddaemon cancel` it instead"}
        actions.append(Refused(f"job '{name}' {why.get(job.state, f'is already {job.state}')}"))


def retry(state: State, jobs: dict[str, Job], name: str, now: float, actions: list[Action]) -> None:
    job = jobs.get(name)
    if job is None:
        actions.append(Refused(f"no job named '{name}'", ErrorKind.NOT_FOUND))
    elif job.state not in (JobState.FAILED, JobState.CANCELLED):
        actions.append(Refused(f"job '{name}' is {job.state}; only failed or cancelled jobs can be retried"))
    else:
        why_not = fits_ever(job.wants, state.inventory, state.policy.cluster_allocates)
        if why_not:
            actions.append(Refused(f"job '{name}' can never run here: it {why_not}"))
            return
        again = dependencies.on_retry(job, jobs)  # queued, waiting again, or refused for a dependency
        if again.state is None:
            actions.append(Refused(again.reason))
            return
        jobs[name], acts = transition(job, again.state, now, again.reason, consecutive_failures=0,
                                      retry_at=None, finished_at=None, waiting_for=again.pending)
        actions += acts


def set_priority(jobs: dict[str, Job], name: str, priority: object, now: float, actions: list[Action]) -> None:
    job = jobs.get(name)
    if job is None:
        actions.append(Refused(f"no job named '{name}'", ErrorKind.NOT_FOUND))
    elif isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
        actions.append(Refused(f"priority must be a whole number from -{MAX_PRIORITY} to {MAX_PRIORITY}, got "
                               f"{priority!r}", ErrorKind.INVALID))
    elif job.state is JobState.SUCCEEDED:
        actions.append(Refused(f"job '{name}' is succeeded; its priority no longer matters"))
    elif priority != job.spec.priority:
        text = f"priority {job.spec.priority} -> {priority} by request"
        history = (job.history + ((now, job.state.value, text),))[-HISTORY_LIMIT:]
        jobs[name] = replace(job, spec=replace(job.spec, priority=priority), history=history)
        actions.append(SaveJob(jobs[name]))
