"""The stand-in's tasks of a several-node Slurm job (``[slurm] nodes = N``: one task per node, started
by ``srun``, ``core/slurm.py``): each task records what it sees in
``model_dir/.standin-tasks/task-<SLURM_PROCID>.json`` (its rank, node, host name, the job's node list),
and only task 0, the chief, trains and writes checkpoints and event files, as the real worker under
MultiWorkerMirroredStrategy. The other tasks wait for the chief to finish (``chief-done`` holding the
Slurm job id), for the warning signal (then they leave with 0: the chief's exit is the job's) or
SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import time

from oddaemon.testing.standin_core import Terminated, err, sleep

RECORDS = ".standin-tasks"
FOLLOWER_TIMEOUT_SECONDS = 3600.0


def tasks(environ) -> tuple[int, int]:
    """(this task's rank, number of tasks) from srun's environment; (0, 1) outside a job step."""
    try:
        return int(environ.get("SLURM_PROCID", 0)), int(environ.get("SLURM_NTASKS", 1))
    except ValueError:
        return 0, 1


def _done_path(model_dir: str) -> str:
    return os.path.join(model_dir, RECORDS, "chief-done")


def record(model_dir: str, rank: int, count: int) -> None:
    """Write what this task sees (atomically; one file per task)."""
    directory = os.path.join(model_dir, RECORDS)
    os.makedirs(directory, exist_ok=True)
    seen = {"procid": rank, "ntasks": count, "nodeid": os.environ.get("SLURM_NODEID"),
            "nodename": os.environ.get("SLURMD_NODENAME"), "hostname": socket.gethostname(),
            "job_nodelist": os.environ.get("SLURM_JOB_NODELIST"), "job_id": os.environ.get("SLURM_JOB_ID"),
            "port_base": os.environ.get("ODDAEMON_SLURM_PORT_BASE"), "pid": os.getpid()}
    path = os.path.join(directory, f"task-{rank}.json")
    with open(f"{path}.tmp", "w", encoding="utf-8") as out:
        json.dump(seen, out)
    os.replace(f"{path}.tmp", path)
    err(f"standin: task {rank} of {count} on {seen['nodename'] or seen['hostname']}")


def chief_done(model_dir: str) -> None:
    """The chief finished training (the followers may leave)."""
    with open(_done_path(model_dir), "w", encoding="utf-8") as out:
        out.write(os.environ.get("SLURM_JOB_ID", ""))


def follow(model_dir: str, rank: int) -> int:
    """A task other than the chief: no checkpoints, no event files; wait for the chief's end."""
    warned: list[int] = []

    def on_warning(signum, frame) -> None:
        # said at once, in the handler: the chief saves and exits at the same moment, and srun then
        # sends this task SIGTERM, which may come before the loop below looks again (a busy machine);
        # Python runs the handlers of pending signals in signal-number order: this one first
        warned.append(signum)
        err(f"standin: task {rank}: the cluster's warning signal; the chief saves the checkpoint")

    signal.signal(signal.SIGUSR2, on_warning)
    job_id = os.environ.get("SLURM_JOB_ID", "")
    deadline = time.monotonic() + FOLLOWER_TIMEOUT_SECONDS
    try:
        while time.monotonic() < deadline:
            if warned:
                return 0
            try:
                with open(_done_path(model_dir), encoding="utf-8") as f:
                    if f.read() == job_id:
                        err(f"standin: task {rank}: the chief finished")
                        return 0
            except OSError:
                pass
            sleep(0.1)
    except Terminated:
        err(f"standin: task {rank}: SIGTERM received, exiting")
        return 143
    err(f"standin: task {rank}: the chief did not finish in {FOLLOWER_TIMEOUT_SECONDS:.0f}s")
    return 1
