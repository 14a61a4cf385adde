"""Registers <-> values: Modbus data types and word orders. Pure, no I/O.

A Modbus register is a 16-bit word sent high byte first. Values wider than one
register span consecutive registers; ``word_order`` says whether the most
significant word comes first (``big``, ABCD) or last (``little``, CDAB).
"""
from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Sequence


class Function(enum.IntEnum):
    """The register tables a meter exposes, by their read function code."""

    HOLDING = 3
    INPUT = 4

    @classmethod
    def parse(cls, text: str) -> "Function":
        return {"holding": cls.HOLDING, "input": cls.INPUT}[text]

    @property
    def label(self) -> str:
        return self.name.lower()


class WordOrder(enum.Enum):
    BIG = "big"  # ABCD: most significant word first
    LITTLE = "little"  # CDAB: least significant word first


class DataType(enum.Enum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"

    @property
    def registers(self) -> int:
        return _FORMATS[self][1]

    @property
    def is_float(self) -> bool:
        return self in (DataType.FLOAT32, DataType.FLOAT64)


# struct format (big-endian) and register count for each type
_FORMATS: dict[DataType, tuple[str, int]] = {
    DataType.INT16: (">h", 1),
    DataType.UINT16: (">H", 1),
    DataType.INT32: (">i", 2),
    DataType.UINT32: (">I", 2),
    DataType.INT64: (">q", 4),
    DataType.UINT64: (">Q", 4),
    DataType.FLOAT32: (">f", 2),
    DataType.FLOAT64: (">d", 4),
}


def decode(registers: Sequence[int], dtype: DataType, word_order: WordOrder = WordOrder.BIG) -> int | float:
    """Decode ``dtype.registers`` registers into a Python number."""
    fmt, count = _FORMATS[dtype]
    if len(registers) != count:
        raise ValueError(f"{dtype.value} needs {count} registers, got {len(registers)}")
    words = registers if word_order is WordOrder.BIG else list(reversed(registers))
    try:
        raw = struct.pack(f">{count}H", *words)
    except struct.error:
        raise ValueError(f"registers must be 0..65535, got {list(registers)}") from None
    return struct.unpack(fmt, raw)[0]


def encode(value: int | float, dtype: DataType, word_order: WordOrder = WordOrder.BIG) -> tuple[int, ...]:
    """Encode a number into registers; raises ValueError if it does not fit the type."""
    fmt, count = _FORMATS[dtype]
    try:
        if not dtype.is_float:
            value = int(value)
        raw = struct.pack(fmt, value)
    except (struct.error, OverflowError, ValueError) as exc:
        raise ValueError(f"{value!r} does not fit {dtype.value}: {exc}") from None
    words = struct.unpack(f">{count}H", raw)
    return words if word_order is WordOrder.BIG else tuple(reversed(words))


def decoder(dtype: DataType, word_order: WordOrder = WordOrder.BIG) -> Callable[[bytes], int | float]:
    """A fast decoder from raw register bytes (as in a reply) for one type and word order."""
    fmt, count = _FORMATS[dtype]
    unpack = struct.Struct(fmt).unpack
    if word_order is WordOrder.BIG or count == 1:
        return lambda raw: unpack(raw)[0]
    words = struct.Struct(f">{count}H")

    def decode_swapped(raw: bytes) -> int | float:
        return unpack(words.pack(*reversed(words.unpack(raw))))[0]

    return decode_swapped


def registers_to_bytes(registers: Sequence[int]) -> bytes:
    return struct.pack(f">{len(registers)}H", *registers)


def bytes_to_registers(data: bytes) -> tuple[int, ...]:
    if len(data) % 2:
        raise ValueError("odd number of bytes for 16-bit registers")
    return struct.unpack(f">{len(data) // 2}H", data)
