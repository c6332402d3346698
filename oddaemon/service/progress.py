"""Training progress read from the trainer's event files (no tensorflow): step, losses, learning
rate, steps/s and an ETA. Readers are incremental, so a refresh costs only the new bytes."""

from __future__ import annotations

import collections
import logging
import os

from oddaemon.formats.tfevents import EventDirReader

log = logging.getLogger("oddaemon.service.progress")
HISTORY_POINTS = 256
class TrainProgress:
    """Training progress from ``model_dir/train`` and evaluation metrics by step from
    ``model_dir/eval`` and ``model_dir/eval/<name>`` (what TensorBoard shows; the evaluator writes
    below ``eval/`` when ``eval_input_reader.name`` is set), both read incrementally."""

    def __init__(self, model_dir: str, target_steps: int | None):
        self.reader = EventDirReader(os.path.join(model_dir, "train"))
        self.eval_reader = EventDirReader(os.path.join(model_dir, "eval"), subdirs=True)
        self.eval_by_step: dict[int, dict[str, float]] = {}
        self.target_steps = target_steps
        self.step: int | None = None
        self.scalars: dict[str, float] = {}
        self.updated_at: float | None = None
        self._points: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)
        self.loss_history: collections.deque[tuple[int, float]] = collections.deque(maxlen=HISTORY_POINTS)

    def refresh(self) -> None:
        before = [reader.corrupt_records for reader in (self.reader, self.eval_reader)]
        self._refresh()
        for reader, count in zip((self.reader, self.eval_reader), before):
            if reader.corrupt_records > count:  # said once per damaged stretch, not at every refresh
                log.warning("%s (read on from the next complete record)", reader.last_error)

    def _refresh(self) -> None:
        for event in self.eval_reader.read_new():
            self.eval_by_step.setdefault(event.step, {}).update(event.values)
        while len(self.eval_by_step) > HISTORY_POINTS:
            del self.eval_by_step[min(self.eval_by_step)]
        for event in self.reader.read_new():
            if self.step is not None and event.step < self.step:
                continue  # an older step replayed after a restart
            self.step = event.step
            self.scalars.update(event.values)
            self.updated_at = event.wall_time
            if not self._points or self._points[-1][1] != event.step:
                self._points.append((event.wall_time, event.step))
            total = event.values.get("Loss/total_loss")
            if total is not None:
                if self.loss_history and self.loss_history[-1][0] == event.step:
                    self.loss_history.pop()
                self.loss_history.append((event.step, total))

    def steps_per_second(self) -> float | None:
        if len(self._points) >= 2:
            (t0, s0), (t1, s1) = self._points[0], self._points[-1]
            if t1 > t0 and s1 > s0:
                return (s1 - s0) / (t1 - t0)
        return self.scalars.get("steps_per_sec")

    def eta_seconds(self) -> float | None:
        rate = self.steps_per_second()
        if self.target_steps is None or self.step is None or not rate:
            return None
        return max(0.0, (self.target_steps - self.step) / rate)

    def view(self) -> dict:
        ratio = None
        if self.target_steps and self.step is not None:
            ratio = min(1.0, self.step / self.target_steps)
        return {
            "step": self.step,
            "target_steps": self.target_steps,
            "progress": ratio,
            "steps_per_second": self.steps_per_second(),
            "eta_seconds": self.eta_seconds(),
            "losses": {k.split("/", 1)[1]: v for k, v in self.scalars.items() if k.startswith("Loss/")},
            "learning_rate": self.scalars.get("learning_rate"),
            "updated_at": self.updated_at,
            "loss_history": [list(p) for p in self.loss_history],
            "eval_by_step": {str(k): v for k, v in sorted(self.eval_by_step.items())},
        }
