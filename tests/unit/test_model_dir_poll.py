"""The pure poll-diff of a model_dir (core/model_dir_poll.py): which listings are a change, a
model_dir that cannot be listed for a while, the first poll, and the interval "auto" gives."""

from __future__ import annotations

import pytest

from oddaemon.core import model_dir_poll as poll
from oddaemon.core.config import parse_config
from oddaemon.core.errors import ConfigError
from oddaemon.core.model_dir_poll import Changes, changes, effective_interval, kept, seen

BASE = ["pipeline.config", "train", "eval", ".oddaemon", "ckpt-1.index", "ckpt-1.data-00000-of-00001", "checkpoint"]
EVENTS = [("train/events.out.tfevents.1", 100, 5)]


def test_only_checkpoint_names_count_in_model_dir():
    s = seen(BASE + ["notes.txt", "best"], EVENTS)
    assert s.checkpoint_names == {"ckpt-1.index", "ckpt-1.data-00000-of-00001", "checkpoint"}
    assert s.listed


def test_the_first_poll_only_takes_its_bearings():
    assert changes(None, seen(BASE, EVENTS)) == Changes()
    assert not changes(None, seen(BASE, EVENTS))


def test_an_unchanged_listing_is_no_change():
    assert not changes(seen(BASE, EVENTS), seen(list(reversed(BASE)), EVENTS))


def test_a_new_checkpoint_or_a_deleted_one_changes_the_checkpoints_only():
    before = seen(BASE, EVENTS)
    new = seen(BASE + ["ckpt-2.index", "ckpt-2.data-00000-of-00001"], EVENTS)
    assert changes(before, new) == Changes(checkpoints=True)
    gone = seen([n for n in BASE if not n.startswith("ckpt-1")], EVENTS)
    assert changes(before, gone) == Changes(checkpoints=True)
    temp = seen(BASE + ["ckpt-2_temp"], EVENTS)  # a save under way: the next poll sees it complete
    assert changes(before, temp).checkpoints and changes(temp, new).checkpoints


def test_an_event_file_that_grows_or_appears_is_progress():
    before = seen(BASE, EVENTS)
    assert changes(before, seen(BASE, [("train/events.out.tfevents.1", 180, 9)])) == Changes(progress=True)
    more = EVENTS + [("eval/events.out.tfevents.2", 40, 10)]
    assert changes(before, seen(BASE, more)) == Changes(progress=True)
    both = seen(BASE + ["ckpt-2.index"], more)
    assert changes(before, both) == Changes(checkpoints=True, progress=True)


def test_a_model_dir_that_cannot_be_listed_changes_nothing_until_it_can_again():
    first = seen(BASE, EVENTS)
    blind = seen(None)
    assert blind is poll.NOTHING and not blind.listed
    assert not changes(first, blind)
    kept_one = kept(first, blind)
    assert kept_one is first  # the next listing compares with the last one that listed
    later = seen(BASE + ["ckpt-2.index", "ckpt-2.data-00000-of-00001"], EVENTS)
    assert changes(kept_one, later) == Changes(checkpoints=True)
    assert kept(first, later) is later


def test_a_model_dir_listed_only_from_the_second_poll_on_is_read_in_full():
    start = kept(None, seen(None))  # not there yet at the watch's start (the watcher creates it)
    assert start is poll.NOTHING
    assert changes(start, seen(BASE, EVENTS)) == Changes(checkpoints=True, progress=True)


def test_auto_polls_slurm_jobs_and_not_local_ones():
    assert effective_interval(None, "slurm", 2.0) == 2.0
    assert effective_interval(None, "local", 2.0) == 0.0
    assert effective_interval(0.0, "slurm", 2.0) == 0.0
    assert effective_interval(0.5, "local", 2.0) == 0.5


def test_the_daemon_setting_is_validated_with_its_key_named(tmp_path):
    path = str(tmp_path / "oddaemon.toml")
    assert parse_config("", path).model_dir_poll_interval() == 0.0
    assert parse_config('[cluster]\nbackend = "slurm"\n', path).model_dir_poll_interval() == 2.0
    assert parse_config('[cluster]\nbackend = "slurm"\nmodel_dir_poll_seconds = 0\n', path).model_dir_poll_interval() == 0
    assert parse_config("[cluster]\nmodel_dir_poll_seconds = 0.5\n", path).model_dir_poll_interval() == 0.5
    assert parse_config('[cluster]\nmodel_dir_poll_seconds = "auto"\n', path).model_dir_poll_seconds is None
    for bad in ("0.1", '"often"', "-1", "true", "nan"):
        with pytest.raises(ConfigError) as caught:
            parse_config(f"[cluster]\nmodel_dir_poll_seconds = {bad}\n", path)
        assert "[cluster] model_dir_poll_seconds" in str(caught.value), bad
