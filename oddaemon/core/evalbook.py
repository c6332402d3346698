"""Per-job evaluation bookkeeping, pure (no I/O, no clock): which checkpoints exist, which are
pending, running, evaluated, failed or skipped; retries with backoff; the best checkpoint; early
stopping. The daemon persists it so that every checkpoint is evaluated exactly once, across daemon
restarts too: ``take_changes`` hands over the records changed since the last call (appended to a
journal, ``bookfile``), ``to_dict`` the whole book (its snapshot).

A checkpoint changes state in one place (``_move``), guarded by one table of allowed transitions
(``check_checkpoint_transition``, as ``states.py`` guards jobs): a change that is not in the table
is a programming error and raises before anything changes. ``_move`` also keeps the indexes the
daemon asks about at every event (the waiting checkpoints in order, the running one, the counts,
the newest) right, so that no question costs O(all checkpoints): a job can have tens of thousands.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import itertools
import math
import re
from dataclasses import dataclass, field

# What TF (and the stand-in) say when a checkpoint's files are damaged, as opposed to an evaluator
# that crashed or ran out of memory.
DAMAGED = re.compile(r"DataLossError|not an sstable|Checksum does not match|Unable to open table file|"
                     r"corrupted record|truncated record|Perhaps the file is corrupt|block checksum mismatch")


class CheckpointState(str, enum.Enum):
    """A checkpoint's state; the values are what the saved books and the views say."""

    PENDING = "pending"      # waiting for its evaluation (or for the retry of a failed attempt)
    RUNNING = "running"      # handed to the evaluator
    DONE = "evaluated"       # its metrics are recorded
    FAILED = "failed"        # given up: out of attempts, or its files are damaged
    SKIPPED = "skipped"      # never evaluated: skip_to_newest, or released by the pin budget
    MISSED = "missed"        # never evaluated: deleted before it could be pinned or evaluated

    def __str__(self) -> str:
        return self.value


# The short names.
PENDING, RUNNING, DONE = CheckpointState.PENDING, CheckpointState.RUNNING, CheckpointState.DONE
FAILED, SKIPPED, MISSED = CheckpointState.FAILED, CheckpointState.SKIPPED, CheckpointState.MISSED
OPEN = (PENDING, RUNNING)
STATES = tuple(CheckpointState)
RELEASED = "released unevaluated"  # how the reason of a checkpoint released by the pin budget starts

# The one table of allowed changes. A checkpoint new to the book (old state None) arrives pending,
# or missed when it was deleted before it could be pinned; only a waiting one is started, skipped,
# released or missed; a running one is evaluated, retried (pending again) or given up (failed);
# the other four are final.
_ALLOWED: dict[CheckpointState | None, frozenset[CheckpointState]] = {
    None: frozenset({PENDING, MISSED}),
    PENDING: frozenset({RUNNING, SKIPPED, MISSED}),
    RUNNING: frozenset({DONE, PENDING, FAILED}),
    DONE: frozenset(),
    FAILED: frozenset(),
    SKIPPED: frozenset(),
    MISSED: frozenset(),
}


class IllegalCheckpointTransition(RuntimeError):
    def __init__(self, n: int, old: CheckpointState | None, new: CheckpointState):
        was = "a checkpoint new to the book" if old is None else f"a checkpoint from {old}"
        super().__init__(f"evaluation book: ckpt-{n}: cannot move {was} to {new}: not in the checkpoint "
                         f"transition table")
        self.n, self.old, self.new = n, old, new


def check_checkpoint_transition(n: int, old: CheckpointState | None, new: CheckpointState) -> None:
    if new not in _ALLOWED[old]:
        raise IllegalCheckpointTransition(n, old, new)


def allowed_checkpoint_targets(state: CheckpointState | None) -> frozenset[CheckpointState]:
    """Where a checkpoint in ``state`` may go (``None``: a checkpoint new to the book)."""
    return _ALLOWED[state]


@dataclass
class CheckpointEval:
    n: int  # save number (ckpt-N)
    prefix: str  # the pinned prefix the evaluator reads
    completed_at: float
    state: CheckpointState = PENDING  # changed only by EvalBook._move
    step: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    attempts: int = 0
    retry_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    lag_seconds: float | None = None  # complete -> evaluation start (first attempt)
    duration_seconds: float | None = None
    error: str = ""


@dataclass(frozen=True)
class EvalPolicy:
    metric: str = "DetectionBoxes_Precision/mAP"
    higher_is_better: bool = True
    min_delta: float = 0.0
    patience: int | None = None
    when_behind: str = "evaluate_all"
    max_behind: int = 3
    max_attempts: int = 3
    backoff_base: float = 5.0
    backoff_cap: float = 60.0


@dataclass(frozen=True)
class Finished:
    improved: bool  # a new best
    early_stop: str | None  # the reason, when patience ran out


class EvalBook:
    def __init__(self, policy: EvalPolicy):
        self.policy = policy
        self.checkpoints: dict[int, CheckpointEval] = {}  # read freely; change only through the methods
        self.best_n: int | None = None
        self.best_value: float | None = None
        self.evaluations_since_improvement = 0
        self.final_n: int | None = None  # set when training has ended: the last checkpoint
        # indexes, kept by _move
        self._pending: list[int] = []  # sorted
        self._running: int | None = None
        self._counts = {s: 0 for s in CheckpointState}
        self._latest_done: int | None = None
        self.newest: int | None = None  # the highest checkpoint number known
        self.newest_completed_at: float | None = None
        self.newest_step: int | None = None  # the highest step evaluated
        self.released = 0  # released by the pin budget
        self.last_released_why = ""
        self._changed: set[int] = set()

    # ---- the one state change
    def _move(self, c: CheckpointEval, to: CheckpointState, saved: bool = False, **changes) -> None:
        """Move checkpoint ``c`` (known to the book, or new to it) to state ``to``, setting the record's
        fields in ``changes`` with it. Refused (IllegalCheckpointTransition, nothing changed) unless
        the table allows it; ``saved``: ``c`` is a record read back from the book's files, put back
        as it was saved (not a transition: the one that made it was checked when it happened)."""
        known = self.checkpoints.get(c.n)
        if not saved:
            check_checkpoint_transition(c.n, known.state if known is not None else None, to)
        if known is not None:
            self._unindex(known)
        for name, value in changes.items():
            setattr(c, name, value)
        c.state = CheckpointState(to)
        self.checkpoints[c.n] = c  # a known checkpoint keeps its place (recent() relies on the order)
        self._index(c)
        self._changed.add(c.n)

    def _index(self, c: CheckpointEval) -> None:
        self._counts[c.state] += 1
        if c.state == PENDING:
            bisect.insort(self._pending, c.n)
        elif c.state == RUNNING:
            self._running = c.n
        elif c.state == DONE:
            if self._latest_done is None or c.n > self._latest_done:
                self._latest_done = c.n
            if c.step is not None and (self.newest_step is None or c.step > self.newest_step):
                self.newest_step = c.step
        elif c.state == SKIPPED and c.error.startswith(RELEASED):
            self.released += 1
            self.last_released_why = c.error
        if self.newest is None or c.n > self.newest:
            self.newest = c.n
        if self.newest_completed_at is None or c.completed_at > self.newest_completed_at:
            self.newest_completed_at = c.completed_at

    def _unindex(self, c: CheckpointEval) -> None:
        self._counts[c.state] -= 1
        if c.state == PENDING:
            i = bisect.bisect_left(self._pending, c.n)
            if i < len(self._pending) and self._pending[i] == c.n:
                del self._pending[i]
        elif c.state == RUNNING and self._running == c.n:
            self._running = None
        elif c.state == SKIPPED and c.error.startswith(RELEASED):
            self.released -= 1

    def touched(self, n: int) -> None:
        """Checkpoint ``n``'s record changed outside a state change (its prefix): persist it again."""
        if n in self.checkpoints:
            self._changed.add(n)

    def take_changes(self) -> list[dict]:
        """The records changed since the last call (for the journal), oldest checkpoint first."""
        changed = sorted(n for n in self._changed if n in self.checkpoints)
        self._changed.clear()
        return [dataclasses.asdict(self.checkpoints[n]) for n in changed]

    # ---- arrivals
    def add(self, n: int, prefix: str, now: float) -> bool:
        if n in self.checkpoints:
            return False
        self._move(CheckpointEval(n=n, prefix=prefix, completed_at=now), PENDING)
        return True

    def add_missed(self, n: int, now: float, why: str) -> None:
        if n not in self.checkpoints:
            self._move(CheckpointEval(n=n, prefix="", completed_at=now, error=why), MISSED)

    # ---- choosing work
    def pending(self) -> list[CheckpointEval]:
        return [self.checkpoints[n] for n in self._pending]

    def pending_count(self) -> int:
        return len(self._pending)

    def running(self) -> CheckpointEval | None:
        return self.checkpoints[self._running] if self._running is not None else None

    def apply_skip_policy(self) -> list[int]:
        """With ``skip_to_newest``, when more than ``max_behind`` checkpoints wait, skip all but the
        newest (the final checkpoint of a finished training is never skipped)."""
        waiting = len(self._pending)
        if self.policy.when_behind != "skip_to_newest" or waiting <= self.policy.max_behind:
            return []
        skipped = []
        for n in self._pending[:-1]:
            if n != self.final_n:
                self._move(self.checkpoints[n], SKIPPED, error=f"skipped: evaluation was {waiting} checkpoints behind")
                skipped.append(n)
        return skipped

    def next_due(self, now: float) -> CheckpointEval | None:
        if self._running is not None or not self._pending:
            return None
        c = self.checkpoints[self._pending[0]]  # strictly in order: wait for the retry of the oldest
        return c if c.retry_at is None or c.retry_at <= now else None

    def next_retry_at(self) -> float | None:
        if not self._pending:
            return None
        return self.checkpoints[self._pending[0]].retry_at  # only the oldest can be due (next_due)

    # ---- progress of one evaluation
    def start(self, n: int, now: float) -> None:
        c = self.checkpoints[n]
        lag = c.lag_seconds if c.lag_seconds is not None else max(0.0, now - c.completed_at)
        self._move(c, RUNNING, started_at=now, retry_at=None, attempts=c.attempts + 1, lag_seconds=lag)

    def finish(self, n: int, step: int | None, metrics: dict[str, float], now: float) -> Finished:
        c = self.checkpoints[n]
        value = metrics.get(self.policy.metric)
        if value is None:
            error = f"metric {self.policy.metric!r} missing from the results"
        elif not math.isfinite(value):
            error = f"metric {self.policy.metric!r} is {value!r}, not a finite number: it cannot be the best"
        else:
            error = ""
        self._move(c, DONE, step=step, metrics=dict(metrics), finished_at=now, error=error,
                   duration_seconds=now - c.started_at if c.started_at is not None else None)
        if value is None:
            return Finished(False, None)
        if not math.isfinite(value):  # never the best; an evaluation without an improvement all the same
            self.evaluations_since_improvement += 1
            return Finished(False, self._patience_ran_out())
        # Ties go to the later checkpoint (more trained); patience needs a real improvement.
        improved = self.best_value is None or not self._better(self.best_value, value, 0.0)
        significant = self.best_value is None or self._better(value, self.best_value, self.policy.min_delta)
        self.evaluations_since_improvement = 0 if significant else self.evaluations_since_improvement + 1
        if improved:
            self.best_n, self.best_value = n, value
        return Finished(improved, self._patience_ran_out())

    def _patience_ran_out(self) -> str | None:
        """The early-stop reason once ``patience`` evaluations in a row brought no improvement."""
        if self.policy.patience is None or self.evaluations_since_improvement < self.policy.patience:
            return None
        best = self.checkpoints[self.best_n] if self.best_n is not None else None
        at = f" at step {best.step}" if best and best.step is not None else ""
        of = f"best {self.best_value:.4g}{at}" if self.best_value is not None else "no finite value yet"
        return (f"stopped early: {self.policy.metric} did not improve by at least {self.policy.min_delta:g} "
                f"in {self.evaluations_since_improvement} evaluations ({of})")

    def fail(self, n: int, error: str, now: float) -> bool:
        """Record a failed attempt. True if it will be retried, False if it is given up: after
        ``max_attempts``, or at once when the checkpoint itself is damaged (reading it again
        cannot help; pinned checkpoints are complete, so the damage is real)."""
        c = self.checkpoints[n]
        if DAMAGED.search(error):
            self._move(c, FAILED, error=f"the checkpoint is damaged, not retried: {error}", finished_at=now,
                       retry_at=None)
            return False
        if c.attempts >= self.policy.max_attempts:
            self._move(c, FAILED, error=error, finished_at=now)
            return False
        retry_at = now + min(self.policy.backoff_cap, self.policy.backoff_base * 2 ** (c.attempts - 1))
        self._move(c, PENDING, error=error, retry_at=retry_at)
        return True

    def release(self, n: int, now: float, why: str) -> None:
        """A waiting checkpoint is given up to keep the pins within their disk budget: skipped, with why."""
        self._move(self.checkpoints[n], SKIPPED, error=why, finished_at=now, retry_at=None)

    def miss(self, n: int, now: float, why: str) -> None:
        """A waiting checkpoint can no longer be evaluated (its files are gone): recorded, never retried."""
        self._move(self.checkpoints[n], MISSED, error=why, finished_at=now, retry_at=None)

    def interrupted(self, now: float, error: str) -> int | None:
        """The evaluator died (or the daemon restarted) during an evaluation: count it as a failed attempt."""
        c = self.running()
        if c is None:
            return None
        self.fail(c.n, error, now)
        return c.n

    def training_ended(self) -> None:
        """Training is over: the newest checkpoint is the final one (never skipped, always evaluated)."""
        if self.newest is not None:
            self.final_n = self.newest

    # ---- questions
    def drained(self) -> bool:
        return not self._pending and self._running is None

    def best(self) -> CheckpointEval | None:
        return self.checkpoints.get(self.best_n) if self.best_n is not None else None

    def latest_done(self) -> CheckpointEval | None:
        return self.checkpoints[self._latest_done] if self._latest_done is not None else None

    def counts(self) -> dict[str, int]:
        return {s.value: count for s, count in self._counts.items()}

    def recent(self, limit: int) -> list[CheckpointEval]:
        """The ``limit`` checkpoints recorded last (the newest: they arrive in save order), oldest first."""
        last = list(itertools.islice(reversed(self.checkpoints), limit)) if limit > 0 else []
        return [self.checkpoints[n] for n in sorted(last)]

    def _better(self, value: float, reference: float, delta: float) -> bool:
        return value > reference + delta if self.policy.higher_is_better else value < reference - delta

    # ---- persistence
    def header(self) -> dict:
        return {"best_n": self.best_n, "best_value": self.best_value, "final_n": self.final_n,
                "evaluations_since_improvement": self.evaluations_since_improvement}

    def set_header(self, d: dict) -> None:
        self.best_n, self.best_value, self.final_n = d.get("best_n"), d.get("best_value"), d.get("final_n")
        self.evaluations_since_improvement = d.get("evaluations_since_improvement", 0)

    def restore(self, record: dict) -> None:
        """Put a saved record back (loading: the snapshot, then the journal; a later record of the
        same checkpoint replaces the earlier one). ValueError for a state no book has."""
        c = CheckpointEval(**record)
        self._move(c, CheckpointState(c.state), saved=True)

    def to_dict(self) -> dict:
        return {**self.header(),
                "checkpoints": [dataclasses.asdict(self.checkpoints[n]) for n in sorted(self.checkpoints)]}

    @classmethod
    def from_dict(cls, policy: EvalPolicy, d: dict) -> EvalBook:
        book = cls(policy)
        book.set_header(d)
        for c in d.get("checkpoints", []):
            book.restore(c)
        book._changed.clear()
        return book
