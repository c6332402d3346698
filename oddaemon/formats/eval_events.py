"""What an evaluator already wrote for a step: how a retried evaluation is written only once.

An evaluator writes a checkpoint's metrics as scalar events under ``model_dir/eval`` and then its
result file. Killed between the two (SIGKILL, the OOM killer, the host rebooting, the daemon
stopping it), the daemon retries the checkpoint; evaluated again, its metrics would be in the event
files twice at the same step (two points in TensorBoard, one of them from a dead process). A retry
therefore first looks here: when the event files already hold the job's metric at the checkpoint's
step, the evaluation happened and those values are its result; nothing is written again.

Only retries look (``attempt > 1``): a first attempt has nothing to find, and reading every eval
event file for every checkpoint would grow with the run.
"""

from __future__ import annotations

from oddaemon.formats.tfevents import EventDirReader


def metrics_at_step(summary_dir: str, step: int, metric: str) -> dict[str, float] | None:
    """Every scalar the event files in ``summary_dir`` hold at ``step`` (later ones win), or None
    when ``metric`` is not among them (no evaluation of that step was written, or only part of one)."""
    values: dict[str, float] = {}
    for event in EventDirReader(summary_dir).read_new():
        if event.step == step:
            values.update(event.values)
    return values if metric in values else None
