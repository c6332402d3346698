"""What real clusters do to a running job, on a real one-node Slurm 22.05 (tests/support/slurm.py):
its node dies (slurmd, the job steps and the worker killed at once, as a machine that loses power),
and its time limit comes, with Slurm's own warning signal ahead of it. Each ends with the job
resumed from its latest checkpoint and every checkpoint evaluated; the node's death is counted as a
restart with its reason (node-fail), each warning as a restart that counts as no failure."""

from __future__ import annotations

import os
import tempfile

import pytest

from tests.support import slurm as test_slurm
from tests.support.harness import wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(test_slurm.missing() is not None,
                                                   reason=test_slurm.missing() or "")]


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="oddaemon-slurm-endings-")
    c = test_slurm.SlurmCluster(root, slurmd_timeout=10).start()  # a silent node is DOWN after 10 s
    yield c
    c.stop()


@pytest.fixture
def env(slurm_env):
    return slurm_env  # (tests/slurm/conftest.py)


def newest_evaluated(env, name: str) -> int:
    return ((env.job(name) or {}).get("evaluation") or {}).get("newest_step") or 0


def train_log(env, name: str) -> str:
    with open(os.path.join(env.logs, name, "train.log")) as f:
        return f.read()


def test_a_node_that_dies_fails_the_job_as_node_fail_and_it_resumes_once_the_node_is_back(env, cluster):
    env.start()
    env.drop("crash.toml", env.job_text("crash", gpus=0, num_steps=200, every=10, keep=30, step_seconds=0.1))
    wait_for(lambda: newest_evaluated(env, "crash") >= 20, 180, what="checkpoints up to step 20 evaluated")
    assert cluster.crash_node() >= 2  # slurmd, the step and the worker at least
    failed = wait_for(lambda: (j := env.job("crash")) and j["restarts"] >= 1 and j, 180,
                      what="Slurm to declare the node dead and the daemon to restart the job")
    assert any("its Slurm node failed" in h["reason"] for h in failed["history"]), failed["history"]
    cluster.restart_node()
    done = env.wait_state("crash", "succeeded", timeout=300)
    assert done["restarts"] == 1 and done["failure"] is None or done["failure"]["kind"] == "node-fail", done
    log = train_log(env, "crash")
    resumed = int(log.split("resuming from step ")[1].split()[0])
    assert resumed >= 20  # from its latest checkpoint, not from the start
    ev = done["evaluation"]
    assert ev["counts"]["evaluated"] == ev["total"] >= 20 and not ev["counts"].get("missed"), ev["counts"]


def test_the_time_limits_warning_saves_a_checkpoint_and_the_job_resumes_in_a_new_slurm_job(env, cluster):
    """--time=2 (the job's [slurm] time_limit), the warning 60 s ahead ([slurm] warning_seconds; Slurm
    sends it up to a minute early): 100 s of training cannot end in the first Slurm job. The worker
    saves at the warning and exits "requeued"; the daemon submits the next at once, which resumes
    there: each Slurm job goes on at the step the one before saved, and no failure is counted."""
    env.write_config(slurm_warning_seconds=60)
    env.start()
    text = env.job_text("timed", gpus=0, num_steps=1000, every=100, keep=20, step_seconds=0.1)
    env.drop("timed.toml", text + '\n[slurm]\ntime_limit = "2"\n')
    done = env.wait_state("timed", "succeeded", timeout=600)
    requeued = [h for h in done["history"] if "on the cluster's warning signal" in h["reason"]]
    assert requeued, done["history"]
    # each requeue is a restart, shown as one, and none counts as a failure against max_restarts (3)
    assert done["restarts"] == len(requeued) == done["attempt"] - 1, done["history"]
    assert done["failure"] is None or done["failure"]["kind"] == "requeued", done["failure"]
    log = train_log(env, "timed")
    assert "--time=2" in log and "--signal=B:USR2@60" in log
    saved = [int(line.split("saved a checkpoint at step ")[1].split()[0]) for line in log.splitlines()
             if line.startswith("oddaemon-failure: requeued:")]  # the worker's own line, once per Slurm job
    resumed = [int(part.split()[0]) for part in log.split("resuming from step ")[1:]]
    assert saved and resumed[:len(saved)] == saved, (saved, resumed)  # each Slurm job went on where the last saved
    assert "TIMEOUT" not in log
    ev = done["evaluation"]
    assert ev["counts"]["evaluated"] == ev["total"] and not ev["counts"].get("missed"), ev["counts"]


def test_scontrol_requeue_of_a_daemons_job_is_refused_and_the_job_carries_on(env, cluster):
    """The daemon submits --no-requeue (it owns restarts: README "scontrol requeue"): Slurm refuses an
    operator's requeue with its reason, and the job is not disturbed: no restart, nothing missed."""
    env.start()
    env.drop("kept.toml", env.job_text("kept", gpus=0, num_steps=40, every=10, keep=10, step_seconds=0.1))
    running = wait_for(lambda: (j := env.job("kept")) and (j.get("slurm") or {}).get("train", {}).get("state")
                       == "RUNNING" and j, 120, what="Slurm to run the job")
    answer = cluster.run("scontrol", "requeue", str(running["slurm"]["train"]["job_id"]))
    assert answer.returncode != 0 and "disabled" in answer.stderr, answer
    done = env.wait_state("kept", "succeeded", timeout=180)
    assert done["restarts"] == 0 and done["attempt"] == 1, done["history"]
    ev = done["evaluation"]
    assert ev["counts"]["evaluated"] == ev["total"] >= 4 and not ev["counts"].get("missed"), ev["counts"]
