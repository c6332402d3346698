"""The log pump keeps a worker's own word on its failure (its ``oddaemon-failure:`` line) however
long the traceback after it, and the failure read from the pumped output is that one."""

from __future__ import annotations

import os

from oddaemon.adapters.logs import LogPump, RotatingLog
from oddaemon.core.failures import classify_failure


def pumped(tmp_path, chunks: list[bytes]) -> LogPump:
    r, w = os.pipe()
    pump = LogPump(r, RotatingLog(str(tmp_path / "train.log"), 10_000_000, 1), tail_lines=200)
    for chunk in chunks:
        os.write(w, chunk)
        pump.pump()
    os.close(w)
    while pump.pump():
        pass
    return pump


def test_the_marker_outlives_a_traceback_longer_than_the_tail(tmp_path):
    marker = b"oddaemon-failure: input: corrupt input record in /d/train-00000-of-00002.tfrecord at record 2"
    frames = b"".join(b'  File "/x/f%d.py", line %d, in f\n' % (i, i) for i in range(1000))
    pump = pumped(tmp_path, [b"warning\n", marker + b" (corrupted record at 33415): replace it\n", frames[:5000],
                             frames[5000:], b"tensorflow.python.framework.errors_impl.DataLossError: Graph execution "
                                            b"error:\n"])
    assert all(not line.startswith("oddaemon-failure") for line in pump.tail)  # scrolled out of the tail
    failure = classify_failure(1, pump.explaining_tail())
    assert failure.kind == "input" and "train-00000-of-00002.tfrecord at record 2" in failure.message
    assert open(tmp_path / "train.log", "rb").read().count(b"oddaemon-failure") == 1  # the log is unchanged


def test_the_last_marker_wins_and_no_marker_means_none(tmp_path):
    pump = pumped(tmp_path, [b"oddaemon-failure: oom: out of GPU memory (a)\nx\n", b"oddaemon-failure: input: "
                                                                               b"no input records: /d/*\n"])
    assert pump.marker == "oddaemon-failure: input: no input records: /d/*"
    assert pump.explaining_tail() == list(pump.tail)  # still in the tail: nothing added
    assert pumped(tmp_path, [b"just output\n"]).marker is None
