"""[cluster] backend = "slurm" on a real one-node Slurm 22.05 (munged, slurmctld, slurmd started by
the test, tests/support/slurm.py; no GPU GRES, so the jobs say gpus = 0: on a cluster "auto" is one
GPU): the same job file trains as a Slurm batch job, the daemon tracks
it through squeue, a failure Slurm records is restarted by resubmission, a cancel reaches Slurm,
and every checkpoint is still evaluated, in order (the warm evaluator runs on the daemon's host)."""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.support import slurm as test_slurm
from tests.support.harness import DaemonEnv, assert_evaluated_in_order, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(test_slurm.missing() is not None,
                                                   reason=test_slurm.missing() or "")]


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="oddaemon-slurm-")
    c = test_slurm.SlurmCluster(root).start()
    yield c
    c.stop()


@pytest.fixture
def slurm_env(tmp_path, cluster):
    env = DaemonEnv(str(tmp_path), config_overrides={"cluster_backend": "slurm", "slurm_conf": cluster.conf,
                                                     "slurm_poll_seconds": 0.5, "slurm_partition": "train"})
    yield env
    env.close()


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
