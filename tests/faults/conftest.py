"""Fixtures for the fault matrix, hostile-input and confinement suites.

They drive the same real daemon process as the integration tests, through the same harness."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))

from harness import DaemonEnv  # noqa: E402


@pytest.fixture
def daemon_env(tmp_path):
    env = DaemonEnv(str(tmp_path))
    yield env
    env.close()
