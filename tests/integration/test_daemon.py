"""The real daemon process end to end with the stand-in worker: spool intake, scheduling,
supervision, logs, persistence, CLI."""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from oddaemon.testing.standin_core import checkpoint_step, read_checkpoint_state, train_scalars
from tests.support.harness import train_marker, wait_for, worker_pids


def test_drop_run_checkpoints_succeed(daemon_env):
    env = daemon_env.start()
    env.drop("alpha.toml", env.job_text("alpha", num_steps=20, every=5, keep=10, step_seconds=0.01))
    job = env.wait_state("alpha", "succeeded", 60)
    assert job["step"] == 20 and job["target_steps"] == 20 and job["progress"] == 1.0
    assert job["losses"]["total_loss"] == pytest.approx(train_scalars(20, {"num_steps": 20})["Loss/total_loss"], rel=1e-6)
    model_dir = os.path.join(env.models, "alpha")
    steps = [checkpoint_step(p) for p in read_checkpoint_state(model_dir)]
    assert steps == [0, 5, 10, 15, 20]
    assert env.accepted() and env.accepted()[0].startswith("alpha.") and not os.listdir(os.path.join(env.spool, "new"))
    with open(os.path.join(env.logs, "alpha", "train.log")) as f:
        log = f.read()
    assert "CUDA_VISIBLE_DEVICES=''" in log and "standin: training finished at step 20" in log
    record = json.load(open(os.path.join(env.state, "jobs", "alpha.json")))
    assert record["state"] == "succeeded" and record["last_exit"] == "exit status 0"
    out = env.cli("list")
    assert out.returncode == 0 and re.search(r"alpha\s+succeeded\s+cpu\s+20/20", out.stdout), out.stdout
    out = env.cli("list", "--json")
    assert json.loads(out.stdout)[0]["name"] == "alpha"


def test_bad_file_rejected_with_reason_and_kept_byte_for_byte(daemon_env):
    env = daemon_env.start()
    bad = b'name = "bad"\npipeline_config = "relative/p.config"\nmodel_dir = 5\n[pipeline]\nnum_clases = 3\n'
    env.drop("bad.toml", bad)
    wait_for(lambda: "bad.toml.error" in env.rejected(), 10, what="the .error file")
    with open(os.path.join(env.spool, "rejected", "bad.toml"), "rb") as f:
        assert f.read() == bad
    error = open(os.path.join(env.spool, "rejected", "bad.toml.error")).read()
    assert "must be an absolute path" in error and "did you mean 'num_classes'" in error and "model_dir" in error
    # syntax error with line and column; a daemon that is still fine afterwards
    env.drop("syntax.toml", b'name = "x"\nmodel_dir = \n')
    wait_for(lambda: "syntax.toml.error" in env.rejected(), 10, what="the syntax .error file")
    assert "line 2" in open(os.path.join(env.spool, "rejected", "syntax.toml.error")).read()
    assert env.answers()


def test_two_jobs_competing_for_one_gpu_run_one_after_the_other(daemon_env):
    daemon_env.write_config(gpus=[0])
    env = daemon_env.start()
    env.drop("first.toml", env.job_text("first", num_steps=20, step_seconds=0.05, gpus=1))
    env.wait_state("first", "running", 20)
    env.drop("second.toml", env.job_text("second", num_steps=10, step_seconds=0.01, gpus=1))
    wait_for(lambda: env.job("second"), 10, what="second accepted")
    second = env.job("second")
    assert second["state"] == "queued" and second["queue_position"] == 1
    first = env.wait_state("first", "succeeded", 60)
    second = env.wait_state("second", "succeeded", 60)
    first_training_ended = next(h["time"] for h in first["history"] if h["state"] == "evaluating")
    assert second["started_at"] >= first_training_ended  # the GPU is free once training ends
    for name in ("first", "second"):
        assert "CUDA_VISIBLE_DEVICES='0'" in open(os.path.join(env.logs, name, "train.log")).read()


def test_crash_restarts_with_backoff_and_resumes_from_checkpoint(daemon_env):
    env = daemon_env.start()
    env.drop("crashy.toml", env.job_text("crashy", num_steps=30, every=5, keep=10, step_seconds=0.01,
                                         crash_at_step=17, crash_times=2))
    job = env.wait_state("crashy", "succeeded", 60)
    assert job["restarts"] == 2 and job["attempt"] == 3
    backoffs = [h for h in job["history"] if h["state"] == "backoff"]
    assert len(backoffs) == 2 and "restart 1 of 3" in backoffs[0]["reason"] and "restart 2 of 3" in backoffs[1]["reason"]
    log = open(os.path.join(env.logs, "crashy", "train.log")).read()
    assert log.count("resuming from step 15") == 2, log[-3000:]
    model_dir = os.path.join(env.models, "crashy")
    steps = [checkpoint_step(p) for p in read_checkpoint_state(model_dir)]
    assert steps == [0, 5, 10, 15, 20, 25, 30]


def test_crash_loop_ends_failed_with_reason(daemon_env):
    daemon_env.write_config(max_restarts=1)
    env = daemon_env.start()
    env.drop("oom.toml", env.job_text("oom", num_steps=30, step_seconds=0.01, oom_at_step=3))
    job = env.wait_state("oom", "failed", 60)
    assert "out of GPU memory" in job["reason"] and "batch_size" in job["reason"]
    assert "gave up after 2 consecutive failure(s)" in job["reason"]
    out = env.cli("status", "oom")
    assert out.returncode == 0 and "failed" in out.stdout and "out of GPU memory" in out.stdout
    failed_at = job["finished_at"]
    out = env.cli("retry", "oom")
    assert out.returncode == 0, out.stderr
    # the effect: the job is queued again with a fresh failure count, runs two more attempts (3 and 4:
    # max_restarts = 1 again, not already used up) and fails again the same way, later than the first time
    again = wait_for(lambda: (lambda j: j if j["state"] == "failed" and j["finished_at"] != failed_at else None)(
        env.job("oom")), 60, 0.1, what="the retried job to fail again")
    states = [(h["state"], h["reason"]) for h in again["history"]]
    retried = states.index(("queued", "retry requested"))
    assert [state for state, _ in states[retried:]] == ["queued", "running", "backoff", "running", "failed"], states
    assert again["attempt"] == 4 and again["finished_at"] > failed_at
    assert "gave up after 2 consecutive failure(s)" in again["reason"]
    log = open(os.path.join(env.logs, "oom", "train.log")).read()
    assert [int(n) for n in re.findall(r"==== oddaemon: starting train attempt (\d+)", log)] == [1, 2, 3, 4]
    assert env.cli("status", "nosuchjob").returncode == 1


def test_kill_9_of_the_daemon_then_restart_resumes_without_duplicate_workers(daemon_env):
    env = daemon_env.start()
    env.drop("long.toml", env.job_text("long", num_steps=400, every=10, keep=5, step_seconds=0.02))
    wait_for(lambda: (env.job("long") or {}).get("step") and env.job("long")["step"] >= 30, 60, what="progress")
    marker = train_marker(env, "long")
    assert len(worker_pids(marker)) == 1
    env.stop(signal.SIGKILL)
    wait_for(lambda: not worker_pids(marker), 10, what="the orphaned worker to die with the daemon")
    env.start()
    job = env.wait_state("long", "running", 20)
    assert job["attempt"] == 2
    wait_for(lambda: len(worker_pids(marker)) == 1, 10, what="one worker")
    time.sleep(1.0)
    assert len(worker_pids(marker)) == 1
    assert "resuming from step" in open(os.path.join(env.logs, "long", "train.log")).read()
    env.ask("cancel", name="long")
    env.wait_state("long", "cancelled", 20)
    assert not worker_pids(marker)


def test_log_rotation_under_a_chatty_worker_loses_no_line(daemon_env):
    daemon_env.write_config(log_max_bytes=8192, log_backups=1000)
    env = daemon_env.start()
    env.drop("chatty.toml", env.job_text("chatty", num_steps=40, step_seconds=0.001, log_lines_per_step=50))
    env.wait_state("chatty", "succeeded", 60)
    log_dir = os.path.join(env.logs, "chatty")
    files = sorted(os.listdir(log_dir))
    assert len(files) > 5, files
    numbered = []
    for name in sorted(files, key=lambda n: -int(n.rsplit(".", 1)[1]) if n[-1].isdigit() else 0):
        path = os.path.join(log_dir, name)
        assert os.path.getsize(path) <= 8192 + 200
        numbered += [int(m) for m in re.findall(r"standin line (\d+)", open(path).read())]
    assert numbered == list(range(numbered[0], numbered[0] + len(numbered)))
    assert len(numbered) >= 40 * 50


def test_cancel_running_and_queued_jobs(daemon_env):
    env = daemon_env.start()
    env.drop("runner.toml", env.job_text("runner", num_steps=1000, step_seconds=0.05))
    env.wait_state("runner", "running", 20)
    env.drop("waiter.toml", env.job_text("waiter", num_steps=5))
    wait_for(lambda: env.job("waiter"), 10, what="waiter accepted")
    assert env.cli("cancel", "waiter").returncode == 0
    out = env.cli("cancel", "runner")
    assert out.returncode == 0 and "stopping" in out.stdout
    env.wait_state("runner", "cancelled", 20)
    assert env.job("waiter")["state"] == "cancelled"
    wait_for(lambda: not worker_pids(os.path.join(env.state, "work", "runner")), 10, what="no trainer or evaluator left")
    assert env.cli("cancel", "runner").returncode == 1


def test_hung_worker_is_killed_after_the_grace_period_on_cancel(daemon_env):
    env = daemon_env.start()
    env.drop("hang.toml", env.job_text("hang", num_steps=100, step_seconds=0.01, hang_at_step=5, ignore_sigterm=1))
    train_log = os.path.join(env.logs, "hang", "train.log")
    wait_for(lambda: os.path.exists(train_log) and "standin: hanging at step 5" in open(train_log).read(), 30,
             what="the hang")
    started = time.monotonic()
    env.ask("cancel", name="hang")
    job = env.wait_state("hang", "cancelled", 20)
    assert time.monotonic() - started >= 1.5  # stop_grace_seconds = 2
    assert job["last_exit"] == "killed by signal SIGKILL"


def test_spool_file_written_while_the_daemon_is_down_and_a_half_written_file(daemon_env):
    env = daemon_env
    env.drop("early.toml", env.job_text("early", num_steps=5, step_seconds=0.01))
    env.start()
    env.wait_state("early", "succeeded", 30)
    # a plain cp-like writer that pauses half way: never read half-written
    text = env.job_text("slow", num_steps=5, step_seconds=0.01).encode()
    path = os.path.join(env.spool, "new", "slow.toml")
    with open(path, "wb") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        time.sleep(1.5)
        f.write(text[len(text) // 2:])
    env.wait_state("slow", "succeeded", 30)
    assert not env.rejected()
    # dotfiles and temporary names are ignored and left alone
    for ignored in (".hidden.toml", "job.toml.swp", "notes.txt"):
        with open(os.path.join(env.spool, "new", ignored), "w") as f:
            f.write("x")
    time.sleep(0.5)
    assert sorted(os.listdir(os.path.join(env.spool, "new"))) == [".hidden.toml", "job.toml.swp", "notes.txt"]


def test_a_burst_of_500_files_all_end_accepted_or_rejected(daemon_env):
    env = daemon_env.start()
    pipeline = env.pipeline("burst", num_steps=1, step_seconds=0.001)
    for i in range(500):
        if i % 2:
            text = f'pipeline_config = "{pipeline}"\nmodel_dir = "{env.models}/b{i}"\n[pipeline]\nnum_steps = 1\n'
        else:
            text = f'pipeline_config = "{pipeline}"\nmodel_dir = "{env.models}/b{i}"\n[train]\ncheckpoint_every_n = -{i}\n'
        env.drop(f"b{i}.toml", text)

    def settled():
        return len(os.listdir(os.path.join(env.spool, "new"))) == 0 and len(env.accepted()) + len(
            [r for r in env.rejected() if r.endswith(".toml")]) == 500

    wait_for(settled, 120, 0.2, what="all 500 files to be settled")
    assert len(env.accepted()) == 250
    rejected = [r for r in env.rejected() if r.endswith(".toml")]
    assert len(rejected) == 250 and all(f"{r}.error" in env.rejected() for r in rejected)
    assert len(env.ask("list")["jobs"]) == 250


def test_sighup_reopens_log_files(daemon_env):
    env = daemon_env.start()
    env.drop("hup.toml", env.job_text("hup", num_steps=2000, step_seconds=0.01))
    env.wait_state("hup", "running", 20)
    log = os.path.join(env.logs, "hup", "train.log")
    wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, 10, what="log output")
    os.rename(log, log + ".moved")
    env.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: os.path.exists(log) and os.path.getsize(log) > 0, 10, what="a reopened log")
    assert env.answers()


def test_submit_command_reports_the_queue_position_and_rejections(daemon_env, tmp_path):
    env = daemon_env.start()
    env.drop("busy.toml", env.job_text("busy", num_steps=1000, step_seconds=0.05))
    env.wait_state("busy", "running", 20)
    good = tmp_path / "next.toml"
    good.write_text(env.job_text("next", num_steps=5))
    out = env.cli("submit", str(good))
    assert out.returncode == 0, out.stderr
    assert "accepted as job next: queued, queue position 1" in out.stdout
    bad = tmp_path / "broken.toml"
    bad.write_text('name = "broken"\n')
    out = env.cli("submit", str(bad))
    assert out.returncode == 4 and "missing required key 'pipeline_config'" in out.stdout


def test_select_event_loop_runs_a_job_too(daemon_env):
    daemon_env.write_config(event_loop="select")
    env = daemon_env.start()
    env.drop("sel.toml", env.job_text("sel", num_steps=10, step_seconds=0.01))
    env.wait_state("sel", "succeeded", 30)
    assert "event loop select" in env.daemon_log()


def test_daemon_never_imports_tensorflow(daemon_env):
    env = daemon_env.start()
    with open(f"/proc/{env.proc.pid}/maps") as f:
        maps = f.read()
    assert "tensorflow" not in maps and "_pywrap" not in maps
    assert env.ask("ping")["heavy_modules"] == []


def test_jobs_that_can_never_run_or_clash_are_rejected_with_the_reason(daemon_env):
    daemon_env.write_config(gpus=[0])
    env = daemon_env.start()
    env.drop("greedy.toml", env.job_text("greedy", gpus=2))
    wait_for(lambda: "greedy.toml.error" in env.rejected(), 10, what="greedy rejected")
    error = open(os.path.join(env.spool, "rejected", "greedy.toml.error")).read()
    assert "because the daemon cannot run it" in error
    assert "job 'greedy' can never run here: it asks for 2 GPU(s) but this machine has 1; change [train] gpus" in error
    env.drop("one.toml", env.job_text("one", num_steps=1000, step_seconds=0.05))
    env.wait_state("one", "running", 20)
    env.drop("one-again.toml", env.job_text("one", num_steps=5))
    wait_for(lambda: "one-again.toml.error" in env.rejected(), 10, what="duplicate rejected")
    assert "a job named 'one' is already queued, running or being checked" in open(
        os.path.join(env.spool, "rejected", "one-again.toml.error")).read()


def test_preflight_problems_reject_the_file_and_a_passing_preflight_queues_it(daemon_env):
    env = daemon_env.start()
    env.drop("pf.toml", env.job_text("pf", num_steps=5, preflight_problem="num_classes is 3 but the label map has 5 items"))
    wait_for(lambda: "pf.toml.error" in env.rejected(), 20, what="the preflight rejection")
    error = open(os.path.join(env.spool, "rejected", "pf.toml.error")).read()
    assert "because its preflight found problems" in error and "num_classes is 3 but the label map has 5 items" in error
    # the .error is written first, then the file moves: wait for the move
    wait_for(lambda: not os.listdir(os.path.join(env.spool, "cur")), 10, what="spool/cur to empty")
    env.drop("pf2.toml", env.job_text("pf2", num_steps=5))
    env.wait_state("pf2", "succeeded", 30)
    assert os.path.exists(os.path.join(env.logs, "pf2", "preflight.log"))


def test_reload_rereads_the_configuration(daemon_env):
    env = daemon_env.start()
    env.drop("r1.toml", env.job_text("r1", num_steps=3000, step_seconds=0.05))
    env.wait_state("r1", "running", 30)
    env.drop("r2.toml", env.job_text("r2", num_steps=3000, step_seconds=0.05))
    env.wait_state("r2", "queued", 30)  # max_cpu_jobs = 1
    env.write_config(max_cpu_jobs=2, log_max_bytes=1 << 20)
    env.proc.send_signal(signal.SIGHUP)
    env.wait_state("r2", "running", 30)
    assert "reload: configuration re-read" in env.daemon_log()
    # a broken file on reload keeps the running configuration
    with open(env.config_path, "a") as f:
        f.write("[nonsense]\n")
    env.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "keeping the running configuration" in env.daemon_log(), 10, what="the reload error")
    assert "unknown" in env.daemon_log() and env.answers()


def test_sigterm_stops_promptly_with_training_and_evaluation_under_way(daemon_env):
    daemon_env.write_config(max_cpu_jobs=3)
    env = daemon_env.start()
    for i in range(3):
        env.drop(f"busy{i}.toml", env.job_text(f"busy{i}", num_steps=5000, every=1, keep=2, step_seconds=0.01,
                                               eval_seconds=0.02))
    for i in range(3):
        wait_for(lambda i=i: (env.job(f"busy{i}") or {}).get("evaluation", {}).get("counts", {}).get("evaluated", 0) > 2,
                 30, what=f"busy{i} training and evaluating")
    # a clean stop: exit status 0, every worker asked to stop (SIGTERM) and gone by itself within the
    # grace period (no SIGKILL), each job saved as running to resume; the deadline bounds only the wait
    assert env.stop(timeout=120) == 0, env.daemon_log()
    wait_for(lambda: not worker_pids(env.root), 60, what="no worker left")
    log = env.daemon_log()
    assert re.search(r"shutting down: stopping \d+ worker\(s\); their jobs resume at next start", log), log
    for i in range(3):  # (the warm preflight workers, if still there, are stopped too)
        for role in ("train", "eval"):
            assert re.search(rf"stopping {role} worker of busy{i} \(pid \d+\): daemon shutting down", log), log
    assert "ignored SIGTERM" not in log and "sending SIGKILL" not in log and "Traceback" not in log, log
    assert log.rstrip().endswith("stopped"), log[-2000:]
    for i in range(3):
        record = json.load(open(os.path.join(env.state, "jobs", f"busy{i}.json")))
        assert record["state"] == "running" and record["attempt"] == 1, record
        train_log = open(os.path.join(env.logs, f"busy{i}", "train.log")).read()
        assert re.search(r"standin: SIGTERM received at step \d+, exiting", train_log), train_log[-2000:]
    env.start()  # and they all come back, from where they were
    for i in range(3):
        job = env.wait_state(f"busy{i}", "running", 60)
        assert job["attempt"] == 2 and job["restarts"] == 0, job
        wait_for(lambda i=i: "resuming from step" in open(os.path.join(env.logs, f"busy{i}", "train.log")).read(), 60,
                 what=f"busy{i} to resume from its checkpoint")
