"""SlurmExecutor on a fake loop with scripted Slurm answers (no Slurm): what a real cluster does
that the one-node test cluster does not show on demand: a controller that does not answer, a job
that left the controller's memory, a stop before sbatch answered, Slurm's own endings."""

from __future__ import annotations

import json
import os
from datetime import datetime

from oddaemon.adapters.slurm_cli import CommandResult
from oddaemon.core.failures import Failure
from oddaemon.core.slurm import SQUEUE_FORMAT, SlurmSettings, poll_argv
from oddaemon.service.executor import WorkerLaunch
from oddaemon.service.local_executor import LocalExecutor
from oddaemon.service.slurm_executor import SlurmExecutor
from tests.support.fakes import FakeLoop, ManualClock


class ScriptedSlurm:
    """Answers each command with the next scripted answer for its tool; records every command."""

    def __init__(self, loop):
        self.loop = loop
        self.calls: list[list[str]] = []
        self.answers: dict[str, list[CommandResult]] = {}

    def answer(self, tool: str, returncode: int | None, stdout: str = "", stderr: str = "") -> None:
        self.answers.setdefault(tool, []).append(CommandResult((tool,), returncode, stdout, stderr))

    def run(self, argv, done, stdin=b""):
        self.calls.append(argv)
        # squeue with --name is the look for a job to adopt; without, the poll
        tool = "adopt?" if argv[0] == "squeue" and any(a.startswith("--name=") for a in argv) else argv[0]
        queue = self.answers.get(tool) or [CommandResult((argv[0],), 0, "", "")]
        result = queue.pop(0) if len(queue) > 1 else queue[0]
        if argv[0] == "squeue":  # the tests give jobs as JSON; squeue prints SQUEUE_FORMAT's lines
            result = CommandResult(result.argv, result.returncode, format_lines(result.stdout), result.stderr)
        self.loop.call_later(0, lambda: done(result))


def format_lines(jobs_json: str) -> str:
    """The jobs of a ``{"jobs": [...]}`` text (squeue --json's names) as ``slurm.SQUEUE_FORMAT`` prints them."""
    if not jobs_json.startswith("{"):
        return jobs_json
    return "".join(f"{j['job_id']}|{j['name']}|{j['job_state']}|{j['state_reason']}|"
                   f"{datetime.fromtimestamp(j['submit_time']).isoformat(timespec='seconds')}|"
                   f"{j.get('nodes', 'localhost')}|{j['exit_code']}|{j['restart_cnt']}|\n"
                   for j in json.loads(jobs_json)["jobs"])


def squeue(*jobs: tuple[int, str, int]) -> str:
    return json.dumps({"jobs": [{"job_id": j, "name": "oddaemon-a-train", "job_state": s, "state_reason": "None",
                                 "exit_code": code, "restart_cnt": 0, "submit_time": 1} for j, s, code in jobs]})


def make(tmp_path):
    loop = FakeLoop(ManualClock(1000.0))
    slurm = ScriptedSlurm(loop)
    exits: list[tuple[str, int, Failure | None]] = []
    local = LocalExecutor(loop, str(tmp_path / "logs"), 1 << 20, 2, 1.0, lambda *a: None, loop.clock)
    executor = SlurmExecutor(loop, slurm, SlurmSettings(poll_seconds=1.0), local,
                             lambda w, rc, f: exits.append((w.role, rc, f)), loop.clock)
    return loop, slurm, executor, exits


def launch(tmp_path, role="train") -> WorkerLaunch:
    work = tmp_path / "work"
    work.mkdir(exist_ok=True)
    return WorkerLaunch("a", role, 1, ["python", "-m", "w", role], {"CUDA_VISIBLE_DEVICES": "0"}, str(work), (0,))


def test_submission_tracking_and_a_clean_end(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "41\n")
    slurm.answer("squeue", 0, squeue((41, "PENDING", 0)))
    slurm.answer("squeue", 0, squeue((41, "RUNNING", 0)))
    slurm.answer("squeue", 0, squeue((41, "COMPLETED", 0)))
    worker = executor.start(launch(tmp_path))
    assert executor.workers[("a", "train")] is worker and worker.job_id is None
    loop.advance(0)
    assert slurm.calls[0] == ["squeue", "--me", "--noheader", "--name=oddaemon-a-train",
                              f"--Format={SQUEUE_FORMAT}"]  # nothing to adopt
    assert worker.job_id == 41 and slurm.calls[1][0] == "sbatch" and "--gres=gpu:1" in slurm.calls[1]
    loop.advance(1.0)
    assert worker.state == "PENDING" and exits == []
    loop.advance(1.0)
    assert worker.state == "RUNNING"
    loop.advance(1.0)
    assert exits == [("train", 0, None)] and ("a", "train") not in executor.workers
    polls = [c for c in slurm.calls if c[0] == "squeue"]
    assert polls[1:] and all(c == poll_argv() for c in polls[1:])  # one call per cycle


def test_an_unreachable_controller_backs_off_and_fails_no_job(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "7\n")
    for _ in range(5):
        slurm.answer("squeue", 1, "", "slurm_load_jobs error: Unable to contact slurm controller (connect failure)")
    slurm.answer("squeue", 0, squeue((7, "COMPLETED", 0)))
    executor.start(launch(tmp_path))
    loop.advance(0)
    times = []
    for _ in range(200):
        before = len(slurm.calls)
        loop.advance(0.5)
        if len(slurm.calls) > before:
            times.append(loop.clock())
        if exits:
            break
    assert exits == [("train", 0, None)]  # the job's end is seen once Slurm answers; nothing failed meanwhile
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps == sorted(gaps) and gaps[-1] >= 4 * gaps[0], gaps  # asked again less and less often


def test_a_job_the_controller_forgot_ends_as_a_slurm_failure(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "9\n")
    slurm.answer("squeue", 0, squeue())  # no longer listed (MinJobAge passed)
    slurm.answer("scontrol", 1, "", "slurm_load_jobs error: Invalid job id specified")
    executor.start(launch(tmp_path))
    loop.advance(0)
    loop.advance(1.0)
    loop.advance(0)
    assert [c[0] for c in slurm.calls] == ["squeue", "sbatch", "squeue", "scontrol"]
    (role, rc, failure), = exits
    assert rc != 0 and failure.kind == "slurm" and "no longer knows job 9" in failure.message


def test_a_job_scontrol_still_knows_is_reported_by_its_state(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "9\n")
    slurm.answer("squeue", 0, squeue())
    slurm.answer("scontrol", 0, "JobId=9 JobName=oddaemon-a-train JobState=TIMEOUT Reason=TimeLimit ExitCode=0:15")
    executor.start(launch(tmp_path))
    loop.advance(0)
    loop.advance(1.0)
    loop.advance(0)
    (role, rc, failure), = exits
    assert failure.kind == "time-limit" and failure.retry and rc == -15


def test_a_stop_before_sbatch_answered_cancels_the_job_once_it_has_an_id(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "12\n")
    slurm.answer("squeue", 0, squeue((12, "CANCELLED", 15)))
    executor.start(launch(tmp_path))
    hung = Failure("hung", "no progress for 90s")
    assert executor.stop("a", "train", "hung", failure=hung)
    loop.advance(0)
    assert ["scancel", "12"] in slurm.calls
    loop.advance(1.0)
    assert exits == [("train", -15, hung)]  # the daemon's reason, not Slurm's cancel


def test_a_refused_submission_is_an_exit_with_slurms_words(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 1, "", "sbatch: error: Batch job submission failed: Invalid partition name specified")
    executor.start(launch(tmp_path))
    loop.advance(0)
    (role, rc, failure), = exits
    assert rc == 127 and failure.kind == "slurm" and "Invalid partition name" in failure.message


def test_served_workers_run_on_this_host(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    calls = []
    executor.local.start = lambda launch: calls.append(launch) or "local worker"
    served = WorkerLaunch("a", "eval", 1, ["true"], {}, str(tmp_path), (), stdin=5, pass_fds=(6,))
    assert executor.start(served) == "local worker" and calls == [served] and slurm.calls == []


def test_a_job_left_running_by_the_daemon_before_is_adopted_not_submitted_again(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("adopt?", 0, squeue((30, "COMPLETED", 0), (31, "RUNNING", 0)))
    slurm.answer("squeue", 0, squeue((31, "COMPLETED", 0)))
    worker = executor.start(launch(tmp_path))
    loop.advance(0)
    assert worker.job_id == 31 and not any(c[0] == "sbatch" for c in slurm.calls)
    loop.advance(1.0)
    assert exits == [("train", 0, None)]


def test_a_daemon_going_away_leaves_its_slurm_jobs_running(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "50\n")
    executor.start(launch(tmp_path))
    loop.advance(0)
    executor.stop_all("daemon shutting down")
    assert executor.workers == {} and not any(c[0] == "scancel" for c in slurm.calls)
    loop.advance(10)
    assert exits == [] and not any(c == poll_argv() for c in slurm.calls)


def squeue_at(*jobs: tuple[int, str, int]) -> str:
    """Jobs (id, state, submit time) named like the train worker of job "a"."""
    return json.dumps({"jobs": [{"job_id": j, "name": "oddaemon-a-train", "job_state": s, "state_reason": "None",
                                 "exit_code": 0, "restart_cnt": 0, "submit_time": t} for j, s, t in jobs]})


def test_each_submission_is_recorded_before_sbatch_runs_and_with_the_id_it_answered(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "41\n")
    executor.start(launch(tmp_path))
    loop.advance(0)
    with open(tmp_path / "work" / "slurm-train.json") as f:
        assert json.load(f) == {"attempt": 1, "submitted_at": 1000.0, "job_id": 41}


def test_a_restarted_daemon_adopts_only_a_job_submitted_after_its_record(tmp_path):
    """Job ids are reused and a leftover may carry the worker's name: the daemon's record of its last
    submission (submitted at 1000, id 41) tells them apart. Job 41 now is a job submitted long before
    (the controller's ids started again), job 45 the one the daemon submitted: 45 is adopted."""
    loop, slurm, executor, exits = make(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "slurm-train.json").write_text(json.dumps({"attempt": 1, "submitted_at": 1000.0,
                                                                    "job_id": 41}))
    slurm.answer("adopt?", 0, squeue_at((41, "RUNNING", 200), (45, "RUNNING", 1001)))
    slurm.answer("squeue", 0, squeue_at((45, "COMPLETED", 1001)))
    worker = executor.start(launch(tmp_path))
    loop.advance(0)
    assert worker.job_id == 45 and not any(c[0] == "sbatch" for c in slurm.calls)
    loop.advance(1.0)
    assert exits == [("train", 0, None)]


def test_a_leftover_older_than_the_record_is_not_adopted_and_the_worker_is_submitted(tmp_path, caplog):
    loop, slurm, executor, exits = make(tmp_path)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "slurm-train.json").write_text(json.dumps({"attempt": 1, "submitted_at": 900.0,
                                                                    "job_id": 41}))
    slurm.answer("adopt?", 0, squeue_at((41, "RUNNING", 100)))
    slurm.answer("sbatch", 0, "60\n")
    worker = executor.start(launch(tmp_path))
    loop.advance(0)
    assert worker.job_id == 60 and [c[0] for c in slurm.calls] == ["squeue", "sbatch"]
    assert "not adopting Slurm job 41" in caplog.text
    with open(tmp_path / "work" / "slurm-train.json") as f:
        assert json.load(f) == {"attempt": 1, "submitted_at": 1000.0, "job_id": 60}


def test_a_job_whose_end_was_reported_is_not_adopted_by_the_next_attempt(tmp_path):
    """Attempt 1's Slurm job ended (reported) but still shows as cleaning up when attempt 2 starts:
    attempt 2 is submitted, not handed the job that already ended."""
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "41\n")
    slurm.answer("squeue", 0, squeue((41, "FAILED", 3 << 8)))
    executor.start(launch(tmp_path))
    loop.advance(0)
    loop.advance(1.0)
    assert [rc for _, rc, _ in exits] == [3]
    slurm.answers["adopt?"] = [CommandResult(("squeue",), 0, squeue_at((41, "COMPLETING", 2000)), "")]
    slurm.answers["sbatch"] = [CommandResult(("sbatch",), 0, "42\n", "")]
    second = executor.start(launch(tmp_path))
    loop.advance(0)
    assert second.job_id == 42


def test_only_a_job_named_like_the_worker_is_adopted(tmp_path):
    """A live job of another oddaemon job (submitted a moment before) is not adopted, should squeue
    list it (22.05's --json ignored --name; kept as a guard): the worker is submitted."""
    loop, slurm, executor, exits = make(tmp_path)
    other = json.dumps({"jobs": [{"job_id": 3, "name": "oddaemon-b-train", "job_state": "PENDING",
                                  "state_reason": "None", "exit_code": 0, "restart_cnt": 0, "submit_time": 1}]})
    slurm.answer("adopt?", 0, other)
    slurm.answer("sbatch", 0, "4\n")
    worker = executor.start(launch(tmp_path))
    loop.advance(0)
    assert worker.job_id == 4 and any(c[0] == "sbatch" for c in slurm.calls)


def jobs_json(*jobs: tuple[int, str, str]) -> str:
    """Jobs (id, state, nodes) of job "a"'s train worker."""
    return json.dumps({"jobs": [{"job_id": j, "name": "oddaemon-a-train", "job_state": s, "state_reason":
                                 "Resources" if s == "PENDING" else "None", "exit_code": 0, "restart_cnt": 0,
                                 "submit_time": 1, "nodes": n} for j, s, n in jobs]})


def test_a_worker_runs_when_slurm_runs_it_and_each_change_is_told(tmp_path):
    """Queued in Slurm is not running: the worker says ``running`` only once Slurm runs it, and
    ``on_change`` hears of its id, each state and its nodes (what list/status/metrics show)."""
    loop, slurm, executor, exits = make(tmp_path)
    told = []
    executor.on_change = lambda w: told.append((w.job_id, w.state, w.reason, w.nodes, w.running))
    slurm.answer("sbatch", 0, "41\n")
    for answer in (jobs_json((41, "PENDING", "")), jobs_json((41, "PENDING", "")),
                   jobs_json((41, "RUNNING", "node2")), jobs_json((41, "RUNNING", "node2")),
                   jobs_json((41, "COMPLETED", "node2"))):
        slurm.answer("squeue", 0, answer)
    worker = executor.start(launch(tmp_path))
    assert worker.running is False
    loop.advance(0)
    assert told == [(41, "PENDING", "", "", False)]  # sbatch answered
    loop.advance(1.0)
    loop.advance(1.0)
    assert worker.running is False and told[1:] == [(41, "PENDING", "Resources", "", False)]  # twice: told once
    assert executor.cluster_view("a") == {"train": {"job_id": 41, "state": "PENDING", "reason": "Resources",
                                                    "nodes": "", "attempt": 1}}
    loop.advance(1.0)
    assert worker.running is True and told[-1] == (41, "RUNNING", "None", "node2", True)
    n = len(told)
    loop.advance(1.0)
    assert len(told) == n  # nothing changed: nothing told
    loop.advance(1.0)
    assert exits == [("train", 0, None)]
    # once it ended, the view keeps its last Slurm job (the id to look up in sacct)
    assert executor.cluster_view("a")["train"]["state"] == "COMPLETED"
    assert executor.cluster_view("b") is None
    record = executor.runtime_record(worker)
    assert (record["slurm_job_id"], record["slurm_nodes"]) == (41, "node2")


def test_the_poll_is_one_squeue_whatever_the_number_of_jobs(tmp_path):
    """Three workers, one squeue per cycle (this user's jobs in every state: ended ones come with their
    exit status, so no scontrol is needed for them), each worker picked out by its id."""
    loop, slurm, executor, exits = make(tmp_path)
    for k in range(3):
        slurm.answer("sbatch", 0, f"{70 + k}\n")
    listed = json.dumps({"jobs": [{"job_id": 70 + k, "name": f"oddaemon-{n}-train", "job_state": s,
                                   "state_reason": "None", "exit_code": code, "restart_cnt": 0, "submit_time": 1}
                                  for k, (n, s, code) in enumerate((("a", "COMPLETED", 0), ("b", "FAILED", 2 << 8),
                                                                    ("c", "RUNNING", 0)))]
                         + [{"job_id": 99, "name": "someone-else", "job_state": "RUNNING", "state_reason": "None",
                             "exit_code": 0, "restart_cnt": 0, "submit_time": 1}]})
    slurm.answer("squeue", 0, listed)
    for name in ("a", "b", "c"):
        work = tmp_path / name
        work.mkdir()
        executor.start(WorkerLaunch(name, "train", 1, ["python"], {}, str(work)))
    loop.advance(0)
    loop.advance(1.0)
    assert sorted(rc for _, rc, _ in exits) == [0, 2]
    polls = [c for c in slurm.calls if c == poll_argv()]
    assert len(polls) == 1 and not any(c[0] == "scontrol" for c in slurm.calls)
    assert set(executor.jobs) == {("c", "train")}


def test_a_running_jobs_slurm_output_is_copied_into_its_rotating_log_and_counts_as_activity(tmp_path):
    loop, slurm, executor, exits = make(tmp_path)
    active = []
    executor.local.on_output = lambda name, role: active.append((name, role))
    slurm.answer("sbatch", 0, "41\n")
    slurm.answer("squeue", 0, jobs_json((41, "RUNNING", "node1")))
    slurm.answer("squeue", 0, jobs_json((41, "RUNNING", "node1")))
    slurm.answer("squeue", 0, jobs_json((41, "COMPLETED", "node1")))
    executor.start(launch(tmp_path))
    loop.advance(0)
    sbatch = next(c for c in slurm.calls if c[0] == "sbatch")
    raw = str(tmp_path / "logs" / "a" / "slurm-train.out")
    assert f"--output={raw}" in sbatch  # Slurm writes beside the log, not into it
    loop.advance(1.0)  # seen running
    with open(raw, "a") as f:
        f.write("I1203 step 100 loss 0.5\n")
    loop.advance(1.0)
    with open(tmp_path / "logs" / "a" / "train.log") as f:
        assert "I1203 step 100 loss 0.5\n" in f.read()
    assert ("a", "train") in active
    with open(raw, "a") as f:
        f.write("done")
    loop.advance(1.0)
    assert exits == [("train", 0, None)] and not os.path.exists(raw)
    with open(tmp_path / "logs" / "a" / "train.log") as f:
        text = f.read()
    assert text.index("done\n") < text.index("ended in Slurm: COMPLETED")


def test_a_finish_gives_a_running_job_the_warning_signal_and_cancels_a_pending_one(tmp_path):
    """oddaemon finish on the Slurm backend: a running job gets SIGUSR2 in its batch step (the
    worker saves a checkpoint and exits), a job still pending in Slurm's queue is cancelled."""
    loop, slurm, executor, exits = make(tmp_path)
    slurm.answer("sbatch", 0, "41\n")
    slurm.answer("squeue", 0, jobs_json((41, "RUNNING", "node2")))
    executor.start(launch(tmp_path))
    loop.advance(0)
    loop.advance(1.0)
    assert executor.workers[("a", "train")].running
    assert executor.stop("a", "train", "finished by request", save=True)
    loop.advance(0)
    assert ["scancel", "--signal=USR2", "--batch", "41"] in slurm.calls
    loop2, slurm2, executor2, _ = make(tmp_path / "pending")
    slurm2.answer("sbatch", 0, "42\n")
    slurm2.answer("squeue", 0, jobs_json((42, "PENDING", "")))
    executor2.start(launch(tmp_path))
    loop2.advance(0)
    loop2.advance(1.0)
    assert executor2.stop("a", "train", "finished by request", save=True)
    loop2.advance(0)
    assert ["scancel", "42"] in slurm2.calls and not any("--signal=USR2" in c for c in slurm2.calls)
