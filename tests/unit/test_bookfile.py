"""The evaluation book's indexes and its snapshot + journal on disk (oddaemon/core/evalbook.py, bookfile.py).

A job can have tens of thousands of checkpoints: every question the daemon asks at an event is
answered from indexes kept by the book's one state change, and each change is persisted as a
journal line, not a rewrite of the whole book. These tests hold the indexes to a brute-force
answer over random histories, and the journal to the promise that a reload (after a clean stop,
a SIGKILL mid-write, or a crash between a snapshot and the journal's truncation) gives the same book.
"""

import json
import logging
import os
import random

import pytest

from oddaemon.adapters import bookfile
from oddaemon.core.evalbook import DONE, OPEN, PENDING, RELEASED, RUNNING, SKIPPED, EvalBook, EvalPolicy

POLICY = EvalPolicy(max_attempts=2)


def brute(book: EvalBook) -> dict:
    cs = sorted(book.checkpoints.values(), key=lambda c: c.n)
    done = [c for c in cs if c.state == DONE]
    released = [c for c in cs if c.state == SKIPPED and c.error.startswith(RELEASED)]
    counts = {s: 0 for s in book.counts()}
    for c in cs:
        counts[c.state] += 1
    return {"pending": [c.n for c in cs if c.state == PENDING],
            "running": next((c.n for c in cs if c.state == RUNNING), None),
            "counts": counts, "latest_done": done[-1].n if done else None,
            "newest": cs[-1].n if cs else None, "released": len(released),
            "drained": not any(c.state in OPEN for c in cs),
            "newest_step": max((c.step for c in done if c.step is not None), default=None)}


def indexed(book: EvalBook) -> dict:
    latest = book.latest_done()
    running = book.running()
    return {"pending": [c.n for c in book.pending()], "running": running.n if running else None,
            "counts": book.counts(), "latest_done": latest.n if latest else None, "newest": book.newest,
            "released": book.released, "drained": book.drained(), "newest_step": book.newest_step}


def random_history(book: EvalBook, rng: random.Random, steps: int, on_step=None) -> None:
    now, n = 1000.0, 0
    for _ in range(steps):
        now += 1
        roll = rng.random()
        if roll < 0.35:
            n += 1
            book.add(n, f"/pins/ckpt-{n}", now)
        elif roll < 0.4:
            n += 2
            book.add_missed(n - 1, now, "deleted by checkpoint_max_to_keep before it could be pinned")
            book.add(n, f"/pins/ckpt-{n}", now)
        elif roll < 0.6:
            due = book.next_due(now + 100)
            if due is not None:
                book.start(due.n, now)
        elif roll < 0.75 and book.running() is not None:
            c = book.running()
            book.finish(c.n, c.n * 10, {POLICY.metric: rng.random()}, now)
        elif roll < 0.8 and book.running() is not None:
            book.fail(book.running().n, rng.choice(["boom", "DataLossError: bad"]), now)
        elif roll < 0.85 and book.pending():
            book.release(rng.choice(book.pending()).n, now, f"{RELEASED}: this job's pins held too much")
        elif roll < 0.88 and book.pending():
            book.miss(book.pending()[0].n, now, "its files were deleted")
        elif roll < 0.9:
            book.interrupted(now, "evaluator exited (1)")
        if on_step is not None:
            on_step()


@pytest.mark.parametrize("seed", range(20))
def test_the_indexes_answer_as_a_scan_of_every_checkpoint_would(seed):
    rng = random.Random(seed)
    book = EvalBook(POLICY if seed % 2 else EvalPolicy(when_behind="skip_to_newest", max_behind=2))
    checks = []
    random_history(book, rng, 400, lambda: (book.apply_skip_policy(), checks.append(indexed(book) == brute(book))))
    assert all(checks) and book.checkpoints
    copy = EvalBook.from_dict(book.policy, json.loads(json.dumps(book.to_dict())))
    assert indexed(copy) == brute(copy) == brute(book) and copy.to_dict() == book.to_dict()


def test_next_due_is_strictly_in_order_and_waits_for_the_oldest_retry():
    book = EvalBook(POLICY)
    for n in (1, 2, 3):
        book.add(n, f"/p/ckpt-{n}", 0.0)
    book.start(1, 1.0)
    assert book.next_due(1.0) is None  # one at a time
    assert book.fail(1, "boom", 2.0)  # retried in 5 s
    assert book.next_due(3.0) is None and book.next_retry_at() == 7.0
    assert book.next_due(7.0).n == 1


def test_recent_lists_the_newest_in_order():
    book = EvalBook(POLICY)
    for n in range(1, 50):
        book.add(n, "", 0.0)
    book.start(1, 1.0)  # a change of state keeps a checkpoint's place
    assert [c.n for c in book.recent(5)] == [45, 46, 47, 48, 49]
    assert [c.n for c in book.recent(100)] == list(range(1, 50)) and book.recent(0) == []


def saved_book(tmp_path, seed=1, steps=600, compact_min=None, monkeypatch=None):
    if compact_min is not None:
        monkeypatch.setattr(bookfile, "COMPACT_MIN", compact_min)
    path = str(tmp_path / "job.json")
    book, store = EvalBook(POLICY), bookfile.BookFile(path, label="job")
    random_history(book, random.Random(seed), steps, lambda: store.save(book))
    return path, book, store


def test_a_reload_gives_the_same_book(tmp_path):
    path, book, store = saved_book(tmp_path)
    store.close()
    assert os.path.getsize(bookfile.journal_path(path)) > os.path.getsize(path)  # mostly in the journal
    loaded, lines = bookfile.load(path, POLICY)
    assert lines > 0 and loaded.to_dict() == book.to_dict() and indexed(loaded) == indexed(book)


def test_each_change_appends_what_changed_not_the_whole_book(tmp_path):
    path, book, store = saved_book(tmp_path)
    before = os.path.getsize(bookfile.journal_path(path))
    book.add(10_000, "/pins/ckpt-10000", 5000.0)
    store.save(book)
    grown = os.path.getsize(bookfile.journal_path(path)) - before
    assert 0 < grown < 1000, grown  # one record (and the header), whatever the book's size
    store.save(book)
    assert os.path.getsize(bookfile.journal_path(path)) - before == grown  # nothing changed: nothing written


def test_the_journal_is_compacted_into_a_snapshot_and_reloads_the_same(tmp_path, monkeypatch):
    path, book, store = saved_book(tmp_path, steps=2000, compact_min=50, monkeypatch=monkeypatch)
    assert os.path.exists(path)  # compacted at least once
    assert store.lines <= max(50, len(book.checkpoints)) + 2
    loaded, _ = bookfile.load(path, POLICY)
    assert loaded.to_dict() == book.to_dict()


def test_a_crash_between_the_snapshot_and_the_journal_restart_takes_nothing_back(tmp_path):
    path, book, store = saved_book(tmp_path)
    old_journal = open(bookfile.journal_path(path), "rb").read()
    running = book.running() or book.start(book.next_due(1e9).n, 1e9) or book.running()
    book.finish(running.n, 1, {POLICY.metric: 0.5}, 1e9 + 1)  # changed since the journal's last line
    store.compact(book)
    with open(bookfile.journal_path(path), "wb") as f:  # as if the daemon died before emptying the journal
        f.write(old_journal)
    loaded, _ = bookfile.load(path, POLICY)
    assert loaded.checkpoints[running.n].state == DONE and loaded.to_dict() == book.to_dict()


def test_a_torn_last_line_is_skipped_and_what_came_before_is_kept(tmp_path):
    path, book, store = saved_book(tmp_path)
    store.close()
    expected = book.to_dict()
    with open(bookfile.journal_path(path), "ab") as f:
        f.write(b'{"ckpt": {"n": 99999, "pref')  # SIGKILL mid-write
    loaded, _ = bookfile.load(path, POLICY)
    assert loaded.to_dict() == expected


def test_a_failed_write_is_logged_once_and_the_next_change_writes_the_whole_book(tmp_path, caplog):
    caplog.set_level(logging.INFO, "oddaemon.adapters.bookfile")
    path, book, store = saved_book(tmp_path)
    store.close()
    journal = bookfile.journal_path(path)
    os.unlink(journal)
    os.mkdir(journal)  # the journal cannot be opened (as with a full or read-only disk)
    book.add(20_000, "", 1.0)
    store.save(book)
    book.add(20_001, "", 2.0)
    store.save(book)
    assert store.failing and caplog.text.count("evaluation record job: cannot") == 1
    os.rmdir(journal)
    book.add(20_002, "", 3.0)
    store.save(book)  # the journal is back: the whole book is written as a snapshot
    assert not store.failing and "written again" in caplog.text
    assert bookfile.load(path, POLICY)[0].to_dict() == book.to_dict()
