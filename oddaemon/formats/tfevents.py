"""TensorFlow event files read without TensorFlow: the daemon's incremental reader (``event_proto``
decodes one Event lazily; ``tfevents_writer`` is the encoder and writer the stand-in worker and the
tests use).

An event file is a TFRecord file of serialized ``tensorflow.Event`` protobufs; each record is
``uint64 length (LE) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``.
The file is read in large blocks (``_READ_CHUNK``) and walked record by record in place.

Which CRCs are verified: every header's length CRC (the framing depends on it; a valid header is
remembered by its twelve bytes, so the scalar events' few distinct lengths cost one dict look-up),
and the data CRC of every record whose content is used: one that yields a wanted scalar, one whose
walk fails, and every candidate record while looking for the next record after a damaged header. A
record that yields nothing the caller wants (an image summary, a histogram, the graph) is stepped
over by its length without its data CRC being computed: its bytes are never used, so damage inside
it cannot be misread, and it is neither counted nor reported. A damaged record is never misread:
whatever would be taken from it is checked first, and a record that fails is skipped and counted.

Resume: ``EventFileReader.state()`` is what a restarted reader needs to go on where this one is (the
offset, the file's device and inode, a fingerprint of its first and last bytes read, the damage
count); ``EventFileReader(path, saved=state)`` goes on from that offset when the file is still the
same one (same device and inode, at least that long, same fingerprint), else reads it from byte 0.
A live reader also starts again from byte 0 when its file is replaced (a new inode under the name)
or truncated below what it had read.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

from oddaemon.formats.event_proto import DecodeError, ScalarEvent, TagFilter, decode_event, scan_event
from oddaemon.formats.tfrecord import FOOTER_SIZE, HEADER_SIZE, crc32c_bytes, mask, next_header

__all__ = ["FILE_PREFIX", "FILE_VERSION", "CorruptRecord", "DecodeError", "EventDirReader", "EventFileReader",
           "ScalarEvent", "TagFilter", "decode_event"]

FILE_VERSION = "brain.Event:2"
FILE_PREFIX = "events.out.tfevents."
_READ_CHUNK = 4 << 20
_FINGERPRINT_BYTES = 64
_U32 = struct.Struct("<I").unpack_from
_U64 = struct.Struct("<Q").unpack_from
_VALID_HEADERS: dict[bytes, int] = {}  # a header whose length CRC checked -> its length
_HEADER_CACHE_LIMIT = 4096


class CorruptRecord(ValueError):
    """A record of an event file that cannot be used (its text is the reader's ``last_error``)."""

    def __init__(self, path: str, offset: int, reason: str):
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(path, offset, reason)

    def __str__(self) -> str:
        return f"corrupt record in event file {self.path} at byte {self.offset}: {self.reason}"


def _header_length(header: bytes) -> int | None:
    """The data length of a 12-byte record header, None when its length CRC fails."""
    length = _VALID_HEADERS.get(header)
    if length is None:
        if _U32(header, 8)[0] != mask(crc32c_bytes(header[:8])):
            return None
        length = _U64(header)[0]
        if len(_VALID_HEADERS) < _HEADER_CACHE_LIMIT:
            _VALID_HEADERS[header] = length
    return length


def _fingerprint(fd: int, offset: int) -> int:
    """CRC32C of the first and the last bytes before ``offset``: tells a file rewritten in place."""
    size = min(_FINGERPRINT_BYTES, offset)
    return crc32c_bytes(os.pread(fd, size, 0) + os.pread(fd, size, offset - size))


class EventFileReader:
    """Reads one event file incrementally; a partial record at the end waits for a later call.

    A damaged record is skipped: one whose data CRC fails is stepped over by its length; after a
    header whose length CRC fails (a file truncated inside a header and written on past the cut,
    which leaves a hole of zeros), the reader looks for the next place where a whole record with
    valid CRCs starts and carries on from there, so later records are never lost.

    ``tags``: which scalars to take (a ``TagFilter``; all by default). ``saved``: a ``state()`` of
    an earlier reader of the same path, to go on from (``resumed`` says whether it could)."""

    def __init__(self, path: str, tags: TagFilter | None = None, saved: dict | None = None):
        self.path = path
        self.tags = tags or TagFilter()
        self.offset = 0
        self.corrupt_records = 0
        self.last_error: str | None = None
        self.bytes_read = 0  # bytes this reader read from the file (restarts and resumes included)
        self.resumed = False
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file read
        self._lost_sync = False  # between a bad header and the next valid record: self.offset is a scan position
        self._fingerprint: tuple[int, int] | None = None  # (offset, fingerprint) last computed
        if saved:
            self._resume(saved)

    # ---- resume
    def _resume(self, saved: dict) -> None:
        try:
            offset, identity = int(saved["offset"]), (int(saved["dev"]), int(saved["ino"]))
            if offset < 0:
                return
            fd = os.open(self.path, os.O_RDONLY)
        except (OSError, KeyError, TypeError, ValueError):
            return  # gone, or not a state: read from byte 0
        try:
            st = os.fstat(fd)
            if ((st.st_dev, st.st_ino) != identity or st.st_size < offset
                    or _fingerprint(fd, offset) != saved.get("fingerprint")):
                return  # another file under this name now, or this one cut or rewritten
        except OSError:
            return
        finally:
            os.close(fd)
        self.offset, self._identity, self.resumed = offset, identity, True
        self._fingerprint = (offset, saved["fingerprint"])
        self._lost_sync = bool(saved.get("lost_sync"))
        self.corrupt_records = int(saved.get("corrupt_records") or 0)
        self.last_error = saved.get("last_error")

    def state(self) -> dict | None:
        """What ``EventFileReader(path, saved=...)`` needs to go on from here; None before the file
        was ever read, or when it is no longer the file that was read."""
        if self._identity is None:
            return None
        if self._fingerprint is None or self._fingerprint[0] != self.offset:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except OSError:
                return None
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != self._identity or st.st_size < self.offset:
                    return None
                self._fingerprint = (self.offset, _fingerprint(fd, self.offset))
            except OSError:
                return None
            finally:
                os.close(fd)
        return {"offset": self.offset, "dev": self._identity[0], "ino": self._identity[1],
                "fingerprint": self._fingerprint[1], "lost_sync": self._lost_sync,
                "corrupt_records": self.corrupt_records, "last_error": self.last_error}

    # ---- reading
    def read_new(self) -> list[ScalarEvent]:
        """Scalar events of the records completed since the last call. Never raises for bad content;
        an OSError (file gone) ends the call with what was read so far."""
        events: list[ScalarEvent] = []
        try:
            st = os.stat(self.path)
            if st.st_size == self.offset and (st.st_dev, st.st_ino) == self._identity and not self._lost_sync:
                return events  # nothing new: one stat, not an open (a directory can hold many finished files)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return events
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != self._identity or st.st_size < self.offset:
                self._restart((st.st_dev, st.st_ino))  # a new file under the name, or this one cut short
            self._read_records(fd, st.st_size, events)
        except OSError:
            pass
        finally:
            os.close(fd)
        return events

    def _restart(self, identity: tuple[int, int]) -> None:
        self._identity, self.offset, self._lost_sync, self._fingerprint = identity, 0, False, None

    def _read_records(self, fd: int, size: int, events: list[ScalarEvent]) -> None:
        buf, base, pos = b"", self.offset, 0  # buf holds the file's bytes from `base` on
        while True:
            if not self._lost_sync:
                pos = self._take_records(buf, pos, base, events.append)
                self.offset = base + pos
            available, needed = len(buf) - pos, HEADER_SIZE
            if available >= HEADER_SIZE:
                length = _header_length(buf[pos:pos + HEADER_SIZE])
                if length is None:
                    self._lose_sync(base + pos, "length CRC mismatch; looking for the next record")
                    pos = next_header(buf, pos + 1)
                    self.offset = base + pos
                    continue
                needed = HEADER_SIZE + length + FOOTER_SIZE
            if available < needed:
                end = base + len(buf)
                want = min(size - end, max(needed - available, _READ_CHUNK))
                more = os.pread(fd, want, end) if want > 0 else b""
                if not more:
                    return  # partial record: read it again once it is complete
                self.bytes_read += len(more)
                buf, base, pos = buf[pos:] + more, base + pos, 0
                continue
            # a whole record after a damaged stretch: the next record only when its data CRC holds too
            if not self._data_crc_ok(buf, pos + HEADER_SIZE, pos + needed - FOOTER_SIZE):
                pos = next_header(buf, pos + 1)  # a header-like pattern inside garbage: keep looking
                self.offset = base + pos
                continue
            self._lost_sync = False

    def _take_records(self, buf: bytes, pos: int, base: int, append: Callable[[ScalarEvent], None]) -> int:
        """Takes every whole record of ``buf`` from ``pos`` on (the hot loop); returns where it stopped:
        at a record not wholly in ``buf`` yet, or at a header whose length CRC fails."""
        tags, end, valid_headers = self.tags, len(buf), _VALID_HEADERS
        while pos + HEADER_SIZE <= end:
            header = buf[pos:pos + HEADER_SIZE]
            length = valid_headers.get(header)
            if length is None:
                length = _header_length(header)
                if length is None:
                    return pos
            start = pos + HEADER_SIZE
            stop = start + length
            if stop + FOOTER_SIZE > end:
                return pos
            try:
                event = scan_event(buf, start, stop, tags)
            except DecodeError as exc:
                reason = str(exc) if self._data_crc_ok(buf, start, stop) else "data CRC mismatch"
                self._count(base + pos, f"{reason}; record skipped")
            else:
                if event is not None:  # used: its data CRC is checked first (inline: the hot path)
                    crc = crc32c_bytes(buf[start:stop])
                    if _U32(buf, stop)[0] == ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF:
                        append(event)
                    else:
                        self._count(base + pos, "data CRC mismatch; record skipped")
            pos = stop + FOOTER_SIZE
        return pos

    @staticmethod
    def _data_crc_ok(buf: bytes, start: int, stop: int) -> bool:
        return _U32(buf, stop)[0] == mask(crc32c_bytes(buf[start:stop]))

    def _lose_sync(self, offset: int, reason: str) -> None:
        if not self._lost_sync:  # one damaged stretch counts once, however many calls it takes to cross
            self._lost_sync = True
            self._count(offset, reason)

    def _count(self, offset: int, reason: str) -> None:
        self.corrupt_records += 1
        self.last_error = str(CorruptRecord(self.path, offset, reason))


def _file_order(name: str) -> tuple[int, str]:
    base = os.path.basename(name)
    timestamp = base[len(FILE_PREFIX):].split(".", 1)[0]
    return (int(timestamp) if timestamp.isdigit() else 0, name)


class EventDirReader:
    """Follows every event file in a directory, including files created later; with ``subdirs``,
    those one level below too (the evaluator writes to ``eval/<eval_input_reader.name>``).

    ``wanted(tag)``: which scalars to take (all by default). ``saved``: a ``state()`` of an earlier
    reader of the same directory; each of its files goes on from its offset when it is the same file."""

    def __init__(self, logdir: str, subdirs: bool = False, wanted: Callable[[str], bool] | None = None,
                 saved: dict | None = None):
        self.logdir = logdir
        self.subdirs = subdirs
        self.tags = TagFilter(wanted)
        self._readers: dict[str, EventFileReader] = {}
        for name, file_state in (saved or {}).items():
            if isinstance(name, str) and isinstance(file_state, dict) and _is_event_name(name):
                self._readers[name] = EventFileReader(os.path.join(logdir, name), self.tags, file_state)

    def _names(self) -> list[str]:
        try:
            entries = list(os.scandir(self.logdir))
        except OSError:
            return []
        names = [entry.name for entry in entries if entry.name.startswith(FILE_PREFIX)]
        for entry in entries if self.subdirs else ():
            try:
                if entry.is_dir(follow_symlinks=False):
                    names += [os.path.join(entry.name, name) for name in os.listdir(entry.path)
                              if name.startswith(FILE_PREFIX)]
            except OSError:
                continue
        return names

    def read_new(self) -> list[ScalarEvent]:
        """New scalar events of all files: files ordered by the time in their name, then by name."""
        for name in self._names():
            if name not in self._readers:
                self._readers[name] = EventFileReader(os.path.join(self.logdir, name), self.tags)
        events: list[ScalarEvent] = []
        for name in sorted(self._readers, key=_file_order):
            events += self._readers[name].read_new()
        return events

    def state(self) -> dict[str, dict]:
        """Each file's ``EventFileReader.state()`` by its name below ``logdir``."""
        states = {name: reader.state() for name, reader in self._readers.items()}
        return {name: state for name, state in states.items() if state is not None}

    @property
    def resumed(self) -> bool:
        """Whether any file goes on from a saved state."""
        return any(reader.resumed for reader in self._readers.values())

    @property
    def bytes_read(self) -> int:
        return sum(reader.bytes_read for reader in self._readers.values())

    @property
    def corrupt_records(self) -> int:
        return sum(reader.corrupt_records for reader in self._readers.values())

    @property
    def last_error(self) -> str | None:
        errors = [reader.last_error for reader in self._readers.values() if reader.last_error]
        return errors[-1] if errors else None


def _is_event_name(name: str) -> bool:
    """A saved name is a file right below the directory, or one level down (never ``..``)."""
    parts = name.split(os.sep)
    return len(parts) <= 2 and parts[-1].startswith(FILE_PREFIX) and ".." not in parts and "" not in parts

