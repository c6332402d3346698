"""A job's evaluation pins: hard links that keep each complete checkpoint until it is evaluated.

Each new complete checkpoint is hard-linked into ``model_dir/.oddaemon/pins`` at once (same file
system, no copy), so ``checkpoint_max_to_keep`` cannot delete it before it is evaluated; within
the disk budget of ``pinbudget``. ``best/`` is made from these links (``best_dir.py``).

No decisions about which checkpoint is best or due: ``evalbook`` makes those.
"""

from __future__ import annotations

import logging
import os

from oddaemon.core.checkpoints import checkpoint_files
from oddaemon.core.evalbook import PENDING, EvalBook
from oddaemon.core.pinbudget import PinBudget, release_reason, to_release

log = logging.getLogger("oddaemon.adapters.pins")


def checkpoint_names(directory: str, n: int) -> list[str]:
    """The files of checkpoint ``n`` (``ckpt-N.*``) in ``directory`` ([] when it cannot be listed)."""
    try:
        return [x for x in os.listdir(directory) if x.startswith(f"ckpt-{n}.")]
    except OSError:
        return []


def remove_checkpoint(directory: str, n: int) -> None:
    """Unlink checkpoint ``n``'s files in ``directory`` (links of the daemon's own: pins)."""
    for name in checkpoint_names(directory, n):
        try:
            os.unlink(os.path.join(directory, name))
        except OSError:
            pass


class Pins:
    def __init__(self, name: str, model_dir: str):
        self.name = name
        self.model_dir = model_dir
        self.dir = os.path.join(model_dir, ".oddaemon", "pins")
        self.sizes: dict[int, int] = {}  # ckpt-N -> bytes of its pinned files
        self.files: dict[int, list[str]] = {}  # ckpt-N -> the names pinned (listing pins/ per checkpoint is O(pins))
        self.total = 0  # sum(self.sizes.values()): a bound on what only the pins hold
        self._restored_counted = False  # pins a previous daemon made are counted at the first budget check

    def prefix(self, n: int) -> str:
        return os.path.join(self.dir, f"ckpt-{n}")

    def names(self, n: int) -> list[str]:
        return list(self.files[n]) if n in self.files else checkpoint_names(self.dir, n)

    def paths(self, n: int) -> list[str]:
        """The pinned files of checkpoint ``n``, as paths."""
        return [os.path.join(self.dir, name) for name in self.names(n)]

    def make_dir(self) -> None:
        """Create pins/ (a failure is logged: model_dir read-only or gone; ``pin`` tries again, and says so)."""
        try:
            os.makedirs(self.dir, exist_ok=True)
        except OSError as exc:
            log.warning("job %s: cannot create %s: %s", self.name, self.dir, exc.strerror)

    def pin(self, n: int, listing: list[str]) -> str | None:
        """Hard-link checkpoint ``n`` into pins/: its prefix there; None if it vanished; in place if links fail."""
        try:
            os.makedirs(self.dir, exist_ok=True)  # (again: model_dir may have been deleted and re-created)
            names = checkpoint_files(listing, n)
            for name in names:
                target = os.path.join(self.dir, name)
                if not os.path.exists(target):
                    os.link(os.path.join(self.model_dir, name), target)
            self.files[n] = list(names)
            self.size(n)
        except FileNotFoundError:
            self.unpin(n)
            return None
        except OSError as exc:
            self.unpin(n)
            log.warning("job %s: cannot pin ckpt-%d in %s (%s); evaluating it in place, where max_to_keep may "
                        "delete it first", self.name, n, self.dir, exc.strerror)
            return os.path.join(self.model_dir, f"ckpt-{n}")
        return self.prefix(n)

    def unpin(self, n: int) -> None:
        self.total -= self.sizes.pop(n, 0)
        names = self.files.pop(n, None)
        if names is None:
            remove_checkpoint(self.dir, n)
            return
        for name in names:
            try:
                os.unlink(os.path.join(self.dir, name))
            except OSError:
                pass

    def size(self, n: int) -> int:
        if n not in self.sizes:
            total = 0
            for name in self.names(n):
                try:
                    total += os.stat(os.path.join(self.dir, name)).st_size
                except OSError:
                    pass
            self.sizes[n] = total
            self.total += total
        return self.sizes[n]

    # ---- the disk budget
    def keep_within(self, book: EvalBook, listing: set[str], budget: PinBudget, cap: int, now: float) -> list[int]:
        """Release the oldest waiting checkpoints that only their pins hold while the file system is
        below its free-space floor or this job's pins hold more than ``cap`` (0: none); each is
        recorded skipped in ``book`` with the reason. Returns what was released."""
        if not self._restored_counted:
            self._restored_counted = True
            for c in book.pending() + [c for c in (book.running(), book.best()) if c is not None]:
                if c.prefix.startswith(self.dir):
                    self.size(c.n)
        try:
            fs = os.statvfs(self.dir)
        except OSError:
            return []
        free, floor = fs.f_bavail * fs.f_frsize, budget.floor(fs.f_blocks * fs.f_frsize)
        if free >= floor and (not cap or self.total <= cap):
            return []  # within budget even counting every pin (most checks end here, in O(1))
        held_open = book.pending() + [c for c in (book.running(), book.best()) if c is not None]
        alone = [c for c in held_open if c.prefix.startswith(self.dir)
                 and f"ckpt-{c.n}.index" not in listing]  # TF deleted its copy: the pin alone holds it
        held = sum(self.size(c.n) for c in alone)
        if free >= floor and (not cap or held <= cap):
            return []
        never = (book.newest, book.best_n, book.final_n)  # the newest, the best, the final one
        waiting = sorted((c.n, self.size(c.n)) for c in alone if c.state == PENDING and c.n not in never)
        released = to_release(waiting, held, free, floor, cap)
        if released:
            why = release_reason(free, floor, held, cap)
            for n in released:
                self.unpin(n)
                book.release(n, now, why)
            log.warning("job %s: %s; released ckpt-%s", self.name, why, ", ckpt-".join(map(str, released)))
        return released
