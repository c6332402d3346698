"""TFRecord framing, the hand-written Event protobuf codec (images skipped undecoded) and the incremental readers."""

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oddaemon.formats import tfevents, tfrecord
from oddaemon.formats.tfevents import DecodeError, EventDirReader, EventFileReader, ScalarEvent, TagFilter, decode_event
from oddaemon.formats.tfevents_writer import (
    EventFileWriter,
    encode_file_version_event,
    encode_image_event,
    encode_scalar_event,
)
from oddaemon.formats.tfrecord import encode_record, masked_crc32c


def f32(value):
    return struct.unpack("<f", struct.pack("<f", value))[0]


# Hand-made protobuf pieces, independent of the module's encoder.
def varint(n):
    n &= (1 << 64) - 1
    out = b""
    while True:
        if n < 0x80:
            return out + bytes([n])
        out += bytes([n & 0x7F | 0x80])
        n >>= 7


def ld(field, payload):
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def event(step, *values, wall_time=1700000000.5):
    return (b"\x09" + struct.pack("<d", wall_time) + b"\x10" + varint(step)
            + ld(5, b"".join(ld(1, v) for v in values)))


def tensor_value(tag, tensor, plugin=b"scalars"):
    metadata = ld(9, ld(1, ld(1, plugin)))
    return ld(1, tag) + ld(8, tensor) + metadata


# ------------------------------------------------------------------------------------------ CRC32C

@pytest.mark.parametrize("data, crc", [
    (b"", 0),
    (b"123456789", 0xE3069283),
    (bytes(32), 0x8A9136AA),
    (b"\xff" * 32, 0x62A8AB43),
    (bytes(range(32)), 0x46DD794E),
])
def test_crc32c_known_vectors(data, crc):
    assert tfrecord.crc32c_pure(data) == crc
    assert tfrecord.crc32c(data) == crc


def test_masked_crc32c():
    assert masked_crc32c(b"") == 0xA282EAD8
    crc = 0xE3069283
    rotated = ((crc >> 15) | (crc << 17)) % 2**32
    assert masked_crc32c(b"123456789") == (rotated + 0xA282EAD8) % 2**32


@pytest.mark.skipif(not tfrecord.CRC32C_IN_C, reason="no optional crc32c module installed")
@given(st.binary(max_size=2000))
def test_fast_crc32c_agrees_with_pure(data):
    assert tfrecord.crc32c(data) == tfrecord.crc32c_bytes(data) == tfrecord.crc32c_pure(data)
    assert tfrecord.crc32c(memoryview(data)) == tfrecord.crc32c_pure(data)


def test_record_framing():
    record = encode_record(b"abc")
    assert record[:8] == struct.pack("<Q", 3)
    assert record[8:12] == struct.pack("<I", masked_crc32c(struct.pack("<Q", 3)))
    assert record[12:15] == b"abc"
    assert record[15:] == struct.pack("<I", masked_crc32c(b"abc"))


# ------------------------------------------------------------------------------------------- codec

@pytest.mark.parametrize("style", ["tensor", "simple"])
def test_scalar_event_round_trip(style):
    data = encode_scalar_event(42, {"Loss/total_loss": 1.25, "learning_rate": 0.1}, wall_time=12.5, style=style)
    assert decode_event(data) == ScalarEvent(42, 12.5, {"Loss/total_loss": 1.25, "learning_rate": f32(0.1)})


def test_file_version_event_has_no_scalars():
    data = encode_file_version_event(wall_time=3.0)
    assert b"brain.Event:2" in data
    assert decode_event(data) is None


def test_decode_bytes_as_tf2_writes_them():
    """tf.summary.scalar in TF2: DT_FLOAT tensor with an empty shape and 4 bytes of tensor_content."""
    tensor = b"\x08\x01" + b"\x12\x00" + b"\x22\x04" + struct.pack("<f", 0.75)
    metadata = ld(1, ld(1, b"scalars")) + b"\x20\x01"  # plugin_data + data_class DATA_CLASS_SCALAR
    value = ld(1, b"Loss/total_loss") + ld(8, tensor) + ld(9, metadata)
    data = b"\x09" + struct.pack("<d", 1700000000.25) + b"\x10\x64" + ld(5, ld(1, value))
    assert data[:1] == b"\x09" and data[9:11] == b"\x10\x64"
    assert decode_event(data) == ScalarEvent(100, 1700000000.25, {"Loss/total_loss": 0.75})
    assert encode_scalar_event(100, {"Loss/total_loss": 0.75}, wall_time=1700000000.25) == data
    record = encode_record(data)
    assert record == (struct.pack("<Q", len(data)) + struct.pack("<I", masked_crc32c(struct.pack("<Q", len(data))))
                      + data + struct.pack("<I", masked_crc32c(data)))


def test_decode_tf1_simple_value():
    value = ld(1, b"loss") + b"\x15" + struct.pack("<f", 2.5)
    assert decode_event(event(7, value)).values == {"loss": 2.5}


@pytest.mark.parametrize("tensor, expected", [
    (b"\x08\x01\x12\x00\x2a\x04" + struct.pack("<f", 1.5), 1.5),  # float_val, packed
    (b"\x08\x01\x12\x00\x2d" + struct.pack("<f", -1.5), -1.5),  # float_val, not packed
    (b"\x08\x02\x12\x00\x32\x08" + struct.pack("<d", 0.1), 0.1),  # double_val, packed
    (b"\x08\x02\x12\x00\x31" + struct.pack("<d", 0.2), 0.2),  # double_val, not packed
    (b"\x08\x02\x22\x08" + struct.pack("<d", 0.3), 0.3),  # double tensor_content, shape omitted
    (b"\x08\x03\x12\x00\x38" + varint(-5), -5.0),  # int_val, not packed (sign-extended)
    (b"\x08\x03\x12\x00\x3a" + ld(0, varint(9))[1:], 9.0),  # int_val, packed
    (b"\x08\x09\x12\x00\x50" + varint(1 << 40), float(1 << 40)),  # int64_val
    (b"\x08\x09\x22\x08" + struct.pack("<q", -7), -7.0),  # int64 tensor_content
    (b"\x08\x01\x12\x04\x12\x02\x08\x01\x2d" + struct.pack("<f", 4.0), 4.0),  # shape [1]
    (b"\x08\x01\x12\x00", 0.0),  # no stored value: zero
])
def test_decode_numeric_scalar_tensors(tensor, expected):
    assert decode_event(event(3, tensor_value(b"x", tensor))).values == {"x": expected}


@pytest.mark.parametrize("tensor, plugin", [
    (b"\x08\x07\x12\x04\x12\x02\x08\x03" + ld(8, b"png") * 3, b"images"),  # string tensor [3]
    (b"\x08\x02\x12\x08\x12\x02\x08\x02\x12\x02\x08\x03\x22\x30" + bytes(48), b"histograms"),  # [2,3]
    (b"\x08\x07\x12\x00" + ld(8, b"text"), b"text"),  # string scalar
    (b"\x08\x01\x12\x00\x22\x04" + struct.pack("<f", 1.0), b"other_plugin"),
    (b"\x08\x01\x12\x02\x18\x01\x22\x04" + struct.pack("<f", 1.0), b"scalars"),  # unknown rank
])
def test_non_scalar_tensors_are_ignored(tensor, plugin):
    assert decode_event(event(3, tensor_value(b"img", tensor, plugin))) is None


def test_unknown_fields_of_every_wire_type_are_skipped():
    unknown = (b"\xb8\x06" + varint(123456)  # field 103 varint
               + b"\xb9\x06" + bytes(8)  # field 103 fixed64
               + ld(104, b"graph bytes")  # length-delimited
               + b"\xcd\x06" + bytes(4)  # field 105 fixed32
               + b"\xd3\x06" + b"\x08\x01" + b"\xdb\x06\xdc\x06" + b"\xd4\x06")  # nested groups 106/107
    value = ld(1, b"loss") + unknown + b"\x15" + struct.pack("<f", 2.0)
    data = unknown + event(9, unknown + value) + unknown
    assert decode_event(data).values == {"loss": 2.0}
    assert decode_event(data).step == 9


@pytest.mark.parametrize("data", [b"\x08", b"\x0a\x05ab", b"\x0f", b"\x00", b"\x0b\x08\x01", b"\x0b\x14", b"\xff" * 11,
                                  b"\x09" + bytes(8) + b"\x10" + b"\xff" * 12, b"\x09" + bytes(8) + b"\x10\xff\xff\xff\xff"])
def test_malformed_messages_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_event(data)


scalar_dicts = st.dictionaries(st.text(max_size=20), st.floats(width=32, allow_nan=False), min_size=1, max_size=8)


@given(step=st.integers(-2**63, 2**63 - 1), scalars=scalar_dicts, style=st.sampled_from(["tensor", "simple"]),
       wall_time=st.floats(allow_nan=False, allow_infinity=False))
def test_random_scalars_round_trip(step, scalars, style, wall_time):
    assert decode_event(encode_scalar_event(step, scalars, wall_time, style)) == ScalarEvent(step, wall_time, scalars)


@given(st.binary(max_size=300))
def test_garbage_never_raises_anything_but_decode_error(data):
    try:
        result = decode_event(data)
    except DecodeError:
        return
    assert result is None or isinstance(result, ScalarEvent)


# ----------------------------------------------------------------------------------------- readers

def records(*steps):
    return b"".join(encode_record(encode_scalar_event(s, {"loss": float(s)}, wall_time=1.0)) for s in steps)


def test_writer_and_reader(tmp_path):
    writer = EventFileWriter(str(tmp_path))
    name = os.path.basename(writer.path)
    assert name.startswith("events.out.tfevents.") and name.endswith(f".{os.getpid()}.{name.split('.')[-2]}.v2")
    writer.add_scalars(1, {"a": 1.0}, wall_time=5.0)
    reader = EventFileReader(writer.path)
    assert reader.read_new() == [ScalarEvent(1, 5.0, {"a": 1.0})]
    writer.add_scalars(2, {"a": 2.0}, wall_time=6.0)
    writer.close()
    assert reader.read_new() == [ScalarEvent(2, 6.0, {"a": 2.0})]
    assert reader.read_new() == []
    assert reader.offset == os.path.getsize(writer.path)
    assert EventFileWriter(str(tmp_path)).path != writer.path


@pytest.mark.parametrize("cut", [0, 5, 12, 13, 20, -4, -1])
def test_partial_record_is_read_once_complete(tmp_path, cut):
    path = tmp_path / "events.out.tfevents.1.host"
    first, second = records(1), records(2)
    split = cut % len(second)
    path.write_bytes(first + second[:split])
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1]
    assert reader.offset == len(first)
    assert reader.read_new() == []
    with open(path, "ab") as f:
        f.write(second[split:])
    assert [e.step for e in reader.read_new()] == [2]
    assert reader.corrupt_records == 0 and reader.last_error is None


def test_file_truncated_mid_record_then_completed(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    data = records(1, 2, 3)
    path.write_bytes(data[:len(data) - 7])
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 2]
    path.write_bytes(data)
    assert [e.step for e in reader.read_new()] == [3]


def test_corrupt_data_crc_is_skipped_and_counted(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    data = bytearray(records(1, 2, 3))
    data[len(records(1)) + 14] ^= 0xFF  # inside record 2's data
    path.write_bytes(bytes(data))
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 3]
    assert reader.corrupt_records == 1
    assert str(path) in reader.last_error and f"byte {len(records(1))}" in reader.last_error
    assert reader.offset == len(data)


def test_record_with_valid_crcs_but_bad_protobuf_is_counted(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(records(1) + encode_record(b"\xff\xff") + records(2))
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 2]
    assert reader.corrupt_records == 1


def test_a_corrupt_length_crc_is_skipped_and_reading_resyncs_on_the_next_record(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    data = bytearray(records(1, 2, 3))
    data[len(records(1)) + 9] ^= 0xFF  # record 2's length CRC
    path.write_bytes(bytes(data))
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 3]
    assert reader.offset == len(data) and reader.corrupt_records == 1
    assert "length CRC" in reader.last_error
    assert reader.read_new() == []


def test_a_file_cut_inside_a_header_and_written_past_the_cut_loses_only_the_cut_records(tmp_path):
    """A truncation inside a header that the writer does not notice leaves a hole of zeros, then
    whole records again: the reader steps over the hole and reads on."""
    path = tmp_path / "events.out.tfevents.1.host"
    first, second = records(1, 2), records(3, 4)
    cut = len(records(1)) + 5  # inside record 2's header
    path.write_bytes(first[:cut])
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1]
    path.write_bytes(first[:cut] + bytes(len(first) - cut) + second)  # the hole, then the writer's next records
    assert [e.step for e in reader.read_new()] == [3, 4]
    assert reader.corrupt_records == 1 and reader.offset == len(first) + len(second)


def test_vanished_file_keeps_state(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(records(1))
    reader = EventFileReader(str(path))
    assert len(reader.read_new()) == 1
    path.unlink()
    assert reader.read_new() == [] and reader.offset == len(records(1))


def test_large_file_read_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(tfevents, "_READ_CHUNK", 100)
    path = tmp_path / "events.out.tfevents.1.host"
    big = encode_record(encode_scalar_event(0, {"big": 1.0}) + ld(99, bytes(1000)))
    path.write_bytes(records(*range(1, 40)) + big + records(40))
    assert [e.step for e in EventFileReader(str(path)).read_new()] == [*range(1, 40), 0, 40]


def test_dir_reader_follows_files_created_later(tmp_path):
    (tmp_path / "events.out.tfevents.1600000002.host.1.0.v2").write_bytes(records(3))
    (tmp_path / "events.out.tfevents.1600000001.host.1.0.v2").write_bytes(records(1, 2))
    (tmp_path / "unrelated.txt").write_bytes(b"x")
    reader = EventDirReader(str(tmp_path))
    assert [e.step for e in reader.read_new()] == [1, 2, 3]
    assert reader.read_new() == []
    (tmp_path / "events.out.tfevents.1600000009.host.2.0.v2").write_bytes(records(4))
    with open(tmp_path / "events.out.tfevents.1600000002.host.1.0.v2", "ab") as f:
        f.write(records(5))
    assert [e.step for e in reader.read_new()] == [5, 4]
    assert reader.corrupt_records == 0


def test_dir_reader_on_missing_dir(tmp_path):
    reader = EventDirReader(str(tmp_path / "train"))
    assert reader.read_new() == []
    writer = EventFileWriter(str(tmp_path / "train"))
    writer.add_scalars(1, {"a": 1.0})
    writer.close()
    assert [e.values for e in reader.read_new()] == [{"a": 1.0}]


@settings(max_examples=50)
@given(garbage=st.binary(max_size=400), framed=st.lists(st.binary(max_size=40), max_size=5))
def test_reader_never_raises_on_garbage(tmp_path_factory, garbage, framed):
    path = tmp_path_factory.mktemp("g") / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(encode_record(f) for f in framed) + garbage)
    reader = EventFileReader(str(path))
    events = reader.read_new() + reader.read_new()
    assert all(isinstance(e, ScalarEvent) for e in events)
    assert 0 <= reader.offset <= len(path.read_bytes())


# ------------------------------------------------------------------------ images, skipped undecoded

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8  # stands for an encoded image (its bytes are never parsed)


def image_records(step, style="tensor", tag="train_input_images"):
    return encode_record(encode_image_event(step, tag, [PNG, PNG[::-1], PNG], 64, 64, wall_time=2.0, style=style))


def test_image_summaries_are_skipped_and_every_scalar_is_returned(tmp_path, monkeypatch):
    monkeypatch.setattr(tfevents, "_READ_CHUNK", 3000)  # image records straddle the blocks
    path = tmp_path / "events.out.tfevents.1.host"
    mixed = encode_record(event(7, tensor_value(b"img", b"\x08\x07\x12\x04\x12\x02\x08\x03" + ld(8, PNG) * 3,
                                                b"images"), ld(1, b"loss") + b"\x15" + struct.pack("<f", 7.0)))
    path.write_bytes(encode_record(encode_file_version_event(1.0)) + b"".join(
        image_records(s, style) + records(s) for s in range(1, 6) for style in ("tensor", "simple")) + mixed)
    reader = EventFileReader(str(path))
    events = reader.read_new()
    assert [(e.step, e.values) for e in events] == [(s, {"loss": float(s)}) for s in range(1, 6) for _ in "ts"] + [
        (7, {"loss": 7.0})]
    assert reader.corrupt_records == 0 and reader.offset == path.stat().st_size


def test_an_image_tensor_is_never_parsed():
    """A Value with plugin "images" is dropped on its metadata: its tensor's bytes (garbage here) are not read."""
    data = event(3, tensor_value(b"img", b"\xff" * 40, b"images"))
    assert decode_event(data) is None
    with pytest.raises(DecodeError):
        decode_event(event(3, tensor_value(b"x", b"\xff" * 40, b"scalars")))


def test_a_damaged_image_record_is_skipped_unread_and_a_damaged_scalar_one_is_counted(tmp_path):
    """What the module docstring says: a record that yields nothing wanted is stepped over by its
    length, its data CRC not computed (nothing of it is used); one with a scalar is checked, skipped, counted."""
    path = tmp_path / "events.out.tfevents.1.host"
    image, scalar = bytearray(image_records(1)), bytearray(records(2))
    image[len(image) // 2] ^= 0xFF  # inside a PNG
    scalar[14] ^= 0xFF  # inside the wall time
    path.write_bytes(bytes(image) + records(1) + bytes(scalar) + records(3))
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 3]
    assert reader.corrupt_records == 1 and "data CRC mismatch" in reader.last_error


def test_the_tags_a_reader_wants_are_the_only_ones_decoded(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(b"".join(encode_record(encode_scalar_event(s, {"Loss/total_loss": 1.0, "other": 2.0},
                                                                wall_time=1.0)) for s in (1, 2))
                     + encode_record(encode_scalar_event(3, {"other": 3.0}, wall_time=1.0)))
    reader = EventFileReader(str(path), TagFilter(lambda tag: tag.startswith("Loss/")))
    assert [(e.step, e.values) for e in reader.read_new()] == [(1, {"Loss/total_loss": 1.0}),
                                                              (2, {"Loss/total_loss": 1.0})]


@settings(max_examples=40)
@given(st.lists(st.tuples(st.sampled_from(["scalar", "tensor", "simple"]), st.integers(0, 2**40)), max_size=12))
def test_any_mix_of_images_and_scalars_gives_back_exactly_the_scalars(tmp_path_factory, items):
    path = tmp_path_factory.mktemp("mix") / "events.out.tfevents.1.host"
    data = b"".join(records(step) if kind == "scalar" else image_records(step, kind) for kind, step in items)
    path.write_bytes(data)
    assert [e.step for e in EventFileReader(str(path)).read_new()] == [s for kind, s in items if kind == "scalar"]


def test_a_live_reader_starts_again_when_its_file_is_replaced_or_cut_short(tmp_path):
    path = tmp_path / "events.out.tfevents.1.host"
    path.write_bytes(records(1, 2))
    reader = EventFileReader(str(path))
    assert [e.step for e in reader.read_new()] == [1, 2]
    replacement = tmp_path / "new"
    replacement.write_bytes(records(5, 6, 7))
    os.replace(replacement, path)  # a new inode under the name, longer than what was read
    assert [e.step for e in reader.read_new()] == [5, 6, 7]
    path.write_bytes(records(8))  # the same inode, shorter than what was read
    assert [e.step for e in reader.read_new()] == [8]
    assert reader.corrupt_records == 0


@pytest.mark.parametrize("style", ["tensor", "simple"])
def test_events_laid_out_like_an_earlier_one_read_alike_whatever_their_step_and_value(style):
    """The reader matches an event against the bytes of one walked before (the template path): the
    result is what a walk of its own gives, for every step size, sign and value, and tags of one length."""
    steps = [0, 1, 127, 128, 2**14 - 1, 2**14, 2**21 - 1, 2**21, 2**35, -1, -(2**40)]
    values = [0.5, -2.0, float("inf"), 1e-30]
    events = [encode_scalar_event(step, {tag: value}, wall_time=step * 0.5, style=style)
              for step in steps for value in values for tag in ("Loss/aa", "Loss/bb")]
    reused = TagFilter()
    for data in events + events:
        assert decode_event(data, reused) == decode_event(data, TagFilter())
    assert sum(len(shapes) for shapes in reused.templates.values()) >= 2
    nan = decode_event(encode_scalar_event(5, {"Loss/aa": float("nan")}, style=style), reused)
    assert nan.step == 5 and nan.values["Loss/aa"] != nan.values["Loss/aa"]
