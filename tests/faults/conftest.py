"""Fixtures for the fault matrix, hostile-input and confinement suites.

They drive the same real daemon process as the integration tests, through the same harness."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "integration"))

from harness import DaemonEnv  # noqa: E402


@pytest.fixture
def daemon_env(tmp_path):
    env = DaemonEnv(str(tmp_path))
    yield env
    env.close()


@pytest.fixture
def mounts(daemon_env):
    """Mount points to undo at teardown, after the daemon and its workers are gone (they hold files open)."""
    points: list[str] = []
    yield points
    try:
        daemon_env.close()
    finally:
        for point in reversed(points):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)
