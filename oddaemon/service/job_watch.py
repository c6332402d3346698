"""Job watching: for a job that trains or evaluates, its training progress (read from its event
files) and the inotify watch on its model_dir, which reports new checkpoints to the evaluation side
and activity to the train guard. A watch starts with training and ends when the job's evaluator
stops (``StopEvaluator``), after one last read of the event files. With ``poll_seconds`` (the
daemon's ``[cluster] model_dir_poll_seconds``: on by default for the Slurm backend, whose nodes
write model_dirs from other hosts) a bounded poller (``model_dir_poller.py``) calls the same two
callbacks beside the watch, for writes this host's inotify does not see.

How far each job's event files were read is saved under ``state_dir`` (``layout.progress_file``)
at most every ``SAVE_SECONDS`` while they grow, and when the watch ends, so a restarted daemon
goes on from there instead of reading every event file again (``service.progress``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oddaemon.adapters.inotify import InotifyHub
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.store import remove_stale_temps
from oddaemon.core import layout
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.jobs import Job
from oddaemon.formats.pipeline_numbers import pipeline_num_steps
from oddaemon.service.evaluation import Evaluations
from oddaemon.service.model_dir_poller import ModelDirPoller
from oddaemon.service.progress import TrainProgress
from oddaemon.service.trainguard import TrainGuard
from oddaemon.service.watch import ModelDirWatcher

log = logging.getLogger("oddaemon")
SAVE_SECONDS = 5.0


class JobWatching:
    """``state_dir``: where read offsets are kept across restarts (None: nowhere, every start reads all)."""

    def __init__(self, loop: Loop, evaluations: Evaluations, guard: TrainGuard, changed: Callable[[], None],
                 state_dir: str | None = None, poll_seconds: float = 0.0):
        self.loop = loop
        self.poll_seconds = poll_seconds  # 0: inotify only
        self.pollers: dict[str, ModelDirPoller] = {}
        self.state_dir = state_dir
        self._save_timers: dict[str, object] = {}
        if state_dir:  # (made at start-up, before anything writes there)
            remove_stale_temps(layout.progress_dir(state_dir))
        self.evaluations = evaluations
        self.guard = guard
        self.changed = changed  # progress moved: a new metrics snapshot soon
        self.inotify: InotifyHub | None = None  # set at daemon start
        self.progress: dict[str, TrainProgress] = {}
        self.watchers: dict[str, ModelDirWatcher] = {}

    def watch(self, job: Job) -> None:
        """Progress and checkpoint watching for a job that trains or evaluates (idempotent)."""
        name = job.name
        if name not in self.progress:
            target = job.spec.pipeline.num_steps or pipeline_num_steps(job.spec.pipeline_config)
            state = layout.progress_file(self.state_dir, name) if self.state_dir else None
            self.progress[name] = TrainProgress(job.spec.model_dir, target, state)
        self.evaluations.ensure(job)
        if name in self.watchers:
            return
        progress = self.progress[name]

        def on_progress() -> None:
            progress.refresh()
            self._save_soon(name)
            self.guard.progress(name, progress)
            self.changed()

        def on_checkpoints() -> None:
            self.guard.activity(name)
            self.evaluations.rescan(name)

        watcher = ModelDirWatcher(self.inotify, self.loop, job.spec.model_dir, on_checkpoints, on_progress)
        poller = None
        if self.poll_seconds > 0:  # its bearings first: what the watcher's start reads is then never missed
            poller = ModelDirPoller(self.loop, job.spec.model_dir, self.poll_seconds, on_checkpoints, on_progress)
            poller.start()
        try:
            watcher.start()
        except (OddaemonError, OSError) as exc:
            log.error("job %s: cannot watch %s: %s", name, job.spec.model_dir, user_message(exc))
            if poller is not None:
                poller.stop()
            return
        self.watchers[name] = watcher
        if poller is not None:
            self.pollers[name] = poller

    def refresh(self, name: str) -> None:
        """Read what is new in a job's event files (a view, a train worker's exit)."""
        if name in self.progress:
            self.progress[name].refresh()
            self._save_soon(name)

    def _save_soon(self, name: str) -> None:
        """Save the job's read offsets within ``SAVE_SECONDS`` (one write however many reads came)."""
        if name not in self._save_timers and self.progress[name].unsaved:
            self._save_timers[name] = self.loop.call_later(SAVE_SECONDS, lambda: self._save_due(name))

    def _save_due(self, name: str) -> None:
        self._save_timers.pop(name, None)
        if self.progress[name].unsaved:
            self.progress[name].save()

    def _save(self, name: str) -> None:
        """Save now (a pending save is cancelled)."""
        self.loop.remove(self._save_timers.pop(name, None))
        if self.progress[name].unsaved:
            self.progress[name].save()

    def save_all(self) -> None:
        """Save every job's unsaved read offsets now (the daemon is shutting down)."""
        for name in list(self.progress):
            self._save(name)

    def end(self, name: str) -> None:
        """The job's evaluator stopped: the last evaluation's events are read and saved, the watch ends."""
        if name in self.progress:
            self.progress[name].refresh()
            self._save(name)
        watcher = self.watchers.pop(name, None)
        if watcher is not None:
            watcher.stop()
        poller = self.pollers.pop(name, None)
        if poller is not None:
            poller.stop()
