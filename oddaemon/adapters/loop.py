"""The daemon's single event loop.

Everything the daemon reacts to arrives on one thread, the main-loop thread, one callback at a
time, so no daemon state needs a lock:

* inotify (spool, later model directories): its fd is a reader on the loop;
* child exits: each worker's pidfd is a reader (readable once the process has exited);
* worker output: each worker's pipe is a reader;
* timers (restart backoff, stop grace periods, the systemd watchdog): ``call_later``;
* signals (SIGTERM, SIGINT, SIGHUP): delivered as loop callbacks, never run inside a
  Python signal handler that could interrupt a half-done state change;
* the control socket (and D-Bus, which needs GLib): readers on the same loop.

The only other threads are the journal syncer (``bookfile.py``: it fsyncs duplicated file
descriptors, nothing else) and the Prometheus HTTP server, which never touches daemon state: the loop
publishes an immutable snapshot after each change (a single reference assignment), and scrapes
read whichever snapshot is current.

Two implementations with one interface: ``GLibLoop`` (required for D-Bus through pydbus) and
``SelectLoop`` (standard library only, for hosts without PyGObject).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import signal
import socket
import time
from collections.abc import Callable
from typing import Protocol

Callback = Callable[[], None]
log = logging.getLogger("oddaemon.adapters.loop")


# A callback that spends more CPU than this on the loop is named in the log: nothing should (CPU,
# not wall time, so that a loaded machine's preemption is not blamed on the daemon).
SLOW_CALLBACK_CPU_SECONDS = 0.25


def guarded(callback: Callback) -> None:
    """Run a callback; an unexpected exception is logged and never takes the loop (or the
    source it came from) down with it, and one that holds the loop for long is named in the log."""
    started, cpu = time.perf_counter(), time.thread_time()
    try:
        callback()
    except Exception:
        log.exception("internal error in %s (the daemon keeps running)", getattr(callback, "__qualname__", callback))
    spent = time.thread_time() - cpu
    if spent > SLOW_CALLBACK_CPU_SECONDS:
        log.warning("loop: %s held the loop for %.2f s (%.2f s of CPU)", getattr(callback, "__qualname__", callback),
                    time.perf_counter() - started, spent)


class Loop(Protocol):
    name: str

    def add_reader(self, fd: int, callback: Callback) -> object: ...
    def remove(self, handle: object) -> None: ...
    def call_later(self, delay: float, callback: Callback) -> object: ...
    def add_signal(self, signum: int, callback: Callback) -> None: ...
    def run(self) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class GLibLoop:
    name = "glib"

    def __init__(self) -> None:
        from gi.repository import GLib  # noqa: PLC0415 (optional dependency)

        self._glib = GLib
        self._loop = GLib.MainLoop()

    def add_reader(self, fd: int, callback: Callback) -> object:
        cond = self._glib.IOCondition.IN | self._glib.IOCondition.HUP | self._glib.IOCondition.ERR

        def dispatch(_fd, _cond):
            guarded(callback)
            return True

        return ("source", self._glib.unix_fd_add_full(self._glib.PRIORITY_DEFAULT, fd, cond, dispatch))

    def call_later(self, delay: float, callback: Callback) -> object:
        def fire():
            guarded(callback)
            return False

        return ("source", self._glib.timeout_add(max(0, int(delay * 1000)), fire))

    def remove(self, handle: object) -> None:
        if handle is not None:
            self._glib.source_remove(handle[1])

    def add_signal(self, signum: int, callback: Callback) -> None:
        def fire():
            guarded(callback)
            return True

        self._glib.unix_signal_add(self._glib.PRIORITY_HIGH, signum, fire)

    def run(self) -> None:
        self._loop.run()

    def stop(self) -> None:
        self._loop.quit()

    def close(self) -> None:
        pass


class SelectLoop:
    name = "select"

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callback]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self._signals: dict[int, Callback] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, self._drain_signals)
        self._running = False

    def add_reader(self, fd: int, callback: Callback) -> object:
        self._selector.register(fd, selectors.EVENT_READ, callback)
        return ("fd", fd)

    def call_later(self, delay: float, callback: Callback) -> object:
        timer_id = next(self._ids)
        heapq.heappush(self._timers, (time.monotonic() + max(0.0, delay), timer_id, callback))
        return ("timer", timer_id)

    def remove(self, handle: object) -> None:
        if handle is None:
            return
        kind, key = handle
        if kind == "fd":
            try:
                self._selector.unregister(key)
            except (KeyError, ValueError):
                pass
        else:
            self._cancelled.add(key)

    def add_signal(self, signum: int, callback: Callback) -> None:
        self._signals[signum] = callback
        signal.signal(signum, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)
        signal.siginterrupt(signum, False)

    def _drain_signals(self) -> None:
        try:
            data = self._wake_r.recv(256)
        except BlockingIOError:
            return
        for signum in data:
            callback = self._signals.get(signum)
            if callback:
                guarded(callback)

    def run(self) -> None:
        self._running = True
        while self._running:
            timeout = None
            while self._timers and self._timers[0][1] in self._cancelled:
                self._cancelled.discard(heapq.heappop(self._timers)[1])
            if self._timers:
                timeout = max(0.0, self._timers[0][0] - time.monotonic())
            for key, _ in self._selector.select(timeout):
                guarded(key.data)
                if not self._running:
                    return
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now and self._running:
                _, timer_id, callback = heapq.heappop(self._timers)
                if timer_id in self._cancelled:
                    self._cancelled.discard(timer_id)
                    continue
                guarded(callback)

    def stop(self) -> None:
        self._running = False

    def close(self) -> None:
        if self._signals:
            signal.set_wakeup_fd(-1)
            for signum in self._signals:
                signal.signal(signum, signal.SIG_DFL)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()


def make_loop(kind: str = "auto") -> Loop:
    if kind in ("auto", "glib"):
        try:
            import gi  # noqa: PLC0415

            gi.require_version("GLib", "2.0")
            return GLibLoop()
        except (ImportError, ValueError):
            if kind == "glib":
                raise
    return SelectLoop()
