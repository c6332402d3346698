"""inotify adapter: one inotify fd for the whole daemon, callbacks per watched directory.

The fd is registered on the event loop; ``dispatch`` reads whatever is queued (non-blocking) and
calls ``on_event(name, mask)`` for each event, or ``on_overflow()`` on every watcher when the
kernel queue overflowed (events were lost: watchers rescan).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from inotify_simple import INotify, flags

from oddaemon.errors import OperationError

SPOOL_MASK = flags.CLOSE_WRITE | flags.MOVED_TO


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
            if event.mask & flags.Q_OVERFLOW:
                self.overflows += 1
                for watch in list(self._watches.values()):
                    watch.on_overflow()
                continue
            if event.mask & flags.IGNORED:
                self._watches.pop(event.wd, None)
                continue
            watch = self._watches.get(event.wd)
            if watch is not None:
                watch.on_event(event.name, event.mask)

    def close(self) -> None:
        self._inotify.close()
