"""Event files read on after a restart: a reader made from a saved state reads only the new bytes
and ends where one reader that read everything ends; a file that is no longer the one that was read
(replaced, cut short, rewritten in place) is read from the start. Then the same for the daemon's
``TrainProgress`` and its saved file under the state directory."""

from __future__ import annotations

import json
import math
import os

import pytest

from oddaemon.core import layout
from oddaemon.core import scheduler as sch
from oddaemon.formats.tfevents import EventDirReader, EventFileReader
from oddaemon.formats.tfevents_writer import encode_image_event, encode_scalar_event
from oddaemon.formats.tfrecord import encode_record
from oddaemon.service.job_watch import SAVE_SECONDS
from oddaemon.service.progress import TrainProgress
from tests.support.inprocess import job_spec, new_loop, start_daemon, stop_daemon

EVENTS = "events.out.tfevents.1600000001.host.1.0.v2"


def records(*steps, tag="Loss/total_loss"):
    return b"".join(encode_record(encode_scalar_event(s, {tag: float(s), "learning_rate": 0.5 / (s + 1)},
                                                      wall_time=1000.0 + s)) for s in steps)


def images(step):
    return encode_record(encode_image_event(step, "train_input_images", [os.urandom(3000)] * 3, 64, 64, 1.0))


def append(path, data):
    with open(path, "ab") as f:
        f.write(data)


def steps(events):
    return [e.step for e in events]


# ------------------------------------------------------------------------------------- one file

def test_a_reader_from_a_saved_state_reads_only_the_new_bytes(tmp_path):
    path = str(tmp_path / EVENTS)
    with open(path, "wb") as f:
        f.write(records(1, 2) + images(2) + records(3))
    first = EventFileReader(path)
    assert steps(first.read_new()) == [1, 2, 3]
    saved = json.loads(json.dumps(first.state()))  # as it goes through the saved file
    new = records(4) + images(4) + records(5)
    append(path, new)
    resumed = EventFileReader(path, saved=saved)
    assert resumed.resumed and resumed.offset == first.offset
    assert steps(resumed.read_new()) == [4, 5]
    assert resumed.bytes_read == len(new)
    assert resumed.offset == os.path.getsize(path) and resumed.read_new() == []


@pytest.mark.parametrize("change", ["replaced", "truncated", "rewritten in place", "gone", "bad state"])
def test_a_file_that_is_no_longer_the_one_read_is_read_from_the_start(tmp_path, change):
    path = str(tmp_path / EVENTS)
    with open(path, "wb") as f:
        f.write(records(1, 2, 3))
    first = EventFileReader(path)
    first.read_new()
    saved = first.state()
    if change == "replaced":  # a new inode under the name, longer than the saved offset
        with open(path + ".new", "wb") as f:
            f.write(records(7, 8, 9, 10))
        os.replace(path + ".new", path)
        expected = [7, 8, 9, 10]
    elif change == "truncated":
        os.truncate(path, first.offset - 5)
        expected = [1, 2]
    elif change == "rewritten in place":  # the same inode and at least as long, other bytes before the offset
        with open(path, "r+b") as f:
            f.write(records(4, 5, 6, 7))
        expected = [4, 5, 6, 7]
    elif change == "gone":
        os.unlink(path)
        expected = []
    else:
        saved = {"offset": "x"}
        expected = [1, 2, 3]
    reader = EventFileReader(path, saved=saved)
    assert not reader.resumed and reader.offset == 0
    assert steps(reader.read_new()) == expected


def test_a_reader_saved_inside_a_damaged_stretch_goes_on_looking_and_counts_it_once(tmp_path):
    path = str(tmp_path / EVENTS)
    first_part = records(1, 2)
    cut = len(records(1)) + 5  # inside record 2's header, then a hole of zeros
    with open(path, "wb") as f:
        f.write(first_part[:cut] + bytes(len(first_part) - cut) + bytes(40))
    first = EventFileReader(path)
    assert steps(first.read_new()) == [1] and first.corrupt_records == 1
    resumed = EventFileReader(path, saved=first.state())
    append(path, records(3, 4))
    assert steps(resumed.read_new()) == [3, 4]
    assert resumed.corrupt_records == 1 and "length CRC" in resumed.last_error


# ------------------------------------------------------------------------------------- a directory

def test_a_directory_reader_goes_on_per_file_and_finds_files_created_since(tmp_path):
    (tmp_path / "sub").mkdir()
    one, two = str(tmp_path / EVENTS), str(tmp_path / "sub" / EVENTS.replace("1600000001", "1600000002"))
    with open(one, "wb") as f:
        f.write(records(1, 2))
    with open(two, "wb") as f:
        f.write(records(10))
    first = EventDirReader(str(tmp_path), subdirs=True)
    assert steps(first.read_new()) == [1, 2, 10]
    saved = json.loads(json.dumps(first.state()))
    assert sorted(saved) == [EVENTS, os.path.join("sub", os.path.basename(two))]
    append(one, records(3))
    three = str(tmp_path / EVENTS.replace("1600000001", "1600000003"))
    with open(three, "wb") as f:
        f.write(records(20))
    resumed = EventDirReader(str(tmp_path), subdirs=True, saved=saved)
    assert resumed.resumed
    assert steps(resumed.read_new()) == [3, 20]
    assert resumed.bytes_read == len(records(3)) + len(records(20))


def test_saved_names_outside_the_directory_are_ignored(tmp_path):
    reader = EventDirReader(str(tmp_path / "train"), saved={f"../../{EVENTS}": {"offset": 0, "dev": 1, "ino": 1},
                                                            "/etc/passwd": {}, "sub/../x": {}})
    assert not reader.resumed and reader.state() == {} and reader.read_new() == []


# ------------------------------------------------------------------------------ TrainProgress, saved

def write_job_events(model_dir, train_steps, eval_steps, nan_from=None):
    os.makedirs(os.path.join(model_dir, "train"), exist_ok=True)
    os.makedirs(os.path.join(model_dir, "eval"), exist_ok=True)
    data = b""
    for s in train_steps:
        loss = math.nan if nan_from is not None and s >= nan_from else 1.0 / s
        data += encode_record(encode_scalar_event(s, {"Loss/total_loss": loss, "learning_rate": 0.1,
                                                      "other/tag": 3.0}, wall_time=100.0 + s)) + images(s)
    append(os.path.join(model_dir, "train", EVENTS), data)
    append(os.path.join(model_dir, "eval", EVENTS), b"".join(
        encode_record(encode_scalar_event(s, {"DetectionBoxes_Precision/mAP": s / 100}, wall_time=1.0))
        for s in eval_steps))


def same_view(a: TrainProgress, b: TrainProgress) -> None:
    assert json.dumps(a.view(), sort_keys=True) == json.dumps(b.view(), sort_keys=True)
    assert a.scalars.keys() == b.scalars.keys()


def test_a_progress_from_its_saved_state_reads_only_the_new_bytes_and_ends_as_one_that_read_all(tmp_path):
    model_dir, state = str(tmp_path / "model"), str(tmp_path / "state" / "progress" / "cats.json")
    write_job_events(model_dir, range(1, 40), [10, 20])
    first = TrainProgress(model_dir, 100, state)
    first.refresh()
    assert first.unsaved
    first.save()
    assert not first.unsaved and os.path.exists(state)
    write_job_events(model_dir, range(40, 61), [30], nan_from=55)
    new_bytes = os.path.getsize(os.path.join(model_dir, "train", EVENTS)) + os.path.getsize(
        os.path.join(model_dir, "eval", EVENTS)) - first.reader.bytes_read - first.eval_reader.bytes_read
    resumed = TrainProgress(model_dir, 100, state)
    assert resumed.step == 39 and resumed.reader.resumed and not resumed.unsaved
    resumed.refresh()
    assert resumed.reader.bytes_read + resumed.eval_reader.bytes_read == new_bytes
    everything = TrainProgress(model_dir, 100)
    everything.refresh()
    same_view(resumed, everything)
    assert resumed.step == 60 and math.isnan(resumed.scalars["Loss/total_loss"])
    assert "other/tag" not in resumed.scalars  # only what the views and the guard use is decoded
    assert sorted(resumed.eval_by_step) == [10, 20, 30]


def test_a_saved_state_of_another_model_dir_or_a_bad_one_is_not_used(tmp_path, caplog):
    model_dir, state = str(tmp_path / "model"), str(tmp_path / "progress" / "cats.json")
    write_job_events(model_dir, range(1, 5), [])
    first = TrainProgress(model_dir, None, state)
    first.refresh()
    first.save()
    other = TrainProgress(str(tmp_path / "elsewhere"), None, state)
    assert not other.reader.resumed and other.step is None
    with open(state) as f:
        good = json.load(f)
    with open(state, "w") as f:
        f.write(json.dumps(good)[:-5])  # cut short
    broken = TrainProgress(model_dir, None, state)
    assert not broken.reader.resumed and "cannot read" in caplog.text
    broken.refresh()
    same_view(broken, first)
    with open(state, "w") as f:
        json.dump(dict(good, loss_history=[["x", 1.0]]), f)
    bad = TrainProgress(model_dir, None, state)
    assert not bad.reader.resumed and "bad saved state" in caplog.text
    bad.refresh()
    same_view(bad, first)


def test_when_the_saved_files_are_gone_their_view_goes_with_them(tmp_path):
    model_dir, state = str(tmp_path / "model"), str(tmp_path / "progress" / "cats.json")
    write_job_events(model_dir, range(1, 30), [10])
    first = TrainProgress(model_dir, None, state)
    first.refresh()
    first.save()
    os.unlink(os.path.join(model_dir, "train", EVENTS))  # a new training from scratch: new files
    write_job_events(model_dir, range(1, 4), [])
    fresh = TrainProgress(model_dir, None, state)
    fresh.refresh()
    assert fresh.step == 3 and [p[0] for p in fresh.loss_history] == [1, 2, 3]
    assert sorted(fresh.eval_by_step) == [10]  # the evaluation file is still the one read


def test_a_save_that_fails_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "progress").write_text("a file where the directory should be")
    progress = TrainProgress(str(tmp_path / "model"), None, str(tmp_path / "progress" / "cats.json"))
    write_job_events(str(tmp_path / "model"), [1], [])
    progress.refresh()
    progress.save()
    assert progress.unsaved and "not saved" in caplog.text and str(tmp_path / "progress") in caplog.text


# ------------------------------------------------------------------------------------ the daemon

def test_the_daemon_saves_read_offsets_and_a_restarted_daemon_goes_on_from_them(daemon_env):
    env, loop, made = daemon_env, new_loop(), []
    daemon = start_daemon(env, loop, made)
    model_dir, path = f"{env.models}/cats", layout.progress_file(env.state, "cats")
    train_file = os.path.join(model_dir, "train", EVENTS)
    try:
        daemon.dispatch(sch.Submit(job_spec(env)))
        write_job_events(model_dir, range(1, 11), [])
        daemon.watching.refresh("cats")
        assert not os.path.exists(path)  # not at every read: within SAVE_SECONDS
        daemon.watching.refresh("cats")
        loop.advance(SAVE_SECONDS)
        with open(path) as f:
            saved = json.load(f)
        assert saved["step"] == 10 and saved["model_dir"] == model_dir
        assert saved["train_files"][EVENTS]["offset"] == os.path.getsize(train_file)
        write_job_events(model_dir, range(11, 16), [])
    finally:
        stop_daemon(daemon)
    offset = saved["train_files"][EVENTS]["offset"]
    loop, made = new_loop(), []
    daemon = start_daemon(env, loop, made)
    try:
        progress = daemon.watching.progress["cats"]  # the job trains again: watched from its saved state
        progress.refresh()
        assert progress.reader.resumed and progress.step == 15
        assert progress.reader.bytes_read == os.path.getsize(train_file) - offset
    finally:
        stop_daemon(daemon)


def test_a_daemon_that_shuts_down_saves_what_it_had_read(daemon_env):
    env, loop, made = daemon_env, new_loop(), []
    daemon = start_daemon(env, loop, made)
    try:
        daemon.dispatch(sch.Submit(job_spec(env)))
        write_job_events(f"{env.models}/cats", range(1, 8), [5])
        daemon.view("cats")  # a status read the files (no save is due yet)
    finally:
        stop_daemon(daemon)
    with open(layout.progress_file(env.state, "cats")) as f:
        saved = json.load(f)
    assert saved["step"] == 7 and list(saved["eval_by_step"]) == ["5"]
