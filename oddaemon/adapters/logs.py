"""Worker logs: size-rotated files that never split or lose a line.

The daemon reads each worker's combined stdout+stderr from a pipe (``LogPump``) and appends
whole lines to a ``RotatingLog``. Before a write that would push the file past ``max_bytes``
the file is rotated (``train.log`` -> ``train.log.1`` -> ... -> ``train.log.N``; the oldest is
dropped). ``reopen()`` (on SIGHUP) reopens the path, so an external logrotate that moved the
file also works.

A log that cannot be written (disk full, filesystem gone read-only) never stops the worker: the
output is dropped and counted, the daemon's own log says so once per outage, and the first write
that works again puts a ``==== oddaemon: N byte(s) of output lost here`` line where the gap is.
"""

from __future__ import annotations

import collections
import logging
import os
from collections.abc import Callable

from oddaemon.core.errors import OperationError
from oddaemon.core.failures import MARKER

MAX_PARTIAL_LINE = 64 * 1024
FAILURE_MARKER = MARKER.encode()
log = logging.getLogger("oddaemon.adapters.logs")


class RotatingLog:
    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.write_errors = 0  # failed writes, ever
        self.last_error: str | None = None
        self.lost_bytes = 0  # output that could not be written, ever
        self._failing = 0  # failed writes since the last one that worked
        self._failing_bytes = 0
        self._torn = False  # a failed write left part of a line in the file
        self._fd: int | None = None
        self._size = 0
        self._open()

    def _open(self) -> None:
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._fd = None
            self._note_error(OperationError(self.path, "open log file", exc))

    def _note_error(self, exc: OperationError) -> None:
        self.write_errors += 1
        self.last_error = str(exc)
        if not self._failing:  # once per outage in the daemon's log, not once per line
            log.warning("%s; the worker keeps running, its output is dropped until the log can be written again",
                        exc)
        self._failing += 1

    def _note_loss(self, size: int) -> None:
        self.lost_bytes += size
        self._failing_bytes += size

    def _recovered(self) -> bool:
        """Before the first write after an outage: say in the file itself where output is missing."""
        if not self._failing_bytes and not self._torn:  # (e.g. a failed rotation: nothing was lost)
            self._failing = 0
            return True
        note = (f"{chr(10) if self._torn else ''}==== oddaemon: {self._failing_bytes} byte(s) of output lost here "
                f"({self._failing} failed write(s), the last: {self.last_error})\n").encode()
        error = self._write_all(note)
        if error is not None:  # still failing: one more failed write, already announced
            self.write_errors += 1
            self._failing += 1
            self.last_error = str(OperationError(self.path, "append to log file", error))
            return False
        log.warning("log file %s is written again after %d failed write(s) (%d byte(s) of output lost)",
                    self.path, self._failing, self._failing_bytes)
        self._failing = self._failing_bytes = 0
        self._torn = False
        return True

    def write(self, data: bytes) -> None:
        """Append whole lines. Rotation happens at line boundaries, so no file grows past
        ``max_bytes`` unless a single line is longer. Errors (disk full) are counted, never
        raised: the worker keeps running; the lines that could not be written are the only loss."""
        while data:
            if self._fd is None:
                self._open()
                if self._fd is None:
                    self._note_loss(len(data))
                    return
            room = self.max_bytes - self._size
            if len(data) <= room:
                piece, data = data, b""
            else:
                cut = data.rfind(b"\n", 0, max(room, 0)) + 1
                if cut == 0 and self._size > 0:
                    self.rotate()
                    continue
                if cut == 0:  # a single line longer than max_bytes: it goes whole into a fresh file
                    cut = data.find(b"\n") + 1 or len(data)
                piece, data = data[:cut], data[cut:]
            if not self._append(piece):
                self._note_loss(len(piece) + len(data))
                return
            if data:
                self.rotate()

    def _append(self, piece: bytes) -> bool:
        if self._failing and not self._recovered():
            return False
        error = self._write_all(piece)
        if error is not None:
            self._note_error(OperationError(self.path, "append to log file", error))
            return False
        return True

    def _write_all(self, piece: bytes) -> OSError | None:
        written = 0
        try:
            while written < len(piece):
                written += os.write(self._fd, piece[written:])
            return None
        except OSError as exc:
            if written:
                self._torn = not piece[:written].endswith(b"\n")
            return exc
        finally:
            self._size += written

    def rotate(self) -> None:
        self.close()
        try:
            if self.backups > 0:
                for i in range(self.backups - 1, 0, -1):
                    src = f"{self.path}.{i}"
                    if os.path.exists(src):
                        os.rename(src, f"{self.path}.{i + 1}")
                os.rename(self.path, f"{self.path}.1")
            else:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._note_error(OperationError(self.path, "rotate log file", exc))
        self._open()

    def reopen(self) -> None:
        self.close()
        self._open()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LineSink:
    """Whole lines into a log (``write``), the last lines kept in memory so the daemon can explain a
    failure, and the worker's last ``oddaemon-failure:`` line however many lines (a long TF
    traceback) came after it. A partial line waits for its end (up to ``MAX_PARTIAL_LINE``)."""

    def __init__(self, write: Callable[[bytes], None], tail_lines: int = 200):
        self.write = write
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self.marker: str | None = None
        self._partial = b""

    def take(self, chunk: bytes) -> None:
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < MAX_PARTIAL_LINE:
            self._partial = data
            return
        if cut == 0:
            cut = len(data)
        whole, self._partial = data[:cut], data[cut:]
        self.write(whole)
        lines = whole.decode("utf-8", "replace").splitlines()
        if FAILURE_MARKER in whole:
            self.marker = next(line for line in reversed(lines) if MARKER in line)
        for line in lines[-self.tail.maxlen:]:
            self.tail.append(line)

    @property
    def pending(self) -> int:
        """Bytes of a line not ended yet (taken, not written)."""
        return len(self._partial)

    def explaining_tail(self) -> list[str]:
        """The last lines, and the failure marker line at the end when it scrolled out of them."""
        tail = list(self.tail)
        if self.marker is not None and self.marker not in tail:
            tail.append(self.marker)
        return tail

    def flush_partial(self) -> None:
        if self._partial:
            self.take(b"\n")


class LogPump(LineSink):
    """Moves bytes from a worker's output pipe into a RotatingLog, line by line (``LineSink``)."""

    def __init__(self, fd: int, log: RotatingLog, tail_lines: int = 200):
        super().__init__(log.write, tail_lines)
        self.fd = fd
        self.log = log
        self.closed = False
        os.set_blocking(fd, False)

    def pump(self) -> bool:
        """Read what is available. Returns False once the pipe reached end of file."""
        while not self.closed:
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return True
            except OSError:
                chunk = b""
            if not chunk:
                self.flush_partial()
                self.close()
                return False
            self.take(chunk)
        return False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
