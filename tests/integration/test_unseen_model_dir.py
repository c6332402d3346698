"""The real daemon with workers whose writes its inotify cannot see, as a Slurm node's writes to NFS
are for the daemon's host (tests/support/unseen_writes.py: the daemon reads model_dirs through a FUSE
view, the workers write behind it, in a mount namespace of their own). With
``[cluster] model_dir_poll_seconds`` every checkpoint is still evaluated exactly once, in order,
although max_to_keep deletes each soon after; without it, inotify alone does not see them."""

from __future__ import annotations

import os
import re
import sys

import pytest

from tests.support import unseen_writes
from tests.support.harness import assert_evaluated_in_order

pytestmark = pytest.mark.skipif(unseen_writes.missing() is not None, reason=unseen_writes.missing() or "")


@pytest.fixture
def unseen_env(daemon_env):
    root = unseen_writes.UnseenRoot(os.path.join(daemon_env.root, "backing"), daemon_env.models).mount()
    python = root.unseen_python(os.path.join(daemon_env.root, "unseen-python"),
                                daemon_env.config_overrides.get("worker_python") or sys.executable)
    daemon_env.write_config(worker_python=python)
    yield daemon_env, root
    daemon_env.close()
    root.unmount()


def evaluations_begun(env, name: str) -> list[int]:
    with open(os.path.join(env.logs, name, "eval.log")) as f:
        return [int(n) for n in re.findall(r"^INFO:tensorflow:Evaluating checkpoint \S*/ckpt-(\d+) ", f.read(),
                                           re.MULTILINE)]


def test_every_checkpoint_an_unseen_writer_saves_is_evaluated_exactly_once(unseen_env):
    env, root = unseen_env
    env.write_config(model_dir_poll_seconds=0.5)
    env.start()
    # a checkpoint every 5 steps x 0.1 s = 0.5 s, TF keeps 3: each lives 1.5 s, three poll intervals
    env.drop("far.toml", env.job_text("far", num_steps=40, every=5, keep=3, step_seconds=0.1))
    job = env.wait_state("far", "succeeded", timeout=120)
    # the writer really was unseen: its files are in the backing directory, written there directly
    assert os.path.exists(os.path.join(root.backing, "far", "ckpt-9.index"))
    counts = job["evaluation"]["counts"]
    assert counts["evaluated"] == job["evaluation"]["total"] == 9 and counts["missed"] == 0, counts
    assert assert_evaluated_in_order(env, "far") == list(range(1, 10))
    assert evaluations_begun(env, "far") == list(range(1, 10))  # each handed to the evaluator once


def test_without_polling_inotify_alone_misses_what_it_cannot_see(unseen_env):
    """The control: the same writer with polling off. Nothing is evaluated while it trains (no event
    reaches the daemon); at its end the daemon lists model_dir once more and finds only what
    max_to_keep left: the rest are recorded missed, never silently lost."""
    env, root = unseen_env
    env.write_config(model_dir_poll_seconds=0)
    env.start()
    env.drop("blind.toml", env.job_text("blind", num_steps=40, every=5, keep=2, step_seconds=0.05))
    job = env.wait_state("blind", ("succeeded", "failed"), timeout=120)
    counts = job["evaluation"]["counts"]
    assert counts["missed"] >= 1 and counts["evaluated"] <= 3, counts
