"""The daemon's own log records to journald with structured fields, over the native journal protocol.

Under systemd the daemon's stderr is a stream to journald; systemd says so by setting
``JOURNAL_STREAM=<device>:<inode>`` to that stream's ``st_dev``/``st_ino`` (``systemd.exec(5)``:
a process checks that its stderr still *is* that stream before it switches to the native protocol).
When it does, ``JournalHandler`` sends each record as one datagram to journald's socket
(``/run/systemd/journal/socket``): ``KEY=value`` lines, and the binary form
(``KEY\\n<64-bit little-endian length><value>\\n``) for a value with a newline in it. No library is
needed (python-systemd does the same). The fields:

* ``MESSAGE`` (the line the stream would have carried: ``LEVEL message``, traceback included),
  ``PRIORITY`` (syslog's 0-7 from the level), ``SYSLOG_IDENTIFIER=oddaemon``, ``CODE_FILE``,
  ``CODE_LINE``, ``CODE_FUNC``, ``LOGGER``;
* ``ODDAEMON_JOB``, ``ODDAEMON_ROLE``, ``ODDAEMON_STATE``, ``ODDAEMON_FAILURE`` (the failure kind),
  ``ODDAEMON_ATTEMPT``: from ``extra=job_fields(...)`` at the places that log a job's transitions,
  worker starts and exits; a record without them whose format starts ``job %s`` (the daemon's
  convention for a job's lines) gets ``ODDAEMON_JOB`` from its first argument.

So ``journalctl -u oddaemon ODDAEMON_JOB=effdet`` shows one job's story. A datagram that cannot be
sent (journald gone or too busy: the send never blocks the event loop) is written to stderr as the
plain line instead, which reaches the journal through the stream as before. Outside journald the
daemon logs plain lines to stderr, as it always did (``cli/main.py``'s ``setup_logging``).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SOCKET_ENV = "ODDAEMON_JOURNAL_SOCKET"  # another socket path (the tests' fake journald)
IDENTIFIER = "oddaemon"
MAX_MESSAGE = 48 * 1024  # bytes of MESSAGE kept in one datagram (the rest is cut, and says so)
EXTRA = "oddaemon_journal"  # the LogRecord attribute job_fields() sets
FIELD_NAMES = ("JOB", "ROLE", "STATE", "FAILURE", "ATTEMPT")

_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def job_fields(job: str | None = None, role: str | None = None, state: str | None = None,
               failure: str | None = None, attempt: int | None = None) -> dict:
    """``extra=`` for a log call about a job: the ``ODDAEMON_*`` fields its journal entry carries
    (ignored by every other handler)."""
    values = {"JOB": job, "ROLE": role, "STATE": state, "FAILURE": failure, "ATTEMPT": attempt}
    return {EXTRA: {k: str(v) for k, v in values.items() if v is not None and v != ""}}


def stream_is_journal(environ: Mapping[str, str], fd: int = 2) -> bool:
    """True when ``fd`` is the stream systemd connected to journald (``JOURNAL_STREAM`` names its
    device and inode; a stderr redirected since, e.g. by a shell, no longer matches)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def priority(levelno: int) -> int:
    for level, value in _PRIORITIES:
        if levelno >= level:
            return value
    return 7


def encode_field(name: str, value: str | bytes) -> bytes:
    """One field of the native protocol: ``NAME=value\\n``, or the length-prefixed form for a value
    with a newline."""
    data = value.encode("utf-8", "backslashreplace") if isinstance(value, str) else value
    key = name.encode("ascii")
    if b"\n" in data:
        return key + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
    return key + b"=" + data + b"\n"


def record_fields(record: logging.LogRecord, message: str, identifier: str = IDENTIFIER,
                  max_message: int = MAX_MESSAGE) -> list[tuple[str, str]]:
    """The fields of one record's entry (``message``: its formatted text), in order."""
    data = message.encode("utf-8", "backslashreplace")
    if len(data) > max_message:
        cut = len(data) - max_message
        message = data[:max_message].decode("utf-8", "ignore") + f" [... {cut} byte(s) cut]"
    fields = [("MESSAGE", message), ("PRIORITY", str(priority(record.levelno))), ("SYSLOG_IDENTIFIER", identifier),
              ("CODE_FILE", record.pathname), ("CODE_LINE", str(record.lineno)), ("CODE_FUNC", record.funcName),
              ("LOGGER", record.name)]
    ours = dict(getattr(record, EXTRA, None) or {})
    if "JOB" not in ours:
        job = _job_of(record)
        if job is not None:
            ours["JOB"] = job
    fields += [(f"ODDAEMON_{name}", ours[name]) for name in FIELD_NAMES if ours.get(name)]
    return fields


def _job_of(record: logging.LogRecord) -> str | None:
    """The job a ``"job %s: ..."`` record is about (its first argument), else None."""
    if isinstance(record.msg, str) and record.msg.startswith(("job %s", "accepted job %s")):
        args = record.args
        if isinstance(args, tuple) and args and isinstance(args[0], str):
            return args[0]
    return None


def encode_record(fields: list[tuple[str, str]]) -> bytes:
    return b"".join(encode_field(name, value) for name, value in fields)


def decode_record(data: bytes) -> list[tuple[str, str]]:
    """A datagram's fields, as journald reads them (both forms; the tests' fake journal uses it)."""
    fields, i = [], 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            i = end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + size]
            if data[end + 9 + size:end + 10 + size] != b"\n":
                raise ValueError(f"field {name!r}: no newline after its {size} byte(s)")
            i = end + 10 + size
        fields.append((name.decode("ascii"), value.decode("utf-8", "replace")))
    return fields


class JournalHandler(logging.Handler):
    """Each record as one native-protocol datagram to ``path``; the plain line on ``fallback`` (a
    stream) when the datagram cannot be sent."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback=None, identifier: str = IDENTIFIER):
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.fallback = fallback if fallback is not None else sys.stderr
        self.failed_sends = 0
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = record_fields(record, message, self.identifier)
            if not self._send(encode_record(fields)):
                self.failed_sends += 1
                self.fallback.write(message + "\n")
                self.fallback.flush()
        except Exception:  # noqa: BLE001 (a Handler's contract: handleError reports it, logging goes on)
            self.handleError(record)

    def _send(self, data: bytes) -> bool:
        try:
            self._sock.sendto(data, socket.MSG_DONTWAIT, self.path)
        except OSError:  # journald not there, or its queue full: never block the loop on it
            return False
        return True

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            super().close()


def journal_handler(environ: Mapping[str, str], fallback=None) -> JournalHandler | None:
    """The handler to use when stderr is systemd's journal stream, else None (plain lines)."""
    if not stream_is_journal(environ):
        return None
    return JournalHandler(environ.get(SOCKET_ENV) or JOURNAL_SOCKET, fallback)
