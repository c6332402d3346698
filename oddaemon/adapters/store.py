"""Persistent state: job records written atomically, runtime data (pids) kept apart.

Paths under ``state_dir`` follow ``oddaemon.core.layout``: ``jobs/<name>.json`` saved job records
(the truth about a job), ``work/<name>/job.json`` what the worker is handed (spec + attempt),
``runtime/<name>.json`` pids of live workers (only meaningful while the daemon that wrote it runs).

Every write is tmp file + fsync + rename + fsync of the directory, so a SIGKILL at any moment
leaves either the old or the new content, never a torn file. A SIGKILL between the temporary
file's creation and its rename leaves that ``.tmp-*`` file behind; the next daemon removes them
(``remove_stale_temps``) as it loads the directory, so they never pile up.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator

from oddaemon.core import layout
from oddaemon.core.errors import OperationError

TEMP_PREFIX = ".tmp-"


def atomic_write(path: str, data: bytes, mode: int = 0o644) -> None:
    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
    except OSError as exc:
        raise OperationError(directory, "create a temporary file in", exc) from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise OperationError(path, "write", exc) from exc
    try:
        fsync_dir(directory)
    except OSError as exc:
        raise OperationError(directory, "sync directory", exc) from exc


def remove_stale_temps(directory: str) -> int:
    """Remove the temporary files that writes interrupted before their rename left in ``directory``
    (only safe while nothing writes there: at start-up, or on the loop thread between writes).
    Returns how many were removed."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(TEMP_PREFIX)]
    except OSError:
        return 0
    removed = 0
    for name in names:
        try:
            os.unlink(os.path.join(directory, name))
            removed += 1
        except OSError:
            pass
    return removed


def fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with FileExistsError instead of replacing ``dst`` (renameat2)."""
    import ctypes  # noqa: PLC0415

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:  # very old glibc: a check, then a plain rename (a narrow race)
        if os.path.lexists(dst):
            raise FileExistsError(17, "File exists", dst)
        os.rename(src, dst)
        return
    if renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), dst)


def atomic_write_json(path: str, obj: object) -> None:
    atomic_write(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


class Store:
    def __init__(self, state_dir: str):
        self.state_dir = state_dir
        self.jobs_dir = layout.jobs_dir(state_dir)
        self.work_dir = layout.work_dir(state_dir)
        self.runtime_dir = layout.runtime_dir(state_dir)

    def ensure_dirs(self) -> None:
        for d in (self.state_dir, self.jobs_dir, self.work_dir, self.runtime_dir):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as exc:
                raise OperationError(d, "create directory", exc) from exc

    # -- saved job records
    def save_job(self, name: str, record: dict) -> None:
        atomic_write_json(layout.saved_job(self.state_dir, name), record)

    def load_jobs(self) -> Iterator[tuple[str, dict | None, str]]:
        """Yield (path, record or None, error text) for every saved record."""
        remove_stale_temps(self.jobs_dir)
        try:
            names = sorted(os.listdir(self.jobs_dir))
        except FileNotFoundError:
            return
        for entry in names:
            path = os.path.join(self.jobs_dir, entry)
            if entry.startswith(".") or not entry.endswith(".json"):
                continue
            try:
                with open(path, "rb") as f:
                    yield path, json.loads(f.read()), ""
            except (OSError, ValueError) as exc:
                yield path, None, str(exc)

    # -- worker hand-off
    def job_dir(self, name: str) -> str:
        return layout.job_dir(self.state_dir, name)

    def write_worker_job(self, name: str, payload: dict) -> str:
        d = self.job_dir(name)
        os.makedirs(d, exist_ok=True)
        remove_stale_temps(d)
        path = layout.worker_job(self.state_dir, name)
        atomic_write_json(path, payload)
        return path

    # -- runtime data
    def runtime_path(self, name: str) -> str:
        return layout.runtime_file(self.state_dir, name)

    def save_runtime(self, name: str, data: dict) -> None:
        atomic_write_json(self.runtime_path(name), data)

    def clear_runtime(self, name: str) -> None:
        try:
            os.unlink(self.runtime_path(name))
        except FileNotFoundError:
            pass

    def load_runtime(self) -> Iterator[tuple[str, dict]]:
        remove_stale_temps(self.runtime_dir)
        try:
            entries = sorted(os.listdir(self.runtime_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if not entry.endswith(".json") or entry.startswith("."):
                continue
            path = os.path.join(self.runtime_dir, entry)
            try:
                with open(path, "rb") as f:
                    yield entry[:-5], json.loads(f.read())
            except (OSError, ValueError):
                continue
