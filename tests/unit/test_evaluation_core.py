"""Pure pieces of checkpoint evaluation: the completeness rule and the evaluation book."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from oddaemon.core.checkpoints import checkpoint_files, complete_checkpoints, is_checkpoint_event
from oddaemon.core.evalbook import DONE, FAILED, MISSED, PENDING, SKIPPED, EvalBook, EvalPolicy

MAP = "DetectionBoxes_Precision/mAP"


def tf_save_sequence(n: int, shards: int = 1) -> list[tuple[str, str]]:
    """TF's write order for one save, as (operation, name) steps."""
    steps = [("mkdir", f"ckpt-{n}_temp")]
    steps += [("add", f"ckpt-{n}.data-{i:05d}-of-{shards:05d}") for i in range(shards)]
    steps += [("add", f"ckpt-{n}.index"), ("rmdir", f"ckpt-{n}_temp"), ("add", "checkpoint")]
    return steps


def test_complete_only_after_the_temp_dir_is_gone():
    listing: set[str] = {"ckpt-1.index", "ckpt-1.data-00000-of-00001", "checkpoint", "train"}
    seen = []
    for op, name in tf_save_sequence(2):
        if op in ("mkdir", "add"):
            listing.add(name)
        else:
            listing.discard(name)
        seen.append(complete_checkpoints(listing))
    # mkdir, data, index (still temp dir), rmdir -> complete, state file
    assert seen == [[1], [1], [1], [1, 2], [1, 2]]


def test_every_data_shard_is_required():
    names = ["ckpt-3.index", "ckpt-3.data-00000-of-00002"]
    assert complete_checkpoints(names) == []
    assert complete_checkpoints(names + ["ckpt-3.data-00001-of-00002"]) == [3]
    assert checkpoint_files(names + ["ckpt-3.data-00001-of-00002", "ckpt-4.index"], 3) == [
        "ckpt-3.index", "ckpt-3.data-00000-of-00002", "ckpt-3.data-00001-of-00002"]


def test_other_files_and_prefixes_are_ignored():
    names = ["model.ckpt-5.index", "model.ckpt-5.data-00000-of-00001", "ckpt-7.index", "events.out.tfevents.1.x",
             "pipeline.config", "ckpt-x.index"]
    assert complete_checkpoints(names) == []
    assert is_checkpoint_event("ckpt-7.index") and is_checkpoint_event("checkpoint")
    assert is_checkpoint_event("ckpt-7_temp") and not is_checkpoint_event("pipeline.config")


@given(st.lists(st.integers(1, 30), min_size=1, max_size=8, unique=True), st.integers(1, 3))
def test_completeness_matches_the_write_order(saves, shards):
    listing: set[str] = set()
    for n in saves:
        for op, name in tf_save_sequence(n, shards):
            before = set(complete_checkpoints(listing))
            if op in ("mkdir", "add"):
                listing.add(name)
            else:
                listing.discard(name)
            after = set(complete_checkpoints(listing))
            assert (n in after) == (op == "rmdir" or n in before)
    assert complete_checkpoints(listing) == sorted(saves)


def book(**kw) -> EvalBook:
    return EvalBook(EvalPolicy(**kw))


def test_in_order_one_at_a_time_each_once():
    b = book()
    for n in (3, 1, 2):
        assert b.add(n, f"/pins/ckpt-{n}", now=float(n))
    assert not b.add(2, "/pins/ckpt-2", now=9.0)
    order = []
    while (c := b.next_due(now=10.0)) is not None:
        b.start(c.n, now=10.0)
        assert b.next_due(now=10.0) is None  # one at a time
        b.finish(c.n, step=c.n * 100, metrics={MAP: 0.1 * c.n}, now=11.0)
        order.append(c.n)
    assert order == [1, 2, 3] and b.drained()
    assert b.best().n == 3 and b.checkpoints[1].lag_seconds == 9.0


def test_failed_evaluation_is_retried_with_backoff_then_recorded_failed():
    b = book(max_attempts=3, backoff_base=5, backoff_cap=8)
    b.add(1, "p", 0.0)
    b.add(2, "q", 0.0)
    retry_times = []
    for attempt in range(3):
        now = 100.0 * attempt
        c = b.next_due(now)
        assert c.n == 1
        b.start(1, now)
        retried = b.fail(1, "boom", now)
        retry_times.append(b.checkpoints[1].retry_at - now if retried else None)
        if retried:
            assert b.next_due(now) is None  # waits for the retry, keeps the order
    assert retry_times == [5, 8, None]
    assert b.checkpoints[1].state == FAILED and b.checkpoints[1].error == "boom"
    assert b.next_due(300.0).n == 2  # training and the other checkpoints go on


def test_a_damaged_checkpoint_is_given_up_at_once_and_the_next_goes_on():
    b = book(max_attempts=3)
    b.add(1, "p", 0.0)
    b.add(2, "q", 0.0)
    b.start(1, 1.0)
    error = "tensorflow.python.framework.errors_impl.DataLossError: Unable to open table file p.index: not an sstable"
    assert b.fail(1, error, 2.0) is False
    assert b.checkpoints[1].state == FAILED and b.checkpoints[1].attempts == 1
    assert b.checkpoints[1].error == f"the checkpoint is damaged, not retried: {error}"
    assert b.next_due(2.0).n == 2


def test_interrupted_evaluation_counts_as_an_attempt():
    b = book()
    b.add(1, "p", 0.0)
    b.start(1, 1.0)
    assert b.interrupted(2.0, "evaluator died") == 1
    assert b.checkpoints[1].state == PENDING and b.checkpoints[1].attempts == 1


def test_skip_to_newest_when_behind_but_never_the_final_one():
    b = book(when_behind="skip_to_newest", max_behind=2)
    for n in range(1, 6):
        b.add(n, f"p{n}", 0.0)
    b.final_n = 3
    assert b.apply_skip_policy() == [1, 2, 4]
    assert [c.n for c in b.pending()] == [3, 5]
    assert b.counts()[SKIPPED] == 3
    assert "4 checkpoints behind" not in b.checkpoints[1].error and "behind" in b.checkpoints[1].error
    assert book(max_behind=1).apply_skip_policy() == []


@pytest.mark.parametrize("higher, values, best", [(True, [0.1, 0.3, 0.2], 2), (False, [0.5, 0.2, 0.3], 2),
                                                 (True, [0.0, 0.0, 0.0], 3), (False, [0.4, 0.2, 0.2], 3)])
def test_best_follows_direction(higher, values, best):
    b = book(metric="Loss/total_loss" if not higher else MAP, higher_is_better=higher)
    key = b.policy.metric
    for n, v in enumerate(values, start=1):
        b.add(n, f"p{n}", 0.0)
        b.start(n, 1.0)
        b.finish(n, n * 10, {key: v}, 2.0)
    assert b.best_n == best


def test_patience_and_min_delta():
    b = book(patience=2, min_delta=0.05)
    results = []
    for n, v in enumerate([0.30, 0.40, 0.43, 0.44], start=1):
        b.add(n, f"p{n}", 0.0)
        b.start(n, 0.0)
        results.append(b.finish(n, n * 100, {MAP: v}, 1.0))
    assert [r.improved for r in results] == [True, True, True, True]
    assert [r.early_stop is not None for r in results] == [False, False, False, True]
    assert "did not improve by at least 0.05 in 2 evaluations (best 0.44 at step 400)" in results[-1].early_stop


def test_missing_metric_is_recorded_not_best():
    b = book()
    b.add(1, "p", 0.0)
    b.start(1, 0.0)
    outcome = b.finish(1, 0, {"other": 1.0}, 1.0)
    assert not outcome.improved and b.best() is None and "missing" in b.checkpoints[1].error
    assert b.checkpoints[1].state == DONE


def test_round_trip_and_missed():
    b = book(patience=3)
    b.add(1, "p1", 0.0)
    b.add_missed(2, 1.0, "deleted before it could be pinned")
    b.start(1, 1.0)
    b.finish(1, 0, {MAP: 0.2}, 2.0)
    copy = EvalBook.from_dict(b.policy, b.to_dict())
    assert copy.to_dict() == b.to_dict() and copy.checkpoints[2].state == MISSED and copy.best_n == 1
