"""A job's evaluation record under ``state_dir/evals``: its book on disk and the evaluator's result files.

Layout::

    evals/<name>.json, <name>.journal   the book (snapshot + journal)
    evals/<name>/ckpt-N.json            the result the evaluator wrote for checkpoint N

A live job's record is loaded once (an evaluation the daemon was killed during counts a failed
attempt) and saved at each change; a finished job's book is read again only when its files change
(``SavedBooks``), for the views.
"""

from __future__ import annotations

import json
import logging
import os
import time

from oddaemon.adapters import bookfile
from oddaemon.adapters.store import remove_stale_temps
from oddaemon.core import layout
from oddaemon.core.evalbook import EvalBook, EvalPolicy

log = logging.getLogger("oddaemon.service.evaluation_record")


def book_path(state_dir: str, name: str) -> str:
    return layout.eval_book(state_dir, name)


def read_result(path: str) -> tuple[int | None, dict[str, float]]:
    """The step and the metrics of a result file the evaluator wrote. ValueError (naming the file)
    when it cannot be read or is not a result."""
    try:
        with open(path, "rb") as f:
            result = json.loads(f.read())
        metrics = {k: float(v) for k, v in result.get("metrics", {}).items()}
        return result.get("step"), metrics
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"unreadable result {path}: {exc}") from exc


class EvaluationRecord:
    """One live job's book, persisted at each change, and where its results go."""

    def __init__(self, state_dir: str, name: str, policy: EvalPolicy):
        self.name = name
        self.results = layout.eval_results_dir(state_dir, name)
        self.path = book_path(state_dir, name)
        remove_stale_temps(os.path.dirname(self.path))  # left by a daemon killed mid-write
        self.bookfile = bookfile.BookFile(self.path, label=name)
        self.book = self._load(policy)
        try:
            os.makedirs(self.results, exist_ok=True)
        except OSError as exc:
            log.warning("job %s: cannot create %s: %s", name, self.results, exc.strerror)

    def _load(self, policy: EvalPolicy) -> EvalBook:
        try:
            book, journal_lines = bookfile.load(self.path, policy)
        except FileNotFoundError:
            return EvalBook(policy)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.error("job %s: evaluation record %s unreadable (%s); starting a new one", self.name, self.path, exc)
            return EvalBook(policy)
        book.interrupted(time.time(), "the daemon restarted during this evaluation")
        if journal_lines or book.checkpoints:
            self.bookfile.compact(book)  # one snapshot again: nothing is appended after a torn line
        return book

    def result_path(self, n: int) -> str:
        return os.path.join(self.results, f"ckpt-{n}.json")

    def forget_result(self, n: int) -> None:
        """Remove ckpt-``n``'s result file, if any (before its first attempt: one left by a lost book)."""
        try:
            os.unlink(self.result_path(n))
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("job %s: cannot remove %s: %s", self.name, self.result_path(n), exc.strerror)

    def save(self) -> None:
        """Persist what changed (a journal line per changed checkpoint: ``bookfile``)."""
        self.bookfile.save(self.book)

    def close(self) -> None:
        """Write the whole book (a finished job's snapshot is complete, its journal empty) and let go of the journal."""
        self.bookfile.compact(self.book)
        self.bookfile.close()


class SavedBooks:
    """Finished jobs' books, as last read; a book is read again only when its files change."""

    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.cache: dict[str, tuple[list, EvalBook | None]] = {}

    def get(self, name: str) -> EvalBook | None:
        path = book_path(self.state_dir, name)
        signature = []
        for p in (path, bookfile.journal_path(path)):
            try:
                st = os.stat(p)
                signature.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except OSError:
                signature.append(None)
        cached = self.cache.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        try:
            book = bookfile.load(path, EvalPolicy())[0]
        except (OSError, ValueError, TypeError, KeyError):
            book = None
        self.cache[name] = (signature, book)
        return book
