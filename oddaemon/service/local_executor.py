"""The local-process executor: runs and watches a job's workers as processes on this host, on the
event loop (``service/executor.py`` is the interface; a cluster backend implements it again).

It owns the live ``Worker`` objects, their log pumps and their timers. It reports each exit
through ``on_exit(worker, returncode, failure)`` (a ``Failure`` read from the exit status and the
log tail, or the one given to ``stop`` when the daemon stopped a hung or diverging worker) and
never decides anything about jobs: that is the scheduler's job. ``cgroups``: each worker launched
with ``limits`` runs in a cgroup of its own (``service/cgroup_workers.py``). ``on_output(name, role)`` is
called when a worker writes to its log (activity, for hang detection).
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable

from oddaemon.adapters.confine import Identity
from oddaemon.adapters.logs import LogPump, RotatingLog
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.procs import Worker, process_start_time, spawn
from oddaemon.core import layout
from oddaemon.core.failures import Failure, classify_failure, describe_returncode
from oddaemon.service.cgroup_workers import WorkerCgroups
from oddaemon.service.executor import ExitCallback, WorkerLaunch

log = logging.getLogger("oddaemon.service.local_executor")
# How long a train worker asked to save (oddaemon finish) may take before it is stopped as on a
# cancel: the save waits for the end of the training iteration it is in (100 steps in train_loop).
FINISH_GRACE_SECONDS = 600.0

class LocalExecutor:
    def __init__(self, loop: Loop, log_dir: str, log_max_bytes: int, log_backups: int,
                 stop_grace: float, on_exit: ExitCallback, clock: Callable[[], float] = time.time,
                 on_output: Callable[[str, str], None] | None = None, cgroups: WorkerCgroups | None = None):
        self.loop = loop
        self.cgroups = cgroups
        self.log_dir = log_dir
        self.log_max_bytes = log_max_bytes
        self.log_backups = log_backups
        self.stop_grace = stop_grace
        self.on_exit = on_exit
        self.on_output = on_output
        self._imposed: dict[int, Failure] = {}  # pid -> the failure the daemon stopped it for
        self.identity: Identity | None = None  # whom workers run as (None: the daemon's own user); set at start
        self.clock = clock
        self.workers: dict[tuple[str, str], Worker] = {}
        self._logs: dict[tuple[str, str], RotatingLog] = {}
        self._handles: dict[int, list[object]] = {}
        self.on_change: Callable[[Worker], None] = lambda worker: None  # (a process runs from its start: never told)

    def log_path(self, name: str, role: str) -> str:
        return layout.log_file(self.log_dir, name, role)

    def _log_for(self, name: str, role: str) -> RotatingLog:
        key = (name, layout.log_name(role))
        if key not in self._logs:
            self._logs[key] = RotatingLog(self.log_path(name, role), self.log_max_bytes, self.log_backups)
        return self._logs[key]

    def configure(self, log_max_bytes: int, log_backups: int, stop_grace: float) -> None:
        """A reload's new log rotation and stop grace (open logs take the rotation at ``reopen_logs``)."""
        self.log_max_bytes, self.log_backups, self.stop_grace = log_max_bytes, log_backups, stop_grace

    def start(self, launch: WorkerLaunch) -> Worker:
        name, role, env = launch.name, launch.role, launch.env
        rlog = self._log_for(name, role)
        rlog.write(f"==== oddaemon: starting {role} attempt {launch.attempt} at "
                   f"{time.strftime('%Y-%m-%d %H:%M:%S')} "
                   f"(CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', '')!r})\n".encode())
        place = (self.cgroups.prepare(name, role, launch.limits)
                 if self.cgroups is not None and launch.limits is not None else None)
        try:
            worker = spawn(name, role, launch.attempt, launch.argv, env, launch.cwd, self.clock(), stdin=launch.stdin,
                           pass_fds=launch.pass_fds, identity=self.identity, nice=launch.nice, place=place)
        except Exception:  # (OperationError: it could not be started)
            if place is not None:
                self.cgroups.not_started(name, role)
            raise
        pump = LogPump(worker.output_fd, rlog)
        handles = [
            self.loop.add_reader(worker.output_fd, lambda: self._pump(worker, pump)),
            self.loop.add_reader(worker.pidfd, lambda: self._reap(worker, pump)),
        ]
        self._handles[worker.pid] = handles
        self.workers[(name, role)] = worker
        return worker

    def note(self, name: str, role: str, text: str) -> None:
        """A line of the daemon's own in a job's log (e.g. its preflight verdict)."""
        self._log_for(name, role).write(text.encode())
        self.close_logs_if_idle(name)

    def write_log(self, name: str, role: str, data: bytes) -> None:
        """Whole lines into a job's rotating log (a Slurm worker's output, copied: ``slurm_output.py``)."""
        self._log_for(name, role).write(data)

    def runtime_record(self, worker: Worker) -> dict:
        return {"pid": worker.pid, "start_time": process_start_time(worker.pid), "attempt": worker.attempt,
                "role": worker.role, "started_at": worker.started_at}

    def _pump(self, worker: Worker, pump: LogPump) -> None:
        alive = pump.pump()
        if self.on_output is not None:
            self.on_output(worker.name, worker.role)
        if not alive:
            handles = self._handles.get(worker.pid)
            if handles and handles[0] is not None:
                self.loop.remove(handles[0])
                handles[0] = None

    def _reap(self, worker: Worker, pump: LogPump) -> None:
        returncode = worker.poll_exit()
        if returncode is None:
            return  # spurious wake-up
        handles = self._handles.pop(worker.pid, [None, None])
        self.loop.remove(handles[1])
        worker.close()
        # Read what the worker wrote before it died, so its last words are in the log and the tail.
        if not pump.closed:
            pump.pump()
            if handles[0] is not None:
                # A grandchild may still hold the pipe open: stop listening and close our end.
                self.loop.remove(handles[0])
                pump.close()
        if self.workers.get((worker.name, worker.role)) is worker:
            del self.workers[(worker.name, worker.role)]
        failure = self._imposed.pop(worker.pid, None)
        imposed, note = failure is not None, ""
        if failure is None and returncode != 0:
            failure = classify_failure(returncode, pump.explaining_tail(), worker.role)
        if self.cgroups is not None:  # its peak memory; host-oom when the OOM killer ended it in its cgroup
            failure, note = self.cgroups.ended(worker.name, worker.role, returncode, failure, imposed)
        self._log_for(worker.name, worker.role).write(
            f"==== oddaemon: {worker.role} attempt {worker.attempt} ended: "
            f"{describe_returncode(returncode)}{note}"
            f"{' (' + failure.message + ')' if failure else ''}\n".encode())
        self.on_exit(worker, returncode, failure)

    def stop(self, name: str, role: str, reason: str, failure: Failure | None = None,
             only: Worker | None = None, save: bool = False) -> bool:
        """SIGTERM to the worker's process group, SIGKILL after the grace period. ``failure``: the
        daemon stops it because it failed (hung, NaN loss); its exit reports that failure. ``save``:
        SIGUSR2 first (the worker saves a checkpoint after its training iteration and exits); still
        there after ``FINISH_GRACE_SECONDS``, it is stopped as above."""
        worker = self.workers.get((name, role))
        if worker is None or (only is not None and worker is not only):
            return False
        if failure is not None:
            self._imposed.setdefault(worker.pid, failure)
            self._log_for(name, role).write(f"==== oddaemon: stopping {role}: {failure.message}\n".encode())
        if worker.saving and not save:  # a cancel, or the daemon stopping, during a finish: stop it now
            self._terminate(worker, reason)
        elif worker.stop_requested_at is None and save:
            worker.stop_requested_at = self.clock()
            worker.saving = True
            log.info("asking the %s worker of %s (pid %d) to save a checkpoint and exit: %s", role, name, worker.pid,
                     reason)
            self._log_for(name, role).write(f"==== oddaemon: {reason}: SIGUSR2 (save a checkpoint, exit)\n".encode())
            worker.signal_group(signal.SIGUSR2)
            self.loop.call_later(max(FINISH_GRACE_SECONDS, self.stop_grace), lambda: self._unsaved(worker, reason))
        elif worker.stop_requested_at is None:
            worker.stop_requested_at = self.clock()
            log.info("stopping %s worker of %s (pid %d): %s", role, name, worker.pid, reason)
            worker.signal_group(signal.SIGTERM)
            self.loop.call_later(self.stop_grace, lambda: self._kill_if_alive(worker))
        return True

    def _unsaved(self, worker: Worker, reason: str) -> None:
        if worker.pid in self._handles and worker.saving:
            log.warning("%s worker of %s (pid %d) has not saved and exited %gs after SIGUSR2: stopping it",
                        worker.role, worker.name, worker.pid, max(FINISH_GRACE_SECONDS, self.stop_grace))
            self._terminate(worker, reason)

    def _terminate(self, worker: Worker, reason: str) -> None:
        """SIGTERM now to a worker that was asked to save; SIGKILL after the grace period."""
        worker.saving = False
        log.info("stopping %s worker of %s (pid %d): %s", worker.role, worker.name, worker.pid, reason)
        worker.signal_group(signal.SIGTERM)
        self.loop.call_later(self.stop_grace, lambda: self._kill_if_alive(worker))

    def _kill_if_alive(self, worker: Worker) -> None:
        if worker.pid in self._handles:
            log.warning("%s worker of %s (pid %d) ignored SIGTERM for %gs: sending SIGKILL",
                        worker.role, worker.name, worker.pid, self.stop_grace)
            worker.signal_group(signal.SIGKILL)

    def stop_all(self, reason: str) -> None:
        for name, role in list(self.workers):
            self.stop(name, role, reason)

    def reopen_logs(self) -> None:
        for rlog in self._logs.values():
            rlog.max_bytes, rlog.backups = self.log_max_bytes, self.log_backups
            rlog.reopen()

    def close_logs_if_idle(self, name: str) -> None:
        """Close a job's log files once none of its processes runs (keeps fds bounded)."""
        if any(key[0] == name for key in self.workers):
            return
        for key in [k for k in self._logs if k[0] == name]:
            self._logs.pop(key).close()
