"""Per-job cgroups with the real daemon and the stand-in, on this host's real cgroups (README "Per-job
cgroups"): each worker in its own group with its limits, a worker past its memory_max killed alone
and recorded host-oom while another job and the daemon carry on, the metrics read from the groups.

Needs root and a writable cgroup hierarchy (v1 memory, or a delegated v2 subtree); skipped otherwise.
Every group a daemon made is gone when its test ends (checked, and removed if not)."""

from __future__ import annotations

import os
import re

import pytest

from oddaemon.adapters import cgroups
from oddaemon.core import cgroup_text
from tests.support.harness import DaemonEnv, scrape, wait_for
from tests.support.prom import free_port

MiB = 1024 * 1024


def _probe() -> tuple[str, str]:
    with open("/proc/self/cgroup") as f:
        if not os.path.isdir("/sys/fs/cgroup/memory") or "memory" not in cgroup_text.proc_cgroups(f.read()):
            return "none", "not a cgroup v1 host (v2 is covered by tests/unit/test_cgroup_adapter.py)"
    backend = cgroups.detect("v1")  # (never "auto": on v2 it could move this process into a leaf)
    backend.close()  # (the probe's own oddaemon-PID directories)
    return backend.kind, getattr(backend, "reason", "")


KIND, WHY = _probe() if os.geteuid() == 0 else ("none", "not root")
needs_cgroups = pytest.mark.skipif(KIND != "v1", reason=f"no writable cgroup v1 memory hierarchy here: {WHY}")


def own_dir(controller: str) -> str:
    with open("/proc/self/cgroup") as f:
        path = cgroup_text.proc_cgroups(f.read())[controller]
    return os.path.normpath(os.path.join(os.path.realpath(f"/sys/fs/cgroup/{controller}"), path.lstrip("/")))


def base(env: DaemonEnv, controller: str = "memory") -> str:
    """The daemon's directory in a v1 hierarchy (its workers' groups are below it)."""
    return os.path.join(own_dir(controller), f"oddaemon-{env.proc.pid}")


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def group_pids(env: DaemonEnv, name: str, role: str) -> list[int]:
    try:
        return cgroup_text.procs(read(os.path.join(base(env), f"job-{name}-{role}", "cgroup.procs")))
    except OSError:
        return []


@pytest.fixture
def env(daemon_env):
    """A daemon with per-job cgroups; at the end none of its cgroup directories is left."""
    daemon_env.write_config(max_cpu_jobs=2)
    made: list[str] = []
    original = daemon_env.start

    def start(**cgroups_keys):
        with open(daemon_env.config_path, "a") as f:
            f.write("[cgroups]\n" + "".join(f"{k} = {v!r}\n".replace("'", '"') for k, v in cgroups_keys.items()))
        original()
        if KIND == "v1":
            made.extend(base(daemon_env, c) for c in ("memory", "cpu", "cpuacct"))
        return daemon_env

    daemon_env.start = start
    yield daemon_env
    daemon_env.close()
    left = [d for d in made if os.path.isdir(d)]
    for d in left:  # never leave them on the host, even when the daemon failed to
        for child in os.listdir(d):
            if os.path.isdir(os.path.join(d, child)):
                os.rmdir(os.path.join(d, child))
        os.rmdir(d)
    assert not left, f"the daemon left its cgroups: {left}"


@needs_cgroups
def test_each_worker_runs_in_its_own_cgroup_with_its_limits(env):
    env.start()
    assert "per-job cgroups: cgroup v1 under" in env.daemon_log()
    env.drop("lim.toml", env.job_text("lim", num_steps=60, every=20, step_seconds=0.05,
                                      eval_seconds=1.0).replace("[train]\n", '[train]\nmemory_max = "512M"\n'
                                                                "cpu_weight = 300\n").replace(
        "[eval]\n", '[eval]\nmemory_max = "256M"\n'))
    train = wait_for(lambda: group_pids(env, "lim", "train"), 60, what="the train worker in job-lim-train")
    group = os.path.join(base(env), "job-lim-train")
    assert int(read(os.path.join(group, "memory.limit_in_bytes"))) == 512 * MiB
    assert int(read(os.path.join(base(env, "cpu"), "job-lim-train", "cpu.shares"))) == 300 * 1024 // 100
    assert train[0] in cgroup_text.procs(read(os.path.join(base(env, "cpuacct"), "job-lim-train", "cgroup.procs")))
    with open(f"/proc/{train[0]}/cmdline", "rb") as f:
        assert b"train\0--job" in f.read()  # the worker itself (the lifeline exec'd it inside its group)
    wait_for(lambda: group_pids(env, "lim", "eval"), 60, what="the evaluator in job-lim-eval")
    assert int(read(os.path.join(base(env), "job-lim-eval", "memory.limit_in_bytes"))) == 256 * MiB
    # an evaluator on the CPU gets the lower default weight ([cgroups] cpu_eval_cpu_weight = 20)
    assert int(read(os.path.join(base(env, "cpu"), "job-lim-eval", "cpu.shares"))) == 20 * 1024 // 100
    out = env.cli("status", "lim")
    assert re.search(r"resources  train: cpu [0-9.]+ s, memory .* of 512 MiB, cpu weight 300", out.stdout), out.stdout
    env.wait_state("lim", "succeeded", 120)
    wait_for(lambda: not os.path.exists(group) and not os.path.exists(os.path.join(base(env), "job-lim-eval")), 30,
             what="the job's cgroups to be removed after its workers exited")
    assert re.search(r"==== oddaemon: train attempt 1 ended: exit status 0, peak memory [0-9.]+ MiB",
                     read(os.path.join(env.logs, "lim", "train.log")))


@needs_cgroups
def test_a_worker_past_its_memory_max_is_killed_alone_and_recorded_host_oom(env):
    env.start()
    env.drop("calm.toml", env.job_text("calm", num_steps=150, every=50, step_seconds=0.04))
    env.drop("hog.toml", env.job_text("hog", num_steps=50, every=10, step_seconds=0.02, allocate_mib_at_step=3,
                                      allocate_mib=1024).replace("[train]\n", '[train]\nmemory_max = "128M"\n'
                                                                "max_restarts = 1\n"))
    job = env.wait_state("hog", "failed", 120)
    assert job["failure"]["kind"] == "host-oom", job
    assert re.search(r"job hog used 12[0-9](\.\d)? MiB of its 128 MiB memory_max: the kernel's OOM killer ended its "
                     r"training worker", job["reason"]), job["reason"]
    backoff = [h for h in job["history"] if h["state"] == "backoff"]
    assert backoff and "memory_max" in backoff[0]["reason"]  # restarted once, as any retryable failure; peak kept
    assert job["attempt"] == 2
    calm = env.job("calm")
    assert calm["state"] == "running" and calm["restarts"] == 0, calm  # the neighbour never noticed
    assert env.answers()
    assert env.wait_state("calm", "succeeded", 120)["restarts"] == 0
    assert "oom" in env.cli("status", "hog").stdout



def sample(text: str, metric: str, name: str, role: str) -> float | None:
    m = re.search(rf'^{metric}{{job_name="{name}",role="{role}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else None


@needs_cgroups
def test_metrics_show_each_workers_cpu_and_memory_as_its_cgroup_files_say(env):
    port = free_port()
    env.write_config(metrics_listen=f"127.0.0.1:{port}", max_cpu_jobs=2)
    env.start(train_memory_max="300M")
    env.drop("m.toml", env.job_text("m", num_steps=400, every=100, step_seconds=0.05, allocate_mib_at_step=2,
                                    allocate_mib=40))
    wait_for(lambda: group_pids(env, "m", "train"), 60, what="the train worker in its cgroup")
    wait_for(lambda: "holding 40 MiB" in read(os.path.join(env.logs, "m", "train.log")), 60, what="the allocation")
    text = wait_for(lambda: (lambda t: t if sample(t, "oddaemon_job_cpu_seconds_total", "m", "train") else None)(
        scrape(port)), 30, what="the worker's CPU time in the metrics")
    group = os.path.join(base(env), "job-m-train")
    after = {"cpu": int(read(os.path.join(base(env, "cpuacct"), "job-m-train", "cpuacct.usage"))) / 1e9,
             "memory": int(read(os.path.join(group, "memory.usage_in_bytes"))),
             "peak": int(read(os.path.join(group, "memory.max_usage_in_bytes")))}
    assert 0 < sample(text, "oddaemon_job_cpu_seconds_total", "m", "train") <= after["cpu"]
    assert sample(text, "oddaemon_job_memory_max_bytes", "m", "train") == 300 * MiB  # the daemon's default
    assert 40 * MiB <= sample(text, "oddaemon_job_memory_peak_bytes", "m", "train") <= after["peak"]
    memory = sample(text, "oddaemon_job_memory_bytes", "m", "train")
    assert 40 * MiB <= memory and abs(memory - after["memory"]) < 16 * MiB, (memory, after)  # it holds its 40 MiB
    assert 'oddaemon_cgroups{backend="v1"} 1.0' in text
    env.ask("cancel", name="m")
    env.wait_state("m", ("cancelled", "failed", "succeeded"), 60)
    wait_for(lambda: sample(scrape(port), "oddaemon_job_memory_bytes", "m", "train") is None, 30,
             what="the exited worker to leave the metrics")


def test_a_job_asking_above_the_daemons_ceiling_is_rejected_with_the_key_named(env):
    """(Any backend: the ceilings are the daemon's configuration, checked when the file is taken.)"""
    env.start(memory_max_ceiling="1G", cpu_weight_ceiling=500)
    env.drop("big.toml", env.job_text("big", num_steps=5).replace("[train]\n", '[train]\nmemory_max = "2G"\n'
                                                                  "cpu_weight = 501\n"))
    wait_for(lambda: "big.toml.error" in env.rejected(), 30, what="the job file to be rejected")
    error = read(os.path.join(env.spool, "rejected", "big.toml.error"))
    assert "[train] memory_max: '2G' is above this daemon's ceiling of 1 GiB ([cgroups] memory_max_ceiling" in error
    assert "[train] cpu_weight: 501 is above this daemon's ceiling of 500 ([cgroups] cpu_weight_ceiling" in error
    env.drop("fits.toml", env.job_text("fits", num_steps=5).replace("[train]\n", '[train]\nmemory_max = "1G"\n'))
    assert env.wait_state("fits", "succeeded", 60)["state"] == "succeeded"
