"""A CPU evaluator beside a CPU trainer runs at a lower priority and with fewer threads
([eval] cpu_nice, cpu_threads): the configuration, the environment and the priority a spawned
worker really gets (its nice value in /proc/<pid>/stat, and its autogroup's)."""

from __future__ import annotations

import os
import signal
import sys
import time

import pytest

from oddaemon.adapters.procs import spawn, thread_limits, worker_environment
from oddaemon.core.config import Config, parse_config
from oddaemon.core.errors import ConfigError

PATH = "/etc/oddaemon/oddaemon.toml"


def nice_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[16])  # field 19 of stat(5); fields[0] is field 3 (state)


def test_the_eval_settings_default_to_the_lowest_priority_and_tf_own_thread_count():
    config = Config(path=None)
    assert (config.eval_cpu_nice, config.eval_cpu_threads) == (19, 0)
    parsed = parse_config("[eval]\ncpu_nice = 5\ncpu_threads = 2\n", PATH)
    assert (parsed.eval_cpu_nice, parsed.eval_cpu_threads) == (5, 2)


@pytest.mark.parametrize("text, message", [
    ("[eval]\ncpu_nice = 20\n", "[eval] cpu_nice in /etc/oddaemon/oddaemon.toml: must be a whole number from 0 to 19"),
    ("[eval]\ncpu_nice = -1\n", "[eval] cpu_nice in /etc/oddaemon/oddaemon.toml: must be a whole number from 0 to 19"),
    ("[eval]\ncpu_threads = 1.5\n", "[eval] cpu_threads in /etc/oddaemon/oddaemon.toml: must be a whole number"),
    ("[eval]\ncpu_nices = 1\n", "unknown key 'cpu_nices' in [eval] of /etc/oddaemon/oddaemon.toml"),
])
def test_bad_eval_settings_are_refused_naming_the_key_and_the_file(text, message):
    with pytest.raises(ConfigError) as caught:
        parse_config(text, PATH)
    assert message in str(caught.value)


def test_thread_limits_hold_tf_and_openmp_to_the_count_and_none_means_no_variable():
    assert thread_limits(0) == {}
    assert thread_limits(1) == {"TF_NUM_INTRAOP_THREADS": "1", "TF_NUM_INTEROP_THREADS": "2", "OMP_NUM_THREADS": "1"}
    assert thread_limits(4)["TF_NUM_INTEROP_THREADS"] == "4"
    env = worker_environment({"PATH": "/bin", "OMP_NUM_THREADS": "64"}, (), thread_limits(2))
    assert env["OMP_NUM_THREADS"] == "2" and env["TF_NUM_INTRAOP_THREADS"] == "2"
    assert "OMP_NUM_THREADS" not in worker_environment({"PATH": "/bin", "OMP_NUM_THREADS": "64"}, ())


def test_a_worker_spawned_with_a_nice_value_runs_with_it_and_so_does_its_autogroup(tmp_path):
    worker = spawn("cats", "eval", 1, [sys.executable, "-c", "import time; time.sleep(30)"],
                   worker_environment(dict(os.environ), ()), str(tmp_path), time.time(), nice=7)
    try:
        assert nice_of(worker.pid) == 7
        try:
            with open(f"/proc/{worker.pid}/autogroup") as f:
                autogroup = f.read()
        except OSError:
            autogroup = None  # a kernel without autogroups
        if autogroup is not None and os.geteuid() == 0:  # (without CAP_SYS_ADMIN it may be rate-limited)
            assert autogroup.split()[-1] == "7", autogroup
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.popen.wait()
        worker.close()
        os.close(worker.output_fd)


def test_a_worker_spawned_without_one_keeps_the_daemons_priority(tmp_path):
    worker = spawn("cats", "train", 1, [sys.executable, "-c", "import time; time.sleep(30)"],
                   worker_environment(dict(os.environ), ()), str(tmp_path), time.time())
    try:
        assert nice_of(worker.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.popen.wait()
        worker.close()
        os.close(worker.output_fd)
