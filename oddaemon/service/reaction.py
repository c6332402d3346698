"""Where a checkpoint's reaction time goes, for ``bench/reaction``: the stages from the rescan that
finds a new complete checkpoint to its request written into the warm evaluator's pipe.

Off unless ``$ODDAEMON_REACTION_TRACE`` names a file when the daemon starts; then one JSON line per
request sent::

    {"job", "ckpt", "rescan_at", "list_s", "pin_s", "record_s", "check_s", "start_record_s", "pipe_s",
     "sent_at", "waited": bool}

(``rescan_at`` and ``sent_at`` are wall-clock times, comparable with the trainer's own checkpoint
timestamps; ``waited``: the request was not sent by the rescan that found the checkpoint, because the
evaluator was busy or not ready yet), and one line per journal fsync, which runs on the syncer thread
off that path: ``{"fsync_s", "book", "at"}``. Each line is one ``write`` on an ``O_APPEND`` file.
"""

from __future__ import annotations

import json
import os
import time

from oddaemon.adapters import bookfile

TRACE_ENV = "ODDAEMON_REACTION_TRACE"


class ReactionTrace:
    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.arrivals: dict[tuple[str, int], dict] = {}
        bookfile.SYNCER.observer = self._fsync

    @classmethod
    def from_environment(cls) -> ReactionTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def arrived(self, job: str, n: int, rescan_at: float, list_s: float, pin_s: float) -> None:
        """Checkpoint ``n`` was found and pinned by the rescan that started at ``rescan_at``."""
        self.arrivals[(job, n)] = {"job": job, "ckpt": n, "rescan_at": rescan_at, "list_s": list_s, "pin_s": pin_s}

    def recorded(self, job: str, ns: list[int], record_s: float) -> None:
        """The book's journal lines for the checkpoints ``ns`` (and whatever else changed) were written."""
        for n in ns:
            if (job, n) in self.arrivals:
                self.arrivals[(job, n)]["record_s"] = record_s

    def rescan_done(self, job: str) -> None:
        """The rescan's own pump is over: a checkpoint of it still unsent waits (evaluator busy or not ready)."""
        for (name, _), entry in self.arrivals.items():
            if name == job:
                entry.setdefault("waited", True)

    def sent(self, job: str, n: int, check_s: float, start_record_s: float, pipe_s: float, waited: bool) -> None:
        entry = self.arrivals.pop((job, n), {"job": job, "ckpt": n})
        entry.update(check_s=check_s, start_record_s=start_record_s, pipe_s=pipe_s, sent_at=time.time())
        entry["waited"] = entry.get("waited", False) or waited
        self._write(entry)

    def _fsync(self, label: str, seconds: float) -> None:
        self._write({"fsync_s": seconds, "book": label, "at": time.time()})

    def _write(self, entry: dict) -> None:
        try:
            os.write(self.fd, (json.dumps(entry) + "\n").encode())
        except OSError:
            pass  # a bench's trace: never the daemon's problem

    def close(self) -> None:
        if bookfile.SYNCER.observer == self._fsync:
            bookfile.SYNCER.observer = None
        os.close(self.fd)
