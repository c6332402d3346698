"""The daemon itself, in this process: ``Daemon(config, loop, clock)`` on the fake loop and the
manual clock, its workers in a recording executor (no worker process starts; the job file parser
children and inotify are real). Scheduler events in, their effects out: what was launched with
which command line, what the store and the views say, timers on the clock."""

from __future__ import annotations

import json
import os
import signal
import sys

from oddaemon.core import scheduler as sch
from oddaemon.core.failures import Failure
from oddaemon.service.best_checkpoint import BEST_MIN_INTERVAL
from oddaemon.testing.standin_files import CheckpointManager
from tests.support.fakes import FakeLoop
from tests.support.harness import STANDIN, wait_for
from tests.support.inprocess import T0, job_spec, start_daemon, stop_daemon

BACKOFF = 0.2  # the harness's [restart] backoff_base_seconds


def saved(env, name: str) -> dict:
    with open(os.path.join(env.state, "jobs", f"{name}.json")) as f:
        return json.load(f)


def test_start_up_restores_nothing_serves_the_control_socket_and_takes_the_signals(started):
    env, loop, daemon, executor = started
    assert daemon.serving()
    assert os.path.exists(env.socket)
    assert set(loop.signals) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
    assert daemon.commands.handle_request({"cmd": "ping"})["ok"] is True
    assert daemon.commands.handle_request({"cmd": "list"})["jobs"] == []
    # what the ping reports is what this process has loaded (other tests in the same pytest run may
    # have imported tensorflow; a daemon process never does: tests/integration checks its ping)
    heavy = {"tensorflow", "object_detection", "keras", "torch"}
    assert daemon.heavy_modules_loaded() == sorted(heavy & set(sys.modules))
    assert executor.launches == []


def test_a_submitted_job_starts_its_train_worker_with_the_command_line_of_the_worker_contract(started):
    env, loop, daemon, executor = started
    actions = daemon.dispatch(sch.Submit(job_spec(env)))
    assert [type(a).__name__ for a in actions if isinstance(a, (sch.StartTrain, sch.Accepted))] == [
        "Accepted", "StartTrain"]
    [launch] = executor.launches
    job_json = os.path.join(env.state, "work", "cats", "job.json")
    assert launch.argv == [sys.executable, "-m", STANDIN, "train", "--job", job_json]
    assert (launch.name, launch.role, launch.attempt) == ("cats", "train", 1)
    assert launch.env["CUDA_VISIBLE_DEVICES"] == ""
    with open(job_json) as f:
        payload = json.load(f)
    assert (payload["spec"]["name"], payload["attempt"], payload["gpus"]) == ("cats", 1, [])
    assert saved(env, "cats")["state"] == "running"
    view = daemon.commands.handle_request({"cmd": "status", "name": "cats"})["job"]
    assert (view["state"], view["attempt"], view["started_at"]) == ("running", 1, T0)
    assert os.path.isdir(f"{env.models}/cats")  # its model_dir is watched from the start


def test_a_clean_exit_succeeds_the_job_and_clears_its_runtime_record(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    runtime = daemon.store.runtime_path("cats")
    with open(runtime) as f:  # the live worker's pid, for a restarted daemon to find
        assert json.load(f)["train"]["pid"] == executor.workers[("cats", "train")].pid
    loop.clock.set(T0 + 30)
    executor.exit("cats", "train", 0)
    job = daemon.state.jobs["cats"]
    assert (job.state.value, job.finished_at) == ("succeeded", T0 + 30)
    assert saved(env, "cats")["state"] == "succeeded"
    assert not os.path.exists(runtime)


def test_a_failed_worker_is_restarted_after_its_backoff_on_the_clock(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    executor.exit("cats", "train", 1, Failure("gpu", "CUDA_ERROR_ILLEGAL_ADDRESS"))
    job = daemon.state.jobs["cats"]
    assert (job.state.value, job.retry_at) == ("backoff", T0 + BACKOFF)
    assert loop.timers()[0] == T0 + BACKOFF  # the restart is the next timer (then the hang check's)
    loop.advance(BACKOFF)
    assert [(launch.role, launch.attempt) for launch in executor.launches] == [("train", 1), ("train", 2)]
    assert (daemon.state.jobs["cats"].state.value, daemon.state.jobs["cats"].restarts) == ("running", 1)


def test_a_fatal_failure_fails_the_job_without_a_restart(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    executor.exit("cats", "train", 1, Failure("input", "train-0.tfrecord record 3 is damaged"))
    view = daemon.view("cats")
    assert (view["state"], view["failure"]["kind"]) == ("failed", "input")
    loop.advance(3600)
    assert len(executor.launches) == 1


def test_cancel_stops_the_worker_and_its_exit_cancels_the_job(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env)))
    reply = daemon.commands.handle_request({"cmd": "cancel", "name": "cats"})
    assert reply["ok"] is True
    assert [(name, role) for name, role, _, _ in executor.stops] == [("cats", "train")]
    assert daemon.state.jobs["cats"].state.value == "stopping"
    executor.exit("cats", "train", -signal.SIGTERM)
    assert daemon.state.jobs["cats"].state.value == "cancelled"
    assert saved(env, "cats")["state"] == "cancelled"


def test_a_silent_worker_is_stopped_as_hung_at_its_timeout_and_restarted(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env, hang=60.0)))
    loop.advance(59.0)
    assert executor.stops == []
    loop.advance(1.0)
    [(name, role, _, failure)] = executor.stops
    assert (name, role, failure.kind) == ("cats", "train", "hung")
    executor.exit("cats", "train", -signal.SIGTERM, failure)  # the executor reports the failure it stopped it for
    job = daemon.state.jobs["cats"]
    assert (job.state.value, job.failure.kind) == ("backoff", "hung")


def test_a_job_file_in_the_spool_is_parsed_accepted_and_started(started):
    env, loop, daemon, executor = started
    env.drop("dogs.toml", env.job_text("dogs", eval_extra="enabled = false"))

    def served():
        loop.turn(0.1)  # inotify, then the parser child's reply
        return executor.launches

    wait_for(served, 30, 0, what="the spool file to be parsed and its job started")
    assert [(launch.name, launch.role) for launch in executor.launches] == [("dogs", "train")]
    assert len(env.accepted()) == 1 and env.rejected() == []


def test_a_restarted_daemon_resumes_the_saved_running_job_as_its_next_attempt(started):
    env, loop, first, executor = started
    first.dispatch(sch.Submit(job_spec(env)))
    loop.fire_signal(signal.SIGTERM)
    assert [(name, role) for name, role, _, _ in executor.stops] == [("cats", "train")]
    executor.exit("cats", "train", -signal.SIGTERM)
    assert loop.stopped  # the last worker gone: the loop ends
    assert saved(env, "cats")["state"] == "running"  # kept as it was: it resumes at the next start
    first.evaluations.close()  # what service.daemon.run does after the loop (the fixture's stop is harmless)
    made = []
    second = start_daemon(env, FakeLoop(loop.clock), made)
    try:
        assert [(launch.name, launch.attempt) for launch in made[0].launches] == [("cats", 2)]
        assert second.state.jobs["cats"].state.value == "running"
    finally:
        stop_daemon(second)


def test_a_second_cpu_job_waits_for_the_cpu_slot_and_starts_when_it_frees(started):
    env, loop, daemon, executor = started
    daemon.dispatch(sch.Submit(job_spec(env, "cats")))
    loop.clock.set(T0 + 1)
    daemon.dispatch(sch.Submit(job_spec(env, "dogs")))
    assert [(v["name"], v["state"], v["queue_position"]) for v in daemon.views()] == [
        ("cats", "running", None), ("dogs", "queued", 1)]
    executor.exit("cats", "train", 0)
    assert [(launch.name, launch.attempt) for launch in executor.launches] == [("cats", 1), ("dogs", 1)]
    assert [(v["name"], v["state"]) for v in daemon.views()] == [("cats", "succeeded"), ("dogs", "running")]


def test_each_checkpoint_is_handed_to_the_warm_evaluator_and_its_result_makes_the_best(started):
    """The warm evaluator protocol from the evaluator's side: the test is the worker (ready, then a
    result file and "done" per request), the checkpoints are the stand-in trainer's files."""
    env, loop, daemon, executor = started
    job = job_spec(env, evaluate=True)
    daemon.dispatch(sch.Submit(job))
    saver = CheckpointManager(job.model_dir, max_to_keep=1)
    saver.save(0)

    def turn_until(predicate, what):
        def served():
            loop.turn(0.1)
            return predicate()

        return wait_for(served, 30, 0, what=what)

    evaluator = turn_until(lambda: executor.workers.get(("cats", "eval")), "the warm evaluator to start")
    assert evaluator.launch.argv[3:5] == ["eval-serve", "--job"]
    assert evaluator.launch.argv[-2] == "--reply-fd"
    evaluator.reply({"event": "ready"})
    results = {}
    for n, step, value in ((1, 0, 0.25), (2, 5, 0.5), (3, 10, 0.375)):
        if n > 1:
            saver.save(step)  # TF keeps one: the daemon's pin keeps each until it is evaluated
        loop.turn()  # inotify: the new checkpoint is pinned and handed over
        request = evaluator.read_line()
        assert os.path.basename(request["checkpoint"]) == f"ckpt-{n}"
        with open(request["checkpoint"] + ".index") as f:
            assert json.load(f)["step"] == step  # the pinned files are that checkpoint's
        with open(request["result"], "w") as f:
            json.dump({"checkpoint": request["checkpoint"], "step": step, "metrics": {
                "DetectionBoxes_Precision/mAP": value}, "wall_time": T0, "duration_seconds": 1.0}, f)
        evaluator.reply({"event": "done", "checkpoint": request["checkpoint"], "result": request["result"]})
        results[n] = turn_until(lambda n=n: (daemon.view("cats")["evaluation"]["counts"].get("evaluated") == n
                                             and daemon.view("cats")["evaluation"]), f"ckpt-{n}'s result")
    evaluation = results[3]
    assert [(c["n"], c["step"], c["value"]) for c in evaluation["checkpoints"]] == [(1, 0, 0.25), (2, 5, 0.5),
                                                                                  (3, 10, 0.375)]
    assert evaluation["best"]["checkpoint"] == "ckpt-2"
    loop.advance(BEST_MIN_INTERVAL)  # best/ is rebuilt at most this often
    with open(os.path.join(job.model_dir, "best", "best.json")) as f:
        assert json.load(f)["checkpoint"] == "ckpt-2"
    # training ends: the evaluator's stdin closes once nothing is left, and its exit ends the job
    executor.exit("cats", "train", 0)
    loop.turn()
    assert evaluator.read_line() is None
    executor.exit("cats", "eval", 0)
    turn_until(lambda: daemon.state.jobs["cats"].state.value == "succeeded", "the job to succeed")
