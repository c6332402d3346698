"""What goes into the scheduler (events) and what comes out (actions). Pure values."""

from __future__ import annotations

from dataclasses import dataclass

from oddaemon.core.errors import ErrorKind
from oddaemon.core.failures import Failure
from oddaemon.core.jobs import Job, Policy
from oddaemon.core.jobspec import JobSpec
from oddaemon.core.remedies import Remedy

# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submit:
    spec: JobSpec
    token: str = ""  # opaque to the scheduler (the daemon passes the spool file path)


@dataclass(frozen=True)
class ProcessExited:
    name: str
    attempt: int
    returncode: int  # negative = killed by that signal (as subprocess reports it)
    detail: str = ""  # why, when no Failure is known (e.g. the worker could not be started)
    failure: Failure | None = None  # what the exit status and the log say (oddaemon.core.failures)
    remedy: Remedy | str | None = None  # for an out-of-memory exit with oom_retry_halve_batch: the
    #                                     smaller batch (oddaemon.core.remedies), or why there is none


@dataclass(frozen=True)
class Cancel:
    name: str


@dataclass(frozen=True)
class Finish:
    """``oddaemon finish``: end training now, keeping its work: the train worker saves a checkpoint
    and exits, what is left is evaluated (and the best exported), and the job succeeds."""

    name: str


@dataclass(frozen=True)
class Retry:
    name: str


@dataclass(frozen=True)
class SetPriority:
    """``oddaemon priority``: the job's rank in the queue from now on (``[top] priority``'s range)."""

    name: str
    priority: int


@dataclass(frozen=True)
class Tick:
    """A timer fired (or anything else changed): start what is due."""


@dataclass(frozen=True)
class PolicyChanged:
    """The daemon's configuration was re-read (reload): the restart, CPU-slot and evaluation policy
    from now on; then start what now fits."""

    policy: Policy


@dataclass(frozen=True)
class Restore:
    """Daemon start: the saved jobs; whatever was running is queued again to resume."""

    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class EarlyStop:
    """Evaluation says training should stop (patience ran out)."""

    name: str
    reason: str


@dataclass(frozen=True)
class EvaluationsDone:
    """Every checkpoint of a job whose training is over has been evaluated."""

    name: str


@dataclass(frozen=True)
class PlaceEvaluator:
    """The job's evaluator is about to start: decide CPU or which GPU (answered by EvalPlacement)."""

    name: str


@dataclass(frozen=True)
class EvaluatorStopped:
    """The job's evaluator exited: release its GPU."""

    name: str


@dataclass(frozen=True)
class WorkerRefused:
    """The daemon would not start one of the job's workers (a path now leads outside the allowed
    roots) while no train process runs (one that runs is stopped, and its exit reports it)."""

    name: str
    failure: Failure  # kind "refused"


@dataclass(frozen=True)
class NotificationRecorded:
    """A notification of the job was delivered, failed or dropped: a history entry, no state change
    (``core/notifications.py``'s ``Outcome.text``)."""

    name: str
    text: str


Event = (Submit | ProcessExited | Cancel | Finish | Retry | SetPriority | Tick | PolicyChanged | Restore | EarlyStop
         | EvaluationsDone | PlaceEvaluator | EvaluatorStopped | WorkerRefused | NotificationRecorded)


# ---- actions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartTrain:
    name: str
    gpus: tuple[int, ...]
    attempt: int


@dataclass(frozen=True)
class StopTrain:
    name: str
    reason: str
    save: bool = False  # save a checkpoint first (SIGUSR2, as on a cluster's warning), then exit


@dataclass(frozen=True)
class SaveJob:
    job: Job


@dataclass(frozen=True)
class Accepted:
    name: str
    token: str


@dataclass(frozen=True)
class Rejected:
    token: str
    reason: str
    kind: ErrorKind = ErrorKind.REFUSED


@dataclass(frozen=True)
class Refused:
    """A command (cancel, retry) that cannot be done; the reason is for the user, the kind for transports."""

    reason: str
    kind: ErrorKind = ErrorKind.REFUSED


@dataclass(frozen=True)
class StateChanged:
    name: str
    old: str
    new: str
    reason: str


@dataclass(frozen=True)
class WakeAt:
    when: float


@dataclass(frozen=True)
class EvalPlacement:
    """Where the evaluator may run: () = CPU, (g,) = that GPU, None = wait for a GPU."""

    name: str
    gpus: tuple[int, ...] | None


@dataclass(frozen=True)
class StopEvaluator:
    name: str
    reason: str


@dataclass(frozen=True)
class TrainingEnded:
    """Training is over (finished or stopped early): evaluate what is left, then report."""

    name: str


Action = (StartTrain | StopTrain | SaveJob | Accepted | Rejected | Refused | StateChanged | WakeAt | EvalPlacement
          | StopEvaluator | TrainingEnded)
