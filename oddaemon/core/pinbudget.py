"""How much disk the evaluation pins of a job may hold. Pure.

A pin is a hard link, so it costs nothing while TensorFlow keeps the checkpoint too; once
``checkpoint_max_to_keep`` deletes TF's copy, the pin alone holds the files. With an evaluator
slower than the checkpoint rate and ``when_behind = "evaluate_all"``, those pin-only checkpoints
would pile up until the disk is full and training fails. So the daemon keeps, on the file system
of each ``model_dir``, at least ``floor`` bytes free (``[pins] min_free_bytes`` or
``min_free_percent`` of it, whichever is larger), and at most ``cap`` bytes held by one job's pins
alone (``[pins] max_bytes_per_job``, or the job's ``[eval] max_pinned_bytes``). When a new
checkpoint crosses either, the oldest waiting checkpoints that only pins hold are released and
recorded ``skipped`` with the reason; the running one, the best and the newest are never released,
and pins never make training fail (they only ever give space back).
"""

from __future__ import annotations

from dataclasses import dataclass

from oddaemon.core.evalbook import RELEASED  # how a released checkpoint's reason starts


@dataclass(frozen=True)
class PinBudget:
    min_free_bytes: int = 5 * 1024**3
    min_free_percent: float = 5.0
    max_bytes_per_job: int = 0  # 0: no cap but the floor

    def floor(self, total_bytes: int) -> int:
        return max(self.min_free_bytes, int(total_bytes * self.min_free_percent / 100))


def to_release(waiting: list[tuple[int, int]], held: int, free: int, floor: int, cap: int) -> list[int]:
    """Which waiting checkpoints to release, oldest first. ``waiting``: (ckpt number, bytes only its
    pin holds) of the releasable ones, oldest first; ``held``: the bytes only this job's pins hold
    now; ``free``: free bytes on the file system; ``cap``: 0 for none."""
    released = []
    for n, size in waiting:
        if free >= floor and (not cap or held <= cap):
            break
        released.append(n)
        free, held = free + size, held - size
    return released


def release_reason(free: int, floor: int, held: int, cap: int) -> str:
    gib = 1024**3
    if free < floor:
        return (f"{RELEASED} to keep {floor / gib:.3g} GiB free on the file system of model_dir "
                f"({free / gib:.3g} GiB were free): the evaluator is behind the trainer ([pins] min_free_bytes)")
    return (f"{RELEASED}: this job's pins held {held / gib:.3g} GiB, more than its cap of "
            f"{cap / gib:.3g} GiB: the evaluator is behind the trainer ([eval] max_pinned_bytes)")
