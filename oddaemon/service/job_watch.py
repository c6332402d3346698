"""Job watching: for a job that trains or evaluates, its training progress (read from its event
files) and the inotify watch on its model_dir, which reports new checkpoints to the evaluation side
and activity to the train guard. A watch starts with training and ends when the job's evaluator
stops (``StopEvaluator``), after one last read of the event files.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from oddaemon.adapters.inotify import InotifyHub
from oddaemon.adapters.loop import Loop
from oddaemon.core.errors import OddaemonError, user_message
from oddaemon.core.jobs import Job
from oddaemon.formats.pipeline_numbers import pipeline_num_steps
from oddaemon.service.evaluation import Evaluations
from oddaemon.service.progress import TrainProgress
from oddaemon.service.trainguard import TrainGuard
from oddaemon.service.watch import ModelDirWatcher

log = logging.getLogger("oddaemon")


class JobWatching:
    def __init__(self, loop: Loop, evaluations: Evaluations, guard: TrainGuard, changed: Callable[[], None]):
        self.loop = loop
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
            self.progress[name] = TrainProgress(job.spec.model_dir, target)
        self.evaluations.ensure(job)
        if name in self.watchers:
            return
        progress = self.progress[name]

        def on_progress() -> None:
            progress.refresh()
            self.guard.progress(name, progress)
            self.changed()

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

    def refresh(self, name: str) -> None:
        """Read what is new in a job's event files (a view, a train worker's exit)."""
        if name in self.progress:
            self.progress[name].refresh()

    def end(self, name: str) -> None:
        """The job's evaluator stopped: the last evaluation's events are read, the watch ends."""
        self.refresh(name)
        watcher = self.watchers.pop(name, None)
        if watcher is not None:
            watcher.stop()
