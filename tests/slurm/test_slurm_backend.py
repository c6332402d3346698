"""[cluster] backend = "slurm" on a real one-node Slurm 22.05 (munged, slurmctld, slurmd started by
the test, tests/support/slurm.py; no GPU GRES, so the jobs say gpus = 0: on a cluster "auto" is one
GPU): the same job file trains as a Slurm batch job, the daemon tracks
it through squeue, a failure Slurm records is restarted by resubmission, a cancel reaches Slurm,
and every checkpoint is still evaluated, in order (the warm evaluator runs on the daemon's host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import pytest

from tests.support import slurm as test_slurm
from tests.support.harness import assert_evaluated_in_order, free_port, scrape, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(test_slurm.missing() is not None,
                                                   reason=test_slurm.missing() or "")]


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="oddaemon-slurm-")
    c = test_slurm.SlurmCluster(root).start()
    yield c
    c.stop()


def slurm_jobs_of(cluster, name: str) -> list[dict]:
    return sorted((j for j in cluster.jobs().values() if j["name"] == f"oddaemon-{name}-train"),
                  key=lambda j: j["job_id"])


def test_a_job_trains_as_a_slurm_batch_job_and_every_checkpoint_is_evaluated(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("sl.toml", env.job_text("sl", gpus=0, num_steps=20, every=5, keep=2, step_seconds=0.1))
    job = env.wait_state("sl", "succeeded", timeout=180)
    ran = slurm_jobs_of(cluster, "sl")
    assert [j["job_state"] for j in ran] == ["COMPLETED"], ran
    assert ran[0]["partition"] == "train"
    with open(os.path.join(env.logs, "sl", "train.log")) as f:
        log = f.read()
    assert f"Slurm job {ran[0]['job_id']}" in log  # the daemon's own line
    assert "step 20" in log or "ckpt-" in log or len(log.splitlines()) > 3  # the worker's output, written by Slurm
    # every checkpoint evaluated, in order, although the trainer ran under slurmd
    assert job["evaluation"]["counts"]["evaluated"] == job["evaluation"]["total"] >= 4
    assert assert_evaluated_in_order(env, "sl") == list(range(1, job["evaluation"]["total"] + 1))


def test_a_failure_slurm_records_is_restarted_by_resubmission(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("flaky.toml", env.job_text("flaky", gpus=0, num_steps=20, every=5, crash_at_step=7, crash_times=1))
    job = env.wait_state("flaky", "succeeded", timeout=180)
    ran = slurm_jobs_of(cluster, "flaky")
    assert [j["job_state"] for j in ran] == ["FAILED", "COMPLETED"], ran
    assert job["restarts"] == 1 and job["attempt"] == 2
    assert any("restart 1 of" in h["reason"] for h in job["history"]), job["history"]
    assert job["evaluation"]["counts"]["evaluated"] == job["evaluation"]["total"]


def test_a_cancel_reaches_slurm(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("long.toml", env.job_text("long", gpus=0, num_steps=100000, every=50, step_seconds=0.2))
    wait_for(lambda: any(j["job_state"] == "RUNNING" for j in slurm_jobs_of(cluster, "long")), 120,
             what="the Slurm job to run")
    env.ask("cancel", name="long")
    env.wait_state("long", "cancelled", timeout=120)
    assert [j["job_state"] for j in slurm_jobs_of(cluster, "long")] == ["CANCELLED"]


def test_a_daemon_restart_leaves_the_slurm_job_running_and_adopts_it(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("resume.toml", env.job_text("resume", gpus=0, num_steps=60, every=10, keep=10, step_seconds=0.25))
    wait_for(lambda: any(j["job_state"] == "RUNNING" for j in slurm_jobs_of(cluster, "resume")), 120,
             what="the Slurm job to run")
    env.stop()
    (job,) = slurm_jobs_of(cluster, "resume")
    assert job["job_state"] == "RUNNING"  # the daemon went; its cluster job did not
    env.start()
    done = env.wait_state("resume", "succeeded", timeout=180)
    ran = slurm_jobs_of(cluster, "resume")
    assert [(j["job_id"], j["job_state"]) for j in ran] == [(job["job_id"], "COMPLETED")]  # one job, adopted
    assert f"adopting Slurm job {job['job_id']}" in env.daemon_log()
    assert done["evaluation"]["counts"]["evaluated"] == done["evaluation"]["total"] >= 6


def test_gpus_are_asked_of_slurm_not_of_this_machine(slurm_env, cluster):
    """[train] gpus = 2 on a daemon with no GPU of its own is accepted (Slurm allocates GPUs) and
    becomes --gres=gpu:2; this test cluster has no GPU GRES, so Slurm refuses it, and the job fails
    with Slurm's own words after its restarts."""
    env = slurm_env
    env.write_config(max_restarts=1)
    env.start()
    env.drop("gpu2.toml", env.job_text("gpu2", gpus=2))
    job = env.wait_state("gpu2", "failed", timeout=120)
    assert job["failure"]["kind"] == "slurm", job["failure"]
    assert "Slurm did not take the train worker" in job["failure"]["message"]
    assert "gres" in job["failure"]["message"].lower()
    with open(os.path.join(env.logs, "gpu2", "train.log")) as f:
        assert "--gres=gpu:2" in f.read()


def test_the_warning_signal_saves_a_checkpoint_and_the_job_is_resubmitted(slurm_env, cluster):
    """Slurm's warning before the time limit (--signal=B:USR2@120; sent here at once with scancel
    --signal=USR2 --batch, the same path): the batch script forwards it, the worker saves a checkpoint
    and exits 75 ("requeued"), the daemon resubmits at once without counting a failure, and the job
    resumes from that checkpoint."""
    env = slurm_env.start()
    env.drop("warned.toml", env.job_text("warned", gpus=0, num_steps=300, every=20, keep=20, step_seconds=0.1))
    wait_for(lambda: ((env.job("warned") or {}).get("evaluation") or {}).get("newest_step") == 20, 120,
             what="the checkpoint of step 20 (the first cadence save) to be evaluated")
    (first,) = slurm_jobs_of(cluster, "warned")
    assert cluster.run("scancel", "--signal=USR2", "--batch", str(first["job_id"])).returncode == 0
    job = env.wait_state("warned", "succeeded", timeout=180)
    ran = slurm_jobs_of(cluster, "warned")
    assert [j["job_state"] for j in ran] == ["FAILED", "COMPLETED"], ran
    assert ran[0]["exit_code"] >> 8 == 75
    requeued = [h for h in job["history"] if "resubmitting now" in h["reason"]]
    assert len(requeued) == 1 and "on the cluster's warning signal" in requeued[0]["reason"], job["history"]
    assert job["failure"] is None or job["failure"]["kind"] == "requeued"
    with open(os.path.join(env.logs, "warned", "train.log")) as f:
        log = f.read()
    saved = int(log.split("saved a checkpoint at step ")[1].split()[0])
    assert f"resuming from step {saved}" in log  # the second attempt started where the first one saved
    assert job["evaluation"]["counts"]["evaluated"] == job["evaluation"]["total"]


def test_finish_gives_the_slurm_job_the_warning_signal_and_the_job_succeeds_without_a_resubmission(
        slurm_env, cluster):
    """oddaemon finish on the Slurm backend: scancel --signal=USR2 --batch, the worker saves a
    checkpoint and exits, nothing is resubmitted, the rest is evaluated and the job succeeds."""
    env = slurm_env.start()
    env.drop("enough.toml", env.job_text("enough", gpus=0, num_steps=100000, every=20, keep=20, step_seconds=0.05))
    wait_for(lambda: ((env.job("enough") or {}).get("evaluation") or {}).get("newest_step") == 20, 120,
             what="the checkpoint of step 20 to be evaluated")
    out = env.cli("finish", "enough")
    assert out.returncode == 0 and out.stdout.strip() == "enough: stopping", out.stdout + out.stderr
    job = env.wait_state("enough", ("succeeded", "failed", "cancelled"), timeout=180)
    assert job["state"] == "succeeded" and job["reason"] == "finished by request; every checkpoint evaluated", job
    ran = slurm_jobs_of(cluster, "enough")
    assert len(ran) == 1 and ran[0]["exit_code"] >> 8 == 75, ran  # (saved and left: not resubmitted)
    with open(os.path.join(env.logs, "enough", "train.log")) as f:
        saved = int(f.read().split("saved a checkpoint at step ")[1].split()[0])
    assert job["evaluation"]["checkpoints"][-1]["step"] == saved >= 20
    assert job["evaluation"]["counts"]["evaluated"] == job["evaluation"]["total"] and job["restarts"] == 0


def test_a_job_slurm_keeps_waiting_shows_as_pending_and_starts_nothing_until_slurm_runs_it(slurm_env, cluster):
    """The node is drained, so Slurm keeps the train job pending: list, status and the metrics show its
    Slurm job id and state; neither its warm evaluator (on this host) nor its hang timer (4 s here)
    starts while it waits, so waiting is not "hung". Once the node is back, Slurm runs it on the node
    they then show, and every checkpoint is evaluated."""
    port = free_port()
    env = slurm_env
    env.write_config(metrics_listen=f"127.0.0.1:{port}")
    env.start()
    assert cluster.run("scontrol", "update", "nodename=localhost", "state=drain", "reason=oddaemon-test").returncode == 0
    try:
        text = env.job_text("queued", gpus=0, num_steps=20, every=5, keep=10, step_seconds=0.1)
        env.drop("queued.toml", text.replace("[train]\n", "[train]\nhang_timeout_seconds = 4\n"))
        pending = wait_for(lambda: ((env.job("queued") or {}).get("slurm") or {}).get("train", {}).get("job_id")
                           and env.job("queued")["slurm"]["train"]["state"] == "PENDING" and env.job("queued"),
                           120, what="the train worker's Slurm job to be pending")
        slurm_id = pending["slurm"]["train"]["job_id"]
        assert f"[slurm {slurm_id} PENDING]" in env.cli("list").stdout
        assert f"slurm      train: job {slurm_id} PENDING" in env.cli("status", "queued").stdout
        series = f'oddaemon_job_slurm_info{{job_name="queued",nodes="",role="train",slurm_job_id="{slurm_id}",' \
                 f'slurm_state="PENDING"}} 1.0'
        wait_for(lambda: series in scrape(port), 30, what=f"the metric {series}")
        with open(os.path.join(env.state, "runtime", "queued.json")) as f:
            assert json.load(f)["train"]["slurm_job_id"] == slurm_id
        time.sleep(8)  # twice the hang timeout, Slurm still holding the job
        job = env.job("queued")
        assert job["state"] == "running" and job["restarts"] == 0 and job["slurm"]["train"]["state"] == "PENDING"
        assert "queued: eval worker started" not in env.daemon_log() and "hung" not in env.daemon_log()
    finally:
        cluster.run("scontrol", "update", "nodename=localhost", "state=resume")
    done = env.wait_state("queued", "succeeded", timeout=180)
    assert done["restarts"] == 0, done["history"]
    assert done["slurm"]["train"] == {"job_id": slurm_id, "state": "COMPLETED", "reason": "None",
                                      "nodes": "localhost", "attempt": 1}
    assert "queued: eval worker started" in env.daemon_log()  # the warm evaluator started when Slurm ran the job
    assert done["evaluation"]["counts"]["evaluated"] == done["evaluation"]["total"] >= 4


def test_logs_follow_shows_the_slurm_jobs_output_through_the_rotated_log(slurm_env, cluster):
    """slurmd writes the worker's output to slurm-train.out; the daemon copies it into train.log,
    which rotates at [logs] max_bytes (4 KiB here, the least allowed) as a local worker's does: `oddaemon logs -f`,
    started while Slurm runs the job, shows every step line the worker printed, in order, and the
    output file is gone once the job ended (its content is in the rotated logs)."""
    env = slurm_env
    env.write_config(log_max_bytes=4096, log_backups=50)
    env.start()
    env.drop("chatty.toml", env.job_text("chatty", gpus=0, num_steps=120, every=40, keep=5, step_seconds=0.05,
                                         log_every_n=5))
    wait_for(lambda: ((env.job("chatty") or {}).get("slurm") or {}).get("train", {}).get("state") == "RUNNING",
             120, what="Slurm to run the job")
    follower = subprocess.Popen([sys.executable, "-m", "oddaemon", "--config", env.config_path, "logs", "-f", "chatty"],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        env.wait_state("chatty", "succeeded", timeout=180)
        wait_for(lambda: not os.path.exists(os.path.join(env.logs, "chatty", "slurm-train.out")), 30,
                 what="the Slurm output file to be copied and removed")
        time.sleep(1.5)  # the follower reads on
    finally:
        follower.terminate()
        shown, _ = follower.communicate(timeout=30)
    steps = [int(line.split("Step ")[1].split()[0]) for line in shown.splitlines() if line.startswith("INFO:tensorflow:Step ")]
    assert steps[-1] == 120 and steps == sorted(steps) and len(steps) == len(set(steps)), steps
    logs = sorted(f for f in os.listdir(os.path.join(env.logs, "chatty")) if f.startswith("train.log"))
    assert "train.log.1" in logs, logs  # it rotated while Slurm wrote
    for name in logs:
        assert os.path.getsize(os.path.join(env.logs, "chatty", name)) <= 4096, name
    texts = []
    for name in sorted(logs, key=lambda f: -int(f.rsplit(".", 1)[1]) if f[-1].isdigit() else 0):
        with open(os.path.join(env.logs, "chatty", name)) as f:
            texts.append(f.read())
    everything = "".join(texts)
    all_steps = [int(line.split("Step ")[1].split()[0]) for line in everything.splitlines()
                 if line.startswith("INFO:tensorflow:Step ")]
    assert all_steps == list(range(5, 121, 5)), all_steps  # every line once, in order, across the rotations
