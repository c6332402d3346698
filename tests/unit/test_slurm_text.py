"""core/slurm.py on what Slurm 22.05 prints (tests/fixtures/slurm/: squeue --json captured from a
real one-node cluster: running, pending, failed with exit 3, cancelled, completed) and on states
those captures do not show, from squeue's man page."""

from __future__ import annotations

import os

import pytest

from oddaemon.core import slurm

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "slurm")


def fixture(name: str) -> str:
    with open(os.path.join(FIXTURES, name)) as f:
        return f.read()


def test_squeue_json_of_a_real_cluster():
    jobs = slurm.parse_squeue_json(fixture("squeue_mixed.json"))
    assert {j: (x.name, x.state, x.reason) for j, x in jobs.items()} == {
        1: ("oddtest-a", "FAILED", "NonZeroExitCode"), 2: ("oddtest-b", "FAILED", "NonZeroExitCode"),
        3: ("odd-long", "RUNNING", "None"), 4: ("odd-pend", "PENDING", "Resources"),
        5: ("odd-time", "PENDING", "Priority")}
    assert [jobs[j].phase for j in (1, 3, 4)] == ["ended", "running", "waiting"]
    assert slurm.ending(jobs[1]) == slurm.Ending(3)  # exit_code 768: the script's exit 3


def test_a_cancelled_and_a_completed_job():
    jobs = slurm.parse_squeue_json(fixture("squeue_after_cancel.json"))
    assert (jobs[3].state, slurm.ending(jobs[3])) == ("CANCELLED", slurm.Ending(-15))
    assert (jobs[4].state, slurm.ending(jobs[4])) == ("COMPLETED", slurm.Ending(0))


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


def test_squeue_output_that_is_not_its_json():
    for bad in ("", "slurm_load_jobs error: Unable to contact slurm controller", '{"jobs": 3}'):
        with pytest.raises(ValueError):
            slurm.parse_squeue_json(bad)
    # a job entry it cannot read is left out, the others kept
    assert list(slurm.parse_squeue_json('{"jobs": [{"job_id": "x"}, {"job_id": 5, "job_state": "RUNNING"}]}')) == [5]


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
    assert "trap 'kill -USR2 $child' USR2" in text and "trap 'kill -TERM $child' TERM" in text
