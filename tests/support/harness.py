"""Integration harness: a real daemon process (``python -m oddaemon serve``) on a temporary
project folder, real inotify, real stand-in worker subprocesses. Every fixture stops what it
starts."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field

from oddaemon.adapters import bookfile
from oddaemon.adapters.control import DaemonUnreachable, request
from oddaemon.core.evalbook import EvalPolicy

STANDIN = "oddaemon.testing.standin"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a test daemon's metrics endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    """The text of a test daemon's /metrics on 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def wait_for(predicate: Callable[[], object], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def write_pipeline(path: str, num_steps: int = 20, batch_size: int = 4, **directives) -> str:
    lines = [f"# standin: {k} = {v}" for k, v in directives.items()]
    lines += ["model {", "  ssd {", "    num_classes: 3", "  }", "}",
              "train_config {", f"  batch_size: {batch_size}", f"  num_steps: {num_steps}", "}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def train_marker(env: DaemonEnv, name: str) -> str:
    return f"train --job {env.state}/work/{name}/job.json"


def worker_pids(marker: str) -> list[int]:
    """Live processes whose command line (arguments joined by spaces) contains ``marker``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/stat", "rb") as f:
                zombie = f.read().rsplit(b")", 1)[1].split()[0] == b"Z"
        except OSError:
            continue
        if marker in cmdline and not zombie:
            found.append(int(entry))
    return found


@dataclass
class DaemonEnv:
    root: str
    config_overrides: dict = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    stderr_path: str = ""

    def __post_init__(self):
        self.spool = os.path.join(self.root, "spool")
        self.state = os.path.join(self.root, "state")
        self.logs = os.path.join(self.root, "logs")
        self.data = os.path.join(self.root, "data")
        self.models = os.path.join(self.root, "models")
        os.makedirs(self.data, exist_ok=True)
        os.makedirs(self.models, exist_ok=True)
        self.config_path = os.path.join(self.root, "oddaemon.toml")
        self.write_config()

    def write_config(self, **overrides) -> None:
        self.config_overrides.update(overrides)
        o = self.config_overrides
        sections = {
            "paths": {"spool_dir": self.spool, "state_dir": self.state, "log_dir": self.logs},
            "gpus": {"devices": o.get("gpus", "none")},
            "metrics": {"listen": o.get("metrics_listen", "")},
            "logs": {"max_bytes": o.get("log_max_bytes", 10 * 1024 * 1024), "backups": o.get("log_backups", 5)},
            "restart": {"max_restarts": o.get("max_restarts", 3), "backoff_base_seconds": o.get("backoff_base", 0.2),
                        "backoff_cap_seconds": o.get("backoff_cap", 1.0), "reset_after_seconds": 600},
            "jobs": {"allowed_roots": [self.root], "max_cpu_jobs": o.get("max_cpu_jobs", 1),
                     "stop_grace_seconds": o.get("stop_grace", 2.0), "submit_group": o.get("submit_group")},
            # Tests run the daemon as root: its workers may run as root only when the config says so.
            "worker": {"python": o.get("worker_python", sys.executable), "module": o.get("worker_module", STANDIN),
                       "user": o.get("worker_user"), "allow_root": o.get("allow_root", os.geteuid() == 0 or None),
                       "preflight": o.get("worker_preflight")},
            "daemon": {"event_loop": o.get("event_loop", "auto"), "dbus": o.get("dbus", "none")},
            # no free-space floor for the pins unless a test sets one: a nearly full CI disk must not
            # turn "every checkpoint evaluated" into "released to keep 5 GiB free"
            "pins": {"min_free_bytes": o.get("pins_min_free_bytes", 0), "min_free_percent": o.get("pins_min_free_percent", 0),
                     "max_bytes_per_job": o.get("pins_max_bytes_per_job")},
            # a Slurm backend (tests/support/slurm.py): None leaves the keys out, the default is "local"
            "cluster": {"backend": o.get("cluster_backend"), "model_dir_poll_seconds": o.get("model_dir_poll_seconds")},
            "slurm": {"conf": o.get("slurm_conf"), "poll_seconds": o.get("slurm_poll_seconds"),
                      "partition": o.get("slurm_partition"), "warning_seconds": o.get("slurm_warning_seconds")},
        }
        text = []
        for section, values in sections.items():
            text.append(f"[{section}]")
            # None leaves a key out of the file: the daemon's default applies
            text += [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]
        with open(self.config_path, "w") as f:
            f.write("\n".join(text) + "\n")

    # ---- daemon process
    def start(self) -> DaemonEnv:
        self.stderr_path = os.path.join(self.root, f"daemon-{time.monotonic_ns()}.log")
        err = open(self.stderr_path, "wb")
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        self.proc = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", self.config_path, "serve"],
                                     stdout=err, stderr=subprocess.STDOUT, env=env)
        err.close()
        wait_for(self.answers, 30, what="the daemon to answer on its control socket")
        return self

    def answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.daemon_log()}")
        try:
            return request(self.socket, {"cmd": "ping"}, timeout=2).get("ok", False)
        except DaemonUnreachable:
            return False

    @property
    def socket(self) -> str:
        return os.path.join(self.state, "control.sock")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"daemon did not stop within {timeout}s:\n{self.daemon_log()}") from None

    def close(self, timeout: float = 30) -> None:
        """Stop the daemon and kill any worker process left under this root (every test's teardown)."""
        try:
            self.stop(timeout=timeout)
        finally:
            for pid in worker_pids(self.root):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def daemon_log(self) -> str:
        try:
            with open(self.stderr_path, errors="replace") as f:
                return f.read()[-20000:]
        except OSError:
            return ""

    # ---- jobs
    def pipeline(self, name: str, **kwargs) -> str:
        return write_pipeline(os.path.join(self.data, f"{name}.config"), **kwargs)

    def job_text(self, name: str, num_steps: int = 20, every: int = 5, keep: int = 3, gpus=None, priority: int = 0,
                 extra: str = "", eval_extra: str = "", **directives) -> str:
        pipeline = self.pipeline(name, num_steps=num_steps, **directives)
        gpus_line = "" if gpus is None else f"gpus = {json.dumps(gpus)}\n"
        return (f'name = "{name}"\npipeline_config = "{pipeline}"\nmodel_dir = "{self.models}/{name}"\n'
                f"priority = {priority}\n{extra}\n[pipeline]\nnum_steps = {num_steps}\n\n"
                f"[train]\n{gpus_line}checkpoint_every_n = {every}\ncheckpoint_max_to_keep = {keep}\n"
                f"\n[eval]\n{eval_extra}\n")

    def drop(self, filename: str, text: str | bytes) -> str:
        """Maildir-style: write in tmp/, rename into new/."""
        os.makedirs(os.path.join(self.spool, "tmp"), exist_ok=True)
        os.makedirs(os.path.join(self.spool, "new"), exist_ok=True)
        tmp = os.path.join(self.spool, "tmp", filename)
        with open(tmp, "wb") as f:
            f.write(text.encode() if isinstance(text, str) else text)
        dest = os.path.join(self.spool, "new", filename)
        os.rename(tmp, dest)
        return dest

    def ask(self, cmd: str, **kw) -> dict:
        return request(self.socket, {"cmd": cmd, **kw})

    def job(self, name: str) -> dict | None:
        reply = self.ask("status", name=name)
        return reply["job"] if reply.get("ok") else None

    def wait_state(self, name: str, states: str | tuple[str, ...], timeout: float = 60) -> dict:
        states = (states,) if isinstance(states, str) else states

        def check():
            job = self.job(name)
            return job if job and job["state"] in states else None

        try:
            return wait_for(check, timeout, 0.1, what=f"job {name} to reach {states}")
        except AssertionError:
            raise AssertionError(f"job {name} did not reach {states}: {self.job(name)}\n{self.daemon_log()}") from None

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "oddaemon", "-c", self.config_path, *args],
                              capture_output=True, text=True, timeout=timeout)

    def rejected(self) -> list[str]:
        d = os.path.join(self.spool, "rejected")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []

    def accepted(self) -> list[str]:
        d = os.path.join(self.spool, "accepted")
        return sorted(os.listdir(d)) if os.path.isdir(d) else []


def assert_evaluated_in_order(env, name: str) -> list[int]:
    """README: every checkpoint is evaluated in order, one at a time. Read from the book on disk
    (state_dir/evals/<name>.json and its journal): the evaluations, ordered by when they started,
    are in checkpoint order, and each started after the one before it had finished. Returns the
    checkpoint numbers in that order."""
    book, _ = bookfile.load(os.path.join(env.state, "evals", f"{name}.json"), EvalPolicy())
    done = sorted((c for c in book.checkpoints.values() if c.state == "evaluated"), key=lambda c: c.started_at)
    order = [c.n for c in done]
    assert order == sorted(order), f"evaluated out of checkpoint order: {order}"
    for before, after in zip(done, done[1:]):
        assert before.finished_at <= after.started_at, (
            f"ckpt-{after.n} started at {after.started_at} before ckpt-{before.n} finished at {before.finished_at}")
    return order


def mount(*args: str) -> None:
    """mount(8) with these arguments; CalledProcessError when it fails."""
    subprocess.run(["mount", *args], check=True, capture_output=True, text=True)


def damage_record(path: str, record: int) -> int:
    """Flip a byte inside the payload of TFRecord ``record`` of ``path``, in place (its CRC no longer
    matches, as on a failing disk); the record's byte offset."""
    import struct  # noqa: PLC0415

    with open(path, "rb") as f:
        data = bytearray(f.read())
    offset = 0
    for _ in range(record):
        (length,) = struct.unpack("<Q", data[offset:offset + 8])
        offset += 12 + length + 4
    data[offset + 12 + 5] ^= 0xFF
    with open(path, "r+b") as f:
        f.write(bytes(data))
    return offset
