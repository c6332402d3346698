"""inotify watches on a job's model directory: one watch on ``model_dir`` (checkpoint files,
and the creation of ``train/`` and ``eval/``) plus one on each of ``model_dir/train`` and
``model_dir/eval`` (event files, for progress and evaluation metrics by step).

No polling here (for writers this host's inotify cannot see, e.g. Slurm nodes writing to NFS,
``model_dir_poller.py`` calls the same two callbacks): checkpoint changes go to ``on_checkpoints``
(the evaluation side re-lists the directory), coalesced to one call per loop turn however many
events a burst brought (a trainer saving 100 checkpoints a second makes ~500 events a second; one
re-listing per turn sees them all), event-file changes to ``on_progress`` (coalesced over a short
delay, since the trainer appends to its event file at every logged step). A queue overflow calls both.

If ``model_dir`` itself goes away under a running job (deleted, or moved), the kernel drops the
watch (``IN_IGNORED``); the watcher then creates the directory again, as at start, watches it anew
and rescans, so checkpoints written after that are still seen. When it cannot, it retries. The
kernel says so only once the directory's last reference is gone, and a file still open below it
(the evaluator's event file, held open as TensorFlow does) keeps it: so after anything is deleted
from ``model_dir`` (an ``rm -rf`` deletes its files first), the watcher checks, ``VERIFY_DELAY``
after the last such event, that ``model_dir`` is still the directory that is watched (same device
and inode): one stat, at most twice a second.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from inotify_simple import flags

from oddaemon.adapters.inotify import InotifyHub
from oddaemon.adapters.loop import Loop
from oddaemon.core.checkpoints import is_checkpoint_event
from oddaemon.core.errors import OperationError

MODEL_DIR_MASK = (flags.CLOSE_WRITE | flags.MOVED_TO | flags.MOVED_FROM | flags.CREATE | flags.DELETE
                  | flags.DELETE_SELF | flags.MOVE_SELF)
EVENT_DIR_MASK = flags.MODIFY | flags.CLOSE_WRITE | flags.CREATE | flags.MOVED_TO
EVENT_DIRS = ("train", "eval")
PROGRESS_DELAY = 0.25
REWATCH_RETRY_SECONDS = 5.0
VERIFY_DELAY = 0.5
_GONE = flags.IGNORED | flags.DELETE_SELF | flags.MOVE_SELF
log = logging.getLogger("oddaemon.service.watch")


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
        self._checkpoints_timer: object | None = None
        self._rewatch_timer: object | None = None
        self._watched_inode: tuple[int, int] | None = None
        self._verify_timer: object | None = None
        self._last_delete = 0.0
        self._stopped = False

    def start(self) -> None:
        """Create ``model_dir`` if needed and watch it. Raises OSError / OperationError when it cannot."""
        self._stopped = False
        self._watch_model_dir()
        self.on_checkpoints()
        self.on_progress()

    def _watch_model_dir(self) -> None:
        os.makedirs(self.model_dir, exist_ok=True)
        self._wds.append(self.hub.watch(self.model_dir, MODEL_DIR_MASK, self._on_model_dir, self._overflow))
        self._watched_inode = self._inode()
        self._watch_event_dirs()

    def _inode(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.model_dir)
        except OSError:
            return None
        return (st.st_dev, st.st_ino)

    def _watch_event_dirs(self) -> None:
        eval_dir = os.path.join(self.model_dir, "eval")
        try:  # eval/<eval_input_reader.name>: where the evaluator writes when the name is set
            named = [os.path.join("eval", e.name) for e in os.scandir(eval_dir) if e.is_dir(follow_symlinks=False)]
        except OSError:
            named = []
        for sub in (*EVENT_DIRS, *named):
            path = os.path.join(self.model_dir, sub)
            if sub not in self._event_wds and os.path.isdir(path):
                try:
                    self._event_wds[sub] = self.hub.watch(
                        path, EVENT_DIR_MASK, lambda name, mask, sub=sub: self._on_event_dir(sub, mask),
                        self._overflow)
                except OperationError:
                    continue  # removed again meanwhile; its re-creation brings us back here
                self._wds.append(self._event_wds[sub])

    def _on_event_dir(self, sub: str, mask: int) -> None:
        if mask & flags.IGNORED:  # the kernel dropped this watch (directory deleted): forget it
            wd = self._event_wds.pop(sub, None)
            if wd in self._wds:
                self._wds.remove(wd)
        elif sub == "eval" and mask & flags.ISDIR and mask & (flags.CREATE | flags.MOVED_TO):
            self._watch_event_dirs()
        self._progress_soon()

    def _on_model_dir(self, name: str, mask: int) -> None:
        if name and mask & (flags.DELETE | flags.MOVED_FROM):
            self._verify_soon()
        if not name and mask & _GONE:
            self._gone(mask)
        elif name in EVENT_DIRS:
            if mask & (flags.DELETE | flags.MOVED_FROM):
                wd = self._event_wds.pop(name, None)  # the kernel dropped that watch with the directory
                if wd is not None:
                    self.hub.unwatch(wd)
                    self._wds.remove(wd)
            self._watch_event_dirs()
            self._progress_soon()
        elif is_checkpoint_event(name):
            self._checkpoints_soon()

    def _gone(self, mask: int) -> None:
        """model_dir was deleted or moved away: drop every watch, create it again and watch it anew."""
        if self._stopped or self._rewatch_timer is not None:
            return
        what = "moved away" if mask & flags.MOVE_SELF else "deleted"
        log.warning("model_dir %s was %s while its job is active: creating it again and watching it anew",
                    self.model_dir, what)
        self._unwatch_all()
        self._rewatch_timer = self.loop.call_later(0, self._rewatch)

    def _rewatch(self) -> None:
        self._rewatch_timer = None
        if self._stopped:
            return
        try:
            self._watch_model_dir()
        except (OperationError, OSError) as exc:
            self._unwatch_all()
            log.warning("cannot watch model_dir %s again (%s); retrying in %gs", self.model_dir, exc,
                        REWATCH_RETRY_SECONDS)
            self._rewatch_timer = self.loop.call_later(REWATCH_RETRY_SECONDS, self._rewatch)
            return
        self.on_checkpoints()
        self.on_progress()

    def _unwatch_all(self) -> None:
        for wd in self._wds:
            self.hub.unwatch(wd)
        self._wds.clear()
        self._event_wds.clear()

    def _overflow(self) -> None:
        self._watch_event_dirs()
        self.on_checkpoints()
        self.on_progress()

    def _checkpoints_soon(self) -> None:
        if self._checkpoints_timer is None:
            self._checkpoints_timer = self.loop.call_later(0, self._checkpoints_now)

    def _checkpoints_now(self) -> None:
        self._checkpoints_timer = None
        if not self._stopped:
            self.on_checkpoints()

    def _verify_soon(self) -> None:
        self._last_delete = time.monotonic()
        if self._verify_timer is None:
            self._verify_timer = self.loop.call_later(VERIFY_DELAY, self._verify)

    def _verify(self) -> None:
        """``VERIFY_DELAY`` after the last deletion in model_dir: is it still the watched directory?"""
        self._verify_timer = None
        if self._stopped or self._rewatch_timer is not None:
            return
        quiet_for = time.monotonic() - self._last_delete
        if quiet_for < VERIFY_DELAY:  # deletions go on: look again once they have stopped
            self._verify_timer = self.loop.call_later(VERIFY_DELAY - quiet_for, self._verify)
        elif self._inode() != self._watched_inode:
            self._gone(flags.DELETE_SELF)  # deleted (or replaced) while a file below it is still open

    def _progress_soon(self) -> None:
        if self._progress_timer is None:
            self._progress_timer = self.loop.call_later(PROGRESS_DELAY, self._progress_now)

    def _progress_now(self) -> None:
        self._progress_timer = None
        self.on_progress()

    def stop(self) -> None:
        self._stopped = True
        self._unwatch_all()
        if self._rewatch_timer is not None:
            self.loop.remove(self._rewatch_timer)
            self._rewatch_timer = None
        for timer in (self._progress_timer, self._checkpoints_timer, self._verify_timer):
            if timer is not None:
                self.loop.remove(timer)
        self._progress_timer = self._checkpoints_timer = self._verify_timer = None
