"""The native journal protocol (adapters/journal.py): the fields of a record, their encoding, the
detection of systemd's journal stream, and a real AF_UNIX datagram socket standing in for journald."""

from __future__ import annotations

import io
import logging
import os
import socket
import struct

import pytest

from oddaemon.adapters.journal import (
    EXTRA,
    JournalHandler,
    decode_record,
    encode_field,
    encode_record,
    job_fields,
    journal_handler,
    priority,
    record_fields,
    stream_is_journal,
)
from oddaemon.core.printable import EscapingFormatter


def make_record(msg: str, *args, level: int = logging.INFO, extra: dict | None = None) -> logging.LogRecord:
    record = logging.LogRecord("oddaemon", level, "/x/effects.py", 42, msg, args, None, func="_state_changed")
    for key, value in (extra or {}).items():
        setattr(record, key, value)
    return record


@pytest.fixture
def journal(tmp_path):
    """A bound datagram socket in a temporary directory: the fake journald."""
    path = str(tmp_path / "journal.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    yield path, sock
    sock.close()


def logger_to(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"oddaemon.test-journal.{id(handler)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    return logger


def test_a_plain_value_is_one_line_and_a_value_with_a_newline_is_length_prefixed():
    assert encode_field("MESSAGE", "hello") == b"MESSAGE=hello\n"
    assert encode_field("MESSAGE", "a\nb") == b"MESSAGE\n" + struct.pack("<Q", 3) + b"a\nb\n"
    fields = [("A", "x=y"), ("B", "1\n2\n"), ("C", ""), ("D", "\n")]
    assert decode_record(encode_record(fields)) == fields


def test_priorities_follow_syslog():
    assert [priority(level) for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                          logging.CRITICAL)] == [7, 6, 4, 3, 2]


def test_a_record_carries_the_job_fields_given_with_extra():
    record = make_record("job %s: %s -> %s (%s)", "effdet", "queued", "running", "started",
                         extra=job_fields("effdet", state="running", attempt=2, role=None, failure=""))
    fields = dict(record_fields(record, "INFO job effdet: queued -> running (started)"))
    assert fields["MESSAGE"] == "INFO job effdet: queued -> running (started)"
    assert fields["PRIORITY"] == "6" and fields["SYSLOG_IDENTIFIER"] == "oddaemon"
    assert (fields["CODE_FILE"], fields["CODE_LINE"], fields["CODE_FUNC"]) == ("/x/effects.py", "42", "_state_changed")
    assert fields["LOGGER"] == "oddaemon"
    assert (fields["ODDAEMON_JOB"], fields["ODDAEMON_STATE"], fields["ODDAEMON_ATTEMPT"]) == ("effdet", "running", "2")
    assert "ODDAEMON_ROLE" not in fields and "ODDAEMON_FAILURE" not in fields  # None and "" leave a field out


def test_a_job_line_without_extra_names_its_job_from_its_first_argument():
    fields = dict(record_fields(make_record("job %s: evaluated ckpt-%d", "effdet", 3), "m"))
    assert fields["ODDAEMON_JOB"] == "effdet"
    assert dict(record_fields(make_record("accepted job %s", "a1"), "m"))["ODDAEMON_JOB"] == "a1"
    for record in (make_record("ready: spool %s", "/s"), make_record("job %d", 3), make_record("job x")):
        assert not any(name.startswith("ODDAEMON_") for name, _ in record_fields(record, "m"))
    explicit = make_record("job %s: x", "wrong", extra=job_fields("right", role="eval"))
    assert dict(record_fields(explicit, "m"))["ODDAEMON_JOB"] == "right"


def test_a_huge_message_is_cut_and_says_so():
    fields = dict(record_fields(make_record("x"), "é" * 40000, max_message=1000))
    assert fields["MESSAGE"].startswith("é" * 500) and fields["MESSAGE"].endswith("[... 79000 byte(s) cut]")
    assert len(fields["MESSAGE"].encode()) < 1100


def test_records_reach_a_journal_socket_with_their_fields(journal):
    path, sock = journal
    handler = JournalHandler(path, fallback=io.StringIO())
    logger = logger_to(handler)
    try:
        logger.warning("job %s: %s worker exited (%s)", "effdet", "train", "exit status 3",
                       extra=job_fields("effdet", role="train", failure="crash", attempt=1))
        fields = dict(decode_record(sock.recv(65536)))
        assert fields["MESSAGE"] == "WARNING job effdet: train worker exited (exit status 3)"
        assert fields["PRIORITY"] == "4"
        assert (fields["ODDAEMON_JOB"], fields["ODDAEMON_ROLE"], fields["ODDAEMON_FAILURE"]) == ("effdet", "train",
                                                                                                 "crash")
        assert fields["CODE_FILE"] == __file__
        # a traceback keeps its lines (the length-prefixed form); control characters of the message do not
        try:
            raise ValueError("bad\x1b[31m")
        except ValueError:
            logger.exception("job %s: oops\x07", "effdet")
        message = dict(decode_record(sock.recv(65536)))["MESSAGE"]
        assert message.startswith("ERROR job effdet: oops\\x07\nTraceback (most recent call last):\n"), message
        assert "ValueError" in message
        assert handler.failed_sends == 0
    finally:
        handler.close()


def test_without_a_journal_the_plain_line_goes_to_the_fallback(tmp_path):
    fallback = io.StringIO()
    handler = JournalHandler(str(tmp_path / "no-such.sock"), fallback=fallback)
    logger = logger_to(handler)
    try:
        logger.info("job %s: started", "a1", extra=job_fields("a1"))
        logger.info("second")
    finally:
        handler.close()
    assert fallback.getvalue() == "INFO job a1: started\nINFO second\n"
    assert handler.failed_sends == 2


def test_journal_stream_must_match_stderr(tmp_path):
    with open(tmp_path / "stream", "wb") as f:
        st = os.fstat(f.fileno())
        assert stream_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, f.fileno())
        assert not stream_is_journal({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"}, f.fileno())
        for value in ("", "x", "1:", ":2", "1:2:3"):
            assert not stream_is_journal({"JOURNAL_STREAM": value}, f.fileno())
        assert not stream_is_journal({}, f.fileno())
    st = os.fstat(2)
    environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}", "ODDAEMON_JOURNAL_SOCKET": str(tmp_path / "j.sock")}
    handler = journal_handler(environ)
    try:
        assert isinstance(handler, JournalHandler) and handler.path == str(tmp_path / "j.sock")
    finally:
        handler.close()
    assert journal_handler({"JOURNAL_STREAM": "1:1"}) is None


def test_job_fields_are_one_attribute_no_handler_but_the_journal_reads():
    extra = job_fields("a", role="eval", attempt=0)
    assert extra == {EXTRA: {"JOB": "a", "ROLE": "eval", "ATTEMPT": "0"}}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logger_to(handler)
    logger.info("job %s: x", "a", extra=extra)
    assert stream.getvalue() == "INFO job a: x\n"  # plain lines as before
    handler.close()
