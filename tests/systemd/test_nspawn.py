"""oddaemon under a real systemd (252, Debian 12) in a booted nspawn container, installed by
scripts/install with its unit, sysusers, tmpfiles and D-Bus policy. The tests run in file order
and share one container and one long stand-in job (see conftest.py)."""

from __future__ import annotations

import json
import re
import time

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),  # the first test also builds the cached rootfs and wheels (minutes)
]

SPOOL = "/var/spool/oddaemon"
DBUS = "io.github.oddaemon1 /io/github/oddaemon1 io.github.oddaemon1.Manager"
LONG = "alice_long"


def pipeline(steps: int, step_seconds: float) -> str:
    return (f"# standin: step_seconds = {step_seconds}\n"
            "model {\n  ssd {\n    num_classes: 3\n  }\n}\n"
            f"train_config {{\n  batch_size: 4\n  num_steps: {steps}\n}}\n")


def job_text(name: str, steps: int, every: int = 10) -> str:
    return (f'name = "{name}"\npipeline_config = "/srv/oddaemon/{name}.config"\n'
            f'model_dir = "/srv/oddaemon/{name}_model"\n[pipeline]\nnum_steps = {steps}\n'
            f"[train]\ncheckpoint_every_n = {every}\n[eval]\nenabled = false\n")


def write_as(inst, user: str, path: str, text: str) -> None:
    inst.c.run(["/bin/sh", "-c", f"cat > {path}"], user=user, input=text)


def submit_as(inst, user: str, name: str, steps: int, step_seconds: float, check: bool = True):
    write_as(inst, user, f"/srv/oddaemon/{name}.config", pipeline(steps, step_seconds))
    write_as(inst, user, f"/srv/oddaemon/{name}.toml", job_text(name, steps))
    return inst.c.run(["/opt/oddaemon/.venv/bin/oddaemon", "submit", "--wait", "0", f"/srv/oddaemon/{name}.toml"],
                      user=user, check=check)


def state_of(inst, name: str) -> str | None:
    job = inst.job(name)
    return job["state"] if job else None


def running(inst) -> bool:
    props = inst.show("ActiveState", "SubState")
    return props == {"ActiveState": "active", "SubState": "running"}


def test_start_reaches_running_only_after_ready(installed):
    inst = installed
    # 150 files waiting in new/ (older than the settle time): the rescan must have taken every
    # one of them before READY=1, so `active (running)` never coexists with a pending file.
    inst.sh(f"for i in $(seq 1 150); do printf 'name = 5\\n' > {SPOOL}/new/pending-$i.toml; done; "
            f"chown alice:oddaemon-submit {SPOOL}/new/*.toml; chmod 0640 {SPOOL}/new/*.toml; "
            f"touch -d '-1 min' {SPOOL}/new/*.toml")
    t = time.monotonic()
    inst.sh("systemctl start --no-block oddaemon.service")
    samples = []
    while time.monotonic() - t < 120:
        out = inst.sh(f"systemctl show oddaemon.service -p ActiveState,SubState --value | paste -sd/; "
                      f"ls {SPOOL}/new | wc -l").stdout.split()
        samples.append((out[0], int(out[1])))
        if out[0] in ("active/running", "failed/failed", "inactive/dead") and len(samples) > 1:
            break
    inst.timings["start_to_ready"] = time.monotonic() - t
    assert samples[-1][0] == "active/running", f"{samples[-5:]}\n{inst.journal()}"
    assert all(pending == 0 for state, pending in samples if state == "active/running"), samples
    assert any(state.startswith("activating") for state, _ in samples), samples
    # taken out of new/ before READY; parsed in the daemon's parser processes right after
    inst.wait(lambda: inst.sh(f"ls {SPOOL}/rejected/*.error | wc -l").stdout.strip() == "150", 60,
              "all 150 files rejected")
    status = inst.show("StatusText", "Type", "NotifyAccess")
    assert status["Type"] == "notify" and status["NotifyAccess"] == "main"
    assert status["StatusText"].startswith("idle; no GPUs"), status
    assert "ready: spool /var/spool/oddaemon" in inst.journal(400)  # (150 rejections follow it)
    # The daemon runs as the sysusers user, with the submit group to read dropped files.
    pid = inst.main_pid()
    ids = inst.sh(f"ps -o user=,group=,supgrp= -p {pid}").stdout.split()
    assert ids[:2] == ["oddaemon", "oddaemon"] and "oddaemon-submit" in ids[2], ids


def test_a_member_job_runs_and_a_non_member_is_refused(installed):
    inst = installed
    submit_as(inst, "alice", "alice_quick", steps=20, step_seconds=0.01)
    inst.wait(lambda: state_of(inst, "alice_quick") == "succeeded", 60, "alice_quick to succeed")
    submit_as(inst, "alice", LONG, steps=100000, step_seconds=0.05)
    inst.wait(lambda: (inst.job(LONG) or {}).get("step"), 60, f"{LONG} to train")
    # mallory cannot even look into the spool, let alone drop a file there.
    write_as(inst, "mallory", "/home/mallory/m.toml", job_text("mallory_job", 20))
    denied = inst.c.run(["/bin/sh", "-c", f"cp /home/mallory/m.toml {SPOOL}/new/m.toml"], user="mallory", check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr
    submitted = inst.c.run(["/opt/oddaemon/.venv/bin/oddaemon", "submit", "/home/mallory/m.toml"],
                           user="mallory", check=False)
    assert submitted.returncode != 0 and "Permission denied" in submitted.stderr + submitted.stdout
    # Over D-Bus too: the bus policy refuses mallory's SubmitText.
    over_dbus = inst.c.run(["busctl", "call", *DBUS.split(), "SubmitText", "ss", "x = 1", "m.toml"],
                           user="mallory", check=False)
    assert over_dbus.returncode != 0 and "Access denied" in over_dbus.stderr, over_dbus
    assert inst.job("mallory_job") is None


def test_status_shows_the_status_line_and_the_workers_in_the_cgroup(installed):
    inst = installed
    inst.wait(lambda: re.search(rf"{LONG} step \d+", inst.show("StatusText")["StatusText"]), 30,
              "the status line to show the training step")
    out = inst.sh("systemctl status oddaemon.service --no-pager -l --lines=0", check=False).stdout
    assert re.search(rf'Status: "1 training; no GPUs; {LONG} step \d+"', out), out
    assert re.search(rf"─\d+ \S+ -m oddaemon.testing.standin train --job /var/lib/oddaemon/\S+/{LONG}/job.json", out), out
    workers = inst.workers()
    assert len(workers) == 1 and workers[0] in inst.unit_pids(), (workers, inst.unit_pids())
    assert re.search(r"^(0:|\d+:name=systemd):/system.slice/oddaemon.service$", inst.cgroup_of(workers[0]), re.M)
    for pid in workers:
        env = inst.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
        assert not re.search(r"^(NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID)=", env, re.M), env
    # The STATUS= line moves on as training advances (the heartbeat refreshes it).
    first = inst.show("StatusText")["StatusText"]
    inst.wait(lambda: inst.show("StatusText")["StatusText"] != first, 30, "a newer status line")


def test_reload(installed):
    inst = installed
    pid = inst.main_pid()
    result = inst.sh("systemctl reload oddaemon.service", check=False)
    assert result.returncode == 0, result.stderr
    inst.wait(lambda: running(inst), 20, "running after the reload")
    assert inst.main_pid() == pid
    inst.wait(lambda: "reload: configuration re-read" in inst.journal(50), 10, "the daemon to log the reload")
    assert state_of(inst, LONG) == "running"


def test_dbus_api_and_policy(installed):
    inst = installed
    intro = inst.sh(f"busctl introspect {DBUS.rsplit(' ', 1)[0]}").stdout
    for member in (".ListJobs", ".GetJob", ".Submit", ".SubmitText", ".Cancel", ".Retry", ".Reload", ".Version",
                   ".QueueLength", ".GPUs", ".JobStateChanged", ".CheckpointEvaluated"):
        assert member in intro, intro
    # Everyone may read.
    listed = inst.c.run(["busctl", "--json=short", "call", *DBUS.split(), "ListJobs"], user="mallory")
    names = [job["name"]["data"] for job in json.loads(listed.stdout)["data"][0]]
    assert LONG in names
    # mallory (not in oddaemon-submit) may not change anything: the bus policy says no.
    for args in (["Cancel", "s", LONG], ["Retry", "s", LONG], ["Reload"], ["Submit", "s", "/etc/hostname"]):
        denied = inst.c.run(["busctl", "call", *DBUS.split(), *args], user="mallory", check=False)
        assert denied.returncode != 0 and "Access denied" in denied.stderr, (args, denied)
    assert state_of(inst, LONG) == "running"
    # alice passes the policy; the daemon answers with its own errors.
    ghost = inst.c.run(["busctl", "call", *DBUS.split(), "Cancel", "s", "ghost"], user="alice", check=False)
    assert ghost.returncode != 0 and "no job named 'ghost'" in ghost.stderr, ghost
    script = ("from oddaemon.dbus_client import Client\n"
              "c = Client.connect('system')\n"
              f"print(c.get_job('{LONG}')['state'], c.version(), c.queue_length(), c.gpus())\n")
    out = inst.c.run(["/opt/oddaemon/.venv/bin/python", "-c", script], user="alice").stdout.split()
    assert out[0] == "running" and out[2] == "0", out


def test_kill_9_of_the_main_process_restarts_and_the_job_resumes(installed):
    inst = installed
    before = inst.show("MainPID", "NRestarts")
    attempt = inst.job(LONG)["attempt"]
    inst.wait(lambda: (inst.job(LONG) or {}).get("step", 0) >= 30, 60, "a checkpoint to resume from")
    inst.sh(f"kill -9 {before['MainPID']}")
    inst.wait(lambda: running(inst) and inst.show("MainPID")["MainPID"] not in ("0", before["MainPID"]), 60,
              "systemd to restart the daemon")
    assert int(inst.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    job = inst.wait(lambda: (j := inst.job(LONG)) and j["state"] == "running" and j["attempt"] > attempt and j, 30,
                    "the job to run again")
    inst.wait(lambda: len(inst.workers()) == 1, 20, "exactly one worker")
    log = inst.sh(f"cat /var/log/oddaemon/{LONG}/train.log").stdout
    assert "resuming from step" in log, log[-2000:]
    assert job["attempt"] == attempt + 1


def test_a_hung_main_loop_is_restarted_by_the_watchdog(installed):
    inst = installed
    before = inst.show("MainPID", "NRestarts", "WatchdogUSec")
    assert before["WatchdogUSec"] in ("6s", "6000000")  # the test drop-in; the unit ships 30s
    inst.sh(f"kill -STOP {before['MainPID']}")  # the loop stops: no more WATCHDOG=1
    t = time.monotonic()
    inst.wait(lambda: running(inst) and inst.show("MainPID")["MainPID"] not in ("0", before["MainPID"]), 90,
              "the watchdog to restart the daemon")
    inst.timings["watchdog_restart"] = time.monotonic() - t
    assert "Watchdog timeout" in inst.journal(200)
    assert int(inst.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    inst.wait(lambda: state_of(inst, LONG) == "running" and len(inst.workers()) == 1, 30, "the job to resume")


def test_stop_leaves_no_worker_behind(installed):
    inst = installed
    inst.wait(lambda: inst.workers(), 30, "a running worker")
    t = time.monotonic()
    result = inst.sh("systemctl stop oddaemon.service", check=False, timeout=120)
    inst.timings["stop"] = time.monotonic() - t
    assert result.returncode == 0, result.stderr
    assert inst.show("ActiveState")["ActiveState"] in ("inactive", "failed")
    assert inst.workers("") == [] and inst.unit_pids() == []
    journal = inst.journal(100)
    assert "shutting down" in journal
    # The job keeps its state: it resumes at the next start.
    inst.sh("systemctl start oddaemon.service")
    inst.wait(lambda: state_of(inst, LONG) == "running", 30, "the job to resume after the restart")
    inst.sh("systemctl stop oddaemon.service")
    assert inst.workers("") == []
