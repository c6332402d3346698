"""Job states and the one table of allowed transitions.

Every state change in the daemon goes through :func:`check_transition` (called by
``scheduler.transition``), in the spirit of supervisor's ``states.py``: a change that is
not in the table is a programming error and raises instead of silently corrupting a job.
"""

from __future__ import annotations

import enum


class JobState(str, enum.Enum):
    WAITING = "waiting"        # accepted, waiting for the jobs it names in `after` to succeed
    QUEUED = "queued"          # accepted, waiting for GPUs / a CPU slot
    RUNNING = "running"        # train process alive (GPUs held)
    BACKOFF = "backoff"        # train process failed; restart scheduled (GPUs still held)
    STOPPING = "stopping"      # cancel or early stop requested; waiting for the process to exit
    EVALUATING = "evaluating"  # training over; the remaining checkpoints are being evaluated
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    def __str__(self) -> str:
        return self.value


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
HOLDS_RESOURCES = frozenset({JobState.RUNNING, JobState.BACKOFF, JobState.STOPPING})

_ALLOWED: dict[JobState, frozenset[JobState]] = {
    JobState.WAITING: frozenset({JobState.QUEUED, JobState.CANCELLED}),
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.CANCELLED, JobState.FAILED}),
    JobState.RUNNING: frozenset(
        {JobState.BACKOFF, JobState.STOPPING, JobState.EVALUATING, JobState.SUCCEEDED, JobState.FAILED, JobState.QUEUED}
    ),
    JobState.BACKOFF: frozenset(  # (succeeded: oddaemon finish of a job without evaluation)
        {JobState.RUNNING, JobState.CANCELLED, JobState.FAILED, JobState.QUEUED, JobState.EVALUATING,
         JobState.SUCCEEDED}
    ),
    JobState.STOPPING: frozenset({JobState.CANCELLED, JobState.QUEUED, JobState.EVALUATING, JobState.SUCCEEDED}),
    JobState.EVALUATING: frozenset({JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED}),
    JobState.SUCCEEDED: frozenset(),
    JobState.FAILED: frozenset({JobState.QUEUED, JobState.WAITING}),
    JobState.CANCELLED: frozenset({JobState.QUEUED, JobState.WAITING}),
}


class IllegalTransition(RuntimeError):
    def __init__(self, name: str, old: JobState, new: JobState):
        super().__init__(f"job {name}: transition {old} -> {new} is not allowed")
        self.name, self.old, self.new = name, old, new


def check_transition(name: str, old: JobState, new: JobState) -> None:
    if new not in _ALLOWED[old]:
        raise IllegalTransition(name, old, new)
