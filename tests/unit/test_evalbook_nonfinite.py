"""A non-finite evaluation metric (NaN, +inf, -inf: a diverged model, an evaluator that divides by
zero) in the evaluation book. README, "[eval]": ``metric`` says what "best" means, and ``patience``
stops training "after this many evaluations in a row without an improvement of at least
``min_delta``". So a non-finite value:

* is never the best, whichever the direction (``nan`` compares false with everything, ``-inf`` is
  "better" than any loss, ``inf`` than any mAP): the best stays the finite one it was;
* is still an evaluation: the checkpoint is evaluated, its metrics kept as reported, the reason
  recorded; and it is an evaluation without an improvement, which patience counts;
* survives the book's files (snapshot and journal) as it was, and a restored book has the same best.
"""

from __future__ import annotations

import json
import math

import pytest

from oddaemon.adapters import bookfile
from oddaemon.core.evalbook import DONE, EvalBook, EvalPolicy

METRIC = "DetectionBoxes_Precision/mAP"
LOSS = "Loss/total_loss"
NON_FINITE = [math.nan, math.inf, -math.inf]


def book_with(*values: float, metric: str = METRIC, higher_is_better: bool = True, patience: int | None = None,
              min_delta: float = 0.0) -> tuple[EvalBook, list]:
    """A book whose checkpoints 1..N were evaluated in order with ``values`` of ``metric``; the
    Finished of each evaluation."""
    book = EvalBook(EvalPolicy(metric=metric, higher_is_better=higher_is_better, patience=patience,
                               min_delta=min_delta))
    verdicts = []
    for n, v in enumerate(values, start=1):
        book.add(n, f"/m/.oddaemon/pins/ckpt-{n}", 100.0 + n)
        assert book.next_due(200.0 + n).n == n
        book.start(n, 200.0 + n)
        verdicts.append(book.finish(n, 10 * n, {metric: v, "other": 0.25}, 201.0 + n))
    return book, verdicts


@pytest.mark.parametrize("higher_is_better", [True, False])
@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_never_replaces_a_finite_best(bad, higher_is_better):
    metric = METRIC if higher_is_better else LOSS
    book, verdicts = book_with(0.5, bad, metric=metric, higher_is_better=higher_is_better)
    assert [v.improved for v in verdicts] == [True, False]
    assert (book.best_n, book.best_value) == (1, 0.5)
    c = book.checkpoints[2]
    assert c.state == DONE and c.step == 20  # evaluated: not retried, not failed
    kept = c.metrics[metric]
    assert (math.isnan(kept) and math.isnan(bad)) or kept == bad  # as reported
    assert c.metrics["other"] == 0.25
    assert metric in c.error and "finite" in c.error, c.error  # the reason, naming the metric
    assert book.latest_done().n == 2  # it is the latest evaluation all the same
    # and a later finite value is compared with the finite best, not with the non-finite one
    book.add(3, "/m/.oddaemon/pins/ckpt-3", 300.0)
    book.start(3, 301.0)
    better = 0.75 if higher_is_better else 0.25
    assert book.finish(3, 30, {metric: better}, 302.0).improved
    assert (book.best_n, book.best_value) == (3, better)


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_a_non_finite_first_value_is_no_best_and_the_first_finite_one_is(bad):
    book, verdicts = book_with(bad, bad, 0.125)
    assert [v.improved for v in verdicts] == [False, False, True]
    assert (book.best_n, book.best_value) == (3, 0.125)
    assert book.counts()[DONE] == 3


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_patience_counts_non_finite_evaluations_as_evaluations_without_an_improvement(bad):
    book, verdicts = book_with(0.5, bad, bad, patience=2)
    assert [v.early_stop for v in verdicts[:2]] == [None, None]
    reason = verdicts[2].early_stop
    assert reason is not None, "2 evaluations in a row without an improvement: patience 2 has run out"
    assert reason.startswith(f"stopped early: {METRIC} did not improve by at least 0 in 2 evaluations"), reason
    assert "best 0.5 at step 10" in reason, reason
    # a finite improvement in between starts the count again
    book, verdicts = book_with(0.5, bad, 0.75, bad, patience=2)
    assert [v.early_stop for v in verdicts] == [None, None, None, None]


@pytest.mark.parametrize("bad", NON_FINITE, ids=["nan", "inf", "-inf"])
def test_patience_runs_out_on_non_finite_values_alone_without_a_best(bad):
    book, verdicts = book_with(bad, bad, patience=2)
    assert verdicts[0].early_stop is None
    reason = verdicts[1].early_stop
    assert reason is not None and reason.startswith(f"stopped early: {METRIC} did not improve"), reason
    assert book.best_n is None


def test_non_finite_values_survive_the_book_files_and_the_restored_best_is_the_same(tmp_path):
    path = str(tmp_path / "job.json")
    book, _ = book_with(0.5, math.nan, math.inf, -math.inf)
    files = bookfile.BookFile(path)
    files.save(book)  # a snapshot first
    book.add(5, "/m/.oddaemon/pins/ckpt-5", 400.0)
    book.start(5, 401.0)
    book.finish(5, 50, {METRIC: math.nan}, 402.0)
    files.save(book)  # then a journal line
    files.close()
    restored, _lines = bookfile.load(path, book.policy)
    assert (restored.best_n, restored.best_value) == (1, 0.5)
    got = {n: restored.checkpoints[n].metrics[METRIC] for n in range(1, 6)}
    assert got[1] == 0.5 and math.isnan(got[2]) and got[3] == math.inf and got[4] == -math.inf and math.isnan(got[5])
    assert all(restored.checkpoints[n].state == DONE for n in range(1, 6))
    assert restored.checkpoints[2].error == book.checkpoints[2].error
    # the plain-dict form (the views, the control socket's JSON) keeps them too
    again = EvalBook.from_dict(book.policy, json.loads(json.dumps(book.to_dict())))
    assert (again.best_n, again.best_value) == (1, 0.5) and math.isnan(again.checkpoints[5].metrics[METRIC])
