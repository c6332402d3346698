"""The reaction to new checkpoints with the real daemon and stand-in workers: the warm evaluator
starts with the training, every checkpoint of several jobs training at once is evaluated exactly
once with the journal synced off the event loop, the reaction trace of bench/reaction names each
request's stages, and a CPU evaluator really runs at [eval] cpu_nice with cpu_threads."""

from __future__ import annotations

import json
import os

from oddaemon.service.reaction import TRACE_ENV
from tests.support.harness import assert_evaluated_in_order, wait_for, worker_pids


def stat_nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[16])


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(item.split("=", 1) for item in f.read().decode().split("\0") if "=" in item)


def test_a_cpu_evaluator_runs_at_the_configured_nice_value_with_its_thread_limit(daemon_env):
    env = daemon_env
    env.write_config()
    with open(env.config_path, "a") as f:
        f.write("[eval]\ncpu_nice = 7\ncpu_threads = 1\n")
    env.start()
    env.drop("slow.toml", env.job_text("slow", num_steps=4000, every=1000, step_seconds=0.02))
    marker = f"eval-serve --job {env.state}/work/slow/job.json"
    (evaluator,) = wait_for(lambda: worker_pids(marker), 30, what="the warm evaluator (started with the training)")
    (trainer,) = wait_for(lambda: worker_pids(f"train --job {env.state}/work/slow/job.json"), 30, what="the trainer")
    assert stat_nice(evaluator) == 7 and stat_nice(trainer) == stat_nice(env.proc.pid)
    assert {k: environ(evaluator).get(k) for k in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS")} == {
        "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"}
    assert "TF_NUM_INTRAOP_THREADS" not in environ(trainer)
    assert env.ask("cancel", name="slow")["ok"]
    env.wait_state("slow", "cancelled", 60)


def test_jobs_training_at_once_have_every_checkpoint_evaluated_once_and_each_request_traced(daemon_env, monkeypatch):
    trace = os.path.join(daemon_env.root, "trace.jsonl")
    monkeypatch.setenv(TRACE_ENV, trace)  # the daemon process inherits it
    env = daemon_env
    env.write_config(max_cpu_jobs=3)
    env.start()
    names = ("ka", "kb", "kc")
    for name in names:
        env.drop(f"{name}.toml", env.job_text(name, num_steps=40, every=5, keep=1, step_seconds=0.02,
                                              eval_seconds=0.05, eval_ready_seconds=0.2))
    for name in names:
        env.wait_state(name, "succeeded", 90)
    entries = [json.loads(line) for line in open(trace)]
    sent = [e for e in entries if "ckpt" in e]
    for name in names:
        assert assert_evaluated_in_order(env, name) == list(range(1, 10))  # steps 0, 5, ... 40: each once
        requests = [e["ckpt"] for e in sent if e["job"] == name]
        assert requests == list(range(1, 10))  # one request per checkpoint, in save order
        log = open(os.path.join(env.logs, name, "eval.log")).read()
        assert log.count(f"warm evaluator for '{name}' ready") == 1
    for e in sent:
        assert {"rescan_at", "list_s", "pin_s", "record_s", "check_s", "start_record_s", "pipe_s"} <= set(e), e
        assert e["rescan_at"] <= e["sent_at"]
    assert any("fsync_s" in e for e in entries)  # the journal was synced (on the syncer thread)
