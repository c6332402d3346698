"""Notification delivery (adapters/notify.py) against a real HTTP server on 127.0.0.1 and real
command targets: sent, retried with backoff, not retried when a retry cannot help, a dead
endpoint bounded in tries, log lines and memory, and the loop never waiting on any of it."""

from __future__ import annotations

import json
import logging
import socket
import sys

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from oddaemon.adapters.metrics import SnapshotCollector, build_snapshot
from oddaemon.adapters.notify import Sender
from oddaemon.core import notifications as nt
from oddaemon.core.notify_waiting import Waiting
from tests.support.fakes import FakeLoop
from tests.support.harness import wait_for
from tests.support.webhook import Webhook


@pytest.fixture
def hook():
    with Webhook() as server:
        yield server


@pytest.fixture
def rig():
    """A Sender on a fake loop (its pipe read for real); ``outcomes`` as the loop received them."""
    loop, outcomes, made = FakeLoop(), [], []

    def make(**settings):
        sender = Sender(loop, nt.Settings(**{"timeout_seconds": 5.0, "retries": 3, "retry_backoff_seconds": 0.05,
                                             **settings}), outcomes.append)
        made.append(sender)
        return sender

    def until(count: int, what: str):
        wait_for(lambda: loop.run_ready(0.05) is not None and len(outcomes) >= count, 30, 0, what)
        return outcomes

    yield make, until, outcomes
    for sender in made:
        sender.close()


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


EVENT = nt.failed("cats", 1700000000.0, "box", "loss became NaN at step 12", "nan", "/m/cats")


def test_a_webhook_gets_the_event_as_json_and_slack_gets_text(rig, hook):
    make, until, outcomes = rig
    sender = make()
    plain, slack = nt.Target("plain", url=hook.url), nt.Target("team", url=hook.url, format="slack")
    sender.send("cats", "failed", plain, nt.body(plain, EVENT))
    sender.send("cats", "failed", slack, nt.body(slack, EVENT))
    until(2, "two deliveries")
    assert sorted((o.target, o.result, o.tries) for o in outcomes) == [("plain", "sent", 1), ("team", "sent", 1)]
    bodies = sorted((r["body"] for r in hook.received), key=len)
    assert bodies == [{"text": "oddaemon on box: job cats failed: loss became NaN at step 12"}, EVENT]
    assert {r["type"] for r in hook.received} == {"application/json"}
    assert {r["path"] for r in hook.received} == {"/hook/T0/secret"}


def test_a_failing_answer_is_retried_with_backoff_until_it_is_sent(rig, hook):
    make, until, outcomes = rig
    hook.answers = [500, 503]
    target = nt.Target("team", url=hook.url)
    make().send("cats", "failed", target, nt.body(target, EVENT))
    until(1, "the delivery")
    assert outcomes == [nt.Outcome("cats", "failed", "team", "sent", 3)]
    assert len(hook.received) == 3


def test_a_permanent_refusal_and_a_redirect_are_not_retried(rig, hook):
    make, until, outcomes = rig
    hook.answers = [404, 302]
    sender = make()
    target = nt.Target("team", url=hook.url)
    sender.send("cats", "failed", target, b"{}")
    until(1, "the 404")
    sender.send("cats", "succeeded", target, b"{}")
    until(2, "the redirect")
    assert outcomes == [nt.Outcome("cats", "failed", "team", "failed", 1, "HTTP 404"),
                        nt.Outcome("cats", "succeeded", "team", "failed", 1, "HTTP 302")]
    assert len(hook.received) == 2  # the redirect was not followed


def test_a_dead_endpoint_costs_bounded_tries_and_one_log_line(rig, caplog):
    make, until, outcomes = rig
    caplog.set_level(logging.DEBUG, logger="oddaemon")
    sender = make(retries=2)
    target = nt.Target("gone", url=f"http://127.0.0.1:{dead_port()}/hook/T0/secret")
    for n in range(5):
        sender.send(f"job{n}", "failed", target, b"{}")
    until(5, "five failed deliveries")
    assert sorted(o.job for o in outcomes) == [f"job{n}" for n in range(5)]
    assert {(o.result, o.tries) for o in outcomes} == {("failed", 3)}
    assert all(o.error.startswith("cannot connect: ") for o in outcomes), outcomes
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "notify target gone" in warnings[0].getMessage(), warnings
    assert not any("secret" in r.getMessage() for r in caplog.records)
    assert sender.pending() == 0


def test_a_full_queue_drops_the_oldest_and_send_never_waits(rig, hook, caplog):
    make, until, outcomes = rig
    caplog.set_level(logging.WARNING, logger="oddaemon")
    hook.hold.clear()  # the endpoint takes the first request and answers nothing until told
    sender = make(queue_size=3)
    target = nt.Target("slow", url=hook.url)
    sender.send("job0", "failed", target, b'{"n": 0}')
    wait_for(lambda: hook.arrived == 1, 30, what="the first request to be in flight")
    for n in range(1, 8):  # the loop goes on while the first is in flight: send only queues
        sender.send(f"job{n}", "failed", target, json.dumps({"n": n}).encode())
    assert sender.pending() == 3
    until(4, "the dropped deliveries")  # 7 more for 3 places: the 4 oldest of them dropped
    assert [(o.job, o.result) for o in outcomes] == [(f"job{n}", "dropped") for n in (1, 2, 3, 4)]
    hook.hold.set()
    until(8, "the rest")
    assert sorted(o.job for o in outcomes if o.result == "sent") == ["job0", "job5", "job6", "job7"]
    assert [r["body"]["n"] for r in hook.received][0] == 0
    full = [r for r in caplog.records if "queue_size" in r.getMessage()]
    assert len(full) == 1, full


def test_url_file_is_read_at_each_delivery(rig, hook, tmp_path):
    make, until, outcomes = rig
    sender = make(retries=0)
    path = tmp_path / "url"
    target = nt.Target("filed", url_file=str(path))
    sender.send("cats", "failed", target, b"{}")
    until(1, "the delivery without a file")
    path.write_text(hook.url + "\n")
    sender.send("cats", "succeeded", target, b"{}")
    until(2, "the delivery with it")
    assert [(o.event, o.result) for o in outcomes] == [("failed", "failed"), ("succeeded", "sent")]
    assert outcomes[0].error == f"cannot read url_file {path}: No such file or directory"
    assert len(hook.received) == 1


def test_a_command_gets_the_event_as_json_on_stdin(rig, tmp_path):
    make, until, outcomes = rig
    script = tmp_path / "on-event"
    script.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "event = json.load(sys.stdin)\n"
                      f"open({str(tmp_path / 'got.json')!r}, 'w').write(json.dumps([os.environ['ODDAEMON_EVENT'], "
                      "event]))\n"
                      "sys.exit(0 if event['job'] == 'cats' else 3)\n")
    script.chmod(0o755)
    sender = make(retries=0)
    target = nt.Target("script", command=(str(script),))
    sender.send("cats", "failed", target, nt.body(target, EVENT))
    until(1, "the command")
    assert json.loads((tmp_path / "got.json").read_text()) == ["failed", EVENT]
    failing = tmp_path / "fails"
    failing.write_text("#!/bin/sh\necho 'no route to the pager' >&2\nexit 4\n")
    failing.chmod(0o755)
    sender.send("cats", "failed", nt.Target("pager", command=(str(failing),)), b"{}")
    sender.send("cats", "failed", nt.Target("missing", command=(str(tmp_path / "nope"),)), b"{}")
    until(3, "the failing commands")
    assert outcomes[0] == nt.Outcome("cats", "failed", "script", "sent", 1)
    errors = {o.target: o.error for o in outcomes[1:]}
    assert errors == {"pager": f"{failing} exited with status 4: no route to the pager",
                      "missing": f"cannot run {tmp_path / 'nope'}: No such file or directory"}


def test_close_stops_reporting(rig, hook):
    make, until, outcomes = rig
    sender = make()
    target = nt.Target("team", url=hook.url)
    sender.send("cats", "failed", target, b"{}")
    until(1, "a delivery")
    sender.close()
    sender.report(nt.Outcome("a", "failed", "t", "sent"))  # a thread finishing after close: nothing, no error
    sender.close()
    assert outcomes == [nt.Outcome("cats", "failed", "team", "sent", 1)] and sender.queues == {}


def test_the_counts_are_exported_by_target_and_result():
    counters = {"rejected_files": 0, "worker_restarts": 0, "checkpoints_evaluated": 0,
                "notifications": {("team", "sent"): 5, ("team", "failed"): 1, ("pager", "dropped"): 2}}
    snap = build_snapshot([], {"total": [], "free": [], "holders": {}}, counters, 0.0, 1.0, 20, 100.0)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    found = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for family in text_string_to_metric_families(generate_latest(registry).decode())
             for s in family.samples if s.name == "oddaemon_notifications_total"}
    assert found == {("oddaemon_notifications_total", (("result", "sent"), ("target", "team"))): 5,
                     ("oddaemon_notifications_total", (("result", "failed"), ("target", "team"))): 1,
                     ("oddaemon_notifications_total", (("result", "dropped"), ("target", "pager"))): 2}


def test_a_reload_that_changes_a_target_reports_what_waited_for_it(rig, hook):
    make, until, outcomes = rig
    hook.hold.clear()
    sender = make()
    old = nt.Target("team", url=hook.url)
    for n in range(3):
        sender.send(f"job{n}", "failed", old, b"{}")
    wait_for(lambda: hook.arrived == 1, 30, what="the first request in flight")
    moved = nt.Target("team", url=hook.url + "/v2")
    sender.configure(nt.Settings(targets=(moved,), retry_backoff_seconds=0.05))
    until(2, "the two that waited")
    assert outcomes == [nt.Outcome(f"job{n}", "failed", "team", "dropped", 0,
                                   "the target was changed or removed by a reload") for n in (1, 2)]
    sender.send("job3", "failed", moved, b"{}")
    hook.hold.set()
    until(4, "the one in flight and the new one")
    assert sorted((o.job, o.result) for o in outcomes[2:]) == [("job0", "sent"), ("job3", "sent")]
    assert sorted(r["path"] for r in hook.received) == ["/hook/T0/secret", "/hook/T0/secret/v2"]


def test_close_returns_what_waits_and_a_new_sender_sends_it_with_its_tries(rig, hook):
    make, until, outcomes = rig
    sender = make(retry_backoff_seconds=30.0)
    target = nt.Target("team", url=hook.url)
    hook.answers = [503]
    sender.send("cats", "succeeded", target, b'{"n": 1}')
    wait_for(lambda: len(hook.received) == 1, 30, what="the first try")
    wait_for(lambda: sender.pending() == 1, 30, what="the retry to wait")
    waiting = sender.close()
    assert [(w.job, w.event, w.target, w.data, w.tries) for w in waiting] == [("cats", "succeeded", "team",
                                                                               b'{"n": 1}', 1)]
    assert 0 < waiting[0].delay <= 30.0  # the rest of its backoff
    again = make()
    again.resend(Waiting(**{**waiting[0].__dict__, "delay": 0.0}), target)
    until(1, "the kept delivery")
    assert outcomes == [nt.Outcome("cats", "succeeded", "team", "sent", 2)] and len(hook.received) == 2
