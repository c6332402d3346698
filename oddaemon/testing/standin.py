"""The stand-in worker: behaves like TF OD API's trainer and evaluator at the file level, without TF.

    python -m oddaemon.testing.standin train --job JOB.json
    python -m oddaemon.testing.standin eval --job JOB.json --checkpoint PREFIX --result OUT.json

Behaviour comes from the pipeline.config: ``num_steps``/``batch_size`` (and the cosine learning-rate
fields) as in the text proto, overridden by the job's ``[pipeline]`` values, plus comment directives
``# standin: key = value`` (see ``DIRECTIVE_DEFAULTS``). The failure directives ``hang_at_step``,
``oom_at_step``, ``nan_at_step`` and ``crash_at_step`` fire when training is about to complete that
step (nothing of that step is written) and share the ``crash_times`` budget, counted in
``model_dir/.standin-crashes``; ``crash_text`` replaces crash_at_step's last line (e.g. a TF error).
Like the real trainer, ``nan_loss_from_step`` keeps training with NaN losses from that step on, and
``oom_above_batch`` fails with TF's out-of-memory error while the batch size is above it. Checkpoints are named by save count like TF's CheckpointManager:
ckpt-1 holds step 0. Scalars go to ``model_dir/train`` and ``model_dir/eval`` one event per tag, as
TF writes them; values are float32-exact, so ``train_scalars``/``eval_metrics`` equal what is read back.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import re
import shutil
import signal
import struct
import sys
import time
from dataclasses import dataclass

from oddaemon.tfevents import EventFileWriter

DIRECTIVE_DEFAULTS: dict[str, float | int | None] = {
    "step_seconds": 0.02, "crash_at_step": None, "crash_times": None, "exit_code": 1,
    "hang_at_step": None, "oom_at_step": None, "nan_at_step": None, "log_lines_per_step": 1,
    "eval_seconds": 0.05, "eval_crash": None, "map_peak_step": None, "ignore_sigterm": 0,
    "eval_crash_times": None, "export_seconds": 0.05, "preflight_problem": None,
    "crash_text": None, "nan_loss_from_step": None, "oom_above_batch": None, "export_crash_text": None,
    "checkpoint_bytes": None,
}
_DIRECTIVE_TYPES = {key: float if key.endswith("_seconds") else str if key.endswith(("_problem", "_text")) else int
                    for key in DIRECTIVE_DEFAULTS}
_FAILURES = ("hang_at_step", "oom_at_step", "nan_at_step", "crash_at_step")
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
_TERMINATED = []  # non-empty once SIGTERM arrived
_line_numbers = itertools.count(1)

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


def _setting(mapping: dict | None, key: str, default):
    value = (mapping or {}).get(key)
    return default if value is None else value


def _float32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


def learning_rate(step: int, pipeline: dict | None) -> float:
    """TF OD API's cosine_decay_with_warmup (no hold)."""
    base = _setting(pipeline, "learning_rate_base", 0.08)
    warmup_rate = _setting(pipeline, "warmup_learning_rate", 0.001)
    warmup_steps = _setting(pipeline, "warmup_steps", 10)
    total_steps = _setting(pipeline, "total_steps", _setting(pipeline, "num_steps", DEFAULT_NUM_STEPS))
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
    return {tag: _float32(value) for tag, value in values.items()}


def eval_metrics(step: int, map_peak_step: int | None = None) -> dict[str, float]:
    """COCO detection metrics and eval losses of the checkpoint at ``step`` (float32 values). mAP rises
    as 0.5*(1-exp(-step/50)); with ``map_peak_step`` it mirrors down after that step."""
    progress = step if map_peak_step is None or step <= map_peak_step else max(0, 2 * map_peak_step - step)
    mean_ap = 0.5 * (1 - math.exp(-progress / 50))
    metrics = {key: min(1.0, mean_ap * ratio) for key, ratio in _MAP_RATIOS.items()}
    localization = 0.6 / (1 + 0.05 * progress) + 0.06
    classification = 1.2 / (1 + 0.05 * progress) + 0.12
    metrics.update({"Loss/localization_loss": localization, "Loss/classification_loss": classification,
                    "Loss/regularization_loss": 0.01, "Loss/total_loss": localization + classification + 0.01})
    return {key: _float32(value) for key, value in metrics.items()}


def _parse_state(model_dir: str) -> list[tuple[str, float | None]]:
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
    return [os.path.join(model_dir, name) for name, _ in _parse_state(model_dir)]


def checkpoint_step(prefix: str) -> int:
    """The step stored in ``<prefix>.index``. OSError if unreadable, ValueError if not a stand-in index."""
    with open(prefix + ".index", "rb") as index:
        data = index.read()
    try:
        step = json.loads(data)["step"]
    except (ValueError, KeyError, TypeError):
        step = None
    if not isinstance(step, int):
        raise ValueError(f"{prefix}.index is not a stand-in checkpoint index")
    return step


# ------------------------------------------------------------------------------------------ worker


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _log(message: str, source: str = "model_lib_v2.py:705") -> None:
    """One message the way TF logs it: an absl line, then the python-logging line."""
    now = time.time()
    stamp = time.strftime("%m%d %H:%M:%S", time.localtime(now))
    _err(f"I{stamp}.{int(now % 1 * 1e6):06d} {os.getpid():5d} {source}] {message}\nINFO:tensorflow:{message}")


def _traceback(function: str, code: str, error: str) -> None:
    where = "/usr/local/lib/python3.11/site-packages/object_detection/model_lib_v2.py"
    _err(f'Traceback (most recent call last):\n  File "{where}", line 680, in {function}\n    {code}\n{error}')


class _Terminated(Exception):
    pass


def _on_sigterm(signum, frame) -> None:
    _TERMINATED.append(signum)


def _sleep(seconds: float) -> None:
    """Sleeps in short slices; raises _Terminated once SIGTERM arrived (checked before sleeping too)."""
    deadline = time.monotonic() + seconds
    while not _TERMINATED:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        time.sleep(min(remaining, 0.05))
    raise _Terminated


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


def load_setup(job_path: str) -> Setup:
    try:
        with open(job_path, "rb") as job_file:
            job = json.loads(job_file.read())
        spec = job["spec"]
        with open(spec["pipeline_config"], encoding="utf-8") as config:
            text = config.read()
        train = spec.get("train")
        return Setup(str(spec.get("name", "")), int(job.get("attempt", 1)), spec["model_dir"],
                     parse_directives(text), effective_pipeline(text, spec.get("pipeline")),
                     int(_setting(train, "checkpoint_every_n", DEFAULT_CHECKPOINT_EVERY_N)),
                     _setting(train, "checkpoint_max_to_keep", DEFAULT_MAX_TO_KEEP))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SetupError(f"standin: cannot use job {job_path}: {type(exc).__name__}: {exc}") from None


class _CheckpointManager:
    """Saves like tf.train.CheckpointManager: numbered by save count, state file, max_to_keep."""

    def __init__(self, model_dir: str, max_to_keep: int | None, checkpoint_bytes: int | None = None):
        self.model_dir = model_dir
        self.checkpoint_bytes = checkpoint_bytes
        self.max_to_keep = max_to_keep
        self.preserved = time.time()
        self.kept = [(name, stamp or self.preserved) for name, stamp in _parse_state(model_dir)]
        match = re.search(r"-(\d+)$", self.kept[-1][0]) if self.kept else None
        self.save_counter = int(match.group(1)) if match else len(self.kept)

    def _path(self, name: str) -> str:
        return os.path.join(self.model_dir, name)

    def save(self, step: int) -> None:
        self.save_counter += 1
        name = f"ckpt-{self.save_counter}"
        temp_dir = self._path(name + "_temp")
        os.makedirs(temp_dir, exist_ok=True)
        with open(os.path.join(temp_dir, "part.data"), "wb") as data:
            text = f"standin checkpoint data for step {step}\n".encode()
            data.write(text + b" " * max(0, (self.checkpoint_bytes or 0) - len(text)))  # (a real one's size)
        os.replace(os.path.join(temp_dir, "part.data"), self._path(name + ".data-00000-of-00001"))
        with open(self._path(name + ".index"), "w", encoding="utf-8") as index:
            json.dump({"step": step, "standin": True}, index)
        shutil.rmtree(temp_dir)
        # (a crash between writing the files and the state reuses a number: replace that entry)
        self.kept = [entry for entry in self.kept if entry[0] != name] + [(name, time.time())]
        self._write_state()  # like TF: record first, then sweep, then record again
        keep = self.max_to_keep or len(self.kept)
        if len(self.kept) > keep:
            for old, _ in self.kept[:-keep]:
                for suffix in (".index", ".data-00000-of-00001"):
                    try:
                        os.remove(self._path(old + suffix))
                    except FileNotFoundError:
                        pass
            self.kept = self.kept[-keep:]
            self._write_state()

    def _write_state(self) -> None:
        lines = [f'model_checkpoint_path: "{self.kept[-1][0]}"']
        lines += [f'all_model_checkpoint_paths: "{name}"' for name, _ in self.kept]
        lines += [f"all_model_checkpoint_timestamps: {stamp!r}" for _, stamp in self.kept]
        lines.append(f"last_preserved_timestamp: {self.preserved!r}")
        temp = self._path(f"{STATE_FILE}.tmp{os.getpid()}")
        with open(temp, "w", encoding="utf-8") as state:
            state.write("\n".join(lines) + "\n")
        os.replace(temp, self._path(STATE_FILE))


def _failure_due(setup: Setup, step: int) -> str | None:
    """The failure directive that fires at ``step``, counted against crash_times."""
    due = [key for key in _FAILURES if setup.directives[key] == step]
    if not due or not take_failure_budget(setup.model_dir, CRASH_MARKER, setup.directives["crash_times"]):
        return None
    return due[0]


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


def _fail(setup: Setup, failure: str, step: int) -> int:
    """Acts out a failure directive; returns the exit status (a hang only ends through SIGTERM)."""
    if failure == "hang_at_step":
        _err(f"standin: hanging at step {step}")
        _sleep(math.inf)
    call = "loss = _dist_train_step(train_input_iter)"
    if failure == "oom_at_step":
        batch = _setting(setup.pipeline, "batch_size", DEFAULT_BATCH_SIZE)
        _traceback("train_loop", call, "tensorflow.python.framework.errors_impl.ResourceExhaustedError: OOM when "
                   f"allocating tensor with shape[{batch},64,80,80] and type float on "
                   "/job:localhost/replica:0/task:0/device:GPU:0 by allocator GPU_0_bfc [Op:Conv2D]")
        return 1
    if failure == "nan_at_step":
        _traceback("train_loop", call, "tensorflow.python.framework.errors_impl.InvalidArgumentError: "
                   f"Loss is NaN at step {step} : Tensor had NaN values [Op:CheckNumerics]")
        return 1
    _traceback("train_loop", call, setup.directives["crash_text"] or f"RuntimeError: standin: crash_at_step {step} reached")
    return setup.directives["exit_code"]


def train(setup: Setup) -> int:
    num_steps = _setting(setup.pipeline, "num_steps", DEFAULT_NUM_STEPS)
    step_seconds = setup.directives["step_seconds"]
    manager = _CheckpointManager(setup.model_dir, setup.max_to_keep, setup.directives["checkpoint_bytes"])
    if manager.kept:
        try:
            step = checkpoint_step(os.path.join(setup.model_dir, manager.kept[-1][0]))
        except (OSError, ValueError) as exc:
            _err(f"standin: cannot restore the latest checkpoint of {setup.model_dir}: {exc}")
            return 1
        _err(f"standin: resuming from step {step} ({manager.kept[-1][0]})")
    else:
        step = 0
        manager.save(0)
    _err(f"standin: train job {setup.name!r} attempt {setup.attempt}: step {step} of {num_steps}")
    batch = _setting(setup.pipeline, "batch_size", DEFAULT_BATCH_SIZE)
    if setup.directives["oom_above_batch"] is not None and batch > setup.directives["oom_above_batch"]:
        return _fail(setup, "oom_at_step", step + 1)
    nan_from = setup.directives["nan_loss_from_step"]
    writer = EventFileWriter(os.path.join(setup.model_dir, "train"))
    checkpointed = step
    try:
        while step < num_steps:
            failure = _failure_due(setup, step + 1)
            if failure:
                return _fail(setup, failure, step + 1)
            started = time.monotonic()
            _sleep(step_seconds)
            step += 1
            scalars = train_scalars(step, setup.pipeline, step_seconds)
            if nan_from is not None and step >= nan_from:
                scalars.update({tag: math.nan for tag in scalars if tag.startswith("Loss/")})
            for tag, value in scalars.items():
                writer.add_scalars(step, {tag: value})
            _log(f"Step {step} per-step time {time.monotonic() - started:.3f}s")
            losses = {tag: float(f"{value:.7g}") for tag, value in scalars.items() if tag != "steps_per_sec"}
            _log(str(losses), "model_lib_v2.py:708")
            for _ in range(setup.directives["log_lines_per_step"]):
                print(f"standin line {next(_line_numbers)}", flush=True)
            if step - checkpointed >= setup.checkpoint_every_n:
                manager.save(step)
                checkpointed = step
    except _Terminated:
        _err(f"standin: SIGTERM received at step {step}, exiting")
        return 143
    finally:
        writer.close()
    if checkpointed != step:
        manager.save(step)
    _err(f"standin: training finished at step {step}")
    return 0


def preflight(setup: Setup, result_path: str) -> None:
    problem = setup.directives["preflight_problem"]
    result = {"ok": problem is None, "problems": [problem] if problem else [], "warnings": [],
              "effective": {"num_steps": _setting(setup.pipeline, "num_steps", DEFAULT_NUM_STEPS)}}
    temp = f"{result_path}.tmp{os.getpid()}"
    with open(temp, "w", encoding="utf-8") as out:
        json.dump(result, out)
    os.replace(temp, result_path)
    _err(f"standin: preflight of {setup.name!r}: {'ok' if problem is None else problem}")


def preflight_serve(reply_fd: int) -> int:
    """The warm preflight protocol (``oddaemon.workers preflight-serve``): ready, then job after job."""
    replies = os.fdopen(reply_fd, "w", buffering=1, encoding="utf-8")
    replies.write(json.dumps({"event": "ready"}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        request: dict = {}
        try:
            request = json.loads(line)
            preflight(load_setup(str(request["job"])), str(request["result"]))
        except (ValueError, KeyError, TypeError, AttributeError, SetupError) as exc:
            _err(f"oddaemon.workers preflight-serve: {exc}")
        replies.write(json.dumps({"event": "done", "result": request.get("result")}) + "\n")
        if _TERMINATED:
            return 143
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
    signal.signal(signal.SIGTERM, _on_sigterm)
    if args.command == "preflight-serve":
        return preflight_serve(args.reply_fd)
    try:
        setup = load_setup(args.job)
    except SetupError as exc:
        _err(str(exc))
        return 2
    if setup.directives["ignore_sigterm"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # to test the daemon's SIGKILL after the grace period
    if args.command == "train":
        return train(setup)
    if args.command == "preflight":
        preflight(setup, args.result)
        return 0
    from oddaemon.testing import standin_eval  # noqa: PLC0415

    if args.command == "eval":
        return standin_eval.evaluate(setup, args.checkpoint, args.result)
    if args.command == "eval-serve":
        return standin_eval.serve(setup, args.reply_fd)
    return standin_eval.export(setup, args.checkpoint, args.output, args.info)


if __name__ == "__main__":
    sys.exit(main())
