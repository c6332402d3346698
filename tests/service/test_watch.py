"""The model_dir watcher (``service/watch.py``) with real inotify on the fake loop: a burst of
checkpoint files is one re-listing, event-file writes are one progress read a quarter second on
the manual clock, a deleted model_dir is created and watched again, and a stopped watcher is silent."""

from __future__ import annotations

import os
import shutil

import pytest

from oddaemon.adapters.inotify import InotifyHub
from oddaemon.service.watch import PROGRESS_DELAY, ModelDirWatcher
from tests.support.fakes import FakeLoop, ManualClock

T0 = 1_700_000_000.0


class Calls:
    def __init__(self):
        self.checkpoints = 0
        self.progress = 0

    def counts(self) -> tuple[int, int]:
        return self.checkpoints, self.progress


@pytest.fixture
def watched(tmp_path):
    loop = FakeLoop(ManualClock(T0))
    hub = InotifyHub()
    loop.add_reader(hub.fileno(), hub.dispatch)
    calls = Calls()
    model_dir = str(tmp_path / "models" / "cats")
    watcher = ModelDirWatcher(hub, loop, model_dir, lambda: setattr(calls, "checkpoints", calls.checkpoints + 1),
                              lambda: setattr(calls, "progress", calls.progress + 1))
    watcher.start()
    yield loop, watcher, model_dir, calls
    watcher.stop()
    hub.close()


def deliver(loop: FakeLoop) -> None:
    """Read what inotify queued (the writes before this are all queued: the kernel queues an event
    in the write's own system call)."""
    assert loop.run_ready(5), "inotify reported nothing"


def touch(path: str, data: bytes = b"x") -> None:
    with open(path, "ab") as f:
        f.write(data)


def test_start_creates_the_model_dir_and_reads_it_once(watched):
    loop, _, model_dir, calls = watched
    assert os.path.isdir(model_dir)
    assert calls.counts() == (1, 1)
    assert loop.timers() == []


def test_a_burst_of_checkpoint_files_is_one_relisting_and_other_files_are_none(watched):
    loop, _, model_dir, calls = watched
    for name in ("ckpt-1.data-00000-of-00001", "ckpt-1.index", "checkpoint", "ckpt-2.data-00000-of-00001",
                 "ckpt-2.index", "checkpoint"):
        touch(os.path.join(model_dir, name))
    deliver(loop)
    assert calls.counts() == (1, 1)  # not yet: at the end of this loop turn
    assert loop.timers() == [T0]
    loop.advance(0)
    assert calls.counts() == (2, 1)
    touch(os.path.join(model_dir, "notes.txt"))
    deliver(loop)
    loop.advance(10)
    assert calls.counts() == (2, 1)


def test_event_file_writes_are_one_progress_read_a_quarter_second_later(watched):
    loop, _, model_dir, calls = watched
    os.mkdir(os.path.join(model_dir, "train"))
    deliver(loop)  # train/ created: now watched too
    events = os.path.join(model_dir, "train", "events.out.tfevents.1.host")
    for _ in range(5):
        touch(events, b"record")
    deliver(loop)
    assert loop.timers() == [T0 + PROGRESS_DELAY]
    loop.advance(PROGRESS_DELAY - 0.01)
    assert calls.progress == 1
    loop.advance(0.01)
    assert calls.counts() == (1, 2)


def test_a_deleted_model_dir_is_created_and_watched_again(watched):
    loop, _, model_dir, calls = watched
    touch(os.path.join(model_dir, "ckpt-1.index"))
    shutil.rmtree(model_dir)
    deliver(loop)
    loop.advance(0)
    assert os.path.isdir(model_dir)
    checkpoints, progress = calls.counts()
    assert progress == 2  # the rescan after watching it anew
    touch(os.path.join(model_dir, "ckpt-2.index"))  # written into the new directory: still seen
    deliver(loop)
    loop.advance(0)
    assert calls.checkpoints == checkpoints + 1


def test_a_stopped_watcher_is_silent(watched):
    loop, watcher, model_dir, calls = watched
    touch(os.path.join(model_dir, "ckpt-1.index"))
    deliver(loop)
    watcher.stop()
    assert loop.timers() == []  # its pending re-listing is removed with it
    touch(os.path.join(model_dir, "ckpt-2.index"))
    loop.run_ready(0.2)
    loop.advance(10)
    assert calls.counts() == (1, 1)
