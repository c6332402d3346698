"""Notifications, the pure part: the daemon's [notify] section, a job's [notify] table, what goes
where, the payloads and bodies, the retry schedule and the history record (core/notifications.py)."""

from __future__ import annotations

import json

import pytest

from oddaemon.core import notifications as nt
from oddaemon.core import scheduler as sch
from oddaemon.core.config import Config, parse_config
from oddaemon.core.errors import ConfigError
from oddaemon.core.job_validation import ValidationContext, parse_job
from oddaemon.core.jobs import HISTORY_LIMIT
from oddaemon.core.jobspec import JobSpec, NotifyOptions

# ---- the daemon configuration ----------------------------------------------------------------------------------


def config_problems(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "/etc/oddaemon/oddaemon.toml")
    return str(caught.value)


def test_targets_parse_with_defaults_and_relative_url_file(tmp_path):
    config = parse_config('[notify]\ndefault_targets = ["team"]\ndefault_events = ["failed", "new_best"]\n'
                          'retries = 2\nqueue_size = 7\n'
                          '[notify.targets.team]\nurl = "https://hooks.example.com/services/T/B/x"\nformat = "slack"\n'
                          '[notify.targets.pager]\nurl_file = "secrets/pager-url"\n'
                          '[notify.targets.script]\ncommand = ["/usr/local/bin/on-event", "--quiet"]\n',
                          str(tmp_path / "oddaemon.toml"))
    assert config.notify_targets == (
        nt.Target("team", url="https://hooks.example.com/services/T/B/x", format="slack"),
        nt.Target("pager", url_file=str(tmp_path / "secrets/pager-url")),
        nt.Target("script", command=("/usr/local/bin/on-event", "--quiet")))
    settings = config.notify_settings()
    assert (settings.default_targets, settings.default_events, settings.retries, settings.queue_size) == (
        ("team",), ("failed", "new_best"), 2, 7)
    assert config.validation_context().notify_targets == ("team", "pager", "script")
    assert [t.kind for t in config.notify_targets] == ["webhook", "webhook", "command"]


def test_no_notify_section_means_no_targets():
    settings = Config(path=None).notify_settings()
    assert settings.targets == () and settings.default_events == ("succeeded", "failed")
    assert nt.choices(JobSpec("a", "/p", "/m"), settings) == ((), ())


def test_every_bad_target_is_named_and_the_url_is_not_shown():
    text = config_problems('[notify]\ndefault_events = ["finished"]\ntimeout_seconds = 0\n'
                           '[notify.targets.both]\nurl = "https://h/x"\ncommand = ["/bin/true"]\n'
                           '[notify.targets.ftp]\nurl = "ftp://hooks.example.com/secret-token-123"\n'
                           '[notify.targets.relative]\ncommand = ["notify-send"]\n'
                           '[notify.targets.cmdfmt]\ncommand = ["/bin/cat"]\nformat = "slack"\n'
                           '[notify.targets.typo]\nurl = "https://h/x"\nformats = "json"\n'
                           '[notify.targets.fmt]\nurl = "https://h/x"\nformat = "teams"\n'
                           '[notify.targets.none]\n')
    for expected in ("[notify.targets.both] needs exactly one of url, url_file and command, got url, command",
                     "[notify.targets.ftp] url must be an http:// or https:// URL",
                     "[notify.targets.relative] command must be a non-empty list of strings: the program's "
                     "absolute path",
                     "[notify.targets.cmdfmt]: format is for url and url_file targets",
                     "[notify.targets.typo]: unknown key 'formats'. Allowed keys: url, url_file, command, format",
                     "[notify.targets.fmt] format must be one of 'json', 'slack', got 'teams'",
                     "[notify.targets.none] needs exactly one of url, url_file and command, got none",
                     "[notify] default_events in /etc/oddaemon/oddaemon.toml: 'finished' is not an event",
                     "[notify] timeout_seconds in /etc/oddaemon/oddaemon.toml: must be a finite number > 0"):
        assert expected in text, (expected, text)
    assert "secret-token-123" not in text


def test_a_url_given_as_a_target_itself_is_refused_without_showing_it():
    text = config_problems('[notify.targets]\nteam = "https://hooks.example.com/services/secret-token-123"\n')
    assert "[notify.targets.team] must be a table with url, url_file or command" in text and "got a str" in text
    assert "secret-token-123" not in text


def test_default_targets_must_be_configured_targets():
    text = config_problems('[notify]\ndefault_targets = ["team", "ops"]\n'
                           '[notify.targets.team]\nurl = "http://127.0.0.1:9/x"\n')
    assert "[notify] default_targets in /etc/oddaemon/oddaemon.toml: 'ops' is not a target; the targets are " \
           "the [notify.targets.NAME] sections (team)" in text
    assert "'team' is not a target" not in text


# ---- a job's [notify] --------------------------------------------------------------------------------------------


@pytest.fixture
def job_file(tmp_path):
    root = tmp_path / "root"
    (root / "data").mkdir(parents=True)
    (root / "data/pipeline.config").write_text("model {}\n")
    ctx = ValidationContext(allowed_roots=(str(root),), notify_targets=("team", "pager"))

    def parse(notify: str):
        text = f'pipeline_config = "{root}/data/pipeline.config"\nmodel_dir = "{root}/runs/a"\n[notify]\n{notify}'
        return parse_job(text.encode(), "a.toml", ctx)
    return parse


def problems(result) -> str:
    assert isinstance(result, list), result
    return "\n".join(p.render() for p in result)


def test_a_job_chooses_events_and_targets_by_name(job_file):
    spec = job_file('events = ["failed", "new_best", "stalled"]\ntargets = ["pager"]\nstalled_after_seconds = 60\n')
    assert spec.notify == NotifyOptions(events=("failed", "new_best", "stalled"), targets=("pager",),
                                        stalled_after_seconds=60.0)
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert job_file("").notify == NotifyOptions()


def test_a_url_or_command_in_a_job_file_is_refused_as_a_credential(job_file):
    text = problems(job_file('url = "https://hooks.slack.com/services/T0/B0/abc"\ncommand = ["/bin/sh"]\n'))
    assert text.count("belong in the daemon configuration") == 2, text
    assert "[notify] url: a job names the daemon's notification targets" in text
    assert "[notify] command: a job names" in text
    text = problems(job_file('targets = ["https://hooks.slack.com/services/T0/B0/abc"]\n'))
    assert "[notify] targets: a job names the daemon's notification targets" in text
    assert "got an address instead of a name" in text and "abc" not in text


def test_bad_job_notify_values_are_named(job_file):
    text = problems(job_file('events = ["done"]\ntargets = ["ops"]\nstalled_after_seconds = 0\nevnts = []\n'))
    for expected in ("[notify] events: 'done' is not an event; the events are succeeded, failed, new_best, "
                     "stalled, evaluator_behind",
                     "[notify] targets: 'ops' is not one of the daemon's notification targets (team, pager)",
                     "[notify] stalled_after_seconds: must be a finite number > 0, got 0",
                     "unknown key 'evnts' in [notify]; did you mean 'events'?"):
        assert expected in text, (expected, text)
    assert "[notify] events: lists an event twice" in problems(job_file('events = ["failed", "failed"]\n'))
    assert "[notify] targets: lists a target twice" in problems(job_file('targets = ["team", "team"]\n'))


# ---- what goes where -------------------------------------------------------------------------------------------


def test_a_job_gets_the_daemon_defaults_unless_it_chooses():
    settings = nt.Settings(targets=(nt.Target("team", url="http://h/x"), nt.Target("ops", url="http://h/y")),
                           default_targets=("team",), default_events=("failed",), stalled_after_seconds=900.0)
    plain = JobSpec("a", "/p", "/m")
    assert nt.choices(plain, settings) == (("failed",), ("team",))
    own = JobSpec("a", "/p", "/m", notify=NotifyOptions(events=("new_best",), targets=("ops", "team"),
                                                        stalled_after_seconds=30.0))
    assert nt.choices(own, settings) == (("new_best",), ("ops", "team"))
    assert (nt.stalled_after(plain, settings), nt.stalled_after(own, settings)) == (900.0, 30.0)
    silent = JobSpec("a", "/p", "/m", notify=NotifyOptions(targets=()))
    assert nt.choices(silent, settings) == ((), ())
    nothing = JobSpec("a", "/p", "/m", notify=NotifyOptions(events=()))
    assert nt.choices(nothing, settings) == ((), ("team",))


def test_payloads_and_bodies():
    failed = nt.failed("cats", 1700000000.0, "box", "loss became NaN at step 12 (Loss/total_loss)", "nan", "/m/cats")
    assert failed == {"event": "failed", "job": "cats", "time": 1700000000.0, "host": "box", "state": "failed",
                      "message": "oddaemon on box: job cats failed: loss became NaN at step 12 (Loss/total_loss)",
                      "reason": "loss became NaN at step 12 (Loss/total_loss)", "failure_kind": "nan",
                      "model_dir": "/m/cats"}
    slack = nt.Target("team", url="https://h/x", format="slack")
    assert json.loads(nt.body(slack, failed)) == {"text": failed["message"]}
    assert json.loads(nt.body(nt.Target("j", url="https://h/x"), failed)) == failed
    assert json.loads(nt.body(nt.Target("c", command=("/bin/cat",)), failed)) == failed
    best = nt.new_best("cats", 1.0, "box", "running", "DetectionBoxes_Precision/mAP", 0.4125, 3000, 0.38)
    assert (best["metric"], best["value"], best["step"], best["previous"]) == (
        "DetectionBoxes_Precision/mAP", 0.4125, 3000, 0.38)
    assert best["message"] == "oddaemon on box: job cats has a new best DetectionBoxes_Precision/mAP: 0.4125 " \
                              "at step 3000 (was 0.38)"
    done = nt.succeeded("cats", 1.0, "box", "training finished", "/m/cats", "mAP", None, None)
    assert "value" not in done and "metric" not in done and done["message"].endswith("succeeded (training finished)")
    assert nt.stalled("cats", 1.0, "box", 930.4, 1200)["message"].endswith(
        "is stalled: no new training step for 930 s (still at step 1200)")
    behind = nt.evaluator_behind("cats", 1.0, "box", "running", 5, 2)
    assert (behind["waiting"], behind["skipped"]) == (5, 2)


def test_retry_schedule_doubles_up_to_the_cap():
    assert [nt.retry_delay(n, 5.0) for n in range(1, 10)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert nt.retry_delay(10_000, 1.0) == 300
    assert [s for s in (301, 302, 400, 401, 403, 404, 408, 410, 425, 429, 500, 502, 503) if nt.retryable_status(s)] == [
        408, 425, 429, 500, 502, 503]


# ---- the history record ----------------------------------------------------------------------------------------


def test_history_record_replaces_a_run_of_the_same_event_and_target():
    history = ((1.0, "queued", "submitted"), (2.0, "running", "started"))
    sent = nt.Outcome("a", "new_best", "team", "sent").text()
    assert sent == "notification new_best to team: sent"
    h = nt.record(history, 3.0, sent, HISTORY_LIMIT)
    h = nt.record(h, 4.0, nt.Outcome("a", "new_best", "team", "sent", tries=2).text(), HISTORY_LIMIT)
    assert h == history + ((4.0, "notify", "notification new_best to team: sent (try 2)"),)
    h = nt.record(h, 5.0, nt.Outcome("a", "new_best", "ops", "failed", 4, "HTTP 500").text(), HISTORY_LIMIT)
    h = nt.record(h, 6.0, sent, HISTORY_LIMIT)  # interleaved targets: still one entry each since the state change
    assert h == history + ((5.0, "notify", "notification new_best to ops: failed after 4 tries (HTTP 500)"),
                           (6.0, "notify", "notification new_best to team: sent"))
    h = nt.record(h + ((7.0, "evaluating", "training finished"),), 8.0, sent, HISTORY_LIMIT)
    assert h[-3:] == ((6.0, "notify", "notification new_best to team: sent"),
                      (7.0, "evaluating", "training finished"), (8.0, "notify", "notification new_best to team: sent"))
    assert len(nt.record(tuple((float(i), "running", "x") for i in range(HISTORY_LIMIT)), 99.0, sent,
                         HISTORY_LIMIT)) == HISTORY_LIMIT
    assert nt.Outcome("a", "failed", "t", "dropped", 0, "the target's queue was full").text() == \
        "notification failed to t: dropped unsent (the target's queue was full)"


def test_the_scheduler_records_a_delivery_without_a_state_change():
    state, _ = sch.step(sch.State(inventory=()), sch.Submit(JobSpec("a", "/p", "/m")), 10.0)
    job = state.jobs["a"]
    state, actions = sch.step(state, sch.NotificationRecorded("a", "notification failed to team: sent"), 20.0)
    after = state.jobs["a"]
    assert (after.state, after.reason) == (job.state, job.reason)
    assert after.history == job.history + ((20.0, "notify", "notification failed to team: sent"),)
    assert sch.SaveJob(after) in actions
    again, actions = sch.step(state, sch.NotificationRecorded("gone", "notification failed to team: sent"), 30.0)
    assert again.jobs == state.jobs and not any(isinstance(a, sch.SaveJob) for a in actions)
