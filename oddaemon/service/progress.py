"""Training progress read from the trainer's event files (no tensorflow): step, losses, learning
rate, steps/s and an ETA. Readers are incremental, so a refresh costs only the new bytes.

Resume after a daemon restart: ``save()`` writes the readers' per-file offsets together with what
was accumulated from the bytes before them (step, scalars, the loss history, the steps/s points,
evaluation metrics by step) to ``layout.progress_file`` (atomically), and a ``TrainProgress`` made
with that file goes on from those offsets: each file that is still the same file (device, inode,
length, fingerprint: ``formats.tfevents``) is read from where the saved state ends, any other from
byte 0. Offsets and views are saved together, so what a resumed reader ends with is what one reader
that read everything ends with. When none of the saved training (evaluation) files is there any
more, the saved training (evaluation) view is dropped with them, as if it had never been read.
"""

from __future__ import annotations

import collections
import json
import logging
import os

from oddaemon.adapters.store import atomic_write_json
from oddaemon.core.errors import OperationError
from oddaemon.formats.tfevents import EventDirReader

log = logging.getLogger("oddaemon.service.progress")
HISTORY_POINTS = 256
STATE_VERSION = 1
TRAIN_TAGS = ("learning_rate", "steps_per_sec")


def train_tag_wanted(tag: str) -> bool:
    """The trainer's scalars the views and the train guard use (the losses, learning rate, steps/s)."""
    return tag.startswith("Loss/") or tag in TRAIN_TAGS


class TrainProgress:
    """Training progress from ``model_dir/train`` and evaluation metrics by step from
    ``model_dir/eval`` and ``model_dir/eval/<name>`` (what TensorBoard shows; the evaluator writes
    below ``eval/`` when ``eval_input_reader.name`` is set), both read incrementally.

    ``state_path``: where ``save()`` keeps the state a restarted daemon goes on from (None: nowhere)."""

    def __init__(self, model_dir: str, target_steps: int | None, state_path: str | None = None):
        self.model_dir = model_dir
        self.state_path = state_path
        self.eval_by_step: dict[int, dict[str, float]] = {}
        self.target_steps = target_steps
        self.step: int | None = None
        self.scalars: dict[str, float] = {}
        self.updated_at: float | None = None
        self._points: collections.deque[tuple[float, int]] = collections.deque(maxlen=32)
        self.loss_history: collections.deque[tuple[int, float]] = collections.deque(maxlen=HISTORY_POINTS)
        saved = self._load() if state_path else None
        self.reader = EventDirReader(os.path.join(model_dir, "train"), wanted=train_tag_wanted,
                                     saved=saved and saved["train_files"])
        self.eval_reader = EventDirReader(os.path.join(model_dir, "eval"), subdirs=True,
                                          saved=saved and saved["eval_files"])
        if saved and self.reader.resumed:  # the views as they were when the resumed offsets were saved
            self.step, self.scalars, self.updated_at = saved["step"], saved["scalars"], saved["updated_at"]
            self._points.extend(saved["points"])
            self.loss_history.extend(saved["loss_history"])
        if saved and self.eval_reader.resumed:
            self.eval_by_step = saved["eval_by_step"]
        self._saved_at_bytes = self._bytes_read()

    # ---- reading
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

    # ---- saved state
    def _bytes_read(self) -> int:
        return self.reader.bytes_read + self.eval_reader.bytes_read

    @property
    def unsaved(self) -> bool:
        """Whether bytes were read since the last ``save()`` (or since the state was loaded)."""
        return self.state_path is not None and self._bytes_read() != self._saved_at_bytes

    def saved_state(self) -> dict:
        """The readers' offsets and the views accumulated from the bytes before them (JSON)."""
        return {"version": STATE_VERSION, "model_dir": self.model_dir,
                "train_files": self.reader.state(), "eval_files": self.eval_reader.state(),
                "step": self.step, "scalars": self.scalars, "updated_at": self.updated_at,
                "points": [list(point) for point in self._points],
                "loss_history": [list(point) for point in self.loss_history],
                "eval_by_step": {str(step): values for step, values in self.eval_by_step.items()}}

    def save(self) -> None:
        """Write the saved state to ``state_path`` (atomically); a failure is logged, never raised."""
        if self.state_path is None:
            return
        directory = os.path.dirname(self.state_path)
        try:
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise OperationError(directory, "create directory", exc) from exc
            atomic_write_json(self.state_path, self.saved_state())
        except OperationError as exc:
            log.warning("event file offsets not saved (a restart reads the files again): %s", exc)
            return
        self._saved_at_bytes = self._bytes_read()

    def _load(self) -> dict | None:
        """The saved state, checked and converted back; None when there is none that applies."""
        try:
            with open(self.state_path, "rb") as f:
                saved = json.loads(f.read())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("event files read from the start: cannot read %s: %s", self.state_path, exc)
            return None
        if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
            return None
        if saved.get("model_dir") != self.model_dir:
            return None  # another job's model_dir under the same name: nothing of it applies
        try:
            step = saved["step"]
            return {"train_files": dict(saved["train_files"]), "eval_files": dict(saved["eval_files"]),
                    "step": None if step is None else int(step),
                    "scalars": {str(k): float(v) for k, v in saved["scalars"].items()},
                    "updated_at": None if saved["updated_at"] is None else float(saved["updated_at"]),
                    "points": [(float(t), int(s)) for t, s in saved["points"]],
                    "loss_history": [(int(s), float(v)) for s, v in saved["loss_history"]],
                    "eval_by_step": {int(step): {str(k): float(v) for k, v in values.items()}
                                     for step, values in saved["eval_by_step"].items()}}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("event files read from the start: bad saved state in %s: %s", self.state_path, exc)
            return None

    # ---- views
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
