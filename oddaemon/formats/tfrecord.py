"""TFRecord framing: ``uint64 length (LE) | uint32 masked_crc32c(length) | data | uint32
masked_crc32c(data)``, the CRC32C it uses (a C implementation when an optional package has one:
``google-crc32c`` of requirements-daemon.txt, or ``crc32c``; else pure Python, about 14 MB/s), and
finding the next record after a damaged stretch."""

from __future__ import annotations

import re
import struct

HEADER_SIZE = 12  # uint64 length + uint32 masked crc of the length
FOOTER_SIZE = 4  # uint32 masked crc of the data
_MASK32 = 0xFFFFFFFF
_NONZERO = re.compile(rb"[^\x00]")

# --------------------------------------------------------------------------------------------- CRC32C


def _crc_table_entry(crc: int) -> int:
    for _ in range(8):
        crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc


_CRC_TABLE = tuple(_crc_table_entry(byte) for byte in range(256))


def crc32c_pure(data: bytes) -> int:
    """CRC32C (Castagnoli), table-driven, pure Python."""
    crc = _MASK32
    table = _CRC_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ _MASK32


def _fast_crc32c():
    """A C implementation of CRC32C over ``bytes`` from an optional package, or None."""
    try:
        import google_crc32c  # noqa: PLC0415 - optional (requirements-daemon.txt has it)

        if getattr(google_crc32c, "implementation", "c") == "c":
            return google_crc32c.value
    except ImportError:
        pass
    try:
        import crc32c as crc32c_module  # noqa: PLC0415 - optional, and absent on most hosts
    except ImportError:
        return None
    return crc32c_module.crc32c


crc32c_bytes = _fast_crc32c() or crc32c_pure  # takes exactly ``bytes`` (the C modules refuse a memoryview)
CRC32C_IN_C = crc32c_bytes is not crc32c_pure


def crc32c(data) -> int:
    """CRC32C of any bytes-like object."""
    return crc32c_bytes(data if type(data) is bytes else bytes(data))


def mask(crc: int) -> int:
    """TFRecord's masking of a CRC: rotated right by 15 bits, plus a constant."""
    return ((((crc >> 15) | (crc << 17)) & _MASK32) + 0xA282EAD8) & _MASK32


def masked_crc32c(data) -> int:
    return mask(crc32c(data))


def encode_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length))
            + data + struct.pack("<I", masked_crc32c(data)))


_ZERO_HEADER = bytes(HEADER_SIZE)


def next_header(buf: bytes, start: int) -> int:
    """The first position at or after ``start`` where a record header with a valid length CRC
    begins; when there is none in ``buf``, the first position whose header is not wholly in ``buf``
    yet (so the search resumes there once more bytes arrive). Runs of zeros (a hole left by a
    truncation) are stepped over in one go: no valid header is twelve zero bytes."""
    pos, last = start, len(buf) - HEADER_SIZE
    while pos <= last:
        if buf[pos] == 0 and buf.startswith(_ZERO_HEADER, pos):
            match = _NONZERO.search(buf, pos)
            pos = max(pos + 1, (match.start() if match else len(buf)) - HEADER_SIZE + 1)
            continue
        if struct.unpack_from("<I", buf, pos + 8)[0] == masked_crc32c(buf[pos:pos + 8]):
            return pos
        pos += 1
    return max(start, last + 1)
