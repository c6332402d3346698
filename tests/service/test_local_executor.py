"""The local-process executor (``service/local_executor.py``) with real worker processes on the fake
loop: their output pumped into the job's log, their exit (read from the pidfd the executor put on
the loop) reported once with the failure read from the log, and a stop that escalates to SIGKILL
when the manual clock passes the grace period."""

from __future__ import annotations

import os
import signal
import sys

import pytest

from oddaemon.adapters.procs import worker_environment
from oddaemon.core.failures import Failure
from oddaemon.service.executor import WorkerLaunch
from oddaemon.service.local_executor import LocalExecutor
from tests.support.fakes import FakeLoop, ManualClock
from tests.support.harness import wait_for

T0 = 1_700_000_000.0
GRACE = 30.0


class Recorder:
    def __init__(self):
        self.exits: list[tuple[str, str, int, Failure | None]] = []
        self.output: list[tuple[str, str]] = []

    def on_exit(self, worker, returncode, failure):
        self.exits.append((worker.name, worker.role, returncode, failure))

    def on_output(self, name, role):
        self.output.append((name, role))


@pytest.fixture
def executor(tmp_path):
    loop = FakeLoop(ManualClock(T0))
    seen = Recorder()
    ex = LocalExecutor(loop, str(tmp_path / "logs"), 1024 * 1024, 2, GRACE, seen.on_exit, loop.clock,
                       on_output=seen.on_output)
    yield loop, ex, seen
    for worker in list(ex.workers.values()):
        worker.signal_group(signal.SIGKILL)
        worker.popen.wait(30)


def launch(tmp_path, code: str, name: str = "cats", role: str = "train") -> WorkerLaunch:
    return WorkerLaunch(name=name, role=role, attempt=1, argv=[sys.executable, "-c", code],
                        env=worker_environment(dict(os.environ), ()), cwd=str(tmp_path))


def run_until(loop: FakeLoop, predicate, what: str):
    """Serve the fds the executor put on the loop until ``predicate`` holds (a generous deadline)."""
    def served():
        loop.run_ready(0.1)  # waits up to 0.1 s for one of them to be readable
        return predicate()

    return wait_for(served, 30, 0, what=what)


def test_a_worker_that_fails_is_reported_once_with_the_failure_its_log_names(tmp_path, executor):
    loop, ex, seen = executor
    code = "print('step 1'); print('oddaemon-failure: input: train-0.tfrecord record 3 is damaged'); raise SystemExit(3)"
    worker = ex.start(launch(tmp_path, code))
    assert ex.workers[("cats", "train")] is worker and worker.started_at == T0
    assert set(loop.readers) == {worker.output_fd, worker.pidfd}
    run_until(loop, lambda: seen.exits, "the worker's exit")
    assert seen.exits == [("cats", "train", 3, Failure("input", "train-0.tfrecord record 3 is damaged"))]
    assert ("cats", "train") in seen.output
    assert ex.workers == {} and loop.readers == {}  # its fds are off the loop
    log = open(ex.log_path("cats", "train")).read()
    assert log.startswith("==== oddaemon: starting train attempt 1 at ")
    assert "step 1\n" in log
    assert log.endswith("==== oddaemon: train attempt 1 ended: exit status 3 (train-0.tfrecord record 3 is damaged)\n")


def test_a_clean_exit_reports_no_failure_and_each_role_has_its_log(tmp_path, executor):
    loop, ex, seen = executor
    ex.start(launch(tmp_path, "print('evaluated')", role="eval"))
    run_until(loop, lambda: seen.exits, "the evaluator's exit")
    assert seen.exits == [("cats", "eval", 0, None)]
    assert ex.log_path("cats", "eval") == str(tmp_path / "logs" / "cats" / "eval.log")
    assert "evaluated\n" in open(ex.log_path("cats", "eval")).read()


def test_a_worker_ignoring_sigterm_is_killed_when_the_grace_period_has_passed(tmp_path, executor):
    loop, ex, seen = executor
    code = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); "
            "time.sleep(120)")
    ex.start(launch(tmp_path, code))
    log_path = ex.log_path("cats", "train")
    run_until(loop, lambda: "ready" in open(log_path).read(), "the worker to ignore SIGTERM")
    hung = Failure("hung", "hung: no new step for 60s")
    assert ex.stop("cats", "train", "hung", failure=hung) is True
    assert ex.workers[("cats", "train")].stop_requested_at == T0
    assert loop.timers() == [T0 + GRACE]  # the SIGKILL, on the clock
    assert ex.stop("cats", "train", "again") is True  # a second stop sends nothing more
    assert loop.timers() == [T0 + GRACE]
    loop.advance(GRACE)
    run_until(loop, lambda: seen.exits, "the SIGKILLed worker's exit")
    # the failure it was stopped for, not one read from a SIGKILL
    assert seen.exits == [("cats", "train", -signal.SIGKILL, hung)]
    assert "==== oddaemon: stopping train: hung: no new step for 60s\n" in open(log_path).read()
    assert ex.stop("cats", "train", "gone") is False  # nothing left to stop


def test_a_stop_with_save_sends_sigusr2_then_escalates_and_a_plain_stop_meanwhile_terminates(tmp_path, executor):
    """oddaemon finish: SIGUSR2 (the worker saves and exits); one that does not is stopped as on a
    cancel after FINISH_GRACE_SECONDS; a cancel or the daemon stopping meanwhile sends SIGTERM at once."""
    from oddaemon.service.local_executor import FINISH_GRACE_SECONDS  # noqa: PLC0415

    loop, ex, seen = executor
    code = ("import signal, sys, time\n"
            "signal.signal(signal.SIGUSR2, lambda *a: print('usr2', flush=True))\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(143))\n"
            "print('ready', flush=True)\n"
            "time.sleep(120)\n")
    ex.start(launch(tmp_path, code))
    log_path = ex.log_path("cats", "train")
    run_until(loop, lambda: "ready" in open(log_path).read(), "the worker to start")
    assert ex.stop("cats", "train", "finished by request", save=True) is True
    run_until(loop, lambda: "usr2" in open(log_path).read(), "the worker to get SIGUSR2")
    assert "==== oddaemon: finished by request: SIGUSR2 (save a checkpoint, exit)\n" in open(log_path).read()
    assert loop.timers() == [T0 + FINISH_GRACE_SECONDS] and not seen.exits
    assert ex.stop("cats", "train", "finished again", save=True) is True and loop.timers() == [
        T0 + FINISH_GRACE_SECONDS]  # (once)
    loop.advance(FINISH_GRACE_SECONDS)  # it never saved: SIGTERM now, SIGKILL after the grace
    run_until(loop, lambda: seen.exits, "the worker's exit on SIGTERM")
    assert seen.exits == [("cats", "train", 143, seen.exits[0][3])]
    # a plain stop during a finish: SIGTERM at once
    ex.start(launch(tmp_path, code, name="dogs"))
    dogs = ex.log_path("dogs", "train")
    run_until(loop, lambda: "ready" in open(dogs).read(), "the second worker to start")
    ex.stop("dogs", "train", "finished by request", save=True)
    run_until(loop, lambda: "usr2" in open(dogs).read(), "SIGUSR2")
    ex.stop("dogs", "train", "daemon stopping")
    run_until(loop, lambda: len(seen.exits) == 2, "its exit on SIGTERM")
    assert seen.exits[1][:3] == ("dogs", "train", 143)
