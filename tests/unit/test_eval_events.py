"""formats/eval_events: what a retried evaluation finds already written."""

from __future__ import annotations

from oddaemon.formats.eval_events import metrics_at_step
from oddaemon.formats.tfevents_writer import EventFileWriter

MAP = "DetectionBoxes_Precision/mAP"


def test_the_metrics_at_a_step_are_found_across_files_and_events(tmp_path):
    first = EventFileWriter(str(tmp_path))
    first.add_scalars(5, {MAP: 0.125})
    first.add_scalars(10, {MAP: 0.25})
    first.close()
    second = EventFileWriter(str(tmp_path))  # a later evaluator process writes a file of its own
    second.add_scalars(10, {"Loss/total_loss": 1.5})
    second.close()
    assert metrics_at_step(str(tmp_path), 10, MAP) == {MAP: 0.25, "Loss/total_loss": 1.5}
    assert metrics_at_step(str(tmp_path), 5, MAP) == {MAP: 0.125}


def test_a_step_without_the_jobs_metric_counts_as_not_evaluated(tmp_path):
    writer = EventFileWriter(str(tmp_path))
    writer.add_scalars(10, {"Loss/total_loss": 1.5})  # killed before the metric was written
    writer.close()
    assert metrics_at_step(str(tmp_path), 10, MAP) is None
    assert metrics_at_step(str(tmp_path), 15, MAP) is None
    assert metrics_at_step(str(tmp_path / "missing"), 10, MAP) is None
