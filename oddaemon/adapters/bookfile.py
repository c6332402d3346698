"""A job's evaluation book on disk: a snapshot plus a journal, so that each change costs what it
changed, not the whole book (a job can have tens of thousands of checkpoints, and a checkpoint
changes state two or three times).

Layout under ``state_dir/evals``::

    <name>.json      the snapshot (``EvalBook.to_dict``) and its generation, written atomically
    <name>.journal   {"generation": G}, then one JSON object a line: {"ckpt": record} or {"book": header}

Loading reads the snapshot and replays the journal in order (the last record of a checkpoint wins;
a torn last line, from a daemon killed mid-write, is skipped), but only a journal of the
snapshot's own generation: a compaction writes a snapshot of a new generation first, then empties
the journal and starts it with that generation, so a crash between the two leaves a journal of the
old generation, whose records the snapshot already holds, and which is ignored (replayed, it would
take back what changed since its last line). Compaction happens when the journal holds more lines
than the book has checkpoints (and at least ``COMPACT_MIN``), and whenever the journal cannot be
written (the book is then written whole at each change until it can).

Durability. Lines are written at once: the page cache keeps them through a daemon crash (SIGKILL,
OOM kill), so a crash of the daemon loses nothing. Their fsync (what a power cut or a kernel crash
can lose) is handed to ``SYNCER``, a thread of its own, at each save, never waited for on the event
loop: a checkpoint's request goes to its evaluator while the journal line that says it started is
still being synced, and a job's fsync never delays another job's checkpoint. The order does not
matter for crash safety: a power cut takes the evaluator down with the daemon, so a line it loses
(a checkpoint added, started, or even evaluated) only makes the restarted daemon evaluate that
checkpoint again (counted as an interrupted attempt) and record it once; nothing is recorded twice.
(One case is weaker: an evaluated checkpoint's pin is let go right after its line is written, so a
power cut within that fsync can leave it "running" with its pin gone; the restarted daemon pins it
again from model_dir if TF still keeps it, else records it missed, never silently lost.) What a
power cut can lose is the lines of the last fsync's duration (milliseconds), where a sync at most
every second lost up to a second. One fsync per file is in flight at a time; lines written
meanwhile are covered by the next one. Compaction and ``close`` still sync in line (rare: the
journal outgrew the book, a daemon start or stop, a job's end).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable

from oddaemon.adapters.store import atomic_write_json
from oddaemon.core.errors import OperationError
from oddaemon.core.evalbook import EvalBook, EvalPolicy

log = logging.getLogger("oddaemon.adapters.bookfile")

COMPACT_MIN = 2000


class JournalSyncer:
    """fsync of journals on a thread of its own (started at the first request), off the event loop.

    ``request(key, fd, label)`` queues an fsync of a duplicate of ``fd`` (so that the owner may close
    or truncate its own meanwhile); a key already waiting is not queued twice (the fsync still to come
    covers what was written since). ``observer(label, seconds)``, when set, hears each fsync's
    duration on the syncer thread (``service/reaction.py``'s trace)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._waiting: dict[object, tuple[int, str]] = {}  # key -> (duplicated fd, label), oldest first
        self._busy = False
        self._thread: threading.Thread | None = None
        self.observer: Callable[[str, float], None] | None = None
        self.synced = 0  # fsyncs done (tests)
        self._failing: set[str] = set()

    def request(self, key: object, fd: int, label: str) -> None:
        with self._cond:
            if key in self._waiting:
                return
            self._waiting[key] = (os.dup(fd), label)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="oddaemon-journal-sync", daemon=True)
                self._thread.start()
            self._cond.notify()

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Until every requested fsync is done (tests, and a daemon that stops). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._waiting or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting:
                    self._cond.wait()
                key = next(iter(self._waiting))
                fd, label = self._waiting.pop(key)
                self._busy = True
            started = time.perf_counter()
            try:
                os.fsync(fd)
                self._failing.discard(label)
            except OSError as exc:
                if label not in self._failing:
                    self._failing.add(label)
                    log.warning("evaluation record %s: cannot fsync its journal: %s (the lines stay in the page "
                                "cache: a daemon crash loses nothing, a power cut may)", label, exc.strerror)
            finally:
                os.close(fd)
            seconds = time.perf_counter() - started
            with self._cond:
                self._busy = False
                self.synced += 1
                self._cond.notify_all()
            observer = self.observer
            if observer is not None:
                observer(label, seconds)


SYNCER = JournalSyncer()


def journal_path(snapshot: str) -> str:
    return snapshot[:-len(".json")] + ".journal" if snapshot.endswith(".json") else snapshot + ".journal"


def load(snapshot: str, policy: EvalPolicy) -> tuple[EvalBook, int]:
    """The book saved at ``snapshot`` (and its journal), and how many journal lines were read
    (the caller compacts a book whose journal was not empty, so that nothing is appended after a
    torn line). FileNotFoundError when there is no snapshot; ValueError/TypeError/KeyError when it is damaged."""
    with open(snapshot, "rb") as f:
        saved = json.loads(f.read())
    book = EvalBook.from_dict(policy, saved)
    lines = 0
    try:
        with open(journal_path(snapshot), "rb") as f:
            first = f.readline()
            generation = saved.get("journal")
            try:
                ours = generation is not None and json.loads(first).get("generation") == generation
            except (ValueError, AttributeError):
                ours = False
            lines = 1 if first else 0
            for raw in f:
                lines += 1
                if not ours:
                    continue  # an older generation's: the snapshot holds all of it, and more
                try:
                    entry = json.loads(raw)
                    if "ckpt" in entry:
                        book.restore(entry["ckpt"])
                    elif "book" in entry:
                        book.set_header(entry["book"])
                except (ValueError, TypeError, KeyError, AttributeError):
                    pass  # a torn line (the daemon was killed mid-write): skipped
    except FileNotFoundError:
        pass
    book.take_changes()
    return book, lines


class BookFile:
    def __init__(self, snapshot: str, label: str = ""):
        self.snapshot = snapshot
        self.journal = journal_path(snapshot)
        self.label = label or os.path.basename(snapshot)
        self.lines = 0
        self.fd: int | None = None
        self.last_header: dict | None = None
        self.dirty = False  # written, not yet synced
        self.needs_snapshot = True  # no journal of this snapshot's generation yet, or it cannot be written
        self.failing = False  # a write failed (logged once until one succeeds)

    def save(self, book: EvalBook) -> None:
        """Persist what changed since the last save: a journal line each (or the whole book, see above)."""
        changes = book.take_changes()
        header = book.header()
        if not changes and header == self.last_header and not self.needs_snapshot:
            return
        if self.needs_snapshot or self.lines + len(changes) + 1 > max(COMPACT_MIN, len(book.checkpoints)):
            self.compact(book)
            return
        data = b"".join(json.dumps({"ckpt": c}, separators=(",", ":")).encode() + b"\n" for c in changes)
        if header != self.last_header:
            data += json.dumps({"book": header}, separators=(",", ":")).encode() + b"\n"
        try:
            self._write(data)
        except OSError as exc:
            self._failed("append to", self.journal, exc)
            return
        self.lines += len(changes) + (header != self.last_header)
        self.last_header = header
        self.sync_soon()

    def sync_soon(self) -> None:
        """The lines written so far to disk, on the syncer thread (see the module's "Durability")."""
        if self.fd is not None and self.dirty:
            SYNCER.request(self, self.fd, self.label)
            self.dirty = False

    def compact(self, book: EvalBook) -> None:
        """Write the whole book as a snapshot of a new generation, then start the journal afresh."""
        book.take_changes()
        generation = time.time_ns()
        self.needs_snapshot = True
        try:
            atomic_write_json(self.snapshot, {**book.to_dict(), "journal": generation})
        except OperationError as exc:
            self._failed("write", self.snapshot, exc.__cause__ or exc)
            return
        try:
            if self.fd is None:
                self.fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.ftruncate(self.fd, 0)
            self._write(json.dumps({"generation": generation}).encode() + b"\n")
        except OSError as exc:  # the snapshot is whole: the journal's old generation is ignored
            self._failed("start", self.journal, exc)
            return
        if self.failing:
            log.info("evaluation record %s: written again", self.label)
        self.lines, self.last_header, self.needs_snapshot, self.failing = 1, book.header(), False, False
        self.sync()

    def _write(self, data: bytes) -> None:
        if self.fd is None:
            self.fd = os.open(self.journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]
        self.dirty = True

    def sync(self, always: bool = False) -> None:
        """The journal to disk now, in line (compaction; ``close``, ``always``: a background fsync
        requested before may not have run yet)."""
        if self.fd is not None and (self.dirty or always):
            try:
                os.fsync(self.fd)
            except OSError:
                pass
            self.dirty = False

    def close(self) -> None:
        self.sync(always=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _failed(self, operation: str, path: str, exc: BaseException) -> None:
        if self.fd is not None:  # opened again at the next try (the path may have been fixed)
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if not self.failing:
            log.error("evaluation record %s: cannot %s %s: %s; the daemon keeps it in memory and writes it whole "
                      "at each change until it can", self.label, operation, path, getattr(exc, "strerror", None) or exc)
        self.failing = True
        self.needs_snapshot = True
