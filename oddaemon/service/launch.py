"""Worker launching: what a job's worker is given (its ``job.json``, its files handed over to the
worker user, the command line, the environment with ``CUDA_VISIBLE_DEVICES``), checked against the
allowed roots at every start, then handed to the executor. The one place a worker is started from:
training (``StartTrain``), the warm evaluator and exports (through ``start_worker``), the warm
preflight servers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from oddaemon.adapters import confine
from oddaemon.adapters.journal import job_fields
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.procs import thread_limits, worker_environment
from oddaemon.adapters.store import Store
from oddaemon.core import dependencies, layout
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.failures import Failure
from oddaemon.core.jobs import Job
from oddaemon.core.resources import ROLES, limits_for
from oddaemon.service.executor import Executor, RunningWorker, WorkerLaunch

log = logging.getLogger("oddaemon")


class WorkerLauncher:
    """Starts a job's workers through ``executor``; records each in the runtime file (pids a
    restarted daemon must not leave running) and tells ``on_train_started`` (hang detection, the
    warm evaluator) once a train worker runs: at once for a process, when Slurm runs it for a cluster job.

    ``refuse(name, failure)``: an evaluator or export could not start because a path left the
    allowed roots (the job fails ``refused``). A refused train worker is reported as its exit."""

    def __init__(self, config: Config, loop: Loop, store: Store, executor: Executor,
                 jobs: Callable[[], dict[str, Job]], dispatch: Callable[[sch.Event], object],
                 refuse: Callable[[str, Failure], None], on_train_started: Callable[[Job], None]):
        self.config = config
        self.loop = loop
        self.store = store
        self.executor = executor
        self.jobs = jobs
        self.dispatch = dispatch
        self.refuse = refuse
        self.on_train_started = on_train_started
        self.runtime: dict[str, dict[str, dict]] = {}
        self.shutting_down = False  # nothing new starts then
        self._refusals: dict[str, Failure] = {}  # why a train worker was not started (a path left the roots)
        self._running_trainers: dict[str, RunningWorker] = {}  # train workers on_train_started was told of

    def start_train(self, action: sch.StartTrain) -> None:
        if self.shutting_down:
            return  # the saved record says running: the job starts when the daemon does
        spec = self.jobs()[action.name].spec
        fresh = not os.path.exists(os.path.join(spec.model_dir, "checkpoint"))  # (a resumed one restores its own)
        awaited = fresh and spec.awaits_checkpoint and dependencies.awaited_missing(
            spec, self.jobs(), os.path.isfile(spec.pipeline.fine_tune_checkpoint + ".index"))
        if awaited:  # a job it waited for did not write it: the job fails (kind refused), no retry
            log.error("job %s: not starting its train worker: %s", action.name, awaited)
            self._refusals[action.name] = Failure("refused", f"the train worker was not started: {awaited}")
        if awaited or self.start_worker(action.name, "train", ["train"], action.gpus) is None:
            # Reported as an exit on the next loop turn (never re-enter dispatch from an action).
            refused = self._refusals.pop(action.name, None)
            self.loop.call_later(0, lambda: self.dispatch(sch.ProcessExited(
                action.name, action.attempt, 127, "the worker could not be started (see the daemon log)", refused)))

    def start_worker(self, name: str, role: str, args: list[str], gpus: tuple[int, ...],
                     stdin: int | None = None, pass_fds: tuple[int, ...] = ()) -> RunningWorker | None:
        """Run ``<python> -m <module> <args[0]> --job <job.json> <args[1:]>`` for a job. None when it
        cannot be started, or when the daemon is shutting down."""
        if self.shutting_down:
            return None
        if (name, role) in self.executor.workers:  # one live worker per job and role: the last one is still exiting
            log.info("job %s: not starting its %s worker yet: the previous one has not exited", name, role)
            return None
        job = self.jobs()[name]
        escaped = confine.escaped_paths(job.spec, self.config.allowed_roots)
        if escaped:
            log.error("job %s: not starting its %s worker: %s", name, role, "; ".join(escaped))
            refused = Failure("refused", f"the {role} worker was not started: " + "; ".join(escaped))
            if role == "train":
                self._refusals[name] = refused  # reported as the train worker's exit (start_train)
            else:
                self.refuse(name, refused)
            return None
        payload = {"spec": job.spec.to_dict(), "attempt": job.attempt, "gpus": list(gpus),
                   "log_path": self.executor.log_path(name, role)}
        try:
            job_json = (self.store.write_worker_job(name, payload) if role == "train"
                        else self._worker_job(name, payload))
            confine.hand_over(self.executor.identity, self.store.job_dir(name), job_json, job.spec.model_dir,
                              layout.eval_results_dir(self.config.state_dir, name),
                              inside=(self.config.state_dir, *self.config.allowed_roots),
                              keep=self.config.allowed_roots)
            argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, args[0], "--job", job_json,
                    *args[1:]]
            # A CPU evaluator beside the trainer: lower priority, fewer threads ([eval] cpu_nice, cpu_threads)
            cpu_eval = role == "eval" and not gpus
            env = worker_environment(dict(os.environ), gpus,
                                     thread_limits(self.config.eval_cpu_threads) if cpu_eval else None)
            worker = self.executor.start(WorkerLaunch(name, role, job.attempt, argv, env, self.store.job_dir(name),
                                                      gpus, stdin, pass_fds,
                                                      nice=self.config.eval_cpu_nice if cpu_eval else 0,
                                                      gpu_count=cluster_gpus(job, role, gpus),
                                                      time_limit=job.spec.slurm.time_limit or "",
                                                      partition=job.spec.slurm.partition or "",
                                                      nodes=job.spec.slurm.nodes if role == "train" else 1,
                                                      limits=limits_for(role, job.spec, self.config.cgroups,
                                                                        on_cpu=not gpus) if role in ROLES else None))
        except (OddaemonError, OSError) as exc:
            log.error("job %s: cannot start its %s worker: %s", name, role, user_message(exc),
                      extra=job_fields(name, role=role, attempt=job.attempt))
            return None
        log.info("job %s: %s worker started (pid %s, attempt %d%s)", name, role, worker.pid, job.attempt,
                 f", GPUs {','.join(map(str, gpus))}" if gpus else "",
                 extra=job_fields(name, role=role, attempt=job.attempt))
        self.runtime.setdefault(name, {})[role] = self.executor.runtime_record(worker)
        self.store.save_runtime(name, self.runtime[name])
        if role == "train" and getattr(worker, "running", True):  # (a cluster's job waiting in its queue:
            self._train_running(job, worker)                        # when it runs, worker_changed)
        return worker

    def worker_changed(self, worker: RunningWorker) -> None:
        """The executor says a worker changed (a cluster job got its id, or began to run): its runtime
        record is written again, and a train worker that now runs is started for the daemon too."""
        roles = self.runtime.get(worker.name)
        current = self.executor.workers.get((worker.name, worker.role))
        if roles is None or worker.role not in roles or current is not worker:
            return
        roles[worker.role] = self.executor.runtime_record(worker)
        self.store.save_runtime(worker.name, roles)
        job = self.jobs().get(worker.name)
        if worker.role == "train" and getattr(worker, "running", True) and job is not None:
            self._train_running(job, worker)

    def _train_running(self, job: Job, worker: RunningWorker) -> None:
        if self._running_trainers.get(job.name) is not worker:  # once per train worker
            self._running_trainers[job.name] = worker
            self.on_train_started(job)

    def start_preflight_server(self, name: str, args: list[str], stdin: int,
                               pass_fds: tuple[int, ...]) -> RunningWorker | None:
        """A warm preflight worker (``preflight.py``); its own log is ``<log_dir>/<name>/preflight.log``."""
        if self.shutting_down:
            return None
        work = layout.preflight_dir(self.config.state_dir)
        argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, *args]
        try:
            os.makedirs(work, exist_ok=True)
            confine.hand_over(self.executor.identity, work, inside=(self.config.state_dir,))
            return self.executor.start(WorkerLaunch(name, "preflight", 0, argv,
                                                    worker_environment(dict(os.environ), ()), work,
                                                    stdin=stdin, pass_fds=pass_fds))
        except (OddaemonError, OSError) as exc:
            log.error("cannot start the preflight worker %s: %s", name, user_message(exc))
            return None

    def ended(self, worker: RunningWorker) -> None:
        """A worker exited: it leaves the runtime file (the file goes with the job's last worker)."""
        if self._running_trainers.get(worker.name) is worker:
            del self._running_trainers[worker.name]
        roles = self.runtime.get(worker.name, {})
        roles.pop(worker.role, None)
        if roles:
            self.store.save_runtime(worker.name, roles)
        else:
            self.runtime.pop(worker.name, None)
            self.store.clear_runtime(worker.name)

    def _worker_job(self, name: str, payload: dict) -> str:
        path = layout.worker_job(self.config.state_dir, name)
        return path if os.path.exists(path) else self.store.write_worker_job(name, payload)


def cluster_gpus(job: Job, role: str, gpus: tuple[int, ...]) -> int | None:
    """How many GPUs a cluster is to allocate for a train worker the scheduler gave none of this
    machine's (a cluster allocates them: ``Policy.cluster_allocates``); None: the ones given."""
    return job.wants if role == "train" and not gpus and isinstance(job.wants, int) else None
