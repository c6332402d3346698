"""Checkpoint states in the evaluation book go through one guarded change (oddaemon/core/evalbook.py).

The table of allowed transitions is the only way a checkpoint changes state: a transition that is
not in it raises and changes nothing; every transition the book's operations make is in it (and
every entry of the table is one of them); no module assigns a checkpoint's state but ``_move``;
books saved in today's format (plain state strings) load as they were and are written back with
the same strings.
"""

from __future__ import annotations

import ast
import json
import pathlib
import random

import pytest

from oddaemon.adapters import bookfile
from oddaemon.core import evalbook
from oddaemon.core.evalbook import (
    CheckpointState,
    EvalBook,
    EvalPolicy,
    IllegalCheckpointTransition,
    allowed_checkpoint_targets,
)

MAP = "DetectionBoxes_Precision/mAP"
ROOT = pathlib.Path(__file__).resolve().parents[2]
S = CheckpointState


def recording(monkeypatch) -> list[tuple]:
    """The (old, new) state pairs the book's one state change is asked to make, as they are checked."""
    seen: list[tuple] = []
    real = evalbook.check_checkpoint_transition

    def check(n, old, new):
        seen.append((old, new))
        real(n, old, new)

    monkeypatch.setattr(evalbook, "check_checkpoint_transition", check)
    return seen


def every_operation(book: EvalBook) -> None:
    """Each of the book's operations at least once, as the daemon uses them."""
    for n in range(1, 9):
        book.add(n, f"/pins/ckpt-{n}", float(n))
    book.add_missed(9, 9.0, "deleted before it could be pinned")
    book.start(1, 10.0)
    book.finish(1, 100, {MAP: 0.5}, 11.0)  # running -> evaluated
    book.start(2, 12.0)
    assert book.fail(2, "boom", 13.0)  # running -> pending (a retry)
    book.start(2, 20.0)
    assert not book.fail(2, "DataLossError: not an sstable", 21.0)  # running -> failed (damaged)
    book.start(3, 22.0)
    assert book.interrupted(23.0, "evaluator exited (-9)") == 3  # running -> pending
    book.release(4, 24.0, f"{evalbook.RELEASED}: this job's pins held too much")  # pending -> skipped
    book.miss(5, 25.0, "its files were deleted before it could be evaluated")  # pending -> missed
    book.start(3, 26.0)
    book.fail(3, "boom", 27.0)
    book.start(3, 40.0)
    assert not book.fail(3, "boom", 41.0)  # out of attempts: running -> failed


def test_every_transition_the_book_makes_is_in_the_table_and_every_entry_is_made(monkeypatch):
    seen = recording(monkeypatch)
    every_operation(EvalBook(EvalPolicy(max_attempts=3)))
    skipping = EvalBook(EvalPolicy(when_behind="skip_to_newest", max_behind=1))
    for n in (1, 2, 3):
        skipping.add(n, f"/p/ckpt-{n}", 0.0)
    assert skipping.apply_skip_policy() == [1, 2]  # pending -> skipped
    table = {(old, new) for old in (None, *S) for new in allowed_checkpoint_targets(old)}
    assert set(seen) == table  # nothing made outside the table, nothing in it that is never made
    assert table == {(None, S.PENDING), (None, S.MISSED), (S.PENDING, S.RUNNING), (S.PENDING, S.SKIPPED),
                     (S.PENDING, S.MISSED), (S.RUNNING, S.DONE), (S.RUNNING, S.PENDING), (S.RUNNING, S.FAILED)}
    assert all(not allowed_checkpoint_targets(s) for s in (S.DONE, S.FAILED, S.SKIPPED, S.MISSED))  # final


@pytest.mark.parametrize("seed", range(10))
def test_random_histories_never_ask_for_a_transition_outside_the_table(seed, monkeypatch):
    seen = recording(monkeypatch)
    rng = random.Random(seed)
    book = EvalBook(EvalPolicy(max_attempts=2, when_behind="skip_to_newest" if seed % 2 else "evaluate_all"))
    n, now = 0, 0.0
    for _ in range(300):
        now += 1
        roll = rng.random()
        if roll < 0.35:
            n += 1
            book.add(n, f"/p/ckpt-{n}", now)
        elif roll < 0.4:
            n += 2
            book.add_missed(n - 1, now, "gone")
            book.add(n, f"/p/ckpt-{n}", now)
        elif roll < 0.6 and (due := book.next_due(now + 100)) is not None:
            book.start(due.n, now)
        elif roll < 0.75 and book.running() is not None:
            book.finish(book.running().n, 1, {MAP: rng.random()}, now)
        elif roll < 0.82 and book.running() is not None:
            book.fail(book.running().n, rng.choice(["boom", "DataLossError"]), now)
        elif roll < 0.87 and book.pending():
            book.release(book.pending()[0].n, now, f"{evalbook.RELEASED}: too much")
        elif roll < 0.9 and book.pending():
            book.miss(book.pending()[-1].n, now, "deleted")
        elif roll < 0.93:
            book.interrupted(now, "evaluator exited (1)")
        book.apply_skip_policy()
    assert seen and all(new in allowed_checkpoint_targets(old) for old, new in seen)


def book_in_every_state() -> EvalBook:
    book = EvalBook(EvalPolicy(max_attempts=3))
    every_operation(book)
    return book


@pytest.mark.parametrize("operation, n, state", [
    (lambda b: b.start(1, 50.0), 1, S.DONE),  # an evaluated checkpoint is never evaluated again
    (lambda b: b.start(2, 50.0), 2, S.FAILED),
    (lambda b: b.finish(6, 1, {MAP: 0.9}, 50.0), 6, S.PENDING),  # finished without having started
    (lambda b: b.fail(7, "boom", 50.0), 7, S.PENDING),
    (lambda b: b.release(1, 50.0, "released"), 1, S.DONE),
    (lambda b: b.miss(4, 50.0, "gone"), 4, S.SKIPPED),
    (lambda b: b.release(9, 50.0, "released"), 9, S.MISSED),
])
def test_a_transition_outside_the_table_raises_and_changes_nothing(operation, n, state):
    book = book_in_every_state()
    assert book.checkpoints[n].state == state
    before = json.dumps(book.to_dict(), sort_keys=True)
    counts, pending, running, changes = book.counts(), book.pending(), book.running(), book.take_changes()
    with pytest.raises(IllegalCheckpointTransition) as raised:
        operation(book)
    assert raised.value.n == n and raised.value.old == state and f"ckpt-{n}" in str(raised.value)
    assert f"a checkpoint from {state.value} to" in str(raised.value) and "not in the checkpoint transition table" in str(
        raised.value)
    assert json.dumps(book.to_dict(), sort_keys=True) == before  # not even the record's other fields
    assert (book.counts(), book.pending(), book.running(), book.take_changes()) == (counts, pending, running, [])
    assert changes  # (the book had changes to hand over before: the refusal added none)


def test_a_checkpoint_new_to_the_book_arrives_pending_or_missed_only():
    book = EvalBook(EvalPolicy())
    with pytest.raises(IllegalCheckpointTransition, match="cannot move a checkpoint new to the book to evaluated"):
        book._move(evalbook.CheckpointEval(n=1, prefix="p", completed_at=0.0), S.DONE)
    assert book.checkpoints == {} and book.newest is None


def assigned_attributes(path: pathlib.Path) -> list[tuple[str, int, str]]:
    """(function, line, attribute) of every ``x.state = ...`` (and augmented/annotated) assignment."""
    found = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            name = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            targets = []
            if isinstance(child, ast.Assign):
                targets = child.targets
            elif isinstance(child, (ast.AugAssign, ast.AnnAssign)):
                targets = [child.target]
            while targets:
                t = targets.pop()
                if isinstance(t, (ast.Tuple, ast.List)):
                    targets.extend(t.elts)
                elif isinstance(t, ast.Starred):
                    targets.append(t.value)
                elif isinstance(t, ast.Attribute) and t.attr == "state":
                    found.append((function, child.lineno, t.attr))
            if isinstance(child, ast.Call) and getattr(child.func, "id", "") == "setattr" and len(child.args) > 1 \
                    and isinstance(child.args[1], ast.Constant) and child.args[1].value == "state":
                found.append((function, child.lineno, "setattr state"))
            visit(child, name)

    visit(ast.parse(path.read_text()), "<module>")
    return found


def test_the_one_state_change_is_the_only_place_a_checkpoint_state_is_assigned():
    assert [f for f, _, _ in assigned_attributes(ROOT / "oddaemon/core/evalbook.py")] == ["_move"]
    # The evaluation side of the daemon changes checkpoints only through the book's operations.
    evaluation_side = ["oddaemon/adapters/pins.py", "oddaemon/adapters/best_dir.py", "oddaemon/adapters/bookfile.py",
                       "oddaemon/core/pinbudget.py", "oddaemon/core/views.py", "oddaemon/service/evaluation.py",
                       "oddaemon/service/evaluation_record.py", "oddaemon/service/evaluator_driver.py",
                       "oddaemon/service/best_checkpoint.py", "oddaemon/service/exports.py", "oddaemon/service/warm.py"]
    assert {p: assigned_attributes(ROOT / p) for p in evaluation_side} == {p: [] for p in evaluation_side}


# A book as today's daemon writes it: a snapshot (state strings, a journal generation) and its journal.
SNAPSHOT = {
    "best_n": 1, "best_value": 0.5, "final_n": None, "evaluations_since_improvement": 0, "journal": 7,
    "checkpoints": [
        {"n": 1, "prefix": "/m/.oddaemon/pins/ckpt-1", "completed_at": 1.0, "state": "evaluated", "step": 0,
         "metrics": {MAP: 0.5}, "attempts": 1, "retry_at": None, "started_at": 2.0, "finished_at": 3.0,
         "lag_seconds": 1.0, "duration_seconds": 1.0, "error": ""},
        {"n": 2, "prefix": "", "completed_at": 1.5, "state": "missed", "step": None, "metrics": {}, "attempts": 0,
         "retry_at": None, "started_at": None, "finished_at": None, "lag_seconds": None, "duration_seconds": None,
         "error": "deleted by checkpoint_max_to_keep before it could be pinned"},
        {"n": 3, "prefix": "/m/.oddaemon/pins/ckpt-3", "completed_at": 4.0, "state": "pending", "step": None,
         "metrics": {}, "attempts": 0, "retry_at": None, "started_at": None, "finished_at": None,
         "lag_seconds": None, "duration_seconds": None, "error": ""},
        {"n": 4, "prefix": "/m/.oddaemon/pins/ckpt-4", "completed_at": 5.0, "state": "skipped", "step": None,
         "metrics": {}, "attempts": 0, "retry_at": None, "started_at": None, "finished_at": 6.0,
         "lag_seconds": None, "duration_seconds": None, "error": "released unevaluated: this job's pins held 2 GiB"},
        {"n": 5, "prefix": "/m/.oddaemon/pins/ckpt-5", "completed_at": 6.0, "state": "failed", "step": None,
         "metrics": {}, "attempts": 3, "retry_at": None, "started_at": 9.0, "finished_at": 9.5,
         "lag_seconds": 1.0, "duration_seconds": None, "error": "boom"},
    ]}
# The journal: ckpt-3 started, then (lines coalesce between saves) evaluated; ckpt-6 arrived and was
# running when the daemon died.
JOURNAL = [
    {"generation": 7},
    {"ckpt": {**SNAPSHOT["checkpoints"][2], "state": "running", "attempts": 1, "started_at": 10.0}},
    {"ckpt": {**SNAPSHOT["checkpoints"][2], "state": "evaluated", "attempts": 1, "started_at": 10.0, "step": 20,
              "metrics": {MAP: 0.7}, "finished_at": 11.0}},
    {"book": {"best_n": 3, "best_value": 0.7, "final_n": None, "evaluations_since_improvement": 0}},
    {"ckpt": {**SNAPSHOT["checkpoints"][2], "n": 6, "prefix": "/m/.oddaemon/pins/ckpt-6", "state": "running",
              "attempts": 1, "started_at": 12.0}},
]


def write_saved_book(tmp_path) -> str:
    path = tmp_path / "job.json"
    path.write_text(json.dumps(SNAPSHOT))
    (tmp_path / "job.journal").write_text("".join(json.dumps(line) + "\n" for line in JOURNAL))
    return str(path)


def test_a_book_saved_in_todays_format_loads_with_its_states(tmp_path):
    book, lines = bookfile.load(write_saved_book(tmp_path), EvalPolicy())
    assert lines == len(JOURNAL)
    states = {n: c.state for n, c in book.checkpoints.items()}
    assert states == {1: "evaluated", 2: "missed", 3: "evaluated", 4: "skipped", 5: "failed", 6: "running"}
    assert all(type(c.state) is CheckpointState for c in book.checkpoints.values())
    assert book.counts() == {"pending": 0, "running": 1, "evaluated": 2, "failed": 1, "skipped": 1, "missed": 1}
    assert all(type(k) is str for k in book.counts())  # plain strings in views, D-Bus and metrics
    assert book.best_n == 3 and book.running().n == 6 and book.released == 1 and book.newest_step == 20
    # a daemon starting with it counts the interrupted evaluation an attempt, through the table
    assert book.interrupted(13.0, "the daemon restarted during this evaluation") == 6
    assert book.checkpoints[6].state == "pending" and book.checkpoints[6].retry_at == 18.0


def test_a_loaded_book_is_written_back_with_the_same_state_strings(tmp_path):
    path = write_saved_book(tmp_path)
    book, _ = bookfile.load(path, EvalPolicy())
    store = bookfile.BookFile(path, label="job")
    store.compact(book)
    store.close()
    written = json.loads(pathlib.Path(path).read_text())
    assert [c["state"] for c in written["checkpoints"]] == ["evaluated", "missed", "evaluated", "skipped", "failed",
                                                           "running"]
    assert '"state": "evaluated"' in pathlib.Path(path).read_text()
    assert bookfile.load(path, EvalPolicy())[0].to_dict() == book.to_dict()


def test_a_state_no_book_has_makes_the_snapshot_unreadable_and_a_journal_line_skipped(tmp_path):
    path = write_saved_book(tmp_path)
    damaged = {**SNAPSHOT, "checkpoints": [{**SNAPSHOT["checkpoints"][0], "state": "done"}]}
    pathlib.Path(path).write_text(json.dumps(damaged))
    with pytest.raises(ValueError, match="'done' is not a valid CheckpointState"):
        bookfile.load(path, EvalPolicy())  # the daemon logs it unreadable and starts a new one
    pathlib.Path(path).write_text(json.dumps(SNAPSHOT))
    with open(tmp_path / "job.journal", "a") as f:
        f.write(json.dumps({"ckpt": {**SNAPSHOT["checkpoints"][0], "n": 7, "state": "done"}}) + "\n")
    book, _ = bookfile.load(path, EvalPolicy())
    assert 7 not in book.checkpoints and book.checkpoints[3].state == "evaluated"
