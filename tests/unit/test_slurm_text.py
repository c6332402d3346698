"""core/slurm.py on what Slurm 22.05 prints (tests/fixtures/slurm/squeue_mixed.txt: the poll's
``squeue --me --states=all --Format=...`` captured from a real one-node cluster: completed, failed
with exit 3, cancelled while pending, running, pending for resources, held) and on states that
capture does not show, from squeue's man page."""

from __future__ import annotations

import os

import pytest

from oddaemon.core import slurm

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "slurm")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_squeue_of_a_real_cluster():
    assert slurm.poll_argv() == ["squeue", "--me", "--noheader", "--states=all", f"--Format={slurm.SQUEUE_FORMAT}"]
    jobs = slurm.parse_squeue_lines(fixture("squeue_mixed.txt"))
    assert {j: (x.name, x.state, x.reason, x.nodes) for j, x in jobs.items()} == {
        1: ("oddtest-done", "COMPLETED", "None", "localhost"), 2: ("oddtest-fail", "FAILED", "NonZeroExitCode", "localhost"),
        3: ("odd-long", "RUNNING", "None", "localhost"), 4: ("odd-cancel", "CANCELLED", "Resources", ""),
        5: ("odd-pend", "RUNNING", "None", "localhost"), 6: ("odd-more", "PENDING", "Resources", ""),
        7: ("odd-held", "PENDING", "JobHeldUser", "")}
    assert [jobs[j].phase for j in (2, 3, 6, 7)] == ["ended", "running", "waiting", "waiting"]
    assert slurm.ending(jobs[2]) == slurm.Ending(3)  # exit_code 768: the script's exit 3
    assert slurm.ending(jobs[4]) == slurm.Ending(-15)  # cancelled
    assert slurm.ending(jobs[1]) == slurm.Ending(0)
    assert all(x.submit_time > 1_700_000_000 for x in jobs.values())


@pytest.mark.parametrize("state, kind", [("TIMEOUT", "time-limit"), ("DEADLINE", "time-limit"),
                                         ("NODE_FAIL", "node-fail"), ("BOOT_FAIL", "node-fail"),
                                         ("PREEMPTED", "preempted"), ("OUT_OF_MEMORY", "host-oom")])
def test_states_slurm_ends_a_job_in_carry_their_failure_kind(state, kind):
    end = slurm.ending(slurm.SlurmJob(7, "oddaemon-a-train", state, "x", 9, 0, 0))
    assert end.kind == kind and "Slurm job 7" in end.message and state in end.message
    assert end.returncode == -9  # killed by signal 9


@pytest.mark.parametrize("state, phase", [("COMPLETING", "running"), ("REQUEUED", "waiting"),
                                          ("SUSPENDED", "waiting"), ("CONFIGURING", "waiting"),
                                          ("SPECIAL_EXIT", "ended")])
def test_phases(state, phase):
    assert slurm.SlurmJob(1, "n", state, "", 0, 0, 0).phase == phase


def test_sbatch_answers():
    assert slurm.parse_sbatch("42\n") == (42, "")
    assert slurm.parse_sbatch("sbatch: warning: x\n43;gpucluster\n") == (43, "gpucluster")
    for bad in ("", "Submitted batch job 44", "sbatch: error: Batch job submission failed"):
        with pytest.raises(ValueError, match="no job id"):
            slurm.parse_sbatch(bad)


def test_squeue_lines_it_cannot_read_are_left_out():
    text = ("slurm_load_jobs error: Unable to contact slurm controller\n"
            "12_3|oddaemon-a-train|PENDING|None|2026-12-03T13:10:11||0|0|\n"  # an array job: not one of ours
            "x|y|RUNNING|None|N/A||0|0|\n" "5|n|RUNNING|None|N/A|(null)|zz|1|\n" "6|too|few|\n")
    jobs = slurm.parse_squeue_lines(text)
    assert list(jobs) == [5]
    assert (jobs[5].submit_time, jobs[5].nodes, jobs[5].exit_status, jobs[5].restarts) == (0, "", 0, 1)


def test_scontrol_line():
    line = ("JobId=1 JobName=oddtest-a UserId=root(0) JobState=FAILED Reason=NonZeroExitCode Restarts=0 "
            "ExitCode=3:0 NodeList=localhost")
    job = slurm.parse_scontrol_job(line)
    assert (job.job_id, job.state, slurm.ending(job)) == (1, "FAILED", slurm.Ending(3))
    assert slurm.parse_scontrol_job("slurm_load_jobs error: Invalid job id specified") is None


def test_sbatch_command_line():
    settings = slurm.SlurmSettings(partition="gpu", eval_partition="cpu", account="vision", qos="normal",
                                   time_limit="12:00:00", gres_name="gpu", extra_args=("--mem=16G",))
    argv = slurm.sbatch_argv(settings, "effdet d0", "train", 2, "/w/slurm-train.sh", "/log/effdet/train.log")
    assert argv[:2] == ["sbatch", "--parsable"] and argv[-1] == "/w/slurm-train.sh"
    assert {"--job-name=oddaemon-effdet_d0-train", "--output=/log/effdet/train.log", "--open-mode=append",
            "--partition=gpu", "--account=vision", "--qos=normal", "--time=12:00:00", "--gres=gpu:2",
            "--signal=B:USR2@120", "--mem=16G"} <= set(argv)
    export = slurm.sbatch_argv(settings, "effdet", "export", 0, "/w/s.sh", "/log/e.log")
    assert "--partition=cpu" in export and not any(a.startswith("--gres") for a in export)


def test_batch_script_leaves_the_gpus_to_slurm_and_forwards_its_signals():
    text = slurm.batch_script(["/venv/bin/python", "-m", "oddaemon.workers", "train", "--job", "/w/job.json"],
                              {"CUDA_VISIBLE_DEVICES": "0", "PYTHONUNBUFFERED": "1", "bad-name": "x"}, "/w")
    assert "CUDA_VISIBLE_DEVICES" not in text and "bad-name" not in text
    assert "export PYTHONUNBUFFERED=1" in text and "cd /w" in text
    assert "/venv/bin/python -m oddaemon.workers train --job /w/job.json &" in text
    assert "kill -USR2 $child' USR2" in text and "kill -TERM $child' TERM" in text
    # the traps are set before the worker starts: a warning that comes first does not kill the shell
    assert text.index("' USR2") < text.index("/venv/bin/python -m oddaemon.workers train")
