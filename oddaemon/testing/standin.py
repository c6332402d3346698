"""The stand-in worker: behaves like the real TF workers (``oddaemon.workers``) at the file level,
without TF, in milliseconds.

    python -m oddaemon.testing.standin train --job JOB.json
    python -m oddaemon.testing.standin eval --job JOB.json --checkpoint PREFIX --result OUT.json

Behaviour comes from the pipeline.config: ``num_steps``/``batch_size`` (and the cosine learning-rate
fields) as in the text proto, overridden by the job's ``[pipeline]`` values, plus comment directives
``# standin: key = value`` (see ``standin_core.DIRECTIVE_DEFAULTS``). What the daemon depends on is
done as TF does it:

* scalars once per train_loop iteration (the real worker's ``num_steps_per_iteration``), through a
  writer that flushes every 10 events or 120 s; "Step N per-step time" every 100 steps; checkpoints
  numbered by save count (ckpt-1 holds step 0), shards first, index, then the state file;
* the train inputs read record by record before the first step (a damaged record fails as the real
  worker does: its ``oddaemon-failure:`` line, then TF's long traceback); a fine-tune checkpoint
  read at a fresh start;
* the failure directives ``hang_at_step``, ``oom_at_step``, ``nan_at_step`` and ``crash_at_step``
  fire when training is about to complete that step (nothing of that step is written) and share the
  ``crash_times`` budget, counted in ``model_dir/.standin-crashes``; ``crash_text`` replaces
  crash_at_step's last line, ``crash_log`` its whole output (a log a real TF run produced, see
  tests/fixtures/tf). ``nan_loss_from_step`` trains on with NaN losses (the TF2 OD API does), and
  ``oom_above_batch`` fails with the out-of-memory failure while the batch size is above it;
  ``allocate_mib_at_step`` takes ``allocate_mib`` MiB of host memory at that step and holds it.

Values are float32-exact, so ``train_scalars``/``eval_metrics`` equal what is read back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import sys
import time

from oddaemon.core.failures import marker_line
from oddaemon.core.slurm import REQUEUE_EXIT
from oddaemon.testing import standin_eval, standin_tasks
from oddaemon.testing.standin_core import (
    CRASH_MARKER,
    DEFAULT_BATCH_SIZE,
    DEFAULT_NUM_STEPS,
    Setup,
    SetupError,
    Terminated,
    checkpoint_step,
    err,
    load_setup,
    log_tf,
    on_sigterm,
    print_traceback,
    setting,
    sleep,
    take_failure_budget,
    train_scalars,
)
from oddaemon.testing.standin_files import CheckpointManager, InputError, SummaryWriter, check_inputs
from oddaemon.workers.diagnose import corrupt_input_marker, oom_marker
from oddaemon.workers.train import plan_phases, usr2_words

_FAILURES = ("hang_at_step", "oom_at_step", "nan_at_step", "crash_at_step")
_line_numbers = itertools.count(1)
_TRAIN_CALL = "losses_dict = _dist_train_step(train_input_iter)"
_TF_FRAMES = (  # the frames of a real train_loop failure (tests/fixtures/tf/train_corrupt_input.log)
    ("<frozen runpy>", 198, "_run_module_as_main"), ("<frozen runpy>", 88, "_run_code"),
    ("oddaemon/workers/__main__.py", 109, "<module>"), ("oddaemon/workers/__main__.py", 59, "main"),
    ("oddaemon/workers/train.py", 163, "run"), ("object_detection/model_lib_v2.py", 685, "train_loop"),
    ("object_detection/model_lib_v2.py", 671, "_dist_train_step"),
    ("object_detection/model_lib_v2.py", 649, "_sample_and_train"),
)


def _graph_error(error_class: str, cause: str, node: str) -> None:
    """A train-step failure as TF 2.15 prints it in graph mode: the traceback, then "Graph execution
    error:", the node's frames and at last the cause."""
    lines = ["Traceback (most recent call last):"]
    for where, line, function in _TF_FRAMES[:6]:
        lines += [f'  File "{where}", line {line}, in {function}', f"    {_TRAIN_CALL}"]
    lines += [f"tensorflow.python.framework.errors_impl.{error_class}: Graph execution error:", "",
              f"Detected at node {node} defined at (most recent call last):"]
    for where, line, function in _TF_FRAMES:
        lines += [f'  File "{where}", line {line}, in {function}', ""]
    lines += [cause, f"\t [[{{{{node {node}}}}}]] [Op:__inference__dist_train_step_15712]"]
    err("\n".join(lines))


def _failure_due(setup: Setup, step: int) -> str | None:
    """The failure directive that fires at ``step``, counted against crash_times."""
    due = [key for key in _FAILURES if setup.directives[key] == step]
    if not due or not take_failure_budget(setup.model_dir, CRASH_MARKER, setup.directives["crash_times"]):
        return None
    return due[0]


def _fail(setup: Setup, failure: str, step: int) -> int:
    """Acts out a failure directive; returns the exit status (a hang only ends through SIGTERM)."""
    if failure == "hang_at_step":
        err(f"standin: hanging at step {step}")
        sleep(math.inf)
    if failure == "oom_at_step":
        batch = setting(setup.pipeline, "batch_size", DEFAULT_BATCH_SIZE)
        cause = (f"OOM when allocating tensor with shape[{batch},64,80,80] and type float on "
                 "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc")
        err(oom_marker(cause))  # the real worker names it first (workers/diagnose.py), then raises
        _graph_error("ResourceExhaustedError", cause, "ssd_mobile_net_v2fpn_keras_feature_extractor/Conv2D")
        return 1
    if failure == "nan_at_step":
        print_traceback("train_loop", _TRAIN_CALL, "tensorflow.python.framework.errors_impl.InvalidArgumentError: "
                        f"Loss is NaN at step {step} : Tensor had NaN values [Op:CheckNumerics]")
        return 1
    if setup.directives["crash_log"]:
        with open(setup.directives["crash_log"], encoding="utf-8") as log:
            sys.stderr.write(log.read())
        sys.stderr.flush()
        return 1  # an uncaught Python exception
    print_traceback("train_loop", _TRAIN_CALL,
                    setup.directives["crash_text"] or f"RuntimeError: standin: crash_at_step {step} reached")
    return setup.directives["exit_code"]


_HELD: list[bytes] = []


def _allocate(mib: int) -> None:
    """Take ``mib`` MiB of host memory and keep it (a leaking data loader), a page-touched MiB at a time: past
    its cgroup's memory_max the kernel's OOM killer ends the worker on the way."""
    err(f"standin: allocating {mib} MiB of host memory")
    for _ in range(mib):
        _HELD.append(b"\x01" * (1024 * 1024))
    err(f"standin: holding {len(_HELD)} MiB")


def _read_inputs(setup: Setup, fresh: bool) -> int | None:
    """Read the inputs as train_loop's first step does; the exit status when they fail, else None."""
    try:
        check_inputs(setup.inputs)
    except InputError as exc:
        if exc.kind == "missing":
            print_traceback("read_dataset", "raise RuntimeError(",
                            f"RuntimeError: Did not find any input files matching the glob pattern {setup.inputs}")
            return 1
        path, record, offset = str(exc).split("\0")
        cause = f"corrupted record at {offset}"
        err(corrupt_input_marker((path, int(record)), cause))
        _graph_error("DataLossError", cause, "IteratorGetNext")
        return 1
    checkpoint = setup.fine_tune_checkpoint
    if fresh and checkpoint and not os.path.isfile(checkpoint + ".index"):
        print_traceback("load_fine_tune_checkpoint", "ckpt.restore(checkpoint_path).expect_partial()",
                        "tensorflow.python.framework.errors_impl.NotFoundError: Unsuccessful TensorSliceReader "
                        f"constructor: Failed to find any matching files for {checkpoint}")
        return 1
    return None


def _records_summaries(setup: Setup, start: int, num_steps: int):
    """step -> True when train_loop would write the scalars at that step (once per iteration)."""
    every = setup.directives["summary_every_n"]
    if every:
        return lambda step: step % every == 0
    phases = plan_phases(start, num_steps, setup.checkpoint_every_n)
    ends = [(phase.train_steps, phase.steps_per_iteration) for phase in phases]

    def due(step: int) -> bool:
        nspi = next((n for end, n in ends if step <= end), 1)
        return step % nspi == 0

    return due


def train(setup: Setup) -> int:
    warned: list[int] = []  # SIGUSR2: the cluster's warning before its time limit, or oddaemon finish
    signal.signal(signal.SIGUSR2, lambda signum, frame: warned.append(signum))
    rank, tasks = standin_tasks.tasks(os.environ)  # several Slurm nodes: one task each, task 0 trains
    if tasks > 1:
        standin_tasks.record(setup.model_dir, rank, tasks)
        if rank != 0:
            return standin_tasks.follow(setup.model_dir, rank)
    num_steps = setting(setup.pipeline, "num_steps", DEFAULT_NUM_STEPS)
    step_seconds = setup.directives["step_seconds"]
    manager = CheckpointManager(setup.model_dir, setup.max_to_keep, setup.directives["checkpoint_bytes"],
                                setup.directives["checkpoint_shards"])
    fresh = not manager.kept
    if manager.kept:
        try:
            step = checkpoint_step(os.path.join(setup.model_dir, manager.kept[-1][0]))
        except (OSError, ValueError) as exc:
            err(f"standin: cannot restore the latest checkpoint of {setup.model_dir}: {exc}")
            return 1
        err(f"standin: resuming from step {step} ({manager.kept[-1][0]})")
    else:
        step = 0
    failed = _read_inputs(setup, fresh)
    if failed is not None:
        return failed
    if fresh:
        manager.save(0)
    err(f"standin: train job {setup.name!r} attempt {setup.attempt}: step {step} of {num_steps}")
    batch = setting(setup.pipeline, "batch_size", DEFAULT_BATCH_SIZE)
    if setup.directives["oom_above_batch"] is not None and batch > setup.directives["oom_above_batch"]:
        return _fail(setup, "oom_at_step", step + 1)
    nan_from = setup.directives["nan_loss_from_step"]
    records = _records_summaries(setup, step, num_steps)
    writer = SummaryWriter(os.path.join(setup.model_dir, "train"), setup.directives["summary_max_queue"],
                           setup.directives["summary_flush_seconds"])
    checkpointed = logged = step
    try:
        while step < num_steps:
            if warned:  # as the real worker: save now, say so, ask to be requeued
                manager.save(step)
                print(marker_line("requeued", f"saved a checkpoint at step {step} {usr2_words()}"), file=sys.stderr,
                      flush=True)
                return REQUEUE_EXIT
            failure = _failure_due(setup, step + 1)
            if failure:
                return _fail(setup, failure, step + 1)
            if setup.directives["allocate_mib_at_step"] == step + 1:
                _allocate(setup.directives["allocate_mib"])
            started = time.monotonic()
            sleep(step_seconds)
            step += 1
            scalars = train_scalars(step, setup.pipeline, step_seconds)
            if nan_from is not None and step >= nan_from:
                scalars.update({tag: math.nan for tag in scalars if tag.startswith("Loss/")})
            if records(step):
                for tag, value in scalars.items():
                    writer.scalar(step, tag, value)
            if step - logged >= setup.directives["log_every_n"]:
                log_tf(f"Step {step} per-step time {time.monotonic() - started:.3f}s")
                losses = {tag: float(f"{value:.7g}") for tag, value in scalars.items() if tag != "steps_per_sec"}
                log_tf(str(losses), "model_lib_v2.py:708")
                logged = step
            for _ in range(setup.directives["log_lines_per_step"]):
                print(f"standin line {next(_line_numbers)}", flush=True)
            if step - checkpointed >= setup.checkpoint_every_n:
                manager.save(step)
                checkpointed = step
    except Terminated:
        err(f"standin: SIGTERM received at step {step}, exiting")
        return 143
    finally:
        writer.close()
    if checkpointed != step:
        manager.save(step)
    if tasks > 1:
        standin_tasks.chief_done(setup.model_dir)
    err(f"standin: training finished at step {step}")
    return 0


def preflight(setup: Setup, result_path: str) -> None:
    problem = setup.directives["preflight_problem"]
    time.sleep(setup.directives["preflight_seconds"])
    result = {"ok": problem is None, "problems": [problem] if problem else [], "warnings": [],
              "effective": {"num_steps": setting(setup.pipeline, "num_steps", DEFAULT_NUM_STEPS)}}
    temp = f"{result_path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as out:
        json.dump(result, out)
    os.replace(temp, result_path)
    err(f"standin: preflight of {setup.name!r}: {'ok' if problem is None else problem}")


def preflight_serve(reply_fd: int) -> int:
    """The warm preflight protocol (``oddaemon.workers preflight-serve``): ready, then job after job."""
    replies = os.fdopen(reply_fd, "w", buffering=1, encoding="utf-8")

    def terminate(*_) -> None:
        raise Terminated  # also while idle, blocked reading stdin: the real one exits at once too

    signal.signal(signal.SIGTERM, terminate)
    replies.write(json.dumps({"event": "ready"}) + "\n")
    try:
        return _preflight_requests(replies)
    except Terminated:
        return 143


def _preflight_requests(replies) -> int:
    for line in sys.stdin:
        if not line.strip():
            continue
        request: dict = {}
        try:
            request = json.loads(line)
            preflight(load_setup(str(request["job"])), str(request["result"]))
        except (ValueError, KeyError, TypeError, AttributeError, SetupError) as exc:
            err(f"oddaemon.workers preflight-serve: {exc}")
        replies.write(json.dumps({"event": "done", "result": request.get("result")}) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m oddaemon.testing.standin")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("train").add_argument("--job", required=True)
    eval_parser = commands.add_parser("eval")
    for option in ("--job", "--checkpoint", "--result"):
        eval_parser.add_argument(option, required=True)
    serve_parser = commands.add_parser("eval-serve")
    serve_parser.add_argument("--job", required=True)
    serve_parser.add_argument("--reply-fd", type=int, required=True)
    preflight_parser = commands.add_parser("preflight")
    for option in ("--job", "--result"):
        preflight_parser.add_argument(option, required=True)
    commands.add_parser("preflight-serve").add_argument("--reply-fd", type=int, required=True)
    export_parser = commands.add_parser("export")
    for option in ("--job", "--checkpoint", "--output"):
        export_parser.add_argument(option, required=True)
    export_parser.add_argument("--info")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, on_sigterm)
    if args.command == "preflight-serve":
        return preflight_serve(args.reply_fd)  # (its own SIGTERM handler)
    try:
        setup = load_setup(args.job)
    except SetupError as exc:
        err(str(exc))
        return 2
    if setup.directives["ignore_sigterm"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # to test the daemon's SIGKILL after the grace period
    if args.command == "train":
        return train(setup)
    if args.command == "preflight":
        preflight(setup, args.result)
        return 0
    if args.command == "eval":
        return standin_eval.evaluate(setup, args.checkpoint, args.result)
    if args.command == "eval-serve":
        return standin_eval.serve(setup, args.reply_fd)
    return standin_eval.export(setup, args.checkpoint, args.output, args.info)


if __name__ == "__main__":
    sys.exit(main())
