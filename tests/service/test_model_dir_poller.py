"""The bounded model_dir poller (``service/model_dir_poller.py``) on the fake loop: silent while
nothing changes, one call per change at its interval, a model_dir that goes and comes back, a
stopped poller; then with a writer the daemon's inotify cannot see (a FUSE view of the directory
the writer writes, ``tests/support/unseen_writes.py``): inotify reports nothing, the poller finds
every checkpoint; and in the in-process daemon, every checkpoint is pinned and handed to the
evaluator exactly once, whether only the poller saw it or inotify and the poller both did."""

from __future__ import annotations

import json
import os
import select

import pytest

from oddaemon.adapters.inotify import InotifyHub
from oddaemon.core import scheduler as sch
from oddaemon.service.model_dir_poller import ModelDirPoller
from oddaemon.service.watch import ModelDirWatcher
from oddaemon.testing.standin_files import CheckpointManager
from tests.support import unseen_writes
from tests.support.fakes import FakeLoop, ManualClock
from tests.support.harness import wait_for
from tests.support.inprocess import T0, job_spec, start_daemon, stop_daemon

unseen = pytest.mark.skipif(unseen_writes.missing() is not None, reason=unseen_writes.missing() or "")


class Counts:
    def __init__(self):
        self.checkpoints = self.progress = 0

    def on_checkpoints(self):
        self.checkpoints += 1

    def on_progress(self):
        self.progress += 1

    def __call__(self):
        return self.checkpoints, self.progress


def request_if_any(evaluator) -> dict | None:
    """The evaluator's next request if the daemon wrote one (never waits)."""
    if b"\n" in evaluator._buffer or select.select([evaluator.stdin], [], [], 0)[0]:
        return evaluator.read_line(5)
    return None


def polled(model_dir: str, interval: float = 2.0):
    loop = FakeLoop(ManualClock(T0))
    counts = Counts()
    poller = ModelDirPoller(loop, model_dir, interval, counts.on_checkpoints, counts.on_progress)
    poller.start()
    return loop, poller, counts


def test_nothing_new_calls_nothing_and_each_change_is_one_call_at_the_next_interval(tmp_path):
    model_dir = str(tmp_path / "m")
    os.makedirs(os.path.join(model_dir, "train"))
    loop, poller, counts = polled(model_dir)
    assert loop.timers() == [T0 + 2.0]
    loop.advance(10)
    assert counts() == (0, 0) and poller.polls == 5
    saver = CheckpointManager(model_dir, max_to_keep=2)
    saver.save(0)
    saver.save(5)  # two saves within one interval: one call (the evaluation side re-lists them all)
    loop.advance(1.9)
    assert counts() == (0, 0)
    loop.advance(0.1)
    assert counts() == (1, 0)
    with open(os.path.join(model_dir, "train", "events.out.tfevents.1"), "ab") as f:
        f.write(b"x" * 10)
    loop.advance(2)
    assert counts() == (1, 1)
    with open(os.path.join(model_dir, "train", "events.out.tfevents.1"), "ab") as f:
        f.write(b"y")  # grows in place
    os.makedirs(os.path.join(model_dir, "eval", "val"))
    with open(os.path.join(model_dir, "eval", "val", "events.out.tfevents.2"), "wb") as f:
        f.write(b"z")  # the evaluator's, under eval/<name>
    loop.advance(2)
    assert counts() == (1, 2)
    with open(os.path.join(model_dir, "notes.txt"), "w") as f:
        f.write("not a checkpoint")
    os.makedirs(os.path.join(model_dir, ".oddaemon", "pins"), exist_ok=True)
    loop.advance(2)
    assert counts() == (1, 2)
    poller.stop()
    saver.save(10)
    loop.advance(10)
    assert counts() == (1, 2) and loop.timers() == []


def test_a_model_dir_that_goes_away_and_comes_back_is_read_anew(tmp_path):
    model_dir = str(tmp_path / "m")
    loop, poller, counts = polled(model_dir, interval=1.0)  # not there yet: the watcher creates it
    loop.advance(3)
    assert counts() == (0, 0)
    os.makedirs(model_dir)
    loop.advance(1)
    assert counts() == (1, 1)  # listed for the first time: everything is read
    os.rename(model_dir, model_dir + ".moved")
    loop.advance(3)
    assert counts() == (1, 1)  # cannot be listed: nothing to tell yet
    os.rename(model_dir + ".moved", model_dir)
    CheckpointManager(model_dir, max_to_keep=2).save(0)
    loop.advance(1)
    assert counts() == (2, 1)
    poller.stop()


@pytest.fixture
def unseen_root(tmp_path):
    root = unseen_writes.UnseenRoot(str(tmp_path / "backing"), str(tmp_path / "view")).mount()
    yield root
    root.unmount()


@unseen
def test_inotify_does_not_see_the_unseen_writer_and_the_poller_does(unseen_root):
    """The premise: checkpoints written behind the FUSE view raise no inotify event on the view;
    the watcher alone would never re-list, the poller re-lists within one interval."""
    loop = FakeLoop(ManualClock(T0))
    hub = InotifyHub()
    loop.add_reader(hub.fileno(), hub.dispatch)
    counts = Counts()
    view, behind = os.path.join(unseen_root.view, "job"), os.path.join(unseen_root.backing, "job")
    poller = ModelDirPoller(loop, view, 2.0, counts.on_checkpoints, counts.on_progress)
    watcher = ModelDirWatcher(hub, loop, view, counts.on_checkpoints, counts.on_progress)
    poller.start()
    watcher.start()
    try:
        assert counts() == (1, 1)  # the watcher's start reads once
        saver = CheckpointManager(behind, max_to_keep=3)
        for step in (0, 5, 10):
            saver.save(step)
        assert os.path.exists(os.path.join(view, "ckpt-3.index"))  # the view shows them ...
        assert loop.run_ready(0.5) == [] and counts() == (1, 1)  # ... inotify says nothing
        loop.advance(0)
        assert counts() == (1, 1)
        loop.advance(2.0)
        assert counts() == (2, 2)  # the poller did (its bearings were taken before model_dir existed: all)
        loop.advance(2.0)
        assert counts() == (2, 2)
        CheckpointManager(view, max_to_keep=3).save(15)  # through the view: inotify sees this one
        assert loop.run_ready(5)
        loop.advance(0)
        assert counts() == (3, 2)
        loop.advance(2.0)
        assert counts() == (4, 2)  # and so does the poll after it: a second call, handled once (below)
    finally:
        watcher.stop()
        poller.stop()
        hub.close()


@unseen
def test_every_checkpoint_is_evaluated_once_whether_the_poller_alone_or_both_saw_it(tmp_path, daemon_env):
    """The in-process daemon watching a FUSE view (the writer is behind it, as a Slurm node writing to
    NFS is): ckpt-1 and ckpt-2 are written unseen (only the poller finds them), ckpt-3 through the
    view (inotify and then the poller both report it): each is pinned once, handed to the evaluator
    once, evaluated once, and TF's max_to_keep = 1 deleted none of them before its pin."""
    env = daemon_env
    root = unseen_writes.UnseenRoot(str(tmp_path / "backing"), env.models).mount()
    loop = FakeLoop(ManualClock(T0))
    made: list = []
    env.write_config(model_dir_poll_seconds=0.5)
    daemon = start_daemon(env, loop, made)
    executor = made[0]
    try:
        job = job_spec(env, evaluate=True)
        daemon.dispatch(sch.Submit(job))
        behind = job.model_dir.replace(env.models, root.backing, 1)

        def turn_until(predicate, what):
            def served():
                loop.turn(0.05)
                loop.advance(0.1)
                return predicate()

            return wait_for(served, 30, 0, what=what)

        evaluator = turn_until(lambda: executor.workers.get(("cats", "eval")), "the warm evaluator to start")
        evaluator.reply({"event": "ready"})
        saver = CheckpointManager(behind, max_to_keep=1)
        handed = []
        for n, step in ((1, 0), (2, 5), (3, 10)):
            if n == 3:
                saver = CheckpointManager(job.model_dir, max_to_keep=1)  # through the view: inotify too
            saver.save(step)
            request = turn_until(lambda: request_if_any(evaluator), f"ckpt-{n} to be handed to the evaluator")
            handed.append(os.path.basename(request["checkpoint"]))
            with open(request["checkpoint"] + ".index") as f:
                assert json.load(f)["step"] == step
            with open(request["result"], "w") as f:
                json.dump({"checkpoint": request["checkpoint"], "step": step, "metrics": {
                    "DetectionBoxes_Precision/mAP": 0.1 * n}, "wall_time": T0, "duration_seconds": 1.0}, f)
            evaluator.reply({"event": "done", "checkpoint": request["checkpoint"], "result": request["result"]})
            turn_until(lambda n=n: daemon.view("cats")["evaluation"]["counts"].get("evaluated") == n,
                       f"ckpt-{n}'s result")
        for _ in range(10):  # more polls, more inotify turns: nothing is handed over again
            loop.turn(0.05)
            loop.advance(0.5)
        assert request_if_any(evaluator) is None, "a checkpoint was handed over twice"
        assert handed == ["ckpt-1", "ckpt-2", "ckpt-3"]
        evaluation = daemon.view("cats")["evaluation"]
        assert [c["n"] for c in evaluation["checkpoints"]] == [1, 2, 3]
        assert {k: v for k, v in evaluation["counts"].items() if v} == {"evaluated": 3}, evaluation["counts"]
        assert daemon.watching.pollers["cats"].polls >= 10
    finally:
        stop_daemon(daemon)
        root.unmount()


@unseen
@pytest.mark.parametrize("poll", [0.5, 0])
def test_a_trainer_writing_unseen_is_not_taken_for_hung_while_the_poller_sees_its_checkpoints(tmp_path, daemon_env,
                                                                                            poll):
    """A Slurm job's output reaches the daemon only through model_dir (slurmd writes its log): the
    train guard's hang timeout (60 s here) is kept back by the checkpoints the poller finds, one every
    20 s; without the poller the same trainer is stopped as hung."""
    env = daemon_env
    root = unseen_writes.UnseenRoot(str(tmp_path / "backing"), env.models).mount()
    loop = FakeLoop(ManualClock(T0))
    made: list = []
    env.write_config(model_dir_poll_seconds=poll)
    daemon = start_daemon(env, loop, made)
    executor = made[0]
    try:
        job = job_spec(env, hang=60.0)
        daemon.dispatch(sch.Submit(job))
        saver = CheckpointManager(job.model_dir.replace(env.models, root.backing, 1), max_to_keep=2)
        for step in range(0, 50, 5):
            saver.save(step)
            loop.turn(0.05)
            loop.advance(20.0)
        hung = [s for s in executor.stops if s[3] is not None and s[3].kind == "hung"]
        assert (hung == []) == (poll > 0), executor.stops
    finally:
        stop_daemon(daemon)
        root.unmount()
