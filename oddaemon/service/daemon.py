"""The daemon: wires loop events into the pure scheduler and hands the actions it returns to
``Effects`` (``service/effects.py``).

All daemon state lives on the main-loop thread (see ``adapters/loop.py`` for how inotify, child
exits, timers, signals and the metrics thread fit together). ``dispatch`` is the only way the job
table changes: event in, ``scheduler.step``, actions out; a reload too is an event
(``PolicyChanged``). An event raised while actions are being executed (the evaluation side
reacting to an action) is queued and handled right after, so actions always run against the state
that produced them. Workers start through ``WorkerLauncher`` and run under an ``Executor``
(``LocalExecutor`` here); jobs are watched by ``JobWatching``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from oddaemon.adapters import confine
from oddaemon.adapters.control import ControlServer
from oddaemon.adapters.gpus import discover
from oddaemon.adapters.inotify import InotifyHub
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.parsers import ParserPool
from oddaemon.adapters.slurm_cli import SlurmCommands
from oddaemon.adapters.spool import Spool
from oddaemon.adapters.store import Store
from oddaemon.core import layout
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.failures import Failure
from oddaemon.core.states import TERMINAL
from oddaemon.core.views import SHOWN_BY_LIST, SHOWN_BY_STATUS, FinishedViews
from oddaemon.service import cgroup_workers
from oddaemon.service.announce import Announcer
from oddaemon.service.cgroup_workers import WorkerCgroups
from oddaemon.service.commands import Commands
from oddaemon.service.effects import Effects
from oddaemon.service.evaluation import Evaluations
from oddaemon.service.executor import Executor, ExitCallback, RunningWorker
from oddaemon.service.exits import exit_event, log_exit
from oddaemon.service.intake import SpoolIntake, Verdict
from oddaemon.service.job_watch import JobWatching
from oddaemon.service.launch import WorkerLauncher
from oddaemon.service.local_executor import LocalExecutor
from oddaemon.service.notify_hook import NotifyHook
from oddaemon.service.preflight import Preflights
from oddaemon.service.reconfigure import pin_budget_of, policy_of, reread_config
from oddaemon.service.recovery import kill_leftover_workers, load_saved_jobs
from oddaemon.service.slurm_executor import SlurmExecutor
from oddaemon.service.sweeps import SweepHalving
from oddaemon.service.trainguard import TrainGuard

log = logging.getLogger("oddaemon")

__all__ = ["Daemon", "run"]


ExecutorFactory = Callable[[Config, Loop, ExitCallback, Callable[[str, str], None], Callable[[], float]], Executor]


def local_executor(config: Config, loop: Loop, on_exit: ExitCallback, on_output: Callable[[str, str], None],
                   clock: Callable[[], float]) -> Executor:
    """Workers as processes on this host (the default ``ExecutorFactory``)."""
    return LocalExecutor(loop, config.log_dir, config.log_max_bytes, config.log_backups, config.stop_grace_seconds,
                         on_exit, clock, on_output=on_output, cgroups=WorkerCgroups.detected(config.cgroups.mode, loop))


def slurm_executor(config: Config, loop: Loop, on_exit: ExitCallback, on_output: Callable[[str, str], None],
                   clock: Callable[[], float]) -> Executor:
    """Train and export workers as Slurm batch jobs; served workers locally (``[cluster] backend = "slurm"``)."""
    env = dict(os.environ, **({"SLURM_CONF": config.slurm_conf} if config.slurm_conf else {}))
    return SlurmExecutor(loop, SlurmCommands(loop, env), config.slurm_settings(),
                         local_executor(config, loop, on_exit, on_output, clock), on_exit, clock)


def executor_for(config: Config) -> ExecutorFactory:
    return slurm_executor if config.cluster_backend == "slurm" else local_executor


class Daemon:
    """``executor``: how workers run (``local_executor``, or a test's recording fake)."""

    def __init__(self, config: Config, loop: Loop, clock: Callable[[], float] = time.time,
                 executor: ExecutorFactory | None = None):
        self.config = config
        self.loop = loop
        self.clock = clock
        self.store = Store(config.state_dir)
        self.spool = Spool(config.spool_dir)
        self.gpu_discovery = discover(config.gpus)
        self.state = sch.State(inventory=self.gpu_discovery.ids, policy=policy_of(config))
        self.executor = (executor or executor_for(config))(config, loop, self._on_worker_exit,
                                 lambda name, role: role == "train" and self.guard.activity(name), clock)
        self.guard = TrainGuard(loop, clock, self._stop_failed_train)  # hung workers, NaN losses
        self.launcher = WorkerLauncher(config, loop, self.store, self.executor, lambda: self.state.jobs,
                                       self.dispatch, self._refuse, self._train_started)
        self.executor.on_change = self._worker_changed  # (a cluster's job got its id, began to run, moved)
        self.preflights = self._preflights() if config.worker_preflight else None
        self.parsers = ParserPool(loop)  # job files are parsed in child processes, within limits
        self.intake_ = SpoolIntake(config, self.spool, loop, self.dispatch, self._active_names, self.preflights,
                                   self.parsers)
        self.evaluations = Evaluations(loop, config.state_dir, self.dispatch, self.launcher.start_worker,
                                       self.executor.stop, clock, pin_budget_of(config))
        self.announcer = Announcer(self)  # metrics snapshot, D-Bus signals, sd_notify
        self.watching = JobWatching(loop, self.evaluations, self.guard, self.announcer.snapshot_soon,
                                    config.state_dir, config.model_dir_poll_interval())
        self.effects = Effects(loop, clock, lambda: self.state, self.store, self.spool, self.intake_, self.executor,
                               self.launcher, self.watching, self.evaluations, lambda: self.dispatch(sch.Tick()))
        self.effects.on_state_change.append(self.announcer.state_changed)
        self.evaluations.listeners.append(self.announcer.checkpoint_evaluated)
        self.intake_.on_rejected = self.announcer.snapshot_soon  # (a rejection changes no job: no dispatch)
        self.intake_.state = lambda: self.state  # a sweep's variants are checked as one before any is submitted
        self.evaluations.listeners.append(SweepHalving(lambda: self.state.jobs, self.evaluations.book,
                                                       self.dispatch).checkpoint_evaluated)
        self.notify = NotifyHook(config.notify_settings(), loop, clock, lambda: self.state.jobs,
                                 self.watching.progress.get, self.evaluations.book, self.dispatch,
                                 lambda counts: (self.announcer.counters.update(notifications=counts),
                                                 self.announcer.snapshot_soon()),
                                 keep_path=layout.waiting_notifications(config.state_dir))
        self.effects.on_state_change.append(self.notify.state_changed)
        self.evaluations.listeners.append(self.notify.checkpoint_evaluated)
        self.control: ControlServer | None = None
        self.finished_views = FinishedViews()
        self.commands = Commands(self)
        self.started_at = clock()
        self.shutting_down = False
        self._dispatching = False
        self._queued_events: list[sch.Event] = []

    def _preflights(self) -> Preflights:
        return Preflights(layout.preflight_dir(self.config.state_dir), self.loop,
                          self.launcher.start_preflight_server,
                          lambda path: confine.hand_over(self.executor.identity, path, inside=(self.config.state_dir,)),
                          lambda spec, path: self.intake_.submit(spec, path),
                          lambda path, problems, because: self.intake_.reject(path, problems, because),
                          lambda name, line: self.executor.note(name, "preflight", line),
                          escaped=lambda spec: confine.escaped_paths(spec, self.config.allowed_roots))

    @property
    def on_state_change(self) -> list[Callable[[sch.StateChanged], None]]:
        """Listeners told of every job state change (the announcer, the demo)."""
        return self.effects.on_state_change

    # ---- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        identity = confine.worker_identity(self.config, os.geteuid())  # never root workers unless configured
        self.store.ensure_dirs()
        self.spool.ensure_dirs()
        os.makedirs(self.config.log_dir, exist_ok=True)
        confine.check_reachable(identity, self.store.work_dir, self.config.resolved_worker_python())
        self.executor.identity = self.intake_.worker_identity = identity
        log.log(logging.WARNING if "gone" in self.gpu_discovery.detail else logging.INFO, "GPUs: %s (%s)",
                ",".join(map(str, self.gpu_discovery.ids)) or "none", self.gpu_discovery.detail)
        self.watching.inotify = inotify = InotifyHub()
        self.loop.add_reader(inotify.fileno(), inotify.dispatch)
        # Workers of an earlier instance die with it (parent-death signal); one that survived anyway
        # (the signal raced with its start) is killed, so that no job runs twice. Then the saved jobs.
        kill_leftover_workers(self.store)
        self.dispatch(sch.Restore(tuple(load_saved_jobs(self.store))))
        self.notify.restore()  # (what the daemon that stopped had not sent yet)
        self.parsers.start()
        self.intake_.start(inotify)
        self.control = ControlServer(layout.control_socket(self.config.state_dir), self.loop,
                                     self.commands.handle_request)
        self.announcer.start_metrics()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal(signum, self.shutdown)
        self.loop.add_signal(signal.SIGHUP, self.reload)
        self.announcer.start_dbus(self.commands)
        log.info("ready: spool %s, state %s, logs %s, event loop %s", self.config.spool_dir,
                 self.config.state_dir, self.config.log_dir, self.loop.name)
        self.announcer.ready()  # READY=1 only now: state restored, spool rescanned, control socket and D-Bus up

    def serving(self) -> bool:
        """Start-up is over: the control socket answers."""
        return self.control is not None

    # ---- the one way the job table changes -----------------------------------------------------
    def dispatch(self, event: sch.Event) -> list[sch.Action]:
        if self._dispatching:
            self._queued_events.append(event)
            return []
        self._dispatching = True
        try:
            actions = self._step(event)
            while self._queued_events:
                self._step(self._queued_events.pop(0))
        finally:
            self._dispatching = False
        self.announcer.snapshot_soon()
        return actions

    def _step(self, event: sch.Event) -> list[sch.Action]:
        self.state, actions = sch.step(self.state, event, self.clock())
        # One write per job per step: at the position of its first SaveJob (so a record is on disk
        # before the spool file moves or its worker starts), with the content of its last.
        newest = {a.job.name: a for a in actions if isinstance(a, sch.SaveJob)}
        saved: set[str] = set()
        for action in actions:
            if isinstance(action, sch.SaveJob):
                if action.job.name in saved:
                    continue
                saved.add(action.job.name)
                action = newest[action.job.name]
            try:
                self.effects.execute(action)
            except OddaemonError as exc:
                log.error("%s", user_message(exc))
        return actions

    def intake(self, path: str) -> Verdict | None:
        return self.intake_.intake(path)

    @property
    def rejected_total(self) -> int:
        return self.intake_.rejected_total

    # ---- workers -------------------------------------------------------------------------------
    def _active_names(self) -> set[str]:
        return {j.name for j in self.state.jobs.values() if j.state not in TERMINAL}

    def _train_started(self, job: sch.Job) -> None:
        timeout = job.spec.train.hang_timeout_seconds
        self.guard.begin(job.name, self.config.hang_timeout_seconds if timeout is None else timeout)
        self.evaluations.training_started(job)  # its evaluator builds its model while the trainer builds its own

    def _worker_changed(self, worker: RunningWorker) -> None:
        self.launcher.worker_changed(worker)
        self.announcer.snapshot_soon()

    def _refuse(self, name: str, failure: Failure) -> None:
        """An evaluator or export was refused: the job fails (``refused``), as when its train worker
        is. A running train process is stopped, and its exit reports the refusal; otherwise the
        scheduler fails the job at once."""
        job = self.state.jobs.get(name)
        if job is None or job.state in TERMINAL:
            return
        if (name, "train") in self.executor.workers:
            self._stop_failed_train(name, failure)
        else:
            self.dispatch(sch.WorkerRefused(name, failure))

    def _stop_failed_train(self, name: str, failure: Failure) -> None:
        log.warning("job %s: %s", name, failure.message)
        self.executor.stop(name, "train", failure.message, failure=failure)

    def _on_worker_exit(self, worker: RunningWorker, returncode: int, failure: Failure | None) -> None:
        detail = failure.message if failure is not None else ""
        self.launcher.ended(worker)
        log_exit(worker, returncode, failure)
        if self.shutting_down:
            if not self.executor.workers:
                self.loop.stop()
            return  # the saved state keeps the job as it was: it resumes when the daemon starts again
        if worker.role == "preflight":
            self.preflights.on_exit(worker, returncode, detail)
            self.executor.close_logs_if_idle(worker.name)
            return
        if worker.role == "train":
            self.guard.end(worker.name)
            self.watching.refresh(worker.name)
            self.dispatch(exit_event(self.state.jobs.get(worker.name), worker, returncode, failure))
        else:
            self.evaluations.on_worker_exit(worker, returncode, detail)
        if worker.name in self.state.jobs and self.state.jobs[worker.name].state in TERMINAL:
            self.executor.close_logs_if_idle(worker.name)

    # ---- views ---------------------------------------------------------------------------------
    def views(self, shown: int = SHOWN_BY_LIST) -> list[dict]:
        """Every job's view, each listing its ``shown`` newest checkpoints."""
        return [self.view(job.name, shown) for job in sorted(self.state.jobs.values(), key=lambda j: j.seq)]

    def view(self, name: str, shown: int = SHOWN_BY_STATUS) -> dict:
        job = self.state.jobs[name]
        progress = self.watching.progress.get(name)
        if progress is not None and job.state not in TERMINAL:
            progress.refresh()
        position = None if job.state in TERMINAL else self.state.queue_position(name)  # O(jobs): not for 1,000 finished
        view = self.finished_views.job_view(job, progress, position, self.executor.log_path(name, "train"),
                                            self.evaluations.book(name), shown)
        cgroups = cgroup_workers.of(self.executor)  # its workers' cgroups, read now (oddaemon status NAME)
        if cgroups is not None and shown == SHOWN_BY_STATUS and job.state not in TERMINAL:
            view = {**view, "resources": cgroups.usage(name)}
        cluster = getattr(self.executor, "cluster_view", None)  # its Slurm jobs (the Slurm backend)
        slurm_jobs = cluster(name) if cluster is not None else None
        if slurm_jobs is not None:
            view = {**view, "slurm": slurm_jobs}
        return view

    def gpus(self) -> dict:
        """GPU inventory, free GPUs and who holds which (``Commands.gpus``)."""
        return self.commands.gpus()

    def gpu_holders(self) -> dict[int, tuple[str, str]]:
        holders = {}
        for job in self.state.jobs.values():
            if job.state not in TERMINAL:
                holders.update({g: (job.name, "train") for g in job.gpus
                                if job.state.value in ("running", "backoff", "stopping")})
            holders.update({g: (job.name, "eval") for g in job.eval_gpus})
        return holders

    @staticmethod
    def heavy_modules_loaded() -> list[str]:
        """Proof for tests and `doctor`: the daemon must never import these."""
        return sorted(m for m in ("tensorflow", "object_detection", "keras", "torch") if m in sys.modules)

    # ---- signals -------------------------------------------------------------------------------
    def reload(self) -> None:
        """SIGHUP / systemctl reload / D-Bus Reload: re-read the configuration, reopen log files."""
        self.announcer.reloading()
        self._reload_config()
        log.info("reload: reopening log files")
        self.executor.reopen_logs()
        self.announcer.ready()

    def _reload_config(self) -> None:
        new = reread_config(self.config)
        if new is None:
            return
        self.config = self.intake_.config = self.launcher.config = new
        self.executor.configure(new.log_max_bytes, new.log_backups, new.stop_grace_seconds)
        self.evaluations.pin_budget = pin_budget_of(new)
        self.notify.configure(new.notify_settings())
        self.watching.poll_seconds = new.model_dir_poll_interval()  # for watches that start from now on
        log.info("reload: configuration re-read from %s", new.path)
        self.dispatch(sch.PolicyChanged(policy_of(new)))  # e.g. more CPU slots: start what now fits

    def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = self.launcher.shutting_down = True
        log.info("shutting down: stopping %d worker(s); their jobs resume at next start", len(self.executor.workers))
        self.announcer.stop(f"stopping {len(self.executor.workers)} worker(s)")
        if self.control is not None:
            self.control.close()
        self.parsers.close()
        self.watching.save_all()  # event file offsets: the next start reads on from here
        if not self.executor.workers:
            self.loop.stop()
            return
        self.executor.stop_all("daemon shutting down")
        if not self.executor.workers:  # nothing to wait for (an executor may leave its jobs running)
            self.loop.stop()


def run(config: Config, loop: Loop) -> int:
    import faulthandler  # noqa: PLC0415

    faulthandler.enable()  # a watchdog's SIGABRT prints the hung loop's stack to the journal
    daemon = Daemon(config, loop)
    try:
        daemon.start()
    except OddaemonError as exc:
        print(f"oddaemon: {user_message(exc)}", file=sys.stderr)
        return 1
    loop.run()
    daemon.evaluations.close()
    daemon.notify.close()  # (deliveries still waiting are kept for the next start)
    log.info("stopped")
    return 0
