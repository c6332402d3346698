"""Turn a worker's exit status and the tail of its log into a reason a user can act on."""

from __future__ import annotations

import re
import signal

_OOM = re.compile(r"ResourceExhaustedError|OOM when allocating|out of memory", re.IGNORECASE)
_OOM_SHAPE = re.compile(r"OOM when allocating tensor with shape\[([0-9,]+)\]")
_NAN = re.compile(r"(?:Loss|loss)[^\n]*\bNaN\b|NaN loss|loss became NaN", re.IGNORECASE)
_NAN_STEP = re.compile(r"step (\d+)", re.IGNORECASE)


def classify_failure(returncode: int, tail: list[str]) -> str:
    """A short reason, or "" when nothing specific is known."""
    text = "\n".join(tail[-80:])
    if _OOM.search(text):
        shape = _OOM_SHAPE.search(text)
        where = f" (tensor shape [{shape.group(1)}])" if shape else ""
        return f"out of GPU memory{where}: lower [pipeline] batch_size"
    nan = _NAN.search(text)
    if nan:
        step = _NAN_STEP.search(nan.group(0))
        return "loss became NaN" + (f" at step {step.group(1)}" if step else "") + ": lower the learning rate"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return ""
