"""service/slurm_output.py: a Slurm worker's output file (written by slurmd, past any rotation of the
daemon's) copied line by line into the job's rotating log, finished and removed at the job's end, and
taken up where it stopped by the daemon that adopts the job after a restart."""

from __future__ import annotations

import os

from oddaemon.service.slurm_output import FollowedOutput, output_path


def append(path: str, text: str) -> None:
    with open(path, "a") as f:
        f.write(text)


def test_whole_lines_are_copied_as_they_come_and_the_rest_at_the_end(tmp_path):
    raw = output_path(str(tmp_path / "job" / "train.log"), "train")
    assert raw == str(tmp_path / "job" / "slurm-train.out")
    os.makedirs(os.path.dirname(raw))
    copied = []
    out = FollowedOutput(raw, copied.append)
    assert out.read() == 0 and copied == []  # not written yet: the job waits in Slurm's queue
    append(raw, "step 1\nstep 2\nstep")
    assert out.read() > 0 and copied == [b"step 1\nstep 2\n"]  # the partial line waits for its end
    append(raw, " 3\noddaemon-failure: oom: out of GPU memory\nlast words")
    out.read()
    assert b"".join(copied) == b"step 1\nstep 2\nstep 3\noddaemon-failure: oom: out of GPU memory\n"
    out.finish()
    assert b"".join(copied).endswith(b"last words\n") and not os.path.exists(raw)
    assert out.explaining_tail()[-1] == "last words" and "oddaemon-failure: oom" in out.explaining_tail()[-2]
    append(raw, "the next attempt's first line\n")  # the next Slurm job writes the same path
    out.finish()  # once only: the next attempt's output is its own follower's
    assert b"next attempt" not in b"".join(copied) and os.path.exists(raw)


def test_a_daemon_that_stops_leaves_how_far_it_copied_and_the_next_goes_on_from_there(tmp_path):
    raw = str(tmp_path / "slurm-train.out")
    first, second = [], []
    out = FollowedOutput(raw, first.append)
    append(raw, "a\nb\npart")
    out.leave()  # the daemon stops; the Slurm job runs on
    append(raw, "ial\nc\n")
    again = FollowedOutput(raw, second.append)
    again.read()
    assert b"".join(first) + b"".join(second) == b"a\nb\npartial\nc\n"  # nothing twice, nothing lost
    again.finish()
    assert not os.path.exists(raw) and not os.path.exists(raw + ".copied")


def test_a_daemon_killed_without_stopping_copies_again_at_most_its_last_read(tmp_path):
    raw = str(tmp_path / "slurm-train.out")
    first, second = [], []
    out = FollowedOutput(raw, first.append)
    append(raw, "a\nb\n")
    out.read()
    append(raw, "c\npart")
    out.read()  # then the daemon is SIGKILLed: no leave()
    append(raw, "ial\nd\n")
    again = FollowedOutput(raw, second.append)  # the next daemon adopts the job
    again.read()
    assert b"".join(first) == b"a\nb\nc\n" and b"".join(second) == b"partial\nd\n"  # nothing twice
    assert not os.path.exists(raw + ".copied.tmp")
