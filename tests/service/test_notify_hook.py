"""What the daemon notifies (service/notify_hook.py), on the fake loop and the manual clock: the
events of transitions and evaluations, stalls and an evaluator behind once per episode, each
outcome into the job's history and the counts. Deliveries are recorded, not sent."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import pytest

from oddaemon.core import notifications as nt
from oddaemon.core import scheduler as sch
from oddaemon.core.failures import Failure
from oddaemon.core.jobs import Job
from oddaemon.core.jobspec import EvalOptions, JobSpec, NotifyOptions
from oddaemon.core.states import JobState
from oddaemon.service.notify_hook import NotifyHook
from tests.support.fakes import FakeLoop, ManualClock

T0 = 1_700_000_000.0
TEAM = nt.Target("team", url="http://127.0.0.1:9/x")


class Recorder:
    def __init__(self):
        self.sent: list[tuple[str, str, str, dict]] = []

    def send(self, job, event, target, data):
        self.sent.append((job, event, target.name, json.loads(data)))

    def configure(self, settings):
        pass

    def close(self):
        pass


@dataclass
class Book:
    waiting: int = 0
    skipped: int = 0
    best_n: int | None = None
    best_value: float | None = None
    steps: dict = field(default_factory=dict)

    def pending_count(self):
        return self.waiting

    def counts(self):
        return {"skipped": self.skipped}

    def best(self):
        return Record(self.best_n, self.steps.get(self.best_n)) if self.best_n is not None else None


@dataclass
class Record:
    n: int
    step: int | None


@dataclass
class Progress:
    step: int | None = None


class Rig:
    def __init__(self, events, stalled_after=60.0, **settings):
        self.loop = FakeLoop(ManualClock(T0))
        spec = JobSpec("cats", "/p", "/m/cats", eval=EvalOptions(max_behind=2),
                       notify=NotifyOptions(events=tuple(events), targets=("team",),
                                            stalled_after_seconds=stalled_after))
        self.jobs = {"cats": Job("cats", 1, spec, 0, JobState.RUNNING, attempt=1, started_at=T0)}
        self.progress = Progress()
        self.book = Book()
        self.dispatched: list[sch.Event] = []
        self.counts: list[dict] = []
        self.hook = NotifyHook(nt.Settings(targets=(TEAM,), **settings), self.loop, self.loop.clock,
                               lambda: self.jobs, lambda name: self.progress, lambda name: self.book,
                               self.dispatched.append, self.counts.append)
        self.hook.sender.close()
        self.hook.sender = self.sent = Recorder()

    def events(self, kind: str) -> list[dict]:
        return [body for _, event, _, body in self.sent.sent if event == kind]


@pytest.fixture
def rig():
    made = []

    def make(*args, **kw):
        made.append(Rig(*args, **kw))
        return made[-1]
    yield make
    for r in made:
        r.hook.close()


def test_stalled_once_per_episode_again_after_the_step_moved_or_a_restart(rig):
    r = rig(["stalled"], stalled_after=60.0)
    r.progress.step = 100
    r.loop.advance(59)
    assert r.events("stalled") == []
    r.loop.advance(2)  # 61 s since the start without a step
    assert [(e["step"], round(e["seconds"])) for e in r.events("stalled")] == [(100, 60)]
    r.loop.advance(600)  # still stalled: checked many times, told once
    assert len(r.events("stalled")) == 1
    r.progress.step = 101
    r.loop.advance(30)
    assert len(r.events("stalled")) == 1
    r.loop.advance(40)  # 60 s after the step moved
    assert [e["step"] for e in r.events("stalled")] == [100, 101]
    r.jobs["cats"] = replace(r.jobs["cats"], attempt=2, started_at=r.loop.clock())  # restarted
    r.loop.advance(30)
    assert len(r.events("stalled")) == 2
    r.loop.advance(35)
    assert len(r.events("stalled")) == 3
    r.jobs["cats"] = replace(r.jobs["cats"], state=JobState.EVALUATING)
    r.loop.advance(600)
    assert len(r.events("stalled")) == 3  # only a running job stalls


def test_evaluator_behind_once_until_it_caught_up(rig):
    r = rig(["evaluator_behind"])
    r.book.waiting = 2
    r.loop.advance(10)
    assert r.events("evaluator_behind") == []  # max_behind = 2 waiting is not behind
    r.book.waiting = 3
    r.loop.advance(10)
    assert [(e["waiting"], e["skipped"]) for e in r.events("evaluator_behind")] == [(3, 0)]
    r.book.waiting = 1
    r.loop.advance(10)
    r.book.waiting = 5
    r.loop.advance(10)
    assert len(r.events("evaluator_behind")) == 1  # it never caught up in between
    r.book.waiting = 0
    r.loop.advance(10)
    r.book.skipped = 4  # skip_to_newest skipped (or the pin budget released) 4 checkpoints
    r.book.waiting = 1
    r.loop.advance(10)
    assert [(e["waiting"], e["skipped"]) for e in r.events("evaluator_behind")] == [(3, 0), (1, 4)]


def test_new_best_succeeded_and_failed(rig):
    r = rig(["new_best", "succeeded", "failed"])
    r.book.best_n, r.book.best_value, r.book.steps = 2, 0.25, {2: 500}
    r.hook.checkpoint_evaluated("cats", Record(2, 500))
    r.hook.checkpoint_evaluated("cats", Record(3, 1000))  # evaluated, not the best: nothing
    r.book.best_n, r.book.best_value, r.book.steps[4] = 4, 0.3, 1500
    r.hook.checkpoint_evaluated("cats", Record(4, 1500))
    assert [(e["step"], e["value"], e.get("previous")) for e in r.events("new_best")] == [
        (500, 0.25, None), (1500, 0.3, 0.25)]
    r.jobs["cats"] = replace(r.jobs["cats"], state=JobState.SUCCEEDED)
    r.hook.state_changed(sch.StateChanged("cats", "evaluating", "succeeded", "training finished"))
    assert [(e["reason"], e["value"], e["step"]) for e in r.events("succeeded")] == [("training finished", 0.3, 1500)]
    r.jobs["cats"] = replace(r.jobs["cats"], state=JobState.FAILED, failure=Failure("nan", "loss became NaN"))
    r.hook.state_changed(sch.StateChanged("cats", "running", "failed", "loss became NaN at step 7"))
    r.hook.state_changed(sch.StateChanged("cats", "running", "cancelled", "cancelled by request"))
    assert [(e["reason"], e["failure_kind"]) for e in r.events("failed")] == [("loss became NaN at step 7", "nan")]
    assert [event for _, event, _, _ in r.sent.sent] == ["new_best", "new_best", "succeeded", "failed"]


def test_events_the_job_did_not_choose_are_not_sent(rig):
    r = rig(["failed"])
    r.hook.state_changed(sch.StateChanged("cats", "evaluating", "succeeded", "done"))
    r.progress.step = 1
    r.book.waiting = 10
    r.loop.advance(3600)
    assert r.sent.sent == []


def test_an_outcome_becomes_a_history_entry_and_a_count(rig):
    r = rig(["failed"])
    r.hook.outcome(nt.Outcome("cats", "failed", "team", "sent"))
    r.hook.outcome(nt.Outcome("cats", "failed", "team", "failed", 4, "HTTP 500"))
    r.hook.outcome(nt.Outcome("gone", "failed", "team", "sent"))  # a job no longer known: counted only
    assert r.dispatched == [sch.NotificationRecorded("cats", "notification failed to team: sent"),
                            sch.NotificationRecorded("cats", "notification failed to team: failed after 4 tries "
                                                             "(HTTP 500)")]
    assert r.counts[-1] == {("team", "sent"): 2, ("team", "failed"): 1}
    assert r.counts[0] is not r.counts[-1]  # a new dict each time: the metrics thread reads the old one


def test_a_target_removed_on_reload_is_recorded_as_failed(rig):
    r = rig(["failed"])
    r.hook.configure(nt.Settings(targets=()))
    r.jobs["cats"] = replace(r.jobs["cats"], state=JobState.FAILED)
    r.hook.state_changed(sch.StateChanged("cats", "running", "failed", "exit status 1"))
    assert r.sent.sent == []
    assert r.dispatched == [sch.NotificationRecorded(
        "cats", "notification failed to team: failed unsent (no such target in the daemon configuration any more)")]
