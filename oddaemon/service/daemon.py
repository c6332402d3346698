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

from oddaemon.adapters import confine
from oddaemon.core import scheduler as sch
from oddaemon.service.announce import Announcer
from oddaemon.service.commands import Commands
from oddaemon.core.config import Config
from oddaemon.adapters.control import ControlServer
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.service.evaluation import Evaluations
from oddaemon.service.exits import exit_event
from oddaemon.core.failures import Failure
from oddaemon.adapters.gpus import discover
from oddaemon.adapters.inotify import InotifyHub
from oddaemon.service.intake import SpoolIntake, Verdict
from oddaemon.core.jobspec import Problem
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.procs import Worker, worker_environment
from oddaemon.service.recovery import kill_leftover_workers, load_saved_jobs
from oddaemon.adapters.parsers import ParserPool
from oddaemon.service.preflight import Preflights
from oddaemon.service.progress import TrainProgress
from oddaemon.formats.pipeline_numbers import pipeline_num_steps
from oddaemon.service.reconfigure import pin_budget_of, policy_of, reread_config
from oddaemon.adapters.spool import Spool
from oddaemon.core.states import TERMINAL
from oddaemon.adapters.store import Store
from oddaemon.service.supervisor import Supervisor
from oddaemon.service.trainguard import TrainGuard
from oddaemon.core.views import SHOWN_BY_LIST, SHOWN_BY_STATUS, job_view
from oddaemon.service.watch import ModelDirWatcher

log = logging.getLogger("oddaemon")

__all__ = ["Daemon", "Verdict", "run"]


class Daemon:
    def __init__(self, config: Config, loop: Loop, clock: Callable[[], float] = time.time):
        self.config = config
        self.loop = loop
        self.clock = clock
        self.store = Store(config.state_dir)
        self.spool = Spool(config.spool_dir)
        self.gpu_discovery = discover(config.gpus)
        self.state = sch.State(inventory=self.gpu_discovery.ids, policy=policy_of(config))
        self.supervisor = Supervisor(loop, config.log_dir, config.log_max_bytes, config.log_backups,
                                     config.stop_grace_seconds, self._on_worker_exit, clock,
                                     on_output=lambda name, role: role == "train" and self.guard.activity(name))
        self.guard = TrainGuard(loop, clock, self._stop_failed_train)  # hung workers, NaN losses
        preflight_dir = os.path.join(config.state_dir, "preflight")
        self.preflights = (Preflights(preflight_dir, loop, self._start_preflight_server,
                                      lambda path: confine.hand_over(self.supervisor.identity, path,
                                                                     inside=(self.config.state_dir,)),
                                      lambda spec, path: self.intake_.submit(spec, path),
                                      lambda path, problems, because: self.intake_.reject(path, problems, because),
                                      lambda name, line: self.supervisor.note(name, "preflight", line),
                                      escaped=lambda spec: confine.escaped_paths(spec, self.config.allowed_roots))
                           if config.worker_preflight else None)
        self.parsers = ParserPool(loop)  # job files are parsed in child processes, within limits
        self.intake_ = SpoolIntake(config, self.spool, loop, self.dispatch, self._active_names, self.preflights,
                                   self.parsers)
        self.evaluations = Evaluations(loop, config.state_dir, self.dispatch, self.start_worker,
                                       self.supervisor.stop, clock, pin_budget_of(config))
        self.progress: dict[str, TrainProgress] = {}
        self.watchers: dict[str, ModelDirWatcher] = {}
        self.runtime: dict[str, dict[str, dict]] = {}
        self.start_refusals: dict[str, Failure] = {}  # why a worker was not started (a path left the roots)
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
        self.intake_.on_rejected = self.announcer.snapshot_soon  # (a rejection changes no job: no dispatch)

    # ---- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        identity = confine.worker_identity(self.config, os.geteuid())  # never root workers unless configured
        self.store.ensure_dirs()
        self.spool.ensure_dirs()
        os.makedirs(self.config.log_dir, exist_ok=True)
        confine.check_reachable(identity, self.store.work_dir, self.config.resolved_worker_python())
        self.supervisor.identity = self.intake_.worker_identity = identity
        log.log(logging.WARNING if "gone" in self.gpu_discovery.detail else logging.INFO, "GPUs: %s (%s)",
                ",".join(map(str, self.gpu_discovery.ids)) or "none", self.gpu_discovery.detail)
        self.inotify = InotifyHub()
        self.loop.add_reader(self.inotify.fileno(), self.inotify.dispatch)
        # Workers of an earlier instance die with it (parent-death signal); one that survived anyway
        # (the signal raced with its start) is killed, so that no job runs twice. Then the saved jobs.
        kill_leftover_workers(self.store)
        self.dispatch(sch.Restore(tuple(load_saved_jobs(self.store))))
        self.parsers.start()
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
            if action.name in self.progress:  # the last evaluation's events, before the watch ends
                self.progress[action.name].refresh()
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
        escaped = confine.escaped_paths(job.spec, self.config.allowed_roots)
        if escaped:
            log.error("job %s: not starting its %s worker: %s", name, role, "; ".join(escaped))
            refused = Failure("refused", f"the {role} worker was not started: " + "; ".join(escaped))
            if role == "train":
                self.start_refusals[name] = refused  # reported as the train worker's exit (_start_train)
            else:
                self._refuse(name, refused)
            return None
        payload = {"spec": job.spec.to_dict(), "attempt": job.attempt, "gpus": list(gpus),
                   "log_path": self.supervisor.log_path(name, role)}
        try:
            job_json = self.store.write_worker_job(name, payload) if role == "train" else self._worker_job(name, payload)
            confine.hand_over(self.supervisor.identity, self.store.job_dir(name), job_json, job.spec.model_dir,
                              os.path.join(self.config.state_dir, "evals", name),
                              inside=(self.config.state_dir, *self.config.allowed_roots), keep=self.config.allowed_roots)
            argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, args[0], "--job", job_json,
                    *args[1:]]
            env = worker_environment(dict(os.environ), gpus)
            worker = self.supervisor.start(name, role, job.attempt, argv, env, self.store.job_dir(name),
                                           stdin=stdin, pass_fds=pass_fds)
        except (OddaemonError, OSError) as exc:
            log.error("job %s: cannot start its %s worker: %s", name, role, user_message(exc))
            return None
        if role == "train":
            timeout = job.spec.train.hang_timeout_seconds
            self.guard.begin(name, self.config.hang_timeout_seconds if timeout is None else timeout)
        self.runtime.setdefault(name, {})[role] = self.supervisor.runtime_record(worker)
        self.store.save_runtime(name, self.runtime[name])
        return worker

    def _start_preflight_server(self, name: str, args: list[str], stdin: int,
                                pass_fds: tuple[int, ...]) -> Worker | None:
        """A warm preflight worker (``preflight.py``); its own log is ``<log_dir>/<name>/preflight.log``."""
        if self.shutting_down:
            return None
        work = os.path.join(self.config.state_dir, "preflight")
        argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, *args]
        try:
            os.makedirs(work, exist_ok=True)
            confine.hand_over(self.supervisor.identity, work, inside=(self.config.state_dir,))
            return self.supervisor.start(name, "preflight", 0, argv, worker_environment(dict(os.environ), ()), work,
                                         stdin=stdin, pass_fds=pass_fds)
        except (OddaemonError, OSError) as exc:
            log.error("cannot start the preflight worker %s: %s", name, user_message(exc))
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
            refused = self.start_refusals.pop(action.name, None)
            self.loop.call_later(0, lambda: self.dispatch(sch.ProcessExited(
                action.name, action.attempt, 127, "the worker could not be started (see the daemon log)", refused)))

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
                self.guard.progress(name, progress)
                self.announcer.snapshot_soon()

            def on_checkpoints() -> None:
                self.guard.activity(name)
                self.evaluations.rescan(name)

            watcher = ModelDirWatcher(self.inotify, self.loop, job.spec.model_dir, on_checkpoints, on_progress)
            try:
                watcher.start()
            except (OddaemonError, OSError) as exc:
                log.error("job %s: cannot watch %s: %s", name, job.spec.model_dir, user_message(exc))
                return
            self.watchers[name] = watcher

    def _refuse(self, name: str, failure: Failure) -> None:
        """An evaluator or export was refused: the job fails (``refused``), as when its train worker
        is. A running train process is stopped, and its exit reports the refusal; otherwise the
        scheduler fails the job at once."""
        job = self.state.jobs.get(name)
        if job is None or job.state in TERMINAL:
            return
        if (name, "train") in self.supervisor.workers:
            self._stop_failed_train(name, failure)
        else:
            self.dispatch(sch.WorkerRefused(name, failure))

    def _stop_failed_train(self, name: str, failure: Failure) -> None:
        log.warning("job %s: %s", name, failure.message)
        self.supervisor.stop(name, "train", failure.message, failure=failure)

    def _on_worker_exit(self, worker: Worker, returncode: int, failure: Failure | None) -> None:
        detail = failure.message if failure is not None else ""
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
            self.guard.end(worker.name)
            if worker.name in self.progress:
                self.progress[worker.name].refresh()
            self.dispatch(exit_event(self.state.jobs.get(worker.name), worker, returncode, failure))
        else:
            self.evaluations.on_worker_exit(worker, returncode, detail)
        if worker.name in self.state.jobs and self.state.jobs[worker.name].state in TERMINAL:
            self.supervisor.close_logs_if_idle(worker.name)

    # ---- views ---------------------------------------------------------------------------------
    def views(self, shown: int = SHOWN_BY_LIST) -> list[dict]:
        """Every job's view, each listing its ``shown`` newest checkpoints."""
        return [self.view(job.name, shown) for job in sorted(self.state.jobs.values(), key=lambda j: j.seq)]

    def view(self, name: str, shown: int = SHOWN_BY_STATUS) -> dict:
        job = self.state.jobs[name]
        progress = self.progress.get(name)
        if progress is not None and job.state not in TERMINAL:
            progress.refresh()
        return job_view(job, progress, self.state.queue_position(name), self.supervisor.log_path(name, "train"),
                        self.evaluations.book(name), shown)

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
        new = reread_config(self.config)
        if new is None:
            return
        self.config = self.intake_.config = new
        self.supervisor.log_max_bytes, self.supervisor.log_backups = new.log_max_bytes, new.log_backups
        self.supervisor.stop_grace = new.stop_grace_seconds
        self.state = dataclasses.replace(self.state, policy=policy_of(new))
        self.evaluations.pin_budget = pin_budget_of(new)
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
        self.parsers.close()
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
    daemon.evaluations.close()
    log.info("stopped")
    return 0
