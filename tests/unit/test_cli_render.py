"""What ``oddaemon list`` and ``oddaemon status`` print for given job views (``oddaemon.cli.render``), in process."""

from __future__ import annotations

import time

import pytest

from oddaemon.cli.render import format_list, format_status, shown


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """History times print in local time: UTC here, so the expected text is fixed."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def view(name, state, **extra):
    base = {"name": name, "state": state, "reason": "submitted", "priority": 0, "wants_gpus": "auto", "gpus": [],
            "queue_position": None, "attempt": 0, "restarts": 0, "last_exit": None, "model_dir": f"/srv/m/{name}",
            "train_log": f"/var/log/oddaemon/{name}/train.log",
            "history": [{"time": 0.0, "state": "queued", "reason": "submitted"}],
            "step": None, "target_steps": None, "progress": None, "steps_per_second": None, "eta_seconds": None,
            "losses": {}, "learning_rate": None, "loss_history": [],
            "evaluation": {"enabled": False, "metric": "DetectionBoxes_Precision/mAP", "best": None, "checkpoints": [],
                           "counts": {}}}
    base.update(extra)
    return base

CHECKPOINTS = [
    {"checkpoint": "ckpt-1", "step": 500, "state": "done", "value": 0.25, "best": False, "error": None,
     "lag_seconds": 12.0, "duration_seconds": 30.0},
    {"checkpoint": "ckpt-2", "step": 1000, "state": "done", "value": 0.5, "best": True, "error": None,
     "lag_seconds": 8.5, "duration_seconds": 29.0},
    {"checkpoint": "ckpt-3", "step": 1500, "state": "failed", "value": None, "best": False,
     "error": "evaluator exited 1", "lag_seconds": None, "duration_seconds": None},
]
RUNNING = view("effdet", "running", reason="started on GPU 0", wants_gpus=1, gpus=[0], attempt=1, step=1200,
               target_steps=10000, progress=0.12, eta_seconds=3725.0, steps_per_second=2.5, learning_rate=0.08,
               losses={"loss/total": 0.75, "loss/cls": 0.25}, loss_history=[[100, 1.5], [600, 1.0], [1200, 0.75]],
               history=[{"time": 0.0, "state": "queued", "reason": "submitted"},
                        {"time": 60.0, "state": "running", "reason": "started on GPU 0"}],
               evaluation={"enabled": True, "metric": "DetectionBoxes_Precision/mAP", "checkpoints": CHECKPOINTS,
                           "best": {"checkpoint": "ckpt-2", "step": 1000, "value": 0.5},
                           "counts": {"done": 2, "failed": 1, "waiting": 0}, "total": 3,
                           "pins": {"released": 1, "why": "to stay within the disk budget"}})
WAITING = view("waiting", "queued", queue_position=1, wants_gpus=0, reason="waiting for a CPU slot")


def test_list_is_one_row_per_job_and_a_summary():
    reply = {"jobs": [RUNNING, WAITING], "gpus": [0, 1], "free_gpus": [1], "queue": ["waiting"]}
    assert format_list(reply).splitlines() == [
        "NAME                     STATE      GPUS            STEP PROGRESS                   ETA  REASON",
        "effdet                   running    0         1200/10000 [##..................]   1h02m  started on GPU 0",
        "waiting                  queued #1  cpu              -/- [                    ]       -  waiting for a CPU slot",
        "-- 1 queued; GPUs in use 1/2",
    ]


def test_list_of_nothing():
    assert format_list({"jobs": [], "gpus": [], "free_gpus": [], "queue": []}).splitlines() == [
        "NAME                     STATE      GPUS            STEP PROGRESS                   ETA  REASON",
        "-- 0 queued; GPUs in use 0/0",
    ]


def test_status_of_a_running_job_with_evaluations():
    assert format_status(RUNNING).splitlines() == [
        "effdet: running — started on GPU 0",
        "  progress   [####..........................] step 1200/10000  ETA 1h02m",
        "  gpus       0   attempt 1, restarts 0",
        "  losses     loss/cls=0.25  loss/total=0.75",
        "  lr         0.08   steps/s 2.5",
        "  loss       █▃▁  1.5 -> 0.75 (steps 100-1200)",
        "  mAP        ▁█  0.25 -> 0.5",
        "  best       ckpt-2 step 1000 mAP 0.5",
        "  behind     1 checkpoint(s) to stay within the disk budget",
        "  checkpoints (2 done, 1 failed):",
        "    CKPT           STEP STATE             mAP    LAG   TOOK",
        "    ckpt-1          500 done           0.2500    12s    30s",
        "    ckpt-2         1000 done           0.5000   8.5s    29s  <- best",
        "    ckpt-3         1500 failed              -      -      -  (evaluator exited 1)",
        "  model_dir  /srv/m/effdet",
        "  log        /var/log/oddaemon/effdet/train.log",
        "  history:",
        "    00:00:00 queued     submitted",
        "    00:01:00 running    started on GPU 0",
    ]


def test_status_of_a_queued_job_shows_unknown_values_as_a_dash():
    assert format_status(WAITING).splitlines() == [
        "waiting: queued — waiting for a CPU slot",
        "  progress   [                              ] step -/-  ETA -",
        "  gpus       none (CPU)   attempt 0, restarts 0",
        "  eval       disabled",
        "  model_dir  /srv/m/waiting",
        "  log        /var/log/oddaemon/waiting/train.log",
        "  history:",
        "    00:00:00 queued     submitted",
    ]


def test_status_names_a_failure_its_last_exit_and_adjustments():
    failed = dict(WAITING, state="failed", reason="out of memory", last_exit="exit 1",
                  failure={"kind": "oom", "message": "the trainer ran out of GPU memory"},
                  adjustments=["batch_size 8 -> 4 (out of memory)"],
                  evaluation=dict(WAITING["evaluation"], enabled=True))
    lines = format_status(failed).splitlines()
    assert lines[0] == "waiting: failed — out of memory"
    assert "  eval       no checkpoint yet" in lines
    assert lines[lines.index("  log        /var/log/oddaemon/waiting/train.log") + 1:] == [
        "  last exit  exit 1",
        "  failure    oom: the trainer ran out of GPU memory",
        "  adjusted   batch_size 8 -> 4 (out of memory)",
        "  history:",
        "    00:00:00 queued     submitted",
    ]


def test_an_unknown_value_is_a_dash_never_none():
    assert shown(None) == "-" and shown(0) == "0" and shown("x") == "x"
