"""Watches running train workers for the two failures that never end a process by themselves:

* **hung**: no log line, no event-file write and no checkpoint for the job's hang timeout
  (``[train] hang_timeout_seconds``, default ``[restart] hang_timeout_seconds``; 0 = never). The
  first steps of a big model can take minutes of graph building: choose the timeout well above
  the slowest quiet stretch.
* **NaN loss**: the TF2 Object Detection API keeps training with a NaN loss. The guard reads the
  loss the trainer writes to its event files; the first NaN (or infinite) ``Loss/`` scalar stops
  the job.

It decides nothing about jobs: it calls ``on_failure(name, Failure)``, and the daemon stops the
worker, whose exit then carries this failure. Activity comes from the executor (log output) and
the model-dir watcher (event files, checkpoints); a timer re-checks at a fraction of the shortest
timeout.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from oddaemon.adapters.loop import Loop
from oddaemon.core.failures import Failure

MAX_CHECK_INTERVAL = 30.0


def overdue(last_activity: float, now: float, timeout: float) -> bool:
    return timeout > 0 and now - last_activity >= timeout


def first_bad_loss(loss_history, scalars: dict[str, float], step: int | None) -> tuple[int | None, str] | None:
    """(step, tag) when the latest losses are NaN/inf, else None. The step is where the trailing run
    of bad ``Loss/total_loss`` values in ``loss_history`` ([(step, value)]) began."""
    bad_tags = sorted(tag for tag, value in scalars.items() if tag.startswith("Loss/") and not math.isfinite(value))
    if not bad_tags:
        return None
    first = step
    for at, value in reversed(loss_history):
        if math.isfinite(value):
            break
        first = at
    tag = "Loss/total_loss" if "Loss/total_loss" in bad_tags else bad_tags[0]
    return first, tag


def hung_failure(seconds: float) -> Failure:
    return Failure("hung", f"hung: no new step, checkpoint or log line for {seconds:g}s; stopped and restarted "
                           "from the latest checkpoint (raise [train] hang_timeout_seconds if the model is "
                           "this slow)")


def nan_failure(step: int | None, tag: str) -> Failure:
    at = f" at step {step}" if step is not None else ""
    return Failure("nan", f"loss became NaN{at} ({tag}): lower [pipeline] learning_rate_base (or "
                          "warmup_learning_rate), then oddaemon retry; the job was not restarted, it would "
                          "diverge again", step)


class TrainGuard:
    def __init__(self, loop: Loop, clock: Callable[[], float], on_failure: Callable[[str, Failure], None]):
        self.loop = loop
        self.clock = clock
        self.on_failure = on_failure
        self._timeouts: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._since: dict[str, float] = {}
        self._seen: dict[str, float] = {}  # wall time of the latest train event seen
        self._flagged: set[str] = set()
        self._timer: object | None = None

    def begin(self, name: str, timeout: float) -> None:
        """A train worker of ``name`` started."""
        self._timeouts[name] = timeout
        self._last[name] = self._since[name] = self.clock()
        self._flagged.discard(name)
        self._arm()

    def end(self, name: str) -> None:
        self._timeouts.pop(name, None)
        self._last.pop(name, None)
        self._since.pop(name, None)
        self._seen.pop(name, None)
        self._flagged.discard(name)

    def activity(self, name: str) -> None:
        if name in self._last:
            self._last[name] = self.clock()

    def progress(self, name: str, progress) -> None:
        """New event-file data for ``name`` (a TrainProgress, already refreshed)."""
        if name not in self._timeouts or name in self._flagged:
            return
        if progress.updated_at is None or progress.updated_at < self._since[name] - 1.0:
            return  # no train event yet, or event files of an earlier run (a job resubmitted into its model_dir)
        if progress.updated_at != self._seen.get(name):  # a new train event (not the evaluator's eval events)
            self._seen[name] = progress.updated_at
            self.activity(name)
        bad = first_bad_loss(progress.loss_history, progress.scalars, progress.step)
        if bad is not None:
            self._flag(name, nan_failure(*bad))

    def check(self) -> None:
        now = self.clock()
        for name, timeout in list(self._timeouts.items()):
            if name not in self._flagged and overdue(self._last[name], now, timeout):
                self._flag(name, hung_failure(timeout))

    def _flag(self, name: str, failure: Failure) -> None:
        self._flagged.add(name)
        self.on_failure(name, failure)

    def _arm(self) -> None:
        active = [t for n, t in self._timeouts.items() if t > 0 and n not in self._flagged]
        if self._timer is not None or not active:
            return
        self._timer = self.loop.call_later(min(MAX_CHECK_INTERVAL, min(active) / 4), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self.check()
        self._arm()
