"""A job's best checkpoint kept in ``model_dir/best``: swapped in at most every ``BEST_MIN_INTERVAL``.

The previous best's pin is let go once it left ``best/``. A flood of ever better checkpoints would
otherwise rebuild ``best/`` at every evaluation; a best that a better one replaces before its turn
is never placed (its pin goes at once). Which checkpoint is best is the book's decision
(``evalbook``); the files are ``best_dir`` and ``pins``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from oddaemon.adapters.best_dir import BestDir
from oddaemon.adapters.loop import Loop
from oddaemon.adapters.pins import Pins
from oddaemon.core.errors import OperationError
from oddaemon.core.evalbook import EvalBook

log = logging.getLogger("oddaemon.service.best_checkpoint")

BEST_MIN_INTERVAL = 0.5


class BestCheckpoint:
    """One job's ``best/``. ``placed(n)`` is called once checkpoint ``n`` is in ``best/`` (each_best exports)."""

    def __init__(self, name: str, model_dir: str, book: EvalBook, pins: Pins, loop: Loop,
                 placed: Callable[[int], None]):
        self.name = name
        self.model_dir = model_dir
        self.book = book
        self.pins = pins
        self.loop = loop
        self.placed = placed
        self.best_dir = BestDir(model_dir)
        self.due: int | None = None  # a new best waiting for its turn in model_dir/best
        self.placed_at = -BEST_MIN_INTERVAL
        self.timer: object | None = None

    def offer(self, n: int) -> None:
        """Checkpoint ``n`` is the new best: in ``best/`` now, or at its turn."""
        waiting = self.due
        if waiting is not None and waiting != n:
            self.pins.unpin(waiting)  # replaced before its turn: never placed
        self.due = n
        wait = self.placed_at + BEST_MIN_INTERVAL - time.monotonic()
        if wait <= 0:
            self.place_now()
        elif self.timer is None:
            self.timer = self.loop.call_later(wait, self._turn)

    def _turn(self) -> None:
        self.timer = None  # fired: removing it again would make GLib warn
        self.place_now()

    def place_now(self) -> None:
        """The best waiting for its turn (if any) goes into ``best/`` now (training or the job is over)."""
        if self.timer is not None:
            self.loop.remove(self.timer)
            self.timer = None
        n, self.due = self.due, None
        if n is None:
            return
        self.placed_at = time.monotonic()
        try:
            self._swap_in(n)
        except (OSError, OperationError) as exc:
            log.error("job %s: cannot keep the best checkpoint ckpt-%d in %s/best: %s", self.name, n,
                      self.model_dir, exc)

    def _swap_in(self, n: int) -> None:
        c, policy = self.book.checkpoints[n], self.book.policy
        previous = self.best_dir.swap_in(self.pins.paths(n), {
            "checkpoint": f"ckpt-{n}", "step": c.step, "metric": policy.metric,
            "value": self.book.best_value, "higher_is_better": policy.higher_is_better,
            "metrics": c.metrics, "evaluated_at": c.finished_at})
        if previous is not None and previous != n and previous in self.book.checkpoints:
            self.pins.unpin(previous)
        log.info("job %s: new best ckpt-%d (step %s) %s = %.4g", self.name, n, c.step, policy.metric,
                 self.book.best_value)
        self.placed(n)
