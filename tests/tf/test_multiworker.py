"""The several-node train worker without Slurm: two real TF train workers on this machine, each with
the environment srun gives a task of a two-task step (SLURM_PROCID 0 and 1, SLURM_STEP_NUM_TASKS 2,
SLURM_STEP_NODELIST localhost, SLURM_STEP_TASKS_PER_NODE 2: SlurmClusterResolver's inputs, so the
two listen on port_base and port_base + 1 of localhost), train the tiny SSD a few steps under
MultiWorkerMirroredStrategy on the CPU. The chief writes the checkpoints and event files; the other
task's temporary ones are gone at the end."""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys

import pytest

from oddaemon.core.jobspec import TrainOptions
from tests.support.harness import wait_for
from tests.tf.test_workers import REPO, checkpoint_steps, data, make_spec, write_job  # noqa: F401 - fixture

pytestmark = pytest.mark.slow
STEPS = 6
EVERY_N = 3


def _two_free_ports() -> int:
    """A port p with p and p + 1 free (the two tasks' ports on one node)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise AssertionError("no two adjacent free ports")


def _start_tasks(job: str, tmp_path) -> tuple[list, list]:
    port = _two_free_ports()
    procs, logs = [], []
    for rank in (0, 1):
        env = dict(os.environ, PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", SLURM_PROCID=str(rank),
                   SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost",
                   SLURM_JOB_NODELIST="localhost", SLURM_STEP_TASKS_PER_NODE="2", SLURM_NODEID="0",
                   ODDAEMON_SLURM_PORT_BASE=str(port), TF_NUM_INTEROP_THREADS="1", TF_NUM_INTRAOP_THREADS="1")
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        log = open(tmp_path / f"task{rank}.log", "w+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", "oddaemon.workers", "train", "--job", job], cwd=REPO,
                                      env=env, stdout=log, stderr=subprocess.STDOUT))
    return procs, logs


def _read(log) -> str:
    log.seek(0)
    return log.read()


def _end(procs, logs) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    for log in logs:
        log.close()


def test_two_tasks_train_under_multi_worker_mirrored_strategy_and_only_the_chief_writes(data, tmp_path):  # noqa: F811
    model_dir = tmp_path / "model"
    spec = make_spec(data, model_dir, num_steps=STEPS, total_steps=STEPS, warmup_steps=1, batch_size=2,
                     train_input_path=(data["train"],),
                     train=TrainOptions(gpus=0, checkpoint_every_n=EVERY_N, checkpoint_max_to_keep=20))
    procs, logs = _start_tasks(write_job(tmp_path / "job.json", spec), tmp_path)
    try:
        wait_for(lambda: all(p.poll() is not None for p in procs), 900, 1.0, what="both tasks to finish")
        outputs = [_read(log) for log in logs]
        assert [p.returncode for p in procs] == [0, 0], "\n=====\n".join(o[-4000:] for o in outputs)
    finally:
        _end(procs, logs)
    chief, other = outputs
    assert "Slurm task 0 of 2 (MultiWorkerMirroredStrategy)" in chief
    assert "Slurm task 1 of 2 (MultiWorkerMirroredStrategy)" in other
    assert f"training finished at step {STEPS}" in chief
    assert f"Slurm task 1 finished at step {STEPS}" in other
    steps = sorted(checkpoint_steps(model_dir).values())
    assert steps == [0, 3, 6], steps  # the chief's checkpoints, on the cadence
    assert glob.glob(str(model_dir / "train" / "events.out.tfevents.*"))  # the chief's event file
    assert not glob.glob(str(model_dir / "**" / "temp_worker_*"), recursive=True)  # the other's: removed


def test_on_the_warning_signal_the_chief_saves_and_asks_to_be_requeued(data, tmp_path):  # noqa: F811
    """srun forwards the batch shell's SIGUSR2 to every task (here: to task 1 only, the hardest case):
    the tasks agree to stop between the same two iterations, all save (a collective), the chief into
    model_dir, then it exits 75 (requeue) and the other task 0."""
    model_dir = tmp_path / "model"
    spec = make_spec(data, model_dir, num_steps=5000, total_steps=5000, warmup_steps=1, batch_size=2,
                     train_input_path=(data["train"],),
                     train=TrainOptions(gpus=0, checkpoint_every_n=EVERY_N, checkpoint_max_to_keep=20))
    procs, logs = _start_tasks(write_job(tmp_path / "job.json", spec), tmp_path)
    try:
        def second_checkpoint() -> bool:
            assert all(p.poll() is None for p in procs), "\n=====\n".join(_read(log)[-3000:] for log in logs)
            return (model_dir / "checkpoint").exists() and max(checkpoint_steps(model_dir).values()) >= EVERY_N

        wait_for(second_checkpoint, 600, 0.5, what="the checkpoint of step 3")
        procs[1].send_signal(signal.SIGUSR2)  # the chief hears of it from task 1, through the collective
        assert procs[0].wait(timeout=300) == 75, _read(logs[0])[-4000:]
        assert procs[1].wait(timeout=120) == 0, _read(logs[1])[-4000:]
    finally:
        _end(procs, logs)
    (line,) = [x for x in _read_file(tmp_path / "task0.log").splitlines()
               if x.startswith("oddaemon-failure: requeued: saved a checkpoint at step")]
    step = int(line.split("at step ")[1].split()[0])
    assert max(checkpoint_steps(model_dir).values()) == step >= EVERY_N
    assert "saved with the chief on the cluster's warning" in _read_file(tmp_path / "task1.log")
    assert not glob.glob(str(model_dir / "**" / "temp_worker_*"), recursive=True)


def _read_file(path) -> str:
    with open(path) as f:
        return f.read()
