"""Bounded polling of a model_dir, for writers the daemon's inotify cannot see. Pure: what one poll
saw, and whether it differs from the poll before; ``service/model_dir_poller.py`` lists and times.

inotify reports only what this host's kernel does to a file. A Slurm node writing a checkpoint to a
``model_dir`` on NFS (or any network or FUSE file system) changes the server's files, and the
daemon's host hears nothing. So for such model_dirs the daemon also lists them every
``[cluster] model_dir_poll_seconds``, and a poll that sees something new calls the same two
callbacks inotify events call (``service/watch.py``): ``on_checkpoints`` (the evaluation side
re-lists and pins, ``service/evaluation.py``) and ``on_progress`` (event files are read on).
Both are idempotent (the evaluation book adds a checkpoint once, however often it is reported), so a
change seen by inotify and by the poller is handled once.

What a poll compares: the checkpoint names in ``model_dir`` (completeness is a function of the
names, ``core/checkpoints.py``, so the names are all the evaluation side needs), and the size and
modification time of each file in ``train/``, ``eval/`` and ``eval/<name>/`` (the event files grow
in place). A poll's cost is one listing of each of those directories and one stat per event file:
it does not grow with the job's history (pins live in ``model_dir/.oddaemon``, which is not read).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from oddaemon.core.checkpoints import is_checkpoint_event

EVENT_DIRS = ("train", "eval")  # (and each eval/<name>/: the evaluator's, when the eval input is named)


@dataclass(frozen=True)
class Seen:
    """What one poll of a model_dir saw. ``listed``: whether model_dir could be listed at all."""

    checkpoint_names: frozenset[str]
    event_files: frozenset[tuple[str, int, int]]  # (path below model_dir, size, mtime_ns)
    listed: bool = True


NOTHING = Seen(frozenset(), frozenset(), listed=False)


@dataclass(frozen=True)
class Changes:
    checkpoints: bool = False  # the set of checkpoint names changed: re-list and pin
    progress: bool = False  # an event file grew, appeared or went: read on

    def __bool__(self) -> bool:
        return self.checkpoints or self.progress


def seen(model_dir_names: Iterable[str] | None, event_files: Iterable[tuple[str, int, int]] = ()) -> Seen:
    """One poll's view: the names in model_dir (None: it could not be listed) and the event files."""
    if model_dir_names is None:
        return NOTHING
    return Seen(frozenset(n for n in model_dir_names if is_checkpoint_event(n)), frozenset(event_files))


def changes(before: Seen | None, now: Seen) -> Changes:
    """What changed from ``before`` (None: the first poll, which only takes its bearings: the watcher's
    start already read the directory) to ``now``. A model_dir that cannot be listed changes nothing:
    the next poll that lists it again compares with the last poll that did."""
    if before is None or not now.listed:
        return Changes()
    if not before.listed:
        return Changes(checkpoints=True, progress=True)  # back after a gap: whatever happened meanwhile
    return Changes(checkpoints=now.checkpoint_names != before.checkpoint_names,
                   progress=now.event_files != before.event_files)


def kept(before: Seen | None, now: Seen) -> Seen | None:
    """What the next poll compares with: the last poll that could list model_dir."""
    return now if now.listed or before is None else before


def effective_interval(setting: float | None, backend: str, slurm_default: float) -> float:
    """Seconds between two polls (0: no polling). ``setting`` None is "auto": ``slurm_default`` for the
    Slurm backend (its nodes write model_dirs from other hosts), off for the local one (this host's
    own writes, which inotify sees)."""
    if setting is None:
        return slurm_default if backend == "slurm" else 0.0
    return setting

