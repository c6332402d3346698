"""The executor seam: the daemon starts, stops and observes every worker through ``Executor``
(``oddaemon/service/executor.py``), so a second backend (Slurm) needs no change to the scheduler
or to the evaluation side. Driven in-process with a recording executor, a fake loop and a manual
clock: no worker process runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from oddaemon.core import scheduler as sch
from oddaemon.core.failures import Failure
from tests.support.harness import DaemonEnv
from tests.support.inprocess import job_spec as cpu_job
from tests.support.inprocess import new_loop, start_daemon, stop_daemon


@pytest.fixture
def seam(tmp_path):
    """An in-process daemon with GPUs 0 and 1 whose executor runs nothing (``FakeExecutor``)."""
    env = DaemonEnv(str(tmp_path), config_overrides={"gpus": [0, 1]})
    loop, made = new_loop(), []
    daemon = start_daemon(env, loop, made)
    yield env, daemon, made[0], loop
    stop_daemon(daemon)


def job_spec(env: DaemonEnv, name: str, gpus: int = 1):
    spec = cpu_job(env, name)
    return replace(spec, train=replace(spec.train, gpus=gpus))


def test_training_starts_through_the_executor_with_the_gpus_the_scheduler_chose(seam):
    env, daemon, executor, _loop = seam
    daemon.dispatch(sch.Submit(job_spec(env, "a", gpus=1)))
    assert [(x.name, x.role, x.attempt) for x in executor.launches] == [("a", "train", 1)]
    launch = executor.launches[0]
    job = daemon.state.jobs["a"]
    assert launch.gpus == job.gpus and len(launch.gpus) == 1
    assert launch.env["CUDA_VISIBLE_DEVICES"] == str(launch.gpus[0])
    assert launch.argv[1:4] == ["-m", "oddaemon.testing.standin", "train"]
    with open(launch.argv[launch.argv.index("--job") + 1]) as f:
        assert json.load(f)["gpus"] == list(launch.gpus)
    # the runtime file names the worker the executor reported (a restarted daemon kills leftovers by it)
    with open(daemon.store.runtime_path("a")) as f:
        assert json.load(f)["train"]["pid"] == executor.workers[("a", "train")].pid


def test_an_exit_the_executor_reports_drives_the_scheduler(seam):
    env, daemon, executor, _loop = seam
    daemon.dispatch(sch.Submit(job_spec(env, "a", gpus=1)))
    executor.exit("a", "train", 0)
    job = daemon.state.jobs["a"]
    assert job.state.value == "succeeded", job
    assert job.gpus == ()  # the GPU is free again
    assert daemon.gpus()["free"] == [0, 1]


def test_a_failed_worker_is_restarted_through_the_executor_after_its_backoff(seam):
    env, daemon, executor, loop = seam
    daemon.dispatch(sch.Submit(job_spec(env, "a", gpus=1)))
    executor.exit("a", "train", 1, Failure("crash", "the worker crashed"))
    assert daemon.state.jobs["a"].state.value == "backoff"
    retry_at = daemon.state.jobs["a"].retry_at
    loop.advance(retry_at - loop.clock() - 0.01)
    assert len(executor.launches) == 1  # not before its backoff
    loop.advance(0.02)  # the scheduler's wake-up fires on the manual clock
    assert [(x.role, x.attempt) for x in executor.launches] == [("train", 1), ("train", 2)]
    assert daemon.state.jobs["a"].state.value == "running"


def test_cancel_and_shutdown_stop_workers_through_the_executor(seam):
    env, daemon, executor, _loop = seam
    daemon.dispatch(sch.Submit(job_spec(env, "a", gpus=1)))
    daemon.dispatch(sch.Submit(job_spec(env, "b", gpus=1)))
    assert {x.name for x in executor.launches} == {"a", "b"}
    assert daemon.commands.cancel("a") == "stopping"
    assert executor.stops == [("a", "train", "cancel requested", None)]
    executor.exit("a", "train", -15)
    assert daemon.state.jobs["a"].state.value == "cancelled"
    daemon.shutdown()
    assert executor.stops[-1][:3] == ("b", "train", "daemon shutting down")


def test_a_reload_is_an_event_through_dispatch(seam, monkeypatch):
    """The reloaded policy reaches the state through the scheduler (PolicyChanged), and what now
    fits starts: one CPU slot becomes two."""
    env, daemon, executor, _loop = seam
    daemon.dispatch(sch.Submit(job_spec(env, "a", gpus=0)))
    daemon.dispatch(sch.Submit(job_spec(env, "b", gpus=0)))
    assert [x.name for x in executor.launches] == ["a"]
    with open(daemon.config.path) as f:
        text = f.read()
    with open(daemon.config.path, "w") as f:
        f.write(text.replace("max_cpu_jobs = 1\n", "max_cpu_jobs = 2\n"))
    seen: list[sch.Event] = []
    step = sch.step
    monkeypatch.setattr(sch, "step", lambda state, event, now: (seen.append(event), step(state, event, now))[1])
    daemon.reload()
    assert any(isinstance(e, sch.PolicyChanged) and e.policy.max_cpu_jobs == 2 for e in seen)
    assert daemon.state.policy.max_cpu_jobs == 2
    assert [x.name for x in executor.launches] == ["a", "b"]
