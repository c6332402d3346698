"""[slurm] nodes = N: validation against the daemon's [slurm] max_nodes, sbatch's one task per node,
and the batch script that starts the tasks with srun (run here with a fake srun that starts the
tasks as srun would: SLURM_PROCID 0..N-1, the same command, the signal forwarded to each)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace

from oddaemon.core import slurm
from oddaemon.core.config import parse_config
from oddaemon.core.jobspec import JobSpec
from tests.support.harness import wait_for
from tests.unit.test_jobspec import BASE, ctx, parse, tree  # noqa: F401 - its fixtures

SETTINGS = slurm.SlurmSettings(partition="gpu", port_base=9100)


def test_nodes_up_to_the_daemons_max_nodes_are_accepted(tree, ctx):  # noqa: F811 - fixtures
    def _parse(text: str, _unused, max_nodes: int):
        return parse(text, tree, replace(ctx, slurm_max_nodes=max_nodes))

    tmp_path = None
    good = _parse(BASE + "[slurm]\nnodes = 4\n", tmp_path, 4)
    assert isinstance(good, JobSpec) and good.slurm.nodes == 4
    for bad in ("5", "0", "-1", "2.0", '"2"', "true"):
        problems = _parse(BASE + f"[slurm]\nnodes = {bad}\n", tmp_path, 4)
        assert isinstance(problems, list), bad
        texts = [p.render() for p in problems]
        assert any("[slurm] nodes: must be a whole number of Slurm nodes from 1 to 4 (this daemon's [slurm] "
                   "max_nodes)" in t for t in texts), texts
    default = _parse(BASE + "[slurm]\nnodes = 2\n", tmp_path, 1)  # the default max_nodes: one node
    assert isinstance(default, list) and "from 1 to 1" in default[0].render()


def test_max_nodes_and_port_base_are_daemon_settings():
    config = parse_config("[slurm]\nmax_nodes = 8\nport_base = 12000\n", "/etc/oddaemon.toml")
    assert config.slurm_max_nodes == 8 and config.validation_context().slurm_max_nodes == 8
    assert config.slurm_settings().port_base == 12000
    assert parse_config("", "/etc/oddaemon.toml").slurm_max_nodes == 1


def test_sbatch_asks_for_one_task_per_node():
    argv = slurm.sbatch_argv(SETTINGS, "big", "train", 2, "/w/s.sh", "/log/big/train.log", nodes=3)
    assert "--nodes=3" in argv and "--ntasks-per-node=1" in argv and "--gres=gpu:2" in argv
    single = slurm.sbatch_argv(SETTINGS, "one", "train", 1, "/w/s.sh", "/log/one/train.log")
    assert "--nodes=1" in single and not any(a.startswith("--ntasks") for a in single)


def test_one_node_batch_script_has_no_srun():
    text = slurm.batch_script(["python", "-m", "w"], {}, "/w")
    assert "srun" not in text and slurm.PORT_BASE_VARIABLE not in text


FAKE_SRUN = """#!/usr/bin/env python3
# srun as far as the batch script needs it: N tasks of the same command, SLURM_PROCID set, the
# warning signal forwarded to each task, the highest exit status returned.
import os, signal, subprocess, sys
args = sys.argv[1:]
nodes = int(next(a for a in args if a.startswith("--nodes=")).split("=")[1])
command = args[args.index("bash"):]
tasks = [subprocess.Popen(command, env=dict(os.environ, SLURM_PROCID=str(i), SLURM_NTASKS=str(nodes)))
         for i in range(nodes)]
signal.signal(signal.SIGUSR2, lambda s, f: [t.send_signal(s) for t in tasks])
sys.exit(max(t.wait() for t in tasks))
"""

TASK = """import os, signal, sys, time
rank = os.environ["SLURM_PROCID"]
print("task", rank, "port", os.environ["ODDAEMON_SLURM_PORT_BASE"], flush=True)
open(f"started-{rank}", "w").close()
warned = []
signal.signal(signal.SIGUSR2, lambda s, f: warned.append(s))
deadline = time.monotonic() + 60
while not warned and time.monotonic() < deadline:
    time.sleep(0.05)
print("task", rank, "warned", flush=True)
sys.exit(75 if rank == "0" else 0)
"""


def _script(tmp_path, code: str) -> tuple[str, dict]:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text(FAKE_SRUN)
    (bindir / "srun").chmod(0o755)
    (tmp_path / "task.py").write_text(code)
    text = slurm.batch_script([sys.executable, str(tmp_path / "task.py")], {"PYTHONUNBUFFERED": "1"},
                              str(tmp_path), nodes=2, role="train", port_base=9100)
    (tmp_path / "batch.sh").write_text(text)
    return text, dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}")


def test_the_batch_script_runs_a_task_per_node_forwards_the_warning_and_exits_with_the_chiefs_status(tmp_path):
    _text, env = _script(tmp_path, TASK)
    with open(tmp_path / "chief.log", "w") as out:
        batch = subprocess.Popen(["bash", str(tmp_path / "batch.sh")], stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_for(lambda: (tmp_path / "started-0").exists() and (tmp_path / "started-1").exists(), 60,
                     what="both tasks to start")
            time.sleep(0.3)  # the traps are set before the tasks start; this is only for the tasks' handlers
            batch.send_signal(signal.SIGUSR2)  # Slurm's --signal=B:USR2@N reaches the batch shell
            assert batch.wait(timeout=60) == 75  # the chief's requeue status, though task 1 exited 0
        finally:
            if batch.poll() is None:
                batch.kill()
                batch.wait()
    chief = (tmp_path / "chief.log").read_text()
    other = (tmp_path / "slurm-train-task1.log").read_text()
    assert "task 0 port 9100" in chief and "task 0 warned" in chief and "task 1" not in chief
    assert "task 1 port 9100" in other and "task 1 warned" in other
    assert (tmp_path / "slurm-train.chief-exit").read_text().strip() == "75"


def test_without_a_chief_status_the_batch_script_exits_with_sruns(tmp_path):
    failing = textwrap.dedent("""\
        import os, sys
        sys.exit(0 if os.environ["SLURM_PROCID"] == "0" else 3)
        """)
    _text, env = _script(tmp_path, failing)
    (tmp_path / "slurm-train.chief-exit").write_text("75\n")  # a previous attempt's: removed first
    done = subprocess.run(["bash", str(tmp_path / "batch.sh")], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0  # the chief's 0 counts, not task 1's 3
    (tmp_path / "task.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "slurm-train.chief-exit").unlink()
    done = subprocess.run(["bash", str(tmp_path / "batch.sh")], env=env, capture_output=True, timeout=60)
    assert done.returncode != 0


def test_a_task_of_a_several_task_step_is_read_from_sruns_environment():
    from oddaemon.workers import multiworker  # noqa: PLC0415 - no tensorflow: importing it costs nothing

    assert multiworker.tasks_per_node("2(x3),1") == [2, 2, 2, 1] and multiworker.tasks_per_node("1") == [1]
    env = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
           slurm.PORT_BASE_VARIABLE: "9100"}
    task = multiworker.slurm_task(env)
    assert task == multiworker.Task(rank=1, count=2, max_per_node=1, port_base=9100) and not task.chief
    assert multiworker.slurm_task({**env, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one task: no MWMS
    assert multiworker.slurm_task({"SLURM_NTASKS": "4"}) is None  # the batch shell, not a step's task
    assert multiworker.slurm_task({k: v for k, v in env.items() if k != slurm.PORT_BASE_VARIABLE}).port_base == 8888
    assert multiworker.temporary_dirs("/m", 1) == ["/m/temp_worker_001", "/m/train/temp_worker_001"]
