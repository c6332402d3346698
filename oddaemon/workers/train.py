"""``python -m oddaemon.workers train --job JOB.json``: the job's training run, resumable.

Writes the effective config (the ``[pipeline]`` edits applied) to ``model_dir/pipeline.config``,
then runs ``model_lib_v2.train_loop`` on it, the same loop as ``model_main_tf2.py``, under
MirroredStrategy when more than one GPU is visible, or MultiWorkerMirroredStrategy when it is one of
several tasks of a Slurm step (``[slurm] nodes`` > 1, ``workers/multiworker.py``).

Two details of train_loop decide how it is called (see ``plan_phases``):

* It checks the checkpoint cadence and writes the loss scalars only once per
  ``num_steps_per_iteration`` (NSPI) steps, and only when ``global_step % NSPI == 0``; it runs whole
  iterations, so it stops at the first multiple of NSPI past ``train_steps`` (overshooting it), and
  it never saves after its last iteration. So NSPI must divide the cadence, the start step and the
  number of steps to run.
* Checkpoints are numbered by save count (ckpt-1 holds step 0), so steps are read from the
  checkpoints themselves (``checkpoint_step``).

A run is therefore one or two train_loop calls: the cadence phase (NSPI = the largest divisor of
gcd(checkpoint_every_n, start) up to 100, ending on the last cadence point <= num_steps), then, when
num_steps is not on the cadence, a remainder phase that ends exactly at num_steps and saves it. The
remainder phase (and a cadence phase that starts off the cadence, after num_steps was raised) runs
with ``record_summaries=False``: the loss scalars and learning rate are written as always, but not the
input-image summaries, which a small NSPI would otherwise write every few steps.
"""

from __future__ import annotations

import math
import os
import signal
import time
from dataclasses import dataclass

from oddaemon.core.failures import marker_line
from oddaemon.core.slurm import REQUEUE_EXIT
from oddaemon.workers import EXIT_OK, WorkerError, err, load_job, setting

MAX_STEPS_PER_ITERATION = 100  # model_lib_v2.NUM_STEPS_PER_ITERATION
DEFAULT_CHECKPOINT_EVERY_N = 1000
DEFAULT_MAX_TO_KEEP = 7
STEP_VARIABLE = "step/.ATTRIBUTES/VARIABLE_VALUE"  # tf.train.Checkpoint(step=global_step, ...)


@dataclass(frozen=True)
class Phase:
    train_steps: int  # the step this phase ends on
    steps_per_iteration: int
    checkpoint_every_n: int
    record_summaries: bool


def largest_divisor(n: int, cap: int) -> int:
    """The largest d <= cap that divides n (n >= 1)."""
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


def plan_phases(start: int, num_steps: int, every_n: int, cap: int = MAX_STEPS_PER_ITERATION) -> list[Phase]:
    """train_loop calls that take training from ``start`` to exactly ``num_steps``, saving at
    start + k*every_n (as TF counts its cadence: from the step the run started at), at num_steps, and
    at step 0 (train_loop itself saves a fresh model before the first step)."""
    if start >= num_steps:
        return []
    phases = []
    cadence_points = (num_steps - start) // every_n
    cadence_end = start + cadence_points * every_n
    if cadence_points:
        best = largest_divisor(every_n, cap)
        nspi = largest_divisor(math.gcd(every_n, start), cap)
        phases.append(Phase(cadence_end, nspi, every_n, record_summaries=nspi == best))
    if cadence_end < num_steps:
        remainder = num_steps - cadence_end
        nspi = largest_divisor(math.gcd(cadence_end, remainder), cap)
        phases.append(Phase(num_steps, nspi, remainder, record_summaries=False))
    return phases


def checkpoint_step(prefix: str) -> int:
    """The global step stored in a checkpoint written by train_loop."""
    import tensorflow as tf

    return int(tf.train.load_variable(prefix, STEP_VARIABLE))


def latest_checkpoint(model_dir: str) -> str | None:
    import tensorflow as tf

    return tf.train.latest_checkpoint(model_dir) if os.path.isdir(model_dir) else None


def _gpus():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        try:
            tf.config.experimental.set_memory_growth(gpu, True)
        except (RuntimeError, ValueError):
            pass
    return gpus


def strategy_for(gpus):
    import tensorflow as tf

    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()  # the default strategy: GPU:0 when there is one, else the CPU


class RequeueRequested(Exception):
    """The cluster's warning signal (SIGUSR2, ``sbatch --signal=B:USR2@N``) arrived: save and leave."""


_managers: list = []  # the CheckpointManager train_loop creates (captured to save on the warning)


def _capture_checkpoint_managers(tf) -> None:
    """train_loop keeps its CheckpointManager to itself: record each one it creates, so that the
    warning signal can save the model between two training iterations."""
    base = tf.compat.v2.train.CheckpointManager
    if getattr(base, "_oddaemon_capturing", False):
        return

    class Capturing(base):
        _oddaemon_capturing = True

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _managers.append(self)

    tf.compat.v2.train.CheckpointManager = Capturing


def _on_warning(signum, frame) -> None:
    # Python runs this in the main thread between bytecodes: after a training iteration's
    # tf.function returned, never inside it, so the variables are those of a completed step.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # a second one (srun forwards to a process group) waits
    raise RequeueRequested


def _save_and_requeue(model_dir: str) -> int:
    if not _managers:
        raise WorkerError("the cluster's warning signal came before the model was built: nothing to save",
                          REQUEUE_EXIT)
    path = _managers[-1].save()
    err(marker_line("requeued", f"saved a checkpoint at step {checkpoint_step(path)} ({os.path.basename(path)}) "
                                f"{usr2_words()}"))
    return REQUEUE_EXIT


def usr2_words() -> str:
    """What SIGUSR2 was: the cluster's warning before its time limit (a Slurm job), else the local
    daemon's ``oddaemon finish`` (save, then exit)."""
    if os.environ.get("SLURM_JOB_ID"):
        return "on the cluster's warning signal (SIGUSR2) before its time limit"
    return "on SIGUSR2 (oddaemon finish)"


def run(args) -> int:
    early: list[int] = []  # SIGUSR2 before training began: nothing trained yet to save
    signal.signal(signal.SIGUSR2, lambda signum, frame: early.append(signum))
    job = load_job(args.job)
    spec = job["spec"]
    from oddaemon.workers import compat

    compat.configure_logging()
    import tensorflow as tf

    gpus = _gpus()  # memory growth must be set before anything initializes the GPUs
    from oddaemon.workers import multiworker

    task = multiworker.slurm_task(os.environ)  # one of several Slurm tasks: before any other TF op
    strategy = multiworker.strategy(task, len(gpus)) if task else None
    from object_detection import model_lib_v2

    from oddaemon.workers import pipeline

    train_options = spec["train"]
    every_n = int(setting(train_options, "checkpoint_every_n", DEFAULT_CHECKPOINT_EVERY_N))
    max_to_keep = int(setting(train_options, "checkpoint_max_to_keep", DEFAULT_MAX_TO_KEEP))
    model_dir = spec["model_dir"]
    try:
        config_path, proto = pipeline.prepare(spec)
    except pipeline.PipelineError as exc:
        raise WorkerError("; ".join(exc.problems)) from None
    problems, warnings = pipeline.check_effective(proto)
    for warning in warnings:
        err(f"oddaemon.workers train: warning: {warning}")
    if problems:
        raise WorkerError("; ".join(problems))
    num_steps = proto.train_config.num_steps

    latest = latest_checkpoint(model_dir)
    start = 0
    if latest:
        try:
            start = checkpoint_step(latest)
        except (tf.errors.OpError, ValueError) as exc:
            raise WorkerError(f"cannot read the step of the latest checkpoint {latest}: {exc}") from None
    phases = plan_phases(start, num_steps, every_n)
    err(f"oddaemon.workers train: job {spec.get('name', '')!r} attempt {job.get('attempt', 1)}: "
        f"{'resuming from step ' + str(start) + ' (' + latest + ')' if latest else 'starting at step 0'}, "
        f"num_steps {num_steps}, checkpoint every {every_n} steps, {len(gpus)} GPU(s), "
        f"effective config {config_path}"
        f"{f', Slurm task {task.rank} of {task.count} (MultiWorkerMirroredStrategy)' if task else ''}")
    if task:
        multiworker.remove_temporary(model_dir, task)  # what a killed earlier attempt of this task left
    if not phases:
        err(f"oddaemon.workers train: step {start} already reaches num_steps {num_steps}; nothing to train")
        return EXIT_OK

    if strategy is None:
        strategy = strategy_for(gpus)
    started = time.monotonic()
    _capture_checkpoint_managers(tf)
    if task is None and early:
        err(marker_line("requeued", f"stopped before training began ({usr2_words()}): no new step to save"))
        return REQUEUE_EXIT
    if task is None:
        signal.signal(signal.SIGUSR2, _on_warning)
    else:  # several tasks: noted, and agreed on between two iterations, so that all save at one step
        warned: list[int] = early
        signal.signal(signal.SIGUSR2, lambda signum, frame: warned.append(signum))
        multiworker.agree_on_warning(tf, strategy, lambda: bool(warned), RequeueRequested)
    try:
        _train_phases(tf, model_lib_v2, strategy, phases, config_path, model_dir, max_to_keep)
    except RequeueRequested:
        if task is not None and not task.chief:
            _managers[-1].save()  # into its temporary dir: the save is a collective, the chief's needs it
            multiworker.remove_temporary(model_dir, task)
            err(f"oddaemon.workers train: Slurm task {task.rank}: saved with the chief on the cluster's warning")
            return EXIT_OK
        return _save_and_requeue(model_dir)
    finally:
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    if task is not None and not task.chief:
        multiworker.remove_temporary(model_dir, task)
        err(f"oddaemon.workers train: Slurm task {task.rank} finished at step {num_steps} "
            f"(the chief, task 0, wrote the checkpoints)")
        return EXIT_OK
    final = latest_checkpoint(model_dir)
    final_step = checkpoint_step(final) if final else None
    if final_step != num_steps:
        raise WorkerError(f"training ended but the latest checkpoint {final} holds step {final_step}, "
                          f"not num_steps {num_steps}")
    err(f"oddaemon.workers train: training finished at step {final_step} ({final}) "
        f"in {time.monotonic() - started:.1f}s")
    return EXIT_OK


def _train_phases(tf, model_lib_v2, strategy, phases, config_path: str, model_dir: str, max_to_keep: int) -> None:
    for phase in phases:
        # Once a checkpoint exists, train_loop restores it after loading fine_tune_checkpoint, which
        # is then wasted work (and a dummy forward pass): skip it.
        override = 'train_config { fine_tune_checkpoint: "" }' if latest_checkpoint(model_dir) else None
        err(f"oddaemon.workers train: train_loop to step {phase.train_steps} "
            f"(num_steps_per_iteration {phase.steps_per_iteration}, "
            f"checkpoint_every_n {phase.checkpoint_every_n})")
        with strategy.scope():
            model_lib_v2.train_loop(
                pipeline_config_path=config_path,
                model_dir=model_dir,
                config_override=override,
                train_steps=phase.train_steps,
                use_tpu=False,
                save_final_config=False,
                checkpoint_every_n=phase.checkpoint_every_n,
                checkpoint_max_to_keep=max_to_keep,
                record_summaries=phase.record_summaries,
                num_steps_per_iteration=phase.steps_per_iteration,
            )
        tf.keras.backend.clear_session()
