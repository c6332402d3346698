"""inotify adapter: one inotify fd for the whole daemon, callbacks per watched directory.

The fd is registered on the event loop; ``dispatch`` reads whatever is queued (non-blocking) and
calls ``on_event(name, mask)`` for each event, or ``on_overflow()`` on every watcher when the
kernel queue overflowed (events were lost: watchers rescan). ``IN_IGNORED`` (the kernel dropped a
watch: its directory was deleted, or the filesystem unmounted) is passed on too, with an empty
name, after the watch is forgotten, so its owner can watch the path again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from inotify_simple import INotify, flags

from oddaemon.core.errors import OperationError

# CREATE too: a symlink, FIFO, directory or hard link made directly in new/ gets no CLOSE_WRITE;
# the intake sets those aside at once and leaves a new regular file to its CLOSE_WRITE.
SPOOL_MASK = flags.CLOSE_WRITE | flags.MOVED_TO | flags.CREATE
log = logging.getLogger("oddaemon.inotify")


@dataclass
class Watch:
    path: str
    on_event: Callable[[str, int], None]
    on_overflow: Callable[[], None]


class InotifyHub:
    def __init__(self) -> None:
        self._inotify = INotify(nonblocking=True)
        self._watches: dict[int, Watch] = {}
        self.overflows = 0

    def fileno(self) -> int:
        return self._inotify.fileno()

    def watch(self, path: str, mask: int, on_event: Callable[[str, int], None], on_overflow: Callable[[], None]) -> int:
        try:
            wd = self._inotify.add_watch(path, mask)
        except OSError as exc:
            raise OperationError(path, "watch (inotify)", exc) from exc
        self._watches[wd] = Watch(path, on_event, on_overflow)
        return wd

    def unwatch(self, wd: int) -> None:
        if self._watches.pop(wd, None) is not None:
            try:
                self._inotify.rm_watch(wd)
            except OSError:
                pass  # already gone with its directory

    def dispatch(self) -> None:
        try:
            events = self._inotify.read(timeout=0)
        except BlockingIOError:
            return
        for event in events:
            try:
                self._deliver(event)
            except Exception:
                log.exception("inotify: handling %s in %s failed; going on with the next event",
                              event.name or "an event", getattr(self._watches.get(event.wd), "path", "?"))

    def _deliver(self, event) -> None:
        if event.mask & flags.Q_OVERFLOW:
            self.overflows += 1
            log.warning("inotify queue overflowed (events were lost; overflow %d): rescanning the %d watched "
                        "directories", self.overflows, len(self._watches))
            for watch in list(self._watches.values()):
                watch.on_overflow()
            return
        if event.mask & flags.IGNORED:
            watch = self._watches.pop(event.wd, None)
            if watch is not None:
                watch.on_event("", event.mask)
            return
        watch = self._watches.get(event.wd)
        if watch is not None:
            watch.on_event(event.name, event.mask)

    def close(self) -> None:
        self._inotify.close()
