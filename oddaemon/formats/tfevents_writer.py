"""TensorFlow event files written without TensorFlow (the Event/Summary protobuf encoder and an
append-only file writer): what the stand-in worker and the tests write for the daemon's reader
(``tfevents``) to read. The daemon itself only reads event files."""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from oddaemon.formats.tfevents import FILE_PREFIX, FILE_VERSION
from oddaemon.formats.tfrecord import encode_record

_MASK64 = (1 << 64) - 1

# ------------------------------------------------------------------------------------ wire encoding


def _varint(value: int) -> bytes:
    value &= _MASK64  # negative int64 -> ten-byte two's complement, like protobuf
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _submessage(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def _event(wall_time: float | None, step: int, body: bytes) -> bytes:
    wall_time = time.time() if wall_time is None else wall_time
    step_field = _key(2, 0) + _varint(step) if step else b""  # proto3 omits zero
    return _key(1, 1) + struct.pack("<d", wall_time) + step_field + body


def encode_file_version_event(wall_time: float | None = None) -> bytes:
    return _event(wall_time, 0, _submessage(3, FILE_VERSION.encode()))


_SCALAR_METADATA = _submessage(9, _submessage(1, _submessage(1, b"scalars")) + _key(4, 0) + _varint(1))


def _scalar_value(tag: str, value: float, style: str) -> bytes:
    tag_field = _submessage(1, tag.encode())
    if style == "simple":
        return tag_field + _key(2, 5) + struct.pack("<f", value)
    if style == "tensor":  # what TF2's summary writer emits: DT_FLOAT, shape {}, tensor_content
        tensor = _key(1, 0) + _varint(1) + _submessage(2, b"") + _submessage(4, struct.pack("<f", value))
        return tag_field + _submessage(8, tensor) + _SCALAR_METADATA
    raise ValueError(f"unknown scalar style {style!r} (expected 'tensor' or 'simple')")


def encode_scalar_event(step: int, scalars: dict[str, float], wall_time: float | None = None,
                        style: str = "tensor") -> bytes:
    """A serialized Event holding one Summary.Value per scalar (values are stored as float32)."""
    summary = b"".join(_submessage(1, _scalar_value(tag, value, style)) for tag, value in scalars.items())
    return _event(wall_time, step, _submessage(5, summary))


_IMAGE_METADATA = _submessage(9, _submessage(1, _submessage(1, b"images")) + _key(4, 0) + _varint(3))


def encode_image_event(step: int, tag: str, images: list[bytes], width: int, height: int,
                       wall_time: float | None = None, style: str = "tensor") -> bytes:
    """A serialized Event holding image summaries of already encoded images (PNG bytes, say).
    ``tensor``: what TF2's ``tf.summary.image`` writes, one Value whose DT_STRING tensor of shape
    [2 + n] holds the width, the height and the images, with plugin "images"; ``simple``: TF1's
    Summary.Image, one Value per image (height 1, width 2, colorspace 3, encoded_image_string 4)."""
    if style == "tensor":
        strings = [str(width).encode(), str(height).encode(), *images]
        shape = _submessage(2, _submessage(2, _key(1, 0) + _varint(len(strings))))
        tensor = _key(1, 0) + _varint(7) + shape + b"".join(_submessage(8, item) for item in strings)
        values = [_submessage(1, tag.encode()) + _submessage(8, tensor) + _IMAGE_METADATA]
    elif style == "simple":
        values = [_submessage(1, f"{tag}/image/{i}".encode())
                  + _submessage(4, _key(1, 0) + _varint(height) + _key(2, 0) + _varint(width)
                                + _key(3, 0) + _varint(3) + _submessage(4, image))
                  for i, image in enumerate(images)]
    else:
        raise ValueError(f"unknown image style {style!r} (expected 'tensor' or 'simple')")
    return _event(wall_time, step, _submessage(5, b"".join(_submessage(1, value) for value in values)))


# -------------------------------------------------------------------------------------------- files

_file_counter = itertools.count()


class EventFileWriter:
    """Append-only event file named like TF's: events.out.tfevents.<time>.<host>.<pid>.<n><suffix>."""

    def __init__(self, logdir: str, suffix: str = ".v2"):
        os.makedirs(logdir, exist_ok=True)
        while True:
            name = (f"{FILE_PREFIX}{int(time.time()):010d}.{socket.gethostname()}"
                    f".{os.getpid()}.{next(_file_counter)}{suffix}")
            self.path = os.path.join(logdir, name)
            try:
                self._file = open(self.path, "xb")
                break
            except FileExistsError:
                continue
        self._write(encode_file_version_event())

    def _write(self, event: bytes) -> None:
        self._file.write(encode_record(event))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None = None) -> None:
        self._write(encode_scalar_event(step, scalars, wall_time))

    def add_images(self, step: int, tag: str, images: list[bytes], width: int, height: int,
                   wall_time: float | None = None, style: str = "tensor") -> None:
        self._write(encode_image_event(step, tag, images, width, height, wall_time, style))

    def close(self) -> None:
        self._file.close()
