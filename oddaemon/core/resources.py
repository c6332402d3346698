"""Per-job resource limits (cgroups, ``adapters/cgroups.py``): memory sizes ("8G"), the limits a
worker gets from its job and the daemon's ``[cgroups]`` defaults, the daemon's ceilings on what a
job may ask, the ``host-oom`` failure's sentence, and a worker's resource use in words. Pure."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from oddaemon.core.checks import Invalid, is_int, show
from oddaemon.core.failures import Failure

CPU_WEIGHT_MIN, CPU_WEIGHT_MAX = 1, 10_000  # cgroup v2 cpu.weight (v1: cpu.shares = weight * 1024 / 100)
MIN_MEMORY_MAX = 16 * 1024**2  # less cannot even start Python
MAX_BYTES = 2**63 - 1
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGTP]?)(?:i?B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
MODES = ("auto", "off", "v1", "v2")  # [cgroups] mode: detect, never, or only that backend
ROLES = ("train", "eval", "export")  # the workers that get a cgroup of their own (one job's each)
SIZE_RULE = 'a memory size: a number of bytes or a string such as "8G", "512M" or "1.5G" (powers of 1024)'


def parse_size(value: Any) -> int:
    """Bytes from a whole number of bytes or ``"8G"`` (K, M, G, T, P: powers of 1024; "GiB" and "GB"
    mean the same). Raises ``Invalid``."""
    if is_int(value):
        if value < 1:
            raise Invalid(f"must be at least 1 byte, got {show(value)}")
        return min(value, MAX_BYTES)
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            number = float(m.group(1)) * _UNITS[m.group(2).upper()]
            if number >= 1:
                return min(int(number), MAX_BYTES)
    raise Invalid(f"must be {SIZE_RULE}, got {show(value)}")


def format_bytes(n: int | float | None) -> str:
    """``8589934592`` -> ``"8 GiB"``, ``8482560000`` -> ``"7.9 GiB"`` (one decimal, trailing .0 dropped)."""
    if n is None:
        return "-"
    for unit, size in (("PiB", 1024**5), ("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            text = f"{n / size:.1f}".removesuffix(".0")
            return f"{text} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Limits:
    """What one worker's cgroup is given (None: no limit, the kernel's default)."""

    memory_max: int | None = None  # bytes: above it the kernel reclaims, then the OOM killer ends the worker
    cpu_weight: int | None = None  # share of the CPU under contention (1..10000, 100 = an ordinary process)


@dataclass(frozen=True)
class Defaults:
    """The daemon's ``[cgroups]`` settings."""

    mode: str = "auto"  # "auto" | "off" | "v1" | "v2"
    train_memory_max: int | None = None
    eval_memory_max: int | None = None  # evaluators and exports
    train_cpu_weight: int = 100
    eval_cpu_weight: int = 100  # an evaluator on a GPU, and exports
    cpu_eval_cpu_weight: int = 20  # an evaluator on the CPU: the trainer's input pipeline keeps its share
    memory_max_ceiling: int | None = None  # the most a job may ask for (None: no ceiling)
    cpu_weight_ceiling: int = CPU_WEIGHT_MAX


def limits_for(role: str, spec: Any, defaults: Defaults, on_cpu: bool) -> Limits:
    """The limits of a job's ``role`` worker: the job's own ``[train]``/``[eval]`` keys, else the daemon's
    defaults (``on_cpu``: an evaluator without a GPU gets ``cpu_eval_cpu_weight``)."""
    if role == "train":
        memory, weight = spec.train.memory_max, spec.train.cpu_weight
        return Limits(memory if memory is not None else defaults.train_memory_max,
                      weight if weight is not None else defaults.train_cpu_weight)
    memory, weight = spec.eval.memory_max, spec.eval.cpu_weight
    default_weight = defaults.cpu_eval_cpu_weight if role == "eval" and on_cpu else defaults.eval_cpu_weight
    return Limits(memory if memory is not None else defaults.eval_memory_max,
                  weight if weight is not None else default_weight)


def job_checkers(ceilings: tuple[int | None, int]) -> dict:
    """The checkers of a job's ``memory_max`` and ``cpu_weight`` (in ``[train]`` and ``[eval]``), with
    the daemon's ceilings ``(memory_max_ceiling, cpu_weight_ceiling)``: above one, the key is rejected."""
    memory_ceiling, weight_ceiling = ceilings

    def memory_max(value: Any) -> int:
        size = parse_size(value)
        if size < MIN_MEMORY_MAX:
            raise Invalid(f"{show(value)} is less than {format_bytes(MIN_MEMORY_MAX)}, too little for any worker")
        if memory_ceiling is not None and size > memory_ceiling:
            raise Invalid(f"{show(value)} is above this daemon's ceiling of {format_bytes(memory_ceiling)} "
                          "([cgroups] memory_max_ceiling in oddaemon.toml)")
        return size

    def cpu_weight(value: Any) -> int:
        _weight(value)
        if value > weight_ceiling:
            raise Invalid(f"{value} is above this daemon's ceiling of {weight_ceiling} "
                          "([cgroups] cpu_weight_ceiling in oddaemon.toml)")
        return value

    return {"memory_max": memory_max, "cpu_weight": cpu_weight}


def _weight(value: Any) -> int:
    if not is_int(value) or not CPU_WEIGHT_MIN <= value <= CPU_WEIGHT_MAX:
        raise Invalid(f"must be a whole number from {CPU_WEIGHT_MIN} to {CPU_WEIGHT_MAX} (100: an ordinary "
                      f"process's share), got {show(value)}")
    return value


def _mode(value: Any) -> str:
    if value not in MODES:
        raise Invalid(f"must be one of {', '.join(repr(m) for m in MODES)}, got {show(value)}")
    return value


def size_or_max(value: Any) -> int | None:
    """A daemon setting's memory size, or ``"max"`` (the kernel's word): no limit (None)."""
    if value == "max":
        return None
    try:
        return parse_size(value)
    except Invalid:
        raise Invalid(f'must be "max" (no limit) or {SIZE_RULE}, got {show(value)}') from None


def config_checkers() -> dict:
    """The daemon's ``[cgroups]`` keys (``core/config.py``), named as ``Defaults``' fields."""
    return {"mode": _mode, "train_memory_max": size_or_max, "eval_memory_max": size_or_max,
            "train_cpu_weight": _weight, "eval_cpu_weight": _weight, "cpu_eval_cpu_weight": _weight,
            "memory_max_ceiling": size_or_max, "cpu_weight_ceiling": _weight}


def defaults_problems(d: Defaults) -> list[tuple[str, str]]:
    """(key, reason) for each default above its ceiling among the daemon's own ``[cgroups]`` settings."""
    problems = []
    for key in ("train_memory_max", "eval_memory_max"):
        value = getattr(d, key)
        if value is not None and d.memory_max_ceiling is not None and value > d.memory_max_ceiling:
            problems.append((key, f"{format_bytes(value)} is above memory_max_ceiling "
                                  f"{format_bytes(d.memory_max_ceiling)}"))
    for key in ("train_cpu_weight", "eval_cpu_weight", "cpu_eval_cpu_weight"):
        if getattr(d, key) > d.cpu_weight_ceiling:
            problems.append((key, f"{getattr(d, key)} is above cpu_weight_ceiling {d.cpu_weight_ceiling}"))
    return problems


def table_of(role: str) -> str:
    """The job spec table whose keys limit ``role`` (exports share the evaluator's)."""
    return "train" if role == "train" else "eval"


def host_oom_failure(name: str, role: str, peak: int | None, limit: int | None) -> Failure:
    """``host-oom``: the kernel's OOM killer ended a worker inside its own cgroup."""
    table = table_of(role)
    used = f"used {format_bytes(peak)} of its {format_bytes(limit)} memory_max" if limit is not None and peak \
        else (f"used {format_bytes(peak)} of host memory" if peak else "ran out of host memory")
    advice = (f"raise [{table}] memory_max" if limit is not None else f"set a smaller [{table}] memory_max "
              "for its neighbours, or add memory")
    what = {"train": "training", "eval": "evaluation", "export": "export"}.get(role, role)
    return Failure("host-oom", f"job {name} {used}: the kernel's OOM killer ended its {what} worker ({role}); "
                               f"{advice}, or lower [pipeline] batch_size")


def cgroup_name(name: str, role: str) -> str:
    """A worker's cgroup: ``job-effdet-train`` (job names never contain '/': ``core/jobspec.py``)."""
    return f"job-{name}-{role}"


def usage_line(role: str, usage: dict) -> str:
    """``train: cpu 12.3 s, memory 1.2 GiB (peak 1.5 GiB) of 8 GiB`` for ``oddaemon status``."""
    parts = []
    if usage.get("cpu_seconds") is not None:
        parts.append(f"cpu {usage['cpu_seconds']:.1f} s")
    if usage.get("memory_bytes") is not None:
        peak = f" (peak {format_bytes(usage['memory_peak_bytes'])})" if usage.get("memory_peak_bytes") else ""
        limit = f" of {format_bytes(usage['memory_max_bytes'])}" if usage.get("memory_max_bytes") else ""
        parts.append(f"memory {format_bytes(usage['memory_bytes'])}{peak}{limit}")
    if usage.get("io_read_bytes") is not None:
        parts.append(f"io read {format_bytes(usage['io_read_bytes'])} written {format_bytes(usage['io_write_bytes'])}")
    if usage.get("cpu_weight") is not None:
        parts.append(f"cpu weight {usage['cpu_weight']}")
    return f"{role}: " + (", ".join(parts) or "no numbers yet")
