"""Sweeps: one job file with a ``[sweep]`` table becomes N jobs over values of ``[pipeline]`` keys.

Pure. ``check_sweep`` validates the table (each value exactly as its ``[pipeline]`` key would be);
``expand`` turns the file's spec into the variants ``NAME-1 … NAME-N``, each with its own model_dir
``<model_dir>/NAME-i`` and its values as ``[pipeline]`` edits; ``halving_stops`` is the early stop
across the sweep (successive halving, in the style of ASHA); ``sweep_view`` is what
``oddaemon sweep NAME`` shows. A sweep is no record of its own: its variants' job records carry it
(``spec.sweep.of``, ``index``, ``assigned``), so it survives restarts as they do.

The halving rule: at each rung (a step of ``halving_steps``) a variant's value is its best metric
among its evaluations up to and including the first one at or after that step ("it reached the
rung"). Once at least 2 variants reached a rung, the ones ranked below the best
``max(1, ceil(keep_fraction * reached))`` of them are stopped, each when the rung is the highest it
has reached (a variant that already passed a later rung is judged there instead); a variant that
reaches the rung later is compared with all that reached it before. The best of a rung, and the
sweep's best variant, are never stopped. A stop is the patience kind of early stop: training ends,
the remaining checkpoints are evaluated, the job succeeds with the reason.
"""

from __future__ import annotations

import itertools
import math
import os
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from oddaemon.core.checks import Invalid, is_int, show
from oddaemon.core.jobspec import JobSpec, SweepOptions, name_problem

METHODS = ("grid", "random")
MAX_VARIANTS = 100
MAX_VALUES = 100  # values listed for one key
MAX_RUNGS = 20
NOT_SWEPT = ("train_input_path", "eval_input_path")  # lists themselves: not one value per variant

Add = Callable[..., None]  # (section, key, reason, label=None), the validator's


def check_sweep(table: dict | None, checkers: dict[str, Callable[[Any], Any]], pipeline: dict, add: Add,
                eval_enabled: bool) -> dict:
    """The ``SweepOptions`` keywords of a ``[sweep]`` table ({} when there is none, ``table`` None: an
    empty table, like any empty table of a job, changes nothing);
    every problem goes to ``add`` with the key named (``[sweep] values.learning_rate_base[1]: ...``)."""
    if table is None:
        return {}
    out: dict[str, Any] = {}
    method = table.get("method", "grid")
    if method not in METHODS:
        add("sweep", "method", f"must be one of {', '.join(repr(m) for m in METHODS)}, got {show(method)}")
    out["method"] = method if method in METHODS else "grid"
    out["values"] = _values(table.get("values"), checkers, pipeline, add)
    grid = math.prod(len(v) for _, v in out["values"]) if out["values"] else 0
    if out["method"] == "grid":
        for key in ("samples", "seed"):
            if key in table:
                add("sweep", key, 'is only for method = "random"')
        if grid > MAX_VARIANTS:
            add("sweep", "values", f"the grid has {grid} combinations; a sweep has at most {MAX_VARIANTS} variants "
                "(list fewer values, or use method = \"random\" with samples)")
    else:
        samples = table.get("samples")
        if samples is None:
            add("sweep", "samples", 'is required with method = "random": how many variants to draw')
        elif not is_int(samples) or not 1 <= samples <= MAX_VARIANTS:
            add("sweep", "samples", f"must be a whole number from 1 to {MAX_VARIANTS}, got {show(samples)}")
        elif grid and samples >= grid:
            add("sweep", "samples", f"{samples} is not fewer than the {grid} combinations of the values; "
                "use method = \"grid\" to run them all")
        else:
            out["samples"] = samples
        seed = table.get("seed", 0)
        if not is_int(seed) or not 0 <= seed < 2**63:
            add("sweep", "seed", f"must be a whole number from 0 to 2**63-1, got {show(seed)}")
        else:
            out["seed"] = seed
    steps = table.get("halving_steps")
    if steps is not None:
        if (not isinstance(steps, list) or not 1 <= len(steps) <= MAX_RUNGS
                or not all(is_int(s) and 1 <= s < 2**31 for s in steps)
                or any(a >= b for a, b in zip(steps, steps[1:], strict=False))):
            add("sweep", "halving_steps", f"must be a list of 1 to {MAX_RUNGS} increasing whole numbers (training "
                f"steps) from 1, got {show(steps)}")
        elif not eval_enabled:
            add("sweep", "halving_steps", "needs evaluation: halving compares evaluated metrics ([eval] enabled = "
                "false)")
        else:
            out["halving_steps"] = tuple(steps)
    fraction = table.get("keep_fraction")
    if fraction is not None:
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 < fraction < 1:
            add("sweep", "keep_fraction", f"must be a number between 0 and 1 (exclusive), got {show(fraction)}")
        elif steps is None:
            add("sweep", "keep_fraction", "is only used with halving_steps")
        else:
            out["keep_fraction"] = float(fraction)
    return out


def _values(values: Any, checkers: dict, pipeline: dict, add: Add) -> tuple:
    if not isinstance(values, dict) or not values:
        add("sweep", "values", "must be a table of [pipeline] keys, each with a list of values, e.g. "
            "values = { learning_rate_base = [0.01, 0.02] }" + ("" if values is None else f", got {show(values)}"))
        return ()
    checked = []
    for key, listed in values.items():
        label = f"values.{key}"
        if key not in checkers:
            why = "is a list of inputs itself" if key in NOT_SWEPT else "is not a [pipeline] key"
            add("sweep", label, f"{show(key)} {why}; a sweep varies one of: {', '.join(checkers)}")
            continue
        if key in pipeline:
            add("sweep", label, "is also set in [pipeline]; a swept key takes its values from [sweep] alone")
            continue
        if not isinstance(listed, list) or not 1 <= len(listed) <= MAX_VALUES:
            add("sweep", label, f"must be a list of 1 to {MAX_VALUES} values, got {show(listed)}")
            continue
        good = []
        for i, value in enumerate(listed):
            try:
                good.append(checkers[key](value))
            except Invalid as exc:
                add("sweep", label, str(exc), label=f"{label}[{i}]")
        if len(good) == len(listed):
            twice = next((v for i, v in enumerate(good) if v in good[:i]), None)
            if twice is not None:
                add("sweep", label, f"{show(twice)} is listed twice")
            else:
                checked.append((key, tuple(good)))
    return tuple(checked)


def combinations(sweep: SweepOptions) -> list[tuple[tuple[str, Any], ...]]:
    """Each variant's values, in order: the grid with the last key varying fastest, or ``samples``
    distinct combinations drawn with ``random.Random(seed)``."""
    keys = [k for k, _ in sweep.values]
    lists = [v for _, v in sweep.values]
    if sweep.method == "grid":
        return [tuple(zip(keys, combo, strict=True)) for combo in itertools.product(*lists)]
    size = math.prod(len(v) for v in lists)
    rng = random.Random(sweep.seed)
    chosen: dict[int, None] = {}
    while len(chosen) < min(sweep.samples or 0, size):
        chosen[rng.randrange(size)] = None
    out = []
    for index in chosen:
        combo = []
        for values in reversed(lists):
            index, digit = divmod(index, len(values))
            combo.append(values[digit])
        out.append(tuple(zip(keys, reversed(combo), strict=True)))
    return out


def is_definition(spec: JobSpec) -> bool:
    """The spec of a job file with a ``[sweep]`` table (not one of its variants)."""
    return bool(spec.sweep.method) and not spec.sweep.of


def variant_name(name: str, index: int) -> str:
    return f"{name}-{index}"


def expand(spec: JobSpec) -> list[JobSpec]:
    """The sweep's variants, ``NAME-1 … NAME-N``, each below the sweep's model_dir."""
    variants = []
    for i, assigned in enumerate(combinations(spec.sweep), start=1):
        name = variant_name(spec.name, i)
        variants.append(replace(spec, name=name, model_dir=os.path.join(spec.model_dir, name),
                                pipeline=replace(spec.pipeline, **dict(assigned)),
                                sweep=replace(spec.sweep, of=spec.name, index=i, assigned=assigned)))
    return variants


def name_problems(spec: JobSpec) -> list[str]:
    """Why the variants' names cannot be job names (the sweep's name is too long for them)."""
    last = variant_name(spec.name, len(combinations(spec.sweep)))
    reason = name_problem(last)
    return [f"the sweep's variants are named {spec.name}-1 ... {last}, and {reason}; choose a shorter name"] \
        if reason else []


# ---- successive halving ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """One variant as halving sees it: its evaluations (step, metric value) in step order."""

    name: str
    active: bool  # still training (a stop would save something)
    evaluations: tuple[tuple[int, float], ...]


def rung_value(evaluations: tuple[tuple[int, float], ...], rung: int, higher_is_better: bool) -> float | None:
    """The variant's best value up to the first evaluation at or after ``rung`` (None: not reached)."""
    seen: list[float] = []
    for step, value in evaluations:
        seen.append(value)
        if step >= rung:
            return max(seen) if higher_is_better else min(seen)
    return None


def halving_stops(sweep: str, rungs: tuple[int, ...], keep_fraction: float, higher_is_better: bool,
                  metric: str, standings: list[Standing], sweep_best: str | None = None) -> list[tuple[str, str]]:
    """(variant, reason) for each active variant the rule stops now (see the module's text)."""
    reached: dict[str, list[tuple[int, float]]] = {}  # name -> (rung, value) in rung order
    for s in standings:
        reached[s.name] = [(r, v) for r in rungs if (v := rung_value(s.evaluations, r, higher_is_better)) is not None]
    stops: dict[str, str] = {}
    for rung in rungs:
        peers = [(name, value) for name, at in reached.items() for r, value in at if r == rung]
        if len(peers) < 2:
            continue
        order = sorted(peers, key=lambda p: -p[1] if higher_is_better else p[1])  # stable: ties keep arrival order
        keep = max(1, math.ceil(keep_fraction * len(peers)))
        kept = {name for name, _ in order[:keep]}
        for name, value in order[keep:]:
            standing = next(s for s in standings if s.name == name)
            if not standing.active or name == sweep_best or reached[name][-1][0] != rung or name in stops:
                continue
            stops[name] = (f"sweep {sweep}: halving at step {rung}: {metric} {value:.6g} is not among the best {keep} "
                           f"of the {len(peers)} variants that reached step {rung} (kept: "
                           f"{', '.join(sorted(kept))})")
    return list(stops.items())


# ---- what users see --------------------------------------------------------------------------------


def best_variant(views: list[dict]) -> dict | None:
    """The variant whose best evaluated metric is the best of the sweep (ties: the lower index)."""
    scored = [v for v in views if v["evaluation"]["best"] and v["evaluation"]["best"]["value"] is not None]
    if not scored:
        return None
    higher = scored[0]["sweep"]["higher_is_better"]
    return min(scored, key=lambda v: (-v["evaluation"]["best"]["value"] if higher else v["evaluation"]["best"]["value"],
                                      v["sweep"]["index"]))


def sweep_state(states: list[str]) -> str:
    """One word for the sweep: ``running`` while a variant is not finished (``queued`` while none has
    started), else ``succeeded`` when all did, else ``finished``."""
    finished = {"succeeded", "failed", "cancelled"}
    if all(s == "queued" or s == "waiting" for s in states):
        return "queued"
    if any(s not in finished for s in states):
        return "running"
    return "succeeded" if all(s == "succeeded" for s in states) else "finished"


def sweep_view(name: str, views: list[dict]) -> dict:
    """What ``oddaemon sweep NAME`` shows, from its variants' job views (in index order)."""
    views = sorted(views, key=lambda v: v["sweep"]["index"])
    first = views[0]["sweep"]
    best = best_variant(views)
    counts: dict[str, int] = {}
    for v in views:
        counts[v["state"]] = counts.get(v["state"], 0) + 1
    rows = []
    for v in views:
        b = v["evaluation"]["best"]
        halved = v["reason"].startswith(f"sweep {name}: halving") or any(
            h["reason"].startswith(f"sweep {name}: halving") for h in v["history"])
        rows.append({"name": v["name"], "index": v["sweep"]["index"], "values": v["sweep"]["values"],
                     "state": v["state"], "reason": v["reason"], "step": v["step"], "target_steps": v["target_steps"],
                     "best_value": b["value"] if b else None, "best_step": b["step"] if b else None,
                     "stopped_by_halving": halved, "best": best is not None and v["name"] == best["name"]})
    best_entry = None
    if best is not None:
        b = best["evaluation"]["best"]
        best_entry = {"name": best["name"], "values": best["sweep"]["values"], "value": b["value"], "step": b["step"],
                      "checkpoint": b["checkpoint"], "model_dir": best["model_dir"],
                      "best_dir": os.path.join(best["model_dir"], "best"),
                      "exported": os.path.join(best["model_dir"], "exported") if best["sweep"]["export_best"] else None}
    return {"name": name, "method": first["method"], "keys": list(first["values"]), "variants": len(views),
            "state": sweep_state([v["state"] for v in views]), "counts": counts,
            "metric": views[0]["evaluation"]["metric"], "higher_is_better": first["higher_is_better"],
            "halving": ({"steps": first["halving_steps"], "keep_fraction": first["keep_fraction"]}
                        if first["halving_steps"] else None),
            "model_dir": os.path.dirname(views[0]["model_dir"]), "best": best_entry, "rows": rows}


def sweep_summary(view: dict) -> dict:
    """One line of ``oddaemon sweep`` (no name): the sweep, its state and its best."""
    best = view["best"]
    return {"name": view["name"], "variants": view["variants"], "state": view["state"], "metric": view["metric"],
            "best": best["name"] if best else None, "best_value": best["value"] if best else None}


def group_by_sweep(views: list[dict]) -> dict[str, list[dict]]:
    """Job views of sweep variants by sweep name (other jobs left out)."""
    groups: dict[str, list[dict]] = {}
    for v in views:
        if v.get("sweep"):
            groups.setdefault(v["sweep"]["name"], []).append(v)
    return groups
