"""What users see of a job: one dict shared by the CLI (--json), the control socket and, later,
D-Bus and metrics. Pure."""

from __future__ import annotations

from typing import Protocol

from oddaemon.core.evalbook import EvalBook
from oddaemon.core.jobs import Job
from oddaemon.core.printable import printable


class ProgressSource(Protocol):
    """What a view needs of a job's training progress (``service.progress.TrainProgress``)."""

    def view(self) -> dict: ...


# How many of a job's checkpoints a view lists (the newest; "total" says how many there are, and
# state/evals/<name>.json holds them all): a job can have tens of thousands, and views are built on
# the main loop for every request and every metrics snapshot.
SHOWN_BY_STATUS = 1000  # oddaemon status NAME, GetJob
SHOWN_BY_LIST = 20  # oddaemon list, ListJobs, systemctl status


def evaluation_view(job: Job, book: EvalBook | None, shown: int = SHOWN_BY_STATUS) -> dict:
    metric = job.spec.eval.metric
    if book is None:
        return {"enabled": job.spec.eval.enabled, "metric": metric, "counts": {}, "best": None, "latest": None,
                "pins": {"released": 0, "why": ""}, "total": 0, "newest_completed_at": None, "newest_step": None,
                "checkpoints": []}

    def brief(c) -> dict:
        return {"checkpoint": f"ckpt-{c.n}", "n": c.n, "step": c.step, "state": c.state,
                "value": c.metrics.get(metric), "metrics": c.metrics, "attempts": c.attempts,
                "completed_at": c.completed_at, "lag_seconds": c.lag_seconds,
                "duration_seconds": c.duration_seconds, "error": c.error, "best": c.n == book.best_n}

    best, latest = book.best(), book.latest_done()
    return {"enabled": job.spec.eval.enabled, "metric": metric, "counts": book.counts(),
            "pins": {"released": book.released, "why": book.last_released_why},
            "best": brief(best) if best else None, "latest": brief(latest) if latest else None,
            "total": len(book.checkpoints), "newest_completed_at": book.newest_completed_at,
            "newest_step": book.newest_step, "checkpoints": [brief(c) for c in book.recent(shown)]}


def job_view(job: Job, progress: ProgressSource | None, queue_position: int | None, log_path: str,
             book: EvalBook | None = None, shown: int = SHOWN_BY_STATUS) -> dict:
    view = {
        "name": job.name,
        "state": job.state.value,
        "reason": job.reason,
        "priority": job.spec.priority,
        "wants_gpus": list(job.wants) if isinstance(job.wants, tuple) else job.wants,
        "gpus": list(job.gpus),
        "queue_position": queue_position,
        "attempt": job.attempt,
        "restarts": job.restarts,
        "last_exit": job.last_exit,
        "failure": job.failure.to_dict() if job.failure is not None else None,
        "adjustments": list(job.adjustments),
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "retry_at": job.retry_at,
        "model_dir": job.spec.model_dir,
        "pipeline_config": job.spec.pipeline_config,
        "train_log": log_path,
        "eval_gpus": list(job.eval_gpus),
        "evaluation": evaluation_view(job, book, shown),
        "history": [{"time": t, "state": s, "reason": r} for t, s, r in job.history],
    }
    empty = {"step": None, "target_steps": job.spec.pipeline.num_steps, "progress": None,
             "steps_per_second": None, "eta_seconds": None, "losses": {}, "learning_rate": None, "updated_at": None,
             "loss_history": [], "eval_by_step": {}}
    view.update(progress.view() if progress is not None else empty)
    # The event files can lag the checkpoints (model_dir deleted under the trainer, which then writes
    # into a deleted file): a checkpoint's step, once evaluated, is certain.
    newest = view["evaluation"]["newest_step"]
    if newest is not None and (view["step"] is None or newest > view["step"]):
        view["step"] = newest
        if view["target_steps"]:
            view["progress"] = min(1.0, view["step"] / view["target_steps"])
    return escaped(view)


def escaped(value):
    """Every string of a view with control characters escaped (``printable``): paths, reasons and
    worker error lines come from outside, and views reach terminals, D-Bus and logs."""
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: escaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [escaped(v) for v in value]
    return value


def progress_bar(ratio: float | None, width: int = 20) -> str:
    if ratio is None:
        return "[" + " " * width + "]"
    filled = int(round(max(0.0, min(1.0, ratio)) * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds >= 86400:
        return f"{seconds // 86400}d{(seconds % 86400) // 3600:02d}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A compact terminal chart of ``values`` (resampled to at most ``width`` columns)."""
    values = [v for v in values if v == v]  # drop NaN
    if not values:
        return ""
    if len(values) > width:
        values = [values[int(i * len(values) / width)] for i in range(width - 1)] + [values[-1]]
    lo, hi = min(values), max(values)
    span = hi - lo or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int((v - lo) / span * len(SPARKS)))] for v in values)
