"""Job spec v1: parse and validate a job file dropped into the spool.

Pure: every filesystem lookup goes through a ``ValidationContext`` so tests can inject fakes (the
path checks are ``job_paths.PathRules``).
``parse_job`` never raises; it returns a ``JobSpec`` or every ``Problem`` it found (the first
``MAX_PROBLEMS`` of them and a count of the rest, so a hostile file cannot make a huge ``.error``).
"""

from __future__ import annotations

import difflib
import math
import os
import sys
import tomllib
from collections.abc import Callable
from typing import Any

from oddaemon.core import resources
from oddaemon.core.checks import (
    Invalid,
    Problem,
    decode,
    finite_number,
    is_int,
    one_of,
    rule,
    show,
    size_problem,
    syntax_problem,
    whole_number,
)
from oddaemon.core.dependencies import parse_after, self_problem
from oddaemon.core.job_paths import CheckpointMissing, PathRules, ValidationContext
from oddaemon.core.jobspec import (
    ALLOWED_KEYS,
    CHECKPOINT_TYPES,
    EVAL_DEVICES,
    EXPORT_WHEN,
    MAX_PRIORITY,
    MAX_PROBLEMS,
    MAX_STEPS,
    METRIC_RE,
    MISPLACED_KEYS,
    NAME_RULE,
    TABLES,
    WHEN_BEHIND,
    EvalOptions,
    JobSpec,
    NotifyOptions,
    PipelineEdits,
    SlurmOptions,
    SweepOptions,
    TrainOptions,
    gpu_count,
    name_problem,
    parse_gpus,
)
from oddaemon.core.notifications import job_checkers
from oddaemon.core.prescan import prescan, strip_bom
from oddaemon.core.slurm import TIME_LIMIT_RE
from oddaemon.core.sweep import check_sweep, expand, is_definition, name_problems
from oddaemon.formats.pipeline_paths import effective_paths


def parse_job(data: bytes, filename: str, ctx: ValidationContext) -> JobSpec | list[Problem]:
    """Parse and validate one job file. Returns the spec, or the problems found (never raises)."""
    if len(data) > ctx.max_file_bytes:
        return [size_problem(len(data), ctx.max_file_bytes)]
    text_or_problems = decode(data)
    if isinstance(text_or_problems, list):
        return text_or_problems
    text_or_problems = strip_bom(text_or_problems)
    refused = prescan(text_or_problems)
    if refused is not None:
        return [refused]
    try:
        doc = tomllib.loads(text_or_problems)
    except tomllib.TOMLDecodeError as exc:
        return [syntax_problem(str(exc), text_or_problems)]
    except RecursionError:
        return [Problem("TOML syntax error: arrays or tables are nested too deeply")]
    except ValueError as exc:  # an integer literal with thousands of digits (or a tomllib surprise)
        if "digits" in str(exc):
            limit = sys.get_int_max_str_digits()
            return [Problem(f"TOML syntax error: a number has more than {limit} digits, which is more than any "
                            "setting can use")]
        return [Problem(f"TOML syntax error: {exc}")]
    result = _Validator(ctx).job(doc, filename)
    if isinstance(result, list) and len(result) > MAX_PROBLEMS:
        more = len(result) - MAX_PROBLEMS
        result = result[:MAX_PROBLEMS] + [Problem(f"... and {more} more problem{'s' if more > 1 else ''} not listed "
                                                  f"here (at most {MAX_PROBLEMS} are); fix the ones above and "
                                                  "submit the file again to see the rest", count=more)]
    return result


_boolean = rule("true or false", lambda v: isinstance(v, bool))


class _Validator(PathRules):
    """Collects every problem in one job document."""

    def __init__(self, ctx: ValidationContext):
        self.ctx = ctx
        self.problems: list[Problem] = []
        self.roots = tuple(ctx.realpath(r) for r in ctx.allowed_roots)
        self.awaited = ""  # a fine_tune_checkpoint a job in after is to write (JobSpec.awaits_checkpoint)

    def add(self, section: str, key: str, reason: str, label: str | None = None) -> None:
        """Record ``reason`` for ``key``; ``label`` names a list entry such as ``train_input_path[2]``."""
        dotted = f"{section}.{key}" if section else key
        where = f"[{section}] {label or key}" if section else key
        self.problems.append(Problem(f"{where}: {reason}", key=dotted))

    def job(self, doc: dict, filename: str) -> JobSpec | list[Problem]:
        self.reject_unknown("", doc)
        tables = {name: self.table(doc, name) for name in TABLES}
        top = self.section("", doc, {
            "name": self.name, "priority": whole_number(-MAX_PRIORITY, MAX_PRIORITY),
            "pipeline_config": self.path_checker("file"), "model_dir": self.path_checker("model_dir"),
            "after": parse_after,
        })
        pipeline = self.section("pipeline", tables["pipeline"], pipeline_checks := {
            "num_classes": whole_number(1, 100_000), "batch_size": whole_number(1, 65_536),
            "num_steps": whole_number(1, MAX_STEPS), "total_steps": whole_number(1, MAX_STEPS),
            "warmup_steps": whole_number(0, MAX_STEPS),
            "learning_rate_base": finite_number(0, inclusive=False),
            "warmup_learning_rate": finite_number(0, inclusive=True),
            "fine_tune_checkpoint": self.fine_tune_checkpoint(top.get("after", ())),
            "fine_tune_checkpoint_type": one_of(CHECKPOINT_TYPES),
            "label_map_path": self.path_checker("file"),
        })
        for key in ("train_input_path", "eval_input_path"):
            if key in tables["pipeline"]:
                paths = self.input_paths(key, tables["pipeline"][key])
                if paths is not None:
                    pipeline[key] = paths
        train = self.section("train", tables["train"], {
            "gpus": parse_gpus, "checkpoint_every_n": whole_number(1, 10**9),
            "checkpoint_max_to_keep": whole_number(1, 10_000), "max_restarts": whole_number(0, 1000),
            "hang_timeout_seconds": finite_number(0, inclusive=True), "oom_retry_halve_batch": _boolean,
            "min_batch_size": whole_number(1, 65_536), **resources.job_checkers(self.ctx.resource_ceilings),
        })
        evaluation = self.section("eval", tables["eval"], {
            "enabled": _boolean, "device": one_of(EVAL_DEVICES),
            "sample_1_of_n_eval_examples": whole_number(1, MAX_STEPS),
            "metric": rule("a metric name such as 'DetectionBoxes_Precision/mAP' (letters, digits, _ . / @ ( ) - "
                           "and spaces, at most 100)",
                           lambda v: isinstance(v, str) and METRIC_RE.fullmatch(v) is not None),
            "higher_is_better": _boolean, "export_best": _boolean, "export_when": one_of(EXPORT_WHEN),
            "patience": whole_number(1, 10_000),
            "min_delta": finite_number(0.0, True), "when_behind": one_of(WHEN_BEHIND),
            "max_behind": whole_number(1, 10_000), "max_pinned_bytes": whole_number(1),
            **resources.job_checkers(self.ctx.resource_ceilings),
        })
        slurm = self.section("slurm", tables["slurm"], {
            "time_limit": rule('a Slurm time limit such as "90", "12:00:00" or "2-00:00:00"',
                               lambda v: isinstance(v, str) and TIME_LIMIT_RE.fullmatch(v) is not None),
            "partition": rule(f"one of the partitions this daemon lets jobs choose ([slurm] partitions: "
                              f"{', '.join(self.ctx.slurm_partitions) or 'none'})",
                              lambda v: isinstance(v, str) and v in self.ctx.slurm_partitions),
            "nodes": rule(f"a whole number of Slurm nodes from 1 to {self.ctx.slurm_max_nodes} (this daemon's "
                          "[slurm] max_nodes)", lambda v: is_int(v) and 1 <= v <= self.ctx.slurm_max_nodes),
        })
        notify = self.section("notify", tables["notify"], job_checkers(self.ctx.notify_targets))
        sweep = check_sweep(tables["sweep"] or None, pipeline_checks, tables["pipeline"], self.add,
                            evaluation.get("enabled", True))
        self.cross_checks(pipeline, train)
        if "name" not in doc:
            top["name"] = self.default_name(filename)
        if self_problem(top.get("name", ""), top.get("after", ())):
            self.add("", "after", self_problem(top["name"], top["after"]))
        for required in ("pipeline_config", "model_dir"):
            if required not in doc:
                self.problems.append(Problem(f"missing required key '{required}' (an absolute path)", key=required))
        if self.problems:
            return self.problems
        spec = JobSpec(**top, awaits_checkpoint=self.awaited, pipeline=PipelineEdits(**pipeline),
                       train=TrainOptions(**train), eval=EvalOptions(**evaluation), slurm=SlurmOptions(**slurm),
                       notify=NotifyOptions(**notify), sweep=SweepOptions(**sweep))
        self.config_paths(spec)
        if is_definition(spec):
            self.sweep_variants(spec, train)
        return self.problems or spec

    def fine_tune_checkpoint(self, after: tuple[str, ...]) -> Callable[[Any], str]:
        """A checkpoint prefix that exists, or, for a job with ``after``, one that does not exist yet:
        a job it waits for is to write it (e.g. its ``exported/checkpoint/ckpt-0``); the scheduler
        checks that it lies in one of their model_dirs, the launcher that it exists at each start."""
        def check(value: Any) -> str:
            try:
                return self.path(value, "checkpoint")
            except CheckpointMissing as exc:
                if not after:
                    raise Invalid(f"{exc}; for a checkpoint that another job is to write (e.g. its "
                                  "exported/checkpoint/ckpt-0), name that job in after") from None
                self.awaited = self.inside_roots(value + ".index")[:-len(".index")]
                return value
        return check

    def sweep_variants(self, spec: JobSpec, train: dict) -> None:
        """Each variant's name is a job name and its values pass the cross-key checks (named by variant)."""
        self.problems += [Problem(f"[sweep] {p}", key="sweep") for p in name_problems(spec)]
        for variant in expand(spec)[:MAX_PROBLEMS] if not self.problems else ():
            before = len(self.problems)
            self.cross_checks({k: v for k, v in vars(variant.pipeline).items() if v is not None}, train)
            values = ", ".join(f"{k} = {v!r}" for k, v in variant.sweep.assigned)
            self.problems[before:] = [Problem(f"[sweep] variant {variant.name} ({values}): {p.message}", key="sweep")
                                      for p in self.problems[before:]]

    def config_paths(self, spec: JobSpec) -> None:
        """What pipeline.config itself names (and no [pipeline] key replaces) is confined too."""
        try:
            text = self.ctx.read_text(spec.pipeline_config)
        except OSError:
            return  # (it was checked as a file: a read error here is the preflight's to report)
        for found in effective_paths(spec.pipeline_config, text, spec.pipeline):
            try:
                if not os.path.isabs(found.path):
                    raise Invalid(f"{show(found.path)} is a relative path; the workers need absolute paths")
                self.inside_roots(found.path)
                if found.kind == "checkpoint":
                    self.inside_roots(found.path + ".index")
                elif found.kind == "glob":
                    for match in self.ctx.glob(found.path):
                        real = self.ctx.realpath(match)
                        if not self.under_roots(real):
                            raise Invalid(f"{found.path} matches {match}, which resolves to {real}, outside the "
                                          f"allowed roots {self.roots_text()}")
            except Invalid as exc:
                self.problems.append(Problem(f"{found.label}: {exc}; set the [pipeline] key that replaces it, "
                                             "or fix the pipeline.config", key="pipeline_config"))

    def reject_unknown(self, section: str, table: dict) -> None:
        allowed = ALLOWED_KEYS[section]
        for key, value in table.items():
            if key in allowed:
                continue
            if (section, key) in MISPLACED_KEYS:
                self.add(section, key, MISPLACED_KEYS[(section, key)])
                continue
            # No "did you mean" past the listed problems: difflib on 100,000 keys would take seconds.
            close = difflib.get_close_matches(key, allowed, n=1) if len(self.problems) < MAX_PROBLEMS else []
            if not section and isinstance(value, dict):
                hint = f"; did you mean [{close[0]}]?" if close else "."
                message = f"unknown table [{key}]{hint} Allowed tables: {', '.join(f'[{t}]' for t in TABLES)}"
            else:
                where = f"in [{section}]" if section else "at the top level"
                hint = f"; did you mean '{close[0]}'?" if close else "."
                listed = ", ".join(k for k in allowed if section or k not in TABLES)
                tables = f"; tables: {', '.join(f'[{t}]' for t in TABLES)}" if not section else ""
                message = f"unknown key {show(key)} {where}{hint} Allowed keys: {listed}{tables}"
            self.problems.append(Problem(message, key=f"{section}.{key}" if section else key))

    def table(self, doc: dict, name: str) -> dict:
        value = doc.get(name, {})
        if not isinstance(value, dict):
            self.add("", name, f"must be a table written as a [{name}] section, got {show(value)}")
            return {}
        self.reject_unknown(name, value)
        return value

    def section(self, section: str, table: dict, checkers: dict[str, Callable[[Any], Any]]) -> dict:
        values = {}
        for key, check in checkers.items():
            if key in table:
                try:
                    values[key] = check(table[key])
                except Invalid as exc:
                    self.add(section, key, str(exc))
        return values

    def name(self, value: Any) -> str:
        if not isinstance(value, str):
            raise Invalid(f"must be a string, got {show(value)}")
        reason = name_problem(value)
        if reason:
            raise Invalid(f"not a valid job name: {reason}; {NAME_RULE}")
        return value

    def default_name(self, filename: str) -> str:
        stem = os.path.basename(filename)
        stem = stem[:-len(".toml")] if stem.endswith(".toml") else stem
        reason = name_problem(stem)
        if reason:
            self.add("", "name", f"the job name defaults to the file name, which is not a valid job name: "
                     f"{reason}; set name = \"...\" in the file or rename it; {NAME_RULE}")
        return stem


    def cross_checks(self, pipeline: dict, train: dict) -> None:
        if pipeline.get("warmup_steps", 0) > pipeline.get("total_steps", math.inf):
            self.add("pipeline", "warmup_steps", f"{pipeline['warmup_steps']} is larger than total_steps "
                     f"{pipeline['total_steps']}; warmup must end before the cosine decay does")
        if pipeline.get("warmup_learning_rate", 0) > pipeline.get("learning_rate_base", math.inf):
            self.add("pipeline", "warmup_learning_rate", f"{pipeline['warmup_learning_rate']:g} is larger than "
                     f"learning_rate_base {pipeline['learning_rate_base']:g}")
        count = gpu_count(train.get("gpus"))
        if "batch_size" in pipeline and count and pipeline["batch_size"] % count:
            self.add("pipeline", "batch_size", f"{pipeline['batch_size']} is not divisible by the {count} GPU(s) "
                     "given in [train] gpus; each GPU gets an equal share of every batch")
