"""What the daemon changes in a job when a failure has a known remedy. Pure: the numbers of the
pipeline.config come in from ``progress.read_pipeline_numbers``.

``[train] oom_retry_halve_batch = true``: when training runs out of GPU memory, the job restarts
with half the batch size, and the learning rate (``learning_rate_base`` and
``warmup_learning_rate``) scaled by the same factor (the linear scaling rule), down to
``[train] min_batch_size``. The batch stays divisible by the job's GPU count. Every change is
recorded in the job (``adjustments``) and its history.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from oddaemon.core.jobspec import JobSpec


@dataclass(frozen=True)
class Remedy:
    spec: JobSpec  # the job's spec with the changed [pipeline] edits
    note: str  # "batch_size 8 -> 4, learning_rate_base 0.08 -> 0.04"
    batch_size: int


def effective_batch_size(spec: JobSpec, from_file: dict[str, float]) -> int | None:
    if spec.pipeline.batch_size is not None:
        return spec.pipeline.batch_size
    value = from_file.get("batch_size")
    return int(value) if value else None


def halve_batch(spec: JobSpec, from_file: dict[str, float], gpu_count: int) -> Remedy | str:
    """The next smaller batch for an out-of-memory job, or why there is none."""
    current = effective_batch_size(spec, from_file)
    if current is None:
        return "the batch size is unknown (no batch_size in [pipeline] or in train_config of pipeline.config)"
    step = max(1, gpu_count)
    floor = max(spec.train.min_batch_size, step)
    new = max(floor, (current // 2) // step * step)
    if new >= current:
        return (f"batch_size {current} is already at the floor ([train] min_batch_size = {spec.train.min_batch_size}"
                + (f", {gpu_count} GPUs" if gpu_count > 1 else "") + ")")
    factor = new / current
    changes = {"batch_size": new}
    notes = [f"batch_size {current} -> {new}"]
    for key in ("learning_rate_base", "warmup_learning_rate"):
        old = getattr(spec.pipeline, key)
        if old is None:
            old = from_file.get(key)
        if old is not None:
            changes[key] = old * factor
            notes.append(f"{key} {old:g} -> {old * factor:g}")
    if len(notes) == 1:
        notes.append("learning rate unchanged (no learning_rate_base found)")
    return Remedy(replace(spec, pipeline=replace(spec.pipeline, **changes)), ", ".join(notes), new)


def explain_oom(spec: JobSpec, message: str, gpu_count: int, from_file: dict[str, float]
                ) -> tuple[str, Remedy | str | None]:
    """The out-of-memory message with the batch size in it, and the remedy when the job asks for one."""
    batch = effective_batch_size(spec, from_file)
    if batch is not None:
        message = message.replace("out of GPU memory", f"out of GPU memory at batch_size {batch}", 1)
    if not spec.train.oom_retry_halve_batch:
        return message, None
    message = message.replace(", or set [train] oom_retry_halve_batch = true", "")
    return message, halve_batch(spec, from_file, gpu_count)
