"""``oddaemon tensorboard`` against the real daemon (stand-in workers), with a small fake TensorBoard
(``--tensorboard``) that records its command line and answers HTTP like TensorBoard's
``/data/logdir``: the jobs' model_dirs asked of the daemon, the URL printed once it answers, and
TensorBoard stopped on Ctrl-C, on SIGTERM, and when the command itself is killed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from tests.support.harness import wait_for

FAKE_TENSORBOARD = r'''
import http.server, json, os, signal, sys
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
record = os.environ["FAKE_TENSORBOARD_RECORD"]
with open(record, "w") as f:
    json.dump({"argv": args, "pid": os.getpid()}, f)

def stopped(signum, frame):
    with open(record + ".stopped", "w") as f:
        f.write(signal.Signals(signum).name)
    os._exit(0)

signal.signal(signal.SIGTERM, stopped)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"logdir": opts["--logdir_spec"]}).encode()
        self.send_response(200 if self.path == "/data/logdir" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

http.server.HTTPServer((opts["--host"], int(opts["--port"])), Handler).serve_forever()
'''


def interruptible() -> None:
    """SIGINT as a terminal's Ctrl-C finds it: a suite started in the background (``cmd &``) has it
    ignored, which its children inherit, and Python then installs no KeyboardInterrupt handler."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Board:
    """``oddaemon tensorboard ...`` as a process; its stdout lines read by a thread."""

    def __init__(self, env, *args: str, extra_env: dict | None = None, config: str | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", config or env.config_path, "tensorboard",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(extra_env or {})}, preexec_fn=interruptible)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    def url(self) -> tuple[str, int]:
        def printed():
            if self.proc.poll() is not None:
                raise AssertionError(f"exited {self.proc.returncode}: {self.proc.stderr.read()}")
            match = re.search(r"TensorBoard on (http://127\.0\.0\.1:\d+/) \(.*pid (\d+)\)", "".join(self.lines))
            return match
        match = wait_for(printed, 120, what="the TensorBoard URL")
        return match.group(1), int(match.group(2))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(30)
        self._thread.join(5)
        self.proc.stderr.close()


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid: int | None) -> None:
    if pid is not None and alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fake(tmp_path):
    script = tmp_path / "fake_tensorboard.py"
    script.write_text(FAKE_TENSORBOARD)
    record = str(tmp_path / "tensorboard.json")
    return f"{sys.executable} {script}", record


def finished(env, *names: str) -> None:
    for name in names:
        env.drop(f"{name}.toml", env.job_text(name, num_steps=5, every=5, step_seconds=0.01))
    for name in names:
        env.wait_state(name, "succeeded", 90)


def test_named_jobs_are_runs_the_url_answers_and_ctrl_c_stops_tensorboard(daemon_env, fake):
    env = daemon_env.start()
    finished(env, "tb_a", "tb_b")
    program, record = fake
    board = Board(env, "tb_b", "tb_a", "--tensorboard", program, extra_env={"FAKE_TENSORBOARD_RECORD": record})
    pid = None
    try:
        url, pid = board.url()
        with urllib.request.urlopen(url + "data/logdir", timeout=10) as response:
            assert json.load(response) == {"logdir": f"tb_b:{env.models}/tb_b,tb_a:{env.models}/tb_a"}
        with open(record) as f:
            argv = json.load(f)["argv"]
        port = int(url.rsplit(":", 1)[1].rstrip("/"))
        assert argv == ["--logdir_spec", f"tb_b:{env.models}/tb_b,tb_a:{env.models}/tb_a",
                        "--host", "127.0.0.1", "--port", str(port)]
        assert "runs: tb_b, tb_a" in "".join(board.lines)
        board.proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert board.proc.wait(60) == 0
        wait_for(lambda: not alive(pid), 30, what="the fake TensorBoard to exit")
        assert open(record + ".stopped").read() == "SIGTERM"
    finally:
        board.close()
        kill(pid)


def test_sigterm_and_a_killed_command_both_end_tensorboard(daemon_env, fake):
    env = daemon_env.start()
    finished(env, "tb_c")
    program, record = fake
    pids = []
    try:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            board = Board(env, "--tensorboard", program, "--port", "0", extra_env={"FAKE_TENSORBOARD_RECORD": record})
            try:
                _, pid = board.url()
                pids.append(pid)
                board.proc.send_signal(sig)
                board.proc.wait(60)
                # SIGKILL: nothing of the command runs; the parent-death signal ends TensorBoard
                wait_for(lambda p=pid: not alive(p), 30, what=f"TensorBoard to exit after the command's {sig.name}")
            finally:
                board.close()
    finally:
        for pid in pids:
            kill(pid)


def test_every_job_when_none_is_named_and_clear_errors(daemon_env, fake, tmp_path):
    env = daemon_env.start()
    finished(env, "tb_done")
    # max_cpu_jobs = 1: while tb_busy trains, tb_waits is queued and has no model_dir yet
    env.drop("tb_busy.toml", env.job_text("tb_busy", num_steps=100000, every=1000, step_seconds=0.05))
    env.wait_state("tb_busy", "running", 60)
    env.drop("tb_waits.toml", env.job_text("tb_waits", num_steps=5, every=5, step_seconds=0.01))
    env.wait_state("tb_waits", "queued", 60)
    wait_for(lambda: os.path.isdir(os.path.join(env.models, "tb_busy")), 60, what="tb_busy's model_dir")
    program, record = fake
    board = Board(env, "--tensorboard", program, extra_env={"FAKE_TENSORBOARD_RECORD": record})
    pid = None
    try:
        url, pid = board.url()
        with urllib.request.urlopen(url + "data/logdir", timeout=10) as response:
            assert json.load(response)["logdir"] == f"tb_done:{env.models}/tb_done,tb_busy:{env.models}/tb_busy"
        board.proc.send_signal(signal.SIGINT)
        assert board.proc.wait(60) == 0
        assert "left out tb_waits (queued): its model_dir" in board.proc.stderr.read()
    finally:
        board.close()
        kill(pid)

    out = env.cli("tensorboard", "tb_done", "nope", "nada", "--tensorboard", program)
    assert out.returncode == 1 and "no job named 'nope', 'nada'" in out.stderr, out.stderr
    out = env.cli("tensorboard", "tb_waits", "--tensorboard", program)
    assert out.returncode == 1, out.stderr
    assert f"job tb_waits: its model_dir {env.models}/tb_waits does not exist yet" in out.stderr

    # the workers' interpreter without tensorboard (a Python without site-packages): the message names it
    python = tmp_path / "bare-python"
    python.write_text(f"#!/bin/sh\nexec {sys.executable} -I -S \"$@\"\n")
    python.chmod(0o755)
    config = tmp_path / "cli.toml"
    text = open(env.config_path).read()
    config.write_text(re.sub(r'(?m)^python = .*$', f"python = {json.dumps(str(python))}", text))
    out = subprocess.run([sys.executable, "-m", "oddaemon", "-c", str(config), "tensorboard", "tb_done"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert f"tensorboard is not installed for {python} (the workers' interpreter, [worker] python)" in out.stderr

    out = env.cli("tensorboard", "tb_done", "--tensorboard", "/nonexistent/tensorboard")
    assert out.returncode == 1 and "cannot run /nonexistent/tensorboard: no such executable" in out.stderr
    env.ask("cancel", name="tb_busy")
