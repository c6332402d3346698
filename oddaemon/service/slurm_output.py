"""A Slurm worker's output, copied into the job's rotating log.

``slurmd`` writes a batch job's output to the file ``sbatch --output`` names, on the node, with a
descriptor of its own: a log the daemon rotates under it would lose what it writes next (the
rename moves slurmd's file to ``train.log.1``, and the oldest backup's deletion takes its output
with it), and its bytes would never count towards the rotation size. So Slurm writes to
``<log_dir>/<name>/slurm-<role>.out`` (storage the nodes share with the daemon's host, as the
model_dir is), and the daemon follows that file: whole lines are copied into ``<role>.log``, which
rotates as a local worker's does and is what ``oddaemon logs -f`` follows, once a second while the
job runs and once more at its end, when the copy is complete and the file removed. A copy is the
worker's activity for the hang guard, as a local worker's output is.

How far whole lines were copied is kept in ``slurm-<role>.out.copied`` after each read that copied
some (replaced atomically), and at the daemon's stop (which leaves its Slurm jobs running); the
daemon that adopts the job goes on from there. A daemon killed without stopping copies again at
most what it copied after its last record (one read, about a second of output), not the whole file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from oddaemon.adapters.logs import LineSink

log = logging.getLogger("oddaemon.slurm")
READ_CHUNK = 1 << 20
FOLLOW_SECONDS = 1.0


def output_path(log_path: str, role: str) -> str:
    """Where Slurm writes a worker's output: beside its rotating log."""
    return os.path.join(os.path.dirname(log_path), f"slurm-{role}.out")


class FollowedOutput:
    """One Slurm output file, copied from ``offset`` on through ``write`` (the job's rotating log)."""

    def __init__(self, path: str, write: Callable[[bytes], None]):
        self.path = path
        self.sink = LineSink(write)
        self.offset = self._copied()  # bytes of the file read so far
        self.finished = False
        self._fd: int | None = None

    def _copied(self) -> int:
        try:
            with open(self.path + ".copied") as f:
                return max(0, int(f.read().strip() or 0))
        except (OSError, ValueError):
            return 0

    def read(self) -> int:
        """Copy what was appended since the last read; the number of bytes read."""
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return 0  # not written yet (the job has not started), or the share is gone for now
        total = 0
        while True:
            try:
                chunk = os.pread(self._fd, READ_CHUNK, self.offset)
            except OSError as exc:
                log.warning("cannot read Slurm output %s: %s", self.path, exc.strerror)
                return total
            if not chunk:
                if total:
                    self._record()
                return total
            self.offset += len(chunk)
            total += len(chunk)
            self.sink.take(chunk)

    def _record(self) -> None:
        """Keep how far whole lines were copied (a partial last line is read again by the next daemon)."""
        temp = f"{self.path}.copied.tmp"
        try:
            with open(temp, "w") as f:
                f.write(f"{self.offset - self.sink.pending}\n")
            os.replace(temp, self.path + ".copied")
        except OSError as exc:
            log.warning("cannot write %s.copied: %s (a daemon that adopts this job copies its output again "
                        "from the start)", self.path, exc.strerror)

    def explaining_tail(self) -> list[str]:
        return self.sink.explaining_tail()

    def finish(self) -> None:
        """The Slurm job ended: the rest copied (a last line without its newline too), the file removed.
        Once: the executor finishes it where the job's end is seen, whichever way that was."""
        if self.finished:
            return
        self.finished = True
        self.read()
        self.sink.flush_partial()
        self._close()
        for path in (self.path, self.path + ".copied", self.path + ".copied.tmp"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("cannot remove %s: %s", path, exc.strerror)

    def leave(self) -> None:
        """The daemon stops, the job runs on: how far whole lines were copied is kept for the next one."""
        self.read()
        self._close()
        self._record()

    def _close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
