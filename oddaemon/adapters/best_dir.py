"""``model_dir/best``: the best checkpoint's files, hard-linked from its pin, with ``best.json``, swapped in whole."""

from __future__ import annotations

import json
import os
import shutil

from oddaemon.adapters.store import atomic_write_json

BEST_INFO = "best.json"


class BestDir:
    """A job's ``model_dir/best``. The new content is staged in ``.oddaemon/best.tmp`` and renamed into
    place (the previous content moved aside to ``.oddaemon/best.old`` first), so ``best/`` is always
    one whole checkpoint with the ``best.json`` that describes it. No decision about which checkpoint
    is best: ``evalbook`` makes it."""

    def __init__(self, model_dir: str):
        self.path = os.path.join(model_dir, "best")
        self.private = os.path.join(model_dir, ".oddaemon")

    def current(self) -> int | None:
        """ckpt-N held in ``best/`` now, from its best.json (None: none, or unreadable)."""
        try:
            with open(os.path.join(self.path, BEST_INFO)) as f:
                return int(json.load(f)["checkpoint"].split("-")[1])
        except (OSError, ValueError, KeyError, IndexError):
            return None

    def swap_in(self, files: list[str], info: dict) -> int | None:
        """Make ``files`` (a checkpoint's pinned files, hard-linked, not copied) the content of ``best/``,
        with ``best.json`` holding ``info``. Returns the number of the checkpoint it held before.
        OSError (naming the path) when a link or rename fails; ``best/`` then holds what it held."""
        previous = self.current()
        staging = os.path.join(self.private, "best.tmp")
        shutil.rmtree(staging, ignore_errors=True)
        os.makedirs(staging)
        for source in files:
            os.link(source, os.path.join(staging, os.path.basename(source)))
        atomic_write_json(os.path.join(staging, BEST_INFO), info)
        old = os.path.join(self.private, "best.old")
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(self.path):
            os.rename(self.path, old)
        os.rename(staging, self.path)
        shutil.rmtree(old, ignore_errors=True)
        return previous
