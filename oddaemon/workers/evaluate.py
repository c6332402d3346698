"""Evaluation of checkpoints, cold (one per process) or warm (one model, checkpoint after checkpoint).

    python -m oddaemon.workers eval       --job JOB.json --checkpoint PREFIX --result OUT.json
    python -m oddaemon.workers eval-serve --job JOB.json --reply-fd N

``eval`` evaluates exactly one checkpoint and exits (``model_main_tf2.py --checkpoint_dir`` instead
polls the directory forever). ``eval-serve`` is the warm evaluator the daemon speaks to
(``oddaemon/service/warm.py``): requests are JSON lines on stdin
``{"checkpoint": PREFIX, "result": PATH, "attempt": K}`` (K > 1: a retry, see ``Evaluator.evaluate``);
replies are JSON lines on fd N: ``{"event": "ready"}`` once the model is built, then per request
``{"event": "done", "checkpoint": ..., "result": ...}`` (the result file written before) or
``{"event": "failed", "checkpoint": ..., "error": ...}`` (the process stays up); EOF on stdin ends it.

Both use ``Evaluator``: its constructor builds the model, the eval input and the summary writer once;
``Evaluator.evaluate(prefix)`` restores one checkpoint into it
(``tf.train.Checkpoint(step=, model=, optimizer=).restore``) and runs ``model_lib_v2.eager_eval_loop``,
which writes the metrics as scalars into ``model_dir/eval`` at the checkpoint's step, where
TensorBoard expects them.

The result JSON (written atomically) has the stand-in's shape plus the eval losses on their own::

    {"checkpoint": PREFIX, "step": S,
     "metrics": {"DetectionBoxes_Precision/mAP": ..., ..., "Loss/total_loss": ...},
     "losses": {"Loss/total_loss": ..., ...},
     "wall_time": t, "duration_seconds": d}
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback

from oddaemon.formats.eval_events import metrics_at_step
from oddaemon.workers import EXIT_OK, EXIT_USAGE, WorkerError, load_job, setting, write_json_atomic

COCO_METRICS = (
    "DetectionBoxes_Precision/mAP", "DetectionBoxes_Precision/mAP@.50IOU",
    "DetectionBoxes_Precision/mAP@.75IOU", "DetectionBoxes_Precision/mAP (small)",
    "DetectionBoxes_Precision/mAP (medium)", "DetectionBoxes_Precision/mAP (large)",
    "DetectionBoxes_Recall/AR@1", "DetectionBoxes_Recall/AR@10", "DetectionBoxes_Recall/AR@100",
    "DetectionBoxes_Recall/AR@100 (small)", "DetectionBoxes_Recall/AR@100 (medium)",
    "DetectionBoxes_Recall/AR@100 (large)",
)


class CheckpointError(WorkerError):
    def __init__(self, message: str):
        super().__init__(message, EXIT_USAGE)


def check_checkpoint(prefix: str) -> int:
    """The step stored in checkpoint ``prefix``; CheckpointError with a user message when it is
    missing or unreadable."""
    import tensorflow as tf

    from oddaemon.workers.train import checkpoint_step

    if not os.path.isfile(prefix + ".index"):
        hint = " (give the prefix without .index)" if prefix.endswith(".index") else ""
        raise CheckpointError(f"checkpoint {prefix}: {prefix}.index does not exist{hint}")
    try:
        return checkpoint_step(prefix)
    except (tf.errors.OpError, ValueError) as exc:
        detail = getattr(exc, "message", None) or str(exc)
        raise CheckpointError(f"checkpoint {prefix} is unreadable or corrupt: "
                              f"{type(exc).__name__}: {detail.strip().splitlines()[0]}") from None


def _number(value) -> float:
    try:
        return float(value.numpy() if hasattr(value, "numpy") else value)
    except (TypeError, ValueError):
        return math.nan


class Evaluator:
    """Built once per job; evaluates checkpoint after checkpoint."""

    def __init__(self, spec: dict, eval_device: str | None = None):
        import tensorflow as tf
        from object_detection import inputs, model_lib_v2
        from object_detection.builders import model_builder, optimizer_builder
        from object_detection.utils import config_util

        from oddaemon.workers import pipeline

        self.tf = tf
        self.model_lib_v2 = model_lib_v2
        self.spec = spec
        try:
            proto = pipeline.effective_pipeline(spec)
        except pipeline.PipelineError as exc:
            raise WorkerError("; ".join(exc.problems)) from None
        configs = config_util.create_configs_from_pipeline_proto(proto)
        if not configs.get("eval_input_configs"):
            raise WorkerError(f"pipeline_config {spec['pipeline_config']} has no eval_input_reader; "
                              "set [pipeline] eval_input_path")
        sample = int(setting(spec["eval"], "sample_1_of_n_eval_examples", 1))
        # What eval_continuously does: every eval input sampled 1 of n, exactly one epoch.
        self.configs = config_util.merge_external_params_with_configs(
            configs, None, kwargs_dict={"sample_1_of_n_eval_examples": sample, "eval_num_epochs": 1})
        model_config = self.configs["model"]
        eval_input_config = self.configs["eval_input_configs"][0]
        strategy = tf.distribute.get_strategy()
        with strategy.scope():
            self.model = model_builder.build(model_config=model_config, is_training=True)
        self.eval_input = strategy.experimental_distribute_dataset(
            inputs.eval_input(eval_config=self.configs["eval_config"], eval_input_config=eval_input_config,
                              model_config=model_config, model=self.model))
        self.global_step = tf.Variable(0, trainable=False, dtype=tf.int64)
        self.optimizer, _ = optimizer_builder.build(self.configs["train_config"].optimizer,
                                                    global_step=self.global_step)
        self.checkpoint = tf.train.Checkpoint(step=self.global_step, model=self.model, optimizer=self.optimizer)
        self.use_moving_averages = self.configs["eval_config"].use_moving_averages
        self._shadow_copied = False
        self.summary_dir = os.path.join(spec["model_dir"], "eval", eval_input_config.name)
        self.summary_writer = tf.summary.create_file_writer(self.summary_dir)
        self.metric = str(setting(spec["eval"], "metric", COCO_METRICS[0]))

    def evaluate(self, prefix: str, attempt: int = 1) -> dict:
        """Restore ``prefix`` and evaluate it; returns the OUT.json dict. A retry (``attempt`` > 1)
        whose step is in the eval event files already (an earlier evaluator wrote it and died before
        its result file) takes those values and writes nothing again (``formats/eval_events``)."""
        tf = self.tf
        started = time.time()
        step = check_checkpoint(prefix)
        written = metrics_at_step(self.summary_dir, step, self.metric) if attempt > 1 else None
        if written is not None:
            print(f"oddaemon.workers eval-serve: step {step} of {prefix} is in the eval event files already "
                  "(an earlier evaluator wrote it, then died): its metrics taken, nothing written again",
                  flush=True)
            return {"checkpoint": prefix, "step": step, "metrics": written,
                    "losses": {key: value for key, value in written.items() if key.startswith("Loss/")},
                    "wall_time": time.time(), "duration_seconds": time.time() - started}
        if self.use_moving_averages and not self._shadow_copied:
            eval_config = self.configs["eval_config"]
            self.model_lib_v2._ensure_model_is_built(self.model, self.eval_input, eval_config.batch_size == 1)
            self.optimizer.shadow_copy(self.model)
            self._shadow_copied = True
        try:
            self.checkpoint.restore(prefix).expect_partial()
        except (tf.errors.OpError, ValueError, AssertionError) as exc:
            raise CheckpointError(f"checkpoint {prefix} cannot be restored into this model: "
                                  f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None
        if self.use_moving_averages:
            self.optimizer.swap_weights()
        try:
            with self.summary_writer.as_default():
                raw = self.model_lib_v2.eager_eval_loop(self.model, self.configs, self.eval_input,
                                                        use_tpu=False, global_step=self.global_step)
        finally:
            self.summary_writer.flush()
            if self.use_moving_averages:
                self.optimizer.swap_weights()
        restored_step = int(self.global_step.numpy())
        if restored_step != step:
            raise CheckpointError(f"checkpoint {prefix}: restored step {restored_step} differs from the "
                                  f"stored step {step}")
        metrics = {str(key): _number(value) for key, value in raw.items()}
        losses = {key: value for key, value in metrics.items() if key.startswith("Loss/")}
        return {"checkpoint": prefix, "step": step, "metrics": metrics, "losses": losses,
                "wall_time": time.time(), "duration_seconds": time.time() - started}

    def close(self) -> None:
        self.summary_writer.close()


def _setup(spec: dict) -> None:
    from oddaemon.workers import compat

    compat.configure_logging()
    import tensorflow as tf

    if setting(spec["eval"], "device", "cpu") == "cpu":
        tf.config.set_visible_devices([], "GPU")  # whatever CUDA_VISIBLE_DEVICES says


def run(args) -> int:
    job = load_job(args.job)
    spec = job["spec"]
    _setup(spec)
    started = time.time()
    check_checkpoint(args.checkpoint)  # fail fast, before building the model
    evaluator = Evaluator(spec)
    try:
        result = evaluator.evaluate(args.checkpoint)
    finally:
        evaluator.close()
    result["duration_seconds"] = time.time() - started
    write_json_atomic(args.result, result)
    mean_ap = result["metrics"].get("DetectionBoxes_Precision/mAP")
    print(f"oddaemon.workers eval: step {result['step']} mAP {mean_ap} in {result['duration_seconds']:.1f}s "
          f"-> {args.result}", flush=True)
    return EXIT_OK


def serve(args) -> int:
    """The warm evaluator: build once, then evaluate every checkpoint asked for on stdin."""
    job = load_job(args.job)
    spec = job["spec"]
    try:
        replies = os.fdopen(args.reply_fd, "w", buffering=1, encoding="utf-8")
    except OSError as exc:
        raise WorkerError(f"--reply-fd {args.reply_fd}: {exc.strerror or exc}", EXIT_USAGE) from None

    def reply(**message) -> None:
        replies.write(json.dumps(message) + "\n")
        replies.flush()

    _setup(spec)
    started = time.time()
    evaluator = Evaluator(spec)
    print(f"oddaemon.workers eval-serve: model built in {time.time() - started:.1f}s; ready", flush=True)
    reply(event="ready")
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                request = json.loads(line)
                prefix, result_path = str(request["checkpoint"]), str(request["result"])
                attempt = int(request.get("attempt", 1))
            except (ValueError, KeyError, TypeError):
                reply(event="failed", checkpoint=None, error=f"unreadable request {line.strip()[:200]!r}")
                continue
            try:
                result = evaluator.evaluate(prefix, attempt)
                write_json_atomic(result_path, result)
            except WorkerError as exc:
                print(f"oddaemon.workers eval-serve: {exc}", file=sys.stderr, flush=True)
                reply(event="failed", checkpoint=prefix, error=str(exc))
                continue
            except Exception as exc:  # noqa: BLE001 - a failed evaluation must not end the evaluator
                traceback.print_exc()
                error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                reply(event="failed", checkpoint=prefix, error=f"evaluation of {prefix} failed: {error}")
                continue
            print(f"oddaemon.workers eval-serve: step {result['step']} mAP "
                  f"{result['metrics'].get('DetectionBoxes_Precision/mAP')} in "
                  f"{result['duration_seconds']:.1f}s -> {result_path}", flush=True)
            reply(event="done", checkpoint=prefix, result=result_path)
    finally:
        evaluator.close()
    return EXIT_OK
