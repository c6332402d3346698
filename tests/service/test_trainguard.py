"""The train guard (``service/trainguard.py``) on the fake loop and the manual clock: a worker
silent for its hang timeout is reported hung, once; activity and new train events push the
deadline on; a NaN loss is reported at the step its run of bad losses began; 0 never times out."""

from __future__ import annotations

import math

from oddaemon.service.trainguard import TrainGuard
from tests.support.fakes import FakeLoop, ManualClock

T0 = 1_700_000_000.0


class Progress:
    """The parts of ``TrainProgress`` the guard reads."""

    def __init__(self, updated_at, step=None, scalars=None, loss_history=()):
        self.updated_at, self.step = updated_at, step
        self.scalars = scalars or {}
        self.loss_history = list(loss_history)


def guard():
    loop = FakeLoop(ManualClock(T0))
    failures = []
    return loop, TrainGuard(loop, loop.clock, lambda name, failure: failures.append((name, loop.clock(), failure))), failures


def test_a_silent_worker_is_hung_at_its_timeout_and_reported_once():
    loop, g, failures = guard()
    g.begin("cats", 60.0)
    loop.advance(59.0)
    assert failures == []
    loop.advance(1.0)
    assert [(name, at, f.kind) for name, at, f in failures] == [("cats", T0 + 60, "hung")]
    assert "no new step, checkpoint or log line for 60s" in failures[0][2].message
    loop.advance(600.0)
    assert len(failures) == 1  # flagged once: the daemon stops it, its exit carries the failure
    assert loop.timers() == []  # nothing left to watch: no timer


def test_activity_pushes_the_deadline_on():
    loop, g, failures = guard()
    g.begin("cats", 60.0)
    loop.advance(45.0)
    g.activity("cats")  # a log line at T0+45
    loop.advance(59.0)
    assert failures == []
    loop.advance(1.0)
    assert [(name, at) for name, at, _ in failures] == [("cats", T0 + 105)]


def test_new_train_events_are_activity_but_event_files_of_an_earlier_run_are_not():
    loop, g, failures = guard()
    loop.advance(100.0)
    g.begin("cats", 60.0)  # started at T0+100
    loop.advance(30.0)
    g.progress("cats", Progress(updated_at=T0 + 10))  # written before this run began: not activity
    loop.advance(30.0)
    assert [(name, at) for name, at, _ in failures] == [("cats", T0 + 160)]
    g.end("cats")
    g.begin("cats", 60.0)  # a new attempt at T0+160
    loop.advance(30.0)
    g.progress("cats", Progress(updated_at=T0 + 189, step=5, scalars={"Loss/total_loss": 0.5}))
    loop.advance(59.0)
    assert len(failures) == 1
    loop.advance(1.0)
    assert [(name, at) for name, at, _ in failures] == [("cats", T0 + 160), ("cats", T0 + 250)]


def test_a_nan_loss_is_reported_at_the_step_its_run_of_bad_losses_began():
    loop, g, failures = guard()
    g.begin("cats", 0)
    history = [(10, 0.9), (20, 0.7), (30, math.nan), (40, math.inf)]
    g.progress("cats", Progress(updated_at=T0 + 1, step=40, scalars={"Loss/total_loss": math.inf,
                                                                       "Loss/localization_loss": math.nan},
                                loss_history=history))
    assert [(name, f.kind, f.step) for name, _, f in failures] == [("cats", "nan", 30)]
    assert "loss became NaN at step 30 (Loss/total_loss)" in failures[0][2].message
    g.progress("cats", Progress(updated_at=T0 + 2, step=50, scalars={"Loss/total_loss": math.nan}))
    assert len(failures) == 1


def test_a_timeout_of_0_never_times_out_and_a_guard_of_an_ended_worker_is_silent():
    loop, g, failures = guard()
    g.begin("never", 0)
    g.begin("short", 40.0)
    g.end("short")
    loop.advance(100_000.0)
    assert failures == []
