"""Following one delivered spool file to its verdict (``oddaemon.cli.receipt``), with real files."""

from __future__ import annotations

import os

from oddaemon.adapters.spool import Spool
from oddaemon.cli.receipt import locate


def spool_at(tmp_path) -> Spool:
    spool = Spool(str(tmp_path / "spool"))
    spool.ensure_dirs()
    return spool


def test_a_delivered_file_is_followed_through_cur_to_accepted(tmp_path):
    spool = spool_at(tmp_path)
    src = tmp_path / "job.toml"
    src.write_text('name = "job"\n')
    mine = spool.submit(str(src))
    assert locate(spool, mine).place == "new"
    held = spool.hold(mine.path)
    where = locate(spool, mine)
    assert (where.place, where.path, where.decided) == ("cur", held, False)
    accepted = spool.accept(held, "the-job.v2")
    where = locate(spool, mine)
    assert (where.place, where.path, where.decided, where.job_name) == ("accepted", accepted, True, "the-job.v2")


def test_an_older_verdict_of_the_same_name_or_a_shared_prefix_is_not_mine(tmp_path):
    spool = spool_at(tmp_path)
    src = tmp_path / "fixme.toml"
    src.write_text("broken")
    first = spool.submit(str(src))
    spool.reject(first.path, "the first one's error\n")
    prefix = tmp_path / "fixme_old.toml"
    prefix.write_text("also broken")
    spool.reject(spool.submit(str(prefix)).path, "another file's error\n")
    src.write_text("fixed")
    second = spool.submit(str(src))  # the same name, a second later
    assert locate(spool, second).place == "new"
    accepted = spool.accept(second.path, "fixme")
    assert locate(spool, second).path == accepted
    where = locate(spool, first)
    assert where.place == "rejected" and open(where.error_path).read() == "the first one's error\n"


def test_a_file_taken_out_of_the_spool_is_gone_and_a_new_file_of_its_name_is_not_it(tmp_path):
    spool = spool_at(tmp_path)
    src = tmp_path / "x.toml"
    src.write_text("a")
    mine = spool.submit(str(src))
    os.rename(mine.path, tmp_path / "elsewhere.toml")
    (tmp_path / "other.toml").write_text("b")
    os.rename(tmp_path / "other.toml", mine.path)  # someone else's file under my name in new/
    assert locate(spool, mine).place == "gone"
