"""What the daemon tells the world (``service/announce.py``), from a stand-in for the daemon on the
fake loop and the manual clock: the metrics snapshot (coalesced, with its counters, finished jobs
leaving it when they age out) and the sd_notify datagrams (READY=1 with STATUS=, the heartbeat's
fresh STATUS=, STOPPING=1)."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import pytest

from oddaemon.core.config import Config
from oddaemon.core.evalbook import EvalBook, EvalPolicy
from oddaemon.core.events import StateChanged
from oddaemon.core.jobs import Job
from oddaemon.core.jobspec import JobSpec, PipelineEdits
from oddaemon.core.states import JobState
from oddaemon.core.views import job_view
from oddaemon.service.announce import Announcer
from tests.support.fakes import FakeLoop, ManualClock
from tests.support.prom import free_port

MAP = "DetectionBoxes_Precision/mAP"
T0 = 1_700_000_000.0


class Progress:
    def __init__(self, step: int):
        self.step = step

    def view(self) -> dict:
        return {"step": self.step, "target_steps": 1000, "progress": self.step / 1000, "steps_per_second": None,
                "eta_seconds": None, "losses": {}, "learning_rate": None, "updated_at": None, "loss_history": [],
                "eval_by_step": {}}


def make_job(name: str, seq: int, state: JobState, **changes) -> Job:
    spec = JobSpec(name=name, pipeline_config=f"/srv/{name}.config", model_dir=f"/srv/{name}",
                   pipeline=PipelineEdits(num_steps=1000))
    return Job(name=name, seq=seq, spec=spec, wants=1, state=state, submitted_at=T0, **changes)


@dataclass
class Daemonish:
    """What ``Announcer`` reads of the daemon (``announce.Announced``), set by each test."""

    config: Config
    loop: FakeLoop
    clock: ManualClock
    started_at: float = T0
    rejected_total: int = 0
    jobs: list[tuple[Job, int | None, EvalBook | None]] = field(default_factory=list)
    serving_now: bool = True
    executor: object = None  # no cgroups: the snapshot says backend "none"

    def views(self, shown: int = 20) -> list[dict]:
        return [job_view(job, Progress(step) if step is not None else None, None, "", book, shown)
                for job, step, book in self.jobs]

    def gpus(self) -> dict:
        return {"total": [0, 1], "free": [1], "holders": {0: ("cats", "train")}}

    def serving(self) -> bool:
        return self.serving_now


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket standing for systemd's notification socket, named by NOTIFY_SOCKET."""
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def received(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def nothing_more(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        sock.recv(4096)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(5)
    return False


def daemonish(tmp_path, metrics_listen: str = "", **config) -> Daemonish:
    clock = ManualClock(T0 + 60)
    return Daemonish(Config(path=str(tmp_path / "oddaemon.toml"), metrics_listen=metrics_listen, dbus_bus="none",
                            **config), FakeLoop(clock), clock)


def test_the_snapshot_holds_the_jobs_by_state_the_gpus_and_the_counters(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = daemonish(tmp_path)
    d.rejected_total = 4
    d.jobs = [(make_job("cats", 1, JobState.RUNNING, gpus=(0,), started_at=T0), 250, None),
              (make_job("dogs", 2, JobState.QUEUED), None, None)]
    announcer = Announcer(d)
    announcer.state_changed(StateChanged("cats", "running", "backoff", "exit status 1"))
    announcer.state_changed(StateChanged("cats", "backoff", "running", "restarted"))
    announcer.checkpoint_evaluated("cats", object())
    announcer.publish_snapshot()
    snap = announcer.snapshot
    assert snap["time"] == T0 + 60 and snap["started_at"] == T0
    assert (snap["jobs_by_state"]["running"], snap["jobs_by_state"]["queued"], snap["queue_length"]) == (1, 1, 1)
    assert snap["counters"] == {"rejected_files": 4, "worker_restarts": 1, "checkpoints_evaluated": 1}
    assert [(v["name"], v["step"]) for v in snap["jobs"]] == [("cats", 250), ("dogs", None)]
    assert snap["gpus"]["holders"] == {0: ("cats", "train")}


def test_a_burst_of_changes_becomes_one_snapshot_a_second_later_and_a_finished_job_ages_out(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    d = daemonish(tmp_path, metrics_listen=f"127.0.0.1:{free_port()}", metrics_finished_max_age_seconds=100.0)
    d.jobs = [(make_job("cats", 1, JobState.RUNNING, started_at=T0), 10, None)]
    announcer = Announcer(d)
    announcer.start_metrics()  # a real endpoint: snapshots are only built while one serves
    try:
        first = announcer.snapshot
        assert [v["name"] for v in first["jobs"]] == ["cats"]
        d.jobs = [(make_job("cats", 1, JobState.SUCCEEDED, started_at=T0, finished_at=T0 + 70), 1000, None)]
        d.clock.set(T0 + 70)
        for _ in range(5):
            announcer.snapshot_soon()
        assert d.loop.timers() == [T0 + 71]  # one timer, a second on
        assert announcer.snapshot is first
        d.loop.advance(1.0)
        published = announcer.snapshot
        assert published is not first and published["time"] == T0 + 71
        assert [(v["name"], v["state"]) for v in published["jobs"]] == [("cats", "succeeded")]
        # its expiry: finished at T0+70, kept 100 s, dropped by the snapshot built after that
        assert d.loop.timers() == [T0 + 70 + 100 + 1]
        d.loop.advance(100.0)
        assert announcer.snapshot is published
        d.loop.advance(1.0)  # the expiry asks for a snapshot a second later
        assert announcer.snapshot["jobs"] == []
        assert announcer.snapshot["jobs_by_state"]["succeeded"] == 1
    finally:
        announcer.stop("stopping 0 worker(s)")
    assert announcer.metrics_server is None


def test_ready_sends_the_status_line_and_the_heartbeat_keeps_it_fresh(tmp_path, notify_socket):
    d = daemonish(tmp_path)
    book = EvalBook(EvalPolicy())
    book.add(1, "/pins/ckpt-1", T0)
    book.start(1, T0 + 1)
    book.finish(1, 200, {MAP: 0.4125}, T0 + 2)
    d.jobs = [(make_job("cats", 1, JobState.RUNNING, gpus=(0,), started_at=T0), 250, book),
              (make_job("dogs", 2, JobState.QUEUED), None, None)]
    announcer = Announcer(d)
    assert "NOTIFY_SOCKET" not in os.environ  # taken from the environment: workers never inherit it
    announcer.ready()
    assert received(notify_socket) == "READY=1\nSTATUS=1 training, 1 queued; GPUs 1/2; cats step 250 mAP 0.412"
    assert d.loop.timers() == [T0 + 60 + 10.0]  # the heartbeat, every 10 s
    d.jobs[0] = (d.jobs[0][0], 300, book)
    d.loop.advance(10.0)
    assert received(notify_socket) == "STATUS=1 training, 1 queued; GPUs 1/2; cats step 300 mAP 0.412"
    d.loop.advance(10.0)  # nothing changed: no datagram
    assert nothing_more(notify_socket)
    announcer.stop("stopping 1 worker(s)")
    assert received(notify_socket) == "STOPPING=1\nSTATUS=stopping 1 worker(s)"


def test_a_state_change_sends_the_new_status_only_once_the_daemon_serves(tmp_path, notify_socket):
    d = daemonish(tmp_path)
    d.jobs = [(make_job("cats", 1, JobState.QUEUED), None, None)]
    d.serving_now = False
    announcer = Announcer(d)
    announcer.state_changed(StateChanged("cats", "submitted", "queued", "queued"))
    assert nothing_more(notify_socket)  # start-up: READY=1 says it all
    d.serving_now = True
    d.jobs = [(make_job("cats", 1, JobState.RUNNING, started_at=T0), None, None)]
    announcer.state_changed(StateChanged("cats", "queued", "running", "started"))
    assert received(notify_socket) == "STATUS=1 training; GPUs 1/2; cats"
    announcer.state_changed(StateChanged("cats", "running", "running", "again"))  # the same line: not sent again
    assert nothing_more(notify_socket)
