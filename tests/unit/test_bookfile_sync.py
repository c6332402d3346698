"""The book's journal is synced off the event loop (adapters/bookfile.py, "Durability"): a save writes
its lines and returns without an fsync on the calling thread; the syncer thread syncs them (one
fsync in flight per file, later lines covered by the next); close syncs in line; what was saved
reloads the same whether or not its fsync ran yet (the page cache holds it)."""

from __future__ import annotations

import os
import threading

from oddaemon.adapters import bookfile
from oddaemon.core.evalbook import EvalBook, EvalPolicy


def recording_fsync(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = os.fsync

    def fsync(fd):
        calls.append(threading.current_thread().name)
        return real(fd)

    monkeypatch.setattr(bookfile.os, "fsync", fsync)
    return calls


def test_a_save_never_fsyncs_on_the_calling_thread_and_the_syncer_does(tmp_path, monkeypatch):
    path = str(tmp_path / "cats.json")
    book, bf = EvalBook(EvalPolicy()), bookfile.BookFile(path)
    bf.save(book)  # the first save writes the snapshot (compaction syncs in line: rare)
    assert bookfile.SYNCER.wait_idle()
    calls = recording_fsync(monkeypatch)
    main = threading.current_thread().name
    for n in range(1, 6):
        book.add(n, f"/pins/ckpt-{n}", 1000.0 + n)
        bf.save(book)
        book.start(n, 1000.5 + n)
        bf.save(book)
    assert main not in calls  # nothing on the caller's thread
    assert bookfile.SYNCER.wait_idle()
    assert calls and set(calls) == {"oddaemon-journal-sync"}
    assert len(calls) <= 10  # one per save at most: a waiting request covers the lines after it
    reloaded, _ = bookfile.load(path, EvalPolicy())
    assert {n: c.state for n, c in reloaded.checkpoints.items()} == {n: c.state for n, c in book.checkpoints.items()}
    calls.clear()
    bf.close()
    assert calls == [main]  # the last lines synced in line before the daemon lets go of the journal


def test_what_was_saved_reloads_before_its_fsync_ran(tmp_path, monkeypatch):
    path = str(tmp_path / "dogs.json")
    book, bf = EvalBook(EvalPolicy()), bookfile.BookFile(path)
    bf.save(book)
    assert bookfile.SYNCER.wait_idle()
    gate = threading.Event()
    real = os.fsync
    monkeypatch.setattr(bookfile.os, "fsync", lambda fd: (gate.wait(10), real(fd))[1])
    book.add(1, "/pins/ckpt-1", 1000.0)
    book.start(1, 1000.1)
    bf.save(book)  # returns although its fsync is held
    reloaded, lines = bookfile.load(path, EvalPolicy())  # a daemon killed now: the page cache has the line
    assert reloaded.checkpoints[1].state == book.checkpoints[1].state and lines == 2
    gate.set()
    assert bookfile.SYNCER.wait_idle()
    monkeypatch.setattr(bookfile.os, "fsync", real)
    bf.close()
