"""Fixtures for the in-process service tests."""

from __future__ import annotations

import pytest

from tests.support.inprocess import new_loop, start_daemon, stop_daemon


@pytest.fixture
def started(daemon_env):
    """A started in-process daemon (fake loop, manual clock, recording executor) on the harness's
    config: ``(env, loop, daemon, executor)``; stopped at teardown."""
    loop, made = new_loop(), []
    daemon = start_daemon(daemon_env, loop, made)
    yield daemon_env, loop, daemon, made[0]
    stop_daemon(daemon)
