"""Fixtures for the integration tests (the harness itself is in harness.py)."""

from __future__ import annotations

import os
import signal

import pytest

from harness import DaemonEnv, worker_pids


@pytest.fixture
def daemon_env(tmp_path):
    env = DaemonEnv(str(tmp_path))
    yield env
    try:
        env.stop()
    finally:
        for pid in worker_pids(str(tmp_path)):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
