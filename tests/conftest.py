"""Fixtures shared by every test directory (the helpers themselves are in tests/support)."""

from __future__ import annotations

import pytest

from tests.support.harness import DaemonEnv


@pytest.fixture
def daemon_env(tmp_path):
    """A daemon on a temporary project folder (not started); stopped, with its workers, at teardown."""
    env = DaemonEnv(str(tmp_path))
    yield env
    env.close()
