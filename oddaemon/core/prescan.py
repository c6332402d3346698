"""A linear look at a job file's text before ``tomllib`` sees it. Pure.

The standard library's ``tomllib`` is quadratic in the number of parts of a dotted key or table
header: one ``b.b.b.….b = 1`` of 20,000 parts (40 KB) took 37 s and 1.6 GB, 100,000 parts grew
past 12 GB. A job key has at most two parts (``pipeline.num_classes``, ``[pipeline]``), so a run of
more than ``MAX_KEY_PARTS`` dotted parts is refused here, with its line, before any parsing. The
scan is one regular-expression pass (C speed, no backtracking blow-up: each part is a distinct
token) over the text; it may also catch such a run inside a string value, which no real job has.

Whatever else a file's structure costs is bounded by the parser process's limits
(``oddaemon.adapters.parser_child``).
"""

from __future__ import annotations

import re

from oddaemon.core.checks import Problem

MAX_KEY_PARTS = 16
BOM = "\ufeff"

# Possessive quantifiers and a word-start lookbehind keep the search linear: a 1 MB word with no dot
# is tried once, not once per position (which a backtracking "+" would make quadratic).
_PART = r"(?:(?<![A-Za-z0-9_-])[A-Za-z0-9_-]++|\"[^\"\n]*+\"|'[^'\n]*+')"
_LONG_DOTTED = re.compile(rf"{_PART}(?:[ \t]*+\.[ \t]*+{_PART}){{{MAX_KEY_PARTS},}}+")


def prescan(text: str) -> Problem | None:
    """The first structure in ``text`` that the parser would choke on, as a Problem; else None."""
    m = _LONG_DOTTED.search(text)
    if m is None:
        return None
    line = text.count("\n", 0, m.start()) + 1
    column = m.start() - (text.rfind("\n", 0, m.start()) + 1) + 1
    parts = m.group(0).count(".") + 1
    return Problem(f"a dotted key or table header of {parts} parts (more than {MAX_KEY_PARTS}) was refused before "
                   "parsing; job keys have at most 2 parts, e.g. pipeline.num_classes or [pipeline]",
                   line=line, column=column)


def strip_bom(text: str) -> str:
    """A leading UTF-8 byte order mark (as Windows editors write one) is accepted and dropped."""
    return text[1:] if text.startswith(BOM) else text
