"""bridge.core.codec: Modbus data types and word orders (registers <-> numbers)."""
from __future__ import annotations

import math
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymodbus.client.mixin import ModbusClientMixin

from bridge.core.codec import (
    DataType,
    Function,
    WordOrder,
    bytes_to_registers,
    decode,
    encode,
    registers_to_bytes,
)

INT_RANGES = {
    DataType.INT16: (-(2**15), 2**15 - 1),
    DataType.UINT16: (0, 2**16 - 1),
    DataType.INT32: (-(2**31), 2**31 - 1),
    DataType.UINT32: (0, 2**32 - 1),
    DataType.INT64: (-(2**63), 2**63 - 1),
    DataType.UINT64: (0, 2**64 - 1),
}
INT_TYPES = list(INT_RANGES)
FLOAT_TYPES = [DataType.FLOAT32, DataType.FLOAT64]
ORDERS = list(WordOrder)
REG_COUNTS = {
    DataType.INT16: 1,
    DataType.UINT16: 1,
    DataType.INT32: 2,
    DataType.UINT32: 2,
    DataType.INT64: 4,
    DataType.UINT64: 4,
    DataType.FLOAT32: 2,
    DataType.FLOAT64: 4,
}

PYMODBUS_TYPES = {dt: getattr(ModbusClientMixin.DATATYPE, dt.name) for dt in DataType}

register = st.integers(0, 0xFFFF)


def _float_value(dtype: DataType):
    return st.floats(width=32 if dtype is DataType.FLOAT32 else 64, allow_nan=True, allow_infinity=True)


# --------------------------------------------------------------- type metadata

def test_every_type_has_its_register_count():
    assert {dt: dt.registers for dt in DataType} == REG_COUNTS
    assert {dt for dt in DataType if dt.is_float} == set(FLOAT_TYPES)


def test_function_parse_and_label():
    assert Function.parse("input") is Function.INPUT
    assert Function.parse("holding") is Function.HOLDING
    assert int(Function.INPUT) == 4 and int(Function.HOLDING) == 3
    assert Function.INPUT.label == "input" and Function.HOLDING.label == "holding"
    with pytest.raises(KeyError):
        Function.parse("coil")


# ------------------------------------------------------------------ round trips

@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_integer_round_trip(dtype, order, data):
    lo, hi = INT_RANGES[dtype]
    value = data.draw(st.integers(lo, hi))
    regs = encode(value, dtype, order)
    assert len(regs) == dtype.registers
    assert all(isinstance(r, int) and 0 <= r <= 0xFFFF for r in regs)
    back = decode(regs, dtype, order)
    assert back == value and isinstance(back, int)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda d: d.value)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_float_round_trip_including_inf_and_nan(dtype, order, data):
    value = data.draw(_float_value(dtype))
    regs = encode(value, dtype, order)
    assert len(regs) == dtype.registers
    assert all(0 <= r <= 0xFFFF for r in regs)
    back = decode(regs, dtype, order)
    assert isinstance(back, float)
    if math.isnan(value):
        assert math.isnan(back)
    else:
        assert back == value
        assert math.copysign(1.0, back) == math.copysign(1.0, value)  # -0.0 stays -0.0


@pytest.mark.parametrize("dtype", FLOAT_TYPES, ids=lambda d: d.value)
@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan, 0.0, -0.0])
def test_float_special_values(dtype, order, special):
    back = decode(encode(special, dtype, order), dtype, order)
    if math.isnan(special):
        assert math.isnan(back)
    else:
        assert back == special and math.copysign(1.0, back) == math.copysign(1.0, special)


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", list(DataType), ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_registers_round_trip(dtype, order, data):
    """Any register pattern decodes and re-encodes to itself (NaN patterns aside: payloads may be normalised)."""
    regs = tuple(data.draw(st.lists(register, min_size=dtype.registers, max_size=dtype.registers)))
    value = decode(regs, dtype, order)
    if dtype.is_float and math.isnan(value):
        assert math.isnan(decode(encode(value, dtype, order), dtype, order))
        return
    assert tuple(encode(value, dtype, order)) == regs


@pytest.mark.parametrize("dtype", list(DataType), ids=lambda d: d.value)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_little_is_big_with_words_reversed(dtype, data):
    regs = data.draw(st.lists(register, min_size=dtype.registers, max_size=dtype.registers))
    value = decode(regs, dtype, WordOrder.BIG)
    little = decode(list(reversed(regs)), dtype, WordOrder.LITTLE)
    if dtype.is_float and math.isnan(value):
        assert math.isnan(little)
    else:
        assert little == value
    if not (dtype.is_float and math.isnan(value)):
        assert tuple(encode(value, dtype, WordOrder.LITTLE)) == tuple(reversed(encode(value, dtype, WordOrder.BIG)))


def test_default_word_order_is_big():
    assert tuple(encode(-2, DataType.INT32)) == (0xFFFF, 0xFFFE)
    assert decode((0x4366, 0x0000), DataType.FLOAT32) == 230.0


# ---------------------------------------------------------------- known vectors

KNOWN = [
    (DataType.FLOAT32, 230.0, (0x4366, 0x0000)),
    (DataType.FLOAT32, 1.0, (0x3F80, 0x0000)),
    (DataType.FLOAT32, -2.5, (0xC020, 0x0000)),
    (DataType.FLOAT32, 50.0, (0x4248, 0x0000)),
    (DataType.FLOAT64, 1.0, (0x3FF0, 0x0000, 0x0000, 0x0000)),
    (DataType.FLOAT64, 230.0, (0x406C, 0xC000, 0x0000, 0x0000)),
    (DataType.INT16, -1, (0xFFFF,)),
    (DataType.INT16, -32768, (0x8000,)),
    (DataType.UINT16, 0xBEEF, (0xBEEF,)),
    (DataType.INT32, -2, (0xFFFF, 0xFFFE)),
    (DataType.INT32, 0x12345678, (0x1234, 0x5678)),
    (DataType.UINT32, 0xDEADBEEF, (0xDEAD, 0xBEEF)),
    (DataType.INT64, -2, (0xFFFF, 0xFFFF, 0xFFFF, 0xFFFE)),
    (DataType.UINT64, 0x0102030405060708, (0x0102, 0x0304, 0x0506, 0x0708)),
]


@pytest.mark.parametrize("dtype,value,big", KNOWN, ids=[f"{d.value}={v!r}" for d, v, _ in KNOWN])
def test_known_vectors(dtype, value, big):
    little = tuple(reversed(big))
    assert tuple(encode(value, dtype, WordOrder.BIG)) == big
    assert tuple(encode(value, dtype, WordOrder.LITTLE)) == little
    assert decode(big, dtype, WordOrder.BIG) == value
    assert decode(little, dtype, WordOrder.LITTLE) == value


def test_float32_230_little_vector():
    assert tuple(encode(230.0, DataType.FLOAT32, WordOrder.LITTLE)) == (0x0000, 0x4366)
    assert decode([0x0000, 0x4366], DataType.FLOAT32, WordOrder.LITTLE) == 230.0


def test_float32_nan_encodes_to_a_nan_pattern():
    hi, lo = encode(math.nan, DataType.FLOAT32)
    assert hi & 0x7F80 == 0x7F80 and ((hi & 0x007F) or lo)


def test_encode_truncates_integral_floats_for_int_types():
    assert tuple(encode(7.0, DataType.UINT16)) == (7,)


# ------------------------------------------------------ cross-check vs pymodbus

@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", list(DataType), ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_matches_pymodbus_conversion(dtype, order, data):
    pm_type = PYMODBUS_TYPES[dtype]
    regs = data.draw(st.lists(register, min_size=dtype.registers, max_size=dtype.registers))
    ours = decode(regs, dtype, order)
    theirs = ModbusClientMixin.convert_from_registers(list(regs), pm_type, word_order=order.value)
    if dtype.is_float and math.isnan(ours):
        assert math.isnan(theirs)
        return
    assert ours == theirs
    assert list(encode(ours, dtype, order)) == ModbusClientMixin.convert_to_registers(
        ours, pm_type, word_order=order.value
    )


# ------------------------------------------------------------------- errors

OUT_OF_RANGE = [
    (DataType.INT16, 2**15),
    (DataType.INT16, -(2**15) - 1),
    (DataType.UINT16, -1),
    (DataType.UINT16, 2**16),
    (DataType.INT32, 2**31),
    (DataType.INT32, -(2**31) - 1),
    (DataType.UINT32, -1),
    (DataType.UINT32, 2**32),
    (DataType.INT64, 2**63),
    (DataType.INT64, -(2**63) - 1),
    (DataType.UINT64, -1),
    (DataType.UINT64, 2**64),
]


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype,value", OUT_OF_RANGE, ids=lambda x: getattr(x, "value", x))
def test_out_of_range_integers_raise_value_error(dtype, value, order):
    with pytest.raises(ValueError):
        encode(value, dtype, order)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda d: d.value)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_any_out_of_range_integer_raises_value_error(dtype, data):
    lo, hi = INT_RANGES[dtype]
    value = data.draw(st.one_of(st.integers(max_value=lo - 1), st.integers(min_value=hi + 1)))
    with pytest.raises(ValueError):
        encode(value, dtype)


@pytest.mark.parametrize("dtype", INT_TYPES, ids=lambda d: d.value)
def test_nan_does_not_fit_an_integer_type(dtype):
    with pytest.raises(ValueError):
        encode(math.nan, dtype)


@pytest.mark.parametrize("dtype,value", [(DataType.INT16, math.inf), (DataType.UINT64, -math.inf)],
                         ids=["int16-inf", "uint64-minus-inf"])
def test_infinity_does_not_fit_an_integer_type(dtype, value):
    with pytest.raises(ValueError):
        encode(value, dtype)


@pytest.mark.parametrize("value", [1e39, -3.5e38])
def test_finite_value_too_large_for_float32_raises_value_error(value):
    with pytest.raises(ValueError):
        encode(value, DataType.FLOAT32)


def test_float32_max_still_fits():
    f32_max = struct.unpack(">f", b"\x7f\x7f\xff\xff")[0]
    assert tuple(encode(f32_max, DataType.FLOAT32)) == (0x7F7F, 0xFFFF)
    assert tuple(encode(1e300, DataType.FLOAT64)) == struct.unpack(">4H", struct.pack(">d", 1e300))


@pytest.mark.parametrize("order", ORDERS, ids=lambda o: o.value)
@pytest.mark.parametrize("dtype", list(DataType), ids=lambda d: d.value)
def test_wrong_register_count_raises_value_error(dtype, order):
    n = dtype.registers
    for wrong in {0, n - 1, n + 1, 2 * n} - {n}:
        with pytest.raises(ValueError):
            decode([0] * wrong, dtype, order)


def test_register_outside_16_bits_raises_value_error():
    with pytest.raises(ValueError):
        decode([0x10000], DataType.UINT16)
    with pytest.raises(ValueError):
        decode([0, -1], DataType.FLOAT32)


# ------------------------------------------------------------ byte helpers

@settings(max_examples=100, deadline=None)
@given(st.lists(register, max_size=130))
def test_registers_bytes_round_trip(regs):
    data = registers_to_bytes(regs)
    assert len(data) == 2 * len(regs)
    assert tuple(bytes_to_registers(data)) == tuple(regs)


def test_registers_are_big_endian_bytes():
    assert registers_to_bytes([0x4366, 0x0001]) == b"\x43\x66\x00\x01"
    assert bytes_to_registers(b"\x12\x34\xab\xcd") == (0x1234, 0xABCD)
    assert bytes_to_registers(b"") == ()


@pytest.mark.parametrize("data", [b"\x00", b"\x00\x01\x02"])
def test_odd_byte_count_raises_value_error(data):
    with pytest.raises(ValueError):
        bytes_to_registers(data)
