"""The daemon: wires loop events into the pure scheduler and executes the actions it returns.

All daemon state lives on the main-loop thread (see ``loop.py`` for how inotify, child exits,
timers, signals and the metrics thread fit together). ``dispatch`` is the only way the job
table changes: event in, ``scheduler.step``, actions out. An event raised while actions are
being executed (the evaluation side reacting to an action) is queued and handled right after,
so actions always run against the state that produced them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

from oddaemon import scheduler as sch
from oddaemon.announce import Announcer
from oddaemon.commands import Commands
from oddaemon.config import Config, load_config
from oddaemon.control import ControlServer
from oddaemon.errors import OddaemonError, user_message
from oddaemon.evaluation import Evaluations
from oddaemon.gpus import discover
from oddaemon.inotify_watch import InotifyHub
from oddaemon.intake import SpoolIntake, Verdict
from oddaemon.jobspec import Problem
from oddaemon.loop import Loop
from oddaemon.procs import Worker, kill_leftover, process_start_time, worker_environment
from oddaemon.preflight import Preflights
from oddaemon.progress import TrainProgress, pipeline_num_steps
from oddaemon.spool import Spool
from oddaemon.states import TERMINAL
from oddaemon.store import Store
from oddaemon.supervisor import Supervisor
from oddaemon.views import job_view
from oddaemon.watch import ModelDirWatcher

log = logging.getLogger("oddaemon")

# Settings a running daemon cannot change on reload (it warns and keeps the old value).
RESTART_ONLY = ("spool_dir", "state_dir", "log_dir", "gpus", "metrics_listen", "event_loop", "dbus_bus",
                "worker_preflight")

__all__ = ["Daemon", "Verdict", "run"]


class Daemon:
    def __init__(self, config: Config, loop: Loop, clock: Callable[[], float] = time.time):
        self.config = config
        self.loop = loop
        self.clock = clock
        self.store = Store(config.state_dir)
        self.spool = Spool(config.spool_dir)
        self.gpu_discovery = discover(config.gpus)
        policy = sch.Policy(max_restarts=config.max_restarts, backoff_base=config.backoff_base_seconds,
                            backoff_cap=config.backoff_cap_seconds, reset_after=config.restart_reset_after_seconds,
                            max_cpu_jobs=config.max_cpu_jobs)
        self.state = sch.State(inventory=self.gpu_discovery.ids, policy=policy)
        self.supervisor = Supervisor(loop, config.log_dir, config.log_max_bytes, config.log_backups,
                                     config.stop_grace_seconds, self._on_worker_exit, clock)
        self.preflights = (Preflights(os.path.join(config.state_dir, "preflight"), self._start_preflight,
                                      lambda spec, path: self.intake_.submit(spec, path),
                                      lambda path, problems, because: self.intake_.reject(path, problems, because))
                           if config.worker_preflight else None)
        self.intake_ = SpoolIntake(config, self.spool, loop, self.dispatch, self._active_names, self.preflights)
        self.evaluations = Evaluations(loop, config.state_dir, self.dispatch, self.start_worker,
                                       self.supervisor.stop, clock)
        self.progress: dict[str, TrainProgress] = {}
        self.watchers: dict[str, ModelDirWatcher] = {}
        self.runtime: dict[str, dict[str, dict]] = {}
        self.inotify: InotifyHub | None = None
        self.control: ControlServer | None = None
        self.commands = Commands(self)
        self.started_at = clock()
        self.shutting_down = False
        self._wake_handle: object | None = None
        self._dispatching = False
        self._queued_events: list[sch.Event] = []
        self.on_state_change: list[Callable[[sch.StateChanged], None]] = []
        self.announcer = Announcer(self)  # metrics snapshot, D-Bus signals, sd_notify

    # ---- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.ensure_dirs()
        self.spool.ensure_dirs()
        os.makedirs(self.config.log_dir, exist_ok=True)
        log.info("GPUs: %s (%s)", ",".join(map(str, self.gpu_discovery.ids)) or "none", self.gpu_discovery.detail)
        self.inotify = InotifyHub()
        self.loop.add_reader(self.inotify.fileno(), self.inotify.dispatch)
        self._kill_leftover_workers()
        self._restore()
        self.intake_.start(self.inotify)
        self.control = ControlServer(os.path.join(self.config.state_dir, "control.sock"), self.loop,
                                     self.commands.handle_request)
        self.announcer.start_metrics()
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal(signum, self.shutdown)
        self.loop.add_signal(signal.SIGHUP, self.reload)
        self.announcer.start_dbus()
        log.info("ready: spool %s, state %s, logs %s, event loop %s", self.config.spool_dir,
                 self.config.state_dir, self.config.log_dir, self.loop.name)
        self.announcer.ready()  # READY=1 only now: state restored, spool rescanned, control socket and D-Bus up

    def _kill_leftover_workers(self) -> None:
        """Workers of an earlier daemon instance die with it (parent-death signal); if one
        survived anyway (the signal raced with its start), kill it so no job runs twice."""
        for name, runtime in self.store.load_runtime():
            for record in runtime.values():
                if isinstance(record, dict) and kill_leftover(record.get("pid", -1), record.get("start_time")):
                    log.warning("killed a leftover %s worker of %s (pid %s)", record.get("role"), name, record.get("pid"))
                    deadline = time.monotonic() + 10
                    while process_start_time(record["pid"]) == record.get("start_time") and time.monotonic() < deadline:
                        time.sleep(0.05)
            self.store.clear_runtime(name)

    def _restore(self) -> None:
        jobs = []
        for path, record, error in self.store.load_jobs():
            if record is None:
                log.error("cannot read saved job record %s: %s (left in place)", path, error)
                continue
            try:
                jobs.append(sch.Job.from_dict(record))
            except (KeyError, TypeError, ValueError) as exc:
                log.error("saved job record %s is not valid: %s (left in place)", path, exc)
        self.dispatch(sch.Restore(tuple(jobs)))

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
                self._execute(action)
            except OddaemonError as exc:
                log.error("%s", user_message(exc))
        return actions

    def _execute(self, action: sch.Action) -> None:
        if isinstance(action, sch.SaveJob):
            self.store.save_job(action.job.name, action.job.to_dict())
        elif isinstance(action, sch.StartTrain):
            self._start_train(action)
        elif isinstance(action, sch.StopTrain):
            self.supervisor.stop(action.name, "train", action.reason)
        elif isinstance(action, sch.Accepted):
            if action.token:
                self.spool.accept(action.token, action.name)
            position = self.state.queue_position(action.name)
            log.info("accepted job %s%s", action.name, f" (queue position {position})" if position else "")
        elif isinstance(action, sch.Rejected):
            if action.token:
                self.intake_.reject(action.token, [Problem(action.reason)], "the daemon cannot run it")
        elif isinstance(action, sch.StateChanged):
            log.info("job %s: %s -> %s (%s)", action.name, action.old or "new", action.new, action.reason)
            if action.new == "backoff":
                self.announcer.counters["worker_restarts"] += 1
            for listener in self.on_state_change:
                listener(action)
        elif isinstance(action, sch.WakeAt):
            if self._wake_handle is not None:
                self.loop.remove(self._wake_handle)
            self._wake_handle = self.loop.call_later(max(0.0, action.when - self.clock()), self._wake)
        elif isinstance(action, sch.TrainingEnded):
            self._watch(action.name)
            self.evaluations.on_action(action, self.state.jobs.get(action.name))
        elif isinstance(action, sch.StopEvaluator):
            self.evaluations.on_action(action, self.state.jobs.get(action.name))
            watcher = self.watchers.pop(action.name, None)
            if watcher is not None:
                watcher.stop()
            self.supervisor.close_logs_if_idle(action.name)
        else:
            self.evaluations.on_action(action, self.state.jobs.get(getattr(action, "name", "")))

    def _wake(self) -> None:
        self._wake_handle = None
        self.dispatch(sch.Tick())

    def intake(self, path: str) -> Verdict | None:
        return self.intake_.intake(path)

    @property
    def rejected_total(self) -> int:
        return self.intake_.rejected_total

    # ---- workers -------------------------------------------------------------------------------
    def start_worker(self, name: str, role: str, args: list[str], gpus: tuple[int, ...],
                     stdin: int | None = None, pass_fds: tuple[int, ...] = ()) -> Worker | None:
        """Run ``<python> -m <module> <args[0]> --job <job.json> <args[1:]>`` for a job. None when it
        cannot be started, or when the daemon is shutting down (nothing new starts then)."""
        if self.shutting_down:
            return None
        job = self.state.jobs[name]
        payload = {"spec": job.spec.to_dict(), "attempt": job.attempt, "gpus": list(gpus),
                   "log_path": self.supervisor.log_path(name, role)}
        try:
            job_json = self.store.write_worker_job(name, payload) if role == "train" else self._worker_job(name, payload)
            argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, args[0], "--job", job_json,
                    *args[1:]]
            env = worker_environment(dict(os.environ), gpus)
            worker = self.supervisor.start(name, role, job.attempt, argv, env, self.store.job_dir(name),
                                           stdin=stdin, pass_fds=pass_fds)
        except (OddaemonError, OSError) as exc:
            log.error("job %s: cannot start its %s worker: %s", name, role, user_message(exc))
            return None
        self.runtime.setdefault(name, {})[role] = self.supervisor.runtime_record(worker)
        self.store.save_runtime(name, self.runtime[name])
        return worker

    def _start_preflight(self, name: str, role: str, args: list[str], job_json: str) -> Worker | None:
        argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, args[0], "--job", job_json,
                *args[1:]]
        try:
            return self.supervisor.start(name, role, 0, argv, worker_environment(dict(os.environ), ()),
                                         os.path.dirname(job_json))
        except (OddaemonError, OSError) as exc:
            log.error("job %s: cannot start its preflight: %s", name, user_message(exc))
            return None

    def _active_names(self) -> set[str]:
        return {j.name for j in self.state.jobs.values() if j.state not in TERMINAL}

    def _worker_job(self, name: str, payload: dict) -> str:
        path = os.path.join(self.store.job_dir(name), "job.json")
        return path if os.path.exists(path) else self.store.write_worker_job(name, payload)

    def _start_train(self, action: sch.StartTrain) -> None:
        if self.shutting_down:
            return  # the saved record says running: the job starts when the daemon does
        self._watch(action.name)
        worker = self.start_worker(action.name, "train", ["train"], action.gpus)
        if worker is None:
            # Reported as an exit on the next loop turn (never re-enter dispatch from an action).
            self.loop.call_later(0, lambda: self.dispatch(
                sch.ProcessExited(action.name, action.attempt, 127, "the worker could not be started (see the daemon log)")))

    def _watch(self, name: str) -> None:
        """Progress and checkpoint watching for a job that trains or evaluates."""
        job = self.state.jobs[name]
        if name not in self.progress:
            target = job.spec.pipeline.num_steps or pipeline_num_steps(job.spec.pipeline_config)
            self.progress[name] = TrainProgress(job.spec.model_dir, target)
        self.evaluations.ensure(job)
        if name not in self.watchers:
            progress = self.progress[name]

            def on_progress() -> None:
                progress.refresh()
                self.announcer.snapshot_soon()

            watcher = ModelDirWatcher(self.inotify, self.loop, job.spec.model_dir,
                                      lambda: self.evaluations.rescan(name), on_progress)
            try:
                watcher.start()
            except (OddaemonError, OSError) as exc:
                log.error("job %s: cannot watch %s: %s", name, job.spec.model_dir, user_message(exc))
                return
            self.watchers[name] = watcher

    def _on_worker_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        roles = self.runtime.get(worker.name, {})
        roles.pop(worker.role, None)
        if roles:
            self.store.save_runtime(worker.name, roles)
        else:
            self.runtime.pop(worker.name, None)
            self.store.clear_runtime(worker.name)
        if self.shutting_down:
            if not self.supervisor.workers:
                self.loop.stop()
            return  # the saved state keeps the job as it was: it resumes when the daemon starts again
        if worker.role == "preflight":
            self.preflights.on_exit(worker, returncode, detail)
            self.supervisor.close_logs_if_idle(worker.name)
            return
        if worker.role == "train":
            if worker.name in self.progress:
                self.progress[worker.name].refresh()
            self.dispatch(sch.ProcessExited(worker.name, worker.attempt, returncode, detail))
        else:
            self.evaluations.on_worker_exit(worker, returncode, detail)
        if worker.name in self.state.jobs and self.state.jobs[worker.name].state in TERMINAL:
            self.supervisor.close_logs_if_idle(worker.name)

    # ---- views ---------------------------------------------------------------------------------
    def views(self) -> list[dict]:
        result = []
        for job in sorted(self.state.jobs.values(), key=lambda j: j.seq):
            progress = self.progress.get(job.name)
            if progress is not None and job.state not in TERMINAL:
                progress.refresh()
            result.append(job_view(job, progress, self.state.queue_position(job.name),
                                   self.supervisor.log_path(job.name, "train"), self.evaluations.book(job.name)))
        return result

    def gpu_holders(self) -> dict[int, tuple[str, str]]:
        holders = {}
        for job in self.state.jobs.values():
            if job.state not in TERMINAL:
                holders.update({g: (job.name, "train") for g in job.gpus if job.state.value in ("running", "backoff", "stopping")})
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
        self.supervisor.reopen_logs()
        self.announcer.ready()

    def _reload_config(self) -> None:
        if self.config.path is None:
            return
        try:
            new = load_config(self.config.path)
        except OddaemonError as exc:
            log.error("reload: %s; keeping the running configuration", user_message(exc))
            return
        fixed = [f for f in RESTART_ONLY if getattr(new, f) != getattr(self.config, f)]
        if fixed:
            log.warning("reload: %s changed; that takes a restart (systemctl restart oddaemon)", ", ".join(fixed))
            new = dataclasses.replace(new, **{f: getattr(self.config, f) for f in fixed})
        self.config = self.intake_.config = new
        self.supervisor.log_max_bytes, self.supervisor.log_backups = new.log_max_bytes, new.log_backups
        self.supervisor.stop_grace = new.stop_grace_seconds
        policy = sch.Policy(max_restarts=new.max_restarts, backoff_base=new.backoff_base_seconds,
                            backoff_cap=new.backoff_cap_seconds, reset_after=new.restart_reset_after_seconds,
                            max_cpu_jobs=new.max_cpu_jobs)
        self.state = dataclasses.replace(self.state, policy=policy)
        log.info("reload: configuration re-read from %s", new.path)
        self.dispatch(sch.Tick())  # e.g. more CPU slots: start what now fits

    def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: stopping %d worker(s); their jobs resume at next start", len(self.supervisor.workers))
        self.announcer.stop(f"stopping {len(self.supervisor.workers)} worker(s)")
        if self.control is not None:
            self.control.close()
        if not self.supervisor.workers:
            self.loop.stop()
            return
        self.supervisor.stop_all("daemon shutting down")


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
    log.info("stopped")
    return 0
