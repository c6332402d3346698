"""An in-process daemon for tests: ``Daemon`` on the fake loop and manual clock, its workers in a ``FakeExecutor``."""

from __future__ import annotations

import signal

from oddaemon.core.config import load_config
from oddaemon.core.jobspec import EvalOptions, JobSpec, PipelineEdits, TrainOptions
from oddaemon.service.daemon import Daemon
from tests.support.fakes import FakeExecutor, FakeLoop, ManualClock
from tests.support.harness import DaemonEnv

T0 = 1_700_000_000.0


def start_daemon(env: DaemonEnv, loop: FakeLoop, made: list[FakeExecutor]) -> Daemon:
    """A started daemon on ``env``'s config file (no preflight: job files go straight to the queue);
    the executor it made is appended to ``made``."""
    env.write_config(worker_preflight=False)
    daemon = Daemon(load_config(env.config_path), loop, loop.clock, executor=FakeExecutor.factory(made))
    daemon.start()
    return daemon


def new_loop() -> FakeLoop:
    return FakeLoop(ManualClock(T0))


def stop_daemon(daemon: Daemon) -> None:
    """What SIGTERM does, the recorded workers ending as told; then what ``service.daemon.run`` does after the loop."""
    daemon.shutdown()
    for name, role in list(daemon.executor.workers):
        daemon.executor.exit(name, role, -signal.SIGTERM)
    daemon.evaluations.close()
    daemon.watching.inotify.close()
    daemon.executor.close()


def job_spec(env: DaemonEnv, name: str = "cats", hang: float | None = None, evaluate: bool = False) -> JobSpec:
    """A CPU job of 20 steps on a stand-in pipeline.config under ``env``'s root."""
    return JobSpec(name=name, pipeline_config=env.pipeline(name, num_steps=20), model_dir=f"{env.models}/{name}",
                   pipeline=PipelineEdits(num_steps=20), eval=EvalOptions(enabled=evaluate, device="cpu"),
                   train=TrainOptions(gpus=0, checkpoint_every_n=5, hang_timeout_seconds=hang))
