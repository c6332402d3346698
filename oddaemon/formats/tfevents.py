"""TensorFlow event files read without TensorFlow: the daemon's incremental reader (``tfevents_writer``
is the encoder and writer the stand-in worker and the tests use).

An event file is a TFRecord file of serialized ``tensorflow.Event`` protobufs; each record is
``uint64 length (LE) | uint32 masked_crc32c(length) | data | uint32 masked_crc32c(data)``.
The protobuf wire format is hand-coded for the subset that carries scalars: Event (wall_time 1,
step 2, file_version 3, summary 5), Summary.Value (tag 1, simple_value 2 for TF1, tensor 8 for TF2
``tf.summary.scalar``, metadata 9 -> plugin_data 1 -> plugin_name 1) and TensorProto (dtype 1,
tensor_shape 2, tensor_content 4, float/double/int/int64_val 5/6/7/10). Other fields of any wire
type are skipped; only single-element numeric tensors count as scalars.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from oddaemon.formats.tfrecord import FOOTER_SIZE, HEADER_SIZE, masked_crc32c, next_header

FILE_VERSION = "brain.Event:2"
FILE_PREFIX = "events.out.tfevents."
_READ_CHUNK = 4 << 20
_MASK64 = (1 << 64) - 1

# ------------------------------------------------------------------------------------ wire decoding


class DecodeError(ValueError):
    """The bytes are not a valid protobuf message."""


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _read_plain(buf: memoryview, pos: int, wire_type: int) -> tuple[object, int]:
    """The value of a non-group field: an int (varint) or a memoryview (fixed-size, length-delimited)."""
    if wire_type == 0:
        return _read_varint(buf, pos)
    if wire_type == 2:
        size, pos = _read_varint(buf, pos)
    elif wire_type in (1, 5):
        size = 8 if wire_type == 1 else 4
    else:
        raise DecodeError(f"unexpected wire type {wire_type}")
    if pos + size > len(buf):
        raise DecodeError("field runs past the end of its message")
    return buf[pos:pos + size], pos + size


def _skip_group(buf: memoryview, pos: int, field: int) -> int:
    """Position after the end-group key matching `field` (deprecated groups, possibly nested)."""
    open_groups = [field]
    while open_groups:
        key, pos = _read_varint(buf, pos)
        inner, wire_type = key >> 3, key & 7
        if wire_type == 3:
            open_groups.append(inner)
        elif wire_type == 4:
            if open_groups.pop() != inner:
                raise DecodeError("mismatched end-group")
        else:
            pos = _read_plain(buf, pos, wire_type)[1]
    return pos


def _fields(data) -> dict[tuple[int, int], list]:
    """Every field of a message by (field number, wire type), values in order; groups are skipped."""
    buf, pos, fields = memoryview(data), 0, {}
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise DecodeError("field number 0")
        if wire_type == 3:
            pos = _skip_group(buf, pos, field)
            continue
        value, pos = _read_plain(buf, pos, wire_type)
        fields.setdefault((field, wire_type), []).append(value)
    return fields


def _last(fields: dict, field: int, wire_type: int, default=None):
    values = fields.get((field, wire_type))
    return values[-1] if values else default


def _text(value: memoryview) -> str:
    return bytes(value).decode("utf-8", errors="replace")


# dtype enum -> (struct format of one element, repeated field holding values, wire type of one element)
_NUMERIC_DTYPES = {1: ("<f", 5, 5), 2: ("<d", 6, 1), 3: ("<i", 7, 0), 9: ("<q", 10, 0)}


def _unpack_packed(packed: memoryview, fmt: str, element_wire: int) -> list:
    if element_wire == 0:
        pos, values = 0, []
        while pos < len(packed):
            value, pos = _read_varint(packed, pos)
            values.append(_signed64(value))
        return values
    size = struct.calcsize(fmt)
    if len(packed) % size:
        raise DecodeError("packed field length is not a multiple of its element size")
    return list(struct.unpack(f"<{len(packed) // size}{fmt[1]}", packed))


def _element_count(shape: memoryview) -> int | None:
    fields = _fields(shape)
    if _last(fields, 3, 0):  # unknown_rank
        return None
    count = 1
    for dim in fields.get((2, 2), []):
        count *= _signed64(_last(_fields(dim), 1, 0, 0))
    return count


def _tensor_scalar(tensor: memoryview) -> float | None:
    """The value of a single-element numeric tensor; None for anything else."""
    fields = _fields(tensor)
    dtype = _last(fields, 1, 0, 0)
    if dtype not in _NUMERIC_DTYPES:
        return None
    fmt, values_field, element_wire = _NUMERIC_DTYPES[dtype]
    shape = _last(fields, 2, 2)
    if shape is not None and _element_count(shape) != 1:
        return None
    content = _last(fields, 4, 2, b"")
    if len(content):
        return float(struct.unpack(fmt, content)[0]) if len(content) == struct.calcsize(fmt) else None
    packed = _unpack_packed(_last(fields, values_field, 2, b""), fmt, element_wire)
    if packed:
        return float(packed[-1])
    single = _last(fields, values_field, element_wire)
    if single is None:
        return 0.0  # proto3: a tensor with no stored value is zero
    return float(_signed64(single) if element_wire == 0 else struct.unpack(fmt, single)[0])


def _summary_value(value: memoryview) -> tuple[str, float] | None:
    fields = _fields(value)
    tag = _text(_last(fields, 1, 2, b""))
    tensor = _last(fields, 8, 2)
    if tensor is None:
        simple = _last(fields, 2, 5)
        return None if simple is None else (tag, struct.unpack("<f", simple)[0])
    plugin_data = _last(_fields(_last(fields, 9, 2, b"")), 1, 2, b"")
    if _text(_last(_fields(plugin_data), 1, 2, b"")) not in ("", "scalars"):
        return None
    scalar = _tensor_scalar(tensor)
    return None if scalar is None else (tag, scalar)


@dataclass(frozen=True)
class ScalarEvent:
    step: int
    wall_time: float
    values: dict[str, float]


def decode_event(data: bytes) -> ScalarEvent | None:
    """The scalars of one serialized Event; None when it has none. Raises DecodeError on bad bytes."""
    fields = _fields(data)
    values = {}
    for summary in fields.get((5, 2), []):
        for item in _fields(summary).get((1, 2), []):
            scalar = _summary_value(item)
            if scalar is not None:
                values[scalar[0]] = scalar[1]
    if not values:
        return None
    wall_time = struct.unpack("<d", _last(fields, 1, 1, bytes(8)))[0]
    return ScalarEvent(_signed64(_last(fields, 2, 0, 0)), wall_time, values)


# -------------------------------------------------------------------------------------------- files


class CorruptRecord(ValueError):
    """A record of an event file that cannot be used (its text is the reader's ``last_error``)."""

    def __init__(self, path: str, offset: int, reason: str):
        self.path = path
        self.offset = offset
        self.reason = reason
        super().__init__(path, offset, reason)

    def __str__(self) -> str:
        return f"corrupt record in event file {self.path} at byte {self.offset}: {self.reason}"


class EventFileReader:
    """Reads one event file incrementally; a partial record at the end waits for a later call.

    A damaged record is skipped: one whose data CRC fails is stepped over by its length; after a
    header whose length CRC fails (a file truncated inside a header and written on past the cut,
    which leaves a hole of zeros), the reader looks for the next place where a whole record with
    valid CRCs starts and carries on from there, so later records are never lost."""

    def __init__(self, path: str):
        self.path = path
        self.offset = 0
        self.corrupt_records = 0
        self.last_error: str | None = None
        self._lost_sync = False  # between a bad header and the next valid record: self.offset is a scan position

    def read_new(self) -> list[ScalarEvent]:
        """Scalar events of the records completed since the last call. Never raises for bad content;
        an OSError (file gone) ends the call with what was read so far."""
        events: list[ScalarEvent] = []
        try:
            if os.stat(self.path).st_size <= self.offset and not self._lost_sync:
                return events  # nothing new: one stat, not an open (a directory can hold many finished files)
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return events
        try:
            self._read_records(fd, os.fstat(fd).st_size, events)
        except OSError:
            pass
        finally:
            os.close(fd)
        return events

    def _read_records(self, fd: int, size: int, events: list[ScalarEvent]) -> None:
        buf, base, pos = b"", self.offset, 0  # buf holds the file's bytes from `base` on
        while True:
            available, needed = len(buf) - pos, HEADER_SIZE
            if available >= HEADER_SIZE:
                length_bytes = buf[pos:pos + 8]
                if struct.unpack_from("<I", buf, pos + 8)[0] != masked_crc32c(length_bytes):
                    self._lose_sync(base + pos, "length CRC mismatch; looking for the next record")
                    pos = next_header(buf, pos + 1)
                    self.offset = base + pos
                    continue
                needed = HEADER_SIZE + struct.unpack("<Q", length_bytes)[0] + FOOTER_SIZE
            if available < needed:
                end = base + len(buf)
                want = min(size - end, max(needed - available, _READ_CHUNK))
                more = os.pread(fd, want, end) if want > 0 else b""
                if not more:
                    return  # partial record: read it again once it is complete
                buf, base, pos = buf[pos:] + more, base + pos, 0
                continue
            data_end = pos + needed - FOOTER_SIZE
            data_crc = struct.unpack_from("<I", buf, data_end)[0]
            data = memoryview(buf)[pos + HEADER_SIZE:data_end]
            if self._lost_sync and data_crc != masked_crc32c(data):
                pos = next_header(buf, pos + 1)  # a header-like pattern inside garbage: keep looking
                self.offset = base + pos
                continue
            self._lost_sync = False
            self._decode(data, data_crc, base + pos, events)
            pos += needed
            self.offset = base + pos

    def _lose_sync(self, offset: int, reason: str) -> None:
        if not self._lost_sync:  # one damaged stretch counts once, however many calls it takes to cross
            self._lost_sync = True
            self.corrupt_records += 1
            self.last_error = str(CorruptRecord(self.path, offset, reason))

    def _decode(self, data: memoryview, data_crc: int, offset: int, events: list[ScalarEvent]) -> None:
        try:
            if data_crc != masked_crc32c(data):
                raise DecodeError("data CRC mismatch")
            event = decode_event(data)
        except DecodeError as exc:
            self.corrupt_records += 1
            self.last_error = str(CorruptRecord(self.path, offset, f"{exc}; record skipped"))
            return
        if event is not None:
            events.append(event)


def _file_order(name: str) -> tuple[int, str]:
    base = os.path.basename(name)
    timestamp = base[len(FILE_PREFIX):].split(".", 1)[0]
    return (int(timestamp) if timestamp.isdigit() else 0, name)


class EventDirReader:
    """Follows every event file in a directory, including files created later; with ``subdirs``,
    those one level below too (the evaluator writes to ``eval/<eval_input_reader.name>``)."""

    def __init__(self, logdir: str, subdirs: bool = False):
        self.logdir = logdir
        self.subdirs = subdirs
        self._readers: dict[str, EventFileReader] = {}

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
                self._readers[name] = EventFileReader(os.path.join(self.logdir, name))
        events: list[ScalarEvent] = []
        for name in sorted(self._readers, key=_file_order):
            events += self._readers[name].read_new()
        return events

    @property
    def corrupt_records(self) -> int:
        return sum(reader.corrupt_records for reader in self._readers.values())

    @property
    def last_error(self) -> str | None:
        errors = [reader.last_error for reader in self._readers.values() if reader.last_error]
        return errors[-1] if errors else None
