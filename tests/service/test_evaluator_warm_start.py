"""The warm evaluator starts with the training (it builds its model while the trainer builds its
own), so the first checkpoint's request is written the moment the checkpoint appears; where its
place needs a GPU it does not hold yet, it still waits for a checkpoint (an eval GPU is taken only
then, never a training GPU). A CPU evaluator gets the [eval] cpu_nice and cpu_threads of the daemon;
with $ODDAEMON_REACTION_TRACE the stages of each reaction are written down (bench/reaction)."""

from __future__ import annotations

import dataclasses
import json
import os

from oddaemon.core import scheduler as sch
from oddaemon.core.config import load_config
from oddaemon.core.jobspec import EvalOptions
from oddaemon.service.daemon import Daemon
from oddaemon.service.reaction import TRACE_ENV
from oddaemon.testing.standin_files import CheckpointManager
from tests.support.fakes import FakeExecutor
from tests.support.harness import wait_for
from tests.support.inprocess import job_spec, new_loop, start_daemon, stop_daemon


def start_with(env, loop, made, extra: str, **overrides) -> Daemon:
    """``start_daemon`` with more of the configuration file (a section the harness does not write)."""
    env.write_config(worker_preflight=False, **overrides)
    with open(env.config_path, "a") as f:
        f.write(extra)
    daemon = Daemon(load_config(env.config_path), loop, loop.clock, executor=FakeExecutor.factory(made))
    daemon.start()
    return daemon


def turn_until(loop, predicate, what):
    def served():
        loop.turn(0.1)
        return predicate()

    return wait_for(served, 30, 0, what=what)


def test_the_evaluator_starts_with_training_and_the_first_checkpoint_is_sent_at_once(daemon_env, monkeypatch):
    trace = os.path.join(daemon_env.root, "trace.jsonl")
    monkeypatch.setenv(TRACE_ENV, trace)
    loop, made = new_loop(), []
    daemon = start_daemon(daemon_env, loop, made)
    executor = made[0]
    try:
        job = job_spec(daemon_env, evaluate=True)
        daemon.dispatch(sch.Submit(job))
        loop.turn()
        # no checkpoint exists yet, and the evaluator already runs: started right after the trainer
        assert not [n for n in os.listdir(job.model_dir) if n.startswith("ckpt-")]
        assert [(launch.role, launch.argv[3]) for launch in executor.launches] == [("train", "train"),
                                                                                 ("eval", "eval-serve")]
        evaluator = executor.workers[("cats", "eval")]
        trainer = executor.workers[("cats", "train")]
        # a CPU evaluator: lower priority and TF's threads limited as the daemon's [eval] says (defaults)
        assert (evaluator.launch.nice, trainer.launch.nice) == (19, 0)
        assert "TF_NUM_INTRAOP_THREADS" not in evaluator.launch.env  # cpu_threads = 0: as TF picks
        evaluator.reply({"event": "ready"})  # built while the trainer builds its model
        loop.turn(0.1)
        assert daemon.evaluations.book("cats").checkpoints == {}
        CheckpointManager(job.model_dir, max_to_keep=1).save(0)
        turn_until(loop, lambda: daemon.evaluations.book("cats").running() is not None, "ckpt-1 to be handed over")
        request = evaluator.read_line(timeout=5)  # in the pipe already: the same loop turn wrote it
        assert os.path.basename(request["checkpoint"]) == "ckpt-1"
        book = daemon.evaluations.book("cats")
        assert book.running().n == 1 and book.running().attempts == 1
        lines = [json.loads(line) for line in open(trace)]
        (sent,) = [line for line in lines if line.get("ckpt") == 1]
        assert sent["job"] == "cats" and sent["waited"] is False
        for stage in ("list_s", "pin_s", "record_s", "check_s", "start_record_s", "pipe_s"):
            assert sent[stage] >= 0, stage
        assert sent["rescan_at"] <= sent["sent_at"]
    finally:
        stop_daemon(daemon)


def test_an_evaluator_that_needs_a_gpu_it_does_not_hold_waits_for_a_checkpoint(daemon_env):
    loop, made = new_loop(), []
    daemon = start_with(daemon_env, loop, made, "", max_cpu_jobs=2)
    try:
        job = job_spec(daemon_env, evaluate=True)
        for device in ("gpu", "auto"):
            spec = dataclasses.replace(job, name=f"on{device}", model_dir=f"{daemon_env.models}/on{device}",
                                       eval=EvalOptions(enabled=True, device=device))
            daemon.dispatch(sch.Submit(spec))
        loop.turn()
        assert [(launch.name, launch.role) for launch in made[0].launches] == [("ongpu", "train"),
                                                                              ("onauto", "train")]
    finally:
        stop_daemon(daemon)


def test_a_cpu_evaluator_gets_the_configured_priority_and_thread_limit(daemon_env):
    loop, made = new_loop(), []
    daemon = start_with(daemon_env, loop, made, "[eval]\ncpu_nice = 7\ncpu_threads = 1\n")
    try:
        daemon.dispatch(sch.Submit(job_spec(daemon_env, evaluate=True)))
        loop.turn()
        evaluator, trainer = made[0].workers[("cats", "eval")], made[0].workers[("cats", "train")]
        assert evaluator.launch.nice == 7
        assert {k: evaluator.launch.env.get(k) for k in ("TF_NUM_INTRAOP_THREADS", "OMP_NUM_THREADS")} == {
            "TF_NUM_INTRAOP_THREADS": "1", "OMP_NUM_THREADS": "1"}
        assert trainer.launch.nice == 0 and "TF_NUM_INTRAOP_THREADS" not in trainer.launch.env
    finally:
        stop_daemon(daemon)
