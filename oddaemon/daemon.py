"""The daemon: wires loop events into the pure scheduler and executes the actions it returns.

All daemon state lives on the main-loop thread (see ``loop.py`` for how inotify, child exits,
timers, signals and the metrics thread fit together). ``dispatch`` is the only way the job
table changes: event in, ``scheduler.step``, actions out.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from oddaemon import scheduler as sch
from oddaemon.config import Config
from oddaemon.commands import Commands
from oddaemon.control import ControlServer
from oddaemon.errors import OddaemonError, user_message
from oddaemon.gpus import discover
from oddaemon.inotify_watch import SPOOL_MASK, InotifyHub
from oddaemon.jobspec import Problem, parse_job, render_error_file
from oddaemon.loop import Loop
from oddaemon.procs import Worker, kill_leftover, process_start_time, worker_environment
from oddaemon.progress import TrainProgress, pipeline_num_steps
from oddaemon.spool import NotARegularFile, Spool, is_candidate
from oddaemon.states import TERMINAL, JobState
from oddaemon.store import Store
from oddaemon.supervisor import Supervisor
from oddaemon.views import job_view

log = logging.getLogger("oddaemon")

SETTLE_SECONDS = 1.0  # a file in new/ younger than this at rescan may still be being written


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    name: str
    message: str  # why it was rejected (the .error text, or the scheduler's reason)


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
        self.progress: dict[str, TrainProgress] = {}
        self.inotify: InotifyHub | None = None
        self.control: ControlServer | None = None
        self.rejected_total = 0
        self.started_at = clock()
        self.shutting_down = False
        self._wake_handle: object | None = None
        self._rescan_pending = False
        self.on_state_change: list[Callable[[sch.StateChanged], None]] = []

    # ---- start-up ------------------------------------------------------------------------------
    def start(self) -> None:
        self.store.ensure_dirs()
        self.spool.ensure_dirs()
        os.makedirs(self.config.log_dir, exist_ok=True)
        log.info("GPUs: %s (%s)", ",".join(map(str, self.gpu_discovery.ids)) or "none", self.gpu_discovery.detail)
        self._kill_leftover_workers()
        self._restore()
        self.inotify = InotifyHub()
        self.loop.add_reader(self.inotify.fileno(), self.inotify.dispatch)
        # Watch first, then rescan: a file that arrives in between is seen by one or the other.
        self.inotify.watch(self.spool.new, SPOOL_MASK, self._on_spool_event, self._rescan_spool)
        self._rescan_spool()
        self.commands = Commands(self)
        self.control = ControlServer(os.path.join(self.config.state_dir, "control.sock"), self.loop,
                                     self.commands.handle_request)
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal(signum, self.shutdown)
        self.loop.add_signal(signal.SIGHUP, self.reload)
        log.info("ready: spool %s, state %s, logs %s, event loop %s", self.config.spool_dir,
                 self.config.state_dir, self.config.log_dir, self.loop.name)

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
                self._reject(action.token, [Problem(action.reason)], "the daemon cannot run it")
        elif isinstance(action, sch.StateChanged):
            log.info("job %s: %s -> %s (%s)", action.name, action.old or "new", action.new, action.reason)
            for listener in self.on_state_change:
                listener(action)
        elif isinstance(action, sch.WakeAt):
            if self._wake_handle is not None:
                self.loop.remove(self._wake_handle)
            self._wake_handle = self.loop.call_later(max(0.0, action.when - self.clock()), self._wake)

    def _wake(self) -> None:
        self._wake_handle = None
        self.dispatch(sch.Tick())

    # ---- spool intake --------------------------------------------------------------------------
    def _on_spool_event(self, filename: str, mask: int) -> None:
        if is_candidate(filename):
            self.intake(os.path.join(self.spool.new, filename))

    def _rescan_spool(self) -> None:
        now = time.time()
        young = False
        for path in self.spool.scan():
            try:
                if now - os.lstat(path).st_mtime < SETTLE_SECONDS:
                    young = True  # may still be being written: its close-write event, or the re-check, takes it
                    continue
            except FileNotFoundError:
                continue
            self.intake(path)
        if young and not self._rescan_pending:
            self._rescan_pending = True
            self.loop.call_later(SETTLE_SECONDS, self._rescan_again)

    def _rescan_again(self) -> None:
        self._rescan_pending = False
        self._rescan_spool()

    def intake(self, path: str) -> Verdict | None:
        """Validate and submit one spool file; it ends in accepted/ or rejected/. None if it was
        already gone (a duplicate event)."""
        name = os.path.basename(path)
        try:
            data = self.spool.read(path, self.config.max_job_file_bytes)
        except FileNotFoundError:
            return None
        except NotARegularFile as exc:
            return self._reject(path, [Problem(f"{name} was not read: {exc}")], "it is not a regular file")
        except OSError as exc:
            return self._reject(path, [Problem(f"{name} could not be read: {exc.strerror}")], "it could not be read")
        result = parse_job(data, name, self.config.validation_context())
        if isinstance(result, list):
            return self._reject(path, result)
        for action in self.dispatch(sch.Submit(result, token=path)):
            if isinstance(action, sch.Rejected):
                return Verdict(False, result.name, action.reason)
        return Verdict(True, result.name, "")

    def _reject(self, path: str, problems: list[Problem], because: str = "it is not a valid oddaemon job spec") -> Verdict:
        self.rejected_total += 1
        text = render_error_file(os.path.basename(path), problems, because)
        try:
            dest, error_path = self.spool.reject(path, text)
            log.warning("rejected %s -> %s: %s", path, error_path, "; ".join(p.render() for p in problems))
        except OddaemonError as exc:
            log.error("%s (the file stays where it is)", user_message(exc))
        return Verdict(False, "", text)

    # ---- workers -------------------------------------------------------------------------------
    def _start_train(self, action: sch.StartTrain) -> None:
        job = self.state.jobs[action.name]
        payload = {"spec": job.spec.to_dict(), "attempt": action.attempt, "gpus": list(action.gpus),
                   "log_path": self.supervisor.log_path(job.name, "train")}
        try:
            job_json = self.store.write_worker_job(job.name, payload)
            argv = [self.config.resolved_worker_python(), "-m", self.config.worker_module, "train", "--job", job_json]
            env = worker_environment(dict(os.environ), action.gpus)
            worker = self.supervisor.start(job.name, "train", action.attempt, argv, env, self.store.job_dir(job.name))
            self.store.save_runtime(job.name, {"train": self.supervisor.runtime_record(worker)})
        except (OddaemonError, OSError) as exc:
            message = user_message(exc)
            log.error("job %s: cannot start its train worker: %s", job.name, message)
            # Report as an exit on the next loop turn (never re-enter dispatch from an action).
            self.loop.call_later(0, lambda: self.dispatch(
                sch.ProcessExited(job.name, action.attempt, 127, f"could not start the worker: {message}")))
            return
        target = job.spec.pipeline.num_steps or pipeline_num_steps(job.spec.pipeline_config)
        self.progress.setdefault(job.name, TrainProgress(job.spec.model_dir, target))

    def _on_worker_exit(self, worker: Worker, returncode: int, detail: str) -> None:
        self.store.clear_runtime(worker.name)
        if worker.name in self.progress:
            self.progress[worker.name].refresh()
        if self.shutting_down:
            if not self.supervisor.workers:
                self.loop.stop()
            return  # the saved state keeps the job running: it resumes when the daemon starts again
        self.dispatch(sch.ProcessExited(worker.name, worker.attempt, returncode, detail))

    # ---- control -------------------------------------------------------------------------------
    def views(self) -> list[dict]:
        result = []
        for job in sorted(self.state.jobs.values(), key=lambda j: j.seq):
            progress = self.progress.get(job.name)
            if progress is not None and job.state not in TERMINAL:
                progress.refresh()
            result.append(job_view(job, progress, self.state.queue_position(job.name),
                                   self.supervisor.log_path(job.name, "train")))
        return result

    @staticmethod
    def heavy_modules_loaded() -> list[str]:
        """Proof for tests and `doctor`: the daemon must never import these."""
        return sorted(m for m in ("tensorflow", "object_detection", "keras", "torch") if m in sys.modules)

    # ---- signals -------------------------------------------------------------------------------
    def reload(self) -> None:
        log.info("SIGHUP: reopening log files")
        self.supervisor.reopen_logs()

    def shutdown(self) -> None:
        if self.shutting_down:
            return
        self.shutting_down = True
        log.info("shutting down: stopping %d worker(s); their jobs resume at next start", len(self.supervisor.workers))
        if self.control is not None:
            self.control.close()
        if not self.supervisor.workers:
            self.loop.stop()
            return
        self.supervisor.stop_all("daemon shutting down")


def run(config: Config, loop: Loop) -> int:
    daemon = Daemon(config, loop)
    try:
        daemon.start()
    except OddaemonError as exc:
        print(f"oddaemon: {user_message(exc)}", file=sys.stderr)
        return 1
    loop.run()
    log.info("stopped")
    return 0
