"""README claims that no other test would notice breaking, each against the real daemon process
(real stand-in workers, real mounts, real sockets). Every test stops what it starts; waits end on
the awaited event or a generous deadline.

* "When training fails": the ``storage`` kind names its path in the job view and `oddaemon
  status`, and restarts with backoff until the path works again;
* "[eval] device": ``"gpu"`` puts the evaluator on a free GPU (never a training one, waiting for one
  if none is free), ``"auto"`` on an idle GPU unless a training waits for GPUs;
* "Metrics": a scrape never waits for the event loop (answered while the loop is stuck in a
  write) and never blocks it; gzip and OpenMetrics when asked; ``oddaemon_job_restarts_total`` is
  kept across daemon restarts (``oddaemon_worker_restarts_total`` counts since the start);
* "Security model": the control socket is mode 0660 for the daemon's group; every path is checked
  again at every worker start (the evaluator, the export, the preflight), so a symlink swapped in
  later stops the job (``refused``) instead of redirecting it.
"""

from __future__ import annotations

import fcntl
import grp
import gzip
import itertools
import json
import os
import platform
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import termios
import threading
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from oddaemon.adapters.control import DaemonUnreachable, request
from tests.support.harness import DaemonEnv, free_port, mount, train_marker, wait_for, worker_pids

SYSTEM_PYTHON = "/usr/bin/python3"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (mounts, other users and groups)")


# ---------------------------------------------------------------------------------------- helpers

def fetch(port: int, headers: dict | None = None, timeout: float = 30) -> tuple[dict, bytes]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout) as reply:
        return {k.lower(): v for k, v in reply.headers.items()}, reply.read()


def scrape(port: int) -> str:
    return fetch(port)[1].decode()


def samples(text: str) -> dict[tuple, float]:
    """{(sample name, sorted label items): value} of a text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels) -> float | None:
    return samples(text).get((name, tuple(sorted(labels.items()))))


def newest_step(env: DaemonEnv, name: str) -> int:
    """The step of the job's newest evaluated checkpoint (0 before there is one, or the job)."""
    job = env.job(name)
    return (job["evaluation"]["newest_step"] if job else None) or 0


def pids_of(marker: str) -> list[int]:
    return worker_pids(marker)


def evaluator_marker(env: DaemonEnv, name: str) -> str:
    return f"eval-serve --job {env.state}/work/{name}/job.json"


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        return dict(e.decode().split("=", 1) for e in f.read().split(b"\0") if b"=" in e)


def fake_nvidia_smi(directory: str, ids: list[int]) -> None:
    """An nvidia-smi that lists ``ids`` (NVML finds no driver here; the daemon asks nvidia-smi next)."""
    path = os.path.join(directory, "nvidia-smi")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in ids))
    os.chmod(path, 0o755)


@pytest.fixture
def fake_gpus(tmp_path, monkeypatch):
    """The daemon (and the test) see GPUs ``ids`` through a fake nvidia-smi on PATH."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def make(ids: list[int]) -> None:
        fake_nvidia_smi(str(bin_dir), ids)

    return make


def eval_section(text: str, lines: str) -> str:
    return text.replace("\n[eval]\n", f"\n[eval]\n{lines}\n", 1)


def train_section(text: str, lines: str) -> str:
    return text.replace("[train]\n", f"[train]\n{lines}\n", 1)


def starts_in(log_path: str, role: str) -> list[str]:
    """The CUDA_VISIBLE_DEVICES of each start the daemon logged in a worker log."""
    try:
        text = open(log_path, errors="replace").read()
    except FileNotFoundError:
        return []
    return [line.rsplit("CUDA_VISIBLE_DEVICES=", 1)[1].rstrip(")\n").strip("'")
            for line in text.splitlines() if line.startswith(f"==== oddaemon: starting {role} attempt")]


# ------------------------------------------------------------------- 2. the storage failure kind
@needs_root
def test_storage_failure_names_its_path_in_the_view_and_status_and_resumes_once_it_works(daemon_env, mounts):
    # README, "When training fails": storage = "a file system error with its path ... restarts with
    # backoff (it resumes once the path works again)". Restarts to spare: it must resume on its own.
    daemon_env.write_config(max_restarts=1000, backoff_base=0.2, backoff_cap=1.0)
    env = daemon_env.start()
    env.drop("ro.toml", env.job_text("ro", num_steps=60, every=5, keep=20, step_seconds=0.05))
    model_dir = os.path.join(env.models, "ro")
    wait_for(lambda: newest_step(env, "ro") >= 10, 60, what="checkpoints up to step 10")
    trainer = wait_for(lambda: pids_of(train_marker(env, "ro")), 30, what="the trainer")[0]
    os.kill(trainer, signal.SIGSTOP)  # no write of its own between the two mount calls
    try:
        mount("--bind", model_dir, model_dir)
        mounts.append(model_dir)
        mount("-o", "remount,bind,ro", model_dir)
    finally:
        os.kill(trainer, signal.SIGCONT)

    def storage_failure():
        job = env.job("ro")
        failure = job.get("failure") or {}
        return job if failure.get("kind") == "storage" and job["restarts"] >= 1 else None

    job = wait_for(storage_failure, 90, 0.1, what=f"a storage failure\n{env.daemon_log()}")
    message = job["failure"]["message"]
    assert message.startswith("Read-only file system on "), message
    path = message[len("Read-only file system on "):].split(":", 1)[0]
    assert path == model_dir or path.startswith(model_dir + "/"), (path, model_dir)
    assert job["state"] in ("backoff", "running"), job  # restarted with backoff, not failed
    backoff = [h["reason"] for h in job["history"] if h["state"] == "backoff"]
    # (each failure names the path it hit: a checkpoint's temp dir, or a new event file)
    assert backoff and f"Read-only file system on {model_dir}/" in backoff[0] and "restart 1 of 1000" in backoff[0], \
        backoff
    out = env.cli("status", "ro")
    assert out.returncode == 0, out.stderr
    assert f"failure    storage: Read-only file system on {model_dir}/" in out.stdout, out.stdout
    shown = json.loads(env.cli("status", "--json", "ro").stdout)  # (it may have failed again since, elsewhere)
    assert shown["failure"]["kind"] == "storage", shown["failure"]
    assert shown["failure"]["message"].startswith(f"Read-only file system on {model_dir}/"), shown["failure"]
    subprocess.run(["umount", model_dir], check=True)  # the path works again: the next restart resumes
    mounts.remove(model_dir)
    job = env.wait_state("ro", "succeeded", 120)
    assert job["step"] == 60 and job["restarts"] >= 1
    assert "resuming from step" in open(os.path.join(env.logs, "ro", "train.log")).read()


# -------------------------------------------------------------------- 3. where the evaluator runs
def _evaluator_devices(env: DaemonEnv, name: str) -> str:
    pid = wait_for(lambda: pids_of(evaluator_marker(env, name)), 60, what=f"the evaluator of {name}")[0]
    return environ(pid)["CUDA_VISIBLE_DEVICES"]


def _trainer_devices(env: DaemonEnv, name: str) -> str:
    pid = wait_for(lambda: pids_of(train_marker(env, name)), 60, what=f"the trainer of {name}")[0]
    return environ(pid)["CUDA_VISIBLE_DEVICES"]


@pytest.mark.parametrize("device", ["gpu", "auto"])
def test_eval_device_gpu_or_auto_puts_the_evaluator_on_a_free_gpu(daemon_env, fake_gpus, device):
    fake_gpus([0, 1])
    daemon_env.write_config(gpus=[0, 1])
    env = daemon_env.start()
    text = env.job_text("ongpu", num_steps=100000, every=5, step_seconds=0.05, gpus=[0])
    env.drop("ongpu.toml", eval_section(text, f'device = "{device}"'))
    env.wait_state("ongpu", "running", 60)
    assert _trainer_devices(env, "ongpu") == "0"
    assert _evaluator_devices(env, "ongpu") == "1"  # the free GPU, not the training's
    wait_for(lambda: env.job("ongpu")["evaluation"]["counts"].get("evaluated"), 60, what="an evaluation")
    job = env.job("ongpu")
    assert job["gpus"] == [0] and job["eval_gpus"] == [1], job
    assert env.ask("list")["free_gpus"] == []  # the evaluator holds its GPU
    assert starts_in(os.path.join(env.logs, "ongpu", "eval.log"), "eval") == ["1"]


def test_eval_device_default_cpu_leaves_every_gpu_to_training(daemon_env, fake_gpus):
    fake_gpus([0, 1])
    daemon_env.write_config(gpus=[0, 1])
    env = daemon_env.start()
    env.drop("oncpu.toml", env.job_text("oncpu", num_steps=100000, every=5, step_seconds=0.05, gpus=[0]))
    env.wait_state("oncpu", "running", 60)
    assert _evaluator_devices(env, "oncpu") == ""
    wait_for(lambda: env.job("oncpu")["evaluation"]["counts"].get("evaluated"), 60, what="an evaluation")
    assert env.job("oncpu")["eval_gpus"] == [] and env.ask("list")["free_gpus"] == [1]


def test_eval_device_auto_uses_the_cpu_while_a_training_waits_for_gpus(daemon_env, fake_gpus):
    fake_gpus([0, 1, 2])
    daemon_env.write_config(gpus=[0, 1, 2], max_cpu_jobs=1)
    env = daemon_env.start()
    env.drop("holder.toml", env.job_text("holder", num_steps=100000, step_seconds=0.05, gpus=[2],
                                         eval_extra="enabled = false"))
    env.wait_state("holder", "running", 60)
    env.drop("waiter.toml", env.job_text("waiter", num_steps=10, gpus=[1, 2], eval_extra="enabled = false"))
    env.wait_state("waiter", "queued", 60)  # GPU 2 is held: it waits for GPUs
    text = env.job_text("polite", num_steps=100000, every=5, step_seconds=0.05, gpus=[0], priority=10)
    env.drop("polite.toml", eval_section(text, 'device = "auto"'))
    env.wait_state("polite", "running", 60)
    assert _evaluator_devices(env, "polite") == ""  # GPU 1 is idle, but "waiter" waits for GPUs
    wait_for(lambda: env.job("polite")["evaluation"]["counts"].get("evaluated"), 60, what="an evaluation")
    assert env.job("polite")["eval_gpus"] == []
    assert env.job("waiter")["state"] == "queued" and env.ask("list")["free_gpus"] == [1]


def test_eval_device_gpu_waits_for_a_free_gpu_and_never_shares_a_training_one(daemon_env, fake_gpus):
    fake_gpus([0, 1])
    daemon_env.write_config(gpus=[0, 1])
    env = daemon_env.start()
    text = env.job_text("allgpus", num_steps=30, every=10, keep=10, step_seconds=0.05, gpus=[0, 1])
    env.drop("allgpus.toml", eval_section(text, 'device = "gpu"'))
    job = env.wait_state("allgpus", "succeeded", 120)
    entered = [h["time"] for h in job["history"] if h["state"] == "evaluating"]
    assert len(entered) == 1, job["history"]
    checkpoints = job["evaluation"]["checkpoints"]
    assert [c["step"] for c in checkpoints if c["state"] == "evaluated"] == [0, 10, 20, 30], checkpoints
    # no evaluation started while training held both GPUs; then it ran on one of them, never on the CPU
    starts = [c["completed_at"] + c["lag_seconds"] for c in checkpoints]  # (lag: complete -> evaluation start)
    assert all(s >= entered[0] - 1e-6 for s in starts), (starts, entered)  # (1e-6: float rounding of the sum)
    devices = starts_in(os.path.join(env.logs, "allgpus", "eval.log"), "eval")
    assert devices and all(d in ("0", "1") for d in devices), devices


# ------------------------------------------------------------------- 5. restarts across restarts
def test_job_restarts_total_is_kept_across_daemon_restarts(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}", max_restarts=5, max_cpu_jobs=2)
    env = daemon_env.start()
    env.drop("flaky.toml", env.job_text("flaky", num_steps=100000, every=5, step_seconds=0.05, crash_at_step=3,
                                        crash_times=2))
    env.drop("gaveup.toml", train_section(env.job_text("gaveup", num_steps=100, step_seconds=0.01, crash_at_step=2),
                                          "max_restarts = 1"))
    env.wait_state("gaveup", "failed", 60)
    wait_for(lambda: env.job("flaky")["restarts"] == 2 and env.job("flaky")["state"] == "running"
             and newest_step(env, "flaky") >= 5, 60,
             what="flaky past its crashes after 2 restarts")

    def exported(expected: dict) -> str:
        def check():
            text = scrape(port)
            got = {key: value(text, *key[:1], **dict(key[1:])) for key in expected}
            return text if got == expected else None
        return wait_for(check, 30, 0.2, what=f"{expected} in the metrics:\n{scrape(port)}")

    exported({("oddaemon_job_restarts_total", ("job_name", "flaky")): 2.0,
              ("oddaemon_job_restarts_total", ("job_name", "gaveup")): 1.0,
              ("oddaemon_worker_restarts_total",): 3.0})
    env.stop()
    env.start()
    env.wait_state("flaky", "running", 60)
    # kept: read back from the job records; the daemon-wide counter counts since this start
    exported({("oddaemon_job_restarts_total", ("job_name", "flaky")): 2.0,
              ("oddaemon_job_restarts_total", ("job_name", "gaveup")): 1.0,
              ("oddaemon_worker_restarts_total",): 0.0})
    # and it goes on counting from there
    os.kill(wait_for(lambda: pids_of(train_marker(env, "flaky")), 30, what="the trainer")[0], signal.SIGKILL)
    exported({("oddaemon_job_restarts_total", ("job_name", "flaky")): 3.0,
              ("oddaemon_worker_restarts_total",): 1.0})


# ------------------------------------------------------------ 4. a scrape never waits for the loop
class PipedDaemon:
    """The harness's daemon, with stdout and stderr into a 4 KiB pipe the test drains (into the
    harness's log file) until ``hold()``: then the daemon's next log lines fill the pipe and its main
    loop blocks in write(2) (its other threads run on, unlike under SIGSTOP)."""

    def __init__(self, env: DaemonEnv):
        self.env = env
        self.draining = threading.Event()
        self.read_fd = -1
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        env = self.env
        read_fd, write_fd = os.pipe()
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, 4096)
        self.read_fd = read_fd
        env.stderr_path = os.path.join(env.root, "daemon-piped.log")
        child_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.proc = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", env.config_path, "serve"],
                                    stdout=write_fd, stderr=write_fd, env=child_env)
        os.close(write_fd)
        self.draining.set()
        self.thread = threading.Thread(target=self._drain, daemon=True)
        self.thread.start()
        wait_for(env.answers, 30, what="the daemon to answer on its control socket")

    def _drain(self) -> None:
        with open(self.env.stderr_path, "ab") as out:
            while True:
                self.draining.wait()
                data = os.read(self.read_fd, 65536)
                if not data:
                    return
                out.write(data)
                out.flush()

    def hold(self) -> None:
        self.draining.clear()

    def release(self) -> None:
        self.draining.set()

    def pending_bytes(self) -> int:
        return int.from_bytes(fcntl.ioctl(self.read_fd, termios.FIONREAD, b"\0\0\0\0"), sys.byteorder)

    def close(self) -> None:
        self.release()
        self.env.close()
        if self.thread is not None:
            self.thread.join(30)
        os.close(self.read_fd)


WRITE_SYSCALL = {"x86_64": 1, "aarch64": 64}.get(platform.machine())


def _main_thread_in_write(pid: int) -> bool:
    if WRITE_SYSCALL is None:
        return True  # (cannot tell on this architecture: the full pipe and the silent socket must do)
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] == str(WRITE_SYSCALL)


def _pings(env: DaemonEnv) -> bool:
    try:
        return request(env.socket, {"cmd": "ping"}, timeout=2).get("ok", False)
    except (DaemonUnreachable, OSError):
        return False


def test_a_scrape_is_answered_while_the_event_loop_is_stuck_and_gzip_and_openmetrics_when_asked(daemon_env):
    port = free_port()
    daemon_env.write_config(metrics_listen=f"127.0.0.1:{port}")
    piped = PipedDaemon(daemon_env)
    try:
        piped.start()
        env = daemon_env
        env.drop("shown.toml", env.job_text("shown", num_steps=4, every=2, step_seconds=0.01))
        env.wait_state("shown", "succeeded", 60)
        wait_for(lambda: value(scrape(port), "oddaemon_job_state", job_name="shown", state="succeeded") == 1.0, 30,
                 what="the finished job in the metrics")
        # Stall the loop: stop draining, then make it log (each rejected file is a WARNING line)
        # until its write to the full pipe blocks and the control socket goes silent.
        piped.hold()
        numbers = itertools.count()

        def stuck() -> bool:
            env.drop(f"bad{next(numbers)}.toml", b"this is = = not toml\n")
            return piped.pending_bytes() > 0 and not _pings(env) and _main_thread_in_write(env.proc.pid)

        wait_for(stuck, 120, 0.05, what="the daemon's main loop to block on its full stderr pipe")
        assert not _pings(env) and _main_thread_in_write(env.proc.pid)  # stuck, not just busy
        # A scrape is answered from the last snapshot: the loop is not asked (and, stuck, it
        # publishes no new one: every scrape meanwhile shows the same values).
        headers, body = fetch(port)
        assert headers["content-type"].startswith("text/plain")
        plain = samples(body.decode())
        assert plain[("oddaemon_job_state", (("job_name", "shown"), ("state", "succeeded")))] == 1.0
        headers, body = fetch(port, {"Accept-Encoding": "gzip"})
        assert headers.get("content-encoding") == "gzip" and body[:2] == b"\x1f\x8b", headers
        assert samples(gzip.decompress(body).decode()) == plain
        headers, body = fetch(port, {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"})
        assert headers["content-type"].startswith("application/openmetrics-text"), headers
        assert body.decode().endswith("# EOF\n") and "oddaemon_job_state" in body.decode()
        assert not _pings(env)  # still stuck throughout
        piped.release()
        wait_for(lambda: _pings(env), 60, what="the loop to run again")
        # ... and a scrape never blocks the loop: a scraper that stops mid-request holds only its thread
        with socket.create_connection(("127.0.0.1", port), timeout=30) as stuck:
            stuck.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never finished
            assert all(_pings(env) for _ in range(5))
            wait_for(lambda: value(scrape(port), "oddaemon_spool_rejected_files_total") is not None
                     and value(scrape(port), "oddaemon_spool_rejected_files_total") > 0, 30,
                     what="the rejected files counted in the metrics")
    finally:
        piped.close()


# ------------------------------------------------------------------ 6. the control socket's mode
CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(20)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("denied")
    sys.exit(0)
s.sendall(b'{"cmd": "ping"}\\n')
print(s.recv(65536).decode().strip())
"""


def _a_group_nobody_is_not_in() -> grp.struct_group:
    nobody = pwd.getpwnam("nobody")
    theirs = set(os.getgrouplist(nobody.pw_name, nobody.pw_gid))
    for group in sorted(grp.getgrall(), key=lambda g: g.gr_gid):
        if group.gr_gid not in theirs and group.gr_gid != 0 and not group.gr_mem:
            return group
    pytest.skip("no group here that nobody is not a member of")


class GroupDaemon(DaemonEnv):
    """The harness's daemon, started with ``gid`` as its group (still uid 0: the daemon's user)."""

    gid: int = 0

    def start(self) -> GroupDaemon:
        self.stderr_path = os.path.join(self.root, f"daemon-{time.monotonic_ns()}.log")
        with open(self.stderr_path, "wb") as err:
            child_env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
            self.proc = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", self.config_path, "serve"],
                                         stdout=err, stderr=subprocess.STDOUT, env=child_env, group=self.gid,
                                         extra_groups=[])
        wait_for(self.answers, 30, what="the daemon to answer on its control socket")
        return self


@needs_root
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"needs {SYSTEM_PYTHON} (a client outside /root)")
def test_the_control_socket_is_mode_0660_for_the_daemons_group():
    group = _a_group_nobody_is_not_in()
    nobody = pwd.getpwnam("nobody")
    root = tempfile.mkdtemp(prefix="oddaemon-socket-")  # not pytest's tmp_path: nobody must reach the socket
    os.chmod(root, 0o755)
    env = GroupDaemon(root)
    env.gid = group.gr_gid
    os.makedirs(env.state, mode=0o755)
    os.chmod(env.state, 0o755)  # (whatever the umask: the way to the socket is open, the socket decides)
    try:
        env.start()
        assert os.stat(f"/proc/{env.proc.pid}").st_gid == group.gr_gid  # (the daemon runs with that group)
        st = os.stat(env.socket)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
        assert (st.st_uid, st.st_gid) == (0, group.gr_gid), (st.st_uid, st.st_gid)

        def client(extra_groups: list[int]) -> str:
            out = subprocess.run([SYSTEM_PYTHON, "-I", "-c", CLIENT, env.socket], user=nobody.pw_uid,
                                 group=nobody.pw_gid, extra_groups=extra_groups, cwd="/", capture_output=True,
                                 text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()

        assert client([]) == "denied"  # others: no access
        reply = json.loads(client([group.gr_gid]))  # a member of the daemon's group: read and write
        assert reply["ok"] is True and reply["pid"] == env.proc.pid
    finally:
        env.close()
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------- 7. paths checked again at every worker start
def _linked_job(env: DaemonEnv, name: str, **kwargs) -> tuple[str, str]:
    """A job whose pipeline_config is named through a symlink inside the allowed root."""
    text = env.job_text(name, **kwargs)
    real = os.path.join(env.data, f"{name}.config")
    link = os.path.join(env.data, f"{name}-link.config")
    os.symlink(real, link)
    return text.replace(f'pipeline_config = "{real}"', f'pipeline_config = "{link}"'), link


def _swap(link: str, target: str = "/etc/hostname") -> None:
    tmp = link + ".tmp"
    os.symlink(target, tmp)
    os.replace(tmp, link)


def _refusal(env: DaemonEnv, link: str) -> str:
    return (f"pipeline_config {link} now resolves to /etc/hostname, outside the allowed roots {env.root}")


def _assert_refused(env: DaemonEnv, name: str, link: str, role: str) -> dict:
    job = env.wait_state(name, ("failed", "succeeded", "cancelled"), 90)
    assert job["state"] == "failed", job
    assert job["failure"]["kind"] == "refused", job["failure"]
    assert _refusal(env, link) in job["failure"]["message"], job["failure"]
    assert _refusal(env, link) in job["reason"] and f"{role} worker was not started" in job["reason"], job["reason"]
    out = env.cli("status", name)
    assert "failure    refused: " in out.stdout and link in out.stdout, out.stdout
    wait_for(lambda: not pids_of(train_marker(env, name)), 60, what="the trainer to be stopped")
    return job


def test_a_symlink_swapped_before_the_evaluator_starts_refuses_it_and_the_job(daemon_env):
    daemon_env.write_config(max_restarts=3)
    env = daemon_env.start()
    text, link = _linked_job(env, "evalswap", num_steps=100000, every=5, step_seconds=0.05, eval_seconds=0.05)
    env.drop("evalswap.toml", text)
    env.wait_state("evalswap", "running", 60)
    evaluator = wait_for(lambda: pids_of(evaluator_marker(env, "evalswap")), 60, what="the evaluator")[0]
    wait_for(lambda: env.job("evalswap")["evaluation"]["counts"].get("evaluated"), 60, what="a first evaluation")
    _swap(link)
    os.kill(evaluator, signal.SIGKILL)  # the daemon starts a new evaluator: it must check the paths again
    expected = f"job evalswap: not starting its eval worker: {_refusal(env, link)}"
    wait_for(lambda: expected in env.daemon_log(), 60, what=f"{expected!r} in\n{env.daemon_log()}")
    assert not pids_of(evaluator_marker(env, "evalswap"))
    assert starts_in(os.path.join(env.logs, "evalswap", "eval.log"), "eval") == [""]  # the first one only
    _assert_refused(env, "evalswap", link, "eval")


def test_a_symlink_swapped_before_the_export_starts_refuses_it_and_the_job(daemon_env):
    env = daemon_env.start()
    text, link = _linked_job(env, "expswap", num_steps=60, every=10, step_seconds=0.1)
    env.drop("expswap.toml", eval_section(text, "export_best = true"))
    env.wait_state("expswap", "running", 60)
    wait_for(lambda: env.job("expswap")["evaluation"]["counts"].get("evaluated"), 60, what="a first evaluation")
    assert env.job("expswap")["state"] == "running"  # the export starts only when training is over
    _swap(link)
    expected = f"job expswap: not starting its export worker: {_refusal(env, link)}"
    wait_for(lambda: expected in env.daemon_log(), 90, what=f"{expected!r} in\n{env.daemon_log()}")
    _assert_refused(env, "expswap", link, "export")
    assert starts_in(os.path.join(env.logs, "expswap", "export.log"), "export") == []
    assert not os.path.exists(os.path.join(env.models, "expswap", "exported"))


GATE_SCRIPT = """#!/bin/sh
# the worker python, held until the test opens the gate
while [ ! -e {gate} ]; do sleep 0.05; done
exec {python} "$@"
"""


def test_a_symlink_swapped_before_its_preflight_check_refuses_the_file(daemon_env):
    env = daemon_env
    gate = os.path.join(env.root, "gate-open")
    script = os.path.join(env.root, "gated-python")
    with open(script, "w") as f:
        f.write(GATE_SCRIPT.format(gate=gate, python=sys.executable))
    os.chmod(script, 0o755)
    env.write_config(worker_python=script)
    env.start()
    text, link = _linked_job(env, "preswap", num_steps=4, every=2)
    env.drop("preswap.toml", text)
    # validated (the link led inside the root): the file waits in cur/ for the preflight worker,
    # which is held at the gate
    wait_for(lambda: os.listdir(os.path.join(env.spool, "cur")) == ["preswap.toml"], 60, what="preswap in cur/")
    wait_for(lambda: pids_of(f"{script} -m oddaemon.testing.standin preflight-serve"), 60,
             what="the preflight worker to be started")
    _swap(link)
    with open(gate, "w"):
        pass
    error_path = os.path.join(env.spool, "rejected", "preswap.toml.error")
    wait_for(lambda: os.path.exists(error_path) or env.job("preswap"), 60, what=f"a verdict\n{env.daemon_log()}")
    assert os.path.exists(error_path), f"accepted: {env.job('preswap')}"
    error = open(error_path).read()
    assert _refusal(env, link) in error, error
    assert env.job("preswap") is None
    # the preflight worker never read the job's (redirected) files
    served = [os.path.join(env.logs, d, "preflight.log") for d in os.listdir(env.logs) if d.startswith("_preflight")]
    assert served and not any("preflight of 'preswap'" in open(p).read() for p in served if os.path.exists(p))
