"""Checkpoint watching and evaluation with the real daemon and the stand-in worker."""

from __future__ import annotations

import json
import os
import re
import signal

from oddaemon.formats.tfevents import EventDirReader
from oddaemon.testing.standin_core import eval_metrics, train_scalars
from tests.support.harness import assert_evaluated_in_order, wait_for, worker_pids

MAP = "DetectionBoxes_Precision/mAP"


def eval_steps(env, name: str) -> list[int]:
    """The steps of the mAP events under model_dir/eval in the order the evaluator wrote them (by
    their wall time, as TensorBoard orders them), not sorted: order is part of what is checked."""
    events = EventDirReader(os.path.join(env.models, name, "eval")).read_new()
    return [e.step for e in sorted((e for e in events if MAP in e.values), key=lambda e: e.wall_time)]


def evaluator_requests(env, name: str) -> list[tuple[int, int]]:
    """(checkpoint number, step) of each evaluation the evaluator began, in the order its log says it
    began them (a retried checkpoint appears once per attempt)."""
    log = open(os.path.join(env.logs, name, "eval.log")).read()
    return [(int(n), int(step)) for n, step in
            re.findall(r"^INFO:tensorflow:Evaluating checkpoint \S*/ckpt-(\d+) \(step (\d+)\)$", log, re.MULTILINE)]


def evaluated(job: dict | None) -> list[dict]:
    """The evaluated checkpoints of a job view ([] while the job is not known yet: preflight)."""
    return [c for c in job["evaluation"]["checkpoints"] if c["state"] == "evaluated"] if job else []


def test_every_checkpoint_is_evaluated_exactly_once_even_with_max_to_keep_1(daemon_env):
    env = daemon_env.start()
    # a checkpoint every 5 steps x 0.02 s = 0.1 s; each evaluation takes 0.5 s (five times slower)
    env.drop("keep1.toml", env.job_text("keep1", num_steps=50, every=5, keep=1, step_seconds=0.02, eval_seconds=0.5))
    job = env.wait_state("keep1", "succeeded", 90)
    steps = [c["step"] for c in evaluated(job)]
    assert steps == list(range(0, 51, 5))  # ckpt-1 is step 0 ... the final step 50
    # in order, each once: the book, the evaluator's own log and its event files say the same
    assert assert_evaluated_in_order(env, "keep1") == list(range(1, 12))
    assert evaluator_requests(env, "keep1") == list(zip(range(1, 12), steps))
    assert eval_steps(env, "keep1") == steps  # one set of eval events per checkpoint, none twice, in order
    assert job["evaluation"]["counts"]["evaluated"] == 11 and job["evaluation"]["counts"]["missed"] == 0
    log = open(os.path.join(env.logs, "keep1", "eval.log")).read()
    assert log.count("INFO:tensorflow:Evaluating checkpoint") == 11
    assert "signal" not in log  # the idle evaluator exited by itself at the end (EOF on its stdin)
    assert log.count("warm evaluator for 'keep1' ready") == 1  # one warm process did them all
    assert job["reason"] == "training finished; every checkpoint evaluated"
    history = [h["state"] for h in job["history"]]
    assert history[-3:] == ["running", "evaluating", "succeeded"]
    # only one checkpoint is left in model_dir by TF's max_to_keep; the best one is kept in best/
    best = json.load(open(os.path.join(env.models, "keep1", "best", "best.json")))
    assert best["step"] == 50 and best["value"] == eval_metrics(50)[MAP] and job["evaluation"]["best"]["step"] == 50
    pins = os.listdir(os.path.join(env.models, "keep1", ".oddaemon", "pins"))
    assert all(p.startswith("ckpt-11.") for p in pins), pins  # everything else was unpinned


def test_a_crashing_evaluator_is_restarted_and_the_checkpoint_retried(daemon_env):
    env = daemon_env.start()
    env.drop("evcrash.toml", env.job_text("evcrash", num_steps=20, every=5, keep=10, step_seconds=0.02,
                                          eval_crash=10, eval_crash_times=1))
    job = env.wait_state("evcrash", "succeeded", 90)
    by_step = {c["step"]: c for c in evaluated(job)}
    assert list(by_step) == [0, 5, 10, 15, 20]
    assert by_step[10]["attempts"] == 2 and by_step[5]["attempts"] == 1
    # the crashed checkpoint is retried before any later one is begun: order holds across the crash
    assert evaluator_requests(env, "evcrash") == [(1, 0), (2, 5), (3, 10), (3, 10), (4, 15), (5, 20)]
    assert assert_evaluated_in_order(env, "evcrash") == [1, 2, 3, 4, 5]
    assert eval_steps(env, "evcrash") == [0, 5, 10, 15, 20]
    log = open(os.path.join(env.logs, "evcrash", "eval.log")).read()
    assert "eval_crash at step 10" in log and log.count("ready") == 2


def test_an_evaluator_killed_after_writing_the_events_is_retried_without_writing_them_twice(daemon_env):
    env = daemon_env.start()
    env.drop("evkill.toml", env.job_text("evkill", num_steps=20, every=5, keep=10, step_seconds=0.02,
                                         eval_crash=10, eval_crash_times=1, eval_crash_point="events"))
    job = env.wait_state("evkill", "succeeded", 90)
    by_step = {c["step"]: c for c in evaluated(job)}
    assert list(by_step) == [0, 5, 10, 15, 20]
    assert by_step[10]["attempts"] == 2  # the kill counts; the retry takes the events' values
    assert eval_steps(env, "evkill") == [0, 5, 10, 15, 20]  # step 10's events once
    log = open(os.path.join(env.logs, "evkill", "eval.log")).read()
    assert "after writing the events of step 10" in log and "is in the eval event files already" in log
    assert evaluator_requests(env, "evkill") == [(1, 0), (2, 5), (3, 10), (4, 15), (5, 20)]


def test_an_evaluator_killed_after_writing_the_result_is_taken_at_its_word(daemon_env):
    env = daemon_env.start()
    env.drop("evres.toml", env.job_text("evres", num_steps=20, every=5, keep=10, step_seconds=0.02,
                                        eval_crash=10, eval_crash_times=1, eval_crash_point="result"))
    job = env.wait_state("evres", "succeeded", 90)
    by_step = {c["step"]: c for c in evaluated(job)}
    assert list(by_step) == [0, 5, 10, 15, 20]
    assert by_step[10]["attempts"] == 1 and not by_step[10]["error"]  # its result file was its word
    assert eval_steps(env, "evres") == [0, 5, 10, 15, 20]
    assert evaluator_requests(env, "evres") == [(1, 0), (2, 5), (3, 10), (4, 15), (5, 20)]
    daemon_log = open(env.stderr_path).read()
    assert "the evaluator exited after writing the result of ckpt-3; taking it" in daemon_log


def test_an_evaluation_that_always_fails_is_recorded_without_stopping_training(daemon_env):
    env = daemon_env.start()
    env.drop("evfail.toml", env.job_text("evfail", num_steps=15, every=5, keep=10, step_seconds=0.02, eval_crash=5))
    # retries back off 5 s then 10 s: the job needs ~15 s
    job = env.wait_state("evfail", "succeeded", 90)
    states = {c["n"]: (c["state"], c["attempts"]) for c in job["evaluation"]["checkpoints"]}
    assert states == {1: ("evaluated", 1), 2: ("failed", 3), 3: ("evaluated", 1), 4: ("evaluated", 1)}
    assert job["step"] == 15 and job["restarts"] == 0


def test_killed_evaluator_and_checkpoint_written_while_the_daemon_was_down(daemon_env):
    env = daemon_env.start()
    env.drop("down.toml", env.job_text("down", num_steps=5000, every=10, keep=3, step_seconds=0.02, eval_seconds=0.05))
    wait_for(lambda: len(evaluated(env.job("down"))) >= 2, 60, what="two evaluations")
    evaluator = worker_pids(f"eval-serve --job {env.state}/work/down/job.json")
    assert len(evaluator) == 1
    os.kill(evaluator[0], signal.SIGKILL)  # midway or between evaluations: nothing may be lost
    count = len(evaluated(env.job("down")))
    wait_for(lambda: len(evaluated(env.job("down"))) >= count + 2, 60, what="evaluations after the kill")
    env.stop()
    # while the daemon is down, a new complete checkpoint appears (e.g. written by hand or a trainer of its own)
    model_dir = os.path.join(env.models, "down")
    with open(os.path.join(model_dir, "ckpt-900.data-00000-of-00001"), "w") as f:
        f.write("data")
    with open(os.path.join(model_dir, "ckpt-900.index"), "w") as f:
        json.dump({"step": 9000, "standin": True}, f)
    env.start()
    wait_for(lambda: any(c["n"] == 900 and c["state"] == "evaluated" for c in env.job("down")["evaluation"]["checkpoints"]),
             60, what="the checkpoint written while the daemon was down to be evaluated")
    env.ask("cancel", name="down")
    job = env.wait_state("down", "cancelled", 30)
    steps = [c["step"] for c in evaluated(job)]
    assert len(steps) == len(set(steps)) and sorted(eval_steps(env, "down")) == sorted(steps)  # each once
    assert not worker_pids(f"{env.state}/work/down/job.json")


def test_early_stopping_stops_at_the_right_evaluation_and_keeps_and_exports_the_best(daemon_env):
    env = daemon_env.start()
    env.drop("early.toml", env.job_text("early", num_steps=10_000, every=5, keep=2, step_seconds=0.05,
                                        eval_seconds=0.05, map_peak_step=20,
                                        eval_extra="patience = 2\nexport_best = true\n"))
    job = env.wait_state("early", "succeeded", 90)
    assert job["reason"].startswith("stopped early: DetectionBoxes_Precision/mAP did not improve by at least 0 "
                                    "in 2 evaluations (best")
    assert "at step 20" in job["reason"]
    history = [h["state"] for h in job["history"]]
    assert history[-4:] == ["running", "stopping", "evaluating", "succeeded"]
    steps = [c["step"] for c in evaluated(job)]
    assert steps[:7] == [0, 5, 10, 15, 20, 25, 30]  # the verdict came after the evaluation of step 30
    assert job["step"] < 200  # training really stopped early
    best = json.load(open(os.path.join(env.models, "early", "best", "best.json")))
    assert best["step"] == 20 and job["evaluation"]["best"]["step"] == 20
    assert sorted(os.listdir(os.path.join(env.models, "early", "best"))) == sorted(
        ["best.json", f"{best['checkpoint']}.index", f"{best['checkpoint']}.data-00000-of-00001"])
    exported = os.path.join(env.models, "early", "exported", "saved_model.pb")
    wait_for(lambda: os.path.exists(exported), 10, what="the export")
    assert json.load(open(exported))["step"] == 20


def test_skip_to_newest_records_each_skip(daemon_env):
    env = daemon_env.start()
    env.drop("skip.toml", env.job_text("skip", num_steps=60, every=5, keep=20, step_seconds=0.01, eval_seconds=0.6,
                                       eval_extra='when_behind = "skip_to_newest"\nmax_behind = 1\n'))
    job = env.wait_state("skip", "succeeded", 90)
    counts = job["evaluation"]["counts"]
    assert counts["skipped"] >= 3 and counts["evaluated"] + counts["skipped"] == 13
    assert all("behind" in c["error"] for c in job["evaluation"]["checkpoints"] if c["state"] == "skipped")
    assert evaluated(job)[-1]["step"] == 60  # the final checkpoint is never skipped


def test_status_shows_checkpoints_trends_and_best(daemon_env):
    env = daemon_env.start()
    env.drop("show.toml", env.job_text("show", num_steps=30, every=10, keep=5, step_seconds=0.01))
    env.wait_state("show", "succeeded", 60)
    # the last training scalars are read (event files are followed, not awaited by the job's end)
    wait_for(lambda: (env.job("show")["loss_history"] or [[None]])[-1][0] == 30, 60,
             what="the step-30 loss in the view")
    out = env.cli("status", "show")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    # what the stand-in evaluator computes for ckpt-1..4 (steps 0, 10, 20, 30); mAP rises, so ckpt-4 is the best
    expected = {n: eval_metrics(step)[MAP] for n, step in ((1, 0), (2, 10), (3, 20), (4, 30))}
    rows = {int(m.group(1)): m for m in (re.match(r"^\s+ckpt-(\d+)\s+(\d+) (\w+)\s+([\d.]+)\s+\S+\s+\S+(.*)$", line)
                                         for line in lines) if m}
    assert sorted(rows) == [1, 2, 3, 4], out.stdout
    for n, m in rows.items():
        assert (int(m.group(2)), m.group(3), m.group(4)) == ((n - 1) * 10, "evaluated", f"{expected[n]:.4f}"), \
            m.group(0)
        assert (m.group(5) == "  <- best") == (n == 4), m.group(0)
    assert f"  best       ckpt-4 step 30 mAP {expected[4]:.4g}" in lines, out.stdout
    assert "  checkpoints (4 evaluated):" in lines, out.stdout
    map_line = next(line for line in lines if line.startswith("  mAP "))
    assert map_line.endswith(f"  {expected[1]:.3g} -> {expected[4]:.3g}") and len(map_line.split()[1]) == 4, map_line
    # the train loss trend: from the first recorded step to step 30, the values the stand-in trained with
    loss = re.fullmatch(r"  loss       (\S+)  (\S+) -> (\S+) \(steps (\d+)-(\d+)\)", next(
        line for line in lines if line.startswith("  loss ")))
    assert loss, out.stdout
    first, last = int(loss.group(4)), int(loss.group(5))
    pipeline = {"num_steps": 30}
    assert last == 30 and 0 <= first < last, loss.group(0)
    assert (loss.group(2), loss.group(3)) == (f"{train_scalars(first, pipeline)['Loss/total_loss']:.3g}",
                                              f"{train_scalars(30, pipeline)['Loss/total_loss']:.3g}"), loss.group(0)


def test_cold_one_shot_evaluation_from_the_cli(daemon_env):
    env = daemon_env.start()
    env.drop("cold.toml", env.job_text("cold", num_steps=10, every=5, keep=5, step_seconds=0.01))
    env.wait_state("cold", "succeeded", 60)
    out = env.cli("eval", "cold", "--checkpoint", "best/ckpt-3", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["step"] == 10 and result["metrics"][MAP] == eval_metrics(10)[MAP]
    out = env.cli("eval", "cold", "--checkpoint", "ckpt-99")
    assert out.returncode == 1 and "ckpt-99.index does not exist" in out.stderr
