"""The CLI's verdicts against a real daemon (stand-in worker): ``submit`` reports the verdict of
exactly the file it delivered, says at once when the daemon is down, ``-c`` works before and after
the subcommand, unknown values print as ``-``, and every control request gets an answer (an error
reply with its kind, which the CLI's exit status follows)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support.harness import wait_for


def test_fix_and_resubmit_within_a_second_gets_the_new_verdict(daemon_env, tmp_path):
    env = daemon_env.start()
    job = tmp_path / "fixme.toml"
    job.write_text(env.job_text("fixme", num_steps=5).replace("[train]", "[train]\ncheckpoint_evry_n = 1"))
    out = env.cli("submit", str(job))
    assert out.returncode == 4, out.stdout + out.stderr
    assert "unknown key 'checkpoint_evry_n' in [train]" in out.stdout
    job.write_text(env.job_text("fixme", num_steps=5))  # fixed, and submitted again at once
    out = env.cli("submit", str(job))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "REJECTED" not in out.stdout and "accepted as job fixme:" in out.stdout
    env.wait_state("fixme", "succeeded", 60)


def test_a_name_sharing_a_prefix_with_a_rejected_file_gets_its_own_verdict(daemon_env, tmp_path):
    env = daemon_env.start()
    bad = tmp_path / "zz_bad.toml"
    bad.write_text('name = "zz_bad"\n')
    out = env.cli("submit", str(bad))
    assert out.returncode == 4 and "missing required key 'pipeline_config'" in out.stdout
    good = tmp_path / "zz.toml"
    good.write_text(env.job_text("zz", num_steps=5))
    out = env.cli("submit", str(good))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "pipeline_config" not in out.stdout and "accepted as job zz:" in out.stdout


def test_a_rejection_by_the_scheduler_is_the_files_own_verdict(daemon_env, tmp_path):
    env = daemon_env.start()
    env.drop("dup.toml", env.job_text("dup", num_steps=10_000, step_seconds=0.05))
    env.wait_state("dup", "running", 20)
    again = tmp_path / "dup.toml"
    again.write_text(env.job_text("dup", num_steps=5))
    out = env.cli("submit", str(again))
    assert out.returncode == 4 and "already" in out.stdout, out.stdout


def test_submit_with_the_daemon_down_returns_at_once_and_the_file_waits(daemon_env, tmp_path):
    env = daemon_env.start()
    env.stop()
    job = tmp_path / "later.toml"
    job.write_text(env.job_text("later", num_steps=5))
    # with an hour's verdict wait, only a CLI that sees at once that the daemon is down ends within the deadline
    out = env.cli("submit", "--wait", "3600", str(job), timeout=60)
    assert out.returncode == 3, out.stdout + out.stderr
    assert "the daemon is not running" in out.stderr
    assert "the file waits in the spool" in out.stderr and "takes it when it starts" in out.stderr
    assert os.path.exists(os.path.join(env.spool, "new", "later.toml"))
    env.start()
    env.wait_state("later", "succeeded", 60)


def test_config_option_before_or_after_the_subcommand(daemon_env):
    env = daemon_env.start()
    for argv in (["-c", env.config_path, "list"], ["list", "-c", env.config_path],
                 ["list", "--config", env.config_path], ["--config", env.config_path, "list", "--json"]):
        out = subprocess.run([sys.executable, "-m", "oddaemon", *argv], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, (argv, out.stderr)
        assert "queued" in out.stdout or out.stdout.strip() in ("[]",), (argv, out.stdout)


def test_unknown_values_print_as_a_dash(daemon_env):
    env = daemon_env.start()
    # a job that waits for a GPU the daemon does not have... is rejected; a queued job behind a running one
    env.drop("first.toml", env.job_text("first", num_steps=10_000, step_seconds=0.05))
    env.wait_state("first", "running", 20)
    env.drop("second.toml", env.job_text("second", num_steps=5))
    env.wait_state("second", "queued", 20)
    for command in (("status", "second"), ("list",)):
        out = env.cli(*command)
        assert out.returncode == 0, out.stderr
        assert "None" not in out.stdout, out.stdout
    assert "step -/5" in env.cli("status", "second").stdout


def test_a_command_that_fails_inside_the_daemon_gets_an_error_reply(daemon_env):
    env = daemon_env.start()
    tmp = os.path.join(env.spool, "tmp")
    os.rmdir(tmp)
    with open(tmp, "w") as f:  # spool/tmp is now a file: delivering into it fails with an OSError
        f.write("in the way\n")
    try:
        reply = env.ask("submit", text=env.job_text("sub", num_steps=5), filename="sub.toml")
        assert reply["ok"] is False and "tmp" in reply["error"], reply
        assert reply["kind"] == "internal" and reply["error"].endswith(" (details in the daemon log)"), reply
        assert "Traceback" in env.daemon_log()  # the traceback goes to the daemon log, the message to the user
        assert env.answers()
    finally:
        os.unlink(tmp)
        os.mkdir(tmp)
    reply = env.ask("submit", text=env.job_text("sub", num_steps=5), filename="sub.toml")
    assert reply["ok"] is True, reply
    wait_for(lambda: (env.job("sub") or {}).get("state") == "succeeded", 60, what="the job to succeed")


def test_a_refusal_keeps_its_kind_from_the_scheduler_to_the_cli(daemon_env):
    env = daemon_env.start()
    env.drop("fin.toml", env.job_text("fin", num_steps=5))
    env.wait_state("fin", "succeeded", 60)
    assert env.ask("cancel", name="ghost") == {"ok": False, "error": "no job named 'ghost'", "kind": "not_found"}
    assert env.ask("cancel", name="fin") == {"ok": False, "error": "job 'fin' is already succeeded", "kind": "refused"}
    assert env.ask("cancel") == {"ok": False, "error": "'cancel' needs a job name", "kind": "invalid"}
    for name, text in (("ghost", "no job named 'ghost'"), ("fin", "job 'fin' is already succeeded")):
        out = env.cli("cancel", name)
        assert (out.returncode, out.stderr) == (1, f"oddaemon: {text}\n"), out
