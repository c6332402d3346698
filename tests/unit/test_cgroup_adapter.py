"""The cgroup adapter (adapters/cgroups.py) on fake trees laid out as cgroup v2 (a delegated service
subtree) and as cgroup v1 (memory, cpu, cpuacct hierarchies): what is detected and why not, the daemon's
leaf, the limits written, the numbers read; and the placement of a worker before it execs (procs.spawn
with the lifeline holding)."""

from __future__ import annotations

import os
import sys
import time

import pytest

from oddaemon.adapters import cgroups
from oddaemon.adapters.procs import spawn, worker_environment
from oddaemon.core.resources import Limits
from tests.support.harness import wait_for

G = 1024**3
SERVICE = "/system.slice/oddaemon.service"


def put(path, content: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)


@pytest.fixture
def v2(tmp_path):
    root = tmp_path / "cgroup"
    put(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    service = root / SERVICE.lstrip("/")
    put(service / "cgroup.controllers", "cpu io memory pids\n")
    put(service / "cgroup.subtree_control", "")
    put(service / "cgroup.procs", "4242\n")
    return root, service


def test_v2_a_delegated_subtree_puts_the_daemon_in_its_leaf_and_enables_the_controllers(v2):
    root, service = v2
    backend = cgroups.detect("auto", str(root), f"0::{SERVICE}\n", euid=998, pid=4242)  # User=oddaemon
    assert backend.kind == "v2", getattr(backend, "reason", "")
    assert (service / "daemon" / "cgroup.procs").read_text() == "4242"
    assert (service / "cgroup.subtree_control").read_text() == "+memory +cpu +io"
    assert backend.daemon_group().dir() == str(service / "daemon")
    assert backend.describe() == f"per-job cgroups: cgroup v2 under {service}"
    group = backend.create("effdet", "train", Limits(8 * G, 300))
    assert group.dir() == str(service / "job-effdet-train")
    assert (service / "job-effdet-train" / "memory.max").read_text() == str(8 * G)
    backend.place(group, 5151)
    assert (service / "job-effdet-train" / "cgroup.procs").read_text() == "5151"


def test_v2_numbers_are_read_from_the_groups_files(v2):
    root, service = v2
    d = service / "job-effdet-train"
    for name, content in {"memory.current": "1073741824\n", "memory.peak": "2147483648\n", "memory.max": "max\n",
                          "cpu.stat": "usage_usec 2500000\nuser_usec 2000000\n",
                          "memory.events": "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n",
                          "io.stat": "8:0 rbytes=100 wbytes=50 rios=1 wios=1\n",
                          "memory.pressure": "some avg10=0.00 avg60=0.00 avg300=0.00 total=1500000\n",
                          "cpu.weight": "300\n"}.items():
        put(d / name, content)
    group = cgroups.Group("v2", "job-effdet-train", (("", str(d)),))
    assert cgroups.read_usage(group) == {
        "cpu_seconds": 2.5, "memory_bytes": G, "memory_peak_bytes": 2 * G, "memory_max_bytes": None, "oom_kills": 1,
        "io_read_bytes": 100, "io_write_bytes": 50, "memory_pressure_seconds": 1.5, "cpu_weight": 300}
    (d / "memory.peak").unlink()  # before Linux 5.19
    assert cgroups.read_usage(group)["memory_peak_bytes"] is None
    gone = cgroups.Group("v2", "job-x-train", (("", str(service / "job-x-train")),))
    assert cgroups.read_usage(gone) is None  # removed: the worker exited


@pytest.mark.parametrize("mode, euid, controllers, why", [
    ("auto", 0, "cpu io memory", "is not delegated to this daemon: run it as a systemd service with Delegate=yes"),
    ("auto", 998, "cpu io", "the memory controller is not available in the cgroup v2 subtree"),
    ("off", 998, "cpu io memory", '[cgroups] mode = "off"'),
    ("v1", 998, "cpu io memory", '[cgroups] mode = "v1", but'),
])
def test_v2_why_not(v2, mode, euid, controllers, why):
    root, service = v2
    put(service / "cgroup.controllers", controllers)
    backend = cgroups.detect(mode, str(root), f"0::{SERVICE}\n", euid=euid, pid=4242)
    assert backend.kind == "none" and why in backend.reason, backend.reason
    assert backend.create("effdet", "train", Limits(G, 100)) is None  # workers then run as before
    assert backend.describe().startswith("per-job cgroups off: ")
    assert not (service / "daemon").exists()


def test_v2_a_root_daemon_may_be_told_its_subtree_is_delegated(v2):
    root, _ = v2
    assert cgroups.detect("v2", str(root), f"0::{SERVICE}\n", euid=0, pid=4242).kind == "v2"


@pytest.fixture
def v1(tmp_path):
    root = tmp_path / "cgroup"
    own = root / "memory" / "process_api" / "abc"
    own.mkdir(parents=True)
    (root / "cpu").mkdir()
    (root / "cpuacct").mkdir()
    (root / "unified").mkdir()  # hybrid: an empty cgroup2 there, no cgroup.controllers at the root
    (own / "oddaemon-999999999").mkdir()  # a daemon that is gone left it
    (own / "oddaemon-999999999" / "job-old-train").mkdir()
    return root, own


V1_PROC = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpuacct:/\n1:cpu:/\n0::/\n"


def test_v1_a_root_daemon_gets_a_directory_of_its_own_in_each_hierarchy(v1):
    root, own = v1
    backend = cgroups.detect("auto", str(root), V1_PROC, euid=0, pid=4242)
    assert backend.kind == "v1", getattr(backend, "reason", "")
    assert backend.bases == {"memory": str(own / "oddaemon-4242"), "cpu": str(root / "cpu" / "oddaemon-4242"),
                             "cpuacct": str(root / "cpuacct" / "oddaemon-4242")}
    assert not (own / "oddaemon-999999999").exists()  # the gone daemon's is swept
    assert backend.daemon_group() is None  # (no daemon leaf on v1)
    group = backend.create("effdet", "eval", Limits(2 * G, 20))
    memory = own / "oddaemon-4242" / "job-effdet-eval"
    assert (memory / "memory.limit_in_bytes").read_text() == str(2 * G)
    assert (root / "cpu" / "oddaemon-4242" / "job-effdet-eval" / "cpu.shares").read_text() == "204"
    backend.place(group, 5151)
    for d in group.unique_dirs():
        assert open(os.path.join(d, "cgroup.procs")).read() == "5151"
    put(memory / "memory.usage_in_bytes", "1073741824\n")
    put(memory / "memory.max_usage_in_bytes", "1610612736\n")
    put(memory / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    put(root / "cpuacct" / "oddaemon-4242" / "job-effdet-eval" / "cpuacct.usage", "3000000000\n")
    assert cgroups.read_usage(group) == {
        "cpu_seconds": 3.0, "memory_bytes": G, "memory_peak_bytes": int(1.5 * G), "memory_max_bytes": 2 * G,
        "oom_kills": 2, "io_read_bytes": None, "io_write_bytes": None, "memory_pressure_seconds": None,
        "cpu_weight": 20}


def test_v1_needs_root(v1):
    root, _ = v1
    backend = cgroups.detect("auto", str(root), V1_PROC, euid=998, pid=4242)
    assert backend.kind == "none" and "written by root only (this daemon runs as uid 998)" in backend.reason


def test_v1_without_a_memory_hierarchy(tmp_path):
    backend = cgroups.detect("auto", str(tmp_path), V1_PROC, euid=0, pid=1)
    assert backend.kind == "none" and "no cgroup v1 memory hierarchy" in backend.reason


def test_spawn_places_the_worker_before_it_execs(tmp_path):
    """``place(pid)`` runs while the lifeline still holds (its command line is the lifeline's, not the
    worker's): the worker never runs a single instruction outside its cgroup."""
    seen = []

    def cmdline(pid: int) -> list[bytes]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")

    def place(pid: int) -> None:
        # (the lifeline may still be inside execve, its command line not set up yet: empty)
        seen.append(wait_for(lambda: [part for part in cmdline(pid) if part] or None, 10, 0.001,
                             what="the lifeline's command line"))
        time.sleep(0.2)  # the worker must still wait
        seen.append(cmdline(pid))

    out = tmp_path / "ran"
    worker = spawn("effdet", "train", 1, [sys.executable, "-c", f"open({str(out)!r}, 'w').write('yes')"],
                   worker_environment(dict(os.environ), ()), str(tmp_path), time.time(), place=place)
    try:
        assert worker.popen.wait(30) == 0 and out.read_text() == "yes"
    finally:
        worker.close()
        os.close(worker.output_fd)
    for cmdline in seen:
        assert any(part.endswith(b"lifeline.py") for part in cmdline), cmdline
        assert any(part.startswith(b"--hold=") for part in cmdline), cmdline


def test_a_failed_placement_is_logged_and_the_worker_runs(tmp_path, caplog):
    def place(pid: int) -> None:
        raise PermissionError(13, "Permission denied")

    worker = spawn("effdet", "eval", 1, [sys.executable, "-c", "pass"], worker_environment(dict(os.environ), ()),
                   str(tmp_path), time.time(), place=place)
    try:
        assert worker.popen.wait(30) == 0
    finally:
        worker.close()
        os.close(worker.output_fd)
    assert "cannot put its eval worker" in caplog.text and "Permission denied" in caplog.text
