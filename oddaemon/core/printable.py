"""What came from outside is shown escaped: one function, used wherever user-controlled text
(file names, paths, values, worker error lines) reaches a log line, an ``.error`` file, the CLI or
D-Bus. Control characters (C0 including newline and ESC, DEL, C1), and the invisible Unicode
format characters that reorder or hide text (bidi overrides, zero-width marks), become visible
escapes, so no submitted name can forge a log line or recolour a terminal. Pure.

``EscapingFormatter`` applies it to every daemon log record's message in one place (a traceback,
which is the daemon's own, stays as it is).
"""

from __future__ import annotations

import logging
import re

_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u202a-\u202e\u2060-\u2069\ufeff]")


def _escape(m: re.Match) -> str:
    c = m.group(0)
    code = ord(c)
    if c == "\n":
        return "\\n"
    if c == "\t":
        return "\\t"
    if c == "\r":
        return "\\r"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every control or invisible format character escaped (``\\n``, ``\\x1b``, ``\\u202e``)."""
    s = str(text)
    if _UNSAFE.search(s) is None:
        return s
    return _UNSAFE.sub(_escape, s)



class EscapingFormatter(logging.Formatter):
    """A Formatter whose messages never carry a raw control character."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)
