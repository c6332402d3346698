"""Notification delivery off the event loop: one sender thread per target, each with a bounded
queue, retries with backoff, and the outcome of every delivery handed back to the loop.

* ``Sender.send(job, event, target, data)`` never blocks: it appends to the target's queue (at most
  ``queue_size`` deliveries, the waiting retries included; when it is full the oldest is dropped,
  reported as ``dropped``, and logged once until the queue has room again).
* A webhook is one ``POST`` of ``data`` (``application/json``) with a timeout; 2xx is sent, any
  other answer or error is a failed try. Redirects are not followed (a token-bearing URL is never
  replayed elsewhere). A ``url_file`` is read at each delivery, so a new credential needs no reload.
  A 4xx other than 408/425/429 is not retried. Errors never include the URL.
* A command target runs ``command`` with ``data`` on its stdin, a small fixed environment
  (``ODDAEMON_EVENT`` names the event) and the same timeout; exit status 0 is sent.
* A target that fails is logged once (a warning) and again when it works again; the tries in
  between are logged at debug level. Every final outcome (``core.notifications.Outcome``) reaches
  ``on_outcome`` on the loop thread, through a pipe the loop reads.
* ``Sender.close()`` returns what still waits (and what was being tried at that moment), for the
  daemon to keep across its restart (``core/notify_waiting.py``); ``Sender.resend`` queues it again.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from oddaemon import __version__
from oddaemon.adapters.loop import Loop
from oddaemon.core.notifications import Outcome, Settings, Target, retry_delay, retryable_status
from oddaemon.core.notify_waiting import Waiting

log = logging.getLogger("oddaemon")

MAX_URL_FILE_BYTES = 4096
MAX_ANSWER_BYTES = 65536  # of a webhook's answer body, read and thrown away
COMMAND_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}


class DeliveryError(Exception):
    """One failed try; ``retry`` false when another try cannot help (e.g. HTTP 404)."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):  # (urllib's signature)
        return None  # the 3xx then raises HTTPError: a failed try


_OPENER = urllib.request.build_opener(_NoRedirect)


def webhook_url(target: Target) -> str:
    if not target.url_file:
        return target.url
    try:
        with open(target.url_file, "rb") as f:
            text = f.read(MAX_URL_FILE_BYTES + 1).decode("utf-8", "replace").strip()
    except OSError as exc:
        raise DeliveryError(f"cannot read url_file {target.url_file}: {exc.strerror}") from None
    if len(text) > MAX_URL_FILE_BYTES or not text.startswith(("http://", "https://")) or any(c.isspace() for c in text):
        raise DeliveryError(f"url_file {target.url_file} does not hold one http:// or https:// URL", retry=False)
    return text


def post(target: Target, data: bytes, timeout: float) -> None:
    """One webhook try; raises DeliveryError (its text never holds the URL)."""
    request = urllib.request.Request(webhook_url(target), data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"oddaemon/{__version__}"})
    try:
        with _OPENER.open(request, timeout=timeout) as answer:
            answer.read(MAX_ANSWER_BYTES)
            status = answer.status
    except urllib.error.HTTPError as exc:
        exc.close()
        raise DeliveryError(f"HTTP {exc.code}", retry=retryable_status(exc.code)) from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        raise DeliveryError(f"cannot connect: {getattr(reason, 'strerror', None) or reason}") from None
    except TimeoutError:
        raise DeliveryError(f"no answer within {timeout:g} s") from None
    except (OSError, ValueError) as exc:  # a reset connection, a malformed answer, a bad URL
        raise DeliveryError(f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}") from None
    if not 200 <= status < 300:
        raise DeliveryError(f"HTTP {status}", retry=retryable_status(status))


def run_command(target: Target, event: str, data: bytes, timeout: float) -> None:
    """One command try: the event as JSON on stdin; raises DeliveryError."""
    try:
        done = subprocess.run(list(target.command), input=data, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              timeout=timeout, env={**COMMAND_ENV, "ODDAEMON_EVENT": event}, close_fds=True,
                              start_new_session=True, check=False)
    except subprocess.TimeoutExpired:
        raise DeliveryError(f"{target.command[0]} did not finish within {timeout:g} s (killed)") from None
    except OSError as exc:
        raise DeliveryError(f"cannot run {target.command[0]}: {exc.strerror}") from None
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        said = f": {lines[-1][:200]}" if lines else ""
        raise DeliveryError(f"{target.command[0]} exited with status {done.returncode}{said}")


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    job: str = field(compare=False)
    event: str = field(compare=False)
    data: bytes = field(compare=False)
    tries: int = field(default=0, compare=False)


class _TargetQueue:
    """One target's deliveries and the thread that makes them, one at a time."""

    def __init__(self, target: Target, sender: Sender):
        self.target = target
        self.sender = sender
        self.cond = threading.Condition()
        self.heap: list[_Delivery] = []
        self.closed = False
        self.full_logged = False
        self.down = False  # its last try failed (logged once)
        self.failed_while_down = 0
        self.trying: _Delivery | None = None  # the delivery the thread is making now
        self.thread = threading.Thread(target=self._run, name=f"oddaemon-notify-{target.name}", daemon=True)
        self.thread.start()

    def put(self, delivery: _Delivery) -> None:
        dropped = None
        with self.cond:
            if len(self.heap) >= self.sender.settings.queue_size:
                dropped = min(self.heap, key=lambda d: d.seq)
                self.heap.remove(dropped)
                heapq.heapify(self.heap)
                if not self.full_logged:
                    self.full_logged = True
                    log.warning("notify target %s: %d notifications wait (queue_size); the oldest are dropped "
                                "until it has room again", self.target.name, len(self.heap) + 1)
            heapq.heappush(self.heap, delivery)
            self.cond.notify()
        if dropped is not None:
            self.sender.report(Outcome(dropped.job, dropped.event, self.target.name, "dropped", dropped.tries,
                                       "the target's queue was full"))

    def close(self) -> list[_Delivery]:
        """Stop the thread (after the try it is making, if any); what waits, that try included."""
        with self.cond:
            self.closed = True
            self.cond.notify()
            left = list(self.heap) + ([self.trying] if self.trying is not None else [])
            self.heap = []
        return sorted(left, key=lambda d: d.seq)

    def _next(self) -> _Delivery | None:
        with self.cond:
            self.trying = None
            while not self.closed:
                now = self.sender.clock()
                if self.heap and self.heap[0].due <= now:
                    delivery = self.trying = heapq.heappop(self.heap)
                    if self.full_logged and len(self.heap) < self.sender.settings.queue_size // 2:
                        self.full_logged = False
                    return delivery
                self.cond.wait(None if not self.heap else min(60.0, self.heap[0].due - now))
        return None

    def _run(self) -> None:
        while (delivery := self._next()) is not None:
            try:
                self._try(delivery)
            except Exception:  # never lose the thread: the target would go quiet for good
                log.exception("notify target %s: internal error", self.target.name)

    def _try(self, d: _Delivery) -> None:
        settings = self.sender.settings
        d.tries += 1
        try:
            if self.target.kind == "command":
                run_command(self.target, d.event, d.data, settings.timeout_seconds)
            else:
                post(self.target, d.data, settings.timeout_seconds)
        except DeliveryError as exc:
            self._failed(d, str(exc), exc.retry)
            return
        with self.cond:
            self.trying = None  # (sent: not kept at a stop from here on)
        if self.down:
            log.info("notify target %s works again (%d notification(s) failed meanwhile)", self.target.name,
                     self.failed_while_down)
            self.down, self.failed_while_down = False, 0
        self.sender.report(Outcome(d.job, d.event, self.target.name, "sent", d.tries))

    def _failed(self, d: _Delivery, error: str, retry: bool) -> None:
        settings = self.sender.settings
        again = retry and d.tries <= settings.retries
        if not self.down:
            self.down = True
            log.warning("notify target %s: %s (%s of job %s%s; until it works again, further failures are "
                        "logged at debug level)", self.target.name, error, d.event, d.job,
                        "; retrying with backoff" if again else "; not retried")
        else:
            log.debug("notify target %s: %s (%s of job %s, try %d)", self.target.name, error, d.event, d.job, d.tries)
        if again:
            d.due = self.sender.clock() + retry_delay(d.tries, settings.retry_backoff_seconds)
            with self.cond:
                self.trying = None
                if len(self.heap) < settings.queue_size:
                    heapq.heappush(self.heap, d)
                    return
            error += "; no room left to retry"
        with self.cond:
            self.trying = None
        self.failed_while_down += 1
        self.sender.report(Outcome(d.job, d.event, self.target.name, "failed", d.tries, error))


class Sender:
    """Deliveries to the configured targets; ``on_outcome`` gets every final outcome on the loop thread."""

    def __init__(self, loop: Loop, settings: Settings, on_outcome: Callable[[Outcome], None],
                 clock: Callable[[], float] = time.monotonic):
        self.loop = loop
        self.settings = settings
        self.on_outcome = on_outcome
        self.clock = clock
        self.queues: dict[str, _TargetQueue] = {}
        self._seq = itertools.count()
        self._outcomes: collections.deque[Outcome] = collections.deque()
        self._lock = threading.Lock()  # report (any thread) against close: never a write to a closed fd
        self._closed = False
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._reader = loop.add_reader(self._read_fd, self._drain)

    def configure(self, settings: Settings) -> None:
        """A reload: a target whose definition changed (or is gone) gets a new queue; what waited
        for the old one is dropped (and reported so)."""
        self.settings = settings
        for name, queue in list(self.queues.items()):
            if settings.target(name) != queue.target:
                with queue.cond:
                    left, queue.heap = queue.heap, []
                queue.close()
                del self.queues[name]
                for d in sorted(left, key=lambda d: d.seq):
                    self.report(Outcome(d.job, d.event, name, "dropped", d.tries,
                                        "the target was changed or removed by a reload"))

    def send(self, job: str, event: str, target: Target, data: bytes) -> None:
        self._queue(target).put(_Delivery(self.clock(), next(self._seq), job, event, data))

    def resend(self, waiting: Waiting, target: Target) -> None:
        """A delivery kept by a daemon that stopped: its tries so far, the rest of its backoff."""
        self._queue(target).put(_Delivery(self.clock() + waiting.delay, next(self._seq), waiting.job,
                                          waiting.event, waiting.data, waiting.tries))

    def _queue(self, target: Target) -> _TargetQueue:
        queue = self.queues.get(target.name)
        if queue is None:
            queue = self.queues[target.name] = _TargetQueue(target, self)
        return queue

    def pending(self) -> int:
        """Deliveries waiting (first tries and retries), all targets."""
        return sum(len(q.heap) for q in self.queues.values())

    def report(self, outcome: Outcome) -> None:
        """(any thread) Hand an outcome to the loop."""
        with self._lock:
            if self._closed:
                return
            self._outcomes.append(outcome)
            try:
                os.write(self._write_fd, b"!")
            except BlockingIOError:
                pass  # the pipe is full: the loop will read it

    def _drain(self) -> None:
        try:
            while os.read(self._read_fd, 4096):
                pass
        except BlockingIOError:
            pass
        while self._outcomes:
            self.on_outcome(self._outcomes.popleft())

    def close(self) -> list[Waiting]:
        """Stop every sender thread; what still waits (and each try being made now), oldest first."""
        if self._closed:
            return []
        now, waiting = self.clock(), []
        for name, queue in self.queues.items():
            waiting += [Waiting(d.job, d.event, name, d.data, d.tries, d.due - now) for d in queue.close()]
        self.queues.clear()
        self.loop.remove(self._reader)
        with self._lock:
            self._closed = True
            for fd in (self._read_fd, self._write_fd):
                os.close(fd)
        return waiting
