"""The paths of a job file: shape, confinement under the allowed roots, what exists, globs.

Pure like the rest of validation: every filesystem lookup goes through the ``ValidationContext``
(tests inject fakes). ``PathRules`` is the part of the job validator that checks paths; the
validator (``job_validation._Validator``) supplies ``ctx``, ``roots`` (the resolved allowed roots),
``problems`` and ``add``.
"""

from __future__ import annotations

import glob as globmod
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oddaemon.core.checks import Invalid, Problem, show
from oddaemon.core.jobspec import MAX_INPUT_PATHS, MAX_PATH_BYTES, MAX_WILDCARD_PARTS
from oddaemon.formats.pipeline_paths import read_config


@dataclass(frozen=True)
class ValidationContext:
    allowed_roots: tuple[str, ...]
    max_file_bytes: int = 1_048_576
    realpath: Callable[[str], str] = os.path.realpath
    isfile: Callable[[str], bool] = os.path.isfile
    isdir: Callable[[str], bool] = os.path.isdir
    glob: Callable[[str], list[str]] = globmod.glob
    kind: Callable[[str], str | None] = lambda path: file_kind(path)  # what a path is that is no file
    writable: Callable[[str], bool] = lambda path: os.access(path, os.W_OK | os.X_OK)
    read_text: Callable[[str], str] = read_config  # a pipeline.config (bounded)
    slurm_partitions: tuple[str, ...] = ()  # partitions a job may choose ([slurm] partitions of the daemon)
    slurm_max_nodes: int = 1  # the most Slurm nodes one job may ask for ([slurm] max_nodes of the daemon)
    notify_targets: tuple[str, ...] = ()  # the daemon's [notify.targets.NAME] names a job may choose
    resource_ceilings: tuple[int | None, int] = (None, 10_000)  # [cgroups] memory_max_ceiling, cpu_weight_ceiling


def file_kind(path: str) -> str | None:
    """What ``path`` is, in words ("a FIFO (named pipe)", ...); None if it does not exist."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    for test, words in ((stat.S_ISREG, "a regular file"), (stat.S_ISDIR, "a directory"),
                        (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return words
    return "not a regular file"


def under_roots(real: str, roots: tuple[str, ...]) -> bool:
    """``real`` (a resolved path) is one of ``roots`` (resolved) or lies below one."""
    return any(real == root or real.startswith(root.rstrip("/") + "/") for root in roots)


class CheckpointMissing(Invalid):
    """A checkpoint prefix whose ``.index`` does not exist (yet: a job in ``after`` may write it)."""


class PathRules:
    """The path checks of one job document (a mixin of the job validator)."""

    ctx: ValidationContext
    roots: tuple[str, ...]
    problems: list[Problem]

    def add(self, section: str, key: str, reason: str, label: str | None = None) -> None:
        raise NotImplementedError

    def path_checker(self, kind: str) -> Callable[[Any], str]:
        return lambda value: self.path(value, kind)

    def path(self, value: Any, kind: str) -> str:
        real = self.inside_roots(value)
        if kind == "file" and not self.ctx.isfile(real):
            if self.ctx.isdir(real):
                raise Invalid(f"{value} is a directory, not a file")
            what = self.ctx.kind(real)
            raise Invalid(f"{value} does not exist" if what is None else f"{value} is {what}, not a regular file")
        if kind == "checkpoint":
            index = value + ".index"
            if not self.ctx.isfile(index):
                raise CheckpointMissing(f"{index} does not exist (give the checkpoint prefix, e.g. "
                                        ".../checkpoint/ckpt-0)")
            self.inside_roots(index)
        if kind == "model_dir":
            return self.model_dir(value, real)
        return value

    def model_dir(self, value: str, real: str) -> str:
        """A directory the daemon can create (or has) for this job alone; returned resolved, so that
        two spellings of one directory are one model_dir to the scheduler."""
        if self.ctx.isfile(real):
            raise Invalid(f"{value} exists and is a file; model_dir must be a directory")
        if real in self.roots:
            raise Invalid(f"{value} is an allowed root itself; give the job a directory of its own below it "
                          f"(e.g. {real.rstrip('/')}/<name>)")
        long = next((part for part in real.split("/") if len(part.encode("utf-8", "surrogatepass")) > 255), None)
        if long is not None:
            raise Invalid(f"{value}: the path component {show(long[:40] + '...')} is longer than 255 bytes, "
                          "which no file system allows")
        ancestor = real
        while not self.ctx.isdir(ancestor) and os.path.dirname(ancestor) != ancestor:
            ancestor = os.path.dirname(ancestor)
            if self.ctx.isfile(ancestor) or self.ctx.kind(ancestor) not in (None, "a directory"):
                raise Invalid(f"{value} cannot be created: {ancestor} is {self.ctx.kind(ancestor) or 'a file'}, "
                              "not a directory")
        if not self.under_roots(ancestor):
            raise Invalid(f"{value} does not exist yet and its nearest existing parent directory "
                          f"{ancestor} is outside the allowed roots {self.roots_text()}; "
                          "create the allowed root directory first")
        if not self.ctx.writable(ancestor):
            raise Invalid(f"{value} cannot be {'written' if ancestor == real else 'created'}: the daemon may not "
                          f"write in {ancestor} (permissions, or a read-only file system)")
        return real

    def inside_roots(self, value: Any) -> str:
        """Check the shape of a path and that it resolves under an allowed root; return the real path."""
        if not isinstance(value, str):
            raise Invalid(f"must be a string (an absolute path), got {show(value)}")
        if not value:
            raise Invalid("must not be empty")
        if "\0" in value:
            raise Invalid(f"must not contain a NUL character, got {show(value)}")
        if not os.path.isabs(value):
            raise Invalid(f"must be an absolute path, got {show(value)}")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_PATH_BYTES:
            raise Invalid(f"{show(value)} is {size} bytes long; a path can be at most {MAX_PATH_BYTES} bytes")
        real = self.ctx.realpath(value)
        if not self.under_roots(real):
            shown = value if real == value else f"{value} resolves to {real}, which"
            raise Invalid(f"{shown} is outside the allowed roots {self.roots_text()}")
        return real

    def under_roots(self, real: str) -> bool:
        return under_roots(real, self.roots)

    def roots_text(self) -> str:
        return ", ".join(self.ctx.allowed_roots) if self.ctx.allowed_roots else "(none are configured)"

    def input_paths(self, key: str, value: Any) -> tuple[str, ...] | None:
        if isinstance(value, str):
            entries = [(key, value)]
        elif isinstance(value, list) and 0 < len(value) <= MAX_INPUT_PATHS:
            entries = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
        else:
            got = f"a list of {len(value)} entries" if isinstance(value, list) else show(value)
            self.add("pipeline", key, f"must be a path (glob) or a list of 1 to {MAX_INPUT_PATHS} paths, got {got}")
            return None
        before = len(self.problems)
        for label, pattern in entries:
            try:
                self.input_glob(pattern)
            except Invalid as exc:
                self.add("pipeline", key, str(exc), label=label)
        return tuple(v for _, v in entries) if len(self.problems) == before else None

    def input_glob(self, pattern: Any) -> None:
        self.inside_roots(pattern)
        wild = sum(1 for part in pattern.split("/") if re.search(r"[*?[]", part))
        if wild > MAX_WILDCARD_PARTS:
            raise Invalid(f"{show(pattern)} has {wild} path components with wildcards (* ? [); "
                          f"at most {MAX_WILDCARD_PARTS} are allowed")
        matches = self.ctx.glob(pattern)
        files = [m for m in matches if self.ctx.isfile(m)]
        if not files:
            special = [m for m in matches if not self.ctx.isdir(m) and self.ctx.kind(m)]
            if special:  # a FIFO, a socket, a device: say so, "no file" would send the user looking
                raise Invalid(f"{pattern} matches no regular file: {special[0]} is {self.ctx.kind(special[0])}")
            raise Invalid(f"{pattern} matches no file")
        for match in files:
            real = self.ctx.realpath(match)
            if not self.under_roots(real):
                raise Invalid(f"{pattern} matches {match}, which resolves to {real}, outside the allowed "
                              f"roots {self.roots_text()}")
