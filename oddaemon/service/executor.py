"""How a job's workers run: the one interface through which the daemon starts, stops and observes
them. ``LocalExecutor`` (``service/local_executor.py``) runs them as processes on this host; a cluster
backend (Slurm) implements the same interface. The scheduler and the evaluation side never see
which one runs: they ask ``WorkerLauncher`` (``service/launch.py``) for a worker by job and role.

An executor reports every end of a worker through the ``on_exit(worker, returncode, failure)``
callback it was built with (``failure``: why it failed, read from its exit and log, or the one the
daemon stopped it for), and worker activity (log output) through ``on_output(name, role)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from oddaemon.core.failures import Failure
from oddaemon.core.resources import Limits


@dataclass(frozen=True)
class WorkerLaunch:
    """One worker to run: what, for whom, where, on which GPUs. ``stdin`` and ``pass_fds``: the
    pipes of a served worker (warm evaluator, warm preflight), local processes only."""

    name: str
    role: str  # train | eval | export | preflight
    attempt: int
    argv: list[str]
    env: dict[str, str]
    cwd: str
    gpus: tuple[int, ...] = ()
    stdin: int | None = None
    pass_fds: tuple[int, ...] = field(default=())
    nice: int = 0  # its nice value (a CPU evaluator's: [eval] cpu_nice), local processes only
    gpu_count: int | None = None  # GPUs a cluster is to allocate (None: the ones in ``gpus``)
    time_limit: str = ""  # the job's own [slurm] time_limit and partition ("" = the daemon's)
    partition: str = ""
    nodes: int = 1  # Slurm nodes (the train worker of a job with [slurm] nodes > 1: one task per node)
    limits: Limits | None = None  # its cgroup's limits (train/eval/export; None: no cgroup of its own)

    @property
    def gpus_wanted(self) -> int:
        return len(self.gpus) if self.gpu_count is None else self.gpu_count


class RunningWorker(Protocol):
    """What the service layer reads of a started worker, whichever executor runs it. A cluster's
    worker also has ``running`` (False while its job waits in the cluster's queue); a local one runs
    from its start."""

    name: str
    role: str
    attempt: int
    pid: int
    started_at: float


ExitCallback = Callable[[RunningWorker, int, "Failure | None"], None]


class Executor(Protocol):
    """Starts, stops and watches workers; owns their logs. Never decides anything about jobs."""

    workers: Mapping[tuple[str, str], RunningWorker]  # (job name, role) -> the live worker
    # Told of a worker that changed after its start (a cluster's job got its id, began to run, moved
    # nodes); the daemon sets it. A local executor has nothing to tell. A cluster executor also has
    # ``cluster_view(name) -> dict | None``: what ``oddaemon status`` shows of the job's cluster jobs.
    on_change: Callable[[RunningWorker], None]
    identity: object | None  # whom workers run as (None: the daemon's own user)

    def start(self, launch: WorkerLaunch) -> RunningWorker: ...

    def stop(self, name: str, role: str, reason: str, failure: Failure | None = None,
             only: RunningWorker | None = None, save: bool = False) -> bool:
        """Stop the (name, role) worker; ``only``: only if it is still that one (a delayed stop must not
        reach the worker started after it); ``save``: a train worker saves a checkpoint first (SIGUSR2,
        which it takes as a cluster's warning: save after the training iteration it is in, exit)."""
        ...

    def stop_all(self, reason: str) -> None:
        """The daemon is shutting down: stop what must not outlive it (local processes); a workload
        manager's jobs may run on, untracked, for the next daemon to adopt."""
        ...

    def runtime_record(self, worker: RunningWorker) -> dict: ...

    def log_path(self, name: str, role: str) -> str: ...

    def note(self, name: str, role: str, text: str) -> None: ...

    def configure(self, log_max_bytes: int, log_backups: int, stop_grace: float) -> None: ...

    def reopen_logs(self) -> None: ...

    def close_logs_if_idle(self, name: str) -> None: ...
