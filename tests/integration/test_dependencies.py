"""Job dependencies (``after``) with the real daemon and the stand-in worker: a job waits until the
jobs it names succeeded, is cancelled with the reason when one fails or is cancelled, names that
are unknown or make a cycle reject the file, and waiting survives a daemon restart."""

from __future__ import annotations

import json
import os
import re

from tests.support.harness import free_port, scrape, wait_for


def scraped_with(port: int, line: str) -> str:
    """The exposition once it holds ``line`` (the snapshot is published shortly after a change)."""
    found: list[str] = []

    def has() -> bool:
        found[:] = [scrape(port)]
        return line in found[0]

    wait_for(has, 30, what=f"{line} in the metrics")
    return found[0]


def error_text(env, filename: str) -> str:
    wait_for(lambda: f"{filename}.error" in env.rejected(), 30, what=f"{filename}.error")
    with open(os.path.join(env.spool, "rejected", f"{filename}.error")) as f:
        return f.read()


def states(job: dict) -> list[str]:
    return [h["state"] for h in job["history"]]


def test_b_after_a_waits_is_shown_waiting_and_runs_only_after_a_succeeded(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}", max_cpu_jobs=2)  # a free slot for b all along
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=40, every=10, step_seconds=0.05))
    env.drop("b.toml", env.job_text("b", num_steps=4, every=2, step_seconds=0.01, extra='after = ["a"]'))
    env.wait_state("a", "running", 30)
    b = env.wait_state("b", "waiting", 30)
    assert b["after"] == ["a"] and b["waiting_for"] == ["a"] and b["reason"] == "submitted; waiting for a (after)"
    assert b["queue_position"] is None and b["attempt"] == 0
    out = env.cli("list")
    assert out.returncode == 0 and re.search(r"^b\s+waiting\s.*waiting for a \(after\)$", out.stdout, re.M), out.stdout
    assert "1 waiting for other jobs" in out.stdout
    out = env.cli("status", "b")
    assert out.returncode == 0 and "after      a   (waiting for a)" in out.stdout, out.stdout
    metrics = scraped_with(port, 'oddaemon_jobs{state="waiting"} 1.0')
    assert 'oddaemon_job_state{job_name="b",state="waiting"} 1.0' in metrics
    assert 'oddaemon_job_dependencies_pending{job_name="b"} 1.0' in metrics
    b = env.wait_state("b", "succeeded", 90)
    a = env.job("a")
    assert a["state"] == "succeeded"
    assert states(b)[:3] == ["waiting", "queued", "running"]
    assert b["history"][1]["reason"] == "a succeeded (after)"
    # b started only once a had succeeded: a's last history entry comes before b's first start
    assert a["finished_at"] <= b["history"][1]["time"] <= b["started_at"]
    assert b["waiting_for"] == [] and b["attempt"] == 1
    metrics = scraped_with(port, 'oddaemon_job_state{job_name="b",state="succeeded"} 1.0')
    assert 'oddaemon_job_dependencies_pending{job_name="b"}' not in metrics
    assert 'oddaemon_jobs{state="waiting"} 0.0' in metrics


def test_a_failed_or_cancelled_dependency_cancels_the_dependents_with_the_reason(daemon_env):
    daemon_env.write_config(max_cpu_jobs=2)
    env = daemon_env.start()
    # a fails 15 s into training: b and c are accepted (waiting) long before, even on a loaded machine
    # (were a failed first, they would be rejected at submission, as "late" is below)
    env.drop("a.toml", env.job_text("a", num_steps=400, every=100, step_seconds=0.05, nan_at_step=300))
    env.drop("b.toml", env.job_text("b", num_steps=4, extra='after = ["a"]'))
    env.drop("c.toml", env.job_text("c", num_steps=4, extra='after = ["b"]'))
    env.wait_state("c", "waiting", 30)
    env.wait_state("a", "failed", 120)
    b = env.wait_state("b", "cancelled", 30)
    c = env.wait_state("c", "cancelled", 30)
    assert b["reason"].startswith("job 'a' it waits for (after) failed: ") and "NaN" in b["reason"], b["reason"]
    assert c["reason"].startswith("job 'b' it waits for (after) cancelled: job 'a'"), c["reason"]
    assert states(b) == ["waiting", "cancelled"] and b["attempt"] == 0  # never started
    # retrying b is refused while a is failed, and says what to do
    out = env.cli("retry", "b")
    assert out.returncode != 0 and "oddaemon retry a" in out.stderr + out.stdout
    # a new job that would wait for the failed one is rejected, not accepted only to be cancelled
    env.drop("late.toml", env.job_text("late", num_steps=4, extra='after = ["a"]'))
    assert "'a' (failed)" in error_text(env, "late.toml")

    env.drop("slow.toml", env.job_text("slow", num_steps=400, every=100, step_seconds=0.05))
    env.drop("d.toml", env.job_text("d", num_steps=4, extra='after = ["slow"]'))
    env.wait_state("slow", "running", 30)
    env.wait_state("d", "waiting", 30)
    out = env.cli("cancel", "slow")
    assert out.returncode == 0, out.stderr
    d = env.wait_state("d", "cancelled", 60)
    assert d["reason"] == "job 'slow' it waits for (after) cancelled: cancelled by request"
    with open(os.path.join(env.state, "jobs", "d.json")) as f:
        assert json.load(f)["state"] == "cancelled"


def test_unknown_dependencies_and_a_cycle_are_rejected_with_the_names(daemon_env):
    env = daemon_env.start()
    env.drop("known.toml", env.job_text("known", num_steps=4))
    env.wait_state("known", "succeeded", 60)
    env.drop("lost.toml", env.job_text("lost", num_steps=4, extra='after = ["known", "nope", "never-was"]'))
    text = error_text(env, "lost.toml")
    assert "job 'lost' waits for (after) jobs the daemon does not know: 'nope', 'never-was'" in text, text
    env.drop("loop.toml", env.job_text("loop", num_steps=4, extra='after = ["known", "loop"]'))
    text = error_text(env, "loop.toml")
    assert "after: names this job itself ('loop')" in text and "loop -> loop" in text, text
    for name in ("lost", "loop"):
        assert env.job(name) is None
        assert os.path.exists(os.path.join(env.spool, "rejected", f"{name}.toml"))  # nothing lost
    # a dependency that already succeeded: queued at once
    env.drop("next.toml", env.job_text("next", num_steps=4, extra='after = ["known"]'))
    job = env.wait_state("next", "succeeded", 60)
    assert states(job)[:2] == ["queued", "running"] and job["history"][0]["reason"] == \
        "submitted; known already succeeded"


def test_a_dependent_whose_check_ends_first_is_held_until_its_dependency_is_accepted(daemon_env):
    # a's preflight takes a while; b's (on the second preflight worker) ends first: b must not be
    # rejected for naming a job the daemon does not know yet, only held until a is accepted
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=4, preflight_seconds=3.0))
    env.drop("b.toml", env.job_text("b", num_steps=4, extra='after = ["a"]'))
    b = env.wait_state("b", ("waiting", "queued", "running", "evaluating", "succeeded"), 60)
    assert b["history"][0]["state"] == "waiting", b["history"]
    assert env.wait_state("b", "succeeded", 60)["waiting_for"] == []
    assert env.rejected() == []
    with open(os.path.join(env.logs, "_preflight-1", "preflight.log")) as one, \
            open(os.path.join(env.logs, "_preflight-2", "preflight.log")) as two:
        checks = one.read() + two.read()
    assert "preflight of 'a'" in checks and "preflight of 'b'" in checks


def test_waiting_survives_a_daemon_restart_and_runs_after(daemon_env):
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=60, every=10, step_seconds=0.05))
    env.drop("b.toml", env.job_text("b", num_steps=4, extra='after = ["a"]'))
    env.wait_state("a", "running", 30)
    env.wait_state("b", "waiting", 30)
    env.stop()
    with open(os.path.join(env.state, "jobs", "b.json")) as f:
        record = json.load(f)
    assert record["state"] == "waiting" and record["waiting_for"] == ["a"] and record["spec"]["after"] == ["a"]
    env.start()
    b = env.job("b")
    assert b["state"] == "waiting" and b["waiting_for"] == ["a"], b
    a = env.wait_state("a", "succeeded", 90)
    b = env.wait_state("b", "succeeded", 60)
    assert "resuming after daemon restart" in [h["reason"] for h in a["history"]]
    assert states(b)[:3] == ["waiting", "queued", "running"]
    assert a["finished_at"] <= b["started_at"]


def fine_tune_text(env, name: str, after: str, checkpoint: str, **kw) -> str:
    """A job that waits for ``after`` and fine-tunes from ``checkpoint`` (not there at submission)."""
    return env.job_text(name, extra=f'after = ["{after}"]', **kw).replace(
        "[pipeline]\n", f'[pipeline]\nfine_tune_checkpoint = "{checkpoint}"\nfine_tune_checkpoint_type = "detection"\n', 1)


def test_a_job_fine_tunes_from_the_export_of_the_job_it_waits_for(daemon_env):
    """The pretrain -> fine-tune pipeline: b names a's exported/checkpoint/ckpt-0 before a wrote it;
    b is accepted, waits, and starts from it once a has succeeded (its export done). A job that names
    a checkpoint in no dependency's model_dir is rejected; one whose dependency did not write the
    checkpoint (no export_best) fails at its start with the reason, without a retry."""
    env = daemon_env.start()
    env.drop("a.toml", env.job_text("a", num_steps=20, every=5, step_seconds=0.02, eval_extra="export_best = true"))
    awaited = f"{env.models}/a/exported/checkpoint/ckpt-0"
    env.drop("b.toml", fine_tune_text(env, "b", "a", awaited, num_steps=6, every=2))
    env.drop("astray.toml", fine_tune_text(env, "astray", "a", f"{env.models}/elsewhere/ckpt-0", num_steps=4))
    text = error_text(env, "astray.toml")
    assert (f"job 'astray' has [pipeline] fine_tune_checkpoint {env.models}/elsewhere/ckpt-0, which does not exist"
            in text and f"'a' writes {env.models}/a" in text), text
    b = env.wait_state("b", "waiting", 30)
    assert not os.path.exists(awaited + ".index")  # (accepted before a wrote it)
    with open(os.path.join(env.logs, "b", "preflight.log")) as f:
        assert "preflight ok" in f.read()
    b = env.wait_state("b", "succeeded", 120)
    a = env.job("a")
    assert a["state"] == "succeeded" and a["finished_at"] <= b["started_at"]
    assert os.path.isfile(awaited + ".index")
    with open(os.path.join(env.logs, "b", "train.log")) as f:
        assert "load_fine_tune_checkpoint" not in f.read()  # (the stand-in's TF traceback for a missing one)
    # a dependency that exports nothing: the dependent is refused at its start, naming it
    env.drop("n.toml", env.job_text("n", num_steps=4))
    env.drop("m.toml", fine_tune_text(env, "m", "n", f"{env.models}/n/exported/checkpoint/ckpt-0", num_steps=4))
    m = env.wait_state("m", ("failed", "succeeded"), 90)
    assert m["state"] == "failed" and m["failure"]["kind"] == "refused" and m["restarts"] == 0, m
    assert (f"the train worker was not started: [pipeline] fine_tune_checkpoint {env.models}/n/exported/checkpoint/"
            "ckpt-0 does not exist" in m["reason"] and "(after: 'n' (succeeded)) did not write it" in m["reason"]), m
    assert not os.path.exists(os.path.join(env.logs, "m", "train.log"))
