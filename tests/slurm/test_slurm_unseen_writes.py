"""Evaluation on a cluster whose nodes write model_dirs the daemon's inotify cannot see, with a real
one-node Slurm 22.05: the daemon reads, pins and watches model_dirs through a FUSE view, and
slurmd (so every Slurm job) runs in a mount namespace where the directory behind the view is bound
over it (tests/support/unseen_writes.py), as a node writing to NFS is to the daemon's host. With the
default ``[cluster] model_dir_poll_seconds = "auto"`` (2 s for the Slurm backend) every checkpoint is
still evaluated exactly once, in order, although max_to_keep deletes each a few seconds after it."""

from __future__ import annotations

import os
import re
import shutil
import tempfile

import pytest

from tests.support import slurm as test_slurm
from tests.support import unseen_writes
from tests.support.harness import DaemonEnv, assert_evaluated_in_order

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(test_slurm.missing() is not None, reason=test_slurm.missing() or ""),
              pytest.mark.skipif(unseen_writes.missing() is not None, reason=unseen_writes.missing() or "")]


@pytest.fixture(scope="module")
def unseen_cluster():
    """A daemon environment whose models/ is a FUSE view, and a Slurm whose jobs write behind it."""
    top = tempfile.mkdtemp(prefix="oddaemon-slurm-unseen-")
    env = DaemonEnv(os.path.join(top, "env"))
    root = unseen_writes.UnseenRoot(os.path.join(top, "backing"), env.models).mount()
    cluster = None
    try:
        cluster = test_slurm.SlurmCluster(os.path.join(top, "slurm"),
                                          slurmd_prefix=tuple(root.unseen_argv())).start()
        env.write_config(cluster_backend="slurm", slurm_conf=cluster.conf, slurm_poll_seconds=0.5,
                         slurm_partition="train")
        yield env, root, cluster
    finally:
        env.close()
        if cluster is not None:
            cluster.stop()
        root.unmount()
        shutil.rmtree(top, ignore_errors=True)


def test_every_checkpoint_a_slurm_job_writes_unseen_is_evaluated_exactly_once(unseen_cluster):
    env, root, cluster = unseen_cluster
    env.start()
    # a checkpoint every 5 steps x 0.2 s = 1 s; TF keeps 4, so each lives 4 s: two poll intervals
    env.drop("far.toml", env.job_text("far", gpus=0, num_steps=40, every=5, keep=4, step_seconds=0.2))
    job = env.wait_state("far", "succeeded", timeout=240)
    ran = [j for j in cluster.jobs().values() if j["name"] == "oddaemon-far-train"]
    assert [j["job_state"] for j in ran] == ["COMPLETED"], ran
    # the Slurm job's writes went behind the view (the FUSE mount was not in its namespace)
    assert os.path.exists(os.path.join(root.backing, "far", "ckpt-9.index"))
    assert not os.path.exists(os.path.join(root.backing, "far", "ckpt-1.index"))  # max_to_keep deleted it
    counts = job["evaluation"]["counts"]
    assert counts["evaluated"] == job["evaluation"]["total"] == 9 and counts["missed"] == 0, counts
    assert assert_evaluated_in_order(env, "far") == list(range(1, 10))
    with open(os.path.join(env.logs, "far", "eval.log")) as f:
        begun = [int(n) for n in re.findall(r"^INFO:tensorflow:Evaluating checkpoint \S*/ckpt-(\d+) ", f.read(),
                                            re.MULTILINE)]
    assert begun == list(range(1, 10))  # each handed to the evaluator once
    assert "adopting" not in env.daemon_log()
