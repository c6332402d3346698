"""The ``tensorflow.Event`` protobuf decoded lazily, without tensorflow: only the scalars are taken.

The wire format is walked field by field over the record's bytes (a ``bytes`` object and a
``[start, end)`` range, no copies): Event (wall_time 1, step 2, summary 5), Summary (value 1),
Summary.Value (tag 1, simple_value 2 for TF1, tensor 8 for TF2 ``tf.summary.scalar``, metadata 9 ->
plugin_data 1 -> plugin_name 1) and TensorProto (dtype 1, tensor_shape 2, tensor_content 4,
float/double/int/int64_val 5/6/7/10). Every other length-delimited field (an image's PNG bytes,
a histogram, a graph, an image tensor's strings) is stepped over by its length without being
decoded, and so is a value whose tag the caller does not want (a ``TagFilter``) or whose plugin is
not ``scalars``: a Value is looked at in the order tag, plugin, tensor, so an image tensor's content
is never parsed. Only single-element numeric tensors count as scalars. TF2's usual scalar tensor
(DT_FLOAT, empty shape, four bytes of ``tensor_content``) is recognised from its bytes at once.

Malformed bytes raise ``DecodeError`` (never anything else); a skipped payload is not validated.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

_MASK64 = (1 << 64) - 1
_F64 = struct.Struct("<d").unpack_from
_F32 = struct.Struct("<f").unpack_from
_TF2_SCALAR = b"\x08\x01\x12\x00\x22\x04"  # DT_FLOAT, tensor_shape {}, tensor_content of 4 bytes
_CACHE_LIMIT = 4096


class DecodeError(ValueError):
    """The bytes are not a valid protobuf message."""


@dataclass(slots=True)  # (not frozen: a frozen dataclass's __init__ costs three times as much, per event)
class ScalarEvent:
    """The wanted scalars of one Event (treat it as immutable)."""

    step: int
    wall_time: float
    values: dict[str, float]


# ---------------------------------------------------------------------------------------- the walk


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end:
            raise DecodeError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise DecodeError("varint longer than 10 bytes")


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _delimited(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """[start, stop) of a length-delimited field's payload whose length varint is at ``pos``."""
    if pos < end and buf[pos] < 0x80:
        size, pos = buf[pos], pos + 1
    else:
        size, pos = _varint(buf, pos, end)
    stop = pos + size
    if stop > end:
        raise DecodeError("field runs past the end of its message")
    return pos, stop


def _skip(buf: bytes, pos: int, end: int, key: int) -> int:
    """The position after the value of the field whose key was just read (groups included)."""
    if key >> 3 == 0:
        raise DecodeError("field number 0")
    wire_type = key & 7
    if wire_type == 2:
        return _delimited(buf, pos, end)[1]
    if wire_type == 0:
        return _varint(buf, pos, end)[1]
    if wire_type in (1, 5):
        pos += 8 if wire_type == 1 else 4
        if pos > end:
            raise DecodeError("field runs past the end of its message")
        return pos
    if wire_type == 3:  # a deprecated group, possibly nested: up to its matching end-group key
        open_groups = [key >> 3]
        while open_groups:
            key, pos = _varint(buf, pos, end)
            if key & 7 == 3:
                open_groups.append(key >> 3)
            elif key & 7 == 4:
                if open_groups.pop() != key >> 3:
                    raise DecodeError("mismatched end-group")
            else:
                pos = _skip(buf, pos, end, key)
        return pos
    raise DecodeError(f"unexpected wire type {wire_type}")


class TagFilter:
    """Which Summary.Value tags a reader takes (``wanted(tag)``; None takes all), remembered by
    their bytes so that a tag is decoded and judged once; and the byte layouts of the one-scalar
    events already walked (``templates``), which the same tag's next events match at once."""

    def __init__(self, wanted: Callable[[str], bool] | None = None):
        self.wanted = wanted
        self.names: dict[bytes, str | None] = {}
        # event length << 8 | bytes before the summary -> [(bytes up to the float, its offset, bytes after it, tag)]
        self.templates: dict[int, list[tuple[bytes, int, bytes, str]]] = {}

    def name(self, raw: bytes) -> str | None:
        name = raw.decode("utf-8", errors="replace")
        if self.wanted is not None and not self.wanted(name):
            name = None
        if len(self.names) < _CACHE_LIMIT:
            self.names[raw] = name
        return name


_ALL_TAGS = TagFilter()
_UNSEEN = object()
_SCALAR_METADATA: dict[bytes, bool] = {}  # SummaryMetadata bytes -> its plugin is "" or "scalars"


def _is_scalar_metadata(raw: bytes) -> bool:
    known = _SCALAR_METADATA.get(raw)
    if known is None:
        plugin_data = _last(_fields(raw), 1, 2, b"")
        known = bytes(_last(_fields(plugin_data), 1, 2, b"")) in (b"", b"scalars")
        if len(_SCALAR_METADATA) < _CACHE_LIMIT:
            _SCALAR_METADATA[raw] = known
    return known


def _value(buf: bytes, pos: int, end: int, tags: TagFilter) -> tuple[str, float, int] | None:
    """(tag, value, where its float32 is in ``buf`` or -1) of one Summary.Value when it is a wanted scalar."""
    tag, simple, tensor, metadata = b"", -1, None, None
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        if key == 0x0A:
            start, pos = _delimited(buf, pos, end)
            tag = buf[start:pos]
        elif key == 0x42:
            tensor = _delimited(buf, pos, end)
            pos = tensor[1]
        elif key == 0x4A:
            metadata = _delimited(buf, pos, end)
            pos = metadata[1]
        elif key == 0x15:
            simple, pos = pos, pos + 4
            if pos > end:
                raise DecodeError("field runs past the end of its message")
        else:  # image 4, histo 5, audio 6, node_name 7, ...: stepped over by their length
            pos = _skip(buf, pos, end, key)
    name = tags.names.get(tag, _UNSEEN)
    if name is _UNSEEN:
        name = tags.name(tag)
    if name is None:
        return None
    if tensor is None:
        return None if simple < 0 else (name, _F32(buf, simple)[0], simple)
    if metadata is not None and not _is_scalar_metadata(buf[metadata[0]:metadata[1]]):
        return None  # images, histograms, text, ...: their tensor is never parsed
    start, stop = tensor
    if stop - start == 10 and buf.startswith(_TF2_SCALAR, start):
        return name, _F32(buf, start + 6)[0], start + 6
    scalar = _tensor_scalar(memoryview(buf)[start:stop])
    return None if scalar is None else (name, scalar, -1)


def _summary(buf: bytes, pos: int, end: int, tags: TagFilter, found: list) -> None:
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        if key == 0x0A:
            start, pos = _delimited(buf, pos, end)
            scalar = _value(buf, start, pos, tags)
            if scalar is not None:
                found.append(scalar)
        else:
            pos = _skip(buf, pos, end, key)


def scan_event(buf: bytes, pos: int, end: int, tags: TagFilter = _ALL_TAGS) -> ScalarEvent | None:
    """The wanted scalars of the serialized Event in ``buf[pos:end]``; None when it has none.

    An event laid out like one walked before (``wall_time, step, summary`` with one wanted scalar
    whose float32 is stored as is) differs from it only in the wall time, the step and the float: it
    is matched against that layout's bytes and read at once."""
    rest = -1  # where the summary begins when the event starts ``wall_time, step`` as TF writes it
    if end - pos >= 13 and buf[pos] == 0x09:  # (the hot path: the step's varint inline below 2**21)
        low, middle, high = buf[pos + 10], buf[pos + 11], buf[pos + 12]
        if buf[pos + 9] != 0x10:
            step, rest = 0, pos + 9  # a zero step is omitted
        elif low < 0x80:
            step, rest = low, pos + 11
        elif middle < 0x80:
            step, rest = low & 0x7F | middle << 7, pos + 12
        elif high < 0x80:
            step, rest = low & 0x7F | (middle & 0x7F) << 7 | high << 14, pos + 13
        else:
            try:
                step, rest = _varint(buf, pos + 10, end)
                step = _signed64(step)
            except DecodeError:
                rest = -1  # the walk below says what is wrong
    if rest >= 0:
        shapes = tags.templates.get((end - pos) << 8 | (rest - pos))
        if shapes is not None:
            for before, offset, after, name in shapes:
                if buf.startswith(before, rest) and buf.startswith(after, rest + offset + 4):
                    return ScalarEvent(step, _F64(buf, pos + 1)[0], {name: _F32(buf, rest + offset)[0]})
    wall_time, step, found, start = 0.0, 0, [], pos
    summaries = 0  # (start, stop) of the only summary field, or 0
    while pos < end:
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        if key == 0x09:
            if pos + 8 > end:
                raise DecodeError("field runs past the end of its message")
            wall_time = _F64(buf, pos)[0]
            pos += 8
        elif key == 0x10:
            step, pos = _varint(buf, pos, end)
        elif key == 0x2A:
            key_at = pos - 1
            summary_start, pos = _delimited(buf, pos, end)
            summaries = (key_at, pos) if summaries == 0 else None
            _summary(buf, summary_start, pos, tags, found)
        else:  # file_version 3, graph_def 4, log_message 6, ...: stepped over
            pos = _skip(buf, pos, end, key)
            summaries = None
    if not found:
        return None
    if len(found) == 1 and found[0][2] >= 0 and rest >= 0 and summaries == (rest, end):
        _remember(tags, buf, start, end, rest, found[0])
    return ScalarEvent(_signed64(step), wall_time, {name: value for name, value, _ in found})


def _remember(tags: TagFilter, buf: bytes, start: int, end: int, rest: int, scalar: tuple[str, float, int]) -> None:
    """The layout of an event that is ``wall_time, step`` then one summary running to its end, with
    one wanted scalar stored as a float32 at a known place: nothing else in it depends on those."""
    name, _, at = scalar
    shapes = tags.templates.setdefault((end - start) << 8 | (rest - start), [])
    if len(shapes) < 8 and len(tags.templates) < _CACHE_LIMIT:
        shapes.append((buf[rest:at], at - rest, buf[at + 4:end], name))


def decode_event(data: bytes, tags: TagFilter = _ALL_TAGS) -> ScalarEvent | None:
    """The scalars of one serialized Event; None when it has none. Raises DecodeError on bad bytes."""
    data = bytes(data)
    return scan_event(data, 0, len(data), tags)


# ------------------------------------------------------------------- tensors (the rare, general path)


def _fields(data) -> dict[tuple[int, int], list]:
    """Every field of a small message by (field number, wire type), values in order: an int
    (varint) or a memoryview (fixed-size, length-delimited); groups are skipped."""
    buf = bytes(data)
    view, pos, end, fields = memoryview(buf), 0, len(buf), {}
    while pos < end:
        key, pos = _varint(buf, pos, end)
        wire_type = key & 7
        if wire_type == 0:
            value, pos = _varint(buf, pos, end)
        elif wire_type in (1, 2, 5):
            if wire_type == 2:
                start, stop = _delimited(buf, pos, end)
            else:
                start, stop = pos, _skip(buf, pos, end, key)
            value, pos = view[start:stop], stop
        else:
            pos = _skip(buf, pos, end, key)
            continue
        if key >> 3 == 0:
            raise DecodeError("field number 0")
        fields.setdefault((key >> 3, wire_type), []).append(value)
    return fields


def _last(fields: dict, field: int, wire_type: int, default=None):
    values = fields.get((field, wire_type))
    return values[-1] if values else default


# dtype enum -> (struct format of one element, repeated field holding values, wire type of one element)
_NUMERIC_DTYPES = {1: ("<f", 5, 5), 2: ("<d", 6, 1), 3: ("<i", 7, 0), 9: ("<q", 10, 0)}


def _unpack_packed(packed: memoryview, fmt: str, element_wire: int) -> list:
    if element_wire == 0:
        raw, pos, values = bytes(packed), 0, []
        while pos < len(raw):
            value, pos = _varint(raw, pos, len(raw))
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
