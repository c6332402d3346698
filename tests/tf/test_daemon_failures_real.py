"""TF's failures through the real daemon and the real TF workers (the tiny SSD model): a damaged
input record met during training, and a damaged checkpoint met by the warm evaluator. What the
stand-in replays from tests/fixtures/tf is checked here against TF itself."""

from __future__ import annotations

import os
import signal

import pytest

from tests.support.harness import damage_record, wait_for, worker_pids
from tests.support.realtf import REAL_TF, tiny_job

pytestmark = [*REAL_TF, pytest.mark.timeout(1200)]


def test_a_record_damaged_under_a_running_real_job_fails_it_at_once_naming_file_and_record(real_env):
    """Preflight read the inputs whole; then a record is damaged while training runs (16 images,
    batch 4: TF reads every file again each 4 steps). The real worker names the file and the record
    before TF's traceback; the daemon fails the job at once with that, not restarted."""
    env = real_env
    env.write_config(worker_module="oddaemon.workers", max_restarts=3)
    tiny_job(env, "damaged", "num_steps = 400", "checkpoint_max_to_keep = 2", "enabled = false")
    wait_for(lambda: (env.job("damaged") or {}).get("step") or 0, 600, 1.0, what="real training to report a step")
    data = os.path.join(env.root, "data", "demo")
    path = sorted(os.path.join(data, n) for n in os.listdir(data) if n.startswith("train-"))[0]
    damage_record(path, 1)
    job = env.wait_state("damaged", ("failed", "succeeded"), 600)
    assert job["state"] == "failed" and job["failure"]["kind"] == "input", (job["reason"], env.daemon_log()[-3000:])
    assert job["restarts"] == 0 and "not restarted" in job["reason"]
    assert f"corrupt input record in {path} at record 1 (corrupted record at " in job["reason"], job["reason"]
    log = open(os.path.join(env.logs, "damaged", "train.log"), encoding="utf-8").read()
    after = log[log.index("oddaemon-failure: input:"):]
    assert after.count("\n") > 20 and "DataLossError" in after  # TF's traceback came after the marker


def test_a_damaged_checkpoint_fails_its_real_evaluation_at_once_and_the_rest_are_evaluated(real_env):
    env = real_env
    tiny_job(env, "hurt", "num_steps = 20", "checkpoint_max_to_keep = 10", 'device = "cpu"')
    model_dir = os.path.join(env.models, "hurt")
    evaluator = wait_for(lambda: worker_pids(f"eval-serve --job {env.state}/work/hurt/job.json"), 600, 0.05,
                         what="the real evaluator")[0]
    os.kill(evaluator, signal.SIGSTOP)  # it waits while training writes the rest
    try:
        wait_for(lambda: os.path.exists(os.path.join(model_dir, "ckpt-4.index")), 600, 0.5, what="ckpt-4")
        with open(os.path.join(model_dir, "ckpt-3.index"), "r+b") as f:  # in place: its pinned hard link too
            f.write(b"\0" * 64)
    finally:
        os.kill(evaluator, signal.SIGCONT)
    job = env.wait_state("hurt", ("succeeded", "failed"), 900)
    hurt = next(c for c in job["evaluation"]["checkpoints"] if c["checkpoint"] == "ckpt-3")
    by_step = {c["step"]: c for c in job["evaluation"]["checkpoints"] if c is not hurt}
    assert hurt["state"] == "failed" and hurt["attempts"] == 1, hurt  # damaged: not retried
    assert hurt["error"].startswith("the checkpoint is damaged, not retried: "), hurt["error"]
    assert "block checksum mismatch" in hurt["error"] or "DataLossError" in hurt["error"], hurt["error"]
    assert all(c["state"] == "evaluated" for c in by_step.values()), by_step
    assert sorted(by_step) == [0, 5, 15, 20]  # (ckpt-3's step, 10, could not be read)


def test_a_stopped_real_trainer_is_found_hung_at_tfs_cadence_and_resumes(real_env):
    """hang_timeout_seconds = 90 with real TF's quiet stretches (model build, the first step's graph
    tracing, scalars once per iteration, a log line every 100 steps): no false alarm before the
    trainer is stopped (SIGSTOP after its second checkpoint); then hung, stopped, restarted from
    its last checkpoint, and every checkpoint evaluated once."""
    env = real_env
    tiny_job(env, "stuck", "num_steps = 20", "checkpoint_max_to_keep = 10\nhang_timeout_seconds = 90",
             'device = "cpu"')
    model_dir = os.path.join(env.models, "stuck")
    wait_for(lambda: os.path.exists(os.path.join(model_dir, "ckpt-2.index")), 600, 0.5, what="ckpt-2 (step 5)")
    trainers = worker_pids(f"train --job {env.state}/work/stuck/job.json")
    assert env.job("stuck")["restarts"] == 0  # TF's own quiet stretches were no hang
    for pid in trainers:
        os.kill(pid, signal.SIGSTOP)
    job = env.wait_state("stuck", ("succeeded", "failed"), 900)
    assert job["state"] == "succeeded", (job["reason"], env.daemon_log()[-3000:])
    hung = [h for h in job["history"] if h["state"] == "backoff"]
    assert len(hung) == 1 and "hung: no new step, checkpoint or log line for 90s" in hung[0]["reason"], hung
    assert job["restarts"] == 1
    steps = [c["step"] for c in job["evaluation"]["checkpoints"]]
    assert sorted(steps) == sorted(set(steps)) and {0, 5, 20} <= set(steps), steps
    assert all(c["state"] == "evaluated" and c["attempts"] == 1 for c in job["evaluation"]["checkpoints"])
    assert "resuming from step" in open(os.path.join(env.logs, "stuck", "train.log"), encoding="utf-8").read()
