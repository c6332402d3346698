"""Apply a job's ``[pipeline]`` edits to a TF OD API pipeline.config, with the library's own protos.

    proto = load_pipeline(path)                  # PipelineError with the line number on a syntax error
    edited = apply_edits(proto, spec["pipeline"])  # PipelineError naming every edit that cannot apply
    path = write_effective(edited, model_dir)    # model_dir/pipeline.config, atomically

The edits are the ones the manual workflow makes by hand: ``model.<arch>.num_classes``,
``train_config.batch_size`` / ``num_steps`` / ``fine_tune_checkpoint`` / ``fine_tune_checkpoint_type``,
the optimizer's ``cosine_decay_learning_rate`` fields, ``label_map_path`` of the train and every eval
input reader, and the ``tf_record_input_reader.input_path`` lists (globs are kept as globs: the
library expands them itself).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

COSINE_FIELDS = ("learning_rate_base", "total_steps", "warmup_learning_rate", "warmup_steps")


class PipelineError(Exception):
    """The pipeline.config cannot be read or edited; ``problems`` are complete user messages."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def _pipeline_pb2():
    from object_detection.protos import pipeline_pb2

    return pipeline_pb2


def parse_pipeline_text(text: str, path: str):
    """A TrainEvalPipelineConfig from text; PipelineError("pipeline_config PATH line N: ...")."""
    from google.protobuf import text_format

    proto = _pipeline_pb2().TrainEvalPipelineConfig()
    try:
        text_format.Merge(text, proto)
    except text_format.ParseError as exc:
        line, column = exc.GetLine(), exc.GetColumn()
        message = str(exc)
        # ParseError's text starts with "LINE:COLUMN : "; the location is given in our own words.
        prefix = f"{line}:{column} : "
        if line is not None and message.startswith(prefix):
            message = message[len(prefix):]
        where = f" line {line}" if line is not None else ""
        raise PipelineError([f"pipeline_config {path}{where}: {message}"]) from None
    return proto


def load_pipeline(path: str):
    try:
        with open(path, encoding="utf-8") as config:
            text = config.read()
    except UnicodeDecodeError as exc:
        raise PipelineError([f"pipeline_config {path}: not UTF-8 text ({exc.reason} at byte {exc.start})"]) from None
    except OSError as exc:
        raise PipelineError([f"pipeline_config {path}: cannot read it: {exc.strerror or exc}"]) from None
    return parse_pipeline_text(text, path)


def _edits(edits: Any) -> dict:
    """Non-None edits from a PipelineEdits dataclass or its dict (JobSpec.to_dict())."""
    if edits is None:
        return {}
    if not isinstance(edits, dict):
        from dataclasses import asdict

        edits = asdict(edits)
    return {key: value for key, value in edits.items() if value is not None}


def _model_with_num_classes(proto):
    arch = proto.model.WhichOneof("model")
    if arch is None:
        return None, "the pipeline.config has no model { ... } section"
    model = getattr(proto.model, arch)
    if "num_classes" not in model.DESCRIPTOR.fields_by_name:
        return None, f"the model type {arch} has no num_classes field"
    return model, None


def _cosine(proto):
    """The cosine_decay_learning_rate message of the optimizer, or (None, why not)."""
    optimizer = proto.train_config.optimizer
    kind = optimizer.WhichOneof("optimizer")
    if kind is None:
        return None, "train_config has no optimizer"
    schedule = getattr(optimizer, kind).learning_rate
    which = schedule.WhichOneof("learning_rate")
    if which != "cosine_decay_learning_rate":
        return None, (f"train_config.optimizer.{kind}.learning_rate uses {which or 'no schedule'}, "
                      "not cosine_decay_learning_rate")
    return schedule.cosine_decay_learning_rate, None


def _set_input_paths(reader, paths: list[str]) -> str | None:
    kind = reader.WhichOneof("input_reader")
    if kind not in (None, "tf_record_input_reader"):
        return f"the input reader uses {kind}, not tf_record_input_reader"
    reader.tf_record_input_reader.ClearField("input_path")
    reader.tf_record_input_reader.input_path.extend(paths)
    return None


def apply_edits(proto, edits: Any):
    """A copy of ``proto`` with every non-None ``[pipeline]`` edit applied; PipelineError lists the
    edits that cannot apply to this config."""
    edited = _pipeline_pb2().TrainEvalPipelineConfig()
    edited.CopyFrom(proto)
    edits = _edits(edits)
    problems: list[str] = []
    train = edited.train_config

    if "num_classes" in edits:
        model, why = _model_with_num_classes(edited)
        if model is None:
            problems.append(f"[pipeline] num_classes: {why}")
        else:
            model.num_classes = int(edits["num_classes"])
    if "batch_size" in edits:
        train.batch_size = int(edits["batch_size"])
    if "num_steps" in edits:
        train.num_steps = int(edits["num_steps"])
    cosine_edits = [key for key in COSINE_FIELDS if key in edits]
    if cosine_edits:
        cosine, why = _cosine(edited)
        if cosine is None:
            problems.append(f"[pipeline] {', '.join(cosine_edits)}: {why}; remove the key(s) or use a "
                            "pipeline.config with a cosine decay learning rate")
        else:
            for key in cosine_edits:
                kind = float if key in ("learning_rate_base", "warmup_learning_rate") else int
                setattr(cosine, key, kind(edits[key]))
    if "fine_tune_checkpoint" in edits:
        train.fine_tune_checkpoint = str(edits["fine_tune_checkpoint"])
    if "fine_tune_checkpoint_type" in edits:
        train.fine_tune_checkpoint_type = str(edits["fine_tune_checkpoint_type"])
    if "label_map_path" in edits:
        edited.train_input_reader.label_map_path = str(edits["label_map_path"])
        for reader in edited.eval_input_reader:
            reader.label_map_path = str(edits["label_map_path"])
    if "train_input_path" in edits:
        why = _set_input_paths(edited.train_input_reader, _as_list(edits["train_input_path"]))
        if why:
            problems.append(f"[pipeline] train_input_path: train_input_reader: {why}")
    if "eval_input_path" in edits:
        if not edited.eval_input_reader:
            reader = edited.eval_input_reader.add()
            reader.label_map_path = edited.train_input_reader.label_map_path
            reader.shuffle = False
            reader.num_epochs = 1
        for index, reader in enumerate(edited.eval_input_reader):
            why = _set_input_paths(reader, _as_list(edits["eval_input_path"]))
            if why:
                problems.append(f"[pipeline] eval_input_path: eval_input_reader #{index + 1}: {why}")
    if problems:
        raise PipelineError(problems)
    tf2_ready(edited)
    return edited


def tf2_ready(proto) -> None:
    """Fine-tuning as the manual workflow does it: ``model_main_tf2`` loads only V2 (object-based)
    checkpoints, but the proto's default ``fine_tune_checkpoint_version`` is V1, so a config that
    sets ``fine_tune_checkpoint`` without the version fails with "Checkpoint version should be V2".
    A fine-tune checkpoint with no version given gets V2; one the config sets to V1 explicitly is
    refused by ``check_effective`` with the line to change."""
    train = proto.train_config
    if train.fine_tune_checkpoint and not train.HasField("fine_tune_checkpoint_version"):
        from object_detection.protos import train_pb2

        train.fine_tune_checkpoint_version = train_pb2.V2


def _as_list(value: Any) -> list[str]:
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def check_effective(proto) -> tuple[list[str], list[str]]:
    """(problems, warnings) of an effective config that would make training fail or surprise."""
    problems: list[str] = []
    warnings: list[str] = []
    train = proto.train_config
    model, why = _model_with_num_classes(proto)
    if model is None:
        problems.append(f"effective pipeline.config: {why}")
    elif model.num_classes < 1:
        problems.append("effective pipeline.config: num_classes is 0; set [pipeline] num_classes")
    if train.batch_size < 1:
        problems.append("effective pipeline.config: train_config.batch_size is 0; set [pipeline] batch_size")
    if train.num_steps < 1:
        problems.append("effective pipeline.config: train_config.num_steps is 0 (train forever); "
                        "set [pipeline] num_steps")
    cosine, _ = _cosine(proto)
    if cosine is not None:
        if cosine.warmup_steps > cosine.total_steps:
            problems.append(f"effective pipeline.config: warmup_steps {cosine.warmup_steps} is larger than "
                            f"total_steps {cosine.total_steps}; TF refuses to train (set [pipeline] "
                            "warmup_steps / total_steps)")
        if cosine.warmup_learning_rate > cosine.learning_rate_base:
            problems.append(f"effective pipeline.config: warmup_learning_rate {cosine.warmup_learning_rate:g} "
                            f"is larger than learning_rate_base {cosine.learning_rate_base:g}; TF refuses "
                            "to train (set [pipeline] warmup_learning_rate / learning_rate_base)")
        if train.num_steps and cosine.total_steps < train.num_steps:
            warnings.append(f"total_steps {cosine.total_steps} is smaller than num_steps {train.num_steps}: "
                            f"the learning rate is 0 for the last {train.num_steps - cosine.total_steps} "
                            "steps (set [pipeline] total_steps = num_steps)")
    reader = proto.train_input_reader
    if reader.WhichOneof("input_reader") != "tf_record_input_reader" or not reader.tf_record_input_reader.input_path:
        problems.append("effective pipeline.config: train_input_reader has no tf_record_input_reader "
                        "input_path; set [pipeline] train_input_path")
    if not reader.label_map_path:
        problems.append("effective pipeline.config: train_input_reader has no label_map_path; "
                        "set [pipeline] label_map_path")
    if train.fine_tune_checkpoint and train.fine_tune_checkpoint_version != 2:  # CheckpointVersion.V2
        problems.append("effective pipeline.config: train_config.fine_tune_checkpoint_version is not V2, and "
                        "model_main_tf2 (TF2) restores only V2 checkpoints: in the pipeline.config, change the "
                        "line to `fine_tune_checkpoint_version: V2` (or remove it: oddaemon then sets V2)")
    if train.fine_tune_checkpoint and not train.fine_tune_checkpoint_type:
        warnings.append("fine_tune_checkpoint is set but fine_tune_checkpoint_type is not; TF then "
                        "assumes \"classification\" (set [pipeline] fine_tune_checkpoint_type)")
    return problems, warnings


def effective_pipeline(spec: dict):
    """Load spec["pipeline_config"] and apply spec["pipeline"]; PipelineError on any problem."""
    return apply_edits(load_pipeline(spec["pipeline_config"]), spec.get("pipeline"))


def write_effective(proto, model_dir: str, source: str | None = None) -> str:
    """Write ``model_dir/pipeline.config`` with ``config_util.save_pipeline_config``, atomically
    (saved into a temporary directory in model_dir, then renamed over the old file). When ``source``
    (the job's own pipeline_config) is that very file, the original is kept once as
    ``pipeline.config.orig`` before it is replaced."""
    from object_detection.utils import config_util

    os.makedirs(model_dir, exist_ok=True)
    target = os.path.join(model_dir, "pipeline.config")
    temp_dir = tempfile.mkdtemp(prefix=".pipeline-", dir=model_dir)
    try:
        config_util.save_pipeline_config(proto, temp_dir)
        if (source and os.path.exists(target) and not os.path.exists(target + ".orig")
                and os.path.realpath(source) == os.path.realpath(target)):
            shutil.copy2(target, target + ".orig")
        os.replace(os.path.join(temp_dir, "pipeline.config"), target)
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
    return target


def prepare(spec: dict) -> tuple[str, Any]:
    """Effective config of a job written to model_dir/pipeline.config: (its path, the proto).

    The source config is read before anything is written, so a job whose pipeline_config *is*
    model_dir/pipeline.config (the manual workflow's layout) gets the same result every time: the
    edits set values, they never accumulate."""
    proto = effective_pipeline(spec)
    return write_effective(proto, spec["model_dir"], spec["pipeline_config"]), proto
