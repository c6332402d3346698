"""The stand-in worker's shared parts: its directives, the numbers it "trains" to (scalars, metrics,
learning rate), the checkpoint state file, its setup from the job, and its output in TF's words.
No TensorFlow: the stand-in runs in milliseconds where the real workers take minutes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import time
from dataclasses import dataclass, field

DIRECTIVE_DEFAULTS: dict[str, float | int | None] = {
    "step_seconds": 0.02, "crash_at_step": None, "crash_times": None, "exit_code": 1,
    "hang_at_step": None, "oom_at_step": None, "nan_at_step": None, "log_lines_per_step": 0,
    "eval_seconds": 0.05, "eval_crash": None, "map_peak_step": None, "ignore_sigterm": 0,
    "eval_crash_times": None, "export_seconds": 0.05, "preflight_problem": None,
    "eval_crash_point": None,  # where eval_crash strikes: "before" the events (default), "events", "result"
    "preflight_seconds": 0.0,  # how long the preflight check of the job takes
    "crash_text": None, "nan_loss_from_step": None, "oom_above_batch": None, "export_crash_text": None,
    "checkpoint_bytes": None, "crash_log": None, "checkpoint_shards": 1,
    # TF's cadence (model_lib_v2.train_loop with the real worker's num_steps_per_iteration): scalars
    # once per iteration (None: as the real worker picks it, see workers.train.plan_phases) through a
    # summary writer that flushes every 10 events or 120 s; "Step N per-step time" every 100 steps
    "summary_every_n": None, "summary_max_queue": 10, "summary_flush_seconds": 120.0, "log_every_n": 100,
    "eval_ready_seconds": 0.5,  # the real evaluator builds its model before it is ready
    "eval_input_name": None,  # eval_input_reader.name: the real evaluator writes to eval/<name>
    "map_lr_scale": None,  # mAP times min(1, learning_rate_base * this): a sweep's variants score apart
    "allocate_mib_at_step": None, "allocate_mib": 256,  # host memory taken (and held) at that step
}
_DIRECTIVE_TYPES = {key: float if key.endswith(("_seconds", "_scale"))
                    else str if key.endswith(("_problem", "_text", "_log", "_name", "_point"))
                    else int for key in DIRECTIVE_DEFAULTS}
_PIPELINE_NUMBERS = {"num_steps": int, "batch_size": int, "learning_rate_base": float,
                     "warmup_learning_rate": float, "warmup_steps": int, "total_steps": int}
DEFAULT_NUM_STEPS = 100
DEFAULT_BATCH_SIZE = 8
DEFAULT_CHECKPOINT_EVERY_N = 1000  # TF OD API's defaults
DEFAULT_MAX_TO_KEEP = 7
TRAIN_TAGS = ("Loss/classification_loss", "Loss/localization_loss", "Loss/regularization_loss",
              "Loss/total_loss", "learning_rate", "steps_per_sec")
_MAP_RATIOS = {  # COCO metric -> multiple of mAP (capped at 1)
    "DetectionBoxes_Precision/mAP": 1.0, "DetectionBoxes_Precision/mAP@.50IOU": 1.6,
    "DetectionBoxes_Precision/mAP@.75IOU": 0.9, "DetectionBoxes_Precision/mAP (small)": 0.4,
    "DetectionBoxes_Precision/mAP (medium)": 0.9, "DetectionBoxes_Precision/mAP (large)": 1.2,
    "DetectionBoxes_Recall/AR@1": 0.8, "DetectionBoxes_Recall/AR@10": 1.2,
    "DetectionBoxes_Recall/AR@100": 1.3, "DetectionBoxes_Recall/AR@100 (small)": 0.6,
    "DetectionBoxes_Recall/AR@100 (medium)": 1.2, "DetectionBoxes_Recall/AR@100 (large)": 1.5,
}
CRASH_MARKER = ".standin-crashes"
STATE_FILE = "checkpoint"
TERMINATED = []  # non-empty once SIGTERM arrived

# ------------------------------------------------------------------------------------ pure helpers


def parse_directives(text: str) -> dict:
    """Every directive with its default, overridden by ``# standin: key = value`` lines.
    Raises ValueError for an unknown key, a line without ``=`` or a value of the wrong type."""
    directives = dict(DIRECTIVE_DEFAULTS)
    for line in re.findall(r"^\s*#\s*standin:(.*)$", text, re.MULTILINE):
        key, equals, raw = (part.strip() for part in line.partition("="))
        if key not in _DIRECTIVE_TYPES or not equals:
            raise ValueError(f"bad standin directive {line.strip()!r} (keys: {', '.join(DIRECTIVE_DEFAULTS)})")
        try:
            directives[key] = _DIRECTIVE_TYPES[key](raw)
        except ValueError:
            raise ValueError(f"standin directive {key}: {raw!r} is not {_DIRECTIVE_TYPES[key].__name__}") from None
    return directives


def effective_pipeline(config_text: str, overrides: dict | None) -> dict:
    """num_steps, batch_size and the cosine-decay fields found in the text proto (first match, comments
    ignored; None when absent), then every non-None ``[pipeline]`` override from the job."""
    body = "\n".join(line for line in config_text.splitlines() if not line.lstrip().startswith("#"))
    pipeline = {}
    for key, kind in _PIPELINE_NUMBERS.items():
        match = re.search(rf"\b{key}\s*:\s*([-+0-9.eE]+)", body)
        pipeline[key] = kind(float(match.group(1))) if match else None
    pipeline.update({key: value for key, value in (overrides or {}).items() if value is not None})
    return pipeline


def setting(mapping: dict | None, key: str, default):
    value = (mapping or {}).get(key)
    return default if value is None else value


def float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def learning_rate(step: int, pipeline: dict | None) -> float:
    """TF OD API's cosine_decay_with_warmup (no hold)."""
    base = setting(pipeline, "learning_rate_base", 0.08)
    warmup_rate = setting(pipeline, "warmup_learning_rate", 0.001)
    warmup_steps = setting(pipeline, "warmup_steps", 10)
    total_steps = setting(pipeline, "total_steps", setting(pipeline, "num_steps", DEFAULT_NUM_STEPS))
    if step > total_steps:
        return 0.0
    if step < warmup_steps:
        return warmup_rate + (base - warmup_rate) * step / warmup_steps
    return 0.5 * base * (1 + math.cos(math.pi * (step - warmup_steps) / max(1, total_steps - warmup_steps)))


def train_scalars(step: int, pipeline: dict | None, step_seconds: float = DIRECTIVE_DEFAULTS["step_seconds"]
                  ) -> dict[str, float]:
    """The training scalars written at ``step`` (float32 values, as read back from the event files).
    Pass the same pipeline the run used: ``effective_pipeline(config_text, spec["pipeline"])``."""
    classification = 1.0 / (1 + 0.05 * step) + 0.1
    localization = 0.5 / (1 + 0.05 * step) + 0.05
    regularization = 0.01
    values = dict(zip(TRAIN_TAGS, (
        classification, localization, regularization, classification + localization + regularization,
        learning_rate(step, pipeline), 1000.0 if step_seconds <= 0 else min(1000.0, 1.0 / step_seconds))))
    return {tag: float32(value) for tag, value in values.items()}


def eval_metrics(step: int, map_peak_step: int | None = None, scale: float = 1.0) -> dict[str, float]:
    """COCO detection metrics and eval losses of the checkpoint at ``step`` (float32 values). mAP rises
    as 0.5*(1-exp(-step/50)) (times ``scale``); with ``map_peak_step`` it mirrors down after that step."""
    progress = step if map_peak_step is None or step <= map_peak_step else max(0, 2 * map_peak_step - step)
    mean_ap = 0.5 * (1 - math.exp(-progress / 50)) * scale
    metrics = {key: min(1.0, mean_ap * ratio) for key, ratio in _MAP_RATIOS.items()}
    localization = 0.6 / (1 + 0.05 * progress) + 0.06
    classification = 1.2 / (1 + 0.05 * progress) + 0.12
    metrics.update({"Loss/localization_loss": localization, "Loss/classification_loss": classification,
                    "Loss/regularization_loss": 0.01, "Loss/total_loss": localization + classification + 0.01})
    return {key: float32(value) for key, value in metrics.items()}


def parse_state(model_dir: str) -> list[tuple[str, float | None]]:
    """(name as written, timestamp) of each kept checkpoint, oldest first, from the ``checkpoint`` file."""
    try:
        with open(os.path.join(model_dir, STATE_FILE), encoding="utf-8") as state:
            lines = state.read().splitlines()
    except FileNotFoundError:
        return []
    latest, kept, stamps = None, [], []
    for line in lines:
        key, _, value = (part.strip() for part in line.partition(":"))
        if key == "model_checkpoint_path":
            latest = value.strip('"')
        elif key == "all_model_checkpoint_paths":
            kept.append(value.strip('"'))
        elif key == "all_model_checkpoint_timestamps":
            stamps.append(float(value))
    if latest is not None and latest not in kept:
        kept.append(latest)
    return list(zip(kept, stamps + [None] * len(kept)))


def read_checkpoint_state(model_dir: str) -> list[str]:
    """Prefixes of the kept checkpoints (joined to model_dir when relative), oldest first."""
    return [os.path.join(model_dir, name) for name, _ in parse_state(model_dir)]


def read_index(prefix: str) -> dict:
    """``<prefix>.index`` as the stand-in trainer wrote it ({"step": int, "shards": int, ...}).
    OSError if unreadable, ValueError if not a stand-in index."""
    with open(prefix + ".index", "rb") as index:
        data = index.read()
    try:
        fields = json.loads(data)
    except ValueError:
        fields = None
    if not isinstance(fields, dict) or not isinstance(fields.get("step"), int):
        raise ValueError(f"{prefix}.index is not a stand-in checkpoint index")
    return fields


def checkpoint_step(prefix: str) -> int:
    """The step stored in ``<prefix>.index``. OSError if unreadable, ValueError if not a stand-in index."""
    return read_index(prefix)["step"]


# ------------------------------------------------------------------------------------------ worker


def err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def log_tf(message: str, source: str = "model_lib_v2.py:705") -> None:
    """One message the way TF logs it: an absl line, then the python-logging line."""
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now))
    err(f"I{stamp}.{int(now % 1 * 1e6):06d} {os.getpid():5d} {source}] {message}\nINFO:tensorflow:{message}")


def print_traceback(function: str, code: str, error: str) -> None:
    where = "/usr/local/lib/python3.11/site-packages/object_detection/model_lib_v2.py"
    err(f'Traceback (most recent call last):\n  File "{where}", line 680, in {function}\n    {code}\n{error}')


class Terminated(Exception):
    pass


def on_sigterm(signum, frame) -> None:
    TERMINATED.append(signum)


def sleep(seconds: float) -> None:
    """Sleeps in short slices; raises Terminated once SIGTERM arrived (checked before sleeping too)."""
    deadline = time.monotonic() + seconds
    while not TERMINATED:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 0.05))
    raise Terminated


class SetupError(Exception):
    """The job file or pipeline config cannot be used."""


@dataclass
class Setup:
    name: str
    attempt: int
    model_dir: str
    directives: dict
    pipeline: dict
    checkpoint_every_n: int
    max_to_keep: int | None
    inputs: list[str] = field(default_factory=list)  # train input globs
    fine_tune_checkpoint: str | None = None
    eval_metric: str = "DetectionBoxes_Precision/mAP"  # the job's [eval] metric: what a retry looks for


def load_setup(job_path: str) -> Setup:
    try:
        with open(job_path, "rb") as job_file:
            job = json.loads(job_file.read())
        spec = job["spec"]
        with open(spec["pipeline_config"], encoding="utf-8") as config:
            text = config.read()
        train = spec.get("train")
        edits = spec.get("pipeline") or {}
        inputs = edits.get("train_input_path") or _train_input_paths(text)
        return Setup(str(spec.get("name", "")), int(job.get("attempt", 1)), spec["model_dir"],
                     parse_directives(text), effective_pipeline(text, spec.get("pipeline")),
                     int(setting(train, "checkpoint_every_n", DEFAULT_CHECKPOINT_EVERY_N)),
                     setting(train, "checkpoint_max_to_keep", DEFAULT_MAX_TO_KEEP),
                     [inputs] if isinstance(inputs, str) else list(inputs),
                     edits.get("fine_tune_checkpoint") or _text_field(text, "fine_tune_checkpoint"),
                     str(setting(spec.get("eval") or {}, "metric", "DetectionBoxes_Precision/mAP")))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"standin: cannot use job {job_path}: {type(exc).__name__}: {exc}") from None


def _text_field(text: str, key: str) -> str | None:
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    match = re.search(rf'\b{key}\s*:\s*"([^"]*)"', body)
    return match.group(1) if match and match.group(1) else None


def _train_input_paths(text: str) -> list[str]:
    """The input_path values of train_input_reader in a pipeline.config text (no proto parser)."""
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    start = body.find("train_input_reader")
    if start < 0:
        return []
    end = body.find("eval_input_reader", start)
    return re.findall(r'\binput_path\s*:\s*"([^"]*)"', body[start:end if end > 0 else len(body)])


def take_failure_budget(model_dir: str, marker_name: str, limit: int | None) -> bool:
    """Count one planned failure in ``model_dir/marker_name``; False once ``limit`` were used."""
    marker = os.path.join(model_dir, marker_name)
    try:
        with open(marker, encoding="utf-8") as counter:
            count = int(counter.read().strip() or 0)
    except (OSError, ValueError):
        count = 0
    if limit is not None and count >= limit:
        return False
    with open(marker, "w", encoding="utf-8") as counter:
        counter.write(f"{count + 1}\n")
    return True


