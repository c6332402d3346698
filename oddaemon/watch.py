"""inotify watches on a job's model directory: one watch on ``model_dir`` (checkpoint files,
and the creation of ``train/`` and ``eval/``) plus one on each of ``model_dir/train`` and
``model_dir/eval`` (event files, for progress and evaluation metrics by step).

No polling: checkpoint changes go to ``on_checkpoints`` (the evaluation side re-lists the
directory), event-file changes to ``on_progress`` (coalesced over a short delay, since the
trainer appends to its event file at every logged step). A queue overflow calls both.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from inotify_simple import flags

from oddaemon.checkpoints import is_checkpoint_event
from oddaemon.errors import OperationError
from oddaemon.inotify_watch import InotifyHub
from oddaemon.loop import Loop

MODEL_DIR_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.DELETE
EVENT_DIR_MASK = flags.MODIFY | flags.CLOSE_WRITE | flags.CREATE | flags.MOVED_TO
EVENT_DIRS = ("train", "eval")
PROGRESS_DELAY = 0.25


class ModelDirWatcher:
    def __init__(self, hub: InotifyHub, loop: Loop, model_dir: str, on_checkpoints: Callable[[], None],
                 on_progress: Callable[[], None]):
        self.hub = hub
        self.loop = loop
        self.model_dir = model_dir
        self.on_checkpoints = on_checkpoints
        self.on_progress = on_progress
        self._wds: list[int] = []
        self._event_wds: dict[str, int] = {}
        self._progress_timer: object | None = None

    def start(self) -> None:
        os.makedirs(self.model_dir, exist_ok=True)
        self._wds.append(self.hub.watch(self.model_dir, MODEL_DIR_MASK, self._on_model_dir, self._overflow))
        self._watch_event_dirs()
        self.on_checkpoints()
        self.on_progress()

    def _watch_event_dirs(self) -> None:
        for sub in EVENT_DIRS:
            path = os.path.join(self.model_dir, sub)
            if sub not in self._event_wds and os.path.isdir(path):
                try:
                    self._event_wds[sub] = self.hub.watch(path, EVENT_DIR_MASK, lambda *_: self._progress_soon(),
                                                          self._overflow)
                except OperationError:
                    continue  # removed again meanwhile; its re-creation brings us back here
                self._wds.append(self._event_wds[sub])

    def _on_model_dir(self, name: str, mask: int) -> None:
        if name in EVENT_DIRS:
            if mask & (flags.DELETE | flags.MOVED_FROM):
                wd = self._event_wds.pop(name, None)  # the kernel dropped that watch with the directory
                if wd is not None:
                    self.hub.unwatch(wd)
                    self._wds.remove(wd)
            self._watch_event_dirs()
            self._progress_soon()
        elif is_checkpoint_event(name):
            self.on_checkpoints()

    def _overflow(self) -> None:
        self._watch_event_dirs()
        self.on_checkpoints()
        self.on_progress()

    def _progress_soon(self) -> None:
        if self._progress_timer is None:
            self._progress_timer = self.loop.call_later(PROGRESS_DELAY, self._progress_now)

    def _progress_now(self) -> None:
        self._progress_timer = None
        self.on_progress()

    def stop(self) -> None:
        for wd in self._wds:
            self.hub.unwatch(wd)
        self._wds.clear()
        self._event_wds.clear()
        if self._progress_timer is not None:
            self.loop.remove(self._progress_timer)
            self._progress_timer = None
