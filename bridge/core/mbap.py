"""Modbus TCP (MBAP) framing. Pure, no I/O: bytes in, frames out.

``decode`` never raises for short input (it asks for more); it raises
``ProtocolError`` for a header that cannot be a Modbus TCP frame, after which
the connection must be closed: there is no way to resynchronise a TCP stream.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from bridge.core.errors import ProtocolError

HEADER = 7  # transaction id, protocol id, length, unit id
MAX_PDU = 253
_HEADER = struct.Struct(">HHHB")


@dataclass(frozen=True)
class Frame:
    tid: int
    unit: int
    pdu: bytes


def decode(buf: bytes | bytearray | memoryview) -> tuple[int, Frame | None]:
    """Return (bytes consumed, frame) or (0, None) when more bytes are needed."""
    if len(buf) < HEADER:
        return 0, None
    tid, proto, length, unit = _HEADER.unpack_from(buf)
    if proto != 0:
        raise ProtocolError(f"protocol id {proto} is not Modbus (0)")
    if not 2 <= length <= MAX_PDU + 1:
        raise ProtocolError(f"MBAP length {length} outside 2..{MAX_PDU + 1}")
    total = 6 + length
    if len(buf) < total:
        return 0, None
    return total, Frame(tid, unit, bytes(buf[HEADER:total]))


def encode(tid: int, unit: int, pdu: bytes) -> bytes:
    return _HEADER.pack(tid, 0, len(pdu) + 1, unit) + pdu
