"""``oddaemon finish``: a running job's training ends now with its work kept. The stand-in trainer
saves a checkpoint on SIGUSR2 as the real one does (at the step it has reached)
and exits; every checkpoint is evaluated, the best exported, and the job succeeds."""

from __future__ import annotations

import json
import os

from oddaemon.testing.standin_core import checkpoint_step, read_checkpoint_state
from tests.support.harness import wait_for


def test_finish_saves_evaluates_the_rest_exports_the_best_and_succeeds(daemon_env):
    env = daemon_env.start()
    env.drop("f.toml", env.job_text("f", num_steps=100000, every=50, keep=2, step_seconds=0.01,
                                    eval_extra="export_best = true"))
    env.drop("q.toml", env.job_text("q", num_steps=4, extra='after = ["f"]'))
    wait_for(lambda: (env.job("f") or {}).get("step") and env.job("f")["step"] >= 120, 60, what="f past step 120")
    out = env.cli("finish", "q")
    assert out.returncode != 0 and "job 'q' has not started training: `oddaemon cancel` it instead" in out.stderr, \
        out.stdout + out.stderr
    out = env.cli("finish", "f")
    assert out.returncode == 0 and out.stdout.strip() == "f: stopping", out.stdout + out.stderr
    f = env.wait_state("f", ("succeeded", "failed", "cancelled"), 90)
    assert f["state"] == "succeeded", f
    assert [h["reason"] for h in f["history"]][-3:] == [
        "finished by request: saving a checkpoint", "finished by request; evaluating the remaining checkpoints",
        "finished by request; every checkpoint evaluated"], f["history"]
    assert f["restarts"] == 0 and f["failure"] is None, f
    # the checkpoint saved on the request holds the step the trainer had reached (the marker names it)
    kept = read_checkpoint_state(os.path.join(env.models, "f"))
    last = checkpoint_step(kept[-1])
    assert last >= 120, last
    checkpoints = f["evaluation"]["checkpoints"]
    assert all(c["state"] == "evaluated" and c["attempts"] == 1 for c in checkpoints), checkpoints
    assert checkpoints[-1]["step"] == last and [c["step"] for c in checkpoints][:3] == [0, 50, 100]
    with open(os.path.join(env.models, "f", "exported", "export.json")) as info:
        assert json.load(info)["checkpoint"] == f["evaluation"]["best"]["checkpoint"]
    with open(os.path.join(env.logs, "f", "train.log")) as log:
        text = log.read()
    assert "==== oddaemon: finished by request: SIGUSR2 (save a checkpoint, exit)" in text, text[-2000:]
    assert f"oddaemon-failure: requeued: saved a checkpoint at step {last} on SIGUSR2 (oddaemon finish)" in text
    # the job that waited for it runs (it succeeded), and finishing a finished job is refused
    assert env.wait_state("q", "succeeded", 60)["state"] == "succeeded"
    out = env.cli("finish", "f")
    assert out.returncode != 0 and "job 'f' is already succeeded" in out.stderr
    assert env.cli("finish", "ghost").returncode != 0


def test_export_command_exports_the_best_or_a_named_checkpoint_of_a_job_without_export_best(daemon_env, tmp_path):
    """oddaemon export: a job that ran without export_best gets its SavedModel afterwards: the best
    (model_dir/best) by default, or a checkpoint TF still keeps; one TF deleted, or an output that
    is not empty, is refused with the reason."""
    env = daemon_env.start()
    env.drop("j.toml", env.job_text("j", num_steps=20, every=5, keep=2, step_seconds=0.01))
    job = env.wait_state("j", "succeeded", 60)
    best = job["evaluation"]["best"]
    out = env.cli("export", "j", "-o", str(tmp_path / "best"))
    assert out.returncode == 0 and out.stdout.strip() == f"j {best['checkpoint']} exported to {tmp_path / 'best'}", \
        out.stdout + out.stderr
    with open(tmp_path / "best" / "export.json") as f:
        info = json.load(f)
    assert (info["checkpoint"], info["step"], info["job"]) == (best["checkpoint"], best["step"], "j")
    assert os.path.isfile(tmp_path / "best" / "checkpoint" / "ckpt-0.index")
    newest = os.path.basename(read_checkpoint_state(os.path.join(env.models, "j"))[-1])
    out = env.cli("export", "j", "--checkpoint", newest, "-o", str(tmp_path / "newest"))
    assert out.returncode == 0, out.stdout + out.stderr
    with open(tmp_path / "newest" / "export.json") as f:
        assert json.load(f)["step"] == 20
    out = env.cli("export", "j", "--checkpoint", "ckpt-1", "-o", str(tmp_path / "gone"))
    assert out.returncode != 0 and "cannot read checkpoint" in out.stderr and "checkpoint_max_to_keep" in out.stderr
    assert not os.path.exists(tmp_path / "gone")
    out = env.cli("export", "j", "-o", str(tmp_path / "best"))
    assert out.returncode != 0 and "exists and is not an empty directory" in out.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".oddaemon-export-")]  # (its snapshot removed)


def test_priority_command_moves_a_queued_job_ahead_and_survives_a_restart(daemon_env):
    daemon_env.write_config(max_cpu_jobs=1)
    env = daemon_env.start()
    env.drop("run.toml", env.job_text("run", num_steps=60, every=20, step_seconds=0.05))
    env.wait_state("run", "running", 30)
    for name in ("a", "b"):
        env.drop(f"{name}.toml", env.job_text(name, num_steps=4))
        env.wait_state(name, "queued", 30)
    out = env.cli("priority", "b", "5")
    assert out.returncode == 0 and out.stdout.strip() == "b: queued, priority 5, queue position 1", out.stdout + out.stderr
    assert env.ask("list")["queue"] == ["b", "a"]
    out = env.cli("priority", "b", "5000")
    assert out.returncode != 0 and "priority must be a whole number from -1000 to 1000, got 5000" in out.stderr, \
        (out.returncode, out.stderr)
    env.stop()
    env.start()  # the new priority is in the saved record (b now outranks the resumed run too)
    assert env.job("b")["priority"] == 5 and env.ask("list")["queue"][-1] == "a"
    b, a = env.wait_state("b", "succeeded", 90), env.wait_state("a", "succeeded", 90)
    assert b["started_at"] < a["started_at"]
    assert "priority 0 -> 5 by request" in [h["reason"] for h in b["history"]]
