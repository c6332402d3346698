"""The bounded poller of one job's model_dir: every ``interval`` seconds, one listing of model_dir
and of its event directories, compared with the poll before (``core/model_dir_poll.py``); what
changed goes to the same ``on_checkpoints`` / ``on_progress`` the inotify watcher calls
(``service/watch.py``), so a checkpoint another host wrote, which this host's inotify never
reports, is pinned and evaluated within one interval. The watcher keeps running beside it: on the
daemon's own file system its events come first, and the poll after them finds nothing new.

The listing runs on the loop, as the evaluation side's own re-listing does; it reads a handful of
directory entries per job, whatever the job's history.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from oddaemon.adapters.loop import Loop
from oddaemon.core import model_dir_poll
from oddaemon.core.model_dir_poll import EVENT_DIRS, Seen

log = logging.getLogger("oddaemon.service.watch")


def look(model_dir: str) -> Seen:
    """One poll's listing of ``model_dir`` (``core.model_dir_poll.NOTHING`` when it cannot be listed)."""
    try:
        names = os.listdir(model_dir)
    except OSError:
        return model_dir_poll.NOTHING
    files: list[tuple[str, int, int]] = []
    subdirs = [d for d in EVENT_DIRS if d in names]
    while subdirs:
        sub = subdirs.pop(0)
        try:
            with os.scandir(os.path.join(model_dir, sub)) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            if sub == "eval":  # eval/<eval_input_reader.name>
                                subdirs.append(os.path.join(sub, entry.name))
                            continue
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # gone between the listing and the stat
                    files.append((os.path.join(sub, entry.name), st.st_size, st.st_mtime_ns))
        except OSError:
            continue
    return model_dir_poll.seen(names, files)


class ModelDirPoller:
    def __init__(self, loop: Loop, model_dir: str, interval: float, on_checkpoints: Callable[[], None],
                 on_progress: Callable[[], None]):
        self.loop = loop
        self.model_dir = model_dir
        self.interval = interval
        self.on_checkpoints = on_checkpoints
        self.on_progress = on_progress
        self.polls = 0
        self._before: Seen | None = None
        self._timer: object | None = None
        self._stopped = True

    def start(self) -> None:
        """Take the first bearings now (the watcher's start has just read everything) and poll on."""
        self._stopped = False
        self._before = model_dir_poll.kept(None, look(self.model_dir))
        self._timer = self.loop.call_later(self.interval, self._poll)

    def _poll(self) -> None:
        self._timer = None
        if self._stopped:
            return
        now = look(self.model_dir)
        self.polls += 1
        changed = model_dir_poll.changes(self._before, now)
        self._before = model_dir_poll.kept(self._before, now)
        if changed.checkpoints:
            log.debug("poll of %s: the checkpoints changed", self.model_dir)
            self.on_checkpoints()
        if changed.progress:
            self.on_progress()
        if not self._stopped:  # (a callback may have ended the watch)
            self._timer = self.loop.call_later(self.interval, self._poll)

    def stop(self) -> None:
        self._stopped = True
        if self._timer is not None:
            self.loop.remove(self._timer)
            self._timer = None
