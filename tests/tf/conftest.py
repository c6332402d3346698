"""Fixtures for the real-TensorFlow tests: a daemon whose workers are the real TF workers."""

from __future__ import annotations

import pytest

from tests.support.harness import DaemonEnv


@pytest.fixture
def real_env(tmp_path):
    env = DaemonEnv(str(tmp_path))
    env.write_config(worker_module="oddaemon.workers")
    yield env
    env.close(timeout=60)
