"""oddaemon under a real systemd (252, Debian 12) in a booted nspawn container, installed by
scripts/install with its unit, sysusers, tmpfiles and D-Bus policy. The tests run in file order
and share one container and one long stand-in job (see conftest.py); the last one runs a tiny
real-TF job in the same container, with the host's TF stack lent to it."""

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


def restart_clean(inst) -> None:
    """systemctl restart, after resetting the unit's start counter: the tests start the daemon
    more often than the shipped StartLimitBurst=5 per 10 minutes allows (reset-failed also sets
    NRestarts back to 0: read it after this)."""
    inst.sh("systemctl reset-failed oddaemon.service; systemctl restart oddaemon.service", timeout=180)
    inst.wait(lambda: running(inst), 60, "the daemon to run again")


def reloading_then_ready(notifications: list[tuple[int, str]], pid: int) -> list[str] | None:
    """The RELOADING=1 and READY=1 messages among ``notifications`` (each from ``pid``), once a
    READY=1 has come after a RELOADING=1; None before that."""
    seen = [fields for sender, fields in notifications if "RELOADING=1" in fields or "READY=1" in fields]
    assert all(sender == pid for sender, fields in notifications), notifications  # NotifyAccess=main
    kinds = ["RELOADING" if "RELOADING=1" in f else "READY" for f in seen]
    return seen if "RELOADING" in kinds and "READY" in kinds[kinds.index("RELOADING"):] else None


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
    assert re.search(rf"^(0:|\d+:name=systemd):/system.slice/oddaemon.service(/job-{LONG}-train)?$",
                     inst.cgroup_of(workers[0]), re.M)
    # the daemon says once which per-job cgroup backend it found (README "Per-job cgroups"); where it
    # has one (v2, Delegate=yes), the worker is in its job's own group
    said = inst.sh("journalctl -u oddaemon.service -o cat | grep -m1 'per-job cgroups'", check=False).stdout
    assert re.search(r"per-job cgroups(: cgroup v2 under| off: )", said), said
    if "cgroup v2 under" in said:
        assert f"0::/system.slice/oddaemon.service/job-{LONG}-train" in inst.cgroup_of(workers[0])
    for pid in workers:
        env = inst.sh(f"tr '\\0' '\\n' < /proc/{pid}/environ").stdout
        assert not re.search(r"^(NOTIFY_SOCKET|WATCHDOG_USEC|WATCHDOG_PID)=", env, re.M), env
    # The STATUS= line moves on as training advances (the heartbeat refreshes it).
    first = inst.show("StatusText")["StatusText"]
    inst.wait(lambda: inst.show("StatusText")["StatusText"] != first, 30, "a newer status line")


def test_reload_sends_reloading_then_ready_and_rereads_the_configuration(installed):
    """ExecReload (SIGHUP): systemd receives RELOADING=1 then READY=1 from the main process, and
    the re-read configuration takes effect: with [jobs] max_cpu_jobs lowered to 1 a new job waits
    behind the long one; raised back to 2 by a second reload, it starts and finishes while the long
    job still trains."""
    inst = installed
    pid = inst.main_pid()
    assert state_of(inst, LONG) == "running"
    one_slot = inst.config.replace("max_cpu_jobs = 2", "max_cpu_jobs = 1")
    assert one_slot != inst.config
    try:
        with inst.manager_debug():
            for config, slots in ((one_slot, 1), (inst.config, 2)):
                inst.write_config(config)
                cursor = inst.cursor()
                result = inst.sh("systemctl reload oddaemon.service", check=False)
                assert result.returncode == 0, result.stderr
                got = inst.wait(lambda cursor=cursor: reloading_then_ready(inst.notifications(cursor), pid), 30,
                                "RELOADING=1 then READY=1 in systemd's debug log")
                assert len(got) == 2 and got[0].startswith("RELOADING=1, MONOTONIC_USEC="), got
                assert got[1].startswith("READY=1, STATUS="), got
                inst.wait(lambda: running(inst), 20, "running after the reload")
                assert inst.main_pid() == pid
                daemon = [m for p, m in inst.entries(cursor) if p == pid]
                assert "INFO reload: configuration re-read from /etc/oddaemon/oddaemon.toml" in daemon, daemon
                if slots == 1:
                    # LONG holds the only CPU slot now: the new job is accepted and waits (the
                    # scheduler decides in the step that accepts it, so "queued" here is final).
                    submit_as(inst, "alice", "alice_waits", steps=20, step_seconds=0.01)
                    job = inst.wait(lambda: inst.job("alice_waits"), 60, "alice_waits to be accepted")
                    assert (job["state"], job["queue_position"]) == ("queued", 1), job
        inst.wait(lambda: state_of(inst, "alice_waits") == "succeeded", 60, "alice_waits to run after the reload")
        assert state_of(inst, LONG) == "running"  # the slot came from the reload, not from LONG ending
    finally:
        inst.write_config(inst.config)
        if running(inst):
            inst.sh("systemctl reload oddaemon.service", check=False)


def test_dbus_api_and_policy(installed):
    inst = installed
    intro = inst.sh(f"busctl introspect {DBUS.rsplit(' ', 1)[0]}").stdout
    for member in (".ListJobs", ".GetJob", ".Submit", ".SubmitText", ".Cancel", ".Finish", ".SetPriority", ".Retry", ".Reload", ".Version",
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
    script = ("from oddaemon.cli.dbus_client import Client\n"
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


STALL_DROPIN = """\
[Service]
ExecStart=
ExecStart={execstart}
# The abort path under test must end the process, not the SIGKILL after TimeoutAbortSec.
TimeoutAbortSec=60
"""


def test_a_main_loop_stalled_in_python_is_aborted_with_its_stack_in_the_journal(installed):
    """The loop spins in Python (oddaemon.testing.stall, SIGUSR2), the process stays alive and
    responsive to signals: systemd's watchdog times out and sends SIGABRT; the daemon's
    faulthandler prints the stalled main thread's Python stack to the journal; the process dies
    of that SIGABRT (not of a SIGKILL); systemd restarts the service and the job resumes."""
    inst = installed
    execstart = inst.sh("sed -n 's/^ExecStart=//p' /etc/systemd/system/oddaemon.service").stdout.strip()
    shipped = "/opt/oddaemon/.venv/bin/oddaemon "
    assert execstart.startswith(shipped), execstart
    stalled = "/opt/oddaemon/.venv/bin/python -m oddaemon.testing.stall " + execstart[len(shipped):]
    inst.sh("cat > /etc/systemd/system/oddaemon.service.d/zz-stall.conf && systemctl daemon-reload",
            input=STALL_DROPIN.format(execstart=stalled))
    try:
        restart_clean(inst)
        inst.wait(lambda: state_of(inst, LONG) == "running" and len(inst.workers()) == 1, 30, "the job to run")
        before = inst.show("MainPID", "NRestarts", "WatchdogUSec", "TimeoutAbortUSec")
        assert before["WatchdogUSec"] in ("6s", "6000000") and before["TimeoutAbortUSec"] in ("1min", "60000000")
        old = int(before["MainPID"])
        assert "-m oddaemon.testing.stall" in inst.sh(f"tr '\\0' ' ' < /proc/{old}/cmdline").stdout
        cursor = inst.cursor()
        inst.sh(f"kill -USR2 {old}")
        inst.wait(lambda: running(inst) and inst.show("MainPID")["MainPID"] not in ("0", str(old)), 120,
                  "the watchdog to abort and systemd to restart the daemon")
        entries = inst.entries(cursor)
        manager = [m for p, m in entries if p == 1]
        daemon = [m for p, m in entries if p == old]
        text = "\n".join(f"[{p}] {m}" for p, m in entries)
        # systemd: the watchdog fired, SIGABRT ended the main process, the result was 'watchdog'
        assert "Watchdog timeout (limit 6s)!" in manager, text
        assert f"Killing process {old} (python) with signal SIGABRT." in manager, text
        assert any(re.fullmatch(r"Main process exited, code=(dumped|killed), status=6/ABRT", m) for m in manager), text
        assert "Failed with result 'watchdog'." in manager, text
        # ... and not the SIGKILL that follows when it does not end it (TimeoutAbortSec). (What is
        # left in the cgroup, the workers, gets SIGKILL once the main process is gone: KillMode=mixed.)
        assert not [m for m in manager if "timed out" in m or m.startswith(f"Killing process {old} (python) with signal SIGKILL")], text
        # the daemon: the stall began, then faulthandler printed the main thread's stack, most
        # recent call first: the spinning handler on top of the daemon's loop.run()
        assert any("oddaemon.testing.stall: SIGUSR2" in m for m in daemon), text
        lines = [line.strip() for m in daemon for line in m.splitlines()]
        assert "Fatal Python error: Aborted" in lines, text
        current = next(i for i, line in enumerate(lines) if line.startswith("Current thread 0x"))
        frames = lines[current + 1:]

        def frame(path: str, function: str) -> int:
            return next((i for i, line in enumerate(frames) if re.fullmatch(
                rf'File "\S*{re.escape(path)}", line \d+ in {function}', line)), -1)

        spin = frame("oddaemon/testing/stall.py", "spin_forever")
        handler = frame("oddaemon/testing/stall.py", "stall_the_main_loop")
        loop = frame("oddaemon/service/daemon.py", "run")
        assert 0 <= spin < handler < loop, text
        # restarted once by systemd (Restart=on-failure), and the job runs again
        assert int(inst.show("NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
        inst.wait(lambda: state_of(inst, LONG) == "running" and len(inst.workers()) == 1, 30, "the job to resume")
    finally:
        inst.sh("rm -f /etc/systemd/system/oddaemon.service.d/zz-stall.conf && systemctl daemon-reload")
        restart_clean(inst)  # the shipped ExecStart again
    assert "-m oddaemon.testing.stall" not in inst.sh(f"tr '\\0' ' ' < /proc/{inst.main_pid()}/cmdline").stdout


def stop_cleanly(inst, timing: str = "stop") -> list[str]:
    """systemctl stop, asserting it was clean: systemd saw the main process exit with status 0 while
    in stop-sigterm and never went on to a SIGKILL state (nothing timed out), the unit deactivated
    successfully, the daemon sent no SIGKILL to a worker either (every one ended on SIGTERM within
    the grace), and nothing is left in the cgroup. Returns the daemon's lines. (systemd's debug log
    is read, not `systemctl show -p Result`: an inactive unit that nothing references is unloaded
    at once, and a reloaded one says Result=success whatever happened.)"""
    pid = inst.main_pid()
    with inst.manager_debug():
        cursor = inst.cursor()
        t = time.monotonic()
        result = inst.sh("systemctl stop oddaemon.service", check=False, timeout=120)
        inst.timings[timing] = time.monotonic() - t  # recorded, never asserted
        assert result.returncode == 0, result.stderr
        entries = inst.entries(cursor)
    assert inst.show("ActiveState")["ActiveState"] == "inactive"
    assert inst.unit_pids() == [] and inst.sh("pgrep -f ' -m oddaemon[.]' || true").stdout.split() == []
    text = "\n".join(f"[{p}] {m}" for p, m in entries)
    manager = [m for p, m in entries if p == 1]
    daemon = [m for p, m in entries if p == pid]
    changes = [m for m in manager if m.startswith("Changed ")]
    assert changes[:2] == ["Changed running -> stop-sigterm", "Changed stop-sigterm -> dead"], text
    assert "Main process exited, code=exited, status=0/SUCCESS (success)" in manager, text
    assert "Deactivated successfully." in manager, text
    assert not [m for m in manager if "timed out" in m or "SIGKILL" in m or "Failed with result" in m], text
    assert any(re.fullmatch(r"INFO shutting down: stopping \d+ worker\(s\); their jobs resume at next start", m)
               for m in daemon), text
    assert not [m for m in daemon if "SIGKILL" in m or "ignored SIGTERM" in m], text
    assert "INFO stopped" in daemon, text
    return daemon


def test_stop_is_clean_and_leaves_no_worker_behind(installed):
    """systemctl stop with the long job training: its worker is stopped with SIGTERM, the daemon
    exits 0 on its own, nothing is killed (stop_cleanly), and the job stays saved as running."""
    inst = installed
    inst.wait(lambda: state_of(inst, LONG) == "running" and inst.workers(), 30, "a running worker")
    # The stand-in's warm preflight server (left from a submission less than a minute ago) does not
    # end on SIGTERM while it waits for a request (oddaemon/testing/standin.py preflight_serve; the
    # real one does, see the real-TF test): let it go idle first.
    inst.wait(lambda: inst.workers("preflight-serve") == [], 120, "the stand-in preflight server to be let go")
    worker = inst.workers()[0]
    daemon = stop_cleanly(inst)
    assert "INFO shutting down: stopping 1 worker(s); their jobs resume at next start" in daemon, daemon
    assert f"INFO stopping train worker of {LONG} (pid {worker}): daemon shutting down" in daemon, daemon
    # The job keeps its state on disk (resumed at the next start: the next test).
    saved = json.loads(inst.sh(f"cat /var/lib/oddaemon/jobs/{LONG}.json").stdout)
    assert saved["state"] == "running"


def test_ready_comes_only_after_the_saved_jobs_are_restored(installed):
    """Started with a saved running job: the daemon restores it (running -> queued, resuming after
    daemon restart) and starts it before it sends READY=1. Proof: the restore's own time (the job's
    history, the daemon's clock) lies between the main process's start and the moment systemd
    entered `active` (both CLOCK_REALTIME, microseconds); the READY=1 systemd received carries a
    status line that counts the job; the daemon logged the restore before `ready:`."""
    inst = installed
    if inst.show("ActiveState")["ActiveState"] == "active":
        inst.sh("systemctl stop oddaemon.service", timeout=120)
    saved = json.loads(inst.sh(f"cat /var/lib/oddaemon/jobs/{LONG}.json").stdout)
    assert saved["state"] == "running", saved["state"]
    with inst.manager_debug():
        cursor = inst.cursor()
        inst.sh("systemctl reset-failed oddaemon.service; systemctl start oddaemon.service", timeout=180)
        assert running(inst)
        pid = inst.main_pid()
        got = inst.wait(lambda: [f for p, f in inst.notifications(cursor) if "READY=1" in f], 30,
                        "the READY=1 notification in systemd's debug log")
    started = inst.unit_usec("Service", "ExecMainStartTimestamp") / 1e6
    active = inst.unit_usec("Unit", "ActiveEnterTimestamp") / 1e6
    job = inst.wait(lambda: inst.job(LONG), 30, f"{LONG} in `oddaemon status`")
    restored = [h["time"] for h in job["history"] if h["reason"] == "resuming after daemon restart"]
    assert restored and started <= restored[-1] < active, (started, restored, active, job["history"][-3:])
    assert job["state"] == "running" and job["attempt"] == saved["attempt"] + 1, job
    assert re.match(r"READY=1, STATUS=1 training; no GPUs; " + LONG, got[0]), got
    daemon = [m for p, m in inst.entries(cursor) if p == pid]
    restore_line = f"INFO job {LONG}: running -> queued (resuming after daemon restart)"
    ready = next(i for i, m in enumerate(daemon) if m.startswith("INFO ready: spool "))
    assert restore_line in daemon[:ready], daemon
    inst.wait(lambda: len(inst.workers()) == 1, 30, "the job's worker")
    inst.sh("systemctl stop oddaemon.service", timeout=120)
    assert inst.workers("") == [] and inst.unit_pids() == []


TF_JOB = "tf_tiny"
TF_DATA = "/srv/oddaemon/tfdemo"


OOM_HOG = (  # joins the service's cgroup, then fills memory page by page until the OOM killer takes it
    "d=/sys/fs/cgroup/system.slice/oddaemon.service; [ -d $d/daemon ] && d=$d/daemon; "  # (per-job cgroups: a leaf)
    "echo $$ > $d/cgroup.procs && "
    "exec python3 -c 'import time; chunks = []\nwhile True: chunks.append(b\"x\" * (1 << 24))'")


def test_a_process_of_the_service_killed_by_the_oom_killer_leaves_the_daemon_running(installed):
    """OOMPolicy=continue: a worker taken by the kernel's OOM killer is a job failure the daemon
    handles; systemd must not stop the service (with the default OOMPolicy=stop it would)."""
    inst = installed
    if inst.sh("test -w /sys/fs/cgroup/system.slice/oddaemon.service/memory.max", check=False).returncode != 0:
        pytest.skip("no memory controller in the container's cgroup for the service")
    before = inst.show("MainPID", "NRestarts")
    used = int(inst.sh("cat /sys/fs/cgroup/system.slice/oddaemon.service/memory.current").stdout)
    cursor = inst.sh("journalctl -n 0 --show-cursor -q | sed -n 's/^-- cursor: //p'").stdout.strip()
    inst.sh(f"systemctl set-property --runtime oddaemon.service MemoryMax={used + 64 * 2**20}")
    try:
        hog = inst.sh(OOM_HOG, check=False, timeout=120)
    finally:
        inst.sh("systemctl set-property --runtime oddaemon.service MemoryMax=infinity")
    assert hog.returncode == -9 or hog.returncode == 137, (hog.returncode, hog.stderr[-500:])
    events = inst.sh("cat /sys/fs/cgroup/system.slice/oddaemon.service/memory.events").stdout
    assert int(re.search(r"^oom_kill (\d+)", events, re.M).group(1)) >= 1, events
    journal = inst.sh(f"journalctl -u oddaemon.service --after-cursor='{cursor}' -o cat", check=False).stdout
    assert "killed by the OOM killer" in journal, journal[-3000:]
    assert "Failed with result 'oom-kill'" not in journal and "Deactivated" not in journal, journal[-3000:]
    assert running(inst) and inst.show("MainPID", "NRestarts") == before  # the same daemon, never restarted
    assert inst.sh("/opt/oddaemon/.venv/bin/oddaemon list", check=False).returncode == 0


@pytest.mark.timeout(2700)
def test_real_tf_workers_train_and_evaluate_under_the_hardened_unit(installed):
    """The real workers (python -m oddaemon.workers: TF 2.15 and the Object Detection API) under
    the shipped unit's hardening (User=oddaemon, NoNewPrivileges, an empty capability set, the
    system-call filter, ProtectSystem=strict, PrivateTmp, ...): a tiny SSD job on the CPU trains,
    and the real evaluator evaluates every checkpoint, once each, in order. The TF stack is the
    host's, lent read-only and put on the installed venv's path (what scripts/install without
    --without-tf would have installed there)."""
    inst = installed
    if inst.tf_site is None:
        pytest.skip("the host has no TF stack to lend the container (scripts/setup installs it)")
    site = inst.sh("/opt/oddaemon/.venv/bin/python -c 'import sysconfig; print(sysconfig.get_path(\"purelib\"))'"
                   ).stdout.strip()
    pth = f"{site}/zz-oddaemon-test-host-tf.pth"
    if inst.show("ActiveState")["ActiveState"] == "active":
        inst.sh("systemctl stop oddaemon.service", timeout=120)
    tf_config = (inst.config.replace('module = "oddaemon.testing.standin"', 'module = "oddaemon.workers"')
                 + "[pins]\nmin_free_bytes = 0\nmin_free_percent = 0\n")
    assert 'module = "oddaemon.workers"' in tf_config
    inst.write_config(tf_config)
    inst.sh(f"echo {inst.tf_site} > {pth}")
    try:
        # The TF stack imports in the container's Python (the daemon's own venv interpreter).
        probe = inst.sh("/opt/oddaemon/.venv/bin/python -c 'import tensorflow as tf, object_detection; print(tf.__version__)'",
                        check=False, timeout=300)
        assert probe.returncode == 0 and probe.stdout.split()[-1] == "2.15.1", probe.stdout + probe.stderr[-3000:]
        inst.as_user("alice", f"cd /home/alice && HOME=/home/alice /opt/oddaemon/.venv/bin/python -m oddaemon.workers "
                     f"generate-demo --out {TF_DATA} --model ssd_mobilenet_tiny --train-images 16 --eval-images 8",
                     timeout=600)
        inst.sh("systemctl reset-failed oddaemon.service; systemctl start oddaemon.service", timeout=180)
        write_as(inst, "alice", f"/srv/oddaemon/{TF_JOB}.toml", f'''name = "{TF_JOB}"
pipeline_config = "{TF_DATA}/pipeline.config"
model_dir = "/srv/oddaemon/{TF_JOB}_model"
[pipeline]
num_classes = 3
batch_size = 4
num_steps = 10
label_map_path = "{TF_DATA}/label_map.pbtxt"
train_input_path = "{TF_DATA}/train-*.tfrecord"
eval_input_path = "{TF_DATA}/eval.tfrecord"
[train]
gpus = 0
checkpoint_every_n = 5
[eval]
device = "cpu"
''')
        inst.c.run(["/opt/oddaemon/.venv/bin/oddaemon", "submit", "--wait", "0", f"/srv/oddaemon/{TF_JOB}.toml"],
                   user="alice")
        # While it trains: the real train worker is in the unit's cgroup with the unit's identity and limits.
        seen = inst.wait(lambda: tf_worker(inst, "train") or ((inst.job(TF_JOB) or {}).get("state") in
                                                             ("succeeded", "failed", "cancelled") and "ended"),
                         900, "the real train worker to start")
        assert seen != "ended", f"{TF_JOB} ended before its train worker was seen: {inst.job(TF_JOB)}"
        confined(inst, seen)
        final = inst.wait(lambda: (j := inst.job(TF_JOB)) and j["state"] in ("succeeded", "failed", "cancelled") and j,
                          1800, f"{TF_JOB} to finish", interval=2.0)
        inst.timings["tf_job"] = (final["finished_at"] or 0) - final["submitted_at"]
        logs = inst.sh(f"tail -n 40 /var/log/oddaemon/{TF_JOB}/train.log /var/log/oddaemon/{TF_JOB}/eval.log",
                       check=False).stdout
        assert final["state"] == "succeeded", (final["reason"], final["failure"], logs, inst.journal(80))
        checkpoints = final["evaluation"]["checkpoints"]
        # ckpt-1 is step 0; then every 5 steps, the last (10) included: each evaluated once, in order
        assert [(c["state"], c["step"], c["attempts"]) for c in checkpoints] == [
            ("evaluated", s, 1) for s in (0, 5, 10)], checkpoints
        assert all("DetectionBoxes_Precision/mAP" in c["metrics"] for c in checkpoints), checkpoints
        # ... and they are the checkpoints TF wrote (all still there: fewer than max_to_keep)
        written = inst.sh(f"cd /srv/oddaemon/{TF_JOB}_model && ls ckpt-*.index").stdout.split()
        assert [c["checkpoint"] + ".index" for c in checkpoints] == sorted(written, key=lambda n: int(n[5:-6])), written
        owners = inst.sh(f"stat -c '%U' /srv/oddaemon/{TF_JOB}_model/ckpt-*.index /srv/oddaemon/{TF_JOB}_model/checkpoint"
                         ).stdout.split()
        assert owners and set(owners) == {"oddaemon"}, owners
        ping = inst.sh("/opt/oddaemon/.venv/bin/python -c 'import json; from oddaemon.adapters.control import request; "
                       "print(json.dumps(request(\"/var/lib/oddaemon/control.sock\", {\"cmd\": \"ping\"})))'").stdout
        assert json.loads(ping)["heavy_modules"] == [], ping  # the daemon itself never imports TF
        # The real workers still there (the warm preflight server idles for a minute) end on SIGTERM.
        stop_cleanly(inst, "tf_stop")
    finally:
        inst.sh("systemctl stop oddaemon.service", check=False, timeout=120)
        inst.sh(f"rm -f {pth}")
        inst.write_config(inst.config)
    assert inst.sh("pgrep -f ' -m oddaemon[.]workers ' || true").stdout.split() == []


def tf_worker(inst, role: str) -> int | None:
    out = inst.sh(f"pgrep -f ' -m oddaemon[.]workers {role} ' || true").stdout.split()
    return int(out[0]) if out else None


def confined(inst, pid: int) -> None:
    """The worker runs as the unit's user, in its cgroup, with no privileges and the syscall filter."""
    ids = inst.sh(f"ps -o user=,group= -p {pid}").stdout.split()
    status = dict(line.split(":", 1) for line in inst.sh(f"cat /proc/{pid}/status").stdout.splitlines() if ":" in line)
    cgroup = inst.cgroup_of(pid)
    assert ids == ["oddaemon", "oddaemon"], ids
    assert status["NoNewPrivs"].strip() == "1" and status["Seccomp"].strip() == "2", status
    assert int(status["CapEff"], 16) == 0 and int(status["CapBnd"], 16) == 0, status
    assert re.search(r"^(0:|\d+:name=systemd):/system.slice/oddaemon.service$", cgroup, re.M), cgroup
    # ProtectSystem=strict in the worker's mount namespace: /usr read-only even for root there, its
    # ReadWritePaths= writable
    ro = inst.sh(f"nsenter -t {pid} -m touch /usr/oddaemon-probe", check=False)
    assert ro.returncode != 0 and "Read-only file system" in ro.stderr, ro
    inst.sh(f"nsenter -t {pid} -m sh -c 'touch /srv/oddaemon/.probe && rm /srv/oddaemon/.probe'")
