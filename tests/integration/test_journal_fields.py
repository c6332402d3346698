"""The real daemon under a fake journald: its stderr is the stream ``JOURNAL_STREAM`` names, so its
log records go over the native protocol to a datagram socket of the test's, each job's with
``ODDAEMON_JOB`` and the rest; without that match, plain lines on stderr as before."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time

from oddaemon.adapters.journal import SOCKET_ENV, decode_record
from tests.support.harness import DaemonEnv, wait_for


class FakeJournal:
    """A datagram socket read by a thread (AF_UNIX's small default queue would otherwise overflow)."""

    def __init__(self, path: str):
        self.path = path
        self.entries: list[dict[str, str]] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError:
                return
            self.entries.append(dict(decode_record(data)))

    def of(self, job: str) -> list[dict[str, str]]:
        return [e for e in list(self.entries) if e.get("ODDAEMON_JOB") == job]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


class JournaledDaemon(DaemonEnv):
    """``DaemonEnv.start`` with the daemon's stderr announced as the journal stream."""

    journal_socket: str = ""

    def start(self) -> DaemonEnv:
        self.stderr_path = os.path.join(self.root, f"daemon-{time.monotonic_ns()}.log")
        err = open(self.stderr_path, "wb")
        st = os.fstat(err.fileno())
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", SOCKET_ENV: self.journal_socket})
        self.proc = subprocess.Popen([sys.executable, "-m", "oddaemon", "-c", self.config_path, "serve"],
                                     stdout=err, stderr=subprocess.STDOUT, env=env)
        err.close()
        wait_for(self.answers, 30, what="the daemon to answer on its control socket")
        return self


def test_each_job_s_records_carry_its_name_state_role_and_failure(tmp_path):
    journal = FakeJournal(str(tmp_path / "journal.sock"))
    env = JournaledDaemon(str(tmp_path / "project"))
    env.journal_socket = journal.path
    try:
        env.start()
        env.drop("story.toml", env.job_text("story", num_steps=10, every=5, step_seconds=0.01,
                                            crash_at_step=5, crash_times=1))
        env.drop("other.toml", env.job_text("other", num_steps=5, every=5, step_seconds=0.01))
        env.wait_state("story", "succeeded", 90)
        env.wait_state("other", "succeeded", 90)

        def story_done():
            entries = journal.of("story")
            return entries if any(e.get("ODDAEMON_STATE") == "succeeded" for e in entries) else None

        story = wait_for(story_done, 30, what="the journal entry of story's success")
        messages = [e["MESSAGE"] for e in story]
        assert all(e["SYSLOG_IDENTIFIER"] == "oddaemon" and e["PRIORITY"] in "34567" for e in story)
        assert all("story" in m and "other" not in m for m in messages), messages
        states = [e["ODDAEMON_STATE"] for e in story if "ODDAEMON_STATE" in e]
        assert states[0] == "queued" and "backoff" in states and states[-1] == "succeeded", states
        backoff = next(e for e in story if e.get("ODDAEMON_STATE") == "backoff")
        assert backoff["ODDAEMON_FAILURE"] and backoff["ODDAEMON_ATTEMPT"] == "1", backoff
        started = [e for e in story if e.get("ODDAEMON_ROLE") == "train" and "worker started" in e["MESSAGE"]]
        exited = [e for e in story if e.get("ODDAEMON_ROLE") == "train" and "worker exited" in e["MESSAGE"]]
        assert len(started) == 2 and len(exited) == 2, messages
        assert exited[0].get("ODDAEMON_FAILURE") == backoff["ODDAEMON_FAILURE"] and "ODDAEMON_FAILURE" not in exited[1]
        assert any(e.get("ODDAEMON_ROLE") == "eval" for e in story), messages  # the evaluator's start or exit
        assert all(e["CODE_FILE"].endswith(".py") and e["CODE_LINE"].isdigit() for e in story)
        assert journal.of("other") and all("other" in e["MESSAGE"] for e in journal.of("other"))
        # daemon-wide lines are in the journal too, without a job
        assert any(e["MESSAGE"].startswith("INFO ready: spool ") and "ODDAEMON_JOB" not in e
                   for e in journal.entries)
    finally:
        env.close()
        journal.close()
    # every record went to the journal socket; the stream kept nothing of them
    log = env.daemon_log()
    assert "job story:" not in log, log[-3000:]


def test_without_the_journal_stream_the_daemon_logs_plain_lines(tmp_path):
    journal = FakeJournal(str(tmp_path / "journal.sock"))
    env = JournaledDaemon(str(tmp_path / "project"))
    env.journal_socket = journal.path
    try:
        # JOURNAL_STREAM names another file: a stderr redirected since systemd started us
        other = tmp_path / "elsewhere"
        other.write_bytes(b"")
        st = os.stat(other)
        os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
        try:
            DaemonEnv.start(env)
        finally:
            del os.environ["JOURNAL_STREAM"]
        env.drop("plain.toml", env.job_text("plain", num_steps=5, every=5, step_seconds=0.01))
        env.wait_state("plain", "succeeded", 90)
        wait_for(lambda: "job plain: running -> " in env.daemon_log(), 30, what="plain lines on stderr")
    finally:
        env.close()
        journal.close()
    assert journal.entries == []
    assert "INFO job plain: train worker started (pid " in env.daemon_log()
