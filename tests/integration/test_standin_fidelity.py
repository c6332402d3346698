"""The daemon against the parts of the real workers' file-level behaviour that the stand-in now
copies: TF's sparse, buffered scalars, an evaluator that is ready only after building its model,
checkpoints in several shards, eval events in ``eval/<eval_input_reader.name>``, and ``failed``
replies to requests it cannot read. Real daemon, stand-in workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.support.harness import wait_for

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def eval_lines(env, name: str) -> list[str]:
    return open(os.path.join(env.logs, name, "eval.log"), encoding="utf-8").read().splitlines()


def test_tfs_cadence_slow_readiness_and_shards_lose_no_checkpoint(daemon_env):
    """Scalars every 10 steps, flushed every 10 events; an evaluator ready after 2 s; 3 shards per
    checkpoint with max_to_keep 1: every checkpoint evaluated once, in order, progress at the end."""
    env = daemon_env.start()
    env.drop("tf.toml", env.job_text("tf", num_steps=60, every=10, keep=1, step_seconds=0.02,
                                     eval_ready_seconds=2.0, checkpoint_shards=3))
    job = env.wait_state("tf", "succeeded", 90)
    checkpoints = job["evaluation"]["checkpoints"]
    assert [(c["step"], c["state"], c["attempts"]) for c in checkpoints] == [
        (s, "evaluated", 1) for s in range(0, 61, 10)]
    completed = [c["completed_at"] for c in checkpoints]
    assert completed == sorted(completed)  # evaluated in checkpoint order
    assert job["step"] == 60 and job["progress"] == 1.0
    # the scalars the trainer wrote, at TF's cadence: steps 10, 20, ... 60 (the last flushed at close)
    assert [point[0] for point in job["loss_history"]] == list(range(10, 61, 10))
    # the evaluator was asked nothing before it said it was ready
    lines = eval_lines(env, "tf")
    ready = next(i for i, line in enumerate(lines) if "warm evaluator for 'tf' ready" in line)
    assert not [line for line in lines[:ready] if "Evaluating checkpoint" in line]
    asked = [int(line.rsplit("(step ", 1)[1].rstrip(")")) for line in lines if "] Evaluating checkpoint" in line]
    assert asked == list(range(0, 61, 10))  # in order, each once


def test_eval_events_below_eval_name_are_read(daemon_env):
    env = daemon_env.start()
    env.drop("named.toml", env.job_text("named", num_steps=20, every=10, keep=5, step_seconds=0.01,
                                        eval_input_name="coco_val"))
    job = env.wait_state("named", "succeeded", 60)
    assert os.listdir(os.path.join(env.models, "named", "eval")) == ["coco_val"]
    mean_ap = {int(step): values["DetectionBoxes_Precision/mAP"] for step, values in job["eval_by_step"].items()}
    book = {c["step"]: c["metrics"]["DetectionBoxes_Precision/mAP"] for c in job["evaluation"]["checkpoints"]}
    assert mean_ap == book and sorted(mean_ap) == [0, 10, 20]


def test_the_standin_evaluator_answers_a_request_it_cannot_read_as_the_real_one(tmp_path):
    """workers/evaluate.py serve replies {"event": "failed", "checkpoint": null, ...} and goes on."""
    config = tmp_path / "pipeline.config"
    config.write_text("# standin: eval_ready_seconds = 0\ntrain_config {\n  num_steps: 5\n}\n")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"spec": {"name": "x", "pipeline_config": str(config), "model_dir": str(tmp_path / "m"),
                                        "train": {}, "eval": {}}}))
    read_fd, write_fd = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "oddaemon.testing.standin", "eval-serve", "--job", str(job),
                             "--reply-fd", str(write_fd)], cwd=REPO, stdin=subprocess.PIPE, pass_fds=(write_fd,),
                            stderr=subprocess.DEVNULL, text=True)
    os.close(write_fd)
    replies = os.fdopen(read_fd)
    try:
        assert json.loads(replies.readline()) == {"event": "ready"}
        proc.stdin.write("{not json\n")
        proc.stdin.write(json.dumps({"checkpoint": str(tmp_path / "m" / "ckpt-9"), "result": str(tmp_path / "r")}) + "\n")
        proc.stdin.flush()
        bad = json.loads(replies.readline())
        assert bad["event"] == "failed" and bad["checkpoint"] is None and "unreadable request" in bad["error"]
        missing = json.loads(replies.readline())
        assert missing["event"] == "failed" and missing["checkpoint"].endswith("ckpt-9")
        assert proc.poll() is None  # still serving
    finally:
        proc.stdin.close()
        wait_for(lambda: proc.poll() is not None, 30, what="the evaluator to end at EOF")
        replies.close()
