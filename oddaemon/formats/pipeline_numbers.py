"""The few numbers of a pipeline.config the daemon shows or reasons with (num_steps, batch size, the
cosine-decay rates), read from its text without protos."""

from __future__ import annotations

import re

_TRAIN_CONFIG = re.compile(rb"^\s*train_config\s*[:{]", re.MULTILINE)
_NUMBERS = {
    "num_steps": re.compile(rb"^\s*num_steps\s*:\s*(\d+)", re.MULTILINE),
    "batch_size": re.compile(rb"^\s*batch_size\s*:\s*(\d+)", re.MULTILINE),
    "learning_rate_base": re.compile(rb"^\s*learning_rate_base\s*:\s*([0-9.eE+-]+)", re.MULTILINE),
    "warmup_learning_rate": re.compile(rb"^\s*warmup_learning_rate\s*:\s*([0-9.eE+-]+)", re.MULTILINE),
}


def read_pipeline_numbers(path: str) -> dict[str, float]:
    """train_config.num_steps, batch_size and the cosine-decay rates from a pipeline.config text (no protos).
    Missing values (or an unreadable file) are simply left out."""
    try:
        with open(path, "rb") as f:
            text = f.read(4 << 20)
    except OSError:
        return {}
    found: dict[str, float] = {}
    train = _TRAIN_CONFIG.search(text)
    for key, pattern in _NUMBERS.items():
        # batch_size also appears in eval_config: take the one inside train_config
        match = pattern.search(text, train.start() if train and key == "batch_size" else 0)
        if match:
            try:
                found[key] = int(match.group(1)) if key in ("num_steps", "batch_size") else float(match.group(1))
            except ValueError:
                continue
    return found


def pipeline_num_steps(pipeline_config: str) -> int | None:
    """``train_config.num_steps`` from a pipeline.config text, without parsing protos."""
    value = read_pipeline_numbers(pipeline_config).get("num_steps")
    return int(value) if value is not None else None
