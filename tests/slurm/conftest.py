"""The daemon of a real-Slurm test: ``slurm_env``, a ``DaemonEnv`` (not started) whose workers run on
the module's ``cluster`` fixture (each module starts the cluster it needs: one node, two, a short
SlurmdTimeout), polling Slurm every 0.5 s, training on the ``train`` partition."""

from __future__ import annotations

import pytest

from tests.support.harness import DaemonEnv


@pytest.fixture
def slurm_env(tmp_path, cluster):
    env = DaemonEnv(str(tmp_path), config_overrides={"cluster_backend": "slurm", "slurm_conf": cluster.conf,
                                                     "slurm_poll_seconds": 0.5, "slurm_partition": "train"})
    yield env
    env.close()
