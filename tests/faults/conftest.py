"""Fixtures for the fault matrix, hostile-input and confinement suites.

They drive the same real daemon process as the integration tests, through the same harness
(``daemon_env`` is in tests/conftest.py)."""

from __future__ import annotations

import subprocess

import pytest


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
