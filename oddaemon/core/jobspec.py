"""Job spec v1: what a job is (the values a valid job file becomes), its limits and the GPU-count
rule. Pure values; ``core/job_validation.py`` turns a job file into them."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, is_dataclass
from typing import Any

from oddaemon.core.checks import Invalid, is_int, show


@dataclass(frozen=True)
class PipelineEdits:
    """Edits applied to pipeline.config before training; None leaves the value as it is."""

    num_classes: int | None = None
    batch_size: int | None = None
    num_steps: int | None = None
    learning_rate_base: float | None = None
    warmup_learning_rate: float | None = None
    warmup_steps: int | None = None
    total_steps: int | None = None
    fine_tune_checkpoint: str | None = None
    fine_tune_checkpoint_type: str | None = None
    label_map_path: str | None = None
    train_input_path: tuple[str, ...] | None = None
    eval_input_path: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TrainOptions:
    gpus: int | tuple[int, ...] | None = None  # None = auto: 1 GPU if the daemon has any, else CPU
    checkpoint_every_n: int = 1000
    checkpoint_max_to_keep: int = 7
    max_restarts: int | None = None  # None = daemon default
    hang_timeout_seconds: float | None = None  # None = daemon default; 0 = never declare the job hung
    oom_retry_halve_batch: bool = False  # on out-of-GPU-memory: restart with half the batch (and rate)
    min_batch_size: int = 1  # the floor for oom_retry_halve_batch
    memory_max: int | None = None  # bytes its cgroup may use (None: the daemon's [cgroups] train_memory_max)
    cpu_weight: int | None = None  # its cgroup's CPU weight (None: [cgroups] train_cpu_weight)


@dataclass(frozen=True)
class EvalOptions:
    enabled: bool = True
    device: str = "cpu"                                  # "cpu" | "gpu" | "auto"
    sample_1_of_n_eval_examples: int = 1
    metric: str = "DetectionBoxes_Precision/mAP"         # what "best" means
    higher_is_better: bool = True
    export_best: bool = False                            # export the best checkpoint to a SavedModel
    export_when: str = "end"                             # "end" (the final best, once) | "each_best"
    patience: int | None = None                          # early stopping: evaluations without improvement
    min_delta: float = 0.0                               # improvement smaller than this does not count
    when_behind: str = "evaluate_all"                    # "evaluate_all" | "skip_to_newest"
    max_behind: int = 3                                  # pending checkpoints before when_behind applies
    max_pinned_bytes: int | None = None                  # bytes only this job's pins may hold (None: daemon's)
    memory_max: int | None = None                        # evaluator's and exports' cgroup memory (None: daemon's)
    cpu_weight: int | None = None                        # their CPU weight (None: daemon's, lower on the CPU)


@dataclass(frozen=True)
class SlurmOptions:
    """What a job may choose of how it runs on Slurm ([cluster] backend = "slurm"; ignored locally)."""

    time_limit: str | None = None  # None = the daemon's [slurm] time_limit
    partition: str | None = None  # one of the daemon's [slurm] partitions; None = its [slurm] partition
    nodes: int = 1


@dataclass(frozen=True)
class NotifyOptions:
    """Which events of this job are sent to which of the daemon's ``[notify]`` targets (names only;
    None = the daemon's ``[notify] default_events`` / ``default_targets``); ``core/notifications.py``."""

    events: tuple[str, ...] | None = None
    targets: tuple[str, ...] | None = None
    stalled_after_seconds: float | None = None  # None = the daemon's [notify] stalled_after_seconds


@dataclass(frozen=True)
class SweepOptions:
    """A ``[sweep]`` table (``core/sweep.py``). On the file's spec: the definition (``method`` "" =
    no sweep); on each variant the same, with ``of`` (the sweep's name), ``index`` and ``assigned``."""

    method: str = ""  # "" | "grid" | "random"
    values: tuple[tuple[str, tuple[Any, ...]], ...] = ()  # ([pipeline] key, its values), in file order
    samples: int | None = None  # method = "random": how many combinations are drawn
    seed: int = 0
    halving_steps: tuple[int, ...] = ()  # successive halving's rungs (steps); () = no halving
    keep_fraction: float = 0.5  # at a rung, the best this fraction of the variants that reached it go on
    of: str = ""  # a variant: the sweep's name
    index: int = 0  # a variant: 1..N
    assigned: tuple[tuple[str, Any], ...] = ()  # a variant: its values

    def __post_init__(self) -> None:  # from JSON (lists) back to tuples
        object.__setattr__(self, "values", tuple((k, tuple(v)) for k, v in self.values))
        object.__setattr__(self, "halving_steps", tuple(self.halving_steps))
        object.__setattr__(self, "assigned", tuple((k, v) for k, v in self.assigned))


@dataclass(frozen=True)
class JobSpec:
    name: str
    pipeline_config: str
    model_dir: str
    priority: int = 0
    after: tuple[str, ...] = ()  # jobs that must succeed before this one is queued (core/dependencies.py)
    pipeline: PipelineEdits = PipelineEdits()
    train: TrainOptions = TrainOptions()
    eval: EvalOptions = EvalOptions()
    slurm: SlurmOptions = SlurmOptions()
    notify: NotifyOptions = NotifyOptions()
    sweep: SweepOptions = SweepOptions()
    # Not a key of the file: the real path of [pipeline] fine_tune_checkpoint when it did not exist
    # at submission, a checkpoint that a job in ``after`` is to write (it must lie in one of their
    # model_dirs: ``dependencies.awaited_problem``; it is looked for again before each start).
    awaits_checkpoint: str = ""

    def to_dict(self) -> dict:
        """JSON-safe dict (tuples become lists); ``JobSpec.from_dict`` reverses it."""
        return _plain(self)

    @classmethod
    def from_dict(cls, d: dict) -> JobSpec:
        parts = {"pipeline": PipelineEdits, "train": TrainOptions, "eval": EvalOptions, "slurm": SlurmOptions,
                 "notify": NotifyOptions, "sweep": SweepOptions}
        tables = {name: kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.get(name, {}).items()})
                  for name, kind in parts.items()}
        top = {k: v for k, v in d.items() if k not in parts}
        top["after"] = tuple(top.get("after", ()))
        return cls(**top, **tables)


def gpu_count(gpus: int | tuple[int, ...] | list[int] | None, available: int | None = None) -> int | None:
    """How many GPUs a ``[train] gpus`` value gets, the one rule: a number is itself, a list of ids
    its length; auto (None) is 1 when the daemon has ``available`` GPUs, 0 when it has none, and
    None while that is not known (``available`` None)."""
    if gpus is None:
        return None if available is None else (1 if available > 0 else 0)
    return gpus if isinstance(gpus, int) else len(gpus)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(x) for x in obj]
    return obj


MAX_PRIORITY = 1000  # priority is from -MAX_PRIORITY to MAX_PRIORITY
TABLES = ("pipeline", "train", "eval", "slurm", "notify", "sweep")
ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "": ("name", "pipeline_config", "model_dir", "priority", "after") + TABLES,
    "pipeline": tuple(f.name for f in fields(PipelineEdits)),
    "train": tuple(f.name for f in fields(TrainOptions)),
    "eval": tuple(f.name for f in fields(EvalOptions)),
    "slurm": tuple(f.name for f in fields(SlurmOptions)),
    "notify": tuple(f.name for f in fields(NotifyOptions)),
    "sweep": ("method", "values", "samples", "seed", "halving_steps", "keep_fraction"),
}
NOTIFY_CREDENTIALS = ("a job names the daemon's notification targets, it never gives an address or a command: "
                      "URLs (which often hold a token) and commands belong in the daemon configuration "
                      "([notify.targets.NAME] url, url_file or command)")
# Keys a job may not have, and why (the validator says so instead of "unknown key").
MISPLACED_KEYS = {("notify", key): NOTIFY_CREDENTIALS for key in ("url", "url_file", "command", "webhook",
                                                                   "webhook_url", "token", "format", "headers")}
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
NAME_RULE = ("a job name is 1 to 64 characters from A-Z a-z 0-9 '_' '.' '-', "
             "starts with a letter or digit and never contains '..'")
CHECKPOINT_TYPES = ("detection", "classification", "fine_tune", "full")
EVAL_DEVICES = ("cpu", "gpu", "auto")
WHEN_BEHIND = ("evaluate_all", "skip_to_newest")
EXPORT_WHEN = ("end", "each_best")
METRIC_RE = re.compile(r"[A-Za-z0-9_./@() -]{1,100}")
MAX_INPUT_PATHS = 1000
MAX_GPUS = 64
MAX_STEPS = 2**31 - 1  # fits every integer field of pipeline.config (int32 and uint32 alike)
MAX_PATH_BYTES = 4095  # Linux PATH_MAX less the NUL: a longer path can never be opened
MAX_WILDCARD_PARTS = 32  # path components with * ? or [ in one input glob
MAX_PROBLEMS = 50  # listed in one .error file; the rest are counted


def parse_gpus(value: Any) -> int | tuple[int, ...] | None:
    if isinstance(value, str) and value == "auto":
        return None
    if is_int(value) and 0 <= value <= MAX_GPUS:
        return value
    if not isinstance(value, list):
        raise Invalid(f"must be a whole number from 0 to {MAX_GPUS}, a list of GPU ids or \"auto\", "
                      f"got {show(value)}")
    if not value:
        raise Invalid("must not be an empty list (leave gpus out for auto, or write 0 to train on the CPU)")
    seen: set[int] = set()
    for gpu in value:
        if not is_int(gpu) or not 0 <= gpu < MAX_GPUS:
            raise Invalid(f"GPU ids must be whole numbers from 0 to {MAX_GPUS - 1}, got {show(gpu)} "
                          f"in {show(value)}")
        if gpu in seen:
            raise Invalid(f"GPU id {gpu} is listed twice")
        seen.add(gpu)
    return tuple(value)


def name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid job name, or None when it is."""
    bad = sorted(set(re.sub(r"[A-Za-z0-9_.-]", "", name)))
    if not name:
        return "it is empty"
    if len(name) > 64:
        return f"{show(name)} is {len(name)} characters long, the maximum is 64"
    if bad:
        return f"{show(name)} contains {', '.join(repr(c) for c in bad[:10])}, which is not allowed"
    if not NAME_RE.fullmatch(name):
        return f"{show(name)} does not start with a letter or digit"
    if ".." in name:
        return f"{show(name)} contains '..'"
    return None
