"""``python -m oddaemon.workers export --job JOB.json --checkpoint PREFIX --output DIR [--info INFO.json]``.

Exports one checkpoint to a SavedModel the way ``exporter_main_v2.py --input_type image_tensor``
does (``exporter_lib_v2.export_inference_graph``), except that it takes that exact checkpoint rather
than the latest one of a directory. DIR itself is the SavedModel (``tf.saved_model.load(DIR)``, as
the stand-in worker writes it); beside it DIR holds ``checkpoint/ckpt-0`` (the inference model's
weights, for fine-tuning from the export), the ``pipeline.config`` it was built from and
``export.json`` (INFO's checkpoint, step, metric and value, plus when it was exported). Everything
is written into ``DIR.tmp`` first and renamed into place at the end, so a half-written export never
replaces a good one.
"""

from __future__ import annotations

import json
import os
import shutil
import time

from oddaemon.workers import EXIT_OK, WorkerError, load_job, on_cleanup

INPUT_TYPE = "image_tensor"


def export_checkpoint(proto, prefix: str, output_directory: str) -> None:
    """exporter_lib_v2.export_inference_graph for one checkpoint prefix, the SavedModel at the top."""
    import tensorflow as tf
    from object_detection import exporter_lib_v2
    from object_detection.utils import config_util

    detection_model = exporter_lib_v2.INPUT_BUILDER_UTIL_MAP["model_build"](proto.model, is_training=False)
    ckpt = tf.train.Checkpoint(model=detection_model)
    status = ckpt.restore(prefix).expect_partial()
    module = exporter_lib_v2.DETECTION_MODULE_MAP[INPUT_TYPE](detection_model, False, [])
    concrete_function = module.__call__.get_concrete_function()  # builds the variables
    status.assert_existing_objects_matched()
    tf.saved_model.save(module, output_directory, signatures=concrete_function)
    manager = tf.train.CheckpointManager(ckpt, os.path.join(output_directory, "checkpoint"), max_to_keep=1)
    manager.save(checkpoint_number=0)
    config_util.save_pipeline_config(proto, output_directory)


def replace_directory(temp: str, target: str) -> None:
    """Move ``temp`` to ``target``; an existing ``target`` is kept as ``target.old`` until the new one
    is in place, then removed."""
    old = target.rstrip("/") + ".old"
    if os.path.lexists(old):
        shutil.rmtree(old)
    if os.path.lexists(target):
        os.replace(target, old)
    os.replace(temp, target)
    if os.path.lexists(old):
        shutil.rmtree(old, ignore_errors=True)


def write_info(directory: str, info_path: str | None, prefix: str, step: int) -> None:
    """``export.json`` in the export: what the daemon said of the checkpoint, and when it was exported."""
    info: dict = {}
    if info_path:
        try:
            with open(info_path, "rb") as f:
                info = json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise WorkerError(f"cannot read --info {info_path}: {exc}") from None
    info.setdefault("checkpoint", os.path.basename(prefix))
    info.update(step=step, exported_at=time.time())
    with open(os.path.join(directory, "export.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1, sort_keys=True)


def run(args) -> int:
    job = load_job(args.job)
    spec = job["spec"]
    from oddaemon.workers import compat

    compat.configure_logging()
    import tensorflow as tf

    from oddaemon.workers import pipeline
    from oddaemon.workers.evaluate import check_checkpoint

    started = time.monotonic()
    step = check_checkpoint(args.checkpoint)
    try:
        proto = pipeline.effective_pipeline(spec)
    except pipeline.PipelineError as exc:
        raise WorkerError("; ".join(exc.problems)) from None
    target = os.path.abspath(args.output)
    if os.path.isfile(target):
        raise WorkerError(f"--output {target} is a file; give a directory")
    temp = target.rstrip("/") + ".tmp"
    if os.path.lexists(temp):
        shutil.rmtree(temp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    on_cleanup(lambda: shutil.rmtree(temp, ignore_errors=True))
    try:
        export_checkpoint(proto, args.checkpoint, temp)
    except (tf.errors.OpError, AssertionError, ValueError) as exc:
        shutil.rmtree(temp, ignore_errors=True)
        raise WorkerError(f"cannot export checkpoint {args.checkpoint}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from None
    write_info(temp, args.info, args.checkpoint, step)
    replace_directory(temp, target)
    print(f"oddaemon.workers export: step {step} ({args.checkpoint}) exported to {target} "
          f"in {time.monotonic() - started:.1f}s", flush=True)
    return EXIT_OK
