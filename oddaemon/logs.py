"""Worker logs: size-rotated files that never split or lose a line.

The daemon reads each worker's combined stdout+stderr from a pipe (``LogPump``) and appends
whole lines to a ``RotatingLog``. Before a write that would push the file past ``max_bytes``
the file is rotated (``train.log`` -> ``train.log.1`` -> ... -> ``train.log.N``; the oldest is
dropped). ``reopen()`` (on SIGHUP) reopens the path, so an external logrotate that moved the
file also works.
"""

from __future__ import annotations

import collections
import os

from oddaemon.errors import OperationError

MAX_PARTIAL_LINE = 64 * 1024


class RotatingLog:
    def __init__(self, path: str, max_bytes: int, backups: int):
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.write_errors = 0
        self.last_error: str | None = None
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

    def write(self, data: bytes) -> None:
        """Append whole lines. Rotation happens at line boundaries, so no file grows past
        ``max_bytes`` unless a single line is longer. Errors (disk full) are counted, never
        raised: the worker keeps running; the lines that could not be written are the only loss."""
        while data:
            if self._fd is None:
                self._open()
                if self._fd is None:
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
                return
            if data:
                self.rotate()

    def _append(self, piece: bytes) -> bool:
        try:
            written = 0
            while written < len(piece):
                written += os.write(self._fd, piece[written:])
            self._size += written
            return True
        except OSError as exc:
            self._note_error(OperationError(self.path, "append to log file", exc))
            return False

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


class LogPump:
    """Moves bytes from a worker's output pipe into a RotatingLog, line by line, and keeps the
    last lines in memory so the daemon can explain a failure."""

    def __init__(self, fd: int, log: RotatingLog, tail_lines: int = 200):
        self.fd = fd
        self.log = log
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._partial = b""
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
                self._flush_partial()
                self.close()
                return False
            self._take(chunk)
        return False

    def _take(self, chunk: bytes) -> None:
        data = self._partial + chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0 and len(data) < MAX_PARTIAL_LINE:
            self._partial = data
            return
        if cut == 0:
            cut = len(data)
        whole, self._partial = data[:cut], data[cut:]
        self.log.write(whole)
        for line in whole.decode("utf-8", "replace").splitlines()[-self.tail.maxlen:]:
            self.tail.append(line)

    def _flush_partial(self) -> None:
        if self._partial:
            self._take(b"\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.fd)
