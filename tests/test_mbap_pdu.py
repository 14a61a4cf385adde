"""bridge.core.mbap (Modbus TCP framing) and bridge.core.pdu (request parsing, responses, reply checking)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import fc16

from bridge.core import mbap
from bridge.core import pdu as P
from bridge.core.errors import BadReply, ExceptionReply, ProtocolError

# ------------------------------------------------------------------------ MBAP


def test_encode_known_bytes():
    assert mbap.encode(1, 11, bytes.fromhex("03 00 00 00 02")) == bytes.fromhex("00 01 00 00 00 06 0B 03 00 00 00 02")
    assert mbap.encode(0xABCD, 255, b"\x83\x02") == bytes.fromhex("AB CD 00 00 00 03 FF 83 02")


def test_decode_known_bytes():
    used, frame = mbap.decode(bytes.fromhex("00 01 00 00 00 06 0B 03 00 00 00 02"))
    assert used == 12
    assert frame == mbap.Frame(tid=1, unit=11, pdu=bytes.fromhex("03 00 00 00 02"))


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(min_size=1, max_size=mbap.MAX_PDU))
def test_round_trip(tid, unit, pdu):
    adu = mbap.encode(tid, unit, pdu)
    assert len(adu) == mbap.HEADER + len(pdu)
    assert mbap.decode(adu) == (len(adu), mbap.Frame(tid, unit, pdu))
    assert mbap.decode(bytearray(adu)) == (len(adu), mbap.Frame(tid, unit, pdu))
    assert mbap.decode(memoryview(adu)) == (len(adu), mbap.Frame(tid, unit, pdu))


def test_partial_header_needs_more():
    adu = mbap.encode(7, 1, bytes.fromhex("03 00 00 00 02"))
    for cut in range(mbap.HEADER):
        assert mbap.decode(adu[:cut]) == (0, None)


def test_partial_pdu_needs_more():
    adu = mbap.encode(7, 1, bytes.fromhex("10 00 00 00 02 04 00 01 00 02"))
    for cut in range(mbap.HEADER, len(adu)):
        assert mbap.decode(adu[:cut]) == (0, None)
    assert mbap.decode(adu)[0] == len(adu)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 255), st.binary(min_size=1, max_size=20)), min_size=1, max_size=6))
def test_several_frames_back_to_back(frames):
    stream = b"".join(mbap.encode(*f) for f in frames) + b"\x00\x01"  # plus the start of another header
    out = []
    pos = 0
    while True:
        used, frame = mbap.decode(stream[pos:])
        if frame is None:
            assert used == 0
            break
        out.append((frame.tid, frame.unit, frame.pdu))
        pos += used
    assert out == frames
    assert stream[pos:] == b"\x00\x01"


@pytest.mark.parametrize("proto", [1, 0x0100, 0xFFFF])
def test_protocol_id_not_zero_raises(proto):
    buf = struct.pack(">HHHB", 1, proto, 6, 1) + bytes.fromhex("03 00 00 00 02")
    with pytest.raises(ProtocolError):
        mbap.decode(buf)


@pytest.mark.parametrize("length", [0, 1, 255, 256, 0xFFFF])
def test_bad_length_raises(length):
    buf = struct.pack(">HHHB", 1, 0, length, 1) + bytes(300)
    with pytest.raises(ProtocolError):
        mbap.decode(buf)


def test_bad_length_raises_even_without_the_body():
    with pytest.raises(ProtocolError):
        mbap.decode(struct.pack(">HHHB", 1, 0, 1, 1))
    with pytest.raises(ProtocolError):
        mbap.decode(struct.pack(">HHHB", 1, 0, 300, 1))


def test_length_limits_accepted():
    assert mbap.decode(mbap.encode(1, 1, b"\x03"))[0] == 8  # length 2: unit + 1-byte PDU
    big = bytes(mbap.MAX_PDU)
    used, frame = mbap.decode(mbap.encode(1, 1, big))  # length 254
    assert used == 6 + 254 and frame.pdu == big


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300))
def test_decode_arbitrary_bytes_returns_or_raises_protocol_error(buf):
    try:
        used, frame = mbap.decode(buf)
    except ProtocolError:
        return
    if frame is None:
        assert used == 0
    else:
        assert mbap.HEADER < used <= len(buf)
        assert 1 <= len(frame.pdu) <= mbap.MAX_PDU


# ------------------------------------------------------------- parse_request

def req(fc: int, *fields: int) -> bytes:
    return bytes((fc,)) + struct.pack(f">{len(fields)}H", *fields)


def raises_code(pdu: bytes) -> tuple[int, int]:
    with pytest.raises(P.PduException) as info:
        P.parse_request(pdu)
    return info.value.function, info.value.code


@pytest.mark.parametrize("fc", [3, 4])
def test_parse_read(fc):
    assert P.parse_request(req(fc, 0x0156, 4)) == P.ReadRequest(fc, 0x0156, 4)
    assert P.parse_request(req(fc, 0, 125)) == P.ReadRequest(fc, 0, 125)
    assert P.parse_request(req(fc, 0xFFFF, 1)) == P.ReadRequest(fc, 0xFFFF, 1)
    assert P.parse_request(req(fc, 65536 - 125, 125)).end == 0x10000


@pytest.mark.parametrize("fc", [3, 4])
@pytest.mark.parametrize("count", [0, 126, 0xFFFF])
def test_read_count_out_of_range_is_illegal_data_value(fc, count):
    assert raises_code(req(fc, 0, count)) == (fc, P.ILLEGAL_DATA_VALUE)


@pytest.mark.parametrize("fc", [3, 4])
@pytest.mark.parametrize("address,count", [(0xFFFF, 2), (65536 - 124, 125), (0xFFC0, 0x7D)])
def test_read_past_end_of_address_space_is_illegal_data_address(fc, address, count):
    assert address + count > 65536
    assert raises_code(req(fc, address, count)) == (fc, P.ILLEGAL_DATA_ADDRESS)


@pytest.mark.parametrize("fc", [3, 4])
@pytest.mark.parametrize("pdu_tail", [b"", b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x01\x00"])
def test_read_wrong_length_is_illegal_data_value(fc, pdu_tail):
    assert raises_code(bytes((fc,)) + pdu_tail) == (fc, P.ILLEGAL_DATA_VALUE)


@pytest.mark.parametrize("fc", [0x01, 0x02, 0x05, 0x07, 0x0F, 0x11, 0x17, 0x2B, 0x7F, 0x83, 0xFF])
def test_unknown_function_is_illegal_function(fc):
    assert raises_code(bytes((fc,)) + bytes(4)) == (fc, P.ILLEGAL_FUNCTION)
    assert raises_code(bytes((fc,))) == (fc, P.ILLEGAL_FUNCTION)


def test_empty_pdu_is_illegal_function():
    with pytest.raises(P.PduException) as info:
        P.parse_request(b"")
    assert info.value.code == P.ILLEGAL_FUNCTION


def test_parse_write_single():
    assert P.parse_request(req(6, 0x0010, 0xBEEF)) == P.WriteRequest(6, 0x0010, (0xBEEF,))
    assert P.parse_request(req(6, 0xFFFF, 0)).end == 0x10000
    assert raises_code(req(6, 1)) == (6, P.ILLEGAL_DATA_VALUE)
    assert raises_code(req(6, 1, 2) + b"\x00") == (6, P.ILLEGAL_DATA_VALUE)


def test_parse_write_multiple():
    assert P.parse_request(fc16(0x0100, [1, 2, 3])) == P.WriteRequest(16, 0x0100, (1, 2, 3))
    assert P.parse_request(fc16(0, list(range(123)))).values == tuple(range(123))


@pytest.mark.parametrize(
    "pdu",
    [
        fc16(0, [1, 2], nbytes=3),  # byte count not 2 * count
        fc16(0, [1, 2], nbytes=6),
        fc16(0, [1, 2], count=3),  # count disagrees with the data
        fc16(0, [1, 2]) + b"\x00",  # trailing byte
        fc16(0, [1, 2])[:-1],  # short data
        fc16(0, [], count=0, nbytes=0),  # count 0
        fc16(0, list(range(124))),  # count above 123
        b"\x10\x00\x00\x00\x01",  # header cut short
    ],
    ids=["nbytes3", "nbytes6", "count3", "trailing", "short", "count0", "count124", "truncated"],
)
def test_write_multiple_malformed_is_illegal_data_value(pdu):
    assert raises_code(pdu) == (16, P.ILLEGAL_DATA_VALUE)


def test_write_multiple_past_end_is_illegal_data_address():
    assert raises_code(fc16(0xFFFF, [1, 2])) == (16, P.ILLEGAL_DATA_ADDRESS)
    assert P.parse_request(fc16(0xFFFE, [1, 2])).end == 0x10000


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.binary(max_size=260), st.sampled_from([3, 4, 6, 16]).flatmap(lambda fc: st.binary(max_size=30).map(lambda b: bytes((fc,)) + b))))
def test_any_bytes_give_request_or_pdu_exception(pdu):
    try:
        request = P.parse_request(pdu)
    except P.PduException as exc:
        assert exc.code in (P.ILLEGAL_FUNCTION, P.ILLEGAL_DATA_ADDRESS, P.ILLEGAL_DATA_VALUE)
        assert exc.function == (pdu[0] if pdu else 0)
        ex = exc.pdu()
        assert len(ex) == 2 and ex[0] & 0x80 and ex[1] == exc.code
        return
    assert isinstance(request, (P.ReadRequest, P.WriteRequest))
    assert request.end <= 0x10000
    assert P.encode_request(request) == pdu


requests = st.one_of(
    st.integers(1, 125).flatmap(
        lambda n: st.builds(P.ReadRequest, st.sampled_from([3, 4]), st.integers(0, 0x10000 - n), st.just(n))
    ),
    st.builds(P.WriteRequest, st.just(6), st.integers(0, 0xFFFF), st.tuples(st.integers(0, 0xFFFF))),
    st.integers(1, 123).flatmap(
        lambda n: st.builds(
            P.WriteRequest,
            st.just(16),
            st.integers(0, 0x10000 - n),
            st.lists(st.integers(0, 0xFFFF), min_size=n, max_size=n).map(tuple),
        )
    ),
)


@settings(max_examples=100, deadline=None)
@given(requests)
def test_encode_parse_round_trip(request):
    assert P.parse_request(P.encode_request(request)) == request


def test_encode_request_known_bytes():
    assert P.encode_request(P.ReadRequest(3, 0, 10)) == bytes.fromhex("03 00 00 00 0A")
    assert P.encode_request(P.WriteRequest(6, 1, (3,))) == bytes.fromhex("06 00 01 00 03")
    assert P.encode_request(P.WriteRequest(16, 1, (0x000A, 0x0102))) == bytes.fromhex("10 00 01 00 02 04 00 0A 01 02")


# --------------------------------------------------------------- responses

def test_exception_pdu():
    assert P.exception_pdu(3, 0x02) == b"\x83\x02"
    assert P.exception_pdu(0x2B, 0x01) == b"\xab\x01"
    assert P.PduException(4, P.GATEWAY_TARGET_FAILED).pdu() == b"\x84\x0b"
    assert P.PduException(4, P.GATEWAY_PATH_UNAVAILABLE).pdu() == b"\x84\x0a"


def test_read_and_write_response_pdus():
    assert P.read_response_pdu(4, b"\x43\x66\x00\x00") == bytes.fromhex("04 04 43 66 00 00")
    assert P.write_response_pdu(P.WriteRequest(6, 0x10, (7,))) == bytes.fromhex("06 00 10 00 07")
    assert P.write_response_pdu(P.WriteRequest(16, 0x10, (7, 8, 9))) == bytes.fromhex("10 00 10 00 03")


def test_expected_response_length():
    assert P.expected_response_length(P.ReadRequest(3, 0, 10)) == 22
    assert P.expected_response_length(P.WriteRequest(6, 0, (1,))) == 5
    assert P.expected_response_length(P.WriteRequest(16, 0, (1, 2, 3))) == 5


# ----------------------------------------------------------- check_response

READ2 = P.ReadRequest(3, 0, 2)


def test_check_good_read():
    data = b"\x43\x66\x00\x00"
    assert P.check_response(READ2, P.read_response_pdu(3, data)) == data


@settings(max_examples=100, deadline=None)
@given(requests, st.binary(min_size=250, max_size=250))
def test_check_response_accepts_the_right_answer(request, noise):
    if isinstance(request, P.ReadRequest):
        data = noise[: 2 * request.count]
        assert P.check_response(request, P.read_response_pdu(request.function, data)) == data
    else:
        echo = P.write_response_pdu(request)
        assert P.check_response(request, echo) == echo


@pytest.mark.parametrize("code", [0x01, 0x02, 0x03, 0x04, 0x0B])
def test_check_exception_reply(code):
    with pytest.raises(ExceptionReply) as info:
        P.check_response(READ2, bytes((0x83, code)))
    assert info.value.code == code
    with pytest.raises(ExceptionReply) as info:
        P.check_response(P.WriteRequest(16, 0, (1,)), bytes((0x90, code)))
    assert info.value.code == code


@pytest.mark.parametrize(
    "pdu",
    [b"", b"\x04\x04\x00\x01\x00\x02", b"\x84\x02", b"\x83\x02\x00", b"\x06\x00\x00\x00\x01"],
    ids=["empty", "fc4", "exc-other-fc", "long-exception", "fc6"],
)
def test_check_wrong_function_is_bad_reply(pdu):
    with pytest.raises(BadReply):
        P.check_response(READ2, pdu)


def test_check_wrong_function_kind():
    with pytest.raises(BadReply) as info:
        P.check_response(READ2, b"\x04\x04\x00\x01\x00\x02")
    assert info.value.kind == "wrong_function"


@pytest.mark.parametrize(
    "pdu",
    [
        b"\x03\x02\x00\x01",  # one register, two asked
        b"\x03\x06\x00\x01\x00\x02\x00\x03",  # three registers
        b"\x03\x04\x00\x01\x00",  # byte count right, data short
        b"\x03\x02\x00\x01\x00\x02",  # right length, wrong byte count
        b"\x03\x06\x00\x01\x00\x02",  # right length, byte count too big
        b"\x03",
    ],
)
def test_check_wrong_byte_count_is_bad_reply(pdu):
    with pytest.raises(BadReply) as info:
        P.check_response(READ2, pdu)
    assert info.value.kind == "wrong_length"


def test_check_write_single_echo():
    request = P.WriteRequest(6, 0x10, (0x1234,))
    assert P.check_response(request, bytes.fromhex("06 00 10 12 34")) == bytes.fromhex("06 00 10 12 34")
    for bad in (bytes.fromhex("06 00 10 12 35"), bytes.fromhex("06 00 11 12 34")):
        with pytest.raises(BadReply) as info:
            P.check_response(request, bad)
        assert info.value.kind == "wrong_echo"
    with pytest.raises(BadReply):
        P.check_response(request, bytes.fromhex("06 00 10 12"))


def test_check_write_multiple_echo():
    request = P.WriteRequest(16, 0x10, (1, 2, 3))
    assert P.check_response(request, bytes.fromhex("10 00 10 00 03")) == bytes.fromhex("10 00 10 00 03")
    for bad in (bytes.fromhex("10 00 10 00 02"), bytes.fromhex("10 00 11 00 03")):
        with pytest.raises(BadReply):
            P.check_response(request, bad)


@settings(max_examples=100, deadline=None)
@given(requests, st.binary(max_size=260))
def test_check_response_raises_only_transaction_errors(request, pdu):
    try:
        out = P.check_response(request, pdu)
    except (BadReply, ExceptionReply):
        return
    assert len(pdu) == P.expected_response_length(request)
    assert pdu[0] == request.function
    if isinstance(request, P.ReadRequest):
        assert out == pdu[2:] and len(out) == 2 * request.count
    else:
        assert out == P.write_response_pdu(request)
