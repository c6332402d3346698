"""The metrics collector against a fixed snapshot, on a private registry."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from oddaemon.adapters.metrics import SnapshotCollector, build_snapshot, select_jobs

MAP = "DetectionBoxes_Precision/mAP"


def view(name, state, finished_at=None, **kw):
    v = {"name": name, "state": state, "finished_at": finished_at, "restarts": 0, "gpus": [], "step": None,
         "target_steps": None, "progress": None, "steps_per_second": None, "eta_seconds": None, "learning_rate": None,
         "losses": {}, "evaluation": {"enabled": True, "metric": MAP, "counts": {}, "best": None, "latest": None,
                                      "checkpoints": [], "total": 0, "newest_completed_at": None,
                                      "newest_step": None}}
    v.update(kw)
    return v


def running_view():
    ckpts = [
        {"checkpoint": "ckpt-1", "n": 1, "step": 0, "state": "evaluated", "value": 0.0, "metrics": {MAP: 0.0},
         "completed_at": 100.0, "lag_seconds": 0.5, "duration_seconds": 9.0, "best": False},
        {"checkpoint": "ckpt-2", "n": 2, "step": 500, "state": "evaluated", "value": 0.31,
         "metrics": {MAP: 0.31, "DetectionBoxes_Recall/AR@100": 0.4, "Loss/total_loss": 0.9},
         "completed_at": 200.0, "lag_seconds": 0.25, "duration_seconds": 10.0, "best": True},
        {"checkpoint": "ckpt-3", "n": 3, "step": None, "state": "pending", "value": None, "metrics": {},
         "completed_at": 300.0, "lag_seconds": None, "duration_seconds": None, "best": False},
    ]
    evaluation = {"enabled": True, "metric": MAP, "counts": {"pending": 1, "running": 0, "evaluated": 2},
                  "best": ckpts[1], "latest": ckpts[1], "checkpoints": ckpts, "total": 3,
                  "newest_completed_at": 300.0, "newest_step": 500}
    return view("effdet_d0", "running", gpus=[0, 1], step=700, target_steps=1000, progress=0.7, steps_per_second=2.0,
                eta_seconds=150.0, learning_rate=0.04, restarts=2,
                losses={"total_loss": 1.25, "classification_loss": 0.75, "localization_loss": 0.5}, evaluation=evaluation)


def snapshot():
    slurm = {"train": {"job_id": 41, "state": "RUNNING", "reason": "None", "nodes": "node[1-2]", "attempt": 3}}
    views = [{**running_view(), "slurm": slurm}, view("queued1", "queued"), view("old", "succeeded", finished_at=10.0),
             view("recent", "failed", finished_at=990.0)]
    gpus = {"total": [0, 1, 2], "free": [2], "holders": {0: ("effdet_d0", "train"), 1: ("effdet_d0", "train")}}
    counters = {"rejected_files": 4, "worker_restarts": 2, "checkpoints_evaluated": 2}
    return build_snapshot(views, gpus, counters, started_at=50.0, now=1000.0, max_finished=5, max_age=500.0)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def exposition() -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(snapshot))
    return generate_latest(registry).decode()


def test_values_and_labels(exposition):
    s = samples(exposition)
    # the interpreter's own version string (not the collector's source of it), and the release in pyproject.toml
    python = sys.version.split()[0]
    assert [k for k in s if k[0] == "oddaemon_build_info"] == [
        ("oddaemon_build_info", (("python", python), ("version", "0.1.0")))]
    assert s[("oddaemon_build_info", (("python", python), ("version", "0.1.0")))] == 1
    assert s[("oddaemon_jobs", (("state", "running"),))] == 1
    assert s[("oddaemon_jobs", (("state", "evaluating"),))] == 0
    assert s[("oddaemon_queue_length", ())] == 1
    assert s[("oddaemon_gpus", ())] == 3 and s[("oddaemon_gpus_allocated", ())] == 2
    assert s[("oddaemon_gpu_allocated", (("gpu", "1"), ("job_name", "effdet_d0"), ("role", "train")))] == 1
    assert s[("oddaemon_spool_rejected_files_total", ())] == 4
    assert s[("oddaemon_worker_restarts_total", ())] == 2
    job = (("job_name", "effdet_d0"),)
    assert s[("oddaemon_job_train_step", job)] == 700 and s[("oddaemon_job_target_steps", job)] == 1000
    assert s[("oddaemon_job_progress_ratio", job)] == 0.7 and s[("oddaemon_job_eta_seconds", job)] == 150
    assert s[("oddaemon_job_loss", (("component", "total_loss"), ("job_name", "effdet_d0")))] == 1.25
    assert s[("oddaemon_job_learning_rate", job)] == 0.04
    assert s[("oddaemon_job_restarts_total", job)] == 2
    assert s[("oddaemon_job_checkpoints_pending_evaluation", job)] == 1
    assert s[("oddaemon_job_last_evaluated_step", job)] == 500
    assert s[("oddaemon_job_latest_checkpoint_timestamp_seconds", job)] == 300
    assert s[("oddaemon_job_eval_metric", (("job_name", "effdet_d0"), ("metric", MAP)))] == 0.31
    assert s[("oddaemon_job_best_metric_value", (("job_name", "effdet_d0"), ("metric", MAP)))] == 0.31
    assert s[("oddaemon_job_best_metric_step", job)] == 500
    assert s[("oddaemon_job_eval_lag_seconds", job)] == 0.25 and s[("oddaemon_job_eval_duration_seconds", job)] == 10
    assert s[("oddaemon_job_state", (("job_name", "effdet_d0"), ("state", "running")))] == 1


def test_no_label_named_job_and_finished_jobs_are_bounded(exposition):
    names = {dict(k[1]).get("job_name") for k in samples(exposition)}
    assert "old" not in names and "recent" in names  # "old" finished 990 s ago > max_age 500
    assert all("job" not in dict(k[1]) for k in samples(exposition))
    views = [view(f"f{i}", "succeeded", finished_at=float(i)) for i in range(10)] + [view("live", "running")]
    kept = [v["name"] for v in select_jobs(views, now=20.0, max_finished=3, max_age=1000.0)]
    assert kept == ["live", "f9", "f8", "f7"]


def test_empty_snapshot_still_exports_build_info():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: None))
    assert "oddaemon_build_info" in generate_latest(registry).decode()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian package prometheus) not installed")
def test_promtool_accepts_the_exposition(exposition):
    out = subprocess.run(["promtool", "check", "metrics"], input=exposition, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_a_slurm_jobs_id_state_and_nodes_are_an_info_series(exposition):
    s = samples(exposition)
    key = ("oddaemon_job_slurm_info", (("job_name", "effdet_d0"), ("nodes", "node[1-2]"), ("role", "train"),
                                       ("slurm_job_id", "41"), ("slurm_state", "RUNNING")))
    assert s[key] == 1.0
    assert [k for k in s if k[0] == "oddaemon_job_slurm_info"] == [key]  # local jobs have none
