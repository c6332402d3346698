"""Fixtures for the integration tests (the harness itself is in harness.py)."""

from __future__ import annotations

import pytest

from harness import DaemonEnv


@pytest.fixture
def daemon_env(tmp_path):
    env = DaemonEnv(str(tmp_path))
    yield env
    env.close()
