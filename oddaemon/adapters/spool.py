"""The Maildir-like spool.

    spool/tmp/       writers create files here ...
    spool/new/       ... and rename them in (``cp job.toml spool/new/`` also works: the daemon acts
                     on close-after-write or moved-to, never on a half-written file)
    spool/cur/       files being checked by a preflight worker (a restart checks them again)
    spool/accepted/  files the daemon took (moved out of new/, so never read twice)
    spool/rejected/  files it refused, each with a sibling ``.error`` explaining every problem

No submitted file is ever deleted: every file that lands in ``new/`` ends in ``accepted/`` or
``rejected/``.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
import uuid
from dataclasses import dataclass

from oddaemon.adapters.store import atomic_write, fsync_dir, remove_stale_temps, rename_noreplace
from oddaemon.core.errors import OperationError

TEMP_SUFFIXES = ("~", ".swp", ".swx", ".tmp", ".part", ".partial")


def is_candidate(filename: str) -> bool:
    """Only ``*.toml`` names count; dotfiles and editor/temporary names are ignored."""
    if not filename.endswith(".toml") or filename.startswith((".", "#", "~")):
        return False
    return not filename.endswith(TEMP_SUFFIXES) and len(filename) > len(".toml")


@dataclass(frozen=True)
class Delivery:
    """A file put into ``new/``: its path there and its identity (device, inode), which every later
    rename inside the spool keeps (see ``oddaemon.cli.receipt``)."""

    path: str
    dev: int
    ino: int


NAME_MAX = 255
_ROOM = len(".toml.error") + len(".99999")  # what reject() adds to a stem, at most


def short_stem(stem: str) -> str:
    """``stem`` if ``stem.toml.error`` (and a ``.N`` to make it unique) fits NAME_MAX bytes, else its
    first bytes and a hash of the whole."""
    raw = os.fsencode(stem)
    if len(raw) + _ROOM <= NAME_MAX:
        return stem
    digest = hashlib.sha256(raw).hexdigest()[:12]
    cut = raw[:NAME_MAX - _ROOM - len(digest) - 1]
    return os.fsdecode(cut) + "~" + digest  # (a character cut in two stays bytes: fine in a file name)


class NotARegularFile(Exception):
    """The spool entry is not something the daemon will read; the message says why."""


def _refuse_hard_link(st: os.stat_result) -> None:
    if st.st_nlink > 1:
        raise NotARegularFile(f"it is a hard link ({st.st_nlink} links to one file); submit a copy of the file "
                              "(oddaemon submit copies it)")


class Spool:
    def __init__(self, root: str):
        self.root = root
        self.tmp = os.path.join(root, "tmp")
        self.new = os.path.join(root, "new")
        self.cur = os.path.join(root, "cur")
        self.accepted = os.path.join(root, "accepted")
        self.rejected = os.path.join(root, "rejected")

    def ensure_dirs(self) -> None:
        for d in (self.root, self.tmp, self.new, self.cur, self.accepted, self.rejected):
            try:
                os.makedirs(d, exist_ok=True)
            except OSError as exc:
                raise OperationError(d, "create spool directory", exc) from exc
        for d in (self.tmp, self.new):
            remove_stale_temps(d)  # the daemon's own half-written files (".tmp-*"), never a user's

    def scan(self, directory: str | None = None) -> list[str]:
        """Candidate files in new/ (or ``directory``), oldest first (by mtime, then name)."""
        directory = directory or self.new
        try:
            names = [n for n in os.listdir(directory) if is_candidate(n)]
        except OSError as exc:
            raise OperationError(directory, "list spool directory", exc) from exc
        entries = []
        for n in names:
            path = os.path.join(directory, n)
            try:
                entries.append((os.lstat(path).st_mtime, n, path))
            except FileNotFoundError:
                continue
        return [p for _, _, p in sorted(entries)]

    @staticmethod
    def read(path: str, max_bytes: int) -> bytes:
        """Read a spool file without following links or blocking on FIFOs.

        Raises FileNotFoundError if it vanished, NotARegularFile for anything that must be set
        aside unread (a symlink, a hard link, a FIFO, a directory, a device). A hard link is refused
        because it may name a file its submitter cannot read, which the daemon could."""
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            raise NotARegularFile("it is a symbolic link; submit the file itself (oddaemon submit copies it)")
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode)
                    else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "not a regular file")
            raise NotARegularFile(f"it is {kind}; only regular files are read")
        _refuse_hard_link(st)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NotARegularFile("it is not a regular file; only regular files are read")
            _refuse_hard_link(st)  # linked between the lstat and the open
            chunks, total = [], 0
            while total <= max_bytes:
                chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def deliver(self, data: bytes, name: str) -> str:
        """The daemon's own delivery (D-Bus SubmitText): written in tmp/, renamed into new/, so a
        daemon killed half-way leaves only a temporary file in tmp/ (removed at the next start)."""
        return self._place(data, name, "deliver to").path

    def _place(self, data: bytes, name: str, operation: str) -> Delivery:
        """Write ``data`` in tmp/, then rename it into new/ as ``name``, never replacing a file of that
        name still waiting there; on failure nothing is left behind."""
        tmp = os.path.join(self.tmp, f".{uuid.uuid4().hex}.{name}")
        atomic_write(tmp, data, mode=0o640)
        st = os.lstat(tmp)  # before the rename: the daemon may move it on at once
        dest = os.path.join(self.new, name)
        try:
            rename_noreplace(tmp, dest)
        except FileExistsError:
            os.unlink(tmp)
            raise OperationError(dest, operation, "a file with this name is already waiting in the spool; "
                                                  "rename your file or wait for it to be picked up") from None
        except OSError as exc:
            os.unlink(tmp)
            raise OperationError(dest, operation, exc) from exc
        return Delivery(dest, st.st_dev, st.st_ino)

    def hold(self, path: str) -> str:
        """Move a file from new/ to cur/ while its preflight runs."""
        dest = self._unique(self.cur, os.path.basename(path)[:-5], ".toml")
        self._move(path, dest, "move job file under preflight to")
        return dest

    def accept(self, path: str, name: str) -> str:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        dest = self._unique(self.accepted, f"{name}.{stamp}", ".toml")
        self._move(path, dest, "move accepted job file to")
        return dest

    def reject(self, path: str, error_text: str) -> tuple[str, str]:
        """Move ``path`` to rejected/ with its ``.error`` beside it. A name too long for the ``.error``
        sibling (NAME_MAX is 255 bytes) is shortened, unique by a hash of the original; the original
        name is inside the ``.error`` text."""
        base = os.path.basename(path)
        stem = short_stem(base[:-5] if base.endswith(".toml") else base)
        dest = self._unique(self.rejected, stem, ".toml")
        error_path = dest + ".error"
        atomic_write(error_path, error_text.encode())
        self._move(path, dest, "move rejected job file to")
        return dest, error_path

    def submit(self, source: str) -> Delivery:
        """Copy ``source`` into the spool the Maildir way: write in tmp/, then rename into new/."""
        base = os.path.basename(source)
        if not is_candidate(base):
            raise OperationError(source, "submit", "the file name must end in .toml and not start with a dot")
        try:
            with open(source, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise OperationError(source, "read job file", exc) from exc
        return self._place(data, base, "submit to")

    @staticmethod
    def _unique(directory: str, stem: str, suffix: str) -> str:
        candidate = os.path.join(directory, stem + suffix)
        n = 1
        while os.path.lexists(candidate) or os.path.lexists(candidate + ".error"):
            n += 1
            candidate = os.path.join(directory, f"{stem}.{n}{suffix}")
        return candidate

    @staticmethod
    def _move(src: str, dest: str, operation: str) -> None:
        try:
            os.rename(src, dest)
        except OSError as exc:
            raise OperationError(dest, operation, exc) from exc
        fsync_dir(os.path.dirname(dest))
