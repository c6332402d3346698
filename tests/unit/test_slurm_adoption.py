"""Which live Slurm job a restarted daemon adopts (core/slurm.py ``adoptable``): Slurm reuses job ids
and a job of the same name may be a leftover of an earlier run, so only a job submitted no earlier
than the daemon's record of submitting that worker is its own. The fixture is a real squeue capture
(as squeue_mixed.txt) with ids, names, states and submit times edited."""

from __future__ import annotations

import os

from oddaemon.core import slurm
from oddaemon.core.slurm import SUBMIT_SKEW_SECONDS, SlurmJob, Submission, adoptable

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "slurm")


def same_name() -> dict[int, SlurmJob]:
    with open(os.path.join(FIXTURES, "squeue_same_name.txt")) as f:
        return slurm.parse_squeue_lines(f.read())


def job(job_id: int, submit_time: int, state: str = "RUNNING") -> SlurmJob:
    return SlurmJob(job_id, "oddaemon-cats-train", state, "None", 0, 0, submit_time)


def test_a_leftover_submitted_before_the_record_is_ignored_and_the_job_submitted_after_it_is_adopted():
    found = same_name()
    assert {j: (x.state, x.submit_time) for j, x in found.items()} == {
        3: ("RUNNING", 1796270000), 7: ("PENDING", 1796281770), 2: ("FAILED", 1796281760)}
    chosen, stale = adoptable(found, Submission(attempt=2, submitted_at=1796281765.5, job_id=7))
    assert chosen.job_id == 7
    assert [j.job_id for j in stale] == [3]  # ended jobs are neither adopted nor reported


def test_a_reused_id_is_not_taken_for_the_recorded_one():
    """The record says job 3, but the live job 3 was submitted long before: an id Slurm gave again."""
    found = same_name()
    chosen, stale = adoptable(found, Submission(attempt=1, submitted_at=1796281765.0, job_id=3))
    assert chosen.job_id == 7 and [j.job_id for j in stale] == [3]
    chosen, stale = adoptable({3: found[3]}, Submission(attempt=1, submitted_at=1796281765.0, job_id=3))
    assert chosen is None and [j.job_id for j in stale] == [3]  # nothing of ours: submit anew


def test_the_recorded_id_wins_over_a_newer_job_of_the_same_name():
    found = {10: job(10, 1000), 11: job(11, 1005)}
    assert adoptable(found, Submission(1, 995.0, job_id=10))[0].job_id == 10
    assert adoptable(found, Submission(1, 995.0))[0].job_id == 11  # sbatch's answer was not recorded: the newest


def test_clocks_may_disagree_by_the_skew():
    found = {5: job(5, 1000)}
    assert adoptable(found, Submission(1, 1000 + SUBMIT_SKEW_SECONDS))[0].job_id == 5
    assert adoptable(found, Submission(1, 1000 + SUBMIT_SKEW_SECONDS + 1))[0] is None


def test_without_a_record_every_live_job_counts_and_an_unknown_submit_time_counts_as_new():
    found = same_name()
    assert adoptable(found, None)[0].job_id == 7
    assert adoptable({4: job(4, 0)}, Submission(1, 5000.0))[0].job_id == 4


def test_the_record_reads_back_and_nonsense_is_no_record():
    record = Submission(3, 1796281765.25, 42)
    assert Submission.from_json(record.to_json()) == record
    assert Submission.from_json({"attempt": 1, "submitted_at": 5, "job_id": None}) == Submission(1, 5.0)
    for bad in (None, [], {"attempt": 1}, {"attempt": "x", "submitted_at": 1}, "text"):
        assert Submission.from_json(bad) is None


def test_the_adopt_look_reads_squeues_format_lines_which_honour_the_filters():
    from datetime import datetime  # noqa: PLC0415

    argv = slurm.adopt_lookup_argv("oddaemon-a-train")
    assert argv[:4] == ["squeue", "--me", "--noheader", "--name=oddaemon-a-train"]
    text = ("41|oddaemon-a-train|RUNNING|None|2026-12-03T13:10:11|node1|0|0|\n"
            "42|oddaemon-a-train|PENDING|Priority|N/A||0|0|\n"
            "12_3|oddaemon-a-train|PENDING|None|2026-12-03T13:10:11||0|0|\n"
            "garbage line\n")
    jobs = slurm.parse_squeue_lines(text)
    assert sorted(jobs) == [41, 42]
    assert jobs[41].state == "RUNNING" and jobs[41].nodes == "node1" and jobs[41].phase == "running"
    assert jobs[41].submit_time == int(datetime(2026, 12, 3, 13, 10, 11).timestamp())
    assert jobs[42].submit_time == 0 and jobs[42].phase == "waiting"  # no submit time: counts as new
