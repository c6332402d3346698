"""Per-job evaluation bookkeeping, pure (no I/O, no clock): which checkpoints exist, which are
pending, running, evaluated, failed or skipped; retries with backoff; the best checkpoint; early
stopping. The daemon persists it (``to_dict``) so that every checkpoint is evaluated exactly once,
across daemon restarts too.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

# What TF (and the stand-in) say when a checkpoint's files are damaged, as opposed to an evaluator
# that crashed or ran out of memory.
DAMAGED = re.compile(r"DataLossError|not an sstable|Checksum does not match|Unable to open table file|"
                     r"corrupted record|truncated record")

PENDING, RUNNING, DONE, FAILED, SKIPPED, MISSED = "pending", "running", "evaluated", "failed", "skipped", "missed"
OPEN = (PENDING, RUNNING)


@dataclass
class CheckpointEval:
    n: int  # save number (ckpt-N)
    prefix: str  # the pinned prefix the evaluator reads
    completed_at: float
    state: str = PENDING
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
        self.checkpoints: dict[int, CheckpointEval] = {}
        self.best_n: int | None = None
        self.best_value: float | None = None
        self.evaluations_since_improvement = 0
        self.final_n: int | None = None  # set when training has ended: the last checkpoint

    # ---- arrivals
    def add(self, n: int, prefix: str, now: float) -> bool:
        if n in self.checkpoints:
            return False
        self.checkpoints[n] = CheckpointEval(n=n, prefix=prefix, completed_at=now)
        return True

    def add_missed(self, n: int, now: float, why: str) -> None:
        if n not in self.checkpoints:
            self.checkpoints[n] = CheckpointEval(n=n, prefix="", completed_at=now, state=MISSED, error=why)

    # ---- choosing work
    def pending(self) -> list[CheckpointEval]:
        return sorted((c for c in self.checkpoints.values() if c.state == PENDING), key=lambda c: c.n)

    def running(self) -> CheckpointEval | None:
        return next((c for c in self.checkpoints.values() if c.state == RUNNING), None)

    def apply_skip_policy(self) -> list[int]:
        """With ``skip_to_newest``, when more than ``max_behind`` checkpoints wait, skip all but the
        newest (the final checkpoint of a finished training is never skipped)."""
        waiting = self.pending()
        if self.policy.when_behind != "skip_to_newest" or len(waiting) <= self.policy.max_behind:
            return []
        skipped = []
        for c in waiting[:-1]:
            if c.n != self.final_n:
                c.state, c.error = SKIPPED, f"skipped: evaluation was {len(waiting)} checkpoints behind"
                skipped.append(c.n)
        return skipped

    def next_due(self, now: float) -> CheckpointEval | None:
        if self.running() is not None:
            return None
        for c in self.pending():
            if c.retry_at is None or c.retry_at <= now:
                return c
            return None  # strictly in order: wait for the retry of the oldest
        return None

    def next_retry_at(self) -> float | None:
        times = [c.retry_at for c in self.pending() if c.retry_at is not None]
        return min(times) if times else None

    # ---- progress of one evaluation
    def start(self, n: int, now: float) -> None:
        c = self.checkpoints[n]
        c.state, c.started_at, c.retry_at = RUNNING, now, None
        c.attempts += 1
        if c.lag_seconds is None:
            c.lag_seconds = max(0.0, now - c.completed_at)

    def finish(self, n: int, step: int | None, metrics: dict[str, float], now: float) -> Finished:
        c = self.checkpoints[n]
        c.state, c.step, c.metrics, c.finished_at, c.error = DONE, step, dict(metrics), now, ""
        c.duration_seconds = now - c.started_at if c.started_at is not None else None
        value = metrics.get(self.policy.metric)
        if value is None or not math.isfinite(value):
            c.error = f"metric {self.policy.metric!r} missing from the results"
            return Finished(False, None)
        # Ties go to the later checkpoint (more trained); patience needs a real improvement.
        improved = self.best_value is None or not self._better(self.best_value, value, 0.0)
        significant = self.best_value is None or self._better(value, self.best_value, self.policy.min_delta)
        self.evaluations_since_improvement = 0 if significant else self.evaluations_since_improvement + 1
        if improved:
            self.best_n, self.best_value = n, value
        early_stop = None
        if self.policy.patience is not None and self.evaluations_since_improvement >= self.policy.patience:
            best = self.checkpoints[self.best_n] if self.best_n is not None else None
            at = f" at step {best.step}" if best and best.step is not None else ""
            early_stop = (f"stopped early: {self.policy.metric} did not improve by at least {self.policy.min_delta:g} "
                          f"in {self.evaluations_since_improvement} evaluations (best {self.best_value:.4g}{at})")
        return Finished(improved, early_stop)

    def fail(self, n: int, error: str, now: float) -> bool:
        """Record a failed attempt. True if it will be retried, False if it is given up: after
        ``max_attempts``, or at once when the checkpoint itself is damaged (reading it again
        cannot help; pinned checkpoints are complete, so the damage is real)."""
        c = self.checkpoints[n]
        c.error = error
        if DAMAGED.search(error):
            c.error = f"the checkpoint is damaged, not retried: {error}"
            c.state, c.finished_at, c.retry_at = FAILED, now, None
            return False
        if c.attempts >= self.policy.max_attempts:
            c.state, c.finished_at = FAILED, now
            return False
        delay = min(self.policy.backoff_cap, self.policy.backoff_base * 2 ** (c.attempts - 1))
        c.state, c.retry_at = PENDING, now + delay
        return True

    def release(self, n: int, now: float, why: str) -> None:
        """A waiting checkpoint is given up to keep the pins within their disk budget: skipped, with why."""
        c = self.checkpoints[n]
        c.state, c.error, c.finished_at, c.retry_at = SKIPPED, why, now, None

    def miss(self, n: int, now: float, why: str) -> None:
        """A waiting checkpoint can no longer be evaluated (its files are gone): recorded, never retried."""
        c = self.checkpoints[n]
        c.state, c.error, c.finished_at, c.retry_at = MISSED, why, now, None

    def interrupted(self, now: float, error: str) -> int | None:
        """The evaluator died (or the daemon restarted) during an evaluation: count it as a failed attempt."""
        c = self.running()
        if c is None:
            return None
        self.fail(c.n, error, now)
        return c.n

    # ---- questions
    def drained(self) -> bool:
        return not any(c.state in OPEN for c in self.checkpoints.values())

    def best(self) -> CheckpointEval | None:
        return self.checkpoints.get(self.best_n) if self.best_n is not None else None

    def latest_done(self) -> CheckpointEval | None:
        done = [c for c in self.checkpoints.values() if c.state == DONE]
        return max(done, key=lambda c: c.n) if done else None

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in (PENDING, RUNNING, DONE, FAILED, SKIPPED, MISSED)}
        for c in self.checkpoints.values():
            out[c.state] += 1
        return out

    def _better(self, value: float, reference: float, delta: float) -> bool:
        return value > reference + delta if self.policy.higher_is_better else value < reference - delta

    # ---- persistence
    def to_dict(self) -> dict:
        return {"best_n": self.best_n, "best_value": self.best_value, "final_n": self.final_n,
                "evaluations_since_improvement": self.evaluations_since_improvement,
                "checkpoints": [dataclasses.asdict(c) for c in sorted(self.checkpoints.values(), key=lambda c: c.n)]}

    @classmethod
    def from_dict(cls, policy: EvalPolicy, d: dict) -> "EvalBook":
        book = cls(policy)
        book.best_n, book.best_value, book.final_n = d.get("best_n"), d.get("best_value"), d.get("final_n")
        book.evaluations_since_improvement = d.get("evaluations_since_improvement", 0)
        for c in d.get("checkpoints", []):
            book.checkpoints[c["n"]] = CheckpointEval(**c)
        return book
