"""Notifications with the real daemon and the stand-in worker: the events of real jobs arrive as
JSON at a webhook on 127.0.0.1 and on a command's stdin, each delivery is in the job's history, a
dead endpoint leaves the daemon answering, and a job file cannot carry a URL."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from oddaemon.testing.standin_core import eval_metrics
from tests.support.harness import wait_for
from tests.support.webhook import Webhook

MAP = "DetectionBoxes_Precision/mAP"


@pytest.fixture
def hook():
    with Webhook() as server:
        yield server


def configure(env, targets: dict[str, str], **notify) -> None:
    """The harness's configuration plus a [notify] section and its targets (TOML text per target)."""
    env.write_config()
    notify = {"retry_backoff_seconds": 0.1, **notify}
    lines = ["[notify]"] + [f"{k} = {json.dumps(v)}" for k, v in notify.items()]
    for name, body in targets.items():
        lines += [f"[notify.targets.{name}]", body]
    with open(env.config_path, "a") as f:
        f.write("\n".join(lines) + "\n")


def notify_table(events: list[str], targets: list[str], **more) -> str:
    return "\n[notify]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in
                                    {"events": events, "targets": targets, **more}.items())


def recorded(env, name: str) -> list[str]:
    job = env.job(name)
    return [h["reason"] for h in job["history"] if h["state"] == "notify"] if job else []


def command_target(tmp_path) -> tuple[str, str]:
    """A command that appends each event it reads on stdin to a JSON-lines file."""
    out = tmp_path / "command-events.jsonl"
    script = tmp_path / "on-event"
    script.write_text(f"#!{sys.executable}\nimport json, sys\nevent = json.load(sys.stdin)\n"
                      f"with open({str(out)!r}, 'a') as f:\n    f.write(json.dumps(event) + '\\n')\n")
    script.chmod(0o755)
    return f"command = {json.dumps([str(script)])}", str(out)


def evaluated_count(env, name: str) -> int:
    return env.job(name)["evaluation"]["counts"]["evaluated"]


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


def read_lines(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def test_succeeded_and_new_best_reach_a_webhook_and_a_command(daemon_env, hook, tmp_path):
    command, out = command_target(tmp_path)
    configure(daemon_env, {"team": f'url = "{hook.url}"', "script": command})
    env = daemon_env.start()
    env.drop("cats.toml", env.job_text("cats", num_steps=20, every=5, step_seconds=0.02, eval_seconds=0.05)
             + notify_table(["succeeded", "new_best"], ["team", "script"]))
    job = env.wait_state("cats", "succeeded", 90)
    wait_for(lambda: hook.events("cats", "succeeded") and any(e["event"] == "succeeded" for e in read_lines(out)),
             30, what="the succeeded notification at both targets")
    done = hook.events("cats", "succeeded")
    assert len(done) == 1 and done[0]["state"] == "succeeded" and done[0]["reason"] == job["reason"]
    assert (done[0]["metric"], done[0]["step"], done[0]["value"]) == (MAP, 20, eval_metrics(20)[MAP])
    assert done[0]["model_dir"] == f"{env.models}/cats"
    best = [(e["metric"], e["step"], e["value"]) for e in hook.events("cats", "new_best")]
    # the stand-in's mAP rises with the step: every evaluated checkpoint (steps 0 ... 20) is a new best
    assert best == [(MAP, step, eval_metrics(step)[MAP]) for step in (0, 5, 10, 15, 20)]
    by_command = read_lines(out)
    assert [e["event"] for e in by_command].count("new_best") == 5
    assert next(e for e in by_command if e["event"] == "succeeded") == done[0]  # the same JSON on stdin
    assert {r["type"] for r in hook.received} == {"application/json"}
    wait_for(lambda: {"notification succeeded to team: sent", "notification succeeded to script: sent"}
             <= set(recorded(env, "cats")), 30, what="the deliveries in the job's history")
    # a run of new_best deliveries keeps one entry per target between two state changes (the latest),
    # never crowding the states out of the history
    full = env.job("cats")["history"]
    runs, run = [], []
    for h in full:
        if h["state"] == "notify":
            run.append(h["reason"].split(":")[0])
        elif run:
            runs, run = runs + [run], []
    for keys in [*runs, run]:
        assert len(keys) == len(set(keys)), full
    assert 1 <= recorded(env, "cats").count("notification new_best to team: sent") < 5, full
    states = [h["state"] for h in full if h["state"] != "notify"]
    assert states[-3:] == ["running", "evaluating", "succeeded"]
    shown = env.cli("status", "cats")
    assert "notification succeeded to team: sent" in shown.stdout, shown.stdout


def test_failed_carries_the_failure_sentence_in_slack_format(daemon_env, hook):
    configure(daemon_env, {"team": f'url = "{hook.url}"\nformat = "slack"'}, default_targets=["team"])
    env = daemon_env.start()
    # no [notify] table: the daemon's default targets and default events (succeeded, failed)
    env.drop("nan.toml", env.job_text("nan", num_steps=40, every=10, step_seconds=0.02, nan_at_step=8,
                                      eval_extra="enabled = false"))
    job = env.wait_state("nan", "failed", 60)
    wait_for(lambda: hook.received, 30, what="the failed notification")
    assert [r["body"] for r in hook.received] == [{"text": f"oddaemon on {os.uname().nodename}: job nan failed: "
                                                           f"{job['reason']}"}]
    assert "NaN" in job["reason"]
    wait_for(lambda: "notification failed to team: sent" in recorded(env, "nan"), 30, what="the history entry")


def test_stalled_and_evaluator_behind_are_sent_once_per_episode(daemon_env, hook):
    configure(daemon_env, {"team": f'url = "{hook.url}"'})
    env = daemon_env.start()
    # a checkpoint every step, each evaluation 2 s: the evaluator falls behind; at step 12 the trainer hangs
    env.drop("slow.toml", env.job_text("slow", num_steps=100, every=1, keep=50, step_seconds=0.05, eval_seconds=2.0,
                                       hang_at_step=12, summary_every_n=1, summary_flush_seconds=0.1,
                                       eval_extra="max_behind = 2", extra="")
             .replace("[train]\n", "[train]\nhang_timeout_seconds = 0\n")
             + notify_table(["stalled", "evaluator_behind"], ["team"], stalled_after_seconds=2))
    wait_for(lambda: hook.events("slow", "stalled") and hook.events("slow", "evaluator_behind"), 60,
             what="stalled and evaluator_behind")
    behind = hook.events("slow", "evaluator_behind")[0]
    assert behind["waiting"] > 2 and behind["state"] == "running"
    stalled = hook.events("slow", "stalled")[0]
    assert stalled["seconds"] >= 2 and stalled["state"] == "running"
    assert 1 <= stalled["step"] <= 12  # where the trainer hung (its summaries are flushed at once here)
    wait_for(lambda: {"notification stalled to team: sent", "notification evaluator_behind to team: sent"}
             <= set(recorded(env, "slow")), 30, what="both in the history")
    # two more evaluations (2 s each) while the trainer stays hung: the conditions were checked many
    # more times (every 0.5 s here), and still went out once
    done = evaluated_count(env, "slow")
    wait_for(lambda: evaluated_count(env, "slow") >= done + 2, 60, what="two more evaluations")
    assert env.ask("cancel", name="slow")["ok"]
    env.wait_state("slow", "cancelled", 60)
    assert len(hook.events("slow", "stalled")) == 1  # the stall went on for many checks: one notification
    assert len(hook.events("slow", "evaluator_behind")) == 1


def test_a_dead_endpoint_is_retried_a_bounded_number_of_times_and_the_daemon_answers(daemon_env, hook):
    configure(daemon_env, {"dead": f'url = "http://127.0.0.1:{dead_port()}/hook/T0/secret"', "team": f'url = "{hook.url}"'},
              retries=2, default_targets=["dead", "team"])
    env = daemon_env.start()
    for name in ("one", "two"):
        env.drop(f"{name}.toml", env.job_text(name, num_steps=10, every=5, step_seconds=0.02,
                                              eval_extra="enabled = false"))
        env.wait_state(name, "succeeded", 60)
    wait_for(lambda: all("notification succeeded to dead: failed after 3 tries (cannot connect: Connection refused)"
                         in recorded(env, n) for n in ("one", "two")), 60, what="the dead endpoint's failures")
    assert [r["body"]["job"] for r in hook.received] == ["one", "two"]
    assert all("notification succeeded to team: sent" in recorded(env, n) for n in ("one", "two"))
    log = env.daemon_log()
    assert log.count("notify target dead:") == 1, log  # one line for the episode, not one per try
    assert "secret" not in log


def test_a_notification_still_waiting_when_the_daemon_stops_is_sent_by_the_next_one(daemon_env, hook):
    configure(daemon_env, {"team": f'url = "{hook.url}"'}, retry_backoff_seconds=20, default_targets=["team"])
    hook.answers = [503]  # the first try fails: the retry waits 20 s, and the daemon is restarted meanwhile
    env = daemon_env.start()
    env.drop("one.toml", env.job_text("one", num_steps=10, every=5, step_seconds=0.02, eval_extra="enabled = false"))
    env.wait_state("one", "succeeded", 60)
    wait_for(lambda: len(hook.received) == 1, 30, what="the first (failing) try")
    env.stop()
    assert "1 notification(s) still waiting, kept for the next start" in env.daemon_log()
    kept = os.path.join(env.state, "notifications-waiting.json")
    text = open(kept).read()
    assert '"job": "one"' in text and "127.0.0.1" not in text and hook.url not in text  # the URL is never written
    env.start()
    wait_for(lambda: "notification succeeded to team: sent (try 2)" in recorded(env, "one"), 60,
             what="the kept notification sent by the next daemon")
    assert [r["body"]["job"] for r in hook.received] == ["one", "one"]
    assert hook.received[0]["body"] == hook.received[1]["body"]  # the same event, not a new one
    assert not os.path.exists(kept)
    assert "notifications kept by the daemon that stopped: 1 queued again, 0 dropped" in env.daemon_log()


def test_a_job_file_with_a_url_or_an_unknown_target_is_rejected(daemon_env, hook):
    configure(daemon_env, {"team": f'url = "{hook.url}"'})
    env = daemon_env.start()
    env.drop("leaky.toml", env.job_text("leaky") + '\n[notify]\nurl = "https://hooks.slack.com/services/T/B/x"\n')
    env.drop("typo.toml", env.job_text("typo") + notify_table(["failed"], ["tema"]))
    wait_for(lambda: len(env.rejected()) == 4, 60, what="both files and their .error files in rejected/")
    leaky = open(os.path.join(env.spool, "rejected", "leaky.toml.error")).read()
    assert "[notify] url: a job names the daemon's notification targets" in leaky
    assert "belong in the daemon configuration" in leaky
    typo = open(os.path.join(env.spool, "rejected", "typo.toml.error")).read()
    assert "[notify] targets: 'tema' is not one of the daemon's notification targets (team)" in typo
    assert env.job("leaky") is None and env.job("typo") is None
