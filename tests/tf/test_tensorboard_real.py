"""``oddaemon tensorboard`` with the real TensorBoard of the workers' stack (the workers' Python,
``-m tensorboard.main``) over a finished job's model_dir: the URL answers, the job's runs and its
training scalars are listed, and Ctrl-C stops TensorBoard."""

from __future__ import annotations

import importlib.util
import json
import signal
import urllib.request

import pytest

from tests.integration.test_tensorboard import Board, alive, kill
from tests.support.harness import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                       reason="tensorboard is not installed (it comes with the TF stack of scripts/setup)"),
]


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.load(response)


def test_real_tensorboard_lists_the_job_s_runs_and_scalars(daemon_env):
    env = daemon_env.start()
    env.drop("tb_real.toml", env.job_text("tb_real", num_steps=10, every=5, step_seconds=0.01))
    env.wait_state("tb_real", "succeeded", 120)
    board = Board(env, "tb_real")  # the config's [worker] python: this virtualenv's, with tensorboard
    pid = None
    try:
        url, pid = board.url()
        # TensorBoard loads the event files in the background: wait for the runs, then their tags
        runs = wait_for(lambda: [r for r in get(url + "data/runs") if r.startswith("tb_real/")] or None, 120,
                        what="TensorBoard to list tb_real's runs")
        assert "tb_real/train" in runs, runs
        tags = wait_for(lambda: get(url + "data/plugin/scalars/tags").get("tb_real/train"), 120,
                        what="tb_real/train's scalar tags")
        assert any("loss" in tag.lower() for tag in tags), tags
        board.proc.send_signal(signal.SIGINT)
        assert board.proc.wait(60) == 0
        wait_for(lambda: not alive(pid), 30, what="TensorBoard to exit")
    finally:
        board.close()
        kill(pid)
