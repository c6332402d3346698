"""The stand-in's evaluator and exporter (see ``standin.py`` for the trainer and the CLI).

* ``eval``: evaluate one checkpoint and exit (the cold one-shot path).
* ``eval-serve``: the warm evaluator protocol the daemon speaks (``docs/architecture.md``):
  requests are JSON lines on stdin ``{"checkpoint": PREFIX, "result": PATH}``; replies are JSON
  lines on the reply fd: ``{"event": "ready"}`` once, then ``{"event": "done", ...}`` or
  ``{"event": "failed", ...}`` per request. EOF on stdin ends it.
* ``export``: write a stand-in "SavedModel" directory for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
import zlib

from oddaemon.formats.eval_events import metrics_at_step
from oddaemon.formats.tfevents_writer import EventFileWriter
from oddaemon.testing.standin_core import (
    Setup,
    Terminated,
    checkpoint_step,
    err,
    eval_metrics,
    log_tf,
    print_traceback,
    read_index,
    setting,
    sleep,
    take_failure_budget,
)
from oddaemon.testing.standin_files import shard_names

EVAL_CRASH_MARKER = ".standin-eval-crashes"
DATA_SHARD = ".data-00000-of-00001"


class EvalFailure(Exception):
    """This checkpoint cannot be evaluated (the process stays up)."""


def _crash_due(setup: Setup, step: int) -> bool:
    return setup.directives["eval_crash"] == step and take_failure_budget(
        setup.model_dir, EVAL_CRASH_MARKER, setup.directives["eval_crash_times"])


def restore_step(prefix: str) -> int:
    """Read a checkpoint the way the real evaluator does, as far as the stand-in's files allow: the
    step from the index (check_checkpoint), then every data shard. Damaged files fail with the real
    worker's words (tests/fixtures/tf/eval_corrupt_checkpoint.log): an index that is not one the
    stand-in trainer wrote is "unreadable or corrupt ... block checksum mismatch"; a data shard that
    is not the short text it writes fails TF's checksum. Raises EvalFailure."""
    try:
        index = read_index(prefix)
    except OSError as exc:
        raise EvalFailure(f"cannot read checkpoint {prefix}: {exc}") from None
    except ValueError:
        raise EvalFailure(f"checkpoint {prefix} is unreadable or corrupt: OpError: Unable to read file "
                          f"({prefix}.index). Perhaps the file is corrupt or was produced by a newer version of "
                          "TensorFlow with format changes (failed to seek to header entry): block checksum "
                          "mismatch") from None
    step = index["step"]
    shards = index.get("shards", 1)
    shards = shards if isinstance(shards, int) and shards > 0 else 1
    for shard in shard_names(prefix, shards):
        try:
            with open(shard, "rb") as data_file:
                data = data_file.read(4096)
        except OSError as exc:
            raise EvalFailure(f"cannot read checkpoint {prefix}: {exc}") from None
        if not data or not all(32 <= byte < 127 or byte in b"\t\n" for byte in data):
            raise EvalFailure(f"checkpoint {prefix} cannot be restored into this model: DataLossError: "
                              f"Checksum does not match: stored {zlib.crc32(str(step).encode())} vs. calculated "
                              f"on the restored bytes {zlib.crc32(data)} (while reading {shard})")
    return step


_writers: dict[str, EventFileWriter] = {}


def _eval_writer(setup: Setup) -> EventFileWriter:
    """One event file per evaluator process, as the real (warm) evaluator's summary writer keeps, in
    ``eval/<eval_input_reader.name>`` as the real one writes it."""
    if setup.model_dir not in _writers:
        _writers[setup.model_dir] = EventFileWriter(_eval_dir(setup))
    return _writers[setup.model_dir]


def _eval_dir(setup: Setup) -> str:
    return os.path.join(setup.model_dir, "eval", setup.directives["eval_input_name"] or "")


def evaluate_one(setup: Setup, prefix: str, result_path: str, attempt: int = 1) -> dict:
    """Evaluate one checkpoint: events under model_dir/eval, result JSON written atomically.
    Raises EvalFailure for an unreadable or damaged checkpoint; exits the process on a planned crash.
    A retry (``attempt`` > 1) whose step is in the event files already takes those values, as the
    real evaluator does (``formats/eval_events``)."""
    started = time.time()
    step = restore_step(prefix)
    written = metrics_at_step(_eval_dir(setup), step, setup.eval_metric) if attempt > 1 else None
    if written is not None:
        err(f"standin: step {step} of {prefix} is in the eval event files already (an earlier evaluator "
            "wrote it, then died): its metrics taken, nothing written again")
        return _write_result(prefix, step, written, started, result_path)
    log_tf(f"Evaluating checkpoint {prefix} (step {step})", "model_lib_v2.py:1006")
    sleep(setup.directives["eval_seconds"])
    crash = _crash_due(setup, step)
    point = setup.directives["eval_crash_point"] or "before"
    if crash and point == "before":
        print_traceback("eager_eval_loop", "eval_dict, losses_dict = compute_eval_dict(features, labels)",
                   f"RuntimeError: standin: eval_crash at step {step}")
        sys.stderr.flush()
        os._exit(1)
    lr_scale = setup.directives["map_lr_scale"]
    scale = 1.0 if lr_scale is None else min(1.0, setting(setup.pipeline, "learning_rate_base", 0.08) * lr_scale)
    metrics = eval_metrics(step, setup.directives["map_peak_step"], scale)
    writer = _eval_writer(setup)
    for tag, value in metrics.items():
        writer.add_scalars(step, {tag: value})
    log_tf(f"Eval metrics at step {step}", "model_lib_v2.py:1015")
    for tag, value in metrics.items():
        log_tf(f"\t+ {tag}: {value:f}", "model_lib_v2.py:1018")
    if crash and point == "events":
        _killed(f"after writing the events of step {step}, before its result file")
    result = _write_result(prefix, step, metrics, started, result_path)
    if crash and point == "result":
        _killed(f"after writing the result of step {step}, before its reply")
    return result


def _killed(where: str) -> None:
    """Die as a SIGKILL (the OOM killer, kill -9) does, at a chosen point of an evaluation."""
    err(f"standin: eval_crash {where}: SIGKILL")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _write_result(prefix: str, step: int, metrics: dict, started: float, result_path: str) -> dict:
    result = {"checkpoint": prefix, "step": step, "metrics": metrics, "wall_time": time.time(),
              "duration_seconds": time.time() - started}
    temp = f"{result_path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as out:
        json.dump(result, out, indent=1)
    os.replace(temp, result_path)
    return result


def evaluate(setup: Setup, prefix: str, result_path: str) -> int:
    try:
        evaluate_one(setup, prefix, result_path)
    except EvalFailure as exc:
        err(f"standin: {exc}")
        return 2
    except Terminated:
        err("standin: SIGTERM received while evaluating, exiting")
        return 143
    return 0


def _attempt(request: dict) -> int:
    try:
        return int(request.get("attempt", 1))
    except (TypeError, ValueError):
        return 1


def serve(setup: Setup, reply_fd: int) -> int:
    replies = os.fdopen(reply_fd, "w", buffering=1)

    def terminate(*_) -> None:
        raise Terminated  # also while idle, blocked reading stdin

    if not setup.directives["ignore_sigterm"]:
        signal.signal(signal.SIGTERM, terminate)

    def reply(**message) -> None:
        replies.write(json.dumps(message) + "\n")

    try:
        sleep(setup.directives["eval_ready_seconds"])  # the real one builds its model first
        err(f"standin: warm evaluator for {setup.name!r} ready")
        reply(event="ready")
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                str(request["checkpoint"]), str(request["result"])
            except (ValueError, KeyError, TypeError):
                reply(event="failed", checkpoint=None, error=f"unreadable request {line.strip()[:200]!r}")
                continue
            try:
                evaluate_one(setup, request["checkpoint"], request["result"], _attempt(request))
                reply(event="done", checkpoint=request["checkpoint"], result=request["result"])
            except EvalFailure as exc:
                err(f"standin: {exc}")
                reply(event="failed", checkpoint=request["checkpoint"], error=str(exc))
    except Terminated:
        err("standin: SIGTERM received, evaluator exiting")
        return 143
    return 0


def export(setup: Setup, prefix: str, output: str, info_path: str | None = None) -> int:
    """Like the real exporter at the file level: the step from the index first (check_checkpoint),
    then the model build (``export_seconds``), then the restore reads every file of the checkpoint,
    so files that vanish during the build fail the export as TF's restore would."""
    try:
        step = checkpoint_step(prefix)
        sleep(setup.directives["export_seconds"])
        if not os.path.exists(prefix + ".index"):
            raise EvalFailure(f"tensorflow.python.framework.errors_impl.NotFoundError: Failed to find any matching "
                              f"files for {prefix}")
        restore_step(prefix)
        if step == 0:  # TF's step-0 checkpoint is written before the model's variables all exist
            print_traceback("export_inference_graph", "status.assert_existing_objects_matched()",
                       "AssertionError: Found 298 Python objects that were not bound to checkpointed values, "
                       "likely due to changes in the Python program.")
            return 1
        if setup.directives["export_crash_text"]:
            print_traceback("export_inference_graph", "status.assert_existing_objects_matched()",
                       setup.directives["export_crash_text"])
            return 1
        info = {}
        if info_path:
            with open(info_path, "rb") as f:
                info = json.loads(f.read())
    except (OSError, ValueError, EvalFailure) as exc:
        err(f"oddaemon.workers export: cannot export checkpoint {prefix}: {exc}")  # (as the real worker says it)
        return 2
    except Terminated:
        return 143
    temp = f"{output}.tmp{os.getpid()}"
    shutil.rmtree(temp, ignore_errors=True)
    os.makedirs(os.path.join(temp, "variables"))
    with open(os.path.join(temp, "saved_model.pb"), "w", encoding="utf-8") as f:
        json.dump({"standin": True, "checkpoint": prefix, "step": step}, f)
    # the inference model's checkpoint beside it, as the real exporter's CheckpointManager writes it
    # (another job may fine-tune from exported/checkpoint/ckpt-0): its data shard, index, state file
    os.makedirs(os.path.join(temp, "checkpoint"))
    with open(os.path.join(temp, "checkpoint", "ckpt-0.data-00000-of-00001"), "wb") as f:
        f.write(b"\0" * 64)
    with open(os.path.join(temp, "checkpoint", "ckpt-0.index"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "shards": 1, "exported_from": prefix}, f)
    with open(os.path.join(temp, "checkpoint", "checkpoint"), "w", encoding="utf-8") as f:
        f.write('model_checkpoint_path: "ckpt-0"\nall_model_checkpoint_paths: "ckpt-0"\n')
    info.setdefault("checkpoint", os.path.basename(prefix))
    info.update(step=step, exported_at=time.time())
    with open(os.path.join(temp, "export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)
    if os.path.exists(output):
        old = f"{output}.old{os.getpid()}"
        os.rename(output, old)
        os.rename(temp, output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(temp, output)
    err(f"standin: exported step {step} to {output}")
    return 0
