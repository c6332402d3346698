"""What users see of a job (``core/views.py``): job_view and evaluation_view built from a Job, an
evaluation book and a progress source, checked field by field against values written here."""

from __future__ import annotations

from oddaemon.core.evalbook import EvalBook, EvalPolicy
from oddaemon.core.jobs import Job
from oddaemon.core.jobspec import EvalOptions, JobSpec, PipelineEdits
from oddaemon.core.states import JobState
from oddaemon.core.views import evaluation_view, job_view

MAP = "DetectionBoxes_Precision/mAP"


def job(**changes) -> Job:
    spec = JobSpec(name="cats", pipeline_config="/srv/cats/pipeline.config", model_dir="/srv/cats/model",
                   priority=2, pipeline=PipelineEdits(num_steps=1000), eval=changes.pop("eval", EvalOptions()))
    fields = {"name": "cats", "seq": 1, "spec": spec, "wants": (0, 1), "state": JobState.RUNNING,
              "reason": "running", "gpus": (0, 1), "attempt": 2, "restarts": 1, "submitted_at": 100.0,
              "started_at": 110.0, "history": ((100.0, "queued", "submitted"), (110.0, "running", "started"))}
    fields.update(changes)
    return Job(**fields)


class Progress:
    """A progress source that says the step it was given (what ``TrainProgress.view`` returns)."""

    def __init__(self, step: int | None, target: int = 1000):
        self.step, self.target = step, target

    def view(self) -> dict:
        ratio = None if self.step is None else self.step / self.target
        return {"step": self.step, "target_steps": self.target, "progress": ratio,
                "steps_per_second": 2.0, "eta_seconds": 100.0, "losses": {"total_loss": 0.5}, "learning_rate": 0.01,
                "updated_at": 120.0, "loss_history": [[self.step, 0.5]], "eval_by_step": {}}


def book_with(results: dict[int, tuple[int, float] | None]) -> EvalBook:
    """A book with checkpoints 1..N: (step, mAP) evaluated, None still pending."""
    book = EvalBook(EvalPolicy())
    for n, _result in results.items():
        book.add(n, f"/pins/ckpt-{n}", now=200.0 + n)
    for n, result in results.items():
        if result is not None:
            book.start(n, now=300.0 + n)
            book.finish(n, result[0], {MAP: result[1]}, now=310.0 + n)
    return book


def test_without_a_book_the_evaluation_is_empty_but_says_whether_it_is_enabled():
    view = evaluation_view(job(eval=EvalOptions(enabled=False, metric="Loss/total_loss")), None)
    assert view["enabled"] is False
    assert view["metric"] == "Loss/total_loss"
    assert (view["counts"], view["best"], view["latest"], view["total"], view["checkpoints"]) == ({}, None, None, 0, [])


def test_the_evaluation_view_names_the_best_the_latest_and_counts_by_state():
    book = book_with({1: (100, 0.2), 2: (200, 0.5), 3: (300, 0.4), 4: None})
    view = evaluation_view(job(), book)
    assert view["best"]["checkpoint"] == "ckpt-2"
    assert (view["best"]["step"], view["best"]["value"]) == (200, 0.5)
    assert view["latest"]["checkpoint"] == "ckpt-3"
    assert view["counts"]["evaluated"] == 3 and view["counts"]["pending"] == 1
    assert [(c["n"], c["state"], c["best"]) for c in view["checkpoints"]] == [
        (1, "evaluated", False), (2, "evaluated", True), (3, "evaluated", False), (4, "pending", False)]
    first = view["checkpoints"][0]
    assert (first["attempts"], first["lag_seconds"], first["duration_seconds"]) == (1, 100.0, 10.0)
    assert view["newest_step"] == 300


def test_a_view_lists_only_the_newest_checkpoints_it_is_asked_for_and_says_the_total():
    book = book_with({n: (n * 10, 0.1) for n in range(1, 8)})
    view = evaluation_view(job(), book, shown=3)
    assert [c["n"] for c in view["checkpoints"]] == [5, 6, 7]
    assert view["total"] == 7
    assert evaluation_view(job(), book, shown=0)["checkpoints"] == []


def test_the_job_view_carries_the_job_its_queue_position_log_and_progress():
    view = job_view(job(), Progress(step=250), queue_position=None, log_path="/var/log/oddaemon/cats/train.log")
    assert (view["name"], view["state"], view["reason"], view["priority"]) == ("cats", "running", "running", 2)
    assert (view["wants_gpus"], view["gpus"], view["attempt"], view["restarts"]) == ([0, 1], [0, 1], 2, 1)
    assert view["train_log"] == "/var/log/oddaemon/cats/train.log"
    assert view["history"] == [{"time": 100.0, "state": "queued", "reason": "submitted"},
                               {"time": 110.0, "state": "running", "reason": "started"}]
    assert (view["step"], view["progress"], view["losses"]) == (250, 0.25, {"total_loss": 0.5})
    queued = job_view(job(state=JobState.QUEUED, gpus=()), None, queue_position=3, log_path="")
    assert queued["queue_position"] == 3
    # no progress source: the step is unknown, the target is the spec's
    assert (queued["step"], queued["target_steps"], queued["progress"]) == (None, 1000, None)


def test_an_evaluated_step_beyond_the_event_files_is_the_jobs_step():
    """The event files can lag (model_dir deleted under the trainer): a step evaluated is certain."""
    book = book_with({1: (100, 0.2), 2: (600, 0.3)})
    view = job_view(job(), Progress(step=250), None, "", book)
    assert (view["step"], view["progress"]) == (600, 0.6)
    behind = job_view(job(), Progress(step=700), None, "", book)
    assert (behind["step"], behind["progress"]) == (700, 0.7)


def test_every_string_from_outside_is_escaped():
    view = job_view(job(reason="failed: \x1b[31mred\x1b[0m\nsecond line"), None, None, "/logs/\u202ecats")
    assert view["reason"] == "failed: \\x1b[31mred\\x1b[0m\\nsecond line"
    assert view["train_log"] == "/logs/\\u202ecats"
