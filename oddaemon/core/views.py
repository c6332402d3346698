"""What users see of a job: one dict shared by the CLI (--json), the control socket, D-Bus and
metrics; the columns of ``oddaemon list`` (``list_row``). Pure.

A finished job's view is kept and given again while nothing it was made from changed (the same
``Job``, book and progress, compared by ``_Kept.matches``): a daemon that knows a thousand finished
jobs builds only the live jobs' views for each ``list`` and each metrics snapshot. Views are values:
nobody changes one after it was made (a kept one is handed to every caller).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from oddaemon.core.states import TERMINAL

if TYPE_CHECKING:
    from oddaemon.core.evalbook import EvalBook
    from oddaemon.core.jobs import Job


class ProgressSource(Protocol):
    """What a view needs of a job's training progress (``service.progress.TrainProgress``)."""

    def view(self) -> dict: ...


# How many of a job's checkpoints a view lists (the newest; "total" says how many there are, and
# state/evals/<name>.json holds them all): a job can have tens of thousands, and views are built on
# the main loop for every request and every metrics snapshot.
SHOWN_BY_STATUS = 1000  # oddaemon status NAME, GetJob
SHOWN_BY_LIST = 20  # oddaemon list, ListJobs, systemctl status
# What ``oddaemon list`` shows of a job (``cli.render.format_list``): the control socket's
# ``{"cmd": "list", "brief": true}`` sends only these (``list --json`` and D-Bus send whole views).
LIST_COLUMNS = ("name", "state", "reason", "wants_gpus", "gpus", "queue_position", "step", "target_steps",
                "progress", "eta_seconds", "waiting_for", "sweep", "slurm")
# At most this many finished jobs' views are kept (then the oldest kept are let go).
KEPT_FINISHED_VIEWS = 100_000


def list_row(view: dict) -> dict:
    """The ``LIST_COLUMNS`` of a job's view."""
    return {k: view[k] for k in LIST_COLUMNS}


def sweep_membership(job: Job) -> dict | None:
    """A sweep's variant: its sweep, index and values, and what ``core.sweep.sweep_view`` needs of it."""
    sweep = job.spec.sweep
    if not sweep.of:
        return None
    return {"name": sweep.of, "index": sweep.index, "values": dict(sweep.assigned), "method": sweep.method,
            "halving_steps": list(sweep.halving_steps), "keep_fraction": sweep.keep_fraction,
            "higher_is_better": job.spec.eval.higher_is_better, "export_best": job.spec.eval.export_best}


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
    progress_view = progress.view() if progress is not None else None
    return _build_view(job, progress_view, queue_position, log_path, book, shown)


class FinishedViews:
    """``job_view`` that hands out a finished job's view again while nothing it shows changed (a
    finished job's view is rebuilt for every list, status and metrics snapshot otherwise: 1,000
    finished jobs cost half a second a request). The owner (the daemon) keeps one; views handed out
    are shared: callers must not change them."""

    def __init__(self, limit: int | None = None):
        self.limit = KEPT_FINISHED_VIEWS if limit is None else limit
        self._kept: dict[tuple[str, int], _Kept] = {}

    def job_view(self, job: Job, progress: ProgressSource | None, queue_position: int | None, log_path: str,
                 book: EvalBook | None = None, shown: int = SHOWN_BY_STATUS) -> dict:
        progress_view = progress.view() if progress is not None else None
        if job.state not in TERMINAL:
            return _build_view(job, progress_view, queue_position, log_path, book, shown)
        key = (job.name, shown)  # list and metrics (0), ListJobs (20), status (1000) each keep their own
        kept = self._kept.get(key)
        inputs = (job, progress_view, queue_position, log_path, book, _book_signature(book), shown)
        if kept is not None and kept.matches(inputs):
            return kept.view
        view = _build_view(job, progress_view, queue_position, log_path, book, shown)
        if len(self._kept) >= self.limit:
            for old in list(self._kept)[:max(1, self.limit // 10)]:
                del self._kept[old]
        self._kept[key] = _Kept(inputs, view)
        return view


def _build_view(job: Job, progress_view: dict | None, queue_position: int | None, log_path: str,
                book: EvalBook | None, shown: int) -> dict:
    view = {
        "name": job.name,
        "state": job.state.value,
        "reason": job.reason,
        "priority": job.spec.priority,
        "after": list(job.spec.after),  # the jobs it waits for (spec); waiting_for: those not succeeded yet
        "waiting_for": list(job.waiting_for),
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
        "sweep": sweep_membership(job),
        "slurm": None,  # its Slurm jobs by role, under the Slurm backend (the daemon adds them: SlurmExecutor)
    }
    empty = {"step": None, "target_steps": job.spec.pipeline.num_steps, "progress": None,
             "steps_per_second": None, "eta_seconds": None, "losses": {}, "learning_rate": None, "updated_at": None,
             "loss_history": [], "eval_by_step": {}}
    view.update(progress_view if progress_view is not None else empty)
    # The event files can lag the checkpoints (model_dir deleted under the trainer, which then writes
    # into a deleted file): a checkpoint's step, once evaluated, is certain.
    newest = view["evaluation"]["newest_step"]
    if newest is not None and (view["step"] is None or newest > view["step"]):
        view["step"] = newest
        if view["target_steps"]:
            view["progress"] = min(1.0, view["step"] / view["target_steps"])
    return escaped(view)


def _book_signature(book: EvalBook | None) -> tuple | None:
    """What a finished job's view shows of its book, in a few numbers: any change of a checkpoint's
    state moves its counts (the book itself is compared by identity too)."""
    if book is None:
        return None
    return (tuple(book.counts().values()), len(book.checkpoints), book.best_n, book.best_value, book.newest,
            book.newest_completed_at, book.newest_step, book.released, book.last_released_why)


class _Kept:
    """A finished job's view and what it was made from."""

    __slots__ = ("inputs", "view")

    def __init__(self, inputs: tuple, view: dict):
        self.inputs, self.view = inputs, view

    def matches(self, inputs: tuple) -> bool:
        job, progress_view, queue_position, log_path, book, signature, shown = self.inputs
        return (inputs[0] is job and inputs[4] is book and inputs[5] == signature and inputs[1] == progress_view
                and inputs[2] == queue_position and inputs[3] == log_path and inputs[6] == shown)


_PLAIN = (int, float, bool, type(None))


def escaped(value):
    """Every string of a view with control characters escaped (``printable``): paths, reasons and
    worker error lines come from outside, and views reach terminals, D-Bus and logs."""
    from oddaemon.core.printable import printable  # noqa: PLC0415 (the CLI's rendering needs none of it)

    return _escaped(value, printable)


def _escaped(value, printable):
    kind = type(value)
    if kind in _PLAIN:  # most of a view: numbers (metrics, losses, times) and None
        return value
    if kind is str:
        return printable(value)
    if kind is dict:
        return {k: v if type(v) in _PLAIN else _escaped(v, printable) for k, v in value.items()}
    if kind is list:
        return [v if type(v) in _PLAIN else _escaped(v, printable) for v in value]
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {k: _escaped(v, printable) for k, v in value.items()}
    if isinstance(value, list):
        return [_escaped(v, printable) for v in value]
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
