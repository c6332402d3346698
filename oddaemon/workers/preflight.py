"""``python -m oddaemon.workers preflight --job JOB.json --result OUT.json``: the checks a person
would make before the manual workflow's ``model_main_tf2.py`` run, with one precise message each.

``python -m oddaemon.workers preflight-serve --reply-fd N``: the same checks for job after job in one
warm process (tensorflow imported once): requests ``{"job": JOB.json, "result": OUT.json}`` as JSON
lines on stdin, one ``{"event": "done", "result": OUT.json}`` per request on fd N (after OUT.json is
written), ``{"event": "ready"}`` first. What is expensive and the same across jobs is remembered:
whether a model config builds, a label map's ids, the first record of an input file (by path, size
and mtime), a checkpoint's variable names. 500 jobs of one sweep cost one model build.

OUT.json: ``{"ok": bool, "problems": [...], "warnings": [...],
"effective": {"num_steps": N, "batch_size": B, "num_classes": C}}``. Every check runs (the problems
are collected, not the first one only). Exit status 0 whenever OUT.json was written, problems or
not; non-zero only when the preflight itself crashed.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time

from oddaemon.workers import EXIT_OK, gpu_count_for, load_job, setting, write_json_atomic

MAX_FILES_CHECKED = 200  # per input pattern: the first record of each file is read
BBOX_KEYS = tuple(f"image/object/bbox/{k}" for k in ("ymin", "xmin", "ymax", "xmax"))
CLASS_KEYS = ("image/object/class/label", "image/object/class/text")


class Report:
    def __init__(self):
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, message: str) -> None:
        if message not in self.problems:
            self.problems.append(message)

    def warning(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, without TF's {{function_node ...}} and [Op:...] noise."""
    text = (getattr(exc, "message", None) or str(exc)).strip()
    text = text.splitlines()[0] if text else ""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", text)
    text = re.sub(r"\s*\[Op:[^\]]*\].*$", "", text)
    return f"{type(exc).__name__}: {text}".rstrip(": ")


# ---------------------------------------------------------------------------------- label maps


def check_label_map(path: str, num_classes: int | None, report: Report) -> dict[int, str] | None:
    """{id: name} of the label map, after checking it parses and matches num_classes."""
    from google.protobuf import text_format
    from object_detection.protos import string_int_label_map_pb2

    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as exc:
        report.problem(f"label map {path}: cannot read it: {getattr(exc, 'strerror', None) or exc}")
        return None
    label_map = string_int_label_map_pb2.StringIntLabelMap()
    try:
        text_format.Merge(text, label_map)
    except text_format.ParseError as exc:
        message = str(exc)
        prefix = f"{exc.GetLine()}:{exc.GetColumn()} : "
        message = message[len(prefix):] if message.startswith(prefix) else message
        report.problem(f"label map {path} line {exc.GetLine()}: {message}")
        return None
    items = {item.id: item.name or item.display_name for item in label_map.item}
    if not label_map.item:
        report.problem(f"label map {path} has no items")
        return items
    if len(items) != len(label_map.item):
        report.problem(f"label map {path} lists an id more than once; every item needs its own id")
    if num_classes is not None:
        if len(label_map.item) != num_classes:
            report.problem(f"num_classes is {num_classes} but label map {path} has {len(label_map.item)} items")
        else:
            bad = sorted(i for i in items if not 1 <= i <= num_classes)
            if bad:
                report.problem(f"label map {path} has id {bad[0]} ({items[bad[0]]!r}); with num_classes "
                               f"{num_classes} the ids must run from 1 to {num_classes}")
    return items


# ---------------------------------------------------------------------------------- input records


def _check_example(record: bytes, where: str, label_ids: dict[int, str] | None, report: Report) -> None:
    import tensorflow as tf

    try:
        example = tf.train.Example.FromString(record)
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError or others
        report.problem(f"{where} is not a tf.train.Example ({_first_line(exc)})")
        return
    feature = example.features.feature
    if "image/encoded" not in feature or not feature["image/encoded"].bytes_list.value:
        report.problem(f"{where} has no image/encoded (the image bytes); the TF OD API decoder needs "
                       "image/encoded, image/object/bbox/{xmin,xmax,ymin,ymax} and "
                       "image/object/class/label or /text")
    else:
        try:
            tf.io.decode_image(feature["image/encoded"].bytes_list.value[0], channels=3, expand_animations=False)
        except (tf.errors.OpError, ValueError) as exc:
            report.problem(f"{where}: image/encoded is not a JPEG/PNG image ({_first_line(exc)})")
    present = [key for key in BBOX_KEYS if key in feature]
    if present and len(present) != len(BBOX_KEYS):
        missing = ", ".join(key for key in BBOX_KEYS if key not in feature)
        report.problem(f"{where} has {', '.join(present)} but not {missing}")
        return
    counts = {key: len(feature[key].float_list.value) for key in present}
    if len(set(counts.values())) > 1:
        report.problem(f"{where}: the bbox lists differ in length ({', '.join(f'{k} {n}' for k, n in counts.items())})")
        return
    boxes = next(iter(counts.values()), 0)
    if not boxes:
        return
    values = [v for key in present for v in feature[key].float_list.value]
    if max(values) > 1.01 or min(values) < -0.01:
        report.problem(f"{where}: bbox coordinates must be normalized to [0, 1] (divided by the image "
                       f"width/height); found values from {min(values):g} to {max(values):g}")
    labels = list(feature["image/object/class/label"].int64_list.value) if CLASS_KEYS[0] in feature else []
    texts = list(feature["image/object/class/text"].bytes_list.value) if CLASS_KEYS[1] in feature else []
    if len(labels) != boxes and len(texts) != boxes:
        report.problem(f"{where} has {boxes} boxes but {len(labels)} image/object/class/label and "
                       f"{len(texts)} image/object/class/text values; each box needs its class")
    elif label_ids and len(labels) == boxes:
        unknown = sorted(set(labels) - set(label_ids))
        if unknown:
            report.warning(f"{where} has class label {unknown[0]}, which is not an id in the label map")


def check_input(kind: str, pattern: str, label_ids, report: Report) -> None:
    """``pattern`` matches files and the first record of each (up to MAX_FILES_CHECKED) is a usable
    tf.Example."""
    import tensorflow as tf

    try:
        files = sorted(tf.io.gfile.glob(pattern))  # what the TF OD API's dataset builder does
    except tf.errors.OpError as exc:
        report.problem(f"{kind} input {pattern}: {_first_line(exc)}")
        return
    files = [f for f in files if not tf.io.gfile.isdir(f)]
    if not files:
        report.problem(f"{kind} input {pattern} matches no file")
        return
    for path in files[:MAX_FILES_CHECKED]:
        try:
            st = os.stat(path)
        except OSError:
            _check_first_record(kind, path, label_ids, report)  # (gone meanwhile: the check says so)
            continue
        key = (kind, path, st.st_size, st.st_mtime_ns, tuple(sorted(label_ids or {})))
        if key not in _RECORDS:
            _RECORDS[key] = Report()
            _check_first_record(kind, path, label_ids, _RECORDS[key])
        for message in _RECORDS[key].problems:
            report.problem(message)
        for message in _RECORDS[key].warnings:
            report.warning(message)


_RECORDS: dict[tuple, Report] = {}  # (kind, file, size, mtime, label ids) -> what its first record gave


def _check_first_record(kind: str, path: str, label_ids, report: Report) -> None:
    import tensorflow as tf

    try:
        records = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
    except (tf.errors.OpError, ValueError) as exc:
        report.problem(f"{kind} input file {path}: its first record is corrupt or not a TFRecord "
                       f"({_first_line(exc)})")
        return
    if not records:
        report.warning(f"{kind} input file {path} has no records")
        return
    _check_example(records[0], f"the first record of {kind} input file {path}", label_ids, report)


# ---------------------------------------------------------------------------------- checkpoints


def check_fine_tune_checkpoint(prefix: str, checkpoint_type: str, model_dir: str, report: Report,
                               awaited: bool = False) -> None:
    """``awaited``: a job in ``after`` is to write it (``JobSpec.awaits_checkpoint``); not there yet is fine."""
    import tensorflow as tf

    if awaited and not os.path.isfile(prefix + ".index"):
        report.warning(f"fine_tune_checkpoint {prefix} does not exist yet: a job this one waits for (after) is to "
                       "write it; the daemon looks for it again when this job starts")
        return
    if not os.path.isfile(prefix + ".index"):
        report.problem(f"fine_tune_checkpoint {prefix}: {prefix}.index does not exist (give the checkpoint "
                       "prefix, e.g. .../checkpoint/ckpt-0)")
        return
    try:
        names = [name for name, _ in tf.train.list_variables(prefix)]
    except (tf.errors.OpError, ValueError) as exc:
        report.problem(f"fine_tune_checkpoint {prefix} cannot be read ({_first_line(exc)})")
        return
    if os.path.abspath(os.path.dirname(prefix)) == os.path.abspath(model_dir):
        report.problem(f"fine_tune_checkpoint {prefix} is in model_dir {model_dir}; TF refuses to fine-tune "
                       "from its own model_dir: copy the checkpoint elsewhere or use another model_dir")
    if "_CHECKPOINTABLE_OBJECT_GRAPH" not in names:
        report.problem(f"fine_tune_checkpoint {prefix} is a TF1 (name-based) checkpoint; TF2 training needs "
                       "an object-based checkpoint, e.g. from the TF2 Detection Model Zoo")
        return
    detection = [n for n in names if n.startswith("model/")]
    if checkpoint_type == "classification" and detection:
        parts = sorted({n.split("/")[1] for n in detection if n.count("/") > 1})
        report.problem(f"fine_tune_checkpoint_type is \"classification\" but {prefix} is a detection "
                       f"checkpoint (it holds a whole detection model: {', '.join('model/' + p for p in parts)}); "
                       "set [pipeline] fine_tune_checkpoint_type = \"detection\"")
    elif checkpoint_type == "detection" and not detection:
        if any(n.startswith("feature_extractor") for n in names):
            why = "it has the old feature_extractor layout, which TF2 cannot load as \"detection\""
        else:
            why = "it holds no detection model (no model/... variables)"
        report.problem(f"fine_tune_checkpoint_type is \"detection\" but {prefix} is not a TF2 detection "
                       f"checkpoint: {why}; use a checkpoint from the TF2 Detection Model Zoo, or set "
                       "[pipeline] fine_tune_checkpoint_type = \"classification\" for a classification "
                       "backbone")


# ---------------------------------------------------------------------------------- the whole job


def preflight(job: dict) -> dict:
    from oddaemon.workers import pipeline

    spec = job["spec"]
    edits = spec.get("pipeline") or {}
    report = Report()
    effective = {"num_steps": None, "batch_size": None, "num_classes": None}
    proto = None
    try:
        source = pipeline.load_pipeline(spec["pipeline_config"])
    except pipeline.PipelineError as exc:
        for message in exc.problems:
            report.problem(message)
        source = None
    if source is not None:
        try:
            proto = pipeline.apply_edits(source, edits)
        except pipeline.PipelineError as exc:
            for message in exc.problems:
                report.problem(message)
    if proto is not None:
        problems, warnings = pipeline.check_effective(proto)
        for message in problems:
            report.problem(message)
        for message in warnings:
            report.warning(message)
        _check_model_builds(proto, report)
        arch = proto.model.WhichOneof("model")
        num_classes = getattr(getattr(proto.model, arch), "num_classes", None) if arch else None
        effective = {"num_steps": proto.train_config.num_steps, "batch_size": proto.train_config.batch_size,
                     "num_classes": num_classes}
        _check_files(spec, job, proto, num_classes, report)
    else:
        _check_edited_files(spec, edits, report)
        effective = {key: edits.get(key) for key in effective}
    _check_gpus(job, effective["batch_size"] or edits.get("batch_size"), report)
    return {"ok": not report.problems, "problems": report.problems, "warnings": report.warnings,
            "effective": effective}


_BUILDS: dict[bytes, str | None] = {}  # model config -> why it cannot be built (None: it builds)


def _check_model_builds(proto, report: Report) -> None:
    key = proto.model.SerializeToString()
    if key not in _BUILDS:
        import tensorflow as tf
        from object_detection.builders import model_builder

        try:
            model_builder.build(model_config=proto.model, is_training=True)
            _BUILDS[key] = None
        except Exception as exc:  # noqa: BLE001 - any builder failure is a config problem for the user
            _BUILDS[key] = f"effective pipeline.config: the model cannot be built from it ({_first_line(exc)})"
        tf.keras.backend.clear_session()  # (a warm preflight builds many: keep its memory flat)
    if _BUILDS[key]:
        report.problem(_BUILDS[key])


def _check_files(spec: dict, job: dict, proto, num_classes, report: Report) -> None:
    train_reader = proto.train_input_reader
    label_maps: dict[str, dict | None] = {}
    for path in [train_reader.label_map_path] + [r.label_map_path for r in proto.eval_input_reader]:
        if path and path not in label_maps:
            label_maps[path] = check_label_map(path, num_classes, report)
    train_ids = label_maps.get(train_reader.label_map_path)
    for pattern in train_reader.tf_record_input_reader.input_path:
        check_input("train", pattern, train_ids, report)
    eval_enabled = setting(spec["eval"], "enabled", True)
    if eval_enabled and not proto.eval_input_reader:
        report.problem("[eval] is enabled but the pipeline.config has no eval_input_reader; set [pipeline] "
                       "eval_input_path or [eval] enabled = false")
    for reader in proto.eval_input_reader:
        if (reader.WhichOneof("input_reader") != "tf_record_input_reader"
                or not reader.tf_record_input_reader.input_path):
            if eval_enabled:
                report.problem("eval_input_reader has no tf_record_input_reader input_path; set [pipeline] "
                               "eval_input_path or [eval] enabled = false")
            continue
        for pattern in reader.tf_record_input_reader.input_path:
            check_input("eval", pattern, label_maps.get(reader.label_map_path), report)
    train = proto.train_config
    if train.fine_tune_checkpoint:
        check_fine_tune_checkpoint(train.fine_tune_checkpoint, train.fine_tune_checkpoint_type or "classification",
                                   spec["model_dir"], report, bool(spec.get("awaits_checkpoint")))


def _check_edited_files(spec: dict, edits: dict, report: Report) -> None:
    """Without a usable pipeline.config, still check the files the job names itself."""
    label_ids = None
    if edits.get("label_map_path"):
        label_ids = check_label_map(edits["label_map_path"], edits.get("num_classes"), report)
    for kind in ("train", "eval"):
        paths = edits.get(f"{kind}_input_path")
        for pattern in [paths] if isinstance(paths, str) else (paths or []):
            check_input(kind, pattern, label_ids, report)
    if edits.get("fine_tune_checkpoint"):
        check_fine_tune_checkpoint(edits["fine_tune_checkpoint"],
                                   edits.get("fine_tune_checkpoint_type") or "classification",
                                   spec["model_dir"], report, bool(spec.get("awaits_checkpoint")))


def _check_gpus(job: dict, batch_size, report: Report) -> None:
    gpus = gpu_count_for(job)
    if not gpus or not batch_size:
        return
    if batch_size % gpus:
        report.problem(f"batch_size {batch_size} is not divisible by the {gpus} GPU(s) this job gets; each GPU "
                       f"gets an equal share of every batch (set [pipeline] batch_size to a multiple of {gpus})")


def _setup() -> None:
    from oddaemon.workers import compat

    compat.configure_logging()
    import tensorflow as tf

    tf.config.set_visible_devices([], "GPU")  # the checks never need one


def check_one(job: dict, result_path: str, command: str = "preflight") -> None:
    started = time.monotonic()
    result = preflight(job)
    result["duration_seconds"] = time.monotonic() - started
    write_json_atomic(result_path, result)
    name = job["spec"].get("name", "")
    for message in result["problems"]:
        print(f"{name}: problem: {message}", flush=True)
    for message in result["warnings"]:
        print(f"{name}: warning: {message}", flush=True)
    verdict = "ok" if result["ok"] else f"{len(result['problems'])} problem(s)"
    print(f"oddaemon.workers {command}: {name}: {verdict} in {result['duration_seconds']:.2f}s -> {result_path}",
          flush=True)


def run(args) -> int:
    job = load_job(args.job)
    _setup()
    check_one(job, args.result)
    return EXIT_OK


def serve(args) -> int:
    """The warm preflight: tensorflow imported once, then job after job from stdin."""
    from oddaemon.workers import WorkerError

    replies = os.fdopen(args.reply_fd, "w", buffering=1, encoding="utf-8")
    _setup()
    replies.write(json.dumps({"event": "ready"}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            job_path, result_path = str(request["job"]), str(request["result"])
        except (ValueError, KeyError, TypeError):
            print(f"oddaemon.workers preflight-serve: unreadable request {line.strip()[:200]!r}", flush=True)
            continue
        try:
            check_one(load_job(job_path), result_path, "preflight-serve")
        except WorkerError as exc:  # an unreadable job file: no result, the daemon says why
            print(f"oddaemon.workers preflight-serve: {exc}", file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - one job's crash must not end the warm preflight
            import traceback

            traceback.print_exc()
        replies.write(json.dumps({"event": "done", "result": result_path}) + "\n")
    return EXIT_OK

