"""[slurm] nodes = 2 on a real two-node Slurm 22.05 (tests/support/slurm.py: node1 and node2, each a
slurmd in its own network and UTS namespace): the daemon submits one batch job with a task per node,
srun starts the stand-in on both (each records what it sees, only task 0 trains), every checkpoint
is evaluated exactly once, and Slurm's warning signal reaches both tasks through srun: the chief
saves, the job is resubmitted and resumes. With the TF stack installed, a tiny real TF job trains
on both nodes under MultiWorkerMirroredStrategy."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import tempfile

import pytest

from tests.support import slurm as test_slurm
from tests.support.harness import DaemonEnv, assert_evaluated_in_order, wait_for
from tests.support.realtf import tiny_job

pytestmark = [pytest.mark.slow, pytest.mark.skipif(test_slurm.missing() is not None,
                                                   reason=test_slurm.missing() or "")]
PORT_BASE = 23456
REAL_TF_INSTALLED = all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "object_detection"))


@pytest.fixture(scope="module")
def cluster():
    root = tempfile.mkdtemp(prefix="oddaemon-slurm2-")
    c = test_slurm.SlurmCluster(root, cpus=2, nodes=2).start()
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def slurm_env(tmp_path, cluster):
    env = DaemonEnv(str(tmp_path), config_overrides={"cluster_backend": "slurm", "slurm_conf": cluster.conf,
                                                     "slurm_poll_seconds": 0.5, "slurm_partition": "train"})
    with open(env.config_path) as f:  # the harness writes no max_nodes: add it to its [slurm] table
        text = f.read()
    with open(env.config_path, "w") as f:
        f.write(text.replace("[slurm]\n", f"[slurm]\nmax_nodes = 2\nport_base = {PORT_BASE}\n", 1))
    yield env
    env.close()


def _jobs_of(cluster, name: str) -> list[dict]:
    return sorted((j for j in cluster.jobs().values() if j["name"] == f"oddaemon-{name}-train"),
                  key=lambda j: j["job_id"])


def _tasks_seen(env, name: str) -> dict[int, dict]:
    seen = {}
    for path in glob.glob(os.path.join(env.models, name, ".standin-tasks", "task-*.json")):
        with open(path) as f:
            record = json.load(f)
        seen[record["procid"]] = record
    return seen


def _exactly_once(env, name: str, job: dict) -> None:
    total = job["evaluation"]["total"]
    assert job["evaluation"]["counts"]["evaluated"] == total >= 4, job["evaluation"]
    assert assert_evaluated_in_order(env, name) == list(range(1, total + 1))  # each once, in order


def test_a_two_node_job_runs_a_task_on_each_node_and_every_checkpoint_is_evaluated_once(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("wide.toml", env.job_text("wide", gpus=0, num_steps=20, every=5, keep=2, step_seconds=0.1,
                                       extra="[slurm]\nnodes = 2\n"))
    job = env.wait_state("wide", "succeeded", timeout=180)
    (ran,) = _jobs_of(cluster, "wide")
    assert ran["job_state"] == "COMPLETED" and ran["nodes"] == "node[1-2]", ran
    seen = _tasks_seen(env, "wide")
    assert sorted(seen) == [0, 1], seen
    assert {seen[0]["nodename"], seen[1]["nodename"]} == {"node1", "node2"}, seen  # two distinct nodes
    assert {seen[0]["hostname"], seen[1]["hostname"]} == {"node1", "node2"}, seen
    assert {r["job_nodelist"] for r in seen.values()} == {"node[1-2]"}
    assert {r["job_id"] for r in seen.values()} == {str(ran["job_id"])}
    assert {r["port_base"] for r in seen.values()} == {str(PORT_BASE)}
    with open(os.path.join(env.logs, "wide", "train.log")) as f:
        chief_log = f.read()
    assert "--nodes=2 --ntasks-per-node=1" in chief_log  # the daemon's line of what it submitted
    assert "standin: task 0 of 2" in chief_log and "task 1 of 2" not in chief_log
    (other_log,) = glob.glob(os.path.join(env.root, "**", "slurm-train-task1.log"), recursive=True)
    with open(other_log) as f:
        assert "standin: task 1 of 2" in f.read()
    _exactly_once(env, "wide", job)


def test_the_warning_signal_reaches_every_task_and_the_chief_saves_and_requeues(slurm_env, cluster):
    env = slurm_env.start()
    env.drop("wwarn.toml", env.job_text("wwarn", gpus=0, num_steps=300, every=20, keep=20, step_seconds=0.1,
                                        extra="[slurm]\nnodes = 2\n"))
    wait_for(lambda: ((env.job("wwarn") or {}).get("evaluation") or {}).get("newest_step") == 20, 120,
             what="the checkpoint of step 20 to be evaluated")
    wait_for(lambda: len(_tasks_seen(env, "wwarn")) == 2, 60, what="both tasks to run")
    (first,) = _jobs_of(cluster, "wwarn")
    assert cluster.run("scancel", "--signal=USR2", "--batch", str(first["job_id"])).returncode == 0
    job = env.wait_state("wwarn", "succeeded", timeout=240)
    ran = _jobs_of(cluster, "wwarn")
    assert [j["job_state"] for j in ran] == ["FAILED", "COMPLETED"], ran
    assert ran[0]["exit_code"] >> 8 == 75  # the chief's requeue status, though task 1 left with 0
    requeued = [h for h in job["history"] if "resubmitting now" in h["reason"]]
    assert len(requeued) == 1, job["history"]
    with open(os.path.join(env.logs, "wwarn", "train.log")) as f:
        log = f.read()
    saved = int(log.split("saved a checkpoint at step ")[1].split()[0])
    assert f"resuming from step {saved}" in log
    (other_log,) = glob.glob(os.path.join(env.root, "**", "slurm-train-task1.log"), recursive=True)
    with open(other_log) as f:
        assert "the cluster's warning signal; the chief saves the checkpoint" in f.read()
    _exactly_once(env, "wwarn", job)


@pytest.mark.skipif(not REAL_TF_INSTALLED, reason="the TF stack is not installed (scripts/setup installs it)")
def test_a_real_tf_job_trains_on_two_nodes_under_multi_worker_mirrored_strategy(tmp_path, cluster):
    """The real TF workers through the daemon: the train worker on node1 and node2 (their cluster spec
    from SlurmClusterResolver: node1:port_base and node2:port_base, over the bridge), the chief's
    checkpoints each evaluated once by the warm evaluator on this host."""
    env = DaemonEnv(str(tmp_path), config_overrides={"cluster_backend": "slurm", "slurm_conf": cluster.conf,
                                                     "slurm_poll_seconds": 0.5, "slurm_partition": "train",
                                                     "worker_module": "oddaemon.workers"})
    with open(env.config_path) as f:
        text = f.read()
    with open(env.config_path, "w") as f:
        f.write(text.replace("[slurm]\n", f"[slurm]\nmax_nodes = 2\nport_base = {PORT_BASE}\n", 1))
    try:
        tiny_job(env, "tf2", "num_steps = 6", "checkpoint_max_to_keep = 20",
                 'device = "cpu"\n\n[slurm]\nnodes = 2\n')
        final = env.wait_state("tf2", ("succeeded", "failed"), 900)
        assert final["state"] == "succeeded", (final["reason"], env.daemon_log()[-4000:])
        with open(os.path.join(env.logs, "tf2", "train.log")) as f:
            chief_log = f.read()
        assert f"cluster_spec = {{'worker': ['node1:{PORT_BASE}', 'node2:{PORT_BASE}']}}" in chief_log
        assert "Slurm task 0 of 2 (MultiWorkerMirroredStrategy)" in chief_log
        (other_log,) = glob.glob(os.path.join(env.root, "**", "slurm-train-task1.log"), recursive=True)
        with open(other_log) as f:
            assert "Slurm task 1 finished at step 6" in f.read()
        checkpoints = final["evaluation"]["checkpoints"]
        assert [(c["state"], c["step"], c["attempts"]) for c in checkpoints] == [
            ("evaluated", s, 1) for s in (0, 5, 6)], checkpoints
        assert not glob.glob(os.path.join(env.models, "tf2", "**", "temp_worker_*"), recursive=True)
    finally:
        env.close(timeout=60)
