"""Where did *my* job file go? Following one delivered spool file to its verdict, client side.

``oddaemon submit`` delivers a file into ``spool/new/`` and then waits for the daemon's verdict on
exactly that file. Names are no token for that: the daemon moves a file from ``new/`` to ``cur/``
(preflight), ``accepted/`` or ``rejected/`` under other names (``NAME.STAMP.toml``, ``stem.2.toml``),
and a fixed file resubmitted a second later, or ``zz.toml`` after ``zz_bad.toml``, shares a prefix
with an older verdict. The token is the file's inode: the spool only renames files within one file
system (a rename keeps the inode) and never deletes one, so no other spool file can have it while
ours exists. ``locate`` finds it again by the inode the directory entries carry (``d_ino``: no
``stat`` per entry), so following a file costs one directory read per poll however full
``accepted/`` is.

Pure apart from the directory reads; nothing here talks to the daemon.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from oddaemon.adapters.spool import Delivery, Spool

# accepted/NAME.YYYYmmddTHHMMSS[.N].toml (Spool.accept)
_ACCEPTED = re.compile(r"^(?P<name>.+)\.\d{8}T\d{6}(?:\.\d+)?\.toml$")


@dataclass(frozen=True)
class Whereabouts:
    place: str  # "new", "cur" (preflight running), "accepted", "rejected", or "gone"
    path: str | None = None

    @property
    def decided(self) -> bool:
        return self.place in ("accepted", "rejected", "gone")

    @property
    def job_name(self) -> str | None:
        """The job's name, read from an accepted file's name."""
        if self.place != "accepted" or self.path is None:
            return None
        m = _ACCEPTED.match(os.path.basename(self.path))
        return m["name"] if m else None

    @property
    def error_path(self) -> str | None:
        return self.path + ".error" if self.place == "rejected" and self.path else None


def _same(path: str, delivery: Delivery) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (delivery.dev, delivery.ino)


def _find(directory: str, delivery: Delivery) -> str | None:
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.inode() == delivery.ino and _same(entry.path, delivery):
                    return entry.path
    except OSError:
        return None
    return None


def locate(spool: Spool, delivery: Delivery) -> Whereabouts:
    """Where the delivered file is now. The rejected file's ``.error`` is written before the file is
    moved there, so a file found in ``rejected/`` has its explanation beside it."""
    for _look in range(2):  # a second look: the file may have been between two directories, mid-move
        if _same(delivery.path, delivery):
            return Whereabouts("new", delivery.path)
        for place, directory in (("cur", spool.cur), ("accepted", spool.accepted), ("rejected", spool.rejected)):
            found = _find(directory, delivery)
            if found is not None:
                return Whereabouts(place, found)
    return Whereabouts("gone")
