"""The Slurm executor: a job's train and export workers run as Slurm batch jobs, through the same
``Executor`` interface as local processes (``service/executor.py``), so the scheduler and the
evaluation side do not know which runs. Served workers (the warm evaluator, warm preflight), which
speak over pipes, run on the daemon's host through the local executor it wraps.

Submission (``sbatch --parsable``) and tracking are asynchronous: one ``squeue --me --states=all``
per poll cycle for all of the daemon's Slurm jobs (``core.slurm.poll_argv``: the cost stays flat with
their number), then ``scontrol show job -o`` for a job ``squeue`` no longer lists (it left the
controller's memory, ``MinJobAge``, between two cycles). An unreachable controller is retried
with backoff and never fails a job; a job Slurm ended (time limit, node failure, preemption, its
memory limit) is reported as the worker's exit with its failure kind (``core/slurm.py``), and the
scheduler's restart rules apply as to any exit. Logs: Slurm writes the worker's output to
``<log_dir>/<name>/slurm-<role>.out``, which the daemon copies into the job's rotating
``<role>.log`` as it grows (``slurm_output.py``).

A Slurm job may wait in Slurm's queue for hours: its worker is ``running`` only once Slurm runs it,
and ``on_change(worker)`` says so (and every change of its Slurm id, state or nodes), so that what
belongs to a running trainer (its warm evaluator, its hang timer) starts then, not at submission.
``cluster_view`` is what ``oddaemon list/status``, D-Bus and the metrics show of a job's Slurm jobs.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon.adapters.loop import Loop
from oddaemon.adapters.slurm_cli import CommandResult, SlurmCommands
from oddaemon.adapters.store import atomic_write_json
from oddaemon.core import slurm
from oddaemon.core.failures import Failure, classify_failure
from oddaemon.service.executor import ExitCallback, RunningWorker, WorkerLaunch
from oddaemon.service.local_executor import LocalExecutor
from oddaemon.service.slurm_output import FOLLOW_SECONDS, FollowedOutput, output_path

log = logging.getLogger("oddaemon.slurm")
MAX_POLL_SECONDS = 60.0


@dataclass
class SlurmWorker:
    """A worker running as a Slurm job (``RunningWorker``); ``job_id`` is None until sbatch answers."""

    name: str
    role: str
    attempt: int
    started_at: float
    pid: int = -1  # no local process
    job_id: int | None = None
    state: str = "SUBMITTING"
    reason: str = ""
    stop_reason: str = ""
    imposed: Failure | None = None
    log_path: str = ""
    script: str = ""
    record: str = ""  # <work>/slurm-<role>.json: the daemon's record of submitting it (core.slurm.Submission)
    nodes: str = ""  # the node list Slurm gave it ("" while it waits)
    output: FollowedOutput | None = None  # Slurm's output file, copied into its log
    running: bool = False  # Slurm has run it (RUNNING or later): the worker has started

    def shown(self) -> dict:
        """What ``cluster_view`` shows of it."""
        return {"job_id": self.job_id, "state": self.state, "reason": self.reason, "nodes": self.nodes,
                "attempt": self.attempt}


class SlurmExecutor:
    def __init__(self, loop: Loop, commands: SlurmCommands, settings: slurm.SlurmSettings, local: LocalExecutor,
                 on_exit: ExitCallback, clock: Callable[[], float]):
        self.loop = loop
        self.commands = commands
        self.settings = settings
        self.local = local
        self.on_exit = on_exit
        self.clock = clock
        self.jobs: dict[tuple[str, str], SlurmWorker] = {}
        self._poll_handle: object | None = None
        self._polling = False
        self._poll_delay = settings.poll_seconds
        self._unreachable_since: float | None = None
        self._ended_ids: set[int] = set()  # Slurm jobs whose end was reported: never adopted again
        self._last_seen: dict[tuple[str, str], dict] = {}  # (name, role) -> its last Slurm job, once it ended
        self.on_change: Callable[[SlurmWorker], None] = lambda worker: None
        self._follow_handle: object | None = None

    # ---- the Executor interface
    @property
    def identity(self):
        return self.local.identity

    @identity.setter
    def identity(self, value) -> None:
        self.local.identity = value

    @property
    def workers(self) -> dict[tuple[str, str], RunningWorker]:
        return {**self.local.workers, **self.jobs}

    def start(self, launch: WorkerLaunch) -> RunningWorker:
        if launch.stdin is not None or launch.pass_fds or launch.role == "preflight":
            return self.local.start(launch)  # served over pipes: on this host
        worker = SlurmWorker(launch.name, launch.role, launch.attempt, self.clock(),
                             log_path=self.local.log_path(launch.name, launch.role))
        worker.script = os.path.join(launch.cwd, f"slurm-{launch.role}.sh")
        worker.record = os.path.join(launch.cwd, f"slurm-{launch.role}.json")
        previous = self._read_record(worker.record)
        with open(worker.script, "w") as f:
            f.write(slurm.batch_script(launch.argv, launch.env, launch.cwd, launch.nodes, launch.role,
                                       self.settings.port_base))
        os.chmod(worker.script, 0o755)
        os.makedirs(os.path.dirname(worker.log_path), exist_ok=True)
        raw = output_path(worker.log_path, launch.role)
        worker.output = FollowedOutput(raw, lambda data: self.local.write_log(launch.name, launch.role, data))
        argv = slurm.sbatch_argv(self.settings, launch.name, launch.role, launch.gpus_wanted, worker.script,
                                 raw, launch.time_limit, launch.partition, launch.nodes)
        self.local.note(launch.name, launch.role, f"==== oddaemon: submitting {launch.role} attempt {launch.attempt} "
                                                  f"to Slurm ({' '.join(argv[2:-1])})\n")
        self.jobs[(launch.name, launch.role)] = worker
        # A Slurm job of this worker that outlived the daemon before this one (a restart does not
        # cancel cluster jobs: stop_all leaves them running) is adopted, not submitted a second time.
        self.commands.run(slurm.adopt_lookup_argv(slurm.job_name(launch.name, launch.role)),
                          lambda result: self._adopt_or_submit(worker, result, argv, previous))
        return worker

    def stop(self, name: str, role: str, reason: str, failure: Failure | None = None,
             only: RunningWorker | None = None, save: bool = False) -> bool:
        """``scancel``; with ``save``, a running job gets the warning signal instead (``scancel
        --signal=USR2 --batch``: the worker saves a checkpoint and exits) and a pending one is cancelled."""
        worker = self.jobs.get((name, role))
        if worker is None:
            return self.local.stop(name, role, reason, failure, only, save)
        if only is not None and worker is not only:
            return False
        if failure is not None and worker.imposed is None:
            worker.imposed = failure
        if not worker.stop_reason:
            worker.stop_reason = reason or "stopped"
            log.info("stopping %s worker of %s (Slurm job %s): %s", role, name, worker.job_id, reason)
            if worker.job_id is not None:
                self._scancel(worker, slurm.WARNING_SIGNAL if save and worker.running else None)
        return True

    def stop_all(self, reason: str) -> None:
        """The daemon is going: local workers stop; Slurm jobs run on (they are the cluster's to run)
        and are no longer tracked: the next daemon adopts them when it resumes their jobs."""
        self.local.stop_all(reason)
        for worker in self.jobs.values():
            log.info("job %s: Slurm job %s (%s) runs on without the daemon (%s)", worker.name, worker.job_id,
                     worker.role, reason)
            if worker.output is not None:
                worker.output.leave()  # (copies what is new, then keeps how far)
        self.jobs.clear()
        for handle in (self._poll_handle, self._follow_handle):
            if handle is not None:
                self.loop.remove(handle)
        self._poll_handle = self._follow_handle = None

    def runtime_record(self, worker: RunningWorker) -> dict:
        if isinstance(worker, SlurmWorker):
            return {"pid": -1, "start_time": None, "attempt": worker.attempt, "role": worker.role,
                    "started_at": worker.started_at, "slurm_job_id": worker.job_id, "slurm_state": worker.state,
                    "slurm_nodes": worker.nodes}
        return self.local.runtime_record(worker)

    def cluster_view(self, name: str) -> dict | None:
        """A job's Slurm jobs by role (``SlurmWorker.shown``): the live ones, else the last that ended
        (since this daemon started); None when it has had none."""
        shown = {role: seen for (job, role), seen in self._last_seen.items() if job == name}
        shown.update({w.role: w.shown() for w in self.jobs.values() if w.name == name})
        return shown or None

    def log_path(self, name: str, role: str) -> str:
        return self.local.log_path(name, role)

    def note(self, name: str, role: str, text: str) -> None:
        self.local.note(name, role, text)

    def configure(self, log_max_bytes: int, log_backups: int, stop_grace: float) -> None:
        self.local.configure(log_max_bytes, log_backups, stop_grace)

    def reopen_logs(self) -> None:
        self.local.reopen_logs()

    def close_logs_if_idle(self, name: str) -> None:
        if not any(key[0] == name for key in self.jobs):
            self.local.close_logs_if_idle(name)

    # ---- submission and tracking
    @staticmethod
    def _read_record(path: str) -> slurm.Submission | None:
        try:
            with open(path) as f:
                return slurm.Submission.from_json(json.load(f))
        except (OSError, ValueError):
            return None

    def _write_record(self, worker: SlurmWorker, submission: slurm.Submission) -> None:
        try:
            atomic_write_json(worker.record, submission.to_json())
        except OSError as exc:  # a restart then adopts by name alone, as without records
            log.warning("job %s: cannot write %s: %s", worker.name, worker.record, exc.strerror)

    def _adopt_or_submit(self, worker: SlurmWorker, result: CommandResult, argv: list[str],
                         previous: slurm.Submission | None) -> None:
        if self.jobs.get((worker.name, worker.role)) is not worker:
            return
        found = slurm.parse_squeue_lines(result.stdout) if result.ok else {}
        name = slurm.job_name(worker.name, worker.role)  # (--name is exact; kept as a guard)
        found = {j: job for j, job in found.items() if job.name == name}
        chosen, stale = slurm.adoptable({j: job for j, job in found.items() if j not in self._ended_ids}, previous)
        for job in stale:
            log.warning("job %s: not adopting Slurm job %d (%s, named like its %s worker): submitted before the "
                        "daemon's record of submitting that worker (a reused id or a leftover)", worker.name,
                        job.job_id, job.state, worker.role)
        if chosen is None:
            submission = slurm.Submission(worker.attempt, self.clock())
            self._write_record(worker, submission)
            self.commands.run(argv, lambda answer: self._submitted(worker, answer, submission))
            return
        worker.job_id, worker.state, worker.nodes = chosen.job_id, chosen.state, chosen.nodes
        log.warning("job %s: adopting Slurm job %d (%s), still %s from before the daemon restarted", worker.name,
                    worker.job_id, worker.role, worker.state)
        self.local.note(worker.name, worker.role, f"==== oddaemon: adopted Slurm job {worker.job_id}, which ran on "
                                                  "while the daemon restarted\n")
        if worker.stop_reason:
            self._scancel(worker)
        self._changed(worker, running=chosen.phase == "running")
        self._poll_soon()

    def _submitted(self, worker: SlurmWorker, result: CommandResult, submission: slurm.Submission) -> None:
        if not result.ok:
            self._ended(worker, 127, Failure("slurm", f"Slurm did not take the {worker.role} worker: "
                                                      f"{result.describe()}"))
            return
        try:
            worker.job_id, _cluster = slurm.parse_sbatch(result.stdout)
        except ValueError as exc:
            self._ended(worker, 127, Failure("slurm", f"Slurm did not take the {worker.role} worker: {exc}"))
            return
        worker.state = "PENDING"
        self._write_record(worker, slurm.Submission(submission.attempt, submission.submitted_at, worker.job_id))
        self.local.note(worker.name, worker.role, f"==== oddaemon: Slurm job {worker.job_id}\n")
        log.info("job %s: %s worker is Slurm job %d", worker.name, worker.role, worker.job_id)
        if worker.stop_reason:
            self._scancel(worker)
        self._changed(worker)
        self._poll_soon()

    def _changed(self, worker: SlurmWorker, running: bool = False) -> None:
        if running:
            worker.running = True
            self._follow_soon()
        self.on_change(worker)

    # ---- its output, into its log
    def _follow_soon(self) -> None:
        if self._follow_handle is None:
            self._follow_handle = self.loop.call_later(FOLLOW_SECONDS, self._follow)

    def _follow(self) -> None:
        self._follow_handle = None
        running = [w for w in self.jobs.values() if w.running and w.output is not None]
        for worker in running:
            self._copy(worker)
        if running:
            self._follow_soon()

    def _copy(self, worker: SlurmWorker) -> None:
        if worker.output.read() and self.local.on_output is not None:
            self.local.on_output(worker.name, worker.role)  # (the hang guard's activity)

    def _scancel(self, worker: SlurmWorker, signal_name: str | None = None) -> None:
        def done(result: CommandResult) -> None:
            if not result.ok:
                log.warning("scancel %s: %s (the next poll sees the job's state)", worker.job_id, result.describe())

        signalled = [f"--signal={signal_name}", "--batch"] if signal_name else []
        self.commands.run(["scancel", *signalled, str(worker.job_id)], done)

    def _poll_soon(self) -> None:
        if self._poll_handle is None and not self._polling:
            self._poll_handle = self.loop.call_later(self._poll_delay, self._poll)

    def _poll(self) -> None:
        self._poll_handle = None
        ids = sorted(w.job_id for w in self.jobs.values() if w.job_id is not None)
        if not ids:
            return
        self._polling = True
        self.commands.run(slurm.poll_argv(), self._polled)

    def _polled(self, result: CommandResult) -> None:
        self._polling = False
        try:
            if not result.ok:
                raise ValueError(result.describe())
            listed = slurm.parse_squeue_lines(result.stdout)
        except ValueError as exc:
            self._unreachable(str(exc))
            return
        if self._unreachable_since is not None:
            log.warning("Slurm answers again (after %.0fs)", self.clock() - self._unreachable_since)
        self._unreachable_since, self._poll_delay = None, self.settings.poll_seconds
        for worker in [w for w in self.jobs.values() if w.job_id is not None]:
            job = listed.get(worker.job_id)
            if job is None:
                self._ask_scontrol(worker)
            else:
                self._observe(worker, job)
        if self.jobs:
            self._poll_soon()

    def _unreachable(self, why: str) -> None:
        if self._unreachable_since is None:
            self._unreachable_since = self.clock()
            log.warning("Slurm does not answer (%s): jobs keep their state; asking again with backoff", why)
        self._poll_delay = min(MAX_POLL_SECONDS, self._poll_delay * 2)
        self._poll_soon()

    def _ask_scontrol(self, worker: SlurmWorker) -> None:
        def done(result: CommandResult) -> None:
            if (worker.name, worker.role) not in self.jobs:
                return
            job = slurm.parse_scontrol_job(result.stdout) if result.ok else None
            if job is not None:
                self._observe(worker, job)
            elif "Invalid job id" in result.stderr:
                self._ended(worker, 1, Failure("slurm", f"Slurm no longer knows job {worker.job_id} "
                                                        "(it left the controller before its end was seen)"))

        self.commands.run(["scontrol", "show", "job", "-o", str(worker.job_id)], done)

    def _observe(self, worker: SlurmWorker, job: slurm.SlurmJob) -> None:
        nodes = job.nodes or worker.nodes  # (an ended job keeps the nodes it ran on)
        changed = (job.state, job.reason, nodes) != (worker.state, worker.reason, worker.nodes)
        if changed:
            log.info("job %s: Slurm job %d is %s (%s)%s", worker.name, job.job_id, job.state, job.reason,
                     f" on {nodes}" if nodes else "")
        worker.state, worker.reason, worker.nodes = job.state, job.reason, nodes
        if job.phase != "ended":
            if changed or (job.phase == "running" and not worker.running):
                self._changed(worker, running=job.phase == "running")
            return
        end = slurm.ending(job)
        failure = Failure(end.kind, end.message) if end.kind else None
        if worker.output is not None:
            worker.output.finish()  # all of its output in its log before the end is told
        if failure is None and end.returncode != 0:
            tail = worker.output.explaining_tail() if worker.output is not None else []
            failure = classify_failure(end.returncode, tail, worker.role)
        self._ended(worker, end.returncode, failure)

    def _ended(self, worker: SlurmWorker, returncode: int, failure: Failure | None) -> None:
        if self.jobs.get((worker.name, worker.role)) is not worker:
            return
        del self.jobs[(worker.name, worker.role)]
        if worker.output is not None:
            worker.output.finish()  # (where _observe did not already: sbatch refused, scontrol forgot it)
        self._last_seen[(worker.name, worker.role)] = worker.shown()
        if worker.job_id is not None:
            self._ended_ids.add(worker.job_id)
        if worker.imposed is not None:
            failure = worker.imposed
        self.local.note(worker.name, worker.role,
                        f"==== oddaemon: {worker.role} attempt {worker.attempt} ended in Slurm: "
                        f"{worker.state}{' (' + failure.message + ')' if failure else ''}\n")
        self.on_exit(worker, returncode, failure)
