"""A fake event loop on a manual clock, for in-process tests of the service layer: nothing runs until a test says so."""

from __future__ import annotations

import heapq
import itertools
import json
import os
import select
import time
from collections.abc import Callable

Callback = Callable[[], None]


class ManualClock:
    """A wall clock (``time.time``'s unit) that moves only when told: ``clock()`` reads it."""

    def __init__(self, start: float = 1_700_000_000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def set(self, now: float) -> None:
        if now < self.now:
            raise ValueError(f"a manual clock does not go back: {now} is before {self.now}")
        self.now = now


class FakeLoop:
    """``adapters/loop.py``'s ``Loop`` interface, run by hand. It records readers and signals (a
    test fires them: ``fire_reader``, ``fire_signal``, or ``run_ready``/``turn`` for the recorded fds
    that are really readable) and keeps timers on ``clock``: ``advance(seconds)`` moves the clock and runs
    each timer that falls due, in due order, with the clock at its due time. Unlike the real loops,
    an exception in a callback propagates to the test."""

    name = "fake"

    def __init__(self, clock: ManualClock | None = None):
        self.clock = clock if clock is not None else ManualClock()
        self.readers: dict[int, Callback] = {}
        self.signals: dict[int, Callback] = {}
        self._timers: list[tuple[float, int, Callback]] = []
        self._cancelled: set[int] = set()
        self._ids = itertools.count()
        self.running = False
        self.stopped = False
        self.closed = False

    # ---- the Loop interface
    def add_reader(self, fd: int, callback: Callback) -> object:
        if fd in self.readers:
            raise ValueError(f"fd {fd} already has a reader")  # as selectors refuses a second registration
        self.readers[fd] = callback
        return ("fd", fd)

    def call_later(self, delay: float, callback: Callback) -> object:
        timer_id = next(self._ids)
        heapq.heappush(self._timers, (self.clock() + max(0.0, delay), timer_id, callback))
        return ("timer", timer_id)

    def remove(self, handle: object) -> None:
        if handle is None:
            return
        kind, key = handle
        if kind == "fd":
            self.readers.pop(key, None)
        else:
            self._cancelled.add(key)

    def add_signal(self, signum: int, callback: Callback) -> None:
        self.signals[signum] = callback

    def run(self) -> None:
        """Run what is due now (never waits; a test drives the rest)."""
        self.running, self.stopped = True, False
        self.advance(0)

    def stop(self) -> None:
        self.running, self.stopped = False, True

    def close(self) -> None:
        self.closed = True

    # ---- driving it
    def timers(self) -> list[float]:
        """The due times of the timers not yet run nor removed, earliest first."""
        return sorted(due for due, timer_id, _ in self._timers if timer_id not in self._cancelled)

    def advance(self, seconds: float) -> int:
        """Move the clock ``seconds`` on, running every timer due by then (timers they add too);
        returns how many ran."""
        until = self.clock() + seconds
        ran = 0
        while self._timers and self._timers[0][0] <= until:
            due, timer_id, callback = heapq.heappop(self._timers)
            if timer_id in self._cancelled:
                self._cancelled.discard(timer_id)
                continue
            self.clock.set(max(self.clock(), due))
            callback()
            ran += 1
        self.clock.set(until)
        return ran

    def fire_reader(self, fd: int) -> None:
        self.readers[fd]()

    def fire_signal(self, signum: int) -> None:
        self.signals[signum]()

    def run_ready(self, timeout: float = 0.0) -> list[int]:
        """Run the callbacks of the recorded fds that are readable, waiting up to ``timeout``
        seconds (real time) for one to be; returns those fds. The clock does not move."""
        if not self.readers:
            return []
        ready, _, _ = select.select(list(self.readers), [], [], timeout)
        for fd in ready:
            callback = self.readers.get(fd)  # an earlier callback may have removed it
            if callback is not None:
                callback()
        return ready

    def turn(self, timeout: float = 0.0) -> None:
        """One turn of a real loop without moving the clock: the readable fds (waiting up to
        ``timeout`` seconds of real time for one), then the timers due now."""
        self.run_ready(timeout)
        self.advance(0)


class FakeWorker:
    """A worker ``FakeExecutor`` "started": what the service layer reads of one (``RunningWorker``).
    It holds what a child process would have inherited (its stdin, its ``pass_fds``), so a test can
    speak a served worker's protocol: ``read_line`` reads its stdin, ``reply`` writes to a passed fd."""

    def __init__(self, launch, pid: int, started_at: float):
        self.launch = launch
        self.name, self.role, self.attempt = launch.name, launch.role, launch.attempt
        self.pid, self.started_at = pid, started_at
        self.stdin = os.dup(launch.stdin) if launch.stdin is not None else None
        self.fds = {fd: os.dup(fd) for fd in launch.pass_fds}  # the number the worker was told -> our copy
        self._buffer = b""

    def read_line(self, timeout: float = 30.0) -> dict | None:
        """The next JSON line on its stdin; None at EOF (the daemon closed it)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdin], [], [], left)[0]:
                raise AssertionError(f"{self.role} worker of {self.name}: no request within {timeout}s")
            chunk = os.read(self.stdin, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def reply(self, message: dict, fd: int | None = None) -> None:
        """One JSON line on a passed fd (the only one when ``fd`` is None)."""
        (ours,) = self.fds.values() if fd is None else (self.fds[fd],)
        os.write(ours, (json.dumps(message) + "\n").encode())

    def close(self) -> None:
        for fd in [self.stdin, *self.fds.values()]:
            if fd is not None:
                os.close(fd)
        self.stdin, self.fds = None, {}


class FakeExecutor:
    """``service/executor.py``'s ``Executor`` that starts no process: it records each launch and
    stop, and a test ends a worker with ``exit(name, role, returncode, failure)``, which reports it
    through ``on_exit`` as a real executor would."""

    def __init__(self, log_dir: str, on_exit, clock: Callable[[], float]):
        self.log_dir = log_dir
        self.on_exit = on_exit
        self.clock = clock
        self.identity = None
        self.workers: dict[tuple[str, str], FakeWorker] = {}
        self.launches: list = []  # every WorkerLaunch, in order
        self.stops: list[tuple[str, str, str, object]] = []  # (name, role, reason, failure)
        self.saves: list[tuple[str, str]] = []  # the stops that asked the worker to save first (finish)
        self.notes: list[tuple[str, str, str]] = []
        self.reopened = 0
        self._pids = itertools.count(4_000_000)  # above any pid_max: never a live process's

    @classmethod
    def factory(cls, made: list[FakeExecutor]):
        """A ``Daemon(executor=...)`` factory that appends the executor it makes to ``made``."""

        def make(config, loop, on_exit, on_output, clock):
            made.append(cls(config.log_dir, on_exit, clock))
            return made[-1]

        return make

    def start(self, launch) -> FakeWorker:
        worker = FakeWorker(launch, next(self._pids), self.clock())
        self.workers[(launch.name, launch.role)] = worker
        self.launches.append(launch)
        return worker

    def stop(self, name: str, role: str, reason: str, failure=None, only=None, save=False) -> bool:
        if (name, role) not in self.workers or (only is not None and self.workers[(name, role)] is not only):
            return False
        self.stops.append((name, role, reason, failure))
        if save:
            self.saves.append((name, role))
        return True

    def stop_all(self, reason: str) -> None:
        for name, role in list(self.workers):
            self.stop(name, role, reason)

    def exit(self, name: str, role: str, returncode: int, failure=None) -> None:
        """The worker ends: what it inherited closes with it, then ``on_exit`` hears of it."""
        worker = self.workers.pop((name, role))
        worker.close()
        self.on_exit(worker, returncode, failure)

    def close(self) -> None:
        """Teardown: the fds of workers still "running" are released (nothing is reported)."""
        for worker in self.workers.values():
            worker.close()

    def runtime_record(self, worker: FakeWorker) -> dict:
        return {"pid": worker.pid, "start_time": None, "attempt": worker.attempt, "role": worker.role,
                "started_at": worker.started_at}

    def log_path(self, name: str, role: str) -> str:
        return f"{self.log_dir}/{name}/{role if role in ('train', 'preflight', 'export') else 'eval'}.log"

    def note(self, name: str, role: str, text: str) -> None:
        self.notes.append((name, role, text))

    def configure(self, log_max_bytes: int, log_backups: int, stop_grace: float) -> None:
        self.configured = (log_max_bytes, log_backups, stop_grace)

    def reopen_logs(self) -> None:
        self.reopened += 1

    def close_logs_if_idle(self, name: str) -> None:
        pass
