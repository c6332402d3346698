"""Several Slurm nodes (``[slurm] nodes = N``): the train worker runs as one task per node, started by
``srun`` (``core/slurm.py`` ``batch_script``), under TF's ``MultiWorkerMirroredStrategy`` with the
cluster spec from Slurm (``tf.distribute.cluster_resolver.SlurmClusterResolver``, which reads
``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST`` and ``SLURM_STEP_TASKS_PER_NODE``).

* Ports: task k of a node listens on ``port_base + k`` of that node (one task per node: ``port_base``),
  ``port_base`` from ``[slurm] port_base`` (default 8888), handed over as ``ODDAEMON_SLURM_PORT_BASE``.
* GPUs: each task uses the GPUs Slurm gave its node (``CUDA_VISIBLE_DEVICES`` as Slurm set it: the
  resolver's own GPU assignment is turned off); on CPUs the collectives run over gRPC rings.
* The chief (task 0) writes the checkpoints and event files into model_dir; train_loop makes every
  other task write its own into ``model_dir/temp_worker_NNN`` and ``model_dir/train/temp_worker_NNN``
  and removes them at its end (``remove_temporary``: also what a killed task left).
* The warning signal (srun forwards it to every task): saving is a collective under this strategy
  (the SyncOnRead variables, e.g. batch-norm statistics, are all-reduced as they are written), so all
  tasks must save at the same step. A task's handler only notes the signal; once per train_loop
  iteration (at its ``steps_per_sec`` scalar, which every task writes after every iteration) the
  tasks all-reduce their notes (``agree_on_warning``), and when any task was warned all of them stop
  there together and save: the chief into model_dir, then it exits with the requeue status (the job's);
  the others into their temporary dirs, then exit 0.

Tensorflow is imported only inside ``strategy``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from oddaemon.core.slurm import PORT_BASE_VARIABLE

DEFAULT_PORT_BASE = 8888
_TASKS_PER_NODE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


@dataclass(frozen=True)
class Task:
    """This process's place in a several-task Slurm step."""

    rank: int  # SLURM_PROCID
    count: int  # tasks in the step
    max_per_node: int  # the most tasks any node of the step runs
    port_base: int

    @property
    def chief(self) -> bool:
        return self.rank == 0


def tasks_per_node(text: str) -> list[int]:
    """Slurm's compressed list, e.g. ``"2(x3),1"`` -> [2, 2, 2, 1]. Raises ValueError."""
    counts: list[int] = []
    for part in text.split(","):
        match = _TASKS_PER_NODE.match(part.strip())
        if match is None:
            raise ValueError(f"not a Slurm tasks-per-node list: {text!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def slurm_task(environ: Mapping[str, str]) -> Task | None:
    """This process's task when it is one of several in a Slurm step (srun), else None."""
    try:
        count = int(environ.get("SLURM_STEP_NUM_TASKS") or 1)
        if count <= 1 or "SLURM_PROCID" not in environ:
            return None
        per_node = tasks_per_node(environ.get("SLURM_STEP_TASKS_PER_NODE") or "1")
        return Task(int(environ["SLURM_PROCID"]), count, max(per_node),
                    int(environ.get(PORT_BASE_VARIABLE) or DEFAULT_PORT_BASE))
    except ValueError:
        return None


def strategy(task: Task, gpus: int):
    """MultiWorkerMirroredStrategy over the step's tasks. Create it before any other TF operation
    (the collectives are configured on the eager context's start)."""
    import tensorflow as tf

    per_task = max(1, gpus)  # the resolver needs one "GPU" per task even on CPUs; it sets none (auto_set_gpu)
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=task.port_base, gpus_per_node=per_task * task.max_per_node, gpus_per_task=per_task,
        auto_set_gpu=False)
    # ... and it would then report that one GPU to the strategy: report the task's real count (0 on CPUs)
    resolver.num_accelerators = lambda *args, **kwargs: {"GPU": gpus}
    implementation = (tf.distribute.experimental.CommunicationImplementation.AUTO if gpus
                      else tf.distribute.experimental.CommunicationImplementation.RING)
    return tf.distribute.MultiWorkerMirroredStrategy(
        cluster_resolver=resolver,
        communication_options=tf.distribute.experimental.CommunicationOptions(implementation=implementation))


def temporary_dirs(model_dir: str, rank: int) -> list[str]:
    """Where train_loop makes a task other than the chief write its checkpoints and event files."""
    name = f"temp_worker_{rank:03d}"
    return [os.path.join(model_dir, name), os.path.join(model_dir, "train", name)]


def remove_temporary(model_dir: str, task: Task) -> None:
    if not task.chief:
        for path in temporary_dirs(model_dir, task.rank):
            shutil.rmtree(path, ignore_errors=True)


def agree_on_warning(tf, strategy, warned: Callable[[], bool], stop: Callable[[], BaseException]) -> None:
    """Once per train_loop iteration, in every task: all-reduce whether a task saw the warning signal;
    if one did, raise ``stop()`` in all of them (between the same two iterations)."""
    summary = tf.compat.v2.summary
    scalar = summary.scalar
    if getattr(scalar, "_oddaemon_agreeing", False):
        return

    def agreeing(name, *args, **kwargs):
        if name == "steps_per_sec":
            flag = 1.0 if warned() else 0.0
            votes = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(lambda: tf.constant(flag)), axis=None)
            if float(votes) > 0:
                raise stop()
        return scalar(name, *args, **kwargs)

    agreeing._oddaemon_agreeing = True
    summary.scalar = agreeing
