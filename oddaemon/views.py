"""What users see of a job: one dict shared by the CLI (--json), the control socket and, later,
D-Bus and metrics. Pure."""

from __future__ import annotations

from oddaemon.evalbook import EvalBook
from oddaemon.pinbudget import RELEASED
from oddaemon.printable import printable
from oddaemon.progress import TrainProgress
from oddaemon.scheduler import Job


def evaluation_view(job: Job, book: EvalBook | None) -> dict:
    metric = job.spec.eval.metric
    if book is None:
        return {"enabled": job.spec.eval.enabled, "metric": metric, "counts": {}, "best": None, "latest": None,
                "pins": {"released": 0, "why": ""}, "checkpoints": []}

    def brief(c) -> dict:
        return {"checkpoint": f"ckpt-{c.n}", "n": c.n, "step": c.step, "state": c.state,
                "value": c.metrics.get(metric), "metrics": c.metrics, "attempts": c.attempts,
                "completed_at": c.completed_at, "lag_seconds": c.lag_seconds,
                "duration_seconds": c.duration_seconds, "error": c.error, "best": c.n == book.best_n}

    best, latest = book.best(), book.latest_done()
    released = [c for c in book.checkpoints.values() if c.state == "skipped" and c.error.startswith(RELEASED)]
    return {"enabled": job.spec.eval.enabled, "metric": metric, "counts": book.counts(),
            "pins": {"released": len(released), "why": released[-1].error if released else ""},
            "best": brief(best) if best else None, "latest": brief(latest) if latest else None,
            "checkpoints": [brief(c) for c in sorted(book.checkpoints.values(), key=lambda c: c.n)]}


def job_view(job: Job, progress: TrainProgress | None, queue_position: int | None, log_path: str,
             book: EvalBook | None = None) -> dict:
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
        "evaluation": evaluation_view(job, book),
        "history": [{"time": t, "state": s, "reason": r} for t, s, r in job.history],
    }
    empty = {"step": None, "target_steps": job.spec.pipeline.num_steps, "progress": None,
             "steps_per_second": None, "eta_seconds": None, "losses": {}, "learning_rate": None, "updated_at": None,
             "loss_history": [], "eval_by_step": {}}
    view.update(progress.view() if progress is not None else empty)
    # The event files can lag the checkpoints (model_dir deleted under the trainer, which then writes
    # into a deleted file): a checkpoint's step, once evaluated, is certain.
    steps = [c["step"] for c in view["evaluation"]["checkpoints"] if c.get("step") is not None]
    if steps and (view["step"] is None or max(steps) > view["step"]):
        view["step"] = max(steps)
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
