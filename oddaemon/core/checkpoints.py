"""When is a TF checkpoint complete? Pure functions over a directory listing.

What TensorFlow's CheckpointManager does for each save (measured with inotify on a real
``train_loop``)::

    mkdir   ckpt-N_temp/
    rename  ckpt-N_temp/part... -> ckpt-N.data-00000-of-00001   (moved-to in model_dir)
    create, write, close  ckpt-N.index                           (close-write in model_dir)
    rmdir   ckpt-N_temp/
    rename  checkpoint.tmp -> checkpoint                          (the state file, moved-to)
    unlink  ckpt-(N-K).*                                          (max_to_keep = K, ~1 ms later)

Definition: checkpoint N is **complete** when ``ckpt-N.index`` exists, every data shard
``ckpt-N.data-0000i-of-0000S`` (i < S) exists, and ``ckpt-N_temp`` does not. The index is written in
place while the temp directory still exists, so "no temp dir" is what makes a present index a
closed one. N is the save count (ckpt-1 is step 0); the global step comes from the checkpoint.

The daemon re-derives the complete set from a listing on every relevant inotify event (and at
start-up, and on queue overflow), so the rule does not depend on seeing every event.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable

_INDEX = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)\.index$")
_DATA = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)\.data-(?P<shard>\d+)-of-(?P<total>\d+)$")
_TEMP = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)_temp$")

PREFIX = "ckpt"


def complete_checkpoints(names: Iterable[str], stem: str = PREFIX) -> list[int]:
    """Save numbers of the complete checkpoints among ``names`` (a directory listing), ascending."""
    indexes: set[int] = set()
    temps: set[int] = set()
    shards: dict[int, set[int]] = defaultdict(set)
    totals: dict[int, set[int]] = defaultdict(set)
    for name in names:
        if m := _INDEX.match(name):
            if m["stem"] == stem:
                indexes.add(int(m["n"]))
        elif m := _DATA.match(name):
            if m["stem"] == stem:
                n = int(m["n"])
                shards[n].add(int(m["shard"]))
                totals[n].add(int(m["total"]))
        elif m := _TEMP.match(name):
            if m["stem"] == stem:
                temps.add(int(m["n"]))
    complete = []
    for n in indexes - temps:
        if len(totals[n]) == 1:
            (total,) = totals[n]
            if shards[n] == set(range(total)):
                complete.append(n)
    return sorted(complete)


def checkpoint_files(names: Iterable[str], n: int, stem: str = PREFIX) -> list[str]:
    """The files that make up checkpoint ``n`` (index first)."""
    files = [f"{stem}-{n}.index"]
    for name in sorted(names):
        m = _DATA.match(name)
        if m and m["stem"] == stem and int(m["n"]) == n:
            files.append(name)
    return files


def is_checkpoint_event(name: str) -> bool:
    """Whether a change to ``name`` in a model_dir can change the complete set."""
    return name == "checkpoint" or bool(_INDEX.match(name) or _DATA.match(name) or _TEMP.match(name))
