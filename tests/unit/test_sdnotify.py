"""sd_notify client: real AF_UNIX datagram sockets (path and abstract) receive the messages."""

from __future__ import annotations

import logging
import os
import socket
import uuid

import pytest

from oddaemon.adapters.sdnotify import Notifier, format_status, socket_address, start_heartbeat, watchdog_seconds


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        value = str(tmp_path / "notify.sock")
        sock.bind(value)
    else:
        name = f"oddaemon-test-{uuid.uuid4().hex}"
        sock.bind(b"\0" + name.encode())
        value = "@" + name
    sock.settimeout(2)
    yield value, sock
    sock.close()


def received(sock: socket.socket) -> list[str]:
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(2)
    return messages


def test_messages_reach_the_socket(listener):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.enabled
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"
    notifier.close()


def test_ready_with_status_and_stopping_with_status(listener):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    notifier.ready("1 queued;\nno GPUs")
    assert sock.recv(4096).decode().split("\n") == ["READY=1", "STATUS=1 queued; no GPUs"]
    # The status sent with READY counts as the current one: the same text is not sent again.
    assert notifier.status("1 queued; no GPUs") is False
    notifier.stopping("stopping 2 workers")
    assert sock.recv(4096) == b"STOPPING=1\nSTATUS=stopping 2 workers"


def test_reloading_carries_monotonic_usec(listener):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    before = __import__("time").clock_gettime_ns(__import__("time").CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, usec = lines[1].split("=")
    assert key == "MONOTONIC_USEC" and int(usec) >= before
    notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_status_only_sent_when_changed(listener):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert notifier.status("idle; no GPUs")
    assert not notifier.status("idle; no GPUs")
    assert not notifier.status("idle;  no GPUs\n")  # the same line once whitespace is folded
    assert notifier.status("1 queued; no GPUs")
    assert received(sock) == ["STATUS=idle; no GPUs", "STATUS=1 queued; no GPUs"]


def test_no_op_without_environment():
    notifier = Notifier.from_env({})
    assert not notifier.enabled
    assert notifier.watchdog_interval() is None
    assert notifier.ready() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False


def test_unset_removes_the_variables_so_workers_cannot_inherit_them(listener):
    value, _ = listener
    env = {"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid()), "PATH": "/bin"}
    notifier = Notifier.from_env(env, unset=True)
    assert notifier.enabled and notifier.watchdog_interval() == 5.0
    assert env == {"PATH": "/bin"}


def test_send_failure_never_raises_and_is_logged_once(tmp_path, caplog):
    notifier = Notifier.from_env({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens.sock")})
    with caplog.at_level(logging.DEBUG, logger="oddaemon.adapters.sdnotify"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.status("x") is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "nobody-listens.sock" in warnings[0].getMessage() and "READY=1" in warnings[0].getMessage()


def test_status_is_retried_after_a_failed_send(tmp_path):
    path = str(tmp_path / "late.sock")
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert notifier.status("idle") is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    try:
        assert notifier.status("idle") is True
        assert sock.recv(100) == b"STATUS=idle"
    finally:
        sock.close()


def test_unsupported_socket_kinds_are_off(caplog):
    with caplog.at_level(logging.WARNING, logger="oddaemon.adapters.sdnotify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "vsock:2:1234" in caplog.text
    assert socket_address("relative/path") is None
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"


@pytest.mark.parametrize("env, expected", [
    ({"WATCHDOG_USEC": "30000000"}, 15.0),
    ({"WATCHDOG_USEC": "1000"}, 0.0005),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "SELF"}, 15.0),
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # meant for another process
    ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}, None),
    ({"WATCHDOG_USEC": "0"}, None),
    ({"WATCHDOG_USEC": "-5"}, None),
    ({"WATCHDOG_USEC": "soon"}, None),
    ({}, None),
])
def test_watchdog_interval_math(env, expected):
    env = {k: (str(os.getpid()) if v == "SELF" else v) for k, v in env.items()}
    assert watchdog_seconds(env, os.getpid()) == expected
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "@x", **env})
    assert notifier.watchdog_interval() == expected


def test_watchdog_interval_needs_a_socket():
    assert Notifier.from_env({"WATCHDOG_USEC": "30000000"}).watchdog_interval() is None


# ---- format_status -----------------------------------------------------------------------------
def view(name, state, step=None, started_at=None, best=None):
    v = {"name": name, "state": state, "step": step, "started_at": started_at}
    if best is not None:
        v["best"] = best
    return v


def test_format_status_the_example_line():
    jobs = [view("effdet_d0", "running", 12000, 100.0, {"metric": "DetectionBoxes_Precision/mAP", "value": 0.41234}),
            view("ssd_mnet", "running", 300, 200.0), view("yolo", "evaluating", 5, 300.0),
            view("a", "queued"), view("b", "queued"), view("c", "queued"), view("old", "succeeded")]
    gpus = {"total": [0, 1, 2, 3], "free": [3], "holders": {}}
    assert format_status({"jobs": jobs, "gpus": gpus}) == \
        "2 training, 1 evaluating, 3 queued; GPUs 3/4; effdet_d0 step 12000 mAP 0.412"


def test_format_status_reads_the_evaluation_view():
    running = view("ssd", "running", 500, 1.0)
    running["evaluation"] = {"metric": "DetectionBoxes_Precision/mAP@.50IOU", "best": {"value": 0.61, "step": 400}}
    assert format_status({"jobs": [running], "gpus": {"total": [0], "free": []}}) == \
        "1 training; GPUs 1/1; ssd step 500 mAP@.50IOU 0.610"
    running["evaluation"]["best"] = None
    assert format_status({"jobs": [running], "gpus": {"total": [0], "free": []}}) == "1 training; GPUs 1/1; ssd step 500"


def test_format_status_idle_and_cpu_only():
    assert format_status({"jobs": [], "gpus": {"total": [], "free": []}}) == "idle; no GPUs"
    assert format_status({"jobs": [view("x", "failed")], "gpus": {"total": [0, 1], "free": [0, 1]}}) == "idle; GPUs 0/2"
    assert format_status({}) == "idle; no GPUs"


def test_format_status_other_states_and_no_step_yet():
    jobs = [view("j1", "backoff"), view("j2", "stopping"), view("j3", "running", None, 5.0)]
    assert format_status({"jobs": jobs, "gpus": {"total": [0], "free": []}}) == \
        "1 training, 1 restarting, 1 stopping; GPUs 1/1; j3"


def test_format_status_stays_short_with_long_names():
    long = "n" * 64
    jobs = [view(long, "running", 123456789, 1.0, {"metric": "x" * 80, "value": 1.0})] + \
        [view(f"q{i}", "queued") for i in range(500)]
    line = format_status({"jobs": jobs, "gpus": {"total": list(range(64)), "free": []}})
    assert len(line) <= 120
    assert line.startswith("1 training, 500 queued; GPUs 64/64; nnnn")


# ---- the heartbeat timer -----------------------------------------------------------------------
class FakeLoop:
    def __init__(self):
        self.timers = []

    def call_later(self, delay, callback):
        self.timers.append((delay, callback))

    def fire(self):
        delay, callback = self.timers.pop(0)
        callback()
        return delay


def test_heartbeat_pings_the_watchdog_and_refreshes_the_status(listener):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value, "WATCHDOG_USEC": "8000000"})
    loop = FakeLoop()
    lines = iter(["idle; no GPUs", "idle; no GPUs", "1 training; no GPUs"])
    assert start_heartbeat(loop, notifier, lambda: next(lines))
    assert received(sock) == ["WATCHDOG=1", "STATUS=idle; no GPUs"]
    assert loop.fire() == 4.0  # half of WATCHDOG_USEC, below the 10 s status refresh
    assert received(sock) == ["WATCHDOG=1"]  # same status: not sent again
    loop.fire()
    assert received(sock) == ["WATCHDOG=1", "STATUS=1 training; no GPUs"]


def test_heartbeat_survives_a_failing_status_and_runs_without_watchdog(listener, caplog):
    value, sock = listener
    notifier = Notifier.from_env({"NOTIFY_SOCKET": value})
    loop = FakeLoop()

    def broken():
        raise KeyError("views")

    with caplog.at_level(logging.ERROR, logger="oddaemon.adapters.sdnotify"):
        assert start_heartbeat(loop, notifier, broken, every=3.0)
    assert "cannot build the status line" in caplog.text
    assert [d for d, _ in loop.timers] == [3.0]  # re-armed all the same
    assert received(sock) == []  # no watchdog configured, no status built


def test_heartbeat_does_nothing_outside_systemd():
    loop = FakeLoop()
    assert not start_heartbeat(loop, Notifier.from_env({}), lambda: "x")
    assert loop.timers == []
