"""What the job spec and the daemon configuration share: a ``Problem`` with its place in the file,
the bytes-to-text checks (UTF-8, NUL) and TOML syntax messages, and the value checkers (each
returns the converted value or raises ``Invalid`` with a reason a user can act on). Pure."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from oddaemon.core.printable import printable


@dataclass(frozen=True)
class Problem:
    message: str
    key: str | None = None
    line: int | None = None
    column: int | None = None
    count: int = 1  # how many problems this one stands for ("... and N more")

    def render(self) -> str:
        if self.line is None:
            return self.message
        where = f"line {self.line}" + (f", column {self.column}" if self.column is not None else "")
        return f"{where}: {self.message}"


# ---- the bytes and the syntax of a file

def decode(data: bytes) -> str | list[Problem]:
    problems = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        text = None
        problems.append(byte_problem(data, exc.start, f"byte 0x{data[exc.start]:02x} at offset {exc.start} "
                                      "is not valid UTF-8; save the file as UTF-8 text"))
    nul = data.find(b"\0")
    if nul >= 0:
        problems.append(byte_problem(data, nul, f"NUL byte at offset {nul}; a job file must be plain text"))
    return problems or text


def byte_problem(data: bytes, offset: int, message: str) -> Problem:
    line_start = data.rfind(b"\n", 0, offset) + 1
    return Problem(message, line=data.count(b"\n", 0, offset) + 1, column=offset - line_start + 1)


def syntax_problem(message: str, text: str) -> Problem:
    """A Problem from a tomllib message such as "Invalid value (at line 3, column 7)"."""
    line = column = None
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where:
        line, column = int(where.group(1)), int(where.group(2))
    elif where := re.search(r"\s*\(at end of document\)$", message):
        line, column = text.count("\n") + 1, len(text) - text.rfind("\n")
    plain = message[:where.start()] if where else message
    # tomllib names keys as Python tuples, e.g. "Cannot declare ('train',) twice"; show them dotted.
    plain = re.sub(r"\(((?:'[^']*',? ?)+)\)",
                   lambda m: "'" + ".".join(re.findall(r"'([^']*)'", m.group(1))) + "'", plain)
    return Problem(f"TOML syntax error: {plain[:1].lower()}{plain[1:]}", line=line, column=column)


# ---- value checkers: each returns the (converted) value or raises Invalid
class Invalid(Exception):
    """A value failed its check; the argument is the reason, without the key label."""


def show(value: Any, depth: int = 0) -> str:
    """A short TOML-like rendering of a value for messages (at most ~60 characters)."""
    if isinstance(value, dict):
        text = "a table"
    elif is_int(value):
        try:
            text = repr(value)
        except ValueError:  # over sys.get_int_max_str_digits() (a hex literal in TOML has no such limit)
            digits = int(value.bit_length() * math.log10(2)) + 1
            text = f"{'-' if value < 0 else ''}a whole number of about {digits} digits"
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float) and not math.isfinite(value):
        text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    elif isinstance(value, list):
        text = "[...]" if depth > 2 else "[" + ", ".join(show(v, depth + 1) for v in value[:12]) + \
            (", ...]" if len(value) > 12 else "]")
    else:
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def rule(expected: str, accept: Callable[[Any], bool], convert: Callable[[Any], Any] = lambda v: v):
    """A checker: returns the (converted) value, or raises Invalid naming what was expected and got."""
    def check(value: Any) -> Any:
        if not accept(value):
            raise Invalid(f"must be {expected}, got {show(value)}")
        return convert(value)
    return check


def whole_number(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    expected = f"a whole number from {lo} to {hi}" if hi is not None else f"a whole number >= {lo}"
    return rule(expected, lambda v: is_int(v) and v >= lo and (hi is None or v <= hi))


def finite_number(lo: float, inclusive: bool) -> Callable[[Any], float]:
    def accept(v: Any) -> bool:  # the bounds reject nan, inf and ints too large for a float
        return (is_int(v) or isinstance(v, float)) and -1e308 < v < 1e308 and (v >= lo if inclusive else v > lo)
    return rule(f"a finite number {'>=' if inclusive else '>'} {lo:g}", accept, float)


def one_of(options: tuple[str, ...]) -> Callable[[Any], str]:
    return rule(f"one of {', '.join(repr(o) for o in options)}", lambda v: isinstance(v, str) and v in options)


def size_problem(size: int, limit: int) -> Problem:
    return Problem(f"the file is {size} bytes, larger than the limit of {limit} bytes "
                   "(max_file_bytes in the [jobs] section of the daemon configuration)")


def render_error_file(original_name: str, problems: list[Problem],
                      because: str = "it is not a valid oddaemon job spec") -> str:
    """The text of the ``.error`` file written next to a rejected job file."""
    total = sum(p.count for p in problems)  # the last one may stand for all those not listed
    count = f"{total} problem" + ("" if total == 1 else "s")
    lines = [f"Job file '{printable(original_name)}' was rejected because {because}; nothing was queued.", f"{count}:"]
    lines += [f"  - {printable(p.render())}" for p in problems]
    lines.append("Fix the file and submit it again. Every key is described in the \"Job spec\" section "
                 "of the README; etc/jobs/example.toml is a commented example.")
    return "\n".join(lines) + "\n"
