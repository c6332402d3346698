"""Writers the daemon's inotify cannot see, as a node writing to NFS is for the daemon's host.

``UnseenRoot(backing, view)`` mounts ``view`` as a FUSE pass-through (``bindfs``) of ``backing``:
the daemon reads, lists, pins (hard links) and watches through ``view``, and whatever is written to
``backing`` directly never reaches an inotify watch on ``view`` (FUSE does not forward changes made
behind it; measured: no event at all), exactly as NFS does not forward another client's writes.
A writer that uses the same paths as the daemon runs in a mount namespace of its own where
``backing`` is bind-mounted over ``view`` (``unseen_argv``): the path in the job file is the same on
both sides, as a shared mount is on a cluster, and its writes go around the FUSE mount.
"""

from __future__ import annotations

import functools
import os
import shutil
import stat
import subprocess

from tests.support.harness import wait_for

_BIND_AND_RUN = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'


@functools.cache
def missing() -> str | None:
    """Why such a root cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "FUSE and mount namespaces for an unseen writer need root"
    absent = [b for b in ("bindfs", "unshare", "fusermount") if shutil.which(b) is None]
    if absent:
        return f"{', '.join(absent)} missing (Debian: bindfs, util-linux)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, text=True,
                           timeout=30, check=False)
    if probe.returncode != 0:
        return f"no mount namespace of its own here: {probe.stderr.strip()}"
    return None


class UnseenRoot:
    def __init__(self, backing: str, view: str):
        self.backing = backing
        self.view = view

    def mount(self) -> UnseenRoot:
        os.makedirs(self.backing, exist_ok=True)
        os.makedirs(self.view, exist_ok=True)
        subprocess.run(["bindfs", "--no-allow-other", self.backing, self.view], check=True, capture_output=True,
                       timeout=30)
        wait_for(lambda: os.path.ismount(self.view), 10, what=f"the FUSE mount on {self.view}")
        return self

    def unmount(self) -> None:
        """Unmount the view (also when its bindfs is gone: a test's teardown kills what runs under its root)."""
        subprocess.run(["fusermount", "-u", "-z", self.view], check=False, capture_output=True, timeout=30)

    def unseen_argv(self, *argv: str) -> list[str]:
        """``argv`` run with ``backing`` bound over ``view``: its writes under ``view`` are unseen."""
        return ["unshare", "-m", "--propagation", "private", "sh", "-c", _BIND_AND_RUN, "unseen", self.backing,
                self.view, *argv]

    def unseen_python(self, path: str, python: str) -> str:
        """A ``[worker] python`` at ``path`` that runs ``python`` as an unseen writer."""
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexec " + " ".join(f"'{a}'" for a in self.unseen_argv(python)) + ' "$@"\n')
        os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        return path
