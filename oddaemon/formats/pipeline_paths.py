"""The paths a job's workers will read, after its ``[pipeline]`` edits, including those that only
pipeline.config names. Pure apart from the reader it is given; no protobuf, no tensorflow.

Confinement (``[jobs] allowed_roots``) must cover what the trainer, evaluator and exporter really
open: the label maps, the train and eval input files (globs) and the fine-tune checkpoint. A job
file names some of them; the rest come from its pipeline.config. This module reads the few string
fields that matter out of pipeline.config's protobuf text format with a small tokenizer (comments,
quoted strings with escapes, nested blocks, ``[a, b]`` lists), and returns the effective list:
a job's edit replaces the config's value (``label_map_path`` for every reader, as the edit does).
``jobspec`` checks them at submission and ``confine.escaped_paths`` again at every worker start.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable
from dataclasses import dataclass

MAX_CONFIG_BYTES = 8 * 1024 * 1024  # a pipeline.config is a few KB; more is not read
FIELDS = ("label_map_path", "input_path", "fine_tune_checkpoint")

_TOKEN = re.compile(r"""\s+|\#[^\n]*|"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[A-Za-z_][\w.]*|[{}<>\[\]:,;]"""
                    r"""|[^\s{}<>\[\]:,;\#"']+""")


@dataclass(frozen=True)
class ConfigPath:
    """One path the workers will read: which key gives it, where it is written, and its kind."""

    label: str  # e.g. "pipeline_config /x/p.config line 12: train_input_reader input_path"
    path: str
    kind: str  # "file", "glob" or "checkpoint"


def _unquote(token: str) -> str:
    body = token[1:-1].encode("utf-8", "surrogateescape")
    try:
        return codecs.escape_decode(body)[0].decode("utf-8", "replace")
    except ValueError:
        return token[1:-1]


def scan(text: str) -> list[tuple[tuple[str, ...], str, str, int]]:
    """(enclosing blocks, field, value, line) of every string value of a field in FIELDS."""
    found = []
    stack: list[str] = []
    last_ident = ""
    field = ""  # a FIELDS name after its ':' (values follow, maybe in a [ ] list)
    line = 1
    for m in _TOKEN.finditer(text):
        token = m.group(0)
        start_line = line
        line += token.count("\n")
        if token[0].isspace() or token[0] == "#":
            continue
        if token in ("{", "<"):
            stack.append(last_ident)
            field = last_ident = ""
        elif token in ("}", ">"):
            if stack:
                stack.pop()
            field = last_ident = ""
        elif token == ":":
            field = last_ident if last_ident in FIELDS else ""
        elif token[0] in "\"'":
            if field:
                found.append((tuple(stack), field, _unquote(token), start_line))
        elif token in ("[", ",", "]", ";"):
            if token == "]":
                field = ""
        else:
            last_ident = token
            if field and not token[0].isdigit():
                field = ""
    return found


def effective_paths(config_path: str, text: str, edits) -> list[ConfigPath]:
    """The paths the workers will read that come from pipeline.config (those a ``[pipeline]`` edit
    replaces are left out: the job file's own keys are checked as such)."""
    out = []
    where = f"pipeline_config {config_path}"
    for blocks, field, value, line in scan(text):
        top = blocks[0] if blocks else ""
        if field == "fine_tune_checkpoint" and top == "train_config" and value and not edits.fine_tune_checkpoint:
            out.append(ConfigPath(f"{where} line {line}: train_config.fine_tune_checkpoint", value, "checkpoint"))
        elif field == "label_map_path" and top in ("train_input_reader", "eval_input_reader") \
                and value and not edits.label_map_path:
            out.append(ConfigPath(f"{where} line {line}: {top}.label_map_path", value, "file"))
        elif field == "input_path" and value:
            if (top == "train_input_reader" and not edits.train_input_path) or \
                    (top == "eval_input_reader" and not edits.eval_input_path):
                out.append(ConfigPath(f"{where} line {line}: {top} input_path", value, "glob"))
    return out


def read_config(path: str, opener: Callable[..., object] = open) -> str:
    with opener(path, "rb") as f:
        return f.read(MAX_CONFIG_BYTES).decode("utf-8", "replace")
